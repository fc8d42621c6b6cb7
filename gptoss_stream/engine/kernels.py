"""numpy-friendly wrappers over libgptoss.

bf16 arrays are np.uint16 holding raw bfloat16 bits. Each wrapper checks dtypes, shapes and contiguity
(raising ValueError naming the argument) before the C function checks them again; outputs may be passed in
(`out=`) so the hot path allocates nothing.
"""

from __future__ import annotations

import mmap
import os

import numpy as np

from gptoss_stream.engine import _lib, compute_path

BF16 = np.uint16


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


def _check(name: str, a: np.ndarray, dtype, ndim: int | None = None, contiguous: bool = True) -> None:
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name}: expected a numpy array, got {type(a).__name__}")
    if a.dtype != np.dtype(dtype):
        raise ValueError(f"{name}: expected dtype {np.dtype(dtype)}, got {a.dtype}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {a.shape}")
    if contiguous and not a.flags.c_contiguous:
        raise ValueError(f"{name}: must be C-contiguous")


def _check_rows(name: str, a: np.ndarray, dtype) -> int:
    """A 2-D array whose rows may be strided (a column slice of a wider matrix); returns the row stride."""
    _check(name, a, dtype, ndim=2, contiguous=False)
    if a.strides[1] != a.itemsize or a.strides[0] % a.itemsize:
        raise ValueError(f"{name}: rows must be contiguous (got strides {a.strides})")
    return a.strides[0] // a.itemsize


def _out(out: np.ndarray | None, shape: tuple[int, ...], dtype, name: str = "out") -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype=dtype)
    _check(name, out, dtype)
    if out.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {out.shape}")
    return out


# ---------------------------------------------------------------- runtime


def set_num_threads(n: int) -> None:
    _lib.call("gptoss_set_num_threads", int(n))


def get_num_threads() -> int:
    return int(_lib.call_value("gptoss_get_num_threads"))


def detect_isa() -> str:
    """The best compute path this process can run: 'avx512', 'avx2' or 'scalar' (see compute_path)."""
    return compute_path.detected()


def get_isa() -> str:
    return compute_path.selected()


def set_isa(name: str) -> None:
    """Force a compute path at or below the detected one; ValueError names what is missing otherwise."""
    try:
        compute_path.select(name)
    except compute_path.UnsupportedComputePath as e:
        raise ValueError(str(e)) from None


compute_path.select_from_environment()


# ---------------------------------------------------------------- convert


def bf16_to_f32(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    _check("x", x, BF16)
    out = _out(out, x.shape, np.float32)
    _lib.call("gptoss_bf16_to_f32", _ptr(x), _ptr(out), x.size)
    return out


def f32_to_bf16(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    _check("x", x, np.float32)
    out = _out(out, x.shape, BF16)
    _lib.call("gptoss_f32_to_bf16", _ptr(x), _ptr(out), x.size)
    return out


# ---------------------------------------------------------------- mxfp4


def dequantize_mxfp4_rows(
    blocks: np.ndarray, scales: np.ndarray, row_begin: int = 0, row_end: int | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """blocks [rows, blocks_per_row, 16] u8, scales [rows, blocks_per_row] u8 -> bf16 [row_end-row_begin, 32*bpr]."""
    _check("blocks", blocks, np.uint8, ndim=3)
    _check("scales", scales, np.uint8, ndim=2)
    n_rows, blocks_per_row, block_bytes = blocks.shape
    if block_bytes != 16 or scales.shape != (n_rows, blocks_per_row):
        raise ValueError(f"blocks {blocks.shape} and scales {scales.shape} are not an MXFP4 pair")
    row_end = n_rows if row_end is None else row_end
    if not 0 <= row_begin <= row_end <= n_rows:
        raise ValueError(f"row range [{row_begin}, {row_end}) outside 0..{n_rows}")
    out = _out(out, (row_end - row_begin, blocks_per_row * 32), BF16)
    _lib.call("gptoss_dequantize_mxfp4_rows", _ptr(blocks), _ptr(scales), n_rows, blocks_per_row,
              row_begin, row_end, _ptr(out))
    return out


# ---------------------------------------------------------------- matmul


def _linear_bias_and_out(
    bias: np.ndarray | None, out: np.ndarray | None, m: int, n: int, out_dtype,
) -> tuple[np.ndarray, int]:
    """Check a linear layer's optional bias [n] and output [m, n] (rows may be strided; allocated when None);
    returns the output and its row stride."""
    if bias is not None:
        _check("bias", bias, BF16, ndim=1)
        if bias.shape[0] != n:
            raise ValueError(f"bias: expected length {n}, got {bias.shape[0]}")
    if out is None:
        out = np.empty((m, n), dtype=out_dtype)
    ldy = _check_rows("out", out, out.dtype)
    if out.shape != (m, n):
        raise ValueError(f"out: expected shape {(m, n)}, got {out.shape}")
    return out, ldy


def _y_dtype(out: np.ndarray) -> int:
    """The library's code for a matmul output's dtype: bf16 (as uint16) or float32."""
    y_dtype = {np.dtype(BF16): _lib.DTYPE_BF16, np.dtype(np.float32): _lib.DTYPE_F32}.get(out.dtype)
    if y_dtype is None:
        raise ValueError(f"out: dtype must be uint16 (bf16) or float32, got {out.dtype}")
    return y_dtype


def matmul(
    x: np.ndarray, w: np.ndarray, bias: np.ndarray | None = None, out: np.ndarray | None = None,
    out_dtype=BF16,
) -> np.ndarray:
    """y = x @ w.T + bias through oneDNN. x [m, k] bf16 (rows may be strided), w [n, k] bf16 in place."""
    ldx = _check_rows("x", x, BF16)
    _check("w", w, BF16, ndim=2)
    m, k = x.shape
    n = w.shape[0]
    if w.shape[1] != k:
        raise ValueError(f"w: expected [n, {k}] to match x {x.shape}, got {w.shape}")
    out, ldy = _linear_bias_and_out(bias, out, m, n, out_dtype)
    y_dtype = _y_dtype(out)
    _lib.call("gptoss_matmul_bf16", _ptr(x), m, k, ldx, _ptr(w), n, _ptr(bias), _ptr(out), ldy, y_dtype,
              context=f"x [{m}, {k}] bf16, W [{n}, {k}] bf16, bias {'yes' if bias is not None else 'no'}, "
                      f"out [{m}, {n}] {out.dtype}")
    return out


# ---------------------------------------------------------------- q8 (int8 + one fp16 scale per 32 values)


Q8_BLOCK = 32


def _check_q8(q: np.ndarray, scales: np.ndarray, qname: str = "q", sname: str = "scales") -> tuple[int, int]:
    """A q8 pair: q [n, k] int8 and scales [n, k // 32] uint16 (fp16 bits), both C-contiguous; returns (n, k)."""
    _check(qname, q, np.int8, ndim=2)
    _check(sname, scales, np.uint16, ndim=2)
    n, k = q.shape
    if k == 0 or k % Q8_BLOCK or scales.shape != (n, k // Q8_BLOCK):
        raise ValueError(f"{qname} {q.shape} and {sname} {scales.shape} are not a q8 pair "
                         f"(k a multiple of {Q8_BLOCK}, one scale per {Q8_BLOCK} values)")
    return n, k


def quantize_q8(
    w: np.ndarray, q_out: np.ndarray | None = None, scales_out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """bf16 w [n, k] (k % 32 == 0) -> (q int8 [n, k], scales uint16 fp16 bits [n, k // 32]) by gptoss.h's
    rule. KernelError (out of range) for inf/NaN or blocks beyond the fp16 scale range; outputs then unusable."""
    _check("w", w, BF16, ndim=2)
    n, k = w.shape
    if n == 0 or k == 0 or k % Q8_BLOCK:
        raise ValueError(f"w: expected [n, k] with k a positive multiple of {Q8_BLOCK}, got {w.shape}")
    q = _out(q_out, (n, k), np.int8, "q_out")
    scales = _out(scales_out, (n, k // Q8_BLOCK), np.uint16, "scales_out")
    _lib.call("gptoss_quantize_q8_rows", _ptr(w), n, k, _ptr(q), _ptr(scales), context=f"w [{n}, {k}]")
    return q, scales


def dequantize_q8_rows(
    q: np.ndarray, scales: np.ndarray, rows: np.ndarray, out: np.ndarray | None = None,
) -> np.ndarray:
    """out[i] = bf16(q[rows[i]] * scale) for the int64 row indices rows -> bf16 [len(rows), k]."""
    n, k = _check_q8(q, scales)
    _check("rows", rows, np.int64, ndim=1)
    if rows.shape[0] == 0:
        raise ValueError("rows: empty")
    out = _out(out, (rows.shape[0], k), BF16)
    _lib.call("gptoss_dequantize_q8_rows", _ptr(q), _ptr(scales), n, k, _ptr(rows), rows.shape[0], _ptr(out),
              context=f"q [{n}, {k}], {rows.shape[0]} rows")
    return out


def matmul_q8(
    x: np.ndarray, q: np.ndarray, scales: np.ndarray, bias: np.ndarray | None = None, out: np.ndarray | None = None,
    out_dtype=BF16,
) -> np.ndarray:
    """y = x @ W.T + bias with W = q * scales (q8). x [m, k] bf16 (rows may be strided); out bf16 or float32."""
    ldx = _check_rows("x", x, BF16)
    n, k = _check_q8(q, scales)
    m = x.shape[0]
    if x.shape[1] != k:
        raise ValueError(f"q: expected [n, {x.shape[1]}] to match x {x.shape}, got {q.shape}")
    out, ldy = _linear_bias_and_out(bias, out, m, n, out_dtype)
    y_dtype = _y_dtype(out)
    _lib.call("gptoss_matmul_q8", _ptr(x), m, k, ldx, _ptr(q), _ptr(scales), n, _ptr(bias), _ptr(out), ldy,
              y_dtype, context=f"x [{m}, {k}] bf16, W [{n}, {k}] q8, bias {'yes' if bias is not None else 'no'}, "
                               f"out [{m}, {n}] {out.dtype}")
    return out


def matmul_f32(x: np.ndarray, w: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """y = x @ w.T in fp32 through oneDNN. x [m, k] float32 (rows may be strided), w [n, k] float32."""
    ldx = _check_rows("x", x, np.float32)
    _check("w", w, np.float32, ndim=2)
    m, k = x.shape
    n = w.shape[0]
    if w.shape[1] != k:
        raise ValueError(f"w: expected [n, {k}] to match x {x.shape}, got {w.shape}")
    out, ldy = _linear_bias_and_out(None, out, m, n, np.float32)
    if out.dtype != np.dtype(np.float32):
        raise ValueError(f"out: expected dtype float32, got {out.dtype}")
    _lib.call("gptoss_matmul_f32", _ptr(x), m, k, ldx, _ptr(w), n, _ptr(out), ldy,
              context=f"x [{m}, {k}] f32, W [{n}, {k}] f32")
    return out


def matmul_mxfp4(
    x: np.ndarray, blocks: np.ndarray, scales: np.ndarray, bias: np.ndarray | None, scratch: np.ndarray,
    out: np.ndarray | None = None, tile_rows: int = 0,
) -> np.ndarray:
    """y = x @ W.T + bias with W an MXFP4 matrix [n, k], dequantized tile by tile into scratch (bf16)."""
    _check("x", x, BF16, ndim=2)
    _check("blocks", blocks, np.uint8, ndim=3)
    _check("scales", scales, np.uint8, ndim=2)
    _check("scratch", scratch, BF16, contiguous=True)
    m, k = x.shape
    n = blocks.shape[0]
    if blocks.shape[1:] != (k // 32, 16) or k % 32 or scales.shape != (n, k // 32):
        raise ValueError(f"MXFP4 weight blocks {blocks.shape} / scales {scales.shape} do not match k={k}")
    out, ldy = _linear_bias_and_out(bias, out, m, n, BF16)
    if out.dtype != np.dtype(BF16):
        raise ValueError(f"out: expected dtype {np.dtype(BF16)}, got {out.dtype}")
    _lib.call("gptoss_matmul_mxfp4", _ptr(x), m, k, _ptr(blocks), _ptr(scales), n, _ptr(bias), _ptr(out), ldy,
              _ptr(scratch), scratch.size, tile_rows,
              context=f"x [{m}, {k}] bf16, W [{n}, {k}] MXFP4, scratch {scratch.size} bf16, tile_rows {tile_rows}")
    return out


def matmul_cache_size() -> int:
    return int(_lib.call_value("gptoss_matmul_cache_size"))


def matmul_cache_clear() -> None:
    _lib.call_value("gptoss_matmul_cache_clear")


# ---------------------------------------------------------------- ops


def rmsnorm(x: np.ndarray, scale: np.ndarray, eps: float = 1e-5, out: np.ndarray | None = None) -> np.ndarray:
    _check("x", x, BF16, ndim=2)
    _check("scale", scale, BF16, ndim=1)
    m, d = x.shape
    if scale.shape[0] != d:
        raise ValueError(f"scale: expected length {d}, got {scale.shape[0]}")
    out = _out(out, (m, d), BF16)
    _lib.call("gptoss_rmsnorm", _ptr(x), _ptr(scale), m, d, float(eps), _ptr(out))
    return out


def add_(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """x += y in bf16 (in place)."""
    _check("x", x, BF16)
    _check("y", y, BF16)
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: x {x.shape}, y {y.shape}")
    _lib.call("gptoss_add_bf16", _ptr(x), _ptr(y), x.size)
    return x


def swiglu(h: np.ndarray, limit: float, alpha: float = 1.702, out: np.ndarray | None = None) -> np.ndarray:
    _check("h", h, BF16, ndim=2)
    m, two_d = h.shape
    if two_d % 2:
        raise ValueError(f"h: last dimension must be even (interleaved glu/linear pairs), got {two_d}")
    out = _out(out, (m, two_d // 2), BF16)
    _lib.call("gptoss_swiglu", _ptr(h), m, two_d // 2, float(limit), float(alpha), _ptr(out))
    return out


def topk_softmax(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    _check("logits", logits, BF16, ndim=2)
    m, n_experts = logits.shape
    if not 0 < k <= n_experts:
        raise ValueError(f"k={k} must be in 1..{n_experts}")
    indices = np.empty((m, k), dtype=np.int32)
    weights = np.empty((m, k), dtype=np.float32)
    _lib.call("gptoss_topk_softmax", _ptr(logits), m, n_experts, k, _ptr(indices), _ptr(weights))
    return indices, weights


def scatter_add_weighted(acc: np.ndarray, y: np.ndarray, rows: np.ndarray, weights: np.ndarray) -> None:
    """acc[rows[i]] += weights[i] * y[i] (fp32 accumulator)."""
    _check("acc", acc, np.float32, ndim=2)
    _check("y", y, BF16, ndim=2)
    _check("rows", rows, np.int32, ndim=1)
    _check("weights", weights, np.float32, ndim=1)
    g, d = y.shape
    if acc.shape[1] != d or rows.shape[0] != g or weights.shape[0] != g:
        raise ValueError(f"acc {acc.shape}, y {y.shape}, rows {rows.shape}, weights {weights.shape} disagree")
    _lib.call("gptoss_scatter_add_weighted", _ptr(acc), acc.shape[0], d, _ptr(y), g, _ptr(rows), _ptr(weights))


def add_f32_(x: np.ndarray, acc: np.ndarray) -> np.ndarray:
    """x = bf16(x + bf16(acc)) in place."""
    _check("x", x, BF16)
    _check("acc", acc, np.float32)
    if x.shape != acc.shape:
        raise ValueError(f"shapes differ: x {x.shape}, acc {acc.shape}")
    _lib.call("gptoss_add_f32_to_bf16", _ptr(x), _ptr(acc), x.size)
    return x


# ---------------------------------------------------------------- rope


def rope_init(
    head_dim: int, theta: float, scaling_factor: float, ntk_alpha: float, ntk_beta: float,
    initial_context_length: int,
) -> tuple[np.ndarray, float]:
    inv_freq = np.empty(head_dim // 2, dtype=np.float32)
    concentration = np.empty(1, dtype=np.float32)
    _lib.call("gptoss_rope_init", head_dim, float(theta), float(scaling_factor), float(ntk_alpha),
              float(ntk_beta), initial_context_length, _ptr(inv_freq), _ptr(concentration))
    return inv_freq, float(concentration[0])


def rope_apply_(
    x: np.ndarray, n_heads: int, head_dim: int, positions: np.ndarray, inv_freq: np.ndarray, concentration: float,
) -> np.ndarray:
    """Rotate x [m, >= n_heads*head_dim] (rows may be strided: a column slice of qkv) in place."""
    ldx = _check_rows("x", x, BF16)
    _check("positions", positions, np.int64, ndim=1)
    _check("inv_freq", inv_freq, np.float32, ndim=1)
    m = x.shape[0]
    if x.shape[1] < n_heads * head_dim or positions.shape[0] != m or inv_freq.shape[0] != head_dim // 2:
        raise ValueError(f"x {x.shape}, positions {positions.shape}, inv_freq {inv_freq.shape} disagree "
                         f"with {n_heads} heads of {head_dim}")
    _lib.call("gptoss_rope_apply", _ptr(x), m, n_heads, head_dim, ldx, _ptr(positions), _ptr(inv_freq),
              float(concentration))
    return x


# ---------------------------------------------------------------- attention


def attention(
    q: np.ndarray, n_heads: int, k_cache: np.ndarray, v_cache: np.ndarray, first_position: int, window: int,
    sinks: np.ndarray, scale: float, out: np.ndarray | None = None,
) -> np.ndarray:
    """q [m, >= n_heads*head_dim] (rows may be strided); caches [capacity, n_kv_heads, head_dim]."""
    ldq = _check_rows("q", q, BF16)
    _check("k_cache", k_cache, BF16, ndim=3)
    _check("v_cache", v_cache, BF16, ndim=3)
    _check("sinks", sinks, BF16, ndim=1)
    capacity, n_kv_heads, head_dim = k_cache.shape
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache {k_cache.shape} and v_cache {v_cache.shape} differ")
    m = q.shape[0]
    if q.shape[1] < n_heads * head_dim or sinks.shape[0] != n_heads:
        raise ValueError(f"q {q.shape} / sinks {sinks.shape} disagree with {n_heads} heads of {head_dim}")
    out = _out(out, (m, n_heads * head_dim), BF16)
    _lib.call("gptoss_attention", _ptr(q), m, ldq, n_heads, n_kv_heads, head_dim, _ptr(k_cache), _ptr(v_cache),
              capacity, first_position, window, _ptr(sinks), float(scale), _ptr(out))
    return out


def kv_store(
    k: np.ndarray, v: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, first_position: int,
) -> None:
    """Write k, v [m, n_kv_heads*head_dim] (rows may be strided) at cache rows (first_position + i) % capacity."""
    ldk = _check_rows("k", k, BF16)
    ldv = _check_rows("v", v, BF16)
    if ldk != ldv or k.shape != v.shape:
        raise ValueError(f"k {k.shape} and v {v.shape} must have the same shape and row stride")
    _check("k_cache", k_cache, BF16, ndim=3)
    _check("v_cache", v_cache, BF16, ndim=3)
    capacity, n_kv_heads, head_dim = k_cache.shape
    if v_cache.shape != k_cache.shape or k.shape[1] != n_kv_heads * head_dim:
        raise ValueError(f"k {k.shape} does not fit caches {k_cache.shape}")
    _lib.call("gptoss_kv_store", _ptr(k), _ptr(v), k.shape[0], ldk, n_kv_heads, head_dim, _ptr(k_cache),
              _ptr(v_cache), capacity, first_position)


# ---------------------------------------------------------------- blocks


class AttentionWeights:
    """One layer's attention weights (used in place), checked once and held as the C struct the attention
    block takes. Give qkv_weight (one tensor) or q/k/v_weight, or the q8 pair qkv_q8 + qkv_scales (then no bf16
    q/k/v weight; qkv_bias stays bf16); out_weight, or the q8 pair out_q8 + out_scales. Biases may be None."""

    def __init__(self, hidden: int, n_heads: int, n_kv_heads: int, head_dim: int, norm: np.ndarray,
                 sinks: np.ndarray, out_weight: np.ndarray | None, out_bias: np.ndarray | None,
                 qkv_weight: np.ndarray | None = None, qkv_bias: np.ndarray | None = None,
                 q_weight: np.ndarray | None = None, q_bias: np.ndarray | None = None,
                 k_weight: np.ndarray | None = None, k_bias: np.ndarray | None = None,
                 v_weight: np.ndarray | None = None, v_bias: np.ndarray | None = None,
                 qkv_q8: np.ndarray | None = None, qkv_scales: np.ndarray | None = None,
                 out_q8: np.ndarray | None = None, out_scales: np.ndarray | None = None):
        q_dim, kv_dim = n_heads * head_dim, n_kv_heads * head_dim
        qkv_dim = q_dim + 2 * kv_dim
        expected = {"norm": (hidden,), "sinks": (n_heads,), "out_bias": (hidden,)}
        q8_pairs = {}  # name of the int8 tensor -> (its scales' name, [n, k])
        if out_q8 is not None or out_scales is not None:
            if out_weight is not None:
                raise ValueError("out_weight: give either out_weight or out_q8 + out_scales, not both")
            q8_pairs["out_q8"] = ("out_scales", (hidden, q_dim))
        else:
            expected["out_weight"] = (hidden, q_dim)
        if qkv_q8 is not None or qkv_scales is not None:
            for name, a in (("qkv_weight", qkv_weight), ("q_weight", q_weight), ("k_weight", k_weight),
                            ("v_weight", v_weight), ("q_bias", q_bias), ("k_bias", k_bias), ("v_bias", v_bias)):
                if a is not None:
                    raise ValueError(f"{name}: not used with qkv_q8 (the q8 projection takes qkv_bias only)")
            q8_pairs["qkv_q8"] = ("qkv_scales", (qkv_dim, hidden))
            expected["qkv_bias"] = (qkv_dim,)
        elif qkv_weight is not None:
            expected |= {"qkv_weight": (qkv_dim, hidden), "qkv_bias": (qkv_dim,)}
        else:
            expected |= {"q_weight": (q_dim, hidden), "q_bias": (q_dim,), "k_weight": (kv_dim, hidden),
                         "k_bias": (kv_dim,), "v_weight": (kv_dim, hidden), "v_bias": (kv_dim,)}
        given = {"norm": norm, "sinks": sinks, "out_weight": out_weight, "out_bias": out_bias,
                 "qkv_weight": qkv_weight, "qkv_bias": qkv_bias, "q_weight": q_weight, "q_bias": q_bias,
                 "k_weight": k_weight, "k_bias": k_bias, "v_weight": v_weight, "v_bias": v_bias,
                 "qkv_q8": qkv_q8, "qkv_scales": qkv_scales, "out_q8": out_q8, "out_scales": out_scales}
        for name, shape in expected.items():
            a = given[name]
            if a is None:
                if name.endswith("_bias"):
                    continue
                raise ValueError(f"{name}: missing")
            _check(name, a, BF16, ndim=len(shape))
            if a.shape != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {a.shape}")
        for qname, (sname, shape) in q8_pairs.items():
            if given[qname] is None or given[sname] is None:
                raise ValueError(f"{qname} and {sname}: give both")
            if _check_q8(given[qname], given[sname], qname, sname) != shape:
                raise ValueError(f"{qname}: expected shape {shape}, got {given[qname].shape}")
            expected[qname] = expected[sname] = shape
        self.shape = (hidden, n_heads, n_kv_heads, head_dim)
        self._arrays = {name: given[name] for name in expected}  # keeps the weights alive with the struct
        self._struct, self.address = _lib.attention_weights(**{n: _ptr(a) for n, a in self._arrays.items()})


def attention_block_scratch_elems(m: int, hidden: int, n_heads: int, n_kv_heads: int, head_dim: int) -> int:
    return int(_lib.call_value("gptoss_attention_block_scratch_elems", m, hidden, n_heads, n_kv_heads, head_dim))


def attention_block(
    x: np.ndarray, w: AttentionWeights, eps: float, inv_freq: np.ndarray, concentration: float, scale: float,
    k_cache: np.ndarray, v_cache: np.ndarray, first_position: int, window: int, scratch: np.ndarray,
) -> np.ndarray:
    """x [m, hidden] += attention block (norm, qkv, RoPE, cache store, attention, out projection) in place."""
    hidden, n_heads, n_kv_heads, head_dim = w.shape
    _check("x", x, BF16, ndim=2)
    _check("k_cache", k_cache, BF16, ndim=3)
    _check("v_cache", v_cache, BF16, ndim=3)
    _check("scratch", scratch, BF16)
    _check("inv_freq", inv_freq, np.float32, ndim=1)
    m = x.shape[0]
    if x.shape[1] != hidden or k_cache.shape[1:] != (n_kv_heads, head_dim) or v_cache.shape != k_cache.shape:
        raise ValueError(f"x {x.shape}, caches {k_cache.shape}/{v_cache.shape} do not fit hidden {hidden}, "
                         f"{n_kv_heads} kv heads of {head_dim}")
    if inv_freq.shape[0] != head_dim // 2:
        raise ValueError(f"inv_freq: expected length {head_dim // 2}, got {inv_freq.shape[0]}")
    _lib.call("gptoss_attention_block", _ptr(x), m, hidden, n_heads, n_kv_heads, head_dim, w.address, float(eps),
              _ptr(inv_freq), float(concentration), float(scale), _ptr(k_cache), _ptr(v_cache), k_cache.shape[0],
              first_position, window, _ptr(scratch), scratch.size,
              context=f"x [{m}, {hidden}], cache rows {k_cache.shape[0]}, position {first_position}, "
                      f"window {window}, scratch {scratch.size}")
    return x


def moe_route(
    x: np.ndarray, norm: np.ndarray, eps: float, gate_weight: np.ndarray, gate_bias: np.ndarray | None, k: int,
    t: np.ndarray, logits: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """t = RMSNorm(x) into t; the top k experts of each token [m, k] int32 and their softmax weights [m, k]
    (fp32 holding bf16 values); logits [m, E] is scratch."""
    _check("x", x, BF16, ndim=2)
    _check("norm", norm, BF16, ndim=1)
    _check("gate_weight", gate_weight, BF16, ndim=2)
    m, hidden = x.shape
    n_experts = gate_weight.shape[0]
    if norm.shape[0] != hidden or gate_weight.shape[1] != hidden:
        raise ValueError(f"norm {norm.shape} / gate_weight {gate_weight.shape} do not match x {x.shape}")
    if gate_bias is not None:
        _check("gate_bias", gate_bias, BF16, ndim=1)
        if gate_bias.shape[0] != n_experts:
            raise ValueError(f"gate_bias: expected length {n_experts}, got {gate_bias.shape[0]}")
    t = _out(t, (m, hidden), BF16, "t")
    logits = _out(logits, (m, n_experts), BF16, "logits")
    if not 0 < k <= n_experts:
        raise ValueError(f"k={k} must be in 1..{n_experts}")
    indices = np.empty((m, k), dtype=np.int32)
    weights = np.empty((m, k), dtype=np.float32)
    _lib.call("gptoss_moe_route", _ptr(x), m, hidden, _ptr(norm), float(eps), _ptr(gate_weight), _ptr(gate_bias),
              n_experts, k, _ptr(t), _ptr(logits), _ptr(indices), _ptr(weights),
              context=f"x [{m}, {hidden}], {n_experts} experts, top {k}")
    return indices, weights


def expert_mlp_scratch_elems(m: int, hidden: int, intermediate: int) -> int:
    return int(_lib.call_value("gptoss_expert_mlp_scratch_elems", m, hidden, intermediate))


def expert_mlp(
    t: np.ndarray, indices: np.ndarray, weights: np.ndarray, expert: int, mlp1_blocks: np.ndarray,
    mlp1_scales: np.ndarray, mlp1_bias: np.ndarray | None, mlp2_blocks: np.ndarray, mlp2_scales: np.ndarray,
    mlp2_bias: np.ndarray | None, swiglu_limit: float, swiglu_alpha: float, acc: np.ndarray, scratch: np.ndarray,
    tile: np.ndarray,
) -> None:
    """acc[i] += weights[i, j] * expert(t[i]) for the tokens i whose router picked `expert` (indices[i, j])."""
    _check("t", t, BF16, ndim=2)
    _check("indices", indices, np.int32, ndim=2)
    _check("weights", weights, np.float32, ndim=2)
    _check("acc", acc, np.float32, ndim=2)
    _check("scratch", scratch, BF16)
    _check("tile", tile, BF16)
    m, hidden = t.shape
    two_i = mlp1_blocks.shape[0]
    for name, a, shape in (("mlp1_blocks", mlp1_blocks, (two_i, hidden // 32, 16)),
                           ("mlp1_scales", mlp1_scales, (two_i, hidden // 32)),
                           ("mlp2_blocks", mlp2_blocks, (hidden, two_i // 64, 16)),
                           ("mlp2_scales", mlp2_scales, (hidden, two_i // 64))):
        _check(name, a, np.uint8, ndim=len(shape))
        if a.shape != shape or hidden % 32 or two_i % 64:
            raise ValueError(f"{name}: expected {shape} for hidden {hidden}, got {a.shape}")
    for name, bias, n in (("mlp1_bias", mlp1_bias, two_i), ("mlp2_bias", mlp2_bias, hidden)):
        if bias is not None:
            _check(name, bias, BF16, ndim=1)
            if bias.shape[0] != n:
                raise ValueError(f"{name}: expected length {n}, got {bias.shape[0]}")
    if indices.shape[0] != m or weights.shape != indices.shape or acc.shape != (m, hidden):
        raise ValueError(f"t {t.shape}, indices {indices.shape}, weights {weights.shape}, acc {acc.shape} disagree")
    _lib.call("gptoss_expert_mlp", _ptr(t), m, hidden, two_i // 2, _ptr(indices), _ptr(weights), indices.shape[1],
              int(expert), _ptr(mlp1_blocks), _ptr(mlp1_scales), _ptr(mlp1_bias), _ptr(mlp2_blocks),
              _ptr(mlp2_scales), _ptr(mlp2_bias), float(swiglu_limit), float(swiglu_alpha), _ptr(acc),
              _ptr(scratch), scratch.size, _ptr(tile), tile.size,
              context=f"t [{m}, {hidden}], expert {expert}, intermediate {two_i // 2}, scratch {scratch.size}, "
                      f"tile {tile.size}")


# ---------------------------------------------------------------- residency


PAGE_SIZE = mmap.PAGESIZE


def mincore(address: int, length: int, out: np.ndarray | None = None) -> np.ndarray:
    """Residency (1/0, u8) of each page that bytes [address, address + length) of a mapping touch."""
    if length <= 0:
        raise ValueError(f"length must be positive, got {length}")
    n_pages = (address % PAGE_SIZE + length + PAGE_SIZE - 1) // PAGE_SIZE
    out = _out(out, (n_pages,), np.uint8)
    _lib.call("gptoss_mincore", address, length, _ptr(out))
    return out


GPTOSS_ERR_NO_MEMORY = 4  # gptoss.h


def guard_mapping(address: int, length: int, path: str) -> int | None:
    """Turn a SIGBUS inside this file mapping into a one-line error naming `path` and exit status 1 (sigbus.c);
    returns the guard's slot for unguard_mapping (call it before the mapping is closed), or None when all
    1024 slots are taken (the mapping then stays unguarded: a SIGBUS in it is the plain crash)."""
    slot = np.zeros(1, dtype=np.int32)
    status = _lib.lib.gptoss_guard_mapping(address, length, os.fsencode(path), _ptr(slot))
    if status == GPTOSS_ERR_NO_MEMORY:
        return None
    if status != _lib.GPTOSS_OK:
        raise _lib.KernelError("gptoss_guard_mapping", status, _lib.status_string(status), path)
    return int(slot[0])


def unguard_mapping(slot: int) -> None:
    _lib.call("gptoss_unguard_mapping", slot)


# ---------------------------------------------------------------- benchmarks


def read_bandwidth(buffer: np.ndarray, repeats: int = 5) -> float:
    """Best bytes/s of all threads streaming through buffer (a memory figure if it dwarfs the caches)."""
    _check("buffer", buffer, buffer.dtype)
    result = np.zeros(1, dtype=np.float64)
    _lib.call("gptoss_read_bandwidth", _ptr(buffer), buffer.nbytes, int(repeats), _ptr(result))
    return float(result[0])
