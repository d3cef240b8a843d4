"""Status written by the operator that issue 13 found wrong or missing.

Covers: a valid ModelCatalog is Ready with its model count; an invalid one is
not Ready, with reason InvalidSpec and the problems as message;
``lastTransitionTime`` stays while Ready does not change and an unchanged
status is not written again; under the operator's global ``--dry-run`` a
Blocked budget's Enforcing condition says DryRun and claims no workload
carries a directive.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
from typing import Any

import pytest
from builders import CATALOG_BODY, NAMESPACE, NOW, evaluate, series, snapshot, token_budget

from token_budget.handlers import catalogs
from token_budget.handlers import status as statuses
from token_budget.policy.inputs import BudgetKey, Gap

LATER = NOW + dt.timedelta(minutes=5)


def _catalog(**changes: Any) -> dict[str, Any]:
    body = copy.deepcopy(CATALOG_BODY)
    body["metadata"]["generation"] = 2
    body["spec"].update(changes)
    return body


def _ready(status: dict[str, Any]) -> dict[str, Any]:
    [ready] = [c for c in status["conditions"] if c["type"] == "Ready"]
    return dict(ready)


def test_a_valid_catalog_is_ready_with_its_model_count() -> None:
    status = catalogs.catalog_status(_catalog(), NOW)
    assert status["models"] == 3 and status["observedGeneration"] == 2
    ready = _ready(status)
    assert (ready["status"], ready["reason"]) == ("True", "Valid")
    assert ready["message"] == "3 model(s) priced in USD"


def test_an_invalid_catalog_is_not_ready_and_says_why() -> None:
    twice = _catalog(models=[CATALOG_BODY["spec"]["models"][2]] * 2)
    ready = _ready(catalogs.catalog_status(twice, NOW))
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert "spec.models[1].name" in ready["message"] and "tiny" in ready["message"]


def test_an_unchanged_catalog_keeps_its_transition_time_and_is_not_written_again() -> None:
    body = _catalog()
    body["status"] = catalogs.catalog_status(body, NOW)
    again = catalogs.catalog_status(body, LATER)
    assert again == body["status"]

    class NoWrites:
        def patch(self, *_: Any, **__: Any) -> None:
            raise AssertionError("an unchanged status was written")

    assert catalogs.write_status(NoWrites(), body, LATER) is False  # type: ignore[arg-type]


@pytest.mark.parametrize(("dry_run", "reason", "claims"), [
    pytest.param(False, "Blocked", True, id="enforcing: workloads carry the directive"),
    pytest.param(True, "DryRun", False, id="global dry-run: nothing is claimed"),
])
def test_the_enforcing_condition_follows_the_global_dry_run(
        dry_run: bool, reason: str, claims: bool) -> None:
    budget = token_budget()
    result = evaluate([budget], [series(5000)])
    decisions = [d for d in result.decisions if d.scope.budget == BudgetKey.of(budget)]
    status = statuses.budget_status(budget, decisions, "USD", NOW, 1, None, dry_run=dry_run)
    [enforcing] = [c for c in status["conditions"] if c["type"] == "Enforcing"]
    assert enforcing["reason"] == reason
    assert ("carry the" in enforcing["message"]) is claims
    assert (enforcing["status"] == "True") is claims


def test_catalog_statuses_outlive_an_api_server_that_cannot_be_reached() -> None:
    """A connection error is urllib3's, no OperatorError: it ended the task, and with it
    the whole operator, at every API server restart (found by tests/e2e/test_chaos.py)."""
    import asyncio

    import urllib3

    calls: list[int] = []

    class Unreachable:
        def list(self, *_: Any) -> list[Any]:
            calls.append(1)
            raise urllib3.exceptions.MaxRetryError(None, "/apis", None)  # type: ignore[arg-type]

    async def scenario() -> bool:
        task = asyncio.create_task(catalogs.keep_statuses(
            Unreachable(), lambda: True, asyncio.Event(), 0.01))  # type: ignore[arg-type]
        await asyncio.sleep(0.2)
        alive = not task.done()
        task.cancel()
        return alive

    assert asyncio.run(scenario()), "the task ended"
    assert len(calls) > 1, "and tried again"


@pytest.mark.parametrize(("gap", "says"), [
    pytest.param(Gap(bridged=2), "a scrape gap covers the start of 2 series",
                 id="a start value bridged across a gap"),
    pytest.param(Gap(unknown=3), "3 series have no sample within the horizon",
                 id="a start value unknown: only what was seen counts"),
])
def test_a_scrape_gap_at_a_windows_start_is_reported_as_data_incomplete(
        gap: Gap, says: str) -> None:
    """Issue 12: the README promises DataIncomplete=True, reason ScrapeGap, naming the
    window and the number of series; without a gap the window is covered."""
    budget = token_budget()
    snap = snapshot([budget], [series(500)])

    def incomplete(snap: Any) -> dict[str, Any]:
        result = evaluate([budget], snap=snap)
        decisions = [d for d in result.decisions if d.scope.budget == BudgetKey.of(budget)]
        status = statuses.budget_status(budget, decisions, "USD", NOW, 1, None)
        [c] = [c for c in status["conditions"] if c["type"] == "DataIncomplete"]
        return dict(c)

    clean = incomplete(snap)
    assert (clean["status"], clean["reason"]) == ("False", "WindowCovered")
    gapped = incomplete(dataclasses.replace(
        snap, gaps={key: {NAMESPACE: gap} for key in snap.windows}))
    assert (gapped["status"], gapped["reason"]) == ("True", "ScrapeGap")
    assert says in gapped["message"] and "window " in gapped["message"]
