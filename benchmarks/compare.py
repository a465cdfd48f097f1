"""Rows of several result folders side by side, with Welch tests: the comparisons that cross folders.

    python benchmarks/compare.py \
        DARec=benchmarks/results/amazon-scientific-tuned/rows/DARec \
        TextSASRec=benchmarks/results/amazon-scientific-tuned/rows/TextSASRec --reference=TextSASRec

Each ``NAME=PREFIX`` is one row: the finished seeds ``PREFIX-seed<n>.json`` that ``benchmarks/run.py`` wrote. Prints
the mean ± standard deviation over seeds (test set, and the best validation NDCG@10), then each row against each
``--reference``: the change of the mean and the two-sided Welch t-test p-value over the seeds. Trains nothing.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from common import welch_p

COLUMNS = {"recall@10": "R@10", "recall@50": "R@50", "ndcg@10": "N@10", "mrr@10": "MRR@10"}


def load_rows(prefix: str) -> dict[int, dict]:
    """The finished seeds of one row, by seed."""
    folder, stem = Path(prefix).parent, Path(prefix).name
    pattern = re.compile(re.escape(stem) + r"-seed(\d+)\.json$")
    rows = {int(m.group(1)): json.loads(p.read_text()) for p in sorted(folder.glob(f"{stem}-seed*.json"))
            if (m := pattern.match(p.name))}
    if not rows:
        raise SystemExit(f"{prefix}: no finished row ({folder}/{stem}-seed<n>.json)")
    return rows


def figures(rows: dict[int, dict]) -> dict[str, list[float]]:
    """Per metric, the seeds' values in seed order (``valid`` is the best validation NDCG@10)."""
    ordered = [rows[seed] for seed in sorted(rows)]
    out = {key: [row["test_result"][key] for row in ordered] for key in COLUMNS}
    out["valid"] = [row["best_valid_result"]["ndcg@10"] for row in ordered]
    return out


def spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    return f"{mean:.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{mean:.4f}"


def report(groups: dict[str, dict[int, dict]], references: list[str]) -> str:
    table = {name: figures(rows) for name, rows in groups.items()}
    lines = ["| row | seeds | " + " | ".join(COLUMNS.values()) + " | best valid N@10 | train s | trainable params |",
             "|---" * (len(COLUMNS) + 5) + "|"]
    for name, values in table.items():
        cells = [spread(values[key]) for key in [*COLUMNS, "valid"]]
        rows = list(groups[name].values())
        train_seconds = statistics.mean(row.get("train_seconds", float("nan")) for row in rows)
        parameters = rows[0].get("trainable_parameters")
        cells += [f"{train_seconds:.0f}", f"{parameters:,}" if parameters else "-"]
        lines.append(f"| {name} | {', '.join(map(str, sorted(groups[name])))} | " + " | ".join(cells) + " |")
    lines += ["", "| row | against | " + " | ".join(COLUMNS.values()) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for reference in references:
        if reference not in table:
            raise SystemExit(f"--reference={reference}: not one of the rows ({', '.join(table)})")
        for name, values in table.items():
            if name == reference:
                continue
            cells = []
            for key in COLUMNS:
                ours, theirs = values[key], table[reference][key]
                change = f"{100 * (statistics.mean(ours) / statistics.mean(theirs) - 1):+.1f}%"
                enough = len(ours) > 1 and len(theirs) > 1
                cells.append(f"{change}, p = {welch_p(ours, theirs):.2g}" if enough else change)
            lines.append(f"| {name} | {reference} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("rows", nargs="+", metavar="NAME=PREFIX", help="a row: its name and its rows/<variant> prefix")
    parser.add_argument("--reference", default="", help="comma-separated names of the rows to test the others against")
    args = parser.parse_args()
    groups = {}
    for item in args.rows:
        name, sep, prefix = item.partition("=")
        if not sep or not name or not prefix:
            raise SystemExit(f"{item!r}: give NAME=PREFIX, e.g. DARec=benchmarks/results/<folder>/rows/DARec")
        groups[name] = load_rows(prefix)
    print(report(groups, [r for r in args.reference.split(",") if r]), end="")


if __name__ == "__main__":
    main()
