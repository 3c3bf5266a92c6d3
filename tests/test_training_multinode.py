"""Fine-tuning on a multi-node Ray cluster (``ray.cluster_utils.Cluster``: a head and worker nodes on this machine)
that loses a node: the run resumes from the last checkpoint Ray Train recorded and finishes; one that loses every
worker node stops in bounded time (CATSEG_RESOURCE_WAIT_SECONDS through Ray Train's controller_failure_limit).

Two CPU training workers (logical GPUs cannot run NCCL), one per worker node: a worker node has 2 CPUs and a worker
takes 1.5, so neither the head (1 CPU: the data pipeline's tasks) nor a node that already holds a worker can take a
second one. Data and checkpoints live on the moto S3 server. The job runs as users run it: ``python -m
jobs.finetune`` with RAY_ADDRESS pointing at the cluster.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from local_cluster import LocalCluster
from synthetic_data import write_manifest

import catseg
from pipelines.training.checkpoints import list_checkpoints, resume_point

REPO = Path(__file__).resolve().parents[1]
RUN = "multinode"
MAX_STEPS = 16
CHECKPOINT_EVERY = 2
NODE_CPUS = 2  # per worker node: one training worker (WORKER_CPUS) and nothing else that needs a whole CPU
WORKER_CPUS = 1.5
# a line Ray's log monitor forwards from an actor, worker or raylet: "(Name pid=123) ..." or "(raylet) ...", in colour
FORWARDED_LINE = re.compile(r"^(\x1b\[[0-9;]*m)?\((raylet|[\w.]+ pid=\d+)[^)]*\)")


@pytest.fixture
def training_data(s3_endpoint, s3_bucket) -> tuple[str, str]:
    # 3 classes, 6 pairs: 3 steps an epoch at 2 workers x 1 image (tests/test_training_job.py uses the same)
    return write_manifest(f"s3://{s3_bucket}/data", {"train": 6}, fmt="csv", seed=2)


def _finetune(cluster: LocalCluster, data: tuple[str, str], storage: str, log: Path, **env: str) -> subprocess.Popen:
    manifest, classes = data
    job_env = {**os.environ, "RAY_ADDRESS": cluster.address, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
               "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", **env}  # fmt: skip
    command = [
        sys.executable, "-m", "jobs.finetune", "--data", manifest, "--layout", "manifest", "--classes", classes,
        "--model", "tiny", "--storage", storage, "--run-name", RUN,
        "--num-workers", "2", "--cpus-per-worker", str(WORKER_CPUS),
        "--max-steps", str(MAX_STEPS), "--batch-size-per-worker", "1", "--crop-size", "64",
        "--checkpoint-every", str(CHECKPOINT_EVERY), "--log-every", "2", "--eval-every", "0", "--lr", "1e-3",
    ]  # fmt: skip
    with open(log, "w") as out:  # a file, not a pipe: nobody reads it while the test polls storage
        return subprocess.Popen(
            command, cwd=REPO, env=job_env, stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )


def _finish(job: subprocess.Popen, log: Path, timeout: float) -> tuple[int, str]:
    try:
        job.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(job)
        raise AssertionError(f"the job did not finish in {timeout:g} s:\n{log.read_text()[-4000:]}") from None
    return job.returncode, log.read_text()


def _kill(job: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(job.pid, signal.SIGKILL)
    job.wait()


def _wait_for_recorded_checkpoint(storage: str, job: subprocess.Popen, log: Path, timeout: float = 240) -> int:
    """The step of the first checkpoint that Ray Train has recorded (its checkpoint manager snapshot on storage
    names it: what a restart resumes from), not merely one whose files have landed."""
    deadline = time.monotonic() + timeout
    while (point := resume_point(storage, RUN)) is None:
        assert job.poll() is None, f"the job ended before a checkpoint was recorded:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no checkpoint recorded in {timeout:g} s:\n{log.read_text()[-4000:]}"
        time.sleep(0.2)
    return point[0]


def _start_on_two_nodes(local_cluster, training_data, s3_bucket: str, tmp_path: Path, **env: str):
    """Two worker nodes (one training worker each), then the job: (job, storage URI, log path)."""
    local_cluster.add_gpu_node(gpus=0, cpus=NODE_CPUS)
    local_cluster.add_gpu_node(gpus=0, cpus=NODE_CPUS)
    storage = f"s3://{s3_bucket}/runs"
    log = tmp_path / "finetune.log"
    return _finetune(local_cluster, training_data, storage, log, **env), storage, log


@pytest.mark.timeout(600)
def test_a_node_lost_after_a_recorded_checkpoint_resumes_from_it(local_cluster, training_data, s3_bucket, tmp_path):
    started = time.monotonic()
    job, storage, log = _start_on_two_nodes(local_cluster, training_data, s3_bucket, tmp_path)
    try:
        recorded = _wait_for_recorded_checkpoint(storage, job, log)
        assert 0 < recorded < MAX_STEPS, f"recorded step {recorded}: the run finished before a node could be lost"
        local_cluster.remove_gpu_node(0)  # one training worker's node, without a drain
        lost_at = time.monotonic()
        time.sleep(5)
        local_cluster.add_gpu_node(gpus=0, cpus=NODE_CPUS)
        code, out = _finish(job, log, timeout=420)
    finally:
        if job.poll() is None:
            _kill(job)
    assert code == 0, out[-4000:]
    match = re.search(r"done: step (\d+) \(resumed from step (\d+)\)", out)
    assert match, out[-4000:]
    print(
        f"checkpoint recorded at step {recorded} after {lost_at - started:.0f} s; node lost; finished "
        f"{time.monotonic() - lost_at:.0f} s later, resumed from step {match.group(2)}"
    )
    assert int(match.group(1)) == MAX_STEPS
    resumed = int(match.group(2))
    # the run resumed from the checkpoint recorded before the loss, or a later one recorded before the node died
    assert recorded <= resumed < MAX_STEPS, (recorded, resumed, out[-4000:])
    assert resumed % CHECKPOINT_EVERY == 0
    final = re.search(r"final checkpoint: (\S+)", out).group(1)
    assert final == f"{storage}/{RUN}/step_{MAX_STEPS:08d}/model"
    assert resume_point(storage, RUN) == (MAX_STEPS, f"{storage}/{RUN}/step_{MAX_STEPS:08d}")
    assert list_checkpoints(storage, RUN)[-1][0] == MAX_STEPS
    assert catseg.load_model(final).config.name == "tiny"


@pytest.mark.timeout(600)
def test_losing_every_worker_node_stops_in_bounded_time(local_cluster, training_data, s3_bucket, tmp_path):
    wait, start_timeout = 30, 10
    job, storage, log = _start_on_two_nodes(
        local_cluster, training_data, s3_bucket, tmp_path,
        CATSEG_RESOURCE_WAIT_SECONDS=str(wait), RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S=str(start_timeout),
    )  # fmt: skip
    try:
        recorded = _wait_for_recorded_checkpoint(storage, job, log)
        assert recorded < MAX_STEPS, f"recorded step {recorded}: the run finished before its nodes could be lost"
        local_cluster.remove_gpu_node(0)
        local_cluster.remove_gpu_node(0)
        lost_at = time.monotonic()
        code, out = _finish(job, log, timeout=300)
        stopped_after = time.monotonic() - lost_at
    finally:
        if job.poll() is None:
            _kill(job)
    print(f"stopped {stopped_after:.0f} s after the last worker node was lost (bound: {wait} s)")
    assert code == 1, out[-4000:]  # jobs.finetune's code for a run that failed (2: refused before starting)
    # Ray's driver-side log lines come from another thread and may run into ours: find the line by its text.
    # Lines Ray forwards from its actors and raylets ("(TrainController pid=..)", "(raylet)") arrive in any order
    # and say what Ray says; only the job's own lines are checked.
    own = [line for line in out.splitlines() if not FORWARDED_LINE.match(line)]
    errors = [line[line.index("error:") :] for line in own if "error: training failed" in line]
    assert len(errors) == 1, out[-4000:]
    assert errors[0].startswith("error: training failed:"), errors[0]
    assert "CATSEG_RESOURCE_WAIT_SECONDS" in errors[0] and "re-running the same command resumes" in errors[0]
    after = own[next(i for i, line in enumerate(own) if errors[0] in line) + 1 :]
    # Ray's multi-line reason is folded into that line, not continued below it
    assert not any("worker group startup timed out" in line.lower() for line in after), out[-3000:]
    assert wait <= stopped_after < wait + 90, stopped_after
    assert "done:" not in out
    assert resume_point(storage, RUN)[0] >= recorded  # what was recorded stays: a re-run resumes from it
