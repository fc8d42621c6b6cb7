"""`gptoss generate` (one reply to a prompt) and `gptoss chat` (interactive harmony chat): the model's text
streams to stdout, load time and tokens/s to stderr."""

from __future__ import annotations

import argparse
import sys
import time

from gptoss_stream.errors import InputError
from gptoss_stream.commands.options import add_model_arguments, add_sampling_arguments, make_sampler, open_model, \
    print_stats


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
        from gptoss_stream.chat.harmony import HarmonyParser

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
    from gptoss_stream.chat import harmony
    from gptoss_stream.chat.tokenizer import StreamDecoder, get_tokenizer
    from gptoss_stream.engine.generate import generate

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
    from gptoss_stream.chat import harmony
    from gptoss_stream.chat.tokenizer import get_tokenizer
    from gptoss_stream.engine.generate import generate
    from gptoss_stream.engine.kvcache import ContextFullError

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

