"""The numpy twin of SPEC §4: the whole gpt-oss forward pass, written to be read, not to be fast.

Every C kernel of libgptoss has its reference here (rmsnorm, rope, attention, route, swiglu,
dequantize_mxfp4), and `forward` chains them into the full model so the engine can be checked end to end.

Numerics follow the SPEC's rule "activations are bf16 between ops, math inside ops in fp32":
activations are carried as float32 arrays whose values are exactly representable in bf16, every op
computes in float32 and rounds its result to bf16 once (round-to-nearest-even). What counts as one op:
  - a linear layer `x W^T + b` (fp32 accumulation, bias added in fp32, one rounding);
  - RMSNorm; RoPE (angles in float64, cos/sin kept in fp32); attention from q/k/v to the per-head outputs (scores,
    sink softmax and the weighted sum of v never leave fp32); SwiGLU;
  - the router: logits are a linear layer (rounded), the top-k softmax weights are rounded to bf16
    (the gpt-oss reference keeps them in bf16 too);
  - the expert mix `sum_e w_e y_e` (fp32 sum over the k experts in top-k order, one rounding);
  - each residual add `x + f(x)` (one rounding).
docs/reference-notes.md lists where Hugging Face transformers and the gpt-oss reference round more often.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

# ---------------------------------------------------------------------------------------------------------
# bf16 <-> float32 (bit math, so the rounding is exactly the hardware's round-to-nearest-even)
# ---------------------------------------------------------------------------------------------------------


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) -> float32 values (exact: bf16 is the top half of a float32)."""
    bits = np.asarray(bits)
    if bits.dtype != np.uint16:
        raise ValueError(f"bf16_to_f32 expects uint16 bit patterns, got {bits.dtype}")
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), round-to-nearest-even; NaN stays a (quiet) NaN."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32)
    # Adding 0x7FFF plus the lowest kept bit rounds half-way cases to the even neighbour; a carry into
    # the exponent is the correct result (it is how the largest finite values round up to inf).
    rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((u[nan] >> 16) | np.uint32(0x0040)).astype(np.uint16)
    return rounded


def round_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 values to the nearest bf16 value, returned as float32."""
    return bf16_to_f32(f32_to_bf16(x))


# ---------------------------------------------------------------------------------------------------------
# MXFP4 (SPEC §3)
# ---------------------------------------------------------------------------------------------------------

FP4_VALUES = np.array(
    [+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=np.float32,
)


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """MXFP4 -> float32. blocks [..., G, 16] uint8 (low nibble first), scales [..., G] uint8 (E8M0).

    Returns [..., G*32]: row r is its G blocks of 32 values in order. Every value is FP4 x 2^k, which
    bf16 represents exactly, so this is also the exact bf16 dequantization.
    """
    blocks = np.asarray(blocks)
    scales = np.asarray(scales)
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
        raise ValueError(f"MXFP4 blocks/scales must be uint8, got {blocks.dtype}/{scales.dtype}")
    if blocks.shape[-1] != 16 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 shapes do not match: blocks {blocks.shape}, scales {scales.shape}")
    codes = np.empty(blocks.shape[:-1] + (32,), dtype=np.uint8)
    codes[..., 0::2] = blocks & 0x0F  # value 2j lives in the low nibble of byte j
    codes[..., 1::2] = blocks >> 4
    values = np.ldexp(FP4_VALUES[codes], (scales.astype(np.int32) - 127)[..., None])
    return values.reshape(blocks.shape[:-2] + (blocks.shape[-2] * 32,))


# ---------------------------------------------------------------------------------------------------------
# q8 (`gptoss repack --dense q8`, docs/repacked-format.md): int8 values, one fp16 scale per 32 of a row
# ---------------------------------------------------------------------------------------------------------

Q8_BLOCK = 32


def quantize_q8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """bf16 bits (or float32) w [n, k] -> (q int8 [n, k], scales uint16 fp16 bits [n, k/32]).

    Per block of 32: scale = fp16(amax / 127) (nearest even), q = clamp(round_half_even(w / scale), -127, 127)
    with that rounded scale; a block of zeros has scale 0 and q 0.
    """
    x = bf16_to_f32(w) if w.dtype == np.uint16 else np.asarray(w, dtype=np.float32)
    n, k = x.shape
    if k % Q8_BLOCK:
        raise ValueError(f"quantize_q8: k={k} is not a multiple of {Q8_BLOCK}")
    blocks = x.reshape(n, k // Q8_BLOCK, Q8_BLOCK)
    amax = np.max(np.abs(blocks), axis=-1)
    scales = (amax / np.float32(127)).astype(np.float16)  # fp32 division, then round to nearest-even fp16
    s = scales.astype(np.float32)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s > 0, np.rint(blocks / np.where(s > 0, s, 1)), 0)  # np.rint: half to even
    q = np.clip(q, -127, 127).astype(np.int8).reshape(n, k)
    return q, scales.view(np.uint16)


def dequantize_q8(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """q8 -> float32 [n, k], exact: an int8 times an fp16 needs at most 18 significant bits."""
    q, scales = np.asarray(q), np.asarray(scales)
    if q.dtype != np.int8 or scales.dtype != np.uint16 or scales.shape != (q.shape[0], q.shape[1] // Q8_BLOCK):
        raise ValueError(f"q8 pair expected (int8 [n, k], uint16 [n, k/32]), got {q.dtype} {q.shape}, "
                         f"{scales.dtype} {scales.shape}")
    s = scales.view(np.float16).astype(np.float32)
    return (q.reshape(q.shape[0], -1, Q8_BLOCK).astype(np.float32) * s[..., None]).reshape(q.shape)


# How libgptoss's q8 matmul sees the weights: exactly (q * scale in fp32) in its register kernels (m <= 8 rows
# of activations) and in the fp32 tiles of the avx2 and scalar paths; rounded to bf16 in the AVX-512 path's
# oneDNN bf16 tiles, for m > 8. None = exact everywhere; tests running the engine on the AVX-512 path set it to
# 8 (Q8_AVX512_REGISTER_ROWS) so the reference rounds where the kernel does.
Q8_AVX512_REGISTER_ROWS = 8
Q8_BF16_TILES_ABOVE: int | None = None


def weight_f32(w: Any, m: int | None = None) -> np.ndarray:
    """A weight as float32: bf16 bits, float32, or a q8 weight (anything with .values and .scales: Q8Weight),
    dequantized as the kernels do for a product with m rows (Q8_BF16_TILES_ABOVE)."""
    if hasattr(w, "scales") and hasattr(w, "values"):
        f = dequantize_q8(w.values, w.scales)
        if Q8_BF16_TILES_ABOVE is not None and m is not None and m > Q8_BF16_TILES_ABOVE:
            f = round_bf16(f)
        return f
    return bf16_to_f32(w) if w.dtype == np.uint16 else np.asarray(w, dtype=np.float32)


# ---------------------------------------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------------------------------------


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """y = x W^T + b with W [out, in]; weight/bias are bf16 bits, float32 or q8 (weight_f32). fp32 math, bf16
    result."""
    w = weight_f32(weight, np.shape(x)[0] if np.ndim(x) == 2 else None)
    y = np.asarray(x, dtype=np.float32) @ w.T
    if bias is not None:
        y = y + (bf16_to_f32(bias) if bias.dtype == np.uint16 else bias.astype(np.float32))
    return round_bf16(y)


def rmsnorm(x: np.ndarray, scale: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """y = x / sqrt(mean(x^2) + eps) * scale over the last axis; fp32 math, bf16 result."""
    x = np.asarray(x, dtype=np.float32)
    s = bf16_to_f32(scale) if scale.dtype == np.uint16 else scale.astype(np.float32)
    ms = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)
    return round_bf16(x / np.sqrt(ms + np.float32(eps)) * s)


def rope_inv_freq(
    head_dim: int,
    theta: float,
    scaling_factor: float,
    ntk_alpha: float,
    ntk_beta: float,
    initial_context_length: int,
) -> tuple[np.ndarray, float]:
    """YaRN (NTK by parts) inverse frequencies [head_dim/2] (float64) and the concentration, per SPEC §4."""
    half = head_dim // 2
    i = np.arange(half, dtype=np.float64)
    freq = theta ** (2.0 * i / head_dim)
    if scaling_factor <= 1.0:
        return 1.0 / freq, 1.0
    concentration = 0.1 * math.log(scaling_factor) + 1.0
    low = half * math.log(initial_context_length / (ntk_beta * 2 * math.pi)) / math.log(theta)
    high = half * math.log(initial_context_length / (ntk_alpha * 2 * math.pi)) / math.log(theta)
    mask = 1.0 - np.clip((i - low) / (high - low), 0.0, 1.0)
    inv_freq = (1.0 / (scaling_factor * freq)) * (1.0 - mask) + (1.0 / freq) * mask
    return inv_freq, concentration


def rope_cos_sin(positions: np.ndarray, cfg: Any) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [T, head_dim/2] (float32, concentration included) for the given absolute positions."""
    inv_freq, concentration = rope_inv_freq(
        cfg.head_dim,
        cfg.rope_theta,
        cfg.rope_scaling_factor,
        cfg.rope_ntk_alpha,
        cfg.rope_ntk_beta,
        cfg.initial_context_length,
    )
    # The angle is formed in float64 so the reference does not inherit float32's error at large
    # positions (131072 x inv_freq); the engine may do it in fp32 and stay within a few ulps of this.
    angle = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    cos = (np.cos(angle) * concentration).astype(np.float32)
    sin = (np.sin(angle) * concentration).astype(np.float32)
    return cos, sin


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Half-split rotation of x [T, heads, D]: first D/2 dims paired with the last D/2; bf16 result."""
    x = np.asarray(x, dtype=np.float32)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return round_bf16(np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1))


def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    sinks: np.ndarray,
    q_positions: np.ndarray,
    k_positions: np.ndarray,
    sliding_window: int = 0,
) -> np.ndarray:
    """Causal GQA attention with per-head sinks; q [T, Hq, D], k/v [S, Hkv, D], sinks [Hq].

    Query i sees key j iff pos_j <= pos_i and (no window or pos_j > pos_i - sliding_window). kv head h
    serves q heads h*G .. h*G+G-1 (G = Hq/Hkv). The sink is one extra logit per head in the softmax row,
    with no value. Returns [T, Hq*D], bf16 values; scores and probabilities stay in fp32.
    """
    T, n_q, D = q.shape
    n_kv = k.shape[1]
    if n_q % n_kv:
        raise ValueError(f"{n_q} query heads are not a multiple of {n_kv} kv heads")
    group = n_q // n_kv
    qp = np.asarray(q_positions)[:, None]
    kp = np.asarray(k_positions)[None, :]
    visible = kp <= qp
    if sliding_window:
        visible &= kp > qp - sliding_window
    s = bf16_to_f32(sinks) if sinks.dtype == np.uint16 else sinks.astype(np.float32)

    qh = q.astype(np.float32).reshape(T, n_kv, group, D).transpose(1, 2, 0, 3)  # [Hkv, G, T, D]
    kh = k.astype(np.float32).transpose(1, 0, 2)  # [Hkv, S, D]
    vh = v.astype(np.float32).transpose(1, 0, 2)
    scores = (qh @ kh[:, None].transpose(0, 1, 3, 2)) * np.float32(1.0 / math.sqrt(D))  # [Hkv, G, T, S]
    scores = np.where(visible[None, None], scores, np.float32(-np.inf))
    sink = np.broadcast_to(s.reshape(n_kv, group, 1, 1), scores.shape[:-1] + (1,))
    row = np.concatenate([scores, sink], axis=-1)
    row = np.exp(row - row.max(axis=-1, keepdims=True))
    probs = (row / row.sum(axis=-1, keepdims=True))[..., :-1]  # the sink's column is dropped
    out = probs @ vh[:, None]  # [Hkv, G, T, D]
    # Output head order is h*G + g, the order of the q heads (and of W_out's input columns).
    return round_bf16(out.transpose(2, 0, 1, 3).reshape(T, n_q * D))


def route(
    x_norm: np.ndarray, gate_weight: np.ndarray, gate_bias: np.ndarray, k: int, indices: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Router: logits = t W_gate^T + b (bf16), top-k sorted (ties: lower expert index first), softmax.

    `indices` [T, k] forces the choice (to replay another implementation's routing: two correct bf16
    implementations can pick different experts where the k-th and (k+1)-th logits nearly tie); the
    weights are then the softmax of this router's logits at those experts.
    Returns (indices [T, k] int64, weights [T, k] bf16 values as float32, logits [T, E]).
    """
    logits = linear(x_norm, gate_weight, gate_bias)
    if indices is None:
        # A stable sort of the negated logits puts the largest first and breaks ties by expert index.
        # torch.topk has no defined tie order, so a tie at the k-th place can route differently there.
        indices = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    else:
        indices = np.asarray(indices, dtype=np.int64)
        if indices.shape != (logits.shape[0], k) or indices.min() < 0 or indices.max() >= logits.shape[1]:
            raise ValueError(f"forced routes must be [{logits.shape[0]}, {k}] expert ids, got {indices.shape}")
    top = np.take_along_axis(logits, indices, axis=-1)
    e = np.exp(top - top.max(axis=-1, keepdims=True))
    weights = round_bf16(e / e.sum(axis=-1, keepdims=True))
    return indices, weights, logits


def swiglu(h: np.ndarray, limit: float = 7.0, alpha: float = 1.702) -> np.ndarray:
    """gpt-oss SwiGLU on interleaved [..., 2I]: glu = h[0::2] (clamped above), lin = h[1::2] (both sides)."""
    h = np.asarray(h, dtype=np.float32)
    glu = np.minimum(h[..., 0::2], np.float32(limit))
    lin = np.clip(h[..., 1::2], np.float32(-limit), np.float32(limit))
    with np.errstate(over="ignore"):  # exp overflows to inf for glu << 0: sigmoid -> 0, as it should
        sig = np.float32(1.0) / (np.float32(1.0) + np.exp(-np.float32(alpha) * glu))
    return round_bf16(glu * sig * (lin + np.float32(1.0)))


def expert_mlp(t: np.ndarray, expert: Any, limit: float) -> np.ndarray:
    """One expert on the rows t [N, H]: mlp1 -> SwiGLU -> mlp2, each rounded to bf16. Returns [N, H]."""
    w1 = dequantize_mxfp4(expert.mlp1_blocks, expert.mlp1_scales)  # [2I, H]
    h = linear(t, w1, expert.mlp1_bias)
    a = swiglu(h, limit)
    w2 = dequantize_mxfp4(expert.mlp2_blocks, expert.mlp2_scales)  # [H, I]
    return linear(a, w2, expert.mlp2_bias)


# ---------------------------------------------------------------------------------------------------------
# Blocks over a Checkpoint
# ---------------------------------------------------------------------------------------------------------


def _config(ckpt: Any) -> Any:
    cfg = getattr(ckpt, "config", None)
    if cfg is None:
        raise ValueError(f"{type(ckpt).__name__} has no .config: numpy_reference needs a Checkpoint")
    return cfg


def _eps(cfg: Any) -> float:
    return float(getattr(cfg, "rms_norm_eps", 1e-5))


def is_sliding_layer(cfg: Any, layer: int) -> bool:
    """SPEC §4: the sliding window applies to layers with an even index only, unless the config
    lists its own layer_types (HF configs do; the official ones say exactly that)."""
    types = getattr(cfg, "layer_types", None)
    if types:
        return types[layer] == "sliding_attention"
    return layer % 2 == 0


def attention_block(ckpt: Any, layer: int, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """x + attn(norm(x)) for the tokens x [T, H] at `positions` (they attend to each other only)."""
    cfg = _config(ckpt)
    w = ckpt.layer(layer)
    T = x.shape[0]
    D = cfg.head_dim
    t = rmsnorm(x, w.attn_norm, _eps(cfg))
    q = linear(t, w.q_weight, w.q_bias).reshape(T, cfg.num_attention_heads, D)
    k = linear(t, w.k_weight, w.k_bias).reshape(T, cfg.num_key_value_heads, D)
    v = linear(t, w.v_weight, w.v_bias).reshape(T, cfg.num_key_value_heads, D)
    cos, sin = rope_cos_sin(positions, cfg)
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    window = cfg.sliding_window if is_sliding_layer(cfg, layer) else 0
    a = attention(q, k, v, w.sinks, positions, positions, window)
    return round_bf16(x + linear(a, w.out_weight, w.out_bias))


def moe_block(
    ckpt: Any, layer: int, x: np.ndarray, routes: list | None = None, forced: np.ndarray | None = None
) -> np.ndarray:
    """x + sum_e w_e expert_e(norm(x)) over the top-k experts of each token.

    If `routes` is a list, (indices, weights, logits) of the router is appended to it (for tests);
    `forced` [T, k] replays a given routing (see `route`).
    """
    cfg = _config(ckpt)
    w = ckpt.layer(layer)
    t = rmsnorm(x, w.mlp_norm, _eps(cfg))
    indices, weights, logits = route(t, w.gate_weight, w.gate_bias, cfg.experts_per_token, forced)
    if routes is not None:
        routes.append((indices, weights, logits))
    y = np.zeros(indices.shape + (x.shape[1],), dtype=np.float32)  # [T, k, H]
    for e in np.unique(indices):
        rows, slots = np.nonzero(indices == e)
        y[rows, slots] = expert_mlp(t[rows], ckpt.expert(layer, int(e)), cfg.swiglu_limit)
    mixed = round_bf16(np.einsum("tk,tkh->th", weights, y))
    return round_bf16(x + mixed)


def layer_forward(
    ckpt: Any,
    layer: int,
    x: np.ndarray,
    positions: Sequence[int] | np.ndarray,
    routes: list | None = None,
    forced: np.ndarray | None = None,
) -> np.ndarray:
    """One decoder layer: the residual stream x [T, H] (bf16 values in float32) -> the next one.

    The T tokens attend to each other only (no cache). `routes`/`forced`: see `moe_block`.
    """
    x = np.asarray(x, dtype=np.float32)
    positions = np.asarray(positions, dtype=np.int64)
    if x.ndim != 2 or positions.shape != (x.shape[0],):
        raise ValueError(f"layer_forward: x must be [T, H] with T positions, got {x.shape} and {positions.shape}")
    x = attention_block(ckpt, layer, x, positions)
    return moe_block(ckpt, layer, x, routes, forced)


def embed(ckpt: Any, tokens: Sequence[int]) -> np.ndarray:
    cfg = _config(ckpt)
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.ndim != 1 or tokens.size == 0:
        raise ValueError(f"tokens must be a non-empty 1-D sequence, got shape {tokens.shape}")
    if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
        raise ValueError(f"token ids must be in [0, {cfg.vocab_size}), got {tokens.min()}..{tokens.max()}")
    table = ckpt.embedding()
    if hasattr(table, "scales"):  # q8: the rows dequantized and rounded to bf16, the activations' type
        return round_bf16(dequantize_q8(table.values[tokens], table.scales[tokens]))
    return bf16_to_f32(np.asarray(table[tokens]))


def unembed(ckpt: Any, x: np.ndarray, rows_per_chunk: int = 16384) -> np.ndarray:
    """logits = norm(x) W_unembed^T as float32 [T, V] (not rounded); the vocab is walked in chunks
    so a 201088 x 2880 matrix never exists in float32 all at once."""
    t = rmsnorm(x, ckpt.final_norm(), _eps(_config(ckpt)))
    w = ckpt.unembedding()
    logits = np.empty((t.shape[0], w.shape[0]), dtype=np.float32)
    for r0 in range(0, w.shape[0], rows_per_chunk):
        chunk = weight_f32(w.rows(r0, r0 + rows_per_chunk) if hasattr(w, "rows") else np.asarray(w[r0 : r0 + rows_per_chunk]),
                           t.shape[0])
        logits[:, r0 : r0 + chunk.shape[0]] = t @ chunk.T
    return logits


def forward_layers(
    ckpt: Any, tokens: Sequence[int], routes: list | None = None, forced: Sequence[np.ndarray] | None = None
) -> list[np.ndarray]:
    """The residual stream entering each layer, then the one leaving the last layer (before the final
    norm): num_hidden_layers + 1 arrays [T, H]. `forced[l]` replays layer l's routing."""
    cfg = _config(ckpt)
    x = embed(ckpt, tokens)
    positions = np.arange(x.shape[0])
    streams = [x]
    for layer in range(cfg.num_hidden_layers):
        x = layer_forward(ckpt, layer, x, positions, routes, None if forced is None else forced[layer])
        streams.append(x)
    return streams


def forward(ckpt: Any, tokens: Sequence[int], forced: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """Logits [T, V] float32 for every position of `tokens` (a fresh sequence starting at position 0)."""
    return unembed(ckpt, forward_layers(ckpt, tokens, forced=forced)[-1])


def generate_greedy(ckpt: Any, tokens: Sequence[int], n: int) -> tuple[list[int], np.ndarray]:
    """Greedy decoding by re-running the whole prefix each step (no cache: slow, obviously right).

    Returns (the n new tokens, logits [n, V] that chose them).
    """
    seq = list(tokens)
    chosen, step_logits = [], []
    for _ in range(n):
        logits = forward(ckpt, seq)[-1]
        nxt = int(np.argmax(logits))
        chosen.append(nxt)
        step_logits.append(logits)
        seq.append(nxt)
    return chosen, np.stack(step_logits) if step_logits else np.zeros((0, 0), np.float32)
