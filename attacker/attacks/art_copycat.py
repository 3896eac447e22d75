"""ART's CopycatCNN through our loop, run directory and evaluation (``stealsim attack art-copycat``)."""

from __future__ import annotations

from typing import Any

from attacker.art import ArtExtraction

__all__ = ["ArtCopycat"]


class ArtCopycat(ArtExtraction):
    """Copycat CNN (Correia-Silva et al., "Copycat CNN: Stealing Knowledge by Persuading
    Confession with Random Non-Labeled Data", IJCNN 2018) as ART 1.20 implements it:
    surrogate images drawn at random, answered, and the thief fit on them."""

    name = "art-copycat"

    def extraction(self, classifier: Any, nb_stolen: int) -> Any:
        from art.attacks.extraction import CopycatCNN

        s = self.s
        return CopycatCNN(classifier, batch_size_fit=s.train_batch, batch_size_query=s.batch_size,
                          nb_epochs=s.nb_epochs, nb_stolen=nb_stolen, use_probability=not self.hard_label)
