"""Segmentation sources and batches: seg_folder, VOC palette masks, ADE20K's mapping, one-line errors."""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from bot_keras.data import decode
from bot_keras.data.augment import MEAN_RGB, STD_RGB
from bot_keras.segmentation import data

PALETTE = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]], np.uint8)


def pair(seed, height=40, width=56):
    """A mask with classes 0..2 and a 255 strip, and a PNG-exact image whose colour is PALETTE[class]."""
    rng = np.random.default_rng(seed)
    mask = rng.integers(0, 3, size=(height // 8, width // 8)).repeat(8, 0).repeat(8, 1).astype(np.uint8)
    mask[:, -3:] = 255
    image = np.where((mask == 255)[..., None], 0, PALETTE[np.minimum(mask, 2)]).astype(np.uint8)
    return image, mask


def write_seg_folder(root, n=3, split="train"):
    (root / split / "images").mkdir(parents=True)
    (root / split / "masks").mkdir(parents=True)
    (root / "classes.txt").write_text("red\ngreen\nblue\n")
    masks = {}
    for i in range(n):
        image, mask = pair(i)
        Image.fromarray(image).save(root / split / "images" / f"im{i}.png")
        Image.fromarray(mask).save(root / split / "masks" / f"im{i}.png")
        masks[f"im{i}"] = mask
    return masks


def test_seg_folder_eval_batches_are_the_files(tmp_path):
    masks = write_seg_folder(tmp_path)
    info = data.dataset_info(f"seg_folder:{tmp_path}", split="train")
    assert (info.num_classes, info.class_names, info.num_examples) == (3, ("red", "green", "blue"), 3)
    ds = data.make_segmentation_dataset("seg_folder:" + tmp_path.name, data_dir=str(tmp_path.parent),
                                        split="train", crop_size=64, global_batch_size=2, training=False)
    batches = list(ds)
    assert [b[0].shape[0] for b in batches] == [2, 1]  # one pass, the last batch kept
    images = np.concatenate([b[0] for b in batches])
    got = np.concatenate([b[1] for b in batches])
    assert images.dtype == np.float32 and got.dtype == np.int32 and got.shape == (3, 64, 64)
    for k, name in enumerate(sorted(masks)):
        np.testing.assert_array_equal(got[k, :40, :56], masks[name])
        assert (got[k, 40:] == 255).all() and (got[k, :, 56:] == 255).all()
        # Normalised as the classifier does: (x - mean) / std, and 0 in the padding.
        expected = (pair(k)[0] - np.array(MEAN_RGB)) / np.array(STD_RGB)
        np.testing.assert_allclose(images[k, :40, :56], expected, atol=1e-5)
        assert not images[k, 40:].any()


def test_seg_folder_training_batches_keep_colour_and_class_together(tmp_path):
    write_seg_folder(tmp_path)
    ds = data.make_segmentation_dataset(f"seg_folder:{tmp_path}", split="train", crop_size=32,
                                        global_batch_size=4, training=True, seed=1)
    images, masks = next(iter(ds))
    assert images.shape == (4, 32, 32, 3) and masks.shape == (4, 32, 32)
    colours = np.asarray(images) * np.array(STD_RGB) + np.array(MEAN_RGB)
    masks = np.asarray(masks)
    labelled = masks != 255
    assert labelled.mean() > 0.2
    nearest = np.argmin(((colours[labelled][:, None] - PALETTE[None]) ** 2).sum(-1), axis=1)
    assert (nearest == masks[labelled]).mean() > 0.95


def test_voc_palette_masks_are_read_as_indices(tmp_path):
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (tmp_path / d).mkdir(parents=True)
    mask = np.array([[0, 1, 15, 20], [255, 7, 7, 0]], np.uint8).repeat(4, 0).repeat(4, 1)
    palette_png = Image.fromarray(mask, mode="P")
    palette_png.putpalette(data.voc_colormap().reshape(-1).tolist())
    palette_png.save(tmp_path / "SegmentationClass" / "2007_000001.png")
    Image.fromarray(np.full((8, 16, 3), 90, np.uint8)).save(tmp_path / "JPEGImages" / "2007_000001.jpg")
    (tmp_path / "ImageSets/Segmentation/val.txt").write_text("2007_000001\n")
    # TensorFlow alone would give RGB (or its luminance); the palette index is the class.
    assert data.voc_colormap()[[1, 15, 255]].tolist() == [[128, 0, 0], [192, 128, 128], [224, 224, 192]]
    ds = data.make_segmentation_dataset(f"voc:{tmp_path}", split="val", crop_size=16, global_batch_size=1,
                                        training=False)
    got = np.asarray(next(iter(ds))[1][0])
    np.testing.assert_array_equal(got[:8], mask)
    assert data.dataset_info(f"voc:{tmp_path}", split="val").num_classes == 21


def test_ade20k_unlabelled_becomes_ignore_and_ids_shift_down():
    annotation = tf.constant([[[0, 0, 0], [1, 1, 1]], [[150, 150, 150], [37, 37, 37]]], tf.uint8)
    np.testing.assert_array_equal(data.ade20k_mask(annotation), [[255, 0], [149, 36]])


def first_batch(tmp_path):
    ds = data.make_segmentation_dataset(f"seg_folder:{tmp_path}", split="train", crop_size=64,
                                        global_batch_size=3, training=False)
    return next(iter(ds))


def test_missing_mask_is_named(tmp_path):
    write_seg_folder(tmp_path)
    (tmp_path / "train/masks/im1.png").unlink()
    with pytest.raises(FileNotFoundError, match="missing mask .*im1.png for image .*im1.png"):
        first_batch(tmp_path)


@pytest.mark.parametrize("damage, message", [
    ("size", r"mask .*im2.png is 8x8 but its image .*im2.png is 40x56"),
    ("class", r"mask .*im2.png holds class id 3 >= num_classes \(3\) and not 255"),
    ("unreadable", r"unreadable image file .*im2.png"),
    ("rgb_palette", r"mask colour outside the VOC palette in .*im2.png"),
])
def test_bad_pairs_are_named(tmp_path, damage, message):
    write_seg_folder(tmp_path)
    image_path, mask_path = tmp_path / "train/images/im2.png", tmp_path / "train/masks/im2.png"
    if damage == "size":
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(mask_path)
    elif damage == "class":
        mask = pair(2)[1]
        mask[0, 0] = 3
        Image.fromarray(mask).save(mask_path)
    elif damage == "unreadable":
        image_path.write_bytes(b"not an image at all, just text")
    else:
        odd = Image.fromarray(np.zeros((40, 56), np.uint8), mode="P")
        odd.putpalette([1, 2, 3] * 256)
        odd.save(mask_path)
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        first_batch(tmp_path)


def test_bad_source_strings():
    with pytest.raises(ValueError, match="'folder:x'.*seg_folder:ROOT"):
        data.parse_source("folder:x")
    with pytest.raises(ValueError, match="scene_parse150.*'tfds:voc'"):
        data.parse_source("tfds:voc")


def test_largest_image_is_read_from_the_headers_and_leaves_out_images_over_the_pixel_limit(tmp_path):
    write_seg_folder(tmp_path, n=2, split="val")  # im0, im1: 40×56
    image, mask = pair(5, height=72, width=48)
    Image.fromarray(image).save(tmp_path / "val" / "images" / "tall.jpg", quality=95)
    Image.fromarray(mask).save(tmp_path / "val" / "masks" / "tall.png")
    # A decompression bomb's header: a 1×1 PNG whose IHDR declares 20000×20000 (the pipeline refuses it).
    bomb = bytearray((tmp_path / "val" / "masks" / "im0.png").read_bytes())
    bomb[16:24] = (20000).to_bytes(4, "big") * 2
    (tmp_path / "val" / "images" / "bomb.png").write_bytes(bytes(bomb))
    (tmp_path / "val" / "masks" / "bomb.png").write_bytes(bytes(bomb))
    source = f"seg_folder:{tmp_path}"
    tall = str(tmp_path / "val" / "images" / "tall.jpg")
    assert data.largest_image(source, "val") == (tall, 72, 48)
    assert data.largest_image(source, "val", max_image_pixels=10**9)[1:] == (20000, 20000)
    # A JPEG's frame header past the first bytes read: the whole file is read for it.
    assert decode.file_image_shapes([tall], header_bytes=32).tolist() == [[72, 48]]
