#!/usr/bin/env python3
"""Benchmarks of expert streaming (docs/streaming.md has the numbers and how they were taken).

Modes:
  read    cold-cache reads of a set of experts by each method: page faults on the mapping, madvise(WILLNEED),
          MADV_POPULATE_READ, buffered pread, O_DIRECT pread (1 and 2 threads). Evicts the file from the page
          cache (posix_fadvise DONTNEED) before each method; reports payload GB/s and bytes fetched from disk.
  disk    O_DIRECT reads of one expert record's size at random offsets, queue depth 1..8: the disk's limit.
  policy  replays router traces (recorded from a checkpoint or by `run --trace-dir`, or modelled) through
          cache policies at several cache sizes: hit rates of global LRU, the engine's per-layer lru, lfu and
          decay (--cache-policy), and Belady's optimum.
  run     `gptoss generate` on a checkpoint inside cgroup v1 memory limits after dropping the page cache, plus
          an --mmap-only baseline: decode/prefill tok/s, peak cgroup memory, sampled peak RssAnon, bytes read
          per token, hit rate. Both sides get the same prompt and the same --tokens, and the ratios of the
          budget run to the baseline are printed per limit from this one run. Needs root and cgroup v1
          (/sys/fs/cgroup/memory). Valid numbers need a quiet machine. --disk measures the disk before and
          after and gives each run's decode as a fraction of its limit; --as-layers N runs a subset written
          with make-checkpoint --layers at the whole N-layer model's expert cache per layer.

Every mode first prints the CPU model, libgptoss's compute path and the caches.

Examples:
  python3 tools/bench_stream.py read -m /work/ckpt/20b --experts 32
  python3 tools/bench_stream.py policy -m /work/ckpt/20b --tokens 64
  python3 tools/bench_stream.py run -m /work/ckpt/20b --limits 16G,8G,4G,3G --tokens 32
  python3 tools/bench_stream.py run -m /work/scratch-120b/120b-12l --as-layers 36 --limits 8G,16G --disk
  python3 tools/bench_stream.py disk -m /work/ckpt/20b
"""

from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import print_machine  # noqa: E402

from gptoss_stream.commands.memprof.residency import evict_files  # noqa: E402
from gptoss_stream.streaming.budget import size_argument  # noqa: E402
from gptoss_stream.streaming.reader import FileReader, aligned_buffer, plan_record  # noqa: E402
from gptoss_stream.streaming.runstats import process_read_bytes  # noqa: E402
from gptoss_stream.weights.checkpoint import Checkpoint  # noqa: E402
from gptoss_stream.weights.layouts.base import EXPERT_PIECES, TensorRange  # noqa: E402

MADV_POPULATE_READ = 22  # linux/mman.h (5.14+); Python 3.11's mmap module does not name it
GB = 1e9


def load_average() -> float:
    return os.getloadavg()[0]


# ---------------------------------------------------------------------------- read


def pick_experts(ck: Checkpoint, count: int, seed: int) -> list[tuple[int, int]]:
    """`count` experts in groups of experts_per_token per layer, as decode would ask for them."""
    cfg = ck.config
    rng = np.random.default_rng(seed)
    out: list[tuple[int, int]] = []
    while len(out) < count:
        layer = int(rng.integers(cfg.num_hidden_layers))
        for e in sorted(rng.choice(cfg.num_experts, cfg.experts_per_token, replace=False).tolist()):
            if (layer, e) not in out and len(out) < count:
                out.append((layer, e))
    return out


def read_by_faults(ck: Checkpoint, groups: list[list[list[TensorRange]]], advice: int | None) -> None:
    maps: dict[str, tuple[mmap.mmap, np.ndarray]] = {}
    for path in ck.files():
        f = open(path, "rb")
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        f.close()
        maps[path] = (m, np.frombuffer(m, dtype=np.uint8))
    sink = 0
    page = mmap.PAGESIZE
    for group in groups:  # one layer's experts
        if advice is not None:
            for ranges in group:
                for r in ranges:
                    m, _ = maps[r.path]
                    start = r.offset - r.offset % mmap.PAGESIZE
                    m.madvise(advice, start, r.offset + r.nbytes - start)
        for ranges in group:
            for r in ranges:
                # One byte in every page the range overlaps: its first byte, then each page start after it
                # (a stride from r.offset would miss the last page when the range does not start on one).
                pages = np.arange(r.offset - r.offset % page + page, r.offset + r.nbytes, page)
                sink += int(maps[r.path][1][np.concatenate(([r.offset], pages))].sum())
    for m, arr in maps.values():
        del arr
    del maps


def read_by_pread(groups: list[list[list[TensorRange]]], direct: bool, threads: int, shape: str = "all",
                  huge: bool = False) -> None:
    """shape: "all" = the expert's 6 pieces; "store" = what StreamingExpertStore reads (the 4 MXFP4 pieces;
    the biases stay mapped); "contiguous" = one read of the same total size (the repacked layout's shape)."""
    reader = FileReader(direct=direct)
    records = [ranges for group in groups for ranges in group]
    if shape == "store":
        records = [[r for r, piece in zip(ranges, EXPERT_PIECES) if not piece.endswith("_bias")] for ranges in records]
    elif shape == "contiguous":
        records = [[TensorRange(ranges[0].path, ranges[0].offset, sum(r.nbytes for r in ranges))] for ranges in records]
    layouts = [plan_record(r) for r in records]
    # As the engine's expert cache does on a cold start: one arena of slots, allocated here, each slot first
    # touched by the read that fills it, so first-touch and huge-page costs are part of what is measured.
    slot = max(l.nbytes for l in layouts)
    slot += -slot % mmap.PAGESIZE
    arena = aligned_buffer(slot * len(layouts), huge_pages=huge)

    def work(i: int) -> None:
        for j in range(i, len(layouts), threads):
            reader.read_record(layouts[j], arena[j * slot:(j + 1) * slot])

    if threads == 1:
        work(0)
    else:
        ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    reader.close()


def run_read(args: argparse.Namespace) -> None:
    ck = Checkpoint.open(args.model)
    cfg = ck.config
    chosen = pick_experts(ck, args.experts, args.seed)
    k = cfg.experts_per_token
    groups = [[ck.expert_ranges(l, e) for l, e in chosen[i:i + k]] for i in range(0, len(chosen), k)]
    payload = sum(r.nbytes for g in groups for rs in g for r in rs)
    methods = {
        "page faults": lambda: read_by_faults(ck, groups, None),
        "madvise WILLNEED + faults": lambda: read_by_faults(ck, groups, mmap.MADV_WILLNEED),
        "MADV_POPULATE_READ": lambda: read_by_faults(ck, groups, MADV_POPULATE_READ),
        "pread buffered": lambda: read_by_pread(groups, direct=False, threads=1),
        "pread O_DIRECT 6 pieces": lambda: read_by_pread(groups, direct=True, threads=1),
        "pread O_DIRECT 4 pieces": lambda: read_by_pread(groups, direct=True, threads=1, shape="store"),
        "pread O_DIRECT 4 pieces x2": lambda: read_by_pread(groups, direct=True, threads=2, shape="store"),
        "pread O_DIRECT 1 record": lambda: read_by_pread(groups, direct=True, threads=1, shape="contiguous"),
        "O_DIRECT 4 pieces huge pages": lambda: read_by_pread(groups, True, 1, shape="store", huge=True),
        "O_DIRECT 1 record huge pages": lambda: read_by_pread(groups, True, 1, shape="contiguous", huge=True),
    }
    only = set(args.methods.split(",")) if args.methods else None
    print(f"# read: {len(chosen)} experts ({payload / GB:.3f} GB payload, {payload / len(chosen) / 1e6:.2f} MB each) "
          f"of {args.model}, cold (posix_fadvise DONTNEED before each method); load {load_average():.2f}")
    print(f"{'method':28s} {'seconds':>8s} {'payload GB/s':>13s} {'disk GB':>8s} {'disk/payload':>12s}")
    # "4 pieces" is what the store reads: the bf16 biases (16 KB) are used from the mapping
    results = {}
    for name, fn in methods.items():
        if only and not any(o in name for o in only):
            continue
        best = None
        for _ in range(args.repeats):
            evict_files(ck.files())
            before = process_read_bytes()
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            disk = process_read_bytes() - before
            if best is None or dt < best[0]:
                best = (dt, disk)
        dt, disk = best
        results[name] = {"seconds": dt, "payload_gbps": payload / dt / GB, "disk_bytes": disk}
        print(f"{name:28s} {dt:8.3f} {payload / dt / GB:13.2f} {disk / GB:8.3f} {disk / payload:12.2f}", flush=True)
    evict_files(ck.files())
    if args.json:
        Path(args.json).write_text(json.dumps({"payload": payload, "load": load_average(), "results": results}, indent=1))


# ---------------------------------------------------------------------------- disk


def measure_disk(files: list[str], record_bytes: int, depths: list[int], bytes_per_depth: float,
                 seed: int = 0) -> dict[int, float]:
    """The disk's rate for the engine's kind of read: O_DIRECT preads of `record_bytes` at random aligned
    offsets of the checkpoint's files, `depth` in flight at once (one thread each: os.preadv releases the
    GIL), into pre-faulted huge-page buffers (the disk is measured, not first-touch faults). GB/s by depth."""
    from gptoss_stream.streaming.reader import ALIGN

    record_bytes = -(-record_bytes // ALIGN) * ALIGN
    sizes = {f: os.path.getsize(f) for f in files if os.path.getsize(f) > 2 * record_bytes}
    paths = list(sizes)
    rng = np.random.default_rng(seed)
    fds = {f: os.open(f, os.O_RDONLY | os.O_DIRECT) for f in paths}
    buffers = [aligned_buffer(record_bytes, huge_pages=True) for _ in range(max(depths))]
    for b in buffers:
        b[::4096] = 1  # fault the pages in now
    out: dict[int, float] = {}
    try:
        for depth in depths:
            count = max(depth, int(bytes_per_depth // record_bytes))
            jobs = []
            for _ in range(count):
                f = paths[int(rng.integers(len(paths)))]
                jobs.append((fds[f], int(rng.integers((sizes[f] - record_bytes) // ALIGN)) * ALIGN))
            lock = threading.Lock()
            done = [0]

            def work(buffer: np.ndarray) -> None:
                while True:
                    with lock:
                        if done[0] >= len(jobs):
                            return
                        fd, offset = jobs[done[0]]
                        done[0] += 1
                    if os.preadv(fd, [buffer], offset) != record_bytes:
                        raise OSError(f"short O_DIRECT read at {offset}")

            threads = [threading.Thread(target=work, args=(buffers[i],)) for i in range(depth)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            out[depth] = count * record_bytes / (time.perf_counter() - t0) / GB
    finally:
        for fd in fds.values():
            os.close(fd)
    return out


def print_disk(files: list[str], record_bytes: int, args: argparse.Namespace) -> dict[int, float]:
    depths = [int(d) for d in args.disk_depths.split(",")]
    rates = measure_disk(files, record_bytes, depths, args.disk_bytes * GB)
    print(f"# disk: O_DIRECT reads of {record_bytes / 1e6:.2f} MB (one expert record) at random offsets, "
          f"{args.disk_bytes:g} GB per queue depth: " + ", ".join(f"qd {d} {r:.2f} GB/s" for d, r in rates.items())
          + f"; load {load_average():.2f}", flush=True)
    return rates


def run_disk(args: argparse.Namespace) -> None:
    from gptoss_stream.streaming.expert_cache import expert_slot_bytes

    ck = Checkpoint.open(args.model)
    files, record = ck.files(), expert_slot_bytes(ck)
    ck.close()
    rates = print_disk(files, record, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"record_bytes": record, "gb_per_s": rates}, indent=1))


# ---------------------------------------------------------------------------- policy


def record_trace(model_dir: str, prompt_tokens: int, decode_tokens: int, seed: int, threads: int) -> list[dict]:
    """Route a prompt and a sampled continuation through the model; per (phase, layer): the routed experts,
    the guess from the residual after the previous layer's attention (what the engine uses) and the guess
    from the residual after the previous layer's MoE."""
    from gptoss_stream.engine.model import Model
    from gptoss_stream.engine.sampling import Sampler, SamplingParams
    from gptoss_stream.streaming.experts import MappedExpertStore

    ck = Checkpoint.open(model_dir)
    trace: list[dict] = []

    class TraceStore(MappedExpertStore):
        prefetches = True
        phase = "prefill"

        def __init__(self, checkpoint):
            super().__init__(checkpoint)
            self.guess_attn: dict[int, list[int]] = {}
            self.guess_moe: dict[int, list[int]] = {}

        def request(self, layer, experts):
            experts = [int(e) for e in experts]
            trace.append({"phase": self.phase, "layer": layer, "experts": experts,
                          "guess_attn": self.guess_attn.pop(layer, None), "guess_moe": self.guess_moe.pop(layer, None)})
            return super().request(layer, experts)

        def prefetch(self, layer, experts):
            self.guess_attn[layer] = [int(e) for e in experts]

    store = TraceStore(ck)
    model = Model(ck, max_chunk=64, expert_store=store, num_threads=threads)
    inner = model.layer_forward

    def layer_forward(layer, x, cache, first_position):
        out = inner(layer, x, cache, first_position)
        if layer + 1 < ck.config.num_hidden_layers:
            store.guess_moe[layer + 1] = [int(e) for e in model.guess_experts(layer + 1, x)]
        return out

    model.layer_forward = layer_forward
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 199_998, size=prompt_tokens).tolist()
    cache = model.new_cache(prompt_tokens + decode_tokens + 1)
    sampler = Sampler(SamplingParams(temperature=1.0, seed=seed))
    logits = model.forward(tokens, cache)
    store.phase = "decode"
    for step in range(decode_tokens):
        t0 = time.perf_counter()
        logits = model.forward([sampler.sample(logits)], cache)
        print(f"  decode token {step + 1}/{decode_tokens}: {time.perf_counter() - t0:.2f} s", file=sys.stderr, flush=True)
    return trace


def modelled_trace(layers: int, experts: int, k: int, tokens: int, zipf: float, reuse: float, seed: int,
                   shift_every: int = 0) -> list[dict]:
    """A router with per-layer popularity ~ rank^-zipf (random rank order per layer) and temporal locality:
    each of the previous token's experts is picked again with probability `reuse`. shift_every > 0: the
    rank order is drawn again every that many tokens (a change of topic)."""
    rng = np.random.default_rng(seed)
    p = np.arange(1, experts + 1, dtype=np.float64) ** -zipf
    popularity = [rng.permutation(p / p.sum()) for _ in range(layers)]
    previous: list[list[int]] = [[] for _ in range(layers)]
    out = []
    for token in range(tokens):
        if shift_every and token and token % shift_every == 0:
            popularity = [rng.permutation(p / p.sum()) for _ in range(layers)]
        for layer in range(layers):
            chosen = [e for e in previous[layer] if rng.random() < reuse][:k]
            while len(chosen) < k:
                p = popularity[layer].copy()
                p[chosen] = 0
                chosen.append(int(rng.choice(experts, p=p / p.sum())))
            previous[layer] = chosen
            out.append({"phase": "decode", "layer": layer, "experts": sorted(chosen)})
    return out


def simulate(trace: list[dict], slots: int, layers: int, policy: str, half_life_tokens: float = 64.0) -> float:
    """Hit rate of a replacement policy on the decode requests of a trace (demand reads only).

    global-lru: one LRU list over all layers. layer-lru / layer-lfu / layer-decay: the engine's per-layer
    shares (a layer under its share takes from the layer furthest over it) with the engine's --cache-policy
    lru, lfu (plain counts) or decay (counts halving every half_life_tokens) inside, ties to the older.
    belady: evict the entry whose next use is farthest (the offline optimum, global).
    """
    reqs = [(r["layer"], r["experts"]) for r in trace if r["phase"] == "decode"]
    cache: dict[tuple[int, int], None] = {}
    per_layer: list[set[tuple[int, int]]] = [set() for _ in range(layers)]
    last: dict[tuple[int, int], int] = {}
    count: dict[tuple[int, int], float] = {}
    hits = total = 0
    quota = slots / layers
    half = math.inf if policy == "layer-lfu" else half_life_tokens * layers
    future: dict[tuple[int, int], list[int]] = {}
    if policy == "belady":
        for t, (layer, experts) in enumerate(reqs):
            for e in experts:
                future.setdefault((layer, e), []).append(t)
        for v in future.values():
            v.reverse()

    def score(key):
        if policy in ("layer-lru", "global-lru"):
            return (last[key], last[key])
        if policy == "layer-lfu":
            return (count[key], last[key])
        return (math.log2(count[key]) + last[key] / half, last[key])

    for t, (layer, experts) in enumerate(reqs):
        want = {(layer, e) for e in experts}
        for key in want:
            if policy == "belady":
                future[key].pop()
            if key in last:
                count[key] = count[key] * 2.0 ** (-(t - last[key]) / half) + 1.0
            else:
                count[key] = 1.0
            last[key] = t
        for key in sorted(want):
            total += 1
            if key in cache:
                hits += 1
                continue
            if len(cache) >= slots:
                if policy == "belady":
                    victim = max((c for c in cache if c not in want),
                                 key=lambda c: future[c][-1] if future[c] else 1 << 60)
                elif policy == "global-lru":
                    victim = min((c for c in cache if c not in want), key=score)
                else:  # per-layer shares, as StreamingExpertStore._policy_victim (entries kept per layer)
                    pool = [c for c in per_layer[layer] if c not in want]
                    if len(per_layer[layer]) < quota or not pool:
                        over = sorted((n for n in range(layers) if len(per_layer[n]) > quota),
                                      key=lambda n: -len(per_layer[n]))
                        for n in over:
                            pool = [c for c in per_layer[n] if c not in want]
                            if pool:
                                break
                    pool = pool or [c for c in cache if c not in want]
                    victim = min(pool, key=score)
                del cache[victim]
                per_layer[victim[0]].discard(victim)
            per_layer[layer].add(key)
            cache[key] = None
    return hits / total if total else 0.0


def guess_accuracy(trace: list[dict], key: str) -> float:
    right = total = 0
    for r in trace:
        if r["phase"] == "decode" and r.get(key) is not None:
            right += len(set(r["experts"]) & set(r[key]))
            total += len(r["experts"])
    return right / total if total else 0.0


def run_policy(args: argparse.Namespace) -> None:
    traces: dict[str, tuple[list[dict], int, int]] = {}
    loaded = json.loads(Path(args.trace).read_text()) if args.trace and Path(args.trace).exists() else None
    if isinstance(loaded, dict):  # written by `run --trace-dir` (the engine's own requests, any store)
        recorded = loaded["trace"]
        traces[f"recorded ({Path(loaded['model']).name}, synthetic)"] = (recorded, loaded["layers"], loaded["experts"])
        print(f"next-layer guess accuracy on the recorded decode: first guess {guess_accuracy(recorded, 'guess_attn'):.1%}, "
              f"final guess {guess_accuracy(recorded, 'guess_moe'):.1%}; "
              f"{sum(r['phase'] == 'decode' for r in recorded) // loaded['layers']} decode tokens")
    elif args.model:
        path = Path(args.trace) if args.trace else None
        if loaded is not None:
            recorded = loaded
        else:
            print(f"# recording a router trace on {args.model}: {args.prompt} prompt + {args.tokens} sampled tokens "
                  f"(load {load_average():.2f})", file=sys.stderr)
            recorded = record_trace(args.model, args.prompt, args.tokens, args.seed, args.threads)
            if path:
                path.write_text(json.dumps(recorded))
        cfg = Checkpoint.open(args.model).config
        traces["recorded (synthetic weights)"] = (recorded, cfg.num_hidden_layers, cfg.num_experts)
        print(f"next-layer guess accuracy on the recorded decode: from the residual after the previous layer's "
              f"attention {guess_accuracy(recorded, 'guess_attn'):.1%}, after its MoE "
              f"{guess_accuracy(recorded, 'guess_moe'):.1%}")
    layers, experts = args.layers, args.experts
    for zipf, reuse, shift in ((0.0, 0.0, 0), (0.8, 0.0, 0), (0.0, 0.3, 0), (0.8, 0.3, 0), (1.2, 0.5, 0),
                               (0.8, 0.3, args.model_tokens // 4)):
        name = f"modelled zipf={zipf} reuse={reuse}" + (f" shift/{shift}" if shift else "")
        if args.recorded_only or (args.only and not any(o in name for o in args.only.split(","))):
            continue
        traces[name] = (modelled_trace(layers, experts, 4, args.model_tokens, zipf, reuse, args.seed, shift),
                        layers, experts)
    policies = tuple(args.policies.split(","))
    fractions = [float(f) for f in args.fractions.split(",")]
    print(f"decode hit rate by policy; cache = fraction of all experts (layer-decay half-life "
          f"{args.half_life:g} tokens)")
    print(f"{'trace':36s} {'cache':>6s} " + " ".join(f"{p:>11s}" for p in policies))
    for name, (trace, n_layers, n_experts) in traces.items():
        for fraction in fractions:
            slots = max(1, int(round(fraction * n_layers * n_experts)))
            rates = [simulate(trace, slots, n_layers, p, args.half_life) for p in policies]
            print(f"{name:36s} {fraction:6.0%} " + " ".join(f"{r:11.1%}" for r in rates), flush=True)


# ---------------------------------------------------------------------------- run

PROMPT = ("The history of the lighthouse begins with fires lit on hilltops to guide ships home at night. "
          "Later, towers of stone carried lamps fed with oil, and mirrors gathered their light into a beam "
          "that sailors could see from far out at sea. Today most of them run on their own, watched from a "
          "distance, but keepers still")


def kv_in_use(cfg, tokens: int, chunk: int) -> int:
    row = 2 * cfg.num_key_value_heads * cfg.head_dim * 2
    total = 0
    for layer in range(cfg.num_hidden_layers):
        cap = tokens if not cfg.is_sliding(layer) else min(tokens, cfg.sliding_window + chunk - 1)
        total += min(tokens, cap) * row
    return total


def parse_stats(stderr: str) -> dict | None:
    for line in stderr.splitlines():
        if line.startswith("[stats-json] "):
            return json.loads(line[len("[stats-json] "):])
    return None


# Store options compared by `run --modes` (besides the CLI's own "budget" and "mmap-only").
VARIANTS: dict[str, dict] = {
    "default": {},                       # what --ram-budget does
    "no-prefetch": {"prefetch": False},  # demand reads only
    "lru": {"policy": "lru"},
    "lfu": {"policy": "lfu"},
    "decay": {"policy": "decay"},
    "io2": {"io_threads": 2},
    "borrow": {"guesses_borrow": True},  # guesses may evict other layers' entries
    "buffered": {"direct": False},       # buffered preads + FADV_DONTNEED instead of O_DIRECT
    "readahead": {"random_embedding": False},  # embedding rows fault with the disk's readahead
}


def run_child(args: argparse.Namespace) -> None:
    """`gptoss generate --raw --stats` with a store variant (runs inside the cgroup)."""
    from gptoss_stream.chat.tokenizer import get_tokenizer
    from gptoss_stream.engine.generate import generate
    from gptoss_stream.engine.model import Model
    from gptoss_stream.engine.sampling import Sampler, SamplingParams
    from gptoss_stream.streaming.expert_cache import open_budgeted_store
    from gptoss_stream.streaming.runstats import report

    ck = Checkpoint.open(args.model)
    store, plan = open_budgeted_store(ck, args.budget, args.context, args.chunk, **VARIANTS[args.variant])
    print(f"[stats] plan: {plan.describe()}; cache policy {store.policy}", file=sys.stderr)
    prompt = get_tokenizer().encode(PROMPT, allow_special=True)
    trace = record_requests(store, -(-len(prompt) // args.chunk)) if args.trace else None
    model = Model(ck, max_chunk=args.chunk, expert_store=store, num_threads=args.threads)
    result = generate(model, prompt, args.tokens, Sampler(SamplingParams(temperature=1.0, seed=0)),
                      context_length=args.context)
    print(report(result, plan), file=sys.stderr)
    store.close()
    if trace is not None:
        cfg = ck.config
        Path(args.trace).write_text(json.dumps({"layers": cfg.num_hidden_layers, "experts": cfg.num_experts,
                                                "model": args.model, "trace": trace}))


def record_requests(store, prefill_forwards: int) -> list[dict]:
    """Log the store's requests (the router's experts) and the guesses before each (the first, from the
    residual after the previous layer's attention; the last, after its MoE), in the trace format of
    record_trace. Phases: the first `prefill_forwards` forwards are the prompt's chunks, the rest decode."""
    trace: list[dict] = []
    guesses: dict[int, list[list[int]]] = {}
    request, prefetch = store.request, store.prefetch
    seen_layer0 = [0]

    def logged_request(layer, experts):
        experts = [int(e) for e in experts]
        if layer == 0:
            seen_layer0[0] += 1
        g = guesses.pop(layer, [])
        trace.append({"phase": "prefill" if seen_layer0[0] <= prefill_forwards else "decode", "layer": layer, "experts": experts,
                      "guess_attn": g[0] if g else None, "guess_moe": g[-1] if g else None})
        return request(layer, experts)

    def logged_prefetch(layer, experts):
        experts = [int(e) for e in experts]
        guesses.setdefault(layer, []).append(experts)
        return prefetch(layer, experts)

    store.request, store.prefetch = logged_request, logged_prefetch
    return trace


def print_ratios(limit_text: str, by_mode: dict[str, dict], args: argparse.Namespace) -> None:
    """budget / mmap-only decode and prefill rates at one limit, from the rows of this run; only with equal
    work on both sides (same prompt, same number of generated tokens)."""
    budget, baseline = by_mode.get("budget"), by_mode.get("mmap-only")
    if not budget or not baseline or "decode_tok_s" not in budget or "decode_tok_s" not in baseline:
        return
    if args.baseline_tokens != args.tokens:
        print(f"{limit_text:>5s} no ratio: --baseline-tokens {args.baseline_tokens} != --tokens {args.tokens}")
        return
    print(f"{limit_text:>5s} budget / mmap-only: decode {budget['decode_tok_s'] / baseline['decode_tok_s']:.2f}x, "
          f"prefill {budget['prefill_tok_s'] / baseline['prefill_tok_s']:.2f}x (same prompt, {args.tokens} tokens "
          f"each, this run)", flush=True)


def equivalent_limit(cfg, layers: int, limit: int, context: int, chunk: int) -> int:
    """The memory limit at which a subset of a model (cfg: the same shapes, fewer layers) gets the expert
    cache per layer that the whole model (`layers` layers) gets at `limit`: each layer then sees the hit
    rate, reads and prefetch it would in the whole model, and per-layer costs scale to it."""
    from gptoss_stream.streaming.budget import plan_memory, planned_slot_bytes

    slot = planned_slot_bytes(cfg)
    full = plan_memory(cfg.with_overrides(num_hidden_layers=layers), slot, limit, context, chunk)
    slots = round(full.expert_slots / layers * cfg.num_hidden_layers)
    sub = plan_memory(cfg, slot, 1 << 50, context, chunk)
    return sub.fixed + max(slots, sub.min_expert_slots) * slot


def run_runs(args: argparse.Namespace) -> None:
    from cgroup_run import run_in_memory_cgroup

    from gptoss_stream.streaming.budget import format_size, kv_cache_nbytes, parse_size

    from gptoss_stream.streaming.expert_cache import expert_slot_bytes

    ck = Checkpoint.open(args.model)
    cfg, files, record = ck.config, ck.files(), expert_slot_bytes(ck)
    ck.close()
    disk_rates = print_disk(files, record, args) if args.disk else {}
    env = dict(os.environ)
    env.setdefault("TIKTOKEN_CACHE_DIR", "/work/shared/tiktoken")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    base = [sys.executable, "-m", "gptoss_stream.commands.cli", "generate", "-m", args.model, "-p", PROMPT, "--raw",
            "-t", "1.0", "--seed", "0", "--stats", "--context", str(args.context), "--chunk", str(args.chunk)]
    if args.threads:
        base += ["--threads", str(args.threads)]
    modes = [m for m in args.modes.split(",") if m]
    rows = []
    print(f"# run: {args.model}, prompt {len(PROMPT)} chars (raw), context {args.context}, chunk {args.chunk}, "
          f"cold cache ({'drop_caches' if args.cold == 'drop' else 'checkpoint evicted'}) before each run; "
          f"load {load_average():.2f} at start" + ("  ** load >= 1: numbers not valid **" if load_average() >= 1 else ""),
          flush=True)
    for limit_text in args.limits.split(","):
        limit = parse_size(limit_text)
        if args.as_layers:
            limit = equivalent_limit(cfg, args.as_layers, limit, args.context, args.chunk)
            print(f"# {limit_text} for {args.as_layers} layers = the same expert cache per layer on these "
                  f"{cfg.num_hidden_layers}: limit {format_size(limit)} ({limit} bytes)", flush=True)
            limit_text = f"{limit_text}/{args.as_layers}L"
        by_mode = {}
        for mode in modes:
            tokens = args.baseline_tokens if mode == "mmap-only" else args.tokens
            if mode in ("budget", "mmap-only"):
                cmd = base + ["-n", str(tokens)] + (["--ram-budget", str(limit)] if mode == "budget" else ["--mmap-only"])
            elif mode in VARIANTS:
                cmd = [sys.executable, __file__, "child", "-m", args.model, "--budget", str(limit), "--tokens",
                       str(tokens), "--context", str(args.context), "--chunk", str(args.chunk), "--variant", mode,
                       "--threads", str(args.threads)]
                if args.trace_dir:
                    cmd += ["--trace", str(Path(args.trace_dir) / f"trace-{limit_text.replace('/', '-')}-{mode}.json")]
            else:
                raise SystemExit(f"unknown mode {mode!r}: budget, mmap-only or one of {', '.join(VARIANTS)}")
            load = load_average()
            r = run_in_memory_cgroup(cmd, limit, cold=True, env=env, timeout=args.timeout,
                                     evict=files if args.cold == "file" else None)
            st = parse_stats(r.stderr)
            row = {"limit": limit_text, "mode": mode, "returncode": r.returncode, "oom": r.oom_killed,
                   "load_before": load, "seconds": r.seconds, "max_usage": r.max_usage,
                   "sampled_peak_rss_anon": r.sampled_peak_rss_anon, "failcnt": r.failcnt, "stats": st}
            if st is None:
                tail = "\n".join(r.stderr.strip().splitlines()[-5:])
                print(f"{limit_text:>5s} {mode:9s} FAILED (exit {r.returncode}{', OOM-killed' if r.oom_killed else ''}):"
                      f"\n{tail}", flush=True)
                rows.append(row)
                continue
            dec, pre, plan = st["decode"], st["prefill"], st["plan"]
            steps = max(st["decode_steps"], 1)
            cache_rss = 0
            if plan:
                cache_rss = min(plan["expert_slots"], dec.get("reads", 0) + pre.get("reads", 0)) * plan["slot_bytes"]
            outside = r.sampled_peak_rss_anon - cache_rss
            kv_full = kv_cache_nbytes(cfg, args.context, args.chunk)
            projected = outside - kv_in_use(cfg, st["prompt_tokens"] + steps, args.chunk) + kv_full
            row.update({
                "decode_tok_s": st["decode_tokens_per_second"], "prefill_tok_s": st["prefill_tokens_per_second"],
                "disk_mb_per_token": dec["disk_read_bytes"] / steps / 1e6,
                "expert_mb_per_token": dec.get("bytes_read", 0) / steps / 1e6,
                "read_busy": dec.get("read_seconds", 0.0) / max(st["decode_seconds"], 1e-9),
                "hit_rate": dec.get("hit_rate"), "prefetch_rate": dec.get("prefetch_rate"),
                "prediction_accuracy": dec.get("prediction_accuracy"),
                "stall_ms_per_token": dec.get("stall_seconds", 0.0) / steps * 1e3,
                "rss_anon_outside_cache": outside, "rss_anon_outside_cache_at_full_context": projected,
            })
            if disk_rates:
                row["disk_limit_tok_s"] = max(disk_rates.values()) * GB / max(dec["disk_read_bytes"] / steps, 1)
                row["fraction_of_disk_limit"] = row["decode_tok_s"] / row["disk_limit_tok_s"]
            rows.append(row)
            by_mode[mode] = row
            hit = "-" if row["hit_rate"] is None else f"{row['hit_rate']:.0%}+{row['prefetch_rate']:.0%}"
            acc = "-" if row["prediction_accuracy"] is None else f"{row['prediction_accuracy']:.0%}"
            print(f"{limit_text:>5s} {mode:9s} decode {row['decode_tok_s']:6.2f} tok/s  prefill {row['prefill_tok_s']:6.2f} "
                  f"tok/s  peak group {format_size(r.max_usage):>11s}  sampled peak RssAnon {format_size(r.sampled_peak_rss_anon):>11s} "
                  f"(outside cache {format_size(outside)}, at {args.context} ctx {format_size(projected)})  "
                  f"disk {row['disk_mb_per_token']:7.1f} MB/token (experts {row['expert_mb_per_token']:6.1f}, "
                  f"I/O busy {row['read_busy']:4.0%})  hit {hit:>7s}  guess {acc:>4s}  "
                  f"stall {row['stall_ms_per_token']:6.1f} ms/token  limit hit {r.failcnt}x  load {load:.2f}"
                  + (f"  disk limit {row['disk_limit_tok_s']:.2f} tok/s ({row['fraction_of_disk_limit']:.0%})"
                     if disk_rates else ""), flush=True)
        print_ratios(limit_text, by_mode, args)
    if args.disk:
        after = print_disk(files, record, args)
        print(f"# disk limits above use the measurement before the runs ({max(disk_rates.values()):.2f} GB/s); "
              f"after: {max(after.values()):.2f} GB/s", flush=True)
    print(f"# load at end {load_average():.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


# ---------------------------------------------------------------------------- main


def add_disk_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--disk-depths", default="1,2,4,8", help="queue depths of the disk measurement (default 1,2,4,8)")
    p.add_argument("--disk-bytes", type=float, default=1.0, help="GB read per queue depth (default 1)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("read", help="compare read methods on a cold cache")
    p.add_argument("-m", "--model", required=True)
    p.add_argument("--experts", type=int, default=32, help="experts to read per method (default 32)")
    p.add_argument("--repeats", type=int, default=1, help="runs per method; the fastest counts")
    p.add_argument("--methods", default="", help="comma-separated substrings of method names to run (default all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="also write the results to this file")
    p.set_defaults(func=run_read)

    p = sub.add_parser("disk", help="O_DIRECT reads of expert-record size at queue depths 1..8 (the disk's limit)")
    p.add_argument("-m", "--model", required=True)
    p.add_argument("--json", default="", help="also write the results to this file")
    add_disk_arguments(p)
    p.set_defaults(func=run_disk)

    p = sub.add_parser("policy", help="cache replacement policies on recorded and modelled router traces")
    p.add_argument("-m", "--model", default="", help="record a trace on this checkpoint (else modelled traces only)")
    p.add_argument("--trace", default="", help="JSON file: reuse the trace recorded there, or save it there")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens of the recorded trace")
    p.add_argument("--tokens", type=int, default=32, help="sampled tokens of the recorded trace")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--layers", type=int, default=24, help="layers of the modelled traces (default: 20b)")
    p.add_argument("--experts", type=int, default=32, help="experts per layer of the modelled traces")
    p.add_argument("--model-tokens", type=int, default=400, help="tokens of each modelled trace")
    p.add_argument("--fractions", default="0.05,0.14,0.3,0.56", help="cache sizes as fractions of all experts")
    p.add_argument("--half-life", type=float, default=64.0, help="layer-decay half-life in tokens")
    p.add_argument("--only", default="", help="comma-separated substrings: run only the modelled traces named so")
    p.add_argument("--recorded-only", action="store_true", help="no modelled traces: only the recorded one")
    p.add_argument("--policies", default="global-lru,layer-lru,layer-lfu,layer-decay,belady",
                   help="policies to compare (default all five)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_policy)

    p = sub.add_parser("run", help="gptoss generate in cgroup memory limits, budgeted vs --mmap-only (root)")
    p.add_argument("-m", "--model", required=True)
    p.add_argument("--limits", default="16G,8G,4G,3G", help="cgroup memory limits (default 16G,8G,4G,3G)")
    p.add_argument("--modes", default="budget,mmap-only",
                   help="budget (gptoss generate --ram-budget LIMIT), mmap-only (gptoss generate --mmap-only), or a "
                        "store variant run by this tool: " + ", ".join(VARIANTS))
    p.add_argument("--tokens", type=int, default=32, help="tokens to generate in every mode (default 32)")
    p.add_argument("--baseline-tokens", type=int, default=None,
                   help="tokens to generate with --mmap-only (default: --tokens; any other value prints no ratio)")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--cold", choices=("drop", "file"), default="drop",
                   help="before each run: drop the whole page cache (default, as measured runs need) or only "
                        "evict the checkpoint's files (gentler on a shared machine)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds before a run is killed")
    p.add_argument("--as-layers", type=int, default=0, metavar="N",
                   help="the checkpoint is an N-layer model's subset (make-checkpoint --layers): run each limit "
                        "as the limit that gives it the whole model's expert cache per layer (labelled LIMIT/NL)")
    p.add_argument("--trace-dir", default="", help="store variants write their router traces here (for policy)")
    p.add_argument("--disk", action="store_true",
                   help="measure the disk before and after the runs (as the disk mode) and report each run's decode "
                        "as a fraction of the disk's limit: best GB/s / disk bytes read per token")
    add_disk_arguments(p)
    p.add_argument("--json", default="", help="also write the rows to this file")
    p.set_defaults(func=run_runs)

    p = sub.add_parser("child", help="(used by run) generate with a store variant and print --stats")
    p.add_argument("-m", "--model", required=True)
    p.add_argument("--budget", type=size_argument, required=True)
    p.add_argument("--variant", choices=sorted(VARIANTS), default="default")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--trace", default="", help="write the router's requests and the guesses to this JSON file")
    p.set_defaults(func=run_child)
    args = parser.parse_args(argv)
    if getattr(args, "baseline_tokens", 0) is None:
        args.baseline_tokens = args.tokens
    if args.mode != "child":
        print_machine()
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
