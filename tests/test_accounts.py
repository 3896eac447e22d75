"""The account pool, the price and the virtual clock, in this process (attacker.accounts, attacker.economics).

The pool's accounts here are tensor functions: what is tested is the routing, the
counting and the clock's arithmetic; tests/test_accounts_http.py runs the same
against the real server.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor

from attacker.accounts import Account, AccountPool, AccountsSpec, account_budgets
from attacker.economics import FixedWindow, RunClock, Tariff, parse_limit
from attacker.runner import RunSpec, run_attack
from attacker.victims import BudgetedVictim, FunctionVictim, VictimInfo
from stealsim.errors import AttackError, RunLimitReachedError, VictimAPIError

INFO = VictimInfo(input_shape=(1, 4, 4), num_classes=3, max_images_per_request=1000)


def uniform(images: Tensor) -> Tensor:
    return torch.full((images.shape[0], 3), 1 / 3)


def accounts(count: int, remaining: int | None = None, **fields: object) -> list[Account]:
    return [Account(index, FunctionVictim(uniform, INFO), remaining=remaining, **fields)  # type: ignore[arg-type]
            for index in range(count)]


def images(count: int) -> Tensor:
    return torch.rand(count, 1, 4, 4)


# -- the limits and the price --------------------------------------------------------------------


def test_a_fixed_window_waits_for_its_next_window_in_whole_seconds() -> None:
    window = FixedWindow(100, 10.0, "images")
    assert window.wait(0.0, 60) == 0
    window.charge(0.0, 60)
    assert window.wait(1.0, 40) == 0  # fits: 100 of 100
    window.charge(1.0, 40)
    assert window.wait(1.5, 1) == 9  # 8.5 s left, rounded up as Retry-After says
    assert window.wait(10.0, 100) == 0  # the next window opens at the next hit
    requests = FixedWindow(2, 1.0, "requests")
    requests.charge(0.0, 500)
    requests.charge(0.1, 500)
    assert requests.wait(0.2, 1) == 1  # at least 1 s
    assert parse_limit("5000/minute") == (5000, 60.0)
    with pytest.raises(AttackError, match="invalid rate limit"):
        parse_limit("fast")


def test_the_tariff_prices_images_and_accounts_and_refuses_negative_prices() -> None:
    assert Tariff(0.5, 2.0).cost(3000, 4) == pytest.approx(1.5 + 8.0)
    with pytest.raises(AttackError, match="prices must be >= 0"):
        Tariff(-1.0)
    with pytest.raises(AttackError, match="prices must be >= 0"):
        Tariff(0.0, float("nan"))


@pytest.mark.parametrize(("fields", "message"), [
    ({"count": 0}, "--accounts must be at least 1"),
    ({"count": 4}, "needs accounts: --admin-key"),
    ({"count": 3, "keys": ("a", "b")}, "more than the 2 keys"),
    ({"account_price": -1.0}, "--account-price must be >= 0"),
    ({"max_seconds": 0.0}, "--max-hours must be > 0"),
    ({"max_cost": -5.0}, "--max-money must be >= 0"),
    ({"policy": "random"}, "--rotation must be one of"),
    ({"rate": "often"}, "invalid rate limit"),
    ({"clock": "fast"}, "--clock must be virtual or live"),
    ({"clock": "live", "image_rate": "10/second"}, "simulated by the virtual clock"),
    ({"count": 16, "admin_key": "a", "account_price": 2.0, "max_cost": 10.0}, "more than --max-money"),
])
def test_impossible_account_settings_are_refused_with_the_flag_named(fields: dict[str, object], message: str) -> None:
    with pytest.raises(AttackError, match=message):
        AccountsSpec(**fields)  # type: ignore[arg-type]


def test_the_budget_is_split_over_accounts_rounded_up() -> None:
    assert account_budgets(1000, 8, None) == 125
    assert account_budgets(1001, 8, None) == 126
    assert account_budgets(1000, 8, 50) == 50


# -- routing --------------------------------------------------------------------------------------


def test_round_robin_spends_the_budget_exactly_across_the_accounts() -> None:
    pool = AccountPool(accounts(4, remaining=25), AccountsSpec(count=4, keys=("a", "b", "c", "d")), Tariff())
    budgeted = BudgetedVictim(pool, 100)
    for _ in range(10):
        assert budgeted.query(images(10)).shape == (10, 3)
    assert [account.used for account in pool.accounts] == [25, 25, 25, 25]
    assert pool.queries == budgeted.spent == 100
    assert {account.retired for account in pool.accounts} == {"spent"}
    with pytest.raises(RunLimitReachedError, match="every account is used up") as caught:
        pool.query(images(1))
    assert caught.value.stop_reason == "server_budget_exhausted"  # every key spent: the server's budget ran out


def test_fill_uses_one_account_until_it_is_spent_and_splits_the_request_at_the_boundary() -> None:
    pool = AccountPool(accounts(3, remaining=30), AccountsSpec(count=3, keys=("a", "b", "c"), policy="fill"), Tariff())
    pool.query(images(20))
    assert [account.used for account in pool.accounts] == [20, 0, 0]
    pool.query(images(20))  # 10 on the first account, 10 on the second
    assert [account.used for account in pool.accounts] == [30, 10, 0]
    assert pool.economy()["accounts_used"] == 2


def test_a_blocked_account_is_retired_and_its_request_goes_whole_to_the_next() -> None:
    calls = {"count": 0}

    def blocked_after_two(batch: Tensor) -> Tensor:
        calls["count"] += 1
        if calls["count"] > 2:
            raise VictimAPIError("HTTP 403 forbidden: this key is blocked", status=403, code="forbidden")
        return uniform(batch)

    first = Account(0, FunctionVictim(blocked_after_two, INFO))
    pool = AccountPool([first, *accounts(1)], AccountsSpec(count=2, keys=("a", "b"), policy="fill"), Tariff())
    pool.accounts[1].index = 1
    for _ in range(4):
        assert pool.query(images(10)).shape == (10, 3)
    assert first.retired == "blocked"
    assert [account.used for account in pool.accounts] == [20, 20]  # nothing lost, nothing twice
    assert pool.economy()["accounts_blocked"] == 1


def test_an_account_that_runs_out_mid_request_forfeits_what_it_answered() -> None:
    pool = AccountPool(accounts(2, remaining=30), AccountsSpec(count=2, keys=("a", "b")), Tariff())
    budgeted = BudgetedVictim(pool, None)
    with pytest.raises(RunLimitReachedError):
        budgeted.query(images(100))
    assert budgeted.forfeited == 60 == pool.queries  # paid for, never answered to the attack
    assert budgeted.spent == 60


# -- time and money --------------------------------------------------------------------------------


def test_the_virtual_clock_adds_the_waits_of_an_accounts_image_limit() -> None:
    account = Account(0, FunctionVictim(uniform, INFO), windows=[FixedWindow(100, 10.0, "images")])
    pool = AccountPool([account], AccountsSpec(), Tariff())
    with pool.clock.running():
        for _ in range(5):
            pool.query(images(50))
    # Requests 1-2 fill the first window; 3-4 wait for the second (10 s), 5 for the third (10 s).
    assert pool.clock.waited_seconds == 20
    assert 20 <= pool.economy()["simulated_seconds"] < 21


def test_accounts_in_parallel_wait_less_than_one_account() -> None:
    def waited(count: int) -> float:
        pool = AccountPool([Account(i, FunctionVictim(uniform, INFO), windows=[FixedWindow(100, 60.0, "images")])
                            for i in range(count)], AccountsSpec(count=count, keys=("k",) * count), Tariff())
        for _ in range(8):
            pool.query(images(50))
        return pool.clock.waited_seconds

    assert waited(1) == 180  # 400 images at 100 a minute: three more windows
    assert waited(4) == 0  # 100 images per account: each within its first window


def test_the_live_clock_computes_no_waits() -> None:
    account = Account(0, FunctionVictim(uniform, INFO), windows=[FixedWindow(10, 60.0, "images")])
    pool = AccountPool([account], AccountsSpec(clock="live"), Tariff())
    for _ in range(3):
        pool.query(images(10))
    assert pool.clock.waited_seconds == 0
    with pytest.raises(AttackError, match="clock must be virtual or live"):
        RunClock("fast")  # type: ignore[arg-type]


def test_time_and_money_limits_stop_the_run_before_a_request() -> None:
    timed = AccountPool([Account(0, FunctionVictim(uniform, INFO), windows=[FixedWindow(10, 3600.0, "images")])],
                        AccountsSpec(max_seconds=5400.0), Tariff())
    timed.query(images(10))
    timed.query(images(10))  # waits an hour for its window: inside the hour and a half
    with pytest.raises(RunLimitReachedError) as caught:
        timed.query(images(10))  # would wait another hour, past the limit: not sent, not charged
    assert caught.value.stop_reason == "time_limit" and caught.value.answered == 0
    assert timed.queries == 20 and timed.clock.waited_seconds == 3600
    priced = AccountPool(accounts(1), AccountsSpec(max_cost=0.25), Tariff(price_per_1000_images=1.0))
    priced.query(images(250))
    with pytest.raises(RunLimitReachedError) as caught:
        priced.query(images(1))
    assert caught.value.stop_reason == "money_limit"
    assert priced.economy()["cost"] == 0.25


# -- a whole run ------------------------------------------------------------------------------------


def test_every_evaluation_records_cost_accounts_and_simulated_time(digits_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    metrics = run_attack(RunSpec(
        attack="random", out=out, budget=1000, victim_checkpoint=digits_checkpoint, eval_every=500,
        show_progress=False, settings={"batch_size": 100, "student_width": 8},
        accounts=AccountsSpec(price_per_1000_images=2.0, image_rate="500/minute", currency="EUR"),
    ))
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["queries"] for line in history] == [500, 1000]
    assert [line["cost"] for line in history] == [1.0, 2.0]
    assert {line["currency"] for line in history} == {"EUR"}
    assert history[-1]["rate_limit_wait_seconds"] == 60  # the second 500 wait for the next minute
    assert history[-1]["simulated_seconds"] >= 60 + history[-1]["attack_seconds"] * 0.5
    assert metrics["cost"] == 2.0 and metrics["accounts_used"] == 1 and metrics["accounts_opened"] == 0
    config = json.loads((out / "config.json").read_text())
    assert config["accounts"]["limits"] == [{"kind": "images", "amount": 500, "window_seconds": 60.0}]


def test_report_draws_fidelity_against_money_and_hours(digits_checkpoint: Path, tmp_path: Path) -> None:
    from experiments.report import aggregate_runs
    from experiments.stats import mean_curve

    runs = []
    for seed in (0, 1):
        out = tmp_path / f"seed{seed}"
        run_attack(RunSpec(attack="random", out=out, budget=1000, victim_checkpoint=digits_checkpoint, seed=seed,
                           eval_every=500, show_progress=False, settings={"batch_size": 100, "student_width": 8},
                           accounts=AccountsSpec(price_per_1000_images=10.0, image_rate="500/hour")))
        runs.append(out)
    histories = [[json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] for out in runs]
    by_cost = mean_curve(histories, "fidelity", x="cost")
    by_hours = mean_curve(histories, "fidelity", x="hours")
    assert by_cost is not None and by_cost.queries == [5.0, 10.0]  # 500 and 1,000 images at 10 per 1,000
    assert by_hours is not None and by_hours.queries[-1] >= 1.0  # the second 500 waited an hour
    text = aggregate_runs(runs, tmp_path / "cost.png", x="cost")
    assert "against cost" in text and (tmp_path / "cost.png").stat().st_size > 0


def test_opening_an_account_counts_the_images_it_must_still_answer_against_the_money() -> None:
    class Opener:
        budget = 10

        def __call__(self, index: int) -> Account:
            return Account(index, FunctionVictim(uniform, INFO), remaining=10)

        def revoke(self) -> None:
            pass

    pool = AccountPool([Account(0, FunctionVictim(uniform, INFO), remaining=10)],
                       AccountsSpec(count=3, admin_key="a", policy="fill", max_cost=2.5),
                       Tariff(price_per_1000_images=100.0, account_price=0.5), opener=Opener(), limit=3)
    pool.opened = 1
    pool.query(images(10))  # 1.0 for the images + 0.5 for the account
    with pytest.raises(RunLimitReachedError) as caught:
        pool.query(images(10))  # a second account (0.5) and its 10 images (1.0) would make 3.0
    assert caught.value.stop_reason == "money_limit"
    assert pool.economy()["cost"] == 1.5 and len(pool.accounts) == 1


def test_a_resumed_pool_counts_what_it_did_not_answer_itself_and_refuses_other_accounts() -> None:
    pool = AccountPool(accounts(2), AccountsSpec(count=2, keys=("a", "b")), Tariff(price_per_1000_images=1.0))
    pool.query(images(100))
    state = pool.state_dict()
    resumed = AccountPool(accounts(2), AccountsSpec(count=2, keys=("a", "b")), Tariff(price_per_1000_images=1.0))
    resumed.load_state_dict(state)
    resumed.sync(300)  # 200 more answered from the journal since the checkpoint
    assert resumed.economy()["cost"] == 0.3
    with pytest.raises(AttackError, match="checkpointed with 2 accounts and is resumed with 3"):
        AccountPool(accounts(3), AccountsSpec(count=3, keys=("a", "b", "c")), Tariff()).load_state_dict(state)
