"""Query shaping (issue #38): the adaptive attacker's answer to the detectors.

On fixed tensors: jitter spreads near-duplicates past the distance asked and leaves far queries
alone; cover images fill their share of a request and their answers are cut out exactly; the
generator's confidence term is zero for sure answers. Then DFME (whose zeroth-order queries are
near-duplicates by construction) against SEAT on a real server: the plain run is flagged, the
shaped one is not, and SEAT's statistic (its similar pairs) stays under the threshold.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from server_support import ServerProcess

from attacker.adaptive import AdaptiveSettings, AnswerAdapter, spread_out
from attacker.losses import confidence_shortfall
from attacker.runner import RunSpec, run_attack
from attacker.victims import VictimInfo
from stealsim.errors import AttackError

INFO = VictimInfo(num_classes=10, input_shape=(1, 8, 8))


def _rms_distances(images: torch.Tensor) -> torch.Tensor:
    flat = images.flatten(1)
    distances = torch.cdist(flat, flat) / flat.shape[1] ** 0.5
    return distances + torch.eye(len(flat)) * 1e9


def test_jitter_spreads_near_duplicates_and_leaves_far_queries_alone() -> None:
    generator = torch.Generator().manual_seed(0)
    base = torch.rand(4, 1, 8, 8, generator=generator)
    images = torch.cat([base, base + 1e-4])  # four near-duplicate pairs (within the request)
    history = torch.rand(2, 64, generator=generator)
    images[0] = history[0].view(1, 8, 8)  # one query repeats one sent earlier (its pair is gone)
    sent, jittered = spread_out(images, history, 0.1, torch.Generator().manual_seed(1))
    assert jittered.tolist() == [True, False, False, False, False, True, True, True]
    assert float(_rms_distances(sent).min()) >= 0.1
    assert float(torch.cdist(sent.flatten(1), history).min()) / 8 >= 0.1
    torch.testing.assert_close(sent[1:5], images[1:5])  # the first of each pair is left as it was
    assert float(sent.min()) >= 0.0 and float(sent.max()) <= 1.0


def test_cover_fills_its_share_and_its_answers_are_cut_out_exactly() -> None:
    adapter = AnswerAdapter(AdaptiveSettings(shape_cover=0.5), INFO, torch.device("cpu"), seed=3)
    images = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sent, own = adapter.shape(images, used_before=0, remaining=1000)
    assert own is not None and len(sent) == 80
    torch.testing.assert_close(sent[own], images)  # every attack image goes, once, unchanged
    cover = sent[torch.tensor([i not in set(own.tolist()) for i in range(80)])]
    pool = adapter._cover_images().flatten(1)
    assert all(bool((pool == row.flatten()).all(dim=1).any()) for row in cover)  # natural images
    assert adapter.metrics()["shaped_cover_queries"] == 40
    # Near the end of the budget the cover shrinks to what is left, never past it.
    sent, own = adapter.shape(images, used_before=950, remaining=50)
    assert len(sent) == 50 and own is not None and len(own) == 40
    sent, own = adapter.shape(images, used_before=960, remaining=40)
    assert own is None and len(sent) == 40
    # The same position of the same run sends the same images (a resumed run replays its journal).
    again = AnswerAdapter(AdaptiveSettings(shape_cover=0.5), INFO, torch.device("cpu"), seed=3)
    torch.testing.assert_close(again.shape(images, 0, 1000)[0],
                               AnswerAdapter(AdaptiveSettings(shape_cover=0.5), INFO, torch.device("cpu"),
                                             seed=3).shape(images, 0, 1000)[0])


def test_shaping_settings_are_checked() -> None:
    for bad in ({"shape_cover": 1.0}, {"shape_min_distance": -0.1}, {"shape_history": 0}):
        with pytest.raises(AttackError, match="shape_"):
            AdaptiveSettings(**bad)  # type: ignore[arg-type]
    assert not AdaptiveSettings().enabled and AdaptiveSettings(shape_cover=0.2).enabled


def test_the_confidence_term_is_zero_for_sure_students_and_grows_with_doubt() -> None:
    sure = torch.tensor([[50.0, 0.0, 0.0], [0.0, 0.0, 50.0]])
    assert float(confidence_shortfall(sure)) == pytest.approx(0.0, abs=1e-6)
    assert float(confidence_shortfall(torch.zeros(2, 3))) == pytest.approx(2 / 3)
    logits = torch.zeros(2, 3, requires_grad=True)
    confidence_shortfall(logits).backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 0


SEAT_THRESHOLD = 0.05
SEAT_PAIRS = 20


@pytest.fixture(scope="module")
def seat_server(digits_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    logs = tmp_path_factory.mktemp("shaping")
    server = ServerProcess(
        {"victim": digits_checkpoint},
        args=["--policy", f'victim=[{{"name": "seat", "threshold": {SEAT_THRESHOLD}, "max_pairs": {SEAT_PAIRS}}}]',
              "--max-wait-ms", "2"],
        env={}, log_path=logs / "server.log")
    yield server
    server.stop()


def _dfme_against_seat(server: ServerProcess, out: Path, shaping: dict[str, float]) -> dict[str, object]:
    with server.service() as admin:
        key = admin.create_key(2_000, name=f"dfme {shaping}").api_key
        eval_key = admin.create_key(100_000, name=f"dfme {shaping} eval", policy=[{"name": "probabilities"}]).api_key
    metrics = run_attack(RunSpec(
        attack="dfme", out=out, budget=1_200, url=server.url, api_key=key, eval_api_key=eval_key, model="victim",
        eval_every=1_200, show_progress=False, settings={"student_width": 8, "batch_size": 50, **shaping}))
    with server.service() as admin:
        usage = admin.usage(key)
    return {"metrics": metrics, "flags": usage.get("flags", [])}


def test_jitter_keeps_dfme_under_seats_threshold_on_a_real_server(seat_server: ServerProcess, tmp_path: Path) -> None:
    """DFME's x and x + eps u are similar pairs: SEAT flags the plain run. Jittered past SEAT's
    threshold, the same run sends no similar pair at all: SEAT's count stays at 0, no flag."""
    plain = _dfme_against_seat(seat_server, tmp_path / "plain", {})
    shaped = _dfme_against_seat(seat_server, tmp_path / "shaped", {"shape_min_distance": 2 * SEAT_THRESHOLD})
    assert plain["flags"] == ["seat"]
    assert shaped["flags"] == []
    metrics = shaped["metrics"]
    assert isinstance(metrics, dict) and metrics["queries_used"] == 1_200 and metrics["shaped_jittered"] > 0
    assert "first_flag" in metrics and "seat" not in metrics["first_flag"]
