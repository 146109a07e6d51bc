"""CPU threads and CPU arithmetic settings: how many threads a run may ask for, how many generation takes,
the flush of denormal floats, and whether this is the main thread."""

from __future__ import annotations

import os
import threading

import torch

from charlm.util.errors import CharlmError

# Threads for generation on the CPU (sampling_threads): the fused sampling route splits each product's blocks between
# them, which pays at 2 on an idle machine; on a busy one a thread that waits for a core at every step's
# barrier costs more than the split saves (benchmarks/results/sampling.txt). More than 2: not measured.
MAX_SAMPLING_THREADS = 2


def on_main_thread() -> bool:
    """Whether this is the main thread, the only one that may set signal handlers."""
    return threading.current_thread() is threading.main_thread()


def max_threads() -> int:
    """The most CPU threads a run may ask for: one per logical CPU of this machine."""
    return os.cpu_count() or 1


def fast_cpu_math(threads: int = 0) -> None:
    """Flush denormal floats to zero (a carried LSTM state drifts into denormals, on which CPU
    arithmetic is far slower) and set the thread count when asked (refused above :func:`max_threads`:
    far more threads than CPUs only slows a run down, and torch crashes on absurd counts)."""
    if threads > max_threads():
        raise CharlmError(f"config key 'train.threads' must be at most {max_threads()}, the number of CPUs "
                          f"here (or 0: torch's choice), got {threads}")
    torch.set_flush_denormal(True)
    if threads:
        torch.set_num_threads(threads)


def sampling_threads() -> int:
    """Threads for ``charlm sample``: as many CPUs as are idle now (the CPUs this process may use less the
    last minute's load average, rounded), at least one and at most MAX_SAMPLING_THREADS."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average (Windows): do not count on an idle CPU
        return 1
    return max(1, min(MAX_SAMPLING_THREADS, round(cpus - busy)))
