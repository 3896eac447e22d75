"""Uncertainty-quantification (UQ) substitutes: several possible clones, one combined prediction.

The attacker does not know the victim's architecture, weights or data. A UQ
model holds that uncertainty as a set of *members* (networks, or samples of one
network's weights) whose softmax outputs are averaged::

    p(y | x) = (1 / M) sum_m softmax(f_m(x))

Five kinds, one class each (:data:`UQ_MODELS`):

- ``deep-ensemble`` (Lakshminarayanan et al., NeurIPS 2017): M networks, each
  from its own initialisation, optionally of different architectures;
- ``mc-dropout`` (Gal & Ghahramani, ICML 2016): one network with dropout; the
  members are M dropout masks at prediction time;
- ``snapshot`` (Huang et al., "Snapshot Ensembles", ICLR 2017, eq. 2): one
  network under a cyclic cosine learning rate with M cycles over the budget; the
  weights at the end of each cycle are a member;
- ``swag`` (Maddox et al., NeurIPS 2019, SWAG-diagonal): running mean and
  second moment of the weights over the second part of the budget; members are
  ``theta_SWA + scale * sigma * eps_m`` (``sigma^2`` the diagonal variance);
- ``laplace`` (last layer; Daxberger et al., "Laplace Redux", NeurIPS 2021):
  a diagonal Gaussian on the last linear layer with precision
  ``prior + sum_n diag GGN_n``, ``GGN`` of the softmax cross-entropy
  (``p_k (1 - p_k) h_j^2`` for weight ``W_kj``, ``h`` the layer's input),
  accumulated over every answered image; members sample that layer.

Sampled members (``swag``, ``laplace``, ``mc-dropout``) use fixed seeds, so a
member is the same network at every evaluation. Training is the same for every
kind (:meth:`UQModel.train_step`): the sum of the members' student losses on
the victim's answers, minus an optional *diversity* term (beyond the paper)
that pushes the members' softmax outputs apart on images the victim was not
asked about.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args

import torch
from torch import Tensor, nn
from torch.func import functional_call

from attacker.losses import student_loss
from attacker.replay import ReplayMemory
from attacker.students import (
    StudentSettings,
    cosine_factor,
    default_clone_architecture,
    set_learning_rate,
)
from attacker.victims import VictimInfo
from stealsim.architectures import PixelClassifier, build_classifier
from stealsim.errors import AttackError

__all__ = [
    "UQ_KINDS",
    "UQ_MODELS",
    "MemberAverage",
    "UQKind",
    "UQModel",
    "UQSettings",
    "build_uq_model",
    "member_diagnostics",
    "member_probabilities",
    "member_spread",
    "pairwise_disagreement",
    "spread_diagnostics",
]

UQKind = Literal["deep-ensemble", "mc-dropout", "snapshot", "swag", "laplace"]
UQ_KINDS: tuple[str, ...] = get_args(UQKind)


@dataclass(frozen=True)
class UQSettings:
    """How a UQ model is built and trained.

    Attributes:
        kind: one of :data:`UQ_KINDS`.
        members: M, the number of members.
        architectures: members' architectures, cycled over the members of a
            ``deep-ensemble`` (the first one for single-network kinds); empty: the
            students' ``architecture``, else the default clone architecture for the input.
        students: how each network is built and trained (:class:`~attacker.students.StudentSettings`:
            architecture, width, pool-first, learning rate and its cosine floor, loss, label
            smoothing, replay). The networks use Adam on a cosine schedule (cyclic for
            ``snapshot``), with no moving average and in the contiguous layout. Their replay
            policy is ``ring``, with which every ensemble figure was measured.
        dropout: dropout rate of ``mc-dropout``.
        swag_start: fraction of the budget after which SWAG collects moments.
        swag_scale: scale of SWAG's sampled deviation (0.5 in Maddox et al.).
        laplace_prior: prior precision of the last-layer Laplace approximation.
        diversity_weight: weight of the diversity term (0: the paper's setting).
    """

    KEYS: ClassVar[dict[str, str]] = {
        "uq": "kind", "members": "members", "architectures": "architectures", "dropout": "dropout",
        "swag_start": "swag_start", "swag_scale": "swag_scale", "laplace_prior": "laplace_prior",
        "diversity_weight": "diversity_weight",
    }
    """Flat keys (``--set KEY=VALUE``); the students' keys come with ``students``."""

    kind: UQKind = "deep-ensemble"
    members: int = 5
    architectures: tuple[str, ...] = ()
    students: StudentSettings = field(default_factory=lambda: StudentSettings(replay_policy="ring"))
    dropout: float = 0.25
    swag_start: float = 0.5
    swag_scale: float = 0.5
    laplace_prior: float = 1.0
    diversity_weight: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "architectures", tuple(self.architectures))
        if self.kind not in UQ_KINDS:
            raise AttackError(f"unknown --uq {self.kind!r} (UQ kind); choose one of {list(UQ_KINDS)}")
        if self.members < 1 or not 0 <= self.dropout < 1 or not 0 <= self.swag_start < 1:
            raise AttackError(f"invalid UQ settings: {self}")
        if self.laplace_prior <= 0 or self.swag_scale < 0 or self.diversity_weight < 0:
            raise AttackError(f"invalid UQ settings: {self}")


def build_member(info: VictimInfo, architecture: str | None, students: StudentSettings,
                 dropout: float) -> PixelClassifier:
    """One member network for the victim's input (pixels in [0, 1], centred as a student's)."""
    channels, size, _ = info.input_shape
    name = architecture or default_clone_architecture(channels, size)
    kwargs: dict[str, Any] = {"width": students.width, "pool_first": students.pool_first} if name == "small-cnn" else {}
    if dropout > 0:
        kwargs["dropout"] = dropout
    net = build_classifier(name, in_channels=channels, image_size=size, num_classes=info.num_classes, **kwargs)
    return PixelClassifier(net, [0.5] * channels, [0.5] * channels)


def pairwise_disagreement(logits: Sequence[Tensor]) -> Tensor:
    """Mean L1 distance between the members' softmax outputs over all pairs (0 for one member).

    The generalisation of Dual Student's ``L1(S1, S2)`` (on probabilities) to M members.
    """
    probabilities = torch.stack([torch.softmax(one.float(), dim=1) for one in logits])  # [M, N, K]
    count = probabilities.shape[0]
    if count < 2:
        return probabilities.sum() * 0.0
    distances = (probabilities.unsqueeze(0) - probabilities.unsqueeze(1)).abs().mean(dim=(2, 3))
    return distances.sum() / (count * (count - 1))


class MemberAverage(nn.Module):
    """The combined prediction: ``log mean_m softmax(f_m(x))`` (log-probabilities serve as logits)."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, pixels: Tensor) -> Tensor:
        probabilities = torch.stack([torch.softmax(m(pixels), dim=1) for m in self.members]).mean(dim=0)
        return torch.log(probabilities.clamp_min(1e-12))


class _DropoutSample(nn.Module):
    """One MC-dropout member: the network with dropout on (fixed seed), batch norm in eval mode."""

    def __init__(self, net: nn.Module, seed: int) -> None:
        super().__init__()
        self.net = net
        self.seed = seed

    def forward(self, pixels: Tensor) -> Tensor:
        dropouts = [m for m in self.net.modules() if isinstance(m, nn.Dropout)]
        modes = [m.training for m in dropouts]
        devices = [pixels.device] if pixels.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            for module in dropouts:
                module.train()
            try:
                out: Tensor = self.net(pixels)
            finally:
                for module, mode in zip(dropouts, modes, strict=True):
                    module.train(mode)
        return out


class _Sampled(nn.Module):
    """A member whose (some) parameters are replaced by a sample, the rest shared with ``net``."""

    def __init__(self, net: nn.Module, parameters: dict[str, Tensor]) -> None:
        super().__init__()
        self.net = net
        self.sampled = parameters

    def forward(self, pixels: Tensor) -> Tensor:
        out: Tensor = functional_call(self.net, self.sampled, (pixels,))
        return out


class UQModel(nn.Module):
    """Base class: trainable networks, their optimisers, replay, and the members they define.

    Subclasses set :attr:`kind` and may override :meth:`_network_count`,
    :meth:`schedule`, :meth:`training_members`, :meth:`members` and
    :meth:`_after_update`.
    """

    kind: ClassVar[str]

    def __init__(self, info: VictimInfo, settings: UQSettings, device: torch.device) -> None:
        super().__init__()
        self.info = info
        self.settings = settings
        self.device = device
        self.students = students = settings.students
        architectures = settings.architectures or (students.architecture,)
        dropout = self._dropout()
        self.networks = nn.ModuleList(
            [build_member(info, architectures[i % len(architectures)], students, dropout)
             for i in range(self._network_count())]
        ).to(device)
        self.optimizers = [torch.optim.Adam(n.parameters(), lr=students.learning_rate) for n in self.networks]
        self.progress = 0.0
        self.updates = 0
        self.memory = ReplayMemory(students.replay, students.replay_policy)

    def _network_count(self) -> int:
        return 1

    def _dropout(self) -> float:
        return 0.0

    # -- schedule and training ---------------------------------------------------------------

    def schedule(self, progress: float) -> None:
        """Set the learning rates for ``progress`` (fraction of the budget spent)."""
        self.progress = progress
        factor = cosine_factor(progress, self.students.min_lr_fraction)
        for optimizer in self.optimizers:
            set_learning_rate(optimizer, self.students.learning_rate, factor)

    def training_members(self, pixels: Tensor) -> list[Tensor]:
        """The members' logits in training mode, differentiable (the generator and diversity use them)."""
        return [net(pixels) for net in self.networks]

    def _fit_logits(self, pixels: Tensor) -> list[Tensor]:
        """The logits fitted to the victim's answers: every trained network's."""
        return [net(pixels) for net in self.networks]

    def train_step(self, images: Tensor, targets: Tensor, unlabelled: Tensor | None = None) -> float:
        """One update of every network on the victim's answers; returns the mean student loss.

        Loss: ``sum_m L(f_m(x), V(x)) - w * D(unlabelled)``, ``D`` the members' mean
        pairwise L1 distance of softmax outputs (:func:`pairwise_disagreement`) on
        images no one paid for, ``w`` the ``diversity_weight``.
        """
        fresh_images, fresh_targets = images, targets
        if self.students.replay > 0:
            images, targets = self.memory.add_and_join(images, targets)
        fit = self._update(images, targets, unlabelled)
        self._after_update(fresh_images, fresh_targets)
        return fit

    def train_replayed(self, count: int, unlabelled: Tensor | None = None) -> float:
        """One more update on ``count`` answered images drawn from the replay memory (no query)."""
        if self.memory.filled == 0:
            return 0.0
        images, targets = self.memory.sample(count)
        return self._update(images, targets, unlabelled)

    def _update(self, images: Tensor, targets: Tensor, unlabelled: Tensor | None) -> float:
        for net in self.networks:
            net.train()
        fits = [student_loss(logits, targets, self.students.soft_loss, self.students.label_smoothing)
                for logits in self._fit_logits(images)]
        loss = torch.stack(fits).sum()
        if self.settings.diversity_weight > 0 and unlabelled is not None:
            loss = loss - self.settings.diversity_weight * pairwise_disagreement(self.training_members(unlabelled))
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in self.optimizers:
            optimizer.step()
        self.updates += 1
        return float(torch.stack(fits).mean().detach())

    def _after_update(self, images: Tensor, targets: Tensor) -> None:
        """Hook after each update, with the fresh (not replayed) batch."""

    # -- members -------------------------------------------------------------------------------

    def members(self) -> list[nn.Module]:
        """The members for prediction (eval mode), each mapping pixels to logits."""
        return list(self.networks)

    def combined(self) -> MemberAverage:
        """The combined prediction, in eval mode: the clone that is evaluated."""
        return MemberAverage(self.members()).eval()

    def get_extra_state(self) -> dict[str, Any]:
        return {"updates": self.updates, "progress": self.progress}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])
        self.progress = float(state["progress"])


class DeepEnsemble(UQModel):
    """M independently initialised networks (architectures cycled from ``architectures``)."""

    kind = "deep-ensemble"

    def _network_count(self) -> int:
        return self.settings.members


class MCDropout(UQModel):
    """One network with dropout ``p``; member m is the network under dropout mask seed m."""

    kind = "mc-dropout"

    def _dropout(self) -> float:
        return self.settings.dropout

    def training_members(self, pixels: Tensor) -> list[Tensor]:
        # The network fits the victim under one fresh mask per update (``_fit_logits``);
        # M masks are drawn only where members must disagree (generator, diversity).
        net = self.networks[0]
        return [net(pixels) for _ in range(self.settings.members)]

    def members(self) -> list[nn.Module]:
        return [_DropoutSample(self.networks[0], 1000 + m) for m in range(self.settings.members)]


class Snapshot(UQModel):
    """Cyclic cosine learning rate with M cycles; the weights at each cycle's end are members."""

    kind = "snapshot"
    filled: Tensor

    def __init__(self, info: VictimInfo, settings: UQSettings, device: torch.device) -> None:
        super().__init__(info, settings, device)
        self.snapshots = nn.ModuleList([copy.deepcopy(self.networks[0]) for _ in range(settings.members - 1)])
        self.snapshots.requires_grad_(False).eval()
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    def schedule(self, progress: float) -> None:
        self.progress = progress
        cycles = self.settings.members
        cycle = min(cycles - 1, int(progress * cycles))
        # A cycle ended: its final weights become a member.
        while int(self.filled) < cycle:
            self.snapshots[int(self.filled)].load_state_dict(self.networks[0].state_dict())
            self.filled += 1
        within = progress * cycles - cycle
        factor = cosine_factor(within, self.students.min_lr_fraction)
        set_learning_rate(self.optimizers[0], self.students.learning_rate, factor)

    def _taken(self) -> list[nn.Module]:
        return list(self.snapshots[: int(self.filled)])

    def training_members(self, pixels: Tensor) -> list[Tensor]:
        return [self.networks[0](pixels)] + [s(pixels) for s in self._taken()]

    def members(self) -> list[nn.Module]:
        return [*self._taken(), self.networks[0]]


def _sample(mean: Tensor, std: Tensor, seed: int) -> Tensor:
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(seed)).to(mean.device)
    return mean + std * noise


class SWAG(UQModel):
    """SWAG-diagonal: moments of the weights collected after ``swag_start``; members sample them."""

    kind = "swag"
    collected: Tensor

    def __init__(self, info: VictimInfo, settings: UQSettings, device: torch.device) -> None:
        super().__init__(info, settings, device)
        net = self.networks[0]
        self._names = [name for name, _ in net.named_parameters()]
        for index, (_, parameter) in enumerate(net.named_parameters()):
            self.register_buffer(f"mean_{index}", parameter.detach().clone())
            self.register_buffer(f"square_{index}", parameter.detach().clone() ** 2)
        self.register_buffer("collected", torch.zeros((), dtype=torch.long))

    def _moments(self) -> list[tuple[Tensor, Tensor]]:
        return [(getattr(self, f"mean_{i}"), getattr(self, f"square_{i}")) for i in range(len(self._names))]

    @torch.no_grad()
    def _after_update(self, images: Tensor, targets: Tensor) -> None:
        if self.progress < self.settings.swag_start:
            return
        self.collected += 1
        n = float(self.collected)
        for (mean, square), parameter in zip(self._moments(), self.networks[0].parameters(), strict=True):
            if n == 1:
                mean.copy_(parameter)
                square.copy_(parameter**2)
            else:
                mean.mul_(1 - 1 / n).add_(parameter, alpha=1 / n)
                square.mul_(1 - 1 / n).add_(parameter**2, alpha=1 / n)

    def _sampled(self, seed: int | None) -> dict[str, Tensor]:
        sampled = {}
        for index, (name, (mean, square)) in enumerate(zip(self._names, self._moments(), strict=True)):
            std = (square - mean**2).clamp_min(0.0).sqrt() * self.settings.swag_scale
            if seed is None:
                sampled[name] = mean + std * torch.randn_like(mean)
            else:
                sampled[name] = _sample(mean, std, seed * 1009 + index)
        return sampled

    def training_members(self, pixels: Tensor) -> list[Tensor]:
        if int(self.collected) < 2:
            return super().training_members(pixels)
        net = self.networks[0]
        # Sampled around the current weights (differentiable), spread by the collected variance.
        outputs = []
        for _ in range(self.settings.members):
            sample = {}
            for (name, parameter), (mean, square) in zip(net.named_parameters(), self._moments(), strict=True):
                std = (square - mean**2).clamp_min(0.0).sqrt() * self.settings.swag_scale
                sample[name] = parameter + std * torch.randn_like(parameter)
            outputs.append(functional_call(net, sample, (pixels,)))
        return outputs

    def members(self) -> list[nn.Module]:
        if int(self.collected) < 2:  # no moments yet: the network itself
            return [self.networks[0]]
        return [_Sampled(self.networks[0], self._sampled(1 + m)) for m in range(self.settings.members)]


def _last_linear(net: nn.Module) -> tuple[str, nn.Linear]:
    found = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise AttackError("a last-layer Laplace model needs a network ending in a linear layer")
    return found[-1]


class LastLayerLaplace(UQModel):
    """Diagonal last-layer Laplace: ``W ~ N(W_MAP, (prior + sum_n GGN_n)^-1)``; members sample ``W``."""

    kind = "laplace"
    precision_weight: Tensor
    precision_bias: Tensor

    def __init__(self, info: VictimInfo, settings: UQSettings, device: torch.device) -> None:
        super().__init__(info, settings, device)
        self._layer_name, layer = _last_linear(self.networks[0])
        self.register_buffer("precision_weight", torch.zeros_like(layer.weight))
        self.register_buffer("precision_bias", torch.zeros_like(layer.bias))
        self._features: Tensor | None = None
        layer.register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        self._features = inputs[0].detach()

    @torch.no_grad()
    def _after_update(self, images: Tensor, targets: Tensor) -> None:
        net = self.networks[0]
        was_training = net.training
        net.eval()
        probabilities = torch.softmax(net(images), dim=1)
        net.train(was_training)
        assert self._features is not None
        curvature = probabilities * (1 - probabilities)  # diagonal of the softmax CE Hessian in the logits
        self.precision_weight += curvature.t() @ self._features**2
        self.precision_bias += curvature.sum(dim=0)

    def _std(self) -> tuple[Tensor, Tensor]:
        prior = self.settings.laplace_prior
        return (prior + self.precision_weight).rsqrt(), (prior + self.precision_bias).rsqrt()

    def _layer(self) -> nn.Linear:
        return _last_linear(self.networks[0])[1]

    def training_members(self, pixels: Tensor) -> list[Tensor]:
        layer, (std_w, std_b) = self._layer(), self._std()
        outputs = []
        for _ in range(self.settings.members):
            sample = {f"{self._layer_name}.weight": layer.weight + std_w * torch.randn_like(std_w),
                      f"{self._layer_name}.bias": layer.bias + std_b * torch.randn_like(std_b)}
            outputs.append(functional_call(self.networks[0], sample, (pixels,)))
        return outputs

    def members(self) -> list[nn.Module]:
        layer, (std_w, std_b) = self._layer(), self._std()
        weight, bias = layer.weight.detach(), layer.bias.detach()
        return [
            _Sampled(self.networks[0], {
                f"{self._layer_name}.weight": _sample(weight, std_w, 2 * m + 1),
                f"{self._layer_name}.bias": _sample(bias, std_b, 2 * m + 2),
            })
            for m in range(self.settings.members)
        ]


UQ_MODELS: dict[str, type[UQModel]] = {
    cls.kind: cls for cls in (DeepEnsemble, MCDropout, Snapshot, SWAG, LastLayerLaplace)
}


def build_uq_model(info: VictimInfo, settings: UQSettings, device: torch.device) -> UQModel:
    return UQ_MODELS[settings.kind](info, settings, device)


@torch.no_grad()
def member_probabilities(members: Sequence[nn.Module], images: Tensor, batch_size: int = 2048) -> Tensor:
    """The members' softmax outputs on ``images``, ``[M, N, K]`` on the CPU (members in eval mode)."""
    parts = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        outputs = []
        for member in members:
            member.eval()
            device = next(member.parameters()).device
            outputs.append(torch.softmax(member(chunk.to(device)).float(), dim=1).cpu())
        parts.append(torch.stack(outputs))
    return torch.cat(parts, dim=1)


def member_spread(probabilities: Tensor) -> dict[str, float]:
    """How far apart M members' predictions ``[M, N, K]`` are (Pape et al. 2023, Sec. 4's diagnostics).

    - ``member_variance``: ``mean_{n,k} Var_m p_m(k | x_n)``, the population variance over
      members of each class probability, averaged over images and classes (0 when all
      members agree exactly; at most ``1/K`` for one-hot members split evenly over classes);
    - ``member_disagreement``: the share of images on which not all members predict the same label;
    - ``member_pairwise_disagreement``: the share of (image, member pair) whose labels differ.
    """
    if probabilities.dim() != 3:
        raise AttackError(f"member probabilities must be [members, images, classes], got {list(probabilities.shape)}")
    members = probabilities.shape[0]
    labels = probabilities.argmax(dim=2)  # [M, N]
    variance = probabilities.var(dim=0, unbiased=False).mean() if members > 1 else torch.zeros(())
    if members > 1:
        differ = (labels[:, None, :] != labels[None, :, :]).float()  # [M, M, N]
        pairwise = differ.sum() / (members * (members - 1) * labels.shape[1])
    else:
        pairwise = torch.zeros(())
    return {
        "member_variance": float(variance),
        "member_disagreement": float((labels != labels[:1]).any(dim=0).float().mean()),
        "member_pairwise_disagreement": float(pairwise),
    }


def spread_diagnostics(probabilities: Tensor, labels: Tensor | None, victim_labels: Tensor) -> dict[str, float]:
    """Combined vs single-member fidelity (and accuracy, with ``labels``) plus :func:`member_spread`.

    ``probabilities`` ``[M, N, K]`` are the members' outputs on N images, ``victim_labels``
    ``[N]`` the victim's labels for them, ``labels`` ``[N]`` the true ones (``None``: unknown,
    e.g. on the attacker's queries).

    - ``combined_fidelity`` / ``combined_accuracy``: of ``argmax mean_m p_m``;
    - ``member_fidelity_best`` / ``_mean`` and ``member_accuracy_best`` / ``_mean``;
    - ``fidelity_gain``: combined minus best single-member fidelity.
    """
    member_labels = probabilities.argmax(dim=2)  # [M, N]
    combined = probabilities.mean(dim=0).argmax(dim=1)
    fidelities = (member_labels == victim_labels).float().mean(dim=1)
    combined_fidelity = float((combined == victim_labels).float().mean())
    result = {
        "members": float(probabilities.shape[0]),
        "combined_fidelity": combined_fidelity,
        "member_fidelity_best": float(fidelities.max()),
        "member_fidelity_mean": float(fidelities.mean()),
        "fidelity_gain": combined_fidelity - float(fidelities.max()),
    }
    if labels is not None:
        accuracies = (member_labels == labels).float().mean(dim=1)
        result.update(combined_accuracy=float((combined == labels).float().mean()),
                      member_accuracy_best=float(accuracies.max()), member_accuracy_mean=float(accuracies.mean()))
    result.update(member_spread(probabilities))
    return result


def member_diagnostics(
    members: Sequence[nn.Module], images: Tensor, labels: Tensor, victim_labels: Tensor, batch_size: int = 2048
) -> dict[str, float]:
    """:func:`spread_diagnostics` of the members on ``images`` (the evaluation split)."""
    return spread_diagnostics(member_probabilities(members, images, batch_size), labels, victim_labels)
