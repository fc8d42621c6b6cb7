"""libgptoss rope.c (YaRN inverse frequencies and the half-split rotation) against numpy.

Tolerances, and where they come from:
  - inv_freq is computed in double and stored as fp32, so it must be the float64 SPEC formula rounded to fp32:
    within half an fp32 ulp (2^-24 relative), with a hair of slack for libm's pow/log in double.
  - The rotation angle is the fp32 product (float)position * inv_freq[i], as in the gpt-oss and Hugging Face
    references. The reference below repeats that product in float32 (numpy's float32 multiply is the same
    IEEE operation) and does everything after it in float64; the kernel then differs only by fp32 cos/sin and
    a few fp32 products (~4 ulp of concentration * (|x1| + |x2|)) before its one rounding to bf16 (half a bf16
    ulp, 2^-8 relative).
  - Against the exact angle position * inv_freq (float64), the fp32 product is off by up to 2^-24 * angle: at
    position 131071 and inv_freq ~ 0.69 that is ~0.004 rad, worth more than a bf16 ulp of the output. The
    last test bounds the kernel by that, so the size of this (intended, reference-matching) error is pinned.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from gptoss_stream.engine import _lib, kernels

# gpt-oss: head_dim 64, rope_theta 150000, YaRN factor 32 over an initial context of 4096, ntk alpha 1, beta 32.
GPT_OSS_ROPE = dict(head_dim=64, theta=150000.0, scaling_factor=32.0, ntk_alpha=1.0, ntk_beta=32.0,
                    initial_context_length=4096)
POSITIONS = [0, 1, 4095, 4096, 131071]


def to_bf16(x: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)


def from_bf16(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


def yarn_reference(head_dim: int, theta: float, scaling_factor: float, ntk_alpha: float, ntk_beta: float,
                   initial_context_length: int) -> tuple[np.ndarray, float]:
    """SPEC §4 in float64: inverse frequencies and the cos/sin concentration."""
    d_half = head_dim / 2
    freq = theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling_factor <= 1.0:
        return 1.0 / freq, 1.0
    low = d_half * math.log(initial_context_length / (ntk_beta * 2 * math.pi)) / math.log(theta)
    high = d_half * math.log(initial_context_length / (ntk_alpha * 2 * math.pi)) / math.log(theta)
    ramp = (np.arange(d_half) - low) / (high - low)
    mask = 1.0 - np.clip(ramp, 0.0, 1.0)
    inv_freq = 1.0 / (scaling_factor * freq) * (1.0 - mask) + 1.0 / freq * mask
    return inv_freq, 0.1 * math.log(scaling_factor) + 1.0


def rotate_reference(x: np.ndarray, positions: np.ndarray, angles: np.ndarray, concentration: float) -> np.ndarray:
    """Half-split rotation in float64 of x [m, heads, head_dim] by angles [m, head_dim / 2]."""
    x = from_bf16(x).astype(np.float64)
    half = x.shape[-1] // 2
    cos = (np.cos(angles) * concentration)[:, None, :]
    sin = (np.sin(angles) * concentration)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def fp32_angles(positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    return (positions.astype(np.float32)[:, None] * inv_freq[None, :]).astype(np.float64)  # float32 product


@pytest.mark.parametrize("params", [
    GPT_OSS_ROPE,
    dict(GPT_OSS_ROPE, head_dim=128, theta=10000.0, scaling_factor=8.0, ntk_beta=16.0),
    dict(GPT_OSS_ROPE, scaling_factor=1.0),  # plain RoPE
    dict(GPT_OSS_ROPE, scaling_factor=0.5),  # <= 1 also means plain RoPE
])
def test_inv_freq_is_the_spec_formula_rounded_to_fp32(params: dict) -> None:
    inv_freq, concentration = kernels.rope_init(**params)
    expected, expected_concentration = yarn_reference(**params)
    assert inv_freq.shape == (params["head_dim"] // 2,)
    np.testing.assert_allclose(inv_freq, expected, rtol=2.0**-24 * 1.01, atol=0)
    assert concentration == pytest.approx(expected_concentration, rel=2.0**-24)


def test_yarn_keeps_fast_dims_and_interpolates_slow_ones() -> None:
    # Not just the formula twice: the two ends of the ramp are plain RoPE and RoPE / scaling_factor.
    inv_freq, concentration = kernels.rope_init(**GPT_OSS_ROPE)
    plain = 1.0 / 150000.0 ** (np.arange(0, 64, 2) / 64)
    assert inv_freq[0] == 1.0 and inv_freq[1] == np.float32(plain[1])
    np.testing.assert_allclose(inv_freq[-4:], plain[-4:] / 32, rtol=1e-7)
    assert np.all(np.diff(inv_freq) < 0)
    assert concentration == pytest.approx(0.1 * math.log(32) + 1)


def test_rotation_matches_reference_at_edge_positions() -> None:
    rng = np.random.default_rng(10)
    n_heads, head_dim = 3, 64
    inv_freq, concentration = kernels.rope_init(**GPT_OSS_ROPE)
    positions = np.array(POSITIONS, dtype=np.int64)
    # x is a column slice of a wider row (like q inside the qkv output): ldx > n_heads * head_dim.
    wide = to_bf16(rng.standard_normal((len(positions), n_heads * head_dim + 40)) * 2.0)
    original = wide.copy()
    x = wide[:, : n_heads * head_dim]
    kernels.rope_apply_(x, n_heads, head_dim, positions, inv_freq, concentration)

    before = original[:, : n_heads * head_dim].reshape(-1, n_heads, head_dim)
    expected = rotate_reference(before, positions, fp32_angles(positions, inv_freq), concentration)
    actual = from_bf16(wide[:, : n_heads * head_dim]).reshape(expected.shape).astype(np.float64)
    magnitude = np.abs(from_bf16(before)).astype(np.float64)
    pair_magnitude = np.concatenate([magnitude[..., :32] + magnitude[..., 32:]] * 2, axis=-1)
    tol = np.abs(expected) * 2.0**-8 + 4 * 2.0**-24 * concentration * pair_magnitude
    assert np.all(np.abs(actual - expected) <= tol), np.max(np.abs(actual - expected) - tol)
    np.testing.assert_array_equal(wide[:, n_heads * head_dim:], original[:, n_heads * head_dim:])  # not touched


def test_position_zero_only_scales_by_concentration() -> None:
    rng = np.random.default_rng(11)
    inv_freq, concentration = kernels.rope_init(**GPT_OSS_ROPE)
    x = to_bf16(rng.standard_normal((1, 2 * 64)))
    expected = to_bf16(from_bf16(x) * np.float32(concentration))
    np.testing.assert_array_equal(kernels.rope_apply_(x, 2, 64, np.zeros(1, np.int64), inv_freq, concentration),
                                  expected)


def test_heads_rotate_independently_with_the_same_angles() -> None:
    # The same vector in every head must come out the same in every head (cos/sin shared across heads).
    rng = np.random.default_rng(12)
    inv_freq, concentration = kernels.rope_init(**GPT_OSS_ROPE)
    x = np.tile(to_bf16(rng.standard_normal((2, 1, 64))), (1, 5, 1)).reshape(2, 5 * 64)
    kernels.rope_apply_(x, 5, 64, np.array([7, 3000], np.int64), inv_freq, concentration)
    heads = x.reshape(2, 5, 64)
    assert np.all(heads == heads[:, :1])
    assert not np.array_equal(heads[0, 0], heads[1, 0])


def test_fp32_angle_error_at_large_positions_is_bounded() -> None:
    """Against the exact float64 angle: the extra error is |angle| * 2^-24 * concentration * (|x1| + |x2|)."""
    rng = np.random.default_rng(13)
    head_dim = 64
    inv_freq, concentration = kernels.rope_init(**GPT_OSS_ROPE)
    positions = np.array(POSITIONS, dtype=np.int64)
    x = to_bf16(rng.standard_normal((len(positions), head_dim)))
    before = x.reshape(-1, 1, head_dim).copy()
    kernels.rope_apply_(x, 1, head_dim, positions, inv_freq, concentration)

    exact_angles = positions.astype(np.float64)[:, None] * inv_freq.astype(np.float64)[None, :]
    expected = rotate_reference(before, positions, exact_angles, concentration)[:, 0]
    magnitude = np.abs(from_bf16(before[:, 0])).astype(np.float64)
    pair_magnitude = np.concatenate([magnitude[:, :32] + magnitude[:, 32:]] * 2, axis=-1)
    angle_error = np.concatenate([exact_angles * 2.0**-24] * 2, axis=-1)
    tol = (np.abs(expected) * 2.0**-8 + (angle_error + 4 * 2.0**-24) * concentration * pair_magnitude)
    err = np.abs(from_bf16(x).astype(np.float64) - expected)
    assert np.all(err <= tol)
    # And that error is real at 131071: bigger than the bf16 rounding alone would explain somewhere.
    assert np.any(err[-1] > np.abs(expected[-1]) * 2.0**-8 + 1e-6)


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------


NULL, BAD_SIZE, OUT_OF_RANGE = 1, 2, 3


def _expect_status(status: int, name: str, *args) -> None:
    with pytest.raises(_lib.KernelError, match=name) as info:
        _lib.call(name, *args)
    assert info.value.status == status, _lib.status_string(info.value.status)


def test_rope_init_rejects_bad_parameters() -> None:
    out = np.zeros(64, dtype=np.float32)
    conc = np.zeros(1, dtype=np.float32)
    o, c = out.ctypes.data, conc.ctypes.data
    _expect_status(BAD_SIZE, "gptoss_rope_init", 63, 150000.0, 32.0, 1.0, 32.0, 4096, o, c)  # odd head_dim
    _expect_status(BAD_SIZE, "gptoss_rope_init", 0, 150000.0, 32.0, 1.0, 32.0, 4096, o, c)
    _expect_status(OUT_OF_RANGE, "gptoss_rope_init", 64, 1.0, 32.0, 1.0, 32.0, 4096, o, c)  # theta <= 1
    _expect_status(OUT_OF_RANGE, "gptoss_rope_init", 64, 150000.0, 32.0, 32.0, 1.0, 4096, o, c)  # alpha >= beta
    _expect_status(OUT_OF_RANGE, "gptoss_rope_init", 64, 150000.0, float("nan"), 1.0, 32.0, 4096, o, c)
    _expect_status(BAD_SIZE, "gptoss_rope_init", 64, 150000.0, 32.0, 1.0, 32.0, 0, o, c)
    _expect_status(NULL, "gptoss_rope_init", 64, 150000.0, 32.0, 1.0, 32.0, 4096, None, c)


def test_rope_apply_rejects_bad_arguments() -> None:
    inv_freq, concentration = kernels.rope_init(**GPT_OSS_ROPE)
    x = np.zeros((2, 128), dtype=np.uint16)
    positions = np.array([0, -1], dtype=np.int64)
    with pytest.raises(ValueError, match="disagree"):
        kernels.rope_apply_(x, 3, 64, positions, inv_freq, concentration)  # 3 heads do not fit in 128
    with pytest.raises(ValueError, match="positions"):
        kernels.rope_apply_(x, 2, 64, positions.astype(np.int32), inv_freq, concentration)

    p, pos, f = x.ctypes.data, positions.ctypes.data, inv_freq.ctypes.data
    _expect_status(OUT_OF_RANGE, "gptoss_rope_apply", p, 2, 2, 64, 128, pos, f, concentration)  # position -1
    assert np.all(x == 0)  # checked before anything was rotated
    positions[1] = 5
    _expect_status(BAD_SIZE, "gptoss_rope_apply", p, 2, 2, 63, 128, pos, f, concentration)  # odd head_dim
    _expect_status(BAD_SIZE, "gptoss_rope_apply", p, 2, 2, 64, 127, pos, f, concentration)  # ldx < row
    _expect_status(BAD_SIZE, "gptoss_rope_apply", p, 0, 2, 64, 128, pos, f, concentration)
    _expect_status(BAD_SIZE, "gptoss_rope_apply", p, 2**40, 2**20, 64, 2**30, pos, f, concentration)  # overflow
    _expect_status(NULL, "gptoss_rope_apply", p, 2, 2, 64, 128, None, f, concentration)
