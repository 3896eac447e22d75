"""``stealsim demo`` as a user runs it: a subprocess that trains victims, starts the real
service, steals both victims over HTTP with every registered attack, and reports.

Also: Ctrl-C (SIGINT) in the middle leaves no process behind and a usable partial report.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from redis_support import WorkerProcess, prefix, redis_url  # noqa: F401 - fixtures
from server_support import ADMIN_KEY, ServerProcess

from experiments.demo import demo_attacks

QUICK_BUDGET = 1_000  # the --quick default


def demo_command(out: Path, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "stealsim", "demo", "--quick", "--out", str(out), "--cache-dir", str(cache),
            "--quiet", "--threads", "1", *extra]


def children_of(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def wait_gone(pids: set[int], timeout: float = 30.0) -> list[int]:
    """The pids still alive after up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while (left := [pid for pid in pids if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def read_summary(out: Path) -> dict[str, Any]:
    return dict(json.loads((out / "summary.json").read_text()))


@pytest.fixture(scope="module")
def victim_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared by both tests: the second reuses the victims the first trained."""
    return tmp_path_factory.mktemp("demo-cache")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quick_demo_end_to_end(tmp_path: Path, victim_cache: Path) -> None:
    out = tmp_path / "demo"
    result = subprocess.run(demo_command(out, victim_cache), capture_output=True, text=True, timeout=590,
                            env={**os.environ, "COLUMNS": "160"})
    assert result.returncode == 0, result.stdout + result.stderr
    summary = read_summary(out)
    assert summary["status"] == "done"
    rows = summary["rows"]
    assert {(row["attack"], row["victim"]) for row in rows} == {
        (attack, victim) for attack in demo_attacks() for victim in ("normal", "nasty")
    }
    for row in rows:
        assert row["status"] == "done", row
        assert row["queries"] == QUICK_BUDGET, row
        assert row["server_count_matches"] is True, row  # the service charged what the attacker counted
        for metric in ("accuracy", "fidelity", "transfer_success_rate"):
            assert 0.0 <= row[metric] <= 1.0, row
        run_dir = out / "runs" / f"{row['attack']}-{row['victim']}"
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["fidelity"] == row["fidelity"]
        assert metrics["server_queries"] == QUICK_BUDGET  # evaluation went to the separate key
    # Both victims are served and trained: the nasty one keeps its accuracy.
    assert summary["victims"]["normal_test_accuracy"] > 0.8
    assert summary["victims"]["nasty_test_accuracy"] > 0.6
    report = (out / "report.md").read_text()
    for attack in demo_attacks():
        assert f"| {attack} | nasty |" in report
    assert "shares of 360 test images: one image is 0.28 points" in report  # the digits test split
    for name in summary["plots"].values():
        assert (out / name).stat().st_size > 1000
    assert set(summary["plots"]) == {"normal", "nasty"}
    # The table is printed at the end, and the service is gone.
    assert "fidelity" in result.stdout and all(attack in result.stdout for attack in demo_attacks())
    assert not alive(int(summary["service_pid"]))
    assert "victim service stopped" in result.stderr
    assert "exit status" not in result.stderr  # our own SIGTERM of the service is no failure
    # the attack key and the evaluation key negotiate the same endpoint: one line per run
    assert result.stderr.count("negotiated") == len(rows)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ctrl_c_leaves_no_process_and_a_partial_report(tmp_path: Path, victim_cache: Path) -> None:
    out = tmp_path / "demo"
    log = (tmp_path / "demo.log").open("wb")
    # Random noise first (fast), then DFME, interrupted a few seconds into its 2,000,000 queries.
    process = subprocess.Popen(
        demo_command(out, victim_cache, "--attack", "random", "--attack", "dfme=2000000"),
        stdout=log, stderr=subprocess.STDOUT,
        # The worst launcher: SIGINT inherited ignored (`cmd &` in a script, nohup), under which
        # Python installs no Ctrl-C handler. The CLI restores it, so Ctrl-C still works.
        preexec_fn=_ignore_sigint,
    )
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            assert process.poll() is None, (tmp_path / "demo.log").read_text()
            if (out / "summary.json").is_file():
                rows = read_summary(out)["rows"]
                if rows[0]["status"] == "done" and rows[1]["status"] == "running":
                    break
            time.sleep(0.5)
        else:
            pytest.fail("the demo did not reach its second run:\n" + (tmp_path / "demo.log").read_text())
        time.sleep(2)  # inside DFME's loop
        descendants = children_of(process.pid)
        service_pid = int(read_summary(out)["service_pid"])
        assert service_pid in descendants
        process.send_signal(signal.SIGINT)
        returncode = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
    assert returncode != 0
    assert not [pid for pid in descendants if alive(pid)], "processes left behind"
    summary = read_summary(out)
    assert summary["status"] == "interrupted"
    statuses = [(row["attack"], row["victim"], row["status"]) for row in summary["rows"]]
    assert statuses[0] == ("random", "normal", "done")
    assert statuses[1] == ("dfme", "normal", "interrupted")
    assert {status for _, _, status in statuses[2:]} == {"pending"}
    report = (out / "report.md").read_text()
    assert "Status: **interrupted**" in report
    assert "| random | normal | 1,000 |" in report
    assert (out / "runs" / "random-normal" / "report.md").is_file()
    assert "victim service stopped" in (tmp_path / "demo.log").read_text()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_sigkilled_demo_leaves_no_process(tmp_path: Path, victim_cache: Path) -> None:
    out = tmp_path / "demo"
    log_path = tmp_path / "demo.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(demo_command(out, victim_cache, "--attack", "dfme=2000000"),
                                   stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 400
            while time.monotonic() < deadline:
                assert process.poll() is None, log_path.read_text()
                if (out / "summary.json").is_file() and read_summary(out)["rows"][0]["status"] == "running":
                    break
                time.sleep(0.5)
            else:
                pytest.fail("the demo did not start its run:\n" + log_path.read_text())
            descendants = children_of(process.pid)
            assert int(read_summary(out)["service_pid"]) in descendants
            process.send_signal(signal.SIGKILL)  # no handler runs: only the kernel can clean up
            process.wait()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    left = wait_gone(descendants)
    for pid in left:  # do not leave them to the next test
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left behind by the killed demo: {left}"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compose_roles_without_docker(
    tmp_path: Path, victim_cache: Path, redis_url: str, prefix: str,  # noqa: F811
) -> None:
    """What docker-compose runs, as processes here: ``demo --victims-only`` (models), ``serve`` with
    the Redis backend (api), ``worker`` (inference), and ``demo --url`` (attacker)."""
    models = tmp_path / "data"
    prepared = subprocess.run(demo_command(models, victim_cache, "--victims-only"), capture_output=True,
                              text=True, timeout=300)
    assert prepared.returncode == 0, prepared.stderr
    checkpoints = {name: models / "victims" / name for name in ("normal", "nasty")}
    assert all((path / "model.json").is_file() for path in checkpoints.values())
    worker = WorkerProcess(redis_url, prefix, checkpoints, log_path=tmp_path / "worker.log")
    server = None
    try:
        server = ServerProcess(checkpoints, args=["--redis-url", redis_url, "--redis-prefix", prefix,
                                                  "--batching", "redis"], log_path=tmp_path / "api.log")
        out = tmp_path / "reports"
        attacker = subprocess.run(
            demo_command(out, victim_cache, "--url", server.url, "--attack", "random"),
            capture_output=True, text=True, timeout=300, env={**os.environ, "STEALSIM_ADMIN_KEY": ADMIN_KEY},
        )
        assert attacker.returncode == 0, attacker.stdout + attacker.stderr
    finally:
        if server is not None:
            server.stop()
        worker.stop()
    summary = read_summary(out)
    assert summary["mode"] == "external service" and summary["url"] == server.url
    assert [(row["attack"], row["victim"], row["status"], row["queries"]) for row in summary["rows"]] == [
        ("random", "normal", "done", QUICK_BUDGET), ("random", "nasty", "done", QUICK_BUDGET)]
    assert all(row["server_count_matches"] for row in summary["rows"])
    assert summary["victims"]["normal_test_accuracy"] > 0.8  # measured through the API
