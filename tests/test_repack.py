"""`gptoss repack`: the layout, the reader, bit-identical logits, resume after kill -9, bad input, --verify.

Most cases use the micro checkpoint (a few hundred KB; records of 4 KiB, so tiny --shard-size values make
many shards); the logits test uses the tiny preset, the size tests/test_model.py runs.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from gptoss_stream.commands.cli import main
from gptoss_stream.errors import DiskSpaceError
from gptoss_stream.weights import repack as rp
from gptoss_stream.weights.checkpoint import Checkpoint
from gptoss_stream.weights.layouts.repacked import MANIFEST, MANIFEST_PARTIAL, RepackedCheckpoint, records
from gptoss_stream.weights.safetensors_file import SafetensorsFile

ROOT = Path(__file__).resolve().parents[1]
# Unclosed files or mappings are errors here (run also under `python -X dev`).
pytestmark = [pytest.mark.filterwarnings("error::ResourceWarning"),
              pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")]
MICRO_SHARD = 16 << 10  # micro records are 4 KiB (experts) to 32 KiB (embedding): ~6 shards
TINY_SHARD = 2 << 20  # tiny: the 25 MB embedding and unembedding alone, the layers in a few shards


def digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def manifest(d: Path) -> dict:
    return json.loads((d / MANIFEST).read_text())


def run_cli(*args: str, wait: bool = True):
    """`gptoss repack ...` in a child process (so it can be killed like a real run)."""
    cmd = [sys.executable, "-m", "gptoss_stream.commands.cli", "repack", *args, "--quiet"]
    e = {**os.environ, "PYTHONPATH": str(ROOT)}
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=120)


# A child `gptoss repack` that stops once `limit` shard bytes are written (the cut may fall anywhere: O_DIRECT
# is switched off for the last write) and says so on stdout; the test then kills it from outside.
_STOP_AFTER = """
import fcntl, os, sys, time
limit, written, real_write = int(sys.argv.pop(1)), 0, os.write

def write(fd, data):
    global written
    if not os.readlink(f"/proc/self/fd/{fd}").endswith(".safetensors.partial"):
        return real_write(fd, data)
    data = memoryview(data)
    if written + len(data) >= limit:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        cut = data[:limit - written]
        while len(cut):
            cut = cut[real_write(fd, cut):]
        print("stopped", flush=True)
        while True:
            time.sleep(60)
    n = real_write(fd, data)
    written += n
    return n

os.write = write
from gptoss_stream.commands.cli import main
sys.exit(main())
"""


def kill_9_after(limit: int, *args: str) -> subprocess.CompletedProcess:
    """`gptoss repack ...` in a child process, killed with SIGKILL once it has written `limit` shard bytes."""
    cmd = [sys.executable, "-c", _STOP_AFTER, str(limit), "repack", *args, "--quiet"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # "" if it finished (or failed) before the limit
        if line == "stopped\n":
            proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, line + out, err)


@pytest.fixture(scope="module")
def micro_ref(micro_checkpoint, tmp_path_factory) -> Path:
    """An uninterrupted repack of the micro original checkpoint into MICRO_SHARD shards."""
    d = tmp_path_factory.mktemp("micro_ref") / "out"
    rp.repack(micro_checkpoint / "original", d, shard_size=MICRO_SHARD, progress=False)
    return d


@pytest.fixture(scope="module")
def tiny_repacked(tiny_original, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_repacked") / "out"
    rp.repack(tiny_original, d, shard_size=TINY_SHARD, progress=False)
    return d


# ---------------------------------------------------------------------------- layout

def test_layout_records_are_aligned_valid_safetensors(micro_checkpoint, micro_ref):
    import torch  # safetensors' numpy loader has no bf16

    m = manifest(micro_ref)
    assert len(m["shards"]) > 3
    with Checkpoint.open(micro_checkpoint / "original") as src, Checkpoint.open(micro_ref) as dst:
        assert isinstance(dst, RepackedCheckpoint) and dst.format == "repacked" and dst.config == src.config
        names_seen = set()
        for shard in m["shards"]:
            path = micro_ref / shard["file"]
            assert path.stat().st_size == shard["size"]
            f = SafetensorsFile(path)
            assert f.data_start % 4096 == 0 and f.size % 4096 == 0
            # The safetensors package itself opens it (it refuses holes, overlaps and trailing bytes).
            with safe_open(str(path), "pt") as st:
                assert st.metadata()["gptoss_repacked"] == "1"
                for name in st.keys():
                    names_seen.add(name)
                    got = st.get_tensor(name).view(torch.uint8).numpy()
                    if name.startswith("padding."):
                        assert not got.any()
                    elif ".experts." not in name:
                        assert np.array_equal(got, src.tensor(name).view(np.uint8)), name
            f.close()
        cfg = src.config
        for n in range(cfg.num_hidden_layers):
            np.testing.assert_array_equal(dst.layer(n).qkv_weight, src.layer(n).qkv_weight)
            for e in range(cfg.num_experts):
                entry = m["experts"][n][e]
                assert entry["offset"] % 4096 == 0 and entry["length"] % 4096 == 0
                a, b = src.expert(n, e), dst.expert(n, e)
                (r,) = b.ranges  # one read per expert
                assert (r.offset, r.nbytes) == (entry["offset"], entry["length"])
                raw = Path(r.path).read_bytes()[r.offset:r.offset + r.nbytes]
                pieces = [a.mlp1_blocks, a.mlp1_scales, a.mlp1_bias, a.mlp2_blocks, a.mlp2_scales, a.mlp2_bias]
                body = b"".join(p.tobytes() for p in pieces)
                assert raw == body + bytes(len(raw) - len(body))  # the pieces back to back, then zero padding
                views = [b.mlp1_blocks, b.mlp1_scales, b.mlp1_bias, b.mlp2_blocks, b.mlp2_scales, b.mlp2_bias]
                for va, vb in zip(pieces, views):
                    assert va.shape == vb.shape and va.dtype == vb.dtype and np.array_equal(va, vb)
                    assert 0 <= vb.ctypes.data - dst.address(r) < r.nbytes  # zero-copy, inside the record
    assert "block.1.mlp.experts.3.mlp2_weight.scales" in names_seen


def test_records_in_forward_order_and_shards_never_split_them(micro_ref, micro_config):
    m = manifest(micro_ref)
    where = {d["name"]: (d["shard"], d["offset"]) for d in m["dense"]}
    for n, row in enumerate(m["experts"]):
        for e, entry in enumerate(row):
            where[f"block.{n}.mlp.experts.{e}"] = (entry["shard"], entry["offset"])
    order = [r.name for r in records(micro_config)]
    assert order[0] == "embedding" and order[1] == "block.0.dense" and order[-1] == "final"
    assert [where[name] for name in order] == sorted(where[name] for name in order)
    # every shard holds only whole records and stays under the limit unless it is a single record
    for i, shard in enumerate(m["shards"]):
        held = [name for name in order if where[name][0] == i]
        assert held and (shard["size"] <= MICRO_SHARD or len(held) == 1)


def test_plan_header_sizes_are_exact(micro_config):
    for shard_size in (1, 16 << 10, 1 << 30):
        for align in (8, 4096, 65536):
            shards = rp.plan(micro_config, shard_size, align)
            for s in shards:
                (n,) = np.frombuffer(s.header[:8], "<u8")
                assert 8 + n == len(s.header) and len(s.header) % align == 0
                assert s.records[0].offset == len(s.header)
                json.loads(s.header[8:])
                if len(s.records) > 1:
                    assert s.size <= shard_size


def test_hf_and_original_sources_give_identical_shards(micro_checkpoint, micro_ref, tmp_path):
    rp.repack(micro_checkpoint / "hf", tmp_path / "from_hf", shard_size=MICRO_SHARD, progress=False)
    a, b = digest(micro_ref), digest(tmp_path / "from_hf")
    assert a.pop(MANIFEST) != b.pop(MANIFEST)  # they name different sources
    assert a == b
    ma, mb = manifest(micro_ref), manifest(tmp_path / "from_hf")
    assert ma.pop("source")["format"] == "original" and mb.pop("source")["format"] == "hf"
    assert ma == mb


def test_page_cache_fallbacks_write_the_same_bytes(micro_checkpoint, micro_ref, tmp_path, monkeypatch):
    """O_DIRECT refused by the filesystem (tmpfs), or refused at the first write (a device wanting a larger
    alignment), or impossible (--align below 4096): the writer goes through the page cache instead."""
    src = micro_checkpoint / "original"
    calls = []
    real_set, real_write = rp._set_direct, rp._write

    def spy_set(fd, on):
        calls.append(on)
        return real_set(fd, on)

    monkeypatch.setattr(rp, "_set_direct", spy_set)
    rp.repack(src, tmp_path / "direct", shard_size=MICRO_SHARD, progress=False)
    assert True in calls
    monkeypatch.setattr(rp, "_set_direct", lambda fd, on: False)
    rp.repack(src, tmp_path / "refused", shard_size=MICRO_SHARD, progress=False)
    monkeypatch.setattr(rp, "_set_direct", real_set)

    def einval_once(fd, data):
        if os.O_DIRECT & rp.fcntl.fcntl(fd, rp.fcntl.F_GETFL):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_write(fd, data)

    monkeypatch.setattr(rp, "_write", einval_once)
    rp.repack(src, tmp_path / "einval", shard_size=MICRO_SHARD, progress=False)
    for d in ("direct", "refused", "einval"):
        assert digest(tmp_path / d) == digest(micro_ref), d
    calls.clear()
    monkeypatch.setattr(rp, "_set_direct", spy_set)
    rp.repack(src, tmp_path / "align512", shard_size=MICRO_SHARD, align=512, progress=False)
    assert True not in calls  # 512-byte records cannot be written with O_DIRECT's 4096-byte blocks
    rp.verify_repack(tmp_path / "align512", src, progress=False)
    m = manifest(tmp_path / "align512")
    assert all(e["offset"] % 512 == 0 and e["length"] == 2048 for row in m["experts"] for e in row)


def test_repack_of_a_repacked_checkpoint(micro_checkpoint, micro_ref, tmp_path):
    rp.repack(micro_ref, tmp_path / "again", shard_size=1 << 30, align=65536, progress=False)
    rp.repack(micro_checkpoint / "original", tmp_path / "direct", shard_size=1 << 30, align=65536, progress=False)
    a, b = digest(tmp_path / "again"), digest(tmp_path / "direct")
    a.pop(MANIFEST), b.pop(MANIFEST)
    assert a == b and len(a) == 2  # config.json + one shard
    rp.verify_repack(tmp_path / "again", micro_ref, progress=False)


# ---------------------------------------------------------------------------- the engine

def test_logits_bit_identical_to_source(tiny_original, tiny_repacked):
    from gptoss_stream.engine.model import Model

    tokens = np.random.default_rng(7).integers(0, 199_998, size=9).tolist()
    out = []
    for path in (tiny_original, tiny_repacked):
        ckpt = Checkpoint.open(path)
        model = Model(ckpt, max_chunk=4)
        out.append(model.forward(tokens, model.new_cache(64), all_logits=True))
        ranges = [model.experts.get(n, e).ranges for n in range(ckpt.config.num_hidden_layers)
                  for e in range(ckpt.config.num_experts)]
        assert all(len(r) == (1 if path == tiny_repacked else 6) for r in ranges)
    assert out[0].shape == (9, 201088)
    assert np.array_equal(out[0], out[1])


def test_repacked_checkpoint_api(tiny_original, tiny_repacked):
    with Checkpoint.open(tiny_original) as a, Checkpoint.open(tiny_repacked / MANIFEST) as b:
        for key in ("embedding.weight", "norm.scale", "block.3.attn.sinks", "block.2.attn.k.bias",
                    "block.1.attn.v.weight", "block.0.mlp.gate.weight"):
            assert np.array_equal(a.tensor(key), b.tensor(key)), key
            r = b.tensor_range(key)
            assert b.address(r) == b.tensor(key).ctypes.data
        assert np.array_equal(a.unembedding(), b.unembedding()) and np.array_equal(a.final_norm(), b.final_norm())
        assert b.expert_nbytes(1, 2) == 8192 and b.expert(1, 2).nbytes == 8192
        assert [x.nbytes for x in b.expert_piece_ranges(1, 2)] == [x.nbytes for x in a.expert_ranges(1, 2)]
        assert len(b.files()) == len(manifest(tiny_repacked)["shards"]) and b.nbytes() > a.nbytes()
        for bad in (lambda: b.layer(4), lambda: b.expert(0, 8), lambda: b.tensor("padding.final"),
                    lambda: b.tensor("block.0.mlp.mlp1_weight.blocks")):
            with pytest.raises(ValueError):
                bad()


# ---------------------------------------------------------------------------- interruption and resume

def test_o_direct_refused_after_a_short_write_writes_every_byte_once(micro_checkpoint, micro_ref, tmp_path,
                                                                    monkeypatch):
    """The first O_DIRECT write comes back short, the next one fails with EINVAL: the writer goes on through
    the page cache from where the short write stopped (it used to rewrite the whole buffer after it)."""
    src, dst = micro_checkpoint / "original", tmp_path / "out"
    real_write = os.write
    calls = []

    def short_then_einval(fd, data):
        if os.O_DIRECT & rp.fcntl.fcntl(fd, rp.fcntl.F_GETFL):
            calls.append(len(data))
            if len(calls) == 1:
                return real_write(fd, memoryview(data)[:4096])
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", short_then_einval)
    rp.repack(src, dst, shard_size=MICRO_SHARD, progress=False)
    monkeypatch.undo()
    assert len(calls) >= 2 and calls[0] > 4096  # (every shard tries O_DIRECT again, and falls back)
    rp.verify_repack(dst, src, progress=False)
    assert digest(dst) == digest(micro_ref)


def test_kill_9_at_many_points_then_resume_gives_identical_output(micro_checkpoint, micro_ref, tmp_path):
    src, dst = micro_checkpoint / "original", tmp_path / "out"
    shards = manifest(micro_ref)["shards"]
    sizes = [s["size"] for s in shards]
    # Bytes each run writes before it dies (each run counts from 0, and rewrites the shard cut short):
    # inside the first header; mid-shard; after the last byte of shard 0 (before its fsync and rename);
    # on the first byte of shard 1 (shard 0 done); on the first byte of shard 2.
    for kill_after, done in ((1, 0), (sizes[0] // 2, 0), (sizes[0], 0), (sizes[0] + 1, 1), (sizes[1] + 1, 2)):
        r = kill_9_after(kill_after, str(src), str(dst), "--shard-size", str(MICRO_SHARD))
        assert r.returncode == -signal.SIGKILL, r.stderr
        assert not (dst / MANIFEST).exists()  # partial output never looks complete
        assert [(dst / s["file"]).exists() for s in shards] == [i < done for i in range(len(shards))]
        with pytest.raises(ValueError, match="incomplete repack"):
            Checkpoint.open(dst)
    result = rp.repack(src, dst, shard_size=MICRO_SHARD, progress=False)
    assert result.status == "resumed" and result.bytes_written == sum(sizes[2:])  # finished shards were kept
    assert digest(dst) == digest(micro_ref)


def test_kill_at_end_of_last_shard_and_before_commit(micro_checkpoint, micro_ref, tmp_path):
    src, dst = micro_checkpoint / "original", tmp_path / "out"
    total = sum(s["size"] for s in manifest(micro_ref)["shards"])
    r = kill_9_after(total, str(src), str(dst), "--shard-size", str(MICRO_SHARD))
    assert r.returncode == -signal.SIGKILL and not (dst / MANIFEST).exists()
    assert rp.repack(src, dst, shard_size=MICRO_SHARD, progress=False).status == "resumed"
    assert digest(dst) == digest(micro_ref)
    # Killed after config.json and the last manifest update, before the rename that commits:
    os.replace(dst / MANIFEST, dst / MANIFEST_PARTIAL)
    (dst / "config.json").write_text("{truncated")
    assert rp.repack(src, dst, shard_size=MICRO_SHARD, progress=False).bytes_written == 0
    assert digest(dst) == digest(micro_ref)


def test_external_kill_9_after_first_shard_appears(tiny_original, tiny_repacked, tmp_path):
    """A real kill -9 from outside at whatever point the run has reached once its first shard exists."""
    dst, args = tmp_path / "out", ("--shard-size", str(TINY_SHARD))
    proc = run_cli(str(tiny_original), str(dst), *args, wait=False)
    deadline = time.monotonic() + 60
    while not list(dst.glob("repacked-*.safetensors")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    r = run_cli(str(tiny_original), str(dst), *args)
    assert r.returncode == 0, r.stderr
    assert digest(dst) == digest(tiny_repacked)


def test_rerun_after_completion_does_nothing_and_verifies(micro_checkpoint, micro_ref, tmp_path, capsys):
    dst = tmp_path / "out"
    shutil.copytree(micro_ref, dst)
    before = digest(dst)
    assert main(["repack", str(micro_checkpoint / "original"), str(dst), "--shard-size", str(MICRO_SHARD),
                 "--verify", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "nothing to do" in out and "OK" in out
    assert digest(dst) == before
    next(dst.glob("repacked-00003-*")).unlink()
    with pytest.raises(ValueError, match="damaged .*not found.*use --force"):
        rp.repack(micro_checkpoint / "original", dst, shard_size=MICRO_SHARD, progress=False)


def test_resume_checks_the_source_by_content(micro_checkpoint, micro_ref, tmp_path):
    """A source rewritten with the same size and mtime is not resumed from; one merely touched is."""
    src, dst = tmp_path / "src", tmp_path / "out"
    shutil.copytree(micro_checkpoint / "original", src)
    sizes = [s["size"] for s in manifest(micro_ref)["shards"]]
    weights = src / "model.safetensors"
    with Checkpoint.open(src) as ck:
        embedding = ck.tensor_range("embedding.weight")  # the first record: in shard 0
    for touched_only in (True, False):
        r = kill_9_after(sizes[0] + sizes[1] + 1, str(src), str(dst), "--shard-size", str(MICRO_SHARD))
        assert r.returncode == -signal.SIGKILL, r.stderr
        before = weights.stat()
        if touched_only:
            os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
            result = rp.repack(src, dst, shard_size=MICRO_SHARD, progress=False)
            assert result.status == "resumed" and result.bytes_written == sum(sizes[2:])
            shards = {k: v for k, v in digest(dst).items() if k != MANIFEST}  # (it names another source folder)
            assert shards == {k: v for k, v in digest(micro_ref).items() if k != MANIFEST}
            shutil.rmtree(dst)
            continue
        _flip(weights, embedding.offset + 100)
        os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = weights.stat()
        assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
        with pytest.raises(RuntimeError, match=rf"{weights}: changed since the interrupted repack began: record "
                                               rf"embedding, already copied into repacked-00001-.*--force"):
            rp.repack(src, dst, shard_size=MICRO_SHARD, progress=False)
        assert not (dst / MANIFEST).exists()
        assert rp.repack(src, dst, shard_size=MICRO_SHARD, force=True, progress=False).status == "written"
        rp.verify_repack(dst, src, progress=False)


def test_resume_with_other_options_is_refused(micro_checkpoint, tmp_path):
    src, dst = micro_checkpoint / "original", tmp_path / "out"
    r = kill_9_after(5000, str(src), str(dst), "--shard-size", str(MICRO_SHARD))
    assert r.returncode == -signal.SIGKILL
    with pytest.raises(ValueError, match="interrupted repack of another source or with other options"):
        rp.repack(src, dst, shard_size=MICRO_SHARD, align=8192, progress=False)
    assert rp.repack(src, dst, align=8192, force=True, progress=False).status == "written"
    assert not [p for p in dst.iterdir() if p.name.endswith((".partial", ".tmp"))]
    rp.verify_repack(dst, src, progress=False)


# ---------------------------------------------------------------------------- bad input

def test_existing_dst_refused_without_force(micro_checkpoint, micro_ref, tmp_path, capsys):
    src = str(micro_checkpoint / "original")
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    assert main(["repack", src, str(dst), "--quiet"]) == 1
    assert "already exists" in capsys.readouterr().err and not (dst / MANIFEST).exists()
    # a complete repack made with other options is refused as well
    assert main(["repack", src, str(micro_ref), "--quiet"]) == 1
    assert "already holds a repacked checkpoint" in capsys.readouterr().err
    # --force overwrites our files and leaves the user's alone
    assert main(["repack", src, str(dst), "--force", "--quiet"]) == 0
    assert (dst / "notes.txt").read_text() == "mine" and (dst / MANIFEST).is_file()
    # the source's own directory is never a destination
    assert main(["repack", src, src, "--force", "--quiet"]) == 1
    assert "source checkpoint's own directory" in capsys.readouterr().err


def test_cli_shows_a_bug_in_repack_with_its_traceback(micro_checkpoint, tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("an internal inconsistency")

    monkeypatch.setattr(rp, "plan", broken)
    assert main(["repack", str(micro_checkpoint / "original"), str(tmp_path / "out"), "--quiet"]) == 70
    err = capsys.readouterr().err
    assert "Traceback" in err and "an internal inconsistency" in err
    assert main(["repack", str(tmp_path / "nowhere"), str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("gptoss: error:") and "Traceback" not in err


@pytest.mark.parametrize("damage", ["truncate", "missing_tensor", "no_config"])
def test_corrupt_source_fails_before_writing(micro_checkpoint, tmp_path, damage):
    src = tmp_path / "src"
    shutil.copytree(micro_checkpoint / "original", src)
    weights = src / "model.safetensors"
    if damage == "truncate":
        os.truncate(weights, weights.stat().st_size - 100)
        match = "truncated"
    elif damage == "missing_tensor":
        raw = weights.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = raw[8:8 + n].replace(b'"block.1.attn.sinks"', b'"block.1.attn.sinkz"')
        weights.write_bytes(raw[:8] + header + raw[8 + n:])
        match = "block.1.attn.sinks"
    else:
        (src / "config.json").unlink()
        match = "config.json"
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        rp.repack(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_disk_full_is_a_clear_error_and_resumes(micro_checkpoint, micro_ref, tmp_path, monkeypatch):
    src, dst = micro_checkpoint / "original", tmp_path / "out"
    real = rp._write
    written = 0

    def fill_up(fd, data):
        nonlocal written
        if written + len(data) > 40_000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written += len(data)
        return real(fd, data)

    monkeypatch.setattr(rp, "_write", fill_up)
    with pytest.raises(RuntimeError, match=r"disk full .*re-run the same command to resume"):
        rp.repack(src, dst, shard_size=MICRO_SHARD, progress=False)
    assert not (dst / MANIFEST).exists() and not list(dst.glob("*.partial.*")) and not list(dst.glob("*.tmp"))
    assert not [p for p in dst.iterdir() if p.name.endswith(".safetensors.partial")]  # space given back
    assert 0 < len(list(dst.glob("*.safetensors"))) < len(manifest(micro_ref)["shards"])
    with pytest.raises(ValueError, match="incomplete repack"):
        Checkpoint.open(dst)
    monkeypatch.setattr(rp, "_write", real)
    assert rp.repack(src, dst, shard_size=MICRO_SHARD, progress=False).status == "resumed"
    assert digest(dst) == digest(micro_ref)


def test_disk_full_while_writing_the_manifest(micro_checkpoint, micro_ref, tmp_path, monkeypatch):
    """ENOSPC surfacing at fsync of the manifest update after the second shard: a clear error, the shard that
    was to be recorded and the temporary manifest are gone, and the same command resumes."""
    src, dst = micro_checkpoint / "original", tmp_path / "out"
    real = os.fsync
    manifests = []

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(MANIFEST_PARTIAL + rp.TMP_SUFFIX):
            manifests.append(fd)
            if len(manifests) == 3:  # the plan, shard 1 recorded, then shard 2
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(RuntimeError, match=r"disk full .*re-run the same command to resume"):
        rp.repack(src, dst, shard_size=MICRO_SHARD, progress=False)
    monkeypatch.undo()
    assert sorted(p.name for p in dst.iterdir()) == [MANIFEST_PARTIAL, manifest(micro_ref)["shards"][0]["file"]]
    with pytest.raises(ValueError, match="incomplete repack"):
        Checkpoint.open(dst)
    assert rp.repack(src, dst, shard_size=MICRO_SHARD, progress=False).status == "resumed"
    assert digest(dst) == digest(micro_ref)


def test_not_enough_space_is_refused_before_writing(micro_checkpoint, tmp_path, monkeypatch):
    class Full:
        f_bavail, f_frsize = 1, 4096

    monkeypatch.setattr(os, "statvfs", lambda path: Full())
    with pytest.raises(DiskSpaceError, match=r"needs .* more but only .* is free.*nothing written"):
        rp.repack(micro_checkpoint / "original", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", [dict(align=3000), dict(align=4), dict(shard_size=0)])
def test_bad_options(micro_checkpoint, tmp_path, bad):
    with pytest.raises(ValueError, match="--align|--shard-size"):
        rp.repack(micro_checkpoint / "original", tmp_path / "out", progress=False, **bad)


def test_parse_size():
    from gptoss_stream.streaming.budget import parse_size  # --shard-size uses the one size syntax

    assert parse_size("2G") == 2 << 30 and parse_size("500MB") == 500_000_000
    assert parse_size("16k") == 16384 and parse_size("4096") == 4096


# ---------------------------------------------------------------------------- verify and the reader's checks

def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(b"\t" if b == ord(" ") else bytes([b ^ 0x40]))  # header padding stays valid JSON


def test_verify_finds_every_kind_of_damage(micro_checkpoint, micro_ref, tmp_path):
    src = micro_checkpoint / "original"
    m = manifest(micro_ref)
    entry = m["experts"][1][2]
    shard = m["shards"][entry["shard"]]["file"]
    pad = entry["offset"] + entry["length"] - 1
    header_space = SafetensorsFile(micro_ref / shard).data_start - 1  # a space of the header padding
    cases = [(entry["offset"] + 5, "block.1.mlp.experts.2.mlp1_weight.blocks differs from the source"),
             (pad, "padding of record block.1.mlp.experts.2 is not zero"),
             (header_space, "sha256 .* differs from the manifest")]
    for offset, message in cases:
        dst = tmp_path / f"case{offset}"
        shutil.copytree(micro_ref, dst)
        _flip(dst / shard, offset)
        with pytest.raises(RuntimeError, match=message):
            rp.verify_repack(dst, src, progress=False)
    dst = tmp_path / "manifest"
    shutil.copytree(micro_ref, dst)
    m["dense"][0]["sha256"] = "0" * 64
    (dst / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(RuntimeError, match="record embedding sha256 .* differs from the manifest"):
        rp.verify_repack(dst, src, progress=False)
    rp.verify_repack(micro_ref, src, progress=False)  # and the undamaged one passes


def test_reader_rejects_broken_repacks(micro_ref, tmp_path):
    def broken(edit) -> Path:
        d = tmp_path / f"b{len(list(tmp_path.iterdir()))}"
        shutil.copytree(micro_ref, d)
        edit(d)
        return d

    m = manifest(micro_ref)
    last = micro_ref / m["shards"][-1]["file"]

    def set_manifest(**changes):
        return lambda d: (d / MANIFEST).write_text(json.dumps({**m, **changes}))

    cases = [
        (lambda d: (d / last.name).unlink(), FileNotFoundError, "not found"),
        (lambda d: os.truncate(d / last.name, last.stat().st_size - 4096), ValueError, "truncated or replaced"),
        (set_manifest(version=99), ValueError, "version 99"),
        (set_manifest(experts=m["experts"][:1]), ValueError, "\"experts\" must be 2 lists of 4"),
        (set_manifest(experts=[[row[1], *row[1:]] for row in m["experts"]]), ValueError,
         "tensor 'block.0.mlp.experts.0.mlp1_weight.blocks' is not at byte 0 of the record"),
        (lambda d: (d / MANIFEST).write_text("{"), ValueError, "not valid JSON"),
    ]
    for edit, kind, match in cases:
        with pytest.raises(kind, match=match):
            Checkpoint.open(broken(edit))
