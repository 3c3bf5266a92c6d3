"""Class-chunked execution and vocabularies beyond 256 classes (exact mode, no top-256 truncation)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import catseg


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(7)
    return torch.rand(2, 3, 384, 384) * 255


@pytest.mark.parametrize("chunk", [1, 2, 4])
def test_chunked_equals_unchunked_for_small_vocabularies(tiny_model, images, chunk):
    names = ["cat", "dog", "sky", "road", "tree"]
    with torch.no_grad():
        whole = tiny_model(images, names)
        chunked = tiny_model(images, names, class_chunk=chunk)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)


def test_chunked_equals_unchunked_in_training_mode(tiny_model, images):
    names = ["cat", "dog", "sky"]
    tiny_model.train()
    try:
        with torch.no_grad():
            whole, chunked = tiny_model(images, names), tiny_model(images, names, class_chunk=2)
    finally:
        tiny_model.eval()
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)


def test_300_classes_without_truncation_chunked_equals_unchunked(tiny_model, images):
    names = [f"object {i}" for i in range(300)]
    with torch.no_grad():
        text = tiny_model.embed_classes(names)
        whole = tiny_model(images[:1], text, truncate=False)
        chunked = tiny_model(images[:1], text, truncate=False, class_chunk=64)
    assert (whole > -100).all()  # every class kept
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)


def test_300_classes_chunked_with_truncation_equals_unchunked(tiny_model, images):
    names = [f"object {i}" for i in range(300)]
    with torch.no_grad():
        text = tiny_model.embed_classes(names)
        torch.testing.assert_close(
            tiny_model(images, text, class_chunk=100), tiny_model(images, text), atol=1e-5, rtol=1e-5
        )


def test_predictor_outputs_do_not_depend_on_the_chunk_size(tiny_model):
    photo = np.random.default_rng(1).integers(0, 256, size=(90, 120, 3), dtype=np.uint8)
    names = ["a", "b", "c", "d", "e", "f", "g"]
    small = catseg.Predictor(tiny_model, device="cpu", class_chunk=2, views_per_forward=2).predict(photo, names)
    large = catseg.Predictor(tiny_model, device="cpu", class_chunk=64).predict(photo, names)
    np.testing.assert_allclose(small, large, atol=1e-5)


PEAK_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, time
    import torch, catseg
    torch.manual_seed(0)
    model = catseg.build_model("tiny").eval()
    names = [f"product {i}" for i in range(int(sys.argv[1]))]
    image = torch.rand(1, 3, 384, 384) * 255
    with torch.inference_mode():
        text = model.embed_classes(names)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        logits = model(image, text, truncate=False, class_chunk=32)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mib": peak / 1024, "growth_mib": (peak - before) / 1024,
                      "seconds": time.perf_counter() - start, "shape": list(logits.shape),
                      "kept": int((logits > -100).all(dim=-1).all(dim=-1).sum())}))
    """
)

# Without chunking, one activation of the tiny decoder over 2000 class maps (2000 x 32 x 96 x 96 floats) is
# 2.4 GB; chunked, the aggregated volume (2000 x 32 x 24 x 24 floats, 150 MB) and the logits (75 MB) are the
# largest things alive. Measured growth: about 550 MiB (allocator slack included).
MEMORY_GROWTH_BOUND_MIB = 1000


def test_2000_classes_run_on_cpu_within_a_memory_bound():
    result = subprocess.run(
        [sys.executable, "-c", PEAK_MEMORY_SCRIPT, "2000"], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    assert stats["shape"] == [1, 2000, 96, 96]
    assert stats["kept"] == 2000  # no class truncated away
    assert stats["growth_mib"] < MEMORY_GROWTH_BOUND_MIB, stats
