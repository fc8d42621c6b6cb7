"""libgptoss matmul.c / gemv.c (bf16 and MXFP4-tiled matmuls) against a float64 numpy reference, on every
compute path this machine can run: bf16 oneDNN (avx512), fp32 register kernels for m <= 8 and fp32 oneDNN
tiles above (avx2, scalar).

Tolerances. The inputs are bf16, so every product x_i * w_i is exact in fp32 (8 x 8 significant bits) and
oneDNN's only errors are (a) the fp32 sum of k products plus the bias and (b) the final rounding to bf16. For
(a) the classic bound for any summation order is |fl(sum) - sum| <= gamma * sum_i |x_i w_i| with
gamma = n u / (1 - n u), n = k + 1 terms, u = 2^-24; we use 1.01 * (k + 1) u, which is above gamma for every
k here. For (b), the reference rounds the exact value to bf16 and the kernel rounds its fp32 value to bf16:
both are within half a bf16 ulp of what they round, so they can differ by one bf16 ulp (of the larger
magnitude) plus (a). fp32 outputs only carry (a). The bound is a worst case; a wrong layout, stride, bias or
tile offset produces errors of the size of the values themselves, far above it.

The fp32 paths multiply the same exact products and differ only in summation order, so the same bounds hold.

Comparing two oneDNN results with different tilings (matmul_mxfp4 against dequantize + matmul): each is
within (a) + half an ulp of the exact value, so they differ by at most one ulp plus twice (a).
"""

from __future__ import annotations

import numpy as np
import pytest

from gptoss_stream.engine import _lib, kernels

U32 = 2.0**-24  # fp32 unit roundoff

pytestmark = pytest.mark.usefixtures("compute_path")


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float -> bf16 bits, round to nearest even (inputs here are finite)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)


def from_bf16(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


def bf16_ulp(x: np.ndarray) -> np.ndarray:
    """Spacing of bf16 values at |x| (8 significant bits), floored at the smallest normal's spacing."""
    e = np.floor(np.log2(np.maximum(np.abs(x), 2.0**-126)))
    return 2.0 ** (e - 7)


def random_bf16(rng, shape, scale=1.0) -> np.ndarray:
    return to_bf16(rng.standard_normal(shape) * scale)


def reference(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Exact y = x w^T + b (float64; bf16 inputs make every product exact) and the bound's sum |x||w| + |b|."""
    xf, wf = from_bf16(x).astype(np.float64), from_bf16(w).astype(np.float64)
    exact = xf @ wf.T
    magnitude = np.abs(xf) @ np.abs(wf).T
    if bias is not None:
        exact += from_bf16(bias)
        magnitude += np.abs(from_bf16(bias))
    return exact, magnitude


def sum_error(k: int, magnitude: np.ndarray) -> np.ndarray:
    return 1.01 * (k + 1) * U32 * magnitude


def assert_matches(y: np.ndarray, exact: np.ndarray, magnitude: np.ndarray, k: int) -> None:
    if y.dtype == np.uint16:
        got = from_bf16(y).astype(np.float64)
        tol = bf16_ulp(np.maximum(np.abs(got), np.abs(exact))) + sum_error(k, magnitude)
        ref = from_bf16(to_bf16(exact)).astype(np.float64)
    else:
        got, ref = y.astype(np.float64), exact
        tol = sum_error(k, magnitude)
    err = np.abs(got - ref)
    worst = np.unravel_index(np.argmax(err - tol), err.shape)
    assert np.all(err <= tol), f"at {worst}: got {got[worst]}, expected {ref[worst]} (tolerance {tol[worst]})"


@pytest.fixture
def threads():
    saved = kernels.get_num_threads()
    yield kernels.set_num_threads
    kernels.set_num_threads(saved)


# ---------------------------------------------------------------------------------------------------------
# gptoss_matmul_bf16
# ---------------------------------------------------------------------------------------------------------


# m = 1..8 take the fp32 paths' register kernels (each row-blocking variant), 9 and 37 their oneDNN tiles.
SMALL = [(m, n, k, b, t) for m in (1, 2, 3, 4, 5, 8, 9, 37) for n, k in [(37, 96), (1, 32), (129, 33)] for b in (False, True)
         for t in (np.uint16, np.float32)]
LARGE = [(1, 5760, 2880, True, np.uint16), (37, 5760, 2880, False, np.float32),  # expert mlp1 shape
         (1, 2880, 5760, False, np.float32), (37, 2880, 5760, True, np.uint16)]


@pytest.mark.parametrize("m, n, k, with_bias, out_dtype", SMALL + LARGE)
def test_matmul_against_reference(m, n, k, with_bias, out_dtype):
    rng = np.random.default_rng(m * 7 + n + k)
    x, w = random_bf16(rng, (m, k)), random_bf16(rng, (n, k))
    bias = random_bf16(rng, n) if with_bias else None
    y = kernels.matmul(x, w, bias, out_dtype=out_dtype)
    assert y.dtype == out_dtype and y.shape == (m, n)
    assert_matches(y, *reference(x, w, bias), k)


@pytest.mark.parametrize("out_dtype", [np.uint16, np.float32])
def test_matmul_strided_input_and_output(out_dtype):
    """x and y are column slices of wider matrices (ldx > k, ldy > n); the columns around them stay put."""
    rng = np.random.default_rng(11)
    m, n, k = 37, 70, 96
    x_wide = random_bf16(rng, (m, k + 29))
    x = x_wide[:, 13:13 + k]
    w, bias = random_bf16(rng, (n, k)), random_bf16(rng, n)
    sentinel = np.array(0x7F7F, np.uint16).astype(out_dtype) if out_dtype == np.uint16 else np.float32(-1234.5)
    y_wide = np.full((m, n + 50), sentinel, dtype=out_dtype)
    y = y_wide[:, 20:20 + n]
    kernels.matmul(x, w, bias, out=y)
    assert_matches(y, *reference(np.ascontiguousarray(x), w, bias), k)
    assert np.all(y_wide[:, :20] == sentinel) and np.all(y_wide[:, 20 + n:] == sentinel)


def test_matmul_thread_counts_agree(threads):
    rng = np.random.default_rng(12)
    x, w = random_bf16(rng, (12, 640)), random_bf16(rng, (300, 640))
    exact, magnitude = reference(x, w, None)
    for n in (1, 2):
        threads(n)
        assert_matches(kernels.matmul(x, w, out_dtype=np.float32), exact, magnitude, 640)


def test_primitive_cache_reuse_and_clear():
    rng = np.random.default_rng(13)
    # m > 8, so the fp32 path also goes through oneDNN (smaller m takes its own register kernel there).
    x, w = random_bf16(rng, (10, 64)), random_bf16(rng, (40, 64))
    kernels.matmul_cache_clear()
    assert kernels.matmul_cache_size() == 0
    first = kernels.matmul(x, w)
    assert kernels.matmul_cache_size() == 1
    for _ in range(3):
        np.testing.assert_array_equal(kernels.matmul(x, w), first)  # same primitive, same bits
    assert kernels.matmul_cache_size() == 1
    # Another output dtype is another bf16 primitive; the fp32 path rounds its fp32 tiles itself.
    kernels.matmul(x, w, out_dtype=np.float32)
    kernels.matmul(x[:9], w)  # and another m is another primitive on both paths
    assert kernels.matmul_cache_size() == (3 if kernels.get_isa() == "avx512" else 2)
    kernels.matmul_cache_clear()
    assert kernels.matmul_cache_size() == 0
    np.testing.assert_array_equal(kernels.matmul(x, w), first)  # rebuilt after a clear


def test_cache_is_bounded():
    """Many shapes (prefill lengths) must not grow the cache without limit: it evicts, and still works."""
    rng = np.random.default_rng(14)
    w = random_bf16(rng, (8, 32))
    kernels.matmul_cache_clear()
    for m in range(1, 71):  # more shapes than the cache holds (64)
        kernels.matmul(random_bf16(rng, (m, 32)), w)
    size = kernels.matmul_cache_size()
    assert 0 < size < 70
    x = random_bf16(rng, (1, 32))
    assert_matches(kernels.matmul(x, w, out_dtype=np.float32), *reference(x, w, None), 32)
    kernels.matmul_cache_clear()


@pytest.mark.parametrize("m, n, k", [(1, 37, 96), (9, 129, 33), (64, 300, 256)])
def test_matmul_f32_against_reference(m, n, k):
    """The fp32 GEMM itself (what the fp32 path's tiles run): the same summation bound, no bf16 rounding."""
    rng = np.random.default_rng(m + n + k)
    x_wide = rng.standard_normal((m, k + 5)).astype(np.float32)
    x, w = x_wide[:, 2:2 + k], rng.standard_normal((n, k)).astype(np.float32)
    y = kernels.matmul_f32(x, w)
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    magnitude = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T
    # fp32 inputs: each product rounds too (one more u per term than bf16 inputs need).
    assert np.all(np.abs(y - exact) <= sum_error(2 * k, magnitude))
    with pytest.raises(ValueError):
        kernels.matmul_f32(x.astype(np.float64), w)


# ---------------------------------------------------------------------------------------------------------
# gptoss_matmul_mxfp4
# ---------------------------------------------------------------------------------------------------------


def random_mxfp4(rng, n, k):
    """Weights of realistic magnitude (scales around 2^-4 .. 2^1: values up to 12)."""
    blocks = rng.integers(0, 256, (n, k // 32, 16), dtype=np.uint8)
    scales = rng.integers(123, 129, (n, k // 32), dtype=np.uint8)
    return blocks, scales


# m = 1..8 cover every (m, rows per step) case of the register kernels, n = 37 their last, shorter step.
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 8, 37])
@pytest.mark.parametrize("n, k", [(5760, 2880), (2880, 2880), (37, 96)])
def test_matmul_mxfp4_equals_dequantize_then_matmul(m, n, k):
    rng = np.random.default_rng(m + n + k)
    blocks, scales = random_mxfp4(rng, n, k)
    x, bias = random_bf16(rng, (m, k)), random_bf16(rng, n)
    w = kernels.dequantize_mxfp4_rows(blocks, scales)
    two_step = kernels.matmul(x, w, bias)
    exact, magnitude = reference(x, w, bias)
    scratch = np.empty(4 * 256 * k, dtype=np.uint16)
    fused = kernels.matmul_mxfp4(x, blocks, scales, bias, scratch)
    assert_matches(fused, exact, magnitude, k)
    # Against the two-step result: one bf16 ulp plus both summation errors (see the module docstring).
    a, b = from_bf16(fused).astype(np.float64), from_bf16(two_step).astype(np.float64)
    tol = bf16_ulp(np.maximum(np.abs(a), np.abs(b))) + 2 * sum_error(k, magnitude)
    assert np.all(np.abs(a - b) <= tol)


@pytest.mark.parametrize("tile_rows", [0, 3, 7, 64, 100, 1000])
@pytest.mark.parametrize("scratch_tiles", [1, 3])
def test_matmul_mxfp4_tilings(tile_rows, scratch_tiles, threads):
    """Every tile size (incl. a last partial tile), serial (scratch for one tile) and parallel tiles, into a
    strided y, with and without bias, M = 1 (oneDNN's GEMV implementation) and M = 3 (brgemm)."""
    rng = np.random.default_rng(tile_rows * 3 + scratch_tiles)
    n, k = 100, 64
    blocks, scales = random_mxfp4(rng, n, k)
    w = kernels.dequantize_mxfp4_rows(blocks, scales)
    rows = tile_rows or 32
    scratch = np.empty(scratch_tiles * min(rows, n) * k, dtype=np.uint16)
    for nthreads, m, bias in [(1, 3, None), (2, 1, None), (2, 3, random_bf16(rng, n)), (1, 1, random_bf16(rng, n))]:
        threads(nthreads)
        x = random_bf16(rng, (m, k))
        y_wide = np.full((m, n + 9), 0x7F7F, dtype=np.uint16)
        kernels.matmul_mxfp4(x, blocks, scales, bias, scratch, out=y_wide[:, 4:4 + n], tile_rows=tile_rows)
        assert_matches(y_wide[:, 4:4 + n], *reference(x, w, bias), k)
        assert np.all(y_wide[:, :4] == 0x7F7F) and np.all(y_wide[:, 4 + n:] == 0x7F7F)


def test_matmul_mxfp4_cache_stable_on_repeat():
    rng = np.random.default_rng(21)
    blocks, scales = random_mxfp4(rng, 300, 256)
    # m = 9: above the register kernels (m <= 8, no oneDNN primitive at all), so tiles go through oneDNN.
    x, scratch = random_bf16(rng, (9, 256)), np.empty(2 * 64 * 256, dtype=np.uint16)
    kernels.matmul_cache_clear()
    first = kernels.matmul_mxfp4(x[:1], blocks, scales, None, scratch, tile_rows=64)
    assert kernels.matmul_cache_size() == 0
    first = kernels.matmul_mxfp4(x, blocks, scales, None, scratch, tile_rows=64)
    size = kernels.matmul_cache_size()
    # bf16 path: a full tile (64 rows) and the last one (300 = 4 * 64 + 44); the fp32 path sizes its own tiles.
    assert size == 2 if kernels.get_isa() == "avx512" else size > 0
    for _ in range(3):
        np.testing.assert_array_equal(kernels.matmul_mxfp4(x, blocks, scales, None, scratch, tile_rows=64), first)
    assert kernels.matmul_cache_size() == size


# ---------------------------------------------------------------------------------------------------------
# Bad input: the wrapper's checks, then the C checks called directly
# ---------------------------------------------------------------------------------------------------------


def test_python_wrappers_reject_bad_input():
    rng = np.random.default_rng(31)
    x, w = random_bf16(rng, (2, 64)), random_bf16(rng, (8, 64))
    with pytest.raises(ValueError, match="w: expected"):
        kernels.matmul(x, w[:, :32].copy())
    with pytest.raises(ValueError, match="bias: expected length 8"):
        kernels.matmul(x, w, random_bf16(rng, 7))
    with pytest.raises(ValueError, match="out: dtype"):
        kernels.matmul(x, w, out=np.empty((2, 8), np.float64))
    with pytest.raises(ValueError, match="x: rows must be contiguous"):
        kernels.matmul(x[:, ::2], w[:, :32].copy())
    blocks, scales = random_mxfp4(rng, 8, 64)
    with pytest.raises(ValueError, match="do not match k"):
        kernels.matmul_mxfp4(random_bf16(rng, (2, 96)), blocks, scales, None, np.empty(8 * 96, np.uint16))


def _p(a):
    return None if a is None else a.ctypes.data


class MatmulArgs:
    """Valid arguments for gptoss_matmul_bf16 (m=2, k=64, n=8); tests break one at a time."""

    def __init__(self):
        rng = np.random.default_rng(32)
        self.x, self.w, self.bias = random_bf16(rng, (2, 64)), random_bf16(rng, (8, 64)), random_bf16(rng, 8)
        self.y = np.full((2, 8), 0x1234, dtype=np.uint16)
        self.values = dict(x=_p(self.x), m=2, k=64, ldx=64, w=_p(self.w), n=8, bias=_p(self.bias), y=_p(self.y),
                           ldy=8, y_dtype=_lib.DTYPE_BF16)

    def call(self, **changes):
        v = {**self.values, **changes}
        _lib.call("gptoss_matmul_bf16", v["x"], v["m"], v["k"], v["ldx"], v["w"], v["n"], v["bias"], v["y"],
                  v["ldy"], v["y_dtype"])


@pytest.mark.parametrize(
    "changes, status",
    [
        (dict(x=None), 1), (dict(w=None), 1), (dict(y=None), 1),
        (dict(m=0), 2), (dict(k=0, ldx=0), 2), (dict(n=0, ldy=0), 2),
        (dict(ldx=63), 2), (dict(ldy=7), 2),
        (dict(m=2**62, ldx=2**3), 2),  # m * ldx * 2 bytes overflows
        (dict(k=2**63, ldx=2**63), 2),  # k * 2 bytes overflows
        (dict(n=2**62, ldy=2**62), 2),
        (dict(y_dtype=7), 3),
    ],
)
def test_c_matmul_rejects_bad_input(changes, status):
    args = MatmulArgs()
    with pytest.raises(_lib.KernelError, match="gptoss_matmul_bf16") as e:
        args.call(**changes)
    assert e.value.status == status
    assert np.all(args.y == 0x1234), "a rejected call must not write"


def test_c_matmul_bias_is_optional():
    args = MatmulArgs()
    args.call(bias=None)
    assert_matches(args.y, *reference(args.x, args.w, None), 64)


class Mxfp4Args:
    """Valid arguments for gptoss_matmul_mxfp4 (m=2, k=64, n=8, 4-row tiles)."""

    def __init__(self):
        rng = np.random.default_rng(33)
        self.x = random_bf16(rng, (2, 64))
        self.blocks, self.scales = random_mxfp4(rng, 8, 64)
        self.scratch = np.empty(16 * 64, dtype=np.uint16)  # callers below may claim up to 16 rows
        self.y = np.full((2, 8), 0x1234, dtype=np.uint16)
        self.values = dict(x=_p(self.x), m=2, k=64, blocks=_p(self.blocks), scales=_p(self.scales), n=8, bias=None,
                           y=_p(self.y), ldy=8, scratch=_p(self.scratch), scratch_elems=4 * 64, tile_rows=4)

    def call(self, **changes):
        v = {**self.values, **changes}
        _lib.call("gptoss_matmul_mxfp4", v["x"], v["m"], v["k"], v["blocks"], v["scales"], v["n"], v["bias"],
                  v["y"], v["ldy"], v["scratch"], v["scratch_elems"], v["tile_rows"])


@pytest.mark.parametrize(
    "changes, status",
    [
        (dict(x=None), 1), (dict(blocks=None), 1), (dict(scales=None), 1), (dict(y=None), 1),
        (dict(scratch=None), 1),
        (dict(m=0), 2), (dict(n=0, ldy=0), 2), (dict(k=0), 2), (dict(k=48), 2),  # k must be a multiple of 32
        (dict(ldy=7), 2),
        (dict(scratch_elems=4 * 64 - 1), 2),  # too small for one 4-row tile
        (dict(tile_rows=0, scratch_elems=63), 2),  # too small for even one row
        (dict(m=2**61), 2), (dict(n=2**61, ldy=2**61), 2), (dict(k=2**62), 2),
        (dict(scratch_elems=2**63), 2),
    ],
)
def test_c_matmul_mxfp4_rejects_bad_input(changes, status):
    args = Mxfp4Args()
    with pytest.raises(_lib.KernelError, match="gptoss_matmul_mxfp4") as e:
        args.call(**changes)
    assert e.value.status == status
    assert np.all(args.y == 0x1234), "a rejected call must not write"


def test_c_matmul_mxfp4_tile_larger_than_n_is_clamped():
    args = Mxfp4Args()
    args.call(tile_rows=1000, scratch_elems=8 * 64)  # more rows than W has: one tile of n = 8 rows
    w = kernels.dequantize_mxfp4_rows(args.blocks, args.scales)
    assert_matches(args.y, *reference(args.x, w, None), 64)
