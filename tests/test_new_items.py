"""New items: items without any training interaction are ranked by their text (item_id_dropout,
unseen_items_as_negatives), items added to the catalogue after training are recommended (DARec.add_items, the
recommend CLI), and the inductive benchmark's split and metrics.

Tiny random backbone, one torch thread.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from darec_testing import DAREC_TEST_FIXTURES, build, darec_settings, first_batch, trainer_for
from recbole.data.interaction import Interaction

from recbole_darec.recommend import Recommender, UnknownItemError

pytestmark = DAREC_TEST_FIXTURES
REPO = Path(__file__).resolve().parents[1]
N_WARM = 30  # items i0..i29 have training interactions; i30..i39 are only ever test targets


def write_cold_dataset(root: Path, name: str = "cold") -> tuple[str, str]:
    """Users walk forward through items 0..29 up to one of 20..29; each user's test target is the item that would
    come next, as a cold twin: item 30 + k has the text of item 20 + k and no training interaction, so only its
    text links it to the walk."""
    (root / name).mkdir(parents=True)
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    generator = torch.Generator().manual_seed(0)
    for user in range(60):
        start = int(torch.randint(13, 23, (1,), generator=generator))
        walk = [start + step for step in range(7)]
        cold = N_WARM + start + 7 - 20
        for step, item in enumerate([*walk, cold]):
            lines.append(f"u{user}\ti{item}\t{step}")
    (root / name / f"{name}.inter").write_text("\n".join(lines) + "\n")
    texts = ["item_id:token\tn:token_seq"]
    texts += [f"i{i}\t{i}z{i % 3}" for i in range(N_WARM)]
    texts += [f"i{i}\t{i - N_WARM + 20}z{(i - N_WARM + 20) % 3}" for i in range(N_WARM, N_WARM + 10)]
    (root / name / f"{name}.item").write_text("\n".join(texts) + "\n")
    return str(root), name


def settings(tmp_path: Path, data_path: str, **overrides) -> dict:
    # topk 10 only: the cold dataset has 40 items
    return darec_settings(tmp_path, data_path, **{"sequence_layers": 1, "whiten_dim": 16, "dropout_prob": 0.0,
                                                  "topk": [10], **overrides})


def cold_items(model, train_data) -> list[int]:
    tokens = train_data._dataset.field2id_token[train_data._dataset.iid_field]
    return [i for i in range(1, model.n_items) if int(tokens[i][1:]) >= N_WARM]


@pytest.mark.parametrize("as_negatives", [True, False])
def test_unseen_items_leave_the_training_softmax(tmp_path, as_negatives):
    """Without unseen_items_as_negatives, an item that no training interaction holds is no candidate of the training
    softmax and no hard negative: its text does not move the loss."""
    data_path, name = write_cold_dataset(tmp_path / "dataset")
    config, model, train_data, _, _ = build("DARec", name, settings(
        tmp_path, data_path, unseen_items_as_negatives=as_negatives, lambda_align=0.0, lambda_hard=0.1))
    cold = cold_items(model, train_data)
    assert len(cold) == 10 and not model.item_id_known[cold].any()
    batch = first_batch(train_data)
    model.train()
    loss = sum(model.calculate_loss(batch)).item()
    negatives = set(model.hard_negatives.flatten().tolist())
    assert bool(negatives & set(cold)) == as_negatives  # text-near cold items are mined only as negatives
    model.item_text_features[cold] += 5.0 * torch.randn(len(cold), model.item_text_features.shape[1])
    moved = sum(model.calculate_loss(batch)).item()
    assert (moved != pytest.approx(loss, abs=1e-6)) == as_negatives


def test_item_id_dropout_leaves_out_ids_in_training_steps_only(tmp_path, text_data):
    config, model, train_data, _, _ = build("DARec", text_data[1], settings(tmp_path, text_data[0],
                                                                         item_id_dropout=0.5))
    known = model.item_id_known.clone()
    model.train()
    model.calculate_loss(first_batch(train_data))
    ids = torch.arange(model.n_items)
    in_step = model.item_id_vectors(ids).norm(dim=-1) > 0
    assert not in_step[~known].any()
    share = float(in_step[known].float().mean())
    assert 0.3 < share < 0.7, share  # about half of the known items keep their ID vector in this step
    torch.testing.assert_close(model.item_id_vectors()[ids], model.item_id_vectors(ids))  # one draw for both
    model.eval()
    assert torch.equal(model.item_id_vectors(ids).norm(dim=-1) > 0, known)  # evaluation: every known ID


def test_new_item_bias_lifts_exactly_the_items_without_training_interactions(tmp_path):
    """new_item_bias adds its logit to the scores of the items without a training interaction in full_sort_predict
    and predict; every other item (padding included) keeps its score, and training does not see it."""
    data_path, name = write_cold_dataset(tmp_path / "dataset")
    config, model, train_data, _, _ = build("DARec", name, settings(tmp_path, data_path, new_item_bias=1.5,
                                                                   lambda_align=0.0, lambda_hard=0.0))
    # the cold twins, and any item whose interactions are all valid or test targets
    new = ~model.item_id_known
    new[0] = False
    assert new[cold_items(model, train_data)].all()
    batch = first_batch(train_data)
    model.eval()
    candidates = torch.tensor([cold_items(model, train_data)[0], 5])
    interaction = Interaction({model.ITEM_SEQ: torch.tensor([[3, 4, 5], [7, 8, 0]]),
                               model.ITEM_SEQ_LEN: torch.tensor([3, 2]), model.ITEM_ID: candidates})
    with torch.no_grad():
        (loss,) = model.calculate_loss(batch)
        lifted, lifted_each = model.full_sort_predict(interaction), model.predict(interaction)
        model.new_item_bias = 0.0
        (plain_loss,) = model.calculate_loss(batch)
        plain, plain_each = model.full_sort_predict(interaction), model.predict(interaction)
    torch.testing.assert_close(lifted - plain, 1.5 * new.float().expand_as(plain), rtol=0, atol=1e-5)
    torch.testing.assert_close(lifted_each - plain_each, torch.tensor([1.5, 0.0]), rtol=0, atol=1e-5)
    assert float(loss) == float(plain_loss)


def test_new_item_prior_weight_weighs_the_prior_on_exactly_the_new_items(tmp_path):
    """new_item_prior_weight puts its own weight on the text prior of the items without a training interaction, in
    full_sort_predict and predict; the other items keep text_prior_weight's, and equal weights score as one."""
    data_path, name = write_cold_dataset(tmp_path / "dataset")
    _, model, _, _, _ = build("DARec", name, settings(tmp_path, data_path))
    new = ~model.item_id_known
    new[0] = False  # padding
    model.eval()
    candidates = torch.tensor([int(new.nonzero()[0]), int(model.item_id_known[1:].nonzero()[0]) + 1])
    interaction = Interaction({model.ITEM_SEQ: torch.tensor([[3, 4, 5], [7, 8, 0]]),
                               model.ITEM_SEQ_LEN: torch.tensor([3, 2]), model.ITEM_ID: candidates})

    def scores(weight: float, new_weight: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        model.text_prior_weight, model.new_item_prior_weight = weight, new_weight
        with torch.no_grad():
            return model.full_sort_predict(interaction), model.predict(interaction)

    plain, plain_each = scores(0.0, None)
    unit, unit_each = (with_prior - without for with_prior, without in zip(scores(1.0, None), (plain, plain_each)))
    assert unit[:, new].abs().min() > 0  # the prior reaches the new items
    mixed, mixed_each = scores(0.5, 2.0)
    item_weights = torch.where(new, 2.0, 0.5)
    torch.testing.assert_close(mixed - plain, unit * item_weights, rtol=0, atol=1e-4)
    torch.testing.assert_close(mixed_each - plain_each, unit_each * item_weights[candidates], rtol=0, atol=1e-4)
    only_new, _ = scores(0.0, 2.0)
    assert torch.equal(only_new[:, ~new], plain[:, ~new]) and not torch.equal(only_new[:, new], plain[:, new])


def test_new_items_borrow_the_id_vectors_of_their_text_neighbours(tmp_path):
    """With new_item_id_neighbours, in evaluation each item without a training interaction takes the ID vectors of
    its nearest items by text, softmax-weighted: a text twin lends its own vector, so the new item scores as its
    twin does. Items with a training interaction keep theirs, and training steps see no borrowed vector."""
    data_path, name = write_cold_dataset(tmp_path / "dataset")
    _, model, train_data, _, _ = build("DARec", name, settings(tmp_path, data_path, new_item_id_neighbours=3))
    tokens = train_data._dataset.field2id_token[train_data._dataset.iid_field]
    token2id = {token: i for i, token in enumerate(tokens)}
    pairs = [(token2id[f"i{N_WARM + k}"], token2id[f"i{20 + k}"]) for k in range(10)
             if f"i{N_WARM + k}" in token2id and f"i{20 + k}" in token2id]  # i30.. have the texts of i20..
    twins, originals = torch.tensor(pairs).T
    assert not model.item_id_known[twins].any()
    twins, originals = twins[model.item_id_known[originals]], originals[model.item_id_known[originals]]
    assert len(twins) >= 5  # twins of items with a training interaction
    own = model.item_id_embedding.weight.detach().clone()
    model.eval()
    with torch.no_grad():
        borrowed = model.item_id_vectors()
        torch.testing.assert_close(borrowed[twins], own[originals], rtol=0, atol=1e-4)
        known = model.item_id_known
        assert torch.equal(borrowed[known], own[known]) and not borrowed[0].any()
        interaction = Interaction({model.ITEM_SEQ: torch.tensor([[3, 4, 5], [7, 8, 0]]),
                                   model.ITEM_SEQ_LEN: torch.tensor([3, 2])})
        scores = model.full_sort_predict(interaction)  # histories of items with training interactions
        torch.testing.assert_close(scores[:, twins], scores[:, originals], rtol=0, atol=1e-3)
        model.new_item_id_neighbours = 0
        model.eval()  # drops the borrowed vectors
        plain = model.full_sort_predict(interaction)
    assert torch.equal(plain[:, known], scores[:, known])  # no other item's score moves
    assert not torch.allclose(plain[:, twins], scores[:, twins])
    model.new_item_id_neighbours = 3
    model.train()
    assert not model.item_id_vectors(twins).any()  # training knows no new item's vector


NEW_ITEM_TRAINING = {"unseen_items_as_negatives": False, "item_id_dropout": 0.3}


@pytest.mark.parametrize("extra", [{}, NEW_ITEM_TRAINING, {**NEW_ITEM_TRAINING, "id_residual": True},
                                   {**NEW_ITEM_TRAINING, "last_item_skip": True},
                                   {**NEW_ITEM_TRAINING, "last_item_skip": True, "history_text_skip": True},
                                   {**NEW_ITEM_TRAINING, "last_item_skip": True, "text_prior_weight": 0.5,
                                    "text_prior_in_training": True}, {"new_item_id_neighbours": 5}],
                         ids=["default", "new-item-training", "id-residual", "last-item-skip", "history-text-skip",
                              "text-prior", "borrowed-id"])
def test_cold_targets_found_through_their_text(tmp_path, extra):
    """Trained on the walks, the model ranks each user's cold target (the next item's text twin, never in training)
    far above chance (Recall@10 of a random ranking of 40 items: 0.25)."""
    data_path, name = write_cold_dataset(tmp_path / "dataset")
    config, model, train_data, valid_data, test_data = build("DARec", name, settings(
        tmp_path, data_path, epochs=20, learning_rate=0.005, llm_learning_rate=0.001, eval_step=100, **extra))
    trainer = trainer_for(config, model)
    trainer.fit(train_data, valid_data, saved=False)
    result = trainer.evaluate(test_data, load_best_model=False)
    assert result["recall@10"] > 0.6, result


# ----- items added after training -------------------------------------------------------------------------------
@pytest.fixture
def trained_item_level(tmp_path, text_data) -> str:
    config, model, train_data, valid_data, _ = build("DARec", text_data[1], settings(
        tmp_path, text_data[0], epochs=5, learning_rate=0.005, item_id_dropout=0.3, eval_step=100))
    trainer = trainer_for(config, model)
    trainer.fit(train_data, valid_data, saved=True)
    return trainer.saved_model_file


def all_scores(recommender: Recommender, history: list[str]) -> dict[str, float]:
    rows = recommender.recommend(history, topk=len(recommender.id2token))
    return {token: score for token, _, score in rows}


def test_recommends_items_added_to_the_catalogue_after_training(trained_item_level, text_data, tmp_path):
    data_path, name = text_data
    history = ["i003", "i004", "i005"]
    before = all_scores(Recommender(trained_item_level), history)
    item_file = Path(data_path) / name / f"{name}.item"
    sentences = dict(line.split("\t") for line in item_file.read_text().splitlines()[1:])
    # A new item whose text is i006's, and one with a text of its own.
    with item_file.open("a") as handle:
        handle.write(f"new-twin\t{sentences['i006']}\nnew-other\tzz9\n")

    recommender = Recommender(trained_item_level)
    after = all_scores(recommender, history)
    assert set(after) == set(before) | {"new-twin", "new-other"}
    for token, score in before.items():  # no other item's score changes
        assert after[token] == pytest.approx(score, rel=1e-5, abs=1e-5), token
    spread = max(before.values()) - min(before.values())
    assert abs(after["new-twin"] - after["i006"]) < 0.1 * spread  # its text twin's score, without an ID vector
    # A new item in the history is read through its text, and the ranking stays finite.
    assert all(torch.isfinite(torch.tensor(list(all_scores(recommender, [*history, "new-other"]).values()))))

    cli = [sys.executable, "-m", "recbole_darec.recommend", f"--checkpoint={trained_item_level}",
           "--history=i003,i004,new-twin", "--topk=70"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(cli, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    listed = {line.split()[1] for line in done.stdout.strip().splitlines()[1:]}
    assert "new-other" in listed and "new-twin" in listed


def test_models_without_item_text_refuse_new_items_in_a_history(tmp_path, text_data):
    data_path, name = text_data
    config, model, train_data, valid_data, _ = build("SASRec", name, {
        **settings(tmp_path, data_path), "hidden_size": 16, "inner_size": 32, "n_layers": 1, "n_heads": 1})
    trainer = trainer_for(config, model)
    trainer.fit(train_data, valid_data, saved=True)
    item_file = Path(data_path) / name / f"{name}.item"
    with item_file.open("a") as handle:
        handle.write("new-other\tzz9\n")
    recommender = Recommender(trainer.saved_model_file)
    assert "new-other" not in {token for token, *_ in recommender.recommend(["i003"], topk=100)}
    with pytest.raises(UnknownItemError, match="new-other.*after SASRec was trained, and SASRec cannot read"):
        recommender.recommend(["i003", "new-other"])


# ----- the inductive benchmark ----------------------------------------------------------------------------------
def test_held_out_items_lose_their_training_interactions_only(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from new_items import hold_out_items

    data_path, name = write_cold_dataset(tmp_path / "dataset")
    source = Path(data_path) / name
    held = hold_out_items(source, tmp_path / "split" / name, 0.25, seed=3)
    assert held == hold_out_items(source, tmp_path / "again" / name, 0.25, seed=3)  # fixed by the seed
    assert held != hold_out_items(source, tmp_path / "other" / name, 0.25, seed=4)

    def by_user(folder: Path) -> dict[str, list[str]]:
        users: dict[str, list[str]] = {}
        for line in (folder / f"{name}.inter").read_text().splitlines()[1:]:
            user, item, _ = line.split("\t")
            users.setdefault(user, []).append(item)
        return users

    before, after = by_user(source), by_user(tmp_path / "split" / name)
    assert len(held) == round(0.25 * len({item for items in before.values() for item in items}))
    for user, items in before.items():
        assert after[user][-2:] == items[-2:]  # valid and test targets stay
        assert after[user][:-2] == [item for item in items[:-2] if item not in held]
    assert (tmp_path / "split" / name / f"{name}.item").read_text() == (source / f"{name}.item").read_text()


def test_test_like_validation_ends_histories_in_the_held_out_item_the_split_took_off(tmp_path, monkeypatch):
    """The test-like validation puts back, at the end of a validation history, the user's last training-part item
    where the split removed it (a held-out item), and changes nothing else; the sweep over it scores as DARec
    scores with new_item_prior_weight and new_item_bias set."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from new_items import evaluate, hold_out_items, last_training_items_held_out, sweep_row, test_like

    data_path, name = write_cold_dataset(tmp_path / "dataset")
    source = Path(data_path) / name
    held = hold_out_items(source, tmp_path / "split" / name, 0.25, seed=3)
    appended = last_training_items_held_out(source, held)
    lines = [line.split("\t") for line in (source / f"{name}.inter").read_text().splitlines()[1:]]
    sequences: dict[str, list[str]] = {}
    for user, item, _ in lines:  # the file lists each user's items in time order
        sequences.setdefault(user, []).append(item)
    assert appended == {user: items[-3] for user, items in sequences.items() if items[-3] in held}
    assert 0 < len(appended) < len(sequences)

    _, model, _, valid_data, test_data = build("DARec", name, settings(tmp_path, str(tmp_path / "split")))
    dataset = valid_data._dataset
    user_ids, item_ids = dataset.field2token_id[dataset.uid_field], dataset.field2token_id[dataset.iid_field]
    internal = {user_ids[user]: item_ids[item] for user, item in appended.items()}
    fields = (dataset.uid_field, model.ITEM_SEQ, model.ITEM_SEQ_LEN)
    seen_users = 0
    for (plain, *plain_rest), (like, *like_rest) in zip(valid_data, test_like(valid_data, internal, fields)):
        assert all(torch.equal(a, b) for a, b in zip(plain_rest[1:], like_rest[1:]))  # the same targets
        for row, user in enumerate(plain[dataset.uid_field].tolist()):
            n = int(plain[model.ITEM_SEQ_LEN][row])
            history = plain[model.ITEM_SEQ][row, :n].tolist() + ([internal[user]] if user in internal else [])
            assert like[model.ITEM_SEQ][row, : len(history)].tolist() == history
            assert int(like[model.ITEM_SEQ_LEN][row]) == len(history)
            seen_users += 1
    assert seen_users == len(sequences)

    new = ~model.item_id_known
    new[0] = False
    assert new.any()
    model.eval()
    saved = type("Saved", (), {"model": model, "id2token": list(dataset.field2id_token[dataset.iid_field])})
    held_ids = new.nonzero().flatten()
    points = [(0.5, 3.0, 1.0, 0), (0.5, 3.0, 1.0, 2)]
    own_neighbours = model.new_item_id_neighbours
    entry = sweep_row(tmp_path / "DARec-seed1.json", saved, valid_data, test_data, held_ids, points, {}, appended)
    assert model.new_item_id_neighbours == own_neighbours  # the model's own settings are back
    for point, (weight, new_weight, bias, neighbours) in zip(entry["points"], points, strict=True):
        assert set(point) == {"weight", "new_weight", "bias", "neighbours", "valid", "test", "valid_test_like"}
        model.text_prior_weight, model.new_item_prior_weight, model.new_item_bias = weight, new_weight, bias
        model.new_item_id_neighbours = neighbours
        model.eval()
        for split, data in (("test", test_data), ("valid_test_like", test_like(valid_data, internal, fields))):
            direct = evaluate("direct", 1, model.full_sort_predict, data, len(saved.id2token), held_ids)
            for part in ("held_out", "all"):
                assert point[split][part] == pytest.approx(direct[part], abs=1e-4), (split, part, neighbours)


def test_test_like_appends_to_short_and_full_histories(monkeypatch):
    """A full history drops its oldest item for the appended one; a short one grows by one, padding after it."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from new_items import test_like

    batch = Interaction({"user_id": torch.tensor([1, 2, 3]), "seq": torch.tensor([[4, 5, 6], [7, 0, 0], [8, 9, 0]]),
                         "len": torch.tensor([3, 1, 2])})
    targets = (None, torch.arange(3), torch.tensor([10, 11, 12]))
    ((like, *rest),) = test_like([(batch, *targets)], {1: 20, 2: 21}, ("user_id", "seq", "len"))
    assert like["seq"].tolist() == [[5, 6, 20], [7, 21, 0], [8, 9, 0]]
    assert like["len"].tolist() == [3, 2, 2]
    assert rest[0] is None and torch.equal(rest[2], targets[2])
    assert batch["seq"].tolist() == [[4, 5, 6], [7, 0, 0], [8, 9, 0]]  # the loader's batch is left as it was


def test_selection_keeps_all_user_accuracy_within_two_percent(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from new_items import select_points

    def point(ndcg: float, held_recall: float) -> dict:
        return {"valid_test_like": {"all": {"ndcg@10": ndcg}, "held_out": {"recall@10": held_recall}},
                "valid": {"all": {"ndcg@10": 1.0}, "held_out": {"recall@10": 1.0}}}  # not the split selected on

    points = [point(0.100, 0.10), point(0.0985, 0.20), point(0.0975, 0.40)]
    best, reach = select_points(points)
    assert best is points[0] and reach is points[1]  # 0.0975 is more than 2% below 0.100


def test_benchmark_ranks_match_recboles_evaluator(tmp_path, text_data, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from new_items import metrics, target_ranks

    config, model, train_data, valid_data, test_data = build("DARec", text_data[1], settings(
        tmp_path, text_data[0], epochs=3, eval_step=100))
    trainer = trainer_for(config, model)
    trainer.fit(train_data, valid_data, saved=False)
    expected = trainer.evaluate(test_data, load_best_model=False)
    model.eval()
    ranks, _ = target_ranks(model.full_sort_predict, test_data, model.n_items)
    ours = metrics(ranks)
    assert ours["ndcg@10"] == pytest.approx(expected["ndcg@10"], abs=1e-4)
    assert ours["recall@10"] == pytest.approx(expected["recall@10"], abs=1e-4)


def test_prior_sweep_scores_a_checkpoint_with_the_text_prior_added(trained_item_level, tmp_path, monkeypatch):
    """The weight the checkpoint was trained with gives its own ranking (RecBole's test metrics), another weight
    changes it; the figures are kept beside the row and read back while the row is unchanged. A row
    that evaluate_rows scores is swept in the same pass, its checkpoint loaded once."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from new_items import evaluate_rows, prior_sweep, sweep_report

    from recbole_darec.data import load_data

    saved = Recommender(trained_item_level)
    config, model = saved.config, saved.model
    _, _, _, test_data = load_data(config)
    expected = trainer_for(config, model).evaluate(test_data, load_best_model=False)
    rows = tmp_path / "out" / "rows"
    rows.mkdir(parents=True)
    (rows / "DARec-seed7.json").write_text(json.dumps({"saved_model_file": trained_item_level}))
    recbole_test = {"ndcg@10": expected["ndcg@10"], "recall@10": expected["recall@10"]}
    (rows / "DARec-seed7.new_items.json").write_text(json.dumps({"recbole_test": recbole_test}))

    trained = float(config["text_prior_weight"])
    weights = [trained, trained + 2.0]
    second_copy = str(shutil.copy(trained_item_level, tmp_path / "second.pth"))
    (entry,) = prior_sweep(tmp_path / "out", ["i003", "i030"], weights, (0.0, 50.0))
    assert entry["trained_weight"] == trained
    assert [(p["weight"], p["bias"]) for p in entry["points"]] == [(w, b) for w in weights for b in (0.0, 50.0)]
    unchanged, lifted, with_prior, _ = (point["test"]["all"] for point in entry["points"])
    assert unchanged["ndcg@10"] == pytest.approx(expected["ndcg@10"], abs=1e-4)
    assert with_prior["ndcg@10"] != pytest.approx(unchanged["ndcg@10"], abs=1e-4)
    assert saved.model.item_id_known[1:].all() and lifted == unchanged  # every item has a training interaction:
    # the bias lifts none (that it lifts exactly the others: test_new_item_bias_lifts_exactly_the_items_...)
    assert entry["points"][0]["test"]["held_out"]["users"] + entry["points"][0]["test"]["seen"]["users"] == \
        unchanged["users"]
    Path(trained_item_level).unlink()  # the kept figures serve without the checkpoint
    assert prior_sweep(tmp_path / "out", ["i003", "i030"], weights, (0.0, 50.0)) == [entry]
    assert "| DARec | 7 |" in sweep_report([entry])

    again = tmp_path / "again" / "rows"
    again.mkdir(parents=True)
    (again / "DARec-seed7.json").write_text(json.dumps({"saved_model_file": second_copy,
                                                        "test_result": recbole_test}))
    (scored,) = [e for e in evaluate_rows(again.parent, ["i003", "i030"], weights, (0.0, 50.0))
                 if e["seed"] == 7]
    assert scored["all"]["ndcg@10"] == pytest.approx(expected["ndcg@10"], abs=1e-4)
    Path(second_copy).unlink()  # swept while evaluate_rows had it loaded: prior_sweep reads the kept figures
    (kept,) = prior_sweep(again.parent, ["i003", "i030"], weights, (0.0, 50.0))
    assert kept["points"] == entry["points"]
    # run again (the sweep's file now beside the row): the kept figures, not the sweep file taken for a row
    assert [e for e in evaluate_rows(again.parent, ["i003", "i030"]) if e["seed"] == 7] == [scored]
