"""The HTTP black-box client: the victim API (docs/api.md) as a :class:`~attacker.victims.Victim`.

It speaks the Open Inference Protocol with the binary tensor extension over one
keep-alive connection pool::

    with HttpVictim("http://127.0.0.1:8000", api_key="...", model="victim") as victim:
        probabilities = victim.query(images)   # images in [0, 1], [N, C, H, W]
        print(victim.usage()["used"])

Errors become :class:`~stealsim.errors.VictimAPIError` (``status`` and ``code``
as the API sends them) at one boundary, :meth:`HttpVictim._request`.
Rate limits (429 ``rate_limited``) and 503 are retried with exponential backoff,
honouring ``Retry-After``; a spent budget (429 ``budget_exhausted``) raises
:class:`~stealsim.errors.BudgetExhaustedError` at once.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any, cast

import httpx
import numpy as np
import torch
from torch import Tensor

from attacker.victims import OutputKind, VictimInfo
from stealsim.errors import AttackError, BudgetExhaustedError, VictimAPIError

__all__ = ["HEADER_LENGTH", "HttpVictim", "RetryPolicy"]

logger = logging.getLogger(__name__)

HEADER_LENGTH = "Inference-Header-Content-Length"

_RETRIED_STATUSES = (429, 503)


class RetryPolicy:
    """Exponential backoff for 429 ``rate_limited``, 503 and lost connections.

    The wait before retry ``i`` (0-based) is ``Retry-After`` when the server sends
    one, else ``min(max_delay, base_delay * 2**i)``; after ``max_retries`` retries
    the error is raised.
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


class HttpVictim:
    """The victim service behind the :class:`~attacker.victims.Victim` interface.

    Args:
        url: base URL of the service (``http://host:port``).
        api_key: the key sent as ``X-API-Key``.
        model: the model name.
        timeout: seconds per request.
        retry: backoff for rate limits, 503 and connection errors.
        binary: use the binary tensor extension (else JSON float lists).
        transport: an httpx transport (tests); default: a real connection pool.

    Reads the model metadata on construction (``GET /v2/models/{model}``); a
    wrong key or model fails here, before any image is sent.
    """

    def __init__(
        self,
        url: str,
        api_key: str,
        model: str,
        *,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        binary: bool = True,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.retry = retry or RetryPolicy()
        self.binary = binary
        self.retries = 0
        self._client = httpx.Client(
            base_url=self.url,
            headers={"X-API-Key": api_key},
            timeout=timeout,
            limits=httpx.Limits(max_connections=4, max_keepalive_connections=4),
            transport=transport,
        )
        try:
            self.metadata = self._request("GET", f"/v2/models/{model}").json()
            self.info = self._parse_info(self.metadata)
        except BaseException:
            self._client.close()
            raise
        self._input_name = str(self.metadata["inputs"][0].get("name", "input"))
        self._output_name = str(self.metadata["outputs"][0].get("name", "probabilities"))

    # -- lifecycle ---------------------------------------------------------------

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> HttpVictim:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the boundary --------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send one request, retrying 429 ``rate_limited``, 503 and connection errors."""
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
            logger.debug("%s %s: %s; retry %d in %.2fs", method, path, reason, attempt, wait)
            self.retry.sleep(wait)

    @staticmethod
    def _parse_info(metadata: dict[str, Any]) -> VictimInfo:
        try:
            shape = [int(v) for v in metadata["inputs"][0]["shape"]]
            parameters = metadata.get("parameters", {})
            kind = str(parameters.get("output_kind", "probabilities"))
            if kind not in ("probabilities", "label"):
                raise AttackError(f"unknown output_kind {kind!r} in the model metadata")
            output_shape = metadata["outputs"][0].get("shape", [-1, 0])
            classes = int(parameters.get("num_classes", output_shape[-1]))
            low, high = parameters.get("pixel_range", (0.0, 1.0))
            return VictimInfo(
                input_shape=(shape[1], shape[2], shape[3]),
                num_classes=classes,
                output_kind=cast(OutputKind, kind),
                pixel_range=(float(low), float(high)),
                max_images_per_request=int(parameters.get("max_images_per_request", 1024)),
                name=str(metadata.get("name", "victim")),
            )
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise AttackError(f"the victim's model metadata is not understood: {exc}") from exc

    # -- the victim interface ------------------------------------------------------

    def query(self, images: Tensor) -> Tensor:
        """Probabilities ``[N, K]`` or labels ``[N]`` for ``images`` in [0, 1].

        Send at most ``info.max_images_per_request`` images per call (the
        :class:`~attacker.victims.BudgetedVictim` splits larger batches).
        """
        array = np.ascontiguousarray(images.detach().to("cpu", torch.float32).numpy())
        if array.ndim != 4:
            raise AttackError(f"images must be [N, C, H, W], got shape {array.shape}")
        path = f"/v2/models/{self.model}/infer"
        if self.binary:
            return self._query_binary(path, array)
        return self._query_json(path, array)

    def _query_binary(self, path: str, array: np.ndarray) -> Tensor:
        payload = array.astype("<f4", copy=False).tobytes()
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": self._input_name,
                        "shape": list(array.shape),
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": len(payload)},
                    }
                ],
                "outputs": [{"name": self._output_name, "parameters": {"binary_data": True}}],
            }
        ).encode()
        response = self._request(
            "POST",
            path,
            content=header + payload,
            headers={"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))},
        )
        return self._decode(response, int(array.shape[0]))

    def _query_json(self, path: str, array: np.ndarray) -> Tensor:
        body = {
            "inputs": [
                {
                    "name": self._input_name,
                    "shape": list(array.shape),
                    "datatype": "FP32",
                    "data": array.reshape(-1).tolist(),
                }
            ]
        }
        return self._decode(self._request("POST", path, json=body), int(array.shape[0]))

    def _decode(self, response: httpx.Response, count: int) -> Tensor:
        raw = response.content
        length = response.headers.get(HEADER_LENGTH)
        try:
            if length is not None:
                header = json.loads(raw[: int(length)])
                offset = int(length)
            else:
                header = json.loads(raw)
            output = header["outputs"][0]
            datatype = str(output["datatype"]).upper()
            shape = [int(v) for v in output["shape"]]
            dtype = {"FP32": "<f4", "INT64": "<i8", "FP64": "<f8", "INT32": "<i4"}[datatype]
            if "data" in output:
                values = np.asarray(output["data"], dtype=dtype)
            else:
                size = int(output["parameters"]["binary_data_size"])
                values = np.frombuffer(raw[offset : offset + size], dtype=dtype)
            values = values.reshape(shape)
        except (KeyError, IndexError, TypeError, ValueError, json.JSONDecodeError) as exc:
            raise VictimAPIError(f"cannot decode the victim's answer: {exc}", status=200) from exc
        if values.shape[0] != count:
            raise VictimAPIError(f"the victim answered {values.shape[0]} of {count} images", status=200)
        tensor = torch.from_numpy(values.copy())
        if datatype.startswith("INT"):
            return tensor.long().reshape(-1)
        return tensor.float()

    # -- extensions ------------------------------------------------------------------

    def usage(self) -> dict[str, Any]:
        """``GET /v1/usage`` of the calling key (``used``, ``budget``, ``remaining``, ...)."""
        return cast(dict[str, Any], self._request("GET", "/v1/usage").json())
