"""Where the model gets an expert's MXFP4 weights from.

The model asks the store for the experts the router picked, layer by layer, and never touches the rest.
`MappedExpertStore` hands out views straight into the checkpoint's memory map: the kernel pages them in on
first use, and nothing else of the expert tensors is read.
"""

from __future__ import annotations

from dataclasses import dataclass

from gptoss_stream.checkpoint import Checkpoint, ExpertWeights


@dataclass
class ExpertStats:
    """Counters of what the store served, for --stats and memprof."""

    requests: int = 0        # experts asked for
    bytes_requested: int = 0  # MXFP4 bytes of those experts (weights + biases)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class MappedExpertStore:
    """Experts served as zero-copy views of the mapped checkpoint (page faults do the reading)."""

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self.stats = ExpertStats()

    def get(self, layer: int, expert: int) -> ExpertWeights:
        weights = self.checkpoint.expert(layer, expert)
        self.stats.requests += 1
        self.stats.bytes_requested += sum(r.nbytes for r in weights.ranges)
        return weights

    def close(self) -> None:
        pass
