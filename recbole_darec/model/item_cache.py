"""The training cache of item states (token-level mode): every item's ``[ITEM]`` state, at most a few steps old.

In the token-level mode an item vector costs one LLM pass over the item's text. L_next scores every item, and
encoding the whole catalogue at every step would cost far more than the batch itself, so the scores come from
this cache, whose states are at most ``refresh_every`` steps old. A rolling refresh re-encodes the next
``n_items / refresh_every`` items at every step: the cache drifts with the weights instead of jumping all at once
(a full refresh every k steps made the loss spike at each refresh).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# item ids (N,) to re-encode, or None for every item -> their detached states (N, H)
Encoder = Callable[[torch.Tensor | None], torch.Tensor]


class ItemStateCache:
    """Detached ``[ITEM]`` states of every item (row 0: padding), refreshed a slice per training step."""

    def __init__(self, n_items: int, refresh_every: int):
        self.n_items = n_items
        self.refresh_every = max(refresh_every, 1)
        self.states: torch.Tensor | None = None  # (n_items, H)
        self.cursor = 0  # the next item id that the rolling refresh re-encodes

    def refresh(self, encode: Encoder) -> None:
        """Fill the cache on first use; afterwards re-encode the next slice of items (ids 1..n_items-1, wrapping)."""
        if self.states is None:
            self.states = encode(None)
            self.cursor = 1
            return
        per_step = -(-(self.n_items - 1) // self.refresh_every)
        items = self.cursor - 1 + torch.arange(per_step, device=self.states.device)
        items = items % (self.n_items - 1) + 1
        self.states[items] = encode(items)
        self.cursor = int(items[-1]) % (self.n_items - 1) + 1

    def clear(self) -> None:
        """Drop the states (new weights or a new adapter architecture): the next refresh re-encodes every item."""
        self.states = None

    def state(self) -> dict:
        """What a resumed run needs to take the same steps as an uninterrupted one (the trainer saves it)."""
        return {"item_state_cache": None if self.states is None else self.states.detach().cpu(),
                "refresh_cursor": self.cursor}

    def load_state(self, state: dict, device: torch.device) -> None:
        states = state.get("item_state_cache")
        self.states = None if states is None else states.to(device)
        self.cursor = int(state.get("refresh_cursor", 0))
