"""Admission webhooks end to end: the real kube-apiserver calls the operator over TLS.

Covers (issue 5): an invalid budget is refused with the webhook's message and a
valid one passes; a pod declaring a denied model is refused in an
``environment=qa`` namespace and accepted in production; a pod in a Blocked
scope is refused with the budget, the rule and when the window resets; a new
pod of a governed Deployment is stamped with its owner's directive; the opt-in
label mounts the downward API file; a pod without the agent label is neither
refused nor changed outside mandatory namespaces; the configurations carry the
operator's own CA, fail open for pods and exclude system namespaces; the
certificate lives in a Secret. Issue 19: the
agent label's removal is refused where enrolment is mandatory, allowed elsewhere.
Issue 16: a new pod costs one call (the mutating webhook refuses, no validating pod
webhook exists, reinvoked if a later mutator changed the pod); the admission process,
SIGKILLed, lets pods in meanwhile (fail open) and answers again within seconds.
"""

from __future__ import annotations

import base64
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import webhooks
from harness.controlplane import ControlPlane
from harness.exporter import AgentExporter
from harness.operator_process import OperatorProcess
from harness.prometheus import Prometheus
from harness.spend import seed, spend
from harness.waiting import eventually
from token_budget.errors import EnforcementError, TargetNotFound
from token_budget.kube import (
    CLUSTERTOKENBUDGETS,
    DEPLOYMENTS,
    NAMESPACES,
    PODS,
    TOKENBUDGETS,
    Kube,
)
from token_budget.webhooks.certificates import SECRETS
from token_budget.webhooks.configuration import MUTATING, NAME, VALIDATING

REPO = Path(__file__).resolve().parents[2]
A = "tokenbudget.io/"


@pytest.fixture(scope="module")
def operator(kube: Kube, controlplane: ControlPlane, prometheus: Prometheus,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    """One operator serving webhooks on a loopback port; configurations removed afterwards."""
    with webhooks.serving_operator(kube, controlplane.kubeconfig, prometheus.url,
                                   tmp_path_factory.mktemp("webhook-operator"),
                                   identity="webhooks") as op:
        yield op


def pod(name: str, model: str | None = None, labels: dict[str, str] | None = None
        ) -> dict[str, Any]:
    env = [{"name": "LLM_MODEL", "value": model}] if model else []
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": labels or {A + "agent": "true"}},
            "spec": {"containers": [{"name": "a", "image": "example/agent:1", "env": env}]}}


def refused(call: Any) -> str:
    try:
        call()
    except EnforcementError as exc:
        return str(exc)
    raise AssertionError("the API server accepted what the webhook should refuse")


def test_an_invalid_budget_is_refused_with_the_webhooks_reason_and_a_valid_one_passes(
        kube: Kube, operator: OperatorProcess, namespace: str) -> None:
    bad = {"apiVersion": "tokenbudget.io/v1alpha1", "kind": "TokenBudget",
           "metadata": {"name": "bad"},
           "spec": {"limits": [{"window": "1h", "tokens": 100}],
                    "actions": [{"type": "Reroute", "atPercent": 50, "model": "gpt-9-ultra"},
                                {"type": "Block", "atPercent": 100}]}}
    message = refused(lambda: kube.create(TOKENBUDGETS, namespace, bad))
    assert "spec.actions[0].model: must name a model in a ModelCatalog" in message
    good = dict(bad, metadata={"name": "good"})
    good["spec"] = dict(bad["spec"], actions=[
        {"type": "Reroute", "atPercent": 50, "model": "gpt-4o-mini"},
        {"type": "Block", "atPercent": 100}])
    kube.create(TOKENBUDGETS, namespace, good)


def test_a_denied_model_is_refused_in_qa_and_accepted_in_production(
        kube: Kube, operator: OperatorProcess, namespace: str) -> None:
    prod = f"{namespace}-prod"
    kube.create(NAMESPACES, None, {"apiVersion": "v1", "kind": "Namespace",
                                   "metadata": {"name": prod}})
    env = webhooks.deny_frontier_in(kube, namespace)
    try:
        def denied() -> str:
            try:
                kube.create(PODS, namespace, pod("frontier", "openai/gpt-4o-2024-08-06"))
            except EnforcementError as exc:
                return str(exc)
            kube.request("DELETE", PODS.path(namespace, "frontier"))
            return ""

        message = eventually(denied, 30, what="the webhook to know the new budget")
        assert "403" in message
        assert f"model openai/gpt-4o-2024-08-06 is not allowed by ClusterTokenBudget {env}" \
            in message
        assert "deniedTiers includes Frontier" in message and "gpt-4o-mini" in message
        kube.create(PODS, namespace, pod("economy", "gpt-4o-mini"))
        eventually(lambda: _exists_ns(kube, prod), 30,
                   what="namespace")
        _wait_sa(kube, prod)
        kube.create(PODS, prod, pod("frontier", "openai/gpt-4o-2024-08-06"))
    finally:
        kube.request("DELETE", CLUSTERTOKENBUDGETS.path(None, env))
        kube.request("DELETE", NAMESPACES.path(None, prod))


def _exists_ns(kube: Kube, name: str) -> bool:
    try:
        kube.get(NAMESPACES, None, name)
        return True
    except TargetNotFound:
        return False


def _wait_sa(kube: Kube, ns: str) -> None:
    def ready() -> bool:
        try:
            kube.request("GET", f"/api/v1/namespaces/{ns}/serviceaccounts/default")
            return True
        except TargetNotFound:
            return False

    eventually(ready, 60, what=f"default ServiceAccount in {ns}")


def test_a_pod_in_a_blocked_scope_is_refused_with_the_budget_and_the_reset(
        kube: Kube, operator: OperatorProcess, namespace: str, exporter: AgentExporter,
        prometheus: Prometheus) -> None:
    seed(exporter, prometheus, namespace, "agent-0")
    spend(exporter, prometheus, namespace, "agent-0", 5_000_000)
    kube.create(TOKENBUDGETS, namespace, {
        "apiVersion": "tokenbudget.io/v1alpha1", "kind": "TokenBudget",
        "metadata": {"name": "team"},
        "spec": {"limits": [{"window": "Day", "timeZone": "Europe/Berlin", "tokens": 1_000_000}]}})
    eventually(lambda: (kube.get(TOKENBUDGETS, namespace, "team").get("status") or {})
               .get("state") == "Blocked", 40, what="budget Blocked")

    def denied() -> str:
        try:
            kube.create(PODS, namespace, pod("late"))
        except EnforcementError as exc:
            return str(exc)
        kube.request("DELETE", PODS.path(namespace, "late"))
        return ""

    message = eventually(denied, 30, what="a refusal")
    assert f"TokenBudget {namespace}/team is Blocked in namespace {namespace}" in message
    assert "the window resets at" in message
    # A pod that is not an agent is none of the budget's business.
    kube.create(PODS, namespace, pod("sidecar-free", labels={"app": "web"}))
    # So is a new Deployment of agents: refused at once, with the same reason.
    dep = {"apiVersion": "apps/v1", "kind": "Deployment",
           "metadata": {"name": "more", "labels": {A + "agent": "true"}},
           "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "more"}},
                    "template": {"metadata": {"labels": {"app": "more", A + "agent": "true"}},
                                 "spec": {"containers": [{"name": "a", "image": "x"}]}}}}
    assert "is Blocked" in refused(lambda: kube.create(DEPLOYMENTS, namespace, dep))


def test_a_new_pod_of_a_governed_deployment_starts_with_its_owners_directive(
        kube: Kube, operator: OperatorProcess, namespace: str, exporter: AgentExporter,
        prometheus: Prometheus) -> None:
    seed(exporter, prometheus, namespace, "agent-0")
    spend(exporter, prometheus, namespace, "agent-0", 720_000)  # Reroute, far from Block
    kube.create(TOKENBUDGETS, namespace, {
        "apiVersion": "tokenbudget.io/v1alpha1", "kind": "TokenBudget",
        "metadata": {"name": "team"},
        "spec": {"limits": [{"window": "1h", "tokens": 1_000_000}],
                 "actions": [{"type": "Warn", "atPercent": 50},
                             {"type": "Reroute", "atPercent": 70}, {"type": "Block",
                                                                     "atPercent": 100}]}})
    labels = {"app": "agent", A + "agent": "true", A + "inject": "true"}
    kube.create(DEPLOYMENTS, namespace, {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "agent", "labels": {A + "agent": "true"}},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "agent"}},
                 "template": {"metadata": {"labels": labels}, "spec": {"containers": [
                     {"name": "a", "image": "x",
                      "env": [{"name": "LLM_MODEL", "value": "gpt-4o"}]}]}}}})
    eventually(lambda: (kube.get(DEPLOYMENTS, namespace, "agent")["metadata"]
                        .get("annotations") or {}).get(A + "use-model") == "gpt-4o-mini", 40,
               what="the Deployment rerouted")
    # Scale up: the new pod is created by the ReplicaSet controller and stamped on admission.
    kube.patch(DEPLOYMENTS, namespace, "agent", {"spec": {"replicas": 2}})

    def newest() -> dict[str, Any] | None:
        pods = sorted(kube.list(PODS, namespace, "app=agent"),
                      key=lambda p: p["metadata"]["creationTimestamp"])
        return pods[-1] if len(pods) == 2 else None

    fresh = eventually(newest, 30, what="the second pod")
    ann = fresh["metadata"]["annotations"]
    assert ann[A + "state"] == "Rerouted" and ann[A + "use-model"] == "gpt-4o-mini"
    volumes = {v["name"]: v for v in fresh["spec"]["volumes"]}
    assert volumes["tokenbudget-directive"]["downwardAPI"]["items"][0]["fieldRef"] == \
        {"apiVersion": "v1", "fieldPath": "metadata.annotations"}
    assert {"name": "tokenbudget-directive", "mountPath": "/etc/tokenbudget",
            "readOnly": True} in fresh["spec"]["containers"][0]["volumeMounts"]


def test_the_configurations_fail_open_for_pods_and_trust_the_operators_own_ca(
        kube: Kube, operator: OperatorProcess) -> None:
    validating = kube.get(VALIDATING, None, NAME)
    hooks = {h["name"]: h for h in validating["webhooks"]}
    # One call per new pod: the mutating webhook denies too; none validates pods on create.
    assert not [h for h in validating["webhooks"]
                if any("pods" in r["resources"] and "CREATE" in r["operations"]
                       for r in h["rules"])]
    mutating = [h["name"] for h in kube.get(MUTATING, None, NAME)["webhooks"]]
    # Labelled pods first; enrolment's webhooks (unlabelled objects) after it.
    assert mutating[0] == "pods.tokenbudget.io"
    assert set(mutating[1:]) == {f"enrol-{p}.tokenbudget.io" for p in (
        "pods", "deployments", "statefulsets", "jobs", "cronjobs")}
    pods = kube.get(MUTATING, None, NAME)["webhooks"][0]
    assert pods["reinvocationPolicy"] == "IfNeeded"
    assert pods["failurePolicy"] == "Ignore" and pods["timeoutSeconds"] == 5
    assert pods["objectSelector"]["matchExpressions"][0]["key"] == A + "agent"
    skipped = pods["namespaceSelector"]["matchExpressions"][0]["values"]
    assert {"kube-system", "kube-public", "kube-node-lease", "default"} <= set(skipped)
    assert hooks["budgets.tokenbudget.io"]["failurePolicy"] == "Fail"
    secret = kube.get(SECRETS, "default", "token-budget-operator-webhook-tls")
    assert base64.b64decode(pods["clientConfig"]["caBundle"]) == \
        base64.b64decode(secret["data"]["ca-bundle.crt"])


def test_removing_the_agent_label_is_refused_only_where_enrolment_is_mandatory(
        kube: Kube, operator: OperatorProcess, namespace: str) -> None:
    """Issue 19: the API server sends the label's removal to the webhook (its objectSelector
    matches the old object), which refuses it in a namespace an admin made mandatory."""
    labels = {A + "agent": "true", "app": "agent"}
    kube.create(DEPLOYMENTS, namespace, {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "agent", "labels": {A + "agent": "true"}},
        "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "agent"}},
                 "template": {"metadata": {"labels": labels},
                              "spec": {"containers": [{"name": "a", "image": "agent:1"}]}}}})
    kube.patch(NAMESPACES, None, namespace,
               {"metadata": {"labels": {A + "enrolment": "Mandatory"}}})
    drop = {"metadata": {"labels": {A + "agent": None}}}

    def denied() -> str:
        try:
            kube.patch(DEPLOYMENTS, namespace, "agent", drop)
        except EnforcementError as exc:
            return str(exc)
        kube.patch(DEPLOYMENTS, namespace, "agent",
                   {"metadata": {"labels": {A + "agent": "true"}}})
        return ""

    message = eventually(denied, 30, what="the webhook to know the namespace is mandatory")
    assert "403" in message
    assert f"must not be removed from metadata.labels: enrolment is mandatory in namespace " \
           f"{namespace}" in message
    kube.patch(NAMESPACES, None, namespace, {"metadata": {"labels": {A + "enrolment": None}}})

    def allowed() -> bool:
        try:
            kube.patch(DEPLOYMENTS, namespace, "agent", drop)
        except EnforcementError:
            return False
        return True

    eventually(allowed, 30, what="the removal allowed once not mandatory")
    assert A + "agent" not in (kube.get(DEPLOYMENTS, namespace, "agent")["metadata"]
                               .get("labels") or {})


def test_the_admission_process_killed_fails_open_and_answers_again_within_seconds(
        kube: Kube, operator: OperatorProcess, namespace: str) -> None:
    """Issue 16: the webhooks run in a process of their own, which the operator restarts."""
    kube.create(TOKENBUDGETS, namespace, {
        "apiVersion": "tokenbudget.io/v1alpha1", "kind": "TokenBudget",
        "metadata": {"name": "team"},
        "spec": {"limits": [{"window": "1h", "tokens": 1_000_000}],
                 "deniedModels": ["gpt-4o"]}})

    def denied(name: str) -> str:
        try:
            kube.create(PODS, namespace, pod(name, model="gpt-4o"))
        except EnforcementError as exc:
            return str(exc)
        kube.request("DELETE", PODS.path(namespace, name), {"gracePeriodSeconds": 0})
        return ""

    assert "model gpt-4o is not allowed" in eventually(lambda: denied("before"), 30,
                                                       what="the webhook to know the budget")
    first = webhooks.admission_process(operator)
    assert first is not None
    os.kill(first, signal.SIGKILL)
    killed = time.monotonic()
    # Meanwhile the pod webhook fails open (failurePolicy: Ignore): the API server admits.
    admitted = 0
    for i in range(20):
        if not denied(f"meanwhile-{i}"):
            admitted += 1
            break
    assert admitted, "no pod was admitted while the admission process was down"
    message = eventually(lambda: denied("after"), 30, interval=0.1,
                         what="the restarted admission process to answer")
    took = time.monotonic() - killed
    assert "model gpt-4o is not allowed" in message
    assert took < 10, f"admission answered again only after {took:.1f} s"
    second = webhooks.admission_process(operator)
    assert second not in (None, first)
    assert "admission process exited" in operator.tail(200)
