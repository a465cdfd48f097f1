"""Data: the DARec dataset (training windows, item text), item-text tokens, Amazon preparation.

``load_data``: config -> checked input files -> dataset -> RecBole's train / valid / test loaders."""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

from recbole.data import create_dataset as recbole_create_dataset
from recbole.data import data_preparation

from recbole_darec.data.checks import (
    check_dataset_files,
    check_inter_file,
    check_item_file,
    empty_after_filtering_error,
    warn_short_users,
)

if TYPE_CHECKING:
    from recbole_darec.config import Config


def create_dataset(config):
    """RecBole's ``create_dataset``, but a model of this plugin (or a subclass of one) gets its own dataset class
    ``recbole_darec.data.dataset.<Model>Dataset``, found along the model's class hierarchy."""
    from recbole_darec.utils import get_model

    dataset_module = importlib.import_module("recbole_darec.data.dataset")
    for cls in get_model(config["model"]).__mro__:
        dataset_class = getattr(dataset_module, f"{cls.__name__}Dataset", None)
        if dataset_class is not None:
            return dataset_class(config)
    return recbole_create_dataset(config)


def load_data(config: Config):
    """Build the dataset and RecBole's train / valid / test data loaders for ``config``."""
    if config["dataset"].startswith("amazon-"):
        from recbole_darec.data.prepare import ensure_dataset

        # RecBole has already joined data_path and the dataset name; the preparer wants the parent folder.
        data_root = os.path.dirname(os.path.normpath(config["data_path"]))
        ensure_dataset(config["dataset"], data_root, raw_dir=config["raw_dir"], url_base=config["raw_url_base"])
    check_dataset_files(config)
    check_inter_file(config)
    check_item_file(config)
    try:
        dataset = create_dataset(config)
    except ValueError as exc:
        if "feat is empty" in str(exc):  # RecBole's filters removed every interaction
            raise empty_after_filtering_error(config) from None
        raise
    warn_short_users(config, dataset)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    return dataset, train_data, valid_data, test_data
