"""glibc malloc settings for CPU inference: the model's activations stay in the heap from one forward to the next.

glibc serves every allocation above its mmap threshold (32 MiB at most) with a fresh ``mmap`` and unmaps it on
``free``. A forward pass whose activations are tens of MiB each (a chunk of 32 classes through the vit_b16
aggregator: 38 MiB per tensor for one view, 5x that for the Predictor's 5 views) then page-faults all of them in
again on every call: measured on the 2-core development CPU, about 0.4-0.6 M page faults and 0.8-1.4 s of kernel
time per vit_b16 forward at T = 150 (4.7 s in all).

:func:`retaining_freed_memory` turns mmap off for the duration of a forward, so its activations come from the
heap, and raises the trim threshold so the heap keeps them for the next forward: no page faults, 1.1-1.3x faster.
Outside forwards mmap stays on (blocks above 32 MiB), so a large image's buffers still go back to the OS when
freed instead of fragmenting the heap.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import threading
from collections.abc import Iterator

# mallopt parameters (malloc.h) and glibc's default for the one that is switched
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
GLIBC_DEFAULT_MMAP_MAX = 65536
MMAP_THRESHOLD = 32 << 20  # glibc's largest: smaller blocks always come from the heap (no dynamic threshold)
RETAINED_BYTES = 512 << 20  # free memory the heap keeps at its top before it gives any back to the OS
# A process started with this set has chosen whether large blocks are mapped: leave it as it is.
MMAP_ENV_VAR = "MALLOC_MMAP_MAX_"

_lock = threading.Lock()
_libc: ctypes.CDLL | None = None
_configured = False
_forwards = 0  # forwards in flight (threads), so mmap comes back on only when the last one ends


def _glibc() -> ctypes.CDLL | None:
    """glibc with the thresholds set once, or None where it does not apply (not glibc, or the environment
    decides)."""
    global _libc, _configured
    if not _configured:
        _configured = True
        if platform.libc_ver()[0] == "glibc" and MMAP_ENV_VAR not in os.environ:
            libc = ctypes.CDLL(None)
            thresholds = (
                ("MALLOC_MMAP_THRESHOLD_", M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                ("MALLOC_TRIM_THRESHOLD_", M_TRIM_THRESHOLD, RETAINED_BYTES),
            )
            for variable, parameter, value in thresholds:
                if variable not in os.environ:  # a variable the environment sets keeps its value
                    libc.mallopt(parameter, value)
            _libc = libc
    return _libc


def retains_freed_memory() -> bool:
    """Whether :func:`retaining_freed_memory` does anything in this process."""
    with _lock:
        return _glibc() is not None


@contextlib.contextmanager
def retaining_freed_memory() -> Iterator[None]:
    """Inside: large allocations come from glibc's heap and stay there when freed (see the module docstring).

    Process-wide while any thread is inside; nests. A no-op off glibc and where ``MALLOC_MMAP_MAX_`` is set.
    """
    global _forwards
    with _lock:
        libc = _glibc()
        if libc is not None:
            _forwards += 1
            if _forwards == 1:
                libc.mallopt(M_MMAP_MAX, 0)
    try:
        yield
    finally:
        if libc is not None:
            with _lock:
                _forwards -= 1
                if _forwards == 0:
                    libc.mallopt(M_MMAP_MAX, GLIBC_DEFAULT_MMAP_MAX)
