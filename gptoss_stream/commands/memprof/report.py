"""A memprof report: the JSON document (schema below, docs/memprof.md), its per-phase summary, and the text
tables of one run (format_summary) or two side by side (format_compare)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from gptoss_stream.errors import InputError
from gptoss_stream.commands.memprof.sampling import PHASES

SCHEMA = "gptoss-memprof"

VERSION = 1

REPORT_KEYS = ("schema", "version", "created", "command", "host", "model", "settings", "phases", "samples",
               "tokens", "generated", "summary")

PEAK_KEYS = ("rss", "rss_anon", "rss_file", "rss_peak", "swap", "uss", "pss", "dense_resident",
             "embedding_resident", "expert_resident", "experts_resident", "cgroup_usage", "cgroup_max_usage",
             "kv_bytes", "expert_cache_bytes")

COUNTER_KEYS = ("majflt", "minflt", "read_bytes", "read_chars", "cpu_user", "cpu_system")



# ---------------------------------------------------------------------------- sizes


def format_bytes(n: float | None) -> str:
    from gptoss_stream.streaming.budget import format_size

    return "-" if n is None else format_size(n)



# ---------------------------------------------------------------------------- the report


def token_records(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per generated token: when it came and what its step cost (deltas since the previous one).

    Token 0 comes with the end of the prefill, so its deltas are the whole prefill's.
    """
    out = []
    previous = None
    for s in samples:
        if s["kind"] == "phase_end" and s["phase"] == "load":
            previous = s
        elif s["token"] is not None and previous is not None:
            record = {"index": s["token"], "phase": s["phase"], "t": s["t"], "seconds": s["t"] - previous["t"]}
            record.update({k: s[k] - previous[k] for k in ("read_bytes", "read_chars", "majflt", "minflt")})
            out.append(record)
            previous = s
    return out



def _peak(samples: list[dict[str, Any]], key: str):
    values = [s[key] for s in samples if s[key] is not None]
    return max(values) if values else None



def _counter_deltas(before: dict | None, after: dict | None) -> dict[str, float] | None:
    """What the expert store counted during a phase."""
    if not after:
        return None
    earlier = (before or {}).get("counters", {})
    return {k: v - earlier.get(k, 0) for k, v in after["counters"].items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}



def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """Per phase: duration, tokens, tok/s, the peak of each measure and what each counter did."""
    samples = report["samples"]
    phases: dict[str, Any] = {}
    before = samples[0]
    for phase in report["phases"]:
        inside = [s for s in samples if s["phase"] == phase["name"]]
        last = inside[-1] if inside else before
        seconds = (phase["end"] or 0.0) - phase["start"]
        phases[phase["name"]] = {
            "seconds": seconds,
            "tokens": phase["tokens"],
            "tokens_per_second": phase["tokens"] / seconds if phase["tokens"] and seconds > 0 else None,
            "peak": {k: _peak(inside, k) for k in PEAK_KEYS},
            "delta": {k: last[k] - before[k] for k in COUNTER_KEYS},
            "experts": _counter_deltas(before["experts"], last["experts"]),
        }
        before = last
    model = report["model"]
    for p in phases.values():
        for kind in ("dense", "embedding", "expert"):
            resident, total = p["peak"][f"{kind}_resident"], model[f"{kind}_bytes"]
            p["peak"][f"{kind}_fraction"] = resident / total if resident is not None and total else None
    steps = [t for t in report["tokens"] if t["phase"] == "decode"]
    per_token = None
    if steps:
        per_token = {k: sum(t[k] for t in steps) / len(steps)
                     for k in ("seconds", "read_bytes", "read_chars", "majflt", "minflt")}
    last = samples[-1]
    return {
        "phases": phases,
        "decode_per_token": per_token,
        "peak_rss": _peak(samples, "rss"),
        "peak_cgroup_usage": _peak(samples, "cgroup_max_usage"),
        "experts_end": last["experts"],
        "kv_bytes_end": last["kv_bytes"],
    }



def load_report(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path) as f:
            report = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: memprof report not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a memprof JSON report ({e})") from None
    if not isinstance(report, dict) or report.get("schema") != SCHEMA:
        raise InputError(f"{path}: not a memprof report (no \"schema\": \"{SCHEMA}\")")
    if report.get("version") != VERSION:
        raise InputError(f"{path}: memprof report version {report.get('version')!r}; "
                         f"this gptoss reads version {VERSION}")
    missing = [k for k in REPORT_KEYS if k not in report]
    if missing:
        raise InputError(f"{path}: memprof report lacks {', '.join(missing)}")
    return report



# ---------------------------------------------------------------------------- text output


def _fmt_rate(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"



def _fmt_count(x: float | None) -> str:
    return "-" if x is None else (f"{x:,.0f}" if abs(x) >= 100 or float(x).is_integer() else f"{x:.1f}")



def _fmt_fraction(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"



def _fmt_seconds(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"



# (label, how to get the value from a phase summary, how to print it)
PHASE_ROWS: list[tuple[str, Callable[[dict], Any], Callable[[Any], str]]] = [
    ("seconds", lambda p: p["seconds"], _fmt_seconds),
    ("tokens", lambda p: p["tokens"] or None, _fmt_count),
    ("tok/s", lambda p: p["tokens_per_second"], _fmt_rate),
    ("peak RSS", lambda p: p["peak"]["rss_peak"] or p["peak"]["rss"], format_bytes),
    ("  anonymous", lambda p: p["peak"]["rss_anon"], format_bytes),
    ("  file-backed", lambda p: p["peak"]["rss_file"], format_bytes),
    ("peak USS", lambda p: p["peak"]["uss"], format_bytes),
    ("peak PSS", lambda p: p["peak"]["pss"], format_bytes),
    ("peak swap", lambda p: p["peak"]["swap"], format_bytes),
    ("peak cgroup usage", lambda p: p["peak"]["cgroup_max_usage"], format_bytes),
    ("ckpt cached: dense", lambda p: p["peak"]["dense_fraction"], _fmt_fraction),
    ("ckpt cached: embedding", lambda p: p["peak"]["embedding_fraction"], _fmt_fraction),
    ("ckpt cached: experts", lambda p: p["peak"]["expert_fraction"], _fmt_fraction),
    ("experts fully cached", lambda p: p["peak"]["experts_resident"], _fmt_count),
    ("KV cache in use", lambda p: p["peak"]["kv_bytes"], format_bytes),
    ("expert cache", lambda p: p["peak"]["expert_cache_bytes"], format_bytes),
    ("read from disk", lambda p: p["delta"]["read_bytes"], format_bytes),
    ("read() bytes", lambda p: p["delta"]["read_chars"], format_bytes),
    ("major faults", lambda p: p["delta"]["majflt"], _fmt_count),
    ("minor faults", lambda p: p["delta"]["minflt"], _fmt_count),
    ("CPU seconds", lambda p: p["delta"]["cpu_user"] + p["delta"]["cpu_system"], _fmt_seconds),
]



TOKEN_ROWS: list[tuple[str, str, Callable[[Any], str]]] = [
    ("seconds", "seconds", _fmt_seconds),
    ("read from disk", "read_bytes", format_bytes),
    ("read() bytes", "read_chars", format_bytes),
    ("major faults", "majflt", _fmt_count),
    ("minor faults", "minflt", _fmt_count),
]



def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows)
    return "\n".join(line.rstrip() for line in lines)



def _settings_line(report: dict[str, Any]) -> str:
    s, m = report["settings"], report["model"]
    limit = format_bytes(s["limit"]) if s["limit"] else "none"
    budget = "mmap only" if s["mmap_only"] else format_bytes(s["ram_budget"]) if s["ram_budget"] else "auto"
    return (f"{m['path']} ({format_bytes(m['file_bytes'])}: dense {format_bytes(m['dense_bytes'])}, embedding "
            f"{format_bytes(m['embedding_bytes'])}, experts {format_bytes(m['expert_bytes'])}); prompt "
            f"{s['prompt_tokens']} tokens, {s['max_tokens']} generated; limit {limit}, ram budget {budget}, "
            f"cold {'yes' if s['cold'] else 'no'}")



def format_summary(report: dict[str, Any]) -> str:
    summary = report["summary"]
    names = [p["name"] for p in report["phases"]]
    rows = [["", *names]]
    for label, get, fmt in PHASE_ROWS:
        rows.append([label, *(fmt(get(summary["phases"][n])) for n in names)])
    lines = [f"gptoss memprof: {_settings_line(report)}"]
    if report["settings"]["memory_plan"]:
        lines.append(f"memory plan: {report['settings']['memory_plan']}")
    lines += ["", _table(rows)]
    per_token = summary["decode_per_token"]
    if per_token:
        lines += ["", "per decode token (mean): " + ", ".join(
            f"{label} {fmt(per_token[key])}" for label, key, fmt in TOKEN_ROWS)]
    m = report["model"]
    lines.append(f"engine: scratch {format_bytes(m['scratch_bytes'])}, KV cache in use "
                 f"{format_bytes(summary['kv_bytes_end'])} of {format_bytes(m['kv_reserved_bytes'])} reserved, "
                 f"expert store {m['expert_store']}")
    if summary["experts_end"]:
        values = {**summary["experts_end"]["counters"], **summary["experts_end"]["derived"]}
        lines.append("expert store: " + ", ".join(f"{k}={_fmt_stat(v)}" for k, v in values.items()))
    if "profiler_seconds" in summary:
        lines.append(f"profiler: {len(report['samples'])} samples, {summary['profiler_seconds']:.2f} s inside the "
                     f"sampler ({summary['profiler_cpu_seconds']:.2f} s CPU)")
    return "\n".join(lines)



def _fmt_stat(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)



def format_compare(a: dict[str, Any], b: dict[str, Any], names: tuple[str, str] = ("A", "B")) -> str:
    """Two reports side by side: per phase, each measure for A and B and B/A."""
    lines = [f"{names[0]}: {_settings_line(a)}", f"{names[1]}: {_settings_line(b)}", ""]
    rows = [["", names[0], names[1], f"{names[1]}/{names[0]}"]]
    for phase in PHASES:
        pa, pb = a["summary"]["phases"].get(phase), b["summary"]["phases"].get(phase)
        if pa is None or pb is None:
            continue
        rows.append([f"[{phase}]", "", "", ""])
        for label, get, fmt in PHASE_ROWS:
            va, vb = get(pa), get(pb)
            rows.append([f"  {label}", fmt(va), fmt(vb), _ratio(va, vb)])
    ta, tb = a["summary"]["decode_per_token"], b["summary"]["decode_per_token"]
    if ta and tb:
        rows.append(["[per decode token]", "", "", ""])
        for label, key, fmt in TOKEN_ROWS:
            rows.append([f"  {label}", fmt(ta[key]), fmt(tb[key]), _ratio(ta[key], tb[key])])
    lines.append(_table(rows))
    return "\n".join(lines)



def _ratio(a, b) -> str:
    if a is None or b is None or not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or a == 0:
        return "-"
    return f"{b / a:.2f}x"

