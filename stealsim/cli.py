"""The ``stealsim`` command line: the one place that knows every role.

Each command parses its flags, imports its role lazily, and calls a library
function; a :class:`~stealsim.errors.StealsimError` becomes ``error: ...`` on
stderr and exit status 2, with nothing half-written.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from dataclasses import replace
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from stealsim.errors import ConfigError, StealsimError

__all__ = ["app", "main"]

app = typer.Typer(
    name="stealsim",
    help="Black-box model stealing simulator: victim service, defenses and attacks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Click's plain help: it wraps long option names and descriptions at the terminal's
    # width instead of cutting them with an ellipsis at 80 columns, as rich's tables do.
    rich_markup_mode=None,
    context_settings={"max_content_width": 120},
)

F = TypeVar("F", bound=Callable[..., Any])


def reports_errors(command: F) -> F:
    """Turn the project's errors into a one-line message and exit status 2."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except StealsimError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=2) from exc

    return wrapper  # type: ignore[return-value]


@app.callback()
def _configure(
    log_level: Annotated[str, typer.Option(help="Logging level (DEBUG, INFO, WARNING).")] = "INFO",
) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    logging.basicConfig(
        level=log_level.upper(),
        format="%(name)s: %(message)s",
        # stderr: stdout holds only a command's result (tables, --json objects).
        handlers=[RichHandler(show_path=False, console=Console(stderr=True))],
    )


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")


DatasetOption = Annotated[
    str, typer.Option("--dataset", help="digits, mnist5k, or an on-disk dataset (see --data-dir).")
]
DataDirOption = Annotated[
    Path | None, typer.Option("--data-dir", help="Directory (or .npz file) of an on-disk dataset.")
]
DeviceOption = Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda, cuda:N.")]


@app.command()
@reports_errors
def train(
    dataset: DatasetOption,
    out: Annotated[Path, typer.Option(help="Checkpoint directory to write.")],
    arch: Annotated[
        str | None, typer.Option(help="Architecture; default depends on the input shape.")
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(min=1, help="Epochs [default: 30; a warm-started Nasty Teacher: its setting's].")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    lr: Annotated[float, typer.Option(min=0.0)] = 1e-3,
    seed: int = 0,
    device: DeviceOption = "auto",
    data_dir: DataDirOption = None,
    nasty: Annotated[bool, typer.Option(help="Train a Nasty Teacher (Ma et al., 2021).")] = False,
    adversary: Annotated[
        Path | None, typer.Option(help="Normally trained checkpoint the Nasty Teacher departs from.")
    ] = None,
    tau: Annotated[float | None, typer.Option(help="Nasty Teacher temperature.")] = None,
    omega: Annotated[float | None, typer.Option(help="Nasty Teacher KL weight.")] = None,
    objective: Annotated[
        str, typer.Option(help="cross-entropy (a victim); misinformation (the adaptive-misinformation "
                               "model, Kariyappa & Qureshi 2020 Eq. 3); none (initialised weights only: "
                               "a random MAD proxy).")
    ] = "cross-entropy",
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Train a victim classifier (a Nasty Teacher, or a defender's model) and write its checkpoint."""
    from stealsim.architectures import default_architecture
    from stealsim.checkpoint import save_checkpoint
    from stealsim.data import load_dataset
    from stealsim.training import (
        TrainConfig,
        augmentation_shift,
        resolve_device,
        train_classifier,
    )

    _check_out_dir(out)
    if not nasty and (adversary is not None or tau is not None or omega is not None):
        raise ConfigError("--adversary, --tau and --omega only apply with --nasty")
    if nasty and adversary is None:
        raise ConfigError("--nasty needs --adversary DIR (a normally trained checkpoint)")
    if objective not in ("cross-entropy", "misinformation", "none"):
        raise ConfigError(f"--objective {objective!r}: use cross-entropy, misinformation or none")
    if nasty and objective != "cross-entropy":
        raise ConfigError("--nasty trains with its own objective; leave --objective out")
    torch_device = resolve_device(device)
    data = load_dataset(dataset, data_dir)
    channels, size, _ = data.input_shape
    architecture = arch or default_architecture(channels, size)
    config = TrainConfig(
        epochs=epochs or 30, batch_size=batch_size, learning_rate=lr, seed=seed,
        max_shift=augmentation_shift(size),
    )
    if nasty:
        assert adversary is not None
        from defense.nasty_teacher import settings_for, train_nasty_teacher
        from stealsim.checkpoint import load_checkpoint

        settings = settings_for(data.name, tau, omega)
        if epochs is not None:
            settings = replace(settings, epochs=epochs)
        adversary_model, adversary_meta = load_checkpoint(adversary, torch_device)
        model, meta = train_nasty_teacher(
            data, arch, config, adversary_model, adversary_meta, settings, torch_device,
            show_progress=not quiet,
        )
    elif objective == "none":
        from stealsim.training import untrained_classifier

        model, meta = untrained_classifier(data, architecture, seed)
    else:
        from defense.misinformation import misinformation_loss
        from stealsim.training import cross_entropy_loss

        loss = misinformation_loss if objective == "misinformation" else cross_entropy_loss
        model, meta = train_classifier(
            data, architecture, config, torch_device, loss_fn=loss,
            description=f"train {architecture} ({objective})", show_progress=not quiet,
        )
        meta = meta.model_copy(update={"training": {**meta.training, "objective": objective}})
    meta = save_checkpoint(out, model, meta)
    _write_json(out / "metrics.json", dict(meta.metrics))
    typer.echo(f"{out}: test_accuracy={meta.metrics['test_accuracy']:.4f}")


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise ConfigError(f"--seeds must be comma-separated integers, got {text!r}") from exc
    if not seeds:
        raise ConfigError("--seeds needs at least one seed")
    return seeds


@app.command()
@reports_errors
def distill(
    teacher: Annotated[Path, typer.Option(help="Checkpoint directory of the teacher.")],
    dataset: DatasetOption,
    out: Annotated[Path, typer.Option(help="Directory for metrics.json and softmax.png.")],
    student: Annotated[
        str | None, typer.Option(help="Student architecture; default: a smaller net than the teacher.")
    ] = None,
    alpha: Annotated[float, typer.Option(help="Weight of the KD term.")] = 0.9,
    temperature: Annotated[float, typer.Option(help="KD temperature T.")] = 4.0,
    epochs: Annotated[int, typer.Option(min=1)] = 30,
    seed: int = 0,
    compare_teacher: Annotated[
        Path | None, typer.Option(help="Another teacher to plot beside this one (normal vs nasty).")
    ] = None,
    device: DeviceOption = "auto",
    data_dir: DataDirOption = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Distil a student from a teacher; compare with the same student trained on labels."""
    from stealsim.architectures import default_student_architecture
    from stealsim.checkpoint import load_checkpoint
    from stealsim.data import load_dataset
    from stealsim.distill import DistillConfig, distillation_check
    from stealsim.plots import one_image_per_class, plot_softmax_distributions
    from stealsim.training import TrainConfig, augmentation_shift, resolve_device

    _check_out_dir(out)
    torch_device = resolve_device(device)
    data = load_dataset(dataset, data_dir)
    teachers = {"teacher": load_checkpoint(teacher, torch_device)}
    if compare_teacher is not None:
        teachers["compared"] = load_checkpoint(compare_teacher, torch_device)
    for path, (_, meta) in zip((teacher, compare_teacher), teachers.values(), strict=False):
        if tuple(meta.input_shape) != data.input_shape or meta.num_classes != data.num_classes:
            raise ConfigError(
                f"teacher {path} takes {tuple(meta.input_shape)} with {meta.num_classes} classes; "
                f"dataset {dataset} has {data.input_shape} with {data.num_classes}"
            )
    channels, size, _ = data.input_shape
    config = DistillConfig(
        alpha, temperature,
        TrainConfig(epochs=epochs, seed=seed, max_shift=augmentation_shift(size)),
    )
    architecture = student or default_student_architecture(channels, size)
    model = teachers["teacher"][0]
    result = distillation_check(model, data, architecture, config, torch_device, not quiet)
    metrics = result.as_metrics() | {"alpha": alpha, "temperature": temperature}
    _write_json(out / "metrics.json", {**metrics, "student_architecture": architecture})
    picks = one_image_per_class(data.y_test, 4)
    names = {"teacher": teacher.name, "compared": compare_teacher.name if compare_teacher else ""}
    plot_softmax_distributions(
        {names[key]: loaded[0] for key, loaded in teachers.items()},
        data.x_test[picks], data.y_test[picks], data.class_names, temperature, out / "softmax.png",
    )
    typer.echo(
        f"teacher {result.teacher_accuracy:.4f}  student {result.student_accuracy:.4f}  "
        f"baseline student {result.baseline_student_accuracy:.4f}  -> {out / 'metrics.json'}"
    )


@app.command("nasty-study")
@reports_errors
def nasty_study(
    dataset: DatasetOption,
    out: Annotated[Path, typer.Option(help="Directory for checkpoints, results.json, table.md, softmax.png.")],
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds.")] = "0,1,2",
    arch: Annotated[str | None, typer.Option(help="Teacher architecture.")] = None,
    student: Annotated[str | None, typer.Option(help="Student architecture.")] = None,
    tau: Annotated[float | None, typer.Option(help="Nasty Teacher temperature.")] = None,
    omega: Annotated[float | None, typer.Option(help="Nasty Teacher KL weight.")] = None,
    alpha: Annotated[
        float | None, typer.Option(help="Students' KD weight (default: the dataset's, else 0.9).")
    ] = None,
    temperature: Annotated[
        float | None, typer.Option(help="Students' KD temperature T (default: the dataset's, else the Nasty tau).")
    ] = None,
    epochs: Annotated[int, typer.Option(min=1, help="Teachers' epochs (and students', unless set apart).")] = 30,
    student_epochs: Annotated[
        int | None, typer.Option(min=1, help="Students' epochs, KD and labels-only (default: the dataset's, else --epochs).")
    ] = None,
    device: DeviceOption = "auto",
    data_dir: DataDirOption = None,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Train normal and Nasty teachers and compare students distilled from each."""
    from defense.nasty_study import markdown_table, run_nasty_study
    from defense.nasty_teacher import settings_for
    from stealsim.architectures import default_architecture, default_student_architecture
    from stealsim.data import load_dataset
    from stealsim.distill import DistillConfig
    from stealsim.training import TrainConfig, augmentation_shift, resolve_device

    _check_out_dir(out)
    seed_list = _parse_seeds(seeds)
    torch_device = resolve_device(device)
    data = load_dataset(dataset, data_dir)
    protocol: dict[str, Any] = {"kd_alpha": alpha, "kd_temperature": temperature, "student_epochs": student_epochs}
    settings = replace(settings_for(data.name, tau, omega), **{k: v for k, v in protocol.items() if v is not None})
    channels, size, _ = data.input_shape
    architecture = arch or default_architecture(channels, size)
    config = DistillConfig(
        settings.student_alpha, settings.student_temperature,
        TrainConfig(epochs=epochs, max_shift=augmentation_shift(size)),
    )
    results = run_nasty_study(
        data, architecture, student or default_student_architecture(channels, size), settings,
        config, seed_list, out,
        torch_device, not quiet,
    )
    typer.echo(markdown_table(results))


def _interrupted_message(out: Path, budget: int, resumed: bool) -> str:
    """Where an interrupted attack stopped, read back from its run directory, and how to go on."""
    from attacker.rundir import RunDirectory

    run_dir = RunDirectory(out)
    if not (out / "config.json").is_file():
        return "interrupted before the run started: nothing was written"
    try:
        used = run_dir.read_ledger().attack_queries
        history = run_dir.read_history()
    except (StealsimError, ValueError, TypeError):
        return f"interrupted; rerun the same command with --resume to continue the run in {out}"
    checkpoint = "no checkpoint yet (training restarts, the query count does not)"
    if (out / "checkpoint.pt").is_file() and history:
        checkpoint = f"training resumes from its checkpoint at {int(history[-1]['queries']):,} queries"
    again = "the same command" if resumed else "the same command with --resume"
    return (f"interrupted at {used:,} of {budget:,} queries; {checkpoint}. "
            f"Rerun {again} to continue the run in {out}.")


@app.command()
@reports_errors
def serve(
    model: Annotated[
        list[str] | None,
        typer.Option("--model", metavar="NAME=DIR", help="NAME=DIR: serve the checkpoint DIR as NAME (repeatable)."),
    ] = None,
    policy: Annotated[
        list[str] | None,
        typer.Option("--policy", metavar="NAME=JSON", help='NAME=JSON: output policy of model NAME, e.g. victim=\'[{"name": "top_k", "k": 3}]\'.'),
    ] = None,
    config: Annotated[Path | None, typer.Option(help="YAML settings file (flags and STEALSIM_* env win).")] = None,
    host: Annotated[str | None, typer.Option(help="Address to bind (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port to bind (default 8000).")] = None,
    device: Annotated[str | None, typer.Option(help="auto (CUDA when present), cpu, cuda, cuda:N.")] = None,
    admin_key: Annotated[str | None, typer.Option(help="Admin key of /v1/admin (or STEALSIM_ADMIN_KEY).")] = None,
    watermark_secret: Annotated[str | None, typer.Option(help="Secret of the watermark step's hash (or STEALSIM_WATERMARK_SECRET).")] = None,
    max_batch_size: Annotated[int | None, typer.Option(min=1, help="Images per forward pass (default 64).")] = None,
    max_wait_ms: Annotated[float | None, typer.Option(min=0.0, help="Batching wait after the first request (default 0.5).")] = None,
    audit_log: Annotated[Path | None, typer.Option(help="JSONL audit file (default: in memory).")] = None,
    torch_threads: Annotated[int | None, typer.Option(min=1, help="torch.set_num_threads for inference.")] = None,
    inference_graph: Annotated[str | None, typer.Option(help="torchscript (default: a frozen graph, the GIL dropped once per forward) or eager.")] = None,
    log_json: Annotated[bool | None, typer.Option("--log-json/--log-text", help="Structured JSON logs.")] = None,
    redis_url: Annotated[str | None, typer.Option(help="Redis for keys, usage, limits, audit, PRADA (shared by API processes).")] = None,
    redis_prefix: Annotated[str | None, typer.Option(help="Namespace of the Redis keys (default stealsim).")] = None,
    batching: Annotated[str | None, typer.Option(help="local (in-process, default) or redis (Streams + `stealsim worker`).")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="API processes on the port (needs --redis-url when > 1).")] = None,
) -> None:
    """Serve checkpoints over the Open Inference Protocol with keys, budgets and defenses."""
    from victim_server.server import serve as run_server
    from victim_server.settings import load_settings, parse_model_flag

    models: dict[str, dict[str, object]] = {}
    for text in model or []:
        name, directory = parse_model_flag(text)
        models[name] = {"path": directory}
    for text in policy or []:
        name, sep, spec = text.partition("=")
        if not sep or name not in models:
            raise ConfigError(f"--policy {text!r}: expected NAME=JSON for a NAME given with --model")
        try:
            models[name]["policy"] = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--policy {name}: invalid JSON: {exc}") from exc
    settings = load_settings(config, {
        "models": models or None, "host": host, "port": port, "device": device,
        "admin_key": admin_key, "watermark_secret": watermark_secret, "max_batch_size": max_batch_size, "max_wait_ms": max_wait_ms,
        "audit_log": audit_log, "torch_threads": torch_threads, "log_json": log_json,
        "inference_graph": inference_graph,
        "redis_url": redis_url, "redis_prefix": redis_prefix, "batching": batching,
        "workers": workers,
    })
    if not settings.models:
        raise ConfigError("no models to serve: give --model NAME=DIR (or models: in --config)")
    run_server(settings)


@app.command()
@reports_errors
def worker(
    redis_url: Annotated[str, typer.Option(help="Redis the API enqueues to (redis://HOST:6379).")],
    model: Annotated[list[str], typer.Option("--model", metavar="NAME=DIR", help="NAME=DIR: serve requests for NAME (repeatable).")],
    redis_prefix: Annotated[str, typer.Option(help="Namespace of the Redis keys (as the API's).")] = "stealsim",
    device: DeviceOption = "auto",
    max_batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 256,
    max_wait_ms: Annotated[float, typer.Option(min=0.0, help="Batching wait after the first entry.")] = 2.0,
    dead_after_s: Annotated[float, typer.Option(min=0.01, help="A worker without a heartbeat this long is dead: its entries are served at once.")] = 1.5,
    heartbeat_s: Annotated[float, typer.Option(min=0.01, help="Heartbeat (and dead-worker check) interval.")] = 0.5,
    claim_idle_ms: Annotated[int, typer.Option(min=1, help="Safety net: claim any entry pending this long on another worker.")] = 10_000,
    torch_threads: Annotated[int | None, typer.Option(min=1, help="torch.set_num_threads for inference.")] = None,
    inference_graph: Annotated[str, typer.Option(help="torchscript (a frozen graph) or eager.")] = "torchscript",
    gil_switch_interval_ms: Annotated[float, typer.Option(min=0.001, help="sys.setswitchinterval, in ms (Python's default: 5).")] = 1.0,
    name: Annotated[str | None, typer.Option(help="Consumer name (default host-pid-random).")] = None,
) -> None:
    """Inference worker of `serve --batching redis`: reads a Redis Stream per model, batches, replies."""
    import torch

    from stealsim.training import resolve_device
    from victim_server.runner import load_runners
    from victim_server.settings import parse_model_flag
    from victim_server.worker import WorkerConfig, run_worker

    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    models = dict(parse_model_flag(text) for text in model)
    if dead_after_s <= heartbeat_s:
        raise ConfigError(f"--dead-after-s {dead_after_s} must be longer than --heartbeat-s {heartbeat_s}")
    config = WorkerConfig(
        redis_url=redis_url, redis_prefix=redis_prefix, max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms, claim_idle_ms=claim_idle_ms, name=name,
        heartbeat_s=heartbeat_s, dead_after_s=dead_after_s,
    )
    if inference_graph not in ("torchscript", "eager"):
        raise ConfigError(f"--inference-graph {inference_graph!r}: choose torchscript or eager")
    sys.setswitchinterval(gil_switch_interval_ms / 1000.0)
    runners = load_runners(models, resolve_device(device), inference_graph)  # type: ignore[arg-type]
    run_worker({key: runner.predict_batch for key, runner in runners.items()}, config)


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


@app.command()
@reports_errors
def attack(
    name: Annotated[str, typer.Argument(help="dual-student, dfme, random, ensemble or knockoff.")],
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
        str | None, typer.Option(metavar="C,H,W", help="Per-example input shape where the metadata does not tell it: C,H,W, H,W or D.")
    ] = None,
    input_range: Annotated[
        str | None, typer.Option(metavar="LOW,HIGH", help="Pixel range the model takes (default: the metadata's, else 0,1).")
    ] = None,
    output_kind: Annotated[
        str | None, typer.Option(help="probabilities, logits or label (default: the metadata's, else by datatype).")
    ] = None,
    output_name: Annotated[str | None, typer.Option(help="Output to request where the metadata declares none.")] = None,
    num_classes: Annotated[int | None, typer.Option(min=2, help="Classes, where the metadata does not tell them.")] = None,
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
    hard_label: Annotated[bool, typer.Option(help="Train on the victim's arg-max only.")] = False,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Images per victim request.")] = None,
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
    uq: Annotated[str | None, typer.Option(help="ensemble: deep-ensemble, mc-dropout, snapshot, swag or laplace.")] = None,
    members: Annotated[int | None, typer.Option(min=1, help="ensemble: number of members.")] = None,
    member_arch: Annotated[
        list[str] | None, typer.Option("--member-arch", metavar="ARCH", help="ensemble: members' architectures (repeatable, cycled).")
    ] = None,
    diversity: Annotated[float | None, typer.Option(min=0.0, help="ensemble: weight of the diversity term.")] = None,
    source: Annotated[str | None, typer.Option(help="ensemble: queries from the generator or surrogate data.")] = None,
    surrogate: Annotated[
        str | None, typer.Option(help="ensemble/knockoff: dataset name or image directory (default: the other built-in).")
    ] = None,
    surrogate_dir: Annotated[str | None, typer.Option(help="--data-dir of an on-disk surrogate dataset.")] = None,
    surrogate_split: Annotated[str | None, typer.Option(help="train, test or all of the surrogate dataset.")] = None,
    sampling: Annotated[str | None, typer.Option(help="knockoff: random or adaptive (bandit over classes).")] = None,
    preset: Annotated[
        str | None, typer.Option(help="dual-student: tuned (our defaults) or reference (the authors' code's settings).")
    ] = None,
) -> None:
    """Steal a victim model within a query budget; write a run directory with metrics and a report.

    Over HTTP the run is refused (exit 2, nothing charged or written) when the keys
    cannot cover --budget plus the planned evaluation; a final evaluation that still
    fails leaves the run directory written and exits 1.
    """
    import torch

    from attacker.endpoint import EndpointOptions
    from attacker.evaluation import EvalConfig
    from attacker.runner import RunSpec, run_attack

    overrides: dict[str, Any] = {"hard_label": hard_label or None, "batch_size": batch_size}
    overrides.update(uq=uq, members=members, architectures=member_arch or None, diversity_weight=diversity,
                     source=source, surrogate=surrogate, surrogate_dir=surrogate_dir,
                     surrogate_split=surrogate_split, sampling=sampling, preset=preset)
    for text in setting or []:
        key, sep, value = text.partition("=")
        if not sep:
            raise ConfigError(f"--set {text!r}: expected KEY=VALUE")
        try:
            overrides[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.replace("-", "_")] = value
    if eval_split not in ("test", "validation"):
        raise ConfigError(f"--eval-split {eval_split!r}: choose test or validation")
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
    endpoint = _endpoint_options(wire, input_shape, input_range, output_kind, output_name, num_classes)
    headers = _parse_headers(header or [])
    if url is None and (header or endpoint != EndpointOptions()):
        raise ConfigError("--header, --wire, --input-shape, --input-range, --output-kind, --output-name and "
                          "--num-classes describe an HTTP victim: give --url")
    if threads is not None:
        torch.set_num_threads(threads)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    try:
        metrics = run_attack(
            RunSpec(
                attack=name, out=out, budget=budget, url=url, api_key=api_key, model=model,
                endpoint=endpoint, headers=headers,
                victim_checkpoint=victim_checkpoint,
                victim_output="label" if label_only else "probabilities",
                eval_dataset=eval_dataset, eval_api_key=eval_api_key, eval_every=eval_every,
                seed=seed, device=device, resume=resume, show_progress=not quiet,
                settings=overrides,
                evaluation=EvalConfig(split="validation" if eval_split == "validation" else "test",
                                      transfer_epsilons=epsilons,
                                      transfer_epsilon=transfer_epsilon, transfer_samples=transfer_samples,
                                      reference_epochs=reference_epochs),
            )
        )
    except KeyboardInterrupt:
        typer.echo(_interrupted_message(out, budget, resume), err=True)
        raise typer.Exit(code=130) from None
    shown = ("queries_used", "fidelity", "accuracy", "victim_accuracy", "transfer_success_rate",
             "eval_queries", "planned_eval_queries", "stop_reason")
    typer.echo(f"{out}: " + " ".join(f"{k}={metrics.get(k)}" for k in shown))
    if metrics.get("evaluation_error"):
        typer.echo(f"error: final evaluation failed: {metrics['evaluation_error']} "
                   f"(the run directory {out} holds what was measured)", err=True)
        raise typer.Exit(code=1)


@app.command("verify-watermark")
@reports_errors
def verify_watermark(
    suspects: Annotated[list[Path], typer.Argument(
        help="Suspected clones: run directories of `stealsim attack` (clone.ts), TorchScript files, "
             "or checkpoint directories (model.json).")],
    record: Annotated[Path | None, typer.Option(
        help="The key's watermark record (.npz), as saved by --save-record.")] = None,
    url: Annotated[str | None, typer.Option(help="Fetch the record from this victim service instead.")] = None,
    admin_key: Annotated[str | None, typer.Option(envvar="STEALSIM_ADMIN_KEY", help="Admin key of --url.")] = None,
    key_id: Annotated[str | None, typer.Option(help="The suspected thief's key id (key_...).")] = None,
    model: Annotated[str | None, typer.Option(help="The model name at --url.")] = None,
    save_record: Annotated[Path | None, typer.Option(help="Write the fetched record here (.npz).")] = None,
    alpha: Annotated[float, typer.Option(min=0.0, max=1.0, help="Significance level of the verdict.")] = 1e-3,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per suspect instead of a table.")] = False,
) -> None:
    """Test suspected clones for the DAWN watermark a key was served (Szyller et al., 2021):
    matches of the watermark labels against Binomial(n, 1/(K-1)), one-sided p-value."""
    import httpx

    from defense.watermark import WatermarkRecord, load_suspect, verify

    logging.getLogger("httpx").setLevel(logging.WARNING)
    if (record is None) == (url is None):
        raise ConfigError("give either --record FILE or --url (with --admin-key, --key-id and --model)")
    if url is not None:
        if not (admin_key and key_id and model):
            raise ConfigError("--url needs --admin-key, --key-id and --model")
        try:
            response = httpx.get(f"{url.rstrip('/')}/v1/admin/keys/{key_id}/watermark", params={"model": model},
                                 headers={"X-API-Key": admin_key}, timeout=60.0)
        except httpx.TransportError as exc:
            raise ConfigError(f"cannot reach {url}: {exc}") from exc
        if response.status_code != 200:
            raise ConfigError(f"fetching the watermark record failed: {response.status_code} {response.text[:300]}")
        data = response.content
        if save_record is not None:
            save_record.write_bytes(data)
    else:
        assert record is not None
        if not record.is_file():
            raise ConfigError(f"--record {record}: no such file")
        data = record.read_bytes()
    try:
        marked = WatermarkRecord.from_bytes(data).distinct()
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"not a watermark record: {exc}") from exc
    if len(marked) == 0:
        raise ConfigError("the record holds no watermarked answers: nothing to verify")
    rows = []
    for suspect in suspects:
        verdict = verify(marked, load_suspect(suspect)(marked.images), alpha)
        rows.append({"suspect": str(suspect), "marked": verdict.marked, "matches": verdict.matches,
                     "match_rate": verdict.match_rate, "victim_agreement": verdict.victim_agreement,
                     "null_rate": verdict.null_rate, "p_value": verdict.p_value, "stolen": verdict.stolen})
    if json_out:
        for row in rows:
            typer.echo(json.dumps(row))
        return
    typer.echo(f"{len(marked)} distinct watermarked inputs; an innocent model matches at most "
               f"{rows[0]['null_rate']:.3f} of them on average; verdict at p < {alpha:g}")
    typer.echo("| suspect | matches | match rate | victim agreement | p-value | verdict |")
    typer.echo("|---|---:|---:|---:|---:|---|")
    for row in rows:
        typer.echo(f"| {row['suspect']} | {row['matches']}/{row['marked']} | {row['match_rate']:.3f} | "
                   f"{row['victim_agreement']:.3f} | {row['p_value']:.2e} | "
                   f"{'copy (watermark found)' if row['stolen'] else 'no evidence'} |")


@app.command("ood-fit")
@reports_errors
def ood_fit(
    checkpoint: Annotated[Path, typer.Option(help="The encoder: a checkpoint directory (the victim's own fits).")],
    dataset: Annotated[str, typer.Option(help="The defender's data (built-in or on disk): train split fits, "
                                              "validation split sets tau.")],
    out: Annotated[Path, typer.Option(help="Statistics file to write (.safetensors).")],
    data_dir: DataDirOption = None,
    honest_rate: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of validation images over tau.")] = 0.01,
) -> None:
    """Fit the Mahalanobis OOD statistics of ood_rate's score=mahalanobis (Lee et al., NeurIPS 2018):
    class means and shared covariance of the checkpoint's penultimate features; prints them as JSON."""
    import numpy as np

    from defense.mahalanobis import fit_feature_gaussian
    from stealsim.data import load_dataset
    from victim_server.defender_models import DefenderModels

    data = load_dataset(dataset, data_dir)
    models = DefenderModels()
    models.load(checkpoint)  # a clear error for a bad checkpoint before any work

    def features(images: Any) -> Any:
        return np.concatenate([models.features(checkpoint, images[i:i + 1024].numpy(), normalise=False)
                               for i in range(0, len(images), 1024)])

    gaussian = fit_feature_gaussian(features(data.x_train), data.y_train.numpy(), features(data.x_val),
                                    honest_rate=honest_rate)
    gaussian.save(out, encoder=str(checkpoint))
    test_rate = float((gaussian.distances(features(data.x_test)) > gaussian.tau).mean())
    typer.echo(json.dumps({"statistics": str(out), "encoder": str(checkpoint), "dataset": dataset,
                           "tau": gaussian.tau, "honest_rate": honest_rate, "dimension": gaussian.dimension,
                           "classes": len(gaussian.means), "test_share_over_tau": test_rate}))


@app.command()
@reports_errors
def honest(
    url: Annotated[str, typer.Option(help="The victim service (http://HOST:PORT).")],
    api_key: Annotated[str, typer.Option(envvar="STEALSIM_API_KEY", help="The honest user's API key.")],
    model: Annotated[str, typer.Option(help="Model name at --url.")] = "victim",
    dataset: Annotated[str, typer.Option(help="Dataset whose natural images are sent (built-in or on disk).")] = "digits",
    data_dir: DataDirOption = None,
    split: Annotated[str, typer.Option(help="Split sent: test, or validation while calibrating a detector.")] = "test",
    batch: Annotated[int, typer.Option(min=1, help="Images per request.")] = 32,
    rate: Annotated[float, typer.Option(min=0.0, help="Requests per second at most (0: back to back).")] = 0.0,
    passes: Annotated[int, typer.Option(min=1, help="Passes over the split (a longer stream).")] = 1,
    shuffle: Annotated[bool, typer.Option(help="A new random order in every pass.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of --shuffle's order.")] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object instead of a table.")] = False,
) -> None:
    """An honest user: natural images through a key like any client; accuracy, ECE and latency of the
    answers, and whether a detector flagged or blocked the key (false positives of a defense)."""
    from experiments.honest import HonestSettings, honest_traffic
    from stealsim.data import load_dataset

    logging.getLogger("httpx").setLevel(logging.WARNING)
    if split not in ("test", "validation"):
        raise ConfigError(f"--split must be test or validation, got {split!r}")
    settings = HonestSettings(split=split, batch=batch, rate=rate, passes=passes, shuffle=shuffle,  # type: ignore[arg-type]
                              seed=seed)
    result = honest_traffic(url.rstrip("/"), api_key, model, load_dataset(dataset, data_dir), settings)
    if json_out:
        typer.echo(json.dumps(result.to_dict()))
    else:
        typer.echo(f"{result.images} images in {result.requests} requests: accuracy {result.accuracy:.4f}, "
                   f"ECE {result.ece:.4f}, latency {result.latency_ms_mean:.1f} ms mean / "
                   f"{result.latency_ms_p95:.1f} ms p95; flags: {result.flags or 'none'}"
                   + (f"; refused after {result.blocked_at} images: {result.refusal}"
                      if result.blocked_at is not None else ""))
    if result.flags or result.blocked_at is not None:
        raise typer.Exit(code=3)


@app.command()
@reports_errors
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run directories written by `stealsim attack`.")],
    plot: Annotated[Path | None, typer.Option(
        help="Also draw fidelity and accuracy against queries here (PNG): a panel per metric, "
             "each group's mean over seeds with a ±1 std band.")] = None,
    per_run: Annotated[bool, typer.Option(
        "--per-run", help="One row (and curve) per run instead of aggregating over seeds.")] = False,
    label: Annotated[list[str] | None, typer.Option(
        metavar="LABEL", help="Group by these labels instead of by config: one per RUN, in order (repeat the option).")] = None,
    reference: Annotated[list[Path] | None, typer.Option(
        metavar="CSV", help="Published points drawn as markers on --plot: a CSV of method,queries,accuracy_percent "
                            "(or fidelity[_percent]), # comments citing the source (repeatable).")] = None,
    curve: Annotated[list[str] | None, typer.Option(
        metavar="METRIC", help="History metrics drawn on --plot, a panel each (repeatable; default fidelity "
                               "and accuracy; e.g. answer_top_share, student_disagreement).")] = None,
) -> None:
    """Compare attack runs in one markdown table: runs that differ only by seed are one group
    (mean ± std (min) per metric, n seeds, the random baseline beside each attack)."""
    from attacker.report import aggregate_runs, compare_runs, read_reference_points

    references = [point for path in reference or [] for point in read_reference_points(path)]
    if references and plot is None:
        raise ConfigError("--reference draws markers on --plot: give --plot too")
    if per_run:
        if label or references or curve:
            raise ConfigError("--label, --reference and --curve work on groups; they have no meaning with --per-run")
        typer.echo(compare_runs(runs, plot), nl=False)
    else:
        typer.echo(aggregate_runs(runs, plot, labels=label or None, references=references,
                                  curves=curve or ("fidelity", "accuracy")), nl=False)


@app.command()
@reports_errors
def demo(
    quick: Annotated[bool, typer.Option(help="Small victims and budgets (about 1-2 minutes; the CI smoke test).")] = False,
    out: Annotated[Path, typer.Option(help="Directory of the runs, summary.json and report.md.")] = Path("runs/demo"),
    cache_dir: Annotated[Path, typer.Option(help="Cache of trained victims, keyed by their settings.")] = Path("runs/cache"),
    attack: Annotated[
        list[str] | None,
        typer.Option("--attack", metavar="NAME[=BUDGET]", help="NAME or NAME=BUDGET: attack to run (repeatable; default: every registered attack)."),
    ] = None,
    budget: Annotated[int | None, typer.Option(min=1, help="Attack queries per run [default: 20000; --quick 1000].")] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Victim training epochs [default: 30; --quick 4].")] = None,
    seed: int = 0,
    threads: Annotated[int, typer.Option(min=1, help="torch threads of the attacks.")] = 2,
    url: Annotated[str | None, typer.Option(help="Attack this running service instead of starting one.")] = None,
    admin_key: Annotated[
        str | None, typer.Option(envvar="STEALSIM_ADMIN_KEY", help="Admin key of the service at --url.")
    ] = None,
    normal_model: Annotated[str, typer.Option(help="Model name of the normal victim at --url.")] = "normal",
    nasty_model: Annotated[str, typer.Option(help="Model name of the Nasty Teacher at --url.")] = "nasty",
    victims_only: Annotated[
        bool, typer.Option(help="Only train (or reuse) the victims and copy them to OUT/victims/{normal,nasty}.")
    ] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """The end-to-end demo: victims, the service, every attack over HTTP, one table and a report."""
    from experiments.demo import DemoConfig, run_demo
    from experiments.victims import VictimSettings

    _check_out_dir(out)
    victims = None
    if epochs is not None:
        victims = VictimSettings(epochs=epochs, nasty_epochs=epochs)
    attacks: dict[str, int | None] = {}
    for text in attack or []:
        name, sep, value = text.partition("=")
        try:
            attacks[name] = int(value) if sep else None
        except ValueError as exc:
            raise ConfigError(f"--attack {text!r}: expected NAME or NAME=BUDGET (an integer)") from exc
    config = DemoConfig.standard(
        out, quick, victims=victims, cache_dir=cache_dir, attacks=tuple(attacks) or None,
        budgets={name: value for name, value in attacks.items() if value is not None},
        budget=budget, seed=seed, threads=threads, url=url, admin_key=admin_key,
        models={"normal": normal_model, "nasty": nasty_model}, victims_only=victims_only,
        show_progress=not quiet,
    )
    result = run_demo(config, announce=lambda text: typer.secho(text, bold=True, err=True))
    typer.echo(f"{result.summary_path}  {result.report_path}  ({result.wall_seconds:.0f} s)")
    if result.status != "done":
        raise typer.Exit(code=1)


@app.command()
@reports_errors
def grid(
    spec: Annotated[Path, typer.Argument(help="Grid spec (YAML; see examples/grid.yaml).")],
    out: Annotated[Path, typer.Option(help="Directory of results.csv, defenses.csv, report.md (resumed).")] = Path("runs/grid"),
    cache_dir: Annotated[Path, typer.Option(help="Cache of trained victims (in-process runs).")] = Path("runs/cache"),
    redis_url: Annotated[
        str | None, typer.Option(help="Run the cells as jobs on this Redis (consumed by `stealsim grid-worker`).")
    ] = None,
    queue: Annotated[str, typer.Option(help="rq queue name of the jobs (with --redis-url).")] = "stealsim-grid",
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Attacks x victims x API defenses x budgets x seeds: resumable, in-process or on Redis workers."""
    from experiments.grid import load_spec, run_grid

    _check_out_dir(out)
    rows = run_grid(load_spec(spec), out, cache_dir=cache_dir, redis_url=redis_url, queue=queue,
                    show_progress=not quiet, announce=lambda text: typer.secho(text, bold=True, err=True))
    failed = sum(row["status"] != "done" for row in rows)
    typer.echo(f"{out / 'results.csv'}: {len(rows)} rows ({failed} failed), report {out / 'report.md'}")
    if failed:
        raise typer.Exit(code=1)


@app.command("grid-worker")
@reports_errors
def grid_worker(
    redis_url: Annotated[str, typer.Option(help="Redis holding the grid's queue (redis://HOST:6379).")],
    queue: Annotated[list[str] | None, typer.Option("--queue", metavar="NAME", help="rq queue to consume (repeatable).")] = None,
    work_dir: Annotated[Path, typer.Option(help="Directory of this worker's runs and service log.")] = Path("runs/grid-worker"),
    cache_dir: Annotated[Path, typer.Option(help="Cache of trained victims on this host.")] = Path("runs/cache"),
    burst: Annotated[bool, typer.Option(help="Exit when the queues are empty.")] = False,
    name: Annotated[str | None, typer.Option(help="Worker name (default: rq's).")] = None,
) -> None:
    """Run grid cells from a Redis queue (rq), with a victim service of this worker's own."""
    from experiments.grid_worker import WorkerOptions, run_grid_worker

    run_grid_worker(redis_url, queue or ["stealsim-grid"], WorkerOptions(work_dir, cache_dir),
                    burst=burst, name=name)


@app.command("uq-study")
@reports_errors
def uq_study(
    spec: Annotated[Path, typer.Argument(help="Study spec (YAML; see examples/uq-study-digits.yaml).")],
    out: Annotated[Path, typer.Option(help="Directory of results.csv, curves.jsonl, report.md (resumed).")] = Path("runs/uq-study"),
    cache_dir: Annotated[Path, typer.Option(help="Cache of trained victims (local runs).")] = Path("runs/cache"),
    jobs: Annotated[int, typer.Option(min=1, help="Cells run at once in local processes (one per core).")] = 1,
    redis_url: Annotated[
        str | None, typer.Option(help="Run the cells as jobs on this Redis (consumed by `stealsim grid-worker`).")
    ] = None,
    queue: Annotated[str, typer.Option(help="rq queue name of the jobs (with --redis-url).")] = "stealsim-grid",
) -> None:
    """The UQ stealing study (Pape et al. 2023): UQ kinds x query sources x diversity x seeds, resumable."""
    from experiments.uq_study import load_uq_spec, run_uq_study

    _check_out_dir(out)
    rows = run_uq_study(load_uq_spec(spec), out, cache_dir=cache_dir, jobs=jobs, redis_url=redis_url, queue=queue,
                        announce=lambda text: typer.secho(text, bold=True, err=True))
    failed = sum(row["status"] != "done" for row in rows)
    typer.echo(f"{out / 'results.csv'}: {len(rows)} rows ({failed} failed), report {out / 'report.md'}")
    if failed:
        raise typer.Exit(code=1)


def main() -> None:
    """Entry point of the ``stealsim`` console script.

    Before any command: Ctrl-C raises KeyboardInterrupt whatever the launcher left
    (SIGINT ignored under ``nohup`` or ``&``), and a child of another stealsim
    process ends when that parent does (see :mod:`stealsim.processes`).
    """
    from stealsim.processes import die_with_parent, restore_interrupts

    restore_interrupts()
    die_with_parent()
    app(prog_name="stealsim")


if __name__ == "__main__":
    main()
    sys.exit(0)
