"""Enrolment by signal: what sending unlabelled pods to the webhook costs where it changes nothing.

With enrolment by signal on, every unlabelled pod created outside the excluded
namespaces reaches ``enrol-pods`` (a static configuration cannot tell which
namespaces a ClusterTokenBudget makes mandatory), and the operator answers "no
change" outside mandatory ones. One replica serves its webhooks on loopback, as
in :mod:`bench.admission_bench`, and the same run measures, side by side:

* directly: AdmissionReviews of an unlabelled pod (with ``OPENAI_API_KEY``, so
  the signal is found and only the namespace says no) POSTed to
  ``/mutate-pods``, beside those of an agent pod (a directive stamped);
* through the API server: unlabelled pods in a namespace that is not mandatory,
  with the ``enrol-*`` webhooks configured (A), then after removing them from the
  live MutatingWebhookConfiguration (B: what ``--no-enrolment-by-signal``
  writes), at the same open-loop rate.
"""

from __future__ import annotations

import base64
import copy
import json
import uuid
from typing import Any

from bench.admission_bench import (
    RATE,
    WARMUP,
    Target,
    _apiserver_pid,
    _apiserver_target,
    _figures,
    measured,
    review,
)
from bench.cluster import AGENT, shared, webhook_port
from bench.common import Report, load, wait_for_quiet
from harness.waiting import eventually
from token_budget.errors import TargetNotFound
from token_budget.kube import PODS, TOKENBUDGETS
from token_budget.webhooks.certificates import SECRETS
from token_budget.webhooks.configuration import MUTATING, NAME, VALIDATING


def unlabelled(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {"app": "bench"}},
            "spec": {"containers": [{"name": "a", "image": "example/agent:1", "env": [
                {"name": "OPENAI_API_KEY", "value": "sk-bench"}]}]}}


def unlabelled_review(namespace: str, name: str) -> bytes:
    body = json.loads(review(namespace, name))
    obj = unlabelled(name)
    obj["metadata"]["namespace"] = namespace
    body["request"]["object"] = obj
    return json.dumps(body).encode()


def _enrolled(kube: Any, namespace: str) -> bool:
    """Whether the API server still sends an unlabelled pod with a key to enrol-pods."""
    created = kube.request("POST", PODS.path(namespace), {"dryRun": "All"},
                           unlabelled(f"probe-{uuid.uuid4().hex[:6]}"))
    return AGENT in (created["metadata"].get("labels") or {})


def run(report: Report, quick: bool, wait_seconds: float = 300) -> None:
    n = 400 if quick else 2_000
    quiet = wait_for_quiet(0 if quick else wait_seconds)
    cluster = shared()
    kube = cluster.client()
    ns, mandatory = f"enr-{uuid.uuid4().hex[:6]}", f"enm-{uuid.uuid4().hex[:6]}"
    cluster.namespaces([ns])
    cluster.namespaces([mandatory], labels={"tokenbudget.io/enrolment": "Mandatory"})
    for where in (ns, mandatory):
        kube.create(TOKENBUDGETS, where, {
            "apiVersion": "tokenbudget.io/v1alpha1", "kind": "TokenBudget",
            "metadata": {"name": "team"},
            "spec": {"limits": [{"window": "1h", "tokens": 1_000_000_000}]}})
    port = webhook_port()
    op = cluster.operator(30, "--webhook-port", str(port), "--webhook-host", "127.0.0.1",
                          "--webhook-url", f"https://127.0.0.1:{port}", identity="enrolment")
    try:
        eventually(lambda: _enrolled(kube, mandatory), 60,
                   what="the API server calling enrol-pods")
        secret = kube.get(SECRETS, "default", "token-budget-operator-webhook-tls")
        ca = base64.b64decode(secret["data"]["ca.crt"])
        load0 = load()
        pid = op.proc.pid if op.proc is not None else None
        contended = not quiet
        direct = Target(f"https://127.0.0.1:{port}/mutate-pods", ca, 200, review=True)
        for what, make in (("an unlabelled pod, namespace not mandatory", unlabelled_review),
                           ("an agent pod", review)):
            warm = [make(ns, f"warm-{i}") for i in range(WARMUP)]
            bodies = [make(ns, f"direct-{i}") for i in range(n)]
            result, cpu, conns = measured(direct, warm, bodies, RATE, {"operator": pid}, port)
            _figures(report, f"webhook mutate-pods directly, {what}", result, cpu, n, None,
                     contended, conns)
        apiserver = _apiserver_target(cluster, ns)
        pids = {"operator": pid, "API server": _apiserver_pid(cluster)}
        live = kube.get(MUTATING, None, NAME)
        for label in ("A: enrol-pods configured", "B: no enrol-* webhook"):
            if label.startswith("B"):
                body = copy.deepcopy(live)
                body["webhooks"] = [h for h in live["webhooks"]
                                    if not h["name"].startswith("enrol-")]
                kube.replace(MUTATING, None, NAME, body)
                eventually(lambda: not _enrolled(kube, mandatory), 60,
                           what="the API server no longer calling enrol-pods")
            tag = label[0].lower()
            warm = [json.dumps(unlabelled(f"{tag}-warm-{i}")).encode() for i in range(WARMUP)]
            bodies = [json.dumps(unlabelled(f"{tag}-{i}")).encode() for i in range(n)]
            result, cpu, conns = measured(apiserver, warm, bodies, RATE, pids, port)
            _figures(report, f"API server, unlabelled pods, namespace not mandatory, {label}",
                     result, cpu, n, None, contended, conns)
        report.note("enrolment", f"load before {load0}, after {load()}; {n} pods per loop at "
                                 f"{RATE:g}/s after {WARMUP} warm-up requests")
    finally:
        cluster.stop_operator(op)
        for res in (VALIDATING, MUTATING):
            try:
                kube.request("DELETE", res.path(None, NAME))
            except TargetNotFound:
                pass
        cluster.delete_namespaces([ns, mandatory])
