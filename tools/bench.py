#!/usr/bin/env python3
"""End-to-end speed of gptoss-stream: prefill and decode tokens/s, peak memory, and how close both come to
this machine's limits, measured in the same run.

  python tools/bench.py -m /work/ckpt/20b [--prompt-tokens 64] [--decode-tokens 16] [--warm] [--profile]
                        [--isa NAME]

Limits. Decode is memory-bound: each token reads the active weights once (every layer's attention and router
weights, 4 experts per layer, the unembedding, one embedding row), so the limit is a read rate divided by
those bytes. That rate must be an upper bound on what decode can read, so it is the larger of
  - the best of 7 passes of all threads over a buffer of at least 2 GiB and 4x the last-level cache
    (gptoss_read_bandwidth; cache sizes from sysfs), and
  - the best of 5 timed M=1 GEMVs over this checkpoint's unembedding (our own kernel on real weights: if one
    of our kernels reads faster than the "limit", the limit is wrong).
Both raw figures are printed and saved beside the ratio. Prefill is compute-bound: the limit is the measured
GEMM rate divided by the matmul FLOPs per prompt token: the bf16 GEMM on the avx512 path; on the fp32 paths
oneDNN's fp32 GEMM on weights already widened (our own bf16 matmul if it is faster).

--warm reads the whole checkpoint through the page cache first (the "everything fits in RAM" case);
without it, whatever the page cache holds is used. --profile adds a per-token time breakdown by kernel.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptoss_stream.engine import kernels  # noqa: E402
from gptoss_stream.engine import model as model_module  # noqa: E402
from gptoss_stream.engine.model import Model  # noqa: E402
from gptoss_stream.weights.checkpoint import Checkpoint  # noqa: E402
from gptoss_stream.weights.config import ModelConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import add_isa_argument, last_level_cache_bytes, print_machine, use_isa  # noqa: E402


# ---------------------------------------------------------------------------- machine limits


def measure_bandwidth(passes: int = 7) -> float:
    """bytes/s of the best of `passes` passes of all threads over a buffer of at least 2 GiB and 4x the
    last-level cache (far beyond the caches). The best, not the median: the limit is an upper bound, and a
    fast pass is one the machine did manage (a median let our own GEMVs beat the "limit")."""
    buffer = np.ones(max(2 << 30, 4 * last_level_cache_bytes()), dtype=np.uint8)
    return kernels.read_bandwidth(buffer, repeats=passes)


def measure_gemv_bandwidth(model: Model, passes: int = 5) -> float:
    """bytes/s of weights read by the best of `passes` M=1 matmuls over the checkpoint's unembedding (the
    largest dense matrix decode reads, used in place from the mapping; a first untimed pass faults it in)."""
    w = model.unembedding
    x = np.full((1, w.shape[1]), 0x3F80, dtype=np.uint16)  # bf16 1.0
    out = np.empty((1, w.shape[0]), dtype=np.float32)
    if hasattr(w, "scales"):  # a q8 checkpoint (repack --dense q8): its GEMV reads int8 values + fp16 scales
        def gemv():
            kernels.matmul_q8(x, w.values, w.scales, out=out, out_dtype=np.float32)
    else:
        def gemv():
            kernels.matmul(x, w, out=out, out_dtype=np.float32)
    gemv()
    best = float("inf")
    for _ in range(passes):
        start = time.perf_counter()
        gemv()
        best = min(best, time.perf_counter() - start)
    return w.nbytes / best  # (Q8Weight.nbytes: values + scales)


def measure_gemm_flops(m: int = 512, n: int = 2880, k: int = 2880) -> tuple[float, str]:
    """FLOP/s of the GEMM prefill is bound by, best of 5, and its name. The bf16 path: the bf16 matmul
    prefill runs (weights [n, k] in place). The fp32 paths: oneDNN's fp32 GEMM on weights already in fp32
    (prefill also widens its bf16 / MXFP4 tiles first, so this is an upper bound for it), or our own bf16
    matmul if that is faster (it must not beat the limit)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0x3C00, 0x3F80, size=(m, k), dtype=np.uint16)
    w = rng.integers(0x3C00, 0x3F80, size=(n, k), dtype=np.uint16)
    out = np.empty((m, n), dtype=np.uint16)
    cases = [("bf16 GEMM", lambda: kernels.matmul(x, w, out=out))]
    if kernels.get_isa() != "avx512":
        xf, wf, outf = kernels.bf16_to_f32(x), kernels.bf16_to_f32(w), np.empty((m, n), np.float32)
        cases.append(("oneDNN fp32 GEMM", lambda: kernels.matmul_f32(xf, wf, out=outf)))
    rates = {}
    for name, run in cases:
        run()
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - start)
        rates[name] = 2.0 * m * n * k / best
    name = max(rates, key=rates.get)
    return rates[name], name


# ---------------------------------------------------------------------------- work per token


def decode_bytes_per_token(cfg: ModelConfig, expert_bytes: int, dense_format: str = "bf16") -> dict[str, int]:
    """Bytes of weights one decode token reads (bf16 dense, MXFP4 experts with their biases); dense_format
    "q8": the qkv, out, unembedding and embedding matrices as int8 + one fp16 scale per 32 values."""
    h, e = cfg.hidden_size, cfg.num_experts
    matrix = 1 + 2 / 32 if dense_format == "q8" else 2  # bytes per value of the q8-able matrices
    attention = int((cfg.qkv_dim * h + h * cfg.q_dim) * matrix) + (cfg.qkv_dim + h + cfg.num_attention_heads + 2 * h) * 2
    router = (e * h + e) * 2
    return {
        "attention": cfg.num_hidden_layers * attention,
        "router": cfg.num_hidden_layers * router,
        "experts": cfg.num_hidden_layers * cfg.experts_per_token * expert_bytes,
        "unembedding": int(cfg.vocab_size * h * matrix) + h * 2,
        "embedding_row": int(h * matrix),
    }


def prefill_flops_per_token(cfg: ModelConfig) -> float:
    """Matmul FLOPs per prompt token (attention projections, router, 4 experts; logits only for the last
    token, so not counted)."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    per_layer = cfg.qkv_dim * h + h * cfg.q_dim + cfg.num_experts * h
    per_layer += cfg.experts_per_token * (2 * i * h + h * i)
    return 2.0 * cfg.num_hidden_layers * per_layer


# ---------------------------------------------------------------------------- profile


class KernelProfile:
    """Wraps the kernels the model calls and attributes their time to a category: which kernel, and for
    matmuls which part of the model called it. What is left of the wall time is Python."""

    CATEGORIES = {
        ("attention_block", "attention_block"): "attention block (norm, qkv, rope, attention, out)",
        ("route", "moe_route"): "router (norm, gate, top-k)",
        ("moe_block", "moe_route"): "next layer's expert guess (prefetch)",
        ("moe_block", "expert_mlp"): "experts (mlp1, swiglu, mlp2, combine)",
        ("logits", "matmul"): "unembedding",
        ("logits", "matmul_q8"): "unembedding",
        ("embed", "dequantize_q8_rows"): "embedding rows (q8)",
    }

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.phase = "other"
        self._originals: list[tuple[object, str, object]] = []

    def install(self) -> None:
        for name in ("matmul", "matmul_q8", "dequantize_q8_rows", "attention_block", "moe_route", "expert_mlp",
                     "rmsnorm", "add_f32_"):
            self._wrap(model_module.kernels, name, self._timed_kernel)
        for name in ("attention_block", "route", "moe_block", "logits", "embed"):
            self._wrap(Model, name, self._phase_method)

    def uninstall(self) -> None:
        for owner, name, original in reversed(self._originals):
            setattr(owner, name, original)

    def _wrap(self, owner, name, factory) -> None:
        original = getattr(owner, name)
        self._originals.append((owner, name, original))
        setattr(owner, name, factory(name, original))

    def _timed_kernel(self, name, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                category = self.CATEGORIES.get((self.phase, name), "other kernels (final norm, MoE add)")
                self.seconds[category] += time.perf_counter() - start
        return timed

    def _phase_method(self, name, fn):
        def phased(model_self, *args, **kwargs):
            outer, self.phase = self.phase, name
            try:
                return fn(model_self, *args, **kwargs)
            finally:
                self.phase = outer
        return phased


# ---------------------------------------------------------------------------- run


def warm_page_cache(paths: list[str]) -> float:
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass
    return time.perf_counter() - start


def rss_anon_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def print_profile(title: str, profile: KernelProfile, total_s: float, tokens: int) -> dict[str, float]:
    """Prints and returns ms per token by category; what the kernels do not account for is Python."""
    rows = sorted(profile.seconds.items(), key=lambda kv: -kv[1])
    ms = {k: 1e3 * v / tokens for k, v in rows}
    ms["python and other"] = 1e3 * (total_s - sum(profile.seconds.values())) / tokens
    print(title)
    for name, value in ms.items():
        print(f"  {name:38} {value:8.2f} ms  {value / (1e3 * total_s / tokens):6.1%}")
    return ms


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", required=True, help="checkpoint folder")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--chunk", type=int, default=None, help="prefill chunk (default: the whole prompt)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--warm", action="store_true", help="read the whole checkpoint into the page cache first")
    p.add_argument("--profile", action="store_true", help="per-token time breakdown (adds a little overhead)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    add_isa_argument(p)
    args = p.parse_args(argv)

    use_isa(args.isa)
    print_machine()
    kernels.set_num_threads(args.threads)
    threads = kernels.get_num_threads()
    checkpoint = Checkpoint.open(args.model)
    cfg = checkpoint.config
    if args.warm:
        print(f"warm: read the checkpoint in {warm_page_cache(checkpoint.files()):.1f} s", file=sys.stderr)
    model = Model(checkpoint, max_chunk=args.chunk or args.prompt_tokens, num_threads=args.threads)
    tokens = np.random.default_rng(0).integers(0, 199_998, size=args.prompt_tokens).tolist()

    cache = model.new_cache(args.prompt_tokens + args.decode_tokens + 1)
    prefill_profile = KernelProfile() if args.profile else None
    if prefill_profile:
        prefill_profile.install()
    start = time.perf_counter()
    logits = model.forward(tokens, cache)
    prefill_s = time.perf_counter() - start
    if prefill_profile:
        prefill_profile.uninstall()

    profile = KernelProfile() if args.profile else None
    if profile:
        profile.install()
    steps = []
    token = int(np.argmax(logits))
    for _ in range(args.decode_tokens):
        start = time.perf_counter()
        token = int(np.argmax(model.forward([token], cache)))
        steps.append(time.perf_counter() - start)
    if profile:
        profile.uninstall()

    # Memory first (the limits below allocate a 2 GiB buffer), then the machine's limits in the same run.
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rss_anon_mb = rss_anon_bytes() / 2**20
    read_bandwidth = measure_bandwidth()
    gemv_bandwidth = measure_gemv_bandwidth(model)
    bandwidth = max(read_bandwidth, gemv_bandwidth)
    gemm, gemm_name = measure_gemm_flops()
    print(f"machine: {threads} threads, read bandwidth {read_bandwidth / 1e9:.1f} GB/s (best of 7 passes), "
          f"M=1 unembedding GEMV {gemv_bandwidth / 1e9:.1f} GB/s (best of 5): decode limit uses "
          f"{bandwidth / 1e9:.1f} GB/s; {gemm_name} (M=512) {gemm / 1e9:.0f} GFLOP/s", file=sys.stderr)

    per_token = decode_bytes_per_token(cfg, checkpoint.expert_nbytes(0, 0), checkpoint.dense_format)
    bytes_per_token = sum(per_token.values())
    decode_tps = 1.0 / float(np.median(steps))
    decode_limit = bandwidth / bytes_per_token
    prefill_tps = args.prompt_tokens / prefill_s
    prefill_limit = gemm / prefill_flops_per_token(cfg)
    results = {
        "model": str(args.model), "threads": threads, "prompt_tokens": args.prompt_tokens,
        "decode_tokens": args.decode_tokens, "warm": args.warm, "isa": kernels.get_isa(),
        "read_bandwidth_gbps": read_bandwidth / 1e9, "gemv_bandwidth_gbps": gemv_bandwidth / 1e9,
        "limit_bandwidth_gbps": bandwidth / 1e9, "gemm_gflops": gemm / 1e9, "gemm_limit": gemm_name,
        "decode_bytes_per_token": per_token,
        "prefill_tok_s": prefill_tps, "prefill_limit_tok_s": prefill_limit,
        "decode_tok_s": decode_tps, "decode_limit_tok_s": decode_limit,
        "decode_ms_median": 1e3 * float(np.median(steps)), "decode_ms_min": 1e3 * min(steps),
        "peak_rss_mb": peak_rss_mb, "rss_anon_mb": rss_anon_mb,
    }
    print(f"{'':10} {'tok/s':>8} {'limit':>8} {'ratio':>6}")
    print(f"{'prefill':10} {prefill_tps:8.2f} {prefill_limit:8.2f} {prefill_tps / prefill_limit:6.0%}"
          f"   ({args.prompt_tokens} tokens, GEMM-bound limit)")
    print(f"{'decode':10} {decode_tps:8.2f} {decode_limit:8.2f} {decode_tps / decode_limit:6.0%}"
          f"   ({bytes_per_token / 1e9:.2f} GB of weights per token at {bandwidth / 1e9:.1f} GB/s = max(read "
          f"{read_bandwidth / 1e9:.1f}, GEMV {gemv_bandwidth / 1e9:.1f}))")
    fastest_step_rate = bytes_per_token / min(steps) if steps else 0.0
    if fastest_step_rate > bandwidth:
        print(f"warning: the fastest decode step read its weights at {fastest_step_rate / 1e9:.1f} GB/s, above the "
              f"limit's {bandwidth / 1e9:.1f} (weights in a cache, or the limit is not an upper bound)", file=sys.stderr)
    print(f"peak RSS {results['peak_rss_mb']:.0f} MB, RssAnon {results['rss_anon_mb']:.0f} MB")
    if profile:
        results["prefill_profile_ms_per_token"] = print_profile(
            f"prefill time per prompt token ({args.prompt_tokens} tokens in one forward):", prefill_profile,
            prefill_s, args.prompt_tokens)
        results["profile_ms_per_token"] = print_profile("decode time per token:", profile, sum(steps), len(steps))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
