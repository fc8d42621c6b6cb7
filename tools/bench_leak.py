"""Leak check over a long run: many decode steps, RssAnon, open file descriptors and threads over time.

    python tools/bench_leak.py -m /tmp/gptoss-tiny/original --steps 1000 --mmap-only
    python tools/bench_leak.py -m /tmp/gptoss-tiny/original --steps 1000 --ram-budget 300M

Opens the model as `gptoss generate` does (same options: --ram-budget, --mmap-only, --context, --threads),
then runs --steps decode steps as generations of --generation-length tokens each (default: one generation;
shorter ones get a new KV cache and a new prompt each, as separate requests would), sampling with temperature
1 so the routed experts vary. Samples /proc/self (RssAnon, fds, threads) after the first 50 decode steps,
every --every steps, and at the end, with the KV cache rows written so far (memory a longer context uses by
design) and the memory of the Python objects and numpy arrays allocated since the start and still alive
(tracemalloc: a leak in our code grows it; growth of RssAnon alone can be glibc's heap, see README). Passes when RssAnon at the end is within --tolerance (5%) of the sample after 50 steps and the fds
and threads are the same; exits 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gptoss_stream.commands.options import add_model_arguments, make_sampler, open_model  # noqa: E402
from gptoss_stream.engine.generate import decode_one_token, prefill  # noqa: E402
from gptoss_stream.weights.config import layer_capacity  # noqa: E402

sys.path.insert(0, str(ROOT / "tools"))
from machine import print_machine  # noqa: E402


def sample(cache) -> dict[str, int]:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {"rss_anon_kb": int(status["RssAnon"].split()[0]), "rss_file_kb": int(status["RssFile"].split()[0]),
            "fds": len(os.listdir("/proc/self/fd")), "threads": int(status["Threads"]),
            "kv_kb": kv_rows_kb(cache), "traced_kb": tracemalloc.get_traced_memory()[0] // 1024}


def kv_rows_kb(cache) -> int:
    """KiB of KV cache rows written so far (keys and values of every layer, a sliding layer's ring at most):
    memory a longer context uses by design, told apart from a leak."""
    cfg = cache.config
    rows = sum(min(cache.length, layer_capacity(cfg, n, cache.context_length, cache.max_chunk))
               for n in range(cfg.num_hidden_layers))
    return rows * 2 * cfg.kv_dim * 2 // 1024


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--steps", type=int, default=1000, help="decode steps in all (default %(default)s)")
    p.add_argument("--generation-length", type=int, default=1000,
                   help="decode steps per generation (default 1000: one generation)")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--every", type=int, default=100, help="print a sample every N steps")
    p.add_argument("--tolerance", type=float, default=0.05, help="allowed RssAnon growth (default 5%%)")
    args = p.parse_args(argv)
    args.temperature, args.top_k, args.top_p, args.seed, args.max_tokens = 1.0, 0, 1.0, 0, 0
    if args.steps < 50:
        p.error("--steps must be at least 50 (the baseline is taken after 50)")
    print_machine()
    rng = np.random.default_rng(0)
    sampler = make_sampler(args)
    with open_model(args) as model:
        mode = "mmap-only" if model.experts.__class__.__name__ == "MappedExpertStore" else "expert cache"
        print(f"# {args.model}: {mode}, {args.steps} decode steps in generations of {args.generation_length}, "
              f"context {args.context}")
        print(f"{'step':>6} {'RssAnon MiB':>12} {'KV rows MiB':>12} {'traced MiB':>11} {'RssFile MiB':>12} "
              f"{'fds':>5} {'threads':>8} {'ms/step':>8}")
        tracemalloc.start()  # Python objects and numpy arrays allocated from here on, still alive
        step, baseline, started = 0, None, time.perf_counter()
        last = (0, started)
        while step < args.steps:
            cache = model.new_cache(args.context)
            prompt = rng.integers(0, model.config.vocab_size, args.prompt_tokens).tolist()
            logits = prefill(model, cache, prompt)
            for _ in range(min(args.generation_length, args.steps - step)):
                logits = decode_one_token(model, cache, sampler.sample(logits))
                step += 1
                if step == 50 or step % args.every == 0 or step == args.steps:
                    s = sample(cache)
                    now = time.perf_counter()
                    ms = (now - last[1]) * 1000 / max(step - last[0], 1)
                    last = (step, now)
                    print(f"{step:>6} {s['rss_anon_kb'] / 1024:>12.1f} {s['kv_kb'] / 1024:>12.2f} "
                          f"{s['traced_kb'] / 1024:>11.2f} {s['rss_file_kb'] / 1024:>12.1f} "
                          f"{s['fds']:>5} {s['threads']:>8} {ms:>8.2f}", flush=True)
                    if step == 50:
                        baseline = s
            del cache
    end = s
    growth = end["rss_anon_kb"] / baseline["rss_anon_kb"] - 1
    # The same without the KV rows written in between (a longer context, not a leak).
    other = (end["rss_anon_kb"] - end["kv_kb"]) / (baseline["rss_anon_kb"] - baseline["kv_kb"]) - 1
    ok = growth <= args.tolerance and end["fds"] == baseline["fds"] and end["threads"] == baseline["threads"]
    print(f"RssAnon after 50 steps {baseline['rss_anon_kb'] / 1024:.1f} MiB, after {args.steps} "
          f"{end['rss_anon_kb'] / 1024:.1f} MiB ({growth:+.2%}; {other:+.2%} without the KV cache rows written "
          f"since); traced Python/numpy memory {baseline['traced_kb'] / 1024:.2f} -> {end['traced_kb'] / 1024:.2f} "
          f"MiB; fds {baseline['fds']} -> {end['fds']}; threads {baseline['threads']} -> {end['threads']}: "
          f"{'OK' if ok else 'LEAK?'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
