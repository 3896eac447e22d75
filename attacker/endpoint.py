"""What the client learns about an Open Inference Protocol endpoint, and how it talks to it.

:func:`negotiate` turns the server metadata (``GET /v2``), the model metadata
(``GET /v2/models/{model}``) and what the user says (:class:`EndpointOptions`,
the ``stealsim attack`` flags) into an :class:`Endpoint`: the wire format, the
input tensor to send, the output tensor to ask for and check, and the
:class:`~attacker.victims.VictimInfo` the attacks see. It is pure (dicts in,
dataclass out), so every rule below is tested on fixed metadata.

The rules, in order of precedence (user flag, then metadata, then default):

- **wire**: ``binary`` (the binary tensor extension) when the server advertises
  ``binary_tensor_data`` in ``GET /v2`` ``extensions``, else ``json``;
  ``--wire`` forces one.
- **input**: the first declared input: its name, datatype (FP16, FP32, FP64) and
  shape, batch dimension first. ``[-1, C, H, W]`` is an image; ``[-1, H, W]`` a
  one-channel image; ``[-1, D]`` a flat vector, attacked as the image
  ``--input-shape`` names (same number of values), else as ``(1, s, s)`` when
  ``D = s*s`` or ``(3, s, s)`` when ``D = 3*s*s``. With no declared input,
  ``--input-shape`` is also the shape sent.
- **pixel range**: ``parameters.pixel_range``, else ``--input-range``, else
  ``[0, 1]``. The attacks always work in [0, 1]; the client rescales.
- **output**: the first declared output, requested by name; the answer's name,
  datatype and shape must match the declaration. Its kind: stealsim's
  ``parameters.output_kind``, else ``--output-kind``, else ``label`` for an
  integer datatype and ``probabilities`` for a float one. ``logits`` are turned
  into probabilities with a softmax on the client.
- **classes**: ``parameters.num_classes``, else the declared output's last
  dimension, else ``--num-classes``.
- **metering**: ``server`` (reconciled with ``GET /v1/usage``) when the server
  advertises ``stealsim_metering``, else ``client`` (counted by the attacker alone).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np
import torch
from torch import Tensor

from attacker.victims import VictimInfo
from stealsim.errors import AttackError, VictimAPIError
from stealsim.wire import BINARY_CONTENT_TYPE, HEADER_LENGTH, JSON_CONTENT_TYPE

__all__ = [
    "BINARY_EXTENSION",
    "METERING_EXTENSION",
    "AnswerKind",
    "Endpoint",
    "EndpointOptions",
    "Wire",
    "decode_answer",
    "encode_request",
    "image_shape_for",
    "negotiate",
]

BINARY_EXTENSION = "binary_tensor_data"
METERING_EXTENSION = "stealsim_metering"

Wire = Literal["auto", "json", "binary"]
AnswerKind = Literal["probabilities", "logits", "label"]

FLOAT_TYPES = {"FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}
"""Input datatypes the client sends, with their little-endian numpy types."""
ANSWER_TYPES = {**FLOAT_TYPES, "INT32": "<i4", "INT64": "<i8", "INT16": "<i2", "INT8": "<i1",
                "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8"}
"""Output datatypes the client decodes."""


@dataclass(frozen=True)
class EndpointOptions:
    """What the user says about the endpoint, where its metadata is silent (or wrong).

    Every field is optional; ``None`` means "from the metadata, else the default".
    """

    wire: Wire = "auto"
    input_shape: tuple[int, ...] | None = None
    """Per-example shape: ``C,H,W`` or ``H,W`` (an image), or ``D`` (flat, sent as is)."""
    input_range: tuple[float, float] | None = None
    output_kind: AnswerKind | None = None
    num_classes: int | None = None
    output_name: str | None = None
    """The output to request when the metadata declares none (e.g. MLServer's ``predict_proba``)."""


@dataclass(frozen=True)
class Endpoint:
    """The negotiated endpoint: how to send images and read answers."""

    model: str
    wire: Literal["json", "binary"]
    input_name: str
    input_datatype: str
    wire_shape: tuple[int, ...]
    """Per-example shape sent (without the batch dimension)."""
    output_name: str | None
    """The output requested by name (``None``: the server's default output)."""
    output_datatype: str | None
    """Declared output datatype, checked on every answer (``None``: not declared)."""
    output_shape: tuple[int, ...] | None
    """Declared per-example output shape (``-1``: any), checked on every answer."""
    answer_kind: AnswerKind
    metering: Literal["server", "client"]
    info: VictimInfo
    server: str
    """Server name and version from ``GET /v2`` (``"unknown"`` if it has no such route)."""
    extensions: tuple[str, ...] = ()
    """The extensions ``GET /v2`` advertises."""

    def describe(self) -> str:
        shape = ", ".join(str(v) for v in self.wire_shape)
        return (f"{self.server}, model {self.model}: {self.wire} wire, input {self.input_name!r} "
                f"{self.input_datatype} [N, {shape}] in [{self.info.pixel_range[0]:g}, "
                f"{self.info.pixel_range[1]:g}], output {self.output_name or '(default)'!r} as "
                f"{self.answer_kind} over {self.info.num_classes} classes, {self.metering}-side metering")


def image_shape_for(shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    """The image ``(C, H, W)`` a per-example shape stands for, or ``None`` if it cannot be told.

    ``(C, H, W)`` as is, ``(H, W)`` as one channel, ``(D,)`` as ``(1, s, s)`` when
    ``D = s*s`` or ``(3, s, s)`` when ``D = 3*s*s``.
    """
    if any(v <= 0 for v in shape):
        return None
    if len(shape) == 3:
        return (shape[0], shape[1], shape[2])
    if len(shape) == 2:
        return (1, shape[0], shape[1])
    if len(shape) == 1:
        for channels in (1, 3):
            side = math.isqrt(shape[0] // channels)
            if channels * side * side == shape[0]:
                return (channels, side, side)
    return None


def _shape_text(shape: tuple[int, ...] | list[int]) -> str:
    return "[" + ", ".join(str(v) for v in shape) + "]"


def _resolve_input(model_meta: dict[str, Any], options: EndpointOptions) -> tuple[str, str, tuple[int, ...],
                                                                                  tuple[int, int, int]]:
    """``(name, datatype, wire shape, image shape)`` of the input the attacks feed."""
    inputs = model_meta.get("inputs") or []
    given = options.input_shape
    if not inputs:
        if given is None:
            raise AttackError("the model metadata declares no input; pass --input-shape (e.g. 1,28,28 or 64)")
        name, datatype, wire_shape = "input", "FP32", tuple(given)
    else:
        declared = inputs[0]
        name = str(declared.get("name") or "input")
        datatype = str(declared.get("datatype") or "FP32").upper()
        shape = [int(v) for v in declared.get("shape") or []]
        if len(shape) < 2:
            if given is None:
                raise AttackError(f"the model's input {name!r} has shape {_shape_text(shape)}, with no batch "
                                  "dimension and example shape; pass --input-shape")
            wire_shape = tuple(given)
        else:
            wire_shape = tuple(shape[1:])
            if -1 in wire_shape or any(v == 0 for v in wire_shape):
                if given is None or len(given) != len(wire_shape):
                    raise AttackError(f"the model's input {name!r} has variable dimensions "
                                      f"{_shape_text(shape)}; pass --input-shape with {len(wire_shape)} values")
                wire_shape = tuple(given)
    if datatype not in FLOAT_TYPES:
        raise AttackError(f"the model's input {name!r} is {datatype}; the attacks send images as "
                          f"{', '.join(FLOAT_TYPES)} only")
    if any(v <= 0 for v in wire_shape):
        raise AttackError(f"input shape {_shape_text(wire_shape)} has a dimension below 1")
    values = math.prod(wire_shape)
    image = image_shape_for(tuple(given)) if given is not None else image_shape_for(wire_shape)
    if image is None:
        raise AttackError(f"the model's input {name!r} takes {_shape_text(wire_shape)} per example, which is not "
                          "an image shape the attacks can tell; pass --input-shape C,H,W "
                          f"with C*H*W = {values}")
    if math.prod(image) != values:
        raise AttackError(f"--input-shape {','.join(map(str, given or ()))} holds {math.prod(image)} values; "
                          f"the model's input {name!r} takes {values} ({_shape_text(wire_shape)})")
    return name, datatype, wire_shape, image


def _pixel_range(parameters: dict[str, Any], options: EndpointOptions) -> tuple[float, float]:
    if options.input_range is not None:
        low, high = options.input_range
    else:
        low, high = parameters.get("pixel_range", (0.0, 1.0))
    low, high = float(low), float(high)
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise AttackError(f"pixel range [{low:g}, {high:g}] is not an interval (give --input-range LOW,HIGH)")
    return low, high


def negotiate(server_meta: dict[str, Any] | None, model_meta: dict[str, Any],
              options: EndpointOptions | None = None, model: str = "victim") -> Endpoint:
    """The endpoint the metadata and the user's options describe; :class:`AttackError` naming what is missing."""
    options = options or EndpointOptions()
    try:
        extensions = [str(e) for e in (server_meta or {}).get("extensions") or []]
        server = (f"{server_meta.get('name', 'server')} {server_meta.get('version', '')}".strip()
                  if server_meta else "unknown")
        parameters = dict(model_meta.get("parameters") or {})
        wire: Literal["json", "binary"]
        wire = ("binary" if BINARY_EXTENSION in extensions else "json") if options.wire == "auto" else options.wire
        input_name, input_datatype, wire_shape, image = _resolve_input(model_meta, options)
        outputs = model_meta.get("outputs") or []
        declared = outputs[0] if outputs else {}
        output_name = str(declared["name"]) if declared.get("name") else options.output_name
        output_datatype = str(declared["datatype"]).upper() if declared.get("datatype") else None
        output_shape = (tuple(int(v) for v in declared["shape"][1:])
                        if isinstance(declared.get("shape"), list) and declared["shape"] else None)
        if output_datatype is not None and output_datatype not in ANSWER_TYPES:
            raise AttackError(f"the model's output {output_name!r} is {output_datatype}; "
                              f"the client reads {', '.join(ANSWER_TYPES)}")
        kind = options.output_kind or parameters.get("output_kind")
        if kind == "label" or (kind is None and output_datatype is not None and output_datatype not in FLOAT_TYPES):
            answer_kind: AnswerKind = "label"
        else:
            answer_kind = cast(AnswerKind, kind or "probabilities")
        if answer_kind not in ("probabilities", "logits", "label"):
            raise AttackError(f"unknown output kind {answer_kind!r}: choose probabilities, logits or label")
        classes = options.num_classes or parameters.get("num_classes")
        if classes is None and answer_kind != "label" and output_shape and output_shape[-1] > 0:
            classes = output_shape[-1]
        if classes is None:
            raise AttackError(f"the number of classes is not in the metadata (output {output_name!r} "
                              f"{_shape_text(list(output_shape or ()))}); pass --num-classes")
        classes = int(classes)
        if classes < 2:
            raise AttackError(f"a classifier needs at least 2 classes, the endpoint says {classes}")
        info = VictimInfo(
            input_shape=image,
            num_classes=classes,
            output_kind="label" if answer_kind == "label" else "probabilities",
            pixel_range=_pixel_range(parameters, options),
            max_images_per_request=int(parameters.get("max_images_per_request", 1024)),
            name=str(model_meta.get("name", model)),
        )
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise AttackError(f"the model metadata of {model!r} is not understood: {exc!r}") from exc
    return Endpoint(
        model=model, wire=wire, input_name=input_name, input_datatype=input_datatype, wire_shape=wire_shape,
        output_name=output_name, output_datatype=output_datatype, output_shape=output_shape,
        answer_kind=answer_kind, metering="server" if METERING_EXTENSION in extensions else "client",
        info=info, server=server, extensions=tuple(extensions),
    )


# -- one request ----------------------------------------------------------------------------------


def encode_request(endpoint: Endpoint, images: Tensor) -> tuple[bytes, dict[str, str]]:
    """The body and headers of one inference request for ``images`` ``[N, C, H, W]`` in [0, 1]."""
    if images.dim() != 4 or tuple(images.shape[1:]) != endpoint.info.input_shape:
        raise AttackError(f"images of shape {tuple(images.shape)} do not fit the victim's input "
                          f"[N, {', '.join(map(str, endpoint.info.input_shape))}]")
    low, high = endpoint.info.pixel_range
    pixels = images.detach().to("cpu", torch.float64 if endpoint.input_datatype == "FP64" else torch.float32)
    if (low, high) != (0.0, 1.0):
        pixels = low + pixels * (high - low)
    array = np.ascontiguousarray(pixels.numpy().reshape(len(pixels), *endpoint.wire_shape),
                                 dtype=FLOAT_TYPES[endpoint.input_datatype])
    tensor: dict[str, Any] = {"name": endpoint.input_name, "shape": list(array.shape),
                              "datatype": endpoint.input_datatype}
    output: dict[str, Any] = {"name": endpoint.output_name} if endpoint.output_name else {}
    if endpoint.wire == "json":
        tensor["data"] = array.reshape(-1).tolist()
        body: dict[str, Any] = {"inputs": [tensor]}
        if output:
            body["outputs"] = [output]
        return json.dumps(body).encode(), {"Content-Type": JSON_CONTENT_TYPE}
    payload = array.tobytes()
    tensor["parameters"] = {"binary_data_size": len(payload)}
    if output:
        output["parameters"] = {"binary_data": True}
    header = json.dumps({"inputs": [tensor], **({"outputs": [output]} if output else {})}).encode()
    return header + payload, {"Content-Type": BINARY_CONTENT_TYPE, HEADER_LENGTH: str(len(header))}


def _mismatch(endpoint: Endpoint, message: str) -> VictimAPIError:
    return VictimAPIError(f"the answer of model {endpoint.model!r} does not match its metadata: {message}",
                          status=200, code="output_mismatch")


def decode_answer(endpoint: Endpoint, raw: bytes, header_length: str | None, count: int) -> Tensor:
    """Probabilities ``[N, K]`` (float32) or labels ``[N]`` (int64) from one response body.

    Checks the output's name, datatype and shape against the metadata, and the
    values against the output kind (finite probabilities summing to 1, labels in
    ``[0, K)``); a mismatch raises :class:`VictimAPIError` naming it.
    """
    try:
        offset = int(header_length) if header_length is not None else len(raw)
        header = json.loads(raw[:offset])
        outputs = header["outputs"]
        chosen = next((o for o in outputs if o.get("name") == endpoint.output_name), None) \
            if endpoint.output_name else outputs[0]
        if chosen is None:
            names = ", ".join(repr(o.get("name")) for o in outputs)
            raise _mismatch(endpoint, f"asked for output {endpoint.output_name!r}, got {names}")
        datatype = str(chosen["datatype"]).upper()
        shape = tuple(int(v) for v in chosen["shape"])
        if endpoint.output_datatype is not None and datatype != endpoint.output_datatype:
            raise _mismatch(endpoint, f"output {chosen.get('name')!r} came back {datatype} "
                                      f"{_shape_text(list(shape))}, the metadata declares {endpoint.output_datatype}")
        if datatype not in ANSWER_TYPES:
            raise _mismatch(endpoint, f"output {chosen.get('name')!r} is {datatype}, not a number type")
        if "data" in chosen:
            values = np.asarray(chosen["data"], dtype=ANSWER_TYPES[datatype])
        else:
            size = int(chosen["parameters"]["binary_data_size"])
            start = offset + sum(int(o["parameters"]["binary_data_size"]) for o in outputs[: outputs.index(chosen)]
                                 if "data" not in o)
            values = np.frombuffer(raw[start: start + size], dtype=ANSWER_TYPES[datatype])
        values = values.reshape(shape)
    except VictimAPIError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, StopIteration, json.JSONDecodeError) as exc:
        raise VictimAPIError(f"cannot decode the answer of model {endpoint.model!r}: {exc!r}", status=200) from exc
    if not shape or shape[0] != count:
        raise _mismatch(endpoint, f"{shape[0] if shape else 0} answers for {count} images")
    declared = endpoint.output_shape
    if declared is not None and (len(declared) != len(shape) - 1
                                 or any(d not in (-1, s) for d, s in zip(declared, shape[1:], strict=False))):
        raise _mismatch(endpoint, f"output {chosen.get('name')!r} came back {_shape_text(list(shape))}, "
                                  f"the metadata declares {_shape_text([-1, *declared])}")
    classes = endpoint.info.num_classes
    if endpoint.answer_kind == "label":
        if values.ndim == 2 and values.shape[1] == 1:
            values = values[:, 0]
        if values.ndim != 1:
            raise _mismatch(endpoint, f"labels must be [N] or [N, 1], got {_shape_text(list(shape))} "
                                      "(pass --output-kind probabilities or logits if these are scores)")
        if values.dtype.kind == "f" and not (np.all(np.isfinite(values)) and np.all(values == np.round(values))):
            raise _mismatch(endpoint, "labels are not whole numbers")
        labels = torch.from_numpy(values.astype(np.int64))
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
            raise _mismatch(endpoint, f"labels outside [0, {classes})")
        return labels
    if values.dtype.kind not in "f":
        raise _mismatch(endpoint, f"{endpoint.answer_kind} must be floating point, got {datatype} "
                                  "(pass --output-kind label if these are class labels)")
    if values.ndim != 2 or values.shape[1] != classes:
        raise _mismatch(endpoint, f"{endpoint.answer_kind} must be [N, {classes}], got {_shape_text(list(shape))}")
    scores = values.astype(np.float32)  # a copy: the buffer is the response's (numpy: cheaper checks)
    if not np.isfinite(scores).all():
        raise _mismatch(endpoint, "the answer holds NaN or infinite values")
    if endpoint.answer_kind == "logits":
        return torch.softmax(torch.from_numpy(scores), dim=1)
    tolerance = 1e-2 if datatype == "FP16" else 1e-3
    sums = scores.sum(axis=1)
    if (scores < -tolerance).any() or (np.abs(sums - 1) > tolerance).any():
        raise _mismatch(endpoint, f"rows do not sum to 1 (e.g. {float(sums[0]):.4g}): these are not "
                                  "probabilities; pass --output-kind logits (or label)")
    return torch.from_numpy(scores)
