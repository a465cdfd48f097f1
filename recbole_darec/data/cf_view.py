"""The CF model's view of DARec's training split: the (user, item) training pairs as a plain RecBole Dataset."""

from __future__ import annotations

import torch
from recbole.data.dataset import Dataset
from recbole.data.interaction import Interaction


class CFTrainingView(Dataset):
    """The CF model's dataset: RecBole's plain ``Dataset`` API over the training (user, item) pairs only.

    DARec's training split has one row per user (a sequence), so ``SequentialDataset.inter_matrix`` and
    ``inter_feat`` mean something else there. This view keeps the split's field metadata (token maps, so
    ``num(uid)`` and ``num(iid)`` are unchanged) and replaces the interactions by the exploded training pairs, so
    ``inter_feat``, ``inter_matrix()`` and ``history_item_matrix()`` describe exactly those pairs.
    """

    def __init__(self, dataset: Dataset, users: torch.Tensor, items: torch.Tensor):  # noqa: D107
        # Not Dataset.__init__: that reads the atomic files again. A shallow copy of the built split's attributes
        # (as Dataset.copy does) with new interactions; RecBole's Dataset methods replace the sequential ones.
        self.__dict__.update(dataset.__dict__)
        self.inter_feat = Interaction({dataset.uid_field: users.long(), dataset.iid_field: items.long()})
