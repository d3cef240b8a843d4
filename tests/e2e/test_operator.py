"""The operator end to end, on the real control plane and the real Prometheus.

Covers (issue 4): the ladder Warn -> Reroute -> Throttle -> Block on a Deployment,
its pods and a CronJob, and the exact restore when the limit is raised; drift
correction; a ClusterTokenBudget following a namespace label; a deleted budget
undoing everything; a SIGKILL between scale-down and status write; Prometheus
down under each missing-data policy; DryRun; two replicas with one leader;
quiet evaluations writing nothing. Each test runs its own operator process
(``python -m token_budget run``) with its own leader Lease.

Spend goes through the synthetic exporter -> Prometheus (1 s scrape) -> the
operator's PromQL, so the path is the one production takes.
"""

from __future__ import annotations

import copy
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import kubeobjects
from harness.controlplane import ControlPlane
from harness.exporter import AgentExporter
from harness.operator_process import OperatorProcess
from harness.prometheus import Prometheus
from harness.spend import seed, spend
from harness.waiting import eventually
from token_budget.handlers.finalizers import FINALIZER
from token_budget.kube import (
    CLUSTERTOKENBUDGETS,
    CRONJOBS,
    DEPLOYMENTS,
    LEASES,
    NAMESPACES,
    PODS,
    TOKENBUDGETS,
    Kube,
)

REPO = Path(__file__).resolve().parents[2]
A = "tokenbudget.io/"
LADDER = [
    {"type": "Warn", "atPercent": 50},
    {"type": "Reroute", "atPercent": 70},
    {"type": "Throttle", "atPercent": 85, "tokensPerMinute": 1000},
    {"type": "Block", "atPercent": 100},
]


@pytest.fixture
def start_operator(controlplane: ControlPlane, prometheus: Prometheus,
                   tmp_path: Path) -> Iterator[Any]:
    """Start operator processes for this test; all are stopped afterwards."""
    lease = f"tb-{uuid.uuid4().hex[:8]}"
    started: list[OperatorProcess] = []

    def start(identity: str = "op-1", *extra: str) -> OperatorProcess:
        op = OperatorProcess(controlplane.kubeconfig, prometheus.url, tmp_path,
                             identity=identity, extra_args=["--lease-name", lease, *extra])
        op.start()
        started.append(op)
        return op

    yield start
    for op in started:
        op.stop()


# -- helpers ----------------------------------------------------------------------


def agent_deployment(name: str, replicas: int = 2, model: str = "gpt-4o") -> dict[str, Any]:
    labels = {"app": name, A + "agent": "true"}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "labels": {A + "agent": "true"}},
        "spec": {
            "replicas": replicas, "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": [
                {"name": "agent", "image": "example/agent:1",
                 "env": [{"name": "LLM_MODEL", "value": model}]}]}},
        },
    }


def agent_cronjob(name: str) -> dict[str, Any]:
    labels = {A + "agent": "true"}
    return {
        "apiVersion": "batch/v1", "kind": "CronJob",
        "metadata": {"name": name, "labels": labels},
        "spec": {"schedule": "*/5 * * * *", "suspend": False, "jobTemplate": {"spec": {
            "template": {"metadata": {"labels": labels}, "spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "job", "image": "example/agent:1"}]}}}}},
    }


def budget(name: str, limit_tokens: int = 1_000_000, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "tokenbudget.io/v1alpha1", "kind": "TokenBudget",
        "metadata": {"name": name},
        "spec": {"limits": [{"window": "1h", "tokens": limit_tokens}],
                 "actions": copy.deepcopy(LADDER)},
    }
    body["spec"].update(spec)
    return body


def ann(obj: dict[str, Any]) -> dict[str, str]:
    return {k[len(A):]: v for k, v in (obj["metadata"].get("annotations") or {}).items()
            if k.startswith(A)}


def wait_state(kube: Kube, ns: str, name: str, want: str, timeout: float = 30) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        b = kube.get(TOKENBUDGETS, ns, name)
        return b if (b.get("status") or {}).get("state") == want else None

    return eventually(probe, timeout, what=f"TokenBudget {ns}/{name} state {want}")


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return dict(c)
    raise AssertionError(f"no {type_} condition in {obj.get('status')}")


def events(kube: Kube, ns: str, reason: str) -> list[dict[str, Any]]:
    data = kube.request("GET", f"/api/v1/namespaces/{ns}/events")
    return [e for e in data["items"] if e.get("reason") == reason]


# -- tests ------------------------------------------------------------------------


def test_spend_climbs_the_ladder_and_a_raised_limit_restores_everything_exactly(
        kube: Kube, namespace: str, exporter: AgentExporter, prometheus: Prometheus,
        start_operator: Any) -> None:
    ns = namespace
    kube.create(DEPLOYMENTS, ns, agent_deployment("agent", replicas=2))
    kube.create(CRONJOBS, ns, agent_cronjob("nightly"))
    eventually(lambda: len(kube.list(PODS, ns, "app=agent")) == 2, 60, what="2 agent pods")
    seed(exporter, prometheus, ns, "agent-0")
    kube.create(TOKENBUDGETS, ns, budget("team"))
    op = start_operator()

    wait_state(kube, ns, "team", "Ok")
    dep = kube.get(DEPLOYMENTS, ns, "agent")
    before = ann(dep)
    assert before["state"] == "Ok" and before["budget"] == f"TokenBudget/{ns}/team"

    spend(exporter, prometheus, ns, "agent-0", 600_000)
    wait_state(kube, ns, "team", "Warning")
    assert ann(kube.get(DEPLOYMENTS, ns, "agent"))["state"] == "Warning"

    spend(exporter, prometheus, ns, "agent-0", 150_000)
    wait_state(kube, ns, "team", "Rerouted")
    d = ann(kube.get(DEPLOYMENTS, ns, "agent"))
    assert d["use-model"] == "gpt-4o-mini", "the catalog's cheaper equivalent of gpt-4o"
    for pod in kube.list(PODS, ns, "app=agent"):
        assert ann(pod)["use-model"] == "gpt-4o-mini", "running pods get the directive too"

    spend(exporter, prometheus, ns, "agent-0", 130_000)
    wait_state(kube, ns, "team", "Throttled")
    d = ann(kube.get(DEPLOYMENTS, ns, "agent"))
    assert d["tokens-per-minute"] == "1000" and d["use-model"] == "gpt-4o-mini"

    visible = spend(exporter, prometheus, ns, "agent-0", 300_000)
    annotated = eventually(lambda: ann(kube.get(DEPLOYMENTS, ns, "agent")).get("state")
                           == "Blocked" and time.monotonic(), 30, what="Blocked annotation")
    scaled = eventually(lambda: kube.get(DEPLOYMENTS, ns, "agent")["spec"]["replicas"] == 0
                        and time.monotonic(), 30, what="replicas 0")
    print(f"\nenforcement latency at a 2 s interval: annotated {annotated - visible:.2f} s, "
          f"replicas 0 {scaled - visible:.2f} s after spend was visible in Prometheus")
    dep = kube.get(DEPLOYMENTS, ns, "agent")
    assert ann(dep)["previous-replicas"] == "2"
    cron = kube.get(CRONJOBS, ns, "nightly")
    assert cron["spec"]["suspend"] is True and ann(cron)["previous-suspend"] == "false"
    eventually(lambda: not kube.list(PODS, ns, "app=agent"), 60, what="pods gone")
    assert events(kube, ns, "Blocked"), "an Event says why the workload stopped"
    assert condition(kube.get(TOKENBUDGETS, ns, "team"), "Enforcing")["status"] == "True"

    # Drift: someone scales the blocked agent up; it is blocked again within an interval.
    kube.patch(DEPLOYMENTS, ns, "agent", {"spec": {"replicas": 3}})
    eventually(lambda: kube.get(DEPLOYMENTS, ns, "agent")["spec"]["replicas"] == 0, 30,
               what="drift corrected")
    assert events(kube, ns, "DriftCorrected")
    assert ann(kube.get(DEPLOYMENTS, ns, "agent"))["previous-replicas"] == "2", \
        "the count from before the block is kept, not the drifted one"

    # Someone deletes the directive annotations: they come back.
    kube.patch(DEPLOYMENTS, ns, "agent", {"metadata": {"annotations": {A + "state": None}}})
    eventually(lambda: ann(kube.get(DEPLOYMENTS, ns, "agent")).get("state") == "Blocked", 30,
               what="annotation restored")

    kube.patch(TOKENBUDGETS, ns, "team",
               {"spec": {"limits": [{"window": "1h", "tokens": 100_000_000}]}})
    wait_state(kube, ns, "team", "Ok")
    eventually(lambda: kube.get(DEPLOYMENTS, ns, "agent")["spec"]["replicas"] == 2, 30,
               what="replicas restored")
    dep = kube.get(DEPLOYMENTS, ns, "agent")
    assert ann(dep).keys() == before.keys(), "the directive is back to what it was"
    assert ann(dep)["state"] == "Ok"
    cron = kube.get(CRONJOBS, ns, "nightly")
    assert cron["spec"]["suspend"] is False and "previous-suspend" not in ann(cron)
    eventually(lambda: len(kube.list(PODS, ns, "app=agent")) == 2, 60, what="pods back")
    assert op.running()


def test_a_quiet_evaluation_makes_no_write_request(
        kube: Kube, namespace: str, exporter: AgentExporter, prometheus: Prometheus,
        start_operator: Any) -> None:
    ns = namespace
    kube.create(DEPLOYMENTS, ns, agent_deployment("agent", replicas=1))
    seed(exporter, prometheus, ns, "agent-0")
    spend(exporter, prometheus, ns, "agent-0", 550_000)
    kube.create(TOKENBUDGETS, ns, budget("team"))
    # Watching this namespace only: other tests' namespaces being torn down meanwhile
    # (their budgets deleted, their pods set back to Ok) are not this evaluation's writes.
    op = start_operator("op-1", "--namespace", ns)
    wait_state(kube, ns, "team", "Warning")
    time.sleep(5)  # let the first writes (annotations on the pod as it appears) settle

    def writes() -> float:
        text = op.metrics()
        return sum(float(m.group(2)) for m in re.finditer(
            r'^tokenbudget_api_requests_total\{verb="(PATCH|POST|PUT|DELETE)"\} (\S+)', text,
            re.M))

    def evaluations() -> float:
        m = re.search(r"^tokenbudget_evaluation_duration_seconds_count (\S+)", op.metrics(),
                      re.M)
        return float(m.group(1)) if m else 0.0

    w0, e0 = writes(), evaluations()
    time.sleep(8)
    w1, e1 = writes(), evaluations()
    assert e1 - e0 >= 3, "the operator kept evaluating"
    assert w1 - w0 == 0, f"{w1 - w0} writes in {e1 - e0} quiet evaluations:\n{op.tail(30)}"
    print(f"\nquiet evaluations: {e1 - e0:.0f}, write requests: {w1 - w0:.0f}")


def test_a_cluster_budget_follows_the_namespace_label(
        kube: Kube, namespace: str, exporter: AgentExporter, prometheus: Prometheus,
        start_operator: Any) -> None:
    ns = namespace
    env = f"qa-{uuid.uuid4().hex[:6]}"
    kube.create(DEPLOYMENTS, ns, agent_deployment("agent", replicas=1))
    seed(exporter, prometheus, ns, "agent-0")
    spend(exporter, prometheus, ns, "agent-0", 2_000_000)  # far over the QA cap
    ctb = {
        "apiVersion": "tokenbudget.io/v1alpha1", "kind": "ClusterTokenBudget",
        "metadata": {"name": env},
        "spec": {"namespaceSelector": {"matchLabels": {"environment": env}},
                 "deniedTiers": ["Frontier"],
                 "limits": [{"window": "1h", "tokens": 1_000_000}],
                 "actions": [{"type": "Warn", "atPercent": 50},
                             {"type": "Block", "atPercent": 100}]},
    }
    kube.create(CLUSTERTOKENBUDGETS, None, ctb)
    try:
        start_operator()
        time.sleep(4)
        assert "state" not in ann(kube.get(DEPLOYMENTS, ns, "agent")), \
            "without the label the namespace is not governed"

        kube.patch(NAMESPACES, None, ns, {"metadata": {"labels": {"environment": env}}})
        eventually(lambda: kube.get(DEPLOYMENTS, ns, "agent")["spec"]["replicas"] == 0, 30,
                   what="blocked once labelled")
        d = ann(kube.get(DEPLOYMENTS, ns, "agent"))
        assert d["budget"] == f"ClusterTokenBudget/{env}"
        assert "gpt-4o" not in d["allowed-models"].split(","), "Frontier tier denied"
        assert "gpt-4o-mini" in d["allowed-models"].split(",")
        # Workloads are changed first, then the status is written in the same evaluation.
        status = eventually(lambda: (kube.get(CLUSTERTOKENBUDGETS, None, env).get("status")
                                     or {}).get("state") == "Blocked"
                            and kube.get(CLUSTERTOKENBUDGETS, None, env)["status"], 30,
                            what="status Blocked")
        assert [n["namespace"] for n in status["namespaces"]] == [ns]

        kube.patch(NAMESPACES, None, ns, {"metadata": {"labels": {"environment": None}}})
        eventually(lambda: kube.get(DEPLOYMENTS, ns, "agent")["spec"]["replicas"] == 1, 30,
                   what="restored once unlabelled")
        eventually(lambda: "state" not in ann(kube.get(DEPLOYMENTS, ns, "agent")), 30,
                   what="directive removed")
    finally:
        kube.request("DELETE", CLUSTERTOKENBUDGETS.path(None, env))


def test_deleting_a_budget_undoes_everything_it_did(
        kube: Kube, namespace: str, exporter: AgentExporter, prometheus: Prometheus,
        start_operator: Any) -> None:
    ns = namespace
    kube.create(DEPLOYMENTS, ns, agent_deployment("agent", replicas=3))
    seed(exporter, prometheus, ns, "agent-0")
    spend(exporter, prometheus, ns, "agent-0", 1_500_000)
    kube.create(TOKENBUDGETS, ns, budget("team"))
    start_operator()
    eventually(lambda: kube.get(DEPLOYMENTS, ns, "agent")["spec"]["replicas"] == 0, 30,
               what="blocked")
    # The finalizer is what holds the deletion until the workloads are restored; the first
    # evaluation can block before kopf has added it.
    eventually(lambda: FINALIZER in (kube.get(TOKENBUDGETS, ns, "team")["metadata"]
                                     .get("finalizers") or []), 30, what="the finalizer")
    kube.request("DELETE", TOKENBUDGETS.path(ns, "team"))
    eventually(lambda: not [b for b in kube.list(TOKENBUDGETS, ns)], 60,
               what="budget gone (finalizer released)")
    dep = kube.get(DEPLOYMENTS, ns, "agent")
    assert dep["spec"]["replicas"] == 3
    assert ann(dep) == {}, "no directive, no saved state is left behind"
    assert A + "enforced" not in (dep["metadata"].get("labels") or {})
    for pod in kube.list(PODS, ns, "app=agent"):
        assert ann(pod) == {}


def test_an_operator_killed_after_the_scale_down_loses_nothing(
        kube: Kube, namespace: str, exporter: AgentExporter, prometheus: Prometheus,
        start_operator: Any) -> None:
    ns = namespace
    kube.create(DEPLOYMENTS, ns, agent_deployment("agent", replicas=4))
    seed(exporter, prometheus, ns, "agent-0")
    spend(exporter, prometheus, ns, "agent-0", 1_500_000)
    kube.create(TOKENBUDGETS, ns, budget("team"))
    op = start_operator("op-a")
    # Kill it the moment the scale-down lands, before it can be sure of anything else.
    eventually(lambda: kube.get(DEPLOYMENTS, ns, "agent")["spec"]["replicas"] == 0, 30,
               interval=0.05, what="scaled down")
    op.kill()
    assert ann(kube.get(DEPLOYMENTS, ns, "agent"))["previous-replicas"] == "4", \
        "the previous count was written in the same request as the scale-down"
    kube.patch(TOKENBUDGETS, ns, "team",
               {"spec": {"limits": [{"window": "1h", "tokens": 100_000_000}]}})
    start_operator("op-b")
    eventually(lambda: kube.get(DEPLOYMENTS, ns, "agent")["spec"]["replicas"] == 4, 40,
               what="restored by the new operator")
    assert "previous-replicas" not in ann(kube.get(DEPLOYMENTS, ns, "agent"))


def test_when_prometheus_is_down_each_budget_follows_its_missing_data_policy(
        kube: Kube, namespace: str, exporter: AgentExporter, prometheus: Prometheus,
        start_operator: Any) -> None:
    ns = namespace
    policies = {"hold": "Hold", "open": "FailOpen", "closed": "FailClosed"}
    for name in policies:
        dep = agent_deployment(name, replicas=1)
        dep["spec"]["template"]["metadata"]["labels"]["policy"] = name
        kube.create(DEPLOYMENTS, ns, dep)
    seed(exporter, prometheus, ns, "agent-0")
    spend(exporter, prometheus, ns, "agent-0", 600_000)  # 60 %: Warning everywhere
    for name, policy in policies.items():
        kube.create(TOKENBUDGETS, ns, budget(
            name, selector={"matchLabels": {"policy": name}},
            whenSpendUnknown={"policy": policy, "staleAfterSeconds": 600}))
    start_operator()
    for name in policies:
        wait_state(kube, ns, name, "Warning")

    prometheus.stop()
    try:
        wait_state(kube, ns, "closed", "Blocked")
        eventually(lambda: kube.get(DEPLOYMENTS, ns, "closed")["spec"]["replicas"] == 0, 30,
                   what="FailClosed blocks")
        wait_state(kube, ns, "open", "Ok")
        held = wait_state(kube, ns, "hold", "Warning")
        assert held["status"]["reason"] == "SpendUnknownHolding"
        for name in policies:
            c = condition(kube.get(TOKENBUDGETS, ns, name), "MetricsAvailable")
            assert c["status"] == "False" and "cannot be reached" in c["message"]
        assert ann(kube.get(DEPLOYMENTS, ns, "hold"))["state"] == "Warning", \
            "Hold leaves the workload's directive as it was"
        assert ann(kube.get(DEPLOYMENTS, ns, "open"))["state"] == "Ok"
    finally:
        prometheus.start()
    for name in policies:
        wait_state(kube, ns, name, "Warning", timeout=60)
    eventually(lambda: kube.get(DEPLOYMENTS, ns, "closed")["spec"]["replicas"] == 1, 30,
               what="FailClosed lifted once spend is known again")


def test_dry_run_decides_and_reports_but_touches_no_workload(
        kube: Kube, namespace: str, exporter: AgentExporter, prometheus: Prometheus,
        start_operator: Any) -> None:
    ns = namespace
    kube.create(DEPLOYMENTS, ns, agent_deployment("agent", replicas=2))
    seed(exporter, prometheus, ns, "agent-0")
    spend(exporter, prometheus, ns, "agent-0", 1_500_000)
    kube.create(TOKENBUDGETS, ns, budget("global"))
    kube.create(TOKENBUDGETS, ns, budget("per-budget", mode="DryRun"))
    start_operator("op-dry", "--dry-run")
    b = wait_state(kube, ns, "global", "Blocked")
    assert b["status"]["usedPercent"] >= 100
    wait_state(kube, ns, "per-budget", "Blocked")
    assert condition(kube.get(TOKENBUDGETS, ns, "per-budget"), "Enforcing")["reason"] == \
        "DryRun"
    time.sleep(4)
    dep = kube.get(DEPLOYMENTS, ns, "agent")
    assert dep["spec"]["replicas"] == 2 and ann(dep) == {}


def test_of_two_replicas_only_the_leader_acts_and_the_other_takes_over(
        kube: Kube, namespace: str, exporter: AgentExporter, prometheus: Prometheus,
        start_operator: Any) -> None:
    ns = namespace
    kube.create(DEPLOYMENTS, ns, agent_deployment("agent", replicas=1))
    seed(exporter, prometheus, ns, "agent-0")
    kube.create(TOKENBUDGETS, ns, budget("team"))
    first = start_operator("replica-a")
    wait_state(kube, ns, "team", "Ok")
    second = start_operator("replica-b")
    leases = [x for x in kube.list(LEASES, "default") if x["spec"].get("holderIdentity")
              in ("replica-a", "replica-b")]
    assert [x["spec"]["holderIdentity"] for x in leases] == ["replica-a"]

    def evaluations(op: OperatorProcess) -> float:
        m = re.search(r"^tokenbudget_evaluation_duration_seconds_count (\S+)", op.metrics(),
                      re.M)
        return float(m.group(1)) if m else 0.0

    time.sleep(4)
    assert evaluations(second) == 0, "the standby replica does not evaluate"
    first.kill()
    spend(exporter, prometheus, ns, "agent-0", 600_000)
    wait_state(kube, ns, "team", "Warning", timeout=40)
    assert evaluations(second) > 0, "the standby took over once the Lease expired"


def test_a_window_longer_than_the_retention_is_marked_incomplete_with_the_covered_share(
        kube: Kube, namespace: str, exporter: AgentExporter, prometheus: Prometheus,
        start_operator: Any) -> None:
    ns = namespace
    kube.create(DEPLOYMENTS, ns, agent_deployment("agent", replicas=1))
    seed(exporter, prometheus, ns, "agent-0")
    spend(exporter, prometheus, ns, "agent-0", 100_000)
    # The test Prometheus keeps 1 day; a 4-day window is a quarter covered.
    kube.create(TOKENBUDGETS, ns, budget("team", limits=[{"window": "4d",
                                                           "tokens": 10_000_000}]))
    start_operator()

    def incomplete() -> dict[str, Any] | None:
        b = kube.get(TOKENBUDGETS, ns, "team")
        try:
            c = condition(b, "DataIncomplete")
        except AssertionError:
            return None
        return b if c["status"] == "True" else None

    b = eventually(incomplete, 30, what="DataIncomplete=True")
    c = condition(b, "DataIncomplete")
    assert c["reason"] == "RetentionShorterThanWindow"
    assert "window 4d: 25% of it is still in Prometheus" in c["message"]
    [w] = b["status"]["windows"]
    assert w["coveredPercent"] == 25
    assert w["tokens"] >= 4 * 100_000, "the uncovered part is estimated, not zero"


SCALEDOBJECT_CRD = {
    # A stand-in for KEDA's CRD (same group, version, kind and plural; no schema): the
    # operator only needs the kind to be served and its annotations to be writable.
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": "scaledobjects.keda.sh"},
    "spec": {"group": "keda.sh", "scope": "Namespaced",
             "names": {"kind": "ScaledObject", "plural": "scaledobjects",
                       "singular": "scaledobject", "listKind": "ScaledObjectList"},
             "versions": [{"name": "v1alpha1", "served": True, "storage": True,
                           "schema": {"openAPIV3Schema": {
                               "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]},
}


def test_a_blocked_workload_scaled_by_keda_is_paused_through_keda_and_an_hpa_left_idle(
        kube: Kube, kube_api: Any, namespace: str, exporter: AgentExporter,
        prometheus: Prometheus, start_operator: Any) -> None:
    from token_budget.kube import SCALEDOBJECTS, Resource

    kubeobjects.apply_crd(kube_api, SCALEDOBJECT_CRD)
    hpas = Resource("HorizontalPodAutoscaler", "autoscaling/v2", "horizontalpodautoscalers")
    ns = namespace
    kube.create(DEPLOYMENTS, ns, agent_deployment("keda-agent", replicas=2))
    kube.create(DEPLOYMENTS, ns, agent_deployment("hpa-agent", replicas=3))
    kube.create(SCALEDOBJECTS, ns, {
        "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
        "metadata": {"name": "keda-agent"},
        "spec": {"scaleTargetRef": {"name": "keda-agent"}, "minReplicaCount": 1,
                 "triggers": [{"type": "cpu", "metadata": {"value": "50"}}]}})
    kube.create(hpas, ns, {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "hpa-agent"},
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment",
                                    "name": "hpa-agent"},
                 "minReplicas": 1, "maxReplicas": 5}})
    seed(exporter, prometheus, ns, "agent-0")
    spend(exporter, prometheus, ns, "agent-0", 1_500_000)
    kube.create(TOKENBUDGETS, ns, budget("team"))
    start_operator()

    def paused() -> bool:
        so = kube.get(SCALEDOBJECTS, ns, "keda-agent")
        return ann(so).get("paused-by") == f"TokenBudget/{ns}/team" and \
            so["metadata"]["annotations"].get("autoscaling.keda.sh/paused-replicas") == "0"

    eventually(paused, 30, what="the ScaledObject paused at zero")
    eventually(lambda: kube.get(DEPLOYMENTS, ns, "hpa-agent")["spec"]["replicas"] == 0, 30,
               what="the HPA's target at zero")
    enforcing = eventually(lambda: "KEDA" in condition(kube.get(TOKENBUDGETS, ns, "team"),
                                                       "Enforcing")["message"]
                           and condition(kube.get(TOKENBUDGETS, ns, "team"), "Enforcing"), 30,
                           what="status naming the autoscalers")
    assert "1 scaled by a HorizontalPodAutoscaler" in enforcing["message"]
    assert "1 scaled by KEDA, paused with autoscaling.keda.sh/paused-replicas=0" in \
        enforcing["message"]

    kube.patch(TOKENBUDGETS, ns, "team",
               {"spec": {"limits": [{"window": "1h", "tokens": 100_000_000}]}})
    eventually(lambda: "autoscaling.keda.sh/paused-replicas" not in (
        kube.get(SCALEDOBJECTS, ns, "keda-agent")["metadata"].get("annotations") or {}), 30,
        what="the ScaledObject resumed")
    so_ann = kube.get(SCALEDOBJECTS, ns, "keda-agent")["metadata"].get("annotations") or {}
    assert not any(k.startswith(A) for k in so_ann), "nothing of the operator's is left"
    eventually(lambda: kube.get(DEPLOYMENTS, ns, "hpa-agent")["spec"]["replicas"] == 3, 30,
               what="the HPA's target restored")
