"""Time of PyTorch's CPU attention kernels in float32 and bf16, and of DARec's bf16 matrix-product attention, per
row length, forward + backward (training) and forward alone (evaluation): the measurement behind
``backbone.CPU_PRODUCT_ATTENTION_BELOW``.

Shapes as a SmolLM2-135M layer runs them (9 heads of 64) with a causal additive mask; queries, keys, values and the
output gradient in the [batch, tokens, heads, dim] layout the backbone produces, transposed to [batch, heads, ...].
Prints the median of 7 passes in ms for each.

    OMP_NUM_THREADS=2 python benchmarks/attention_dtype.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from recbole_darec.model.backbone import _attention_as_products

SHAPES = ((131, 10), (13, 128), (8, 256), (4, 512), (2, 1024))  # (rows, tokens per row): about 1.3-2k tokens each
HEADS, HEAD_DIM = 9, 64


def sdpa_kernel_attention(backend: SDPBackend) -> Callable:
    def attend(query, key, value, mask):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    return attend


def products_attention(query, key, value, mask):
    return _attention_as_products(nn.Module(), query, key, value, mask).transpose(1, 2)


def attention_ms(attend: Callable, rows: int, tokens: int, dtype: torch.dtype, backward: bool,
                 passes: int = 7) -> float:
    def bhtd() -> torch.Tensor:
        return torch.randn(rows, tokens, HEADS, HEAD_DIM).to(dtype).transpose(1, 2)

    query, key, value = (bhtd().requires_grad_(backward) for _ in range(3))
    output_grad = bhtd()
    future = torch.ones(tokens, tokens, dtype=torch.bool).triu(1)
    # As DARec builds it (masks.py, backbone.attention_mask_dtype): the dtype's minimum; float32 for the products.
    mask_dtype = torch.float32 if attend is products_attention else dtype
    mask = torch.zeros(rows, 1, tokens, tokens, dtype=mask_dtype).masked_fill(future, torch.finfo(mask_dtype).min)

    def run() -> None:
        with torch.set_grad_enabled(backward):
            output = attend(query, key, value, mask)
        if backward:
            output.backward(output_grad)

    run()  # warm-up
    seconds = []
    for _ in range(passes):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds) * 1e3


def main() -> None:
    torch.manual_seed(0)
    columns = [(f"{name} {str(dtype)[6:]}", sdpa_kernel_attention(backend), dtype)
               for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("math", SDPBackend.MATH))
               for dtype in (torch.float32, torch.bfloat16)]
    columns.append(("products bfloat16 (DARec)", products_attention, torch.bfloat16))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms, median of 7")
    for backward in (True, False):
        print(f"\n{'forward + backward' if backward else 'forward only'}\n")
        print("| rows x tokens | " + " | ".join(name for name, _, _ in columns) + " |")
        print("|---|" + "---|" * len(columns))
        for rows, tokens in SHAPES:
            cells = [f"{attention_ms(attend, rows, tokens, dtype, backward):.1f}" for _, attend, dtype in columns]
            print(f"| {rows} x {tokens} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
