"""A model worker that dies (killed for memory, a crash) costs the rows it was labelling, not the job."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from labelling_samples import noise_array
from PIL import Image
from worker_crash_hook import CRASH_COLOUR

from pipelines.output import parquet_files

REPO = Path(__file__).resolve().parents[1]

# The job, on a local Ray whose workers all run the crash hook (a runtime_env applies to every worker of the job).
JOB_WITH_HOOK = """
import sys
import ray
ray.init(num_cpus=2, runtime_env={"worker_process_setup_hook": "worker_crash_hook.install"})
from jobs.label import main
sys.exit(main(sys.argv[1:]))
"""


def test_an_image_that_kills_its_worker_becomes_an_error_row_and_the_rest_is_labelled(tiny_checkpoint, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(7):
        Image.fromarray(noise_array(40 + i, 52, 3, i)).save(images / f"good{i}.png")
    Image.fromarray(np.full((48, 48, 3), CRASH_COLOUR, dtype=np.uint8)).save(images / "killer.png")
    output = tmp_path / "labels"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO), env.get("PYTHONPATH", "")]),
    )  # fmt: skip
    command = [sys.executable, "-c", JOB_WITH_HOOK, "--input", str(images), "--vocab", "cat,dog,sky",
               "--checkpoint", tiny_checkpoint, "--output", str(output), "--batch-size", "4"]  # fmt: skip
    started = time.monotonic()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - started
    log = (result.stdout + result.stderr)[-5000:]
    assert result.returncode == 1, log  # finished; a re-run (with more memory) could still label one image
    rows = pq.read_table(parquet_files(str(output))).to_pylist()
    assert sorted(Path(row["source_uri"]).name for row in rows) == sorted(p.name for p in images.iterdir()), log
    by_name = {Path(row["source_uri"]).name: row for row in rows}
    killer = by_name.pop("killer.png")
    assert killer["mask_png"] is None and killer["error_kind"] == "transient"
    assert "model worker died 3 times" in killer["error"], killer["error"]
    assert all(row["error"] is None and row["mask_png"] for row in by_name.values()), log
    print(f"worker-death run: {seconds:.0f} s")
