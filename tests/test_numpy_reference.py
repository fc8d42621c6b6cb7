"""The numpy reference checked against tiny cases computed by hand (and against naive loops)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

import numpy_reference as nr

# The official RoPE parameters (SPEC §1), as a config-like object.
ROPE_CFG = SimpleNamespace(
    head_dim=64,
    rope_theta=150000.0,
    rope_scaling_factor=32.0,
    rope_ntk_alpha=1.0,
    rope_ntk_beta=32.0,
    initial_context_length=4096,
)
CONCENTRATION = 0.1 * math.log(32.0) + 1.0

# ------------------------------------------------------------------------------------------------ bf16


def test_bf16_rounding_is_nearest_even():
    one = 1.0
    ulp = 2.0**-7  # bf16 spacing in [1, 2)
    cases = [  # a list, not a dict: 0.0 and -0.0 are equal keys
        (one, 0x3F80),
        (one + ulp / 2, 0x3F80),  # half-way, the even neighbour (1.0) wins
        (one + 3 * ulp / 2, 0x3F82),  # half-way between 0x3F81 (odd) and 0x3F82: up to even
        (one + ulp / 2 + 2.0**-20, 0x3F81),  # just above half-way rounds up
        (-2.0, 0xC000),
        (0.0, 0x0000),
        (-0.0, 0x8000),
        (float(np.finfo(np.float32).max), 0x7F80),  # rounds up to +inf
        (float("inf"), 0x7F80),
    ]
    x = np.array([c[0] for c in cases], dtype=np.float32)
    got = nr.f32_to_bf16(x)
    assert [hex(v) for v in got] == [hex(c[1]) for c in cases]
    assert np.isnan(nr.bf16_to_f32(nr.f32_to_bf16(np.array([np.nan], np.float32))))[0]


def test_bf16_roundtrip_every_finite_pattern():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    values = nr.bf16_to_f32(bits)
    finite = ~np.isnan(values)
    assert np.array_equal(nr.f32_to_bf16(values)[finite], bits[finite])
    assert nr.bf16_to_f32(np.array([0x3F80, 0x4049], np.uint16)).tolist() == [1.0, 3.140625]


def test_bf16_rejects_wrong_dtype():
    with pytest.raises(ValueError, match="uint16"):
        nr.bf16_to_f32(np.zeros(3, np.int16))


# ------------------------------------------------------------------------------------------------ MXFP4


def test_mxfp4_code_table_low_nibble_first():
    # Block of 32 codes 0..15, 0..15: byte j holds code 2j in bits 0-3 and code 2j+1 in bits 4-7.
    codes = np.arange(32, dtype=np.uint8) % 16
    blocks = (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8)[None, None, :]  # [1 row, 1 block, 16]
    table = [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]
    got = nr.dequantize_mxfp4(blocks, np.array([[127]], np.uint8))
    assert got.shape == (1, 32)
    assert got[0].tolist() == table + table
    assert np.signbit(got[0, 8])  # code 8 is -0
    assert nr.dequantize_mxfp4(blocks, np.array([[128]], np.uint8))[0, 7] == 12.0  # 6 * 2^1
    assert nr.dequantize_mxfp4(blocks, np.array([[125]], np.uint8))[0, 1] == 0.125  # 0.5 * 2^-2


def test_mxfp4_rows_are_blocks_in_order():
    # [2 rows, 3 blocks, 16 bytes]; every byte of block b of row r holds code (r*3 + b) % 8 twice,
    # and block b has scale 127 + b: row r value at column 32b + i must be FP4[code] * 2^b.
    rows, nblk = 2, 3
    blocks = np.zeros((rows, nblk, 16), np.uint8)
    for r in range(rows):
        for b in range(nblk):
            c = (r * nblk + b) % 8
            blocks[r, b, :] = c | (c << 4)
    scales = np.tile(np.arange(127, 127 + nblk, dtype=np.uint8), (rows, 1))
    got = nr.dequantize_mxfp4(blocks, scales)
    assert got.shape == (rows, nblk * 32)
    for r in range(rows):
        for b in range(nblk):
            want = nr.FP4_VALUES[(r * nblk + b) % 8] * 2.0**b
            assert np.all(got[r, 32 * b : 32 * (b + 1)] == want)


def test_mxfp4_expert_batch_shape_and_errors():
    blocks = np.zeros((4, 5, 2, 16), np.uint8)
    assert nr.dequantize_mxfp4(blocks, np.full((4, 5, 2), 127, np.uint8)).shape == (4, 5, 64)
    with pytest.raises(ValueError, match="shapes"):
        nr.dequantize_mxfp4(blocks, np.full((4, 5, 3), 127, np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        nr.dequantize_mxfp4(blocks.astype(np.int8), np.full((4, 5, 2), 127, np.uint8))


# ------------------------------------------------------------------------------------------------ RMSNorm, linear


def test_rmsnorm_hand_case():
    x = np.array([[3.0, 4.0]], np.float32)
    scale = np.array([1.0, 2.0], np.float32)
    rms = math.sqrt((9 + 16) / 2 + 1e-5)
    got = nr.rmsnorm(x, scale)
    want = nr.round_bf16(np.array([[3 / rms, 8 / rms]], np.float32))
    assert np.array_equal(got, want)
    bits = nr.f32_to_bf16(scale)  # bf16 bits are accepted as the scale too
    assert np.array_equal(nr.rmsnorm(x, bits), want)


def test_linear_adds_bias_and_rounds_once():
    x = np.array([[1.0, 2.0]], np.float32)
    w = nr.f32_to_bf16(np.array([[1.0, 1.0], [0.5, -1.0]], np.float32))
    b = nr.f32_to_bf16(np.array([2.0**-9, 1.0], np.float32))
    # 3 + 2^-9 is closer to 3 than to the next bf16 (3 + 2^-6); rounding twice would not change that,
    # so use a case where only a single rounding is right: 256 + 1 + 0.5 -> 258 (not 256 + 1 -> 256 -> 256.5 -> 256)
    got = nr.linear(x, w, b)
    assert got.tolist() == [[3.0, -0.5]]
    x2 = np.array([[256.0, 1.0]], np.float32)
    w2 = nr.f32_to_bf16(np.array([[1.0, 1.0]], np.float32))
    b2 = nr.f32_to_bf16(np.array([0.5], np.float32))
    assert nr.linear(x2, w2, b2).tolist() == [[258.0]]  # 257.5 rounds to 258 (spacing 2 above 256)


# ------------------------------------------------------------------------------------------------ RoPE


def test_rope_inv_freq_ntk_by_parts():
    inv_freq, conc = nr.rope_inv_freq(64, 150000.0, 32.0, 1.0, 32.0, 4096)
    assert conc == pytest.approx(CONCENTRATION)
    freq = 150000.0 ** (np.arange(32) * 2 / 64)
    low = 32 * math.log(4096 / (32 * 2 * math.pi)) / math.log(150000.0)  # ~8.09
    high = 32 * math.log(4096 / (1 * 2 * math.pi)) / math.log(150000.0)  # ~17.4
    assert 8 < low < 9 and 17 < high < 18
    # Fast dims (i <= 8) keep the original frequency, slow dims (i >= 18) are interpolated by 32.
    assert np.allclose(inv_freq[:9], 1 / freq[:9], rtol=1e-12)
    assert np.allclose(inv_freq[18:], 1 / (32 * freq[18:]), rtol=1e-12)
    ramp = (12 - low) / (high - low)
    assert inv_freq[12] == pytest.approx((1 / (32 * freq[12])) * ramp + (1 / freq[12]) * (1 - ramp), rel=1e-12)


def test_rope_at_position_zero_only_scales_by_concentration():
    rng = np.random.default_rng(0)
    x = nr.round_bf16(rng.standard_normal((1, 3, 64)).astype(np.float32))
    cos, sin = nr.rope_cos_sin(np.array([0]), ROPE_CFG)
    assert np.all(sin == 0)
    assert np.allclose(cos, CONCENTRATION)
    assert np.array_equal(nr.rope(x, cos, sin), nr.round_bf16(x * np.float32(CONCENTRATION)))
    # Without YaRN (factor 1) there is no concentration and position 0 is the identity.
    plain = SimpleNamespace(**{**vars(ROPE_CFG), "rope_scaling_factor": 1.0})
    cos1, sin1 = nr.rope_cos_sin(np.array([0]), plain)
    assert np.array_equal(nr.rope(x, cos1, sin1), x)


def test_rope_rotates_first_half_with_second_half():
    x = np.zeros((1, 1, 64), np.float32)
    x[0, 0, 0] = 1.0  # x1[0] = 1, its partner is dim 32
    pos = 5
    cos, sin = nr.rope_cos_sin(np.array([pos]), ROPE_CFG)
    out = nr.rope(x, cos, sin)[0, 0]
    inv_freq, _ = nr.rope_inv_freq(64, 150000.0, 32.0, 1.0, 32.0, 4096)
    assert out[0] == nr.round_bf16(np.float32([math.cos(pos * inv_freq[0]) * CONCENTRATION]))[0]
    assert out[32] == nr.round_bf16(np.float32([math.sin(pos * inv_freq[0]) * CONCENTRATION]))[0]
    assert np.count_nonzero(out) == 2


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(1)
    q = nr.round_bf16(rng.standard_normal((1, 1, 64)).astype(np.float32))
    k = nr.round_bf16(rng.standard_normal((1, 1, 64)).astype(np.float32))

    def score(pq: int, pk: int) -> float:
        cq, sq = nr.rope_cos_sin(np.array([pq]), ROPE_CFG)
        ck, sk = nr.rope_cos_sin(np.array([pk]), ROPE_CFG)
        return float(np.dot(nr.rope(q, cq, sq).ravel(), nr.rope(k, ck, sk).ravel()))

    base = score(7, 3)
    norm = float(np.linalg.norm(q) * np.linalg.norm(k)) * CONCENTRATION**2
    for shift in (1, 100, 5000):
        assert abs(score(7 + shift, 3 + shift) - base) < 2e-2 * norm  # bf16 rounding of q and k only


# ------------------------------------------------------------------------------------------------ attention


NO_SINK = np.full(1, -1e30, np.float32)


def test_sink_absorbs_probability():
    q = np.zeros((1, 1, 4), np.float32)  # score 0 against any key
    k = np.zeros((1, 1, 4), np.float32)
    v = np.ones((1, 1, 4), np.float32)
    for sink, want in ((0.0, 0.5), (math.log(3.0), 0.25), (-1e30, 1.0)):
        out = nr.attention(q, k, v, np.array([sink], np.float32), np.array([0]), np.array([0]))
        assert out.shape == (1, 4)
        assert np.allclose(out, want, rtol=2**-8), (sink, out)


def test_sink_given_as_bf16_bits():
    q = np.zeros((1, 1, 4), np.float32)
    v = np.ones((1, 1, 4), np.float32)
    out = nr.attention(q, q, v, nr.f32_to_bf16(np.array([0.0], np.float32)), np.array([0]), np.array([0]))
    assert np.all(out == 0.5)


def test_sliding_window_boundary():
    # Query at position i = 200 with window 128 sees keys i-127 .. i; key i-128 is out.
    T, D, i = 201, 4, 200
    q = np.zeros((T, 1, D), np.float32)  # uniform attention over whatever is visible
    k = np.zeros((T, 1, D), np.float32)
    v = np.zeros((T, 1, D), np.float32)
    v[i - 128, 0, 0] = 1.0  # just outside
    v[i - 127, 0, 1] = 1.0  # oldest visible key
    v[i, 0, 2] = 1.0  # itself
    pos = np.arange(T)
    out = nr.attention(q, k, v, NO_SINK, pos, pos, sliding_window=128)
    assert out[i, 0] == 0.0
    assert out[i, 1] == nr.round_bf16(np.float32([1 / 128]))[0]
    assert out[i, 2] == nr.round_bf16(np.float32([1 / 128]))[0]
    full = nr.attention(q, k, v, NO_SINK, pos, pos, sliding_window=0)
    assert full[i, 0] == nr.round_bf16(np.float32([1 / 201]))[0]  # a full layer sees all 201 keys


def test_causal_mask_first_token_sees_itself_only():
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((5, 2, 8)).astype(np.float32) for _ in range(3))
    pos = np.arange(5)
    out = nr.attention(q, k, v, np.full(2, -1e30, np.float32), pos, pos)
    assert np.array_equal(out[0], nr.round_bf16(v[0].reshape(-1)))


def test_gqa_kv_head_serves_consecutive_q_heads():
    # 4 kv heads x 2 q heads each; kv head h has value h + 1 everywhere: q head j must output j // 2 + 1.
    n_kv, group, D = 4, 2, 4
    q = np.zeros((1, n_kv * group, D), np.float32)
    k = np.zeros((1, n_kv, D), np.float32)
    v = np.arange(1, n_kv + 1, dtype=np.float32)[None, :, None].repeat(D, axis=2)
    out = nr.attention(q, k, v, np.full(n_kv * group, -1e30, np.float32), np.array([0]), np.array([0]))
    assert out.reshape(n_kv * group, D)[:, 0].tolist() == [1, 1, 2, 2, 3, 3, 4, 4]


def naive_attention(q, k, v, sinks, window):
    """One query, one head at a time, straight from SPEC §4."""
    T, n_q, D = q.shape
    group = n_q // k.shape[1]
    out = np.zeros((T, n_q, D), np.float64)
    for h in range(n_q):
        for i in range(T):
            js = [j for j in range(T) if j <= i and (not window or j > i - window)]
            logits = [float(q[i, h] @ k[j, h // group]) / math.sqrt(D) for j in js] + [float(sinks[h])]
            m = max(logits)
            p = np.exp(np.array(logits) - m)
            p /= p.sum()
            out[i, h] = sum(p[n] * v[j, h // group] for n, j in enumerate(js))
    return out.reshape(T, n_q * D)


@pytest.mark.parametrize("window", [0, 3])
def test_attention_matches_naive_loops(window):
    rng = np.random.default_rng(3)
    T, n_q, n_kv, D = 7, 4, 2, 8
    q = nr.round_bf16(rng.standard_normal((T, n_q, D)).astype(np.float32))
    k = nr.round_bf16(rng.standard_normal((T, n_kv, D)).astype(np.float32))
    v = nr.round_bf16(rng.standard_normal((T, n_kv, D)).astype(np.float32))
    sinks = nr.round_bf16(rng.standard_normal(n_q).astype(np.float32))
    pos = np.arange(T)
    got = nr.attention(q, k, v, sinks, pos, pos, window)
    want = naive_attention(q, k, v, sinks, window)
    assert np.allclose(got, want, rtol=2**-8, atol=1e-6)


# ------------------------------------------------------------------------------------------------ router, SwiGLU


def test_route_top4_sorted_with_softmax_weights():
    # Router as identity: logits = t (bias 0), so the choice is visible in t.
    t = np.array([[0.5, 3.0, -1.0, 2.0, 2.0, 1.0, 0.0, 4.0]], np.float32)
    eye = nr.f32_to_bf16(np.eye(8, dtype=np.float32))
    idx, w, logits = nr.route(t, eye, nr.f32_to_bf16(np.zeros(8, np.float32)), 4)
    assert idx.tolist() == [[7, 1, 3, 4]]  # 4.0, 3.0, then the tie 2.0/2.0 in expert order
    e = np.exp(np.array([4.0, 3.0, 2.0, 2.0]) - 4.0)
    assert np.allclose(w[0], e / e.sum(), rtol=2**-8)
    assert np.array_equal(w, nr.round_bf16(w))  # the weights are bf16 values
    assert np.array_equal(logits, t)


def test_route_tie_at_kth_place_takes_lower_index():
    t = np.array([[1.0, 1.0, 1.0, 1.0, 1.0, 0.0]], np.float32)
    eye = nr.f32_to_bf16(np.eye(6, dtype=np.float32))
    idx, w, _ = nr.route(t, eye, nr.f32_to_bf16(np.zeros(6, np.float32)), 4)
    assert idx.tolist() == [[0, 1, 2, 3]]
    assert np.all(w == 0.25)


def test_swiglu_interleaved_and_clamped():
    alpha = 1.702

    def sig(z):
        return 1 / (1 + math.exp(-z))

    h = np.array([[1.0, 0.0, 10.0, 0.5, -2.0, -10.0, 0.5, 10.0]], np.float32)  # pairs (glu, lin)
    want = [
        1.0 * sig(alpha) * 1.0,
        7.0 * sig(alpha * 7.0) * 1.5,  # glu clamped to 7 from above
        -2.0 * sig(-2.0 * alpha) * (-7.0 + 1.0),  # lin clamped to -7; glu not clamped below
        0.5 * sig(0.5 * alpha) * (7.0 + 1.0),  # lin clamped to +7
    ]
    got = nr.swiglu(h)
    assert got.shape == (1, 4)
    assert np.array_equal(got, nr.round_bf16(np.array([want], np.float32)))


# ------------------------------------------------------------------------------------------------ whole model (tiny)


@pytest.fixture(scope="module")
def tiny(tiny_original):
    from gptoss_stream.weights.checkpoint import Checkpoint

    return Checkpoint.open(tiny_original)


def tokens(n: int, seed: int = 5) -> list[int]:
    return np.random.default_rng(seed).integers(0, 199_998, size=n).tolist()


def test_moe_block_matches_a_per_token_loop(tiny):
    """The vectorised expert grouping equals SPEC §4 written one token and one expert at a time."""
    cfg = tiny.config
    x = nr.round_bf16(np.random.default_rng(6).standard_normal((9, cfg.hidden_size)).astype(np.float32))
    got = nr.moe_block(tiny, 1, x)
    w = tiny.layer(1)
    t = nr.rmsnorm(x, w.mlp_norm)
    g = nr.bf16_to_f32(w.gate_weight)
    want = np.empty_like(x)
    for i in range(x.shape[0]):
        logits = nr.round_bf16(t[i] @ g.T + nr.bf16_to_f32(w.gate_bias))
        top = sorted(range(cfg.num_experts), key=lambda e: (-logits[e], e))[: cfg.experts_per_token]
        p = np.exp(logits[top] - logits[top[0]])
        weights = nr.round_bf16((p / p.sum()).astype(np.float32))
        acc = np.zeros(cfg.hidden_size, np.float32)
        for e, we in zip(top, weights):
            ex = tiny.expert(1, e)
            h = nr.linear(t[i : i + 1], nr.dequantize_mxfp4(ex.mlp1_blocks, ex.mlp1_scales), ex.mlp1_bias)
            a = nr.swiglu(h, cfg.swiglu_limit)
            acc += we * nr.linear(a, nr.dequantize_mxfp4(ex.mlp2_blocks, ex.mlp2_scales), ex.mlp2_bias)[0]
        want[i] = nr.round_bf16(x[i] + nr.round_bf16(acc))
    # Equal up to the order of fp32 sums (BLAS with 1 row vs 9): at most one bf16 ulp here and there.
    assert np.max(np.abs(got - want) / (np.abs(want) + 1e-3)) <= 2**-7


def test_forward_is_causal_and_streams_add_up(tiny):
    full = nr.forward_layers(tiny, tokens(40))
    prefix = nr.forward_layers(tiny, tokens(40)[:25])
    assert len(full) == tiny.config.num_hidden_layers + 1
    for a, b in zip(full, prefix):  # later tokens never change earlier positions
        assert np.allclose(a[:25], b, rtol=2**-6, atol=2**-6)
    logits = nr.forward(tiny, tokens(40))
    assert logits.shape == (40, tiny.config.vocab_size) and logits.dtype == np.float32
    assert np.array_equal(logits, nr.unembed(tiny, full[-1]))


def test_generate_greedy_takes_the_argmax_of_each_step(tiny):
    """Checked against one forward pass over the prompt and the generated tokens: each step's logits are
    that pass's logits at the step's position (so each chosen token was fed back), and each chosen token
    is the argmax there."""
    start = tokens(6)
    new, steps = nr.generate_greedy(tiny, start, 3)
    assert len(new) == 3 and steps.shape == (3, tiny.config.vocab_size)
    assert np.array_equal(steps[0], nr.forward(tiny, start)[-1])
    full = nr.forward(tiny, start + new)[len(start) - 1 : -1]
    # Equal up to the order of fp32 sums (BLAS with more rows), as in the causality test above.
    np.testing.assert_allclose(steps, full, rtol=2**-6, atol=2**-6 * float(np.std(full)))
    assert new == full.argmax(axis=-1).tolist()


def test_forward_rejects_bad_tokens(tiny):
    with pytest.raises(ValueError, match="token ids"):
        nr.forward(tiny, [tiny.config.vocab_size])
    with pytest.raises(ValueError, match="non-empty"):
        nr.forward(tiny, [])
