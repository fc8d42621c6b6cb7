"""The gpt-oss forward pass (SPEC §4), orchestrating libgptoss kernels over a mapped checkpoint.

Data flows one way: checkpoint mapping -> expert store -> C kernel -> residual stream. Dense weights are used
in place from the mapping; per layer the router picks experts_per_token experts for each token and only
those are dequantized (MXFP4 -> bf16, tile by tile inside the matmul) and multiplied.

All activations are bf16 bits in np.uint16 arrays, as in the reference; each kernel computes in fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gptoss_stream import system
from gptoss_stream.engine import kernels
from gptoss_stream.engine.kvcache import KVCache
from gptoss_stream.streaming.experts import MappedExpertStore
from gptoss_stream.weights.checkpoint import Checkpoint
from gptoss_stream.weights.config import ModelConfig
from gptoss_stream.weights.layouts.base import LayerWeights

BF16 = np.uint16
SWIGLU_ALPHA = 1.702
# Scratch for dequantized expert tiles, per thread: matmul_mxfp4 picks ~2 MiB tiles and, given a slot per
# thread, lets each core dequantize its own tile and multiply it while it is still in its cache (measured at
# M=1 on 20b experts: 1.1 ms per expert against 1.4-1.8 with one shared 256-row slot, tools/bench_kernels.py).
EXPERT_SCRATCH_BYTES_PER_THREAD = 2 << 20


@dataclass
class RunState:
    """Every activation buffer of one chunk of up to `max_chunk` tokens, allocated once per session."""

    x: np.ndarray        # (chunk, H) residual stream
    t: np.ndarray        # (chunk, H) normed input of a block
    qkv: np.ndarray      # (chunk, (nq + 2 nkv) * hd)
    attn: np.ndarray     # (chunk, nq * hd)
    proj: np.ndarray     # (chunk, H) attention output projection
    router: np.ndarray   # (chunk, E) router logits
    moe_acc: np.ndarray  # (chunk, H) fp32 weighted sum of expert outputs
    mlp1: np.ndarray     # (chunk, 2I) one expert's first layer, for the tokens routed to it
    act: np.ndarray      # (chunk, I) SwiGLU output
    mlp2: np.ndarray     # (chunk, H) one expert's output
    gathered: np.ndarray  # (chunk, H) the normed inputs of the tokens routed to one expert
    tile: np.ndarray     # (threads * EXPERT_SCRATCH_BYTES_PER_THREAD / 2,) dequantized expert tiles
    guess_t: np.ndarray  # (chunk, H) the next layer's norm applied early, to guess its experts
    guess_router: np.ndarray  # (chunk, E) the next layer's router logits on guess_t

    @classmethod
    def allocate(cls, config: ModelConfig, max_chunk: int) -> RunState:
        c, h, i = max_chunk, config.hidden_size, config.intermediate_size
        q_dim = config.num_attention_heads * config.head_dim
        kv_dim = config.num_key_value_heads * config.head_dim

        def bf16(*shape: int) -> np.ndarray:
            return np.zeros(shape, dtype=BF16)

        tile_elems = max(1, kernels.get_num_threads()) * EXPERT_SCRATCH_BYTES_PER_THREAD // 2

        return cls(
            x=bf16(c, h), t=bf16(c, h), qkv=bf16(c, q_dim + 2 * kv_dim), attn=bf16(c, q_dim), proj=bf16(c, h),
            router=bf16(c, config.num_experts), moe_acc=np.zeros((c, h), dtype=np.float32), mlp1=bf16(c, 2 * i),
            act=bf16(c, i), mlp2=bf16(c, h), gathered=bf16(c, h), tile=bf16(tile_elems),
            guess_t=bf16(c, h), guess_router=bf16(c, config.num_experts),
        )

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.__dict__.values())


class Model:
    """gpt-oss over a Checkpoint. `forward` runs tokens through every layer, appending to a KVCache.

    `close()` (or `with`) closes the expert store and the checkpoint it was given."""

    def __init__(self, checkpoint: Checkpoint, max_chunk: int = 64, expert_store=None, num_threads: int = 0):
        self.checkpoint = checkpoint
        self.config = config = checkpoint.config
        self.max_chunk = max_chunk
        self.experts = expert_store if expert_store is not None else MappedExpertStore(checkpoint)
        # 0: what this process may use (affinity, cgroup CPU quota), not every processor of the machine
        kernels.set_num_threads(num_threads if num_threads > 0 else system.available_cpus())
        self.layers: list[LayerWeights] = [checkpoint.layer(n) for n in range(config.num_hidden_layers)]
        self.embedding = checkpoint.embedding()      # (V, H)
        self.final_norm = checkpoint.final_norm()    # (H,)
        self.unembedding = checkpoint.unembedding()  # (V, H)
        self.inv_freq, self.concentration = kernels.rope_init(
            config.head_dim, config.rope_theta, config.rope_scaling_factor, config.rope_ntk_alpha,
            config.rope_ntk_beta, config.initial_context_length,
        )
        self.attn_scale = 1.0 / math.sqrt(config.head_dim)
        self.state = RunState.allocate(config, max_chunk)

    def close(self) -> None:
        """Close the expert store, then the checkpoint (the model owns both from construction on;
        idempotent). The weights views are unusable afterwards."""
        close = getattr(self.experts, "close", None)
        if close is not None:
            close()
        self.checkpoint.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def new_cache(self, context_length: int = 4096) -> KVCache:
        return KVCache(self.config, context_length, self.max_chunk)

    # ------------------------------------------------------------------ the whole model

    def forward(self, tokens, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Run tokens (appended at cache.length) through the model; fp32 logits of the last token, or of all."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if tokens.size == 0:
            raise ValueError("forward needs at least one token")
        if tokens.min() < 0 or tokens.max() >= self.config.vocab_size:
            raise ValueError(f"token id out of range 0..{self.config.vocab_size - 1}")
        cache.check_room(tokens.size)
        outputs = []
        for begin in range(0, tokens.size, self.max_chunk):
            chunk = tokens[begin:begin + self.max_chunk]
            x = self.embed(chunk)
            for layer in range(self.config.num_hidden_layers):
                self.layer_forward(layer, x, cache, cache.length)
            cache.advance(chunk.size)
            if all_logits:
                outputs.append(self.logits(x))
        return np.concatenate(outputs) if all_logits else self.logits(x[-1:])[0]

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        x = self.state.x[:tokens.size]
        np.take(self.embedding, tokens, axis=0, out=x)
        return x

    def logits(self, x: np.ndarray) -> np.ndarray:
        """fp32 logits [m, V] of the residual stream x [m, H] (final norm, then unembedding, no bias)."""
        t = kernels.rmsnorm(x, self.final_norm, self.config.rms_norm_eps, out=self.state.t[:x.shape[0]])
        return kernels.matmul(t, self.unembedding, out_dtype=np.float32)

    def layer_forward(self, layer: int, x: np.ndarray, cache: KVCache, first_position: int) -> np.ndarray:
        """One decoder layer on x [m, H] in place; its keys/values go to cache rows from first_position."""
        self.attention_block(layer, x, cache, first_position)
        self.moe_block(layer, x)
        return x

    # ------------------------------------------------------------------ attention block

    def attention_block(self, layer: int, x: np.ndarray, cache: KVCache, first_position: int) -> None:
        cfg, w, s = self.config, self.layers[layer], self.state
        m = x.shape[0]
        nq, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        # t = norm(x)
        t = kernels.rmsnorm(x, w.attn_norm, cfg.rms_norm_eps, out=s.t[:m])
        # qkv = t W_qkv^T + b; one matmul when q, k, v are one tensor (original format), else three
        qkv = s.qkv[:m]
        q, k, v = qkv[:, :nq * hd], qkv[:, nq * hd:(nq + nkv) * hd], qkv[:, (nq + nkv) * hd:]
        if w.qkv_weight is not None:
            kernels.matmul(t, w.qkv_weight, w.qkv_bias, out=qkv)
        else:
            kernels.matmul(t, w.q_weight, w.q_bias, out=q)
            kernels.matmul(t, w.k_weight, w.k_bias, out=k)
            kernels.matmul(t, w.v_weight, w.v_bias, out=v)
        # RoPE on q and k at their positions
        positions = np.arange(first_position, first_position + m, dtype=np.int64)
        kernels.rope_apply_(q, nq, hd, positions, self.inv_freq, self.concentration)
        kernels.rope_apply_(k, nkv, hd, positions, self.inv_freq, self.concentration)
        # keys and values join the cache; attention with sinks (and the window on sliding layers)
        kernels.kv_store(k, v, cache.keys[layer], cache.values[layer], first_position)
        attn = kernels.attention(q, nq, cache.keys[layer], cache.values[layer], first_position,
                                 cache.window(layer), w.sinks, self.attn_scale, out=s.attn[:m])
        # x = x + attn W_out^T + b
        kernels.add_(x, kernels.matmul(attn, w.out_weight, w.out_bias, out=s.proj[:m]))

    # ------------------------------------------------------------------ MoE block

    def route(self, layer: int, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top experts_per_token experts of each token and their softmax weights."""
        w = self.layers[layer]
        logits = kernels.matmul(t, w.gate_weight, w.gate_bias, out=self.state.router[:t.shape[0]])
        indices, weights = kernels.topk_softmax(logits, self.config.experts_per_token)
        # Both references (gpt-oss and transformers) keep the routing weights in bf16.
        return indices, kernels.bf16_to_f32(kernels.f32_to_bf16(weights))

    def moe_block(self, layer: int, x: np.ndarray) -> None:
        cfg, w, s = self.config, self.layers[layer], self.state
        m = x.shape[0]
        # t = norm(x); route each token to its top experts
        t = kernels.rmsnorm(x, w.mlp_norm, cfg.rms_norm_eps, out=s.t[:m])
        indices, weights = self.route(layer, t)
        acc = s.moe_acc[:m]
        acc.fill(0.0)
        # Group the tokens by expert so each routed expert is dequantized once per chunk and runs as one
        # M = (tokens routed to it) matmul. Experts come in sorted order whatever the store (the fp32 sum
        # below depends on the order); the store starts reading the missing ones now.
        flat = indices.reshape(-1)
        # The request ends with the `with`, whatever raises in between (a kernel error, Ctrl-C).
        with self.experts.request(layer, np.unique(flat)) as routed:
            if self.experts.prefetches and layer + 1 < cfg.num_hidden_layers:
                # Disk time, not compute, bounds a memory-capped run: let the store read the next layer's
                # likely experts while this layer computes.
                self.experts.prefetch(layer + 1, self.guess_experts(layer + 1, x))
            for expert, e in routed:
                hits = np.flatnonzero(flat == expert)
                rows = (hits // cfg.experts_per_token).astype(np.int32)
                n = rows.size
                xe = t if n == m and np.array_equal(rows, np.arange(m)) else np.take(t, rows, axis=0,
                                                                                       out=s.gathered[:n])
                # h = t W1_e^T + b1_e; a = SwiGLU(h); y = a W2_e^T + b2_e
                h = kernels.matmul_mxfp4(xe, e.mlp1_blocks, e.mlp1_scales, e.mlp1_bias, s.tile, out=s.mlp1[:n])
                a = kernels.swiglu(h, cfg.swiglu_limit, SWIGLU_ALPHA, out=s.act[:n])
                y = kernels.matmul_mxfp4(a, e.mlp2_blocks, e.mlp2_scales, e.mlp2_bias, s.tile, out=s.mlp2[:n])
                # acc[token] += weight_e * y_e
                kernels.scatter_add_weighted(acc, y, rows, weights.reshape(-1)[hits])
        # x = x + bf16(sum_e weight_e y_e)
        kernels.add_f32_(x, acc)
        if self.experts.prefetches and layer + 1 < cfg.num_hidden_layers:
            # A sharper guess now that this layer's MoE is in the residual (91% vs 76% right on the synthetic
            # 20b, docs/streaming.md): it replaces the early one where those reads have not started.
            self.experts.prefetch(layer + 1, self.guess_experts(layer + 1, x))

    def guess_experts(self, layer: int, x: np.ndarray) -> np.ndarray:
        """The experts `layer` would pick if its MoE ran on the residual x as it is now, most picked first.

        The residual changes little from one layer to the next, so the next layer's norm and router applied
        to the current residual (after this layer's attention) usually pick the same experts. Only guesses:
        nothing here touches the activations of the forward pass.
        """
        w, s = self.layers[layer], self.state
        m = x.shape[0]
        t = kernels.rmsnorm(x, w.mlp_norm, self.config.rms_norm_eps, out=s.guess_t[:m])
        logits = kernels.matmul(t, w.gate_weight, w.gate_bias, out=s.guess_router[:m])
        indices, _ = kernels.topk_softmax(logits, self.config.experts_per_token)
        experts, counts = np.unique(indices, return_counts=True)
        return experts[np.argsort(-counts, kind="stable")]
