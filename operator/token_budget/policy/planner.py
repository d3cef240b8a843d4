"""Which queries one evaluation needs: one per spend source and window, never one per budget.

The planner looks at every budget at once and returns a :class:`Plan`: the
distinct (source, window) pairs, the labels each source's query must group by
(namespace, workload and model, plus every label any budget's spend matchers
use), and the outcome counters. The Prometheus adapter turns the plan into
PromQL; the engine reads the answers back by the same keys.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field

from token_budget.api import v1alpha1 as api
from token_budget.policy import sources, windows
from token_budget.policy.sources import ResolvedSource
from token_budget.policy.windows import WindowKey


@dataclass(frozen=True, order=True)
class OutcomeQuery:
    metric: str
    namespace_label: str
    window: WindowKey
    group_labels: tuple[str, ...]

    @property
    def key(self) -> str:
        return self.key_of(self.metric, self.namespace_label, self.window)

    @staticmethod
    def key_of(metric: str, namespace_label: str, window: WindowKey) -> str:
        return f"{metric}|{namespace_label}|{window}"


@dataclass(frozen=True)
class Plan:
    windows: dict[tuple[ResolvedSource, WindowKey], int]  # -> range in seconds
    group_labels: dict[ResolvedSource, tuple[str, ...]]  # extra labels beyond ns/workload/model
    outcomes: tuple[OutcomeQuery, ...] = ()
    recent_seconds: int = 600
    sources: tuple[ResolvedSource, ...] = field(default=())

    @property
    def query_count(self) -> int:
        """How many PromQL queries the plan costs: windows, burn rates, outcomes."""
        return len(self.windows) + len(self.sources) + len(self.outcomes)


def budget_windows(spec: api.TokenBudgetSpec) -> list[WindowKey]:
    keys = [WindowKey.of(lim.window, lim.time_zone) for lim in spec.limits]
    if spec.outcome is not None:
        keys.append(WindowKey.of(spec.outcome.window, "UTC"))
    return keys


def plan(budgets: Iterable[api.Budget], now: dt.datetime, recent_seconds: int = 600) -> Plan:
    """The queries for one evaluation of ``budgets`` at ``now``."""
    ranges: dict[tuple[ResolvedSource, WindowKey], int] = {}
    extra: dict[ResolvedSource, set[str]] = {}
    outcome_groups: dict[tuple[str, str, WindowKey], set[str]] = {}
    for budget in budgets:
        spec = budget.spec
        rs = sources.resolve(spec.source)
        extra.setdefault(rs, set()).update(m.label for m in spec.spend_matchers)
        for key in budget_windows(spec):
            ranges[(rs, key)] = windows.range_seconds(key, now)
        if spec.outcome is not None:
            o = spec.outcome
            okey = (o.metric, o.namespace_label, WindowKey.of(o.window, "UTC"))
            outcome_groups.setdefault(okey, set()).update(m.label for m in o.matchers)
    base = {}
    for rs, labels in extra.items():
        base[rs] = tuple(sorted(labels - {rs.namespace_label, rs.workload_label, rs.model_label}))
    outcomes = tuple(
        sorted(
            OutcomeQuery(metric, ns_label, key, tuple(sorted(labels - {ns_label})))
            for (metric, ns_label, key), labels in outcome_groups.items()
        )
    )
    return Plan(
        windows=dict(sorted(ranges.items())),
        group_labels=base,
        outcomes=outcomes,
        recent_seconds=recent_seconds,
        sources=tuple(sorted(extra)),
    )
