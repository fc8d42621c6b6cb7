"""gptoss_read_bandwidth: a benchmark helper, so only its contract is testable: a finite positive rate, and
clear errors for bad arguments."""

import numpy as np
import pytest

from gptoss_stream.engine import _lib, kernels


def test_read_bandwidth_is_a_positive_rate():
    rate = kernels.read_bandwidth(np.ones(1 << 22, dtype=np.uint8), repeats=2)
    # 4 MiB read at least once: anything between a slow disk-backed page and an L2 cache is plausible.
    assert 1e7 < rate < 1e13


def test_read_bandwidth_rejects_bad_arguments():
    buf = np.ones(8192, dtype=np.uint8)
    out = np.zeros(1, dtype=np.float64)
    with pytest.raises(_lib.KernelError, match="size"):
        _lib.call("gptoss_read_bandwidth", buf.ctypes.data, 100, 1, out.ctypes.data)
    with pytest.raises(_lib.KernelError, match="size"):
        _lib.call("gptoss_read_bandwidth", buf.ctypes.data, buf.nbytes, 0, out.ctypes.data)
    with pytest.raises(_lib.KernelError, match="NULL"):
        _lib.call("gptoss_read_bandwidth", None, buf.nbytes, 1, out.ctypes.data)
