"""Which queries one evaluation needs: one per spend source and window, never one per budget.

The planner looks at every budget at once and returns a :class:`Plan`: the
distinct (source, window) pairs, the labels each source's query must group by
(namespace, workload and model, plus every label any budget's spend matchers
use), and the outcome counters. The Prometheus adapter turns the plan into
PromQL; the engine reads the answers back by the same keys.
"""

from __future__ import annotations

import dataclasses
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
    # Every label a matcher names is read into SpendSeries.labels, the source's own
    # namespace, workload and model labels too: `pod=~"search-.*"` must see the pod.
    base = {rs: tuple(sorted(labels)) for rs, labels in extra.items()}
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


def rolling_key(seconds: int) -> WindowKey:
    """The rolling window of ``seconds`` in its largest whole unit (``7d``, ``90m``).

    Raises:
        ValueError: ``seconds`` is not a whole number of minutes.
    """
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds > 0 and seconds % size == 0:
            return WindowKey.of(f"{seconds // size}{unit}", "UTC")
    raise ValueError(f"a window of {seconds} s is not a whole number of minutes")


def report_plan(budgets: Iterable[api.Budget], extra_sources: Iterable[ResolvedSource],
                key: WindowKey, now: dt.datetime) -> Plan:
    """The queries of a report over one window, read as an evaluation reads them.

    Every source of the budgets (and ``extra_sources``; the Counters preset
    when there is none) over ``key``, grouped by the labels the budgets'
    spend matchers name, and every budget's outcome counter over the same
    window. No burn-rate queries: a report has no forecast.
    """
    base = plan(budgets, now)
    resolved = {rs for rs, _ in base.windows} | set(extra_sources)
    if not resolved:
        resolved = {sources.resolve(api.SpendSource())}
    seconds = windows.range_seconds(key, now)
    groups: dict[tuple[str, str], set[str]] = {}
    for o in base.outcomes:
        groups.setdefault((o.metric, o.namespace_label), set()).update(o.group_labels)
    outcomes = tuple(sorted(OutcomeQuery(metric, label, key, tuple(sorted(labels)))
                            for (metric, label), labels in groups.items()))
    return dataclasses.replace(
        base, windows={(rs, key): seconds for rs in sorted(resolved)},
        group_labels={rs: base.group_labels.get(rs, ()) for rs in sorted(resolved)},
        outcomes=outcomes, sources=())
