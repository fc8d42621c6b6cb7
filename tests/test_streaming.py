"""Expert streaming: record layout, reads, the budgeted cache, prefetch, fault handling, and bit-exact logits.

The streamed run must equal the mapped (unconstrained) run bit for bit: the store hands the kernels the same
bytes, and the model consumes experts in the same (sorted) order whatever the store.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

from gptoss_stream.commands import cli
from gptoss_stream.engine.model import Model
from gptoss_stream.streaming.expert_cache import (DECAY, LFU, LRU, POLICIES, StreamingExpertStore, expert_slot_bytes,
                                                  open_budgeted_store, record_bound, split_expert)
from gptoss_stream.streaming.experts import MappedExpertStore
from gptoss_stream.streaming.reader import ALIGN, FileReader, IOThread, ReadError, ReadJob, aligned_buffer, plan_record
from gptoss_stream.weights.checkpoint import Checkpoint
from gptoss_stream.weights.layouts.base import TensorRange
from gptoss_stream.weights.repack import repack

# Unclosed files, sockets or mappings are errors here (run also under `python -X dev`): every resource has
# an owner that closes it.
pytestmark = [pytest.mark.filterwarnings("error::ResourceWarning"),
              pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning"),
              pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")]

PIECES = ("mlp1_blocks", "mlp1_scales", "mlp1_bias", "mlp2_blocks", "mlp2_scales", "mlp2_bias")


def prompt(n: int, seed: int = 3) -> list[int]:
    return np.random.default_rng(seed).integers(0, 199_998, size=n).tolist()


def run(model: Model, tokens: list[int], prefill: int) -> list[np.ndarray]:
    """Logits of a prefill of tokens[:prefill] then one decode step per remaining token."""
    cache = model.new_cache(256)
    out = [model.forward(tokens[:prefill], cache)]
    out += [model.forward([t], cache) for t in tokens[prefill:]]
    return out


def in_thread(fn, timeout: float = 120.0):
    """Run fn on a thread and fail (instead of hanging the suite) if it does not finish in time."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # re-raised below
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"did not finish in {timeout} s (deadlock?)"
    if "error" in box:
        raise box["error"]
    return box["value"]


# ---------------------------------------------------------------------------- record layout


def test_plan_record_coalesces_touching_pages_only():
    a = TensorRange("/f", 4096 * 3 + 100, 5000)         # pages 3..4
    b = TensorRange("/f", 4096 * 5 + 7, 10)             # page 5: touches a's span -> one read
    c = TensorRange("/f", 4096 * 9, 4096)               # pages 9: gap -> its own read
    d = TensorRange("/g", 4096 * 3 + 100, 5000)         # other file
    layout = plan_record([c, a, d, b])
    assert [(e.path, e.file_offset, e.nbytes) for e in layout.extents] == [
        ("/f", 4096 * 3, 4096 * 3), ("/f", 4096 * 9, 4096), ("/g", 4096 * 3, 4096 * 2)]
    assert layout.nbytes == layout.read_bytes == 4096 * 6
    assert all(e.buffer_offset % ALIGN == 0 and e.file_offset % ALIGN == 0 for e in layout.extents)
    # request order is kept for the piece offsets
    assert layout.piece_offsets == (4096 * 3, 100, 4096 * 4 + 100, 4096 * 2 + 7)
    # one contiguous range (a repacked record) is one read
    assert len(plan_record([TensorRange("/f", 8192, 3 * 4096)]).extents) == 1
    with pytest.raises(ValueError):
        plan_record([])
    with pytest.raises(ValueError, match="bad byte range"):
        plan_record([TensorRange("/f", 0, 0)])


@pytest.mark.parametrize("direct", [True, False])
def test_read_record_returns_the_file_bytes(tiny_original, direct):
    ck = Checkpoint.open(tiny_original)
    reader = FileReader(direct=direct)
    data = np.fromfile(ck.files()[0], dtype=np.uint8)
    ranges = ck.expert_ranges(2, 5)
    layout = plan_record(ranges)
    buf = aligned_buffer(layout.nbytes)
    assert buf.ctypes.data % ALIGN == 0
    reader.read_record(layout, buf)
    for r, at in zip(ranges, layout.piece_offsets):
        assert np.array_equal(buf[at:at + r.nbytes], data[r.offset:r.offset + r.nbytes])
    assert reader.is_direct(ck.files()[0]) == direct  # ext4/xfs/tmpfs-free temp dirs support O_DIRECT
    assert reader.counters_copy().bytes >= layout.read_bytes - ALIGN
    reader.close()


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_short_read_names_file_and_offset(micro_checkpoint, tmp_path):
    d = copy_checkpoint(micro_checkpoint / "original", tmp_path / "ck")
    ck = Checkpoint.open(d)
    path = ck.files()[0]
    ranges = ck.expert_ranges(1, 3)
    last = max(ranges, key=lambda r: r.offset)
    os.truncate(path, last.offset + 1)
    reader = FileReader()
    with pytest.raises(ReadError, match=rf"{path}: unexpected end of file at offset \d+ .*truncated"):
        reader.read_record(plan_record(ranges), aligned_buffer(1 << 20))
    reader.check_sizes()  # opened after the truncation: nothing shrank since
    os.truncate(path, last.offset)
    with pytest.raises(ReadError, match=rf"{path}: file shrank from {last.offset + 1} to {last.offset} bytes"):
        reader.check_sizes()
    reader.close()


def test_io_thread_forwards_errors_and_keeps_serving(micro_checkpoint, tmp_path):
    d = copy_checkpoint(micro_checkpoint / "original", tmp_path / "ck")
    ck = Checkpoint.open(d)
    good = plan_record(ck.expert_ranges(0, 0))
    bad = plan_record([TensorRange(ck.files()[0], os.path.getsize(ck.files()[0]) + 8192, 100)])
    io = IOThread(FileReader())
    done: dict[str, BaseException | None] = {}
    event = threading.Event()

    def finished(job, error):
        done[job.tag] = error
        if len(done) == 2:
            event.set()

    io.submit(ReadJob(bad, aligned_buffer(bad.nbytes), finished, tag="bad"))
    io.submit(ReadJob(good, aligned_buffer(good.nbytes), finished, tag="good"))
    assert event.wait(30)
    assert isinstance(done["bad"], ReadError) and ck.files()[0] in str(done["bad"])
    assert done["good"] is None
    # jobs queued at close complete with an error instead of leaving their waiters hanging
    io.close()
    assert not io.alive


# ---------------------------------------------------------------------------- the store


def test_biases_are_used_in_place_and_the_mxfp4_pieces_read(tiny_original):
    ck = Checkpoint.open(tiny_original)
    mapped, owner, read = split_expert(ck, 1, 2)
    ranges = ck.expert_ranges(1, 2)
    assert owner == [0, 1, None, 2, 3, None]
    assert read == [ranges[0], ranges[1], ranges[3], ranges[4]]
    assert expert_slot_bytes(ck) == record_bound(read)
    with StreamingExpertStore(ck, slots=2) as store:
        (_, w), = list(store.request(1, [2]))
        assert np.shares_memory(w.mlp1_bias, mapped.mlp1_bias) and np.shares_memory(w.mlp2_bias, mapped.mlp2_bias)
        assert not np.shares_memory(w.mlp1_blocks, mapped.mlp1_blocks)
        assert store.stats.bytes_read == plan_record(read).read_bytes


def test_store_serves_the_mapped_bytes(tiny_original):
    ck = Checkpoint.open(tiny_original)
    cfg = ck.config
    with StreamingExpertStore(ck, slots=5) as store:
        for layer in range(cfg.num_hidden_layers):
            experts = list(range(0, cfg.num_experts, 2))
            for e, w in store.request(layer, experts):
                mapped = ck.expert(layer, e)
                for name in PIECES:
                    ours, ref = getattr(w, name), getattr(mapped, name)
                    assert ours.dtype == ref.dtype and ours.shape == ref.shape, name
                    assert np.array_equal(ours, ref), (layer, e, name)
                    assert not ours.flags.writeable
        s = store.stats
        assert s.requests == s.hits + s.misses == cfg.num_hidden_layers * len(experts)
        assert s.evictions > 0 and len(store.cached()) <= 5
        assert s.bytes_read >= s.misses * ck.expert_nbytes(0, 0)


@pytest.mark.parametrize("policy, slots", [(LFU, 8), (LRU, 8), (DECAY, 8), (DECAY, 1), (DECAY, 32)])
def test_streamed_logits_are_bit_exact(tiny_original, policy, slots):
    """Prefill chunks need up to all 8 experts of a layer: 1 slot streams them one at a time."""
    ck = Checkpoint.open(tiny_original)
    tokens = prompt(24)
    reference = run(Model(ck, max_chunk=8), tokens, prefill=16)
    store = StreamingExpertStore(ck, slots=slots, policy=policy)
    model = Model(ck, max_chunk=8, expert_store=store)
    streamed = in_thread(lambda: run(model, tokens, prefill=16))
    store.close()
    for a, b in zip(reference, streamed):
        assert np.array_equal(a, b)
    s = store.stats
    total = ck.config.num_hidden_layers * ck.config.num_experts
    if slots < total:
        assert s.evictions > 0
    else:
        assert s.evictions == 0 and s.reads <= total
    assert s.predicted > 0 and 0 <= s.predicted_right <= s.predicted
    assert s.prefetch_used <= s.prefetch_issued


def test_hf_layout_streams_the_same(tiny_original, tiny_hf):
    tokens = prompt(10, seed=4)
    reference = run(Model(Checkpoint.open(tiny_original), max_chunk=8), tokens, prefill=6)
    ck = Checkpoint.open(tiny_hf)  # sharded: an expert's pieces may sit in different files
    with StreamingExpertStore(ck, slots=6) as store:
        streamed = in_thread(lambda: run(Model(ck, max_chunk=8, expert_store=store), tokens, prefill=6))
    for a, b in zip(reference, streamed):
        assert np.array_equal(a, b)


def test_repacked_layout_reads_one_record_per_expert(tiny_original, tmp_path):
    repack(tiny_original, tmp_path / "repacked", progress=False)
    ck = Checkpoint.open(tmp_path / "repacked")
    mapped, owner, read = split_expert(ck, 0, 1)
    assert len(read) == 1 and owner == [0] * 6  # one contiguous record, biases included
    tokens = prompt(10, seed=5)
    reference = run(Model(Checkpoint.open(tiny_original), max_chunk=8), tokens, prefill=6)
    with StreamingExpertStore(ck, slots=6) as store:
        streamed = in_thread(lambda: run(Model(ck, max_chunk=8, expert_store=store), tokens, prefill=6))
        assert store.stats.reads > 0 and store.stats.bytes_read == store.stats.reads * plan_record(read).read_bytes
        assert store.io.reader.counters_copy().reads == store.stats.reads  # one pread per expert
    for a, b in zip(reference, streamed):
        assert np.array_equal(a, b)


def request_all(store, layer, experts):
    return [e for e, _ in store.request(layer, experts)]


def test_lfu_keeps_a_popular_expert_that_lru_drops(tiny_original):
    """Layer 0 (a share of 2 slots) uses expert 0 every third request and two newcomers in between:
    LRU evicts expert 0 each time, LFU keeps it once it has been seen twice."""
    ck = Checkpoint.open(tiny_original)
    layers = ck.config.num_hidden_layers
    hits = {}
    for policy in (LFU, LRU):
        with StreamingExpertStore(ck, slots=2 * layers, policy=policy) as store:
            for layer in range(1, layers):  # the other layers hold their share: the cache is full
                request_all(store, layer, [0, 1])
            for step in range(10):
                request_all(store, 0, [0])
                request_all(store, 0, [1 + (2 * step) % 7])
                request_all(store, 0, [1 + (2 * step + 1) % 7])
            assert len(store.cached()) == 2 * layers
            hits[policy] = store.stats.hits
    assert hits[LFU] >= 8 and hits[LRU] == 0  # LFU learns after two returns; LRU never keeps it


def test_each_policy_evicts_its_own_victim(tiny_original):
    """Layer 0 holds A, B, C (its share of 3) when D comes; each policy picks a different victim:
    B was used 31 times, 30 of them long ago (its decayed count is the smallest, ~0.5), A 20 times a little
    earlier than B's last use (the least recently used), C twice just now (the smallest plain count).
    lru evicts A, lfu evicts C, decay (half-life 1 token = 4 requests here) evicts B."""
    ck = Checkpoint.open(tiny_original)
    layers = ck.config.num_hidden_layers
    A, B, C, D = 0, 1, 2, 3
    victims = {}
    for policy in POLICIES:
        with StreamingExpertStore(ck, slots=3 * layers, policy=policy, half_life_tokens=1.0) as store:
            for layer in range(1, layers):  # the other layers hold their share: layer 0 gets the last 3 slots
                request_all(store, layer, [0, 1, 2])

            def use(e, times=1):
                for _ in range(times):
                    request_all(store, 0, [e])

            def idle(requests):  # time passes (requests of another layer, all hits)
                for _ in range(requests):
                    request_all(store, 1, [0])

            use(B, 30)
            idle(40)    # 10 half-lives: B's 30 uses decay to ~0
            use(A, 20)
            use(B)
            idle(4)
            use(C, 2)
            assert {e for n, e in store.cached() if n == 0} == {A, B, C}
            evictions = store.stats.evictions
            use(D)
            assert store.stats.evictions == evictions + 1
            (victim,) = {A, B, C} - {e for n, e in store.cached() if n == 0}
            victims[policy] = victim
            store.check_invariants()
    assert victims == {LRU: A, LFU: C, DECAY: B}


def test_a_tie_goes_to_the_least_recently_used(tiny_original):
    """Equal counts (lfu) or equal decayed counts (decay, used once each in a row: the later one is larger):
    the older entry goes first."""
    ck = Checkpoint.open(tiny_original)
    layers = ck.config.num_hidden_layers
    for policy in POLICIES:
        with StreamingExpertStore(ck, slots=2 * layers, policy=policy) as store:
            for layer in range(1, layers):
                request_all(store, layer, [0, 1])
            for e in (5, 6, 7):
                request_all(store, 0, [e])
            assert {e for n, e in store.cached() if n == 0} == {6, 7}, policy


def test_layers_keep_their_share(tiny_original):
    """A cyclic scan over layers larger than the cache: each layer keeps its share (slots / layers) instead
    of one layer's misses evicting the experts every other layer is about to reuse."""
    ck = Checkpoint.open(tiny_original)
    layers = ck.config.num_hidden_layers
    with StreamingExpertStore(ck, slots=2 * layers) as store:
        for layer in range(layers):
            request_all(store, layer, [0, 1])
        for _ in range(2):
            before = store.stats.copy()
            for layer in range(layers):  # one newcomer per layer: it replaces one of that layer's own
                request_all(store, layer, [0])
                request_all(store, layer, [2 + layer])
            per_layer = [sum(1 for n, _ in store.cached() if n == layer) for layer in range(layers)]
            assert per_layer == [2] * layers
            assert store.stats.since(before).hits >= layers  # expert 0 of every layer survived the scan
        # a layer that needs more than its share at once borrows from the others...
        request_all(store, 0, [3, 4, 5])
        assert sum(1 for n, _ in store.cached() if n == 0) == 3
        # ...and gives it back when one of them, under its share, needs a slot
        lender = next(n for n in range(1, layers) if sum(1 for m, _ in store.cached() if m == n) < 2)
        request_all(store, lender, [7])
        per_layer = [sum(1 for n, _ in store.cached() if n == layer) for layer in range(layers)]
        assert per_layer == [2] * layers


def test_wrong_guesses_are_evicted_first_and_counted(tiny_original):
    ck = Checkpoint.open(tiny_original)
    with StreamingExpertStore(ck, slots=8) as store:
        request_all(store, 0, [0, 1, 2, 3])
        store.prefetch(1, [4, 5, 6, 7])
        assert store.wait_idle(30)
        request_all(store, 1, [4, 5, 0, 1])  # two of four guessed right; the cache is full
        s = store.stats
        assert (s.predicted, s.predicted_right) == (4, 2)
        assert (s.prefetch_issued, s.prefetch_used) == (4, 2)
        assert s.prediction_accuracy == 0.5 and s.prefetch_precision == 0.5
        assert s.evictions == 2  # the two wrong guesses made room for the two misses
        assert set(store.cached()) == {(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 4), (1, 5)}


def test_guesses_replace_their_own_layer_first_and_borrow_one_layer_at_most(tiny_original):
    ck = Checkpoint.open(tiny_original)
    layers = ck.config.num_hidden_layers  # 4 layers, 8 experts, k = 4

    def layer(n):
        return [e for m, e in store.cached() if m == n]

    with StreamingExpertStore(ck, slots=2 * layers) as store:
        for n in range(layers):
            request_all(store, n, [0, 1])  # full: two entries per layer
        store.prefetch(1, [4, 5, 6, 7])  # 4, 5 replace layer 1's own; 6, 7 borrow: k = 4 guesses in flight
        assert layer(1) == [4, 5, 6, 7] and len(layer(0)) == 1 and len(layer(2)) == 1 and len(layer(3)) == 2
        store.prefetch(3, [5])  # its own entries go first: nothing borrowed
        assert len(layer(3)) == 2 and 5 in layer(3) and len(layer(0)) == 1
        store.prefetch(2, [6, 7])  # 6 replaces layer 2's own; 7 would borrow, but k guesses are in flight
        assert layer(2) == [6] and len(layer(0)) == 1 and len(store.cached()) == 2 * layers
        assert store.stats.prefetch_issued == 6
        assert store.wait_idle(30)


def test_a_new_guess_cancels_reads_not_started(tiny_original):
    ck = Checkpoint.open(tiny_original)
    with StreamingExpertStore(ck, slots=8) as store:
        gate, started = threading.Event(), threading.Event()
        read = store.io.reader.read_record

        def slow_read(layout, buffer):  # hold the I/O thread inside the first read
            started.set()
            gate.wait(30)
            return read(layout, buffer)

        store.io.reader.read_record = slow_read
        store.prefetch(1, [4, 5])
        assert started.wait(30)         # 4 is being read, 5 waits in the queue
        store.prefetch(1, [6])          # the sharper guess: 5 is dropped, 4 cannot be
        store.io.reader.read_record = read
        gate.set()
        assert store.wait_idle(30)
        assert store.cached() == [(1, 4), (1, 6)]
        assert store.stats.prefetch_issued == 2
        request_all(store, 1, [6, 7])
        assert (store.stats.predicted, store.stats.predicted_right, store.stats.prefetch_used) == (2, 1, 1)


def test_failed_read_is_raised_to_the_model_without_hanging(micro_checkpoint, tmp_path):
    d = copy_checkpoint(micro_checkpoint / "original", tmp_path / "ck")
    ck = Checkpoint.open(d)
    path = ck.files()[0]
    store = StreamingExpertStore(ck, slots=4)
    # Truncate after the store opened the file: layer 1's experts (read on the I/O thread) are gone.
    target = max(ck.expert_ranges(1, 2), key=lambda r: r.offset)
    with open(path, "r+b") as f:
        f.truncate(target.offset)
    with pytest.raises(ReadError, match=rf"{path}: unexpected end of file at offset \d+"):
        in_thread(lambda: request_all(store, 1, [2]), timeout=30)
    # a prefetch that fails surfaces when the expert is asked for
    store.prefetch(1, [3])
    with pytest.raises(ReadError, match=path):
        in_thread(lambda: request_all(store, 1, [3]), timeout=30)
    # the start of every forward checks the files: a shrunk file is an error, not a SIGBUS in the dense weights
    with pytest.raises(ReadError, match=rf"{path}: file shrank from \d+ to {target.offset} bytes"):
        request_all(store, 0, [0])
    store.close()
    with pytest.raises(RuntimeError, match="closed"):
        request_all(store, 1, [0])


def test_mapped_store_protocol(tiny_original):
    ck = Checkpoint.open(tiny_original)
    store = MappedExpertStore(ck)
    got = list(store.request(1, np.array([3, 5])))
    assert [e for e, _ in got] == [3, 5]
    assert np.shares_memory(got[0][1].mlp1_blocks, ck.expert(1, 3).mlp1_blocks)
    store.prefetch(2, [1])  # a no-op
    assert store.stats.requests == 2 and not store.prefetches


def test_budgeted_store_from_plan(tiny_original):
    ck = Checkpoint.open(tiny_original)
    store, plan = open_budgeted_store(ck, 2 << 30, 4096, 64)
    with store:
        total = ck.config.num_hidden_layers * ck.config.num_experts
        assert store.slots == plan.expert_slots == total  # tiny: every expert fits
        assert store.nbytes == plan.expert_cache


def test_cli_stats(tiny_original, capsys, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", os.environ.get("TIKTOKEN_CACHE_DIR", "/work/shared/tiktoken"))
    rc = cli.main(["generate", "-m", str(tiny_original), "-p", "Hello", "--raw", "-n", "3", "-t", "0",
                   "--ram-budget", "1G", "--stats", "--chunk", "8"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "[stats] plan: RAM budget 1.00 GiB" in err and "cache policy decay" in err  # the default
    assert "[stats] decode: 2 tokens" in err and "hit rate" in err and "prediction accuracy" in err
    assert "[stats-json] {" in err
    stats = json.loads(err.split("[stats-json] ", 1)[1].splitlines()[0])
    layers = Checkpoint.open(tiny_original).config.num_hidden_layers
    assert stats["decode"]["requests"] >= 2 * layers and stats["prefill"]["requests"] >= layers
    rc = cli.main(["generate", "-m", str(tiny_original), "-p", "Hello", "--raw", "-n", "2", "-t", "0",
                   "--mmap-only", "--stats"])
    assert rc == 0
    assert "page faults do the reading" in capsys.readouterr().err
    for policy in POLICIES:
        assert cli.main(["generate", "-m", str(tiny_original), "-p", "Hi", "--raw", "-n", "1", "--ram-budget", "1G",
                         "--stats", "--cache-policy", policy]) == 0
        assert f"cache policy {policy}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["generate", "-m", str(tiny_original), "-p", "Hi", "--cache-policy", "fifo"])
    assert "invalid choice: 'fifo'" in capsys.readouterr().err


@pytest.mark.slow
def test_full_width_streamed_logits_are_bit_exact(full_width_checkpoint):
    """Full-width gpt-oss-20b layers (2 of them, conftest) with a cache of 10 of 64 experts."""
    ck = Checkpoint.open(full_width_checkpoint)
    tokens = prompt(12, seed=6)
    reference = run(Model(ck, max_chunk=8), tokens, prefill=8)
    with StreamingExpertStore(ck, slots=10) as store:
        streamed = in_thread(lambda: run(Model(ck, max_chunk=8, expert_store=store), tokens, prefill=8), 1200)
        assert store.stats.evictions > 0
    for a, b in zip(reference, streamed):
        assert np.array_equal(a, b)


# ---------------------------------------------------------------------------- issue 17: store bugs


def test_a_request_that_is_never_iterated_does_not_hang_the_next(tiny_original):
    """request() marks its experts wanted at once; a dropped (never started) request must not keep them."""
    ck = Checkpoint.open(tiny_original)
    with StreamingExpertStore(ck, slots=2) as store:
        store.request(0, [0, 1])  # dropped without iterating
        assert in_thread(lambda: request_all(store, 1, [2]), timeout=10) == [2]


def test_an_error_between_request_and_the_loop_does_not_hang_the_model(tiny_original):
    """Model.moe_block guesses the next layer's experts between request() and the loop (kernel calls that
    may raise, or Ctrl-C): the next forward must still run."""
    ck = Checkpoint.open(tiny_original)
    with StreamingExpertStore(ck, slots=2) as store:
        model = Model(ck, max_chunk=8, expert_store=store)
        real = model.guess_experts
        calls = []

        def failing(layer, x):
            calls.append(layer)
            if layer == 2 and calls.count(2) == 1:  # in layer 1's MoE: layer 1's experts are marked
                raise KeyboardInterrupt
            return real(layer, x)

        model.guess_experts = failing
        cache = model.new_cache(64)
        with pytest.raises(KeyboardInterrupt):
            model.forward(prompt(8), cache)
        reference = run(Model(ck, max_chunk=8), prompt(8, seed=9), prefill=8)
        streamed = in_thread(lambda: run(model, prompt(8, seed=9), prefill=8), timeout=30)
        assert np.array_equal(reference[0], streamed[0])


def hold_reads(store):
    """Hold the I/O thread inside its next read until the returned gate is set (returns gate, started)."""
    gate, started = threading.Event(), threading.Event()
    read = store.io.reader.read_record

    def slow_read(layout, buffer):
        started.set()
        gate.wait(30)
        return read(layout, buffer)

    store.io.reader.read_record = slow_read
    return gate, started, lambda: setattr(store.io.reader, "read_record", read)


def test_a_rejected_guess_cancelled_by_request_is_not_counted_as_a_prefetch(tiny_original):
    ck = Checkpoint.open(tiny_original)
    with StreamingExpertStore(ck, slots=8) as store:
        gate, started, restore = hold_reads(store)
        store.prefetch(1, [4, 5])
        assert started.wait(30)  # 4 is being read, 5 is queued
        restore()
        gate.set()
        request_all(store, 1, [6])  # the router took neither: 5's read is cancelled, it was never a prefetch
        assert store.wait_idle(30)
        s = store.stats
        assert (s.prefetch_issued, s.prefetch_used) == (1, 0)


def test_a_guess_whose_read_failed_once_is_read_again_when_routed(tiny_original):
    ck = Checkpoint.open(tiny_original)
    with StreamingExpertStore(ck, slots=8) as store:
        read = store.io.reader.read_record
        failures = []

        def flaky(layout, buffer):
            if not failures:
                failures.append(1)
                raise ReadError("injected transient failure")
            return read(layout, buffer)

        store.io.reader.read_record = flaky
        store.prefetch(1, [3])
        assert store.wait_idle(30) and failures
        (e, w), = in_thread(lambda: [(e, w.mlp1_blocks.copy()) for e, w in store.request(1, [3])], timeout=30)
        assert e == 3 and np.array_equal(w, ck.expert(1, 3).mlp1_blocks)


def test_two_io_threads_refused_o_direct_on_one_file_reopen_it_once(tiny_original, monkeypatch):
    """Both workers get EINVAL from an O_DIRECT read of the same file: one buffered reopen, no fd closed
    under the other worker, and both records read right."""
    import errno
    import fcntl

    ck = Checkpoint.open(tiny_original)
    path = ck.files()[0]
    reader = FileReader()
    assert reader.is_direct(path)
    both_in = threading.Barrier(2, timeout=10)
    real_preadv, real_open, real_close = os.preadv, os.open, os.close
    reopened, closed = [], []

    def preadv(fd, buffers, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            both_in.wait()  # both workers hold the O_DIRECT fd
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset)

    def open_(p, flags, *args, **kwargs):
        fd = real_open(p, flags, *args, **kwargs)
        if str(p) == path:
            reopened.append(fd)
        return fd

    def close(fd):
        closed.append(fd)
        return real_close(fd)

    monkeypatch.setattr(os, "preadv", preadv)
    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "close", close)
    io = IOThread(reader, workers=2)
    results: dict = {}
    done = threading.Event()

    def finished(job, error):
        results[job.tag] = error
        if len(results) == 2:
            done.set()

    jobs = {}
    for e in (1, 2):
        layout = plan_record(ck.expert_ranges(0, e))
        jobs[e] = ReadJob(layout, aligned_buffer(layout.nbytes), finished, tag=e)
        io.submit(jobs[e])
    assert done.wait(30)
    io.close()
    monkeypatch.undo()
    assert results == {1: None, 2: None}
    assert len(reopened) == 1 and reopened[0] not in closed, (reopened, closed)
    for e, job in jobs.items():
        for r, at in zip(ck.expert_ranges(0, e), job.layout.piece_offsets):
            assert np.array_equal(job.buffer[at:at + r.nbytes],
                                  np.fromfile(path, np.uint8, count=r.nbytes, offset=r.offset))
    reader.close()


# ---------------------------------------------------------------------------- issue 17: states and lifetimes


def open_fds() -> set[str]:
    # Objects earlier tests left behind close their fds when collected, not during our count. Their
    # ResourceWarnings belong to those tests, not to this one (which test's garbage is still around here
    # depends on the order and the compute path).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    return set(os.listdir("/proc/self/fd"))


def test_close_releases_every_fd_thread_and_the_arena(tiny_original):
    ck = Checkpoint.open(tiny_original)
    fds, threads = open_fds(), set(threading.enumerate())
    store, _ = open_budgeted_store(ck, 2 << 30, 256, 8, io_threads=2)
    mapping = store.arena.base.obj
    assert len(threading.enumerate()) > len(threads) and len(open_fds()) > len(fds)
    store.prefetch(1, [0, 1, 2])
    request_all(store, 0, [3, 4])
    store.request(2, [5])  # left open: close() must not care
    store.close()
    assert open_fds() == fds and set(threading.enumerate()) == threads
    assert mapping.closed
    store.close()  # idempotent


def test_a_failing_constructor_closes_what_it_opened(tiny_original, monkeypatch):
    from gptoss_stream.streaming import expert_cache

    ck = Checkpoint.open(tiny_original)
    fds, threads = open_fds(), set(threading.enumerate())

    def broken(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(expert_cache, "IOThread", broken)
    with pytest.raises(RuntimeError, match="injected"):
        StreamingExpertStore(ck, slots=2)
    assert open_fds() == fds and set(threading.enumerate()) == threads


def test_an_error_in_a_completion_callback_stops_the_io_thread_visibly(tiny_original, monkeypatch):
    ck = Checkpoint.open(tiny_original)
    seen = []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(args.exc_value))
    io = IOThread(FileReader())
    layout = plan_record(ck.expert_ranges(0, 0))

    def broken(job, error):
        raise ValueError("bug in the callback")

    io.submit(ReadJob(layout, aligned_buffer(layout.nbytes), broken))
    for t in io._threads:
        t.join(30)
    assert not io.alive and isinstance(io.error, ValueError) and seen == [io.error]
    io.close()


def test_request_objects_end_their_hold_however_they_are_left(tiny_original):
    ck = Checkpoint.open(tiny_original)
    with StreamingExpertStore(ck, slots=3) as store:
        with store.request(0, [0, 1, 2]) as routed:
            e, _ = next(iter(routed))
            assert store.states()[0, e] == "in-use"
        store.check_invariants()
        assert set(store.states().values()) <= {"cached", "loading"}
        first = store.request(1, [0, 1])
        next(iter(first))
        store.request(1, [2])  # the next request ends the first, which then refuses to go on
        with pytest.raises(RuntimeError, match="ended"):
            next(iter(first))
        store.check_invariants()


STRESS_STEPS = int(os.environ.get("GPTOSS_STRESS_STEPS", "10000"))  # per store configuration


@pytest.mark.parametrize("slots, io_threads", [(2, 1), (3, 2)])
def test_random_request_prefetch_abandon_fail_sequences(tiny_original, slots, io_threads):
    """Random requests (consumed fully, in part, or not at all), guesses, and injected read failures against
    a small store: every step ends within a deadline, the state invariants hold after each one, the weights
    served are the checkpoint's, and close gives every thread and fd back."""
    import random
    import time

    ck = Checkpoint.open(tiny_original)
    cfg = ck.config
    expected = {(n, e): ck.expert(n, e).mlp1_blocks.copy() for n in range(cfg.num_hidden_layers)
                for e in range(cfg.num_experts)}
    rng = random.Random(slots * 100 + io_threads)
    steps = STRESS_STEPS
    fds, threads = open_fds(), set(threading.enumerate())
    store = StreamingExpertStore(ck, slots=slots, io_threads=io_threads)
    read = store.io.reader.read_record
    fail = {"rate": 0.0}

    def flaky(layout, buffer):
        if random.random() < fail["rate"]:
            raise ReadError("injected")
        return read(layout, buffer)

    store.io.reader.read_record = flaky

    def experts():
        return sorted(rng.sample(range(cfg.num_experts), rng.randint(1, cfg.experts_per_token)))

    raised: list[int] = []

    def loop():
        for step in range(steps):
            started = time.monotonic()
            op = rng.random()
            layer = rng.randrange(cfg.num_hidden_layers)
            if op < 0.5:
                want = experts()
                req = store.request(layer, want)
                mode = rng.choice(("all", "some", "none", "with"))
                try:
                    if mode == "with":
                        with req:
                            for e, w in req:
                                assert np.array_equal(w.mlp1_blocks, expected[layer, e])
                                if rng.random() < 0.3:
                                    break
                    elif mode != "none":
                        for i, (e, w) in enumerate(req):
                            assert np.array_equal(w.mlp1_blocks, expected[layer, e])
                            if rng.random() < 0.2:  # a guess while an expert is in use, for any layer
                                store.prefetch(rng.randrange(cfg.num_hidden_layers), experts())
                                store.check_invariants()
                            if mode == "some" and rng.random() < 0.5:
                                break
                except ReadError:
                    assert fail["rate"] > 0
                    raised.append(step)
            elif op < 0.85:
                store.prefetch(layer, experts())
            elif op < 0.95:
                fail["rate"] = rng.choice((0.0, 0.0, 0.2, 1.0))
            else:
                assert store.wait_idle(10)
            store.check_invariants()
            assert time.monotonic() - started < 10, f"step {step} took too long"

    in_thread(loop, timeout=max(60.0, steps * 0.05))
    stats = store.stats
    assert stats.requests == stats.hits + stats.misses and 0 <= stats.prefetch_used <= stats.prefetch_issued
    if steps >= 1000:  # the sequences did go through every kind of event
        assert raised and stats.evictions and stats.prefetch_used and stats.hits and stats.misses, (raised, stats)
    store.close()
    assert open_fds() == fds and set(threading.enumerate()) == threads


def test_cli_runs_give_back_every_fd_and_thread(tiny_original, capsys, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", os.environ.get("TIKTOKEN_CACHE_DIR", "/work/shared/tiktoken"))
    args = ["generate", "-m", str(tiny_original), "-p", "Hello", "--raw", "-n", "2", "-t", "0", "--chunk", "8"]
    assert cli.main(args + ["--mmap-only"]) == 0  # libraries and the tokenizer load once, outside the count
    fds, threads = open_fds(), set(threading.enumerate())
    assert cli.main(args + ["--ram-budget", "1G"]) == 0
    assert open_fds() == fds and set(threading.enumerate()) == threads
    assert cli.main(args + ["--ram-budget", "1M"]) == 1  # too small: the checkpoint opened first is closed
    assert open_fds() == fds and set(threading.enumerate()) == threads
    capsys.readouterr()


def test_cli_tells_bad_input_from_bugs(tiny_original, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", os.environ.get("TIKTOKEN_CACHE_DIR", "/work/shared/tiktoken"))
    args = ["generate", "-p", "Hello", "--raw", "-n", "2", "-t", "0", "--chunk", "8"]
    # bad input: one line, no traceback
    assert cli.main(args + ["-m", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("gptoss: error: ") and "nowhere" in err and "Traceback" not in err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{")
    assert cli.main(args + ["-m", str(tmp_path / "bad")]) == 1
    assert "Traceback" not in capsys.readouterr().err
    for bad in (["--context", "0"], ["--chunk", "0"], ["--temperature", "-1"], ["--top-p", "2"], ["-n", "-1"],
                ["--context", "999999999"]):
        assert cli.main(args + ["-m", str(tiny_original)] + bad) == 1, bad
        err = capsys.readouterr().err
        assert err.startswith("gptoss: error: ") and "Traceback" not in err, (bad, err)
    assert cli.main(["generate", "-m", str(tiny_original), "-p", "", "--raw"]) == 1
    assert "prompt is empty" in capsys.readouterr().err
    # a bug (here a ValueError from inside the model) keeps its traceback and says it is one
    def broken(*a, **k):
        raise ValueError("an internal inconsistency")

    monkeypatch.setattr(Model, "forward", broken)
    assert cli.main(args + ["-m", str(tiny_original), "--ram-budget", "1G"]) == 70
    err = capsys.readouterr().err
    assert "Traceback" in err and "an internal inconsistency" in err and "bug" in err
    # the same for the other commands: make-checkpoint
    from gptoss_stream.commands import make_checkpoint as command

    assert cli.main(["make-checkpoint", str(tmp_path / "ck"), "--hidden-size", "100", "--quiet"]) == 1
    assert "Traceback" not in capsys.readouterr().err
    monkeypatch.setattr(command, "make_checkpoint", broken)
    assert cli.main(["make-checkpoint", str(tmp_path / "ck"), "--quiet"]) == 70
    assert "Traceback" in capsys.readouterr().err


def test_a_guess_for_the_layer_being_consumed_is_taken_by_the_request(tiny_original):
    """An expert of the open request evicted so an earlier one could be read, then guessed for that same
    layer before the consumer reaches it: the consumer takes the guess instead of waiting for it for ever."""
    ck = Checkpoint.open(tiny_original)
    with StreamingExpertStore(ck, slots=2) as store:
        request_all(store, 0, [1, 2])  # both slots: 1 and 2 cached

        def consume():
            got = []
            with store.request(0, [0, 1, 2]) as routed:  # 0 misses: it takes 2's slot (2 comes later)
                for e, w in routed:
                    got.append(e)
                    if e == 1:
                        store.prefetch(0, [2])  # 0 is done: the guess takes its slot and reads 2
                        assert store.states()[0, 2] in ("guess-loading", "guess")
            return got

        assert in_thread(consume, timeout=20) == [0, 1, 2]
        store.check_invariants()


def test_the_state_table_in_the_docstring_is_the_one_enforced():
    from gptoss_stream.streaming import expert_cache

    doc = StreamingExpertStore.__doc__
    rows = doc[doc.index("may become"):].split("\n\n")[0].splitlines()[1:]
    table = {}
    for row in rows:
        state, _, rest = row.strip().partition(" ")
        table[getattr(expert_cache, state)] = {getattr(expert_cache, s.strip()) for s in rest.split("  ")[-1].split(",")
                                               if s.strip() != "-"}
    assert table == {k: set(v) for k, v in expert_cache.TRANSITIONS.items()}


def vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds `address` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def test_the_embedding_faults_without_readahead(tiny_original):
    """open_budgeted_store marks the embedding's pages MADV_RANDOM (VmFlags 'rr'); the experts' do not change."""
    from gptoss_stream.streaming.expert_cache import open_budgeted_store

    for random_embedding in (False, True):
        ck = Checkpoint.open(tiny_original)
        store, _ = open_budgeted_store(ck, 1 << 30, 256, 8, random_embedding=random_embedding)
        try:
            embedding = ck.address(ck.tensor_range("embedding.weight"))
            expert = ck.address(ck.expert_ranges(1, 0)[0])
            assert ("rr" in vm_flags(embedding)) == random_embedding
            assert "rr" not in vm_flags(expert)
        finally:
            store.close()
            ck.close()
