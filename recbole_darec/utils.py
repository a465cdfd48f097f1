"""Model and trainer lookup (this plugin first, then RecBole, so every model runs in one harness), model building."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util  # `import importlib` alone does not guarantee the util submodule is loaded
from collections.abc import Iterator

import torch
from recbole.utils import ModelType, init_seed
from recbole.utils import get_trainer as recbole_get_trainer

from recbole_darec.compat import undo_recbole_anomaly_detection

RECBOLE_MODEL_PACKAGES = (
    "recbole.model.general_recommender",
    "recbole.model.context_aware_recommender",
    "recbole.model.sequential_recommender",
    "recbole.model.knowledge_aware_recommender",
    "recbole.model.exlib_recommender",
)


def get_model(model_name: str) -> type:
    """Return the model class called ``model_name`` from ``recbole_darec.model``, else from RecBole."""
    try:
        return _find_model(model_name)
    finally:
        # The lookup may have imported recbole.model.sequential_recommender, whose sine.py turns anomaly
        # detection on for the whole process.
        undo_recbole_anomaly_detection()


def build_model(config, train_dataset):
    """The model of ``config``, built on ``train_dataset`` after seeding as every run does (``seed`` +
    ``local_rank``): a frozen random backbone is not in a checkpoint, so a rebuilt one must have the same weights."""
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    return get_model(config["model"])(config, train_dataset).to(config["device"])


def _find_model(model_name: str) -> type:
    module_name = model_name.lower()
    searched = [f"recbole_darec.model.{module_name}", *(f"{pkg}.{module_name}" for pkg in RECBOLE_MODEL_PACKAGES)]
    unimportable = []
    # Not recbole.utils.get_model: for an unknown name it ends in exlib_recommender, whose package imports
    # xgboost and lightgbm (optional), so a typo surfaced as "No module named 'lightgbm'".
    for module_path in searched:
        try:
            spec = importlib.util.find_spec(module_path)
        except ModuleNotFoundError as exc:  # the parent package needs an optional dependency
            unimportable.append(f"{module_path.rpartition('.')[0]} ({exc})")
            continue
        if spec is not None:
            module = importlib.import_module(module_path)
            if hasattr(module, model_name):
                return getattr(module, model_name)
    hint = f" Could not import {', '.join(unimportable)}." if unimportable else ""
    raise ValueError(
        f"Unknown model '{model_name}': looked in {', '.join(searched)}.{hint} "
        "Check the spelling (names are case-sensitive, e.g. SASRec, DARec)."
    )


def get_trainer(model_type: ModelType, model_name: str) -> type:
    """Return ``<Model>Trainer`` from ``recbole_darec.trainer`` if it exists, else our generic trainer for
    ordinary models, else RecBole's special trainers (knowledge graph, traditional, ...)."""
    trainer_module = importlib.import_module("recbole_darec.trainer")
    if hasattr(trainer_module, f"{model_name}Trainer"):
        return getattr(trainer_module, f"{model_name}Trainer")
    recbole_trainer = recbole_get_trainer(model_type, model_name)
    if recbole_trainer.__name__ == "Trainer":
        return trainer_module.Trainer
    return type(recbole_trainer.__name__, (trainer_module.TrustedCheckpointLoading, recbole_trainer), {})


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run the block on one torch intra-op thread, then restore the count.

    For tiny tensors (the search's GP: a few hundred points; the tests' 32-wide models) threading costs far more
    than it saves: on a busy 2-core machine OpenMP workers spinning against other processes made one 32x8 matmul
    take 20 ms instead of 20 us.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
