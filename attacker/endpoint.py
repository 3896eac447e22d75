"""What the client learns about an Open Inference Protocol endpoint, and how it talks to it.

:func:`negotiate` turns the server metadata (``GET /v2``), the model metadata
(``GET /v2/models/{model}``) and what the user says (:class:`EndpointOptions`,
the ``stealsim attack`` flags) into an :class:`Endpoint`: the wire format, the
input tensor to send, the output tensor to ask for and check, and the
:class:`~attacker.victims.VictimInfo` the attacks see. It is pure (dicts in,
dataclass out), so every rule below is tested on fixed metadata.

Every field follows one precedence: **the user's flag, then the metadata, then
the default**. A flag that contradicts the metadata wins, and
:meth:`Endpoint.describe` (logged at negotiation) names it.

- **wire**: ``--wire``; else ``binary`` (the binary tensor extension) when the
  server advertises ``binary_tensor_data`` in ``GET /v2`` ``extensions``, else ``json``.
- **input**: the first declared input: its name, datatype (FP16, FP32, FP64) and
  shape, batch dimension first. ``[-1, C, H, W]`` is an image; ``[-1, H, W]`` a
  one-channel image; ``[-1, D]`` a flat vector. ``--input-shape`` names the image
  the attacks see; the tensor is sent in the declared layout when it holds as
  many values, else (or with no or variable declared dimensions) in the
  ``--input-shape`` layout. Without the flag a flat ``D`` is attacked as
  ``(1, s, s)`` when ``D = s*s`` or ``(3, s, s)`` when ``D = 3*s*s``.
- **pixel range**: ``--input-range``, else ``parameters.pixel_range``, else
  ``[0, 1]``. The attacks always work in [0, 1]; the client rescales.
- **output**: ``--output-name``, else the first declared output; requested by
  name. The answer must carry that name, and it is checked against the
  declaration of that name (none when ``--output-name`` names an undeclared
  output).
- **kind**: ``--output-kind``, else stealsim's ``parameters.output_kind``, else
  ``label`` for a declared integer datatype and ``probabilities`` otherwise.
  ``logits`` are turned into probabilities with a softmax on the client; rows
  given as logits that already sum to 1 get one warning (they look like
  probabilities, which a softmax flattens).
- **classes**: ``--num-classes``, else ``parameters.num_classes``, else the
  declared output's last dimension (for labels only when it is above 1: a
  declared ``[-1, 1]`` or ``[-1]`` says nothing about the classes).
- **datatype**: an answer in another float width than declared (MLServer
  declares FP64 ``predict_proba`` and answers FP32) is read, with one warning.
  An integer answer where floats are declared, or the reverse, is refused
  naming ``--output-kind`` unless that flag was given; an answer shape other
  than the declared one is refused naming ``--output-kind`` and
  ``--num-classes`` unless one of them was given. With the flags, the kind's
  own checks decide (labels whole and in ``[0, K)``, scores ``[N, K]`` finite,
  probabilities summing to 1).
- **metering**: ``server`` (reconciled with ``GET /v1/usage``) when the server
  advertises ``stealsim_metering``, else ``client`` (counted by the attacker alone).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
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

logger = logging.getLogger(__name__)

BINARY_EXTENSION = "binary_tensor_data"
METERING_EXTENSION = "stealsim_metering"

Wire = Literal["auto", "json", "binary"]
AnswerKind = Literal["probabilities", "logits", "label"]

ROUNDED_SUM_SLACK = 0.5
"""How far from 1 a row of probabilities, each in [0, 1], may sum and still read as probabilities
(rounded or truncated by the API, e.g. 10 classes rounded to 2 decimals are off by up to 0.05)."""
FLOAT_TYPES = {"FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}
"""Input datatypes the client sends, with their little-endian numpy types."""
ANSWER_TYPES = {**FLOAT_TYPES, "INT32": "<i4", "INT64": "<i8", "INT16": "<i2", "INT8": "<i1",
                "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8"}
"""Output datatypes the client decodes."""


@dataclass(frozen=True)
class EndpointOptions:
    """What the user says about the endpoint: each field given wins over the metadata.

    Every field is optional; ``None`` means "from the metadata, else the default".
    """

    wire: Wire = "auto"
    input_shape: tuple[int, ...] | None = None
    """Per-example shape: ``C,H,W`` or ``H,W`` (an image), or ``D`` (flat)."""
    input_range: tuple[float, float] | None = None
    output_kind: AnswerKind | None = None
    num_classes: int | None = None
    output_name: str | None = None
    """The output to request (e.g. MLServer's ``predict_proba``), whatever the metadata declares."""


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
    """The requested output's declared datatype (``None``: not declared)."""
    output_shape: tuple[int, ...] | None
    """The requested output's declared per-example shape (``-1``: any; ``None``: not declared)."""
    answer_kind: AnswerKind
    metering: Literal["server", "client"]
    info: VictimInfo
    server: str
    """Server name and version from ``GET /v2`` (``"unknown"`` if it has no such route)."""
    extensions: tuple[str, ...] = ()
    """The extensions ``GET /v2`` advertises."""
    kind_given: bool = False
    """``--output-kind`` was given: the declared datatype's kind (integer or float) is not enforced."""
    shape_given: bool = False
    """``--output-kind`` or ``--num-classes`` was given: the declared output shape is not enforced."""
    declared_outputs: tuple[str, ...] = ()
    """The output names the metadata declares."""
    overrides: tuple[str, ...] = ()
    """The flags that contradict the metadata, each as one phrase (they win)."""
    _warned: set[str] = field(default_factory=set, compare=False, repr=False)
    """Warnings already logged (each at most once per endpoint)."""

    def describe(self) -> str:
        shape = ", ".join(str(v) for v in self.wire_shape)
        text = (f"{self.server}, model {self.model}: {self.wire} wire, input {self.input_name!r} "
                f"{self.input_datatype} [N, {shape}] in [{self.info.pixel_range[0]:g}, "
                f"{self.info.pixel_range[1]:g}], output {self.output_name or '(default)'!r} as "
                f"{self.answer_kind} over {self.info.num_classes} classes, {self.metering}-side metering")
        return text + (f"; flags over the metadata: {'; '.join(self.overrides)}" if self.overrides else "")

    def warn_once(self, key: str, message: str) -> None:
        """Log ``message`` as a warning the first time ``key`` comes up on this endpoint."""
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("%s", message)


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


def _flag_shape(shape: tuple[int, ...]) -> str:
    return ",".join(str(v) for v in shape)


def _resolve_input(model_meta: dict[str, Any], options: EndpointOptions,
                   overrides: list[str]) -> tuple[str, str, tuple[int, ...], tuple[int, int, int]]:
    """``(name, datatype, wire shape, image shape)`` of the input the attacks feed."""
    inputs = model_meta.get("inputs") or []
    given = options.input_shape
    declared = inputs[0] if inputs else {}
    name = str(declared.get("name") or "input")
    datatype = str(declared.get("datatype") or "FP32").upper()
    shape = [int(v) for v in declared.get("shape") or []]
    declared_wire = tuple(shape[1:]) if len(shape) >= 2 else None
    fixed = declared_wire is not None and all(v > 0 for v in declared_wire)
    if given is not None:
        if fixed and declared_wire is not None and math.prod(declared_wire) == math.prod(given):
            wire_shape = declared_wire  # the metadata's layout on the wire, the flag's image
        else:
            if fixed:
                overrides.append(f"--input-shape {_flag_shape(given)} (sent as [N, {', '.join(map(str, given))}]; "
                                 f"the metadata declares {_shape_text(shape)})")
            wire_shape = tuple(given)
    elif not inputs:
        raise AttackError("the model metadata declares no input; pass --input-shape (e.g. 1,28,28 or 64)")
    elif declared_wire is None:
        raise AttackError(f"the model's input {name!r} has shape {_shape_text(shape)}, with no batch "
                          "dimension and example shape; pass --input-shape")
    elif not fixed:
        raise AttackError(f"the model's input {name!r} has variable dimensions "
                          f"{_shape_text(shape)}; pass --input-shape with {len(declared_wire)} values")
    else:
        wire_shape = declared_wire
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
    return name, datatype, wire_shape, image


def _pixel_range(parameters: dict[str, Any], options: EndpointOptions,
                 overrides: list[str]) -> tuple[float, float]:
    declared = parameters.get("pixel_range")
    if options.input_range is not None:
        low, high = options.input_range
        if declared is not None and tuple(float(v) for v in declared) != (float(low), float(high)):
            overrides.append(f"--input-range {low:g},{high:g} (the metadata declares "
                             f"{float(declared[0]):g},{float(declared[1]):g})")
    else:
        low, high = declared if declared is not None else (0.0, 1.0)
    low, high = float(low), float(high)
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise AttackError(f"pixel range [{low:g}, {high:g}] is not an interval (give --input-range LOW,HIGH)")
    return low, high


def _declared_outputs(model_meta: dict[str, Any]) -> list[dict[str, Any]]:
    return [o for o in model_meta.get("outputs") or [] if isinstance(o, dict)]


def _resolve_output(model_meta: dict[str, Any], options: EndpointOptions,
                    overrides: list[str]) -> tuple[str | None, dict[str, Any] | None]:
    """``(output name to request, its declaration or None)``: ``--output-name`` first, then the first declared."""
    outputs = _declared_outputs(model_meta)
    if options.output_name:
        declared = next((o for o in outputs if o.get("name") == options.output_name), None)
        if declared is None and outputs:
            names = ", ".join(repr(o.get("name")) for o in outputs)
            overrides.append(f"--output-name {options.output_name} (the metadata declares {names})")
        return options.output_name, declared
    if not outputs:
        return None, None
    return (str(outputs[0]["name"]) if outputs[0].get("name") else None), outputs[0]


def _missing_classes(output_name: str | None, declared: dict[str, Any] | None, kind: AnswerKind,
                     model_meta: dict[str, Any]) -> str:
    """Why the number of classes is unknown, naming what the metadata lacks."""
    if kind == "label":
        return ("the answers are class labels, and the metadata does not say how many classes there are "
                "(no parameters.num_classes); pass --num-classes")
    if declared is None:
        if output_name is not None and _declared_outputs(model_meta):
            return (f"the metadata declares no output {output_name!r} to read the number of classes from; "
                    "pass --num-classes")
        return "the metadata declares no output to read the number of classes from; pass --num-classes"
    shape = declared.get("shape")
    return (f"the declared output {output_name!r} has shape {_shape_text(list(shape or []))}, without a fixed "
            "class dimension; pass --num-classes")


def negotiate(server_meta: dict[str, Any] | None, model_meta: dict[str, Any],
              options: EndpointOptions | None = None, model: str = "victim") -> Endpoint:
    """The endpoint the user's options and the metadata describe; :class:`AttackError` naming what is missing.

    A refusal here comes from the metadata alone: its message says that no image was sent.
    """
    try:
        return _negotiate(server_meta, model_meta, options or EndpointOptions(), model)
    except AttackError as exc:
        raise AttackError(f"{exc} (from the metadata alone: no image was sent)") from exc


def _negotiate(server_meta: dict[str, Any] | None, model_meta: dict[str, Any], options: EndpointOptions,
               model: str) -> Endpoint:
    overrides: list[str] = []
    try:
        extensions = [str(e) for e in (server_meta or {}).get("extensions") or []]
        server = (f"{server_meta.get('name', 'server')} {server_meta.get('version', '')}".strip()
                  if server_meta else "unknown")
        parameters = dict(model_meta.get("parameters") or {})
        wire: Literal["json", "binary"]
        wire = ("binary" if BINARY_EXTENSION in extensions else "json") if options.wire == "auto" else options.wire
        input_name, input_datatype, wire_shape, image = _resolve_input(model_meta, options, overrides)
        output_name, declared = _resolve_output(model_meta, options, overrides)
        output_datatype = str(declared["datatype"]).upper() if declared and declared.get("datatype") else None
        output_shape = (tuple(int(v) for v in declared["shape"][1:])
                        if declared and isinstance(declared.get("shape"), list) and declared["shape"] else None)
        if output_datatype is not None and output_datatype not in ANSWER_TYPES:
            raise AttackError(f"the model's output {output_name!r} is {output_datatype}; the client reads "
                              f"{', '.join(ANSWER_TYPES)} (pass --output-name to read another output)")
        declared_kind = parameters.get("output_kind")
        kind = options.output_kind or declared_kind
        if kind is None:
            kind = "label" if output_datatype is not None and output_datatype not in FLOAT_TYPES else "probabilities"
        elif options.output_kind and declared_kind and options.output_kind != declared_kind:
            overrides.append(f"--output-kind {options.output_kind} (the metadata declares {declared_kind})")
        if kind not in ("probabilities", "logits", "label"):
            raise AttackError(f"unknown output kind {kind!r}: choose probabilities, logits or label")
        answer_kind = cast(AnswerKind, kind)
        classes = options.num_classes or parameters.get("num_classes")
        if classes is None and output_shape and output_shape[-1] > (1 if answer_kind == "label" else 0):
            classes = output_shape[-1]  # for labels only a declared score dimension, not [-1, 1]
        if classes is None:
            raise AttackError(_missing_classes(output_name, declared, answer_kind, model_meta))
        classes = int(classes)
        if classes < 2:
            raise AttackError(f"a classifier needs at least 2 classes, the endpoint says {classes}")
        if (options.num_classes and answer_kind != "label" and output_shape and output_shape[-1] > 0
                and output_shape[-1] != options.num_classes):
            overrides.append(f"--num-classes {options.num_classes} (the output {output_name!r} is declared "
                             f"{_shape_text([-1, *output_shape])})")
        info = VictimInfo(
            input_shape=image,
            num_classes=classes,
            output_kind="label" if answer_kind == "label" else "probabilities",
            pixel_range=_pixel_range(parameters, options, overrides),
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
        kind_given=options.output_kind is not None,
        shape_given=options.output_kind is not None or options.num_classes is not None,
        declared_outputs=tuple(str(o.get("name")) for o in _declared_outputs(model_meta) if o.get("name")),
        overrides=tuple(overrides),
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


def _family(datatype: str) -> str:
    return "float" if datatype in FLOAT_TYPES else "integer"


def _missing_output(endpoint: Endpoint, outputs: list[dict[str, Any]]) -> VictimAPIError:
    """The requested output is not in the answer: name what is, and the flags that read it."""
    names = ", ".join(repr(o.get("name")) for o in outputs) or "no output"
    source = " (--output-name)" if endpoint.output_name not in endpoint.declared_outputs else " (from the metadata)"
    hint = ""
    if len(outputs) == 1 and outputs[0].get("name"):
        other = str(outputs[0]["name"])
        hint = f"; pass --output-name {other}"
        shape = outputs[0].get("shape")
        if other not in endpoint.declared_outputs and isinstance(shape, list) and len(shape) == 2:
            hint += f" --num-classes {shape[1]}"
    return _mismatch(endpoint, f"asked for output {endpoint.output_name!r}{source}, the answer holds {names}{hint}")


def _check_declaration(endpoint: Endpoint, name: object, datatype: str, shape: tuple[int, ...]) -> None:
    """The answer against the requested output's declaration, unless a flag overrides it (see the module)."""
    declared = endpoint.output_datatype
    if declared is not None and datatype != declared:
        if _family(datatype) == _family(declared):
            endpoint.warn_once("width", f"model {endpoint.model!r}: output {name!r} came back {datatype}, the "
                                        f"metadata declares {declared}: read as sent ({_family(datatype)}s "
                                        "of another width)")
        elif not endpoint.kind_given:
            hint = ("if these are class labels, pass --output-kind label" if _family(datatype) == "integer"
                    else "if these are scores, pass --output-kind probabilities or logits")
            raise _mismatch(endpoint, f"output {name!r} came back {datatype} {_shape_text(list(shape))}, the "
                                      f"metadata declares {declared}; {hint}")
    expected = endpoint.output_shape
    if expected is not None and not endpoint.shape_given and (
            len(expected) != len(shape) - 1
            or any(d not in (-1, s) for d, s in zip(expected, shape[1:], strict=False))):
        raise _mismatch(endpoint, f"output {name!r} came back {_shape_text(list(shape))}, the metadata declares "
                                  f"{_shape_text([-1, *expected])}; if the answer is right, pass --output-kind "
                                  "(label, probabilities or logits) and --num-classes to read it")


def decode_answer(endpoint: Endpoint, raw: bytes, header_length: str | None, count: int) -> Tensor:
    """Probabilities ``[N, K]`` (float32) or labels ``[N]`` (int64) from one response body.

    Checks the output's name, datatype and shape against the metadata (as far as
    the flags leave it, see the module docstring), and the values against the
    output kind (finite probabilities summing to 1, labels in ``[0, K)``); a
    mismatch raises :class:`VictimAPIError` naming it and the flag that reads it.
    """
    try:
        offset = int(header_length) if header_length is not None else len(raw)
        header = json.loads(raw[:offset])
        outputs = header["outputs"]
        chosen = next((o for o in outputs if o.get("name") == endpoint.output_name), None) \
            if endpoint.output_name else outputs[0]
        if chosen is None:
            raise _missing_output(endpoint, outputs)
        datatype = str(chosen["datatype"]).upper()
        shape = tuple(int(v) for v in chosen["shape"])
        if datatype not in ANSWER_TYPES:
            raise _mismatch(endpoint, f"output {chosen.get('name')!r} is {datatype}, not a number type")
        _check_declaration(endpoint, chosen.get("name"), datatype, shape)
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
    classes = endpoint.info.num_classes
    if endpoint.answer_kind == "label":
        if values.ndim == 2 and values.shape[1] == 1:
            values = values[:, 0]
        if values.ndim != 1:
            raise _mismatch(endpoint, f"labels must be [N] or [N, 1], got {_shape_text(list(shape))} "
                                      "(pass --output-kind probabilities or logits if these are scores)")
        if values.dtype.kind == "f" and not (np.all(np.isfinite(values)) and np.all(values == np.round(values))):
            raise _mismatch(endpoint, "labels are not whole numbers (pass --output-kind probabilities or logits "
                                      "if these are scores)")
        labels = torch.from_numpy(values.astype(np.int64))
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
            raise _mismatch(endpoint, f"labels outside [0, {classes}) (pass --num-classes if there are more)")
        return labels
    if values.dtype.kind not in "f":
        raise _mismatch(endpoint, f"{endpoint.answer_kind} must be floating point, got {datatype} "
                                  "(pass --output-kind label if these are class labels)")
    if values.ndim != 2 or values.shape[1] != classes:
        raise _mismatch(endpoint, f"{endpoint.answer_kind} must be [N, {classes}], got {_shape_text(list(shape))}"
                                  " (pass --num-classes to read another number of classes)")
    scores = values.astype(np.float32)  # a copy: the buffer is the response's (numpy: cheaper checks)
    if not np.isfinite(scores).all():
        raise _mismatch(endpoint, "the answer holds NaN or infinite values")
    tolerance = 1e-2 if datatype == "FP16" else 1e-3
    sums = scores.sum(axis=1)
    in_range = bool(((scores >= -tolerance) & (scores <= 1 + tolerance)).all())
    rows_are_probabilities = in_range and bool((np.abs(sums - 1) <= tolerance).all())
    # Rounded or truncated probabilities (an API's output defense, e.g. our `round` step) are
    # probabilities too: each in [0, 1], their rows off 1 by at most half of 1.
    rounded = in_range and not rows_are_probabilities and bool((np.abs(sums - 1) <= ROUNDED_SUM_SLACK).all())
    if endpoint.answer_kind == "logits":
        if rows_are_probabilities:
            endpoint.warn_once("logits-sum-to-1", f"model {endpoint.model!r}: the answers read as logits already "
                                                  "sum to 1 in every row: they look like probabilities, which a "
                                                  "softmax flattens; pass --output-kind probabilities if they are")
        return torch.softmax(torch.from_numpy(scores), dim=1)
    if rounded:
        endpoint.warn_once("rounded-probabilities", f"model {endpoint.model!r}: answer rows sum to "
                                                    f"{float(sums.min()):.4g}..{float(sums.max()):.4g}, not 1: "
                                                    "read as rounded probabilities, used as served")
    elif not rows_are_probabilities:
        worst = int(np.argmax(np.abs(sums - 1)))
        raise _mismatch(endpoint, f"rows do not sum to 1 (e.g. {float(sums[worst]):.4g}): these are not "
                                  "probabilities; pass --output-kind logits (or label)")
    return torch.from_numpy(scores)
