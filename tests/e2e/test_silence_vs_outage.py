"""Silence is zero, an outage is not: a FailClosed block lifts once its spend is gone.

Issue 12, part 2, on the real control plane and Prometheus. Spend is exported *per pod*
(:mod:`harness.pod_exporters`: an exporter per agent pod that stops when the pod is
deleted, as a PodMonitor would see it). Two namespaces, one budget each over a 2-minute
window, one ``FailClosed`` and one ``Hold``:

1. an agent overspends: the budget blocks, the Deployment goes to zero replicas, its pods
   and their series go away;
2. once the window has rolled past the spend, nothing is left in Prometheus: silence, not
   an outage. The block lifts and the replicas come back (before this fix, FailClosed
   stayed ``SpendUnknownFailClosed`` for good);
3. a real outage still follows ``whenSpendUnknown``: a pod's exporter stops answering
   while the pod runs (``up == 0``): FailClosed blocks, Hold holds.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from kubernetes import client
from test_operator import agent_deployment, ann, condition, wait_state

from harness.controlplane import ControlPlane
from harness.operator_process import OperatorProcess
from harness.pod_exporters import PodExporters
from harness.prometheus import Prometheus
from harness.waiting import eventually
from token_budget.kube import DEPLOYMENTS, TOKENBUDGETS, Kube

WINDOW_SECONDS = 120


def _namespace(core: client.CoreV1Api, name: str) -> None:
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))

    def ready() -> bool:
        try:
            core.read_namespaced_service_account("default", name)
            return True
        except client.ApiException as exc:
            if exc.status != 404:
                raise
            return False

    eventually(ready, 60, what=f"namespace {name} with its default ServiceAccount")


def _budget(policy: str) -> dict[str, Any]:
    return {
        "apiVersion": "tokenbudget.io/v1alpha1", "kind": "TokenBudget",
        "metadata": {"name": "team"},
        "spec": {"limits": [{"window": "2m", "tokens": 1_000}],
                 "actions": [{"type": "Block", "atPercent": 100}],
                 "whenSpendUnknown": {"policy": policy, "staleAfterSeconds": 600}},
    }


def _replicas(kube: Kube, ns: str) -> int:
    return int(kube.get(DEPLOYMENTS, ns, "agent")["spec"]["replicas"])


def test_a_block_lifts_once_the_window_rolls_past_spend_whose_pods_are_gone(
        kube: Kube, kube_api: client.ApiClient, controlplane: ControlPlane,
        prometheus: Prometheus, tmp_path: Any) -> None:
    core = client.CoreV1Api(kube_api)
    suffix = uuid.uuid4().hex[:6]
    spaces = {"FailClosed": f"silence-closed-{suffix}", "Hold": f"silence-hold-{suffix}"}
    mirrors: dict[str, PodExporters] = {}
    op = OperatorProcess(controlplane.kubeconfig, prometheus.url, tmp_path,
                         identity="op-silence",
                         extra_args=["--lease-name", f"tb-{suffix}", "--recent-seconds", "30"])
    try:
        for policy, ns in spaces.items():
            _namespace(core, ns)
            kube.create(DEPLOYMENTS, ns, agent_deployment("agent", replicas=2))
            mirrors[policy] = PodExporters(kube, prometheus, ns)
            mirrors[policy].start()
        for policy, ns in spaces.items():
            eventually(lambda m=mirrors[policy]: len(m.pods()) == 2, 60,  # type: ignore[misc]
                       what=f"two agent pods exporting in {ns}")
            prometheus.wait_for(
                f'count(llm_tokens_total{{namespace="{ns}", token_type="input"}}) == 2',
                timeout=30)
            kube.create(TOKENBUDGETS, ns, _budget(policy))
        op.start()

        # 1. Overspend: blocked, scaled to zero, the pods and their series go.
        for m in mirrors.values():
            m.add(m.pods()[0], 1_500)
        for policy, ns in spaces.items():
            wait_state(kube, ns, "team", "Blocked", timeout=60)
            eventually(lambda ns=ns: _replicas(kube, ns) == 0, 30,  # type: ignore[misc]
                       what=f"{ns} scaled to zero")
            eventually(lambda m=mirrors[policy]: not m.pods(), 30,  # type: ignore[misc]
                       what=f"{ns}'s pods and exporters gone")
        blocked_at = time.monotonic()

        # 2. The window rolls past the spend: nothing left is silence. Lifted, restored.
        for policy, ns in spaces.items():
            eventually(lambda ns=ns: _replicas(kube, ns) == 2,  # type: ignore[misc]
                       WINDOW_SECONDS + 120, interval=1,
                       what=f"{policy}: the block lifted and the 2 replicas back")
            # The status is written just after the workloads (act, then report): read
            # between the two (CI, once), it still said Blocked with the replicas back.
            body = wait_state(kube, ns, "team", "Ok", timeout=15)
            assert condition(body, "MetricsAvailable")["status"] == "True"
            assert "previous-replicas" not in ann(kube.get(DEPLOYMENTS, ns, "agent"))
        lifted_after = time.monotonic() - blocked_at
        print(f"\nblock lifted {lifted_after:.0f} s after the scale-down (2-minute window)")
        assert lifted_after >= WINDOW_SECONDS - 30, "lifted before the spend left the window"

        # 3. A real outage: a running pod's exporter stops answering (up == 0).
        for policy, ns in spaces.items():
            m = mirrors[policy]
            eventually(lambda m=m: len(m.pods()) == 2, 60,  # type: ignore[misc]
                       what=f"{ns}'s new pods exporting")
            for pod in m.pods():
                prometheus.wait_for(f'up{{namespace="{ns}", pod="{pod}"}} == 1', timeout=30)
            m.silence(m.pods()[0])
        closed = wait_state(kube, spaces["FailClosed"], "team", "Blocked", timeout=60)
        assert closed["status"]["reason"] == "SpendUnknownFailClosed", closed["status"]
        assert "up == 0" in condition(closed, "MetricsAvailable")["message"]
        held = eventually(lambda: (lambda b: b if b["status"].get("reason")
                                   == "SpendUnknownHolding" else None)(
            kube.get(TOKENBUDGETS, spaces["Hold"], "team")), 60, what="Hold holds")
        assert held["status"]["state"] == "Ok"
        assert _replicas(kube, spaces["Hold"]) == 2, "Hold leaves the workloads as they were"
    finally:
        op.stop()
        for m in mirrors.values():
            m.close()
        for ns in spaces.values():
            try:
                core.delete_namespace(ns)
            except client.ApiException as exc:
                if exc.status != 404:
                    raise
