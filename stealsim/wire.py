"""Every name the victim API puts on the wire: header names, content types, paths.

The server (``victim_server/``), the attacker's HTTP client, :mod:`stealsim.service_client`,
the benchmarks and the test helpers import these, so a name is spelt in one place.
``docs/api.md`` is the contract these constants implement.

Paths with a ``{key_id}`` or ``{model}`` field are templates in FastAPI's syntax;
the ``*_path`` functions fill them in for a client.
"""

from __future__ import annotations

from urllib.parse import quote

__all__ = [
    "ADMIN_KEYS_PATH",
    "ADMIN_KEY_PATH",
    "API_KEY_HEADER",
    "AUDIT_PATH",
    "AUTHORIZATION_HEADER",
    "BEARER_SCHEME",
    "BINARY_CONTENT_TYPE",
    "HEADER_LENGTH",
    "JSON_CONTENT_TYPE",
    "LIVE_PATH",
    "METRICS_PATH",
    "MODEL_INFER_PATH",
    "MODEL_PATH",
    "MODEL_READY_PATH",
    "NDJSON_CONTENT_TYPE",
    "OIP_PREFIX",
    "READY_PATH",
    "TOPUP_PATH",
    "USAGE_PATH",
    "WATERMARK_COUNT_HEADER",
    "WATERMARK_PATH",
    "admin_key_path",
    "bearer",
    "infer_path",
    "model_path",
    "model_ready_path",
    "topup_path",
    "watermark_path",
]

# -- headers and content types -----------------------------------------------------------

HEADER_LENGTH = "Inference-Header-Content-Length"
"""Binary tensor extension (KServe v2 / Triton): bytes of JSON header before the raw tensors."""

BINARY_CONTENT_TYPE = "application/octet-stream"
"""A binary-tensor inference body, and the watermark record's ``.npz``."""

JSON_CONTENT_TYPE = "application/json"
NDJSON_CONTENT_TYPE = "application/x-ndjson"
"""The audit export: one JSON object per line."""

API_KEY_HEADER = "X-API-Key"
"""The header that carries a key (the caller's or the admin key)."""

AUTHORIZATION_HEADER = "Authorization"
BEARER_SCHEME = "Bearer"
"""The server also accepts ``Authorization: Bearer KEY`` (what gateways send)."""

WATERMARK_COUNT_HEADER = "X-Watermarked-Answers"
"""How many watermarked answers the watermark record holds."""

# -- Open Inference Protocol v2 ----------------------------------------------------------

OIP_PREFIX = "/v2"
LIVE_PATH = OIP_PREFIX + "/health/live"
READY_PATH = OIP_PREFIX + "/health/ready"
MODEL_PATH = OIP_PREFIX + "/models/{model}"
MODEL_READY_PATH = MODEL_PATH + "/ready"
MODEL_INFER_PATH = MODEL_PATH + "/infer"

# -- project extensions ------------------------------------------------------------------

USAGE_PATH = "/v1/usage"
ADMIN_KEYS_PATH = "/v1/admin/keys"
ADMIN_KEY_PATH = ADMIN_KEYS_PATH + "/{key_id}"
TOPUP_PATH = ADMIN_KEY_PATH + "/topup"
WATERMARK_PATH = ADMIN_KEY_PATH + "/watermark"
AUDIT_PATH = "/v1/admin/audit"
METRICS_PATH = "/metrics"


def bearer(key: str) -> str:
    """The ``Authorization`` header value for ``key``."""
    return f"{BEARER_SCHEME} {key}"


def _segment(value: str) -> str:
    return quote(value, safe="")


def model_path(model: str) -> str:
    return MODEL_PATH.format(model=_segment(model))


def model_ready_path(model: str) -> str:
    return MODEL_READY_PATH.format(model=_segment(model))


def infer_path(model: str) -> str:
    return MODEL_INFER_PATH.format(model=_segment(model))


def admin_key_path(key_id: str) -> str:
    return ADMIN_KEY_PATH.format(key_id=_segment(key_id))


def topup_path(key_id: str) -> str:
    return TOPUP_PATH.format(key_id=_segment(key_id))


def watermark_path(key_id: str) -> str:
    return WATERMARK_PATH.format(key_id=_segment(key_id))
