"""Cost sources on the real control plane and the real Prometheus (issue 18 part 2).

A cAdvisor-shaped counter (``container_cpu_usage_seconds_total{namespace, pod,
container, name}`` per container, plus cAdvisor's pod-level sum with
``container=""``) is served next to the agent's token counters and scraped every
second. Covers: CPU-seconds priced per core-hour push a money limit that token
spend alone keeps under Block over it, the ladder acts and the status shows the
money by kind; a restarted container (cAdvisor gives it a new series) is
counted exactly, both lives once; raising the limit restores the workload;
``tokenbudget report`` shows where the money goes; a counter reset in place is
read within one scrape of extrapolation, as token counters are; a proxy's own spend
counter (LiteLLM) replaces the catalog's token prices and a cost source adds to it; a
cost source whose answer is not a number (a NaN gauge) holds the budget with
MetricsAvailable=False saying why, leaves the agent running, and reads again once the
NaN has left the window; a gauge charges two successive pods (a replaced pod's new series)
each for its own half of the window, not each for the whole window.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from harness.controlplane import ControlPlane
from harness.exporter import AgentExporter
from harness.operator_process import OperatorProcess
from harness.prometheus import Prometheus
from harness.spend import seed, spend
from harness.waiting import eventually
from token_budget.api import v1alpha1 as api
from token_budget.cli import main
from token_budget.kube import DEPLOYMENTS, TOKENBUDGETS, Kube
from token_budget.metrics import costs as reading
from token_budget.metrics.prometheus import PrometheusSource
from token_budget.policy import costs, engine, planner
from token_budget.policy.catalog import Catalog

REPO = Path(__file__).resolve().parents[2]
A = "tokenbudget.io/"
CPU_METRIC = "container_cpu_usage_seconds_total"
CPU_SOURCE: dict[str, Any] = {
    "name": "cpu", "kind": "Compute", "metric": CPU_METRIC,
    # cAdvisor's pod-level series (container="") holds the sum of the containers again.
    "matchers": [{"label": "container", "operator": "NotEqual", "value": ""}],
    "pricePerUnit": "1.00", "unitsPerPrice": "3600",  # $1.00 a core-hour
}


class CAdvisor(Collector):
    """CPU-seconds per container as cAdvisor exposes them, and the pod-level sums."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (namespace, pod, container, name) -> seconds; name is the runtime's container
        # name, new for every start of the container.
        self.seconds: dict[tuple[str, str, str, str], float] = {}

    def set(self, ns: str, pod: str, container: str, name: str, seconds: float) -> None:
        with self._lock:
            self.seconds[(ns, pod, container, name)] = seconds

    def add(self, ns: str, pod: str, container: str, name: str, seconds: float) -> None:
        with self._lock:
            key = (ns, pod, container, name)
            self.seconds[key] = self.seconds.get(key, 0.0) + seconds

    def remove(self, ns: str, pod: str, container: str, name: str) -> None:
        with self._lock:
            del self.seconds[(ns, pod, container, name)]

    def collect(self) -> Iterator[CounterMetricFamily]:
        fam = CounterMetricFamily("container_cpu_usage_seconds",
                                  "Cumulative cpu time consumed in seconds.",
                                  labels=("namespace", "pod", "container", "name"))
        pods: dict[tuple[str, str], float] = {}
        with self._lock:
            for (ns, pod, container, name), v in sorted(self.seconds.items()):
                fam.add_metric([ns, pod, container, name], v)
                pods[(ns, pod)] = pods.get((ns, pod), 0.0) + v
        for (ns, pod), v in sorted(pods.items()):
            fam.add_metric([ns, pod, "", ""], v)
        if fam.samples:
            yield fam


@pytest.fixture
def cadvisor(exporter: AgentExporter) -> Iterator[CAdvisor]:
    found = CAdvisor()
    exporter.registry.register(found)
    yield found
    exporter.registry.unregister(found)


class Sandboxes(Collector):
    """A gauge of sandbox VMs per pod (a value an exporter may well get wrong: NaN)."""

    def __init__(self) -> None:
        self.vms: dict[tuple[str, str], float] = {}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        fam = GaugeMetricFamily("agent_sandbox_vms", "Sandbox VMs running for the pod.",
                                labels=("namespace", "pod"))
        for (ns, pod), v in sorted(self.vms.items()):
            fam.add_metric([ns, pod], v)
        if fam.samples:
            yield fam


def cpu_seen(prometheus: Prometheus, ns: str, total: float) -> None:
    """Wait until Prometheus holds two samples of the namespace's containers at ``total``."""
    eventually(lambda: prometheus.query(
        f'sum(last_over_time({CPU_METRIC}{{namespace="{ns}",container!=""}}[5s])) == {total} '
        f'and sum(count_over_time({CPU_METRIC}{{namespace="{ns}",container!=""}}[5s])) > 1'),
        30, what=f"{total} CPU-seconds of {ns} scraped twice")


def agent_deployment(name: str) -> dict[str, Any]:
    labels = {"app": name, A + "agent": "true"}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "labels": {A + "agent": "true"}},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": labels}, "spec": {"containers": [
                         {"name": "agent", "image": "example/agent:1"}]}}}}


def budget(ns: str, cost: str) -> dict[str, Any]:
    return {"apiVersion": api.API_VERSION, "kind": "TokenBudget",
            "metadata": {"name": "team", "namespace": ns},
            "spec": {"limits": [{"window": "1h", "cost": cost}],
                     "actions": [{"type": "Warn", "atPercent": 50},
                                 {"type": "Block", "atPercent": 100}],
                     "costSources": [CPU_SOURCE]}}


def by_kind(kube: Kube, ns: str) -> list[dict[str, str]]:
    windows = (kube.get(TOKENBUDGETS, ns, "team").get("status") or {}).get("windows") or [{}]
    return list(windows[0].get("costByKind") or [])


def test_cpu_seconds_push_money_spend_over_block_and_a_restart_counts_once(
        kube: Kube, namespace: str, exporter: AgentExporter, prometheus: Prometheus,
        cadvisor: CAdvisor, controlplane: ControlPlane, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    ns = namespace
    kube.create(DEPLOYMENTS, ns, agent_deployment("agent"))
    seed(exporter, prometheus, ns, "agent-0")
    cadvisor.set(ns, "agent-0", "agent", "k8s_agent_1", 0.0)
    cpu_seen(prometheus, ns, 0)
    spend(exporter, prometheus, ns, "agent-0", 240_000)  # gpt-4o input: $0.60
    kube.create(TOKENBUDGETS, ns, budget(ns, "1.00"))
    op = OperatorProcess(controlplane.kubeconfig, prometheus.url, tmp_path,
                         extra_args=["--lease-name", f"tb-{uuid.uuid4().hex[:8]}",
                                     "--namespace", ns])
    op.start()
    try:
        eventually(lambda: by_kind(kube, ns) == [
            {"kind": "Tokens", "name": "tokens", "cost": "0.60"},
            {"kind": "Compute", "name": "cpu", "cost": "0"}], 60, what="$0.60 of tokens")
        assert kube.get(TOKENBUDGETS, ns, "team")["status"]["state"] == "Warning"

        # 1,800 CPU-seconds at $1.00 a core-hour: $0.50, and $1.10 in all: over Block.
        cadvisor.add(ns, "agent-0", "agent", "k8s_agent_1", 1800.0)
        cpu_seen(prometheus, ns, 1800)
        eventually(lambda: kube.get(TOKENBUDGETS, ns, "team")["status"]["state"] == "Blocked",
                   60, what="Blocked by the CPU cost")
        status = kube.get(TOKENBUDGETS, ns, "team")["status"]
        assert status["windows"][0]["cost"] == "1.10" and status["usedPercent"] == 110
        assert status["windows"][0]["costByKind"][1] == {
            "kind": "Compute", "name": "cpu", "cost": "0.50"}, \
            "the pod-level sum (container=\"\") is not counted a second time"
        eventually(lambda: kube.get(DEPLOYMENTS, ns, "agent")["spec"]["replicas"] == 0, 60,
                   what="the agent scaled to zero")

        # The container restarts: cAdvisor's series of the old one goes stale, the new one
        # starts from zero. Both lives count, once: 1,800 + 360 s = $0.60.
        cadvisor.remove(ns, "agent-0", "agent", "k8s_agent_1")
        cadvisor.set(ns, "agent-0", "agent", "k8s_agent_2", 0.0)
        cpu_seen(prometheus, ns, 0)
        cadvisor.add(ns, "agent-0", "agent", "k8s_agent_2", 360.0)
        cpu_seen(prometheus, ns, 360)
        eventually(lambda: by_kind(kube, ns)[1:] == [
            {"kind": "Compute", "name": "cpu", "cost": "0.60"}], 60, what="$0.60 of CPU")

        # The report says where the money goes, as the status does.
        manifest = tmp_path / "budget.yaml"
        manifest.write_text(yaml.safe_dump(budget(ns, "1.00")))
        code = main(["report", "--prometheus-url", prometheus.url, "--since", "1h",
                     "--catalog", str(REPO / "examples" / "model-catalog.yaml"),
                     "--budgets", str(manifest), "-o", "json"])
        out, err = capsys.readouterr()
        assert code == 0, err
        data = json.loads(out)
        assert {"kind": "Compute", "name": "cpu", "tokens": 0, "cost": "0.60"} in data["byKind"]
        assert [r["kind"] for r in data["byKind"]][0] == "Tokens"
        by_ns = {r["namespace"]: r for r in data["byNamespace"]}
        assert by_ns[ns]["cost"] == "1.20"

        # Raised above spend: the agent comes back.
        kube.patch(TOKENBUDGETS, ns, "team", {"spec": {"limits": [{"window": "1h",
                                                                    "cost": "5.00"}]}})
        eventually(lambda: kube.get(TOKENBUDGETS, ns, "team")["status"]["state"] == "Ok", 60,
                   what="Ok under the raised limit")
        eventually(lambda: kube.get(DEPLOYMENTS, ns, "agent")["spec"]["replicas"] == 1, 60,
                   what="replicas restored")
        assert op.running()
    finally:
        op.stop()


def test_a_cost_source_that_cannot_be_read_holds_the_budget_and_says_why(
        kube: Kube, namespace: str, exporter: AgentExporter, prometheus: Prometheus,
        controlplane: ControlPlane, tmp_path: Path) -> None:
    """A cost query whose answer is not a number (an exporter's NaN gauge) makes spend
    unknown, not zero: MetricsAvailable=False names it, whenSpendUnknown (Hold) leaves
    the agent running as it was, and the budget reads again once the value is sane."""
    ns = namespace
    sandboxes = Sandboxes()
    exporter.registry.register(sandboxes)
    try:
        kube.create(DEPLOYMENTS, ns, agent_deployment("agent"))
        seed(exporter, prometheus, ns, "agent-0")
        sandboxes.vms[(ns, "agent-0")] = 1.0
        eventually(lambda: prometheus.query(
            f'count_over_time(agent_sandbox_vms{{namespace="{ns}"}}[1m]) > 1'), 30,
            what="two samples of the sandbox gauge")
        body = budget(ns, "1.00")
        # A one-minute window and burn rate: a NaN sample keeps a window unreadable for as
        # long as it lies in it, so the recovery is seen within a minute.
        body["spec"]["limits"] = [{"window": "1m", "cost": "1.00"}]
        body["spec"]["costSources"] = [{
            "name": "sandboxes", "kind": "Sandbox", "type": "Gauge", "metric": "agent_sandbox_vms",
            "pricePerUnit": "0.10", "unitsPerPrice": "3600"}]  # $0.10 a VM-hour
        kube.create(TOKENBUDGETS, ns, body)
        op = OperatorProcess(controlplane.kubeconfig, prometheus.url, tmp_path,
                             extra_args=["--lease-name", f"tb-{uuid.uuid4().hex[:8]}",
                                         "--namespace", ns, "--recent-seconds", "60"])
        op.start()
        try:
            def metrics_available() -> dict[str, Any] | None:
                status = kube.get(TOKENBUDGETS, ns, "team").get("status") or {}
                for c in status.get("conditions") or []:
                    if c["type"] == "MetricsAvailable":
                        return dict(c)
                return None

            eventually(lambda: (c := metrics_available()) is not None
                       and c["status"] == "True", 60, what="spend read")
            # The exporter starts reporting NaN.
            sandboxes.vms[(ns, "agent-0")] = float("nan")
            unread = eventually(lambda: (c := metrics_available()) is not None
                                and c["status"] == "False" and c, 60,
                                what="MetricsAvailable=False")
            assert "nan" in unread["message"].lower(), unread
            assert kube.get(TOKENBUDGETS, ns, "team")["status"]["reason"] == \
                "SpendUnknownHolding"
            assert kube.get(DEPLOYMENTS, ns, "agent")["spec"]["replicas"] == 1
            assert op.running()

            sandboxes.vms[(ns, "agent-0")] = 2.0
            eventually(lambda: (c := metrics_available()) is not None
                       and c["status"] == "True", 150, what="MetricsAvailable=True again")
            kinds = by_kind(kube, ns)
            assert [k["name"] for k in kinds] == ["tokens", "sandboxes"]
            assert kube.get(TOKENBUDGETS, ns, "team")["status"]["state"] == "Ok"
        finally:
            op.stop()
    finally:
        exporter.registry.unregister(sandboxes)


def test_a_cpu_counter_reset_in_place_is_read_within_one_scrape(
        prometheus: Prometheus, cadvisor: CAdvisor) -> None:
    """A counter that falls (a kubelet restart re-creates the cgroup under the same
    labels) is read as token counters are across a reset: increase(), at most one
    scrape interval extrapolated; never the fall as negative spend, never a life lost."""
    ns = f"cost-{uuid.uuid4().hex[:6]}"
    cadvisor.set(ns, "agent-0", "agent", "c", 0.0)
    cpu_seen(prometheus, ns, 0)
    cadvisor.add(ns, "agent-0", "agent", "c", 500.0)
    cpu_seen(prometheus, ns, 500)
    q = costs.query_of(api.CostSource.model_validate(CPU_SOURCE))

    def units() -> float | None:
        rows = prometheus.query(reading.units(q, 3600, interval=1))
        found = [float(r["value"][1]) for r in rows if r["metric"].get("namespace") == ns]
        return found[0] if found else None

    assert units() == 500, "exact before the reset"
    cadvisor.set(ns, "agent-0", "agent", "c", 0.0)
    cpu_seen(prometheus, ns, 0)
    cadvisor.add(ns, "agent-0", "agent", "c", 300.0)
    cpu_seen(prometheus, ns, 300)
    time.sleep(2)
    samples = int(float(prometheus.query(
        f'count_over_time({CPU_METRIC}{{namespace="{ns}",container="agent"}}[1h])')[0]["value"][1]))
    value = units()
    assert value is not None and 800 <= value <= 800 * (1 + 1.5 / (samples - 1)), \
        (value, samples)


def test_a_proxys_own_spend_replaces_catalog_token_prices_and_cost_sources_add_to_it(
        exporter: AgentExporter, prometheus: Prometheus, cadvisor: CAdvisor) -> None:
    """LiteLLM's litellm_spend_metric measures token cost: it replaces the catalog's
    token pricing (never added to it); a CPU cost source adds to it, read from Prometheus
    and decided by the engine as the operator does."""
    ns = f"lite-{uuid.uuid4().hex[:6]}"
    exporter.add(ns, "search-bot", "gpt-4o", cost=0.0, fmt="litellm")
    cadvisor.set(ns, "agent-0", "agent", "k8s_agent_1", 0.0)
    cpu_seen(prometheus, ns, 0)
    eventually(lambda: prometheus.query(
        f'count_over_time(litellm_spend_metric_total{{team_alias="{ns}"}}[1m]) > 1'), 30,
        what="two samples of the proxy's spend")
    # 1M input tokens: $2.50 at the catalog's price; the proxy says $0.75 (a discount).
    exporter.add(ns, "search-bot", "gpt-4o", input=1_000_000, cost=0.75, fmt="litellm")
    cadvisor.add(ns, "agent-0", "agent", "k8s_agent_1", 900.0)  # $0.25 at $1.00/core-hour
    cpu_seen(prometheus, ns, 900)
    body = budget(ns, "2.00")
    body["spec"]["source"] = {"preset": "LiteLLM"}
    tb = api.TokenBudget.model_validate(body)
    catalog = Catalog([api.ModelCatalog.model_validate(
        yaml.safe_load((REPO / "examples" / "model-catalog.yaml").read_text()))])
    source = PrometheusSource(prometheus.url, scrape_interval_seconds=1)
    world = engine.World(budgets=[tb], catalog=catalog, namespaces={ns: {}})

    def window() -> Any:
        now = dt.datetime.now(dt.UTC)
        snap = reading.with_costs(source, source.collect(planner.plan([tb], now), now),
                                  costs.plan([tb], catalog, now, 600), now)
        [decision] = engine.evaluate(world, snap, now).decisions
        return decision.windows[0] if decision.windows else None

    found = eventually(lambda: (w := window()) is not None and w.cost == 1 and w, 30,
                       what="$0.75 of reported spend and $0.25 of CPU")
    assert [(k, n, round(v, 6)) for k, n, v in found.by_kind] == [
        ("Tokens", "tokens", 0.75), ("Compute", "cpu", 0.25)]
    assert found.used_percent == 50


def test_a_gauge_charges_two_successive_pods_each_for_its_own_half_of_the_window(
        exporter: AgentExporter, prometheus: Prometheus) -> None:
    """A pod replaced mid-window (cAdvisor's new series) is charged for the time it was
    scraped, as is the pod it replaced: two successive 15 s pods at 1 VM over a window of
    about 32 s cost about 30 VM-seconds, not twice the window (each series' average held
    for the whole window)."""
    ns = f"gauge-{uuid.uuid4().hex[:6]}"
    sandboxes = Sandboxes()
    exporter.registry.register(sandboxes)
    try:
        start = time.time()
        sandboxes.vms[(ns, "agent-1")] = 1.0
        time.sleep(15)
        del sandboxes.vms[(ns, "agent-1")]
        sandboxes.vms[(ns, "agent-2")] = 1.0
        time.sleep(15)
        del sandboxes.vms[(ns, "agent-2")]
        time.sleep(2.5)  # agent-2's last sample is scraped, then its stale marker
        now = dt.datetime.now(dt.UTC)
        seconds = int(now.timestamp() - start) + 2
        q = costs.query_of(api.CostSource.model_validate({
            "name": "sandboxes", "kind": "Sandbox", "type": "Gauge",
            "metric": "agent_sandbox_vms", "pricePerUnit": "0.10", "unitsPerPrice": "3600"}))
        key = planner.rolling_key(60)
        source = PrometheusSource(prometheus.url, scrape_interval_seconds=1)
        found, errors, unknown = reading.read(
            source, costs.CostPlan(windows={key: (seconds, (q,))}), now)
        assert not errors and not unknown
        units = {r.workload: r.units for r in found[(q, key)] if r.namespace == ns}
        samples = {r["metric"]["pod"]: float(r["value"][1]) for r in prometheus.query(
            f'count_over_time(agent_sandbox_vms{{namespace="{ns}"}}[{seconds}s])',
            now.timestamp())}
        assert units == samples, "each sample stands for one 1 s scrape"
        assert 27 <= sum(units.values()) <= 33, (units, seconds)
        assert sum(units.values()) < 0.6 * 2 * seconds  # the whole window each: 2 x window
    finally:
        exporter.registry.unregister(sandboxes)
