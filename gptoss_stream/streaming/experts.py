"""Where the model gets an expert's MXFP4 weights from.

The model asks the store for the experts the router picked, layer by layer, and never touches the rest.
The protocol every store follows (model.Model.moe_block):

    with store.request(layer, experts) as routed:           # sorted expert ids; reads start at once
        store.prefetch(layer + 1, guessed_experts)          # only if store.prefetches: a hint, may be ignored
        for expert, weights in routed:
            ...                                             # weights stay valid until the next iteration

Leaving the `with` (or the next request) ends the request: a request that is dropped, never iterated or
interrupted by an exception must not keep its experts from being evicted.

`MappedExpertStore` hands out views straight into the checkpoint's memory map: the kernel pages them in on
first use, and nothing else of the expert tensors is read. expert_cache.StreamingExpertStore reads them
into a RAM-budgeted cache instead (`--ram-budget`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from gptoss_stream.weights.checkpoint import Checkpoint
from gptoss_stream.weights.layouts.base import ExpertWeights


@dataclass
class ExpertStats:
    """Counters of what the store served, for --stats and memprof."""

    requests: int = 0        # experts asked for
    bytes_requested: int = 0  # MXFP4 bytes of those experts (weights + biases)

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def copy(self):
        return dataclasses.replace(self)

    def since(self, earlier: "ExpertStats"):
        """Counters accumulated after `earlier` (a copy taken before), e.g. for one phase of a generation."""
        return type(self)(**{f.name: getattr(self, f.name) - getattr(earlier, f.name)
                             for f in dataclasses.fields(self)})


class ExpertRequest:
    """What `store.request` returns: iterate it once for (expert, weights); `close()` (or leaving `with`)
    ends it, whether or not it was iterated."""

    def __init__(self, items: Iterator[tuple[int, ExpertWeights]], on_close: Callable[[], None] | None = None):
        self._items = items
        self._on_close = on_close

    def __iter__(self) -> Iterator[tuple[int, ExpertWeights]]:
        return self._items

    def close(self) -> None:
        close = getattr(self._items, "close", None)
        if close is not None:
            close()
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()

    def __enter__(self) -> "ExpertRequest":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MappedExpertStore:
    """Experts served as zero-copy views of the mapped checkpoint (page faults do the reading)."""

    prefetches = False  # the page cache is the cache: no hints wanted

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self.stats = ExpertStats()
        # Views are built once per expert: building six of them per request cost ~56 µs a layer, on the
        # decode path. They are numpy headers over the mapping, no weight bytes.
        self._views: dict[tuple[int, int], ExpertWeights] = {}

    def request(self, layer: int, experts: Iterable[int]) -> ExpertRequest:
        experts = [int(e) for e in experts]
        return ExpertRequest((e, self.get(layer, e)) for e in experts)

    def prefetch(self, layer: int, experts: Iterable[int]) -> None:
        pass

    def get(self, layer: int, expert: int) -> ExpertWeights:
        weights = self._views.get((layer, expert))
        if weights is None:
            weights = self._views[layer, expert] = self.checkpoint.expert(layer, expert)
        self.stats.requests += 1
        self.stats.bytes_requested += sum(r.nbytes for r in weights.ranges)
        return weights

    def close(self) -> None:
        pass
