"""Data: the DARec dataset (one sample per user, item text), item-text tokens, Amazon preparation."""

from __future__ import annotations

import importlib

from recbole.data import create_dataset as recbole_create_dataset


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
