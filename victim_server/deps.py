"""Dependencies of the routes, as ``Annotated`` aliases; all authentication is here."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from stealsim.errors import ForbiddenError, UnauthorizedError
from stealsim.wire import API_KEY_HEADER, AUTHORIZATION_HEADER, BEARER_SCHEME
from victim_server.service import VictimService
from victim_server.store import KeyRecord

__all__ = [
    "AdminDep", "CallerKey", "ServiceDep", "authenticate", "client_address", "get_service",
    "presented_secret", "require_admin",
]


async def get_service(request: Request) -> VictimService:
    service: VictimService = request.app.state.service
    return service


ServiceDep = Annotated[VictimService, Depends(get_service)]


def presented_secret(request: Request) -> str | None:
    """The key sent as ``X-API-Key: KEY`` or ``Authorization: Bearer KEY``."""
    secret = request.headers.get(API_KEY_HEADER)
    if secret:
        return secret.strip()
    scheme, _, token = request.headers.get(AUTHORIZATION_HEADER, "").partition(" ")
    if scheme.lower() == BEARER_SCHEME.lower() and token.strip():
        return token.strip()
    return None


def client_address(request: Request) -> str:
    """The client's address as the server saw it (uvicorn applies trusted proxy headers)."""
    return request.client.host if request.client is not None else "unknown"


async def authenticate(request: Request, service: VictimService) -> KeyRecord:
    """The live key the request presents; raises UnauthorizedError (401) otherwise.

    A wrong key counts against the client's address; past ``auth_failure_rate`` of them
    every key it presents gets 429 (RateLimitedError) until the window ends.
    """
    secret = presented_secret(request)
    if secret is None:
        raise UnauthorizedError("no API key: send X-API-Key: KEY or Authorization: Bearer KEY")
    address = client_address(request)
    service.auth_throttle.check(address)
    record = await service.store.authenticate(secret)
    if record is None:
        await service.auth_throttle.failed(address)
        raise UnauthorizedError("unknown or revoked API key")
    return record


async def require_key(request: Request, service: ServiceDep) -> KeyRecord:
    return await authenticate(request, service)


async def require_admin(request: Request, service: ServiceDep) -> None:
    """The admin key, or 403 (another key, or no admin API), 401 (none) or 429 (too many wrong)."""
    secret = presented_secret(request)
    if service.settings.admin_key is None:
        raise ForbiddenError("the admin API is disabled: start the server with --admin-key")
    if secret is None:
        raise UnauthorizedError("no admin key: send X-API-Key: KEY or Authorization: Bearer KEY")
    address = client_address(request)
    service.auth_throttle.check(address)
    if not service.is_admin(secret):
        await service.auth_throttle.failed(address)
        raise ForbiddenError("this key is not the admin key")


CallerKey = Annotated[KeyRecord, Depends(require_key)]
AdminDep = Annotated[None, Depends(require_admin)]
