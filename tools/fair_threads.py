"""Like-for-like thread settings for the benchmarks in tools/, and a warning when the machine cannot
give them.

Why: on a small or shared machine, more torch threads than free cores make every parallel region wait
for descheduled threads, and by different amounts for the two sides of a comparison (on 2 busy cores
TRL's SFT fell to a twentieth of its own single-thread speed while mmtune's did not): the ratio then
measures the scheduler, not the frameworks. So every benchmark that compares two sides runs both with
the same thread count, 1 by default, and when asked for more it first checks, with a short matmul
probe, that N threads are really faster than one here; if not, it says so in its output.
"""

from __future__ import annotations

import os
import time
from typing import Optional

DEFAULT_THREADS = 1
HELP = ("torch threads for both sides (default 1: like for like on a small or shared machine; with more, "
        "a probe first checks that the machine has the free cores, and the output warns when not)")


def _matmul_rate(threads: int, seconds: float = 0.4) -> float:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(384, 384)
        a @ a  # warm-up
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ a
            done += 1
        return done / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)


def oversubscription_warning(threads: int, min_speedup: float = 1.2) -> Optional[str]:
    """None when `threads` torch threads run a matmul at least `min_speedup` x faster than one thread on
    this machine now; else a one-line warning to print beside the results (and keep in their JSON)."""
    if threads <= 1:
        return None
    single, multi = _matmul_rate(1), _matmul_rate(threads)
    if multi >= min_speedup * single:
        return None
    return (f"WARNING: {threads} torch threads ran a matmul only {multi / single:.2f}x as fast as 1 thread "
            f"({os.cpu_count()} cores, others busy?): the sides' figures may measure the scheduler; "
            "rerun with --threads 1")


def apply_threads(threads: Optional[int]) -> Optional[str]:
    """Sets torch's thread count for the whole benchmark (both sides) and returns the warning, if any."""
    import torch

    threads = threads or DEFAULT_THREADS
    warning = oversubscription_warning(threads)
    torch.set_num_threads(threads)
    if warning:
        print(warning, flush=True)
    return warning
