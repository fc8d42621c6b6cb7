#!/usr/bin/env python3
"""A long context inside a RAM budget: memory of the whole group, and logits against the mapped run.

    python tools/bench_long_context.py -m /work/ckpt/20b --prompt-tokens 16384 --ram-budget 8G --chunk 1024

Runs the same prompt (seeded random token ids, --prompt-tokens of them) twice, each in a child process:
1. under --ram-budget, inside a cgroup v1 memory group with a cold page cache whose limit (--cap, default
   twice the budget) sits above the budget, so the group's peak (anonymous memory + page cache,
   memory.max_usage_in_bytes) shows what the run takes rather than what the limit let it keep;
2. --mmap-only (the whole checkpoint mapped, no expert cache), outside any group.
Each prefills the prompt in pieces of --compare-every tokens, keeping the last position's logits after
every piece, then decodes --decode-tokens greedy tokens, keeping their logits. Passes when the budgeted
group peaked at most --tolerance (5%) above the budget, was never OOM-killed, and every compared position's
logits are bit-identical between the two runs. Prints a table per position and exits 1 otherwise.

Both runs use the same --chunk: the chunk sets the matmul shapes, which set the fp32 summation order. A long
prompt under a budget reads every expert once per chunk of the prefill, so a large chunk (1024-2048) keeps
the budgeted prefill from re-reading the experts hundreds of times.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from cgroup_run import run_in_memory_cgroup  # noqa: E402
from machine import print_machine  # noqa: E402
from gptoss_stream.streaming.budget import format_size, parse_size  # noqa: E402


def child(args: argparse.Namespace) -> int:
    """One run: prefill in pieces, greedy decode, logits of the compared positions to --out (npz)."""
    from gptoss_stream.commands.options import open_model
    from gptoss_stream.engine.generate import decode_one_token

    rng = np.random.default_rng(args.seed)
    args.stats = False
    timings = {}
    with open_model(args) as model:
        tokens = rng.integers(0, model.config.vocab_size, args.prompt_tokens).tolist()
        cache = model.new_cache(args.context)
        positions, rows = [], []
        started = time.perf_counter()
        for begin in range(0, len(tokens), args.compare_every):
            piece = tokens[begin:begin + args.compare_every]
            rows.append(model.forward(piece, cache))
            positions.append(cache.length - 1)
            print(f"[{args.mode}] prefilled {cache.length} of {len(tokens)} tokens, "
                  f"{time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        timings["prefill_seconds"] = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(args.decode_tokens):
            rows.append(decode_one_token(model, cache, int(np.argmax(rows[-1]))))
            positions.append(cache.length - 1)
        timings["decode_seconds"] = time.perf_counter() - started
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines()
                      if ":" in line)
        plan = getattr(args, "plan", None)
        np.savez(args.out, positions=np.array(positions), logits=np.stack(rows), tokens=np.array(tokens))
        Path(args.out + ".json").write_text(json.dumps({
            **timings, "rss_anon_kb": int(status["RssAnon"].split()[0]),
            "vm_hwm_kb": int(status["VmHWM"].split()[0]),
            "plan": plan.describe() if plan is not None else None,
            "expert_slots": plan.expert_slots if plan is not None else None,
        }))
    return 0


def child_command(args: argparse.Namespace, mode: str, out: str) -> list[str]:
    cmd = [sys.executable, __file__, "--child", mode, "--out", out, "-m", args.model,
           "--prompt-tokens", str(args.prompt_tokens), "--decode-tokens", str(args.decode_tokens),
           "--compare-every", str(args.compare_every), "--context", str(args.context), "--chunk", str(args.chunk),
           "--threads", str(args.threads), "--seed", str(args.seed)]
    if mode == "budget":
        cmd += ["--ram-budget", str(args.ram_budget)]
    else:
        cmd += ["--mmap-only"]
    return cmd


def main(argv: list[str] | None = None) -> int:
    from gptoss_stream.commands.options import add_model_arguments

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--prompt-tokens", type=int, default=16384, help="tokens of context to prefill (default %(default)s)")
    p.add_argument("--decode-tokens", type=int, default=4, help="greedy decode steps after it (default %(default)s)")
    p.add_argument("--compare-every", type=int, default=2048,
                   help="prefill in pieces of this many tokens, comparing the logits after each (default %(default)s)")
    p.add_argument("--cap", type=parse_size, default=None, help="cgroup limit of the budgeted run (default 2 x budget)")
    p.add_argument("--tolerance", type=float, default=0.05, help="allowed group peak above the budget (default 5%%)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt (default 0)")
    p.add_argument("--keep", metavar="DIR", default=None, help="keep the logits (npz) and run details here")
    p.add_argument("--child", choices=("budget", "mmap-only"), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.mode = args.child
        return child(args)
    if args.ram_budget is None:
        p.error("--ram-budget is required (the run to check)")
    if args.context < args.prompt_tokens + args.decode_tokens:
        args.context = args.prompt_tokens + args.decode_tokens
    cap = args.cap or 2 * args.ram_budget
    print_machine()
    print(f"# {args.model}: {args.prompt_tokens} prompt tokens + {args.decode_tokens} decoded, context "
          f"{args.context}, chunk {args.chunk}, budget {format_size(args.ram_budget)} in a group capped at "
          f"{format_size(cap)} (cold), then --mmap-only", flush=True)
    workdir = args.keep or tempfile.mkdtemp(prefix="gptoss-long-context-")
    os.makedirs(workdir, exist_ok=True)
    outs = {mode: os.path.join(workdir, f"{mode}.npz") for mode in ("budget", "mmap-only")}
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}

    run = run_in_memory_cgroup(child_command(args, "budget", outs["budget"]), cap, env=env,
                               name=f"gptoss-long-context-{os.getpid()}")
    sys.stderr.write(run.stderr[-4000:])
    if run.returncode != 0:
        print(f"budgeted run failed (exit {run.returncode}{', OOM-killed' if run.oom_killed else ''})")
        return 1
    mapped = subprocess.run(child_command(args, "mmap-only", outs["mmap-only"]), env=env, text=True,
                            stderr=subprocess.PIPE)
    sys.stderr.write(mapped.stderr[-4000:])
    if mapped.returncode != 0:
        print(f"mmap-only run failed (exit {mapped.returncode})")
        return 1

    a, b = np.load(outs["budget"]), np.load(outs["mmap-only"])
    info = {mode: json.loads(Path(outs[mode] + ".json").read_text()) for mode in outs}
    assert (a["tokens"] == b["tokens"]).all() and (a["positions"] == b["positions"]).all()
    print(f"plan: {info['budget']['plan']}")
    print(f"{'position':>9} {'max |diff|':>11} {'identical':>10} {'argmax':>8}")
    identical = True
    for i, pos in enumerate(a["positions"]):
        la, lb = a["logits"][i], b["logits"][i]
        same = bool(np.array_equal(la, lb))
        identical &= same
        print(f"{pos:>9} {float(np.max(np.abs(la - lb))):>11.3g} {'yes' if same else 'NO':>10} "
              f"{int(np.argmax(la)):>8}")
    limit = args.ram_budget * (1 + args.tolerance)
    inside = run.max_usage <= limit and not run.oom_killed
    for mode in ("budget", "mmap-only"):
        d = info[mode]
        print(f"{mode:>9}: prefill {args.prompt_tokens / d['prefill_seconds']:.2f} tok/s "
              f"({d['prefill_seconds']:.0f} s), decode {args.decode_tokens / max(d['decode_seconds'], 1e-9):.2f} "
              f"tok/s, RssAnon at the end {d['rss_anon_kb'] / 1024:.0f} MiB, VmHWM {d['vm_hwm_kb'] / 1024:.0f} MiB")
    print(f"budgeted group: peak {format_size(run.max_usage)} (budget {format_size(args.ram_budget)} + "
          f"{args.tolerance:.0%} = {format_size(limit)}), sampled peak RssAnon {format_size(run.sampled_peak_rss_anon)}, "
          f"limit {format_size(cap)} hit {run.failcnt} times{', OOM-killed' if run.oom_killed else ''}; "
          f"{run.seconds:.0f} s")
    ok = identical and inside
    print(f"logits {'bit-identical' if identical else 'DIFFER'} at {len(a['positions'])} positions; memory "
          f"{'inside' if inside else 'OUTSIDE'} the budget + {args.tolerance:.0%}: {'OK' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
