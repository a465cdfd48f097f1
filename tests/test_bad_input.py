"""Issue 41: every bad input to an entry point (run_darec.py, run_hyper.py, recommend, prepare) stops with one line
that names the file and line or the setting, exit code 2 and no traceback; nonsense settings are refused before
anything trains, and nothing written before is touched.

The scripts run in this process through ``run_cli`` (what their ``__main__`` does), with the tiny random backbone:
a case costs a Config, or at most one data load and model build.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import logging
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from darec_testing import DAREC_TEST_FIXTURES, build, darec_settings, trainer_for, write_text_dataset

from recbole_darec import recommend
from recbole_darec.config import RANGES_FILE, Config, every_setting_name
from recbole_darec.data import load_data
from recbole_darec.data.item_text import read_item_sentences
from recbole_darec.errors import run_cli
from recbole_darec.validation import Rule, load_rules

REPO = Path(__file__).resolve().parents[1]
pytestmark = DAREC_TEST_FIXTURES


def _script(name: str):
    """A script of the repository (run_darec.py, run_hyper.py) as a module, its ``main`` not yet run."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """The tiny text dataset, a config file with the tests' DARec settings, and an earlier run's checkpoint."""
    data_path, name = write_text_dataset(tmp_path / "dataset")
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "DARec-earlier.pth").write_bytes(b"an earlier run's checkpoint")
    settings = darec_settings(tmp_path, data_path, checkpoint_dir=str(saved), epochs=1)
    config_file = tmp_path / "base.yaml"
    config_file.write_text(yaml.safe_dump(settings), encoding="utf-8")
    # A hub id is looked up offline: with no network the hub client retries for most of a minute.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return {"tmp": tmp_path, "data": Path(data_path) / name, "name": name, "saved": saved,
            "argv": ["--model=DARecTokens", f"--dataset={name}", f"--config_files={config_file}"]}


def _run(monkeypatch, capsys, main, argv: list[str]) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["script", *argv])
    status = run_cli(main)
    return status, capsys.readouterr().err


def _assert_one_line(status: int, err: str, words: list[str]) -> str:
    assert status == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def _not_a_model(s) -> str:
    folder = s["tmp"] / "not-a-model"
    folder.mkdir()
    (folder / "README.md").write_text("notes\n", encoding="utf-8")
    return f"--llm_path={folder}"


def _a_file(s) -> str:
    file = s["tmp"] / "a-file"
    file.write_text("x\n", encoding="utf-8")
    return str(file)


def _inter_edit(edit):
    def set_up(s) -> None:
        inter = s["data"] / f"{s['name']}.inter"
        inter.write_bytes(edit(inter.read_bytes()))

    return set_up


def _config_file_with_a_bad_byte(s) -> str:
    bad = s["tmp"] / "mine.yaml"
    bad.write_bytes(b"epochs: 1\n# caf\xe9 latin-1\n")
    return f"--config_files={s['tmp'] / 'base.yaml'} {bad}"


def _truncated_token_cache(s) -> None:
    settings = yaml.safe_load((s["tmp"] / "base.yaml").read_text(encoding="utf-8"))
    build("DARecTokens", s["name"], settings)  # writes the item-token cache
    (cache,) = Path(settings["item_text_cache_dir"]).glob("item_tokens-*.pt")
    cache.write_bytes(cache.read_bytes()[:100])


# case: (argument(s) of run_darec.py, or a set-up that edits files and may return one; words of the one line)
RUN_DAREC_CASES = {
    # tracebacks before
    "llm_path: a folder that is not a model": (_not_a_model, ["llm_path=", "not-a-model"]),
    "llm_path: random:gpt9": ("--llm_path=random:gpt9", ["random:gpt9", "random:llama or random:opt"]),
    "llm_path: a hub id that does not exist": ("--llm_path=nosuch/model-xyz", ["nosuch/model-xyz"]),
    "learning_rate: a word": ("--learning_rate=fast", ["--learning_rate=fast", "must be a number"]),
    "epochs: a word": ("--epochs=two", ["--epochs=two", "must be a whole number"]),
    "item_max_tokens: negative": ("--item_max_tokens=-5", ["--item_max_tokens=-5", "at least 1"]),
    "MAX_ITEM_LIST_LENGTH: 0": ("--MAX_ITEM_LIST_LENGTH=0", ["--MAX_ITEM_LIST_LENGTH=0", "at least 1"]),
    "checkpoint_dir: a file": (lambda s: f"--checkpoint_dir={_a_file(s)}", ["--checkpoint_dir=", "is a file"]),
    "item_text_cache_dir: a file": (lambda s: f"--item_text_cache_dir={_a_file(s)}",
                                    ["--item_text_cache_dir=", "is a file"]),
    # one line before, but naming no file, line or setting
    ".inter header without :type": (_inter_edit(lambda data: data.replace(b"user_id:token", b"user_id", 1)),
                                     [".inter, line 1", "'user_id' has no type", "user_id:token"]),
    "non-UTF-8 byte in the .inter file": (_inter_edit(lambda data: data.replace(b"u000\t", b"u\xff00\t", 1)),
                                          [".inter, line 2", "not utf-8", "encoding"]),
    "non-UTF-8 byte in a config file": (_config_file_with_a_bad_byte, ["mine.yaml, line 2", "not UTF-8"]),
    "truncated item-token cache": (_truncated_token_cache, ["item_tokens-", "delete the file"]),
    "temperature: 0": ("--temperature=0", ["--temperature=0", "greater than 0"]),
    "checkpoint_dir: cannot be created": ("--checkpoint_dir=/proc/x", ["--checkpoint_dir=/proc/x", "cannot be"]),
    "adapter_dropout: above 1": ("--adapter_dropout=1.5", ["--adapter_dropout=1.5", "below 1", "default 0.0"]),
    # accepted silently before
    "epochs: negative": ("--epochs=-1", ["--epochs=-1", "at least 1"]),
    "llm_layers: 0 (meant every layer)": ("--llm_layers=0", ["--llm_layers=0", "at least 1"]),
    "temperature: negative": ("--temperature=-1", ["--temperature=-1", "greater than 0"]),
    "item_max_tokens: 0 (no text)": ("--item_max_tokens=0", ["--item_max_tokens=0", "at least 1"]),
    # refused only after the main model had trained
    "baseline: an unknown model": ("--baseline=Popp", ["Unknown model 'Popp'"]),
}


@pytest.mark.parametrize("case", list(RUN_DAREC_CASES))
def test_run_darec_refuses_bad_input_with_one_line(setup, monkeypatch, capsys, case):
    arrange, words = RUN_DAREC_CASES[case]
    extra = arrange(setup) if callable(arrange) else arrange
    before = {"saved": _snapshot(setup["saved"]), "data": _snapshot(setup["data"])}
    argv = list(setup["argv"])
    if extra and extra.startswith("--config_files="):  # replaces the base config file list
        argv = [argument for argument in argv if not argument.startswith("--config_files=")]
    status, err = _run(monkeypatch, capsys, _script("run_darec").main, [*argv, *([extra] if extra else [])])
    _assert_one_line(status, err, words)
    # Refused before anything trained: no checkpoint written, none replaced; the data files as they were.
    assert _snapshot(setup["saved"]) == before["saved"]
    assert _snapshot(setup["data"]) == before["data"]


HYPER_CASES = {
    "missing params file": (None, ["--params_file=", "not found"]),
    "unknown setting": ("adaptr_size choice [16,32]\n", ["line 1", "unknown setting 'adaptr_size'", "adapter_size"]),
    "unknown distribution": ("rec_dim choice [16,32]\nadapter_size gaussian 16,32\n",
                             ["line 2", "unknown distribution 'gaussian'", "choice, uniform"]),
    "malformed list": ("adapter_size choice [16,32\n", ["line 1", "not a list of values"]),
    "too few words": ("adapter_size choice\n", ["line 1", "not `name distribution values`"]),
    "bounds that are not numbers": ("learning_rate loguniform -9.2\n", ["line 1", "2 comma-separated numbers"]),
    "value outside the setting's range": ("dropout_prob choice [0.1,1.5]\n", ["line 1", "1.5", "below 1"]),
    "whole-number setting drawn as a fraction": ("adapter_size uniform 8,64\n",
                                                 ["line 1", "adapter_size is a whole number", "quniform"]),
}


@pytest.mark.parametrize("case", list(HYPER_CASES))
def test_run_hyper_refuses_a_bad_params_file_with_one_line(setup, monkeypatch, capsys, case):
    text, words = HYPER_CASES[case]
    params = setup["tmp"] / "my.hyper"
    if text is not None:
        params.write_text(text, encoding="utf-8")
    argv = [*setup["argv"], f"--params_file={params}", f"--output_file={setup['tmp'] / 'out.result'}"]
    status, err = _run(monkeypatch, capsys, _script("run_hyper").main, argv)
    _assert_one_line(status, err, [str(params) if text is not None else "my.hyper", *words])
    assert not (setup["tmp"] / "out.result").exists()  # no trial ran


def test_run_hyper_builds_recboles_space_from_a_good_params_file(setup, monkeypatch):
    from hyperopt.pyll import stochastic

    from recbole_darec.hyper import read_search_space

    params = setup["tmp"] / "ok.hyper"
    params.write_text("learning_rate loguniform -9.21,-5.30\n\nadapter_size choice [16, 32]\n"
                      "rec_dim quniform 16,64,16\n", encoding="utf-8")
    config = Config(model="DARecTokens", dataset=setup["name"], config_file_list=[str(setup["tmp"] / "base.yaml")])
    space = read_search_space(str(params), config)
    assert list(space) == ["learning_rate", "adapter_size", "rec_dim"]
    drawn = stochastic.sample(space, rng=np.random.default_rng(0))
    assert math.exp(-9.21) <= drawn["learning_rate"] <= math.exp(-5.30) and drawn["adapter_size"] in (16, 32)
    assert isinstance(drawn["rec_dim"], int)  # quniform's 48.0 would fail the type of a whole-number setting


def test_recommend_with_a_dataset_that_gained_items_names_the_change(setup, monkeypatch, capsys):
    settings = yaml.safe_load((setup["tmp"] / "base.yaml").read_text(encoding="utf-8"))
    config, model, train_data, valid_data, _ = build("DARecTokens", setup["name"], settings)
    trainer = trainer_for(config, model)
    trainer.fit(train_data, valid_data, saved=True)
    inter = setup["data"] / f"{setup['name']}.inter"
    inter.write_text(inter.read_text(encoding="utf-8") + "".join(
        f"newcomer\tn{k}\t{2_000_000_000 + k}\n" for k in range(5)), encoding="utf-8")
    monkeypatch.setattr(sys, "argv", ["recommend"])
    status = recommend.main([f"--checkpoint={trainer.saved_model_file}", "--history=i003,i004"])
    _assert_one_line(status, capsys.readouterr().err,
                     [trainer.saved_model_file, "65 items", "changed since the model was trained"])


def test_item_rows_with_a_tab_are_named_by_line(tmp_path, caplog):
    item_file = tmp_path / "tabs.item"
    item_file.write_text("item_id:token\ttitle:token_seq\ni1\tfine\ni2\ta\ttab\ni3\tfine\ni4\ttoo\tmany\tcells\n",
                         encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        read_item_sentences(str(item_file), "item_id")
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "2 row(s) wrong column count (lines 3, 5)" in warning and "a tab inside a text" in warning


def test_item_rows_of_items_without_interactions_are_noted_once(tmp_path, caplog):
    data_path, name = write_text_dataset(tmp_path / "dataset")
    item_file = Path(data_path) / name / f"{name}.item"
    item_file.write_text(item_file.read_text(encoding="utf-8") + "x901\tspare\nx902\tspare\n", encoding="utf-8")
    config = Config(model="DARecTokens", dataset=name, config_dict=darec_settings(tmp_path, data_path))
    with caplog.at_level(logging.INFO):
        load_data(config)
    notes = [r.getMessage() for r in caplog.records if "without interactions" in r.getMessage()]
    assert len(notes) == 1 and notes[0].startswith("2 item row(s)") and "x901, x902" in notes[0]


# ----- the validation pass itself --------------------------------------------------------------------------------
def test_every_declared_range_parses_and_names_settings():
    names = every_setting_name()
    for pattern, rule in load_rules(RANGES_FILE):
        assert isinstance(rule, Rule)
        assert any(fnmatch.fnmatchcase(name, pattern) for name in names), pattern  # no typo


@pytest.mark.parametrize("spec, inside, outside, words", [
    ("[1, inf)", [1, 7], [0, -1, math.nan], "at least 1"),
    ("(0, inf)", [1e-9, 3], [0, -2, math.inf], "greater than 0"),
    ("[0, 1) or ~", [0, 0.5], [1, 1.5, -0.1], "at least 0 and below 1"),
    ("int [1, inf)", [1], [0], "at least 1"),
    ("list [0, inf) or ~", [0, 2.5], [-0.1], "at least 0"),
])
def test_declared_ranges(spec, inside, outside, words):
    rule = Rule.parse(spec)
    assert all(rule.holds(value) for value in inside) and not any(rule.holds(value) for value in outside)
    assert rule.words() == words


@pytest.mark.parametrize("settings, words", [
    # A RecBole setting the range table does not name: its type comes from its default in RecBole's yaml.
    ({"n_layers": "two"}, ["n_layers='two'", "must be a whole number", "(n_layers: "]),
    ({"show_progress": "yes"}, ["must be True or False"]),
    ({"epochs": None}, ["epochs=None", "needs a value"]),
])
def test_types_come_from_the_yaml_defaults(tmp_path, settings, words):
    with pytest.raises(ValueError) as info:
        Config(model="SASRec", dataset="tiny", config_dict=settings)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("candidates, words", [
    ([0.0, -0.1], ["element 1 (-0.1) must be at least 0"]),
    (["a"], ["element 0 ('a') must be a number"]),
    ([True], ["element 0 (True) must be a number"]),
    (0.2, ["must be a list of one or more numbers at least 0, or ~"]),
    ([], ["must be a list of one or more numbers at least 0, or ~"]),
], ids=["negative", "not-a-number", "a-bool", "not-a-list", "empty"])
def test_a_list_setting_is_checked_element_by_element_before_any_data(candidates, words):
    # text_prior_weights is DARec's only list-valued range ("list [0, inf) or ~"); the one line names the setting.
    with pytest.raises(ValueError) as info:
        Config(model="DARec", dataset="tiny", config_dict={"text_prior_weights": candidates})
    for word in ["text_prior_weights=", *words, "default [0, 0.05"]:
        assert word in str(info.value), str(info.value)


def test_valid_values_pass(tmp_path):
    # SASRecCPR's yaml writes hidden_dropout_prob's default as 0: its "(float)" tag says fractions are fine. An int
    # for a float setting; ~ where the default is ~ or the range allows it; a folder that is created later.
    config = Config(model="SASRecCPR", dataset="tiny", config_dict={
        "hidden_dropout_prob": 0.2, "learning_rate": 1, "llm_layers": None, "llm_learning_rate": None,
        "checkpoint_dir": str(tmp_path / "new" / "folder")})
    for candidates in ([0, 0.25], (1,), None):
        assert Config(model="DARec", dataset="tiny", config_dict={"text_prior_weights": candidates})
    assert config["hidden_dropout_prob"] == 0.2 and not (tmp_path / "new").exists()  # the check creates nothing
