"""Labelling an image lake: inputs planned on the cluster, error kinds, re-runs that heal, object-store faults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from fault_proxy import FaultPolicy, FaultProxy
from labelling_samples import bad_images, encode_image, good_images, noise_array, upload
from PIL import Image

from pipelines.labelling import LabelConfig, LabelOutput, OutputConflictError, image_id_for, run_labelling
from pipelines.labelling.plan import TODO_ROWS_PER_FILE, plan_inputs
from pipelines.models import resolve_model
from pipelines.vocabulary import load_vocabulary

REPO = Path(__file__).resolve().parents[1]


def _config(tiny_checkpoint: str, output: Path, **options) -> LabelConfig:
    defaults = {"num_gpus_per_actor": 0, "cpus_per_actor": 0.5, "batch_size": 2}
    return LabelConfig(
        output_uri=str(output),
        vocabulary=load_vocabulary("cat,dog,sky"),
        model=resolve_model(checkpoint=tiny_checkpoint),
        **{**defaults, **options},
    )


def _rows_read_plainly(output: Path) -> dict[str, dict]:
    """What any Parquet reader sees in data/: pyarrow over the folder, no catseg code involved."""
    table = pq.read_table(output / "data")
    rows = {
        row["source_uri"]: row for row in table.select(["image_id", "source_uri", "error", "error_kind"]).to_pylist()
    }
    assert len(rows) == table.num_rows == pc.count_distinct(table["image_id"]).as_py()  # one row per image
    return rows


def test_a_failed_read_heals_on_rerun_and_each_image_keeps_one_row(ray_cluster, tiny_checkpoint, tmp_path):
    images, later = tmp_path / "images", tmp_path / "later"
    images.mkdir()
    later.mkdir()
    good = good_images()
    for name in ("photo.png", "rgb.jpg", "gray.png"):
        (images / name).write_bytes(good[name][0])
    (images / "late.png").symlink_to(later / "late.png")  # not there yet: a read fails (FileNotFoundError)
    (images / "bad.png").write_bytes(bad_images()["truncated.png"])
    config = _config(tiny_checkpoint, tmp_path / "out", input_uri=str(images))

    first = run_labelling(config)
    assert (first.ok, first.transient_errors, first.permanent_errors, first.missing) == (3, 1, 1, 0)
    assert not first.healed
    rows = _rows_read_plainly(tmp_path / "out")
    assert rows[str(images / "late.png")]["error_kind"] == "transient"
    assert rows[str(images / "late.png")]["error"].startswith("read: FileNotFoundError")
    assert rows[str(images / "bad.png")]["error_kind"] == "permanent"

    (later / "late.png").write_bytes(encode_image(Image.fromarray(noise_array(30, 50, 3, 7)), "PNG"))
    second = run_labelling(config)
    assert (second.processed, second.retried, second.skipped) == (1, 1, 4)
    assert (second.ok, second.transient_errors, second.permanent_errors, second.missing) == (4, 0, 1, 0)
    rows = _rows_read_plainly(tmp_path / "out")
    assert len(rows) == 5 and rows[str(images / "late.png")]["error"] is None
    assert rows[str(images / "bad.png")]["error_kind"] == "permanent"  # not retried by default
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (manifest["counts"]["error_transient"], manifest["counts"]["error_permanent"]) == (0, 1)
    assert manifest["attempts"][-1]["retried_by_kind"] == {"transient": 1}
    assert manifest["status"] == "complete"

    third = run_labelling(config)  # nothing left worth retrying
    assert (third.processed, third.skipped, third.retried) == (0, 5, 0)


def test_permanent_errors_are_retried_only_when_asked(ray_cluster, tiny_checkpoint, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "ok.png").write_bytes(good_images()["photo.png"][0])
    (images / "bad.png").write_bytes(bad_images()["truncated.png"])
    config = _config(tiny_checkpoint, tmp_path / "out", input_uri=str(images))
    run_labelling(config)
    first_file = {p.name for p in (tmp_path / "out" / "data").iterdir()}

    kept = run_labelling(config)
    assert (kept.processed, kept.retried) == (0, 0)
    again = run_labelling(_config(tiny_checkpoint, tmp_path / "out", input_uri=str(images), retry_errors="all"))
    assert (again.processed, again.retried, again.skipped) == (1, 1, 1)
    assert (again.ok, again.permanent_errors) == (1, 1)
    rows = _rows_read_plainly(tmp_path / "out")
    assert rows[str(images / "bad.png")]["error_kind"] == "permanent" and len(rows) == 2
    assert {p.name for p in (tmp_path / "out" / "data").iterdir()} - first_file  # the new row is in a new file
    none = run_labelling(_config(tiny_checkpoint, tmp_path / "out", input_uri=str(images), retry_errors="none"))
    assert none.processed == 0


def test_a_manifest_of_20k_missing_objects_is_planned_without_per_image_driver_memory(ray_cluster, tmp_path):
    """The no-image path: every URI is an error row; the driver's Python memory does not grow with the inputs."""

    def manifest(count: int) -> str:
        path = tmp_path / f"manifest-{count}.parquet"
        pq.write_table(pa.table({"uri": [f"/nonexistent/lake/{i:07d}.jpg" for i in range(count)]}), path)
        return str(path)

    peaks = {}
    for count in (2_000, 20_000):
        output = tmp_path / f"plan-{count}"
        tracemalloc.start()
        plan = plan_inputs(output=LabelOutput(str(output)), run_id="r", input_uri=None, manifest_uri=manifest(count),
                           uri_column="uri", limit=None, retry_errors="transient",
                           conflict=OutputConflictError)  # fmt: skip
        peaks[count] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert (plan.inputs, plan.todo) == (count, count)
        todo = pq.read_table(plan.todo_files[0][0])
        assert set(todo.column_names) == {"image_id", "source_uri", "error", "error_kind"}
        assert len(plan.todo_files) == -(-count // TODO_ROWS_PER_FILE)  # files of thousands of rows
    # The old driver held a tuple, an id and a set entry per URI: about 8 MB for 20k. Now: counts and file paths.
    assert peaks[20_000] < 1.5 * peaks[2_000] + 256 * 1024, peaks


@pytest.mark.timeout(600)
def test_the_20k_manifest_job_ends_with_one_transient_row_per_input(ray_cluster, tiny_checkpoint, tmp_path):
    count = 20_000
    path = tmp_path / "manifest.csv"
    pacsv.write_csv(pa.table({"uri": [f"/nonexistent/lake/{i:07d}.jpg" for i in range(count)]}), str(path))
    config = _config(tiny_checkpoint, tmp_path / "out", manifest_uri=str(path), batch_size=4)
    summary = run_labelling(config)
    assert (summary.inputs, summary.transient_errors, summary.ok, summary.missing) == (count, count, 0, 0)
    table = pads.dataset(str(tmp_path / "out" / "data"), format="parquet").to_table(columns=["image_id", "error_kind"])
    assert table.num_rows == count == pc.count_distinct(table["image_id"]).as_py()
    assert pc.all(pc.equal(table["error_kind"], "transient")).as_py()
    # the output is a few hundred files (rows_per_file = 256), not a file or a Ray block per image
    assert len(list((tmp_path / "out" / "data").iterdir())) <= count // 256 + 64


# -- object-store faults ---------------------------------------------------------------------------------------
def _job(*args: str, endpoint: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # an embedded Ray of its own
    env.update(
        HF_HUB_OFFLINE="1",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="disabled",
        AWS_ENDPOINT_URL=endpoint,
        AWS_ENDPOINT_URL_S3=endpoint,
        AWS_RETRY_MODE="standard",
        AWS_MAX_ATTEMPTS="2",
    )  # fmt: skip  (botocore's own retries: one)
    return subprocess.run([sys.executable, "-m", "jobs.label", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=400)  # fmt: skip


@pytest.mark.timeout(900)
def test_503s_and_resets_cost_rows_not_the_job_and_a_rerun_labels_the_rest(s3_endpoint, s3_bucket, tiny_checkpoint):
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    files = {f"img{i:02d}.png": encode_image(Image.fromarray(noise_array(32, 40 + i, 3, i)), "PNG") for i in range(12)}
    uris = upload(client, s3_bucket, "images", files)
    # img00-img02 are down for the whole first run; img03-img05 answer 503 once and reset the connection once
    # (botocore retries once, our reads retry with backoff); the first upload of an output file gets a 503.
    policy = FaultPolicy(
        down=tuple(f"images/img0{i}.png" for i in range(3)),
        flaky=tuple(f"images/img0{i}.png" for i in range(3, 6)),
        flaky_writes=("labels/data/",),
    )
    output = f"s3://{s3_bucket}/labels"
    args = ["--input", f"s3://{s3_bucket}/images/", "--vocab", "cat,dog,sky", "--checkpoint", tiny_checkpoint,
            "--output", output, "--batch-size", "2", "--rows-per-file", "2"]  # fmt: skip
    with FaultProxy(s3_endpoint, policy) as proxy:
        first = _job(*args, endpoint=proxy.endpoint)
        assert first.returncode == 1, first.stdout[-3000:] + first.stderr[-3000:]  # a re-run can still help
        assert "9 masks, 3 errors (3 transient, 0 permanent), 0 missing of 12 inputs" in first.stdout, first.stdout
        assert policy.injected["503"] > 3 and policy.injected["reset"] == 3
        assert any(k.startswith("write:") for k in policy.injected)  # an upload was refused once, then retried

        s3 = pafs.S3FileSystem(
            endpoint_override=s3_endpoint, access_key="testing", secret_key="testing", region="us-east-1", scheme="http"
        )  # fmt: skip  pyarrow's own S3 client
        table = pads.dataset(f"{s3_bucket}/labels/data", filesystem=s3, format="parquet").to_table()
        assert sorted(table["image_id"].to_pylist()) == sorted(image_id_for(u) for u in uris)
        errors = {r["source_uri"]: r for r in table.to_pylist() if r["error"] is not None}
        assert sorted(errors) == uris[:3]
        assert all(r["error_kind"] == "transient" and r["error"].startswith("read:") for r in errors.values())

        policy.enabled = False  # the store recovers
        second = _job(*args, endpoint=proxy.endpoint)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "retried 3 earlier errors" in second.stdout
    assert "12 masks, 0 errors (0 transient, 0 permanent), 0 missing of 12 inputs" in second.stdout
    table = pads.dataset(f"{s3_bucket}/labels/data", filesystem=s3, format="parquet").to_table()
    assert sorted(table["image_id"].to_pylist()) == sorted(image_id_for(u) for u in uris)  # each exactly once
    assert table["error"].null_count == 12
