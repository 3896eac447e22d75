"""The endpoint negotiation rules and one request's encoding and decoding, on fixed metadata
and fixed tensors (attacker/endpoint.py): no server needed."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import numpy as np
import pytest
import torch

from attacker.endpoint import (
    Endpoint,
    EndpointOptions,
    decode_answer,
    encode_request,
    image_shape_for,
    negotiate,
)
from stealsim.errors import AttackError, VictimAPIError

STEALSIM = {"name": "stealsim", "version": "0.1.0",
            "extensions": ["binary_tensor_data", "stealsim_metering", "stealsim_output_policies"]}
PLAIN = {"name": "mlserver", "version": "1.7.1", "extensions": []}


def model(input_shape: list[int], datatype: str = "FP32", outputs: list[dict[str, Any]] | None = None,
          **parameters: Any) -> dict[str, Any]:
    return {"name": "m", "inputs": [{"name": "x", "datatype": datatype, "shape": input_shape}],
            "outputs": outputs if outputs is not None else [{"name": "p", "datatype": "FP32", "shape": [-1, 3]}],
            "parameters": parameters}


def answer(values: np.ndarray, datatype: str, name: str = "p", binary: bool = False) -> tuple[bytes, str | None]:
    output: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(values.shape)}
    if not binary:
        output["data"] = values.reshape(-1).tolist()
        return json.dumps({"outputs": [output]}).encode(), None
    raw = values.tobytes()
    output["parameters"] = {"binary_data_size": len(raw)}
    header = json.dumps({"outputs": [output]}).encode()
    return header + raw, str(len(header))


def test_image_shapes_from_any_rank() -> None:
    assert image_shape_for((3, 32, 32)) == (3, 32, 32)
    assert image_shape_for((28, 28)) == (1, 28, 28)
    assert image_shape_for((784,)) == (1, 28, 28)
    assert image_shape_for((3 * 16 * 16,)) == (3, 16, 16)
    assert image_shape_for((30,)) is None and image_shape_for((-1, 8, 8)) is None


def test_wire_and_metering_follow_the_advertised_extensions() -> None:
    ours = negotiate(STEALSIM, model([-1, 1, 8, 8]))
    assert (ours.wire, ours.metering) == ("binary", "server")
    plain = negotiate(PLAIN, model([-1, 1, 8, 8]))
    assert (plain.wire, plain.metering, plain.server) == ("json", "client", "mlserver 1.7.1")
    assert negotiate(None, model([-1, 1, 8, 8])).server == "unknown"
    assert negotiate(PLAIN, model([-1, 1, 8, 8]), EndpointOptions(wire="binary")).wire == "binary"


def test_inputs_of_rank_2_3_4_and_the_user_shape() -> None:
    assert negotiate(PLAIN, model([-1, 1, 28, 28])).info.input_shape == (1, 28, 28)
    assert negotiate(PLAIN, model([-1, 28, 28])).info.input_shape == (1, 28, 28)
    flat = negotiate(PLAIN, model([-1, 64], "FP64"))
    assert flat.info.input_shape == (1, 8, 8) and flat.wire_shape == (64,) and flat.input_datatype == "FP64"
    with pytest.raises(AttackError, match="pass --input-shape C,H,W with C\\*H\\*W = 30"):
        negotiate(PLAIN, model([-1, 30]))
    given = negotiate(PLAIN, model([-1, 30]), EndpointOptions(input_shape=(1, 5, 6)))
    assert given.info.input_shape == (1, 5, 6) and given.wire_shape == (30,)
    overridden = negotiate(PLAIN, model([-1, 30]), EndpointOptions(input_shape=(1, 6, 6)))  # the flag wins
    assert overridden.wire_shape == (1, 6, 6) and overridden.info.input_shape == (1, 6, 6)
    assert overridden.overrides == ("--input-shape 1,6,6 (sent as [N, 1, 6, 6]; the metadata declares [-1, 30])",)
    assert "flags over the metadata: --input-shape 1,6,6" in overridden.describe()
    with pytest.raises(AttackError, match="variable dimensions"):
        negotiate(PLAIN, model([-1, 1, -1, -1]))
    assert negotiate(PLAIN, model([-1, 1, -1, -1]), EndpointOptions(input_shape=(1, 8, 8))).wire_shape == (1, 8, 8)
    assert negotiate(PLAIN, model([-1, -1]), EndpointOptions(input_shape=(64,))).info.input_shape == (1, 8, 8)
    with pytest.raises(AttackError, match="INT64; the attacks send images as FP16, FP32, FP64"):
        negotiate(PLAIN, model([-1, 64], "INT64"))


def test_output_kind_classes_and_range_precedence() -> None:
    labels = negotiate(PLAIN, model([-1, 64], outputs=[{"name": "y", "datatype": "INT64", "shape": [-1, 1]}]),
                       EndpointOptions(num_classes=10))
    assert labels.answer_kind == "label" and labels.info.output_kind == "label" and labels.info.num_classes == 10
    with pytest.raises(AttackError, match="pass --num-classes"):
        negotiate(PLAIN, model([-1, 64], outputs=[{"name": "y", "datatype": "INT64", "shape": [-1]}]))
    logits = negotiate(PLAIN, model([-1, 64]), EndpointOptions(output_kind="logits"))
    assert logits.answer_kind == "logits" and logits.info.output_kind == "probabilities"
    assert logits.info.num_classes == 3  # the declared output's last dimension
    declared = negotiate(STEALSIM, model([-1, 64], num_classes=10, output_kind="label", pixel_range=[0, 255]))
    assert declared.answer_kind == "label" and declared.info.num_classes == 10
    assert declared.info.pixel_range == (0.0, 255.0)
    assert negotiate(PLAIN, model([-1, 64]), EndpointOptions(input_range=(-1, 1))).info.pixel_range == (-1.0, 1.0)
    undeclared = negotiate(PLAIN, {"name": "m", "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}]},
                           EndpointOptions(output_name="predict_proba", num_classes=10))
    assert undeclared.output_name == "predict_proba" and undeclared.output_datatype is None


def _endpoint(datatype: str, wire: str, **options: Any) -> Endpoint:
    meta = model([-1, 4], datatype, outputs=[{"name": "p", "datatype": datatype, "shape": [-1, 3]}])
    return negotiate(PLAIN, meta, EndpointOptions(wire=wire, **options))  # type: ignore[arg-type]


@pytest.mark.parametrize("wire", ["json", "binary"])
@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64"])
def test_requests_scale_flatten_and_cast(wire: str, datatype: str) -> None:
    endpoint = _endpoint(datatype, wire, input_range=(0.0, 16.0))
    images = torch.tensor([[[[0.0, 0.25], [0.5, 1.0]]]])  # [1, 1, 2, 2], the attacks' [0, 1]
    body, headers = encode_request(endpoint, images)
    dtype = {"FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}[datatype]
    if wire == "json":
        sent = json.loads(body)["inputs"][0]
        values = np.asarray(sent["data"])
        assert headers["Content-Type"] == "application/json"
    else:
        length = int(headers["Inference-Header-Content-Length"])
        sent = json.loads(body[:length])["inputs"][0]
        values = np.frombuffer(body[length:], dtype=dtype)
        assert sent["parameters"]["binary_data_size"] == 4 * np.dtype(dtype).itemsize
        assert json.loads(body[:length])["outputs"] == [{"name": "p", "parameters": {"binary_data": True}}]
    assert sent["shape"] == [1, 4] and sent["datatype"] == datatype and sent["name"] == "x"
    assert values.tolist() == [0.0, 4.0, 8.0, 16.0]
    with pytest.raises(AttackError, match="do not fit the victim's input"):
        encode_request(endpoint, torch.rand(2, 1, 2, 3))


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64"])
def test_answers_decode_in_every_float_type(binary: bool, datatype: str) -> None:
    endpoint = _endpoint(datatype, "binary" if binary else "json")
    dtype = {"FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}[datatype]
    probabilities = np.array([[0.25, 0.25, 0.5], [0.1, 0.7, 0.2]], dtype=dtype)
    raw, length = answer(probabilities, datatype, binary=binary)
    decoded = decode_answer(endpoint, raw, length, 2)
    assert decoded.dtype == torch.float32
    np.testing.assert_allclose(decoded.numpy(), probabilities.astype(np.float32), atol=1e-3)


def test_logits_become_probabilities() -> None:
    endpoint = _endpoint("FP32", "json", output_kind="logits")
    logits = np.array([[0.0, 1.0, 2.0]], dtype="<f4")
    decoded = decode_answer(endpoint, *answer(logits, "FP32"), 1)
    torch.testing.assert_close(decoded, torch.softmax(torch.tensor(logits), dim=1))


def test_mismatches_are_named() -> None:
    endpoint = _endpoint("FP32", "json")
    cases = [
        (answer(np.zeros((2, 1), "<i8"), "INT64"),
         "came back INT64 [2, 1], the metadata declares FP32; if these are class labels, pass --output-kind label"),
        (answer(np.full((2, 3), 1 / 3, "<f4"), "FP32", name="q"),
         "asked for output 'p' (from the metadata), the answer holds 'q'; pass --output-name q --num-classes 3"),
        (answer(np.full((2, 4), 0.25, "<f4"), "FP32"),
         "came back [2, 4], the metadata declares [-1, 3]; if the answer is right, pass --output-kind"),
        (answer(np.full((1, 3), 1 / 3, "<f4"), "FP32"), "1 answers for 2 images"),
        (answer(np.array([[1.0, 2.0, 3.0]] * 2, "<f4"), "FP32"), "rows do not sum to 1"),
        (answer(np.array([[np.nan, 0.5, 0.5]] * 2, "<f4"), "FP32"), "NaN or infinite"),
    ]
    for (raw, length), message in cases:
        with pytest.raises(VictimAPIError, match=re.escape(message)) as refused:
            decode_answer(endpoint, raw, length, 2)
        assert refused.value.code == "output_mismatch"
    labels = negotiate(PLAIN, model([-1, 4], outputs=[{"name": "y", "datatype": "INT64", "shape": [-1]}]),
                       EndpointOptions(num_classes=3))
    assert decode_answer(labels, *answer(np.array([0, 2], "<i8"), "INT64", "y"), 2).tolist() == [0, 2]
    with pytest.raises(VictimAPIError, match=r"labels outside \[0, 3\)"):
        decode_answer(labels, *answer(np.array([0, 3], "<i8"), "INT64", "y"), 2)
    with pytest.raises(VictimAPIError, match="cannot decode"):
        decode_answer(endpoint, b"not json", None, 2)


def test_flags_win_over_the_metadata_for_every_field() -> None:
    meta = model([-1, 64], outputs=[{"name": "p", "datatype": "FP32", "shape": [-1, 3]},
                                    {"name": "q", "datatype": "FP64", "shape": [-1, 5]}],
                 num_classes=3, output_kind="probabilities", pixel_range=[0, 255])
    by_metadata = negotiate(STEALSIM, meta)
    assert (by_metadata.output_name, by_metadata.output_datatype, by_metadata.answer_kind) == ("p", "FP32",
                                                                                               "probabilities")
    assert by_metadata.info.pixel_range == (0.0, 255.0) and by_metadata.info.num_classes == 3
    assert by_metadata.overrides == ()
    flags = EndpointOptions(wire="json", input_shape=(1, 4, 16), input_range=(0.0, 16.0), output_kind="logits",
                            num_classes=5, output_name="q")
    chosen = negotiate(STEALSIM, meta, flags)
    assert chosen.wire == "json" and chosen.wire_shape == (64,) and chosen.info.input_shape == (1, 4, 16)
    assert chosen.info.pixel_range == (0.0, 16.0) and chosen.info.num_classes == 5
    assert (chosen.output_name, chosen.output_datatype, chosen.output_shape) == ("q", "FP64", (5,))
    assert chosen.answer_kind == "logits" and chosen.kind_given and chosen.shape_given
    assert chosen.overrides == ("--output-kind logits (the metadata declares probabilities)",
                                "--input-range 0,16 (the metadata declares 0,255)")
    undeclared = negotiate(PLAIN, meta, EndpointOptions(output_name="r", num_classes=4))
    assert (undeclared.output_name, undeclared.output_datatype, undeclared.output_shape) == ("r", None, None)
    assert undeclared.overrides == ("--output-name r (the metadata declares 'p', 'q')",)


def test_missing_classes_say_what_the_metadata_lacks() -> None:
    bare = {"name": "m", "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}]}
    for metadata, options, message in (
        (bare, EndpointOptions(), "the metadata declares no output to read the number of classes from"),
        (model([-1, 64]), EndpointOptions(output_name="r"), "the metadata declares no output 'r' to read"),
        (model([-1, 64], outputs=[{"name": "p", "datatype": "FP32", "shape": [-1, -1]}]), EndpointOptions(),
         "the declared output 'p' has shape [-1, -1], without a fixed class dimension"),
        (model([-1, 64], outputs=[{"name": "y", "datatype": "INT64", "shape": [-1, 1]}]), EndpointOptions(),
         "the answers are class labels, and the metadata does not say how many classes there are"),
    ):
        with pytest.raises(AttackError, match=re.escape(message) + ".*pass --num-classes") as refused:
            negotiate(PLAIN, metadata, options)
        assert "None" not in str(refused.value)
        assert str(refused.value).endswith("(from the metadata alone: no image was sent)")


def test_output_name_flag_reads_what_the_server_answers() -> None:
    meta = model([-1, 4], outputs=[{"name": "logits", "datatype": "FP32", "shape": [-1, 3]}])
    probabilities = np.array([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]], "<f4")
    raw, length = answer(probabilities, "FP32", name="predict_proba")
    with pytest.raises(VictimAPIError, match="pass --output-name predict_proba --num-classes 3"):
        decode_answer(negotiate(PLAIN, meta), raw, length, 2)
    flagged = negotiate(PLAIN, meta, EndpointOptions(output_name="predict_proba", num_classes=3))
    np.testing.assert_allclose(decode_answer(flagged, raw, length, 2).numpy(), probabilities)


def test_output_kind_flag_lifts_the_declared_datatype_and_shape() -> None:
    meta = model([-1, 4], outputs=[{"name": "p", "datatype": "FP64", "shape": [-1, 3]}])
    labels = answer(np.array([[2], [0]], "<i8"), "INT64")
    with pytest.raises(VictimAPIError, match="pass --output-kind label"):
        decode_answer(negotiate(PLAIN, meta), *labels, 2)
    as_labels = negotiate(PLAIN, meta, EndpointOptions(output_kind="label"))
    assert as_labels.info.num_classes == 3  # the declared score dimension
    assert decode_answer(as_labels, *labels, 2).tolist() == [2, 0]
    scores = answer(np.full((2, 4), 0.25, "<f8"), "FP64")  # four classes where three are declared
    with pytest.raises(VictimAPIError, match="came back \\[2, 4\\], the metadata declares \\[-1, 3\\]"):
        decode_answer(negotiate(PLAIN, meta), *scores, 2)
    four = negotiate(PLAIN, meta, EndpointOptions(num_classes=4))
    assert decode_answer(four, *scores, 2).shape == (2, 4)
    with pytest.raises(VictimAPIError, match="must be floating point, got INT64 \\(pass --output-kind label"):
        decode_answer(negotiate(PLAIN, meta, EndpointOptions(output_kind="probabilities")), *labels, 2)


def test_another_float_width_is_read_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    meta = model([-1, 4], outputs=[{"name": "predict_proba", "datatype": "FP64", "shape": [-1, 3]}])
    endpoint = negotiate(PLAIN, meta)
    probabilities = np.array([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]], "<f4")
    with caplog.at_level(logging.WARNING, logger="attacker.endpoint"):
        for _ in range(3):
            decoded = decode_answer(endpoint, *answer(probabilities, "FP32", name="predict_proba"), 2)
            np.testing.assert_allclose(decoded.numpy(), probabilities)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["model 'victim': output 'predict_proba' came back FP32, the metadata declares FP64: "
                        "read as sent (floats of another width)"]


def test_probabilities_read_as_logits_warn_once(caplog: pytest.LogCaptureFixture) -> None:
    endpoint = _endpoint("FP32", "json", output_kind="logits")
    probabilities = np.array([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]], "<f4")
    logits = np.array([[0.2, 3.0, -1.0], [1.0, 1.0, 1.0]], "<f4")
    with caplog.at_level(logging.WARNING, logger="attacker.endpoint"):
        decode_answer(endpoint, *answer(logits, "FP32"), 2)
        assert not caplog.records  # real logits: no warning
        for _ in range(2):
            softened = decode_answer(endpoint, *answer(probabilities, "FP32"), 2)
    torch.testing.assert_close(softened, torch.softmax(torch.from_numpy(probabilities), dim=1))  # as asked
    assert len(caplog.records) == 1 and "already sum to 1" in caplog.records[0].getMessage()
    assert "pass --output-kind probabilities" in caplog.records[0].getMessage()


def test_rounded_probabilities_are_read_as_served_and_warned_once(caplog: pytest.LogCaptureFixture) -> None:
    """An API that rounds its probabilities (the `round` step) sends rows that miss 1 by a little:
    read as probabilities, as served, with one warning; rows far from 1 are still refused."""
    endpoint = _endpoint("FP32", "json")
    rounded = np.array([[0.33, 0.33, 0.33], [0.0, 0.5, 0.49]], "<f4")
    with caplog.at_level(logging.WARNING, logger="attacker.endpoint"):
        for _ in range(2):
            decoded = decode_answer(endpoint, *answer(rounded, "FP32"), 2)
            np.testing.assert_array_equal(decoded.numpy(), rounded)
    assert len(caplog.records) == 1 and "rounded probabilities" in caplog.records[0].getMessage()
    with pytest.raises(VictimAPIError, match=re.escape("rows do not sum to 1 (e.g. 0.3)")):
        decode_answer(endpoint, *answer(np.array([[0.1, 0.1, 0.1], [0.4, 0.3, 0.3]], "<f4"), "FP32"), 2)
