"""catseg.allocator: inside a model call freed memory stays in glibc's heap for the next one; outside, and where
the environment decides, malloc behaves as before."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

# Page faults of steps that allocate three 64 MiB tensors and free them, as a forward pass does with its
# activations. glibc unmaps blocks that large on free by default, so every step faults 3 x 16,384 pages in again;
# with freed memory retained the heap settles within a few steps and the last ones fault nothing in.
SCRIPT = """
import contextlib, resource, sys, torch
import catseg
from catseg import allocator

def faults_of_steps(context):
    def step():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        with context():
            x = torch.ones(16 << 20)
            y = x * 2
            z = x + y
            del x, y, z
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return sum([step() for _ in range(10)][-3:])

before = faults_of_steps(contextlib.nullcontext)  # glibc's behaviour, before anything was retained
if sys.argv[1] == "predictor":
    torch.manual_seed(0)
    predictor = catseg.Predictor(catseg.build_model("tiny"), device="cpu")
    inside = faults_of_steps(predictor.forward_context)
else:
    inside = faults_of_steps(allocator.retaining_freed_memory)
print(allocator.retains_freed_memory(), inside, before)
"""
PAGES = (64 << 20) // 4096


def _huge_pages_always() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


def _run(mode: str, **env: str) -> tuple[bool, int, int]:
    """(retention applies, faults of the last 3 steps inside the context, the same before it was entered)"""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], env={**environment, **env}, capture_output=True, text=True, check=True
    )
    applied, inside, before = out.stdout.split()[-3:]
    return applied == "True", int(inside), int(before)


@pytest.mark.parametrize("mode", ["context", "predictor"])
def test_memory_freed_in_a_model_call_is_reused_without_page_faults(mode):
    """Directly, and through a CPU Predictor's default ``forward_context``."""
    applied, inside, before = _run(mode)
    assert applied
    assert inside <= 2 * PAGES, inside  # the last 3 steps; glibc's defaults fault 9 x PAGES
    if not _huge_pages_always():  # with transparent huge pages a fault maps 2 MiB, not 4 KiB
        assert before > 4 * PAGES, before


def test_the_environment_keeps_its_own_malloc_settings():
    applied, inside, _ = _run("context", MALLOC_MMAP_MAX_="65536")
    assert not applied
    if not _huge_pages_always():
        assert inside > 4 * PAGES, inside
