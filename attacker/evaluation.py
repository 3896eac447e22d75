"""Evaluation of a clone on the attacker's own labelled test set.

Metrics (``victim`` answers fetched through a metered victim, counted as
*evaluation* queries, apart from the attack budget):

- ``accuracy``: the clone's top-1 accuracy on the test labels;
- ``fidelity``: label agreement between clone and victim on the test images;
- ``normalised_accuracy``: clone accuracy / victim accuracy;
- ``transfer_success_rate``: L∞ PGD crafted on the clone, over test images the
  victim classifies correctly: the share the victim then misclassifies; beside
  it ``reference_transfer_success_rate``, the same PGD crafted on a model of the
  clone's architecture trained independently on the attacker's training split.

Cost in evaluation queries: the test set once per run (cached in the run
directory), then ``transfer_samples`` for the clone's adversarial examples at
every evaluation that computes transfer (the final one by default) and
``transfer_samples`` once for the reference model's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from attacker.victims import BudgetedVictim
from stealsim.data import Dataset
from stealsim.errors import AttackError

__all__ = ["EvalConfig", "Evaluator", "default_epsilon", "pgd_linf", "predict_labels"]

logger = logging.getLogger(__name__)


def default_epsilon(input_shape: tuple[int, int, int]) -> float:
    """The L∞ budget of the transfer attack for an input shape.

    0.3 for 28x28 grayscale and 8/255 for 32x32 colour (the usual MNIST and
    CIFAR settings). For 8x8 ``digits`` 0.2: a digit there is a handful of
    pixels with 17 grey levels, so 0.3 (5 grey levels everywhere) would redraw it,
    while 0.2 (about 3 levels) leaves it readable.
    """
    channels, size, _ = input_shape
    if channels >= 3:
        return 8 / 255
    if size <= 16:
        return 0.2
    return 0.3


@dataclass(frozen=True)
class EvalConfig:
    """Settings of the evaluation.

    Attributes:
        transfer_epsilon: L∞ budget of PGD (``None``: :func:`default_epsilon`).
        pgd_steps: PGD iterations (step ``2.5 * eps / steps``, random start).
        transfer_samples: test images (correctly classified by the victim) attacked.
        transfer_every_eval: compute transfer at every evaluation, not only the final one.
        reference_epochs: training epochs of the independent reference model.
        seed: seeds PGD's random start and the reference model.
    """

    transfer_epsilon: float | None = None
    pgd_steps: int = 20
    transfer_samples: int = 500
    transfer_every_eval: bool = False
    reference_epochs: int = 15
    seed: int = 0


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
) -> Tensor:
    """Untargeted L∞ PGD (Madry et al., 2018) with a random start, pixels kept in [0, 1].

    ``x_{t+1} = clip_{x, eps}(x_t + alpha * sign(grad_x CE(model(x_t), y)))``.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    alpha = step_size if step_size is not None else 2.5 * epsilon / max(1, steps)
    x0, y = images.to(device), labels.to(device)
    noise = (torch.rand(x0.shape, generator=generator) * 2 - 1).to(device) * epsilon
    x = (x0 + noise).clamp(0, 1)
    for _ in range(steps):
        x.requires_grad_(True)
        loss = F.cross_entropy(model(x), y)
        (grad,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            x = x + alpha * grad.sign()
            x = torch.minimum(torch.maximum(x, x0 - epsilon), x0 + epsilon).clamp(0, 1)
    model.train(was_training)
    return x.detach().cpu()


def _labels_of(answers: Tensor) -> Tensor:
    return answers.long() if answers.dim() == 1 else answers.argmax(dim=1)


class Evaluator:
    """Evaluates clones against the victim on ``dataset``'s test split.

    Args:
        dataset: the attacker's labelled data (its test split is evaluated; its
            training split trains the reference model).
        victim: the metered victim for evaluation queries (no budget: counted only).
        config: settings.
        reference_architecture: architecture (and ``width``) of the reference model.
        cache_dir: where the victim's test answers are cached (the run directory).
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
        self.epsilon = config.transfer_epsilon or default_epsilon(dataset.input_shape)
        self.reference_factory = reference_factory
        self.cache_dir = cache_dir
        self.device = torch.device(device)
        self._victim_labels: Tensor | None = None
        self._reference_rate: float | None = None

    # -- cached victim answers --------------------------------------------------------

    def victim_labels(self) -> Tensor:
        """The victim's labels for the test images (queried once, cached on disk)."""
        if self._victim_labels is not None:
            return self._victim_labels
        cache = self.cache_dir / "victim_test_labels.pt" if self.cache_dir else None
        if cache is not None and cache.is_file():
            labels = torch.load(cache, weights_only=True)
            if labels.shape[0] == len(self.dataset.y_test):
                self._victim_labels = labels
                return labels
        labels = _labels_of(self.victim.query(self.dataset.x_test))
        if cache is not None:
            torch.save(labels, cache)
        self._victim_labels = labels
        return labels

    def victim_accuracy(self) -> float:
        return float((self.victim_labels() == self.dataset.y_test).float().mean())

    # -- transfer -----------------------------------------------------------------------

    def _transfer_set(self) -> tuple[Tensor, Tensor]:
        correct = (self.victim_labels() == self.dataset.y_test).nonzero().flatten()
        chosen = correct[: self.config.transfer_samples]
        return self.dataset.x_test[chosen], self.dataset.y_test[chosen]

    def transfer_success_rate(self, model: nn.Module) -> float:
        """Share of PGD examples crafted on ``model`` that the victim misclassifies."""
        images, labels = self._transfer_set()
        if len(images) == 0:
            return float("nan")
        generator = torch.Generator().manual_seed(self.config.seed)
        adversarial = pgd_linf(model, images, labels, self.epsilon, self.config.pgd_steps, generator=generator)
        answers = _labels_of(self.victim.query(adversarial))
        return float((answers != labels).float().mean())

    def reference_transfer_success_rate(self) -> float:
        """The same PGD from an independently trained model of the clone's architecture."""
        if self._reference_rate is None:
            cache = self.cache_dir / "reference_transfer.pt" if self.cache_dir else None
            if cache is not None and cache.is_file():
                self._reference_rate = float(torch.load(cache, weights_only=True)["rate"])
            else:
                reference = self._train_reference()
                self._reference_rate = self.transfer_success_rate(reference)
                if cache is not None:
                    torch.save({"rate": self._reference_rate}, cache)
        return self._reference_rate

    def _train_reference(self) -> nn.Module:
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
            fit(model, self.dataset.x_train, self.dataset.y_train, config, device=self.device,
                description="reference", show_progress=False)
        finally:
            torch.set_rng_state(torch_state)
        result: nn.Module = model.eval()
        return result

    # -- the evaluation -------------------------------------------------------------------

    def evaluate(self, clone: nn.Module, final: bool) -> dict[str, float]:
        victim_labels = self.victim_labels()
        predictions = predict_labels(clone, self.dataset.x_test)
        victim_accuracy = self.victim_accuracy()
        accuracy = float((predictions == self.dataset.y_test).float().mean())
        metrics = {
            "accuracy": accuracy,
            "fidelity": float((predictions == victim_labels).float().mean()),
            "victim_accuracy": victim_accuracy,
            "normalised_accuracy": accuracy / victim_accuracy if victim_accuracy > 0 else float("nan"),
        }
        if final or self.config.transfer_every_eval:
            rng = torch.get_rng_state()
            metrics["transfer_success_rate"] = self.transfer_success_rate(clone)
            metrics["reference_transfer_success_rate"] = self.reference_transfer_success_rate()
            metrics["transfer_epsilon"] = self.epsilon
            metrics["transfer_samples"] = float(len(self._transfer_set()[0]))
            torch.set_rng_state(rng)
        return metrics
