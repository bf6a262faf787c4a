"""Where detection data comes from: Pascal VOC folders, COCO JSON, or TFDS, read into one form.

Every source yields examples `{"encoded": image bytes, "boxes": float32 [N, 4], "labels": int32 [N],
"difficult": bool [N], "image_hw": int32 [2], "key": string}`. **Boxes are "yxyx", normalised to [0, 1] by
the image's height and width** (TFDS's own convention; continuous edges), so they stay valid whatever size
the pipeline decodes to. `image_hw` is the size the annotation declares (the pipeline checks the decoded
image against it; [0, 0] when the source declares none, as TFDS) and `key` names the file in errors.

Source strings (the `--dataset` of detection; for `voc:` and `coco:` a split may join several with "+",
`trainval+test`, and `tfds:` takes TFDS's own split strings such as `train+validation`):
  voc:ROOT          a VOCdevkit year folder: ROOT/JPEGImages/ID.jpg, ROOT/Annotations/ID.xml,
                    ROOT/ImageSets/Main/SPLIT.txt (one ID a line). Class names: the 20 Pascal VOC classes
                    when ROOT is named VOC2007 or VOC2012, else ROOT/classes.txt if present, else every
                    <name> in ROOT/Annotations/*.xml, sorted (the same list for every split).
  coco:PATTERN      a COCO instances JSON; `{split}` in PATTERN is replaced by the split (e.g.
                    `coco:/coco/annotations/instances_{split}.json`). Images (`file_name`) are relative to
                    `data_dir` when given (`{split}` replaced there too, e.g. `--data_dir=/coco/{split}`),
                    else to the JSON's folder (Roboflow-style exports:
                    `coco:export/{split}/_annotations.coco.json`).
                    Classes: the categories sorted by id, mapped to 0..K-1.
  tfds:NAME         a TFDS detection dataset with `objects/bbox` and `objects/label` (`tfds:voc/2007`, the
                    paper's data); `objects/is_difficult` (or `is_crowd`) marks difficult boxes.

"Difficult" boxes (VOC `<difficult>1`, COCO `iscrowd`) are kept in the examples with their flag: training
leaves them out, mAP neither rewards nor penalises detections of them.

Validation (a one-line ValueError naming the file): malformed XML or JSON; a missing or zero image size; an
unknown class name (when the class list is fixed) or category id; an annotation whose image file is missing;
an image listed in a split without its annotation; xmin ≥ xmax or ymin ≥ ymax; a box extending more than
`BORDER_TOLERANCE` pixels outside the image. Boxes within that tolerance are **clipped** to the image (real
exports overshoot by rounding: COCO's float boxes, labelImg's 0-based VOC indices); farther ones are
**rejected**, since a box well outside its image means the annotation belongs to another image size.
VOC coordinates are 1-based pixel indices: the continuous box is [xmin - 1, xmax] (the devkit's IoU with
its "+1" widths equals plain IoU on these edges).
"""

import dataclasses
import functools
import json
import os
import xml.etree.ElementTree as ET

import numpy as np
import tensorflow as tf

SOURCE_FORMS = "'voc:ROOT', 'coco:ANNOTATIONS_{split}.json' or 'tfds:NAME'"
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
# Folders that get the 20 Pascal VOC classes; VOC0712 is the usual name of VOC 2007 + 2012 merged into one
# folder (their image ids differ) for the "07+12 trainval" training set.
VOC_YEARS = ("VOC2007", "VOC2012", "VOC0712")
VOC_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
BORDER_TOLERANCE = 1.0  # pixels a box may extend past the image and still be clipped rather than rejected


@dataclasses.dataclass(frozen=True)
class DetectionInfo:
    """What a trainer needs to know about one split of a detection source."""

    class_names: tuple
    num_examples: int
    source: str = ""
    split: str = ""

    @property
    def num_classes(self):
        return len(self.class_names)


@dataclasses.dataclass(frozen=True)
class Annotations:
    """One split read into memory: per image its file, declared size and boxes (normalised yxyx)."""

    paths: tuple
    image_hw: np.ndarray  # int32 [num_images, 2]
    boxes: tuple  # of float32 [N_i, 4]
    labels: tuple  # of int32 [N_i]
    difficult: tuple  # of bool [N_i]
    class_names: tuple


def parse_source(source):
    """Splits a detection source string into (kind, argument); ValueError naming the string if unknown."""
    if not isinstance(source, str) or ":" not in source:
        raise ValueError(f"Detection dataset must be one of {SOURCE_FORMS}; got {source!r}.")
    kind, _, argument = source.partition(":")
    if kind not in ("voc", "coco", "tfds") or not argument:
        raise ValueError(f"Detection dataset must be one of {SOURCE_FORMS}; got {source!r}.")
    if kind == "coco" and "{split}" not in argument:
        raise ValueError(
            f"'coco:' needs '{{split}}' in its path so that each split reads its own JSON; got {source!r}."
        )
    return kind, argument


def _resolve(path, data_dir):
    path = os.path.expanduser(path)
    return os.path.join(data_dir, path) if data_dir and not os.path.isabs(path) else path


def _box_to_normalized(x0, y0, x1, y1, width, height, where):
    """Checks a pixel box (continuous edges) against its image; clips within the tolerance; yxyx in [0, 1]."""
    if not (x0 < x1 and y0 < y1):
        raise ValueError(f"{where}: box needs xmin < xmax and ymin < ymax; got x {x0}..{x1}, y {y0}..{y1}.")
    t = BORDER_TOLERANCE
    if x0 < -t or y0 < -t or x1 > width + t or y1 > height + t:
        raise ValueError(
            f"{where}: box x {x0}..{x1}, y {y0}..{y1} lies outside the {width}x{height} image "
            f"(more than {t:g} px; boxes are rejected, not clipped, that far out)."
        )
    x0, x1 = max(x0, 0.0), min(x1, float(width))
    y0, y1 = max(y0, 0.0), min(y1, float(height))
    return [y0 / height, x0 / width, y1 / height, x1 / width]


# ------------------------------------------------------------------------------------------------- VOC


def _xml_text(element, path, tag, convert=str):
    node = element.find(tag)
    if node is None or node.text is None or not node.text.strip():
        raise ValueError(f"Annotation {path}: missing <{tag}>.")
    try:
        return convert(node.text.strip())
    except ValueError:
        raise ValueError(f"Annotation {path}: <{tag}> is not a number: {node.text.strip()!r}.") from None


def read_voc_xml(path):
    """(width, height, [(name, difficult, x0, y0, x1, y1)]) of one VOC XML; pixel edges as VOC writes them."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"Malformed XML in annotation {path}: {e}.") from None
    except OSError as e:
        raise ValueError(f"Cannot read annotation {path}: {e.strerror}.") from None
    width = _xml_text(root, path, "size/width", lambda s: int(float(s)))
    height = _xml_text(root, path, "size/height", lambda s: int(float(s)))
    if width < 1 or height < 1:
        raise ValueError(f"Annotation {path}: image size {width}x{height} must be positive.")
    objects = []
    for obj in root.iter("object"):
        name = _xml_text(obj, path, "name")
        difficult_node = obj.find("difficult")
        difficult = difficult_node is not None and (difficult_node.text or "0").strip() == "1"
        coords = [_xml_text(obj, path, f"bndbox/{k}", float) for k in ("xmin", "ymin", "xmax", "ymax")]
        objects.append((name, difficult, *coords))
    return width, height, objects


def voc_class_names(root):
    """The class list of a VOC root (see the module docstring for the order of precedence)."""
    if os.path.basename(os.path.normpath(root)) in VOC_YEARS:
        return VOC_CLASSES
    listed = os.path.join(root, "classes.txt")
    if os.path.exists(listed):
        with open(listed, encoding="utf-8") as f:
            return tuple(line.strip() for line in f if line.strip())
    annotations = os.path.join(root, "Annotations")
    names = set()
    for file in sorted(os.listdir(annotations)):
        if file.endswith(".xml"):
            names.update(obj[0] for obj in read_voc_xml(os.path.join(annotations, file))[2])
    if not names:
        raise ValueError(f"No <object><name> in {annotations}/*.xml: cannot infer the class names.")
    return tuple(sorted(names))


def _voc_image(root, image_id):
    for ext in VOC_IMAGE_EXTENSIONS:
        path = os.path.join(root, "JPEGImages", image_id + ext)
        if os.path.exists(path):
            return path
    return None


@functools.lru_cache(maxsize=8)
def read_voc(root, split):
    """`Annotations` of ROOT/ImageSets/Main/SPLIT.txt."""
    for sub in ("JPEGImages", "Annotations"):
        if not os.path.isdir(os.path.join(root, sub)):
            raise FileNotFoundError(f"VOC root {root!r} has no {sub}/ folder (expected VOCdevkit's layout).")
    split_file = os.path.join(root, "ImageSets", "Main", f"{split}.txt")
    if not os.path.exists(split_file):
        raise FileNotFoundError(f"VOC split file {split_file} does not exist (split {split!r}).")
    with open(split_file, encoding="utf-8") as f:
        ids = [line.split()[0] for line in f if line.strip()]
    class_names = voc_class_names(root)
    index = {name: i for i, name in enumerate(class_names)}
    paths, sizes, boxes, labels, difficult = [], [], [], [], []
    for image_id in ids:
        xml_path = os.path.join(root, "Annotations", f"{image_id}.xml")
        if not os.path.exists(xml_path):
            raise ValueError(f"Image {image_id!r} of {split_file} has no annotation {xml_path}.")
        image_path = _voc_image(root, image_id)
        if image_path is None:
            raise ValueError(f"Annotation {xml_path} has no image JPEGImages/{image_id}.jpg.")
        width, height, objects = read_voc_xml(xml_path)
        image_boxes, image_labels, image_difficult = [], [], []
        for k, (name, hard, xmin, ymin, xmax, ymax) in enumerate(objects):
            if name not in index:
                raise ValueError(
                    f"Annotation {xml_path}: unknown class name {name!r} (classes: {', '.join(class_names)})."
                )
            where = f"Annotation {xml_path}, object {k} ({name})"
            # In VOC's inclusive 1-based indices xmin == xmax is one pixel wide; we still reject it, as the
            # issue asks: such boxes are annotation slips far more often than 1-pixel objects.
            if not (xmin < xmax and ymin < ymax):
                raise ValueError(f"{where}: box needs xmin < xmax and ymin < ymax; got x {xmin:g}..{xmax:g}, "
                                 f"y {ymin:g}..{ymax:g}.")
            image_boxes.append(_box_to_normalized(xmin - 1, ymin - 1, xmax, ymax, width, height, where))
            image_labels.append(index[name])
            image_difficult.append(hard)
        paths.append(image_path)
        sizes.append((height, width))
        boxes.append(np.array(image_boxes, np.float32).reshape(-1, 4))
        labels.append(np.array(image_labels, np.int32))
        difficult.append(np.array(image_difficult, bool))
    return Annotations(tuple(paths), np.array(sizes, np.int32).reshape(-1, 2), tuple(boxes), tuple(labels),
                       tuple(difficult), class_names)


# ------------------------------------------------------------------------------------------------ COCO


def coco_paths(pattern, split, data_dir):
    """(annotation JSON path, image directory) of a `coco:` pattern for one split."""
    ann = os.path.expanduser(pattern.replace("{split}", split))
    image_dir = data_dir.replace("{split}", split) if data_dir else os.path.dirname(os.path.abspath(ann))
    return ann, image_dir


@functools.lru_cache(maxsize=8)
def read_coco(ann_path, image_dir):
    """`Annotations` of a COCO instances JSON; images without annotations are kept (zero boxes)."""
    try:
        with open(ann_path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"COCO annotation file {ann_path} does not exist.") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"Malformed JSON in {ann_path}: {e}.") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"COCO file {ann_path} has no '{key}' list.")
    categories = sorted(data["categories"], key=lambda c: c["id"])
    class_names = tuple(c["name"] for c in categories)
    index = {c["id"]: i for i, c in enumerate(categories)}
    images = {}
    for image in data["images"]:
        path = os.path.join(image_dir, image["file_name"])
        if not os.path.exists(path):
            raise ValueError(f"COCO file {ann_path}: image {image['file_name']!r} not found in {image_dir}.")
        if not (image.get("width", 0) > 0 and image.get("height", 0) > 0):
            raise ValueError(f"COCO file {ann_path}: image {image['file_name']!r} lacks a positive size.")
        images[image["id"]] = (path, image["height"], image["width"], [])
    for ann in data["annotations"]:
        where = f"COCO file {ann_path}, annotation id {ann.get('id')}"
        if ann.get("image_id") not in images:
            raise ValueError(f"{where}: image_id {ann.get('image_id')!r} is not in 'images'.")
        if ann.get("category_id") not in index:
            raise ValueError(f"{where}: unknown category_id {ann.get('category_id')!r}.")
        path, height, width, objects = images[ann["image_id"]]
        x, y, w, h = (float(v) for v in ann["bbox"])
        box = _box_to_normalized(x, y, x + w, y + h, width, height, where)
        objects.append((box, index[ann["category_id"]], bool(ann.get("iscrowd", 0))))
    ordered = [images[i] for i in sorted(images)]
    return Annotations(
        paths=tuple(p for p, *_ in ordered),
        image_hw=np.array([(h, w) for _, h, w, _ in ordered], np.int32).reshape(-1, 2),
        boxes=tuple(np.array([o[0] for o in objs], np.float32).reshape(-1, 4) for *_, objs in ordered),
        labels=tuple(np.array([o[1] for o in objs], np.int32) for *_, objs in ordered),
        difficult=tuple(np.array([o[2] for o in objs], bool) for *_, objs in ordered),
        class_names=class_names,
    )


# ------------------------------------------------------------------------------------------------ TFDS


def _tfds_builder(name, data_dir):
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"Unknown TFDS dataset in 'tfds:{name}': {str(e).splitlines()[0]}") from None
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared in {builder.data_dir!r}; run `tfds build {name}`."
        )
    objects = builder.info.features["objects"] if "objects" in builder.info.features else None
    if objects is None or "bbox" not in objects or "label" not in objects:
        raise ValueError(f"TFDS dataset {name!r} is not detection (needs objects/bbox and objects/label).")
    return builder


def _tfds_split(builder, name, split):
    try:
        return builder.info.splits[split]
    except (KeyError, ValueError):
        splits = sorted(builder.info.splits)
        raise ValueError(f"TFDS dataset {name!r} has no split {split!r}; it has {splits}.") from None


def _tfds_examples(name, split, data_dir, input_context, shuffle, seed):
    import tensorflow_datasets as tfds

    builder = _tfds_builder(name, data_dir)
    _tfds_split(builder, name, split)
    objects = builder.info.features["objects"]
    hard_key = next((k for k in ("is_difficult", "is_crowd") if k in objects), None)
    ds = builder.as_dataset(
        split=split,
        decoders={"image": tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(add_tfds_id=True, input_context=input_context, shuffle_seed=seed),
        shuffle_files=shuffle,
    )

    def convert(ex):
        labels = tf.cast(ex["objects"]["label"], tf.int32)
        hard = tf.cast(ex["objects"][hard_key], tf.bool) if hard_key else tf.zeros_like(labels, tf.bool)
        return {
            "encoded": ex["image"],
            "boxes": tf.reshape(tf.cast(ex["objects"]["bbox"], tf.float32), [-1, 4]),  # yxyx in [0, 1]
            "labels": labels,
            "difficult": hard,
            "image_hw": tf.zeros([2], tf.int32),
            "key": ex["tfds_id"],
        }

    return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


# --------------------------------------------------------------------------------------------- entry points


def _file_annotations(kind, argument, split, data_dir):
    """The split's `Annotations`; `A+B` concatenates splits A and B (as TFDS's split strings do), e.g.
    `trainval+test`. They must share the class list (one VOC root does; COCO files may not)."""
    parts = [part.strip() for part in split.split("+")]
    if not all(parts):
        raise ValueError(f"Split {split!r} has an empty part (expected SPLIT or SPLIT+SPLIT+...).")
    if kind == "voc":
        root = os.path.abspath(_resolve(argument, data_dir))
        read = [read_voc(root, part) for part in parts]
    else:
        read = [read_coco(*coco_paths(argument, part, data_dir)) for part in parts]
    if len(read) == 1:
        return read[0]
    if any(a.class_names != read[0].class_names for a in read):
        raise ValueError(f"Splits of {split!r} list different classes; they cannot be concatenated.")
    return Annotations(
        paths=sum((a.paths for a in read), ()),
        image_hw=np.concatenate([a.image_hw for a in read]),
        boxes=sum((a.boxes for a in read), ()),
        labels=sum((a.labels for a in read), ()),
        difficult=sum((a.difficult for a in read), ()),
        class_names=read[0].class_names,
    )


def detection_info(source, *, split, data_dir=None):
    """Class names and number of images of one split; reads (and validates) every annotation of it."""
    kind, argument = parse_source(source)
    if kind == "tfds":
        builder = _tfds_builder(argument, data_dir)
        names = tuple(builder.info.features["objects"]["label"].names)
        count = _tfds_split(builder, argument, split).num_examples
    else:
        annotations = _file_annotations(kind, argument, split, data_dir)
        names, count = annotations.class_names, len(annotations.paths)
    if count == 0:
        raise ValueError(f"Detection dataset {source!r} split {split!r} is empty (0 images).")
    return DetectionInfo(names, count, source, split)


def load_examples(source, *, split, data_dir=None, input_context=None, shuffle=False, seed=None):
    """A `tf.data.Dataset` of examples (see the module docstring), sharded and optionally shuffled."""
    kind, argument = parse_source(source)
    if kind == "tfds":
        ds = _tfds_examples(argument, split, data_dir, input_context, shuffle, seed)
        return ds.shuffle(1000, seed=seed, reshuffle_each_iteration=True) if shuffle else ds
    a = _file_annotations(kind, argument, split, data_dir)
    counts = [len(b) for b in a.labels]
    ragged = lambda parts, dtype, shape: tf.RaggedTensor.from_row_lengths(
        tf.constant(np.concatenate(parts).reshape(shape), dtype), counts
    )
    ds = tf.data.Dataset.from_tensor_slices({
        "path": list(a.paths),
        "boxes": ragged(a.boxes, tf.float32, [-1, 4]),
        "labels": ragged(a.labels, tf.int32, [-1]),
        "difficult": ragged(a.difficult, tf.bool, [-1]),
        "image_hw": a.image_hw,
    })
    if input_context is not None and input_context.num_input_pipelines > 1:
        ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    if shuffle:
        ds = ds.shuffle(len(a.paths), seed=seed, reshuffle_each_iteration=True)

    def read(example):
        example = dict(example)
        example["key"] = example.pop("path")
        example["encoded"] = tf.io.read_file(example["key"])
        return example

    return ds.map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
