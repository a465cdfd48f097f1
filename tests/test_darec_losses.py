"""DARec's losses: every term present and finite, the loss weights switch terms off, hard negatives mined by hand,
the fresh-item cap of the token-level L_next.

Every model here is a tiny random backbone (darec_testing.TINY_LLM): the tests check behaviour, not quality.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import scipy.sparse as sp
import torch
from darec_testing import DAREC_TEST_FIXTURES, build, first_batch, settings_for

from recbole_darec.model.losses import cooccurrence_matrix, hard_negative_loss, mine_hard_negatives

pytestmark = DAREC_TEST_FIXTURES


# --------------------------------------------------------------------------- losses and hard negatives


def test_losses_present_finite_and_hard_negatives_valid(tmp_path, text_data):
    _, model, train_data, _, _ = build("DARecTokens", text_data[1], settings_for(
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


@pytest.mark.parametrize("model_name, layout", [("DARecTokens", {}), ("DARec", {"sequence_layers": 1})])
def test_hard_text_only_scores_the_look_alikes_without_their_id_vectors(tmp_path, text_data, model_name, layout):
    """With hard_text_only, L_hard does not move when the ID embeddings do (and has no gradient into them); without
    it, it does: the ID vectors are part of the candidates it scores."""

    def hard_losses(text_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        _, model, train_data, _, _ = build(model_name, text_data[1], settings_for(
            tmp_path / f"{model_name}-{text_only}", text_data, lambda_align=0.0, lambda_hard=1.0, hard_negatives=4,
            dropout_prob=0.0, hard_text_only=text_only, **layout))
        model.train()
        batch = first_batch(train_data)
        _, hard = model.calculate_loss(batch)
        model.zero_grad()
        hard.backward()
        id_grad = model.item_id_embedding.weight.grad
        with torch.no_grad():
            model.item_id_embedding.weight.mul_(3.0).add_(0.5)
            _, moved = model.calculate_loss(batch)
        return hard.detach() - moved, id_grad

    shift, id_grad = hard_losses(text_only=True)
    assert abs(float(shift)) < 1e-5 and (id_grad is None or not id_grad.abs().any())
    shift, id_grad = hard_losses(text_only=False)
    assert abs(float(shift)) > 1e-3 and id_grad.abs().any()


def test_loss_weights_switch_terms_off(tmp_path, text_data):
    _, model, train_data, _, _ = build("DARecTokens", text_data[1], settings_for(
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


# ------------------------------------------------------------------------- fresh items per step


def test_fresh_items_per_step_caps_the_items_encoded_with_gradient(tmp_path, text_data):
    _, model, train_data, _, _ = build("DARecTokens", text_data[1], settings_for(tmp_path, text_data,
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


def test_hard_negative_loss_gradient_is_the_same_on_every_run_with_two_threads():
    # Many targets share one item row: the gather's backward sums into that row from several threads, and a
    # thread-dependent summation order made two runs with one seed drift apart (the DARec rows ran at 2 threads).
    generator = torch.Generator().manual_seed(0)
    users = torch.randn(512, 256, generator=generator)
    item_vecs = torch.randn(300, 256, generator=generator)
    targets = torch.randint(1, 300, (512,), generator=generator)
    negative_ids = torch.randint(1, 300, (512, 10), generator=generator)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = []
        for _ in range(8):
            table = item_vecs.clone().requires_grad_(True)
            hard_negative_loss(users, table, targets, negative_ids, 0.1).backward()
            grads.append(table.grad)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], grad) for grad in grads[1:])
    # ... and it is the InfoNCE it says: the target in column 0 of its candidates.
    candidates = torch.nn.functional.normalize(item_vecs[torch.cat([targets[:, None], negative_ids], 1)], dim=-1)
    logits = torch.einsum("pd,pkd->pk", torch.nn.functional.normalize(users, dim=-1), candidates) / 0.1
    expected = torch.nn.functional.cross_entropy(logits, torch.zeros(512, dtype=torch.long))
    torch.testing.assert_close(hard_negative_loss(users, item_vecs, targets, negative_ids, 0.1), expected)


def test_scores_and_folded_standardisation_match_the_direct_formulas(tmp_path, text_data):
    """``score`` scales the product's columns by the items' norms instead of normalising every candidate, and
    ``state_item_vectors`` folds the state standardisation into item_proj: the same values and gradients as the
    direct formulas (float32, tolerance 1e-5); a zero candidate vector scores 0."""
    _, model, train_data, _, _ = build("DARecTokens", text_data[1], settings_for(tmp_path, text_data))
    model.train()
    model.calculate_loss(first_batch(train_data))  # fixes the state statistics (the first full item encoding)
    with torch.no_grad():
        model.state_mean.normal_()
        model.state_std.uniform_(0.5, 2.0)
    torch.manual_seed(0)
    states = torch.randn(7, model.state_mean.shape[0])
    model.use_item_id = False
    users = torch.randn(5, model.user_proj.out_features, requires_grad=True)
    weights = torch.randn(5, 7)
    params = [users, model.item_proj.weight, model.item_proj.bias]

    def direct() -> torch.Tensor:
        items = model.item_proj(model._standardised(states))
        return torch.nn.functional.normalize(users, dim=-1) @ torch.nn.functional.normalize(items, dim=-1).T \
            / model.temperature

    expected = direct()
    expected_grads = torch.autograd.grad((expected * weights).sum(), params)
    got = model.score(users, model.item_vectors(states))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for grad, expected_grad in zip(torch.autograd.grad((got * weights).sum(), params), expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-5)
    # A zero candidate scores 0, as F.normalize makes it, not NaN.
    items = torch.randn(3, users.shape[1])
    items[1] = 0
    expected = torch.nn.functional.normalize(users, dim=-1) @ torch.nn.functional.normalize(items, dim=-1).T
    torch.testing.assert_close(model.score(users, items), expected / model.temperature, rtol=1e-5, atol=1e-5)
