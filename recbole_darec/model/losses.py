"""DARec's auxiliary losses and the mining of hard negatives."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F


def info_nce(queries: torch.Tensor, keys: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE over a batch: row i of ``queries`` should match row i of ``keys`` against every other row."""
    logits = F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).T / temperature  # (N, N)
    return F.cross_entropy(logits, torch.arange(len(queries), device=queries.device))


def hard_negative_loss(users: torch.Tensor, item_vecs: torch.Tensor, targets: torch.Tensor,
                       negative_ids: torch.Tensor, temperature: float, normalize_items: bool = True) -> torch.Tensor:
    """InfoNCE of each user vector (P, D) against its target item (P,) and the target's hard negatives (P, K),
    all looked up in ``item_vecs`` (n_items, D); ``normalize_items``: cosine, else the unit user against the item
    vector as it is."""
    users = F.normalize(users, dim=-1)
    candidate_ids = torch.cat([targets[:, None], negative_ids], dim=1)  # (P, 1+K)
    # index_select, not item_vecs[candidate_ids]: the backward of advanced indexing is an accumulating index_put_,
    # whose float sums run in a thread-dependent order on a multi-core CPU, so two runs with one seed drifted apart.
    candidates = item_vecs.index_select(0, candidate_ids.flatten()).view(*candidate_ids.shape, -1)  # (P, 1+K, D)
    if normalize_items:
        candidates = F.normalize(candidates, dim=-1)
    logits = torch.einsum("pd,pkd->pk", users, candidates) / temperature
    return F.cross_entropy(logits, torch.zeros(len(users), dtype=torch.long, device=users.device))


def cooccurrence_matrix(sequences: torch.Tensor, lengths: torch.Tensor, n_items: int) -> sp.csr_matrix:
    """Item x item matrix, non-zero where two items appear in one training sequence."""
    positions = torch.arange(sequences.shape[1])[None, :] < lengths[:, None]
    rows = torch.arange(len(sequences))[:, None].expand_as(sequences)[positions].numpy()
    cols = sequences[positions].numpy()
    user_item = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(len(sequences), n_items))
    user_item.data[:] = 1.0
    return (user_item.T @ user_item).tocsr()


@torch.no_grad()
def mine_hard_negatives(text_vectors: torch.Tensor, cooccurrence: sp.csr_matrix, n_negatives: int,
                        chunk_size: int = 1024, excluded: torch.Tensor | None = None) -> torch.Tensor:
    """For every item, the ``n_negatives`` items nearest by text vector (cosine) that never co-occur with it in a
    training sequence. Row 0 (padding), the item itself and the items ``excluded`` ((n_items,) bool) are never
    chosen. An item that co-occurs with almost every other item has fewer such candidates than ``n_negatives``: its
    list is filled up with the nearest co-occurring items. Returns (n_items, n_negatives)."""
    n_items = len(text_vectors)
    if n_negatives >= n_items - 1:
        raise ValueError(f"hard_negatives={n_negatives} must be smaller than the number of items ({n_items - 1})")
    vectors = F.normalize(text_vectors.float(), dim=-1)
    negatives = torch.zeros(n_items, n_negatives, dtype=torch.long)
    for start in range(0, n_items, chunk_size):
        stop = min(start + chunk_size, n_items)
        sims = vectors[start:stop] @ vectors.T  # (chunk, n_items)
        together = torch.from_numpy(cooccurrence[start:stop].toarray() > 0)
        # Co-occurring items rank below every other candidate (cosines lie in [-1, 1]) but stay finite: with -inf,
        # topk filled a short list with arbitrary -inf entries, padding and the item itself included.
        sims = torch.where(together, sims - 3.0, sims)
        sims[:, 0] = float("-inf")
        if excluded is not None:
            sims[:, excluded] = float("-inf")
        sims[torch.arange(stop - start), torch.arange(start, stop)] = float("-inf")
        negatives[start:stop] = sims.topk(n_negatives, dim=1).indices
    return negatives
