"""A process's peak resident memory: what a client process holds, measured whole by the operating system."""

from __future__ import annotations

import resource
from pathlib import Path


def process_peak_rss_mib() -> float:
    """This process's peak resident set size in MiB.

    Linux's ``VmHWM`` belongs to the process's own address space, which ``exec`` replaces, so a process started
    from a large parent reports its own peak. ``ru_maxrss`` (the fallback elsewhere) survives ``exec`` on
    Linux: a child spawned by a parent that held 5 GiB would report 5 GiB whatever it held itself.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
