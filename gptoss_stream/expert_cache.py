"""A RAM-budgeted cache of MXFP4 expert records, filled by large reads on a background I/O thread.

The store owns `slots` equal, page-aligned buffers (one anonymous mapping), each big enough for one expert
record. The model asks for a layer's experts with `request` (in sorted order: the MoE sum is accumulated in
that order, so streaming never changes a bit of the result) and hints the next layer's experts with
`prefetch`. Misses are read on demand, ahead of any queued prefetch; the model computes expert i while
expert i+1 is still being read.

Replacement (docs/streaming.md has the measurements behind each choice):
- Per-layer quotas. Decode visits layers 0..L-1 cyclically; a global LRU over that cycle evicts every expert
  just before its layer comes round again once the cache is smaller than one token's working set, so it
  scores close to zero. Each layer keeps a fair share (slots / L) and evicts within its own share.
- Within a layer: LFU with exponential decay (default) or LRU. On a uniformly random router every policy
  scores share/E; real routers are skewed (a few experts per layer take a large share of tokens) and
  frequency keeps those; the decay (half-life in tokens) lets the core follow a change of topic.
- Guesses that the router did not take go first; entries in use or being read are never evicted.

Thread model: one lock (`_cv`) guards all state; the I/O thread only runs reads and reports completion
under the lock. A failed read is raised (ReadError naming file and offset) to the consumer that needs the
expert; nothing waits forever (the consumer also checks that the I/O thread is alive).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from gptoss_stream.checkpoint import ExpertWeights, TensorRange
from gptoss_stream.experts import ExpertRequest, ExpertStats
from gptoss_stream.reader import ALIGN, DEMAND, PREFETCH, FileReader, IOThread, ReadJob, RecordLayout, aligned_buffer, \
    plan_record, prefault_page_cache

LFU, LRU = "lfu", "lru"
POLICIES = (LFU, LRU)
DEFAULT_HALF_LIFE_TOKENS = 64.0

LOADING, READY, FAILED = "loading", "ready", "failed"


@dataclass
class StreamStats(ExpertStats):
    """What the streaming store did; `since()` gives one phase's share (see ExpertStats)."""

    hits: int = 0              # requested experts found in the cache or already read(ing) by a prefetch
    misses: int = 0            # requested experts read on demand
    prefetch_issued: int = 0   # reads started on a guess
    prefetch_used: int = 0     # ... that the router then asked for (counted in hits too)
    predicted: int = 0         # routed experts in layers that had a guess
    predicted_right: int = 0   # ... that were in the guess
    reads: int = 0             # records read (demand + prefetch; cancelled ones not counted)
    bytes_read: int = 0        # bytes fetched from disk (page-aligned extents)
    read_seconds: float = 0.0  # time the I/O thread spent reading
    stall_seconds: float = 0.0  # time the model waited for an expert
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        """Requested experts the cache already held from earlier use: no read at all."""
        return (self.hits - self.prefetch_used) / self.requests if self.requests else 0.0

    @property
    def prefetch_rate(self) -> float:
        """Requested experts read ahead on a guess (a read, but off the critical path)."""
        return self.prefetch_used / self.requests if self.requests else 0.0

    @property
    def prediction_accuracy(self) -> float:
        """Fraction of routed experts the guess contained (in layers that were guessed)."""
        return self.predicted_right / self.predicted if self.predicted else 0.0

    @property
    def prefetch_precision(self) -> float:
        return self.prefetch_used / self.prefetch_issued if self.prefetch_issued else 0.0


@dataclass(eq=False)
class _Entry:
    layer: int
    expert: int
    slot: int
    job: ReadJob
    state: str = LOADING
    error: BaseException | None = None
    pins: int = 0              # >0 while the model computes with it
    wanted: bool = False       # in the current request, not consumed yet
    speculative: bool = False  # read on a guess that the router has not confirmed yet
    stale: bool = False        # a guess the router did not take: evicted first
    removed: bool = False
    weights: ExpertWeights | None = None


@dataclass(frozen=True)
class _RecordPlan:
    layout: RecordLayout  # the read part (no extents if every piece is used from the mapping)
    # per view, in ExpertWeights order: (dtype, shape, buffer offset), or the mapped view itself
    pieces: tuple[tuple[np.dtype, tuple[int, ...], int] | np.ndarray, ...]
    ranges: tuple[TensorRange, ...]
    nbytes: int  # payload: the six pieces (what the model asked for; reads add alignment)


def record_bound(ranges: Iterable[TensorRange]) -> int:
    """Buffer bytes any record with pieces of these sizes can need, whatever their alignment in the file."""
    return sum(-(-r.nbytes // ALIGN) * ALIGN + ALIGN for r in ranges)


def _expert_views(weights: ExpertWeights) -> tuple[np.ndarray, ...]:
    return (weights.mlp1_blocks, weights.mlp1_scales, weights.mlp1_bias,
            weights.mlp2_blocks, weights.mlp2_scales, weights.mlp2_bias)


def split_expert(checkpoint, layer: int, e: int) -> tuple[ExpertWeights, list[int | None], list[TensorRange]]:
    """Which of an expert's pieces are read into a slot and which are used from the mapping.

    In the original and HF layouts the bf16 biases are tensors of their own, stored among the dense bf16
    weights (the safetensors writer sorts by dtype), 16 KB per expert against 13 MB of MXFP4: reading
    them with O_DIRECT would cost four extra small reads per expert. They are used in place instead and
    kept in the page cache with the dense weights (budget.dense_ranges). A piece that shares its range
    with others (a repacked record) is read with them.

    Returns the mapped weights, per view the index of its range in the read list (None: from the mapping),
    and the read list.
    """
    mapped = checkpoint.expert(layer, e)  # views only: nothing is read
    ranges = list(mapped.ranges)
    bases = [checkpoint.address(r) for r in ranges]
    owner: list[int] = []
    for view in _expert_views(mapped):
        ptr = view.ctypes.data
        for i, (base, r) in enumerate(zip(bases, ranges)):
            if base <= ptr and ptr + view.nbytes <= base + r.nbytes:
                owner.append(i)
                break
        else:
            raise ValueError(f"expert ({layer}, {e}): a weight view lies outside its byte ranges")
    alone = [owner.count(i) == 1 for i in range(len(ranges))]
    in_place = {i for view, i in zip(_expert_views(mapped), owner) if alone[i] and view.dtype == np.uint16}
    read = [r for i, r in enumerate(ranges) if i not in in_place]
    index = {i: n for n, i in enumerate(i for i in range(len(ranges)) if i not in in_place)}
    return mapped, [index.get(i) for i in owner], read


def expert_slot_bytes(checkpoint) -> int:
    """Bytes of one cache slot: what any expert's read part can need (all experts have the same shapes)."""
    return max(record_bound(split_expert(checkpoint, 0, 0)[2]), ALIGN)


class StreamingExpertStore:
    """Experts read into `slots` RAM-resident record buffers, replaced per layer by `policy`."""

    prefetches = True

    def __init__(self, checkpoint, slots: int, policy: str = LFU, direct: bool | None = None,
                 half_life_tokens: float = DEFAULT_HALF_LIFE_TOKENS, prefetch: bool = True, io_threads: int = 1,
                 guesses_borrow: bool = False):
        cfg = checkpoint.config
        if policy not in POLICIES:
            raise ValueError(f"unknown expert cache policy {policy!r}; choose one of {POLICIES}")
        if slots < 1:
            raise ValueError(f"the expert cache needs at least 1 slot, got {slots}")
        self.checkpoint = checkpoint
        self.num_layers, self.num_experts = cfg.num_hidden_layers, cfg.num_experts
        self.experts_per_token = cfg.experts_per_token
        self.slots = min(slots, self.num_layers * self.num_experts)  # more could never be used
        self.policy = policy
        self.slot_bytes = expert_slot_bytes(checkpoint)
        self.reader = FileReader(direct)
        for path in checkpoint.files():
            self.reader.is_direct(path)  # open every shard now: bad permissions fail here, sizes are recorded
        # Huge pages make every O_DIRECT read faster but cost compaction when first touched (0.4 GB/s measured
        # on a fragmented box): worth it when slots are refilled over and over, not when every expert fits
        # and each slot is read once.
        refills = self.slots < self.num_layers * self.num_experts
        self.arena = aligned_buffer(self.slots * self.slot_bytes, huge_pages=refills)
        self.stats = StreamStats()
        self._cv = threading.Condition()
        self._free = list(range(self.slots))[::-1]
        self._layers: list[dict[int, _Entry]] = [{} for _ in range(self.num_layers)]
        self._stale: dict[_Entry, None] = {}  # insertion-ordered set
        self._plans: dict[tuple[int, int], _RecordPlan] = {}
        self._pending: list[tuple[int, int]] = []  # demanded misses still waiting for a slot
        self._guess: dict[int, set[int]] = {}
        self._active: tuple[int, list[int]] | None = None  # the request not ended yet
        self._closed = False
        # replacement bookkeeping, per (layer, expert), resident or not
        self._tick = 0
        self._half_life = max(half_life_tokens, 1e-9) * self.num_layers  # in requests (one per layer visit)
        self._last_use = [[-1] * self.num_experts for _ in range(self.num_layers)]
        self._count = [[0.0] * self.num_experts for _ in range(self.num_layers)]
        self.prefetches = prefetch  # False: the model makes no guesses (for measuring what they bring)
        self.guesses_borrow = guesses_borrow  # True: guesses take slots like misses do (no cap; for measuring)
        self.io = IOThread(self.reader, workers=io_threads)

    @property
    def nbytes(self) -> int:
        return self.slots * self.slot_bytes

    # ------------------------------------------------------------------ the model's side

    def request(self, layer: int, experts: Iterable[int]) -> ExpertRequest:
        """Start reading the missing experts of `layer`; iterate to get each (valid until the next step).

        The request holds its experts (they cannot be evicted) until it is closed, or the next request is
        made: a request that is dropped, or never iterated, cannot block the store."""
        experts = [int(e) for e in experts]
        with self._cv:
            self._check_open()
            if self._active is not None:
                self._release(*self._active)
            if layer == 0:
                self.reader.check_sizes()  # once per forward: a shrunk file would SIGBUS the mapped dense weights
            self._tick += 1
            want = set(experts)
            guess = self._guess.pop(layer, None)
            if guess is not None:
                self.stats.predicted += len(want)
                self.stats.predicted_right += len(want & guess)
            for entry in list(self._layers[layer].values()):
                if entry.speculative and entry.expert not in want:
                    entry.speculative, entry.stale = False, True
                    if entry.state == LOADING and self.io.cancel(entry.job):
                        self._remove(entry)
                        self._free.append(entry.slot)
                        self.stats.prefetch_issued -= 1  # never read: not a prefetch after all
                    else:
                        self._stale[entry] = None
            self._pending = []
            for e in experts:
                failed = self._layers[layer].get(e)
                if failed is not None and failed.state == FAILED and not failed.wanted:
                    # A read (a guess's, or an abandoned request's) failed before anyone needed it: the
                    # failure may be transient, read it again now that it is needed.
                    self._remove(failed)
                    self._free.append(failed.slot)
                self._touch(layer, e)
                self.stats.requests += 1
                self.stats.bytes_requested += self._plan(layer, e).nbytes
                entry = self._layers[layer].get(e)
                if entry is not None and entry.state != FAILED:
                    self.stats.hits += 1
                    entry.wanted = True
                    if entry.speculative:
                        entry.speculative = False
                        self.stats.prefetch_used += 1
                        if entry.state == LOADING:
                            self.io.promote(entry.job)
                else:
                    self.stats.misses += 1
                    self._pending.append((layer, e))
            self._issue_pending()
            token = self._active = (layer, experts)

        def end() -> None:
            with self._cv:
                if self._active is token:
                    self._release(layer, experts)

        return ExpertRequest(self._consume(layer, experts), on_close=end)

    def prefetch(self, layer: int, experts: Iterable[int]) -> None:
        """Guess: `layer` will want `experts` (most likely first). Read those not cached while slots allow.

        A later guess for the same layer replaces the earlier one: reads of dropped guesses that have not
        started are cancelled (their slots come back), those already read stay until the router decides.
        """
        experts = [int(e) for e in experts]
        with self._cv:
            if self._closed or not 0 <= layer < self.num_layers:
                return
            self._guess[layer] = set(experts)
            for entry in list(self._layers[layer].values()):
                if (entry.speculative and entry.expert not in self._guess[layer] and entry.state == LOADING
                        and self.io.cancel(entry.job)):
                    self._remove(entry)
                    self._free.append(entry.slot)
                    self.stats.prefetch_issued -= 1  # never read: not a prefetch after all
            if self._pending:
                return  # the current layer still waits for slots: guesses must not take them
            for e in experts:
                if e in self._layers[layer]:
                    continue
                slot = self._take_slot(layer, consumer=False, guess=self._guess[layer])
                if slot is None:
                    break
                self._start(layer, e, slot, PREFETCH).speculative = True
                self.stats.prefetch_issued += 1

    def _consume(self, layer: int, experts: list[int]) -> Iterator[tuple[int, ExpertWeights]]:
        entry: _Entry | None = None
        try:
            for e in experts:
                with self._cv:
                    entry = self._wait_ready(layer, e)
                    entry.pins += 1
                    entry.wanted = False
                    weights = entry.weights
                yield e, weights
                with self._cv:
                    entry.pins -= 1
                    entry = None
                    self._issue_pending()
                    self._cv.notify_all()
        finally:
            with self._cv:
                if entry is not None and entry.pins:
                    entry.pins -= 1
                self._release(layer, experts)

    def _release(self, layer: int, experts: list[int]) -> None:
        """End a request: its experts become evictable again."""
        for e in experts:
            other = self._layers[layer].get(e)
            if other is not None:
                other.wanted = False
        self._pending = [p for p in self._pending if p[0] != layer]
        self._active = None
        self._cv.notify_all()

    def _wait_ready(self, layer: int, e: int) -> _Entry:
        started: float | None = None
        try:
            while True:
                self._check_open()
                entry = self._layers[layer].get(e)
                if entry is None:
                    slot = self._take_slot(layer, consumer=True, current=e)
                    if slot is not None:
                        if (layer, e) in self._pending:
                            self._pending.remove((layer, e))
                        entry = self._start(layer, e, slot, DEMAND)
                        entry.wanted = True
                        continue
                elif entry.state == READY:
                    if entry.weights is None:
                        entry.weights = self._views(entry)
                    return entry
                elif entry.state == FAILED:
                    self._remove(entry)
                    self._free.append(entry.slot)
                    raise entry.error
                else:
                    self._issue_pending()  # keep the disk busy with the rest of this layer meanwhile
                if not self.io.alive:
                    raise RuntimeError("the expert reader thread has stopped")
                if started is None:
                    started = time.perf_counter()
                self._cv.wait(timeout=1.0)
        finally:
            if started is not None:
                self.stats.stall_seconds += time.perf_counter() - started

    # ------------------------------------------------------------------ slots and replacement

    def _touch(self, layer: int, e: int) -> None:
        """Record a demand use of (layer, e) for the replacement policy (resident or not)."""
        last = self._last_use[layer][e]
        if last >= 0:
            self._count[layer][e] = self._count[layer][e] * 2.0 ** (-(self._tick - last) / self._half_life) + 1.0
        else:
            self._count[layer][e] = 1.0
        self._last_use[layer][e] = self._tick

    def _score(self, entry: _Entry) -> float:
        """Lower is evicted first."""
        last = self._last_use[entry.layer][entry.expert]
        if self.policy == LRU or last < 0:
            return float(last)
        # log2 of the decayed count, shifted by a term common to all keys: comparable across ticks
        return math.log2(self._count[entry.layer][entry.expert]) + last / self._half_life

    def _evictable(self, entry: _Entry) -> bool:
        if entry.pins or entry.wanted:
            return False
        if entry.state == LOADING:
            return entry.stale and entry.job.state == "queued"
        return True

    def _victim(self, layer: int, consumer: bool, current: int | None, guess: set[int] | None = None) -> _Entry | None:
        for entry in self._stale:
            if self._evictable(entry):
                return entry
        if guess is not None and not self.guesses_borrow:
            # A guess replaces its own layer's other entries first: the router will very likely not take
            # those this time (they keep only the value any entry has for later tokens), while an entry of
            # another layer may be a hit within this very token. Beyond that, guesses may borrow only as
            # many slots as one layer routes to (the plan's second layer of slots), so a small cache still
            # reads the next layer ahead without guesses churning everyone's entries.
            candidates = [x for x in self._layers[layer].values()
                          if self._evictable(x) and not x.speculative and x.expert not in guess]
            if candidates:
                return min(candidates, key=self._score)
            in_flight = sum(1 for d in self._layers for x in d.values() if x.speculative)
            if in_flight >= self.experts_per_token:
                return None
        quota = self.slots / self.num_layers
        counts = [len(d) for d in self._layers]
        # A layer under its share takes from the layer furthest over its share; otherwise from itself.
        order = [layer]
        if counts[layer] < quota:
            order = sorted((n for n in range(self.num_layers) if counts[n] > quota), key=lambda n: -counts[n]) + order
        order += [n for n in sorted(range(self.num_layers), key=lambda n: -counts[n]) if n not in order]
        for n in order:
            candidates = [x for x in self._layers[n].values() if self._evictable(x) and not x.speculative]
            if candidates:
                return min(candidates, key=self._score)
        if not consumer:
            return None
        # The consumer must make progress: take an unconfirmed guess, then an expert wanted later in this layer.
        for d in self._layers:
            for x in d.values():
                if x.speculative and not x.pins and x.state == READY:
                    return x
        later = [x for x in self._layers[layer].values()
                 if x.wanted and not x.pins and x.state == READY and x.expert != current]
        return max(later, key=lambda x: x.expert) if later else None

    def _take_slot(self, layer: int, consumer: bool, current: int | None = None,
                   guess: set[int] | None = None) -> int | None:
        if self._free:
            return self._free.pop()
        while True:
            victim = self._victim(layer, consumer, current, guess)
            if victim is None:
                return None
            if victim.state == LOADING and not self.io.cancel(victim.job):
                self._stale.pop(victim, None)  # started meanwhile: it finishes, then it is evictable
                continue
            self._remove(victim)
            self.stats.evictions += 1
            return victim.slot

    def _remove(self, entry: _Entry) -> None:
        entry.removed = True
        self._layers[entry.layer].pop(entry.expert, None)
        self._stale.pop(entry, None)

    def _issue_pending(self) -> None:
        while self._pending:
            layer, e = self._pending[0]
            if e in self._layers[layer]:
                self._pending.pop(0)
                continue
            slot = self._take_slot(layer, consumer=False)
            if slot is None:
                return
            self._pending.pop(0)
            self._start(layer, e, slot, DEMAND).wanted = True

    # ------------------------------------------------------------------ reads

    def _plan(self, layer: int, e: int) -> _RecordPlan:
        key = (layer, e)
        plan = self._plans.get(key)
        if plan is None:
            mapped, owner, read = split_expert(self.checkpoint, layer, e)
            layout = plan_record(read) if read else RecordLayout((), (), 0)
            if layout.nbytes > self.slot_bytes:
                raise ValueError(f"expert ({layer}, {e}) needs {layout.nbytes} bytes, more than a slot "
                                 f"({self.slot_bytes}): experts of different sizes are not supported")
            pieces: list = []
            for view, i in zip(_expert_views(mapped), owner):
                if i is None:
                    pieces.append(view)
                else:
                    r = read[i]
                    offset = layout.piece_offsets[i] + view.ctypes.data - self.checkpoint.address(r)
                    pieces.append((view.dtype, view.shape, offset))
            plan = self._plans[key] = _RecordPlan(layout, tuple(pieces), tuple(mapped.ranges), mapped.nbytes)
        return plan

    def _slot_buffer(self, slot: int) -> np.ndarray:
        return self.arena[slot * self.slot_bytes:(slot + 1) * self.slot_bytes]

    def _start(self, layer: int, e: int, slot: int, priority: int) -> _Entry:
        plan = self._plan(layer, e)
        job = ReadJob(plan.layout, self._slot_buffer(slot), self._on_done, priority)
        entry = _Entry(layer, e, slot, job)
        job.tag = entry
        self._layers[layer][e] = entry
        self.io.submit(job)
        return entry

    def _on_done(self, job: ReadJob, error: BaseException | None) -> None:
        # Runs on the I/O thread.
        with self._cv:
            entry: _Entry = job.tag
            self.stats.read_seconds += job.seconds
            if error is None:
                self.stats.reads += 1
                self.stats.bytes_read += job.layout.read_bytes
                entry.state = READY
            else:
                entry.state, entry.error = FAILED, error
            self._cv.notify_all()

    def _views(self, entry: _Entry) -> ExpertWeights:
        plan = self._plan(entry.layer, entry.expert)
        base = entry.slot * self.slot_bytes
        views = []
        for piece in plan.pieces:
            if isinstance(piece, np.ndarray):
                views.append(piece)  # used in place from the mapping
                continue
            dtype, shape, offset = piece
            count = int(np.prod(shape))
            v = np.frombuffer(self.arena, dtype=dtype, count=count, offset=base + offset).reshape(shape)
            v.flags.writeable = False
            views.append(v)
        return ExpertWeights(*views, ranges=list(plan.ranges))

    # ------------------------------------------------------------------ lifetime

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the expert store is closed")

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no read is queued or running (tests and benchmarks); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while any(x.state == LOADING for d in self._layers for x in d.values()):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(timeout=left)
            return True

    def cached(self) -> list[tuple[int, int]]:
        """(layer, expert) of the records held or being read, for tests and tools."""
        with self._cv:
            return sorted((n, e) for n, d in enumerate(self._layers) for e in d)

    def close(self) -> None:
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify_all()
        self.io.close()
        self.reader.close()

    def __enter__(self) -> "StreamingExpertStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_budgeted_store(checkpoint, budget: int | None, context_length: int, max_chunk: int, **options):
    """Plan `budget` bytes (None: what this machine or cgroup has available) and open a store with the
    expert cache the plan leaves (options go to StreamingExpertStore); BudgetError naming the minimum
    before anything is read."""
    from gptoss_stream.budget import available_memory, dense_ranges, plan_memory

    slot_bytes = expert_slot_bytes(checkpoint)
    plan = plan_memory(checkpoint.config, slot_bytes, budget if budget is not None else available_memory(),
                       context_length, max_chunk)
    store = StreamingExpertStore(checkpoint, plan.expert_slots, **options)
    # The plan keeps the dense weights in the page cache: fill it with large reads now instead of page faults.
    prefault_page_cache(dense_ranges(checkpoint))
    return store, plan
