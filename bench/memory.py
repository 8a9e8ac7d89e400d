"""Memory figures: the machine's read bandwidth (the roofline every decode figure
is compared with) and a process's resident memory."""

from __future__ import annotations

import os
import resource
import sys
import time


def peak_rss() -> int:
    """Bytes: the most resident memory this process has held so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS counts bytes, Linux KiB


def rss() -> int:
    """Bytes resident now."""
    import psutil

    return psutil.Process().memory_info().rss


def cores() -> int:
    """CPU cores this process may run on (a container's share, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def bandwidth(mib: int = 1024, repeats: int = 10) -> dict:
    """Read bandwidth in GB/s (1e9 bytes): the best of `repeats` sums over a
    `mib` MiB float32 buffer, far larger than any cache. torch's sum runs on every
    core (as decode does), numpy's on one; the roofline uses the faster."""
    import numpy as np

    n = mib * (1 << 20) // 4
    a = np.ones(n, dtype=np.float32)
    a.sum()  # fault the pages in before timing
    numpy_best = _best(lambda: a.sum(), a.nbytes, repeats)
    result = {"buffer_mib": mib, "repeats": repeats, "numpy_1thread_gbps": numpy_best}
    try:
        import torch

        t = torch.from_numpy(a)
        t.sum()
        result["torch_gbps"] = _best(lambda: t.sum(), a.nbytes, repeats)
        result["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    a = None  # the numpy buffer goes now, not when the caller returns
    result["gbps"] = max(result["numpy_1thread_gbps"], result.get("torch_gbps", 0.0))
    if "torch_gbps" in result and torch.cuda.is_available():  # decode runs there: its memory is the roofline
        g = torch.ones(n, device="cuda")
        result["cuda_gbps"] = result["gbps"] = _best(lambda: g.sum().item(), g.nbytes, repeats)
        result["cuda_device"] = torch.cuda.get_device_name()
    return result


def gpu_peak() -> int | None:
    """Bytes: the most GPU memory torch allocated in this process, if it used a GPU."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_allocated()


def _best(fn, nbytes: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9
