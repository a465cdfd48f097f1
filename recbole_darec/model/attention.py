"""The attention DARec registers with transformers: PyTorch's scaled_dot_product_attention under DARec's own 4-D
masks (masks.py), and, for short rows under bf16 autocast on a CPU, softmax attention as bf16 matrix products around
a float32 softmax, where PyTorch's CPU kernel has a large fixed cost per (row, head) block (BENCHMARKS.md, speed)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

# Registered under this name, transformers' own sdpa function (wrapped by ``_sdpa_attention``) takes DARec's 4-D
# mask as given.
ATTN_IMPLEMENTATION = "darec_sdpa"
# The bf16 products keep the (rows, heads, T, T) probabilities for backward, which the kernel does not, and fall
# behind it on long rows: only rows shorter than this take them.
CPU_PRODUCT_ATTENTION_BELOW = 256


def _short_cpu_rows(device: torch.device, row_tokens: int) -> bool:
    return device.type == "cpu" and row_tokens < CPU_PRODUCT_ATTENTION_BELOW


def attention_mask_dtype(device: torch.device, row_tokens: int, bf16: bool) -> torch.dtype:
    """The dtype of the additive mask for rows of ``row_tokens``: SDPA wants the queries' dtype; short rows on a CPU
    add it to their scores before a float32 softmax (``_attention_as_products``), so theirs is float32."""
    return torch.bfloat16 if bf16 and not _short_cpu_rows(device, row_tokens) else torch.float32


def _sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _short_cpu_rows(query.device, query.shape[2]) and _runs_bf16_on_cpu(query, key, value):
        return _attention_as_products(module, query, key, value, attention_mask, **kwargs), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _runs_bf16_on_cpu(*tensors: torch.Tensor) -> bool:
    """Whether SDPA would compute in bf16: a bf16 input, or CPU bf16 autocast, which casts all of them. A Llama
    layer under autocast hands over float32 queries and keys (rotary's float32 cos/sin promote them) and bf16 values."""
    autocast_bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    return autocast_bf16 or any(tensor.dtype == torch.bfloat16 for tensor in tensors)


def _attention_as_products(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           is_causal: bool | None = None, **kwargs) -> torch.Tensor:
    """Softmax attention as two bf16 matrix products around a float32 softmax: (B, H, Q, D) queries, (B, H_kv, K, D)
    keys and values, an additive mask (B, 1, Q, K) -> (B, Q, H, D) outputs, as ``sdpa_attention_forward`` returns."""
    from transformers.integrations.sdpa_attention import repeat_kv

    n_groups = query.shape[1] // key.shape[1]
    n_queries, n_keys = query.shape[2], key.shape[2]
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    if attention_mask is None and is_causal and n_queries > 1:  # what SDPA's is_causal would do
        future = torch.ones(n_queries, n_keys, dtype=torch.bool, device=query.device).triu(1)
        attention_mask = torch.zeros(future.shape, device=query.device).masked_fill(future, float("-inf"))
    with torch.autocast("cpu", enabled=False):  # the dtypes are chosen here, not by autocast's lists
        key, value = repeat_kv(key.bfloat16(), n_groups), repeat_kv(value.bfloat16(), n_groups)
        scores = (query.bfloat16() @ key.transpose(-1, -2)) * scaling  # (B, H, Q, K)
        if attention_mask is not None:  # float32 from here: a float32 mask's minimum must not overflow
            scores = scores + attention_mask.float()
        probs = scores.softmax(-1, dtype=torch.float32)
        if dropout > 0:  # transformers passes 0 outside training
            probs = F.dropout(probs, p=dropout)
        return (probs.bfloat16() @ value).transpose(1, 2).contiguous()

def computes_bf16_natively(device: torch.device) -> bool:
    """True where bf16 matrix products run in hardware: a CUDA GPU that supports them, or a CPU whose oneDNN
    has bf16 kernels (avx512_bf16 or AMX). Elsewhere autocast emulates bf16, slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False



@functools.cache
def register_attention() -> None:
    """Register ``ATTN_IMPLEMENTATION`` with transformers, once per process."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, _sdpa_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)  # without it, a 2-D padding mask is dropped
