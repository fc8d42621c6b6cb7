"""Options and setup that several commands share: the model and sampling options, opening the model they
describe, the sampler, --stats. Commands (generate.py, memprof/, a server...) sit above this module."""

from __future__ import annotations

import argparse
import sys

from gptoss_stream.errors import InputError
from gptoss_stream.streaming.budget import size_argument
from gptoss_stream.streaming.expert_cache import DEFAULT_POLICY as DEFAULT_CACHE_POLICY, POLICIES as CACHE_POLICIES


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", required=True, metavar="MODEL_DIR",
                   help="checkpoint folder: the original/ folder (config.json + model.safetensors) or a Hugging "
                        "Face folder (config.json + model-*.safetensors + index)")
    p.add_argument("--context", type=int, default=4096, metavar="N",
                   help="context length in tokens: prompt + generated (default 4096, max 131072)")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="compute threads (default 0: the CPUs this process may use, from its affinity and its "
                        "cgroup's CPU quota)")
    p.add_argument("--chunk", type=int, default=64, metavar="N",
                   help="prompt tokens per prefill pass (default 64); larger is faster and uses more scratch")
    memory = p.add_mutually_exclusive_group()
    memory.add_argument("--ram-budget", type=size_argument, default=None, metavar="SIZE",
                        help="memory the run may use, e.g. 4G, 3.5G, 800M; the engine plans KV cache, dense "
                             "weights and an expert cache from it and stops with the minimum if it is too small "
                             "(default: map the checkpoint as it is when it fits in available memory, else "
                             "stream experts under a budget of what the machine or its cgroup has available)")
    memory.add_argument("--mmap-only", action="store_true",
                        help="no expert cache: use the mapped checkpoint as it is and let page faults read "
                             "the experts (the baseline --ram-budget is measured against)")
    p.add_argument("--cache-policy", choices=CACHE_POLICIES, default=DEFAULT_CACHE_POLICY,
                   help="which experts the expert cache keeps, within each layer's share: decay = use counts "
                        "that halve every 64 tokens (default), lfu = use counts since the start, lru = the most "
                        "recently used; measure yours with --stats (cache hit rate); no effect with --mmap-only")
    p.add_argument("--stats", action="store_true",
                   help="print the memory plan and, per phase, disk bytes read per token, expert cache hit "
                        "rate, prefetch accuracy and I/O stall time (stderr)")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--max-tokens", type=int, default=128, metavar="N",
                   help="maximum number of tokens to generate (default 128)")
    p.add_argument("-t", "--temperature", type=float, default=1.0,
                   help="sampling temperature; 0 = greedy (default 1.0, as OpenAI recommends for gpt-oss)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="sample among the K most likely (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (1.0 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    p.add_argument("--reasoning", choices=("low", "medium", "high"), default="medium",
                   help="reasoning effort written in the harmony system message (default medium)")



def open_model(args: argparse.Namespace):
    """The checkpoint, the expert store the options ask for, and the Model that owns both (close it, or use
    it in `with`); whatever was opened is closed again if a step fails."""
    from gptoss_stream.engine.model import Model
    from gptoss_stream.weights.checkpoint import open_user_checkpoint

    check_run_arguments(args)
    checkpoint = open_user_checkpoint(args.model)
    store = args.plan = None
    try:
        if args.stats:
            print(f"[stats] checkpoint: {describe_dense(checkpoint)}", file=sys.stderr)
        if not 0 < args.context <= checkpoint.config.max_context:
            raise InputError(f"--context {args.context} must be in 1..{checkpoint.config.max_context}")
        if not args.mmap_only and not (args.ram_budget is None and fits_in_memory(checkpoint, args.context,
                                                                                   args.chunk)):
            from gptoss_stream.streaming.expert_cache import open_budgeted_store

            store, args.plan = open_budgeted_store(checkpoint, args.ram_budget, args.context, args.chunk,
                                                   policy=getattr(args, "cache_policy", DEFAULT_CACHE_POLICY))
            if args.stats:
                print(f"[stats] plan: {args.plan.describe()}; cache policy {store.policy}", file=sys.stderr)
        return Model(checkpoint, max_chunk=args.chunk, num_threads=args.threads, expert_store=store)
    except BaseException:
        if store is not None:
            store.close()
        checkpoint.close()
        raise


def describe_dense(checkpoint) -> str:
    """'repacked, dense weights q8: 1.25 GiB read per token (+ embedding rows)': what --stats and
    `gptoss info -m` say about the checkpoint's dense weights."""
    from gptoss_stream.streaming.budget import dense_nbytes, format_size

    dense = checkpoint.dense_format
    per_token = dense_nbytes(checkpoint.config, 0, dense_format=dense)
    return (f"{checkpoint.format}, dense weights {dense}: {format_size(per_token)} read per token "
            f"(+ one embedding row)")


def check_run_arguments(args: argparse.Namespace) -> None:
    """InputError for numbers the model cannot run with (before anything is opened)."""
    for option, value, least in (("--chunk", args.chunk, 1), ("--threads", args.threads, 0),
                                 ("--max-tokens", getattr(args, "max_tokens", 0), 0)):
        if value < least:
            raise InputError(f"{option} must be >= {least}, got {value}")
    if hasattr(args, "temperature"):  # commands that sample from the command line (serve takes them per request)
        make_sampler(args)  # the sampling options, checked now


def fits_in_memory(checkpoint, context_length: int, max_chunk: int) -> bool:
    """Without --ram-budget: when the whole checkpoint, its KV cache and a margin fit in what the machine (or
    its cgroup) has available, the page cache holds everything and the plain mapping is fastest; otherwise
    stream experts under a budget of what is available."""
    from gptoss_stream.streaming.budget import kv_cache_nbytes
    from gptoss_stream.system import available_memory

    margin = 1 << 30  # Python, libraries, scratch buffers
    kv_bytes = kv_cache_nbytes(checkpoint.config, context_length, max_chunk)
    return checkpoint.nbytes() + kv_bytes + margin <= available_memory()


def print_stats(args: argparse.Namespace, result) -> None:
    if args.stats:
        from gptoss_stream.engine import compute_path, kernels
        from gptoss_stream.streaming.runstats import report

        path = compute_path.selected()
        print(f"[stats] compute path: {path} ({compute_path.DESCRIPTIONS[path]}), "
              f"{kernels.get_num_threads()} threads, oneDNN {compute_path.onednn_info().isa}", file=sys.stderr)
        print(report(result, args.plan), file=sys.stderr)



def make_sampler(args: argparse.Namespace):
    from gptoss_stream.engine.sampling import Sampler, SamplingParams

    try:
        params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except ValueError as e:
        raise InputError(str(e)) from e
    return Sampler(params)

