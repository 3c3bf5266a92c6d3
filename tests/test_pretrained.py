"""Released weights by name, fetched from a loopback server that behaves like the Hugging Face file endpoint.

The server holds an official-layout ViT-B/16 checkpoint (random weights) only under the Space
``spaces/hamacojr/CAT-Seg-weights``, as the real Hub does; a request for a model repo of that name gets 404
RepoNotFound. huggingface_hub reads HF_ENDPOINT / HF_HOME at import, so every check runs in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from hf_endpoint import HubFileServer, hub_env
from PIL import Image

import catseg
from catseg.convert import catseg_to_official_key

REPO = Path(__file__).resolve().parents[1]
SPACE = ("space", "hamacojr/CAT-Seg-weights", "model_base.pth")


@pytest.fixture(scope="module")
def official_base(tmp_path_factory) -> Path:
    """A ViT-B/16 checkpoint in the official detectron2 layout (float16 to halve the file; the converter casts)."""
    torch.manual_seed(5)
    model = catseg.build_model("vit_b16")
    state = {catseg_to_official_key(k): v.half() for k, v in model.state_dict().items()}
    state["sem_seg_head.predictor.transformer.layers.0.swin_block.block_2.attn_mask"] = torch.zeros(4, 144, 144)
    path = tmp_path_factory.mktemp("official") / "model_base.pth"
    torch.save({"model": state, "iteration": 80000}, path)
    return path


def _run(code: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


LOAD_AND_COMPARE = """
import json, sys, torch, catseg
by_name = catseg.load_model("vit_b16")
direct = catseg.load_model(sys.argv[1] if len(sys.argv) > 1 else {path!r})
torch.manual_seed(0)
images = torch.rand(1, 3, 96, 128) * 255
with torch.no_grad():
    a, b = by_name(images, ["road", "car", "tree"]), direct(images, ["road", "car", "tree"])
print(json.dumps({{"arch": by_name.config.name, "max_diff": (a - b).abs().max().item(), "shape": list(a.shape)}}))
"""


def test_load_model_by_name_fetches_the_space_file_once_then_uses_the_cache(official_base, tmp_path):
    hf_home = tmp_path / "hf"
    with HubFileServer({SPACE: official_base}) as server:
        result = _run(LOAD_AND_COMPARE.format(path=str(official_base)), hub_env(server.url, hf_home))
        assert result.returncode == 0, result.stderr[-3000:]
        first = json.loads(result.stdout.strip().splitlines()[-1])
        assert first == {"arch": "vit_b16", "max_diff": 0.0, "shape": [1, 3, 96, 96]}
        assert server.downloads(*SPACE) == 1
        resolved = {path for _, path in server.requests if "/resolve/" in path}  # not the LFS "CDN" hop
        assert resolved == {"/spaces/hamacojr/CAT-Seg-weights/resolve/main/model_base.pth"}

        listing = _run(
            "import catseg, json; print(json.dumps([(w.name, w.uri, w.size_mb) for w in catseg.list_pretrained()]))",
            hub_env(server.url, hf_home),
        )
        names = [row[:2] for row in json.loads(listing.stdout)]
        assert names == [
            ["vit_b16", "hf://spaces/hamacojr/CAT-Seg-weights/model_base.pth"],
            ["vit_l14", "hf://spaces/hamacojr/CAT-Seg-weights/model_large.pth"],
        ]
    # server gone: the cached file serves the same weights, without any request
    again = _run(LOAD_AND_COMPARE.format(path=str(official_base)), hub_env(server.url, hf_home), timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["max_diff"] == 0.0


def test_unreachable_and_uncached_weights_fail_in_one_line_naming_the_file(tmp_path):
    env = {**hub_env("http://127.0.0.1:9", tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    result = _run("import catseg; catseg.load_model('vit_l14')", env, timeout=120)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "PretrainedUnavailableError" in last and "hf://spaces/hamacojr/CAT-Seg-weights/model_large.pth" in last
    assert "--checkpoint PATH" in last


def test_an_unreachable_hub_fails_at_once_instead_of_retrying(tmp_path):
    closed = HubFileServer({})  # a free port with nothing listening once stopped
    closed.start()
    closed.stop()
    started = time.monotonic()
    result = _run("import catseg; catseg.load_model('vit_b16')", hub_env(closed.url, tmp_path / "hf"), timeout=120)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0 and "the Hub endpoint is unreachable" in last and "--checkpoint PATH" in last
    assert "Retrying" not in result.stderr  # huggingface_hub's own retries would take about 25 s
    assert time.monotonic() - started < 20


def test_label_job_by_model_name_through_the_endpoint(official_base, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(photos / f"p{i}.jpg")
    output = tmp_path / "labels"
    env = hub_env(os.environ.get("HF_ENDPOINT", "http://127.0.0.1:9"), tmp_path / "hf")
    env.pop("RAY_ADDRESS", None)
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "jobs.label", "--input", str(photos), "--vocab", "road,car"]
    command += ["--model", "vit_b16", "--output", str(output)]
    with HubFileServer({SPACE: official_base}) as server:
        env["HF_ENDPOINT"] = server.url
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
        assert server.downloads(*SPACE) == 1  # the driver only asked (HEAD); the model actor downloaded once
    table = pq.read_table(output / "data")
    assert table.num_rows == 2 and table["error"].null_count == 2
    assert set(table["model_id"].to_pylist()) == {"vit_b16@hf://spaces/hamacojr/CAT-Seg-weights/model_base.pth"}
