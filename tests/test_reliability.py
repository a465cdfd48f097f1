"""Issue 8: resume after an interruption, atomic checkpoints, recommendations from a saved model, bad input.

Tiny random backbone (one layer, 32 wide), one torch thread: each training run takes about a second.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from darec_testing import build, clone_state, darec_settings, trainer_for, write_text_dataset

from recbole_darec.compat import load_trusted_checkpoint
from recbole_darec.config import Config
from recbole_darec.data import load_data
from recbole_darec.data.item_text import read_item_sentences, tokenize_items
from recbole_darec.errors import user_error_message
from recbole_darec.model.adapters import parse_adapter_arch
from recbole_darec.quick_start import run_darec
from recbole_darec.recommend import Recommender, UnknownItemError, format_table, recommend
from recbole_darec.trainer import CheckpointMismatchError

REPO = Path(__file__).resolve().parents[1]
ONE_LAYER = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "ffn": 64}


# RecBole's Trainer writes ./log_tensorboard and its Config reads sys.argv (pytest's own flags): every test runs
# in its tmp_path with a clean command line (conftest's isolated_run), on one torch thread.
pytestmark = pytest.mark.usefixtures("one_thread", "isolated_run")



def settings(tmp_path: Path, text_data, checkpoint_dir: str = "saved", **overrides) -> dict:
    data_path, _ = text_data
    # adapter_dropout > 0: the torch RNG state matters for resume; the loader shuffles (its generator matters).
    base = dict(llm_random_config=dict(ONE_LAYER), adapter_dropout=0.1, checkpoint_dir=str(tmp_path / checkpoint_dir))
    base.update(overrides)
    return darec_settings(tmp_path, data_path, **base)


def train(tmp_path, text_data, checkpoint_dir, resume=None, stop_after=None, **overrides):
    """One run in fresh objects (as a new process would build them); ``stop_after``: interrupt after that epoch."""
    _, name = text_data
    config, model, train_data, valid_data, test_data = build("DARecTokens", name, settings(
        tmp_path, text_data, checkpoint_dir, **overrides))
    trainer = trainer_for(config, model)
    if resume:
        trainer.resume_checkpoint(resume)

    def interrupt(epoch_idx, _score):
        if epoch_idx == stop_after:
            raise KeyboardInterrupt  # as a Ctrl-C right after the epoch's checkpoints were written

    try:
        best_score, best_valid = trainer.fit(train_data, valid_data, saved=True, callback_fn=interrupt)
    except KeyboardInterrupt:
        return trainer, None
    test = trainer.evaluate(test_data, load_best_model=True)
    return trainer, {"best_valid_score": best_score, "best_valid": dict(best_valid), "test": dict(test),
                     "train_loss": dict(trainer.train_loss_dict), "state": clone_state(model)}


# ----- 1. resume ---------------------------------------------------------------------------------------------
def test_resume_from_last_checkpoint_matches_uninterrupted_run(tmp_path, text_data):
    _, full = train(tmp_path, text_data, "full", epochs=2)

    interrupted, none = train(tmp_path, text_data, "resumed", epochs=2, stop_after=0)
    assert none is None
    last = interrupted.last_checkpoint_file
    assert last.endswith("-last.pth") and os.path.isfile(last)
    saved = load_trusted_checkpoint(last)
    assert saved["epoch"] == 0 and {"rng", "train_generator", "best_valid_result", "train_loss_dict",
                                    "model_training_state"} <= set(saved)

    resumed_trainer, resumed = train(tmp_path, text_data, "resumed", resume=last, epochs=2)
    assert resumed_trainer.start_epoch == 1
    assert resumed["best_valid"] == full["best_valid"]
    assert resumed["test"] == full["test"]
    assert resumed["best_valid_score"] == full["best_valid_score"]
    assert resumed["train_loss"] == full["train_loss"]
    assert resumed["state"].keys() == full["state"].keys()
    for key, value in full["state"].items():
        assert torch.equal(resumed["state"][key], value), key


def test_two_runs_started_in_the_same_second_keep_their_own_checkpoints(tmp_path, text_data, monkeypatch):
    # Two benchmark rows (seeds) started side by side used to get one checkpoint name from RecBole's clock and
    # both tested the weights the other had saved last.
    import recbole.trainer.trainer as recbole_trainer

    monkeypatch.setattr(recbole_trainer, "get_local_time", lambda: "Dec-03-2026_12-06-31")
    _, name = text_data
    config, model, *_ = build("DARecTokens", name, settings(tmp_path, text_data))
    names = []
    for pid in (1001, 1002):  # two processes
        monkeypatch.setattr(os, "getpid", lambda pid=pid: pid)
        names.append(trainer_for(config, model).saved_model_file)
    assert names[0] != names[1]
    assert all(Path(name).match("DARecTokens-Dec-03-2026_12-06-31-*.pth") for name in names)  # resume's glob finds it


def test_checkpoint_write_is_atomic(tmp_path, text_data, monkeypatch):
    trainer, result = train(tmp_path, text_data, "saved", epochs=1)
    last = trainer.last_checkpoint_file
    before = Path(last).read_bytes()

    def crash(src, dst):  # the process dies after the temp file is written, before the rename
        raise OSError("simulated crash between write and rename")

    monkeypatch.setattr(os, "replace", crash)
    trainer.train_loss_dict[7] = 1.0
    with pytest.raises(OSError, match="simulated crash"):
        trainer._save_resume_checkpoint(7)
    with pytest.raises(OSError, match="simulated crash"):
        trainer._save_checkpoint(7)
    monkeypatch.undo()

    assert Path(last).read_bytes() == before
    assert load_trusted_checkpoint(last)["epoch"] == 0
    assert load_trusted_checkpoint(trainer.saved_model_file)["epoch"] == 0
    assert not [p for p in os.listdir(os.path.dirname(last)) if ".tmp-" in p]  # no temp file left behind


def test_resume_refuses_checkpoint_of_other_dataset(tmp_path, text_data):
    trainer, _ = train(tmp_path, text_data, "saved", epochs=1)
    other = write_text_dataset(tmp_path / "dataset", name="tiny-other")
    config, model, *_ = build("DARecTokens", other[1], settings(tmp_path, other, "other"))
    with pytest.raises(CheckpointMismatchError, match="dataset='tiny-text'.*--dataset=tiny-text"):
        trainer_for(config, model).resume_checkpoint(trainer.last_checkpoint_file)


def test_resume_refuses_checkpoint_of_other_backbone(tmp_path, text_data):
    trainer, _ = train(tmp_path, text_data, "saved", epochs=1)
    _, name = text_data
    config, model, *_ = build("DARecTokens", name, settings(tmp_path, text_data, "other", llm_path="random:opt"))
    with pytest.raises(CheckpointMismatchError, match="llm_path='random:llama'"):
        trainer_for(config, model).resume_checkpoint(trainer.saved_model_file)


def test_resume_of_a_finished_run_trains_nothing_and_keeps_the_best_checkpoint(tmp_path, text_data):
    trainer, _ = train(tmp_path, text_data, "saved", epochs=2)
    best_before = Path(trainer.saved_model_file).read_bytes()
    # Early stopping had fired (cur_step > stopping_step): a resume must not train on past the stop.
    last = trainer.last_checkpoint_file
    stopped = load_trusted_checkpoint(last)
    assert stopped["epoch"] == 1
    again, _ = train(tmp_path, text_data, "saved", resume=last, epochs=2)  # all epochs done
    assert set(again.train_loss_dict) == {0, 1}
    stopped["cur_step"] = 99
    torch.save(stopped, last)
    again, _ = train(tmp_path, text_data, "saved", resume=last, epochs=5)  # early stopping had fired
    assert set(again.train_loss_dict) == {0, 1}
    assert Path(trainer.saved_model_file).read_bytes() == best_before


# ----- 2. recommend ------------------------------------------------------------------------------------------
@pytest.fixture
def trained_checkpoint(tmp_path, text_data) -> str:
    trainer, _ = train(tmp_path, text_data, "saved", epochs=1, adapter_dropout=0.0)
    return trainer.saved_model_file


def test_recommend_function_and_cli(trained_checkpoint, tmp_path):
    recommender = Recommender(trained_checkpoint)
    history = ["i003", "i004", "i005"]
    rows = recommender.recommend(history, topk=5)
    assert len(rows) == 5
    assert all(isinstance(t, str) and isinstance(s, str) and isinstance(v, float) for t, s, v in rows)
    assert [v for *_, v in rows] == sorted((v for *_, v in rows), reverse=True)
    assert rows[0][1] == f"{int(rows[0][0][1:])}c{int(rows[0][0][1:]) % 5}"  # the item's text from the .item file
    excluded = recommender.recommend(history, topk=60, exclude_history=True)
    assert not {t for t, *_ in excluded} & set(history)
    assert len(excluded) == 60 - len(history)
    # The one-call API gives the same ranking as the reusable object.
    assert recommend(trained_checkpoint, history, topk=5) == rows
    assert "rank" in format_table(rows).splitlines()[0]

    with pytest.raises(UnknownItemError, match="i999, nope"):
        recommender.recommend(["i003", "i999", "nope"])
    # A setting replaced at load (benchmarks/evaluate_checkpoint.py --set): the model is built with it.
    assert recommender.model.llm_bf16 is False  # the checkpoint's own setting (the tests' float32)
    assert Recommender(trained_checkpoint, {"llm_bf16": True}).model.llm_bf16 is True

    cli = [sys.executable, "-m", "recbole_darec.recommend", f"--checkpoint={trained_checkpoint}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([*cli, "--history=i003,i004,i005", "--topk=3"], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["rank", "item", "score"] and len(lines) == 4
    assert lines[1].split()[1] == rows[0][0]
    bad = subprocess.run([*cli, "--history=i003,i999"], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=300)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    error_lines = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "i999" in error_lines[0], bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == error_lines[0]


# ----- 3. bad input --------------------------------------------------------------------------------------------
def _config(tmp_path, text_data, **overrides):
    return Config(model="DARecTokens", dataset=text_data[1], config_dict=settings(tmp_path, text_data, **overrides))


def _model_error(tmp_path, text_data, **overrides) -> str:
    _, name = text_data
    with pytest.raises(ValueError) as info:
        build("DARecTokens", name, settings(tmp_path, text_data, **overrides))
    message = str(info.value)
    assert "\n" not in message and user_error_message(info.value) == f"error: {message}"
    return message


def test_llm_layers_larger_than_backbone(tmp_path, text_data):
    assert "llm_layers=3" in _model_error(tmp_path, text_data, llm_layers=3)


@pytest.mark.parametrize("arch, expected", [("sps", "'sps'.*2 layers"), ("sx", "'sx'.*s \\(serial\\) or p")])
def test_bad_adapter_arch(arch, expected):
    with pytest.raises(ValueError, match=expected) as info:
        parse_adapter_arch(arch, 2)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("key, value", [("learning_rate", 0), ("learning_rate", -0.1), ("train_batch_size", 0),
                                        ("adapter_size", -4), ("llm_learning_rate", 0)])
def test_non_positive_settings(tmp_path, text_data, key, value):
    message = _model_error(tmp_path, text_data, **{key: value})
    assert f"{key}={value}" in message and "must be" in message


def test_unknown_model_and_cf_model(tmp_path, text_data):
    with pytest.raises(ValueError, match="Unknown model 'DaRec'"):
        Config(model="DaRec", dataset=text_data[1], config_dict=settings(tmp_path, text_data))
    assert "cf_model='XYZ'" in _model_error(tmp_path, text_data, cf_model="XYZ")


def test_missing_dataset_folder_and_file(tmp_path, text_data):
    config = Config(model="DARecTokens", dataset=text_data[1], config_dict={
        **settings(tmp_path, text_data), "data_path": str(tmp_path / "nowhere")})
    with pytest.raises(FileNotFoundError, match="dataset folder not found.*nowhere.*dataset/README.md"):
        load_data(config)
    os.remove(tmp_path / "dataset" / text_data[1] / f"{text_data[1]}.inter")
    with pytest.raises(FileNotFoundError, match=r"file not found: .*tiny-text\.inter"):
        load_data(_config(tmp_path, text_data))


def test_run_darec_cli_prints_one_line_without_traceback(tmp_path, text_data):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / "run_darec.py"), "--model=DARecTokens", "--dataset=missing-set",
                           f"--data_path={tmp_path / 'dataset'}", "--llm_path=random:llama"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: dataset folder not found")


def test_item_file_bad_rows_warn_with_counts(tmp_path, caplog):
    item_file = tmp_path / "bad.item"
    item_file.write_bytes(
        b"item_id:token\ttitle:token_seq\n"
        b"i1\tgood title\n"
        b"i2\tbad \xff\xfe bytes\n"  # not UTF-8
        b"i3\n"  # missing text
        b"i4\ttitle\twith\ttabs\n"  # extra tab-separated cells
        b"i1\tduplicate\n"
        b"i5\tNaN\n"  # a pandas export of a missing value
        b'i6\t12" "ruler\n'  # quotes are text
    )
    with caplog.at_level(logging.WARNING):
        sentences = read_item_sentences(str(item_file), "item_id", with_keys=True)
    assert sentences["i1"] == "title: good title" and sentences["i6"] == 'title: 12" "ruler'
    assert "bad" in sentences["i2"] and sentences["i3"] == sentences["i5"] == "" and sentences["i4"] == "title: title"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert read_item_sentences(str(item_file), "item_id")["i1"] == "good title"  # the compact default
    assert "1 row(s) non-UTF-8" in warnings[0] and "2 row(s) wrong column count" in warnings[0]
    assert "1 row(s) duplicate item rows" in warnings[0] and str(item_file) in warnings[0]
    assert "2 row(s) with no text (empty or NaN)" in warnings[0]


def test_over_long_item_text_is_truncated_with_one_warning(caplog):
    def tokenize(texts):
        return [list(range(1, len(text) + 1)) for text in texts]

    with caplog.at_level(logging.WARNING):
        token_ids, lengths = tokenize_items(["", "abc", "x" * 50, "y" * 9], tokenize, item_max_tokens=8)
    assert lengths.tolist() == [0, 3, 8, 8] and token_ids[2].tolist() == list(range(1, 9))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["2 of 4 item sentences were truncated to item_max_tokens=8 tokens (raise item_max_tokens "
                        "to keep more of each item's text)."]


def test_item_file_without_id_column_is_an_error(tmp_path):
    item_file = tmp_path / "noid.item"
    item_file.write_text("title:token_seq\nx\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 1: no 'item_id' column"):
        read_item_sentences(str(item_file), "item_id")


def test_run_darec_uses_resume_setting(tmp_path, text_data):
    trainer, _ = train(tmp_path, text_data, "saved", epochs=1)
    result = run_darec("DARecTokens", text_data[1], config_dict={
        **settings(tmp_path, text_data, "saved"), "epochs": 2, "resume": trainer.last_checkpoint_file})
    assert set(result["best_valid_result"]) and result["saved_model_file"] == trainer.saved_model_file


# ----- bad .inter files and filters ----------------------------------------------------------------------------
def _inter(text_data) -> Path:
    return Path(text_data[0]) / text_data[1] / f"{text_data[1]}.inter"


def _item(text_data) -> Path:
    return Path(text_data[0]) / text_data[1] / f"{text_data[1]}.item"


def _rewrite(path: Path, edit) -> Path:
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(edit(lines)) + "\n", encoding="utf-8")
    return path


def _rewrite_inter(text_data, edit) -> Path:
    return _rewrite(_inter(text_data), edit)


def _load_error(tmp_path, text_data, **overrides) -> str:
    with pytest.raises(ValueError) as info:
        load_data(_config(tmp_path, text_data, **overrides))
    message = str(info.value)
    assert "\n" not in message and user_error_message(info.value) == f"error: {message}"
    return message


def test_inter_without_timestamp_column(tmp_path, text_data):
    inter_file = _rewrite_inter(text_data, lambda lines: ["\t".join(line.split("\t")[:2]) for line in lines])
    message = _load_error(tmp_path, text_data)
    assert f"{inter_file}, line 1: no 'timestamp' column (needed by TIME_FIELD)" in message


def test_inter_without_item_column(tmp_path, text_data):
    _rewrite_inter(text_data, lambda lines: [line.replace("item_id:token", "product:token") for line in lines])
    assert "line 1: no 'item_id' column (needed by ITEM_ID_FIELD)" in _load_error(tmp_path, text_data)


def test_inter_with_non_numeric_timestamp(tmp_path, text_data):
    def edit(lines):
        user, item, _ = lines[4].split("\t")
        lines[4] = f"{user}\t{item}\tyesterday"
        return lines

    inter_file = _rewrite_inter(text_data, edit)
    message = _load_error(tmp_path, text_data)
    assert f"{inter_file}, line 5: 'timestamp' is 'yesterday', not a number" in message


def test_inter_with_only_a_header(tmp_path, text_data):
    _rewrite_inter(text_data, lambda lines: lines[:1])
    assert "has no interactions (only the header line)" in _load_error(tmp_path, text_data)


def test_empty_dataset_after_filtering(tmp_path, text_data):
    message = _load_error(tmp_path, text_data, user_inter_num_interval="[1000,inf)")
    assert "empty after filtering" in message and "user_inter_num_interval='[1000,inf)'" in message


def test_users_with_fewer_than_two_interactions_warn_with_the_count(tmp_path, text_data, caplog):
    _rewrite_inter(text_data, lambda lines: [*lines, "lonely1\ti001\t5", "lonely2\ti002\t6"])
    with caplog.at_level(logging.WARNING):
        dataset, train_data, _, test_data = load_data(_config(tmp_path, text_data))
    warnings = [r.getMessage() for r in caplog.records if "fewer than 2 interactions" in r.getMessage()]
    assert len(warnings) == 1 and "2 of 32 users" in warnings[0]
    lonely = {dataset.token2id(dataset.uid_field, name) for name in ("lonely1", "lonely2")}
    for data in (train_data, test_data):
        assert not lonely & set(data._dataset.inter_feat[dataset.uid_field].tolist())


def test_only_users_with_fewer_than_two_interactions_is_an_error(tmp_path, text_data):
    _rewrite_inter(text_data, lambda lines: [lines[0]] + [f"u{n}\ti00{n % 5}\t{n}" for n in range(5)])
    assert "every user" in _load_error(tmp_path, text_data)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


BAD_INPUTS = {
    "no timestamp column": ({}, lambda lines: ["\t".join(line.split("\t")[:2]) for line in lines]),
    "non-numeric timestamp": ({}, lambda lines: [*lines[:3], lines[3].rsplit("\t", 1)[0] + "\tsoon", *lines[4:]]),
    "empty after filtering": ({"user_inter_num_interval": "[1000,inf)"}, None),
    "zero learning rate": ({"learning_rate": 0}, None),
    "unknown cf_model": ({"cf_model": "XYZ"}, None),
    "llm_layers too large": ({"llm_layers": 5}, None),
    "adapter_arch wrong length": ({"adapter_arch": "sps"}, None),
    "checkpoint of another backbone": ({"resume": "OTHER"}, None),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_loses_no_checkpoint_and_no_prepared_data(tmp_path, text_data, case):
    """A run with bad input stops with one line and leaves every checkpoint and data file as it was."""
    overrides, edit = BAD_INPUTS[case]
    trainer, _ = train(tmp_path, text_data, "saved", epochs=1)  # a previous run's checkpoints
    if overrides.get("resume") == "OTHER":
        overrides = {"resume": trainer.last_checkpoint_file, "llm_path": "random:opt"}
    if edit is not None:
        _rewrite_inter(text_data, edit)
    data_folder = Path(text_data[0])
    before = {"saved": _snapshot(tmp_path / "saved"), "data": _snapshot(data_folder)}
    assert before["saved"] and before["data"]
    with pytest.raises(ValueError) as info:
        run_darec("DARecTokens", text_data[1],
                  config_dict=settings(tmp_path, text_data, "saved", epochs=2, **overrides))
    assert "\n" not in str(info.value) and user_error_message(info.value)
    assert _snapshot(tmp_path / "saved") == before["saved"]
    assert _snapshot(data_folder) == before["data"]


# ----- more bad input (issue 14): each stops with one line and loses nothing --------------------------------------
def _with_time(value: str):
    def edit(lines):
        user, item, _ = lines[4].split("\t")
        return [*lines[:4], f"{user}\t{item}\t{value}", *lines[5:]]

    return edit


def _run(tmp_path, text_data, config_file_list=None, **overrides):
    """A second run of the earlier one's settings (same checkpoint folder), with ``overrides``."""
    return lambda: run_darec("DARecTokens", text_data[1], config_file_list=config_file_list,
                             config_dict=settings(tmp_path, text_data, "saved", epochs=2, **overrides))


def _edited(path_of, edit):
    """Set-up of a case whose bad input is an edit of a data file, then the same run again."""
    def set_up(tmp_path, text_data, trainer):
        _rewrite(path_of(text_data), edit)
        return _run(tmp_path, text_data)

    return set_up


def _empty_item_file(tmp_path, text_data, trainer):
    _item(text_data).write_text("", encoding="utf-8")
    return _run(tmp_path, text_data)


def _truncated_checkpoint(tmp_path, text_data, trainer):
    broken = tmp_path / "copied-halfway.pth"
    data = Path(trainer.last_checkpoint_file).read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    return _run(tmp_path, text_data, resume=str(broken))


def _not_a_checkpoint(tmp_path, text_data, trainer):
    notes = tmp_path / "notes.pth"
    notes.write_text("not a checkpoint\n", encoding="utf-8")
    return _run(tmp_path, text_data, resume=str(notes))


def _cf_checkpoint_of_another_dataset(tmp_path, text_data, trainer):
    other = tmp_path / "BPR-of-ml-100k.pth"
    torch.save({"state_dict": {}, "config": {"model": "BPR", "dataset": "ml-100k"}}, other)
    return _run(tmp_path, text_data, cf_model="BPR", cf_checkpoint=str(other))


def _config_file_with_a_syntax_error(tmp_path, text_data, trainer):
    bad = tmp_path / "mine.yaml"
    bad.write_text("epochs: 2\nlearning_rate: 0.01\nadapter_arch: [s, p\nseed: 1\n", encoding="utf-8")
    return _run(tmp_path, text_data, config_file_list=[str(bad)])


def _dataset_folder_that_is_a_file(tmp_path, text_data, trainer):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / text_data[1]).write_text("user_id:token\titem_id:token\n", encoding="utf-8")
    return _run(tmp_path, (str(elsewhere), text_data[1]))


def _history(*items):
    return lambda tmp_path, text_data, trainer: lambda: recommend(trainer.saved_model_file, list(items))


MORE_BAD_INPUTS = {
    # case: (set up the bad input and return the call that must fail, words the one-line message must hold)
    "duplicate .inter header names": (
        _edited(_inter, lambda lines: [lines[0].replace("timestamp:float", "item_id:float"), *lines[1:]]),
        ["line 1", "names item_id more than once"]),
    "NaN timestamp": (_edited(_inter, _with_time("nan")), ["line 5", "'timestamp' is 'nan'", "non-negative"]),
    "negative timestamp": (_edited(_inter, _with_time("-3")), ["line 5", "'timestamp' is '-3'", "non-negative"]),
    "empty .item file": (_empty_item_file, [".item is empty", "remove the file"]),
    ".item with another id column name": (
        _edited(_item, lambda lines: [lines[0].replace("item_id:token", "product_id:token"), *lines[1:]]),
        [".item, line 1: no 'item_id' column (needed by ITEM_ID_FIELD)"]),
    "truncated --resume file": (_truncated_checkpoint, ["copied-halfway.pth: not a readable checkpoint", "truncated"]),
    "--resume file that is not a checkpoint": (_not_a_checkpoint, ["notes.pth: not a readable checkpoint"]),
    "cf_checkpoint of another dataset": (_cf_checkpoint_of_another_dataset,
                                         ["was trained on dataset 'ml-100k'", "--model=BPR --dataset=tiny-text"]),
    "config file with a yaml syntax error": (_config_file_with_a_syntax_error, ["mine.yaml, line 4: not valid yaml"]),
    "unknown setting close to a real one": (
        lambda tmp_path, text_data, trainer: _run(tmp_path, text_data, lerning_rate=0.01),
        ["unknown setting 'lerning_rate'", "did you mean 'learning_rate'?"]),
    "dataset folder that is a file": (_dataset_folder_that_is_a_file, ["is a file, not a dataset folder"]),
    "--history with a repeated id": (_history("i001", "i002", "i001"), ["names i001 more than once"]),
    "--history with a padding id": (_history("i001", "[PAD]"), ["padding id"]),
}


@pytest.mark.parametrize("case", list(MORE_BAD_INPUTS))
def test_more_bad_input_stops_with_one_line_and_loses_nothing(tmp_path, text_data, case):
    set_up, expected = MORE_BAD_INPUTS[case]
    trainer, _ = train(tmp_path, text_data, "saved", epochs=1)  # a previous run's checkpoints and item caches
    call = set_up(tmp_path, text_data, trainer)
    data_folder = Path(text_data[0])
    before = {"saved": _snapshot(tmp_path / "saved"), "data": _snapshot(data_folder)}
    assert before["saved"] and before["data"]
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        call()
    message = user_error_message(info.value)
    assert message is not None and "\n" not in message, message
    for words in expected:
        assert words in message, message
    assert _snapshot(tmp_path / "saved") == before["saved"]
    assert _snapshot(data_folder) == before["data"]
