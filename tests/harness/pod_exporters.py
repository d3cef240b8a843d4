"""One exporter per agent pod, scraped as a PodMonitor would scrape it.

The test control plane has no kubelet, so no agent process runs in a pod. This stands in
for one: it follows the pods of a namespace (a poll of the API every ``poll_seconds``)
and, for every live pod, serves that pod's own ``llm_tokens_total`` series (at zero,
``namespace`` and ``pod`` labels) from its own HTTP port, added to Prometheus as its own
scrape job with the pod's ``namespace`` and ``pod`` as target labels. When the pod goes,
its exporter stops and its scrape job is removed: its series go stale and its ``up``
series ends, exactly what Prometheus sees when a pod behind a PodMonitor is deleted.

:meth:`PodExporters.silence` stops a pod's exporter but keeps its scrape job: the target
is then down (``up == 0``) while the pod still exists, as in a network partition.
"""

from __future__ import annotations

import threading
from typing import Any

from harness.exporter import AgentExporter
from harness.prometheus import Prometheus
from token_budget.kube import PODS


class PodExporters:
    def __init__(self, kube: Any, prometheus: Prometheus, namespace: str,
                 model: str = "gpt-4o", poll_seconds: float = 0.3) -> None:
        self.kube = kube
        self.prometheus = prometheus
        self.namespace = namespace
        self.model = model
        self.poll_seconds = poll_seconds
        self.exporters: dict[str, AgentExporter] = {}
        self._silenced: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"pod-exporters-{namespace}")

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        with self._lock:
            for pod in list(self.exporters):
                self._drop(pod)

    def _job(self, pod: str) -> str:
        return f"pod-{self.namespace}-{pod}"

    def pods(self) -> list[str]:
        with self._lock:
            return sorted(self.exporters)

    def add(self, pod: str, tokens: int) -> None:
        """The pod's agent spends ``tokens`` input tokens."""
        with self._lock:
            self.exporters[pod].add(self.namespace, pod, self.model, input=tokens)

    def silence(self, pod: str) -> None:
        """The pod's exporter stops answering; the pod and its scrape job stay."""
        with self._lock:
            self._silenced.add(pod)
            self.exporters[pod].stop()

    def _sync(self) -> None:
        live = {p["metadata"]["name"] for p in self.kube.list(PODS, self.namespace)
                if not p["metadata"].get("deletionTimestamp")}
        with self._lock:
            for pod in sorted(live - self.exporters.keys()):
                exp = AgentExporter()
                exp.add(self.namespace, pod, self.model)  # the series exists at zero
                exp.start()
                self.exporters[pod] = exp
                self.prometheus.add_scrape_target(
                    self._job(pod), exp.target,
                    labels={"namespace": self.namespace, "pod": pod})
            for pod in sorted(self.exporters.keys() - live):
                self._drop(pod)

    def _drop(self, pod: str) -> None:
        # The scrape job goes first, as the pod leaves service discovery before its
        # process ends: stopped first, its last `up` would read 0.
        self.prometheus.remove_scrape_target(self._job(pod))
        exp = self.exporters.pop(pod)
        if pod not in self._silenced:
            exp.stop()
        self._silenced.discard(pod)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self._sync()
            except Exception:  # noqa: BLE001 - a failed poll is retried at the next one
                continue
