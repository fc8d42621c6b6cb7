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
- Within a layer, one of three policies (`--cache-policy`): "decay" (default), frequency with exponential
  decay (half-life in tokens); "lfu", plain use counts since the start; "lru", the least recently used. On
  a uniformly random router every policy scores share/E; real routers are skewed (a few experts per layer
  take a large share of tokens) and frequency keeps those; the decay lets the core follow a change of topic
  that plain LFU's old counts would resist. Ties go to the least recently used.
- Guesses that the router did not take, and failed reads, go first; entries in use or being read for the
  model are never evicted.

Every entry is in exactly one state (the table TRANSITIONS and StreamingExpertStore's docstring); the
replacement rules are four small functions of those states (_first_out, _guess_victim, _policy_victim,
_progress_victim).

Thread model: one lock (`_cv`) guards all state and the counters; the I/O threads only run reads and report
completion under the lock. A failed read is raised (ReadError naming file and offset) to the consumer that
needs the expert; nothing waits forever (the consumer also checks that the I/O threads are alive).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from gptoss_stream.streaming.experts import ExpertRequest, ExpertStats
from gptoss_stream.streaming.reader import ALIGN, DEMAND, PREFETCH, FileReader, IOThread, PageCacheFill, ReadJob, \
    RecordLayout, aligned_buffer, plan_record, unmap
from gptoss_stream.weights.layouts.base import EXPERT_PIECES, MAPPED_EXPERT_PIECES, ExpertWeights, TensorRange

LFU, LRU, DECAY = "lfu", "lru", "decay"
POLICIES = (LFU, LRU, DECAY)
DEFAULT_POLICY = DECAY
DEFAULT_HALF_LIFE_TOKENS = 64.0

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

    In the original and HF layouts the bf16 biases (checkpoint.MAPPED_EXPERT_PIECES) are tensors of their
    own, stored among the dense bf16 weights (the safetensors writer sorts by dtype), 16 KB per expert
    against 13 MB of MXFP4: reading them with O_DIRECT would cost four extra small reads per expert. They
    are used in place instead and kept in the page cache with the dense weights (budget.dense_ranges). A
    piece that shares its range with others (a repacked record) is read with them.

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
    in_place = {i for name, i in zip(EXPERT_PIECES, owner) if alone[i] and name in MAPPED_EXPERT_PIECES}
    read = [r for i, r in enumerate(ranges) if i not in in_place]
    index = {i: n for n, i in enumerate(i for i in range(len(ranges)) if i not in in_place)}
    return mapped, [index.get(i) for i in owner], read


def expert_slot_bytes(checkpoint) -> int:
    """Bytes of one cache slot: what any expert's read part can need (all experts have the same shapes)."""
    return max(record_bound(split_expert(checkpoint, 0, 0)[2]), ALIGN)


# ---------------------------------------------------------------------------- entry states

# One state per cached (layer, expert) record; the read's progress is part of the state, so nothing else
# (no flag, no other module's job state) says whether an entry may be evicted.
GUESS_LOADING = "guess-loading"        # read on a guess the router has not judged yet
GUESS = "guess"                        # ... read
WANT_LOADING = "want-loading"          # routed in the open request, being read
WANT = "want"                          # ... read, not consumed yet
IN_USE = "in-use"                      # the consumer computes with it
CACHED = "cached"                      # read, nobody needs it now: evicted by the replacement policy
LOADING = "loading"                    # being read for nobody (its request ended): cached when read
REJECTED_LOADING = "rejected-loading"  # a guess the router did not take, its read already running
REJECTED = "rejected"                  # ... read: evicted first
FAILED = "failed"                      # the read failed; the error goes to the request that needs it

# state -> the states it may change to. An entry also leaves the table (its slot is freed) from GUESS_LOADING
# and REJECTED_LOADING when its queued read is cancelled, from CACHED, REJECTED and FAILED when evicted,
# from GUESS and WANT when a request must make progress, from FAILED when its error is raised or retried.
TRANSITIONS: dict[str, frozenset[str]] = {
    GUESS_LOADING: frozenset({GUESS, FAILED, WANT_LOADING, REJECTED_LOADING}),
    GUESS: frozenset({WANT, REJECTED}),
    WANT_LOADING: frozenset({WANT, FAILED, LOADING}),
    WANT: frozenset({IN_USE, CACHED}),
    IN_USE: frozenset({CACHED}),
    CACHED: frozenset({WANT}),
    LOADING: frozenset({CACHED, FAILED, WANT_LOADING}),
    REJECTED_LOADING: frozenset({REJECTED, FAILED, WANT_LOADING}),
    REJECTED: frozenset({WANT}),
    FAILED: frozenset(),
}
READ_RUNNING = {GUESS_LOADING: GUESS, WANT_LOADING: WANT, LOADING: CACHED, REJECTED_LOADING: REJECTED}
UNJUDGED = (GUESS_LOADING, GUESS)  # guesses in flight
REQUESTED = (WANT_LOADING, WANT, IN_USE)


@dataclass(eq=False)
class _Entry:
    layer: int
    expert: int
    slot: int
    job: ReadJob
    state: str
    since: int = 0  # when it entered its state (evicting the oldest rejected guess first)
    error: BaseException | None = None
    weights: ExpertWeights | None = None


@dataclass(eq=False)
class _Request:
    """The open request: its layer, its experts in order, those still waiting for a slot, and the one in use."""

    layer: int
    experts: list[int]
    missing: list[int]
    in_use: _Entry | None = None


class StreamingExpertStore:
    """Experts read into `slots` RAM-resident record buffers, replaced per layer by `policy`.

    Every entry is in one state; TRANSITIONS holds this table (tests check they agree) and every change is
    checked against it unless Python runs with -O. TRANSITIONS' comment says when an entry leaves the
    table (its slot freed).

        state             read     held by                                 may become
        GUESS_LOADING     running  a guess the router has not judged yet   GUESS, WANT_LOADING, REJECTED_LOADING, FAILED
        GUESS             done     the same, read                          WANT, REJECTED
        WANT_LOADING      running  the open request                        WANT, LOADING, FAILED
        WANT              done     the open request, not consumed yet      IN_USE, CACHED
        IN_USE            done     the consumer, computing with it         CACHED
        CACHED            done     nobody: the replacement policy's        WANT
        LOADING           running  nobody (its request ended)              CACHED, WANT_LOADING, FAILED
        REJECTED_LOADING  running  a guess the router did not take         REJECTED, WANT_LOADING, FAILED
        REJECTED          done     the same, read: evicted first           WANT
        FAILED            failed   its error, for whoever needs it next    -

    A request owns its entries (WANT_LOADING, WANT, IN_USE) until it ends: closed, left (`with`), or
    replaced by the next request, so a request that is dropped unstarted cannot keep them.

    Owns: the file descriptors (FileReader), the I/O threads, the slot arena, the dense-weight prefault
    thread; `close()` releases them in reverse order of creation.
    """

    prefetches = True

    def __init__(self, checkpoint, slots: int, policy: str = DEFAULT_POLICY, direct: bool | None = None,
                 half_life_tokens: float = DEFAULT_HALF_LIFE_TOKENS, prefetch: bool = True, io_threads: int = 1,
                 guesses_borrow: bool = False):
        cfg = checkpoint.config
        if policy not in POLICIES:
            raise ValueError(f"unknown expert cache policy {policy!r}; choose one of {POLICIES}")
        if slots < 1:
            raise ValueError(f"the expert cache needs at least 1 slot, got {slots}")
        if io_threads < 1:
            raise ValueError(f"need at least one I/O thread, got {io_threads}")
        self.checkpoint = checkpoint
        self.num_layers, self.num_experts = cfg.num_hidden_layers, cfg.num_experts
        self.experts_per_token = cfg.experts_per_token
        self.slots = min(slots, self.num_layers * self.num_experts)  # more could never be used
        self.policy = policy
        self.slot_bytes = expert_slot_bytes(checkpoint)
        self._stats = StreamStats()
        self._cv = threading.Condition()
        self._free = list(range(self.slots))[::-1]
        self._layers: list[dict[int, _Entry]] = [{} for _ in range(self.num_layers)]
        self._plans: dict[tuple[int, int], _RecordPlan] = {}
        self._request: _Request | None = None
        self._guess: dict[int, set[int]] = {}  # per layer, the latest guess (until its layer is requested)
        self._seq = 0
        self._closed = False
        # replacement bookkeeping, per (layer, expert), resident or not
        self._tick = 0
        # in requests (one per layer visit); plain LFU never decays
        self._half_life = math.inf if policy == LFU else max(half_life_tokens, 1e-9) * self.num_layers
        self._last_use = [[-1] * self.num_experts for _ in range(self.num_layers)]
        self._count = [[0.0] * self.num_experts for _ in range(self.num_layers)]
        self.prefetches = prefetch  # False: the model makes no guesses (for measuring what they bring)
        self.guesses_borrow = guesses_borrow  # True: guesses take slots like misses do (no cap; for measuring)
        self._prefault: PageCacheFill | None = None
        self.io: IOThread | None = None
        self.arena: np.ndarray | None = None
        self.reader = FileReader(direct)
        try:
            for path in checkpoint.files():
                self.reader.is_direct(path)  # open every shard now: bad permissions fail here, sizes recorded
            # Huge pages make every O_DIRECT read faster but cost compaction when first touched (0.4 GB/s
            # measured on a fragmented box): worth it when slots are refilled over and over, not when every
            # expert fits and each slot is read once.
            refills = self.slots < self.num_layers * self.num_experts
            self.arena = aligned_buffer(self.slots * self.slot_bytes, huge_pages=refills)
            self.io = IOThread(self.reader, workers=io_threads)
        except BaseException:
            self.close()
            raise

    @property
    def nbytes(self) -> int:
        return self.slots * self.slot_bytes

    @property
    def stats(self) -> StreamStats:
        """A consistent copy of the counters (the I/O threads update them under the lock)."""
        with self._cv:
            return self._stats.copy()

    # ------------------------------------------------------------------ the model's side

    def request(self, layer: int, experts: Iterable[int]) -> ExpertRequest:
        """Start reading the missing experts of `layer`; iterate to get each (valid until the next step).

        Ends the previous request if it is still open."""
        experts = [int(e) for e in experts]
        with self._cv:
            self._check_open()
            if self._request is not None:
                self._end(self._request)
            if layer == 0:
                self.reader.check_sizes()  # once per forward: a shrunk file would SIGBUS the mapped dense weights
            self._tick += 1
            stats, table = self._stats, self._layers[layer]
            want = set(experts)
            guess = self._guess.pop(layer, None)
            if guess is not None:
                stats.predicted += len(want)
                stats.predicted_right += len(want & guess)
            for entry in list(table.values()):
                if entry.state in UNJUDGED and entry.expert not in want:
                    self._reject(entry)
            request = self._request = _Request(layer, experts, [])
            for e in experts:
                entry = table.get(e)
                if entry is not None and entry.state == FAILED:
                    # Its read failed before anyone needed it (a guess's, an ended request's): the failure may
                    # be transient, read it again now that it is needed.
                    self._drop(entry)
                    entry = None
                self._touch(layer, e)
                stats.requests += 1
                stats.bytes_requested += self._plan(layer, e).nbytes
                if entry is None:
                    stats.misses += 1
                    request.missing.append(e)
                    continue
                stats.hits += 1
                if entry.state in UNJUDGED:
                    stats.prefetch_used += 1
                self._claim(entry)
            self._issue_missing()

        def end() -> None:
            with self._cv:
                self._end(request)

        return ExpertRequest(self._consume(request), on_close=end)

    def prefetch(self, layer: int, experts: Iterable[int]) -> None:
        """Guess: `layer` will want `experts` (most likely first). Read those not cached while slots allow.

        A later guess for the same layer replaces the earlier one: reads of dropped guesses that have not
        started are cancelled (their slots come back), those already read stay until the router decides.
        """
        experts = [int(e) for e in experts]
        with self._cv:
            if self._closed or not 0 <= layer < self.num_layers:
                return
            guess = self._guess[layer] = set(experts)
            for entry in list(self._layers[layer].values()):
                if entry.state == GUESS_LOADING and entry.expert not in guess and self.io.cancel(entry.job):
                    self._drop(entry)
                    self._stats.prefetch_issued -= 1  # never read: not a prefetch after all
            if self._request is not None and self._request.missing:
                return  # the current layer still waits for slots: guesses must not take them
            for e in experts:
                if e in self._layers[layer]:
                    continue
                slot = self._take_slot(layer, consumer=False, guess=guess)
                if slot is None:
                    break
                self._start(layer, e, slot, PREFETCH, GUESS_LOADING)
                self._stats.prefetch_issued += 1

    def _consume(self, request: _Request) -> Iterator[tuple[int, ExpertWeights]]:
        try:
            for e in request.experts:
                with self._cv:
                    entry = self._wait_ready(request, e)
                    self._set(entry, IN_USE)
                    request.in_use = entry
                    if entry.weights is None:
                        entry.weights = self._views(entry)
                    weights = entry.weights
                yield e, weights
                with self._cv:
                    if request.in_use is entry:
                        request.in_use = None
                        self._set(entry, CACHED)
                    self._issue_missing()
                    self._cv.notify_all()
        finally:
            with self._cv:
                self._end(request)

    def _end(self, request: _Request) -> None:
        """The request is over (closed, finished, or replaced): its entries belong to the cache again."""
        if self._request is not request:
            return
        for e in request.experts:
            entry = self._layers[request.layer].get(e)
            if entry is None:
                continue
            if entry.state == WANT_LOADING:
                self._set(entry, LOADING)
            elif entry.state in (WANT, IN_USE):
                self._set(entry, CACHED)
        request.in_use = None
        request.missing.clear()
        self._request = None
        self._cv.notify_all()

    def _wait_ready(self, request: _Request, e: int) -> _Entry:
        started: float | None = None
        try:
            while True:
                self._check_open()
                if self._request is not request:
                    raise RuntimeError("this expert request has ended (the next one was made)")
                entry = self._layers[request.layer].get(e)
                if entry is None:
                    slot = self._take_slot(request.layer, consumer=True, current=e)
                    if slot is not None:
                        if e in request.missing:
                            request.missing.remove(e)
                        self._start(request.layer, e, slot, DEMAND, WANT_LOADING)
                        continue
                elif entry.state == WANT:
                    return entry
                elif entry.state == FAILED:
                    self._drop(entry)
                    raise entry.error
                elif entry.state != WANT_LOADING:
                    self._claim(entry)  # entered after the request (a guess for this very layer): ours now
                    continue
                else:
                    self._issue_missing()  # keep the disk busy with the rest of this layer meanwhile
                if not self.io.alive:
                    raise RuntimeError("the expert reader thread has stopped") from self.io.error
                if started is None:
                    started = time.perf_counter()
                self._cv.wait(timeout=1.0)
        finally:
            if started is not None:
                self._stats.stall_seconds += time.perf_counter() - started

    # ------------------------------------------------------------------ states

    def _set(self, entry: _Entry, state: str) -> None:
        assert state in TRANSITIONS[entry.state], f"expert {entry.layer}/{entry.expert}: {entry.state} -> {state}"
        entry.state = state
        self._seq += 1
        entry.since = self._seq

    def _drop(self, entry: _Entry) -> None:
        """The entry leaves the table; its slot is free (its read was cancelled, has finished or failed)."""
        del self._layers[entry.layer][entry.expert]
        entry.weights = None
        self._free.append(entry.slot)

    def _claim(self, entry: _Entry) -> None:
        """The open request takes an entry that is read or being read (a hit)."""
        if entry.state in READ_RUNNING:
            self._set(entry, WANT_LOADING)
            self.io.promote(entry.job)
        else:
            self._set(entry, WANT)

    def _reject(self, entry: _Entry) -> None:
        """The router did not take this guess: cancel its read if it has not started, else evict it first."""
        if entry.state == GUESS:
            self._set(entry, REJECTED)
        elif self.io.cancel(entry.job):
            self._drop(entry)
            self._stats.prefetch_issued -= 1  # never read: not a prefetch after all
        else:
            self._set(entry, REJECTED_LOADING)

    def check_invariants(self) -> None:
        """AssertionError if the bookkeeping is inconsistent (tests; cheap enough to call after every step)."""
        with self._cv:
            entries = [x for d in self._layers for x in d.values()]
            used = sorted([x.slot for x in entries] + self._free)
            assert used == list(range(self.slots)), f"slots lost or shared: {used}"
            for n, d in enumerate(self._layers):
                for e, x in d.items():
                    assert (x.layer, x.expert) == (n, e) and x.state in TRANSITIONS, (n, e, x.state)
            request = self._request
            for x in entries:
                mine = request is not None and x.layer == request.layer and x.expert in request.experts
                assert mine or x.state not in REQUESTED, (x.layer, x.expert, x.state)
                assert (x.state == IN_USE) == (request is not None and request.in_use is x), (x.layer, x.expert)
                assert x.state != FAILED or x.error is not None
            if request is not None:
                assert all(e not in self._layers[request.layer] for e in request.missing)

    # ------------------------------------------------------------------ slots and replacement

    def _touch(self, layer: int, e: int) -> None:
        """Record a demand use of (layer, e) for the replacement policy (resident or not)."""
        last = self._last_use[layer][e]
        if last >= 0:
            self._count[layer][e] = self._count[layer][e] * 2.0 ** (-(self._tick - last) / self._half_life) + 1.0
        else:
            self._count[layer][e] = 1.0
        self._last_use[layer][e] = self._tick

    def _score(self, entry: _Entry) -> tuple[float, int]:
        """Lower is evicted first; ties (and never-requested entries, -inf) by least recent use."""
        last = self._last_use[entry.layer][entry.expert]
        if last < 0:
            return (-math.inf, last)
        if self.policy == LRU:
            return (float(last), last)
        if self.policy == LFU:
            return (self._count[entry.layer][entry.expert], last)
        # log2 of the decayed count, shifted by a term common to all keys: comparable across ticks
        return (math.log2(self._count[entry.layer][entry.expert]) + last / self._half_life, last)

    def _take_slot(self, layer: int, consumer: bool, current: int | None = None,
                   guess: set[int] | None = None) -> int | None:
        """A free slot, or one freed by evicting an entry (None: nothing may be evicted for this)."""
        if not self._free:
            victim = self._first_out()
            if victim is None and guess is not None and not self.guesses_borrow:
                victim = self._guess_victim(layer, guess)
                if victim is None and self._guesses_in_flight() >= self.experts_per_token:
                    return None
            if victim is None:
                victim = self._policy_victim(layer)
            if victim is None and consumer:
                victim = self._progress_victim(layer, current)
            if victim is None:
                return None
            self._drop(victim)
            self._stats.evictions += 1
        return self._free.pop()

    def _first_out(self) -> _Entry | None:
        """Rule 1: failed reads and guesses the router did not take, oldest first (a queued read is cancelled)."""
        out = sorted((x for d in self._layers for x in d.values() if x.state in (FAILED, REJECTED, REJECTED_LOADING)),
                     key=lambda x: x.since)
        for x in out:
            if x.state != REJECTED_LOADING or self.io.cancel(x.job):
                return x
        return None

    def _guess_victim(self, layer: int, guess: set[int]) -> _Entry | None:
        """Rule 2, for a guess: its own layer's cached entries outside the guess first. The router will very
        likely not take those this time (they keep only the value any entry has for later tokens), while an
        entry of another layer may be a hit within this very token. Beyond that, guesses may borrow only as
        many slots as one layer routes to (the plan's second layer of slots; _take_slot), so a small cache
        still reads the next layer ahead without guesses churning everyone's entries."""
        own = [x for x in self._layers[layer].values() if x.state == CACHED and x.expert not in guess]
        return min(own, key=self._score) if own else None

    def _guesses_in_flight(self) -> int:
        return sum(1 for d in self._layers for x in d.values() if x.state in UNJUDGED)

    def _policy_victim(self, layer: int) -> _Entry | None:
        """Rule 3, per-layer quotas: a layer under its share takes from the layer furthest over its share;
        otherwise from itself; then from anyone. Within a layer the policy's lowest score goes."""
        quota = self.slots / self.num_layers
        counts = [len(d) for d in self._layers]
        order = [layer]
        if counts[layer] < quota:
            order = sorted((n for n in range(self.num_layers) if counts[n] > quota), key=lambda n: -counts[n]) + order
        order += [n for n in sorted(range(self.num_layers), key=lambda n: -counts[n]) if n not in order]
        for n in order:
            candidates = [x for x in self._layers[n].values() if x.state == CACHED]
            if candidates:
                return min(candidates, key=self._score)
        return None

    def _progress_victim(self, layer: int, current: int | None) -> _Entry | None:
        """Rule 4, only for the expert the consumer waits for: an unjudged guess already read, then an
        expert wanted later in this request (read again when its turn comes)."""
        for d in self._layers:
            for x in d.values():
                if x.state == GUESS:
                    return x
        later = [x for x in self._layers[layer].values() if x.state == WANT and x.expert != current]
        if not later:
            return None
        return max(later, key=lambda x: x.expert)

    def _issue_missing(self) -> None:
        """Start the open request's misses, in order, while slots can be had without the consumer's rule."""
        request = self._request
        while request is not None and request.missing:
            e = request.missing[0]
            if e in self._layers[request.layer]:
                request.missing.pop(0)
                continue
            slot = self._take_slot(request.layer, consumer=False)
            if slot is None:
                return
            request.missing.pop(0)
            self._start(request.layer, e, slot, DEMAND, WANT_LOADING)

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

    def _start(self, layer: int, e: int, slot: int, priority: int, state: str) -> _Entry:
        plan = self._plan(layer, e)
        buffer = self.arena[slot * self.slot_bytes:(slot + 1) * self.slot_bytes]
        job = ReadJob(plan.layout, buffer, self._on_done, priority)
        entry = job.tag = _Entry(layer, e, slot, job, state)
        self._layers[layer][e] = entry
        self.io.submit(job)
        return entry

    def _on_done(self, job: ReadJob, error: BaseException | None) -> None:
        # Runs on an I/O thread.
        with self._cv:
            entry: _Entry = job.tag
            self._stats.read_seconds += job.seconds
            if self._layers[entry.layer].get(entry.expert) is not entry:
                return  # cancelled at close
            if error is None:
                self._stats.reads += 1
                self._stats.bytes_read += job.layout.read_bytes
                self._set(entry, READ_RUNNING[entry.state])
            else:
                entry.error = error
                self._set(entry, FAILED)
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
            while any(x.state in READ_RUNNING for d in self._layers for x in d.values()):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(timeout=left)
            return True

    def cached(self) -> list[tuple[int, int]]:
        """(layer, expert) of the records held or being read, for tests and tools."""
        with self._cv:
            return sorted((n, e) for n, d in enumerate(self._layers) for e in d)

    def states(self) -> dict[tuple[int, int], str]:
        """(layer, expert) -> state of every entry, for tests and tools."""
        with self._cv:
            return {(n, e): x.state for n, d in enumerate(self._layers) for e, x in d.items()}

    def prefault_dense(self, ranges: list[TensorRange]) -> None:
        """Fill the page cache with these ranges on a background thread the store owns (stopped at close)."""
        with self._cv:
            self._check_open()
            if self._prefault is None:
                self._prefault = PageCacheFill(ranges)

    def close(self) -> None:
        """Stop the prefault and I/O threads, close the files, unmap the arena (idempotent)."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify_all()
        if self._prefault is not None:
            self._prefault.close()
        if self.io is not None:
            self.io.close()  # waits for the running reads: nothing uses the fds or the arena after this
        with self._cv:
            for d in self._layers:
                for x in d.values():
                    x.weights = x.job.buffer = None
                d.clear()
        self.reader.close()
        if self.arena is not None:
            mapping, self.arena = self.arena.base, None
            unmap(mapping)

    def __enter__(self) -> "StreamingExpertStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def advise_random(checkpoint, name: str = "embedding.weight") -> bool:
    """No readahead when the mapped pages of one tensor fault (MADV_RANDOM).

    A token reads one row of the embedding (5.6 KB on gpt-oss), but a fault on a mapping pulls in the
    file's readahead around it (read_ahead_kb: 8 MiB on this machine class): ~8 MB of disk and of page cache
    per new token, in a cgroup competing with the dense weights. False where the layout stores the tensor
    elsewhere or the call fails (it is advice: nothing else changes)."""
    try:
        r = checkpoint.tensor_range(name)
    except (ValueError, KeyError):
        return False
    return checkpoint.advise_random(r)


def open_budgeted_store(checkpoint, budget: int | None, context_length: int, max_chunk: int,
                        random_embedding: bool = True, **options):
    """Plan `budget` bytes (None: what this machine or cgroup has available) and open a store with the
    expert cache the plan leaves (options go to StreamingExpertStore); BudgetError naming the minimum
    before anything is read. random_embedding: the embedding's rows fault without readahead (advise_random)."""
    from gptoss_stream.streaming.budget import dense_ranges, plan_memory
    from gptoss_stream.system import available_memory

    slot_bytes = expert_slot_bytes(checkpoint)
    plan = plan_memory(checkpoint.config, slot_bytes, budget if budget is not None else available_memory(),
                       context_length, max_chunk, dense_format=checkpoint.dense_format)
    store = StreamingExpertStore(checkpoint, plan.expert_slots, **options)
    # The plan keeps the dense weights in the page cache: fill it with large reads now instead of page faults.
    store.prefault_dense(dense_ranges(checkpoint))
    if random_embedding:
        advise_random(checkpoint)
    return store, plan
