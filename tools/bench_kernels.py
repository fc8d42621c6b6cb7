#!/usr/bin/env python3
"""Throughput of libgptoss's MXFP4 dequantization and oneDNN matmuls on this machine.

Prints one table row per case: time per call (median over the repeats) and the rate, median and best.
GEMV-shaped cases (M = 1) rotate over enough weight copies to exceed the last-level cache (its size read from
/sys/devices/system/cpu/cpu0/cache) four times, so their numbers are memory bandwidth, not cache bandwidth.
The first line names the CPU, the compute path (--isa NAME forces one, e.g. avx2 on an AVX-512 host) and the
caches. Rates:
  dequant        GB/s of bf16 written (the kernel's output); "per core" divides by the thread count.
  matmul M=1     GB/s of bf16 weights read.
  matmul_mxfp4   GB/s of MXFP4 bytes read (blocks + scales), and the bf16-equivalent rate (k * n * 2 bytes).
  matmul M>1     GFLOP/s (2 m n k per call).
  q8             the 8-bit dense layout (gptoss_matmul_q8) at M=1 on the 20b shapes: GB/s of q8 bytes read
                 (int8 values + fp16 scales, 1.0625 bytes per weight) beside the bf16 GEMV of the same shape
                 (GB/s of bf16 read) and the machine's read bandwidth (all threads streaming 2 GiB, best of 7);
                 then M=64 and 512 prefill-shaped products (GFLOP/s), q8 against bf16.

    python tools/bench_kernels.py                 # everything, 1 and 2 threads
    python tools/bench_kernels.py --only dequant gemv --threads 2
    python tools/bench_kernels.py --mxfp4-modes   # tile size / parallel-tiles sweep for matmul_mxfp4
    python tools/bench_kernels.py --only q8 --threads 2   # q8 dense layout against bf16 and the bandwidth
    python tools/bench_kernels.py --only mxfp4 --threads 2 --tile-rows 64 --scratch-tiles 1   # one of those
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptoss_stream.engine import _lib, kernels  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import add_isa_argument, last_level_cache_bytes, print_machine, use_isa  # noqa: E402

SECTIONS = ("dequant", "gemv", "mxfp4", "gemm", "q8")


@dataclass
class Result:
    case: str
    threads: int
    seconds: list[float]
    unit: str
    amount: float  # bytes or flops per call

    def rate(self, seconds: float) -> float:
        return self.amount / seconds / 1e9

    def row(self) -> str:
        median, best = statistics.median(self.seconds), min(self.seconds)
        return (f"{self.case:<44} {self.threads:>3} {median * 1e3:>10.3f} {self.rate(median):>9.1f} "
                f"{self.rate(best):>9.1f}  {self.unit}")


HEADER = f"{'case':<44} {'thr':>3} {'ms/call':>10} {'median':>9} {'best':>9}  unit"


def measure(fn: Callable[[int], None], calls: int, repeats: int, min_seconds: float) -> list[float]:
    """Seconds per call for `repeats` batches of `calls` calls (fn gets the call index: rotate buffers)."""
    fn(0)  # warm-up: primitive creation, page faults
    times = []
    i = 0
    for _ in range(repeats):
        n = calls
        while True:
            t = time.perf_counter()
            for _ in range(n):
                fn(i)
                i += 1
            dt = time.perf_counter() - t
            if dt >= min_seconds or n >= 1 << 20:
                break
            n *= 2
        times.append(dt / n)
    return times


def random_bf16(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Finite bf16 values; large arrays tile a random 1 Mi-element pattern (generating more is slow)."""
    size = int(np.prod(shape))
    pattern = (rng.standard_normal(min(size, 1 << 20)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return np.resize(pattern, size).reshape(shape)


def random_mxfp4(rng: np.random.Generator, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    blocks = rng.integers(0, 256, (n, k // 32, 16), dtype=np.uint8)
    scales = rng.integers(118, 128, (n, k // 32), dtype=np.uint8)
    return blocks, scales


def copies_for(nbytes: int) -> int:
    """Weight copies to rotate over so that a pass reads >= 4x the last-level cache."""
    return max(1, -(-4 * last_level_cache_bytes() // nbytes))


# ---------------------------------------------------------------- cases


def bench_dequant(rng, threads: int, args) -> list[Result]:
    """Tile: 512 KiB of bf16 per call into one buffer that stays in L2 (how matmul_mxfp4 uses it), reading
    MXFP4 rows from a large array. Stream: a whole 128 MiB output per call (memory-bound writes)."""
    k = 2880
    bpr = k // 32
    n_rows = 5760 * 8  # 119 MB of MXFP4 input
    blocks, scales = random_mxfp4(rng, n_rows, k)
    fn = _lib.lib.gptoss_dequantize_mxfp4_rows
    results = []
    tile = 91  # 91 rows x 2880 x 2 B = 512 KiB
    out = np.empty((tile, k), dtype=np.uint16)
    pb, ps, po = blocks.ctypes.data, scales.ctypes.data, out.ctypes.data
    n_tiles = n_rows // tile

    def tile_call(i: int) -> None:
        r = (i % n_tiles) * tile
        fn(pb, ps, n_rows, bpr, r, r + tile, po)

    sec = measure(tile_call, 200, args.repeats, args.min_seconds)
    results.append(Result("dequant tile 512 KiB out (per core)", threads, [s * threads for s in sec],
                          "GB/s bf16 out", out.nbytes))
    results.append(Result("dequant tile 512 KiB out (total)", threads, sec, "GB/s bf16 out", out.nbytes))
    rows = 23_040  # 128 MiB of bf16
    big = np.empty((rows, k), dtype=np.uint16)
    big.fill(0)  # fault the pages in before timing

    def stream_call(i: int) -> None:
        r = (i % 2) * rows
        fn(pb, ps, n_rows, bpr, r, r + rows, big.ctypes.data)

    sec = measure(stream_call, 1, args.repeats, args.min_seconds)
    results.append(Result("dequant stream 128 MiB out (total)", threads, sec, "GB/s bf16 out", big.nbytes))
    return results


def bench_gemv(rng, threads: int, args) -> list[Result]:
    results = []
    cases = [("mlp1 [5760, 2880]", 5760, 2880, np.uint16), ("attn out / mlp2 [2880, 2880]", 2880, 2880, np.uint16),
             ("qkv [5120, 2880]", 5120, 2880, np.uint16)]
    if not args.skip_unembedding:
        cases.append(("unembedding [201088, 2880] f32 out", 201088, 2880, np.float32))
    for name, n, k, out_dtype in cases:
        nbytes = n * k * 2
        ws = [random_bf16(rng, (n, k)) for _ in range(copies_for(nbytes))]
        x = random_bf16(rng, (1, k))
        y = np.empty((1, n), dtype=out_dtype)
        results.append(Result(f"matmul M=1 {name}", threads,
                              measure(lambda i: kernels.matmul(x, ws[i % len(ws)], out=y), 4, args.repeats,
                                      args.min_seconds), "GB/s weights", nbytes))
        ws.clear()  # free the copies (the lambda above holds the list)
    return results


def bench_mxfp4(rng, threads: int, args, tile_rows: int = 0, scratch_tiles: int | None = None,
                label: str = "") -> list[Result]:
    results = []
    for name, n, k in [("mlp1 [5760, 2880]", 5760, 2880), ("mlp2 [2880, 2880]", 2880, 2880)]:
        mx_bytes = n * k // 32 * 17
        experts = [random_mxfp4(rng, n, k) for _ in range(copies_for(mx_bytes))]
        x = random_bf16(rng, (1, k))
        bias = random_bf16(rng, (n,))
        y = np.empty((1, n), dtype=np.uint16)
        rows = tile_rows or 512  # the library's default tile is ~2 MiB of bf16 (364 rows of 2880): room for it
        scratch = np.empty((scratch_tiles or threads) * rows * k, dtype=np.uint16)

        def call(i: int) -> None:
            blocks, scales = experts[i % len(experts)]
            kernels.matmul_mxfp4(x, blocks, scales, bias, scratch, out=y, tile_rows=tile_rows)

        sec = measure(call, 4, args.repeats, args.min_seconds)
        case = f"matmul_mxfp4 M=1 {name}{label}"
        results.append(Result(case, threads, sec, "GB/s MXFP4", mx_bytes))
        results.append(Result(case, threads, sec, "GB/s bf16-equivalent", n * k * 2))
    return results


def bench_gemm(rng, threads: int, args) -> list[Result]:
    results = []
    n = k = 2880
    w = random_bf16(rng, (n, k))
    for m in (64, 512):
        x = random_bf16(rng, (m, k))
        y = np.empty((m, n), dtype=np.uint16)
        sec = measure(lambda i: kernels.matmul(x, w, out=y), 2, args.repeats, args.min_seconds)
        results.append(Result(f"matmul M={m} [2880, 2880]", threads, sec, "GFLOP/s", 2 * m * n * k))
    return results


def bench_q8(rng, threads: int, args) -> list[Result]:
    """The q8 dense layout at M=1 against bf16 and the read bandwidth, then prefill-shaped M > 8."""
    results = []
    buffer = np.ones(max(2 << 30, 4 * last_level_cache_bytes()), dtype=np.uint8)
    bandwidth = kernels.read_bandwidth(buffer, repeats=7)  # the best pass: an upper bound (as tools/bench.py)
    results.append(Result("read bandwidth (2 GiB, best of 7 passes)", threads, [buffer.nbytes / bandwidth],
                          "GB/s read", buffer.nbytes))
    del buffer
    cases = [("qkv [5120, 2880]", 5120, 2880, np.uint16), ("attn out [2880, 4096]", 2880, 4096, np.uint16)]
    if not args.skip_unembedding:
        cases.append(("unembedding [201088, 2880] f32 out", 201088, 2880, np.float32))
    for name, n, k, out_dtype in cases:
        x = random_bf16(rng, (1, k))
        y = np.empty((1, n), dtype=out_dtype)
        bf16_bytes, q8_bytes = n * k * 2, n * k + n * k // 32 * 2
        ws = [random_bf16(rng, (n, k)) for _ in range(copies_for(bf16_bytes))]
        results.append(Result(f"bf16 matmul M=1 {name}", threads,
                              measure(lambda i: kernels.matmul(x, ws[i % len(ws)], out=y), 4, args.repeats,
                                      args.min_seconds), "GB/s bf16 read", bf16_bytes))
        # Quantize one copy and rotate over copies of its q8 form (quantizing each 1.2 GB copy takes seconds).
        q, sc = kernels.quantize_q8(ws[0])
        ws.clear()  # free the bf16 copies (the lambda above holds the list)
        qs = [(q, sc)] + [(q.copy(), sc.copy()) for _ in range(copies_for(q8_bytes) - 1)]
        sec = measure(lambda i: kernels.matmul_q8(x, *qs[i % len(qs)], out=y), 4, args.repeats, args.min_seconds)
        results.append(Result(f"q8 matmul M=1 {name}", threads, sec, "GB/s q8 read", q8_bytes))
        results.append(Result(f"q8 matmul M=1 {name}", threads, sec, "GB/s bf16-equivalent", bf16_bytes))
        qs.clear()
        del q, sc
    n, k = 5120, 2880
    w = random_bf16(rng, (n, k))
    q, sc = kernels.quantize_q8(w)
    for m in (16, 64, 512):
        x = random_bf16(rng, (m, k))
        y = np.empty((m, n), dtype=np.uint16)
        for label, fn in (("bf16", lambda i: kernels.matmul(x, w, out=y)),
                          ("q8", lambda i: kernels.matmul_q8(x, q, sc, out=y))):
            sec = measure(fn, 2, args.repeats, args.min_seconds)
            results.append(Result(f"{label} matmul M={m} qkv [5120, 2880]", threads, sec, "GFLOP/s", 2 * m * n * k))
    return results


def mxfp4_modes(rng, threads: int, args) -> list[Result]:
    """matmul_mxfp4 with every tile size and both modes: one scratch tile (serial tiles, oneDNN and the
    dequantizer use all threads per tile) or one per thread (parallel tiles, single-threaded oneDNN)."""
    results = []
    for tile_rows in (32, 64, 96, 128, 192, 256, 384):
        for scratch_tiles, mode in ((1, "serial"), (threads, "parallel")):
            if mode == "parallel" and threads == 1:
                continue
            results += bench_mxfp4(rng, threads, args, tile_rows, scratch_tiles,
                                   f" tile {tile_rows} {mode}")[::2]
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts (default: 1 2)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run")
    parser.add_argument("--repeats", type=int, default=7, help="timed batches per case (median and best shown)")
    parser.add_argument("--min-seconds", type=float, default=0.05, help="minimum duration of one timed batch")
    parser.add_argument("--skip-unembedding", action="store_true", help="skip the 1.2 GB unembedding GEMV")
    parser.add_argument("--mxfp4-modes", action="store_true", help="sweep matmul_mxfp4 tile sizes and modes")
    parser.add_argument("--tile-rows", type=int, help="matmul_mxfp4 tile rows (default: the library's choice)")
    parser.add_argument("--scratch-tiles", type=int,
                        help="matmul_mxfp4 scratch size in tiles (default: one per thread; 1 = serial tiles)")
    add_isa_argument(parser)
    args = parser.parse_args(argv)

    use_isa(args.isa)
    print_machine()
    rng = np.random.default_rng(0)
    print(f"isa {kernels.get_isa()}, threads {args.threads}; rates in 1e9 units per second")
    print(HEADER)
    sections = {"dequant": bench_dequant, "gemv": bench_gemv, "mxfp4": bench_mxfp4, "gemm": bench_gemm,
                "q8": bench_q8}
    for threads in args.threads:
        kernels.set_num_threads(threads)
        if args.tile_rows is not None or args.scratch_tiles is not None:
            sections["mxfp4"] = lambda rng, threads, args: bench_mxfp4(
                rng, threads, args, args.tile_rows or 0, args.scratch_tiles,
                f" tile {args.tile_rows or 'default'} x{args.scratch_tiles or threads}")
        todo = [mxfp4_modes] if args.mxfp4_modes else [sections[s] for s in args.only]
        for bench in todo:
            for result in bench(rng, threads, args):
                print(result.row(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
