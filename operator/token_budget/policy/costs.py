"""Cost sources: spend that is not tokens (compute, memory, retrieval, tool calls).

A budget's ``costSources`` and the catalog's are merged by name, the budget's
winning (:func:`merged`); each is a Prometheus metric with a price per
``unitsPerPrice`` units. How they combine with token spend:

* money limits without ``model:`` count token cost plus every cost source; a
  limit with ``model:`` counts only that model's token spend (a CPU-second is
  no model's), and token limits never count cost sources (a window without
  ``model:`` shows the money of both in status, whatever it caps);
* cost per outcome and the projected run-out (the cost burn rate over the
  last ``recent_seconds``) count them as well;
* a source's ``metrics.cost`` counter (LiteLLM's ``litellm_spend_metric``)
  measures token cost, so it replaces the catalog's token pricing for that
  source (:mod:`token_budget.policy.pricing`), never adds to it; cost sources
  are added on top of either;
* a budget's ``spendMatchers`` narrow token series only; a cost source has
  its own ``matchers``.

What is read: one query per window for every distinct :class:`CostQuery` of
the plan (:func:`plan`), read as exactly as token counters (see
:mod:`token_budget.metrics.promql`); a query that failed makes the spend of the
budgets that need it unknown (``whenSpendUnknown``), never zero; a row that is
not a finite number makes unknown only its namespace's cost over that window
(``SpendSnapshot.cost_namespace_errors``): the scopes over that namespace.

Pure: prices and sums only; the reading lives in ``token_budget.metrics.costs``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal

from token_budget.api import v1alpha1 as api
from token_budget.policy import planner, windows
from token_budget.policy.catalog import Catalog
from token_budget.policy.inputs import CostQuery, CostSeries, SpendSnapshot
from token_budget.policy.matchers import OPERATORS
from token_budget.policy.windows import WindowKey

#: The kind and name of token spend in a breakdown by kind.
TOKENS = ("Tokens", "tokens")

_ZERO = Decimal(0)


def merged(spec: api.TokenBudgetSpec, catalog: Catalog) -> tuple[api.CostSource, ...]:
    """A budget's cost sources: the catalog's, each replaced by the budget's of its name,
    then the budget's other ones, in their order."""
    own = spec.cost_sources
    shared = catalog.cost_sources
    if not shared:
        return own
    if not own:
        return shared
    mine = {c.name: c for c in own}
    out = [mine.pop(c.name, c) for c in shared]
    return (*out, *(c for c in own if c.name in mine))


def query_of(c: api.CostSource) -> CostQuery:
    return CostQuery(
        metric=c.metric, gauge=c.type is api.CostMetricType.GAUGE,
        matchers=tuple((m.label, OPERATORS[m.operator], m.value) for m in c.matchers),
        namespace_label=c.labels.namespace, workload_label=c.labels.workload)


def price(units: float, c: api.CostSource) -> Decimal:
    """What ``units`` of the source's metric cost: units x pricePerUnit / unitsPerPrice.

    The float is taken at its shortest decimal form (``0.1`` is 0.1, not
    0.1000000000000000055...), so a count read as 3600.0 prices to the digit.
    """
    if units != units or units in (float("inf"), float("-inf")):
        raise ValueError(f"cost source {c.name}: {units} units cannot be priced")
    return Decimal(repr(units)) * c.price_per_unit / c.units_per_price


@dataclass(frozen=True)
class CostPlan:
    """Per window: its range in seconds and the distinct queries read over it.

    ``narrow`` holds, per window, a regex of the namespaces its budgets can count
    (TokenBudgets name theirs; a ClusterTokenBudget's namespaces are not known to the
    plan, so a window one of them reads is not narrowed): cAdvisor's series of every
    other namespace (kube-system, ...) are then not read at all.
    """

    windows: dict[WindowKey, tuple[int, tuple[CostQuery, ...]]] = field(default_factory=dict)
    narrow: dict[WindowKey, str] = field(default_factory=dict)

    @property
    def query_count(self) -> int:
        return len(self.windows)


def plan(budgets: Iterable[api.Budget], catalog: Catalog, now: dt.datetime,
         recent_seconds: int, extra: Iterable[WindowKey] = ()) -> CostPlan:
    """The cost queries of one evaluation: every window of a budget with cost sources,
    and the burn-rate window (``recent_seconds``) for run-outs. ``extra``: more windows
    (a report's)."""
    wanted: dict[WindowKey, set[CostQuery]] = {}
    namespaces: dict[WindowKey, set[str] | None] = {}
    recent, _ = recent_window(recent_seconds)
    keys_extra = tuple(extra)
    for budget in budgets:
        found = merged(budget.spec, catalog)
        if not found:
            continue
        queries = {query_of(c) for c in found}
        own = budget.metadata.namespace if isinstance(budget, api.TokenBudget) else None
        for key in (*planner.budget_windows(budget.spec), recent, *keys_extra):
            wanted.setdefault(key, set()).update(queries)
            known = namespaces.setdefault(key, set())
            if known is not None:
                if own is None:
                    namespaces[key] = None
                else:
                    known.add(own)
    narrow = {}
    for key, names in namespaces.items():
        if names:
            union = "|".join(sorted(planner.re_literal(n) for n in names))
            if len(union) <= planner.MAX_NARROW_CHARS:
                narrow[key] = union
    return CostPlan({key: (windows.range_seconds(key, now), tuple(sorted(qs)))
                     for key, qs in sorted(wanted.items())}, narrow)


def recent_window(seconds: int) -> tuple[WindowKey, int]:
    """The burn-rate window of the cost sources: ``seconds`` rounded up to whole minutes
    (a window is named in minutes), and its length."""
    minutes = max(1, -(-seconds // 60))
    return planner.rolling_key(minutes * 60), minutes * 60


class Unread(Exception):
    """A cost source's window was not read (its query failed or was not planned)."""


class Index:
    """A snapshot's cost series by (query, window) and namespace, built as asked."""

    def __init__(self, snapshot: SpendSnapshot) -> None:
        self.snapshot = snapshot
        self._by_ns: dict[tuple[CostQuery, WindowKey], dict[str, list[CostSeries]]] = {}

    def units(self, query: CostQuery, key: WindowKey, namespaces: Iterable[str],
              keep: Callable[[str, str], bool] | None = None) -> float:
        """Units of ``query`` over ``key`` in the namespaces (the series ``keep`` keeps,
        by namespace and workload label, when given).

        Raises:
            Unread: the window's cost query failed or was not read, or a row of one of
                the namespaces was not a finite number.
        """
        by_ns = self._by_ns.get((query, key))
        if by_ns is None:
            error = self.snapshot.cost_errors.get(key)
            if error is not None:
                raise Unread(f"cost sources over {key} could not be read: {error}")
            rows = self.snapshot.costs.get((query, key))
            if rows is None:
                raise Unread(f"cost source {query.metric} over {key} was not read")
            by_ns = self._by_ns[(query, key)] = {}
            for r in rows:
                by_ns.setdefault(r.namespace, []).append(r)
        total = 0.0
        unknown = self.snapshot.cost_namespace_errors
        for ns in namespaces:
            if unknown:
                error = unknown.get((key, ns))
                if error is not None:
                    raise Unread(f"cost sources over {key} in {ns} could not be read: {error}")
            for r in by_ns.get(ns, ()):
                if keep is None or keep(r.namespace, r.workload):
                    total += r.units
        return total

    def costs(self, found: tuple[api.CostSource, ...], key: WindowKey,
              namespaces: tuple[str, ...], keep: Callable[[str, str], bool] | None = None
              ) -> list[tuple[api.CostSource, Decimal]]:
        """Each cost source's cost in the namespaces over ``key``.

        Raises:
            Unread: a cost source's window was not read.
        """
        return [(c, price(self.units(query_of(c), key, namespaces, keep), c)) for c in found]


def added_cost(spec: api.TokenBudgetSpec, catalog: Catalog, index: Index, key: WindowKey,
               namespaces: tuple[str, ...], keep: Callable[[str, str], bool] | None = None
               ) -> Decimal | None:
    """What the budget's cost sources add over ``key``; None when one was not read."""
    found = merged(spec, catalog)
    if not found:
        return _ZERO
    try:
        return total(index.costs(found, key, namespaces, keep))
    except Unread:
        return None


def scope_breakdown(spec: api.TokenBudgetSpec, catalog: Catalog, index: Index, key: WindowKey,
                    namespaces: tuple[str, ...], token_cost: Decimal
                    ) -> tuple[tuple[str, str, Decimal], ...]:
    """:func:`breakdown` of a scope over ``key``; () without cost sources.

    Raises:
        Unread: a cost source's window was not read.
    """
    found = merged(spec, catalog)
    if not found:
        return ()
    return breakdown(token_cost, index.costs(found, key, namespaces))


def breakdown(token_cost: Decimal, costs: list[tuple[api.CostSource, Decimal]]
              ) -> tuple[tuple[str, str, Decimal], ...]:
    """(kind, name, cost): token spend first, then each cost source in order."""
    return (( *TOKENS, token_cost), *((c.kind.value, c.name, v) for c, v in costs))


def total(costs: list[tuple[api.CostSource, Decimal]]) -> Decimal:
    return sum((v for _, v in costs), _ZERO)
