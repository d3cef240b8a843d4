"""The burn rate from two tails (metrics.accruals): what is kept, and when it makes one."""

from __future__ import annotations

import datetime as dt
import tracemalloc
from decimal import Decimal

import pytest

from token_budget.metrics import accruals
from token_budget.metrics.accruals import Accruals, accrual, derive
from token_budget.policy.inputs import SpendSeries

T0 = dt.datetime(2026, 12, 2, 10, 5, tzinfo=dt.UTC)
RULE = 1_000  # the rule run a tail starts at, ms
KEY = ("counters", ())


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def row(pod: str, tokens: float, cost: str | None = None, ns: str = "ns") -> SpendSeries:
    return SpendSeries(ns, pod, "gpt-4o", tokens, tokens * 2, tokens * 3,
                       None if cost is None else Decimal(cost))


def kept_every(interval: float, until: float, anchor: int = RULE) -> Accruals:
    kept = Accruals()
    t = 0.0
    while t <= until:
        kept.add(KEY, anchor, at(t), [row("a", 100 + t)], 600)
        t += interval
    return kept


def test_no_tail_is_old_enough_in_the_first_minutes() -> None:
    kept = kept_every(30, 570)
    assert kept.before(KEY, at(570), 600) is None
    assert kept.before(KEY, at(600), 600) is not None


def test_the_newest_tail_at_least_the_window_old_within_the_lag() -> None:
    kept = kept_every(30, 900)
    found = kept.before(KEY, at(915), 600)
    assert found is not None and found.at == at(300)  # 615 s back; 585 s is too recent
    # Evaluations far apart: nothing within the lag, so the burn rate is read.
    sparse = kept_every(120, 900)
    assert sparse.before(KEY, at(1030), 600) is None  # 360 lies 670 s back, 480 only 550 s


def test_a_rule_run_since_starts_the_tail_anew() -> None:
    kept = kept_every(30, 600)
    kept.add(KEY, RULE + 3_600_000, at(630), [row("a", 5)], 600)
    assert kept.before(KEY, at(640), 600) is None


def test_what_is_kept_is_bounded_spaced_and_dropped_when_the_clock_goes_back() -> None:
    kept = kept_every(10, 3600)  # evaluations every 10 s for an hour
    assert len(kept) <= (600 + accruals.MAX_LAG_SECONDS) / accruals.SPACING_SECONDS + 1
    n = len(kept)
    kept.add(KEY, RULE, at(3600), [row("a", 1)], 600)  # the same instant collected again
    assert len(kept) == n
    kept.add(KEY, RULE, at(100), [row("a", 1)], 600)  # the clock was set back
    assert len(kept) == 1 and kept.before(KEY, at(3600), 600) is None


def test_tails_with_the_same_rows_share_their_keys() -> None:
    first = accrual(RULE, at(0), [row("a", 1), row("b", 2)])
    second = accrual(RULE, at(30), [row("a", 5), row("b", 9)], like=first)
    assert second.keys is first.keys
    third = accrual(RULE, at(60), [row("a", 5), row("b", 9), row("c", 1)], like=second)
    assert third.keys[0] is first.keys[0] and third.keys[1] is first.keys[1]  # not copied


def alive(*pods: str) -> set[tuple[str, str, str, tuple[tuple[str, str], ...]]]:
    return {("ns", p, "gpt-4o", ()) for p in pods}


def test_two_tails_the_window_apart_differ_by_its_spend_to_the_digit() -> None:
    old = accrual(RULE, at(0), [row("a", 1234.5, "0.10"), row("idle", 7.0),
                                row("gone", 9.0)])
    now = [row("a", 2234.5, "0.35"), row("idle", 7.0), row("gone", 9.0),
           row("born", 88.0, "0.01")]
    found = derive(old, RULE, at(600), now, 600, alive("a", "idle", "born", "other"))
    assert found is not None
    rows, new = found
    got = {s.workload: s for s in rows}
    assert got["a"] == SpendSeries("ns", "a", "gpt-4o", 1000.0, 2000.0, 3000.0,
                                   Decimal(repr(0.35 - 0.10)))  # token counts: exact
    assert got["idle"].tokens == 0  # a sample in the window, nothing spent: a row of 0
    assert "gone" not in got  # no sample in the window: no row, as the query has none
    # Rows alive without an old tail (born, or an old read that missed them) are the
    # caller's to read by query: their whole tail is no burn rate.
    assert "born" not in got and new == alive("born", "other")


def test_a_longer_span_is_scaled_to_the_window() -> None:
    old = accrual(RULE, at(0), [row("a", 0.0)])
    got = derive(old, RULE, at(660), [row("a", 1100.0)], 600, alive("a"))
    assert got is not None and got[0][0].input_tokens == pytest.approx(1000.0)


@pytest.mark.parametrize(("anchor", "seconds_later", "now_rows"), [
    (RULE + 3_600_000, 600, [row("a", 200.0)]),  # the rule ran since: another start
    (RULE, 599, [row("a", 200.0)]),  # too recent
    (RULE, 661, [row("a", 200.0)]),  # too far apart
    (RULE, 600, [row("a", 50.0)]),  # a row fell (data lost, a reset read two ways)
    (RULE, 600, []),  # a row vanished
])
def test_no_burn_rate_is_made_up(anchor: int, seconds_later: float,
                                 now_rows: list[SpendSeries]) -> None:
    old = accrual(RULE, at(0), [row("a", 100.0)])
    assert derive(old, anchor, at(seconds_later), now_rows, 600, alive("a")) is None


def test_a_sum_in_another_order_is_no_fall() -> None:
    old = accrual(RULE, at(0), [row("a", 0.1 + 0.2 + 0.3)])
    got = derive(old, RULE, at(600), [row("a", 0.3 + 0.2 + 0.1)], 600, alive("a"))
    assert got is not None and got[0][0].tokens == 0


def test_a_reading_nobody_makes_any_more_is_forgotten() -> None:
    kept = kept_every(30, 300)
    kept.add(("other", ()), RULE, at(300), [row("b", 1)], 600)
    kept.prune(at(300 + 600 + accruals.MAX_LAG_SECONDS + 1), 600)
    assert len(kept) == 0
    kept = kept_every(30, 300)
    kept.prune(at(600), 600)
    assert len(kept) == 11


def test_pods_coming_and_going_do_not_copy_every_key() -> None:
    """README: about 1.5 MB a kept tail per 100,000 series (33,334 rows): four figures
    (32 bytes) and a pointer to a key shared with the tail before, about 40 bytes a row.
    Each tail here is parsed anew (new strings, as from a JSON answer) and has one row
    more; copying the keys held 227 bytes a row here (277 MB for 27 tails of 33,334)."""
    rows, tails = 5_000, 27
    kept = Accruals()
    tracemalloc.start()
    try:
        for t in range(tails):
            series = [SpendSeries(f"ns-{i % 100}", f"agent-{i}", "gpt-4o", 1.0 * t, 0.0, 0.0)
                      for i in range(rows + t)]
            kept.add(KEY, RULE, at(t * 25), series, 600)
            del series
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(kept) == tails
    per_row = held / (rows * tails)
    assert per_row < 60, f"{per_row:.0f} bytes a row and tail"
