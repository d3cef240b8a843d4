"""Target 5: admission latency, at the webhook and through the API server, at 200 req/s.

One operator replica serves its webhooks on a loopback port (``--webhook-url
https://127.0.0.1:<port>``, as tests/e2e/test_webhooks.py starts it), with a
TokenBudget (state Ok) in the benchmark's namespace so the pod handlers have a budget
to decide from.

* Directly: AdmissionReviews for a pod CREATE are POSTed over TLS (the operator's own
  CA, from its Secret) to ``/validate-pods`` and to ``/mutate-pods``, on keep-alive
  connections, as the API server sends them.
* Through the API server: agent pods (label ``tokenbudget.io/agent``, so both pod
  webhooks are called) are created; the same number of pods without the label (no
  webhook) gives the API server's own latency on this machine for comparison.

Each loop is bounded (a fixed number of requests) and open: request i is due at
t0 + i/200 s, spread over a few client threads with their own connections, and its
latency counts from when it was due, so a slow answer also delays what queues behind it.
"""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.cluster import AGENT, Cluster, shared, webhook_port
from bench.common import Figure, Report, load, percentile, wait_for_quiet
from harness.waiting import eventually
from token_budget.errors import TargetNotFound
from token_budget.kube import PODS, TOKENBUDGETS
from token_budget.webhooks.certificates import SECRETS
from token_budget.webhooks.configuration import MUTATING, NAME, VALIDATING

RATE = 200.0
WEBHOOK_P99_MS = 5.0
APISERVER_P99_MS = 25.0


def paced(call: Callable[[Any, int], None], n: int, rate: float, workers: int,
          connect: Callable[[], Any]) -> tuple[list[float], int, float]:
    """Run ``call(conn, i)`` for i < n, request i due at t0 + i/rate; latencies in ms."""
    latencies: list[list[float]] = [[] for _ in range(workers)]
    errors = [0] * workers
    t0 = time.monotonic() + 0.2

    def worker(w: int) -> None:
        conn = connect()
        for i in range(w, n, workers):
            due = t0 + i / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            try:
                call(conn, i)
            except Exception:  # noqa: BLE001 - counted, and the connection renewed
                errors[w] += 1
                conn = connect()
                continue
            latencies[w].append((time.monotonic() - due) * 1000)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - t0
    return [x for lat in latencies for x in lat], sum(errors), n / took


def pod(name: str, agent: bool) -> dict[str, Any]:
    labels = {"app": "bench"}
    if agent:
        labels[AGENT] = "true"
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": labels},
            "spec": {"containers": [{"name": "a", "image": "example/agent:1",
                                     "env": [{"name": "LLM_MODEL", "value": "gpt-4o"}]}]}}


def review(namespace: str, name: str) -> bytes:
    obj = pod(name, True)
    obj["metadata"]["namespace"] = namespace
    gvk = {"group": "", "version": "v1", "kind": "Pod"}
    gvr = {"group": "", "version": "v1", "resource": "pods"}
    return json.dumps({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()), "kind": gvk, "resource": gvr, "requestKind": gvk,
            "requestResource": gvr, "name": name, "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller",
                         "groups": ["system:serviceaccounts", "system:authenticated"]},
            "object": obj, "oldObject": None, "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        }}).encode()


def direct(report: Report, port: int, ca: bytes, namespace: str, n: int, contended: bool
           ) -> None:
    ca_file = Path(tempfile.mkstemp(prefix="tbo-bench-ca-", suffix=".crt")[1])
    ca_file.write_bytes(ca)
    ctx = ssl.create_default_context(cafile=str(ca_file))

    def connect() -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)

    for path in ("validate-pods", "mutate-pods"):
        bodies = [review(namespace, f"direct-{i}") for i in range(n)]

        def call(conn: http.client.HTTPSConnection, i: int, path: str = path,
                 bodies: list[bytes] = bodies) -> None:
            conn.request("POST", "/" + path, body=bodies[i],
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            if resp.status != 200 or not json.loads(data)["response"]["allowed"]:
                raise RuntimeError(f"{path}: {resp.status} {data[:200]!r}")

        paced(call, min(200, n), RATE, 2, connect)  # warm-up: connections, caches
        lat, errors, achieved = paced(call, n, RATE, 2, connect)
        kb = {"benchmark": "admission", "contended": contended}
        note = (f"{n} requests at {achieved:.0f}/s, {errors} errors; "
                f"p50 {percentile(lat, 50):.2f} ms")
        report.add(Figure(**kb, name=f"webhook {path} directly: p50", unit="ms",
                          value=percentile(lat, 50), note=note))
        p99 = percentile(lat, 99)
        report.add(Figure(**kb, name=f"webhook {path} directly: p99", unit="ms", value=p99,
                          target=f"< {WEBHOOK_P99_MS:g} ms",
                          met=p99 is not None and p99 < WEBHOOK_P99_MS and errors == 0,
                          note=note))
    ca_file.unlink()


def through_apiserver(report: Report, cluster: Cluster, namespace: str, n: int,
                      contended: bool) -> None:
    results: dict[bool, list[float]] = {}
    for agent, rate in ((False, RATE), (True, RATE), (True, RATE / 2)):
        kube = cluster.client(16)
        prefix = ("agent" if rate == RATE else "half") if agent else "plain"
        count = n if rate == RATE else n // 2  # half the rate: what this machine sustains

        def call(_: Any, i: int, agent: bool = agent, prefix: str = prefix,
                 kube: Any = kube) -> None:
            kube.create(PODS, namespace, pod(f"{prefix}-{i}", agent))

        paced(lambda c, i, call=call: call(c, i + 10 * n), min(200, count), rate, 8,
              lambda: None)  # warm-up
        lat, errors, achieved = paced(call, count, rate, 8, lambda: None)
        results.setdefault(agent, lat)
        what = "agent pods (both webhooks)" if agent else "pods without the label (no webhook)"
        if rate < RATE:
            what += f" at {rate:g}/s"
        kb = {"benchmark": "admission", "contended": contended}
        note = f"{count} creates at {achieved:.0f}/s, {errors} errors"
        report.add(Figure(**kb, name=f"API server, {what}: p50", unit="ms",
                          value=percentile(lat, 50), note=note))
        p99 = percentile(lat, 99)
        held = agent and rate == RATE
        report.add(Figure(**kb, name=f"API server, {what}: p99", unit="ms", value=p99,
                          target=f"< {APISERVER_P99_MS:g} ms" if held else "",
                          met=(p99 is not None and p99 < APISERVER_P99_MS and errors == 0)
                          if held else None, note=note))
    stamped = [p for p in cluster.client().list(PODS, namespace, AGENT)
               if (p["metadata"].get("annotations") or {}).get("tokenbudget.io/state")]
    report.note("admission", f"{len(stamped)} agent pods were stamped with a directive by "
                             "the mutating webhook")
    p50s = [percentile(results[a], 50) or 0.0 for a in (False, True)]
    report.add(Figure("admission", "API server: webhook overhead at p50", p50s[1] - p50s[0],
                      "ms", contended=contended))


def run(report: Report, quick: bool, wait_seconds: float = 300) -> None:
    n = 400 if quick else 2_000
    quiet = wait_for_quiet(0 if quick else wait_seconds)
    cluster = shared()
    kube = cluster.client()
    ns = f"adm-{uuid.uuid4().hex[:6]}"
    cluster.namespaces([ns])
    kube.create(TOKENBUDGETS, ns, {
        "apiVersion": "tokenbudget.io/v1alpha1", "kind": "TokenBudget",
        "metadata": {"name": "team"},
        "spec": {"limits": [{"window": "1h", "tokens": 1_000_000_000}],
                 "deniedModels": ["claude-opus-4-1"]}})
    port = webhook_port()
    op = cluster.operator(30, "--webhook-port", str(port), "--webhook-host", "127.0.0.1",
                          "--webhook-url", f"https://127.0.0.1:{port}", identity="admission")
    try:
        def configured() -> bool:
            try:
                kube.get(VALIDATING, None, NAME)
                kube.get(MUTATING, None, NAME)
                return True
            except TargetNotFound:
                return False

        eventually(configured, 60, what="webhook configurations")
        secret = kube.get(SECRETS, "default", "token-budget-operator-webhook-tls")
        ca = base64.b64decode(secret["data"]["ca.crt"])
        time.sleep(2)  # the budget reaches the webhook's cache through kopf's watch
        load0 = load()
        direct(report, port, ca, ns, n, not quiet)
        through_apiserver(report, cluster, ns, n, not quiet)
        report.note("admission", f"load before {load0}, after {load()}; the operator "
                                 "evaluated meanwhile (new agent pods wake it)")
    finally:
        cluster.stop_operator(op)
        for res in (VALIDATING, MUTATING):
            try:
                kube.request("DELETE", res.path(None, NAME))
            except TargetNotFound:
                pass
        cluster.delete_namespaces([ns])
