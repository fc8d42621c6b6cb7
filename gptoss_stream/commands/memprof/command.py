"""`gptoss memprof`: how much RAM gpt-oss needs on this box, where it goes, and what the disk does per token.

It runs a real generation (load, prefill, N tokens) and samples the process from a background thread every
`--interval` seconds and at every phase and token boundary:

- memory: RSS split into anonymous and file-backed pages (/proc/self/status), USS/PSS (smaps_rollup),
  the peak RSS since the phase began (VmHWM, reset at each boundary), swap;
- work: major/minor page faults and CPU time (getrusage), bytes read from storage and through read()
  (/proc/self/io);
- the checkpoint's pages in the page cache, dense weights vs expert data (residency.py, mincore);
- the engine's own counters: KV cache in use, and whatever the expert store's `stats.as_dict()` reports;
- with `--limit`, the memory cgroup's usage, its page-cache and anonymous parts, and its peak per phase.

smaps_rollup and mincore walk every page of the mapping (tens to hundreds of ms on a 13 GB checkpoint), so
these "slow" measures are taken at phase boundaries and otherwise only when doing so keeps them under
SLOW_SHARE of the wall time. Everything else costs microseconds and is taken at every sample.

`--limit SIZE` runs the workload in a child process inside a cgroup v1 memory limit (root), which is how a
smaller box behaves: the page cache the workload fills is charged to the limit too. `--cold` first drops
the page cache (root). The timeline is written as JSON (schema below, `version` field; docs/memprof.md) and
can be drawn with `--plot` (matplotlib, the optional `plot` extra) or set beside another run (`--compare`).

This module is the command and its workload; the parts: proc.py (reading /proc), cgroup.py (--limit, --cold),
sampling.py (the sampler), report.py (summary and text tables), plot.py (--plot), residency.py (mincore).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gptoss_stream.errors import InputError, SetupError, is_user_error
from gptoss_stream.commands import options
from gptoss_stream.commands.memprof.cgroup import MemoryCgroup, _require_root, drop_page_cache
from gptoss_stream.commands.memprof.plot import MATPLOTLIB_MISSING, plot_report
from gptoss_stream.commands.memprof.report import SCHEMA, VERSION, format_bytes, format_compare, format_summary, \
    load_report, summarize, token_records
from gptoss_stream.commands.memprof.sampling import DEFAULT_INTERVAL, Profiler

# ---------------------------------------------------------------------------- the workload


def _prompt_tokens(args: argparse.Namespace, tokenizer) -> list[int]:
    from gptoss_stream.chat import harmony

    if args.raw:
        return tokenizer.encode(args.prompt, allow_special=True)
    messages = [harmony.system_message(args.reasoning, current_date=time.strftime("%Y-%m-%d"))]
    messages.append(harmony.Message("user", args.prompt))
    return harmony.render_conversation(messages, tokenizer)


def expert_store_stats(store) -> dict[str, Any] | None:
    """{"counters": the store's stats.as_dict(), "derived": its numeric properties (hit_rate, ...)}, or None.

    Duck-typed on purpose: memprof reports whatever the store in use counts without knowing which store it is.
    """
    stats = getattr(store, "stats", None)
    as_dict = getattr(stats, "as_dict", None)
    if not callable(as_dict):
        return None
    derived = {}
    for name in dir(type(stats)):
        if not name.startswith("_") and isinstance(getattr(type(stats), name), property):
            value = getattr(stats, name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                derived[name] = value
    return {"counters": dict(as_dict()), "derived": derived}


def expert_store_bytes(store) -> int | None:
    """RAM the store holds for expert data (`nbytes`, a method or an attribute), if it says."""
    nbytes = getattr(store, "nbytes", None)
    value = nbytes() if callable(nbytes) else nbytes
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _describe(plan) -> str | None:
    """The memory plan open_model made for --ram-budget, as its own one-line description."""
    describe = getattr(plan, "describe", None)
    return describe() if callable(describe) else None


def profile(args: argparse.Namespace, cgroup: MemoryCgroup | None = None) -> dict[str, Any]:
    """Load, prefill and decode args.max_tokens tokens under the profiler; the report (see SAMPLE_KEYS)."""
    profiler = Profiler(args.interval, cgroup)
    profiler.start()
    try:
        # load: libraries, checkpoint mapping, model, tokenizer, prompt
        from gptoss_stream.chat.tokenizer import get_tokenizer
        from gptoss_stream.commands.memprof.residency import CheckpointResidency
        from gptoss_stream.engine.generate import generate

        model = options.open_model(args)
        prompt = _prompt_tokens(args, get_tokenizer())
        cache = model.new_cache(args.context)
        residency = CheckpointResidency(model.checkpoint)
        profiler.attach(residency, lambda: {"kv_bytes": cache.bytes_in_use(),
                                            "expert_cache_bytes": expert_store_bytes(model.experts),
                                            "experts": expert_store_stats(model.experts)})
        profiler.begin_phase("prefill")

        # prefill, then decode: the first token comes from the prefill's logits, each later one from a step
        def on_token(token: int) -> None:
            index = len(generated)
            generated.append(token)
            if index == 0:
                profiler.phases[-1]["tokens"] = len(prompt)
                profiler.begin_phase("decode", token=0)
            else:
                profiler.phases[-1]["tokens"] += 1
                profiler.token(index)

        generated: list[int] = []
        # No stop tokens: every run generates exactly max_tokens tokens, so runs compare token for token.
        result = generate(model, prompt, args.max_tokens, options.make_sampler(args), stop_tokens=(), cache=cache,
                          on_token=on_token, context_length=args.context)
    finally:
        profiler.stop()

    ckpt = model.checkpoint
    cfg = model.config
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "version": VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": getattr(args, "command_line", None) or " ".join(["gptoss", *sys.argv[1:]]),
        "host": {
            "hostname": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(),
            "mem_total": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "page_size": os.sysconf("SC_PAGE_SIZE"),
        },
        "model": {
            "path": str(ckpt.path), "format": getattr(ckpt, "format", None), "file_bytes": ckpt.nbytes(),
            "dense_bytes": residency.dense_total, "embedding_bytes": residency.embedding_total,
            "expert_bytes": residency.expert_total,
            "experts": residency.experts_total, "num_hidden_layers": cfg.num_hidden_layers,
            "num_experts": cfg.num_experts, "scratch_bytes": model.state.nbytes, "kv_reserved_bytes": cache.nbytes,
            "expert_store": type(model.experts).__name__,
        },
        "settings": {
            "prompt_tokens": len(prompt), "max_tokens": args.max_tokens, "interval": args.interval,
            "ram_budget": args.ram_budget, "mmap_only": args.mmap_only,
            "memory_plan": _describe(getattr(args, "plan", None)), "limit": getattr(args, "limit_bytes", None),
            "cold": bool(args.cold), "threads": args.threads, "chunk": args.chunk, "context": args.context,
            "raw": bool(args.raw), "temperature": args.temperature, "seed": args.seed,
        },
        "phases": profiler.phases,
        "samples": profiler.samples,
        "tokens": token_records(profiler.samples),
        "generated": generated,
    }
    report["summary"] = summarize(report)
    report["summary"]["profiler_seconds"] = profiler.sampling_seconds
    model.close()
    report["summary"]["profiler_cpu_seconds"] = profiler.sampling_cpu_seconds
    report["summary"]["engine_prefill_seconds"] = result.prefill_seconds
    report["summary"]["engine_decode_tokens_per_second"] = result.decode_tokens_per_second
    return report


# ---------------------------------------------------------------------------- the command


def _write_outputs(args: argparse.Namespace, report: dict[str, Any]) -> None:
    print(format_summary(report), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"timeline written to {args.json}", file=sys.stderr)
    if args.plot:
        plot_report(report, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)


def _run_limited(args: argparse.Namespace) -> int:
    """Re-run this command in a child process placed in a fresh memory cgroup capped at args.limit_bytes."""
    group = MemoryCgroup.create(args.limit_bytes)
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="gptoss-memprof-args-") as args_file:
        json.dump({k: v for k, v in vars(args).items() if k != "func"}, args_file)
        args_file.flush()
        package_root = str(Path(__file__).resolve().parents[3])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        command = [sys.executable, "-m", "gptoss_stream.commands.memprof", "--child", args_file.name, str(group.path)]
        try:
            # The child joins the group between fork and exec, so everything it maps or caches is charged there.
            child = subprocess.Popen(command, env=env, preexec_fn=lambda: group.add(os.getpid()))
            try:
                code = child.wait()
            except KeyboardInterrupt:
                # Ctrl-C reached the child too (same process group); interrupt it only if it did not stop.
                try:
                    child.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    child.send_signal(signal.SIGINT)
                    child.wait()
                raise
            if code == -signal.SIGKILL:
                peak = format_bytes(group.read("memory.max_usage_in_bytes"))
                if group.oom_kills():
                    raise SetupError(
                        f"out of memory: the kernel killed the workload inside the {format_bytes(args.limit_bytes)} "
                        f"memory cgroup (peak usage {peak}, limit hit {group.read('memory.failcnt')} times). "
                        "Raise --limit or lower --ram-budget.")
                raise SetupError(f"the workload was killed (SIGKILL; peak cgroup usage {peak})")
            return code if code >= 0 else 128 - code
        finally:
            group.remove()


def run_memprof(args: argparse.Namespace) -> int:
    if args.compare:
        a, b = (load_report(p) for p in args.compare)
        print(format_compare(a, b, (Path(args.compare[0]).name, Path(args.compare[1]).name)))
        return 0
    if not args.model or args.prompt is None:
        raise InputError("memprof needs -m MODEL_DIR and -p PROMPT (or --compare A.json B.json)")
    if args.max_tokens < 2:
        raise InputError(f"memprof needs -n >= 2 (one token from the prefill, at least one decode step), "
                         f"got {args.max_tokens}")
    if args.interval <= 0:
        raise InputError(f"--interval must be positive, got {args.interval}")
    if args.plot and importlib.util.find_spec("matplotlib") is None:  # fail before a long run, not after it
        raise SetupError(MATPLOTLIB_MISSING)
    if args.prompt == "-":
        args.prompt = sys.stdin.read()
    from gptoss_stream.streaming.budget import parse_size  # the same size syntax as --ram-budget

    args.limit_bytes = parse_size(args.limit) if args.limit else None
    args.command_line = " ".join(["gptoss", *sys.argv[1:]])
    if args.limit_bytes is not None:
        _require_root("--limit")
    if args.cold:
        from gptoss_stream.weights.checkpoint import Checkpoint

        with Checkpoint.open(args.model) as checkpoint:
            files = checkpoint.files()
        drop_page_cache(files)
    if args.limit_bytes is not None:
        return _run_limited(args)
    _write_outputs(args, profile(args))
    return 0


def _child_main(argv: list[str]) -> int:
    """Entry point of the process that _run_limited starts inside the cgroup."""
    if len(argv) != 3 or argv[0] != "--child":
        print("usage: python -m gptoss_stream.commands.memprof --child ARGS.json CGROUP_DIR "
              "(started by gptoss memprof --limit)", file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        args = argparse.Namespace(**json.load(f))
    try:
        _write_outputs(args, profile(args, MemoryCgroup(Path(argv[2]))))
    except Exception as e:
        if not is_user_error(e):  # a bug: its traceback, as `gptoss` shows it (cli.main)
            raise
        print(f"gptoss: error: {e}", file=sys.stderr)
        return 1
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "memprof", help="profile memory, page cache and disk reads of a generation",
        description="Run a real generation (load, prefill, N tokens) and sample RSS (anonymous/file), USS/PSS, "
                    "page faults, disk reads, CPU time, the checkpoint's page-cache residency (dense weights vs "
                    "experts) and the engine's own counters; print a per-phase summary, and optionally write the "
                    "timeline as JSON and a PNG plot. --limit runs it inside a memory cgroup (root) to emulate a "
                    "smaller box. See docs/memprof.md.",
    )
    options.add_model_arguments(p)
    # -m is required for a run but not for --compare; run_memprof checks it.
    for action in p._actions:
        if action.dest == "model":
            action.required = False
    p.add_argument("-p", "--prompt", default=None, help="the prompt text, or - to read it from stdin")
    p.add_argument("--raw", action="store_true", help="no chat template: feed the prompt's tokens as they are")
    options.add_sampling_arguments(p)
    p.set_defaults(max_tokens=16)
    p.add_argument("--limit", default=None, metavar="SIZE",
                   help="run inside a cgroup v1 memory limit of SIZE (e.g. 4G; page cache counts) to emulate a "
                        "smaller box; needs root")
    p.add_argument("--cold", action="store_true",
                   help="drop the page cache first (sync; echo 3 > /proc/sys/vm/drop_caches); needs root")
    p.add_argument("--interval", type=float, default=DEFAULT_INTERVAL, metavar="SECONDS",
                   help=f"sampling period of the background thread (default {DEFAULT_INTERVAL})")
    p.add_argument("--json", default=None, metavar="OUT", help="write the full timeline as JSON (docs/memprof.md)")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="draw the timeline as a PNG (needs matplotlib)")
    p.add_argument("--compare", nargs=2, default=None, metavar=("A.json", "B.json"),
                   help="print two saved runs side by side instead of profiling")
    p.set_defaults(func=run_memprof)

