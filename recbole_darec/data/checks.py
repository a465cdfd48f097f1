"""Checks of the user's files and settings, run before RecBole reads them.

RecBole's own errors for these inputs name no file, line or setting ("[timestamp] is not exist in interaction
[...]", pandas' "could not convert string to float", "Some feat is empty"), or come as a download prompt. Every
check here raises one line that says what is wrong, where, and what to do; the scripts print it without a
traceback (errors.user_error_message). Nothing is written before they pass, so a bad input never touches a
previous checkpoint or prepared data.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import numpy as np

from recbole_darec.data.item_text import item_file_path

logger = logging.getLogger(__name__)

# RecBole's FeatureType values: every header cell of a file it reads is "name:type" with one of them.
FIELD_TYPES = ("token", "token_seq", "float", "float_seq")
FILTER_SETTINGS = ("user_inter_num_interval", "item_inter_num_interval", "val_interval", "rm_dup_inter",
                   "unused_col", "filter_inter_by_user_or_item")


def inter_file_path(config) -> str:
    # RecBole has already joined data_path and the dataset name.
    return os.path.join(config["data_path"], f"{config['dataset']}.inter")


def _refuse_repeated_columns(file: str, header_line: str, names: list[str]) -> None:
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"{file}, line 1: the header {header_line!r} names {', '.join(repeated)} more than once; "
                         "give every column its own name.")


def _decoded_lines(file: str, encoding: str, strict: bool = True) -> Iterator[tuple[int, str]]:
    """(line number, text without its line end) of every line. ``strict``: a byte the encoding cannot read is an
    error that names the line (RecBole's pandas reader names neither file nor line), else it is replaced."""
    with open(file, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode(encoding, errors="strict" if strict else "replace")
            except UnicodeDecodeError as exc:
                raise ValueError(
                    f"{file}, line {line_number}: byte {raw[exc.start:exc.start + 1]!r} at column {exc.start + 1} is "
                    f"not {encoding}; save the file as {encoding}, or set `encoding:` to the one it is written in "
                    "(e.g. latin-1)."
                ) from None
            yield line_number, text.rstrip("\r\n")


def _check_header_types(file: str, header_line: str, separator: str) -> None:
    """Every header cell is ``name:type`` as RecBole reads it (its error: "not enough values to unpack")."""
    for cell in header_line.split(separator):
        name, colon, kind = cell.partition(":")
        if not colon or kind not in FIELD_TYPES:
            found = f"has the type {kind!r}" if colon else "has no type"
            raise ValueError(
                f"{file}, line 1: the column {cell!r} {found}; write every column as name:type with a type of "
                f"{', '.join(FIELD_TYPES)} (e.g. '{name or 'item_id'}:token'), separated by {separator!r}."
            )


def _recbole_reads(config, suffix: str) -> bool:
    # RecBole loads an atomic file when load_col names it, or loads every file when load_col is ~.
    load_col = config["load_col"]
    return load_col is None or (isinstance(load_col, dict) and suffix in load_col)


def check_dataset_files(config) -> None:
    """``<data_path>/<dataset>.inter`` must exist."""
    data_path = config["data_path"]
    inter_file = inter_file_path(config)
    if os.path.isfile(inter_file):
        return
    if os.path.isfile(data_path):
        raise FileNotFoundError(
            f"{data_path} is a file, not a dataset folder (dataset '{config['dataset']}'): the atomic files go in a "
            f"folder {data_path}/ (<dataset>.inter, .item), or set --data_path to the folder that holds it."
        )
    what = "file" if os.path.isdir(data_path) else "dataset folder"
    raise FileNotFoundError(
        f"{what} not found: {inter_file if what == 'file' else data_path} (dataset '{config['dataset']}'); put the "
        f"RecBole atomic files <dataset>.inter (and .item) there or set --data_path; see dataset/README.md."
    )


def _needed_columns(config) -> dict[str, str]:
    """Column name -> the setting that names it."""
    needed = {config["USER_ID_FIELD"]: "USER_ID_FIELD", config["ITEM_ID_FIELD"]: "ITEM_ID_FIELD"}
    if config["TIME_FIELD"]:  # the leave-one-out split and the sequences are ordered by it
        needed[config["TIME_FIELD"]] = "TIME_FIELD"
    load_col = config["load_col"]
    if isinstance(load_col, dict):
        for name in load_col.get("inter", None) or []:
            needed.setdefault(name, "load_col.inter")
    return {name: setting for name, setting in needed.items() if name}


def check_inter_file(config) -> None:
    """The ``.inter`` file is readable in the configured encoding, its header has every column the run needs (each
    as name:type), it has data rows, and every ``:float`` column that is loaded holds numbers (the first bad line
    is named)."""
    inter_file = inter_file_path(config)
    separator = config["field_separator"] or "\t"
    lines = _decoded_lines(inter_file, config["encoding"] or "utf-8")
    _, header_line = next(lines, (1, ""))
    header = [cell.split(":", 1) for cell in header_line.split(separator)]
    names = [cell[0].strip() for cell in header]
    _refuse_repeated_columns(inter_file, header_line, names)
    needed = _needed_columns(config)
    for name, setting in needed.items():
        if name not in names:
            raise ValueError(
                f"{inter_file}, line 1: no '{name}' column (needed by {setting}) in the header "
                f"{header_line!r}; add the column, or point {setting} at a column that exists."
            )
    _check_header_types(inter_file, header_line, separator)
    float_columns = [(index, name) for index, (name, *kind) in enumerate(header)
                     if kind and kind[0].strip() == "float" and name in needed]
    rows = 0
    for line_number, line in lines:
        if not line.strip():
            continue
        rows += 1
        cells = line.split(separator)
        for index, name in float_columns:
            value = cells[index].strip() if index < len(cells) else ""
            try:
                number = float(value)
            except ValueError:
                raise ValueError(
                    f"{inter_file}, line {line_number}: '{name}' is {value!r}, not a number; "
                    f"'{name}:float' columns must hold numbers (timestamps as Unix seconds). Fix or drop the row."
                ) from None
            # The split orders each user's interactions by time: NaN sorts nowhere, a negative time is a
            # broken export.
            if name == config["TIME_FIELD"] and not number >= 0:
                raise ValueError(
                    f"{inter_file}, line {line_number}: '{name}' is {value!r}; timestamps order the interactions "
                    "and must be non-negative numbers (Unix seconds, or 0, 1, 2, ... in time order). Fix or "
                    "drop the row."
                )
    if rows == 0:
        raise ValueError(f"{inter_file} has no interactions (only the header line); add rows, one per interaction.")


def check_item_file(config) -> None:
    """An ``.item`` file that the run reads (item text for DARec-family models, or ``load_col.item``) has a header
    with the item id column (named once) and at least one row. Without the file a run has no item text: that is
    allowed (a warning), a broken one is not. When RecBole reads it too, every byte must decode and every header
    cell carry a type, as in the ``.inter`` file (item_text.py's own reader only warns about bad rows)."""
    item_file = item_file_path(config)
    recbole_reads = _recbole_reads(config, "item")
    if not ((config["item_max_tokens"] is not None or recbole_reads) and os.path.isfile(item_file)):
        return
    separator = config["field_separator"] or "\t"
    lines = _decoded_lines(item_file, config["encoding"] or "utf-8", strict=recbole_reads)
    _, header_line = next(lines, (1, ""))
    has_rows = sum(1 for _, line in lines if line.strip()) > 0  # every line: a strict read checks them all
    if not header_line.strip():
        raise ValueError(f"{item_file} is empty; write a header line (e.g. 'item_id:token\ttitle:token_seq') and one "
                         "row per item, or remove the file (items then have no text).")
    names = [cell.split(":", 1)[0].strip() for cell in header_line.split(separator)]
    item_id = config["ITEM_ID_FIELD"]
    if item_id not in names:
        raise ValueError(f"{item_file}, line 1: no '{item_id}' column (needed by ITEM_ID_FIELD) in the header "
                         f"{header_line!r}; name the id column '{item_id}:token' as in the .inter file.")
    _refuse_repeated_columns(item_file, header_line, names)
    if recbole_reads:
        _check_header_types(item_file, header_line, separator)
    if not has_rows:
        raise ValueError(f"{item_file} has no items (only the header line); add one row per item, or remove the "
                         "file (items then have no text).")


def empty_after_filtering_error(config) -> ValueError:
    """What to say when RecBole's filters left no interaction (RecBole: "Some feat is empty")."""
    settings = ", ".join(f"{key}={config[key]!r}" for key in FILTER_SETTINGS if config[key] not in (None, False))
    return ValueError(
        f"dataset '{config['dataset']}' is empty after filtering {inter_file_path(config)} "
        f"({settings or 'no filter set'}); loosen these settings (a config file or --key=value)."
    )


def warn_short_users(config, dataset) -> None:
    """Users with fewer than 2 interactions have no (history, next item) pair: RecBole keeps them in the id maps
    but they never reach training or evaluation. Say so once, with the count."""
    user_ids = np.asarray(dataset.inter_feat[dataset.uid_field], dtype=np.int64)  # a DataFrame column before build()
    counts = np.bincount(user_ids, minlength=dataset.user_num)[1:]  # id 0 = padding
    short = int((counts < 2).sum())
    if short:
        logger.warning(
            "%s: %d of %d users have fewer than 2 interactions; they form no (history, next item) pair and take no "
            "part in training or evaluation (user_inter_num_interval: \"[2,inf)\" drops them from the id maps).",
            inter_file_path(config), short, len(counts),
        )
    if short == len(counts):
        raise ValueError(
            f"dataset '{config['dataset']}': every user of {inter_file_path(config)} has fewer than 2 interactions "
            "after filtering, so there is nothing to train or evaluate on; sequential recommendation needs users "
            "with at least 2 (3 for a validation row)."
        )
