"""The prompt cache on the real (tiny) model: after a cache hit the logits are exactly those of a fresh run,
including when the sliding layers' rings were overwritten by generated tokens past the reused prefix.

The fresh run is a new cache fed the same forward calls for the positions kept (`replay`): kernels may round
differently for a chunk of 8 rows than for 1, so only the same calls make bit-for-bit equality a property of
the cache alone, on every compute path."""

from __future__ import annotations

import numpy as np
import pytest

from gptoss_stream.engine.kvcache import KVCache
from gptoss_stream.engine.model import Model
from gptoss_stream.server.prompt_cache import PromptCache, common_prefix
from gptoss_stream.weights.checkpoint import Checkpoint
from gptoss_stream.weights.config import ModelConfig

CHUNK = 8  # tiny's window is 128: sliding rings of 128 + 8 - 1 rows, rewindable by only 7 positions


@pytest.fixture(scope="module")
def model(tiny_original):
    with Model(Checkpoint.open(tiny_original), max_chunk=CHUNK) as m:
        yield m


def random_tokens(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 199998, n).tolist()


def replay(model: Model, *calls: list[int]) -> np.ndarray:
    """A fresh cache fed these forward calls in order; the logits of the last."""
    cache = model.new_cache(1024)
    for tokens in calls:
        logits = model.forward(tokens, cache)
    return logits


def run_turn(model: Model, cache: PromptCache, prompt: list[int], generated: list[int]) -> tuple[int, np.ndarray]:
    """What the worker does: reuse, prefill the rest, then feed `generated` one token at a time."""
    reused = cache.reuse(prompt)
    logits = model.forward(prompt[reused:], cache.cache)
    cache.prefilled(prompt[reused:])
    for token in generated:
        model.forward([token], cache.cache)
        cache.appended(token)
    return reused, logits


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([5], [6]) == 0


def test_truncate_refuses_what_the_rings_lost():
    config = ModelConfig.preset("tiny")
    cache = KVCache(config, 1024, CHUNK)
    assert cache.rewind_limit() == CHUNK - 1
    cache.advance(300)
    cache.truncate(300 - (CHUNK - 1))
    with pytest.raises(ValueError, match="sliding rings"):
        cache.truncate(200)
    short = KVCache(config, 100, CHUNK)  # its rings never wrap: any prefix can be kept
    short.advance(90)
    short.truncate(3)
    assert short.length == 3


def test_second_turn_hit_after_a_long_reply_is_exact(model):
    """Turn 1's reply (40 tokens) overwrote the ring rows turn 2 needs; the copy taken after the prompt
    brings them back."""
    cache = PromptCache(model.new_cache(1024))
    prompt = random_tokens(150, 1)
    reused, _ = run_turn(model, cache, prompt, random_tokens(40, 2))
    assert reused == 0
    second = prompt + random_tokens(30, 3)  # the reply was not kept (as when harmony drops analysis)
    generated = random_tokens(5, 4)
    reused, logits = run_turn(model, cache, second, generated)
    assert reused == 150
    assert np.array_equal(logits, replay(model, prompt, second[150:]))
    # and the turn after that, whose prefix extends over three of the last reply's generated tokens
    third = cache.tokens[:-2] + random_tokens(12, 5)
    reused, logits = run_turn(model, cache, third, [])
    assert reused == len(second) + 3
    assert np.array_equal(logits, replay(model, prompt, second[150:], *([t] for t in generated[:3]), third[-12:]))


def test_hit_within_the_live_ring_is_exact(model):
    cache = PromptCache(model.new_cache(1024))
    prompt = random_tokens(140, 6)
    generated = random_tokens(3, 7)
    run_turn(model, cache, prompt, generated)
    edited = cache.tokens[:141] + random_tokens(9, 8)  # diverges 2 positions back: the live rings still hold it
    reused, logits = run_turn(model, cache, edited, [])
    assert reused == 141
    assert np.array_equal(logits, replay(model, prompt, generated[:1], edited[141:]))


def test_a_prefix_neither_copy_holds_falls_back_to_a_full_prefill(model):
    cache = PromptCache(model.new_cache(1024))
    prompt = random_tokens(150, 9)
    run_turn(model, cache, prompt, random_tokens(20, 10))
    edited = prompt[:100] + random_tokens(20, 11)  # 50 positions before the copy: its ring rows are gone
    reused, logits = run_turn(model, cache, edited, [])
    assert reused == 0
    assert np.array_equal(logits, replay(model, edited))


def test_naive_rewind_is_wrong(model):
    """The negative control: cutting the length back without the ring copy gives different logits, so the
    exactness tests above can fail."""
    cache = model.new_cache(1024)
    prompt = random_tokens(150, 12)
    model.forward(prompt, cache)
    for token in random_tokens(40, 13):
        model.forward([token], cache)
    cache.length = 150  # what truncate() refuses to do
    second = prompt + random_tokens(30, 14)
    assert not np.array_equal(model.forward(second[150:], cache), replay(model, prompt, second[150:]))
