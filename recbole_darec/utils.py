"""Model and trainer lookup: this plugin first, then RecBole, so every model runs in one harness."""

from __future__ import annotations

import importlib
import importlib.util  # `import importlib` alone does not guarantee the util submodule is loaded

from recbole.utils import ModelType
from recbole.utils import get_model as recbole_get_model
from recbole.utils import get_trainer as recbole_get_trainer


def get_model(model_name: str) -> type:
    """Return the model class called ``model_name`` from ``recbole_darec.model``, else from RecBole."""
    module_path = f"recbole_darec.model.{model_name.lower()}"
    if importlib.util.find_spec(module_path) is not None:
        module = importlib.import_module(module_path)
        if hasattr(module, model_name):
            return getattr(module, model_name)
    try:
        return recbole_get_model(model_name)
    except (ValueError, AttributeError):  # AttributeError: the module exists but the case differs (sasrec)
        raise ValueError(
            f"Unknown model '{model_name}': looked in recbole_darec.model ({module_path}) and in RecBole's "
            "recbole.model.{general,context_aware,sequential,knowledge_aware,exlib}_recommender. "
            "Check the spelling (names are case-sensitive, e.g. SASRec, DARec)."
        ) from None


def get_trainer(model_type: ModelType, model_name: str) -> type:
    """Return ``<Model>Trainer`` from ``recbole_darec.trainer`` if it exists, else our generic trainer for
    ordinary models, else RecBole's special trainers (knowledge graph, traditional, ...)."""
    trainer_module = importlib.import_module("recbole_darec.trainer")
    if hasattr(trainer_module, f"{model_name}Trainer"):
        return getattr(trainer_module, f"{model_name}Trainer")
    recbole_trainer = recbole_get_trainer(model_type, model_name)
    if recbole_trainer.__name__ == "Trainer":
        return trainer_module.Trainer
    return recbole_trainer
