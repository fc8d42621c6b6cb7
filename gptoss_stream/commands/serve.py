"""`gptoss serve`: the model behind an OpenAI-compatible HTTP API (gptoss_stream/server/), loaded once."""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

from gptoss_stream.commands.options import add_model_arguments, open_model
from gptoss_stream.errors import InputError, SetupError

SHUTDOWN_GRACE_SECONDS = 5


def default_model_name(model_dir: str) -> str:
    """The checkpoint folder's name (its parent's for an `original/` folder), as clients will ask for it."""
    path = Path(model_dir).resolve()
    return path.parent.name if path.name in ("original", "hf") else path.name


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads so a taken port fails at once."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(128)
        return sock
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e


def run_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from gptoss_stream.server.app import Settings, create_app
    except ImportError as e:
        raise SetupError(f"gptoss serve needs the server extra: pip install 'gptoss-stream[server]' "
                         f"(missing {e.name})") from e
    from gptoss_stream.chat.tokenizer import get_tokenizer
    from gptoss_stream.server.harmony_bridge import load_encoding
    from gptoss_stream.server.worker import Worker

    if args.max_queue < 1:
        raise InputError(f"--max-queue must be >= 1, got {args.max_queue}")
    api_key = args.api_key if args.api_key is not None else os.environ.get("GPTOSS_API_KEY") or None
    name = args.model_name or default_model_name(args.model)
    sock = listen(args.host, args.port)
    started = time.perf_counter()
    tokenizer = get_tokenizer()
    load_encoding()  # openai-harmony's vocabulary: fail now, not at the first request
    with sock, open_model(args) as model:
        worker = Worker(model, args.context, max_queue=args.max_queue)
        worker.start()
        try:
            app = create_app(worker, tokenizer, Settings(name, api_key))
            host, port = sock.getsockname()[:2]
            print(f"[serve] model {name!r} loaded in {time.perf_counter() - started:.1f} s; listening on "
                  f"http://{host}:{port}/v1 (context {args.context}, queue limit {args.max_queue}"
                  f"{', API key required' if api_key else ''})", file=sys.stderr, flush=True)
            # On Ctrl-C or SIGTERM, requests still generating get a few seconds, then are cancelled (their
            # jobs stop at the next token), so shutting down never waits for a long reply.
            server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                                   timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS))
            server.run(sockets=[sock])
        finally:
            worker.stop()
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve the model over an OpenAI-compatible HTTP API",
        description="Load the model once and answer OpenAI API requests: POST /v1/chat/completions (streaming "
                    "or not; reasoning in reasoning_content, function tools), POST /v1/completions (raw "
                    "prompts), POST /v1/responses (not streaming), GET /v1/models, GET /health. Requests run one at a time in arrival order; "
                    "the KV cache of the previous request is reused for the prompt prefix they share. "
                    "Needs the server extra: pip install '.[server]'.",
    )
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every "
                        "interface, then set --api-key)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    p.add_argument("--model-name", default=None, metavar="NAME",
                   help="the model id clients use (default: the checkpoint folder's name)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1 requests (default: $GPTOSS_API_KEY, "
                        "else no key)")
    p.add_argument("--max-queue", type=int, default=32, metavar="N",
                   help="requests that may wait for the model; past that they get 429 with Retry-After "
                        "(default 32)")
    p.set_defaults(func=run_serve)
