"""The sampler: a background thread plus the workload's phase and token boundaries, each taking one sample
of every measure (SAMPLE_KEYS); the slow ones (smaps_rollup, mincore) keep to SLOW_SHARE of the wall time."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from gptoss_stream.errors import InputError
from gptoss_stream.commands.memprof.cgroup import MemoryCgroup
from gptoss_stream.commands.memprof.proc import ProcReader, read_rusage, reset_peak_rss

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

