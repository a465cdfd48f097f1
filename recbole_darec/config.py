"""RecBole Config that also reads this plugin's properties/ and runs on CPU-only machines."""

from __future__ import annotations

import difflib
import functools
import importlib.util
import os
from pathlib import Path

import recbole
import torch
import yaml
from recbole.config import Config as RecBoleConfig
from recbole.utils import ModelType, argument_list

from recbole_darec.utils import get_model
from recbole_darec.validation import expected_type, load_rules, rule_for, setting_error, yaml_note


def _properties_dir() -> Path:
    """The plugin's yaml defaults: ``recbole_darec.properties`` (setup.cfg maps the repository's ``properties/``
    there, so an installed wheel carries them), or ``properties/`` beside the package in a source checkout."""
    spec = importlib.util.find_spec("recbole_darec.properties")
    if spec is not None:
        folder = Path(next(iter(spec.submodule_search_locations)))
    else:
        folder = Path(__file__).resolve().parents[1] / "properties"
    if not (folder / "overall.yaml").is_file():
        # Without them every run would silently fall back to RecBole's defaults, not this plugin's protocol.
        raise FileNotFoundError(f"recbole-darec's settings are missing: {folder / 'overall.yaml'} not found. "
                                "Reinstall the package (pip install recbole-darec, or pip install -e . in a checkout).")
    return folder


PROPERTIES_DIR = _properties_dir()
# Settings RecBole reads without a default in any yaml (distributed runs, the model and dataset themselves).
KNOWN_WITHOUT_DEFAULT = {"model", "dataset", "config_files", "local_rank", "world_size", "nproc", "ip", "port",
                         "offset", "gpu_id", "use_gpu", "single_spec", "device"}
RECBOLE_PROPERTIES_DIR = Path(recbole.__file__).resolve().parent / "properties"
# Declared ranges of settings (validation.py), not settings themselves.
RANGES_FILE = PROPERTIES_DIR / "ranges.yaml"


@functools.cache
def every_setting_name() -> frozenset[str]:
    """Every setting some yaml of RecBole or of this plugin defines, for any model or dataset (a setting of
    another model than this run's is not a typo: shared config files carry them), and RecBole's argument lists."""
    names = set(KNOWN_WITHOUT_DEFAULT)
    for group in (argument_list.general_arguments, argument_list.training_arguments,
                  argument_list.evaluation_arguments, argument_list.dataset_arguments):
        names.update(group)
    for folder in (RECBOLE_PROPERTIES_DIR, PROPERTIES_DIR):
        for file in folder.rglob("*.yaml"):
            if file == RANGES_FILE:
                continue
            loaded = yaml.safe_load(file.read_text(encoding="utf-8"))
            if isinstance(loaded, dict):
                names.update(str(key) for key in loaded)
    return frozenset(names)


def model_yaml_files(model: str, model_class: type) -> list[Path]:
    """A model's own yaml layers, low to high precedence: RecBole's ``model/<Model>.yaml``, then those of the RecBole
    models it is built on (TextSASRec on SASRec), then the plugin's ``model/`` yamls of its plugin base classes
    (DARecbase.yaml only overrides DARec.yaml's few settings) and of the model itself. Only existing files."""
    layers = [RECBOLE_PROPERTIES_DIR / "model" / f"{model}.yaml"]
    layers += [RECBOLE_PROPERTIES_DIR / "model" / f"{cls.__name__}.yaml"
               for cls in reversed(model_class.__mro__[1:]) if cls.__module__.startswith("recbole.model.")]
    bases = [cls.__name__ for cls in reversed(model_class.__mro__[1:]) if cls.__module__.startswith("recbole_darec")]
    layers += [PROPERTIES_DIR / "model" / f"{name}.yaml" for name in (*bases, model)]
    return [file for file in layers if file.is_file()]


def model_yaml_settings(model: str, loader: type = yaml.FullLoader) -> dict:
    """The settings a model's own yaml layers give it (``model_yaml_files``), for a model built inside another
    (DARec's CF model) that gets no Config of its own. ``loader``: RecBole's reads 1e-05 as a float."""
    settings: dict = {}
    for file in model_yaml_files(model, get_model(model)):
        with open(file, encoding="utf-8") as f:
            settings.update(yaml.load(f, Loader=loader) or {})
    return settings


def _read_utf8(file: str) -> str:
    """The text of a config file; a byte that is not UTF-8 is named by line, not as a bare codec error."""
    data = Path(file).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ValueError(f"{file}, line {line}: byte {data[exc.start:exc.start + 1]!r} is not UTF-8; save the file "
                         "as UTF-8.") from None


def _key_lines(file: str, text: str, loader: type) -> dict[str, str]:
    """Top-level key -> "file, line N" of a yaml mapping."""
    node = yaml.compose(text, Loader=loader)
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {str(key.value): f"{file}, line {key.start_mark.line + 1}" for key, _ in node.value}


def _shown(value: object) -> str:
    return "~" if value is None else str(value)


class Config(RecBoleConfig):
    """RecBole's Config, with ``properties/`` of this plugin layered over RecBole's own defaults.

    Precedence (low to high): RecBole's yaml < ``properties/overall.yaml`` < ``properties/sequential.yaml``
    (sequential models only) < RecBole's ``model/<Model>.yaml`` < ``properties/model/<Base>.yaml`` (the plugin
    model's base classes) < ``properties/model/<Model>.yaml`` < ``properties/dataset/<dataset>.yaml`` < config
    files < config_dict < command line. Models are looked up in ``recbole_darec`` first, then RecBole.
    """

    def _get_model_and_dataset(self, model, dataset):
        if model is None:
            model = self.external_config_dict.get("model")
            if model is None:
                raise KeyError("model must be given: --model=<Name>, a config file or config_dict['model']")
        if isinstance(model, str):
            model_name, model_class = model, get_model(model)
        else:
            model_name, model_class = model.__name__, model
        if dataset is None:
            dataset = self.external_config_dict.get("dataset")
            if dataset is None:
                raise KeyError("dataset must be given: --dataset=<name>, a config file or config_dict['dataset']")
        return model_name, model_class, dataset

    def _load_config_files(self, file_list):
        # RecBole's own loop, except that it let yaml's and the codec's errors through without the file: say which
        # file and line, in one line. Remembers the line of every setting, for validation's messages.
        file_config_dict = {}
        self._setting_lines: dict[str, str] = {}
        for file in file_list or []:
            if not os.path.isfile(file):
                raise FileNotFoundError(f"--config_files: {file} not found (paths are relative to {os.getcwd()}).")
            text = _read_utf8(file)
            try:
                loaded = yaml.load(text, Loader=self.yaml_loader)
            except yaml.YAMLError as exc:
                mark = getattr(exc, "problem_mark", None)
                where = f", line {mark.line + 1}" if mark is not None else ""
                problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
                raise ValueError(f"{file}{where}: not valid yaml ({problem}); settings are `key: value` "
                                 "lines.") from None
            if loaded is not None and not isinstance(loaded, dict):
                raise ValueError(f"{file}: expected `key: value` lines, found a {type(loaded).__name__}.")
            file_config_dict.update(loaded or {})
            self._setting_lines.update(_key_lines(file, text, self.yaml_loader))
        return file_config_dict

    def _check_setting_names(self) -> None:
        """A setting that is not one, but close to one (``--learning_rat=...``), is a typo: stop and name the
        setting meant. Names close to none pass: a user's own model may read settings of its own."""
        known = set(self.internal_config_dict) | every_setting_name()
        sources = (("the command line", self.cmd_config_dict), ("config_dict", self.variable_config_dict),
                   ("--config_files", self.file_config_dict))
        for source, settings in sources:
            for key in settings:
                if key in known:
                    continue
                close = difflib.get_close_matches(key, known, n=1, cutoff=0.85)
                if close:
                    raise ValueError(f"unknown setting '{key}' (from {source}): did you mean '{close[0]}'?")

    def _given_settings(self) -> dict[str, tuple[object, str]]:
        """Every setting the user gave: its value in force and where it was given, for messages."""
        given = {}
        for key, value in self.file_config_dict.items():
            given[key] = (value, f"{self._setting_lines.get(key, '--config_files')}: {key}: {_shown(value)}")
        for key, value in self.variable_config_dict.items():
            given[key] = (value, f"{key}={value!r} (config_dict)")
        for key, value in self.cmd_config_dict.items():
            given[key] = (value, f"--{key}={_shown(value)}")
        return given

    def _check_setting_values(self) -> None:
        """Types (from the yaml defaults) and declared ranges (properties/ranges.yaml) of the settings given, before
        any data is read: a wrong value stops the run with one line instead of failing late or silently."""
        for key, (value, where) in self._given_settings().items():
            error = self.setting_error(key, value, where)
            if error is not None:
                raise error

    def setting_error(self, key: str, value: object, where: str) -> ValueError | None:
        """The one-line error for ``value`` of setting ``key`` given at ``where``, or None if this run takes it."""
        return setting_error(key, value, self.internal_config_dict.get(key), where, self._default_files,
                             load_rules(RANGES_FILE))

    def setting_type(self, key: str) -> type | None:
        """int, float or bool for a setting whose value must be one (validation.expected_type), else None."""
        tag, _ = yaml_note(key, self._default_files)
        return expected_type(self.internal_config_dict.get(key), tag, rule_for(key, load_rules(RANGES_FILE)))

    def _convert_config_dict(self, config_dict):
        # The yaml files write "no value" as ~ (llm_layers: ~, cf_model: ~); RecBole's conversion of command-line
        # strings only knows None, so --llm_layers=~ arrived as the string "~" and failed deep in the model.
        config_dict = super()._convert_config_dict(config_dict)
        return {key: None if value in ("~", "null") else value for key, value in config_dict.items()}

    def _update_internal_config_dict(self, file):
        self._default_files.append(file)  # the yaml layers of this run, low to high precedence (for validation)
        return super()._update_internal_config_dict(file)

    def _load_internal_config_dict(self, model, model_class, dataset):
        self._default_files: list[str] = []
        super()._load_internal_config_dict(model, model_class, dataset)
        layers = [PROPERTIES_DIR / "overall.yaml"]
        if model_class.type == ModelType.SEQUENTIAL:
            layers.append(PROPERTIES_DIR / "sequential.yaml")
        # RecBole's own model yaml again, above our protocol defaults: a model's fixed choices (FPMC's
        # loss_type: BPR) must not be overwritten by sequential.yaml's loss_type: CE.
        layers += model_yaml_files(model, model_class)
        layers.append(PROPERTIES_DIR / "dataset" / f"{dataset}.yaml")
        for file in layers:
            if file.is_file():
                loaded = self._update_internal_config_dict(str(file))
                if loaded and file.parent.name == "dataset":
                    self.parameters["Dataset"] += [k for k in loaded if k not in self.parameters["Dataset"]]
        self._load_time_column()
        self._check_setting_names()
        self._check_setting_values()

    def _set_default_parameters(self):
        super()._set_default_parameters()
        cfg = self.final_config_dict
        # Context-aware models score (user, item, features) rows against a label; RecBole's full-ranking path for
        # them fails deep in training (KeyError: 'label') or evaluation. Say so before any work.
        if cfg["MODEL_TYPE"] in (ModelType.CONTEXT, ModelType.DECISIONTREE) and "labeled" not in str(cfg["eval_args"]):
            raise ValueError(f"model={cfg['model']} is a context-aware model: it is evaluated on labeled "
                             "interactions (eval_args.mode: labeled, with a label or rating field), not with this "
                             "plugin's full-ranking protocol; use a general, sequential or knowledge-aware model, or "
                             "RecBole's run_recbole with eval_args: {mode: labeled}.")

    def _load_time_column(self):
        # The protocol orders by time (eval_args.order: TO), but for a dataset RecBole has no yaml for, its
        # sample.yaml loads only [user_id, item_id] and every run dies with "[timestamp] is not exist".
        cfg = self.internal_config_dict
        load_col, time_field = cfg.get("load_col"), cfg.get("TIME_FIELD")
        if not (isinstance(load_col, dict) and isinstance(load_col.get("inter"), list) and time_field):
            return
        if (cfg.get("eval_args") or {}).get("order") == "TO" and time_field not in load_col["inter"]:
            cfg["load_col"] = {**load_col, "inter": [*load_col["inter"], time_field]}

    def _init_device(self):
        # RecBole 1.2.1 hard-codes NCCL + CUDA for distributed runs; on a CPU machine use gloo instead.
        if "local_rank" in self.final_config_dict and not torch.cuda.is_available():
            cfg = self.final_config_dict
            cfg["gpu_id"] = str(cfg.get("gpu_id", ""))
            if not torch.distributed.is_initialized():
                torch.distributed.init_process_group(
                    backend="gloo",
                    rank=cfg["local_rank"] + cfg.get("offset", 0),
                    world_size=cfg["world_size"],
                    init_method=f"tcp://{cfg['ip']}:{cfg['port']}",
                )
            cfg["device"] = torch.device("cpu")
            cfg["single_spec"] = False
            if cfg["local_rank"] != 0:
                cfg["state"] = "error"
                cfg["show_progress"] = False
                cfg["verbose"] = False
            return
        super()._init_device()
