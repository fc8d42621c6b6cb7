"""The two published layouts of a gpt-oss checkpoint, original/ and Hugging Face, as zero-copy numpy views (SPEC §2).

`PublishedCheckpoint.open(path)` (reached through weights/checkpoint.py's `open_checkpoint`) reads
config.json and the safetensors headers, checks every tensor the config implies (name, dtype, shape),
maps the shards and returns. Nothing else is read: each view
is a numpy array over the mapping (bf16 as np.uint16), so RSS grows only with what the forward pass
touches, and each expert's six pieces come with their absolute byte ranges so the streaming layer
can read or prefetch exactly one expert.

Original vs Hugging Face layout (established from transformers' convert_gpt_oss_weights_to_hf.py,
modeling_gpt_oss.py and integrations/mxfp4.py, proven by tests/test_hf_mapping.py):
- names are renamed one to one (table below), except `attn.qkv.{weight,bias}`, which HF splits into
  q/k/v_proj by rows [0, nq*hd), [nq*hd, +nkv*hd), [.., +nkv*hd). No row is reordered or transposed.
- the MXFP4 expert tensors are copied verbatim: `gate_up_proj_blocks` is the original
  `mlp1_weight.blocks` [E, 2I, H/32, 16] with glu/linear rows still interleaved (HF's
  `_apply_gate` takes gate = [..., ::2], up = [..., 1::2]); HF transposes only when it dequantizes
  (`convert_moe_packed_tensors` returns [E, H, 2I] for its x @ W matmul). So an expert is the same
  zero-copy view in both formats.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptoss_stream.weights.config import ModelConfig, config_flavour, load_config, read_config_json
from gptoss_stream.weights.jsonio import MAX_INDEX_BYTES, is_plain_file_name, read_json_file
from gptoss_stream.weights.layouts.base import EXPERT_PIECES, ExpertWeights, NamedWeights, TensorRange, original_tensors
from gptoss_stream.weights.safetensors_file import SafetensorsFile

ORIGINAL = "original"
HF = "hf"
HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"

# ---------------------------------------------------------------------------- tensor naming

# Per-layer suffixes, original name -> HF name (qkv is handled separately: it is split).
_LAYER_RENAMES: dict[str, str] = {
    "attn.norm.scale": "input_layernorm.weight",
    "attn.sinks": "self_attn.sinks",
    "attn.out.weight": "self_attn.o_proj.weight",
    "attn.out.bias": "self_attn.o_proj.bias",
    "mlp.norm.scale": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.router.weight",
    "mlp.gate.bias": "mlp.router.bias",
    "mlp.mlp1_weight.blocks": "mlp.experts.gate_up_proj_blocks",
    "mlp.mlp1_weight.scales": "mlp.experts.gate_up_proj_scales",
    "mlp.mlp1_bias": "mlp.experts.gate_up_proj_bias",
    "mlp.mlp2_weight.blocks": "mlp.experts.down_proj_blocks",
    "mlp.mlp2_weight.scales": "mlp.experts.down_proj_scales",
    "mlp.mlp2_bias": "mlp.experts.down_proj_bias",
}
_GLOBAL_RENAMES: dict[str, str] = {
    "embedding.weight": "model.embed_tokens.weight",
    "norm.scale": "model.norm.weight",
    "unembedding.weight": "lm_head.weight",
}


@dataclass(frozen=True)
class HFTensor:
    """One tensor of the HF layout and where its data comes from in the original layout."""
    name: str
    dtype: str
    shape: tuple[int, ...]
    source: str            # original tensor name
    rows: tuple[int, int]  # row range of the source (q/k/v are row slices of qkv; else all rows)


def hf_tensors(cfg: ModelConfig) -> list[HFTensor]:
    """Every tensor of the HF layout, in original-checkpoint order (q, k, v in place of qkv)."""
    out: list[HFTensor] = []
    q, kv = cfg.q_dim, cfg.kv_dim
    for name, (dtype, shape) in original_tensors(cfg).items():
        if name in _GLOBAL_RENAMES:
            out.append(HFTensor(_GLOBAL_RENAMES[name], dtype, shape, name, (0, shape[0])))
            continue
        _, n, suffix = name.split(".", 2)
        p = f"model.layers.{n}."
        if suffix.startswith("attn.qkv."):
            kind = suffix.rsplit(".", 1)[1]  # weight | bias
            for proj, (r0, r1) in (("q", (0, q)), ("k", (q, q + kv)), ("v", (q + kv, q + 2 * kv))):
                out.append(HFTensor(f"{p}self_attn.{proj}_proj.{kind}", dtype, (r1 - r0, *shape[1:]), name, (r0, r1)))
        else:
            out.append(HFTensor(p + _LAYER_RENAMES[suffix], dtype, shape, name, (0, shape[0])))
    return out


@dataclass(frozen=True)
class _Slot:
    """Where a logical tensor lives: a byte range of a mapped file, with its dtype and shape."""
    file: SafetensorsFile
    name: str  # tensor name in that file (for messages)
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]

    def view(self) -> np.ndarray:
        return self.file.view_bytes(self.offset, self.nbytes, self.dtype, self.shape)

    def rows(self, r0: int, r1: int) -> "_Slot":
        row = self.nbytes // self.shape[0] if self.shape[0] else 0
        return _Slot(self.file, self.name, self.offset + r0 * row, (r1 - r0) * row, self.dtype,
                     (r1 - r0, *self.shape[1:]))


# ---------------------------------------------------------------------------- locating a checkpoint

def locate(path: str | os.PathLike, format: str | None = None) -> tuple[str, Path]:
    """Find (format, directory) for a checkpoint path.

    Accepted: an original dir (config.json with original keys + *.safetensors), an HF dir (HF
    config.json + model.safetensors.index.json or model.safetensors), a config.json file, or a
    parent holding `original/` and/or `hf/` (what `gptoss make-checkpoint --format both` writes).
    An HF repo root that also has `original/` opens `original/` unless format="hf": both hold the
    same bytes, and the single-file original layout is the one SPEC §2a and OpenAI's reference read.
    """
    if format not in (None, ORIGINAL, HF):
        raise ValueError(f"unknown checkpoint format {format!r}; expected 'original' or 'hf'")
    p = Path(path)
    if p.is_file():
        if p.name != "config.json":
            raise ValueError(f"{p}: expected a checkpoint directory or its config.json")
        p = p.parent
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: checkpoint directory not found")

    def flavour(d: Path) -> str | None:
        cfg = d / "config.json"
        if not cfg.is_file():
            return None
        content = read_config_json(cfg)
        try:
            return config_flavour(content)
        except ValueError as e:
            raise ValueError(f"{cfg}: {e}") from None

    here = flavour(p)
    sub_original = p / ORIGINAL if (p / ORIGINAL / "config.json").is_file() else None
    sub_hf = p / HF if (p / HF / "config.json").is_file() else None
    candidates: list[tuple[str, Path]] = []
    if here == ORIGINAL:
        candidates.append((ORIGINAL, p))
    if sub_original is not None and flavour(sub_original) == ORIGINAL:
        candidates.append((ORIGINAL, sub_original))
    if here == HF:
        candidates.append((HF, p))
    if sub_hf is not None and flavour(sub_hf) == HF:
        candidates.append((HF, sub_hf))
    for fmt, d in candidates:
        if format is None or fmt == format:
            return fmt, d
    if not candidates:
        raise FileNotFoundError(f"{p}: no config.json here nor in {p / ORIGINAL} or {p / HF}")
    raise FileNotFoundError(f"{p}: no {format} checkpoint here (found {', '.join(f for f, _ in candidates)})")


def _hf_shard_names(d: Path) -> dict[str, str]:
    """tensor name -> shard file name, from the index (or the single model.safetensors)."""
    index = d / HF_INDEX
    if index.is_file():
        data = read_json_file(index, MAX_INDEX_BYTES, HF_INDEX)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index}: expected {{'weight_map': {{tensor: file}}}}")
        for fname in set(weight_map.values()):
            if not is_plain_file_name(fname):
                raise ValueError(f"{index}: shard name {fname!r:.80} must be a plain file name")
        return weight_map
    if (d / HF_SINGLE).is_file():
        return {}  # resolved from the single file's header
    raise FileNotFoundError(f"{d}: neither {HF_INDEX} nor {HF_SINGLE} found")


# ---------------------------------------------------------------------------- the checkpoint

class PublishedCheckpoint(NamedWeights):
    """Zero-copy access to a gpt-oss checkpoint in the original or Hugging Face layout."""

    def __init__(self, path: Path, format: str, config: ModelConfig, files: dict[str, SafetensorsFile],
                 slots: dict[str, _Slot]):
        self.path = path
        self.format = format
        self.config = config
        self._files = files
        self._slots = slots

    @classmethod
    def open(cls, path: str | os.PathLike, format: str | None = None) -> "PublishedCheckpoint":
        fmt, d = locate(path, format)
        config = load_config(d)
        files: dict[str, SafetensorsFile] = {}
        try:
            slots = (cls._original_slots if fmt == ORIGINAL else cls._hf_slots)(d, config, files)
        except BaseException:
            for f in files.values():
                f.close()
            raise
        return cls(d, fmt, config, files, slots)

    # ------------------------------------------------------------------ building the slot table
    @staticmethod
    def _open_file(path: Path, files: dict[str, SafetensorsFile]) -> SafetensorsFile:
        key = str(path)
        if key not in files:
            files[key] = SafetensorsFile(path)
        return files[key]

    @staticmethod
    def _check(f: SafetensorsFile, name: str, dtype: str, shapes: list[tuple[int, ...]]) -> _Slot:
        t = f.info(name)
        if t.dtype != dtype:
            raise ValueError(f"{f.path}: tensor {name!r} has dtype {t.dtype}, expected {dtype}")
        if t.shape not in shapes:
            raise ValueError(f"{f.path}: tensor {name!r} has shape {list(t.shape)}, "
                             f"expected {list(shapes[0])} for this config.json")
        return _Slot(f, name, t.offset, t.nbytes, dtype, shapes[0])

    @classmethod
    def _original_slots(cls, d: Path, cfg: ModelConfig, files: dict[str, SafetensorsFile]) -> dict[str, _Slot]:
        # Like OpenAI's reference loader: every *.safetensors in the directory (the 120b original is sharded).
        paths = sorted(d.glob("*.safetensors"))
        if not paths:
            raise FileNotFoundError(f"{d}: no model.safetensors (original format)")
        where: dict[str, SafetensorsFile] = {}
        for p in paths:
            f = cls._open_file(p, files)
            for name in f.tensors:
                if name in where:
                    raise ValueError(f"{p}: tensor {name!r} also appears in {where[name].path}")
                where[name] = f
        slots: dict[str, _Slot] = {}
        for name, (dtype, shape) in original_tensors(cfg).items():
            if name not in where:
                raise ValueError(f"{d}: tensor {name!r} missing from {', '.join(str(p.name) for p in paths)}")
            slots[name] = cls._check(where[name], name, dtype, [shape])
        for n in range(cfg.num_hidden_layers):
            p = f"block.{n}.attn."
            q, kv = cfg.q_dim, cfg.kv_dim
            for kind in ("weight", "bias"):
                qkv = slots[f"{p}qkv.{kind}"]
                slots[f"{p}q.{kind}"] = qkv.rows(0, q)
                slots[f"{p}k.{kind}"] = qkv.rows(q, q + kv)
                slots[f"{p}v.{kind}"] = qkv.rows(q + kv, q + 2 * kv)
        return slots

    @classmethod
    def _hf_slots(cls, d: Path, cfg: ModelConfig, files: dict[str, SafetensorsFile]) -> dict[str, _Slot]:
        weight_map = _hf_shard_names(d)
        index_name = HF_INDEX if weight_map else HF_SINGLE
        slots: dict[str, _Slot] = {}
        for t in hf_tensors(cfg):
            fname = weight_map.get(t.name, None if weight_map else HF_SINGLE)
            if fname is None:
                raise ValueError(f"{d / index_name}: tensor {t.name!r} missing from the weight map")
            shard = d / fname
            if not shard.is_file():
                raise FileNotFoundError(f"{shard}: shard not found (listed in {d / index_name} for {t.name!r})")
            f = cls._open_file(shard, files)
            if t.name not in f:
                raise ValueError(f"{shard}: tensor {t.name!r} missing (the index says it is in this shard)")
            shapes = [t.shape]
            if t.name.endswith("_blocks"):
                # Re-saved HF checkpoints may store the blocks 3-D [E, rows, cols/2]; same bytes.
                shapes.append((*t.shape[:2], t.shape[2] * t.shape[3]))
            slot = cls._check(f, t.name, t.dtype, shapes)
            _, n, suffix = t.source.split(".", 2) if t.source.startswith("block.") else ("", "", t.source)
            if suffix.startswith("attn.qkv."):
                proj = t.name.rsplit(".", 2)[1][0]  # q | k | v
                slots[f"block.{n}.attn.{proj}.{suffix.rsplit('.', 1)[1]}"] = slot
            else:
                slots[t.source] = slot
        # q, k, v written back to back (as our generator and OpenAI's fused tensor do) give a fused view.
        for n in range(cfg.num_hidden_layers):
            p = f"block.{n}.attn."
            for kind in ("weight", "bias"):
                q, k, v = (slots[f"{p}{x}.{kind}"] for x in "qkv")
                if q.file is k.file is v.file and q.offset + q.nbytes == k.offset and k.offset + k.nbytes == v.offset:
                    slots[f"{p}qkv.{kind}"] = _Slot(q.file, f"{q.name}+k+v", q.offset, q.nbytes + k.nbytes + v.nbytes,
                                                     q.dtype, (cfg.qkv_dim, *q.shape[1:]))
        return slots

    # ------------------------------------------------------------------ access
    def _slot(self, key: str) -> _Slot:
        try:
            return self._slots[key]
        except KeyError:
            raise ValueError(f"{self.path}: no tensor {key!r} in this {self.format} checkpoint") from None

    def tensor(self, key: str) -> np.ndarray:
        """A view by original-format name ('block.3.attn.sinks', 'embedding.weight', ...), plus
        'block.N.attn.{q,k,v}.{weight,bias}' for the per-projection slices."""
        return self._slot(key).view()

    def tensor_range(self, key: str) -> TensorRange:
        s = self._slot(key)
        return TensorRange(s.file.path, s.offset, s.nbytes)

    def address(self, r: TensorRange) -> int:
        """Raw pointer to the first byte of a range inside the mapping (for the C library)."""
        return self._files[r.path].address(r.offset)

    def advise_random(self, r: TensorRange) -> bool:
        return self._files[r.path].advise_random(r.offset, r.nbytes)

    def _fused_qkv(self, prefix: str) -> bool:
        # Built (zero-copy) only when q, k, v are adjacent: always in the original layout, not in HF's.
        return f"{prefix}attn.qkv.weight" in self._slots and f"{prefix}attn.qkv.bias" in self._slots

    def expert_ranges(self, layer: int, e: int) -> list[TensorRange]:
        p = self._check_expert(layer, e)
        out = []
        for piece in EXPERT_PIECES:
            s = self._slots[p + piece]
            per = s.nbytes // self.config.num_experts  # one expert's rows are contiguous (SPEC §2a)
            out.append(TensorRange(s.file.path, s.offset + e * per, per))
        return out

    def expert(self, layer: int, e: int) -> ExpertWeights:
        ranges = self.expert_ranges(layer, e)
        views = []
        for piece, r in zip(EXPERT_PIECES, ranges):
            s = self._slots[f"block.{layer}.{piece}"]
            views.append(s.file.view_bytes(r.offset, r.nbytes, s.dtype, s.shape[1:]))
        return ExpertWeights(*views, ranges=ranges)

    def files(self) -> list[str]:
        return list(self._files)

    def nbytes(self) -> int:
        """Total size of the shard files."""
        return sum(f.size for f in self._files.values())

    def check_unchanged(self) -> None:
        for f in self._files.values():
            f.check_unchanged()

    def mappings(self) -> list[tuple[str, int, int]]:
        return [(f.path, f.base_address, f.size) for f in self._files.values()]

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, format={self.format!r}, {len(self._files)} file(s))"

