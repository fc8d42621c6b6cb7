"""The prompt cache: the KV cache of the previous request, reused for the longest common token prefix.

Chat clients resend the whole conversation each turn, so the next prompt usually starts with the previous
one. Full-attention layers keep every position, so cutting their cache back to a prefix is free. A sliding
layer keeps only a ring of its last window + max_chunk - 1 positions: after generating up to position P, the
rows of the window before an earlier position L were overwritten by positions in [L, P) as soon as P - L is
more than a few dozen tokens (KVCache.rewind_limit). A reply is usually longer than that, and the next prompt
diverges from the cache right at the start of that reply (harmony drops the previous turn's analysis).

So the rings are also copied when a prompt has been prefilled (a few MB on 20b). A later request can then
resume from any prefix L that either the live rings or that copy still serve exactly; when neither does, it
falls back to the longest prefix that one of them serves, or to an empty cache. Whatever is reused, the keys
and values are exactly those a fresh prefill of the same tokens would hold (tests/test_server_cache.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gptoss_stream.engine.kvcache import KVCache


@dataclass
class RingSnapshot:
    length: int  # cache length when the copy was taken
    keys: dict[int, np.ndarray]  # sliding layer -> a copy of its key ring
    values: dict[int, np.ndarray]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    return int(np.argmax(np.asarray(a[:n]) != np.asarray(b[:n])))


class PromptCache:
    """A KVCache and the tokens whose keys and values it holds (len(tokens) == cache.length)."""

    def __init__(self, cache: KVCache):
        self.cache = cache
        self.tokens: list[int] = []
        self._snapshot: RingSnapshot | None = None
        self._wrapping = [layer for layer, k in enumerate(cache.keys)
                          if cache.config.is_sliding(layer) and k.shape[0] < cache.context_length]

    def reuse(self, prompt: list[int]) -> int:
        """Cut the cache back to the longest prefix of `prompt` it holds exactly; return that prefix's length.

        At least the last prompt token is always left to prefill: its logits give the first new token."""
        wanted = common_prefix(self.tokens, prompt[:-1])
        floor = self.cache.rewind_limit()
        live = wanted if wanted >= self.cache.length - floor else 0
        saved = 0
        if self._snapshot is not None:
            saved = min(wanted, self._snapshot.length)
            saved = saved if saved >= self._snapshot.length - floor else 0
        if saved > live:
            self._restore()
        reused = max(live, saved)
        if reused:
            self.cache.truncate(reused)
        else:
            self.cache.reset()
        del self.tokens[reused:]
        if self._snapshot is not None and self._snapshot.length > reused:
            self._snapshot = None  # the positions it was taken after are about to be rewritten
        return reused

    def prefilled(self, tokens: list[int]) -> None:
        """The rest of the prompt went into the cache: remember it, and copy the rings at this point."""
        self.tokens += tokens
        self._snapshot = RingSnapshot(
            self.cache.length,
            {layer: self.cache.keys[layer].copy() for layer in self._wrapping},
            {layer: self.cache.values[layer].copy() for layer in self._wrapping},
        ) if self._wrapping else None

    def appended(self, token: int) -> None:
        """A generated token went into the cache."""
        self.tokens.append(token)

    def clear(self) -> None:
        """Forget everything (after a failure mid-forward, the rings may hold a half-written chunk)."""
        self.cache.reset()
        self.tokens = []
        self._snapshot = None

    def _restore(self) -> None:
        snapshot = self._snapshot
        for layer in self._wrapping:
            self.cache.keys[layer][...] = snapshot.keys[layer]
            self.cache.values[layer][...] = snapshot.values[layer]
        # Full-attention layers still hold every position before snapshot.length: the cache never went back
        # below it since the copy was taken (reuse() drops the copy when it does).
        self.cache.length = snapshot.length
        del self.tokens[snapshot.length:]
