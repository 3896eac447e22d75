"""docker-compose.yml and the Dockerfile, checked without a Docker engine (none runs here):
the stack's structure, and that every command a service runs is a real ``stealsim`` command
whose flags parse (click's own parser, the one the container will run)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import typer
import typer.main
import yaml

from cli.main import app

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILES = ("docker-compose.yml", "docker-compose.gpu.yml")
# typer 0.2x vendors click; its usage errors are the bases of typer.BadParameter.
BadParameter = typer.BadParameter
UsageError = next(cls for cls in BadParameter.__mro__ if cls.__name__ == "UsageError")
SUBSTITUTION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def load(name: str) -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / name).read_text()))


def substitute(value: str) -> str:
    """Compose's ``${VAR:-default}`` interpolation, with the defaults."""
    return SUBSTITUTION.sub(lambda match: match.group(2) or "", value)


def stealsim_commands() -> dict[str, list[str]]:
    services = load("docker-compose.yml")["services"]
    return {name: [substitute(part) for part in service["command"]]
            for name, service in services.items() if service.get("build")}


def parse_cli(argv: list[str]) -> tuple[str, dict[str, Any]]:
    """Parse ``stealsim ...`` as the console script would, without running the command."""
    assert argv[0] == "stealsim", argv
    group: Any = typer.main.get_command(app)
    with group.make_context("stealsim", list(argv[1:]), resilient_parsing=False) as context:
        name, command, rest = group.resolve_command(context, list(getattr(context, "_protected_args", [])) + context.args)
        assert command is not None and name is not None
        with command.make_context(name, rest, parent=context) as sub:
            return name, dict(sub.params)


def test_compose_stack_has_the_services_it_promises() -> None:
    compose = load("docker-compose.yml")
    services = compose["services"]
    assert {"redis", "models", "api", "worker", "attacker"} <= set(services)
    assert services["worker"]["deploy"]["replicas"] == 2
    assert services["api"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["api"]["depends_on"]["models"]["condition"] == "service_completed_successfully"
    assert services["attacker"]["depends_on"]["api"]["condition"] == "service_healthy"
    assert "./reports:/reports" in services["attacker"]["volumes"]
    assert "8000:8000" in services["api"]["ports"]
    gpu = load("docker-compose.gpu.yml")["services"]["worker"]["deploy"]["resources"]["reservations"]
    assert gpu["devices"][0]["capabilities"] == ["gpu"]


@pytest.mark.parametrize("service", ["models", "api", "worker", "attacker"])
def test_every_compose_command_is_a_real_cli_command_with_valid_flags(service: str) -> None:
    name, params = parse_cli(stealsim_commands()[service])
    expected = {"models": "demo", "api": "serve", "worker": "worker", "attacker": "demo"}[service]
    assert name == expected
    if service == "api":
        assert params["batching"] == "redis" and params["redis_url"] == "redis://redis:6379/0"
        assert params["host"] == "0.0.0.0" and params["port"] == 8000
    if service == "attacker":
        assert params["url"] == "http://api:8000" and str(params["out"]).startswith("/reports")
    if service == "models":
        assert params["victims_only"] is True


def test_the_parser_used_here_rejects_bad_flags() -> None:
    """The check above can fail: an unknown flag or a bad value does not parse."""
    with pytest.raises(UsageError):
        parse_cli(["stealsim", "serve", "--no-such-flag"])
    with pytest.raises(BadParameter):
        parse_cli(["stealsim", "worker", "--redis-url", "redis://x", "--model", "a=b", "--max-batch-size", "0"])
    with pytest.raises(UsageError):
        parse_cli(["stealsim", "no-such-command"])


def test_served_and_worker_models_are_where_the_models_service_writes_them() -> None:
    commands = stealsim_commands()
    _, models = parse_cli(commands["models"])
    written = {f"{name}={models['out']}/victims/{name}" for name in ("normal", "nasty")}
    _, api = parse_cli(commands["api"])
    _, worker = parse_cli(commands["worker"])
    assert set(api["model"]) == written
    assert set(worker["model"]) == written
    # The admin key reaches both the API and the attacker (STEALSIM_ADMIN_KEY).
    services = load("docker-compose.yml")["services"]
    for service in ("api", "attacker"):
        assert "STEALSIM_ADMIN_KEY" in services[service]["environment"]


def test_dockerfile_pins_torch_from_the_cpu_index() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert text.count("FROM python:3.11-slim") == 1
    assert '"torch==2.13.0"' in text and "https://download.pytorch.org/whl/cpu" in text
    for package in ("stealsim", "victim_server", "defense", "attacker", "experiments", "cli"):
        assert f"COPY {package} ./{package}" in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "runs" in ignored
