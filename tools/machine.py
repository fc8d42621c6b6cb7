"""What every benchmark prints first and sizes its buffers by: the CPU, the compute path libgptoss runs, the
caches (from sysfs, not assumed).

    from machine import add_isa_argument, cache_sizes, last_level_cache_bytes, print_machine, use_isa
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CACHE_DIR = Path("/sys/devices/system/cpu/cpu0/cache")
FALLBACK_LLC_BYTES = 32 << 20  # only when sysfs has no cache information


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
        from gptoss_stream.engine import kernels

        kernels.set_isa(name)


def machine_line() -> str:
    from gptoss_stream.engine import compute_path, kernels

    return (f"cpu: {compute_path.cpu_model()}; libgptoss compute path: {compute_path.selected()} "
            f"(oneDNN {compute_path.onednn_info().isa}), {kernels.get_num_threads()} threads; {describe_caches()}")


def print_machine(file=sys.stdout) -> None:
    """The first line of every benchmark's output."""
    print(f"# {machine_line()}", file=file, flush=True)
