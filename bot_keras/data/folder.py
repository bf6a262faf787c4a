"""Image folders: ROOT/<split>/<class>/*.{jpg,jpeg,png,bmp,gif}, class index = sorted class folder names."""

import dataclasses
import functools
import logging
import os

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
MAX_LISTED_FILES = 20  # non-image files named in one message; the rest are counted


@dataclasses.dataclass(frozen=True)
class FolderListing:
    """One split of an image folder: image paths, their class indices, and the class names (sorted)."""

    paths: tuple
    labels: tuple
    class_names: tuple


def _some(paths):
    listed = ", ".join(repr(p) for p in paths[:MAX_LISTED_FILES])
    more = len(paths) - MAX_LISTED_FILES
    return listed + (f" and {more} more" if more > 0 else "")


@functools.lru_cache(maxsize=8)
def list_folder(root, split, skip_corrupt=False):
    """The images of `root/split`, one class per sub-folder; cached (call `list_folder.cache_clear()` after
    changing the folder).

    Files whose extension is not an image's are an error naming every such file (up to MAX_LISTED_FILES, so
    that they can all be fixed at once), or with `skip_corrupt` left out with one warning that names them.
    Hidden files and folders (starting with '.') are ignored.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"Image folder {root!r} does not exist (expected ROOT/<split>/<class>/*.jpg)."
        )
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        available = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        raise FileNotFoundError(
            f"Split {split!r} not found in image folder {root!r}: no directory {split_dir!r}; "
            f"available splits: {available or 'none'}."
        )
    class_names = sorted(
        d
        for d in os.listdir(split_dir)
        if not d.startswith(".") and os.path.isdir(os.path.join(split_dir, d))
    )
    if not class_names:
        raise ValueError(
            f"Image folder {split_dir!r} has no class folders (expected {split_dir}/<class>/*.jpg)."
        )
    paths, labels, not_images, empty = [], [], [], []
    for label, name in enumerate(class_names):
        class_dir = os.path.join(split_dir, name)
        found = 0
        for entry in sorted(os.scandir(class_dir), key=lambda e: e.name):
            if entry.name.startswith(".") or entry.is_dir():
                continue
            if not entry.name.lower().endswith(IMAGE_EXTENSIONS):
                not_images.append(entry.path)
                continue
            paths.append(entry.path)
            labels.append(label)
            found += 1
        if not found:
            empty.append(class_dir)
    if not_images and not skip_corrupt:
        raise ValueError(
            f"{len(not_images)} files in {split_dir!r} are not images (extensions "
            f"{', '.join(IMAGE_EXTENSIONS)}): {_some(not_images)}; remove them or pass skip_corrupt=True "
            "(--skip_corrupt) to skip such files."
        )
    if empty:
        raise ValueError(f"Class folder {empty[0]!r} has no images ({', '.join(IMAGE_EXTENSIONS)}).")
    if not_images:
        log.warning("Skipped %d non-image files in %s: %s", len(not_images), split_dir, _some(not_images))
    return FolderListing(tuple(paths), tuple(labels), tuple(class_names))
