"""Architecture search on DARec end to end: weight-sharing supernet, candidate scoring, search driver.

1. ``Supernet.ensure_trained``: DARec with ``supernet: True`` (both adapters in every layer, one architecture
   sampled per training batch) trained with RecBole's trainer for ``search_epochs`` epochs. Its checkpoint
   ``<checkpoint_dir>/<model>-<dataset>-supernet.pth`` is written after every epoch: a finished one is reused by
   later searches (BO and random search then score candidates on the same weights), an unfinished one is resumed.
2. ``Supernet.score``: one validation pass with the candidate fixed; the score is ``valid_metric``.
3. ``search_architecture``: ``run_search`` over {serial, parallel}^layers with a resumable trial log, the best
   architecture written to a text file and a PNG of metric per trial (BO vs random when both logs exist).
The harness (``quick_start.run_darec`` with ``search`` set) then trains DARec with the best ``adapter_arch``.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from recbole.data.dataloader import FullSortEvalDataLoader
from recbole.utils import set_color

from recbole_darec.compat import load_trusted_checkpoint
from recbole_darec.config import model_yaml_settings
from recbole_darec.model.adapters import CHOICE_NAMES, arch_to_str, str_to_arch
from recbole_darec.provenance import artefact_key
from recbole_darec.search.bo import METHODS, SearchResult, run_search
from recbole_darec.search.plots import plot_search
from recbole_darec.search.trial_log import TrialLog
from recbole_darec.utils import build_model, get_trainer

logger = logging.getLogger(__name__)

# What shapes a supernet besides its model's own yaml settings ...
TRAINING_SETTINGS = ("learning_rate", "train_batch_size", "MAX_ITEM_LIST_LENGTH", "seed")
# ... and settings of that yaml that do not: the search's own budget, where files go, batch sizes of inference.
NOT_SHAPING = ("adapter_arch", "supernet", "item_text_cache_dir", "eval_batch_size", "item_encode_batch_size")
# What changes how a candidate is scored, besides what shaped the supernet.
SCORING_SETTINGS = ("search_valid_users", "search_seed", "search_acq_optimizer", "valid_metric")


def supernet_settings(model: str) -> tuple[str, ...]:
    """Settings that change what a supernet of ``model`` learns: a reused checkpoint trained with others gets a
    warning, and its artefacts are keyed on them."""
    own = {key for key in model_yaml_settings(model) if not key.startswith("search") and key not in NOT_SHAPING}
    return tuple(sorted(own | set(TRAINING_SETTINGS)))


def trial_settings(model: str) -> tuple[str, ...]:
    """Settings that a trial log is keyed on: the supernet's, and how a candidate is scored."""
    return (*supernet_settings(model), *SCORING_SETTINGS)


@dataclass(frozen=True)
class SearchPaths:
    """Files of one architecture search, all under ``checkpoint_dir``."""

    supernet: Path  # shared by every search method on this model and dataset
    trial_log: Path
    best_arch: Path
    plot: Path


def search_paths(config: Any, method: str) -> SearchPaths:
    """Named by model, dataset and a key of the settings and code that shaped them: a search under other settings
    or another code version starts afresh instead of reusing them (the budget settings, search_epochs and
    search_n_init/n_iter, are not in the key: a larger budget continues the same supernet and trial log)."""
    stem = Path(config["checkpoint_dir"]) / f"{config['model']}-{config['dataset']}"
    supernet_key, trial_key = (artefact_key(config, supernet_settings(config["model"])),
                                artefact_key(config, trial_settings(config["model"])))
    return SearchPaths(
        supernet=Path(f"{stem}-supernet-{supernet_key}.pth"),
        trial_log=Path(f"{stem}-search-{method}-{trial_key}.jsonl"),
        best_arch=Path(f"{stem}-search-{method}-{trial_key}-best-arch.txt"),
        plot=Path(f"{stem}-search-{trial_key}.png"),
    )


def describe_arch(arch: str | list[int]) -> str:
    """``"sp"`` -> ``"layer 0: serial, layer 1: parallel (sp)"``."""
    arch = arch if isinstance(arch, str) else arch_to_str(arch)
    layers = ", ".join(f"layer {i}: {CHOICE_NAMES[choice]}" for i, choice in enumerate(str_to_arch(arch)))
    return f"{layers} ({arch})"


class Supernet:
    """A DARec supernet and its trainer; trained (or loaded) on first use, so that a search whose trial log is
    already complete costs no training."""

    def __init__(self, config: Any, train_data: Any, checkpoint: str | os.PathLike[str]):
        self.config = config
        self.train_data = train_data
        self.checkpoint = Path(checkpoint)
        self.epochs = int(config["epochs"])
        self.model = build_model(config, train_data._dataset)
        if not hasattr(self.model, "set_adapter_arch") or not len(getattr(self.model, "adapters", ())):
            raise ValueError(
                f"--search needs a model with per-layer bottleneck adapters (DARec, adapter_type: bottleneck); "
                f"{config['model']} with adapter_type={config['adapter_type']!r} has none to search over."
            )
        self.trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, self.model)
        # A fixed name (not RecBole's timestamped one), so that the next search finds it.
        self.trainer.saved_model_file = str(self.checkpoint)
        self.ready = False

    @property
    def n_layers(self) -> int:
        return len(self.model.adapters)

    def ensure_trained(self) -> None:
        if self.ready:
            return
        if self.checkpoint.is_file():
            state = load_trusted_checkpoint(str(self.checkpoint), map_location=self.config["device"])
            self._warn_if_settings_differ(state["config"])
            if state["epoch"] + 1 >= self.epochs:
                self.model.load_state_dict(state["state_dict"])
                self.model.load_other_parameter(state.get("other_parameter"))
                logger.info(
                    set_color("supernet", "green") + f": reusing {self.checkpoint} (trained "
                    f"{state['epoch'] + 1} epochs; delete it to retrain)"
                )
                self.ready = True
                return
            self.trainer.resume_checkpoint(str(self.checkpoint))
            logger.info(
                set_color("supernet", "green") + f": resuming {self.checkpoint} after epoch "
                f"{state['epoch'] + 1} of {self.epochs}"
            )
        # No validation during supernet training: with a random architecture per step a validation score would
        # describe no architecture in particular, and RecBole then checkpoints after every epoch instead.
        self.trainer.fit(self.train_data, None, saved=True, show_progress=self.config["show_progress"])
        self.ready = True

    def _warn_if_settings_differ(self, saved_config: Any) -> None:
        # The file name only says model and dataset; weights of another shape fail to load (DARec says so), but a
        # supernet trained with other losses or learning rate would be reused silently, and so would its trial log.
        changed = [
            f"{key}: {saved_config[key]!r} -> {self.config[key]!r}"
            for key in supernet_settings(self.config["model"])
            if saved_config[key] != self.config[key]
        ]
        if changed:
            logger.warning(
                f"{self.checkpoint} was trained with other settings ({'; '.join(changed)}); it is reused as is. "
                "Delete it and the search logs next to it to search with the new settings."
            )

    def score(self, arch: list[int], valid_data: Any) -> float:
        """``valid_metric`` of the supernet with ``arch`` fixed, from one validation pass."""
        self.ensure_trained()
        self.model.set_adapter_arch(arch)
        result = self.trainer.evaluate(valid_data, load_best_model=False, show_progress=False)
        value = float(result[self.config["valid_metric"].lower()])
        logger.info(f"supernet {arch_to_str(arch)}: {self.config['valid_metric']} = {value:.4f}")
        # run_search maximises: a smaller-is-better metric is negated.
        return value if self.config["valid_metric_bigger"] else -value


def validation_subset(valid_data: Any, n_users: int | None, seed: int) -> Any:
    """The validation loader cut to ``n_users`` users drawn once with ``seed`` (``search_valid_users``).

    Every candidate is scored on the same users, so their ranking is a fair comparison; a few thousand users keep
    a trial's validation pass affordable on a CPU. ~ or more users than there are: the whole loader.
    """
    dataset = valid_data._dataset
    if not n_users or int(n_users) >= len(dataset):
        return valid_data
    if int(n_users) <= 0:
        raise ValueError(f"search_valid_users={n_users}: must be positive, or ~ for every validation user.")
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(dataset), generator=generator)[: int(n_users)].sort().values
    subset = dataset.copy(dataset.inter_feat[rows])
    return FullSortEvalDataLoader(valid_data.config, subset, valid_data._sampler, shuffle=False)


def supernet_config(config: Any) -> Any:
    """A copy of the run's Config for the supernet: ``supernet: True``, ``search_epochs`` epochs, no fixed
    architecture. A copy, because model and trainer keep the Config they were built with and RecBole pickles it
    into every checkpoint (the supernet checkpoint then says what it is), while the run's own Config goes on to
    build the final model."""
    duplicate = copy.copy(config)
    epochs = int(config["search_epochs"] or config["epochs"])
    duplicate.final_config_dict = {**config.final_config_dict, "supernet": True, "adapter_arch": None, "epochs": epochs}
    return duplicate


def build_supernet(config: Any, train_data: Any, checkpoint: str | os.PathLike[str]) -> Supernet:
    return Supernet(supernet_config(config), train_data, checkpoint)


def search_architecture(
    config: Any, method: str | None, train_data: Any, valid_data: Any, supernet: Supernet | None = None,
) -> tuple[str, SearchResult]:
    """Search the per-layer serial/parallel choice of DARec's adapters; returns (best arch string, result).

    ``method``: ``bo`` or ``random`` (default: ``config['search']``). Trials go to
    ``<checkpoint_dir>/<model>-<dataset>-search-<method>.jsonl``; an existing log is continued, not restarted.
    ``supernet``: one already built for this config (default: built here).
    """
    method = str(method or config["search"]).lower()
    if method not in METHODS:
        raise ValueError(f"--search={method}: expected one of {', '.join(METHODS)}")
    paths = search_paths(config, method)
    paths.trial_log.parent.mkdir(parents=True, exist_ok=True)
    if supernet is None:  # callers running several searches pass one, so the backbone is loaded once
        supernet = build_supernet(config, train_data, paths.supernet)
    seed = config["search_seed"] if config["search_seed"] is not None else config["seed"]
    n_init, n_iter = int(config["search_n_init"]), int(config["search_n_iter"])
    if len(TrialLog(paths.trial_log).read()) < min(n_init + n_iter, 2**supernet.n_layers):
        # Trained before the first trial, so that trial's logged seconds are one validation pass; a complete log
        # (a rerun after the final training failed) needs no supernet at all.
        supernet.ensure_trained()

    scoring_data = validation_subset(valid_data, config["search_valid_users"], int(seed))
    result = run_search(
        lambda arch: supernet.score(arch, scoring_data),
        n_layers=supernet.n_layers,
        n_init=n_init,
        n_iter=n_iter,
        method=method,
        seed=int(seed),
        log_path=paths.trial_log,
        progress=bool(config["show_progress"]),
        acq_optimizer=str(config["search_acq_optimizer"] or "reparam"),
    )
    if not result.best_arch:
        raise RuntimeError(f"{paths.trial_log}: no trial gave a finite {config['valid_metric']}; nothing to train")
    str_to_arch(result.best_arch)  # validate before it is written and trained
    paths.best_arch.write_text(result.best_arch + "\n", encoding="utf-8")

    histories = {m: TrialLog(search_paths(config, m).trial_log).read() for m in METHODS}
    histories = {m: trials for m, trials in histories.items() if trials}
    try:
        plot_search(
            histories,
            paths.plot,
            title=f"{config['model']} on {config['dataset']}: {config['valid_metric']} of the supernet per trial",
        )
    except Exception as err:  # a plot is a by-product: never lose a finished search to it
        logger.warning(f"search plot not written ({err})")

    logger.info(
        set_color(f"best architecture ({method}, {len(result.trials)} trials)", "yellow")
        + f": {describe_arch(result.best_arch)}, supernet {config['valid_metric']} "
        f"{result.best_value if config['valid_metric_bigger'] else -result.best_value:.4f}; "
        f"written to {paths.best_arch}"
    )
    return result.best_arch, result
