"""Settings of the victim service: flags > environment (``STEALSIM_*``) > YAML file > defaults.

Build them with :func:`load_settings`; nothing here reads the environment at import::

    settings = load_settings(Path("serve.yaml"), {"port": 9000})

A YAML file has the same keys as :class:`ServerSettings`::

    models:
      victim: {path: runs/victim}
      nasty:  {path: runs/nasty, policy: [{name: top_k, k: 3}]}
    admin_key: change-me
    max_batch_size: 64
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import limits
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from stealsim.errors import ConfigError
from victim_server.store import MAX_BUDGET

__all__ = ["KeySpec", "ModelSpec", "ServerSettings", "load_settings", "parse_model_flag"]


class ModelSpec(BaseModel):
    """One served checkpoint and its default output policy (a list of policy steps)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Path
    policy: list[dict[str, Any]] = Field(default_factory=list)
    price_per_1000_images: float | None = Field(default=None, ge=0.0, allow_inf_nan=False)
    """What 1,000 images cost on this model (in the server's ``currency``); None: no price.
    Published in the model's metadata; a key's own price overrides it."""


class KeySpec(BaseModel):
    """An API key provisioned from the settings (handy for demos and docker-compose)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    api_key: SecretStr
    budget: int = Field(ge=0, le=MAX_BUDGET, strict=True)
    name: str = ""
    rate: str | None = None
    image_rate: str | None = None
    models: list[str] | None = None
    policy: list[dict[str, Any]] | None = None
    price_per_1000_images: float | None = Field(default=None, ge=0.0, allow_inf_nan=False)
    """The key's own price per 1,000 images (overrides each model's); None: the models'."""


class ServerSettings(BaseSettings):
    """Everything ``stealsim serve`` can be told. Frozen: nothing changes it at run time."""

    model_config = SettingsConfigDict(
        env_prefix="STEALSIM_", frozen=True, extra="forbid", env_nested_delimiter="__"
    )

    models: dict[str, ModelSpec] = Field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    device: str = "auto"
    torch_threads: int | None = Field(default=None, ge=1)
    inference_graph: Literal["torchscript", "eager"] = "torchscript"
    """``torchscript``: serve a frozen TorchScript graph of each model (the forward drops the
    GIL once, not per operator; see ``victim_server/runner.py``); ``eager``: the plain module."""
    gil_switch_interval_ms: float = Field(default=1.0, gt=0.0)
    """``sys.setswitchinterval`` of the API process: how long the event loop may keep the GIL
    from the inference thread. Python's default is 5 ms."""
    admin_key: SecretStr | None = None
    api_keys: list[KeySpec] = Field(default_factory=list)

    max_batch_size: int = Field(default=64, ge=1)
    """Images per forward pass the micro-batcher coalesces at most."""
    max_wait_ms: float = Field(default=0.5, ge=0.0)
    """How long the batcher waits for more requests after the first one of a batch."""
    batch_wait_when_busy: bool = False
    """Wait ``max_wait_ms`` before every batch (True), or only when the model was idle
    (False: under load the next batch starts as the last one ends; see LocalBatcher)."""
    inference_timeout_s: float = Field(default=30.0, gt=0.0)
    max_images_per_request: int = Field(default=1024, ge=1)
    max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    """Body of an inference request at most; more gets 413 (read only after the key is checked)."""
    max_json_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    """Body of every other route (admin and usage JSON) at most; more gets 413."""
    max_header_bytes: int = Field(default=64 * 1024, ge=1024)
    """Request line and headers at most; more gets 431 and the connection is closed. Passed to
    uvicorn as ``h11_max_incomplete_event_size``, which ``server.BoundedHttpToolsProtocol``
    applies to the httptools parser too."""
    request_read_timeout_s: float = Field(default=30.0, gt=0.0)
    """Time a request's body may take to arrive once its headers are in; then 408."""
    auth_failure_rate: str | None = "20/minute"
    """Wrong keys (API or admin) one client address may present per window (``limits``
    syntax) before every key it presents gets 429 until the window ends; None: unlimited."""
    api_docs: bool = False
    """Serve ``/docs``, ``/redoc`` and ``/openapi.json`` (the admin schema) without a key."""

    default_rate: str | None = "100/second"
    """Request rate limit of keys created without one (``limits`` syntax); None: unlimited."""
    default_image_rate: str | None = "100000/minute"
    """Image rate limit of keys created without one; None: unlimited."""
    rate_limits: Literal["enforce", "declare"] = "enforce"
    """``enforce``: a request over a key's limit gets 429. ``declare``: keys keep their limits and
    ``/v1/usage`` and the model metadata publish them, but nothing is throttled or counted (a
    simulation: the attacker's virtual clock applies the declared limits)."""
    currency: str = Field(default="USD", min_length=1, max_length=16, pattern=r"^[A-Za-z0-9_.$-]+$")
    """Unit of every price (``price_per_1000_images``) the service publishes."""
    rate_limit_storage: str = "async+memory://"
    """A ``limits`` storage URI (``async+redis://host:6379`` for the Redis backend)."""

    audit_log: Path | None = None
    """JSONL file of served requests; None keeps the audit in memory only."""
    seed: int = 0
    """Seed of the randomised output policies (Gaussian noise)."""
    watermark_secret: SecretStr | None = None
    """Key of the ``watermark`` policy step's hash (DAWN): which answers are marked, and how.
    Keep it stable (and the same in every API process) for the record to verify."""
    log_json: bool = False

    redis_url: str | None = None
    """Redis server of the scale-out (``redis://host:6379/0``): keys, usage, rate limits,
    PRADA state and the audit log live there, shared by every API process; None: in memory."""
    redis_prefix: str = Field(default="stealsim", min_length=1)
    """Namespace of every Redis key this service writes (``PREFIX:...``)."""
    batching: Literal["local", "redis"] = "local"
    """``local``: the in-process micro-batcher; ``redis``: a Redis Stream per model read by
    ``stealsim worker`` processes (needs ``redis_url``)."""
    stream_max_len: int = Field(default=10_000, ge=1)
    """Entries a model's request stream may hold; more gets 503 (refunded)."""
    worker_seen_s: float = Field(default=5.0, gt=0.0)
    """A model is ready only if a worker sent a heartbeat within this many seconds."""
    workers: int = Field(default=1, ge=1)
    """API processes on ``host:port`` (uvicorn workers); more than one needs ``redis_url``."""

    @model_validator(mode="after")
    def _check_backends(self) -> ServerSettings:
        if self.batching == "redis" and self.redis_url is None:
            raise ValueError("batching 'redis' needs redis_url (--redis-url redis://HOST:6379)")
        if self.workers > 1 and self.redis_url is None:
            raise ValueError(
                f"workers={self.workers} API processes need redis_url: in memory, each would "
                "keep its own keys, budgets and limits"
            )
        if ":" in self.redis_prefix or not self.redis_prefix.strip():
            raise ValueError(f"redis_prefix {self.redis_prefix!r}: a non-empty name without ':'")
        return self

    @field_validator("auth_failure_rate")
    @classmethod
    def _check_rate(cls, rate: str | None) -> str | None:
        if rate is not None:
            try:
                limits.parse(rate)
            except ValueError as exc:
                raise ValueError(f"{rate!r} is not a rate: use the limits syntax, e.g. '20/minute'") from exc
        return rate

    @field_validator("models")
    @classmethod
    def _check_model_names(cls, models: dict[str, ModelSpec]) -> dict[str, ModelSpec]:
        for name in models:
            if not name or not all(ch.isalnum() or ch in "-_." for ch in name):
                raise ValueError(f"model name {name!r}: use letters, digits, '-', '_' or '.'")
        return models


def parse_model_flag(text: str) -> tuple[str, Path]:
    """``NAME=DIR`` -> ``(NAME, Path(DIR))``."""
    name, sep, directory = text.partition("=")
    if not sep or not name.strip() or not directory.strip():
        raise ConfigError(f"--model expects NAME=DIR, got {text!r}")
    return name.strip(), Path(directory.strip())


def load_settings(
    config_file: Path | None = None, overrides: dict[str, Any] | None = None
) -> ServerSettings:
    """Settings from ``overrides`` (flags; None values ignored) > env > ``config_file`` > defaults.

    Raises:
        ConfigError: unreadable YAML or a setting with a value that is not accepted.
    """
    if config_file is not None:
        if not config_file.is_file():
            raise ConfigError(f"--config {config_file}: no such file")
        try:
            content = yaml.safe_load(config_file.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"--config {config_file}: invalid YAML: {exc}") from exc
        if content is not None and not isinstance(content, dict):
            raise ConfigError(f"--config {config_file}: expected a mapping at the top level")

    class _FileSettings(ServerSettings):
        model_config = SettingsConfigDict(yaml_file=config_file)

        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
            if config_file is not None:
                sources += (YamlConfigSettingsSource(settings_cls),)
            return sources

    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    try:
        loaded = _FileSettings(**given)
    except ValidationError as exc:
        raise ConfigError(f"invalid server settings: {_one_line(exc)}") from exc
    return loaded


def _one_line(exc: ValidationError) -> str:
    """Each of pydantic's errors as ``field.path: message (got VALUE)``, joined on one line."""
    parts = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "settings"
        got = "" if error["type"] == "missing" else f" (got {error['input']!r:.80})"
        parts.append(f"{where}: {error['msg']}{got}")
    return "; ".join(parts).replace("\n", " ")
