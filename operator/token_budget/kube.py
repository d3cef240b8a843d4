"""A thin raw-JSON client over the official ``kubernetes`` client's transport.

Objects stay plain dicts (as the API server sends them): no model classes are
built for tens of thousands of pods, and one code path serves core, apps,
batch and our own resources. Configuration (kubeconfig or in-cluster) comes
from the ``kubernetes`` package; errors become the project's own types.

No logic lives here: what to read is decided by the gatherer, what to write
by the enforcement layer.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import kubernetes
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from urllib3 import BaseHTTPResponse
from urllib3.connectionpool import ConnectionPool
from urllib3.util import Retry

from token_budget.errors import Conflict, EnforcementError, Forbidden, TargetNotFound

MERGE_PATCH = "application/merge-patch+json"


@dataclass
class Counters:
    """Requests made, by verb (for the operator's own metrics and the benchmarks)."""

    by_verb: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, verb: str) -> None:
        with self.lock:
            self.by_verb[verb] = self.by_verb.get(verb, 0) + 1

    @property
    def writes(self) -> int:
        return sum(v for k, v in self.by_verb.items() if k in ("PATCH", "POST", "PUT", "DELETE"))


class ReplayReads(Retry):
    """The transport's retries: a request is asked again (3 times) after its connection
    failed only if it reads (GET, HEAD, OPTIONS, TRACE), as Go's HTTP client (client-go)
    replays only those; a write fails at once, and its caller decides with what it knows
    then. urllib3's default also replays PUT and DELETE, and each retry starts its own
    timeout: a Lease renewal sent just before a network partition reached the API server
    after it healed, from a replica that had long stopped leading (CI,
    tests/e2e/test_partitioned_leader.py; refused there by its resourceVersion, but a
    write after the lease was lost all the same), and a retried write could outlive the
    window LeaderOnlyKube gives it."""

    def increment(self, method: str | None = None, url: str | None = None,
                  response: BaseHTTPResponse | None = None, error: Exception | None = None,
                  _pool: ConnectionPool | None = None,
                  _stacktrace: TracebackType | None = None) -> Self:
        if error is not None and method is not None and method.upper() not in _REPLAYABLE:
            raise error.with_traceback(_stacktrace)  # as urllib3 does for what it won't replay
        return super().increment(method, url, response, error, _pool, _stacktrace)


_REPLAYABLE = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


def api_client(kubeconfig: str | None = None) -> ApiClient:
    """An ApiClient from in-cluster credentials, else the kubeconfig ($KUBECONFIG)."""
    try:
        kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
        config = kubernetes.client.Configuration.get_default_copy()
    except ConfigException:
        config = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig, client_configuration=config)
    config.retries = ReplayReads(total=3)
    return ApiClient(configuration=config)


@dataclass(frozen=True)
class Resource:
    """Where a kind lives in the REST API."""

    kind: str
    group_version: str  # "v1", "apps/v1", "tokenbudget.io/v1alpha1"
    plural: str
    namespaced: bool = True

    @property
    def base(self) -> str:
        return "/api/v1" if self.group_version == "v1" else f"/apis/{self.group_version}"

    def path(self, namespace: str | None = None, name: str | None = None,
             sub: str | None = None) -> str:
        p = self.base
        if self.namespaced and namespace:
            p += f"/namespaces/{quote(namespace)}"
        p += f"/{self.plural}"
        if name:
            p += f"/{quote(name)}"
        if sub:
            p += f"/{sub}"
        return p


PODS = Resource("Pod", "v1", "pods")
NAMESPACES = Resource("Namespace", "v1", "namespaces", namespaced=False)
EVENTS = Resource("Event", "v1", "events")
DEPLOYMENTS = Resource("Deployment", "apps/v1", "deployments")
STATEFULSETS = Resource("StatefulSet", "apps/v1", "statefulsets")
JOBS = Resource("Job", "batch/v1", "jobs")
CRONJOBS = Resource("CronJob", "batch/v1", "cronjobs")
LEASES = Resource("Lease", "coordination.k8s.io/v1", "leases")
TOKENBUDGETS = Resource("TokenBudget", "tokenbudget.io/v1alpha1", "tokenbudgets")
CLUSTERTOKENBUDGETS = Resource("ClusterTokenBudget", "tokenbudget.io/v1alpha1",
                               "clustertokenbudgets", namespaced=False)
MODELCATALOGS = Resource("ModelCatalog", "tokenbudget.io/v1alpha1", "modelcatalogs",
                         namespaced=False)
SCALEDOBJECTS = Resource("ScaledObject", "keda.sh/v1alpha1", "scaledobjects")
HPAS = Resource("HorizontalPodAutoscaler", "autoscaling/v2", "horizontalpodautoscalers")
WORKLOADS = {r.kind: r for r in (PODS, DEPLOYMENTS, STATEFULSETS, JOBS, CRONJOBS)}


class Kube:
    """Raw-JSON requests to the API server, counted by verb."""

    def __init__(self, client: ApiClient) -> None:
        self.client = client
        self.counters = Counters()

    def request(self, method: str, path: str, query: Mapping[str, Any] | None = None,
                body: Any = None, content_type: str | None = None,
                timeout: float = 30.0) -> Any:
        """One request; the decoded JSON answer. Raises EnforcementError subclasses."""
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type or "application/json"
        q = [(k, v) for k, v in (query or {}).items() if v is not None]
        method_, url, headers_, body_, _ = self.client.param_serialize(
            method=method, resource_path=path, query_params=q, header_params=headers,
            body=body, auth_settings=["BearerToken"],
        )
        self.counters.add(method)
        try:
            resp = self.client.call_api(method_, url, header_params=headers_, body=body_,
                                        _request_timeout=timeout)
            resp.read()  # type: ignore[no-untyped-call]
        except ApiException as exc:
            raise _error(exc, method, path) from exc
        status = resp.status
        data = resp.data
        if status >= 400:
            raise _error(ApiException(status=status, reason=resp.reason, body=data), method, path)
        return json.loads(data) if data else None

    def stream(self, path: str, query: Mapping[str, Any], stop: threading.Event,
               timeout: float = 300.0) -> Iterator[dict[str, Any]]:
        """Watch events (decoded JSON lines) until the server ends the watch or ``stop``."""
        q = [(k, v) for k, v in query.items() if v is not None]
        method_, url, headers_, _, _ = self.client.param_serialize(
            method="GET", resource_path=path, query_params=q,
            header_params={"Accept": "application/json"}, auth_settings=["BearerToken"])
        self.counters.add("WATCH")
        try:
            resp = self.client.call_api(method_, url, header_params=headers_,
                                        _request_timeout=timeout)
        except ApiException as exc:
            raise _error(exc, "WATCH", path) from exc
        raw = resp.response
        try:
            if resp.status >= 400:
                raise _error(ApiException(status=resp.status, reason=resp.reason,
                                          body=raw.data), "WATCH", path)
            buffer = b""
            for chunk in raw.stream(4096, decode_content=True):
                if stop.is_set():
                    return
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)
        finally:
            raw.release_conn()

    def list(self, res: Resource, namespace: str | None = None,
             label_selector: str | None = None, page: int = 500) -> list[dict[str, Any]]:
        """Every object (paged), each with ``kind`` and ``apiVersion`` filled in."""
        return list(self.iter_list(res, namespace, label_selector, page))

    def iter_list(self, res: Resource, namespace: str | None = None,
                  label_selector: str | None = None, page: int = 500
                  ) -> Iterator[dict[str, Any]]:
        token: str | None = None
        while True:
            data = self.request("GET", res.path(namespace), {
                "labelSelector": label_selector, "limit": page, "continue": token})
            for item in data.get("items") or []:
                item["kind"] = res.kind
                item["apiVersion"] = res.group_version
                # Server-side apply bookkeeping: never read here, and the largest part
                # of a listed pod's metadata (the operator's memory grew with it).
                (item.get("metadata") or {}).pop("managedFields", None)
                yield item
            token = (data.get("metadata") or {}).get("continue")
            if not token:
                return

    def get(self, res: Resource, namespace: str | None, name: str) -> dict[str, Any]:
        obj = self.request("GET", res.path(namespace, name))
        obj.setdefault("kind", res.kind)
        return dict(obj)

    def patch(self, res: Resource, namespace: str | None, name: str, body: Mapping[str, Any],
              sub: str | None = None) -> dict[str, Any]:
        """A JSON merge-patch (null deletes a key)."""
        return dict(self.request("PATCH", res.path(namespace, name, sub), body=dict(body),
                                 content_type=MERGE_PATCH))

    def create(self, res: Resource, namespace: str | None, body: Mapping[str, Any]
               ) -> dict[str, Any]:
        return dict(self.request("POST", res.path(namespace), body=dict(body)))

    def replace(self, res: Resource, namespace: str | None, name: str,
                body: Mapping[str, Any]) -> dict[str, Any]:
        return dict(self.request("PUT", res.path(namespace, name), body=dict(body)))

    def exists(self, res: Resource) -> bool:
        """Whether the API server serves a resource (e.g. KEDA's CRDs are installed)."""
        try:
            data = self.request("GET", res.base)
        except EnforcementError:
            return False
        return any(r.get("name") == res.plural for r in data.get("resources") or [])


def _error(exc: ApiException, method: str, path: str) -> EnforcementError:
    message = ""
    try:
        message = json.loads(exc.body or "{}").get("message", "")
    except (ValueError, AttributeError, TypeError):
        message = str(exc.body or "")[:300]
    text = f"{method} {path}: {exc.status} {message or exc.reason}"
    if exc.status == 404:
        return TargetNotFound(text)
    if exc.status == 409:
        return Conflict(text)
    if exc.status == 403:
        return Forbidden(text)
    err = EnforcementError(text)
    err.status = exc.status  # type: ignore[attr-defined]
    return err
