"""Helpers for the server tests: a scripted model injected into a real Worker, the app served in-process, and
`gptoss serve` started as a subprocess.

A synthetic checkpoint writes random tokens, so it can never be made to reason or to call a tool. The
in-process tests therefore swap only the model: ScriptedModel has the Model interface the Worker uses
(config, max_chunk, new_cache, forward) and its logits put all the probability on the next token of a script,
so the real sampler, worker, prompt cache, harmony rendering and parsing, routes and the official `openai`
client all run unchanged on a known token stream. Nothing of this is reachable from `gptoss serve` itself.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIKTOKEN_DIR = ROOT.parent / "shared" / "tiktoken"
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_DIR))

import numpy as np  # noqa: E402

from gptoss_stream.engine.kvcache import KVCache  # noqa: E402
from gptoss_stream.weights.config import ModelConfig  # noqa: E402


class ScriptedModel:
    """forward() returns logits whose only likely token is the next one of `script` (then `filler` forever).

    It records every forward call (the tokens fed) and keeps `fed`, the whole sequence its cache holds, so a
    test can read the full prompt a request was rendered to. `delay` seconds per call imitate a slow model;
    `fail_on_call` makes one call raise."""

    def __init__(self, max_chunk: int = 64, delay: float = 0.0):
        self.config = ModelConfig.preset("tiny")
        self.max_chunk = max_chunk
        self.delay = delay
        self.calls: list[tuple[float, int]] = []  # (time, tokens fed) per forward call
        self.fed: list[int] = []
        self.prompts: list[list[int]] = []  # the whole prompt at the first call after each script()
        self.fail_on_call: int | None = None
        self._script: list[int] = []
        self._next = 0
        self.filler = 13  # a plain text token ("." in o200k)
        self._lock = threading.Lock()

    def script(self, tokens: list[int]) -> None:
        with self._lock:
            self._script, self._next = list(tokens), 0

    def new_cache(self, context_length: int) -> KVCache:
        return KVCache(self.config, context_length, self.max_chunk)

    def forward(self, tokens, cache: KVCache) -> np.ndarray:
        tokens = [int(t) for t in tokens]
        cache.check_room(len(tokens))
        if self.delay:
            time.sleep(self.delay)
        with self._lock:
            self.calls.append((time.perf_counter(), len(tokens)))
            if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
                raise RuntimeError("scripted failure")
            self.fed = self.fed[:cache.length] + tokens
            if self._next == 0:  # the first call after script(): a request's prefill
                self.prompts.append(list(self.fed))
            next_token = self._script[self._next] if self._next < len(self._script) else self.filler
            self._next += 1
        cache.advance(len(tokens))
        logits = np.full(self.config.vocab_size, -1e4, dtype=np.float32)
        logits[next_token] = 0.0
        return logits


class InProcessServer:
    """create_app over a Worker running `model`, served by uvicorn on a free loopback port in a thread."""

    def __init__(self, model, context_length: int = 2048, max_queue: int = 32, api_key: str | None = None,
                 model_name: str = "scripted"):
        import uvicorn

        from gptoss_stream.chat.tokenizer import get_tokenizer
        from gptoss_stream.server.app import Settings, create_app
        from gptoss_stream.server.worker import Worker

        self.log: list[str] = []
        self.worker = Worker(model, context_length, max_queue=max_queue, log=self.log.append)
        self.app = create_app(self.worker, get_tokenizer(), Settings(model_name, api_key))
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> InProcessServer:
        self.worker.start()
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.worker.stop()


LISTENING = re.compile(r"listening on (http://[\d.]+:(\d+)/v1)")


class ServeProcess:
    """`gptoss serve` in a subprocess on a free port; its stderr lines collected in `log`."""

    def __init__(self, *args: str):
        env = dict(os.environ, PYTHONPATH=str(ROOT), TIKTOKEN_CACHE_DIR=str(TIKTOKEN_DIR))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gptoss_stream.commands.cli", "serve", "--port", "0", *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
        )
        self.log: list[str] = []
        self._ready = threading.Event()
        self.base_url = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(120) or self.base_url is None:
            self.stop()
            raise RuntimeError("gptoss serve did not start:\n" + "".join(self.log))

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)
            match = LISTENING.search(line)
            if match:
                self.base_url = match.group(1)
                self._ready.set()
        self._ready.set()

    def rss_anon_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
        raise RuntimeError("no RssAnon in /proc/PID/status")

    def open_fds_and_threads(self) -> tuple[int, int]:
        """The server process's open file descriptors and threads (/proc): a leak of either grows them."""
        fds = len(os.listdir(f"/proc/{self.proc.pid}/fd"))
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return fds, int(line.split()[1])
        raise RuntimeError("no Threads in /proc/PID/status")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=10)
        if not self._reader.is_alive():
            # Closed here, not by the garbage collector: an unclosed pipe found by a later test's gc.collect()
            # is a ResourceWarning there (test_streaming counts fds after collecting).
            self.proc.stderr.close()
        return self.proc.returncode
