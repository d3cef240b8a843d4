"""One budget scope as the decision chain reads it (cert-manager's policy ``Input``)."""

from __future__ import annotations

from collections.abc import Callable

from token_budget.api import v1alpha1 as api
from token_budget.policy.context import Context
from token_budget.policy.inputs import ScopeKey, Workload
from token_budget.policy.pricing import Part


class Unknown(Exception):
    """Spend for a scope cannot be known (internal control flow only)."""


class ScopeInput:
    """A scope, its namespaces and governed workloads, and the evaluation's shared caches."""

    __slots__ = ("budget", "spec", "scope", "namespaces", "context", "catalog", "snapshot",
                 "governed", "spend_source", "source", "memory", "counted", "timed", "cost_keep")

    def __init__(self, budget: api.Budget, scope: ScopeKey, namespaces: tuple[str, ...],
                 context: Context, governed: list[Workload]) -> None:
        self.budget = budget
        self.spec: api.TokenBudgetSpec = budget.spec
        self.scope = scope
        self.namespaces = namespaces
        self.context = context
        self.catalog = context.catalog
        self.snapshot = context.snapshot
        self.governed = governed
        self.spend_source = context.source(self.spec.source)
        self.source = self.spend_source.rs
        memory = context.world.memory
        self.memory = memory.get(scope) if memory else None  # no ScopeKey hash when empty
        self.counted: list[Part] = []  # what each limit counted, for top_model()
        # Whether the decision read the time of evaluation other than through its windows'
        # bounds (a run-out, a pace, an exception's expiry, a Hold's age, retention):
        # then it holds for that instant only.
        self.timed = bool(self.spec.exceptions)
        # Which cost-source series (namespace, workload label) the scope counts; None:
        # all of its namespaces' (a partition counts those of its own workloads).
        self.cost_keep: Callable[[str, str], bool] | None = None
