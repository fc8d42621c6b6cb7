"""libgptoss attention.c (GQA attention with sinks and sliding window over a ring KV cache, and kv_store)
against a plain float64 numpy reference that sees the whole key/value history at once.

Tolerance: the kernel keeps scores, softmax and the weighted sum of values in fp32 and rounds the output to
bf16 once. Against float64 that is half a bf16 ulp (2^-8 relative) of the result, plus fp32 error that is
absolute rather than relative: a score error ds changes each probability by a factor (1 + ds), so the output
moves by ~ds * max|v|. With scores of size ~10 and 64-term dot products ds ~ 1e-5, hence 1e-4 * max|v|.
"""

from __future__ import annotations

import numpy as np
import pytest

from gptoss_stream.engine import _lib, kernels

HEAD_DIM = 64
SCALE = HEAD_DIM**-0.5
# (n_heads, n_kv_heads): gpt-oss's 8 q heads per kv head take the kernel's hand-vectorised path (on AVX2 and
# AVX-512 CPUs), any other grouping the portable one; the tests run both.
HEAD_CONFIGS = [pytest.param((4, 2), id="group2"), pytest.param((16, 2), id="group8")]


def to_bf16(x: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)


def from_bf16(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


def attention_reference(q: np.ndarray, keys: np.ndarray, values: np.ndarray, sinks: np.ndarray,
                        first_position: int, window: int, scale: float = SCALE) -> np.ndarray:
    """q [m, n_heads, d]; keys/values [T, n_kv_heads, d] for every position 0..T-1 (no ring); float64.

    Query i sits at first_position + i and sees keys j <= its position (and > position - window when
    window > 0); the sink is one more logit per head, with no value.
    """
    q, keys, values, sinks = (from_bf16(a).astype(np.float64) for a in (q, keys, values, sinks))
    m, n_heads, d = q.shape
    group = n_heads // keys.shape[1]
    out = np.zeros((m, n_heads, d))
    for i in range(m):
        position = first_position + i
        first_key = max(0, position - window + 1) if window else 0
        for h in range(n_heads):
            k = keys[first_key: position + 1, h // group]
            v = values[first_key: position + 1, h // group]
            logits = np.append(k @ q[i, h] * scale, sinks[h])
            p = np.exp(logits - logits.max())
            p /= p.sum()
            out[i, h] = p[:-1] @ v
    return out.reshape(m, n_heads * d)


def assert_attention_close(actual_bf16: np.ndarray, expected: np.ndarray, values: np.ndarray) -> None:
    actual = from_bf16(actual_bf16).astype(np.float64)
    tol = np.abs(expected) * 2.0**-8 + 1e-4 * np.abs(from_bf16(values)).max()
    excess = np.abs(actual - expected) - tol
    assert np.all(excess <= 0), f"worst excess {excess.max():.3g} at {np.unravel_index(excess.argmax(), excess.shape)}"


def random_problem(rng: np.random.Generator, n_tokens: int, n_heads: int, n_kv_heads: int,
                   q_scale: float = 3.0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """q for every position [T, n_heads, d], keys, values [T, n_kv_heads, d], sinks [n_heads] (bf16).

    Every kv head gets its own offset, so serving a q head from the wrong kv head changes the output.
    """
    q = to_bf16(rng.standard_normal((n_tokens, n_heads, HEAD_DIM)) * q_scale)
    head_offsets = np.arange(n_kv_heads)[None, :, None] * 0.5
    keys = to_bf16(rng.standard_normal((n_tokens, n_kv_heads, HEAD_DIM)) + head_offsets)
    values = to_bf16(rng.standard_normal((n_tokens, n_kv_heads, HEAD_DIM)) + 4 * head_offsets)
    sinks = to_bf16(rng.standard_normal(n_heads))
    return q, keys, values, sinks


class RingCache:
    """A KV cache of `capacity` rows filled through kernels.kv_store, the way the engine fills it."""

    def __init__(self, capacity: int, n_kv_heads: int):
        self.k = np.zeros((capacity, n_kv_heads, HEAD_DIM), dtype=np.uint16)
        self.v = np.zeros_like(self.k)

    def store(self, keys: np.ndarray, values: np.ndarray, first_position: int) -> None:
        m = keys.shape[0]
        kernels.kv_store(keys.reshape(m, -1), values.reshape(m, -1), self.k, self.v, first_position)


def run_chunks(q, keys, values, sinks, chunks: list[tuple[int, int]], capacity: int, window: int,
               n_heads: int) -> None:
    """Store and attend chunk by chunk (first_position, m), checking each chunk against the full history."""
    cache = RingCache(capacity, keys.shape[1])
    for first, m in chunks:
        cache.store(keys[first: first + m], values[first: first + m], first)
        out = kernels.attention(q[first: first + m].reshape(m, -1), n_heads, cache.k, cache.v, first, window,
                                sinks, SCALE)
        expected = attention_reference(q[first: first + m], keys, values, sinks, first, window)
        assert_attention_close(out, expected, values)


# ---------------------------------------------------------------------------------------------------------
# Correctness
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads", HEAD_CONFIGS)
def test_position_zero_sees_only_itself_and_the_sink(heads: tuple[int, int]) -> None:
    rng = np.random.default_rng(20)
    n_heads, n_kv_heads = heads
    group = n_heads // n_kv_heads
    q, keys, values, sinks = random_problem(rng, 1, n_heads, n_kv_heads)
    cache = RingCache(1, n_kv_heads)
    cache.store(keys, values, 0)
    out = kernels.attention(q.reshape(1, -1), n_heads, cache.k, cache.v, 0, 0, sinks, SCALE)
    # softmax over {score, sink}: out = v0 * 1 / (1 + exp(sink - score))
    qf, kf, vf, sf = (from_bf16(a).astype(np.float64) for a in (q, keys, values, sinks))
    for h in range(n_heads):
        score = qf[0, h] @ kf[0, h // group] * SCALE
        expected = vf[0, h // group] / (1 + np.exp(sf[h] - score))
        assert_attention_close(out[:, h * 64: (h + 1) * 64], expected[None], values)


@pytest.mark.parametrize("heads", [(8, 2), (16, 2), (8, 1)])
def test_gqa_maps_kv_head_h_to_q_heads_h_times_group_onwards(heads: tuple[int, int]) -> None:
    rng = np.random.default_rng(21)
    (n_heads, n_kv_heads), n = heads, 30
    q, keys, values, sinks = random_problem(rng, n, n_heads, n_kv_heads)
    cache = RingCache(n, n_kv_heads)
    cache.store(keys, values, 0)
    out = kernels.attention(q.reshape(n, -1), n_heads, cache.k, cache.v, 0, 0, sinks, SCALE)
    assert_attention_close(out, attention_reference(q, keys, values, sinks, 0, 0), values)
    # The interleaved mapping (q head h -> kv head h % n_kv_heads) gives clearly different outputs, so the
    # check above does tell the two apart.
    if n_kv_heads > 1:
        interleaved = np.stack([attention_reference(q[:, [h]], keys[:, [h % n_kv_heads]],
                                                    values[:, [h % n_kv_heads]], sinks[[h]], 0, 0)
                                for h in range(n_heads)], axis=1)
        assert np.abs(from_bf16(out) - interleaved.reshape(n, -1)).max() > 0.5


@pytest.mark.parametrize("heads", HEAD_CONFIGS)
@pytest.mark.parametrize("m", [1, 37])
def test_sliding_window_over_a_minimal_ring(m: int, heads: tuple[int, int]) -> None:
    """Chunks of m tokens crossing the window (128) and wrapping a ring of window + m - 1 rows many times."""
    rng = np.random.default_rng(22 + m)
    (n_heads, n_kv_heads), window, n = heads, 128, 300
    q, keys, values, sinks = random_problem(rng, n, n_heads, n_kv_heads)
    chunks = [(p, min(m, n - p)) for p in range(0, n, m)]
    run_chunks(q, keys, values, sinks, chunks, window + m - 1, window, n_heads)


@pytest.mark.parametrize("heads", [(6, 3), (8, 1)])
def test_full_causal_with_capacity_exactly_first_position_plus_m(heads: tuple[int, int]) -> None:
    rng = np.random.default_rng(24)
    (n_heads, n_kv_heads), n = heads, 57
    q, keys, values, sinks = random_problem(rng, n, n_heads, n_kv_heads)
    run_chunks(q, keys, values, sinks, [(0, 20), (20, 30), (50, 7)], n, 0, n_heads)


@pytest.mark.parametrize("heads", HEAD_CONFIGS)
@pytest.mark.parametrize("sink", [30.0, -30.0, -np.inf])
def test_sinks_large_small_and_absent(sink: float, heads: tuple[int, int]) -> None:
    rng = np.random.default_rng(25)
    (n_heads, n_kv_heads), n = heads, 40
    q, keys, values, _ = random_problem(rng, n, n_heads, n_kv_heads, q_scale=1.0)
    sinks = to_bf16(np.full(n_heads, sink))
    cache = RingCache(n, n_kv_heads)
    cache.store(keys, values, 0)
    out = kernels.attention(q[30:].reshape(10, -1), n_heads, cache.k, cache.v, 30, 0, sinks, SCALE)
    expected = attention_reference(q[30:], keys, values, sinks, 30, 0)
    assert_attention_close(out, expected, values)
    if sink > 0:  # the sink takes nearly all probability: the output is nearly zero
        assert np.abs(from_bf16(out)).max() < 1e-6
    else:  # no sink: an ordinary softmax over the keys
        plain = attention_reference(q[30:], keys, values, to_bf16(np.full(n_heads, -1e30)), 30, 0)
        assert_attention_close(out, plain, values)


@pytest.mark.parametrize("heads", HEAD_CONFIGS)
def test_long_cache_decode_and_peaky_scores(heads: tuple[int, int]) -> None:
    """3000 cached keys (many key blocks, running max rescaled often) and scores up to ~+-60."""
    rng = np.random.default_rng(26)
    (n_heads, n_kv_heads), n = heads, 3003
    q, keys, values, sinks = random_problem(rng, n, n_heads, n_kv_heads, q_scale=1.0)
    q = to_bf16(from_bf16(q) * 8.0)
    cache = RingCache(4096, n_kv_heads)
    cache.store(keys, values, 0)
    for first, m in [(3000, 1), (3000, 3)]:
        out = kernels.attention(q[first: first + m].reshape(m, -1), n_heads, cache.k, cache.v, first, 0, sinks, SCALE)
        assert_attention_close(out, attention_reference(q[first: first + m], keys, values, sinks, first, 0), values)


@pytest.mark.parametrize("heads", HEAD_CONFIGS)
def test_strided_q_and_every_isa(heads: tuple[int, int]) -> None:
    """q as a column slice of a qkv row (ldq > n_heads * d), run on every ISA this CPU offers."""
    rng = np.random.default_rng(27)
    (n_heads, n_kv_heads), n = heads, 70
    q, keys, values, sinks = random_problem(rng, n, n_heads, n_kv_heads)
    qkv = np.concatenate([q.reshape(n, -1), keys.reshape(n, -1), values.reshape(n, -1)], axis=1)
    q_cols, kv_cols = n_heads * HEAD_DIM, n_kv_heads * HEAD_DIM
    cache = RingCache(n, n_kv_heads)
    kernels.kv_store(qkv[:, q_cols: q_cols + kv_cols], qkv[:, q_cols + kv_cols:], cache.k, cache.v, 0)
    expected = attention_reference(q, keys, values, sinks, 0, 0)
    isas = ["scalar", "avx2", "avx512"]
    available = isas[: isas.index(kernels.detect_isa()) + 1]
    selected = kernels.get_isa()
    try:
        for isa in available:
            kernels.set_isa(isa)
            out = kernels.attention(qkv[:, :q_cols], n_heads, cache.k, cache.v, 0, 0, sinks, SCALE)
            assert_attention_close(out, expected, values)
    finally:
        kernels.set_isa(selected)


def test_kv_store_writes_ring_rows() -> None:
    rng = np.random.default_rng(28)
    cache = RingCache(5, 2)
    k = to_bf16(rng.standard_normal((4, 2 * HEAD_DIM)))
    v = to_bf16(rng.standard_normal((4, 2 * HEAD_DIM)))
    cache.store(k, v, 13)  # positions 13..16 -> rows 3, 4, 0, 1
    for i, row in enumerate([3, 4, 0, 1]):
        np.testing.assert_array_equal(cache.k[row].ravel(), k[i])
        np.testing.assert_array_equal(cache.v[row].ravel(), v[i])
    assert np.all(cache.k[2] == 0) and np.all(cache.v[2] == 0)


# ---------------------------------------------------------------------------------------------------------
# Bad input: the Python wrapper's checks, then the C library's own (called directly through _lib)
# ---------------------------------------------------------------------------------------------------------


NULL, BAD_SIZE, OUT_OF_RANGE = 1, 2, 3


def _expect_status(status: int, name: str, *args) -> None:
    with pytest.raises(_lib.KernelError, match=name) as info:
        _lib.call(name, *args)
    assert info.value.status == status, _lib.status_string(info.value.status)


def test_wrappers_reject_bad_arguments() -> None:
    cache = RingCache(8, 2)
    q = np.zeros((1, 4 * HEAD_DIM), dtype=np.uint16)
    with pytest.raises(ValueError, match="sinks"):
        kernels.attention(q, 4, cache.k, cache.v, 0, 0, np.zeros(3, np.uint16), SCALE)
    with pytest.raises(ValueError, match="v_cache"):
        kernels.attention(q, 4, cache.k, cache.v[:4], 0, 0, np.zeros(4, np.uint16), SCALE)
    with pytest.raises(ValueError, match="k_cache"):
        kernels.attention(q, 4, cache.k.astype(np.float32), cache.v, 0, 0, np.zeros(4, np.uint16), SCALE)
    with pytest.raises(ValueError, match="does not fit"):
        kernels.kv_store(q, q, cache.k, cache.v, 0)


def test_c_checks_reject_bad_arguments() -> None:
    n_heads, n_kv_heads, capacity = 4, 2, 8
    q = np.zeros((2, n_heads * HEAD_DIM), dtype=np.uint16)
    cache = RingCache(capacity, n_kv_heads)
    sinks = np.zeros(n_heads, dtype=np.uint16)
    out = np.full((2, n_heads * HEAD_DIM), 7, dtype=np.uint16)
    qp, kp, vp, sp, op = (a.ctypes.data for a in (q, cache.k, cache.v, sinks, out))
    ld = n_heads * HEAD_DIM

    def attention(m=2, ldq=ld, heads=n_heads, kv_heads=n_kv_heads, cap=capacity, first=0, window=0, q_ptr=qp):
        return ("gptoss_attention", q_ptr, m, ldq, heads, kv_heads, HEAD_DIM, kp, vp, cap, first, window, sp,
                SCALE, op)

    _expect_status(NULL, *attention(q_ptr=None))
    _expect_status(BAD_SIZE, *attention(m=0))
    _expect_status(BAD_SIZE, *attention(kv_heads=3))  # 4 % 3
    _expect_status(BAD_SIZE, *attention(ldq=ld - 1))
    _expect_status(OUT_OF_RANGE, *attention(first=7))  # full causal needs capacity >= 7 + 2
    _expect_status(OUT_OF_RANGE, *attention(first=100, window=8))  # window needs capacity >= 8 + 2 - 1
    _expect_status(OUT_OF_RANGE, *attention(first=2**64 - 1))  # first_position + m overflows
    _expect_status(BAD_SIZE, *attention(cap=2**62))  # capacity * row overflows
    assert np.all(out == 7)  # nothing written by a rejected call
    # The boundaries themselves are accepted.
    _lib.call(*attention(first=6))
    _lib.call(*attention(first=100, window=7))

    k = np.zeros((3, n_kv_heads * HEAD_DIM), dtype=np.uint16)
    kq = k.ctypes.data
    row = n_kv_heads * HEAD_DIM
    _expect_status(NULL, "gptoss_kv_store", kq, None, 3, row, n_kv_heads, HEAD_DIM, kp, vp, capacity, 0)
    _expect_status(BAD_SIZE, "gptoss_kv_store", kq, kq, 3, row - 1, n_kv_heads, HEAD_DIM, kp, vp, capacity, 0)
    _expect_status(BAD_SIZE, "gptoss_kv_store", kq, kq, 3, row, n_kv_heads, HEAD_DIM, kp, vp, 2, 0)  # m > capacity
    _expect_status(BAD_SIZE, "gptoss_kv_store", kq, kq, 0, row, n_kv_heads, HEAD_DIM, kp, vp, capacity, 0)
    _expect_status(OUT_OF_RANGE, "gptoss_kv_store", kq, kq, 3, row, n_kv_heads, HEAD_DIM, kp, vp, capacity,
                   2**64 - 2)
