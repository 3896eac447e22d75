"""An honest user: natural images of a dataset's split, sent through an API key like any client.

It measures what a defense costs the people it should not bother: the accuracy
and calibration (ECE) of the answers they get, the latency of their requests,
and whether a detector flags (or blocks) them::

    result = honest_traffic("http://127.0.0.1:8000", api_key, "victim", load_dataset("digits"),
                            HonestSettings(batch=32, rate=20.0, passes=5))
    result.accuracy, result.ece, result.flags, result.blocked_at

``stealsim honest`` runs it from the command line; the grid's honest-cost cells
(:meth:`experiments.grid.GridRunner.defense_cost`) are one pass of it.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from stealsim.data import Dataset
from stealsim.errors import APIRequestError, ConfigError, VictimAPIError
from stealsim.service_client import ServiceClient

__all__ = ["HonestResult", "HonestSettings", "expected_calibration_error", "honest_traffic"]


@dataclass(frozen=True)
class HonestSettings:
    """How the honest user behaves.

    Attributes:
        split: the dataset split sent (``test``; ``validation`` while calibrating a detector).
        batch: images per request.
        rate: requests per second at most (0: one after another, as fast as answers come).
        passes: times the whole split is sent (a longer stream bounds false positives tighter).
        shuffle: a new random order in every pass (else the split's order).
        seed: seeds the order.
    """

    split: Literal["test", "validation"] = "test"
    batch: int = 32
    rate: float = 0.0
    passes: int = 1
    shuffle: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch < 1 or self.passes < 1 or not self.rate >= 0:
            raise ConfigError(f"honest traffic needs batch >= 1, passes >= 1 and rate >= 0; got {self}")


@dataclass(frozen=True)
class HonestResult:
    """What the honest user saw.

    Attributes:
        images, requests: answered (a request refused, e.g. a blocked key, is not counted).
        accuracy, ece: of the answers against the true labels (label-only answers count as one-hot).
        latency_ms_mean, latency_ms_p50, latency_ms_p95: per answered request, as the client timed it.
        flags: the detectors that flagged the key ("+"-joined; empty: none), from ``GET /v1/usage``.
        blocked_at: images answered before the API refused a request (``None``: never refused).
        refusal: the API's error for that request.
    """

    images: int
    requests: int
    accuracy: float
    ece: float
    latency_ms_mean: float
    latency_ms_p50: float
    latency_ms_p95: float
    flags: str
    blocked_at: int | None = None
    refusal: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def expected_calibration_error(probabilities: Tensor, labels: Tensor, bins: int = 15) -> float:
    """ECE with equal-width confidence bins (Guo et al., "On Calibration of Modern Neural Networks", 2017, Eq. 3)."""
    confidence, predicted = probabilities.max(dim=1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    error = 0.0
    for low, high in itertools.pairwise(edges.tolist()):
        inside = (confidence > low) & (confidence <= high) if low > 0 else (confidence <= high)
        if inside.any():
            share = float(inside.float().mean())
            error += share * abs(float(confidence[inside].mean()) - float(correct[inside].mean()))
    return error


def _order(count: int, settings: HonestSettings) -> Tensor:
    generator = torch.Generator().manual_seed(settings.seed)
    passes = [torch.randperm(count, generator=generator) if settings.shuffle else torch.arange(count)
              for _ in range(settings.passes)]
    return torch.cat(passes)


def _flags(url: str, api_key: str, headers: dict[str, str] | None) -> str:
    """The detector flags on ``api_key`` ("a+b"); none where the server has no ``/v1/usage`` (not stealsim)."""
    with ServiceClient(url, api_key, timeout=30.0, headers=headers) as service:
        try:
            return "+".join(service.usage().get("flags", []))
        except APIRequestError as exc:
            if exc.status == 0:
                raise  # the service failed, not a server without usage
            return ""


def honest_traffic(url: str, api_key: str, model: str, data: Dataset, settings: HonestSettings | None = None,
                   headers: dict[str, str] | None = None) -> HonestResult:
    """Send ``settings.passes`` passes over ``data``'s split through ``api_key``; stop if the API refuses."""
    from attacker.client import HttpVictim

    settings = settings or HonestSettings()
    images, labels = data.split(settings.split)
    if len(labels) == 0:
        raise ConfigError(f"the {settings.split} split of {data.name} is empty")
    order = _order(len(labels), settings)
    answers: list[Tensor] = []
    answered: list[Tensor] = []
    seconds: list[float] = []
    blocked_at, refusal = None, None
    interval = 1.0 / settings.rate if settings.rate > 0 else 0.0
    with HttpVictim(url, api_key, model, headers=headers or {}) as victim:
        next_start = time.perf_counter()
        for start in range(0, len(order), settings.batch):
            if interval:
                time.sleep(max(0.0, next_start - time.perf_counter()))
                next_start = max(next_start + interval, time.perf_counter())
            index = order[start : start + settings.batch]
            began = time.perf_counter()
            try:
                answer = victim.query(images[index])
            except VictimAPIError as exc:
                if exc.status in (0, 500, 502, 503):
                    raise  # the service failed, not a refusal of this user
                blocked_at, refusal = sum(len(part) for part in answered), str(exc)
                break
            seconds.append(time.perf_counter() - began)
            answers.append(answer)
            answered.append(labels[index])
    flags = _flags(url, api_key, headers)
    if not answers:
        return HonestResult(0, 0, float("nan"), float("nan"), float("nan"), float("nan"), float("nan"), flags,
                            blocked_at, refusal)
    probabilities = torch.cat(answers)
    if probabilities.dim() == 1:  # label-only: a one-hot answer, as confident as it gets
        probabilities = torch.nn.functional.one_hot(probabilities.long(), data.num_classes).float()
    truth = torch.cat(answered)
    latency = torch.tensor(seconds) * 1000.0
    return HonestResult(
        images=len(truth), requests=len(seconds),
        accuracy=float((probabilities.argmax(dim=1) == truth).float().mean()),
        ece=expected_calibration_error(probabilities, truth),
        latency_ms_mean=float(latency.mean()), latency_ms_p50=float(latency.quantile(0.5)),
        latency_ms_p95=float(latency.quantile(0.95)), flags=flags, blocked_at=blocked_at, refusal=refusal,
    )
