"""When did this process start (for 'time to first token from process start')."""

from __future__ import annotations

import os


def process_start_time() -> float | None:
    """Wall-clock start time of this process, read from /proc (Linux); None elsewhere."""
    try:
        with open(f"/proc/{os.getpid()}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration):
        return None

