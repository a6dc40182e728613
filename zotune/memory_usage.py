"""Memory meters: resident memory now and its peak (CPU), or the CUDA allocator's peak."""

from __future__ import annotations

import resource

import torch


def reset_peak() -> None:
    """Start a new peak-RSS window (Linux: clear_refs 5 resets VmHWM), so loading a model,
    whose transient copies can exceed any later step, does not mask the steps' own peak; the
    CUDA allocator's peaks too."""
    reset_cuda_peak()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _proc_status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident memory since the last `reset_peak` (ru_maxrss where /proc is missing)."""
    peak = _proc_status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """Resident memory now."""
    now = _proc_status_mb("VmRSS")
    return now if now is not None else peak_rss_mb()


def reset_cuda_peak() -> None:
    """Start a new peak window of the CUDA allocator on every GPU (no-op without CUDA)."""
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)


def cuda_peak_mb() -> float:
    """The CUDA allocator's peak since `reset_cuda_peak`, summed over the GPUs (a model placed
    across several with --device-map holds memory on each); 0 without CUDA."""
    if not torch.cuda.is_available():
        return 0.0
    return sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**20


def peak_memory_mb() -> float:
    """Peak resident memory since the last `reset_peak` (CPU), or the CUDA allocator's peak
    (max_memory_allocated, summed over the GPUs) when anything was allocated there."""
    cuda = cuda_peak_mb()
    return cuda if cuda > 0 else peak_rss_mb()
