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

import numpy as np

logger = logging.getLogger(__name__)

FILTER_SETTINGS = ("user_inter_num_interval", "item_inter_num_interval", "val_interval", "rm_dup_inter",
                   "unused_col", "filter_inter_by_user_or_item")


def inter_file_path(config) -> str:
    # RecBole has already joined data_path and the dataset name.
    return os.path.join(config["data_path"], f"{config['dataset']}.inter")


def check_positive_settings(config) -> None:
    """Batch sizes, learning rates and DARec's adapter width must be positive; torch's own error for a zero batch
    size names no setting (it is raised while the data loaders are built, before any model could check it)."""
    for key in ("train_batch_size", "eval_batch_size", "learning_rate", "llm_learning_rate", "adapter_size"):
        value = config[key]
        if value is not None and value <= 0:
            raise ValueError(f"{key}={value}: must be positive (set it in a config file, properties/, or with "
                             f"--{key}=...).")


def _refuse_repeated_columns(file: str, header_line: str, names: list[str]) -> None:
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"{file}, line 1: the header {header_line!r} names {', '.join(repeated)} more than once; "
                         "give every column its own name.")


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
    """The ``.inter`` header has every column the run needs, it has data rows, and every ``:float`` column that
    is loaded holds numbers (the first bad line is named)."""
    inter_file = inter_file_path(config)
    separator = config["field_separator"] or "\t"
    with open(inter_file, encoding=config["encoding"] or "utf-8", errors="replace") as handle:
        header_line = handle.readline().rstrip("\r\n")
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
        float_columns = [(index, name) for index, (name, *kind) in enumerate(header)
                         if kind and kind[0].strip() == "float" and name in needed]
        rows = 0
        for line_number, line in enumerate(handle, start=2):
            if not line.strip():
                continue
            rows += 1
            cells = line.rstrip("\r\n").split(separator)
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
    allowed (a warning), a broken one is not."""
    item_file = os.path.join(config["data_path"], f"{config['dataset']}.item")
    load_col = config["load_col"]
    reads_item_file = config["item_max_tokens"] is not None or (isinstance(load_col, dict) and "item" in load_col)
    if not (reads_item_file and os.path.isfile(item_file)):
        return
    separator = config["field_separator"] or "\t"
    with open(item_file, encoding=config["encoding"] or "utf-8", errors="replace") as handle:
        header_line = handle.readline().rstrip("\r\n")
        has_rows = any(line.strip() for line in handle)
    if not header_line.strip():
        raise ValueError(f"{item_file} is empty; write a header line (e.g. 'item_id:token\ttitle:token_seq') and one "
                         "row per item, or remove the file (items then have no text).")
    names = [cell.split(":", 1)[0].strip() for cell in header_line.split(separator)]
    item_id = config["ITEM_ID_FIELD"]
    if item_id not in names:
        raise ValueError(f"{item_file}, line 1: no '{item_id}' column (needed by ITEM_ID_FIELD) in the header "
                         f"{header_line!r}; name the id column '{item_id}:token' as in the .inter file.")
    _refuse_repeated_columns(item_file, header_line, names)
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
