"""libgptoss ops.c (RMSNorm, residual adds, SwiGLU, router top-k softmax, MoE scatter-add) against numpy.

Each kernel computes in fp32 and rounds once to bf16, so against an exact (float64) reference its error is at
most half a bf16 ulp (<= 2^-8 relative) plus a few fp32 roundings: BF16_HALF_ULP + FP32_SLOP below.
Where the kernel is a single fp32 operation (the adds) the reference repeats it in float32 and must match bit
for bit.
"""

from __future__ import annotations

import numpy as np
import pytest

from gptoss_stream.engine import _lib, kernels

BF16_HALF_ULP = 2.0**-8  # relative rounding error of one round-to-nearest to bf16 (8 significant bits)
FP32_SLOP = 1e-5  # relative error of a few fp32 operations (and a 2880-term fp32 sum), far above 2^-24 each


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float -> bf16 bit patterns, round to nearest even (NaN stays NaN)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


def from_bf16(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


def random_bf16(rng: np.random.Generator, shape, scale: float = 1.0) -> np.ndarray:
    return to_bf16(rng.standard_normal(shape) * scale)


def assert_bf16_close(actual_bf16: np.ndarray, exact: np.ndarray, atol: float = 0.0) -> None:
    """actual is exact rounded to bf16, up to fp32 slop; NaNs must be in the same places."""
    actual = from_bf16(actual_bf16).astype(np.float64)
    exact = np.asarray(exact, dtype=np.float64)
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(exact))
    ok = ~np.isnan(exact)
    err = np.abs(actual[ok] - exact[ok])
    tol = np.abs(exact[ok]) * (BF16_HALF_ULP + FP32_SLOP) + atol
    worst = np.argmax(err - tol) if err.size else 0
    assert np.all(err <= tol), f"max excess error at {worst}: got {actual[ok][worst]}, expected {exact[ok][worst]}"


# ---------------------------------------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------------------------------------


def rmsnorm_reference(x: np.ndarray, scale: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    x = from_bf16(x).astype(np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * from_bf16(scale)


@pytest.mark.parametrize("magnitude", [1.0, 1e-10, 1e-3, 1e4, 1e15])
def test_rmsnorm_matches_reference_across_magnitudes(magnitude: float) -> None:
    rng = np.random.default_rng(1)
    x = random_bf16(rng, (5, 2880), magnitude)
    scale = to_bf16(rng.uniform(0.5, 2.0, 2880))
    assert_bf16_close(kernels.rmsnorm(x, scale), rmsnorm_reference(x, scale))


def test_rmsnorm_rows_are_independent_and_in_place_works() -> None:
    rng = np.random.default_rng(2)
    # Rows of very different size: a shared (wrong) normaliser would be off by orders of magnitude.
    x = np.concatenate([random_bf16(rng, (1, 64), s) for s in (1e-6, 1.0, 1e6)])
    scale = random_bf16(rng, 64)
    expected = rmsnorm_reference(x, scale)
    assert_bf16_close(kernels.rmsnorm(x.copy(), scale), expected)
    kernels.rmsnorm(x, scale, out=x)  # y may alias x
    assert_bf16_close(x, expected)


def test_rmsnorm_overflowing_square_behaves_like_fp32_torch() -> None:
    # |x| ~ 1e20: x^2 overflows fp32, the mean is inf and the row becomes 0, as in the fp32 reference. Pinned
    # here so that a change (say, to a float64 sum) is a decision rather than an accident.
    x = to_bf16(np.full((1, 16), 1e20))
    scale = to_bf16(np.ones(16))
    assert np.all(from_bf16(kernels.rmsnorm(x, scale)) == 0.0)


# ---------------------------------------------------------------------------------------------------------
# Residual adds
# ---------------------------------------------------------------------------------------------------------


def test_add_is_one_fp32_add_rounded_to_bf16() -> None:
    rng = np.random.default_rng(3)
    x = random_bf16(rng, (7, 2880), 10.0)
    y = random_bf16(rng, (7, 2880), 1e-2)
    expected = to_bf16(from_bf16(x) + from_bf16(y))  # float32 + float32, as in the kernel
    np.testing.assert_array_equal(kernels.add_(x, y), expected)


def test_add_f32_rounds_the_moe_output_before_adding() -> None:
    rng = np.random.default_rng(4)
    x = random_bf16(rng, 4096)
    acc = (rng.standard_normal(4096) * 3).astype(np.float32)
    expected = to_bf16(from_bf16(x) + from_bf16(to_bf16(acc)))
    np.testing.assert_array_equal(kernels.add_f32_(x, acc), expected)
    # A case where the order matters: acc = 2^-8 + 2^-20 rounds to 2^-8 in bf16, and 1 + 2^-8 is a tie that
    # rounds to even (1.0); adding the unrounded acc would give 1 + 2^-7 instead.
    x = to_bf16(np.array([1.0]))
    np.testing.assert_array_equal(from_bf16(kernels.add_f32_(x, np.array([2.0**-8 + 2.0**-20], np.float32))), [1.0])


# ---------------------------------------------------------------------------------------------------------
# SwiGLU
# ---------------------------------------------------------------------------------------------------------


def swiglu_reference(h: np.ndarray, limit: float = 7.0, alpha: float = 1.702) -> np.ndarray:
    h = from_bf16(h).astype(np.float64)
    glu, lin = h[:, 0::2], h[:, 1::2]
    # np.where rather than np.minimum/np.clip keeps the NaN semantics explicit: a NaN input stays NaN.
    glu = np.where(glu > limit, limit, glu)
    lin = np.where(lin > limit, limit, np.where(lin < -limit, -limit, lin))
    with np.errstate(over="ignore", invalid="ignore"):
        return glu / (1.0 + np.exp(-alpha * glu)) * (lin + 1.0)


def test_swiglu_random_values_deinterleave() -> None:
    rng = np.random.default_rng(5)
    h = random_bf16(rng, (6, 2 * 2880), 3.0)
    # Tiny absolute tolerance: very negative glu gives sigmoid underflow (exact ~1e-40, fp32 gives 0).
    assert_bf16_close(kernels.swiglu(h, limit=7.0), swiglu_reference(h), atol=1e-30)


def test_swiglu_around_the_clamp() -> None:
    edge = [0.0, 1.0, -1.0, 6.96875, 7.0, 7.03125, 8.0, 100.0, -6.96875, -7.0, -7.03125, -8.0, -100.0, -50.0]
    glu, lin = np.meshgrid(np.array(edge), np.array(edge), indexing="ij")
    h = to_bf16(np.stack([glu.ravel(), lin.ravel()], axis=-1).reshape(1, -1))
    out = kernels.swiglu(h, limit=7.0)
    assert_bf16_close(out, swiglu_reference(h), atol=1e-30)
    # glu above the limit is clamped to it: out(8, lin) == out(7, lin), and the same for lin.
    table = from_bf16(out).reshape(len(edge), len(edge))
    np.testing.assert_array_equal(table[edge.index(8.0)], table[edge.index(7.0)])
    np.testing.assert_array_equal(table[:, edge.index(-8.0)], table[:, edge.index(-7.0)])
    np.testing.assert_array_equal(table[:, edge.index(100.0)], table[:, edge.index(7.0)])
    # lin = -1 zeroes the output whatever glu is.
    assert np.all(table[:, edge.index(-1.0)] == 0.0)


def test_swiglu_nan_and_inf_follow_torch_clamp() -> None:
    nan, inf = np.nan, np.inf
    pairs = [(nan, 1.0), (1.0, nan), (inf, 1.0), (1.0, inf), (1.0, -inf), (-inf, 1.0)]
    h = to_bf16(np.array(pairs).reshape(1, -1))
    out = from_bf16(kernels.swiglu(h, limit=7.0))
    assert np.isnan(out[0, 0]) and np.isnan(out[0, 1])  # NaN propagates through min/clamp
    assert out[0, 2] == from_bf16(kernels.swiglu(to_bf16(np.array([[7.0, 1.0]])), 7.0))[0, 0]  # +inf -> 7
    assert out[0, 3] == from_bf16(kernels.swiglu(to_bf16(np.array([[1.0, 7.0]])), 7.0))[0, 0]  # lin +inf -> 7
    assert out[0, 4] == from_bf16(kernels.swiglu(to_bf16(np.array([[1.0, -7.0]])), 7.0))[0, 0]
    assert np.isnan(out[0, 5])  # -inf * sigmoid(-inf) = -inf * 0, as in torch
    assert_bf16_close(kernels.swiglu(h, limit=7.0), swiglu_reference(h))


# ---------------------------------------------------------------------------------------------------------
# Router: top-k softmax
# ---------------------------------------------------------------------------------------------------------


def topk_softmax_reference(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    values = from_bf16(logits).astype(np.float64)
    indices = np.argsort(-values, axis=-1, kind="stable")[:, :k]  # stable: ties keep the lower index first
    top = np.take_along_axis(values, indices, axis=-1)
    weights = np.exp(top - top[:, :1])
    return indices, weights / weights.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("n_experts,k", [(32, 4), (128, 4), (8, 1), (6, 6)])
def test_topk_softmax_random(n_experts: int, k: int) -> None:
    rng = np.random.default_rng(6)
    logits = random_bf16(rng, (50, n_experts), 2.0)
    indices, weights = kernels.topk_softmax(logits, k)
    ref_indices, ref_weights = topk_softmax_reference(logits, k)
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_allclose(weights, ref_weights, rtol=1e-6, atol=1e-7)


def test_topk_softmax_ties_take_the_lower_index_first() -> None:
    rng = np.random.default_rng(7)
    # Logits from a handful of values: every row is full of ties, including 0.0 against -0.0.
    logits = to_bf16(rng.choice([-1.0, -0.0, 0.0, 0.5, 2.0], size=(200, 32)))
    indices, weights = kernels.topk_softmax(logits, 4)
    ref_indices, ref_weights = topk_softmax_reference(logits, 4)
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_allclose(weights, ref_weights, rtol=1e-6)
    equal_row = to_bf16(np.ones((1, 8)))
    np.testing.assert_array_equal(kernels.topk_softmax(equal_row, 4)[0], [[0, 1, 2, 3]])
    np.testing.assert_allclose(kernels.topk_softmax(equal_row, 4)[1], 0.25, rtol=1e-7)


def test_topk_softmax_nan_ranks_first_and_poisons_the_weights() -> None:
    # As torch.topk: a NaN logit is "largest", so a broken router shows up as NaN weights, never as a bad index.
    logits = to_bf16(np.array([[1.0, np.nan, 3.0, 2.0, 0.0]]))
    indices, weights = kernels.topk_softmax(logits, 3)
    np.testing.assert_array_equal(indices, [[1, 2, 3]])
    assert np.all(np.isnan(weights))


# ---------------------------------------------------------------------------------------------------------
# MoE combine: scatter-add
# ---------------------------------------------------------------------------------------------------------


def test_scatter_add_weighted_with_repeated_rows() -> None:
    rng = np.random.default_rng(8)
    acc = rng.standard_normal((4, 2880)).astype(np.float32)
    y = random_bf16(rng, (7, 2880))
    rows = np.array([0, 2, 2, 3, 2, 0, 3], dtype=np.int32)  # row 2 three times, row 1 never
    weights = rng.uniform(0, 1, 7).astype(np.float32)
    expected = acc.astype(np.float64)
    for i, row in enumerate(rows):
        expected[row] += np.float64(weights[i]) * from_bf16(y[i])
    untouched = acc[1].copy()
    kernels.scatter_add_weighted(acc, y, rows, weights)
    np.testing.assert_allclose(acc, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(acc[1], untouched)


# ---------------------------------------------------------------------------------------------------------
# Bad input: the Python wrapper's checks, then the C library's own (called directly through _lib)
# ---------------------------------------------------------------------------------------------------------


def test_wrappers_reject_bad_arguments() -> None:
    x = np.zeros((2, 8), dtype=np.uint16)
    with pytest.raises(ValueError, match="scale"):
        kernels.rmsnorm(x, np.zeros(7, dtype=np.uint16))
    with pytest.raises(ValueError, match="dtype"):
        kernels.rmsnorm(x.astype(np.float32), np.zeros(8, dtype=np.uint16))
    with pytest.raises(ValueError, match="even"):
        kernels.swiglu(np.zeros((2, 7), dtype=np.uint16), limit=7.0)
    with pytest.raises(ValueError, match="k=9"):
        kernels.topk_softmax(x, 9)
    with pytest.raises(ValueError, match="disagree"):
        kernels.scatter_add_weighted(np.zeros((2, 8), np.float32), x, np.zeros(3, np.int32), np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="shapes differ"):
        kernels.add_(x, np.zeros((2, 9), dtype=np.uint16))


def _expect_status(status: int, name: str, *args) -> None:
    with pytest.raises(_lib.KernelError, match=name) as info:
        _lib.call(name, *args)
    assert info.value.status == status, _lib.status_string(info.value.status)


NULL, BAD_SIZE, OUT_OF_RANGE = 1, 2, 3


def test_c_checks_reject_bad_arguments() -> None:
    x = np.zeros((2, 8), dtype=np.uint16)
    p = x.ctypes.data
    _expect_status(NULL, "gptoss_rmsnorm", None, p, 2, 8, 1e-5, p)
    _expect_status(BAD_SIZE, "gptoss_rmsnorm", p, p, 0, 8, 1e-5, p)
    _expect_status(BAD_SIZE, "gptoss_rmsnorm", p, p, 2**62, 2**62, 1e-5, p)  # m * d overflows
    _expect_status(OUT_OF_RANGE, "gptoss_rmsnorm", p, p, 2, 8, -1.0, p)  # negative eps
    _expect_status(NULL, "gptoss_add_bf16", p, None, 16)
    _expect_status(BAD_SIZE, "gptoss_add_bf16", p, p, 0)
    _expect_status(NULL, "gptoss_add_f32_to_bf16", p, None, 16)
    _expect_status(BAD_SIZE, "gptoss_swiglu", p, 2, 0, 7.0, 1.702, p)
    _expect_status(OUT_OF_RANGE, "gptoss_swiglu", p, 2, 4, float("nan"), 1.702, p)

    indices = np.zeros((2, 4), dtype=np.int32)
    weights = np.zeros((2, 4), dtype=np.float32)
    _expect_status(BAD_SIZE, "gptoss_topk_softmax", p, 2, 8, 9, indices.ctypes.data, weights.ctypes.data)
    _expect_status(BAD_SIZE, "gptoss_topk_softmax", p, 2, 8, 0, indices.ctypes.data, weights.ctypes.data)
    _expect_status(NULL, "gptoss_topk_softmax", p, 2, 8, 4, None, weights.ctypes.data)

    acc = np.ones((2, 8), dtype=np.float32)
    rows = np.array([0, 2], dtype=np.int32)
    w = np.ones(2, dtype=np.float32)
    _expect_status(OUT_OF_RANGE, "gptoss_scatter_add_weighted", acc.ctypes.data, 2, 8, p, 2, rows.ctypes.data,
                   w.ctypes.data)
    rows[1] = -1
    _expect_status(OUT_OF_RANGE, "gptoss_scatter_add_weighted", acc.ctypes.data, 2, 8, p, 2, rows.ctypes.data,
                   w.ctypes.data)
    # Validation happens before any write: row 0 was valid but must not have been touched.
    np.testing.assert_array_equal(acc, 1.0)
