"""Faults while a model runs: its checkpoint changes under it, a mapped file shrinks (SIGBUS), a read fails
on the background I/O thread. Each ends in a clear error naming the file, never a crash without a word or a
hang. The cases that could crash the process run in a child.
"""

from __future__ import annotations

import errno
import gc
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from gptoss_stream.errors import CheckpointError
from gptoss_stream.weights.checkpoint import Checkpoint

ROOT = Path(__file__).resolve().parents[1]


def run_child(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture
def ck_dir(micro_checkpoint, tmp_path) -> Path:
    return Path(shutil.copytree(micro_checkpoint / "original", tmp_path / "ck"))


def _model(path: Path):
    from gptoss_stream.engine.model import Model

    model = Model(Checkpoint.open(path))
    cache = model.new_cache(64)
    model.forward([1, 2, 3], cache)
    return model, cache


def _modify(weights: Path) -> None:
    with open(weights, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        b = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([b[0] ^ 1]))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # (some file systems keep coarse mtimes)


def _replace(weights: Path) -> None:
    tmp = weights.with_suffix(".new")
    shutil.copyfile(weights, tmp)
    os.replace(tmp, weights)


@pytest.mark.parametrize("change, message", [
    (_modify, "modified"), (_replace, "replaced by another file"), (Path.unlink, "deleted"),
])
def test_forward_stops_when_a_checkpoint_file_changes(ck_dir, change, message):
    model, cache = _model(ck_dir)
    with model:
        weights = ck_dir / "model.safetensors"
        change(weights)
        with pytest.raises(CheckpointError, match=rf"{weights}: {message} while the model was running"):
            model.forward([4], cache)


_SHRINK = """
import os, sys
from gptoss_stream.engine.model import Model
from gptoss_stream.errors import CheckpointError
from gptoss_stream.weights.checkpoint import Checkpoint

path, mode = sys.argv[1], sys.argv[2]
model = Model(Checkpoint.open(path))
cache = model.new_cache(64)
model.forward([1, 2, 3], cache)
weights = os.path.join(path, "model.safetensors")
os.truncate(weights, 4096)  # inside the header: every weight of the mapping is gone
if mode == "check":
    try:
        model.forward([4], cache)
    except CheckpointError as e:
        print("caught:", e)
        sys.exit(0)
    sys.exit("no error")
# The file shrinks during a forward pass, after the check: the next access to the mapping faults.
model.checkpoint.check_unchanged = lambda: None
model.forward([4], cache)
print("survived")
"""


def test_a_file_shrunk_between_passes_is_an_error_not_sigbus(ck_dir):
    r = run_child(_SHRINK, str(ck_dir), "check")
    assert r.returncode == 0, r.stderr
    assert f"caught: {ck_dir / 'model.safetensors'}: resized from " in r.stdout and "to 4096 bytes" in r.stdout


def test_sigbus_in_a_mapped_file_names_the_file(ck_dir):
    """What the check cannot catch (a truncation during a pass) still ends with one line naming the file."""
    r = run_child(_SHRINK, str(ck_dir), "sigbus")
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert r.stderr.startswith(f"gptoss: error: {ck_dir / 'model.safetensors'}: reading byte "), r.stderr
    assert "(SIGBUS): it was truncated while gptoss was running, or the disk could not read it" in r.stderr
    assert "survived" not in r.stdout


def test_sigbus_elsewhere_still_crashes_as_before(ck_dir):
    """The guard claims only the checkpoint's mappings: a SIGBUS in another mapped file keeps its default."""
    r = run_child("""
        import mmap, os, sys
        from gptoss_stream.engine.model import Model
        from gptoss_stream.weights.checkpoint import Checkpoint
        model = Model(Checkpoint.open(sys.argv[1]))   # installs the handler
        other = sys.argv[1] + "/other.bin"
        with open(other, "wb") as f:
            f.write(bytes(8192))
        with open(other, "rb") as f:
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        os.truncate(other, 0)
        print(m[5000])
    """, str(ck_dir))
    assert r.returncode == -7, (r.returncode, r.stderr)  # SIGBUS
    assert "gptoss: error" not in r.stderr


def test_guards_are_released_with_the_model(ck_dir):
    from gptoss_stream.engine import kernels

    # More models than the guard table has slots: each close gives its slot back (else the guard would stop).
    for _ in range(1100):
        slot = kernels.guard_mapping(4096, 4096, "x")
        assert slot is not None
        kernels.unguard_mapping(slot)
    gc.collect()
    gc.disable()  # no other test's model may give its slot back while the table is full
    taken = []
    try:
        model, _ = _model(ck_dir)
        slots = list(model._unguard.peek()[2][0])
        assert len(slots) == 1
        while (slot := kernels.guard_mapping(4096, 4096, "x")) is not None:  # every other slot
            taken.append(slot)
        model.close()
        assert kernels.guard_mapping(4096, 4096, "x") == slots[0]  # the model's slot, and only it, is free again
        taken.append(slots[0])
        assert kernels.guard_mapping(4096, 4096, "x") is None
    finally:
        for slot in taken:
            kernels.unguard_mapping(slot)
        gc.enable()


def test_io_error_on_the_reader_thread_reaches_the_forward_pass(tiny_original, monkeypatch):
    """EIO from the disk on the background I/O thread: the forward pass raises ReadError naming the file and
    the offset, within a deadline (never a hang)."""
    from gptoss_stream.engine.model import Model
    from gptoss_stream.streaming import reader
    from gptoss_stream.streaming.expert_cache import StreamingExpertStore

    ck = Checkpoint.open(tiny_original)
    weights = ck.files()[0]
    model = Model(ck, expert_store=StreamingExpertStore(ck, slots=4))
    cache = model.new_cache(64)
    real = os.preadv
    target = os.stat(weights)

    def failing_preadv(fd, buffers, offset):
        if os.fstat(fd).st_ino == target.st_ino and threading.current_thread().name.startswith("gptoss-io"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", failing_preadv)
    box: dict = {}

    def run():
        try:
            model.forward([1, 2, 3], cache)
        except BaseException as e:  # examined below
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "the forward pass hung after a read error"
    e = box.get("error")
    assert isinstance(e, reader.ReadError), e
    assert str(e).startswith(f"{weights}: read of ") and " at offset " in str(e) and "Input/output error" in str(e)
    monkeypatch.undo()
    model.close()
