"""Append-only JSON-lines log of architecture-search trials.

One line per finished trial, written and fsynced as soon as the trial ends, so that a search killed at any
point loses at most the trial in flight and can resume from the log.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from recbole_darec.files import append_json_line, read_json_lines
from recbole_darec.model.adapters import str_to_arch

logger = logging.getLogger(__name__)


@dataclass
class Trial:
    """One evaluated architecture."""

    index: int
    arch: str
    value: float
    seconds: float
    method: str
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Trial:
        str_to_arch(d["arch"])  # validate the letters
        return cls(
            index=int(d["index"]),
            arch=str(d["arch"]),
            value=float(d["value"]),
            seconds=float(d["seconds"]),
            method=str(d["method"]),
            extra=dict(d.get("extra") or {}),
        )


class TrialLog:
    """A JSON-lines file of `Trial` records."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def read(self) -> list[Trial]:
        """All well-formed trials in file order; a missing file is an empty log. A malformed record (typically the
        last one, cut short when the process was killed mid-write) is reported and skipped."""
        trials = []
        for line_number, record in read_json_lines(self.path):
            try:
                trials.append(Trial.from_dict(record))
            except (ValueError, KeyError, TypeError) as err:
                logger.warning("%s:%d: skipping malformed trial record (%s)", self.path, line_number, err)
        return trials

    def append(self, trial: Trial) -> None:
        """Append one trial as one line and force it to disk."""
        append_json_line(self.path, asdict(trial))
