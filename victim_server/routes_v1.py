"""Project extensions: usage of the calling key, admin key management, audit, metrics.

The admin bodies are validated strictly by pydantic (``strict=True``: no ``true`` or
``"100"`` for a number, no number for a string), with bounds on every number, string
and list; a value outside them is a 400 naming the field and the bound.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from stealsim.wire import (
    ADMIN_KEY_PATH,
    ADMIN_KEYS_PATH,
    AUDIT_PATH,
    BINARY_CONTENT_TYPE,
    METRICS_PATH,
    NDJSON_CONTENT_TYPE,
    TOPUP_PATH,
    USAGE_PATH,
    WATERMARK_COUNT_HEADER,
    WATERMARK_PATH,
)
from victim_server.deps import AdminDep, CallerKey, ServiceDep
from victim_server.store import MAX_BUDGET

__all__ = ["router"]

router = APIRouter()


MAX_NAME_LENGTH = 200
"""The longest key name, model name or key id the admin API takes (characters)."""

_PRINTABLE = r"^[^\p{Cc}\p{Cf}\p{Zl}\p{Zp}]*$"
"""No control or format characters and no line breaks: a name cannot forge a log line."""

Label = Annotated[str, StringConstraints(max_length=MAX_NAME_LENGTH, pattern=_PRINTABLE)]
Rate = Annotated[str, StringConstraints(max_length=64)]
KeyId = Annotated[str, Path(max_length=MAX_NAME_LENGTH)]


class CreateKeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    budget: int = Field(ge=0, le=MAX_BUDGET, description="Lifetime budget in images (at most 2**53 - 1).")
    name: Label = Field(default="", description="Printable, at most 200 characters.")
    rate: Rate | None = Field(default=None, description="Requests per window, e.g. '20/second'.")
    image_rate: Rate | None = Field(default=None, description="Images per window, e.g. '5000/minute'.")
    models: list[Label] | None = Field(default=None, max_length=1000)
    policy: list[dict[str, Any]] | None = Field(default=None, max_length=100)
    price_per_1000_images: float | None = Field(
        default=None, ge=0.0, allow_inf_nan=False,
        description="The key's own price per 1,000 images (the server's currency); overrides each model's.")


class TopUpRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    images: int = Field(gt=0, le=MAX_BUDGET, description="Images to add; the budget stays at most 2**53 - 1.")


@router.get(USAGE_PATH, tags=["usage"])
async def usage(key: CallerKey, service: ServiceDep) -> JSONResponse:
    return JSONResponse(await service.usage(key))


@router.post(ADMIN_KEYS_PATH, tags=["admin"], status_code=201)
async def create_key(body: CreateKeyRequest, _: AdminDep, service: ServiceDep) -> JSONResponse:
    secret, record = await service.create_key(**body.model_dump())
    return JSONResponse({"api_key": secret, **record.public()}, status_code=201)


@router.get(ADMIN_KEYS_PATH, tags=["admin"])
async def list_keys(_: AdminDep, service: ServiceDep) -> JSONResponse:
    return JSONResponse({"keys": [record.public() for record in await service.store.list_keys()]})


@router.delete(ADMIN_KEY_PATH, tags=["admin"])
async def revoke_key(key_id: KeyId, _: AdminDep, service: ServiceDep) -> JSONResponse:
    return JSONResponse((await service.store.revoke(key_id)).public())


@router.post(TOPUP_PATH, tags=["admin"])
async def top_up(key_id: KeyId, body: TopUpRequest, _: AdminDep, service: ServiceDep) -> JSONResponse:
    return JSONResponse((await service.store.top_up(key_id, body.images)).public())


@router.get(WATERMARK_PATH, tags=["admin"])
async def watermark_record(
    key_id: KeyId, model: Annotated[str, Query(max_length=MAX_NAME_LENGTH)], _: AdminDep, service: ServiceDep,
) -> Response:
    """The watermarked answers the key got from ``model`` (``.npz``: images, labels, victim_labels, classes)."""
    record = await service.watermark_record(key_id, model)
    return Response(record.to_bytes(), media_type=BINARY_CONTENT_TYPE,
                    headers={WATERMARK_COUNT_HEADER: str(len(record))})


@router.get(AUDIT_PATH, tags=["admin"])
async def audit(_: AdminDep, service: ServiceDep) -> Response:
    return Response(await service.audit.export(), media_type=NDJSON_CONTENT_TYPE)


@router.get(METRICS_PATH, tags=["operations"])
async def metrics(service: ServiceDep) -> Response:
    await service.refresh_metrics()
    return Response(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
