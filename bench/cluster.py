"""The cluster the cluster benchmarks share: the test harness's real pieces, no mocks.

One control plane (etcd, kube-apiserver, kube-controller-manager from
``tests/controlplane``), the CRDs and the example ModelCatalog, the synthetic agent
exporter and a real Prometheus scraping it. Started once per ``bench/run.py`` run (by
the first cluster benchmark), torn down at exit. Work directories are under
``/tmp/tbo-bench-*`` (not ``pytest-*``), so the benchmark's own processes never look
like another engineer's test run.

The controller manager gets a higher client QPS than its default of 20: the
benchmarks have it create and delete thousands of pods, and they measure the
operator, not the ReplicaSet controller's rate limiter.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from kubernetes import config as kconfig

from bench.common import REPO
from harness import kubeobjects
from harness.controlplane import ControlPlane, free_ports
from harness.exporter import AgentExporter
from harness.operator_process import OperatorProcess
from harness.prometheus import Prometheus
from harness.waiting import eventually
from token_budget.errors import Conflict, TargetNotFound
from token_budget.kube import MODELCATALOGS, NAMESPACES, Kube, Resource, api_client

A = "tokenbudget.io/"
AGENT = A + "agent"
SERVICEACCOUNTS = Resource("ServiceAccount", "v1", "serviceaccounts")


class Cluster:
    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="tbo-bench-cluster-"))
        self.cp = ControlPlane(
            workdir=self.workdir / "controlplane",
            controller_manager_args=["--kube-api-qps=500", "--kube-api-burst=1000",
                                     "--concurrent-replicaset-syncs=10",
                                     "--concurrent-deployment-syncs=10"])
        self.exporter = AgentExporter()
        self.prometheus = Prometheus(workdir=self.workdir / "prometheus", scrape_interval="1s")
        self.kube: Kube | None = None
        self._api: Any = None
        self.operators: list[OperatorProcess] = []

    def start(self) -> Cluster:
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> Cluster:
        t0 = time.monotonic()
        self.cp.start()
        self.exporter.start()
        self.prometheus.add_scrape_target("agents", self.exporter.target, honor_labels=True)
        self.prometheus.start()
        self.prometheus.wait_for_target_up("agents", timeout=60)
        self._api = kconfig.new_client_from_config(config_file=str(self.cp.kubeconfig))  # type: ignore[no-untyped-call]
        kubeobjects.install_crds(self._api)
        self.kube = self.client()
        catalog = yaml.safe_load((REPO / "examples" / "model-catalog.yaml").read_text())
        try:
            self.kube.create(MODELCATALOGS, None, catalog)
        except Conflict:
            pass
        print(f"  cluster up in {time.monotonic() - t0:.0f} s ({self.cp.server}, "
              f"prometheus {self.prometheus.url})", flush=True)
        return self

    def client(self, pool: int = 32) -> Kube:
        """A Kube client of its own (raw JSON, counted), with a connection pool for threads."""
        api = api_client(str(self.cp.kubeconfig))
        api.rest_client.pool_manager.connection_pool_kw["maxsize"] = pool
        return Kube(api)

    def stop(self) -> None:
        for op in self.operators:
            op.stop()
        self.operators.clear()
        self.exporter.stop()
        self.prometheus.close()
        self.cp.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- helpers -------------------------------------------------------------------------

    def operator(self, interval: float, *extra: str, identity: str = "bench",
                 command: Sequence[str] = ()) -> OperatorProcess:
        op = OperatorProcess(self.cp.kubeconfig, self.prometheus.url, self.workdir,
                             interval_seconds=interval, identity=identity, command=command,
                             extra_args=["--lease-name", f"bench-{uuid.uuid4().hex[:6]}",
                                         *extra])
        op.start()
        self.operators.append(op)
        return op

    def stop_operator(self, op: OperatorProcess) -> None:
        op.stop()
        if op in self.operators:
            self.operators.remove(op)

    def namespaces(self, names: Iterable[str], labels: dict[str, str] | None = None,
                   workers: int = 16) -> None:
        """Create namespaces in parallel and wait for each one's default ServiceAccount."""
        assert self.kube is not None
        names = list(names)
        kube = self.client()

        def make(name: str) -> None:
            body = {"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": name, "labels": dict(labels or {})}}
            try:
                kube.create(NAMESPACES, None, body)
            except Conflict:
                pass

        parallel(make, names, workers)
        wanted = set(names)

        def ready() -> bool:
            have = {sa["metadata"]["namespace"] for sa in
                    kube.iter_list(SERVICEACCOUNTS, None, None, page=5000)
                    if sa["metadata"]["name"] == "default"}
            return wanted <= have

        eventually(ready, 300, interval=1, what=f"default ServiceAccounts in {len(names)} "
                                                 "namespaces")

    def delete_namespaces(self, names: Iterable[str]) -> None:
        kube = self.client()

        def drop(name: str) -> None:
            try:
                kube.request("DELETE", NAMESPACES.path(None, name))
            except TargetNotFound:
                pass

        parallel(drop, list(names), 8)

    def seed(self, namespaces: Iterable[str], pod: str = "agent-0", model: str = "gpt-4o"
             ) -> None:
        """Spend series at zero for each namespace, with two samples so increase() works."""
        names = list(namespaces)
        for ns in names:
            self.exporter.add(namespace=ns, workload=pod, model=model)
        last = names[-1]
        eventually(lambda: self.prometheus.query(
            f'count_over_time(llm_tokens_total{{namespace="{last}"}}[1m]) > 2'), 60,
            what="spend series seeded")


def parallel(fn: Callable[[Any], Any], items: list[Any], workers: int = 16) -> list[Any]:
    """Run ``fn`` over ``items`` on a thread pool; re-raise the first error."""
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


_shared: Cluster | None = None


def shared() -> Cluster:
    """The run's cluster, started on first use and stopped at exit."""
    global _shared
    if _shared is None:
        _shared = Cluster().start()
        atexit.register(_shared.stop)
    return _shared


def webhook_port() -> int:
    return free_ports(1)[0]
