"""Training diagnostics for DARec: a few optimizer steps with the loss parts and signs of representation collapse.

    python benchmarks/diagnose.py --dataset=amazon-scientific --steps=60 --set llm_learning_rate=0.001

Every ``--every`` steps it prints each loss part and the mean pairwise cosine of the batch's user vectors and of
(a sample of) the item vectors with their mean norms. Users whose mean cosine goes to 1 all point one way: the
model can no longer tell them apart. At the end: Recall@10, NDCG@10 and the median rank on the first
``--valid_users`` validation users. Settings: the cpu profile's DARec row (benchmarks/profiles/cpu.yaml), then
``--set``. The optimizer is the trainer's (Adam, DARec's parameter groups).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from run import default_data_path, load_profile, parse_overrides, row_config


def mean_cosine(vectors: torch.Tensor) -> float:
    unit = F.normalize(vectors, dim=-1)
    n = len(unit)
    return float(((unit @ unit.T).sum() - n) / (n * n - n))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="amazon-scientific")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--variant", default="DARec")
    parser.add_argument("--data_path", default=None, help="folder holding <dataset>/ (default: dataset/ or shared)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--valid_users", type=int, default=2048)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    overrides = parse_overrides(args.set)
    model_name, settings = row_config(load_profile(args.profile), args.variant, 2020,
                                      args.data_path or default_data_path(args.dataset),
                                      Path(tempfile.gettempdir()) / "darec-diagnose", overrides)
    settings.update({"show_progress": False, "state": "WARNING"})
    sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value from argv

    from recbole.utils import init_seed

    from recbole_darec.config import Config
    from recbole_darec.data import load_data
    from recbole_darec.utils import get_model, get_trainer

    config = Config(model=model_name, dataset=args.dataset, config_dict=settings)
    init_seed(config["seed"], config["reproducibility"])
    _, train_data, valid_data, _ = load_data(config)
    model = get_model(model_name)(config, train_data._dataset)
    optimizer = get_trainer(config["MODEL_TYPE"], model_name)(config, model).optimizer
    model.train()
    start, step = time.perf_counter(), 0
    while step < args.steps:
        for batch in train_data:
            parts = model.calculate_loss(batch)
            optimizer.zero_grad()
            sum(parts).backward()
            optimizer.step()
            if step % args.every == 0:
                with torch.no_grad():
                    seq, seq_len = batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN]
                    states = model.encode_sequences(seq, seq_len)
                    users = model._user_head(states[torch.arange(seq.shape[1]) < seq_len[:, None]])
                    items = model.state_item_vectors(model.item_cache.states)[1:2001]
                print(f"step {step:4d} {time.perf_counter() - start:6.0f}s losses "
                      + " ".join(f"{float(p):.3f}" for p in parts)
                      + f" | users cos {mean_cosine(users):.3f} norm {users.norm(dim=-1).mean():.1f}"
                      + f" | items cos {mean_cosine(items):.3f} norm {items.norm(dim=-1).mean():.1f}", flush=True)
            step += 1
            if step >= args.steps:
                break

    model.eval()
    ranks = []
    with torch.no_grad():
        for interaction, _, positive_u, positive_i in valid_data:
            scores = model.full_sort_predict(interaction).view(-1, model.n_items)
            scores[:, 0] = float("-inf")
            ranks.append((scores > scores[positive_u, positive_i][:, None]).sum(1) + 1)
            if sum(len(r) for r in ranks) >= args.valid_users:
                break
    rank = torch.cat(ranks)[: args.valid_users].float()
    hit = (rank <= 10).float()
    print(f"valid users {len(rank)}: Recall@10 {hit.mean():.4f} NDCG@10 {(hit / torch.log2(rank + 1)).mean():.4f} "
          f"median rank {rank.median():.0f} of {model.n_items - 1}")

if __name__ == "__main__":
    main()
