"""libgptoss mxfp4.c (MXFP4 -> bf16) against a numpy reference, on every ISA path this CPU has.

Dequantization is exact (every FP4 value times a power of two is a bf16 value, subnormals included), so every
comparison here is bit for bit: no tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest

from gptoss_stream.engine import _lib, kernels

FP4 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
               dtype=np.float32)
BF16_QNAN = 0x7FC0
ISAS = ["scalar", "avx2", "avx512"]


def available_isas() -> list[str]:
    return ISAS[: ISAS.index(kernels.detect_isa()) + 1]


def reference(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """SPEC §3 in numpy: low nibble first, FP4[code] * 2^(scale - 127) in float32, then the top 16 bits."""
    codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], 32)
    with np.errstate(over="ignore"):  # scale 254 with |code value| >= 2 overflows to inf, as it must
        values = np.ldexp(FP4[codes], scales.astype(np.int32)[..., None] - 127)
    bits = values.view(np.uint32)
    # The claim that makes truncation right: every finite result is exact in bf16 (low 16 bits zero).
    assert not np.any(bits[np.isfinite(values)] & 0xFFFF)
    out = (bits >> 16).astype(np.uint16)
    out[np.broadcast_to((scales == 255)[..., None], out.shape)] = BF16_QNAN
    return out.reshape(*blocks.shape[:-2], -1)


@pytest.fixture(params=ISAS)
def isa(request):
    """Runs the test once per ISA path (skipping those the CPU lacks) and restores the selected one."""
    if request.param not in available_isas():
        pytest.skip(f"CPU lacks {request.param}")
    saved = kernels.get_isa()
    kernels.set_isa(request.param)
    yield request.param
    kernels.set_isa(saved)


@pytest.fixture
def threads():
    saved = kernels.get_num_threads()
    yield kernels.set_num_threads
    kernels.set_num_threads(saved)


def all_codes_block() -> np.ndarray:
    """One block holding codes 0..15 then 15..0, so each code sits in a low and in a high nibble."""
    codes = np.concatenate([np.arange(16), np.arange(15, -1, -1)]).astype(np.uint8)
    return (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8)


def random_mxfp4(rng: np.random.Generator, rows: int, blocks_per_row: int, scale_lo=0, scale_hi=256):
    blocks = rng.integers(0, 256, (rows, blocks_per_row, 16), dtype=np.uint8)
    scales = rng.integers(scale_lo, scale_hi, (rows, blocks_per_row), dtype=np.uint8)
    return blocks, scales


# ---------------------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------------------


def test_reference_agrees_with_hand_values():
    """Pins the reference itself to values worked out by hand (bf16 bit patterns)."""
    block = all_codes_block()[None, None, :]
    for scale, expected in [
        (127, [0x0000, 0x3F00, 0x3F80, 0x3FC0, 0x4000, 0x4040, 0x4080, 0x40C0]),  # 0 .5 1 1.5 2 3 4 6
        (0, [0x0000, 0x0020, 0x0040, 0x0060, 0x0080, 0x00C0, 0x0100, 0x0140]),  # 2^-128 = bf16 subnormal 0x20
        (254, [0x0000, 0x7E80, 0x7F00, 0x7F40, 0x7F80, 0x7F80, 0x7F80, 0x7F80]),  # 2 * 2^127 = +inf
    ]:
        got = reference(block, np.array([[scale]], dtype=np.uint8))[0]
        assert [int(v) for v in got[:8]] == expected, scale
        assert [int(v) for v in got[8:16]] == [v | 0x8000 for v in expected], scale  # negative codes
        assert np.array_equal(got[16:], got[15::-1])


def test_all_codes_all_scales_exhaustive(isa):
    scales = np.arange(256, dtype=np.uint8)[:, None]  # one row per scale, 255 included
    blocks = np.broadcast_to(all_codes_block(), (256, 1, 16)).copy()
    got = kernels.dequantize_mxfp4_rows(blocks, scales)
    np.testing.assert_array_equal(got, reference(blocks, scales))
    # Subnormal and overflow corners explicitly, so a failure names them.
    assert got[0, 1] == 0x0020 and got[0, 9] == 0x8020  # +-0.5 * 2^-127: smallest magnitude, subnormal
    assert got[254, 7] == 0x7F80 and got[254, 15] == 0xFF80  # +-6 * 2^127 overflows to +-inf
    assert got[254, 3] == 0x7F40  # 1.5 * 2^127: largest finite


def test_scale_255_is_nan_for_the_whole_block(isa):
    rng = np.random.default_rng(1)
    blocks, scales = random_mxfp4(rng, 4, 3, 100, 150)
    scales[1, 2] = 255
    scales[3, 0] = 255
    got = kernels.dequantize_mxfp4_rows(blocks, scales)
    assert np.all(got[1, 64:96] == BF16_QNAN) and np.all(got[3, 0:32] == BF16_QNAN)
    mask = np.ones_like(got, dtype=bool)
    mask[1, 64:96] = mask[3, 0:32] = False
    assert not np.any(got[mask] == BF16_QNAN)
    np.testing.assert_array_equal(got, reference(blocks, scales))


@pytest.mark.parametrize("blocks_per_row", [1, 3, 90])
def test_row_ranges_not_multiple_of_any_width(isa, blocks_per_row):
    rng = np.random.default_rng(blocks_per_row)
    blocks, scales = random_mxfp4(rng, 37, blocks_per_row)
    ref = reference(blocks, scales)
    for begin, end in [(3, 17), (0, 37), (36, 37), (0, 1), (5, 5)]:
        got = kernels.dequantize_mxfp4_rows(blocks, scales, begin, end)
        np.testing.assert_array_equal(got, ref[begin:end], err_msg=f"rows {begin}..{end}")


def test_writes_exactly_its_rows(isa):
    """Output written through a preallocated buffer; the rows after it (a guard) stay untouched."""
    rng = np.random.default_rng(2)
    blocks, scales = random_mxfp4(rng, 37, 3)
    buf = np.full((15, 96), 0xABCD, dtype=np.uint16)
    kernels.dequantize_mxfp4_rows(blocks, scales, 3, 17, out=buf[:14])
    np.testing.assert_array_equal(buf[:14], reference(blocks, scales)[3:17])
    assert np.all(buf[14] == 0xABCD)


def test_paths_bit_identical_on_random_data():
    rng = np.random.default_rng(3)
    blocks, scales = random_mxfp4(rng, 50, 90)  # all scales 0..255, so subnormals, infs and NaNs too
    saved = kernels.get_isa()
    try:
        outs = {}
        for name in available_isas():
            kernels.set_isa(name)
            outs[name] = kernels.dequantize_mxfp4_rows(blocks, scales)
    finally:
        kernels.set_isa(saved)
    ref = reference(blocks, scales)
    for name, got in outs.items():
        np.testing.assert_array_equal(got, ref, err_msg=name)


def test_multithreaded_range_matches_single_thread(isa, threads):
    """Large enough (>= 256 KiB of output) to take the OpenMP path; odd sizes so the split is uneven."""
    rng = np.random.default_rng(4)
    blocks, scales = random_mxfp4(rng, 301, 90, 90, 160)
    ref = reference(blocks, scales)
    for n in (1, 2, 3):
        threads(n)
        np.testing.assert_array_equal(kernels.dequantize_mxfp4_rows(blocks, scales, 7, 300), ref[7:300])


# ---------------------------------------------------------------------------------------------------------
# Bad input: the Python wrapper's checks, then the C library's own (called directly, past the wrapper)
# ---------------------------------------------------------------------------------------------------------


def test_python_wrapper_rejects_bad_input():
    blocks, scales = random_mxfp4(np.random.default_rng(5), 4, 2)
    with pytest.raises(ValueError, match="row range"):
        kernels.dequantize_mxfp4_rows(blocks, scales, 0, 5)
    with pytest.raises(ValueError, match="row range"):
        kernels.dequantize_mxfp4_rows(blocks, scales, 3, 2)
    with pytest.raises(ValueError, match="MXFP4 pair"):
        kernels.dequantize_mxfp4_rows(blocks, scales[:, :1].copy())
    with pytest.raises(ValueError, match="MXFP4 pair"):
        kernels.dequantize_mxfp4_rows(blocks[:, :, :8].copy(), scales)
    with pytest.raises(ValueError, match="blocks: expected dtype uint8"):
        kernels.dequantize_mxfp4_rows(blocks.astype(np.int16), scales)
    with pytest.raises(ValueError, match="out: expected shape"):
        kernels.dequantize_mxfp4_rows(blocks, scales, 0, 2, out=np.empty((3, 64), np.uint16))


def c_dequant(blocks, scales, n_rows, bpr, begin, end, out):
    ptr = lambda a: None if a is None else a.ctypes.data  # noqa: E731
    _lib.call("gptoss_dequantize_mxfp4_rows", ptr(blocks), ptr(scales), n_rows, bpr, begin, end, ptr(out))


@pytest.mark.parametrize(
    "args, status",
    [
        # (blocks, scales, out) present?, n_rows, blocks_per_row, begin, end
        (((0, 1, 1), 4, 2, 0, 4), 1),  # NULL blocks -> GPTOSS_ERR_NULL_POINTER
        (((1, 0, 1), 4, 2, 0, 4), 1),
        (((1, 1, 0), 4, 2, 0, 4), 1),
        (((1, 1, 1), 0, 2, 0, 0), 2),  # zero rows -> GPTOSS_ERR_BAD_SIZE
        (((1, 1, 1), 4, 0, 0, 4), 2),  # zero blocks per row
        (((1, 1, 1), 2**60, 2**10, 0, 1), 2),  # n_rows * bpr * 64 bytes overflows size_t
        (((1, 1, 1), 4, 2, 0, 5), 3),  # row_end > n_rows -> GPTOSS_ERR_OUT_OF_RANGE
        (((1, 1, 1), 4, 2, 3, 2), 3),  # row_begin > row_end
        (((1, 1, 1), 4, 2, 2**64 - 1, 2**64 - 1), 3),  # huge indices must not wrap around
    ],
)
def test_c_rejects_bad_input(args, status):
    (has_b, has_s, has_o), n_rows, bpr, begin, end = args
    blocks, scales = random_mxfp4(np.random.default_rng(6), 4, 2)
    out = np.full((4, 64), 0x1234, dtype=np.uint16)
    with pytest.raises(_lib.KernelError, match="gptoss_dequantize_mxfp4_rows") as e:
        c_dequant(blocks if has_b else None, scales if has_s else None, n_rows, bpr, begin, end,
                  out if has_o else None)
    assert e.value.status == status
    assert np.all(out == 0x1234), "a rejected call must not write"


def test_c_empty_range_is_ok_and_writes_nothing():
    blocks, scales = random_mxfp4(np.random.default_rng(7), 4, 2)
    out = np.full((1, 64), 0x1234, dtype=np.uint16)
    c_dequant(blocks, scales, 4, 2, 4, 4, out)
    assert np.all(out == 0x1234)
