"""run_darec(): config -> dataset -> model -> trainer -> results, for any model of this plugin or RecBole."""

from __future__ import annotations

import time
from logging import getLogger

import torch
from recbole.utils import init_logger, init_seed, set_color

from recbole_darec.config import Config
from recbole_darec.data import load_data
from recbole_darec.utils import build_model, get_trainer


def _plain(result) -> dict:
    return {key: float(value) for key, value in (result or {}).items()}


def _search_if_asked(config: Config, train_data, valid_data) -> dict:
    """``--search=bo|random``: search DARec's per-layer serial/parallel adapters on a weight-sharing supernet and
    fix the best as ``adapter_arch`` of the model trained next. RecBole pickles the config into the checkpoint,
    so the saved model records its architecture. Returns what the search adds to run_darec's result."""
    if not config["search"]:
        return {}
    from recbole_darec.search.supernet import describe_arch, search_architecture, search_paths

    start = time.perf_counter()
    best_arch, result = search_architecture(config, config["search"], train_data, valid_data)
    config["adapter_arch"] = best_arch
    config["supernet"] = False  # the final model holds only the chosen adapter of each layer
    getLogger().info(set_color("adapter_arch", "yellow") + f": {describe_arch(best_arch)}")
    paths = search_paths(config, str(config["search"]).lower())
    return {
        "adapter_arch": best_arch,
        "search": {
            "method": str(config["search"]).lower(),
            "n_trials": len(result.trials),
            # run_search maximises: a smaller-is-better metric was negated.
            "supernet_valid_score": result.best_value if config["valid_metric_bigger"] else -result.best_value,
            "seconds": time.perf_counter() - start,
            "trial_log": str(paths.trial_log),
            "best_arch_file": str(paths.best_arch),
            "plot": str(paths.plot),
            "supernet": str(paths.supernet),
        },
    }


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
    searched = _search_if_asked(config, train_data, valid_data)  # --search=bo|random: sets adapter_arch

    model_obj = build_model(config, train_data._dataset)
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
    if not config["single_spec"] and torch.distributed.is_initialized():
        # As RecBole's run_recbole: a gloo group left alive at exit can abort the process ("terminate called
        # without an active exception") after its results are written.
        torch.distributed.destroy_process_group()
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
        **searched,
    }


def objective_function(
    config_dict: dict | None = None,
    config_file_list: list[str] | None = None,
    saved: bool = True,
    model: str | None = None,
    dataset: str | None = None,
) -> dict:
    """The objective of RecBole's ``HyperTuning``: one harness run with ``config_dict`` (the trial's parameters).

    ``recbole.quick_start.objective_function`` cannot be used: importing recbole.quick_start imports ray, which
    does not import on this stack (compat.py), and it builds RecBole's Config, not ours. ``model`` and ``dataset``
    default to --model / --dataset from the command line, as in RecBole's run_hyper.py.
    """
    import logging

    root = logging.getLogger()
    handlers_before = list(root.handlers)
    try:
        result = run_darec(model, dataset, config_file_list, config_dict, saved=saved)
    finally:
        # init_logger attaches a console and a file handler for the run; without removing them the next trial's
        # init_logger is a no-op (basicConfig) and every trial would log into the first trial's file.
        for handler in root.handlers[:]:
            if handler not in handlers_before:
                root.removeHandler(handler)
                handler.close()
    keys = ("model", "best_valid_score", "valid_score_bigger", "best_valid_result", "test_result")
    return {key: result[key] for key in keys}
