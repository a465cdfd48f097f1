"""Append-only JSON-lines log of architecture-search trials.

One line per finished trial, written and fsynced as soon as the trial ends, so that a search killed at any
point loses at most the trial in flight and can resume from the log.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

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
        """All well-formed trials in file order; a missing file is an empty log.

        A malformed line (typically the last one, cut short when the process was killed mid-write) is
        reported and skipped rather than raised: losing one trial must not make the whole search unusable.
        """
        if not self.path.exists():
            return []
        trials = []
        with open(self.path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    trials.append(Trial.from_dict(json.loads(line)))
                except (ValueError, KeyError, TypeError) as err:
                    logger.warning("%s:%d: skipping malformed trial record (%s)", self.path, lineno, err)
        return trials

    def append(self, trial: Trial) -> None:
        """Append one trial as one line and force it to disk."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = trial.to_json() + "\n"
        # A kill mid-write leaves a partial line without its newline; start on a fresh line so the new
        # record is not glued onto the fragment (which would corrupt it too).
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = "\n" + line
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
