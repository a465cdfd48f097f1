"""TextSASRec: the frozen-text-features baseline runs in the harness, learns, and reads DARec's item-state cache."""

from __future__ import annotations

from pathlib import Path

import pytest
from darec_testing import build, darec_settings, trainer_for

pytestmark = pytest.mark.usefixtures("one_thread")


def text_sasrec_settings(tmp_path: Path, data_path: str, **overrides) -> dict:
    return darec_settings(tmp_path, data_path, sequence_layers=1, whiten_dim=16, hidden_size=16, inner_size=32,
                          **overrides)


def test_learns_a_planted_next_item_pattern(tmp_path, text_data):
    config, model, train_data, valid_data, test_data = build("TextSASRec", text_data[1], text_sasrec_settings(
        tmp_path, text_data[0], epochs=10))
    assert config["n_layers"] == 2 and config["hidden_dropout_prob"] == 0.5  # RecBole's SASRec.yaml underneath
    trainer = trainer_for(config, model)
    trainer.fit(train_data, valid_data, saved=False)
    result = trainer.evaluate(test_data, load_best_model=False)
    assert result["ndcg@10"] > 0.25, result  # a random ranking of 60 items: about 0.07


def test_reads_the_same_item_states_as_darec(tmp_path, text_data):
    settings = text_sasrec_settings(tmp_path, text_data[0])
    build("DARec", text_data[1], settings)
    cache = sorted(Path(settings["item_text_cache_dir"]).glob("item_states-*.pt"))
    build("TextSASRec", text_data[1], settings)
    assert sorted(Path(settings["item_text_cache_dir"]).glob("item_states-*.pt")) == cache  # reused, not recomputed
    assert len(cache) == 1
