"""The ladder of actions: thresholds sorted, the rung spend reaches, how usage reads."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from token_budget.api import v1alpha1 as api
from token_budget.api.types import display_money
from token_budget.policy.decisions import SEVERITY, STATE_OF_ACTION, WindowUsage

HUNDRED = Decimal(100)


@dataclass(frozen=True)
class Rung:
    index: int  # in the sorted ladder; -1 below the first rung
    action: api.Action | None

    @property
    def state(self) -> api.State:
        return api.State.OK if self.action is None else STATE_OF_ACTION[self.action.type]


def ladder(spec: api.TokenBudgetSpec) -> list[api.Action]:
    return sorted(spec.actions, key=lambda a: a.at_percent)


def rung_for(ladder: list[api.Action], used: Decimal) -> Rung:
    reached = [i for i, a in enumerate(ladder) if used >= a.at_percent]
    if not reached:
        return Rung(-1, None)
    # The most restrictive rung reached, not merely the highest threshold: a Warn
    # listed at 120 % must not lift a Block at 100 %.
    i = max(reached, key=lambda j: (SEVERITY[STATE_OF_ACTION[ladder[j].type]], j))
    return Rung(i, ladder[i])


def percent(value: Decimal, limit: Decimal) -> Decimal:
    return value * HUNDRED / limit


money = display_money  # the one formatter of money for people


def describe(w: WindowUsage, currency: str) -> tuple[str, str]:
    """(spend, limit) as people read them, for the tighter of the two limits."""
    tok_pct = (Decimal(w.tokens) * HUNDRED / w.limit_tokens) if w.limit_tokens else Decimal(-1)
    cost_pct = (w.cost * HUNDRED / w.limit_cost) if w.limit_cost else Decimal(-1)
    if w.limit_cost is not None and cost_pct >= tok_pct:
        return money(w.cost, currency), money(w.limit_cost, currency)
    return f"{w.tokens:,} tokens", f"{w.limit_tokens:,} tokens"

