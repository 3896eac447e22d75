"""The victim interface every attack talks to, and the wrapper that meters it.

An attack only ever calls ``victim.query(images) -> answers``. The run around it
(:mod:`attacker.runner`) also asks a victim how its queries are metered
(:attr:`Victim.metering`), what the server counts against its key
(:meth:`Victim.key_usage`), what to record of its endpoint
(:meth:`Victim.endpoint_record`), its transport's counters
(:meth:`Victim.request_metrics`), and closes it (:meth:`Victim.close`). Three
kinds of victim implement it:

- :class:`~attacker.client.HttpVictim`: the real service over HTTP;
- :class:`InProcessVictim`: a checkpoint loaded in this process (unit tests,
  and the baseline that measures the HTTP overhead);
- :class:`FunctionVictim`: any tensor function (a test double).

:class:`LocalVictim` answers the run's questions for a victim in this process
(nothing meters it, nothing to record or close). The budget is counted by
:class:`BudgetedVictim`, where the victim is called: one image is one query,
whatever the attack does with it.

Answers are either probabilities (float32 ``[N, K]``) or labels (int64 ``[N]``),
as the victim's :class:`VictimInfo` ``output_kind`` says.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from attacker.journal import AnswerJournal, JournalRecord
from stealsim.errors import AttackError, BudgetExhaustedError, RunLimitReachedError

__all__ = [
    "BudgetedVictim",
    "FunctionVictim",
    "InProcessVictim",
    "KeyUsage",
    "LocalVictim",
    "Metering",
    "OutputKind",
    "Victim",
    "VictimInfo",
    "without_autocast",
]

logger = logging.getLogger(__name__)

OutputKind = Literal["probabilities", "label"]

Metering = Literal["server", "client", "none"]
"""Who counts a victim's queries: ``server`` (a stealsim server counts the key, and the run
reconciles with it), ``client`` (a server that does not meter keys: the run's own count is
the budget) or ``none`` (a victim in this process)."""


@dataclass(frozen=True)
class VictimInfo:
    """What an attacker may know about the victim: its public model metadata."""

    input_shape: tuple[int, int, int]
    num_classes: int
    output_kind: OutputKind = "probabilities"
    pixel_range: tuple[float, float] = (0.0, 1.0)
    max_images_per_request: int = 1024
    name: str = "victim"


@dataclass(frozen=True)
class KeyUsage:
    """What the server counts against the victim's key: images ``used``, and ``remaining`` (``None``: unlimited)."""

    used: int
    remaining: int | None


@runtime_checkable
class Victim(Protocol):
    """A black box that answers a batch of images in [0, 1] (``[N, C, H, W]``).

    Attacks call :meth:`query` only; the rest is what a run asks of the victim it opened.
    """

    info: VictimInfo

    def query(self, images: Tensor) -> Tensor:
        """Probabilities ``[N, K]`` (float32) or labels ``[N]`` (int64), on the CPU."""
        ...

    @property
    def metering(self) -> Metering:
        """Who counts this victim's queries (see :data:`Metering`)."""
        ...

    def key_usage(self) -> KeyUsage | None:
        """What the server counts against this victim's key now; ``None`` where no server counts."""
        ...

    def endpoint_record(self) -> dict[str, Any] | None:
        """The negotiated endpoint for ``config.json`` (no secrets); ``None`` for a victim in this process."""
        ...

    def request_metrics(self) -> dict[str, Any]:
        """The transport's counters for ``metrics.json`` (HTTP: ``http_retries``); empty in this process."""
        ...

    def close(self) -> None:
        """Release connections; the victim answers no more queries."""
        ...


class LocalVictim:
    """The run's questions answered for a victim in this process: nothing meters it, records or closes."""

    @property
    def metering(self) -> Metering:
        return "none"

    def key_usage(self) -> KeyUsage | None:
        return None

    def endpoint_record(self) -> dict[str, Any] | None:
        return None

    def request_metrics(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


@contextmanager
def without_autocast() -> Iterator[None]:
    """``torch.autocast`` switched off on the CPU (and on CUDA where present) inside the block."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast("cpu", enabled=False))
        if torch.cuda.is_available():
            stack.enter_context(torch.autocast("cuda", enabled=False))
        yield


def _check_images(images: Tensor, info: VictimInfo) -> None:
    if images.dim() != 4 or tuple(images.shape[1:]) != info.input_shape:
        raise AttackError(
            f"images of shape {tuple(images.shape)} do not fit the victim's input "
            f"[N, {', '.join(map(str, info.input_shape))}]"
        )


class InProcessVictim(LocalVictim):
    """A classifier in this process behind the same interface as the HTTP client.

    Args:
        model: takes pixels in [0, 1], returns logits (e.g. a checkpoint's
            :class:`~stealsim.architectures.PixelClassifier`).
        info: its metadata; ``output_kind="label"`` answers arg-max labels only,
            like a server with the ``label_only`` policy.
        device: where the model runs.
        memory_format: ``channels_last`` (about 2x faster convolutions on a CPU, the same
            answers up to float rounding) or ``contiguous``.
    """

    def __init__(self, model: nn.Module, info: VictimInfo, device: str | torch.device = "cpu",
                 memory_format: str = "channels_last") -> None:
        self.model = model.to(device).eval()
        if memory_format == "channels_last":
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.info = info
        self.device = torch.device(device)

    @classmethod
    def from_checkpoint(
        cls,
        directory: Path,
        output_kind: OutputKind = "probabilities",
        device: str | torch.device = "cpu",
        max_images_per_request: int = 1024,
        memory_format: str = "channels_last",
    ) -> InProcessVictim:
        """Load the checkpoint in ``directory`` (see :mod:`stealsim.checkpoint`)."""
        from stealsim.checkpoint import load_checkpoint

        model, meta = load_checkpoint(directory, device)
        info = VictimInfo(
            input_shape=meta.input_shape,
            num_classes=meta.num_classes,
            output_kind=output_kind,
            pixel_range=meta.pixel_range,
            max_images_per_request=max_images_per_request,
            name=directory.name,
        )
        return cls(model, info, device, memory_format)

    @torch.inference_mode()
    def query(self, images: Tensor) -> Tensor:
        _check_images(images, self.info)
        if not bool(torch.isfinite(images).all()) or images.min() < 0 or images.max() > 1:
            raise AttackError("pixels must be finite and within [0, 1]")
        logits = self.model(images.to(self.device, torch.float32)).float()
        if self.info.output_kind == "label":
            return logits.argmax(dim=1).cpu()
        return torch.softmax(logits, dim=1).cpu()


class FunctionVictim(LocalVictim):
    """A test double: answers with ``function(images)`` (probabilities or labels)."""

    def __init__(self, function: Callable[[Tensor], Tensor], info: VictimInfo) -> None:
        self.function = function
        self.info = info

    def query(self, images: Tensor) -> Tensor:
        _check_images(images, self.info)
        return self.function(images)


class BudgetedVictim:
    """Meters a victim: one image is one query, counted where the victim is called.

    A request that does not fit the remaining budget is refused whole with
    :class:`~stealsim.errors.BudgetExhaustedError` before it reaches the victim,
    as the service itself does. Only answered images are counted (a request that
    raises is not). Each answered request is written to ``journal`` first (when
    given), then counted, then ``on_charge(spent)`` runs, so a run can persist its
    count before anything else happens.

    A resumed run passes the journal's records since its checkpoint as
    ``replay``: requests are answered from them, in order, while the images are
    the journal's (:meth:`~attacker.journal.JournalRecord.matches`), without asking
    the victim; the first request that is not stops the replay, and the answers
    left in it were paid for but go unused (``forfeited``).

    Args:
        victim: the victim to meter.
        budget: images this wrapper may spend (``None``: unlimited, still counted).
        used: images already answered to the attack (when resuming: at its checkpoint).
        on_charge: called with :attr:`spent` after each answered request.
        journal: where answered requests are written before they are counted.
        replay: answered requests to serve again, in order (see above).
        forfeited: images already paid for that the attack never got (a request
            charged at a kill and never recorded).
    """

    def __init__(
        self,
        victim: Victim,
        budget: int | None,
        used: int = 0,
        on_charge: Callable[[int], None] | None = None,
        journal: AnswerJournal | None = None,
        replay: Sequence[JournalRecord] = (),
        forfeited: int = 0,
    ) -> None:
        if budget is not None and budget < 0:
            raise AttackError(f"budget must be >= 0, got {budget}")
        self.victim = victim
        self.info = victim.info
        self.budget = budget
        self.used = used
        """Images answered to the attack (replayed ones included)."""
        self.forfeited = forfeited
        """Images paid for that the attack did not get (see the class docstring)."""
        self.requests = 0
        """Requests sent to the victim by this process (replayed ones are not sent)."""
        self.replayed = 0
        """Images answered from the journal."""
        self.diverged = False
        """Set when a request did not match the journal (the replay stopped there)."""
        self.on_charge = on_charge
        self.journal = journal
        self._replay = deque(replay)
        self._replayed_records = 0

    @property
    def spent(self) -> int:
        """Images paid for: :attr:`used` plus :attr:`forfeited`."""
        return self.used + self.forfeited

    @property
    def remaining(self) -> int | None:
        return None if self.budget is None else max(0, self.budget - self.spent)

    @property
    def replaying(self) -> bool:
        """Whether journal records are still waiting to be replayed."""
        return bool(self._replay)

    def affordable(self, wanted: int) -> int:
        """How many of ``wanted`` images the remaining budget pays for."""
        remaining = self.remaining
        return wanted if remaining is None else min(wanted, remaining)

    def replay_counted(self, records: Sequence[JournalRecord]) -> None:
        """Answer the next requests from ``records`` (see the class docstring), which :attr:`used`
        counts already (the evaluation's journal: its count is not the attack's progress)."""
        self.used -= sum(record.count for record in records)
        self._replay.extend(records)

    def stop_replay(self, reason: str) -> None:
        """Give up the records not replayed: they stay paid for (:attr:`forfeited`), unused."""
        if not self._replay:
            return
        left = sum(record.count for record in self._replay)
        logger.warning("%s: %d answered queries of the journal are not replayed (paid for, unused)", reason, left)
        self.forfeited += left
        self._replay.clear()
        self.diverged = True
        if self.journal is not None:  # the journal keeps what the training saw: the records replayed
            self.journal.keep_first(self._replayed_records)

    def _from_journal(self, chunk: Tensor) -> Tensor | None:
        if not self._replay:
            return None
        record = self._replay[0]
        if not record.matches(chunk):
            self.stop_replay(f"the resumed run asked for other images than its journal at {self.used:,} queries "
                             "(its training went another way: other float rounding, or changed code)")
            return None
        self._replay.popleft()
        self.replayed += record.count
        self._replayed_records += 1
        return record.answers

    def query(self, images: Tensor) -> Tensor:
        count = int(images.shape[0])
        if count == 0:
            raise AttackError("a query needs at least one image")
        remaining = self.remaining
        if remaining is not None and count > remaining:
            raise BudgetExhaustedError(
                f"a request of {count} images does not fit the remaining budget of {remaining}",
                remaining=remaining,
                status=0,
            )
        # The victim answers float32 images in float32, whatever precision the attacker
        # trains at (autocast off: an in-process victim is the server's model, not ours).
        images = images.float()
        # One request per chunk the victim accepts, each counted as it is answered,
        # so a failure half-way leaves the count exact.
        step = max(1, self.info.max_images_per_request)
        parts = []
        for start in range(0, count, step):
            chunk = images[start : start + step]
            answers = self._from_journal(chunk)
            if answers is None:
                left = count - start
                if self.remaining is not None and left > self.remaining:  # the replay stopped and forfeited
                    raise BudgetExhaustedError(
                        f"{left} images of a request do not fit the remaining budget of {self.remaining}",
                        remaining=self.remaining, status=0)
                with without_autocast():
                    try:
                        answers = self.victim.query(chunk)
                    except RunLimitReachedError as exc:
                        if exc.answered:  # part of the chunk was answered, then the accounts ran out
                            self.forfeited += exc.answered
                            if self.on_charge is not None:
                                self.on_charge(self.spent)
                        raise
                if int(answers.shape[0]) != int(chunk.shape[0]):
                    raise AttackError(f"the victim answered {answers.shape[0]} of {chunk.shape[0]} images")
                if self.journal is not None:
                    self.journal.append(self.spent, chunk, answers)
                self.requests += 1
            self.used += int(chunk.shape[0])
            if self.on_charge is not None:
                self.on_charge(self.spent)
            parts.append(answers)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    # -- the run's questions, answered by the metered victim ---------------------------------

    @property
    def metering(self) -> Metering:
        return self.victim.metering

    def key_usage(self) -> KeyUsage | None:
        return self.victim.key_usage()

    def endpoint_record(self) -> dict[str, Any] | None:
        return self.victim.endpoint_record()

    def request_metrics(self) -> dict[str, Any]:
        return self.victim.request_metrics()

    def close(self) -> None:
        self.victim.close()
