"""Per-phase run statistics for `--stats`: the expert store's counters plus what the kernel says this
process read from disk and holds in memory (/proc/self/io, /proc/self/status)."""

from __future__ import annotations

import json
from pathlib import Path


def process_read_bytes() -> int:
    """Bytes this process caused to be fetched from storage: page-cache misses (readahead included) and
    O_DIRECT reads; 0 where /proc/self/io is unavailable."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def process_memory() -> dict[str, int]:
    """RssAnon, RssFile, VmRSS and VmHWM (peak RSS) of this process, in bytes."""
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


class Probe:
    """Snapshots the store's counters and the process's disk reads; `lap()` returns what changed since."""

    def __init__(self, store):
        self.store = store
        self._mark = self._now()

    def _now(self):
        # A fresh copy each time: a store may hand out a snapshot (taken under its lock), not a live object.
        stats = getattr(self.store, "stats", None)
        return (stats.copy() if stats is not None else None, process_read_bytes())

    def lap(self) -> dict:
        stats, read = self._now()
        before_stats, before_read = self._mark
        self._mark = (stats, read)
        out = {"disk_read_bytes": read - before_read}
        if stats is not None:
            delta = stats.since(before_stats)
            out.update(delta.as_dict())
            for name in ("hit_rate", "prefetch_rate", "prediction_accuracy", "prefetch_precision"):
                if hasattr(delta, name):
                    out[name] = getattr(delta, name)
        return out


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def format_phase(name: str, tokens: int, seconds: float, s: dict) -> str:
    per = max(tokens, 1)
    line = (f"[stats] {name}: {tokens} tokens in {seconds:.2f} s, disk read {_gb(s['disk_read_bytes'])} "
            f"({s['disk_read_bytes'] / per / 1e6:.1f} MB/token)")
    if "hits" in s:
        line += (f", expert reads {s['bytes_read'] / per / 1e6:.1f} MB/token, cache hit rate {s['hit_rate']:.1%} "
                 f"(+{s['prefetch_rate']:.1%} read ahead), prediction accuracy {s['prediction_accuracy']:.1%} "
                 f"(prefetch precision "
                 f"{s['prefetch_precision']:.1%}), I/O stall {s['stall_seconds']:.2f} s "
                 f"({s['stall_seconds'] / per * 1e3:.1f} ms/token)")
    elif "requests" in s:
        line += f", {s['requests']} expert requests (page faults do the reading)"
    return line


def report(result, plan=None) -> str:
    """Readable lines plus one `[stats-json]` line (for tools/bench_stream.py) about a GenerationResult."""
    decode_steps = result.decode_steps
    mem = process_memory()
    lines = []  # the plan itself was printed when the model was opened
    lines.append(format_phase("prefill", result.prompt_tokens, result.prefill_seconds, result.prefill_stats))
    lines.append(format_phase("decode", decode_steps, result.decode_seconds, result.decode_stats))
    if mem:
        lines.append(f"[stats] memory: RssAnon {_gb(mem.get('RssAnon', 0))}, RssFile {_gb(mem.get('RssFile', 0))}, "
                     f"peak RSS {_gb(mem.get('VmHWM', 0))}")
    payload = {
        "prompt_tokens": result.prompt_tokens, "decode_steps": decode_steps,
        "prefill_seconds": result.prefill_seconds, "decode_seconds": result.decode_seconds,
        "prefill_tokens_per_second": result.prefill_tokens_per_second,
        "decode_tokens_per_second": result.decode_tokens_per_second,
        "prefill": result.prefill_stats, "decode": result.decode_stats, "memory": mem,
        "plan": None if plan is None else {**plan.__dict__, "expert_cache": plan.expert_cache},
    }
    lines.append("[stats-json] " + json.dumps(payload))
    return "\n".join(lines)
