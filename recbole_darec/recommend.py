"""Top-k recommendations from a saved DARec (or any sequential model of the harness) for an item history.

    python -m recbole_darec.recommend --checkpoint=saved/DARec-Nov-27-2026_01-02-03.pth --history=i001,i002 --topk=10

The checkpoint's pickled Config names model, dataset and data_path: the dataset and model are rebuilt from it, the
saved weights loaded, and the history (raw item ids of the ``.item`` / ``.inter`` files, oldest first) scored
against every item. Nothing is excluded unless ``--exclude_history`` is given.

Items added to the ``.item`` file after training (no interaction yet) are recommended too: DARec reads their text
on demand (the states cached on disk) and ranks them by it; no retraining, and no other item's score changes.
"""

from __future__ import annotations

import argparse
import sys

import torch
from recbole.data.interaction import Interaction
from recbole.utils import init_seed

import recbole_darec  # noqa: F401  (compat first: numpy aliases must exist before recbole is imported)
from recbole_darec.compat import load_trusted_checkpoint
from recbole_darec.data import load_data
from recbole_darec.data.dataset import dataset_item_sentences
from recbole_darec.errors import run_cli
from recbole_darec.utils import build_model


class UnknownItemError(ValueError):
    """History items that the checkpoint's dataset does not know."""


def _refuse_other_shapes(model: torch.nn.Module, saved: dict, checkpoint: str, config, n_items: int) -> None:
    """The checkpoint's weights must have the shapes of the model rebuilt from the dataset as it is now; torch's own
    error is a multi-line "size mismatch" list that does not say the dataset changed since training."""
    current = model.state_dict()
    for key, tensor in saved.items():
        if key in current and tuple(current[key].shape) != tuple(tensor.shape):
            raise ValueError(
                f"{checkpoint}: its weights do not fit dataset '{config['dataset']}' as it is now in "
                f"{config['data_path']} ({n_items} items; {key} has shape {tuple(tensor.shape)} in the checkpoint, "
                f"{tuple(current[key].shape)} now): the dataset's files changed since the model was trained. "
                "Restore them, or train a new model on the current files."
            )


class Recommender:
    """A saved model, rebuilt once, that scores histories (``recommend`` builds one per call)."""

    def __init__(self, checkpoint: str, overrides: dict | None = None) -> None:
        """``overrides``: settings that replace the checkpoint's own before the model is built (e.g. llm_bf16)."""
        state = load_trusted_checkpoint(str(checkpoint), map_location="cpu")
        config = state.get("config")
        if config is None or "state_dict" not in state:
            raise ValueError(f"{checkpoint}: not a checkpoint of this harness (no pickled config / state_dict); "
                             "pass a .pth file written by run_darec.py.")
        if not torch.cuda.is_available():  # a checkpoint trained on a GPU still recommends on a CPU machine
            config["device"] = torch.device("cpu")
        config["show_progress"] = False
        for key, value in (overrides or {}).items():
            config[key] = value
        # A Config unpickled from a checkpoint skipped its __init__, which restores the numpy aliases RecBole's
        # evaluator still uses (np.float in NDCG): without them evaluating this model fails.
        config.compatibility_settings()
        self.config = config
        init_seed(config["seed"], config["reproducibility"])
        dataset, train_data, _, _ = load_data(config)
        self.model = build_model(config, train_data._dataset)
        _refuse_other_shapes(self.model, state["state_dict"], checkpoint, config, dataset.item_num - 1)
        self.model.load_state_dict(state["state_dict"])
        self.model.load_other_parameter(state.get("other_parameter"))
        self.model.eval()
        self.iid_field = config["ITEM_ID_FIELD"]
        self.token2id: dict[str, int] = dict(dataset.field2token_id[self.iid_field])
        self.id2token = list(dataset.field2id_token[self.iid_field])
        self.sentences = list(getattr(train_data._dataset, "item_sentences", None) or [""] * len(self.id2token))
        self.items_added_after_training: list[str] = []  # raw ids this model cannot read (no add_items)
        self._add_new_items()

    def _add_new_items(self) -> None:
        """Rows of the ``.item`` file for items that no interaction of the training data holds (a shop's new items)
        join the catalogue through their text, where the model can read text (DARec's ``add_items``)."""
        sentences = dataset_item_sentences(self.config, self.iid_field) or {}
        new = [token for token in sentences if token not in self.token2id]
        if not new:
            return
        if not hasattr(self.model, "add_items"):
            self.items_added_after_training = new
            return
        self.model.add_items([sentences[token] for token in new])
        for token in new:
            self.token2id[token] = len(self.id2token)
            self.id2token.append(token)
            self.sentences.append(sentences[token])

    def item_ids(self, history: list[str]) -> list[int]:
        if "[PAD]" in history or ("0" in history and "0" not in self.token2id):
            raise UnknownItemError("--history holds a padding id ([PAD] / 0): RecBole's placeholder for 'no item'; "
                                   "give only the raw ids of real items, oldest first.")
        repeated = sorted({item for item in history if history.count(item) > 1})
        if repeated:
            # A repeat in a history given by hand is most likely a pasting mistake, and it weighs that item twice.
            raise UnknownItemError(f"--history names {', '.join(repeated)} more than once; give each item of the "
                                   "history once, oldest first.")
        unknown = [item for item in history if item not in self.token2id]
        after_training = [item for item in unknown if item in self.items_added_after_training]
        if after_training:
            raise UnknownItemError(
                f"item(s) {', '.join(after_training)} of --history came to the .item file after "
                f"{self.config['model']} was trained, and {self.config['model']} cannot read an item it was not "
                "trained with; DARec (the default layout) reads and recommends such items by their text.")
        if unknown:
            examples = ", ".join(self.id2token[1:4])
            raise UnknownItemError(
                f"unknown item id(s) in --history: {', '.join(unknown)}; the dataset '{self.config['dataset']}' "
                f"of this checkpoint has {len(self.id2token) - 1} items (raw ids such as {examples})."
            )
        return [self.token2id[item] for item in history]

    @torch.no_grad()
    def recommend(self, history: list[str], topk: int = 10,
                  exclude_history: bool = False) -> list[tuple[str, str, float]]:
        if not history:
            raise ValueError("--history is empty: give at least one item id (oldest first, comma-separated).")
        if topk <= 0:
            raise ValueError(f"--topk={topk}: must be positive.")
        ids = self.item_ids(history)
        max_len = int(self.config["MAX_ITEM_LIST_LENGTH"])
        recent = ids[-max_len:]  # the model was trained on the last MAX_ITEM_LIST_LENGTH items of a history
        seq = torch.zeros(1, max_len, dtype=torch.long)
        seq[0, : len(recent)] = torch.tensor(recent)
        interaction = Interaction({
            self.model.ITEM_SEQ: seq,
            self.model.ITEM_SEQ_LEN: torch.tensor([len(recent)]),
        }).to(self.config["device"])
        scores = self.model.full_sort_predict(interaction).reshape(-1).float().cpu()
        scores[0] = float("-inf")  # padding id
        if exclude_history:
            scores[torch.tensor(ids)] = float("-inf")
        k = min(topk, int(torch.isfinite(scores).sum()))
        values, indices = torch.topk(scores, k)
        return [(self.id2token[i], self.sentences[i], float(v)) for v, i in zip(values.tolist(), indices.tolist())]


def recommend(checkpoint: str, history: list[str], topk: int = 10,
              exclude_history: bool = False) -> list[tuple[str, str, float]]:
    """Top-``topk`` (item id, item sentence, score) for ``history`` (raw item ids, oldest first), best first."""
    return Recommender(checkpoint).recommend(history, topk=topk, exclude_history=exclude_history)


def format_table(rows: list[tuple[str, str, float]]) -> str:
    width = max([len("item"), *(len(token) for token, _, _ in rows)])
    lines = [f"{'rank':>4}  {'item':<{width}}  {'score':>9}  title"]
    for rank, (token, sentence, score) in enumerate(rows, 1):
        lines.append(f"{rank:>4}  {token:<{width}}  {score:>9.4f}  {sentence}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a .pth file written by run_darec.py")
    parser.add_argument("--history", required=True, help="raw item ids, oldest first, comma-separated")
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--exclude_history", action="store_true", help="do not recommend items of the history")
    args = parser.parse_args(argv)
    history = [item.strip() for item in args.history.split(",") if item.strip()]
    # RecBole's Config (inside load_data's helpers) must not read this command line as --key=value settings.
    sys.argv = sys.argv[:1]
    return run_cli(lambda: print(format_table(
        recommend(args.checkpoint, history, topk=args.topk, exclude_history=args.exclude_history))))


if __name__ == "__main__":
    sys.exit(main())
