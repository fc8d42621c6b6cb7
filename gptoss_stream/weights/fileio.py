"""The pread loop shared by the streaming reader (O_DIRECT expert records) and repack (copying a source)."""

from __future__ import annotations

import os


def pread_into(fd: int, view: memoryview, offset: int, need: int | None = None, block: int = 1) -> tuple[int, int]:
    """The pread loop: read the file from `offset` into `view` until `need` bytes (default all of view) are
    in or the file ends; returns (bytes read, preadv calls). Fewer bytes than needed: the file ended (with
    O_DIRECT, pass block=ALIGN: a read that is not a whole number of blocks short of `need` is the end).
    OSError passes through."""
    need = len(view) if need is None else need
    got = calls = 0
    while got < need:
        n = os.preadv(fd, [view[got:]], offset + got)
        calls += 1
        got += n
        if n == 0 or n % block:
            break
    return got, calls
