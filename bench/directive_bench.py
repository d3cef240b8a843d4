"""Issue 15: the directive service, from a decision written to every agent's Governor.

One operator replica serves its webhooks and the directive service on a loopback
port. N bare governed pods are created in one namespace (the mutating webhook
injects the service's URL and CA); each gets a ServiceAccount token bound to it
(TokenRequest) and a :class:`token_budget.agent.Governor` in this process that
long-polls the service on a kept-alive TLS connection (one thread each,
:mod:`harness.directive_agents`). Spend over the limit is already in Prometheus;
a TokenBudget with Block at 100 % is created, the operator patches Blocked onto
every pod, and for each pod the lag is measured from this process's own watch
seeing the pod's annotation change to that pod's Governor seeing Blocked.

Figures: that lag's p50/p99/max over N agents; the operator's resident memory
before and after N agents connect, its CPU while N long-polls sit idle, and its
CPU over the Block (N patches by the evaluation plus N answers). The agents run
on the same 2 cores as the operator and the API server, so their own CPU is in
the way of both; the lag is an upper bound for a cluster where agents run
elsewhere.

Run: ``.venv/bin/python bench/run.py --only directive`` (``--quick``: 100 agents).
"""

from __future__ import annotations

import tempfile
import time
import uuid
from pathlib import Path

from bench.cluster import parallel, shared, webhook_port
from bench.common import Figure, Report, cpu_seconds, load, percentile, rss_mib, wait_for_quiet
from harness import webhooks
from harness.directive_agents import Agent, StateWatch, connect, lags, pod_body
from harness.waiting import eventually
from token_budget.kube import PODS, TOKENBUDGETS

IDLE_SECONDS = 20.0
LAG_TARGET_S = 1.0


def run(report: Report, quick: bool, wait_seconds: float = 300) -> None:
    n = 100 if quick else 1_000
    quiet = wait_for_quiet(0 if quick else wait_seconds)
    kb = {"benchmark": "directive", "contended": not quiet}
    cluster = shared()
    kube = cluster.client(pool=64)
    ns = f"dir-{uuid.uuid4().hex[:6]}"
    cluster.namespaces([ns])
    cluster.seed([ns], pod="agent-0")
    cluster.exporter.add(namespace=ns, workload="agent-0", model="gpt-4o", input=2_000_000)
    eventually(lambda: cluster.prometheus.query(
        f'sum(llm_tokens_total{{namespace="{ns}"}}) >= 2000000'), 60, what="spend visible")
    port = webhook_port()
    op = cluster.operator(5, "--webhook-port", str(port), "--webhook-host", "127.0.0.1",
                          "--webhook-url", f"https://127.0.0.1:{port}", identity="directive")
    agents: list[Agent] = []
    workdir = Path(tempfile.mkdtemp(prefix="tbo-bench-directive-"))
    try:
        assert op.proc is not None
        webhooks.wait_in_effect(kube, ns)
        # The directive service runs in the operator's admission process: both count.
        pids = [op.proc.pid, webhooks.admission_process(op)]

        def rss() -> float:
            return sum(rss_mib(p) or 0.0 for p in pids if p is not None)

        def cpu() -> float:
            return sum(cpu_seconds(p) for p in pids if p is not None)

        t0 = time.monotonic()
        pods = parallel(lambda i: kube.create(PODS, ns, pod_body(f"agent-{i}")), list(range(n)))
        report.note("directive", f"{n} pods created in {time.monotonic() - t0:.1f} s")
        time.sleep(3)  # the operator's watch has every pod
        rss0, cpu0 = rss(), cpu()
        t0 = time.monotonic()
        agents = connect(kube, pods, workdir, workers=32)
        took = time.monotonic() - t0
        served = sum(a.governor.served for a in agents)
        cpu1 = cpu()
        report.add(Figure(**kb, name=f"{n} agents connected (TokenRequest, TLS, TokenReview)",
                          value=took, unit="s",
                          note=f"{served} served by the service; operator CPU "
                               f"{cpu1 - cpu0:.1f} s for the connections"))
        time.sleep(2)
        rss1 = rss()
        c0, w0 = cpu(), time.monotonic()
        time.sleep(IDLE_SECONDS)
        idle = (cpu() - c0) / (time.monotonic() - w0)
        report.add(Figure(**kb, name=f"operator RSS with {n} long-polls (with its admission "
                                     "process)", value=rss1,
                          unit="MiB", note=f"{rss0:.0f} MiB before they connected; "
                                           f"+{(rss1 or 0) - (rss0 or 0):.0f} MiB"))
        report.add(Figure(**kb, name=f"operator CPU while {n} long-polls idle (with its "
                                     "admission process)", value=idle * 100,
                          unit="% of a core",
                          note=f"over {IDLE_SECONDS:.0f} s, the operator's evaluations "
                               "(every 5 s) included"))
        watch = StateWatch(kube, ns, "Blocked")
        watch.start()
        assert watch.started.wait(10)
        c0, load0 = cpu(), load()
        kube.create(TOKENBUDGETS, ns, {
            "apiVersion": "tokenbudget.io/v1alpha1", "kind": "TokenBudget",
            "metadata": {"name": "team"},
            "spec": {"limits": [{"window": "1h", "tokens": 1_000_000}],
                     "actions": [{"type": "Block", "atPercent": 100}]}})
        created = time.monotonic()
        eventually(lambda: all(a.name in watch.seen and "Blocked" in a.seen for a in agents),
                   600, interval=0.5, what=f"{n} pods Blocked and seen by their Governors")
        watch.stop.set()
        burst = cpu() - c0
        seen, early = lags(agents, watch, "Blocked")
        writes = max(watch.seen.values()) - min(watch.seen.values())
        p50, p99 = percentile(seen, 50), percentile(seen, 99)
        note = (f"{n} agents in this process, {early} saw it before this process's watch; "
                f"the {n} writes spread over {writes:.1f} s, the last "
                f"{max(watch.seen.values()) - created:.1f} s after the budget was created; "
                f"load {load0} -> {load()}")
        report.add(Figure(**kb, name=f"decision written -> Governor sees it, p50 ({n} agents)",
                          value=p50, unit="s", note=note))
        report.add(Figure(**kb, name=f"decision written -> Governor sees it, p99 ({n} agents)",
                          value=p99, unit="s", target=f"< {LAG_TARGET_S:g} s",
                          met=p99 is not None and p99 < LAG_TARGET_S,
                          note=f"max {max(seen, default=0):.3f} s"))
        report.add(Figure(**kb, name=f"operator CPU over the Block of {n} pods", value=burst,
                          unit="s", note="the evaluation's patches and the answers to every "
                                         "waiting agent"))
    finally:
        for a in agents:
            a.governor.close()
        cluster.stop_operator(op)
        webhooks.remove_configurations(kube)
        cluster.delete_namespaces([ns])
