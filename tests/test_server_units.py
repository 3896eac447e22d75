"""Unit tests of the victim service's parts: policies, PRADA, batcher, store, codec, settings."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from defense.policies import parse_policy
from defense.prada import PradaDetector
from defense.steps import GaussianNoise, ReverseSigmoid, Round, TopK
from stealsim.checkpoint import load_checkpoint
from stealsim.data import load_dataset
from stealsim.errors import (
    BudgetExceededError,
    ConfigError,
    InvalidRequestError,
    ModelNotFoundError,
    PayloadTooLargeError,
    UnavailableError,
)
from victim_server.batching import LocalBatcher
from victim_server.protocol import Output, decode_infer_request, encode_infer_response
from victim_server.settings import load_settings
from victim_server.store import KeyRecord, MemoryStateStore

RNG = np.random.default_rng(0)


def random_probabilities(n: int = 32, k: int = 10) -> np.ndarray:
    logits = RNG.normal(scale=3.0, size=(n, k))
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


# --- policies ---------------------------------------------------------------------------


def test_top_k_keeps_the_k_largest_and_renormalises() -> None:
    p = random_probabilities()
    out = TopK(k=3).apply(p, RNG)
    assert ((out > 0).sum(axis=1) == 3).all()
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-6)
    kept = np.sort(np.argsort(-p, axis=1)[:, :3], axis=1)
    np.testing.assert_array_equal(np.sort(np.argsort(-out, axis=1)[:, :3], axis=1), kept)
    np.testing.assert_array_equal(TopK(k=10).apply(p, RNG), p)


def test_round_and_label_only() -> None:
    p = random_probabilities()
    np.testing.assert_array_equal(Round(decimals=2).apply(p, RNG), np.round(p, 2))
    answer = parse_policy([{"name": "label_only"}]).apply(p, RNG)
    assert answer.kind == "label" and answer.values.dtype == np.int64
    np.testing.assert_array_equal(answer.values, p.argmax(axis=1))


def test_gaussian_noise_is_a_renormalised_perturbation() -> None:
    p = random_probabilities()
    out = GaussianNoise(std=0.05).apply(p, np.random.default_rng(3))
    assert (out >= 0).all() and not np.allclose(out, p, atol=1e-3)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(GaussianNoise(std=0.0).apply(p, RNG), p, atol=1e-6)


def test_reverse_sigmoid_follows_lee_et_al_equation_3() -> None:
    p = np.array([[0.7, 0.2, 0.1]], dtype=np.float64)
    beta, gamma = 0.8, 0.5
    r = beta * (1 / (1 + np.exp(-gamma * np.log(p / (1 - p)))) - 0.5)
    expected = np.clip(p - r, 0, 1)
    expected /= expected.sum()
    np.testing.assert_allclose(ReverseSigmoid(beta=beta, gamma=gamma).apply(p, RNG), expected, rtol=1e-9)
    # beta = 0: no perturbation.
    q = random_probabilities()
    np.testing.assert_allclose(ReverseSigmoid(beta=0.0).apply(q, RNG), q, atol=1e-6)


def test_policies_compose_in_order_and_never_modify_their_input() -> None:
    p = random_probabilities()
    before = p.copy()
    policy = parse_policy([{"name": "top_k", "k": 2}, {"name": "round", "decimals": 1}])
    answer = policy.apply(p, RNG)
    np.testing.assert_array_equal(p, before)
    np.testing.assert_array_equal(answer.values, np.round(TopK(k=2).apply(p, RNG), 1))
    assert policy.describe() == [{"name": "top_k", "k": 2}, {"name": "round", "decimals": 1}]
    assert parse_policy(None).apply(p, RNG).values.tolist() == p.tolist()


@pytest.mark.parametrize("spec", [
    [{"name": "blur"}],
    [{"name": "top_k", "k": 0}],
    [{"name": "round", "decimals": 2, "extra": 1}],
    [{"name": "label_only"}, {"name": "round", "decimals": 2}],
    [{"name": "prada"}, {"name": "prada"}],
])
def test_invalid_policies_are_refused(spec: list[dict[str, object]]) -> None:
    with pytest.raises(ConfigError):
        parse_policy(spec)


# --- PRADA ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_model(digits_checkpoint: Path) -> torch.nn.Module:
    model, _ = load_checkpoint(digits_checkpoint)
    return model


def predict(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(images)).argmax(dim=1).numpy()


def test_prada_does_not_flag_natural_digits(digits_model: torch.nn.Module) -> None:
    images = load_dataset("digits").x_test.numpy()
    detector = PradaDetector(delta=0.95, min_queries=100)
    for start in range(0, len(images), 16):
        verdict = detector.observe(images[start : start + 16], predict(digits_model, images[start : start + 16]))
    assert not verdict.flagged
    assert verdict.statistic is not None and verdict.statistic >= 0.95
    assert verdict.distances == len(images) - len(set(predict(digits_model, images).tolist()))


def test_prada_flags_synthetic_queries_around_few_seeds(digits_model: torch.nn.Module) -> None:
    seeds = load_dataset("digits").x_test.numpy()[:10]
    rng = np.random.default_rng(0)
    detector = PradaDetector(delta=0.95, min_queries=100)
    pool = seeds
    detector.observe(seeds, predict(digits_model, seeds))
    for _ in range(5):
        new = np.clip(pool + 0.1 * np.sign(rng.normal(size=pool.shape)), 0, 1).astype(np.float32)
        verdict = detector.observe(new, predict(digits_model, new))
        pool = np.concatenate([pool, new])
    assert verdict.flagged and verdict.statistic is not None and verdict.statistic < 0.95


def test_prada_waits_for_min_queries() -> None:
    detector = PradaDetector(delta=0.95, min_queries=50)
    images = np.zeros((20, 4), dtype=np.float32)  # identical queries: maximally suspicious
    verdict = detector.observe(images, np.zeros(20, dtype=np.int64))
    assert not verdict.flagged and verdict.statistic is None and verdict.distances == 19


# --- batcher ----------------------------------------------------------------------------------


class CountingModel:
    """A stand-in for predict_batch that records the batch sizes it was called with."""

    def __init__(self, fail: bool = False, drop_row: bool = False) -> None:
        self.calls: list[int] = []
        self.fail = fail
        self.drop_row = drop_row

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.calls.append(len(images))
        if self.fail:
            raise RuntimeError("boom")
        out = images.reshape(len(images), -1).sum(axis=1, keepdims=True)
        return out[:-1] if self.drop_row else out


def test_batcher_coalesces_concurrent_requests_and_splits_results() -> None:
    model = CountingModel()

    async def run() -> list[np.ndarray]:
        batcher = LocalBatcher({"m": model}, max_batch_size=64, max_wait_ms=200)
        await batcher.start()
        requests = [np.full((i % 3 + 1, 2), float(i), dtype=np.float32) for i in range(20)]
        results = await asyncio.gather(*(batcher.submit("m", r) for r in requests))
        await batcher.stop()
        for request, result in zip(requests, results, strict=True):
            np.testing.assert_array_equal(result, request.sum(axis=1, keepdims=True))
        return results

    asyncio.run(run())
    assert sum(model.calls) == sum(i % 3 + 1 for i in range(20))
    assert len(model.calls) < 20  # coalesced: fewer forwards than requests
    assert max(model.calls) <= 64


def test_batcher_respects_max_batch_size_and_runs_big_requests_alone() -> None:
    model = CountingModel()

    async def run() -> None:
        batcher = LocalBatcher({"m": model}, max_batch_size=4, max_wait_ms=50)
        await batcher.start()
        small = [np.ones((1, 2), np.float32) for _ in range(10)]
        big = np.ones((9, 2), np.float32)
        results = await asyncio.gather(*(batcher.submit("m", r) for r in [*small, big]))
        assert [len(r) for r in results] == [1] * 10 + [9]
        await batcher.stop()

    asyncio.run(run())
    assert 9 in model.calls
    assert all(size <= 4 for size in model.calls if size != 9)


@pytest.mark.parametrize("model", [CountingModel(fail=True), CountingModel(drop_row=True)], ids=["raises", "short"])
def test_a_failed_batch_fails_every_caller(model: CountingModel) -> None:
    async def run() -> list[object]:
        batcher = LocalBatcher({"m": model}, max_batch_size=8, max_wait_ms=100)
        await batcher.start()
        outcomes = await asyncio.gather(
            *(batcher.submit("m", np.ones((1, 2), np.float32)) for _ in range(4)), return_exceptions=True
        )
        await batcher.stop()
        return outcomes

    outcomes = asyncio.run(run())
    assert all(isinstance(outcome, UnavailableError) for outcome in outcomes)


def test_cancelled_callers_are_skipped_and_stop_drains() -> None:
    model = CountingModel()

    async def run() -> None:
        batcher = LocalBatcher({"m": model}, max_batch_size=64, max_wait_ms=300)
        await batcher.start()
        keep = asyncio.create_task(batcher.submit("m", np.ones((2, 2), np.float32)))
        gone = asyncio.create_task(batcher.submit("m", np.ones((5, 2), np.float32)))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.sleep(0)
        assert batcher.queue_depth("m") == 7
        await batcher.stop()  # drains: `keep` is answered before stop returns
        assert keep.done() and len(keep.result()) == 2
        with pytest.raises(ModelNotFoundError):
            await batcher.submit("other", np.ones((1, 2), np.float32))

    asyncio.run(run())
    assert model.calls == [2]


@pytest.mark.parametrize("wait_when_busy", [False, True], ids=["idle-wait-only", "wait-always"])
def test_the_batcher_waits_for_company_only_when_the_model_was_idle(wait_when_busy: bool) -> None:
    gate = threading.Event()
    calls: list[int] = []

    def blocking(images: np.ndarray) -> np.ndarray:
        calls.append(len(images))
        gate.wait(30)
        return images.reshape(len(images), -1).sum(axis=1, keepdims=True)

    async def run() -> None:
        batcher = LocalBatcher({"m": blocking}, max_batch_size=8, max_wait_ms=2000,
                               wait_when_busy=wait_when_busy)
        await batcher.start()
        # A full batch runs at once and holds the model; one request queues behind it.
        first = [asyncio.create_task(batcher.submit("m", np.ones((n, 2), np.float32))) for n in (3, 5)]
        while not calls:
            await asyncio.sleep(0.01)
        queued = asyncio.create_task(batcher.submit("m", np.ones((1, 2), np.float32)))
        await asyncio.sleep(0.05)
        gate.set()
        # A request that arrives shortly after the model freed up: it joins the queued one only
        # if the batcher waits max_wait_ms (2 s) although requests were waiting for the model.
        await asyncio.sleep(0.2)
        late = asyncio.create_task(batcher.submit("m", np.ones((2, 2), np.float32)))
        await asyncio.gather(*first, queued, late)
        await batcher.stop()

    asyncio.run(run())
    assert calls == ([8, 3] if wait_when_busy else [8, 1, 2])


# --- store --------------------------------------------------------------------------------------


def test_reserve_is_atomic_under_concurrency() -> None:
    async def run() -> tuple[int, int]:
        store = MemoryStateStore()
        await store.create_key(KeyRecord("k1", "", budget=50), "secret")
        sizes = [int(s) for s in np.random.default_rng(0).integers(1, 7, size=200)]

        async def attempt(size: int) -> int:
            try:
                await store.reserve("k1", size)
            except BudgetExceededError as exc:
                assert 0 <= int(exc.details["remaining"]) < size  # type: ignore[call-overload]
                return 0
            await asyncio.sleep(0)
            return size

        granted = sum(await asyncio.gather(*(attempt(s) for s in sizes)))
        return granted, (await store.get("k1")).used

    granted, used = asyncio.run(run())
    assert granted == used <= 50
    assert granted >= 45  # refused whole, never half-served, yet the budget is nearly used


def test_refund_revoke_and_authenticate() -> None:
    async def run() -> None:
        store = MemoryStateStore()
        await store.create_key(KeyRecord("k1", "a", budget=10), "s1")
        assert (await store.authenticate("s1")) is not None
        assert await store.reserve("k1", 6) == 4
        await store.refund("k1", 6)
        assert (await store.get("k1")).used == 0
        await store.revoke("k1")
        assert await store.authenticate("s1") is None
        record = await store.flag("k1", "prada", block=True)
        assert record.flags == ("prada",) and record.blocked

    asyncio.run(run())


# --- codec ----------------------------------------------------------------------------------------


def test_binary_decoding_is_zero_copy_and_round_trips() -> None:
    images = RNG.random((3, 1, 4, 4), dtype=np.float32)
    raw = images.astype("<f4").tobytes()
    header = json.dumps({"inputs": [{"name": "input", "shape": [3, 1, 4, 4], "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "parameters": {"binary_data_output": True}}).encode()
    decoded = decode_infer_request(header + raw, len(header), (1, 4, 4), 10)
    np.testing.assert_array_equal(decoded.images, images)
    assert decoded.binary_output and not decoded.images.flags.owndata
    body, headers = encode_infer_response("m", "id", [Output("probabilities", "FP32", images.reshape(3, 16))],
                                          True, {"remaining": 1})
    length = int(headers["Inference-Header-Content-Length"])
    assert json.loads(body[:length])["outputs"][0]["parameters"]["binary_data_size"] == 3 * 16 * 4
    np.testing.assert_array_equal(np.frombuffer(body[length:], "<f4").reshape(3, 16), images.reshape(3, 16))


def test_decoding_refuses_too_many_images_before_reading_data() -> None:
    body = json.dumps({"inputs": [{"name": "input", "shape": [11, 1, 4, 4], "datatype": "FP32", "data": []}]})
    with pytest.raises(PayloadTooLargeError):
        decode_infer_request(body.encode(), None, (1, 4, 4), 10)
    with pytest.raises(InvalidRequestError, match="binary_data_size"):
        bad = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 4, 4], "datatype": "FP32",
                                      "parameters": {"binary_data_size": 64}}]})
        decode_infer_request(bad.encode(), None, (1, 4, 4), 10)


# --- settings ---------------------------------------------------------------------------------------


def test_settings_precedence_flags_over_env_over_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text(
        "models:\n  victim: {path: /ckpt, policy: [{name: top_k, k: 3}]}\n"
        "port: 9001\nmax_batch_size: 8\nmax_wait_ms: 7\nadmin_key: from-yaml\n"
    )
    monkeypatch.setenv("STEALSIM_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("STEALSIM_ADMIN_KEY", "from-env")
    settings = load_settings(config, {"max_batch_size": 32, "port": None})
    assert settings.port == 9001 and settings.max_wait_ms == 7
    assert settings.max_batch_size == 32
    assert settings.admin_key is not None and settings.admin_key.get_secret_value() == "from-env"
    assert settings.models["victim"].path == Path("/ckpt")
    assert settings.models["victim"].policy == [{"name": "top_k", "k": 3}]
    assert load_settings(config).max_batch_size == 16
    with pytest.raises(ConfigError):
        load_settings(config, {"max_batch_size": 0})
    with pytest.raises(ConfigError):
        load_settings(tmp_path / "missing.yaml")


@pytest.mark.parametrize("budget", ["2**53", "true", "'100'"])
def test_settings_keys_take_exact_integer_budgets_only(tmp_path: Path, budget: str) -> None:
    config = tmp_path / "serve.yaml"
    value = str(2**53) if budget == "2**53" else budget  # one past what every store holds exactly
    config.write_text(f"models:\n  victim: {{path: /ckpt}}\napi_keys:\n  - {{api_key: sk-x, budget: {value}}}\n")
    with pytest.raises(ConfigError, match="budget"):
        load_settings(config)
    config.write_text(f"models:\n  victim: {{path: /ckpt}}\napi_keys:\n  - {{api_key: sk-x, budget: {2**53 - 1}}}\n")
    assert load_settings(config).api_keys[0].budget == 2**53 - 1


# --- refunds (service level: the batcher and store are real, the model fails) ---------------


def make_service(predict: object, timeout_s: float = 30.0) -> tuple[object, object]:
    from victim_server.audit import JsonlAuditLog
    from victim_server.metrics import ServerMetrics
    from victim_server.ratelimit import RateLimiter
    from victim_server.service import VictimService
    from victim_server.settings import ServerSettings

    class Runner:
        input_shape = (1, 2, 2)
        num_classes = 3

    metrics = ServerMetrics()
    batcher = LocalBatcher({"m": predict}, max_batch_size=8, max_wait_ms=0)  # type: ignore[dict-item]
    service = VictimService(
        ServerSettings(inference_timeout_s=timeout_s), {"m": Runner()},  # type: ignore[dict-item]
        batcher, MemoryStateStore(), RateLimiter(), JsonlAuditLog(), metrics,
    )
    return service, batcher


@pytest.mark.parametrize("failure", ["raises", "times out"])
def test_images_lost_to_a_failed_inference_are_refunded(failure: str) -> None:
    import time as clock

    def predict(images: np.ndarray) -> np.ndarray:
        if failure == "raises":
            raise RuntimeError("CUDA out of memory")
        clock.sleep(0.5)
        return np.full((len(images), 3), 1 / 3, dtype=np.float32)

    async def run() -> tuple[int, bytes]:
        service, batcher = make_service(predict, timeout_s=0.05)
        await batcher.start()  # type: ignore[attr-defined]
        _, key = await service.create_key(10)  # type: ignore[attr-defined]
        with pytest.raises(UnavailableError):
            await service.infer(key, "m", np.zeros((4, 1, 2, 2), np.float32))  # type: ignore[attr-defined]
        await batcher.stop()  # type: ignore[attr-defined]
        record = await service.store.get(key.key_id)  # type: ignore[attr-defined]
        return record.used, await service.audit.export()  # type: ignore[attr-defined]

    used, audit = asyncio.run(run())
    assert used == 0 and audit == b""


# --- runner -------------------------------------------------------------------------------------


def test_the_torchscript_runner_answers_as_eager(digits_checkpoint: Path) -> None:
    from victim_server.runner import load_runners

    graph = load_runners({"m": digits_checkpoint}, torch.device("cpu"), "torchscript")["m"]
    eager = load_runners({"m": digits_checkpoint}, torch.device("cpu"), "eager")["m"]
    assert graph.graph is not None and eager.graph is None
    images = np.random.default_rng(3).random((37, *graph.input_shape), dtype=np.float32)
    np.testing.assert_allclose(graph.predict_batch(images), eager.predict_batch(images), atol=1e-5)
    one = images[:1]
    np.testing.assert_allclose(graph.predict_batch(one), eager.predict_batch(one), atol=1e-5)
