"""Spend of one (source, window): series by namespace, summed once per question.

A :class:`Spend` groups the series of one reading by namespace and keeps
each sum it makes per (namespace, spend matchers, model), so that a
TokenBudget and a PerNamespace ClusterTokenBudget of one namespace share it.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence

from token_budget.api import v1alpha1 as api
from token_budget.policy.inputs import SpendSeries
from token_budget.policy.matchers import series_matches
from token_budget.policy.pricing import Part, Prices
from token_budget.policy.windows import WindowKey

Matchers = tuple[api.SpendMatcher, ...]



class Spend:
    """The series of one (source, window), or of a source's burn rate, by namespace.

    Sums are made on first use per (namespace, spend matchers, model) and
    kept for every other scope that asks: a TokenBudget and a PerNamespace
    ClusterTokenBudget of one namespace share them.
    """

    def __init__(self, series: Iterable[SpendSeries], prices: Prices,
                 model_ok: Callable[[str, str], bool]) -> None:
        by_ns: defaultdict[str, list[SpendSeries]] = defaultdict(list)
        for s in series:
            by_ns[s.namespace].append(s)
        self.by_ns = dict(by_ns)
        self.prices = prices
        self.model_ok = model_ok
        self._chosen: dict[tuple[str, Matchers], list[SpendSeries]] = {}
        self._parts: dict[tuple[str, Matchers, str | None], Part] = {}
        self._totals: dict[tuple[tuple[str, ...], Matchers, str | None], Part] = {}

    def chosen(self, ns: str, matchers: Matchers) -> Sequence[SpendSeries]:
        """The namespace's series that satisfy the spend matchers."""
        if not matchers:
            return self.by_ns.get(ns, ())
        try:
            return self._chosen[(ns, matchers)]
        except KeyError:
            found = self._chosen[(ns, matchers)] = [
                s for s in self.by_ns.get(ns, ()) if series_matches(s, matchers)]
            return found

    def seen(self, namespaces: Iterable[str], matchers: Matchers) -> bool:
        """Whether any series exists for the namespaces (whatever the model)."""
        for ns in namespaces:
            if (ns in self.by_ns) if not matchers else self.chosen(ns, matchers):
                return True
        return False

    def part(self, ns: str, matchers: Matchers, model: str | None) -> Part:
        try:
            return self._parts[(ns, matchers, model)]
        except KeyError:
            chosen = self.chosen(ns, matchers)
            if model is not None:
                ok = self.model_ok
                chosen = [s for s in chosen if ok(s.model, model)]
            found = self._parts[(ns, matchers, model)] = self.prices.sum(chosen)
            return found

    def total(self, namespaces: tuple[str, ...], matchers: Matchers, model: str | None
              ) -> Part:
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

