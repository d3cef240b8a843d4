"""Leader election with two operator processes on the real control plane, chart timings.

Covers (issue 13):
- failover after SIGKILL of the leader: the standby holds the Lease one lease
  duration after it last saw the record change, and then evaluates;
- failover after a graceful stop (SIGTERM): the leader releases the Lease and
  the standby takes it at its next retry;
- only the leader writes: with a standby running all along, kopf writes none of
  its annotations (progress, diff-base) on a budget, and the budget's finalizer
  is added and released by whichever replica leads.

The figures (printed, and kept as test properties) are those in the chart README.
"""

from __future__ import annotations

import os
import random
import re
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.controlplane import ControlPlane
from harness.exporter import AgentExporter
from harness.operator_process import OperatorProcess
from harness.prometheus import Prometheus
from harness.spend import seed
from harness.waiting import eventually
from token_budget.handlers.finalizers import FINALIZER
from token_budget.handlers.leader import Timings
from token_budget.kube import DEPLOYMENTS, LEASES, TOKENBUDGETS, Kube

REPO = Path(__file__).resolve().parents[2]
#: The chart's default lease, as an install gets it.
CHART_LEASE_SECONDS = int(yaml.safe_load(
    (REPO / "charts" / "token-budget-operator" / "values.yaml").read_text()
)["operator"]["leaseSeconds"])
TIMINGS = Timings.for_lease(CHART_LEASE_SECONDS)
#: What kopf wrote on budgets when every replica ran its deletion handler.
KOPF_ANNOTATIONS = ("last-handled-configuration", "tokenbudget-undo", "touch-dummy")


def agent(name: str) -> dict[str, Any]:
    labels = {"app": name, "tokenbudget.io/agent": "true"}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "labels": {"tokenbudget.io/agent": "true"}},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": labels}, "spec": {"containers": [
                         {"name": "agent", "image": "agent:1"}]}}}}


def budget(name: str) -> dict[str, Any]:
    return {"apiVersion": "tokenbudget.io/v1alpha1", "kind": "TokenBudget",
            "metadata": {"name": name},
            "spec": {"limits": [{"window": "1h", "tokens": 1_000_000}],
                     "actions": [{"type": "Warn", "atPercent": 50}]}}


def evaluations(op: OperatorProcess) -> float:
    m = re.search(r"^tokenbudget_evaluation_duration_seconds_count (\S+)", op.metrics(), re.M)
    return float(m.group(1)) if m else 0.0


def test_failover_after_sigkill_and_after_a_graceful_stop_with_the_chart_defaults(
        kube: Kube, namespace: str, exporter: AgentExporter, prometheus: Prometheus,
        controlplane: ControlPlane, tmp_path: Path,
        record_property: Any) -> None:
    ns = namespace
    lease = f"tb-{uuid.uuid4().hex[:8]}"
    started: list[OperatorProcess] = []

    def start(identity: str) -> OperatorProcess:
        op = OperatorProcess(controlplane.kubeconfig, prometheus.url, tmp_path,
                             identity=identity, extra_args=[
                                 "--lease-name", lease,
                                 "--lease-seconds", str(CHART_LEASE_SECONDS)])
        op.start()
        started.append(op)
        return op

    def holder() -> str:
        try:
            return str(kube.get(LEASES, "default", lease)["spec"].get("holderIdentity") or "")
        except Exception:  # noqa: BLE001 - not created yet
            return ""

    seen_kopf: set[str] = set()

    def budget_body() -> dict[str, Any]:
        body = kube.get(TOKENBUDGETS, ns, "team")
        seen_kopf.update(k for k in body["metadata"].get("annotations") or {}
                         if k.startswith("tokenbudget.io/") and k.split("/", 1)[1]
                         in KOPF_ANNOTATIONS)
        return body

    def takeover(by: str) -> float:
        t0 = time.monotonic()
        eventually(lambda: holder() == by, 3 * CHART_LEASE_SECONDS, interval=0.05,
                   what=f"{by} holds the lease")
        return time.monotonic() - t0

    try:
        kube.create(DEPLOYMENTS, ns, agent("agent"))
        seed(exporter, prometheus, ns, "agent-0")
        kube.create(TOKENBUDGETS, ns, budget("team"))
        a = start("replica-a")
        eventually(lambda: holder() == "replica-a", 30, what="replica-a leads")
        b = start("replica-b")
        eventually(lambda: FINALIZER in (budget_body()["metadata"].get("finalizers") or []),
                   30, what="the leader put the finalizer on")
        eventually(lambda: (budget_body().get("status") or {}).get("state") == "Ok", 30,
                   what="evaluated")
        time.sleep(2 * TIMINGS.retry_seconds)  # b has read the Lease, as a standby does
        assert evaluations(b) == 0, "the standby does not evaluate"

        # SIGKILL: nothing is released; b waits a lease from when it last saw a renewal.
        a.kill()
        t_kill = time.monotonic()
        after_kill = takeover("replica-b")
        eventually(lambda: evaluations(b) > 0, 30, interval=0.05, what="replica-b evaluates")
        acting_after_kill = time.monotonic() - t_kill

        c = start("replica-c")
        # Off c's retry cadence (it tries every retry period from its start): the stop lands
        # anywhere between two of its attempts, as a real rollout's does.
        time.sleep(2 * TIMINGS.retry_seconds + random.uniform(0, TIMINGS.retry_seconds))
        assert holder() == "replica-b"
        # SIGTERM: b releases the Lease first thing; c takes it at its next retry.
        assert b.proc is not None
        os.killpg(b.proc.pid, signal.SIGTERM)
        after_stop = takeover("replica-c")
        assert b.proc.wait(30) == 0, b.tail()
        assert "released the lease" in b.log.read_text()

        # c leads: a deleted budget waits for its evaluation, then goes.
        kube.request("DELETE", TOKENBUDGETS.path(ns, "team"))
        eventually(lambda: not kube.list(TOKENBUDGETS, ns), 60, interval=0.2,
                   what="budget gone (finalizer released by the new leader)")
        assert evaluations(c) > 0
    finally:
        for op in started:
            op.stop()

    assert not seen_kopf, f"kopf wrote {sorted(seen_kopf)} on the budget"
    figures = {"lease_seconds": CHART_LEASE_SECONDS,
               "failover_after_sigkill_seconds": round(after_kill, 2),
               "evaluating_after_sigkill_seconds": round(acting_after_kill, 2),
               "failover_after_sigterm_seconds": round(after_stop, 2)}
    for key, value in figures.items():
        record_property(key, value)
    print(f"\nleader failover with the chart defaults: {figures}")
    # A lease after b last saw a renewal (at most a retry before the kill), plus a retry.
    assert TIMINGS.lease_seconds - TIMINGS.retry_seconds - 0.5 <= after_kill \
        <= TIMINGS.lease_seconds + 2 * TIMINGS.retry_seconds + 1
    assert after_stop <= TIMINGS.retry_seconds + 1.5, "a released lease is taken at once"


pytestmark = pytest.mark.timeout(240)
