"""The ``label_only`` step: the policy ends with each row's arg-max label."""

from __future__ import annotations

from typing import ClassVar, Literal

from defense.steps.base import OutputKind, PolicyStep

__all__ = ["LabelOnly"]


class LabelOnly(PolicyStep):
    """Only the arg-max label of each row (INT64); must be the last transform of a policy."""

    name: Literal["label_only"] = "label_only"

    output_kind: ClassVar[OutputKind] = "label"
    may_follow_label_only: ClassVar[bool] = True
