"""Atomic file writes: a crash, a full disk or Ctrl-C mid-write never leaves a truncated file under the real name."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch


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
