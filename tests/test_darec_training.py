"""DARec training end to end on the tiny fixture: one epoch of both families, training rows without valid or test
items, items without text, LoRA, reproducibility and the two learning rates.

Every model here is a tiny random backbone (darec_testing.TINY_LLM): the tests check behaviour, not quality.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_USERS, assert_protocol_metrics
from darec_testing import (
    BACKBONES,
    DAREC_TEST_FIXTURES,
    ITEM_LAYOUT,
    build,
    darec_settings,
    settings_for,
    short_item_text,
    trainer_for,
    write_text_dataset,
)

from recbole_darec.quick_start import run_darec

pytestmark = DAREC_TEST_FIXTURES


# --------------------------------------------------------------------------- one epoch, both families


@pytest.mark.parametrize("llm_path", BACKBONES)
@pytest.mark.parametrize("model_name", ["DARec", "DARecbase", "DARecTokens"])
def test_one_epoch_on_tiny_fixture(isolated_run, tiny_dataset, model_name, llm_path):
    layout = {} if model_name == "DARecTokens" else ITEM_LAYOUT
    settings = darec_settings(isolated_run, tiny_dataset[0], llm_path=llm_path, **layout)
    result = run_darec(model=model_name, dataset=tiny_dataset[1], config_dict=settings)

    assert result["model"] == model_name
    for metrics in (result["best_valid_result"], result["test_result"]):
        assert_protocol_metrics(metrics)
        assert all(math.isfinite(value) for value in metrics.values())
    assert Path(result["saved_model_file"]).is_file()


def test_darecbase_is_darec_with_causal_mask(tmp_path, text_data):
    # DARecbase = DARec's settings (its yaml inherits DARec.yaml) with context_masking off.
    darec_config, *_ = build("DARec", text_data[1], settings_for(tmp_path, text_data, **ITEM_LAYOUT))
    base_config, base_model, *_ = build("DARecbase", text_data[1], settings_for(tmp_path, text_data, **ITEM_LAYOUT))
    assert darec_config["context_masking"] is True and base_config["context_masking"] is False
    assert base_model.context_masking is False
    for key in ("temperature", "lambda_align", "lambda_hard", "hard_negatives", "adapter_type", "use_item_id"):
        assert base_config[key] == darec_config[key], key


# ------------------------------------------------------------------------- training rows: one per user and window


def inter_sequences(data_path: str, name: str) -> dict[str, list[str]]:
    """Each raw user's items in time order, read from the .inter file itself (not through RecBole)."""
    rows = defaultdict(list)
    lines = (Path(data_path) / name / f"{name}.inter").read_text(encoding="utf-8").splitlines()[1:]
    for line in lines:
        user, item, timestamp = line.split("\t")
        rows[user].append((float(timestamp), item))
    return {user: [item for _, item in sorted(items)] for user, items in rows.items()}


@pytest.mark.parametrize("max_len", [20, 4], ids=["whole", "truncated"])
def test_training_rows_without_valid_or_test_items(tmp_path, text_data, max_len):
    _, _, train_data, valid_data, test_data = build("DARecTokens", text_data[1], settings_for(
        tmp_path, text_data, MAX_ITEM_LIST_LENGTH=max_len))
    dataset = train_data._dataset
    raw = inter_sequences(*text_data)
    to_token = dataset.field2id_token[dataset.iid_field]
    user_token = dataset.field2id_token[dataset.uid_field]

    users = dataset.inter_feat[dataset.uid_field].tolist()
    assert len(set(users)) == TINY_USERS
    if max_len == 20:
        assert len(users) == TINY_USERS  # whole histories fit: exactly one row per user
    else:
        assert len(users) > TINY_USERS  # long histories are cut into windows (test_item_level checks coverage)
    sequences, lengths = dataset.training_sequences()
    last_row = {user: index for index, user in enumerate(users)}
    for user, index in last_row.items():
        row, length = sequences[index].tolist(), int(lengths[index])
        items = raw[user_token[user]]
        train_items = items[:-2]  # leave-one-out by time: the last two are valid and test
        row_items = [to_token[i] for i in row[:length]]
        # The user's last row is the most recent part of the training sequence, complete when it fits.
        assert row_items == train_items[-length:], user_token[user]
        assert length >= min(len(train_items), max_len)
        assert not set(row_items) & set(items[-2:])
        assert all(i == 0 for i in row[length:])

    for loader, offset in ((valid_data, -2), (test_data, -1)):
        feat = loader._dataset.inter_feat
        for user, target in zip(feat[dataset.uid_field].tolist(), feat[dataset.iid_field].tolist()):
            assert to_token[target] == raw[user_token[user]][offset]


# ------------------------------------------------------------------------- no text, no .item file


def test_items_without_text_and_without_rows(tmp_path):
    text_data = write_text_dataset(tmp_path / "dataset", missing=(3, 4), empty=(7,))
    config, model, train_data, valid_data, test_data = build("DARecTokens", text_data[1], settings_for(tmp_path,
                                                                                                 text_data))
    dataset = train_data._dataset
    token2id = dataset.field2token_id[dataset.iid_field]
    for item in range(60):
        sentence = dataset.item_sentences[token2id[f"i{item:03d}"]]
        expected = "" if item in (3, 4, 7) else short_item_text(item)
        assert sentence == expected, item
        assert int(model.item_token_len[token2id[f"i{item:03d}"]]) == min(len(expected), 8)
    assert dataset.item_sentences[0] == ""
    run_one_epoch(config, model, train_data, valid_data, test_data)


def test_dataset_without_item_file(tmp_path, text_data):
    (Path(text_data[0]) / text_data[1] / f"{text_data[1]}.item").unlink()
    config, model, train_data, valid_data, test_data = build("DARecTokens", text_data[1], settings_for(tmp_path,
                                                                                                 text_data))
    assert set(train_data._dataset.item_sentences) == {""}
    assert int(model.item_token_len.max()) == 0
    run_one_epoch(config, model, train_data, valid_data, test_data)


def run_one_epoch(config, model, train_data, valid_data, test_data) -> dict:
    trainer = trainer_for(config, model)
    trainer.fit(train_data, valid_data, saved=False, show_progress=False)
    result = {key: float(value) for key, value in trainer.evaluate(test_data, load_best_model=False).items()}
    assert_protocol_metrics(result)
    losses = list(trainer.train_loss_dict.values())
    assert losses and all(math.isfinite(loss) for loss in losses)
    return result


# ------------------------------------------------------------------------------------------------ LoRA


@pytest.mark.parametrize("llm_path", BACKBONES)
def test_lora_trains_one_epoch(tmp_path, text_data, llm_path):
    config, model, train_data, valid_data, test_data = build("DARecTokens", text_data[1], settings_for(
        tmp_path, text_data, llm_path=llm_path, adapter_type="lora", lora_target_modules=["q_proj", "v_proj"]))
    lora = {n: p.detach().clone() for n, p in model.llm.named_parameters() if "lora_" in n}
    assert lora and all(model.llm.get_parameter(n).requires_grad for n in lora)
    base = {n: p.detach().clone() for n, p in model.llm.named_parameters() if "lora_" not in n}
    assert not any(model.llm.get_parameter(n).requires_grad for n in base)

    run_one_epoch(config, model, train_data, valid_data, test_data)

    assert any(not torch.equal(model.llm.get_parameter(n), value) for n, value in lora.items())
    assert all(torch.equal(model.llm.get_parameter(n), value) for n, value in base.items())
    # LoRA weights are saved (they train), the frozen base weights are not.
    state = model.state_dict()
    llm_keys = [key for key in state if key.startswith("llm.")]
    assert llm_keys and all("lora_" in key for key in llm_keys)


# ------------------------------------------------------------------------------------- reproducibility


def test_same_seed_same_metrics(isolated_run, tiny_dataset):
    settings = darec_settings(isolated_run, tiny_dataset[0], epochs=2)
    first = run_darec(model="DARecTokens", dataset=tiny_dataset[1], config_dict=settings, saved=False)
    second = run_darec(model="DARecTokens", dataset=tiny_dataset[1], config_dict=settings, saved=False)
    assert first["best_valid_result"] == second["best_valid_result"]
    assert first["test_result"] == second["test_result"]
    assert np.isfinite(list(first["test_result"].values())).all()


@pytest.mark.parametrize("llm_learning_rate", [3e-4, None])
def test_llm_side_weights_get_their_own_learning_rate(tmp_path, text_data, llm_learning_rate):
    config, model, _, _, _ = build("DARecTokens", text_data[1], settings_for(
        tmp_path, text_data, learning_rate=2e-3, llm_learning_rate=llm_learning_rate))
    groups = trainer_for(config, model).optimizer.param_groups
    assert [group["lr"] for group in groups] == [2e-3, llm_learning_rate or 2e-3]
    llm_side = {id(p) for p in groups[1]["params"]}
    assert all(id(p) in llm_side for p in model.adapters.parameters())
    assert id(model.special_embeddings.weight) in llm_side and id(model.user_proj.weight) not in llm_side
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == llm_side | {id(p) for p in groups[0]["params"]}
