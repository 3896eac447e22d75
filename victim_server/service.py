"""The victim service's logic, behind the routes: models, keys, metering, policies, audit.

Routes call one method each; everything that can be refused raises a
:class:`~stealsim.errors.ServiceError` subclass, which the app maps to a status.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from defense.policies import OutputPolicy, PolicyAnswer, PolicyContext, parse_policy
from defense.steps import DetectorInput, PooledDetectorStep
from defense.watermark import WatermarkRecord
from stealsim import __version__
from stealsim.errors import (
    ConfigError,
    ForbiddenError,
    InvalidRequestError,
    KeyNotFoundError,
    ModelNotFoundError,
    ServiceError,
    UnavailableError,
)
from victim_server.audit import AuditLog, AuditRecord, input_digest
from victim_server.batching import Batcher
from victim_server.defender_models import DefenderModels
from victim_server.detector_state import DetectorStates, MemoryDetectorStates
from victim_server.metrics import ServerMetrics
from victim_server.protocol import INPUT_NAME
from victim_server.ratelimit import AuthFailureThrottle, RateLimiter, parse_rate
from victim_server.runner import ModelRunner
from victim_server.settings import ServerSettings
from victim_server.store import KeyRecord, StateStore, new_secret
from victim_server.watermark_ledger import MemoryWatermarkLedger, WatermarkLedger

__all__ = ["InferenceResult", "VictimService", "printable"]

logger = logging.getLogger(__name__)

EXTENSIONS = ["binary_tensor_data", "stealsim_metering", "stealsim_output_policies"]


def _pixel_encoding(images: np.ndarray) -> np.ndarray:
    """Images flattened and scaled by ``1/sqrt(C*H*W)``: Euclidean distances become RMS pixel differences."""
    flat = images.reshape(len(images), -1).astype(np.float32)
    return flat / np.float32(np.sqrt(flat.shape[1]))


def printable(text: str, limit: int = 100) -> str:
    """``text`` for a log line: quoted, control characters escaped, at most ``limit`` characters."""
    shown = ascii(text[:limit])
    return shown if len(text) <= limit else f"{shown}... ({len(text)} characters)"


@dataclass(frozen=True)
class InferenceResult:
    answer: PolicyAnswer
    images_charged: int
    remaining: int
    flags: tuple[str, ...]


class VictimService:
    """Everything the routes need, wired once per app by ``create_app``."""

    def __init__(
        self,
        settings: ServerSettings,
        runners: Mapping[str, ModelRunner],
        batcher: Batcher,
        store: StateStore,
        limiter: RateLimiter,
        audit: AuditLog,
        metrics: ServerMetrics,
        detectors: DetectorStates | None = None,
        ledger: WatermarkLedger | None = None,
    ) -> None:
        self.settings = settings
        self.runners = dict(runners)
        self.batcher = batcher
        self.store = store
        self.limiter = limiter
        self.auth_throttle = AuthFailureThrottle(limiter, settings.auth_failure_rate)
        self.audit = audit
        self.metrics = metrics
        self.defender_models = DefenderModels()
        self._model_policies: dict[str, OutputPolicy] = {}
        for name in self.runners:
            spec = settings.models.get(name)
            self._model_policies[name] = self.check_policy(parse_policy(spec.policy if spec else None), [name])
        self.detectors: DetectorStates = detectors if detectors is not None else MemoryDetectorStates()
        self.ledger: WatermarkLedger = ledger if ledger is not None else MemoryWatermarkLedger()
        self._key_policies: dict[str, OutputPolicy] = {}
        self._rng = np.random.default_rng(settings.seed)
        self.ready = False

    # --- models -----------------------------------------------------------------

    def runner(self, name: str, key: KeyRecord | None = None) -> ModelRunner:
        """The model ``name``; the 404 for an unknown one lists only the models ``key`` may use."""
        runner = self.runners.get(name)
        if runner is None:
            usable = sorted(self.runners) if key is None or key.models is None else sorted(key.models)
            raise ModelNotFoundError(f"no model named {printable(name)}; this key may use: {usable}", model=name)
        return runner

    def metrics_label(self, model: str) -> str:
        """``model`` if it is served, else ``"unknown"``: clients cannot add label values."""
        return model if model in self.runners else "unknown"

    def policy_for(self, key: KeyRecord, model: str) -> OutputPolicy:
        """The key's own policy if it has one (parsed once per key), else the model's."""
        if key.policy is None:
            return self._model_policies[model]
        policy = self._key_policies.get(key.key_id)
        if policy is None:
            policy = self._key_policies[key.key_id] = parse_policy(key.policy)
        return policy

    def check_policy(self, policy: OutputPolicy, models: list[str]) -> OutputPolicy:
        """Check that the policy can run on ``models``: its defender checkpoints fit, a secret exists.

        Raises:
            ConfigError: a checkpoint that cannot be loaded or does not fit; a watermark without secret.
        """
        if policy.needs_watermark_secret and self.settings.watermark_secret is None:
            steps = sorted({step.name for step in policy.steps if step.needs_watermark_secret})
            raise ConfigError(f"the {' and '.join(steps)} step needs the server's watermark_secret "
                              "(--watermark-secret or STEALSIM_WATERMARK_SECRET)")
        for step in policy.steps:
            for path in step.checkpoints():
                for model in models:
                    self.defender_models.check(path, self.runners[model].meta,
                                               needs_classes=step.checkpoints_have_classes)
            need = step.observes()
            if need is not None and need.kind == "mahalanobis":
                assert need.statistics is not None and need.encoder is not None
                self.defender_models.check_gaussian(need.statistics, need.encoder)
        return policy

    def check_access(self, key: KeyRecord, model: str) -> ModelRunner:
        runner = self.runner(model, key)
        if key.models is not None and model not in key.models:
            raise ForbiddenError(f"this key may not use model {model!r}", model=model)
        if key.blocked:
            raise ForbiddenError(
                f"this key is blocked (flags: {list(key.flags)})", flags=list(key.flags)
            )
        return runner

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "stealsim", "version": __version__, "extensions": EXTENSIONS}

    def model_metadata(self, key: KeyRecord, model: str) -> dict[str, Any]:
        runner = self.check_access(key, model)
        policy = self.policy_for(key, model)
        classes = runner.num_classes
        if policy.output_kind == "label":
            output = {"name": "label", "datatype": "INT64", "shape": [-1]}
        else:
            output = {"name": "probabilities", "datatype": "FP32", "shape": [-1, classes]}
        return {
            "name": model, "versions": ["1"], "platform": "pytorch",
            "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, *runner.input_shape]}],
            "outputs": [output],
            "parameters": {
                "pixel_range": [0.0, 1.0], "num_classes": classes,
                "class_names": list(runner.meta.class_names), "output_kind": policy.output_kind,
                "max_images_per_request": self.settings.max_images_per_request,
                **self._price_parameters(key, model),
                "rate_limits": self._declared_limits(key), "rate_limits_enforced": self.enforces_limits,
            },
        }

    def price_for(self, key: KeyRecord, model: str) -> float | None:
        """The price per 1,000 images ``key`` pays on ``model``: its own, else the model's, else None."""
        if key.price_per_1000_images is not None:
            return key.price_per_1000_images
        spec = self.settings.models.get(model)
        return None if spec is None else spec.price_per_1000_images

    def _price_parameters(self, key: KeyRecord, model: str) -> dict[str, Any]:
        price = self.price_for(key, model)
        return {} if price is None else {"price_per_1000_images": price, "currency": self.settings.currency}

    @property
    def enforces_limits(self) -> bool:
        """False with ``rate_limits: declare``: limits are published, never applied."""
        return self.settings.rate_limits == "enforce"

    def _declared_limits(self, key: KeyRecord) -> list[dict[str, Any]]:
        """The key's limits as the model metadata publishes them (no window state)."""
        declared = []
        for kind, text in (("requests", key.rate), ("images", key.image_rate)):
            if text:
                item = parse_rate(text)
                declared.append({"kind": kind, "limit": text, "amount": item.amount,
                                 "window_seconds": item.get_expiry(), "enforced": self.enforces_limits})
        return declared

    # --- inference ----------------------------------------------------------------

    async def infer(
        self, key: KeyRecord, model: str, images: np.ndarray, request_id: str | None = None
    ) -> InferenceResult:
        """Rate-limit, charge, batch, apply the policy, detect, audit; refund what is not served."""
        self.check_access(key, model)
        policy = self.policy_for(key, model)
        count = len(images)
        if self.enforces_limits:
            await self.limiter.hit(key.key_id, key.rate, key.image_rate, count)
        remaining = await self.store.reserve(key.key_id, count)
        try:
            probabilities = await self._forward(model, images)
            answer = await self._apply_policy(key, policy, images, probabilities)
            if answer.marks is not None and len(answer.marks.rows):
                marks = answer.marks
                await self.ledger.append(key.key_id, model, WatermarkRecord(
                    images[marks.rows].astype(np.float32), marks.labels, marks.victim_labels,
                    probabilities.shape[1]))
            flags = await self._detect(key, model, policy, images, probabilities)
            await self.audit.append(AuditRecord(
                key_id=key.key_id, model=model, images=count, input_sha256=input_digest(images),
                policy=policy.describe(), flags=list(flags), request_id=request_id,
            ))
        except BaseException:
            # Not served (failed or timed-out inference, Redis gone, caller gone): not charged.
            await self._refund(key.key_id, count)
            raise
        logger.debug(
            "served %d images of %s to %s", count, model, key.key_id,
            extra={"key_id": key.key_id, "model": model, "images": count, "remaining": remaining},
        )
        return InferenceResult(answer, count, remaining, flags)

    async def _forward(self, model: str, images: np.ndarray) -> np.ndarray:
        try:
            async with asyncio.timeout(self.settings.inference_timeout_s):
                return await self.batcher.submit(model, images)
        except TimeoutError as exc:
            raise UnavailableError(
                f"model {model!r} did not answer within {self.settings.inference_timeout_s} s",
                retry_after=1,
            ) from exc

    async def refund_undelivered(self, key: KeyRecord, model: str, images: int) -> None:
        """Refund a served request whose client disconnected before the answer was written."""
        await self._refund(key.key_id, images)
        logger.info("refunded %d images of %s to key %s: the client disconnected before the answer",
                    images, model, key.key_id)

    async def _refund(self, key_id: str, images: int) -> None:
        try:
            await self.store.refund(key_id, images)
        except ServiceError as exc:  # a refund that fails must not hide the error that caused it
            logger.error("could not refund %d images to key %s: %s", images, key_id, exc.message)

    async def _apply_policy(
        self, key: KeyRecord, policy: OutputPolicy, images: np.ndarray, probabilities: np.ndarray,
    ) -> PolicyAnswer:
        """The policy's answer; steps with the defender's models run off the event loop."""
        if not policy.needs_context:
            return policy.apply(probabilities, self._rng)
        secret = self.settings.watermark_secret
        context = PolicyContext(
            images=images, key_id=key.key_id,
            watermark_secret=None if secret is None else secret.get_secret_value().encode(),
            defender_probabilities=self.defender_models.probabilities,
        )
        return await asyncio.to_thread(policy.apply, probabilities, self._rng, context)

    async def _observed(self, need: DetectorInput, images: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
        """What a detector observes of the queries (:data:`~defense.steps.DetectorInputKind`)."""
        if need.kind == "images":
            return images
        if need.kind == "probabilities":
            return probabilities  # the served model's own answer, before the policy
        if need.kind == "pixels":
            return await asyncio.to_thread(_pixel_encoding, images)
        assert need.encoder is not None
        if need.kind == "features":
            return await asyncio.to_thread(self.defender_models.features, need.encoder, images)
        assert need.statistics is not None
        return await asyncio.to_thread(self.defender_models.mahalanobis, need.encoder, need.statistics, images)

    async def _detect(
        self, key: KeyRecord, model: str, policy: OutputPolicy,
        images: np.ndarray, probabilities: np.ndarray,
    ) -> tuple[str, ...]:
        flags = key.flags
        labels = probabilities.argmax(axis=1)
        for step in policy.detectors:
            inputs = await self._observed(step.observes(), images, probabilities)
            if isinstance(step, PooledDetectorStep):  # one state per model, over every key
                verdict = await self.detectors.observe_pooled(step, key.key_id, model, inputs, labels)
                already = step.name in flags
                for other in verdict.newly_flagged:
                    if other != key.key_id:
                        await self._flag_other(other, step, model, verdict)
            else:
                already, verdict = await self.detectors.observe(step, key.key_id, model, inputs, labels)
            if verdict.flagged and not already:
                record = await self.store.flag(key.key_id, step.name, block=step.block)
                self.metrics.flagged.labels(step.name).inc()
                logger.warning("%s flagged key %s on %s (%s)%s", step.name, key.key_id, model, verdict,
                               "; blocked" if step.block else "")
                flags = record.flags
        return flags

    async def _flag_other(self, key_id: str, step: PooledDetectorStep, model: str, verdict: Any) -> None:
        """Flag another key a pooled detector named (it may have sent nothing since)."""
        try:
            if step.name in (await self.store.get(key_id)).flags:
                return
            await self.store.flag(key_id, step.name, block=step.block)
        except KeyNotFoundError:
            logger.warning("%s named key %s on %s, which no longer exists", step.name, key_id, model)
            return
        self.metrics.flagged.labels(step.name).inc()
        logger.warning("%s flagged key %s on %s (pool: %d OOD of %d queries, p=%.3g)%s", step.name, key_id,
                       model, verdict.ood, verdict.queries, verdict.p_value, "; blocked" if step.block else "")

    # --- health ---------------------------------------------------------------------

    async def readiness(self, model: str | None = None) -> list[str]:
        """Why the service (or ``model``) cannot answer now; empty when it can."""
        if not self.ready:
            return ["the service is starting or shutting down"]
        try:
            await self.store.ping()
            statuses = await self.batcher.status()
        except UnavailableError as exc:
            return [exc.message]
        return [
            status.reason or f"model {name!r} is not ready"
            for name, status in statuses.items()
            if not status.ready and (model is None or name == model)
        ]

    async def refresh_metrics(self) -> None:
        """Set the backend gauges (state store up; queued, pending, live workers) before a scrape."""
        try:
            await self.store.ping()
            statuses = await self.batcher.status()
        except UnavailableError:
            self.metrics.backend_up.set(0)
            return
        self.metrics.backend_up.set(1)
        for name, status in statuses.items():
            self.metrics.stream_entries.labels(name).set(status.queued)
            self.metrics.stream_pending.labels(name).set(status.pending)
            self.metrics.workers_live.labels(name).set(status.workers)

    # --- keys -------------------------------------------------------------------------

    async def create_key(
        self,
        budget: int,
        name: str = "",
        rate: str | None = None,
        image_rate: str | None = None,
        models: list[str] | None = None,
        policy: list[dict[str, Any]] | None = None,
        secret: str | None = None,
        price_per_1000_images: float | None = None,
    ) -> tuple[str, KeyRecord]:
        """Create a key; returns ``(secret, record)``. Unset rates take the server's defaults;
        an unset price, each model's."""
        if budget < 0:
            raise InvalidRequestError(f"budget must be >= 0 images, got {budget}")
        if price_per_1000_images is not None and not 0.0 <= price_per_1000_images < float("inf"):
            raise InvalidRequestError(f"price_per_1000_images must be a finite number >= 0, got {price_per_1000_images}")
        rate = rate if rate is not None else self.settings.default_rate
        image_rate = image_rate if image_rate is not None else self.settings.default_image_rate
        for text in (rate, image_rate):
            if text:
                parse_rate(text)
        if models is not None:
            unknown = sorted(set(models) - set(self.runners))
            if unknown:
                raise InvalidRequestError(f"unknown models {unknown}; served: {sorted(self.runners)}")
        if policy is not None:
            try:
                self.check_policy(parse_policy(policy), models if models is not None else list(self.runners))
            except ConfigError as exc:
                raise InvalidRequestError(str(exc)) from exc
        secret = secret or new_secret()
        record = KeyRecord(
            key_id="key_" + secrets.token_hex(6), name=name, budget=budget,
            rate=rate or None, image_rate=image_rate or None,
            models=None if models is None else tuple(models),
            policy=None if policy is None else tuple(policy),
            price_per_1000_images=None if price_per_1000_images is None else float(price_per_1000_images),
        )
        await self.store.create_key(record, secret)
        # A user string: quoted, control characters escaped (no forged lines), cut at 100 characters.
        logger.info("created key %s (%s) with budget %d", record.key_id, printable(name), budget)
        return secret, record

    def is_admin(self, secret: str | None) -> bool:
        admin = self.settings.admin_key
        if admin is None or secret is None:
            return False
        return hmac.compare_digest(secret.encode(), admin.get_secret_value().encode())

    async def watermark_record(self, key_id: str, model: str) -> WatermarkRecord:
        """Every watermarked answer key ``key_id`` got from ``model`` (admin)."""
        runner = self.runner(model)
        await self.store.get(key_id)  # 404 for an unknown key
        parts = await self.ledger.read(key_id, model)
        return WatermarkRecord.concatenate(parts, runner.input_shape, runner.num_classes)

    async def usage(self, key: KeyRecord) -> dict[str, Any]:
        record = await self.store.get(key.key_id)
        limits = await self.limiter.describe(record.key_id, record.rate, record.image_rate)
        return {
            "key_id": record.key_id, "name": record.name, "used": record.used,
            "budget": record.budget, "remaining": record.remaining,
            "rate_limits": [{**limit, "enforced": self.enforces_limits} for limit in limits],
            "rate_limits_enforced": self.enforces_limits,
            "price_per_1000_images": record.price_per_1000_images, "currency": self.settings.currency,
            "flags": list(record.flags), "blocked": record.blocked,
            "models": None if record.models is None else list(record.models),
            "policy": None if record.policy is None else list(record.policy),
            "time": time.time(),
        }
