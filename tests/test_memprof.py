"""gptoss memprof: the report of a real (tiny) generation, its JSON schema, --compare, --plot, the root-only
options and the page-cache residency it measures."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "tiktoken"))

from gptoss_stream.commands import cli, memprof  # noqa: E402
from gptoss_stream.commands.memprof.residency import PAGE_SIZE, CheckpointResidency  # noqa: E402
from gptoss_stream.weights.checkpoint import Checkpoint  # noqa: E402
from gptoss_stream.weights.config import ModelConfig  # noqa: E402
from gptoss_stream.weights.synthetic import make_checkpoint  # noqa: E402

N_TOKENS = 5
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def profiled(tiny_original: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, Path]:
    """One real profile of the tiny model: (report read back from --json, the printed summary, json path)."""
    path = tmp_path_factory.mktemp("memprof") / "run.json"
    code, out, err = run_cli(["memprof", "-m", str(tiny_original), "-p", "Tell me about memory.", "-n",
                              str(N_TOKENS), "--interval", "0.01", "--seed", "1", "--json", str(path)])
    assert code == 0, err
    return json.loads(path.read_text()), out, path


# ---------------------------------------------------------------------------- the report


def test_report_has_every_phase_in_order(profiled):
    report, _, _ = profiled
    phases = report["phases"]
    assert [p["name"] for p in phases] == list(memprof.PHASES)
    assert phases[0]["start"] == 0.0
    for before, after in zip(phases, phases[1:]):
        assert before["end"] == after["start"]  # contiguous: one boundary sample closes one and opens the next
    assert all(p["end"] > p["start"] for p in phases)
    assert {s["phase"] for s in report["samples"]} == set(memprof.PHASES)


def test_samples_are_ordered_and_complete(profiled):
    report, _, _ = profiled
    samples = report["samples"]
    times = [s["t"] for s in samples]
    assert times == sorted(times) and len(set(times)) == len(times)
    assert samples[0]["kind"] == "start" and samples[-1]["kind"] == "end"
    assert any(s["kind"] == "tick" for s in samples)  # the background thread ran
    for s in samples:
        assert set(s) == set(memprof.SAMPLE_KEYS)
        assert s["rss"] > 0 and s["rss_anon"] > 0 and s["rss_file"] > 0
        assert s["rss_anon"] + s["rss_file"] <= s["rss"] + PAGE_SIZE * 4
        assert s["cgroup_usage"] is None  # no --limit
    for key in ("majflt", "minflt", "read_bytes", "read_chars", "cpu_user", "cpu_system"):
        values = [s[key] for s in samples]
        assert values == sorted(values), f"{key} is a cumulative counter"
    # The checkpoint must have been touched: its pages are mapped, and the RSS grew past the load phase.
    assert report["summary"]["phases"]["decode"]["peak"]["rss"] > samples[0]["rss"]


def test_token_counts(profiled):
    report, _, _ = profiled
    assert len(report["generated"]) == N_TOKENS
    tokens = report["tokens"]
    assert [t["index"] for t in tokens] == list(range(N_TOKENS))
    assert tokens[0]["phase"] == "prefill" and all(t["phase"] == "decode" for t in tokens[1:])
    assert all(t["seconds"] > 0 for t in tokens)
    phases = report["summary"]["phases"]
    # The first token comes from the prefill's logits; the decode phase is the N - 1 steps after it.
    assert phases["decode"]["tokens"] == N_TOKENS - 1
    assert phases["prefill"]["tokens"] == report["settings"]["prompt_tokens"] > 0
    assert phases["decode"]["tokens_per_second"] == pytest.approx(
        (N_TOKENS - 1) / phases["decode"]["seconds"])
    per_token = report["summary"]["decode_per_token"]
    assert per_token["minflt"] == pytest.approx(np.mean([t["minflt"] for t in tokens[1:]]))


def test_residency_and_engine_stats(profiled):
    report, _, _ = profiled
    model = report["model"]
    assert model["expert_bytes"] > 0 and model["dense_bytes"] > 0 and model["embedding_bytes"] > 0
    assert model["dense_bytes"] + model["embedding_bytes"] + model["expert_bytes"] >= model["file_bytes"]
    measured = [s for s in report["samples"] if s["dense_resident"] is not None]
    # Every boundary after the load takes the slow measures.
    assert {s["kind"] for s in measured} >= {"phase_end", "end"}
    for s in measured:
        assert 0 <= s["dense_resident"] <= model["dense_bytes"]
        assert 0 <= s["embedding_resident"] <= model["embedding_bytes"]
        assert 0 <= s["expert_resident"] <= model["expert_bytes"]
        assert 0 <= s["experts_resident"] <= model["experts"]
    for phase in report["summary"]["phases"].values():
        for key in ("dense_fraction", "embedding_fraction", "expert_fraction"):
            assert phase["peak"][key] is None or 0.0 <= phase["peak"][key] <= 1.0
    # The forward pass reads every dense weight it uses through the mapping: after a decode step, they are cached.
    assert report["summary"]["phases"]["decode"]["peak"]["dense_fraction"] > 0.5
    end = report["samples"][-1]
    assert end["kv_bytes"] > 0
    counters = end["experts"]["counters"]
    assert counters["requests"] > 0  # the store's own stats, duck-typed
    decode = report["summary"]["phases"]["decode"]["experts"]
    assert 0 < decode["requests"] < counters["requests"]


def test_summary_table_is_printed(profiled):
    _, out, _ = profiled
    header = next(line for line in out.splitlines() if "load" in line and "decode" in line)
    assert header.split() == list(memprof.PHASES)
    for label, _, _ in memprof.PHASE_ROWS:
        assert any(line.startswith(label) for line in out.splitlines()), label
    assert "per decode token (mean)" in out


# ---------------------------------------------------------------------------- JSON schema


def test_json_schema_is_stable(profiled):
    report, _, path = profiled
    assert report["schema"] == "gptoss-memprof" and report["version"] == 1
    assert tuple(report) == memprof.REPORT_KEYS
    assert set(report["host"]) == {"hostname", "kernel", "cpus", "mem_total", "page_size"}
    assert set(report["model"]) == {"path", "format", "file_bytes", "dense_bytes", "embedding_bytes",
                                    "expert_bytes", "experts",
                                    "num_hidden_layers", "num_experts", "scratch_bytes", "kv_reserved_bytes",
                                    "expert_store"}
    assert set(report["settings"]) == {"prompt_tokens", "max_tokens", "interval", "ram_budget", "mmap_only",
                                       "memory_plan", "limit", "cold", "threads", "chunk", "context", "raw",
                                       "temperature", "seed"}
    assert set(report["phases"][0]) == {"name", "start", "end", "tokens"}
    assert set(report["tokens"][0]) == {"index", "phase", "t", "seconds", "read_bytes", "read_chars", "majflt",
                                        "minflt"}
    summary = report["summary"]
    assert set(summary["phases"]) == set(memprof.PHASES)
    assert set(summary["phases"]["decode"]) == {"seconds", "tokens", "tokens_per_second", "peak", "delta", "experts"}
    assert set(summary["phases"]["decode"]["peak"]) == set(memprof.PEAK_KEYS) | {
        "dense_fraction", "embedding_fraction", "expert_fraction"}
    assert set(summary["phases"]["decode"]["delta"]) == set(memprof.COUNTER_KEYS)
    assert memprof.load_report(path) == report


def test_load_report_rejects_other_files(tmp_path, profiled):
    report, _, _ = profiled
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a memprof JSON report"):
        memprof.load_report(bad)
    bad.write_text(json.dumps({"schema": "something-else"}))
    with pytest.raises(ValueError, match="not a memprof report"):
        memprof.load_report(bad)
    bad.write_text(json.dumps({**report, "version": 99}))
    with pytest.raises(ValueError, match="version 99"):
        memprof.load_report(bad)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        memprof.load_report(tmp_path / "missing.json")


# ---------------------------------------------------------------------------- --compare and --plot


def test_compare_prints_both_runs(profiled, tmp_path):
    report, _, path = profiled
    slower = json.loads(json.dumps(report))
    slower["summary"]["phases"]["decode"]["seconds"] = 2 * report["summary"]["phases"]["decode"]["seconds"]
    other = tmp_path / "slower.json"
    other.write_text(json.dumps(slower))
    code, out, err = run_cli(["memprof", "--compare", str(path), str(other)])
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("run.json:") and lines[1].startswith("slower.json:")
    assert all(f"[{phase}]" in out for phase in memprof.PHASES)
    decode = lines.index("[decode]")
    seconds = next(line for line in lines[decode:] if line.strip().startswith("seconds")).split()
    assert seconds[-1] == "2.00x"
    peak_rss = next(line for line in lines[decode:] if line.strip().startswith("peak RSS"))
    assert peak_rss.endswith("1.00x")

    code, _, err = run_cli(["memprof", "--compare", str(path), str(tmp_path / "nope.json")])
    assert code == 1 and "nope.json" in err


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed (pip install 'gptoss-stream[plot]')")
def test_plot_writes_a_png(profiled, tmp_path):
    report, _, _ = profiled
    out = tmp_path / "timeline.png"
    memprof.plot_report(report, out)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 500 and height > 300


def test_plot_without_matplotlib_fails_before_the_run(tiny_original, monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    code, _, err = run_cli(["memprof", "-m", str(tiny_original), "-p", "x", "--plot", str(tmp_path / "x.png")])
    assert code == 1 and "pip install" in err and "matplotlib" in err
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------------------- options that need root


@pytest.mark.parametrize("option", [["--limit", "4G"], ["--cold"]])
def test_root_only_options_explain_themselves(tiny_original, monkeypatch, option):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    code, out, err = run_cli(["memprof", "-m", str(tiny_original), "-p", "x", *option])
    assert code == 1 and out == ""
    assert f"{option[0]} needs root" in err


def test_bad_arguments(tiny_original):
    code, _, err = run_cli(["memprof", "-p", "x"])
    assert code == 1 and "-m MODEL_DIR" in err
    code, _, err = run_cli(["memprof", "-m", str(tiny_original), "-p", "x", "-n", "1"])
    assert code == 1 and "-n >= 2" in err
    code, _, err = run_cli(["memprof", "-m", str(tiny_original), "-p", "x", "--limit", "lots"])
    assert code == 1 and "invalid size 'lots'" in err


def _cgroup_v1_available() -> bool:
    try:
        memprof._memory_cgroup_mount()
    except RuntimeError:
        return False
    return os.geteuid() == 0


@pytest.mark.skipif(not _cgroup_v1_available(), reason="needs root and the cgroup v1 memory controller")
def test_limit_runs_the_workload_in_a_memory_cgroup(tiny_original, tmp_path):
    path = tmp_path / "limited.json"
    code, _, err = run_cli(["memprof", "-m", str(tiny_original), "-p", "x", "-n", "2", "--limit", "2G",
                            "--json", str(path)])
    assert code == 0, err
    report = memprof.load_report(path)
    assert report["settings"]["limit"] == 2 * 2 ** 30
    usage = [s["cgroup_usage"] for s in report["samples"]]
    assert all(u is not None and 0 < u <= 2 * 2 ** 30 for u in usage)
    assert report["summary"]["phases"]["decode"]["peak"]["cgroup_max_usage"] > 0
    own = memprof._memory_cgroup_mount() / memprof._own_memory_cgroup().lstrip("/")
    assert not (own / f"{memprof.CGROUP_NAME_PREFIX}{os.getpid()}").exists()  # removed afterwards


# ---------------------------------------------------------------------------- the sampler


class _SlowResidency:
    """Stands in for CheckpointResidency: each measurement costs `cost` seconds."""

    def __init__(self, cost: float):
        self.cost = cost
        self.calls = 0

    def measure(self):
        self.calls += 1
        time.sleep(self.cost)
        from gptoss_stream.commands.memprof.residency import Residency
        return Residency(0, 1, 0, 1, 0, 1, 0, 1)


def test_slow_measures_keep_to_their_share_of_time():
    profiler = memprof.Profiler(interval=0.005, slow_share=0.1)
    slow = _SlowResidency(cost=0.02)
    profiler.attach(slow, lambda: {})
    profiler.start()
    time.sleep(0.6)
    profiler.stop()
    ticks = [s for s in profiler.samples if s["kind"] == "tick"]
    assert len(ticks) >= 20
    # start + end are forced; in between one every >= 0.02 / 0.1 = 0.2 s: at most 3 more in 0.6 s.
    assert 2 <= slow.calls <= 2 + 4
    assert sum(s["dense_resident"] is not None for s in profiler.samples) == slow.calls


# ---------------------------------------------------------------------------- residency


def test_mincore_sees_exactly_the_touched_pages():
    import mmap

    from gptoss_stream.engine import _lib, kernels

    region = mmap.mmap(-1, 16 * PAGE_SIZE)  # anonymous: a page is resident once written, not before
    view = np.frombuffer(region, dtype=np.uint8)
    for page in (0, 5, 15):
        view[page * PAGE_SIZE + 7] = 1
    expected = np.zeros(16, dtype=np.uint8)
    expected[[0, 5, 15]] = 1
    assert np.array_equal(kernels.mincore(view.ctypes.data, view.size), expected)
    # An unaligned range reports the pages it touches: bytes 4090..4105 lie in pages 0 and 1.
    assert np.array_equal(kernels.mincore(view.ctypes.data + PAGE_SIZE - 6, 16), [1, 0])
    with pytest.raises(_lib.KernelError, match="gptoss_mincore"):
        kernels.mincore(0, PAGE_SIZE)
    del view
    region.close()



@pytest.fixture()
def paged_checkpoint(tmp_path: Path) -> Path:
    """A small model whose expert pieces span whole pages, so one expert can be cached alone."""
    cfg = ModelConfig.preset("tiny").with_overrides(
        num_hidden_layers=1, vocab_size=512, hidden_size=256, intermediate_size=256, num_experts=4,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
    )
    make_checkpoint(tmp_path, cfg, format="original", seed=2, progress=False)
    return tmp_path


def _evict(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_residency_counts_the_pages_read(paged_checkpoint):
    with Checkpoint.open(paged_checkpoint) as checkpoint:
        residency = CheckpointResidency(checkpoint)
        for path in checkpoint.files():
            _evict(path)  # after open(), which read the header through the page cache
        file_pages = -(-checkpoint.nbytes() // PAGE_SIZE)
        assert residency.dense_total + residency.embedding_total + residency.expert_total == file_pages * PAGE_SIZE
        embedding = checkpoint.tensor_range("embedding.weight")
        assert embedding.nbytes <= residency.embedding_total <= embedding.nbytes + 2 * PAGE_SIZE
        assert residency.experts_total == 4
        before = residency.measure()
        if before.dense_resident or before.embedding_resident or before.expert_resident:
            pytest.skip("this filesystem keeps evicted pages cached (tmpfs?): cannot test residency here")

        # Read exactly expert 1's pieces, with readahead off so no neighbouring page comes along.
        ranges = checkpoint.expert_ranges(0, 1)
        fd = os.open(ranges[0].path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            for r in ranges:
                assert len(os.pread(fd, r.nbytes, r.offset)) == r.nbytes
        finally:
            os.close(fd)
        pages = set()
        for r in ranges:
            pages.update(range(r.offset // PAGE_SIZE, -(-(r.offset + r.nbytes) // PAGE_SIZE)))

        after = residency.measure()
        assert after.expert_resident == len(pages) * PAGE_SIZE
        assert after.dense_resident == 0 and after.embedding_resident == 0
        assert after.experts_resident == 1  # its neighbours share edge pages but not their whole data
        assert 0.0 < after.expert_fraction < 1.0 and after.dense_fraction == 0.0

        # Reading the whole file caches everything.
        with open(ranges[0].path, "rb") as f:
            while f.read(1 << 20):
                pass
        full = residency.measure()
        assert full.dense_fraction == full.embedding_fraction == full.expert_fraction == 1.0
        assert full.experts_resident == 4
