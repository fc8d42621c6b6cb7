"""Choosing the next token from the logits: greedy, temperature, top-k and top-p (nucleus) sampling.

Sorting 201088 logits costs ~14 ms on our 2-core target (argsort), more than the rest of a sampling step
together. So the vocabulary is never sorted: top-k takes its candidates with one argpartition, and top-p
buckets the candidates by log-probability (1/64 nat per bucket) so that one bincount gives the sorted mass
profile; only the bucket where the nucleus ends is sorted, and a draw picks a bucket first, then a token in it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BUCKETS_PER_NAT = 64  # a power of two, so bucketing is exact and monotonic in float32
N_BUCKETS = 4096  # covers 64 nats below the best logit; everything further shares the last bucket


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number, got {self.temperature!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")


@dataclass
class _Candidates:
    """The tempered distribution over the tokens still allowed after top-k and top-p, bucketed."""

    ids: np.ndarray | None  # token id of each candidate; None = candidate i is token i
    p: np.ndarray  # unnormalized probability of each candidate, float32, 1.0 for the best
    bucket: np.ndarray  # bucket of each candidate; a lower bucket never holds a smaller p
    cum_mass: np.ndarray  # float64 cumulative mass of the kept buckets 0..cut, cut included only partly
    cut_members: np.ndarray  # candidates kept from the cut bucket (the one where the nucleus ends)

    def token_id(self, candidate: int) -> int:
        return int(candidate if self.ids is None else self.ids[candidate])


class Sampler:
    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def sample(self, logits: np.ndarray) -> int:
        """One token id drawn from logits [V] (float32)."""
        logits = _checked(logits)
        if self._greedy():
            return int(np.argmax(logits))  # first maximum on ties
        c = self._candidates(logits)
        u = self.rng.random() * c.cum_mass[-1]
        cut = len(c.cum_mass) - 1
        b = min(int(np.searchsorted(c.cum_mass, u, side="right")), cut)
        members = c.cut_members if b == cut else np.flatnonzero(c.bucket == b)
        within = np.cumsum(c.p[members], dtype=np.float64)
        u -= c.cum_mass[b - 1] if b > 0 else 0.0
        i = min(int(np.searchsorted(within, u, side="right")), len(members) - 1)
        return c.token_id(members[i])

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """The distribution sample() draws from, as float64 [V] summing to 1 (for tests and inspection)."""
        logits = _checked(logits)
        probs = np.zeros(logits.shape[0], dtype=np.float64)
        if self._greedy():
            probs[np.argmax(logits)] = 1.0
            return probs
        c = self._candidates(logits)
        cut = len(c.cum_mass) - 1
        kept = np.concatenate([np.flatnonzero(c.bucket < cut), c.cut_members])
        ids = kept if c.ids is None else c.ids[kept]
        probs[ids] = c.p[kept]
        return probs / probs.sum()

    def _greedy(self) -> bool:
        # A temperature that is 0 in float32 would divide by zero below.
        return np.float32(self.params.temperature) == 0 or self.params.top_k == 1

    def _candidates(self, logits: np.ndarray) -> _Candidates:
        params = self.params
        ids = None
        k = params.top_k
        if 0 < k < logits.shape[0]:
            kth = logits[np.argpartition(logits, -k)[-k]]
            # Rebuilt from the k-th value so ties at the border go to the lower token ids, whatever
            # argpartition chose: the same seed then gives the same tokens on every numpy.
            above = np.flatnonzero(logits > kth)
            ids = np.concatenate([above, np.flatnonzero(logits == kth)[: k - len(above)]])
            logits = logits[ids]
        with np.errstate(over="ignore"):  # a huge logit range overflows to inf: p = 0, last bucket
            distance = (logits.max() - logits) / np.float32(params.temperature)  # nats below the best, >= 0
        p = np.exp(-distance)
        last = np.float32((N_BUCKETS - 1) / BUCKETS_PER_NAT)  # exact in float32: the product below is exact
        bucket = (np.minimum(distance, last) * np.float32(BUCKETS_PER_NAT)).astype(np.int32)
        cum_mass = np.cumsum(np.bincount(bucket, weights=p, minlength=N_BUCKETS))
        total = cum_mass[-1]
        # The nucleus: the fewest best tokens whose mass reaches top_p; it ends inside bucket `cut`.
        cut = N_BUCKETS - 1
        if params.top_p < 1:
            cut = min(int(np.searchsorted(cum_mass, params.top_p * total, side="left")), cut)
        members = np.flatnonzero(bucket == cut)
        before = cum_mass[cut - 1] if cut > 0 else 0.0
        if params.top_p < 1:
            key_ids = members if ids is None else ids[members]
            members = members[np.lexsort((key_ids, -p[members]))]  # best first, lower token id on ties
            within = np.cumsum(p[members], dtype=np.float64)
            keep = int(np.searchsorted(within, params.top_p * total - before, side="left")) + 1
            members = members[:keep]
        cum_mass = cum_mass[: cut + 1].copy()
        cum_mass[cut] = before + float(np.sum(p[members], dtype=np.float64))
        return _Candidates(ids, p, bucket, cum_mass, members)


def _checked(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits)
    if logits.ndim != 1 or logits.shape[0] == 0:
        raise ValueError(f"logits must be a non-empty 1-D array [vocab], got shape {logits.shape}")
    if not np.issubdtype(logits.dtype, np.floating):
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    logits = logits.astype(np.float32, copy=False)
    if not np.isfinite(logits).all():
        bad = np.flatnonzero(~np.isfinite(logits))
        raise ValueError(
            f"logits contain {len(bad)} NaN/inf values (first at token {bad[0]}: {logits[bad[0]]}); "
            "the forward pass produced invalid numbers"
        )
    return logits
