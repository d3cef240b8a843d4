"""The policy engine: budgets + catalog + spend snapshot + workloads + now -> decisions.

Pure. No clock is read (``now`` is an argument), nothing is fetched, nothing
is written, so every law is tested without a cluster (tests/unit).

One evaluation, per budget scope (a TokenBudget; a Shared ClusterTokenBudget;
each namespace of a PerNamespace ClusterTokenBudget)::

    spend per window ──► used % ──► rung of the ladder ──► hysteresis
          │                                   │                  │
    burn rate ─► run-out forecast     cost per outcome      exception cap
                                                                 │
    governed workloads ◄── directive (model, allowed models, rate, block)

Then every workload's directives from all the scopes that govern it are merged
(:func:`token_budget.policy.decisions.merge`): the most restrictive wins.

Decisions worth knowing:

* Spend is "unknown" when its source failed *or* when no series at all exists
  for the scope in any window: an outage or a missing exporter must never look
  like an idle workload. ``whenSpendUnknown`` then decides (Hold keeps the
  last state and leaves workloads untouched until ``staleAfterSeconds``).
* The ladder is cumulative: at Throttle, a Reroute below it still applies.
* A lower rung is taken back only when spend is ``hysteresisPercent`` points
  below the rung's threshold.

How one evaluation stays linear in budgets, namespaces and series (a
:class:`_Context` per call, nothing kept between calls)::

    namespaces ──► NamespaceIndex (label -> value -> namespaces): a selector
                   costs what it picks, not every namespace
    series ──────► _Spend per (source, window) and per source's burn rate:
                   series by namespace, then one sum per (namespace, spend
                   matchers, model) shared by every scope that asks
    catalog ─────► _Prices: each series priced once, in integers, giving the
                   very Decimal the series-by-series sum gave
    sources, window bounds, allowed models, ladders: once per distinct value

Every shortcut gives the same decisions to the last digit (tests/unit/
test_engine_index.py holds each to the plain computation).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import functools
import operator
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_FLOOR, Decimal

from token_budget.api import v1alpha1 as api
from token_budget.api.types import (
    LabelSelector,
    SelectorOperator,
    display_money,
    pattern_matches,
    utc,
)
from token_budget.policy import sources, windows
from token_budget.policy.catalog import Catalog
from token_budget.policy.decisions import (
    SEVERITY,
    STATE_OF_ACTION,
    Decision,
    Directive,
    Evaluation,
    ScopeSpend,
    WindowUsage,
    merge,
)
from token_budget.policy.inputs import (
    BudgetKey,
    Memory,
    ScopeKey,
    SpendSeries,
    SpendSnapshot,
    Workload,
    WorkloadKey,
)
from token_budget.policy.planner import OutcomeQuery
from token_budget.policy.sources import ResolvedSource
from token_budget.policy.windows import WindowKey

HUNDRED = Decimal(100)
_ZERO = Decimal(0)
_TENTH = Decimal("0.1")
_TEN_YEARS = Decimal(10 * 365 * 86400)  # a run-out further away is no forecast
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


@dataclass(frozen=True)
class World:
    """Everything but spend: the desired state and the cluster as it is."""

    budgets: Sequence[api.Budget]
    catalog: Catalog = field(default_factory=Catalog)
    namespaces: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    workloads: Sequence[Workload] = ()
    memory: Mapping[ScopeKey, Memory] = field(default_factory=dict)


# ---------------------------------------------------------------------------
# Scopes
# ---------------------------------------------------------------------------


class NamespaceIndex:
    """Namespaces by label, so that a selector finds its namespaces without testing each.

    ``matchLabels`` and ``In``/``Exists`` narrow to the namespaces that carry
    the value (or the key); ``NotIn``/``DoesNotExist`` take those away; a
    selector with neither picks every namespace. The answers are those of
    :meth:`LabelSelector.matches` on every namespace, at the cost of the
    namespaces picked rather than of all of them.
    """

    def __init__(self, namespaces: Mapping[str, Mapping[str, str]]) -> None:
        self.names = tuple(namespaces)
        self._by_value: dict[str, dict[str, set[str]]] = {}
        for ns, labels in namespaces.items():
            for k, v in labels.items():
                self._by_value.setdefault(k, {}).setdefault(v, set()).add(ns)
        self._with_key: dict[str, set[str]] = {}

    def _having(self, key: str, values: Iterable[str] | None = None) -> set[str]:
        """Namespaces labelled ``key`` (with one of ``values``, when given)."""
        by_value = self._by_value.get(key, {})
        if values is not None:
            return set().union(*(by_value.get(v, ()) for v in values))
        found = self._with_key.get(key)
        if found is None:
            found = self._with_key[key] = set().union(*by_value.values())
        return found

    def select(self, selector: LabelSelector) -> tuple[str, ...]:
        """The namespaces ``selector`` matches, sorted."""
        picked: set[str] | None = None
        dropped: set[str] = set()
        for key, value in selector.match_labels.items():
            found = self._by_value.get(key, {}).get(value, set())
            picked = set(found) if picked is None else picked & found
        for req in selector.match_expressions:
            op = req.operator
            if op is SelectorOperator.IN:
                found = self._having(req.key, req.values)
            elif op is SelectorOperator.EXISTS:
                found = self._having(req.key)
            else:
                dropped |= self._having(
                    req.key, req.values if op is SelectorOperator.NOT_IN else None)
                continue
            picked = set(found) if picked is None else picked & found
        if picked is None:
            picked = set(self.names)
        return tuple(sorted(picked - dropped))


def scopes(budget: api.Budget,
           namespaces: Mapping[str, Mapping[str, str]] | NamespaceIndex
           ) -> list[tuple[ScopeKey, tuple[str, ...]]]:
    """The scopes of a budget and the namespaces each covers.

    Args:
        budget: a TokenBudget or a ClusterTokenBudget.
        namespaces: labels per namespace, or a :class:`NamespaceIndex` of
            them (for many budgets: each then costs what it picks).
    """
    key = BudgetKey.of(budget)
    if isinstance(budget, api.TokenBudget):
        return [(ScopeKey(key), (budget.metadata.namespace or "",))]
    spec = budget.spec
    if isinstance(namespaces, NamespaceIndex):
        picked = namespaces.select(spec.namespace_selector)
    else:
        picked = tuple(sorted(n for n, labels in namespaces.items()
                              if spec.namespace_selector.matches(labels)))
    if spec.limit_scope is api.LimitScope.SHARED:
        return [(ScopeKey(key), picked)] if picked else []
    return [(ScopeKey(key, ns), (ns,)) for ns in picked]


# ---------------------------------------------------------------------------
# Spend filtering
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _regex(expr: str) -> re.Pattern[str]:
    return re.compile(expr)


def _matcher_ok(m: api.SpendMatcher, value: str) -> bool:
    op = m.operator
    if op is api.MatchOperator.EQUAL:
        return value == m.value
    if op is api.MatchOperator.NOT_EQUAL:
        return value != m.value
    hit = _regex(m.value).fullmatch(value) is not None  # PromQL regexes are anchored
    return hit if op is api.MatchOperator.REGEX else not hit


def series_matches(s: SpendSeries, matchers: Sequence[api.SpendMatcher]) -> bool:
    """Whether a series satisfies every spend matcher (PromQL semantics)."""
    return all(_matcher_ok(m, s.label(m.label)) for m in matchers)


# ---------------------------------------------------------------------------
# Spend sums
# ---------------------------------------------------------------------------

# A catalog model's prices as integers: input, output and cached-input coefficients
# at one exponent, the smallest exponent a series' cost on the model can have, and
# the factor from that exponent to the catalog's smallest; () for prices the integer
# sum does not cover (negative, NaN).
_Price = tuple[int, ...]


def _coefficient(value: Decimal, exponent: int) -> int:
    """``value`` as an integer count of ``10 ** exponent`` (``exponent`` <= its own)."""
    t = value.as_tuple()
    assert isinstance(t.exponent, int)
    return int("".join(map(str, t.digits))) * int(10 ** (t.exponent - exponent))


class _Part:
    """Spend of some series: tokens (a float sum in their order) and cost."""

    __slots__ = ("series", "tokens", "cost", "unpriced", "exact", "rates")

    def __init__(self, series: Sequence[SpendSeries], tokens: float, cost: Decimal,
                 unpriced: frozenset[str], exact: tuple[int, int] | None) -> None:
        self.series = series
        self.tokens = tokens
        self.cost = cost
        self.unpriced = unpriced
        self.exact = exact  # (numerator, exponent) of the cost; None: summed as Decimals
        self.rates: tuple[Decimal, Decimal] | None = None  # per second, once asked for

    def per_second(self, seconds: Decimal) -> tuple[Decimal, Decimal]:
        """Tokens and cost per second over ``seconds`` (always the same in an evaluation)."""
        if self.rates is None:
            self.rates = (Decimal(self.tokens) / seconds, self.cost / seconds)
        return self.rates


_FIELDS = operator.attrgetter("input_tokens", "output_tokens", "cached_input_tokens", "cost",
                              "model")
_INPUT = operator.attrgetter("input_tokens")
_OUTPUT = operator.attrgetter("output_tokens")
_CACHED = operator.attrgetter("cached_input_tokens")
_NO_MODELS: frozenset[str] = frozenset()


def _tokens(series: Sequence[SpendSeries]) -> Iterable[float]:
    """Each series' SpendSeries.tokens, the same sums, without a Python call per series."""
    add = operator.add
    return map(add, map(add, map(_INPUT, series), map(_OUTPUT, series)), map(_CACHED, series))


class _Prices:
    """Sums of catalog costs in integers, equal to the Decimal sums made one by one.

    The cost of a scope is ``Decimal(0) + c1 + c2 + ...`` over its series in
    snapshot order, each ``c`` being :meth:`Catalog.cost`. While nothing is
    rounded (every coefficient within the context's precision) each of those
    operations is exact: a product's exponent is the sum of its operands', a
    sum's is the smaller one, and ``x / 10**6`` keeps the exponent of ``x``
    unless the quotient needs up to six more digits. So the total is the
    integer sum, and its exponent the smallest over the terms: both are found
    here without a Decimal per series. When the total's coefficient could
    have been rounded (10**22 or more at 28 digits), a count is negative, a
    source reports money itself or a price is odd, the series are summed as
    Decimals one by one, as they always were: the result is the same.
    """

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        by_name = {m.name: self._coefficients(m.pricing) for m in catalog.models.values()}
        # The scale of every integer sum: no term nor Decimal(0) has a smaller exponent.
        self.lowest = min([0, *(p[3] for p in by_name.values() if p)])
        self._by_name = {name: (*p, 10 ** (p[3] - self.lowest)) if p else p
                         for name, p in by_name.items()}
        self._by_reported: dict[str, _Price | None] = {}
        self._limit = 10 ** (decimal.getcontext().prec - 6)
        self._scale = [10 ** k for k in range(-self.lowest + 1)]  # exponent - lowest -> 10**it

    @staticmethod
    def _coefficients(pricing: api.Pricing) -> _Price:
        cached = pricing.cached_input if pricing.cached_input is not None else pricing.input
        prices = (pricing.input, pricing.output, cached)
        if not all(p.is_finite() and not p.is_signed() for p in prices):
            return ()
        exponent = min(int(p.as_tuple().exponent) for p in prices)
        return (*(_coefficient(p, exponent) for p in prices), exponent - 6)

    def _price(self, reported: str) -> _Price | None:
        entry = self.catalog.resolve(reported)
        found = None if entry is None else self._by_name[entry.name]
        self._by_reported[reported] = found
        return found

    def _decimal(self, numerator: int, exponent: int) -> Decimal | None:
        """``numerator * 10**lowest`` at ``exponent``; None when it may have been rounded."""
        coefficient = numerator // self._scale[exponent - self.lowest]
        if coefficient >= self._limit:
            return None
        return Decimal(coefficient).scaleb(exponent)

    def _one_by_one(self, series: Sequence[SpendSeries]) -> _Part:
        tokens = 0.0
        cost = Decimal(0)
        unpriced = set()
        for s in series:
            tokens += s.tokens
            c = s.cost
            if c is None:
                c = self.catalog.cost(s.model, s.input_tokens, s.output_tokens,
                                      s.cached_input_tokens)
            if c is None:
                if s.tokens > 0:
                    unpriced.add(s.model)
            else:
                cost += c
        return _Part(series, tokens, cost, frozenset(unpriced), None)

    def sum(self, series: Sequence[SpendSeries]) -> _Part:
        """Tokens and cost of ``series``, summed in their order."""
        tokens = 0.0
        numerator = 0
        exponent = 0  # that of Decimal(0), where the sum starts
        unpriced: set[str] = set()
        prices = self._by_reported
        for i, o, c, reported, model in map(_FIELDS, series):
            tok = i + o + c  # as SpendSeries.tokens adds them
            tokens += tok
            if reported is not None:
                return self._one_by_one(series)
            try:
                p = prices[model]
            except KeyError:
                p = self._price(model)
            if p is None:
                if tok > 0:
                    unpriced.add(model)
                continue
            if not p:
                return self._one_by_one(series)
            p_in, p_out, p_cached, floor, factor = p
            ri, ro, rc = round(i), round(o), round(c)
            if ri < 0 or ro < 0 or rc < 0:  # partial sums would not only grow
                return self._one_by_one(series)
            x = ri * p_in + ro * p_out + rc * p_cached
            if exponent > floor:
                # x / 10**6 keeps trailing zeros of x down to x's own exponent.
                e, y = floor, x
                while e < floor + 6 and not y % 10:
                    e, y = e + 1, y // 10
                if e < exponent:
                    exponent = e
            numerator += x * factor
        cost = self._decimal(numerator, exponent)
        if cost is None:
            return self._one_by_one(series)
        return _Part(series, tokens, cost, frozenset(unpriced) if unpriced else _NO_MODELS,
                     (numerator, exponent))

    def join(self, parts: Sequence[_Part]) -> _Part:
        """Parts as one, as if their series had been summed in one go."""
        series = [s for p in parts for s in p.series]
        exact = [p.exact for p in parts if p.exact is not None]
        if len(exact) < len(parts):
            return self._one_by_one(series)
        numerator = sum(n for n, _ in exact)
        exponent = min((e for _, e in exact), default=0)
        cost = self._decimal(numerator, exponent)
        if cost is None:
            return self._one_by_one(series)
        # Go on adding where the first part stopped, one series after the other.
        tokens = functools.reduce(operator.add, _tokens(series[len(parts[0].series):]),
                                  parts[0].tokens)
        return _Part(series, tokens, cost, frozenset().union(*(p.unpriced for p in parts)),
                     (numerator, exponent))


_Matchers = tuple[api.SpendMatcher, ...]


class _Spend:
    """The series of one (source, window), or of a source's burn rate, by namespace.

    Sums are made on first use per (namespace, spend matchers, model) and
    kept for every other scope that asks: a TokenBudget and a PerNamespace
    ClusterTokenBudget of one namespace share them.
    """

    def __init__(self, series: Iterable[SpendSeries], prices: _Prices,
                 model_ok: Callable[[str, str], bool]) -> None:
        by_ns: defaultdict[str, list[SpendSeries]] = defaultdict(list)
        for s in series:
            by_ns[s.namespace].append(s)
        self.by_ns = dict(by_ns)
        self.prices = prices
        self.model_ok = model_ok
        self._chosen: dict[tuple[str, _Matchers], list[SpendSeries]] = {}
        self._parts: dict[tuple[str, _Matchers, str | None], _Part] = {}
        self._totals: dict[tuple[tuple[str, ...], _Matchers, str | None], _Part] = {}

    def chosen(self, ns: str, matchers: _Matchers) -> Sequence[SpendSeries]:
        """The namespace's series that satisfy the spend matchers."""
        if not matchers:
            return self.by_ns.get(ns, ())
        try:
            return self._chosen[(ns, matchers)]
        except KeyError:
            found = self._chosen[(ns, matchers)] = [
                s for s in self.by_ns.get(ns, ()) if series_matches(s, matchers)]
            return found

    def seen(self, namespaces: Iterable[str], matchers: _Matchers) -> bool:
        """Whether any series exists for the namespaces (whatever the model)."""
        for ns in namespaces:
            if (ns in self.by_ns) if not matchers else self.chosen(ns, matchers):
                return True
        return False

    def part(self, ns: str, matchers: _Matchers, model: str | None) -> _Part:
        try:
            return self._parts[(ns, matchers, model)]
        except KeyError:
            chosen = self.chosen(ns, matchers)
            if model is not None:
                ok = self.model_ok
                chosen = [s for s in chosen if ok(s.model, model)]
            found = self._parts[(ns, matchers, model)] = self.prices.sum(chosen)
            return found

    def total(self, namespaces: tuple[str, ...], matchers: _Matchers, model: str | None
              ) -> _Part:
        """Spend of the namespaces (in their order), as one sum over all their series."""
        try:
            return self._totals[(namespaces, matchers, model)]
        except KeyError:
            if len(namespaces) == 1:
                found = self.part(namespaces[0], matchers, model)
            else:
                found = self.prices.join([self.part(ns, matchers, model) for ns in namespaces])
            self._totals[(namespaces, matchers, model)] = found
            return found


class _Window:
    """One limit's window for one source: its bounds, and its spend (None: not read)."""

    __slots__ = ("key", "start", "resets", "spend", "span")

    def __init__(self, key: WindowKey, start: dt.datetime, resets: dt.datetime | None,
                 spend: _Spend | None, now: dt.datetime) -> None:
        self.key = key
        self.start = start
        self.resets = resets
        self.spend = spend
        self.span = (now - start).total_seconds()  # seconds since the window started


class _Source:
    """A resolved spend source with what the snapshot holds for it."""

    def __init__(self, rs: ResolvedSource, context: _Context) -> None:
        self.rs = rs
        self.context = context
        self.error = context.snapshot.errors.get(rs)
        self.recent = _Spend(context.snapshot.recent.get(rs, ()), context.prices,
                             context.model_ok)
        self._windows: dict[tuple[str, str], _Window] = {}

    def window(self, window: str, time_zone: str) -> _Window:
        try:
            return self._windows[(window, time_zone)]
        except KeyError:
            key = WindowKey.of(window, time_zone)
            spend = self.context.spend(self.rs, key)
            # Bounds only for windows that were read, as before (an odd zone fails planning).
            start, resets = self.context.bounds(key) if spend is not None else (_EPOCH, None)
            found = self._windows[(window, time_zone)] = _Window(
                key, start, resets, spend, self.context.now_utc)
            return found


_Rows = list[tuple[str, tuple[tuple[str, str], ...], float]]


class _Context:
    """What one evaluation works out once and every scope reads.

    Indexes (namespaces by label, spend by source, window and namespace,
    workloads and outcome rows by namespace) and what depends only on their
    inputs and ``now``: resolved sources, window bounds, allowed models,
    model-pattern matches, cheapest equivalents.
    """

    def __init__(self, world: World, snapshot: SpendSnapshot, now: dt.datetime) -> None:
        self.world = world
        self.catalog = world.catalog
        self.snapshot = snapshot
        self.now = now
        self.now_utc = utc(now)
        self.namespaces = NamespaceIndex(world.namespaces)
        self.prices = _Prices(world.catalog)
        self.recent_seconds = Decimal(max(1, snapshot.recent_seconds))
        self.workloads: defaultdict[str, list[Workload]] = defaultdict(list)
        for w in world.workloads:
            self.workloads[w.key.namespace].append(w)
        self._by_spec: dict[api.SpendSource, _Source] = {}
        self._by_rs: dict[ResolvedSource, _Source] = {}
        self._spend: dict[tuple[ResolvedSource, WindowKey], _Spend | None] = {}
        self._bounds: dict[WindowKey, tuple[dt.datetime, dt.datetime | None]] = {}
        self._ladders: dict[int, tuple[tuple[api.Action, ...], list[api.Action]]] = {}
        self._allowed: dict[tuple[object, ...], frozenset[str] | None] = {}
        self._model_ok: dict[tuple[str, str], bool] = {}
        self._cheapest: dict[tuple[str, frozenset[str] | None], str | None] = {}
        self._outcomes: dict[str, defaultdict[str, list[tuple[int, tuple[tuple[str, str], ...],
                                                              float]]]] = {}

    def source(self, spec: api.SpendSource) -> _Source:
        try:
            return self._by_spec[spec]
        except KeyError:
            rs = sources.resolve(spec)
            found = self._by_rs.get(rs)
            if found is None:
                found = self._by_rs[rs] = _Source(rs, self)
            self._by_spec[spec] = found
            return found

    def ladder(self, spec: api.TokenBudgetSpec) -> list[api.Action]:
        """The budget's actions by threshold (one sort per actions tuple, not per scope)."""
        found = self._ladders.get(id(spec.actions))
        if found is None or found[0] is not spec.actions:
            found = self._ladders[id(spec.actions)] = (spec.actions, _ladder(spec))
        return found[1]

    def bounds(self, key: WindowKey) -> tuple[dt.datetime, dt.datetime | None]:
        """Where the window started and when it resets (None: rolling)."""
        found = self._bounds.get(key)
        if found is None:
            start, _ = windows.bounds(key, self.now)
            found = self._bounds[key] = (start, windows.resets_at(key, self.now))
        return found

    def spend(self, rs: ResolvedSource, key: WindowKey) -> _Spend | None:
        """Spend over a window; None when the window was not read."""
        try:
            return self._spend[(rs, key)]
        except KeyError:
            series = self.snapshot.windows.get((rs, key))
            found = None if series is None else _Spend(series, self.prices, self.model_ok)
            self._spend[(rs, key)] = found
            return found

    def model_ok(self, reported: str, pattern: str) -> bool:
        try:
            return self._model_ok[(reported, pattern)]
        except KeyError:
            found = self._model_ok[(reported, pattern)] = (
                pattern_matches(pattern, reported)
                or pattern_matches(pattern, self.catalog.canonical(reported)))
            return found

    def allowed_models(self, spec: api.TokenBudgetSpec) -> frozenset[str] | None:
        key = (spec.allowed_models, spec.denied_models, spec.denied_tiers)
        try:
            return self._allowed[key]
        except KeyError:
            found = self._allowed[key] = allowed_models(spec, self.catalog)
            return found

    def cheapest_equivalent(self, model: str, allowed: frozenset[str] | None) -> str | None:
        try:
            return self._cheapest[(model, allowed)]
        except KeyError:
            found = self._cheapest[(model, allowed)] = cheapest_equivalent(
                model, allowed, self.catalog)
            return found

    def outcome_rows(self, key: str, namespaces: tuple[str, ...]) -> _Rows | None:
        """An outcome query's rows for the namespaces, in the snapshot's order."""
        rows = self.snapshot.outcomes.get(key)
        if rows is None:
            return None
        by_ns = self._outcomes.get(key)
        if by_ns is None:
            by_ns = self._outcomes[key] = defaultdict(list)
            for i, (ns, labels, value) in enumerate(rows):
                by_ns[ns].append((i, labels, value))
        picked = [(i, ns, labels, value) for ns in namespaces
                  for i, labels, value in by_ns.get(ns, ())]
        if len(namespaces) > 1:
            picked.sort(key=lambda r: r[0])
        return [(ns, labels, value) for _, ns, labels, value in picked]


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


def allowed_models(spec: api.TokenBudgetSpec, catalog: Catalog) -> frozenset[str] | None:
    """Catalog models a budget allows; None when the budget restricts nothing."""
    if not (spec.allowed_models or spec.denied_models or spec.denied_tiers):
        return None
    return frozenset(m.name for m in catalog.models.values()
                     if model_allowed(spec, m.name, catalog))


def model_allowed(spec: api.TokenBudgetSpec, name: str, catalog: Catalog) -> bool:
    """Whether a model (as a workload or exporter names it) is allowed by a budget."""
    entry = catalog.resolve(name)
    names = {name} | ({entry.name} | set(entry.aliases) if entry else set())
    if any(pattern_matches(p, n) for p in spec.denied_models for n in names):
        return False
    if entry is not None and entry.tier in spec.denied_tiers:
        return False
    if spec.allowed_models:
        return any(pattern_matches(p, n) for p in spec.allowed_models for n in names)
    return True


def cheapest_equivalent(model: str, allowed: frozenset[str] | None, catalog: Catalog) -> str | None:
    """The cheapest allowed catalog equivalent of a model, or None when there is none."""
    entry = catalog.resolve(model)
    if entry is None:
        return None
    options = [e for e in entry.equivalents if e in catalog.models
               and (allowed is None or e in allowed)]
    if not options:
        return None
    return min(options, key=lambda e: (catalog.unit_price(e), e))


# ---------------------------------------------------------------------------
# Evaluation of one scope
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rung:
    index: int  # in the sorted ladder; -1 below the first rung
    action: api.Action | None

    @property
    def state(self) -> api.State:
        return api.State.OK if self.action is None else STATE_OF_ACTION[self.action.type]


def _ladder(spec: api.TokenBudgetSpec) -> list[api.Action]:
    return sorted(spec.actions, key=lambda a: a.at_percent)


def _rung_for(ladder: list[api.Action], used: Decimal) -> _Rung:
    reached = [i for i, a in enumerate(ladder) if used >= a.at_percent]
    if not reached:
        return _Rung(-1, None)
    # The most restrictive rung reached, not merely the highest threshold: a Warn
    # listed at 120 % must not lift a Block at 100 %.
    i = max(reached, key=lambda j: (SEVERITY[STATE_OF_ACTION[ladder[j].type]], j))
    return _Rung(i, ladder[i])


def _percent(value: Decimal, limit: Decimal) -> Decimal:
    return value * HUNDRED / limit


_money = display_money  # the one formatter of money for people


def describe(w: WindowUsage, currency: str) -> tuple[str, str]:
    """(spend, limit) as people read them, for the tighter of the two limits."""
    tok_pct = (Decimal(w.tokens) * HUNDRED / w.limit_tokens) if w.limit_tokens else Decimal(-1)
    cost_pct = (w.cost * HUNDRED / w.limit_cost) if w.limit_cost else Decimal(-1)
    if w.limit_cost is not None and cost_pct >= tok_pct:
        return _money(w.cost, currency), _money(w.limit_cost, currency)
    return f"{w.tokens:,} tokens", f"{w.limit_tokens:,} tokens"


class _ScopeEval:
    def __init__(self, budget: api.Budget, scope: ScopeKey, namespaces: tuple[str, ...],
                 context: _Context, governed: list[Workload]) -> None:
        self.budget = budget
        self.spec: api.TokenBudgetSpec = budget.spec
        self.scope = scope
        self.namespaces = namespaces
        self.context = context
        self.catalog = context.catalog
        self.snapshot = context.snapshot
        self.now = context.now
        self.governed = governed
        self.spend_source = context.source(self.spec.source)
        self.source = self.spend_source.rs
        memory = context.world.memory
        self.memory = memory.get(scope) if memory else None  # no ScopeKey hash when empty
        self._counted: list[_Part] = []  # what each limit counted, for top_model()

    # -- spend ---------------------------------------------------------------

    def windows(self) -> tuple[list[WindowUsage], bool, set[str]]:
        """Usage per limit, whether any series exists, unpriced models."""
        usages: list[WindowUsage] = []
        seen = False
        unpriced: set[str] = set()
        namespaces = self.namespaces
        matchers = self.spec.spend_matchers
        source = self.spend_source
        recent_s = self.context.recent_seconds
        retention = self.snapshot.retention_seconds
        now = self.context.now_utc
        for lim in self.spec.limits:
            window = source.window(lim.window, lim.time_zone)
            spend = window.spend
            if spend is None:
                why = self.snapshot.window_errors.get((self.source, window.key))
                raise _Unknown(why or f"spend over {window.key} was not read")
            # Whether the scope has spend series at all is asked without the limit's model
            # filter: a cap on a model nobody uses is zero spend, not an exporter gone missing.
            seen = seen or spend.seen(namespaces, matchers)
            counted = spend.total(namespaces, matchers, lim.model)
            self._counted.append(counted)
            tokens, cost = counted.tokens, counted.cost
            if counted.unpriced:
                unpriced |= counted.unpriced
            start, resets, span = window.start, window.resets, window.span
            covered = None
            if retention and span > retention:
                # Prometheus no longer holds the window's oldest part: estimate the whole
                # window from the covered part's rate rather than count the rest as zero.
                covered = Decimal(retention) / Decimal(span)
                tokens = float(Decimal(tokens) / covered)
                cost = cost / covered
            token_rate, cost_rate = source.recent.total(
                namespaces, matchers, lim.model).per_second(recent_s)
            pcts = []
            run_outs = []
            if lim.tokens:
                pcts.append(Decimal(round(tokens)) * HUNDRED / lim.tokens)
                if token_rate > 0:
                    left = max(_ZERO, Decimal(lim.tokens) - Decimal(tokens))
                    run_outs.append(left / token_rate)
            if lim.cost:
                pcts.append(_percent(cost, lim.cost))
                if cost_rate > 0:
                    left = max(_ZERO, lim.cost - cost)
                    run_outs.append(left / cost_rate)
            run_out = None
            if run_outs:
                secs = min(run_outs)
                if secs < _TEN_YEARS:
                    candidate = now + dt.timedelta(seconds=float(secs))
                    if resets is None or candidate < resets:
                        run_out = candidate
            gap = None
            gaps = self.snapshot.gaps.get((self.source, window.key)) if self.snapshot.gaps \
                else None
            if gaps:
                for ns in namespaces:
                    g = gaps.get(ns)
                    if g is not None:
                        gap = g if gap is None else gap + g
            usages.append(WindowUsage(
                window=lim.window, time_zone=lim.time_zone, model=lim.model, start=start,
                resets_at=resets, tokens=int(round(tokens)), cost=cost,
                limit_tokens=lim.tokens, limit_cost=lim.cost,
                used_percent=max(pcts) if pcts else Decimal(0), run_out=run_out,
                covered=covered, gap=gap,
            ))
        if not seen:
            # A calendar window that began a moment ago holds no samples yet; the burn-rate
            # query's series still show that the source is alive and the scope reports.
            seen = source.recent.seen(namespaces, matchers)
        return usages, seen, unpriced

    def top_model(self) -> dict[str, str]:
        """The model of each workload's largest series over every limit's spend."""
        top: dict[str, tuple[float, str]] = {}
        for counted in self._counted:
            for s in counted.series:
                best = top.get(s.workload)
                if best is None or s.tokens > best[0]:
                    top[s.workload] = (s.tokens, s.model)
        return {w: m for w, (_, m) in top.items()}

    def cost_per_outcome(self) -> Decimal | None:
        o = self.spec.outcome
        if o is None:
            return None
        spend = self.spend_source.window(o.window, "UTC").spend
        cost = (spend.total(self.namespaces, self.spec.spend_matchers, None).cost
                if spend is not None else Decimal(0))
        return _per_outcome(cost, _outcome_count(self.context, o, outcome_key(o),
                                                 self.namespaces))

    # -- decision ------------------------------------------------------------

    def decide(self) -> Decision:
        dry = self.spec.mode is api.Mode.DRY_RUN
        error = self.spend_source.error
        try:
            if error is not None:
                raise _Unknown(error)
            down = self.snapshot.down.get(self.source) if self.snapshot.down else None
            if down:
                hit = sorted({down[ns] for ns in self.namespaces if ns in down})
                if hit:
                    # The exporter or gateway that reported this scope's spend does not
                    # answer: what it counts now is unknown, whatever is still in the window.
                    raise _Unknown(f"{hit[0]}; the spend they count cannot be read")
            usages, seen, unpriced = self.windows()
            silent = False
            if not seen and self.memory is not None and self.memory.last_spend_time is not None:
                # Series existed before and are gone. Silence, unless something says the
                # scrape is missing: Prometheus failing and targets down are caught above;
                # here, agent pods that run but no longer export anything. (Pods gone,
                # scaled to zero, Jobs done: silence, and silence over a window is zero;
                # a FailClosed budget that blocked them would otherwise never lift.)
                running = sum(w.settled_pods for w in self.governed) if self.source.per_pod \
                    else 0
                if running:
                    raise _Unknown(
                        f"no {self.source.preset} spend series exist any more for "
                        f"{', '.join(self.namespaces) or 'any namespace'} while {running} "
                        "governed pod(s) run: their scrape is missing, and an empty result "
                        "is not taken as zero spend"
                    )
                silent = True
        except _Unknown as unknown:
            return self.unknown(str(unknown), dry)

        ladder = self.context.ladder(self.spec)
        used = max((w.used_percent for w in usages), default=Decimal(0))
        rung = _rung_for(ladder, used)
        reason = "LimitReached" if rung.action is not None else "WithinBudget"
        worst = max(usages, key=lambda w: w.used_percent)
        spend_text, limit_text = describe(worst, self.catalog.currency)
        window_text = f"{worst.window}" + (f" ({worst.time_zone})" if worst.resets_at else "")
        message = (f"spend in window {window_text} is {spend_text} of {limit_text} "
                   f"({used.quantize(_TENTH)}%)")
        if silent:
            message += ("; no spend series exist any more for this scope and none of its "
                        "governed pods runs: silence, counted as zero")
        elif not seen:
            message += "; no spend series exist yet for this scope"
        if rung.action is not None:
            message += f": {rung.action.type.value} from {rung.action.at_percent}%"

        # Hysteresis: coming down, a rung (up to the remembered one) is lifted only once
        # spend is clearly below it; from Blocked into Warn's margin gives Warning, not Ok.
        if self.memory is not None and SEVERITY[self.memory.state] > SEVERITY[rung.state]:
            margin = self.spec.hysteresis_percent
            held = [i for i, a in enumerate(ladder)
                    if SEVERITY[STATE_OF_ACTION[a.type]] <= SEVERITY[self.memory.state]
                    and used >= a.at_percent - margin]
            if held:
                i = max(held, key=lambda j: (SEVERITY[STATE_OF_ACTION[ladder[j].type]], j))
                if SEVERITY[STATE_OF_ACTION[ladder[i].type]] > SEVERITY[rung.state]:
                    rung = _Rung(i, ladder[i])
                    reason = "Hysteresis"
                    message += (f"; {ladder[i].type.value} holds until spend falls below "
                                f"{ladder[i].at_percent - margin}%")

        cpo = self.cost_per_outcome()
        outcome_action: api.Action | None = None
        o = self.spec.outcome
        if cpo is not None and o is not None and o.max_cost_per_outcome is not None \
                and cpo > o.max_cost_per_outcome:
            outcome_action = api.Action(type=o.on_exceeded, at_percent=1)
            if SEVERITY[STATE_OF_ACTION[o.on_exceeded]] > SEVERITY[rung.state]:
                reason = "CostPerOutcomeExceeded"
                message = (f"cost per outcome {_money(cpo, self.catalog.currency)} exceeds "
                           f"{_money(o.max_cost_per_outcome, self.catalog.currency)}: "
                           f"{o.on_exceeded.value}")

        # Effective actions: every rung reached (cumulative), plus the outcome action.
        effective = [a for a in ladder[: rung.index + 1]] if rung.index >= 0 else []
        if outcome_action is not None:
            effective.append(outcome_action)
        exception = self.active_exception()
        if exception is not None:
            cap = SEVERITY[STATE_OF_ACTION[exception.max_action]]
            capped = [a for a in effective if SEVERITY[STATE_OF_ACTION[a.type]] <= cap]
            if len(capped) != len(effective):
                reason = "ExceptionActive"
                message += f"; capped at {exception.max_action.value} until " \
                           f"{exception.until.isoformat()} ({exception.reason})"
                # Downgrade, not drop: over budget under a Warn cap is Warning even when
                # the ladder has no Warn rung of its own.
                if not any(a.type is exception.max_action for a in capped):
                    capped.append(api.Action(type=exception.max_action, at_percent=1))
            effective = capped
        state = max((STATE_OF_ACTION[a.type] for a in effective), key=SEVERITY.__getitem__,
                    default=api.State.OK)
        if state is api.State.OK and reason == "LimitReached":
            reason = "WithinBudget"
        top_action = max(effective, key=lambda a: SEVERITY[STATE_OF_ACTION[a.type]], default=None)

        directives = self.directives(state, reason, message, effective, usages)
        run_outs = [w.run_out for w in usages if w.run_out is not None]
        # Over the limit that counted the most series (the longest window, as a rule): a
        # label is judged once, not once per window.
        widest = max(self._counted, key=lambda c: len(c.series), default=None)
        unaccounted, unaccounted_n = ungoverned(
            widest.series if widest is not None else (), self.governed)
        return Decision(
            scope=self.scope, namespaces=self.namespaces, state=state, reason=reason,
            message=message, windows=tuple(usages), action=top_action,
            run_out=min(run_outs) if run_outs else None, cost_per_outcome=cpo,
            unpriced_models=tuple(sorted(unpriced)), series_seen=seen,
            exception=exception.reason if exception is not None else None, dry_run=dry,
            workloads=tuple(sorted(w.key for w in self.governed)), directives=directives,
            ungoverned=unaccounted, ungoverned_series=unaccounted_n,
        )

    def active_exception(self) -> api.BudgetException | None:
        live = [e for e in self.spec.exceptions if utc(e.until) > self.context.now_utc]
        if not live:
            return None
        # Several at once: the most lenient cap applies, as both were granted.
        return max(live, key=lambda e: (SEVERITY[STATE_OF_ACTION[e.max_action]], e.until))

    def directives(self, state: api.State, reason: str, message: str,
                   effective: list[api.Action], usages: list[WindowUsage]
                   ) -> dict[WorkloadKey, Directive]:
        allowed = self.context.allowed_models(self.spec)
        reroute = next((a for a in reversed(effective) if a.type is api.ActionType.REROUTE), None)
        throttle = next((a for a in reversed(effective) if a.type is api.ActionType.THROTTLE), None)
        rate = None
        if throttle is not None:
            rate = throttle.tokens_per_minute or self.pace(usages)
        out = {}
        budget = f"{self.scope.budget.kind}/{self.scope.budget}"
        top_model: dict[str, str] | None = None
        for w in self.governed:
            model = None
            if reroute is not None:
                if reroute.model:
                    model = reroute.model
                else:
                    current = next(iter(w.declared_models), None)
                    if not current:
                        if top_model is None:
                            top_model = self.top_model()
                        current = top_model.get(w.key.name)
                        if current is None:
                            # Spend reported per pod: the workload's pods carry its name
                            # as prefix.
                            current = next((m for wl, m in sorted(top_model.items())
                                            if wl.startswith(w.key.name + "-")), None)
                    model = (self.context.cheapest_equivalent(current, allowed) if current
                             else None)
            out[w.key] = Directive(
                state=state, budget=budget, reason=reason,
                message=message, model=model, allowed_models=allowed, tokens_per_minute=rate,
            )
        return out

    def pace(self, usages: list[WindowUsage]) -> int:
        """Tokens per minute per workload that spread what is left evenly over the window."""
        worst = max(usages, key=lambda w: w.used_percent)
        # A limit may cap tokens and money at once: what is left is the tighter of the two.
        lefts = []
        if worst.limit_tokens:
            lefts.append(Decimal(max(0, worst.limit_tokens - worst.tokens)))
        if worst.limit_cost and worst.cost > 0 and worst.tokens > 0:
            lefts.append(max(Decimal(0), worst.limit_cost - worst.cost) * worst.tokens / worst.cost)
        left = min(lefts, default=Decimal(0))
        if worst.resets_at is not None:
            minutes = Decimal((worst.resets_at - self.context.now_utc).total_seconds()) / 60
        else:
            minutes = Decimal((self.context.now_utc - worst.start).total_seconds()) / 60
        per = left / max(Decimal(1), minutes) / max(1, len(self.governed))
        return max(1, int(per.to_integral_value(rounding=ROUND_FLOOR)))

    def unknown(self, error: str, dry: bool) -> Decision:
        policy = self.spec.when_spend_unknown
        keys = tuple(sorted(w.key for w in self.governed))
        budget = f"{self.scope.budget.kind}/{self.scope.budget}"
        if policy.policy is api.MissingDataPolicy.HOLD and self.memory is not None:
            last = self.memory.last_spend_time
            fresh = last is not None and (self.context.now_utc - utc(last)).total_seconds() \
                <= policy.stale_after_seconds
            if fresh:
                return Decision(
                    scope=self.scope, namespaces=self.namespaces, state=self.memory.state,
                    reason="SpendUnknownHolding",
                    message=f"spend cannot be read ({error}); holding state "
                    f"{self.memory.state.value} for up to {policy.stale_after_seconds}s",
                    spend_known=False, spend_error=error, dry_run=dry, workloads=keys,
                    directives={},  # Hold: workloads keep what they have
                )
        if policy.policy is api.MissingDataPolicy.FAIL_CLOSED:
            state, reason = api.State.BLOCKED, "SpendUnknownFailClosed"
            message = f"spend cannot be read ({error}); FailClosed blocks"
        else:
            state, reason = api.State.OK, "SpendUnknownFailOpen"
            message = f"spend cannot be read ({error}); failing open"
            if policy.policy is api.MissingDataPolicy.HOLD:
                message = (f"spend cannot be read ({error}); nothing to hold or held longer "
                           f"than {policy.stale_after_seconds}s, failing open")
        allowed = self.context.allowed_models(self.spec)
        directives = {
            k: Directive(state=state, budget=budget, reason=reason, message=message,
                         allowed_models=allowed)
            for k in keys
        }
        return Decision(
            scope=self.scope, namespaces=self.namespaces, state=state, reason=reason,
            message=message, spend_known=False, spend_error=error, dry_run=dry,
            workloads=keys, directives=directives,
        )


class _Unknown(Exception):
    """Spend for a scope cannot be known (internal control flow only)."""


# ---------------------------------------------------------------------------
# Whole evaluation
# ---------------------------------------------------------------------------


def mandatory(budget: api.Budget) -> bool:
    """Whether a budget governs every workload of its namespaces, whatever their labels."""
    return isinstance(budget, api.ClusterTokenBudget) and \
        budget.spec.enrolment is api.Enrolment.MANDATORY


def mandatory_namespaces(budgets: Iterable[api.Budget],
                         namespaces: Mapping[str, Mapping[str, str]]) -> frozenset[str]:
    """Namespaces where enrolment is mandatory: picked by a Mandatory ClusterTokenBudget,
    or labelled ``tokenbudget.io/enrolment=Mandatory`` (a label only an admin can set)."""
    out = {ns for ns, labels in namespaces.items()
           if labels.get(api.ENROLMENT_LABEL) == api.Enrolment.MANDATORY.value}
    index: NamespaceIndex | None = None
    for b in budgets:
        if mandatory(b):
            index = index or NamespaceIndex(namespaces)
            for _, picked in scopes(b, index):
                out.update(picked)
    return frozenset(out)


def governed_by(budget: api.Budget, namespaces: Iterable[str],
                by_ns: Mapping[str, list[Workload]]) -> list[Workload]:
    if mandatory(budget):
        return [w for ns in namespaces for w in by_ns.get(ns, ())]
    sel = budget.spec.selector
    return [w for ns in namespaces for w in by_ns.get(ns, ()) if sel.matches(w.pod_labels)]


#: Ungoverned workload labels a decision names (the count says how many there are).
UNGOVERNED_SHOWN = 20


def ungoverned(series: Iterable[SpendSeries], governed: Iterable[Workload]
               ) -> tuple[tuple[str, ...], int]:
    """Workload labels of spend series that belong to no governed workload.

    A series belongs to a governed workload when its workload label is the
    workload's name, one of the pods the operator listed for it, or, for a
    pod it has not listed (not yet, or no longer), its name followed by ``-``
    (pod names begin with their workload's). Series without a workload label
    cannot be attributed and are left out, and so are series that spent
    nothing in the window.

    Returns:
        Up to :data:`UNGOVERNED_SHOWN` sorted ``namespace/label`` strings, and
        how many there are in all.
    """
    known: dict[str, set[str]] = {}  # per namespace: labels that belong to a governed one
    for w in governed:
        known.setdefault(w.key.namespace, set()).update((w.key.name, *w.pods))
    strays: dict[str, set[str]] = {}  # per namespace: labels judged ungoverned
    for s in series:
        label = s.workload
        if not label:
            continue  # cannot be attributed
        names = known.get(s.namespace)
        if names is None:
            names = known[s.namespace] = set()
        if label in names or label in strays.get(s.namespace, ()) \
                or not (s.tokens > 0 or s.cost):
            continue  # governed, judged already, or nothing spent in the window
        # Each prefix of the label at a "-": a pod of workload "a-b" is "a-b-<hash>-<x>".
        cut = label.find("-")
        while cut >= 0 and label[:cut] not in names:
            cut = label.find("-", cut + 1)
        if cut < 0:
            strays.setdefault(s.namespace, set()).add(label)
        else:
            names.add(label)  # its other series (models, windows) are known at once
    found = sorted(f"{ns}/{label}" for ns, labels in strays.items() for label in labels)
    return tuple(found[:UNGOVERNED_SHOWN]), len(found)


def evaluate(world: World, snapshot: SpendSnapshot, now: dt.datetime) -> Evaluation:
    """Decide every budget scope and merge the directives per workload.

    Args:
        world: budgets, catalog, namespaces with labels, workloads, memory.
        snapshot: spend read for the plan of the same budgets.
        now: the time of evaluation (never read from a clock here).

    Returns:
        One decision per scope (sorted) and one merged directive per governed
        workload. Workloads governed only by dry-run or held scopes get none;
        :attr:`Evaluation.held` lists those that must be left as they are.
    """
    context = _Context(world, snapshot, now)
    decisions: list[Decision] = []
    per_workload: dict[WorkloadKey, list[Directive]] = defaultdict(list)
    held: set[WorkloadKey] = set()
    for budget in world.budgets:
        for scope, namespaces in scopes(budget, context.namespaces):
            governed = governed_by(budget, namespaces, context.workloads)
            decision = _ScopeEval(budget, scope, namespaces, context, governed).decide()
            if decision.spend_known and not decision.series_seen:
                decision = _explain_unseen(decision, budget, context)
            decisions.append(decision)
            if decision.dry_run:
                continue
            if decision.reason == "SpendUnknownHolding":
                held.update(decision.workloads)
            for key, directive in decision.directives.items():
                per_workload[key].append(directive)
    merged = {k: merge(v) for k, v in per_workload.items() if k not in held}
    decisions.sort(key=_scope_order)
    return Evaluation(decisions=tuple(decisions), directives=merged, held=frozenset(held))


def _scope_order(d: Decision) -> tuple[str, str, str, str]:
    # ScopeKey's own order, as a plain tuple: dataclass comparisons build tuples per call.
    b = d.scope.budget
    return (b.kind, b.namespace, b.name, d.scope.namespace)


def outcome_key(o: api.Outcome) -> str:
    """The key under which the snapshot holds an outcome counter's answer."""
    return OutcomeQuery.key_of(o.metric, o.namespace_label, WindowKey.of(o.window, "UTC"))


# ---------------------------------------------------------------------------
# Outcomes, spend per scope for reports, and why a scope saw nothing
# ---------------------------------------------------------------------------


def _outcome_count(context: _Context, o: api.Outcome, key: str,
                   namespaces: tuple[str, ...]) -> float | None:
    """Outcomes of the namespaces under the outcome's matchers; None when not read."""
    rows = context.outcome_rows(key, namespaces)
    if rows is None:
        return None
    count = 0.0
    for _, labels, value in rows:
        lab = dict(labels)
        if all(_matcher_ok(m, lab.get(m.label, "")) for m in o.matchers):
            count += value
    return count


def _per_outcome(cost: Decimal, count: float | None) -> Decimal | None:
    if count is None or count <= 0:
        return None
    return cost / Decimal(round(count, 6))


def scope_spend(world: World, snapshot: SpendSnapshot, now: dt.datetime,
                key: WindowKey) -> list[ScopeSpend]:
    """What every budget scope spent over one window, summed as its decision sums it.

    The reading ``tokenbudget report`` shows: the snapshot's series of the
    budget's source over ``key``, picked by the scope's namespaces and every
    spend matcher (Equal, NotEqual, Regex, NotRegex), summed and priced as
    :func:`evaluate` sums and prices them; outcomes under the outcome's
    matchers over the same window, and the cost per outcome from both.

    Args:
        world: budgets, catalog, namespaces (workloads and memory are unused).
        snapshot: spend read for :func:`token_budget.policy.planner.report_plan`
            over ``key``; a source missing from it counts as zero spend.
        now: the time the snapshot was taken at.
        key: the window every scope is summed over.
    """
    context = _Context(world, snapshot, now)
    out = []
    for budget in world.budgets:
        spend = context.spend(context.source(budget.spec.source).rs, key)
        o = budget.spec.outcome
        outcomes = (OutcomeQuery.key_of(o.metric, o.namespace_label, key)
                    if o is not None else None)
        for scope, namespaces in scopes(budget, context.namespaces):
            tokens, cost = 0.0, _ZERO
            if spend is not None:
                part = spend.total(namespaces, budget.spec.spend_matchers, None)
                tokens, cost = part.tokens, part.cost
            count = None
            if o is not None and outcomes is not None:
                count = _outcome_count(context, o, outcomes, namespaces)
            out.append(ScopeSpend(scope=scope, namespaces=namespaces, tokens=tokens, cost=cost,
                                  outcomes=count, cost_per_outcome=_per_outcome(cost, count)))
    return out


_OPERATORS = {api.MatchOperator.EQUAL: "=", api.MatchOperator.NOT_EQUAL: "!=",
              api.MatchOperator.REGEX: "=~", api.MatchOperator.NOT_REGEX: "!~"}


def _explain_unseen(decision: Decision, budget: api.Budget, context: _Context) -> Decision:
    """The decision, saying why its scope saw no series when the source returned some.

    Without it a source whose labels never name the scope's namespaces (the
    LiteLLM preset where ``team_alias`` is not the namespace) reads as a scope
    that has not spent yet, forever.
    """
    source = context.source(budget.spec.source)
    rs = source.rs
    sample = context.snapshot.returned.get(rs)
    if sample is None or not sample.series:
        return decision
    namespaces = decision.namespaces
    where = (f"namespace {namespaces[0]}" if len(namespaces) == 1
             else f"any of the namespaces {', '.join(namespaces)}")
    matchers = budget.spec.spend_matchers
    if matchers:
        inside: set[tuple[str, str, str]] = set()
        for lim in budget.spec.limits:
            spend = source.window(lim.window, lim.time_zone).spend
            if spend is not None:
                inside.update((s.namespace, s.workload, s.model)
                              for ns in namespaces for s in spend.by_ns.get(ns, ()))
        if inside:
            wanted = ", ".join(f'{m.label}{_OPERATORS[m.operator]}"{m.value}"' for m in matchers)
            return dataclasses.replace(decision, unmatched=(
                f"the {rs.preset} source returned {len(inside)} series for {where}; none "
                f"satisfies the spendMatchers {wanted}"))
    values = ", ".join(v or '""' for v in sample.values)
    if sample.more:
        values += f" and {sample.more} more"
    many = len(sample.values) + sample.more > 1
    return dataclasses.replace(decision, unmatched=(
        f"the {rs.preset} source returned {sample.series} series, their {sample.label} "
        f"{'values are' if many else 'value is'} {values}; none names {where}"))
