"""Waiting until the API server really calls the operator's webhooks.

A webhook configuration that exists is not yet one the API server uses: kube-apiserver
reads them through an informer, so for a moment after a write it still calls the old
endpoint or none. Tests that expect a refusal wait here first, probing with dry-run
requests (nothing is stored): an invalid budget must be refused with the webhook's own
message, and a pod asking for injection must come back mutated.
"""

from __future__ import annotations

from typing import Any

from harness.waiting import eventually
from token_budget.errors import EnforcementError
from token_budget.kube import PODS, TOKENBUDGETS, Kube

A = "tokenbudget.io/"
_INVALID = {"apiVersion": "tokenbudget.io/v1alpha1", "kind": "TokenBudget",
            "metadata": {"generateName": "webhook-probe-"},
            "spec": {"limits": [{"window": "1h", "tokens": 100}],
                     "actions": [{"type": "Block", "atPercent": 90},  # out of order: only
                                 {"type": "Warn", "atPercent": 50}]}}   # the webhook says so


def _budgets_refused(kube: Kube, namespace: str) -> bool:
    try:
        kube.request("POST", TOKENBUDGETS.path(namespace), {"dryRun": "All"}, _INVALID)
    except EnforcementError as exc:
        # "admission webhook ... denied the request": our server answered. "failed calling
        # webhook" (connection refused, a stopped operator's port) is not an answer.
        assert "denied the request" in str(exc), str(exc)
        return True
    raise AssertionError("an invalid budget was accepted")


def _pods_mutated(kube: Kube, namespace: str) -> bool:
    pod: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "webhook-probe-",
                     "labels": {A + "agent": "true", A + "inject": "true"}},
        "spec": {"containers": [{"name": "a", "image": "example/agent:1"}]}}
    created = kube.request("POST", PODS.path(namespace), {"dryRun": "All"}, pod)
    volumes = [v.get("name") for v in created["spec"].get("volumes") or []]
    assert "tokenbudget-directive" in volumes, f"not mutated: volumes {volumes}"
    return True


def wait_in_effect(kube: Kube, namespace: str, timeout: float = 60.0) -> None:
    """Both webhooks answer for ``namespace`` (which must not be an excluded one)."""
    eventually(lambda: _budgets_refused(kube, namespace), timeout,
               what="the API server to call the budget webhook")
    eventually(lambda: _pods_mutated(kube, namespace), timeout,
               what="the API server to call the pod mutating webhook")
