"""The gpt-oss forward pass (SPEC §4), orchestrating libgptoss kernels over a mapped checkpoint.

Data flows one way: checkpoint mapping -> expert store -> C kernel -> residual stream. Dense weights are used
in place from the mapping; per layer the router picks experts_per_token experts for each token and only
those are dequantized (MXFP4 -> bf16, tile by tile inside the matmul) and multiplied.

All activations are bf16 bits in np.uint16 arrays, as in the reference; each kernel computes in fp32.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import numpy as np

from gptoss_stream import system
from gptoss_stream.engine import kernels
from gptoss_stream.engine.kvcache import KVCache
from gptoss_stream.streaming.experts import MappedExpertStore
from gptoss_stream.weights.checkpoint import Checkpoint
from gptoss_stream.weights.config import ModelConfig
from gptoss_stream.weights.layouts.base import LayerWeights, Q8Weight

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
    attn_scratch: np.ndarray  # the attention block's: normed input, qkv, attention output, out projection
    t: np.ndarray        # (chunk, H) normed input of the MoE block (the experts' input)
    router: np.ndarray   # (chunk, E) router logits
    moe_acc: np.ndarray  # (chunk, H) fp32 weighted sum of expert outputs
    expert_scratch: np.ndarray  # one expert's: gathered inputs, mlp1 output, SwiGLU output, mlp2 output
    tile: np.ndarray     # (threads * EXPERT_SCRATCH_BYTES_PER_THREAD / 2,) dequantized expert tiles
    guess_t: np.ndarray  # (chunk, H) the next layer's norm applied early, to guess its experts
    guess_router: np.ndarray  # (chunk, E) the next layer's router logits on guess_t

    @classmethod
    def allocate(cls, config: ModelConfig, max_chunk: int) -> RunState:
        c, h, i = max_chunk, config.hidden_size, config.intermediate_size

        def bf16(*shape: int) -> np.ndarray:
            return np.zeros(shape, dtype=BF16)

        tile_elems = max(1, kernels.get_num_threads()) * EXPERT_SCRATCH_BYTES_PER_THREAD // 2
        attn_elems = kernels.attention_block_scratch_elems(
            c, h, config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        return cls(
            x=bf16(c, h), attn_scratch=bf16(attn_elems), t=bf16(c, h), router=bf16(c, config.num_experts),
            moe_acc=np.zeros((c, h), dtype=np.float32), expert_scratch=bf16(kernels.expert_mlp_scratch_elems(c, h, i)),
            tile=bf16(tile_elems), guess_t=bf16(c, h), guess_router=bf16(c, config.num_experts),
        )

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.__dict__.values())


def _unguard(slots: list[int]) -> None:
    for slot in slots:
        kernels.unguard_mapping(slot)


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
        self.attention_weights = [self.bind_attention_weights(w) for w in self.layers]
        self.embedding = checkpoint.embedding()      # (V, H)
        self.final_norm = checkpoint.final_norm()    # (H,)
        self.unembedding = checkpoint.unembedding()  # (V, H)
        self.inv_freq, self.concentration = kernels.rope_init(
            config.head_dim, config.rope_theta, config.rope_scaling_factor, config.rope_ntk_alpha,
            config.rope_ntk_beta, config.initial_context_length,
        )
        self.attn_scale = 1.0 / math.sqrt(config.head_dim)
        self.state = RunState.allocate(config, max_chunk)
        # A file truncated during a forward pass (after check_unchanged) faults in whichever kernel touches it:
        # the guard makes that SIGBUS a one-line error naming the file instead of a bare crash.
        guards = [kernels.guard_mapping(address, length, path) for path, address, length in checkpoint.mappings()]
        self._unguard = weakref.finalize(self, _unguard, [slot for slot in guards if slot is not None])

    def close(self) -> None:
        """Close the expert store, then the checkpoint (the model owns both from construction on;
        idempotent). The weights views are unusable afterwards."""
        close = getattr(self.experts, "close", None)
        if close is not None:
            close()
        self._unguard()  # (once: a finalizer runs at most one time, here or when the model is collected)
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
        # A checkpoint file shrunk under us would SIGBUS at the next access to its mapping: stop here instead,
        # naming the file (a change during this pass is not caught: README, Reliability).
        self.checkpoint.check_unchanged()
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
        if isinstance(self.embedding, Q8Weight):  # repack --dense q8: the rows dequantized to bf16
            kernels.dequantize_q8_rows(self.embedding.values, self.embedding.scales, tokens, out=x)
        else:
            np.take(self.embedding, tokens, axis=0, out=x)
        return x

    def logits(self, x: np.ndarray) -> np.ndarray:
        """fp32 logits [m, V] of the residual stream x [m, H] (final norm, then unembedding, no bias)."""
        t = kernels.rmsnorm(x, self.final_norm, self.config.rms_norm_eps, out=self.state.t[:x.shape[0]])
        if isinstance(self.unembedding, Q8Weight):
            return kernels.matmul_q8(t, self.unembedding.values, self.unembedding.scales, out_dtype=np.float32)
        return kernels.matmul(t, self.unembedding, out_dtype=np.float32)

    def layer_forward(self, layer: int, x: np.ndarray, cache: KVCache, first_position: int) -> np.ndarray:
        """One decoder layer on x [m, H] in place; its keys/values go to cache rows from first_position."""
        self.attention_block(layer, x, cache, first_position)
        self.moe_block(layer, x)
        return x

    # ------------------------------------------------------------------ attention block

    def bind_attention_weights(self, w: LayerWeights) -> kernels.AttentionWeights:
        """The layer's attention weights as the attention block takes them (bound once, at construction: a
        LayerWeights array replaced later needs binding again)."""
        cfg = self.config
        if isinstance(w.qkv_weight, Q8Weight) or isinstance(w.out_weight, Q8Weight):
            # repack --dense q8 stores both projections as q8 (and always the fused qkv)
            if not (isinstance(w.qkv_weight, Q8Weight) and isinstance(w.out_weight, Q8Weight)):
                raise ValueError("q8 attention weights: qkv and out must both be q8")
            return kernels.AttentionWeights(
                cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, norm=w.attn_norm,
                sinks=w.sinks, out_weight=None, out_bias=w.out_bias, qkv_bias=w.qkv_bias,
                qkv_q8=w.qkv_weight.values, qkv_scales=w.qkv_weight.scales, out_q8=w.out_weight.values,
                out_scales=w.out_weight.scales)
        return kernels.AttentionWeights(
            cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, norm=w.attn_norm,
            sinks=w.sinks, out_weight=w.out_weight, out_bias=w.out_bias, qkv_weight=w.qkv_weight,
            qkv_bias=w.qkv_bias, q_weight=w.q_weight, q_bias=w.q_bias, k_weight=w.k_weight, k_bias=w.k_bias,
            v_weight=w.v_weight, v_bias=w.v_bias)

    def attention_block(self, layer: int, x: np.ndarray, cache: KVCache, first_position: int) -> None:
        """x += attention(norm(x)): q, k, v projections, RoPE, the keys and values into the cache, attention
        with sinks (and the window on sliding layers), the output projection; one library call."""
        kernels.attention_block(x, self.attention_weights[layer], self.config.rms_norm_eps, self.inv_freq,
                                self.concentration, self.attn_scale, cache.keys[layer], cache.values[layer],
                                first_position, cache.window(layer), self.state.attn_scratch)

    # ------------------------------------------------------------------ MoE block

    def route(self, layer: int, x: np.ndarray, t: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """t = the layer's MoE norm of x; the top experts_per_token experts of each token and their softmax
        weights (bf16 values, as both references keep them)."""
        w = self.layers[layer]
        return kernels.moe_route(x, w.mlp_norm, self.config.rms_norm_eps, w.gate_weight, w.gate_bias,
                                 self.config.experts_per_token, t=t, logits=logits)

    def moe_block(self, layer: int, x: np.ndarray) -> None:
        cfg, s = self.config, self.state
        m = x.shape[0]
        # t = norm(x); route each token to its top experts
        t = s.t[:m]
        indices, weights = self.route(layer, x, t, s.router[:m])
        acc = s.moe_acc[:m]
        acc.fill(0.0)
        # Each routed expert is dequantized once per chunk and runs as one M = (tokens routed to it) matmul.
        # Experts come in sorted order whatever the store (the fp32 sum below depends on the order); the store
        # starts reading the missing ones now.
        # The request ends with the `with`, whatever raises in between (a kernel error, Ctrl-C).
        with self.experts.request(layer, np.unique(indices)) as routed:
            if self.experts.prefetches and layer + 1 < cfg.num_hidden_layers:
                # Disk time, not compute, bounds a memory-capped run: let the store read the next layer's
                # likely experts while this layer computes.
                self.experts.prefetch(layer + 1, self.guess_experts(layer + 1, x))
            for expert, e in routed:
                # acc[token] += weight_e * (SwiGLU(t W1_e^T + b1_e) W2_e^T + b2_e) over the tokens routed to e
                kernels.expert_mlp(t, indices, weights, expert, e.mlp1_blocks, e.mlp1_scales, e.mlp1_bias,
                                   e.mlp2_blocks, e.mlp2_scales, e.mlp2_bias, cfg.swiglu_limit, SWIGLU_ALPHA, acc,
                                   s.expert_scratch, s.tile)
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
        # The router kernel directly, not self.route(): callers that replace route() to force or record the
        # routing of the forward pass must not see (or spend) these guesses.
        w, s, m = self.layers[layer], self.state, x.shape[0]
        indices, _ = kernels.moe_route(x, w.mlp_norm, self.config.rms_norm_eps, w.gate_weight, w.gate_bias,
                                       self.config.experts_per_token, t=s.guess_t[:m], logits=s.guess_router[:m])
        experts, counts = np.unique(indices, return_counts=True)
        return experts[np.argsort(-counts, kind="stable")]
