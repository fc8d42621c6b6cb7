"""`gptoss memprof`: how much RAM gpt-oss needs on this box, where it goes, and what the disk does per token.

It runs a real generation (load, prefill, N tokens) and samples the process from a background thread every
`--interval` seconds and at every phase and token boundary:

- memory: RSS split into anonymous and file-backed pages (/proc/self/status), USS/PSS (smaps_rollup),
  the peak RSS since the phase began (VmHWM, reset at each boundary), swap;
- work: major/minor page faults and CPU time (getrusage), bytes read from storage and through read()
  (/proc/self/io);
- the checkpoint's pages in the page cache, dense weights vs expert data (residency.py, mincore);
- the engine's own counters: KV cache in use, and whatever the expert store's `stats.as_dict()` reports;
- with `--limit`, the memory cgroup's usage, its page-cache and anonymous parts, and its peak per phase.

smaps_rollup and mincore walk every page of the mapping (tens to hundreds of ms on a 13 GB checkpoint), so
these "slow" measures are taken at phase boundaries and otherwise only when doing so keeps them under
SLOW_SHARE of the wall time. Everything else costs microseconds and is taken at every sample.

`--limit SIZE` runs the workload in a child process inside a cgroup v1 memory limit (root), which is how a
smaller box behaves: the page cache the workload fills is charged to the limit too. `--cold` first drops
the page cache (root). The timeline is written as JSON (schema below, `version` field; docs/memprof.md) and
can be drawn with `--plot` (matplotlib, the optional `plot` extra) or set beside another run (`--compare`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptoss_stream.errors import InputError, SetupError

SCHEMA = "gptoss-memprof"
VERSION = 1
PHASES = ("load", "prefill", "decode")
DEFAULT_INTERVAL = 0.05
SLOW_SHARE = 0.05  # at most this fraction of wall time goes to the slow measures between boundaries

# Every sample has exactly these keys (None when a measure is unavailable or was not taken this time).
SAMPLE_KEYS = (
    "t",                 # seconds since the profile started (monotonic clock)
    "phase",             # load | prefill | decode: the phase the sample belongs to
    "kind",              # start | tick (timer) | token (a token was produced) | phase_end | end
    "token",             # index of the generated token (kind == token or the prefill's phase_end), else None
    "rss", "rss_anon", "rss_file", "rss_shmem",  # bytes, /proc/self/status
    "rss_peak",          # VmHWM: peak RSS since the current phase began (reset at every phase boundary)
    "swap",              # VmSwap
    "uss", "pss", "pss_anon", "pss_file",  # slow: /proc/self/smaps_rollup
    "majflt", "minflt",  # cumulative page faults (getrusage)
    "cpu_user", "cpu_system",  # cumulative CPU seconds, all threads
    "read_bytes",        # cumulative bytes fetched from storage (/proc/self/io read_bytes)
    "read_chars",        # cumulative bytes returned by read()/pread() (page cache hits included)
    "dense_resident", "embedding_resident", "expert_resident",  # slow: checkpoint bytes in the page cache
    "experts_resident",  # slow: experts (layer, e) entirely in the page cache
    "cgroup_usage", "cgroup_cache", "cgroup_rss",  # --limit: memory.usage_in_bytes, memory.stat cache/rss
    "cgroup_max_usage",  # --limit: peak usage since the current phase began (the kernel's high-water mark)
    "kv_bytes",          # KV cache bytes holding live positions
    "expert_cache_bytes",  # RAM the expert store holds (its nbytes), or None (the mapped store holds none)
    "experts",           # {"counters": the expert store's stats.as_dict(), "derived": hit_rate, ...}, or None
)
REPORT_KEYS = ("schema", "version", "created", "command", "host", "model", "settings", "phases", "samples",
               "tokens", "generated", "summary")
PEAK_KEYS = ("rss", "rss_anon", "rss_file", "rss_peak", "swap", "uss", "pss", "dense_resident",
             "embedding_resident", "expert_resident", "experts_resident", "cgroup_usage", "cgroup_max_usage",
             "kv_bytes", "expert_cache_bytes")
COUNTER_KEYS = ("majflt", "minflt", "read_bytes", "read_chars", "cpu_user", "cpu_system")
MATPLOTLIB_MISSING = "--plot needs matplotlib: pip install 'gptoss-stream[plot]' (or pip install matplotlib)"


# ---------------------------------------------------------------------------- sizes


def format_bytes(n: float | None) -> str:
    from gptoss_stream.budget import format_size

    return "-" if n is None else format_size(n)


# ---------------------------------------------------------------------------- reading the process


class ProcReader:
    """Reads /proc and cgroup files and counts the bytes it read: they show up in the process's own rchar
    (/proc/self/io), so read_chars is reported without them."""

    def __init__(self) -> None:
        self.chars = 0

    def text(self, path: str | os.PathLike) -> str:
        with open(path) as f:
            data = f.read()
        self.chars += len(data)  # these files are ASCII: characters are bytes
        return data

    def fields(self, path: str | os.PathLike) -> dict[str, str]:
        """'Key: value' (proc) or 'key value' (io, memory.stat) lines as a dict."""
        out = {}
        for line in self.text(path).splitlines():
            key, _, value = line.partition(":") if ":" in line else line.partition(" ")
            out[key.strip()] = value.strip()
        return out

    def status(self) -> dict[str, int | None]:
        s = self.fields("/proc/self/status")
        return {"rss": _kib(s, "VmRSS"), "rss_anon": _kib(s, "RssAnon"), "rss_file": _kib(s, "RssFile"),
                "rss_shmem": _kib(s, "RssShmem"), "rss_peak": _kib(s, "VmHWM"), "swap": _kib(s, "VmSwap")}

    def smaps_rollup(self) -> dict[str, int | None]:
        """USS = private pages, PSS = each page divided by its sharers (what psutil's memory_full_info reads)."""
        s = self.fields("/proc/self/smaps_rollup")
        private = [_kib(s, "Private_Clean"), _kib(s, "Private_Dirty")]
        return {"uss": sum(private) if None not in private else None, "pss": _kib(s, "Pss"),
                "pss_anon": _kib(s, "Pss_Anon"), "pss_file": _kib(s, "Pss_File")}

    def io(self) -> dict[str, int]:
        own = self.chars  # rchar counts a read when it completes: this one is not in the value it returns
        s = self.fields("/proc/self/io")
        return {"read_bytes": int(s["read_bytes"]), "read_chars": int(s["rchar"]) - own}


def _kib(fields: dict[str, str], key: str) -> int | None:
    value = fields.get(key)
    return int(value.split()[0]) * 1024 if value else None


def read_rusage() -> dict[str, float | int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"majflt": r.ru_majflt, "minflt": r.ru_minflt, "cpu_user": r.ru_utime, "cpu_system": r.ru_stime}


def reset_peak_rss() -> None:
    """Make VmHWM restart from the current RSS (Linux >= 4.0), so each phase reports its own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # older kernels: rss_peak then means "since the process started"


# ---------------------------------------------------------------------------- cgroup v1 memory limit

CGROUP_NAME_PREFIX = "gptoss-memprof-"
_ROOT_BECAUSE = {
    "--limit": "to create a memory cgroup (it writes under /sys/fs/cgroup/memory)",
    "--cold": "to drop the page cache (sync; echo 3 > /proc/sys/vm/drop_caches)",
}


def _require_root(option: str) -> None:
    if os.geteuid() != 0:
        raise SetupError(f"{option} needs root {_ROOT_BECAUSE[option]}; run as root (sudo) or drop {option}")


def _memory_cgroup_mount() -> Path:
    with open("/proc/self/mounts") as f:
        for line in f:
            _, mountpoint, fstype, options, *_ = line.split()
            if fstype == "cgroup" and "memory" in options.split(","):
                return Path(mountpoint)
    raise SetupError("--limit needs the cgroup v1 memory controller, and none is mounted "
                       "(no 'cgroup ... memory' line in /proc/self/mounts; cgroup v2-only hosts are not supported)")


def _own_memory_cgroup() -> str:
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if "memory" in controllers.split(","):
                return path
    return "/"


@dataclass
class MemoryCgroup:
    """A cgroup v1 memory group: its directory and the files memprof reads."""

    path: Path

    def read(self, name: str, reader: ProcReader | None = None) -> int:
        return int((reader or ProcReader()).text(self.path / name).split()[0])

    def sample(self, reader: ProcReader) -> dict[str, int | None]:
        stat = {k: int(v) for k, v in reader.fields(self.path / "memory.stat").items()}
        return {"cgroup_usage": self.read("memory.usage_in_bytes", reader),
                "cgroup_max_usage": self.read("memory.max_usage_in_bytes", reader),
                "cgroup_cache": stat.get("total_cache", stat.get("cache")),
                "cgroup_rss": stat.get("total_rss", stat.get("rss"))}

    def oom_kills(self) -> int:
        """Processes the OOM killer killed in this group (memory.oom_control's oom_kill, Linux >= 4.13)."""
        fields = ProcReader().fields(self.path / "memory.oom_control")
        return int(fields.get("oom_kill", "0"))

    def reset_peak(self) -> None:
        (self.path / "memory.max_usage_in_bytes").write_text("0")

    @classmethod
    def create(cls, limit: int) -> MemoryCgroup:
        """A new group below our own memory cgroup (so every limit above it still applies), capped at limit."""
        _require_root("--limit")
        mount = _memory_cgroup_mount()
        path = mount / _own_memory_cgroup().lstrip("/") / f"{CGROUP_NAME_PREFIX}{os.getpid()}"
        try:
            path.mkdir()
            (path / "memory.limit_in_bytes").write_text(str(limit))
        except OSError as e:
            raise SetupError(f"cannot create memory cgroup {path}: {e}") from None
        group = cls(path)
        applied = group.read("memory.limit_in_bytes")
        if applied > limit:
            group.remove()
            raise SetupError(f"{path}: memory.limit_in_bytes is {applied} after writing {limit}")
        return group

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        # rmdir succeeds once the member processes are gone; their page cache moves to the parent group.
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)
        print(f"gptoss memprof: could not remove cgroup {self.path}; rmdir it by hand", file=sys.stderr)


def drop_page_cache(paths: list[str]) -> None:
    """Evict everything clean from the page cache: the checkpoint first (posix_fadvise), then all (root)."""
    from gptoss_stream.residency import evict_files

    _require_root("--cold")
    evict_files(paths)
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
    except OSError as e:
        raise SetupError(f"--cold: cannot write /proc/sys/vm/drop_caches: {e}") from None


# ---------------------------------------------------------------------------- the sampler


class Profiler:
    """Collects samples from a background timer thread and from the workload's phase and token boundaries."""

    def __init__(self, interval: float = DEFAULT_INTERVAL, cgroup: MemoryCgroup | None = None,
                 slow_share: float = SLOW_SHARE):
        if interval <= 0:
            raise InputError(f"--interval must be positive, got {interval}")
        self.interval = interval
        self.cgroup = cgroup
        self.slow_share = slow_share
        self.samples: list[dict[str, Any]] = []
        self.phases: list[dict[str, Any]] = []
        self.residency = None   # a CheckpointResidency once the model is open
        self.engine: Callable[[], dict[str, Any]] | None = None
        self.sampling_seconds = 0.0      # wall time inside sample() (includes waiting for the GIL)
        self.sampling_cpu_seconds = 0.0  # CPU time the sampling itself used: the profiler's real overhead
        self._reader = ProcReader()
        self._slow_cost = 0.0
        self._last_slow = -1e9
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memprof-sampler", daemon=True)
        self._t0 = time.perf_counter()

    # ------------------------------------------------------------------ workload hooks
    def start(self) -> None:
        self._t0 = time.perf_counter()
        reset_peak_rss()
        if self.cgroup:
            self.cgroup.reset_peak()
        self.phases.append({"name": PHASES[0], "start": 0.0, "end": None, "tokens": 0})
        self.sample("start", slow=True)
        self._thread.start()

    def attach(self, residency, engine: Callable[[], dict[str, Any]]) -> None:
        """Measures that exist once the model is loaded: checkpoint residency and the engine's counters."""
        with self._lock:
            self.residency = residency
            self.engine = engine

    def begin_phase(self, name: str, token: int | None = None) -> None:
        """Close the current phase with a full sample (labelled with it) and start the next one."""
        with self._lock:  # no timer sample may fall between the boundary and the reset of the peaks
            sample = self.sample("phase_end", token=token, slow=True)
            self.phases[-1]["end"] = sample["t"]
            self.phases.append({"name": name, "start": sample["t"], "end": None, "tokens": 0})
            reset_peak_rss()
            if self.cgroup:
                self.cgroup.reset_peak()

    def token(self, index: int) -> None:
        self.sample("token", token=index)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        sample = self.sample("end", slow=True)
        self.phases[-1]["end"] = sample["t"]

    # ------------------------------------------------------------------ sampling
    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample("tick")

    def sample(self, kind: str, token: int | None = None, slow: bool = False) -> dict[str, Any]:
        with self._lock:
            began = time.perf_counter()
            cpu_began = time.thread_time()
            s: dict[str, Any] = dict.fromkeys(SAMPLE_KEYS)
            s.update(t=began - self._t0, phase=self.phases[-1]["name"], kind=kind, token=token)
            s.update(self._reader.status())
            s.update(read_rusage())
            if self.cgroup is not None:
                s.update(self.cgroup.sample(self._reader))
            if self.engine is not None:
                s.update(self.engine())
            # The slow pair keeps to its share of wall time: after a measurement that cost c seconds the next
            # one waits c / slow_share, unless a boundary asks for it.
            if slow or began - self._last_slow >= max(self.interval, self._slow_cost / self.slow_share):
                slow_began = time.perf_counter()
                s.update(self._reader.smaps_rollup())
                if self.residency is not None:
                    r = self.residency.measure()
                    s.update(dense_resident=r.dense_resident, embedding_resident=r.embedding_resident,
                             expert_resident=r.expert_resident, experts_resident=r.experts_resident)
                ended = time.perf_counter()
                self._slow_cost = ended - slow_began
                self._last_slow = began
            s.update(self._reader.io())  # last, so the files read above are already discounted
            self.samples.append(s)
            self.sampling_seconds += time.perf_counter() - began
            self.sampling_cpu_seconds += time.thread_time() - cpu_began
            return s


# ---------------------------------------------------------------------------- the workload


def _prompt_tokens(args: argparse.Namespace, tokenizer) -> list[int]:
    from gptoss_stream import harmony

    if args.raw:
        return tokenizer.encode(args.prompt, allow_special=True)
    messages = [harmony.system_message(args.reasoning, current_date=time.strftime("%Y-%m-%d"))]
    messages.append(harmony.Message("user", args.prompt))
    return harmony.render_conversation(messages, tokenizer)


def expert_store_stats(store) -> dict[str, Any] | None:
    """{"counters": the store's stats.as_dict(), "derived": its numeric properties (hit_rate, ...)}, or None.

    Duck-typed on purpose: memprof reports whatever the store in use counts without knowing which store it is.
    """
    stats = getattr(store, "stats", None)
    as_dict = getattr(stats, "as_dict", None)
    if not callable(as_dict):
        return None
    derived = {}
    for name in dir(type(stats)):
        if not name.startswith("_") and isinstance(getattr(type(stats), name), property):
            value = getattr(stats, name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                derived[name] = value
    return {"counters": dict(as_dict()), "derived": derived}


def expert_store_bytes(store) -> int | None:
    """RAM the store holds for expert data (`nbytes`, a method or an attribute), if it says."""
    nbytes = getattr(store, "nbytes", None)
    value = nbytes() if callable(nbytes) else nbytes
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _describe(plan) -> str | None:
    """The memory plan open_model made for --ram-budget, as its own one-line description."""
    describe = getattr(plan, "describe", None)
    return describe() if callable(describe) else None


def profile(args: argparse.Namespace, cgroup: MemoryCgroup | None = None) -> dict[str, Any]:
    """Load, prefill and decode args.max_tokens tokens under the profiler; the report (see SAMPLE_KEYS)."""
    from gptoss_stream import cli

    profiler = Profiler(args.interval, cgroup)
    profiler.start()
    try:
        # load: libraries, checkpoint mapping, model, tokenizer, prompt
        from gptoss_stream.generate import generate
        from gptoss_stream.residency import CheckpointResidency
        from gptoss_stream.tokenizer import get_tokenizer

        model = cli.open_model(args)
        prompt = _prompt_tokens(args, get_tokenizer())
        cache = model.new_cache(args.context)
        residency = CheckpointResidency(model.checkpoint)
        profiler.attach(residency, lambda: {"kv_bytes": cache.bytes_in_use(),
                                            "expert_cache_bytes": expert_store_bytes(model.experts),
                                            "experts": expert_store_stats(model.experts)})
        profiler.begin_phase("prefill")

        # prefill, then decode: the first token comes from the prefill's logits, each later one from a step
        def on_token(token: int) -> None:
            index = len(generated)
            generated.append(token)
            if index == 0:
                profiler.phases[-1]["tokens"] = len(prompt)
                profiler.begin_phase("decode", token=0)
            else:
                profiler.phases[-1]["tokens"] += 1
                profiler.token(index)

        generated: list[int] = []
        # No stop tokens: every run generates exactly max_tokens tokens, so runs compare token for token.
        result = generate(model, prompt, args.max_tokens, cli.make_sampler(args), stop_tokens=(), cache=cache,
                          on_token=on_token, context_length=args.context)
    finally:
        profiler.stop()

    ckpt = model.checkpoint
    cfg = model.config
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "version": VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": getattr(args, "command_line", None) or " ".join(["gptoss", *sys.argv[1:]]),
        "host": {
            "hostname": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(),
            "mem_total": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "page_size": os.sysconf("SC_PAGE_SIZE"),
        },
        "model": {
            "path": str(ckpt.path), "format": getattr(ckpt, "format", None), "file_bytes": ckpt.nbytes(),
            "dense_bytes": residency.dense_total, "embedding_bytes": residency.embedding_total,
            "expert_bytes": residency.expert_total,
            "experts": residency.experts_total, "num_hidden_layers": cfg.num_hidden_layers,
            "num_experts": cfg.num_experts, "scratch_bytes": model.state.nbytes, "kv_reserved_bytes": cache.nbytes,
            "expert_store": type(model.experts).__name__,
        },
        "settings": {
            "prompt_tokens": len(prompt), "max_tokens": args.max_tokens, "interval": args.interval,
            "ram_budget": args.ram_budget, "mmap_only": args.mmap_only,
            "memory_plan": _describe(getattr(args, "plan", None)), "limit": getattr(args, "limit_bytes", None),
            "cold": bool(args.cold), "threads": args.threads, "chunk": args.chunk, "context": args.context,
            "raw": bool(args.raw), "temperature": args.temperature, "seed": args.seed,
        },
        "phases": profiler.phases,
        "samples": profiler.samples,
        "tokens": token_records(profiler.samples),
        "generated": generated,
    }
    report["summary"] = summarize(report)
    report["summary"]["profiler_seconds"] = profiler.sampling_seconds
    model.close()
    report["summary"]["profiler_cpu_seconds"] = profiler.sampling_cpu_seconds
    report["summary"]["engine_prefill_seconds"] = result.prefill_seconds
    report["summary"]["engine_decode_tokens_per_second"] = result.decode_tokens_per_second
    return report


# ---------------------------------------------------------------------------- the report


def token_records(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per generated token: when it came and what its step cost (deltas since the previous one).

    Token 0 comes with the end of the prefill, so its deltas are the whole prefill's.
    """
    out = []
    previous = None
    for s in samples:
        if s["kind"] == "phase_end" and s["phase"] == "load":
            previous = s
        elif s["token"] is not None and previous is not None:
            record = {"index": s["token"], "phase": s["phase"], "t": s["t"], "seconds": s["t"] - previous["t"]}
            record.update({k: s[k] - previous[k] for k in ("read_bytes", "read_chars", "majflt", "minflt")})
            out.append(record)
            previous = s
    return out


def _peak(samples: list[dict[str, Any]], key: str):
    values = [s[key] for s in samples if s[key] is not None]
    return max(values) if values else None


def _counter_deltas(before: dict | None, after: dict | None) -> dict[str, float] | None:
    """What the expert store counted during a phase."""
    if not after:
        return None
    earlier = (before or {}).get("counters", {})
    return {k: v - earlier.get(k, 0) for k, v in after["counters"].items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """Per phase: duration, tokens, tok/s, the peak of each measure and what each counter did."""
    samples = report["samples"]
    phases: dict[str, Any] = {}
    before = samples[0]
    for phase in report["phases"]:
        inside = [s for s in samples if s["phase"] == phase["name"]]
        last = inside[-1] if inside else before
        seconds = (phase["end"] or 0.0) - phase["start"]
        phases[phase["name"]] = {
            "seconds": seconds,
            "tokens": phase["tokens"],
            "tokens_per_second": phase["tokens"] / seconds if phase["tokens"] and seconds > 0 else None,
            "peak": {k: _peak(inside, k) for k in PEAK_KEYS},
            "delta": {k: last[k] - before[k] for k in COUNTER_KEYS},
            "experts": _counter_deltas(before["experts"], last["experts"]),
        }
        before = last
    model = report["model"]
    for p in phases.values():
        for kind in ("dense", "embedding", "expert"):
            resident, total = p["peak"][f"{kind}_resident"], model[f"{kind}_bytes"]
            p["peak"][f"{kind}_fraction"] = resident / total if resident is not None and total else None
    steps = [t for t in report["tokens"] if t["phase"] == "decode"]
    per_token = None
    if steps:
        per_token = {k: sum(t[k] for t in steps) / len(steps)
                     for k in ("seconds", "read_bytes", "read_chars", "majflt", "minflt")}
    last = samples[-1]
    return {
        "phases": phases,
        "decode_per_token": per_token,
        "peak_rss": _peak(samples, "rss"),
        "peak_cgroup_usage": _peak(samples, "cgroup_max_usage"),
        "experts_end": last["experts"],
        "kv_bytes_end": last["kv_bytes"],
    }


def load_report(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path) as f:
            report = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: memprof report not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a memprof JSON report ({e})") from None
    if not isinstance(report, dict) or report.get("schema") != SCHEMA:
        raise InputError(f"{path}: not a memprof report (no \"schema\": \"{SCHEMA}\")")
    if report.get("version") != VERSION:
        raise InputError(f"{path}: memprof report version {report.get('version')!r}; "
                         f"this gptoss reads version {VERSION}")
    missing = [k for k in REPORT_KEYS if k not in report]
    if missing:
        raise InputError(f"{path}: memprof report lacks {', '.join(missing)}")
    return report


# ---------------------------------------------------------------------------- text output


def _fmt_rate(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _fmt_count(x: float | None) -> str:
    return "-" if x is None else (f"{x:,.0f}" if abs(x) >= 100 or float(x).is_integer() else f"{x:.1f}")


def _fmt_fraction(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _fmt_seconds(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


# (label, how to get the value from a phase summary, how to print it)
PHASE_ROWS: list[tuple[str, Callable[[dict], Any], Callable[[Any], str]]] = [
    ("seconds", lambda p: p["seconds"], _fmt_seconds),
    ("tokens", lambda p: p["tokens"] or None, _fmt_count),
    ("tok/s", lambda p: p["tokens_per_second"], _fmt_rate),
    ("peak RSS", lambda p: p["peak"]["rss_peak"] or p["peak"]["rss"], format_bytes),
    ("  anonymous", lambda p: p["peak"]["rss_anon"], format_bytes),
    ("  file-backed", lambda p: p["peak"]["rss_file"], format_bytes),
    ("peak USS", lambda p: p["peak"]["uss"], format_bytes),
    ("peak PSS", lambda p: p["peak"]["pss"], format_bytes),
    ("peak swap", lambda p: p["peak"]["swap"], format_bytes),
    ("peak cgroup usage", lambda p: p["peak"]["cgroup_max_usage"], format_bytes),
    ("ckpt cached: dense", lambda p: p["peak"]["dense_fraction"], _fmt_fraction),
    ("ckpt cached: embedding", lambda p: p["peak"]["embedding_fraction"], _fmt_fraction),
    ("ckpt cached: experts", lambda p: p["peak"]["expert_fraction"], _fmt_fraction),
    ("experts fully cached", lambda p: p["peak"]["experts_resident"], _fmt_count),
    ("KV cache in use", lambda p: p["peak"]["kv_bytes"], format_bytes),
    ("expert cache", lambda p: p["peak"]["expert_cache_bytes"], format_bytes),
    ("read from disk", lambda p: p["delta"]["read_bytes"], format_bytes),
    ("read() bytes", lambda p: p["delta"]["read_chars"], format_bytes),
    ("major faults", lambda p: p["delta"]["majflt"], _fmt_count),
    ("minor faults", lambda p: p["delta"]["minflt"], _fmt_count),
    ("CPU seconds", lambda p: p["delta"]["cpu_user"] + p["delta"]["cpu_system"], _fmt_seconds),
]
TOKEN_ROWS: list[tuple[str, str, Callable[[Any], str]]] = [
    ("seconds", "seconds", _fmt_seconds),
    ("read from disk", "read_bytes", format_bytes),
    ("read() bytes", "read_chars", format_bytes),
    ("major faults", "majflt", _fmt_count),
    ("minor faults", "minflt", _fmt_count),
]


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows)
    return "\n".join(line.rstrip() for line in lines)


def _settings_line(report: dict[str, Any]) -> str:
    s, m = report["settings"], report["model"]
    limit = format_bytes(s["limit"]) if s["limit"] else "none"
    budget = "mmap only" if s["mmap_only"] else format_bytes(s["ram_budget"]) if s["ram_budget"] else "auto"
    return (f"{m['path']} ({format_bytes(m['file_bytes'])}: dense {format_bytes(m['dense_bytes'])}, embedding "
            f"{format_bytes(m['embedding_bytes'])}, experts {format_bytes(m['expert_bytes'])}); prompt "
            f"{s['prompt_tokens']} tokens, {s['max_tokens']} generated; limit {limit}, ram budget {budget}, "
            f"cold {'yes' if s['cold'] else 'no'}")


def format_summary(report: dict[str, Any]) -> str:
    summary = report["summary"]
    names = [p["name"] for p in report["phases"]]
    rows = [["", *names]]
    for label, get, fmt in PHASE_ROWS:
        rows.append([label, *(fmt(get(summary["phases"][n])) for n in names)])
    lines = [f"gptoss memprof: {_settings_line(report)}"]
    if report["settings"]["memory_plan"]:
        lines.append(f"memory plan: {report['settings']['memory_plan']}")
    lines += ["", _table(rows)]
    per_token = summary["decode_per_token"]
    if per_token:
        lines += ["", "per decode token (mean): " + ", ".join(
            f"{label} {fmt(per_token[key])}" for label, key, fmt in TOKEN_ROWS)]
    m = report["model"]
    lines.append(f"engine: scratch {format_bytes(m['scratch_bytes'])}, KV cache in use "
                 f"{format_bytes(summary['kv_bytes_end'])} of {format_bytes(m['kv_reserved_bytes'])} reserved, "
                 f"expert store {m['expert_store']}")
    if summary["experts_end"]:
        values = {**summary["experts_end"]["counters"], **summary["experts_end"]["derived"]}
        lines.append("expert store: " + ", ".join(f"{k}={_fmt_stat(v)}" for k, v in values.items()))
    if "profiler_seconds" in summary:
        lines.append(f"profiler: {len(report['samples'])} samples, {summary['profiler_seconds']:.2f} s inside the "
                     f"sampler ({summary['profiler_cpu_seconds']:.2f} s CPU)")
    return "\n".join(lines)


def _fmt_stat(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_compare(a: dict[str, Any], b: dict[str, Any], names: tuple[str, str] = ("A", "B")) -> str:
    """Two reports side by side: per phase, each measure for A and B and B/A."""
    lines = [f"{names[0]}: {_settings_line(a)}", f"{names[1]}: {_settings_line(b)}", ""]
    rows = [["", names[0], names[1], f"{names[1]}/{names[0]}"]]
    for phase in PHASES:
        pa, pb = a["summary"]["phases"].get(phase), b["summary"]["phases"].get(phase)
        if pa is None or pb is None:
            continue
        rows.append([f"[{phase}]", "", "", ""])
        for label, get, fmt in PHASE_ROWS:
            va, vb = get(pa), get(pb)
            rows.append([f"  {label}", fmt(va), fmt(vb), _ratio(va, vb)])
    ta, tb = a["summary"]["decode_per_token"], b["summary"]["decode_per_token"]
    if ta and tb:
        rows.append(["[per decode token]", "", "", ""])
        for label, key, fmt in TOKEN_ROWS:
            rows.append([f"  {label}", fmt(ta[key]), fmt(tb[key]), _ratio(ta[key], tb[key])])
    lines.append(_table(rows))
    return "\n".join(lines)


def _ratio(a, b) -> str:
    if a is None or b is None or not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or a == 0:
        return "-"
    return f"{b / a:.2f}x"


# ---------------------------------------------------------------------------- plot


def plot_report(report: dict[str, Any], path: str | os.PathLike) -> None:
    """A PNG timeline: memory (anonymous, file-backed, cgroup, cached checkpoint) over the phases; tok/s."""
    try:
        import matplotlib
    except ImportError:
        raise SetupError(MATPLOTLIB_MISSING) from None
    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    samples = report["samples"]
    gib = 2 ** 30
    t = [s["t"] for s in samples]

    def series(key: str) -> tuple[list[float], list[float]]:
        pts = [(s["t"], s[key] / gib) for s in samples if s[key] is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, (mem, speed) = plt.subplots(2, 1, figsize=(11, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    anon = [(s["rss_anon"] or 0) / gib for s in samples]
    file = [(s["rss_file"] or 0) / gib for s in samples]
    mem.stackplot(t, anon, file, labels=["RSS anonymous", "RSS file-backed (mapped checkpoint, libraries)"],
                  colors=["#4c72b0", "#9ecae1"], alpha=0.9, step="post")
    for key, label, style in (("cgroup_usage", "cgroup usage (incl. page cache)", "-"),
                              ("dense_resident", "checkpoint dense weights in page cache", "--"),
                              ("embedding_resident", "checkpoint embedding rows in page cache", "-."),
                              ("expert_resident", "checkpoint experts in page cache", ":")):
        x, y = series(key)
        if x:
            mem.plot(x, y, style, label=label, linewidth=1.5)
    limit = report["settings"].get("limit")
    if limit:
        mem.axhline(limit / gib, color="red", linewidth=1, label=f"limit {format_bytes(limit)}")
    colours = {"load": "#dddddd", "prefill": "#fde0c5", "decode": "#d9f0d3"}
    for ax in (mem, speed):
        for p in report["phases"]:
            end = p["end"] if p["end"] is not None else t[-1]
            ax.axvspan(p["start"], end, color=colours.get(p["name"], "#eeeeee"), alpha=0.5, zorder=0, linewidth=0)
    top, span = mem.get_ylim()[1], max(t[-1], 1e-9)
    for p in report["phases"]:
        end = p["end"] if p["end"] is not None else t[-1]
        narrow = (end - p["start"]) < 0.08 * span  # a short load phase: write its name upright
        mem.text((p["start"] + end) / 2, top, p["name"], va="top", ha="center", fontsize=9,
                 rotation=90 if narrow else 0)
    mem.set_ylabel("GiB")
    mem.legend(loc="upper left", fontsize=8, bbox_to_anchor=(0.0, 0.92))
    mem.set_title(f"gptoss memprof: {Path(report['model']['path']).name}, prompt "
                  f"{report['settings']['prompt_tokens']} tok, {report['settings']['max_tokens']} generated, "
                  f"limit {format_bytes(limit) if limit else 'none'}", fontsize=10)

    steps = [tok for tok in report["tokens"] if tok["phase"] == "decode" and tok["seconds"] > 0]
    speed.plot([tok["t"] for tok in steps], [1 / tok["seconds"] for tok in steps], ".-", color="#2ca02c",
               label="decode tok/s")
    speed.set_ylabel("tok/s")
    speed.set_xlabel("seconds")
    disk = speed.twinx()
    xs, rates = [], []
    for prev, cur in zip(samples, samples[1:]):
        if cur["t"] > prev["t"]:
            xs.append(cur["t"])
            rates.append((cur["read_bytes"] - prev["read_bytes"]) / (cur["t"] - prev["t"]) / 2 ** 20)
    disk.plot(xs, rates, color="#8c564b", linewidth=0.8, alpha=0.7, label="disk read MiB/s")
    disk.set_ylabel("disk MiB/s")
    speed.set_ylim(bottom=0)
    disk.set_ylim(bottom=0)
    handles = speed.get_legend_handles_labels()[0] + disk.get_legend_handles_labels()[0]
    speed.legend(handles, [h.get_label() for h in handles], loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- the command


def _write_outputs(args: argparse.Namespace, report: dict[str, Any]) -> None:
    print(format_summary(report), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"timeline written to {args.json}", file=sys.stderr)
    if args.plot:
        plot_report(report, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)


def _run_limited(args: argparse.Namespace) -> int:
    """Re-run this command in a child process placed in a fresh memory cgroup capped at args.limit_bytes."""
    group = MemoryCgroup.create(args.limit_bytes)
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="gptoss-memprof-args-") as args_file:
        json.dump({k: v for k, v in vars(args).items() if k != "func"}, args_file)
        args_file.flush()
        package_root = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        command = [sys.executable, "-m", "gptoss_stream.memprof", "--child", args_file.name, str(group.path)]
        try:
            # The child joins the group between fork and exec, so everything it maps or caches is charged there.
            child = subprocess.Popen(command, env=env, preexec_fn=lambda: group.add(os.getpid()))
            try:
                code = child.wait()
            except KeyboardInterrupt:
                # Ctrl-C reached the child too (same process group); interrupt it only if it did not stop.
                try:
                    child.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    child.send_signal(signal.SIGINT)
                    child.wait()
                raise
            if code == -signal.SIGKILL:
                peak = format_bytes(group.read("memory.max_usage_in_bytes"))
                if group.oom_kills():
                    raise SetupError(
                        f"out of memory: the kernel killed the workload inside the {format_bytes(args.limit_bytes)} "
                        f"memory cgroup (peak usage {peak}, limit hit {group.read('memory.failcnt')} times). "
                        "Raise --limit or lower --ram-budget.")
                raise SetupError(f"the workload was killed (SIGKILL; peak cgroup usage {peak})")
            return code if code >= 0 else 128 - code
        finally:
            group.remove()


def run_memprof(args: argparse.Namespace) -> int:
    if args.compare:
        a, b = (load_report(p) for p in args.compare)
        print(format_compare(a, b, (Path(args.compare[0]).name, Path(args.compare[1]).name)))
        return 0
    if not args.model or args.prompt is None:
        raise InputError("memprof needs -m MODEL_DIR and -p PROMPT (or --compare A.json B.json)")
    if args.max_tokens < 2:
        raise InputError(f"memprof needs -n >= 2 (one token from the prefill, at least one decode step), "
                         f"got {args.max_tokens}")
    if args.interval <= 0:
        raise InputError(f"--interval must be positive, got {args.interval}")
    if args.plot and importlib.util.find_spec("matplotlib") is None:  # fail before a long run, not after it
        raise SetupError(MATPLOTLIB_MISSING)
    if args.prompt == "-":
        args.prompt = sys.stdin.read()
    from gptoss_stream.budget import parse_size  # the same size syntax as --ram-budget

    args.limit_bytes = parse_size(args.limit) if args.limit else None
    args.command_line = " ".join(["gptoss", *sys.argv[1:]])
    if args.limit_bytes is not None:
        _require_root("--limit")
    if args.cold:
        from gptoss_stream.checkpoint import Checkpoint

        with Checkpoint.open(args.model) as checkpoint:
            files = checkpoint.files()
        drop_page_cache(files)
    if args.limit_bytes is not None:
        return _run_limited(args)
    _write_outputs(args, profile(args))
    return 0


def _child_main(argv: list[str]) -> int:
    """Entry point of the process that _run_limited starts inside the cgroup."""
    if len(argv) != 3 or argv[0] != "--child":
        print("usage: python -m gptoss_stream.memprof --child ARGS.json CGROUP_DIR "
              "(started by gptoss memprof --limit)", file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        args = argparse.Namespace(**json.load(f))
    try:
        _write_outputs(args, profile(args, MemoryCgroup(Path(argv[2]))))
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as e:
        print(f"gptoss: error: {e}", file=sys.stderr)
        return 1
    return 0


def add_parser(subparsers) -> None:
    from gptoss_stream import cli

    p = subparsers.add_parser(
        "memprof", help="profile memory, page cache and disk reads of a generation",
        description="Run a real generation (load, prefill, N tokens) and sample RSS (anonymous/file), USS/PSS, "
                    "page faults, disk reads, CPU time, the checkpoint's page-cache residency (dense weights vs "
                    "experts) and the engine's own counters; print a per-phase summary, and optionally write the "
                    "timeline as JSON and a PNG plot. --limit runs it inside a memory cgroup (root) to emulate a "
                    "smaller box. See docs/memprof.md.",
    )
    cli.add_model_arguments(p)
    # -m is required for a run but not for --compare; run_memprof checks it.
    for action in p._actions:
        if action.dest == "model":
            action.required = False
    p.add_argument("-p", "--prompt", default=None, help="the prompt text, or - to read it from stdin")
    p.add_argument("--raw", action="store_true", help="no chat template: feed the prompt's tokens as they are")
    cli.add_sampling_arguments(p)
    p.set_defaults(max_tokens=16)
    p.add_argument("--limit", default=None, metavar="SIZE",
                   help="run inside a cgroup v1 memory limit of SIZE (e.g. 4G; page cache counts) to emulate a "
                        "smaller box; needs root")
    p.add_argument("--cold", action="store_true",
                   help="drop the page cache first (sync; echo 3 > /proc/sys/vm/drop_caches); needs root")
    p.add_argument("--interval", type=float, default=DEFAULT_INTERVAL, metavar="SECONDS",
                   help=f"sampling period of the background thread (default {DEFAULT_INTERVAL})")
    p.add_argument("--json", default=None, metavar="OUT", help="write the full timeline as JSON (docs/memprof.md)")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="draw the timeline as a PNG (needs matplotlib)")
    p.add_argument("--compare", nargs=2, default=None, metavar=("A.json", "B.json"),
                   help="print two saved runs side by side instead of profiling")
    p.set_defaults(func=run_memprof)


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
