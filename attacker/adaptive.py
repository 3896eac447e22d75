"""The answer-side adaptive attacker: what any attack may do to the victim's answers before it trains.

Two mechanisms, each a setting of every attack, both off by default (issue #38):

- ``restore`` (D-DAE, Chen et al., IEEE S&P 2023; :mod:`attacker.restoration`): the first
  ``restore_warmup`` answered queries pass through unchanged and are kept; then a shadow
  model (a fresh student of the default architecture) is trained on those images with the
  victim's arg-max labels (arg-max survives the perturbations the restoration targets),
  the suspected perturbations (``restore_families``) are simulated on its softmax outputs,
  and a detector and a recovery network are trained on the pairs. The detector judges the
  warm-up answers; where at least half look perturbed, every later answer goes through the
  recovery before the attack sees it.
- ``drop_contradicted`` (against watermarks that answer a share of queries with a wrong
  label, e.g. DAWN, Szyller et al., ACM MM 2021): once ``drop_warmup`` queries have been
  answered, an answer whose arg-max the clone's own prediction contradicts while the clone
  is confident (its top softmax >= ``drop_threshold``) is dropped. The attacks train on
  whole answered batches, so a dropped answer's row stays in the batch with the clone's own
  prediction in its place (its probabilities, or its label for label answers): the victim's
  answer is paid for and never trained on, and the row teaches the clone nothing it does
  not already say. Counted as ``dropped_answers``.

Both act in :class:`AdaptiveVictim`, the metered victim the loop hands the attack, so every
attack (and every query of it, DFME's zeroth-order ones included) gets them; the journal
keeps the victim's own answers, and a resumed run replays them through the same adapter
(its state is checkpointed with the attack's). Metrics (every evaluation line and
``metrics.json``): ``restore_detected`` (1: the victim's answers looked perturbed),
``restore_detector_share``, ``restore_shadow_l1_before`` / ``_after`` and
``restore_shadow_detector_accuracy`` (the restorer on held-out shadow answers),
``restored_answers``, ``dropped_answers`` and ``drop_checked_answers``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from attacker.restoration import COLDEST_TEMPERATURE, FAMILIES, RANDOM_LOGIT_SCALES, Restorer
from attacker.students import StudentSettings, build_student
from attacker.victims import BudgetedVictim, VictimInfo, without_autocast
from stealsim.errors import AttackError

__all__ = ["AdaptiveSettings", "AdaptiveVictim", "AnswerAdapter", "clone_probabilities", "contradicted"]

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class AdaptiveSettings:
    """The answer-side adaptive settings every attack takes (see the module docstring).

    Attributes:
        restore: learn D-DAE's detector and recovery on a shadow, restore perturbed answers.
        restore_warmup: answered queries kept to train the shadow (passed through unchanged).
        restore_families: the perturbations suspected (:data:`attacker.restoration.FAMILIES`).
        restore_steps: Adam steps (batches of 128) of the shadow, then steps (batches of 256) of
            the detector and recovery networks.
        drop_contradicted: drop answers that the clone's confident prediction contradicts.
        drop_threshold: the clone's top softmax at or above which it counts as confident.
        drop_warmup: answered queries before any answer is dropped (the clone is learning).
    """

    KEYS: ClassVar[dict[str, str]] = {
        "restore": "restore", "restore_warmup": "restore_warmup", "restore_families": "restore_families",
        "restore_steps": "restore_steps", "drop_contradicted": "drop_contradicted",
        "drop_threshold": "drop_threshold", "drop_warmup": "drop_warmup",
    }

    restore: bool = False
    restore_warmup: int = 2048
    restore_families: tuple[str, ...] = FAMILIES
    restore_steps: int = 1000
    drop_contradicted: bool = False
    drop_threshold: float = 0.95
    drop_warmup: int = 5000

    def __post_init__(self) -> None:
        families = (self.restore_families,) if isinstance(self.restore_families, str) else self.restore_families
        object.__setattr__(self, "restore_families", tuple(str(name) for name in families))
        unknown = sorted(set(self.restore_families) - set(FAMILIES))
        if unknown or not self.restore_families:
            raise AttackError(f"restore_families must name some of {', '.join(FAMILIES)}, got "
                              f"{list(self.restore_families)}")
        if self.restore_warmup < 2 or self.restore_steps < 1 or self.drop_warmup < 0:
            raise AttackError("restore_warmup must be >= 2, restore_steps >= 1 and drop_warmup >= 0")
        if not 0.0 < self.drop_threshold <= 1.0:
            raise AttackError(f"drop_threshold must be in (0, 1], got {self.drop_threshold!r}")

    @property
    def enabled(self) -> bool:
        return self.restore or self.drop_contradicted


def contradicted(answers: Tensor, clone_probabilities: Tensor, threshold: float) -> Tensor:
    """Bool ``[N]``: the clone's top softmax is >= ``threshold`` and its arg-max differs from the answer's.

    ``answers``: probabilities ``[N, K]`` or labels ``[N]``.
    """
    labels = answers.argmax(dim=1) if answers.dim() == 2 else answers.long()
    confidence, predicted = clone_probabilities.float().max(dim=1)
    return (confidence >= threshold) & (predicted.cpu() != labels.cpu())


@torch.no_grad()
def clone_probabilities(clone: Callable[[], nn.Module], modules: Sequence[nn.Module], images: Tensor,
                        device: torch.device) -> Tensor:
    """The clone's softmax on ``images`` (float32, CPU), leaving every module of ``modules`` in the
    train/eval mode it was in (an attack's ``clone()`` may switch its network to eval)."""
    modes = [(module, module.training) for root in modules for module in root.modules()]
    try:
        model = clone()
        with without_autocast():
            logits = model(images.to(device, torch.float32))
        return torch.softmax(logits.float(), dim=1).cpu()
    finally:
        for module, training in modes:
            module.train(training)


def _flattest(logits: Tensor, answers: Tensor) -> float:
    """The shadow's temperature at which its mean top softmax is the answers' (at most 64; at least 1).

    The perturbations simulated lower the top probability, so the victim's clean answers are
    at least as confident as its served ones: the clean answers simulated go down to that level.
    """
    target = float(answers.max(dim=1).values.mean())
    low, high = 0.0, float(torch.log(torch.tensor(64.0)))
    for _ in range(30):  # bisection on log T: the mean top softmax falls as T grows
        middle = (low + high) / 2
        top = float(torch.softmax(logits / torch.exp(torch.tensor(middle)), dim=1).max(dim=1).values.mean())
        low, high = (middle, high) if top > target else (low, middle)
    return max(1.0, float(torch.exp(torch.tensor(high))))


class AnswerAdapter(nn.Module):
    """The adaptive attacker's state: the restorer, the warm-up answers, the counters.

    ``predict`` (set by the loop with :meth:`bind`) gives the clone's probabilities on images.
    """

    def __init__(self, settings: AdaptiveSettings, info: VictimInfo, device: torch.device, seed: int = 0) -> None:
        super().__init__()
        self.settings = settings
        self.info = info
        self.device = device
        self.seed = seed
        with torch.random.fork_rng(devices=[]):  # the attack's own random numbers stay those of a plain run
            torch.manual_seed(seed)
            self.restorer = Restorer(info.num_classes, settings.restore_families)
        self.warmup_images: list[Tensor] = []
        self.warmup_answers: list[Tensor] = []
        self.counters: dict[str, float] = {"dropped_answers": 0.0, "drop_checked_answers": 0.0,
                                           "restored_answers": 0.0}
        self.verdict: dict[str, float] = {}
        self.predict: Callable[[Tensor], Tensor] | None = None

    def bind(self, predict: Callable[[Tensor], Tensor]) -> None:
        self.predict = predict

    def adapt(self, images: Tensor, answers: Tensor, used_before: int) -> Tensor:
        """The answers the attack trains on, for ``images`` answered after ``used_before`` queries."""
        if self.settings.restore:
            answers = self._restore(images, answers)
        if self.settings.drop_contradicted and used_before >= self.settings.drop_warmup:
            answers = self._drop(images, answers)
        return answers

    # -- restore -------------------------------------------------------------------------

    def _restore(self, images: Tensor, answers: Tensor) -> Tensor:
        if answers.dim() != 2:
            if not self.verdict:
                logger.warning("restore: the victim answers labels only; nothing to restore")
                self.verdict = {"restore_detected": 0.0, "restore_detector_share": float("nan")}
            return answers
        if not self.restorer.fitted:
            kept = sum(len(batch) for batch in self.warmup_answers)
            room = self.settings.restore_warmup - kept
            if room > 0:
                self.warmup_images.append(images[:room].detach().float().cpu())
                self.warmup_answers.append(answers[:room].detach().float().cpu())
            if kept + min(room, len(answers)) >= self.settings.restore_warmup:
                self._fit()
            return answers
        if self.verdict.get("restore_detected") != 1.0:
            return answers
        self.counters["restored_answers"] += len(answers)
        with without_autocast():
            return self.restorer.restore(answers).to(answers.dtype)

    def _fit(self) -> None:
        """Train the shadow on the warm-up answers' arg-max, then the restorer on its outputs; judge the victim."""
        images, answers = torch.cat(self.warmup_images), torch.cat(self.warmup_answers)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), without_autocast():
            torch.manual_seed(self.seed)
            shadow = build_student(self.info, StudentSettings(), "contiguous").to(self.device)
            optimizer = torch.optim.Adam(shadow.parameters(), lr=2e-3)
            labels = answers.argmax(dim=1)
            shadow.train()
            for _ in range(self.settings.restore_steps):
                index = torch.randint(len(images), (min(128, len(images)),))
                loss = F.cross_entropy(shadow(images[index].to(self.device)), labels[index].to(self.device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            shadow.eval()
            with torch.no_grad():
                logits = shadow(images.to(self.device)).float().cpu()
            low, high = torch.log(torch.tensor([COLDEST_TEMPERATURE, _flattest(logits, answers)]))
            temperature = torch.exp(low + torch.rand(len(logits), 1) * (high - low))
            shadow_clean = torch.softmax(logits / temperature, dim=1)
            # As many softmaxes of Gaussian logits, at scales log-uniform in RANDOM_LOGIT_SCALES:
            # clean answers of shapes the one shadow does not give.
            low, high = torch.log(torch.tensor(RANDOM_LOGIT_SCALES))
            scale = torch.exp(low + torch.rand(len(logits), 1) * (high - low))
            clean = torch.cat([shadow_clean, torch.softmax(torch.randn(logits.shape) * scale, dim=1)])
            report = self.restorer.fit(clean, steps=self.settings.restore_steps, seed=self.seed)
            share = float(self.restorer.detect(answers).mean())
        self.verdict = {
            "restore_detected": 1.0 if share >= 0.5 else 0.0,
            "restore_detector_share": share,
            "restore_shadow_detector_accuracy": report["detector_accuracy"],
            "restore_shadow_l1_before": report["l1_before"],
            "restore_shadow_l1_after": report["l1_after"],
        }
        logger.info("restore: %.0f %% of %d warm-up answers look perturbed: %s", 100 * share, len(answers),
                    "restoring every later answer" if share >= 0.5 else "answers pass unchanged")
        self.warmup_images, self.warmup_answers = [], []

    # -- drop_contradicted --------------------------------------------------------------

    def _drop(self, images: Tensor, answers: Tensor) -> Tensor:
        if self.predict is None:
            raise AttackError("drop_contradicted: the adapter has no clone to ask (AnswerAdapter.bind)")
        predicted = self.predict(images)
        dropped = contradicted(answers, predicted, self.settings.drop_threshold)
        self.counters["drop_checked_answers"] += len(answers)
        count = int(dropped.sum())
        if count == 0:
            return answers
        self.counters["dropped_answers"] += count
        answers = answers.clone()
        if answers.dim() == 2:
            answers[dropped] = predicted[dropped].to(answers.dtype)
        else:
            answers[dropped] = predicted[dropped].argmax(dim=1).to(answers.dtype)
        return answers

    # -- metrics and checkpoints --------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        """The counters and the restoration's verdict (what each evaluation line records)."""
        result: dict[str, float] = {}
        if self.settings.restore:
            result.update(restored_answers=self.counters["restored_answers"], **self.verdict)
        if self.settings.drop_contradicted:
            result.update(dropped_answers=self.counters["dropped_answers"],
                          drop_checked_answers=self.counters["drop_checked_answers"])
        return result

    def get_extra_state(self) -> dict[str, Any]:
        return {"warmup_images": list(self.warmup_images), "warmup_answers": list(self.warmup_answers),
                "counters": dict(self.counters), "verdict": dict(self.verdict)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.warmup_images = list(state["warmup_images"])
        self.warmup_answers = list(state["warmup_answers"])
        self.counters = {key: float(value) for key, value in state["counters"].items()}
        self.verdict = {key: float(value) for key, value in state["verdict"].items()}


class AdaptiveVictim(BudgetedVictim):
    """The metered victim with the adaptive attacker's answer handling (:class:`AnswerAdapter`) after it."""

    def __init__(self, *args: Any, adapter: AnswerAdapter, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.adapter = adapter

    def query(self, images: Tensor) -> Tensor:
        before = self.used
        answers = super().query(images)
        return self.adapter.adapt(images, answers, before)
