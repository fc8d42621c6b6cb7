"""libgptoss q8.c (+ gptoss_matmul_q8 in matmul.c): the opt-in 8-bit dense layout, int8 values with one fp16
scale per 32 values of a row, against numpy twins, on every compute path this machine can run.

Quantization is deterministic and must match its twin bit for bit (gptoss.h states the rule). Dequantized
values q * scale are exact in fp32 (8 x 11 significant bits), so the twin of the matmul is the float64
product of x and the exact weights (rounded to bf16 for m > 8 on the AVX-512 path, whose tiles are bf16). Tolerances: each kernel product x_i * w_i (8 x 19 bits) rounds once in
fp32 and the k products plus the bias are summed in some order: |error| <= 1.01 (k + 2) u sum |x_i w_i| + |b|
with u = 2^-24 (the classic bound with one more rounding per term); bf16 outputs add one bf16 ulp (both the
kernel and the twin round to bf16 within half an ulp). A wrong scale, block, row or stride gives errors of the
size of the values themselves.
"""

from __future__ import annotations

import ctypes
import types

import numpy as np
import pytest

import numpy_reference as nr
from block_support import attention_block_from_start, block_scratch, close_in_bf16, rope_tables
from gptoss_stream.engine import _lib, kernels
from gptoss_stream.weights.checkpoint import Checkpoint
from gptoss_stream.weights.config import layer_capacity

U32 = 2.0**-24
lib = _lib.lib


def to_bf16(x) -> np.ndarray:
    return nr.f32_to_bf16(np.asarray(x, dtype=np.float32))


def from_bf16(b: np.ndarray) -> np.ndarray:
    return nr.bf16_to_f32(b)


def random_bf16(rng, shape, scale=1.0) -> np.ndarray:
    return to_bf16(rng.standard_normal(shape) * scale)


# ---------------------------------------------------------------- numpy twins


def quantize_twin(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """gptoss.h's rule in numpy: fp32 amax / 127 rounded to fp16 (numpy rounds float32 -> float16 to nearest
    even), q = clamp(rint(w / scale), -127, 127) with the fp32 quotient, q = 0 where the scale is 0."""
    n, k = w.shape
    f = from_bf16(w).reshape(n, k // 32, 32)
    amax = np.abs(f).max(axis=2)
    with np.errstate(over="ignore"):
        half = (amax / np.float32(127)).astype(np.float16)
    s = half.astype(np.float32)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        qf = np.where(s == 0, np.float32(0), np.rint(f / np.where(s == 0, np.float32(1), s)))
    q = np.clip(qf, -127, 127).astype(np.int8)
    return q.reshape(n, k), half.view(np.uint16)


def dequantize_twin(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The exact fp32 weights q * scale [n, k]."""
    s = scales.view(np.float16).astype(np.float32)
    return q.astype(np.float32) * np.repeat(s, 32, axis=1)


def matmul_twin(x: np.ndarray, q: np.ndarray, scales: np.ndarray, bias) -> tuple[np.ndarray, np.ndarray]:
    """Exact y (float64) and sum |x||w| + |b| for the tolerance, for the weights the selected path multiplies:
    the exact q * scale, except for m > 8 on the AVX-512 path, whose oneDNN bf16 tiles round them to bf16."""
    w = dequantize_twin(q, scales)
    if x.shape[0] > 8 and kernels.get_isa() == "avx512":
        w = from_bf16(to_bf16(w))
    xf, wf = from_bf16(x).astype(np.float64), w.astype(np.float64)
    exact, magnitude = xf @ wf.T, np.abs(xf) @ np.abs(wf).T
    if bias is not None:
        exact += from_bf16(bias)
        magnitude += np.abs(from_bf16(bias))
    return exact, magnitude


def bf16_ulp(x: np.ndarray) -> np.ndarray:
    e = np.floor(np.log2(np.maximum(np.abs(x), 2.0**-126)))
    return 2.0 ** (e - 7)


def assert_matches(y: np.ndarray, exact: np.ndarray, magnitude: np.ndarray, k: int) -> None:
    sum_error = 1.01 * (k + 2) * U32 * magnitude
    if y.dtype == np.uint16:
        got = from_bf16(y).astype(np.float64)
        ref = from_bf16(to_bf16(exact)).astype(np.float64)
        tol = bf16_ulp(np.maximum(np.abs(got), np.abs(exact))) + sum_error
    else:
        got, ref, tol = y.astype(np.float64), exact, sum_error
    err = np.abs(got - ref)
    worst = np.unravel_index(np.argmax(err - tol), err.shape)
    assert np.all(err <= tol), f"at {worst}: got {got[worst]}, expected {ref[worst]} (tolerance {tol[worst]})"


# ---------------------------------------------------------------- quantize


def test_quantize_matches_twin_bit_for_bit():
    rng = np.random.default_rng(1)
    # rows of very different magnitudes, so scales cover normal and subnormal fp16
    w = to_bf16(rng.standard_normal((70, 320)) * np.logspace(-7, 5, 70)[:, None])
    q, scales = kernels.quantize_q8(w)
    want_q, want_s = quantize_twin(w)
    np.testing.assert_array_equal(scales, want_s)
    np.testing.assert_array_equal(q, want_q)
    assert q.min() >= -127 and q.max() <= 127 and np.abs(q).max() == 127


def test_quantize_ties_round_to_even_and_hand_values():
    # scale 2^-4 exactly (amax 127 / 16 = 7.9375 -> 7.9375 / 127 = 0.0625 = fp16 0x2C00)
    s = 0.0625
    block = np.zeros(32, np.float32)
    block[0] = 127 * s
    block[1:9] = np.array([2.5, 3.5, -2.5, -3.5, 0.5, 1.5, -0.5, 126.5]) * s
    block[9] = -127 * s
    q, scales = kernels.quantize_q8(to_bf16(block)[None, :])
    assert scales[0, 0] == 0x2C00
    np.testing.assert_array_equal(q[0, :10], [127, 2, 4, -2, -4, 0, 2, 0, 126, -127])
    assert not q[0, 10:].any()


def test_quantize_zero_tiny_and_subnormal_scale_blocks():
    w = np.zeros((1, 128), np.float32)
    w[0, 32:64] = -0.0                       # negative zeros: scale 0, q 0
    w[0, 64] = 1e-9                          # amax / 127 rounds to fp16 zero: scale 0, q 0
    w[0, 65] = -1e-9
    w[0, 96] = 1e-5                          # subnormal fp16 scale (2^-24 steps): q clamps at 127
    w[0, 97] = -3e-7
    bits = to_bf16(w)
    q, scales = kernels.quantize_q8(bits)
    want_q, want_s = quantize_twin(bits)
    np.testing.assert_array_equal(q, want_q)
    np.testing.assert_array_equal(scales, want_s)
    assert scales[0, 0] == 0 and scales[0, 1] == 0 and scales[0, 2] == 0 and not q[0, :96].any()
    assert 0 < scales[0, 3] < 0x0400  # subnormal
    assert q[0, 96] == 127


def test_quantize_largest_scale_and_refusals():
    ok = np.zeros((1, 32), np.float32)
    ok[0, 0] = 8290304.0  # / 127 = 65278: fits fp16
    q, scales = kernels.quantize_q8(to_bf16(ok))
    np.testing.assert_array_equal(scales, quantize_twin(to_bf16(ok))[1])
    assert q[0, 0] == 127
    for bad in (1e7, np.inf, -np.inf, np.nan):  # 1e7 / 127 > 65520: the fp16 scale would be inf
        w = np.zeros((2, 64), np.float32)
        w[1, 40] = bad
        with pytest.raises(_lib.KernelError, match="out of range|range"):
            kernels.quantize_q8(to_bf16(w))


def test_quantize_fills_given_outputs_and_checks_them():
    rng = np.random.default_rng(2)
    w = random_bf16(rng, (5, 64))
    q, s = np.zeros((5, 64), np.int8), np.zeros((5, 2), np.uint16)
    rq, rs = kernels.quantize_q8(w, q, s)
    assert rq is q and rs is s
    np.testing.assert_array_equal(q, quantize_twin(w)[0])
    with pytest.raises(ValueError):
        kernels.quantize_q8(w, np.zeros((5, 64), np.uint8))
    with pytest.raises(ValueError):
        kernels.quantize_q8(random_bf16(rng, (5, 48)))  # k not a multiple of 32
    with pytest.raises(ValueError):
        kernels.quantize_q8(w.astype(np.float32))


# ---------------------------------------------------------------- dequantize


def test_dequantize_rows_is_bf16_of_exact_values():
    rng = np.random.default_rng(3)
    q, s = kernels.quantize_q8(random_bf16(rng, (40, 96), 3.0))
    rows = np.array([39, 0, 7, 7, 20], np.int64)
    got = kernels.dequantize_q8_rows(q, s, rows)
    np.testing.assert_array_equal(got, to_bf16(dequantize_twin(q, s)[rows]))
    full = kernels.dequantize_q8_rows(q, s, np.arange(40, dtype=np.int64))
    np.testing.assert_array_equal(full, to_bf16(dequantize_twin(q, s)))


def test_dequantize_refuses_bad_rows_before_writing():
    q, s = np.ones((4, 32), np.int8), np.full((4, 1), 0x3C00, np.uint16)
    out = np.full((2, 32), 0x1234, np.uint16)
    for rows in ([0, 4], [-1, 0]):
        with pytest.raises(_lib.KernelError):
            kernels.dequantize_q8_rows(q, s, np.array(rows, np.int64), out=out)
        assert np.all(out == 0x1234)
    with pytest.raises(ValueError):
        kernels.dequantize_q8_rows(q, s, np.array([0], np.int32))
    with pytest.raises(ValueError):
        kernels.dequantize_q8_rows(q, np.zeros((4, 2), np.uint16), np.array([0], np.int64))


# ---------------------------------------------------------------- matmul

pytest_paths = pytest.mark.usefixtures("compute_path")

SMALL = [(m, n, k, b, t) for m in (1, 2, 3, 4, 5, 6, 7, 8, 9, 37) for n, k in [(37, 96), (1, 32), (130, 64)]
         for b in (False, True) for t in (np.uint16, np.float32)]
LARGE = [(1, 5120, 2880, True, np.uint16), (1, 2880, 4096, False, np.float32), (8, 640, 2880, True, np.uint16),
         (40, 2880, 640, False, np.float32)]


def q8_weights(rng, n, k, scale=1.0):
    return kernels.quantize_q8(random_bf16(rng, (n, k), scale))


@pytest_paths
@pytest.mark.parametrize("m, n, k, with_bias, out_dtype", SMALL + LARGE)
def test_matmul_q8_against_twin(m, n, k, with_bias, out_dtype):
    rng = np.random.default_rng(m * 7 + n + k)
    x = random_bf16(rng, (m, k))
    q, s = q8_weights(rng, n, k, 0.05)
    bias = random_bf16(rng, n) if with_bias else None
    y = kernels.matmul_q8(x, q, s, bias, out_dtype=out_dtype)
    assert y.dtype == out_dtype and y.shape == (m, n)
    assert_matches(y, *matmul_twin(x, q, s, bias), k)


@pytest_paths
@pytest.mark.parametrize("m", [1, 3, 8, 12])
@pytest.mark.parametrize("out_dtype", [np.uint16, np.float32])
def test_matmul_q8_strided_input_and_output(m, out_dtype):
    rng = np.random.default_rng(11 + m)
    n, k = 70, 96
    x_wide = random_bf16(rng, (m, k + 29))
    x = x_wide[:, 13:13 + k]
    q, s = q8_weights(rng, n, k)
    bias = random_bf16(rng, n)
    sentinel = np.uint16(0x7F7F) if out_dtype == np.uint16 else np.float32(-1234.5)
    y_wide = np.full((m, n + 50), sentinel, dtype=out_dtype)
    y = y_wide[:, 20:20 + n]
    kernels.matmul_q8(x, q, s, bias, out=y)
    assert_matches(y, *matmul_twin(np.ascontiguousarray(x), q, s, bias), k)
    assert np.all(y_wide[:, :20] == sentinel) and np.all(y_wide[:, 20 + n:] == sentinel)


@pytest_paths
def test_matmul_q8_zero_and_subnormal_scales():
    """Blocks with scale 0 contribute nothing; subnormal fp16 scales are widened exactly."""
    rng = np.random.default_rng(5)
    w = from_bf16(random_bf16(rng, (16, 128)))
    w[:, :32] = 0
    w[::2, 32:64] *= 1e-4  # tiny blocks: subnormal fp16 scales
    q, s = kernels.quantize_q8(to_bf16(w))
    assert (s[:, 0] == 0).all() and (s[::2, 1] < 0x0400).all()
    for m in (1, 10):
        x = random_bf16(rng, (m, 128))
        assert_matches(kernels.matmul_q8(x, q, s, out_dtype=np.float32), *matmul_twin(x, q, s, None), 128)


def test_matmul_q8_paths_and_thread_counts_agree():
    """Every path and thread count within the same bound of the twin (a per-path kernel bug cannot hide)."""
    rng = np.random.default_rng(12)
    q, s = q8_weights(rng, 300, 640)
    saved_isa, saved_threads = kernels.get_isa(), kernels.get_num_threads()
    paths = ["scalar", "avx2", "avx512"]
    paths = paths[: paths.index(kernels.detect_isa()) + 1]
    try:
        for path in paths:
            kernels.set_isa(path)
            for threads in (1, 2):
                kernels.set_num_threads(threads)
                for m in (1, 5, 12):
                    x = random_bf16(rng, (m, 640))
                    assert_matches(kernels.matmul_q8(x, q, s, out_dtype=np.float32), *matmul_twin(x, q, s, None), 640)
    finally:
        kernels.set_isa(saved_isa)
        kernels.set_num_threads(saved_threads)


def test_matmul_q8_python_checks():
    rng = np.random.default_rng(13)
    x = random_bf16(rng, (2, 64))
    q, s = q8_weights(rng, 8, 64)
    with pytest.raises(ValueError):
        kernels.matmul_q8(x, q.view(np.uint8), s)
    with pytest.raises(ValueError):
        kernels.matmul_q8(x, q, s[:, :1])
    with pytest.raises(ValueError):
        kernels.matmul_q8(random_bf16(rng, (2, 32)), q, s)
    with pytest.raises(ValueError):
        kernels.matmul_q8(x, q, s, bias=random_bf16(rng, 7))
    with pytest.raises(ValueError):
        kernels.matmul_q8(x, q, s, out=np.zeros((2, 8), np.float64))


def test_c_refusals():
    """The C functions refuse bad arguments themselves (not only the wrappers), writing nothing."""
    x = np.zeros((2, 64), np.uint16)
    q, s = np.zeros((8, 64), np.int8), np.zeros((8, 2), np.uint16)
    y = np.full((2, 8), 0x1234, np.uint16)
    P = lambda a: a.ctypes.data  # noqa: E731
    BF16, F32 = _lib.DTYPE_BF16, _lib.DTYPE_F32
    NULL, SIZE, RANGE = 1, 2, 3
    mm = lib.gptoss_matmul_q8
    assert mm(None, 2, 64, 64, P(q), P(s), 8, None, P(y), 8, BF16) == NULL
    assert mm(P(x), 2, 64, 64, None, P(s), 8, None, P(y), 8, BF16) == NULL
    assert mm(P(x), 2, 64, 64, P(q), None, 8, None, P(y), 8, BF16) == NULL
    assert mm(P(x), 2, 64, 64, P(q), P(s), 8, None, None, 8, BF16) == NULL
    assert mm(P(x), 2, 48, 64, P(q), P(s), 8, None, P(y), 8, BF16) == SIZE  # k % 32
    assert mm(P(x), 2, 64, 63, P(q), P(s), 8, None, P(y), 8, BF16) == SIZE  # ldx < k
    assert mm(P(x), 2, 64, 64, P(q), P(s), 8, None, P(y), 7, BF16) == SIZE  # ldy < n
    assert mm(P(x), 0, 64, 64, P(q), P(s), 8, None, P(y), 8, BF16) == SIZE
    assert mm(P(x), 2, 64, 64, P(q), P(s), 0, None, P(y), 8, BF16) == SIZE
    assert mm(P(x), 2, 64, 64, P(q), P(s), 8, None, P(y), 8, 7) == RANGE
    huge = ctypes.c_size_t(-1).value // 2
    assert mm(P(x), 2, 64, 64, P(q), P(s), huge, None, P(y), huge, F32) == SIZE
    assert np.all(y == 0x1234)
    w = np.zeros((8, 64), np.uint16)
    assert lib.gptoss_quantize_q8_rows(None, 8, 64, P(q), P(s)) == NULL
    assert lib.gptoss_quantize_q8_rows(P(w), 8, 40, P(q), P(s)) == SIZE
    assert lib.gptoss_quantize_q8_rows(P(w), 0, 64, P(q), P(s)) == SIZE
    rows = np.array([0, 8], np.int64)
    out = np.zeros((2, 64), np.uint16)
    assert lib.gptoss_dequantize_q8_rows(P(q), P(s), 8, 64, P(rows), 2, P(out)) == RANGE
    assert lib.gptoss_dequantize_q8_rows(P(q), P(s), 8, 64, None, 2, P(out)) == NULL
    assert lib.gptoss_dequantize_q8_rows(P(q), P(s), 8, 48, P(rows), 1, P(out)) == SIZE


# ---------------------------------------------------------------- the attention block with q8 projections

RNG = np.random.default_rng(21)


@pytest.fixture(scope="module")
def original(tiny_checkpoint):
    # q, k, v as one tensor: the q8 layout quantizes the fused projection
    with Checkpoint.open(tiny_checkpoint / "original") as ckpt:
        yield ckpt


def q8_layer(ckpt, layer, qkv: bool, out: bool):
    """The layer's attention weights with the chosen projections quantized, as AttentionWeights and as a dict."""
    cfg, w = ckpt.config, ckpt.layer(layer)
    args = dict(norm=w.attn_norm, sinks=w.sinks, out_bias=w.out_bias, qkv_bias=w.qkv_bias, out_weight=w.out_weight,
                qkv_weight=w.qkv_weight)
    if qkv:
        args["qkv_q8"], args["qkv_scales"] = kernels.quantize_q8(w.qkv_weight)
        args["qkv_weight"] = None
    if out:
        args["out_q8"], args["out_scales"] = kernels.quantize_q8(w.out_weight)
        args["out_weight"] = None
    weights = kernels.AttentionWeights(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                                       cfg.head_dim, **args)
    return weights, args


def block_by_kernels(ckpt, args, x, k_cache, v_cache, first_position, window, inv_freq, concentration):
    cfg = ckpt.config
    m, nq, nkv, hd = x.shape[0], cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    t = kernels.rmsnorm(x, args["norm"], cfg.rms_norm_eps)
    if args.get("qkv_q8") is not None:
        qkv = kernels.matmul_q8(t, args["qkv_q8"], args["qkv_scales"], args["qkv_bias"])
    else:
        qkv = kernels.matmul(t, args["qkv_weight"], args["qkv_bias"])
    q, k, v = qkv[:, :nq * hd], qkv[:, nq * hd:(nq + nkv) * hd], qkv[:, (nq + nkv) * hd:]
    positions = np.arange(first_position, first_position + m, dtype=np.int64)
    kernels.rope_apply_(q, nq, hd, positions, inv_freq, concentration)
    kernels.rope_apply_(k, nkv, hd, positions, inv_freq, concentration)
    kernels.kv_store(k, v, k_cache, v_cache, first_position)
    attn = kernels.attention(q, nq, k_cache, v_cache, first_position, window, args["sinks"], 1 / np.sqrt(hd))
    if args.get("out_q8") is not None:
        proj = kernels.matmul_q8(attn, args["out_q8"], args["out_scales"], args["out_bias"])
    else:
        proj = kernels.matmul(attn, args["out_weight"], args["out_bias"])
    kernels.add_(x, proj)


@pytest_paths
@pytest.mark.parametrize("qkv,out", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("m,first_position", [(1, 0), (1, 200), (7, 150), (33, 0)])
def test_attention_block_q8_is_the_kernel_sequence(original, qkv, out, layer, m, first_position):
    cfg = original.config
    window = cfg.sliding_window if cfg.is_sliding(layer) else 0
    capacity = layer_capacity(cfg, layer, 512, 64)
    inv_freq, concentration = rope_tables(cfg)
    k_cache = to_bf16(RNG.standard_normal((capacity, cfg.num_key_value_heads, cfg.head_dim)))
    v_cache = to_bf16(RNG.standard_normal((capacity, cfg.num_key_value_heads, cfg.head_dim)))
    x = to_bf16(RNG.standard_normal((m, cfg.hidden_size)))
    weights, args = q8_layer(original, layer, qkv, out)
    want_x, want_k, want_v = x.copy(), k_cache.copy(), v_cache.copy()
    block_by_kernels(original, args, want_x, want_k, want_v, first_position, window, inv_freq, concentration)
    scratch = block_scratch(cfg, m)
    kernels.attention_block(x, weights, cfg.rms_norm_eps, inv_freq, concentration, 1 / np.sqrt(cfg.head_dim),
                            k_cache, v_cache, first_position, window, scratch)
    np.testing.assert_array_equal(x, want_x)
    np.testing.assert_array_equal(k_cache, want_k)
    np.testing.assert_array_equal(v_cache, want_v)


class _DequantizedCheckpoint:
    """What numpy_reference reads (config, layer(i)), with the attention projections replaced by the exact fp32
    values of their q8 form: the reference then computes the block the q8 engine should compute."""

    def __init__(self, ckpt, args):
        self.config = ckpt.config
        self._layer, self._args = ckpt.layer, args

    def layer(self, i):
        w, a, cfg = self._layer(i), self._args, self.config
        nq, nkv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        qkv = dequantize_twin(a["qkv_q8"], a["qkv_scales"])
        out = dequantize_twin(a["out_q8"], a["out_scales"])
        return types.SimpleNamespace(
            attn_norm=w.attn_norm, sinks=w.sinks, q_weight=qkv[:nq], k_weight=qkv[nq:nq + nkv],
            v_weight=qkv[nq + nkv:], q_bias=w.qkv_bias[:nq], k_bias=w.qkv_bias[nq:nq + nkv],
            v_bias=w.qkv_bias[nq + nkv:], out_weight=out, out_bias=w.out_bias)


@pytest.mark.parametrize("layer", [0, 1])
def test_attention_block_q8_matches_numpy_reference(original, layer):
    cfg = original.config
    m = 9
    x = to_bf16(RNG.standard_normal((m, cfg.hidden_size)))
    weights, args = q8_layer(original, layer, True, True)
    want = nr.attention_block(_DequantizedCheckpoint(original, args), layer, from_bf16(x), np.arange(m))
    attention_block_from_start(cfg, layer, x, weights)
    assert close_in_bf16(x, want)


def test_attention_weights_q8_checks(original):
    cfg, w = original.config, original.layer(0)
    dims = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
    q, s = kernels.quantize_q8(w.qkv_weight)
    oq, os_ = kernels.quantize_q8(w.out_weight)
    base = dict(norm=w.attn_norm, sinks=w.sinks, out_weight=w.out_weight, out_bias=w.out_bias, qkv_bias=w.qkv_bias)
    kernels.AttentionWeights(*dims, **base, qkv_q8=q, qkv_scales=s)  # accepted
    with pytest.raises(ValueError, match="qkv_weight"):
        kernels.AttentionWeights(*dims, **base, qkv_q8=q, qkv_scales=s, qkv_weight=w.qkv_weight)
    with pytest.raises(ValueError, match="give both"):
        kernels.AttentionWeights(*dims, **base, qkv_q8=q)
    with pytest.raises(ValueError, match="expected shape"):
        kernels.AttentionWeights(*dims, **base, qkv_q8=oq, qkv_scales=os_)
    with pytest.raises(ValueError, match="out_weight"):
        kernels.AttentionWeights(*dims, **base, qkv_q8=q, qkv_scales=s, out_q8=oq, out_scales=os_)
    no_out = dict(base, out_weight=None)
    kernels.AttentionWeights(*dims, **no_out, qkv_q8=q, qkv_scales=s, out_q8=oq, out_scales=os_)
    with pytest.raises(ValueError, match="out_weight: missing"):
        kernels.AttentionWeights(*dims, **no_out, qkv_q8=q, qkv_scales=s)


def test_attention_block_c_refuses_mixed_weights(original):
    """The C block itself refuses a bf16 weight beside its q8 one and q8 without scales."""
    cfg, w = original.config, original.layer(0)
    q, s = kernels.quantize_q8(w.qkv_weight)
    P = lambda a: None if a is None else a.ctypes.data  # noqa: E731
    m = 1
    x = np.zeros((m, cfg.hidden_size), np.uint16)
    inv_freq, concentration = rope_tables(cfg)
    cache = np.zeros((64, cfg.num_key_value_heads, cfg.head_dim), np.uint16)
    scratch = block_scratch(cfg, m)
    base = dict(norm=P(w.attn_norm), sinks=P(w.sinks), out_weight=P(w.out_weight), qkv_q8=P(q), qkv_scales=P(s))
    for changes, status in ((dict(qkv_weight=P(w.qkv_weight)), 3), (dict(qkv_scales=None), 1),
                            (dict(out_q8=P(q)), 1), (dict(out_q8=P(q), out_scales=P(s)), 3),
                            (dict(out_weight=None), 1)):
        struct, address = _lib.attention_weights(**(base | changes))
        got = lib.gptoss_attention_block(P(x), m, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                                         cfg.head_dim, address, 1e-5, P(inv_freq), concentration, 0.125, P(cache),
                                         P(cache), 64, 0, 0, P(scratch), scratch.size)
        assert got == status, changes
