"""The world an evaluation reads, and the scopes of a budget in it.

A :class:`World` is everything but spend: budgets, the catalog, namespaces
with their labels, workloads, and what the engine remembers per scope. A
budget has scopes (:func:`scopes`): a TokenBudget one, a Shared
ClusterTokenBudget one over every namespace it picks, a PerNamespace
ClusterTokenBudget one per namespace; :class:`NamespaceIndex` makes a selector
cost what it picks rather than every namespace.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from token_budget.api import v1alpha1 as api
from token_budget.api.types import LabelSelector, SelectorOperator
from token_budget.policy.catalog import Catalog
from token_budget.policy.inputs import BudgetKey, Memory, ScopeKey, Workload


@dataclass(frozen=True)
class World:
    """Everything but spend: the desired state and the cluster as it is."""

    budgets: Sequence[api.Budget]
    catalog: Catalog = field(default_factory=Catalog)
    namespaces: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    workloads: Sequence[Workload] = ()
    memory: Mapping[ScopeKey, Memory] = field(default_factory=dict)




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

