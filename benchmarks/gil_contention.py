"""The model's forward beside a busy Python thread: eager module vs frozen TorchScript graph.

In the victim service the forward runs in a worker thread while the event loop (pure
Python) decodes and answers requests. This measures what that costs the forward, in
images/s, side by side in one run, for each (graph, switch interval, batch):

* ``quiet``: the forward alone;
* ``busy``: the same forward while another thread runs Python code without pause.

Usage::

    python benchmarks/gil_contention.py [--checkpoint DIR] [--seconds 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch


def forward_rate(predict: object, batch: np.ndarray, seconds: float) -> float:
    """Images/s of ``predict(batch)`` called in a loop for ``seconds`` (after a warm-up)."""
    assert callable(predict)
    predict(batch)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        predict(batch)
        count += 1
    return count * len(batch) / (time.perf_counter() - started)


def with_busy_thread(predict: object, batch: np.ndarray, seconds: float) -> float:
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(100))

    thread = threading.Thread(target=spin)
    thread.start()
    try:
        return forward_rate(predict, batch, seconds)
    finally:
        stop.set()
        thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="checkpoint (default: train small-cnn on mnist5k, 1 epoch)")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--batches", default="16,64")
    parser.add_argument("--switch-intervals-ms", default="5,1")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).parent))
    from serve import make_checkpoint

    from victim_server.runner import load_runners

    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = args.checkpoint or make_checkpoint(Path(scratch) / "ckpt", "mnist5k", "small-cnn", 1)
        runners = {graph: load_runners({"m": checkpoint}, torch.device("cpu"), graph)["m"]  # type: ignore[arg-type]
                   for graph in ("eager", "torchscript")}
        shape = runners["eager"].input_shape
        print("| graph | switch interval (ms) | batch | quiet images/s | busy images/s | busy / quiet |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for interval in [float(x) for x in args.switch_intervals_ms.split(",")]:
            sys.setswitchinterval(interval / 1000.0)
            for graph, runner in runners.items():
                for size in [int(x) for x in args.batches.split(",")]:
                    batch = np.random.default_rng(0).random((size, *shape), dtype=np.float32)
                    quiet = forward_rate(runner.predict_batch, batch, args.seconds)
                    busy = with_busy_thread(runner.predict_batch, batch, args.seconds)
                    print(f"| {graph} | {interval:g} | {size} | {quiet:,.0f} | {busy:,.0f} | {busy / quiet:.2f} |")


if __name__ == "__main__":
    main()
