"""Project extensions: usage of the calling key, admin key management, audit, metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

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

__all__ = ["router"]

router = APIRouter()


class CreateKeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    budget: int = Field(ge=0, description="Lifetime budget in images.")
    name: str = ""
    rate: str | None = Field(default=None, description="Requests per window, e.g. '20/second'.")
    image_rate: str | None = Field(default=None, description="Images per window, e.g. '5000/minute'.")
    models: list[str] | None = None
    policy: list[dict[str, Any]] | None = None


class TopUpRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    images: int = Field(gt=0)


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
async def revoke_key(key_id: str, _: AdminDep, service: ServiceDep) -> JSONResponse:
    return JSONResponse((await service.store.revoke(key_id)).public())


@router.post(TOPUP_PATH, tags=["admin"])
async def top_up(key_id: str, body: TopUpRequest, _: AdminDep, service: ServiceDep) -> JSONResponse:
    return JSONResponse((await service.store.top_up(key_id, body.images)).public())


@router.get(WATERMARK_PATH, tags=["admin"])
async def watermark_record(key_id: str, model: str, _: AdminDep, service: ServiceDep) -> Response:
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
