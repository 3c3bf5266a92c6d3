"""catseg.allocator: freed memory stays in glibc's heap for the next forward, unless the environment decides."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

# Page faults of a step that allocates three 64 MiB tensors and frees them, as a forward pass does with its
# activations. glibc unmaps blocks that large on free by default, so every step faults 3 x 16,384 pages in again;
# with freed memory retained the heap settles within a few steps and the last steps fault nothing in.
SCRIPT = """
import resource, sys, torch
import catseg
from catseg import allocator

def faults_of_a_step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(16 << 20)
    y = x * 2
    z = x + y
    del x, y, z
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

if sys.argv[1] == "function":
    applied = allocator.retain_freed_memory()
elif sys.argv[1] == "predictor":
    torch.manual_seed(0)
    catseg.Predictor(catseg.build_model("tiny"), device="cpu")
    applied = allocator.retain_freed_memory()  # idempotent: says whether the Predictor's call took effect
else:
    applied = False
steps = [faults_of_a_step() for _ in range(10)]
print(applied, sum(steps[-3:]))
"""
PAGES = (64 << 20) // 4096


def _huge_pages_always() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


def _run(mode: str, **env: str) -> tuple[bool, int]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], env={**environment, **env}, capture_output=True, text=True, check=True
    )
    applied, faults = out.stdout.split()[-2:]
    return applied == "True", int(faults)


def test_retained_memory_is_reused_without_page_faults():
    applied, faults = _run("function")
    assert applied
    assert faults < PAGES, faults  # glibc's defaults: 9 x PAGES
    if not _huge_pages_always():  # with transparent huge pages a fault maps 2 MiB, not 4 KiB
        assert _run("defaults")[1] > 4 * PAGES


def test_a_cpu_predictor_retains_freed_memory_by_default():
    applied, faults = _run("predictor")
    assert applied
    assert faults < PAGES, faults


def test_the_environment_keeps_its_own_malloc_settings():
    applied, _ = _run("function", MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    assert not applied
