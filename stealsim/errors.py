"""The project's one exception tree.

Every error a user can cause derives from :class:`StealsimError`, so the CLI and
the HTTP app each translate it in one place. Foreign errors (torch, safetensors,
Redis, HTTP) are wrapped at the boundary where they occur (``raise X(...) from exc``).
"""

from __future__ import annotations

__all__ = [
    "APIRequestError",
    "ArchitectureError",
    "BackendError",
    "BudgetExceededError",
    "CheckpointError",
    "ConfigError",
    "DatasetError",
    "ForbiddenError",
    "InvalidRequestError",
    "KeyNotFoundError",
    "ModelNotFoundError",
    "PayloadTooLargeError",
    "RateLimitedError",
    "RunLimitReachedError",
    "ServiceError",
    "StealsimError",
    "UnauthorizedError",
    "UnavailableError",
]


class StealsimError(Exception):
    """Root of every error stealsim raises on purpose."""


class ConfigError(StealsimError):
    """A setting, flag or argument has a value that is not accepted."""


class DatasetError(StealsimError):
    """A dataset name is unknown, or its files are missing or malformed."""


class ArchitectureError(StealsimError):
    """An architecture name is unknown or its arguments do not fit it."""


class CheckpointError(StealsimError):
    """A checkpoint is missing, corrupt, or does not match its sidecar."""


class AttackError(StealsimError):
    """An attack cannot run as configured, or a run directory cannot be resumed."""


class VictimAPIError(AttackError):
    """The victim API refused a request or could not be reached.

    ``status`` is the HTTP status (0 when no response arrived) and ``code`` the
    API's machine-readable error code (``unauthorized``, ``model_not_found``, ...).
    """

    def __init__(self, message: str, *, status: int = 0, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class BudgetExhaustedError(VictimAPIError):
    """The query budget (the attacker's own or the server's) cannot pay for a request.

    ``remaining`` is the number of images still affordable (0 when spent).
    """

    def __init__(self, message: str, *, remaining: int = 0, status: int = 429) -> None:
        super().__init__(message, status=status, code="budget_exhausted")
        self.remaining = remaining


class RunLimitReachedError(BudgetExhaustedError):
    """A run's own limit ended it before its query budget: ``stop_reason`` says which.

    ``accounts_exhausted`` (every account spent, blocked or revoked, and no more may be
    opened), ``time_limit`` (the simulated hours are up) or ``money_limit``.
    """

    def __init__(self, message: str, *, stop_reason: str) -> None:
        super().__init__(message, remaining=0, status=0)
        self.stop_reason = stop_reason
        self.answered = 0
        """Images of the request already answered (and charged) when the limit struck."""


class APIRequestError(StealsimError):
    """A call of stealsim's own API (health, keys, usage, audit, watermark records) failed.

    Raised by :class:`stealsim.service_client.ServiceClient`. ``status`` is the HTTP
    status (0 when no response arrived) and ``code`` the API's machine-readable
    error code (``unauthorized``, ``key_not_found``, ...; empty when the answer had none).
    """

    def __init__(self, message: str, *, status: int = 0, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


# --- victim service -------------------------------------------------------------
# The service's errors carry a machine-readable ``code`` (docs/api.md, "Errors") and
# optional extra JSON fields; the app's exception handlers alone map them to HTTP
# status codes.


class ServiceError(StealsimError):
    """An inference or admin request the victim service refuses or cannot serve."""

    code = "error"

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidRequestError(ServiceError):
    """Malformed body or header, wrong datatype or shape, non-finite or out-of-range pixels."""

    code = "invalid_request"


class UnauthorizedError(ServiceError):
    """No key, or an unknown or revoked key."""

    code = "unauthorized"


class ForbiddenError(ServiceError):
    """The key may not do this: another model, blocked by a detector, or not the admin key."""

    code = "forbidden"


class ModelNotFoundError(ServiceError):
    """No model is served under this name."""

    code = "model_not_found"


class KeyNotFoundError(ServiceError):
    """No API key has this id."""

    code = "key_not_found"


class PayloadTooLargeError(ServiceError):
    """The body is over the size limit, or holds more images than one request may."""

    code = "payload_too_large"


class BudgetExceededError(ServiceError):
    """The request does not fit the key's remaining budget; ``details['remaining']`` says what does."""

    code = "budget_exhausted"


class RateLimitedError(ServiceError):
    """A rate limit of the key is hit; ``retry_after`` in seconds, ``headers`` X-RateLimit-*."""

    code = "rate_limited"

    def __init__(self, message: str, retry_after: int, headers: dict[str, str], **details: object) -> None:
        super().__init__(message, retry_after=retry_after, **details)
        self.retry_after = retry_after
        self.headers = headers


class UnavailableError(ServiceError):
    """The model or its batching backend cannot answer (in time); the images are refunded."""

    code = "unavailable"


class BackendError(ServiceError):
    """A backend (Redis) refused an operation for a reason other than an outage (500).

    A script error or a value of the wrong type: a fault of the server or its data,
    which retrying does not cure. The message says which operation failed.
    """

    code = "backend_error"
