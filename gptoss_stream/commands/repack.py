"""`gptoss repack SRC DST`: the command line of weights/repack.py (which writes the repacked layout)."""

from __future__ import annotations

import argparse

from gptoss_stream.progress import format_bytes
from gptoss_stream.streaming.budget import size_argument
from gptoss_stream.weights.layouts.repacked import DEFAULT_ALIGN
from gptoss_stream.weights.repack import DEFAULT_SHARD_SIZE, repack


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "repack",
        help="rewrite a checkpoint so each expert is one aligned record (one read per expert)",
        description=(
            "Rewrite an original or Hugging Face gpt-oss checkpoint into the streaming layout: each expert's six "
            "MXFP4 tensors in one contiguous record aligned to --align (one O_DIRECT-able read per routed expert), "
            "dense weights grouped in forward-pass order, shards that stay valid safetensors, and a manifest "
            "(gptoss-repack.json) with sha256 per shard and per record. DST then loads like any checkpoint. "
            "Interrupted runs resume when the same command is run again. Layout: docs/repacked-format.md."
        ),
        epilog="examples:\n  gptoss repack /work/ckpt/20b/original /work/ckpt/20b-repacked --verify\n"
               "  gptoss repack /work/ckpt/20b/original /work/ckpt/20b-q8 --dense q8",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", metavar="SRC", help="checkpoint to read (original/ or Hugging Face folder)")
    p.add_argument("dst", metavar="DST", help="output folder (created; must not exist unless --force or resuming)")
    p.add_argument("--shard-size", type=size_argument, default=DEFAULT_SHARD_SIZE, metavar="SIZE",
                   help="largest shard file, e.g. 2G (default), 500MB, 4GiB; a record is never split")
    p.add_argument("--align", type=int, default=DEFAULT_ALIGN, metavar="BYTES",
                   help=f"alignment of every record's offset and length (power of two; default {DEFAULT_ALIGN})")
    p.add_argument("--dense", choices=("bf16", "q8"), default=None,
                   help="dense weights: bf16 = the source's bytes, faithful to the reference (default for a "
                        "published checkpoint); q8 = attention, embedding and unembedding matrices as int8 with "
                        "one fp16 scale per 32 values (Q8_0): ~half the dense bytes a token reads, at a small "
                        "cost in fidelity (README); the router and all MXFP4 experts are kept as they are. "
                        "Default: the source's own format")
    p.add_argument("--verify", action="store_true",
                   help="afterwards re-read DST and check every record against SRC and the manifest's sha256")
    p.add_argument("--force", action="store_true", help="overwrite an existing DST instead of refusing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    result = repack(args.src, args.dst, args.shard_size, args.align, verify=args.verify, force=args.force,
                    progress=not args.quiet, dense=args.dense)
    if result.status == "complete":
        print(f"{result.dst}: already a complete repack of {args.src} ({result.shards} shards, "
              f"{format_bytes(result.total_bytes)}); nothing to do")
    else:
        rate = result.bytes_written / result.seconds / 1e6 if result.seconds > 0 else 0.0
        print(f"{result.status} {result.dst}: {result.shards} shards, {format_bytes(result.total_bytes)} "
              f"({format_bytes(result.bytes_written)} this run) in {result.seconds:.1f} s, {rate:.1f} MB/s")
    if args.verify:
        rate = result.verified_bytes / result.verify_seconds / 1e6 if result.verify_seconds > 0 else 0.0
        print(f"verified {format_bytes(result.verified_bytes)} against {args.src} and the manifest in "
              f"{result.verify_seconds:.1f} s, {rate:.1f} MB/s: OK")
    return 0
