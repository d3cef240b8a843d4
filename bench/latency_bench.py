"""Target 4: enforcement latency, from spend visible in Prometheus to the workload enforced.

For each interval (the default 30 s, and 5 s), one operator process and T trials. A
trial has its own namespace with a TokenBudget (1h window, 1,000,000 tokens; Warn at
50 %, Block at 100 %) and a Deployment of one agent pod, seeded at zero spend. The
trial waits a random part of the interval (so spend lands at a uniform phase of the
evaluation cycle), adds 2,000,000 tokens at the exporter, polls Prometheus until the
new value is visible (t0), then watches the Deployment and its pod until:

* annotated: the Deployment and its pod carry ``tokenbudget.io/state: Blocked``;
* scaled: the Deployment's ``spec.replicas`` is 0 (the operator's write);
* gone: ``status.replicas`` is 0 (the ReplicaSet controller removed the pod).

Trials run one after the other: an enforcement's own writes wake the operator (its
watches see them), which would shorten the next trial's wait if they overlapped. The
scrape interval is 1 s, and the time to become visible is not counted.
"""

from __future__ import annotations

import random
import time
import uuid

from bench.cluster import Cluster, parallel, shared
from bench.common import (
    Figure,
    Report,
    agent_budget,
    agent_deployment,
    load,
    percentile,
    wait_for_quiet,
)
from harness.waiting import eventually
from token_budget.kube import DEPLOYMENTS, PODS, TOKENBUDGETS

A = "tokenbudget.io/"
LIMIT = 1_000_000
SLACK = 2.0  # seconds over the interval the target allows








def prepare(cluster: Cluster, names: list[str]) -> None:
    kube = cluster.client()
    cluster.namespaces(names)
    parallel(lambda ns: kube.create(DEPLOYMENTS, ns, agent_deployment("agent", 1)), names, 8)
    parallel(lambda ns: kube.create(TOKENBUDGETS, ns, agent_budget(LIMIT)), names, 8)
    eventually(lambda: all(len(kube.list(PODS, ns, "app=agent")) == 1 for ns in names), 120,
               what="one agent pod per trial namespace")
    cluster.seed(names, pod="agent-0")


def trial(cluster: Cluster, ns: str, interval: float, rng: random.Random
          ) -> dict[str, float]:
    kube = cluster.client()
    prom = cluster.prometheus
    time.sleep(rng.uniform(0, interval))
    cluster.exporter.add(namespace=ns, workload="agent-0", model="gpt-4o", input=2 * LIMIT)
    want = cluster.exporter.emitted("counters", namespace=ns)
    query = f'sum(llm_tokens_total{{namespace="{ns}"}})'
    while True:
        r = prom.query(query)
        if r and float(r[0]["value"][1]) >= want:
            t0 = time.monotonic()
            break
        time.sleep(0.05)
    out: dict[str, float] = {}
    deadline = t0 + 3 * interval + 60
    while len(out) < 3 and time.monotonic() < deadline:
        dep = kube.get(DEPLOYMENTS, ns, "agent")
        now = time.monotonic() - t0
        ann = dep["metadata"].get("annotations") or {}
        if "scaled" not in out and (dep.get("spec") or {}).get("replicas") == 0:
            out["scaled"] = now
        if "annotated" not in out and ann.get(A + "state") == "Blocked":
            pods = kube.list(PODS, ns, "app=agent")
            if all((p["metadata"].get("annotations") or {}).get(A + "state") == "Blocked"
                   for p in pods):
                out["annotated"] = now
        if "gone" not in out and "scaled" in out and \
                not (dep.get("status") or {}).get("replicas"):
            out["gone"] = now
        time.sleep(0.1)
    return out


def run(report: Report, quick: bool, wait_seconds: float = 300) -> None:
    intervals = (30.0, 5.0)
    trials = 4 if quick else 20
    quiet = wait_for_quiet(0 if quick else wait_seconds)
    cluster = shared()
    rng = random.Random(4)
    tag = uuid.uuid4().hex[:4]
    names = {iv: [f"lat-{tag}-{int(iv)}-{i}" for i in range(trials)] for iv in intervals}
    prepare(cluster, [n for ns in names.values() for n in ns])
    for iv in intervals:
        op = cluster.operator(iv, identity=f"latency-{int(iv)}")
        try:
            time.sleep(iv + 3)  # the first evaluation has stamped every workload Ok
            load0 = load()
            results = [trial(cluster, ns, iv, rng) for ns in names[iv]]
        finally:
            cluster.stop_operator(op)
        kb = {"benchmark": "latency", "contended": not quiet}
        note = f"{trials} trials, one after the other; load before {load0}, after {load()}"
        for what, label in (("annotated", "Deployment and pod annotated Blocked"),
                            ("scaled", "replicas set to 0"),
                            ("gone", "pod removed (status.replicas 0)")):
            values = [r[what] for r in results if what in r]
            missing = trials - len(values)
            p50, p95 = percentile(values, 50), percentile(values, 95)
            extra = f"; {missing} trial(s) never got there" if missing else ""
            report.add(Figure(**kb, name=f"interval {iv:g} s: {label}, p50", value=p50,
                              unit="s", note=note + extra))
            target = what != "gone"
            report.add(Figure(**kb, name=f"interval {iv:g} s: {label}, p95", value=p95,
                              unit="s",
                              target=f"<= {iv + SLACK:g} s" if target else "",
                              met=(p95 is not None and p95 <= iv + SLACK and not missing)
                              if target else None,
                              note=note + extra + f"; max {max(values, default=0):.2f} s"))
    cluster.delete_namespaces([n for ns in names.values() for n in ns])
