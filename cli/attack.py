"""The attacker's command: steal a victim within a query budget.

Exit status: 0 the run finished (or was already finished: a resume then does nothing);
1 it finished but its final evaluation failed; 2 refused before it started, nothing
written (bad flags, keys that cannot pay, a victim that answers in another form);
3 it stopped on an error after it started (the victim failed for good after the
retries): the run directory keeps everything paid for and ``--resume`` continues;
130 interrupted (Ctrl-C), resumable alike.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.options import DeviceOption
from cli.set_aliases import alias_settings, with_set_aliases
from stealsim.errors import ConfigError, StealsimError

__all__ = ["EXIT_EVALUATION_FAILED", "EXIT_INTERRUPTED", "EXIT_STOPPED", "attack"]

EXIT_EVALUATION_FAILED = 1
EXIT_STOPPED = 3
"""Stopped on an error after the run started; distinct from 2 (refused, nothing written)."""
EXIT_INTERRUPTED = 130

_SECRETS = {"--api-key": '"$STEALSIM_API_KEY"', "--eval-api-key": '"$STEALSIM_EVAL_API_KEY"',
            "--admin-key": '"$STEALSIM_ADMIN_KEY"'}


def resume_command(argv: list[str]) -> str:
    """The command line that resumes this run: ``argv`` with ``--resume``, no secret printed.

    Keys given on the command line become ``"$STEALSIM_API_KEY"`` / ``"$STEALSIM_EVAL_API_KEY"``
    (the variables those flags read), header values ``***``.
    """
    words = ["stealsim"]
    hidden: str | None = None
    for arg in argv:
        name, sep, value = arg.partition("=")
        if hidden is not None:
            words.append(_SECRETS.get(hidden) or shlex.quote(f"{name}=***"))
            hidden = None
        elif name in _SECRETS and sep:
            words.append(f"{name}={_SECRETS[name]}")
        elif name == "--header" and sep:
            words.append(shlex.quote(f"--header={value.partition('=')[0]}=***"))
        elif arg in _SECRETS or arg == "--header":
            words.append(arg)
            hidden = arg
        else:
            words.append(shlex.quote(arg))
    if "--resume" not in argv:
        words.append("--resume")
    return " ".join(words)


def _stopped_note(out: Path, budget: int, resumed: bool, what: str, opened_accounts: bool = False) -> str:
    """Where a run that did not finish stopped, and the command that resumes it."""
    from attacker.rundir import RunDirectory

    if opened_accounts:
        return (f"the run in {out} {what}; it opened its accounts (--admin-key), whose keys are never written, "
                "so it cannot be resumed: start it again in a new directory")
    command = resume_command(sys.argv[1:])
    keys = [name for name in ("STEALSIM_API_KEY", "STEALSIM_EVAL_API_KEY") if f'"${name}"' in command]
    if keys:
        command += f"   (with {' and '.join(keys)} set to the keys)"
    return RunDirectory(out).interruption_note(budget, resumed, command, what)


def _numbers(flag: str, text: str, count: tuple[int, ...], kind: type = float) -> tuple[Any, ...]:
    try:
        values = tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError:
        values = ()
    if len(values) not in count:
        wanted = " or ".join(str(n) for n in count)
        raise ConfigError(f"{flag} {text!r}: expected {wanted} numbers separated by commas")
    return values


def _endpoint_options(wire: str, input_shape: str | None, input_range: str | None, output_kind: str | None,
                      output_name: str | None, num_classes: int | None) -> Any:
    """The ``stealsim attack`` flags that describe an endpoint, checked (see :mod:`attacker.endpoint`)."""
    from attacker.endpoint import EndpointOptions

    if wire not in ("auto", "json", "binary"):
        raise ConfigError(f"--wire {wire!r}: choose auto, json or binary")
    if output_kind not in (None, "probabilities", "logits", "label"):
        raise ConfigError(f"--output-kind {output_kind!r}: choose probabilities, logits or label")
    shape = _numbers("--input-shape", input_shape, (1, 2, 3), int) if input_shape is not None else None
    if shape is not None and min(shape) < 1:
        raise ConfigError(f"--input-shape {input_shape!r}: every dimension must be at least 1")
    pixel_range = _numbers("--input-range", input_range, (2,)) if input_range is not None else None
    if pixel_range is not None and not pixel_range[0] < pixel_range[1]:
        raise ConfigError(f"--input-range {input_range!r}: LOW must be below HIGH")
    return EndpointOptions(wire=wire, input_shape=shape, input_range=pixel_range,  # type: ignore[arg-type]
                           output_kind=output_kind, num_classes=num_classes,  # type: ignore[arg-type]
                           output_name=output_name)


def _parse_headers(texts: list[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for text in texts:
        name, sep, value = text.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--header {text!r}: expected NAME=VALUE, e.g. Authorization=Bearer TOKEN")
        headers[name.strip()] = value
    return headers


def _read_keys(path: Path) -> tuple[str, ...]:
    """The keys of ``--keys-file``: one per line; blank lines and ``#`` comments skipped."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"--keys-file {path}: cannot read it ({exc.strerror})") from exc
    keys = tuple(line.strip() for line in lines if line.strip() and not line.strip().startswith("#"))
    if not keys:
        raise ConfigError(f"--keys-file {path}: no keys in it (one per line)")
    return keys


@with_set_aliases
def attack(
    name: Annotated[str, typer.Argument(help="dual-student, dfme, random, ensemble, knockoff, art-knockoff or art-copycat (the art- ones need the stealsim[art] extra).")],
    out: Annotated[Path, typer.Option(help="Run directory to write (or resume).")],
    budget: Annotated[int, typer.Option(min=1, help="Attack queries (images) to spend.")],
    url: Annotated[str | None, typer.Option(help="Base URL of the victim: stealsim's server or any Open Inference Protocol v2 server.")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="STEALSIM_API_KEY", help="The attack's API key, sent as X-API-Key (none: no key).")] = None,
    model: Annotated[str, typer.Option(help="Model name on the service.")] = "victim",
    header: Annotated[
        list[str] | None, typer.Option("--header", metavar="NAME=VALUE", help="Extra header on every request (a gateway's auth), repeatable.")
    ] = None,
    wire: Annotated[str, typer.Option(help="auto (binary tensors where the server advertises them), json or binary.")] = "auto",
    input_shape: Annotated[
        str | None, typer.Option(metavar="C,H,W", help="Per-example input shape: C,H,W, H,W or D (over the metadata's).")
    ] = None,
    input_range: Annotated[
        str | None, typer.Option(metavar="LOW,HIGH", help="Pixel range the model takes (default: the metadata's, else 0,1).")
    ] = None,
    output_kind: Annotated[
        str | None, typer.Option(help="probabilities, logits or label (default: the metadata's, else by datatype).")
    ] = None,
    output_name: Annotated[str | None, typer.Option(help="Output to request and read (over the metadata's first output).")] = None,
    num_classes: Annotated[int | None, typer.Option(min=2, help="Classes (over the metadata's).")] = None,
    victim_checkpoint: Annotated[
        Path | None, typer.Option(help="Attack a checkpoint in this process instead of --url.")
    ] = None,
    label_only: Annotated[bool, typer.Option(help="In-process victim answers labels only.")] = False,
    eval_dataset: Annotated[
        str | None, typer.Option(help="Labelled test set (default: the built-in of the victim's shape).")
    ] = None,
    eval_api_key: Annotated[
        str | None, typer.Option(envvar="STEALSIM_EVAL_API_KEY", help="Key charged for evaluation queries (default: --api-key).")
    ] = None,
    eval_every: Annotated[int, typer.Option(min=0, help="Queries between evaluations (0: budget/20).")] = 0,
    seed: int = 0,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out.")] = False,
    setting: Annotated[
        list[str] | None, typer.Option("--set", metavar="KEY=VALUE", help="KEY=VALUE attack setting (JSON value), repeatable.")
    ] = None,
    eval_split: Annotated[
        str, typer.Option(help="Split evaluated: test (report) or validation (choosing settings).")
    ] = "test",
    transfer_epsilons: Annotated[
        str | None, typer.Option(help="L-inf PGD budgets of the transfer sweep, e.g. 0.05,0.1,0.15 (default by input).")
    ] = None,
    transfer_epsilon: Annotated[
        float | None, typer.Option(help="One L-inf PGD budget (a sweep of one; see --transfer-epsilons).")
    ] = None,
    transfer_samples: Annotated[int, typer.Option(min=1, help="Images of the split attacked by PGD.")] = 500,
    reference_epochs: Annotated[int, typer.Option(min=1, help="Epochs of the transfer reference model.")] = 15,
    threads: Annotated[int | None, typer.Option(min=1, help="torch.set_num_threads for training.")] = None,
    device: DeviceOption = "cpu",
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    accounts: Annotated[int | None, typer.Option(help="Spread the budget over this many accounts (with --admin-key: opened through the admin API; with --keys-file: at most this many of its keys).")] = None,
    keys_file: Annotated[Path | None, typer.Option(help="The accounts' API keys, one per line (# comments); any server.")] = None,
    admin_key: Annotated[str | None, typer.Option(envvar="STEALSIM_ADMIN_KEY", help="Open --accounts accounts (and an evaluation key) through a stealsim server's admin API.")] = None,
    rotation: Annotated[str, typer.Option(help="round-robin (each request to the next account) or fill (one account until it is spent, blocked or flagged).")] = "round-robin",
    retire_flagged: Annotated[bool, typer.Option(help="Leave an account once a detector flags it.")] = False,
    account_budget: Annotated[int | None, typer.Option(min=1, help="Images per opened account (default: the budget over --accounts).")] = None,
    price: Annotated[float | None, typer.Option(help="Price per 1,000 answered images (default: the server's, else 0).")] = None,
    account_price: Annotated[float, typer.Option(help="Price of opening one account.")] = 0.0,
    currency: Annotated[str | None, typer.Option(help="The prices' currency (default: the server's, else USD).")] = None,
    rate: Annotated[str | None, typer.Option(help="Request limit per account for the virtual clock, e.g. 20/second (default: the server's declared one).")] = None,
    image_rate: Annotated[str | None, typer.Option(help="Image limit per account for the virtual clock, e.g. 5000/minute.")] = None,
    clock: Annotated[str, typer.Option(help="virtual (compute the declared limits' waits) or live (the server enforces them; real time).")] = "virtual",
    max_hours: Annotated[float | None, typer.Option(help="Stop when the simulated time passes this many hours.")] = None,
    max_money: Annotated[float | None, typer.Option(help="Stop before the cost would pass this.")] = None,
    **aliases: Any,
) -> None:
    """Steal a victim model within a query budget; write a run directory with metrics and a report.

    Over HTTP the run is refused (exit 2, nothing charged or written) when the keys
    cannot cover --budget plus the planned evaluation; a final evaluation that still
    fails leaves the run directory written and exits 1; a run the victim stops after
    it started (errors that outlast the retries) keeps its directory, prints the
    command that resumes it and exits 3 (Ctrl-C: 130). --resume on a finished run
    does nothing and charges nothing.
    """
    import torch

    from attacker.accounts import AccountsSpec
    from attacker.endpoint import EndpointOptions
    from attacker.evaluation import EvalConfig
    from attacker.runner import RunSpec, RunStoppedError, run_attack

    overrides = alias_settings(aliases)
    for text in setting or []:
        key, sep, value = text.partition("=")
        if not sep:
            raise ConfigError(f"--set {text!r}: expected KEY=VALUE")
        try:
            overrides[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.replace("-", "_")] = value
    if transfer_epsilons is not None and transfer_epsilon is not None:
        raise ConfigError("give --transfer-epsilons or --transfer-epsilon, not both")
    epsilons: tuple[float, ...] | None = None
    if transfer_epsilons is not None:
        try:
            epsilons = tuple(float(text) for text in transfer_epsilons.split(",") if text.strip())
        except ValueError as exc:
            raise ConfigError(
                f"--transfer-epsilons {transfer_epsilons!r}: expected numbers separated by commas, e.g. 0.05,0.1,0.15"
            ) from exc
    evaluation = EvalConfig(split=eval_split, transfer_epsilons=epsilons,  # type: ignore[arg-type]  # checked there
                            transfer_epsilon=transfer_epsilon, transfer_samples=transfer_samples,
                            reference_epochs=reference_epochs)
    endpoint = _endpoint_options(wire, input_shape, input_range, output_kind, output_name, num_classes)
    headers = _parse_headers(header or [])
    if url is None and (header or endpoint != EndpointOptions()):
        raise ConfigError("--header, --wire, --input-shape, --input-range, --output-kind, --output-name and "
                          "--num-classes describe an HTTP victim: give --url")
    keys = _read_keys(keys_file) if keys_file is not None else ()
    accounts_spec = AccountsSpec(
        count=accounts if accounts is not None else (len(keys) or 1), policy=rotation,  # type: ignore[arg-type]
        retire_flagged=retire_flagged, account_budget=account_budget,
        # The admin key opens accounts only when --accounts asks for them (STEALSIM_ADMIN_KEY may be set for
        # other commands); --keys-file's keys stand in for --api-key (which STEALSIM_API_KEY may set).
        admin_key=admin_key if accounts is not None and not keys else None, keys=keys, account_price=account_price,
        price_per_1000_images=price, currency=currency, rate=rate, image_rate=image_rate,
        clock=clock,  # type: ignore[arg-type]  # checked there
        max_seconds=None if max_hours is None else max_hours * 3600.0, max_cost=max_money)
    if threads is not None:
        torch.set_num_threads(threads)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    try:
        metrics = run_attack(
            RunSpec(
                attack=name, out=out, budget=budget, url=url, api_key=None if keys else api_key, model=model,
                endpoint=endpoint, headers=headers,
                victim_checkpoint=victim_checkpoint,
                victim_output="label" if label_only else "probabilities",
                eval_dataset=eval_dataset, eval_api_key=eval_api_key, eval_every=eval_every,
                seed=seed, device=device, resume=resume, show_progress=not quiet,
                settings=overrides, evaluation=evaluation, accounts=accounts_spec,
            )
        )
    except KeyboardInterrupt:
        typer.echo(_stopped_note(out, budget, resume, "interrupted", accounts_spec.opens_accounts), err=True)
        raise typer.Exit(code=EXIT_INTERRUPTED) from None
    except RunStoppedError as exc:
        typer.echo(f"error: {exc}", err=True)
        typer.echo(_stopped_note(out, budget, resume, "stopped", accounts_spec.opens_accounts), err=True)
        raise typer.Exit(code=EXIT_STOPPED) from None
    except Exception as exc:
        if not isinstance(exc, StealsimError) and (out / "ledger.json").is_file():
            # A crash (a bug) after the run started: the traceback follows, and how to go on.
            typer.echo(_stopped_note(out, budget, resume, "crashed", accounts_spec.opens_accounts), err=True)
        raise
    if metrics.get("already_finished"):
        typer.echo(f"{out} holds a finished run: nothing to resume, nothing charged", err=True)
    shown = ("queries_used", "fidelity", "accuracy", "victim_accuracy", "transfer_success_rate",
             "eval_queries", "planned_eval_queries", "stop_reason", "cost", "accounts_used", "simulated_seconds")
    typer.echo(f"{out}: " + " ".join(f"{k}={metrics.get(k)}" for k in shown))
    if metrics.get("evaluation_error"):
        typer.echo(f"error: final evaluation failed: {metrics['evaluation_error']} "
                   f"(the run directory {out} holds what was measured)", err=True)
        raise typer.Exit(code=EXIT_EVALUATION_FAILED)
