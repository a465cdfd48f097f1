"""Collaborative knowledge injection (issue 4): a RecBole CF model inside DARec, on training interactions only.

Tiny random Llama backbone (hidden 32, one layer) on the tiny fixture of conftest.py. Most tests build DARec
directly on one dataset loaded per module; the run tests go through run_darec.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from conftest import assert_protocol_metrics, write_tiny_dataset
from recbole.data.dataset import Dataset
from recbole.utils import init_seed

from recbole_darec.compat import load_trusted_checkpoint
from recbole_darec.config import Config
from recbole_darec.data import load_data
from recbole_darec.data.cf_view import CFTrainingView
from recbole_darec.model.cf_injection import CF_VECTOR_READERS
from recbole_darec.model.darectokens import DARecTokens
from recbole_darec.quick_start import run_darec

TINY_LLM = {
    "llm_path": "random:llama",
    "llm_random_config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "ffn": 64},
    "item_max_tokens": 8,
    "rec_dim": 32,
    "adapter_size": 8,
    # Injection at [CF_USER] and [ITEM] tokens is the token-level layout's; test_item_level.py covers the other.
}


class Prepared:
    """The tiny dataset loaded once: its raw sequences, the DARec config dict and the training split."""

    def __init__(self, root: Path):
        self.data_path, self.name = write_tiny_dataset(root / "dataset")
        self.config_dict = {
            "epochs": 1,
            "state": "WARNING",
            "show_progress": False,
            "data_path": self.data_path,
            "checkpoint_dir": str(root / "saved"),
            "item_text_cache_dir": str(root / "item_text_cache"),
            **TINY_LLM,
        }
        config = Config(model="DARecTokens", dataset=self.name, config_dict=self.config_dict)
        self.dataset, train_data, _, _ = load_data(config)
        self.train = train_data._dataset
        self.raw = raw_sequences(Path(self.data_path) / self.name / f"{self.name}.inter")

    def model(self, **overrides) -> DARecTokens:
        config = Config(model="DARecTokens", dataset=self.name, config_dict={**self.config_dict, **overrides})
        # Built here without .to(device), so on CPU: a CUDA config would put LightGCN's graph on the GPU.
        config["device"] = torch.device("cpu")
        init_seed(config["seed"], True)
        return DARecTokens(config, self.train)


def raw_sequences(inter_file: Path) -> dict[str, list[str]]:
    """user token -> item tokens in time order, straight from the atomic .inter file."""
    rows = defaultdict(list)
    for line in inter_file.read_text(encoding="utf-8").splitlines()[1:]:
        user, item, timestamp = line.split("\t")
        rows[user].append((float(timestamp), item))
    return {user: [item for _, item in sorted(events)] for user, events in rows.items()}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", [sys.argv[0]])  # RecBole's Config parses --key=value from sys.argv
        return Prepared(tmp_path_factory.mktemp("cf"))


@pytest.fixture(autouse=True)
def clean_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])


def cf_pairs_by_user(view: CFTrainingView) -> dict[str, list[str]]:
    """user token -> item tokens of the CF model's training interactions."""
    users = view.id2token(view.uid_field, view.inter_feat[view.uid_field].numpy())
    items = view.id2token(view.iid_field, view.inter_feat[view.iid_field].numpy())
    pairs = defaultdict(list)
    for user, item in zip(users, items):
        pairs[user].append(item)
    return pairs


# ---------------------------------------------------------------- the CF model's data


def test_cf_model_sees_exactly_the_training_split(prepared):
    model = prepared.model(cf_model="BPR")
    view = model.cf_injection.cf_dataset
    assert isinstance(view, CFTrainingView) and model.cf_injection.cf_model.n_users == prepared.train.num("user_id")

    expected_count = sum(len(items) - 2 for items in prepared.raw.values())
    assert len(view.inter_feat) == expected_count
    matrix = view.inter_matrix(form="coo")  # RecBole's plain Dataset.inter_matrix over the view
    assert matrix.shape == (prepared.train.user_num, prepared.train.item_num)
    assert matrix.nnz == expected_count and matrix.sum() == expected_count

    pairs = cf_pairs_by_user(view)
    for user, items in prepared.raw.items():
        assert pairs[user] == items[:-2], user  # every training item, in time order
        valid_item, test_item = items[-2:]
        for held_out in (valid_item, test_item):
            # Held-out items reach the CF model only where the user also had them in training.
            assert held_out not in pairs[user] or held_out in items[:-2], (user, held_out)
    # What the view replaces: the split's own interactions are one sequence row per user.
    assert len(prepared.train.inter_feat) == len(prepared.raw)


def test_training_pairs_are_complete_when_sequences_are_truncated(prepared):
    # A user's single training row keeps at most MAX_ITEM_LIST_LENGTH items; the CF pairs must not lose the rest.
    config = Config(model="DARecTokens", dataset=prepared.name, config_dict={**prepared.config_dict,
                                                                      "MAX_ITEM_LIST_LENGTH": 3})
    _, train_data, _, _ = load_data(config)
    train = train_data._dataset
    _, lengths = train.training_sequences()
    assert int(lengths.max()) == 4
    users, items = train.training_pairs()
    assert len(users) == sum(len(seq) - 2 for seq in prepared.raw.values())
    view = CFTrainingView(train, users, items)
    assert cf_pairs_by_user(view) == {user: seq[:-2] for user, seq in prepared.raw.items()}


# ---------------------------------------------------------------- which CF model, which parameters


def cf_parameters(model: DARecTokens) -> dict[str, tuple[int, ...]]:
    return {name.removeprefix("cf_injection.cf_model."): tuple(p.shape) for name, p in model.named_parameters()
            if name.startswith("cf_injection.cf_model.")}


def test_switching_cf_model_changes_the_parameter_set(prepared):
    n_users, n_items = prepared.train.user_num, prepared.train.item_num
    models = {name: prepared.model(cf_model=name) for name in ("BPR", "LightGCN", "NeuMF")}
    plain = prepared.model()

    assert plain.cf_injection is None and not any("cf_injection" in n for n, _ in plain.named_parameters())
    for name, model in models.items():
        assert type(model.cf_injection.cf_model).__name__ == name
    # Defaults from RecBole's model yaml (embedding_size: 64), not DARec's config.
    assert cf_parameters(models["BPR"]) == {"user_embedding.weight": (n_users, 64),
                                            "item_embedding.weight": (n_items, 64)}
    # LightGCN: the same tables, plus a propagation graph built from the training pairs only.
    assert cf_parameters(models["LightGCN"]) == cf_parameters(models["BPR"])
    lightgcn = models["LightGCN"].cf_injection.cf_model
    assert lightgcn.n_layers == 2 and lightgcn.interaction_matrix.nnz == len(models["BPR"].cf_injection.cf_dataset)
    assert lightgcn.norm_adj_matrix._nnz() == 2 * lightgcn.interaction_matrix.nnz
    assert {"user_mf_embedding.weight", "item_mlp_embedding.weight", "predict_layer.weight"} <= set(
        cf_parameters(models["NeuMF"]))

    def count(model: DARecTokens) -> int:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    hidden = 32
    projections = 64 * hidden + hidden + hidden * hidden + hidden  # the items' 2-layer MLP from 64 to hidden
    assert count(models["BPR"]) == count(plain) + (n_users + n_items) * 64 + projections
    assert count(models["LightGCN"]) == count(models["BPR"])
    assert count(models["NeuMF"]) > count(models["BPR"])

    small = prepared.model(cf_model="LightGCN", cf_config={"embedding_size": 16, "n_layers": 1},
                           cf_user_vector=True)
    assert cf_parameters(small)["user_embedding.weight"] == (n_users, 16)
    assert small.cf_injection.cf_model.n_layers == 1
    assert small.cf_injection.user_projection[0].in_features == 16


@pytest.mark.parametrize("name", ["NoSuchCF", "SASRec", "bpr"])
def test_unknown_cf_model_fails_at_start_with_the_supported_names(prepared, name):
    with pytest.raises(ValueError, match=r"supported CF models: BPR, LightGCN, NGCF, NeuMF") as excinfo:
        prepared.model(cf_model=name)
    assert repr(name) in str(excinfo.value)


# ---------------------------------------------------------------- injection and L_cf


@pytest.mark.parametrize("user_vector", [True, False])
def test_inject_puts_the_user_vector_first_and_adds_item_vectors_at_item_tokens(prepared, user_vector):
    model = prepared.model(cf_model="BPR", cf_user_vector=user_vector)
    cf = model.cf_injection
    torch.nn.init.normal_(cf.item_projection[-1].weight)  # zero at init: make the addition visible
    sequences, lengths = prepared.train.training_sequences()
    users = prepared.train.inter_feat["user_id"]
    n_slots = sequences.shape[1]
    valid = torch.arange(n_slots)[None, :] < lengths[:, None]
    # Distinct boundary positions after position 0, as the packer makes them.
    boundaries = torch.where(valid, 1 + 2 * torch.arange(n_slots)[None, :], 0)
    embeds = torch.randn(len(users), 2 * n_slots + 1, 32, requires_grad=True)
    before = embeds.detach().clone()

    out = cf.inject(embeds, users, sequences, boundaries, valid)
    out.sum().backward()  # out of place: autograd has nothing to complain about
    assert torch.equal(embeds.detach(), before)

    with torch.no_grad():
        item_add = cf.item_projection(cf.cf_model.item_embedding(sequences))
        # Off (the default): position 0 keeps its [CF_USER] embedding: nothing of the user's CF vector enters.
        user_token = cf.user_projection(cf.cf_model.user_embedding(users)) if user_vector else before[:, 0]
    torch.testing.assert_close(out[:, 0], user_token)
    rows, slots = valid.nonzero(as_tuple=True)
    torch.testing.assert_close(out[rows, boundaries[rows, slots]], before[rows, boundaries[rows, slots]]
                               + item_add[rows, slots])
    untouched = torch.ones(out.shape[:2], dtype=torch.bool)
    untouched[:, 0] = False
    untouched[rows, boundaries[rows, slots]] = False
    assert torch.equal(out[untouched], before[untouched])


@pytest.mark.parametrize("name", sorted(CF_VECTOR_READERS))
def test_cf_loss_trains_the_cf_model_and_the_projections(prepared, name):
    model = prepared.model(cf_model=name, cf_user_vector=True)
    batch = prepared.train.inter_feat
    losses = model.calculate_loss(batch)
    assert len(losses) == 4  # L_next, L_align, L_hard, L_cf
    assert all(torch.isfinite(loss) for loss in losses)
    sum(losses).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if n.startswith("cf_injection.")}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "embedding" in n), name
    assert grads["cf_injection.user_projection.0.weight"].abs().sum() > 0
    assert grads["cf_injection.item_projection.2.weight"].abs().sum() > 0
    assert not any("user_projection" in n for n, _ in prepared.model(cf_model=name).named_parameters())


def test_cf_negatives_avoid_the_users_training_items(prepared):
    cf = prepared.model(cf_model="BPR").cf_injection
    torch.manual_seed(0)
    users = cf.cf_dataset.inter_feat["user_id"].repeat(20)
    negatives = cf.sample_negatives(users)
    assert int(negatives.min()) >= 1 and int(negatives.max()) < cf.n_items
    assert not cf._is_training_pair(users, negatives).any()
    assert cf._is_training_pair(users, cf.cf_dataset.inter_feat["item_id"].repeat(20)).all()


@pytest.mark.parametrize(("cf_model", "context_masking"), [("BPR", True), ("BPR", False), ("LightGCN", True)])
def test_no_future_leakage_with_injection_on(prepared, cf_model, context_masking):
    model = prepared.model(cf_model=cf_model, context_masking=context_masking)
    cf = model.cf_injection
    with torch.no_grad():  # zero at init: give item vectors a real effect, or the test proves nothing
        cf.item_projection[-1].weight.normal_(std=0.5)
    model.eval()
    sequences, lengths = prepared.train.training_sequences()
    users = prepared.train.inter_feat["user_id"]
    j = 2  # every training sequence of the fixture has at least three items

    def states(seq: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.encode_sequences(seq, lengths, users)

    base = states(sequences)
    # Another item at slot j: other tokens and another CF vector.
    perturbed = sequences.clone()
    perturbed[:, j] = sequences[:, j] % (prepared.train.item_num - 1) + 1
    assert (perturbed[:, j] != sequences[:, j]).all()
    after = states(perturbed)
    torch.testing.assert_close(after[:, :j], base[:, :j], rtol=0, atol=1e-6)
    assert ((after[:, j] - base[:, j]).abs().amax(-1) > 1e-4).all()

    if cf_model == "BPR":
        # The same item with another CF vector (tokens unchanged): for row 0, whose item at j is not earlier in it.
        item = int(sequences[0, j])
        assert item not in sequences[0, :j].tolist()
        with torch.no_grad():
            cf.cf_model.item_embedding.weight[item] += 1.0
        after = states(sequences)
        torch.testing.assert_close(after[0, :j], base[0, :j], rtol=0, atol=1e-6)
        assert (after[0, j] - base[0, j]).abs().max() > 1e-4


# ---------------------------------------------------------------- runs


@pytest.mark.parametrize("cf_model", ["BPR", "LightGCN"])
def test_darec_trains_jointly_with_cf_model(isolated_run, prepared, cf_model):
    config = {**prepared.config_dict, "checkpoint_dir": str(isolated_run / "saved"), "cf_model": cf_model}
    result = run_darec(model="DARecTokens", dataset=prepared.name, config_dict=config)
    assert_protocol_metrics(result["best_valid_result"])
    assert_protocol_metrics(result["test_result"])
    state = load_trusted_checkpoint(result["saved_model_file"], "cpu")["state_dict"]
    assert {"cf_injection.cf_model.user_embedding.weight", "cf_injection.item_projection.2.weight"} <= set(state)


def test_cf_checkpoint_loads_and_stays_frozen(isolated_run, prepared):
    # A BPR trained earlier with RecBole's own pipeline (embedding_size 32, unlike BPR.yaml's 64).
    base = {**prepared.config_dict, "checkpoint_dir": str(isolated_run / "saved")}
    bpr = run_darec(model="BPR", dataset=prepared.name, config_dict={**base, "embedding_size": 32})
    bpr_state = load_trusted_checkpoint(bpr["saved_model_file"], "cpu")["state_dict"]
    assert bpr_state["user_embedding.weight"].shape[1] == 32

    # Frozen: one DARec epoch leaves every CF weight bit-identical; the projections around it train.
    frozen = {**base, "cf_model": "BPR", "cf_checkpoint": bpr["saved_model_file"],
              "cf_trainable": False}
    result = run_darec(model="DARecTokens", dataset=prepared.name, config_dict=frozen)
    assert_protocol_metrics(result["test_result"])
    darec_state = load_trusted_checkpoint(result["saved_model_file"], "cpu")["state_dict"]
    for key, value in bpr_state.items():
        assert torch.equal(darec_state[f"cf_injection.cf_model.{key}"], value), key
    assert darec_state["cf_injection.item_projection.2.weight"].abs().sum() > 0  # zero at init

    # Trainable: starts from the checkpoint, then moves.
    model = prepared.model(cf_model="BPR", cf_checkpoint=bpr["saved_model_file"])
    assert model.cf_injection.lambda_cf > 0
    assert torch.equal(model.cf_injection.cf_model.user_embedding.weight, bpr_state["user_embedding.weight"])
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    sum(model.calculate_loss(prepared.train.inter_feat)).backward()
    optimizer.step()
    assert not torch.equal(model.cf_injection.cf_model.user_embedding.weight, bpr_state["user_embedding.weight"])

    # Frozen in a model: no L_cf term, no grad.
    model = prepared.model(cf_model="BPR", cf_checkpoint=bpr["saved_model_file"], cf_trainable=False)
    assert model.cf_injection.lambda_cf == 0.0 and len(model.calculate_loss(prepared.train.inter_feat)) == 3
    assert not any(p.requires_grad for p in model.cf_injection.cf_model.parameters())

    # Checkpoints that do not fit fail with a message that says why.
    with pytest.raises(ValueError, match="holds a BPR model, but cf_model=LightGCN"):
        prepared.model(cf_model="LightGCN", cf_checkpoint=bpr["saved_model_file"])
    checkpoint = load_trusted_checkpoint(bpr["saved_model_file"], "cpu")
    checkpoint["state_dict"]["user_embedding.weight"] = checkpoint["state_dict"]["user_embedding.weight"][:-5]
    smaller = isolated_run / "bpr-other-dataset.pth"
    torch.save(checkpoint, smaller)
    with pytest.raises(ValueError, match=r"user_embedding.weight \(26, 32\) vs \(31, 32\)") as excinfo:
        prepared.model(cf_model="BPR", cf_checkpoint=str(smaller))
    assert "31 users and 61 items" in str(excinfo.value) and "same dataset" in str(excinfo.value)
    with pytest.raises(ValueError, match=r"item_embedding.weight \(61, 32\) vs \(61, 16\)"):
        prepared.model(cf_model="BPR", cf_checkpoint=bpr["saved_model_file"], cf_config={"embedding_size": 16})


def test_cf_view_uses_recbole_dataset_methods():
    # The view must answer with RecBole's general Dataset, not SequentialDataset (whose inter_matrix reads
    # sequence rows).
    assert CFTrainingView.inter_matrix is Dataset.inter_matrix
    assert CFTrainingView.history_item_matrix is Dataset.history_item_matrix
