"""DARec (arXiv 2408.07427): a frozen pretrained decoder-only LLM reads the user's item history as text.

Forward pass, top to bottom:
1. ``pack_sequences``: ``[CF_USER] item_1 tokens [ITEM] item_2 tokens [ITEM] ...`` (layout.py).
2. ``_embed``: frozen word embeddings, trainable embeddings for DARec's own tokens, CF vectors injected at
   ``[CF_USER]`` and at each ``[ITEM]`` (cf_injection.py).
3. ``_run_llm``: the backbone with adapters in every layer (adapters.py) under a causal or context mask (masks.py).
4. The state at the ``[ITEM]`` after item k is the user after k items; ``user_proj`` of it scores every item.
Item vectors: each item's text encoded alone (``pack_items``), its ``[ITEM]`` state through ``item_proj``, plus an
item-ID embedding. Training scores every item from a cache of item states (each re-encoded every
``item_cache_refresh`` steps, a slice per step), and the batch's target items, encoded afresh (with gradient),
in a second in-batch softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType
from torch import nn

from recbole_darec.data.item_text import cached_item_tokens
from recbole_darec.model.adapters import attach_adapters, parse_adapter_arch, set_architecture
from recbole_darec.model.backbone import load_backbone
from recbole_darec.model.item_states import cached_item_text_states, drop_lower_layers, pca_whitening
from recbole_darec.model.layout import SpecialTokens, pack_items, pack_sequences
from recbole_darec.model.losses import cooccurrence_matrix, hard_negative_loss, info_nce, mine_hard_negatives
from recbole_darec.model.masks import attention_mask

# Item-level mode: histories are run through the top layers in groups of this many rows of similar length.
HISTORY_GROUP_ROWS = 16


class DARec(SequentialRecommender):
    input_type = InputType.POINTWISE

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.context_masking = bool(config["context_masking"])
        self.normalize_scores = bool(config["normalize_scores"])
        self.temperature = float(config["temperature"])
        self.lambda_align = float(config["lambda_align"] or 0.0)
        self.lambda_hard = float(config["lambda_hard"] or 0.0)
        self.hard_temperature = float(config["hard_temperature"])
        self.n_hard_negatives = int(config["hard_negatives"])
        self.use_item_id = bool(config["use_item_id"])
        self.item_cache_refresh = int(config["item_cache_refresh"])
        self.item_encode_batch_size = int(config["item_encode_batch_size"])
        self.fresh_items_per_step = int(config["fresh_items_per_step"] or 0)
        self.supernet = bool(config["supernet"])
        self.USER_ID = config["USER_ID_FIELD"]
        self.llm_learning_rate = config["llm_learning_rate"]
        self.history_input = config["history_input"] or "tokens"
        if self.history_input not in ("tokens", "items"):
            raise ValueError(f"history_input={self.history_input!r}: expected tokens (every layer reads every token "
                             "of the history, as in the paper) or items (lower layers read each item alone, top "
                             "layers read one vector per item).")
        for key in ("adapter_size", "train_batch_size", "learning_rate", "llm_learning_rate"):
            if config[key] is not None and config[key] <= 0:
                raise ValueError(f"{key}={config[key]}: must be positive (set it in properties/model/DARec.yaml "
                                 f"or with --{key}=...).")

        # Backbone: frozen, possibly truncated to its first llm_layers layers.
        self.backbone = load_backbone(config["llm_path"], config["llm_layers"], config["llm_random_config"])
        self.llm = self.backbone.model
        hidden_size = self.backbone.hidden_size
        self.n_llm_layers = len(self.backbone.layers)

        # Item text as token ids, aligned to RecBole's internal item ids.
        token_ids, token_len = cached_item_tokens(
            dataset.item_sentences, self.backbone.tokenizer, int(config["item_max_tokens"]),
            self.backbone.tokenizer.name, config["item_text_cache_dir"],
        )
        self.register_buffer("item_token_ids", token_ids, persistent=False)
        self.register_buffer("item_token_len", token_len, persistent=False)

        if self.history_input == "items":
            self._build_item_level(config, hidden_size)
            self.n_llm_layers = len(self.backbone.layers)  # the top layers only: adapters and search live there

        vocab = self.backbone.vocab_size
        self.special = SpecialTokens(item=vocab, align=vocab + 1, cf_user=vocab + 2)
        word_embeddings = self.backbone.input_embeddings().weight
        self.special_embeddings = nn.Embedding(3, hidden_size)
        with torch.no_grad():  # start DARec's tokens at the backbone's mean token, not at noise of another scale
            self.special_embeddings.weight.copy_(word_embeddings.mean(0).expand(3, -1))
            self.special_embeddings.weight.add_(torch.randn(3, hidden_size) * word_embeddings.std() * 0.02)

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

        # Recommendation heads.
        rec_dim = int(config["rec_dim"])
        self.user_proj = nn.Linear(hidden_size, rec_dim)
        text_dim = self.whitening.shape[1] if self.history_input == "items" else hidden_size
        self.item_proj = nn.Linear(text_dim, rec_dim)
        self.item_id_embedding = nn.Embedding(self.n_items, rec_dim, padding_idx=0)
        nn.init.normal_(self.item_id_embedding.weight, std=0.02)
        if self.history_input == "items":
            # The history's item-ID vectors enter the top layers through this map; zero at the start, so an
            # untrained model reads exactly the backbone's own item states.
            self.id_to_hidden = nn.Linear(rec_dim, hidden_size, bias=False)
            nn.init.zeros_(self.id_to_hidden.weight)
            self.dropout = nn.Dropout(float(config["dropout_prob"] or 0.0))

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
        self.register_buffer("hard_negatives", torch.zeros(self.n_items, max(self.n_hard_negatives, 1),
                                                            dtype=torch.long))
        self.register_buffer("hard_negatives_ready", torch.zeros((), dtype=torch.bool))
        self.register_buffer("state_mean", torch.zeros(hidden_size))
        self.register_buffer("state_std", torch.ones(hidden_size))
        self.register_buffer("state_stats_ready", torch.zeros((), dtype=torch.bool))
        self.item_state_cache: torch.Tensor | None = None  # (n_items, hidden) detached, refreshed in training
        self._refresh_cursor = 0  # next item the rolling cache refresh re-encodes
        self._eval_item_vectors: torch.Tensor | None = None  # (n_items, rec_dim), built once per evaluation

        self._frozen_keys = {f"llm.{name}" for name, p in self.llm.named_parameters() if not p.requires_grad}
        self._frozen_keys |= {f"llm.{name}" for name, _ in self.llm.named_buffers()}
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        self.logger.info(f"DARec parameters: trainable {trainable:,} / total {total:,} "
                         f"({100 * trainable / total:.2f}%), backbone {self.backbone.name}")

    def _build_item_level(self, config, hidden_size: int) -> None:
        """``history_input: items``: run the lower layers once per item, keep only the top ``sequence_layers``."""
        n_layers = len(self.backbone.layers)
        sequence_layers = int(config["sequence_layers"] or 0)
        if not 0 < sequence_layers < n_layers:
            raise ValueError(f"sequence_layers={config['sequence_layers']}: with history_input: items it must be "
                             f"between 1 and {n_layers - 1} (the backbone keeps {n_layers} layers: llm_layers).")
        self.n_item_layers = n_layers - sequence_layers
        states, first = cached_item_text_states(
            self.backbone, self.item_token_ids.cpu(), self.item_token_len.cpu(), self.n_item_layers,
            self.context_masking, config["item_text_cache_dir"], self.item_encode_batch_size,
            bf16=bool(config["item_encode_bf16"]),
        )
        drop_lower_layers(self.llm, self.n_item_layers)
        # Item states from text alone (no interaction data), so whitening them leaks nothing.
        mean, projection = pca_whitening(states[1:], int(config["whiten_dim"] or hidden_size))
        self.register_buffer("item_text_states", states, persistent=False)  # (n_items, H), frozen
        self.register_buffer("first_token_state", first, persistent=False)  # (H,)
        self.register_buffer("whitening_mean", mean, persistent=False)
        self.register_buffer("whitening", projection, persistent=False)  # (H, whiten_dim)

    # ----- checkpoints hold what trains, not the frozen backbone -----------------------------------------------
    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for key in self._frozen_keys:
            state.pop(prefix + key, None)
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [key for key in result.missing_keys if key not in self._frozen_keys]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"DARec checkpoint does not match this model (missing {missing[:5]}, unexpected "
                f"{result.unexpected_keys[:5]}): was it trained with another backbone, llm_layers, adapter or CF "
                "setting? Use the same settings as the run that wrote it."
            )
        self.item_state_cache = None
        self._eval_item_vectors = None
        return result

    def optimizer_param_groups(self) -> list[dict]:
        """Two learning rates: ``llm_learning_rate`` for what acts inside the LLM (adapters, LoRA, DARec's token
        embeddings), ``learning_rate`` for the rest (projections, ID embeddings, CF model).

        The LLM-side weights are shared by every user and item: at 1e-3 (SmolLM2, amazon-scientific) they moved all
        user states in one direction within 10 steps (mean cosine 0.57 -> 0.99) and the model never left chance;
        at 1e-4 validation NDCG@10 reached 0.021 after 60 steps.
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

    def training_state(self) -> dict:
        """What the next training step reads besides the state dict: the item-state cache and its refresh cursor.
        The trainer's resume checkpoint stores it, so a resumed run takes the same steps as an uninterrupted one."""
        cache = self.item_state_cache
        return {"item_state_cache": None if cache is None else cache.detach().cpu(),
                "refresh_cursor": self._refresh_cursor}

    def load_training_state(self, state: dict) -> None:
        cache = state.get("item_state_cache")
        self.item_state_cache = None if cache is None else cache.to(self.item_token_ids.device)
        self._refresh_cursor = int(state.get("refresh_cursor", 0))

    def train(self, mode: bool = True):
        # Every switch (RecBole's evaluate() calls eval() once) drops the item vectors: the next evaluation
        # re-encodes every item once. Dropping them only on train(True) kept stale vectors when the weights or the
        # architecture changed between two evaluations without a training step (weights edited in place,
        # adapters.set_architecture called directly instead of set_adapter_arch).
        self._eval_item_vectors = None
        return super().train(mode)

    # ----- the LLM pass ---------------------------------------------------------------------------------------
    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        vocab = self.backbone.vocab_size
        is_special = input_ids >= vocab
        words = self.backbone.input_embeddings()(input_ids.clamp(max=vocab - 1))  # (B, T, H)
        special = self.special_embeddings((input_ids - vocab).clamp(min=0))
        return torch.where(is_special[..., None], special.to(words.dtype), words)

    def _run_llm(self, inputs_embeds: torch.Tensor, block_ids: torch.Tensor,
                 context_masking: bool | None = None) -> torch.Tensor:
        if context_masking is None:
            context_masking = self.context_masking
        mask = attention_mask(block_ids, context_masking, inputs_embeds.dtype)  # (B, 1, T, T)
        position_ids = torch.arange(block_ids.shape[1], device=block_ids.device).expand_as(block_ids)
        output = self.llm(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids,
                          use_cache=False)
        return output.last_hidden_state  # (B, T, H)

    def encode_sequences(self, seq_items: torch.Tensor, seq_len: torch.Tensor,
                         user_ids: torch.Tensor | None = None) -> torch.Tensor:
        """User states after each item: (B, L, H); slots past ``seq_len`` hold garbage and must be masked."""
        packed = pack_sequences(seq_items, seq_len, self.item_token_ids, self.item_token_len, self.special)
        inputs_embeds = self._embed(packed.input_ids)
        if self.cf_injection is not None:
            inputs_embeds = self.cf_injection.inject(inputs_embeds, user_ids, seq_items, packed.boundary_positions,
                                                     packed.slot_valid)
        hidden = self._run_llm(inputs_embeds, packed.block_ids)
        index = packed.boundary_positions[..., None].expand(-1, -1, hidden.shape[-1])
        return hidden.gather(1, index)  # (B, L, H)

    def encode_item_histories(self, seq_items: torch.Tensor, seq_len: torch.Tensor,
                              user_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Item-level mode: user states after each item, (B, L, H), from the top layers over one vector per item.

        Input row: ``[first] ([CF_USER]) item_1 ... item_L``, item k = its cached text state (the lower layers'
        output) plus its ID vector mapped into the LLM (and its CF vector). A fixed first token takes the
        attention-sink position of a pre-norm decoder, so no item or user vector has to sit there.
        """
        batch, n_slots = seq_items.shape
        slot_valid = torch.arange(n_slots, device=seq_items.device)[None, :] < seq_len[:, None]  # (B, L)
        items = self.item_text_states[seq_items]  # (B, L, H)
        if self.use_item_id:
            items = items + self.id_to_hidden(self.known_item_ids(seq_items))
        prefix = [self.first_token_state.expand(batch, 1, -1)]
        if self.cf_injection is not None:
            user_vec, item_add = self.cf_injection.vectors(user_ids, seq_items, slot_valid)
            items = items + item_add
            if user_vec is not None:
                prefix.append(user_vec[:, None])
        inputs = torch.cat([*prefix, self.dropout(items)], dim=1)  # (B, P+L, H)
        n_prefix = len(prefix)
        # One block per position: the context mask reduces to a causal one; padding slots are block -1.
        slot_blocks = torch.where(slot_valid, torch.arange(1, n_slots + 1, device=seq_items.device), -1)
        prefix_blocks = torch.zeros(batch, n_prefix, dtype=torch.long, device=seq_items.device)
        block_ids = torch.cat([prefix_blocks, slot_blocks], dim=1)  # (B, P+L)
        # Histories are short with a long tail (amazon-scientific: mean 5 items, up to 50): rows of similar length
        # run together, each group cut to its own longest row, instead of every row padded to the batch's longest.
        hidden = torch.zeros_like(inputs)
        for rows in torch.argsort(seq_len).split(HISTORY_GROUP_ROWS):
            width = n_prefix + int(seq_len[rows].max())
            hidden[rows, :width] = self._run_llm(inputs[rows, :width], block_ids[rows, :width], context_masking=False)
        return hidden[:, n_prefix:]  # (B, L, H)

    def encode_items(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(``[ITEM]`` states, ``[ALIGN]`` states) of items encoded alone: (N, H) each."""
        packed = pack_items(items, self.item_token_ids, self.item_token_len, self.special)
        hidden = self._run_llm(self._embed(packed.input_ids), packed.block_ids)
        rows = torch.arange(len(items), device=items.device)
        return hidden[rows, packed.item_positions], hidden[rows, packed.align_positions]

    @torch.no_grad()
    def encode_all_items(self, items: torch.Tensor | None = None) -> torch.Tensor:
        """``[ITEM]`` states of ``items`` (default: every item), (N, H), in eval mode (no dropout)."""
        was_training = self.training
        super().train(False)
        if items is None:
            items = torch.arange(self.n_items, device=self.item_token_ids.device)
        states = torch.cat([self.encode_items(chunk)[0] for chunk in items.split(self.item_encode_batch_size)])
        super().train(was_training)
        if not bool(self.state_stats_ready) and len(items) == self.n_items:
            # A pretrained LM's states share one large direction (SmolLM2, 2 layers: mean cosine 0.98 between
            # item states), which swamps cosine scores. Standardise every state with the statistics of the first
            # full encoding (the untrained adapters: the backbone's own states). They stay fixed from then on:
            # refreshing them moved every user and item vector at once and made the loss jump at each refresh.
            self.state_mean.copy_(states[1:].mean(0))
            self.state_std.copy_(states[1:].std(0).clamp_min(1e-4))
            self.state_stats_ready.fill_(True)
        return states

    def standardize(self, states: torch.Tensor) -> torch.Tensor:
        return (states - self.state_mean) / self.state_std

    # ----- scores -------------------------------------------------------------------------------------------
    def known_item_ids(self, item_ids: torch.Tensor) -> torch.Tensor:
        """ID embeddings, zero for items that never occur in training."""
        return self.item_id_embedding(item_ids) * self.item_id_known[item_ids, None]

    def text_item_vectors(self, item_ids: torch.Tensor) -> torch.Tensor:
        """Item-level mode: candidate vectors from the whitened cached text states (plus ID), (N, D)."""
        return self.item_vectors(self.item_text_states[item_ids], item_ids)

    def item_vectors(self, item_states: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
        if self.history_input == "items":
            text = (item_states - self.whitening_mean) @ self.whitening
        else:
            text = self.standardize(item_states)
        vectors = self.item_proj(text)
        if self.use_item_id:
            vectors = vectors + self.known_item_ids(item_ids)
        return vectors

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """(P, D) x (N, D) -> (P, N) logits."""
        if self.normalize_scores:
            return F.normalize(users, dim=-1) @ F.normalize(items, dim=-1).T / self.temperature
        return users @ items.T

    # ----- training -----------------------------------------------------------------------------------------
    def _refresh_item_cache(self) -> None:
        """Keep the training cache of item states at most ``item_cache_refresh`` steps old.

        A rolling refresh: every step re-encodes the next ``n_items / item_cache_refresh`` items, so the cache
        drifts with the weights instead of jumping all at once (a full refresh every k steps made the loss spike).
        """
        if self.item_state_cache is None:
            self.item_state_cache = self.encode_all_items()
            self._refresh_cursor = 1
            if self.lambda_hard > 0:
                self._mine_hard_negatives(self.item_state_cache)  # adapters start at zero: the backbone's states
            return
        per_step = -(-(self.n_items - 1) // max(self.item_cache_refresh, 1))
        items = (self._refresh_cursor - 1 + torch.arange(per_step, device=self.item_token_ids.device))
        items = items % (self.n_items - 1) + 1  # item ids 1..n_items-1, wrapping around
        self.item_state_cache[items] = self.encode_all_items(items)
        self._refresh_cursor = int(items[-1]) % (self.n_items - 1) + 1

    def sample_architecture(self) -> list[int]:
        """Supernet training: one serial/parallel choice per layer, uniformly at random."""
        arch = torch.randint(0, 2, (self.n_llm_layers,)).tolist()
        set_architecture(self.adapters, arch)
        return arch

    def set_adapter_arch(self, arch: list[int]) -> None:
        """Fix the supernet's serial/parallel choice per layer (architecture search: score one candidate)."""
        set_architecture(self.adapters, arch)
        # Cached item states/vectors were computed under the previous architecture.
        self._eval_item_vectors = None
        self.item_state_cache = None

    def _item_level_loss(self, full_seq: torch.Tensor, full_len: torch.Tensor, users: torch.Tensor | None):
        """Item-level mode: every candidate vector is cheap (a projection of a cached state), so L_next is one
        softmax over all items with gradient everywhere: no stale cache and no in-batch negatives that are drawn
        in proportion to popularity."""
        states = self.encode_item_histories(full_seq, full_len, users)  # (B, L+1, H)
        has_next = torch.arange(full_seq.shape[1] - 1, device=full_seq.device)[None, :] < (full_len - 1)[:, None]
        user_vecs = self.user_proj(self.dropout(states[:, :-1][has_next]))  # (P, D): state after item k ...
        next_items = full_seq[:, 1:][has_next]  # (P,) ... predicts item k+1
        all_items = torch.arange(self.n_items, device=full_seq.device)
        item_vecs = self.text_item_vectors(all_items)  # (n_items, D)
        logits = self.score(user_vecs, item_vecs)
        logits[:, 0] = float("-inf")
        losses = [F.cross_entropy(logits, next_items)]
        if self.lambda_align > 0:
            batch_items = torch.unique(next_items)
            text = self.item_proj((self.item_text_states[batch_items] - self.whitening_mean) @ self.whitening)
            losses.append(self.lambda_align * info_nce(text, self.item_id_embedding(batch_items), self.temperature))
        if self.lambda_hard > 0:
            self._mine_hard_negatives((self.item_text_states - self.whitening_mean) @ self.whitening)
            negatives = item_vecs[self.hard_negatives[next_items]]  # (P, K, D)
            losses.append(self.lambda_hard * hard_negative_loss(user_vecs, item_vecs[next_items], negatives,
                                                                self.hard_temperature))
        if self.cf_injection is not None and self.cf_injection.lambda_cf > 0:
            losses.append(self.cf_injection.lambda_cf * self.cf_injection.calculate_loss(users, full_seq, full_len))
        return tuple(losses)

    def _mine_hard_negatives(self, item_states: torch.Tensor) -> None:
        """Mined once, from the untrained model's (the backbone's own) item text states, and saved with the model."""
        if bool(self.hard_negatives_ready):
            return
        sequences, lengths = self._training_sequences
        cooccurrence = cooccurrence_matrix(sequences, lengths, self.n_items)
        negatives = mine_hard_negatives(item_states.detach().cpu(), cooccurrence, self.n_hard_negatives)
        self.hard_negatives.copy_(negatives.to(self.hard_negatives.device))
        self.hard_negatives_ready.fill_(True)

    def calculate_loss(self, interaction):
        if self.supernet:
            self.sample_architecture()
        item_len = interaction[self.ITEM_SEQ_LEN]  # (B,)
        item_seq = interaction[self.ITEM_SEQ][:, : int(item_len.max())]  # (B, L): RecBole pads to the max length
        target = interaction[self.POS_ITEM_ID]  # (B,)
        users = interaction[self.USER_ID] if self.USER_ID in interaction else None
        # The whole training sequence: history plus its last item; a loss at every item boundary.
        full_seq = torch.cat([item_seq, torch.zeros_like(item_seq[:, :1])], dim=1)  # (B, L+1)
        full_seq[torch.arange(len(item_len)), item_len] = target
        full_len = item_len + 1
        if self.history_input == "items":
            return self._item_level_loss(full_seq, full_len, users)

        self._refresh_item_cache()
        states = self.encode_sequences(full_seq, full_len, users)  # (B, L+1, H)
        has_next = torch.arange(full_seq.shape[1] - 1, device=full_seq.device)[None, :] < item_len[:, None]
        user_vecs = self.user_proj(self.standardize(states[:, :-1][has_next]))  # (P, D): state after item k ...
        next_items = full_seq[:, 1:][has_next]  # (P,) ... predicts item k+1

        # L_next has two parts, each with candidates encoded by the same weights. Mixing fresh (this step) and
        # cached (older) item vectors in one softmax lets the model learn "fresh = positive" instead of the item:
        # on amazon-scientific that shortcut held the loss near ln(#batch items) while validation stayed at chance.
        # 1) every item from the cache: trains the user side, item_proj and the ID embeddings;
        all_items = torch.arange(self.n_items, device=item_seq.device)
        item_vecs = self.item_vectors(self.item_state_cache, all_items)  # (n_items, D)
        logits = self.score(user_vecs, item_vecs)
        logits[:, 0] = float("-inf")
        loss_next = F.cross_entropy(logits, next_items)
        # 2) the batch's target items encoded afresh: gradient reaches the item side through the adapters.
        batch_items, target_in_batch = torch.unique(next_items, return_inverse=True)
        fresh_users = user_vecs
        if self.fresh_items_per_step and len(batch_items) > self.fresh_items_per_step:
            # Encoding every distinct target about doubles a step's LLM tokens; a random subset of them (and the
            # positions that predict one) keeps the item-side gradient at a fraction of the cost.
            keep = torch.randperm(len(batch_items), device=batch_items.device)[: self.fresh_items_per_step]
            new_index = torch.full_like(batch_items, -1)
            new_index[keep] = torch.arange(len(keep), device=keep.device)
            batch_items, target_in_batch = batch_items[keep], new_index[target_in_batch]
            fresh_users, target_in_batch = user_vecs[target_in_batch >= 0], target_in_batch[target_in_batch >= 0]
        fresh_states, align_states = self.encode_items(batch_items)
        fresh_vecs = self.item_vectors(fresh_states, batch_items)  # (N_fresh, D)
        loss_next = loss_next + F.cross_entropy(self.score(fresh_users, fresh_vecs), target_in_batch)
        losses = [loss_next]
        if self.lambda_align > 0:
            # [ALIGN] state of an item's text vs. its ID embedding: the text and ID spaces describe the same item.
            aligned = self.item_proj(self.standardize(align_states))
            losses.append(self.lambda_align * info_nce(aligned, self.item_id_embedding(batch_items), self.temperature))
        if self.lambda_hard > 0:
            negatives = item_vecs[self.hard_negatives[next_items]]  # (P, K, D)
            losses.append(self.lambda_hard * hard_negative_loss(user_vecs, item_vecs[next_items], negatives,
                                                                self.hard_temperature))
        if self.cf_injection is not None and self.cf_injection.lambda_cf > 0:
            losses.append(self.cf_injection.lambda_cf * self.cf_injection.calculate_loss(users, full_seq, full_len))
        return tuple(losses)

    # ----- evaluation ---------------------------------------------------------------------------------------
    def _user_vectors(self, interaction) -> torch.Tensor:
        item_len = interaction[self.ITEM_SEQ_LEN]
        item_seq = interaction[self.ITEM_SEQ][:, : int(item_len.max())]  # no slots that every row leaves empty
        users = interaction[self.USER_ID] if self.USER_ID in interaction else None
        if self.history_input == "items":
            states = self.encode_item_histories(item_seq, item_len, users)
            return self.user_proj(states[torch.arange(len(item_len)), item_len - 1])
        states = self.encode_sequences(item_seq, item_len, users)
        last = states[torch.arange(len(item_len)), item_len - 1]  # state after the last item of the history
        return self.user_proj(self.standardize(last))

    def _all_item_vectors(self) -> torch.Tensor:
        if self.history_input == "items":
            return self.text_item_vectors(torch.arange(self.n_items, device=self.item_text_states.device))
        if self._eval_item_vectors is None or self.training:
            all_items = torch.arange(self.n_items, device=self.item_token_ids.device)
            self._eval_item_vectors = self.item_vectors(self.encode_all_items(), all_items)
        return self._eval_item_vectors

    def predict(self, interaction):
        items = self._all_item_vectors()[interaction[self.ITEM_ID]]
        users = self._user_vectors(interaction)
        if self.normalize_scores:
            return (F.normalize(users, dim=-1) * F.normalize(items, dim=-1)).sum(-1) / self.temperature
        return (users * items).sum(-1)

    def full_sort_predict(self, interaction):
        item_vecs = self._all_item_vectors()  # first: encoding all items refreshes the state statistics
        return self.score(self._user_vectors(interaction), item_vecs)  # (B, n_items)
