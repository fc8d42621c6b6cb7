"""Token generation: prefill the prompt in one pass, then decode one token at a time."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from gptoss_stream.engine.kvcache import KVCache
from gptoss_stream.engine.model import Model
from gptoss_stream.engine.sampling import Sampler
from gptoss_stream.streaming.runstats import Probe


def prefill(model: Model, cache: KVCache, tokens: list[int]) -> np.ndarray:
    """Run the whole prompt (in chunks of model.max_chunk tokens); fp32 logits of its last token."""
    return model.forward(tokens, cache)


def decode_one_token(model: Model, cache: KVCache, token: int) -> np.ndarray:
    return model.forward([token], cache)


@dataclass
class GenerationResult:
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    stop_token: int | None = None  # the stop token that ended generation (not part of `tokens`), if any
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    # Per phase: the expert store's counters and the process's disk reads (runstats.Probe), for --stats.
    prefill_stats: dict = field(default_factory=dict)
    decode_stats: dict = field(default_factory=dict)

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_steps(self) -> int:
        # The first generated token comes from the prefill logits; decode steps are the ones after it.
        return max(len(self.tokens) + (self.stop_token is not None) - 1, 0)

    @property
    def decode_tokens_per_second(self) -> float:
        steps = self.decode_steps
        return steps / self.decode_seconds if self.decode_seconds > 0 and steps > 0 else 0.0


def generate(
    model: Model,
    prompt: list[int],
    max_new_tokens: int,
    sampler: Sampler,
    stop_tokens: Iterable[int] = (),
    cache: KVCache | None = None,
    on_token: Callable[[int], None] | None = None,
    context_length: int = 4096,
) -> GenerationResult:
    """Sample up to max_new_tokens after prompt; stops early at a stop token. on_token sees each new token."""
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    cache = cache if cache is not None else model.new_cache(context_length)
    # Fail before any work if prompt + generation cannot fit.
    cache.check_room(len(prompt) + max(max_new_tokens - 1, 0))
    stop = set(stop_tokens)
    result = GenerationResult(prompt_tokens=len(prompt))

    probe = Probe(model.experts)
    start = time.perf_counter()
    logits = prefill(model, cache, prompt)
    result.prefill_seconds = time.perf_counter() - start
    result.prefill_stats = probe.lap()

    start = time.perf_counter()
    for step in range(max_new_tokens):
        token = sampler.sample(logits)
        if token in stop:
            result.stop_token = token
            break
        result.tokens.append(token)
        if on_token is not None:
            on_token(token)
        if step + 1 < max_new_tokens:
            logits = decode_one_token(model, cache, token)
    result.decode_seconds = time.perf_counter() - start
    result.decode_stats = probe.lap()
    return result
