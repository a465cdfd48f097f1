"""Trainers: RecBole's, with trusted checkpoint loading and atomic checkpoint writes."""

from __future__ import annotations

import os
import random

import numpy as np
import torch
from recbole.trainer import Trainer as RecBoleTrainer

from recbole_darec.compat import load_trusted_checkpoint
from recbole_darec.files import atomic_torch_save


class TrustedCheckpointLoading:
    """Mixin for every trainer the plugin runs (its ``Trainer`` and RecBole's special ones: TraditionalTrainer of
    Pop/ItemKNN, KGTrainer, ...): RecBole's ``evaluate(load_best_model=True)`` calls ``torch.load`` with torch's
    ``weights_only`` default, which refuses RecBole's own checkpoints (they pickle the Config)."""

    def __init__(self, config, model):
        super().__init__(config, model)
        if getattr(self, "saved_model_file", None):
            # RecBole names the checkpoint after the clock, to the second: two rows started side by side in one
            # second (seeds run in parallel) wrote one file and both tested whichever weights were saved last.
            # The process id makes the name this run's own; <model>-<time>-... still finds it for resume.
            stem, ext = os.path.splitext(self.saved_model_file)
            self.saved_model_file = f"{stem}-{os.getpid()}{ext}"

    @torch.no_grad()
    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if load_best_model:
            checkpoint_file = model_file or self.saved_model_file
            checkpoint = load_trusted_checkpoint(checkpoint_file, map_location=self.device)
            self.model.load_state_dict(checkpoint["state_dict"])
            self.model.load_other_parameter(checkpoint.get("other_parameter"))
            self.logger.info(f"Loading model structure and parameters from {checkpoint_file}")
        return super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)


class Trainer(TrustedCheckpointLoading, RecBoleTrainer):
    """RecBole's Trainer for every model in the harness.

    - checkpoints are written atomically (temp file + rename);
    - ``evaluate(load_best_model=True)`` and ``resume_checkpoint`` load our own checkpoints with
      ``weights_only=False`` (RecBole pickles its Config into them, which torch>=2.6 refuses by default);
    - after every completed epoch (after its validation, if any) a resume checkpoint ``<saved_model_file>-last.pth``
      holds everything the next epoch depends on (optimizer, early-stopping state, RNGs, the train loader's
      shuffling generator), so ``--resume`` continues exactly where an interrupted run stopped. The best-model
      checkpoint is RecBole's: written only when the validation score improves.
    """

    def __init__(self, config, model):
        distributed = not config["single_spec"]
        if distributed and config["device"].type == "cpu":
            # RecBole wraps the model in DDP with device_ids=[local_rank], which DDP refuses for a CPU module
            # (gloo runs, Config._init_device): build RecBole's trainer as single-process, then wrap it ourselves.
            config["single_spec"] = True
            try:
                super().__init__(config, model)
            finally:
                config["single_spec"] = False
            self.distributed_model = torch.nn.parallel.DistributedDataParallel(self.model)
        else:
            super().__init__(config, model)
        if distributed:
            # RecBole names the checkpoint after each process's clock; rank 0 writes it and every rank loads it for
            # the test evaluation, so all ranks take rank 0's name.
            names = [self.saved_model_file]
            torch.distributed.broadcast_object_list(names, src=0)
            self.saved_model_file = names[0]
        self._train_data = None  # set by fit(): its shuffling generator is part of the resume state
        self._valid_data = None
        self._pending_generator_state: torch.Tensor | None = None  # from resume_checkpoint, applied in fit()
        self._save_last = False  # fit(saved=...): no resume checkpoints when the run saves nothing

    def _build_optimizer(self, **kwargs):
        # A model may ask for per-group learning rates (DARec: the LLM-side weights learn slower than its heads).
        if "params" not in kwargs and hasattr(self.model, "optimizer_param_groups"):
            kwargs["params"] = self.model.optimizer_param_groups()
        return super()._build_optimizer(**kwargs)

    @property
    def last_checkpoint_file(self) -> str:
        stem, ext = os.path.splitext(self.saved_model_file)
        if stem.endswith("-last"):  # resumed from a -last file: keep writing that file, not "-last-last"
            return self.saved_model_file
        return f"{stem}-last{ext or '.pth'}"

    # ----- fit: RecBole's loop, with a resume checkpoint after each epoch ----------------------------------------
    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        self._train_data, self._valid_data = train_data, valid_data
        if self._pending_generator_state is not None and getattr(train_data, "generator", None) is not None:
            train_data.generator.set_state(self._pending_generator_state)
        self._pending_generator_state = None
        if self.start_epoch > 0 and (self.start_epoch >= self.epochs or self.cur_step > self.stopping_step):
            # Resumed from a run that had already finished (all epochs, or early stopping fired: RecBole stops
            # once cur_step > stopping_step). RecBole's fit would save the loaded weights over the best-model file
            # here; those are the last epoch's weights when resuming from a -last file, not the best.
            self.logger.info(f"Training had already finished after epoch {self.start_epoch - 1}: nothing to resume.")
            return self.best_valid_score, self.best_valid_result

        def end_of_validated_epoch(epoch_idx, valid_score):
            # RecBole calls this after early stopping and best_valid_result are updated: the epoch is complete.
            if saved:
                self._save_resume_checkpoint(epoch_idx)
            if callback_fn:
                callback_fn(epoch_idx, valid_score)

        self._save_last = saved
        try:
            result = super().fit(train_data, valid_data, verbose=verbose, saved=saved, show_progress=show_progress,
                                 callback_fn=end_of_validated_epoch)
        finally:
            self._train_data = self._valid_data = None
        if not self.config["single_spec"]:
            torch.distributed.barrier()  # rank 0 has written the best checkpoint before any rank loads it
        return result

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        loss = super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)
        validated = self.eval_step > 0 and self._valid_data and (epoch_idx + 1) % self.eval_step == 0
        if not validated and self._save_last:
            # No validation this epoch, so no callback: the epoch is complete once trained. RecBole's fit adds
            # the epoch's loss to train_loss_dict only after this returns.
            self.train_loss_dict[epoch_idx] = sum(loss) if isinstance(loss, tuple) else loss
            self._save_resume_checkpoint(epoch_idx)
        return loss

    def _checkpoint_state(self, epoch: int) -> dict:
        return {
            "config": self.config,
            "epoch": epoch,
            "cur_step": self.cur_step,
            "best_valid_score": self.best_valid_score,
            "state_dict": self.model.state_dict(),
            "other_parameter": self.model.other_parameter(),
            "optimizer": self.optimizer.state_dict(),
        }

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        if not self.config["single_spec"] and self.config["local_rank"] != 0:
            return
        saved_model_file = kwargs.pop("saved_model_file", self.saved_model_file)
        atomic_torch_save(self._checkpoint_state(epoch), saved_model_file, pickle_protocol=4)
        if verbose:
            self.logger.info(f"Saving current: {saved_model_file}")

    def _save_resume_checkpoint(self, epoch: int) -> None:
        if not self.config["single_spec"] and self.config["local_rank"] != 0:
            return
        state = self._checkpoint_state(epoch)
        state.update(
            best_valid_result=self.best_valid_result,
            train_loss_dict=dict(self.train_loss_dict),
            rng=_rng_state(),
            train_generator=_generator_state(self._train_data),
        )
        if hasattr(self.model, "training_state"):  # caches outside the state dict that the next step reads
            state["model_training_state"] = self.model.training_state()
        atomic_torch_save(state, self.last_checkpoint_file, pickle_protocol=4)

    def resume_checkpoint(self, resume_file):
        resume_file = str(resume_file)
        checkpoint = load_trusted_checkpoint(resume_file, map_location=self.device)
        if "state_dict" not in checkpoint or "epoch" not in checkpoint:
            raise ValueError(f"--resume={resume_file}: not a training checkpoint (no weights or epoch); give a "
                             "saved/<Model>-<time>-last.pth or .pth written by run_darec.py.")
        check_checkpoint_matches(checkpoint, self.config, resume_file)
        self.saved_model_file = resume_file
        self.start_epoch = checkpoint["epoch"] + 1
        self.cur_step = checkpoint["cur_step"]
        self.best_valid_score = checkpoint["best_valid_score"]
        self.model.load_state_dict(checkpoint["state_dict"])
        self.model.load_other_parameter(checkpoint.get("other_parameter"))
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        # The best-model file of RecBole has none of the following: resuming from it restores weights, optimizer
        # and early-stopping counters only (RNG streams then differ from the uninterrupted run).
        self.best_valid_result = checkpoint.get("best_valid_result", self.best_valid_result)
        self.train_loss_dict = dict(checkpoint.get("train_loss_dict") or {})
        if checkpoint.get("rng") is not None:
            _set_rng_state(checkpoint["rng"])
        self._pending_generator_state = checkpoint.get("train_generator")
        if checkpoint.get("model_training_state") is not None and hasattr(self.model, "load_training_state"):
            self.model.load_training_state(checkpoint["model_training_state"])
        if resume_file.endswith("-last.pth"):
            # Keep RecBole's best-model file next to it: the best checkpoint keeps being written on improvement.
            self.saved_model_file = resume_file[: -len("-last.pth")] + ".pth"
        self.logger.info(f"Checkpoint loaded. Resume training from epoch {self.start_epoch}")


class DARecTrainer(Trainer):
    """The plugin's Trainer, and with ``text_prior_weights`` set, the text prior's weight chosen on validation once
    training has ended: early stopping validates the model at ``text_prior_weight`` (its own scores at 0), since
    the prior lifts the early epochs most and, in early stopping's validation, ends training on a flat stretch
    (BENCHMARKS.md, The text prior). The chosen weight is saved into the best checkpoint."""

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        result = super().fit(train_data, valid_data, verbose=verbose, saved=saved, show_progress=show_progress,
                             callback_fn=callback_fn)
        candidates = self.config["text_prior_weights"]
        if not candidates or valid_data is None:
            return result
        if saved:
            checkpoint = load_trusted_checkpoint(self.saved_model_file, map_location=self.device)
            self.model.load_state_dict(checkpoint["state_dict"])
        scored = []
        for weight in candidates:
            self.model.text_prior_weight = float(weight)
            valid_result = self.evaluate(valid_data, load_best_model=False, show_progress=show_progress)
            scored.append((valid_result[self.valid_metric], float(weight), valid_result))
            self.logger.info(f"text_prior_weight {weight}: valid {self.valid_metric} {scored[-1][0]:.4f}")
        sign = 1 if self.valid_metric_bigger else -1
        best_score, best_weight, best_result = max(scored, key=lambda entry: sign * entry[0])  # first of ties
        self.model.text_prior_weight, self.model.text_prior_chosen = best_weight, True
        self.logger.info(f"text_prior_weight {best_weight} chosen on validation")
        if saved and (self.config["single_spec"] or self.config["local_rank"] == 0):
            checkpoint["other_parameter"] = self.model.other_parameter()
            atomic_torch_save(checkpoint, self.saved_model_file, pickle_protocol=4)
        self.best_valid_score, self.best_valid_result = best_score, best_result
        return best_score, best_result


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _generator_state(data) -> torch.Tensor | None:
    generator = getattr(data, "generator", None)
    return generator.get_state() if generator is not None else None


# Settings that decide the shapes and meaning of a checkpoint's weights: a checkpoint written under other values
# fails later with a shape error or, worse, loads and silently scores other items.
CHECKPOINT_IDENTITY_KEYS = ("model", "dataset", "llm_path", "llm_layers")


def check_checkpoint_matches(checkpoint: dict, config, checkpoint_file: str) -> None:
    """Refuse a checkpoint written for another model, dataset or backbone, naming the setting that differs."""
    saved = checkpoint.get("config")
    if saved is None:
        return
    for key in CHECKPOINT_IDENTITY_KEYS:
        ours, theirs = _config_get(config, key), _config_get(saved, key)
        if ours != theirs:
            raise CheckpointMismatchError(
                f"{checkpoint_file}: written with {key}={theirs!r}, but this run has {key}={ours!r}; use a checkpoint "
                f"of the same {key} or run with --{key}={theirs}."
            )


def _config_get(config, key: str):
    try:
        return config[key]
    except (KeyError, TypeError):
        return None


class CheckpointMismatchError(ValueError):
    """A checkpoint does not belong to this model/dataset/backbone."""
