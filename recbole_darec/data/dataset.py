"""Datasets with raw item text: DARecDataset (one training row per user and window) and ItemTextDataset."""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
from recbole.data.dataset import SequentialDataset

from recbole_darec.data.item_text import align_item_sentences, item_file_path, read_item_sentences


def dataset_item_sentences(config, item_id_field: str) -> dict[str, str] | None:
    """Sentence of every raw item id of the dataset's ``.item`` file, or None when there is no such file."""
    item_file = item_file_path(config)
    if config["item_text_format"] not in (None, "values", "key_value"):
        raise ValueError(f"item_text_format={config['item_text_format']!r}: expected values or key_value.")
    if not os.path.isfile(item_file):
        return None
    return read_item_sentences(item_file, item_id_field, config["item_text_fields"],
                               config["field_separator"] or "\t", with_keys=config["item_text_format"] == "key_value")


def load_item_sentences(config, item_id_field: str, id_tokens) -> list[str]:
    """Sentence of every internal item id, read from the dataset's ``.item`` file ("" where there is none)."""
    sentences = dataset_item_sentences(config, item_id_field)
    if sentences is None:
        logging.getLogger(__name__).warning(
            f"{item_file_path(config)} not found: items have no text (their ID and CF signal still work).")
        sentences = {}
    return align_item_sentences(sentences, id_tokens)


class ItemTextDataset(SequentialDataset):
    """RecBole's SequentialDataset (per-prefix training rows, as SASRec trains) plus the raw item text."""

    def __init__(self, config):
        super().__init__(config)
        self.item_sentences = load_item_sentences(config, self.iid_field, self.field2id_token[self.iid_field])


TextSASRecDataset = ItemTextDataset  # found by model name (data/__init__.py)


class DARecDataset(ItemTextDataset):
    """RecBole's SequentialDataset with two changes for an LLM model.

    - Training keeps one row per user and window: the longest training prefix plus its target, i.e. the user's whole
      training sequence, and for histories longer than ``MAX_ITEM_LIST_LENGTH`` the earlier windows too. The model
      puts a loss at every item boundary (all-position next-item prediction), which gives the same signal as
      RecBole's per-prefix rows while running the LLM once per window instead of once per prefix.
      Valid and test rows are RecBole's leave-one-out rows, unchanged.
    - ``item_sentences[i]`` is the raw attribute sentence of internal item id ``i`` (read from the ``.item`` file
      directly, see item_text.py); "" for padding, items without a row, and datasets without an ``.item`` file.
    """

    def build(self):
        datasets = super().build()
        train = datasets[0]
        # Every training (user, item) pair, taken before the rows are cut to one per user: a last row holds at most
        # MAX_ITEM_LIST_LENGTH items, and the CF model of cf_injection.py must see all training interactions.
        train._training_pairs = self._all_training_pairs(train.inter_feat)
        train.inter_feat = train.inter_feat[torch.from_numpy(self.window_rows(train.inter_feat[self.uid_field]))]
        return datasets

    def window_rows(self, user_ids: torch.Tensor) -> np.ndarray:
        """Indices of the augmented rows to keep: each user's last row, and every ``MAX_ITEM_LIST_LENGTH``-th row
        before it.

        Row r of a user predicts the target at position r + 1 from the (up to) L items before it; the model puts a
        loss at every position of a row, so a row covers the L targets up to its own. Rows L apart therefore cover
        every training target of a long history exactly once (one row per user would drop all but the last L).
        """
        user_ids = user_ids.numpy()
        window = int(self.config["MAX_ITEM_LIST_LENGTH"])
        # Rows of one user are consecutive and in time order; distance from the user's last row:
        _, first_from_end = np.unique(user_ids[::-1], return_index=True)
        _, inverse = np.unique(user_ids, return_inverse=True)
        last_of_user = (len(user_ids) - 1 - first_from_end)[inverse]
        steps_before_last = last_of_user - np.arange(len(user_ids))
        return np.flatnonzero(steps_before_last % window == 0)

    def _all_training_pairs(self, rows) -> tuple[torch.Tensor, torch.Tensor]:
        # RecBole's augmented rows (sorted by user, then time): each row's target, plus the first item of each
        # user's first row (the only row of length 1), which is no row's target. Same rule as
        # SequentialDataset.inter_matrix, which only works before the rows are cut.
        first = rows[self.item_list_length_field] == 1
        users = torch.cat([rows[self.uid_field][first], rows[self.uid_field]])
        items = torch.cat([rows[self.item_id_list_field][first, 0], rows[self.iid_field]])
        # Time order within a user: the first item (key 2 * row) comes before the row's target (2 * row + 1).
        row = torch.arange(len(rows))
        order = torch.argsort(torch.cat([2 * row[first], 2 * row + 1]))
        return users[order], items[order]

    def training_pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(users, items) of every training interaction of this (training) dataset, in time order per user.

        Users with fewer than four interactions have no training row (their last two items are valid and test,
        the first is only history) and no pair here.
        """
        return self._training_pairs

    def training_sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequences (n_rows, L+1), lengths) of this (training) dataset: each row's item list plus its target."""
        item_list = self.inter_feat[self.item_id_list_field]
        lengths = self.inter_feat[self.item_list_length_field]
        sequences = torch.cat([item_list, torch.zeros_like(item_list[:, :1])], dim=1)
        sequences[torch.arange(len(lengths)), lengths] = self.inter_feat[self.iid_field]
        return sequences, lengths + 1


DARecCoreDataset = DARecDataset  # every DARec layout (found along the model's class hierarchy)
