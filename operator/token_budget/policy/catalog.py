"""The merged model catalog: resolve reported model names, price tokens, find cheaper models.

Exporters name one model many ways (``gpt-4o``, ``openai/gpt-4o-2024-08-06``);
:meth:`Catalog.resolve` maps each to a catalog entry by canonical name first,
then by alias pattern, and caches the answer because the same few names recur
across tens of thousands of series.
"""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal

from token_budget.api import v1alpha1 as api
from token_budget.api.types import pattern_matches

MILLION = Decimal(1_000_000)


class Catalog:
    """All ModelCatalogs merged; when two define one name, the first (by object name) wins."""

    def __init__(self, catalogs: Iterable[api.ModelCatalog] = ()) -> None:
        self.models: dict[str, api.CatalogModel] = {}
        self.currency = "USD"
        # The rate-limit trigger of budgets that set none: the first catalog's that has one.
        self.rate_limit: api.RateLimitTrigger | None = None
        # Cost sources applied to every budget (policy.costs); the first by name wins too.
        shared: dict[str, api.CostSource] = {}
        for cat in sorted(catalogs, key=lambda c: c.metadata.name):
            self.currency = cat.spec.currency
            self.rate_limit = self.rate_limit or cat.spec.rate_limit
            for m in cat.spec.models:
                self.models.setdefault(m.name, m)
            for c in cat.spec.cost_sources:
                shared.setdefault(c.name, c)
        self.cost_sources: tuple[api.CostSource, ...] = tuple(shared.values())
        self._lower = {name.lower(): m for name, m in self.models.items()}
        self._cache: dict[str, api.CatalogModel | None] = {}

    def resolve(self, reported: str) -> api.CatalogModel | None:
        """The catalog entry for a model name as an exporter reports it, or None."""
        try:
            return self._cache[reported]
        except KeyError:
            pass
        found = self._lower.get(reported.lower())
        if found is None:
            found = next(
                (m for m in self.models.values()
                 if any(pattern_matches(a, reported) for a in m.aliases)),
                None,
            )
        if found is None and "/" in reported:
            # "openai/gpt-4o" when the catalog says "gpt-4o": providers prefix their names.
            found = self._lower.get(reported.rsplit("/", 1)[1].lower())
        self._cache[reported] = found
        return found

    def canonical(self, reported: str) -> str:
        m = self.resolve(reported)
        return m.name if m is not None else reported

    def cost(self, reported: str, input_tokens: float, output_tokens: float,
             cached_input_tokens: float) -> Decimal | None:
        """List-price cost of tokens on a model; None when the model has no price here."""
        m = self.resolve(reported)
        if m is None:
            return None
        p = m.pricing
        cached_price = p.cached_input if p.cached_input is not None else p.input
        total = (
            Decimal(round(input_tokens)) * p.input
            + Decimal(round(output_tokens)) * p.output
            + Decimal(round(cached_input_tokens)) * cached_price
        )
        return total / MILLION

    def unit_price(self, name: str) -> Decimal:
        """A model's price for ordering (input + output per million); unknown models sort last."""
        m = self.models.get(name)
        if m is None:
            return Decimal("Infinity")
        return m.pricing.input + m.pricing.output
