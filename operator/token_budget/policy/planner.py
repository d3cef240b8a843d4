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
    # Per source, regex matchers that every budget reading it implies (see :func:`narrowing`):
    # they go into the PromQL selector, so a matcher on a high-cardinality label does not
    # pull every series of the source.
    narrow: dict[ResolvedSource, tuple[tuple[str, str], ...]] = field(default_factory=dict)

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
    matchers: dict[ResolvedSource, list[tuple[api.SpendMatcher, ...]]] = {}
    outcome_groups: dict[tuple[str, str, WindowKey], set[str]] = {}
    for budget in budgets:
        spec = budget.spec
        rs = sources.resolve(spec.source)
        extra.setdefault(rs, set()).update(m.label for m in spec.spend_matchers)
        if spec.partition is not None:  # every partition's series, grouped by the label
            extra[rs].add(spec.partition.label)
        matchers.setdefault(rs, []).append(tuple(spec.spend_matchers))
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
        narrow={rs: n for rs, per_budget in matchers.items() if (n := narrowing(per_budget))},
    )


#: Longest regex put into a selector: a query travels in the URL, and past a few KiB
#: proxies and Prometheus refuse it. Longer unions read the source unnarrowed.
MAX_NARROW_CHARS = 4096


def narrowing(per_budget: list[tuple[api.SpendMatcher, ...]]) -> tuple[tuple[str, str], ...]:
    """Regex matchers that keep every series any of the budgets could count.

    A label qualifies when every budget has an ``Equal`` or ``Regex`` matcher on it;
    the selector then keeps the union of their values. ``NotEqual``/``NotRegex``
    never narrow (their union is almost everything). The engine still applies each
    budget's own matchers; this only spares Prometheus the series nobody counts.
    """
    positive: list[dict[str, set[str]]] = []
    for ms in per_budget:
        found: dict[str, set[str]] = {}
        for m in ms:
            if m.operator is api.MatchOperator.EQUAL:
                found.setdefault(m.label, set()).add(re_literal(m.value))
            elif m.operator is api.MatchOperator.REGEX:
                found.setdefault(m.label, set()).add(f"(?:{m.value})")
        positive.append(found)
    if not positive:
        return ()
    common = set(positive[0]).intersection(*positive[1:])
    out = []
    for label in sorted(common):
        union = "|".join(sorted(set().union(*(p[label] for p in positive))))
        if len(union) <= MAX_NARROW_CHARS:
            out.append((label, union))
    return tuple(out)


def re_literal(value: str) -> str:
    """``value`` as an RE2 literal."""
    return "".join("\\" + c if c in ".^$*+?()[]{}|\\" else c for c in value)


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
        outcomes=outcomes, sources=(),
        narrow={})  # a report shows every namespace's spend, not only the budgets' matches
