"""The harness: one Config / dataset / model / trainer pipeline for every model of this plugin and RecBole.

Real runs, offline, one epoch on tiny data: the tiny fixture of conftest.py, and ml-100k (shipped inside
RecBole) capped to the 79 users with 20-22 ratings.
"""

from __future__ import annotations

import ast
import importlib.machinery
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_protocol_metrics
from recbole.config import Config as RecBoleConfig
from recbole.model.sequential_recommender.sasrec import SASRec as RecBoleSASRec
from recbole.trainer import Trainer as RecBoleTrainer
from recbole.utils import FeatureType, ModelType, init_seed

from recbole_darec import compat, files, trainer
from recbole_darec.config import Config
from recbole_darec.data import create_dataset, load_data
from recbole_darec.quick_start import run_darec
from recbole_darec.utils import get_model, get_trainer

ROOT = Path(__file__).resolve().parents[1]
# ml-100k capped: users with 20-22 ratings (79 users, 1,650 interactions) keep one epoch to seconds here.
ML100K_CAP = {"user_inter_num_interval": "[20,22]", "MAX_ITEM_LIST_LENGTH": 20}
TORCH_WEIGHTS_ONLY_DEFAULT = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 6)


def tiny_config(tiny_dataset: tuple[str, str], fast_config: dict, **overrides) -> dict:
    data_path, _ = tiny_dataset
    return {**fast_config, "data_path": data_path, **overrides}


def checkpoint_files(folder: Path) -> list[str]:
    return sorted(os.listdir(folder)) if folder.is_dir() else []


# ---------------------------------------------------------------- runs


def test_sasrec_one_epoch_on_tiny_fixture(isolated_run, tiny_dataset, fast_config):
    # Also load the item titles (token_seq): RecBole's text-field parsing is what pandas 3 breaks.
    config = tiny_config(
        tiny_dataset, fast_config, load_col={"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "title"]}
    )
    result = run_darec(model="SASRec", dataset=tiny_dataset[1], config_dict=config)

    assert (result["model"], result["dataset"]) == ("SASRec", "tiny-seq")
    assert_protocol_metrics(result["best_valid_result"])
    assert_protocol_metrics(result["test_result"])
    # valid_metric: NDCG@10 (properties/overall.yaml) is what selects the best epoch.
    assert result["best_valid_score"] == result["best_valid_result"]["ndcg@10"]
    assert result["valid_score_bigger"] is True
    saved = Path(result["saved_model_file"])
    assert saved.parent == Path(fast_config["checkpoint_dir"]) and saved.is_file()
    # RecBole's relative outputs went to the test's own folder, not the repository.
    assert (isolated_run / "log" / "SASRec").is_dir()


def test_item_text_fields_load_as_token_sequences(isolated_run, tiny_dataset, fast_config):
    # pandas 3 (copy-on-write) breaks RecBole's token_seq parsing; the pandas<3 pin keeps this working.
    load_col = {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "title"]}
    config = Config(
        model="SASRec", dataset=tiny_dataset[1], config_dict=tiny_config(tiny_dataset, fast_config, load_col=load_col)
    )
    dataset = create_dataset(config)
    assert dataset.field2type["title"] == FeatureType.TOKEN_SEQ
    titles = dataset.item_feat.set_index("item_id")["title"]  # a pandas frame until data_preparation
    real_items = range(1, dataset.item_num)  # internal id 0 is padding
    # "item <i> model <j>": 4 tokens, remapped to ids > 0, for every item.
    assert all(len(titles[i]) == 4 and min(titles[i]) > 0 for i in real_items)
    assert len({tuple(titles[i]) for i in real_items}) == dataset.item_num - 1  # titles are distinct per item


def test_sasrec_one_epoch_on_ml100k_capped(isolated_run, fast_config):
    result = run_darec(model="SASRec", dataset="ml-100k", config_dict={**fast_config, **ML100K_CAP})

    assert (result["model"], result["dataset"]) == ("SASRec", "ml-100k")
    assert_protocol_metrics(result["best_valid_result"])
    assert_protocol_metrics(result["test_result"])


def test_ml100k_cap_really_caps(isolated_run, fast_config):
    # The cap is what keeps the ml-100k test short; if RecBole ignored it the test above would run ~10 min.
    config = Config(model="SASRec", dataset="ml-100k", config_dict={**fast_config, **ML100K_CAP})
    dataset = create_dataset(config)  # before data_preparation, which replaces rows by per-prefix samples
    assert dataset.user_num - 1 == 79  # minus RecBole's padding id 0
    assert dataset.inter_num == 1650


@pytest.mark.parametrize("model", ["GRU4Rec", "BERT4Rec"])
def test_other_recbole_sequential_models_run_in_the_same_harness(isolated_run, tiny_dataset, fast_config, model):
    result = run_darec(model=model, dataset=tiny_dataset[1], config_dict=tiny_config(tiny_dataset, fast_config))

    assert result["model"] == model
    assert_protocol_metrics(result["best_valid_result"])
    assert_protocol_metrics(result["test_result"])


def test_run_darec_script_prints_valid_and_test_metrics(tmp_path, tiny_dataset):
    data_path, name = tiny_dataset
    cmd = [
        sys.executable,
        str(ROOT / "run_darec.py"),
        "--model=SASRec",
        f"--dataset={name}",
        f"--data_path={data_path}",
        "--epochs=1",
        "--state=WARNING",
        f"--checkpoint_dir={tmp_path / 'saved'}",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # compat.py silences RecBole's pandas FutureWarning (chained fillna inplace), and only that one.
    assert "chained assignment" not in proc.stderr, proc.stderr[-3000:]

    printed = {}
    for line in proc.stdout.splitlines():
        for label in ("best valid", "test result"):
            if line.startswith(f"{label} (SASRec on {name}): "):
                printed[label] = ast.literal_eval(line.split(": ", 1)[1])
    assert set(printed) == {"best valid", "test result"}, proc.stdout
    assert_protocol_metrics(printed["best valid"])
    assert_protocol_metrics(printed["test result"])
    # --epochs=1 reached RecBole's Config from the command line: one best-model checkpoint and its resume file.
    files = checkpoint_files(tmp_path / "saved")
    assert len(files) == 2 and sum(name.endswith("-last.pth") for name in files) == 1, files


# ---------------------------------------------------------------- model and trainer lookup


@pytest.mark.parametrize("name", ["NoSuchRec", "sasrec"])
def test_unknown_model_names_where_it_looked(name):
    with pytest.raises(ValueError) as excinfo:
        get_model(name)
    message = str(excinfo.value)
    assert f"'{name}'" in message
    assert f"recbole_darec.model.{name.lower()}" in message
    assert f"recbole.model.sequential_recommender.{name.lower()}" in message
    assert f"recbole.model.general_recommender.{name.lower()}" in message


def test_unknown_model_fails_in_the_harness_before_any_work(isolated_run, tiny_dataset, fast_config):
    with pytest.raises(ValueError, match=r"looked in recbole_darec\.model\.nosuchrec, recbole\.model\."):
        run_darec(model="NoSuchRec", dataset=tiny_dataset[1], config_dict=tiny_config(tiny_dataset, fast_config))
    assert not (isolated_run / "log").exists()


def test_recbole_models_are_found_and_ours_come_first(monkeypatch):
    assert get_model("SASRec") is RecBoleSASRec

    class SASRec(RecBoleSASRec):  # a plugin model that shadows RecBole's of the same name
        pass

    module = types.ModuleType("recbole_darec.model.sasrec")
    module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
    module.SASRec = SASRec
    monkeypatch.setitem(sys.modules, module.__name__, module)
    assert get_model("SASRec") is SASRec


def test_trainer_lookup():
    # Ordinary models get our Trainer (trusted, atomic checkpoints); special ones keep RecBole's.
    assert get_trainer(ModelType.SEQUENTIAL, "SASRec") is trainer.Trainer
    assert get_trainer(ModelType.GENERAL, "BPR") is trainer.Trainer
    assert get_trainer(ModelType.KNOWLEDGE, "KGAT").__name__ == "KGATTrainer"
    assert get_trainer(ModelType.TRADITIONAL, "Pop").__name__ == "TraditionalTrainer"


# ---------------------------------------------------------------- compat


def test_numpy_aliases_and_config_build(isolated_run, tiny_dataset, fast_config):
    aliases = {"float_": np.float64, "complex_": np.complex128, "unicode_": np.str_, "bool8": np.bool_}
    for alias, target in aliases.items():
        assert getattr(np, alias) is target, alias
    config = Config(model="SASRec", dataset=tiny_dataset[1], config_dict=tiny_config(tiny_dataset, fast_config))
    assert config["model"] == "SASRec"
    assert config["device"] == torch.device("cpu") or torch.cuda.is_available()


def test_compat_is_what_makes_recbole_config_work(tmp_path):
    # Without recbole_darec, RecBole 1.2.1's Config dies on numpy 2 (np.float_); with it, it builds, and the
    # harness never pulls in recbole.quick_start (ray 2.6.3: pkg_resources, np.bool8).
    build = "from recbole.config import Config; Config(model='BPR', dataset='ml-100k'); print('built')"
    bare = subprocess.run([sys.executable, "-c", build], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    if np.lib.NumpyVersion(np.__version__) >= "2.0.0":
        assert bare.returncode != 0 and "float_" in bare.stderr, bare.stderr[-2000:]
    else:
        assert bare.returncode == 0, bare.stderr[-2000:]

    patched = (
        "import sys, recbole_darec, recbole_darec.quick_start, recbole_darec.trainer; "
        + build.replace("; print('built')", "")
        + "; print('built', any(m == 'ray' or m.startswith(('ray.', 'recbole.quick_start')) for m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", patched], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "built False"


def test_looking_up_a_model_leaves_autograd_anomaly_detection_off():
    # RecBole's sine.py turns anomaly detection on when recbole.model.sequential_recommender is imported (this
    # module imported it at collection); it would slow every later model and abort training on a NaN.
    import recbole.model.sequential_recommender.sine  # noqa: F401

    get_model("GRU4Rec")
    assert not torch.is_anomaly_enabled()


def _build(tiny_dataset, fast_config, model="SASRec"):
    config = Config(model=model, dataset=tiny_dataset[1], config_dict=tiny_config(tiny_dataset, fast_config))
    init_seed(config["seed"], config["reproducibility"])
    _, train_data, valid_data, test_data = load_data(config)
    model_obj = get_model(model)(config, train_data._dataset).to(config["device"])
    trainer_obj = get_trainer(config["MODEL_TYPE"], model)(config, model_obj)
    return config, trainer_obj, train_data, valid_data, test_data


def test_best_checkpoint_saved_by_fit_is_loaded_by_evaluate(isolated_run, tiny_dataset, fast_config):
    config, trainer_obj, train_data, valid_data, test_data = _build(tiny_dataset, fast_config)
    best_score, _ = trainer_obj.fit(train_data, valid_data, saved=True, show_progress=False)

    folder = Path(fast_config["checkpoint_dir"])
    best = os.path.basename(trainer_obj.saved_model_file)
    last = os.path.basename(trainer_obj.last_checkpoint_file)  # the resume checkpoint (issue 8)
    assert checkpoint_files(folder) == sorted([best, last])  # complete, no temp files
    checkpoint = compat.load_trusted_checkpoint(trainer_obj.saved_model_file)
    assert {"config", "epoch", "cur_step", "best_valid_score", "state_dict", "other_parameter", "optimizer"} <= set(
        checkpoint
    )
    assert checkpoint["epoch"] == 0 and checkpoint["best_valid_score"] == best_score
    best_state = {k: v.clone() for k, v in checkpoint["state_dict"].items()}
    expected = trainer_obj.evaluate(test_data, load_best_model=False)

    # Spoil the weights; evaluate(load_best_model=True) must bring back the saved best ones.
    with torch.no_grad():
        for param in trainer_obj.model.parameters():
            param.add_(1.0)
    assert not torch.equal(trainer_obj.model.state_dict()["item_embedding.weight"], best_state["item_embedding.weight"])
    result = trainer_obj.evaluate(test_data, load_best_model=True)
    for key, value in trainer_obj.model.state_dict().items():
        assert torch.equal(value, best_state[key]), key
    assert result == expected

    if TORCH_WEIGHTS_ONLY_DEFAULT:
        # What our trainer works around: RecBole's own evaluate cannot read its own checkpoint on torch>=2.6.
        with pytest.raises(pickle.UnpicklingError):
            RecBoleTrainer.evaluate(trainer_obj, test_data, load_best_model=True)

    # A fresh trainer resumes from the same checkpoint.
    resumed = get_trainer(config["MODEL_TYPE"], "SASRec")(config, get_model("SASRec")(config, train_data._dataset))
    resumed.resume_checkpoint(trainer_obj.saved_model_file)
    assert resumed.start_epoch == 1 and resumed.best_valid_score == best_score
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, best_state[key]), key


def test_atomic_save_failure_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "model.pth"
    files.atomic_torch_save({"epoch": 1, "w": torch.ones(3)}, str(path))
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        files.atomic_torch_save({"epoch": 2, "unpicklable": lambda: None}, str(path))
    assert os.listdir(tmp_path) == ["model.pth"]  # no partial or temp file left behind
    kept = compat.load_trusted_checkpoint(str(path))
    assert kept["epoch"] == 1 and torch.equal(kept["w"], torch.ones(3))


# ---------------------------------------------------------------- config layering


def test_plugin_protocol_reaches_the_final_config(isolated_run, tiny_dataset):
    data_path, name = tiny_dataset
    ours = Config(model="SASRec", dataset=name, config_dict={"data_path": data_path})
    # Plain RecBole 1.2.1 refuses SASRec's CE loss with its default negative sampling (design section 1).
    with pytest.raises(ValueError, match="train_neg_sample_args"):
        RecBoleConfig(model="SASRec", dataset=name, config_dict={"data_path": data_path})
    plain = RecBoleConfig(
        model="SASRec", dataset=name, config_dict={"data_path": data_path, "train_neg_sample_args": None}
    )

    assert ours["valid_metric"] == "NDCG@10" and plain["valid_metric"] != "NDCG@10"
    assert ours["topk"] == [10, 50] and plain["topk"] != [10, 50]
    assert ours["metrics"] == ["Recall", "NDCG", "MRR"] and plain["metrics"] != ours["metrics"]
    assert ours["eval_args"]["split"] == {"LS": "valid_and_test"}
    assert ours["eval_args"]["order"] == "TO"
    assert ours["eval_args"]["mode"] in ("full", {"valid": "full", "test": "full"})
    assert ours["MAX_ITEM_LIST_LENGTH"] == 50 and ours["loss_type"] == "CE"
    assert ours["train_neg_sample_args"]["distribution"] == "none"  # CE over all items: no sampled negatives
    # Order by time needs the time column, which RecBole's default load_col for unknown datasets omits.
    assert "timestamp" in ours["load_col"]["inter"] and "timestamp" not in plain["load_col"]["inter"]


def test_general_model_keeps_negative_sampling(isolated_run, tiny_dataset):
    data_path, name = tiny_dataset
    config = Config(model="BPR", dataset=name, config_dict={"data_path": data_path})
    assert config["MODEL_TYPE"] == ModelType.GENERAL
    assert config["train_neg_sample_args"]["distribution"] == "uniform"
    assert config["train_neg_sample_args"]["sample_num"] == 1
    assert config["loss_type"] != "CE"  # sequential.yaml applies to sequential models only
    assert config["valid_metric"] == "NDCG@10"  # overall.yaml applies to every model


def test_recbole_model_yaml_beats_our_sequential_defaults(isolated_run, tiny_dataset):
    # FPMC supports only BPR; sequential.yaml's loss_type: CE must not override the model's own choice.
    data_path, name = tiny_dataset
    assert Config(model="FPMC", dataset=name, config_dict={"data_path": data_path})["loss_type"] == "BPR"


def test_dataset_properties_layer(isolated_run):
    config = Config(model="SASRec", dataset="amazon-arts")  # builds without the data: nothing is loaded here
    assert config["load_col"] == {"inter": ["user_id", "item_id", "timestamp"]}
    assert "load_col" in config.parameters["Dataset"]


def test_overrides_win_config_file_then_dict_then_command_line(isolated_run, tiny_dataset, monkeypatch):
    data_path, name = tiny_dataset
    config_file = isolated_run / "override.yaml"
    config_file.write_text("valid_metric: Recall@10\ntopk: [5, 20]\nMAX_ITEM_LIST_LENGTH: 20\n", encoding="utf-8")

    files = [str(config_file)]
    from_file = Config(model="SASRec", dataset=name, config_file_list=files, config_dict={"data_path": data_path})
    assert from_file["valid_metric"] == "Recall@10"
    assert (from_file["topk"], from_file["MAX_ITEM_LIST_LENGTH"]) == ([5, 20], 20)

    from_dict = Config(
        model="SASRec",
        dataset=name,
        config_file_list=[str(config_file)],
        config_dict={"data_path": data_path, "valid_metric": "MRR@10"},
    )
    assert (from_dict["valid_metric"], from_dict["topk"]) == ("MRR@10", [5, 20])

    monkeypatch.setattr(sys, "argv", [sys.argv[0], "--valid_metric=NDCG@20", "--topk=[20]"])
    from_cmd = Config(
        model="SASRec",
        dataset=name,
        config_file_list=[str(config_file)],
        config_dict={"data_path": data_path, "valid_metric": "MRR@10"},
    )
    assert (from_cmd["valid_metric"], from_cmd["topk"]) == ("NDCG@20", [20])

    # "~" (the yaml files' spelling of no value) and "null" are None on the command line too.
    monkeypatch.setattr(sys, "argv", [sys.argv[0], "--llm_layers=~", "--item_text_fields=null"])
    from_cmd = Config(model="SASRec", dataset=name, config_file_list=files, config_dict={"data_path": data_path})
    assert from_cmd["llm_layers"] is None and from_cmd["item_text_fields"] is None


# ---------------------------------------------------------------- one harness for every RecBole model type


def write_knowledge_files(data_path: str, name: str) -> None:
    """A tiny knowledge graph for the fixture: each item linked to an entity with a category and a brand."""
    folder = Path(data_path) / name
    link = ["item_id:token\tentity_id:token"] + [f"i{i:03d}\te{i:03d}" for i in range(60)]
    kg = ["head_id:token\trelation_id:token\ttail_id:token"]
    kg += [f"e{i:03d}\tcategory\tc{i % 5}" for i in range(60)] + [f"e{i:03d}\tbrand\tb{i % 3}" for i in range(60)]
    (folder / f"{name}.link").write_text("\n".join(link) + "\n", encoding="utf-8")
    (folder / f"{name}.kg").write_text("\n".join(kg) + "\n", encoding="utf-8")


# One model of each RecBole model type. The traditional and knowledge-aware ones train with RecBole's own
# special trainers, which loaded the best checkpoint with torch's weights-only default and crashed at the test.
@pytest.mark.parametrize("model", ["BPR", "SASRec", "Pop", "ItemKNN", "CKE"])
def test_every_recbole_model_type_reaches_the_test_metrics(isolated_run, tiny_dataset, fast_config, model):
    config = tiny_config(tiny_dataset, fast_config)
    if model == "CKE":
        write_knowledge_files(*tiny_dataset)
        # RecBole's knowledge-aware yamls load a rating column that the fixture does not have.
        config["load_col"] = {"inter": ["user_id", "item_id", "timestamp"], "kg": ["head_id", "relation_id", "tail_id"],
                              "link": ["item_id", "entity_id"]}
    result = run_darec(model=model, dataset=tiny_dataset[1], config_dict=config)

    assert result["model"] == model
    assert_protocol_metrics(result["test_result"])


def test_context_aware_model_is_refused_before_any_work_with_what_to_do(isolated_run, tiny_dataset, fast_config):
    with pytest.raises(ValueError, match="context-aware.*eval_args.mode: labeled"):
        run_darec(model="FM", dataset=tiny_dataset[1], config_dict=tiny_config(tiny_dataset, fast_config))
