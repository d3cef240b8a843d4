"""What one evaluation works out once and every scope reads (caches per evaluation).

Indexes (namespaces by label, spend by source, window and namespace,
workloads and outcome rows by namespace) and what depends only on their
inputs and ``now``: resolved sources, window bounds, allowed models,
model-pattern matches, cheapest equivalents.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections import defaultdict
from decimal import Decimal

from token_budget.api import v1alpha1 as api
from token_budget.api.types import pattern_matches, utc
from token_budget.policy import (
    attribution,
    costs,
    ladders,
    model_rules,
    planner,
    sources,
    windows,
)
from token_budget.policy.inputs import SpendSnapshot, Workload
from token_budget.policy.pricing import Prices
from token_budget.policy.sources import ResolvedSource
from token_budget.policy.spend import Spend, Window
from token_budget.policy.windows import WindowKey
from token_budget.policy.world import NamespaceIndex, World

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

class Source:
    """A resolved spend source with what the snapshot holds for it."""

    def __init__(self, rs: ResolvedSource, context: Context, recent: Spend | None = None
                 ) -> None:
        self.rs = rs
        self.context = context
        self.error = context.snapshot.errors.get(rs)
        self.recent = recent if recent is not None else Spend(
            context.snapshot.recent.get(rs, ()), context.prices, context.model_ok)
        self._windows: dict[tuple[str, str, tuple[str, ...]], Window] = {}

    def window(self, window: str, time_zone: str, labels: tuple[str, ...] = ()) -> Window:
        """A window's spend as a budget reads it. ``labels``: the labels the budget needs
        (:func:`token_budget.policy.planner.needed_labels`); when the plan read the window
        apart for them (the rules do not keep one), that reading."""
        try:
            return self._windows[(window, time_zone, labels)]
        except KeyError:
            key = WindowKey.of(window, time_zone)
            if labels:
                apart = dataclasses.replace(key, labels=labels)
                snap = self.context.snapshot
                if (self.rs, apart) in snap.windows or (self.rs, apart) in snap.window_errors:
                    key = apart
            spend = self.context.spend(self.rs, key)
            # Bounds only for windows that were read, as before (an odd zone fails planning).
            start, resets = self.context.bounds(key) if spend is not None else (EPOCH, None)
            found = self._windows[(window, time_zone, labels)] = Window(
                key, start, resets, spend, self.context.now_utc)
            return found


Rows = list[tuple[str, tuple[tuple[str, str], ...], float]]


class Context:
    """What one evaluation works out once and every scope reads.

    Indexes (namespaces by label, spend by source, window and namespace,
    workloads and outcome rows by namespace) and what depends only on their
    inputs and ``now``: resolved sources, window bounds, allowed models,
    model-pattern matches, cheapest equivalents.
    """

    def __init__(self, world: World, snapshot: SpendSnapshot, now: dt.datetime,
                 before: Context | None = None) -> None:
        """``before``: the previous evaluation's context, of the same catalog and burn-rate
        span, whose indexes and sums are taken over where their inputs are the same."""
        self.world = world
        self.catalog = world.catalog
        self.snapshot = snapshot
        self.now = now
        self.now_utc = utc(now)
        same_ns = before is not None and (world.namespaces is before.world.namespaces
                                          or world.namespaces == before.world.namespaces)
        self.namespaces: NamespaceIndex = before.namespaces if before is not None and same_ns \
            else NamespaceIndex(world.namespaces)
        self.prices: Prices = before.prices if before is not None else Prices(world.catalog)
        self.recent_seconds = Decimal(max(1, snapshot.recent_seconds))
        self.costs = costs.Index(snapshot)  # cost sources' series (policy.costs)
        self.ungoverned = attribution.Ungoverned()
        self.workloads: defaultdict[str, list[Workload]] = defaultdict(list)
        for w in world.workloads:
            self.workloads[w.key.namespace].append(w)
        self._by_spec: dict[api.SpendSource, Source] = {}
        self._by_rs: dict[ResolvedSource, Source] = {}
        self._by_id: dict[int, tuple[api.SpendSource, Source]] = {}  # equal specs: one hash
        self._spend: dict[tuple[ResolvedSource, WindowKey], Spend | None] = {}
        self._bounds: dict[WindowKey, tuple[dt.datetime, dt.datetime | None]] = {}
        self._ladders: dict[int, tuple[tuple[api.Action, ...], list[api.Action]]] = {}
        self._labels: dict[int, tuple[api.TokenBudgetSpec, tuple[str, ...]]] = {}
        self._allowed: dict[tuple[object, ...], frozenset[str] | None] = {}
        self._model_ok: dict[tuple[str, str], bool] = {}
        self._cheapest: dict[tuple[str, frozenset[str] | None], str | None] = {}
        self._outcomes: dict[str, defaultdict[str, list[tuple[int, tuple[tuple[str, str], ...],
                                                              float]]]] = {}
        # Per source, the namespaces whose series differ from ``before``'s in any window
        # or in the burn rate (empty without ``before``: nothing to compare with).
        self.changed: dict[ResolvedSource, set[str]] = {}
        if before is not None:
            self._model_ok = before._model_ok
            self._allowed = before._allowed
            self._cheapest = before._cheapest
            self._carry(before)

    def _carry(self, before: Context) -> None:
        """Build every spend of the snapshot now, with ``before``'s sums where series match."""
        changed = self.changed
        for (rs, key), series in self.snapshot.windows.items():
            old = before.spend(rs, key)
            if old is None:
                continue
            self._spend[(rs, key)], moved = old.following(series)
            changed.setdefault(rs, set()).update(moved)
        for rs, series in self.snapshot.recent.items():
            old_source = before._by_rs.get(rs) or Source(rs, before)
            recent, moved = old_source.recent.following(series)
            self._by_rs[rs] = Source(rs, self, recent)
            changed.setdefault(rs, set()).update(moved)

    def source(self, spec: api.SpendSource) -> Source:
        same = self._by_id.get(id(spec))
        if same is not None and same[0] is spec:
            return same[1]
        found = self._by_spec.get(spec)
        if found is None:
            rs = sources.resolve(spec)
            found = self._by_rs.get(rs)
            if found is None:
                found = self._by_rs[rs] = Source(rs, self)
            self._by_spec[spec] = found
        self._by_id[id(spec)] = (spec, found)  # holds the spec: its id stays its own
        return found

    def ladder(self, spec: api.TokenBudgetSpec) -> list[api.Action]:
        """The budget's actions by threshold (one sort per actions tuple, not per scope)."""
        found = self._ladders.get(id(spec.actions))
        if found is None or found[0] is not spec.actions:
            found = self._ladders[id(spec.actions)] = (spec.actions, ladders.ladder(spec))
        return found[1]

    def needed_labels(self, spec: api.TokenBudgetSpec) -> tuple[str, ...]:
        """:func:`planner.needed_labels` of the spec (once per spec, not per scope)."""
        found = self._labels.get(id(spec))
        if found is None or found[0] is not spec:
            found = self._labels[id(spec)] = (spec, planner.needed_labels(spec))
        return found[1]

    def bounds(self, key: WindowKey) -> tuple[dt.datetime, dt.datetime | None]:
        """Where the window started and when it resets (None: rolling)."""
        found = self._bounds.get(key)
        if found is None:
            start, _ = windows.bounds(key, self.now)
            found = self._bounds[key] = (start, windows.resets_at(key, self.now))
        return found

    def spend(self, rs: ResolvedSource, key: WindowKey) -> Spend | None:
        """Spend over a window; None when the window was not read."""
        try:
            return self._spend[(rs, key)]
        except KeyError:
            series = self.snapshot.windows.get((rs, key))
            found = None if series is None else Spend(series, self.prices, self.model_ok)
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
            found = self._allowed[key] = model_rules.allowed_models(spec, self.catalog)
            return found

    def cheapest_equivalent(self, model: str, allowed: frozenset[str] | None) -> str | None:
        try:
            return self._cheapest[(model, allowed)]
        except KeyError:
            found = self._cheapest[(model, allowed)] = model_rules.cheapest_equivalent(
                model, allowed, self.catalog)
            return found

    def outcome_rows(self, key: str, namespaces: tuple[str, ...]) -> Rows | None:
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

