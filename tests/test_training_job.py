"""The jobs.finetune entry point in its own process (embedded Ray): killed after a checkpoint, re-run, resumed."""

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
from synthetic_data import write_manifest

import catseg
from pipelines.training.checkpoints import resume_point

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 12
CHECKPOINT_EVERY = 2


def _job_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "PATH", "HOME", "LANG"))}
    env.update(HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)  # the job must start its own embedded Ray, not join the tests' cluster
    return env


def _kill_group(pgid: int) -> None:
    """SIGKILL the job and every Ray process it started (they share its process group)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def _settled_resume_point(storage: str, run_name: str, quiet: float = 5.0, timeout: float = 60.0):
    """``resume_point`` once it has not changed for ``quiet`` seconds."""
    last, changed_at, deadline = resume_point(storage, run_name), time.monotonic(), time.monotonic() + timeout
    while time.monotonic() - changed_at < quiet and time.monotonic() < deadline:
        time.sleep(0.5)
        now = resume_point(storage, run_name)
        if now != last:
            last, changed_at = now, time.monotonic()
    return last


def _command(manifest: str, classes: str, storage: str) -> list[str]:
    return [
        sys.executable, "-m", "jobs.finetune", "--data", manifest, "--layout", "manifest", "--classes", classes,
        "--model", "tiny",
        "--storage", storage, "--run-name", "resumable", "--num-workers", "2", "--cpus-per-worker", "0.5",
        "--max-steps", str(MAX_STEPS), "--batch-size-per-worker", "1", "--crop-size", "64",
        "--checkpoint-every", str(CHECKPOINT_EVERY), "--log-every", "2", "--eval-every", "0", "--lr", "1e-3",
    ]  # fmt: skip


def test_killed_job_resumes_from_its_last_checkpoint(s3_endpoint, s3_bucket, tmp_path):
    # 3 classes: the tiny model on ADE20K's 150 or COCO-Stuff's 171 takes seconds per step on this CPU, and the
    # layouts differ only in how pairs are listed (tests/test_training_datasets.py), not in what the job does with them.
    storage = f"s3://{s3_bucket}/runs"
    manifest, classes = write_manifest(f"s3://{s3_bucket}/data", {"train": 6}, fmt="csv", seed=2)
    command = _command(manifest, classes, storage)

    log = open(tmp_path / "first.log", "w")  # noqa: SIM115 (closed below, after the process is gone)
    first = subprocess.Popen(
        command, cwd=REPO, env=_job_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and resume_point(storage, "resumable") is None and first.poll() is None:
            time.sleep(0.5)
    finally:
        _kill_group(first.pid)
        first.wait()
        log.close()
    # read after the kill, once settled: a checkpoint upload in flight can still commit after the job's process
    # group is gone (CI once saw step 2 here and the second run resume from step 4)
    saved = _settled_resume_point(storage, "resumable")
    assert saved, "the first run wrote no checkpoint before the deadline:\n" + (tmp_path / "first.log").read_text()
    last_saved_step = saved[0]
    assert last_saved_step < MAX_STEPS, "the first run finished before it could be killed"

    second = subprocess.run(command, cwd=REPO, env=_job_env(), capture_output=True, text=True, timeout=400)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-4000:]
    assert f"resuming from step {last_saved_step}:" in output
    match = re.search(r"done: step (\d+) \(resumed from step (\d+)\)", output)
    assert match, output[-4000:]
    assert int(match.group(1)) == MAX_STEPS
    assert int(match.group(2)) == last_saved_step
    final = re.search(r"final checkpoint: (\S+)", output).group(1)
    assert final == f"{storage}/resumable/step_{MAX_STEPS:08d}/model"
    model = catseg.load_model(final)
    assert model.config.name == "tiny"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--layout", "pascal"], "unknown dataset layout 'pascal'"),
        (["--layout", "manifest"], "needs a class-names file"),
    ],
)
def test_job_refuses_bad_input_before_starting_ray(flags, message, tmp_path):
    command = [sys.executable, "-m", "jobs.finetune", "--data", str(tmp_path), "--model", "tiny"]
    command += ["--storage", str(tmp_path / "runs"), "--run-name", "x", "--max-steps", "1", *flags]
    result = subprocess.run(command, cwd=REPO, env=_job_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr
