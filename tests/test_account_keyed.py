"""The ``account_keyed`` step (B4B-style per-account answers): its properties on fixed tensors,
then through a real ``stealsim serve`` with a watermark secret."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from server_support import ServerProcess, admin, binary_request, decode_binary_response, new_key

from defense.policies import PolicyContext, parse_policy
from defense.steps.account_keyed import account_key, account_permute, destinations
from stealsim.checkpoint import load_checkpoint
from stealsim.data import load_dataset
from stealsim.errors import ConfigError

SECRET = b"account-keyed-test-secret"


def _softmax(seed: int, rows: int = 200, classes: int = 10) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(scale=2.0, size=(rows, classes))
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def _context(key_id: str, images: np.ndarray, secret: bytes | None = SECRET) -> PolicyContext:
    return PolicyContext(images=images, key_id=key_id, watermark_secret=secret,
                         defender_probabilities=lambda path, x: np.zeros((len(x), 10)))


def _ece(p: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Top-1 expected calibration error (Guo et al., 2017): |accuracy - confidence| over confidence bins."""
    confidence, correct = p.max(axis=1), (p.argmax(axis=1) == labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    for low, high in itertools.pairwise(edges):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(total)


def test_each_row_keeps_its_arg_max_and_top_probability_and_sums_to_one() -> None:
    p = _softmax(0)
    account = account_key(SECRET, "key_alice")
    served = account_permute(p, account)
    assert served.dtype == p.dtype and served.shape == p.shape
    np.testing.assert_array_equal(served.argmax(axis=1), p.argmax(axis=1))
    np.testing.assert_array_equal(served.max(axis=1), p.max(axis=1))
    np.testing.assert_allclose(served.sum(axis=1), 1.0, atol=1e-6)
    # The same values, in other places: each row is a permutation of its own.
    np.testing.assert_array_equal(np.sort(served, axis=1), np.sort(p, axis=1))
    assert (served != p).any(axis=1).mean() > 0.95  # nearly every row changes beyond its top class
    # The permutation of each top class fixes that class and permutes the others.
    for top in range(10):
        where = destinations(account, 10, top)
        assert where[top] == top and sorted(where.tolist()) == list(range(10))


def test_honest_accuracy_and_top1_calibration_are_unchanged(digits_checkpoint: Path) -> None:
    data = load_dataset("digits")
    model, _ = load_checkpoint(digits_checkpoint)
    with torch.no_grad():
        p = torch.softmax(model(data.x_test), dim=1).numpy()
    labels = data.y_test.numpy()
    served = parse_policy([{"name": "account_keyed"}]).apply(
        p, np.random.default_rng(0), _context("key_honest", data.x_test.numpy())).values
    assert not np.array_equal(served, p)
    assert (served.argmax(axis=1) == labels).mean() == (p.argmax(axis=1) == labels).mean()
    assert _ece(served, labels) == _ece(p, labels)
    np.testing.assert_allclose(served.sum(axis=1), 1.0, atol=1e-5)


def test_two_accounts_disagree_and_one_account_repeats_itself() -> None:
    p = _softmax(1)
    images = np.zeros((len(p), 1, 8, 8), np.float32)
    policy = parse_policy([{"name": "account_keyed"}])
    rng = np.random.default_rng(0)
    alice = policy.apply(p, rng, _context("key_alice", images)).values
    again = policy.apply(p, rng, _context("key_alice", images)).values
    bob = policy.apply(p, rng, _context("key_bob", images)).values
    np.testing.assert_array_equal(alice, again)
    assert (alice != bob).any(axis=1).mean() > 0.9
    np.testing.assert_array_equal(alice.argmax(axis=1), bob.argmax(axis=1))
    # A pooled thief averaging the two accounts no longer gets the victim's vector back.
    assert np.abs((alice + bob) / 2 - p).max() > 0.01
    # Another server secret, other permutations.
    other = policy.apply(p, rng, _context("key_alice", images, b"another-secret")).values
    assert (alice != other).any(axis=1).mean() > 0.9


def test_ties_at_the_top_and_tiny_class_counts_keep_the_arg_max() -> None:
    account = account_key(SECRET, "key_alice")
    tied = np.array([[0.1, 0.4, 0.4, 0.1], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]], np.float32)
    served = account_permute(tied, account)
    np.testing.assert_array_equal(served.argmax(axis=1), tied.argmax(axis=1))
    np.testing.assert_array_equal(served.max(axis=1), tied.max(axis=1))
    two = np.array([[0.3, 0.7]], np.float32)
    np.testing.assert_array_equal(account_permute(two, account), two)
    assert account_permute(np.zeros((0, 10), np.float32), account).shape == (0, 10)


def test_without_a_secret_the_step_refuses() -> None:
    policy = parse_policy([{"name": "account_keyed"}])
    assert policy.needs_watermark_secret and policy.needs_context
    with pytest.raises(ConfigError, match="watermark_secret"):
        policy.apply(_softmax(2), np.random.default_rng(0), _context("key_a", np.zeros((200, 1, 8, 8)), None))


# -- over HTTP -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_server(digits_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    logs = tmp_path_factory.mktemp("account-keyed-server")
    server = ServerProcess({"victim": digits_checkpoint, "keyed": digits_checkpoint},
                           args=["--watermark-secret", "http-secret",
                                 "--policy", 'keyed=[{"name": "account_keyed"}]'],
                           log_path=logs / "server.log")
    yield server
    server.stop()


def _answers(server: ServerProcess, key: str, model: str, images: np.ndarray) -> np.ndarray:
    content, headers = binary_request(images)
    response = httpx.post(f"{server.url}/v2/models/{model}/infer", content=content,
                          headers={"X-API-Key": key, **headers}, timeout=60)
    assert response.status_code == 200, response.text
    return decode_binary_response(response)[1]


def test_account_keyed_answers_over_http(keyed_server: ServerProcess) -> None:
    images = load_dataset("digits").x_test.numpy()[:64]
    with httpx.Client(base_url=keyed_server.url, timeout=30) as client:
        alice, bob = new_key(client, budget=1000), new_key(client, budget=1000)
    truth = _answers(keyed_server, alice, "victim", images)  # the undefended model
    first = _answers(keyed_server, alice, "keyed", images)
    np.testing.assert_array_equal(first, _answers(keyed_server, alice, "keyed", images))
    other = _answers(keyed_server, bob, "keyed", images)
    for served in (first, other):
        np.testing.assert_array_equal(served.argmax(axis=1), truth.argmax(axis=1))
        np.testing.assert_array_equal(served.max(axis=1), truth.max(axis=1))
        np.testing.assert_allclose(served.sum(axis=1), 1.0, atol=1e-5)
    # Confident rows have near-zero other classes: compare the rows where they carry mass.
    informative = np.sort(truth, axis=1)[:, -2] > 1e-4
    assert informative.sum() >= 10
    assert (first[informative] != other[informative]).any(axis=1).all()
    assert (first[informative] != truth[informative]).any(axis=1).all()


def test_a_server_without_a_secret_refuses_account_keyed_keys(client: httpx.Client) -> None:
    response = client.post("/v1/admin/keys", headers=admin(),
                           json={"budget": 10, "policy": [{"name": "account_keyed"}]})
    assert response.status_code == 400 and "watermark_secret" in response.json()["error"]
