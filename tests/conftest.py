"""Shared fixtures: a tiny RecBole atomic dataset, a fast run config and an isolated working directory.

Everything is built by the tests themselves (offline); nothing is read from ``dataset/``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest

import recbole_darec  # noqa: F401  (compat first: numpy aliases must exist before recbole is imported)

TINY_DATASET = "tiny-seq"  # must not start with "amazon-": those names trigger the Amazon preparer
TINY_USERS = 30
# More items than the largest top-k (50): full ranking calls torch.topk(scores, 50) over all items.
TINY_ITEMS = 60
TINY_SEQ_LEN = (5, 12)
T0 = 1_600_000_000

# RecBole's metric names for the plugin protocol (properties/overall.yaml: Recall, NDCG, MRR at 10 and 50).
PROTOCOL_METRICS = {f"{m}@{k}" for m in ("recall", "ndcg", "mrr") for k in (10, 50)}


def write_tiny_dataset(root: Path, name: str = TINY_DATASET, seed: int = 0) -> tuple[str, str]:
    """Write ``<root>/<name>/<name>.inter`` and ``.item`` (RecBole atomic files) and return (data_path, name).

    30 users, 60 items, each user 5-12 distinct items in time order; items carry a title and a text
    (``token_seq``) so that loading them exercises RecBole's text-field parsing (broken under pandas 3).
    The data has a learnable pattern (users walk forward through the catalogue) so metrics are not all zero.
    """
    rng = np.random.default_rng(seed)
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    inter_lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for u in range(TINY_USERS):
        length = int(rng.integers(TINY_SEQ_LEN[0], TINY_SEQ_LEN[1] + 1))
        start = int(rng.integers(0, TINY_ITEMS))
        items = [(start + step) % TINY_ITEMS for step in range(length)]
        for step, item in enumerate(items):
            inter_lines.append(f"u{u:03d}\ti{item:03d}\t{T0 + 1000 * u + 10 * step}")
    item_lines = ["item_id:token\ttitle:token_seq\ttext:token_seq"]
    for i in range(TINY_ITEMS):
        title = f"item {i} model {i % 7}"
        item_lines.append(f"i{i:03d}\t{title}\t{title}. category {i % 5}. brand {i % 3}.")
    (folder / f"{name}.inter").write_text("\n".join(inter_lines) + "\n", encoding="utf-8")
    (folder / f"{name}.item").write_text("\n".join(item_lines) + "\n", encoding="utf-8")
    return str(root), name


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> tuple[str, str]:
    """(data_path, dataset_name) of a freshly written tiny sequential dataset under ``tmp_path``."""
    return write_tiny_dataset(tmp_path / "dataset")


@pytest.fixture
def fast_config(tmp_path: Path) -> dict:
    """Config overrides for quick CPU runs: one epoch, small models, outputs under ``tmp_path``."""
    from darec_testing import quick_run_settings

    return {
        **quick_run_settings(tmp_path),
        # Small model sizes: keys of SASRec / BERT4Rec / GRU4Rec; models ignore the ones they do not use.
        "hidden_size": 32,
        "inner_size": 64,
        "embedding_size": 32,
        "n_layers": 1,
        "n_heads": 2,
    }


@pytest.fixture
def isolated_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the harness in ``tmp_path`` with a clean command line and no leaked log handlers.

    - RecBole writes ``./log/``, ``./log_tensorboard/`` and relative checkpoints under the working directory;
    - RecBole's Config parses ``--key=value`` from ``sys.argv`` (pytest's own flags, e.g. ``--durations=0``,
      would otherwise become config keys);
    - ``init_logger`` calls ``logging.basicConfig`` with a new file handler on every run, so handlers it
      manages to attach are closed and removed afterwards.
    """
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])
    root = logging.getLogger()
    handlers_before, level_before = list(root.handlers), root.level
    yield tmp_path
    for handler in list(root.handlers):
        if handler not in handlers_before:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level_before)


def assert_protocol_metrics(result: dict) -> None:
    """Keys and sane ranges of a RecBole result under the plugin protocol (not exact values)."""
    assert set(result) == PROTOCOL_METRICS, sorted(result)
    for key, value in result.items():
        assert isinstance(value, float), (key, value)
        assert 0.0 <= value <= 1.0, (key, value)
    for k in (10, 50):
        # One target per user: MRR@k <= NDCG@k <= Recall@k (= hit rate).
        assert result[f"mrr@{k}"] <= result[f"ndcg@{k}"] + 1e-4 <= result[f"recall@{k}"] + 2e-4, result
    for metric in ("recall", "ndcg", "mrr"):
        assert result[f"{metric}@10"] <= result[f"{metric}@50"] + 1e-4, result


@pytest.fixture
def one_thread():
    """Run a test on one torch intra-op thread (see recbole_darec.utils.one_torch_thread for why)."""
    from recbole_darec.utils import one_torch_thread

    with one_torch_thread():
        yield


@pytest.fixture
def text_data(tmp_path: Path) -> tuple[str, str]:
    """(data_path, name) of the tiny fixture with short, distinct item texts (darec_testing.write_text_dataset)."""
    from darec_testing import write_text_dataset

    return write_text_dataset(tmp_path / "dataset")
