"""Token layout of DARec's inputs: user sequences and single items, packed without per-token Python loops.

A user sequence is ``[CF_USER] item_1 tokens [ITEM] item_2 tokens [ITEM] ...``; the ``[ITEM]`` after item k holds the
user state after k items. A single item (the candidates of the ranking) is ``item tokens [ITEM] [ALIGN]``.
Every token carries a block id: ``[CF_USER]`` is block 0, item k (with its ``[ITEM]``) is block k, padding is -1.
The attention mask is derived from block ids alone (see masks.py).

For the LLM pass, histories (token level: their tokens; item level: one vector per item) are packed several to a row
(``pack_rows``): no padding between them, and a segment id per token keeps each history to itself.
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


@dataclass
class PackedRows:
    """Histories laid out several to a row, each in one contiguous segment (``pack_rows``)."""

    source_index: torch.Tensor  # (R*C,) flat (B*W) index of the history token in each packed slot; B*W = padding
    output_index: torch.Tensor  # (B*W,) packed slot of each history token (slot 0 for tokens past its length)
    segment_ids: torch.Tensor  # (R, C) the history each slot belongs to, -1 = padding
    positions: torch.Tensor  # (R, C) the slot's position in its history, -1 = padding
    history_shape: tuple[int, int]  # (B, W)

    def pack(self, history_tokens: torch.Tensor, fill: float = 0) -> torch.Tensor:
        """(B, W, ...) one history per row -> (R, C, ...) packed; padding slots hold ``fill``."""
        rest = history_tokens.shape[2:]
        flat = torch.cat([history_tokens.reshape(-1, *rest), history_tokens.new_full((1, *rest), fill)])
        return flat.index_select(0, self.source_index).view(*self.segment_ids.shape, *rest)

    def pack_tokens(self, tokens: torch.Tensor, history_positions: torch.Tensor) -> torch.Tensor:
        """(N, H) tokens at flat (B*W) ``history_positions`` (N,) -> (R, C, H) packed; the other slots hold 0."""
        slots = self.output_index.index_select(0, history_positions)
        packed = tokens.new_zeros(self.segment_ids.numel(), tokens.shape[-1])
        return packed.index_put((slots,), tokens).view(*self.segment_ids.shape, -1)

    def unpack(self, packed_tokens: torch.Tensor) -> torch.Tensor:
        """(R, C, H) packed -> (B, W, H) one history per row; tokens past a history's length hold garbage."""
        hidden = packed_tokens.shape[-1]
        return packed_tokens.reshape(-1, hidden).index_select(0, self.output_index).view(*self.history_shape, hidden)


def pack_rows(token_counts: torch.Tensor, width: int, row_tokens: int, multiple: int = 1) -> PackedRows:
    """Pack histories of ``token_counts`` (B,) tokens (laid out in rows of ``width``) into rows of
    ``max(row_tokens, longest)`` tokens, rounded up to a ``multiple``: first fit, longest first.

    Histories are short with a long tail (amazon-scientific: 5 items on average, up to 50): one row per history,
    padded to the longest, spends most of a batch's tokens on padding at token level, and at item level a quarter of
    them even in groups of similar length.
    """
    counts = token_counts.tolist()
    capacity = -(-max(row_tokens, max(counts)) // multiple) * multiple
    fill: list[int] = []  # tokens used per packed row
    row_of, offset_of = [0] * len(counts), [0] * len(counts)
    for history in sorted(range(len(counts)), key=lambda b: -counts[b]):
        row = next((r for r, used in enumerate(fill) if used + counts[history] <= capacity), len(fill))
        if row == len(fill):
            fill.append(0)
        row_of[history], offset_of[history] = row, fill[row]
        fill[row] += counts[history]

    device = token_counts.device
    batch = len(counts)
    position = torch.arange(width, device=device)[None, :]  # (1, W)
    valid = position < token_counts[:, None]  # (B, W)
    slot = (torch.tensor(row_of, device=device)[:, None] * capacity
            + torch.tensor(offset_of, device=device)[:, None] + position)  # (B, W) packed slot of each token
    slot_of_token = slot[valid]
    n_slots = len(fill) * capacity
    source_index = torch.full((n_slots,), batch * width, dtype=torch.long, device=device)
    source_index[slot_of_token] = (torch.arange(batch, device=device)[:, None] * width + position)[valid]
    segment_ids = torch.full((n_slots,), PAD_BLOCK, dtype=torch.long, device=device)
    segment_ids[slot_of_token] = torch.arange(batch, device=device)[:, None].expand(-1, width)[valid]
    positions = torch.full((n_slots,), PAD_BLOCK, dtype=torch.long, device=device)
    positions[slot_of_token] = position.expand(batch, -1)[valid]
    return PackedRows(source_index, torch.where(valid, slot, 0).flatten(), segment_ids.view(-1, capacity),
                      positions.view(-1, capacity), (batch, width))
