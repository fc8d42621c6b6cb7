"""gptoss_read_bandwidth, which the benchmarks' decode limit rests on, against measurements the test makes
itself: the wall-clock time of the same pass (so the rate's bytes and seconds are right), and the pages the
pass touches (so every byte it counts is read). Plus clear errors for bad arguments.

Why not against numpy's own streaming rate: on a shared 2-core VM the ratio of the kernel's best pass to
numpy's (np.sum over per-thread slices, interleaved, best of 5) ranged 0.68-2.57 between runs, too wide to
catch a factor of 2.
"""

import mmap
import resource
import time

import numpy as np
import pytest

from gptoss_stream.engine import _lib, kernels

PAGE = mmap.PAGESIZE


@pytest.fixture
def two_threads():
    """At least two threads, so that an error in the per-thread split or byte count shows (x2 here)."""
    saved = kernels.get_num_threads()
    kernels.set_num_threads(max(2, saved))
    yield kernels.get_num_threads()
    kernels.set_num_threads(saved)


def test_read_bandwidth_agrees_with_the_wall_clock(two_threads):
    buf = np.ones(64 << 20, dtype=np.uint8)
    kernels.read_bandwidth(buf, repeats=1)  # the thread pool starts, the pages are resident
    ratios = []
    for _ in range(5):
        start = time.perf_counter()
        rate = kernels.read_bandwidth(buf, repeats=1)
        outside = buf.nbytes / (time.perf_counter() - start)
        ratios.append(rate / outside)
    # The kernel times a part of the call timed here, so its rate can only be higher, by the call's overhead
    # (measured: 1.01-1.08 for 64-128 MiB). Counting nbytes once per thread would give >= 2, counting one
    # slice <= 0.5.
    assert 0.98 < min(ratios) < 1.5, ratios


def test_read_bandwidth_reads_every_page(two_threads):
    """A fresh anonymous mapping (no huge pages) costs one minor fault per 4 KiB page on first read: a pass
    that skips part of any thread's slice faults fewer pages than the buffer has."""
    nbytes = 32 << 20
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_NOHUGEPAGE)
    buf = np.frombuffer(region, dtype=np.uint8)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    kernels.read_bandwidth(buf, repeats=1)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del buf
    region.close()
    assert faults >= nbytes // PAGE, f"{faults} minor faults for {nbytes // PAGE} pages"


def test_read_bandwidth_rejects_bad_arguments():
    buf = np.ones(8192, dtype=np.uint8)
    out = np.zeros(1, dtype=np.float64)
    with pytest.raises(_lib.KernelError, match="size"):
        _lib.call("gptoss_read_bandwidth", buf.ctypes.data, 100, 1, out.ctypes.data)
    with pytest.raises(_lib.KernelError, match="size"):
        _lib.call("gptoss_read_bandwidth", buf.ctypes.data, buf.nbytes, 0, out.ctypes.data)
    with pytest.raises(_lib.KernelError, match="NULL"):
        _lib.call("gptoss_read_bandwidth", None, buf.nbytes, 1, out.ctypes.data)
