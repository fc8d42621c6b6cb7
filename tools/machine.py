"""What every benchmark prints first and sizes its buffers by: the CPU, the compute path libgptoss runs, the
caches (from sysfs, not assumed).

    from machine import add_isa_argument, cache_sizes, last_level_cache_bytes, print_machine, use_isa
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

CACHE_DIR = Path("/sys/devices/system/cpu/cpu0/cache")
FALLBACK_LLC_BYTES = 32 << 20  # only when sysfs has no cache information


def cpu_model() -> str:
    """The CPU's name as /proc/cpuinfo gives it ("model name" on x86)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model name", "cpu model", "Processor"):
                return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _size_bytes(text: str) -> int:
    """sysfs cache sizes: "48K", "2048K", "491520K", "32M"."""
    text = text.strip()
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text and text[-1] in units else int(text)


def cache_sizes() -> list[tuple[int, str, int]]:
    """(level, type, bytes) of cpu0's caches, from /sys/devices/system/cpu/cpu0/cache/index*/{level,type,size}."""
    caches = []
    for index in sorted(CACHE_DIR.glob("index*")):
        try:
            caches.append((int((index / "level").read_text()), (index / "type").read_text().strip(),
                           _size_bytes((index / "size").read_text())))
        except (OSError, ValueError):
            continue
    return caches


def last_level_cache_bytes() -> int:
    """Size of the largest data-holding cache level (Data or Unified); FALLBACK_LLC_BYTES if sysfs is silent."""
    data = [c for c in cache_sizes() if c[1] in ("Data", "Unified")]
    return max(data)[2] if data else FALLBACK_LLC_BYTES


def describe_caches() -> str:
    caches = cache_sizes()
    if not caches:
        return f"caches unknown (sysfs), assuming a {FALLBACK_LLC_BYTES >> 20} MiB last level"
    return ", ".join(f"L{level} {kind.lower()} {size >> 10} KiB" for level, kind, size in caches)


def add_isa_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--isa", metavar="NAME",
                        help="compute path for libgptoss's kernels (kernels.set_isa), set before any kernel runs; "
                             "default: the best this CPU has")


def use_isa(name: str | None) -> None:
    """kernels.set_isa(name) when a name is given; call before any kernel runs."""
    if name:
        from gptoss_stream import kernels

        kernels.set_isa(name)


def machine_line() -> str:
    from gptoss_stream import kernels

    return f"cpu: {cpu_model()}; libgptoss compute path: {kernels.get_isa()}; {describe_caches()}"


def print_machine(file=sys.stdout) -> None:
    """The first line of every benchmark's output."""
    print(f"# {machine_line()}", file=file, flush=True)
