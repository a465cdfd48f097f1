"""Architecture-search benchmark: BO vs random search of DARec's per-layer serial/parallel adapters.

    python benchmarks/search.py --dataset=amazon-scientific --profile=cpu

Settings: the profile's ``search`` variant (benchmarks/profiles/<profile>.yaml). One weight-sharing supernet is
trained once and shared by both methods (same trial budget each); every candidate is scored by one validation pass
on ``search_valid_users`` users. ``--search_seeds``: each method searches once per seed (its random trials and
BO's proposals differ; the supernet is the same), and the report gives each method's mean best validation score
with a Welch test between them. The best architecture of each method and seed, all-serial and all-parallel are
then evaluated on the full test set *with the supernet's weights* (one-shot evaluation, not retrained: the honest
comparison of placements at a CPU budget). Writes search.md, search.json and the per-trial plot to ``--out``.
Interrupted runs resume: trial logs, the supernet checkpoint and finished test evaluations are kept.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

from common import METRICS, ROOT, default_data_path, load_profile, parse_overrides, row_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="amazon-scientific")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--variant", default="search", help="the profile's variant holding the search settings")
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--search_seeds", default=None,
                        help="comma-separated search seeds, one search per method and seed (default: search_seed)")
    parser.add_argument("--data_path", default=None)
    parser.add_argument("--out", default=None, help="default benchmarks/results/<dataset>-<profile>-search")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    profile = load_profile(args.profile)
    out_dir = Path(args.out or ROOT / "benchmarks" / "results" / f"{args.dataset}-{Path(args.profile).stem}-search")
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    overrides = parse_overrides(args.set)
    model, settings = row_config(profile, args.variant, args.seed, args.data_path or default_data_path(args.dataset),
                                 out_dir, overrides)
    sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value from argv

    from recbole.utils import init_logger, init_seed

    from recbole_darec.config import Config
    from recbole_darec.data import load_data
    from recbole_darec.provenance import artefact_key, git_commit
    from recbole_darec.search import build_supernet, describe_arch, search_architecture, search_paths, str_to_arch
    from recbole_darec.search.supernet import trial_settings
    from recbole_darec.search.trial_log import TrialLog

    config = Config(model=model, dataset=args.dataset, config_dict=settings)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    _, train_data, valid_data, test_data = load_data(config)

    summary_file = out_dir / "search.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    # Test metrics (and the supernet time) are reused only from a run with the same settings and code.
    key = artefact_key(config, trial_settings(config["model"]))
    if summary and summary.get("key") != key:
        print(f"{summary_file}: written under other settings or code (key {summary.get('key')}, now {key}); "
              "its results are not reused", flush=True)
        summary = {}
    elif summary:
        print(f"{summary_file}: reusing its finished test evaluations (same settings and code, key {key})",
              flush=True)
    machine = platform.processor() or platform.machine()
    summary.update({"key": key, "commit": git_commit(), "dataset": args.dataset, "settings": settings,
                    "machine": machine})

    supernet_start = time.perf_counter()
    supernet = build_supernet(config, train_data, search_paths(config, "bo").supernet)
    supernet.ensure_trained()
    summary.setdefault("supernet_seconds", time.perf_counter() - supernet_start)  # first run: the training
    n_layers = supernet.n_layers

    search_seeds = ([int(seed) for seed in args.search_seeds.split(",")] if args.search_seeds
                    else [config["search_seed"] if config["search_seed"] is not None else config["seed"]])
    for method in ("bo", "random"):
        summary[method] = {}
        for search_seed in search_seeds:
            config["search_seed"] = search_seed  # part of the trial log's key: one log per seed
            best, _ = search_architecture(config, method, train_data, valid_data, supernet)
            trials = TrialLog(search_paths(config, method).trial_log).read()
            summary[method][str(search_seed)] = {"best_arch": best, "n_trials": len(trials),
                                                 "trial_seconds": sum(t.seconds for t in trials),
                                                 "best_valid": max(t.value for t in trials),
                                                 "valid_per_trial": [t.value for t in trials]}

    candidates = {f"{method} best, seed {seed}": entry["best_arch"]
                  for method in ("bo", "random") for seed, entry in summary[method].items()}
    candidates |= {"all serial": "s" * n_layers, "all parallel": "p" * n_layers}
    tests = summary.setdefault("test", {})
    for arch in dict.fromkeys(candidates.values()):
        if arch in tests:
            continue
        supernet.model.set_adapter_arch(str_to_arch(arch))
        start = time.perf_counter()
        result = supernet.trainer.evaluate(test_data, load_best_model=False, show_progress=False)
        tests[arch] = {key: float(result[key]) for key in METRICS} | {"seconds": time.perf_counter() - start}
        summary_file.write_text(json.dumps(summary, indent=1))
    summary["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary_file.write_text(json.dumps(summary, indent=1))

    lines = [f"Supernet: {n_layers} layers, trained {summary['supernet_seconds']:.0f} s. Trials scored on "
             f"{config['search_valid_users'] or 'all'} validation users ({config['valid_metric']}).", "",
             "| method | search seed | trials | best architecture | best valid | search s |",
             "|---|---|---|---|---|---|"]
    for method in ("bo", "random"):
        for seed, entry in summary[method].items():
            lines.append(f"| {method} | {seed} | {entry['n_trials']} | {describe_arch(entry['best_arch'])} | "
                         f"{entry['best_valid']:.4f} | {entry['trial_seconds']:.0f} |")
    best = {method: [entry["best_valid"] for entry in summary[method].values()] for method in ("bo", "random")}
    if len(search_seeds) > 1:
        from scipy.stats import ttest_ind

        p_value = float(ttest_ind(best["bo"], best["random"], equal_var=False).pvalue)
        lines += ["", "Best validation score over the search seeds: " + ", ".join(
            f"{method} {statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"
            for method, values in best.items()) + f" (Welch p = {p_value:.3g})."]
    lines += ["", "Test, full ranking, supernet weights with the architecture fixed (one-shot, not retrained):", "",
              "| architecture | R@10 | N@10 | MRR@10 | R@50 | N@50 |", "|---|---|---|---|---|---|"]
    for label, arch in candidates.items():
        t = tests[arch]
        lines.append(f"| {label} ({arch}) | {t['recall@10']:.4f} | {t['ndcg@10']:.4f} | {t['mrr@10']:.4f} | "
                     f"{t['recall@50']:.4f} | {t['ndcg@50']:.4f} |")
    (out_dir / "search.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
