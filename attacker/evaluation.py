"""Evaluation of a clone on one split of the attacker's own labelled data.

Metrics (``victim`` answers fetched through a metered victim, counted as
*evaluation* queries, apart from the attack budget), all on the evaluation split
(``EvalConfig.split``: ``test`` by default; ``validation`` while choosing settings):

- ``accuracy``: the clone's top-1 accuracy on the split's labels;
- ``fidelity``: label agreement between clone and victim on the split's images;
- ``normalised_accuracy``: clone accuracy / victim accuracy;
- their resolution: ``eval_images`` (the split's size ``n``) and, for
  ``accuracy``, ``fidelity`` and ``victim_accuracy``, a 95 % interval
  ``METRIC_ci95_low`` / ``METRIC_ci95_high`` (:func:`proportion_interval`,
  Wilson's score interval). On the 360 images of the digits test split one image
  moves a metric by 0.28 points, and 342 of 360 (0.95) has the interval 0.922 to 0.968;
- transfer, over the split's images the victim classifies correctly, at each
  L∞ budget of a small sweep (:func:`default_epsilons`): adversarial examples
  crafted on the clone by untargeted and by targeted PGD (:func:`pgd_linf`),
  then sent to the victim. ``transfer_untargeted@EPS``: the share the victim
  misclassifies; ``transfer_targeted@EPS``: the share it puts in the target
  class ``(y + 1) mod K``. ``reference_transfer_*@EPS``: the same from a model
  of the clone's architecture trained independently on the training split (what
  an attacker gets without any query). ``transfer_success_rate`` /
  ``reference_transfer_success_rate`` are the untargeted rates at the middle
  epsilon (``transfer_epsilon``), the headline transfer metric.

Cost in evaluation queries (:meth:`Evaluator.planned_queries`): the split's
images once per run (cached in the run directory, per split), then
``T x E x 2`` at every evaluation that computes transfer (the final one by
default), ``T`` the transfer set (at most ``transfer_samples``), ``E`` the
number of epsilons, 2 for untargeted and targeted; and ``T x E x 2`` once for
the reference model's examples (cached too).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from attacker.victims import BudgetedVictim
from stealsim.data import Dataset
from stealsim.errors import AttackError

__all__ = [
    "CONFIDENCE",
    "INTERVAL_METRICS",
    "EvalConfig",
    "EvalPlan",
    "EvalSplit",
    "Evaluator",
    "TransferRates",
    "default_epsilon",
    "default_epsilons",
    "epsilon_key",
    "pgd_linf",
    "predict_labels",
    "proportion_interval",
]

logger = logging.getLogger(__name__)

EvalSplit = Literal["test", "validation"]
EVAL_SPLITS: tuple[str, ...] = get_args(EvalSplit)


def default_epsilons(input_shape: tuple[int, int, int]) -> tuple[float, ...]:
    """The L∞ budgets of the transfer sweep for an input shape.

    Chosen so that the *independent reference* (the default clone architecture
    trained 15 epochs on the training split, as :meth:`Evaluator.reference_model`
    trains it) sits between about 20 % and 80 % untargeted success against a
    normally trained victim, so that a clone's transfer can land above or below
    it. Evidence (validation split, ``benchmarks/transfer_calibration.py``, seed 0,
    reference untargeted success at the three budgets): 8x8 ``digits``
    0.211 / 0.486 / 0.771, 28x28 ``mnist5k`` 0.329 / 0.547 / 0.719; the sweep
    around them is in docs/results/transfer-calibration.md. 32x32 colour keeps
    the usual CIFAR budgets around 8/255 (not calibrated here).
    """
    channels, size, _ = input_shape
    if channels >= 3:
        return (4 / 255, 8 / 255, 16 / 255)
    if size <= 16:
        return (0.125, 0.175, 0.225)
    return (0.125, 0.15, 0.175)


def _main_epsilon(epsilons: tuple[float, ...]) -> float:
    return epsilons[len(epsilons) // 2]


def default_epsilon(input_shape: tuple[int, int, int]) -> float:
    """The main (middle) budget of :func:`default_epsilons`, the one behind ``transfer_success_rate``."""
    return _main_epsilon(default_epsilons(input_shape))


def epsilon_key(epsilon: float) -> str:
    """How an epsilon appears in metric names: ``transfer_untargeted@0.15``."""
    return f"{epsilon:.4g}"


@dataclass(frozen=True)
class EvalConfig:
    """Settings of the evaluation.

    Attributes:
        split: the split evaluated (``test``; ``validation`` while choosing settings).
            The reference model always trains on the training split.
        transfer_epsilons: the L∞ budgets of the transfer sweep (``None``:
            :func:`default_epsilons` of the input shape).
        transfer_epsilon: a single budget (the sweep of one value). Give at most one of
            ``transfer_epsilons`` and ``transfer_epsilon``.
        pgd_steps: PGD iterations (step ``2.5 * eps / steps``, random start).
        transfer_samples: images of the split (correctly classified by the victim) attacked.
        transfer_every_eval: compute transfer at every evaluation, not only the final one.
        reference_epochs: training epochs of the independent reference model.
        seed: seeds PGD's random start and the reference model.
    """

    split: EvalSplit = "test"
    transfer_epsilons: tuple[float, ...] | None = None
    transfer_epsilon: float | None = None
    pgd_steps: int = 20
    transfer_samples: int = 500
    transfer_every_eval: bool = False
    reference_epochs: int = 15
    seed: int = 0

    def __post_init__(self) -> None:
        if self.split not in EVAL_SPLITS:
            # Named as the attack command's flag: this is the one check of --eval-split.
            raise AttackError(f"--eval-split {self.split!r}: choose {' or '.join(EVAL_SPLITS)}")
        if self.transfer_epsilons is not None and self.transfer_epsilon is not None:
            raise AttackError("give transfer_epsilons or transfer_epsilon, not both")
        given = self.transfer_epsilons if self.transfer_epsilons is not None else (
            () if self.transfer_epsilon is None else (self.transfer_epsilon,))
        if self.transfer_epsilons is not None and not self.transfer_epsilons:
            raise AttackError("transfer_epsilons is empty; give at least one epsilon")
        bad = [eps for eps in given if not 0 < eps <= 1]
        if bad:
            raise AttackError(f"transfer epsilons must lie in (0, 1] (pixels are in [0, 1]); got {bad}")
        if self.pgd_steps < 1 or self.transfer_samples < 1 or self.reference_epochs < 1:
            raise AttackError(
                f"pgd_steps, transfer_samples and reference_epochs must be >= 1; got {self.pgd_steps}, "
                f"{self.transfer_samples}, {self.reference_epochs}"
            )

    def epsilons(self, input_shape: tuple[int, int, int]) -> tuple[float, ...]:
        """The sweep, ascending, without repeats."""
        if self.transfer_epsilons is not None:
            chosen: tuple[float, ...] = tuple(self.transfer_epsilons)
        elif self.transfer_epsilon is not None:
            chosen = (self.transfer_epsilon,)
        else:
            chosen = default_epsilons(input_shape)
        return tuple(sorted({float(eps) for eps in chosen}))


@torch.no_grad()
def predict_labels(model: nn.Module, images: Tensor, batch_size: int = 2048) -> Tensor:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = [model(images[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(out)


def pgd_linf(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    epsilon: float,
    steps: int = 20,
    step_size: float | None = None,
    generator: torch.Generator | None = None,
    targets: Tensor | None = None,
) -> Tensor:
    """L∞ PGD (Madry et al., 2018, eq. 2) with a uniform random start, pixels kept in [0, 1].

    Untargeted (``targets`` None) ascends the loss of the true label::

        x_{t+1} = Π_{x, eps}(x_t + alpha * sign(∇_x CE(f(x_t), y)))

    targeted descends the loss of the target class instead::

        x_{t+1} = Π_{x, eps}(x_t - alpha * sign(∇_x CE(f(x_t), target)))

    ``Π_{x, eps}`` clips to the ball ``|x' - x|_∞ <= eps`` and to [0, 1];
    ``alpha = 2.5 * eps / steps`` unless ``step_size`` is given; ``x_0 = x + U(-eps, eps)``.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    alpha = step_size if step_size is not None else 2.5 * epsilon / max(1, steps)
    direction = 1.0 if targets is None else -1.0
    x0 = images.to(device)
    goal = (labels if targets is None else targets).to(device)
    noise = (torch.rand(x0.shape, generator=generator) * 2 - 1).to(device) * epsilon
    x = (x0 + noise).clamp(0, 1)
    for _ in range(steps):
        x.requires_grad_(True)
        loss = F.cross_entropy(model(x), goal)
        (grad,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            x = x + direction * alpha * grad.sign()
            x = torch.minimum(torch.maximum(x, x0 - epsilon), x0 + epsilon).clamp(0, 1)
    model.train(was_training)
    return x.detach().cpu()


CONFIDENCE = 0.95
"""The level of the intervals put beside each proportion (``*_ci95_low`` / ``*_ci95_high``)."""
INTERVAL_METRICS = ("accuracy", "fidelity", "victim_accuracy")
"""The proportions of the split that carry an interval."""


def proportion_interval(successes: int, trials: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson's score interval of a binomial proportion ``successes / trials``: ``(low, high)``.

    Wilson, E. B. (1927), "Probable inference, the law of succession, and statistical
    inference", JASA 22(158):209-212, without continuity correction; recommended over
    the normal (Wald) interval by Brown, Cai & DasGupta (2001), "Interval estimation for
    a binomial proportion", Statistical Science 16(2):101-133, because it keeps its
    coverage near 0 and 1 (a perfect score, 360 of 360, gives ``(0.9894, 1.0)``, where
    Wald's interval has width 0). Computed by scipy (``binomtest(...).proportion_ci(
    method="wilson")``). The only uncertainty it covers is the sampling of the
    evaluation split, not the spread over seeds.
    """
    from scipy.stats import binomtest

    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"a proportion needs 0 <= successes <= trials and trials >= 1, got {successes}/{trials}")
    interval = binomtest(successes, trials).proportion_ci(confidence_level=confidence, method="wilson")
    return float(interval.low), float(interval.high)


def _with_intervals(counts: dict[str, int], trials: int) -> dict[str, float]:
    """Each proportion ``count / trials`` with its :func:`proportion_interval`, and ``eval_images``."""
    metrics: dict[str, float] = {}
    for name, successes in counts.items():
        metrics[name] = successes / trials
        metrics[f"{name}_ci95_low"], metrics[f"{name}_ci95_high"] = proportion_interval(successes, trials)
    metrics["eval_images"] = float(trials)
    return metrics


def _labels_of(answers: Tensor) -> Tensor:
    return answers.long() if answers.dim() == 1 else answers.argmax(dim=1)


@dataclass(frozen=True)
class TransferRates:
    """Transfer success of one source model at each epsilon of the sweep."""

    epsilons: tuple[float, ...]
    untargeted: tuple[float, ...]
    targeted: tuple[float, ...]
    samples: int

    def metrics(self, prefix: str) -> dict[str, float]:
        """``{prefix}_untargeted@EPS`` and ``{prefix}_targeted@EPS`` for every epsilon."""
        out: dict[str, float] = {}
        for eps, untargeted, targeted in zip(self.epsilons, self.untargeted, self.targeted, strict=True):
            out[f"{prefix}_untargeted@{epsilon_key(eps)}"] = untargeted
            out[f"{prefix}_targeted@{epsilon_key(eps)}"] = targeted
        return out

    def untargeted_at(self, epsilon: float) -> float:
        return self.untargeted[self.epsilons.index(epsilon)]


@dataclass(frozen=True)
class EvalPlan:
    """The evaluation queries a run will spend, by part (see :meth:`Evaluator.plan`)."""

    split: str
    split_images: int
    transfer_per_evaluation: int
    transfer_evaluations: int
    reference: int
    exact: bool
    """False while the transfer set's size is bounded, not known (the victim's labels not yet cached)."""

    @property
    def total(self) -> int:
        return self.split_images + self.transfer_per_evaluation * self.transfer_evaluations + self.reference

    def describe(self) -> str:
        bound = "" if self.exact else "up to "
        return (f"{bound}{self.total:,} evaluation queries: {self.split_images:,} for the {self.split} split + "
                f"{self.transfer_per_evaluation:,} per transfer evaluation x {self.transfer_evaluations} + "
                f"{self.reference:,} for the reference model")


class Evaluator:
    """Evaluates clones against the victim on one split of ``dataset``.

    Args:
        dataset: the attacker's labelled data (``config.split`` is evaluated; the
            training split trains the reference model).
        victim: the metered victim for evaluation queries (no budget: counted only).
        config: settings.
        reference_factory: builds the (untrained) reference model, the clone's architecture.
        cache_dir: where the victim's answers and the reference's rates are cached
            (the run directory), one file per split.
        device: where PGD runs.
    """

    def __init__(
        self,
        dataset: Dataset,
        victim: BudgetedVictim,
        config: EvalConfig,
        reference_factory: Callable[[], nn.Module] | None = None,
        cache_dir: Path | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if tuple(dataset.input_shape) != tuple(victim.info.input_shape):
            raise AttackError(
                f"evaluation dataset {dataset.name!r} has images {dataset.input_shape}, "
                f"the victim takes {victim.info.input_shape}"
            )
        self.dataset = dataset
        self.victim = victim
        self.config = config
        self.split: EvalSplit = config.split
        self.images, self.labels = dataset.split(config.split)
        if len(self.labels) == 0:
            raise AttackError(f"the {config.split} split of {dataset.name!r} is empty; choose another --eval-split")
        self.epsilons = config.epsilons(dataset.input_shape)
        self.epsilon = _main_epsilon(self.epsilons)
        self.reference_factory = reference_factory
        self.cache_dir = cache_dir
        self.device = torch.device(device)
        self._victim_labels: Tensor | None = None
        self._reference: TransferRates | None = None

    # -- cached victim answers --------------------------------------------------------

    def attach(self, cache_dir: Path) -> None:
        """Cache in ``cache_dir`` from now on, writing what is already known in memory."""
        self.cache_dir = cache_dir
        if self._victim_labels is not None and self._labels_cache is not None and not self._labels_cache.is_file():
            torch.save(self._victim_labels, self._labels_cache)

    @property
    def _labels_cache(self) -> Path | None:
        return self.cache_dir / f"victim_{self.split}_labels.pt" if self.cache_dir else None

    def _cached_labels(self) -> Tensor | None:
        """The victim's labels of the split if known already (memory or run directory): free."""
        if self._victim_labels is None and self._labels_cache is not None and self._labels_cache.is_file():
            labels = torch.load(self._labels_cache, weights_only=True)
            if labels.shape[0] == len(self.labels):
                self._victim_labels = labels
        return self._victim_labels

    def victim_labels(self, probe: Callable[[Tensor, Tensor], None] | None = None, probe_images: int = 0) -> Tensor:
        """The victim's labels for the split's images (queried once, cached on disk).

        With ``probe``, the split's first ``probe_images`` images are sent first and
        ``probe(answers, true labels)`` sees them before the rest is sent (it raises
        to stop there); their answers are kept, so a probe costs no extra query.
        """
        cached = self._cached_labels()
        if cached is not None:
            return cached
        first = min(probe_images, len(self.images)) if probe is not None else 0
        parts: list[Tensor] = []
        if probe is not None and first > 0:
            answers = self.victim.query(self.images[:first])
            probe(answers, self.labels[:first])
            parts.append(_labels_of(answers))
        if first < len(self.images):
            parts.append(_labels_of(self.victim.query(self.images[first:])))
        labels = torch.cat(parts)
        if self._labels_cache is not None:
            torch.save(labels, self._labels_cache)
        self._victim_labels = labels
        return labels

    def victim_accuracy(self) -> float:
        return float((self.victim_labels() == self.labels).float().mean())

    # -- costs --------------------------------------------------------------------------

    def transfer_queries(self) -> int:
        """Queries of one transfer evaluation: ``T x len(epsilons) x 2``.

        ``T`` is exact once the victim's labels of the split are known (cached),
        otherwise the upper bound ``min(transfer_samples, len(split))``.
        """
        labels = self._cached_labels()
        samples = (len(self._transfer_set()[0]) if labels is not None
                   else min(self.config.transfer_samples, len(self.labels)))
        return samples * len(self.epsilons) * 2

    def plan(self, transfer_evaluations: int) -> EvalPlan:
        """What ``transfer_evaluations`` evaluations with transfer (and any number without) will query.

        The split's images once (0 if cached), :meth:`transfer_queries` per
        transfer evaluation, and as many once for the reference model (0 if
        cached). An upper bound until the victim's labels are known: the transfer
        set holds only the images the victim classifies correctly.
        """
        per_transfer = self.transfer_queries()
        return EvalPlan(
            split=self.split,
            split_images=0 if self._cached_labels() is not None else len(self.labels),
            transfer_per_evaluation=per_transfer,
            transfer_evaluations=transfer_evaluations,
            reference=per_transfer if transfer_evaluations > 0 and self._cached_reference() is None else 0,
            exact=self._cached_labels() is not None,
        )

    def planned_queries(self, transfer_evaluations: int) -> int:
        """The total of :meth:`plan`: evaluation queries a run will spend (an upper bound)."""
        return self.plan(transfer_evaluations).total

    # -- transfer -----------------------------------------------------------------------

    def _transfer_set(self) -> tuple[Tensor, Tensor]:
        correct = (self.victim_labels() == self.labels).nonzero().flatten()
        chosen = correct[: self.config.transfer_samples]
        return self.images[chosen], self.labels[chosen]

    def transfer_rates(self, model: nn.Module) -> TransferRates:
        """Untargeted and targeted PGD crafted on ``model`` at each epsilon, answered by the victim.

        Untargeted success: the victim's label differs from the true one;
        targeted success: the victim answers the target ``(y + 1) mod K``.
        One query per adversarial image (``T x E x 2`` in all).
        """
        images, labels = self._transfer_set()
        count = len(images)
        if count == 0:
            nan = tuple(float("nan") for _ in self.epsilons)
            return TransferRates(self.epsilons, nan, nan, 0)
        targets = (labels + 1) % self.victim.info.num_classes
        crafted: list[Tensor] = []
        for eps in self.epsilons:
            for goal in (None, targets):
                generator = torch.Generator().manual_seed(self.config.seed)
                crafted.append(pgd_linf(model, images, labels, eps, self.config.pgd_steps,
                                        generator=generator, targets=goal))
        answers = _labels_of(self.victim.query(torch.cat(crafted)))
        untargeted, targeted = [], []
        for index in range(len(self.epsilons)):
            start = 2 * index * count
            untargeted.append(float((answers[start : start + count] != labels).float().mean()))
            targeted.append(float((answers[start + count : start + 2 * count] == targets).float().mean()))
        return TransferRates(self.epsilons, tuple(untargeted), tuple(targeted), count)

    @property
    def _reference_cache(self) -> Path | None:
        return self.cache_dir / f"reference_transfer_{self.split}.pt" if self.cache_dir else None

    def _reference_key(self) -> dict[str, object]:
        c = self.config
        return {"epsilons": list(self.epsilons), "pgd_steps": c.pgd_steps, "transfer_samples": c.transfer_samples,
                "reference_epochs": c.reference_epochs, "seed": c.seed}

    def _cached_reference(self) -> TransferRates | None:
        """The reference's rates if measured already with these settings (memory or run directory)."""
        cache = self._reference_cache
        if self._reference is None and cache is not None and cache.is_file():
            stored = torch.load(cache, weights_only=True)
            if stored.get("key") == self._reference_key():
                self._reference = TransferRates(
                    tuple(stored["epsilons"]), tuple(stored["untargeted"]), tuple(stored["targeted"]),
                    int(stored["samples"]),
                )
        return self._reference

    def reference_transfer_rates(self) -> TransferRates:
        """:meth:`transfer_rates` of an independently trained model of the clone's architecture (once)."""
        cached = self._cached_reference()
        if cached is not None:
            return cached
        rates = self.transfer_rates(self.reference_model())
        if self._reference_cache is not None:
            torch.save({"key": self._reference_key(), "epsilons": list(rates.epsilons),
                        "untargeted": list(rates.untargeted), "targeted": list(rates.targeted),
                        "samples": rates.samples}, self._reference_cache)
        self._reference = rates
        return rates

    def reference_model(self) -> nn.Module:
        """The reference: ``reference_factory()`` trained ``reference_epochs`` on the training split."""
        from stealsim.training import TrainConfig, fit

        if self.reference_factory is None:
            raise AttackError("no reference architecture given for the transfer baseline")
        torch_state = torch.get_rng_state()  # training the reference must not shift the attack's RNG
        try:
            torch.manual_seed(self.config.seed + 1)
            model = self.reference_factory()
            size = self.dataset.input_shape[1]
            config = TrainConfig(
                epochs=self.config.reference_epochs, seed=self.config.seed + 1,
                max_shift=1 if size <= 16 else 2,
            )
            x_train, y_train = self.dataset.split("train")
            fit(model, x_train, y_train, config, device=self.device, description="reference", show_progress=False)
        finally:
            torch.set_rng_state(torch_state)
        result: nn.Module = model.eval()
        return result

    # -- the evaluation -------------------------------------------------------------------

    def evaluate(self, clone: nn.Module, final: bool) -> dict[str, float]:
        victim_labels = self.victim_labels()
        predictions = predict_labels(clone, self.images)
        metrics = _with_intervals({
            "accuracy": int((predictions == self.labels).sum()),
            "fidelity": int((predictions == victim_labels).sum()),
            "victim_accuracy": int((victim_labels == self.labels).sum()),
        }, len(self.labels))
        accuracy, victim_accuracy = metrics["accuracy"], metrics["victim_accuracy"]
        metrics["normalised_accuracy"] = accuracy / victim_accuracy if victim_accuracy > 0 else float("nan")
        if final or self.config.transfer_every_eval:
            rng = torch.get_rng_state()
            clone_rates = self.transfer_rates(clone)
            reference_rates = self.reference_transfer_rates()
            metrics.update(clone_rates.metrics("transfer"))
            metrics.update(reference_rates.metrics("reference_transfer"))
            metrics["transfer_success_rate"] = clone_rates.untargeted_at(self.epsilon)
            metrics["reference_transfer_success_rate"] = reference_rates.untargeted_at(self.epsilon)
            metrics["transfer_epsilon"] = self.epsilon
            metrics["transfer_samples"] = float(clone_rates.samples)
            torch.set_rng_state(rng)
        return metrics
