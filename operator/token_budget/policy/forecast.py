"""When to evaluate again: soon for a budget about to cross a threshold, else at the interval.

At a fixed interval a runaway agent keeps spending for up to one interval after its
spend crossed the limit. The engine already forecasts each window's run-out time from
the burn rate; from it, :func:`next_check` finds the earliest moment a window of a
budget reaches its next action threshold (Warn, Reroute, Throttle or Block above the
current state) and asks the loop to look again then, and after that every few seconds
(``poll``) while the crossing is due: the sample that shows the crossing arrives within
one scrape interval, and the block follows it within a poll. Budgets far from a
threshold do not shorten the wait: a quiet cluster is evaluated at the interval, as
before.

Pure: decisions, budgets and the clock in, seconds out.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from decimal import Decimal

from token_budget.api import v1alpha1 as api
from token_budget.policy.decisions import Decision
from token_budget.policy.inputs import BudgetKey


def _thresholds_above(budget: api.Budget, used: Decimal) -> list[Decimal]:
    return sorted(Decimal(a.at_percent) for a in budget.spec.actions
                  if Decimal(a.at_percent) > used)


def crossing_in(decision: Decision, budget: api.Budget, now: dt.datetime) -> float | None:
    """Seconds until a window of the decision reaches its next threshold (None: not due).

    Linear in the burn rate: a window at ``used`` % running out (100 %) at ``run_out``
    reaches ``p`` % after ``(run_out - now) * (p - used) / (100 - used)``. Windows with a
    per-window threshold of 100 % and no forecast are not due.
    """
    best: float | None = None
    for w in decision.windows:
        if w.run_out is None or w.used_percent >= 100:
            continue
        above = _thresholds_above(budget, w.used_percent)
        if not above:
            continue
        to_run_out = max(0.0, (w.run_out - now).total_seconds())
        share = (above[0] - w.used_percent) / (Decimal(100) - w.used_percent)
        seconds = to_run_out * float(share)
        best = seconds if best is None else min(best, seconds)
    return best


def next_check(decisions: Iterable[Decision], budgets: Mapping[BudgetKey, api.Budget],
               now: dt.datetime, interval: float, poll: float) -> float:
    """Seconds to wait before the next evaluation, at most ``interval``.

    A budget due to cross a threshold within the interval brings the next evaluation to
    the forecast moment, but never closer than ``poll`` seconds: a budget whose crossing
    is due (or overdue: Prometheus has not shown it yet) is looked at every ``poll``
    seconds until its state changes or its burn rate says otherwise.
    """
    wait = interval
    floor = min(poll, interval)
    for d in decisions:
        budget = budgets.get(d.scope.budget)
        if budget is None or not d.spend_known:
            continue
        seconds = crossing_in(d, budget, now)
        if seconds is not None and seconds < wait:
            wait = max(floor, seconds)
    return wait
