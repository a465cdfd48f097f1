"""DARec's trainable parts and checkpoints: gradients reach only what trains, the frozen backbone stays bit-identical
through training and a checkpoint round trip, a checkpoint of other settings is refused.

Every model here is a tiny random backbone (darec_testing.TINY_LLM): the tests check behaviour, not quality.
"""

from __future__ import annotations

import logging

import pytest
import torch
from darec_testing import (
    DAREC_TEST_FIXTURES,
    build,
    clone_state,
    first_batch,
    full_sort_batch,
    new_model,
    settings_for,
    trainer_for,
)

TRAINABLE_PREFIXES = ("adapters.", "special_embeddings.", "user_proj.", "item_proj.", "item_id_embedding.",
                      "cf_injection.")

pytestmark = DAREC_TEST_FIXTURES


# ---------------------------------------------------- gradients, frozen backbone, checkpoint round trip


def test_gradients_reach_only_trainable_parts(tmp_path, text_data):
    settings = settings_for(tmp_path, text_data, adapter_arch="sp")
    _, model, train_data, _, _ = build("DARecTokens", text_data[1], settings)
    model.train()
    sum(model.calculate_loss(first_batch(train_data))).backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad, "no gradient at all"
    assert all(name.startswith(TRAINABLE_PREFIXES) for name in with_grad), sorted(with_grad)
    for name, param in model.llm.named_parameters():
        assert not param.requires_grad and param.grad is None, name
    # Each trainable group really receives a signal (the adapters' `up` first: `down` waits for a non-zero up).
    for prefix in ("special_embeddings.", "user_proj.", "item_proj.", "item_id_embedding."):
        assert any(model.get_parameter(n).grad.abs().sum() > 0 for n in with_grad if n.startswith(prefix)), prefix
    ups = [n for n in with_grad if n.startswith("adapters.") and n.endswith("up.weight")]
    assert len(ups) == 4 and all(model.get_parameter(n).grad.abs().sum() > 0 for n in ups)


def test_trainable_parameter_report(tmp_path, text_data, caplog):
    with caplog.at_level(logging.INFO):
        _, model, *_ = build("DARecTokens", text_data[1], settings_for(tmp_path, text_data))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert 0 < trainable < total
    assert f"DARecTokens parameters: trainable {trainable:,} / total {total:,}" in caplog.text


def test_backbone_bit_identical_after_training_and_checkpoint_round_trip(tmp_path, text_data):
    config, model, train_data, valid_data, _ = build("DARecTokens", text_data[1], settings_for(tmp_path, text_data,
                                                                                        epochs=2))
    backbone_before = clone_state(model.llm)
    trainable_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer_for(config, model).fit(train_data, None, saved=False, show_progress=False)

    for key, value in model.llm.state_dict().items():
        assert torch.equal(value, backbone_before[key]), f"backbone {key} changed in training"
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trainable_before[n])]
    assert any(n.startswith("adapters.") for n in changed) and any(n.startswith("user_proj.") for n in changed)

    # The checkpoint holds what trains, not the frozen backbone.
    state = model.state_dict()
    assert not [key for key in state if key.startswith("llm.")]
    assert {key.split(".")[0] for key in state} >= {"adapters", "special_embeddings", "user_proj", "item_proj",
                                                   "item_id_embedding", "hard_negatives"}
    frozen_numel = sum(p.numel() for p in model.llm.parameters())
    assert sum(v.numel() for v in state.values()) < frozen_numel

    # A fresh model (same seed: the same random backbone) scores differently until the checkpoint is loaded.
    batch = full_sort_batch(valid_data)
    model.eval()
    with torch.no_grad():
        trained_scores = model.full_sort_predict(batch)
        fresh = new_model(config, train_data).eval()
        assert not torch.allclose(fresh.full_sort_predict(batch), trained_scores)
        fresh.load_state_dict(state)
        fresh.eval()
        torch.testing.assert_close(fresh.full_sort_predict(batch), trained_scores, rtol=0, atol=1e-6)


def test_checkpoint_from_another_setting_is_refused(tmp_path, text_data):
    config, model, train_data, _, _ = build("DARecTokens", text_data[1], settings_for(tmp_path, text_data,
                                                                                adapter_arch="s"))
    other_config, other, *_ = build("DARecTokens", text_data[1], settings_for(tmp_path, text_data, adapter_arch="p"))
    with pytest.raises(RuntimeError, match="same settings"):
        other.load_state_dict(model.state_dict())
