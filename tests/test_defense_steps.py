"""The contract every output-policy step meets, checked over the registry (defense.steps.STEPS).

A new step that is not registered, does not validate from its name (plus its
declared example), does not round-trip through a policy, breaks the shape or row
sums it claims to keep, or is a detector without a usable input kind fails here.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pytest

import defense.steps
from defense.policies import PolicyContext, parse_policy
from defense.steps import (
    STEP_LIST,
    STEPS,
    DetectorInput,
    DetectorInputKind,
    DetectorStep,
    PolicyStep,
    step_class,
)
from stealsim.errors import ConfigError

NAMES = list(STEPS)
N, K = 24, 10


def probabilities(seed: int = 0) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(scale=3.0, size=(N, K))
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


IMAGES = np.random.default_rng(1).random((N, 1, 8, 8)).astype(np.float32)


def defender_probabilities(path: Path, images: np.ndarray) -> np.ndarray:
    """A stand-in for a defender checkpoint's softmax (no checkpoint is loaded)."""
    return probabilities(seed=len(str(path)))[: len(images)].astype(np.float64)


CONTEXT = PolicyContext(images=IMAGES, key_id="key_contract", watermark_secret=b"contract",
                        defender_probabilities=defender_probabilities)


def observed(kind: str) -> np.ndarray:
    """Queries as a detector of input ``kind`` sees them."""
    rng = np.random.default_rng(2)
    if kind == "images":
        return IMAGES
    if kind == "probabilities":
        return probabilities()
    if kind == "pixels":
        flat = IMAGES.reshape(N, -1)
        return flat / np.float32(np.sqrt(flat.shape[1]))
    if kind == "features":
        features = rng.normal(size=(N, 16)).astype(np.float32)
        return features / np.linalg.norm(features, axis=1, keepdims=True)
    assert kind == "mahalanobis"
    return rng.chisquare(3, size=N)


def spec(name: str) -> dict[str, Any]:
    return {"name": name, **STEPS[name].example}


def example(name: str) -> PolicyStep:
    return STEPS[name].model_validate(spec(name))


# -- the registry -------------------------------------------------------------------------------


def test_registry_names_are_the_unions_tags_and_the_names_errors_offer() -> None:
    mapping = STEP_LIST.json_schema()["items"]["discriminator"]["mapping"]
    assert set(mapping) == set(STEPS)
    assert all(cls.step_name() == name for name, cls in STEPS.items())
    with pytest.raises(ConfigError, match="invalid output policy") as refused:
        parse_policy([{"name": "no_such_step"}])
    assert f"(steps: {sorted(STEPS)})" in str(refused.value)
    assert step_class("top_k") is STEPS["top_k"]
    with pytest.raises(ConfigError, match="unknown policy step 'blur'"):
        step_class("blur")


def test_every_step_defined_in_the_package_is_registered() -> None:
    defined: set[type[PolicyStep]] = set()
    for module_info in pkgutil.iter_modules(defense.steps.__path__):
        module = importlib.import_module(f"defense.steps.{module_info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if not issubclass(cls, PolicyStep) or cls.__module__ != module.__name__:
                continue
            if get_args(cls.model_fields["name"].annotation):  # concrete: its name is a Literal
                defined.add(cls)
    assert defined == set(STEPS.values())


def test_detector_input_checks_its_files() -> None:
    assert DetectorInput("features", encoder=Path("enc")).encoder == Path("enc")
    with pytest.raises(ValueError, match="an encoder goes with"):
        DetectorInput("features")
    with pytest.raises(ValueError, match="an encoder goes with"):
        DetectorInput("images", encoder=Path("enc"))
    with pytest.raises(ValueError, match="statistics go with"):
        DetectorInput("mahalanobis", encoder=Path("enc"))
    with pytest.raises(ValueError, match="unknown detector input"):
        DetectorInput("logits")  # type: ignore[arg-type]


# -- every step -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_step_validates_from_its_name_and_declared_example(name: str) -> None:
    cls = STEPS[name]
    step = example(name)
    assert step.name == name and isinstance(step, cls)
    # The example is minimal: each parameter it names is needed.
    for key in cls.example:
        with pytest.raises(ConfigError, match="invalid output policy"):
            parse_policy([{k: v for k, v in spec(name).items() if k != key}])
    assert all(isinstance(path, Path) for path in step.checkpoints())


@pytest.mark.parametrize("name", NAMES)
def test_step_round_trips_through_a_policy(name: str) -> None:
    policy = parse_policy([spec(name)])
    assert policy.steps == (example(name),)
    described = policy.describe()
    assert described[0]["name"] == name
    again = parse_policy(described)
    assert again.steps == policy.steps and again.describe() == described


@pytest.mark.parametrize("name", NAMES)
def test_step_serves_probabilities_as_it_claims(name: str) -> None:
    step = example(name)
    p = probabilities()
    before = p.copy()
    out, _ = step.serve(p, np.random.default_rng(0), CONTEXT)
    np.testing.assert_array_equal(p, before)  # never modifies its input
    assert out.shape == p.shape
    if not step.transforms:
        np.testing.assert_array_equal(out, p)
    if step.keeps_row_sums:
        assert (out >= 0).all()
        np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)
    answer = parse_policy([spec(name)]).apply(p, np.random.default_rng(0), CONTEXT)
    assert answer.kind == step.output_kind
    assert answer.values.shape == ((N, K) if answer.kind == "probabilities" else (N,))


@pytest.mark.parametrize("name", NAMES)
def test_step_needs_the_context_exactly_when_it_says(name: str) -> None:
    step = example(name)
    assert parse_policy([spec(name)]).needs_context == step.needs_context
    if step.needs_context:
        with pytest.raises(ConfigError, match="needs the service's context"):
            step.serve(probabilities(), np.random.default_rng(0), None)
        with pytest.raises(ConfigError, match="needs the service's context"):
            parse_policy([spec(name)]).apply(probabilities(), np.random.default_rng(0))
    else:
        out, marks = step.serve(probabilities(), np.random.default_rng(0), None)
        assert out.shape == (N, K) and marks is None


@pytest.mark.parametrize("name", NAMES)
def test_step_follows_the_policy_rules_it_declares(name: str) -> None:
    cls = STEPS[name]
    after_label = [{"name": "label_only"}, spec(name)]
    if cls.may_follow_label_only:
        assert parse_policy(after_label).output_kind == "label"
    else:
        with pytest.raises(ConfigError, match=f"policy step '{name}' cannot follow 'label_only'"):
            parse_policy(after_label)
    twice = [spec(name), spec(name)]
    if cls.at_most_one:
        with pytest.raises(ConfigError, match=f"at most one '{name}' step"):
            parse_policy(twice)
    else:
        assert len(parse_policy(twice).steps) == 2


@pytest.mark.parametrize("name", NAMES)
def test_detectors_expose_their_input_and_keep_their_state(name: str) -> None:
    step = example(name)
    need = step.observes()
    policy = parse_policy([spec(name)])
    if not isinstance(step, DetectorStep):
        assert need is None and policy.detectors == []
        return
    assert policy.detectors == [step]
    assert need is not None and need.kind in get_args(DetectorInputKind)
    assert not step.transforms and step.may_follow_label_only and isinstance(step.block, bool)
    detector = step.new_detector()
    assert not detector.flagged
    labels = probabilities().argmax(axis=1)
    detector.observe(observed(need.kind), labels)
    restored = step.load_detector(detector.to_bytes())
    assert restored.flagged == detector.flagged and restored.to_bytes() == detector.to_bytes()
