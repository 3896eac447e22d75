"""A ring memory of answered queries ``(x, V(x))``: students replay it, Knockoff trains on it.

Replay reuses answers already paid for, so it costs compute, not queries.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["ReplayMemory"]


class ReplayMemory:
    """The last ``capacity`` answered images and their targets, sampled uniformly.

    Storage is allocated on the first :meth:`add`, on the images' device, and
    starts afresh if the targets change shape (soft to hard labels).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.images: Tensor | None = None
        self.targets: Tensor | None = None
        self.filled = 0
        self.cursor = 0

    def add(self, images: Tensor, targets: Tensor) -> None:
        """Store a batch, overwriting the oldest entries once full."""
        if self.images is None or self.targets is None or self.targets.shape[1:] != targets.shape[1:]:
            self.images = images.new_empty((self.capacity, *images.shape[1:]))
            self.targets = targets.new_empty((self.capacity, *targets.shape[1:]))
            self.filled = self.cursor = 0
        keep = min(len(images), self.capacity)
        slots = (torch.arange(keep, device=self.images.device) + self.cursor) % self.capacity
        self.images[slots] = images.detach()[-keep:]
        self.targets[slots] = targets[-keep:]
        self.cursor = (self.cursor + keep) % self.capacity
        self.filled = min(self.capacity, self.filled + keep)

    def sample(self, count: int) -> tuple[Tensor, Tensor]:
        """``min(count, filled)`` stored pairs drawn uniformly with replacement (memory not empty)."""
        assert self.images is not None and self.targets is not None and self.filled > 0
        index = torch.randint(0, self.filled, (min(count, self.filled),), device=self.images.device)
        return self.images[index], self.targets[index]

    def stored(self) -> tuple[Tensor, Tensor]:
        """Every stored pair (the last ``capacity`` added), in storage order (memory not empty)."""
        assert self.images is not None and self.targets is not None and self.filled > 0
        return self.images[: self.filled], self.targets[: self.filled]

    def add_and_join(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """The fresh batch joined with as many replayed pairs (drawn before it is stored)."""
        replayed = self.sample(len(images)) if self.filled > 0 else None
        self.add(images, targets)
        if replayed is None:
            return images, targets
        return torch.cat([images, replayed[0]]), torch.cat([targets, replayed[1]])

    def state_dict(self) -> dict[str, Any]:
        if self.images is None or self.targets is None:
            return {"filled": 0, "cursor": 0}
        return {"images": self.images[: self.filled].clone(), "targets": self.targets[: self.filled].clone(),
                "filled": self.filled, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.images = self.targets = None
        self.filled = self.cursor = 0
        if int(state["filled"]) > 0:
            self.add(state["images"], state["targets"])
            self.cursor = int(state["cursor"])
