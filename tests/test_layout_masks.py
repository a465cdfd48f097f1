"""Token layout (pack_sequences / pack_items) and the attention masks, on hand-made token tables.

The expected tensors are written out by hand: the packers are vectorised scatter code where an off-by-one
shifts every later token, so exact values are the only useful check.
"""

from __future__ import annotations

import pytest
import torch

from recbole_darec.model.layout import PAD_BLOCK, SpecialTokens, pack_items, pack_sequences
from recbole_darec.model.masks import attention_mask

# Ids above any text token so that they stand out in the expected tensors.
SPECIAL = SpecialTokens(item=100, align=101, cf_user=102, pad=0)
IT, A, C, P = SPECIAL.item, SPECIAL.align, SPECIAL.cf_user, SPECIAL.pad  # [ITEM] [ALIGN] [CF_USER] pad

# Item 0 is RecBole's padding item; item 4 has no text (an empty sentence).
TOKENS = torch.tensor([
    [0, 0, 0],
    [11, 12, 0],
    [21, 0, 0],
    [31, 32, 33],
    [0, 0, 0],
])
TOKEN_LEN = torch.tensor([0, 2, 1, 3, 0])


def packed_example():
    seq_items = torch.tensor([[1, 2, 3, 0], [4, 1, 0, 0]])
    seq_len = torch.tensor([3, 2])
    return pack_sequences(seq_items, seq_len, TOKENS, TOKEN_LEN, SPECIAL)


def test_pack_sequences_exact_layout():
    packed = packed_example()
    # [CF_USER] item tokens [ITEM] ... ; the empty item 4 is just its [ITEM]; row 1 is right-padded.
    assert packed.input_ids.tolist() == [
        [C, 11, 12, IT, 21, IT, 31, 32, 33, IT],
        [C, IT, 11, 12, IT, P, P, P, P, P],
    ]
    assert packed.block_ids.tolist() == [
        [0, 1, 1, 1, 2, 2, 3, 3, 3, 3],
        [0, 1, 2, 2, 2, -1, -1, -1, -1, -1],
    ]
    # The [ITEM] after item k; empty slots point at 0 and are flagged invalid.
    assert packed.boundary_positions.tolist() == [[3, 5, 9, 0], [1, 4, 0, 0]]
    assert packed.slot_valid.tolist() == [[True, True, True, False], [True, True, False, False]]
    assert (packed.input_ids.gather(1, packed.boundary_positions)[packed.slot_valid] == IT).all()


def test_pack_sequences_ignores_items_past_the_length():
    # Only seq_len decides what is an item: a stale id past the length must not leak into the layout.
    seq_items = torch.tensor([[1, 3, 2]])
    packed = pack_sequences(seq_items, torch.tensor([1]), TOKENS, TOKEN_LEN, SPECIAL)
    assert packed.input_ids.tolist() == [[C, 11, 12, IT]]
    assert packed.block_ids.tolist() == [[0, 1, 1, 1]]
    assert packed.boundary_positions.tolist() == [[3, 0, 0]]


def test_pack_sequences_single_user_no_padding():
    packed = pack_sequences(torch.tensor([[3, 4]]), torch.tensor([2]), TOKENS, TOKEN_LEN, SPECIAL)
    assert packed.input_ids.tolist() == [[C, 31, 32, 33, IT, IT]]
    assert packed.block_ids.tolist() == [[0, 1, 1, 1, 1, 2]]
    assert packed.boundary_positions.tolist() == [[4, 5]]


def test_pack_items_exact_layout():
    packed = pack_items(torch.tensor([1, 4, 3]), TOKENS, TOKEN_LEN, SPECIAL)
    # item tokens [ITEM] [ALIGN], right-padded to the longest item in the batch (3 tokens + 2).
    assert packed.input_ids.tolist() == [
        [11, 12, IT, A, P],
        [IT, A, P, P, P],
        [31, 32, 33, IT, A],
    ]
    assert packed.block_ids.tolist() == [
        [0, 0, 0, 1, -1],
        [0, 1, -1, -1, -1],
        [0, 0, 0, 0, 1],
    ]
    assert packed.item_positions.tolist() == [2, 0, 3]
    assert packed.align_positions.tolist() == [3, 1, 4]


def test_pack_items_batch_of_empty_texts():
    packed = pack_items(torch.tensor([4, 0]), TOKENS, TOKEN_LEN, SPECIAL)
    assert packed.input_ids.tolist() == [[IT, A], [IT, A]]
    assert packed.item_positions.tolist() == [0, 0]


# ------------------------------------------------------------------------------------------------- masks


def reference_allowed(block_ids: list[int], context_masking: bool) -> torch.Tensor:
    """The mask rules of design section 4 written as plain loops (the model's mask is vectorised)."""
    length = len(block_ids)
    allowed = torch.zeros(length, length, dtype=torch.bool)
    for q in range(length):
        for k in range(length):
            if q == k:
                allowed[q, k] = True
            elif block_ids[q] == PAD_BLOCK or block_ids[k] == PAD_BLOCK:
                allowed[q, k] = False
            elif context_masking:
                allowed[q, k] = block_ids[k] <= block_ids[q]
            else:
                allowed[q, k] = k <= q
    return allowed


def allowed_of(mask: torch.Tensor) -> torch.Tensor:
    assert torch.isin(mask.unique(), torch.tensor([0.0, torch.finfo(mask.dtype).min], dtype=mask.dtype)).all()
    return mask == 0


@pytest.mark.parametrize("context_masking", [True, False], ids=["context", "causal"])
def test_mask_matches_the_rules(context_masking):
    packed = packed_example()
    mask = attention_mask(packed.block_ids, context_masking, torch.float32)
    assert mask.shape == (2, 1, 10, 10) and mask.dtype == torch.float32
    for row in range(2):
        expected = reference_allowed(packed.block_ids[row].tolist(), context_masking)
        real = packed.block_ids[row] != PAD_BLOCK
        # Padding queries' own rows are free (their outputs are never read): compare real query rows.
        assert torch.equal(allowed_of(mask[row, 0])[real], expected[real]), (row, context_masking)


def test_context_mask_items_bidirectional_and_block_causal():
    allowed = allowed_of(attention_mask(packed_example().block_ids, True, torch.float32))[0, 0]
    item3 = [6, 7, 8, 9]  # tokens 31 32 33 [ITEM] of the third item
    for q in item3:
        for k in item3:
            assert allowed[q, k], f"token {q} should see token {k} of its own item"
    # Across items only backwards: item 2 (positions 4-5) sees item 1 (1-3), never the reverse.
    assert allowed[4:6, 1:4].all()
    assert not allowed[1:4, 4:6].any()
    assert not allowed[1:6, 6:10].any()


def test_causal_mask_is_not_bidirectional_inside_an_item():
    allowed = allowed_of(attention_mask(packed_example().block_ids, False, torch.float32))[0, 0]
    assert allowed[9, 6] and not allowed[6, 9]  # the item's first token does not see its later tokens
    assert torch.equal(allowed, torch.tril(torch.ones(10, 10, dtype=torch.bool)))


@pytest.mark.parametrize("context_masking", [True, False], ids=["context", "causal"])
def test_cf_user_and_padding(context_masking):
    block_ids = packed_example().block_ids
    allowed = allowed_of(attention_mask(block_ids, context_masking, torch.float32))[:, 0]
    real = block_ids != PAD_BLOCK
    for row in range(2):
        # [CF_USER] (position 0) is seen by every real token and sees only itself.
        assert allowed[row, real[row], 0].all()
        assert allowed[row, 0].tolist() == [True] + [False] * 9
        # Padding keys are seen by no real token.
        assert not allowed[row][real[row]][:, ~real[row]].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("context_masking", [True, False], ids=["context", "causal"])
def test_mask_rows_stay_finite(dtype, context_masking):
    # Every row, padding rows included, keeps one visible key: a softmax over the mask never gives NaN.
    mask = attention_mask(packed_example().block_ids, context_masking, dtype)
    assert mask.dtype == dtype
    assert torch.isfinite(mask).all()
    assert (torch.diagonal(mask[:, 0], dim1=-2, dim2=-1) == 0).all()
    probs = torch.softmax(mask.float(), dim=-1)
    assert torch.isfinite(probs).all()


def test_item_mask_align_sees_its_item_and_is_seen_by_none():
    packed = pack_items(torch.tensor([1, 4, 3]), TOKENS, TOKEN_LEN, SPECIAL)
    allowed = allowed_of(attention_mask(packed.block_ids, True, torch.float32))[:, 0]
    # Item 1: text 0-1, [ITEM] 2, [ALIGN] 3, padding 4.
    assert allowed[0, 3, :4].all() and not allowed[0, 3, 4]
    assert not allowed[0, :3, 3].any()  # [ITEM] and the text never see [ALIGN]: item vectors ignore it
    assert allowed[0, :3, :3].all()  # the item's own tokens see each other both ways
