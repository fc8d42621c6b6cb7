"""`--ram-budget`: parse a size, and split it between everything the engine keeps in memory.

What a run holds, and why each part is sized the way it is:
- runtime: the interpreter, numpy, libgptoss + oneDNN and the o200k tokenizer (~150 MB anonymous + ~30 MB
  of shared libraries, measured with a 64-token prefill on the full-width 2-layer checkpoint).
- dense weights: every token reads all of attention, routers, norms and the unembedding (2.43 GB bf16 on
  20b; ~1.3 GB from a `repack --dense q8` checkpoint, whose expert cache gets the difference), from the mapping, so those pages must stay in the page cache, and in a memory cgroup the page
  cache counts against the limit. Of the embedding only the rows of the tokens seen are touched.
- KV cache: full-attention layers for the whole context, sliding layers as rings (kvcache.KVCache).
- scratch: the RunState buffers, logits and the sampler's copies of them.
- expert cache: what is left, in whole expert records (slots); at least two layers' worth (the layer being
  computed and the one being prefetched). Everything beyond the experts of the model is not needed.

The expert reads themselves use O_DIRECT, so they do not add page cache (reader.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gptoss_stream.errors import InputError, UserError
from gptoss_stream.progress import format_bytes
from gptoss_stream.weights.config import ModelConfig, layer_capacity
from gptoss_stream.weights.layouts.base import (
    EXPERT_PIECES, MAPPED_EXPERT_PIECES, Q8_BLOCK, TensorRange, is_q8_weight, original_tensors,
)

KIB, MIB, GIB = 2**10, 2**20, 2**30

# Sizes: K/M/G/T and KiB/MiB/... are powers of 1024 (as cgroups, docker --memory and systemd read them);
# KB/MB/GB/TB are powers of 1000.
_UNITS = {
    "": 1, "B": 1,
    "K": KIB, "M": MIB, "G": GIB, "T": 2**40,
    "KIB": KIB, "MIB": MIB, "GIB": GIB, "TIB": 2**40,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
}

RUNTIME_BYTES = 224 * MIB   # interpreter + libraries + tokenizer (see module docstring), rounded up
RESERVE_BYTES = 64 * MIB    # page tables, allocator slack, kernel memory charged to the cgroup
LOGIT_COPIES = 8            # fp32 logit rows alive at once: forward's result and the sampler's work arrays
MIN_PREFETCH_LAYERS = 2     # expert slots: the layer in use + the next layer's guesses


class BudgetError(UserError, ValueError):
    """The RAM budget cannot hold what the engine needs."""


def parse_size(text: str) -> int:
    """'4G' -> 4 GiB, '3.5G', '800M', '512MiB', '4GB' (10^9), '1000' (bytes)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise InputError(f"invalid size {text!r} (examples: 4G, 3.5G, 800M, 512MiB, 4GB)")
    n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n <= 0:
        raise InputError(f"size must be positive, got {text!r}")
    return n


def size_argument(text: str) -> int:
    """parse_size for argparse `type=`: its message reaches the user instead of argparse's generic one."""
    import argparse

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def format_size(n: float) -> str:
    """Memory sizes in binary units (1.50 GiB), like the budgets they are compared with."""
    return format_bytes(n, binary=True)


# ---------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class MemoryPlan:
    """How a RAM budget is spent, in bytes."""

    budget: int
    runtime: int
    dense: int           # dense weights kept in the page cache
    kv_cache: int
    scratch: int
    reserve: int
    slot_bytes: int      # one expert record buffer
    expert_slots: int    # records the expert cache holds
    min_expert_slots: int
    total_experts: int

    @property
    def fixed(self) -> int:
        return self.runtime + self.dense + self.kv_cache + self.scratch + self.reserve

    @property
    def expert_cache(self) -> int:
        return self.expert_slots * self.slot_bytes

    @property
    def minimum(self) -> int:
        """The smallest budget that runs: everything fixed plus the minimum expert cache."""
        return self.fixed + self.min_expert_slots * self.slot_bytes

    @property
    def everything(self) -> int:
        """The budget at which every expert of the model fits in the cache."""
        return self.fixed + self.total_experts * self.slot_bytes

    @property
    def anonymous(self) -> int:
        """The part that is process memory (RssAnon) rather than page cache."""
        return self.runtime + self.kv_cache + self.scratch + self.expert_cache

    layers: int = 1      # the model's layers (the cache's per-layer share in describe())
    dense_format: str = "bf16"  # the checkpoint's: "q8" (repack --dense q8) holds ~half the dense bytes

    def describe(self) -> str:
        share = self.expert_slots / self.total_experts if self.total_experts else 0.0
        per_layer = self.total_experts // max(self.layers, 1)
        return (f"RAM budget {format_size(self.budget)}: runtime {format_size(self.runtime)}, dense weights "
                f"({self.dense_format}, page cache) {format_size(self.dense)}, KV cache {format_size(self.kv_cache)}, scratch "
                f"{format_size(self.scratch)}, reserve {format_size(self.reserve)}, expert cache "
                f"{format_size(self.expert_cache)} = {self.expert_slots} of {self.total_experts} experts "
                f"({share:.0%}, {self.expert_slots / max(self.layers, 1):.1f} of {per_layer} per layer); "
                f"minimum {format_size(self.minimum)}, every expert cached from {format_size(self.everything)}")


def _is_streamed(name: str) -> bool:
    suffix = name.split(".", 2)[-1]
    return suffix in EXPERT_PIECES and suffix not in MAPPED_EXPERT_PIECES


def dense_nbytes(config: ModelConfig, context_length: int, page: int = 4096, dense_format: str = "bf16") -> int:
    """Page-cache bytes of the dense weights a run touches: all but the streamed expert pieces; of the
    embedding, the pages of at most `context_length` distinct rows. dense_format "q8": the q8 weights
    (layouts/base.py Q8_WEIGHTS) as int8 values + one fp16 scale per 32."""
    total = 0
    for name, (dtype, shape) in original_tensors(config).items():
        if _is_streamed(name):
            continue
        q8 = dense_format == "q8" and is_q8_weight(name)
        # per row: the bf16 row, or (int8 row, its fp16 scales): two separate places in the file
        rows_bytes = [shape[-1], shape[-1] // Q8_BLOCK * 2] if q8 else [(2 if dtype == "BF16" else 1) * shape[-1]]
        n = 1
        for d in shape[:-1]:
            n *= d
        nbytes = n * sum(rows_bytes)
        if name == "embedding.weight":
            rows = min(shape[0], context_length)
            # a row can straddle one more page (each part of it, for q8)
            nbytes = min(nbytes, rows * sum(-(-row // page) + 1 for row in rows_bytes) * page)
        total += nbytes
    return total


def dense_ranges(checkpoint) -> list[TensorRange]:
    """Byte ranges of the dense weights every token reads (all but the streamed expert pieces and the
    embedding, of which a token reads one row), merged where adjacent, in file order."""
    ranges = []
    for name in original_tensors(checkpoint.config):
        if name == "embedding.weight" or _is_streamed(name):
            continue
        try:
            ranges.append(checkpoint.tensor_range(name))
        except ValueError:
            continue  # a layout that stores it elsewhere (a repacked record: read with its expert)
    ranges.sort(key=lambda r: (r.path, r.offset))
    merged: list[TensorRange] = []
    for r in ranges:
        last = merged[-1] if merged else None
        if last is not None and last.path == r.path and r.offset <= last.offset + last.nbytes + (1 << 20):
            end = max(last.offset + last.nbytes, r.offset + r.nbytes)
            merged[-1] = TensorRange(last.path, last.offset, end - last.offset)
        else:
            merged.append(r)
    return merged


def planned_slot_bytes(config: ModelConfig, page: int = 4096) -> int:
    """One expert cache slot from the config alone (no checkpoint): the streamed pieces of an expert in the
    published layouts, each rounded up to whole pages plus one page for any alignment in the file; the same
    bound as expert_cache.expert_slot_bytes on a checkpoint of these shapes (tests check they agree), so a
    plan for a model that is not on disk (120b) matches the one its checkpoint will get."""
    total = 0
    for name, (dtype, shape) in original_tensors(config).items():
        if not name.startswith("block.0.") or not _is_streamed(name):
            continue
        nbytes = 2 if dtype == "BF16" else 1
        for d in shape[1:]:  # one expert: the tensors' leading axis is the expert
            nbytes *= d
        total += -(-nbytes // page) * page + page
    return total


def kv_cache_nbytes(config: ModelConfig, context_length: int, max_chunk: int) -> int:
    """Bytes of kvcache.KVCache(config, context_length, max_chunk) once every position is written."""
    row = 2 * config.num_key_value_heads * config.head_dim * 2  # keys + values, bf16
    return sum(layer_capacity(config, layer, context_length, max_chunk) * row
               for layer in range(config.num_hidden_layers))


def scratch_nbytes(config: ModelConfig, max_chunk: int) -> int:
    from gptoss_stream.engine.model import RunState  # numpy zeros: allocating to measure costs no resident memory

    return RunState.allocate(config, max_chunk).nbytes + LOGIT_COPIES * config.vocab_size * 4


def _plan_parts(config: ModelConfig, slot_bytes: int, budget: int, context_length: int, max_chunk: int,
                runtime: int, reserve: int, dense_format: str) -> MemoryPlan:
    total_experts = config.num_hidden_layers * config.num_experts
    return MemoryPlan(
        budget=budget, runtime=runtime, dense=dense_nbytes(config, context_length, dense_format=dense_format),
        kv_cache=kv_cache_nbytes(config, context_length, max_chunk), scratch=scratch_nbytes(config, max_chunk),
        reserve=reserve, slot_bytes=slot_bytes, expert_slots=0,
        min_expert_slots=min(total_experts, MIN_PREFETCH_LAYERS * config.experts_per_token),
        total_experts=total_experts, layers=config.num_hidden_layers, dense_format=dense_format,
    )


def longest_context(config: ModelConfig, slot_bytes: int, budget: int, max_chunk: int,
                    runtime: int = RUNTIME_BYTES, reserve: int = RESERVE_BYTES, dense_format: str = "bf16") -> int:
    """The longest context (tokens, at most config.max_context) whose plan fits in `budget`; 0 if none does.

    The minimum grows with the context (full-attention layers keep every position's keys and values, and the
    embedding rows the plan counts follow it), so a bisection finds the largest that fits."""
    def fits(context: int) -> bool:
        return _plan_parts(config, slot_bytes, budget, context, max_chunk, runtime, reserve,
                           dense_format).minimum <= budget

    if not fits(1):
        return 0
    lo, hi = 1, config.max_context  # fits(lo) holds; find the largest such
    if fits(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def plan_memory(config: ModelConfig, slot_bytes: int, budget: int, context_length: int, max_chunk: int,
                runtime: int = RUNTIME_BYTES, reserve: int = RESERVE_BYTES, dense_format: str = "bf16") -> MemoryPlan:
    """Split `budget` (bytes); BudgetError naming the minimum (and the longest context that would fit) if it
    cannot hold the fixed parts and the minimum expert cache."""
    if budget <= 0:
        raise BudgetError(f"RAM budget must be positive, got {budget}")
    plan = _plan_parts(config, slot_bytes, budget, context_length, max_chunk, runtime, reserve, dense_format)
    slots = min(plan.total_experts, max(0, budget - plan.fixed) // slot_bytes)
    if slots < plan.min_expert_slots:
        longest = longest_context(config, slot_bytes, budget, max_chunk, runtime, reserve, dense_format)
        hint = (f"at this budget --context {longest} is the longest that fits" if longest
                else "no --context fits this budget")
        raise BudgetError(
            f"RAM budget {format_size(budget)} is too small for this model at context {context_length}: "
            f"it needs at least {format_size(plan.minimum)} (runtime {format_size(plan.runtime)} + dense weights "
            f"{format_size(plan.dense)} + KV cache {format_size(plan.kv_cache)} + scratch "
            f"{format_size(plan.scratch)} + reserve {format_size(plan.reserve)} + {plan.min_expert_slots} expert "
            f"records of {format_size(slot_bytes)}); {hint}")
    return MemoryPlan(**{**plan.__dict__, "expert_slots": slots})
