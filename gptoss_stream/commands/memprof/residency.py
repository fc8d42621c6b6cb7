"""How much of a checkpoint sits in the page cache: dense weights, the embedding table and expert data.

Dense weights are used in place from the mapping and every token needs all of them; the embedding table
only one row per token; expert data four experts per layer at a time. Which of these the kernel keeps in
memory, and how much of each, is what decides whether a memory-capped box re-reads the disk every token,
so memprof samples each.

mincore(2) (libgptoss `gptoss_mincore`) asks the kernel page by page without faulting anything in. A page
is counted as expert data if any byte of an expert lies in it, else as embedding if any byte of the
embedding table does, else as dense (headers included); pages shared by two kinds are a handful per layer.
Only `files()`, `expert_ranges()`, `tensor_range()`, `address()` and `config` of the checkpoint are used,
so any layout that can say where its tensors are works (original, Hugging Face, repacked).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from gptoss_stream.engine import kernels
from gptoss_stream.weights.checkpoint import Checkpoint
from gptoss_stream.weights.layouts.base import TensorRange

PAGE_SIZE = kernels.PAGE_SIZE


@dataclass(frozen=True)
class Residency:
    """One measurement, in bytes (whole pages)."""

    dense_resident: int
    dense_total: int
    embedding_resident: int
    embedding_total: int
    expert_resident: int
    expert_total: int
    experts_resident: int  # experts (layer, e) every page of which is resident
    experts_total: int

    @property
    def dense_fraction(self) -> float:
        return self.dense_resident / self.dense_total if self.dense_total else 0.0

    @property
    def embedding_fraction(self) -> float:
        return self.embedding_resident / self.embedding_total if self.embedding_total else 0.0

    @property
    def expert_fraction(self) -> float:
        return self.expert_resident / self.expert_total if self.expert_total else 0.0


@dataclass
class _Shard:
    path: str
    address: int                 # the mapping of file byte 0
    size: int                    # file bytes
    expert_pages: np.ndarray     # bool per page: holds expert data
    embedding_pages: np.ndarray  # bool per page: holds embedding rows (and no expert data)
    expert_starts: np.ndarray    # per (layer, e, piece) in this shard: first page
    expert_ends: np.ndarray      # ... one past the last page
    expert_ids: np.ndarray       # ... which expert (layer * E + e) the range belongs to


def _pages(offset: int, nbytes: int) -> tuple[int, int]:
    """Pages [first, last + 1) holding bytes [offset, offset + nbytes)."""
    return offset // PAGE_SIZE, (offset + max(nbytes, 1) + PAGE_SIZE - 1) // PAGE_SIZE


class CheckpointResidency:
    """Measures the page-cache residency of an open Checkpoint's shards through its own mappings."""

    def __init__(self, checkpoint: Checkpoint):
        cfg = checkpoint.config
        self.checkpoint = checkpoint
        self.experts_total = cfg.num_hidden_layers * cfg.num_experts
        # Per shard: (first page, end page, expert id) of every piece of every expert.
        spans: dict[str, list[tuple[int, int, int]]] = {path: [] for path in checkpoint.files()}
        for layer in range(cfg.num_hidden_layers):
            for e in range(cfg.num_experts):
                for r in checkpoint.expert_ranges(layer, e):
                    spans[r.path].append((*_pages(r.offset, r.nbytes), layer * cfg.num_experts + e))
        embedding = checkpoint.tensor_range("embedding.weight")
        self.shards: list[_Shard] = []
        for path in checkpoint.files():
            size = os.path.getsize(path)
            n_pages = (size + PAGE_SIZE - 1) // PAGE_SIZE
            mask = np.zeros(n_pages, dtype=bool)
            table = np.array(spans[path], dtype=np.int64).reshape(-1, 3)
            for first, end, _ in table:
                mask[first:end] = True
            rows = np.zeros(n_pages, dtype=bool)
            if embedding.path == path:
                first, end = _pages(embedding.offset, embedding.nbytes)
                rows[first:end] = True
                rows &= ~mask
            self.shards.append(_Shard(path, checkpoint.address(TensorRange(path, 0, 0)), size, mask, rows,
                                      table[:, 0], table[:, 1], table[:, 2]))
        self.expert_total = sum(int(s.expert_pages.sum()) for s in self.shards) * PAGE_SIZE
        self.embedding_total = sum(int(s.embedding_pages.sum()) for s in self.shards) * PAGE_SIZE
        self.dense_total = (sum(s.expert_pages.size for s in self.shards) * PAGE_SIZE - self.expert_total
                            - self.embedding_total)

    def measure(self) -> Residency:
        dense = embedding = expert = 0
        # An expert counts as resident when all of its pieces are, and they may sit in different shards.
        missing = np.zeros(self.experts_total, dtype=np.int64)
        for s in self.shards:
            if s.size == 0:
                continue
            vec = kernels.mincore(s.address, s.size)
            in_expert = int(np.count_nonzero(vec[s.expert_pages]))
            in_embedding = int(np.count_nonzero(vec[s.embedding_pages]))
            expert += in_expert
            embedding += in_embedding
            dense += int(np.count_nonzero(vec)) - in_expert - in_embedding
            if s.expert_starts.size:
                # Resident pages of each range from a running sum; a range is whole when it has them all.
                csum = np.concatenate(([0], np.cumsum(vec, dtype=np.int64)))
                absent = (s.expert_ends - s.expert_starts) - (csum[s.expert_ends] - csum[s.expert_starts])
                np.add.at(missing, s.expert_ids, absent)
        return Residency(
            dense_resident=dense * PAGE_SIZE, dense_total=self.dense_total,
            embedding_resident=embedding * PAGE_SIZE, embedding_total=self.embedding_total,
            expert_resident=expert * PAGE_SIZE, expert_total=self.expert_total,
            experts_resident=int(np.count_nonzero(missing == 0)), experts_total=self.experts_total,
        )


def evict_files(paths: list[str]) -> None:
    """Drop these files' clean pages from the page cache (pages a running process has mapped stay), so the
    next run reads them from disk: a cold start for one checkpoint without touching anyone else's cache."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
