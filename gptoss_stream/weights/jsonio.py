"""Reading the JSON a checkpoint carries (config.json, the HF index, the repack manifest, safetensors headers)
in bounded time and memory, whatever the file holds.

json.loads alone is not enough for a hostile file: 100k nested brackets escape as RecursionError, an integer
of more than 4300 digits as a bare ValueError without the file's name, and a multi-GB "config.json" would be
read whole. Here every failure is a ValueError naming the file, and a file larger than its kind can be is
refused before it is read.
"""

from __future__ import annotations

import json
import os
from typing import Any

# Far above any real file of each kind (the 120b HF index is ~50 KB, its config ~2 KB; a repack manifest is
# ~100 bytes per expert), far below what would hurt a small machine.
MAX_CONFIG_BYTES = 1 << 20
MAX_INDEX_BYTES = 64 << 20
MAX_MANIFEST_BYTES = 256 << 20


def parse_json(raw: bytes, where: str) -> Any:
    """json.loads for bytes from `where` (a file name, for messages): ValueError for anything malformed."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not valid JSON (not UTF-8: {e})") from None
    except RecursionError:
        # The C scanner counts its depth against the recursion limit and unwinds cleanly.
        raise ValueError(f"{where}: not valid JSON (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, and int() refusing a number of more than 4300 digits
        raise ValueError(f"{where}: not valid JSON ({e})") from None


def read_json_file(path: str | os.PathLike, max_bytes: int, what: str) -> Any:
    """The parsed content of a JSON file of at most max_bytes (`what` names the kind of file in messages)."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise ValueError(f"{path}: {size} bytes, more than a {what} can be ({max_bytes} bytes at most)")
        raw = f.read(max_bytes + 1)  # the file may grow between fstat and read: never read more than allowed
    if len(raw) > max_bytes:
        raise ValueError(f"{path}: more than a {what} can be ({max_bytes} bytes at most)")
    return parse_json(raw, str(path))


def is_plain_file_name(name: object) -> bool:
    """Whether a file name read from a JSON file names a file in the same folder (no path, no NUL, UTF-8, not
    too long for the file system): anything else is refused before it reaches the file system."""
    if not isinstance(name, str) or "/" in name or "\0" in name or name in ("", ".", ".."):
        return False
    try:
        return len(name.encode("utf-8")) <= 255
    except UnicodeEncodeError:  # a lone surrogate ("\ud800" in the JSON)
        return False
