"""What both DARec layouts share: the frozen backbone under adapters, the scoring heads, the losses, CF injection,
and the training plumbing (optimizer groups, checkpoints without the backbone, the adapter architecture).

A layout (``darec.py``: lower layers per item, top layers over the history; ``darectokens.py``: the paper's every
token through every layer) says how a history reaches the LLM and where item vectors come from. It provides:

- ``build_item_text(config, hidden_size) -> text_dim``: before the adapters are attached (it may drop layers);
- ``next_item_terms(full_seq, full_len, users) -> NextItemTerms``: L_next and what the auxiliary losses reuse;
- ``user_vectors(interaction) -> (B, D)`` and ``encode_candidates() -> (n_items, D)`` for evaluation;
- ``text_states_for_mining() -> (n_items, text_dim)``: the item text vectors that hard negatives are mined from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType
from torch import nn

from recbole_darec.model.adapters import attach_adapters, parse_adapter_arch, set_architecture
from recbole_darec.model.attention import ATTN_IMPLEMENTATION, attention_mask_dtype, computes_bf16_natively
from recbole_darec.model.backbone import load_backbone
from recbole_darec.model.layout import PAD_BLOCK
from recbole_darec.model.losses import cooccurrence_matrix, hard_negative_loss, info_nce, mine_hard_negatives
from recbole_darec.model.masks import attention_mask


@dataclass
class NextItemTerms:
    """L_next and what the auxiliary losses reuse from it."""

    loss: torch.Tensor
    user_vecs: torch.Tensor  # (P, D) the user after item k ...
    next_items: torch.Tensor  # (P,) ... and item k+1, its target
    item_vecs: torch.Tensor  # (n_items, D) every candidate
    item_text_vecs: torch.Tensor  # (n_items, D) their text part, without the ID vector
    aligned_items: torch.Tensor  # (N,) items whose text vector L_align pulls towards their ID embedding
    aligned_features: torch.Tensor  # (N, text_dim) their text features


class DARecCore(SequentialRecommender):
    input_type = InputType.POINTWISE

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.context_masking = bool(config["context_masking"])
        self.normalize_scores = bool(config["normalize_scores"])
        self.id_residual = bool(config["id_residual"])
        self.temperature = float(config["temperature"])
        self.lambda_align = float(config["lambda_align"] or 0.0)
        self.lambda_hard = float(config["lambda_hard"] or 0.0)
        self.hard_temperature = float(config["hard_temperature"])
        self.hard_text_only = bool(config["hard_text_only"])
        self.n_hard_negatives = int(config["hard_negatives"])
        self.use_item_id = bool(config["use_item_id"])
        self.new_item_id_neighbours = int(config["new_item_id_neighbours"] or 0)
        self.new_item_id_temperature = float(config["new_item_id_temperature"] or 0.05)
        self.item_id_dropout = float(config["item_id_dropout"] or 0.0)
        self.unseen_items_as_negatives = bool(config["unseen_items_as_negatives"])
        self.item_encode_batch_size = int(config["item_encode_batch_size"])
        self.supernet = bool(config["supernet"])
        self.USER_ID = config["USER_ID_FIELD"]
        self.llm_learning_rate = config["llm_learning_rate"]

        # Backbone: frozen, possibly truncated to its first llm_layers layers.
        self.backbone = load_backbone(config["llm_path"], config["llm_layers"], config["llm_random_config"])
        self.llm = self.backbone.model
        hidden_size = self.backbone.hidden_size
        text_dim = self.build_item_text(config, hidden_size, dataset)
        self._configure_llm_pass(config)
        self.n_llm_layers = len(self.backbone.layers)  # the layers with adapters (and an architecture to search)

        # Adapters (two per layer) or LoRA.
        self.adapter_type = config["adapter_type"]
        self.adapter_arch = parse_adapter_arch(config["adapter_arch"], self.n_llm_layers)
        if self.adapter_type == "bottleneck":
            self.adapters, self._adapter_hooks = attach_adapters(
                self.backbone.layers, hidden_size, int(config["adapter_size"]), self.adapter_arch,
                supernet=self.supernet, dropout=float(config["adapter_dropout"] or 0.0),
            )
        elif self.adapter_type == "lora":
            from peft import LoraConfig, inject_adapter_in_model

            lora = LoraConfig(r=int(config["adapter_size"]), lora_alpha=2 * int(config["adapter_size"]),
                              target_modules=list(config["lora_target_modules"]), lora_dropout=0.0)
            self.llm = inject_adapter_in_model(lora, self.llm)
            self.backbone.model = self.llm
            self.adapters = nn.ModuleList()
        else:
            raise ValueError(f"adapter_type={self.adapter_type!r}: expected bottleneck or lora")

        # Scoring heads: user states and item text features into one space of rec_dim.
        rec_dim = int(config["rec_dim"])
        self.user_proj = nn.Linear(hidden_size, rec_dim)
        self.item_proj = nn.Linear(text_dim, rec_dim)
        self.item_id_embedding = nn.Embedding(self.n_items, rec_dim, padding_idx=0)
        nn.init.normal_(self.item_id_embedding.weight, std=0.02)
        self.build_history_inputs(config, hidden_size, rec_dim)

        self.cf_injection = None
        if config["cf_model"]:
            from recbole_darec.model.cf_injection import CFInjection

            self.cf_injection = CFInjection(config, dataset, hidden_size)

        # Training sequences of this (training) dataset, for hard-negative mining (co-occurrence).
        sequences, lengths = dataset.training_sequences()
        self._training_sequences = (sequences, lengths)
        # An item that never occurs in training has an ID embedding that only ever served as a negative: it would
        # bury exactly the items that only their text can find. Such items are scored by their text alone.
        seen = torch.zeros(self.n_items, dtype=torch.bool)
        seen[sequences[sequences > 0]] = True
        self.register_buffer("item_id_known", seen, persistent=False)
        self._step_item_id_kept: torch.Tensor | None = None  # (n_items,) item_id_dropout's draw for this step
        self.register_buffer("hard_negatives", torch.zeros(self.n_items, max(self.n_hard_negatives, 1),
                                                            dtype=torch.long))
        self.register_buffer("hard_negatives_ready", torch.zeros((), dtype=torch.bool))
        self._eval_item_vectors: torch.Tensor | None = None  # (n_items, rec_dim), built once per evaluation
        self._eval_id_vectors: torch.Tensor | None = None  # (n_items, rec_dim), likewise (borrowed_id_vectors)

        self._frozen_keys = {f"llm.{name}" for name, p in self.llm.named_parameters() if not p.requires_grad}
        self._frozen_keys |= {f"llm.{name}" for name, _ in self.llm.named_buffers()}
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        self.logger.info(f"{type(self).__name__} parameters: trainable {trainable:,} / total {total:,} "
                         f"({100 * trainable / total:.2f}%), backbone {self.backbone.name}")

    def build_history_inputs(self, config, hidden_size: int, rec_dim: int) -> None:
        """Modules that carry item vectors into the history (after the heads: their initialisation draws last)."""

    def _configure_llm_pass(self, config) -> None:
        attention = config["attention"] or "sdpa"
        if attention not in ("sdpa", "eager"):
            raise ValueError(f"attention={attention!r}: expected sdpa (memory-efficient) or eager (dense reference)")
        self.llm.set_attn_implementation(ATTN_IMPLEMENTATION if attention == "sdpa" else attention)
        if config["gradient_checkpointing"]:
            # Non-reentrant: the adapters' hooks and dropout run again, with the same RNG state, in the recompute.
            self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        device = torch.device(config["device"])
        bf16 = config["llm_bf16"]
        if bf16 not in ("auto", True, False):
            raise ValueError(f"llm_bf16={bf16!r}: expected auto (bf16 autocast where the device computes bf16 "
                             "natively), True or False")
        self.llm_bf16 = computes_bf16_natively(device) if bf16 == "auto" else bf16
        # CUDA's memory-efficient SDPA kernel copies a mask whose last dimension is not a multiple of 8 in every
        # layer and keeps each copy for backward: padding the tokens avoids the copies.
        self.pad_tokens_to = 8 if device.type == "cuda" else 1

    # ----- the LLM pass ---------------------------------------------------------------------------------------
    def forward(self, inputs_embeds: torch.Tensor, block_ids: torch.Tensor, context_masking: bool | None = None,
                segment_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The backbone's last hidden states (B, T, H) for ``inputs_embeds`` (B, T, H), masked by ``block_ids``
        (and ``segment_ids`` (B, T): several sequences in a row); ``position_ids`` (B, T) default 0..T-1."""
        if context_masking is None:
            context_masking = self.context_masking
        length = block_ids.shape[1]
        if position_ids is None:
            position_ids = torch.arange(length, device=block_ids.device).expand_as(block_ids)
        padding = -length % self.pad_tokens_to
        if padding:  # padding tokens (block -1) are seen by no token
            inputs_embeds = F.pad(inputs_embeds, (0, 0, 0, padding))
            block_ids = F.pad(block_ids, (0, padding), value=PAD_BLOCK)
            position_ids = F.pad(position_ids, (0, padding))
            if segment_ids is not None:
                segment_ids = F.pad(segment_ids, (0, padding), value=PAD_BLOCK)
        mask_dtype = attention_mask_dtype(inputs_embeds.device, block_ids.shape[1], self.llm_bf16)
        mask = attention_mask(block_ids, context_masking, mask_dtype, segment_ids)  # (B, 1, T, T)
        # The adapters act inside this call: attach_adapters hooked them onto every decoder layer's attention and
        # FFN (LoRA: peft replaced the target projections), so the backbone runs as its own code.
        with torch.autocast(inputs_embeds.device.type, dtype=torch.bfloat16, enabled=self.llm_bf16):
            output = self.llm(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids,
                              use_cache=False)
        return output.last_hidden_state[:, :length].float()  # (B, T, H)

    # ----- item vectors and scores ----------------------------------------------------------------------------
    def item_id_vectors(self, item_ids: torch.Tensor | None = None) -> torch.Tensor:
        """ID embeddings (N, D) of ``item_ids`` (default: every item), zero for items that never occur in training
        (and, in a training step, for the items that ``item_id_dropout`` left out); in evaluation with
        ``new_item_id_neighbours``, those items borrow theirs (``borrowed_id_vectors``)."""
        if not self.training and self.new_item_id_neighbours:
            if self._eval_id_vectors is None:
                self._eval_id_vectors = self.borrowed_id_vectors()
            return self._eval_id_vectors if item_ids is None else self._eval_id_vectors[item_ids]
        known = self.item_id_known
        if self.training and self._step_item_id_kept is not None:
            known = self._step_item_id_kept
        if item_ids is None:
            return self.item_id_embedding.weight * known[:, None]
        return self.item_id_embedding(item_ids) * known[item_ids, None]

    def new_items(self) -> torch.Tensor:
        """(n_items,) bool: the items that no training interaction holds (padding aside)."""
        new = ~self.item_id_known
        new[0] = False
        return new

    @torch.no_grad()
    def borrowed_id_vectors(self) -> torch.Tensor:
        """(n_items, D): the ID embeddings, where each of the ``new_items`` takes the mean of the ID vectors of its
        ``new_item_id_neighbours`` nearest items by text among those with a training interaction, weighted by
        softmax(cosine / ``new_item_id_temperature``). A new item then scores by what buyers of items like it did,
        not by its text alone (an untrained item's zero ID vector leaves it below every item that has one); an
        item's text twin lends it the twin's own vector. Items with an ID vector keep theirs."""
        vectors = self.item_id_embedding.weight * self.item_id_known[:, None]  # (n_items, D)
        new_ids, known_ids = self.new_items().nonzero().squeeze(1), self.item_id_known.nonzero().squeeze(1)
        if not len(new_ids) or not len(known_ids):
            return vectors
        unit_text = F.normalize(self.text_states_for_mining().float(), dim=-1)  # (n_items, text_dim)
        k = min(self.new_item_id_neighbours, len(known_ids))
        for chunk in new_ids.split(1024):  # bounded memory for a catalogue of many new items
            similarity = unit_text[chunk] @ unit_text[known_ids].T  # (C, n_known)
            top_similarity, top = similarity.topk(k, dim=1)  # (C, k)
            weights = torch.softmax(top_similarity / self.new_item_id_temperature, dim=1)
            vectors[chunk] = (weights[..., None] * vectors[known_ids[top]]).sum(1).to(vectors.dtype)
        return vectors

    def training_candidates(self) -> torch.Tensor:
        """(n_items,) bool: the items that a training softmax ranks. Without ``unseen_items_as_negatives`` an item
        that no training interaction holds is none of them: in real use a new item does not exist yet when the
        model is trained, and as a negative only it would teach the model to bury the items that only their text
        can find."""
        if self.unseen_items_as_negatives:
            return torch.arange(self.n_items, device=self.item_id_known.device) > 0
        return self.item_id_known

    def plus_item_id(self, text_vectors: torch.Tensor, item_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Candidate vectors (N, D): the text part of ``item_ids`` (default every item), plus their ID part
        (``id_residual``: on the unit text vector)."""
        if self.id_residual:
            text_vectors = F.normalize(text_vectors, dim=-1)
        return text_vectors + self.item_id_vectors(item_ids) if self.use_item_id else text_vectors

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """(P, D) x (N, D) -> (P, N) logits: cosine / temperature (``normalize_scores``), else dot products.

        ``id_residual``: the user's unit vector against the candidate vector as it is, i.e. (cos(user, text) +
        user . ID) / temperature, so an item without an ID vector (a new one) is scored on the scale of every other
        item, by its text alone."""
        if not self.normalize_scores:
            return users @ items.T
        if self.id_residual:
            return F.normalize(users, dim=-1) @ items.T / self.temperature
        # The items' norms scale the product's columns: N is every item, and dividing every candidate vector (with
        # its backward) costs more than the product itself.
        column_scale = 1.0 / (self.temperature * items.norm(dim=-1).clamp_min(1e-12))  # (N,), F.normalize's eps
        return (F.normalize(users, dim=-1) @ items.T) * column_scale

    def all_item_vectors(self) -> torch.Tensor:
        """Every candidate vector (n_items, D), encoded once per evaluation (every call while training)."""
        if self._eval_item_vectors is None or self.training:
            self._eval_item_vectors = self.encode_candidates()
        return self._eval_item_vectors

    # ----- losses ---------------------------------------------------------------------------------------------
    def calculate_loss(self, interaction):
        """(L_next, λ·L_align, λ·L_hard, λ·L_cf), the auxiliary ones where their λ > 0; RecBole sums and logs them."""
        if self.supernet:
            self.sample_architecture()
        if self.item_id_dropout > 0:
            # One draw per step for every item, so an item without its ID vector lacks it in the histories and as a
            # candidate alike: how a new item enters both.
            kept = torch.rand(self.n_items, device=self.item_id_known.device) >= self.item_id_dropout
            self._step_item_id_kept = self.item_id_known & kept
        item_len = interaction[self.ITEM_SEQ_LEN]  # (B,)
        item_seq = interaction[self.ITEM_SEQ][:, : int(item_len.max())]  # (B, L): RecBole pads to the max length
        users = interaction[self.USER_ID] if self.USER_ID in interaction else None
        # The whole training sequence: history plus its last item; a loss at every item boundary.
        full_seq = torch.cat([item_seq, torch.zeros_like(item_seq[:, :1])], dim=1)  # (B, L+1)
        full_seq[torch.arange(len(item_len)), item_len] = interaction[self.POS_ITEM_ID]
        full_len = item_len + 1
        terms = self.next_item_terms(full_seq, full_len, users)
        return (terms.loss, *self._auxiliary_losses(terms, users, full_seq, full_len))

    @staticmethod
    def next_positions(full_seq: torch.Tensor, full_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(has_next (B, L): slot k holds an item with a successor, next_items (P,): those successors)."""
        has_next = torch.arange(full_seq.shape[1] - 1, device=full_seq.device)[None, :] < (full_len - 1)[:, None]
        return has_next, full_seq[:, 1:][has_next]

    def _auxiliary_losses(self, terms: NextItemTerms, users: torch.Tensor | None, full_seq: torch.Tensor,
                          full_len: torch.Tensor) -> list[torch.Tensor]:
        losses = []
        if self.lambda_align > 0:
            # An item's text vector vs. its ID embedding: the text and ID spaces describe the same item.
            text = self.item_proj(terms.aligned_features)
            losses.append(self.lambda_align * info_nce(text, self.item_id_embedding(terms.aligned_items),
                                                       self.temperature))
        if self.lambda_hard > 0:
            self._mine_hard_negatives()
            # hard_text_only: the target against its look-alikes by text part alone, so the ID vectors cannot be
            # what tells them apart.
            candidates = terms.item_text_vecs if self.hard_text_only else terms.item_vecs
            losses.append(self.lambda_hard * hard_negative_loss(terms.user_vecs, candidates, terms.next_items,
                                                                self.hard_negatives[terms.next_items],
                                                                self.hard_temperature,
                                                                normalize_items=not self.id_residual))
        if self.cf_injection is not None and self.cf_injection.lambda_cf > 0:
            losses.append(self.cf_injection.lambda_cf * self.cf_injection.calculate_loss(users, full_seq, full_len))
        return losses

    def _mine_hard_negatives(self) -> None:
        """Mined once, from the untrained model's item text vectors (adapters start at zero), and saved with the
        model."""
        if bool(self.hard_negatives_ready):
            return
        sequences, lengths = self._training_sequences
        cooccurrence = cooccurrence_matrix(sequences, lengths, self.n_items)
        item_states = self.text_states_for_mining().detach().cpu()
        excluded = None if self.unseen_items_as_negatives else ~self.training_candidates().cpu()
        negatives = mine_hard_negatives(item_states, cooccurrence, self.n_hard_negatives, excluded=excluded)
        self.hard_negatives.copy_(negatives.to(self.hard_negatives.device))
        self.hard_negatives_ready.fill_(True)

    # ----- evaluation -----------------------------------------------------------------------------------------
    def predict(self, interaction):
        items = self.all_item_vectors()[interaction[self.ITEM_ID]]  # (B, D)
        return self.score(self.user_vectors(interaction), items).diagonal()  # each user with its own item

    def full_sort_predict(self, interaction):
        item_vecs = self.all_item_vectors()  # (n_items, D)
        return self.score(self.user_vectors(interaction), item_vecs)  # (B, n_items)

    # ----- training plumbing: optimizer groups, checkpoints, architecture -------------------------------------
    def optimizer_param_groups(self) -> list[dict]:
        """Two learning rates: ``llm_learning_rate`` for what acts inside the LLM (adapters, LoRA, DARec's token
        embeddings), ``learning_rate`` for the rest (projections, ID embeddings, CF model).

        The LLM-side weights are shared by every user and item: at the heads' learning rate they move every user
        state in one direction within a few steps (BENCHMARKS.md, learning rates).
        """
        llm_side, heads = [], []
        for name, param in self.named_parameters():
            if param.requires_grad:
                inside = name.startswith(("adapters.", "special_embeddings.", "llm."))
                (llm_side if inside else heads).append(param)
        llm_group = {"params": llm_side}
        if self.llm_learning_rate is not None:  # ~: the optimizer's learning_rate
            llm_group["lr"] = float(self.llm_learning_rate)
        return [{"params": heads}, llm_group] if llm_side else [{"params": heads}]

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        # Checkpoints hold what trains, not the frozen backbone.
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for key in self._frozen_keys:
            state.pop(prefix + key, None)
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [key for key in result.missing_keys if key not in self._frozen_keys]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"{type(self).__name__} checkpoint does not match this model (missing {missing[:5]}, unexpected "
                f"{result.unexpected_keys[:5]}): was it trained with another model, backbone, llm_layers, adapter or "
                "CF setting? Use the same settings as the run that wrote it."
            )
        self.drop_eval_vectors()
        return result

    def training_state(self) -> dict:
        """What the next training step reads besides the state dict (the trainer's resume checkpoint keeps it)."""
        return {}

    def load_training_state(self, state: dict) -> None:
        pass

    def train(self, mode: bool = True):
        # Every switch drops the item vectors, so the next evaluation encodes every item again: weights or the
        # adapter architecture may have changed since the last one without a training step.
        self.drop_eval_vectors()
        return super().train(mode)

    def drop_eval_vectors(self) -> None:
        """Forget the vectors an evaluation keeps (every candidate's, the borrowed ID vectors): the next one
        builds them from the weights and the catalogue as they are then."""
        self._eval_item_vectors = self._eval_id_vectors = None

    def sample_architecture(self) -> list[int]:
        """Supernet training: one serial/parallel choice per layer, uniformly at random."""
        arch = torch.randint(0, 2, (self.n_llm_layers,)).tolist()
        set_architecture(self.adapters, arch)
        return arch

    def set_adapter_arch(self, arch: list[int]) -> None:
        """Fix the supernet's serial/parallel choice per layer (architecture search: score one candidate)."""
        set_architecture(self.adapters, arch)
        self._eval_item_vectors = None  # computed under the previous architecture
