"""What produced an artefact (settings and code), so that nothing trained under other ones is reused unnoticed.

Benchmark rows, supernet checkpoints and search logs are keyed on ``artefact_key(settings)``: a digest of the
settings that shape them and of ``code_version()``, a digest of the package's own sources and yaml files. A
content digest, not only the git commit: it also covers uncommitted edits and installed wheels. The commit is
recorded beside it for people (``git_commit``). Neither is cached: a benchmark process that runs for hours
stamps each row with the code as it is when the row starts.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent
# Files that only DARec-family models run: a RecBole baseline's row does not go stale when they change.
PLUGIN_MODEL_PARTS = ("model", "search")


def code_version(plugin_models: bool = True) -> str:
    """12 hex digits over the package's .py and .yaml files.

    ``plugin_models=False`` (a RecBole model's row): without model/, search/ and the plugin models' own yaml."""
    from recbole_darec.config import PROPERTIES_DIR

    files = [p for p in PACKAGE_DIR.rglob("*.py") if "__pycache__" not in p.parts]
    yaml_files = list(PROPERTIES_DIR.rglob("*.yaml"))
    if not plugin_models:
        files = [p for p in files if p.relative_to(PACKAGE_DIR).parts[0] not in PLUGIN_MODEL_PARTS]
        # properties/model/*.yaml are the plugin models' own (DARecCore.yaml, DARec.yaml, ...): read only when a
        # plugin model is built.
        yaml_files = [p for p in yaml_files if p.parent.name != "model"]
    digest = hashlib.sha256()
    for root, paths in ((PACKAGE_DIR, files), (PROPERTIES_DIR, yaml_files)):
        for path in sorted(paths):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def git_commit() -> str | None:
    """The checkout's commit (with ``+changes`` when tracked files differ from it), or None outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=PACKAGE_DIR, capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        return commit + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def artefact_key(settings: Mapping[str, Any], keys: Iterable[str]) -> str:
    """12 hex digits over the ``keys`` of ``settings`` and the (whole package's) code version."""
    chosen = {key: settings[key] if key in settings else None for key in keys}
    text = json.dumps(chosen, sort_keys=True, default=str) + code_version()
    return hashlib.sha256(text.encode()).hexdigest()[:12]
