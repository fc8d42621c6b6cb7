"""Synthetic gpt-oss checkpoints in the official formats (the writer behind `gptoss make-checkpoint`,
commands/make_checkpoint.py).

No real weights can be downloaded here, so we write random ones with the exact file layout of
the published checkpoints (SPEC §2): `original/` (config.json + model.safetensors) and the Hugging
Face layout (config.json + model-0000X-of-0000Y.safetensors + model.safetensors.index.json).

Determinism. Every tensor is cut into fixed generation units (whole leading-axis rows, about
16 MiB; one unit = a few experts for the MXFP4 tensors) and unit u of original tensor `name` is
drawn from its own PCG64 stream seeded by (seed, sha256(name), u). A tensor's bytes therefore
depend only on (seed, name, config), not on the format, the write order or the sharding: both
formats written from one seed hold bit-identical weights (HF's q/k/v are row slices of `qkv`).
Normal values come from a 65536-quantile table indexed by the stream's raw bits: 5x faster than
numpy's normal sampler and finer than bf16 can tell apart.

Statistics (random, but shaped like a trained model so activations stay finite and routing is
meaningful; the inputs of every projection are RMS-normalised, rms ~ 1):
- Linear weights: N(0, 1/fan_in) (q/k/v: fan_in = H, out: nq*hd), so every projection keeps
  rms ~ 1; attention scores q.k/sqrt(hd) are ~N(0, 1), softmax is neither flat nor one-hot.
  Biases N(0, 0.02^2); expert biases N(0, 0.05^2).
- Embedding N(0, 1); unembedding N(0, (2/sqrt(H))^2), logits ~N(0, 4) after the final norm.
- RMSNorm scales N(1, 0.05^2): near one, not exactly one (so a missing scale is visible).
- Sinks: magnitudes U(0.25, 2.5), even heads negative, odd heads positive (both signs occur in
  every layer, like the trained model's sinks).
- Router: weight N(0, (3/sqrt(H))^2), bias N(0, 0.25^2): gate logits have std ~3, large enough
  that the 4th and 5th largest rarely tie in bf16, and every expert wins for some tokens.
- MXFP4 experts: each FP4 code is drawn from a rounded N(0, 2.5^2) (half the codes are below 1.75
  and +-6 appears ~5% of the time, as in a quantised Gaussian block); each block's E8M0 scale is
  s0 + {-1: 1/4, 0: 1/2, +1: 1/4} with s0 chosen so the dequantised weights have std
  ~1/sqrt(fan_in) (fan_in = H for mlp1, I for mlp2). For H = 2880, s0 = 120, i.e. 2^-7.

Bounded memory: the header is computed from shapes and written first; tensors follow unit by unit
(<= 16 MiB each), so a 13.8 GB 20b checkpoint is written with a few tens of MB of RSS. Files are
written under a `.partial` name and renamed when complete.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import statistics
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from gptoss_stream.errors import DiskSpaceError, InputError
from gptoss_stream.progress import ProgressBar, format_bytes
from gptoss_stream.weights.config import ModelConfig
from gptoss_stream.weights.layouts.base import original_tensors
from gptoss_stream.weights.layouts.published import HF_INDEX, HFTensor, hf_tensors
from gptoss_stream.weights.safetensors_file import tensor_nbytes, write_header, write_order

GEN_UNIT_BYTES = 16 << 20
DEFAULT_MAX_SHARD_BYTES = 4_800_000_000  # what transformers' gpt-oss conversion used for the published repos
DISK_MARGIN_BYTES = 16 << 20  # config.json, the HF index, file-system blocks: never more than this
SAFETENSORS_METADATA = {"format": "pt"}  # transformers refuses shards without it

EMBED_STD = 1.0
UNEMBED_GAIN = 2.0
NORM_STD = 0.05
BIAS_STD = 0.02
EXPERT_BIAS_STD = 0.05
ROUTER_GAIN = 3.0
ROUTER_BIAS_STD = 0.25
SINK_RANGE = (0.25, 2.5)
FP4_CODE_STD = 2.5
FP4_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


# ---------------------------------------------------------------------------- random streams

def _stream(seed: int, name: str, unit: int) -> np.random.PCG64:
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    words = [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4)]
    return np.random.PCG64(np.random.SeedSequence([seed, *words, unit]))


def _random_u16(bits: np.random.PCG64, n: int) -> np.ndarray:
    # Raw 64-bit outputs are ~5x faster than Generator.bytes/integers; four u16 per draw.
    return bits.random_raw((n + 3) // 4).view(np.uint16)[:n]


@functools.cache
def _normal_quantiles() -> np.ndarray:
    """N(0, 1) at the 65536 mid-quantiles: a random u16 indexes it to draw a normal value.

    65536 levels are far finer than bf16's 8-bit mantissa, and table lookups are ~5x faster than
    numpy's normal sampler, which matters for the 1.2 billion dense values of a 20b checkpoint.
    """
    nd = statistics.NormalDist()
    return np.array([nd.inv_cdf((i + 0.5) / 65536) for i in range(65536)], dtype=np.float64)


@functools.cache
def _normal_bf16_table(mean: float, std: float) -> np.ndarray:
    return to_bf16((mean + std * _normal_quantiles()).astype(np.float32))


def rows_per_unit(dtype: str, shape: tuple[int, ...]) -> int:
    """Leading-axis rows generated from one random stream (a function of the shape only)."""
    if len(shape) < 2 or shape[0] == 0:
        return max(shape[0], 1) if shape else 1
    row = tensor_nbytes(dtype, shape[1:])
    return max(1, GEN_UNIT_BYTES // max(row, 1))


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), round to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    r = (u >> 16) & 1
    r += 0x7FFF
    r += u
    r >>= 16
    return r.astype(np.uint16)


def bf16_to_f32(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.uint32) << 16).view(np.float32)


@functools.cache
def _fp4_code_table() -> tuple[np.ndarray, float]:
    """(lut[65536] -> one byte of two FP4 codes, std of a code's value).

    A random u16 picks a byte: its low and high 8 bits each index a 256-entry table whose entries
    are FP4 codes with frequencies of a rounded N(0, FP4_CODE_STD^2), half of them negative.
    """
    bounds = [(a + b) / 2 for a, b in zip(FP4_MAGNITUDES, FP4_MAGNITUDES[1:])] + [math.inf]
    cdf = [math.erf(b / (FP4_CODE_STD * math.sqrt(2))) for b in bounds]  # P(|x| < b)
    probs = [cdf[0]] + [cdf[i] - cdf[i - 1] for i in range(1, len(cdf))]
    counts = [round(p * 128) for p in probs]
    counts[int(np.argmax(counts))] += 128 - sum(counts)
    half = np.repeat(np.arange(8, dtype=np.uint8), counts)          # 128 magnitude codes
    table = np.concatenate([half, half | 8])                          # + the same with the sign bit
    values = np.array(FP4_MAGNITUDES)[table & 7]
    code_std = float(np.sqrt(np.mean(values ** 2)))
    lo = table[np.arange(65536) & 0xFF]
    hi = table[np.arange(65536) >> 8]
    return (lo | (hi << 4)).astype(np.uint8), code_std


_SCALE_JITTER = np.array([-1] * 64 + [0] * 128 + [1] * 64, dtype=np.int16)  # indexed by a random byte


def mxfp4_scale_center(fan_in: int) -> int:
    """E8M0 exponent s0 such that dequantised weights have std ~ 1/sqrt(fan_in)."""
    _, code_std = _fp4_code_table()
    jitter_gain = math.sqrt(np.mean(4.0 ** _SCALE_JITTER.astype(np.float64)))
    return 127 + round(math.log2(1.0 / (math.sqrt(fan_in) * code_std * jitter_gain)))


# ---------------------------------------------------------------------------- tensor contents

def _unit(cfg: ModelConfig, seed: int, name: str, dtype: str, shape: tuple[int, ...], unit: int) -> np.ndarray:
    """Rows [unit*k, (unit+1)*k) of original tensor `name`, k = rows_per_unit."""
    k = rows_per_unit(dtype, shape)
    r0 = unit * k
    r1 = min(shape[0], r0 + k) if shape else 1
    sub = (r1 - r0, *shape[1:])
    n = int(np.prod(sub))
    bits = _stream(seed, name, unit)
    H = cfg.hidden_size
    suffix = name.split(".", 2)[2] if name.startswith("block.") else name

    if suffix.endswith("_weight.blocks"):
        lut, _ = _fp4_code_table()
        return lut[_random_u16(bits, n)].reshape(sub)
    if suffix.endswith("_weight.scales"):
        fan_in = H if "mlp1" in suffix else cfg.intermediate_size
        table = (_SCALE_JITTER + mxfp4_scale_center(fan_in)).astype(np.uint8)
        return table[bits.random_raw((n + 7) // 8).view(np.uint8)[:n]].reshape(sub)

    mean, std = 0.0, BIAS_STD
    if suffix == "embedding.weight":
        std = EMBED_STD
    elif suffix == "unembedding.weight":
        std = UNEMBED_GAIN / math.sqrt(H)
    elif suffix.endswith("norm.scale"):
        mean, std = 1.0, NORM_STD
    elif suffix == "attn.qkv.weight":
        std = 1 / math.sqrt(H)
    elif suffix == "attn.out.weight":
        std = 1 / math.sqrt(cfg.q_dim)
    elif suffix == "mlp.gate.weight":
        std = ROUTER_GAIN / math.sqrt(H)
    elif suffix == "mlp.gate.bias":
        std = ROUTER_BIAS_STD
    elif suffix in ("mlp.mlp1_bias", "mlp.mlp2_bias"):
        std = EXPERT_BIAS_STD
    elif suffix == "attn.sinks":
        mag = np.random.Generator(bits).uniform(*SINK_RANGE, size=n).astype(np.float32)
        sign = np.where(np.arange(r0, r1) % 2 == 0, -1.0, 1.0).astype(np.float32)
        return to_bf16(mag * sign).reshape(sub)
    return _normal_bf16_table(mean, std)[_random_u16(bits, n)].reshape(sub)


def iter_tensor(cfg: ModelConfig, seed: int, name: str) -> Iterator[np.ndarray]:
    """Original tensor `name`, unit by unit (each <= GEN_UNIT_BYTES)."""
    dtype, shape = original_tensors(cfg)[name]
    k = rows_per_unit(dtype, shape)
    for u in range((shape[0] + k - 1) // k if shape else 1):
        yield _unit(cfg, seed, name, dtype, shape, u)


def tensor_rows(cfg: ModelConfig, seed: int, name: str, r0: int, r1: int) -> Iterator[np.ndarray]:
    """Rows [r0, r1) of original tensor `name`, generated unit by unit."""
    dtype, shape = original_tensors(cfg)[name]
    k = rows_per_unit(dtype, shape)
    for u in range(r0 // k, (r1 + k - 1) // k):
        block = _unit(cfg, seed, name, dtype, shape, u)
        lo, hi = max(r0, u * k) - u * k, min(r1, (u + 1) * k) - u * k
        yield block[lo:hi]


def generate_tensor(cfg: ModelConfig, seed: int, name: str) -> np.ndarray:
    """The whole original tensor in memory (tests and small tensors only)."""
    dtype, shape = original_tensors(cfg)[name]
    return np.concatenate(list(iter_tensor(cfg, seed, name))).reshape(shape)


# ---------------------------------------------------------------------------- writing files

Source = Callable[[str], Iterator[np.ndarray]]


def _write_safetensors(path: Path, entries: list[tuple[str, str, tuple[int, ...]]], source: Source,
                       bar: ProgressBar) -> None:
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as f:
            offsets = write_header(f, entries, SAFETENSORS_METADATA)
            for (name, dtype, shape), offset in zip(entries, offsets):
                if f.tell() != offset:
                    raise RuntimeError(f"{partial}: {name} would start at {f.tell()}, header says {offset}")
                for chunk in source(name):
                    f.write(memoryview(np.ascontiguousarray(chunk)).cast("B"))
                    bar.update(chunk.nbytes)
                if f.tell() != offset + tensor_nbytes(dtype, shape):
                    raise RuntimeError(f"{partial}: wrote {f.tell() - offset} bytes for {name}, "
                                       f"expected {tensor_nbytes(dtype, shape)}")
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def original_nbytes(cfg: ModelConfig) -> int:
    return sum(tensor_nbytes(d, s) for d, s in original_tensors(cfg).values())


def write_original(out_dir: Path, cfg: ModelConfig, seed: int, progress: bool = True) -> Path:
    """original/ layout: config.json (exactly the official 16 keys) + one model.safetensors."""
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = write_order((n, d, s) for n, (d, s) in original_tensors(cfg).items())
    with ProgressBar(original_nbytes(cfg), f"{out_dir.name or 'original'}", enabled=progress) as bar:
        _write_safetensors(out_dir / "model.safetensors", entries, lambda n: iter_tensor(cfg, seed, n), bar)
    (out_dir / "config.json").write_text(json.dumps(cfg.to_original_json(), indent=2) + "\n")
    return out_dir


def plan_hf_shards(cfg: ModelConfig, max_shard_bytes: int) -> list[list[HFTensor]]:
    """Greedy sharding in the order transformers' conversion saw the original tensors (sorted names)."""
    by_source: dict[str, list[HFTensor]] = {}
    for t in hf_tensors(cfg):
        by_source.setdefault(t.source, []).append(t)
    shards: list[list[HFTensor]] = [[]]
    size = 0
    for source in sorted(by_source):
        for t in by_source[source]:
            n = tensor_nbytes(t.dtype, t.shape)
            if shards[-1] and size + n > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(t)
            size += n
    return shards


def hf_shard_name(i: int, count: int) -> str:
    # The published repos (written by transformers' convert_gpt_oss_weights_to_hf.py) number shards
    # from 0 and put the *last index* after "of": model-00000-of-00002 ... model-00002-of-00002.
    return f"model-{i:05d}-of-{count - 1:05d}.safetensors"


def write_hf(out_dir: Path, cfg: ModelConfig, seed: int, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
             progress: bool = True, canonical_order: bool = True) -> Path:
    """HF layout: config.json + sharded model-*.safetensors + model.safetensors.index.json.

    canonical_order=True lays each shard out like `safetensors.save_file` (dtype, then name), as in
    the published files; False keeps q/k/v adjacent (then Checkpoint exposes a fused qkv view).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = plan_hf_shards(cfg, max_shard_bytes)
    names = [hf_shard_name(i, len(shards)) for i in range(len(shards))]
    by_name = {t.name: t for shard in shards for t in shard}

    def source(name: str) -> Iterator[np.ndarray]:
        t = by_name[name]
        return tensor_rows(cfg, seed, t.source, *t.rows)

    total = sum(tensor_nbytes(t.dtype, t.shape) for t in by_name.values())
    with ProgressBar(total, f"{out_dir.name or 'hf'}", enabled=progress) as bar:
        for shard, fname in zip(shards, names):
            entries = [(t.name, t.dtype, t.shape) for t in shard]
            if canonical_order:
                entries = write_order(entries)
            _write_safetensors(out_dir / fname, entries, source, bar)
    index = {
        "metadata": {"total_size": total},
        "weight_map": {t.name: fname for shard, fname in zip(shards, names) for t in sorted(shard, key=lambda t: t.name)},
    }
    (out_dir / HF_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (out_dir / "config.json").write_text(json.dumps(cfg.to_hf_json(), indent=2, sort_keys=True) + "\n")
    return out_dir


def _our_files(d: Path) -> list[Path]:
    if not d.is_dir():
        return []
    return [p for p in d.iterdir() if p.name in ("config.json", HF_INDEX) or p.name.endswith(".safetensors")
            or p.name.endswith(".safetensors.partial")]


def check_disk_space(out: Path, cfg: ModelConfig, formats: list[str], targets: list[Path], force: bool) -> None:
    """DiskSpaceError before anything is written if the file system of `out` cannot hold the checkpoint.

    Counts what --force would delete first as free, so rewriting a checkpoint in place on a nearly full disk
    works; the margin covers config.json, the HF index and the file system's own blocks."""
    need = original_nbytes(cfg) * len(formats) + DISK_MARGIN_BYTES
    existing = out
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if force:
        free += sum(p.stat().st_size for d in set(targets) for p in _our_files(d))
    if need > free:
        raise DiskSpaceError(
            f"{out}: not enough disk space: this checkpoint ({cfg.num_hidden_layers} layers x {cfg.num_experts} "
            f"experts, {' + '.join(formats)}) needs {format_bytes(need)}, {format_bytes(free)} available "
            f"(fewer --layers writes a smaller, same-shaped subset)")


def make_checkpoint(out_dir: str | os.PathLike, cfg: ModelConfig, format: str = "original", seed: int = 0,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True, force: bool = False,
                    canonical_order: bool = True) -> dict[str, Path]:
    """Write `format` ('original' | 'hf' | 'both') into out_dir; 'both' writes out_dir/original and out_dir/hf.

    Returns {format: directory}.
    """
    if format not in ("original", "hf", "both"):
        raise InputError(f"unknown format {format!r}; expected original, hf or both")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise InputError(f"seed must be an integer in [0, 2^63), got {seed!r}")
    if max_shard_bytes <= 0:
        raise InputError(f"max shard size must be positive, got {max_shard_bytes}")
    try:
        cfg.validate()
    except ValueError as e:
        raise InputError(str(e)) from e
    out = Path(out_dir)
    targets = {"original": out, "hf": out} if format != "both" else {"original": out / "original", "hf": out / "hf"}
    formats = ["original", "hf"] if format == "both" else [format]
    # Refuse to mix with an existing checkpoint unless forced; with force remove only our file kinds, and
    # only once the disk is known to hold the new one.
    for fmt in formats:
        ours = _our_files(targets[fmt])
        if ours and not force:
            raise InputError(f"{targets[fmt]}: already holds {ours[0].name} (use --force to overwrite)")
    check_disk_space(out, cfg, formats, [targets[fmt] for fmt in formats], force)
    for fmt in formats:
        for p in _our_files(targets[fmt]):
            p.unlink()
    written: dict[str, Path] = {}
    for fmt in formats:
        if fmt == "original":
            written[fmt] = write_original(targets[fmt], cfg, seed, progress)
        else:
            written[fmt] = write_hf(targets[fmt], cfg, seed, max_shard_bytes, progress, canonical_order)
    return written
