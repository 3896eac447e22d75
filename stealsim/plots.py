"""Figures shared by every role (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["one_image_per_class", "plot_softmax_distributions"]


def one_image_per_class(labels: Tensor, count: int) -> list[int]:
    """Indices of the first image of each of the first ``count`` classes present."""
    picks: list[int] = []
    for label in sorted(set(labels.tolist())):
        if len(picks) == count:
            break
        picks.append(int((labels == label).nonzero()[0]))
    return picks


@torch.no_grad()
def plot_softmax_distributions(
    teachers: Mapping[str, nn.Module],
    images: Tensor,
    labels: Tensor,
    class_names: Sequence[str],
    temperature: float,
    path: Path,
) -> Path:
    """Bar charts of each teacher's ``softmax(logits / temperature)`` on a few images.

    One row per image, one column per teacher (e.g. normal vs nasty), as in
    Ma et al. (2021), Fig. 1: a Nasty Teacher's softened output has several
    misleading peaks where a normal teacher's has one.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows, columns = len(images), len(teachers)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 1.8 * rows), squeeze=False)
    positions = range(len(class_names))
    for column, (name, teacher) in enumerate(teachers.items()):
        device = next(teacher.parameters()).device
        teacher.eval()
        probabilities = torch.softmax(teacher(images.to(device)) / temperature, dim=1).cpu()
        for row in range(rows):
            axis = axes[row][column]
            colours = ["tab:red" if k == int(labels[row]) else "tab:blue" for k in positions]
            axis.bar(positions, probabilities[row].numpy(), color=colours)
            axis.set_ylim(0, 1)
            axis.set_xticks(list(positions), list(class_names), fontsize=6)
            if row == 0:
                axis.set_title(f"{name} (T={temperature:g})", fontsize=9)
            if column == 0:
                axis.set_ylabel(f"label {class_names[int(labels[row])]}", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
