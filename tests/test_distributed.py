"""Issue 8: RecBole's distributed mode runs DARec with 2 gloo processes on CPU (Config._init_device picks gloo)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp
from conftest import PROTOCOL_METRICS
from darec_testing import darec_settings, write_text_dataset

ONE_LAYER = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "ffn": 64}


def _settings(root: Path, **overrides) -> dict:
    return darec_settings(root, str(root / "dataset"), llm_random_config=dict(ONE_LAYER), epochs=3,
                          learning_rate=0.01, **overrides)


def _worker(rank: int, root: str, port: int, queue) -> None:
    """One process of the run; records the training instances (user, history length) it saw in epoch 0 and its
    loss per epoch."""
    torch.set_num_threads(1)
    sys.argv = sys.argv[:1]
    from recbole_darec import trainer as trainer_module
    from recbole_darec.model.darectokens import DARecTokens
    from recbole_darec.quick_start import run_darec

    seen: list[tuple[int, int]] = []  # epoch 0's training instances
    losses: list[float] = []  # this rank's training loss per epoch
    state = {"epoch": 0}
    original_loss = DARecTokens.calculate_loss

    def recording_loss(self, interaction):
        if state["epoch"] == 0:
            seen.extend(zip(interaction[self.USER_ID].tolist(), interaction[self.ITEM_SEQ_LEN].tolist()))
        return original_loss(self, interaction)

    original_epoch = trainer_module.Trainer._train_epoch

    def recording_epoch(self, train_data, epoch_idx, *args, **kwargs):
        state["epoch"] = epoch_idx
        loss = original_epoch(self, train_data, epoch_idx, *args, **kwargs)
        losses.append(float(sum(loss) if isinstance(loss, tuple) else loss))
        return loss

    DARecTokens.calculate_loss = recording_loss
    trainer_module.Trainer._train_epoch = recording_epoch
    settings = _settings(Path(root), local_rank=rank, world_size=2, nproc=2, ip="127.0.0.1", port=port, offset=0)
    os.chdir(root)
    result = run_darec("DARecTokens", "tiny-text", config_dict=settings)
    queue.put((rank, result, seen, losses))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_gloo_run(tmp_path):
    write_text_dataset(tmp_path / "dataset")
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.start_processes(_worker, args=(str(tmp_path), _free_port(), queue), nprocs=2, start_method="spawn")
    results = {}
    while not queue.empty():
        rank, result, seen, losses = queue.get()
        results[rank] = (result, seen, losses)
    assert set(results) == {0, 1}
    (result0, seen0, losses0), (result1, seen1, losses1) = results[0], results[1]
    # Same metric keys as a one-process run; the evaluation is reduced over both ranks, so they agree.
    assert set(result0["best_valid_result"]) == PROTOCOL_METRICS == set(result0["test_result"])
    assert result0["test_result"] == result1["test_result"]
    # Each rank trains on its own shard (DistributedSampler pads the shorter shard with at most one repeat).
    assert seen0 and seen1 and len(set(seen0) & set(seen1)) <= 1
    assert abs(len(seen0) - len(seen1)) <= 1
    assert losses0[-1] < losses0[0] and losses1[-1] < losses1[0], (losses0, losses1)
    # Only rank 0 writes checkpoints: one best-model file and one resume file.
    saved = sorted(os.listdir(tmp_path / "saved"))
    assert len([name for name in saved if name.endswith(".pth")]) == 2, saved


def test_recbole_ensure_dir_survives_losing_the_race(tmp_path, monkeypatch):
    """The race of two ranks, made certain: the other process creates the folder between RecBole's existence check
    and its makedirs (here: the check says "missing" for a folder that exists). RecBole's own code raises
    FileExistsError; every caller that bound ``ensure_dir`` at import gets the fixed code."""
    import recbole_darec  # noqa: F401  (compat first)

    # isort: split
    from recbole.data import utils as data_utils
    from recbole.trainer import trainer as recbole_trainer
    from recbole.utils import ensure_dir, logger

    made_by_the_other_rank = tmp_path / "saved"
    made_by_the_other_rank.mkdir()
    monkeypatch.setattr(os.path, "exists", lambda path: False)
    for caller_ensure_dir in (ensure_dir, recbole_trainer.ensure_dir, data_utils.ensure_dir, logger.ensure_dir):
        caller_ensure_dir(str(made_by_the_other_rank))
    assert made_by_the_other_rank.is_dir()


def _create_together(folder: str, barrier) -> None:
    import recbole_darec  # noqa: F401  (compat first)

    # isort: split
    from recbole.utils import ensure_dir

    barrier.wait()
    ensure_dir(os.path.join(folder, "saved", "deep", "er"))


def test_many_processes_create_the_same_folders_at_once(tmp_path):
    context = mp.get_context("spawn")
    barrier = context.Barrier(8)
    processes = [context.Process(target=_create_together, args=(str(tmp_path), barrier)) for _ in range(8)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [process.exitcode for process in processes] == [0] * 8
    assert (tmp_path / "saved" / "deep" / "er").is_dir()
