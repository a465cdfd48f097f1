"""DARec's caches: item vectors encoded once per evaluation and dropped when the architecture changes, the rolling
training cache of item states, the fixed state standardisation.

Every model here is a tiny random backbone (darec_testing.TINY_LLM): the tests check behaviour, not quality.
"""

from __future__ import annotations

import math

import torch
from conftest import TINY_USERS
from darec_testing import DAREC_TEST_FIXTURES, build, first_batch, settings_for, trainer_for

from recbole_darec.model.adapters import PARALLEL, SERIAL

pytestmark = DAREC_TEST_FIXTURES


# ------------------------------------------------------------------------- items encoded once per eval


def test_items_encoded_once_per_evaluation(tmp_path, text_data):
    config, model, train_data, valid_data, _ = build("DARecTokens", text_data[1], settings_for(
        tmp_path, text_data, eval_batch_size=8))
    trainer = trainer_for(config, model)
    counts = {"encode_all_items": 0, "full_sort_predict": 0}
    for name in counts:
        original = getattr(model, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        setattr(model, name, counted)
    for _ in range(2):
        counts.update(encode_all_items=0, full_sort_predict=0)
        trainer.evaluate(valid_data, load_best_model=False)
        assert counts["full_sort_predict"] == math.ceil(TINY_USERS / 8)
        assert counts["encode_all_items"] == 1, counts


def test_evaluation_sees_an_architecture_set_in_eval_mode(tmp_path, text_data):
    # The architecture search sets an architecture and evaluates, without a training step in between: the
    # evaluation must encode items with that architecture, not reuse the vectors of the previous one.
    config, model, train_data, valid_data, _ = build("DARecTokens", text_data[1], settings_for(
        tmp_path, text_data, supernet=True, adapter_arch=None))
    with torch.no_grad():
        for name, param in model.adapters.named_parameters():
            if name.endswith("up.weight"):
                param.normal_()
    trainer = trainer_for(config, model)
    model.set_adapter_arch([SERIAL, SERIAL])
    trainer.evaluate(valid_data, load_best_model=False)
    model.set_adapter_arch([PARALLEL, PARALLEL])
    trainer.evaluate(valid_data, load_best_model=False)
    assert [layer.router.choice for layer in model.adapters] == [PARALLEL, PARALLEL]
    with torch.no_grad():
        expected = model.item_vectors(model.encode_all_items())
    torch.testing.assert_close(model.all_item_vectors(), expected)


def test_training_item_cache_rolls_over_every_item_in_n_steps(tmp_path, text_data):
    _, model, train_data, _, _ = build("DARecTokens", text_data[1], settings_for(tmp_path, text_data,
                                                                          item_cache_refresh=4))
    encoded = []
    original = model.encode_all_items

    def record(items=None):
        encoded.append(None if items is None else items.tolist())
        return original(items)

    model.encode_all_items = record
    model.train()
    batch = first_batch(train_data)
    for _ in range(9):
        model.calculate_loss(batch)
    assert encoded[0] is None  # step 1: every item, once
    slices = encoded[1:]
    assert len(slices) == 8 and all(len(part) == len(slices[0]) for part in slices)
    every_item = list(range(1, model.n_items))
    for sweep in (slices[:4], slices[4:]):  # each run of item_cache_refresh steps re-encodes every item once
        flat = [item for part in sweep for item in part]
        assert sorted(set(flat)) == every_item and len(flat) - len(set(flat)) < len(slices[0])
    model.encode_all_items = original
    fresh = original()  # no optimizer step was taken: the cache holds exactly the current states
    assert torch.allclose(model.item_cache.states[1:], fresh[1:], atol=1e-5)


def test_state_standardisation_is_fixed_by_the_first_full_encoding(tmp_path, text_data):
    _, model, train_data, _, _ = build("DARecTokens", text_data[1], settings_for(tmp_path, text_data))
    first = model.encode_all_items()
    assert not bool(model.state_stats_ready)  # encoding is free of side effects ...
    model.freeze_state_statistics()  # ... the statistics are fixed by an explicit step
    mean, std = model.state_mean.clone(), model.state_std.clone()
    assert torch.allclose(mean, first[1:].mean(0)) and bool(model.state_stats_ready)
    with torch.no_grad():
        for adapter in model.adapters.parameters():
            adapter.add_(0.5)  # the states change ...
    assert not torch.allclose(model.encode_all_items()[1:].mean(0), mean)
    model.freeze_state_statistics()
    assert torch.equal(model.state_mean, mean) and torch.equal(model.state_std, std)  # ... the statistics do not
    assert "state_mean" in model.state_dict() and "state_stats_ready" in model.state_dict()
