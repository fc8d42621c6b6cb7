"""`gptoss info`, the compute-path choice (GPTOSS_ISA, ONEDNN_MAX_CPU_ISA) and what a kernel failure says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gptoss_stream.commands import cli
from gptoss_stream.engine import _lib, compute_path, kernels

ROOT = Path(__file__).resolve().parents[1]


def run_gptoss(*args: str, **env: str) -> subprocess.CompletedProcess:
    """The command in a fresh process: the compute path is chosen once, when the kernels are loaded."""
    e = {k: v for k, v in os.environ.items() if k not in ("GPTOSS_ISA", "ONEDNN_MAX_CPU_ISA")}
    e.update(env, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "gptoss_stream.commands.cli", *args], env=e,
                          capture_output=True, text=True, timeout=120)


def test_info_reports_the_machine_and_the_path(capsys):
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["compute_path"]["selected"] == kernels.get_isa()
    assert info["compute_path"]["best_available"] == kernels.detect_isa()
    assert info["onednn"]["version"].startswith("3.")
    assert info["threads"] >= 1 and info["memory"]["total"] > 0 and info["disk"]["free"] > 0
    assert set(info["cpu"]["flags"]) >= {"avx2", "fma", "avx512_bf16"}
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert "compute path" in text and "oneDNN" in text and info["cpu"]["model"] in text


def test_gptoss_isa_forces_a_lower_path():
    out = run_gptoss("info", "--json", GPTOSS_ISA="scalar")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["compute_path"]["selected"] == "scalar" and info["compute_path"]["GPTOSS_ISA"] == "scalar"


def test_onednn_cap_lowers_the_detected_path():
    """ONEDNN_MAX_CPU_ISA=AVX2 makes any machine look like an AVX2 CPU to oneDNN, so to us."""
    out = run_gptoss("info", "--json", ONEDNN_MAX_CPU_ISA="AVX2")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["onednn"]["dispatches"] == "AVX2"
    assert info["compute_path"]["selected"] in ("avx2", "scalar")  # scalar only on a CPU without AVX2/FMA


def test_asking_for_a_path_the_machine_lacks_names_what_is_missing():
    out = run_gptoss("info", GPTOSS_ISA="avx512", ONEDNN_MAX_CPU_ISA="AVX2")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "GPTOSS_ISA=avx512" in out.stderr
    # Either the CPU lacks a feature (named) or oneDNN is capped (named with the variable).
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in out.stderr or "lacks" in out.stderr, out.stderr
    out = run_gptoss("info", GPTOSS_ISA="avx9000")
    assert out.returncode == 1 and "unknown compute path 'avx9000'" in out.stderr, out.stderr


def test_set_isa_explains_a_refusal():
    if kernels.detect_isa() == "avx512":
        pytest.skip("this machine runs every path")
    with pytest.raises(ValueError, match="avx512"):
        kernels.set_isa("avx512")
    assert compute_path.why_unavailable("avx512")


def test_a_kernel_failure_names_kernel_shapes_path_and_what_to_do():
    with pytest.raises(_lib.KernelError) as failure:
        _lib.call("gptoss_matmul_bf16", None, 1, 64, 64, None, 8, None, None, 8, _lib.DTYPE_BF16,
                  context="x [1, 64] bf16, W [8, 64] bf16")
    message = str(failure.value)
    assert "gptoss_matmul_bf16" in message and "x [1, 64] bf16, W [8, 64] bf16" in message
    assert f"the {kernels.get_isa()} compute path" in message and "gptoss info" in message
    assert failure.value.status == 1 and "status 5" not in message
