"""Per-layer key/value cache: full-attention layers grow to the context length, sliding layers are rings."""

from __future__ import annotations

import numpy as np

from gptoss_stream.weights.config import ModelConfig, layer_capacity
from gptoss_stream.errors import UserError


class ContextFullError(UserError, ValueError):
    """The sequence would grow past the context length the cache was made for."""


class KVCache:
    """Keys and values of every layer, bf16 bits in [capacity, n_kv_heads, head_dim] arrays.

    The key of position j lives in row j % capacity. A full-attention layer needs every position, so its
    capacity is the context length. A sliding layer needs only the last `sliding_window` positions, plus room
    for a prefill chunk of `max_chunk` tokens whose first query still sees keys the chunk's last token
    would otherwise overwrite: window + max_chunk - 1 rows.

    Arrays come from np.zeros (calloc): the kernel maps pages lazily, so a 131072-token cache costs memory
    only for the positions actually written.
    """

    def __init__(self, config: ModelConfig, context_length: int, max_chunk: int):
        if not 0 < context_length <= config.max_context:
            raise ValueError(f"context length {context_length} must be in 1..{config.max_context}")
        if max_chunk <= 0:
            raise ValueError(f"max_chunk must be positive, got {max_chunk}")
        self.config = config
        self.context_length = context_length
        self.max_chunk = max_chunk
        self.length = 0
        shape = (config.num_key_value_heads, config.head_dim)
        self.keys: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        for layer in range(config.num_hidden_layers):
            capacity = layer_capacity(config, layer, context_length, max_chunk)
            self.keys.append(np.zeros((capacity, *shape), dtype=np.uint16))
            self.values.append(np.zeros((capacity, *shape), dtype=np.uint16))

    def window(self, layer: int) -> int:
        """The attention window of a layer for the attention kernel (0 = full causal)."""
        return self.config.sliding_window if self.config.is_sliding(layer) else 0

    def check_room(self, n_tokens: int) -> None:
        if self.length + n_tokens > self.context_length:
            raise ContextFullError(
                f"context is full: {self.length} tokens + {n_tokens} new > context length {self.context_length} "
                f"(raise it with --context, up to {self.config.max_context})"
            )

    def advance(self, n_tokens: int) -> None:
        self.length += n_tokens

    def reset(self) -> None:
        self.length = 0

    def rewind_limit(self) -> int:
        """How many of the last positions truncate() may drop.

        A sliding layer's ring holds only the last `capacity` positions. Cut back from length P to L, the next
        token at L needs the window before it, positions (L - window, L), still in the ring: true while
        P - L <= capacity - window (the rows of older positions were overwritten by positions in [L, P)).
        A ring that never wraps (capacity = context length) and full-attention layers lose nothing.
        """
        limits = [k.shape[0] - self.config.sliding_window for layer, k in enumerate(self.keys)
                  if self.config.is_sliding(layer) and k.shape[0] < self.context_length]
        return min(limits, default=self.context_length)

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on, keeping the keys and values before it (a prompt cache
        reuses a common prefix this way). Raises ValueError if a sliding ring lost what `length` needs."""
        if not max(0, self.length - self.rewind_limit()) <= length <= self.length:
            raise ValueError(
                f"cannot truncate the cache from {self.length} to {length} positions: allowed down to "
                f"{max(0, self.length - self.rewind_limit())} (the sliding rings keep only the last positions)"
            )
        self.length = length

    @property
    def nbytes(self) -> int:
        """Bytes reserved (address space); resident memory grows only with the positions written."""
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values))

    def bytes_in_use(self) -> int:
        """Bytes holding live positions."""
        row = 2 * self.config.num_key_value_heads * self.config.head_dim * 2
        return sum(min(self.length, k.shape[0]) * row for k in self.keys)
