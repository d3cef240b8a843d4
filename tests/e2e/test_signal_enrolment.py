"""Enrolment by LLM signal and the gateway's variables (issues 19 and 15), on the real
control plane: the kube-apiserver calls the operator's mutating and validating webhooks.

Covers:
- in a mandatory namespace a new unlabelled Deployment with ``OPENAI_API_KEY``
  gets the agent label on itself and its pod template; its pod is created
  labelled, keeps its own variables and gets the gateway's ``OPENAI_BASE_URL``;
  a variable added to the list by the admin (``--enrolment-signals-extra``)
  enrols too, a pod without a signal is left alone;
- while the namespace's budget is Blocked, the pods of an unlabelled Deployment
  with a key are refused (the ReplicaSet's ``FailedCreate``), and so is a bare
  unlabelled Pod with a key, which no Block could have stopped;
- a namespace that is not mandatory is untouched (no label, no variable); once
  it becomes mandatory, an update of an existing Deployment labels its metadata
  only: the template, the generation and the ReplicaSets stay (no rollout).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from test_operator import events

from harness import webhooks
from harness.controlplane import ControlPlane
from harness.exporter import AgentExporter
from harness.operator_process import OperatorProcess
from harness.prometheus import Prometheus
from harness.spend import seed, spend
from harness.waiting import eventually
from token_budget.errors import EnforcementError
from token_budget.kube import DEPLOYMENTS, NAMESPACES, PODS, TOKENBUDGETS, Kube, Resource

A = "tokenbudget.io/"
AGENT = A + "agent"
URL = "http://litellm.litellm.svc:4000"
REPLICASETS = Resource("ReplicaSet", "apps/v1", "replicasets")


@pytest.fixture(scope="module")
def operator(kube: Kube, controlplane: ControlPlane, prometheus: Prometheus,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    with webhooks.serving_operator(kube, controlplane.kubeconfig, prometheus.url,
                                   tmp_path_factory.mktemp("signals-operator"),
                                   identity="signals",
                                   extra_args=["--enrolment-signals-extra", "ACME_LLM_*",
                                               "--gateway-env", f"OPENAI_BASE_URL={URL}"]) as op:
        yield op


def _deployment(name: str, *env: str, replicas: int = 1) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [
                         {"name": "agent", "image": "example/agent:1",
                          "env": [{"name": n, "value": "v"} for n in env]}]}}}}


def _pod(name: str, *env: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"containers": [{"name": "agent", "image": "example/agent:1",
                                     "env": [{"name": n, "value": "v"} for n in env]}]}}


def _labels(obj: dict[str, Any]) -> dict[str, str]:
    return dict(obj["metadata"].get("labels") or {})


def _mandatory(kube: Kube, ns: str) -> None:
    """Label ``ns`` Mandatory and wait until the webhook enrols there."""
    kube.patch(NAMESPACES, None, ns, {"metadata": {"labels": {A + "enrolment": "Mandatory"}}})
    eventually(lambda: AGENT in _labels(webhooks.dry_create(
        kube, PODS.path(ns), _pod("probe", "OPENAI_API_KEY"))[0]), 30,
        what="the webhook to know the namespace is mandatory")


def _pods(kube: Kube, ns: str, app: str) -> list[dict[str, Any]]:
    return kube.list(PODS, ns, f"app={app}")


def test_a_new_deployment_with_a_key_is_enrolled_and_its_pod_reaches_the_gateway(
        kube: Kube, operator: OperatorProcess, namespace: str) -> None:
    ns = namespace
    _mandatory(kube, ns)
    kube.create(DEPLOYMENTS, ns, _deployment("agent", "OPENAI_API_KEY", "PORT"))
    d = kube.get(DEPLOYMENTS, ns, "agent")
    assert _labels(d) == {"app": "agent", AGENT: "true"}
    assert d["spec"]["template"]["metadata"]["labels"] == {"app": "agent", AGENT: "true"}
    [p] = eventually(lambda: _pods(kube, ns, "agent"), 30, what="the Deployment's pod")
    assert _labels(p)[AGENT] == "true"
    env = {e["name"]: e.get("value") for e in p["spec"]["containers"][0]["env"]}
    assert env["OPENAI_API_KEY"] == "v" and env["PORT"] == "v", "the pod's own kept"
    assert env["OPENAI_BASE_URL"] == URL
    # The admin's own signal enrols; a pod with none is left alone.
    extra, _ = webhooks.dry_create(kube, PODS.path(ns), _pod("acme", "ACME_LLM_TOKEN"))
    assert _labels(extra)[AGENT] == "true"
    plain, _ = webhooks.dry_create(kube, PODS.path(ns), _pod("web", "DATABASE_URL"))
    assert AGENT not in _labels(plain)
    assert "OPENAI_BASE_URL" not in {e["name"] for e in plain["spec"]["containers"][0]["env"]}


def test_while_the_budget_blocks_enrolled_pods_and_bare_pods_with_a_key_are_refused(
        kube: Kube, operator: OperatorProcess, namespace: str, exporter: AgentExporter,
        prometheus: Prometheus) -> None:
    ns = namespace
    _mandatory(kube, ns)
    kube.create(DEPLOYMENTS, ns, _deployment("agent", "ANTHROPIC_API_KEY", replicas=0))
    seed(exporter, prometheus, ns, "agent-0")
    spend(exporter, prometheus, ns, "agent-0", 1_500_000)
    kube.create(TOKENBUDGETS, ns, {
        "apiVersion": "tokenbudget.io/v1alpha1", "kind": "TokenBudget",
        "metadata": {"name": "team"},
        "spec": {"limits": [{"window": "1h", "tokens": 1_000_000}],
                 "actions": [{"type": "Block", "atPercent": 100}]}})
    eventually(lambda: (kube.get(TOKENBUDGETS, ns, "team").get("status") or {})
               .get("state") == "Blocked", 40, what="budget Blocked")

    def bare_refused() -> str:
        try:
            kube.create(PODS, ns, _pod("rogue", "OPENAI_API_KEY"))
        except EnforcementError as exc:
            return str(exc)
        kube.request("DELETE", PODS.path(ns, "rogue"))
        return ""

    message = eventually(bare_refused, 30, what="the webhook to know the Block")
    assert "403" in message and f"TokenBudget {ns}/team is Blocked" in message
    # The Deployment existed before the Block; a pod it asks for now is refused.
    kube.patch(DEPLOYMENTS, ns, "agent", {"spec": {"replicas": 1}})
    [event] = eventually(lambda: [e for e in events(kube, ns, "FailedCreate")
                                  if "is Blocked" in e["message"]][:1], 30,
                         what="the ReplicaSet refused a pod")
    assert event["involvedObject"]["kind"] == "ReplicaSet"
    assert not _pods(kube, ns, "agent")


def test_an_existing_deployment_is_labelled_on_update_without_a_rollout(
        kube: Kube, operator: OperatorProcess, namespace: str) -> None:
    ns = namespace
    kube.create(DEPLOYMENTS, ns, _deployment("agent", "OPENAI_API_KEY"))
    [p] = eventually(lambda: _pods(kube, ns, "agent"), 30, what="the Deployment's pod")
    before = kube.get(DEPLOYMENTS, ns, "agent")
    assert AGENT not in _labels(before) and AGENT not in _labels(p), "not mandatory: untouched"
    assert "OPENAI_BASE_URL" not in {e["name"] for e in p["spec"]["containers"][0]["env"]}
    [rs] = eventually(lambda: kube.list(REPLICASETS, ns, "app=agent"), 30,
                      what="the ReplicaSet")
    _mandatory(kube, ns)
    # A label of the team's own (an annotation would do, but bumps a Deployment's generation).
    kube.patch(DEPLOYMENTS, ns, "agent", {"metadata": {"labels": {"team": "search"}}})
    after = kube.get(DEPLOYMENTS, ns, "agent")
    assert _labels(after) == {"app": "agent", "team": "search", AGENT: "true"}
    assert after["spec"]["template"] == before["spec"]["template"]
    assert after["metadata"]["generation"] == before["metadata"]["generation"]
    assert [r["metadata"]["name"] for r in kube.list(REPLICASETS, ns, "app=agent")] == \
        [rs["metadata"]["name"]], "no new ReplicaSet"
    assert [q["metadata"]["name"] for q in _pods(kube, ns, "agent")] == [p["metadata"]["name"]]
