import os
import shutil
import time

import numpy as np
import psutil
import pytest

from gptoss_stream.weights.checkpoint import Checkpoint
from gptoss_stream.weights.config import ModelConfig
from gptoss_stream.weights.layouts.base import EXPERT_PIECES, TensorRange, original_tensors
from gptoss_stream.weights.layouts.published import locate
from gptoss_stream.weights.synthetic import write_hf


def _pread(r: TensorRange) -> bytes:
    fd = os.open(r.path, os.O_RDONLY)
    try:
        return os.pread(fd, r.nbytes, r.offset)
    finally:
        os.close(fd)


def test_open_both_formats(tiny_checkpoint, tiny_original, tiny_hf):
    with Checkpoint.open(tiny_checkpoint) as a, Checkpoint.open(tiny_hf) as b:
        assert a.format == "original" and a.path == tiny_original and len(a.files()) == 1
        assert b.format == "hf" and b.path == tiny_hf and len(b.files()) == 2
        assert a.config == b.config == ModelConfig.preset("tiny")
        cfg = a.config
        V, H = cfg.vocab_size, cfg.hidden_size
        for ck in (a, b):
            assert ck.embedding().shape == (V, H) and ck.embedding().dtype == np.uint16
            assert ck.unembedding().shape == (V, H) and ck.final_norm().shape == (H,)
            lw = ck.layer(1)
            assert lw.q_weight.shape == (cfg.q_dim, H) and lw.k_weight.shape == (cfg.kv_dim, H)
            assert lw.v_bias.shape == (cfg.kv_dim,) and lw.sinks.shape == (cfg.num_attention_heads,)
            assert lw.out_weight.shape == (H, cfg.q_dim) and lw.gate_weight.shape == (cfg.num_experts, H)
            ew = ck.expert(1, 2)
            I = cfg.intermediate_size
            assert ew.mlp1_blocks.shape == (2 * I, H // 32, 16) and ew.mlp1_scales.shape == (2 * I, H // 32)
            assert ew.mlp2_blocks.shape == (H, I // 32, 16) and ew.mlp2_bias.shape == (H,)
            assert ew.mlp1_bias.dtype == np.uint16 and ew.mlp1_blocks.dtype == np.uint8


def test_both_formats_hold_identical_weights(tiny_original, tiny_hf):
    with Checkpoint.open(tiny_original) as a, Checkpoint.open(tiny_hf) as b:
        assert np.array_equal(a.embedding(), b.embedding())
        assert np.array_equal(a.unembedding(), b.unembedding())
        assert np.array_equal(a.final_norm(), b.final_norm())
        for n in range(a.config.num_hidden_layers):
            la, lb = a.layer(n), b.layer(n)
            for field in ("attn_norm", "q_weight", "q_bias", "k_weight", "k_bias", "v_weight", "v_bias", "sinks",
                          "out_weight", "out_bias", "mlp_norm", "gate_weight", "gate_bias"):
                assert np.array_equal(getattr(la, field), getattr(lb, field)), (n, field)
            for e in range(a.config.num_experts):
                ea, eb = a.expert(n, e), b.expert(n, e)
                for field in ("mlp1_blocks", "mlp1_scales", "mlp1_bias", "mlp2_blocks", "mlp2_scales", "mlp2_bias"):
                    assert np.array_equal(getattr(ea, field), getattr(eb, field)), (n, e, field)


def test_views_are_zero_copy_into_the_mapping(tiny_original):
    with Checkpoint.open(tiny_original) as ck:
        lw = ck.layer(0)
        cfg = ck.config
        assert lw.qkv_weight is not None and lw.qkv_weight.shape == (cfg.qkv_dim, cfg.hidden_size)
        for v in (lw.q_weight, lw.k_weight, lw.v_weight, lw.qkv_weight, ck.embedding()):
            assert not v.flags.owndata and not v.flags.writeable
        # q/k/v are row slices of the one fused tensor: same memory, consecutive addresses
        assert np.shares_memory(lw.q_weight, lw.qkv_weight) and np.shares_memory(lw.v_weight, lw.qkv_weight)
        assert lw.q_weight.ctypes.data == lw.qkv_weight.ctypes.data
        assert lw.k_weight.ctypes.data == lw.q_weight.ctypes.data + lw.q_weight.nbytes
        assert np.array_equal(lw.qkv_bias[cfg.q_dim:cfg.q_dim + cfg.kv_dim], lw.k_bias)
        # raw pointers: range + mapping base address == the numpy view's data pointer
        r = ck.tensor_range("block.0.attn.qkv.weight")
        assert ck.address(r) == lw.qkv_weight.ctypes.data
        ew = ck.expert(2, 5)
        for view, rng in zip((ew.mlp1_blocks, ew.mlp1_scales, ew.mlp1_bias, ew.mlp2_blocks, ew.mlp2_scales,
                              ew.mlp2_bias), ew.ranges):
            assert ck.address(rng) == view.ctypes.data and rng.nbytes == view.nbytes


@pytest.mark.parametrize("fmt", ["original", "hf"])
def test_expert_ranges_are_the_expert_bytes(tiny_checkpoint, fmt):
    with Checkpoint.open(tiny_checkpoint, format=fmt) as ck:
        E = ck.config.num_experts
        for layer in (0, ck.config.num_hidden_layers - 1):
            for e in (0, 3, E - 1):
                ew = ck.expert(layer, e)
                views = (ew.mlp1_blocks, ew.mlp1_scales, ew.mlp1_bias, ew.mlp2_blocks, ew.mlp2_scales, ew.mlp2_bias)
                for piece, view, r in zip(EXPERT_PIECES, views, ew.ranges):
                    assert _pread(r) == view.tobytes()
                    assert np.array_equal(ck.tensor(f"block.{layer}.{piece}")[e], view)
                assert ck.expert_nbytes(layer, e) == ew.nbytes == sum(v.nbytes for v in views)


def test_expert_record_size_of_20b_matches_spec():
    # SPEC §6: 13.24 MB per gpt-oss-20b expert.
    cfg = ModelConfig.preset("20b")
    shapes = original_tensors(cfg)
    per_expert = sum(int(np.prod(shapes[f"block.0.{p}"][1][1:])) * (2 if shapes[f"block.0.{p}"][0] == "BF16" else 1)
                     for p in EXPERT_PIECES)
    assert per_expert == 13_236_480


def test_hf_qkv_fused_view_only_when_adjacent(tiny_hf, micro_config, tmp_path):
    with Checkpoint.open(tiny_hf) as ck:
        # Published HF shards are sorted by name: k_proj, o_proj, q_proj, ... so q/k/v are not adjacent.
        assert ck.layer(0).qkv_weight is None and ck.layer(0).qkv_bias is None
    write_hf(tmp_path, micro_config, seed=3, progress=False, canonical_order=False)
    with Checkpoint.open(tmp_path) as ck:
        lw = ck.layer(1)
        assert lw.qkv_weight is not None and lw.qkv_bias is not None
        assert np.array_equal(lw.qkv_weight, np.concatenate([lw.q_weight, lw.k_weight, lw.v_weight]))
        assert np.array_equal(lw.qkv_bias, np.concatenate([lw.q_bias, lw.k_bias, lw.v_bias]))


def test_open_is_fast_and_reads_nothing(tiny_original):
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    t0 = time.perf_counter()
    ck = Checkpoint.open(tiny_original)
    opened = time.perf_counter() - t0
    views = [ck.embedding(), ck.unembedding()]
    for n in range(ck.config.num_hidden_layers):
        views.append(ck.layer(n))
        views += [ck.expert(n, e) for e in range(ck.config.num_experts)]
    rss1 = proc.memory_info().rss
    assert opened < 0.5
    size = ck.nbytes()
    assert size > 45e6
    assert rss1 - rss0 < 8e6, f"opening + viewing grew RSS by {rss1 - rss0} bytes for a {size} byte file"
    # Touching the embedding pulls its pages in: proves the measurement can see mapped reads.
    assert int(views[0].sum(dtype=np.uint64)) > 0
    rss2 = proc.memory_info().rss
    assert rss2 - rss1 > 20e6
    ck.close()


def test_close_keeps_handed_out_views_alive(tiny_original):
    ck = Checkpoint.open(tiny_original)
    emb = ck.embedding()
    r = ck.tensor_range("norm.scale")
    first = emb[:4].copy()
    ck.close()
    assert np.array_equal(emb[:4], first)  # still mapped: no crash after close
    with pytest.raises(ValueError, match="closed"):
        ck.address(r)
    with pytest.raises(ValueError, match="closed"):
        ck.embedding()
    ck.close()  # idempotent


def test_bad_indices_and_names(tiny_original):
    with Checkpoint.open(tiny_original) as ck:
        with pytest.raises(ValueError, match="layer 4 out of range"):
            ck.layer(4)
        with pytest.raises(ValueError, match="expert 8 out of range"):
            ck.expert(0, 8)
        with pytest.raises(ValueError, match="layer -1"):
            ck.expert(-1, 0)
        with pytest.raises(ValueError, match="no tensor"):
            ck.tensor("block.0.attn.rope")


def test_locate_rules(tiny_checkpoint, tiny_original, tiny_hf, tmp_path):
    assert locate(tiny_checkpoint) == ("original", tiny_original)
    assert locate(tiny_checkpoint, "hf") == ("hf", tiny_hf)
    assert locate(tiny_hf / "config.json") == ("hf", tiny_hf)
    # An HF repo root that also carries original/ (like openai/gpt-oss-20b): original/ wins unless asked.
    repo = tmp_path / "repo"
    shutil.copytree(tiny_hf, repo, copy_function=os.symlink)
    (repo / "original").symlink_to(tiny_original, target_is_directory=True)
    assert locate(repo) == ("original", repo / "original")
    assert locate(repo, "hf") == ("hf", repo)
    with Checkpoint.open(repo, format="hf") as ck:
        assert ck.format == "hf" and ck.path == repo
    with pytest.raises(FileNotFoundError, match="no hf checkpoint"):
        locate(tiny_original, "hf")
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        locate(tiny_original, "gguf")
    with pytest.raises(FileNotFoundError, match="not found"):
        locate(tmp_path / "nope")
    with pytest.raises(ValueError, match="checkpoint directory"):
        locate(tiny_original / "model.safetensors")
