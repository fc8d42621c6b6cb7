"""The one place that loads libgptoss and declares its C functions (ctypes lives here and nowhere else).

Pointers cross the boundary as plain integers (numpy's `arr.ctypes.data`), so callers never touch ctypes.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import site
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parents[1]  # the gptoss_stream package folder (this file is engine/_lib.py)
_LIB_NAME = "libgptoss.so"

GPTOSS_OK = 0
DTYPE_BF16 = 0
DTYPE_F32 = 1
ISA_SCALAR, ISA_AVX2, ISA_AVX512 = 0, 1, 2
ISA_NAMES = {ISA_SCALAR: "scalar", ISA_AVX2: "avx2", ISA_AVX512: "avx512"}


class KernelError(RuntimeError):
    """A libgptoss function returned an error status."""

    def __init__(self, function: str, status: int, message: str, context: str = ""):
        path = ISA_NAMES.get(lib.gptoss_get_isa(), "unknown")
        where = f" ({context})" if context else ""
        super().__init__(
            f"{function} failed on the {path} compute path{where}: {message} (status {status}). "
            "Please report it with the output of `gptoss info`; GPTOSS_ISA=avx2 or GPTOSS_ISA=scalar runs "
            "the more portable paths meanwhile.")
        self.function = function
        self.status = status
        self.context = context


def _preload_onednn() -> None:
    # libdnnl.so.3 comes from the onednn-cpu-gomp wheel, which puts it in <prefix>/lib of whichever
    # environment pip installed into. RPATH covers the usual venv layout; loading it here by absolute path
    # also covers --user installs and unusual prefixes, and gives a clear error when it is missing.
    prefixes = [sys.prefix, sys.base_prefix, site.getuserbase(), sys.exec_prefix]
    for prefix in dict.fromkeys(prefixes):
        candidate = Path(prefix) / "lib" / "libdnnl.so.3"
        if candidate.exists():
            ctypes.CDLL(str(candidate), mode=ctypes.RTLD_GLOBAL)
            return
    # Not found next to Python: let the dynamic loader try (LD_LIBRARY_PATH, system oneDNN).


def _find_library() -> Path:
    env = os.environ.get("GPTOSS_LIB")
    candidates = [Path(env)] if env else []
    # Installed wheel: in the package folder (CMakeLists installs it there). Developer build: `cmake -S . -B build` in the source tree.
    candidates += [_HERE / _LIB_NAME, _HERE.parent / "build" / _LIB_NAME]
    # Running from a source checkout (e.g. the tests) with the package also pip-installed: use the
    # library that the install compiled.
    try:
        installed = importlib.metadata.distribution("gptoss-stream").locate_file(f"gptoss_stream/{_LIB_NAME}")
        candidates.append(Path(str(installed)))
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.exists():
            return path
    raise RuntimeError(
        f"cannot find {_LIB_NAME} (looked in: {', '.join(str(p) for p in candidates)}). "
        "Install the package with `pip install .` (it compiles libgptoss), or build it with "
        "`cmake -S . -B build && cmake --build build`, or point GPTOSS_LIB at the library."
    )


def _load() -> ctypes.CDLL:
    _preload_onednn()
    path = _find_library()
    try:
        return ctypes.CDLL(str(path))
    except OSError as e:
        raise RuntimeError(f"cannot load {path}: {e}. Is the onednn-cpu-gomp==2023.2.0 wheel installed?") from e


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
GLIBC_DEFAULT_MMAP_THRESHOLD = 128 * 1024


def _pin_mmap_threshold() -> None:
    """glibc raises its mmap threshold each time a large block is freed (up to 32 MiB); blocks of that size
    then come from the heap, and freed ones stay in it. Over a long run RssAnon crept up by 3-4 MiB on the
    tiny model (+16% over 1,000 decode steps, with the memory of live Python and numpy objects flat:
    tools/bench_leak.py), and a KV cache allocated after another was freed is zeroed at once instead of page
    by page as it fills. Setting the threshold (to glibc's own default) turns the adjustment off: blocks of
    128 KiB and more are always mapped, and given back when freed. A user's MALLOC_MMAP_THRESHOLD_ wins."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, GLIBC_DEFAULT_MMAP_THRESHOLD)
    except (OSError, AttributeError):
        pass  # not glibc (musl has no such threshold): nothing to pin


lib = _load()
_pin_mmap_threshold()


class AttentionWeights(ctypes.Structure):
    """struct gptoss_attention_weights: pointers (ints, None for absent) into the mapped checkpoint."""

    _fields_ = [(name, ctypes.c_void_p) for name in (
        "norm", "qkv_weight", "qkv_bias", "q_weight", "q_bias", "k_weight", "k_bias", "v_weight", "v_bias",
        "sinks", "out_weight", "out_bias", "qkv_q8", "qkv_scales", "out_q8", "out_scales")]


_p = ctypes.c_void_p
_sz = ctypes.c_size_t
_i = ctypes.c_int
_f = ctypes.c_float

# name -> (argument types, return type); every public function of libgptoss/gptoss.h.
_SIGNATURES: dict[str, tuple[list, object]] = {
    "gptoss_status_string": ([_i], ctypes.c_char_p),
    "gptoss_set_num_threads": ([_i], _i),
    "gptoss_get_num_threads": ([], _i),
    "gptoss_detect_isa": ([], _i),
    "gptoss_get_isa": ([], _i),
    "gptoss_set_isa": ([_i], _i),
    "gptoss_cpu_isa": ([], _i),
    "gptoss_onednn_info": ([_p, _p, _p, _p], _i),
    "gptoss_bf16_to_f32": ([_p, _p, _sz], _i),
    "gptoss_f32_to_bf16": ([_p, _p, _sz], _i),
    "gptoss_dequantize_mxfp4_rows": ([_p, _p, _sz, _sz, _sz, _sz, _p], _i),
    "gptoss_matmul_bf16": ([_p, _sz, _sz, _sz, _p, _sz, _p, _p, _sz, _i], _i),
    "gptoss_matmul_f32": ([_p, _sz, _sz, _sz, _p, _sz, _p, _sz], _i),
    "gptoss_matmul_mxfp4": ([_p, _sz, _sz, _p, _p, _sz, _p, _p, _sz, _p, _sz, _sz], _i),
    "gptoss_quantize_q8_rows": ([_p, _sz, _sz, _p, _p], _i),
    "gptoss_dequantize_q8_rows": ([_p, _p, _sz, _sz, _p, _sz, _p], _i),
    "gptoss_matmul_q8": ([_p, _sz, _sz, _sz, _p, _p, _sz, _p, _p, _sz, _i], _i),
    "gptoss_matmul_cache_size": ([], _sz),
    "gptoss_matmul_cache_clear": ([], None),
    "gptoss_rmsnorm": ([_p, _p, _sz, _sz, _f, _p], _i),
    "gptoss_add_bf16": ([_p, _p, _sz], _i),
    "gptoss_swiglu": ([_p, _sz, _sz, _f, _f, _p], _i),
    "gptoss_topk_softmax": ([_p, _sz, _sz, _sz, _p, _p], _i),
    "gptoss_scatter_add_weighted": ([_p, _sz, _sz, _p, _sz, _p, _p], _i),
    "gptoss_add_f32_to_bf16": ([_p, _p, _sz], _i),
    "gptoss_rope_init": ([_sz, _f, _f, _f, _f, _sz, _p, _p], _i),
    "gptoss_rope_apply": ([_p, _sz, _sz, _sz, _sz, _p, _p, _f], _i),
    "gptoss_attention": ([_p, _sz, _sz, _sz, _sz, _sz, _p, _p, _sz, _sz, _sz, _p, _f, _p], _i),
    "gptoss_kv_store": ([_p, _p, _sz, _sz, _sz, _sz, _p, _p, _sz, _sz], _i),
    "gptoss_attention_block_scratch_elems": ([_sz, _sz, _sz, _sz, _sz], _sz),
    "gptoss_attention_block": ([_p, _sz, _sz, _sz, _sz, _sz, _p, _f, _p, _f, _f, _p, _p, _sz, _sz, _sz, _p, _sz],
                               _i),
    "gptoss_moe_route": ([_p, _sz, _sz, _p, _f, _p, _p, _sz, _sz, _p, _p, _p, _p], _i),
    "gptoss_expert_mlp_scratch_elems": ([_sz, _sz, _sz], _sz),
    "gptoss_expert_mlp": ([_p, _sz, _sz, _sz, _p, _p, _sz, ctypes.c_int32, _p, _p, _p, _p, _p, _p, _f, _f, _p, _p,
                           _sz, _p, _sz], _i),
    "gptoss_mincore": ([_p, _sz, _p], _i),
    "gptoss_guard_mapping": ([_p, _sz, ctypes.c_char_p, _p], _i),
    "gptoss_unguard_mapping": ([_i], _i),
    "gptoss_read_bandwidth": ([_p, _sz, _i, _p], _i),
}

for _name, (_argtypes, _restype) in _SIGNATURES.items():
    _fn = getattr(lib, _name)
    _fn.argtypes = _argtypes
    _fn.restype = _restype


def status_string(status: int) -> str:
    return lib.gptoss_status_string(status).decode()


def call(name: str, *args, context: str = "") -> None:
    """Call a status-returning libgptoss function; raise KernelError naming it (and `context`, e.g. the
    shapes) if it fails."""
    status = getattr(lib, name)(*args)
    if status != GPTOSS_OK:
        raise KernelError(name, status, status_string(status), context)


def attention_weights(**pointers: int | None) -> tuple[AttentionWeights, int]:
    """A struct gptoss_attention_weights of these pointers, and its address to pass to the library (the
    caller keeps the struct, and the arrays it points into, alive while it uses the address)."""
    struct = AttentionWeights(**pointers)
    return struct, ctypes.addressof(struct)


def call_value(name: str, *args):
    """Call a libgptoss function that returns a value rather than a status."""
    return getattr(lib, name)(*args)


def onednn_info() -> tuple[int, int, int, int]:
    """(major, minor, patch, ISA code) of the oneDNN that libgptoss loaded."""
    major, minor, patch, isa = (ctypes.c_int() for _ in range(4))
    call("gptoss_onednn_info", ctypes.byref(major), ctypes.byref(minor), ctypes.byref(patch), ctypes.byref(isa))
    return major.value, minor.value, patch.value, isa.value
