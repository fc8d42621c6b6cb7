#!/usr/bin/env python3
"""Layer-by-layer comparison of gptoss-stream against a reference (the seed's VERIFY_LAYER_BY_LAYER).

Each of our decoder layers gets the reference's own input for that layer (so errors cannot accumulate from
earlier layers), and its output is compared with the reference's output of the same layer. The report
names the first layer whose difference is larger than bf16 rounding explains, and then the logits.

  python tools/compare_reference.py CKPT_DIR [--reference hf|numpy] [--tokens 17]

CKPT_DIR holds original/ and hf/ (as `gptoss make-checkpoint --format both` writes it); with
--reference hf, transformers runs on hf/ and the engine on original/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from gptoss_stream.engine import kernels  # noqa: E402
from gptoss_stream.engine.model import Model  # noqa: E402
from gptoss_stream.weights.checkpoint import Checkpoint  # noqa: E402


# Measured: 0-1 ulp against numpy; against transformers 4-10 on the tiny checkpoint and 12-18 at the real
# width (2880: more terms, more of its extra bf16 roundings). A real bug (gate/up as halves, RoPE on adjacent
# pairs, a wrong GQA head order) shows up as 200-400 (1.6-3x the token's RMS).
DEFAULT_MAX_ULPS = {"numpy": 2.0, "hf": 32.0}


def bf16_ulps(ours: np.ndarray, theirs: np.ndarray) -> float:
    """Largest difference in units of the bf16 spacing at each token's RMS magnitude: the residual add
    rounds at the stream's scale, so an element that happens to be near zero has no finer precision."""
    rms = np.sqrt(np.mean(np.square(theirs, dtype=np.float64), axis=-1, keepdims=True))
    spacing = np.exp2(np.floor(np.log2(np.maximum(rms, 2.0**-126))) - 7)
    return float(np.max(np.abs(ours - theirs) / spacing))


def reference_streams(kind: str, ckpt_dir: Path, tokens: list[int]):
    """(input of each layer + final stream, logits, run_layer(layer, x, positions)) from the reference."""
    if kind == "hf":
        import hf_reference

        hf_reference.require_hf()
        model = hf_reference.load_hf_model(ckpt_dir / "hf")
        streams, logits = hf_reference.hf_hidden_states(model, tokens)
        return streams, logits
    import numpy_reference

    checkpoint = Checkpoint.open(ckpt_dir / "original")
    streams = numpy_reference.forward_layers(checkpoint, tokens)
    return streams, numpy_reference.unembed(checkpoint, streams[-1])


def compare_layers(model: Model, streams: list[np.ndarray], logits: np.ndarray, max_ulps: float) -> list[dict]:
    """One row per layer (and one for the logits): our layer on the reference's input vs its output."""
    rows = []
    positions = len(streams[0])
    cache = model.new_cache(max(positions, 1))
    for layer in range(model.config.num_hidden_layers):
        x = kernels.f32_to_bf16(np.ascontiguousarray(streams[layer], dtype=np.float32))
        model.layer_forward(layer, x, cache, 0)
        ours = kernels.bf16_to_f32(x)
        ulps = bf16_ulps(ours, streams[layer + 1])
        rows.append({"where": f"layer {layer}", "max_abs": float(np.max(np.abs(ours - streams[layer + 1]))),
                     "max_ulps": ulps, "ok": ulps <= max_ulps})
    final = kernels.f32_to_bf16(np.ascontiguousarray(streams[-1], dtype=np.float32))
    ours = model.logits(final)
    err = float(np.max(np.abs(ours - logits)) / np.std(logits))
    rows.append({"where": "logits", "max_abs": float(np.max(np.abs(ours - logits))), "max_ulps": float("nan"),
                 "rel_std": err, "ok": err < 0.05})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="folder with original/ and hf/ (make-checkpoint --format both)")
    p.add_argument("--reference", choices=("hf", "numpy"), default="hf")
    p.add_argument("--tokens", type=int, default=17, help="prompt length (random ordinary tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-ulps", type=float, default=None,
                   help="a layer whose output differs by more bf16 ulps (at the token's RMS) than this diverges; "
                        f"default {DEFAULT_MAX_ULPS['numpy']} against numpy (same rounding points), "
                        f"{DEFAULT_MAX_ULPS['hf']} against transformers (it rounds at more points)")
    args = p.parse_args(argv)

    tokens = np.random.default_rng(args.seed).integers(0, 199_998, size=args.tokens).tolist()
    streams, logits = reference_streams(args.reference, args.checkpoint, tokens)
    model = Model(Checkpoint.open(args.checkpoint / "original"), max_chunk=max(args.tokens, 1))
    max_ulps = args.max_ulps if args.max_ulps is not None else DEFAULT_MAX_ULPS[args.reference]
    rows = compare_layers(model, streams, logits, max_ulps)
    print(f"{'where':<10} {'max |diff|':>12} {'max bf16 ulps':>14}  status")
    for row in rows:
        extra = f"  (max|Δlogit|/std {row['rel_std']:.4f})" if "rel_std" in row else ""
        print(f"{row['where']:<10} {row['max_abs']:>12.6f} {row['max_ulps']:>14.1f}  "
              f"{'ok' if row['ok'] else 'DIVERGES'}{extra}")
    first = next((r["where"] for r in rows if not r["ok"]), None)
    print(f"first divergence: {first}" if first else "no divergence beyond bf16 rounding")
    return 1 if first else 0


if __name__ == "__main__":
    sys.exit(main())
