"""The rollout decision on hand-picked vote counts."""

from datetime import UTC, datetime, timedelta

from worker.rollout import Arm, decide

NOW = datetime(2026, 11, 27, tzinfo=UTC)
RULES = {"min_votes": 50, "max_drop": 0.05, "alpha": 0.05, "max_hours": 72, "now": NOW}


def test_a_clearly_better_canary_is_promoted_and_a_clearly_worse_one_rejected():
    better = decide(Arm(2, 80, 20), Arm(1, 50, 50), NOW - timedelta(hours=1), **RULES)
    assert better.action == "promote" and better.numbers["p"] < 0.05
    worse = decide(Arm(2, 30, 70), Arm(1, 60, 40), NOW - timedelta(hours=1), **RULES)
    assert worse.action == "reject" and worse.numbers["p"] > 0.05


def test_it_waits_for_votes_then_gives_up_after_the_deadline():
    few = decide(Arm(2, 10, 0), Arm(1, 100, 100), NOW - timedelta(hours=1), **RULES)
    assert few.action == "wait"
    stale = decide(Arm(2, 10, 0), Arm(1, 100, 100), NOW - timedelta(hours=73), **RULES)
    assert stale.action == "reject" and "after 72" in stale.numbers["why"]


def test_an_equal_canary_is_promoted_only_with_enough_evidence():
    # Same approval: non-inferiority within 5 points needs enough votes to be shown.
    assert decide(Arm(2, 30, 30), Arm(1, 30, 30), NOW, **RULES).action == "reject"
    assert decide(Arm(2, 600, 400), Arm(1, 600, 400), NOW, **RULES).action == "promote"
