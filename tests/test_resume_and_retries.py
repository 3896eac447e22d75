"""Runs never pay twice and never lose what they paid for: the answers journal, resume, retries.

In this process: a run interrupted mid-step and resumed trains exactly as the uninterrupted
run (every attack), asking the victim only for what it had not answered; the journal's
format survives a record cut short. Over real HTTP (a real ``stealsim serve`` and a real
KServe server): a finished run resumed charges nothing, a SIGKILLed run resumed reaches
its budget with the server's count equal to the run's, transient 5xx are retried without
double counting, and a run stopped by an error keeps its directory and says how to resume.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from attacker.attacks import ATTACKS, build_attack
from attacker.journal import AnswerJournal
from attacker.loop import LoopConfig
from attacker.rundir import RunDirectory
from attacker.victims import InProcessVictim
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

    def __init__(self, victim: InProcessVictim, limit: int | None = None) -> None:
        self.victim, self.info, self.limit, self.seen = victim, victim.info, limit, 0
        self.asked: list[Tensor] = []

    def query(self, images: Tensor) -> Tensor:
        if self.limit is not None and self.seen + images.shape[0] > self.limit:
            raise Interrupt
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
