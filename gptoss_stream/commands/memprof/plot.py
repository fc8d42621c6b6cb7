"""`gptoss memprof --plot`: a report's timeline as a PNG (matplotlib, the optional `plot` extra)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gptoss_stream.errors import SetupError
from gptoss_stream.commands.memprof.report import format_bytes

MATPLOTLIB_MISSING = "--plot needs matplotlib: pip install 'gptoss-stream[plot]' (or pip install matplotlib)"



def plot_report(report: dict[str, Any], path: str | os.PathLike) -> None:
    """A PNG timeline: memory (anonymous, file-backed, cgroup, cached checkpoint) over the phases; tok/s."""
    try:
        import matplotlib
    except ImportError:
        raise SetupError(MATPLOTLIB_MISSING) from None
    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    samples = report["samples"]
    gib = 2 ** 30
    t = [s["t"] for s in samples]

    def series(key: str) -> tuple[list[float], list[float]]:
        pts = [(s["t"], s[key] / gib) for s in samples if s[key] is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, (mem, speed) = plt.subplots(2, 1, figsize=(11, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    anon = [(s["rss_anon"] or 0) / gib for s in samples]
    file = [(s["rss_file"] or 0) / gib for s in samples]
    mem.stackplot(t, anon, file, labels=["RSS anonymous", "RSS file-backed (mapped checkpoint, libraries)"],
                  colors=["#4c72b0", "#9ecae1"], alpha=0.9, step="post")
    for key, label, style in (("cgroup_usage", "cgroup usage (incl. page cache)", "-"),
                              ("dense_resident", "checkpoint dense weights in page cache", "--"),
                              ("embedding_resident", "checkpoint embedding rows in page cache", "-."),
                              ("expert_resident", "checkpoint experts in page cache", ":")):
        x, y = series(key)
        if x:
            mem.plot(x, y, style, label=label, linewidth=1.5)
    limit = report["settings"].get("limit")
    if limit:
        mem.axhline(limit / gib, color="red", linewidth=1, label=f"limit {format_bytes(limit)}")
    colours = {"load": "#dddddd", "prefill": "#fde0c5", "decode": "#d9f0d3"}
    for ax in (mem, speed):
        for p in report["phases"]:
            end = p["end"] if p["end"] is not None else t[-1]
            ax.axvspan(p["start"], end, color=colours.get(p["name"], "#eeeeee"), alpha=0.5, zorder=0, linewidth=0)
    top, span = mem.get_ylim()[1], max(t[-1], 1e-9)
    for p in report["phases"]:
        end = p["end"] if p["end"] is not None else t[-1]
        narrow = (end - p["start"]) < 0.08 * span  # a short load phase: write its name upright
        mem.text((p["start"] + end) / 2, top, p["name"], va="top", ha="center", fontsize=9,
                 rotation=90 if narrow else 0)
    mem.set_ylabel("GiB")
    mem.legend(loc="upper left", fontsize=8, bbox_to_anchor=(0.0, 0.92))
    mem.set_title(f"gptoss memprof: {Path(report['model']['path']).name}, prompt "
                  f"{report['settings']['prompt_tokens']} tok, {report['settings']['max_tokens']} generated, "
                  f"limit {format_bytes(limit) if limit else 'none'}", fontsize=10)

    steps = [tok for tok in report["tokens"] if tok["phase"] == "decode" and tok["seconds"] > 0]
    speed.plot([tok["t"] for tok in steps], [1 / tok["seconds"] for tok in steps], ".-", color="#2ca02c",
               label="decode tok/s")
    speed.set_ylabel("tok/s")
    speed.set_xlabel("seconds")
    disk = speed.twinx()
    xs, rates = [], []
    for prev, cur in zip(samples, samples[1:]):
        if cur["t"] > prev["t"]:
            xs.append(cur["t"])
            rates.append((cur["read_bytes"] - prev["read_bytes"]) / (cur["t"] - prev["t"]) / 2 ** 20)
    disk.plot(xs, rates, color="#8c564b", linewidth=0.8, alpha=0.7, label="disk read MiB/s")
    disk.set_ylabel("disk MiB/s")
    speed.set_ylim(bottom=0)
    disk.set_ylim(bottom=0)
    handles = speed.get_legend_handles_labels()[0] + disk.get_legend_handles_labels()[0]
    speed.legend(handles, [h.get_label() for h in handles], loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

