"""Which compute path libgptoss runs on this machine, and why.

libgptoss chooses at start-up (libgptoss/runtime.c): the best path both the CPU (CPUID) and oneDNN (its
dispatch, which `ONEDNN_MAX_CPU_ISA` can lower) support. `GPTOSS_ISA=avx512|avx2|scalar` forces a lower one
for the whole process; this module applies it when the kernels are first imported and turns a request the
machine cannot honour into an error that names the missing CPU feature.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

from gptoss_stream.engine import _lib
from gptoss_stream.errors import SetupError

PATH_NAMES = ("scalar", "avx2", "avx512")

DESCRIPTIONS = {
    "avx512": "AVX-512 BF16: bf16 matmuls in oneDNN (hardware bf16 dot products)",
    "avx2": "AVX2+FMA: fp32 matmuls (weights widened in registers for decode, in L2 tiles for oneDNN's fp32 "
            "GEMM in prefill)",
    "scalar": "plain x86-64: fp32 matmuls with portable C kernels (slow, correct)",
}

# CPU flags (as /proc/cpuinfo names them) each path needs; runtime.c's CPUID checks, in the kernel's names.
REQUIRED_CPU_FLAGS = {
    "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512_bf16"),
    "avx2": ("avx2", "fma", "f16c"),
    "scalar": (),
}

# The flags a bug report needs, in order.
REPORTED_CPU_FLAGS = ("sse4_1", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                      "avx512_bf16", "amx_bf16", "avx_vnni")

# dnnl_cpu_isa_t values (oneapi/dnnl/dnnl_types.h) -> ONEDNN_MAX_CPU_ISA names.
ONEDNN_ISA_NAMES = {
    0x0: "default", 0x1: "SSE41", 0x3: "AVX", 0x7: "AVX2", 0xF: "AVX2_VNNI", 0x1F: "AVX2_VNNI_2",
    0x27: "AVX512_CORE", 0x67: "AVX512_CORE_VNNI", 0xE7: "AVX512_CORE_BF16", 0x1EF: "AVX512_CORE_FP16",
    0xFEF: "AVX512_CORE_AMX", 0x1FEF: "AVX512_CORE_AMX_FP16",
}


class UnsupportedComputePath(SetupError):
    """A compute path was asked for that this CPU (or oneDNN's dispatch) cannot run (a user error: the
    machine lacks a feature, or GPTOSS_ISA asks too much)."""


@dataclass(frozen=True)
class OneDNNInfo:
    version: str
    isa: str  # the ISA oneDNN dispatches to, ONEDNN_MAX_CPU_ISA spelling


def cpu_flags() -> frozenset[str]:
    return _cpuinfo()[1]


def cpu_model() -> str:
    return _cpuinfo()[0]


@lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = "unknown CPU", frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model == "unknown CPU":
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = frozenset(value.split())
                if flags and model != "unknown CPU":
                    break
    except OSError:
        pass
    return model, flags


def onednn_info() -> OneDNNInfo:
    major, minor, patch, isa = _lib.onednn_info()
    return OneDNNInfo(f"{major}.{minor}.{patch}", ONEDNN_ISA_NAMES.get(isa, hex(isa)))


def detected() -> str:
    """The best path this process can run (CPU and oneDNN both allow it)."""
    return _lib.ISA_NAMES[_lib.call_value("gptoss_detect_isa")]


def selected() -> str:
    return _lib.ISA_NAMES[_lib.call_value("gptoss_get_isa")]


def why_unavailable(path: str) -> str | None:
    """None if `path` can run here, else what is missing, in words a user can act on."""
    if path not in PATH_NAMES:
        return f"unknown compute path {path!r}; choose one of {', '.join(reversed(PATH_NAMES))}"
    if PATH_NAMES.index(path) <= PATH_NAMES.index(detected()):
        return None
    cpu_best = _lib.ISA_NAMES[_lib.call_value("gptoss_cpu_isa")]
    if PATH_NAMES.index(path) > PATH_NAMES.index(cpu_best):
        flags = cpu_flags()
        missing = [f for f in REQUIRED_CPU_FLAGS[path] if f not in flags] or list(REQUIRED_CPU_FLAGS[path])
        return (f"the {path} path needs the CPU features {', '.join(REQUIRED_CPU_FLAGS[path])}; "
                f"this CPU ({cpu_model()}) lacks {', '.join(missing)}")
    dnn = onednn_info()
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    because = f" because ONEDNN_MAX_CPU_ISA={cap}" if cap else ""
    return (f"the {path} path needs oneDNN to dispatch {'AVX512_CORE_BF16' if path == 'avx512' else 'AVX2'}, "
            f"but oneDNN {dnn.version} dispatches only up to {dnn.isa}{because}")


def select(path: str) -> None:
    """Run every kernel on `path` from now on (tests, benchmarks, bug reports)."""
    reason = why_unavailable(path)
    if reason:
        raise UnsupportedComputePath(f"cannot use compute path {path!r}: {reason}")
    _lib.call("gptoss_set_isa", PATH_NAMES.index(path))


def select_from_environment() -> None:
    """Apply GPTOSS_ISA if it is set (called once when the kernels are imported)."""
    wanted = os.environ.get("GPTOSS_ISA", "").strip().lower()
    if wanted:
        try:
            select(wanted)
        except UnsupportedComputePath as e:
            raise UnsupportedComputePath(f"GPTOSS_ISA={wanted}: {e}") from None
