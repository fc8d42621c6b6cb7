"""What this machine, and the cgroup this process runs in, let a run use: CPUs (affinity, CPU quota) and
memory (MemAvailable, memory limit). The RAM plan (streaming.budget) and the engine's thread count read them.
"""

from __future__ import annotations

import os
from pathlib import Path

KIB = 1024


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_files(v2_name: str, v1_controller: str, v1_names: tuple[str, ...], proc_cgroup: str,
                  root: str) -> list[tuple[Path, ...]]:
    """Where this process's cgroup keeps a setting: per hierarchy, the v2 file (alone, or mounted at
    unified/ next to v1 controllers) or the v1 controller's files."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return []
    base = Path(root)
    found = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        rel = rel.lstrip("/")
        if controllers == "":  # v2
            found += [(base / rel / v2_name,), (base / "unified" / rel / v2_name,)]
        elif v1_controller in controllers.split(","):  # v1, mounted as "cpu,cpuacct" or "cpu"
            for mount in dict.fromkeys((controllers, v1_controller)):
                found.append(tuple(base / mount / rel / name for name in v1_names))
    return found


def cgroup_memory_limit(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """The memory limit of this process's cgroup (v2 memory.max or v1 memory.limit_in_bytes), if any."""
    limits = [_read_int(path) for (path,) in _cgroup_files("memory.max", "memory", ("memory.limit_in_bytes",),
                                                          proc_cgroup, root)]
    # v1 reports "no limit" as a huge number (PAGE_COUNTER_MAX pages)
    real = [n for n in limits if n is not None and n < 2**60]
    return min(real) if real else None


def cgroup_cpu_limit(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> float | None:
    """CPUs this process's cgroup may use (v2 cpu.max, v1 cpu.cfs_quota_us / cpu.cfs_period_us), if limited."""
    limits = []
    for files in _cgroup_files("cpu.max", "cpu", ("cpu.cfs_quota_us", "cpu.cfs_period_us"), proc_cgroup, root):
        try:
            text = " ".join(f.read_text().strip() for f in files).split()
        except OSError:
            continue
        try:
            quota, period = int(text[0]), int(text[1])
        except (ValueError, IndexError):
            continue  # "max": no limit
        if quota > 0 and period > 0:
            limits.append(quota / period)
    return min(limits) if limits else None


def available_cpus() -> int:
    """Compute threads worth running: the CPUs this process may run on (sched_getaffinity), capped by the
    cgroup's CPU quota (rounded down, at least 1: threads beyond the quota only get throttled)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    if quota is not None:
        n = min(n, max(1, int(quota)))
    return max(1, n)


def available_memory() -> int:
    """What a run may use when no budget is given: MemAvailable, or the cgroup limit if smaller."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * KIB
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = cgroup_memory_limit()
    return min(avail, limit) if limit is not None else avail
