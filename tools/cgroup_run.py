#!/usr/bin/env python3
"""Run a command inside a fresh cgroup v1 memory limit, cold page cache, and report its memory use.

Needs root and the v1 memory controller at /sys/fs/cgroup/memory (what this machine class has). The page
cache a process fills is charged to its cgroup, so a capped run sees the same memory pressure a small
machine would: what the limit cannot hold is re-read from disk.

RssAnon has no kernel-kept peak, so it is sampled from /proc/<pid>/status every SAMPLE_SECONDS (10 ms):
the figure is a sampled peak, which a spike shorter than that can exceed. The peak of all the group's memory
(anonymous + page cache, memory.max_usage_in_bytes) is the kernel's own and misses nothing.

    python3 tools/cgroup_run.py 4G -- python3 -m gptoss_stream.commands.cli generate -m /work/ckpt/20b -p hi -n 8
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptoss_stream.commands.memprof.residency import evict_files  # noqa: E402
from gptoss_stream.streaming.budget import format_size, parse_size  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import print_machine  # noqa: E402

MEMORY_ROOT = Path("/sys/fs/cgroup/memory")
SAMPLE_SECONDS = 0.01  # one read of /proc/<pid>/status costs ~50 us: 0.5% of one core


@dataclass
class CgroupRun:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    limit: int
    max_usage: int        # memory.max_usage_in_bytes: peak of anonymous + page cache charged to the group
    sampled_peak_rss_anon: int  # largest RssAnon seen in /proc/<pid>/status, read every SAMPLE_SECONDS
    failcnt: int          # times the group hit its limit (reclaim happened)
    oom_killed: bool


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _rss_anon(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _oom_kills(group: Path) -> int:
    try:
        for line in (group / "memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_in_memory_cgroup(cmd: list[str], limit: int, cold: bool = True, env: dict | None = None,
                         timeout: float | None = None, name: str | None = None,
                         evict: list[str] | None = None) -> CgroupRun:
    """cold: drop the whole page cache first (sync; echo 3 > drop_caches), or, with `evict`, only those files
    (gentler on a shared machine during development)."""
    if not MEMORY_ROOT.is_dir():
        raise RuntimeError(f"{MEMORY_ROOT}: no cgroup v1 memory controller here")
    if os.geteuid() != 0:
        raise RuntimeError("creating a memory cgroup needs root")
    group = MEMORY_ROOT / (name or f"gptoss-bench-{os.getpid()}")
    group.mkdir(exist_ok=True)
    try:
        (group / "memory.limit_in_bytes").write_text(f"{limit}\n")
        (group / "memory.max_usage_in_bytes").write_text("0\n")
        (group / "memory.failcnt").write_text("0\n")
        kills_before = _oom_kills(group)
        if cold and evict:
            evict_files(evict)
        elif cold:
            drop_caches()
        procs = str(group / "cgroup.procs")

        def enter_group() -> None:  # runs in the child between fork and exec
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        started = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                 preexec_fn=enter_group)
        peak = 0
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, _rss_anon(child.pid))
                stop.wait(SAMPLE_SECONDS)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            out, err = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            out, err = child.communicate()
            err += f"\n[cgroup_run] killed after {timeout} s"
        seconds = time.perf_counter() - started
        stop.set()
        sampler.join()
        return CgroupRun(
            returncode=child.returncode, stdout=out, stderr=err, seconds=seconds, limit=limit,
            max_usage=int((group / "memory.max_usage_in_bytes").read_text()),
            sampled_peak_rss_anon=peak, failcnt=int((group / "memory.failcnt").read_text()),
            oom_killed=_oom_kills(group) > kills_before,
        )
    finally:
        # The child has exited; its page cache charges move to the parent group when the group is removed.
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("limit", type=parse_size, help="memory limit, e.g. 4G")
    p.add_argument("--warm", action="store_true", help="do not drop the page cache first")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- command ...")
    args = p.parse_args(argv)
    print_machine(sys.stderr)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        p.error("give a command after --")
    r = run_in_memory_cgroup(cmd, args.limit, cold=not args.warm)
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr)
    print(f"[cgroup_run] limit {format_size(r.limit)}: exit {r.returncode}, {r.seconds:.1f} s, peak group memory "
          f"{format_size(r.max_usage)}, sampled peak RssAnon (every {SAMPLE_SECONDS * 1e3:.0f} ms) "
          f"{format_size(r.sampled_peak_rss_anon)}, limit hit {r.failcnt} times"
          f"{', OOM-killed' if r.oom_killed else ''}", file=sys.stderr)
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
