"""Copy a `seg_folder:` dataset at a smaller resolution (CPU-size recipes such as CamVid at half size).

    python tools/resize_seg_folder.py --src=/tmp/camvid/camvid --dst=/tmp/camvid_half --factor=2

Every `<split>/images/*` is resized by 1/factor with bilinear interpolation (JPEGs re-encoded at quality 95)
and every `<split>/masks/*.png` with nearest neighbour, so masks keep their class ids and the ignore label
255; `classes.txt` is copied. Sizes are floor(size / factor).
"""

import os
import pathlib
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402
from PIL import Image  # noqa: E402

from bot_keras import cli  # noqa: E402

COMMAND = "resize_seg_folder"


def resize_folder(src, dst, factor):
    src, dst = pathlib.Path(src), pathlib.Path(dst)
    if not (src / "classes.txt").is_file():
        raise cli.SetupError(f"--src {str(src)!r} is not a seg_folder dataset: missing {src / 'classes.txt'}")
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "classes.txt", dst / "classes.txt")
    count = 0
    for split in sorted(p for p in src.iterdir() if (p / "images").is_dir()):
        for kind, method in (("images", Image.BILINEAR), ("masks", Image.NEAREST)):
            (dst / split.name / kind).mkdir(parents=True, exist_ok=True)
            for path in sorted((split / kind).iterdir()):
                with Image.open(path) as image:
                    small = image.resize((image.width // factor, image.height // factor), method)
                    options = {"quality": 95} if path.suffix.lower() in (".jpg", ".jpeg") else {}
                    small.save(dst / split.name / kind / path.name, **options)
                    count += 1
    return count


def define_flags(fv):
    d = dict(flag_values=fv)
    flags.DEFINE_string("src", None, "seg_folder root (classes.txt, <split>/images, <split>/masks).", **d)
    flags.DEFINE_string("dst", None, "Where to write the smaller copy.", **d)
    flags.DEFINE_integer("factor", 2, "Divide both sides by this.", lower_bound=1, **d)


def main(argv, f=flags.FLAGS):
    if len(argv) > 1:
        raise cli.SetupError(f"unexpected arguments: {' '.join(argv[1:])}")
    print(f"wrote {resize_folder(f.src, f.dst, f.factor)} files to {f.dst}")


if __name__ == "__main__":
    cli.run(main, define_flags, command=COMMAND, required=("src", "dst"))
