"""The HTTP black-box client: the victim API (docs/api.md) as a :class:`~attacker.victims.Victim`.

It speaks the Open Inference Protocol v2 REST API over one keep-alive
connection pool, to stealsim's server or any other (MLServer, KServe, Triton),
with the binary tensor extension where the server advertises it and JSON
otherwise (:mod:`attacker.endpoint` holds the negotiation rules)::

    with HttpVictim("http://127.0.0.1:8000", api_key="...", model="victim") as victim:
        probabilities = victim.query(images)   # images in [0, 1], [N, C, H, W]
        print(victim.usage()["used"])          # stealsim servers only (victim.metering == "server")

Errors become :class:`~stealsim.errors.VictimAPIError` (``status`` and ``code``
as the API sends them) at one boundary, :meth:`HttpVictim._request`.
Rate limits (429 ``rate_limited``), transient server errors (500, 502, 503, 504)
and lost connections are retried with bounded exponential backoff, honouring
``Retry-After``; a spent budget (429 ``budget_exhausted``) raises
:class:`~stealsim.errors.BudgetExhaustedError` at once. Only answered requests
are counted (:class:`~attacker.victims.BudgetedVictim`), so a retry never counts
twice; stealsim's server refunds a request it failed to serve.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, cast

import httpx
from torch import Tensor

from attacker.endpoint import (
    BINARY_EXTENSION,
    METERING_EXTENSION,
    EndpointOptions,
    decode_answer,
    encode_request,
    negotiate,
)
from attacker.victims import KeyUsage, Metering
from stealsim.errors import AttackError, BudgetExhaustedError, VictimAPIError
from stealsim.wire import API_KEY_HEADER, HEADER_LENGTH, USAGE_PATH

__all__ = ["HEADER_LENGTH", "HttpVictim", "RetryPolicy"]

logger = logging.getLogger(__name__)

_RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})
"""Rate limits and transient server errors: a model that raised once, a gateway's 502 / 504, an overload."""


class RetryPolicy:
    """Exponential backoff for 429 ``rate_limited``, transient 5xx (500, 502, 503, 504) and lost connections.

    The wait before retry ``i`` (0-based) is ``Retry-After`` when the server sends
    one, else ``min(max_delay, base_delay * 2**i)``; after ``max_retries`` retries
    the error is raised (with the defaults, a server that keeps failing ends the
    request after 8 retries and about 11 s of waiting).
    """

    def __init__(
        self,
        max_retries: int = 8,
        base_delay: float = 0.05,
        max_delay: float = 5.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.max_retries = max_retries
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.sleep = sleep

    def delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after is not None:
            try:
                return min(self.max_delay * 12, max(0.0, float(retry_after)))
            except ValueError:
                pass  # an HTTP date: fall back to our own backoff
        return float(min(self.max_delay, self.base_delay * 2**attempt))


def _error_from(response: httpx.Response) -> VictimAPIError:
    """Translate an error response into the project's exception."""
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = {}
    if not isinstance(body, dict):
        body = {}
    message = str(body.get("error") or body.get("detail") or response.text[:200] or response.reason_phrase)
    code = str(body.get("code", ""))
    where = f"{response.request.method} {response.request.url.path}"
    if response.status_code == 429 and code == "budget_exhausted":
        return BudgetExhaustedError(
            f"{where}: budget exhausted: {message}", remaining=int(body.get("remaining", 0))
        )
    return VictimAPIError(
        f"{where}: HTTP {response.status_code} {code or 'error'}: {message}",
        status=response.status_code,
        code=code,
    )


def _answer_parameters(raw: bytes, header_length: str | None) -> dict[str, Any]:
    """The ``parameters`` of an answer's JSON header (the binary extension's header only: cheap)."""
    try:
        header = json.loads(raw[: int(header_length)] if header_length is not None else raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    parameters = header.get("parameters") if isinstance(header, dict) else None
    return parameters if isinstance(parameters, dict) else {}


class HttpVictim:
    """An Open Inference Protocol v2 endpoint behind the :class:`~attacker.victims.Victim` interface.

    Args:
        url: base URL of the server (``http://host:port``).
        api_key: sent as ``X-API-Key`` (stealsim's keys); ``None`` sends none.
        model: the model name.
        timeout: seconds per request.
        retry: backoff for rate limits, transient 5xx and connection errors.
        options: what the metadata does not say (see :mod:`attacker.endpoint`),
            including the wire (``auto``: binary tensors when advertised).
        headers: extra headers on every request (a gateway's ``Authorization``).
        transport: an httpx transport (tests); default: a real connection pool.

    Negotiates on construction (``GET /v2``, then ``GET /v2/models/{model}``,
    :func:`~attacker.endpoint.negotiate`); a wrong key, model or metadata the
    attacks cannot use fails here, before any image is sent.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None,
        model: str,
        *,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        options: EndpointOptions | None = None,
        headers: dict[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.retry = retry or RetryPolicy()
        self.retries = 0
        self.options = options or EndpointOptions()
        self._sends_key = bool(api_key)
        self._header_names = sorted(headers or {})
        sent = dict(headers or {})
        if api_key:
            sent[API_KEY_HEADER] = api_key
        self._client = httpx.Client(
            base_url=self.url,
            headers=sent,
            timeout=timeout,
            limits=httpx.Limits(max_connections=4, max_keepalive_connections=4),
            transport=transport,
        )
        try:
            server_meta = self._server_metadata()
            self.metadata = self._request("GET", f"/v2/models/{model}").json()
            if not isinstance(self.metadata, dict):
                raise AttackError(f"GET /v2/models/{model} did not answer a JSON object")
            self.endpoint = negotiate(server_meta, self.metadata, options, model)
        except BaseException:
            self._client.close()
            raise
        self.info = self.endpoint.info
        self.last_parameters: dict[str, Any] = {}
        """The last answer's ``parameters`` from a stealsim server (``remaining``, ``flags``); else empty."""
        logger.info("negotiated %s", self.endpoint.describe())

    @property
    def metering(self) -> Metering:
        """``server`` when the server meters keys (``GET /v1/usage``), else ``client``."""
        return self.endpoint.metering

    # -- lifecycle ---------------------------------------------------------------

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> HttpVictim:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the boundary --------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send one request, retrying 429 ``rate_limited``, transient 5xx and connection errors."""
        attempt = 0
        while True:
            try:
                response = self._client.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                if attempt >= self.retry.max_retries:
                    raise VictimAPIError(
                        f"{method} {self.url}{path}: cannot reach the victim: {exc}"
                    ) from exc
                wait, reason = self.retry.delay(attempt, None), f"connection error ({exc})"
            else:
                if response.status_code < 400:
                    return response
                error = _error_from(response)
                retryable = response.status_code in _RETRIED_STATUSES and not isinstance(
                    error, BudgetExhaustedError
                )
                if not retryable or attempt >= self.retry.max_retries:
                    raise error
                wait = self.retry.delay(attempt, response.headers.get("Retry-After"))
                reason = f"HTTP {response.status_code} {error.code}"
            attempt += 1
            self.retries += 1
            # A rate limit is the server working as meant; a failure is worth a line in the log.
            logger.log(logging.DEBUG if reason.startswith("HTTP 429") else logging.INFO,
                       "%s %s: %s; retry %d of %d in %.2fs", method, path, reason, attempt,
                       self.retry.max_retries, wait)
            self.retry.sleep(wait)

    def _server_metadata(self) -> dict[str, Any] | None:
        """``GET /v2`` (name, version, extensions); ``None`` where the server has no such route."""
        try:
            body = self._request("GET", "/v2").json()
        except VictimAPIError as exc:
            if exc.status in (404, 405):
                return None
            raise
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        return body if isinstance(body, dict) else None

    # -- the victim interface ------------------------------------------------------

    def query(self, images: Tensor) -> Tensor:
        """Probabilities ``[N, K]`` or labels ``[N]`` for ``images`` in [0, 1], ``[N, C, H, W]``.

        Send at most ``info.max_images_per_request`` images per call (the
        :class:`~attacker.victims.BudgetedVictim` splits larger batches).
        """
        body, headers = encode_request(self.endpoint, images)
        try:
            response = self._request("POST", f"/v2/models/{self.model}/infer", content=body, headers=headers)
        except VictimAPIError as exc:
            if self.endpoint.wire == "binary" and BINARY_EXTENSION not in self.endpoint.extensions \
                    and exc.status >= 400 and not isinstance(exc, BudgetExhaustedError):
                raise VictimAPIError(f"{exc} (binary tensors were forced, but the server does not advertise "
                                     f"{BINARY_EXTENSION}: try --wire auto or json)",
                                     status=exc.status, code=exc.code) from exc
            raise
        answers = decode_answer(self.endpoint, response.content, response.headers.get(HEADER_LENGTH),
                                int(images.shape[0]))
        if self.metering == "server":
            self.last_parameters = _answer_parameters(response.content, response.headers.get(HEADER_LENGTH))
        return answers

    # -- extensions ------------------------------------------------------------------

    def usage(self) -> dict[str, Any]:
        """``GET /v1/usage`` of the calling key (``used``, ``budget``, ``remaining``, ...); stealsim servers only."""
        if self.metering != "server":
            raise AttackError(f"{self.url} does not meter keys (no {METERING_EXTENSION} extension): "
                              "the budget is counted on the client alone")
        return cast(dict[str, Any], self._request("GET", USAGE_PATH).json())

    def key_usage(self) -> KeyUsage | None:
        """:meth:`usage` as the run reconciles with it; ``None`` where the server does not meter keys."""
        if self.metering != "server":
            return None
        body = self.usage()
        remaining = body.get("remaining")
        return KeyUsage(used=int(body["used"]), remaining=None if remaining is None else int(remaining))

    def endpoint_record(self) -> dict[str, Any]:
        """The negotiated endpoint, for ``config.json``: no secrets (whether a key is sent, header names only)."""
        endpoint = self.endpoint
        return {
            "server": endpoint.server, "wire": endpoint.wire, "input_name": endpoint.input_name,
            "input_datatype": endpoint.input_datatype, "wire_shape": list(endpoint.wire_shape),
            "output_name": endpoint.output_name, "output_datatype": endpoint.output_datatype,
            "answer_kind": endpoint.answer_kind, "api_key": self._sends_key, "headers": self._header_names,
            "options": asdict(self.options),
        }

    def request_metrics(self) -> dict[str, Any]:
        """``http_retries``: requests retried after a rate limit, a transient 5xx or a lost connection."""
        return {"http_retries": self.retries}
