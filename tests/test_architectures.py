"""Architecture registry: output shapes, generator range, clear errors."""

from __future__ import annotations

import pytest
import torch

from stealsim.architectures import (
    CLASSIFIERS,
    PixelClassifier,
    build_classifier,
    build_generator,
    default_architecture,
    default_student_architecture,
)
from stealsim.errors import ArchitectureError

SHAPES = [(1, 8), (1, 28), (3, 32)]


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
@pytest.mark.parametrize(("channels", "size"), SHAPES)
def test_every_classifier_gives_one_logit_per_class(name: str, channels: int, size: int) -> None:
    kwargs = {"width": 8} if name.startswith("resnet") else {}
    net = build_classifier(name, in_channels=channels, image_size=size, num_classes=7, **kwargs)
    logits = net(torch.rand(3, channels, size, size))
    assert logits.shape == (3, 7)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(("channels", "size"), SHAPES)
def test_generator_makes_images_in_unit_range(channels: int, size: int) -> None:
    generator = build_generator(latent_dim=16, image_size=size, channels=channels, width=8)
    images = generator(generator.sample_latent(5))
    assert images.shape == (5, channels, size, size)
    assert images.min() >= 0.0 and images.max() <= 1.0


def test_generator_rejects_sizes_not_divisible_by_four() -> None:
    with pytest.raises(ArchitectureError, match="multiple of 4"):
        build_generator(image_size=30, channels=1)


def test_unknown_architecture_names_the_choices() -> None:
    with pytest.raises(ArchitectureError, match=r"unknown architecture 'vgg'.*lenet5"):
        build_classifier("vgg", in_channels=1, image_size=28, num_classes=10)


def test_bad_keyword_argument_is_an_architecture_error() -> None:
    with pytest.raises(ArchitectureError, match="bad architecture arguments"):
        build_classifier("lenet5", in_channels=1, image_size=28, num_classes=10, depth=3)


def test_too_small_input_is_refused() -> None:
    with pytest.raises(ArchitectureError, match="unsupported input"):
        build_classifier("small-cnn", in_channels=1, image_size=4, num_classes=10)


def test_pixel_classifier_normalises_inside() -> None:
    net = torch.nn.Flatten()
    model = PixelClassifier(net, mean=[0.5], std=[0.25])
    pixels = torch.tensor([[[[0.5, 1.0]]]])
    assert torch.allclose(model(pixels), torch.tensor([[0.0, 2.0]]))


def test_default_architecture_fits_the_input() -> None:
    assert default_architecture(1, 8) == "small-cnn"
    assert default_architecture(1, 28) == "small-cnn"
    assert default_architecture(3, 32) == "resnet18"
    assert default_student_architecture(1, 28) == "lenet5"
    assert default_student_architecture(3, 32) == "small-cnn"


def test_pool_first_small_cnn_computes_the_same_function_when_scales_are_non_negative() -> None:
    """Max-pooling commutes with a per-channel non-decreasing map: with batch norms in eval mode
    and non-negative scales, conv-pool-BN-ReLU equals conv-BN-ReLU-pool on the same weights."""
    torch.manual_seed(0)
    usual = build_classifier("small-cnn", in_channels=1, image_size=28, num_classes=10, width=8)
    first = build_classifier("small-cnn", in_channels=1, image_size=28, num_classes=10, width=8, pool_first=True)
    for module in usual.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.uniform_(0.1, 2.0)
            module.bias.data.normal_()
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    # The same parameters, copied module by module (the layers' indices differ).
    weighted = (torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.Linear)
    pairs = zip([m for m in usual.modules() if isinstance(m, weighted)],
                [m for m in first.modules() if isinstance(m, weighted)], strict=True)
    for source, target in pairs:
        target.load_state_dict(source.state_dict())
    usual.eval()
    first.eval()
    images = torch.rand(16, 1, 28, 28)
    assert torch.allclose(usual(images), first(images), atol=1e-5)
    kinds = [type(m).__name__ for m in first.features][:4]
    assert kinds == ["Conv2d", "MaxPool2d", "BatchNorm2d", "ReLU"]
