"""Hyper-parameter tuning of any harness model with RecBole's ``HyperTuning`` (hyperopt), as run_hyper.py does,
resumable: every finished trial is logged, and a tuning run started again goes on from where it was cut off."""

from __future__ import annotations

import ast
import difflib
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from recbole_darec.compat import fix_recbole_hyper_tuning
from recbole_darec.config import Config, every_setting_name
from recbole_darec.files import append_json_line, read_json_lines
from recbole_darec.provenance import code_version
from recbole_darec.quick_start import objective_function

logger = logging.getLogger(__name__)

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


def _plain(value: Any) -> Any:
    """hyperopt hands out numpy scalars; the log and the trial's config take Python ones."""
    return value.item() if hasattr(value, "item") else value


class TuningLog:
    """The trials of one tuning run, one JSON line each, so that a run cut off goes on where it stopped.

    The first line names the run (model, dataset, fixed settings, search space, algorithm, seed; not the number of
    trials, which a later start may raise); every finished trial adds its parameters and result. Started again,
    the run replays a logged trial's result to the search instead of training it again: seeded, the search then
    proposes the same next trial as before. A trial cut off mid-training resumes from its last epoch's checkpoint,
    kept in its own folder beside the log."""

    def __init__(self, path: str | os.PathLike, run: dict[str, Any]) -> None:
        self.path = Path(path)
        # hyper.trials.jsonl keeps its trials' checkpoints in hyper.trials/
        self.trials_dir = self.path.with_suffix("") if self.path.suffix else self.path.with_name(self.path.name + ".d")
        records = [record for _, record in read_json_lines(self.path)]
        if records and records[0].get("run") != run:
            logged = records[0].get("run") or {}
            differs = sorted(key for key in {*logged, *run} if logged.get(key) != run.get(key))
            raise ValueError(f"{self.path}: this tuning log was made by another tuning run (it differs in "
                             f"{', '.join(differs) or 'its first line'}); give this run another --output_file, or "
                             "delete the log to start afresh.")
        if not records:
            append_json_line(self.path, {"run": run})
        self.finished = {record["key"]: record for record in records[1:] if "key" in record and "result" in record}
        self.code = code_version()

    @staticmethod
    def key(params: dict[str, Any]) -> str:
        return json.dumps({name: _plain(value) for name, value in params.items()}, sort_keys=True)

    def run_trial(self, params: dict[str, Any], train: Callable[[str, str | None], dict]) -> dict:
        """The result of the trial ``params``: logged, or trained by ``train(checkpoint_dir, resume_file)``."""
        key = self.key(params)
        if key in self.finished:
            record = self.finished[key]
            if record.get("code_version") != self.code:
                logger.warning("%s: replaying trial %s, trained by other code (%s, now %s)", self.path, key,
                               record.get("code_version"), self.code)
            else:
                logger.info("%s: replaying finished trial %s", self.path, key)
            return record["result"]
        checkpoint_dir = self.trials_dir / hashlib.sha1(key.encode()).hexdigest()[:12]
        cut_off = sorted(checkpoint_dir.glob("*-last.pth"), key=lambda path: path.stat().st_mtime)
        if cut_off:
            logger.info("%s: trial %s resumes from %s", self.path, key, cut_off[-1])
        start = time.perf_counter()
        result = train(str(checkpoint_dir), str(cut_off[-1]) if cut_off else None)
        record = {"key": key, "params": json.loads(key), "result": result, "code_version": self.code,
                  "seconds": time.perf_counter() - start, "resumed_from": cut_off[-1].name if cut_off else None}
        append_json_line(self.path, record)
        self.finished[key] = record
        return result


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
    tuning_log: str | None = None,
) -> Any:
    """Tune the parameters of ``params_file`` (RecBole's syntax: ``name choice [..]`` / ``name loguniform lo,hi``
    with natural-log bounds / ``uniform`` / ``quniform``); returns the finished ``HyperTuning``.

    Each trial is one full harness run (train, validate, test) with the trial's parameters over
    ``config_dict`` and ``config_file_list``. ``algo='exhaustive'`` tries every combination of the ``choice``
    parameters and ignores ``max_evals`` (RecBole's behaviour); ``random`` and ``bayes`` (TPE) run ``max_evals``
    trials, stopping after ``early_stop`` trials without improvement.

    ``tuning_log`` (default: ``output_file`` with the suffix ``.trials.jsonl``; none without either): the
    ``TuningLog`` that makes the run resumable.
    """
    if algo not in HYPER_ALGOS:
        raise ValueError(f"algo={algo!r}: expected one of {', '.join(HYPER_ALGOS)}")
    fix_recbole_hyper_tuning()
    from recbole.trainer import HyperTuning

    fixed = dict(config_dict or {})
    # The fixed settings and the params file are checked once, before the first trial trains anything.
    config = Config(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=fixed)
    space = read_search_space(params_file, config)
    if tuning_log is None and output_file:
        tuning_log = str(Path(output_file).with_suffix(".trials.jsonl"))
    log = None
    if tuning_log:
        # What every trial is trained with: the settings given here and on the command line (which RecBole's Config
        # reads in every trial, over config_dict), not run_hyper's own flags.
        settings = {**fixed, **{key: value for key, value in config.cmd_config_dict.items()
                                if key in every_setting_name()}}
        run = {"model": config["model"], "dataset": config["dataset"],
               "fixed": json.loads(json.dumps(settings, default=str)), "config_files": config_file_list,
               "space": Path(params_file).read_text(encoding="utf-8"), "algo": algo, "seed": seed}
        log = TuningLog(tuning_log, run)

    def objective(params: dict, fixed_config_file_list: list[str] | None) -> dict:
        params = {name: _plain(value) for name, value in params.items()}

        def train(checkpoint_dir: str | None = None, resume: str | None = None) -> dict:
            paths = {"checkpoint_dir": checkpoint_dir, "resume": resume} if checkpoint_dir else {}
            return objective_function({**fixed, **params, **paths}, fixed_config_file_list, model=model,
                                      dataset=dataset)

        return log.run_trial(params, train) if log else train()

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
