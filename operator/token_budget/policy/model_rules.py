"""Model rules: which catalog models a budget allows, and what a model is rerouted to."""

from __future__ import annotations

from token_budget.api import v1alpha1 as api
from token_budget.api.types import pattern_matches
from token_budget.policy.catalog import Catalog


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

