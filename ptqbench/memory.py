"""Peak memory probes that can be reset per cell (host: Linux VmHWM; GPU: torch.cuda peak allocator stats)."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
from pathlib import Path

import torch


def _release_free_heap() -> None:
    """Collect garbage and hand glibc's free heap back to the OS, so the resident set is the live memory: a window
    reset on top of a previous cell's freed-but-kept heap would otherwise count that heap as this cell's."""
    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the window may include some freed heap


def reset_peaks() -> None:
    """Start a new peak window: host RSS high-water mark (Linux clear_refs 5) and CUDA peak stats."""
    _release_free_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux, or not permitted: the peak then covers the whole process
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_host_gib() -> float:
    """Peak resident set size since the last ``reset_peaks`` (whole process where reset is unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 2**30
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30


def peak_gpu_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
