"""``stealsim audit``: the report and the verdict on synthetic runs, the spec's checks (a bad spec or an
impossible resource exits 2 with one line and charges nothing), and the quick spec end to end against
a real server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from server_support import ADMIN_KEY, ServerProcess

from experiments.audit import AttackerSpec, audit_cells, load_audit_spec, resolve_taus, run_budget
from experiments.audit_report import (
    AuditRun,
    detector_summaries,
    format_duration,
    honest_summary,
    spread_limit,
    verdict,
    write_audit_report,
)
from stealsim.errors import ConfigError
from stealsim.service_client import ServiceClient

ROOT = Path(__file__).resolve().parent.parent


# -- the report on synthetic runs -------------------------------------------------------------


def run(attacker: str, accounts: int, seed: int, fidelity: float, cost: float, seconds: float,
        flags: dict[str, tuple[int, float, int]] | None = None, honest_flags: str = "") -> AuditRun:
    """A finished run: ``flags`` maps a detector to (first-flag queries, its simulated seconds, accounts flagged)."""
    flags = flags or {}
    metrics = {
        "queries_used": 1000, "fidelity": fidelity, "accuracy": fidelity - 0.05, "cost": cost,
        "currency": "USD", "simulated_seconds": seconds, "accounts_used": accounts, "accounts_opened": accounts,
        "stop_reason": "budget_spent",
        "flags_by_detector": {name: flagged for name, (_, _, flagged) in flags.items()},
        "first_flag": {name: {"queries": queries, "simulated_seconds": at} for name, (queries, at, _) in flags.items()},
    }
    history = [{"queries": q, "fidelity": fidelity * q / 1000, "cost": cost * q / 1000,
                "simulated_seconds": seconds * q / 1000} for q in (250, 500, 1000)]
    honest = [{"user": 0, "images": 360, "accuracy": 0.95, "paid": 0.18, "flags": honest_flags, "blocked_at": None}]
    return AuditRun(attacker, accounts, seed, metrics, history, honest)


def synthetic_runs() -> list[AuditRun]:
    # ood_rate (per key) flags the one account of every 1-account run after 128 queries, and half
    # the accounts at 4; none at 16. pooled_ood flags at every spread.
    runs = []
    for seed, shift in ((0, 0.0), (1, 0.02), (2, 0.04)):
        runs.append(run("dual-student", 1, seed, 0.70 + shift, 0.5, 3600.0,
                        {"ood_rate": (128, 6.4, 1), "pooled_ood": (300, 15.0, 1)}))
        runs.append(run("dual-student", 4, seed, 0.80 + shift, 0.9, 900.0,
                        {"ood_rate": (512, 6.4, 2), "pooled_ood": (400, 5.0, 2)}))
        runs.append(run("dual-student", 16, seed, 0.78 + shift, 2.1, 225.0, {"pooled_ood": (600, 2.0, 3)}))
    return runs


def test_detector_summaries_count_seeds_queries_and_shares() -> None:
    summaries = {(item.detector, item.accounts): item
                 for item in detector_summaries(synthetic_runs(), ["ood_rate", "pooled_ood"])}
    one = summaries[("ood_rate", 1)]
    assert (one.runs, one.fired) == (3, 3)
    assert one.queries is not None and one.queries.mean == 128 and one.queries.std == 0
    assert one.hours is not None and one.hours.mean == pytest.approx(6.4 / 3600)
    assert one.share is not None and one.share.mean == 1.0
    four = summaries[("ood_rate", 4)].share
    assert four is not None and four.mean == 0.5
    sixteen = summaries[("ood_rate", 16)]
    assert sixteen.fired == 0 and sixteen.queries is None and sixteen.quiet
    assert spread_limit([item for key, item in summaries.items() if key[0] == "ood_rate"]) == 16
    assert spread_limit([item for key, item in summaries.items() if key[0] == "pooled_ood"]) is None


def test_durations_read_in_words() -> None:
    assert [format_duration(s) for s in (6.4, 45.0, 900.0, 12_600.0, 360_000.0)] == [
        "6.4 s", "45 s", "15 min", "3.5 hours", "100.0 hours (4.2 days)"]


def test_spread_limit_needs_quiet_at_every_larger_count() -> None:
    # Quiet at 4 but flagging again at 16 (a pooled detector): no spread escapes it from 4 on.
    runs = [run("a", 1, 0, 0.5, 1.0, 10.0, {"d": (100, 1.0, 1)}), run("a", 4, 0, 0.5, 1.0, 10.0),
            run("a", 16, 0, 0.5, 1.0, 10.0, {"d": (900, 1.0, 5)}), run("a", 64, 0, 0.5, 1.0, 10.0)]
    assert spread_limit(detector_summaries(runs, ["d"])) == 64


def test_verdict_in_plain_words_from_the_numbers() -> None:
    sentences = verdict(synthetic_runs(), ["ood_rate", "pooled_ood"], "USD")
    # The best mean fidelity is through 4 accounts: 0.82 ± 0.02, 0.90 USD, 0.25 hours.
    assert sentences[0] == ("With 0.90 USD and 4 accounts, dual-student reaches fidelity 0.820 ± 0.020 in 15 min "
                            "under the rate limits (1,000 queries; mean over 3 seeds).")
    assert sentences[1].startswith("ood_rate fires against dual-student after 128 queries and 6.4 s of simulated "
                                   "time (through 1 account, in 3 of 3 seeds) unless the queries are spread over 16 "
                                   "accounts or more")
    assert sentences[2].startswith("pooled_ood fires against dual-student after 300 queries")
    assert sentences[2].endswith("at every tested spread (1, 4, 16 accounts).")
    assert sentences[3] == ("Honest users sending the test split beside the attacks got accuracy 0.950, paid 0.18 USD "
                            "each, and 0 of 9 were flagged.")


def test_verdict_names_a_detector_that_never_fired_and_flagged_honest_users() -> None:
    runs = [run("knockoff", 1, 0, 0.6, 1.0, 60.0, honest_flags="ood_rate"), run("knockoff", 1, 1, 0.62, 1.0, 60.0)]
    runs.append(AuditRun("knockoff", 8, 0, error="RunStoppedError: the victim failed"))
    sentences = verdict(runs, ["ood_rate"], "EUR")
    assert "ood_rate never fired against knockoff (2 runs through 1 accounts)." in sentences
    assert sentences[-2].endswith("and 1 of 2 were flagged (by ood_rate).")
    assert sentences[-1] == "1 of 3 runs did not finish; the numbers above leave them out."
    summary = honest_summary(runs)
    assert (summary["user_runs"], summary["flagged"], summary["detectors"]) == (2, 1, ["ood_rate"])


def test_report_has_the_tables_plots_and_verdict(tmp_path: Path) -> None:
    report = write_audit_report(tmp_path, synthetic_runs(), ["ood_rate", "pooled_ood"], "USD",
                                ["Audited: a synthetic model."]).read_text()
    assert "## Verdict" in report and "- With 0.90 USD and 4 accounts" in report
    assert "| dual-student | 4 | 3 | 0, 1, 2 | 1,000 | 0.9000 ± 0 (0.9000) | 15 min | 0.8200 ± 0.0200 (0.8000) |" in report
    assert report.count(" | 4 | budget_spent |") == 1  # accounts used: 4 in every seed
    assert "| ood_rate | dual-student | 16 | 0 of 3 seeds | — | — | 0.0000 ± 0 (0.0000) |" in report
    assert "| ood_rate | dual-student | 1 | 3 of 3 seeds | 128 ± 0 (128) |" in report
    for plot in ("fidelity_vs_money.png", "fidelity_vs_hours.png"):
        assert f"]({plot})" in report and (tmp_path / plot).stat().st_size > 1000


# -- the spec ---------------------------------------------------------------------------------


def test_money_buys_the_largest_budget_after_the_accounts() -> None:
    attacker = AttackerSpec(attack="random", money=10.0, accounts=[1, 16])
    assert run_budget(attacker, 1, price=0.5, account_price=0.25) == 19_500  # (10 - 0.25) / 0.0005
    assert run_budget(attacker, 16, price=0.5, account_price=0.25) == 12_000  # (10 - 4) / 0.0005
    both = AttackerSpec(attack="random", money=10.0, budget=5000)
    assert run_budget(both, 1, price=0.5, account_price=0.0) == 5000
    with pytest.raises(ConfigError, match="does not pay for 64 account"):
        run_budget(AttackerSpec(attack="random", money=10.0), 64, price=0.5, account_price=0.25)
    with pytest.raises(ConfigError, match="give budget"):
        run_budget(AttackerSpec(attack="random", hours=2.0), 1, price=None, account_price=0.0)


def test_tau_validation_is_the_honest_rate_quantile() -> None:
    msp = [0.1 * index for index in range(1, 11)]  # 0.1 .. 1.0
    steps = resolve_taus([{"name": "ood_rate", "tau": "validation", "honest_rate": 0.5},
                          {"name": "ood_rate", "tau": "validation"}, {"name": "top_k", "k": 2}], msp)
    assert steps[0]["tau"] == pytest.approx(0.55) and steps[0]["honest_rate"] == 0.5
    assert steps[1]["tau"] == pytest.approx(0.109)  # the step's default honest_rate, 0.01
    assert steps[2] == {"name": "top_k", "k": 2}


def quick_spec() -> dict[str, Any]:
    loaded = yaml.safe_load((ROOT / "examples" / "audit-quick.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def test_the_example_specs_load() -> None:
    for name in ("audit.yaml", "audit-quick.yaml", "audit-account-keyed.yaml"):
        spec = load_audit_spec(ROOT / "examples" / name)
        assert audit_cells(spec)


def audit_command(spec: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stealsim", "audit", str(spec), "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


BAD = [
    ("negative money", {"attackers": [{"attack": "random", "money": -5}]}, "money cannot be negative"),
    ("zero accounts", {"attackers": [{"attack": "random", "budget": 100, "accounts": [0, 4]}]},
     "every account count must be at least 1"),
    ("no time", {"attackers": [{"attack": "random", "budget": 100, "hours": 0}]}, "hours must be more than 0"),
    ("no query", {"attackers": [{"attack": "random", "budget": 0}]}, "budget must be at least 1 query"),
    ("money for accounts only", {"account_price": 1.0, "attackers": [{"attack": "random", "money": 2, "accounts": [4]}]},
     "does not pay for 4 account"),
    ("unknown field", {"attackerz": []}, "attackerz: Extra inputs are not permitted"),
    ("unknown attack", {"attackers": [{"attack": "telepathy", "budget": 100}]}, "unknown attack 'telepathy'"),
    ("bad policy", {"victim": {"dataset": "digits"}, "defenses": [{"name": "ood_rate", "tau": 2.0}]}, "defenses:"),
    ("bad rate", {"limits": {"rate": "fast"}}, "is not a rate"),
    ("url with defenses", {"defenses": [{"name": "top_k", "k": 1}]}, "audited as deployed"),
]


@pytest.mark.parametrize(("what", "change", "message"), BAD, ids=[item[0] for item in BAD])
def test_a_bad_spec_exits_2_with_one_line_and_charges_nothing(
    what: str, change: dict[str, Any], message: str, victim_server: ServerProcess, tmp_path: Path,
) -> None:
    spec = quick_spec()
    # The team's endpoint: a key opened there would be a charge; none may be.
    spec["victim"] = {"dataset": "digits", "url": victim_server.url, "admin_key": ADMIN_KEY, "model": "victim"}
    spec.pop("defenses", None)
    spec.update(change)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    with ServiceClient(victim_server.url, ADMIN_KEY) as admin:
        before = admin.list_keys()
    out = tmp_path / "out"
    result = audit_command(path, out)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not out.exists()
    with ServiceClient(victim_server.url, ADMIN_KEY) as admin:
        assert admin.list_keys() == before


# -- end to end -------------------------------------------------------------------------------


@pytest.mark.timeout(900)
def test_quick_audit_end_to_end_writes_report_plots_and_verdict(digits_checkpoint: Path, tmp_path: Path) -> None:
    spec = quick_spec()
    spec["victim"] = {"dataset": "digits", "checkpoint": str(digits_checkpoint)}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "audit"
    result = audit_command(path, out)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    loaded = load_audit_spec(path)
    cells = audit_cells(loaded)
    report = (out / "report.md").read_text()
    assert "## Verdict" in report and "reaches fidelity" in report
    for plot in ("fidelity_vs_money.png", "fidelity_vs_hours.png"):
        assert (out / plot).stat().st_size > 1000 and f"]({plot})" in report
    price = float(spec["price_per_1000_images"])
    for cell in cells:
        finished = AuditRun.read(out / "runs" / cell.id, cell.attacker, cell.accounts, cell.seed)
        assert finished.finished, cell.id
        metrics = finished.metrics
        assert metrics["queries_used"] == cell.budget
        assert metrics["accounts_used"] == cell.accounts
        # The price the server declares, and each opened account's price.
        assert metrics["cost"] == pytest.approx(cell.budget * price / 1000 + cell.accounts * spec["account_price"])
        assert metrics["simulated_seconds"] > 0
        assert len(finished.honest) == spec["honest"]["users"]
        for user in finished.honest:
            assert user["images"] == 360 * spec["honest"]["passes"]
            assert user["paid"] == pytest.approx(user["images"] * price / 1000)
    # The noise attacker is flagged by the per-key detector through one account.
    noise_one = [AuditRun.read(out / "runs" / cell.id, cell.attacker, cell.accounts, cell.seed)
                 for cell in cells if cell.attack == "random" and cell.accounts == 1]
    assert all(run.first_flag("ood_rate") is not None for run in noise_one)
    assert "ood_rate fires against random after" in report
    # A second audit resumes: every run is finished, nothing runs (no service, no key).
    again = audit_command(path, out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{len(cells)} already finished, 0 to run" in again.stderr


@pytest.mark.timeout(600)
def test_an_endpoint_the_team_runs_is_audited_as_deployed(victim_server: ServerProcess, tmp_path: Path) -> None:
    # The team's server: the audit opens the attacker's accounts, an evaluation key and the honest users'
    # keys through its admin API; the spec's price and limits are the attacker's accounting.
    spec = {
        "victim": {"dataset": "digits", "url": victim_server.url, "admin_key_env": "AUDIT_TEST_ADMIN",
                   "model": "guarded"},
        "limits": {"rate": "1/second", "image_rate": "1000/minute"}, "price_per_1000_images": 2.0,
        "account_price": 0.5, "currency": "EUR",
        "attackers": [{"attack": "random", "budget": 300, "accounts": [3],
                       "settings": {"student_width": 8, "batch_size": 50, "replay": 300}}],
        "honest": {"users": 1, "batch": 90}, "seeds": [0],
        "eval": {"every": 150, "transfer_samples": 10, "reference_epochs": 1},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    with ServiceClient(victim_server.url, ADMIN_KEY) as admin:
        before = {key["key_id"] for key in admin.list_keys()}
    out = tmp_path / "audit"
    result = subprocess.run([sys.executable, "-m", "stealsim", "audit", str(path), "--out", str(out), "--quiet"],
                            capture_output=True, text=True, timeout=500, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "AUDIT_TEST_ADMIN": ADMIN_KEY})
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    run_dir = out / "runs" / "random__a3__s0"
    finished = AuditRun.read(run_dir, "random", 3, 0)
    metrics = finished.metrics
    assert (metrics["queries_used"], metrics["accounts_used"], metrics["currency"]) == (300, 3, "EUR")
    assert metrics["cost"] == pytest.approx(300 * 2.0 / 1000 + 3 * 0.5)
    # 6 requests of 50 images, 2 per account at 1 request per second: each account's second one waits
    # for the next window on the virtual clock (the accounts in parallel).
    assert 1.0 <= metrics["simulated_seconds"] < 60
    with ServiceClient(victim_server.url, ADMIN_KEY) as admin:
        opened = [key for key in admin.list_keys() if key["key_id"] not in before]
    names = sorted(str(key.get("name", "")) for key in opened)
    accounts = [key for key in opened if "account" in str(key.get("name", ""))]
    assert len(accounts) == 3, names
    assert sum("honest" in name for name in names) == 1 and sum("eval" in name for name in names) == 1, names
    assert sum(int(key["used"]) for key in accounts) == 300  # the server's count of the attacker's queries
    assert finished.honest[0]["images"] == 360 and finished.honest[0]["paid"] == pytest.approx(0.72)
    report = (out / "report.md").read_text()
    assert f"the endpoint {victim_server.url} (model guarded)" in report
    assert "With 2.10 EUR and 3 accounts, random reaches fidelity" in report
    assert ADMIN_KEY not in (out / "spec.yaml").read_text() + report
