"""Forward + backward time of PyTorch's CPU attention in float32 and bf16, per row length: the measurement behind
``backbone.CPU_FLOAT32_ATTENTION_BELOW``.

Shapes as a SmolLM2-135M layer runs them (9 heads of 64) with a causal additive mask; queries, keys, values and the
output gradient in the [batch, tokens, heads, dim] layout the backbone produces, transposed to [batch, heads, ...].
Prints the median of 7 passes in ms for the flash and math kernels.

    OMP_NUM_THREADS=2 python benchmarks/attention_dtype.py
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = ((131, 10), (13, 128), (8, 256), (4, 512), (2, 1024))  # (rows, tokens per row): about 1.3-2k tokens each
HEADS, HEAD_DIM = 9, 64


def forward_backward_ms(rows: int, tokens: int, dtype: torch.dtype, backend: SDPBackend, passes: int = 7) -> float:
    def bhtd() -> torch.Tensor:
        return torch.randn(rows, tokens, HEADS, HEAD_DIM).to(dtype).transpose(1, 2)

    query, key, value = (bhtd().requires_grad_() for _ in range(3))
    output_grad = bhtd()
    future = torch.ones(tokens, tokens, dtype=torch.bool).triu(1)
    mask = torch.zeros(rows, 1, tokens, tokens).masked_fill(future, float("-inf")).to(dtype)

    def run() -> None:
        with sdpa_kernel(backend):
            output = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
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
    kernels = (("flash", SDPBackend.FLASH_ATTENTION), ("math", SDPBackend.MATH))
    columns = [(f"{name} {str(dtype)[6:]}", dtype, backend)
               for name, backend in kernels for dtype in (torch.float32, torch.bfloat16)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; forward + backward ms, median of 7")
    print("| rows x tokens | " + " | ".join(name for name, _, _ in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for rows, tokens in SHAPES:
        cells = [f"{forward_backward_ms(rows, tokens, dtype, backend):.1f}" for _, dtype, backend in columns]
        print(f"| {rows} x {tokens} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
