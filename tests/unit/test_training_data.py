"""Pure rules of the training data: the per-owner cap and the held-out split."""

from datetime import UTC, datetime, timedelta

from service.feedback.export import ExportRow
from worker.data import cap_per_owner, is_heldout


def _rows(owner: int, n: int, start: int = 0) -> list[ExportRow]:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    return [ExportRow({"i": (owner, i)}, "thumb", owner, f"p{owner}-{i}", t0 + timedelta(minutes=start + i))
            for i in range(n)]


def test_no_owner_exceeds_the_cap_when_others_contribute():
    rows = _rows(1, 50) + [r for owner in range(2, 10) for r in _rows(owner, 5)]  # one loud key, eight quiet ones
    kept, dropped = cap_per_owner(rows, 0.2)
    loud = sum(r.owner == 1 for r in kept)
    assert loud / len(kept) <= 0.2 and loud >= 1
    assert sum(r.owner != 1 for r in kept) == 40  # the quiet keys keep everything
    assert dropped == len(rows) - len(kept)
    newest_loud = max(r.updated_at for r in rows if r.owner == 1)
    assert newest_loud in {r.updated_at for r in kept if r.owner == 1}  # the newest votes are the ones kept


def test_a_single_owner_still_trains_and_no_cap_keeps_everything():
    kept, _ = cap_per_owner(_rows(1, 10), 0.2)
    assert len(kept) == 1
    assert cap_per_owner(_rows(1, 10), 1.0) == (_rows(1, 10), 0)


def test_the_heldout_split_is_stable_and_near_its_fraction():
    keys = [f"prompt-{i}" for i in range(4000)]
    first = [is_heldout(k, 0.15) for k in keys]
    assert first == [is_heldout(k, 0.15) for k in keys]
    assert 0.12 < sum(first) / len(first) < 0.18
    assert not any(is_heldout(k, 0.0) for k in keys)
