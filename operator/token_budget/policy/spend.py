"""Spend of one (source, window): series by namespace, summed once per question.

A :class:`Spend` groups the series of one reading by namespace and keeps
each sum it makes per (namespace, spend matchers, model), so that a
TokenBudget and a PerNamespace ClusterTokenBudget of one namespace share it.
"""

from __future__ import annotations

import datetime as dt
import itertools
import operator
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence

from token_budget.api import v1alpha1 as api
from token_budget.policy.inputs import SpendSeries
from token_budget.policy.matchers import series_matches
from token_budget.policy.pricing import Part, Prices
from token_budget.policy.windows import WindowKey

Matchers = tuple[api.SpendMatcher, ...]


def _same(a: list[SpendSeries] | None, b: list[SpendSeries] | None) -> bool:
    """The same series in the same order, to the digit (a reported cost ``1.50`` is equal
    to ``1.5`` as a number, not in the sum's digits)."""
    if a is None or b is None:
        return a is b
    if len(a) != len(b):
        return False
    if all(map(operator.is_, a, b)):
        return True
    return a == b and all(x is y or x.cost is None or str(x.cost) == str(y.cost)
                          for x, y in zip(a, b, strict=True))


_Key = tuple[Matchers, str | None]
_Total = tuple[tuple[str, ...], Matchers, str | None]


class Spend:
    """The series of one (source, window), or of a source's burn rate, by namespace.

    Sums are made on first use per (namespace, spend matchers, model) and
    kept for every other scope that asks: a TokenBudget and a PerNamespace
    ClusterTokenBudget of one namespace share them. :meth:`following` builds
    the next reading's from this one, summing again only what changed.
    """

    def __init__(self, series: Sequence[SpendSeries], prices: Prices,
                 model_ok: Callable[[str, str], bool],
                 by_ns: dict[str, list[SpendSeries]] | None = None) -> None:
        if by_ns is None:
            grouped: defaultdict[str, list[SpendSeries]] = defaultdict(list)
            for s in series:
                grouped[s.namespace].append(s)
            by_ns = dict(grouped)
        self.by_ns = by_ns
        self.series = series
        self.prices = prices
        self.model_ok = model_ok
        self._positions: dict[str, list[int]] | None = None  # of each namespace's series
        self._chosen: dict[str, dict[Matchers, list[SpendSeries]]] = {}
        self._parts: dict[str, dict[_Key, Part]] = {}
        # Every sum asked for, by (namespaces, matchers, model): one lookup in the hot path.
        self._totals: dict[_Total, Part] = {}
        # The keys of those over several namespaces (a one-namespace key is its part's).
        self._joined: set[_Total] = set()
        # spec.partition: series by (matchers, label) and value, per namespace.
        self._groups: dict[str, dict[tuple[Matchers, str], dict[str, list[SpendSeries]]]] = {}

    def positions(self) -> dict[str, list[int]]:
        """Where each namespace's series are in the reading (made once, then carried)."""
        if self._positions is None:
            found: defaultdict[str, list[int]] = defaultdict(list)
            for i, s in enumerate(self.series):
                found[s.namespace].append(i)
            self._positions = dict(found)
        return self._positions

    def following(self, series: Sequence[SpendSeries]) -> tuple[Spend, set[str]]:
        """The spend of the next reading, with this one's sums of every namespace whose
        series are the same, and the namespaces whose series differ (appeared, vanished,
        changed or moved): only theirs are summed again.

        Series are compared by value, to the digit; the same objects compare at the
        cost of their identity. A reading of as many series, most of them the very
        objects of this one, each in its namespace, is not even grouped again.
        """
        old = self.series
        if series is old:
            changed: set[str] = set()
            after = Spend(series, self.prices, self.model_ok, self.by_ns)
            after._positions = self._positions
        else:
            after, changed = self._regrouped(series)
        after._chosen = self._chosen.copy()
        after._parts = self._parts.copy()
        after._groups = self._groups.copy()
        for ns in changed:
            after._chosen.pop(ns, None)
            after._parts.pop(ns, None)
            after._groups.pop(ns, None)
        # Only the sums that read a changed namespace go: a one-namespace one through the
        # namespace's parts, a join by its namespaces. Filtering every key instead was 14 %
        # of an evaluation handed the previous one (profiled, 10k budgets x 100k series,
        # 1 % of namespaces changed); this one is 0.88x of it side by side.
        after._totals = totals = self._totals.copy()
        after._joined = self._joined.copy()
        for ns in changed:
            for matchers, model in self._parts.get(ns, ()):
                totals.pop(((ns,), matchers, model), None)
        if changed:
            gone = [k for k in self._joined if not changed.isdisjoint(k[0])]
            after._joined.difference_update(gone)
            for k in gone:
                del totals[k]
        return after, changed

    def _regrouped(self, series: Sequence[SpendSeries]) -> tuple[Spend, set[str]]:
        old = self.series
        n = len(series)
        if len(old) == n:
            moved = list(itertools.compress(range(n), map(operator.is_not, old, series)))
            if len(moved) * 4 <= n and all(old[i].namespace == series[i].namespace
                                           for i in moved):
                positions = self.positions()
                by_ns = self.by_ns.copy()
                touched = {series[i].namespace for i in moved}
                for ns in touched:
                    by_ns[ns] = [series[i] for i in positions[ns]]
                after = Spend(series, self.prices, self.model_ok, by_ns)
                after._positions = positions
                return after, {ns for ns in touched if not _same(self.by_ns[ns], by_ns[ns])}
        after = Spend(series, self.prices, self.model_ok)
        before, now = self.by_ns, after.by_ns
        return after, {ns for ns in before.keys() | now.keys()
                       if not _same(before.get(ns), now.get(ns))}

    def chosen(self, ns: str, matchers: Matchers) -> Sequence[SpendSeries]:
        """The namespace's series that satisfy the spend matchers."""
        if not matchers:
            return self.by_ns.get(ns, ())
        by = self._chosen.get(ns)
        if by is None:
            by = self._chosen[ns] = {}
        found = by.get(matchers)
        if found is None:
            last = matchers[-1]
            if last.operator is api.MatchOperator.EQUAL:
                # One pass groups every value's series (a partition of spec.partition
                # asks for each value of its label in turn).
                found = by[matchers] = self.grouped(ns, matchers[:-1], last.label).get(
                    last.value, [])
            else:
                found = by[matchers] = [
                    s for s in self.by_ns.get(ns, ()) if series_matches(s, matchers)]
        return found

    def grouped(self, ns: str, matchers: Matchers, label: str
                ) -> dict[str, list[SpendSeries]]:
        """The namespace's series under the matchers by their value of ``label`` ("" when
        they lack it), each list in the reading's order: the series an Equal matcher on
        ``label`` picks, for every value at the cost of one pass."""
        by = self._groups.get(ns)
        if by is None:
            by = self._groups[ns] = {}
        found = by.get((matchers, label))
        if found is None:
            out: defaultdict[str, list[SpendSeries]] = defaultdict(list)
            for s in self.chosen(ns, matchers):
                out[s.label(label)].append(s)
            found = by[(matchers, label)] = dict(out)
        return found

    def seen(self, namespaces: Iterable[str], matchers: Matchers) -> bool:
        """Whether any series exists for the namespaces (whatever the model)."""
        for ns in namespaces:
            if (ns in self.by_ns) if not matchers else self.chosen(ns, matchers):
                return True
        return False

    def part(self, ns: str, matchers: Matchers, model: str | None) -> Part:
        by = self._parts.get(ns)
        if by is None:
            by = self._parts[ns] = {}
        found = by.get((matchers, model))
        if found is None:
            chosen = self.chosen(ns, matchers)
            if model is not None:
                ok = self.model_ok
                chosen = [s for s in chosen if ok(s.model, model)]
            found = by[(matchers, model)] = self.prices.sum(chosen)
        return found

    def total(self, namespaces: tuple[str, ...], matchers: Matchers, model: str | None
              ) -> Part:
        """Spend of the namespaces (in their order), as one sum over all their series."""
        key = (namespaces, matchers, model)
        found = self._totals.get(key)
        if found is None:
            if len(namespaces) == 1:
                found = self.part(namespaces[0], matchers, model)
            else:
                found = self.prices.join([self.part(ns, matchers, model) for ns in namespaces])
                self._joined.add(key)
            self._totals[key] = found
        return found


class Window:
    """One limit's window for one source: its bounds, and its spend (None: not read)."""

    __slots__ = ("key", "start", "resets", "spend", "span")

    def __init__(self, key: WindowKey, start: dt.datetime, resets: dt.datetime | None,
                 spend: Spend | None, now: dt.datetime) -> None:
        self.key = key
        self.start = start
        self.resets = resets
        self.spend = spend
        self.span = (now - start).total_seconds()  # seconds since the window started

