#!/usr/bin/env python3
"""What `gptoss repack --dense q8` costs in fidelity: the q8 engine against the bf16 engine (and, on a small
checkpoint, against transformers' GptOssForCausalLM), position by position.

The same token sequences (seeded random ids, or tiktoken-encoded text with --text) are prefilled with every
position's logits by each model; per position: is the next-token top-1 the same, and KL(P || Q) in nats between
the softmax of the reference's logits P and of the q8 engine's Q (float64 log-softmax). Prints top-1
agreement, mean, median and max KL, and the same for the bf16 engine against transformers when --hf is given,
so the q8 numbers can be read against the bf16 engine's own distance from an independent implementation.
--noise-isa avx2 also runs the bf16 engine with another compute path's kernels (same weights, other fp32
summation orders): the noise floor of the comparison. A model whose layers amplify small differences (the
synthetic checkpoints' random weights over 24 layers do) shows it there first.

  python tools/q8_fidelity.py --bf16 /work/ckpt/20b --q8 /work/ckpt/20b-q8 --positions 1024
  python tools/q8_fidelity.py --tiny --positions 1024      # tiny checkpoint in a temp dir, + transformers

Models run one after the other (each maps its whole checkpoint; a 20b pair does not fit twice in 16 GB),
the reference's logits are kept (positions x vocab x 4 bytes: 0.8 GB for 1,024 positions of gpt-oss).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from gptoss_stream.engine import compute_path  # noqa: E402
from gptoss_stream.engine.model import Model  # noqa: E402
from gptoss_stream.weights.checkpoint import Checkpoint  # noqa: E402


def sequences(args: argparse.Namespace, vocab: int) -> list[list[int]]:
    """args.positions tokens in sequences of args.seq_len (fresh context each)."""
    if args.text:
        import tiktoken

        ids = tiktoken.get_encoding("o200k_base").encode(Path(args.text).read_text(encoding="utf-8"))
        if len(ids) < args.positions:
            raise SystemExit(f"{args.text}: {len(ids)} tokens, fewer than --positions {args.positions}")
        ids = ids[:args.positions]
    else:  # ordinary (non-special) ids, as tests/test_model.py's prompts
        ids = np.random.default_rng(args.seed).integers(0, min(vocab, 199_998), size=args.positions).tolist()
    return [ids[i:i + args.seq_len] for i in range(0, len(ids), args.seq_len)]


def engine_logits(path: Path, seqs: list[list[int]], chunk: int, threads: int, isa: str | None = None
                  ) -> tuple[np.ndarray, float]:
    """Every position's fp32 logits [positions, V] and the seconds the forward passes took (isa: run with that
    compute path's kernels, then restore the selected one)."""
    from gptoss_stream.engine import kernels

    if isa is not None:
        saved = kernels.get_isa()
        kernels.set_isa(isa)
        try:
            return engine_logits(path, seqs, chunk, threads)
        finally:
            kernels.set_isa(saved)
    with Model(Checkpoint.open(path), max_chunk=chunk, num_threads=threads) as model:
        out = np.empty((sum(map(len, seqs)), model.config.vocab_size), dtype=np.float32)
        pos, t = 0, time.perf_counter()
        for s in seqs:
            out[pos:pos + len(s)] = model.forward(s, model.new_cache(len(s)), all_logits=True)
            pos += len(s)
        return out, time.perf_counter() - t


def hf_logits(hf_dir: Path, seqs: list[list[int]]) -> np.ndarray:
    import hf_reference

    model = hf_reference.load_hf_model(hf_dir)
    return np.concatenate([hf_reference.hf_logits(model, s) for s in seqs])


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare(p_logits: np.ndarray, q_logits: np.ndarray, rows: int = 64) -> dict:
    """Top-1 agreement and KL(P || Q) per position (in blocks of rows: float64 copies of 201k-wide rows)."""
    agree, kl = [], []
    for i in range(0, len(p_logits), rows):
        p, q = p_logits[i:i + rows], q_logits[i:i + rows]
        agree.append(p.argmax(-1) == q.argmax(-1))
        lp, lq = log_softmax(p), log_softmax(q)
        kl.append((np.exp(lp) * (lp - lq)).sum(-1))
    a, k = np.concatenate(agree), np.concatenate(kl)
    return {"positions": int(a.size), "top1_agreement": float(a.mean()), "kl_mean": float(k.mean()),
            "kl_median": float(np.median(k)), "kl_max": float(k.max())}


def line(name: str, r: dict) -> str:
    return (f"{name:<22} {r['positions']} positions: top-1 agreement {100 * r['top1_agreement']:.2f}%, "
            f"KL mean {r['kl_mean']:.3g} nats, median {r['kl_median']:.3g}, max {r['kl_max']:.3g}")


def make_tiny(root: Path) -> tuple[Path, Path, Path]:
    """The tests' tiny checkpoint (seed 0; original + HF) and its q8 repack, under root."""
    from gptoss_stream.weights.config import ModelConfig
    from gptoss_stream.weights.repack import repack
    from gptoss_stream.weights.synthetic import make_checkpoint

    make_checkpoint(root / "tiny", ModelConfig.preset("tiny"), format="both", seed=0, progress=False)
    repack(root / "tiny" / "original", root / "tiny-q8", progress=False, dense="q8")
    return root / "tiny" / "original", root / "tiny-q8", root / "tiny" / "hf"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bf16", type=Path, help="the bf16 checkpoint (original, HF or repacked)")
    ap.add_argument("--q8", type=Path, help="its `gptoss repack --dense q8` copy")
    ap.add_argument("--hf", type=Path, default=None, help="the HF copy of --bf16: compare with transformers too")
    ap.add_argument("--tiny", action="store_true", help="make the tiny checkpoint (+ q8, + HF) in a temp dir")
    ap.add_argument("--positions", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--text", type=Path, default=None, help="UTF-8 text to encode instead of random token ids")
    ap.add_argument("--chunk", type=int, default=128, help="prefill chunk (default 128)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--noise-isa", default=None, choices=("avx2", "scalar"),
                    help="also compare the bf16 engine with itself on this compute path's kernels (noise floor)")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="q8_fidelity-") as tmp:
        if args.tiny:
            args.bf16, args.q8, args.hf = make_tiny(Path(tmp))
        if args.bf16 is None or args.q8 is None:
            ap.error("--bf16 and --q8 (or --tiny)")
        with Checkpoint.open(args.q8) as ck:
            if ck.dense_format != "q8":
                ap.error(f"{args.q8}: dense weights are {ck.dense_format}, not q8")
            vocab = ck.config.vocab_size
        seqs = sequences(args, vocab)
        bf16, t_bf16 = engine_logits(args.bf16, seqs, args.chunk, args.threads)
        q8, t_q8 = engine_logits(args.q8, seqs, args.chunk, args.threads)
        results = {"q8 vs bf16 engine": compare(bf16, q8)}
        if args.noise_isa:
            other, _ = engine_logits(args.bf16, seqs, args.chunk, args.threads, args.noise_isa)
            results[f"bf16 {args.noise_isa} kernels vs bf16"] = compare(bf16, other)
            del other
        del bf16
        if args.hf is not None:
            hf = hf_logits(args.hf, seqs)
            results["q8 vs transformers"] = compare(hf, q8)
            bf16, _ = engine_logits(args.bf16, seqs, args.chunk, args.threads)
            results["bf16 vs transformers"] = compare(hf, bf16)
    print(f"{len(seqs)} sequences of <= {args.seq_len} tokens ({'text ' + str(args.text) if args.text else f'random ids, seed {args.seed}'}); "
          f"prefill: bf16 {t_bf16:.1f} s, q8 {t_q8:.1f} s; compute path {compute_path.selected()}")
    for name, r in results.items():
        print(line(name, r))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
