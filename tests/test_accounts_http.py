"""Many accounts, prices and the clock against the real server over HTTP (issue #37's guarantees).

- ``--accounts 8`` spends the budget exactly across 8 opened keys, and the server's
  usage of the keys adds up to the run's queries;
- a key blocked by a detector is left, its refused request goes whole to the next
  account: nothing lost, nothing charged twice;
- the virtual clock (limits declared, not enforced) and a live run (the server
  enforces them, the client sleeps through the 429s) agree within 10 %;
- the pooled detector flags a 16-account Dual Student run that no per-key detector
  sees, while honest keys sending natural images stay quiet.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from server_support import ADMIN_KEY, ServerProcess

from attacker.accounts import AccountsSpec
from attacker.runner import RunSpec, run_attack
from attacker.victims import InProcessVictim
from experiments.honest import HonestSettings, honest_traffic
from stealsim.data import load_dataset
from stealsim.service_client import ServiceClient

PRICE = 0.5  # per 1,000 images
TINY = {"student_width": 8, "batch_size": 50}
GENERATOR = {"generator_width": 8, "latent_dim": 16}
CHEAP_EVALUATION = ["--transfer-samples", "5", "--reference-epochs", "1"]


def _validation_tau(checkpoint: Path) -> float:
    """The MSP under which 1 % of the validation split's natural images fall (chosen on validation)."""
    victim = InProcessVictim.from_checkpoint(checkpoint)
    return float(victim.query(load_dataset("digits").x_val).max(dim=1).values.quantile(0.01))


@pytest.fixture(scope="module")
def declared_server(digits_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Limits declared, not enforced (the virtual clock's server); a price on the model; pooled and per-key
    OOD detectors on ``guarded`` (flag only), a blocking per-key one on ``blocking``."""
    tau = _validation_tau(digits_checkpoint)
    detectors = [{"name": "ood_rate", "tau": tau, "min_queries": 100},
                 {"name": "pooled_ood", "tau": tau, "window": 1024, "min_queries": 128, "attribution_alpha": 1e-2}]
    blocking = [{"name": "ood_rate", "tau": 0.999, "min_queries": 32, "block": True}]
    logs = tmp_path_factory.mktemp("declared")
    server = ServerProcess(
        {"victim": digits_checkpoint, "guarded": digits_checkpoint, "blocking": digits_checkpoint},
        args=["--rate-limits", "declare", "--policy", f"guarded={json.dumps(detectors)}",
              "--policy", f"blocking={json.dumps(blocking)}", "--price", f"victim={PRICE}"],
        log_path=logs / "server.log")
    yield server
    server.stop()


def _keys_named(server: ServerProcess, prefix: str) -> dict[str, dict[str, Any]]:
    with server.service() as admin:
        return {record["name"]: record for record in admin.list_keys() if record["name"].startswith(prefix)}


def test_eight_accounts_spend_the_budget_exactly_and_the_server_agrees(
    declared_server: ServerProcess, tmp_path: Path,
) -> None:
    out = tmp_path / "eight"
    command = [sys.executable, "-m", "stealsim", "attack", "random", "--url", declared_server.url,
               "--model", "victim", "--budget", "800", "--out", str(out), "--accounts", "8",
               "--admin-key", ADMIN_KEY, "--account-price", "0.25", "--set", "student_width=8",
               "--batch-size", "50", "--eval-every", "400", "--threads", "1", "--quiet", *CHEAP_EVALUATION]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    keys = _keys_named(declared_server, f"{out.name} account ")
    assert len(keys) == 8
    assert [keys[f"{out.name} account {i}"]["used"] for i in range(8)] == [100] * 8
    assert sum(record["used"] for record in keys.values()) == metrics["queries_used"] == 800
    assert metrics["server_count_matches"] is True
    assert metrics["accounts_opened"] == metrics["accounts_used"] == 8
    assert metrics["cost"] == pytest.approx(800 * PRICE / 1000 + 8 * 0.25)  # the model's price, read from the server
    evaluation = _keys_named(declared_server, f"{out.name} evaluation")
    assert evaluation[f"{out.name} evaluation"]["used"] == metrics["eval_queries"]  # apart from the accounts
    # The run closes what it opened: no funded key stays behind.
    assert all(record["revoked"] for record in [*keys.values(), *evaluation.values()])


def test_a_blocked_account_is_left_without_losing_or_double_charging(
    declared_server: ServerProcess, tmp_path: Path,
) -> None:
    out = tmp_path / "blocked"
    metrics = run_attack(RunSpec(
        attack="random", out=out, budget=600, url=declared_server.url, model="blocking", eval_every=600,
        show_progress=False, settings={"student_width": 8, "batch_size": 32},
        accounts=AccountsSpec(count=6, admin_key=ADMIN_KEY, policy="fill", account_budget=100),
    ))
    keys = _keys_named(declared_server, f"{out.name} account ")
    used = {int(name.rsplit(" ", 1)[1]): record["used"] for name, record in keys.items()}
    assert all(record["blocked"] for record in keys.values())  # each flagged and blocked, one after another
    assert metrics["stop_reason"] == "accounts_exhausted"
    assert sum(used.values()) == metrics["queries_used"]  # nothing lost, nothing charged twice
    assert [account["used"] for account in metrics["accounts"]] == [used[i] for i in range(6)]
    assert metrics["accounts_blocked"] == 6 and metrics["first_flag"]["ood_rate"]["queries"] == 32


def _rate_limited_run(server: ServerProcess, out: Path, clock: str) -> dict[str, Any]:
    with server.service() as admin:
        key = admin.create_key(10_000, name=f"clock {clock}", image_rate="400/2 seconds").api_key
        eval_key = admin.create_key(10_000, name=f"clock {clock} evaluation", image_rate="100000/second").api_key
    return run_attack(RunSpec(
        attack="random", out=out, budget=1600, url=server.url, api_key=key, eval_api_key=eval_key, model="victim",
        eval_every=1600, show_progress=False, settings={"student_width": 8, "batch_size": 100},
        accounts=AccountsSpec(clock=clock),  # type: ignore[arg-type]
    ))


def test_the_virtual_clock_agrees_with_a_live_rate_limited_run(
    declared_server: ServerProcess, digits_checkpoint: Path, tmp_path: Path,
) -> None:
    live_server = ServerProcess({"victim": digits_checkpoint}, log_path=tmp_path / "live.log")
    try:
        live = _rate_limited_run(live_server, tmp_path / "live", "live")
    finally:
        live_server.stop()
    virtual = _rate_limited_run(declared_server, tmp_path / "virtual", "virtual")
    # 1,600 images at 400 per 2 s: three waits for a new window, about 6 s.
    assert virtual["rate_limit_wait_seconds"] == 6
    assert live["rate_limit_wait_seconds"] == 0 and live["http_retries"] >= 3  # slept through real 429s
    assert live["simulated_seconds"] == pytest.approx(virtual["simulated_seconds"], rel=0.10)


def test_the_pooled_detector_sees_a_sybil_dual_student_that_no_per_key_detector_sees(
    declared_server: ServerProcess, tmp_path: Path,
) -> None:
    data = load_dataset("digits")
    with declared_server.service() as admin:
        honest_keys = [admin.create_key(5000, name=f"honest {i}").api_key for i in range(2)]
    honest = [honest_traffic(declared_server.url, key, "guarded", data, HonestSettings(batch=40))
              for key in honest_keys]
    out = tmp_path / "sybil"
    metrics = run_attack(RunSpec(
        attack="dual-student", out=out, budget=1280, url=declared_server.url, model="guarded", eval_every=1280,
        show_progress=False, settings={**TINY, **GENERATOR, "batch_size": 40},
        accounts=AccountsSpec(count=16, admin_key=ADMIN_KEY),
    ))
    honest += [honest_traffic(declared_server.url, key, "guarded", data, HonestSettings(batch=40))
               for key in honest_keys]
    assert metrics["accounts_used"] == 16 and metrics["queries_used"] == 1280
    flagged = metrics["flags_by_detector"]
    # 80 queries per account: under ood_rate's 100 before its first test, so no key is flagged by it ...
    assert "ood_rate" not in flagged
    # ... while the pool's alarm attributes the traffic to the accounts sending it.
    assert flagged.get("pooled_ood", 0) >= 8, metrics["accounts"]
    assert all(result.flags == "" for result in honest), [result.flags for result in honest]
    assert torch.tensor([result.accuracy for result in honest]).min() > 0.5


def test_a_bad_accounts_flag_exits_2_with_one_line_and_charges_nothing(
    declared_server: ServerProcess, tmp_path: Path,
) -> None:
    with declared_server.service() as admin:
        key = admin.create_key(1000, name="untouched").api_key
    for flags, message in ((["--accounts", "0"], "--accounts"), (["--max-money", "-1"], "--max-money"),
                           (["--accounts", "4"], "needs accounts")):
        out = tmp_path / "refused"
        result = subprocess.run(
            [sys.executable, "-m", "stealsim", "attack", "random", "--url", declared_server.url, "--api-key", key,
             "--budget", "100", "--out", str(out), "--quiet", *flags], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
        assert not out.exists()
    with ServiceClient(declared_server.url, key) as service:
        assert service.usage()["used"] == 0
