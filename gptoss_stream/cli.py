"""The `gptoss` command: one sub-command per user task, each defined in the module that owns it."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    # Each command module registers its own sub-parser with add_parser(subparsers) and
    # sets `func` to the function that runs it; imports stay local so `gptoss --help` is instant.
    from gptoss_stream import synthetic

    parser = argparse.ArgumentParser(
        prog="gptoss",
        description="Run OpenAI gpt-oss models on low-RAM CPU machines by streaming only the routed experts.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    synthetic.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as e:
        print(f"gptoss: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
