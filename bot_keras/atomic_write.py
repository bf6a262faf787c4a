"""Atomic file writes: a reader never sees half a file, and a failed write leaves the previous one.

`write_atomic(path, data)` writes through a temporary sibling (`.NAME.*.tmp`), `fsync`s it and renames it
over `path` (`os.replace`, atomic on POSIX); a crash leaves the previous file (or none) and at worst the
temporary, which `run_dir.remove_temporaries` clears. A failed write (ENOSPC, EIO) removes its temporary
and raises `write_error`: one `cli.SetupError` line naming the path, the error and the cure. The run
directory (`run_dir`), `evaluate`'s reports and the exports write through it.
"""

import os
import pathlib
import tempfile

from bot_keras.cli import SetupError

# What a training command's failed write says after the path and the error: its previous files are intact.
RESUME_AFTER_WRITE_ERROR = (
    "the previous files are intact; free space (or fix the disk), then rerun with --resume"
)


def write_error(path, error, cure=RESUME_AFTER_WRITE_ERROR):
    """The SetupError of a write to `path` that failed with `error` (an OSError such as ENOSPC or EIO, or
    TensorFlow's error for one): one line naming the path, the error and `cure`."""
    reason = f"[Errno {error.errno}] {error.strerror}" if getattr(error, "strerror", None) else str(error)
    reason = reason.strip().splitlines()[0] if reason.strip() else type(error).__name__
    return SetupError(f"cannot write {path}: {reason}; {cure}")


def write_atomic(path, data):
    """Writes `data` (str or bytes) to `path` through a temporary sibling and `os.replace`; a failed write
    (a full disk: ENOSPC, EIO) removes the temporary, leaves the previous file and raises `write_error`."""
    path = pathlib.Path(path)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from a serving user
        os.replace(tmp, path)
    except OSError as error:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise write_error(path, error) from None
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
