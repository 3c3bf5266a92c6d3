"""A new user's usual mistakes, each refused up front: exit code, one `error:` line, seconds, nothing written.

Every job runs as a user runs it (``python -m jobs.<name>``, an embedded Ray on this machine), in a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from synthetic_data import write_manifest

REPO = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.startswith(("PATH", "HOME", "LANG"))}
    env.update(HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _job(name: str, *args: str, env: dict[str, str] | None = None, timeout: float = 180):
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", f"jobs.{name}", *args],
        cwd=REPO,
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return result, time.monotonic() - started


def _assert_refused(result, seconds: float, message: str, limit: float = 60.0) -> str:
    """Exit 2, the last line is the only `error:` line and says ``message``, no traceback, within ``limit`` s."""
    err = result.stderr
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert result.returncode == 2, err[-3000:]
    assert lines and lines[-1].startswith("error: ") and message in lines[-1], err[-3000:]
    assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in err, err[-3000:]
    assert seconds < limit
    return lines[-1]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(folder / f"p{i}.jpg")
    return folder


def _label(photos: Path, output: Path, *extra: str, checkpoint: str):
    return _job("label", "--input", str(photos), "--vocab", "road,car", "--checkpoint", checkpoint, "--output",
                str(output), *extra)  # fmt: skip


@pytest.mark.parametrize("damage", ["garbage_safetensors", "garbage_pth", "bad_config"])
def test_corrupt_checkpoint_is_refused_before_ray_starts(damage, photos, tiny_checkpoint, tmp_path):
    checkpoint = tmp_path / "ckpt"
    if damage == "garbage_pth":
        checkpoint = tmp_path / "model_base.pth"
        checkpoint.write_bytes(os.urandom(4096))
        expected = "could not be read as a PyTorch checkpoint"
    else:
        shutil.copytree(tiny_checkpoint, checkpoint)
        if damage == "garbage_safetensors":
            (checkpoint / "model.safetensors").write_bytes(os.urandom(4096))
            expected = "model.safetensors is corrupt"
        else:
            (checkpoint / "config.json").write_text('{"name": "tiny\x01"}')
            expected = "config.json is not a valid CAT-Seg model config"
    output = tmp_path / "out"
    result, seconds = _label(photos, output, checkpoint=str(checkpoint))
    line = _assert_refused(result, seconds, expected, limit=30)
    assert "Started a local Ray" not in result.stderr, line
    assert not output.exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--num-gpus-per-actor", "1"], "1 CPU and 1 GPU"),
        (["--cpus-per-actor", "8"], "8 CPU"),
        (["--max-actors", "0"], "--max-actors must be at least 1"),
    ],
)
def test_impossible_actor_requests_are_refused_on_an_embedded_ray(flags, message, photos, tiny_checkpoint, tmp_path):
    output = tmp_path / "out"
    result, seconds = _label(photos, output, *flags, checkpoint=tiny_checkpoint)
    line = _assert_refused(result, seconds, message)
    assert "--max-actors" in flags or "an embedded Ray cannot add one" in line
    assert not output.exists()


def test_input_without_images_says_what_was_skipped(tmp_path, tiny_checkpoint):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("notes.txt", "scan.xyz", "more.xyz"):
        (folder / name).write_bytes(b"x")
    output = tmp_path / "out"
    result, seconds = _job("label", "--input", str(folder), "--vocab", "a,b", "--checkpoint", tiny_checkpoint,
                           "--output", str(output))  # fmt: skip
    line = _assert_refused(result, seconds, f"no images found in {folder}", limit=30)
    assert ".xyz (2)" in line and ".txt (1)" in line and ".heic" in line
    assert not output.exists()


def test_s3_input_without_credentials_names_the_uri(s3_endpoint, s3_bucket, tiny_checkpoint, tmp_path):
    env = _env(AWS_ENDPOINT_URL=s3_endpoint, AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE="/nonexistent",
               AWS_SHARED_CREDENTIALS_FILE="/nonexistent", AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
    uri = f"s3://{s3_bucket}/images/"
    result, seconds = _job("label", "--input", uri, "--vocab", "a,b", "--checkpoint", tiny_checkpoint,
                           "--output", str(tmp_path / "out"), env=env)  # fmt: skip
    line = _assert_refused(result, seconds, f"s3://{s3_bucket}/images", limit=60)
    assert "credentials" in line.lower(), line


def test_query_on_a_missing_output_is_refused(tmp_path):
    result, seconds = _job("query", "--output", str(tmp_path / "nope"), "--sql", "SELECT count(*) FROM labels")
    _assert_refused(result, seconds, f"no labelling output at {tmp_path / 'nope'}", limit=30)


def test_finetune_with_default_cpu_options_finishes_on_an_embedded_ray(tmp_path):
    manifest, classes = write_manifest(str(tmp_path / "data"), {"train": 10}, fmt="csv", seed=2)
    common = ["--data", manifest, "--layout", "manifest", "--classes", classes, "--model", "tiny", "--storage",
              str(tmp_path / "runs"), "--num-workers", "2", "--max-steps", "3",
              # The hash hold-out depends on the (temporary) paths: 2 x 2 fits whatever it keeps of the 10.
              "--batch-size-per-worker", "2"]  # fmt: skip
    result, seconds = _job("finetune", *common, "--run-name", "defaults", timeout=420)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "2 training workers x 0.5 CPU" in result.stdout  # 1 of the 2 CPUs stays with the data pipeline
    assert "done: step 3" in result.stdout

    refused, seconds = _job("finetune", *common, "--run-name", "oversubscribed", "--cpus-per-worker", "1")
    line = _assert_refused(refused, seconds, "--num-workers 2 x --cpus-per-worker 1", limit=60)
    assert "at most 0.50" in line
    assert not (tmp_path / "runs" / "oversubscribed").exists()


def test_stalled_data_is_reported(caplog):
    from pipelines.training.run import warn_when_stalled

    def slow():
        yield 1
        time.sleep(1.5)
        yield 2

    with caplog.at_level("WARNING", logger="pipelines.training.run"):
        assert list(warn_when_stalled(slow(), 0.5, "rank 0")) == [1, 2]
    assert any("no training batch for" in record.getMessage() for record in caplog.records)


def test_a_slow_consumer_is_not_a_stall(caplog):
    from pipelines.training.run import warn_when_stalled

    with caplog.at_level("WARNING", logger="pipelines.training.run"):
        for _ in warn_when_stalled(iter([1, 2]), 0.3, "rank 0"):
            time.sleep(0.8)  # the training step: the iterator is not being waited on
    assert not caplog.records


def test_non_utf8_file_name_becomes_an_error_row_and_its_neighbours_are_labelled(ray_cluster, tiny_checkpoint,
                                                                                  tmp_path, photos):  # fmt: skip
    from pipelines.labelling import LabelConfig, open_labels, run_labelling
    from pipelines.models import resolve_model
    from pipelines.vocabulary import load_vocabulary

    folder = tmp_path / "in"
    shutil.copytree(photos, folder)
    os.rename(folder / "p0.jpg", os.path.join(os.fsencode(folder), b"caf\xe9.jpg"))
    config = LabelConfig(
        output_uri=str(tmp_path / "out"),
        vocabulary=load_vocabulary("road,car"),
        model=resolve_model(checkpoint=tiny_checkpoint),
        input_uri=str(folder) + "/",
        num_gpus_per_actor=0,
        cpus_per_actor=0.5,
    )
    summary = run_labelling(config)
    assert (summary.inputs, summary.ok, summary.errors, summary.missing) == (2, 1, 1, 0)
    rows = {row["source_uri"]: row for row in open_labels(config.output_uri).to_table().to_pylist()}
    bad = rows[f"{folder}/caf\\xe9.jpg"]
    assert "not valid UTF-8" in bad["error"] and rows[f"{folder}/p1.jpg"]["error"] is None


def test_the_same_input_spelled_differently_is_the_same_run(tmp_path, tiny_checkpoint):
    from pipelines.labelling import LabelConfig
    from pipelines.models import resolve_model
    from pipelines.vocabulary import load_vocabulary

    def run_id(input_uri: str, output_uri: str) -> str:
        model = resolve_model(checkpoint=tiny_checkpoint)
        config = LabelConfig(output_uri=output_uri, vocabulary=load_vocabulary("a,b"), model=model, input_uri=input_uri)
        return config.resolved_run_id()

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        same = {run_id("photos", "out"), run_id("photos/", "out/"), run_id(f"{tmp_path}/photos", "./out")}
    finally:
        os.chdir(cwd)
    assert len(same) == 1
    assert run_id("s3://b/photos/", "s3://b/out") == run_id("s3://b/photos", "s3://b/out/")
    assert run_id("s3://b/photos", "s3://b/out") != run_id("s3://b/other", "s3://b/out")


def test_released_name_as_checkpoint_and_finetuning_run_resolve(tmp_path, tiny_checkpoint):
    from pipelines.models import resolve_model

    run = tmp_path / "run"
    shutil.copytree(tiny_checkpoint, run / "step_00000004" / "model")
    (run / "step_00000004" / "progress.json").write_text(json.dumps({"step": 4}))
    source = resolve_model(checkpoint=str(run))  # jobs.label --checkpoint RUN, as jobs.evaluate accepts it
    assert source.uri == f"{run}/step_00000004/model" and source.architecture == "tiny"


def test_storage_outage_mid_run_ends_in_one_line_that_says_re_run_resumes(photos, tiny_checkpoint, tmp_path):
    import boto3
    from conftest import _free_port
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)  # this test's own endpoint
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    aws = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "2"}  # fmt: skip
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1")  # fmt: skip
    client.create_bucket(Bucket="outage")
    output = "s3://outage/labels"
    command = [sys.executable, "-m", "jobs.label", "--input", str(photos), "--vocab", "road,car", "--checkpoint",
               tiny_checkpoint, "--output", output]  # fmt: skip
    job = subprocess.Popen(command, cwd=REPO, env=_env(**aws), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and job.poll() is None:
            if client.list_objects_v2(Bucket="outage", Prefix="labels/manifest.json").get("KeyCount"):
                break  # the run has started: the endpoint goes away before its rows are written
            time.sleep(0.1)
        server.stop()
        _, err = job.communicate(timeout=400)
    finally:
        if job.poll() is None:
            job.kill()
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert job.returncode == 1, err[-3000:]
    assert lines[-1].startswith(f"error: the run into {output} stopped: "), err[-3000:]
    assert lines[-1].endswith("re-running the same command resumes")
    assert sum(line.startswith("error:") for line in lines) == 1
