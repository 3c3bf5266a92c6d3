"""Kill a real `python -m jobs.label` mid-run, run the same command again: one row per input, no duplicates."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs
from labelling_samples import encode_image, noise_array, upload
from PIL import Image

from pipelines.labelling import LabelOutput, image_id_for, open_labels

REPO = Path(__file__).resolve().parents[1]
IMAGES = 12


def _job_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # an embedded Ray of its own
    env.update(HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    return env


def _kill_group(pgid: int) -> None:
    """SIGKILL every process left in the job's process group (the driver, and Ray processes it started)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def _group_members(pgid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,pgid="], capture_output=True, text=True, check=True).stdout
    return [int(pid) for pid, group in (line.split() for line in out.splitlines()) if int(group) == pgid]


def _data_files(fs: s3fs.S3FileSystem, prefix: str) -> list[str]:
    fs.invalidate_cache()
    try:
        return [p for p in fs.find(prefix) if p.endswith(".parquet")]
    except FileNotFoundError:
        return []


def _settled_files(fs: s3fs.S3FileSystem, prefix: str, quiet_seconds: float = 2.0) -> list[str]:
    """The data files once the listing has stopped changing for ``quiet_seconds`` (an upload that was in flight
    when the job was killed may still complete on the server side)."""
    files, since = _data_files(fs, prefix), time.monotonic()
    deadline = since + 30
    while time.monotonic() - since < quiet_seconds:
        assert time.monotonic() < deadline, "the output kept changing after the job was killed"
        time.sleep(0.5)
        now = _data_files(fs, prefix)
        if now != files:
            files, since = now, time.monotonic()
    return files


@pytest.mark.timeout(300)
def test_killed_job_resumes_with_exactly_one_row_per_image(s3_endpoint, s3_bucket, tiny_checkpoint, tmp_path):
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    files = {
        f"img{i:02d}.png": encode_image(Image.fromarray(noise_array(40 + i, 48, 3, i)), "PNG") for i in range(IMAGES)
    }
    uris = upload(client, s3_bucket, "images", files)
    output = f"s3://{s3_bucket}/labels"
    command = [
        sys.executable, "-m", "jobs.label",
        "--input", f"s3://{s3_bucket}/images/",
        "--vocab", "cat,dog,sky",
        "--checkpoint", tiny_checkpoint,
        "--output", output,
        "--batch-size", "1", "--rows-per-file", "1",
        "--num-gpus-per-actor", "0", "--cpus-per-actor", "1",
    ]  # fmt: skip
    fs = s3fs.S3FileSystem()

    log = open(tmp_path / "first.log", "w")  # noqa: SIM115 (closed below, after the process is gone)
    first = subprocess.Popen(
        command, cwd=REPO, env=_job_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 180
        while len(_data_files(fs, f"{s3_bucket}/labels/data")) < 2:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the job wrote no output in time"
            time.sleep(0.2)
    finally:
        _kill_group(first.pid)
        first.wait(timeout=30)
        log.close()
    deadline = time.monotonic() + 20
    while _group_members(first.pid) and time.monotonic() < deadline:  # Ray's processes die with their driver
        _kill_group(first.pid)
        time.sleep(0.5)
    assert not _group_members(first.pid)

    committed = _settled_files(fs, f"{s3_bucket}/labels/data")
    rows_before = sum(pq.ParquetFile(fs.open(p)).metadata.num_rows for p in committed)
    assert 2 <= rows_before < IMAGES, "the job was not killed mid-run"
    manifest = LabelOutput(output).read_manifest()
    assert manifest["status"] == "running"  # the killed attempt never finished

    # A writer killed mid-file on a local disk leaves a file without a footer: simulate one in the output.
    with fs.open(committed[0], "rb") as f:
        half = f.read()[:100]
    with fs.open(f"{s3_bucket}/labels/data/zz-killed-mid-write.parquet", "wb") as f:
        f.write(half)

    second = subprocess.run(command, cwd=REPO, env=_job_env(), capture_output=True, text=True, timeout=240)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"skipped {rows_before} already done" in second.stdout
    assert not fs.exists(f"{s3_bucket}/labels/data/zz-killed-mid-write.parquet")

    table = open_labels(output).to_table(columns=["image_id", "source_uri", "error"])
    assert sorted(table["image_id"].to_pylist()) == sorted(image_id_for(u) for u in uris)  # each exactly once
    assert table["error"].null_count == IMAGES
    manifest = LabelOutput(output).read_manifest()
    assert manifest["status"] == "complete" and manifest["counts"]["ok"] == IMAGES
    assert [a["processed"] for a in manifest["attempts"]] == [IMAGES - rows_before]
    assert np.isclose(sum(a["skipped"] for a in manifest["attempts"]), rows_before)
