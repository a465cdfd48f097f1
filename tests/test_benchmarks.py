"""The benchmark scripts end to end on the tiny fixture: rows, report files, resume, speed figures, search.

Each row runs in a child process (as in a real benchmark) with a tiny random backbone and one epoch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY_DATASET
from darec_testing import TINY_LLM

REPO = Path(__file__).resolve().parents[1]
DAREC_TINY = {"llm_path": "random:llama", "llm_random_config": TINY_LLM, "item_max_tokens": 8,
              "MAX_ITEM_LIST_LENGTH": 6, "rec_dim": 32, "adapter_size": 8, "hard_negatives": 3, "epochs": 1,
              "train_batch_size": 64}


def write_profile(folder: Path) -> Path:
    profile = {
        "common": {"show_progress": False, "eval_batch_size": 256, "worker": 0},
        "variants": {
            "SASRec": {"model": "SASRec", "epochs": 1, "train_batch_size": 64, "hidden_size": 16, "inner_size": 32},
            "DARecTokens": {"model": "DARecTokens", **DAREC_TINY},
            "search": {"model": "DARecTokens", **DAREC_TINY, "search_epochs": 1, "search_n_init": 2, "search_n_iter": 1,
                       "search_valid_users": 10},
        },
    }
    path = folder / "tiny-profile.yaml"
    path.write_text(yaml.safe_dump(profile))
    return path


def run_script(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


SCRIPTS = sorted(path.name for path in (REPO / "benchmarks").glob("*.py") if "__main__" in path.read_text())


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_imports_its_helpers_from_common_and_prints_its_usage(script, tmp_path):
    """Scripts share helpers through benchmarks/common.py, not through each other or a sys.path edit, so each one
    starts from any working folder."""
    text = (REPO / "benchmarks" / script).read_text()
    assert "sys.path.insert" not in text and "from run import" not in text
    assert "usage:" in run_script(script, "--help", cwd=tmp_path).stdout


def test_run_writes_the_report_keeps_finished_rows_and_measures_speed(tmp_path, tiny_dataset):
    profile, out = write_profile(tmp_path), tmp_path / "out"
    common = ["--dataset", TINY_DATASET, "--data_path", tiny_dataset[0], "--profile", str(profile), "--out", str(out)]
    run_script("run.py", *common, "--models", "SASRec,DARecTokens", "--speed", cwd=tmp_path)
    for name in ("results.md", "results.csv", "runs.json", "ndcg_recall.png", "speed.json"):
        assert (out / name).is_file(), name
    rows = json.loads((out / "runs.json").read_text())
    assert [row["variant"] for row in rows] == ["SASRec", "DARecTokens"]
    assert all(0 <= row["test_result"]["ndcg@10"] <= 1 and row["peak_rss_mb"] > 0 for row in rows)
    speed = json.loads((out / "speed.json").read_text())["DARecTokens"]
    assert speed["step_ratio"] > 0 and speed["tokens_per_epoch_per_prefix"] > speed["tokens_per_epoch_all_position"]
    # Token level: both plain references are measured (which costs more is a timing, left to the benchmark: under
    # load two close medians can swap).
    assert speed["steps"] == 20
    assert speed["plain_all_step_s"] > 0 and speed["plain_step_s"] > 0 and speed["step_ratio_plain_all"] > 0
    assert speed["step_ratio_iqr"][0] <= speed["step_ratio"] <= speed["step_ratio_iqr"][1]
    table = (out / "results.md").read_text()
    assert "| SASRec | 1 |" in table and "| DARecTokens | 1 |" in table and "Speed" in table

    # A second call keeps finished rows with unchanged settings and reruns a row whose settings changed.
    row_file = out / "rows" / "SASRec-seed2020.json"
    before = row_file.read_text()
    done = run_script("run.py", *common, "--models", "SASRec", cwd=tmp_path)
    assert "== SASRec (seed 2020) ..." not in done.stdout and row_file.read_text() == before
    assert "SASRec (seed 2020): reusing the finished row (same settings, code" in done.stdout
    done = run_script("run.py", *common, "--models", "SASRec", "--set", "hidden_size=8", cwd=tmp_path)
    assert "== SASRec (seed 2020) ..." in done.stdout

    # A row made by other code (another version of the package) is rerun, unless kept on purpose and reported.
    made_by_other_code = {**json.loads(row_file.read_text()), "code_version": "0123456789ab", "commit": "abc"}
    row_file.write_text(json.dumps(made_by_other_code))
    done = run_script("run.py", *common, "--models", "SASRec", "--set", "hidden_size=8", "--keep_stale_rows",
                      cwd=tmp_path)
    assert "KEEPING a row made by other code (0123456789ab" in done.stdout
    assert "Rows kept from other code (--keep_stale_rows): SASRec seed 2020 (code 0123456789ab, commit abc)" in \
        (out / "results.md").read_text()
    done = run_script("run.py", *common, "--models", "SASRec,DARecTokens", "--seeds", "2020,2021", "--set",
                      "hidden_size=8", "--report_only", "--keep_stale_rows", cwd=tmp_path)  # trains nothing
    assert "== SASRec (seed 2021): no finished row, left out (--report_only)" in done.stdout
    assert "== SASRec (seed 2021) ..." not in done.stdout and "| SASRec | 1 |" in (out / "results.md").read_text()
    done = run_script("run.py", *common, "--models", "SASRec", "--set", "hidden_size=8", cwd=tmp_path)
    assert "made by other code (0123456789ab" in done.stdout and "== SASRec (seed 2020) ..." in done.stdout
    assert json.loads(row_file.read_text())["code_version"] != "0123456789ab"


def test_speed_steps_only_writes_the_step_figures_and_remeasures_when_settings_change(tmp_path, tiny_dataset):
    profile, out = write_profile(tmp_path), tmp_path / "out"
    args = ["--dataset", TINY_DATASET, "--data_path", tiny_dataset[0], "--profile", str(profile), "--out", str(out),
            "--models", "DARecTokens", "--speed_only", "--steps_only"]
    run_script("run.py", *args, cwd=tmp_path)
    speed = json.loads((out / "rows" / "DARecTokens.speed.json").read_text())
    assert speed["steps"] == 20 and speed["step_ratio_plain_all"] > 0 and "eval_ms_per_user" not in speed
    report = (out / "speed.md").read_text()
    assert "--steps_only" in report and "| DARecTokens |" in report and "| - | - |" in report  # no eval figures
    assert "measuring again" not in run_script("run.py", *args, cwd=tmp_path).stdout
    done = run_script("run.py", *args, "--set", "train_batch_size=32", cwd=tmp_path)
    assert "measured with other code, settings or figures, measuring again" in done.stdout
    assert json.loads((out / "rows" / "DARecTokens.speed.json").read_text())["batch_users"] <= 32
    # A steps-only row does not stand in for the full figures.
    done = run_script("run.py", *args[:-1], "--set", "train_batch_size=32", cwd=tmp_path)
    assert "measuring again" in done.stdout
    assert json.loads((out / "rows" / "DARecTokens.speed.json").read_text())["eval_ms_per_user"] > 0


def test_memory_paper_step_measures_one_step_of_the_paper_row_on_its_largest_batch(tmp_path, tiny_dataset):
    tiny = {key: DAREC_TINY[key] for key in ("llm_path", "llm_random_config", "item_max_tokens",
                                             "MAX_ITEM_LIST_LENGTH", "rec_dim", "adapter_size", "hard_negatives")}
    out = tmp_path / "paper-step.json"
    done = run_script("memory.py", "--dataset", TINY_DATASET, "--data_path", tiny_dataset[0], "--paper_step",
                      "--rows", "16", "--settings", "sdpa,sdpa+checkpointing", "--cache_dir", str(tmp_path / "cache"),
                      "--out", str(out), *(f"--set={key}={json.dumps(value)}" for key, value in tiny.items()),
                      cwd=tmp_path)
    rows = json.loads(out.read_text())["rows"]
    assert [row["setting"] for row in rows] == ["sdpa", "sdpa+checkpointing"]
    for row in rows:  # the paper row's settings, the tiny backbone's depth, the batch size asked for
        assert row["layers"] == 2 and row["rows"] == 16 and row["llm_bf16"] is True
        assert row["peak_total_mb"] > row["peak_mb"] > 0 and row["measure"] == "RSS (VmHWM)"
        assert row["target_items"] > 0 and row["history_tokens"] >= 16 * 2  # 16 users, 2 or more items each
    assert rows[0]["history_tokens"] == rows[1]["history_tokens"]  # the same batch for both settings
    assert "| sdpa+checkpointing | cpu | 2 | 16 |" in done.stdout
    again = run_script("memory.py", "--from_json", str(out), cwd=tmp_path)  # the report again, nothing measured
    assert again.stdout.strip() == done.stdout.strip()


def test_search_benchmark_compares_bo_random_and_fixed_placements(tmp_path, tiny_dataset):
    profile, out = write_profile(tmp_path), tmp_path / "out"
    run_script("search.py", "--dataset", TINY_DATASET, "--data_path", tiny_dataset[0], "--profile", str(profile),
               "--out", str(out), "--search_seeds", "1,2", cwd=tmp_path)
    summary = json.loads((out / "search.json").read_text())
    searches = [summary[method][seed] for method in ("bo", "random") for seed in ("1", "2")]
    assert [search["n_trials"] for search in searches] == [3, 3, 3, 3]
    # Each seed is its own search: the random method's first trials differ between seeds.
    assert summary["random"]["1"]["valid_per_trial"] != summary["random"]["2"]["valid_per_trial"]
    assert set(summary["test"]) == {"ss", "pp", *(search["best_arch"] for search in searches)}
    report = (out / "search.md").read_text()
    assert "all serial (ss)" in report and "all parallel (pp)" in report and "Welch p" in report

    # Run again: the finished test evaluations are reused, and it says so; written under another key (other
    # settings or code), they are not.
    args = ("search.py", "--dataset", TINY_DATASET, "--data_path", tiny_dataset[0], "--profile", str(profile),
            "--out", str(out), "--search_seeds", "1,2")
    assert "reusing its finished test evaluations" in run_script(*args, cwd=tmp_path).stdout
    (out / "search.json").write_text(json.dumps({**summary, "key": "0123456789ab"}))
    assert "its results are not reused" in run_script(*args, cwd=tmp_path).stdout
    assert json.loads((out / "search.json").read_text())["key"] == summary["key"]


def test_an_interrupted_row_resumes_from_its_last_epoch(tmp_path, tiny_dataset):
    """A row whose process died after an epoch goes on from its resume checkpoint when the benchmark is run again,
    if the code and settings are the same; otherwise it starts afresh."""
    profile, out = write_profile(tmp_path), tmp_path / "out"
    common = ["--dataset", TINY_DATASET, "--data_path", tiny_dataset[0], "--profile", str(profile), "--out", str(out),
              "--models", "SASRec", "--set", "epochs=2"]
    run_script("run.py", *common, cwd=tmp_path)
    row_file, started_file = out / "rows" / "SASRec-seed2020.json", out / "rows" / "SASRec-seed2020.started.json"
    first = json.loads(row_file.read_text())
    assert "resumed_from" not in first and started_file.is_file()
    (last,) = (out / "saved").glob("SASRec-*-last.pth")

    row_file.unlink()  # as if the process had died after its last epoch, before writing the row
    done = run_script("run.py", *common, cwd=tmp_path)
    assert f"resuming from {last.name}" in done.stdout
    resumed = json.loads(row_file.read_text())
    assert resumed["resumed_from"] == last.name and resumed["test_result"] == first["test_result"]

    # Started by other code: the checkpoint is not trusted to continue, the row starts afresh.
    row_file.unlink()
    started_file.write_text(json.dumps({**json.loads(started_file.read_text()), "code_version": "0123456789ab"}))
    done = run_script("run.py", *common, cwd=tmp_path)
    assert "resuming" not in done.stdout and "== SASRec (seed 2020) ..." in done.stdout
    assert "resumed_from" not in json.loads(row_file.read_text())

    # With --keep_stale_rows it resumes, and the row counts as made by the code that started it.
    (last,) = [path for path in (out / "saved").glob("SASRec-*-last.pth") if path.stat().st_mtime >= json.loads(
        started_file.read_text())["at"]]
    row_file.unlink()
    started_file.write_text(json.dumps({**json.loads(started_file.read_text()), "code_version": "0123456789ab"}))
    done = run_script("run.py", *common, "--keep_stale_rows", cwd=tmp_path)
    assert f"resuming from {last.name}" in done.stdout and "started by other code (0123456789ab" in done.stdout
    resumed = json.loads(row_file.read_text())
    assert resumed["resumed_from"] == last.name and resumed["code_version"] == "0123456789ab"
    assert "Rows kept from other code (--keep_stale_rows): SASRec seed 2020 (code 0123456789ab" in \
        (out / "results.md").read_text()


def test_shipped_profiles_name_real_models_and_settings():
    """Every variant of every shipped profile names a model the harness finds, and only settings the Config of a run
    of that model has: RecBole's Config takes any key, so a misspelled one in a profile would be silently ignored and
    the row would run the defaults."""
    from recbole_darec.config import KNOWN_WITHOUT_DEFAULT, Config

    profiles = sorted((REPO / "benchmarks" / "profiles").glob("*.yaml"))
    assert {p.stem for p in profiles} >= {"cpu", "cpu-small", "paper", "ablation"}
    for path in profiles:
        profile = yaml.safe_load(path.read_text())
        for variant, settings in profile["variants"].items():
            settings = {**profile.get("common", {}), **settings}
            model = settings.pop("model")
            known = Config(model=model, dataset="amazon-scientific").internal_config_dict
            unknown = set(settings) - set(known) - KNOWN_WITHOUT_DEFAULT
            assert not unknown, f"{path.name}: variant {variant} sets {sorted(unknown)}; no yaml of {model} has them"


def test_a_row_takes_the_caller_paths_and_refuses_another_checkpoint_dir(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from common import row_config

    profile = {"variants": {"DARec": {"model": "DARec"}}}
    _, settings = row_config(profile, "DARec", 2020, None, tmp_path / "out", {})
    assert settings["item_text_cache_dir"] == str(tmp_path / "out" / "saved" / "item_text_cache")
    assert settings["checkpoint_dir"] == str(tmp_path / "out" / "saved")

    monkeypatch.chdir(tmp_path)  # a relative path is the caller's, not the row folder's (rows run in out_dir)
    _, settings = row_config(profile, "DARec", 2020, "data", tmp_path / "out", {"item_text_cache_dir": "shared"})
    assert settings["item_text_cache_dir"] == str(tmp_path / "shared")
    assert settings["data_path"] == str(tmp_path / "data")

    with pytest.raises(SystemExit, match="checkpoint_dir.*--out"):
        row_config(profile, "DARec", 2020, None, tmp_path / "out", {"checkpoint_dir": "elsewhere"})


def test_report_tests_every_row_against_each_reference_with_welch(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from run import markdown

    def entry(variant: str, ndcg: list[float], recall: list[float]) -> dict:
        e = {"variant": variant, "seeds": len(ndcg), "train_seconds": 1, "test_seconds": 1, "eval_ms_per_user": 1,
             "peak_rss_mb": 1, "trainable_parameters": 1}
        for key in ("recall@50", "ndcg@50", "mrr@10", "mrr@50"):
            e[key], e[key + "_std"] = 0.1, 0.0
        for key, values in (("ndcg@10", ndcg), ("recall@10", recall)):
            e[key], e[key + "_std"], e[key + "_seeds"] = sum(values) / 3, 0.001, values
        return e

    table = [entry("SASRec", [0.050, 0.051, 0.052], [0.10, 0.101, 0.102]),
             entry("DARec", [0.060, 0.061, 0.062], [0.1005, 0.1015, 0.1010])]
    lines = {line.split(" | ")[0]: line for line in markdown(table, ["SASRec", "TextSASRec"]).splitlines()
             if line.startswith("| DARec | SASRec")}
    line = lines["| DARec"]
    n_p, r_p = (float(cell.split("p = ")[1].strip(" |")) for cell in line.split(" | ")[2:4])
    assert n_p < 0.01 < r_p  # a clear gap is significant, a tiny one is not; TextSASRec is absent: no row
    assert "1.196x" in line


def test_compare_reads_the_seeds_of_rows_in_any_folder_and_tests_them_with_welch(tmp_path):
    from scipy.stats import ttest_ind

    def write(folder: str, variant: str, ndcg: list[float]) -> str:
        rows = tmp_path / folder / "rows"
        rows.mkdir(parents=True, exist_ok=True)
        for seed, value in zip((2020, 2021, 2022), ndcg):
            result = {"recall@10": 2 * value, "recall@50": 4 * value, "ndcg@10": value, "mrr@10": value / 2}
            (rows / f"{variant}-seed{seed}.json").write_text(json.dumps(
                {"test_result": result, "best_valid_result": {"ndcg@10": value + 0.01}}))
        (rows / f"{variant}-seed2020.config.json").write_text("{}")  # not a row: left out
        return str(rows / variant)

    ours, theirs = [0.060, 0.061, 0.063], [0.050, 0.052, 0.051]
    out = run_script("compare.py", f"A={write('one', 'DARec', ours)}", f"B={write('two', 'TextSASRec', theirs)}",
                     "--reference=B", cwd=tmp_path).stdout
    assert "| A | 2020, 2021, 2022 |" in out and "0.0613 ± 0.0015" in out  # N@10 mean ± std over the seeds
    line = next(line for line in out.splitlines() if line.startswith("| A | B |"))
    ndcg_cell = line.split(" | ")[4]
    p_value = ttest_ind(ours, theirs, equal_var=False).pvalue
    assert ndcg_cell == f"+{100 * (sum(ours) / sum(theirs) - 1):.1f}%, p = {p_value:.2g}"
    missing = subprocess.run([sys.executable, str(REPO / "benchmarks" / "compare.py"), f"A={tmp_path}/none/rows/X"],
                             capture_output=True, text=True, cwd=tmp_path)
    assert missing.returncode != 0 and "no finished row" in missing.stderr


@pytest.mark.parametrize("bigger", [True, False])
def test_tuning_report_marks_the_trial_validation_selects(tmp_path, bigger):
    from recbole_darec.files import append_json_line

    def trial(valid: float, test: float, batch: int) -> dict:
        result = {"best_valid_score": valid, "valid_score_bigger": bigger,
                  "best_valid_result": {"ndcg@10": valid, "recall@10": 2 * valid},
                  "test_result": {"ndcg@10": test, "recall@10": 2 * test}}
        return {"key": str(batch), "params": {"train_batch_size": batch, "learning_rate": 0.001}, "result": result,
                "seconds": 600}

    log = tmp_path / "DARec.trials.jsonl"
    append_json_line(log, {"run": {"model": "DARec"}})
    append_json_line(log, trial(0.05, 0.07, 32))  # the best test, not the best validation
    append_json_line(log, trial(0.06, 0.04, 64))
    with open(log, "a") as f:
        f.write('{"key": "128", "par')  # a trial cut off mid-write is left out
    run_script("tuning_report.py", "--dir", str(tmp_path), cwd=tmp_path)
    rows = [line for line in (tmp_path / "tuning.md").read_text().splitlines() if line.startswith("| ")]
    assert len(rows) == 3  # the header and two trials
    selected, other = (rows[2], rows[1]) if bigger else (rows[1], rows[2])  # a loss-like metric selects the smaller
    assert selected.startswith("| **") and "**" not in other
    assert ("| **2** | 0.001 | 64 | **0.0600** |" if bigger else "| **1** | 0.001 | 32 | **0.0500** |") in selected
