"""Hyper-parameter tuning of any harness model with RecBole's ``HyperTuning`` (hyperopt), as run_hyper.py does."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from recbole_darec.compat import fix_recbole_hyper_tuning
from recbole_darec.quick_start import objective_function

HYPER_ALGOS = ("exhaustive", "random", "bayes")


@contextmanager
def _hyperopt_seed(seed: int | None) -> Iterator[None]:
    # HyperTuning.run calls fmin without rstate, so fmin seeds itself from $HYPEROPT_FMIN_SEED or not at all; a
    # seed makes the sequence of trials reproducible. A seed the user exported wins.
    if seed is None or "HYPEROPT_FMIN_SEED" in os.environ:
        yield
        return
    os.environ["HYPEROPT_FMIN_SEED"] = str(seed)
    try:
        yield
    finally:
        os.environ.pop("HYPEROPT_FMIN_SEED", None)


def hyper_tune(
    params_file: str,
    model: str | None = None,
    dataset: str | None = None,
    config_file_list: list[str] | None = None,
    config_dict: dict[str, Any] | None = None,
    algo: str = "bayes",
    max_evals: int = 100,
    early_stop: int = 10,
    output_file: str | None = None,
    display_file: str | None = None,
    seed: int | None = 2020,
) -> Any:
    """Tune the parameters of ``params_file`` (RecBole's syntax: ``name choice [..]`` / ``name loguniform lo,hi``
    with natural-log bounds / ``uniform`` / ``quniform``); returns the finished ``HyperTuning``.

    Each trial is one full harness run (train, validate, test) with the trial's parameters over
    ``config_dict`` and ``config_file_list``. ``algo='exhaustive'`` tries every combination of the ``choice``
    parameters and ignores ``max_evals`` (RecBole's behaviour); ``random`` and ``bayes`` (TPE) run ``max_evals``
    trials, stopping after ``early_stop`` trials without improvement.
    """
    if algo not in HYPER_ALGOS:
        raise ValueError(f"algo={algo!r}: expected one of {', '.join(HYPER_ALGOS)}")
    fix_recbole_hyper_tuning()
    from recbole.trainer import HyperTuning

    fixed = dict(config_dict or {})

    def objective(params: dict, fixed_config_file_list: list[str] | None) -> dict:
        return objective_function({**fixed, **params}, fixed_config_file_list, model=model, dataset=dataset)

    tuner = HyperTuning(
        objective,
        algo=algo,
        early_stop=early_stop,
        max_evals=max_evals,
        params_file=params_file,
        fixed_config_file_list=config_file_list,
        display_file=display_file,
    )
    with _hyperopt_seed(seed):
        tuner.run()
    if output_file:
        tuner.export_result(output_file=output_file)
    return tuner
