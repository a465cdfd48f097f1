"""DARec's attention masks, built from block ids in one vectorised step.

- causal (DARecbase): a token sees itself and every earlier non-padding token.
- context masking: block-causal. A token sees every token of its own block (both ways) and of earlier blocks,
  nothing of later blocks. With the block ids of layout.py this means: tokens of one item see each other both
  ways, ``[CF_USER]`` (block 0) is seen by all and sees only itself, ``[ALIGN]`` sees its item and is seen by none.
Padding (block -1) is seen by nothing; a padding query sees only itself so that softmax stays finite.
With ``segment_ids`` (several histories packed in one row), a token sees only tokens of its own segment.
"""

from __future__ import annotations

import torch

from recbole_darec.model.layout import PAD_BLOCK


def attention_mask(block_ids: torch.Tensor, context_masking: bool, dtype: torch.dtype,
                   segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Additive mask (B, 1, T, T): 0 where query q may attend to key k, the dtype's minimum elsewhere."""
    length = block_ids.shape[1]
    positions = torch.arange(length, device=block_ids.device)
    is_pad = block_ids == PAD_BLOCK  # (B, T)
    if context_masking:
        allowed = block_ids[:, None, :] <= block_ids[:, :, None]  # (B, T_q, T_k)
    else:
        allowed = (positions[None, :] <= positions[:, None]).expand(block_ids.shape[0], length, length)
    allowed = allowed & ~is_pad[:, None, :]
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, None, :] == segment_ids[:, :, None])
    allowed = allowed | torch.eye(length, dtype=torch.bool, device=block_ids.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=block_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None, :, :]
