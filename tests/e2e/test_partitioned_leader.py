"""A leader cut off from the API server writes nothing once it has lost the Lease (issue 13).

Replica A reaches the API server only through :class:`harness.apiproxy.ApiProxy`,
which records every request it forwards; replica B goes direct. A leads and
blocks a workload (its writes pass the proxy), then the proxy is cut: A's calls
hang until their timeouts. The budget flips; B takes the Lease over and
restores the workload. The proxy is healed and the budget flips again while A
is reachable: B blocks again, and not one write of A reaches the API server
from the cut on, neither in the partition nor after it; A keeps running as a
standby.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from harness.apiproxy import ApiProxy
from harness.controlplane import ControlPlane
from harness.exporter import AgentExporter
from harness.operator_process import OperatorProcess
from harness.prometheus import Prometheus
from harness.spend import seed, spend
from harness.waiting import eventually
from token_budget.errors import TargetNotFound
from token_budget.kube import DEPLOYMENTS, LEASES, TOKENBUDGETS, Kube

A = "tokenbudget.io/"
OVER, UNDER = 500_000, 100_000_000  # limits for 1,000,000 tokens spent: Blocked, Ok


def _deployment() -> dict[str, object]:
    labels = {A + "agent": "true", "app": "agent"}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "agent", "labels": {A + "agent": "true"}},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "agent"}},
                     "template": {"metadata": {"labels": labels}, "spec": {"containers": [
                         {"name": "agent", "image": "example/agent:1"}]}}}}


def test_a_partitioned_leader_writes_nothing_after_it_loses_the_lease(
        kube: Kube, controlplane: ControlPlane, exporter: AgentExporter,
        prometheus: Prometheus, namespace: str, tmp_path: Path) -> None:
    ns = namespace
    kube.create(DEPLOYMENTS, ns, _deployment())
    seed(exporter, prometheus, ns, "agent-0")
    spend(exporter, prometheus, ns, "agent-0", 1_000_000)
    kube.create(TOKENBUDGETS, ns, {
        "apiVersion": "tokenbudget.io/v1alpha1", "kind": "TokenBudget",
        "metadata": {"name": "team"},
        "spec": {"limits": [{"window": "1h", "tokens": UNDER}],
                 "actions": [{"type": "Block", "atPercent": 100}]}})

    def limit(tokens: int) -> None:
        kube.patch(TOKENBUDGETS, ns, "team",
                   {"spec": {"limits": [{"window": "1h", "tokens": tokens}]}})

    def replicas() -> int:
        return int(kube.get(DEPLOYMENTS, ns, "agent")["spec"]["replicas"])

    def holder() -> str:
        try:
            return str(kube.get(LEASES, "default", lease)["spec"].get("holderIdentity") or "")
        except TargetNotFound:
            return ""  # not created yet: the replica is still starting

    proxy = ApiProxy(controlplane.server, controlplane._admin_ssl())
    config = tmp_path / "through-proxy.kubeconfig"
    config.write_text(proxy.kubeconfig())
    lease = f"part-{uuid.uuid4().hex[:6]}"
    args = ["--lease-name", lease, "--namespace", ns]
    a = OperatorProcess(config, prometheus.url, tmp_path, identity="part-a", extra_args=args)
    b = OperatorProcess(controlplane.kubeconfig, prometheus.url, tmp_path, identity="part-b",
                        extra_args=args)
    try:
        a.start()
        eventually(lambda: holder() == "part-a", 30, what="A leads")
        b.start()
        limit(OVER)
        eventually(lambda: replicas() == 0, 30, what="A blocks")
        assert [r for r in proxy.writes_since(0) if "/deployments/agent" in r.path], \
            "A's writes went through the proxy"

        cut = time.monotonic()
        proxy.cut()
        limit(UNDER)
        eventually(lambda: holder() == "part-b", 30, what="B takes the Lease over")
        took_over = time.monotonic() - cut
        eventually(lambda: replicas() == 2, 30, what="B restores")

        healed = time.monotonic()
        proxy.heal()
        limit(OVER)
        eventually(lambda: replicas() == 0, 30, what="B blocks again, A reachable")
        time.sleep(3 * a.interval_seconds)  # A has had time to act, if it would
        assert holder() == "part-b"
        late = proxy.writes_since(cut)
        assert not late, f"writes of the partitioned replica reached the API server: {late}"
        assert a.running(), f"A exited:\n{a.tail(30)}"
        assert "is not the leader any more" in a.log.read_text(errors="replace")
        after = [r for r in proxy.requests if r.at >= healed]
        assert after, "A talks to the API server again after the heal (reads only)"
        print(f"\npartitioned leader: B held the Lease {took_over:.1f} s after the cut; "
              f"A forwarded {len([r for r in proxy.requests if r.at < cut and r.write])} "
              f"writes before the cut, 0 after it, {len(after)} reads after the heal")
    finally:
        for op in (a, b):
            op.stop()
        proxy.close()
