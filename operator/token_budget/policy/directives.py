"""Directives: what each governed workload of a scope is told, from the actions in effect."""

from __future__ import annotations

from decimal import ROUND_FLOOR, Decimal

from token_budget.api import v1alpha1 as api
from token_budget.policy import usage
from token_budget.policy.decisions import Directive, WindowUsage
from token_budget.policy.inputs import WorkloadKey
from token_budget.policy.scope import ScopeInput


def directives(s: ScopeInput, state: api.State, reason: str, message: str,
               effective: list[api.Action], usages: list[WindowUsage]
               ) -> dict[WorkloadKey, Directive]:
    """One directive per governed workload: the state, a reroute target, the rate."""
    allowed = s.context.allowed_models(s.spec)
    reroute = next((a for a in reversed(effective) if a.type is api.ActionType.REROUTE), None)
    throttle = next((a for a in reversed(effective) if a.type is api.ActionType.THROTTLE), None)
    rate = None
    if throttle is not None:
        rate = throttle.tokens_per_minute or pace(s, usages)
    out = {}
    budget = f"{s.scope.budget.kind}/{s.scope.budget}"
    top_model: dict[str, str] | None = None
    for w in s.governed:
        model = None
        if reroute is not None:
            if reroute.model:
                model = reroute.model
            else:
                current = next(iter(w.declared_models), None)
                if not current:
                    if top_model is None:
                        top_model = usage.top_model(s)
                    current = top_model.get(w.key.name)
                    if current is None:
                        # Spend reported per pod: the workload's pods carry its name
                        # as prefix.
                        current = next((m for wl, m in sorted(top_model.items())
                                        if wl.startswith(w.key.name + "-")), None)
                model = (s.context.cheapest_equivalent(current, allowed) if current
                         else None)
        out[w.key] = Directive(
            state=state, budget=budget, reason=reason,
            message=message, model=model, allowed_models=allowed, tokens_per_minute=rate,
        )
    return out


def pace(s: ScopeInput, usages: list[WindowUsage]) -> int:
    """Tokens per minute per workload that spread what is left evenly over the window."""
    s.timed = True
    worst = max(usages, key=lambda w: w.used_percent)
    # A limit may cap tokens and money at once: what is left is the tighter of the two.
    lefts = []
    if worst.limit_tokens:
        lefts.append(Decimal(max(0, worst.limit_tokens - worst.tokens)))
    if worst.limit_cost and worst.cost > 0 and worst.tokens > 0:
        lefts.append(max(Decimal(0), worst.limit_cost - worst.cost) * worst.tokens / worst.cost)
    left = min(lefts, default=Decimal(0))
    if worst.resets_at is not None:
        minutes = Decimal((worst.resets_at - s.context.now_utc).total_seconds()) / 60
    else:
        minutes = Decimal((s.context.now_utc - worst.start).total_seconds()) / 60
    per = left / max(Decimal(1), minutes) / max(1, len(s.governed))
    return max(1, int(per.to_integral_value(rounding=ROUND_FLOOR)))
