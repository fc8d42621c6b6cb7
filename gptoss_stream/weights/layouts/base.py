"""What every checkpoint layout shares: the original format's tensor names, the records a layout hands out
(TensorRange, LayerWeights, ExpertWeights) and `NamedWeights`, the checkpoint API a layout implements on top of
`tensor(name)` (SPEC §2).

A new layout (repacked.py, published.py, a q8 layout...) subclasses NamedWeights here and gets one branch in
weights/checkpoint.py's `open_checkpoint`; nothing below the opener needs to know it exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from gptoss_stream.weights.config import ModelConfig

EXPERT_PIECES: tuple[str, ...] = (
    "mlp.mlp1_weight.blocks", "mlp.mlp1_weight.scales", "mlp.mlp1_bias",
    "mlp.mlp2_weight.blocks", "mlp.mlp2_weight.scales", "mlp.mlp2_bias",
)
# The expert pieces the streaming store uses in place from the mapping when they are tensors of their own
# (expert_cache.split_expert), and the memory plan keeps in the page cache with the dense weights
# (budget.dense_ranges): the bf16 biases, 16 KB per expert stored among the dense weights.
MAPPED_EXPERT_PIECES: tuple[str, ...] = ("mlp.mlp1_bias", "mlp.mlp2_bias")


def original_tensors(cfg: ModelConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor of the original format: name -> (dtype, shape), SPEC §2a."""
    V, H, I, E = cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
    out: dict[str, tuple[str, tuple[int, ...]]] = {"embedding.weight": ("BF16", (V, H))}
    for n in range(cfg.num_hidden_layers):
        p = f"block.{n}."
        out.update({
            p + "attn.norm.scale": ("BF16", (H,)),
            p + "attn.qkv.weight": ("BF16", (cfg.qkv_dim, H)),
            p + "attn.qkv.bias": ("BF16", (cfg.qkv_dim,)),
            p + "attn.sinks": ("BF16", (cfg.num_attention_heads,)),
            p + "attn.out.weight": ("BF16", (H, cfg.q_dim)),
            p + "attn.out.bias": ("BF16", (H,)),
            p + "mlp.norm.scale": ("BF16", (H,)),
            p + "mlp.gate.weight": ("BF16", (E, H)),
            p + "mlp.gate.bias": ("BF16", (E,)),
            p + "mlp.mlp1_weight.blocks": ("U8", (E, 2 * I, H // 32, 16)),
            p + "mlp.mlp1_weight.scales": ("U8", (E, 2 * I, H // 32)),
            p + "mlp.mlp1_bias": ("BF16", (E, 2 * I)),
            p + "mlp.mlp2_weight.blocks": ("U8", (E, H, I // 32, 16)),
            p + "mlp.mlp2_weight.scales": ("U8", (E, H, I // 32)),
            p + "mlp.mlp2_bias": ("BF16", (E, H)),
        })
    out["norm.scale"] = ("BF16", (H,))
    out["unembedding.weight"] = ("BF16", (V, H))
    return out


# The bf16 weights `gptoss repack --dense q8` stores as int8 + one fp16 scale per 32 values of a row
# (docs/repacked-format.md): what every token reads most of. The router (mlp.gate.weight) stays bf16 on
# purpose: its logits pick experts, a discrete decision a small error can flip, and it is 0.2% of the bytes.
Q8_WEIGHTS: tuple[str, ...] = ("embedding.weight", "attn.qkv.weight", "attn.out.weight", "unembedding.weight")
Q8_BLOCK = 32
Q8_VALUES_SUFFIX = ".q8"          # "block.3.attn.qkv.weight.q8": I8 [n, k]
Q8_SCALES_SUFFIX = ".q8_scales"   # "block.3.attn.qkv.weight.q8_scales": F16 [n, k/32]
DENSE_FORMATS: tuple[str, ...] = ("bf16", "q8")


def is_q8_weight(name: str) -> bool:
    """True for the original-format names a q8 checkpoint stores as int8 + scales."""
    return (name.split(".", 2)[-1] if name.startswith("block.") else name) in Q8_WEIGHTS


# ---------------------------------------------------------------------------- public records

@dataclass(frozen=True)
class Q8Weight:
    """A [n, k] weight stored as int8 values with one fp16 scale per 32 consecutive values of a row:
    w[r, c] = values[r, c] * fp16(scales[r, c // 32]). Read-only views into the mapping."""
    values: np.ndarray  # [n, k] int8
    scales: np.ndarray  # [n, k/32] uint16: IEEE binary16 bits

    BLOCK: ClassVar[int] = Q8_BLOCK

    def __post_init__(self) -> None:
        v, s = self.values, self.scales
        if v.dtype != np.int8 or s.dtype != np.uint16:
            raise ValueError(f"Q8Weight: values must be int8 and scales uint16, got {v.dtype} and {s.dtype}")
        if v.ndim != 2 or v.shape[1] % Q8_BLOCK or s.shape != (v.shape[0], v.shape[1] // Q8_BLOCK):
            raise ValueError(f"Q8Weight: values {list(v.shape)} need scales [n, k/{Q8_BLOCK}], got {list(s.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.scales.nbytes

    def rows(self, start: int, stop: int) -> "Q8Weight":
        """Rows [start, stop) (views)."""
        return Q8Weight(self.values[start:stop], self.scales[start:stop])


@dataclass(frozen=True)
class TensorRange:
    path: str    # shard file
    offset: int  # absolute byte offset inside the file
    nbytes: int


@dataclass
class LayerWeights:
    """One layer's dense weights: read-only views into the mapping, bf16 as np.uint16; the attention
    matrices are Q8Weight in a q8 checkpoint (NamedWeights.dense_format == "q8")."""
    attn_norm: np.ndarray    # [H]
    q_weight: np.ndarray | Q8Weight  # [nq*hd, H]
    q_bias: np.ndarray       # [nq*hd]
    k_weight: np.ndarray | Q8Weight  # [nkv*hd, H]
    k_bias: np.ndarray       # [nkv*hd]
    v_weight: np.ndarray | Q8Weight  # [nkv*hd, H]
    v_bias: np.ndarray       # [nkv*hd]
    sinks: np.ndarray        # [nq]
    out_weight: np.ndarray | Q8Weight  # [H, nq*hd]
    out_bias: np.ndarray     # [H]
    mlp_norm: np.ndarray     # [H]
    gate_weight: np.ndarray  # [E, H]
    gate_bias: np.ndarray    # [E]
    qkv_weight: np.ndarray | Q8Weight | None  # [(nq+2nkv)*hd, H] when q, k, v are adjacent in the file, else None
    qkv_bias: np.ndarray | None    # [(nq+2nkv)*hd] likewise


@dataclass
class ExpertWeights:
    """One expert's MXFP4 weights: read-only views into the mapping."""
    mlp1_blocks: np.ndarray  # [2I, H/32, 16] u8, rows interleaved glu, linear, glu, ...
    mlp1_scales: np.ndarray  # [2I, H/32] u8 (E8M0)
    mlp1_bias: np.ndarray    # [2I] bf16 as u16, same interleaving
    mlp2_blocks: np.ndarray  # [H, I/32, 16] u8
    mlp2_scales: np.ndarray  # [H, I/32] u8
    mlp2_bias: np.ndarray    # [H] bf16 as u16
    ranges: list[TensorRange]  # byte ranges of the six pieces above, in that order

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.ranges)


# ---------------------------------------------------------------------------- the checkpoint API

class NamedWeights:
    """The checkpoint API every layout shares, built on `tensor(name)` with original-format names.

    A layout class provides `config`, `tensor(key)`, `expert_ranges(layer, e)`, `close()`, `check_unchanged()`;
    it may override
    `_fused_qkv(prefix)` when q, k, v are not one tensor.
    """

    config: ModelConfig
    # "bf16": the published dense weights; "q8": `gptoss repack --dense q8` (Q8_WEIGHTS are Q8Weight)
    dense_format: str = "bf16"

    def tensor(self, key: str) -> np.ndarray:
        raise NotImplementedError

    def weight(self, key: str) -> np.ndarray | Q8Weight:
        """A weight matrix by its original-format name, as the layout stores it (bf16, or Q8Weight)."""
        return self.tensor(key)

    def expert_ranges(self, layer: int, e: int) -> list[TensorRange]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def check_unchanged(self) -> None:
        """CheckpointError naming the file if one of the checkpoint's files was deleted, replaced, resized or
        modified since it was opened (SafetensorsFile.check_unchanged)."""
        raise NotImplementedError

    def advise_random(self, r: TensorRange) -> bool:
        """No readahead when the mapped pages of range r fault (SafetensorsFile.advise_random); False if the
        advice was not taken."""
        raise NotImplementedError

    def mappings(self) -> list[tuple[str, int, int]]:
        """(path, address, length) of every mapped file, for the engine's SIGBUS guard (kernels.guard_mapping)."""
        raise NotImplementedError

    def _fused_qkv(self, prefix: str) -> bool:
        return True

    def embedding(self) -> np.ndarray | Q8Weight:
        return self.weight("embedding.weight")  # [V, H]

    def final_norm(self) -> np.ndarray:
        return self.tensor("norm.scale")  # [H]

    def unembedding(self) -> np.ndarray | Q8Weight:
        return self.weight("unembedding.weight")  # [V, H]

    def _check_layer(self, layer: int) -> str:
        if not 0 <= layer < self.config.num_hidden_layers:
            raise ValueError(f"layer {layer} out of range (model has {self.config.num_hidden_layers})")
        return f"block.{layer}."

    def _check_expert(self, layer: int, e: int) -> str:
        prefix = self._check_layer(layer)
        if not 0 <= e < self.config.num_experts:
            raise ValueError(f"expert {e} out of range (model has {self.config.num_experts})")
        return prefix

    def layer(self, n: int) -> LayerWeights:
        p = self._check_layer(n)
        t, w = self.tensor, self.weight
        fused = self._fused_qkv(p)
        return LayerWeights(
            attn_norm=t(p + "attn.norm.scale"),
            q_weight=w(p + "attn.q.weight"), q_bias=t(p + "attn.q.bias"),
            k_weight=w(p + "attn.k.weight"), k_bias=t(p + "attn.k.bias"),
            v_weight=w(p + "attn.v.weight"), v_bias=t(p + "attn.v.bias"),
            sinks=t(p + "attn.sinks"),
            out_weight=w(p + "attn.out.weight"), out_bias=t(p + "attn.out.bias"),
            mlp_norm=t(p + "mlp.norm.scale"),
            gate_weight=t(p + "mlp.gate.weight"), gate_bias=t(p + "mlp.gate.bias"),
            qkv_weight=w(p + "attn.qkv.weight") if fused else None,
            qkv_bias=t(p + "attn.qkv.bias") if fused else None,
        )

    def expert_nbytes(self, layer: int, e: int) -> int:
        return sum(r.nbytes for r in self.expert_ranges(layer, e))

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
