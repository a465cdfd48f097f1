"""The backbone's lower layers read each item's text alone, once, and the result is cached (DARec, TextSASRec).

In DARec's default layout the lower ``n_item_layers`` decoder layers see only the tokens of one item (the context
mask of the paper taken one step further: no token sees another item). Those layers carry no adapters, so an item's
state after them is the same in every history; it is computed once per item (and stored on disk), and only the top
layers run per user, over one vector per item. This is how HLLM (arXiv 2409.12740) and UniSRec make a pretrained
LM affordable for sequential recommendation, with the split point inside one backbone instead of two models.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from recbole_darec.data.item_text import cached_item_tokens
from recbole_darec.files import atomic_torch_save
from recbole_darec.model.backbone import Backbone, decoder_layers
from recbole_darec.model.masks import attention_mask

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def only_layers(model: nn.Module, start: int, end: int) -> Iterator[nn.Module]:
    """Run ``model`` with its decoder layers ``[start, end)`` only (the ModuleList is restored afterwards)."""
    layers = decoder_layers(model)
    every_layer = list(layers)
    n_layers = model.config.num_hidden_layers
    del layers[:]
    layers.extend(every_layer[start:end])
    model.config.num_hidden_layers = end - start
    try:
        yield model
    finally:
        del layers[:]
        layers.extend(every_layer)
        model.config.num_hidden_layers = n_layers


def drop_lower_layers(model: nn.Module, n_lower: int) -> None:
    """Keep only the layers above the first ``n_lower`` (their output comes from the item-state cache)."""
    layers = decoder_layers(model)
    del layers[:n_lower]
    model.config.num_hidden_layers = len(layers)


@torch.no_grad()
def encode_item_text(
    backbone: Backbone,
    token_ids: torch.Tensor,  # (n_items, m) right-padded
    token_len: torch.Tensor,  # (n_items,)
    n_item_layers: int,
    context_masking: bool,
    batch_size: int = 64,
    bf16: bool = False,
    n_segments: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(item states (n_items, H), first-token state (H,), segment states (n_items, n_segments, H) or None for one
    segment): the residual stream after ``n_item_layers`` layers, mean-pooled over each item's own tokens, and over
    ``n_segments`` contiguous, near-equal parts of them; the first-token state is the backbone's BOS token read alone.

    ``context_masking``: the tokens of an item see each other both ways (block mask); otherwise causally.
    Items without text get zero states; an item of fewer tokens than segments repeats its mean in the empty ones.
    """
    model = backbone.model
    layers = decoder_layers(model)
    if not 0 < n_item_layers <= len(layers):
        raise ValueError(f"n_item_layers={n_item_layers}: must be in 1..{len(layers)}")
    captured: list[torch.Tensor] = []
    # The pre-norm residual stream is what the next layer reads; the model's own output would be after its final
    # norm, so the output of the last kept layer is taken with a hook.
    hook = layers[n_item_layers - 1].register_forward_hook(
        lambda module, args, output: captured.append(output[0] if isinstance(output, tuple) else output))
    embed = backbone.input_embeddings()
    was_training = model.training
    model.eval()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def run(ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1])
        block_ids = torch.where(positions[None, :] < lengths[:, None], 0, -1)  # (N, T): one block per item
        inputs = embed(ids)
        mask = attention_mask(block_ids, context_masking, inputs.dtype)
        captured.clear()
        with autocast:
            model(inputs_embeds=inputs, attention_mask=mask, position_ids=positions.expand_as(ids), use_cache=False)
        hidden = captured[0].float()  # (N, T, H)
        valid = (block_ids == 0).float()[..., None]
        pooled = (hidden * valid).sum(1) / valid.sum(1).clamp_min(1.0)  # (N, H)
        if n_segments == 1:
            return pooled, None
        segment = positions[None, :] * n_segments // lengths[:, None].clamp_min(1)  # (N, T): token t's part
        parts = []
        for k in range(n_segments):
            in_part = valid * (segment == k)[..., None]
            count = in_part.sum(1)
            parts.append(torch.where(count > 0, (hidden * in_part).sum(1) / count.clamp_min(1.0), pooled))
        return pooled, torch.stack(parts, 1)  # (N, H), (N, K, H)

    states = torch.zeros(len(token_ids), backbone.hidden_size)
    segments = torch.zeros(len(token_ids), n_segments, backbone.hidden_size) if n_segments > 1 else None
    try:
        with only_layers(model, 0, n_item_layers):
            order = torch.argsort(token_len, descending=True)  # similar lengths together: little padding
            order = order[token_len[order] > 0]
            for chunk in order.split(batch_size):
                longest = int(token_len[chunk].max())
                states[chunk], chunk_segments = run(token_ids[chunk, :longest], token_len[chunk])
                if segments is not None:
                    segments[chunk] = chunk_segments
            bos = getattr(model.config, "bos_token_id", None)
            first = run(torch.tensor([[bos if bos is not None else 0]]), torch.tensor([1]))[0][0]
    finally:
        hook.remove()
        model.train(was_training)
    return states, first, segments


def cached_item_text_states(
    backbone: Backbone, token_ids: torch.Tensor, token_len: torch.Tensor, n_item_layers: int,
    context_masking: bool, cache_dir: str | None, batch_size: int = 64, bf16: bool = False, n_segments: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``encode_item_text`` with an on-disk cache keyed by the backbone, the split, the mask, the segments, the batch
    size and the token ids."""
    digest = hashlib.sha256()
    # The batch size is part of the key: it changes how items are padded and grouped, and so the states in their
    # last bits, which training amplifies; a cache written at another batch size would give other numbers.
    parts = [backbone.name, str(n_item_layers), str(context_masking), str(bf16), f"batch={batch_size}"]
    if n_segments > 1:  # one segment: the files written before segments existed
        parts.append(f"segments={n_segments}")
    for part in parts:
        digest.update(part.encode("utf-8") + b"\0")
    digest.update(token_ids.numpy().tobytes())
    digest.update(token_len.numpy().tobytes())
    path = os.path.join(cache_dir, f"item_states-{digest.hexdigest()[:24]}.pt") if cache_dir else None
    if path and os.path.isfile(path):
        cached = torch.load(path, weights_only=True)
        return cached["states"], cached["first"], cached.get("segments")
    start = time.perf_counter()
    states, first, segments = encode_item_text(backbone, token_ids, token_len, n_item_layers, context_masking,
                                               batch_size, bf16, n_segments)
    logger.info(f"Item text states: {len(states)} items through {n_item_layers} layers in "
                f"{time.perf_counter() - start:.0f} s" + (f", cached in {path}" if path else ""))
    if path:
        atomic_torch_save({"states": states, "first": first, "segments": segments}, path)
    return states, first, segments


def pca_whitening(states: torch.Tensor, n_components: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (H,), projection (H, n)): ``(x - mean) @ projection`` has identity covariance over ``states``.

    Language-model item states are strongly anisotropic (a few directions carry most of the variance); whitening
    gives every direction of the text the same say in cosine scores (WhitenRec, arXiv 2402.10602).
    """
    mean = states.mean(0)
    centered = (states - mean).double()
    covariance = centered.T @ centered / max(len(states) - 1, 1)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    n_components = min(n_components, states.shape[1])
    eigenvalues = eigenvalues[-n_components:].clamp_min(1e-6 * float(eigenvalues[-1]) + 1e-12)
    projection = eigenvectors[:, -n_components:] / eigenvalues.sqrt()
    return mean.float(), projection.float()


@dataclass
class ItemText:
    """Every item's text as the frozen lower layers read it (row 0: padding)."""

    token_ids: torch.Tensor  # (n_items, item_max_tokens)
    token_len: torch.Tensor  # (n_items,)
    states: torch.Tensor  # (n_items, H): the state after the lower layers at each item's last token
    first_token_state: torch.Tensor  # (H,): a fixed first token's state after the same layers
    features: torch.Tensor  # (n_items, whiten_dim): the states whitened
    segment_states: torch.Tensor | None  # (n_items, K, H): the states of K parts of each item's text (K > 1)
    whitening: tuple[torch.Tensor, torch.Tensor]  # (mean (H,), projection (H, whiten_dim))


def read_item_text(backbone: Backbone, item_sentences: list[str], config, n_text_layers: int,
                   whiten_dim: int, n_segments: int = 1,
                   whitening: tuple[torch.Tensor, torch.Tensor] | None = None) -> ItemText:
    """Tokenise, encode through the first ``n_text_layers`` layers (both cached on disk) and whiten every item's
    text. The whitening is fitted on item text alone (no interaction data), so it leaks nothing; items added to a
    trained model's catalogue take its ``whitening`` instead."""
    token_ids, token_len = cached_item_tokens(
        item_sentences, backbone.tokenizer, int(config["item_max_tokens"]), backbone.tokenizer.name,
        config["item_text_cache_dir"],
    )
    states, first, segments = cached_item_text_states(
        backbone, token_ids, token_len, n_text_layers, bool(config["context_masking"]),
        config["item_text_cache_dir"], int(config["item_encode_batch_size"]), bf16=bool(config["item_encode_bf16"]),
        n_segments=n_segments,
    )
    mean, projection = whitening or pca_whitening(states[1:], whiten_dim)
    return ItemText(token_ids, token_len, states, first, (states - mean) @ projection, segments, (mean, projection))
