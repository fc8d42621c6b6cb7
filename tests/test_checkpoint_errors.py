"""Bad input gives a clear ValueError / FileNotFoundError naming the file and tensor, never a crash.

Each case copies the micro checkpoint (a few hundred KB) and damages one thing.
"""

import json
import shutil
import struct
from pathlib import Path

import pytest

from gptoss_stream.weights.checkpoint import Checkpoint
from gptoss_stream.weights.safetensors_file import SafetensorsFile


def read_file(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_file(path: Path, header: dict | bytes, data: bytes) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.fixture
def orig(micro_checkpoint, tmp_path) -> Path:
    d = tmp_path / "original"
    shutil.copytree(micro_checkpoint / "original", d)
    return d


@pytest.fixture
def hf(micro_checkpoint, tmp_path) -> Path:
    d = tmp_path / "hf"
    shutil.copytree(micro_checkpoint / "hf", d)
    return d


def test_fixtures_are_valid(orig, hf):
    Checkpoint.open(orig).close()
    with Checkpoint.open(hf) as ck:
        assert len(ck.files()) > 3  # sharded at 20 KB


def test_missing_config(orig):
    (orig / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        Checkpoint.open(orig)


def test_missing_original_weights(orig):
    (orig / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"original.*model.safetensors"):
        Checkpoint.open(orig)


def test_missing_hf_shard(hf):
    victim = sorted(hf.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        Checkpoint.open(hf)


def test_missing_hf_index_and_weights(hf):
    (hf / "model.safetensors.index.json").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors.index.json"):
        Checkpoint.open(hf)


def test_malformed_hf_index(hf):
    (hf / "model.safetensors.index.json").write_text("{\"weight_map\": [")
    with pytest.raises(ValueError, match="index.json.*not valid JSON"):
        Checkpoint.open(hf)
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../../etc/passwd"}}))
    with pytest.raises(ValueError, match="plain file name"):
        Checkpoint.open(hf)


def test_tensor_missing_from_index(hf):
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.self_attn.sinks"]
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.sinks.*missing from the weight map"):
        Checkpoint.open(hf)


def test_index_points_to_wrong_shard(hf):
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    wm = index["weight_map"]
    name = "model.layers.0.mlp.router.bias"
    wm[name] = next(f for f in sorted(set(wm.values())) if f != wm[name])
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"{wm[name]}.*{name}.*missing"):
        Checkpoint.open(hf)


def test_truncated_shard(orig):
    f = orig / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes(raw[:-1000])
    with pytest.raises(ValueError, match=r"model.safetensors.*tensor '.*'.*past the end of the file.*truncated"):
        Checkpoint.open(orig)


def test_file_too_short(orig):
    (orig / "model.safetensors").write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match="too short"):
        Checkpoint.open(orig)


def test_header_length_beyond_file(orig):
    f = orig / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes(struct.pack("<Q", len(raw)) + raw[8:])
    with pytest.raises(ValueError, match="header length .* beyond the file"):
        Checkpoint.open(orig)
    f.write_bytes(struct.pack("<Q", 2**63) + raw[8:])
    with pytest.raises(ValueError, match="header length"):
        Checkpoint.open(orig)


@pytest.mark.parametrize("bad", [b"{\"a\": ", b"\xff\xfe not utf8", b"[1, 2, 3]", b"{\"x\": 5}"])
def test_malformed_json_header(orig, bad):
    f = orig / "model.safetensors"
    _, data = read_file(f)
    write_file(f, bad, data)
    with pytest.raises(ValueError, match="model.safetensors"):
        Checkpoint.open(orig)


def test_overlapping_tensors(orig):
    f = orig / "model.safetensors"
    header, data = read_file(f)
    a, b = header["block.0.attn.sinks"], header["block.1.attn.sinks"]
    b["data_offsets"] = list(a["data_offsets"])
    write_file(f, header, data)
    with pytest.raises(ValueError, match=r"block.\d.attn.sinks.*block.\d.attn.sinks.*overlap"):
        Checkpoint.open(orig)


def test_out_of_file_offsets(orig):
    f = orig / "model.safetensors"
    header, data = read_file(f)
    n = header["norm.scale"]["data_offsets"][1] - header["norm.scale"]["data_offsets"][0]
    header["norm.scale"]["data_offsets"] = [len(data) + 64, len(data) + 64 + n]
    write_file(f, header, data)
    with pytest.raises(ValueError, match=r"'norm.scale'.*past the end"):
        Checkpoint.open(orig)


@pytest.mark.parametrize("offsets", [[10, 2], [-2, 62], [0, 3], "0-64", [0, 64, 128]])
def test_inconsistent_offsets(orig, offsets):
    f = orig / "model.safetensors"
    header, data = read_file(f)
    header["norm.scale"]["data_offsets"] = offsets
    write_file(f, header, data)
    with pytest.raises(ValueError, match=r"'norm.scale'.*data_offsets"):
        Checkpoint.open(orig)


def test_unknown_dtype(orig):
    f = orig / "model.safetensors"
    header, data = read_file(f)
    header["block.1.attn.out.bias"]["dtype"] = "BF12"
    write_file(f, header, data)
    with pytest.raises(ValueError, match=r"'block.1.attn.out.bias'.*unknown or unsupported dtype 'BF12'"):
        Checkpoint.open(orig)


def test_wrong_dtype_for_tensor(orig):
    f = orig / "model.safetensors"
    header, data = read_file(f)
    header["block.1.attn.out.bias"]["dtype"] = "F16"  # same width, so offsets stay valid
    write_file(f, header, data)
    with pytest.raises(ValueError, match=r"'block.1.attn.out.bias' has dtype F16, expected BF16"):
        Checkpoint.open(orig)


def test_wrong_shape_for_config(orig):
    f = orig / "model.safetensors"
    header, data = read_file(f)
    e = header["block.0.mlp.gate.weight"]
    e["shape"] = [e["shape"][1], e["shape"][0]]  # transposed: same bytes, wrong shape
    write_file(f, header, data)
    with pytest.raises(ValueError, match=r"'block.0.mlp.gate.weight' has shape \[32, 4\], expected \[4, 32\]"):
        Checkpoint.open(orig)


def test_config_disagrees_with_weights(orig):
    cfg = json.loads((orig / "config.json").read_text())
    cfg["num_experts"] = 8
    (orig / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"mlp.*shape.*expected"):
        Checkpoint.open(orig)


def test_missing_tensor(orig):
    f = orig / "model.safetensors"
    header, data = read_file(f)
    del header["block.1.mlp.mlp2_weight.scales"]
    write_file(f, header, data)
    with pytest.raises(ValueError, match=r"'block.1.mlp.mlp2_weight.scales' missing from model.safetensors"):
        Checkpoint.open(orig)


def test_duplicate_tensor_across_original_files(orig):
    shutil.copy(orig / "model.safetensors", orig / "model-copy.safetensors")
    with pytest.raises(ValueError, match="also appears in"):
        Checkpoint.open(orig)


def test_impossible_config(orig):
    cfg = json.loads((orig / "config.json").read_text())
    cfg["hidden_size"] = 33
    (orig / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json.*hidden_size 33 must be a multiple of 32"):
        Checkpoint.open(orig)


def test_hf_accepts_3d_blocks_but_not_other_shapes(hf):
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    name = "model.layers.0.mlp.experts.down_proj_blocks"
    f = hf / index["weight_map"][name]
    header, data = read_file(f)
    E, R, G, B = header[name]["shape"]
    header[name]["shape"] = [E, R, G * B]  # how re-saved HF checkpoints sometimes store the blocks
    write_file(f, header, data)
    with Checkpoint.open(hf) as ck:
        assert ck.expert(0, 1).mlp2_blocks.shape == (R, G, B)
    header[name]["shape"] = [E, R * G * B]
    write_file(f, header, data)
    with pytest.raises(ValueError, match=rf"{f.name}.*{name}.*shape"):
        Checkpoint.open(hf)


def test_safetensors_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        SafetensorsFile(tmp_path / "nothing.safetensors")
    p = tmp_path / "x.safetensors"
    write_file(p, {"__metadata__": {"format": 1}}, b"")
    with pytest.raises(ValueError, match="__metadata__"):
        SafetensorsFile(p)
    write_file(p, {"t": {"dtype": "U8", "shape": [2, -1], "data_offsets": [0, 0]}}, b"")
    with pytest.raises(ValueError, match="'t'.*shape"):
        SafetensorsFile(p)
    write_file(p, {"t": "U8"}, b"")
    with pytest.raises(ValueError, match="'t'.*not an object"):
        SafetensorsFile(p)
    write_file(p, {"t": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}, "e": {"dtype": "F32", "shape": [0],
                                                                               "data_offsets": [1, 1]}}, b"ab")
    with SafetensorsFile(p) as st:  # empty tensors may sit anywhere
        assert st.view("t").tobytes() == b"ab" and st.view("e").shape == (0,)
        with pytest.raises(ValueError, match="'u' not found"):
            st.view("u")


# ---------------------------------------------------------------------------- hostile numbers and nesting (issue 15)

DEEP = b"[" * 100_000 + b"]" * 100_000


def test_deeply_nested_header_is_a_clear_error(orig):
    f = orig / "model.safetensors"
    _, data = read_file(f)
    write_file(f, DEEP, data)
    with pytest.raises(ValueError, match=r"model.safetensors: malformed safetensors header: .*nested too deeply"):
        Checkpoint.open(orig)


@pytest.mark.parametrize("field", ["num_hidden_layers", "num_experts", "vocab_size", "hidden_size", "head_dim",
                                   "initial_context_length"])
def test_absurd_config_sizes_fail_at_once(orig, field):
    import time

    cfg = json.loads((orig / "config.json").read_text())
    cfg[field] = 2**40
    (orig / "config.json").write_text(json.dumps(cfg))
    started = time.perf_counter()
    with pytest.raises(ValueError, match=rf"config.json: config: {field} is {2**40}, more than gptoss supports"):
        Checkpoint.open(orig)
    assert time.perf_counter() - started < 5  # 2**40 layers used to run without end


def test_too_many_experts_in_all(orig):
    cfg = json.loads((orig / "config.json").read_text())
    cfg.update(num_hidden_layers=1000, num_experts=4000)
    (orig / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"1000 layers of 4000 experts is more than gptoss supports"):
        Checkpoint.open(orig)


@pytest.mark.parametrize("content, match", [
    (DEEP, "nested too deeply"),
    (b'{"num_experts": 1' + b"0" * 5000 + b"}", r"not valid JSON \(Exceeds the limit"),
    (b" " * (2 << 20), r"more than a config.json can be \(1048576 bytes at most\)"),
])
def test_hostile_config_json(orig, content, match):
    (orig / "config.json").write_bytes(content)
    with pytest.raises(ValueError, match=rf"config.json: .*{match}"):
        Checkpoint.open(orig)


@pytest.mark.parametrize("content, match", [
    (b'{"weight_map": ' + DEEP + b"}", "nested too deeply"),
    (json.dumps({"weight_map": {"model.norm.weight": "a\u0000b"}}).encode(), "must be a plain file name"),
    (json.dumps({"weight_map": {"model.norm.weight": "x" * 300}}).encode(), "must be a plain file name"),
])
def test_hostile_hf_index(hf, content, match):
    (hf / "model.safetensors.index.json").write_bytes(content)
    with pytest.raises(ValueError, match=rf"model.safetensors.index.json: .*{match}"):
        Checkpoint.open(hf)


def test_header_values_are_checked_for_type_and_cut_in_messages(orig):
    f = orig / "model.safetensors"
    header, data = read_file(f)
    header["norm.scale"]["dtype"] = ["BF16"]  # unhashable: used to escape as TypeError
    write_file(f, header, data)
    with pytest.raises(ValueError, match=r"'norm.scale': unknown or unsupported dtype \['BF16'\]"):
        Checkpoint.open(orig)
    header["norm.scale"]["dtype"] = "BF16"
    header["norm.scale"]["shape"] = [1] * 10_000
    write_file(f, header, data)
    with pytest.raises(ValueError, match=r"'norm.scale': shape must be a list of at most 16") as e:
        Checkpoint.open(orig)
    assert len(str(e.value)) < 400
