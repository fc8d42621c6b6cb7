"""Opening a checkpoint: the one module that knows every layout and picks the one a path holds.

    open_checkpoint(path)      a directory with a `gptoss repack` manifest -> layouts.repacked.RepackedCheckpoint
                               original/ or Hugging Face folder            -> layouts.published.PublishedCheckpoint

Every layout implements layouts.base.NamedWeights, so what comes back reads the same whatever the files look
like. A new layout is a module in layouts/ (depending on layouts/base.py only) plus one branch here.
`Checkpoint.open(path)` is the same call under the name the rest of the package (and its users) know.
"""

from __future__ import annotations

import abc
import os

from gptoss_stream.errors import CheckpointError
from gptoss_stream.weights.layouts import repacked
from gptoss_stream.weights.layouts.base import NamedWeights
from gptoss_stream.weights.layouts.published import PublishedCheckpoint


def open_checkpoint(path: str | os.PathLike, format: str | None = None) -> NamedWeights:
    """The checkpoint at `path` in whichever layout it is; `format` ('original', 'hf', 'repacked') insists on one."""
    if format in (None, repacked.FORMAT) and repacked.is_repacked(path):  # `gptoss repack` output has its own reader
        return repacked.RepackedCheckpoint.open(path)
    return PublishedCheckpoint.open(path, format)


def open_user_checkpoint(path: str | os.PathLike, format: str | None = None) -> NamedWeights:
    """open_checkpoint for a path the user gave: a missing, incomplete or damaged checkpoint is a
    CheckpointError (a user error) with the reader's message."""
    try:
        return open_checkpoint(path, format)
    except (ValueError, OSError) as e:  # opening validates every file, header, dtype and shape
        raise CheckpointError(str(e)) from e


class Checkpoint(abc.ABC):
    """Any checkpoint, whatever its layout (every NamedWeights is one); `Checkpoint.open` is open_checkpoint."""

    open = staticmethod(open_checkpoint)


Checkpoint.register(NamedWeights)
