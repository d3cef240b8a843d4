"""Outcomes: the counter a budget divides its cost by, and the cost per outcome."""

from __future__ import annotations

from decimal import Decimal

from token_budget.api import v1alpha1 as api
from token_budget.policy.context import Context
from token_budget.policy.matchers import matcher_ok
from token_budget.policy.planner import OutcomeQuery
from token_budget.policy.windows import WindowKey


def outcome_key(o: api.Outcome) -> str:
    """The key under which the snapshot holds an outcome counter's answer."""
    return OutcomeQuery.key_of(o.metric, o.namespace_label, WindowKey.of(o.window, "UTC"))


def outcome_count(context: Context, o: api.Outcome, key: str,
                  namespaces: tuple[str, ...]) -> float | None:
    """Outcomes of the namespaces under the outcome's matchers; None when not read."""
    rows = context.outcome_rows(key, namespaces)
    if rows is None:
        return None
    count = 0.0
    for _, labels, value in rows:
        lab = dict(labels)
        if all(matcher_ok(m, lab.get(m.label, "")) for m in o.matchers):
            count += value
    return count


def per_outcome(cost: Decimal, count: float | None) -> Decimal | None:
    """Cost per outcome; None when nothing was counted."""
    if count is None or count <= 0:
        return None
    return cost / Decimal(round(count, 6))
