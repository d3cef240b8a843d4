"""The pricing kernel: tokens and cost of series, in exact integers.

A scope's cost is the Decimal sum of :meth:`Catalog.cost` over its series in
snapshot order; :class:`Prices` finds that very Decimal (digits and exponent)
with integer arithmetic, and falls back to summing Decimals one by one where
the integers would not be exact.
"""

from __future__ import annotations

import decimal
import functools
import operator
from collections.abc import Iterable, Sequence
from decimal import Decimal

from token_budget.api import v1alpha1 as api
from token_budget.policy.catalog import Catalog
from token_budget.policy.inputs import SpendSeries

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


class Part:
    """Spend of some series: tokens (a float sum in their order) and cost."""

    __slots__ = ("series", "tokens", "cost", "unpriced", "exact", "rates", "pieces")

    def __init__(self, series: Sequence[SpendSeries], tokens: float, cost: Decimal,
                 unpriced: frozenset[str], exact: tuple[int, int] | None) -> None:
        self.series = series
        self.tokens = tokens
        self.cost = cost
        self.unpriced = unpriced
        self.exact = exact  # (numerator, exponent) of the cost; None: summed as Decimals
        self.rates: tuple[Decimal, Decimal] | None = None  # per second, once asked for
        # The parts this one joins (:meth:`Prices.join`), each of one namespace's series;
        # None: not a join (the series of one namespace, or of none).
        self.pieces: Sequence[Part] | None = None

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


class Prices:
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

    def _one_by_one(self, series: Sequence[SpendSeries]) -> Part:
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
        return Part(series, tokens, cost, frozenset(unpriced), None)

    def sum(self, series: Sequence[SpendSeries]) -> Part:
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
        return Part(series, tokens, cost, frozenset(unpriced) if unpriced else _NO_MODELS,
                     (numerator, exponent))

    def join(self, parts: Sequence[Part]) -> Part:
        """Parts as one, as if their series had been summed in one go."""
        joined = self._joined(parts)
        joined.pieces = parts
        return joined

    def _joined(self, parts: Sequence[Part]) -> Part:
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
        return Part(series, tokens, cost, frozenset().union(*(p.unpriced for p in parts)),
                     (numerator, exponent))
