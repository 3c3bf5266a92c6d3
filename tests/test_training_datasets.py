"""Dataset layouts read from S3 (moto), label decoding, augmentation and the up-front input checks."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet
import pytest
from PIL import Image
from synthetic_data import (
    CLASS_NAMES,
    COCO_TRAIN_IDS,
    encode_png,
    make_scene,
    write_ade20k,
    write_cocostuff,
    write_manifest,
)

from pipelines import storage
from pipelines.pairs import IGNORE_INDEX, SegmentationDataset, manifest_dataset, read_class_names
from pipelines.training.augment import augment
from pipelines.training.datasets import MismatchedPairError, decode_training_label, load_training_batch, read_example
from pipelines.training.sources import (
    ADE20K_CLASSES,
    COCO_STUFF_CLASSES,
    ade20k_dataset,
    check_dataset_label_ids,
    check_files_exist,
    cocostuff_dataset,
    holdout_split,
    load_dataset,
)


def _scene_label(split_seed: int, index: int) -> np.ndarray:
    """The label of scene ``index`` as synthetic_data._scenes generated it."""
    rng = np.random.default_rng(split_seed)
    for i in range(index + 1):
        _, label = make_scene(rng, int(rng.integers(100, 140)), int(rng.integers(120, 170)))
        if i == index:
            return label
    raise AssertionError


def test_class_lists_match_the_reference():
    assert len(COCO_STUFF_CLASSES) == 171 and len(set(COCO_STUFF_CLASSES)) == 171
    assert COCO_STUFF_CLASSES[80] == "banner" and COCO_STUFF_CLASSES[-1] == "wood"
    assert len(ADE20K_CLASSES) == 150 and ADE20K_CLASSES[0] == "wall" and ADE20K_CLASSES[-1] == "flag"


def test_coco_stuff_raw_ids_map_to_171_train_ids():
    raw = np.array([[0, 11, 12, 89], [90, 91, 181, 255]], dtype=np.uint8)
    decoded = decode_training_label(encode_png(raw), "coco_stuff_raw")
    # 11 and 90 are unused COCO ids -> ignore; 12 (stop sign) is train id 11; 91 (banner) 80; 181 (wood) 170
    np.testing.assert_array_equal(decoded, [[0, 255, 11, 79], [255, 80, 170, 255]])


def test_ade20k_labels_shift_down_and_zero_becomes_ignore():
    raw = np.array([[0, 1, 150]], dtype=np.uint8)
    np.testing.assert_array_equal(decode_training_label(encode_png(raw), "ade20k_raw"), [[255, 0, 149]])


def test_cocostuff_layout_is_read_from_s3(s3_bucket):
    root = f"s3://{s3_bucket}/coco-stuff"
    write_cocostuff(root, {"train2017": 4, "val2017": 2})
    dataset = cocostuff_dataset(root, "train2017")
    assert len(dataset) == 4 and dataset.class_names == COCO_STUFF_CLASSES
    image_uri, label_uri = dataset.pairs[0]
    assert image_uri == f"{root}/images/train2017/000000000001.jpg"
    assert label_uri == f"{root}/annotations/train2017/000000000001.png"
    label = decode_training_label(storage.read_bytes(label_uri), dataset.label_encoding)
    expected = np.vectorize(lambda v: COCO_TRAIN_IDS.get(int(v), IGNORE_INDEX))(_scene_label(0, 0))
    np.testing.assert_array_equal(label, expected)
    check_dataset_label_ids(dataset)
    assert len(load_dataset("cocostuff", root, "val2017")) == 2


def test_cocostuff_prefers_converted_labels(s3_bucket):
    root = f"s3://{s3_bucket}/coco-stuff"
    write_cocostuff(root, {"train2017": 2})
    for index in (1, 2):  # what prepare_coco_stuff.py writes: train ids already
        storage.write_bytes(
            f"{root}/annotations_detectron2/train2017/{index:012d}.png", encode_png(np.zeros((8, 8), np.uint8))
        )
    dataset = cocostuff_dataset(root, "train2017")
    assert dataset.label_encoding == "class_ids"
    assert dataset.pairs[1][1] == f"{root}/annotations_detectron2/train2017/000000000002.png"


def test_ade20k_layout_is_read_from_s3(s3_bucket):
    root = f"s3://{s3_bucket}/data"
    write_ade20k(root, {"training": 3, "validation": 2})
    dataset = ade20k_dataset(root, "training")  # the parent of ADEChallengeData2016 works too
    assert len(dataset) == 3 and dataset.class_names == ADE20K_CLASSES
    assert dataset.pairs[0][0].endswith("ADEChallengeData2016/images/training/ADE_train_00000001.jpg")
    label = decode_training_label(storage.read_bytes(dataset.pairs[0][1]), dataset.label_encoding)
    np.testing.assert_array_equal(label, _scene_label(0, 0))  # class k stored as k + 1, border 0 -> 255
    assert len(ade20k_dataset(f"{root}/ADEChallengeData2016", "validation")) == 2


def test_manifest_layout_is_read_from_s3_as_parquet_and_csv(s3_bucket):
    # a loop, not parametrize: the s3_bucket fixture builds bucket names from the test name, and "[...]" is invalid
    for fmt in ("parquet", "csv"):
        root = f"s3://{s3_bucket}/{fmt}"
        manifest, classes = write_manifest(root, {"train": 5, "val": 2}, fmt=fmt)
        everything = manifest_dataset(manifest, classes)
        train = manifest_dataset(manifest, classes, "train")
        val = load_dataset("manifest", manifest, "validation", classes)
        assert (len(everything), len(train), len(val)) == (7, 5, 2)
        assert train.class_names == CLASS_NAMES
        label = decode_training_label(storage.read_bytes(val.pairs[1][1]))
        np.testing.assert_array_equal(label, _scene_label(1, 1))
        check_files_exist(everything)
        check_dataset_label_ids(everything)


def test_manifest_relative_uris_resolve_against_its_folder(s3_bucket):
    root = f"s3://{s3_bucket}/relative"
    manifest, classes = write_manifest(root, {"train": 2}, relative=True)
    dataset = manifest_dataset(manifest, classes)
    assert dataset.pairs[0] == (f"{root}/files/train_0.jpg", f"{root}/files/train_0_label.png")
    check_files_exist(dataset)


def test_training_batch_is_augmented_to_fixed_crops(s3_bucket):
    root = f"s3://{s3_bucket}/custom"
    manifest, classes = write_manifest(root, {"train": 3})
    dataset = manifest_dataset(manifest, classes)
    batch = {
        "image_uri": np.array([image for image, _ in dataset.pairs]),
        "label_uri": np.array([label for _, label in dataset.pairs]),
    }
    out = load_training_batch(batch, crop_size=64, label_encoding="class_ids", num_classes=3)
    assert out["image"].shape == (3, 64, 64, 3) and out["image"].dtype == np.uint8
    assert out["label"].shape == (3, 64, 64) and set(np.unique(out["label"])) <= {0, 1, 2, 255}


def test_corrupt_image_is_skipped_in_training_batches(s3_bucket):
    root = f"s3://{s3_bucket}/custom"
    manifest, classes = write_manifest(root, {"train": 2})
    dataset = manifest_dataset(manifest, classes)
    storage.write_bytes(dataset.pairs[0][0], b"not a jpeg")
    batch = {"image_uri": np.array([p[0] for p in dataset.pairs]), "label_uri": np.array([p[1] for p in dataset.pairs])}
    out = load_training_batch(batch, crop_size=32, label_encoding="class_ids", num_classes=3)
    assert out["image"].shape == (1, 32, 32, 3)


def test_exif_rotated_photo_decodes_as_displayed_and_lines_up_with_its_label(s3_bucket):
    root = f"s3://{s3_bucket}/exif"
    image, label = make_scene(np.random.default_rng(5), 90, 140)  # as displayed: 140 wide, 90 high
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated a quarter turn; a viewer turns it back clockwise
    stored = io.BytesIO()
    Image.fromarray(np.rot90(image)).save(stored, format="JPEG", quality=95, exif=exif)
    storage.write_bytes(f"{root}/photo.jpg", stored.getvalue())
    storage.write_bytes(f"{root}/photo.png", encode_png(label))
    decoded, decoded_label = read_example(f"{root}/photo.jpg", f"{root}/photo.png", "class_ids", 3)
    assert decoded.shape == (90, 140, 3) and decoded_label.shape == (90, 140)
    for class_id in range(3):  # each class keeps its colour's dominant channel: the pixels line up
        assert decoded[decoded_label == class_id].astype(float).mean(0).argmax() == class_id


def test_image_and_label_of_different_sizes_are_skipped_with_the_reason(s3_bucket, caplog):
    root = f"s3://{s3_bucket}/mismatch"
    manifest, classes = write_manifest(root, {"train": 2})
    dataset = manifest_dataset(manifest, classes)
    storage.write_bytes(dataset.pairs[0][1], encode_png(np.zeros((20, 30), np.uint8)))
    with pytest.raises(MismatchedPairError, match="a label must cover the image as displayed"):
        read_example(*dataset.pairs[0], "class_ids", 3)
    batch = {"image_uri": np.array([p[0] for p in dataset.pairs]), "label_uri": np.array([p[1] for p in dataset.pairs])}
    out = load_training_batch(batch, crop_size=32, label_encoding="class_ids", num_classes=3)
    assert out["image"].shape == (1, 32, 32, 3)  # the neighbour is kept
    assert "its label" in caplog.text and dataset.pairs[0][0] in caplog.text


def test_augment_keeps_image_and_label_aligned():
    rng = np.random.default_rng(3)
    image, label = make_scene(rng, 90, 200)
    for _ in range(10):
        crop_image, crop_label = augment(image, label, 64, rng)
        assert crop_image.shape == (64, 64, 3) and crop_label.shape == (64, 64)
        # colour jitter moves colours, but each class keeps its dominant channel (red, green, blue)
        for class_id in range(3):
            pixels = crop_image[crop_label == class_id].astype(float)
            if len(pixels) > 50:
                assert pixels.mean(0).argmax() == class_id


def test_holdout_split_is_stable_and_disjoint():
    dataset = SegmentationDataset("manifest", [(f"s3://b/{i}.jpg", f"s3://b/{i}.png") for i in range(200)], CLASS_NAMES)
    train, val = holdout_split(dataset, 0.1)
    _, val_again = holdout_split(dataset, 0.1)
    assert val.pairs == val_again.pairs and 5 <= len(val) <= 40
    assert not set(train.pairs) & set(val.pairs) and len(train) + len(val) == 200


# -- bad input is refused with a message that says what is wrong --------------------------------------------------


def test_unknown_layout_is_refused():
    with pytest.raises(ValueError, match=r"unknown dataset layout 'voc'.*cocostuff"):
        load_dataset("voc", "s3://bucket/x", "train")


def test_images_without_labels_are_refused(s3_bucket):
    root = f"s3://{s3_bucket}/coco-stuff"
    write_cocostuff(root, {"train2017": 3})
    storage.filesystem(root)[0].rm(f"{s3_bucket}/coco-stuff/annotations/train2017/000000000002.png")
    with pytest.raises(FileNotFoundError, match=r"1 of 3 images .* have no label PNG.*000000000002.jpg"):
        cocostuff_dataset(root, "train2017")


def test_missing_label_folder_is_refused(s3_bucket):
    root = f"s3://{s3_bucket}/data"
    write_ade20k(root, {"training": 1})
    with pytest.raises(FileNotFoundError, match="no images for split 'validation'"):
        ade20k_dataset(root, "validation")


def test_manifest_rows_pointing_nowhere_are_refused(s3_bucket):
    root = f"s3://{s3_bucket}/custom"
    manifest, classes = write_manifest(root, {"train": 3})
    dataset = manifest_dataset(manifest, classes)
    storage.filesystem(root)[0].rm(dataset.pairs[2][1].removeprefix("s3://"))
    with pytest.raises(FileNotFoundError, match=r"1 image/label file\(s\).*train_2_label.png"):
        check_files_exist(dataset)


def test_class_names_that_do_not_cover_label_ids_are_refused(s3_bucket):
    root = f"s3://{s3_bucket}/custom"
    manifest, _ = write_manifest(root, {"train": 3})
    two_names = f"{root}/two.txt"
    storage.write_text(two_names, "red square\ngreen disc\n")
    dataset = manifest_dataset(manifest, two_names)
    with pytest.raises(ValueError, match=r"class id\(s\) \[2\] but the class list has 2 names"):
        check_dataset_label_ids(dataset)


def test_bad_class_files_are_refused(s3_bucket):
    root = f"s3://{s3_bucket}/classes"
    storage.write_text(f"{root}/blank.txt", "cat\n\ndog\n")
    storage.write_text(f"{root}/dup.txt", "cat\nCat\n")
    with pytest.raises(ValueError, match="line 2 is empty"):
        read_class_names(f"{root}/blank.txt")
    with pytest.raises(ValueError, match="duplicate class name"):
        read_class_names(f"{root}/dup.txt")
    with pytest.raises(FileNotFoundError, match="class-names file not found"):
        read_class_names(f"{root}/absent.txt")


def test_manifest_without_required_columns_is_refused(s3_bucket):
    buffer = io.BytesIO()
    pyarrow.parquet.write_table(pa.table({"path": ["a.jpg"]}), buffer)
    uri = f"s3://{s3_bucket}/bad.parquet"
    storage.write_bytes(uri, buffer.getvalue())
    storage.write_text(f"s3://{s3_bucket}/classes.txt", "cat\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['image_uri', 'label_uri'\]; it has \['path'\]"):
        manifest_dataset(uri, f"s3://{s3_bucket}/classes.txt")


def test_rgb_label_png_is_refused():
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG")
    with pytest.raises(ValueError, match="single-channel"):
        decode_training_label(buffer.getvalue())
