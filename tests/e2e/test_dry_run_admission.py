"""The operator's global ``--dry-run`` at admission: warnings instead of refusals or changes.

Against the real kube-apiserver calling an operator started with ``--dry-run``
(issue 13): a pod a budget would refuse is admitted with a warning saying why it
would have been refused; a pod asking for injection is admitted unchanged with a
warning saying what would have been set; an invalid budget is still refused.
"""

from __future__ import annotations

import pytest

from harness import webhooks
from harness.controlplane import ControlPlane
from harness.prometheus import Prometheus
from harness.waiting import eventually
from token_budget.kube import CLUSTERTOKENBUDGETS, PODS, Kube

A = "tokenbudget.io/"


def test_in_dry_run_admission_warns_instead_of_refusing_or_mutating(
        kube: Kube, controlplane: ControlPlane, prometheus: Prometheus,
        tmp_path_factory: pytest.TempPathFactory, namespace: str) -> None:
    env = webhooks.deny_frontier_in(kube, namespace)
    try:
        with webhooks.serving_operator(kube, controlplane.kubeconfig, prometheus.url,
                                       tmp_path_factory.mktemp("dry-run-operator"),
                                       identity="dry-run", dry_run=True):
            frontier = {"apiVersion": "v1", "kind": "Pod",
                        "metadata": {"generateName": "frontier-",
                                     "labels": {A + "agent": "true"}},
                        "spec": {"containers": [{"name": "a", "image": "example/agent:1",
                                                 "env": [{"name": "LLM_MODEL",
                                                          "value": "openai/gpt-4o-2024-08-06"}]}]}}

            def warned() -> list[str]:
                _, said = webhooks.dry_create(kube, PODS.path(namespace), frontier)
                return [w for w in said if w.startswith("dry-run: would deny: pod denied: ")]

            [denied] = eventually(warned, 30, what="the webhook to know the new budget")
            assert f"is not allowed by ClusterTokenBudget {env}" in denied
            created, said = webhooks.dry_create(kube, PODS.path(namespace),
                                                webhooks.INJECTED_POD)
            assert "tokenbudget-directive" not in [v["name"] for v in created["spec"]["volumes"]]
            assert A + "state" not in (created["metadata"].get("annotations") or {})
            [would] = [w for w in said if w.startswith("dry-run: would set ")]
            assert f"annotation {A}state=Ok" in would and "spec.volumes" in would
            webhooks.budgets_refused(kube, namespace)  # budgets: still validated
    finally:
        kube.request("DELETE", CLUSTERTOKENBUDGETS.path(None, env))
