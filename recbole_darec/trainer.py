"""Trainers: RecBole's, with trusted checkpoint loading and atomic checkpoint writes."""

from __future__ import annotations

import contextlib
import os

import torch
from recbole.trainer import Trainer as RecBoleTrainer

from recbole_darec.compat import load_trusted_checkpoint


def atomic_torch_save(obj, path: str) -> None:
    """Write ``obj`` to ``path`` so that a crash mid-write never leaves a truncated file under ``path``."""
    tmp_path = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp_path, "wb") as f:
            torch.save(obj, f, pickle_protocol=4)
            f.flush()
            os.fsync(f.fileno())  # the rename must not become visible before the data is on disk
        os.replace(tmp_path, path)
    except BaseException:
        # A failed save (unpicklable object, full disk, Ctrl-C) leaves neither a partial file nor the temp file.
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp_path)
        raise


class Trainer(RecBoleTrainer):
    """RecBole's Trainer for every model in the harness.

    - checkpoints are written atomically (temp file + rename);
    - ``evaluate(load_best_model=True)`` and ``resume_checkpoint`` load our own checkpoints with
      ``weights_only=False`` (RecBole pickles its Config into them, which torch>=2.6 refuses by default).
    """

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        if not self.config["single_spec"] and self.config["local_rank"] != 0:
            return
        saved_model_file = kwargs.pop("saved_model_file", self.saved_model_file)
        state = {
            "config": self.config,
            "epoch": epoch,
            "cur_step": self.cur_step,
            "best_valid_score": self.best_valid_score,
            "state_dict": self.model.state_dict(),
            "other_parameter": self.model.other_parameter(),
            "optimizer": self.optimizer.state_dict(),
        }
        atomic_torch_save(state, saved_model_file)
        if verbose:
            self.logger.info(f"Saving current: {saved_model_file}")

    def resume_checkpoint(self, resume_file):
        resume_file = str(resume_file)
        checkpoint = load_trusted_checkpoint(resume_file, map_location=self.device)
        self.saved_model_file = resume_file
        self.start_epoch = checkpoint["epoch"] + 1
        self.cur_step = checkpoint["cur_step"]
        self.best_valid_score = checkpoint["best_valid_score"]
        self.model.load_state_dict(checkpoint["state_dict"])
        self.model.load_other_parameter(checkpoint.get("other_parameter"))
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.logger.info(f"Checkpoint loaded. Resume training from epoch {self.start_epoch}")

    @torch.no_grad()
    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if load_best_model:
            checkpoint_file = model_file or self.saved_model_file
            checkpoint = load_trusted_checkpoint(checkpoint_file, map_location=self.device)
            self.model.load_state_dict(checkpoint["state_dict"])
            self.model.load_other_parameter(checkpoint.get("other_parameter"))
            self.logger.info(f"Loading model structure and parameters from {checkpoint_file}")
        return super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)
