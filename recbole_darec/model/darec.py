"""DARec (arXiv 2408.07427): a frozen pretrained decoder-only LLM, adapted by two bottleneck adapters per layer,
reads the user's item history as text.

The history reaches the LLM in two stages of one backbone (as HLLM, arXiv 2409.12740, uses two models):
- the lower layers read each item's text alone, once: their output at the item's last token is computed once per
  item and cached (item_states.py); they carry no adapters;
- the top ``sequence_layers`` layers, with the adapters, read the history as ``item_positions`` (K) positions per
  item: ``[first] ([CF_USER]) item_1 ... item_L`` under the context mask (an item's positions see each other both
  ways, earlier items causally), where item k's positions are the states of K parts of its text plus its ID vector
  mapped into the LLM, and its CF vector (cf_injection.py) added to them or as one more position of the item.
The state after item k, through ``user_proj``, scores every item's vector: its whitened text state through
``item_proj`` plus its ID embedding; ``text_prior_weight`` adds the untrained cosine of the history's mean text
with each item's text to the rankings, ``new_item_bias`` a constant to the items without a training interaction.
``calculate_loss`` (darec_core.py) is L_next (one softmax over all items at every item boundary) plus L_align,
L_hard and L_cf.

The paper's own layout, every token of the history through every layer, is ``DARecTokens`` (darectokens.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recbole_darec.model.backbone import load_backbone, outputs_only_at
from recbole_darec.model.darec_core import DARecCore, NextItemTerms
from recbole_darec.model.item_states import drop_lower_layers, read_item_text
from recbole_darec.model.layout import PAD_BLOCK, pack_rows

# Histories are packed into rows of at least this many positions: the attention over a row (masked, but computed
# in full) stays small against the per-position layers.
PACKED_ROW_TOKENS = 128
# Settings of the token-level layout that older DARec checkpoints held; this layout has no use for them.
TOKEN_LAYOUT_KEYS = ("special_embeddings.weight", "state_mean", "state_std", "state_stats_ready")


def running_mean(features: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
    """(B, L, W): at each position k of ``seq`` (B, L), the mean of ``features`` (B, L, W) over its items 1..k,
    padding (id 0) left out."""
    valid = (seq > 0).unsqueeze(-1).to(features.dtype)  # (B, L, 1)
    return (features * valid).cumsum(1) / valid.cumsum(1).clamp(min=1)


class DARec(DARecCore):
    def build_item_text(self, config, hidden_size: int, dataset) -> int:
        """Run the lower layers once per item and keep only the top ``sequence_layers``; returns the text dim."""
        n_layers = len(self.backbone.layers)
        sequence_layers = int(config["sequence_layers"] or 0)
        if not 0 < sequence_layers < n_layers:
            raise ValueError(f"sequence_layers={config['sequence_layers']}: must be between 1 and {n_layers - 1} "
                             f"(the backbone keeps {n_layers} layers: llm_layers).")
        self.item_positions = int(config["item_positions"] or 1)
        self.last_item_skip = bool(config["last_item_skip"])
        self.history_text_skip = bool(config["history_text_skip"])
        self.text_prior_weight = float(config["text_prior_weight"] or 0.0)
        self.text_prior_in_training = bool(config["text_prior_in_training"])
        self.new_item_bias = float(config["new_item_bias"] or 0.0)
        new_weight = config["new_item_prior_weight"]
        self.new_item_prior_weight = None if new_weight is None else float(new_weight)
        self.text_prior_chosen = False  # set by DARecTrainer once validation has chosen text_prior_weight
        self.cf_as_position = bool(config["cf_as_position"])
        self.n_item_layers = n_layers - sequence_layers
        item_text = read_item_text(self.backbone, dataset.item_sentences, config, self.n_item_layers,
                                   int(config["whiten_dim"] or hidden_size), n_segments=self.item_positions)
        drop_lower_layers(self.llm, self.n_item_layers)
        self.register_buffer("item_token_ids", item_text.token_ids, persistent=False)  # (n_items, item_max_tokens)
        self.register_buffer("item_token_len", item_text.token_len, persistent=False)  # (n_items,)
        # What an item puts into the history: its text as K positions (K parts of its text) or one (all of it).
        history_states = item_text.states[:, None] if self.item_positions == 1 else item_text.segment_states
        self.register_buffer("item_text_states", history_states, persistent=False)  # (n_items, K, H), frozen
        self.register_buffer("first_token_state", item_text.first_token_state, persistent=False)  # (H,)
        self.register_buffer("item_text_features", item_text.features, persistent=False)  # (n_items, W)
        self.whitening = item_text.whitening  # fitted on the catalogue's text: items added later take it as it is
        self._item_text_config = config  # how items added later are read: backbone, tokens, cache
        return item_text.features.shape[1]

    def build_history_inputs(self, config, hidden_size: int, rec_dim: int) -> None:
        # The history's item-ID vectors enter the top layers through this map; zero at the start, so an untrained
        # model reads exactly the backbone's own item states.
        self.id_to_hidden = nn.Linear(rec_dim, hidden_size, bias=False)
        nn.init.zeros_(self.id_to_hidden.weight)
        if self.history_text_skip:
            weight = config["history_skip_weight"]
            if weight is None:  # learned, from an equal share with the last item
                self.history_skip_weight = nn.Parameter(torch.ones(()))
            else:
                self.register_buffer("history_skip_weight", torch.tensor(float(weight)))
        self.dropout = nn.Dropout(float(config["dropout_prob"] or 0.0))

    def encode_histories(self, seq_items: torch.Tensor, seq_len: torch.Tensor, user_ids: torch.Tensor | None = None,
                         last_only: bool = False) -> torch.Tensor:
        """User states after each item, (B, L, H), from the top layers over K positions per item; ``last_only``:
        the state after each history's last item only, (B, H), at about half the cost.

        History: ``[first] ([CF_USER]) item_1 ... item_L``, item j as K positions in one block of the context mask:
        they see each other both ways and earlier items causally; the user after item j is its last position. A
        fixed first token takes the attention-sink position of a pre-norm decoder, so no item or user vector has
        to sit there. Several histories share a row of the LLM pass (``pack_rows``), each with positions from 0.
        """
        batch, n_slots = seq_items.shape
        slot_valid = torch.arange(n_slots, device=seq_items.device)[None, :] < seq_len[:, None]  # (B, L)
        # Only the items the histories hold (V of them, history after history): padding is most of a batch.
        item_ids = seq_items[slot_valid]  # (V,)
        items = self.item_text_states[item_ids]  # (V, K, H)
        if self.use_item_id:
            items = items + self.id_to_hidden(self.item_id_vectors(item_ids))[:, None]
        prefix = [self.first_token_state.expand(batch, -1)]
        if self.cf_injection is not None:
            user_vec, item_add = self.cf_injection.vectors(user_ids, seq_items, slot_valid)
            item_cf = item_add[slot_valid][:, None]  # (V, 1, H)
            items = torch.cat([items, item_cf], 1) if self.cf_as_position else items + item_cf
            if user_vec is not None:
                prefix.append(user_vec)
        n_prefix, k = len(prefix), items.shape[1]  # k positions per item in this pass
        width = n_prefix + n_slots * k
        rows = pack_rows(n_prefix + seq_len * k, width, PACKED_ROW_TOKENS, multiple=self.pad_tokens_to)
        position = torch.arange(batch * width, device=seq_items.device).view(batch, -1)  # (B, P+L*K)
        item_at = position[:, n_prefix:].view(batch, n_slots, k)[slot_valid]  # (V, K) flat positions of items
        tokens = torch.cat([torch.stack(prefix, 1).flatten(0, 1), self.dropout(items).flatten(0, 1)])  # (B*P+V*K, H)
        at = torch.cat([position[:, :n_prefix].flatten(), item_at.flatten()])  # their flat positions
        inputs = rows.pack_tokens(tokens, at)  # (R, C, H)
        # Block of each history position: the prefix's own ones, then one per item.
        slot_block = torch.arange(width, device=seq_items.device)
        slot_block[n_prefix:] = n_prefix + torch.arange(n_slots * k, device=seq_items.device) // k
        block_ids = rows.pack(slot_block.expand(batch, -1), fill=PAD_BLOCK)  # (R, C)

        def llm_pass() -> torch.Tensor:  # (R, C, H)
            return self(inputs, block_ids, segment_ids=rows.segment_ids, position_ids=rows.positions.clamp(min=0))

        last_of_item = n_prefix + torch.arange(n_slots, device=seq_items.device) * k + k - 1  # (L,)
        if not last_only:
            return rows.unpack(llm_pass())[:, last_of_item]  # (B, L, H)
        last_slots = rows.output_index.view(batch, -1)[torch.arange(batch), last_of_item[seq_len - 1]]  # (B,)
        with outputs_only_at(self.backbone.layers[-1], last_slots):
            hidden = llm_pass()
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, last_slots)  # (B, H)

    def item_text_vectors(self, item_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The text part (N, D) of the candidate vectors of ``item_ids`` (default every item): projected features."""
        return self.item_proj(self.item_text_features if item_ids is None else self.item_text_features[item_ids])

    def item_vectors(self, item_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Candidate vectors (N, D) of ``item_ids`` (default every item): the text part plus the ID part."""
        return self.plus_item_id(self.item_text_vectors(item_ids), item_ids)

    def next_item_terms(self, full_seq: torch.Tensor, full_len: torch.Tensor,
                        users: torch.Tensor | None) -> NextItemTerms:
        """Every candidate vector is cheap (a projection of a cached state), so L_next is one softmax over all items
        with gradient everywhere: no stale cache and no in-batch negatives drawn in proportion to popularity."""
        states = self.encode_histories(full_seq, full_len, users)  # (B, L+1, H)
        has_next, next_items = self.next_positions(full_seq, full_len)
        skip = self.text_skip(full_seq[:, :-1])  # (B, L, W) or None
        user_vecs = self.user_from(self.dropout(states[:, :-1][has_next]),
                                   None if skip is None else skip[has_next])  # (P, D)
        item_text_vecs = self.item_text_vectors()  # (n_items, D)
        item_vecs = self.plus_item_id(item_text_vecs)
        logits = self.score(user_vecs, item_vecs)
        if self.text_prior_weight and self.text_prior_in_training:
            logits = logits + self.text_prior(full_seq[:, :-1])[has_next] @ self.unit_item_text().T
        logits[:, ~self.training_candidates()] = float("-inf")  # padding too
        batch_items = torch.unique(next_items)
        return NextItemTerms(F.cross_entropy(logits, next_items), user_vecs, next_items, item_vecs, item_text_vecs,
                             batch_items, self.item_text_features[batch_items])

    def user_vectors(self, interaction) -> torch.Tensor:
        """(B, D): each history's user after its last item."""
        item_len = interaction[self.ITEM_SEQ_LEN]
        item_seq = interaction[self.ITEM_SEQ][:, : int(item_len.max())]  # no slots that every row leaves empty
        users = interaction[self.USER_ID] if self.USER_ID in interaction else None
        skip = self.text_skip(item_seq)
        if skip is not None:
            skip = skip[torch.arange(len(item_len)), item_len - 1]  # (B, W)
        return self.user_from(self.encode_histories(item_seq, item_len, users, last_only=True), skip)

    def text_skip(self, seq: torch.Tensor) -> torch.Tensor | None:
        """(B, L, W): the item text features that the user after each position of ``seq`` (B, L) adds, or None.

        ``last_item_skip``: the text of the item just read, so items of similar text (new ones too) score high from
        the start, as SASRec's input and output item vectors, one and the same, give it. ``history_text_skip``:
        also the mean text of the history so far (what a plain text-similarity ranking scores by), weighted by
        ``history_skip_weight`` (~: learned). Both read positions up to their own only."""
        if not (self.last_item_skip or self.history_text_skip):
            return None
        features = self.item_text_features[seq]  # (B, L, W)
        skip = features if self.last_item_skip else torch.zeros_like(features)
        if self.history_text_skip:
            skip = skip + self.history_skip_weight * running_mean(features, seq)
        return skip

    def text_prior(self, seq: torch.Tensor, weight: float | None = None) -> torch.Tensor:
        """(B, L, W): ``weight`` (default ``text_prior_weight``) / temperature times the unit mean text of the
        history up to each position of ``seq`` (B, L). Its product with an item's unit text is a fixed logit term
        beside the model's: the untrained text-similarity ranking, which no training on the seen items can bend
        towards them, so an item that no training interaction holds keeps the score its text earns."""
        history_mean = running_mean(self.item_text_features[seq], seq)  # (B, L, W)
        weight = self.text_prior_weight if weight is None else weight
        return F.normalize(history_mean, dim=-1) * (weight / self.temperature)

    def unit_item_text(self) -> torch.Tensor:
        """(n_items, W): every item's whitened text features at unit length."""
        return F.normalize(self.item_text_features, dim=-1)

    def prior_scores(self, interaction, item_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """The text prior's logits of each history's user after its last item: (B, n_items), or (B,) against
        ``item_ids`` (B,); None when every item's prior weight is 0. With ``new_item_prior_weight`` the items
        without a training interaction take that weight, the others ``text_prior_weight``."""
        new_weight = self.new_item_prior_weight
        if new_weight is None or new_weight == self.text_prior_weight:
            if not self.text_prior_weight:
                return None
            item_weights, weight = None, self.text_prior_weight
        else:
            item_weights = self.prior_item_weights(self.text_prior_weight, new_weight)
            weight = 1.0  # the weights go onto the items' columns
        item_len = interaction[self.ITEM_SEQ_LEN]
        prior = self.text_prior(interaction[self.ITEM_SEQ][:, : int(item_len.max())], weight)
        prior = prior[torch.arange(len(item_len)), item_len - 1]  # (B, W)
        if item_ids is None:
            scores = prior @ self.unit_item_text().T  # (B, n_items)
            return scores if item_weights is None else scores * item_weights
        scores = (prior * self.unit_item_text()[item_ids]).sum(-1)  # (B,)
        return scores if item_weights is None else scores * item_weights[item_ids]

    def prior_item_weights(self, weight: float, new_weight: float | None) -> torch.Tensor:
        """(n_items,): the text prior's weight on each item, ``new_weight`` on the ``new_items`` (None: ``weight``)
        and ``weight`` on the others."""
        new_weight = weight if new_weight is None else new_weight
        return torch.where(self.new_items(), new_weight, weight).to(self.item_text_features.dtype)

    def new_item_scores(self, item_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """``new_item_bias`` on each item that no training interaction holds (padding aside), 0 elsewhere: (n_items,)
        or the shape of ``item_ids``; None when the bias is 0. A logit that no training sets: how far a shop wants
        items found by their text alone lifted against items with a purchase record."""
        if not self.new_item_bias:
            return None
        bias = self.new_items().float() * self.new_item_bias
        return bias if item_ids is None else bias[item_ids]

    def predict(self, interaction):
        scores = super().predict(interaction)
        for term in (self.prior_scores(interaction, interaction[self.ITEM_ID]),
                     self.new_item_scores(interaction[self.ITEM_ID])):
            scores = scores if term is None else scores + term
        return scores

    def full_sort_predict(self, interaction):
        scores = super().full_sort_predict(interaction)
        for term in (self.prior_scores(interaction), self.new_item_scores()):
            scores = scores if term is None else scores + term
        return scores

    def other_parameter(self) -> dict:
        """A text prior weight that validation chose after training travels in the checkpoint (RecBole's
        other_parameter); a configured one stays the config's, so ``--set text_prior_weight=...`` still acts."""
        if not self.text_prior_chosen:
            return {}
        return {"text_prior_weight": self.text_prior_weight, "text_prior_chosen": True}

    def user_from(self, states: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        """User vectors (P, D) from the states (P, H) after an item, plus the projected text ``skip`` (P, W) of
        ``text_skip``: the same map as the candidates' text part, so the two meet in one space."""
        users = self.user_proj(states)
        return users if skip is None else users + self.item_proj(skip)

    def encode_candidates(self) -> torch.Tensor:
        return self.item_vectors()

    def text_states_for_mining(self) -> torch.Tensor:
        return self.item_text_features

    @torch.no_grad()
    def add_items(self, item_sentences: list[str]) -> None:
        """Append items that came after training (internal ids ``n_items``, ``n_items + 1``, ...) with their text:
        the lower layers read it on demand (a backbone loaded again; the states cached on disk as the catalogue's)
        and the catalogue's whitening maps it. They have no interaction, so no ID vector of their own: they enter
        histories and rankings through their text and, with ``new_item_id_neighbours``, the ID vectors they borrow
        from their nearest items by text; no other item's vector changes."""
        if self.cf_injection is not None:
            raise ValueError(f"cf_model={self.cf_injection.name}: the CF model has no vector for an item "
                             "added after training; recommend new items with a model trained without cf_model.")
        config = self._item_text_config
        backbone = load_backbone(config["llm_path"], config["llm_layers"], config["llm_random_config"])
        new = read_item_text(backbone, ["", *item_sentences], config, self.n_item_layers, 0,
                             n_segments=self.item_positions, whitening=self.whitening)  # row 0: a padding row
        device = self.item_text_features.device
        states = new.states[1:, None] if self.item_positions == 1 else new.segment_states[1:]
        self.item_text_states = torch.cat([self.item_text_states, states.to(device)])
        self.item_text_features = torch.cat([self.item_text_features, new.features[1:].to(device)])
        self.item_token_ids = torch.cat([self.item_token_ids, new.token_ids[1:].to(device)])
        self.item_token_len = torch.cat([self.item_token_len, new.token_len[1:].to(device)])
        added = len(item_sentences)
        self.item_id_known = torch.cat([self.item_id_known, self.item_id_known.new_zeros(added)])
        negatives = self.hard_negatives
        self.hard_negatives = torch.cat([negatives, negatives.new_zeros(added, negatives.shape[1])])
        weight = self.item_id_embedding.weight
        self.item_id_embedding = nn.Embedding.from_pretrained(
            torch.cat([weight, weight.new_zeros(added, weight.shape[1])]), freeze=False, padding_idx=0)
        self.n_items += added
        self.drop_eval_vectors()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        state_dict = {key: value for key, value in state_dict.items() if key not in TOKEN_LAYOUT_KEYS}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
