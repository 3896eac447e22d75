"""Runs never pay twice and never lose what they paid for: the answers journal, resume, retries.

In this process: a run interrupted mid-step and resumed trains exactly as the uninterrupted
run (every attack), asking the victim only for what it had not answered; the journal's
format survives a record cut short. Over real HTTP (a real ``stealsim serve`` and a real
KServe server): a finished run resumed charges nothing, a SIGKILLed run resumed reaches
its budget with the server's count equal to the run's, transient 5xx are retried without
double counting, and a run stopped by an error keeps its directory and says how to resume.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from kserve_support import KServeModel, start_kserve
from server_support import ServerProcess, admin, new_key
from torch import Tensor

from attacker.attacks import ATTACKS, build_attack
from attacker.client import HttpVictim, RetryPolicy
from attacker.endpoint import EndpointOptions
from attacker.evaluation import EvalConfig, Evaluator
from attacker.journal import AnswerJournal
from attacker.loop import LoopConfig
from attacker.rundir import Ledger, RunDirectory
from attacker.students import build_student
from attacker.victims import BudgetedVictim, InProcessVictim
from stealsim.data import load_dataset
from stealsim.errors import VictimAPIError
from stealsim.training import seed_everything

TINY = {"student_width": 8, "generator_width": 8, "batch_size": 64, "latent_dim": 16}


def tiny_settings(name: str) -> dict[str, object]:
    settings = dict(TINY)
    if name in ("random", "knockoff", "art-knockoff", "art-copycat"):
        settings = {k: v for k, v in settings.items() if k not in ("generator_width", "latent_dim")}
    if name.startswith("art-"):
        settings["nb_epochs"] = 1
    return settings


@pytest.fixture
def local_victim(digits_checkpoint: Path) -> InProcessVictim:
    return InProcessVictim.from_checkpoint(digits_checkpoint)


class Interrupt(Exception):
    pass


class Counting:
    """The victim, counting the images it answers; raises :class:`Interrupt` past ``limit``."""

    def __init__(self, victim: InProcessVictim, limit: int | None = None, error: Exception | None = None) -> None:
        self.victim, self.info, self.limit, self.seen, self.error = victim, victim.info, limit, 0, error
        self.asked: list[Tensor] = []

    def query(self, images: Tensor) -> Tensor:
        if self.limit is not None and self.seen + images.shape[0] > self.limit:
            raise self.error or Interrupt()
        self.seen += int(images.shape[0])
        self.asked.append(images.clone())
        return self.victim.query(images)


def _final_state(attack: object) -> dict[str, Tensor]:
    state = attack.state_dict()  # type: ignore[attr-defined]
    flat: dict[str, Tensor] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, Tensor):
            flat[prefix] = value
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}", item)
        elif isinstance(value, list | tuple):
            for index, item in enumerate(value):
                walk(f"{prefix}.{index}", item)

    walk("", state)
    return flat


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_an_interrupted_run_resumed_trains_as_the_uninterrupted_one(
    name: str, local_victim: InProcessVictim, tmp_path: Path
) -> None:
    """Killed mid-step past its checkpoint, resumed: the journal answers what was paid for, the
    victim only the rest, and the clone is the uninterrupted run's, tensor for tensor."""
    torch.set_num_threads(1)
    config = LoopConfig(budget=1500, eval_every=300, seed=3, show_progress=False)
    seed_everything(config.seed)  # as the runner does before it builds an attack
    whole = build_attack(name, local_victim.info, torch.device("cpu"), **tiny_settings(name))
    straight = Counting(local_victim)
    (tmp_path / "whole").mkdir()
    whole.run(straight, config, RunDirectory(tmp_path / "whole"))

    run_dir = RunDirectory(tmp_path / "cut")
    run_dir.path.mkdir()
    seed_everything(config.seed)
    first = build_attack(name, local_victim.info, torch.device("cpu"), **tiny_settings(name))
    dies = Counting(local_victim, limit=1100)
    with pytest.raises(Interrupt):
        first.run(dies, config, run_dir)
    spent = run_dir.read_ledger().attack_queries
    assert spent == dies.seen  # every answer is counted (the journal and the ledger agree)
    journaled = sum(record.count for record in run_dir.journal().read())
    checkpoint = run_dir.load_checkpoint()
    at_checkpoint = 0 if checkpoint is None else int(checkpoint["queries"])
    assert journaled == spent - at_checkpoint > 0  # what the checkpoint does not cover is on disk

    seed_everything(config.seed)
    second = build_attack(name, local_victim.info, torch.device("cpu"), **tiny_settings(name))
    rest = Counting(local_victim)
    outcome = second.run(rest, config, run_dir, resume=True)
    assert rest.seen == 1500 - spent  # nothing asked twice
    assert outcome.metrics["queries_used"] == 1500
    assert outcome.metrics["replayed_queries"] == journaled and outcome.metrics["unreplayed_queries"] == 0
    # The images asked after the resume are those the uninterrupted run asked after `spent`.
    assert torch.equal(torch.cat(rest.asked), torch.cat(straight.asked)[spent:])
    expected, got = _final_state(whole), _final_state(second)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


@pytest.mark.parametrize(("shift", "replayed"), [(1e-6, True), (1e-2, False)])
def test_a_resumed_training_that_asks_for_other_images_stops_the_replay(
    shift: float, replayed: bool, local_victim: InProcessVictim, tmp_path: Path
) -> None:
    """Images within the tolerance (other float rounding) are replayed; others stop the replay: the
    answers left are paid for and unused, and the run still spends exactly its budget."""
    torch.set_num_threads(1)
    config = LoopConfig(budget=1500, eval_every=300, seed=3, show_progress=False)
    run_dir = RunDirectory(tmp_path)
    seed_everything(config.seed)
    first = build_attack("random", local_victim.info, torch.device("cpu"), **tiny_settings("random"))
    with pytest.raises(Interrupt):
        first.run(Counting(local_victim, limit=1100), config, run_dir)
    spent = run_dir.read_ledger().attack_queries
    journal = run_dir.journal()
    records = journal.read()
    journal.clear()
    for record in records:  # as if the resumed training computed its images a little differently
        journal.append(record.start, (record.images + shift).clamp(0, 1), record.answers)
    journal.close()
    journaled = sum(record.count for record in records)

    seed_everything(config.seed)
    second = build_attack("random", local_victim.info, torch.device("cpu"), **tiny_settings("random"))
    rest = Counting(local_victim)
    outcome = second.run(rest, config, run_dir, resume=True)
    assert outcome.metrics["queries_used"] == 1500 and rest.seen == 1500 - spent  # nothing paid twice
    assert outcome.metrics["replayed_queries"] == (journaled if replayed else 0)
    assert outcome.metrics["unreplayed_queries"] == (0 if replayed else journaled)


def test_a_run_killed_in_its_final_evaluation_does_not_buy_the_evaluation_again(
    local_victim: InProcessVictim, tmp_path: Path
) -> None:
    """The evaluation's answers are journaled too: killed half-way through the final transfer
    queries and resumed, the run asks only for the rest, and measures what it would have."""
    torch.set_num_threads(1)
    config = LoopConfig(budget=640, eval_every=320, seed=3, show_progress=False)
    data = load_dataset("digits")
    evaluation = EvalConfig(transfer_samples=20, reference_epochs=1)

    def run(out: Path, eval_victim: Counting, resume: bool = False) -> dict[str, object]:
        run_dir = RunDirectory(out)
        ledger = run_dir.read_ledger() if resume else Ledger()
        metered = BudgetedVictim(eval_victim, None, used=ledger.eval_queries,
                                 journal=run_dir.journal("evaluation"))
        if resume:
            metered.replay_counted(run_dir.journal("evaluation").read(repair=True))

        def charged(spent: int) -> None:
            ledger.eval_queries = max(ledger.eval_queries, spent)

        metered.on_charge = charged
        seed_everything(config.seed)
        attack = build_attack("random", local_victim.info, torch.device("cpu"), **tiny_settings("random"))
        evaluator = Evaluator(data, metered, evaluation, cache_dir=out, reference_factory=lambda: build_student(
            local_victim.info, attack.settings.student_settings()))
        evaluator.victim_labels()
        try:
            return attack.run(local_victim, config, run_dir, evaluator, resume=resume, ledger=ledger).metrics
        finally:
            assert metered.journal is not None
            metered.journal.close()

    (tmp_path / "whole").mkdir()
    whole = Counting(local_victim)
    expected = run(tmp_path / "whole", whole)
    final_cost = whole.seen - len(data.y_test)  # the clone's and the reference's transfer queries
    (tmp_path / "cut").mkdir()
    dies = Counting(local_victim, limit=len(data.y_test) + final_cost // 2)
    with pytest.raises(Interrupt):
        run(tmp_path / "cut", dies)
    journaled = sum(record.count for record in RunDirectory(tmp_path / "cut").journal("evaluation").read())
    assert journaled == dies.seen - len(data.y_test) > 0
    rest = Counting(local_victim)
    got = run(tmp_path / "cut", rest, resume=True)
    assert rest.seen == final_cost - journaled  # the split's labels cached, the journaled answers replayed
    assert got["eval_queries"] == expected["eval_queries"] == whole.seen
    for key in ("fidelity", "accuracy", "transfer_success_rate", "reference_transfer_success_rate"):
        assert got[key] == expected[key], key

    # A final evaluation the victim failed half-way (HTTP 500 after the retries) is done again on
    # resume, from its journaled answers first.
    (tmp_path / "failed").mkdir()
    failing = Counting(local_victim, limit=len(data.y_test) + final_cost // 2,
                       error=VictimAPIError("HTTP 500", status=500))
    failed = run(tmp_path / "failed", failing)
    assert "evaluation_error" in failed and "fidelity" not in failed
    rest = Counting(local_victim)
    got = run(tmp_path / "failed", rest, resume=True)
    assert rest.seen == whole.seen - failing.seen and got["eval_queries"] == whole.seen
    assert "evaluation_error" not in got and got["fidelity"] == expected["fidelity"]
    assert [line["queries"] for line in RunDirectory(tmp_path / "failed").read_history()] == [320, 640]


def test_a_record_cut_short_is_dropped_and_the_journal_goes_on(tmp_path: Path) -> None:
    journal = AnswerJournal(tmp_path / "answers.journal", fsync=False)
    journal.append(0, torch.rand(3, 1, 8, 8), torch.softmax(torch.rand(3, 10), dim=1))
    journal.append(3, torch.rand(2, 1, 8, 8), torch.tensor([4, 7]))
    journal.close()
    whole = (tmp_path / "answers.journal").read_bytes()
    (tmp_path / "answers.journal").write_bytes(whole[:-5])  # the second record, cut short by a kill
    assert [record.count for record in journal.read()] == [3]
    assert len((tmp_path / "answers.journal").read_bytes()) == len(whole) - 5  # a reader repairs nothing
    records = journal.read(repair=True)
    assert [(record.start, record.count) for record in records] == [(0, 3)]
    journal.append(3, torch.rand(2, 1, 8, 8), torch.tensor([4, 7]))
    records = journal.read()
    assert [(record.start, record.count) for record in records] == [(0, 3), (3, 2)]
    assert records[1].answers.dtype == torch.int64 and records[1].answers.tolist() == [4, 7]
    journal.clear()
    journal.close()
    assert journal.read() == [] and journal.answered_until() == 0


# -- over real HTTP: a stealsim server ------------------------------------------------------------


FLAGS = ["--set", "student_width=8", "--batch-size", "64", "--transfer-samples", "20",
         "--reference-epochs", "1", "--threads", "1", "--quiet"]


def usage(server: ServerProcess, key: str) -> int:
    response = httpx.get(f"{server.url}/v1/usage", headers={"X-API-Key": key}, timeout=30)
    assert response.status_code == 200, response.text
    return int(response.json()["used"])


def attack_command(server: ServerProcess, key: str, out: Path, budget: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "stealsim", "attack", "random", "--url", server.url, "--api-key", key,
            "--model", "victim", "--budget", str(budget), "--out", str(out), *FLAGS, *extra]


def run_cli(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=240)


def wait_for(out: Path, process: subprocess.Popen[str] | subprocess.Popen[bytes], queries: int,
             journaled: bool = False) -> int:
    """Wait until the run's ledger holds ``queries`` (and, with ``journaled``, its journal an answer)."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        try:
            spent = int(json.loads((out / "ledger.json").read_text())["attack_queries"])
        except (OSError, json.JSONDecodeError, KeyError):
            spent = 0
        journal = out / "answers.journal"
        if spent >= queries and (not journaled or (journal.is_file() and journal.stat().st_size > 0)):
            return spent
        time.sleep(0.005)
    raise AssertionError("the run ended before it reached the point to stop it")


def test_resuming_a_finished_run_does_nothing_and_charges_nothing(
    victim_server: ServerProcess, client: httpx.Client, tmp_path: Path
) -> None:
    key = new_key(client, budget=10_000)
    out = tmp_path / "run"
    command = attack_command(victim_server, key, out, 2000)
    assert run_cli(command).returncode == 0
    before, metrics = usage(victim_server, key), (out / "metrics.json").read_bytes()
    (out / "report.md").unlink()  # as if killed before the report was written
    result = run_cli([*command, "--resume"])
    assert result.returncode == 0, result.stderr
    assert "holds a finished run: nothing to resume, nothing charged" in result.stderr
    assert "queries_used=2000" in result.stdout
    assert usage(victim_server, key) == before  # not one image: no final evaluation again
    assert (out / "metrics.json").read_bytes() == metrics and (out / "report.md").is_file()


def test_a_sigkilled_run_resumed_pays_each_answer_once(
    victim_server: ServerProcess, client: httpx.Client, tmp_path: Path
) -> None:
    budget = 8000
    key = new_key(client, budget=20_000)
    out = tmp_path / "run"
    command = attack_command(victim_server, key, out, budget, "--eval-every", "1000")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(out, process, 2500, journaled=True)
    process.send_signal(signal.SIGKILL)
    process.wait()
    run_dir = RunDirectory(out)
    ledger = run_dir.read_ledger()  # the ledger file, or the journal where it is one request ahead
    journaled = sum(record.count for record in run_dir.journal().read())
    checkpoint = run_dir.load_checkpoint()
    assert checkpoint is not None and journaled == ledger.attack_queries - int(checkpoint["queries"]) > 0
    server_at_kill = usage(victim_server, key)
    unrecorded = server_at_kill - ledger.attack_queries - ledger.eval_queries  # a request in flight at the kill
    assert unrecorded >= 0

    result = run_cli([*command, "--resume"])
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["queries_used"] == budget and metrics["server_count_matches"] is True
    assert usage(victim_server, key) == budget + metrics["eval_queries"]
    # The answers journaled since the checkpoint were replayed, not bought again: after the kill the
    # server charged only the budget the run had not spent, and the evaluation.
    assert metrics["replayed_queries"] == journaled and metrics["lost_queries"] == unrecorded
    charged_after = usage(victim_server, key) - server_at_kill
    assert charged_after == budget - ledger.attack_queries - unrecorded + metrics["eval_queries"] - ledger.eval_queries
    history = [json.loads(line)["queries"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert history == sorted(history) and history[-1] == budget


def test_a_run_stopped_by_an_error_keeps_its_directory_and_says_how_to_resume(
    victim_server: ServerProcess, client: httpx.Client, tmp_path: Path
) -> None:
    key_response = client.post("/v1/admin/keys", json={"budget": 50_000}, headers=admin())
    assert key_response.status_code == 201, key_response.text
    key, key_id = key_response.json()["api_key"], key_response.json()["key_id"]
    out = tmp_path / "run"
    command = attack_command(victim_server, key, out, 40_000)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(out, process, 1000)
    assert client.delete(f"/v1/admin/keys/{key_id}", headers=admin()).status_code in (200, 204)  # revoked mid-run: 401 from now on
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 3, stderr  # not 2: the run had started and wrote its directory
    assert "error: " in stderr and "401" in stderr
    spent = RunDirectory(out).read_ledger().attack_queries
    assert f"stopped at {spent:,} of 40,000 queries" in stderr
    assert f"keeps everything paid for; to continue: stealsim attack random --url {victim_server.url}" in stderr
    assert '--api-key "$STEALSIM_API_KEY"' in stderr and key not in stderr and stderr.rstrip().endswith(
        "(with STEALSIM_API_KEY set to the keys)")
    assert (out / "config.json").is_file() and not (out / "metrics.json").exists()


# -- over real HTTP: a KServe server that fails -----------------------------------------------------


def test_transient_500s_are_retried_with_exact_counts(tmp_path: Path) -> None:
    """A KServe model that fails one inference request in twenty (HTTP 500) is stolen all the same."""
    with start_kserve([KServeModel("flaky", fail_every=20)], tmp_path / "kserve") as server:
        out = tmp_path / "run"
        command = [sys.executable, "-m", "stealsim", "attack", "random", "--url", server.url, "--model", "flaky",
                   "--budget", "3000", "--out", str(out), "--input-range", "0,16", "--output-kind", "logits",
                   "--batch-size", "50", "--transfer-samples", "10", "--reference-epochs", "1",
                   "--threads", "1", "--quiet"]
        result = run_cli(command)
        assert result.returncode == 0, result.stderr
        metrics = json.loads((out / "metrics.json").read_text())
        counts = server.counts("flaky")
    assert metrics["queries_used"] == 3000 and metrics["stop_reason"] == "budget_spent"
    assert counts["failed"] >= 3  # 60 requests of the attack alone, and the evaluation's
    assert metrics["http_retries"] == counts["failed"]  # each failure retried once, and answered then
    assert counts["images"] == 3000 + metrics["eval_queries"]  # what the server answered = what the run counted


def test_a_server_that_keeps_failing_ends_the_request_after_the_retries(tmp_path: Path) -> None:
    with start_kserve([KServeModel("broken", fail_every=1)], tmp_path / "kserve") as server:
        retry = RetryPolicy(max_retries=3, base_delay=0.001)
        with HttpVictim(server.url, None, "broken", retry=retry,
                        options=EndpointOptions(input_range=(0.0, 16.0), output_kind="logits")) as victim:
            metered = BudgetedVictim(victim, 100)
            with pytest.raises(VictimAPIError) as failure:
                metered.query(torch.rand(5, 1, 8, 8))
        counts = server.counts("broken")
    assert failure.value.status == 500
    assert counts == {"requests": 4, "images": 0, "failed": 4}  # the request and its 3 retries
    assert metered.spent == 0 and victim.retries == 3
