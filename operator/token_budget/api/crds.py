"""Generate the CustomResourceDefinitions from the pydantic models.

The models' JSON schema is turned into a structural OpenAPI v3 schema: ``$ref``
inlined, ``anyOf [X, null]`` folded into ``X``, titles dropped, tuples as
arrays. What pydantic cannot express (printer columns, subresources, scope) is
added here. ``tokenbudget crds`` prints the result and ``make crds`` writes it
to ``crds/``; a unit test fails when the committed files drift from the models.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

from token_budget.api import v1alpha1 as api

_DROP = {"title", "discriminator"}


def _no_nulls(value: Any) -> Any:
    """Defaults as the API server wants them: no null members (it type-checks defaults)."""
    if isinstance(value, dict):
        return {k: _no_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_no_nulls(v) for v in value]
    return value


def _structural(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in schema:
        target = defs[schema["$ref"].split("/")[-1]]
        merged = {**copy.deepcopy(target), **{k: v for k, v in schema.items() if k != "$ref"}}
        return _structural(merged, defs)
    out: dict[str, Any] = {}
    if "anyOf" in schema:
        options = [o for o in schema["anyOf"] if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot make a structural schema of anyOf {schema['anyOf']}")
        inner = _structural(options[0], defs)
        rest = {k: v for k, v in schema.items() if k not in ("anyOf", "default")}
        out = {**inner, **_structural(rest, defs)}
        if schema.get("default") is not None:
            out["default"] = _no_nulls(schema["default"])
        return out
    for key, value in schema.items():
        if key in _DROP or key == "$defs":
            continue
        if key == "properties":
            out["properties"] = {k: _structural(v, defs) for k, v in value.items()}
        elif key == "items":
            out["items"] = _structural(value, defs)
        elif key == "additionalProperties" and isinstance(value, dict):
            out["additionalProperties"] = _structural(value, defs)
        elif key == "additionalProperties":
            continue  # extra="forbid": structural schemas prune unknown fields anyway
        elif key == "prefixItems":
            raise ValueError("fixed-length tuples cannot be expressed in a CRD schema")
        elif key == "default" and value in ((), []):
            continue  # an empty default adds nothing but noise to the schema
        elif key == "default":
            out["default"] = _no_nulls(value)
        else:
            out[key] = value
    return out


def schema_of(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI schema of a model, as used under ``spec``/``status``."""
    raw = model.model_json_schema(by_alias=True, mode="serialization")
    return _structural(raw, raw.get("$defs", {}))


_BUDGET_COLUMNS = [
    {"name": "State", "type": "string", "jsonPath": ".status.state"},
    {"name": "Spend", "type": "string", "jsonPath": ".status.spend"},
    {"name": "Limit", "type": "string", "jsonPath": ".status.limit"},
    {"name": "Used", "type": "integer", "jsonPath": ".status.usedPercent",
     "description": "Percent of the most used window's limit."},
    {"name": "Run-out", "type": "date", "jsonPath": ".status.projectedRunOutTime", "priority": 1},
    {"name": "Ready", "type": "string",
     "jsonPath": '.status.conditions[?(@.type=="Ready")].status', "priority": 1},
    {"name": "Partitions", "type": "integer", "jsonPath": ".status.partitions.count",
     "description": "spec.partition: how many partitions were evaluated.", "priority": 1},
    {"name": "Blocked", "type": "integer", "jsonPath": ".status.partitions.blocked",
     "description": "spec.partition: how many partitions are Blocked (State is the "
     "unpartitioned spend's).", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

_KINDS: list[dict[str, Any]] = [
    {
        "kind": "ModelCatalog", "plural": "modelcatalogs", "singular": "modelcatalog",
        "scope": "Cluster", "short": ["mcat"],
        "spec": api.ModelCatalogSpec, "status": api.ModelCatalogStatus,
        "columns": [
            {"name": "Models", "type": "integer", "jsonPath": ".status.models"},
            {"name": "Currency", "type": "string", "jsonPath": ".spec.currency"},
            {"name": "Ready", "type": "string",
             "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
        "doc": "ModelCatalog lists LLM models, their tiers, prices per million tokens and "
        "cheaper equivalents.",
    },
    {
        "kind": "TokenBudget", "plural": "tokenbudgets", "singular": "tokenbudget",
        "scope": "Namespaced", "short": ["tb"],
        "spec": api.TokenBudgetSpec, "status": api.BudgetStatus, "columns": _BUDGET_COLUMNS,
        "doc": "TokenBudget caps a namespace's LLM token spend over windows and enforces a "
        "ladder of actions (Warn, Reroute, Throttle, Block) on its agent workloads.",
    },
    {
        "kind": "ClusterTokenBudget", "plural": "clustertokenbudgets",
        "singular": "clustertokenbudget", "scope": "Cluster", "short": ["ctb"],
        "spec": api.ClusterTokenBudgetSpec, "status": api.BudgetStatus,
        "columns": _BUDGET_COLUMNS,
        "doc": "ClusterTokenBudget is a TokenBudget for every namespace a label selector picks "
        "(an environment such as environment=qa), per namespace or as one shared pool.",
    },
]


def crd(kind: str) -> dict[str, Any]:
    """The CustomResourceDefinition of one kind."""
    info = next(k for k in _KINDS if k["kind"] == kind)
    spec_schema = schema_of(info["spec"])
    spec_schema["description"] = (info["spec"].__doc__ or "").strip() or "Desired state."
    status_schema = schema_of(info["status"])
    status_schema["description"] = "Observed state, written by the operator."
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{info['plural']}.{api.GROUP}"},
        "spec": {
            "group": api.GROUP,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": info["plural"],
                "singular": info["singular"],
                "shortNames": info["short"],
                "categories": ["tokenbudget"],
            },
            "scope": info["scope"],
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": info["columns"],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": info["doc"],
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                }
            ],
        },
    }


def all_crds() -> dict[str, dict[str, Any]]:
    """File name -> CRD, for ``crds/``."""
    return {f"{api.GROUP}_{k['plural']}.yaml": crd(k["kind"]) for k in _KINDS}
