"""Helpers that the tests of the attention block share (tests/test_blocks.py, tests/test_q8.py)."""

from __future__ import annotations

import numpy as np

import numpy_reference as nr
from gptoss_stream.engine import kernels
from gptoss_stream.weights.config import ModelConfig, layer_capacity


def close_in_bf16(got: np.ndarray, ref: np.ndarray) -> bool:
    """Within a few bf16 roundings of the reference (the two sum in different orders before rounding)."""
    got, ref = (nr.bf16_to_f32(a) if a.dtype == np.uint16 else a for a in (got, ref))
    return float(np.abs(got - ref).max()) <= 2.0 ** -6 * float(np.abs(ref).max())


def rope_tables(cfg: ModelConfig):
    return kernels.rope_init(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_factor, cfg.rope_ntk_alpha,
                             cfg.rope_ntk_beta, cfg.initial_context_length)


def block_scratch(cfg: ModelConfig, m: int) -> np.ndarray:
    """Exactly the scratch the attention block needs for m tokens."""
    return np.zeros(kernels.attention_block_scratch_elems(m, cfg.hidden_size, cfg.num_attention_heads,
                                                          cfg.num_key_value_heads, cfg.head_dim), np.uint16)


def attention_block_from_start(cfg: ModelConfig, layer: int, x: np.ndarray,
                               weights: kernels.AttentionWeights) -> np.ndarray:
    """x [m, hidden] through the layer's attention block in place, as the first m tokens of an empty cache (what
    numpy_reference.attention_block computes for positions 0..m-1)."""
    m = x.shape[0]
    k_cache = np.zeros((layer_capacity(cfg, layer, 64, 64), cfg.num_key_value_heads, cfg.head_dim), np.uint16)
    v_cache = np.zeros_like(k_cache)
    inv_freq, concentration = rope_tables(cfg)
    window = cfg.sliding_window if cfg.is_sliding(layer) else 0
    return kernels.attention_block(x, weights, cfg.rms_norm_eps, inv_freq, concentration, 1 / np.sqrt(cfg.head_dim),
                                   k_cache, v_cache, 0, window, block_scratch(cfg, m))
