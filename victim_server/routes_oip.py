"""Open Inference Protocol v2 routes: health, metadata, inference (JSON and binary)."""

from __future__ import annotations

import time
from collections.abc import Coroutine
from typing import Any, cast

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive

from stealsim.errors import InvalidRequestError, PayloadTooLargeError
from stealsim.wire import BINARY_CONTENT_TYPE, JSON_CONTENT_TYPE, MODEL_INFER_PATH, OIP_PREFIX
from victim_server.deps import CallerKey, ServiceDep, authenticate, get_service
from victim_server.protocol import (
    HEADER_LENGTH,
    Output,
    decode_infer_request,
    encode_infer_response,
)

__all__ = ["ready_message", "router"]

router = APIRouter(prefix=OIP_PREFIX, tags=["inference"])


def ready_message(receive: Receive) -> Message | None:
    """The ASGI message ``receive`` has ready now, or None: runs the call up to its first suspension.

    uvicorn's ``receive`` suspends before it takes anything from the connection, so the
    abandoned call loses nothing. This costs 1-5 us per request where an
    ``asyncio.timeout`` around the await, or Starlette's ``Request.is_disconnected``
    (an anyio cancel scope), cost 30-55 us on the hot path.
    """
    call = cast(Coroutine[Any, Any, Message], receive())  # uvicorn's receive is a coroutine function
    try:
        call.send(None)
    except StopIteration as done:
        message: Message = done.value
        return message
    call.close()
    return None


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it grows beyond ``limit`` bytes.

    Raises ``ClientDisconnect`` when the client goes away mid-body (counted, not an error).
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"body of {declared} bytes is over the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _header_length(request: Request) -> int | None:
    value = request.headers.get(HEADER_LENGTH)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError as exc:
        raise InvalidRequestError(f"{HEADER_LENGTH} must be an integer, got {value!r}") from exc


async def infer(request: Request) -> Response:
    """``POST /v2/models/{model}/infer``, JSON or binary tensor extension.

    The hot path is a plain Starlette route (added first, see below): it resolves its
    service and key itself rather than through FastAPI's dependency solver and
    parameter validation, which cost ~0.4 ms per request here, the largest part of a
    single-image request.
    """
    started = time.perf_counter()
    model: str = request.path_params["model"]
    service = await get_service(request)
    key = await authenticate(request, service)
    runner = service.check_access(key, model)
    body = await read_body(request, service.settings.max_body_bytes)
    decoded = decode_infer_request(
        body, _header_length(request), runner.input_shape, service.settings.max_images_per_request
    )
    output_name = "label" if service.policy_for(key, model).output_kind == "label" else "probabilities"
    unknown = [name for name in decoded.requested_outputs if name != output_name]
    if unknown:
        raise InvalidRequestError(f"unknown outputs {unknown}; this model answers {output_name!r}")
    result = await service.infer(key, model, decoded.images, decoded.request_id)
    gone = ready_message(request.receive)
    if gone is not None and gone["type"] == "http.disconnect":
        # Gone before its answer is written: refunded (an answer written is charged: TCP does
        # not tell the server whether the client read it).
        await service.refund_undelivered(key, model, result.images_charged)
        raise ClientDisconnect
    answer = result.answer
    output = Output(output_name, "INT64" if answer.kind == "label" else "FP32", answer.values)
    content, headers = encode_infer_response(
        model, decoded.request_id, [output], decoded.binary_output,
        {"images_charged": result.images_charged, "remaining": result.remaining,
         "flags": list(result.flags)},
    )
    service.metrics.latency.labels(model).observe(time.perf_counter() - started)
    service.metrics.requests.labels(model, "200").inc()
    service.metrics.images.labels(model).inc(result.images_charged)  # after the disconnect check
    media = BINARY_CONTENT_TYPE if decoded.binary_output else JSON_CONTENT_TYPE
    return Response(content, media_type=media, headers=headers)


# The hot path first: routes are matched in the order they were added.
router.add_route(MODEL_INFER_PATH, infer, methods=["POST"])


@router.get("/health/live")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready")
async def ready(service: ServiceDep) -> JSONResponse:
    reasons = await service.readiness()
    if reasons:
        return JSONResponse({"ready": False, "reasons": reasons}, status_code=503)
    return JSONResponse({"ready": True})


@router.get("")
async def server_metadata(service: ServiceDep) -> JSONResponse:
    return JSONResponse(service.server_metadata())


@router.get("/models/{model}")
async def model_metadata(model: str, key: CallerKey, service: ServiceDep) -> JSONResponse:
    return JSONResponse(service.model_metadata(key, model))


@router.get("/models/{model}/versions/{version}")
async def model_version_metadata(
    model: str, version: str, key: CallerKey, service: ServiceDep
) -> JSONResponse:
    return JSONResponse(service.model_metadata(key, model))


@router.get("/models/{model}/ready")
async def model_ready(model: str, key: CallerKey, service: ServiceDep) -> JSONResponse:
    service.check_access(key, model)
    return JSONResponse({"name": model, "ready": not await service.readiness(model)})
