"""blocks.c: the attention block, the router and one expert's MLP as single calls.

Each must equal, bit for bit, the sequence of single kernels it replaces (the model called them one by one
before), on every compute path and both checkpoint layouts; and agree with the numpy reference within bf16
rounding. Bad arguments are refused before anything is written.
"""

from __future__ import annotations

import numpy as np
import pytest

import numpy_reference as nr
from block_support import attention_block_from_start, block_scratch, close_in_bf16, rope_tables
from gptoss_stream.engine import _lib, kernels
from gptoss_stream.engine.model import SWIGLU_ALPHA
from gptoss_stream.weights.checkpoint import Checkpoint
from gptoss_stream.weights.config import layer_capacity

RNG = np.random.default_rng(11)
TILE = np.zeros(1 << 20, dtype=np.uint16)


def random_bf16(*shape: int, scale: float = 1.0) -> np.ndarray:
    return nr.f32_to_bf16((RNG.standard_normal(shape) * scale).astype(np.float32))


@pytest.fixture(scope="module", params=["original", "hf"])
def checkpoint(request, tiny_checkpoint):
    # original: q, k, v as one tensor (one matmul); hf: three tensors (three matmuls into column slices)
    with Checkpoint.open(tiny_checkpoint / request.param) as ckpt:
        yield ckpt


def attention_weights(ckpt: Checkpoint, layer: int) -> kernels.AttentionWeights:
    cfg, w = ckpt.config, ckpt.layer(layer)
    return kernels.AttentionWeights(
        cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, norm=w.attn_norm,
        sinks=w.sinks, out_weight=w.out_weight, out_bias=w.out_bias, qkv_weight=w.qkv_weight, qkv_bias=w.qkv_bias,
        q_weight=w.q_weight, q_bias=w.q_bias, k_weight=w.k_weight, k_bias=w.k_bias, v_weight=w.v_weight,
        v_bias=w.v_bias)


def attention_by_kernels(ckpt, layer, x, k_cache, v_cache, first_position, window, inv_freq, concentration):
    """The attention block as Model.attention_block computed it before blocks.c: one kernel call at a time."""
    cfg, w = ckpt.config, ckpt.layer(layer)
    m, nq, nkv, hd = x.shape[0], cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    t = kernels.rmsnorm(x, w.attn_norm, cfg.rms_norm_eps)
    qkv = np.empty((m, (nq + 2 * nkv) * hd), dtype=np.uint16)
    q, k, v = qkv[:, :nq * hd], qkv[:, nq * hd:(nq + nkv) * hd], qkv[:, (nq + nkv) * hd:]
    if w.qkv_weight is not None:
        kernels.matmul(t, w.qkv_weight, w.qkv_bias, out=qkv)
    else:
        kernels.matmul(t, w.q_weight, w.q_bias, out=q)
        kernels.matmul(t, w.k_weight, w.k_bias, out=k)
        kernels.matmul(t, w.v_weight, w.v_bias, out=v)
    positions = np.arange(first_position, first_position + m, dtype=np.int64)
    kernels.rope_apply_(q, nq, hd, positions, inv_freq, concentration)
    kernels.rope_apply_(k, nkv, hd, positions, inv_freq, concentration)
    kernels.kv_store(k, v, k_cache, v_cache, first_position)
    attn = kernels.attention(q, nq, k_cache, v_cache, first_position, window, w.sinks, 1 / np.sqrt(hd))
    kernels.add_(x, kernels.matmul(attn, w.out_weight, w.out_bias))


@pytest.mark.parametrize("layer", [0, 1])  # sliding, full
@pytest.mark.parametrize("m,first_position", [(1, 0), (1, 200), (7, 150), (33, 0)])
def test_attention_block_is_the_kernel_sequence(checkpoint, compute_path, layer, m, first_position):
    cfg = checkpoint.config
    window = cfg.sliding_window if cfg.is_sliding(layer) else 0
    capacity = layer_capacity(cfg, layer, 512, 64)
    inv_freq, concentration = rope_tables(cfg)
    # earlier positions' keys and values are already in the cache (random), so the window and ring matter
    k_cache = random_bf16(capacity, cfg.num_key_value_heads, cfg.head_dim)
    v_cache = random_bf16(capacity, cfg.num_key_value_heads, cfg.head_dim)
    x = random_bf16(m, cfg.hidden_size)
    want_x, want_k, want_v = x.copy(), k_cache.copy(), v_cache.copy()
    attention_by_kernels(checkpoint, layer, want_x, want_k, want_v, first_position, window, inv_freq, concentration)
    scratch = block_scratch(cfg, m)
    kernels.attention_block(x, attention_weights(checkpoint, layer), cfg.rms_norm_eps, inv_freq, concentration,
                            1 / np.sqrt(cfg.head_dim), k_cache, v_cache, first_position, window, scratch)
    np.testing.assert_array_equal(x, want_x)
    np.testing.assert_array_equal(k_cache, want_k)
    np.testing.assert_array_equal(v_cache, want_v)


@pytest.mark.parametrize("layer", [0, 1])
def test_attention_block_matches_numpy_reference(checkpoint, layer):
    cfg = checkpoint.config
    m = 9
    x = random_bf16(m, cfg.hidden_size)
    want = nr.attention_block(checkpoint, layer, nr.bf16_to_f32(x), np.arange(m))
    attention_block_from_start(cfg, layer, x, attention_weights(checkpoint, layer))
    assert close_in_bf16(x, want)


@pytest.mark.parametrize("m", [1, 6])
def test_moe_route_is_norm_router_topk_and_bf16_weights(checkpoint, compute_path, m):
    cfg, w = checkpoint.config, checkpoint.layer(2)
    x = random_bf16(m, cfg.hidden_size)
    t = np.zeros_like(x)
    logits = np.zeros((m, cfg.num_experts), np.uint16)
    indices, weights = kernels.moe_route(x, w.mlp_norm, cfg.rms_norm_eps, w.gate_weight, w.gate_bias,
                                         cfg.experts_per_token, t, logits)
    want_t = kernels.rmsnorm(x, w.mlp_norm, cfg.rms_norm_eps)
    want_logits = kernels.matmul(want_t, w.gate_weight, w.gate_bias)
    want_indices, want_weights = kernels.topk_softmax(want_logits, cfg.experts_per_token)
    np.testing.assert_array_equal(t, want_t)
    np.testing.assert_array_equal(logits, want_logits)
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_array_equal(weights, kernels.bf16_to_f32(kernels.f32_to_bf16(want_weights)))
    # and the numpy reference routes the same way (its weights: bf16 values too)
    ref_indices, ref_weights, _ = nr.route(nr.bf16_to_f32(want_t), w.gate_weight, w.gate_bias, cfg.experts_per_token)
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_allclose(weights, ref_weights, rtol=2.0 ** -7)


def expert_by_kernels(t, indices, weights, expert, e, limit, acc):
    """One expert as Model.moe_block computed it before blocks.c."""
    flat = indices.reshape(-1)
    hits = np.flatnonzero(flat == expert)
    rows = (hits // indices.shape[1]).astype(np.int32)
    xe = np.take(t, rows, axis=0)
    h = kernels.matmul_mxfp4(xe, e.mlp1_blocks, e.mlp1_scales, e.mlp1_bias, TILE)
    a = kernels.swiglu(h, limit, SWIGLU_ALPHA)
    y = kernels.matmul_mxfp4(a, e.mlp2_blocks, e.mlp2_scales, e.mlp2_bias, TILE)
    kernels.scatter_add_weighted(acc, y, rows, weights.reshape(-1)[hits])
    return rows, y


@pytest.mark.parametrize("m", [1, 5, 40])
def test_expert_mlp_is_the_kernel_sequence(checkpoint, compute_path, m):
    cfg = checkpoint.config
    k = cfg.experts_per_token
    # each token picks k distinct experts; expert 3 is picked by token 0 at least, whatever the random draw
    # (which depends on the tests that ran before: the compute paths differ from host to host)
    indices = np.stack([RNG.permutation(cfg.num_experts)[:k] for _ in range(m)]).astype(np.int32)
    if 3 not in indices[0]:
        indices[0, 1] = 3
    weights = nr.bf16_to_f32(random_bf16(m, k)) ** 2
    t = random_bf16(m, cfg.hidden_size)
    acc = RNG.standard_normal((m, cfg.hidden_size)).astype(np.float32)
    want = acc.copy()
    e = checkpoint.expert(2, 3)
    rows, y = expert_by_kernels(t, indices, weights, 3, e, cfg.swiglu_limit, want)
    assert rows.size > 0
    scratch = np.zeros(kernels.expert_mlp_scratch_elems(m, cfg.hidden_size, cfg.intermediate_size), np.uint16)
    kernels.expert_mlp(t, indices, weights, 3, e.mlp1_blocks, e.mlp1_scales, e.mlp1_bias, e.mlp2_blocks,
                       e.mlp2_scales, e.mlp2_bias, cfg.swiglu_limit, SWIGLU_ALPHA, acc, scratch, TILE)
    np.testing.assert_array_equal(acc, want)
    # the expert's output against the numpy reference
    assert close_in_bf16(y, nr.expert_mlp(nr.bf16_to_f32(t[rows]), e, cfg.swiglu_limit))


def test_expert_mlp_of_an_expert_nobody_picked_adds_nothing(checkpoint):
    cfg = checkpoint.config
    m, k = 3, cfg.experts_per_token
    indices = np.tile(np.arange(k, dtype=np.int32), (m, 1))
    weights = np.ones((m, k), np.float32)
    acc = np.ones((m, cfg.hidden_size), np.float32)
    e = checkpoint.expert(0, 0)
    scratch = np.zeros(kernels.expert_mlp_scratch_elems(m, cfg.hidden_size, cfg.intermediate_size), np.uint16)
    kernels.expert_mlp(random_bf16(m, cfg.hidden_size), indices, weights, cfg.num_experts - 1, e.mlp1_blocks,
                       e.mlp1_scales, e.mlp1_bias, e.mlp2_blocks, e.mlp2_scales, e.mlp2_bias, cfg.swiglu_limit,
                       SWIGLU_ALPHA, acc, scratch, TILE)
    assert (acc == 1).all()


def test_blocks_refuse_bad_arguments_and_write_nothing(checkpoint):
    cfg = checkpoint.config
    m = 2
    e = checkpoint.expert(0, 0)
    t = random_bf16(m, cfg.hidden_size)
    acc = np.zeros((m, cfg.hidden_size), np.float32)
    need = kernels.expert_mlp_scratch_elems(m, cfg.hidden_size, cfg.intermediate_size)
    ones = np.ones((m, cfg.experts_per_token), np.float32)
    args = (e.mlp1_blocks, e.mlp1_scales, e.mlp1_bias, e.mlp2_blocks, e.mlp2_scales, e.mlp2_bias,
            cfg.swiglu_limit, SWIGLU_ALPHA, acc)
    routed = np.tile(np.arange(cfg.experts_per_token, dtype=np.int32), (m, 1))
    # scratch one element short: the library refuses (status "bad size") before computing anything
    with pytest.raises(_lib.KernelError, match="gptoss_expert_mlp"):
        kernels.expert_mlp(t, routed, ones, 0, *args, np.zeros(need - 1, np.uint16), TILE)
    # a token that lists the same expert twice is not a router's output
    twice = routed.copy()
    twice[0, :2] = 0
    twice[1, :2] = 0
    with pytest.raises(_lib.KernelError, match="out of range"):
        kernels.expert_mlp(t, twice, ones, 0, *args, np.zeros(need, np.uint16), TILE)
    assert (acc == 0).all()

    x = random_bf16(m, cfg.hidden_size)
    before = x.copy()
    capacity = layer_capacity(cfg, 1, 64, 64)
    k_cache = np.zeros((capacity, cfg.num_key_value_heads, cfg.head_dim), np.uint16)
    inv_freq, concentration = rope_tables(cfg)
    short = np.zeros(kernels.attention_block_scratch_elems(m, cfg.hidden_size, cfg.num_attention_heads,
                                                            cfg.num_key_value_heads, cfg.head_dim) - 1, np.uint16)
    with pytest.raises(_lib.KernelError, match="gptoss_attention_block"):
        kernels.attention_block(x, attention_weights(checkpoint, 1), cfg.rms_norm_eps, inv_freq, concentration,
                                0.125, k_cache, k_cache.copy(), 0, 0, short)
    # the cache too small for the positions (full layer): refused by the attention kernel inside
    with pytest.raises(_lib.KernelError, match="out of range"):
        kernels.attention_block(x, attention_weights(checkpoint, 1), cfg.rms_norm_eps, inv_freq, concentration,
                                0.125, k_cache, k_cache.copy(), capacity, 0, np.zeros(short.size + 1, np.uint16))
    np.testing.assert_array_equal(x, before)
    # weights of the wrong shape never reach the library
    w = checkpoint.layer(1)
    with pytest.raises(ValueError, match="sinks"):
        kernels.AttentionWeights(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                                 norm=w.attn_norm, sinks=w.sinks[:-1], out_weight=w.out_weight, out_bias=w.out_bias,
                                 qkv_weight=w.qkv_weight if w.qkv_weight is not None else None,
                                 qkv_bias=w.qkv_bias, q_weight=w.q_weight, q_bias=w.q_bias, k_weight=w.k_weight,
                                 k_bias=w.k_bias, v_weight=w.v_weight, v_bias=w.v_bias)
