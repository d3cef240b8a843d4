"""``tokenbudget backtest``: replay a budget against Prometheus history before applying it.

At every step from ``now - since`` to ``now`` the backtest asks Prometheus what
the operator would have asked at that moment (instant queries evaluated at the
step's time, so calendar windows start where they would have started), runs
the same pure engine the operator runs, carrying its memory (hysteresis, Hold)
from step to step, and records:

* when each action would have fired (state transitions),
* for how long each scope, and each workload that spent in it, would have
  been throttled or blocked,
* the spend that would have been avoided: all of it while Blocked, the part
  above the rate while Throttled, the price difference while Rerouted.

What it does not model: the feedback of enforcement on later spend (a blocked
agent spends nothing, so its window would have filled more slowly). The
avoided spend is therefore an upper bound, and later transitions may come
earlier than they would have.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from token_budget.api import v1alpha1 as api
from token_budget.api.types import display_money, plain_money
from token_budget.metrics import costs as cost_reading
from token_budget.metrics.prometheus import PrometheusSource
from token_budget.policy import costs, engine, planner
from token_budget.policy.catalog import Catalog
from token_budget.policy.decisions import Decision
from token_budget.policy.inputs import Memory, ScopeKey, SpendSeries


@dataclass(frozen=True)
class Transition:
    at: dt.datetime
    scope: str
    before: api.State
    after: api.State
    used_percent: Decimal
    reason: str


@dataclass
class Backtest:
    start: dt.datetime
    end: dt.datetime
    step_seconds: int
    currency: str
    transitions: list[Transition] = field(default_factory=list)
    seconds_in: dict[str, dict[api.State, int]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    workload_seconds: dict[str, dict[api.State, int]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    avoided: dict[str, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    queries: int = 0
    unknown_steps: int = 0

    @property
    def avoided_total(self) -> Decimal:
        return sum(self.avoided.values(), Decimal(0))

    def to_json(self) -> dict[str, Any]:
        return {
            "start": self.start.isoformat(), "end": self.end.isoformat(),
            "stepSeconds": self.step_seconds, "currency": self.currency,
            "transitions": [{"at": t.at.isoformat(), "scope": t.scope, "from": t.before.value,
                             "to": t.after.value, "usedPercent": float(round(t.used_percent, 1)),
                             "reason": t.reason} for t in self.transitions],
            "secondsIn": {s: {k.value: v for k, v in d.items()}
                          for s, d in sorted(self.seconds_in.items())},
            "workloadSeconds": {w: {k.value: v for k, v in d.items()}
                                for w, d in sorted(self.workload_seconds.items())},
            "avoided": {k: plain_money(v) for k, v in sorted(self.avoided.items())},
            "avoidedTotal": plain_money(self.avoided_total),
            "queries": self.queries, "unknownSteps": self.unknown_steps,
        }


def _scope_series(d: Decision, budget: api.Budget, series: tuple[SpendSeries, ...]
                  ) -> list[SpendSeries]:
    return [s for s in series if s.namespace in d.namespaces
            and engine.series_matches(s, budget.spec.spend_matchers)]


def run(source: PrometheusSource, budget: api.Budget, catalog: Catalog,
        namespaces: dict[str, dict[str, str]], since_seconds: int, step_seconds: int,
        end: dt.datetime) -> Backtest:
    start = end - dt.timedelta(seconds=since_seconds)
    bt = Backtest(start=start, end=end, step_seconds=step_seconds, currency=catalog.currency)
    memory: dict[ScopeKey, Memory] = {}
    before = source.stats.queries
    t = start + dt.timedelta(seconds=step_seconds)
    while t <= end:
        plan = planner.plan([budget], t, recent_seconds=step_seconds)
        snap = source.collect(plan, t)
        snap = cost_reading.with_costs(source, snap, costs.plan([budget], catalog, t,
                                                                 step_seconds), t)
        world = engine.World(budgets=[budget], catalog=catalog, namespaces=namespaces,
                             memory=memory)
        result = engine.evaluate(world, snap, t)
        recent = next(iter(snap.recent.values()), ())
        for d in result.decisions:
            name = str(d.scope)
            prev = memory.get(d.scope)
            was = prev.state if prev is not None else api.State.OK
            used = d.worst_window.used_percent if d.worst_window else Decimal(0)
            if d.state is not was:
                bt.transitions.append(Transition(t, name, was, d.state, used, d.reason))
            if not d.spend_known:
                bt.unknown_steps += 1
            bt.seconds_in[name][d.state] += step_seconds
            spent = _scope_series(d, budget, recent)
            for w in sorted({s.workload for s in spent if s.tokens > 0}):
                bt.workload_seconds[f"{','.join(d.namespaces)}/{w}"][d.state] += step_seconds
            bt.avoided[name] += _avoided(d, budget, spent, catalog, step_seconds)
            last = t if d.series_seen else (prev.last_spend_time if prev else None)
            memory[d.scope] = Memory(d.state, last)
        t += dt.timedelta(seconds=step_seconds)
    bt.queries = source.stats.queries - before
    return bt


def _avoided(d: Decision, budget: api.Budget, spent: list[SpendSeries], catalog: Catalog,
             step_seconds: int) -> Decimal:
    """What the step's spend would have been cut by, under the decision in force."""
    def cost(s: SpendSeries, model: str | None = None) -> Decimal:
        if model is None and s.cost is not None:
            return s.cost
        return catalog.cost(model or s.model, s.input_tokens, s.output_tokens,
                            s.cached_input_tokens) or Decimal(0)

    if d.state is api.State.BLOCKED:
        return sum((cost(s) for s in spent), Decimal(0))
    if d.state is api.State.THROTTLED and d.action is not None:
        rate = d.action.tokens_per_minute
        if rate:
            per_workload: dict[str, list[SpendSeries]] = defaultdict(list)
            for s in spent:
                per_workload[s.workload].append(s)
            out = Decimal(0)
            for items in per_workload.values():
                tokens = sum(s.tokens for s in items)
                allowed = rate * step_seconds / 60
                if tokens > allowed > 0:
                    share = Decimal(str((tokens - allowed) / tokens))
                    out += sum((cost(s) for s in items), Decimal(0)) * share
            return out
    if d.state in (api.State.REROUTED, api.State.THROTTLED):
        reroute = next((a for a in sorted(budget.spec.actions, key=lambda a: a.at_percent,
                                          reverse=True)
                        if a.type is api.ActionType.REROUTE), None)
        if reroute is None:
            return Decimal(0)
        permitted = engine.allowed_models(budget.spec, catalog)
        out = Decimal(0)
        for s in spent:
            target = reroute.model or engine.cheapest_equivalent(s.model, permitted, catalog)
            if target:
                out += max(Decimal(0), cost(s) - cost(s, target))
        return out
    return Decimal(0)


def table(bt: Backtest) -> str:
    lines = [f"Backtest {bt.start:%Y-%m-%d %H:%M} -> {bt.end:%Y-%m-%d %H:%M} UTC, step "
             f"{bt.step_seconds}s, {bt.queries} PromQL queries"]
    if not bt.transitions:
        lines.append("no action would have fired")
    for t in bt.transitions:
        lines.append(f"  {t.at:%Y-%m-%d %H:%M}  {t.scope}: {t.before.value} -> {t.after.value} "
                     f"at {t.used_percent:.1f}% ({t.reason})")
    lines.append("")
    lines.append("time per state:")
    for scope, states in sorted(bt.seconds_in.items()):
        parts = [f"{s.value} {v / 3600:g}h" for s, v in states.items() if v]
        lines.append(f"  {scope}: {', '.join(parts)}")
    restricted = {w: d for w, d in bt.workload_seconds.items()
                  if d.get(api.State.THROTTLED) or d.get(api.State.BLOCKED)}
    if restricted:
        lines.append("workloads throttled or blocked:")
        for w, d in sorted(restricted.items()):
            lines.append(f"  {w}: throttled {d.get(api.State.THROTTLED, 0) / 3600:g}h, "
                         f"blocked {d.get(api.State.BLOCKED, 0) / 3600:g}h")
    lines.append(f"spend avoided (upper bound): {display_money(bt.avoided_total, bt.currency)}")
    if bt.unknown_steps:
        lines.append(f"steps with spend unknown: {bt.unknown_steps}")
    return "\n".join(lines) + "\n"
