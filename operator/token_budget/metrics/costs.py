"""Reading cost sources (:mod:`token_budget.policy.costs`) from Prometheus.

One query per window of the cost plan, whatever the number of budgets: each
distinct :class:`~token_budget.policy.inputs.CostQuery` is summed by its
namespace and workload labels and tagged by its position (``tb_cost``), and the
parts are joined with ``or`` (the tag keeps them apart)::

    label_replace(sum by (namespace, pod) (<exact increase of
                  container_cpu_usage_seconds_total{container!=""} over 3600s>),
                  "tb_cost", "0", "", "")
    or label_replace(sum by (namespace, pod) (avg_over_time(mem{...}[3600s])
                     * clamp_max(count_over_time(mem{...}[3600s]) * 15, 3600)), ...)

A counter is read with :func:`token_budget.metrics.promql.increase`, the exact
reading of token counters: last minus start value, ``increase()`` only across a
counter reset (a restarted container), a series born in the window as its last
value, deleted pods kept through ``last_over_time``.

A gauge (memory bytes, sandbox VMs) is integrated per series over its own
observed span, each sample standing for one scrape interval ``i``
(``--prometheus-scrape-interval-seconds``)::

    avg_over_time(g[w]) * clamp_max(count_over_time(g[w]) * i, w)

that is ``sum_over_time(g[w]) * i``, never more than the series' average held
for the whole window. A pod present for part of the window is charged for that
part only: cAdvisor starts a new series for every replaced pod or restarted
container, and two successive 12-hour pods at 1 GiB cost 24 GiB-hours over a
day, not 48 (``avg_over_time(g[w]) * w`` charged each for the whole window: a
daily rollout read over a Month about 30 times the real cost). The error bound,
with samples at the configured interval: the gauge's change between two scrapes
times the span, plus at most one interval of its value a series (it is charged
``(last sample - first sample) + i``, it lived up to one interval more or less
than that). A series present for
the whole window is charged exactly the window (the clamp) whenever Prometheus
scrapes it at least as often as ``i`` says. ``i`` larger than the true interval
over-reads a partial series by their ratio (never past the whole window);
smaller, it under-reads every series by their ratio, as a missed scrape leaves
its interval uncharged: set the flag to the gauge's scrape interval (the largest
one where jobs differ).

A query that fails (Prometheus down, refused, a malformed answer) is recorded
in ``SpendSnapshot.cost_errors`` for its window: the budgets reading it then
have unknown spend (``whenSpendUnknown``), never zero cost. A row whose value is
not finite (a NaN gauge) is recorded in ``SpendSnapshot.cost_namespace_errors``
for its (window, namespace) and left out: only the scopes over that namespace
have unknown spend, every other namespace's rows of the window are kept.

Cost sources have no recording rules: every window reads raw samples. A window
longer than a day is first counted (one ``count()`` per cost query) and, like a
raw spend window, refused with an error naming the figures when it would hold
more than ``--prometheus-max-samples`` (Prometheus would refuse it too, after
loading up to that many samples): a Month over cAdvisor's container counters
holds 172,800 samples a series at a 15 s scrape, so about 290 series fit the
default 50 million.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

from token_budget.errors import InvalidValue, MetricsError
from token_budget.metrics import promql
from token_budget.metrics.prometheus import PrometheusSource, _labels, _value
from token_budget.policy.costs import CostPlan
from token_budget.policy.inputs import CostQuery, CostSeries, SpendSnapshot
from token_budget.policy.windows import WindowKey

#: The label that tags each cost query's rows with its position in the window's query.
TAG_LABEL = "tb_cost"


def selector(q: CostQuery, namespaces: str | None = None) -> str:
    """``metric{label<op>"value",...}`` with every PromQL matcher operator; ``namespaces``:
    a regex the namespace label must match (the plan's narrowing)."""
    matchers = list(q.matchers)
    if namespaces is not None:
        matchers.append((q.namespace_label, "=~", namespaces))
    if not matchers:
        return q.metric
    inner = ",".join(f"{label}{op}{promql.quote(value)}" for label, op, value in matchers)
    return f"{q.metric}{{{inner}}}"


def units(q: CostQuery, range_seconds: int, namespaces: str | None = None, *,
          interval: float) -> str:
    """Units of one cost query per (namespace, workload) over the last range; ``interval``:
    the scrape interval in seconds, each sample of a gauge stands for that long."""
    by = f"{q.namespace_label}, {q.workload_label}"
    sel = selector(q, namespaces)
    if q.gauge:
        r = f"[{range_seconds}s]"
        return (f"sum by ({by}) (avg_over_time({sel}{r}) * "
                f"clamp_max(count_over_time({sel}{r}) * {_number(interval)}, {range_seconds}))")
    return f"sum by ({by}) ({promql.increase(sel, range_seconds)})"


def window_query(queries: tuple[CostQuery, ...], range_seconds: int,
                 namespaces: str | None = None, *, interval: float) -> str:
    """Every cost query of a window in one, each tagged by its position."""
    return " or ".join(
        f'label_replace({units(q, range_seconds, namespaces, interval=interval)}, '
        f'"{TAG_LABEL}", "{i}", "", "")'
        for i, q in enumerate(queries))


def _number(x: float) -> str:
    """A PromQL number literal: 15 for 15.0, 0.5, 1e-05."""
    return str(int(x)) if x == int(x) else repr(float(x))


def read(source: PrometheusSource, plan: CostPlan, now: dt.datetime
         ) -> tuple[dict[tuple[CostQuery, WindowKey], tuple[CostSeries, ...]],
                    dict[WindowKey, str], dict[tuple[WindowKey, str], str]]:
    """Run the cost plan at ``now``: units per (query, window), errors per window, and
    errors per (window, namespace) (rows that are not finite, left out)."""
    found: dict[tuple[CostQuery, WindowKey], tuple[CostSeries, ...]] = {}
    errors: dict[WindowKey, str] = {}
    unknown: dict[tuple[WindowKey, str], str] = {}
    for key, (seconds, queries) in plan.windows.items():
        try:
            too_many = _too_many(source, queries, seconds, plan.narrow.get(key), now)
            if too_many is not None:
                errors[key] = f"the {key} cost query {too_many}"
                continue
            items = source.query(window_query(queries, seconds, plan.narrow.get(key),
                                              interval=source.scrape_interval_seconds),
                                 now, "cost")
            rows: list[list[CostSeries]] = [[] for _ in queries]
            for it in items:
                labels = _labels(it)
                try:
                    i = int(labels.get(TAG_LABEL, ""))
                    q = queries[i]
                except (ValueError, IndexError):
                    continue  # not one of ours
                namespace = labels.get(q.namespace_label, "")
                try:
                    value = _value(it)
                except InvalidValue as exc:
                    # One namespace's cost is unknown, not every namespace's.
                    unknown.setdefault((key, namespace), f"the {key} cost query: {exc}")
                    continue
                rows[i].append(CostSeries(namespace, labels.get(q.workload_label, ""),
                                          value))
        except MetricsError as exc:
            errors[key] = str(exc)
            continue
        for q, r in zip(queries, rows, strict=True):
            found[(q, key)] = tuple(sorted(r, key=lambda c: (c.namespace, c.workload)))
    return found, errors, {k: v for k, v in unknown.items() if k[0] not in errors}


def with_costs(source: PrometheusSource, snapshot: SpendSnapshot, plan: CostPlan,
               now: dt.datetime) -> SpendSnapshot:
    """The snapshot with the cost plan read into it (itself when the plan is empty)."""
    if not plan.windows:
        return snapshot
    found, errors, unknown = read(source, plan, now)
    return dataclasses.replace(snapshot, costs=found, cost_errors=errors,
                               cost_namespace_errors=unknown)


def _too_many(source: PrometheusSource, queries: tuple[CostQuery, ...], seconds: int,
              namespaces: str | None, now: dt.datetime) -> str | None:
    """Why a window longer than a day would hold more samples than a query may load."""
    if not source.max_samples or seconds <= 86400:
        return None
    series = 0
    for q in queries:
        items = source.query(f"count({selector(q, namespaces)})", now, "estimate")
        series += int(_value(items[0])) if items else 0
    samples = series * seconds / max(source.scrape_interval_seconds, 1.0)
    if samples <= source.max_samples:
        return None
    return (f"would hold about {samples:,.0f} samples from {series:,} series, more than the "
            f"{source.max_samples:,} a query may load (cost sources read raw series): narrow "
            "the cost source's matchers, use a shorter window, or raise "
            "--prometheus-max-samples and Prometheus's --query.max-samples")
