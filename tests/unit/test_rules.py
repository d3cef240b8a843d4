"""Validation a user meets: ``tokenbudget validate`` on broken manifests, and the rules behind it.

Covers:
- every manifest in ``tests/broken/`` (one problem each) makes ``tokenbudget
  validate <file> examples/model-catalog.yaml`` exit 1 and print exactly one
  problem line naming the file, the object and the field path, with a message
  in the API-convention "must" form;
- ``tokenbudget validate examples/`` exits 0;
- the cross-field and cross-object rules of ``token_budget.api.rules`` that the
  broken files do not exercise (duplicate limits, allowed and denied at once,
  aliases that shadow another model, a reroute to a denied model, selector
  values, outcome settings), and that the reroute check is skipped when no
  catalog is at hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from token_budget import cli
from token_budget.api import rules
from token_budget.api import v1alpha1 as api

REPO = Path(__file__).resolve().parents[2]
BROKEN = REPO / "tests" / "broken"
CATALOG = REPO / "examples" / "model-catalog.yaml"

# file -> (object as validate names it, field path, what the message must say)
EXPECTED: dict[str, tuple[str, str, str]] = {
    "thresholds-not-ascending.yaml": (
        "TokenBudget team-search/ladder-out-of-order", "spec.actions[1].atPercent",
        "must be greater than 90 (actions[0]): list the ladder in ascending order"),
    "block-below-warn.yaml": (
        "TokenBudget team-search/block-before-warn", "spec.actions[1].type",
        "must not be less restrictive than Block below it"),
    "reroute-target-not-in-catalog.yaml": (
        "TokenBudget team-search/reroute-to-nowhere", "spec.actions[1].model",
        "must name a model in a ModelCatalog; 'gpt-7-turbo' is in none"),
    "bad-time-zone.yaml": (
        "TokenBudget team-search/misspelt-zone", "spec.limits[0].timeZone",
        "must be an IANA time zone such as Europe/Berlin, not 'Europe/Berln'"),
    "time-zone-on-rolling-window.yaml": (
        "TokenBudget team-search/zoned-rolling-window", "spec.limits[0].timeZone",
        "must be left unset for a rolling window"),
    "invalid-regex-matcher.yaml": (
        "TokenBudget team-search/bad-regex", "spec.spendMatchers[0].value",
        "must be a valid regular expression"),
    "empty-namespace-selector.yaml": (
        "ClusterTokenBudget everything", "spec.namespaceSelector",
        "must select by at least one label"),
    "catalog-equivalent-more-expensive.yaml": (
        "ModelCatalog upside-down", "spec.models[0].equivalents[0]",
        "must be cheaper than house-small: house-large costs more"),
    "duplicate-model-name.yaml": (
        "ModelCatalog twice", "spec.models[1].name",
        "must be unique; 'house-model' is also spec.models[0]"),
    "float-money.yaml": (
        "TokenBudget team-search/float-cost", "spec.limits[0].cost",
        'must be a decimal string such as "12.50" (up to 12 digits, 9 decimals), not the '
        'number'),
    "empty-limits.yaml": (
        "TokenBudget team-search/no-limits", "spec.limits", "must have at least 1 item"),
    "unknown-field.yaml": (
        "TokenBudget team-search/extra-field", "spec.budgetOwner",
        "must not be set: the API has no such field"),
}


def _validate(capsys: pytest.CaptureFixture[str], *paths: Path | str) -> tuple[int, list[str]]:
    code = cli.main(["validate", *map(str, paths)])
    out = capsys.readouterr().out
    return code, out.splitlines()


def test_every_broken_manifest_has_an_expected_message() -> None:
    assert sorted(p.name for p in BROKEN.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize(("name", "expected"), list(EXPECTED.items()), ids=list(EXPECTED))
def test_validate_rejects_a_broken_manifest_naming_file_object_and_field(
        capsys: pytest.CaptureFixture[str], name: str, expected: tuple[str, str, str]) -> None:
    obj, path, message = expected
    code, lines = _validate(capsys, BROKEN / name, CATALOG)
    assert code == 1
    problems = [line for line in lines if line.startswith(str(BROKEN / name))]
    assert len(problems) == 1, lines
    assert problems[0].startswith(f"{BROKEN / name}#0 ({obj}): {path}: ")
    assert message in problems[0]
    assert lines[-1] == "1 problem object(s) of 2 checked"


def test_validate_accepts_every_example(capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = _validate(capsys, REPO / "examples")
    assert (code, lines) == (0, ["3 object(s) valid"])


def test_validate_reports_every_broken_manifest_of_a_directory(
        capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = _validate(capsys, BROKEN, CATALOG)
    assert code == 1
    assert lines[-1] == f"{len(EXPECTED)} problem object(s) of {len(EXPECTED) + 1} checked"


def test_validate_ignores_objects_of_other_apis(capsys: pytest.CaptureFixture[str],
                                                tmp_path: Path) -> None:
    (tmp_path / "ns.yaml").write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n")
    assert _validate(capsys, tmp_path) == (0, ["0 object(s) valid"])


def test_validate_says_which_file_cannot_be_read(capsys: pytest.CaptureFixture[str],
                                                 tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("spec: [unclosed\n")
    code, lines = _validate(capsys, tmp_path / "bad.yaml")
    assert code == 1
    assert lines[0].startswith(f"{tmp_path / 'bad.yaml'}: cannot be read")


# ---------------------------------------------------------------------------
# The rules themselves
# ---------------------------------------------------------------------------


def _budget(**spec: Any) -> api.TokenBudget:
    return api.TokenBudget.model_validate({
        "apiVersion": api.API_VERSION, "kind": "TokenBudget",
        "metadata": {"name": "b", "namespace": "n"},
        "spec": {"limits": [{"window": "24h", "tokens": 1000}], **spec},
    })


def _catalog(*models: dict[str, Any]) -> api.ModelCatalog:
    return api.ModelCatalog.model_validate({
        "apiVersion": api.API_VERSION, "kind": "ModelCatalog", "metadata": {"name": "c"},
        "spec": {"models": list(models)},
    })


def _model(name: str, price: str = "1.00", **more: Any) -> dict[str, Any]:
    return {"name": name, "tier": "Standard", "pricing": {"input": price, "output": price},
            **more}


CATALOG_MODELS = _catalog(_model("big", "9.00", equivalents=["small"]), _model("small")).spec.models


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        pytest.param({"limits": [{"window": "24h", "tokens": 1}, {"window": "24h", "cost": "1"}]},
                     [("spec.limits[1].window", "must not repeat spec.limits[0].window (both "
                       "24h) for the same model: merge the two limits into one")],
                     id="the same window twice is refused"),
        pytest.param({"limits": [{"window": "24h", "tokens": 1}, {"window": "1d", "cost": "1"}]},
                     [("spec.limits[1].window", "must not repeat spec.limits[0].window (1d is "
                       "24h) for the same model: merge the two limits into one")],
                     id="one span spelled two ways is refused"),
        pytest.param({"limits": [{"window": "24h", "tokens": 1},
                                 {"window": "24h", "tokens": 9, "model": "big"}]},
                     [], id="the same window for one model is a separate limit"),
        pytest.param({"allowedModels": ["big"], "deniedModels": ["big"]},
                     [("spec.deniedModels", "must not also appear in allowedModels: 'big'")],
                     id="a model both allowed and denied is refused"),
        pytest.param({"deniedModels": ["big"],
                      "actions": [{"type": "Reroute", "atPercent": 90, "model": "big"}]},
                     [("spec.actions[0].model", "must not be a model this budget denies: 'big'")],
                     id="a reroute to a denied model is refused"),
        pytest.param({"actions": [{"type": "Reroute", "atPercent": 90, "model": "small"}]},
                     [], id="a reroute to a catalog model is fine"),
        pytest.param({"selector": {"matchExpressions": [{"key": "a", "operator": "In"}]}},
                     [("spec.selector.matchExpressions[0].values",
                       "must be non-empty for In")],
                     id="an In selector without values is refused"),
        pytest.param({"outcome": {"metric": "done_total", "onExceeded": "Block"}},
                     [("spec.outcome.maxCostPerOutcome", "must be set when onExceeded is given")],
                     id="an outcome action without a threshold is refused"),
        pytest.param({"outcome": {"metric": "done_total",
                                  "matchers": [{"label": "x", "operator": "NotRegex",
                                                "value": "[a-"}]}},
                     [("spec.outcome.matchers[0].value", "must be a valid regular expression")],
                     id="an outcome matcher's regex is checked too"),
        pytest.param({"spendMatchers": [{"label": "team", "operator": "Equal", "value": "a("}]},
                     [], id="an Equal matcher's value is not a regex"),
        pytest.param({"limits": [{"window": "Week", "timeZone": "America/New_York",
                                  "tokens": 1}]},
                     [], id="a calendar window in a real zone is fine"),
    ],
)
def test_budget_rules(spec: dict[str, Any], expected: list[tuple[str, str]]) -> None:
    found = rules.problems(_budget(**spec), CATALOG_MODELS)
    assert [(p.path, p.message[: len(m)]) for p, (_, m) in zip(found, expected, strict=False)] \
        == expected
    assert len(found) == len(expected), found


def test_a_reroute_target_is_not_checked_without_a_catalog() -> None:
    budget = _budget(actions=[{"type": "Reroute", "atPercent": 90, "model": "gpt-7"}])
    assert rules.problems(budget, None) == []
    assert [p.path for p in rules.problems(budget, CATALOG_MODELS)] == ["spec.actions[0].model"]


@pytest.mark.parametrize(
    ("models", "expected"),
    [
        pytest.param([_model("a", equivalents=["a"])],
                     [("spec.models[0].equivalents[0]", "must not name the model itself")],
                     id="a model is not its own equivalent"),
        pytest.param([_model("a", equivalents=["ghost"])],
                     [("spec.models[0].equivalents[0]",
                       "must name a model of this catalog; 'ghost' is not one")],
                     id="an equivalent must be in the catalog"),
        pytest.param([_model("a", aliases=["b*"]), _model("bee")],
                     [("spec.models[0].aliases[0]", "must not match another model's name ('bee')")],
                     id="an alias must not shadow another model"),
        pytest.param([_model("a", "2.00", equivalents=["b"]), _model("b", "2.00")],
                     [], id="an equivalent at the same price is fine"),
    ],
)
def test_catalog_rules(models: list[dict[str, Any]], expected: list[tuple[str, str]]) -> None:
    found = rules.problems(_catalog(*models))
    assert [(p.path, p.message) for p in found] == expected


def test_schema_problems_are_empty_for_a_valid_manifest() -> None:
    body = _budget().model_dump(by_alias=True, mode="json", exclude_none=True)
    assert rules.schema_problems(body) == []


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        pytest.param({}, [("spec.limits", "must be set")], id="a missing field must be set"),
        pytest.param({"limits": [{"window": "24h", "tokens": 1}], "hysteresisPercent": 60},
                     [("spec.hysteresisPercent", "must be less than or equal to 50")],
                     id="a number above its maximum"),
        pytest.param({"limits": [{"window": "24h", "tokens": 1}], "mode": "Audit"},
                     [("spec.mode", "must be one of 'Enforce' or 'DryRun'")],
                     id="a value outside an enum"),
        pytest.param({"limits": [{"window": "1 day", "tokens": 1}]},
                     [("spec.limits[0].window", "must match the pattern")],
                     id="a string outside its pattern"),
    ],
)
def test_schema_problems_say_what_would_be_valid(spec: dict[str, Any],
                                                  expected: list[tuple[str, str]]) -> None:
    body = {"apiVersion": api.API_VERSION, "kind": "TokenBudget",
            "metadata": {"name": "b", "namespace": "n"}, "spec": spec}
    found = rules.schema_problems(body)
    assert [(p.path, p.message[: len(m)]) for p, (_, m) in zip(found, expected, strict=False)] \
        == expected
    assert len(found) == len(expected), found
