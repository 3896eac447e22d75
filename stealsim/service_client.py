"""The one client of stealsim's own API: readiness, keys, usage, audit, watermark records.

Experiments, benchmarks, tests and the CLI call the victim service's admin and usage
endpoints (``docs/api.md``) through :class:`ServiceClient`; it knows the paths
(:mod:`stealsim.wire`), the auth header and the timeouts, and it is the single place
where HTTP and transport failures become :class:`~stealsim.errors.APIRequestError`
(with the server's JSON error message in the text)::

    with ServiceClient(url, admin_key) as service:
        service.wait_ready(60)
        key = service.create_key(1000, name="alice", models=["victim"])
        ...
        print(service.usage(key.api_key)["used"])

Inference is not here: the attacker's :class:`attacker.client.HttpVictim` speaks the
Open Inference Protocol to any server, and the serve benchmark measures raw requests.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx

from stealsim.errors import APIRequestError
from stealsim.wire import (
    ADMIN_KEYS_PATH,
    API_KEY_HEADER,
    AUDIT_PATH,
    READY_PATH,
    USAGE_PATH,
    admin_key_path,
    topup_path,
    watermark_path,
)

__all__ = ["IssuedKey", "ServiceClient"]

DEFAULT_TIMEOUT = 120.0
"""Seconds one request may take. Generous because the audit export and the watermark
records grow with every request the server has answered; a grid's exports are the
slowest calls (the grid gave them 120 s)."""

PROBE_TIMEOUT = 2.0
"""Seconds one readiness probe may take: a starting server either answers at once or
is not listening yet, so a short probe keeps :meth:`ServiceClient.wait_ready` polling."""


@dataclass(frozen=True)
class IssuedKey:
    """A key the admin API has just created: the secret (shown once), its id, its listing."""

    api_key: str
    key_id: str
    listing: dict[str, Any]


class ServiceClient:
    """A synchronous client of one victim service (``url``, e.g. ``http://127.0.0.1:8000``).

    Args:
        url: the server's base URL.
        key: sent as ``X-API-Key`` with every call that needs a key and names none:
            the admin key for the admin calls, or a user's key for :meth:`usage`.
        timeout: seconds one request may take (:data:`DEFAULT_TIMEOUT`).
        headers: extra headers sent with every request (a gateway's, say); they
            take precedence over the key header.

    Every failure (no answer, a non-success status, an answer that is not what the
    endpoint returns) raises :class:`~stealsim.errors.APIRequestError`. Close it
    with :meth:`close` or use it as a context manager.
    """

    def __init__(
        self,
        url: str,
        key: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.key = key
        self._headers = dict(headers or {})
        self._http = httpx.Client(base_url=self.url, timeout=timeout)

    # -- lifecycle ----------------------------------------------------------------------

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- health ---------------------------------------------------------------------------

    def not_ready_reason(self) -> str | None:
        """``None`` when ``GET /v2/health/ready`` answers 200; else why not (status and body, or no answer)."""
        try:
            response = self._http.get(READY_PATH, timeout=PROBE_TIMEOUT)
        except httpx.TransportError as exc:
            return str(exc) or type(exc).__name__
        if response.status_code == 200:
            return None
        return f"{response.status_code} {response.text[:200]}"

    def is_ready(self) -> bool:
        return self.not_ready_reason() is None

    def wait_ready(
        self, timeout: float, *, give_up: Callable[[], str | None] | None = None, interval: float = 0.1
    ) -> None:
        """Poll readiness every ``interval`` seconds until the server is ready.

        ``give_up`` is asked before each probe; a reason it returns (e.g. "the server
        process exited with status 1") ends the wait at once. Raises
        :class:`~stealsim.errors.APIRequestError` with that reason, or with the last
        probe's answer when ``timeout`` seconds pass.
        """
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if give_up is not None and (reason := give_up()) is not None:
                raise APIRequestError(reason)
            reason = self.not_ready_reason()
            if reason is None:
                return
            last = reason
            time.sleep(interval)
        raise APIRequestError(f"the victim service at {self.url} was not ready within {timeout:g} s ({last})")

    # -- the calling key --------------------------------------------------------------------

    def usage(self, api_key: str | None = None) -> dict[str, Any]:
        """``GET /v1/usage`` as ``api_key`` (default: the client's key): used, budget, flags, ..."""
        return self._json_object(self._request("GET", USAGE_PATH, key=api_key))

    # -- admin --------------------------------------------------------------------------

    def create_key(
        self,
        budget: int,
        *,
        name: str = "",
        rate: str | None = None,
        image_rate: str | None = None,
        models: Sequence[str] | None = None,
        policy: Sequence[Mapping[str, Any]] | None = None,
        price_per_1000_images: float | None = None,
    ) -> IssuedKey:
        """``POST /v1/admin/keys``: a key with ``budget`` images.

        ``rate`` / ``image_rate`` (e.g. ``"20/second"``, ``"5000/minute"``) default to the
        server's; ``models`` ``None`` allows every model; ``policy`` ``None`` takes each
        model's own output policy; ``price_per_1000_images`` ``None`` takes each model's price.
        """
        body: dict[str, Any] = {"budget": budget}
        if name:
            body["name"] = name
        if rate is not None:
            body["rate"] = rate
        if image_rate is not None:
            body["image_rate"] = image_rate
        if models is not None:
            body["models"] = list(models)
        if policy is not None:
            body["policy"] = [dict(step) for step in policy]
        if price_per_1000_images is not None:
            body["price_per_1000_images"] = price_per_1000_images
        answer = self._json_object(self._request("POST", ADMIN_KEYS_PATH, json=body))
        try:
            return IssuedKey(str(answer["api_key"]), str(answer["key_id"]),
                             {field: value for field, value in answer.items() if field != "api_key"})
        except KeyError as exc:
            raise APIRequestError(f"POST {self.url}{ADMIN_KEYS_PATH} answered no {exc}", status=201) from exc

    def list_keys(self) -> list[dict[str, Any]]:
        """``GET /v1/admin/keys``: every key's listing (never the secrets)."""
        keys = self._json_object(self._request("GET", ADMIN_KEYS_PATH)).get("keys")
        if not isinstance(keys, list):
            raise APIRequestError(f"GET {self.url}{ADMIN_KEYS_PATH} answered no list of keys", status=200)
        return keys

    def top_up(self, key_id: str, images: int) -> dict[str, Any]:
        """``POST /v1/admin/keys/{key_id}/topup``: add ``images`` to the budget; the new listing."""
        return self._json_object(self._request("POST", topup_path(key_id), json={"images": images}))

    def revoke(self, key_id: str) -> dict[str, Any]:
        """``DELETE /v1/admin/keys/{key_id}``: the key fails with 401 from now on; its listing."""
        return self._json_object(self._request("DELETE", admin_key_path(key_id)))

    def audit(self) -> list[dict[str, Any]]:
        """``GET /v1/admin/audit``: one record per served request, oldest first."""
        response = self._request("GET", AUDIT_PATH)
        try:
            return [json.loads(line) for line in response.text.splitlines() if line.strip()]
        except ValueError as exc:
            raise APIRequestError(f"GET {self.url}{AUDIT_PATH} answered a line that is not JSON: {exc}",
                                  status=response.status_code) from exc

    def watermark_record(self, key_id: str, model: str) -> bytes:
        """``GET /v1/admin/keys/{key_id}/watermark?model=M``: the ``.npz`` of the watermarked answers.

        ``defense.watermark.WatermarkRecord.from_bytes`` reads it.
        """
        return self._request("GET", watermark_path(key_id), params={"model": model}).content

    # -- the one boundary -----------------------------------------------------------------

    def _request(self, method: str, path: str, *, key: str | None = None, **options: Any) -> httpx.Response:
        """Send one request; every transport failure and non-2xx answer becomes APIRequestError."""
        secret = key if key is not None else self.key
        headers = ({API_KEY_HEADER: secret} if secret else {}) | self._headers
        try:
            response = self._http.request(method, path, headers=headers, **options)
        except httpx.HTTPError as exc:
            raise APIRequestError(f"{method} {self.url}{path}: no answer ({str(exc) or type(exc).__name__})") from exc
        if response.is_success:
            return response
        message, code = _error_of(response)
        status = f"{response.status_code} {code}: " if code else f"{response.status_code} "
        raise APIRequestError(f"{method} {self.url}{path} failed: {status}{message}",
                              status=response.status_code, code=code)

    def _json_object(self, response: httpx.Response) -> dict[str, Any]:
        try:
            content = response.json()
        except ValueError as exc:
            raise APIRequestError(f"{response.request.method} {response.request.url} answered no JSON: "
                                  f"{response.text[:200]!r}", status=response.status_code) from exc
        if not isinstance(content, dict):
            raise APIRequestError(f"{response.request.method} {response.request.url} answered no JSON object",
                                  status=response.status_code)
        return content


def _error_of(response: httpx.Response) -> tuple[str, str]:
    """The API's ``{"error": message, "code": code}``, or the body's start when it is not one."""
    try:
        content = response.json()
    except ValueError:
        content = None
    if isinstance(content, dict) and "error" in content:
        return str(content["error"]), str(content.get("code", ""))
    return response.text[:300], ""
