"""Reading the process from /proc (status, smaps_rollup, io) and getrusage, for memprof's sampler."""

from __future__ import annotations

import os
import resource


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

