"""Hyper-parameter tuning of any harness model with RecBole's ``HyperTuning`` (hyperopt), as run_hyper.py does."""

from __future__ import annotations

import ast
import difflib
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from recbole_darec.compat import fix_recbole_hyper_tuning
from recbole_darec.config import Config, every_setting_name
from recbole_darec.quick_start import objective_function

HYPER_ALGOS = ("exhaustive", "random", "bayes")
# RecBole's params-file distributions and the number of comma-separated numbers each takes (choice: a list).
DISTRIBUTIONS = {"choice": None, "uniform": 2, "quniform": 3, "loguniform": 2}


def _numbers(text: str, count: int, where: str) -> list[float]:
    parts = text.split(",")
    try:
        numbers = [float(part) for part in parts]
    except ValueError:
        numbers = []
    if len(numbers) != count:
        raise ValueError(f"{where}: expected {count} comma-separated numbers, found {text!r}.")
    if numbers[0] > numbers[1]:
        raise ValueError(f"{where}: the low bound {numbers[0]:g} is above the high bound {numbers[1]:g}.")
    return numbers


def _candidates(kind: str, values: str, where: str) -> list:
    """The values a line's distribution can take, as far as they can be checked: a choice's list, the bounds of
    the others (loguniform's bounds are natural logs)."""
    if kind == "choice":
        try:
            choices = ast.literal_eval(values)
        except (ValueError, SyntaxError):
            choices = None
        if not isinstance(choices, (list, tuple)) or not choices:
            raise ValueError(f"{where}: {values!r} is not a list of values; write them as [a,b,c].")
        return list(choices)
    numbers = _numbers(values, DISTRIBUTIONS[kind], where)
    return [math.exp(bound) for bound in numbers[:2]] if kind == "loguniform" else numbers[:2]


def read_search_space(params_file: str, config: Config) -> dict[str, Any]:
    """The hyperopt space of a params file in RecBole's syntax (``name distribution values``, one a line), built
    as RecBole's HyperTuning builds it; every line is checked first (the setting exists, the distribution is
    known, the values parse and lie in the setting's range), so a mistake stops the tuning with its file and line
    instead of a traceback, or a failure in a later trial. ``config``: the run's settings without the trial's."""
    from hyperopt import hp
    from hyperopt.pyll import scope

    if not os.path.isfile(params_file):
        raise FileNotFoundError(f"--params_file={params_file}: not found (paths are relative to {os.getcwd()}); "
                                "see hyper/darec.hyper for the syntax.")
    known = set(config.final_config_dict) | every_setting_name()
    space: dict[str, Any] = {}
    with open(params_file, encoding="utf-8", errors="replace") as handle:
        for line_number, line in enumerate(handle, start=1):
            words = line.split()
            if not words:
                continue
            where = f"{params_file}, line {line_number}"
            if len(words) < 3:
                raise ValueError(f"{where}: {line.strip()!r} is not `name distribution values` (e.g. "
                                 "`adapter_size choice [16,32]`).")
            name, kind, values = words[0], words[1], "".join(words[2:])
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
                hint = f"did you mean '{close[0]}'?" if close else "tune settings that the model reads."
                raise ValueError(f"{where}: unknown setting '{name}'; {hint}")
            if kind not in DISTRIBUTIONS:
                raise ValueError(f"{where}: unknown distribution '{kind}' for {name}; use one of "
                                 f"{', '.join(DISTRIBUTIONS)}.")
            whole = config.setting_type(name) is int
            if whole and kind in ("uniform", "loguniform"):
                raise ValueError(f"{where}: {name} is a whole number, but {kind} draws fractions; use choice [..] or "
                                 "quniform low,high,step.")
            candidates = _candidates(kind, values, f"{where} ({name} {kind})")
            for value in candidates:
                value = round(value) if whole and kind == "quniform" else value
                error = config.setting_error(name, value, f"{where}: {name} {kind} {values} (value {value!r})")
                if error is not None:
                    raise error
            if kind == "choice":
                space[name] = hp.choice(name, candidates)
            elif kind == "quniform":
                low, high, step = _numbers(values, 3, where)
                space[name] = hp.quniform(name, low, high, step)
                if whole:  # quniform draws floats (48.0); a whole-number setting gets an int, as its type requires
                    space[name] = scope.int(space[name])
            else:
                low, high = _numbers(values, 2, where)
                space[name] = getattr(hp, kind)(name, low, high)
    if not space:
        raise ValueError(f"{params_file}: no parameter to tune; write one `name distribution values` line per "
                         "parameter (e.g. `adapter_size choice [16,32]`).")
    return space


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
    # The fixed settings and the params file are checked once, before the first trial trains anything.
    config = Config(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=fixed)
    space = read_search_space(params_file, config)

    def objective(params: dict, fixed_config_file_list: list[str] | None) -> dict:
        return objective_function({**fixed, **params}, fixed_config_file_list, model=model, dataset=dataset)

    tuner = HyperTuning(
        objective,
        algo=algo,
        early_stop=early_stop,
        max_evals=max_evals,
        space=space,
        fixed_config_file_list=config_file_list,
        display_file=display_file,
    )
    with _hyperopt_seed(seed):
        tuner.run()
    if output_file:
        tuner.export_result(output_file=output_file)
    return tuner
