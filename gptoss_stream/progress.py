"""A dependency-free progress bar for long byte-moving jobs (writing, repacking, prefetching).

On a terminal it redraws one line in place (about 10 times a second); when stderr is a file or a
pipe it prints a plain line every few seconds instead, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

# Decimal units, like disk vendors, `ls --si` and the sizes quoted in SPEC.md (13.8 GB for 20b).
_UNITS = ((10**12, "TB"), (10**9, "GB"), (10**6, "MB"), (10**3, "KB"))


# Binary units (as cgroups and memory sizes are read), two digits: budget.format_size.
_BINARY_UNITS = ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB"))


def format_bytes(n: float, binary: bool = False) -> str:
    """The one size formatter: decimal units with one digit (files, disks, rates), or binary ones with two
    (memory budgets and limits)."""
    units, digits = (_BINARY_UNITS, 2) if binary else (_UNITS, 1)
    for scale, unit in units:
        if abs(n) >= scale:
            return f"{n / scale:.{digits}f} {unit}"
    return f"{int(n)} B"


def format_duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):  # NaN or unknown
        return "--:--"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ProgressBar:
    """bytes done / total, percent, MB/s and ETA.

    with ProgressBar(total_bytes, "writing") as bar:
        for chunk in chunks: f.write(chunk); bar.update(len(chunk))
    """

    def __init__(self, total: int, label: str = "", stream: TextIO | None = None, enabled: bool = True,
                 width: int = 30, interval: float | None = None, clock=time.monotonic):
        self.total = max(int(total), 0)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.width = width
        self.done = 0
        self._clock = clock
        self._start = clock()
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        # A terminal shows the bar at once; a log gets its first line after one interval.
        self._last_draw = -float("inf") if self._tty else self._start
        self.interval = interval if interval is not None else (0.1 if self._tty else 5.0)
        self._closed = False

    @property
    def elapsed(self) -> float:
        return self._clock() - self._start

    @property
    def rate(self) -> float:
        """Bytes per second since the start."""
        e = self.elapsed
        return self.done / e if e > 0 else 0.0

    def line(self) -> str:
        frac = self.done / self.total if self.total else 1.0
        frac = min(max(frac, 0.0), 1.0)
        filled = int(frac * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        rate = self.rate
        # The first fraction of a second says little about the rate: show no ETA until it settles.
        settled = self.elapsed >= 1.0 or self.done >= self.total
        eta = (self.total - self.done) / rate if rate > 0 and settled else float("nan")
        label = f"{self.label} " if self.label else ""
        return (f"{label}[{bar}] {frac * 100:5.1f}% {format_bytes(self.done)}/{format_bytes(self.total)} "
                f"{rate / 1e6:7.1f} MB/s ETA {format_duration(eta)}")

    def update(self, n: int) -> None:
        self.done += n
        now = self._clock()
        if now - self._last_draw >= self.interval:
            self._draw(final=False)
            self._last_draw = now

    def _draw(self, final: bool) -> None:
        if not self.enabled:
            return
        text = self.line()
        if final:
            text += f" in {format_duration(self.elapsed)}"
        if self._tty:
            self.stream.write("\r" + text + "\x1b[K" + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._draw(final=True)

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
