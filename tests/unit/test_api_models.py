"""The API models: what a manifest may say, and what it means when it says nothing.

Covers:
- money: refused as a float (or any bare number), accepted as a decimal string,
  rendered back without exponent;
- windows: rolling durations and calendar names parse, anything else is refused;
- every enum value is a CamelCase string (API conventions);
- a Limit needs tokens or cost; an Action's fields must fit its type; the
  ladder's atPercent values are distinct;
- defaults: selector ``tokenbudget.io/agent=true``, ladder Warn 80 / Block 100,
  Enforce, Hold for 900 s, hysteresis 5, Counters, PerNamespace;
- ``LabelSelector.matches`` for every operator, and the value rules the schema
  cannot say;
- ``conditions.set_condition``: lastTransitionTime kept while the status holds,
  moved when it changes, observedGeneration set;
- ``parse``: only our kinds, camelCase on the wire.
"""

from __future__ import annotations

import datetime as dt
import enum
from decimal import Decimal
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

from token_budget.api import conditions, types
from token_budget.api import v1alpha1 as api

REPO = Path(__file__).resolve().parents[2]
T0 = dt.datetime(2025, 11, 20, 12, 0, tzinfo=dt.UTC)


def _errors(model: type[pydantic.BaseModel], body: dict[str, Any]) -> list[str]:
    with pytest.raises(pydantic.ValidationError) as info:
        model.model_validate(body)
    return [e["msg"] for e in info.value.errors()]


# ---------------------------------------------------------------------------
# Money
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "amount"),
    [
        pytest.param("12.50", Decimal("12.50"), id="cents are kept exactly"),
        pytest.param("300", Decimal(300), id="a whole amount needs no decimals"),
        pytest.param("0.000000001", Decimal("1E-9"), id="nine decimals fit a per-token price"),
        pytest.param("0", Decimal(0), id="zero is a valid price"),
    ],
)
def test_money_written_as_a_decimal_string_is_accepted_exactly(text: str, amount: Decimal) -> None:
    assert api.Pricing(input=text, output="1").input == amount


def test_money_adds_up_exactly_where_floats_would_not() -> None:
    p = api.Pricing(input="0.1", output="0.2")
    assert p.input + p.output == Decimal("0.3")


@pytest.mark.parametrize(
    ("value", "says"),
    [
        pytest.param(12.5, "not a float", id="a float is refused"),
        pytest.param(300, "not an integer", id="a bare integer is refused like the CRD does"),
        pytest.param(True, "not a boolean", id="a boolean is refused"),
        pytest.param("12.5.0", "got '12.5.0'", id="two decimal points are refused"),
        pytest.param("-1.00", "got '-1.00'", id="a negative amount is refused"),
        pytest.param("1e3", "got '1e3'", id="an exponent is refused"),
        pytest.param("$12", "got '$12'", id="a currency symbol is refused"),
        pytest.param("0.1234567891", "got '0.1234567891'", id="ten decimals are refused"),
    ],
)
def test_money_that_is_not_a_decimal_string_is_refused_with_an_example(value: Any, says: str
                                                                       ) -> None:
    [msg] = _errors(api.Pricing, {"input": value, "output": "1"})
    assert 'money must be a decimal string such as "12.50"' in msg
    assert says in msg


@pytest.mark.parametrize(
    ("amount", "text"),
    [
        pytest.param(Decimal("12.5"), "12.50", id="cents get two digits"),
        pytest.param(Decimal("12"), "12", id="whole amounts stay whole"),
        pytest.param(Decimal("1E+2"), "100", id="no exponent"),
        pytest.param(Decimal("0.125"), "0.125", id="sub-cent prices are kept"),
    ],
)
def test_money_is_written_back_as_people_read_it(amount: Decimal, text: str) -> None:
    assert types.format_money(amount) == text
    dumped = api.Pricing(input=amount, output=amount).model_dump(by_alias=True, mode="json")
    assert dumped["input"] == text


# ---------------------------------------------------------------------------
# Windows
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        pytest.param("30m", 1800, id="minutes"),
        pytest.param("1h", 3600, id="an hour"),
        pytest.param("24h", 86400, id="a rolling day"),
        pytest.param("7d", 7 * 86400, id="a rolling week"),
        pytest.param("30d", 30 * 86400, id="a rolling month"),
        pytest.param("Day", types.Calendar.DAY, id="a calendar day"),
        pytest.param("Week", types.Calendar.WEEK, id="a calendar week"),
        pytest.param("Month", types.Calendar.MONTH, id="a calendar month"),
    ],
)
def test_a_window_is_a_rolling_duration_or_a_calendar_period(text: str, parsed: object) -> None:
    assert types.parse_window(text) == parsed
    assert api.Limit(window=text, tokens=1).window == text


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("0h", id="zero length"),
        pytest.param("1w", id="weeks are spelt 7d"),
        pytest.param("day", id="calendar names are CamelCase"),
        pytest.param("24", id="a unit is needed"),
        pytest.param("1.5h", id="fractions are refused"),
        pytest.param("", id="empty"),
    ],
)
def test_a_window_that_is_neither_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="must be a rolling duration such as 1h"):
        types.parse_window(text)
    with pytest.raises(pydantic.ValidationError):
        api.Limit(window=text, tokens=1)


# ---------------------------------------------------------------------------
# Enums
# ---------------------------------------------------------------------------


def _enums() -> list[type[enum.Enum]]:
    found = []
    for module in (api, types, conditions):
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, enum.Enum) and value.__module__ == \
                    module.__name__:
                found.append(value)
    return found


@pytest.mark.parametrize("kind", [pytest.param(e, id=e.__name__) for e in _enums()])
def test_every_enum_value_on_the_wire_is_a_camelcase_string(kind: type[enum.Enum]) -> None:
    assert issubclass(kind, str)
    for member in kind:
        assert member.value[:1].isupper() and member.value.isalnum(), member


def test_the_enums_cover_every_kind_of_choice_in_the_api() -> None:
    names = {e.__name__ for e in _enums()}
    assert {"Tier", "Preset", "MatchOperator", "ActionType", "MissingDataPolicy", "Mode",
            "LimitScope", "State", "Calendar", "SelectorOperator", "Status"} <= names


# ---------------------------------------------------------------------------
# Limits, actions, the ladder
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"window": "24h", "tokens": 1000}, id="tokens alone"),
        pytest.param({"window": "24h", "cost": "5.00"}, id="cost alone"),
        pytest.param({"window": "24h", "tokens": 1000, "cost": "5.00"}, id="both"),
    ],
)
def test_a_limit_with_tokens_or_cost_is_accepted(body: dict[str, Any]) -> None:
    api.Limit.model_validate(body)


def test_a_limit_without_tokens_or_cost_is_refused() -> None:
    assert _errors(api.Limit, {"window": "24h"}) == [
        "Value error, a limit must set tokens, cost or both"
    ]


def test_a_limit_of_zero_tokens_is_refused() -> None:
    _errors(api.Limit, {"window": "24h", "tokens": 0})


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param({"type": "Warn", "atPercent": 80, "model": "tiny"},
                     "model must be left unset unless type is Reroute", id="a model on a Warn"),
        pytest.param({"type": "Block", "atPercent": 100, "model": "tiny"},
                     "model must be left unset unless type is Reroute", id="a model on a Block"),
        pytest.param({"type": "Reroute", "atPercent": 90, "tokensPerMinute": 10},
                     "tokensPerMinute must be left unset unless type is Throttle",
                     id="a rate on a Reroute"),
        pytest.param({"type": "Warn", "atPercent": 80, "tokensPerMinute": 10},
                     "tokensPerMinute must be left unset unless type is Throttle",
                     id="a rate on a Warn"),
    ],
)
def test_an_action_field_that_does_not_fit_its_type_is_refused(body: dict[str, Any],
                                                                message: str) -> None:
    assert _errors(api.Action, body) == [f"Value error, {message}"]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"type": "Reroute", "atPercent": 90, "model": "tiny"}, id="a Reroute model"),
        pytest.param({"type": "Reroute", "atPercent": 90}, id="a Reroute to the cheapest"),
        pytest.param({"type": "Throttle", "atPercent": 95, "tokensPerMinute": 2000},
                     id="a Throttle rate"),
        pytest.param({"type": "Throttle", "atPercent": 95}, id="a Throttle at pace"),
    ],
)
def test_an_action_field_that_fits_its_type_is_accepted(body: dict[str, Any]) -> None:
    api.Action.model_validate(body)


@pytest.mark.parametrize("percent", [0, 1001])
def test_an_action_threshold_outside_1_to_1000_percent_is_refused(percent: int) -> None:
    _errors(api.Action, {"type": "Warn", "atPercent": percent})


def test_two_rungs_at_the_same_percentage_are_refused() -> None:
    body = {"limits": [{"window": "24h", "tokens": 1}],
            "actions": [{"type": "Warn", "atPercent": 80}, {"type": "Block", "atPercent": 80}]}
    assert _errors(api.TokenBudgetSpec, body) == [
        "Value error, actions must have distinct atPercent values"
    ]


def test_a_budget_without_limits_is_refused() -> None:
    _errors(api.TokenBudgetSpec, {"limits": []})


def test_an_unknown_spec_field_is_refused() -> None:
    _errors(api.TokenBudgetSpec, {"limits": [{"window": "24h", "tokens": 1}], "budgetOwner": "x"})


# ---------------------------------------------------------------------------
# Defaults
# ---------------------------------------------------------------------------


def test_a_budget_that_says_only_its_limits_gets_the_documented_defaults() -> None:
    spec = api.TokenBudgetSpec.model_validate({"limits": [{"window": "Month", "cost": "10"}]})
    assert spec.selector.match_labels == {"tokenbudget.io/agent": "true"}
    assert spec.selector.match_expressions == ()
    assert [(a.type, a.at_percent) for a in spec.actions] == [
        (api.ActionType.WARN, 80), (api.ActionType.BLOCK, 100)]
    assert spec.mode is api.Mode.ENFORCE
    assert spec.source.preset is api.Preset.COUNTERS
    assert spec.hysteresis_percent == 5
    assert spec.when_spend_unknown.policy is api.MissingDataPolicy.HOLD
    assert spec.when_spend_unknown.stale_after_seconds == 900
    assert spec.limits[0].time_zone == "UTC"
    assert spec.exceptions == () and spec.outcome is None


def test_a_cluster_budget_gives_each_namespace_the_full_limits_by_default() -> None:
    spec = api.ClusterTokenBudgetSpec.model_validate({
        "namespaceSelector": {"matchLabels": {"environment": "qa"}},
        "limits": [{"window": "Month", "cost": "300"}],
    })
    assert spec.limit_scope is api.LimitScope.PER_NAMESPACE


def test_an_exception_caps_the_ladder_at_warn_unless_it_says_otherwise() -> None:
    exc = api.BudgetException.model_validate({"until": "2025-12-01T00:00:00Z", "reason": "launch"})
    assert exc.max_action is api.ActionType.WARN
    assert exc.until == dt.datetime(2025, 12, 1, tzinfo=dt.UTC)


def test_defaults_are_written_back_in_camelcase() -> None:
    spec = api.TokenBudgetSpec.model_validate({"limits": [{"window": "24h", "tokens": 1}]})
    dumped = spec.model_dump(by_alias=True, mode="json", exclude_none=True)
    assert dumped["actions"] == [{"type": "Warn", "atPercent": 80},
                                 {"type": "Block", "atPercent": 100}]
    assert dumped["whenSpendUnknown"] == {"policy": "Hold", "staleAfterSeconds": 900}


# ---------------------------------------------------------------------------
# Label selectors
# ---------------------------------------------------------------------------


def _selector(**body: Any) -> types.LabelSelector:
    return types.LabelSelector.model_validate(body)


def _expr(key: str, operator: str, *values: str) -> dict[str, Any]:
    return {"matchExpressions": [{"key": key, "operator": operator, "values": list(values)}]}


@pytest.mark.parametrize(
    ("selector", "labels", "matches"),
    [
        pytest.param({}, {}, True, id="an empty selector matches a pod without labels"),
        pytest.param({}, {"a": "b"}, True, id="an empty selector matches any pod"),
        pytest.param({"matchLabels": {"team": "search"}}, {"team": "search", "x": "y"}, True,
                     id="matchLabels matches the same value among others"),
        pytest.param({"matchLabels": {"team": "search"}}, {"team": "ads"}, False,
                     id="matchLabels refuses another value"),
        pytest.param({"matchLabels": {"team": "search"}}, {}, False,
                     id="matchLabels refuses a missing label"),
        pytest.param(_expr("tier", "In", "gold", "silver"), {"tier": "silver"}, True,
                     id="In matches one of the values"),
        pytest.param(_expr("tier", "In", "gold"), {"tier": "bronze"}, False,
                     id="In refuses another value"),
        pytest.param(_expr("tier", "In", "gold"), {}, False, id="In refuses a missing label"),
        pytest.param(_expr("tier", "NotIn", "gold"), {"tier": "bronze"}, True,
                     id="NotIn matches another value"),
        pytest.param(_expr("tier", "NotIn", "gold"), {"tier": "gold"}, False,
                     id="NotIn refuses a listed value"),
        pytest.param(_expr("tier", "NotIn", "gold"), {}, True,
                     id="NotIn matches a missing label"),
        pytest.param(_expr("agent", "Exists"), {"agent": ""}, True,
                     id="Exists matches an empty value"),
        pytest.param(_expr("agent", "Exists"), {}, False, id="Exists refuses a missing label"),
        pytest.param(_expr("agent", "DoesNotExist"), {}, True,
                     id="DoesNotExist matches a missing label"),
        pytest.param(_expr("agent", "DoesNotExist"), {"agent": "true"}, False,
                     id="DoesNotExist refuses a present label"),
        pytest.param({"matchLabels": {"team": "search"}, **_expr("tier", "In", "gold")},
                     {"team": "search", "tier": "bronze"}, False,
                     id="every term must hold"),
    ],
)
def test_a_label_selector_matches_as_kubernetes_does(selector: dict[str, Any],
                                                     labels: dict[str, str],
                                                     matches: bool) -> None:
    assert _selector(**selector).matches(labels) is matches


@pytest.mark.parametrize(
    ("selector", "problems"),
    [
        pytest.param(_expr("t", "In"), ["matchExpressions[0].values must be non-empty for In"],
                     id="In needs values"),
        pytest.param(_expr("t", "NotIn"),
                     ["matchExpressions[0].values must be non-empty for NotIn"],
                     id="NotIn needs values"),
        pytest.param(_expr("t", "Exists", "x"),
                     ["matchExpressions[0].values must be empty for Exists"],
                     id="Exists takes no values"),
        pytest.param(_expr("t", "DoesNotExist", "x"),
                     ["matchExpressions[0].values must be empty for DoesNotExist"],
                     id="DoesNotExist takes no values"),
        pytest.param(_expr("t", "In", "x"), [], id="In with values is fine"),
    ],
)
def test_selector_values_must_fit_the_operator(selector: dict[str, Any],
                                               problems: list[str]) -> None:
    assert _selector(**selector).problems() == problems


def test_a_selector_operator_outside_the_four_is_refused() -> None:
    _errors(types.LabelSelector, _expr("t", "Equals", "x"))


# ---------------------------------------------------------------------------
# Conditions
# ---------------------------------------------------------------------------


def _ready(conds: tuple[conditions.Condition, ...]) -> conditions.Condition:
    found = conditions.get(conds, conditions.READY)
    assert found is not None
    return found


def test_a_new_condition_starts_its_transition_now_and_records_the_generation() -> None:
    conds = conditions.set_condition((), conditions.READY, True, "Evaluated", "ok.", T0, 3)
    c = _ready(conds)
    assert (c.status, c.last_transition_time, c.observed_generation) == (
        conditions.Status.TRUE, T0, 3)


def test_a_condition_keeps_its_transition_time_while_the_status_holds() -> None:
    first = conditions.set_condition((), conditions.READY, True, "Evaluated", "ok.", T0, 1)
    later = T0 + dt.timedelta(minutes=5)
    again = conditions.set_condition(first, conditions.READY, conditions.Status.TRUE,
                                     "StillFine", "still ok.", later, 2)
    c = _ready(again)
    assert c.last_transition_time == T0
    assert (c.reason, c.message, c.observed_generation) == ("StillFine", "still ok.", 2)


def test_a_condition_moves_its_transition_time_when_the_status_changes() -> None:
    first = conditions.set_condition((), conditions.READY, True, "Evaluated", "ok.", T0, 1)
    later = T0 + dt.timedelta(minutes=5)
    flipped = conditions.set_condition(first, conditions.READY, False, "InvalidSpec", "bad.",
                                       later, 2)
    c = _ready(flipped)
    assert (c.status, c.last_transition_time) == (conditions.Status.FALSE, later)


def test_setting_one_condition_keeps_the_others_and_orders_them_by_type() -> None:
    conds = conditions.set_condition((), conditions.READY, True, "Evaluated", "", T0, 1)
    conds = conditions.set_condition(conds, conditions.METRICS_AVAILABLE, False,
                                     "QueryFailed", "x", T0, 1)
    again = conditions.set_condition(conds, conditions.ENFORCING, True, "Applied", "", T0, 1)
    assert [c.type for c in again] == ["Enforcing", "MetricsAvailable", "Ready"]
    assert conditions.get(again, conditions.METRICS_AVAILABLE) == conds[0]
    assert len(conds) == 2  # the input is not changed


def test_a_condition_reason_must_be_one_camelcase_word() -> None:
    with pytest.raises(pydantic.ValidationError):
        conditions.set_condition((), conditions.READY, True, "not a reason", "", T0, 1)


# ---------------------------------------------------------------------------
# Whole objects
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_parses_as_its_kind(path: Path) -> None:
    for body in yaml.safe_load_all(path.read_text()):
        obj = api.parse(body)
        assert obj.kind == body["kind"]
        assert obj.metadata.name == body["metadata"]["name"]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"apiVersion": "v1", "kind": "ConfigMap"}, id="a kind of another group"),
        pytest.param({"apiVersion": "tokenbudget.io/v1", "kind": "TokenBudget"},
                     id="our kind in another version"),
        pytest.param({"apiVersion": "tokenbudget.io/v1alpha1", "kind": "Budget"},
                     id="a kind we do not have"),
    ],
)
def test_parse_refuses_anything_but_our_three_kinds(body: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="not a tokenbudget.io/v1alpha1 object"):
        api.parse(body)


def test_status_written_by_a_newer_operator_is_read_without_complaint() -> None:
    body = {"apiVersion": api.API_VERSION, "kind": "TokenBudget",
            "metadata": {"name": "b", "namespace": "n"},
            "spec": {"limits": [{"window": "24h", "tokens": 1}]},
            "status": {"state": "Warning", "somethingNew": 1}}
    budget = api.parse(body)
    assert isinstance(budget, api.TokenBudget)
    assert budget.status is not None and budget.status.state is api.State.WARNING
