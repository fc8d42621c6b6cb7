"""The repacked checkpoint layout (SPEC §2c, docs/repacked-format.md): its definition and its reader.

Published checkpoints spread one expert over six tensors far apart in the file, so fetching an expert
costs six scattered reads. `gptoss repack` (weights/repack.py) rewrites a checkpoint so that each expert's six
MXFP4 pieces lie back to back in one record whose offset and length are multiples of the alignment
(4096 by default): one read per routed expert, O_DIRECT-able. Dense weights are grouped in the order
the forward pass uses them. The shards stay ordinary safetensors files: alignment gaps are filled with
U8 padding tensors, because safetensors requires the data section to be covered without holes. A
manifest, gptoss-repack.json, gives the config, every record's place and sha256, and each shard's sha256.

`RepackedCheckpoint` offers the API of published.PublishedCheckpoint (config, format, embedding(), layer(n),
expert(layer, e), final_norm(), unembedding(), tensor(), tensor_range(), address(), files(), close());
`open_checkpoint` (weights/checkpoint.py) hands directories holding a manifest to it. The one difference: an
expert's `ranges` is a single range covering its whole record (padding included), so a store reads it in one
request.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gptoss_stream.weights.config import ModelConfig
from gptoss_stream.weights.jsonio import MAX_MANIFEST_BYTES, is_plain_file_name, read_json_file
from gptoss_stream.weights.layouts.base import (
    DENSE_FORMATS, EXPERT_PIECES, Q8_BLOCK, Q8_SCALES_SUFFIX, Q8_VALUES_SUFFIX, ExpertWeights, NamedWeights, Q8Weight,
    TensorRange, is_q8_weight, original_tensors,
)
from gptoss_stream.weights.safetensors_file import SafetensorsFile, TensorInfo, tensor_nbytes

FORMAT = "repacked"                # Checkpoint.format of a repacked checkpoint
FORMAT_NAME = "gptoss-repacked"    # manifest "format"
FORMAT_VERSION = 1                 # bf16 dense weights: the published bytes, unchanged since the first repack
# A q8 repack (--dense q8) is version 2 with "dense_format": "q8": a reader that only knows version 1 refuses it
# ("repack format version 2; this gptoss reads version 1") instead of misreading its int8 tensors, while bf16
# repacks keep version 1 and stay byte-identical to what earlier versions wrote.
Q8_FORMAT_VERSION = 2
FORMAT_VERSIONS = {"bf16": FORMAT_VERSION, "q8": Q8_FORMAT_VERSION}
MANIFEST = "gptoss-repack.json"
MANIFEST_PARTIAL = MANIFEST + ".partial"  # the manifest of a repack in progress (never loadable)
SHARD_PREFIX = "repacked-"
DEFAULT_ALIGN = 4096  # page size and the O_DIRECT granularity of common filesystems
PADDING_PREFIX = "padding."
# "format": "pt" keeps transformers/safetensors' torch loaders happy with the shards.
SHARD_METADATA = {"format": "pt", "gptoss_repacked": str(FORMAT_VERSION)}


def shard_metadata(dense: str = "bf16") -> dict[str, str]:
    """The shards' safetensors `__metadata__`: bf16 ones exactly as version 1 wrote them."""
    if dense == "bf16":
        return dict(SHARD_METADATA)
    return {"format": "pt", "gptoss_repacked": str(FORMAT_VERSIONS[dense]), "gptoss_dense": dense}

# Dense tensors of one layer, in the order the forward pass reads them (SPEC §4).
LAYER_DENSE: tuple[str, ...] = (
    "attn.norm.scale", "attn.qkv.weight", "attn.qkv.bias", "attn.sinks", "attn.out.weight", "attn.out.bias",
    "mlp.norm.scale", "mlp.gate.weight", "mlp.gate.bias",
)
# An expert record's pieces, in record order: mlp1 is read first, then mlp2.
EXPERT_PIECE_NAMES: tuple[str, ...] = tuple(p.removeprefix("mlp.") for p in EXPERT_PIECES)


# ---------------------------------------------------------------------------- the layout

@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


@dataclass(frozen=True)
class Record:
    """A run of tensors written back to back and padded to the alignment: one read fetches it."""
    name: str                        # "embedding", "block.3.dense", "block.3.mlp.experts.17", "final"
    tensors: tuple[TensorSpec, ...]
    layer: int = -1                  # for dense layer groups and experts
    expert: int = -1                 # for experts

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def padding_name(self) -> str:
        return PADDING_PREFIX + self.name


def round_up(n: int, align: int) -> int:
    return -(-n // align) * align


def expert_prefix(layer: int, expert: int) -> str:
    return f"block.{layer}.mlp.experts.{expert}."


def expert_pieces(cfg: ModelConfig) -> list[tuple[str, int, str, tuple[int, ...]]]:
    """(piece name, byte offset inside the record, dtype, shape) of an expert record's six tensors."""
    src = original_tensors(cfg)
    out, pos = [], 0
    for piece, full in zip(EXPERT_PIECE_NAMES, EXPERT_PIECES):
        dtype, shape = src[f"block.0.{full}"]
        out.append((piece, pos, dtype, shape[1:]))
        pos += tensor_nbytes(dtype, shape[1:])
    return out


def check_dense_format(cfg: ModelConfig, dense: str) -> None:
    """ValueError if `dense` is not a dense format, or q8 for a config whose rows are not whole q8 blocks."""
    if dense not in DENSE_FORMATS:
        raise ValueError(f"dense format must be one of {', '.join(DENSE_FORMATS)}, got {dense!r:.40}")
    if dense == "q8":
        for name, (_, shape) in original_tensors(cfg).items():
            if is_q8_weight(name) and shape[1] % Q8_BLOCK:
                raise ValueError(f"--dense q8 needs rows of whole {Q8_BLOCK}-value blocks; {name} has "
                                 f"{shape[1]} columns")


def dense_specs(name: str, dtype: str, shape: tuple[int, ...], dense: str) -> tuple[TensorSpec, ...]:
    """How an original-format dense tensor is stored: itself, or (q8 values, q8 scales) for a q8 weight."""
    if dense == "q8" and is_q8_weight(name):
        n, k = shape
        return (TensorSpec(name + Q8_VALUES_SUFFIX, "I8", (n, k)),
                TensorSpec(name + Q8_SCALES_SUFFIX, "F16", (n, k // Q8_BLOCK)))
    return (TensorSpec(name, dtype, shape),)


def records(cfg: ModelConfig, dense: str = "bf16") -> list[Record]:
    """Every record in file order: embedding; per layer its dense group then its experts; final norm + unembedding.
    dense="q8": the Q8_WEIGHTS are two tensors each (NAME.q8, NAME.q8_scales), in the same place."""
    check_dense_format(cfg, dense)
    src = original_tensors(cfg)

    def spec(*names: str) -> tuple[TensorSpec, ...]:
        return tuple(t for name in names for t in dense_specs(name, *src[name], dense))

    pieces = expert_pieces(cfg)
    out = [Record("embedding", spec("embedding.weight"))]
    for n in range(cfg.num_hidden_layers):
        out.append(Record(f"block.{n}.dense", spec(*(f"block.{n}.{t}" for t in LAYER_DENSE)), layer=n))
        for e in range(cfg.num_experts):
            p = expert_prefix(n, e)
            out.append(Record(p[:-1], tuple(TensorSpec(p + name, dtype, shape) for name, _, dtype, shape in pieces),
                              layer=n, expert=e))
    out.append(Record("final", spec("norm.scale", "unembedding.weight")))
    return out


def config_to_json(cfg: ModelConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["layer_types"] = list(cfg.layer_types)
    return d


def config_from_json(d: Any, where: str) -> ModelConfig:
    try:
        values = dict(d)
        values["layer_types"] = tuple(values["layer_types"])
        return ModelConfig(**values).validate()
    except (TypeError, KeyError, ValueError) as e:
        raise ValueError(f"{where}: bad \"config\" ({e})") from None


# ---------------------------------------------------------------------------- locating

def manifest_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p.parent if p.is_file() else p


def is_repacked(path: str | os.PathLike) -> bool:
    """True if `path` (a directory, its manifest or its config.json) is a repacked checkpoint,
    complete or interrupted (an interrupted one must fail with its own clear message)."""
    d = manifest_dir(path)
    return (d / MANIFEST).is_file() or (d / MANIFEST_PARTIAL).is_file()


def read_manifest(path: Path) -> dict[str, Any]:
    m = read_json_file(path, MAX_MANIFEST_BYTES, "repack manifest")
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise ValueError(f"{path}: not a gptoss repack manifest (\"format\" is not {FORMAT_NAME!r})")
    if m.get("version") not in FORMAT_VERSIONS.values():
        raise ValueError(f"{path}: repack format version {m.get('version')!r:.80}; this gptoss reads versions "
                         f"{FORMAT_VERSION} (bf16) and {Q8_FORMAT_VERSION} (q8) (re-run `gptoss repack` with "
                         f"this version)")
    dense = manifest_dense_format(m, path)
    if m["version"] != FORMAT_VERSIONS[dense]:
        raise ValueError(f"{path}: \"dense_format\" {dense!r} needs format version {FORMAT_VERSIONS[dense]}, "
                         f"the manifest says {m['version']}")
    for key, kind in (("config", dict), ("align", int), ("expert_record", dict), ("shards", list),
                      ("dense", list), ("experts", list)):
        if not isinstance(m.get(key), kind):
            raise ValueError(f"{path}: \"{key}\" missing or not a {kind.__name__}")
    return m


def manifest_dense_format(m: dict[str, Any], path: Path | str) -> str:
    """A manifest's "dense_format": absent in version 1 (bf16), "q8" in version 2."""
    dense = m.get("dense_format", "bf16")
    if dense not in DENSE_FORMATS:
        raise ValueError(f"{path}: \"dense_format\" must be one of {', '.join(DENSE_FORMATS)}, got {dense!r:.80}")
    return dense


def _int(entry: dict, key: str, where: str) -> int:
    v = entry.get(key) if isinstance(entry, dict) else None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{where}: \"{key}\" must be a non-negative integer, got {v!r:.80}")
    return v


# ---------------------------------------------------------------------------- the reader

@dataclass(frozen=True)
class _Where:
    file: SafetensorsFile
    info: TensorInfo

    def view(self) -> np.ndarray:
        return self.file.view_bytes(self.info.offset, self.info.nbytes, self.info.dtype, self.info.shape)

    def rows(self, r0: int, r1: int, key: str) -> "_Where":
        """Rows [r0, r1) of this tensor (its first axis), named `key`."""
        row = self.info.nbytes // self.info.shape[0]
        return _Where(self.file, TensorInfo(key, self.info.dtype, (r1 - r0, *self.info.shape[1:]),
                                            self.info.offset + r0 * row, (r1 - r0) * row))


class RepackedCheckpoint(NamedWeights):
    """Zero-copy access to a checkpoint written by `gptoss repack`."""

    format = FORMAT

    def __init__(self, path: Path, config: ModelConfig, manifest: dict[str, Any], files: list[SafetensorsFile],
                 tensors: dict[str, _Where], experts: list[list[tuple[int, int, int]]]):
        self.path = path
        self.config = config
        self.manifest = manifest
        self.align: int = manifest["align"]
        self._files = files
        self._by_path = {f.path: f for f in files}
        self._tensors = tensors
        self._experts = experts  # [layer][expert] -> (file index, offset, length)
        self._pieces = expert_pieces(config)
        self.dense_format: str = manifest_dense_format(manifest, path)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "RepackedCheckpoint":
        d = manifest_dir(path)
        mpath = d / MANIFEST
        if not mpath.is_file():
            if (d / MANIFEST_PARTIAL).is_file():
                raise ValueError(f"{d}: incomplete repack ({MANIFEST} missing: `gptoss repack` was interrupted); "
                                 f"re-run the same command to finish it")
            raise FileNotFoundError(f"{mpath}: repack manifest not found")
        m = read_manifest(mpath)
        cfg = config_from_json(m["config"], str(mpath))
        files: list[SafetensorsFile] = []
        try:
            tensors, experts = cls._index(d, mpath, m, cfg, files)
        except BaseException:
            for f in files:
                f.close()
            raise
        return cls(d, cfg, m, files, tensors, experts)

    @staticmethod
    def _index(d: Path, mpath: Path, m: dict[str, Any], cfg: ModelConfig, files: list[SafetensorsFile]
               ) -> tuple[dict[str, _Where], list[list[tuple[int, int, int]]]]:
        """Open the shards and check them against the manifest: sizes, every tensor, every record's place."""
        align = m["align"]
        if align < 8 or align & (align - 1):
            raise ValueError(f"{mpath}: \"align\" {align} is not a power of two >= 8")
        dense = manifest_dense_format(m, mpath)
        try:
            layout = records(cfg, dense)
        except ValueError as e:
            raise ValueError(f"{mpath}: {e}") from None
        tensors: dict[str, _Where] = {}
        for i, entry in enumerate(m["shards"]):
            name = entry.get("file") if isinstance(entry, dict) else None
            if not is_plain_file_name(name):
                raise ValueError(f"{mpath}: shard {i} \"file\" must be a plain file name, got {name!r:.80}")
            size = _int(entry, "size", f"{mpath}: shard {name}")
            shard = d / name
            if not shard.is_file():
                raise FileNotFoundError(f"{shard}: shard listed in {mpath} not found")
            if shard.stat().st_size != size:
                raise ValueError(f"{shard}: {shard.stat().st_size} bytes, the manifest says {size} (truncated or "
                                 f"replaced?)")
            f = SafetensorsFile(shard)
            files.append(f)
            for t in f.tensors.values():
                if t.name in tensors:
                    raise ValueError(f"{shard}: tensor {t.name!r} also appears in {tensors[t.name].file.path}")
                tensors[t.name] = _Where(f, t)

        def check(name: str, dtype: str, shape: tuple[int, ...]) -> _Where:
            w = tensors.get(name)
            if w is None:
                raise ValueError(f"{d}: tensor {name!r} missing from the repacked shards")
            if w.info.dtype != dtype or w.info.shape != shape:
                raise ValueError(f"{w.file.path}: tensor {name!r} is {w.info.dtype} {list(w.info.shape)}, "
                                 f"expected {dtype} {list(shape)} for this config")
            return w

        for r in layout:
            if r.expert < 0:
                for t in r.tensors:
                    check(t.name, t.dtype, t.shape)
        pieces = expert_pieces(cfg)
        record_bytes = sum(tensor_nbytes(dt, sh) for _, _, dt, sh in pieces)
        grid = m["experts"]
        if len(grid) != cfg.num_hidden_layers or any(not isinstance(row, list) or len(row) != cfg.num_experts
                                                     for row in grid):
            raise ValueError(f"{mpath}: \"experts\" must be {cfg.num_hidden_layers} lists of {cfg.num_experts}")
        experts: list[list[tuple[int, int, int]]] = []
        for n, row in enumerate(grid):
            experts.append([])
            for e, entry in enumerate(row):
                where = f"{mpath}: expert {e} of layer {n}"
                shard, offset, length = (_int(entry, k, where) for k in ("shard", "offset", "length"))
                if shard >= len(files):
                    raise ValueError(f"{where}: shard {shard} does not exist ({len(files)} shards)")
                if offset % align or length % align or length < record_bytes:
                    raise ValueError(f"{where}: record [{offset}, +{length}) is not {align}-aligned or is shorter "
                                     f"than the expert's {record_bytes} bytes")
                if offset + length > files[shard].size:
                    raise ValueError(f"{where}: record [{offset}, +{length}) runs past the end of {files[shard].path}")
                p = expert_prefix(n, e)
                for piece, rel, dtype, shape in pieces:
                    w = check(p + piece, dtype, shape)
                    if w.file is not files[shard] or w.info.offset != offset + rel:
                        raise ValueError(f"{w.file.path}: tensor {p + piece!r} is not at byte {rel} of the record the "
                                         f"manifest gives ({files[shard].path} @ {offset})")
                experts[-1].append((shard, offset, length))
        return tensors, experts

    # ------------------------------------------------------------------ access
    def _qkv_rows(self, key: str) -> tuple[str, int, int] | None:
        """For 'block.N.attn.{q,k,v}.SUFFIX': the fused name 'block.N.attn.qkv.SUFFIX' and the rows it covers."""
        parts = key.split(".", 4)
        if len(parts) == 5 and parts[0] == "block" and parts[2] == "attn" and parts[3] in ("q", "k", "v"):
            q, kv = self.config.q_dim, self.config.kv_dim
            r0, r1 = {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}[parts[3]]
            return f"block.{parts[1]}.attn.qkv.{parts[4]}", r0, r1
        return None

    def _where(self, key: str) -> _Where:
        # The per-projection names of Checkpoint: q, k, v are row slices of the fused qkv tensor.
        fused = self._qkv_rows(key)
        if fused is not None:
            name, r0, r1 = fused
            return self._where(name).rows(r0, r1, key)
        w = self._tensors.get(key)
        if w is None or key.startswith(PADDING_PREFIX):
            if self.dense_format == "q8" and is_q8_weight(key):
                raise ValueError(f"{self.path}: {key!r} is stored as q8 in this checkpoint (tensors {key}"
                                 f"{Q8_VALUES_SUFFIX} and {key}{Q8_SCALES_SUFFIX}): use weight({key!r})")
            raise ValueError(f"{self.path}: no tensor {key!r} in this repacked checkpoint")
        return w

    def _is_q8(self, key: str) -> bool:
        fused = self._qkv_rows(key)
        return self.dense_format == "q8" and is_q8_weight(fused[0] if fused else key)

    def tensor(self, key: str) -> np.ndarray:
        """A view by name: original-format dense names ('block.3.attn.qkv.weight', 'embedding.weight', ...),
        'block.N.attn.{q,k,v}.{weight,bias}', and expert pieces 'block.N.mlp.experts.E.mlp1_weight.blocks'.
        In a q8 checkpoint the q8 weights are 'NAME.q8' (int8) and 'NAME.q8_scales' (fp16); weight(NAME) pairs them."""
        return self._where(key).view()

    def weight(self, key: str) -> np.ndarray | Q8Weight:
        """tensor(key), except that a weight stored as q8 comes as a Q8Weight (q/k/v: row views of qkv's)."""
        if not self._is_q8(key):
            return self.tensor(key)
        values = self._where(key + Q8_VALUES_SUFFIX).view()
        scales = self._where(key + Q8_SCALES_SUFFIX).view().view(np.uint16)  # fp16 bits, as the kernels take them
        return Q8Weight(values, scales)

    def tensor_range(self, key: str) -> TensorRange:
        """The bytes of tensor `key`; for a weight stored as q8, of its values and scales together (the two are
        adjacent in their record), so the memory plan and page-cache advice cover both."""
        if self._is_q8(key):
            a, b = self._where(key + Q8_VALUES_SUFFIX), self._where(key + Q8_SCALES_SUFFIX)
            if a.file is b.file and a.info.offset + a.info.nbytes == b.info.offset:
                return TensorRange(a.file.path, a.info.offset, a.info.nbytes + b.info.nbytes)
            raise ValueError(f"{self.path}: {key}{Q8_SCALES_SUFFIX} does not follow {key}{Q8_VALUES_SUFFIX}")
        w = self._where(key)
        return TensorRange(w.file.path, w.info.offset, w.info.nbytes)

    def address(self, r: TensorRange) -> int:
        """Raw pointer to the first byte of a range inside the mapping (for the C library)."""
        return self._by_path[r.path].address(r.offset)

    def advise_random(self, r: TensorRange) -> bool:
        return self._by_path[r.path].advise_random(r.offset, r.nbytes)

    def _record(self, layer: int, e: int) -> tuple[SafetensorsFile, int, int]:
        self._check_expert(layer, e)
        shard, offset, length = self._experts[layer][e]
        return self._files[shard], offset, length

    def expert_ranges(self, layer: int, e: int) -> list[TensorRange]:
        """One range: the expert's whole record, padding included (offset and length are multiples of align)."""
        f, offset, length = self._record(layer, e)
        return [TensorRange(f.path, offset, length)]

    def expert_piece_ranges(self, layer: int, e: int) -> list[TensorRange]:
        """The byte ranges of the six pieces, in ExpertWeights order (what Checkpoint.expert_ranges returns)."""
        f, offset, _ = self._record(layer, e)
        return [TensorRange(f.path, offset + rel, tensor_nbytes(dtype, shape)) for _, rel, dtype, shape in self._pieces]

    def record_pieces(self) -> list[tuple[str, int, str, tuple[int, ...]]]:
        """(piece, offset inside the record, dtype, shape) for a store that reads a record into its own buffer."""
        return list(self._pieces)

    def expert(self, layer: int, e: int) -> ExpertWeights:
        f, offset, length = self._record(layer, e)
        views = [f.view_bytes(offset + rel, tensor_nbytes(dtype, shape), dtype, shape)
                 for _, rel, dtype, shape in self._pieces]
        return ExpertWeights(*views, ranges=[TensorRange(f.path, offset, length)])

    def expert_nbytes(self, layer: int, e: int) -> int:
        return self._record(layer, e)[2]

    def files(self) -> list[str]:
        return [f.path for f in self._files]

    def shard(self, i: int) -> SafetensorsFile:
        """Shard i of the manifest's "shards", opened."""
        return self._files[i]

    def nbytes(self) -> int:
        """Total size of the shard files."""
        return sum(f.size for f in self._files)

    def check_unchanged(self) -> None:
        for f in self._files:
            f.check_unchanged()

    def mappings(self) -> list[tuple[str, int, int]]:
        return [(f.path, f.base_address, f.size) for f in self._files]

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        for f in self._files:
            f.close()

    def __repr__(self) -> str:
        return f"RepackedCheckpoint({str(self.path)!r}, {len(self._files)} shard(s))"
