"""`ray job submit` of a labelling run to a real, separately started local Ray head (CLI only).

The cluster is its own: a head started with `ray start` on free ports and its own temp dir, so it does not touch the
session's in-process `ray_cluster`. It is torn down by killing exactly its processes (found by that temp dir), not
with `ray stop`, which kills every Ray process of the machine: the session cluster and other users' clusters too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import boto3
import pytest
from conftest import S3_ENV_VARIABLES  # the variables the s3_endpoint fixture sets
from labelling_samples import encode_image, noise_array, upload
from PIL import Image

from pipelines.labelling import LabelOutput, open_labels

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # the head runs from this venv, so job drivers find its packages
RAY = str(VENV_BIN / "ray")
SUBMIT_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster_env() -> dict[str, str]:
    """What the head, and so every job driver and worker it starts, sees: the moto S3 endpoint, no auth, no hub."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(
        {
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
            "HF_HUB_OFFLINE": "1",
            "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # `python` in the entrypoint is the venv's
        }
    )
    missing = [k for k in S3_ENV_VARIABLES if k not in env]
    assert not missing, f"the s3_endpoint fixture should have set {missing}"
    return env


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process we can see, from /proc (Linux)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):  # exited while we looked
            continue
        table[int(entry.name)] = (parent, cmdline)
    return table


def _cluster_pids(temp_dir: str) -> set[int]:
    """The cluster's processes (each Ray process names its temp/session dir) and all their descendants."""
    table = _process_table()
    pids = {pid for pid, (_, cmdline) in table.items() if temp_dir in cmdline and pid != os.getpid()}
    grew = True
    while grew:
        children = {pid for pid, (parent, _) in table.items() if parent in pids} - pids
        pids |= children
        grew = bool(children)
    return pids


def _running(pid: int) -> bool:
    """Still running: present and not a zombie (orphans wait for init to reap them, which may take a while)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _signal(pids: set[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.kill(pid, signum)


def _stop_cluster(temp_dir: str) -> None:
    pids = _cluster_pids(temp_dir)
    _signal(pids, signal.SIGTERM)
    deadline = time.monotonic() + 5  # a throwaway cluster: no state worth a long graceful shutdown
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    _signal({pid for pid in pids | _cluster_pids(temp_dir) if _running(pid)}, signal.SIGKILL)


def _wait_for_dashboard(url: str, temp_dir: str, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    logs = Path(temp_dir, "session_latest", "logs", "dashboard.log")
    tail = logs.read_text(errors="replace")[-3000:] if logs.exists() else "(no dashboard.log)"
    pytest.fail(f"the Ray dashboard at {url} did not answer within {timeout_s} s; dashboard.log ends:\n{tail}")


@pytest.fixture
def ray_head(s3_endpoint):
    """A Ray head with the dashboard (the job API) on free ports; yields the dashboard URL."""
    # Short path: Ray's unix sockets live under it, and socket paths are limited to ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="rs-", dir="/tmp")
    dashboard_port = _free_port()
    command = [
        RAY,
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={_free_port()}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        # Fixed defaults (10001, 52365) would collide with any other Ray on this machine.
        f"--ray-client-server-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
        "--num-cpus=2",
        "--num-gpus=0",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    try:
        started = subprocess.run(command, env=_cluster_env(), capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, f"ray start failed:\n{started.stdout[-3000:]}\n{started.stderr[-3000:]}"
        url = f"http://127.0.0.1:{dashboard_port}"
        _wait_for_dashboard(url, temp_dir)
        yield url
    finally:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_labelling_job_submitted_to_a_cluster_writes_one_row_per_image(ray_head, s3_bucket, tiny_checkpoint):
    client = boto3.client("s3")
    images = {f"img{i}.png": encode_image(Image.fromarray(noise_array(40, 48, 3, i)), "PNG") for i in range(2)}
    upload(client, s3_bucket, "images", images)
    # The checkpoint goes to the bucket as on a real cluster, where nodes do not share the submitter's disk.
    checkpoint = Path(tiny_checkpoint)
    files = {str(path.relative_to(checkpoint)): path.read_bytes() for path in checkpoint.rglob("*") if path.is_file()}
    upload(client, s3_bucket, "models/tiny", files)
    output = f"s3://{s3_bucket}/labels"

    submission_id = f"label-{s3_bucket}"
    runtime_env = {"excludes": [".venv", ".git", "**/__pycache__"]}
    submit = [
        RAY,
        "job",
        "submit",
        "--address",
        ray_head,
        "--submission-id",
        submission_id,
        "--working-dir",
        str(REPO_ROOT),
        "--runtime-env-json",
        json.dumps(runtime_env),
        "--",
        "python",
        "-m",
        "jobs.label",
        "--input",
        f"s3://{s3_bucket}/images/",
        "--vocab",
        "a,b",
        "--checkpoint",
        f"s3://{s3_bucket}/models/tiny",
        "--output",
        output,
        "--batch-size",
        "2",
    ]
    # `ray job submit` follows the job's logs and exits 0 only when the job SUCCEEDED.
    result = subprocess.run(submit, env=_cluster_env(), capture_output=True, text=True, timeout=SUBMIT_TIMEOUT_S)
    logs = f"{result.stdout[-4000:]}\n{result.stderr[-2000:]}"
    assert result.returncode == 0, f"job did not succeed:\n{logs}"
    with urllib.request.urlopen(f"{ray_head}/api/jobs/{submission_id}", timeout=10) as response:
        assert json.load(response)["status"] == "SUCCEEDED", logs

    table = open_labels(output).to_table(columns=["source_uri", "error", "mask_png"])
    assert sorted(table["source_uri"].to_pylist()) == sorted(f"s3://{s3_bucket}/images/{name}" for name in images)
    assert table["error"].null_count == len(images) and table["mask_png"].null_count == 0
    assert LabelOutput(output).read_manifest()["vocabulary"]["names"] == ["a", "b"]
