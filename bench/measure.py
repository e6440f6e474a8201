"""Run a command in a child process and measure it: wall seconds, the peak RSS of its
largest process (wait4) and the peak summed PSS of all its processes (sampled).

PSS splits each shared page between the processes that share it, so forked workers do not
count their parent's libraries again, as summed RSS would. The caller should stay small:
on Linux a child's peak RSS from wait4 includes its parent's RSS at the fork.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path


def tree_pss(pid: int) -> int:
    """Summed PSS (bytes) of `pid` and its descendants; 0 once it is gone."""
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_full_info().pss
        except psutil.Error:
            pass
    return total


def measure(cmd: list[str], cwd: Path, log: Path | None = None, every: float = 0.1) -> dict:
    """{seconds, peak_rss_mb, peak_tree_pss_mb, rc} of `cmd` (output to `log` if given)."""
    peak, stop = [0], threading.Event()
    with open(log, "w") if log else open(os.devnull, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd, cwd=cwd, stdout=out if log else None, stderr=subprocess.STDOUT if log else None
        )

        def sample() -> None:
            while not stop.wait(every):
                peak[0] = max(peak[0], tree_pss(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        stop.set()
        sampler.join()
    return {
        "seconds": round(wall, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024),  # Linux: KiB
        "peak_tree_pss_mb": round(peak[0] / 2**20),
        "rc": os.waitstatus_to_exitcode(status),
    }
