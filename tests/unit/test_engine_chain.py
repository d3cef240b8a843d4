"""The decision chain: its order, one reason per check, and reasons spelled in one place.

Covers:
- the chain runs missing data, ladder, hysteresis, outcome, exception cap,
  state and dry run, in that order, and its last check always decides;
- each check's reason, one scenario per check, taken from ``Reason``;
- no module of the operator spells a decision reason as a string literal: they
  compare and build ``Reason`` members (the API's conditions module is the one
  place the strings are written).
"""

from __future__ import annotations

import ast
import datetime as dt
import pathlib

import pytest

from token_budget.api import v1alpha1 as api
from token_budget.api.conditions import Reason
from token_budget.policy import checks
from unit import builders as b
from unit.builders import NOW

LADDER = [{"type": "Warn", "atPercent": 50}, {"type": "Block", "atPercent": 100}]
SOURCE = pathlib.Path(checks.__file__).resolve().parents[1]


def test_the_chain_runs_in_the_documented_order() -> None:
    assert [c.__name__ for c in checks.CHAIN] == [
        "missing_data", "ladder", "hysteresis", "outcome", "exception_cap", "outcome_state",
        "rate_limit", "dry_run"]


def _decide(budget: api.Budget, tokens: float, **kw: object) -> Reason:
    [decision] = b.evaluate([budget], [b.series(tokens)], **kw).decisions  # type: ignore[arg-type]
    assert isinstance(decision.reason, Reason)
    return decision.reason


def test_within_budget_below_the_first_rung() -> None:
    assert _decide(b.token_budget(actions=LADDER), 100) is Reason.WITHIN_BUDGET


def test_limit_reached_on_a_rung() -> None:
    assert _decide(b.token_budget(actions=LADDER), 600) is Reason.LIMIT_REACHED


def test_hysteresis_holds_a_rung_just_below_it() -> None:
    budget = b.token_budget(actions=LADDER, hysteresisPercent=10)
    assert _decide(budget, 950, remembered=b.memory(budget, api.State.BLOCKED)) \
        is Reason.HYSTERESIS


def test_hysteresis_never_brings_back_a_more_severe_rung_than_remembered() -> None:
    # A Block listed between two Warns: remembered Warning at 0 % spend holds the Warns
    # (within the margin) and must not take the Block between them along (it was Blocked
    # here, found by the "more spend is never less restrictive" law).
    budget = b.token_budget(limits=[{"window": "24h", "tokens": 1000}], actions=[
        {"type": "Warn", "atPercent": 1}, {"type": "Block", "atPercent": 2},
        {"type": "Warn", "atPercent": 3}], hysteresisPercent=5)
    [decision] = b.evaluate([budget], [b.series(0)],
                            remembered=b.memory(budget, api.State.WARNING)).decisions
    assert (decision.state, decision.reason) == (api.State.WARNING, Reason.HYSTERESIS)
    [decision] = b.evaluate([budget], [b.series(25)],
                            remembered=b.memory(budget, api.State.WARNING)).decisions
    assert decision.state is api.State.BLOCKED


def test_an_exception_caps_the_actions() -> None:
    until = (NOW + dt.timedelta(hours=1)).isoformat()
    budget = b.token_budget(actions=LADDER, exceptions=[
        {"until": until, "maxAction": "Warn", "reason": "launch"}])
    assert _decide(budget, 2000) is Reason.EXCEPTION_ACTIVE


def test_a_cap_downgrades_rather_than_drops() -> None:
    until = (NOW + dt.timedelta(hours=1)).isoformat()
    budget = b.token_budget(actions=[{"type": "Block", "atPercent": 100}], exceptions=[
        {"until": until, "maxAction": "Warn", "reason": "launch"}])
    [decision] = b.evaluate([budget], [b.series(2000)]).decisions
    assert (decision.state, decision.reason) == (api.State.WARNING, Reason.EXCEPTION_ACTIVE)


@pytest.mark.parametrize(("policy", "reason"), [
    ("FailOpen", Reason.SPEND_UNKNOWN_FAIL_OPEN),
    ("FailClosed", Reason.SPEND_UNKNOWN_FAIL_CLOSED),
])
def test_missing_data_is_final(policy: str, reason: Reason) -> None:
    budget = b.token_budget(actions=LADDER, whenSpendUnknown={"policy": policy})
    assert _decide(budget, 2000, errors={api.Preset.COUNTERS: "down"}) is reason


def test_hold_keeps_the_remembered_state() -> None:
    budget = b.token_budget(actions=LADDER, whenSpendUnknown={"policy": "Hold"})
    assert _decide(budget, 0, errors={api.Preset.COUNTERS: "down"},
                   remembered=b.memory(budget, api.State.WARNING)) is Reason.SPEND_UNKNOWN_HOLDING


def _literals(path: pathlib.Path) -> list[tuple[int, str]]:
    values = {r.value for r in Reason}
    return [(node.lineno, node.value) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and node.value in values]


def test_no_module_spells_a_reason_as_a_string() -> None:
    found = {str(p.relative_to(SOURCE)): hits for p in sorted(SOURCE.rglob("*.py"))
             if p.name != "conditions.py" and (hits := _literals(p))}
    assert found == {}
