"""Throttle holds for the workload, and Block on pods nothing can stop says so (issue 13).

On the real control plane and Prometheus, with the operator as a process. The
control plane has no kubelet, so the pods never run: each "replica" is an
agent thread using :class:`token_budget.agent.Governor` on its own pod's
annotations file, which a kubelet thread writes the way the downward API
volume would (:mod:`harness.kubelet`). The agents spend what their Governor
lets them and report it to the exporter, as a real agent would.

Covers: 3 replicas of a throttled Deployment spend, together, within 10 % of
the directive's tokens per minute (each pod's Governor holds its share); a
blocked bare Pod and a pod of a ReplicaSet no Deployment owns each get one
``CannotStop`` Event and stay (the operator deletes nothing it cannot put back).
"""

from __future__ import annotations

import copy
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.controlplane import ControlPlane
from harness.exporter import AgentExporter
from harness.kubelet import project
from harness.operator_process import OperatorProcess
from harness.prometheus import Prometheus
from harness.spend import seed, spend
from harness.waiting import eventually
from token_budget.agent import Blocked, Governor
from token_budget.kube import DEPLOYMENTS, PODS, TOKENBUDGETS, Kube, Resource

A = "tokenbudget.io/"
RATE = 120_000  # tokens per minute for the workload: 2,000 a second
REPLICAS = 3
CALL = 100  # tokens per model call: a Governor's share is 6-7 calls a second
MEASURE_SECONDS = 20.0
SETTLE_SECONDS = 4.0  # each bucket's first minute of burst is spent by then
REPLICASETS = Resource("ReplicaSet", "apps/v1", "replicasets")


@pytest.fixture
def operator(controlplane: ControlPlane, prometheus: Prometheus,
             tmp_path: Path) -> Iterator[OperatorProcess]:
    op = OperatorProcess(controlplane.kubeconfig, prometheus.url, tmp_path, identity="op-1",
                         extra_args=["--lease-name", f"tb-{uuid.uuid4().hex[:8]}"])
    yield op
    op.stop()


def labels(app: str) -> dict[str, str]:
    return {"app": app, A + "agent": "true"}


def pod_spec() -> dict[str, Any]:
    return {"containers": [{"name": "agent", "image": "example/agent:1",
                            "env": [{"name": "LLM_MODEL", "value": "gpt-4o"}]}]}


def budget(actions: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "tokenbudget.io/v1alpha1", "kind": "TokenBudget",
            "metadata": {"name": "team"},
            "spec": {"limits": [{"window": "1h", "tokens": 1_000_000}],
                     "actions": copy.deepcopy(actions)}}


def ann(obj: dict[str, Any]) -> dict[str, str]:
    return dict(obj["metadata"].get("annotations") or {})


class Replica(threading.Thread):
    """One agent pod: a Governor on its own file, calling a 'model' as fast as allowed."""

    def __init__(self, pod: str, file: Path, exporter: AgentExporter, ns: str,
                 stop: threading.Event) -> None:
        super().__init__(daemon=True, name=f"agent-{pod}")
        self.pod, self.file, self.exporter, self.ns, self.stop = pod, file, exporter, ns, stop
        self.governor = Governor(str(file), default_model="gpt-4o", poll_seconds=0.1,
                                 sleep=stop.wait)
        self.spent: list[tuple[float, int]] = []  # (monotonic time, tokens)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                model = self.governor.model()
                self.governor.acquire(CALL, max_wait=1.0)
            except (Blocked, TimeoutError):
                continue
            self.spent.append((time.monotonic(), CALL))
            self.exporter.add(namespace=self.ns, workload="agent", model=model, input=CALL,
                              pod=self.pod)


def kubelet(kube: Kube, ns: str, files: dict[str, Path], stop: threading.Event) -> None:
    """Project each pod's annotations into its file every 0.2 s, as the kubelet would."""
    while not stop.is_set():
        for name, file in files.items():
            project(ann(kube.get(PODS, ns, name)), file)
        stop.wait(0.2)


def test_three_replicas_spend_the_workloads_rate_together(
        kube: Kube, namespace: str, exporter: AgentExporter, prometheus: Prometheus,
        operator: OperatorProcess, tmp_path: Path) -> None:
    ns = namespace
    kube.create(DEPLOYMENTS, ns, {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "agent", "labels": {A + "agent": "true"}},
        "spec": {"replicas": REPLICAS, "selector": {"matchLabels": {"app": "agent"}},
                 "template": {"metadata": {"labels": labels("agent")}, "spec": pod_spec()}}})
    eventually(lambda: len(kube.list(PODS, ns, "app=agent")) == REPLICAS, 60,
               what=f"{REPLICAS} agent pods")
    names = sorted(p["metadata"]["name"] for p in kube.list(PODS, ns, "app=agent"))
    seed(exporter, prometheus, ns, names[0])
    kube.create(TOKENBUDGETS, ns, budget([
        {"type": "Throttle", "atPercent": 1, "tokensPerMinute": RATE},
        {"type": "Block", "atPercent": 100}]))
    spend(exporter, prometheus, ns, names[0], 20_000)  # 2 %: Throttled
    operator.start()

    share = str(RATE // REPLICAS)
    eventually(lambda: all(ann(kube.get(PODS, ns, n)).get(A + "tokens-per-minute") == share
                           for n in names), 60, what=f"every pod carries {share} tokens/min")
    assert ann(kube.get(DEPLOYMENTS, ns, "agent"))[A + "tokens-per-minute"] == str(RATE)

    stop = threading.Event()
    files = {n: tmp_path / f"{n}.annotations" for n in names}
    for n, f in files.items():
        project(ann(kube.get(PODS, ns, n)), f)
    projector = threading.Thread(target=kubelet, args=(kube, ns, files, stop), daemon=True)
    projector.start()
    replicas = [Replica(n, files[n], exporter, ns, stop) for n in names]
    started = time.monotonic()
    for r in replicas:
        r.start()
    time.sleep(SETTLE_SECONDS + MEASURE_SECONDS)
    stop.set()
    for r in replicas:
        r.join(5)
    projector.join(5)

    since = started + SETTLE_SECONDS
    until = since + MEASURE_SECONDS
    burst = sum(t for r in replicas for at, t in r.spent if at < since)
    measured = sum(t for r in replicas for at, t in r.spent if since <= at < until)
    per_minute = measured / MEASURE_SECONDS * 60
    each = [sum(t for at, t in r.spent if since <= at < until) / MEASURE_SECONDS * 60
            for r in replicas]
    print(f"\n{REPLICAS} replicas against a {RATE} tokens/min directive: {per_minute:.0f} "
          f"tokens/min together over {MEASURE_SECONDS:.0f} s "
          f"({(per_minute / RATE - 1) * 100:+.1f} %), per replica "
          f"{', '.join(f'{e:.0f}' for e in each)}; first-minute burst {burst} tokens")
    assert abs(per_minute - RATE) <= 0.10 * RATE
    refilled = RATE * SETTLE_SECONDS / 60  # what the buckets gained while the burst went
    assert burst - refilled <= RATE * 1.05, "the burst is one minute of the workload's rate"
    assert (kube.get(TOKENBUDGETS, ns, "team").get("status") or {}).get("state") == "Throttled"


def test_a_blocked_pod_that_nothing_can_stop_gets_one_event_and_is_kept(
        kube: Kube, namespace: str, exporter: AgentExporter, prometheus: Prometheus,
        operator: OperatorProcess) -> None:
    ns = namespace
    kube.create(PODS, ns, {"apiVersion": "v1", "kind": "Pod",
                           "metadata": {"name": "loner", "labels": labels("loner")},
                           "spec": pod_spec()})
    kube.create(REPLICASETS, ns, {
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": "loose", "labels": {A + "agent": "true"}},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "loose"}},
                 "template": {"metadata": {"labels": labels("loose")}, "spec": pod_spec()}}})
    [rs_pod] = eventually(lambda: kube.list(PODS, ns, "app=loose"), 60, what="the RS pod")
    seed(exporter, prometheus, ns, "loner")
    kube.create(TOKENBUDGETS, ns, budget([{"type": "Block", "atPercent": 1}]))
    spend(exporter, prometheus, ns, "loner", 20_000)
    operator.start()

    def cannot_stop() -> dict[str, int]:
        data = kube.request("GET", f"/api/v1/namespaces/{ns}/events")
        seen: dict[str, int] = {}
        for e in data["items"]:
            if e.get("reason") == "CannotStop":
                name = e["involvedObject"]["name"]
                seen[name] = seen.get(name, 0) + 1
        return seen

    rs_name = rs_pod["metadata"]["name"]
    eventually(lambda: set(cannot_stop()) == {"loner", rs_name}, 60,
               what="a CannotStop Event on each pod")
    time.sleep(3 * operator.interval_seconds)  # more evaluations: no second Event
    assert cannot_stop() == {"loner": 1, rs_name: 1}
    for name in ("loner", rs_name):
        pod = kube.get(PODS, ns, name)
        assert ann(pod)[A + "state"] == "Blocked"
        assert not pod["metadata"].get("deletionTimestamp"), "nothing is deleted"
    assert kube.get(REPLICASETS, ns, "loose")["spec"]["replicas"] == 1
