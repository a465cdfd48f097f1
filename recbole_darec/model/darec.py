"""DARec (arXiv 2408.07427): a frozen pretrained decoder-only LLM reads the user's item history as text.

Two ways to feed the history (``history_input``):
- ``tokens`` (the paper's): ``[CF_USER] item_1 tokens [ITEM] item_2 tokens [ITEM] ...`` (layout.py) runs through
  every layer, with adapters in every layer (adapters.py), under a causal or context mask (masks.py). The state at
  the ``[ITEM]`` after item k is the user after k items. An item's vector is its text encoded alone
  (``pack_items``), its ``[ITEM]`` state through ``item_proj``, plus an item-ID embedding.
- ``items``: the lower layers read each item's text alone, once (item_states.py); only the top
  ``sequence_layers`` layers, with adapters, run per user, over one vector per item.
``forward`` is the LLM pass; ``encode_sequences`` / ``encode_item_histories`` / ``encode_items`` build its inputs
and read its outputs. CF vectors (cf_injection.py) enter at ``[CF_USER]`` and at each item. ``calculate_loss`` is
L_next (the state after item k scores every item, target item k+1) plus L_align, L_hard and L_cf.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType
from torch import nn

from recbole_darec.data.item_text import cached_item_tokens
from recbole_darec.model.adapters import attach_adapters, parse_adapter_arch, set_architecture
from recbole_darec.model.backbone import (
    ATTN_IMPLEMENTATION,
    attention_mask_dtype,
    computes_bf16_natively,
    load_backbone,
    outputs_only_at,
)
from recbole_darec.model.item_cache import ItemStateCache
from recbole_darec.model.item_states import cached_item_text_states, drop_lower_layers, pca_whitening
from recbole_darec.model.layout import PAD_BLOCK, SpecialTokens, pack_items, pack_rows, pack_sequences
from recbole_darec.model.losses import cooccurrence_matrix, hard_negative_loss, info_nce, mine_hard_negatives
from recbole_darec.model.masks import attention_mask

# Histories are packed into rows of at least this many tokens (item level: one token per item). Short rows keep the
# attention over a row (masked, but computed in full) small against the per-token layers.
PACKED_ROW_TOKENS = 128


@dataclass
class NextItemTerms:
    """L_next and what the auxiliary losses reuse from it."""

    loss: torch.Tensor
    user_vecs: torch.Tensor  # (P, D) the user after item k ...
    next_items: torch.Tensor  # (P,) ... and item k+1, its target
    item_vecs: torch.Tensor  # (n_items, D) every candidate
    aligned_items: torch.Tensor  # (N,) items whose text vector L_align pulls towards their ID embedding
    aligned_features: torch.Tensor  # (N, text_dim) their text features (whitened or standardised states)


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

        # Backbone: frozen, possibly truncated to its first llm_layers layers.
        self.backbone = load_backbone(config["llm_path"], config["llm_layers"], config["llm_random_config"])
        self.llm = self.backbone.model
        hidden_size = self.backbone.hidden_size

        # Item text as token ids, aligned to RecBole's internal item ids.
        token_ids, token_len = cached_item_tokens(
            dataset.item_sentences, self.backbone.tokenizer, int(config["item_max_tokens"]),
            self.backbone.tokenizer.name, config["item_text_cache_dir"],
        )
        self.register_buffer("item_token_ids", token_ids, persistent=False)
        self.register_buffer("item_token_len", token_len, persistent=False)
        if self.history_input == "items":
            self._build_item_level(config, hidden_size)
        self._configure_llm_pass(config)
        self.n_llm_layers = len(self.backbone.layers)  # the layers with adapters (and an architecture to search)

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
        self.item_cache = ItemStateCache(self.n_items, int(config["item_cache_refresh"]))  # token-level training
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
        self.register_buffer("whitening", projection, persistent=False)  # (H, whiten_dim)
        # The text side of every candidate vector, whitened once here rather than in every step and evaluation.
        self.register_buffer("item_text_features", (states - mean) @ projection, persistent=False)  # (n_items, W)

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
        # CUDA's memory-efficient SDPA kernel copies a mask whose last dimension is not a multiple of 8, in every
        # layer, and keeps each copy for backward; padding the tokens to a multiple of 8 saves those copies.
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

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        vocab = self.backbone.vocab_size
        is_special = input_ids >= vocab
        words = self.backbone.input_embeddings()(input_ids.clamp(max=vocab - 1))  # (B, T, H)
        # Only the few special tokens are written over the words: a where() over every (B, T, H) entry, and its
        # backward, cost 2% of a token-level step.
        special_at = is_special.nonzero(as_tuple=True)
        special = self.special_embeddings(input_ids[special_at] - vocab)  # (S, H)
        return words.index_put(special_at, special.to(words.dtype))

    def encode_sequences(self, seq_items: torch.Tensor, seq_len: torch.Tensor,
                         user_ids: torch.Tensor | None = None) -> torch.Tensor:
        """User states after each item: (B, L, H); slots past ``seq_len`` hold garbage and must be masked."""
        packed = pack_sequences(seq_items, seq_len, self.item_token_ids, self.item_token_len, self.special)
        inputs_embeds = self._embed(packed.input_ids)
        if self.cf_injection is not None:
            inputs_embeds = self.cf_injection.inject(inputs_embeds, user_ids, seq_items, packed.boundary_positions,
                                                     packed.slot_valid)
        # Real tokens lead every row of the layout (padding follows), so a row's token count is its length.
        rows = pack_rows((packed.block_ids != PAD_BLOCK).sum(1), packed.block_ids.shape[1], PACKED_ROW_TOKENS,
                         multiple=self.pad_tokens_to)
        hidden = self(rows.pack(inputs_embeds), rows.pack(packed.block_ids, fill=PAD_BLOCK),
                      segment_ids=rows.segment_ids, position_ids=rows.positions.clamp(min=0))  # (R, C, H)
        hidden = rows.unpack(hidden)  # (B, T, H)
        index = packed.boundary_positions[..., None].expand(-1, -1, hidden.shape[-1])
        return hidden.gather(1, index)  # (B, L, H)

    def encode_item_histories(self, seq_items: torch.Tensor, seq_len: torch.Tensor,
                              user_ids: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """Item-level mode: user states after each item, (B, L, H), from the top layers over one vector per item;
        ``last_only``: the state after each history's last item only, (B, H), at about half the cost.

        History: ``[first] ([CF_USER]) item_1 ... item_L``, item k = its cached text state (the lower layers'
        output) plus its ID vector mapped into the LLM (and its CF vector). A fixed first token takes the
        attention-sink position of a pre-norm decoder, so no item or user vector has to sit there. Several
        histories share a row of the LLM pass (``pack_rows``), each with its own positions from 0.
        """
        batch, n_slots = seq_items.shape
        slot_valid = torch.arange(n_slots, device=seq_items.device)[None, :] < seq_len[:, None]  # (B, L)
        # Only the items a history holds (V of them, history after history): padding slots are most of a batch
        # (histories of 5 items on average, up to 50), and the ID map over them cost a tenth of an evaluation.
        item_ids = seq_items[slot_valid]  # (V,)
        items = self.item_text_states[item_ids]  # (V, H)
        if self.use_item_id:
            items = items + self.id_to_hidden(self.known_item_ids(item_ids))
        prefix = [self.first_token_state.expand(batch, -1)]
        if self.cf_injection is not None:
            user_vec, item_add = self.cf_injection.vectors(user_ids, seq_items, slot_valid)
            items = items + item_add[slot_valid]
            if user_vec is not None:
                prefix.append(user_vec)
        n_prefix = len(prefix)
        rows = pack_rows(n_prefix + seq_len, n_prefix + n_slots, PACKED_ROW_TOKENS, multiple=self.pad_tokens_to)
        position = torch.arange(batch * (n_prefix + n_slots), device=seq_items.device).view(batch, -1)  # (B, P+L)
        tokens = torch.cat([torch.stack(prefix, 1).flatten(0, 1), self.dropout(items)])  # (B*P + V, H)
        at = torch.cat([position[:, :n_prefix].flatten(), position[:, n_prefix:][slot_valid]])  # their flat positions
        inputs = rows.pack_tokens(tokens, at)  # (R, C, H)

        def llm_pass() -> torch.Tensor:  # (R, C, H)
            # One block per position within its history: the block-causal mask over a segment is a causal one.
            return self(inputs, rows.positions, context_masking=True, segment_ids=rows.segment_ids,
                        position_ids=rows.positions.clamp(min=0))

        if not last_only:
            return rows.unpack(llm_pass())[:, n_prefix:]  # (B, L, H)
        last_slots = rows.output_index.view(batch, -1)[torch.arange(batch), n_prefix + seq_len - 1]  # (B,)
        with outputs_only_at(self.backbone.layers[-1], last_slots):
            hidden = llm_pass()
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, last_slots)  # (B, H)

    def encode_items(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(``[ITEM]`` states, ``[ALIGN]`` states) of items encoded alone: (N, H) each."""
        packed = pack_items(items, self.item_token_ids, self.item_token_len, self.special)
        hidden = self(self._embed(packed.input_ids), packed.block_ids)
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

    # ----- user and item vectors, scores ----------------------------------------------------------------------
    def _text_features(self, states: torch.Tensor) -> torch.Tensor:
        """Token-level mode: LLM states standardised per dimension (item level uses ``item_text_features``)."""
        return (states - self.state_mean) / self.state_std

    def _user_head(self, states: torch.Tensor) -> torch.Tensor:
        """User vectors (P, D) from user states (P, H)."""
        if self.history_input == "items":
            return self.user_proj(states)
        return self.user_proj(self._text_features(states))

    def known_item_ids(self, item_ids: torch.Tensor | None = None) -> torch.Tensor:
        """ID embeddings of ``item_ids`` (default: every item), zero for items that never occur in training."""
        if item_ids is None:
            return self.item_id_embedding.weight * self.item_id_known[:, None]
        return self.item_id_embedding(item_ids) * self.item_id_known[item_ids, None]

    def item_vectors(self, item_features: torch.Tensor, item_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Candidate vectors (N, D) of ``item_ids`` (default: every item) from their text features (N, text_dim):
        the projected features, plus the ID embedding (``use_item_id``)."""
        return self._with_item_id(self.item_proj(item_features), item_ids)

    def state_item_vectors(self, item_states: torch.Tensor, item_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Token-level mode: ``item_vectors`` of the standardised ``[ITEM]`` states (N, H), the standardisation
        folded into ``item_proj``'s weights, a (D, H) product: run over every cached state, its two (n_items, H)
        passes cost 13 ms of a token-level step (CPU)."""
        weight = self.item_proj.weight / self.state_std  # (D, H)
        return self._with_item_id(F.linear(item_states, weight, self.item_proj.bias - weight @ self.state_mean),
                                  item_ids)

    def _with_item_id(self, vectors: torch.Tensor, item_ids: torch.Tensor | None) -> torch.Tensor:
        if self.use_item_id:
            vectors = vectors + self.known_item_ids(item_ids)
        return vectors

    def text_item_vectors(self, item_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Item-level mode: candidate vectors from the cached text features, (N, D); default every item."""
        features = self.item_text_features if item_ids is None else self.item_text_features[item_ids]
        return self.item_vectors(features, item_ids)

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """(P, D) x (N, D) -> (P, N) logits: cosine / temperature (``normalize_scores``), else dot products."""
        if not self.normalize_scores:
            return users @ items.T
        # The items' norms scale the product's columns instead of dividing every candidate vector: N is every item
        # (4,386 x 256 here), and that division with its backward was a sixth of an item-level step on a CPU.
        column_scale = 1.0 / (self.temperature * items.norm(dim=-1).clamp_min(1e-12))  # (N,), F.normalize's eps
        return (F.normalize(users, dim=-1) @ items.T) * column_scale

    # ----- losses ---------------------------------------------------------------------------------------------
    def calculate_loss(self, interaction):
        """(L_next, λ·L_align, λ·L_hard, λ·L_cf), the auxiliary ones where their λ > 0; RecBole sums and logs them."""
        if self.supernet:
            self.sample_architecture()
        item_len = interaction[self.ITEM_SEQ_LEN]  # (B,)
        item_seq = interaction[self.ITEM_SEQ][:, : int(item_len.max())]  # (B, L): RecBole pads to the max length
        users = interaction[self.USER_ID] if self.USER_ID in interaction else None
        # The whole training sequence: history plus its last item; a loss at every item boundary.
        full_seq = torch.cat([item_seq, torch.zeros_like(item_seq[:, :1])], dim=1)  # (B, L+1)
        full_seq[torch.arange(len(item_len)), item_len] = interaction[self.POS_ITEM_ID]
        full_len = item_len + 1
        if self.history_input == "items":
            terms = self._next_item_loss_item_level(full_seq, full_len, users)
        else:
            terms = self._next_item_loss_token_level(full_seq, full_len, users)
        return (terms.loss, *self._auxiliary_losses(terms, users, full_seq, full_len))

    @staticmethod
    def _next_positions(full_seq: torch.Tensor, full_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(has_next (B, L): slot k holds an item with a successor, next_items (P,): those successors)."""
        has_next = torch.arange(full_seq.shape[1] - 1, device=full_seq.device)[None, :] < (full_len - 1)[:, None]
        return has_next, full_seq[:, 1:][has_next]

    def _next_item_loss_item_level(self, full_seq: torch.Tensor, full_len: torch.Tensor,
                                   users: torch.Tensor | None) -> NextItemTerms:
        """Every candidate vector is cheap (a projection of a cached state), so L_next is one softmax over all items
        with gradient everywhere: no stale cache and no in-batch negatives drawn in proportion to popularity."""
        states = self.encode_item_histories(full_seq, full_len, users)  # (B, L+1, H)
        has_next, next_items = self._next_positions(full_seq, full_len)
        user_vecs = self._user_head(self.dropout(states[:, :-1][has_next]))  # (P, D): after item k, for item k+1
        item_vecs = self.text_item_vectors()  # (n_items, D)
        logits = self.score(user_vecs, item_vecs)
        logits[:, 0] = float("-inf")
        batch_items = torch.unique(next_items)
        return NextItemTerms(F.cross_entropy(logits, next_items), user_vecs, next_items, item_vecs,
                             batch_items, self.item_text_features[batch_items])

    def _next_item_loss_token_level(self, full_seq: torch.Tensor, full_len: torch.Tensor,
                                    users: torch.Tensor | None) -> NextItemTerms:
        """Two softmaxes, each with candidates encoded by the same weights: every item from the training cache, and
        the batch's target items encoded afresh (with gradient through the adapters on the item side).

        Mixing fresh (this step) and cached (older) item vectors in one softmax lets the model learn "fresh =
        positive" instead of the item: on amazon-scientific that shortcut held the loss near ln(#batch items)
        while validation stayed at chance.
        """
        self.item_cache.refresh(self.encode_all_items)
        states = self.encode_sequences(full_seq, full_len, users)  # (B, L+1, H)
        has_next, next_items = self._next_positions(full_seq, full_len)
        user_vecs = self._user_head(states[:, :-1][has_next])  # (P, D): the state after item k predicts item k+1
        # 1) every item from the cache: trains the user side, item_proj and the ID embeddings;
        item_vecs = self.state_item_vectors(self.item_cache.states)
        logits = self.score(user_vecs, item_vecs)
        logits[:, 0] = float("-inf")
        loss = F.cross_entropy(logits, next_items)
        # 2) the batch's target items encoded afresh.
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
        fresh_vecs = self.state_item_vectors(fresh_states, batch_items)  # (N_fresh, D)
        loss = loss + F.cross_entropy(self.score(fresh_users, fresh_vecs), target_in_batch)
        return NextItemTerms(loss, user_vecs, next_items, item_vecs, batch_items, self._text_features(align_states))

    def _auxiliary_losses(self, terms: NextItemTerms, users: torch.Tensor | None, full_seq: torch.Tensor,
                          full_len: torch.Tensor) -> list[torch.Tensor]:
        losses = []
        if self.lambda_align > 0:
            # An item's text vector (token level: its [ALIGN] state) vs. its ID embedding: the text and ID spaces
            # describe the same item.
            text = self.item_proj(terms.aligned_features)
            losses.append(self.lambda_align * info_nce(text, self.item_id_embedding(terms.aligned_items),
                                                       self.temperature))
        if self.lambda_hard > 0:
            self._mine_hard_negatives()
            losses.append(self.lambda_hard * hard_negative_loss(terms.user_vecs, terms.item_vecs, terms.next_items,
                                                                self.hard_negatives[terms.next_items],
                                                                self.hard_temperature))
        if self.cf_injection is not None and self.cf_injection.lambda_cf > 0:
            losses.append(self.cf_injection.lambda_cf * self.cf_injection.calculate_loss(users, full_seq, full_len))
        return losses

    def _mine_hard_negatives(self) -> None:
        """Mined once, from the untrained model's item states (the backbone's own: adapters start at zero), and
        saved with the model: the text states (item level) or the training cache as first filled (token level)."""
        if bool(self.hard_negatives_ready):
            return
        if self.history_input == "items":
            item_states = self.item_text_features
        else:
            item_states = self.item_cache.states
        sequences, lengths = self._training_sequences
        cooccurrence = cooccurrence_matrix(sequences, lengths, self.n_items)
        negatives = mine_hard_negatives(item_states.detach().cpu(), cooccurrence, self.n_hard_negatives)
        self.hard_negatives.copy_(negatives.to(self.hard_negatives.device))
        self.hard_negatives_ready.fill_(True)

    # ----- evaluation -----------------------------------------------------------------------------------------
    def _user_vectors(self, interaction) -> torch.Tensor:
        item_len = interaction[self.ITEM_SEQ_LEN]
        item_seq = interaction[self.ITEM_SEQ][:, : int(item_len.max())]  # no slots that every row leaves empty
        users = interaction[self.USER_ID] if self.USER_ID in interaction else None
        if self.history_input == "items":
            return self._user_head(self.encode_item_histories(item_seq, item_len, users, last_only=True))
        states = self.encode_sequences(item_seq, item_len, users)
        return self._user_head(states[torch.arange(len(item_len)), item_len - 1])  # after the history's last item

    def _all_item_vectors(self) -> torch.Tensor:
        if self._eval_item_vectors is None or self.training:
            if self.history_input == "items":
                self._eval_item_vectors = self.text_item_vectors()
            else:
                self._eval_item_vectors = self.state_item_vectors(self.encode_all_items())
        return self._eval_item_vectors

    def predict(self, interaction):
        items = self._all_item_vectors()[interaction[self.ITEM_ID]]
        users = self._user_vectors(interaction)
        if self.normalize_scores:
            return (F.normalize(users, dim=-1) * F.normalize(items, dim=-1)).sum(-1) / self.temperature
        return (users * items).sum(-1)

    def full_sort_predict(self, interaction):
        item_vecs = self._all_item_vectors()  # first: encoding all items fixes the state statistics
        return self.score(self._user_vectors(interaction), item_vecs)  # (B, n_items)

    # ----- training plumbing: optimizer groups, checkpoints, resume, architecture -------------------------------
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
                f"DARec checkpoint does not match this model (missing {missing[:5]}, unexpected "
                f"{result.unexpected_keys[:5]}): was it trained with another backbone, llm_layers, adapter or CF "
                "setting? Use the same settings as the run that wrote it."
            )
        self.item_cache.clear()
        self._eval_item_vectors = None
        return result

    def training_state(self) -> dict:
        """What the next training step reads besides the state dict (the trainer's resume checkpoint keeps it)."""
        return self.item_cache.state()

    def load_training_state(self, state: dict) -> None:
        self.item_cache.load_state(state, self.item_token_ids.device)

    def train(self, mode: bool = True):
        # Every switch (RecBole's evaluate() calls eval() once) drops the item vectors: the next evaluation
        # re-encodes every item once. Dropping them only on train(True) kept stale vectors when the weights or the
        # architecture changed between two evaluations without a training step (weights edited in place,
        # adapters.set_architecture called directly instead of set_adapter_arch).
        self._eval_item_vectors = None
        return super().train(mode)

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
        self.item_cache.clear()
