"""A memory of answered queries ``(x, V(x))``: students replay it, Knockoff trains on it.

Replay reuses answers already paid for, so it costs compute, not queries. Two
policies decide what a full memory keeps: ``ring`` (the last ``capacity``
answers) and ``reservoir`` (a uniform sample of every answer so far).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

__all__ = ["REPLAY_POLICIES", "ReplayMemory"]

REPLAY_POLICIES = ("ring", "reservoir")


class ReplayMemory:
    """Up to ``capacity`` answered images and their targets, sampled uniformly.

    ``policy="ring"`` keeps the last ``capacity`` added; ``policy="reservoir"`` keeps a
    uniform random sample of everything added so far (reservoir sampling, Vitter 1985,
    "Algorithm R", applied a batch at a time: item ``n`` replaces a uniformly chosen slot
    with probability ``capacity / (n + 1)``), so that early answers are not forgotten
    when a generator's distribution moves on.

    Storage is allocated on the first :meth:`add`, on the images' device, and
    starts afresh if the targets change shape (soft to hard labels).
    """

    def __init__(self, capacity: int, policy: Literal["ring", "reservoir"] = "ring",
                 generator: torch.Generator | None = None) -> None:
        """``generator``: the reservoir's random numbers (default: torch's global generator)."""
        if policy not in REPLAY_POLICIES:
            raise ValueError(f"replay policy must be one of {', '.join(REPLAY_POLICIES)}, got {policy!r}")
        self.capacity = capacity
        self.policy = policy
        self.images: Tensor | None = None
        self.targets: Tensor | None = None
        self.filled = 0
        self.cursor = 0
        self.seen = 0
        """Pairs ever added (the reservoir's ``n``)."""
        self.generator = generator

    def add(self, images: Tensor, targets: Tensor) -> None:
        """Store a batch (``ring``: over the oldest entries once full; ``reservoir``: see the class)."""
        if self.images is None or self.targets is None or self.targets.shape[1:] != targets.shape[1:]:
            self.images = images.new_empty((self.capacity, *images.shape[1:]))
            self.targets = targets.new_empty((self.capacity, *targets.shape[1:]))
            self.filled = self.cursor = self.seen = 0
        images = images.detach()
        if self.policy == "reservoir":
            self._add_reservoir(images, targets)
            return
        keep = min(len(images), self.capacity)
        slots = (torch.arange(keep, device=self.images.device) + self.cursor) % self.capacity
        self.images[slots] = images[-keep:]
        self.targets[slots] = targets[-keep:]
        self.cursor = (self.cursor + keep) % self.capacity
        self.filled = min(self.capacity, self.filled + keep)
        self.seen += len(images)

    def _add_reservoir(self, images: Tensor, targets: Tensor) -> None:
        assert self.images is not None and self.targets is not None
        free = min(len(images), self.capacity - self.filled)
        if free > 0:  # not full yet: append
            self.images[self.filled:self.filled + free] = images[:free]
            self.targets[self.filled:self.filled + free] = targets[:free]
            self.filled += free
        rest = len(images) - free
        if rest > 0:
            # Item number n (0-based, over all items ever added) draws j uniform in [0, n]
            # and replaces slot j when j < capacity.
            numbers = torch.arange(self.seen + free, self.seen + free + rest, dtype=torch.float64)
            uniform = torch.rand(rest, dtype=torch.float64, generator=self.generator)
            draws = torch.floor(uniform * (numbers + 1)).long()
            kept = draws < self.capacity
            slots = draws[kept].to(self.images.device)
            self.images[slots] = images[free:][kept.to(images.device)]
            self.targets[slots] = targets[free:][kept.to(targets.device)]
        self.seen += len(images)

    def sample(self, count: int) -> tuple[Tensor, Tensor]:
        """``min(count, filled)`` stored pairs drawn uniformly with replacement (memory not empty)."""
        assert self.images is not None and self.targets is not None and self.filled > 0
        index = torch.randint(0, self.filled, (min(count, self.filled),), device=self.images.device)
        return self.images[index], self.targets[index]

    def stored(self) -> tuple[Tensor, Tensor]:
        """Every stored pair, in storage order (memory not empty)."""
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
            return {"filled": 0, "cursor": 0, "seen": 0}
        return {"images": self.images[: self.filled].clone(), "targets": self.targets[: self.filled].clone(),
                "filled": self.filled, "cursor": self.cursor, "seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.images = self.targets = None
        self.filled = self.cursor = self.seen = 0
        filled = int(state["filled"])
        if filled > 0:
            images, targets = state["images"], state["targets"]
            self.images = images.new_empty((self.capacity, *images.shape[1:]))
            self.targets = targets.new_empty((self.capacity, *targets.shape[1:]))
            self.images[:filled] = images
            self.targets[:filled] = targets
            self.filled = filled
            self.cursor = int(state["cursor"])
            self.seen = int(state.get("seen", filled))  # a checkpoint without ``seen``: at least ``filled``
