"""Sanity before spending: the victim's answers and accuracy on a few evaluation images first.

Before anything is written, a run queries the victim's labels of its evaluation
split (the queries the evaluation plan holds anyway). :func:`checked_victim_labels`
sends them in two parts:

1. **The probe**: the split's first :data:`PROBE_IMAGES` images (32, one request),
   charged and counted as evaluation queries like any other. Their answers must
   pass the endpoint's checks (:func:`~attacker.endpoint.decode_answer`: an answer
   in another form than the metadata and the flags say is refused after 32
   images, not the whole split), and the victim must be better than chance on
   them: the run stops when even the upper end of the 95 % interval (Wilson's)
   of its accuracy on the probe lies below :func:`accuracy_floor`.
2. **The rest of the split**, whose answers join the probe's (the probe costs
   no extra query: the planned evaluation count is unchanged). The run stops
   when the victim's accuracy on the whole split is below the floor.

The floor is ``chance + (1 - chance) / 4`` with ``chance = 1 / classes`` (0.325
for 10 classes, 0.625 for 2): a victim below it on data of its own task is
being fed inputs it was not trained on, and every fidelity and accuracy the run
would print is meaningless. Seen in practice: a model trained on pixels 0..16
sent pixels in [0, 1] scores 0.1 to 0.2 on the digits test split (chance 0.1).
The refusal names the likely causes (pixel range ``--input-range``, input layout
``--input-shape``, normalisation, evaluation data of another task) and how
many images were sent. Every refusal here says how many images it sent; nothing
is written, and no attack query is spent.

A resumed run has the split's labels cached: nothing is sent, nothing checked.
"""

from __future__ import annotations

from torch import Tensor

from attacker.evaluation import Evaluator, proportion_interval
from stealsim.errors import AttackError, BudgetExhaustedError, VictimAPIError

__all__ = ["PROBE_IMAGES", "accuracy_floor", "checked_victim_labels"]

PROBE_IMAGES = 32
"""Images of the evaluation split in the probe (fewer when the split or a request holds fewer)."""


def accuracy_floor(classes: int) -> float:
    """The least accuracy a victim must show on its own task's data: ``chance + (1 - chance) / 4``."""
    chance = 1.0 / classes
    return chance + (1.0 - chance) / 4


def _labels_of(answers: Tensor) -> Tensor:
    return answers.long() if answers.dim() == 1 else answers.argmax(dim=1)


def _likely_causes(evaluator: Evaluator) -> str:
    info = evaluator.victim.info
    record = evaluator.victim.endpoint_record()
    if record is None:  # a checkpoint in this process: no wire to get wrong
        return ("Likely causes: the checkpoint is not trained for this task, or the evaluation data is not "
                "its task (--eval-dataset).")
    low, high = info.pixel_range
    layout = ", ".join(str(v) for v in record.get("wire_shape", ()))
    return (f"Likely causes: the pixel range (sent in [{low:g}, {high:g}]; pass --input-range LOW,HIGH with the "
            "range the model takes, e.g. 0,255 or 0,16); the input layout (sent as "
            f"[N, {layout}], read as the image {list(info.input_shape)}; pass --input-shape C,H,W in the order "
            "the model reads); normalisation (a model that expects normalised inputs: pass the range that "
            "normalisation maps to with --input-range, or serve the model with its normalisation inside); or "
            "evaluation data of another task than the victim's (--eval-dataset).")


def _refusal(evaluator: Evaluator, correct: int, total: int, sent: int, where: str) -> AttackError:
    classes = evaluator.victim.info.num_classes
    return AttackError(
        f"the victim answers {correct} of {where} correctly (accuracy {correct / total:.3f}; chance "
        f"{1 / classes:.3f} with {classes} classes, the least this check accepts {accuracy_floor(classes):.3f}): "
        f"on data of its own task it is no better than chance, so every number of the run would be meaningless. "
        f"{_likely_causes(evaluator)} The check sent {sent:,} images of the {evaluator.split} split of "
        f"{evaluator.dataset.name} (evaluation queries); no attack query was spent and nothing was written."
    )


def checked_victim_labels(evaluator: Evaluator) -> Tensor:
    """:meth:`Evaluator.victim_labels` with the probe first (see the module); refusals say what was sent."""
    victim = evaluator.victim
    total = len(evaluator.labels)
    first = min(PROBE_IMAGES, total, max(1, victim.info.max_images_per_request))
    start = victim.used
    probed = False

    def probe(answers: Tensor, labels: Tensor) -> None:
        nonlocal probed
        correct = int((_labels_of(answers) == labels).sum())
        _, high = proportion_interval(correct, len(labels))
        if high < accuracy_floor(victim.info.num_classes):
            raise _refusal(evaluator, correct, len(labels), len(labels), f"the probe's {len(labels)} images")
        probed = True

    try:
        labels = evaluator.victim_labels(probe=probe, probe_images=first)
    except VictimAPIError as exc:
        answered = victim.used - start
        # The failed request reached the server unless the budget refused it or nothing came back.
        failed = 0 if isinstance(exc, BudgetExhaustedError) or exc.status == 0 else (
            min(max(1, victim.info.max_images_per_request), total - answered) if probed else first)
        what = "the probe" if not probed else "the evaluation split after the probe"
        message = (f"{exc} (stopped in {what}: {answered + failed:,} images of the {evaluator.split} split were "
                   "sent, as evaluation queries; no attack query was spent and nothing was written)")
        if isinstance(exc, BudgetExhaustedError):
            raise BudgetExhaustedError(message, remaining=exc.remaining, status=exc.status) from exc
        raise VictimAPIError(message, status=exc.status, code=exc.code) from exc
    if not probed:
        return labels  # labels from the run directory (a resumed run): checked when it started
    correct = int((labels == evaluator.labels).sum())
    if correct < accuracy_floor(victim.info.num_classes) * total:
        raise _refusal(evaluator, correct, total, total, f"the {total:,} images of the {evaluator.split} split")
    return labels
