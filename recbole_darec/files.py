"""Crash-safe files: a crash, a full disk or Ctrl-C mid-write never leaves a truncated file under the real name, and
an append-only log loses at most the record being written."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_args: Any) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` in one rename, on failure it goes.

    The temporary name holds the process id: two runs writing the same cache (one per GPU) never share one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp_path, mode, **open_args) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the rename must not become visible before the data is on disk
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_torch_save(obj: Any, path: str | os.PathLike, **save_args: Any) -> None:
    """``torch.save(obj, ..., **save_args)`` through ``atomic_write``.

    torch's default pickle protocol (2) unless ``save_args`` say otherwise: ``torch.load(weights_only=True)``, which
    reads the caches, rejects protocol 4's framing."""
    with atomic_write(path) as f:
        torch.save(obj, f, **save_args)


def append_json_line(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append ``record`` to a JSON-lines log as one line and force it to disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True) + "\n"
    # A kill mid-write leaves a partial line without its newline; start on a fresh line so the new record is not
    # glued onto the fragment (which would corrupt it too).
    if path.exists() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_json_lines(path: str | os.PathLike) -> list[tuple[int, Any]]:
    """(line number, record) of every line of a JSON-lines log that parses; a missing file is an empty log.

    A line that does not parse (typically the last one, cut short when the process was killed mid-write) is
    reported and skipped rather than raised: losing one record must not make the whole log unusable."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append((line_number, json.loads(line)))
            except ValueError as err:
                logger.warning("%s:%d: skipping a malformed record (%s)", path, line_number, err)
    return records
