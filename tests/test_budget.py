"""--ram-budget: size parsing, the memory plan (and its minimum), cgroup limit detection, CLI errors."""

from __future__ import annotations

import pytest

from gptoss_stream.commands import cli
from gptoss_stream.engine.kvcache import KVCache
from gptoss_stream.system import cgroup_memory_limit
from gptoss_stream.streaming.budget import (GIB, MIB, BudgetError, dense_nbytes, dense_ranges, longest_context,
                                            format_size, kv_cache_nbytes, parse_size, plan_memory,
                                            planned_slot_bytes)
from gptoss_stream.streaming.expert_cache import expert_slot_bytes, record_bound
from gptoss_stream.weights.checkpoint import Checkpoint
from gptoss_stream.weights.config import ModelConfig
from gptoss_stream.weights.layouts.base import TensorRange

SLOT_20B = 13_242_368  # one gpt-oss-20b expert's MXFP4 blocks + scales, page-aligned (biases stay mapped)


@pytest.mark.parametrize("text, expected", [
    ("4G", 4 * GIB), ("3.5G", int(3.5 * GIB)), ("800M", 800 * MIB), ("512MiB", 512 * MIB), ("2g", 2 * GIB),
    ("4GB", 4 * 10**9), ("1.5 GiB", int(1.5 * GIB)), ("1000", 1000), ("64K", 64 * 1024), (" 1T ", 2**40),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "G", "abc", "4X", "-1G", "0", "0G", "4 G B", "1e9"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_format_size():
    assert format_size(3 * GIB) == "3.00 GiB"
    assert format_size(800 * MIB) == "800.00 MiB"
    assert format_size(12) == "12 B"


def test_record_bound_covers_any_alignment():
    # 10 bytes can straddle a page boundary: 2 pages; a page-sized piece at an odd offset: 2 pages
    assert record_bound([TensorRange("f", 4090, 10)]) == 2 * 4096
    assert record_bound([TensorRange("f", 1, 4096), TensorRange("f", 9000, 1)]) == 2 * 4096 + 2 * 4096


def test_parts_of_the_20b_plan():
    cfg = ModelConfig.preset("20b")
    # attention 1.27 GB + unembedding 1.16 GB (SPEC §6) + routers/norms + the experts' bf16 biases (13 MB),
    # + 4096 embedding rows of up to 3 pages
    dense = dense_nbytes(cfg, 4096)
    biases = 24 * 32 * (5760 + 2880) * 2
    assert 2.43e9 + biases < dense < 2.43e9 + biases + 4096 * 3 * 4096 + 10e6
    assert dense_nbytes(cfg, 1) < dense  # the embedding part follows the context
    # 12 full layers x 4096 positions + 12 rings of 128 + 63 rows, 8 kv heads x 64 x (k, v) x bf16
    assert kv_cache_nbytes(cfg, 4096, 64) == (12 * 4096 + 12 * 191) * 2048

    plan = plan_memory(cfg, SLOT_20B, 4 * GIB, 4096, 64)
    assert plan.fixed + plan.expert_cache <= plan.budget < plan.fixed + plan.expert_cache + SLOT_20B
    assert plan.expert_slots == (4 * GIB - plan.fixed) // SLOT_20B
    assert plan.min_expert_slots == 8  # two layers of 4 routed experts
    assert "expert cache" in plan.describe() and f"{plan.expert_slots} of 768" in plan.describe()
    # 3G (the smallest target of the benchmark) still runs, with a small cache
    assert plan_memory(cfg, SLOT_20B, 3 * GIB, 4096, 64).expert_slots >= plan.min_expert_slots
    # a budget beyond the whole model caps the cache at every expert
    assert plan_memory(cfg, SLOT_20B, 64 * GIB, 4096, 64).expert_slots == 768


def test_planned_slot_matches_the_checkpoint(tiny_original):
    # the config-only slot (for plans of models not on disk) is the checkpoint's own bound
    with Checkpoint.open(tiny_original) as ck:
        assert planned_slot_bytes(ck.config) == expert_slot_bytes(ck)
    assert planned_slot_bytes(ModelConfig.preset("20b")) == SLOT_20B
    assert planned_slot_bytes(ModelConfig.preset("120b")) == SLOT_20B  # same expert shapes, 4x as many


def test_the_120b_plan_at_8g():
    cfg = ModelConfig.preset("120b")
    slot = planned_slot_bytes(cfg)
    plan = plan_memory(cfg, slot, 8 * GIB, 4096, 64)
    # dense bf16: 36 layers of attention + routers + biases (~1.9 GB) + unembedding 1.16 GB (+ 4096 rows)
    assert 3.1e9 < plan.dense < 3.4e9
    assert plan.kv_cache == kv_cache_nbytes(cfg, 4096, 64) == (18 * 4096 + 18 * 191) * 2048
    # the rest is the expert cache, in whole records: ~4.5 GiB = 369 of 4608 experts, ~10 of 128 per layer
    assert plan.budget - slot < plan.fixed + plan.expert_cache <= plan.budget
    assert 360 <= plan.expert_slots <= 380 and plan.total_experts == 36 * 128
    assert "of 4608 experts" in plan.describe() and "of 128 per layer" in plan.describe()
    assert f"minimum {format_size(plan.minimum)}" in plan.describe()
    # runtime + KV + everything outside the cache that is anonymous memory stays under the 600 MB target
    assert plan.anonymous - plan.expert_cache < 600e6
    # 16G: ~28 per layer; the whole model would need ~60 GiB of cache
    assert 1000 <= plan_memory(cfg, slot, 16 * GIB, 4096, 64).expert_slots <= 1030
    assert plan.everything > 60 * GIB


def test_a_budget_too_small_for_120b_names_the_minimum():
    cfg = ModelConfig.preset("120b")
    slot = planned_slot_bytes(cfg)
    minimum = plan_memory(cfg, slot, 8 * GIB, 4096, 64).minimum
    assert 3.4 * GIB < minimum < 3.7 * GIB  # the 20b's 4G budget is not far from 120b's floor
    assert plan_memory(cfg, slot, minimum, 4096, 64).expert_slots == 8
    with pytest.raises(BudgetError) as e:
        plan_memory(cfg, slot, 3 * GIB, 4096, 64)
    assert "RAM budget 3.00 GiB is too small" in str(e.value) and f"at least {format_size(minimum)}" in str(e.value)


def test_budget_below_minimum_names_the_minimum():
    cfg = ModelConfig.preset("20b")
    minimum = plan_memory(cfg, SLOT_20B, 4 * GIB, 4096, 64).minimum
    assert plan_memory(cfg, SLOT_20B, minimum, 4096, 64).expert_slots == 8
    with pytest.raises(BudgetError, match=f"at least {format_size(minimum)}".replace(".", r"\.")):
        plan_memory(cfg, SLOT_20B, minimum - 1, 4096, 64)
    with pytest.raises(BudgetError, match="too small"):
        plan_memory(cfg, SLOT_20B, 1 * GIB, 4096, 64)
    # a shorter context needs less (KV cache)
    assert plan_memory(cfg, SLOT_20B, 4 * GIB, 1024, 64).minimum < minimum


def test_a_long_context_counts_its_kv_cache_and_the_refusal_names_a_context_that_fits():
    cfg = ModelConfig.preset("20b")
    short, full = plan_memory(cfg, SLOT_20B, 8 * GIB, 4096, 64), plan_memory(cfg, SLOT_20B, 8 * GIB, 131072, 64)
    # the 12 full-attention layers keep every position: 131072 x 2 x 8 kv heads x 64 x bf16 x 12 = 3 GiB
    assert full.kv_cache - short.kv_cache == 12 * (131072 - 4096) * 2 * 8 * 64 * 2
    assert full.expert_slots < short.expert_slots
    with pytest.raises(BudgetError) as e:
        plan_memory(cfg, SLOT_20B, 4 * GIB, 131072, 64)
    longest = longest_context(cfg, SLOT_20B, 4 * GIB, 64)
    assert f"--context {longest} is the longest that fits" in str(e.value)
    # the hint is exact: that context plans, one more token does not
    assert plan_memory(cfg, SLOT_20B, 4 * GIB, longest, 64).expert_slots == 8
    with pytest.raises(BudgetError):
        plan_memory(cfg, SLOT_20B, 4 * GIB, longest + 1, 64)
    assert 4096 < longest < 131072
    # a budget no context fits says so
    with pytest.raises(BudgetError, match="no --context fits"):
        plan_memory(cfg, SLOT_20B, 1 * GIB, 4096, 64)
    assert longest_context(cfg, SLOT_20B, 16 * GIB, 64) == cfg.max_context


def test_dense_ranges_cover_the_dense_weights_once(tiny_original):
    ck = Checkpoint.open(tiny_original)
    ranges = dense_ranges(ck)
    covered = sum(r.nbytes for r in ranges)
    embedding = ck.tensor_range("embedding.weight")
    # everything dense_nbytes counts except the embedding rows, plus at most the small gaps merged over
    assert covered >= dense_nbytes(ck.config, 0) - 4096
    for r in ranges:
        assert r.offset + r.nbytes <= embedding.offset or r.offset >= embedding.offset + embedding.nbytes
    def covered_by(x):
        return any(r.offset <= x.offset and x.offset + x.nbytes <= r.offset + r.nbytes for r in ranges)

    for layer in range(ck.config.num_hidden_layers):
        blocks1, scales1, bias1, blocks2, scales2, bias2 = ck.expert_ranges(layer, 3)
        assert not any(covered_by(x) for x in (blocks1, scales1, blocks2, scales2))  # streamed MXFP4
        assert covered_by(bias1) and covered_by(bias2)  # the biases are used from the mapping
    assert all(a.offset + a.nbytes < b.offset for a, b in zip(ranges, ranges[1:]))


def test_kv_plan_matches_the_cache(tiny_original):
    cfg = Checkpoint.open(tiny_original).config
    for context, chunk in ((4096, 64), (100, 16), (300, 1)):
        assert kv_cache_nbytes(cfg, context, chunk) == KVCache(cfg, context, chunk).nbytes


def test_cgroup_limits(tmp_path):
    (tmp_path / "memory" / "bench").mkdir(parents=True)
    (tmp_path / "memory" / "bench" / "memory.limit_in_bytes").write_text("4294967296\n")
    proc = tmp_path / "cgroup"
    proc.write_text("12:pids:/\n5:memory:/bench\n0::/\n")
    assert cgroup_memory_limit(str(proc), str(tmp_path)) == 4 * GIB
    # v1 without a limit reports a huge number; v2 "max" means none
    (tmp_path / "memory" / "bench" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (tmp_path / "unified").mkdir()
    (tmp_path / "unified" / "memory.max").write_text("max\n")
    assert cgroup_memory_limit(str(proc), str(tmp_path)) is None
    (tmp_path / "unified" / "memory.max").write_text("3221225472\n")
    assert cgroup_memory_limit(str(proc), str(tmp_path)) == 3 * GIB
    assert cgroup_memory_limit(str(tmp_path / "missing"), str(tmp_path)) is None


def test_cpu_count_honours_affinity_and_the_cgroup_quota(tmp_path, monkeypatch):
    from gptoss_stream import system

    proc = tmp_path / "cgroup"
    proc.write_text("4:cpu,cpuacct:/bench\n0::/\n")
    assert system.cgroup_cpu_limit(str(proc), str(tmp_path)) is None
    v1 = tmp_path / "cpu,cpuacct" / "bench"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")  # v1: no quota
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert system.cgroup_cpu_limit(str(proc), str(tmp_path)) is None
    (v1 / "cpu.cfs_quota_us").write_text("250000\n")
    assert system.cgroup_cpu_limit(str(proc), str(tmp_path)) == 2.5
    (tmp_path / "cpu.max").write_text("max 100000\n")  # v2 at the root: no limit there
    assert system.cgroup_cpu_limit(str(proc), str(tmp_path)) == 2.5
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert system.cgroup_cpu_limit(str(proc), str(tmp_path)) == 1.5
    monkeypatch.setattr(system.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    monkeypatch.setattr(system, "cgroup_cpu_limit", lambda: 2.5)
    assert system.available_cpus() == 2
    monkeypatch.setattr(system, "cgroup_cpu_limit", lambda: 0.5)
    assert system.available_cpus() == 1
    monkeypatch.setattr(system, "cgroup_cpu_limit", lambda: None)
    assert system.available_cpus() == 6


def test_threads_0_asks_for_the_cpus_available(tiny_original, monkeypatch):
    from gptoss_stream import system
    from gptoss_stream.engine import kernels
    from gptoss_stream.engine.model import Model

    asked = []
    monkeypatch.setattr(system, "available_cpus", lambda: 1)
    monkeypatch.setattr(kernels, "set_num_threads", asked.append)
    with Checkpoint.open(tiny_original) as ck:
        Model(ck, num_threads=0)
        Model(ck, num_threads=3)
    assert asked == [1, 3]


def test_cli_budget_too_small(tiny_original, capsys):
    rc = cli.main(["generate", "-m", str(tiny_original), "-p", "hi", "--raw", "-n", "1", "--ram-budget", "1M"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "RAM budget 1.00 MiB is too small" in err and "at least" in err


def test_cli_rejects_bad_sizes_and_conflicting_modes(tiny_original, capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "-m", str(tiny_original), "-p", "hi", "--ram-budget", "lots"])
    assert "invalid size 'lots'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["generate", "-m", str(tiny_original), "-p", "hi", "--ram-budget", "1G", "--mmap-only"])
    assert "not allowed with" in capsys.readouterr().err
