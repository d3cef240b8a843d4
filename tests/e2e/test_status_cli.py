"""``tokenbudget status`` reads budgets from the cluster and prints what their status says."""

from __future__ import annotations

import json

import pytest

from harness.controlplane import ControlPlane
from token_budget.cli import main
from token_budget.kube import TOKENBUDGETS, Kube


def test_status_prints_each_budgets_window_spend_limit_state_and_run_out(
        kube: Kube, controlplane: ControlPlane, namespace: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    kube.create(TOKENBUDGETS, namespace, {
        "apiVersion": "tokenbudget.io/v1alpha1", "kind": "TokenBudget",
        "metadata": {"name": "team"},
        "spec": {"limits": [{"window": "Month", "cost": "500.00"}]}})
    kube.patch(TOKENBUDGETS, namespace, "team", {"status": {
        "state": "Throttled", "spend": "$431.20", "limit": "$500.00", "usedPercent": 86,
        "projectedRunOutTime": "2026-11-27T09:00:00Z",
        "windows": [{"window": "Month", "usedPercent": 86, "tokens": 90_000_000}]}},
        sub="status")
    config = str(controlplane.kubeconfig)
    assert main(["status", "-n", namespace, "--kubeconfig", config]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["NAMESPACE", "NAME", "WINDOW", "SPEND", "LIMIT", "USED",
                                "STATE", "RUN-OUT"]
    assert table[1].split() == [namespace, "team", "Month", "$431.20", "$500.00", "86%",
                                "Throttled", "2026-11-27T09:00:00Z"]
    assert main(["status", "-n", namespace, "--kubeconfig", config, "-o", "json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["state"] == "Throttled" and row["usedPercent"] == 86
