"""No way around the budget (issue 19), on the real control plane and Prometheus.

Covers:
- a team removes the agent label from its Deployment (object and pod template)
  and keeps spending through the exporter: under a Mandatory ClusterTokenBudget
  the Deployment is still scaled to zero at the limit;
- without mandatory enrolment the unlabelled Deployment keeps running, and the
  budget's ``status.ungovernedWorkloads`` and an ``UngovernedSpend`` Event name
  the series it spends through;
- a tenant (a client certificate, bound to the built-in ``edit`` role that the
  chart's ClusterRoles aggregate into) manages its namespace's TokenBudgets but
  can neither create nor change a ClusterTokenBudget, and the exception on its
  own budget does not lift the Block the cluster budget sets.

One operator serves the whole module; each test has its own namespace.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_operator import agent_deployment, ann, events

from harness import chart
from harness.controlplane import ControlPlane
from harness.exporter import AgentExporter
from harness.operator_process import OperatorProcess
from harness.prometheus import Prometheus
from harness.spend import seed, spend
from harness.tools import Tools
from harness.waiting import eventually
from token_budget.errors import Forbidden, TargetNotFound
from token_budget.kube import (
    CLUSTERTOKENBUDGETS,
    DEPLOYMENTS,
    NAMESPACES,
    TOKENBUDGETS,
    Kube,
    Resource,
    api_client,
)

A = "tokenbudget.io/"
BLOCK = [{"type": "Block", "atPercent": 100}]
LIMIT = [{"window": "1h", "tokens": 1_000_000}]
CLUSTERROLES = Resource("ClusterRole", "rbac.authorization.k8s.io/v1", "clusterroles",
                        namespaced=False)
ROLEBINDINGS = Resource("RoleBinding", "rbac.authorization.k8s.io/v1", "rolebindings")


@pytest.fixture(scope="module")
def operator(controlplane: ControlPlane, prometheus: Prometheus,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    op = OperatorProcess(controlplane.kubeconfig, prometheus.url,
                         tmp_path_factory.mktemp("enrolment-operator"), identity="op-enrol",
                         extra_args=["--lease-name", f"tb-{uuid.uuid4().hex[:8]}"])
    op.start()
    yield op
    op.stop()


@pytest.fixture
def cluster_budget(kube: Kube, namespace: str) -> Iterator[Any]:
    """Create a ClusterTokenBudget for this test's namespace only (deleted afterwards)."""
    made: list[str] = []

    def create(**spec: Any) -> str:
        name = f"admin-{uuid.uuid4().hex[:6]}"
        kube.patch(NAMESPACES, None, namespace, {"metadata": {"labels": {"budget": name}}})
        kube.create(CLUSTERTOKENBUDGETS, None, {
            "apiVersion": "tokenbudget.io/v1alpha1", "kind": "ClusterTokenBudget",
            "metadata": {"name": name},
            "spec": {"namespaceSelector": {"matchLabels": {"budget": name}},
                     "limits": LIMIT, "actions": BLOCK, **spec}})
        made.append(name)
        return name

    yield create
    for name in made:
        try:
            kube.request("DELETE", CLUSTERTOKENBUDGETS.path(None, name))
        except TargetNotFound:
            pass


def _replicas(kube: Kube, ns: str, name: str) -> int:
    return int(kube.get(DEPLOYMENTS, ns, name)["spec"]["replicas"])


def _unlabelled(kube: Kube, ns: str, name: str) -> None:
    """The team drops the agent label, from the Deployment and from its pod template."""
    kube.patch(DEPLOYMENTS, ns, name, {"metadata": {"labels": {A + "agent": None}}, "spec": {
        "template": {"metadata": {"labels": {A + "agent": None}}}}})
    d = kube.get(DEPLOYMENTS, ns, name)
    assert A + "agent" not in (d["metadata"].get("labels") or {})
    assert A + "agent" not in d["spec"]["template"]["metadata"]["labels"]


def test_a_team_that_drops_the_agent_label_is_still_stopped_under_a_mandatory_budget(
        kube: Kube, namespace: str, exporter: AgentExporter, prometheus: Prometheus,
        operator: OperatorProcess, cluster_budget: Any) -> None:
    ns = namespace
    kube.create(DEPLOYMENTS, ns, agent_deployment("agent", replicas=2))
    _unlabelled(kube, ns, "agent")
    seed(exporter, prometheus, ns, "agent-0")
    spend(exporter, prometheus, ns, "agent-0", 1_500_000)
    # Budgets after the spend, so that their first status counts it (spend figures alone
    # are refreshed only with the status heartbeat).
    name = cluster_budget(enrolment="Mandatory")
    # The team's own budget (default selector: the agent label) governs it too.
    kube.create(TOKENBUDGETS, ns, {
        "apiVersion": "tokenbudget.io/v1alpha1", "kind": "TokenBudget",
        "metadata": {"name": "team"},
        "spec": {"limits": [{"window": "1h", "tokens": 10_000_000}], "actions": BLOCK}})
    eventually(lambda: _replicas(kube, ns, "agent") == 0, 30,
               what="the unlabelled Deployment scaled to zero")
    assert ann(kube.get(DEPLOYMENTS, ns, "agent"))["budget"] == f"ClusterTokenBudget/{name}"
    # The same evaluation writes the status after the workloads (act, then report).
    status = eventually(lambda: kube.get(CLUSTERTOKENBUDGETS, None, name).get("status"), 30,
                        what="the cluster budget's status")
    assert "ungovernedWorkloads" not in status, "under mandatory enrolment it is governed"
    team = eventually(lambda: (kube.get(TOKENBUDGETS, ns, "team").get("status") or {})
                      .get("usedPercent") == 15 and kube.get(TOKENBUDGETS, ns, "team")["status"],
                      30, what="the team budget counting the spend")
    assert "ungovernedWorkloads" not in team, "seen by every budget as carrying the label"


def test_without_mandatory_enrolment_status_and_an_event_name_the_ungoverned_workload(
        kube: Kube, namespace: str, exporter: AgentExporter, prometheus: Prometheus,
        operator: OperatorProcess) -> None:
    ns = namespace
    kube.create(DEPLOYMENTS, ns, agent_deployment("agent", replicas=1))
    rogue = agent_deployment("rogue", replicas=2)
    del rogue["metadata"]["labels"][A + "agent"]
    del rogue["spec"]["template"]["metadata"]["labels"][A + "agent"]
    kube.create(DEPLOYMENTS, ns, rogue)
    kube.create(TOKENBUDGETS, ns, {
        "apiVersion": "tokenbudget.io/v1alpha1", "kind": "TokenBudget",
        "metadata": {"name": "team"}, "spec": {"limits": LIMIT, "actions": BLOCK}})
    # Only the unlabelled Deployment spends (seed waits for the namespace's first series).
    seed(exporter, prometheus, ns, "rogue-0")
    spend(exporter, prometheus, ns, "rogue-0", 1_500_000)

    def reported() -> dict[str, Any] | None:
        st = kube.get(TOKENBUDGETS, ns, "team").get("status") or {}
        return st if st.get("state") == "Blocked" and st.get("ungovernedWorkloads") else None

    status = eventually(reported, 30, what="Blocked with ungoverned spend")
    assert status["ungovernedWorkloads"] == [f"{ns}/rogue-0"]
    [event] = eventually(lambda: events(kube, ns, "UngovernedSpend"), 15,
                         what="an UngovernedSpend Event")
    assert event["involvedObject"]["name"] == "team"
    assert f"{ns}/rogue-0" in event["message"]
    eventually(lambda: _replicas(kube, ns, "agent") == 0, 30, what="the governed agent blocked")
    assert _replicas(kube, ns, "rogue") == 2, "nothing governs the unlabelled Deployment"


def _tenant_roles(kube: Kube, helm: Path) -> list[str]:
    """The chart's aggregated ClusterRoles, under a release name of their own."""
    names = []
    for doc in chart.render(helm, release="tenant-rbac"):
        labels = doc["metadata"].get("labels") or {}
        if doc["kind"] == "ClusterRole" and any(
                k.startswith("rbac.authorization.k8s.io/aggregate-to-") for k in labels):
            try:
                kube.request("DELETE", CLUSTERROLES.path(None, doc["metadata"]["name"]))
            except TargetNotFound:
                pass
            kube.create(CLUSTERROLES, None, doc)
            names.append(doc["metadata"]["name"])
    return names


def test_a_tenant_cannot_touch_a_cluster_budget_and_its_exception_does_not_lift_the_block(
        kube: Kube, namespace: str, exporter: AgentExporter, prometheus: Prometheus,
        operator: OperatorProcess, controlplane: ControlPlane, tools: Tools,
        cluster_budget: Any) -> None:
    ns = namespace
    roles = _tenant_roles(kube, tools.helm)
    try:
        user = f"tenant-{uuid.uuid4().hex[:6]}"
        kube.create(ROLEBINDINGS, ns, {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "team-editors"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": "edit"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                          "name": user}]})
        tenant = Kube(api_client(str(controlplane.issue_client_kubeconfig(user))))
        name = cluster_budget()
        kube.create(DEPLOYMENTS, ns, agent_deployment("agent", replicas=1))
        until = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        own = {"apiVersion": "tokenbudget.io/v1alpha1", "kind": "TokenBudget",
               "metadata": {"name": "ours"},
               "spec": {"limits": LIMIT, "actions": BLOCK, "exceptions": [
                   {"until": until, "maxAction": "Warn", "reason": "launch week"}]}}

        def created() -> bool:
            try:
                tenant.create(TOKENBUDGETS, ns, own)
                return True
            except Forbidden:
                return False  # the aggregation controller has not filled "edit" yet

        eventually(created, 30, what="the tenant may create its own TokenBudget")
        with pytest.raises(Forbidden):
            tenant.patch(CLUSTERTOKENBUDGETS, None, name,
                         {"spec": {"limits": [{"window": "1h", "tokens": 10**12}]}})
        with pytest.raises(Forbidden):
            tenant.create(CLUSTERTOKENBUDGETS, None, {
                "apiVersion": "tokenbudget.io/v1alpha1", "kind": "ClusterTokenBudget",
                "metadata": {"name": f"mine-{user}"},
                "spec": {"namespaceSelector": {"matchLabels": {"budget": "none"}},
                         "limits": LIMIT}})
        with pytest.raises(Forbidden):
            tenant.patch(TOKENBUDGETS, ns, "ours", {"status": {"state": "Ok"}}, sub="status")

        seed(exporter, prometheus, ns, "agent-0")
        spend(exporter, prometheus, ns, "agent-0", 1_500_000)
        eventually(lambda: _replicas(kube, ns, "agent") == 0, 30,
                   what=f"blocked by the cluster budget:\n{operator.tail(20)}")
        assert ann(kube.get(DEPLOYMENTS, ns, "agent"))["budget"] == f"ClusterTokenBudget/{name}"
        ours = eventually(lambda: (kube.get(TOKENBUDGETS, ns, "ours").get("status") or {})
                          .get("reason") == "ExceptionActive"
                          and kube.get(TOKENBUDGETS, ns, "ours")["status"], 30,
                          what="the tenant's budget capped by its exception")
        assert ours["state"] == "Warning"
        assert _replicas(kube, ns, "agent") == 0, "the exception lifted nothing"
    finally:
        for role in roles:
            kube.request("DELETE", CLUSTERROLES.path(None, role))
