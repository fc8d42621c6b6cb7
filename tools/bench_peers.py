#!/usr/bin/env python3
"""gptoss-stream and llama.cpp side by side, one run, same machine, same threads, everything in RAM.

  python tools/bench_peers.py -m /work/ckpt/20b [-m /work/ckpt/20b-q8] --gguf /work/peers/gpt-oss-20b.gguf \\
      --llama-bench /work/peers/llama.cpp/bin/llama-bench [--isa avx512,avx2] [--threads 2] [--decode-tokens 32]

The peers (kept outside the repository): ../shared/peers/build_llama_cpp.sh builds llama-bench from the
source that llama-cpp-python's sdist bundles; ../shared/peers/make_synthetic_gguf.py writes a gpt-oss-20b
GGUF with the official tensor types (MXFP4 experts, Q8_0 attention / embeddings, F32 norms and router) and
random weights. Our side reads a synthetic checkpoint of the same shapes (`gptoss make-checkpoint --preset
20b`): bf16 attention / embeddings, as the published checkpoint has them; `-m` again adds another of ours
(e.g. its `gptoss repack --dense q8` copy, int8 dense weights like llama.cpp's Q8_0), and `--isa` a list of
our compute paths (a path below the CPU's best runs with oneDNN capped to match: ONEDNN_MAX_CPU_ISA).

Equal work on both sides: prefill of P prompt tokens in one batch from an empty context (llama-bench's ppP;
our tools/bench.py with --prompt-tokens P, one chunk), and decode of N tokens one at a time from the start
of a context (llama-bench's tgN; ours after the 64-token prefill, the median step). Each side's file is
read into the page cache first (llama-bench runs a warm-up pass; bench.py --warm), so both run from RAM.
llama.cpp runs twice: `--repack 0` (its weights used in place from the mapping, like ours) and its default
(the CPU repack: an interleaved in-RAM copy of the quantized weights, faster kernels, more RSS).

Before each run every other file of the comparison (our other checkpoints, the GGUF) is dropped from the page
cache: the files together are larger than RAM, and Linux reclaims the pages a warm-up read just brought in
(its inactive list) before the pages an earlier run used twice, so without this a run could find its own
weights half evicted and fault them back in from disk during the measurement.

Prints one table of tok/s and our/llama.cpp ratios, with the CPU and our compute path; --json saves it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import print_machine  # noqa: E402

TOOLS = Path(__file__).resolve().parent
PROMPT_SIZES = (64, 512)


def checkpoint_files(path: Path) -> list[str]:
    """The weight files of a checkpoint folder (or a single GGUF file)."""
    if path.is_file():
        return [str(path)]
    return sorted(str(p) for p in path.rglob("*.safetensors"))


def evict_others(keep: Path, everything: list[Path]) -> None:
    """Drop every file of the comparison but `keep`'s from the page cache (see the module docstring)."""
    from gptoss_stream.commands.memprof.residency import evict_files

    evict_files([f for p in everything if p != keep for f in checkpoint_files(p)])


# oneDNN's own dispatch cap for each of our paths, so that a lower path measured on a better CPU runs as it
# would on a CPU that has nothing more (README, CPUs and compute paths).
ONEDNN_CAP = {"avx2": "AVX2", "scalar": "SSE41"}


def run_ours(model: Path, prompt_tokens: int, decode_tokens: int, threads: int, isa: str | None) -> dict:
    """tools/bench.py in a child (a fresh process, like llama-bench): prefill, decode, peak RSS."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, str(TOOLS / "bench.py"), "-m", str(model), "--prompt-tokens", str(prompt_tokens),
               "--decode-tokens", str(decode_tokens), "--threads", str(threads), "--warm", "--json", out.name]
        env = dict(os.environ)
        if isa:
            cmd += ["--isa", isa]
            if isa in ONEDNN_CAP:
                env["ONEDNN_MAX_CPU_ISA"] = ONEDNN_CAP[isa]
        print("$ " + " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True, stdout=sys.stderr, env=env)
        return json.loads(Path(out.name).read_text())


def run_measured(cmd: list[str]) -> tuple[str, float]:
    """Run cmd; its stdout and its peak RSS in MB (wait4's rusage of that child alone)."""
    print("$ " + " ".join(cmd), file=sys.stderr)
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    stdout = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"{cmd[0]} exited with status {child.returncode}")
    return stdout, usage.ru_maxrss / 1024


def run_llama(llama_bench: Path, gguf: Path, threads: int, decode_tokens: int, repetitions: int,
              repack: int | None) -> tuple[list[dict], float]:
    """llama-bench's JSON records (one per test: ppP or tgN) for one repack setting (None: its default), and
    its peak RSS in MB."""
    cmd = [str(llama_bench), "-m", str(gguf), "-t", str(threads), "-p", ",".join(map(str, PROMPT_SIZES)),
           "-n", str(decode_tokens), "-r", str(repetitions), "-o", "json"]
    if repack is not None:
        cmd += ["--repack", str(repack)]
    stdout, peak_rss_mb = run_measured(cmd)
    return json.loads(stdout), peak_rss_mb


def llama_rate(records: list[dict], n_prompt: int, n_gen: int) -> float:
    for r in records:
        if r["n_prompt"] == n_prompt and r["n_gen"] == n_gen:
            return float(r["avg_ts"])
    raise ValueError(f"llama-bench printed no pp{n_prompt}/tg{n_gen} record")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", type=Path, required=True, action="append",
                   help="our checkpoint (20b preset); repeat for more (e.g. its q8 repack)")
    p.add_argument("--gguf", type=Path, required=True, help="llama.cpp's GGUF of the same shapes")
    p.add_argument("--llama-bench", type=Path, required=True, help="the llama-bench binary")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repetitions", type=int, default=3, help="llama-bench -r")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--isa", default=None, metavar="LIST",
                   help="our compute paths to run, comma-separated (e.g. avx512,avx2; default: the best here)")
    args = p.parse_args(argv)
    for path in (*args.model, args.gguf, args.llama_bench):
        if not path.exists():
            p.error(f"{path} does not exist")
    paths = args.isa.split(",") if args.isa else [None]

    print_machine()
    everything = [*args.model, args.gguf]
    ours = {}
    for model in args.model:
        for isa in paths:
            evict_others(model, everything)
            ours[(model, isa)] = {n: run_ours(model, n, args.decode_tokens if n == PROMPT_SIZES[0] else 4,
                                              args.threads, isa) for n in PROMPT_SIZES}
    llama, llama_rss = {}, {}
    for name, repack in (("repack 0", 0), ("default", None)):
        evict_others(args.gguf, everything)
        llama[name], llama_rss[name] = run_llama(args.llama_bench, args.gguf, args.threads, args.decode_tokens,
                                                 args.repetitions, repack)

    llama_rows = {f"prefill {n}": {k: llama_rate(v, n, 0) for k, v in llama.items()} for n in PROMPT_SIZES}
    llama_rows[f"decode {args.decode_tokens}"] = {k: llama_rate(v, 0, args.decode_tokens) for k, v in llama.items()}
    print(f"\n{args.threads} threads; llama.cpp: {args.gguf.name}, peak RSS {llama_rss['repack 0']:.0f} MB "
          f"(--repack 0) / {llama_rss['default']:.0f} MB (default)   (mapped file pages touched count too)")
    print(f"{'tok/s':14} {'llama --repack 0':>17} {'llama default':>14}")
    for name, theirs in llama_rows.items():
        print(f"{name:14} {theirs['repack 0']:17.2f} {theirs['default']:14.2f}")
    results = {}
    for (model, _), runs in ours.items():
        isa = runs[PROMPT_SIZES[0]]["isa"]
        mine = {f"prefill {n}": runs[n]["prefill_tok_s"] for n in PROMPT_SIZES}
        mine[f"decode {args.decode_tokens}"] = runs[PROMPT_SIZES[0]]["decode_tok_s"]
        our_rss = max(r["peak_rss_mb"] for r in runs.values())
        print(f"\nours: {model.name} on the {isa} path, peak RSS {our_rss:.0f} MB")
        print(f"{'tok/s':14} {'ours':>8} {'ours/repack0':>13} {'ours/default':>13}")
        for name, value in mine.items():
            theirs = llama_rows[name]
            print(f"{name:14} {value:8.2f} {value / theirs['repack 0']:13.2f} {value / theirs['default']:13.2f}")
        results[f"{model} {isa}"] = {"runs": {str(n): r for n, r in runs.items()}, "rows": mine,
                                     "peak_rss_mb": our_rss}
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "ours": results, "llama": llama,
                                         "llama_peak_rss_mb": llama_rss, "llama_rows": llama_rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
