"""Every benchmark layout on a miniature copy of its folders and label encoding (local files and moto S3)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import storage
from pipelines.evaluation.sets import BENCHMARK_LIMIT, LAYOUTS, builtin_class_names, load_benchmark, read_pair
from pipelines.images import IGNORE_ID, LabelIdError, check_label_ids, decode_label

SIZE = (24, 32)  # H x W of every miniature image


def jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (*SIZE, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def encoded_label(values: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format=fmt)
    return buffer.getvalue()


def stored_label(values: list[int], dtype: type) -> np.ndarray:
    """A label of SIZE whose rows cycle through ``values`` (as the file stores them)."""
    rows = np.resize(np.array(values, dtype=dtype), SIZE[0])
    return np.repeat(rows[:, None], SIZE[1], axis=1).astype(dtype)


def write_layout(root: str, image_dir: str, label_dir: str, labels: dict[str, np.ndarray], fmt: str) -> None:
    suffix = ".tif" if fmt == "TIFF" else ".png"
    for i, (stem, label) in enumerate(labels.items()):
        storage.write_bytes(storage.join(root, image_dir, stem + ".jpg"), jpeg(i))
        storage.write_bytes(storage.join(root, label_dir, stem + suffix), encoded_label(label, fmt))


def decoded(evaluation_set, index: int = 0) -> np.ndarray:
    image_uri, label_uri = evaluation_set.pairs[index]
    image, label = read_pair(image_uri, label_uri, evaluation_set.label_encoding, evaluation_set.num_classes)
    assert image.shape == (*SIZE, 3)
    return label


def row_values(label: np.ndarray) -> list[int]:
    return list(dict.fromkeys(label[:, 0].tolist()))


# -- one test per layout --------------------------------------------------------------------------------------


def test_ade150_converted_labels(tmp_path):
    root = str(tmp_path / "ADEChallengeData2016")
    labels = {"ADE_val_00000001": stored_label([0, 149, 255], np.uint8)}
    write_layout(root, "images/validation", "annotations_detectron2/validation", labels, "PNG")
    evaluation_set = load_benchmark("ade150", str(tmp_path))
    assert evaluation_set.root == root and evaluation_set.num_classes == 150
    assert row_values(decoded(evaluation_set)) == [0, 149, IGNORE_ID]


def test_ade150_raw_annotations_are_shifted_and_zero_is_ignored(tmp_path):
    root = str(tmp_path / "ADEChallengeData2016")
    labels = {f"ADE_val_0000000{i}": stored_label([0, 1, 150], np.uint8) for i in (1, 2)}
    write_layout(root, "images/validation", "annotations/validation", labels, "PNG")
    # also a training split, which must not be picked up
    storage.write_bytes(storage.join(root, "images/training/ADE_train_1.jpg"), jpeg(9))
    evaluation_set = load_benchmark("ade150", root)
    assert len(evaluation_set) == 2
    assert row_values(decoded(evaluation_set)) == [IGNORE_ID, 0, 149]


def test_ade847_uint16_tiff_from_s3(s3_bucket):
    data = f"s3://{s3_bucket}/datasets"
    root = storage.join(data, "ADE20K_2021_17_01")
    labels = {
        "ADE_frame_00000001": stored_label([0, 846, 65535], np.uint16),
        "ADE_frame_00000002": stored_label([300, 65535], np.uint16),
        "ADE_frame_00000003": stored_label([5], np.uint16),
    }
    write_layout(root, "images_detectron2/validation", "annotations_detectron2/validation", labels, "TIFF")
    evaluation_set = load_benchmark("ade847", data)
    assert evaluation_set.num_classes == 847 and evaluation_set.vocabulary[1] == "building, edifice"
    assert [p[0].rsplit("/", 1)[1] for p in evaluation_set.pairs] == [f"{s}.jpg" for s in labels]
    assert row_values(decoded(evaluation_set, 0)) == [0, 846, IGNORE_ID]
    assert row_values(decoded(evaluation_set, 1)) == [300, IGNORE_ID]


def test_pc59_labels_drive_which_photos_count(tmp_path):
    voc = str(tmp_path / "VOCdevkit" / "VOC2010")
    labels = {"2008_000002": stored_label([0, 58, 255], np.uint8), "2008_000003": stored_label([7], np.uint8)}
    write_layout(voc, "JPEGImages", "annotations_detectron2/pc59_val", labels, "PNG")
    storage.write_bytes(storage.join(voc, "JPEGImages", "2008_999999.jpg"), jpeg(5))  # a photo with no val label
    evaluation_set = load_benchmark("pc59", str(tmp_path))
    assert len(evaluation_set) == 2 and evaluation_set.num_classes == 59
    assert row_values(decoded(evaluation_set)) == [0, 58, IGNORE_ID]


def test_pc459_tiff_with_459_as_ignore(tmp_path):
    voc = str(tmp_path / "VOCdevkit" / "VOC2010")
    labels = {"2008_000002": stored_label([0, 458, 459], np.uint16), "2008_000007": stored_label([12], np.uint16)}
    write_layout(voc, "JPEGImages", "annotations_detectron2/pc459_val", labels, "TIFF")
    evaluation_set = load_benchmark("pc459", str(tmp_path / "VOCdevkit"))  # the VOCdevkit folder works too
    assert evaluation_set.num_classes == 459
    assert row_values(decoded(evaluation_set)) == [0, 458, IGNORE_ID]


def test_voc20_background_is_ignored(tmp_path):
    voc = str(tmp_path / "VOCdevkit" / "VOC2012")
    labels = {"2007_000033": stored_label([0, 19, 255], np.uint8), "2007_000042": stored_label([14], np.uint8)}
    write_layout(voc, "JPEGImages", "annotations_detectron2/val", labels, "PNG")
    evaluation_set = load_benchmark("voc20", voc)  # the dataset's own folder
    assert evaluation_set.num_classes == 20 and evaluation_set.background_from is None
    assert row_values(decoded(evaluation_set)) == [0, 19, IGNORE_ID]


def test_voc20b_has_21_classes_and_59_prompts(tmp_path):
    voc = str(tmp_path / "VOCdevkit" / "VOC2012")
    labels = {"2007_000033": stored_label([0, 20, 255], np.uint8), "2007_000042": stored_label([20], np.uint8)}
    write_layout(voc, "JPEGImages", "annotations_detectron2_bg/val", labels, "PNG")
    evaluation_set = load_benchmark("voc20b", str(tmp_path))
    assert len(evaluation_set.vocabulary) == 59 and evaluation_set.vocabulary[:20] == builtin_class_names("voc20")
    assert evaluation_set.class_names == [*builtin_class_names("voc20"), "background"]
    assert evaluation_set.background_from == 20
    assert row_values(decoded(evaluation_set)) == [0, 20, IGNORE_ID]


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_manifest_with_class_file(tmp_path, fmt):
    labels = {"a": stored_label([0, 2, 255], np.uint8), "b": stored_label([1], np.uint8)}
    write_layout(str(tmp_path), "images", "labels", labels, "PNG")
    table = pa.table(
        {"image_uri": [f"images/{s}.jpg" for s in labels], "label_uri": [f"labels/{s}.png" for s in labels]}
    )
    manifest = tmp_path / f"val.{fmt}"
    if fmt == "csv":
        manifest.write_text("image_uri,label_uri\n" + "".join(f"images/{s}.jpg,labels/{s}.png\n" for s in labels))
    else:
        pq.write_table(table, manifest)
    (tmp_path / "classes.txt").write_text("road\ncar\nsky\n")
    evaluation_set = load_benchmark("manifest", str(manifest), classes=str(tmp_path / "classes.txt"))
    assert evaluation_set.class_names == ["road", "car", "sky"] and len(evaluation_set) == 2
    assert row_values(decoded(evaluation_set)) == [0, 2, IGNORE_ID]


# -- names, limits and errors ---------------------------------------------------------------------------------


def test_builtin_class_lists_have_the_benchmark_sizes():
    sizes = {name: len(builtin_class_names(name)) for name in LAYOUTS}
    assert sizes == {"ade150": 150, "ade847": 847, "pc59": 59, "pc459": 459, "voc20": 20, "voc20b": 59}


def test_limit_keeps_the_first_images_in_name_order(tmp_path):
    voc = str(tmp_path / "VOC2012")
    write_layout(
        voc,
        "JPEGImages",
        "annotations_detectron2/val",
        {f"im{i}": stored_label([1], np.uint8) for i in (3, 1, 2)},
        "PNG",
    )
    evaluation_set = load_benchmark("voc20", voc, limit=2)
    assert [p[1].rsplit("/", 1)[1] for p in evaluation_set.pairs] == ["im1.png", "im2.png"]


def test_class_file_replaces_prompts_but_must_match_the_class_count(tmp_path):
    voc = str(tmp_path / "VOC2012")
    write_layout(voc, "JPEGImages", "annotations_detectron2/val", {"a": stored_label([1], np.uint8)}, "PNG")
    names = tmp_path / "names.txt"
    names.write_text("".join(f"thing {i}\n" for i in range(20)))
    assert load_benchmark("voc20", voc, classes=str(names)).vocabulary[3] == "thing 3"
    names.write_text("one\ntwo\n")
    with pytest.raises(ValueError, match=r"voc20 has 20 classes but .* lists 2 names"):
        load_benchmark("voc20", voc, classes=str(names))


def test_unknown_benchmark_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark 'cityscapes'"):
        load_benchmark("cityscapes", str(tmp_path))


def test_missing_folder_names_the_expected_layout_and_prepare_script(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"ADE20K_2021_17_01/annotations_detectron2/validation.*prepare_ade20k_full"
    ):
        load_benchmark("ade847", str(tmp_path))


def test_label_without_its_image_is_refused(tmp_path):
    voc = str(tmp_path / "VOC2012")
    write_layout(voc, "JPEGImages", "annotations_detectron2/val", {"a": stored_label([1], np.uint8)}, "PNG")
    storage.write_bytes(
        storage.join(voc, "annotations_detectron2/val/b.png"), encoded_label(stored_label([1], np.uint8), "PNG")
    )
    with pytest.raises(FileNotFoundError, match=r"1 of 2 labels .* have no .jpg image.*\['b'\]"):
        load_benchmark("voc20", voc)


def test_manifest_needs_a_class_file(tmp_path):
    with pytest.raises(ValueError, match="needs --classes"):
        load_benchmark("manifest", str(tmp_path / "val.parquet"))


def test_label_ids_beyond_the_class_list_are_refused():
    label = decode_label(
        encoded_label(stored_label([3, 25], np.uint8), "PNG"), LAYOUTS["voc20"].label_folders[0].encoding
    )
    with pytest.raises(LabelIdError, match=r"class id\(s\) \[25\] but the benchmark has 20 classes"):
        check_label_ids(label, 20, "x.png", limit=BENCHMARK_LIMIT)


def test_colour_labels_are_refused_with_a_reason():
    rgb = encoded_label(np.zeros((4, 4, 3), np.uint8), "PNG")
    with pytest.raises(ValueError, match="single-channel class ids, got a RGB image"):
        decode_label(rgb, LAYOUTS["voc20"].label_folders[0].encoding)
