"""A/B/C of the attention of short CPU rows under bf16 autocast (``backbone.CPU_PRODUCT_ATTENTION_BELOW``).

One process builds the speed benchmark's steps (``speed.training_steps``: the DARec step and the plain backbone
steps on the same tokens) and times them in turns, so a slow spell of the machine hits every setting alike, with the
rows shorter than the threshold run
- as shipped: bf16 matrix products around a float32 softmax (``backbone._attention_as_products``);
- through PyTorch's SDPA kernel in float32 (the path until commit 0b711f7);
- through the SDPA kernel in bf16, as autocast runs it (threshold 0).
It also times evaluation (``full_sort_predict`` over every test user, 3 passes) each way. Prints a markdown table of
medians with quartiles; ``--out`` also writes it, with the raw seconds as JSON.

    OMP_NUM_THREADS=2 python benchmarks/short_row_attention_ab.py --dataset=amazon-scientific --profile=cpu \
        --models=DARec-tokens,DARec --out=benchmarks/results/short-row-attention-ab-cpu
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from run import default_data_path, load_profile, row_config  # benchmarks/ is sys.path[0] for a script
from speed import _quartiles, _seconds, training_steps

from recbole_darec.model import backbone

PRODUCTS, THRESHOLD = backbone._attention_as_products, backbone.CPU_PRODUCT_ATTENTION_BELOW


def float32_kernel(module, query, key, value, attention_mask, **kwargs) -> torch.Tensor:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    mask = None if attention_mask is None else attention_mask.float()
    with torch.autocast("cpu", enabled=False):  # autocast would cast SDPA's inputs back to bf16
        output, _ = sdpa_attention_forward(module, query.float(), key.float(), value.float(), mask, **kwargs)
    return output.bfloat16()


SETTINGS = {"products (now)": (PRODUCTS, THRESHOLD), "SDPA kernel, float32 (0b711f7)": (float32_kernel, THRESHOLD),
            "SDPA kernel, bf16": (PRODUCTS, 0)}


def ab_rows(model_name: str, dataset: str, config_dict: dict, steps: int) -> dict:
    built = training_steps(model_name, dataset, config_dict)
    if not built.model.llm_bf16:
        raise SystemExit(f"{model_name}: llm_bf16 is off on this machine, so every setting runs float32")
    runs = {"darec": built.darec_step, **built.plain_steps}
    seconds = {setting: {name: [] for name in runs} for setting in SETTINGS}
    for _ in range(steps + 1):  # the first round warms up
        for setting, short_rows in SETTINGS.items():
            use(*short_rows)
            for name, run in runs.items():
                seconds[setting][name].append(_seconds(run))
    # Evaluation: full_sort_predict over every test user, batch by batch in turns, 3 passes after a warm-up batch.
    model, batches = built.model.eval(), [batch[0] for batch in built.test_data]
    eval_seconds = {setting: [] for setting in SETTINGS}
    with torch.no_grad():
        model.full_sort_predict(batches[0])  # builds the item vectors, once per evaluation
        for _ in range(3):
            totals = dict.fromkeys(SETTINGS, 0.0)
            for batch in batches:
                for setting, short_rows in SETTINGS.items():
                    use(*short_rows)
                    totals[setting] += _seconds(lambda b=batch: model.full_sort_predict(b))
            for setting, total in totals.items():
                eval_seconds[setting].append(total)
    use(PRODUCTS, THRESHOLD)
    users = sum(len(batch) for batch in batches)
    return {setting: {**{name: values[1:] for name, values in per_run.items()},
                      "eval_ms_per_user": [1000 * total / users for total in eval_seconds[setting]]}
            for setting, per_run in seconds.items()}


def use(short_rows, threshold: int) -> None:
    backbone._attention_as_products, backbone.CPU_PRODUCT_ATTENTION_BELOW = short_rows, threshold


def table(results: dict) -> str:
    lines = ["| model | setting | DARec step s | plain step s (histories) | ratio | plain every token s | "
             "ratio, every token | eval ms/user |", "|---|---|---|---|---|---|---|---|"]

    def cell(values: list[float]) -> str:
        q1, median, q3 = _quartiles(values)
        return f"{median:.3f} [{q1:.3f}-{q3:.3f}]"

    for model_name, per_setting in results.items():
        for setting, runs in per_setting.items():
            darec = runs["darec"]
            cells = [cell(darec), cell(runs["plain"]), cell([d / p for d, p in zip(darec, runs["plain"])])]
            if "plain_all" in runs:
                cells += [cell(runs["plain_all"]), cell([d / p for d, p in zip(darec, runs["plain_all"])])]
            else:
                cells += ["-", "-"]
            cells.append(cell(runs["eval_ms_per_user"]))
            lines.append(f"| {model_name} | {setting} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="amazon-scientific")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--models", default="DARec-tokens,DARec")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True, help="folder for table.md and seconds.json")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value from argv
    profile, results = load_profile(args.profile), {}
    out_dir = args.out.resolve()
    for variant in args.models.split(","):
        model_name, settings = row_config(profile, variant, 2020, default_data_path(args.dataset), out_dir, {})
        results[variant] = ab_rows(model_name, args.dataset, settings, args.steps)
    text = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dataset}, profile {args.profile}; "
            f"medians of {args.steps} steps per setting, run in turns, quartiles in brackets\n\n{table(results)}\n")
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(text)
    (args.out / "seconds.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
