"""DARec end to end on the tiny fixture: leakage, training runs, frozen backbone, losses, data, evaluation.

Every model here is a tiny random backbone (darec_testing.TINY_LLM): the tests check behaviour, not quality.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import TINY_USERS, assert_protocol_metrics
from darec_testing import (
    BACKBONES,
    TINY_LLM,
    build,
    clone_state,
    darec_settings,
    first_batch,
    full_sort_batch,
    new_model,
    short_item_text,
    trainer_for,
    write_text_dataset,
)

from recbole_darec.model.adapters import PARALLEL, SERIAL, get_architecture
from recbole_darec.model.layout import pack_sequences
from recbole_darec.model.losses import cooccurrence_matrix, mine_hard_negatives
from recbole_darec.quick_start import run_darec

# Leakage must hold with CF injection on too (its vectors sit at [CF_USER] and at every item's [ITEM]).
CF_MODELS = [None, "BPR"]
TRAINABLE_PREFIXES = ("adapters.", "special_embeddings.", "user_proj.", "item_proj.", "item_id_embedding.",
                      "cf_injection.")


# RecBole's Trainer writes ./log_tensorboard and its Config reads sys.argv (pytest's own flags): every test runs
# in its tmp_path with a clean command line (conftest's isolated_run), on one torch thread.
pytestmark = pytest.mark.usefixtures("one_thread", "isolated_run")



def settings_for(tmp_path, text_data, **overrides):
    return darec_settings(tmp_path, text_data[0], **overrides)


def inter_sequences(data_path: str, name: str) -> dict[str, list[str]]:
    """Each raw user's items in time order, read from the .inter file itself (not through RecBole)."""
    rows = defaultdict(list)
    lines = (Path(data_path) / name / f"{name}.inter").read_text(encoding="utf-8").splitlines()[1:]
    for line in lines:
        user, item, timestamp = line.split("\t")
        rows[user].append((float(timestamp), item))
    return {user: [item for _, item in sorted(items)] for user, items in rows.items()}


# ----------------------------------------------------------------------------------- (a) no future leakage


def distinct_texts(model, seed: int = 0) -> None:
    """Random token texts of 3 to item_max_tokens tokens: every item distinct, every token position used."""
    generator = torch.Generator().manual_seed(seed)
    n_items, width = model.item_token_ids.shape
    model.item_token_ids = torch.randint(1, 256, (n_items, width), generator=generator)
    model.item_token_len = torch.randint(3, width + 1, (n_items,), generator=generator)
    model.item_token_len[0] = 0
    model.item_token_ids[torch.arange(width)[None, :] >= model.item_token_len[:, None]] = 0


@pytest.mark.parametrize("cf_model", CF_MODELS, ids=lambda name: f"cf={name}")
@pytest.mark.parametrize("context_masking", [True, False], ids=["context", "causal"])
@pytest.mark.parametrize("llm_path", BACKBONES)
def test_no_future_leakage(tmp_path, text_data, llm_path, context_masking, cf_model):
    _, model, train_data, _, _ = build("DARec", text_data[1], settings_for(
        tmp_path, text_data, llm_path=llm_path, context_masking=context_masking, cf_model=cf_model))
    model.eval()
    distinct_texts(model)
    # Row 0 is the user under test; row 1 (shorter, so padded) must not move either.
    seq = torch.tensor([[3, 9, 14, 27, 40], [5, 6, 7, 0, 0]])
    seq_len = torch.tensor([5, 3])
    users = torch.tensor([1, 2])
    n_slots = seq.shape[1]

    def states():
        with torch.no_grad():
            return model.encode_sequences(seq, seq_len, users)

    def check(base, changed, slot, what):
        # Everything before `slot` (the user after items 1..slot) is unchanged; `slot` itself does change
        # (otherwise the perturbation proved nothing); the other user is untouched.
        torch.testing.assert_close(changed[0, :slot], base[0, :slot], rtol=0, atol=1e-5,
                                   msg=lambda m: f"{what} at item {slot + 1} leaked into earlier states: {m}")
        assert (changed[0, slot] - base[0, slot]).abs().max() > 1e-4, f"{what}: item {slot + 1} state unchanged"
        torch.testing.assert_close(changed[1, :3], base[1, :3], rtol=0, atol=1e-5)

    base = states()
    original_ids = model.item_token_ids.clone()
    for slot in range(1, n_slots):
        item = int(seq[0, slot])
        # Every single token of the later item.
        for position in range(int(model.item_token_len[item])):
            model.item_token_ids[item, position] = (original_ids[item, position] + 97) % 255 + 1
            check(base, states(), slot, f"token {position}")
            model.item_token_ids[item, position] = original_ids[item, position]
        # A different item in that slot (other text, other ID: with CF injection also another CF vector).
        seq[0, slot] = 50
        check(base, states(), slot, "item swap")
        seq[0, slot] = item
    # A shorter text for the last item (another length, so other positions after it) changes nothing before it.
    last = int(seq[0, -1])
    model.item_token_len[last] -= 1
    check(base, states(), n_slots - 1, "text length")


@pytest.mark.parametrize("context_masking", [True, False], ids=["context", "causal"])
@pytest.mark.parametrize("llm_path", BACKBONES)
def test_context_mask_reaches_the_backbone(tmp_path, text_data, llm_path, context_masking):
    # The layout tests check the mask tensor; this checks that the backbone obeys it (a backbone that
    # replaced a 4-D mask by its own causal one would pass the leakage test but lose the item-bidirectional part).
    _, model, *_ = build("DARec", text_data[1], settings_for(tmp_path, text_data, llm_path=llm_path,
                                                             context_masking=context_masking))
    model.eval()
    distinct_texts(model)
    seq, seq_len = torch.tensor([[3, 9]]), torch.tensor([2])
    packed = pack_sequences(seq, seq_len, model.item_token_ids, model.item_token_len, model.special)
    with torch.no_grad():
        embeds = model._embed(packed.input_ids)
        base = model(embeds, packed.block_ids)
        last_text = int(packed.boundary_positions[0, 0]) - 1  # last text token of item 1
        changed_embeds = embeds.clone()
        # A random direction: a constant shift (+1 everywhere) is erased by OPT's mean-centring LayerNorms.
        changed_embeds[0, last_text] += torch.randn(embeds.shape[-1], generator=torch.Generator().manual_seed(0))
        changed = model(changed_embeds, packed.block_ids)
    moved = (changed - base).abs().amax(-1)[0]
    # Item 1's earlier tokens (positions 1 .. last_text-1) see its last token only under context masking.
    assert (moved[1:last_text] > 1e-4).all() == context_masking, moved
    assert moved[0] == 0  # [CF_USER] sees only itself in both modes


@pytest.mark.parametrize("n_layers", [1, 2])
def test_context_masking_changes_item_boundary_states_only_from_two_layers(tmp_path, text_data, n_layers):
    # In one layer an [ITEM] state attends to input embeddings only, and the [ITEM] (last token of its block) sees
    # the same tokens under both masks: DARec and DARecbase coincide, which is why the masking ablation of the
    # benchmarks uses 2 layers. From the second layer on, it reads tokens that saw their whole item.
    boundary_states = {}
    for context_masking in (True, False):
        config = dict(llm_random_config={**TINY_LLM, "num_hidden_layers": n_layers}, context_masking=context_masking)
        _, model, *_ = build("DARec", text_data[1], settings_for(tmp_path, text_data, **config))
        model.eval()
        distinct_texts(model)
        with torch.no_grad():
            boundary_states[context_masking] = model.encode_sequences(torch.tensor([[3, 9, 12]]), torch.tensor([3]))
    same = torch.allclose(boundary_states[True], boundary_states[False], atol=1e-6)
    assert same == (n_layers == 1)


# --------------------------------------------------------------------------- (b) one epoch, both families


@pytest.mark.parametrize("llm_path", BACKBONES)
@pytest.mark.parametrize("model_name", ["DARec", "DARecbase"])
def test_one_epoch_on_tiny_fixture(isolated_run, tiny_dataset, model_name, llm_path):
    settings = darec_settings(isolated_run, tiny_dataset[0], llm_path=llm_path)
    result = run_darec(model=model_name, dataset=tiny_dataset[1], config_dict=settings)

    assert result["model"] == model_name
    for metrics in (result["best_valid_result"], result["test_result"]):
        assert_protocol_metrics(metrics)
        assert all(math.isfinite(value) for value in metrics.values())
    assert Path(result["saved_model_file"]).is_file()


def test_darecbase_is_darec_with_causal_mask(tmp_path, text_data):
    # DARecbase = DARec's settings (its yaml inherits DARec.yaml) with context_masking off.
    darec_config, *_ = build("DARec", text_data[1], settings_for(tmp_path, text_data))
    base_config, base_model, *_ = build("DARecbase", text_data[1], settings_for(tmp_path, text_data))
    assert darec_config["context_masking"] is True and base_config["context_masking"] is False
    assert base_model.context_masking is False
    for key in ("temperature", "lambda_align", "lambda_hard", "hard_negatives", "adapter_type", "use_item_id"):
        assert base_config[key] == darec_config[key], key


# ---------------------------------------------------- (c) gradients, frozen backbone, checkpoint round trip


def test_gradients_reach_only_trainable_parts(tmp_path, text_data):
    _, model, train_data, _, _ = build("DARec", text_data[1], settings_for(tmp_path, text_data, adapter_arch="sp"))
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
        _, model, *_ = build("DARec", text_data[1], settings_for(tmp_path, text_data))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert 0 < trainable < total
    assert f"DARec parameters: trainable {trainable:,} / total {total:,}" in caplog.text


def test_backbone_bit_identical_after_training_and_checkpoint_round_trip(tmp_path, text_data):
    config, model, train_data, valid_data, _ = build("DARec", text_data[1], settings_for(tmp_path, text_data,
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
    config, model, train_data, _, _ = build("DARec", text_data[1], settings_for(tmp_path, text_data,
                                                                                adapter_arch="s"))
    other_config, other, *_ = build("DARec", text_data[1], settings_for(tmp_path, text_data, adapter_arch="p"))
    with pytest.raises(RuntimeError, match="same settings"):
        other.load_state_dict(model.state_dict())


# --------------------------------------------------------------------------- (d) losses and hard negatives


def test_losses_present_finite_and_hard_negatives_valid(tmp_path, text_data):
    _, model, train_data, _, _ = build("DARec", text_data[1], settings_for(
        tmp_path, text_data, lambda_align=0.1, lambda_hard=0.1, hard_negatives=4))
    model.train()
    losses = model.calculate_loss(first_batch(train_data))
    # L_next, lambda_align * L_align, lambda_hard * L_hard.
    assert len(losses) == 3
    assert all(loss.ndim == 0 and torch.isfinite(loss) and loss > 0 for loss in losses), losses

    negatives = model.hard_negatives
    assert bool(model.hard_negatives_ready) and negatives.shape == (model.n_items, 4)
    sequences, lengths = train_data._dataset.training_sequences()
    together = defaultdict(set)
    for row, length in zip(sequences.tolist(), lengths.tolist()):
        items = set(row[:length])
        for item in items:
            together[item] |= items
    vectors = torch.nn.functional.normalize(model.item_cache.states.float(), dim=-1)
    for item in range(1, model.n_items):
        chosen = set(negatives[item].tolist())
        assert len(chosen) == 4, (item, chosen)  # distinct negatives
        assert item not in chosen and 0 not in chosen, (item, chosen)
        assert not chosen & together[item], (item, chosen & together[item])
        # ... and they are the nearest eligible items by text vector.
        eligible = [j for j in range(1, model.n_items) if j != item and j not in together[item]]
        sims = vectors[eligible] @ vectors[item]
        fourth_best = sims.topk(4).values[-1]
        chosen_sims = vectors[list(chosen)] @ vectors[item]
        assert (chosen_sims >= fourth_best - 1e-6).all(), item


def test_loss_weights_switch_terms_off(tmp_path, text_data):
    _, model, train_data, _, _ = build("DARec", text_data[1], settings_for(
        tmp_path, text_data, lambda_align=0.0, lambda_hard=0.0))
    model.train()
    assert len(model.calculate_loss(first_batch(train_data))) == 1
    assert not bool(model.hard_negatives_ready)  # no mining when L_hard is off


def test_mine_hard_negatives_by_hand():
    # 5 items (0 = padding) on a line; 1 and 2 co-occur. Item 1's nearest are 2 (co-occurs), 3, then 4.
    vectors = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.05], [1.0, 0.1], [1.0, 0.3]])
    sequences = torch.tensor([[1, 2], [3, 0], [4, 0]])
    cooc = cooccurrence_matrix(sequences, torch.tensor([2, 1, 1]), 5)
    negatives = mine_hard_negatives(vectors, cooc, 2)
    assert negatives[1].tolist() == [3, 4]
    assert negatives[3].tolist() == [2, 1]
    with pytest.raises(ValueError, match="hard_negatives"):
        mine_hard_negatives(vectors, cooc, 4)


def test_mine_hard_negatives_when_an_item_cooccurs_with_almost_all():
    # Item 1 co-occurs with every item but 5: fewer eligible items than negatives asked for. The fill-up
    # must never be the item itself or padding (it may fall back to co-occurring items, nearest first).
    vectors = torch.nn.functional.normalize(torch.randn(7, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    sequences = torch.tensor([[1, 2, 3, 4, 6]])
    cooc = cooccurrence_matrix(sequences, torch.tensor([5]), 7)
    negatives = mine_hard_negatives(vectors, cooc, 3)
    for item in range(1, 7):
        chosen = negatives[item].tolist()
        assert item not in chosen and 0 not in chosen, (item, chosen)
        assert len(set(chosen)) == 3, (item, chosen)
    assert negatives[1, 0] == 5  # the one eligible item comes first
    cooc_dense = cooc.toarray()
    assert sp.issparse(cooc) and cooc_dense[1, 6] > 0 and cooc_dense[1, 5] == 0


# ------------------------------------------------------------------------- (e) training rows: one per user and window


@pytest.mark.parametrize("max_len", [20, 4], ids=["whole", "truncated"])
def test_training_rows_without_valid_or_test_items(tmp_path, text_data, max_len):
    _, _, train_data, valid_data, test_data = build("DARec", text_data[1], settings_for(
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


# ------------------------------------------------------------------------- (f) items encoded once per eval


def test_items_encoded_once_per_evaluation(tmp_path, text_data):
    config, model, train_data, valid_data, _ = build("DARec", text_data[1], settings_for(
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
    config, model, train_data, valid_data, _ = build("DARec", text_data[1], settings_for(
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
    assert get_architecture(model.adapters) == [PARALLEL, PARALLEL]
    with torch.no_grad():
        expected = model.item_vectors(model.encode_all_items(), torch.arange(model.n_items))
    torch.testing.assert_close(model._all_item_vectors(), expected)


def test_training_item_cache_rolls_over_every_item_in_n_steps(tmp_path, text_data):
    _, model, train_data, _, _ = build("DARec", text_data[1], settings_for(tmp_path, text_data,
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
    _, model, train_data, _, _ = build("DARec", text_data[1], settings_for(tmp_path, text_data))
    first = model.encode_all_items()
    mean, std = model.state_mean.clone(), model.state_std.clone()
    assert torch.allclose(mean, first[1:].mean(0)) and bool(model.state_stats_ready)
    with torch.no_grad():
        for adapter in model.adapters.parameters():
            adapter.add_(0.5)  # the states change ...
    assert not torch.allclose(model.encode_all_items()[1:].mean(0), mean)
    assert torch.equal(model.state_mean, mean) and torch.equal(model.state_std, std)  # ... the statistics do not
    assert "state_mean" in model.state_dict() and "state_stats_ready" in model.state_dict()


# ------------------------------------------------------------------------- (g) no text, no .item file


def test_items_without_text_and_without_rows(tmp_path):
    text_data = write_text_dataset(tmp_path / "dataset", missing=(3, 4), empty=(7,))
    config, model, train_data, valid_data, test_data = build("DARec", text_data[1], settings_for(tmp_path,
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
    config, model, train_data, valid_data, test_data = build("DARec", text_data[1], settings_for(tmp_path,
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


# ------------------------------------------------------------------------------------------------ (h) LoRA


@pytest.mark.parametrize("llm_path", BACKBONES)
def test_lora_trains_one_epoch(tmp_path, text_data, llm_path):
    config, model, train_data, valid_data, test_data = build("DARec", text_data[1], settings_for(
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


# ------------------------------------------------------------------------------------- (i) reproducibility


def test_same_seed_same_metrics(isolated_run, tiny_dataset):
    settings = darec_settings(isolated_run, tiny_dataset[0], epochs=2)
    first = run_darec(model="DARec", dataset=tiny_dataset[1], config_dict=settings, saved=False)
    second = run_darec(model="DARec", dataset=tiny_dataset[1], config_dict=settings, saved=False)
    assert first["best_valid_result"] == second["best_valid_result"]
    assert first["test_result"] == second["test_result"]
    assert np.isfinite(list(first["test_result"].values())).all()


@pytest.mark.parametrize("llm_learning_rate", [3e-4, None])
def test_llm_side_weights_get_their_own_learning_rate(tmp_path, text_data, llm_learning_rate):
    config, model, _, _, _ = build("DARec", text_data[1], settings_for(
        tmp_path, text_data, learning_rate=2e-3, llm_learning_rate=llm_learning_rate))
    groups = trainer_for(config, model).optimizer.param_groups
    assert [group["lr"] for group in groups] == [2e-3, llm_learning_rate or 2e-3]
    llm_side = {id(p) for p in groups[1]["params"]}
    assert all(id(p) in llm_side for p in model.adapters.parameters())
    assert id(model.special_embeddings.weight) in llm_side and id(model.user_proj.weight) not in llm_side
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == llm_side | {id(p) for p in groups[0]["params"]}


def test_fresh_items_per_step_caps_the_items_encoded_with_gradient(tmp_path, text_data):
    _, model, train_data, _, _ = build("DARec", text_data[1], settings_for(tmp_path, text_data,
                                                                          fresh_items_per_step=3))
    fresh_calls = []
    original = model.encode_items

    def record(items):
        if torch.is_grad_enabled():  # the cache refresh encodes under no_grad
            fresh_calls.append(items.tolist())
        return original(items)

    model.encode_items = record
    model.train()
    batch = first_batch(train_data)
    losses = model.calculate_loss(batch)
    sum(losses).backward()
    assert len(fresh_calls) == 1 and len(fresh_calls[0]) == 3 and len(set(fresh_calls[0])) == 3
    targets = set(batch[model.ITEM_SEQ][batch[model.ITEM_SEQ] > 0].tolist())
    assert set(fresh_calls[0]) <= targets | set(batch[model.POS_ITEM_ID].tolist())
    assert all(torch.isfinite(loss) for loss in losses)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.adapters.parameters())
