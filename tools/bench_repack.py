"""Benchmark `gptoss repack` on a full-size checkpoint, and what the layout buys: random expert fetches.

    python tools/bench_repack.py                                  # /work/ckpt/20b/original -> /work/ckpt/20b-repacked
    python tools/bench_repack.py --src /tmp/20b-2l --dst /tmp/20b-2l-rp --verify --fetch 128

1. `gptoss repack SRC DST --force` in a child process: wall time, MB/s written, the child's peak RSS.
2. With --verify, a second child, `gptoss repack SRC DST --verify`, which finds DST complete and only
   verifies it (every byte re-read and compared with SRC, every sha256 checked).
3. --fetch N random (layer, expert) pairs, the same sequence for both layouts, read with O_DIRECT (no page
   cache: what a cold, memory-capped run sees): from SRC, six reads per expert, each widened to 4096-byte
   boundaries as O_DIRECT requires; from DST, one read per expert record.

Refuses to start while the machine is busy (1-minute load average above --max-load): on a shared 2-core
box the numbers would measure someone else's work. The source may be partly in the page cache (we never
drop caches on a shared machine), so step 1 is write- and hash-bound rather than a cold-read measurement.
"""

from __future__ import annotations

import argparse
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gptoss_stream.progress import format_bytes  # noqa: E402
from gptoss_stream.weights.checkpoint import Checkpoint  # noqa: E402

sys.path.insert(0, str(ROOT / "tools"))
from machine import print_machine  # noqa: E402

DIRECT_ALIGN = 4096


def check_source(src: Path) -> int:
    """The source must be complete: no file still being written, every header consistent with its file."""
    if not src.exists():
        raise SystemExit(f"{src}: not found (generate it with `gptoss make-checkpoint`)")
    leftovers = sorted(p.name for p in src.iterdir() if p.name.endswith((".partial", ".tmp")))
    if leftovers:
        raise SystemExit(f"{src}: still being written ({', '.join(leftovers)}); try again when it is complete")
    with Checkpoint.open(src) as ck:  # validates every tensor's name, dtype, shape and extent
        print(f"source {ck.path} ({ck.format}): {ck.config.num_hidden_layers} layers x {ck.config.num_experts} "
              f"experts, {format_bytes(ck.nbytes())} in {len(ck.files())} file(s)")
        return ck.nbytes()


def run_child(args: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, CPU line) of `gptoss <args>` in a child process; stderr (progress) passes
    through. The CPU line (user + system seconds, load average after) tells a CPU-bound run from a disturbed one."""
    cmd = [sys.executable, "-m", "gptoss_stream.commands.cli", *args]
    print("$ gptoss " + " ".join(args), flush=True)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.monotonic() - start
    print(out, end="")
    if proc.returncode != 0:
        raise SystemExit(f"gptoss {' '.join(args)} failed with status {proc.returncode}")
    # ru_inblock: 512-byte blocks read from storage (a source already in the page cache reads ~0).
    cpu = (f"CPU user {usage.ru_utime:.1f} s + system {usage.ru_stime:.1f} s "
           f"({(usage.ru_utime + usage.ru_stime) / seconds * 100:.0f}%), {format_bytes(usage.ru_inblock * 512)} "
           f"read from disk, load average after {os.getloadavg()[0]:.2f}")
    return seconds, usage.ru_maxrss * 1024, cpu


def fetch_experts(ckpt, pairs: list[tuple[int, int]]) -> tuple[float, int, int]:
    """Read each pair's expert with O_DIRECT, one request per range: (seconds, bytes read, requests)."""
    fds = {p: os.open(p, os.O_RDONLY | os.O_DIRECT) for p in ckpt.files()}
    try:
        spans = []
        for layer, e in pairs:
            for r in ckpt.expert_ranges(layer, e):
                a0 = r.offset // DIRECT_ALIGN * DIRECT_ALIGN
                a1 = -(-(r.offset + r.nbytes) // DIRECT_ALIGN) * DIRECT_ALIGN
                spans.append((fds[r.path], a0, a1 - a0))
        buf = mmap.mmap(-1, max(n for _, _, n in spans))  # page-aligned, as O_DIRECT needs
        view = memoryview(buf)
        start = time.perf_counter()
        for fd, offset, n in spans:
            done = 0
            while done < n:
                got = os.preadv(fd, [view[done:n]], offset + done)
                if got == 0:
                    break  # a widened last range may reach past the end of the file
                done += got
        seconds = time.perf_counter() - start
        view.release()
        buf.close()
        return seconds, sum(n for _, _, n in spans), len(spans)
    finally:
        for fd in fds.values():
            os.close(fd)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, default=Path("/work/ckpt/20b/original"))
    ap.add_argument("--dst", type=Path, default=Path("/work/ckpt/20b-repacked"))
    ap.add_argument("--shard-size", default="2G")
    ap.add_argument("--align", type=int, default=4096)
    ap.add_argument("--verify", action="store_true", help="also time a full --verify pass")
    ap.add_argument("--fetch", type=int, default=256, metavar="N", help="random experts to fetch (0 = skip)")
    ap.add_argument("--repeat", type=int, default=3, metavar="R", help="fetch passes per layout (median shown)")
    ap.add_argument("--skip-repack", action="store_true", help="DST is already repacked: only verify/fetch")
    ap.add_argument("--max-load", type=float, default=1.0,
                    help="refuse to start when the 1-minute load average is above this (default 1.0)")
    args = ap.parse_args()

    load = os.getloadavg()[0]
    if load > args.max_load:
        raise SystemExit(f"machine busy (load average {load:.2f} > --max-load {args.max_load}); try later")
    print_machine()
    print(f"load average {load:.2f}, {os.cpu_count()} cpus")
    src_bytes = check_source(args.src)

    if not args.skip_repack:
        seconds, rss, cpu = run_child(["repack", str(args.src), str(args.dst), "--force", "--quiet",
                                       "--shard-size", args.shard_size, "--align", str(args.align)])
        dst_bytes = sum(p.stat().st_size for p in args.dst.glob("*.safetensors"))
        print(f"[repack] {format_bytes(src_bytes)} -> {format_bytes(dst_bytes)} in {seconds:.1f} s: "
              f"{dst_bytes / seconds / 1e6:.0f} MB/s, peak RSS {format_bytes(rss)}; {cpu}")
    if args.verify:
        seconds, rss, cpu = run_child(["repack", str(args.src), str(args.dst), "--verify", "--quiet",
                                       "--shard-size", args.shard_size, "--align", str(args.align)])
        dst_bytes = sum(p.stat().st_size for p in args.dst.glob("*.safetensors"))
        print(f"[verify] {format_bytes(dst_bytes)} re-read and compared in {seconds:.1f} s: "
              f"{dst_bytes / seconds / 1e6:.0f} MB/s, peak RSS {format_bytes(rss)}; {cpu}")
    if args.fetch:
        with Checkpoint.open(args.src) as src, Checkpoint.open(args.dst) as dst:
            cfg = src.config
            rng = np.random.default_rng(0)
            pairs = [(int(rng.integers(cfg.num_hidden_layers)), int(rng.integers(cfg.num_experts)))
                     for _ in range(args.fetch)]
            layouts = {"source": src, "repacked": dst}
            runs: dict[str, list[float]] = {name: [] for name in layouts}
            sizes: dict[str, tuple[int, int]] = {}
            for i in range(args.repeat):
                # Alternate which layout goes first, so neither always follows the other's disk activity.
                for name in (list(layouts) if i % 2 == 0 else list(layouts)[::-1]):
                    seconds, nbytes, requests = fetch_experts(layouts[name], pairs)
                    runs[name].append(seconds)
                    sizes[name] = (nbytes, requests)
            for name, times in runs.items():
                seconds, (nbytes, requests) = float(np.median(times)), sizes[name]
                print(f"[fetch {name:8s}] {len(pairs)} experts, {requests} O_DIRECT reads, {format_bytes(nbytes)}: "
                      f"median of {len(times)} {seconds:.2f} s (min {min(times):.2f}): "
                      f"{len(pairs) / seconds:.0f} experts/s, {nbytes / seconds / 1e6:.0f} MB/s, "
                      f"{seconds / len(pairs) * 1e3:.2f} ms/expert")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
