"""Peak memory for the benchmarks: GPU memory on CUDA, else the process's peak RSS."""

from __future__ import annotations


def peak_memory_mb() -> float:
    """Peak GPU memory when CUDA is in use, else this process's peak RSS."""
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
            return torch.cuda.max_memory_allocated() / 2**20
    except ImportError:
        pass
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def reset_peak(device) -> None:
    """Start a new GPU peak (RSS peaks cannot be reset: on the CPU this is the process's)."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
