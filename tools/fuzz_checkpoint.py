"""Seeded mutation fuzzing of checkpoint opening: every damaged checkpoint opens and reads, or fails cleanly.

    python tools/fuzz_checkpoint.py                               # 300 cases per category, seed 0
    python tools/fuzz_checkpoint.py --cases 5000 --seed 7         # more on demand
    python tools/fuzz_checkpoint.py --categories header_json config_values --cases 1000 --json out.json

A micro checkpoint (2 layers, 4 experts, ~300 KB) is written in the four layouts (original, Hugging Face
sharded, `gptoss repack`ed, `gptoss repack --dense q8`ed); each case damages one file of one layout (one category below), opens the
checkpoint as `gptoss` does (open_user_checkpoint), and either reads every view (embedding, every layer's
dense weights, every expert through the mapping and through the streaming reader's pread path, the final
norm, the unembedding) or gets an error; then the file is restored. A case passes when it opened and read
everything, or raised a ValueError / FileNotFoundError (CheckpointError is one) whose message names a file of
the checkpoint. Anything else fails: another exception type, a message naming no file, MemoryError under the
memory limit, a case over its time limit, a crash of the process.

Categories (one child process each, two at a time, each under RLIMIT_AS --mem and --case-timeout per case;
a child that dies is restarted after the case that killed it):

    header_json       a safetensors header's JSON: one node changed, removed, duplicated or renamed
    raw_bytes         bytes of a safetensors header (flipped, set, inserted, deleted), or of its data
    length_field      the header's 8-byte length
    truncation        a file cut short, extended, emptied or deleted (shards, config, index, manifest)
    config_values     config.json values of the original and HF layouts
    hf_index          model.safetensors.index.json
    repacked_manifest gptoss-repack.json

Case i of category C is generated from random.Random(f"{seed}:{C}:{i}"): any failure is re-run alone with
`--categories C --only-case i`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CATEGORIES = ("header_json", "raw_bytes", "length_field", "truncation", "config_values", "hf_index",
              "repacked_manifest")
DEFAULT_CASES = 300
DEFAULT_MEM = 1 << 30
DEFAULT_CASE_TIMEOUT = 10.0

# Values that break parsers: wrong types, boundaries of int sizes, huge and deep things. Strings starting
# with "@RAW:" are spliced into the JSON text as they are (json.dumps cannot write them).
HUGE_INT = "@RAW:1" + "0" * 5000                    # more digits than int() accepts from text
DEEP = "@RAW:" + "[" * 100_000 + "]" * 100_000      # the RecursionError of issue 15
INTERESTING: list[Any] = [
    None, True, False, 0, 1, -1, 2, 3, 7, 8, 31, 32, 33, 4095, 4096, 4097, 2**31 - 1, 2**31, 2**32, 2**40,
    2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -2**63, 10**30, 0.5, 1.5, -0.0, 1e308, "@RAW:1e999",
    "@RAW:NaN", "@RAW:-Infinity", HUGE_INT, DEEP, "", "x", "BF16", "U8", "F32", "F8_E8M0", "full_attention",
    "sliding_attention", "yarn", "../model.safetensors", "/etc/passwd", "a\u0000b", "@RAW:\"\\ud800\"", "x" * 300,
    "y" * 100_000, [], [0], [1, 2], [-1], [0] * 20, [[1]], [2**64, 2**64], {}, {"a": 1}, {"dtype": "U8"},
]


# ---------------------------------------------------------------------------- JSON with raw splices

def dumps(doc: Any) -> bytes:
    """json.dumps, with "@RAW:..." strings replaced by their raw text."""
    raws: list[str] = []

    def walk(x: Any) -> Any:
        if isinstance(x, str) and x.startswith("@RAW:"):
            raws.append(x[5:])
            return f"@@RAW{len(raws) - 1}@@"
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, dict):
            return {walk(k) if isinstance(k, str) else k: walk(v) for k, v in x.items()}
        return x

    text = json.dumps(walk(doc))
    for i, raw in enumerate(raws):
        text = text.replace(f'"@@RAW{i}@@"', raw, 1)
    return text.encode("utf-8", "surrogatepass")


def interesting(rng: random.Random) -> Any:
    return rng.choice(INTERESTING)


def perturb_int(n: int, rng: random.Random) -> Any:
    return rng.choice([n + 1, n - 1, n + rng.randint(-4096, 4096), n * 2, n // 2, -n, 0, n + 2**32, n * 2**40,
                       float(n), str(n), n + 0.5, interesting(rng)])


def _nodes(doc: Any, path: tuple = ()) -> list[tuple]:
    """Every path into the document (dict keys and list indices)."""
    out = [path]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _nodes(v, path + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:64]):  # long lists (the expert grid): their first entries are enough
            out += _nodes(v, path + (i,))
    return out


def _get(doc: Any, path: tuple) -> Any:
    for k in path:
        doc = doc[k]
    return doc


def mutate_tree(doc: Any, rng: random.Random, paths: list[tuple] | None = None) -> tuple[Any, str]:
    """One random change to a parsed JSON document (in place where possible); returns (doc, description)."""
    paths = paths or _nodes(doc)
    path = rng.choice(paths)
    if not path:
        return interesting(rng), "document replaced"
    parent, key = _get(doc, path[:-1]), path[-1]
    value = parent[key]
    op = rng.randrange(6)
    where = "/".join(map(str, path))
    if op == 0 and isinstance(value, int) and not isinstance(value, bool):
        parent[key] = perturb_int(value, rng)
        return doc, f"{where}: {value} -> {str(parent[key])[:40]}"
    if op == 1:
        if isinstance(parent, dict):
            del parent[key]
        else:
            parent.pop(key)
        return doc, f"{where}: deleted"
    if op == 2 and isinstance(parent, dict):
        parent[str(key) + rng.choice(["x", ".1", "_", ""]) + "2"] = value  # duplicate under another name
        if rng.random() < 0.5:
            del parent[key]
            return doc, f"{where}: renamed"
        return doc, f"{where}: duplicated"
    if op == 3 and isinstance(parent, list):
        parent.insert(rng.randrange(len(parent) + 1), value if rng.random() < 0.5 else interesting(rng))
        return doc, f"{where}: list grew"
    if op == 4 and isinstance(value, (list, dict)) and value:
        if isinstance(value, list):
            rng.shuffle(value)
            return doc, f"{where}: shuffled"
        parent[key] = {k: value[k] for k in rng.sample(list(value), len(value))}  # key order changed
        value[rng.choice(list(value))] = interesting(rng)
        parent[key] = value
        return doc, f"{where}: member replaced"
    parent[key] = interesting(rng)
    return doc, f"{where}: -> {str(parent[key])[:40]}"


# ---------------------------------------------------------------------------- the checkpoints

class Workspace:
    """The three layouts of the micro checkpoint, a pristine copy of each, and the undo of a case."""

    def __init__(self, root: Path):
        from gptoss_stream.weights import repack
        from gptoss_stream.weights.config import ModelConfig
        from gptoss_stream.weights.synthetic import make_checkpoint

        self.root = root
        pristine = root / "pristine"
        if not (pristine / "repacked-q8" / "gptoss-repack.json").is_file():
            shutil.rmtree(pristine, ignore_errors=True)
            cfg = ModelConfig.preset("tiny").with_overrides(
                num_hidden_layers=2, vocab_size=512, hidden_size=32, intermediate_size=32, num_experts=4,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16)
            make_checkpoint(pristine, cfg, format="both", seed=1, max_shard_bytes=20_000, progress=False)
            repack.repack(pristine / "original", pristine / "repacked", shard_size=16 << 10, progress=False)
            repack.repack(pristine / "original", pristine / "repacked-q8", shard_size=16 << 10, progress=False,
                          dense="q8")
        self.pristine = pristine
        self.work = root / f"work-{os.getpid()}"
        shutil.rmtree(self.work, ignore_errors=True)
        shutil.copytree(pristine, self.work)
        self.touched: set[Path] = set()

    def layout(self, name: str) -> Path:
        return self.work / name

    def files(self, layout: str, pattern: str = "*") -> list[Path]:
        return sorted(p for p in self.layout(layout).glob(pattern) if p.is_file())

    def write(self, path: Path, data: bytes) -> None:
        self.touched.add(path)
        path.write_bytes(data)

    def remove(self, path: Path) -> None:
        self.touched.add(path)
        path.unlink()

    def restore(self) -> None:
        for p in self.touched:
            src = self.pristine / p.relative_to(self.work)
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            if src.exists():
                shutil.copyfile(src, p)
            else:
                p.unlink(missing_ok=True)
        self.touched.clear()


LAYOUTS = ("original", "hf", "repacked", "repacked-q8")


def split_safetensors(raw: bytes) -> tuple[bytes, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[8:8 + n], raw[8 + n:]


def any_shard(ws: Workspace, rng: random.Random) -> tuple[str, Path]:
    layout = rng.choice(LAYOUTS)
    return layout, rng.choice(ws.files(layout, "*.safetensors"))


# ---------------------------------------------------------------------------- the categories

def case_header_json(ws: Workspace, rng: random.Random) -> tuple[str, str]:
    layout, path = any_shard(ws, rng)
    header_raw, data = split_safetensors(path.read_bytes())
    header = json.loads(header_raw)
    # Aim at the tensors' fields most of the time: a node of the tree chosen uniformly is rarely one.
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    if rng.random() < 0.7:
        paths = [(name,)] + [(name, f) for f in header[name]] + [
            (name, f, i) for f in ("shape", "data_offsets") for i in range(len(header[name][f]))]
        if rng.random() < 0.1:
            paths.append(("__metadata__",) if "__metadata__" in header else ())
    else:
        paths = None
    header, what = mutate_tree(header, rng, paths)
    ws.write(path, struct.pack("<Q", len(raw := dumps(header))) + raw + data)
    return layout, f"{path.name}: {what}"


RAW_BYTES = b'"{}[],:0123456789-+eE.\\ \x00\xff\x80ntfu'


def case_raw_bytes(ws: Workspace, rng: random.Random) -> tuple[str, str]:
    layout, path = any_shard(ws, rng)
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    in_data = rng.random() < 0.15 and len(raw) > 8 + n
    lo, hi = (8 + n, len(raw)) if in_data else (8, 8 + n)
    ops = []
    for _ in range(rng.choice([1, 1, 2, 3, 8])):
        i = rng.randrange(lo, hi)
        op = rng.randrange(4 if not in_data else 2)
        if op == 0:
            raw[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            raw[i] = rng.choice(RAW_BYTES)
        elif op == 2:
            raw.insert(i, rng.choice(RAW_BYTES))
            hi += 1
        else:
            del raw[i]
            hi -= 1
        ops.append(f"{op}@{i}")
    if not in_data and rng.random() < 0.7:
        raw[:8] = struct.pack("<Q", hi - 8)  # keep the length consistent with the edited header
    ws.write(path, bytes(raw))
    return layout, f"{path.name}: {'data' if in_data else 'header'} {' '.join(ops)}"


def case_length_field(ws: Workspace, rng: random.Random) -> tuple[str, str]:
    layout, path = any_shard(ws, rng)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    size = len(raw)
    value = rng.choice([0, 1, 2, 7, 8, n - 1, n + 1, n - 8, n + 8, n + rng.randint(-100, 100), size - 8, size - 7,
                        size, size + 1, 16 << 20, (16 << 20) + 1, 100 << 20, 2**32, 2**32 + n, 2**63, 2**64 - 1,
                        rng.getrandbits(64), rng.getrandbits(16), n ^ (1 << rng.randrange(64))])
    value %= 2**64
    ws.write(path, struct.pack("<Q", value) + raw[8:])
    return layout, f"{path.name}: header length {n} -> {value}"


def case_truncation(ws: Workspace, rng: random.Random) -> tuple[str, str]:
    layout = rng.choice(LAYOUTS)
    path = rng.choice(ws.files(layout))
    raw = path.read_bytes()
    op = rng.randrange(7)
    if op == 0:
        ws.remove(path)
        return layout, f"{path.name}: deleted"
    if op == 1:
        ws.write(path, b"")
        return layout, f"{path.name}: emptied"
    if op == 2:
        extra = rng.choice([b"\x00", b"junk", bytes(4096), bytes(rng.randrange(1, 70_000))])
        ws.write(path, raw + extra)
        return layout, f"{path.name}: {len(extra)} bytes appended"
    if op == 3 and path.suffix == ".safetensors":
        n = struct.unpack("<Q", raw[:8])[0]
        cut = rng.randint(0, min(len(raw), 8 + n + 16))  # in or just after the header
    elif op == 4:
        cut = len(raw) - rng.randint(1, min(len(raw), 64))
    else:
        cut = rng.randrange(len(raw))
    ws.write(path, raw[:cut])
    return layout, f"{path.name}: cut to {cut} of {len(raw)} bytes"


CONFIG_KEYS = ["num_hidden_layers", "num_experts", "experts_per_token", "vocab_size", "hidden_size",
               "intermediate_size", "swiglu_limit", "head_dim", "num_attention_heads", "num_key_value_heads",
               "sliding_window", "initial_context_length", "rope_theta", "rope_scaling_factor", "rope_ntk_alpha",
               "rope_ntk_beta", "num_local_experts", "num_experts_per_tok", "layer_types", "rope_scaling",
               "model_type", "rms_norm_eps", "rope_parameters"]


def case_config_values(ws: Workspace, rng: random.Random) -> tuple[str, str]:
    layout = rng.choice(["original", "hf"])
    path = ws.layout(layout) / "config.json"
    doc = json.loads(path.read_text())
    r = rng.random()
    if r < 0.5:
        key = rng.choice([k for k in CONFIG_KEYS if k in doc] if rng.random() < 0.8 else CONFIG_KEYS)
        old = doc.get(key)
        if isinstance(old, int) and not isinstance(old, bool) and rng.random() < 0.6:
            doc[key] = rng.choice([2**40, 2**31, 2**20, 0, -1, old * 2, old + 1, old * 1000, perturb_int(old, rng)])
        else:
            doc[key] = interesting(rng)
        what = f"{key}: {str(old)[:20]} -> {str(doc[key])[:40]}"
    else:
        doc, what = mutate_tree(doc, rng)
    ws.write(path, dumps(doc))
    return layout, f"config.json: {what}"


def case_hf_index(ws: Workspace, rng: random.Random) -> tuple[str, str]:
    path = ws.layout("hf") / "model.safetensors.index.json"
    doc = json.loads(path.read_text())
    wm = doc["weight_map"]
    names, shards = sorted(wm), sorted(set(wm.values()))
    r = rng.random()
    if r < 0.35:
        name = rng.choice(names)
        wm[name] = rng.choice([rng.choice(shards), "missing.safetensors", "../hf/" + wm[name], "config.json",
                               "model.safetensors.index.json", interesting(rng)])
        what = f"{name} -> {str(wm[name])[:40]}"
    elif r < 0.45:
        for name in rng.sample(names, rng.randint(1, 5)):
            del wm[name]
        what = "entries deleted"
    elif r < 0.5:
        for i in range(rng.choice([1, 100, 20_000])):
            wm[f"bogus.{i}"] = rng.choice(shards + ["nope.safetensors"])
        what = "entries added"
    else:
        doc, what = mutate_tree(doc, rng)
    ws.write(path, dumps(doc))
    return "hf", f"index: {what}"


def case_repacked_manifest(ws: Workspace, rng: random.Random) -> tuple[str, str]:
    layout = rng.choice(["repacked", "repacked-q8"])
    path = ws.layout(layout) / "gptoss-repack.json"
    doc = json.loads(path.read_text())
    r = rng.random()
    if r < 0.05:  # the dense format and the version that goes with it
        key = rng.choice(["dense_format", "version"])
        doc[key] = rng.choice(["q8", "bf16", 1, 2, 3, None, interesting(rng)])
        ws.write(path, dumps(doc))
        return layout, f"manifest: {key} -> {str(doc[key])[:40]}"
    if r < 0.4:
        layer, expert = rng.randrange(len(doc["experts"])), rng.randrange(len(doc["experts"][0]))
        entry = doc["experts"][layer][expert]
        key = rng.choice(["shard", "offset", "length", "sha256"])
        entry[key] = perturb_int(entry[key], rng) if isinstance(entry[key], int) else interesting(rng)
        what = f"experts[{layer}][{expert}].{key} -> {str(entry[key])[:40]}"
    elif r < 0.55:
        shard = rng.choice(doc["shards"])
        key = rng.choice(["file", "size"])
        shard[key] = perturb_int(shard[key], rng) if key == "size" else rng.choice(
            [d["file"] for d in doc["shards"]] + ["missing.safetensors", "config.json", interesting(rng)])
        what = f"shards.{key} -> {str(shard[key])[:40]}"
    elif r < 0.7:
        key = rng.choice(list(doc["config"]))
        old = doc["config"][key]
        doc["config"][key] = rng.choice([2**40, 0, -1, interesting(rng)] + (
            [perturb_int(old, rng)] if isinstance(old, int) else []))
        what = f"config.{key} -> {str(doc['config'][key])[:40]}"
    elif r < 0.75:
        doc["align"] = rng.choice([0, 1, 4, 8, 4095, 8192, 2**40, -4096, interesting(rng)])
        what = f"align -> {str(doc['align'])[:40]}"
    else:
        doc, what = mutate_tree(doc, rng)
    ws.write(path, dumps(doc))
    return layout, f"manifest: {what}"


# Each case damages one file and returns (the layout it belongs to, what it did).
CASES: dict[str, Callable[[Workspace, random.Random], tuple[str, str]]] = {
    "header_json": case_header_json, "raw_bytes": case_raw_bytes, "length_field": case_length_field,
    "truncation": case_truncation, "config_values": case_config_values, "hf_index": case_hf_index,
    "repacked_manifest": case_repacked_manifest,
}


# ---------------------------------------------------------------------------- one case

class CaseTimeout(BaseException):
    """A case ran past --case-timeout (BaseException: no `except Exception` of the code under test eats it)."""


def _expire(signum, frame):
    raise CaseTimeout()


def read_everything(path: Path) -> int:
    """Open as `gptoss` does and touch every byte of every view; returns the bytes read."""
    import numpy as np

    from gptoss_stream.streaming.reader import FileReader, aligned_buffer, plan_record
    from gptoss_stream.weights.checkpoint import open_user_checkpoint
    from gptoss_stream.weights.layouts.base import Q8Weight

    total = 0

    def touch(a) -> None:
        nonlocal total
        if isinstance(a, Q8Weight):
            touch(a.values)
            touch(a.scales)
        elif a is not None:
            np.asarray(a).view(np.uint8).sum(dtype=np.uint64)  # every byte read through the mapping
            total += a.nbytes

    with open_user_checkpoint(path) as ck:
        cfg = ck.config
        touch(ck.embedding())
        touch(ck.final_norm())
        touch(ck.unembedding())
        reader = FileReader(direct=False)
        try:
            for n in range(cfg.num_hidden_layers):
                for v in vars(ck.layer(n)).values():
                    touch(v)
                for e in range(cfg.num_experts):
                    w = ck.expert(n, e)
                    for v in (w.mlp1_blocks, w.mlp1_scales, w.mlp1_bias, w.mlp2_blocks, w.mlp2_scales, w.mlp2_bias):
                        touch(v)
                    layout = plan_record(w.ranges)
                    reader.read_record(layout, aligned_buffer(layout.nbytes))
        finally:
            reader.close()
    return total


def classify(e: BaseException, root: Path) -> str:
    """'rejected' for a clean error (ValueError / FileNotFoundError naming a file under root), else 'failure'."""
    if isinstance(e, (ValueError, FileNotFoundError)) and str(root) in str(e):
        return "rejected"
    return "failure"


def run_case(ws: Workspace, category: str, seed: int, i: int, timeout: float) -> dict[str, Any]:
    rng = random.Random(f"{seed}:{category}:{i}")
    layout, what = CASES[category](ws, rng)
    target = ws.layout(layout)
    result: dict[str, Any] = {"case": i, "mutation": f"{layout}/{what}"[:160]}
    signal.signal(signal.SIGALRM, _expire)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    started = time.perf_counter()
    try:
        read_everything(target)
        outcome = "opened"
    except CaseTimeout:
        outcome, result["error"] = "failure", f"timeout: more than {timeout} s"
    except BaseException as e:  # noqa: B902 - every escape is a finding, MemoryError and RecursionError included
        signal.setitimer(signal.ITIMER_REAL, 0)
        outcome = classify(e, ws.work)
        result["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        if outcome == "failure":
            result["traceback"] = traceback.format_exc()[-3000:]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        ws.restore()
    result["outcome"] = outcome
    result["seconds"] = round(time.perf_counter() - started, 4)
    return result


def child(category: str, seed: int, first: int, cases: int, workdir: Path, timeout: float, mem: int,
          only: int | None) -> None:
    """Run cases first..cases-1 of one category, one JSON line each on stdout."""
    ws = Workspace(workdir)
    # The limit comes after the imports and the workspace: it bounds what a case can take, not Python itself.
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    try:
        for i in ([only] if only is not None else range(first, cases)):
            print(json.dumps(run_case(ws, category, seed, i, timeout)), flush=True)
    finally:
        shutil.rmtree(ws.work, ignore_errors=True)


# ---------------------------------------------------------------------------- the parent

def run_category(category: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Run one category in child processes (restarted after a case that kills one); returns its summary."""
    results: list[dict[str, Any]] = []
    first = args.only_case if args.only_case is not None else 0
    end = first + 1 if args.only_case is not None else args.cases
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    while first < end:
        cmd = [sys.executable, __file__, "--child", category, "--seed", str(args.seed), "--first", str(first),
               "--cases", str(end), "--workdir", str(workdir), "--case-timeout", str(args.case_timeout),
               "--mem", str(args.mem)]
        # Whole-child timeout: every case at its limit, plus start-up.
        budget = 60 + (end - first) * args.case_timeout
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            out, err = proc.communicate(timeout=budget)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            err += f"\nchild killed after {budget} s"
        done = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        results += done
        first += len(done)
        if first < end:
            # The child died in case `first` (a crash, the memory limit hit outside Python, a hang in C code).
            results.append({"case": first, "outcome": "failure", "mutation": "?",
                            "error": f"child died (exit {proc.returncode}): {err.strip()[-1500:]}"})
            first += 1
    counts = Counter(r["outcome"] for r in results)
    errors = Counter(r["error"].split(":")[0] for r in results if r["outcome"] == "rejected")
    examples = list(dict.fromkeys(r["error"] for r in results if r["outcome"] == "rejected"))
    return {"category": category, "cases": len(results), "opened": counts["opened"], "rejected": counts["rejected"],
            "failures": [r for r in results if r["outcome"] == "failure"],
            "rejected_by": dict(errors), "examples": examples[:20], "seconds": round(time.perf_counter() - started, 1),
            "max_case_seconds": max((r.get("seconds", 0) for r in results), default=0)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--categories", nargs="+", choices=CATEGORIES, default=list(CATEGORIES))
    p.add_argument("--cases", type=int, default=DEFAULT_CASES, help="cases per category (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only-case", type=int, help="run case N of each category alone (reproduce a failure)")
    p.add_argument("--jobs", type=int, default=2, help="categories run at once (default %(default)s)")
    p.add_argument("--mem", type=int, default=DEFAULT_MEM, help="RLIMIT_AS of each child, bytes (default 1 GiB)")
    p.add_argument("--case-timeout", type=float, default=DEFAULT_CASE_TIMEOUT, help="seconds per case")
    p.add_argument("--workdir", type=Path, help="where the checkpoints go (default: a temporary folder)")
    p.add_argument("--json", type=Path, help="write the summary (and every failure) here")
    p.add_argument("--child", choices=CATEGORIES, help=argparse.SUPPRESS)
    p.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.seed, args.first, args.cases, args.workdir, args.case_timeout, args.mem,
              args.only_case)
        return 0

    with tempfile.TemporaryDirectory(prefix="gptoss-fuzz-", dir=args.workdir) as tmp:
        workdir = Path(tmp)
        Workspace(workdir)  # the pristine checkpoints, once, before the children copy them
        shutil.rmtree(workdir / f"work-{os.getpid()}")
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            summaries = list(pool.map(lambda c: run_category(c, args, workdir), args.categories))
    print(f"{'category':<18} {'cases':>6} {'opened':>7} {'rejected':>9} {'failures':>9} {'seconds':>8}")
    for s in summaries:
        print(f"{s['category']:<18} {s['cases']:>6} {s['opened']:>7} {s['rejected']:>9} {len(s['failures']):>9} "
              f"{s['seconds']:>8}")
    total = {k: sum(s[k] for s in summaries) for k in ("cases", "opened", "rejected")}
    failures = sum(len(s["failures"]) for s in summaries)
    print(f"{'total':<18} {total['cases']:>6} {total['opened']:>7} {total['rejected']:>9} {failures:>9}")
    for s in summaries:
        for f in s["failures"][:5]:
            print(f"\nFAILURE {s['category']} case {f['case']} ({f['mutation']}): {f.get('error')}\n"
                  f"{f.get('traceback', '')}")
    if args.json:
        args.json.write_text(json.dumps({"seed": args.seed, "categories": summaries}, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
