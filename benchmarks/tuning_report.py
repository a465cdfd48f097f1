"""The tuning table of BENCHMARKS.md from the tuning logs that benchmarks/tune.sh writes (finished trials only).

    python benchmarks/tuning_report.py [--dir benchmarks/results/amazon-scientific-tuning]

Writes tuning.md beside the logs: per model, every finished trial with its parameters, validation and test metrics,
and the trial that validation NDCG@10 selects (test metrics are shown, never used to select).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from recbole_darec.files import read_json_lines

MODELS = ("SASRec", "TextSASRec", "DARec")


def model_table(model: str, log: Path) -> list[str]:
    records = [record for _, record in read_json_lines(log)]
    trials = [record for record in records[1:] if "result" in record]
    if not trials:
        return [f"### {model}", "", "No finished trial yet.", ""]
    names = sorted(trials[0]["params"])
    # RecBole records per trial whether its validation metric grows better (NDCG) or smaller (a loss)
    best = max(trials, key=lambda t: t["result"]["best_valid_score"] * (1 if t["result"]["valid_score_bigger"] else -1))
    lines = [f"### {model}", "", f"{len(trials)} finished trials; log: `{log.name}`.", "",
             "| trial | " + " | ".join(names) + " | valid N@10 | valid R@10 | test N@10 | test R@10 | minutes |",
             "|---" * (len(names) + 6) + "|"]
    for index, trial in enumerate(trials, start=1):
        valid, test = trial["result"]["best_valid_result"], trial["result"]["test_result"]
        params = " | ".join(f"{trial['params'][name]:.2g}" if isinstance(trial["params"][name], float)
                            else str(trial["params"][name]) for name in names)
        mark = "**" if trial is best else ""
        lines.append(f"| {mark}{index}{mark} | {params} | {mark}{valid['ndcg@10']:.4f}{mark} "
                     f"| {valid['recall@10']:.4f} | {test['ndcg@10']:.4f} | {test['recall@10']:.4f} "
                     f"| {trial['seconds'] / 60:.0f}{' (after a resume)' if trial.get('resumed_from') else ''} |")
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="benchmarks/results/amazon-scientific-tuning")
    folder = Path(parser.parse_args().dir)
    lines = ["# Equal-budget tuning", "", "Made by `benchmarks/tune.sh MODEL`; selection on validation NDCG@10.", ""]
    for model in MODELS:
        log = folder / f"{model}.trials.jsonl"
        if log.exists():
            lines += model_table(model, log)
    (folder / "tuning.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
