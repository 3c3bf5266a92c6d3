"""Labelling on a multi-node Ray cluster (``ray.cluster_utils.Cluster``: a head and GPU worker nodes on this
machine, each node with its own environment), with nodes lost mid-run: one row per image, nothing lost.

The GPUs are logical (the actors fall back to the CPU); images and output live on the moto S3 server, which every
node reaches through the AWS_* variables it inherits. Jobs run as users run them: ``python -m jobs.label`` with
RAY_ADDRESS pointing at the cluster.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
from labelling_samples import encode_image, noise_array, upload
from local_cluster import LocalCluster
from PIL import Image

from pipelines.labelling import LabelOutput, open_labels

REPO = Path(__file__).resolve().parents[1]
IMAGES = 24


@pytest.fixture
def images_on_s3(s3_endpoint, s3_bucket) -> str:
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    files = {
        f"img{i:02d}.png": encode_image(Image.fromarray(noise_array(64 + i, 80, 3, i)), "PNG") for i in range(IMAGES)
    }
    upload(client, s3_bucket, "images", files)
    return f"s3://{s3_bucket}/images/"


def _label(cluster: LocalCluster, source: str, output: str, checkpoint: str, **env: str) -> subprocess.Popen:
    job_env = {**os.environ, "RAY_ADDRESS": cluster.address, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
               "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", **env}  # fmt: skip
    command = [sys.executable, "-m", "jobs.label", "--input", source, "--vocab", "cat,dog,sky", "--checkpoint",
               checkpoint, "--output", output, "--num-gpus-per-actor", "1", "--cpus-per-actor", "0.25",
               "--max-actors", "2", "--batch-size", "2", "--rows-per-file", "2"]  # fmt: skip
    return subprocess.Popen(command, cwd=REPO, env=job_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_rows(output: str, job: subprocess.Popen, at_least_files: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while len(LabelOutput(output).data_files()) < at_least_files:
        assert job.poll() is None, f"the job ended before {at_least_files} files: {job.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, "no rows committed in time"
        time.sleep(0.5)


def _finish(job: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    try:
        out, _ = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        job.kill()
        out, _ = job.communicate()
        raise AssertionError(f"the job did not finish in {timeout} s: {out[-4000:]}") from None
    return job.returncode, out


def _rows(output: str) -> list[str]:
    table = open_labels(output).to_table(columns=["image_id", "error"])
    assert table["error"].null_count == table.num_rows, table["error"].drop_null().to_pylist()
    return table["image_id"].to_pylist()


@pytest.mark.timeout(400)
def test_labelling_spreads_over_two_gpu_nodes(local_cluster, images_on_s3, s3_bucket, tiny_checkpoint):
    local_cluster.add_gpu_node()
    local_cluster.add_gpu_node()
    output = f"s3://{s3_bucket}/labels"
    code, out = _finish(_label(local_cluster, images_on_s3, output, tiny_checkpoint))
    assert code == 0, out[-4000:]
    ids = _rows(output)
    assert len(ids) == len(set(ids)) == IMAGES


@pytest.mark.timeout(500)
@pytest.mark.parametrize("replaced", [True, False], ids=["replaced", "not-replaced"])
def test_a_gpu_node_lost_mid_run_loses_no_image(local_cluster, images_on_s3, s3_bucket, tiny_checkpoint, replaced):
    local_cluster.add_gpu_node()
    local_cluster.add_gpu_node()
    output = f"s3://{s3_bucket}/labels"
    job = _label(local_cluster, images_on_s3, output, tiny_checkpoint)
    _wait_for_rows(output, job, at_least_files=2)
    local_cluster.remove_gpu_node()
    if replaced:
        time.sleep(5)
        local_cluster.add_gpu_node()
    code, out = _finish(job)
    assert code == 0, out[-4000:]
    ids = _rows(output)
    assert len(ids) == len(set(ids)) == IMAGES


@pytest.mark.timeout(500)
def test_losing_every_gpu_node_stops_in_bounded_time_and_a_rerun_heals(
    local_cluster, images_on_s3, s3_bucket, tiny_checkpoint
):
    local_cluster.add_gpu_node()
    output = f"s3://{s3_bucket}/labels"
    wait = 20
    job = _label(local_cluster, images_on_s3, output, tiny_checkpoint, CATSEG_RESOURCE_WAIT_SECONDS=str(wait))
    _wait_for_rows(output, job, at_least_files=1)
    local_cluster.remove_gpu_node()
    lost_at = time.monotonic()
    code, out = _finish(job, timeout=240)
    stopped_after = time.monotonic() - lost_at
    assert code == 1, out[-4000:]
    # Ray's driver-side log lines come from another thread and may run into ours: find the line by its text
    errors = [line[line.index("error:") :] for line in out.splitlines() if "error: the run into" in line]
    assert len(errors) == 1, out[-4000:]
    assert "no live node could hold a model actor" in errors[0] and "re-running the same command resumes" in errors[0]
    assert "rows committed by this attempt" in errors[0]
    assert "waiting for a node that can hold a model actor" in out  # said while it waited
    assert wait <= stopped_after < wait + 90, stopped_after
    print(f"stopped {stopped_after:.0f} s after the last GPU node was lost (bound: {wait} s)")
    committed = len(_rows(output))
    assert 0 < committed < IMAGES

    local_cluster.add_gpu_node()  # capacity back: the same command labels the rest
    code, out = _finish(_label(local_cluster, images_on_s3, output, tiny_checkpoint))
    assert code == 0, out[-4000:]
    assert f"skipped {committed} already done" in out
    ids = _rows(output)
    assert len(ids) == len(set(ids)) == IMAGES


@pytest.mark.timeout(600)
def test_released_weights_are_fetched_once_per_node_not_per_actor(local_cluster, s3_bucket, tmp_path):
    """Two GPU nodes with two model actors each, each node with its own HF_HOME: at most one download per node."""
    import torch
    from hf_endpoint import HubFileServer, hub_env

    import catseg
    from catseg.convert import catseg_to_official_key

    torch.manual_seed(5)
    state = {catseg_to_official_key(k): v.half() for k, v in catseg.build_model("vit_b16").state_dict().items()}
    state["sem_seg_head.predictor.transformer.layers.0.swin_block.block_2.attn_mask"] = torch.zeros(4, 144, 144)
    weights = tmp_path / "model_base.pth"
    torch.save({"model": state, "iteration": 80000}, weights)
    del state
    space = ("space", "hamacojr/CAT-Seg-weights", "model_base.pth")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(8):
        Image.fromarray(noise_array(40, 56, 3, i)).save(photos / f"p{i}.png")
    with HubFileServer({space: weights}) as server:
        node_env = {k: v for k, v in hub_env(server.url, "unused").items() if k.startswith(("HF_", "NO_PROXY", "no_"))}
        node_env.pop("HF_HOME")  # each node keeps its own cache (LocalCluster sets it)
        local_cluster.add_gpu_node(gpus=2, env=node_env)
        local_cluster.add_gpu_node(gpus=2, env=node_env)
        env = hub_env(server.url, tmp_path / "driver-hf")
        env.update(RAY_ADDRESS=local_cluster.address, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
        command = [sys.executable, "-m", "jobs.label", "--input", str(photos), "--vocab", "road,car", "--model",
                   "vit_b16", "--output", str(tmp_path / "labels"), "--num-gpus-per-actor", "1", "--max-actors", "4",
                   "--cpus-per-actor", "0.25", "--batch-size", "1", "--rows-per-file", "1"]  # fmt: skip
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
        downloads = server.downloads(*space)
    nodes_with_the_file = [
        name for name in ("gpu1", "gpu2") if list((tmp_path / "nodes" / name / "hf").rglob("model_base.pth"))
    ]
    assert 1 <= downloads == len(nodes_with_the_file) <= 2, (downloads, nodes_with_the_file)
    assert len(_rows(str(tmp_path / "labels"))) == 8


@pytest.mark.timeout(500)
def test_evaluation_survives_a_gpu_node_lost_mid_run(local_cluster, s3_endpoint, s3_bucket, tiny_checkpoint):
    """jobs.evaluate over two GPU nodes, one lost once some images are done: every image is still evaluated."""
    import io
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines import storage

    root = f"s3://{s3_bucket}/eval"
    count = 40
    for i in range(count):
        storage.write_bytes(f"{root}/images/{i}.png", encode_image(Image.fromarray(noise_array(64, 80, 3, i)), "PNG"))
        label = (noise_array(64, 80, 1, 100 + i) % 3).astype("uint8")
        storage.write_bytes(f"{root}/labels/{i}.png", encode_image(Image.fromarray(label), "PNG"))
    buffer = io.BytesIO()
    pq.write_table(
        pa.table({"image_uri": [f"images/{i}.png" for i in range(count)],
                  "label_uri": [f"labels/{i}.png" for i in range(count)]}),
        buffer,
    )  # fmt: skip
    storage.write_bytes(f"{root}/val.parquet", buffer.getvalue())
    storage.write_text(f"{root}/classes.txt", "cat\ndog\nsky\n")
    local_cluster.add_gpu_node()
    local_cluster.add_gpu_node()
    env = {**os.environ, "RAY_ADDRESS": local_cluster.address, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}  # fmt: skip
    command = [sys.executable, "-m", "jobs.evaluate", "--benchmark", "manifest", "--data", f"{root}/val.parquet",
               "--classes", f"{root}/classes.txt", "--checkpoint", tiny_checkpoint, "--output", f"{root}/report",
               "--num-gpus-per-actor", "1", "--max-actors", "2", "--cpus-per-actor", "0.25",
               "--batch-size", "1"]  # fmt: skip
    job = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(20)  # model actors loaded and working (no partial output to watch: the report comes at the end)
    assert job.poll() is None, job.stdout.read()[-3000:]  # still running: the node is lost mid-run
    local_cluster.remove_gpu_node()
    code, out = _finish(job)
    assert code == 0, out[-4000:]
    report = json.loads(storage.read_text(f"{root}/report/evaluation_manifest.json"))
    assert report["images"] == {"total": count, "evaluated": count, "failed": 0}, out[-3000:]
