"""Open Inference Protocol v2 (KServe v2 / Triton REST) codec: JSON and binary tensors.

Decoding validates everything a caller can get wrong and raises
:class:`~stealsim.errors.InvalidRequestError` (or PayloadTooLargeError) naming the
problem; it never touches the model. Binary bodies are decoded zero-copy with
``numpy.frombuffer``; only the small JSON header goes through a JSON parser.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from stealsim.errors import InvalidRequestError, PayloadTooLargeError
from stealsim.wire import HEADER_LENGTH

__all__ = [
    "HEADER_LENGTH",
    "INPUT_NAME",
    "DecodedRequest",
    "Output",
    "decode_infer_request",
    "encode_infer_response",
    "json_bytes",
]

INPUT_NAME = "input"
_FP32 = np.dtype("<f4")


@dataclass(frozen=True)
class DecodedRequest:
    """A validated inference request: float32 pixels ``[N, C, H, W]`` in [0, 1]."""

    images: np.ndarray
    request_id: str | None
    binary_output: bool
    requested_outputs: tuple[str, ...]


@dataclass(frozen=True)
class Output:
    """One output tensor of a response."""

    name: str
    datatype: str
    values: np.ndarray


def json_bytes(content: Any) -> bytes:
    return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def _parse_header(raw: bytes) -> dict[str, Any]:
    try:
        header = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        try:
            # Python's json (and clients built on it) write NaN / Infinity, which orjson refuses:
            # parse them so that the pixel check can name the problem.
            header = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            # RecursionError: nested deeper than Python's json can follow (orjson stops at 1024).
            raise InvalidRequestError(f"malformed JSON in the request: {exc}") from exc
    if not isinstance(header, dict):
        raise InvalidRequestError("the request must be a JSON object with an 'inputs' list")
    return header


def _one_input(header: dict[str, Any]) -> dict[str, Any]:
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InvalidRequestError(f"'inputs' must be a list of exactly one tensor named {INPUT_NAME!r}")
    tensor: dict[str, Any] = inputs[0]
    if tensor.get("name") != INPUT_NAME:
        raise InvalidRequestError(f"unknown input {tensor.get('name')!r}; the model's input is {INPUT_NAME!r}")
    if tensor.get("datatype") != "FP32":
        raise InvalidRequestError(f"input datatype {tensor.get('datatype')!r} is not accepted; use 'FP32'")
    return tensor


def _check_shape(tensor: dict[str, Any], image_shape: tuple[int, ...], max_images: int) -> int:
    shape = tensor.get("shape")
    expected = f"[N, {', '.join(map(str, image_shape))}]"
    if (
        not isinstance(shape, list)
        or len(shape) != 1 + len(image_shape)
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)
    ):
        raise InvalidRequestError(f"input shape {shape!r} does not match the model's {expected}")
    if tuple(shape[1:]) != tuple(image_shape) or shape[0] < 1:
        raise InvalidRequestError(f"input shape {shape} does not match the model's {expected} (N >= 1)")
    if shape[0] > max_images:
        raise PayloadTooLargeError(
            f"{shape[0]} images in one request; at most {max_images} are accepted",
            max_images_per_request=max_images,
        )
    return int(shape[0])


def _check_pixels(images: np.ndarray) -> None:
    # min/max propagate NaN, so two reductions check finiteness and range together.
    low, high = float(images.min()), float(images.max())
    if low >= 0.0 and high <= 1.0:
        return
    if not np.isfinite(images).all():
        raise InvalidRequestError("input holds NaN or infinite values; pixels must be finite")
    raise InvalidRequestError(
        f"pixels must lie within [0, 1]; got values from {low:g} to {high:g} (not clipped: rejected)"
    )


def _flag(parameters: dict[str, Any], name: str) -> bool:
    """A boolean parameter: JSON true or false (absent: false); a string or number is refused."""
    value = parameters.get(name, False)
    if not isinstance(value, bool):
        raise InvalidRequestError(f"{name!r} must be true or false, got {value!r:.100}")
    return value


def _output_request(header: dict[str, Any]) -> tuple[bool, tuple[str, ...]]:
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidRequestError("'parameters' must be a JSON object")
    binary = _flag(parameters, "binary_data_output")
    outputs = header.get("outputs") or []
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise InvalidRequestError("'outputs' must be a list of objects with a 'name'")
    names = []
    for output in outputs:
        names.append(str(output.get("name")))
        output_parameters = output.get("parameters") or {}
        if not isinstance(output_parameters, dict):
            raise InvalidRequestError("an output's 'parameters' must be a JSON object")
        if _flag(output_parameters, "binary_data"):
            binary = True
    return binary, tuple(names)


def decode_infer_request(
    body: bytes, header_length: int | None, image_shape: tuple[int, ...], max_images: int
) -> DecodedRequest:
    """Decode a JSON (``header_length`` None) or binary-extension inference body.

    Raises:
        InvalidRequestError: malformed JSON or header, wrong datatype, shape or data
            length, NaN/Inf or pixels outside [0, 1], header length beyond the body.
        PayloadTooLargeError: more than ``max_images`` images.
    """
    if header_length is None:
        header = _parse_header(body)
    else:
        if header_length < 0 or header_length > len(body):
            raise InvalidRequestError(
                f"{HEADER_LENGTH} is {header_length} but the body has only {len(body)} bytes"
            )
        header = _parse_header(body[:header_length])
    tensor = _one_input(header)
    count = _check_shape(tensor, image_shape, max_images)
    values_per_image = int(np.prod(image_shape))
    expected = count * values_per_image
    parameters = tensor.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidRequestError("input 'parameters' must be a JSON object")
    if "binary_data_size" in parameters:
        if header_length is None:
            raise InvalidRequestError(
                f"input has binary_data_size but the request has no {HEADER_LENGTH} header"
            )
        size = parameters["binary_data_size"]
        if not isinstance(size, int) or size != expected * 4:
            raise InvalidRequestError(
                f"binary_data_size {size!r} does not match shape {tensor['shape']} "
                f"({expected * 4} bytes of FP32)"
            )
        if header_length + size != len(body):
            raise InvalidRequestError(
                f"header ({header_length} bytes) + binary_data_size ({size} bytes) != body "
                f"({len(body)} bytes)"
            )
        flat = np.frombuffer(body, dtype=_FP32, count=expected, offset=header_length)
    else:
        data = tensor.get("data")
        if data is None:
            raise InvalidRequestError("input has neither 'data' nor parameters.binary_data_size")
        if header_length is not None and header_length != len(body):
            raise InvalidRequestError("binary body after the header but no binary_data_size")
        try:
            flat = np.asarray(data, dtype=np.float32).reshape(-1)
        except (ValueError, TypeError, OverflowError) as exc:
            # OverflowError: an integer too large for float32 (JSON integers have no size limit).
            raise InvalidRequestError(f"input 'data' must be a (flat) list of numbers: {exc}") from exc
        if flat.size != expected:
            raise InvalidRequestError(
                f"input 'data' has {flat.size} values; shape {tensor['shape']} needs {expected}"
            )
    images = flat.reshape(count, *image_shape)
    _check_pixels(images)
    binary_output, requested = _output_request(header)
    request_id = header.get("id")
    return DecodedRequest(images, None if request_id is None else str(request_id), binary_output, requested)


def encode_infer_response(
    model_name: str,
    request_id: str | None,
    outputs: list[Output],
    binary: bool,
    parameters: dict[str, Any],
) -> tuple[bytes, dict[str, str]]:
    """Encode a response; returns ``(body, extra headers)``.

    Binary: a JSON header whose outputs carry ``parameters.binary_data_size``, then
    each output's little-endian bytes, and an ``Inference-Header-Content-Length`` header.
    """
    head: dict[str, Any] = {"model_name": model_name, "model_version": "1"}
    if request_id is not None:
        head["id"] = request_id
    described = []
    blobs = []
    for output in outputs:
        entry: dict[str, Any] = {
            "name": output.name, "datatype": output.datatype, "shape": list(output.values.shape),
        }
        if binary:
            blob = np.ascontiguousarray(output.values).astype(output.values.dtype.newbyteorder("<"), copy=False)
            blobs.append(blob.tobytes())
            entry["parameters"] = {"binary_data_size": len(blobs[-1])}
        else:
            entry["data"] = np.ascontiguousarray(output.values).reshape(-1)
        described.append(entry)
    head["outputs"] = described
    head["parameters"] = parameters
    header = json_bytes(head)
    if not binary:
        return header, {}
    return header + b"".join(blobs), {HEADER_LENGTH: str(len(header))}
