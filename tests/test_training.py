"""The training loop: a few-step smoke run, augmentation, device and config checks."""

from __future__ import annotations

import pytest
import torch

from stealsim.data import load_dataset
from stealsim.errors import ConfigError
from stealsim.training import TrainConfig, accuracy, random_shift, resolve_device, train_classifier


def test_a_short_run_learns_digits_well_above_chance() -> None:
    data = load_dataset("digits")
    config = TrainConfig(epochs=4, batch_size=64, seed=0)
    model, meta = train_classifier(data, "small-cnn", config, architecture_kwargs={"width": 8}, show_progress=False)
    assert meta.metrics["test_accuracy"] > 0.5  # chance is 0.1
    assert meta.metrics["test_accuracy"] == pytest.approx(accuracy(model, data.x_test, data.y_test))
    assert meta.training["epochs"] == 4
    assert meta.input_shape == (1, 8, 8)


def test_training_is_deterministic_under_a_seed() -> None:
    data = load_dataset("digits")
    config = TrainConfig(epochs=1, seed=3)
    first, _ = train_classifier(data, "small-cnn", config, architecture_kwargs={"width": 4}, show_progress=False)
    second, _ = train_classifier(data, "small-cnn", config, architecture_kwargs={"width": 4}, show_progress=False)
    images = data.x_test[:8]
    with torch.no_grad():
        assert torch.equal(first(images), second(images))


def test_random_shift_moves_content_without_changing_shape() -> None:
    images = torch.zeros(16, 1, 8, 8)
    images[:, :, 4, 4] = 1.0
    shifted = random_shift(images, 1, torch.Generator().manual_seed(0))
    assert shifted.shape == images.shape
    assert torch.all(shifted.sum(dim=(1, 2, 3)) == 1.0)  # the dot moved, never lost
    rows, cols = shifted[:, 0].nonzero(as_tuple=True)[1:]
    assert set(rows.tolist()) <= {3, 4, 5} and set(cols.tolist()) <= {3, 4, 5}
    assert random_shift(images, 0) is images


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="invalid training settings"):
        TrainConfig(epochs=0)
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


def test_warm_started_nasty_teacher_begins_from_the_adversary() -> None:
    from defense.nasty_teacher import NastySettings, train_nasty_teacher

    data = load_dataset("digits")
    adversary, meta = train_classifier(
        data, "small-cnn", TrainConfig(epochs=1), architecture_kwargs={"width": 4}, show_progress=False
    )
    # No KL weight and a vanishing learning rate: the teacher must stay the adversary.
    settings = NastySettings(tau=4.0, omega=0.0, warm_start=True, epochs=1, learning_rate=1e-9)
    teacher, teacher_meta = train_nasty_teacher(data, None, TrainConfig(), adversary, meta, settings, show_progress=False)
    adversary_state, teacher_state = adversary.net.state_dict(), teacher.net.state_dict()
    weights = [name for name in adversary_state if name.endswith("weight")]
    assert weights and all(torch.allclose(teacher_state[n], adversary_state[n], atol=1e-6) for n in weights)
    assert teacher_meta.architecture_kwargs == {"width": 4}
    assert teacher_meta.training["nasty"]["warm_start"] is True
    assert teacher_meta.training["epochs"] == 1

    with pytest.raises(ConfigError, match="uses the adversary's architecture"):
        train_nasty_teacher(data, "lenet5", TrainConfig(), adversary, meta, settings, show_progress=False)
    with pytest.raises(ConfigError, match="--tau must be > 0"):
        NastySettings(tau=0.0, omega=0.1)
    with pytest.raises(ConfigError, match="KD temperature must be > 0"):
        NastySettings(tau=4.0, omega=0.1, kd_temperature=0.0)
    with pytest.raises(ConfigError, match="KD weight alpha must be in"):
        NastySettings(tau=4.0, omega=0.1, kd_alpha=1.5)
    assert NastySettings(tau=4.0, omega=0.1).student_alpha == 0.9
    with pytest.raises(ConfigError, match="students' epochs must be >= 1"):
        NastySettings(tau=4.0, omega=0.1, student_epochs=0)
    assert NastySettings(tau=4.0, omega=0.1, student_epochs=7).student_config(TrainConfig(epochs=3)).epochs == 7
    assert NastySettings(tau=4.0, omega=0.1).student_config(TrainConfig(epochs=3)).epochs == 3
