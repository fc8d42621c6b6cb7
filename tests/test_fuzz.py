"""Seeded mutation fuzzing of checkpoint opening (tools/fuzz_checkpoint.py): in CI, 300 cases in each of the
seven categories (2,100 in all), one child process per category under a memory limit and a per-case timeout.
Every case must open and read every view, or fail with a ValueError / FileNotFoundError naming the file.

More on demand: `GPTOSS_FUZZ_CASES=5000 pytest tests/test_fuzz.py` (cases per category), or the tool itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import fuzz_checkpoint as fuzz  # noqa: E402

CASES = int(os.environ.get("GPTOSS_FUZZ_CASES", "300"))


def test_fuzz_every_damaged_checkpoint_opens_or_fails_cleanly(tmp_path):
    out = tmp_path / "fuzz.json"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "fuzz_checkpoint.py"), "--cases", str(CASES),
                        "--workdir", str(tmp_path), "--json", str(out)],
                       capture_output=True, text=True, timeout=60 + 7 * CASES)
    summary = json.loads(out.read_text())["categories"]
    failures = [(s["category"], f) for s in summary for f in s["failures"]]
    assert not failures, r.stdout[-6000:]
    assert r.returncode == 0, r.stderr[-3000:]
    assert {s["category"] for s in summary} == set(fuzz.CATEGORIES)
    assert sum(s["cases"] for s in summary) == len(fuzz.CATEGORIES) * CASES
    for s in summary:
        # Both outcomes in every category: a mutator that breaks nothing, or everything, tests little.
        assert s["opened"] > 0 and s["rejected"] > 0, s


@pytest.fixture(scope="module")
def workspace_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    fuzz.Workspace(root)  # the pristine checkpoints, shared by the tests below
    return root


def test_the_harness_tells_a_clean_error_from_a_failure(workspace_root, tmp_path, monkeypatch):
    root = tmp_path / "ck"
    assert fuzz.classify(ValueError(f"{root}/config.json: bad"), root) == "rejected"
    assert fuzz.classify(FileNotFoundError(f"{root}/model.safetensors: not found"), root) == "rejected"
    assert fuzz.classify(ValueError("bad, but which file?"), root) == "failure"
    assert fuzz.classify(RecursionError(f"{root}/x"), root) == "failure"
    assert fuzz.classify(TypeError(f"{root}/x: unhashable type"), root) == "failure"

    ws = fuzz.Workspace(workspace_root)
    assert fuzz.run_case(ws, "header_json", 0, 0, 10.0)["outcome"] != "failure"
    # The bug of issue 15, put back: a deeply nested header escapes as RecursionError.
    from gptoss_stream.weights import safetensors_file

    def recurse(raw, where):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(safetensors_file, "parse_json", recurse)
    result = fuzz.run_case(ws, "header_json", 0, 0, 10.0)
    assert result["outcome"] == "failure" and "RecursionError" in result["error"]

    def hang(raw, where):
        time.sleep(30)

    monkeypatch.setattr(safetensors_file, "parse_json", hang)
    result = fuzz.run_case(ws, "header_json", 0, 0, 0.2)
    assert result["outcome"] == "failure" and "timeout" in result["error"]
    monkeypatch.undo()
    # Every case leaves the checkpoints as they were.
    for p in ws.pristine.rglob("*"):
        if p.is_file():
            assert (ws.work / p.relative_to(ws.pristine)).read_bytes() == p.read_bytes(), p


@pytest.mark.parametrize("category", fuzz.CATEGORIES)
def test_cases_are_reproducible(category, workspace_root):
    import random

    ws = fuzz.Workspace(workspace_root)
    seen = []
    for _ in range(2):
        seen.append(fuzz.CASES[category](ws, random.Random(f"0:{category}:7")))
        ws.restore()
    assert seen[0] == seen[1]
