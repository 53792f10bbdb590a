"""benchmarks/_front.py (the default policy judged on quality and energy) and run.py's held-out set."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def front() -> Any:
    sys.path.insert(0, str(REPO))
    from benchmarks import _front

    return _front


def row(
    policy: str, budget: float, quality: float, energy: float | None, over: float = 0.0
) -> dict[str, Any]:
    return {
        "policy": policy,
        "budget_j": budget,
        "quality": quality,
        "energy_j_mean": energy,
        "violations_pct": over,
    }


def test_default_on_the_front_at_every_level(front: Any) -> None:
    rows = [
        row("answers_first", 1.0, 0.98, 0.5),
        row("baseline", 1.0, 0.985, 0.49),  # holds a generous budget, cheaper, within a point
        row("joint", 1.0, 0.88, 0.4),
        row("answers_first", 0.5, 0.85, 0.45),
        row("baseline", 0.5, 0.99, 0.49, over=30.0),  # better, but does not hold the budget
        row("output_budget", 0.5, 0.95, 0.47),  # better but spends more energy: not a peer
        row("joint", 0.5, 0.80, 0.33),
    ]
    verdict = front.judge(rows, "answers_first")
    assert verdict["all_met"]
    lv = {v["budget_j"]: v for v in verdict["levels"]}
    assert lv[1.0]["best_peer"] == "baseline" and lv[0.5]["best_peer"] == "joint"


def test_a_cheaper_better_peer_or_an_overspent_budget_fails_the_level(front: Any) -> None:
    worse = [row("answers_first", 1.0, 0.90, 0.5), row("fixed_prune", 1.0, 0.95, 0.45)]
    v = front.judge(worse, "answers_first")
    assert not v["all_met"] and v["levels"][0]["quality_gap"] == pytest.approx(0.05)
    over = [row("answers_first", 1.0, 0.99, 0.5, over=2.0), row("joint", 1.0, 0.5, 0.4)]
    v = front.judge(over, "answers_first")
    assert not v["levels"][0]["default_holds_budget"] and not v["all_met"]
    # Everything refused (no energy spent, quality 0) compares with refusals only.
    refused = [row("answers_first", 0.1, 0.0, None), row("joint", 0.1, 0.0, None)]
    assert front.judge(refused, "answers_first")["all_met"]
    assert "NOT met" in front.text(front.judge(worse, "answers_first"))


def test_the_plot_is_written(front: Any, tmp_path: Path) -> None:
    rows = [row("answers_first", 1.0, 0.98, 0.5), row("joint", 1.0, 0.88, 0.4), row("joint", 0.5, 0.0, None)]
    rows.append(row("answers_first", 0.5, 0.0, None))
    assert front.front_plot(rows, tmp_path, "answers_first", "test") == "quality_energy.png"
    assert (tmp_path / "quality_energy.png").stat().st_size > 1000


def test_heldout_questions_come_from_their_own_seed_range(front: Any) -> None:
    from benchmarks import run
    from benchmarks.tinyvqa.generate import make_example

    items = run.load_heldout(6)
    assert len(items) == 6 and all(it.kind in ("short", "list") for it in items)
    for i, it in enumerate(items):
        ex, _ = make_example("test", 0, seed=run.HELDOUT_SEED0 + i)
        assert (it.prompt, it.reference) == (ex.question, ex.answer)
    # Not the tuning images (validation split, seed 0) nor the earlier test set's (seed 0).
    tuning = {
        make_example(split, i, seed=0)[1].convert("RGB").tobytes()
        for split in ("val", "test")
        for i in range(50)
    }
    assert not any(it.image.tobytes() in tuning for it in items)
