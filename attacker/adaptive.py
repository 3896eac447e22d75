"""The adaptive attacker: what any attack may do to its queries before they go and to the answers after.

Four mechanisms, each a setting of every attack, all off by default (issue #38). Two shape the
queries, against the detectors (PRADA, SEAT, ``ood_rate``, ``pooled_ood``):

- ``shape_min_distance`` (against SEAT's similar pairs, Zhang et al., AISec 2021): a query
  within this RMS pixel distance of one of the last ``shape_history`` queries sent (or of an
  earlier one of its own request) gets Gaussian jitter of that RMS size, up to three times,
  so no two queries sent are that close. The victim answers the jittered image; the attack
  trains on its own image with that answer. Counted as ``shaped_jittered``.
- ``shape_cover`` (cover traffic, against the OOD-rate tests): natural images from
  ``shape_cover_source`` (a surrogate dataset, :func:`attacker.surrogate.load_surrogate`; the
  other built-in dataset by default) make up this share of every request, shuffled among the
  attack's images; their answers are paid for and thrown away. Near the end of the budget
  the cover shrinks to what is left. Counted as ``shaped_cover_queries``.

(A third kind of shaping lives in the generator attacks, which alone make their queries:
``shape_confidence`` of Dual Student and DFME, :func:`attacker.losses.confidence_shortfall`.)

Two act on the answers:

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
import math
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

__all__ = ["AdaptiveSettings", "AdaptiveVictim", "AnswerAdapter", "clone_probabilities", "contradicted", "spread_out"]

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
        shape_min_distance: the RMS pixel distance under which a query is jittered (0: never).
        shape_history: the queries sent that ``shape_min_distance`` compares with.
        shape_cover: the share of every request made of natural cover images (0: none; < 1).
        shape_cover_source: the cover images' surrogate dataset or directory (None: the other
            built-in dataset).
    """

    KEYS: ClassVar[dict[str, str]] = {
        "restore": "restore", "restore_warmup": "restore_warmup", "restore_families": "restore_families",
        "restore_steps": "restore_steps", "drop_contradicted": "drop_contradicted",
        "drop_threshold": "drop_threshold", "drop_warmup": "drop_warmup",
        "shape_min_distance": "shape_min_distance", "shape_history": "shape_history",
        "shape_cover": "shape_cover", "shape_cover_source": "shape_cover_source",
    }

    restore: bool = False
    restore_warmup: int = 2048
    restore_families: tuple[str, ...] = FAMILIES
    restore_steps: int = 1000
    drop_contradicted: bool = False
    drop_threshold: float = 0.95
    drop_warmup: int = 5000
    shape_min_distance: float = 0.0
    shape_history: int = 4096
    shape_cover: float = 0.0
    shape_cover_source: str | None = None

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
        if self.shape_min_distance < 0 or self.shape_history < 1 or not 0.0 <= self.shape_cover < 1.0:
            raise AttackError("shape_min_distance must be >= 0, shape_history >= 1 and shape_cover in [0, 1), got "
                              f"{self.shape_min_distance!r}, {self.shape_history!r}, {self.shape_cover!r}")

    @property
    def shapes(self) -> bool:
        """Whether the queries are shaped (jitter or cover)."""
        return self.shape_min_distance > 0 or self.shape_cover > 0

    @property
    def enabled(self) -> bool:
        return self.restore or self.drop_contradicted or self.shapes


def contradicted(answers: Tensor, clone_probabilities: Tensor, threshold: float) -> Tensor:
    """Bool ``[N]``: the clone's top softmax is >= ``threshold`` and its arg-max differs from the answer's.

    ``answers``: probabilities ``[N, K]`` or labels ``[N]``.
    """
    labels = answers.argmax(dim=1) if answers.dim() == 2 else answers.long()
    confidence, predicted = clone_probabilities.float().max(dim=1)
    return (confidence >= threshold) & (predicted.cpu() != labels.cpu())


def spread_out(images: Tensor, history: Tensor, min_distance: float, generator: torch.Generator,
               tries: int = 4) -> tuple[Tensor, Tensor]:
    """``images`` with Gaussian jitter of RMS size ``min_distance`` added to each that lies within
    that RMS pixel distance of a row of ``history`` (flattened earlier queries) or of an earlier
    image of its own, up to ``tries`` times; and which images were jittered (bool ``[N]``).

    Pixels stay in [0, 1] (the clipping eats some of the jitter: hence the retries).
    """
    sent = images.detach().float().cpu().clone()
    dimension = sent[0].numel()
    jittered = torch.zeros(len(sent), dtype=torch.bool)
    earlier = torch.ones(len(sent), len(sent), dtype=torch.bool).tril(diagonal=-1)
    for _ in range(tries):
        flat = sent.flatten(1)
        own = torch.cdist(flat, flat).masked_fill(~earlier, float("inf"))
        nearest = own.min(dim=1).values if len(sent) > 1 else torch.full((len(sent),), float("inf"))
        if len(history):
            nearest = torch.minimum(nearest, torch.cdist(flat, history.float()).min(dim=1).values)
        close = nearest / dimension**0.5 < min_distance
        if not bool(close.any()):
            break
        noise = torch.randn(int(close.sum()), dimension, generator=generator)
        noise = noise / noise.norm(dim=1, keepdim=True).clamp_min(1e-12) * (min_distance * dimension**0.5)
        sent[close] = (sent[close] + noise.view(-1, *sent.shape[1:])).clamp(0.0, 1.0)
        jittered |= close
    return sent, jittered


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
                                           "restored_answers": 0.0, "shaped_jittered": 0.0,
                                           "shaped_cover_queries": 0.0}
        self.history = torch.zeros(0, math.prod(info.input_shape))
        """The last ``shape_history`` queries sent, flattened (``shape_min_distance`` compares with them)."""
        self._cover: Tensor | None = None
        self.verdict: dict[str, float] = {}
        self.predict: Callable[[Tensor], Tensor] | None = None

    def bind(self, predict: Callable[[Tensor], Tensor]) -> None:
        self.predict = predict

    # -- query shaping ------------------------------------------------------------------

    def shape(self, images: Tensor, used_before: int, remaining: int | None) -> tuple[Tensor, Tensor | None]:
        """The images to send for the attack's ``images`` (cover added, near ones jittered) and the
        positions of the attack's own among them (``None``: no cover, the same positions).

        Random numbers are drawn from the run's seed and ``used_before``, so a resumed run sends what
        the uninterrupted one sent (its journal replays).
        """
        settings = self.settings
        if not settings.shapes:
            return images, None
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + used_before)
        sent, own = images.detach().float().cpu(), None
        if settings.shape_cover > 0:
            wanted = round(len(images) * settings.shape_cover / (1.0 - settings.shape_cover))
            room = len(images) + wanted if remaining is None else min(len(images) + wanted, remaining)
            count = max(0, room - len(images))
            if count:
                pool = self._cover_images()
                cover = pool[torch.randint(len(pool), (count,), generator=generator)]
                order = torch.randperm(len(images) + count, generator=generator)
                sent = torch.cat([sent, cover])[order]
                own = torch.argsort(order)[: len(images)]  # where each of the attack's images went
                self.counters["shaped_cover_queries"] += count
        if settings.shape_min_distance > 0:
            sent, jittered = spread_out(sent, self.history, settings.shape_min_distance, generator)
            self.counters["shaped_jittered"] += float(jittered.sum())
            self.history = torch.cat([self.history, sent.flatten(1)])[-settings.shape_history:]
        return sent.to(images.dtype), own

    def _cover_images(self) -> Tensor:
        if self._cover is None:
            from attacker.surrogate import load_surrogate

            self._cover = load_surrogate(self.settings.shape_cover_source, self.info.input_shape).images
        return self._cover

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
        if self.settings.shapes:
            result.update(shaped_jittered=self.counters["shaped_jittered"],
                          shaped_cover_queries=self.counters["shaped_cover_queries"])
        return result

    def get_extra_state(self) -> dict[str, Any]:
        return {"warmup_images": list(self.warmup_images), "warmup_answers": list(self.warmup_answers),
                "counters": dict(self.counters), "verdict": dict(self.verdict), "history": self.history.clone()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.warmup_images = list(state["warmup_images"])
        self.warmup_answers = list(state["warmup_answers"])
        self.counters.update({key: float(value) for key, value in state["counters"].items()})
        if "history" in state:
            self.history = state["history"].float()
        self.verdict = {key: float(value) for key, value in state["verdict"].items()}


class AdaptiveVictim(BudgetedVictim):
    """The metered victim with the adaptive attacker's answer handling (:class:`AnswerAdapter`) after it."""

    def __init__(self, *args: Any, adapter: AnswerAdapter, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.adapter = adapter

    def query(self, images: Tensor) -> Tensor:
        before = self.used
        sent, own = self.adapter.shape(images, before, self.remaining)
        answers = super().query(sent)
        if own is not None:  # the cover's answers are paid for and thrown away
            answers = answers[own]
        return self.adapter.adapt(images, answers, before)
