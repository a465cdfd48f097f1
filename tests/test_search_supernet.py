"""Architecture search on DARec end to end: supernet, candidate scoring, --search=bo|random, resume, run_hyper.

Real runs on the tiny fixture with a 3-layer random Llama backbone (byte tokenizer, offline), one supernet epoch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_DATASET, assert_protocol_metrics
from recbole.utils import init_seed

from recbole_darec import compat, hyper, provenance, trainer
from recbole_darec.config import Config
from recbole_darec.data import load_data
from recbole_darec.hyper import hyper_tune
from recbole_darec.quick_start import run_darec
from recbole_darec.search import (
    Supernet,
    TrialLog,
    arch_to_str,
    build_supernet,
    describe_arch,
    search_architecture,
    search_paths,
    str_to_arch,
)
from recbole_darec.search.supernet import validation_subset

ROOT = Path(__file__).resolve().parents[1]
N_LAYERS = 3


def darec_config(tiny_dataset, fast_config, tmp_path: Path, **overrides) -> dict:
    return {
        **fast_config,
        "data_path": tiny_dataset[0],
        "llm_path": "random:llama",
        "llm_random_config": {"hidden_size": 32, "num_hidden_layers": N_LAYERS, "num_attention_heads": 2, "ffn": 64},
        # The search over every layer of the token-level layout (the paper's); in the item-level mode it covers
        # the top sequence_layers layers, the only ones with adapters.
        "item_max_tokens": 8,
        "item_text_cache_dir": str(tmp_path / "item_text"),
        "adapter_size": 8,
        "rec_dim": 32,
        "search_epochs": 1,
        "search_n_init": 2,
        "search_n_iter": 2,
        **overrides,
    }


def load(config_dict: dict):
    config = Config(model="DARecTokens", dataset=TINY_DATASET, config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    _, train_data, valid_data, _ = load_data(config)
    return config, train_data, valid_data


# ---------------------------------------------------------------- supernet


def test_supernet_samples_an_architecture_per_batch(isolated_run, tiny_dataset, fast_config):
    config, train_data, _ = load(darec_config(tiny_dataset, fast_config, isolated_run))
    supernet = build_supernet(config, train_data, isolated_run / "supernet.pth")
    model = supernet.model
    assert model.supernet and len(model.adapters) == N_LAYERS
    ran: list[tuple[int, str]] = []
    for index, layer in enumerate(model.adapters):
        for sublayer in (layer.attention, layer.ffn):
            for kind in ("serial", "parallel"):
                getattr(sublayer, kind).register_forward_hook(
                    lambda module, args, output, index=index, kind=kind: ran.append((index, kind))
                )

    batch = next(iter(train_data))
    torch.manual_seed(0)
    archs = []
    for _ in range(8):
        ran.clear()
        with torch.no_grad():
            model.calculate_loss(batch)
        arch = [layer.router.choice for layer in model.adapters]
        archs.append(arch_to_str(arch))
        # Every forward pass of the batch (sequences and items) ran exactly the sampled adapter of each layer.
        for index in range(N_LAYERS):
            assert {kind for i, kind in ran if i == index} == {("serial", "parallel")[arch[index]]}
    assert len(set(archs)) > 1, archs
    for index in range(N_LAYERS):
        assert {arch[index] for arch in archs} == {"s", "p"}, archs
    # The run's own config is untouched: the final model must not be a supernet.
    assert supernet.trainer.config["supernet"] is True and not config["supernet"]


def test_fixed_architecture_is_deterministic_and_refreshes_item_vectors(
    isolated_run, tiny_dataset, fast_config, caplog, monkeypatch
):
    config, train_data, valid_data = load(darec_config(tiny_dataset, fast_config, isolated_run))
    supernet = build_supernet(config, train_data, isolated_run / "supernet.pth")
    supernet.ensure_trained()
    assert (isolated_run / "supernet.pth").is_file()
    model = supernet.model
    serial, parallel = [0] * N_LAYERS, [1] * N_LAYERS

    first = supernet.score(serial, valid_data)
    assert first == supernet.score(serial, valid_data)
    assert [layer.router.choice for layer in model.adapters] == serial

    # After training both adapters are non-zero, so the architecture changes every item vector; the per-evaluation
    # cache must follow the architecture, not survive it.
    model.eval()
    model.set_adapter_arch(serial)
    vectors_serial = model.all_item_vectors().clone()
    model.set_adapter_arch(parallel)
    vectors_parallel = model.all_item_vectors().clone()
    assert not torch.allclose(vectors_serial, vectors_parallel)
    model._eval_item_vectors = None
    assert torch.equal(vectors_parallel, model.all_item_vectors())

    supernet.score(parallel, valid_data)
    assert supernet.score(serial, valid_data) == first

    # A search under other settings (or code) gets its own supernet and trial log, not this one's...
    paths = search_paths(config, "bo")
    for key, value in (("lambda_hard", 0.5), ("llm_learning_rate", 1e-3), ("MAX_ITEM_LIST_LENGTH", 7),
                       ("item_cache_refresh", 3), ("search_valid_users", 5)):
        other = search_paths({**config.final_config_dict, key: value}, "bo")
        assert other.trial_log != paths.trial_log, key
        assert (other.supernet != paths.supernet) == (key != "search_valid_users"), key  # scoring only: same weights
    monkeypatch.setattr(provenance, "code_version", lambda plugin_models=True: "another-code")
    assert search_paths(config, "bo").supernet != paths.supernet
    monkeypatch.undo()
    # ... and a checkpoint given by its path, trained with other settings, is reused with a warning naming them.
    config["lambda_hard"] = 0.5
    again = build_supernet(config, train_data, isolated_run / "supernet.pth")
    with caplog.at_level("WARNING"):
        again.ensure_trained()
    assert "lambda_hard: 0.1 -> 0.5" in caplog.text
    assert again.score(serial, valid_data) == first


# ---------------------------------------------------------------- search end to end


def test_search_over_eight_history_layers_of_darec_lets_bo_propose(isolated_run, tiny_dataset, fast_config):
    """DARec with 8 history layers (K = 2 positions per item): both adapters in each, 256 candidates, more than
    the random start, so BO proposes the trials after it."""
    config_dict = darec_config(tiny_dataset, fast_config, isolated_run, search="bo", search_n_init=3, search_n_iter=3,
                               sequence_layers=8, item_positions=2, whiten_dim=16,
                               llm_random_config={"hidden_size": 32, "num_hidden_layers": 9, "num_attention_heads": 2,
                                                  "ffn": 64})
    result = run_darec(model="DARec", dataset=TINY_DATASET, config_dict=config_dict)
    trials = TrialLog(search_paths(Config(model="DARec", dataset=TINY_DATASET, config_dict=config_dict),
                                   "bo").trial_log).read()
    assert [t.method for t in trials] == ["random"] * 3 + ["bo"] * 3
    assert all(len(t.arch) == 8 for t in trials) and len({t.arch for t in trials}) == 6
    assert len(result["adapter_arch"]) == 8


def test_search_bo_end_to_end_trains_the_best_architecture(isolated_run, tiny_dataset, fast_config):
    config_dict = darec_config(tiny_dataset, fast_config, isolated_run, search="bo")
    result = run_darec(model="DARecTokens", dataset=TINY_DATASET, config_dict=config_dict)

    paths = search_paths(Config(model="DARecTokens", dataset=TINY_DATASET, config_dict=config_dict), "bo")
    trials = TrialLog(paths.trial_log).read()
    assert len(trials) == 4 and [t.method for t in trials] == ["random", "random", "bo", "bo"]
    assert len({t.arch for t in trials}) == 4
    best = paths.best_arch.read_text().strip()
    assert best == max(trials, key=lambda t: t.value).arch == result["adapter_arch"]
    assert paths.plot.is_file() and paths.supernet.is_file()
    assert result["search"]["n_trials"] == 4 and result["search"]["method"] == "bo"
    assert describe_arch("sp") == "layer 0: serial, layer 1: parallel (sp)"

    assert_protocol_metrics(result["best_valid_result"])
    assert_protocol_metrics(result["test_result"])
    # The final model is saved with its architecture: in the pickled config, and as its adapters' weights.
    checkpoint = compat.load_trusted_checkpoint(result["saved_model_file"])
    assert checkpoint["config"]["adapter_arch"] == best and not checkpoint["config"]["supernet"]
    adapter_keys = [key for key in checkpoint["state_dict"] if key.startswith("adapters.")]
    for index, choice in enumerate(str_to_arch(best)):
        kept, dropped = ("serial", "parallel")[choice], ("serial", "parallel")[1 - choice]
        assert any(key.startswith(f"adapters.{index}.attention.{kept}.") for key in adapter_keys)
        assert not any(key.startswith(f"adapters.{index}.") and f".{dropped}." in key for key in adapter_keys)
    supernet_checkpoint = compat.load_trusted_checkpoint(paths.supernet)
    assert supernet_checkpoint["config"]["supernet"] is True and supernet_checkpoint["epoch"] == 0


def test_validation_subset_is_a_fixed_sample_of_validation_users(isolated_run, tiny_dataset, fast_config):
    config, _, valid_data = load(darec_config(tiny_dataset, fast_config, isolated_run))
    uid = valid_data._dataset.uid_field
    all_users = valid_data._dataset.inter_feat[uid].tolist()
    subset = validation_subset(valid_data, 7, seed=3)
    users = subset._dataset.inter_feat[uid].tolist()
    assert len(users) == 7 and set(users) <= set(all_users) and len(set(users)) == 7
    assert validation_subset(valid_data, 7, seed=3)._dataset.inter_feat[uid].tolist() == users  # same draw
    assert validation_subset(valid_data, None, seed=3) is valid_data
    assert validation_subset(valid_data, 10_000, seed=3) is valid_data
    batches = [batch for batch in subset]
    assert sum(len(batch[0]) for batch in batches) == 7  # a working full-sort loader
    with pytest.raises(ValueError, match="search_valid_users=-1"):
        validation_subset(valid_data, -1, seed=3)


def test_search_resumes_its_trial_log_and_reuses_the_supernet(isolated_run, tiny_dataset, fast_config, monkeypatch):
    scored: list[str] = []
    score = Supernet.score
    monkeypatch.setattr(
        Supernet, "score", lambda self, arch, data: scored.append(arch_to_str(arch)) or score(self, arch, data)
    )
    resumed: list[str] = []
    resume = trainer.Trainer.resume_checkpoint
    monkeypatch.setattr(
        trainer.Trainer, "resume_checkpoint", lambda self, path: resumed.append(path) or resume(self, path)
    )

    # A search stopped after 2 trials (budget 2 + 0), with a supernet trained 1 of 2 epochs...
    config, train_data, valid_data = load(darec_config(tiny_dataset, fast_config, isolated_run, search_n_iter=0))
    first_best, _ = search_architecture(config, "random", train_data, valid_data)
    paths = search_paths(config, "random")
    logged = paths.trial_log.read_text().splitlines()
    assert len(logged) == 2 and len(scored) == 2 and not resumed

    # ... continued with the full budget: the supernet training resumes at epoch 2, the log at trial 3.
    scored.clear()
    config["search_n_iter"], config["search_epochs"] = 2, 2
    best, result = search_architecture(config, "random", train_data, valid_data)
    assert resumed == [str(paths.supernet)]
    assert compat.load_trusted_checkpoint(paths.supernet)["epoch"] == 1
    assert paths.trial_log.read_text().splitlines()[:2] == logged
    assert len(result.trials) == 4 and len(scored) == 2
    assert scored == [t.arch for t in result.trials[2:]] and not set(scored) & {t.arch for t in result.trials[:2]}
    assert paths.best_arch.read_text().strip() == best

    # A complete log: nothing is trained or scored again.
    scored.clear()
    assert search_architecture(config, "random", train_data, valid_data)[0] == best and not scored


def test_search_flag_comes_from_the_command_line(isolated_run, tiny_dataset, fast_config, monkeypatch):
    # RecBole's Config eval()s command-line values: "random" must stay a string, not become a module.
    monkeypatch.setattr(sys, "argv", [sys.argv[0], "--search=random"])
    config = Config(
        model="DARecTokens", dataset=TINY_DATASET, config_dict=darec_config(tiny_dataset, fast_config, isolated_run)
    )
    assert config["search"] == "random"
    with pytest.raises(ValueError, match="--search=grid"):
        search_architecture(config, "grid", None, None)


# ---------------------------------------------------------------- run_hyper


def test_run_hyper_completes_two_trials_and_a_second_start_replays_them(isolated_run, tiny_dataset, fast_config,
                                                                        monkeypatch):
    output = isolated_run / "hyper.result"
    settings = darec_config(tiny_dataset, fast_config, isolated_run, adapter_arch="s")
    tune = dict(model="DARecTokens", dataset=TINY_DATASET, config_dict=settings, algo="bayes", max_evals=2,
                output_file=str(output))
    tuner = hyper_tune(str(ROOT / "hyper" / "darec.hyper"), **tune)
    assert len(tuner.params_list) == 2
    assert set(tuner.best_params) == {"learning_rate", "llm_learning_rate", "adapter_size", "lambda_align",
                                      "lambda_hard"}
    best = tuner.params2result[tuner.params2str(tuner.best_params)]
    assert best["model"] == "DARecTokens" and best["valid_score_bigger"] is True
    assert_protocol_metrics(best["test_result"])
    assert output.read_text().count("Test result:") == 2
    # Each trial trained in its own folder, with the resume checkpoint of its last epoch.
    trial_dirs = sorted((isolated_run / "hyper.trials").iterdir())
    assert len(trial_dirs) == 2 and all(list(d.glob("*-last.pth")) for d in trial_dirs)

    def must_not_train(*args, **kwargs):
        raise AssertionError("a logged trial was trained again")

    monkeypatch.setattr(hyper, "objective_function", must_not_train)
    again = hyper_tune(str(ROOT / "hyper" / "darec.hyper"), **tune)
    assert again.params_list == tuner.params_list and again.best_params == tuner.best_params


def fake_objective(calls: list):
    """A stand-in for a harness run: its score is a function of the trial's parameters."""
    def objective(config_dict, config_file_list, model=None, dataset=None):
        calls.append(dict(config_dict))
        score = config_dict.get("learning_rate", 0) * 100 + config_dict["adapter_size"]
        return {"model": model, "best_valid_score": score, "valid_score_bigger": True,
                "best_valid_result": {"ndcg@10": score}, "test_result": {"ndcg@10": score}}
    return objective


@pytest.mark.parametrize("algo", ["bayes", "random"])
def test_run_hyper_cut_off_goes_on_with_the_same_trials(isolated_run, tiny_dataset, fast_config, monkeypatch, algo):
    params = isolated_run / "space.hyper"
    params.write_text("learning_rate loguniform -9.21,-4.61\nadapter_size choice [8,16,32]\n")
    settings = darec_config(tiny_dataset, fast_config, isolated_run)
    tune = dict(model="DARec", dataset=TINY_DATASET, config_dict=settings, algo=algo, max_evals=5, early_stop=50)
    reference_calls: list = []
    monkeypatch.setattr(hyper, "objective_function", fake_objective(reference_calls))
    reference = hyper_tune(str(params), **tune, tuning_log=str(isolated_run / "reference.trials.jsonl"))

    # The same run, cut off after its second trial (the log keeps its first line and two trials), then started
    # again: it trains only the trials after those, the same ones as the uninterrupted run, in the same order.
    log = isolated_run / "cut.trials.jsonl"
    log.write_text("".join((isolated_run / "reference.trials.jsonl").read_text().splitlines(True)[:3]))
    calls: list = []
    monkeypatch.setattr(hyper, "objective_function", fake_objective(calls))
    resumed = hyper_tune(str(params), **tune, tuning_log=str(log))
    assert [c["learning_rate"] for c in calls] == [c["learning_rate"] for c in reference_calls[2:]]
    assert resumed.params_list == reference.params_list and resumed.best_params == reference.best_params
    assert len(log.read_text().splitlines()) == 1 + 5

    # A larger budget extends it: only the new trials train.
    calls.clear()
    hyper_tune(str(params), **{**tune, "max_evals": 7}, tuning_log=str(log))
    assert len(calls) == 2


def test_run_hyper_trial_cut_off_mid_training_resumes_from_its_checkpoint(isolated_run, tiny_dataset, fast_config,
                                                                          monkeypatch):
    params = isolated_run / "space.hyper"
    params.write_text("adapter_size choice [8,16]\n")
    settings = darec_config(tiny_dataset, fast_config, isolated_run)
    log = isolated_run / "grid.trials.jsonl"
    tune = dict(model="DARec", dataset=TINY_DATASET, config_dict=settings, algo="exhaustive",
                tuning_log=str(log))
    calls: list = []
    monkeypatch.setattr(hyper, "objective_function", fake_objective(calls))
    hyper_tune(str(params), **tune)
    first_dir = Path(calls[0]["checkpoint_dir"])
    assert calls[0]["resume"] is None and first_dir.parent == isolated_run / "grid.trials"

    # The first trial was cut off after an epoch: its log line is gone, its checkpoint is there.
    lines = log.read_text().splitlines(True)
    log.write_text(lines[0] + lines[2])
    first_dir.mkdir(parents=True, exist_ok=True)
    (first_dir / "DARec-Dec-07-2026_00-00-00-last.pth").write_bytes(b"")
    calls.clear()
    hyper_tune(str(params), **tune)
    assert len(calls) == 1 and calls[0]["resume"] == str(first_dir / "DARec-Dec-07-2026_00-00-00-last.pth")


def test_run_hyper_refuses_a_log_of_another_tuning_run(isolated_run, tiny_dataset, fast_config, monkeypatch):
    params = isolated_run / "space.hyper"
    params.write_text("adapter_size choice [8,16]\n")
    settings = darec_config(tiny_dataset, fast_config, isolated_run)
    log = isolated_run / "grid.trials.jsonl"
    monkeypatch.setattr(hyper, "objective_function", fake_objective([]))
    hyper_tune(str(params), model="DARec", dataset=TINY_DATASET, config_dict=settings, algo="exhaustive",
               tuning_log=str(log))
    with pytest.raises(ValueError, match=r"grid\.trials\.jsonl: .*another tuning run.*fixed"):
        hyper_tune(str(params), model="DARec", dataset=TINY_DATASET, config_dict={**settings, "rec_dim": 16},
                   algo="exhaustive", tuning_log=str(log))
    # A setting given on the command line (RecBole's Config reads it in every trial) counts as one of the run's.
    monkeypatch.setattr(sys, "argv", [sys.argv[0], "--rec_dim=16", "--max_evals=3"])
    with pytest.raises(ValueError, match=r"another tuning run.*fixed"):
        hyper_tune(str(params), model="DARec", dataset=TINY_DATASET, config_dict=settings, algo="exhaustive",
                   tuning_log=str(log))


def test_exhaustive_hyper_tuning_works_with_hyperopt_03(tmp_path):
    compat.fix_recbole_hyper_tuning()
    from recbole.trainer import HyperTuning

    params = tmp_path / "grid.hyper"
    params.write_text("adapter_size choice [8,16]\nlambda_hard choice [0.0,0.1]\n")
    seen = []

    def objective(config_dict, config_file_list):
        seen.append((config_dict["adapter_size"], config_dict["lambda_hard"]))
        score = config_dict["adapter_size"] + config_dict["lambda_hard"]
        return {
            "model": "X",
            "best_valid_score": score,
            "valid_score_bigger": True,
            "best_valid_result": {},
            "test_result": {},
        }

    tuner = HyperTuning(objective, algo="exhaustive", params_file=str(params))
    tuner.run()
    assert sorted(seen) == [(8, 0.0), (8, 0.1), (16, 0.0), (16, 0.1)]
    assert tuner.best_params == {"adapter_size": 16, "lambda_hard": 0.1}
