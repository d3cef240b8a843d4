"""Which queries one evaluation needs: one per spend source and window, never one per budget.

The planner looks at every budget at once and returns a :class:`Plan`: the
distinct (source, window) pairs, the labels each source's query must group by
(namespace, workload and model, plus every label any budget's spend matchers
or partition use), and the outcome counters. The Prometheus adapter turns the
plan into PromQL; the engine reads the answers back by the same keys.

Long windows and the recording rules. A window longer than
:data:`RULES_MIN_SECONDS` is read from the hourly recording rules when they
keep every label its budgets group by (``kept``: the labels the installed
rules keep besides namespace, workload and model). A budget that needs another
label would push its whole (source, window) query to the raw series, and with
it every budget of the source; so its window is read apart, once per (source,
window, label set), under a :class:`WindowKey` whose ``labels`` name that set
(:func:`reading_key`), and only those budgets read raw there. Without ``kept``
(None) nothing is split: one query per (source, window), as before.
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
    # Per window read, the labels its query groups by when they differ from the source's
    # (a shared reading grouped only by the labels of its own budgets; see the module).
    window_labels: dict[tuple[ResolvedSource, WindowKey], tuple[str, ...]] = \
        field(default_factory=dict)

    def labels_of(self, rs: ResolvedSource, key: WindowKey) -> tuple[str, ...]:
        """The labels the query of one window groups by, beyond the source's own."""
        if key.labels:
            return key.labels
        return self.window_labels.get((rs, key), self.group_labels.get(rs, ()))

    @property
    def query_count(self) -> int:
        """How many PromQL queries the plan costs: windows, burn rates, outcomes."""
        return len(self.windows) + len(self.sources) + len(self.outcomes)


def budget_windows(spec: api.TokenBudgetSpec) -> list[WindowKey]:
    keys = [WindowKey.of(lim.window, lim.time_zone) for lim in spec.limits]
    if spec.outcome is not None:
        keys.append(WindowKey.of(spec.outcome.window, "UTC"))
    return keys


#: Windows longer than this are read from the hourly recording rules when they are installed
#: (two rule steps: shorter ones gain nothing from hourly buckets).
RULES_MIN_SECONDS = 2 * 3600


def needed_labels(spec: api.TokenBudgetSpec) -> tuple[str, ...]:
    """The labels a budget's spend must be grouped by: its matchers' and its partition's."""
    labels = {m.label for m in spec.spend_matchers}
    if spec.partition is not None:
        labels.add(spec.partition.label)
    return tuple(sorted(labels))


def reading_key(rs: ResolvedSource, spec: api.TokenBudgetSpec, key: WindowKey,
                seconds: int, kept: tuple[str, ...] | None) -> WindowKey:
    """Under which key a budget's window is read: apart (``key.labels`` set) when the
    window is long enough for the rules and the budget needs a label they do not keep."""
    if kept is None or seconds <= RULES_MIN_SECONDS:
        return key
    need = needed_labels(spec)
    base = {rs.namespace_label, rs.workload_label, rs.model_label}
    if set(need) - base <= set(kept):
        return key
    return dataclasses.replace(key, labels=need)


def plan(budgets: Iterable[api.Budget], now: dt.datetime, recent_seconds: int = 600,
         kept: tuple[str, ...] | None = None) -> Plan:
    """The queries for one evaluation of ``budgets`` at ``now``.

    ``kept``: the labels the installed recording rules keep (``--rules-keep-label``);
    None reads every window of a source in one query grouped by every label.
    """
    ranges: dict[tuple[ResolvedSource, WindowKey], int] = {}
    per_window: dict[tuple[ResolvedSource, WindowKey], set[str]] = {}
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
            seconds = windows.range_seconds(key, now)
            key = reading_key(rs, spec, key, seconds, kept)
            ranges[(rs, key)] = seconds
            per_window.setdefault((rs, key), set()).update(needed_labels(spec))
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
        # Only when some window is read apart do the shared ones group by fewer labels.
        window_labels={k: tuple(sorted(v)) for k, v in per_window.items()}
        if any(k.labels for _, k in ranges) else {},
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
        window_labels={},
        outcomes=outcomes, sources=(),
        narrow={})  # a report shows every namespace's spend, not only the budgets' matches
