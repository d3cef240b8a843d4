"""Mandatory enrolment and ungoverned spend in the engine: pure, no cluster.

Covers:
- a Mandatory ClusterTokenBudget governs every workload of its namespaces,
  whatever their labels, and blocks them at its limit; a Selected one governs
  only what its selector picks;
- which namespaces are mandatory: picked by a Mandatory ClusterTokenBudget, or
  labelled ``tokenbudget.io/enrolment=Mandatory`` by an admin;
- ungoverned spend: series whose workload label names no governed workload
  (nor one of its pods, nor a name its pods begin with) are named per decision,
  at most ``UNGOVERNED_SHOWN`` of them with the full count; idle series and
  series without a workload label are left out;
- a tenant's TokenBudget exception never lifts a ClusterTokenBudget's Block;
- ``tokenbudget_ungoverned_workloads`` counts them per budget scope.
"""

from __future__ import annotations

import datetime as dt

import pytest

from token_budget.api import v1alpha1 as api
from token_budget.handlers.telemetry import Telemetry
from token_budget.policy import engine
from unit import builders as b
from unit.builders import NOW, key, series, workload

QA = {b.NAMESPACE: {"environment": "qa"}}
BLOCK = [{"type": "Block", "atPercent": 100}]


def test_a_mandatory_cluster_budget_blocks_a_workload_that_dropped_the_agent_label() -> None:
    ctb = b.cluster_budget(enrolment="Mandatory", actions=BLOCK)
    rogue = workload("rogue", labels={"app": "rogue"})
    result = b.evaluate([ctb], [series(1500, workload="rogue-7d9f-x2")], namespaces=QA,
                        workloads=[rogue])
    [decision] = result.decisions
    assert decision.state is api.State.BLOCKED
    assert result.directives[key("rogue")].blocked
    assert decision.ungoverned == ()


def test_a_selected_cluster_budget_leaves_an_unlabelled_workload_and_names_its_spend() -> None:
    ctb = b.cluster_budget(actions=BLOCK)
    rogue = workload("rogue", labels={"app": "rogue"})
    result = b.evaluate([ctb], [series(1500, workload="rogue-7d9f-x2"),
                                series(10, workload="agent-0")],
                        namespaces=QA, workloads=[rogue, workload()])
    [decision] = result.decisions
    assert decision.state is api.State.BLOCKED
    assert key("rogue") not in result.directives
    assert decision.ungoverned == (f"{b.NAMESPACE}/rogue-7d9f-x2",)
    assert decision.ungoverned_series == 1


@pytest.mark.parametrize(("namespaces", "budgets", "want"), [
    pytest.param({"a": {}, "b": {}}, [b.cluster_budget(enrolment="Mandatory",
                                                       selector={"env": "x"})],
                 set(), id="no namespace picked: none"),
    pytest.param({"a": {"env": "x"}, "b": {}}, [b.cluster_budget(enrolment="Mandatory",
                                                                 selector={"env": "x"})],
                 {"a"}, id="the namespaces a Mandatory cluster budget picks"),
    pytest.param({"a": {"env": "x"}}, [b.cluster_budget(selector={"env": "x"})],
                 set(), id="a Selected cluster budget makes nothing mandatory"),
    pytest.param({"a": {api.ENROLMENT_LABEL: "Mandatory"}, "b": {api.ENROLMENT_LABEL: "no"}},
                 [], {"a"}, id="the namespace label an admin sets"),
])
def test_which_namespaces_are_under_mandatory_enrolment(
        namespaces: dict[str, dict[str, str]], budgets: list[api.Budget], want: set[str]
) -> None:
    assert engine.mandatory_namespaces(budgets, namespaces) == want


@pytest.mark.parametrize(("label", "governed"), [
    pytest.param("agent", True, id="the workload's own name"),
    pytest.param("agent-5f6d-abcde", True, id="a pod name that begins with the workload's"),
    pytest.param("listed-pod", True, id="a pod the operator listed for the workload"),
    pytest.param("agentx-0", False, id="a longer name is another workload"),
    pytest.param("other-0", False, id="another workload's pod"),
    pytest.param("-agent-0", False, id="a leading dash names no workload"),
    pytest.param("", True, id="no workload label: cannot be attributed, left out"),
])
def test_which_series_belong_to_a_governed_workload(label: str, governed: bool) -> None:
    w = workload("agent")
    w = type(w)(w.key, w.pod_labels, pods=("listed-pod",))
    names, count = engine.ungoverned([series(5, workload=label)], [w])
    assert (count == 0) is governed
    assert names == (() if governed else (f"{b.NAMESPACE}/{label}",))


def test_idle_series_and_other_namespaces_are_not_ungoverned() -> None:
    names, count = engine.ungoverned(
        [series(0, workload="idle-0"), series(5, namespace="other", workload="agent-0")],
        [workload("agent")])
    assert (names, count) == (("other/agent-0",), 1)


def test_at_most_twenty_ungoverned_labels_are_named_and_all_are_counted() -> None:
    names, count = engine.ungoverned(
        [series(1, workload=f"rogue{i:02d}-0") for i in range(30)], [])
    assert count == 30
    assert len(names) == engine.UNGOVERNED_SHOWN
    assert names[0] == f"{b.NAMESPACE}/rogue00-0"


def test_an_exception_on_a_tenant_budget_never_lifts_a_cluster_budgets_block() -> None:
    ctb = b.cluster_budget(actions=BLOCK)
    until = (NOW + dt.timedelta(days=1)).isoformat()
    tenant = b.token_budget(limits=[{"window": "24h", "tokens": 100_000}], actions=BLOCK,
                            exceptions=[{"until": until, "maxAction": "Warn",
                                         "reason": "launch week"}])
    result = b.evaluate([ctb, tenant], [series(1500)], namespaces=QA)
    directive = result.directives[key()]
    assert directive.blocked
    assert directive.budget == "ClusterTokenBudget/qa"


def test_the_ungoverned_count_is_exported_per_budget_scope() -> None:
    result = b.evaluate([b.cluster_budget(actions=BLOCK)],
                        [series(5, workload="rogue-0"), series(5, workload="stray-1")],
                        namespaces=QA)
    telemetry = Telemetry(None)
    telemetry.observe(result, 0.1)
    assert telemetry.registry.get_sample_value(
        "tokenbudget_ungoverned_workloads",
        {"kind": "ClusterTokenBudget", "budget_namespace": "", "budget": "qa",
         "scope": b.NAMESPACE}) == 2
