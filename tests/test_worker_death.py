"""A model worker that dies (killed for memory, a crash) costs the rows it was labelling, not the job; the same for
the images it was evaluating."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from labelling_samples import noise_array
from PIL import Image
from worker_crash_hook import CRASH_COLOUR

from pipelines.labelling import LabelOutput

REPO = Path(__file__).resolve().parents[1]

# A job, on a local Ray whose workers all run the crash hook (a runtime_env applies to every worker of the job).
# address="local": a new Ray of its own even while another Ray runs on this machine (ray.init would join that one).
JOB_WITH_HOOK = """
import sys
import ray
ray.init(address="local", num_cpus=2, runtime_env={"worker_process_setup_hook": "worker_crash_hook.install"})
from jobs.{job} import main
sys.exit(main(sys.argv[1:]))
"""


def run_job_with_hook(job: str, args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO), env.get("PYTHONPATH", "")]),
    )  # fmt: skip
    command = [sys.executable, "-c", JOB_WITH_HOOK.replace("{job}", job), *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_an_image_that_kills_its_worker_becomes_an_error_row_and_the_rest_is_labelled(tiny_checkpoint, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(7):
        Image.fromarray(noise_array(40 + i, 52, 3, i)).save(images / f"good{i}.png")
    Image.fromarray(np.full((48, 48, 3), CRASH_COLOUR, dtype=np.uint8)).save(images / "killer.png")
    output = tmp_path / "labels"
    started = time.monotonic()
    result = run_job_with_hook("label", ["--input", str(images), "--vocab", "cat,dog,sky", "--checkpoint",
                                         tiny_checkpoint, "--output", str(output), "--batch-size", "4"])  # fmt: skip
    seconds = time.monotonic() - started
    log = (result.stdout + result.stderr)[-5000:]
    assert result.returncode == 1, log  # finished; a re-run (with more memory) could still label one image
    rows = pq.read_table(LabelOutput(str(output)).committed_files()).to_pylist()
    assert sorted(Path(row["source_uri"]).name for row in rows) == sorted(p.name for p in images.iterdir()), log
    by_name = {Path(row["source_uri"]).name: row for row in rows}
    killer = by_name.pop("killer.png")
    assert killer["mask_png"] is None and killer["error_kind"] == "transient"
    assert "model worker died 3 times" in killer["error"], killer["error"]
    assert all(row["error"] is None and row["mask_png"] for row in by_name.values()), log
    print(f"worker-death run: {seconds:.0f} s")


def test_an_image_that_kills_its_worker_is_a_failed_image_in_the_evaluation_report(tiny_checkpoint, tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "labels").mkdir()
    names = [f"good{i}" for i in range(3)] + ["killer"]
    for i, name in enumerate(names):
        image = np.full((40, 48, 3), CRASH_COLOUR, np.uint8) if name == "killer" else noise_array(40, 48, 3, i)
        Image.fromarray(image).save(data / "images" / f"{name}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 3, (40, 48), dtype=np.uint8)).save(
            data / "labels" / f"{name}.png"
        )
    # the killer in the first batch of two, beside a good image that must still be evaluated
    order = ["good0", "killer", "good1", "good2"]
    pq.write_table(
        pa.table({"image_uri": [f"images/{n}.png" for n in order], "label_uri": [f"labels/{n}.png" for n in order]}),
        data / "val.parquet",
    )
    (data / "classes.txt").write_text("cat\ndog\nsky\n")
    output = tmp_path / "report"
    started = time.monotonic()
    result = run_job_with_hook("evaluate", ["--data", str(data / "val.parquet"), "--benchmark", "manifest",
                                            "--classes", str(data / "classes.txt"), "--checkpoint", tiny_checkpoint,
                                            "--output", str(output), "--batch-size", "2"])  # fmt: skip
    seconds = time.monotonic() - started
    log = (result.stdout + result.stderr)[-5000:]
    assert result.returncode == 0, log  # finished, as with any failed image; the report and the log say which
    report = json.loads((output / "evaluation_manifest.json").read_text())
    assert report["images"] == {"total": 4, "evaluated": 3, "failed": 1}, log
    [error] = report["errors"]
    assert Path(error["image_uri"]).name == "killer.png"
    assert "model worker died 3 times" in error["error"] and "to evaluate" in error["error"], error["error"]
    assert "images FAILED" in result.stdout and "killer.png: model: the model worker died 3 times" in result.stderr
    assert report["labelled_pixels"] == 3 * 40 * 48  # the three good images, every pixel labelled
    print(f"evaluation worker-death run: {seconds:.0f} s")
