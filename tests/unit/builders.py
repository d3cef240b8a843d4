"""Builders for the unit tests: manifests as users write them, spend as sources report it.

Budgets are built from camelCase dicts, the way a manifest says them, so a
test reads like the YAML a user would write. Spend is built as
:class:`SpendSeries`, the way the Prometheus adapter hands it to the engine,
and keyed by the planner, so the engine is tested exactly as the operator
drives it.

The test catalog uses round prices so that costs can be checked by hand:

========= ========= ============ ============= ================ ===================
model     tier      input / 1M   output / 1M   cached input     equivalents
========= ========= ============ ============= ================ ===================
large     Frontier  10.00        30.00         5.00             medium, tiny
medium    Standard  1.00         3.00          (input price)    tiny
tiny      Economy   0.10         0.30          (input price)
========= ========= ============ ============= ================ ===================

Deliberately not here: assertions. Tests say what they expect themselves.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any

from token_budget.api import v1alpha1 as api
from token_budget.policy import engine, planner, sources
from token_budget.policy.catalog import Catalog
from token_budget.policy.decisions import Evaluation
from token_budget.policy.inputs import (
    BudgetKey,
    Memory,
    ScopeKey,
    SpendSeries,
    SpendSnapshot,
    Workload,
    WorkloadKey,
)

#: A Thursday at noon UTC, well inside November (no DST change, no month end).
NOW = dt.datetime(2025, 11, 20, 12, 0, tzinfo=dt.UTC)
AGENT = {"tokenbudget.io/agent": "true"}
NAMESPACE = "team-search"

CATALOG_BODY: dict[str, Any] = {
    "apiVersion": "tokenbudget.io/v1alpha1",
    "kind": "ModelCatalog",
    "metadata": {"name": "test-prices"},
    "spec": {
        "currency": "USD",
        "models": [
            {"name": "large", "tier": "Frontier", "aliases": ["vendor/large-*"],
             "pricing": {"input": "10.00", "output": "30.00", "cachedInput": "5.00"},
             "equivalents": ["medium", "tiny"]},
            {"name": "medium", "tier": "Standard", "aliases": ["vendor/medium-*"],
             "pricing": {"input": "1.00", "output": "3.00"},
             "equivalents": ["tiny"]},
            {"name": "tiny", "tier": "Economy",
             "pricing": {"input": "0.10", "output": "0.30"}},
        ],
    },
}


def catalog() -> Catalog:
    return Catalog([api.ModelCatalog.model_validate(CATALOG_BODY)])


def spec(**fields: Any) -> dict[str, Any]:
    """A TokenBudget spec: one 24h limit of 1000 tokens unless ``limits`` is given."""
    return {"limits": [{"window": "24h", "tokens": 1000}], **fields}


def token_budget(name: str = "search", namespace: str = NAMESPACE, **fields: Any
                 ) -> api.TokenBudget:
    """A TokenBudget from camelCase spec fields (``actions=[...]``, ``deniedTiers=[...]``)."""
    return api.TokenBudget.model_validate({
        "apiVersion": api.API_VERSION,
        "kind": "TokenBudget",
        "metadata": {"name": name, "namespace": namespace, "generation": 1},
        "spec": spec(**fields),
    })


def cluster_budget(name: str = "qa", *, selector: Mapping[str, str] | None = None,
                   scope: str = "PerNamespace", **fields: Any) -> api.ClusterTokenBudget:
    """A ClusterTokenBudget picking namespaces labelled ``environment=qa`` by default."""
    return api.ClusterTokenBudget.model_validate({
        "apiVersion": api.API_VERSION,
        "kind": "ClusterTokenBudget",
        "metadata": {"name": name, "generation": 1},
        "spec": {
            "namespaceSelector": {"matchLabels": dict(selector or {"environment": "qa"})},
            "limitScope": scope,
            **spec(**fields),
        },
    })


def series(tokens: float = 0, *, namespace: str = NAMESPACE, workload: str = "agent-0",
           model: str = "medium", output: float = 0, cached: float = 0,
           cost: str | None = None, **labels: str) -> SpendSeries:
    """One series; ``tokens`` are input tokens, extra keywords are Prometheus labels."""
    return SpendSeries(
        namespace=namespace, workload=workload, model=model,
        input_tokens=float(tokens), output_tokens=float(output),
        cached_input_tokens=float(cached),
        cost=Decimal(cost) if cost is not None else None,
        labels=tuple(sorted(labels.items())),
    )


def snapshot(budgets: Sequence[api.Budget], spend: Iterable[SpendSeries] = (), *,
             now: dt.datetime = NOW, per_window: Mapping[str, Iterable[SpendSeries]] | None = None,
             recent: Iterable[SpendSeries] = (), recent_seconds: int = 600,
             errors: Mapping[api.Preset, str] | None = None,
             outcomes: Mapping[str, Iterable[tuple[str, tuple[tuple[str, str], ...], float]]]
             | None = None,
             down: Mapping[sources.ResolvedSource, Mapping[str, str]] | None = None,
             ) -> SpendSnapshot:
    """The snapshot the adapter would build for these budgets' plan.

    ``spend`` is reported for every planned window; ``per_window`` overrides it
    for the windows it names (``"24h"``, ``"Day@UTC"``). ``errors`` marks a
    preset's source as unreadable.
    """
    plan = planner.plan(budgets, now, recent_seconds)
    everywhere = tuple(spend)
    named = {k: tuple(v) for k, v in (per_window or {}).items()}
    failed = {sources.resolve(api.SpendSource(preset=p)): msg for p, msg in (errors or {}).items()}
    return SpendSnapshot(
        taken_at=now,
        windows={(rs, key): named.get(str(key), everywhere)
                 for rs, key in plan.windows if rs not in failed},
        recent={rs: tuple(recent) for rs in plan.sources if rs not in failed},
        recent_seconds=recent_seconds,
        errors=failed,
        outcomes={k: tuple(v) for k, v in (outcomes or {}).items()},
        down=dict(down or {}),
    )


def workload(name: str = "agent", namespace: str = NAMESPACE, *, kind: str = "Deployment",
             labels: Mapping[str, str] | None = None, models: Sequence[str] = (),
             pods: int = 0) -> Workload:
    return Workload(WorkloadKey(kind, namespace, name),
                    dict(AGENT if labels is None else labels), tuple(models), settled_pods=pods)


def key(name: str = "agent", namespace: str = NAMESPACE, kind: str = "Deployment") -> WorkloadKey:
    return WorkloadKey(kind, namespace, name)


def memory(budget: api.Budget, state: api.State, *, namespace: str = "",
           seconds_ago: float | None = 60, now: dt.datetime = NOW) -> dict[ScopeKey, Memory]:
    """What the engine remembers of a budget's scope: its state and last good read."""
    last = now - dt.timedelta(seconds=seconds_ago) if seconds_ago is not None else None
    return {ScopeKey(BudgetKey.of(budget), namespace): Memory(state, last)}


def evaluate(budgets: Sequence[api.Budget], spend: Iterable[SpendSeries] = (), *,
             now: dt.datetime = NOW, workloads: Sequence[Workload] | None = None,
             namespaces: Mapping[str, Mapping[str, str]] | None = None,
             remembered: Mapping[ScopeKey, Memory] | None = None,
             snap: SpendSnapshot | None = None, **snapshot_args: Any) -> Evaluation:
    """Evaluate ``budgets`` at ``now``; one governed Deployment ``agent`` by default."""
    world = engine.World(
        budgets=list(budgets),
        catalog=catalog(),
        namespaces=dict(namespaces if namespaces is not None else {NAMESPACE: {}}),
        workloads=list(workloads if workloads is not None else [workload()]),
        memory=dict(remembered or {}),
    )
    if snap is None:
        snap = snapshot(budgets, spend, now=now, **snapshot_args)
    return engine.evaluate(world, snap, now)
