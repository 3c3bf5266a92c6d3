"""The output lease: one attempt at a time, on a local folder and on S3 (moto server), stale leases taken over."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pytest
from labelling_samples import encode_image, noise_array, upload
from PIL import Image

from pipelines.labelling import lease as lease_module
from pipelines.labelling import open_labels
from pipelines.labelling.lease import LeaseHeldError, OutputLease, lease_uri
from pipelines.storage import filesystem

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "s3"])
def output_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "labels")
    request.getfixturevalue("s3_endpoint")
    bucket = f"lease-{time.monotonic_ns()}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/labels"


def _read(uri: str) -> dict:
    fs, path = filesystem(lease_uri(uri))
    return json.loads(fs.cat_file(path))


def test_a_second_attempt_is_refused_naming_the_holder(output_uri, monkeypatch):
    monkeypatch.setattr(lease_module, "STALE_SECONDS", 3.0)  # renewed every 0.6 s: the refusal comes quickly
    with OutputLease(output_uri) as first:
        with pytest.raises(LeaseHeldError) as refused:
            OutputLease(output_uri).acquire()
        message = str(refused.value)
        assert "\n" not in message
        assert f"host {first.holder.host}, pid {first.holder.pid}" in message and "last renewed" in message
        assert _read(output_uri)["token"] == first.holder.token  # the refused attempt changed nothing
    fs, path = filesystem(lease_uri(output_uri))
    assert not fs.exists(path)  # released
    with OutputLease(output_uri):  # and free for the next attempt
        pass


def test_of_attempts_started_together_exactly_one_gets_the_lease(output_uri, monkeypatch):
    monkeypatch.setattr(lease_module, "STALE_SECONDS", 3.0)
    results: list[object] = []
    barrier = threading.Barrier(6)

    def attempt() -> None:
        barrier.wait()
        try:
            results.append(OutputLease(output_uri, interrupt=False).acquire())
        except LeaseHeldError as err:
            results.append(err)

    threads = [threading.Thread(target=attempt) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    holders = [r for r in results if isinstance(r, OutputLease)]
    assert len(holders) == 1 and len(results) == 6
    holders[0].release()


def test_the_lease_is_renewed_while_the_attempt_runs(output_uri, monkeypatch):
    monkeypatch.setattr(lease_module, "STALE_SECONDS", 1.0)
    with OutputLease(output_uri) as held:
        first = _read(output_uri)["renewed_unix"]
        time.sleep(1.5)  # longer than the stale time: renewals keep it fresh
        assert _read(output_uri)["renewed_unix"] > first
        with pytest.raises(LeaseHeldError):
            OutputLease(output_uri).acquire()
        assert not held.lost


def test_an_unrenewed_lease_is_taken_over_once_stale_saying_so(output_uri, monkeypatch, capsys):
    monkeypatch.setattr(lease_module, "STALE_SECONDS", 2.0)
    abandoned = OutputLease(output_uri, interrupt=False).acquire()
    abandoned._stop.set()  # a driver that died (elsewhere: its pid says nothing here): no renewals, no release
    abandoned._thread.join()
    started = time.monotonic()
    with OutputLease(output_uri) as taker:  # waits for the stale time, not longer
        waited = time.monotonic() - started
        assert 1.0 < waited < 2.0 + 1.5, waited
        assert taker.took_over is not None and taker.took_over.token == abandoned.holder.token
        out = capsys.readouterr().out
        assert "is no longer renewed: waiting" in out and "taking over the lease" in out
        abandoned.renew()  # the old attempt, if it wakes up, learns that it lost the lease
        assert abandoned.lost and "taken over" in abandoned.lost
        with pytest.raises(lease_module.LeaseLostError):
            abandoned.check()
    abandoned.release()  # deletes nothing: the lease is not its own


def test_a_killed_attempts_lease_on_this_host_is_taken_over_at_once(tmp_path):
    output = str(tmp_path / "labels")
    script = (
        "import os, sys; from pipelines.labelling.lease import OutputLease; "
        f"OutputLease({output!r}).acquire(); print('held', flush=True); os._exit(9)"  # killed: no release
    )
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "held" in child.stdout, child.stderr
    assert _read(output)["pid"] == int(_read(output)["pid"])  # left behind
    started = time.monotonic()
    with OutputLease(output) as taker:
        assert taker.took_over is not None
    assert time.monotonic() - started < 5  # no stale wait for a process known to be gone


@pytest.mark.timeout(300)
@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_label_jobs_started_together_one_runs_one_is_refused(where, tmp_path, tiny_checkpoint, request):
    """Two `python -m jobs.label` with the same input and output, started at once (a re-submitted job): exactly one
    labels, the other exits 2 with one line naming the holder, and the output has one row per image."""
    files = {f"img{i}.png": encode_image(Image.fromarray(noise_array(40, 48, 3, i)), "PNG") for i in range(6)}
    if where == "local":
        images = tmp_path / "images"
        images.mkdir()
        for name, data in files.items():
            (images / name).write_bytes(data)
        source, output = str(images), str(tmp_path / "labels")
    else:
        endpoint = request.getfixturevalue("s3_endpoint")
        bucket = request.getfixturevalue("s3_bucket")
        upload(boto3.client("s3", endpoint_url=endpoint), bucket, "images", files)
        source, output = f"s3://{bucket}/images/", f"s3://{bucket}/labels"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    env["CATSEG_LEASE_STALE_SECONDS"] = "10"  # renewed every 2 s: the refused attempt sees a live holder quickly
    command = [sys.executable, "-m", "jobs.label", "--input", source, "--vocab", "cat,dog", "--checkpoint",
               tiny_checkpoint, "--output", output, "--cpus-per-actor", "0.5"]  # fmt: skip
    jobs = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]  # fmt: skip
    results = [(job.wait(timeout=240), *job.communicate()) for job in jobs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    _, _, refused = next(r for r in results if r[0] == 2)
    lines = [line for line in refused.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "another attempt" in lines[0], refused
    assert "host " in lines[0] and "last renewed" in lines[0]
    table = open_labels(output).to_table(columns=["image_id", "error"])
    ids = table["image_id"].to_pylist()
    assert len(ids) == len(set(ids)) == len(files)
    assert table["error"].null_count == len(files)
    fs, path = filesystem(lease_uri(output))
    fs.invalidate_cache()
    assert not fs.exists(path)  # released by the attempt that held it
