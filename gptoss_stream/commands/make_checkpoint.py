"""`gptoss make-checkpoint OUT`: the command line of weights/synthetic.py (synthetic checkpoints in the
published layouts)."""

from __future__ import annotations

import argparse
import sys
import textwrap
import time

from gptoss_stream.progress import format_bytes
from gptoss_stream.errors import InputError
from gptoss_stream.streaming.budget import size_argument
from gptoss_stream.weights.config import PRESETS
from gptoss_stream.weights.synthetic import DEFAULT_MAX_SHARD_BYTES, make_checkpoint, original_nbytes

_OVERRIDES = (
    # (flag, ModelConfig field, help)
    ("--layers", "num_hidden_layers", "number of transformer blocks (even = sliding window, odd = full)"),
    ("--hidden-size", "hidden_size", "model width H (multiple of 32)"),
    ("--intermediate-size", "intermediate_size", "expert width I (multiple of 32)"),
    ("--experts", "num_experts", "experts per layer E"),
    ("--experts-per-token", "experts_per_token", "experts routed per token (top-k)"),
    ("--heads", "num_attention_heads", "query heads"),
    ("--kv-heads", "num_key_value_heads", "key/value heads (must divide --heads)"),
    ("--head-dim", "head_dim", "dimension of each head"),
    ("--vocab-size", "vocab_size", "vocabulary rows (keep 201088 to use the real tokenizer)"),
    ("--sliding-window", "sliding_window", "window of the sliding-attention layers"),
)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    presets = ", ".join(f"{k} ({format_bytes(original_nbytes(v))})" for k, v in PRESETS.items())
    p = subparsers.add_parser(
        "make-checkpoint",
        help="write a synthetic gpt-oss checkpoint in the official original and/or Hugging Face format",
        description=textwrap.fill(
            "Write a synthetic gpt-oss checkpoint with random weights shaped like a trained model's, in the exact "
            "layout of the published checkpoints: 'original' (config.json + model.safetensors, as in the repos' "
            "original/ folder) or 'hf' (config.json + model-0000X-of-0000Y.safetensors + index). Deterministic: "
            "the same --seed gives bit-identical weights in both formats. Presets: " + presets + ".", width=79
        ),
        epilog=("examples:\n"
                "  gptoss make-checkpoint /tmp/tiny --preset tiny --format both\n"
                "  gptoss make-checkpoint /work/ckpt/20b --preset 20b --format original\n"
                "  gptoss make-checkpoint /tmp/20b-2l --preset 20b --layers 2 --format hf --max-shard-size 500MB"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="output directory (with --format both: gets original/ and hf/)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model size to start from (default: tiny)")
    p.add_argument("--format", choices=["original", "hf", "both"], default="original",
                   help="checkpoint layout to write (default: original)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    group = p.add_argument_group("overrides", "change the preset's sizes (everything else stays)")
    for flag, field, text in _OVERRIDES:
        group.add_argument(flag, dest=field, type=int, default=None, metavar="N", help=text)
    p.add_argument("--max-shard-size", type=size_argument, default=DEFAULT_MAX_SHARD_BYTES, metavar="SIZE",
                   help="largest HF shard, e.g. 4.8GB (default, as the published repos), 500MB, 64MiB")
    p.add_argument("--force", action="store_true", help="overwrite an existing checkpoint in OUT_DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    try:
        cfg = PRESETS[args.preset].with_overrides(**{field: getattr(args, field) for _, field, _ in _OVERRIDES})
    except ValueError as e:  # the overrides make an impossible model
        raise InputError(str(e)) from e
    start = time.monotonic()
    written = make_checkpoint(args.out_dir, cfg, args.format, args.seed, args.max_shard_size,
                              progress=not args.quiet, force=args.force)
    seconds = time.monotonic() - start
    for fmt, d in written.items():
        size = sum(p.stat().st_size for p in d.glob("*.safetensors"))
        print(f"wrote {fmt} checkpoint {d} ({format_bytes(size)})", file=sys.stdout)
    print(f"done in {seconds:.1f} s", file=sys.stdout)
    return 0
