"""The labelling pipeline end to end: real local Ray, real moto S3, real Parquet, the tiny model."""

from __future__ import annotations

import json
import os

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest
import torch
from labelling_samples import bad_images, good_images, upload

from pipelines.labelling import (
    OUTPUT_SCHEMA,
    LabelConfig,
    LabelOutput,
    OutputConflictError,
    image_id_for,
    open_labels,
    run_labelling,
)
from pipelines.labelling.stages import decode_images, read_image_bytes
from pipelines.masks import decode_confidence_png, decode_mask_png
from pipelines.model_stage import SegmentationModel
from pipelines.models import resolve_model
from pipelines.storage import filesystem
from pipelines.vocabulary import load_vocabulary

VOCAB = "cat,dog,sky,grass"


@pytest.fixture(scope="module")
def mixed_run(ray_cluster, s3_endpoint, tiny_checkpoint):
    """Good and broken images in a bucket, labelled once by a model actor that asks for a (fake) GPU."""
    bucket = f"label-mixed-{os.getpid() % 10000}"
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket=bucket)
    good = good_images()
    good_uris = upload(client, bucket, "images", {name: data for name, (data, _) in good.items()})
    bad_uris = upload(client, bucket, "images", bad_images())
    upload(client, bucket, "images", {"README.txt": b"not an input: no image suffix"})
    config = LabelConfig(
        output_uri=f"s3://{bucket}/labels",
        vocabulary=load_vocabulary(VOCAB),
        model=resolve_model(checkpoint=tiny_checkpoint),
        input_uri=f"s3://{bucket}/images/",
        batch_size=3,
        num_gpus_per_actor=1,  # the session cluster has one fake GPU: the actor must still run (on CPU)
        cpus_per_actor=1,
        confidence=True,
        rows_per_file=4,
    )
    summary = run_labelling(config)
    table = open_labels(config.output_uri).to_table()
    sizes = {f"s3://{bucket}/images/{name}": size for name, (_, size) in good.items()}
    return {
        "config": config,
        "summary": summary,
        "table": table,
        "good": sizes,
        "bad": bad_uris,
        "good_uris": good_uris,
    }


def _rows(table: pa.Table) -> dict[str, dict]:
    return {row["source_uri"]: row for row in table.to_pylist()}


def test_every_input_image_has_exactly_one_row(mixed_run):
    table, summary = mixed_run["table"], mixed_run["summary"]
    inputs = set(mixed_run["good"]) | set(mixed_run["bad"])
    assert sorted(table["source_uri"].to_pylist()) == sorted(inputs)  # README.txt is not an input
    assert summary.inputs == len(inputs) and summary.missing == 0
    assert (summary.ok, summary.errors) == (len(mixed_run["good"]), len(mixed_run["bad"]))
    assert table.schema.equals(OUTPUT_SCHEMA)


def test_good_images_get_a_mask_of_their_original_size(mixed_run):
    rows = _rows(mixed_run["table"])
    for uri, (height, width) in mixed_run["good"].items():
        row = rows[uri]
        assert row["error"] is None, row["error"]
        assert (row["height"], row["width"]) == (height, width)
        mask = decode_mask_png(row["mask_png"])
        assert mask.dtype == np.uint8 and mask.shape == (height, width)
        assert mask.max() < 4
        confidence = decode_confidence_png(row["confidence_png"])
        assert confidence.shape == (height, width) and 0.0 < confidence.min() <= confidence.max() <= 1.0
        ids, counts = np.unique(mask, return_counts=True)
        stats = row["class_stats"]
        assert [s["class_id"] for s in stats] == ids.tolist()
        assert [s["pixel_count"] for s in stats] == counts.tolist()
        assert [s["class_name"] for s in stats] == [VOCAB.split(",")[i] for i in ids]
        assert sum(s["fraction"] for s in stats) == pytest.approx(1.0)
        for s in stats:  # mean_score is the mean of the (unquantized) confidence; the PNG is within 1/255
            assert s["mean_score"] == pytest.approx(confidence[mask == s["class_id"]].mean(), abs=1 / 255)
        assert row["image_id"] == image_id_for(uri)
        assert row["run_id"] == mixed_run["summary"].run_id
        assert row["vocab_id"] == mixed_run["config"].vocabulary.vocab_id
        assert row["model_id"].startswith("tiny@")


def test_broken_files_become_error_rows_with_a_reason(mixed_run):
    rows = _rows(mixed_run["table"])
    reasons = {uri.rsplit("/", 1)[1]: rows[uri]["error"] for uri in mixed_run["bad"]}
    for uri in mixed_run["bad"]:
        assert rows[uri]["mask_png"] is None and rows[uri]["class_stats"] is None
    assert "empty file" in reasons["empty.png"]
    assert "not a recognized image format" in reasons["notes.jpg"]
    assert "truncated" in reasons["truncated.jpg"] and "truncated" in reasons["truncated.png"]
    assert reasons["corrupt.jpg"].startswith("decode:")


def test_output_is_readable_by_polars_and_pyarrow_dataset(mixed_run, s3_endpoint):
    import polars as pl

    output = mixed_run["config"].output_uri
    fs, _ = filesystem(output)
    dataset = pads.dataset(
        output.removeprefix("s3://") + "/data", format="parquet", filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    )
    by_arrow = dataset.to_table().sort_by("image_id")
    by_polars = pl.read_parquet(
        f"{output}/data/*.parquet",
        storage_options={
            "aws_endpoint_url": s3_endpoint,
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
            "aws_region": "us-east-1",
            "aws_allow_http": "true",
        },
    ).sort("image_id")
    assert by_polars.height == by_arrow.num_rows == mixed_run["table"].num_rows
    assert by_polars["image_id"].to_list() == by_arrow["image_id"].to_pylist()
    assert by_polars["mask_png"].to_list() == by_arrow["mask_png"].to_pylist()
    exploded = by_polars.explode("class_stats").unnest("class_stats").drop_nulls("class_id")
    assert exploded["pixel_count"].sum() == sum(h * w for h, w in mixed_run["good"].values())


def test_run_manifest_records_vocabulary_model_config_and_counts(mixed_run):
    manifest = LabelOutput(mixed_run["config"].output_uri).read_manifest()
    assert manifest["status"] == "complete"
    assert manifest["run_id"] == mixed_run["summary"].run_id
    assert manifest["vocabulary"]["names"] == VOCAB.split(",")
    assert manifest["model"]["id"] == mixed_run["config"].model.model_id
    assert manifest["config"]["mask_bits"] == 8 and manifest["config"]["unlabelled_value"] == 255
    assert manifest["config"]["num_gpus_per_actor"] == 1
    counts = manifest["counts"]
    assert counts["ok"] + counts["error"] == counts["inputs"] == len(mixed_run["good"]) + len(mixed_run["bad"])
    assert counts["missing"] == 0


def test_rerun_of_a_finished_run_labels_nothing_and_adds_no_rows(mixed_run):
    summary = run_labelling(mixed_run["config"])
    assert (summary.processed, summary.skipped) == (0, mixed_run["summary"].inputs)
    assert open_labels(mixed_run["config"].output_uri).count_rows() == mixed_run["table"].num_rows


def test_another_run_into_the_same_output_is_refused(mixed_run):
    other = LabelConfig(**{**mixed_run["config"].__dict__, "vocabulary": load_vocabulary("tree,road")})
    with pytest.raises(OutputConflictError, match="already holds run"):
        run_labelling(other)
    same_id = LabelConfig(**{**other.__dict__, "run_id": mixed_run["summary"].run_id})
    with pytest.raises(OutputConflictError, match="vocab_id"):
        run_labelling(same_id)


def test_model_actor_given_a_fake_gpu_runs_on_cpu(ray_cluster, tiny_checkpoint):
    import ray

    actor = ray.remote(num_gpus=1, num_cpus=0.5)(SegmentationModel).remote(tiny_checkpoint, ["cat", "sky"], 1)
    try:
        info = ray.get(actor.device_info.remote())
        assert info["ray_gpu_ids"] == ["0"]  # scheduled on the GPU (a fake one without CUDA) ...
        assert info["device"] == ("cuda" if info["cuda_available"] else "cpu")  # ... and ran where torch can
        if not torch.cuda.is_available():  # this machine has no GPU: the actor fell back to the CPU
            assert info["device"] == "cpu" and not info["cuda_available"]
        data, (height, width) = good_images()["photo.png"]
        batch = decode_images(
            pa.table({"image_id": ["a"], "source_uri": ["mem://photo.png"], "data": [data], "error": [None]})
        )
        predicted = ray.get(actor.__call__.remote(batch))
        assert predicted["error"].to_pylist() == [None]
        assert len(predicted["labels"][0].as_py()) == height * width  # uint8 class ids
    finally:
        ray.kill(actor)


def test_manifest_input_keeps_duplicates_out_and_missing_objects_as_errors(
    ray_cluster, s3_bucket, s3_endpoint, tiny_checkpoint, tmp_path
):
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    good = good_images()
    uris = upload(client, s3_bucket, "pics", {"a.png": good["photo.png"][0], "b.jpg": good["rgb.jpg"][0]})
    missing = f"s3://{s3_bucket}/pics/gone.png"
    manifest = tmp_path / "manifest.csv"
    pacsv.write_csv(pa.table({"path": [uris[0], uris[1], missing, uris[0]]}), str(manifest))
    config = LabelConfig(
        output_uri=str(tmp_path / "out"),
        vocabulary=load_vocabulary("cat,dog"),
        model=resolve_model(checkpoint=tiny_checkpoint),
        manifest_uri=str(manifest),
        uri_column="path",
        batch_size=2,
        num_gpus_per_actor=0,
        cpus_per_actor=0.5,
    )
    summary = run_labelling(config)
    rows = _rows(open_labels(config.output_uri).to_table())
    assert sorted(rows) == sorted([*uris, missing])
    assert rows[missing]["error"].startswith("read: FileNotFoundError")
    assert all(rows[u]["error"] is None for u in uris)
    manifest_json = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest_json["counts"]["duplicate_inputs"] == 1
    assert (summary.ok, summary.errors, summary.missing) == (2, 1, 0)


def test_read_stage_reports_unreadable_uris_per_row(s3_endpoint, s3_bucket):
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    [present] = upload(client, s3_bucket, "x", {"ok.png": good_images()["gray.png"][0]})
    batch = pa.table(
        {"image_id": ["1", "2", "3"], "source_uri": [present, f"s3://{s3_bucket}/x/nope.png", "nosuch://x/y.png"]}
    )
    result = read_image_bytes(batch).to_pylist()
    assert result[0]["error"] is None and result[0]["data"] == good_images()["gray.png"][0]
    assert result[1]["data"] is None and "FileNotFoundError" in result[1]["error"]
    assert result[2]["data"] is None and result[2]["error"].startswith("read:")
