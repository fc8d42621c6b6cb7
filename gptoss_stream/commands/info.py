"""`gptoss info`: what a bug report needs to know about this machine and how the engine runs on it."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from pathlib import Path


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def collect(disk_path: str = ".") -> dict:
    """Everything `gptoss info` prints, as plain data (the JSON form is what --json writes)."""
    import numpy as np
    import psutil

    from gptoss_stream.engine import compute_path, kernels
    from gptoss_stream.system import available_memory, cgroup_cpu_limit, cgroup_memory_limit

    flags = compute_path.cpu_flags()
    onednn = compute_path.onednn_info()
    selected = compute_path.selected()
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    disk = shutil.disk_usage(disk_path)
    try:
        from importlib.metadata import version
        engine_version = version("gptoss-stream")
    except Exception:  # a source checkout that was never installed
        engine_version = "source"
    return {
        "cpu": {
            "model": compute_path.cpu_model(),
            "flags": {f: f in flags for f in compute_path.REPORTED_CPU_FLAGS},
            "logical_cpus": os.cpu_count(),
            "cpus_allowed": affinity,
            "cgroup_cpu_quota": cgroup_cpu_limit(),
        },
        "compute_path": {
            "selected": selected,
            "description": compute_path.DESCRIPTIONS[selected],
            "best_available": compute_path.detected(),
            "GPTOSS_ISA": os.environ.get("GPTOSS_ISA"),
        },
        "onednn": {
            "version": onednn.version,
            "dispatches": onednn.isa,
            "ONEDNN_MAX_CPU_ISA": os.environ.get("ONEDNN_MAX_CPU_ISA"),
        },
        "threads": kernels.get_num_threads(),
        "memory": {
            "total": psutil.virtual_memory().total,
            "available": available_memory(),
            "cgroup_limit": cgroup_memory_limit(),
            "page_size": os.sysconf("SC_PAGE_SIZE"),
            "transparent_hugepages": _read("/sys/kernel/mm/transparent_hugepage/enabled"),
            "thp_defrag": _read("/sys/kernel/mm/transparent_hugepage/defrag"),
        },
        "disk": {"path": str(Path(disk_path).resolve()), "free": disk.free, "total": disk.total},
        "software": {
            "gptoss_stream": engine_version,
            "python": platform.python_version(),
            "numpy": np.__version__,
            "kernel": platform.release(),
        },
    }


def format_report(info: dict) -> str:
    from gptoss_stream.streaming.budget import format_size

    cpu, path, dnn, mem, disk, sw = (info[k] for k in ("cpu", "compute_path", "onednn", "memory", "disk", "software"))
    has = " ".join(f for f, present in cpu["flags"].items() if present) or "-"
    lacks = " ".join(f for f, present in cpu["flags"].items() if not present) or "-"
    forced = f" (forced by GPTOSS_ISA={path['GPTOSS_ISA']})" if path["GPTOSS_ISA"] else ""
    cap = f" (capped by ONEDNN_MAX_CPU_ISA={dnn['ONEDNN_MAX_CPU_ISA']})" if dnn["ONEDNN_MAX_CPU_ISA"] else ""
    limit = format_size(mem["cgroup_limit"]) if mem["cgroup_limit"] else "none"
    lines = [
        f"cpu            {cpu['model']}",
        f"  has          {has}",
        f"  lacks        {lacks}",
        f"  cpus         {cpu['logical_cpus']} logical, {cpu['cpus_allowed']} allowed to this process, "
        f"cgroup CPU quota {cpu['cgroup_cpu_quota'] or 'none'}",
        f"compute path   {path['selected']}{forced}: {path['description']}",
        f"  best here    {path['best_available']}",
        f"oneDNN         {dnn['version']}, dispatches {dnn['dispatches']}{cap}",
        f"threads        {info['threads']}",
        f"memory         {format_size(mem['total'])} total, {format_size(mem['available'])} available, "
        f"cgroup limit {limit}",
        f"  pages        {mem['page_size']} bytes; transparent huge pages: {mem['transparent_hugepages']} "
        f"(defrag: {mem['thp_defrag']})",
        f"disk           {format_size(disk['free'])} free of {format_size(disk['total'])} at {disk['path']}",
        f"software       gptoss-stream {sw['gptoss_stream']}, Python {sw['python']}, numpy {sw['numpy']}, "
        f"Linux {sw['kernel']}",
    ]
    return "\n".join(lines)


def checkpoint_summary(path: str) -> dict:
    """`gptoss info -m MODEL`: the checkpoint's layout and what its dense weights cost every token."""
    from gptoss_stream.commands.options import describe_dense
    from gptoss_stream.streaming.budget import dense_nbytes
    from gptoss_stream.weights.checkpoint import open_user_checkpoint

    with open_user_checkpoint(path) as ckpt:
        dense = ckpt.dense_format
        return {"path": str(Path(ckpt.path).resolve()), "format": ckpt.format, "dense_format": dense,
                "dense_bytes_per_token": dense_nbytes(ckpt.config, 0, dense_format=dense),
                "file_bytes": ckpt.nbytes(), "description": describe_dense(ckpt)}


def run_info(args: argparse.Namespace) -> int:
    from gptoss_stream import system
    from gptoss_stream.engine import kernels

    kernels.set_num_threads(args.threads or system.available_cpus())  # as generate does
    info = collect(args.path)
    if args.model:
        info["checkpoint"] = checkpoint_summary(args.model)
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        print()
    else:
        print(format_report(info))
        if "checkpoint" in info:
            c = info["checkpoint"]
            print(f"checkpoint     {c['path']}: {c['description']}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "info", help="this machine, the compute path and the oneDNN build (paste it into a bug report)",
        description="Print the CPU and the features that matter, the compute path libgptoss chose (and why), "
                    "oneDNN's version and the ISA it dispatches, threads, memory, huge pages and free disk. "
                    "GPTOSS_ISA=avx512|avx2|scalar forces a lower compute path; ONEDNN_MAX_CPU_ISA=AVX2 makes "
                    "oneDNN dispatch as on an AVX2 CPU.")
    p.add_argument("--path", default=".", metavar="DIR",
                   help="report the free disk space where DIR lives, e.g. your checkpoint folder (default: .)")
    p.add_argument("--threads", type=int, default=0, metavar="N", help="threads to report (default 0: the CPUs this process may use, as generate)")
    p.add_argument("-m", "--model", default=None, metavar="MODEL_DIR",
                   help="also describe this checkpoint: its layout and its dense weights' format (bf16, or q8 "
                        "from `gptoss repack --dense q8`) and size")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run_info)
