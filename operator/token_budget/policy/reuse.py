"""What of the previous evaluation still holds: decisions of scopes whose inputs are the same.

An evaluation handed the previous one (``engine.evaluate(..., previous=...)``)
takes over a scope's decision when everything the decision read is the same:

* the budget's spec (the same object, or equal to the digit) and the scope's namespaces;
* the series of those namespaces in every window and in the burn rate of the
  budget's source (:meth:`Spend.carry`), and what the snapshot says of that
  source (errors, targets down, gaps, windows not read, what it returned);
* the workloads of those namespaces, the scope's memory, the catalog, the
  burn-rate span, the retention, the outcome counters (for a budget with one),
  the 429 counts of those namespaces (for a budget with the rate-limit trigger on:
  counts that move elsewhere, or for budgets without it, change nothing);
* the time of evaluation: the same instant, or, for a decision that read the
  time only through its windows' bounds, bounds that are the same (a calendar
  window within one period; a rolling window moves with every instant).

Anything else is decided anew, and spend sums of unchanged namespaces are
taken over even then: only what changed is summed again. tests/unit/
test_engine_reuse.py holds every evaluation handed a previous one to a fresh
evaluation of the same inputs, to the digit, over random worlds and changes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from token_budget.api import v1alpha1 as api
from token_budget.api.types import utc
from token_budget.policy.catalog import Catalog
from token_budget.policy.context import Context
from token_budget.policy.decisions import Decision, Directive
from token_budget.policy.inputs import BudgetKey, ScopeKey, SpendSnapshot, WorkloadKey
from token_budget.policy.ratesources import RateSample, RateSource
from token_budget.policy.ratesources import resolve as rate_source
from token_budget.policy.sources import ResolvedSource
from token_budget.policy.windows import WindowKey
from token_budget.policy.world import World

Scopes = list[tuple[ScopeKey, tuple[str, ...]]]


class Kept(NamedTuple):
    """A scope's decision, and whether it read the time other than through window bounds."""

    decision: Decision
    timed: bool


class Entry:
    """A budget as an evaluation saw it: its scopes, its limits' windows, their decisions."""

    __slots__ = ("budget", "_key", "scopes", "_windows", "rs", "kept")

    def __init__(self, budget: api.Budget, scopes: Scopes, rs: ResolvedSource,
                 before: Entry | None = None) -> None:
        self.budget = budget
        self.scopes = scopes
        self.rs = rs  # its source, resolved
        self.kept: list[Kept] = []  # one per scope, in order
        # Made when first asked for (most evaluations never ask), or the same as before.
        self._key: BudgetKey | None = before._key if before is not None else None
        self._windows: tuple[WindowKey, ...] | None = \
            before._windows if before is not None else None

    @property
    def key(self) -> BudgetKey:
        if self._key is None:
            self._key = BudgetKey.of(self.budget)
        return self._key

    @property
    def windows(self) -> tuple[WindowKey, ...]:
        """The windows of its limits."""
        if self._windows is None:
            self._windows = tuple(WindowKey.of(lim.window, lim.time_zone)
                                  for lim in self.budget.spec.limits)
        return self._windows


@dataclass
class Memo:
    """What an evaluation keeps for the next one (``Evaluation.memo``)."""

    world: World
    snapshot: SpendSnapshot
    now: dt.datetime
    context: Context
    entries: list[Entry] = field(default_factory=list)  # in the order of the budgets
    per_workload: dict[WorkloadKey, list[Directive]] = field(default_factory=dict)
    merged: dict[WorkloadKey, Directive] = field(default_factory=dict)
    loop: list[Decision] = field(default_factory=list)  # in the order of budgets and scopes
    held: set[WorkloadKey] = field(default_factory=set)
    # Where each decision, in the order of budgets and scopes, went in the sorted result.
    order: list[int] = field(default_factory=list)
    _by_id: dict[int, Entry] | None = None
    _by_key: dict[BudgetKey, Entry] | None = None

    def by_id(self, budget: api.Budget) -> Entry | None:
        """The entry of this very budget object (an entry keeps its budget: ids hold)."""
        if self._by_id is None:
            self._by_id = {id(e.budget): e for e in self.entries}
        found = self._by_id.get(id(budget))
        return found if found is not None and found.budget is budget else None

    def by_key(self, key: BudgetKey) -> Entry | None:
        if self._by_key is None:
            self._by_key = {e.key: e for e in self.entries}
        return self._by_key.get(key)


def same_catalog(a: Catalog, b: Catalog) -> bool:
    """Whether two catalogs price and resolve every name alike, prices to the digit
    (``10.00`` and ``10.0`` are equal numbers and give costs of other exponents)."""
    return a is b or (a.currency == b.currency
                      and repr(list(a.models.items())) == repr(list(b.models.items())))


def same_budget(a: api.Budget, b: api.Budget) -> bool:
    """The same object, or (for budgets of one key) the same spec to the digit (an equal
    Decimal may have other digits). A decision reads a budget's kind, name, namespace and
    spec, never its status or the rest of its metadata: a status write changes nothing."""
    return a is b or (type(a) is type(b) and a.spec == b.spec and repr(a.spec) == repr(b.spec))


def usable(memo: Memo, world: World, snapshot: SpendSnapshot) -> bool:
    """Whether anything of ``memo`` can hold: the same catalog, burn-rate span, retention."""
    old = memo.snapshot
    return (same_catalog(world.catalog, memo.world.catalog)
            and snapshot.recent_seconds == old.recent_seconds
            and snapshot.retention_seconds == old.retention_seconds
            # The catalog's rate-limit trigger is every budget's default: changed, every
            # scope is decided anew. (Other 429 counts: see Reuse.rate_moved.)
            and world.catalog.rate_limit == memo.world.catalog.rate_limit
            # The catalog's cost sources apply to every budget (policy.costs).
            and world.catalog.cost_sources == memo.world.catalog.cost_sources)


_RateKey = tuple[RateSource, int]


def rate_moved(old: SpendSnapshot, new: SpendSnapshot) -> dict[_RateKey, set[str] | None]:
    """Per (rate source, window): the namespaces whose 429 counts differ, None for all.

    A key whose reading failed, came back, or failed otherwise moves every namespace;
    a reading both times moves the namespaces whose samples differ (in value or order).
    """
    moved: dict[_RateKey, set[str] | None] = {}
    keys = (old.rate_limits.keys() | new.rate_limits.keys()
            | old.rate_limit_errors.keys() | new.rate_limit_errors.keys())
    for key in keys:
        a, b = old.rate_limits.get(key), new.rate_limits.get(key)
        if old.rate_limit_errors.get(key) != new.rate_limit_errors.get(key) \
                or (a is None) != (b is None):
            moved[key] = None
        elif a is not None and b is not None and a != b:
            by_a, by_b = _by_namespace(a), _by_namespace(b)
            moved[key] = {ns for ns in by_a.keys() | by_b.keys()
                          if by_a.get(ns) != by_b.get(ns)}
    return moved


def _by_namespace(samples: Sequence[RateSample]) -> dict[str, list[RateSample]]:
    out: dict[str, list[RateSample]] = {}
    for sample in samples:
        out.setdefault(sample.namespace, []).append(sample)
    return out


def _by_source(m: Mapping[tuple[ResolvedSource, WindowKey], object]
               ) -> dict[ResolvedSource, dict[WindowKey, object]]:
    out: dict[ResolvedSource, dict[WindowKey, object]] = {}
    for (rs, key), value in m.items():
        out.setdefault(rs, {})[key] = value
    return out


def stale_sources(old: SpendSnapshot, new: SpendSnapshot) -> set[ResolvedSource]:
    """Sources of which the snapshot says something else than before, besides series."""
    stale = set()
    old_windows, new_windows = _by_source(old.windows), _by_source(new.windows)
    keyed = [(_by_source(old.window_errors), _by_source(new.window_errors)),
             (_by_source(old.gaps), _by_source(new.gaps))]
    every = (old_windows.keys() | new_windows.keys() | old.recent.keys() | new.recent.keys()
             | old.errors.keys() | new.errors.keys() | old.down.keys() | new.down.keys()
             | old.returned.keys() | new.returned.keys())
    for a, b in keyed:
        every |= a.keys() | b.keys()
    for rs in every:
        if (old_windows.get(rs, {}).keys() != new_windows.get(rs, {}).keys()
                or (rs in old.recent) != (rs in new.recent)
                or old.errors.get(rs) != new.errors.get(rs)
                or old.down.get(rs) != new.down.get(rs)
                or old.returned.get(rs) != new.returned.get(rs)
                or any(a.get(rs) != b.get(rs) for a, b in keyed)):
            stale.add(rs)
    return stale


class Reuse:
    """Answers, per budget and scope, whether the previous evaluation's answer still holds."""

    def __init__(self, memo: Memo, world: World, snapshot: SpendSnapshot, now: dt.datetime,
                 context: Context) -> None:
        self.memo = memo
        self.context = context
        before = memo.context
        self.same_namespaces = (world.namespaces is memo.world.namespaces
                                or world.namespaces == memo.world.namespaces)
        self.same_memory = world.memory is memo.world.memory
        self.same_now = utc(now) == utc(memo.now)
        self.same_outcomes = (snapshot.outcomes == memo.snapshot.outcomes
                              and snapshot.outcome_errors == memo.snapshot.outcome_errors)
        # Cost sources' series are not tracked per namespace: when any moved, no budget
        # with cost sources keeps its decision (the others still do).
        self.same_costs = (snapshot.costs == memo.snapshot.costs
                           and snapshot.cost_errors == memo.snapshot.cost_errors
                           and snapshot.cost_namespace_errors
                           == memo.snapshot.cost_namespace_errors)
        self.stale = stale_sources(memo.snapshot, snapshot)
        new_w, old_w = context.workloads, before.workloads
        self.moved = {ns for ns in new_w.keys() | old_w.keys()
                      if new_w.get(ns, []) != old_w.get(ns, [])}
        # 429 counts that changed: decisions of scopes whose budget has the rate-limit
        # trigger on and reads them are decided anew, every other decision can hold.
        self.rate_moved = rate_moved(memo.snapshot, snapshot)
        self._rate_key: dict[int, tuple[api.TokenBudgetSpec, _RateKey | None]] = {}
        self._bounds_same: dict[WindowKey, bool] = {}
        self._of_source: dict[int, tuple[ResolvedSource, bool, set[str] | None]] = {}

    def entry(self, budget: api.Budget) -> Entry | None:
        """The budget's entry of the previous evaluation, when the budget is the same."""
        found = self.memo.by_id(budget)
        if found is not None:
            return found
        found = self.memo.by_key(BudgetKey.of(budget))
        return found if found is not None and same_budget(found.budget, budget) else None

    def holds(self, kept: Kept, entry: Entry, scope: ScopeKey, namespaces: tuple[str, ...],
              rs: ResolvedSource) -> bool:
        """Whether a scope's kept decision holds (its budget and namespaces are the same)."""
        found = self._of_source.get(id(rs))
        if found is None or found[0] is not rs:  # a ResolvedSource hashes a dozen fields
            found = self._of_source[id(rs)] = (rs, rs in self.stale, self.context.changed.get(rs))
        _, stale, changed = found
        if stale:
            return False
        if changed and not changed.isdisjoint(namespaces):
            return False
        if self.moved and not self.moved.isdisjoint(namespaces):
            return False
        if not self.same_memory and \
                self.context.world.memory.get(scope) != self.memo.world.memory.get(scope):
            return False
        if not self.same_memory and scope.partition is not None:  # ratelimits.remembered
            parent = ScopeKey(scope.budget, scope.namespace)
            if self.context.world.memory.get(parent) != self.memo.world.memory.get(parent):
                return False
        if entry.budget.spec.outcome is not None and not self.same_outcomes:
            return False
        if self.rate_moved and self._rate_moved(entry.budget.spec, namespaces):
            return False
        if not self.same_costs and (entry.budget.spec.cost_sources
                                    or self.context.catalog.cost_sources):
            return False
        return self.same_now or (not kept.timed and self._bounds_hold(rs, entry.windows))

    def _rate_moved(self, spec: api.TokenBudgetSpec, namespaces: tuple[str, ...]) -> bool:
        """Whether the 429 counts the budget's rate-limit trigger reads moved for the scope."""
        found = self._rate_key.get(id(spec))
        if found is None or found[0] is not spec:
            trigger = spec.rate_limit if spec.rate_limit is not None \
                else self.context.catalog.rate_limit
            rs = rate_source(spec.source) if trigger is not None else None
            key = (rs, trigger.window_seconds) if rs is not None and trigger is not None \
                else None
            found = self._rate_key[id(spec)] = (spec, key)
        key = found[1]
        if key is None or key not in self.rate_moved:
            return False
        moved = self.rate_moved[key]
        return moved is None or not moved.isdisjoint(namespaces)

    def _bounds_hold(self, rs: ResolvedSource, keys: Sequence[WindowKey]) -> bool:
        for key in keys:
            if (rs, key) not in self.context.snapshot.windows:
                continue  # not read: the decision used no bounds of it
            same = self._bounds_same.get(key)
            if same is None:
                same = self._bounds_same[key] = \
                    self.context.bounds(key) == self.memo.context.bounds(key)
            if not same:
                return False
        return True
