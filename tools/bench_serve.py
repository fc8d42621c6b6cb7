#!/usr/bin/env python3
"""What the OpenAI-compatible server costs over `gptoss generate`, and what its prompt cache saves.

  python tools/bench_serve.py -m /work/ckpt/20b [--prompt-tokens 128] [--decode-tokens 32]
                              [--document-tokens 512] [--context 4096] [--json OUT]

1. API overhead. The same raw prompt of --prompt-tokens tokens, greedy, --decode-tokens new tokens:
   - `gptoss generate --raw`: time to first token = its [prefill] time, decode tok/s from its [decode] line;
   - `gptoss serve` (a fresh process, first request, like generate's), streaming POST /v1/completions with
     the official `openai` client: time to first token = request sent -> first chunk received (HTTP, JSON,
     tokenization and the queue included); decode tok/s = (completion tokens - 1) / (first chunk -> the chunk
     that carries finish_reason).
2. Prompt cache. A chat whose system message is a document of --document-tokens tokens: turn 1 (16 tokens),
   then turn 2 (the conversation resent with the reply and a new question, max_tokens 1, so its latency is
   its time to first token) with the previous request's KV cache; then a one-token raw request that shares
   no prefix (it replaces the cache), and turn 2 again, now prefilled from scratch.

Each step runs once: numbers from a shared or busy machine are noisy, so say how loaded it was.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from gptoss_stream.chat.tokenizer import get_tokenizer  # noqa: E402

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches near "
         "old stone bridges under grey autumn skies ").split()


def text_of_tokens(n: int, seed: int = 0) -> str:
    """Plain English-like text that encodes to exactly n tokens."""
    tok = get_tokenizer()
    words = [WORDS[(i * 7 + seed) % len(WORDS)] for i in range(2 * n)]
    ids = tok.encode(" ".join(words))[:n]
    text = tok.decode(ids)
    assert len(tok.encode(text)) == n, "the prompt text does not re-encode to the same length"
    return text


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "gptoss_stream.commands.cli", *args]


def env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT))


def run_generate(args, prompt: str) -> dict:
    proc = subprocess.run(
        cli("generate", "-m", args.model, "--raw", "-p", prompt, "-n", str(args.decode_tokens), "-t", "0",
            "--context", str(args.context)),
        capture_output=True, text=True, env=env(), cwd=ROOT, check=True)
    prefill = re.search(r"\[prefill\] (\d+) tokens in ([\d.]+) s", proc.stderr)
    decode = re.search(r"\[decode\]\s+(\d+) tokens in ([\d.]+) s \(([\d.]+) tok/s\)", proc.stderr)
    return {"prompt_tokens": int(prefill.group(1)), "ttft_s": float(prefill.group(2)),
            "completion_tokens": int(decode.group(1)), "decode_tok_s": float(decode.group(3))}


def api_completion(client, model: str, prompt: str, max_tokens: int) -> dict:
    sent = time.perf_counter()
    first = finish = None
    usage = None
    for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True}):
        now = time.perf_counter()
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if first is None and choice.text:
                first = now
            if choice.finish_reason is not None:
                finish = now
    steps = usage.completion_tokens - 1
    return {"prompt_tokens": usage.prompt_tokens, "ttft_s": first - sent, "completion_tokens":
            usage.completion_tokens, "decode_tok_s": steps / (finish - first) if steps > 0 else 0.0}


def timed_chat(client, model: str, messages: list[dict], max_tokens: int) -> tuple[float, object]:
    sent = time.perf_counter()
    response = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                              temperature=0)
    return time.perf_counter() - sent, response


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", required=True)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--document-tokens", type=int, default=512)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    import openai
    from server_support import ServeProcess

    # A SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the server subprocess is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    prompt = text_of_tokens(args.prompt_tokens)
    load = os.getloadavg()[0]
    print(f"[bench] load average {load:.1f} on {os.cpu_count()} CPUs", file=sys.stderr)
    print("[bench] gptoss generate ...", file=sys.stderr)
    generate = run_generate(args, prompt)
    print(f"[bench] generate: {generate}", file=sys.stderr, flush=True)

    print("[bench] gptoss serve ...", file=sys.stderr)
    server = ServeProcess("-m", args.model, "--context", str(args.context), "--model-name", "bench")
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=3600)
        api = api_completion(client, "bench", prompt, args.decode_tokens)
        print(f"[bench] API: {api}", file=sys.stderr, flush=True)
        document = text_of_tokens(args.document_tokens, seed=3)
        messages = [{"role": "system", "content": "Answer questions about this document.\n\n" + document},
                    {"role": "user", "content": "What animal jumps?"}]
        turn1_s, turn1 = timed_chat(client, "bench", messages, 16)
        print(f"[bench] turn 1: {turn1_s:.2f} s, {turn1.usage.prompt_tokens} prompt tokens", file=sys.stderr,
              flush=True)
        messages += [{"role": "assistant", "content": turn1.choices[0].message.content or "I do not know."},
                     {"role": "user", "content": "And which animal is lazy?"}]
        cached_s, cached = timed_chat(client, "bench", messages, 1)
        print(f"[bench] turn 2 with the cache: {cached_s:.2f} s", file=sys.stderr, flush=True)
        client.completions.create(model="bench", prompt="Unrelated.", max_tokens=1)  # replaces the KV cache
        fresh_s, fresh = timed_chat(client, "bench", messages, 1)
    finally:
        server.stop()
    results = {
        "model": args.model, "load_average": load, "generate": generate, "api": api,
        "api_overhead": {"ttft": api["ttft_s"] / generate["ttft_s"] - 1,
                         "decode": 1 - api["decode_tok_s"] / generate["decode_tok_s"]},
        "second_turn": {
            "turn1_prompt_tokens": turn1.usage.prompt_tokens, "turn1_s": turn1_s,
            "prompt_tokens": cached.usage.prompt_tokens,
            "cached": {"ttft_s": cached_s, "cached_tokens": cached.usage.prompt_tokens_details.cached_tokens},
            "uncached": {"ttft_s": fresh_s, "cached_tokens": fresh.usage.prompt_tokens_details.cached_tokens},
        },
    }
    g, a, t = generate, api, results["second_turn"]
    print(f"\n{'':28}{'gptoss generate':>18}{'API (serve)':>14}{'API overhead':>14}")
    print(f"{'time to first token (s)':28}{g['ttft_s']:>18.2f}{a['ttft_s']:>14.2f}"
          f"{results['api_overhead']['ttft']:>+14.1%}")
    print(f"{'decode tok/s':28}{g['decode_tok_s']:>18.2f}{a['decode_tok_s']:>14.2f}"
          f"{results['api_overhead']['decode']:>+14.1%}")
    print(f"(prompt {g['prompt_tokens']} / {a['prompt_tokens']} tokens, {g['completion_tokens']} / "
          f"{a['completion_tokens']} generated)")
    print(f"\nsecond turn, {t['prompt_tokens']} prompt tokens (turn 1: {t['turn1_prompt_tokens']} in "
          f"{t['turn1_s']:.1f} s):")
    print(f"  with the prompt cache    {t['cached']['ttft_s']:7.2f} s to first token "
          f"({t['cached']['cached_tokens']} tokens cached)")
    print(f"  without (cache replaced) {t['uncached']['ttft_s']:7.2f} s to first token "
          f"({t['uncached']['cached_tokens']} tokens cached)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
