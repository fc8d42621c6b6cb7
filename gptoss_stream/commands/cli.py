"""The `gptoss` command: one sub-command per user task, each in its own module of this package (generate.py:
generate and chat; make_checkpoint.py; repack.py; memprof/; info.py; serve.py); this module only dispatches.

stdout carries only generated text (so it can be piped); progress, statistics and errors go to stderr.
"""

from __future__ import annotations

import argparse
import sys
import traceback

# ---------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    # Each command module registers its own sub-parser and sets `func`; heavy imports stay inside the
    # commands so `gptoss --help` is instant.
    from gptoss_stream.commands import generate, info, make_checkpoint, repack, serve
    from gptoss_stream.commands.memprof import command as memprof

    parser = argparse.ArgumentParser(
        prog="gptoss",
        description="Run OpenAI gpt-oss models on low-RAM CPU machines by streaming only the routed experts.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    generate.add_generate_parser(subparsers)
    generate.add_chat_parser(subparsers)
    make_checkpoint.add_parser(subparsers)
    repack.add_parser(subparsers)
    memprof.add_parser(subparsers)
    info.add_parser(subparsers)
    serve.add_parser(subparsers)
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
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:
        from gptoss_stream.errors import is_user_error

        if is_user_error(e):
            print(f"gptoss: error: {e}", file=sys.stderr)
            return 1
        traceback.print_exc()
        print("gptoss: internal error: this is a bug in gptoss, not a problem with the input; please report "
              "it with the traceback above (and the output of `gptoss info`)", file=sys.stderr)
        return 70  # EX_SOFTWARE


if __name__ == "__main__":
    sys.exit(main())
