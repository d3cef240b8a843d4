"""Every CEL rule of the generated CRDs has a Python twin that says the same.

Covers: each ``x-kubernetes-validations`` entry anywhere in the generated
schemas is one of :data:`token_budget.api.cel.RULES` (text, message and
fieldPath alike), and every rule is used somewhere; each twin gives, on the
values below, the result the CEL rule gives (worked out by hand from the CEL
text; the e2e differential test sends a manifest breaking each rule to the real
API server). The offline validator refuses a schema with a rule it has no twin
for, rather than skipping it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from token_budget.api import cel, crds, schema

GENERATED = crds.all_crds()


def _validations(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        for entry in node.get("x-kubernetes-validations") or ():
            yield path, entry
        for key, value in node.items():
            yield from _validations(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _validations(value, f"{path}/{i}")


ALL = [(f"{name}{path}", entry) for name, body in GENERATED.items()
       for path, entry in _validations(body)]


@pytest.mark.parametrize(("where", "entry"), ALL, ids=[f"{w}: {e['rule'][:30]}" for w, e in ALL])
def test_every_cel_rule_in_the_crds_has_its_python_twin(where: str, entry: dict[str, Any]) -> None:
    twin = cel.RULES.get(entry["rule"])
    assert twin is not None, f"{where}: no twin in token_budget.api.cel.RULES"
    assert entry == twin.schema()


def test_every_twin_is_used_by_some_crd() -> None:
    assert {e["rule"] for _, e in ALL} == set(cel.RULES)


CASES = [
    (cel.LIMIT_TOKENS_OR_COST, {"window": "1h", "tokens": 1}, True),
    (cel.LIMIT_TOKENS_OR_COST, {"window": "1h", "cost": "1"}, True),
    (cel.LIMIT_TOKENS_OR_COST, {"window": "1h"}, False),
    (cel.LIMIT_COST_POSITIVE, {"window": "1h"}, True),
    (cel.LIMIT_COST_POSITIVE, {"cost": "0.01"}, True),
    (cel.LIMIT_COST_POSITIVE, {"cost": "10"}, True),
    (cel.LIMIT_COST_POSITIVE, {"cost": "0"}, False),
    (cel.LIMIT_COST_POSITIVE, {"cost": "0.000000000"}, False),
    (cel.ACTION_MODEL_ON_REROUTE, {"type": "Reroute", "model": "m"}, True),
    (cel.ACTION_MODEL_ON_REROUTE, {"type": "Warn"}, True),
    (cel.ACTION_MODEL_ON_REROUTE, {"type": "Block", "model": "m"}, False),
    (cel.ACTION_RATE_ON_THROTTLE, {"type": "Throttle", "tokensPerMinute": 5}, True),
    (cel.ACTION_RATE_ON_THROTTLE, {"type": "Reroute"}, True),
    (cel.ACTION_RATE_ON_THROTTLE, {"type": "Warn", "tokensPerMinute": 5}, False),
    (cel.SPEC_DISTINCT_THRESHOLDS, {}, True),
    (cel.SPEC_DISTINCT_THRESHOLDS, {"actions": [{"atPercent": 1}, {"atPercent": 2}]}, True),
    (cel.SPEC_DISTINCT_THRESHOLDS, {"actions": [{"atPercent": 1}, {"atPercent": 1}]}, False),
]


@pytest.mark.parametrize(("rule", "value", "holds"), CASES,
                         ids=[f"{r.rule[:25]} on {v}" for r, v, _ in CASES])
def test_a_twin_gives_what_its_cel_rule_gives(rule: cel.Rule, value: dict[str, Any],
                                              holds: bool) -> None:
    assert rule.holds(value) is holds


def test_a_rule_without_a_twin_is_an_error_not_a_pass() -> None:
    node = {"type": "object", "properties": {"x": {"type": "integer"}},
            "x-kubernetes-validations": [{"rule": "self.x > 1", "message": "x must be big"}]}
    with pytest.raises(LookupError, match="no Python twin"):
        schema._validate({"x": 0}, node, "spec")
