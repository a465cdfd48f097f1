"""run_darec(): config -> dataset -> model -> trainer -> results, for any model of this plugin or RecBole."""

from __future__ import annotations

import os
import time
from logging import getLogger

from recbole.data import data_preparation
from recbole.utils import init_logger, init_seed, set_color

from recbole_darec.config import Config
from recbole_darec.data import create_dataset
from recbole_darec.utils import get_model, get_trainer


def load_data(config: Config):
    """Build the dataset and RecBole's train / valid / test data loaders for ``config``."""
    if config["dataset"].startswith("amazon-"):
        from recbole_darec.data.prepare import ensure_dataset

        # RecBole has already joined data_path and the dataset name; the preparer wants the parent folder.
        data_root = os.path.dirname(os.path.normpath(config["data_path"]))
        ensure_dataset(config["dataset"], data_root, raw_dir=config["raw_dir"], url_base=config["raw_url_base"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    return dataset, train_data, valid_data, test_data


def _plain(result) -> dict:
    return {key: float(value) for key, value in (result or {}).items()}


def run_darec(
    model: str | None = None,
    dataset: str | None = None,
    config_file_list: list[str] | None = None,
    config_dict: dict | None = None,
    saved: bool = True,
) -> dict:
    """Train ``model`` on ``dataset`` and evaluate it with RecBole's full-ranking evaluator.

    Command-line ``--key=value`` flags are read by the Config, as in ``run_recbole.py``.
    Returns the best validation score and result and the test result.
    """
    config = Config(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = getLogger()
    logger.info(config)

    dataset_obj, train_data, valid_data, test_data = load_data(config)
    logger.info(dataset_obj)

    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model_obj = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    logger.info(model_obj)

    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model_obj)
    if config["resume"]:
        trainer.resume_checkpoint(config["resume"])
    start = time.perf_counter()
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=saved, show_progress=config["show_progress"]
    )
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    test_result = trainer.evaluate(test_data, load_best_model=saved, show_progress=config["show_progress"])
    test_seconds = time.perf_counter() - start

    logger.info(set_color("best valid ", "yellow") + f": {best_valid_result}")
    logger.info(set_color("test result", "yellow") + f": {test_result}")
    return {
        "model": config["model"],
        "dataset": config["dataset"],
        "best_valid_score": float(best_valid_score),
        "valid_score_bigger": config["valid_metric_bigger"],
        # RecBole's evaluator returns np.float64; plain floats print as {'ndcg@10': 0.1} and serialise to JSON.
        "best_valid_result": _plain(best_valid_result),
        "test_result": _plain(test_result),
        "train_seconds": train_seconds,  # fit(): training and per-epoch validation
        "test_seconds": test_seconds,
        "n_test_rows": len(test_data._dataset),
        "trainable_parameters": sum(p.numel() for p in model_obj.parameters() if p.requires_grad),
        "saved_model_file": getattr(trainer, "saved_model_file", None) if saved else None,
    }
