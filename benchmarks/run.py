"""One-command benchmark: DARec, its ablations and RecBole baselines, one protocol, one process tree.

    python benchmarks/run.py --dataset=amazon-scientific --models=DARec,DARecbase,SASRec --profile=cpu
    python benchmarks/run.py --dataset=ml-100k --models=SASRec,GRU4Rec --seeds=2020,2021,2022

Each row (model variant x seed) trains in its own child process (so peak memory is per row) with the settings of
``benchmarks/profiles/<profile>.yaml`` layered over the plugin's properties/. Writes to ``--out``:
results.md (table), results.csv, runs.json (every row's exact config and metrics), ndcg_recall.png, speed.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import METRICS, ROOT, default_data_path, load_profile, parse_overrides, row_config, welch_p

from recbole_darec.provenance import code_version, git_commit

DEFAULT_MODELS = "DARec,DARecbase,SASRec,GRU4Rec,BERT4Rec"
# Settings that are the row's own paths (RecBole rewrites data_path into data_path/dataset in its config).
ROW_PATHS = ("data_path", "checkpoint_dir", "item_text_cache_dir")


def row_code_version(model: str) -> str:
    """The code a row depends on: the whole package for the plugin's models; for RecBole's own models, all but the
    plugin's model/ and search/ (an edit of DARec does not make a SASRec row stale)."""
    return code_version(plugin_models=(ROOT / "recbole_darec" / "model" / f"{model.lower()}.py").is_file())


def same_settings(config_file: Path, settings: dict) -> bool:
    """Whether ``config_file`` records exactly these settings (a row's or a speed measurement's)."""
    return config_file.exists() and json.loads(config_file.read_text()) == settings


def reusable(result_file: Path, same_config: bool, code: str, keep_stale: bool, name: str) -> bool:
    """A finished row is reused when its settings and code version are this run's; the output says so."""
    if not (result_file.exists() and same_config):
        return False
    made_by = json.loads(result_file.read_text()).get("code_version")
    if made_by == code:
        print(f"== {name}: reusing the finished row (same settings, code {code})", flush=True)
        return True
    if keep_stale:
        print(f"== {name}: KEEPING a row made by other code ({made_by or 'unrecorded'}, now {code}): "
              "--keep_stale_rows", flush=True)
        return True
    print(f"== {name}: the finished row was made by other code ({made_by or 'unrecorded'}, now {code}): rerun",
          flush=True)
    return False


def interrupted_run(out_dir: Path, model: str, settings: dict, started_file: Path, code: str,
                    keep_stale: bool) -> tuple[Path, str] | None:
    """The resume checkpoint (``saved/<Model>-<time>-last.pth``) of an earlier start of this row that did not
    finish, and the code version of that start: a checkpoint written after it, with this row's settings in its
    config, by the same code (or other code, with ``keep_stale``: the row then counts as made by that code)."""
    if not started_file.exists():
        return None
    started = json.loads(started_file.read_text())
    if started.get("settings") != settings:
        return None
    started_code = started.get("code_version")
    if started_code != code and not keep_stale:
        return None
    import recbole_darec  # noqa: F401  (compat first)
    from recbole_darec.compat import load_trusted_checkpoint

    candidates = [p for p in (out_dir / "saved").glob(f"{model}-*-last.pth") if p.stat().st_mtime >= started["at"]]
    for path in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        config = load_trusted_checkpoint(str(path), map_location="cpu").get("config")
        if config is not None and all(str(config[key]) == str(value) for key, value in settings.items()
                                      if key not in ROW_PATHS):
            return path, started_code
    return None


def run_row(model: str, dataset: str, settings: dict, result_file: Path) -> None:
    """Child process: train + evaluate one row, write its metrics, times and peak memory as JSON."""
    import torch

    import recbole_darec  # noqa: F401  (compat first)
    from recbole_darec.quick_start import run_darec

    sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value from argv: the row's settings are all in settings
    result = run_darec(model=model, dataset=dataset, config_dict=settings)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["torch_threads"] = torch.get_num_threads()  # train times are only comparable at the same count
    result_file.write_text(json.dumps(result, default=float, indent=1))


def run_speed(model: str, dataset: str, settings: dict, result_file: Path, steps_only: bool = False) -> None:
    from speed import measure

    import recbole_darec  # noqa: F401  (compat first)

    sys.argv = sys.argv[:1]
    figures = measure(model, dataset, settings, steps_only=steps_only)
    result_file.write_text(json.dumps({**figures, "code_version": row_code_version(model)}, indent=1))


def summarise(rows: list[dict], variants: list[str]) -> list[dict]:
    """Mean and spread over seeds per variant."""
    table = []
    for variant in variants:
        runs = [r for r in rows if r["variant"] == variant and "test_result" in r]
        if not runs:
            continue
        entry = {"variant": variant, "seeds": len(runs)}
        for key in METRICS:
            values = [r["test_result"][key] for r in runs]
            entry[key + "_seeds"] = values
            entry[key] = statistics.mean(values)
            entry[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        for key in ("train_seconds", "test_seconds", "peak_rss_mb", "trainable_parameters"):
            entry[key] = statistics.mean(r[key] for r in runs)
        entry["eval_ms_per_user"] = 1000 * entry["test_seconds"] / max(runs[0]["n_test_rows"], 1)
        table.append(entry)
    return table


def markdown(table: list[dict], references: list[str]) -> str:
    lines = ["| model | seeds | R@10 | R@50 | N@10 | N@50 | MRR@10 | MRR@50 | train s | test s | eval ms/user | "
             "peak RSS MB | trainable params |", "|" + "---|" * 13]
    for e in table:
        cells = []
        for key in METRICS:
            cell = f"{e[key]:.4f}"
            if e["seeds"] > 1:
                cell += f" ± {e[key + '_std']:.4f}"
            cells.append(cell)
        lines.append(f"| {e['variant']} | {e['seeds']} | " + " | ".join(cells) + f" | {e['train_seconds']:.0f} | "
                     f"{e['test_seconds']:.0f} | {e['eval_ms_per_user']:.2f} | {e['peak_rss_mb']:.0f} | "
                     f"{int(e['trainable_parameters']):,} |")
    return "\n".join(lines) + "\n" + significance(table, references)


def significance(table: list[dict], references: list[str]) -> str:
    """Each row against each reference row, both with 2+ seeds: ratio of means and Welch p on N@10 and R@10."""
    lines = []
    for name in references:
        ref = next((e for e in table if e["variant"] == name and e["seeds"] > 1), None)
        for e in table:
            if ref is None or e is ref or e["seeds"] < 2:
                continue
            cells = [f"{e[key] / ref[key]:.3f}x, p = {welch_p(e[key + '_seeds'], ref[key + '_seeds']):.3g}"
                     for key in ("ndcg@10", "recall@10")]
            lines.append(f"| {e['variant']} | {name} | " + " | ".join(cells) + " |")
    if not lines:
        return ""
    return ("\nAgainst each reference (test, mean over seeds; two-sided Welch t-test over the seeds):\n\n"
            "| model | vs | N@10 | R@10 |\n|---|---|---|---|\n" + "\n".join(lines) + "\n")


def plot(table: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [e["variant"] for e in table]
    xs = range(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names)), 4))
    width = 0.4
    for offset, key, label in ((-width / 2, "ndcg@10", "NDCG@10"), (width / 2, "recall@10", "Recall@10")):
        ax.bar([x + offset for x in xs], [e[key] for e in table], width,
               yerr=[e[key + "_std"] for e in table], label=label, capsize=3)
    ax.set_xticks(list(xs), names, rotation=20)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="amazon-scientific")
    parser.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated variants of the profile")
    parser.add_argument("--profile", default="cpu", help="benchmarks/profiles/<name>.yaml, or a yaml file's path")
    parser.add_argument("--seeds", default="2020", help="comma-separated seeds; each row runs once per seed")
    parser.add_argument("--data_path", default=None, help="folder holding <dataset>/ (default: dataset/ or shared)")
    parser.add_argument("--out", default=None, help="output folder (default benchmarks/results/<dataset>-<profile>)")
    parser.add_argument("--speed", action="store_true", help="also measure DARec's speed figures")
    parser.add_argument("--speed_only", action="store_true",
                        help="measure the speed figures of --models without training rows (writes speed.md)")
    parser.add_argument("--steps_only", action="store_true",
                        help="with --speed_only: the step ratio alone, no evaluation (the paper profile on a CPU)")
    parser.add_argument("--keep_stale_rows", action="store_true",
                        help="keep finished rows made by another code version, and resume cut-off rows started by it "
                        "(both are listed in the report)")
    parser.add_argument("--report_only", action="store_true",
                        help="write the report from the finished rows; train nothing (rows still running are left out)")
    parser.add_argument("--reference", default="SASRec,TextSASRec",
                        help="comma-separated variants that every row is tested against (Welch p-values)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting in every row (yaml value), e.g. --set epochs=1")
    parser.add_argument("--child", nargs=4, metavar=("KIND", "MODEL", "SETTINGS_JSON", "RESULT_JSON"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        kind, model, settings_file, result_file = args.child
        settings = json.loads(Path(settings_file).read_text())
        if kind == "row":
            run_row(model, args.dataset, settings, Path(result_file))
        else:
            run_speed(model, args.dataset, settings, Path(result_file), steps_only=kind == "speed-steps")
        return

    profile = load_profile(args.profile)
    out_dir = Path(args.out or ROOT / "benchmarks" / "results" / f"{args.dataset}-{Path(args.profile).stem}").resolve()
    (out_dir / "rows").mkdir(parents=True, exist_ok=True)
    data_path = args.data_path or default_data_path(args.dataset)
    variants = [v.strip() for v in args.models.split(",") if v.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    overrides = parse_overrides(args.set)

    rows, stale = [], []
    for seed in ([] if args.speed_only else seeds):
        for variant in variants:
            model, settings = row_config(profile, variant, seed, data_path, out_dir, overrides)
            stem = out_dir / "rows" / f"{variant}-seed{seed}"
            config_file, result_file = Path(f"{stem}.config.json"), Path(f"{stem}.json")
            same_config = same_settings(config_file, settings)
            code, commit = row_code_version(model), git_commit()  # the code this row runs, taken at its start
            if not reusable(result_file, same_config, code, args.keep_stale_rows, f"{variant} (seed {seed})"):
                if args.report_only:
                    print(f"== {variant} (seed {seed}): no finished row, left out (--report_only)", flush=True)
                    continue
                config_file.write_text(json.dumps(settings, indent=1))
                made_by = code  # the code version the row records
                started_file = Path(f"{stem}.started.json")
                # A finished row that is rerun (other code, other settings) starts afresh; only one cut off resumes.
                resume = None if result_file.exists() else interrupted_run(out_dir, model, settings, started_file, code,
                                                                           args.keep_stale_rows)
                if resume:
                    # An earlier start of this row was cut off: go on from its last finished epoch.
                    resume, started_code = resume
                    print(f"== {variant} (seed {seed}): resuming from {resume.name}", flush=True)
                    if started_code != code:
                        print(f"== {variant} (seed {seed}): it was started by other code ({started_code}, now {code}),"
                              " resumed as --keep_stale_rows allows; the row counts as made by that code", flush=True)
                        made_by = started_code
                    settings_file = Path(f"{stem}.resume.json")
                    settings_file.write_text(json.dumps({**settings, "resume": str(resume)}, indent=1))
                else:
                    print(f"== {variant} (seed {seed}) ...", flush=True)
                    started_file.write_text(json.dumps({"at": time.time(), "code_version": code, "commit": commit,
                                                        "settings": settings}, indent=1))
                    settings_file = config_file
                start = time.perf_counter()
                done = subprocess.run([sys.executable, __file__, "--dataset", args.dataset, "--child", "row", model,
                                       str(settings_file), str(result_file)], cwd=out_dir, check=False)
                if done.returncode != 0:
                    print(f"!! {variant} (seed {seed}) failed with exit code {done.returncode}", flush=True)
                    continue
                print(f"   done in {time.perf_counter() - start:.0f}s", flush=True)
                result = json.loads(result_file.read_text())
                if resume:  # its train time counts only the epochs after the resume
                    result["resumed_from"] = resume.name
                result_file.write_text(json.dumps({**result, "code_version": made_by, "commit": commit},
                                                  default=float, indent=1))
            row = json.loads(result_file.read_text())
            rows.append({"variant": variant, "seed": seed, "config": settings, **row})
            if row.get("code_version") != code:
                stale.append(f"{variant} seed {seed} (code {row.get('code_version') or 'unrecorded'}, "
                             f"commit {row.get('commit') or 'unrecorded'})")

    speed = {}
    if args.speed or args.speed_only:
        for variant in variants:
            model, settings = row_config(profile, variant, seeds[0], data_path, out_dir, overrides)
            if not model.startswith("DARec"):
                continue
            speed_file = out_dir / "rows" / f"{variant}.speed.json"
            code, config_file = row_code_version(model), Path(f"{speed_file}.config")
            same_config = same_settings(config_file, settings)
            measured = json.loads(speed_file.read_text()) if speed_file.exists() else None
            if measured and (measured.get("code_version") != code or not same_config
                             or not (args.steps_only or "eval_ms_per_user" in measured)):
                print(f"== {variant} speed: measured with other code, settings or figures, measuring again",
                      flush=True)
                speed_file.unlink()
            if not speed_file.exists():
                config_file.write_text(json.dumps(settings))
                kind = "speed-steps" if args.steps_only else "speed"
                subprocess.run([sys.executable, __file__, "--dataset", args.dataset, "--child", kind, model,
                                f"{speed_file}.config", str(speed_file)], cwd=out_dir, check=False)
            if speed_file.exists():
                speed[variant] = json.loads(speed_file.read_text())

    table = summarise(rows, variants)
    header = (f"Dataset {args.dataset}, profile {args.profile}, seeds {args.seeds}; machine: {platform.machine()}, "
              f"{os.cpu_count()} CPU cores, {platform.python_version()}.\n"
              f"Command: python benchmarks/run.py --dataset={args.dataset} --models={args.models} "
              f"--profile={args.profile} --seeds={args.seeds}{' --speed' if args.speed else ''}"
              f"{' --speed_only' if args.speed_only else ''}{' --steps_only' if args.steps_only else ''}"
              f"{' --keep_stale_rows' if args.keep_stale_rows else ''}"
              + "".join(f" --set {item}" for item in args.set) + "\n"
              f"Code: {row_code_version('DARec')} (plugin models), {row_code_version('SASRec')} (RecBole models), "
              f"commit {git_commit()}.\n"
              + (f"Rows kept from other code (--keep_stale_rows): {'; '.join(stale)}.\n" if stale else "") + "\n")
    speed_text = ""
    if speed:
        speed_text += ("\nSpeed (one training batch; ratio = DARec step / plain backbone forward+backward on the same "
                       "tokens; every token: also the target items and the cache-refresh slice that a token-level "
                       "step encodes alone; medians of 20 interleaved steps, quartiles in brackets; eval: "
                       "full_sort_predict over every test user, DARec and SASRec on the same batches in turns, "
                       "median of 3 passes; bf16: DARec's LLM passes in bf16 autocast, llm_bf16)\n\n")
        speed_text += ("| model | batch users | batch tokens | DARec step s | plain step s | ratio | ratio, every "
                       "token | item refresh s | tokens/epoch all-position | tokens/epoch per-prefix | eval ms/user | "
                       "SASRec eval ms/user, same batches | eval ratio | SASRec eval ms/user in bf16 | bf16 |\n"
                       + "|---" * 15 + "|\n")

        def spread(s: dict, key: str) -> str:
            if key not in s:
                return "-"
            low, high = s[f"{key}_iqr"]
            return f"{s[key]:.3f} [{low:.3f}-{high:.3f}]"

        def number(s: dict, key: str, spec: str) -> str:  # "-" for a figure not measured (--steps_only)
            return format(s[key], spec) if key in s else "-"

        for variant, s in speed.items():
            speed_text += (f"| {variant} | {s['batch_users']} | {s['batch_tokens']} | {spread(s, 'darec_step_s')} | "
                           f"{spread(s, 'plain_step_s')} | {spread(s, 'step_ratio')} | "
                           f"{spread(s, 'step_ratio_plain_all')} | {number(s, 'item_cache_refresh_s', '.1f')} | "
                           f"{number(s, 'tokens_per_epoch_all_position', ',')} | "
                           f"{number(s, 'tokens_per_epoch_per_prefix', ',')} | "
                           f"{number(s, 'eval_ms_per_user', '.2f')} | {number(s, 'eval_ms_per_user_sasrec', '.2f')} | "
                           f"{number(s, 'eval_ratio_to_sasrec', '.2f')} | "
                           f"{number(s, 'eval_ms_per_user_sasrec_bf16', '.2f')} | {s.get('eval_bf16', '-')} |\n")
    if args.speed_only:
        (out_dir / "speed.md").write_text(header + speed_text)
        print(header + speed_text)
        return
    text = header + markdown(table, args.reference.split(",")) + speed_text
    (out_dir / "results.md").write_text(text)
    (out_dir / "runs.json").write_text(json.dumps(rows, indent=1, default=float))
    (out_dir / "speed.json").write_text(json.dumps(speed, indent=1))
    with open(out_dir / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(table[0]) if table else ["variant"])
        writer.writeheader()
        writer.writerows(table)
    if table:
        plot(table, out_dir / "ndcg_recall.png", f"{args.dataset} ({args.profile} profile)")
    print(text)


if __name__ == "__main__":
    main()
