"""The CustomResourceDefinitions: generated from the models, committed, acceptable to Kubernetes.

Covers:
- the committed ``crds/*.yaml`` equal what ``token_budget.api.crds.all_crds()``
  generates (drift test: the message says to run ``make crds``);
- every schema is structural: no ``$ref``/``$defs``/``anyOf``/``oneOf``/
  ``allOf``/``not``, no ``type: null``, a type on every node, items on every
  array;
- defaults hold no ``null`` and no undeclared field (the API server validates
  defaults against the schema and would refuse the CRD);
- the budget kinds print State, Spend, Limit, Used and Age; the status
  subresource is on; conditions are a list map keyed by a required ``type``;
- every field of every model is a property of the CRD schema, and every
  pydantic field description is that property's description (``kubectl
  explain`` shows the same text as the code);
- the cross-field CEL rules are present where the models enforce them.
"""

from __future__ import annotations

import types as pytypes
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

from token_budget.api import crds, types
from token_budget.api import v1alpha1 as api

REPO = Path(__file__).resolve().parents[2]
GENERATED = crds.all_crds()
KINDS = {body["spec"]["names"]["kind"]: body for body in GENERATED.values()}
BUDGET_KINDS = ["TokenBudget", "ClusterTokenBudget"]
MODELS: dict[str, tuple[type[pydantic.BaseModel], type[pydantic.BaseModel]]] = {
    "ModelCatalog": (api.ModelCatalogSpec, api.ModelCatalogStatus),
    "TokenBudget": (api.TokenBudgetSpec, api.BudgetStatus),
    "ClusterTokenBudget": (api.ClusterTokenBudgetSpec, api.BudgetStatus),
}
FORBIDDEN_KEYWORDS = {"$ref", "$defs", "definitions", "anyOf", "oneOf", "allOf", "not",
                      "prefixItems", "title"}


def _root(kind: str) -> dict[str, Any]:
    schema: dict[str, Any] = KINDS[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def _nodes(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path or "(root)", schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from _nodes(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _nodes(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _nodes(schema["additionalProperties"], f"{path}{{}}")


def _all_nodes() -> Iterator[tuple[str, dict[str, Any]]]:
    for kind in KINDS:
        for path, node in _nodes(_root(kind)):
            yield f"{kind}{path}", node


# ---------------------------------------------------------------------------
# Drift
# ---------------------------------------------------------------------------


def test_there_is_one_committed_crd_per_kind() -> None:
    assert sorted(p.name for p in (REPO / "crds").glob("*.yaml")) == sorted(GENERATED)
    assert set(KINDS) == {"ModelCatalog", "TokenBudget", "ClusterTokenBudget"}


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_the_committed_crd_equals_the_one_generated_from_the_models(name: str) -> None:
    committed = yaml.safe_load((REPO / "crds" / name).read_text())
    assert committed == GENERATED[name], (
        f"crds/{name} is out of date with the API models in token_budget/api: run `make crds` "
        "(or `tokenbudget crds --out-dir crds`) and commit the result"
    )


# ---------------------------------------------------------------------------
# Structural schemas
# ---------------------------------------------------------------------------


def test_no_schema_node_uses_a_keyword_structural_schemas_forbid() -> None:
    bad = [(path, sorted(FORBIDDEN_KEYWORDS & set(node))) for path, node in _all_nodes()
           if FORBIDDEN_KEYWORDS & set(node)]
    assert bad == []


def test_every_schema_node_has_a_type_and_none_is_null() -> None:
    untyped = [path for path, node in _all_nodes()
               if "type" not in node and not node.get("x-kubernetes-int-or-string")]
    nulls = [path for path, node in _all_nodes() if node.get("type") == "null"]
    assert (untyped, nulls) == ([], [])


def test_objects_say_object_and_arrays_say_what_they_hold() -> None:
    for path, node in _all_nodes():
        if "properties" in node or "additionalProperties" in node:
            assert node["type"] == "object", path
        if node.get("type") == "array":
            assert isinstance(node.get("items"), dict) and "type" in node["items"], path


def _has_null(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, dict):
        return any(_has_null(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_null(v) for v in value)
    return False


def _undeclared(value: Any, schema: dict[str, Any], path: str) -> list[str]:
    if isinstance(value, dict) and "properties" in schema:
        out = [f"{path}.{k}" for k in value if k not in schema["properties"]]
        for k, v in value.items():
            if k in schema["properties"]:
                out += _undeclared(v, schema["properties"][k], f"{path}.{k}")
        return out
    if isinstance(value, list) and "items" in schema:
        return [p for i, v in enumerate(value)
                for p in _undeclared(v, schema["items"], f"{path}[{i}]")]
    return []


def test_no_default_holds_null_which_the_api_server_would_refuse() -> None:
    assert [path for path, node in _all_nodes() if "default" in node
            and _has_null(node["default"])] == []


def test_defaults_hold_only_fields_the_schema_declares() -> None:
    found = [p for path, node in _all_nodes() if "default" in node
             for p in _undeclared(node["default"], node, path)]
    assert found == []


def test_the_default_ladder_is_warn_at_80_and_block_at_100() -> None:
    actions = _root("TokenBudget")["properties"]["spec"]["properties"]["actions"]
    assert actions["default"] == [{"type": "Warn", "atPercent": 80},
                                  {"type": "Block", "atPercent": 100}]


# ---------------------------------------------------------------------------
# What kubectl shows, and what the API server keeps
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", BUDGET_KINDS)
def test_budgets_print_state_spend_limit_used_and_age(kind: str) -> None:
    columns = KINDS[kind]["spec"]["versions"][0]["additionalPrinterColumns"]
    default_columns = [c["name"] for c in columns if not c.get("priority")]
    assert default_columns == ["State", "Spend", "Limit", "Used", "Age"]
    by_name = {c["name"]: c for c in columns}
    assert by_name["Used"]["jsonPath"] == ".status.usedPercent"
    assert by_name["Age"]["jsonPath"] == ".metadata.creationTimestamp"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_printer_columns_point_at_fields_that_exist(kind: str) -> None:
    root = _root(kind)
    for column in KINDS[kind]["spec"]["versions"][0]["additionalPrinterColumns"]:
        top, *rest = column["jsonPath"].lstrip(".").split(".")
        if top == "metadata":
            continue
        field = rest[0].split("[")[0]
        assert field in root["properties"][top]["properties"], column


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_status_subresource_is_on(kind: str) -> None:
    version = KINDS[kind]["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert (version["served"], version["storage"], version["name"]) == (True, True, "v1alpha1")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_conditions_are_a_list_map_keyed_by_a_required_type(kind: str) -> None:
    conds = _root(kind)["properties"]["status"]["properties"]["conditions"]
    assert conds["type"] == "array"
    assert conds["x-kubernetes-list-type"] == "map"
    assert conds["x-kubernetes-list-map-keys"] == ["type"]
    item = conds["items"]
    assert {"type", "status", "lastTransitionTime", "reason"} <= set(item["required"])
    assert "observedGeneration" in item["properties"]
    assert "phase" not in _root(kind)["properties"]["status"]["properties"]


@pytest.mark.parametrize(
    ("kind", "scope"),
    [("ModelCatalog", "Cluster"), ("TokenBudget", "Namespaced"), ("ClusterTokenBudget", "Cluster")],
)
def test_each_kind_has_its_scope_names_and_spec_required(kind: str, scope: str) -> None:
    body = KINDS[kind]
    assert body["spec"]["scope"] == scope
    assert body["metadata"]["name"] == f"{body['spec']['names']['plural']}.tokenbudget.io"
    assert body["spec"]["names"]["listKind"] == f"{kind}List"
    assert _root(kind)["required"] == ["spec"]


# ---------------------------------------------------------------------------
# The models and the schema say the same thing
# ---------------------------------------------------------------------------


def _submodels(annotation: Any) -> list[tuple[str, type[pydantic.BaseModel]]]:
    """("" | "[]", Model) for every model a field annotation holds, directly or in a tuple."""
    origin = typing.get_origin(annotation)
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return [("", annotation)]
    if origin in (typing.Union, pytypes.UnionType):
        return [x for a in typing.get_args(annotation) for x in _submodels(a)]
    if origin is tuple:
        return [("[]", m) for _, m in _submodels(typing.get_args(annotation)[0])]
    return []


def _field_checks(model: type[pydantic.BaseModel], schema: dict[str, Any], path: str
                  ) -> Iterator[tuple[str, str | None, dict[str, Any] | None]]:
    """(path, description in the model, property in the schema) for every field, recursively."""
    props = schema.get("properties", {})
    for name, info in model.model_fields.items():
        alias = info.alias or name
        prop = props.get(alias)
        yield f"{path}.{alias}", info.description, prop
        if prop is None:
            continue
        for hop, sub in _submodels(info.annotation):
            yield from _field_checks(sub, prop["items"] if hop else prop, f"{path}.{alias}{hop}")


def _checks() -> list[Any]:
    out = []
    for kind, (spec_model, status_model) in MODELS.items():
        root = _root(kind)["properties"]
        for part, model in (("spec", spec_model), ("status", status_model)):
            for path, description, prop in _field_checks(model, root[part], f"{kind}.{part}"):
                out.append(pytest.param(description, prop, id=path))
    return out


@pytest.mark.parametrize(("description", "prop"), _checks())
def test_every_model_field_is_in_the_crd_with_its_description(description: str | None,
                                                             prop: dict[str, Any] | None) -> None:
    assert prop is not None, "the field is missing from the CRD schema"
    if description is not None:
        assert prop.get("description") == description


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_crd_declares_no_field_the_models_do_not_have(kind: str) -> None:
    spec_model, status_model = MODELS[kind]
    root = _root(kind)["properties"]
    for part, model in (("spec", spec_model), ("status", status_model)):
        aliases = {info.alias or name for name, info in model.model_fields.items()}
        assert set(root[part]["properties"]) == aliases


def _rules(node: dict[str, Any]) -> list[str]:
    return [v["rule"] for v in node.get("x-kubernetes-validations", [])]


@pytest.mark.parametrize("kind", BUDGET_KINDS)
def test_the_cross_field_rules_are_also_cel_rules_for_the_api_server(kind: str) -> None:
    spec = _root(kind)["properties"]["spec"]
    assert any("exists_one" in r for r in _rules(spec)), "distinct atPercent"
    assert _rules(spec["properties"]["limits"]["items"]) == [
        "has(self.tokens) || has(self.cost)", "!has(self.cost) || self.cost.matches('[1-9]')"]
    assert len(_rules(spec["properties"]["actions"]["items"])) == 2


def test_money_is_a_string_with_a_decimal_pattern_in_the_schema() -> None:
    limit = _root("TokenBudget")["properties"]["spec"]["properties"]["limits"]["items"]
    assert limit["properties"]["cost"] == {
        "type": "string", "pattern": types.MONEY_PATTERN,
        "description": api.Limit.model_fields["cost"].description, "maxLength": 22,
    }
