"""How ldmkit's OpenMP threads wait between parallel regions — chosen once, at import, before torch.

A UNet step at the zoo's sizes is hundreds of small operations, each a parallel region. Threads that sleep
between regions (``OMP_WAIT_POLICY=PASSIVE``) pay a wake-up at every one: on a quiet 2-core machine that
made a UNet train step 2.4x slower (322 against 132 ms) than threads that spin briefly. Threads that spin
while another busy process shares the cores steal its time and their own: beside a one-thread neighbour
the same step took 587 ms spinning briefly against 224 ms passive (``benchmarks/wait_policy.py``,
docs/performance.md). So at import ldmkit looks at the machine: if the cores are free (no other running
process beyond what its threads need), its threads spin for a short while (``GOMP_SPINCOUNT``, GNU OpenMP
as in PyTorch's Linux wheels); otherwise they wait passively. An ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``
the user set is always kept; one ldmkit set (marked by ``LDMKIT_WAIT_POLICY_AUTO`` in the environment, which
child processes inherit) is decided again. It takes effect only when ldmkit is imported before torch (the
``ldmkit`` command, the test suite, the benchmarks); after torch it changes nothing and says so.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import MutableMapping

__all__ = ["SPIN_COUNT", "choose_wait_policy", "other_running"]

#: Spin iterations before a waiting thread sleeps, when the cores are free (as fast as unbounded spinning on
#: a quiet machine, measured: 132 against 129 ms a train step).
SPIN_COUNT = 10000
_MARK = "LDMKIT_WAIT_POLICY_AUTO"


def other_running(samples: int = 4, gap_s: float = 0.001) -> int | None:
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


def _cores() -> int:
    """CPUs this process may run on (its affinity where the platform says, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def choose_wait_policy(environ: MutableMapping[str, str] = os.environ, running: int | None | bool = False,
                       torch_loaded: bool | None = None) -> str:
    """Set the wait policy in ``environ`` (unless the user set one) and say what was chosen and why.

    ``running`` is the count of other running threads (default: :func:`other_running`); ``torch_loaded``
    whether torch is already imported (default: look in ``sys.modules``)."""
    if environ.get(_MARK):  # ldmkit's own earlier choice (a parent process): decide again, here and now
        for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", _MARK):
            environ.pop(name, None)
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        if name in environ:
            return f"as set: {name}={environ[name]}"
    if torch_loaded is None:
        torch_loaded = "torch" in sys.modules
    if torch_loaded:
        return "not applied: torch was imported before ldmkit (OpenMP keeps its default)"
    if running is False:
        running = other_running()
    cores = _cores()
    try:
        threads = int(environ.get("OMP_NUM_THREADS", "") or cores)
    except ValueError:
        threads = cores
    threads = threads if threads > 0 else cores
    environ[_MARK] = "1"
    if running is None or running + threads > cores:
        environ["OMP_WAIT_POLICY"] = "PASSIVE"
        why = "cannot read the machine's load" if running is None else f"{running} other running thread(s) on {cores} cores"
        return f"passive (OMP_WAIT_POLICY=PASSIVE): {why}"
    environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    return f"short spin (GOMP_SPINCOUNT={SPIN_COUNT}): {threads} thread(s), {cores} cores, no other running process"
