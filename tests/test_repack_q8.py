"""`gptoss repack --dense q8`: the q8 layout, its reader, the writer's resume and --verify, the memory plan,
streaming, and the engine against the numpy reference on a q8 checkpoint.

The quantization rule (docs/repacked-format.md) is checked here through the repacked bytes against the numpy
quantizer of tests/numpy_reference.py; the kernels themselves are tested in tests/test_q8.py.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

import numpy_reference as ref
from gptoss_stream.commands.cli import main
from gptoss_stream.engine.model import Model
from gptoss_stream.errors import DiskSpaceError, InputError
from gptoss_stream.streaming.budget import GIB, dense_nbytes, dense_ranges, plan_memory
from gptoss_stream.streaming.expert_cache import StreamingExpertStore, open_budgeted_store
from gptoss_stream.weights import repack as rp
from gptoss_stream.weights.checkpoint import Checkpoint
from gptoss_stream.weights.config import ModelConfig
from gptoss_stream.weights.layouts import repacked as layout
from gptoss_stream.weights.layouts.base import Q8Weight, is_q8_weight, original_tensors
from gptoss_stream.weights.layouts.repacked import MANIFEST, RepackedCheckpoint, records

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_repack import MICRO_SHARD, TINY_SHARD, digest, kill_9_after, manifest  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("error::ResourceWarning"),
              pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")]

Q8_NAMES = ("embedding.weight", "unembedding.weight", "attn.qkv.weight", "attn.out.weight")


@pytest.fixture(scope="module")
def micro_q8(micro_checkpoint, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("micro_q8") / "out"
    rp.repack(micro_checkpoint / "original", d, shard_size=MICRO_SHARD, progress=False, dense="q8")
    return d


@pytest.fixture(scope="module")
def tiny_q8(tiny_original, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_q8") / "out"
    rp.repack(tiny_original, d, shard_size=TINY_SHARD, progress=False, dense="q8")
    return d


def shard_files(d: Path) -> dict[str, str]:
    return {k: v for k, v in digest(d).items() if k.endswith(".safetensors")}


# ---------------------------------------------------------------------------- layout and reader

def test_q8_tensors_are_the_quantized_source_and_everything_else_is_copied(micro_checkpoint, micro_q8):
    import torch

    m = manifest(micro_q8)
    assert m["version"] == 2 and m["dense_format"] == "q8"
    seen = set()
    with Checkpoint.open(micro_checkpoint / "original") as src, Checkpoint.open(micro_q8) as dst:
        assert isinstance(dst, RepackedCheckpoint) and dst.dense_format == "q8" and src.dense_format == "bf16"
        for shard in m["shards"]:
            with safe_open(str(micro_q8 / shard["file"]), "pt") as st:  # the safetensors package reads I8/F16
                assert st.metadata() == {"format": "pt", "gptoss_repacked": "2", "gptoss_dense": "q8"}
                for name in st.keys():
                    seen.add(name)
                    got = st.get_tensor(name)
                    if name.endswith(".q8"):
                        assert got.dtype == torch.int8
                        want, _ = ref.quantize_q8(src.tensor(name.removesuffix(".q8")))
                        assert np.array_equal(got.numpy(), want), name
                    elif name.endswith(".q8_scales"):
                        assert got.dtype == torch.float16
                        _, want = ref.quantize_q8(src.tensor(name.removesuffix(".q8_scales")))
                        assert np.array_equal(got.view(torch.int16).numpy().view(np.uint16), want), name
                    elif not name.startswith("padding.") and ".experts." not in name:
                        assert np.array_equal(got.view(torch.uint8).numpy(), src.tensor(name).view(np.uint8)), name
        # Every original dense tensor is there, as itself or as its q8 pair; the router stays bf16.
        for name in original_tensors(src.config):
            if ".mlp.mlp" in name:
                continue
            if is_q8_weight(name):
                assert {name + ".q8", name + ".q8_scales"} <= seen and name not in seen
            else:
                assert name in seen
        assert "block.0.mlp.gate.weight" in seen and dst.layer(0).gate_weight.dtype == np.uint16


def test_reader_gives_q8_weights_as_read_only_views(micro_checkpoint, micro_q8):
    with Checkpoint.open(micro_checkpoint / "original") as src, Checkpoint.open(micro_q8) as dst:
        cfg = dst.config
        for w, name in ((dst.embedding(), "embedding.weight"), (dst.unembedding(), "unembedding.weight"),
                        (dst.layer(1).qkv_weight, "block.1.attn.qkv.weight"),
                        (dst.layer(1).out_weight, "block.1.attn.out.weight")):
            assert isinstance(w, Q8Weight) and w.values.dtype == np.int8 and w.scales.dtype == np.uint16
            assert not w.values.flags.writeable and not w.scales.flags.writeable
            q, s = ref.quantize_q8(src.tensor(name))
            assert np.array_equal(w.values, q) and np.array_equal(w.scales, s)
        lw = dst.layer(1)
        q_dim, kv = cfg.q_dim, cfg.kv_dim
        assert np.array_equal(lw.k_weight.values, lw.qkv_weight.values[q_dim:q_dim + kv])
        assert np.array_equal(lw.v_weight.scales, lw.qkv_weight.scales[q_dim + kv:])
        # The q8 pair is one range (values, then scales): what the plan prefaults and madvise covers.
        r = dst.tensor_range("embedding.weight")
        assert r.nbytes == dst.embedding().nbytes
        with pytest.raises(ValueError, match="stored as q8"):
            dst.tensor("embedding.weight")
        assert np.array_equal(dst.tensor("block.0.attn.qkv.bias"), src.tensor("block.0.attn.qkv.bias"))


def test_bf16_repack_is_unchanged_version_1(micro_checkpoint, tmp_path):
    """The default writes what version 1 wrote: no dense_format key, version 1, metadata "1"."""
    rp.repack(micro_checkpoint / "original", tmp_path / "bf16", shard_size=MICRO_SHARD, progress=False)
    rp.repack(micro_checkpoint / "original", tmp_path / "explicit", shard_size=MICRO_SHARD, progress=False,
              dense="bf16")
    m = manifest(tmp_path / "bf16")
    assert m["version"] == 1 and "dense_format" not in m
    assert shard_files(tmp_path / "bf16") == shard_files(tmp_path / "explicit")
    assert rp.plan(ModelConfig.preset("tiny")) == rp.plan(ModelConfig.preset("tiny"), dense="bf16")
    with Checkpoint.open(tmp_path / "bf16") as ck:
        assert ck.dense_format == "bf16" and isinstance(ck.embedding(), np.ndarray)


def test_q8_is_smaller_by_the_dense_bytes(micro_config, micro_q8, micro_checkpoint):
    q8 = sum(r.nbytes for r in records(micro_config, "q8"))
    bf16 = sum(r.nbytes for r in records(micro_config))
    saved = sum(np.prod(shape) * 2 - np.prod(shape) * (1 + 2 / 32)
                for name, (_, shape) in original_tensors(micro_config).items() if is_q8_weight(name))
    assert bf16 - q8 == saved > 0


def test_every_source_gives_the_same_q8_shards(micro_checkpoint, micro_q8, tmp_path):
    """HF (q, k, v apart), a bf16 repack, and the q8 repack itself (kept as q8, by default) as sources."""
    rp.repack(micro_checkpoint / "hf", tmp_path / "from_hf", shard_size=MICRO_SHARD, progress=False, dense="q8")
    rp.repack(micro_checkpoint / "original", tmp_path / "bf16", shard_size=MICRO_SHARD, progress=False)
    rp.repack(tmp_path / "bf16", tmp_path / "from_bf16", shard_size=MICRO_SHARD, progress=False, dense="q8")
    rp.repack(micro_q8, tmp_path / "from_q8", shard_size=MICRO_SHARD, progress=False, verify=True)
    want = shard_files(micro_q8)
    for d in ("from_hf", "from_bf16", "from_q8"):
        assert shard_files(tmp_path / d) == want, d
    assert manifest(tmp_path / "from_q8")["dense_format"] == "q8"


def test_q8_source_is_not_turned_back_into_bf16(micro_q8, tmp_path, capsys):
    with pytest.raises(InputError, match="cannot be converted back to bf16"):
        rp.repack(micro_q8, tmp_path / "out", progress=False, dense="bf16")
    assert not (tmp_path / "out").exists()
    assert main(["repack", str(micro_q8), str(tmp_path / "out"), "--dense", "bf16", "--quiet"]) != 0
    assert "--dense q8" in capsys.readouterr().err


def test_a_config_without_whole_q8_blocks_is_refused(micro_config):
    cfg = micro_config.with_overrides(num_attention_heads=3, head_dim=8)  # q_dim 24: out rows of 24 values
    with pytest.raises(InputError, match="whole 32-value blocks"):
        rp.plan(cfg, dense="q8")


def test_kill_9_then_resume_gives_identical_q8_output(micro_checkpoint, micro_q8, tmp_path):
    total = sum(s["size"] for s in manifest(micro_q8)["shards"])
    for i, limit in enumerate((1, 40_000, total // 2, total - 1)):
        out = tmp_path / f"k{i}"
        args = (str(micro_checkpoint / "original"), str(out), "--shard-size", str(MICRO_SHARD), "--dense", "q8")
        r = kill_9_after(limit, *args)
        assert r.stdout.startswith("stopped"), (limit, r.stdout, r.stderr)
        assert not (out / MANIFEST).exists()
        assert main(["repack", *args, "--quiet"]) == 0
        assert digest(out) == digest(micro_q8), limit


def test_resume_checks_q8_records_against_the_source(micro_checkpoint, micro_q8, tmp_path):
    """A resume recomputes the finished shards' q8 records from the source: a changed embedding is refused."""
    src = tmp_path / "src"
    shutil.copytree(micro_checkpoint / "original", src)
    out = tmp_path / "out"
    args = (str(src), str(out), "--shard-size", str(MICRO_SHARD), "--dense", "q8")
    shards = manifest(micro_q8)["shards"]  # the first holds the embedding record
    assert kill_9_after(shards[0]["size"] + shards[1]["size"] // 2, *args).stdout.startswith("stopped")
    with Checkpoint.open(src) as ck:
        r = ck.tensor_range("embedding.weight")
    with open(r.path, "r+b") as f:  # one bf16 value of the embedding, same size and mtime class
        f.seek(r.offset + 2)
        b = f.read(1)
        f.seek(r.offset + 2)
        f.write(bytes([b[0] ^ 0x40]))
    with pytest.raises(Exception, match="record embedding"):
        rp.repack(src, out, shard_size=MICRO_SHARD, progress=False, dense="q8")


def test_verify_checks_q8_bytes_against_a_fresh_quantization(micro_checkpoint, micro_q8, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(micro_q8, d)
    rp.verify_repack(d, micro_checkpoint / "original", progress=False)
    with Checkpoint.open(d) as ck:
        w = ck._where("block.1.attn.out.weight.q8_scales")
        path, offset = w.file.path, w.info.offset
    with open(path, "r+b") as f:
        f.seek(offset + 3)
        b = f.read(1)
        f.seek(offset + 3)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(Exception, match="block.1.attn.out.weight.q8_scales differs from a fresh q8 quantization"):
        rp.verify_repack(d, micro_checkpoint / "original", progress=False)


def _edit_header(path: Path, old: bytes, new: bytes) -> None:
    data = bytearray(path.read_bytes())
    i = data.find(old)
    assert i > 0 and len(old) == len(new)
    data[i:i + len(old)] = new
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    ("dtype", r"'block.0.attn.qkv.weight.q8' is U8 \[.*expected I8"),
    ("scales", r"'block.0.attn.qkv.weight.q8_scales' missing"),
    ("shape", r"'embedding.weight.q8_scales' is F16 .* expected F16"),
    ("version", "needs format version 2"),
    ("old_reader", "repack format version 2; this gptoss reads"),
])
def test_reader_rejects_broken_q8_repacks(micro_q8, tmp_path, damage, message, monkeypatch):
    d = tmp_path / "broken"
    shutil.copytree(micro_q8, d)
    m = manifest(d)
    shards = [d / s["file"] for s in m["shards"]]
    with Checkpoint.open(micro_q8) as ck:
        qkv_shard = Path(ck._where("block.0.attn.qkv.weight.q8").file.path).name
        emb_shard = Path(ck._where("embedding.weight.q8").file.path).name
    if damage == "dtype":
        _edit_header(d / qkv_shard, b'"block.0.attn.qkv.weight.q8":{"dtype":"I8"',
                     b'"block.0.attn.qkv.weight.q8":{"dtype":"U8"')
    elif damage == "scales":
        _edit_header(d / qkv_shard, b'"block.0.attn.qkv.weight.q8_scales"', b'"block.0.attn.qkv.weight.q8_scalez"')
    elif damage == "shape":  # [512, 1] -> [256, 2]: same bytes, wrong shape
        cfg = ck.config
        old = f'"embedding.weight.q8_scales":{{"dtype":"F16","shape":[{cfg.vocab_size},{cfg.hidden_size // 32}]'
        new = f'"embedding.weight.q8_scales":{{"dtype":"F16","shape":[{cfg.vocab_size // 2},{cfg.hidden_size // 16}]'
        _edit_header(d / emb_shard, old.encode(), new.encode())
    elif damage == "version":  # a version-1 manifest claiming q8
        m["version"] = 1
        (d / MANIFEST).write_text(json.dumps(m))
    else:  # what a reader that knows only version 1 says
        monkeypatch.setattr(layout, "FORMAT_VERSIONS", {"bf16": 1})
    assert shards
    with pytest.raises(ValueError, match=message):
        Checkpoint.open(d).close()


# ---------------------------------------------------------------------------- plan, streaming, engine

def test_q8_plans_more_expert_slots_at_the_same_budget():
    cfg = ModelConfig.preset("20b")
    slot = 13_238_272
    bf16 = plan_memory(cfg, slot, 4 * GIB, 4096, 64)
    q8 = plan_memory(cfg, slot, 4 * GIB, 4096, 64, dense_format="q8")
    assert q8.dense < 0.6 * bf16.dense and q8.expert_slots > bf16.expert_slots
    assert (q8.expert_slots - bf16.expert_slots) * slot <= bf16.dense - q8.dense + slot
    assert "dense weights (q8, page cache)" in q8.describe() and "(bf16, page cache)" in bf16.describe()
    # 20b: ~2.4 GB of bf16 dense weights a token reads, ~1.3 GB as q8 (issue 16)
    assert 2.3e9 < dense_nbytes(cfg, 0) < 2.5e9 and 1.2e9 < dense_nbytes(cfg, 0, dense_format="q8") < 1.4e9


def test_budgeted_store_plans_with_the_checkpoints_dense_format(tiny_q8):
    with Checkpoint.open(tiny_q8) as ck:
        covered = sum(r.nbytes for r in dense_ranges(ck))
        assert covered >= dense_nbytes(ck.config, 0, dense_format="q8") - 4096
        store, plan = open_budgeted_store(ck, 1 << 30, 256, 8)
        store.close()
        assert plan.dense_format == "q8" and plan.dense == dense_nbytes(ck.config, 256, dense_format="q8")


def prompt(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 199_998, size=n).tolist()


def test_q8_streamed_logits_are_bit_identical_to_mapped(tiny_q8):
    from test_streaming import in_thread, run

    tokens = prompt(14, seed=6)
    reference = run(Model(Checkpoint.open(tiny_q8), max_chunk=8), tokens, prefill=10)
    ck = Checkpoint.open(tiny_q8)
    with StreamingExpertStore(ck, slots=6) as store:
        streamed = in_thread(lambda: run(Model(ck, max_chunk=8, expert_store=store), tokens, prefill=10))
        assert store.stats.reads > 0
    ck.close()
    for a, b in zip(reference, streamed):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("length", [1, 8, 40])
def test_q8_engine_matches_numpy_reference(tiny_q8, compute_path, length, monkeypatch):
    """The same test and bounds as test_model.test_logits_match_numpy_reference, on the q8 checkpoint: the
    reference dequantizes the q8 weights as the kernels do (exactly in fp32; rounded to bf16 in the AVX-512
    path's tiles, for more than 8 rows)."""
    from test_model import NUMPY_BOUND, assert_routing_differs_only_at_near_ties, position_errors, routed_experts

    monkeypatch.setattr(ref, "Q8_BF16_TILES_ABOVE", ref.Q8_AVX512_REGISTER_ROWS if compute_path == "avx512" else None)
    with Model(Checkpoint.open(tiny_q8), max_chunk=64) as model:
        tokens = prompt(length, seed=1)
        ours, our_picks = routed_experts(model, tokens)
        ref_routes: list = []
        ref.forward_layers(model.checkpoint, tokens, routes=ref_routes)
        assert_routing_differs_only_at_near_ties(our_picks, ref_routes, model.config.experts_per_token)
        theirs = ref.forward(model.checkpoint, tokens, forced=our_picks)
    rows = position_errors(ours, theirs)
    assert rows.max() < NUMPY_BOUND and np.median(rows) < NUMPY_BOUND / 2


def test_q8_logits_are_close_to_bf16_but_not_equal(tiny_original, tiny_q8):
    """The quantization moves the logits (so a q8 run is not silently a bf16 one) by little."""
    tokens = prompt(24, seed=2)
    with Model(Checkpoint.open(tiny_original), max_chunk=64) as a, Model(Checkpoint.open(tiny_q8), max_chunk=64) as b:
        x = a.forward(tokens, a.new_cache(64), all_logits=True)
        y = b.forward(tokens, b.new_cache(64), all_logits=True)
    assert not np.array_equal(x, y)
    assert np.mean(x.argmax(1) == y.argmax(1)) >= 0.75


def test_cli_stats_and_info_name_the_dense_format(tiny_q8, capsys, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "/work/shared/tiktoken")
    assert main(["generate", "-m", str(tiny_q8), "-p", "Hi", "--raw", "-n", "2", "-t", "0", "--ram-budget", "1G",
                 "--stats", "--chunk", "8"]) == 0
    err = capsys.readouterr().err
    assert "[stats] checkpoint: repacked, dense weights q8" in err and "dense weights (q8, page cache)" in err
    assert main(["info", "-m", str(tiny_q8), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)["checkpoint"]
    assert info["dense_format"] == "q8" and info["format"] == "repacked"
    with Checkpoint.open(tiny_q8) as ck:
        assert info["dense_bytes_per_token"] == dense_nbytes(ck.config, 0, dense_format="q8")


def test_the_disk_check_counts_the_q8_size(micro_checkpoint, micro_config, tmp_path, monkeypatch):
    """Free space between the q8 and the bf16 output's size: q8 is written, bf16 refused before writing."""
    import os

    q8 = sum(s.size for s in rp.plan(micro_config, MICRO_SHARD, dense="q8"))
    bf16 = sum(s.size for s in rp.plan(micro_config, MICRO_SHARD))
    assert q8 < bf16

    class Free:
        f_bavail, f_frsize = (q8 + bf16) // 2 // 4096, 4096

    monkeypatch.setattr(os, "statvfs", lambda path: Free())
    with pytest.raises(DiskSpaceError, match=r"needs .* more but only .* is free"):
        rp.repack(micro_checkpoint / "original", tmp_path / "bf16", shard_size=MICRO_SHARD, progress=False)
    rp.repack(micro_checkpoint / "original", tmp_path / "q8", shard_size=MICRO_SHARD, progress=False, dense="q8")
    assert sum(p.stat().st_size for p in (tmp_path / "q8").glob("*.safetensors")) == q8
