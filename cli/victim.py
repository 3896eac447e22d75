"""The victim's commands: train a checkpoint, serve it, run an inference worker."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cli.options import DataDirOption, DatasetOption, DeviceOption, check_out_dir
from stealsim.errors import ConfigError

__all__ = ["serve", "train", "worker"]


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
    from experiments.victims import NastyObjective, VictimTraining, train_victim
    from stealsim.data import load_dataset
    from stealsim.training import resolve_device

    check_out_dir(out)
    if not nasty and (adversary is not None or tau is not None or omega is not None):
        raise ConfigError("--adversary, --tau and --omega only apply with --nasty")
    if nasty and adversary is None:
        raise ConfigError("--nasty needs --adversary DIR (a normally trained checkpoint)")
    if objective not in ("cross-entropy", "misinformation", "none"):
        raise ConfigError(f"--objective {objective!r}: use cross-entropy, misinformation or none")
    if nasty and objective != "cross-entropy":
        raise ConfigError("--nasty trains with its own objective; leave --objective out")
    training = VictimTraining(
        objective=NastyObjective(adversary, tau, omega) if adversary is not None else objective,  # type: ignore[arg-type]  # checked above
        architecture=arch, epochs=epochs, batch_size=batch_size, learning_rate=lr, seed=seed,
    )
    torch_device = resolve_device(device)
    meta = train_victim(load_dataset(dataset, data_dir), training, out, torch_device, show_progress=not quiet)
    typer.echo(f"{out}: test_accuracy={meta.metrics['test_accuracy']:.4f}")


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
    rate_limits: Annotated[str | None, typer.Option(help="enforce (default: over a limit, 429) or declare (limits published, not applied; or STEALSIM_RATE_LIMITS).")] = None,
    price: Annotated[
        list[str] | None,
        typer.Option("--price", metavar="NAME=PRICE", help="NAME=PRICE: price per 1,000 images of model NAME (repeatable)."),
    ] = None,
    currency: Annotated[str | None, typer.Option(help="Currency of the prices (default USD).")] = None,
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
    for text in price or []:
        name, sep, amount = text.partition("=")
        if not sep or name not in models:
            raise ConfigError(f"--price {text!r}: expected NAME=PRICE for a NAME given with --model")
        try:
            models[name]["price_per_1000_images"] = float(amount)
        except ValueError:
            raise ConfigError(f"--price {text!r}: {amount!r} is not a number") from None
    settings = load_settings(config, {
        "models": models or None, "host": host, "port": port, "device": device,
        "admin_key": admin_key, "watermark_secret": watermark_secret, "max_batch_size": max_batch_size, "max_wait_ms": max_wait_ms,
        "audit_log": audit_log, "torch_threads": torch_threads, "log_json": log_json,
        "inference_graph": inference_graph,
        "redis_url": redis_url, "redis_prefix": redis_prefix, "batching": batching,
        "workers": workers, "rate_limits": rate_limits, "currency": currency,
    })
    if not settings.models:
        raise ConfigError("no models to serve: give --model NAME=DIR (or models: in --config)")
    run_server(settings)


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
    from victim_server.settings import parse_model_flag
    from victim_server.worker import WorkerConfig, serve_checkpoints

    models = dict(parse_model_flag(text) for text in model)
    if dead_after_s <= heartbeat_s:
        raise ConfigError(f"--dead-after-s {dead_after_s} must be longer than --heartbeat-s {heartbeat_s}")
    config = WorkerConfig(
        redis_url=redis_url, redis_prefix=redis_prefix, max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms, claim_idle_ms=claim_idle_ms, name=name,
        heartbeat_s=heartbeat_s, dead_after_s=dead_after_s,
    )
    serve_checkpoints(models, config, device, inference_graph, torch_threads, gil_switch_interval_ms)
