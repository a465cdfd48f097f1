"""DARecTokens: DARec in the paper's own layout (arXiv 2408.07427), every token of the history through every layer.

A history is one row ``[CF_USER] item_1 tokens [ITEM] item_2 tokens [ITEM] ...`` (layout.py) under the context
mask (masks.py: an item's tokens see each other both ways and earlier items causally), with both adapters in every
layer. The state at the ``[ITEM]`` after item k is the user after k items. An item's vector is its text encoded
alone (``pack_items``), its ``[ITEM]`` state standardised and through ``item_proj``, plus an item-ID embedding. CF
vectors (cf_injection.py) enter at ``[CF_USER]`` and at each ``[ITEM]``.

Every layer runs over every token of 50 items per user: affordable on a GPU. ``DARec`` (darec.py) is the layout
that a CPU trains to convergence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recbole_darec.data.item_text import cached_item_tokens
from recbole_darec.model.darec_core import DARecCore, NextItemTerms
from recbole_darec.model.item_cache import ItemStateCache
from recbole_darec.model.layout import PAD_BLOCK, SpecialTokens, pack_items, pack_rows, pack_sequences

# Histories are packed into rows of at least this many tokens: the attention over a row (masked, but computed in
# full) stays small against the per-token layers.
PACKED_ROW_TOKENS = 128


class DARecTokens(DARecCore):
    def build_item_text(self, config, hidden_size: int, dataset) -> int:
        """Item text as token ids (aligned to RecBole's item ids) and DARec's own tokens; returns the text dim."""
        token_ids, token_len = cached_item_tokens(
            dataset.item_sentences, self.backbone.tokenizer, int(config["item_max_tokens"]),
            self.backbone.tokenizer.name, config["item_text_cache_dir"],
        )
        self.register_buffer("item_token_ids", token_ids, persistent=False)  # (n_items, item_max_tokens)
        self.register_buffer("item_token_len", token_len, persistent=False)  # (n_items,)
        vocab = self.backbone.vocab_size
        self.special = SpecialTokens(item=vocab, align=vocab + 1, cf_user=vocab + 2)
        word_embeddings = self.backbone.input_embeddings().weight
        self.special_embeddings = nn.Embedding(3, hidden_size)
        with torch.no_grad():  # start DARec's tokens at the backbone's mean token, not at noise of another scale
            self.special_embeddings.weight.copy_(word_embeddings.mean(0).expand(3, -1))
            self.special_embeddings.weight.add_(torch.randn(3, hidden_size) * word_embeddings.std() * 0.02)
        # Item states are standardised with statistics frozen once (``freeze_state_statistics``).
        self.register_buffer("state_mean", torch.zeros(hidden_size))
        self.register_buffer("state_std", torch.ones(hidden_size))
        self.register_buffer("state_stats_ready", torch.zeros((), dtype=torch.bool))
        self.fresh_items_per_step = int(config["fresh_items_per_step"] or 0)
        self.item_cache = ItemStateCache(self.n_items, int(config["item_cache_refresh"]))
        return hidden_size

    # ----- the LLM's inputs and outputs -----------------------------------------------------------------------
    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        vocab = self.backbone.vocab_size
        is_special = input_ids >= vocab
        words = self.backbone.input_embeddings()(input_ids.clamp(max=vocab - 1))  # (B, T, H)
        # Only the few special tokens are written over the words, not a where() over every (B, T, H) entry.
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
        nn.Module.train(self, False)  # dropout off, without dropping an evaluation's item vectors (DARecCore.train)
        if items is None:
            items = torch.arange(self.n_items, device=self.item_token_ids.device)
        states = torch.cat([self.encode_items(chunk)[0] for chunk in items.split(self.item_encode_batch_size)])
        nn.Module.train(self, was_training)
        return states

    def freeze_state_statistics(self, states: torch.Tensor | None = None) -> None:
        """Standardise every ``[ITEM]`` state with the statistics of the first full encoding, ``states`` (n_items, H)
        or a fresh one: the untrained model's (adapters start at zero, so the backbone's own states). They stay
        fixed: a pretrained LM's states share one large direction that swamps cosine scores, and refreshing the
        statistics would move every user and item vector at once."""
        if bool(self.state_stats_ready):
            return
        if states is None:
            states = self.encode_all_items()
        self.state_mean.copy_(states[1:].mean(0))
        self.state_std.copy_(states[1:].std(0).clamp_min(1e-4))
        self.state_stats_ready.fill_(True)

    def _standardised(self, states: torch.Tensor) -> torch.Tensor:
        return (states - self.state_mean) / self.state_std

    def item_text_vectors(self, item_states: torch.Tensor) -> torch.Tensor:
        """The text part (N, D) of candidate vectors, from ``[ITEM]`` states (N, H). The standardisation is folded
        into ``item_proj``'s weights: one (D, H) product instead of two (N, H) passes."""
        weight = self.item_proj.weight / self.state_std  # (D, H)
        return F.linear(item_states, weight, self.item_proj.bias - weight @ self.state_mean)

    def item_vectors(self, item_states: torch.Tensor, item_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Candidate vectors (N, D) from ``[ITEM]`` states (N, H) of ``item_ids`` (default every item)."""
        return self.plus_item_id(self.item_text_vectors(item_states), item_ids)

    # ----- training -------------------------------------------------------------------------------------------
    def next_item_terms(self, full_seq: torch.Tensor, full_len: torch.Tensor,
                        users: torch.Tensor | None) -> NextItemTerms:
        """Two softmaxes, each with candidates encoded by the same weights: every item from the training cache, and
        the batch's target items encoded afresh (with gradient through the adapters on the item side).

        Mixing fresh (this step) and cached (older) item vectors in one softmax lets the model learn "fresh =
        positive" instead of the item.
        """
        self.item_cache.refresh(self.encode_all_items)
        self.freeze_state_statistics(self.item_cache.states)
        states = self.encode_sequences(full_seq, full_len, users)  # (B, L+1, H)
        has_next, next_items = self.next_positions(full_seq, full_len)
        user_vecs = self.user_proj(self._standardised(states[:, :-1][has_next]))  # (P, D): after item k, for k+1
        # 1) every item from the cache: trains the user side, item_proj and the ID embeddings;
        item_text_vecs = self.item_text_vectors(self.item_cache.states)  # (n_items, D)
        item_vecs = self.plus_item_id(item_text_vecs)
        logits = self.score(user_vecs, item_vecs)
        logits[:, ~self.training_candidates()] = float("-inf")  # padding too
        loss = F.cross_entropy(logits, next_items)
        # 2) the batch's target items encoded afresh.
        batch_items, target_in_batch = torch.unique(next_items, return_inverse=True)
        fresh_users = user_vecs
        if self.fresh_items_per_step and len(batch_items) > self.fresh_items_per_step:
            # A random subset of the targets (and the positions that predict one) keeps the item-side gradient at
            # a fraction of the cost of encoding every distinct target.
            keep = torch.randperm(len(batch_items), device=batch_items.device)[: self.fresh_items_per_step]
            new_index = torch.full_like(batch_items, -1)
            new_index[keep] = torch.arange(len(keep), device=keep.device)
            batch_items, target_in_batch = batch_items[keep], new_index[target_in_batch]
            fresh_users, target_in_batch = user_vecs[target_in_batch >= 0], target_in_batch[target_in_batch >= 0]
        fresh_states, align_states = self.encode_items(batch_items)
        fresh_vecs = self.item_vectors(fresh_states, batch_items)  # (N_fresh, D)
        loss = loss + F.cross_entropy(self.score(fresh_users, fresh_vecs), target_in_batch)
        return NextItemTerms(loss, user_vecs, next_items, item_vecs, item_text_vecs, batch_items,
                             self._standardised(align_states))

    def text_states_for_mining(self) -> torch.Tensor:
        return self.item_cache.states  # as first filled: the untrained model's

    # ----- evaluation -----------------------------------------------------------------------------------------
    def user_vectors(self, interaction) -> torch.Tensor:
        """(B, D): each history's user after its last item."""
        self.freeze_state_statistics()
        item_len = interaction[self.ITEM_SEQ_LEN]
        item_seq = interaction[self.ITEM_SEQ][:, : int(item_len.max())]  # no slots that every row leaves empty
        users = interaction[self.USER_ID] if self.USER_ID in interaction else None
        states = self.encode_sequences(item_seq, item_len, users)
        return self.user_proj(self._standardised(states[torch.arange(len(item_len)), item_len - 1]))

    def encode_candidates(self) -> torch.Tensor:
        states = self.encode_all_items()
        self.freeze_state_statistics(states)
        return self.item_vectors(states)

    # ----- the training cache travels with checkpoints and resumes --------------------------------------------
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.item_cache.clear()
        return result

    def training_state(self) -> dict:
        return self.item_cache.state()

    def load_training_state(self, state: dict) -> None:
        self.item_cache.load_state(state, self.item_token_ids.device)

    def set_adapter_arch(self, arch: list[int]) -> None:
        super().set_adapter_arch(arch)
        self.item_cache.clear()
