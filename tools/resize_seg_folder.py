"""Copy a `seg_folder:` dataset at a smaller resolution (CPU-size recipes such as CamVid at half size).

    python tools/resize_seg_folder.py --src=/tmp/camvid/camvid --dst=/tmp/camvid_half --factor=2

Every `<split>/images/*` is resized by 1/factor with bilinear interpolation (JPEGs re-encoded at quality 95)
and every `<split>/masks/*.png` with nearest neighbour, so masks keep their class ids and the ignore label
255; `classes.txt` is copied. Sizes are floor(size / factor).
"""

import argparse
import pathlib
import shutil

from PIL import Image


def resize_folder(src, dst, factor):
    src, dst = pathlib.Path(src), pathlib.Path(dst)
    if not (src / "classes.txt").is_file():
        raise SystemExit(f"{src} is not a seg_folder dataset: missing {src / 'classes.txt'}")
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", required=True, help="seg_folder root (classes.txt, <split>/images, masks)")
    parser.add_argument("--dst", required=True, help="where to write the smaller copy")
    parser.add_argument("--factor", type=int, default=2, help="divide both sides by this (default 2)")
    args = parser.parse_args()
    if args.factor < 1:
        parser.error(f"--factor={args.factor} must be >= 1")
    print(f"wrote {resize_folder(args.src, args.dst, args.factor)} files to {args.dst}")


if __name__ == "__main__":
    main()
