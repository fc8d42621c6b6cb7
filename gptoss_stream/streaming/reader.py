"""Reading byte ranges of the checkpoint into our own buffers: few large preads, O_DIRECT where possible.

Why not page faults on the mapping: a fault reads one readahead window at a time (synchronously, ~0.5 GB/s
measured on this machine class, and the window can spill far past the expert), while one pread per piece
hands the whole piece to the block layer at once (13 MiB O_DIRECT reads: ~2 GB/s). O_DIRECT also keeps
expert bytes out of the page cache: in a memory cgroup the page cache is charged to the limit, and the
dense bf16 weights that every token needs must be the pages that stay cached. docs/streaming.md has the
measurements (tools/bench_stream.py --mode read).

An expert is a *record*: a list of byte ranges (6 pieces in the original/HF layouts, one contiguous range
in a repacked layout). `plan_record` widens each range to page boundaries, merges ranges whose pages
touch, and lays the merged reads out back to back in one page-aligned buffer; `FileReader.read_record`
fills such a buffer. os.preadv releases the GIL and writes straight into the numpy buffer, so a read on
the I/O thread overlaps the kernels running on the main thread.

`IOThread` runs read jobs in the background: demand reads before prefetches, a queued prefetch can be
promoted or cancelled, and a failed read is handed to whoever waits for it as a ReadError naming the file
and offset (never a hang, never a half-filled buffer used as weights).
"""

from __future__ import annotations

import dataclasses
import errno
import heapq
import itertools
import mmap
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from gptoss_stream.errors import UserError
from gptoss_stream.weights.fileio import pread_into
from gptoss_stream.weights.layouts.base import TensorRange

# O_DIRECT needs file offset, length and buffer address aligned to the device's logical block size
# (512 B here, 4 KiB on some disks); the page size satisfies every device.
ALIGN = 4096


class ReadError(UserError, RuntimeError):
    """A checkpoint read failed or came back short (file truncated or replaced under a running process)."""


# ---------------------------------------------------------------------------- record layout


@dataclass(frozen=True)
class Extent:
    """One read: aligned bytes [file_offset, file_offset + nbytes) of path land at buffer_offset."""

    path: str
    file_offset: int
    nbytes: int
    buffer_offset: int
    needed_end: int  # file offset of the last byte a piece needs, +1: bytes past it may lie beyond EOF


@dataclass(frozen=True)
class RecordLayout:
    """How to read one record into one buffer, and where each requested range ends up in it."""

    extents: tuple[Extent, ...]
    piece_offsets: tuple[int, ...]  # buffer offset of each requested range, in request order
    nbytes: int                     # buffer size (a multiple of ALIGN)

    @property
    def read_bytes(self) -> int:
        return sum(e.nbytes for e in self.extents)


def _align_down(n: int, align: int) -> int:
    return n - n % align


def _align_up(n: int, align: int) -> int:
    return -(-n // align) * align


def plan_record(ranges: Sequence[TensorRange], align: int = ALIGN) -> RecordLayout:
    """Coalesce ranges (same file, page spans touching or overlapping) into aligned reads into one buffer."""
    if not ranges:
        raise ValueError("a record needs at least one byte range")
    order = sorted(range(len(ranges)), key=lambda i: (ranges[i].path, ranges[i].offset))
    runs: list[list[int]] = []  # [path index into order..., ] grouped
    spans: list[tuple[str, int, int, int]] = []  # (path, aligned start, aligned end, needed end)
    for i in order:
        r = ranges[i]
        if r.nbytes <= 0 or r.offset < 0:
            raise ValueError(f"{r.path}: bad byte range offset={r.offset} nbytes={r.nbytes}")
        start, end = _align_down(r.offset, align), _align_up(r.offset + r.nbytes, align)
        if spans and spans[-1][0] == r.path and start <= spans[-1][2]:
            path, s0, e0, n0 = spans[-1]
            spans[-1] = (path, s0, max(e0, end), max(n0, r.offset + r.nbytes))
            runs[-1].append(i)
        else:
            spans.append((r.path, start, end, r.offset + r.nbytes))
            runs.append([i])
    extents: list[Extent] = []
    piece_offsets = [0] * len(ranges)
    at = 0
    for (path, start, end, needed), members in zip(spans, runs):
        extents.append(Extent(path, start, end - start, at, needed))
        for i in members:
            piece_offsets[i] = at + ranges[i].offset - start
        at += end - start
    return RecordLayout(tuple(extents), tuple(piece_offsets), at)


def aligned_buffer(nbytes: int, huge_pages: bool = False) -> np.ndarray:
    """A zero-initialised, page-aligned uint8 buffer (private anonymous mapping: pages cost RAM once written,
    and count as RssAnon; mmap's default for fd -1 would be shared memory).

    huge_pages asks for transparent huge pages (MADV_HUGEPAGE): an O_DIRECT read into 2 MiB pages goes to
    the disk as a few large requests instead of one segment per 4 KiB page; measured +25-30% read
    throughput for 13 MB expert records (1.5-1.6 -> 1.9-2.0 GB/s, docs/streaming.md).
    """
    m = mmap.mmap(-1, max(_align_up(nbytes, mmap.PAGESIZE), mmap.PAGESIZE),
                  flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge_pages and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            m.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass  # THP disabled: 4 KiB pages work, just slower
    return np.frombuffer(m, dtype=np.uint8, count=nbytes)


def unmap(mapping: memoryview) -> bool:
    """Unmap an aligned_buffer now: pass its `.base` in a local variable after dropping every reference to
    the array. False if some numpy view of it is still alive (it is then unmapped with the last one).

    numpy's views keep a reference to this memoryview but no buffer export, so releasing it under a live
    view would let the mapping go under that view: its reference count is the only safe witness."""
    if sys.getrefcount(mapping) > 3:  # the caller's variable, this argument, getrefcount's own
        return False
    owner = mapping.obj
    mapping.release()
    owner.close()
    return True


# ---------------------------------------------------------------------------- synchronous reads


@dataclass
class ReadCounters:
    reads: int = 0          # pread calls
    bytes: int = 0          # bytes transferred from the files
    seconds: float = 0.0    # wall time inside pread


class FileReader:
    """Open-once file descriptors and the pread loop (O_DIRECT when the file system supports it)."""

    def __init__(self, direct: bool | None = None):
        """direct: True = require O_DIRECT, False = buffered reads, None = O_DIRECT if it works, else buffered."""
        self.direct_wanted = direct
        self._fds: dict[str, tuple[int, bool, int]] = {}  # path -> (fd, is_direct, size at open)
        self._retired: list[int] = []  # O_DIRECT fds replaced by buffered ones, closed with the reader
        self._lock = threading.Lock()
        self.counters = ReadCounters()

    def _open(self, path: str) -> tuple[int, bool, int]:
        with self._lock:
            if path in self._fds:
                return self._fds[path]
            fd, direct = -1, False
            if self.direct_wanted is not False and hasattr(os, "O_DIRECT"):
                try:
                    fd, direct = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC), True
                except OSError as e:
                    if self.direct_wanted:
                        raise ReadError(f"{path}: cannot open with O_DIRECT ({e.strerror})") from None
            if fd < 0:
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as e:
                    raise ReadError(f"{path}: cannot open ({e.strerror})") from None
            size = os.fstat(fd).st_size
            self._fds[path] = (fd, direct, size)
            return self._fds[path]

    def is_direct(self, path: str) -> bool:
        return self._open(path)[1]

    def read_extent(self, extent: Extent, buffer: np.ndarray) -> None:
        """Fill buffer[extent.buffer_offset:+nbytes] from the file; ReadError if the needed bytes are not there."""
        fd, direct, _ = self._open(extent.path)
        need = extent.needed_end - extent.file_offset  # the bytes past `need` may legitimately lie past EOF
        view = memoryview(buffer)[extent.buffer_offset:extent.buffer_offset + extent.nbytes]
        got = calls = 0
        started = time.perf_counter()
        try:
            while True:
                try:
                    got, calls = pread_into(fd, view, extent.file_offset, need, ALIGN if direct else 1)
                    break
                except OSError as e:
                    if not (direct and e.errno == errno.EINVAL):
                        raise ReadError(f"{extent.path}: read of {need} bytes at offset {extent.file_offset} "
                                        f"failed: {e.strerror}") from None
                    # EINVAL: this file system refuses O_DIRECT after all (or not for this buffer): read the
                    # extent again with buffered reads, and use them for this file from now on.
                    fd, direct = self._reopen_buffered(extent.path)
            if got < need:
                size = os.fstat(fd).st_size
                raise ReadError(f"{extent.path}: unexpected end of file at offset {extent.file_offset + got} "
                                f"while reading bytes {extent.file_offset}..{extent.needed_end} "
                                f"(file is {size} bytes; truncated or replaced while running?)")
        finally:
            with self._lock:  # shared by the I/O threads, read by --stats
                self.counters.reads += calls
                self.counters.bytes += got
                self.counters.seconds += time.perf_counter() - started
        if direct:
            return
        # Buffered fallback: drop what we just read from the page cache, so expert bytes do not push the
        # dense weights out (same effect as O_DIRECT, one step later).
        try:
            os.posix_fadvise(fd, extent.file_offset, extent.nbytes, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass

    def _reopen_buffered(self, path: str) -> tuple[int, bool]:
        """Switch path to a buffered fd (once, whichever I/O thread asks first); returns (fd, direct).

        The O_DIRECT fd is retired, not closed: another I/O thread may be inside a pread on it (closing it
        could even hand its number to the next open). Retired fds are closed with the reader."""
        with self._lock:
            fd, direct, size = self._fds[path]
            if direct:
                self._retired.append(fd)
                fd, direct = os.open(path, os.O_RDONLY | os.O_CLOEXEC), False
                self._fds[path] = (fd, direct, size)
            return fd, direct

    def read_record(self, layout: RecordLayout, buffer: np.ndarray) -> None:
        if buffer.nbytes < layout.nbytes:
            raise ValueError(f"buffer of {buffer.nbytes} bytes is too small for a {layout.nbytes}-byte record")
        for extent in layout.extents:
            self.read_extent(extent, buffer)

    def check_sizes(self) -> None:
        """ReadError if a file shrank since it was opened (the mapped dense weights would fault with SIGBUS)."""
        with self._lock:
            for path, (fd, _, size) in self._fds.items():
                now = os.fstat(fd).st_size
                if now < size:
                    raise ReadError(f"{path}: file shrank from {size} to {now} bytes while the model was running")

    def counters_copy(self) -> ReadCounters:
        """A consistent copy of the counters (the I/O threads update them under the lock)."""
        with self._lock:
            return dataclasses.replace(self.counters)

    def close(self) -> None:
        with self._lock:
            for fd in [fd for fd, _, _ in self._fds.values()] + self._retired:
                os.close(fd)
            self._fds.clear()
            self._retired.clear()


class PageCacheFill:
    """Asks the kernel to read ranges into the page cache (posix_fadvise WILLNEED) on a background thread.

    Used for the dense weights: the first token needs all of them, and large asynchronous readahead fills
    the cache several times faster than the page faults of the first matmuls. Only a hint: errors are
    ignored (the page faults read whatever it did not). `close()` stops it between ranges and joins it."""

    def __init__(self, ranges: Sequence[TensorRange]):
        self._ranges = list(ranges)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="gptoss-prefault", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        fds: dict[str, int] = {}
        try:
            for r in self._ranges:
                if self._stop.is_set():
                    return
                if r.path not in fds:
                    fds[r.path] = os.open(r.path, os.O_RDONLY | os.O_CLOEXEC)
                os.posix_fadvise(fds[r.path], r.offset, r.nbytes, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            for fd in fds.values():
                os.close(fd)

    def close(self) -> None:
        self._stop.set()
        self.thread.join()


# ---------------------------------------------------------------------------- background reads

DEMAND, PREFETCH = 0, 1  # job priorities: lower runs first
QUEUED, RUNNING, FINISHED, CANCELLED = "queued", "running", "finished", "cancelled"


@dataclass(eq=False)
class ReadJob:
    """Read one record into one buffer; `done` runs on the I/O thread with the error (None on success)."""

    layout: RecordLayout
    buffer: np.ndarray
    done: Callable[["ReadJob", BaseException | None], None]
    priority: int = DEMAND
    state: str = "queued"  # QUEUED -> RUNNING -> FINISHED, or QUEUED -> CANCELLED (owned by IOThread)
    tag: object = None
    seconds: float = field(default=0.0)


class IOThread:
    """Background readers: a priority queue of ReadJobs (demand before prefetch, FIFO within a priority)
    served by `workers` threads (one by default: each pread of a multi-MiB extent is already split by the
    block layer into several requests in flight, and the consumer waits for one record at a time).
    """

    def __init__(self, reader: FileReader, name: str = "gptoss-io", workers: int = 1):
        if workers < 1:
            raise ValueError(f"need at least one I/O thread, got {workers}")
        self.reader = reader
        self._heap: list[tuple[int, int, ReadJob]] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self.busy_seconds = 0.0
        self.error: BaseException | None = None  # what stopped a thread (a completion callback raised)
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, job: ReadJob) -> None:
        with self._cv:
            if self._closed:
                raise RuntimeError("I/O thread is closed")
            job.state = QUEUED
            heapq.heappush(self._heap, (job.priority, next(self._seq), job))
            self._cv.notify()

    def promote(self, job: ReadJob) -> None:
        """A queued prefetch became a demand: move it ahead of the other prefetches."""
        with self._cv:
            if job.state == QUEUED and job.priority != DEMAND:
                job.priority = DEMAND
                heapq.heappush(self._heap, (DEMAND, next(self._seq), job))  # the old heap entry goes stale
                self._cv.notify()

    def cancel(self, job: ReadJob) -> bool:
        """Cancel a job that has not started; True if it will never run."""
        with self._cv:
            if job.state == QUEUED:
                job.state = CANCELLED
                return True
            return False

    @property
    def alive(self) -> bool:
        return self.error is None and all(t.is_alive() for t in self._threads)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._heap and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                priority, _, job = heapq.heappop(self._heap)
                if job.state != QUEUED or priority != job.priority:
                    continue  # cancelled, or a stale entry of a promoted job
                job.state = RUNNING
            started = time.perf_counter()
            error: BaseException | None = None
            try:
                self.reader.read_record(job.layout, job.buffer)
            except BaseException as e:  # forwarded to the consumer; the thread keeps serving
                error = e
            job.seconds = time.perf_counter() - started
            with self._cv:
                self.busy_seconds += job.seconds
                job.state = FINISHED
            try:
                job.done(job, error)
            except BaseException as e:
                # A bug in the callback: keep it for the consumer (`alive` turns False, and the store raises
                # it), and let this thread die with its traceback instead of serving on in a broken state.
                with self._cv:
                    if self.error is None:
                        self.error = e
                raise

    def close(self) -> None:
        """Stop after the running jobs; jobs still queued complete with an error so nobody waits forever.
        Idempotent."""
        with self._cv:
            self._closed = True
            dropped = [job for _, _, job in self._heap if job.state == QUEUED]
            for job in dropped:
                job.state = CANCELLED
            self._heap.clear()
            self._cv.notify_all()
        for job in dropped:
            job.done(job, ReadError("the expert reader was closed before this read ran"))
        # No timeout: a read still running uses its fd and buffer, which the owner frees right after this.
        for t in self._threads:
            t.join()
