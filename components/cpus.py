"""How many CPUs this process may use: a container's CPU limit, not the node's core count.

In a Kubernetes pod with `limits.cpu: 2` on a 64-core node, os.cpu_count() says 64; spawning 64
decode workers or 64 torch threads then only makes the pod throttle. The limit is the cgroup's
CPU quota (cgroup v2 `cpu.max`: "<quota> <period>", or "max" for none).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def available(cpu_max: Path = CPU_MAX) -> int:
    """CPUs this process may run on, capped by the cgroup CPU quota (rounded up, at least 1)."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 file (a laptop, cgroup v1): the affinity mask alone
        pass
    return cpus
