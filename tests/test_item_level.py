"""DARec's default layout: the lower layers encode each item once, the top layers read
the history one vector per item. Leakage, target alignment, learning on a planted pattern, text use, caching."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from darec_testing import BACKBONES, TINY_LLM, build, darec_settings, trainer_for, write_text_dataset
from recbole.data.interaction import Interaction

from recbole_darec.compat import load_trusted_checkpoint
from recbole_darec.model import darec as darec_module
from recbole_darec.model.attention import CPU_PRODUCT_ATTENTION_BELOW
from recbole_darec.model.backbone import sublayer_modules
from recbole_darec.model.item_states import encode_item_text, pca_whitening
from recbole_darec.model.layout import pack_rows
from recbole_darec.recommend import Recommender

pytestmark = pytest.mark.usefixtures("one_thread")


def item_settings(tmp_path: Path, data_path: str, **overrides) -> dict:
    settings = {"sequence_layers": 1, "whiten_dim": 16, "dropout_prob": 0.0, **overrides}
    return darec_settings(tmp_path, data_path, **settings)


CF_INPUTS = {"no-cf": {}, "cf=BPR": {"cf_model": "BPR"},
             "cf=BPR-position": {"cf_model": "BPR", "cf_as_position": True},
             "cf=BPR+user": {"cf_model": "BPR", "cf_user_vector": True},
             "cf=BPR,no-id": {"cf_model": "BPR", "use_item_id": False}}


@pytest.mark.parametrize("item_positions", [1, 3])
@pytest.mark.parametrize("cf", list(CF_INPUTS))
@pytest.mark.parametrize("llm_path", BACKBONES)
def test_no_future_leakage(tmp_path, text_data, llm_path, cf, item_positions):
    _, model, _, _, _ = build("DARec", text_data[1], item_settings(tmp_path, text_data[0], llm_path=llm_path,
                                                                   item_positions=item_positions, **CF_INPUTS[cf]))
    model.eval()
    if model.cf_injection is not None:  # zero at init: make the CF inputs count
        torch.nn.init.normal_(model.cf_injection.item_projection[-1].weight)
    seq = torch.tensor([[3, 9, 14, 27, 40], [5, 6, 7, 0, 0]])
    seq_len = torch.tensor([5, 3])
    users = torch.tensor([1, 2])
    with torch.no_grad():
        base = model.encode_histories(seq, seq_len, users)
    for slot in range(1, seq.shape[1]):
        changed_seq = seq.clone()
        changed_seq[0, slot] = 50
        with torch.no_grad():
            changed = model.encode_histories(changed_seq, seq_len, users)
        torch.testing.assert_close(changed[0, :slot], base[0, :slot], rtol=0, atol=1e-5,
                                   msg=lambda m, slot=slot: f"item {slot + 1} leaked into earlier states: {m}")
        assert (changed[0, slot] - base[0, slot]).abs().max() > 1e-4  # the perturbation reached its own slot
        torch.testing.assert_close(changed[1, :3], base[1, :3], rtol=0, atol=1e-5)


@pytest.mark.parametrize("item_positions", [1, 2])
def test_packed_rows_give_the_states_of_each_history_alone(tmp_path, text_data, monkeypatch, item_positions):
    """Histories packed several to a row (rows of 8 positions per item here, so some rows hold three histories and
    the longest history one row of its own): the states of every real slot equal those of each history alone."""
    _, model, _, _, _ = build("DARec", text_data[1], item_settings(tmp_path, text_data[0],
                                                                   item_positions=item_positions))
    model.eval()
    monkeypatch.setattr(darec_module, "PACKED_ROW_TOKENS", 8 * item_positions)
    generator = torch.Generator().manual_seed(0)
    seq_len = torch.tensor([1, 7, 2, 2, 5, 1, 3, 7, 4])
    seq = torch.randint(1, model.n_items, (len(seq_len), 7), generator=generator)
    seq[torch.arange(7)[None, :] >= seq_len[:, None]] = 0
    rows = pack_rows(1 + seq_len * item_positions, 1 + 7 * item_positions, 8 * item_positions)
    assert rows.segment_ids.shape[0] < len(seq_len)  # histories do share rows
    with torch.no_grad():
        packed = model.encode_histories(seq, seq_len)
        alone = [model.encode_histories(seq[b: b + 1, : seq_len[b]], seq_len[b: b + 1])[0]
                 for b in range(len(seq_len))]
    for b, states in enumerate(alone):
        torch.testing.assert_close(packed[b, : seq_len[b]], states, rtol=1e-5, atol=1e-5)


def test_only_the_items_a_history_holds_are_read(tmp_path, text_data):
    """Slots past a history's length change no state, and the ID map reads one row per held item (padding is most
    of a real batch's slots)."""
    _, model, _, _, _ = build("DARec", text_data[1], item_settings(tmp_path, text_data[0], cf_model="BPR"))
    model.eval()
    seq_len = torch.tensor([5, 3, 1])
    seq = torch.tensor([[3, 9, 14, 27, 40], [5, 6, 7, 0, 0], [8, 0, 0, 0, 0]])
    users = torch.tensor([1, 2, 3])
    id_rows = []
    model.id_to_hidden.register_forward_pre_hook(lambda _module, args: id_rows.append(args[0].shape[0]))
    with torch.no_grad():
        base = model.encode_histories(seq, seq_len, users)
        garbage = seq.clone()
        garbage[torch.arange(5)[None, :] >= seq_len[:, None]] = 11
        changed = model.encode_histories(garbage, seq_len, users)
    for b, length in enumerate(seq_len.tolist()):
        torch.testing.assert_close(changed[b, :length], base[b, :length], rtol=0, atol=1e-6)
    assert id_rows == [int(seq_len.sum())] * 2


@pytest.mark.parametrize("item_positions", [1, 3])
@pytest.mark.parametrize("adapter_arch", [None, "s", "p"], ids=["gate", "serial", "parallel"])
@pytest.mark.parametrize("llm_path", BACKBONES)
def test_scoring_states_computed_at_the_last_position_only_equal_the_full_pass(tmp_path, text_data, llm_path,
                                                                                adapter_arch, monkeypatch,
                                                                                item_positions):
    """Evaluation runs the top layer's query and output projections and its FFN at each history's last position
    only: the same states there as the full pass, with adapters (and the ID and CF paths) that are not zero, for
    both backbone families."""
    _, model, _, _, _ = build("DARec", text_data[1], item_settings(
        tmp_path, text_data[0], llm_path=llm_path, adapter_arch=adapter_arch, cf_model="BPR", sequence_layers=2,
        llm_random_config={**TINY_LLM, "num_hidden_layers": 3}, item_positions=item_positions))
    model.eval()
    with torch.no_grad():
        for param in [*model.adapters.parameters(), model.id_to_hidden.weight]:
            param.normal_(std=0.1)
    monkeypatch.setattr(darec_module, "PACKED_ROW_TOKENS", 8)  # several histories per row
    seq_len = torch.tensor([1, 7, 2, 2, 5, 1, 3])
    seq = torch.randint(1, model.n_items, (len(seq_len), 7), generator=torch.Generator().manual_seed(1))
    seq[torch.arange(7)[None, :] >= seq_len[:, None]] = 0
    users = torch.arange(1, len(seq_len) + 1)
    top = model.backbone.layers[-1]
    tokens_read = {"ffn": [], "query": [], "keys": []}  # tokens each module of the top layer reads, per call
    for name, module in (("ffn", sublayer_modules(top)[2]), ("query", top.self_attn.q_proj),
                         ("keys", top.self_attn.k_proj)):
        module.register_forward_pre_hook(
            lambda _module, args, name=name: tokens_read[name].append(args[0].numel() // args[0].shape[-1]))
    with torch.no_grad():
        full = model.encode_histories(seq, seq_len, users)[torch.arange(len(seq_len)), seq_len - 1]
        last = model.encode_histories(seq, seq_len, users, last_only=True)
    torch.testing.assert_close(last, full, rtol=1e-5, atol=1e-5)
    for name in ("ffn", "query"):  # one token per history, not every token of the rows
        assert tokens_read[name][1] == len(seq_len) < tokens_read[name][0], name
    assert tokens_read["keys"][1] == tokens_read["keys"][0]  # every position still gives its key


@pytest.mark.parametrize("llm_path", BACKBONES)
def test_an_items_positions_see_each_other_both_ways_in_the_history_layers(tmp_path, text_data, llm_path):
    """Context masking in the history layers: with K positions per item, the first part of an item reads its later
    parts (block-causal), so from the second history layer on, the user states differ from a causal reading; with
    one position per item the two masks are the same mask."""
    states = {}
    for item_positions in (1, 3):
        _, model, _, _, _ = build("DARec", text_data[1], item_settings(
            tmp_path, text_data[0], llm_path=llm_path, sequence_layers=2, item_positions=item_positions,
            llm_random_config={**TINY_LLM, "num_hidden_layers": 3}))
        model.eval()
        seq, seq_len = torch.tensor([[3, 9, 14, 27], [5, 6, 0, 0]]), torch.tensor([4, 2])
        for context_masking in (True, False):
            model.context_masking = context_masking
            with torch.no_grad():
                states[item_positions, context_masking] = model.encode_histories(seq, seq_len)
    torch.testing.assert_close(states[1, True], states[1, False], rtol=0, atol=0)
    assert (states[3, True] - states[3, False]).abs().max() > 1e-3


def test_history_positions_of_an_item_are_the_parts_of_its_text(tmp_path, text_data):
    """K positions per item are the lower layers' states of K contiguous parts of its tokens, whose mean over
    tokens is the whole item's state (the candidate side)."""
    _, model, _, _, _ = build("DARec", text_data[1], item_settings(tmp_path, text_data[0], item_positions=2))
    parts, lengths = model.item_text_states, model.item_token_len  # (n_items, 2, H), (n_items,)
    _, whole, _, _, _ = build("DARec", text_data[1], item_settings(tmp_path, text_data[0]))
    item = int(torch.nonzero(lengths >= 4)[0])
    n = int(lengths[item])
    first_part = (n + 1) // 2  # tokens t with 2t // n == 0
    expected = (parts[item, 0] * first_part + parts[item, 1] * (n - first_part)) / n
    torch.testing.assert_close(expected, whole.item_text_states[item, 0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(parts[item, 0], parts[item, 1])


@pytest.mark.parametrize("cf", ["cf=BPR", "cf=BPR-position", "cf=BPR+user", "cf=BPR,no-id"])
def test_cf_injection_acts_only_through_the_cf_vectors_of_its_inputs(tmp_path, text_data, cf):
    """The user states read the CF vectors of the history's items (and the user's own only with cf_user_vector):
    changing an item's CF vector changes the histories that hold it and no other."""
    _, model, _, _, _ = build("DARec", text_data[1], item_settings(tmp_path, text_data[0], item_positions=2,
                                                                   **CF_INPUTS[cf]))
    model.eval()
    torch.nn.init.normal_(model.cf_injection.item_projection[-1].weight)
    seq, seq_len, users = torch.tensor([[3, 9, 14], [5, 6, 0]]), torch.tensor([3, 2]), torch.tensor([1, 2])
    cf_model = model.cf_injection.cf_model
    with torch.no_grad():
        base = model.encode_histories(seq, seq_len, users)
        cf_model.item_embedding.weight[9] += 1.0  # an item of history 0 only
        changed = model.encode_histories(seq, seq_len, users)
        assert (changed[0, 1:] - base[0, 1:]).abs().max() > 1e-4
        torch.testing.assert_close(changed[0, :1], base[0, :1], rtol=0, atol=1e-6)  # before item 9
        torch.testing.assert_close(changed[1], base[1], rtol=0, atol=1e-6)
        cf_model.user_embedding.weight[2] += 1.0  # the user of history 1
        user_changed = model.encode_histories(seq, seq_len, users)
    assert torch.equal(user_changed[0], changed[0])
    assert bool((user_changed[1, :2] - changed[1, :2]).abs().max() > 1e-4) == (cf == "cf=BPR+user")


def test_pack_rows_places_every_token_once_and_unpacks_it_back():
    token_counts = torch.tensor([3, 1, 5, 2, 2, 4])
    rows = pack_rows(token_counts, 5, 6)
    assert rows.segment_ids.shape == (3, 6)  # 17 tokens in rows of 6: first fit, longest first, fills 3 rows
    history = torch.arange(6 * 5, dtype=torch.float)[None].reshape(6, 5, 1) + 1  # token (b, t) = 5b + t + 1
    packed = rows.pack(history)
    real = rows.segment_ids >= 0
    assert int(real.sum()) == int(token_counts.sum()) and (packed[~real] == 0).all()
    # Each segment is one history's tokens in order, starting at position 0.
    for b, count in enumerate(token_counts.tolist()):
        slots = rows.segment_ids == b
        assert torch.equal(rows.positions[slots], torch.arange(count))
        assert torch.equal(packed[slots][:, 0], history[b, :count, 0])
    unpacked = rows.unpack(packed)
    valid = torch.arange(5)[None, :] < token_counts[:, None]
    assert torch.equal(unpacked[valid], history[valid])


@pytest.mark.parametrize(("last_item_skip", "history_text_skip", "text_prior_weight"),
                         [(True, False, 0.0), (True, True, 0.0), (False, True, 0.0), (True, False, 0.6)],
                         ids=["last-item", "last-item+history", "history", "last-item+text-prior"])
def test_loss_scores_the_state_after_item_k_against_item_k_plus_1(tmp_path, text_data, last_item_skip,
                                                                   history_text_skip, text_prior_weight):
    """The user after item k (with the text of item k and the mean text of items 1..k: nothing later) is scored
    against item k+1; the text prior adds the cosine of items 1..k's mean text with each candidate's text."""
    config, model, train_data, _, _ = build("DARec", text_data[1], item_settings(
        tmp_path, text_data[0], lambda_align=0.0, lambda_hard=0.0, last_item_skip=last_item_skip,
        history_text_skip=history_text_skip, text_prior_weight=text_prior_weight, text_prior_in_training=True))
    model.eval()  # no dropout: the loss is a deterministic function of the batch
    with torch.no_grad():
        model.id_to_hidden.weight.normal_(std=0.1)  # the ID path must matter too
        if history_text_skip:
            model.history_skip_weight.fill_(0.7)  # not 1, so a mean with the wrong weight fails
    interaction = next(iter(train_data))
    (loss,) = model.calculate_loss(interaction)

    seq, seq_len = interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN]
    full = torch.cat([seq, torch.zeros_like(seq[:, :1])], dim=1)
    full[torch.arange(len(seq_len)), seq_len] = interaction[model.POS_ITEM_ID]
    states = model.encode_histories(full, seq_len + 1)
    items = model.item_vectors()

    def loss_with_shift(shift: int) -> torch.Tensor:
        """Cross-entropy of the state after item k+1 (index k) against the item at index k + shift."""
        users, skips, priors, targets = [], [], [], []
        for row, length in enumerate((seq_len + 1).tolist()):
            for k in range(length - max(shift, 1)):
                users.append(states[row, k])
                history = full[row, : k + 1]
                skip = model.item_text_features[history[-1]] if last_item_skip else 0.0
                history_text = model.item_text_features[history].mean(0)
                if history_text_skip:
                    skip = skip + model.history_skip_weight * history_text
                skips.append(skip)
                priors.append(F.cosine_similarity(history_text[None], model.item_text_features, dim=-1))
                targets.append(full[row, k + shift])
        logits = model.score(model.user_from(torch.stack(users), torch.stack(skips)), items)
        logits = logits + text_prior_weight / model.temperature * torch.stack(priors)
        logits[:, 0] = float("-inf")
        return F.cross_entropy(logits, torch.stack(targets))

    torch.testing.assert_close(loss, loss_with_shift(1), rtol=1e-4, atol=1e-5)
    for shift in (0, 2):  # scored against item k itself, or against item k+2: a different loss
        assert abs(float(loss) - float(loss_with_shift(shift))) > 1e-3


def test_history_text_skip_reads_the_histories_items_only(tmp_path, text_data):
    """The evaluation user adds the mean text of exactly its history's items (padding left out), as in training."""
    _, model, _, _, _ = build("DARec", text_data[1], item_settings(tmp_path, text_data[0], history_text_skip=True))
    model.eval()
    with torch.no_grad():
        model.history_skip_weight.fill_(0.7)
    seq = torch.tensor([[3, 9, 14, 27, 40], [5, 6, 7, 0, 0]])
    seq_len = torch.tensor([5, 3])
    with torch.no_grad():
        users = model.user_vectors(Interaction({model.ITEM_SEQ: seq, model.ITEM_SEQ_LEN: seq_len}))
        states = model.encode_histories(seq, seq_len)[torch.arange(2), seq_len - 1]
        features = model.item_text_features
        for row, length in enumerate(seq_len.tolist()):
            history = seq[row, :length]
            skip = features[history[-1]] + 0.7 * features[history].mean(0)
            torch.testing.assert_close(users[row], model.user_from(states[row: row + 1], skip[None])[0])


def test_text_prior_adds_the_text_similarity_ranking_at_evaluation(tmp_path, text_data):
    """full_sort_predict and predict add weight / temperature times the cosine of the history's mean text (its own
    items only, padding left out) with each item's text to the scores of the same model without the prior; the
    training loss leaves it out unless text_prior_in_training."""
    _, model, train_data, _, _ = build("DARec", text_data[1], item_settings(
        tmp_path, text_data[0], text_prior_weight=0.6, lambda_align=0.0, lambda_hard=0.0))
    model.eval()
    batch = next(iter(train_data))
    with torch.no_grad():
        (loss,) = model.calculate_loss(batch)
        model.text_prior_in_training = True
        (trained_with_prior,) = model.calculate_loss(batch)
        model.text_prior_in_training = False
        model.text_prior_weight = 0.0
        (no_prior,) = model.calculate_loss(batch)
        model.text_prior_weight = 0.6
    assert float(loss) == pytest.approx(float(no_prior), abs=1e-6)
    assert abs(float(trained_with_prior) - float(loss)) > 1e-3
    seq = torch.tensor([[3, 9, 14, 27, 40], [5, 6, 7, 0, 0]])
    seq_len = torch.tensor([5, 3])
    candidates = torch.tensor([8, 33])
    interaction = Interaction({model.ITEM_SEQ: seq, model.ITEM_SEQ_LEN: seq_len, model.ITEM_ID: candidates})
    with torch.no_grad():
        with_prior = model.full_sort_predict(interaction)
        one_each = model.predict(interaction)
        model.text_prior_weight = 0.0
        without = model.full_sort_predict(interaction)
    features = model.item_text_features
    for row, length in enumerate(seq_len.tolist()):
        history_text = features[seq[row, :length]].mean(0)
        prior = 0.6 / model.temperature * F.cosine_similarity(history_text[None], features, dim=-1)
        torch.testing.assert_close(with_prior[row], without[row] + prior, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(one_each[row], with_prior[row, candidates[row]], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("weight", [None, 0.5], ids=["learned", "fixed"])
def test_history_skip_weight_is_learned_or_fixed(tmp_path, text_data, weight):
    _, model, _, _, _ = build("DARec", text_data[1], item_settings(tmp_path, text_data[0], history_text_skip=True,
                                                                   history_skip_weight=weight))
    learned = "history_skip_weight" in dict(model.named_parameters())
    assert learned == (weight is None)
    assert float(model.history_skip_weight) == (1.0 if weight is None else weight)


@pytest.mark.parametrize("llm_bf16", [False, True], ids=["fp32", "bf16"])
def test_learns_a_planted_next_item_pattern(tmp_path, text_data, llm_bf16):
    """Users walk forward through the catalogue (item i is followed by i+1): a few seconds of training must rank
    the next item far above chance (NDCG@10 of a random ranking of 60 items is about 0.07), in bf16 autocast too."""
    config, model, train_data, valid_data, test_data = build("DARec", text_data[1], item_settings(
        tmp_path, text_data[0], epochs=15, learning_rate=0.005, llm_learning_rate=0.001, eval_step=100,
        llm_bf16=llm_bf16))
    trainer = trainer_for(config, model)
    trainer.fit(train_data, valid_data, saved=False)
    result = trainer.evaluate(test_data, load_best_model=False)
    assert result["ndcg@10"] > 0.3, result
    assert result["recall@10"] > 0.6, result


def test_items_only_their_text_can_find(tmp_path):
    """Items that never occur in training, but share their text with items that do, are found through the text:
    ranked at least as well as by a plain text-similarity baseline on the same frozen backbone."""
    root = tmp_path / "dataset"
    name = "twins"
    (root / name).mkdir(parents=True)
    n_warm = 30  # items 0..29 in training; item 30 + i is a text twin of item i and only ever a test target
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    generator = torch.Generator().manual_seed(0)
    for user in range(60):
        start, length = int(torch.randint(0, n_warm, (1,), generator=generator)), 7
        walk = [(start + step) % n_warm for step in range(length)]
        test_item = n_warm + (start + length) % n_warm  # the twin of the item that comes next
        for step, item in enumerate([*walk, test_item]):
            lines.append(f"u{user}\ti{item}\t{1000 * user + step}")
    (root / name / f"{name}.inter").write_text("\n".join(lines) + "\n")
    texts = ["item_id:token\tn:token_seq"] + [f"i{i}\t{i % n_warm}z{(i % n_warm) % 3}" for i in range(2 * n_warm)]
    (root / name / f"{name}.item").write_text("\n".join(texts) + "\n")

    config, model, train_data, valid_data, test_data = build("DARec", name, item_settings(
        tmp_path, str(root), epochs=20, learning_rate=0.005, llm_learning_rate=0.001, eval_step=100))
    dataset = train_data._dataset
    token = dataset.field2id_token[dataset.iid_field]
    cold = [i for i in range(1, model.n_items) if int(token[i][1:]) >= n_warm]
    assert not model.item_id_known[cold].any()  # never in training: no ID vector of their own
    trainer = trainer_for(config, model)
    trainer.fit(train_data, valid_data, saved=False)
    model_result = trainer.evaluate(test_data, load_best_model=False)

    # Baseline: a user is the mean of the (whitened) text states of their history, scored by cosine.
    states = model.item_text_states[:, 0]  # one position per item: the mean over its whole text
    mean, projection = pca_whitening(states[1:], 16)
    text = F.normalize((states - mean) @ projection, dim=-1)
    ranks = []
    for batch in test_data:
        interaction = batch[0]
        seq, seq_len = interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN]
        valid = torch.arange(seq.shape[1])[None, :] < seq_len[:, None]
        users = F.normalize((text[seq] * valid[..., None]).sum(1), dim=-1)
        scores = users @ text.T
        scores[:, 0] = float("-inf")
        target = scores.gather(1, interaction[model.ITEM_ID][:, None])
        ranks.append((scores > target).sum(1) + 1)
    ranks = torch.cat(ranks).float()
    baseline_recall = float((ranks <= 10).float().mean())
    assert model_result["recall@10"] >= baseline_recall, (model_result, baseline_recall)
    assert model_result["recall@10"] > 0.5, model_result


def test_item_pass_sees_only_the_items_own_tokens(tmp_path, text_data):
    """An item's cached state depends on its own tokens only: batching it with other items changes nothing."""
    config, model, _, _, _ = build("DARec", text_data[1], item_settings(tmp_path, text_data[0]))
    backbone = model.backbone
    # The model keeps only its top layer; a fresh backbone gives the lower layers back.
    from recbole_darec.model.backbone import load_backbone

    fresh = load_backbone("random:llama", None, config["llm_random_config"])
    ids, lengths = model.item_token_ids, model.item_token_len
    together, _, _ = encode_item_text(fresh, ids, lengths, 1, True, batch_size=64)
    alone, _, _ = encode_item_text(fresh, ids[5:6], lengths[5:6], 1, True, batch_size=1)
    torch.testing.assert_close(together[5], alone[0], rtol=1e-4, atol=1e-5)
    assert len(backbone.layers) == 1  # only the sequence layers are kept in the model


def test_item_states_cached_on_disk_and_reused(tmp_path, text_data):
    settings = item_settings(tmp_path, text_data[0])
    _, first, _, _, _ = build("DARec", text_data[1], settings)
    cache = list(Path(settings["item_text_cache_dir"]).glob("item_states-*.pt"))
    assert len(cache) == 1
    _, second, _, _, _ = build("DARec", text_data[1], settings)
    torch.testing.assert_close(first.item_text_states, second.item_text_states, rtol=0, atol=0)
    _, causal, _, _, _ = build("DARec", text_data[1], {**settings, "context_masking": False})
    assert len(list(Path(settings["item_text_cache_dir"]).glob("item_states-*.pt"))) == 2  # another key
    assert not torch.equal(causal.item_text_states, first.item_text_states)
    # Another batch size groups and pads items otherwise, which changes the states' last bits: another key too.
    build("DARec", text_data[1], {**settings, "item_encode_batch_size": 3})
    assert len(list(Path(settings["item_text_cache_dir"]).glob("item_states-*.pt"))) == 3


def test_sequence_layers_must_leave_item_layers(tmp_path, text_data):
    with pytest.raises(ValueError, match="sequence_layers=2"):
        build("DARec", text_data[1], item_settings(tmp_path, text_data[0], sequence_layers=2))


def test_whitening_gives_identity_covariance():
    generator = torch.Generator().manual_seed(0)
    states = torch.randn(500, 8, generator=generator) @ torch.randn(8, 8, generator=generator) + 3.0
    mean, projection = pca_whitening(states, 8)
    white = (states - mean) @ projection
    torch.testing.assert_close(white.T @ white / (len(states) - 1), torch.eye(8), rtol=0, atol=1e-3)


def test_item_level_checkpoint_round_trip(tmp_path, text_data):
    config, model, train_data, valid_data, test_data = build("DARec", text_data[1], item_settings(
        tmp_path, text_data[0], epochs=1))
    trainer = trainer_for(config, model)
    trainer.fit(train_data, valid_data, saved=True)
    before = trainer.evaluate(test_data, load_best_model=True)
    _, again, _, _, _ = build("DARec", text_data[1], item_settings(tmp_path, text_data[0], epochs=1))
    checkpoint = torch.load(trainer.saved_model_file, weights_only=False)
    again.load_state_dict(checkpoint["state_dict"])
    again.load_other_parameter(checkpoint["other_parameter"])  # the text prior's weight chosen after training
    after = trainer_for(config, again).evaluate(test_data, load_best_model=False)
    assert before == after


def test_windows_cover_every_training_target_once(tmp_path):
    data_path, name = write_text_dataset(tmp_path / "dataset")
    _, _, train_data, _, _ = build("DARec", name, item_settings(tmp_path, data_path, MAX_ITEM_LIST_LENGTH=3))
    dataset = train_data._dataset
    sequences, lengths = dataset.training_sequences()
    users = dataset.inter_feat[dataset.uid_field]
    predicted: dict[int, list[int]] = {}
    for user, row, length in zip(users.tolist(), sequences.tolist(), lengths.tolist()):
        predicted.setdefault(user, []).extend(row[1:length])  # targets of the row's positions
    pair_users, pair_items = dataset.training_pairs()
    for user in set(users.tolist()):
        history = pair_items[pair_users == user].tolist()
        assert predicted[user] == history[1:], user  # every target after the first item, once, in time order


@pytest.mark.parametrize("llm_bf16", [False, True], ids=["fp32", "bf16"])
def test_speed_benchmark_measures_the_item_level_step_against_the_same_packed_rows(tmp_path, text_data,
                                                                                  monkeypatch, llm_bf16):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import speed

    plain_inputs, darec_inputs = [], []  # (rows, width) of every call of the plain backbone / of DARec's
    mask_dtypes = {"plain": set(), "darec": set()}

    def recorder(calls, name):
        def record(_module, _args, inputs):
            calls.append(tuple(inputs["inputs_embeds"].shape[:2]))
            mask_dtypes[name].add(inputs["attention_mask"].dtype)
        return record

    load_backbone = speed.load_backbone

    def recording_backbone(*args, **kwargs):
        backbone = load_backbone(*args, **kwargs)
        backbone.model.register_forward_pre_hook(recorder(plain_inputs, "plain"), with_kwargs=True)
        return backbone

    monkeypatch.setattr(speed, "load_backbone", recording_backbone)
    monkeypatch.setattr(darec_module, "PACKED_ROW_TOKENS", 16)
    build_model = speed.get_model

    def recording_model(name):
        def make(config, dataset):
            model = build_model(name)(config, dataset)
            if name == "DARec":
                model.llm.register_forward_pre_hook(recorder(darec_inputs, "darec"), with_kwargs=True)
            return model
        return make

    monkeypatch.setattr(speed, "get_model", recording_model)
    settings = item_settings(tmp_path, text_data[0], train_batch_size=40, llm_bf16=llm_bf16)
    result = speed.measure("DARec", text_data[1], settings, steps=4)
    assert "step_ratio_plain_all" not in result and result["steps"] == 4 and result["step_ratio"] > 0
    assert result["eval_ms_per_user"] > 0 and result["eval_ms_per_user_sasrec"] > 0
    test_data = build("DARec", text_data[1], settings)[-1]
    assert result["eval_users"] == sum(len(batch[0]) for batch in test_data)  # every test user
    # One plain call per step (warm-up + 4), over the rows DARec's training steps ran: histories packed several to
    # a row, not one row per history.
    assert len(plain_inputs) == 5 and len(set(plain_inputs)) == 1
    rows, width = plain_inputs[0]
    assert darec_inputs[0] == (rows, width) and rows < result["batch_users"]
    assert result["batch_tokens"] <= rows * width
    # The plain step runs in DARec's precision, its mask in the dtype of DARec's own: these 16-token rows run their
    # attention with a float32 mask on a CPU, bf16 or not.
    expected = torch.bfloat16 if llm_bf16 and width >= CPU_PRODUCT_ATTENTION_BELOW else torch.float32
    assert mask_dtypes == {"plain": {expected}, "darec": {expected}}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_speed_steps_only_compares_with_a_plain_backbone_in_the_same_checkpointing(tmp_path, text_data, monkeypatch,
                                                                                  checkpointing):
    """``steps_only`` (the paper profile on a CPU) times the steps alone; with ``gradient_checkpointing`` the plain
    backbone recomputes its layers in backward as DARec's do, so the ratio compares like with like."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import speed

    layer_calls = {"plain": 0, "darec": 0}
    load_backbone = speed.load_backbone

    def counting_backbone(*args, **kwargs):
        backbone = load_backbone(*args, **kwargs)

        def count(*_):
            layer_calls["plain"] += 1
        sublayer_modules(backbone.layers[-1])[-1].register_forward_pre_hook(count)  # inside the checkpointed forward
        return backbone

    monkeypatch.setattr(speed, "load_backbone", counting_backbone)
    build_model = speed.get_model

    def counting_model(name):
        def make(config, dataset):
            model = build_model(name)(config, dataset)

            def count(*_):
                layer_calls["darec"] += 1
            sublayer_modules(model.backbone.layers[-1])[-1].register_forward_pre_hook(count)
            return model
        return make

    monkeypatch.setattr(speed, "get_model", counting_model)
    settings = item_settings(tmp_path, text_data[0], gradient_checkpointing=checkpointing)
    result = speed.measure("DARec", text_data[1], settings, steps=4, steps_only=True)
    assert result["steps"] == 4 and result["step_ratio"] > 0 and "eval_ms_per_user" not in result
    # One top-layer FFN pass per step (warm-up + 4), twice with checkpointing (the recompute in backward), both sides.
    per_step = 2 if checkpointing else 1
    assert layer_calls == {"plain": 5 * per_step, "darec": 5 * per_step}


def test_text_prior_weight_is_chosen_on_validation_after_training(tmp_path, text_data):
    """With text_prior_weights, training (early stopping included, at text_prior_weight) runs as without them;
    then the candidate with the best validation score becomes text_prior_weight, in the model and in the best
    checkpoint."""
    candidates = [0.0, 0.5, 3.0]

    def trained(run: str, **extra):
        config, model, train_data, valid_data, _ = build("DARec", text_data[1], item_settings(
            tmp_path / run, text_data[0], epochs=3, learning_rate=0.005, text_prior_weight=3.0, **extra))
        trainer = trainer_for(config, model)
        trainer.fit(train_data, valid_data, saved=True)
        return trainer, model, valid_data

    trainer, model, valid_data = trained("chosen", text_prior_weights=candidates)
    chosen = model.text_prior_weight
    scores = []
    for weight in candidates:
        model.text_prior_weight = weight
        scores.append(trainer.evaluate(valid_data, load_best_model=False)["ndcg@10"])
    assert len(set(scores)) > 1  # the candidates rank differently, so the choice matters
    assert chosen == candidates[scores.index(max(scores))] != 3.0  # not the weight that training validated at
    assert trainer.best_valid_score == max(scores)
    assert Recommender(trainer.saved_model_file).model.text_prior_weight == chosen

    plain, _, _ = trained("plain", text_prior_weights=None)
    weights = load_trusted_checkpoint(trainer.saved_model_file)["state_dict"]
    for name, value in load_trusted_checkpoint(plain.saved_model_file)["state_dict"].items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=0)
