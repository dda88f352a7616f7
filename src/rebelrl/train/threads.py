"""One fixed number of CPU threads per run, so that a run's numbers do not depend on the machine's load.

torch's CPU reductions (the sum of a gradient over a batch, a norm) split their work among the
threads of an OpenMP team, and float addition is not associative: a team of 1 and a team of 2 give
results that differ in the last bits, and training compounds the difference into different metrics
within a few iterations. With dynamic adjustment on (``OMP_DYNAMIC=true``, which some clusters and
images set), libgomp sizes each team as the cores minus the 15-minute load average, so the same run
gave other numbers beside a CPU-heavy job. ``pin_threads`` turns OpenMP's dynamic adjustment off and
fixes the team size. MKL's own adjustment is left on: it picks threads by matrix size, not load, and
its matrix products gave the same bits on 1 and 2 threads, while turning it off (as
``torch.set_num_threads`` does) made a tiny run 3 to 10 times slower beside another busy process.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

DEFAULT_THREADS = torch.get_num_threads()  # torch's choice at start-up (cores, or OMP_NUM_THREADS)
_RUNTIMES = ("libgomp", "libiomp", "libomp")


def pin_threads(threads: int | None = None) -> int:
    """Use exactly ``threads`` CPU threads (None: torch's start-up default) from now on; returns the count."""
    n = threads or DEFAULT_THREADS
    for runtime in openmp_runtimes():
        runtime.omp_set_dynamic(0)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)  # only when needed: it also switches MKL's size-based adjustment off
    return n


def openmp_runtimes() -> list[ctypes.CDLL]:
    """The OpenMP runtimes loaded in this process (torch brings its own), found through /proc on Linux
    and through the global symbol table elsewhere."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        maps = []
    paths = dict.fromkeys(
        line.split()[-1] for line in maps if len(line.split()) >= 6 and line.split()[-1].rsplit("/", 1)[-1].startswith(_RUNTIMES)
    )
    runtimes = [ctypes.CDLL(path) for path in paths]  # already loaded: the same handle, no second copy
    if not runtimes:
        process = ctypes.CDLL(None)
        runtimes = [process] if hasattr(process, "omp_set_dynamic") else []
    return [r for r in runtimes if hasattr(r, "omp_set_dynamic")]
