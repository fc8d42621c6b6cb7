import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from gptoss_stream.commands.cli import main
from gptoss_stream.progress import ProgressBar, format_bytes, format_duration
from gptoss_stream.weights import synthetic
from gptoss_stream.weights.checkpoint import Checkpoint
from gptoss_stream.weights.config import ORIGINAL_KEYS, ModelConfig
from gptoss_stream.weights.layouts.base import original_tensors
from gptoss_stream.weights.layouts.published import hf_tensors
from gptoss_stream.weights.synthetic import (
    GEN_UNIT_BYTES, bf16_to_f32, generate_tensor, iter_tensor, make_checkpoint, plan_hf_shards,
    tensor_rows,
)

FP4 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32)


def dequant(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Plain MXFP4 -> float32 (SPEC §3): low nibble first, value * 2^(scale - 127)."""
    vals = np.stack([FP4[blocks & 0x0F], FP4[blocks >> 4]], axis=-1).reshape(*blocks.shape[:-1], 32)
    vals = vals * np.exp2(scales.astype(np.float32) - 127)[..., None]
    return vals.reshape(*scales.shape[:-1], scales.shape[-1] * 32)


def digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


# ---------------------------------------------------------------------------- determinism

def test_same_seed_same_bytes_other_seed_differs(micro_config, micro_checkpoint, tmp_path):
    make_checkpoint(tmp_path / "a", micro_config, "both", seed=1, max_shard_bytes=20_000, progress=False)
    for fmt in ("original", "hf"):
        assert digest(tmp_path / "a" / fmt) == digest(micro_checkpoint / fmt)
    make_checkpoint(tmp_path / "b", micro_config, "original", seed=2, progress=False)
    a = Checkpoint.open(tmp_path / "a")
    b = Checkpoint.open(tmp_path / "b")
    assert not np.array_equal(a.embedding(), b.embedding())
    assert not np.array_equal(a.expert(0, 0).mlp1_blocks, b.expert(0, 0).mlp1_blocks)


def test_tensor_bytes_do_not_depend_on_format_order_or_chunking(micro_config, micro_checkpoint, monkeypatch):
    with Checkpoint.open(micro_checkpoint / "original") as ck:
        for name in original_tensors(micro_config):
            assert np.array_equal(generate_tensor(micro_config, 1, name), ck.tensor(name)), name
    # rows [r0, r1) through small generation units: same as slicing the whole tensor
    name = "embedding.weight"
    full = generate_tensor(micro_config, 1, name)
    monkeypatch.setattr(synthetic, "GEN_UNIT_BYTES", 64 * 7)  # 7 rows of 32 bf16 per unit
    assert synthetic.rows_per_unit("BF16", full.shape) == 7
    # units are part of the stream identity, so a different unit size gives different (valid) data...
    assert not np.array_equal(generate_tensor(micro_config, 1, name), full)
    # ...but any row range is consistent with its own whole tensor
    small = generate_tensor(micro_config, 1, name)
    for r0, r1 in ((0, 1), (3, 19), (6, 7), (500, 512)):
        assert np.array_equal(np.concatenate(list(tensor_rows(micro_config, 1, name, r0, r1))), small[r0:r1])


def test_generation_is_chunked_with_bounded_memory():
    cfg = ModelConfig.preset("20b")
    for name in ("embedding.weight", "block.3.mlp.mlp1_weight.blocks", "block.3.mlp.mlp2_weight.blocks"):
        it = iter_tensor(cfg, 0, name)
        first, second = next(it), next(it)  # 1.16 GB, 265 MB and 133 MB tensors: several units each
        assert first.nbytes <= GEN_UNIT_BYTES and second.nbytes <= GEN_UNIT_BYTES


# ---------------------------------------------------------------------------- file formats

def test_files_open_with_the_safetensors_package(tiny_original, tiny_hf):
    torch = pytest.importorskip("torch")
    from safetensors import safe_open

    with Checkpoint.open(tiny_original) as ck:
        with safe_open(str(tiny_original / "model.safetensors"), framework="pt") as f:
            assert set(f.keys()) == set(original_tensors(ck.config))
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():
                t = f.get_tensor(name)
                raw = t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()
                assert np.array_equal(raw, ck.tensor(name)), name
        index = json.loads((tiny_hf / "model.safetensors.index.json").read_text())
        seen = {}
        for shard in sorted(set(index["weight_map"].values())):
            with safe_open(str(tiny_hf / shard), framework="pt") as f:
                for name in f.keys():
                    seen[name] = shard
                    assert f.get_slice(name).get_shape() == list(
                        next(t.shape for t in hf_tensors(ck.config) if t.name == name))
        assert seen == index["weight_map"]
        with safe_open(str(tiny_hf / index["weight_map"]["model.layers.2.self_attn.k_proj.weight"]), "pt") as f:
            k = f.get_tensor("model.layers.2.self_attn.k_proj.weight").view(torch.int16).numpy().view(np.uint16)
        assert np.array_equal(k, ck.layer(2).k_weight)


def test_original_config_has_exactly_the_official_keys(tiny_original):
    d = json.loads((tiny_original / "config.json").read_text())
    assert list(d) == list(ORIGINAL_KEYS)
    assert ModelConfig.from_original_json(d) == ModelConfig.preset("tiny")


def test_hf_config_and_index(tiny_hf):
    d = json.loads((tiny_hf / "config.json").read_text())
    cfg = ModelConfig.preset("tiny")
    assert d["model_type"] == "gpt_oss" and d["architectures"] == ["GptOssForCausalLM"]
    assert d["num_local_experts"] == cfg.num_experts and d["num_experts_per_tok"] == 4
    assert d["rope_scaling"] == {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                 "original_max_position_embeddings": 4096, "truncate": False}
    assert d["layer_types"] == list(cfg.layer_types) and d["tie_word_embeddings"] is False
    assert d["quantization_config"]["quant_method"] == "mxfp4"
    assert (d["eos_token_id"], d["pad_token_id"], d["torch_dtype"]) == (200002, 199999, "bfloat16")
    index = json.loads((tiny_hf / "model.safetensors.index.json").read_text())
    files = sorted(tiny_hf.glob("model-*.safetensors"))
    assert [p.name for p in files] == ["model-00000-of-00001.safetensors", "model-00001-of-00001.safetensors"]
    assert index["metadata"]["total_size"] == sum(
        int(np.prod(t.shape)) * (2 if t.dtype == "BF16" else 1) for t in hf_tensors(cfg))
    assert set(index["weight_map"]) == {t.name for t in hf_tensors(cfg)}


def test_multi_shard_sizes_and_names(micro_config, micro_checkpoint):
    hf = micro_checkpoint / "hf"
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    n = len(shards)
    assert n >= 4 and shards == [f"model-{i:05d}-of-{n - 1:05d}.safetensors" for i in range(n)]
    sizes = {s: 0 for s in shards}
    biggest = 0
    for t in hf_tensors(micro_config):
        nbytes = int(np.prod(t.shape)) * (2 if t.dtype == "BF16" else 1)
        sizes[index["weight_map"][t.name]] += nbytes
        biggest = max(biggest, nbytes)
    assert all(0 < s <= max(20_000, biggest) for s in sizes.values())
    plan = plan_hf_shards(micro_config, 20_000)
    assert [len(p) for p in plan] == [sum(1 for v in index["weight_map"].values() if v == s) for s in shards]
    with Checkpoint.open(hf) as a, Checkpoint.open(micro_checkpoint / "original") as b:
        assert len(a.files()) == n
        assert np.array_equal(a.layer(1).v_weight, b.layer(1).v_weight)


# ---------------------------------------------------------------------------- statistics

def test_weight_statistics_tiny(tiny_original):
    with Checkpoint.open(tiny_original) as ck:
        cfg = ck.config
        for n in range(cfg.num_hidden_layers):
            lw = ck.layer(n)
            sinks = bf16_to_f32(lw.sinks)
            assert (sinks < 0).any() and (sinks > 0).any()
            for norm in (lw.attn_norm, lw.mlp_norm):
                x = bf16_to_f32(norm)
                assert 0.8 < x.min() and x.max() < 1.2 and abs(x.mean() - 1) < 0.05
            q = bf16_to_f32(lw.q_weight)
            assert abs(q.std() * np.sqrt(cfg.hidden_size) - 1) < 0.1
        w1 = dequant(ck.tensor("block.0.mlp.mlp1_weight.blocks"), ck.tensor("block.0.mlp.mlp1_weight.scales"))
        assert 0.5 < w1.std() * np.sqrt(cfg.hidden_size) < 1.5
        assert np.isfinite(bf16_to_f32(ck.embedding())).all()


def test_weight_statistics_20b_shapes():
    cfg = ModelConfig.preset("20b")
    # one generation unit of mlp1 (2 experts) and of mlp2: std ~ 1/sqrt(fan_in), scales around 2^-7
    blocks = next(iter_tensor(cfg, 0, "block.0.mlp.mlp1_weight.blocks"))
    scales = next(iter_tensor(cfg, 0, "block.0.mlp.mlp1_weight.scales"))[: len(blocks)]
    w = dequant(blocks[:, :256], scales[:, :256])  # 2 x 256 rows x 2880 values
    assert 0.7 < w.std() * np.sqrt(cfg.hidden_size) < 1.4
    assert np.bincount(scales.ravel()).argmax() == 120  # 2^-7
    codes = np.concatenate([blocks.ravel() & 15, blocks.ravel() >> 4])
    freq = np.bincount(codes & 7, minlength=8) / codes.size  # by magnitude 0, .5, 1, 1.5, 2, 3, 4, 6
    # a rounded N(0, 2.5^2): half the codes below 1.75, +-6 rare (~5%) but present, signs balanced
    assert 0.45 < freq[:4].sum() < 0.58 and 0.03 < freq[7] < 0.07
    assert abs(np.mean(codes >= 8) - 0.5) < 0.01


def test_router_top4_is_clear_and_varied():
    cfg = ModelConfig.preset("20b")
    w = bf16_to_f32(generate_tensor(cfg, 0, "block.5.mlp.gate.weight"))
    b = bf16_to_f32(generate_tensor(cfg, 0, "block.5.mlp.gate.bias"))
    x = np.random.default_rng(0).standard_normal((512, cfg.hidden_size)).astype(np.float32)  # rms-normalised input
    logits = bf16_to_f32(synthetic.to_bf16(x @ w.T + b))
    top = np.sort(logits, axis=1)[:, ::-1]
    ties = np.mean(top[:, 3] == top[:, 4])
    assert ties < 0.05, f"{ties:.1%} of tokens have a bf16 tie between 4th and 5th expert"
    assert top[:, 0].std() > 1  # logits are spread
    chosen = np.argsort(-logits, axis=1)[:, :4]
    counts = np.bincount(chosen.ravel(), minlength=cfg.num_experts)
    assert (counts > 0).all() and counts.max() < 0.5 * len(x)  # every expert used, none dominates
    assert len({tuple(sorted(r)) for r in chosen}) > 400


def test_one_moe_expert_keeps_activations_finite(tiny_original):
    with Checkpoint.open(tiny_original) as ck:
        cfg = ck.config
        ew = ck.expert(3, 5)
        w1, w2 = dequant(ew.mlp1_blocks, ew.mlp1_scales), dequant(ew.mlp2_blocks, ew.mlp2_scales)
        t = np.random.default_rng(1).standard_normal((16, cfg.hidden_size)).astype(np.float32)
        h = t @ w1.T + bf16_to_f32(ew.mlp1_bias)
        glu, lin = np.minimum(h[:, 0::2], cfg.swiglu_limit), np.clip(h[:, 1::2], -cfg.swiglu_limit, cfg.swiglu_limit)
        a = glu / (1 + np.exp(-1.702 * glu)) * (lin + 1)
        y = a @ w2.T + bf16_to_f32(ew.mlp2_bias)
        rms = np.sqrt(np.mean(y ** 2))
        assert np.isfinite(y).all() and 0.05 < rms < 5


# ---------------------------------------------------------------------------- writer safety

def test_refuses_to_overwrite_without_force(micro_config, tmp_path):
    make_checkpoint(tmp_path, micro_config, "original", progress=False)
    with pytest.raises(ValueError, match="--force"):
        make_checkpoint(tmp_path, micro_config, "original", progress=False)
    (tmp_path / "stale.safetensors").write_bytes(b"junk")
    make_checkpoint(tmp_path, micro_config, "original", seed=5, progress=False, force=True)
    assert not (tmp_path / "stale.safetensors").exists()
    Checkpoint.open(tmp_path).close()


def test_checks_free_disk_space(micro_config, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100, 90, 10))
    with pytest.raises(ValueError, match="free"):
        make_checkpoint(tmp_path / "x", micro_config, "both", progress=False)
    assert not (tmp_path / "x").exists()


def fake_free_space(monkeypatch, free: int) -> None:
    """The file system of the output reports `free` bytes available (nothing else changes)."""
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(free * 4, free * 3, free))


def test_120b_without_the_space_is_refused_before_writing(tmp_path, monkeypatch, capsys):
    # The full 120b needs ~65 GB; with 50 GB free the CLI names both numbers and writes nothing.
    full = synthetic.original_nbytes(ModelConfig.preset("120b"))
    assert 64e9 < full < 66e9
    fake_free_space(monkeypatch, 50 * 10**9)
    out = tmp_path / "120b"
    assert main(["make-checkpoint", str(out), "--preset", "120b", "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"needs {format_bytes(full + synthetic.DISK_MARGIN_BYTES)}" in err
    assert f"{format_bytes(50 * 10**9)} available" in err and "36 layers x 128 experts" in err
    assert not out.exists()


def test_120b_subset_keeps_every_other_shape(tmp_path, monkeypatch, capsys):
    # --layers 12 on the 120b preset: the same layers, 12 of them (23.3 GB, a third of the full model); the
    # refused write reports the subset's own size, so nothing of 22 GB is written by the test.
    full, subset = ModelConfig.preset("120b"), ModelConfig.preset("120b").with_overrides(num_hidden_layers=12)
    for field in ("hidden_size", "intermediate_size", "num_experts", "experts_per_token", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "vocab_size", "sliding_window"):
        assert getattr(subset, field) == getattr(full, field), field
    assert subset.layer_types == full.layer_types[:12]
    need = synthetic.original_nbytes(subset)
    assert 23e9 < need < 24e9
    fake_free_space(monkeypatch, 10**9)
    assert main(["make-checkpoint", str(tmp_path / "s"), "--preset", "120b", "--layers", "12", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "12 layers x 128 experts" in err and f"needs {format_bytes(need + synthetic.DISK_MARGIN_BYTES)}" in err


def test_force_counts_the_files_it_replaces(micro_config, tmp_path, monkeypatch):
    make_checkpoint(tmp_path, micro_config, "original", progress=False)
    size = (tmp_path / "model.safetensors").stat().st_size
    fake_free_space(monkeypatch, synthetic.DISK_MARGIN_BYTES)  # only room once the old file is gone
    with pytest.raises(ValueError, match="already holds"):  # not forced: that error, not the space
        make_checkpoint(tmp_path, micro_config, "original", progress=False)
    make_checkpoint(tmp_path, micro_config, "original", seed=3, progress=False, force=True)
    assert (tmp_path / "model.safetensors").stat().st_size == size
    fake_free_space(monkeypatch, 0)
    with pytest.raises(ValueError, match="not enough disk space"):
        make_checkpoint(tmp_path, micro_config, "both", progress=False, force=True)
    assert (tmp_path / "model.safetensors").exists()  # a refused write deletes nothing


def test_interrupted_write_leaves_no_file(micro_config, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = synthetic.iter_tensor

    def failing(cfg, seed, name):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real(cfg, seed, name)

    monkeypatch.setattr(synthetic, "iter_tensor", failing)
    with pytest.raises(KeyboardInterrupt):
        make_checkpoint(tmp_path, micro_config, "original", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(micro_config, tmp_path):
    with pytest.raises(ValueError, match="format"):
        make_checkpoint(tmp_path, micro_config, "gguf")
    with pytest.raises(ValueError, match="seed"):
        make_checkpoint(tmp_path, micro_config, seed=-1)
    with pytest.raises(ValueError, match="shard"):
        make_checkpoint(tmp_path, micro_config, max_shard_bytes=0)


# ---------------------------------------------------------------------------- CLI

def test_cli_make_checkpoint(tmp_path, capsys):
    out = tmp_path / "ck"
    args = ["make-checkpoint", str(out), "--preset", "tiny", "--format", "both", "--layers", "2", "--vocab-size",
            "1024", "--experts", "6", "--hidden-size", "96", "--max-shard-size", "100KB", "--seed", "7", "--quiet"]
    assert main(args) == 0
    assert "wrote original checkpoint" in capsys.readouterr().out
    with Checkpoint.open(out) as a, Checkpoint.open(out, format="hf") as b:
        assert a.config == b.config
        assert (a.config.num_hidden_layers, a.config.vocab_size, a.config.num_experts, a.config.hidden_size) == (
            2, 1024, 6, 96)
        assert len(b.files()) > 1
        assert np.array_equal(a.expert(1, 5).mlp2_blocks, b.expert(1, 5).mlp2_blocks)
    assert main(args) == 1
    assert "--force" in capsys.readouterr().err
    assert main(args + ["--force"]) == 0


def test_cli_errors_and_help(tmp_path, capsys):
    assert main(["make-checkpoint", str(tmp_path / "a"), "--hidden-size", "100", "--quiet"]) == 1
    assert "hidden_size 100 must be a multiple of 32" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["make-checkpoint", str(tmp_path / "b"), "--preset", "7b"])
    with pytest.raises(SystemExit):
        main(["make-checkpoint", str(tmp_path / "b"), "--max-shard-size", "lots"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["make-checkpoint", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for word in ("--preset", "--format", "--seed", "--layers", "--max-shard-size", "20b", "120b", "both"):
        assert word in text


def test_cli_progress_on_stderr(tmp_path, capsys):
    assert main(["make-checkpoint", str(tmp_path), "--layers", "2", "--vocab-size", "256"]) == 0
    err = capsys.readouterr().err
    assert "100.0%" in err and "MB/s" in err


def test_parse_size():
    from gptoss_stream.streaming.budget import parse_size  # --max-shard-size uses the one size syntax

    assert parse_size("4.8GB") == 4_800_000_000
    assert parse_size("64MiB") == 64 << 20
    assert parse_size("1000") == 1000
    assert parse_size("100 kb") == 100_000
    for bad in ("", "GB", "-5MB", "0", "1.5XB"):
        with pytest.raises(Exception):
            parse_size(bad)


# ---------------------------------------------------------------------------- progress bar

class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_progress_bar_log_mode():
    clock, out = _Clock(), io.StringIO()
    bar = ProgressBar(100_000_000, "writing", stream=out, clock=clock, interval=1.0)
    clock.t = 0.5
    bar.update(10_000_000)  # within the first interval: nothing printed in log mode
    assert out.getvalue() == ""
    clock.t = 2.0
    bar.update(40_000_000)
    line = out.getvalue()
    assert line.endswith("\n") and "writing" in line and " 50.0%" in line and "25.0 MB/s" in line
    assert "ETA 00:02" in line and "50.0 MB/100.0 MB" in line
    clock.t = 4.0
    bar.update(50_000_000)
    bar.close()
    bar.close()
    last = out.getvalue().splitlines()[-1]
    assert "100.0%" in last and "in 00:04" in last and "ETA 00:00" in last
    assert len(out.getvalue().splitlines()) == 3


def test_progress_bar_tty_mode_and_disabled():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    clock, out = _Clock(), Tty()
    with ProgressBar(1000, stream=out, clock=clock) as bar:
        bar.update(10)  # a terminal shows the bar at once, ETA unknown until it settles
        assert out.getvalue().startswith("\r[") and "ETA --:--" in out.getvalue()
        clock.t = 1.0
        bar.update(990)
    assert out.getvalue().endswith("\n") and out.getvalue().count("\r") == 3
    quiet = io.StringIO()
    with ProgressBar(10, stream=quiet, enabled=False) as bar:
        bar.update(10)
    assert quiet.getvalue() == ""
    assert format_bytes(1536) == "1.5 KB" and format_bytes(13_760_000_000) == "13.8 GB" and format_bytes(12) == "12 B"
    assert format_duration(3725) == "1:02:05" and format_duration(float("nan")) == "--:--"
