"""New items: how well each model recommends items that no training interaction holds (the inductive case).

    python benchmarks/new_items.py --dataset=amazon-scientific --models=SASRec,TextSASRec,DARec --seeds=2020

1. The split: a random ``--fraction`` of the catalogue's items (fixed by ``--split_seed``) loses every interaction
   in the training part, i.e. all but each user's last two (valid and test targets keep theirs). The items stay in
   the catalogue (RecBole reads the item ids of the ``.item`` file too), so every model ranks all of them. The
   derived files go to ``<out>/saved/data/<dataset>/``; the ids held out to ``<out>/held_out_items.json``.
2. The rows: ``benchmarks/run.py`` with the ``new-items`` profile trains each model on that split, to convergence
   under the usual protocol (its report is ``<out>/results.md``).
3. Every row's best checkpoint ranks the whole catalogue for every test user (RecBole's exclusions: the user's
   earlier items), and the metrics are reported twice: over the users whose test target is a held-out item, and over
   all test users. ``TextSim`` is the text-similarity baseline: no training, each user is the mean of the history's
   item text vectors (the whitened states of the same backbone that DARec and TextSASRec read), scored by cosine.
   Writes ``<out>/new_items.md`` and ``<out>/new_items.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from common import ROOT, default_data_path

TOPK = 10


def read_interactions(source: Path) -> tuple[str, list[list[str]], int, dict[str, list[int]]]:
    """The ``.inter`` file of the dataset in ``source``: (header line, rows, the item column, each user's row
    indices in time order, ties in file order)."""
    lines = (source / f"{source.name}.inter").read_text(encoding="utf-8").splitlines()
    header, rows = lines[0], [line.split("\t") for line in lines[1:] if line]
    columns = [cell.split(":")[0] for cell in header.split("\t")]
    user_col, item_col, time_col = columns.index("user_id"), columns.index("item_id"), columns.index("timestamp")
    by_user: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        by_user.setdefault(row[user_col], []).append(index)
    for indices in by_user.values():
        indices.sort(key=lambda i: (float(rows[i][time_col]), i))
    return header, rows, item_col, by_user


def hold_out_items(source: Path, target: Path, fraction: float, seed: int) -> list[str]:
    """Copy the atomic files of the dataset in ``source`` (a ``<name>/`` folder) to ``target`` with every training
    interaction of a random ``fraction`` of the items removed; returns the raw ids of those items.

    A user's training part is all but their last two interactions in time order (RecBole's leave-one-out split,
    ``LS: valid_and_test``, ``order: TO``); removing earlier interactions leaves the last two where they are.
    """
    name = source.name
    header, rows, item_col, by_user = read_interactions(source)
    items = sorted({row[item_col] for row in rows})
    held_out = set(random.Random(seed).sample(items, round(fraction * len(items))))
    evaluation_rows = {index for indices in by_user.values() for index in indices[-2:]}  # valid and test targets
    kept = [row for index, row in enumerate(rows) if row[item_col] not in held_out or index in evaluation_rows]

    target.mkdir(parents=True, exist_ok=True)
    (target / f"{name}.inter").write_text("\n".join([header, *("\t".join(row) for row in kept)]) + "\n",
                                          encoding="utf-8")
    (target / f"{name}.item").write_bytes((source / f"{name}.item").read_bytes())
    return sorted(held_out)


def last_training_items_held_out(source: Path, held_out: list[str]) -> dict[str, str]:
    """Each user whose training part ends in a held-out item (the third-from-last interaction), and that item.

    The split removes it, so at validation no history ends in a held-out item, while at test one can: the test
    history ends in the validation target, a held-out item for about ``fraction`` of the users. Validation with this
    item put back at the end of the history (``test_like``) faces the test's situation, with nothing from the test
    part: the item is the user's own, from before the validation target, and no model trained on it."""
    _, rows, item_col, by_user = read_interactions(source)
    last = {user: rows[indices[-3]][item_col] for user, indices in by_user.items() if len(indices) >= 3}
    held = set(held_out)
    return {user: item for user, item in last.items() if item in held}


def test_like(valid_data, appended: dict[int, int], model_fields: tuple[str, str, str]):
    """``valid_data``'s batches with ``appended`` (internal user id -> internal item id) put at the end of those
    users' histories (the oldest item drops out of a full one): the validation of ``last_training_items_held_out``.
    Only the item list and its length change (the other ``*_list`` fields, which DARec does not read, stay)."""
    from recbole.data.interaction import Interaction

    uid_field, seq_field, len_field = model_fields
    for interaction, history_index, positive_u, positive_i in valid_data:
        seq, lengths = interaction[seq_field].clone(), interaction[len_field].clone()  # (B, L), (B,)
        for row, user in enumerate(interaction[uid_field].tolist()):
            item = appended.get(user)
            if item is None:
                continue
            n = int(lengths[row])
            if n == seq.shape[1]:
                seq[row, :-1] = seq[row, 1:].clone()
                n -= 1
            seq[row, n] = item
            lengths[row] = n + 1
        fields = {key: interaction[key] for key in interaction.columns}
        fields[seq_field], fields[len_field] = seq, lengths
        yield Interaction(fields), history_index, positive_u, positive_i


def ranks_of(scores: torch.Tensor, history_index, positive_u, positive_i) -> torch.Tensor:
    """(B,) rank of each user's target, 1 = first, under RecBole's full-ranking protocol: padding (and, where
    RecBole masks them, the user's earlier items) are no candidates. A tie counts against the target: items with
    the same text and no ID vector score exactly alike."""
    scores = scores.float().clone()  # (B, n_items)
    scores[:, 0] = float("-inf")
    if history_index is not None:
        scores[history_index] = float("-inf")
    target_scores = scores[positive_u, positive_i]  # (B,): one target per user (leave-one-out)
    return (scores >= target_scores[:, None]).sum(1)  # the target itself included


@torch.no_grad()
def target_ranks(score, test_data, n_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rank of each test user's target among all items (``ranks_of``); the target's internal id)."""
    ranks, targets = [], []
    for interaction, history_index, positive_u, positive_i in test_data:
        ranks.append(ranks_of(score(interaction).view(-1, n_items), history_index, positive_u, positive_i))
        targets.append(positive_i)
    return torch.cat(ranks), torch.cat(targets)


def metrics(ranks: torch.Tensor) -> dict[str, float]:
    """NDCG@10 and Recall@10 of one target per user."""
    hit = (ranks <= TOPK).float()
    return {"ndcg@10": float((hit / torch.log2(ranks.float() + 1)).mean()) if len(ranks) else float("nan"),
            "recall@10": float(hit.mean()) if len(ranks) else float("nan"), "users": len(ranks)}


def text_similarity_scores(item_features: torch.Tensor, model_fields: tuple[str, str]):
    """The no-training baseline: each user is the mean of the history's item text vectors, items are ranked by
    cosine to it."""
    seq_field, len_field = model_fields
    items = torch.nn.functional.normalize(item_features, dim=-1)  # (n_items, W)

    def score(interaction) -> torch.Tensor:
        seq, lengths = interaction[seq_field], interaction[len_field]  # (B, L), (B,)
        valid = (torch.arange(seq.shape[1])[None, :] < lengths[:, None]).float()[..., None]
        users = (items[seq] * valid).sum(1) / valid.sum(1).clamp_min(1.0)  # (B, W)
        return torch.nn.functional.normalize(users, dim=-1) @ items.T  # (B, n_items)

    return score


def split_metrics(ranks: torch.Tensor, targets: torch.Tensor, held_ids: torch.Tensor) -> dict:
    """Metrics over the users whose target is held out, those whose target is not, and all."""
    new = torch.isin(targets, held_ids)
    return {"held_out": metrics(ranks[new]), "seen": metrics(ranks[~new]), "all": metrics(ranks)}


def evaluate(name: str, seed: int | None, score, test_data, n_items: int, held_ids: torch.Tensor) -> dict:
    """One model's ``split_metrics``."""
    entry = {"variant": name, "seed": seed, **split_metrics(*target_ranks(score, test_data, n_items), held_ids)}
    print(f"== {name} (seed {seed}): held-out {entry['held_out']} all {entry['all']}", flush=True)
    return entry


def row_files(out_dir: Path) -> list[Path]:
    """Each row's result file in ``out_dir/rows`` (``<variant>-seed<n>.json``), not the files kept beside it."""
    return [path for path in sorted((out_dir / "rows").glob("*-seed*.json"))
            if path.stem.rsplit("-seed", 1)[1].isdigit()]


def evaluate_rows(out_dir: Path, held_out: list[str], weights: list[float] | None = None,
                  biases: tuple[float, ...] = (0.0,), new_weights: tuple[float | None, ...] = (None,),
                  appended: dict[str, str] | None = None, neighbours: tuple[int, ...] = (0,)) -> list[dict]:
    """Every finished row's best checkpoint (and TextSim on the first text-reading row's data) on held-out and all
    targets. Each row's figures are kept beside it (``rows/<row>.new_items.json``, committed with the row), so a
    clone without the checkpoints still reports it; a row trained again is scored again. With ``weights``, a row
    loaded here is also swept (``prior_sweep``, ``weights`` x ``biases``) while its checkpoint and data are in
    memory, over ``new_weights`` and ``neighbours`` too, and ``appended`` gives it the test-like validation
    (``sweep_row``)."""
    import recbole_darec  # noqa: F401  (compat first)
    from recbole_darec.data import load_data
    from recbole_darec.recommend import Recommender

    results, text_sim_file = [], out_dir / "rows" / "TextSim.new_items.json"
    for row_file in row_files(out_dir):
        row = json.loads(row_file.read_text())
        variant, seed = row_file.stem.rsplit("-seed", 1)
        checkpoint = row.get("saved_model_file")
        # RecBole's own test metrics beside ours: the same ranking, except that its top-k breaks ties by item id.
        # They also tell figures of this very row from those of a row trained before under the same name.
        recbole_test = {key: row["test_result"][key] for key in ("ndcg@10", "recall@10")}
        scored_file = row_file.with_suffix(".new_items.json")
        if scored_file.exists():
            entry = json.loads(scored_file.read_text())
            if entry.get("recbole_test") == recbole_test:
                results.append(entry)
                continue
        if not checkpoint or not Path(checkpoint).is_file():
            print(f"!! {row_file.name}: no checkpoint ({checkpoint}) and no figures of this row, left out", flush=True)
            continue
        saved = Recommender(checkpoint)
        _, _, valid_data, test_data = load_data(saved.config)
        n_items = len(saved.id2token)
        held_ids = torch.tensor([saved.token2id[item] for item in held_out if item in saved.token2id])
        model = saved.model
        entry = evaluate(variant, int(seed), lambda inter, m=model: m.full_sort_predict(inter.to(m.device)),
                         test_data, n_items, held_ids)
        entry["recbole_test"] = recbole_test
        scored_file.write_text(json.dumps(entry, indent=1))
        results.append(entry)
        if weights and hasattr(model, "text_prior_weight"):
            sweep_row(row_file, saved, valid_data, test_data, held_ids,
                      grid(weights, new_weights, biases, neighbours), recbole_test, appended)
        if not text_sim_file.exists() and hasattr(model, "item_text_features"):
            score = text_similarity_scores(model.item_text_features.float().cpu(), (model.ITEM_SEQ, model.ITEM_SEQ_LEN))
            text_sim_file.write_text(json.dumps(evaluate("TextSim", None, score, test_data, n_items, held_ids),
                                                indent=1))
    if text_sim_file.exists():
        results.append(json.loads(text_sim_file.read_text()))
    return results


def prior_sweep(out_dir: Path, held_out: list[str], weights: list[float], biases: tuple[float, ...] = (0.0,),
                new_weights: tuple[float | None, ...] = (None,), appended: dict[str, str] | None = None,
                neighbours: tuple[int, ...] = (0,)) -> list[dict]:
    """Each finished row of a model with a text prior (DARec), its best checkpoint scored with ``text_prior_weight``
    set to each of ``weights``, ``new_item_prior_weight`` to each of ``new_weights`` (None: the same weight),
    ``new_item_bias`` to each of ``biases`` and ``new_item_id_neighbours`` to each of ``neighbours``, at evaluation
    only: the untrained text-similarity ranking added to a trained model's scores, its weight, a lift and borrowed
    ID vectors for the items without a training interaction, to be chosen on validation. Metrics of each split
    (valid, test, and the test-like validation when ``appended`` is given), each split as ``split_metrics`` splits
    them; kept beside the row (``rows/<row>.prior_sweep.json``) like its other figures."""
    import recbole_darec  # noqa: F401  (compat first)
    from recbole_darec.data import load_data
    from recbole_darec.recommend import Recommender

    sweeps = []
    for row_file in row_files(out_dir):
        scored_file = row_file.with_suffix(".new_items.json")
        if not scored_file.exists():
            continue  # not a finished, scored row
        row = json.loads(row_file.read_text())
        sweep_file = row_file.with_suffix(".prior_sweep.json")
        recbole_test = json.loads(scored_file.read_text())["recbole_test"]
        if sweep_file.exists():
            entry = json.loads(sweep_file.read_text())
            if (entry["recbole_test"] == recbole_test
                    and sweep_grid(entry) == grid(weights, new_weights, biases, neighbours)
                    and all(("valid_test_like" in point) == bool(appended) for point in entry["points"])):
                sweeps.append(entry)
                continue
        checkpoint = row.get("saved_model_file")
        if not checkpoint or not Path(checkpoint).is_file():
            continue
        saved = Recommender(checkpoint)
        if not hasattr(saved.model, "text_prior_weight"):
            continue
        _, _, valid_data, test_data = load_data(saved.config)
        held_ids = torch.tensor([saved.token2id[item] for item in held_out if item in saved.token2id])
        sweeps.append(sweep_row(row_file, saved, valid_data, test_data, held_ids,
                                grid(weights, new_weights, biases, neighbours), recbole_test, appended))
    return sweeps


# (text prior weight, its weight on new items or None: the same, new-item bias, new_item_id_neighbours)
Point = tuple[float, "float | None", float, int]


def grid(weights: list[float], new_weights: tuple[float | None, ...], biases: tuple[float, ...],
         neighbours: tuple[int, ...] = (0,)) -> list[Point]:
    """Every combination, neighbours-major, then weight-major."""
    return [(weight, new_weight, bias, k) for k in neighbours for weight in weights for new_weight in new_weights
            for bias in biases]


def sweep_grid(entry: dict) -> list[Point]:
    """The points of a kept sweep; one from before a dimension was swept has its neutral value there."""
    return [(point["weight"], point.get("new_weight"), point.get("bias", 0.0), point.get("neighbours", 0))
            for point in entry["points"]]


@torch.no_grad()
def sweep_row(row_file: Path, saved, valid_data, test_data, held_ids: torch.Tensor, points: list[Point],
              recbole_test: dict, appended: dict[str, str] | None = None) -> dict:
    """One row's loaded checkpoint scored at each point, on validation, test and (with ``appended``, raw user ->
    raw item, from ``last_training_items_held_out``) the test-like validation; written to
    ``rows/<row>.prior_sweep.json``. The model runs twice per batch, without the prior and for the prior's logits
    at weight 1; a point's scores are those two and the bias combined, as DARec combines them. The model runs once
    per ``new_item_id_neighbours`` value of the points."""
    variant, seed = row_file.stem.rsplit("-seed", 1)
    model, n_items = saved.model, len(saved.id2token)
    trained = (model.text_prior_weight, model.new_item_prior_weight, model.new_item_bias,
               model.new_item_id_neighbours)
    new = model.new_items().float().cpu()  # (n_items,): 1 on the items without a training interaction
    splits = {"valid": lambda: valid_data, "test": lambda: test_data}  # each split's batches, fresh per pass
    if appended:
        dataset = valid_data._dataset
        uid_field, iid_field = dataset.uid_field, dataset.iid_field
        user_ids, item_ids = dataset.field2token_id[uid_field], dataset.field2token_id[iid_field]
        internal = {user_ids[user]: item_ids[item] for user, item in appended.items()
                    if user in user_ids and item in item_ids}
        fields = (uid_field, model.ITEM_SEQ, model.ITEM_SEQ_LEN)
        splits["valid_test_like"] = lambda: test_like(valid_data, internal, fields)
    item_weights = {point: model.prior_item_weights(point[0], point[1]).cpu() for point in points}  # (n_items,)
    ranks = {(point, name): [] for point in points for name in splits}
    targets = {(k, name): [] for k in {point[3] for point in points} for name in splits}
    try:
        for k, name in targets:
            model.new_item_id_neighbours = k
            model.eval()  # the item vectors of the last k go
            at_k = [point for point in points if point[3] == k]
            for interaction, history_index, positive_u, positive_i in splits[name]():
                interaction = interaction.to(model.device)
                model.text_prior_weight, model.new_item_prior_weight, model.new_item_bias = 0.0, None, 0.0
                base = model.full_sort_predict(interaction).view(-1, n_items).cpu()  # (B, n_items)
                model.text_prior_weight = 1.0
                prior = model.prior_scores(interaction).cpu()  # (B, n_items): the prior's logits at weight 1
                for point in at_k:
                    scores = base + prior * item_weights[point] + point[2] * new
                    ranks[point, name].append(ranks_of(scores, history_index, positive_u, positive_i))
                targets[k, name].append(positive_i)
    finally:
        (model.text_prior_weight, model.new_item_prior_weight, model.new_item_bias,
         model.new_item_id_neighbours) = trained
        model.eval()
    entry = {"variant": variant, "seed": int(seed), "recbole_test": recbole_test, "trained_weight": trained[0],
             "points": [{"weight": point[0], "new_weight": point[1], "bias": point[2], "neighbours": point[3],
                         **{name: split_metrics(torch.cat(ranks[point, name]), torch.cat(targets[point[3], name]),
                                                held_ids)
                            for name in splits}} for point in points]}
    row_file.with_suffix(".prior_sweep.json").write_text(json.dumps(entry, indent=1))
    return entry


def select_points(points: list[dict], tolerance: float = 0.02) -> tuple[dict, dict]:
    """The two points that validation selects (the test-like validation where the sweep has it): the best N@10
    over all users, and the best held-out Recall@10 among the points within ``tolerance`` of that N@10 (the
    issue's rule for new items: rank them without losing more than 2% over all users)."""
    split = "valid_test_like" if "valid_test_like" in points[0] else "valid"
    best = max(points, key=lambda point: point[split]["all"]["ndcg@10"])
    floor = (1 - tolerance) * best[split]["all"]["ndcg@10"]
    near = [point for point in points if point[split]["all"]["ndcg@10"] >= floor]
    return best, max(near, key=lambda point: point[split]["held_out"]["recall@10"])


def sweep_report(sweeps: list[dict]) -> str:
    """One line per row and point; in bold the weight of the point that validation selects on N@10 over all users
    (the test-like validation where the sweep has it, else the plain one), in italics the one it selects on
    held-out Recall@10 within 2% of that N@10."""
    lines = ["Text prior (`text_prior_weight`; on new items `new_item_prior_weight`, - = the same), new-item bias "
             "(`new_item_bias`) and new items' borrowed ID vectors (`new_item_id_neighbours`, 0 = none) at "
             "evaluation, each row's best checkpoint. Selection on the test-like "
             "validation (each history ends in its held-out item where the split took one off its end), or the "
             "plain one where a sweep has no test-like one: bold, N@10 over all users; italics, held-out R@10 "
             "within 2% of that N@10.", "",
             "| row | seed | neighbours | weight | new-item weight | new-item bias | valid N@10 | test-like valid N@10 "
             "| test-like valid held-out R@10 | held-out test: N@10 | R@10 | seen test: N@10 | R@10 "
             "| all test users: N@10 | R@10 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for entry in sweeps:
        best, reach = select_points(entry["points"])
        for point in entry["points"]:
            weight = f"{point['weight']:g}"
            weight = f"**{weight}**" if point is best else weight
            weight = f"_{weight}_" if point is reach else weight
            new_weight = "-" if point.get("new_weight") is None else f"{point['new_weight']:g}"
            like = point.get("valid_test_like")
            cells = [f"{point['valid']['all']['ndcg@10']:.4f}",
                     *((f"{like['all']['ndcg@10']:.4f}", f"{like['held_out']['recall@10']:.4f}") if like
                       else ("", ""))]
            cells += [f"{point['test'][part][key]:.4f}" for part in ("held_out", "seen", "all")
                      for key in ("ndcg@10", "recall@10")]
            lines.append(f"| {entry['variant']} | {entry['seed']} | {point.get('neighbours', 0)} | {weight} | "
                         f"{new_weight} | "
                         f"{point.get('bias', 0.0):g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def in_profile_order(variants, order: list[str]) -> list[str]:
    """``variants`` once each, TextSim first, then as the profile lists them (others last)."""
    return sorted(set(variants), key=lambda v: -1 if v == "TextSim" else order.index(v) if v in order else len(order))


def report(results: list[dict], header: str, order: list[str]) -> str:
    """The table, TextSim first, then the rows in the profile's order."""
    variants = in_profile_order((entry["variant"] for entry in results), order)
    lines = [header, "", "| model | seeds | held-out targets: N@10 | R@10 | seen targets: N@10 | R@10 | "
             "all test users: N@10 | R@10 |", "|---|---|---|---|---|---|---|---|"]
    for variant in variants:
        runs = [entry for entry in results if entry["variant"] == variant]
        cells = []
        for part in ("held_out", "seen", "all"):
            for key in ("ndcg@10", "recall@10"):
                values = [run[part][key] for run in runs]
                cell = f"{statistics.mean(values):.4f}"
                if len(values) > 1:
                    cell += f" ± {statistics.stdev(values):.4f}"
                cells.append(cell)
        lines.append(f"| {variant} | {len([r for r in runs if r['seed'] is not None]) or '-'} | "
                     + " | ".join(cells) + " |")
    if results:
        users = results[0]
        lines += ["", f"Test users: {users['all']['users']} in all, {users['held_out']['users']} whose target is a "
                      f"held-out item, {users['seen']['users']} whose target has training interactions."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="amazon-scientific")
    parser.add_argument("--models", default="SASRec,TextSASRec,DARec", help="variants of the new-items profile")
    parser.add_argument("--seeds", default="2020")
    parser.add_argument("--fraction", type=float, default=0.1, help="share of the items held out of training")
    parser.add_argument("--split_seed", type=int, default=0, help="which items are held out")
    parser.add_argument("--data_path", default=None, help="folder holding <dataset>/ (default: dataset/ or shared)")
    parser.add_argument("--out", default=None, help="default benchmarks/results/<dataset>-new-items")
    parser.add_argument("--evaluate_only", action="store_true", help="score the finished rows; train nothing")
    parser.add_argument("--run_args", default="", help="more flags for run.py, e.g. '--set epochs=1'")
    parser.add_argument("--prior_weights", default="",
                        help="comma-separated text prior weights to score each DARec row's checkpoint with, at "
                        "evaluation only (e.g. 0,0.1,0.2); the table goes to new_items.md")
    parser.add_argument("--new_item_biases", default="0",
                        help="with --prior_weights: comma-separated new_item_bias values, each with every weight")
    parser.add_argument("--new_item_neighbours", default="0",
                        help="with --prior_weights: comma-separated new_item_id_neighbours values (new items' ID "
                        "vectors borrowed from that many text neighbours; 0: none), each with every other setting")
    parser.add_argument("--new_item_weights", default="",
                        help="with --prior_weights: comma-separated new_item_prior_weight values (the prior's weight "
                        "on new items), each with every weight; the sweep keeps 'the same weight' as one of them")
    args = parser.parse_args()

    out_dir = Path(args.out or ROOT / "benchmarks" / "results" / f"{args.dataset}-new-items").resolve()
    source_root = args.data_path or default_data_path(args.dataset)
    if source_root is None:
        raise SystemExit(f"--dataset={args.dataset}: no prepared {args.dataset}/ in dataset/ or ../shared/datasets; "
                         "give --data_path")
    split_root = out_dir / "saved" / "data"
    held_out = hold_out_items(Path(source_root) / args.dataset, split_root / args.dataset, args.fraction,
                              args.split_seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "held_out_items.json").write_text(json.dumps(
        {"fraction": args.fraction, "split_seed": args.split_seed, "items": held_out}, indent=0))
    print(f"== split: {len(held_out)} items held out of training, files in {split_root / args.dataset}", flush=True)

    if not args.evaluate_only:
        command = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--dataset", args.dataset,
                   "--profile", "new-items", "--models", args.models, "--seeds", args.seeds,
                   "--data_path", str(split_root), "--out", str(out_dir), *args.run_args.split()]
        subprocess.run(command, check=True)

    weights = [float(w) for w in args.prior_weights.split(",")] if args.prior_weights else None
    biases = tuple(float(b) for b in args.new_item_biases.split(","))
    new_weights = (None, *(float(w) for w in args.new_item_weights.split(",") if w))
    neighbours = tuple(int(k) for k in args.new_item_neighbours.split(","))
    appended = last_training_items_held_out(Path(source_root) / args.dataset, held_out)
    results = evaluate_rows(out_dir, held_out, weights, biases, new_weights, appended, neighbours)
    order = list(yaml.safe_load((ROOT / "benchmarks" / "profiles" / "new-items.yaml").read_text())["variants"])
    trained = [entry for entry in results if entry["seed"] is not None]
    models = in_profile_order((entry["variant"] for entry in trained), order)
    seeds = sorted({entry["seed"] for entry in trained})
    # The command that trains (or, with the rows' files present, reports) every row in the table.
    header = (f"Dataset {args.dataset}, {len(held_out)} items ({args.fraction:.0%}, split seed {args.split_seed}) "
              "held out of training.\nCommand: python benchmarks/new_items.py "
              f"--dataset={args.dataset} --models={','.join(models)} --seeds={','.join(map(str, seeds))}"
              + (f" --run_args='{args.run_args}'" if args.run_args else "")
              + (f" --prior_weights={args.prior_weights}" if args.prior_weights else "")
              + (f" --new_item_biases={args.new_item_biases}" if args.prior_weights and biases != (0.0,) else "")
              + (f" --new_item_weights={args.new_item_weights}" if args.prior_weights and args.new_item_weights
                 else "")
              + (f" --new_item_neighbours={args.new_item_neighbours}" if args.prior_weights and neighbours != (0,)
                 else ""))
    text = report(results, header, order)
    if weights:
        text += "\n" + sweep_report(prior_sweep(out_dir, held_out, weights, biases, new_weights, appended, neighbours))
    (out_dir / "new_items.md").write_text(text)
    (out_dir / "new_items.json").write_text(json.dumps(results, indent=1))
    print(text)


if __name__ == "__main__":
    main()
