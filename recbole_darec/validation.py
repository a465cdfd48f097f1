"""One check of the settings a run is given, before it loads any data: types from the yaml defaults, ranges from
``properties/ranges.yaml``.

Without it a wrong value surfaced late and far from its cause: ``--learning_rate=fast`` as a TypeError in the
optimizer, ``--temperature=0`` as "Training loss is nan" after an epoch, ``--epochs=-1`` as untrained test metrics,
``--llm_layers=0`` as silently every layer. A setting's type is that of its default (or the "(int)" / "(float)"
/ "(bool)" tag of its yaml comment, RecBole's convention: some float defaults are written as 0); the range table
adds what a type does not say. Only the values a user gives are checked: the defaults are the package's own.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from recbole_darec.errors import SettingError

_RULE = re.compile(r"^(?:(?P<each>list)\s*)?(?:(?P<kind>int|float)\s*)?"
                   r"(?:(?P<open>[\[(])\s*(?P<low>[^,\s]+)\s*,\s*(?P<high>[^\])\s]+)\s*(?P<close>[\])]))?"
                   r"\s*(?P<folder>folder)?\s*(?P<nullable>or ~)?$")
# "epochs: 200   # (int) The number of ...": a comment's type tag and the words after it.
_COMMENTED_KEY = re.compile(r"^(?P<key>[A-Za-z_][\w-]*)\s*:[^#]*#\s*(?:\((?P<tag>[a-z ]+)\)\s*)?(?P<text>.*)$")
_TYPES = {"int": int, "float": float, "bool": bool}


@dataclass(frozen=True)
class Rule:
    """A declared range (``properties/ranges.yaml``): an interval, a folder the run writes, or both unset;
    ``each``: the setting is a list whose every element is a number in the interval."""

    spec: str
    kind: type | None = None  # the type of a setting whose default is ~
    low: float = -math.inf
    high: float = math.inf
    low_closed: bool = False
    high_closed: bool = False
    folder: bool = False
    nullable: bool = False
    each: bool = False

    @classmethod
    def parse(cls, spec: str) -> Rule:
        match = _RULE.match(str(spec).strip())
        if match is None or not any(match.group(name) for name in ("kind", "open", "folder", "nullable")):
            raise ValueError(f"properties/ranges.yaml: cannot read the range {spec!r} (e.g. '[1, inf)', "
                             "'(0, inf) or ~', 'int [1, inf)', 'list [0, inf)', 'folder')")
        bounds = {}
        if match["open"]:
            bounds = dict(low=float(match["low"]), high=float(match["high"]), low_closed=match["open"] == "[",
                          high_closed=match["close"] == "]")
        return cls(spec=spec, kind=_TYPES.get(match["kind"] or ""), folder=bool(match["folder"]),
                   nullable=bool(match["nullable"]), each=bool(match["each"]), **bounds)

    def holds(self, number: float) -> bool:
        above = number >= self.low if self.low_closed else number > self.low
        below = number <= self.high if self.high_closed else number < self.high
        return above and below

    def words(self) -> str:
        """The interval in words: "at least 1", "greater than 0", "at least 0 and below 1"."""
        parts = []
        if self.low > -math.inf:
            parts.append(f"{'at least' if self.low_closed else 'greater than'} {self.low:g}")
        if self.high < math.inf:
            parts.append(f"{'at most' if self.high_closed else 'below'} {self.high:g}")
        return " and ".join(parts)


@functools.cache
def load_rules(path: Path) -> tuple[tuple[str, Rule], ...]:
    """(pattern, rule) of the range table, in file order (the first match wins)."""
    with open(path, encoding="utf-8") as handle:
        table = yaml.safe_load(handle) or {}
    return tuple((str(pattern), Rule.parse(spec)) for pattern, spec in table.items())


def rule_for(key: str, rules: Iterable[tuple[str, Rule]]) -> Rule | None:
    return next((rule for pattern, rule in rules if fnmatch.fnmatchcase(key, pattern)), None)


@functools.cache
def _yaml_comments(path: str) -> dict[str, tuple[str | None, str]]:
    """key -> (type tag, description) of the top-level keys of a yaml file that carry a comment."""
    notes = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            match = _COMMENTED_KEY.match(line)
            if match:
                # The first clause: a comment that goes on ("...; amazon-scientific has ...") is for readers.
                notes[match["key"]] = (match["tag"], match["text"].split("; ")[0].strip().rstrip(".:"))
    return notes


def yaml_note(key: str, files: Iterable[str | os.PathLike]) -> tuple[str | None, str]:
    """(type tag, description) from the comment of ``key`` in the highest-precedence yaml layer that has one
    (``files``: low to high precedence); (None, "") without a comment."""
    for file in reversed([str(file) for file in files]):
        note = _yaml_comments(file).get(key)
        if note is not None:
            return note
    return None, ""


def expected_type(default: Any, tag: str | None, rule: Rule | None) -> type | None:
    """int, float or bool for a setting whose value must be one, else None (strings, lists, dicts: RecBole reads
    several spellings of them, e.g. topk: 10 or [10, 50])."""
    if rule is not None and rule.each:
        return None  # the elements are checked, not the list
    if rule is not None and rule.kind is not None:
        return rule.kind
    if tag in _TYPES:
        return _TYPES[tag]
    return type(default) if type(default) in (bool, int, float) else None


def _type_problem(value: Any, kind: type) -> str | None:
    if kind is bool:
        return None if isinstance(value, bool) else "must be True or False"
    if kind is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "must be a whole number"
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return None if is_number else "must be a number"


def folder_problem(path: str) -> str | None:
    """Why ``path`` cannot be a folder this run writes (created if missing), or None. Nothing is left behind."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path) and not os.path.isdir(path):
        return "is a file, not a folder"
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"lies inside {existing}, which is a file, not a folder"
    try:  # the only portable test of "may create folders here": create one (root ignores permission bits)
        os.rmdir(tempfile.mkdtemp(prefix=".recbole-darec-check-", dir=existing))
    except OSError as exc:
        return f"cannot be created or written in {existing} ({exc.strerror or exc})"
    return None


def _list_problem(value: Any, rule: Rule, or_none: str) -> str | None:
    """What is wrong with ``value`` as a non-empty list of numbers each in ``rule``'s interval, or None."""
    wanted = f"a list of one or more {'whole numbers' if rule.kind is int else 'numbers'} {rule.words()}".rstrip()
    if not isinstance(value, (list, tuple)) or not value:
        return f"must be {wanted}{or_none}"
    for position, number in enumerate(value):
        problem = _type_problem(number, rule.kind or float)
        if problem is None and not rule.holds(number):
            problem = f"must be {rule.words()}"
        if problem:
            return f"element {position} ({number!r}) {problem}: give {wanted}{or_none}"
    return None


def setting_problem(key: str, value: Any, default: Any, tag: str | None, rule: Rule | None) -> str | None:
    """What is wrong with ``value`` for setting ``key`` (default ``default``), in words, or None."""
    if value is None:
        if default is None or rule is None or rule.nullable:
            return None
        return "needs a value (~ is not allowed here)"
    kind = expected_type(default, tag, rule)
    problem = _type_problem(value, kind) if kind is not None else None
    if problem:
        return problem
    if rule is None:
        return None
    or_none = ", or ~" if rule.nullable or default is None else ""
    if rule.each:
        return _list_problem(value, rule, or_none)
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if is_number and rule.words() and not rule.holds(value):
        return f"must be {rule.words()}{or_none}"
    if rule.folder:
        return folder_problem(str(value))
    return None


def setting_error(key: str, value: Any, default: Any, where: str, files: Iterable[str | os.PathLike],
                  rules: Iterable[tuple[str, Rule]]) -> SettingError | None:
    """A one-line SettingError for ``value`` of ``key`` given at ``where`` (the command line, a file and line,
    ...), naming what the setting is (its yaml comment) and its default; None if the value is fine."""
    files = list(files)
    tag, description = yaml_note(key, files)
    problem = setting_problem(key, value, default, tag, rule_for(key, rules))
    if problem is None:
        return None
    default_text = "~" if default is None else repr(default) if isinstance(default, str) else str(default)
    about = f"{key}: {description}; default {default_text}" if description else f"default {default_text}"
    return SettingError(f"{where}: {problem} ({about}).")
