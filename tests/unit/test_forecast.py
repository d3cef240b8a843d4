"""When the loop looks again: sooner only for a budget about to cross a threshold."""

from __future__ import annotations

import datetime as dt

import pytest

from token_budget.policy import forecast
from token_budget.policy.inputs import BudgetKey
from unit import builders as b
from unit.builders import NOW

LADDER = [{"type": "Warn", "atPercent": 50}, {"type": "Block", "atPercent": 100}]


def wait(spent: float, per_second: float, interval: float = 30, poll: float = 2,
         *, actions: list[dict[str, object]] | None = None, **snap: object) -> float:
    """Seconds to the next evaluation for a 1,000-token 24h budget spending ``per_second``."""
    budget = b.token_budget(actions=actions or LADDER)
    recent = [b.series(per_second * 600)] if per_second else []
    ev = b.evaluate([budget], [b.series(spent)], recent=recent, recent_seconds=600, **snap)
    return forecast.next_check(ev.decisions, {BudgetKey.of(budget): budget}, NOW,
                               interval, poll)


@pytest.mark.parametrize(
    ("spent", "per_second", "interval", "poll", "expected"),
    [
        pytest.param(900, 0, 30, 2, 30, id="no burn rate: the interval"),
        pytest.param(600, 1, 30, 2, 30, id="400 s from the Block: the interval"),
        pytest.param(980, 1, 30, 2, 20, id="Block due in 20 s: look again at 20 s"),
        pytest.param(999, 1, 30, 2, 2, id="due in 1 s: not sooner than a poll"),
        pytest.param(480, 2, 30, 2, 10, id="Warn due in 10 s counts too"),
        pytest.param(1200, 5, 30, 2, 30, id="already Blocked, nothing above: the interval"),
        pytest.param(995, 1, 1, 2, 1, id="never longer than the interval"),
    ],
)
def test_the_next_evaluation_comes_at_the_forecast_crossing(
        spent: float, per_second: float, interval: float, poll: float,
        expected: float) -> None:
    assert wait(spent, per_second, interval, poll) == pytest.approx(expected)


def test_a_budget_whose_spend_is_unknown_does_not_shorten_the_wait() -> None:
    budget = b.token_budget(actions=LADDER)
    ev = b.evaluate([budget], errors={budget.spec.source.preset: "connection refused"})
    assert not ev.decisions[0].spend_known
    assert forecast.next_check(ev.decisions, {BudgetKey.of(budget): budget}, NOW, 30, 2) == 30


def test_the_crossing_is_linear_in_the_burn_rate() -> None:
    budget = b.token_budget(actions=LADDER)
    ev = b.evaluate([budget], [b.series(500)], recent=[b.series(600)], recent_seconds=600)
    [decision] = ev.decisions
    # 500 of 1,000 at 1 token/s: the Block (the threshold above 50 %) in 500 s.
    assert forecast.crossing_in(decision, budget, NOW) == pytest.approx(500)
    later = NOW + dt.timedelta(seconds=100)
    assert forecast.crossing_in(decision, budget, later) == pytest.approx(400)


def test_an_overdue_crossing_is_polled_until_prometheus_shows_it() -> None:
    budget = b.token_budget(actions=LADDER)
    ev = b.evaluate([budget], [b.series(990)], recent=[b.series(600)], recent_seconds=600)
    budgets = {BudgetKey.of(budget): budget}
    # Due at NOW + 10 s; asked 30 s later, with the same (stale) decision: poll, do not wait.
    assert forecast.next_check(ev.decisions, budgets, NOW, 30, 2) == pytest.approx(10)
    later = NOW + dt.timedelta(seconds=30)
    assert forecast.next_check(ev.decisions, budgets, later, 30, 2) == 2
