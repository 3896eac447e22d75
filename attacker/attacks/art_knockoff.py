"""ART's KnockoffNets through our loop, run directory and evaluation (``stealsim attack art-knockoff``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from attacker.art import ArtExtraction, ArtSettings
from stealsim.errors import AttackError

__all__ = ["ArtKnockoff", "ArtKnockoffSettings"]


@dataclass(frozen=True)
class ArtKnockoffSettings(ArtSettings):
    """ART KnockoffNets' settings (see :class:`~attacker.art.ArtSettings` for the shared ones).

    Attributes:
        sampling: ART's ``sampling_strategy``: ``random`` or ``adaptive``. ART's adaptive
            strategy sends one image per request and fits the thief after each one.
        reward: ART's adaptive ``reward``: ``cert``, ``div``, ``loss`` or ``all``.
    """

    sampling: Literal["random", "adaptive"] = "random"
    reward: Literal["cert", "div", "loss", "all"] = "all"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sampling not in ("random", "adaptive") or self.reward not in ("cert", "div", "loss", "all"):
            raise AttackError(f"sampling must be random or adaptive and reward cert, div, loss or all: {self}")


class ArtKnockoff(ArtExtraction):
    """Knockoff Nets (Orekondy, Schiele, Fritz, CVPR 2019) as ART 1.20 implements it.

    ART's ``KnockoffNets.extract`` queries the victim through
    :func:`~attacker.art.art_classifier` (metered) and fits a ``PyTorchClassifier``
    around our clone; our own implementation of the paper is ``knockoff``.
    """

    name = "art-knockoff"
    settings_type = ArtKnockoffSettings

    def extraction(self, classifier: Any, nb_stolen: int) -> Any:
        from art.attacks.extraction import KnockoffNets

        s = self.s
        assert isinstance(s, ArtKnockoffSettings)
        return KnockoffNets(classifier, batch_size_fit=s.train_batch, batch_size_query=s.batch_size,
                            nb_epochs=s.nb_epochs, nb_stolen=nb_stolen, sampling_strategy=s.sampling,
                            reward=s.reward, verbose=False, use_probability=not self.hard_label)

    def extract(self, extraction: Any, x: np.ndarray, thief: Any) -> None:
        labels = self.surrogate.classes.numpy() if extraction.sampling_strategy == "adaptive" else None
        extraction.extract(x, y=labels, thieved_classifier=thief)
