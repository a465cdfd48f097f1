"""Token layout of DARec's inputs: user sequences and single items, packed without per-token Python loops.

A user sequence is ``[CF_USER] item_1 tokens [ITEM] item_2 tokens [ITEM] ...``; the ``[ITEM]`` after item k holds the
user state after k items. A single item (the candidates of the ranking) is ``item tokens [ITEM] [ALIGN]``.
Every token carries a block id: ``[CF_USER]`` is block 0, item k (with its ``[ITEM]``) is block k, padding is -1.
The attention mask is derived from block ids alone (see masks.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAD_BLOCK = -1


@dataclass
class SpecialTokens:
    """Ids of DARec's own tokens; they sit after the backbone vocabulary and have their own trainable embeddings."""

    item: int
    align: int
    cf_user: int
    pad: int = 0  # any real id: padding is masked out by its block id


@dataclass
class PackedSequences:
    input_ids: torch.Tensor  # (B, T)
    block_ids: torch.Tensor  # (B, T) 0 = [CF_USER], k = item k, -1 = padding
    boundary_positions: torch.Tensor  # (B, L) position of the [ITEM] after each item (0 where no item)
    slot_valid: torch.Tensor  # (B, L) bool, item slot holds an item


@dataclass
class PackedItems:
    input_ids: torch.Tensor  # (N, T)
    block_ids: torch.Tensor  # (N, T) 0 = text + [ITEM], 1 = [ALIGN], -1 = padding
    item_positions: torch.Tensor  # (N,) position of [ITEM]
    align_positions: torch.Tensor  # (N,) position of [ALIGN]


def pack_sequences(
    seq_items: torch.Tensor,  # (B, L) internal item ids, 0 = padding
    seq_len: torch.Tensor,  # (B,)
    item_token_ids: torch.Tensor,  # (n_items, m) right-padded text tokens per item
    item_token_len: torch.Tensor,  # (n_items,)
    special: SpecialTokens,
) -> PackedSequences:
    batch, n_slots = seq_items.shape
    device = seq_items.device
    slot_valid = torch.arange(n_slots, device=device)[None, :] < seq_len[:, None]  # (B, L)
    text_len = torch.where(slot_valid, item_token_len[seq_items], 0)  # (B, L)
    slot_tokens = torch.where(slot_valid, text_len + 1, 0)  # text + [ITEM]
    slot_end = 1 + torch.cumsum(slot_tokens, dim=1)  # (B, L), exclusive; position 0 is [CF_USER]
    slot_start = slot_end - slot_tokens
    total = int(slot_end[:, -1].max()) if n_slots else 1

    width = item_token_ids.shape[1] + 1
    col = torch.arange(width, device=device)  # (m+1,)
    grid = torch.cat([item_token_ids[seq_items], item_token_ids.new_zeros(batch, n_slots, 1)], dim=-1)  # (B, L, m+1)
    grid = torch.where(col == text_len[..., None], special.item, grid)
    keep = (col <= text_len[..., None]) & slot_valid[..., None]  # (B, L, m+1)
    dest = slot_start[..., None] + col  # (B, L, m+1) target position of each grid cell
    rows = torch.arange(batch, device=device)[:, None, None].expand_as(dest)
    slot_block = (torch.arange(n_slots, device=device) + 1)[None, :, None].expand_as(dest)

    input_ids = torch.full((batch, total), special.pad, dtype=torch.long, device=device)
    block_ids = torch.full((batch, total), PAD_BLOCK, dtype=torch.long, device=device)
    input_ids[rows[keep], dest[keep]] = grid[keep]
    block_ids[rows[keep], dest[keep]] = slot_block[keep]
    input_ids[:, 0] = special.cf_user
    block_ids[:, 0] = 0
    boundary_positions = torch.where(slot_valid, slot_end - 1, 0)
    return PackedSequences(input_ids, block_ids, boundary_positions, slot_valid)


def pack_items(
    items: torch.Tensor,  # (N,) internal item ids
    item_token_ids: torch.Tensor,
    item_token_len: torch.Tensor,
    special: SpecialTokens,
) -> PackedItems:
    text_len = item_token_len[items]  # (N,)
    longest = int(text_len.max()) if len(items) else 0
    total = longest + 2  # text, [ITEM], [ALIGN]
    col = torch.arange(total, device=items.device)
    text = item_token_ids[items][:, :longest]
    input_ids = torch.cat([text, text.new_full((len(items), 2), special.pad)], dim=1)  # (N, T)
    input_ids = torch.where(col == text_len[:, None], special.item, input_ids)
    input_ids = torch.where(col == text_len[:, None] + 1, special.align, input_ids)
    block_ids = torch.where(col <= text_len[:, None], 0, PAD_BLOCK)
    block_ids = torch.where(col == text_len[:, None] + 1, 1, block_ids)
    input_ids = torch.where(block_ids == PAD_BLOCK, special.pad, input_ids)
    return PackedItems(input_ids, block_ids, text_len, text_len + 1)
