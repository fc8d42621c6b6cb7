"""The `gptoss` command: one sub-command per user task.

stdout carries only generated text (so it can be piped); progress, statistics and errors go to stderr.
"""

from __future__ import annotations

import argparse
import errno
import sys
import time
import traceback

from gptoss_stream.budget import size_argument
from gptoss_stream.errors import InputError


# ---------------------------------------------------------------------------- shared options


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
    from gptoss_stream.checkpoint import open_checkpoint
    from gptoss_stream.model import Model

    check_run_arguments(args)
    checkpoint = open_checkpoint(args.model)
    store = args.plan = None
    try:
        if not 0 < args.context <= checkpoint.config.max_context:
            raise InputError(f"--context {args.context} must be in 1..{checkpoint.config.max_context}")
        if not args.mmap_only and not (args.ram_budget is None and fits_in_memory(checkpoint, args.context,
                                                                                   args.chunk)):
            from gptoss_stream.expert_cache import open_budgeted_store

            store, args.plan = open_budgeted_store(checkpoint, args.ram_budget, args.context, args.chunk)
            if args.stats:
                print(f"[stats] plan: {args.plan.describe()}", file=sys.stderr)
        return Model(checkpoint, max_chunk=args.chunk, num_threads=args.threads, expert_store=store)
    except BaseException:
        if store is not None:
            store.close()
        checkpoint.close()
        raise


def check_run_arguments(args: argparse.Namespace) -> None:
    """InputError for numbers the model cannot run with (before anything is opened)."""
    for option, value, least in (("--chunk", args.chunk, 1), ("--threads", args.threads, 0),
                                 ("--max-tokens", getattr(args, "max_tokens", 0), 0)):
        if value < least:
            raise InputError(f"{option} must be >= {least}, got {value}")
    make_sampler(args)  # the sampling options, checked now


def fits_in_memory(checkpoint, context_length: int, max_chunk: int) -> bool:
    """Without --ram-budget: when the whole checkpoint, its KV cache and a margin fit in what the machine (or
    its cgroup) has available, the page cache holds everything and the plain mapping is fastest; otherwise
    stream experts under a budget of what is available."""
    from gptoss_stream.budget import available_memory, kv_cache_nbytes

    margin = 1 << 30  # Python, libraries, scratch buffers
    kv_bytes = kv_cache_nbytes(checkpoint.config, context_length, max_chunk)
    return checkpoint.nbytes() + kv_bytes + margin <= available_memory()


def print_stats(args: argparse.Namespace, result) -> None:
    if args.stats:
        from gptoss_stream.runstats import report

        print(report(result, args.plan), file=sys.stderr)


def make_sampler(args: argparse.Namespace):
    from gptoss_stream.sampling import Sampler, SamplingParams

    try:
        params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except ValueError as e:
        raise InputError(str(e)) from e
    return Sampler(params)


def print_speed(result) -> None:
    print(
        f"\n[prefill] {result.prompt_tokens} tokens in {result.prefill_seconds:.2f} s "
        f"({result.prefill_tokens_per_second:.2f} tok/s)\n"
        f"[decode]  {len(result.tokens)} tokens in {result.decode_seconds:.2f} s "
        f"({result.decode_tokens_per_second:.2f} tok/s)",
        file=sys.stderr,
    )


class ReplyPrinter:
    """Streams an assistant reply: the final channel to stdout, the analysis channel to stderr if asked."""

    def __init__(self, tokenizer, show_analysis: bool):
        from gptoss_stream.harmony import HarmonyParser

        self.parser = HarmonyParser(tokenizer)
        self.show_analysis = show_analysis
        self.channel: str | None = None

    def __call__(self, token: int) -> None:
        self._show(self.parser.feed(token))

    def finish(self) -> None:
        """Generation ended (stop tokens never reach on_token): flush the message in progress."""
        self._show(self.parser.finish())

    def _show(self, events) -> None:
        for event in events:
            if event.kind == "channel_start":
                self.channel = event.channel
                if self.show_analysis and event.channel not in (None, "final"):
                    print(f"[{event.channel}] ", end="", file=sys.stderr, flush=True)
            elif event.kind == "text":
                if self.channel in (None, "final"):
                    print(event.text, end="", flush=True)
                elif self.show_analysis:
                    print(event.text, end="", file=sys.stderr, flush=True)
            elif event.kind == "message_end" and self.show_analysis and self.channel not in (None, "final"):
                print(file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- generate


def run_generate(args: argparse.Namespace) -> int:
    prompt_text = sys.stdin.read() if args.prompt == "-" else args.prompt
    started = time.perf_counter()
    with open_model(args) as model:
        return generate_reply(args, model, prompt_text, started)


def generate_reply(args: argparse.Namespace, model, prompt_text: str, started: float) -> int:
    from gptoss_stream import harmony
    from gptoss_stream.generate import generate
    from gptoss_stream.tokenizer import StreamDecoder, get_tokenizer

    tokenizer = get_tokenizer()
    if args.raw:
        prompt = tokenizer.encode(prompt_text, allow_special=True)
        if not prompt:
            raise InputError("the prompt is empty: give at least one token")
        stop_tokens = harmony.STOP_TOKENS_RAW
        decoder = StreamDecoder(tokenizer)

        def on_token(token: int) -> None:
            print(decoder.feed(token), end="", flush=True)
    else:
        messages = [harmony.system_message(args.reasoning, current_date=time.strftime("%Y-%m-%d"))]
        if args.developer:
            messages.append(harmony.developer_message(args.developer))
        messages.append(harmony.Message("user", prompt_text))
        prompt = harmony.render_conversation(messages, tokenizer)
        stop_tokens = harmony.STOP_TOKENS_CHAT
        on_token = ReplyPrinter(tokenizer, args.show_analysis)
    print(f"[load] {time.perf_counter() - started:.2f} s, prompt {len(prompt)} tokens", file=sys.stderr)
    result = generate(model, prompt, args.max_tokens, make_sampler(args), stop_tokens,
                      on_token=on_token, context_length=args.context)
    if args.raw:
        print(decoder.flush(), end="", flush=True)
    else:
        on_token.finish()
    print(flush=True)
    print_speed(result)
    print_stats(args, result)
    return 0


def add_generate_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="generate text from a prompt",
        description="Generate a reply to PROMPT (harmony chat format by default, or raw completion with --raw). "
                    "The reply streams to stdout; load time and tokens/s go to stderr.",
    )
    add_model_arguments(p)
    p.add_argument("-p", "--prompt", required=True, help="the prompt text, or - to read it from stdin")
    p.add_argument("--raw", action="store_true",
                   help="no chat template: feed the prompt's tokens as they are and print every generated token")
    p.add_argument("--developer", default=None, metavar="TEXT", help="developer (system prompt) instructions")
    p.add_argument("--show-analysis", action="store_true",
                   help="also print the analysis channel (the model's reasoning) to stderr")
    add_sampling_arguments(p)
    p.set_defaults(func=run_generate)


# ---------------------------------------------------------------------------- chat


def run_chat(args: argparse.Namespace) -> int:
    with open_model(args) as model:
        return chat(args, model)


def chat(args: argparse.Namespace, model) -> int:
    from gptoss_stream import harmony
    from gptoss_stream.generate import generate
    from gptoss_stream.kvcache import ContextFullError
    from gptoss_stream.tokenizer import get_tokenizer

    tokenizer = get_tokenizer()
    sampler = make_sampler(args)
    history = [harmony.system_message(args.reasoning, current_date=time.strftime("%Y-%m-%d"))]
    if args.developer:
        history.append(harmony.developer_message(args.developer))
    print("gptoss chat: type a message, /reset to start over, /exit or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            del history[1 + bool(args.developer):]
            continue
        history.append(harmony.Message("user", line))
        # The whole conversation is re-prefilled each turn: simple and always consistent with the template
        # (harmony drops earlier turns' analysis, so the previous cache is not a prefix of the new prompt).
        prompt = harmony.render_conversation(history, tokenizer)
        printer = ReplyPrinter(tokenizer, args.show_analysis)
        try:
            result = generate(model, prompt, args.max_tokens, sampler, harmony.STOP_TOKENS_CHAT,
                              on_token=printer, context_length=args.context)
        except ContextFullError as e:
            print(f"\n{e}; use /reset", file=sys.stderr)
            history.pop()
            continue
        printer.finish()
        print(flush=True)
        history.extend(m for m in printer.parser.messages() if (m.channel or "final") == "final")
        if args.verbose:
            print_speed(result)
        print_stats(args, result)


def add_chat_parser(subparsers) -> None:
    p = subparsers.add_parser("chat", help="interactive harmony chat",
                              description="Chat with the model in the harmony format; shows the final channel.")
    add_model_arguments(p)
    p.add_argument("--developer", default=None, metavar="TEXT", help="developer (system prompt) instructions")
    p.add_argument("--show-analysis", action="store_true", help="also show the analysis channel (on stderr)")
    p.add_argument("-v", "--verbose", action="store_true", help="print tokens/s after each reply")
    add_sampling_arguments(p)
    p.set_defaults(func=run_chat)


# ---------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    # Each command module registers its own sub-parser and sets `func`; heavy imports stay inside the
    # commands so `gptoss --help` is instant.
    from gptoss_stream import memprof, repack, synthetic

    parser = argparse.ArgumentParser(
        prog="gptoss",
        description="Run OpenAI gpt-oss models on low-RAM CPU machines by streaming only the routed experts.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_generate_parser(subparsers)
    add_chat_parser(subparsers)
    synthetic.add_parser(subparsers)
    repack.add_parser(subparsers)
    memprof.add_parser(subparsers)
    return parser


# Files that are not there, not ours to read or write, or a full disk: the input or the machine, not a bug.
USER_OS_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
USER_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def is_user_error(e: BaseException) -> bool:
    from gptoss_stream.errors import UserError

    return isinstance(e, (UserError, *USER_OS_ERRORS)) or isinstance(e, OSError) and e.errno in USER_ERRNOS


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
        if is_user_error(e):
            print(f"gptoss: error: {e}", file=sys.stderr)
            return 1
        traceback.print_exc()
        print("gptoss: internal error: this is a bug in gptoss, not a problem with the input; please report "
              "it with the traceback above", file=sys.stderr)
        return 70  # EX_SOFTWARE


if __name__ == "__main__":
    sys.exit(main())
