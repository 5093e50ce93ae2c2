"""A wide step's large CPU tensors served from the heap, not mapped afresh each time.

glibc serves an allocation above its mmap threshold (which never rises past 32 MiB on 64-bit) with a fresh
``mmap`` and unmaps it on free, so each such tensor a step allocates costs a page fault for every 4 KiB it
touches. A coupling step at 65,536 target dims and batch 256 allocates hundreds of 32 and 64 MiB
activations: measured on a 2-core AMD EPYC (bench.target_dims), 9.8 s a step, three quarters of the
process's time in the kernel; with glibc told to serve them from its heap and keep what is freed there
(``mallopt``: no mmap, a 1 GiB trim threshold), 3.9 s, at a peak of 12.4 GiB against 9.4 (flat over the
steps). A narrower step's tensors fall under the threshold, and glibc reuses them already: nothing changes.
"""

from __future__ import annotations

import contextlib
import ctypes
import platform
from collections.abc import Iterator

import torch

M_MMAP_MAX = -4  # mallopt's parameter: how many allocations glibc may serve by mmap at once (0: none)
MMAP_MAX_DEFAULT = 65536  # glibc's default for it
M_TRIM_THRESHOLD = -1  # mallopt's parameter: free memory at the heap's top above which glibc gives it back
TRIM_THRESHOLD = 2**30  # kept while open: a step's freed activations stay for the next instead of faulting in again
TRIM_THRESHOLD_DEFAULT = 128 * 2**10  # glibc's default for it
MMAP_CEILING = 32 * 2**20  # glibc's largest mmap threshold on 64-bit: anything larger is always mapped afresh


def activation_bytes(batch_size: int, target_dim: int) -> int:
    """Bytes of a step's widest activation: a float32 [batch, target dims], what ``heap_for`` is sized by."""
    return batch_size * target_dim * 4


def glibc() -> ctypes.CDLL | None:
    """The running glibc, or None (macOS, Windows, musl)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


@contextlib.contextmanager
def heap_for(device: torch.device, largest: int) -> Iterator[bool]:
    """While open, a CPU step whose largest activation has ``largest`` bytes (``activation_bytes``) gets
    its large tensors from glibc's heap; on leaving, mmap is allowed again (at glibc's default) and the heap's
    free memory goes back to the system (``malloc_trim``). Yields whether it applied: only on a CPU device,
    under glibc, at ``largest`` >= 32 MiB, where the heap costs more resident memory (~30% at 65,536 dims:
    freed activations stay in it for the next step) and saves more than half the step. glibc's thresholds
    stop adapting once set (mallopt's rule): after it, they stay at glibc's defaults."""
    libc = glibc() if device.type == "cpu" and largest >= MMAP_CEILING else None
    if libc is None or not (libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        yield False
        return
    try:
        yield True
    finally:
        libc.mallopt(M_MMAP_MAX, MMAP_MAX_DEFAULT)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_DEFAULT)
        libc.malloc_trim(0)
