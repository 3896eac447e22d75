"""The HTTP client's cost: the negotiating client of today beside the client of an earlier commit.

Starts a real ``stealsim serve`` (digits victim) and sends the same batches of
images through both clients, interleaved round by round so that both see the
same machine load: binary tensors (what both use against stealsim's server) and
JSON. Prints one JSON document with images/s per client and wire and the ratio
today / baseline (1.0: no slowdown). The baseline is ``attacker/client.py`` as
of ``--baseline-commit`` (default: the last commit before the negotiating
client), loaded from git::

    .venv/bin/python benchmarks/client.py --rounds 20 --requests 20 --batch 256
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from attacker.client import HttpVictim
from attacker.endpoint import EndpointOptions
from experiments.service import ServiceProcess, create_key, new_admin_key

BASELINE_COMMIT = "e7b5096"
"""The last commit with the client that always sent binary tensors (before attacker/endpoint.py)."""


def baseline_client(commit: str, root: Path) -> Any:
    """``attacker/client.py`` of ``commit`` as a module of its own."""
    source = subprocess.run(["git", "show", f"{commit}:attacker/client.py"], check=True, capture_output=True,
                            text=True, cwd=root).stdout
    path = Path(tempfile.mkdtemp()) / "baseline_client.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_client", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(victim: Any, batches: list[torch.Tensor]) -> float:
    started = time.perf_counter()
    for images in batches:
        victim.query(images)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-commit", default=BASELINE_COMMIT)
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds per client and wire")
    parser.add_argument("--requests", type=int, default=20, help="requests per round")
    parser.add_argument("--batch", type=int, default=256, help="images per request")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-client"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    from attack import ensure_victim

    args.out.mkdir(parents=True, exist_ok=True)
    victim_dir = ensure_victim("digits", args.out)
    old = baseline_client(args.baseline_commit, root)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.rand(args.batch, 1, 8, 8, generator=generator) for _ in range(args.requests)]
    admin = new_admin_key()
    images = 2 * 2 * args.rounds * args.requests * args.batch + 10 * args.batch
    seconds: dict[str, list[float]] = {name: [] for name in
                                       ("binary today", "binary baseline", "json today", "json baseline")}
    with ServiceProcess({"victim": victim_dir}, admin_key=admin, log_path=args.out / "service.log") as service:
        key = create_key(service.url, admin, images, name="client-benchmark")
        clients = {
            "binary today": HttpVictim(service.url, key, "victim"),
            "binary baseline": old.HttpVictim(service.url, key, "victim"),
            "json today": HttpVictim(service.url, key, "victim", options=EndpointOptions(wire="json")),
            "json baseline": old.HttpVictim(service.url, key, "victim", binary=False),
        }
        assert clients["binary today"].endpoint.wire == "binary"
        for name, client in clients.items():  # warm-up, and both answer alike
            assert torch.allclose(client.query(batches[0]), clients["binary baseline"].query(batches[0]),
                                  atol=1e-6), name
        for _ in range(args.rounds):
            for name, client in clients.items():
                seconds[name].append(timed(client, batches))
        for client in clients.values():
            client.close()
    per_round = args.requests * args.batch
    result: dict[str, Any] = {"batch": args.batch, "requests_per_round": args.requests, "rounds": args.rounds,
                              "baseline_commit": args.baseline_commit}
    for name, values in seconds.items():
        rates = [per_round / s for s in values]
        result[name] = {"images_per_second_median": statistics.median(rates),
                        "images_per_second_mean": statistics.fmean(rates)}
    for wire in ("binary", "json"):
        today, base = seconds[f"{wire} today"], seconds[f"{wire} baseline"]
        result[f"{wire}_ratio_today_over_baseline"] = statistics.median(b / t for t, b in zip(today, base, strict=True))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
