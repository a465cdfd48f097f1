"""The errors a user's input causes, and the one policy every entry point applies to them.

The bottom layer of the package: it imports nothing from ``recbole_darec``, so the data, model and command-line
modules can all raise these errors and run through ``run_cli`` without importing one another.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

PACKAGE = __name__.partition(".")[0]


class DatasetUnavailableError(RuntimeError):
    """The raw files of a dataset are neither in ``raw_dir`` nor downloadable."""


class RawDataError(RuntimeError):
    """A raw file is unusable as a whole (e.g. a truncated gzip)."""


class SettingError(ValueError):
    """A setting has the wrong type, or a value outside its declared range (properties/ranges.yaml)."""


def _is_user_error(exc: BaseException) -> bool:
    # Every exception class of this package is raised on purpose, with a message for the user
    # (BackboneNotFoundError, CheckpointMismatchError, ...); a bug surfaces as one of Python's or torch's own.
    if type(exc).__module__.partition(".")[0] == PACKAGE:
        return True
    if isinstance(exc, (ValueError, FileNotFoundError)):
        return True
    return isinstance(exc, RuntimeError) and "checkpoint" in str(exc)  # DARec.load_state_dict: settings differ


def user_error_message(exc: BaseException) -> str | None:
    """The one-line message of an error caused by the user's input (settings, files, checkpoints), or None for a
    bug, whose traceback should be shown. The scripts print the message instead of a traceback."""
    if not _is_user_error(exc):
        return None
    return "error: " + " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def run_cli(main: Callable[[], object]) -> int:
    """Run a script's ``main``; the exit status. An error in the user's input prints its one line (what is wrong and
    how to fix it) instead of a traceback and gives 2; ``RECBOLE_DAREC_TRACEBACK=1`` shows the traceback anyway."""
    try:
        main()
    except Exception as exc:
        message = user_error_message(exc)
        if message is None or os.environ.get("RECBOLE_DAREC_TRACEBACK"):
            raise
        print(message, file=sys.stderr)
        return 2
    return 0
