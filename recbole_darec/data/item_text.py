"""Item text: attribute sentences from the raw ``.item`` file, tokenised once and cached per internal item id.

RecBole's ``token_seq`` fields split text into per-field word ids, which an LLM cannot use, so the raw strings are
read here and aligned to RecBole's remapped item ids (``dataset.field2token_id[item_id_field]``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from collections.abc import Callable, Sequence

import torch

from recbole_darec.files import atomic_torch_save

logger = logging.getLogger(__name__)

_MAX_EXAMPLES = 3  # line numbers quoted per kind of bad row
# Cells that mean "no value" when a table was exported with pandas or a database: an empty sentence part, not text.
MISSING_TEXT = frozenset({"nan", "NaN", "NAN", "None", "null", "NULL", "N/A"})


def _field_name(header_cell: str) -> str:
    return header_cell.split(":", 1)[0].strip()


def item_file_path(config) -> str:
    """The dataset's ``.item`` file, where RecBole looks for it."""
    return os.path.join(config["data_path"], f"{config['dataset']}.item")


def read_item_sentences(item_file: str, item_id_field: str, text_fields: Sequence[str] | None = None,
                        separator: str = "\t", with_keys: bool = False) -> dict[str, str]:
    """Map each raw item token of ``item_file`` to its sentence: ``"value. value"``, or ``"key: value; key: value"``
    with ``with_keys``. Field names cost tokens of a short budget ("movie_title: " is 5 SmolLM2 tokens) and say
    nothing that tells two items apart, so the compact form is the default.

    ``text_fields`` fixes the order (missing columns are skipped); by default every column but the id, and
    ``text`` only when it is the sole text column (it usually repeats the others). Bad rows are counted and
    reported with one warning; they never stop the run.
    """
    sentences: dict[str, str] = {}
    # kind of bad row -> its line numbers
    issues: dict[str, list[int]] = {"non-UTF-8": [], "wrong column count": [], "duplicate item rows": [],
                                    "with no text (empty or NaN)": []}
    with open(item_file, "rb") as handle:
        header_line = handle.readline().decode("utf-8", errors="replace").rstrip("\r\n")
        header = [_field_name(cell) for cell in header_line.split(separator)]
        if item_id_field not in header:
            raise ValueError(
                f"{item_file}, line 1: no '{item_id_field}' column in the header {header_line!r}; "
                f"the item file needs an '{item_id_field}:token' column (set ITEM_ID_FIELD if it is named otherwise)."
            )
        id_col = header.index(item_id_field)
        if text_fields is None:
            columns = [name for name in header if name != item_id_field]
            text_fields = [name for name in columns if name != "text"] or columns
        used = [(name, header.index(name)) for name in text_fields if name in header]
        for line_number, raw in enumerate(handle, start=2):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                issues["non-UTF-8"].append(line_number)
                line = raw.decode("utf-8", errors="replace")
            cells = line.rstrip("\r\n").split(separator)
            if len(cells) != len(header):
                issues["wrong column count"].append(line_number)
                cells = (cells + [""] * len(header))[: len(header)]
            token = cells[id_col].strip()
            if not token:
                continue
            if token in sentences:
                issues["duplicate item rows"].append(line_number)
                continue
            values = [(name, cells[col].strip()) for name, col in used]
            values = [(name, value) for name, value in values if value and value not in MISSING_TEXT]
            if with_keys:
                sentences[token] = "; ".join(f"{name}: {value}" for name, value in values)
            else:
                sentences[token] = ". ".join(value.rstrip(". ") or value for _, value in values)
            if not values:
                issues["with no text (empty or NaN)"].append(line_number)
    bad = {kind: lines for kind, lines in issues.items() if lines}
    if bad:
        logger.warning(
            "%s: %s. Those rows were still used (text decoded with replacement, missing or NaN cells empty, cells "
            "beyond the header's %d dropped: a tab inside a text splits it, first row of a duplicated item kept).",
            item_file, ", ".join(f"{len(lines)} row(s) {kind} ({_line_numbers(lines)})" for kind, lines in bad.items()),
            len(header),
        )
    return sentences


def _line_numbers(lines: list[int]) -> str:
    shown = ", ".join(str(number) for number in lines[:_MAX_EXAMPLES])
    return f"line{'s' if len(lines) > 1 else ''} {shown}" + (", ..." if len(lines) > _MAX_EXAMPLES else "")


def align_item_sentences(sentences: dict[str, str], id_tokens: Sequence[str]) -> list[str]:
    """Sentences indexed by RecBole's internal item id (``id_tokens`` = ``dataset.field2id_token[iid]``);
    id 0 (padding) and items without a row in the item file get an empty sentence."""
    aligned = [sentences.get(str(token), "") for token in id_tokens]
    aligned[0] = ""
    missing = sum(1 for token in id_tokens[1:] if str(token) not in sentences)
    if missing and sentences:
        logger.warning("%d of %d items have no row in the item file: they get an empty sentence (their ID and "
                       "CF signal still work).", missing, len(id_tokens) - 1)
    known = {str(token) for token in id_tokens[1:]}
    unused = [token for token in sentences if token not in known]
    if unused:
        # Harmless (a catalogue larger than the interactions, or items filtered out), but said once.
        logger.info("%d item row(s) of the item file name items without interactions in the dataset (e.g. %s): "
                    "they are not used.", len(unused), ", ".join(unused[:_MAX_EXAMPLES]))
    return aligned


def tokenize_items(sentences: Sequence[str], tokenize: Callable[[list[str]], list[list[int]]],
                   item_max_tokens: int, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (n_items, item_max_tokens), right-padded with 0, and lengths (n_items,), truncated."""
    token_ids = torch.zeros(len(sentences), item_max_tokens, dtype=torch.long)
    lengths = torch.zeros(len(sentences), dtype=torch.long)
    truncated = 0
    for start in range(0, len(sentences), batch_size):
        for offset, ids in enumerate(tokenize(list(sentences[start:start + batch_size]))):
            truncated += len(ids) > item_max_tokens
            ids = ids[:item_max_tokens]
            token_ids[start + offset, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            lengths[start + offset] = len(ids)
    if truncated:
        logger.warning("%d of %d item sentences were truncated to item_max_tokens=%d tokens (raise item_max_tokens "
                       "to keep more of each item's text).", truncated, len(sentences), item_max_tokens)
    return token_ids, lengths


def _load_cache(path: str) -> dict:
    """A cache file written by atomic_torch_save; one cut short by a copy or a full disk is named, with what to do."""
    try:
        cached = torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise ValueError(f"{path}: an unreadable item-token cache ({type(exc).__name__}: {str(exc)[:80]}); delete "
                         "the file and run again: it is rebuilt from the item text.") from None
    if not isinstance(cached, dict) or not {"token_ids", "lengths"} <= set(cached):
        raise ValueError(f"{path}: not an item-token cache; delete the file and run again: it is rebuilt from the "
                         "item text.")
    return cached


def cached_item_tokens(
    sentences: Sequence[str], tokenize: Callable[[list[str]], list[list[int]]], item_max_tokens: int,
    tokenizer_name: str, cache_dir: str | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``tokenize_items`` with an on-disk cache keyed by tokenizer, settings and the aligned sentences."""
    if not cache_dir:
        return tokenize_items(sentences, tokenize, item_max_tokens)
    digest = hashlib.sha256()
    for part in (tokenizer_name, str(item_max_tokens), *sentences):
        digest.update(part.encode("utf-8"))
        digest.update(b"\0")
    path = os.path.join(cache_dir, f"item_tokens-{digest.hexdigest()[:24]}.pt")
    if os.path.isfile(path):
        cached = _load_cache(path)
        return cached["token_ids"], cached["lengths"]
    token_ids, lengths = tokenize_items(sentences, tokenize, item_max_tokens)
    atomic_torch_save({"token_ids": token_ids, "lengths": lengths}, path)
    return token_ids, lengths
