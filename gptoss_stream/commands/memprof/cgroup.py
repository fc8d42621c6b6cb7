"""The cgroup v1 memory group `gptoss memprof --limit` runs its workload in, and dropping the page cache
for `--cold` (both need root)."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from gptoss_stream.errors import SetupError
from gptoss_stream.commands.memprof.proc import ProcReader

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
    from gptoss_stream.commands.memprof.residency import evict_files

    _require_root("--cold")
    evict_files(paths)
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
    except OSError as e:
        raise SetupError(f"--cold: cannot write /proc/sys/vm/drop_caches: {e}") from None

