"""TextSASRec: SASRec whose item vectors add a linear map of frozen, whitened LLM text states to the ID embedding.

A baseline for DARec, in the style of UniSRec without its pre-training: item text is read by the same frozen
backbone and the same cached item states as DARec's lower layers, and a small
SASRec transformer trained from scratch reads the history. Scores are cosine / ``temperature`` as in UniSRec.
The difference between this row and DARec is what the pretrained top layers (with adapters) add over frozen text
features alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from recbole.model.sequential_recommender.sasrec import SASRec
from torch import nn

from recbole_darec.model.backbone import load_backbone
from recbole_darec.model.item_states import read_item_text


class TextSASRec(SASRec):
    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.temperature = float(config["temperature"])
        backbone = load_backbone(config["llm_path"], config["llm_layers"], config["llm_random_config"])
        n_text_layers = len(backbone.layers) - int(config["sequence_layers"] or 0)
        item_text = read_item_text(backbone, dataset.item_sentences, config, n_text_layers, int(config["whiten_dim"]))
        del backbone  # only its item states are used
        self.register_buffer("item_text", item_text.features, persistent=False)  # (n_items, whiten_dim)
        self.text_proj = nn.Linear(self.item_text.shape[1], self.hidden_size)
        nn.init.normal_(self.text_proj.weight, std=self.initializer_range)
        nn.init.zeros_(self.text_proj.bias)

    def item_vectors(self) -> torch.Tensor:
        """(n_items, hidden): ID embedding + projected text, the input and the candidate vectors alike."""
        return self.item_embedding.weight + self.text_proj(self.item_text)

    def forward(self, item_seq, item_seq_len):
        position_ids = torch.arange(item_seq.size(1), device=item_seq.device).expand_as(item_seq)
        inputs = self.item_vectors()[item_seq] + self.position_embedding(position_ids)
        inputs = self.dropout(self.LayerNorm(inputs))
        output = self.trm_encoder(inputs, self.get_attention_mask(item_seq), output_all_encoded_layers=True)[-1]
        return self.gather_indexes(output, item_seq_len - 1)  # (B, H)

    def _logits(self, seq_output: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return F.normalize(seq_output, dim=-1) @ F.normalize(items, dim=-1).T / self.temperature

    def calculate_loss(self, interaction):
        seq_output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return self.loss_fct(self._logits(seq_output, self.item_vectors()), interaction[self.POS_ITEM_ID])

    def predict(self, interaction):
        seq_output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        items = self.item_vectors()[interaction[self.ITEM_ID]]
        return (F.normalize(seq_output, dim=-1) * F.normalize(items, dim=-1)).sum(-1) / self.temperature

    def full_sort_predict(self, interaction):
        seq_output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return self._logits(seq_output, self.item_vectors())
