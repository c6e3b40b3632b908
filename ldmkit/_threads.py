"""How ldmkit's OpenMP threads wait between parallel regions — chosen once, at import, before torch.

A UNet step at the zoo's sizes is hundreds of small operations, each a parallel region. Threads that sleep
between regions (``OMP_WAIT_POLICY=PASSIVE``) pay a wake-up at every one: on a quiet 2-core machine that
made training and sampling 2.3x slower than threads that spin briefly. Threads that spin, when another busy
process shares the cores, steal its time and their own: a UNet step ran 19x slower with the default
unbounded spin (see docs/performance.md, ``benchmarks/wait_policy.py``). So at import ldmkit looks at
the machine: if the cores are free (no other running process beyond what the threads need), its threads
spin for a short while (``GOMP_SPINCOUNT``, GNU OpenMP as in PyTorch's Linux wheels) — nearly all the
quiet-machine speed, a bounded cost if a busy neighbour starts later; otherwise they wait passively.
An ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` already set is always kept. It takes effect only when ldmkit
is imported before torch (the ``ldmkit`` command, the test suite, the benchmarks).
"""

from __future__ import annotations

import os
import time
from collections.abc import MutableMapping

__all__ = ["SPIN_COUNT", "choose_wait_policy", "other_running"]

#: Spin iterations before a waiting thread sleeps, when the cores are free (about as fast as unbounded
#: spinning on a quiet machine; 3x less costly than it under a busy neighbour, measured).
SPIN_COUNT = 10000


def other_running(samples: int = 5, gap_s: float = 0.002) -> int | None:
    """Threads of other processes running now (``procs_running`` of ``/proc/stat`` less this one, the fewest
    of a few quick reads: a busy process shows in every read, a passing kernel thread in one), or None where
    that cannot be read."""
    counts = []
    for i in range(samples):
        try:
            with open("/proc/stat") as fh:
                counts += [int(line.split()[1]) for line in fh if line.startswith("procs_running")]
        except (OSError, ValueError, IndexError):
            return None
        if i + 1 < samples:
            time.sleep(gap_s)
    return max(min(counts) - 1, 0) if counts else None


def choose_wait_policy(environ: MutableMapping[str, str] = os.environ, running: int | None | bool = False) -> str:
    """Set the wait policy in ``environ`` (unless the user set one) and say what was chosen and why.

    ``running`` is the count of other running threads (default: :func:`other_running`)."""
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        if name in environ:
            return f"as set: {name}={environ[name]}"
    if running is False:
        running = other_running()
    cores = os.cpu_count() or 1
    try:
        threads = int(environ.get("OMP_NUM_THREADS", "") or cores)
    except ValueError:
        threads = cores
    if running is None or running + threads > cores:
        environ["OMP_WAIT_POLICY"] = "PASSIVE"
        why = "cannot read the machine's load" if running is None else f"{running} other running thread(s) on {cores} cores"
        return f"passive (OMP_WAIT_POLICY=PASSIVE): {why}"
    environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    return f"short spin (GOMP_SPINCOUNT={SPIN_COUNT}): {threads} thread(s), {cores} cores, no other running process"
