"""One safetensors file: parse and validate its header, map the file, hand out zero-copy views.

Format (https://github.com/huggingface/safetensors): 8 bytes little-endian u64 N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`, then the
data region; offsets are relative to the start of the data region (8 + N).

Opening reads only the header (a few KB); the data is mapped read-only and nothing is read until a
view is touched, so opening a 13 GB shard costs no RSS. Views are numpy arrays over the mapping
(bf16 is exposed as np.uint16: numpy has no bf16) and stay valid after close() (the mapping lives
until the last view is gone).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from gptoss_stream.errors import CheckpointError
from gptoss_stream.weights.jsonio import parse_json

# safetensors dtype name -> numpy dtype used for views (little-endian, as the format requires).
# bf16 and the fp8 flavours have no numpy type: they are exposed as same-width unsigned ints.
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "F8_E5M2": np.dtype(np.uint8),
    "F8_E4M3": np.dtype(np.uint8),
    "F8_E8M0": np.dtype(np.uint8),
    "I16": np.dtype("<i2"),
    "U16": np.dtype("<u2"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I32": np.dtype("<i4"),
    "U32": np.dtype("<u4"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "U64": np.dtype("<u8"),
}

# The order safetensors' writer sorts tensors in (wider dtype first, then by name), so our files
# are laid out exactly like ones written by `safetensors.save_file`.
DTYPE_WRITE_RANK: dict[str, int] = {
    name: rank for rank, name in enumerate(
        ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
         "F64", "I64", "U64"]
    )
}

# The safetensors reference implementation refuses headers over 100 MB; gpt-oss headers are < 100 KB, and a
# hostile 100 MB header parses into ~1 GB of Python objects, so we stop at 16 MiB (~200 MB parsed).
MAX_HEADER_BYTES = 16 * 1024 * 1024
# Real tensors have at most 4 dimensions; a bound keeps the byte count of a shape a small integer, however
# many dimensions a damaged header lists (each up to 4300 digits, what json accepts).
MAX_RANK = 16
HEADER_ALIGN = 8  # the writer pads the JSON with spaces so the data region starts 8-byte aligned


@dataclass(frozen=True)
class FileIdentity:
    dev: int
    ino: int
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str          # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int         # absolute byte offset in the file
    nbytes: int

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


def _nbytes(dtype: str, shape: Iterable[int]) -> int:
    n = DTYPES[dtype].itemsize
    for d in shape:
        n *= d
    return n


def _short(value: Any, limit: int = 80) -> str:
    """repr() cut to `limit` characters: a damaged header can hold megabytes where a shape should be."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def parse_header(raw: bytes, path: str, file_size: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate a header's JSON bytes against the file size; returns (tensors, metadata)."""
    header = parse_json(raw, f"{path}: malformed safetensors header")
    if not isinstance(header, dict):
        raise ValueError(f"{path}: malformed safetensors header: expected a JSON object")
    data_start = 8 + len(raw)
    data_size = file_size - data_start
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError(f"{path}: __metadata__ must map strings to strings")

    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        where = f"{path}: tensor {_short(name)}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: header entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ValueError(f"{where}: unknown or unsupported dtype {_short(dtype)}")
        if (not isinstance(shape, list) or len(shape) > MAX_RANK
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise ValueError(f"{where}: shape must be a list of at most {MAX_RANK} non-negative integers, "
                             f"got {_short(shape)}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise ValueError(f"{where}: data_offsets must be [begin, end], got {_short(offsets)}")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise ValueError(f"{where}: data_offsets {_short(offsets)} are not 0 <= begin <= end")
        want = _nbytes(dtype, shape)
        if end - begin != want:
            raise ValueError(f"{where}: data_offsets {_short(offsets)} span {_short(end - begin)} bytes, "
                             f"but {dtype} {_short(shape)} needs {_short(want)}")
        if end > data_size:
            raise ValueError(f"{where}: data_offsets {_short(offsets)} run past the end of the file "
                             f"(data region is {max(data_size, 0)} bytes; file truncated?)")
        tensors[name] = TensorInfo(name, dtype, tuple(shape), data_start + begin, want)

    # Overlapping tensors would alias each other's bytes: refuse instead of silently sharing.
    spans = sorted((t for t in tensors.values() if t.nbytes), key=lambda t: (t.offset, t.end))
    for prev, cur in zip(spans, spans[1:]):
        if cur.offset < prev.end:
            raise ValueError(f"{path}: tensors {_short(prev.name)} and {_short(cur.name)} overlap "
                             f"(bytes {prev.offset}..{prev.end} and {cur.offset}..{cur.end})")
    return tensors, metadata


class SafetensorsFile:
    """A read-only memory-mapped safetensors file."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.path}: safetensors file not found") from None
        with f:
            st = os.fstat(f.fileno())
            size = st.st_size
            # What check_unchanged compares with: the file as it was when we read its header and mapped it.
            self.identity = FileIdentity(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if size < 8:
                raise ValueError(f"{self.path}: only {size} bytes, too short for a safetensors header (truncated?)")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"{self.path}: header length {n} runs beyond the file ({size} bytes; truncated?)")
            if n > MAX_HEADER_BYTES:
                raise ValueError(f"{self.path}: header length {n} exceeds the {MAX_HEADER_BYTES} byte limit")
            raw = f.read(n)
            self.tensors, self.metadata = parse_header(raw, self.path, size)
            self.size = size
            self.data_start = 8 + n
            self._mmap: mmap.mmap | None = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        # One byte view pins the mapping's address for pointer arithmetic.
        self._base = np.frombuffer(self._mmap, dtype=np.uint8, count=1)
        self.base_address: int = self._base.ctypes.data

    # ------------------------------------------------------------------ access
    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise ValueError(f"{self.path}: tensor {name!r} not found") from None

    def view(self, name: str) -> np.ndarray:
        """The tensor as a read-only numpy array over the mapping (no copy, no read)."""
        t = self.info(name)
        return self.view_bytes(t.offset, t.nbytes, t.dtype, t.shape)

    def view_bytes(self, offset: int, nbytes: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        """An arbitrary typed view of bytes [offset, offset+nbytes) of the file."""
        if self._mmap is None:
            raise ValueError(f"{self.path}: file is closed")
        np_dtype = DTYPES[dtype]
        count = nbytes // np_dtype.itemsize
        if offset < 0 or offset + nbytes > self.size:
            raise ValueError(f"{self.path}: byte range {offset}..{offset + nbytes} is outside the file")
        if count == 0:
            return np.zeros(shape, dtype=np_dtype)  # frombuffer refuses empty ranges; nothing to share
        return np.frombuffer(self._mmap, dtype=np_dtype, count=count, offset=offset).reshape(shape)

    def address(self, offset: int) -> int:
        """Raw pointer to file byte `offset` inside the mapping (valid while the file is open)."""
        if self._mmap is None:
            raise ValueError(f"{self.path}: file is closed")
        return self.base_address + offset

    def advise_random(self, offset: int, nbytes: int) -> bool:
        """madvise(MADV_RANDOM) on the mapped pages of file bytes [offset, offset + nbytes): a fault there reads
        its page, not the file's readahead window around it. Whole pages, so a neighbour sharing a page at
        either end loses readahead too. False where the platform lacks it or the call fails (it is advice)."""
        if self._mmap is None or not hasattr(mmap, "MADV_RANDOM"):
            return False
        first = offset - offset % mmap.PAGESIZE  # the mapping starts at file offset 0
        try:
            self._mmap.madvise(mmap.MADV_RANDOM, first, offset + nbytes - first)
        except (OSError, ValueError):
            return False
        return True

    def check_unchanged(self) -> None:
        """CheckpointError if the file was deleted, replaced, resized or modified since it was opened.

        A mapped file that shrinks turns the next access past its new end into SIGBUS, which kills the
        process; one rewritten in place changes the weights under a running model. A stat() costs a few us: the
        engine calls this before every forward pass (model.Model.forward)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: deleted while the model was running; restart with an "
                                  f"unchanging checkpoint") from None
        was = self.identity
        if (st.st_dev, st.st_ino) != (was.dev, was.ino):
            what = "replaced by another file"
        elif st.st_size != was.size:
            what = f"resized from {was.size} to {st.st_size} bytes"
        elif st.st_mtime_ns != was.mtime_ns:
            what = "modified"
        else:
            return
        raise CheckpointError(f"{self.path}: {what} while the model was running; the checkpoint's files must not "
                              f"change under a running gptoss (restart it once they are complete)")

    def header_summary(self) -> dict[str, Any]:
        return {name: (t.dtype, t.shape) for name, t in self.tensors.items()}

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        if self._mmap is None:
            return
        mm, self._mmap = self._mmap, None
        self._base = None
        try:
            mm.close()
        except BufferError:
            # Views handed out earlier still reference the mapping; it is unmapped when the last one dies.
            pass

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsFile({self.path!r}, {len(self.tensors)} tensors, {self.size} bytes)"


def write_header(f, entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None) -> list[int]:
    """Write the 8-byte length + JSON header for tensors laid out back to back in `entries` order.

    Returns each tensor's absolute file offset. The caller then writes the tensor bytes in the
    same order. The JSON is space-padded to 8 bytes like the reference writer.
    """
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    pos = 0
    rel: list[int] = []
    for name, dtype, shape in entries:
        nbytes = _nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        rel.append(pos)
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % HEADER_ALIGN)
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    start = 8 + len(raw)
    return [start + r for r in rel]


def write_order(entries: Iterable[tuple[str, str, tuple[int, ...]]]) -> list[tuple[str, str, tuple[int, ...]]]:
    """Sort (name, dtype, shape) like safetensors' writer: wider dtypes first, then by name."""
    return sorted(entries, key=lambda e: (-DTYPE_WRITE_RANK[e[1]], e[0]))


def tensor_nbytes(dtype: str, shape: Iterable[int]) -> int:
    return _nbytes(dtype, shape)
