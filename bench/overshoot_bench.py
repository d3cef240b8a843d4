"""Issue 9: overshoot, the spend past a budget's limit before the block lands.

Ramps of spend at several rates (0.25 % to 5 % of the budget a minute) against
TokenBudgets of 1,000,000 tokens an hour (Warn 50 %, Block 100 %), on the real control
plane and a real Prometheus scraping the agents every **15 s**, the operator at its
default 30 s interval. Each trial has its own namespace, agent Deployment and budget; its
counter jumps to a random 1.5 to 3.5 minutes of ramp below the limit, rests for the
burn-rate look-back (so the jump does not count as a burn rate), then climbs at a
constant rate (the crossing lands at a random phase of the scrape and evaluation cycles). The
agent obeys at once: its rate stops the moment the operator has written ``Blocked`` on its
Deployment or set its replicas to 0 (a real agent adds the time to read its directive
file and the tokens of requests in flight: the README's bound has both).

overshoot = tokens spent when the block lands - the limit, in % of the limit.

Two operator configurations, one after the other: a fixed 30 s interval
(``--no-forecast``), and the default, where a budget forecast to cross a threshold
within the interval is evaluated again at the forecast moment and then every scrape
interval. The trials of one configuration run together, so in the forecast run one hot
budget makes the loop look sooner for the others too.
"""

from __future__ import annotations

import random
import time
import uuid

from bench.cluster import Cluster, shared
from bench.common import Figure, Report, load, wait_for_quiet
from bench.latency_bench import LIMIT, prepare
from harness.operator_process import OperatorProcess
from harness.prometheus import Prometheus
from token_budget.kube import DEPLOYMENTS

A = "tokenbudget.io/"
SCRAPE = 15
INTERVAL = 30.0
RECENT = 120  # the burn-rate look-back (--recent-seconds)
TARGET_PERCENT = 1.0  # overshoot, for rates up to 1 % of the budget a minute
CONFIGS: tuple[tuple[str, list[str]], ...] = (
    ("fixed 30 s interval", ["--no-forecast"]), ("forecast", []))


def _trials(rates: list[float], per_rate: int, tag: str) -> list[tuple[str, float]]:
    return [(f"os-{tag}-{str(r).replace('.', 'p')}-{i}", r)
            for r in rates for i in range(per_rate)]


def _blocked(dep: dict[str, object]) -> bool:
    meta = dep.get("metadata") or {}
    spec = dep.get("spec") or {}
    assert isinstance(meta, dict) and isinstance(spec, dict)
    return (meta.get("annotations") or {}).get(A + "state") == "Blocked" or \
        spec.get("replicas") == 0


def _run(cluster: Cluster, prom: Prometheus, trials: list[tuple[str, float]],
         extra: list[str], rng: random.Random) -> dict[str, dict[str, float]]:
    kube = cluster.client()
    exporter = cluster.exporter
    op = OperatorProcess(cluster.cp.kubeconfig, prom.url, cluster.workdir,
                         interval_seconds=INTERVAL, identity=f"overshoot-{uuid.uuid4().hex[:4]}",
                         extra_args=["--lease-name", f"bench-{uuid.uuid4().hex[:6]}",
                                     "--prometheus-scrape-interval-seconds", str(SCRAPE),
                                     "--recent-seconds", str(RECENT),
                                     *extra])
    op.start()
    cluster.operators.append(op)
    out: dict[str, dict[str, float]] = {}
    try:
        # Each counter jumps to its start value, then waits out the burn-rate look-back
        # (RECENT): the jump is not a burn rate, the ramp after it is.
        plans: dict[str, tuple[float, float]] = {}
        for ns, pct in trials:
            per_second = LIMIT * pct / 100 / 60
            ahead = rng.uniform(90, 210)  # seconds of ramp before the limit
            plans[ns] = (per_second, ahead)
            exporter.add(namespace=ns, workload="agent-0", model="gpt-4o",
                         input=int(LIMIT - per_second * ahead))
        time.sleep(max(INTERVAL, RECENT) + 2 * SCRAPE)
        started: dict[str, tuple[float, float, float]] = {}
        for ns, (per_second, ahead) in plans.items():
            exporter.set_rate(ns, "agent-0", "gpt-4o", input_per_second=per_second)
            started[ns] = (time.monotonic(), per_second, ahead)
        names = {ns for ns, _ in trials}
        deadline = time.monotonic() + 210 + 3 * INTERVAL + 4 * SCRAPE + 60
        while len(out) < len(trials) and time.monotonic() < deadline:
            for dep in kube.list(DEPLOYMENTS, None, A + "agent"):
                ns = dep["metadata"]["namespace"]
                if ns in names and ns not in out and _blocked(dep):
                    exporter.set_rate(ns, "agent-0", "gpt-4o")  # the agent stops
                    spent = exporter.emitted("counters", namespace=ns)
                    t0, per_second, ahead = started[ns]
                    out[ns] = {"overshoot_percent": 100 * (spent - LIMIT) / LIMIT,
                               "after_crossing_s": time.monotonic() - t0 - ahead}
            time.sleep(0.2)
    finally:
        for ns, _ in trials:
            exporter.set_rate(ns, "agent-0", "gpt-4o")
        cluster.stop_operator(op)
    return out


def run(report: Report, quick: bool, wait_seconds: float = 300) -> None:
    rates = [1.0, 5.0] if quick else [0.25, 0.5, 1.0, 2.0, 5.0]
    per_rate = 1 if quick else 3
    quiet = wait_for_quiet(0 if quick else wait_seconds)
    cluster = shared()
    prom = Prometheus(workdir=cluster.workdir / "prometheus-15s", scrape_interval=f"{SCRAPE}s")
    prom.add_scrape_target("agents", cluster.exporter.target, honor_labels=True)
    prom.start()
    rng = random.Random(9)
    try:
        prom.wait_for_target_up("agents", timeout=60)
        for label, extra in CONFIGS:
            trials = _trials(rates, per_rate, uuid.uuid4().hex[:4])
            prepare(cluster, [ns for ns, _ in trials])  # agent, budget, series at 0
            load0 = load()
            results = _run(cluster, prom, trials, extra, rng)
            for pct in rates:
                got = [results[ns] for ns, r in trials if r == pct and ns in results]
                missing = per_rate - len(got)
                worst = max((g["overshoot_percent"] for g in got), default=None)
                lag = max((g["after_crossing_s"] for g in got), default=0.0)
                bound = pct / 60 * (SCRAPE + INTERVAL + 2)
                note = (f"{len(got)} trial(s) at {pct:g} %/min, worst {lag:.1f} s from crossing "
                        f"to block; bound rate x (scrape + interval + 2 s) = {bound:.2f} %; "
                        f"load before {load0}")
                if missing:
                    note += f"; {missing} trial(s) never blocked"
                target = pct <= 1.0
                report.add(Figure(
                    benchmark="overshoot", contended=not quiet,
                    name=f"{label}: overshoot at {pct:g} % of the budget a minute (max)",
                    value=worst, unit="%",
                    target=f"<= {TARGET_PERCENT:g} %" if target else "",
                    met=(worst is not None and worst <= TARGET_PERCENT and not missing)
                    if target else None, note=note))
            lags = sorted(g["after_crossing_s"] for g in results.values())
            forecasting = "--no-forecast" not in extra
            worst_lag = lags[-1] if lags else None
            report.add(Figure(
                benchmark="overshoot", contended=not quiet,
                name=f"{label}: crossing to block, worst of {len(trials)} ramps", value=worst_lag,
                unit="s", target=f"<= {SCRAPE + 2} s" if forecasting else "",
                met=(worst_lag is not None and worst_lag <= SCRAPE + 2
                     and len(lags) == len(trials)) if forecasting else None,
                note=f"a runaway stopped within one scrape interval + 2 s; all "
                     f"{[round(x, 1) for x in lags]} s"))
            cluster.delete_namespaces([ns for ns, _ in trials])
    finally:
        prom.close()
