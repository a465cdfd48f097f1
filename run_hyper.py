"""Tune hyper-parameters with RecBole's HyperTuning (hyperopt), in the style of RecBole's run_hyper.py.

    python run_hyper.py --model=DARec --dataset=amazon-scientific --params_file=hyper/darec.hyper --max_evals=20
    python run_hyper.py --model=SASRec --dataset=ml-100k --params_file=my.hyper --algo=exhaustive

Params file, one parameter a line, RecBole's syntax (no comments: every non-blank line is a parameter; a line that
is not one stops the tuning with its line number before the first trial):
    learning_rate loguniform -9.21,-4.61      natural-log bounds: e^-9.21 = 1e-4 .. e^-4.61 = 1e-2
    adapter_size choice [16,32,64]
    dropout uniform 0.0,0.5                   also: quniform low,high,q
--algo: bayes (TPE, default), random, or exhaustive (every combination of the choice parameters; ignores
--max_evals). Other --key=value flags and --config_files fix settings for every trial, as in run_darec.py.

Resumable: every finished trial goes to the tuning log (<output_file without suffix>.trials.jsonl); the same
command started again replays the logged trials instead of training them, resumes a trial cut off mid-training from
its last epoch, and goes on. A larger --max_evals extends a finished tuning.
"""

import argparse
import sys

import recbole_darec  # noqa: F401  (compat first)
from recbole_darec.errors import run_cli
from recbole_darec.hyper import HYPER_ALGOS, hyper_tune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", "-m", type=str, default="DARec", help="model name (ours or RecBole's)")
    parser.add_argument("--dataset", "-d", type=str, default="ml-100k", help="dataset name")
    parser.add_argument("--config_files", type=str, default=None, help="fixed config files, space-separated")
    parser.add_argument("--params_file", type=str, default="hyper/darec.hyper", help="parameters to tune")
    parser.add_argument("--algo", type=str, default="bayes", choices=HYPER_ALGOS, help="search algorithm")
    parser.add_argument("--max_evals", type=int, default=100, help="number of trials (not for exhaustive)")
    parser.add_argument("--early_stop", type=int, default=10, help="stop after this many trials without gain")
    parser.add_argument("--output_file", type=str, default=None, help="results of every trial (default: "
                        "hyper_<model>_<dataset>.result)")
    parser.add_argument("--display_file", type=str, default=None, help="HTML plot of the tuning (plotly)")
    parser.add_argument("--hyper_seed", type=int, default=2020, help="seed of hyperopt's proposals")
    parser.add_argument("--tuning_log", type=str, default=None, help="log of finished trials that makes the run "
                        "resumable (default: <output_file without suffix>.trials.jsonl)")
    args, _ = parser.parse_known_args()  # the rest (--key=value) is read by RecBole's Config in every trial

    config_file_list = args.config_files.strip().split(" ") if args.config_files else None
    output_file = args.output_file or f"hyper_{args.model}_{args.dataset}.result"
    tuner = hyper_tune(
        args.params_file,
        model=args.model,
        dataset=args.dataset,
        config_file_list=config_file_list,
        algo=args.algo,
        max_evals=args.max_evals,
        early_stop=args.early_stop,
        output_file=output_file,
        display_file=args.display_file,
        seed=args.hyper_seed,
        tuning_log=args.tuning_log,
    )
    print("best params: ", tuner.best_params)
    print("best result: ")
    print(tuner.params2result[tuner.params2str(tuner.best_params)])
    print(f"all trials: {output_file}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
