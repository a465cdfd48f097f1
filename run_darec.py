"""Train and evaluate any model of recbole-darec or RecBole with one protocol.

    python run_darec.py --model=DARec --dataset=amazon-scientific
    python run_darec.py --model=SASRec --dataset=ml-100k --epochs=5
    python run_darec.py --model=DARec --dataset=amazon-scientific --search=bo      # or --search=random
    python run_darec.py --model=DARec --dataset=ml-100k --baseline=Pop            # and Pop on the same split

Flags are RecBole's: --model, --dataset, --config_files="a.yaml b.yaml", and any --key=value override.
"""

import argparse
import sys

import recbole_darec  # noqa: F401  (compat first)
from recbole_darec.config import Config
from recbole_darec.errors import run_cli
from recbole_darec.quick_start import run_darec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", "-m", type=str, default="DARec", help="model name (ours or RecBole's)")
    parser.add_argument("--dataset", "-d", type=str, default="ml-100k", help="dataset name")
    parser.add_argument("--config_files", type=str, default=None, help="space-separated yaml files")
    parser.add_argument("--baseline", type=str, default=None,
                        help="also train this model (e.g. Pop, SASRec) with the same settings and split, and print "
                             "both test results side by side")
    args, _ = parser.parse_known_args()  # the rest (--key=value) is read by RecBole's Config

    config_file_list = args.config_files.strip().split(" ") if args.config_files else None
    if args.baseline:
        # Its name and settings are checked now, not after the main model has trained.
        Config(model=args.baseline, dataset=args.dataset, config_file_list=config_file_list)
    result = run_darec(model=args.model, dataset=args.dataset, config_file_list=config_file_list)
    print(f"best valid ({result['model']} on {result['dataset']}): {result['best_valid_result']}")
    print(f"test result ({result['model']} on {result['dataset']}): {result['test_result']}")
    if "adapter_arch" in result:
        from recbole_darec.search import describe_arch

        print(f"adapter_arch ({result['search']['method']} search): {describe_arch(result['adapter_arch'])}")
    if args.baseline:
        baseline = run_darec(model=args.baseline, dataset=args.dataset, config_file_list=config_file_list)
        metrics = list(result["test_result"])
        print(f"\ntest results on {result['dataset']} (same split and protocol):")
        print(f"{'model':<12}" + "".join(f"{m:>11}" for m in metrics) + f"{'train s':>9}")
        for row in (result, baseline):
            print(f"{row['model']:<12}" + "".join(f"{row['test_result'][m]:>11.4f}" for m in metrics)
                  + f"{row['train_seconds']:>9.0f}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
