"""The engine thread: one model, one KV cache, requests run one after another in arrival order.

The model uses every core for one sequence, so requests gain nothing from running side by side; they wait in
a FIFO queue instead, bounded so an overloaded server answers 429 at once rather than hours later. The thread
works in token ids only (rendering and parsing happen in the HTTP handlers): it prefills what the prompt cache
does not already hold, samples, and hands each token to the job's `emit` callback. A job's cancel flag (its
client went away, or a stop sequence matched) is checked before every forward pass, so a cancelled request
holds the engine for at most one more token.
"""

from __future__ import annotations

import collections
import math
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gptoss_stream.engine.generate import decode_one_token, prefill
from gptoss_stream.engine.sampling import Sampler, SamplingParams
from gptoss_stream.server.prompt_cache import PromptCache


@dataclass
class Job:
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop_tokens: frozenset[int]
    emit: Callable[[object], None]  # called on the engine thread with each Token, then one Finished or Failed
    seq: int = 0  # arrival number, given by submit()
    submitted: float = 0.0  # time.perf_counter() at submit()
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class Token:
    id: int


@dataclass
class Finished:
    reason: str  # "stop" (a stop token, the last Token), "length" (max_tokens) or "cancelled"
    stop_token: int | None
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    queue_seconds: float
    prefill_seconds: float
    decode_seconds: float


@dataclass
class Failed:
    error: BaseException


class QueueFullError(Exception):
    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"{waiting} requests are already waiting for the model")
        self.retry_after = retry_after


class Worker:
    """Runs Jobs on its own thread. `model` needs new_cache(context), forward(tokens, cache) and config."""

    def __init__(self, model, context_length: int, max_queue: int = 32,
                 log: Callable[[str], None] | None = None):
        self.model = model
        self.context_length = context_length
        self.max_queue = max_queue
        self.prompt_cache = PromptCache(model.new_cache(context_length))
        self.log = log if log is not None else (lambda line: print(line, file=sys.stderr, flush=True))
        self._queue: collections.deque[Job] = collections.deque()
        self._lock = threading.Condition()
        self._seq = 0
        self._closing = False
        self._busy = False
        self._seconds_per_job = 1.0  # running average, for Retry-After
        self._thread = threading.Thread(target=self._run, name="gptoss-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Cancel what waits and what runs, and end the thread."""
        with self._lock:
            self._closing = True
            for job in self._queue:
                job.cancel()
            self._lock.notify_all()
        self._thread.join()

    def submit(self, job: Job) -> int:
        """Queue a job; its number. QueueFullError when max_queue jobs already wait."""
        with self._lock:
            if self._closing:
                raise RuntimeError("the server is shutting down")
            waiting = len(self._queue)
            if waiting >= self.max_queue:
                # The wait until a slot frees: the running job's and the queue's, at the average job time.
                raise QueueFullError(waiting, max(1, math.ceil(self._seconds_per_job * (waiting + 1))))
            self._seq += 1
            job.seq = self._seq
            job.submitted = time.perf_counter()
            self._queue.append(job)
            self._lock.notify()
            return job.seq

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._queue)

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._busy or bool(self._queue)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    self._lock.wait()
                if self._closing:
                    return
                job = self._queue.popleft()
                self._busy = True
            started = time.perf_counter()
            try:
                if not job.cancelled.is_set():
                    self._generate(job)
                else:
                    job.emit(Finished("cancelled", None, len(job.prompt), 0, 0, 0.0, 0.0, 0.0))
            finally:
                with self._lock:
                    self._busy = False
                    self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * (time.perf_counter() - started)

    def _generate(self, job: Job) -> None:
        queued = time.perf_counter()
        self.log(f"[serve] #{job.seq} start: prompt {len(job.prompt)} tokens")
        try:
            finished = self._sample(job)
        except BaseException as e:  # a bug or a kernel error: fail this request, keep serving the next ones
            self.prompt_cache.clear()  # a forward pass that raised may have left half a chunk in the rings
            self.log(f"[serve] #{job.seq} failed: {type(e).__name__}: {e}")
            job.emit(Failed(e))
            return
        finished.queue_seconds = queued - job.submitted
        self.log(f"[serve] #{job.seq} {finished.reason} after {finished.queue_seconds:.2f} s in the queue: "
                 f"{finished.prompt_tokens} prompt tokens "
                 f"({finished.cached_tokens} cached) in {finished.prefill_seconds:.2f} s, "
                 f"{finished.completion_tokens} generated in {finished.decode_seconds:.2f} s")
        job.emit(finished)

    def _sample(self, job: Job) -> Finished:
        cache = self.prompt_cache
        sampler = Sampler(job.sampling)
        start = time.perf_counter()
        cached = cache.reuse(job.prompt)
        rest = job.prompt[cached:]
        logits = prefill(self.model, cache.cache, rest)
        cache.prefilled(rest)
        prefilled = time.perf_counter()
        reason, stop_token, generated = "length", None, 0
        for step in range(job.max_tokens):
            token = sampler.sample(logits)
            generated += 1
            job.emit(Token(token))
            if token in job.stop_tokens:
                reason, stop_token = "stop", token
                break
            if step + 1 == job.max_tokens:
                break
            if job.cancelled.is_set():
                reason = "cancelled"
                break
            logits = decode_one_token(self.model, cache.cache, token)
            cache.appended(token)
        return Finished(reason, stop_token, len(job.prompt), cached, generated, 0.0,
                        prefilled - start, time.perf_counter() - prefilled)
