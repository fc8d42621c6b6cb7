"""Errors the user can fix, told apart from bugs.

The command line prints a UserError as one line (`gptoss: error: ...`): the message says what is wrong with
the input and what to do. Any other exception is a bug in gptoss and is shown with its traceback.
"""

from __future__ import annotations

import errno


class UserError(Exception):
    """Bad input or a bad environment the user can fix: a missing or damaged checkpoint, a budget too small,
    a context too short, a file changed under a running process."""


class CheckpointError(UserError, ValueError):
    """The checkpoint folder is missing, incomplete or damaged."""


class InputError(UserError, ValueError):
    """An argument or a destination the command cannot use as given (a bad option, an occupied folder)."""


class DiskSpaceError(InputError):
    """The destination's file system cannot hold what a command would write; raised before anything is
    written, with the space needed and the space available."""


class DataError(UserError, RuntimeError):
    """Data or the machine failed a check: a file differs from its manifest or its source, a file ended
    early, the disk is full."""


class SetupError(UserError, RuntimeError):
    """The machine lacks something the command needs: root, a cgroup controller, an optional package."""


# Files that are not there, not ours to read or write, or a full disk: the input or the machine, not a bug.
USER_OS_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
USER_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def is_user_error(e: BaseException) -> bool:
    """Whether the command line should report `e` as one line (bad input or machine) rather than a bug."""
    return isinstance(e, (UserError, *USER_OS_ERRORS)) or isinstance(e, OSError) and e.errno in USER_ERRNOS
