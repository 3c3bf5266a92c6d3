"""The way back in: Label Studio exports (as Label Studio 1.2x writes them), COCO files and a labelling run's own
rows as fine-tuning sources and as evaluation references. No cluster: sources are read and checked on the driver,
and a run's labels are scored against reviews without a model."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from feedback_samples import annotation, brush_result, reviewed_export, task, write_export, write_run
from labelling_samples import encode_image, noise_array
from PIL import Image

from jobs import evaluate as evaluate_cli
from pipelines.annotations import decode_label_data_uri
from pipelines.coco import read_coco
from pipelines.label_studio import LabelStudioAccess, read_export
from pipelines.labelling import LabelOutput, export
from pipelines.masks import decode_mask_png
from pipelines.training.config import FinetuneConfig
from pipelines.training.run import check_inputs

H, W = 8, 10
NAMES = ["road", "car", "sky"]
CONFIG_XML = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="label" toName="image">
    <Label value="road" background="#ff0000"/>
    <Label value="car" background="#00ff00"/>
    <Label value="sky" background="#0000ff"/>
  </BrushLabels>
</View>
"""
IGNORED = 255
OLD, NEW = "2026-12-01T08:00:00.000000Z", "2026-12-02T08:00:00.000000Z"


def _rows(first: int, last: int) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[first:last] = True
    return mask


EVERYWHERE = _rows(0, H)
UPLOAD_BYTES = encode_image(Image.fromarray(noise_array(H, W, 3, 9)), "PNG")


class _LabelStudio(http.server.BaseHTTPRequestHandler):
    """Label Studio's file and token endpoints: /data/upload/... needs `Token secret` or a Bearer access token
    obtained at /api/token/refresh with the personal access token."""

    def do_GET(self) -> None:
        allowed = self.headers.get("Authorization") in ("Token secret", "Bearer fresh-access")
        if self.path == "/data/upload/1/photo.png" and allowed:
            self._reply(200, UPLOAD_BYTES, "image/png")
        else:
            self._reply(401 if not allowed else 404, b"{}", "application/json")

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/api/token/refresh" and body.get("refresh") == "aa.bb.cc":
            self._reply(200, json.dumps({"access": "fresh-access"}).encode(), "application/json")
        else:
            self._reply(401, b"{}", "application/json")

    def _reply(self, status: int, data: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def label_studio_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _LabelStudio)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _image(root: Path, name: str, seed: int) -> str:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_image(Image.fromarray(noise_array(H, W, 3, seed)), "PNG"))
    return str(path)


def _export(tmp_path: Path) -> tuple[str, dict[str, np.ndarray]]:
    """An export with every case the reader must get right, and the label each used task must decode to."""
    images = tmp_path / "images"
    expected = {}
    painted = [brush_result(_rows(0, 4), "road", "a"), brush_result(_rows(2, 6), "car", "b")]
    one = np.full((H, W), IGNORED, np.uint8)  # road rows 0-1, road+car rows 2-3 ignored, car 4-5, 6-7 uncovered
    one[0:2], one[4:6] = 0, 1
    tasks = [
        # the newest annotation counts: overlapping brushes of two classes and unpainted rows are ignored
        task(1, _image(images, "one.png", 1), [
            annotation(11, 1, [brush_result(EVERYWHERE, "sky", "s")], updated=OLD),
            annotation(12, 1, painted, updated=NEW),
        ]),
        # ground truth wins over a newer annotation
        task(2, _image(images, "two.png", 2), [
            annotation(21, 2, [brush_result(EVERYWHERE, "car", "c")], updated=OLD, ground_truth=True),
            annotation(22, 2, [brush_result(EVERYWHERE, "sky", "s")], updated=NEW),
        ]),
        # a newer cancelled annotation does not count; the older one does
        task(3, _image(images, "three.png", 3), [
            annotation(31, 3, [brush_result(EVERYWHERE, "road", "r")], updated=OLD),
            annotation(32, 3, [brush_result(EVERYWHERE, "sky", "s")], updated=NEW, cancelled=True),
        ]),
        # skipped by its reviewer: its only annotation is cancelled
        task(4, _image(images, "four.png", 4), [annotation(41, 4, [], updated=NEW, cancelled=True)]),
        # its image is gone
        task(5, str(images / "missing.png"), [annotation(51, 5, [brush_result(EVERYWHERE, "sky", "s")], updated=NEW)]),
        # never annotated
        task(6, _image(images, "six.png", 6), []),
        # a Label Studio local file, and a file uploaded to Label Studio itself
        task(7, "/data/local-files/?d=sub/seven.png", [
            annotation(71, 7, [brush_result(EVERYWHERE, "sky", "s")], updated=NEW),
        ]),
        task(8, "/data/upload/1/photo.png", [annotation(81, 8, [brush_result(_rows(0, 3), "car", "c")], updated=NEW)]),
        # a class the vocabulary does not have: its pixels are ignored
        task(9, _image(images, "nine.png", 9), [
            annotation(91, 9, [brush_result(_rows(0, 4), "bus", "x"), brush_result(_rows(4, 8), "road", "r")],
                       updated=NEW),
        ]),
    ]  # fmt: skip
    _image(tmp_path / "local-files" / "sub", "seven.png", 7)
    expected[str(images / "one.png")] = one
    expected[str(images / "two.png")] = np.full((H, W), 1, np.uint8)
    expected[str(images / "three.png")] = np.full((H, W), 0, np.uint8)
    expected[str(tmp_path / "local-files" / "sub" / "seven.png")] = np.full((H, W), 2, np.uint8)
    eight = np.full((H, W), IGNORED, np.uint8)
    eight[0:3] = 1
    expected["upload"] = eight
    nine = np.full((H, W), IGNORED, np.uint8)
    nine[4:8] = 0
    expected[str(images / "nine.png")] = nine
    return write_export(tmp_path / "export" / "project.json", tasks, CONFIG_XML), expected


@pytest.mark.parametrize("api_key", ["secret", "aa.bb.cc"])  # a legacy token, a personal access token (a JWT)
def test_a_label_studio_export_decodes_to_the_reviewed_labels_pixel_for_pixel(tmp_path, label_studio_server, api_key):
    export_uri, expected = _export(tmp_path)
    access = LabelStudioAccess(label_studio_server, api_key, str(tmp_path / "local-files"))
    reviewed = read_export(export_uri, access=access, copy_uploads_to=str(tmp_path / "copied"))

    assert reviewed.class_names == NAMES  # from label_config.xml beside the export
    uploaded = str(tmp_path / "copied" / "data_upload_1_photo.png")
    got = {image.image_uri: image.label for image in reviewed.images}
    assert sorted(got) == sorted(uri if uri != "upload" else uploaded for uri in expected)
    for uri, label in expected.items():
        assert np.array_equal(got[uploaded if uri == "upload" else uri], label), uri
    assert Path(uploaded).read_bytes() == UPLOAD_BYTES  # copied out of Label Studio, where workers can read it
    skipped = "\n".join(reviewed.skipped)
    assert [line.split(":")[0] for line in reviewed.skipped] == ["task 4", "task 6", "task 5"]
    assert "cancelled" in skipped and "missing.png does not exist" in skipped and "no annotation" in skipped
    assert reviewed.unknown_classes == {"bus": 1}
    # the training pairs carry the same labels
    for (image, label_uri), review in zip(reviewed.pairs(), reviewed.images, strict=True):
        assert image == review.image_uri and np.array_equal(decode_label_data_uri(label_uri), review.label)


def test_classes_given_map_the_export_by_name_and_unknown_names_are_ignored(tmp_path, label_studio_server):
    export_uri, _ = _export(tmp_path)
    access = LabelStudioAccess(label_studio_server, "secret", str(tmp_path / "local-files"))
    reviewed = read_export(export_uri, classes=["sky", "road"], access=access, copy_uploads_to=str(tmp_path / "c"))
    one = reviewed.images[0]
    remapped = np.full((H, W), IGNORED, np.uint8)
    remapped[0:2] = 1  # road is now id 1; car is not a class: rows 4-5 ignored, rows 2-3 (road and car) too
    assert one.image_uri.endswith("one.png") and np.array_equal(one.label, remapped)
    assert reviewed.unknown_classes == {"car": 3, "bus": 1}  # regions in tasks 1, 2 and 8; task 9


def test_label_studio_files_without_a_key_or_a_server_cost_only_their_task(tmp_path):
    export_uri, _ = _export(tmp_path)
    reviewed = read_export(export_uri, access=LabelStudioAccess(local_files_root=str(tmp_path / "local-files")))
    assert "task 8: " in "\n".join(reviewed.skipped) and len(reviewed.images) == 5


def test_our_coco_export_reads_back_to_the_same_labels(tmp_path):
    rng = np.random.default_rng(4)
    images = {f"p{i}.png": (noise_array(12, 16, 3, i), rng.choice([0, 1, 2, 255], (12, 16))) for i in range(3)}
    run = write_run(tmp_path, images, NAMES)
    export("coco", run, str(tmp_path / "coco"))
    reviewed = read_coco(str(tmp_path / "coco" / "annotations.json"))
    assert reviewed.class_names == NAMES
    rows = {r["source_uri"]: decode_mask_png(r["mask_png"]) for r in LabelOutput(run).dataset().to_table().to_pylist()}
    assert len(reviewed.images) == 3
    for image in reviewed.images:
        assert np.array_equal(image.label, rows[image.image_uri])  # unlabelled (255) has no region: ignored


def test_coco_polygons_and_crowd_regions(tmp_path):
    image = _image(tmp_path, "poly.png", 1)
    coco = {
        "images": [{"id": 7, "file_name": "poly.png", "width": W, "height": H}, {"id": 8, "file_name": "x.png",
                                                                                "width": W, "height": H}],
        "categories": [{"id": 3, "name": "car"}, {"id": 1, "name": "road"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "iscrowd": 0, "segmentation": [[0, 0, 10, 0, 10, 4, 0, 4]]},
            {"id": 2, "image_id": 7, "category_id": 3, "iscrowd": 1,
             "segmentation": {"size": [H, W], "counts": [6 * H, 2 * H, 2 * H]}},  # columns 6-7 crowd
        ],
    }  # fmt: skip
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    reviewed = read_coco(str(tmp_path / "ann.json"))
    assert reviewed.class_names == ["road", "car"]  # category id order
    [only] = reviewed.images
    assert only.image_uri == image and [s.split(":")[0] for s in reviewed.skipped] == ["image 8"]
    assert (only.label[:, 6:8] == IGNORED).all()  # crowd
    from pycocotools import mask as mask_api

    road = mask_api.decode(mask_api.merge(mask_api.frPyObjects([[0, 0, 10, 0, 10, 4, 0, 4]], H, W))).astype(bool)
    assert road[0:4].all() and not road[5:].any()  # the polygon as pycocotools rasterizes it
    road[:, 6:8] = False
    assert ((only.label == 0) == road).all() and (only.label[5:, :6] == IGNORED).all()


def _finetune_config(tmp_path: Path, **overrides) -> FinetuneConfig:
    options = {"storage": str(tmp_path / "runs"), "run_name": "loop", "model": "tiny", "max_steps": 1,
               "batch_size_per_worker": 1, "eval_every": 0}  # fmt: skip
    return FinetuneConfig(**{**options, **overrides})


def test_fine_tuning_reads_reviews_and_the_chosen_pseudo_labels_on_one_vocabulary(tmp_path):
    rng = np.random.default_rng(1)
    images = {f"q{i}.png": (noise_array(H, W, 3, 20 + i), rng.choice([0, 1, 2, 255], (H, W))) for i in range(6)}
    margins = {name: 0.1 * i for i, name in enumerate(images)}  # q4 and q5 are confident (> 0.35)
    # probabilities on the confidence PNG's 8-bit grid, so that what the run stored is exactly these
    confidence = {name: (rng.integers(0, 256, (H, W)) / 255).astype(np.float32) for name in images}
    run = write_run(tmp_path, images, ["car", "road", "sky"], margins=margins, confidence=confidence)
    reviews = {str(tmp_path / "images" / "q0.png"): np.full((H, W), 0, np.uint8)}
    export_uri = reviewed_export(tmp_path / "ls" / "export.json", reviews, ["road"])

    config = _finetune_config(
        tmp_path, layout="label-studio", data=export_uri, weight=3.0, where="mean_margin > 0.35", min_confidence=0.5,
        add_source=[f"labels={run},weight=1"],
    )  # fmt: skip
    config.validate()
    train, val = check_inputs(config)
    assert val is None and train.class_names == ["road", "car", "sky"]  # the review's classes first
    pairs = [(image.rsplit("/", 1)[1], label) for image, label in train.pairs]
    assert [name for name, _ in pairs[:3]] == ["q0.png"] * 3  # weight 3
    assert sorted(name for name, _ in pairs[3:]) == ["q4.png", "q5.png"]  # exactly the rows --where chose
    for name, label_uri in pairs[3:]:
        run_label = images[name][1]
        want = np.select([run_label == 0, run_label == 1, run_label == 2], [1, 0, 2], IGNORED).astype(np.uint8)
        want[confidence[name] < 0.5] = IGNORED  # below --min-confidence
        got = np.asarray(Image.open(label_uri))
        assert np.array_equal(got, want), name


def test_where_without_a_labels_source_and_min_confidence_without_confidence_pngs_are_refused(tmp_path):
    run = write_run(tmp_path, {"a.png": (noise_array(H, W, 3, 1), np.zeros((H, W), np.uint8))}, NAMES)
    with pytest.raises(ValueError, match="need a labels source"):
        _finetune_config(tmp_path, layout="coco", data="x.json", where="true").validate()
    with pytest.raises(ValueError, match="stored none"):
        check_inputs(_finetune_config(tmp_path, layout="labels", data=run, min_confidence=0.5))
    with pytest.raises(ValueError, match="LAYOUT=URI"):
        _finetune_config(tmp_path, layout="labels", data=run, add_source=["labels"]).validate()


def test_evaluate_labels_scores_a_run_against_the_reviews_without_a_model(tmp_path, capsys):
    truth = np.zeros((H, W), np.uint8)
    truth[:, 5:] = 1  # road left, car right
    wrong = truth.copy()
    wrong[:, 5:7] = 0  # the run calls two car columns road
    unlabelled = truth.copy()
    unlabelled[0, :] = 255  # and leaves a row unlabelled in the second image
    images = {"a.png": (noise_array(H, W, 3, 1), wrong), "b.png": (noise_array(H, W, 3, 2), unlabelled)}
    run = write_run(tmp_path, images, ["road", "car"])
    reviews = {str(tmp_path / "images" / name): truth for name in images}
    reviews[str(tmp_path / "images" / "absent.png")] = truth  # reviewed, but not in the run
    _image(tmp_path / "images", "absent.png", 3)
    export_uri = reviewed_export(tmp_path / "ls" / "export.json", reviews, ["road", "car"])

    code = evaluate_cli.main(["--benchmark", "label-studio", "--data", export_uri, "--labels", run,
                              "--output", str(tmp_path / "report")])  # fmt: skip
    out = capsys.readouterr()
    assert code == 0, out.err
    report = json.loads((tmp_path / "report" / "evaluation_label-studio-labels.json").read_text())
    # road: TP 40 + 35, GT 40 + 40, predicted 56 + 35 -> IoU 75 / (80 + 91 - 75); car: TP 24 + 35, GT 80
    road, car = report["per_class"][0], report["per_class"][1]
    assert road["iou"] == pytest.approx(75 / 96) and car["iou"] == pytest.approx(59 / 80)
    assert report["miou"] == pytest.approx((75 / 96 + 59 / 80) / 2)
    assert report["images"] == {"total": 3, "evaluated": 2, "failed": 1}
    assert report["errors"] == [{"image_uri": str(tmp_path / "images" / "absent.png"),
                                 "error": "no labelled row in the run"}]  # fmt: skip
    assert "mIoU" in out.out and "on 2 of 3 reviewed images" in out.out
