"""Collaborative knowledge injection (design section 4): a RecBole CF model inside DARec.

- ``cf_model: BPR`` (or LightGCN, NeuMF, NGCF) builds that model with RecBole's own class on the training
  interactions only (``data/cf_view.py``): valid and test items never reach it.
- Its user vector, projected to the LLM hidden size, is the ``[CF_USER]`` token's input embedding; item k's vector,
  projected, is added to the input embedding of the ``[ITEM]`` after item k.
- ``L_cf`` is the CF model's own ``calculate_loss`` on the batch users' training interactions, with the negative
  sampling RecBole gives that model (uniform, ``sample_num`` per positive, avoiding the user's training items).
- ``cf_config`` overrides the CF model's hyper-parameters (defaults: RecBole's ``model/<CF>.yaml``);
  ``cf_checkpoint`` starts from a RecBole checkpoint of the same CF model and dataset; ``cf_trainable: False``
  freezes the CF model (bit-identical weights, no ``L_cf``), the projections still train.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import yaml
from recbole.data.dataset import Dataset
from recbole.data.interaction import Interaction
from recbole.utils import InputType
from torch import nn

from recbole_darec.compat import load_trusted_checkpoint
from recbole_darec.config import model_yaml_settings
from recbole_darec.data.cf_view import CFTrainingView
from recbole_darec.utils import get_model

# (cf_model, users (B,) or None, items (N,)) -> (user vectors (B, d) or None, item vectors (N, d))
VectorReader = Callable[[nn.Module, torch.Tensor | None, torch.Tensor], tuple[torch.Tensor | None, torch.Tensor]]

# Resampling rounds for negatives that hit a training item of their user; after that a clash is kept (RecBole's
# sampler also gives up eventually), which only matters for users who interacted with almost every item.
NEGATIVE_RESAMPLE_ROUNDS = 10


def _embedding_tables(user_table: str, item_table: str) -> VectorReader:
    """Embedding-table models: the vectors are rows of two ``nn.Embedding`` tables."""

    def read(model: nn.Module, users: torch.Tensor | None, items: torch.Tensor):
        user_vecs = getattr(model, user_table)(users) if users is not None else None
        return user_vecs, getattr(model, item_table)(items)

    return read


def _neumf_tables(model: nn.Module, users: torch.Tensor | None, items: torch.Tensor):
    # NeuMF has two pairs of tables. The GMF (``*_mf_embedding``) pair is read: its vectors meet in a dot product,
    # like BPR's, so they carry the collaborative signal in the form the projections expect. With mf_train False
    # the GMF tables do not train and the MLP pair (``*_mlp_embedding``) is read instead.
    prefix = "mf" if model.mf_train else "mlp"
    return _embedding_tables(f"user_{prefix}_embedding", f"item_{prefix}_embedding")(model, users, items)


def _propagated(model: nn.Module, users: torch.Tensor | None, items: torch.Tensor):
    # Propagation models: forward() runs the graph convolution over all users and items, (user_all, item_all).
    user_all, item_all = model.forward()
    return (user_all[users] if users is not None else None), item_all[items]


# Supported CF models and how to read their vectors. A model joins when its vectors can be read and its
# calculate_loss needs nothing but user, item and sampled negatives (or labels) from the batch.
CF_VECTOR_READERS: dict[str, VectorReader] = {
    "BPR": _embedding_tables("user_embedding", "item_embedding"),
    "NeuMF": _neumf_tables,
    "LightGCN": _propagated,
    "NGCF": _propagated,
}


class _CFConfig:
    """DARec's config seen by the CF model: its own hyper-parameters first, DARec's config (fields, device) else."""

    def __init__(self, base, own: dict):
        self._base, self._own = base, own

    def __getitem__(self, key: str):
        return self._own[key] if key in self._own else self._base[key]

    def __contains__(self, key: str) -> bool:
        return key in self._own or key in self._base


def _projection(in_dim: int, hidden_size: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))


class CFInjection(nn.Module):
    """A RecBole CF model trained on DARec's training interactions, and the projections of its vectors."""

    def __init__(self, config, dataset: Dataset, hidden_size: int):
        super().__init__()
        self.name = str(config["cf_model"])
        if self.name not in CF_VECTOR_READERS:
            raise ValueError(
                f"cf_model={self.name!r} is not supported; supported CF models: {', '.join(sorted(CF_VECTOR_READERS))} "
                "(names are case-sensitive; cf_model: ~ turns injection off)."
            )
        self._read = CF_VECTOR_READERS[self.name]
        self.cf_trainable = bool(config["cf_trainable"]) if config["cf_trainable"] is not None else True
        self.lambda_cf = float(config["lambda_cf"] or 0.0) if self.cf_trainable else 0.0  # frozen: no L_cf
        self.user_vector = bool(config["cf_user_vector"])

        checkpoint_path = config["cf_checkpoint"]
        checkpoint = load_trusted_checkpoint(checkpoint_path, map_location="cpu") if checkpoint_path else None
        if checkpoint is not None:
            self._check_checkpoint_model(checkpoint, checkpoint_path, config["dataset"])

        # Hyper-parameters: the model's yaml < the checkpoint's values (so its shapes fit) < cf_config.
        own = model_yaml_settings(self.name, getattr(config, "yaml_loader", None) or yaml.FullLoader)
        if checkpoint is not None and checkpoint.get("config") is not None:
            own.update({key: checkpoint["config"][key] for key in own if key in checkpoint["config"]})
        overrides = config["cf_config"] or {}
        if not isinstance(overrides, dict):
            raise ValueError(f"cf_config={overrides!r}: expected a mapping, e.g. cf_config: {{embedding_size: 64}}")
        own.update(overrides)
        # The CF model's own negative sampling (RecBole's default for general models); DARec itself samples none.
        neg_args = {"distribution": "uniform", "sample_num": 1, **(own.get("train_neg_sample_args") or {})}
        if neg_args["distribution"] != "uniform":
            raise ValueError(f"cf_config.train_neg_sample_args.distribution={neg_args['distribution']!r}: only "
                             "uniform negative sampling is supported for the CF model")
        self.neg_sample_num = int(neg_args["sample_num"])
        own["train_neg_sample_args"] = neg_args
        own["model"] = self.name
        self.cf_config = _CFConfig(config, own)

        users, items = dataset.training_pairs()
        self.cf_dataset = CFTrainingView(dataset, users, items)
        self.cf_model = get_model(self.name)(self.cf_config, self.cf_dataset)
        if self.cf_model.input_type not in (InputType.PAIRWISE, InputType.POINTWISE):
            raise ValueError(f"cf_model={self.name}: input type {self.cf_model.input_type} is not supported")
        self.n_items = self.cf_model.n_items
        # Sorted user * n_items + item keys of the training pairs: negative sampling tests membership by search.
        keys = torch.unique(users.long() * self.n_items + items.long())
        self.register_buffer("_training_keys", keys, persistent=False)

        if checkpoint is not None:
            self._load_checkpoint(checkpoint, checkpoint_path, config["dataset"])
        elif not self.cf_trainable:
            warnings.warn("cf_trainable is False without cf_checkpoint: the CF model stays at its random init",
                          stacklevel=2)
        if not self.cf_trainable:
            self.cf_model.requires_grad_(False)
            self.cf_model.eval()

        with torch.no_grad():  # vector sizes, read from the model rather than from per-family config keys
            user_vecs, item_vecs = self._read(self.cf_model, torch.zeros(1, dtype=torch.long),
                                              torch.zeros(1, dtype=torch.long))
        self.user_projection = _projection(user_vecs.shape[-1], hidden_size) if self.user_vector else None
        self.item_projection = _projection(item_vecs.shape[-1], hidden_size)
        # Item vectors are added to the [ITEM] embedding: starting that addition at zero keeps the backbone's text
        # states intact at the start, and the CF signal grows in as the projection trains.
        nn.init.zeros_(self.item_projection[-1].weight)
        nn.init.zeros_(self.item_projection[-1].bias)

    # ----- checkpoints ---------------------------------------------------------------------------------------
    def _check_checkpoint_model(self, checkpoint, path: str, dataset_name: str) -> None:
        if "state_dict" not in checkpoint:
            raise ValueError(f"cf_checkpoint={path}: not a RecBole checkpoint (no 'state_dict')")
        saved = checkpoint.get("config")
        saved_model = saved["model"] if saved is not None else None
        if saved_model is not None and saved_model != self.name:
            raise ValueError(f"cf_checkpoint={path} holds a {saved_model} model, but cf_model={self.name}: "
                             f"set cf_model: {saved_model} or give a {self.name} checkpoint")
        # Ids of another dataset name other users and items, even where the sizes happen to fit.
        if saved is not None and saved["dataset"] != dataset_name:
            raise ValueError(f"cf_checkpoint={path} was trained on dataset {saved['dataset']!r}, this run uses "
                             f"{dataset_name!r}: train one on it first (run_darec.py --model={self.name} "
                             f"--dataset={dataset_name}) and pass that checkpoint.")

    def _load_checkpoint(self, checkpoint, path: str, dataset_name: str) -> None:
        state = checkpoint["state_dict"]
        own = self.cf_model.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        mismatched = [f"{key} {tuple(state[key].shape)} vs {tuple(own[key].shape)}"
                      for key in own if key in state and state[key].shape != own[key].shape]
        if missing or unexpected or mismatched:
            saved_dataset = checkpoint["config"]["dataset"] if checkpoint.get("config") is not None else "?"
            raise ValueError(
                f"cf_checkpoint={path} does not fit this {self.name} (checkpoint dataset {saved_dataset!r}, "
                f"this dataset {dataset_name!r} with {self.cf_model.n_users} users and {self.n_items} items incl. "
                f"padding): shapes checkpoint vs model {mismatched[:4]}, missing {missing[:4]}, unexpected "
                f"{unexpected[:4]}. A CF checkpoint must come from the same dataset (same users and items) and the "
                "same hyper-parameters (cf_config)."
            )
        self.cf_model.load_state_dict(state)
        self.cf_model.load_other_parameter(checkpoint.get("other_parameter"))

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.cf_trainable:
            self.cf_model.eval()  # a frozen CF model is a fixed encoder: no dropout (NeuMF, NGCF) in training
        return self

    # ----- injection ----------------------------------------------------------------------------------------
    def _vectors(self, users: torch.Tensor | None, items: torch.Tensor):
        if self.cf_trainable:
            return self._read(self.cf_model, users, items)
        with torch.no_grad():  # frozen: no graph through the CF model, only through the projections
            return self._read(self.cf_model, users, items)

    def inject(
        self,
        inputs_embeds: torch.Tensor,  # (B, T, H)
        user_ids: torch.Tensor | None,  # (B,)
        seq_items: torch.Tensor,  # (B, L)
        boundary_positions: torch.Tensor,  # (B, L) position of the [ITEM] after item k
        slot_valid: torch.Tensor,  # (B, L)
    ) -> torch.Tensor:
        """Input embeddings with the CF user vector at position 0 and item k's CF vector added at its ``[ITEM]``.

        Without user ids, position 0 keeps its ``[CF_USER]`` token embedding. Out of place: no write touches a
        tensor that needs grad.
        """
        hidden = inputs_embeds.shape[-1]
        user_token, item_add = self.vectors(user_ids, seq_items, slot_valid)
        index = boundary_positions[..., None].expand(-1, -1, hidden)
        # Empty slots point at position 0 with a zero addition; position 0 is replaced below anyway.
        embeds = inputs_embeds.scatter_add(1, index, item_add.to(inputs_embeds.dtype))
        if user_token is None:
            return embeds
        return torch.cat([user_token[:, None].to(inputs_embeds.dtype), embeds[:, 1:]], dim=1)

    def vectors(self, user_ids: torch.Tensor | None, seq_items: torch.Tensor,
                slot_valid: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(user vector (B, H), or None without user ids or ``cf_user_vector``, item vectors (B, L, H), zero in empty
        slots), projected to the LLM's hidden size."""
        user_vecs, item_vecs = self._vectors(user_ids, seq_items.reshape(-1))
        item_add = self.item_projection(item_vecs).view(*seq_items.shape, -1)  # (B, L, H)
        item_add = torch.where(slot_valid[..., None], item_add, 0.0)
        user_token = None if user_ids is None or not self.user_vector else self.user_projection(user_vecs)
        return user_token, item_add

    # ----- L_cf ---------------------------------------------------------------------------------------------
    def _is_training_pair(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        keys = users * self.n_items + items
        if len(self._training_keys) == 0:
            return torch.zeros_like(keys, dtype=torch.bool)
        found = torch.searchsorted(self._training_keys, keys).clamp(max=len(self._training_keys) - 1)
        return self._training_keys[found] == keys

    def sample_negatives(self, users: torch.Tensor) -> torch.Tensor:
        """One uniform item id in [1, n_items) per user entry, resampled while it is a training item of the user."""
        negatives = torch.randint(1, self.n_items, users.shape, device=users.device)
        for _ in range(NEGATIVE_RESAMPLE_ROUNDS):
            clash = self._is_training_pair(users, negatives)
            if not clash.any():
                break
            negatives[clash] = torch.randint(1, self.n_items, (int(clash.sum()),), device=users.device)
        return negatives

    def training_interaction(self, users: torch.Tensor, items: torch.Tensor) -> Interaction:
        """The batch the CF model's calculate_loss expects, as RecBole's samplers would build it.

        Pairwise: positives repeated ``sample_num`` times with a negative item field. Pointwise: the positives
        (label 1) followed by ``sample_num`` negatives each (label 0).
        """
        uid, iid = self.cf_model.USER_ID, self.cf_model.ITEM_ID
        repeated_users = users.repeat(self.neg_sample_num)
        negatives = self.sample_negatives(repeated_users)
        if self.cf_model.input_type == InputType.PAIRWISE:
            return Interaction({uid: repeated_users, iid: items.repeat(self.neg_sample_num),
                                self.cf_model.NEG_ITEM_ID: negatives})
        labels = torch.cat([torch.ones(len(users)), torch.zeros(len(negatives))]).to(users.device)
        return Interaction({uid: torch.cat([users, repeated_users]), iid: torch.cat([items, negatives]),
                            self.cf_config["LABEL_FIELD"]: labels})

    def calculate_loss(self, user_ids: torch.Tensor, full_seq: torch.Tensor, full_len: torch.Tensor) -> torch.Tensor:
        """The CF model's own loss on the batch users' training interactions (``full_seq``, padded with 0)."""
        if user_ids is None:
            raise ValueError(f"cf_model={self.name}: L_cf needs user ids, but the batch has no user id field")
        valid = torch.arange(full_seq.shape[1], device=full_seq.device)[None, :] < full_len[:, None]
        users = user_ids[:, None].expand_as(full_seq)[valid]
        return self.cf_model.calculate_loss(self.training_interaction(users, full_seq[valid]))
