"""Valid and test metrics of a saved checkpoint, with the protocol it was trained under (its pickled config).

    python benchmarks/evaluate_checkpoint.py --checkpoint=benchmarks/results/<...>/saved/DARec-<time>.pth
    python benchmarks/evaluate_checkpoint.py --checkpoint=... --set llm_bf16=False   (a setting replaced)
    python benchmarks/evaluate_checkpoint.py --checkpoint=... --prior_weights=0,0.1,0.2   (DARec: the text prior
        added at evaluation, each weight in turn, to choose it on validation)

For a run that is still training (or was stopped), this scores its best checkpoint so far: a snapshot, not a
converged row. Copy the file first if the run is still writing it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from common import parse_overrides

import recbole_darec  # noqa: F401  (compat first)
from recbole_darec.compat import load_trusted_checkpoint
from recbole_darec.recommend import Recommender
from recbole_darec.utils import get_trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="replace a setting of the checkpoint's config (yaml value), e.g. --set llm_bf16=False")
    parser.add_argument("--prior_weights", default="",
                        help="comma-separated text_prior_weight values (DARec), each scored on valid and test")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # RecBole's Config must not read this command line

    from recbole_darec.data import load_data

    overrides = parse_overrides(args.set)
    saved = Recommender(args.checkpoint, overrides)  # the model rebuilt from the checkpoint's config, weights loaded
    config = saved.config
    _, _, valid_data, test_data = load_data(config)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, saved.model)
    result = {"checkpoint": args.checkpoint, "overrides": overrides, "llm_bf16": getattr(saved.model, "llm_bf16", None),
              "epoch": load_trusted_checkpoint(args.checkpoint, map_location="cpu").get("epoch")}

    def scored(into: dict) -> dict:
        for name, data in (("valid", valid_data), ("test", test_data)):
            start = time.perf_counter()
            metrics = trainer.evaluate(data, load_best_model=False, show_progress=False)
            into[name] = {key: round(float(value), 4) for key, value in metrics.items()}
            into[f"{name}_seconds"] = round(time.perf_counter() - start, 1)
        return into

    if not args.prior_weights:
        scored(result)
    else:
        if not hasattr(saved.model, "text_prior_weight"):
            raise SystemExit(f"--prior_weights: {config['model']} has no text prior (text_prior_weight is DARec's)")
        result["by_prior_weight"] = []
        for weight in (float(w) for w in args.prior_weights.split(",")):
            saved.model.text_prior_weight = weight
            result["by_prior_weight"].append(scored({"text_prior_weight": weight}))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
