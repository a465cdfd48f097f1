"""Helpers shared by the DARec test files: tiny settings, a dataset with distinct item texts, a model builder.

Not a test module (no ``test_`` prefix) and not conftest.py (owned by the harness): imported explicitly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_ITEMS, write_tiny_dataset
from recbole.utils import init_seed

from recbole_darec.config import Config
from recbole_darec.data import load_data
from recbole_darec.utils import build_model, get_trainer

# RecBole's Trainer writes ./log_tensorboard and its Config reads sys.argv (pytest's own flags): every DARec test
# module runs its tests in their tmp_path with a clean command line (conftest's isolated_run), on one torch thread
# (`pytestmark = DAREC_TEST_FIXTURES`).
DAREC_TEST_FIXTURES = pytest.mark.usefixtures("one_thread", "isolated_run")

# A backbone small enough that one epoch on the tiny fixture takes about a second on a slow CPU.
TINY_LLM = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "ffn": 64}
BACKBONES = ("random:llama", "random:opt")
# DARec (the default layout) on TINY_LLM: one layer reads items, one the history.
ITEM_LAYOUT = {"sequence_layers": 1, "whiten_dim": 16}


def quick_run_settings(tmp_path: Path) -> dict:
    """Run settings shared by every quick test run: one epoch, small batches, quiet, outputs under tmp_path."""
    return {
        "epochs": 1,
        "train_batch_size": 64,
        "eval_batch_size": 256,
        "show_progress": False,
        "checkpoint_dir": str(tmp_path / "saved"),
        "log_wandb": False,
        "state": "WARNING",
        "worker": 0,
    }


def darec_settings(tmp_path: Path, data_path: str, **overrides) -> dict:
    """Config overrides for DARec on the tiny fixture: tiny backbone, short item texts, short histories."""
    settings = {
        **quick_run_settings(tmp_path),
        "data_path": data_path,
        "llm_path": "random:llama",
        "llm_random_config": dict(TINY_LLM),
        "item_max_tokens": 8,
        "MAX_ITEM_LIST_LENGTH": 6,
        "item_text_cache_dir": str(tmp_path / "item_text_cache"),
        "rec_dim": 32,
        "adapter_size": 8,
        "hard_negatives": 3,
        "item_encode_batch_size": 64,
        # float32, whatever the machine: the tests compare states to 1e-6 (bf16 tests set it themselves).
        "llm_bf16": False,
    }
    settings.update(overrides)
    return settings


def short_item_text(item: int) -> str:
    """A text whose first 8 bytes differ between items: with the byte tokenizer and item_max_tokens 8, the
    fixture's own titles ("title: item 3 ...") would all truncate to the same "title: i"."""
    return f"{item}c{item % 5}"


def write_text_dataset(root: Path, name: str = "tiny-text", missing: tuple[int, ...] = (),
                       empty: tuple[int, ...] = ()) -> tuple[str, str]:
    """The conftest fixture's interactions with an ``.item`` file of short distinct texts in a column ``n``
    (sentence ``"n: 17c2"``). Items in ``missing`` get no row, items in ``empty`` an empty text cell."""
    data_path, name = write_tiny_dataset(root, name)
    lines = ["item_id:token\tn:token_seq"]
    for item in range(TINY_ITEMS):
        if item in missing:
            continue
        lines.append(f"i{item:03d}\t{'' if item in empty else short_item_text(item)}")
    (root / name / f"{name}.item").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return data_path, name


def build(model: str, dataset: str, settings: dict):
    """Config, data loaders and an untrained model, seeded as run_darec seeds them."""
    config = Config(model=model, dataset=dataset, config_dict=settings)
    init_seed(config["seed"], config["reproducibility"])
    _, train_data, valid_data, test_data = load_data(config)
    net = build_model(config, train_data._dataset)
    return config, net, train_data, valid_data, test_data


def new_model(config, train_data):
    """A second model from the same config and seed: same random backbone, same initial trainable weights."""
    return build_model(config, train_data._dataset)


def trainer_for(config, model):
    return get_trainer(config["MODEL_TYPE"], config["model"])(config, model)


def first_batch(loader):
    return next(iter(loader))


def full_sort_batch(loader):
    """The interaction of the first batch of a full-sort evaluation loader."""
    interaction, *_ = next(iter(loader))
    return interaction


def clone_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def settings_for(tmp_path: Path, text_data: tuple[str, str], **overrides) -> dict:
    """``darec_settings`` on the conftest ``text_data`` fixture (data path, dataset name)."""
    return darec_settings(tmp_path, text_data[0], **overrides)
