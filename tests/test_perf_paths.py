"""The fast paths the model takes (tools/bench.py measures them): they must stay taken and stay correct."""

from __future__ import annotations

import numpy as np
import pytest

from gptoss_stream.engine import kernels
from gptoss_stream.engine.model import EXPERT_SCRATCH_BYTES_PER_THREAD, Model
from gptoss_stream.weights.checkpoint import Checkpoint


@pytest.fixture(autouse=True)
def restore_threads():
    yield
    kernels.set_num_threads(0)


@pytest.mark.parametrize("threads", [1, 2])
def test_expert_scratch_has_a_slot_per_thread(tiny_original, threads):
    """matmul_mxfp4 runs its parallel-tiles mode only when the scratch holds a ~2 MiB tile per thread."""
    model = Model(Checkpoint.open(tiny_original), max_chunk=8, num_threads=threads)
    assert model.state.tile.nbytes == threads * EXPERT_SCRATCH_BYTES_PER_THREAD


def test_parallel_tiles_give_the_logits_of_one_thread(tiny_original):
    """Prefill (M > 1 expert matmuls) and decode (M = 1) with tiles shared out between 2 threads equal the
    single-threaded run bit for bit: every output is one tile's dot product, whoever computes it."""
    tokens = np.random.default_rng(5).integers(0, 199_998, size=24).tolist()
    logits = []
    for threads in (1, 2):
        model = Model(Checkpoint.open(tiny_original), max_chunk=16, num_threads=threads)
        cache = model.new_cache(64)
        steps = [model.forward(tokens[:20], cache, all_logits=True)]
        steps += [model.forward([t], cache)[None] for t in tokens[20:]]
        logits.append(np.concatenate(steps))
    np.testing.assert_array_equal(logits[0], logits[1])
