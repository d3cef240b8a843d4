"""The directive service on the real control plane: a Block reaches agents within a second.

The operator serves webhooks (and with them the directive service) on a loopback
port. Governed bare pods are created; the mutating webhook injects the service's
URL and CA; each pod gets a ServiceAccount token bound to it (TokenRequest) and a
:class:`token_budget.agent.Governor` that long-polls with it
(:mod:`harness.directive_agents`). Then real spend in Prometheus and a
TokenBudget make the operator write Blocked on every pod, and each Governor must
see it within a second of the write reaching a watcher of the API server.
Also: no token gets 401, another ServiceAccount's token 403 (the TokenReview is
the API server's own); a second replica that does not lead serves the same
directives, and the Block lifted by the leader reaches an agent asking it.
"""

from __future__ import annotations

import base64
import json
import re
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import webhooks
from harness.controlplane import ControlPlane, free_ports
from harness.directive_agents import StateWatch, connect, injected, lags, pod_body, token_for
from harness.exporter import AgentExporter
from harness.operator_process import OperatorProcess
from harness.prometheus import Prometheus
from harness.spend import seed, spend
from harness.waiting import eventually
from token_budget.agent import Governor
from token_budget.kube import PODS, TOKENBUDGETS, Kube, Resource
from token_budget.webhooks import directives
from token_budget.webhooks.certificates import SECRETS

AGENTS = 20
SERVICEACCOUNTS = Resource("ServiceAccount", "v1", "serviceaccounts")


@pytest.fixture
def operator(kube: Kube, controlplane: ControlPlane, prometheus: Prometheus,
             tmp_path: Path) -> Iterator[OperatorProcess]:
    (tmp_path / "op").mkdir()
    with webhooks.serving_operator(kube, controlplane.kubeconfig, prometheus.url,
                                   tmp_path / "op", identity="directives") as op:
        yield op


def _status(url: str, ca: str | None, token: str | None) -> tuple[int, Any]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"}
                                     if token else {})
    context = ssl.create_default_context(cadata=ca)
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, None


def test_agents_learn_of_a_block_within_a_second_and_only_their_own_pod(
        kube: Kube, namespace: str, exporter: AgentExporter, prometheus: Prometheus,
        operator: OperatorProcess, tmp_path: Path) -> None:
    ns = namespace
    (tmp_path / "agents").mkdir()
    eventually(lambda: webhooks._has_service_account(kube, ns), 60,
               what="the namespace's default ServiceAccount")
    seed(exporter, prometheus, ns, "agent-0")
    spend(exporter, prometheus, ns, "agent-0", 2_000_000)
    pods = [kube.create(PODS, ns, pod_body(f"agent-{i}")) for i in range(AGENTS)]
    url, ca = injected(pods[0])
    assert url.startswith("https://127.0.0.1:") and url.endswith(f"/{ns}/pods/agent-0/directive")
    assert ca and "BEGIN CERTIFICATE" in ca

    # Who may read: nobody without a token, not another ServiceAccount of the namespace.
    kube.create(SERVICEACCOUNTS, ns, {"apiVersion": "v1", "kind": "ServiceAccount",
                                      "metadata": {"name": "builder"}})
    other = kube.create(PODS, ns, pod_body("builder-0", service_account="builder"))
    assert _status(url, ca, None)[0] == 401
    assert _status(url, ca, "not-a-token")[0] == 401
    assert _status(url, ca, token_for(kube, other))[0] == 403
    status, body = eventually(lambda: (lambda r: r if r[0] == 200 else None)(
        _status(url, ca, token_for(kube, pods[0]))), 30, what="agent-0's directive")
    assert body["pod"] == "agent-0"

    t0 = time.monotonic()
    agents = connect(kube, pods, tmp_path / "agents")
    connected = time.monotonic() - t0
    try:
        assert all(a.governor.served for a in agents), "an agent reads its file, not the service"
        watch = StateWatch(kube, ns, "Blocked")
        watch.start()
        assert watch.started.wait(10)
        kube.create(TOKENBUDGETS, ns, {
            "apiVersion": "tokenbudget.io/v1alpha1", "kind": "TokenBudget",
            "metadata": {"name": "team"},
            "spec": {"limits": [{"window": "1h", "tokens": 1_000_000}],
                     "actions": [{"type": "Block", "atPercent": 100}]}})
        try:
            eventually(lambda: all(a.name in watch.seen and "Blocked" in a.seen
                                   for a in agents), 60,
                       what=f"all {AGENTS} pods Blocked and every Governor to see it")
        except AssertionError as exc:
            budget = kube.get(TOKENBUDGETS, ns, "team").get("status")
            raise AssertionError(f"{exc}\nwatched Blocked: {sorted(watch.seen)}\n"
                                 f"agents: {[(a.name, a.seen) for a in agents]}\n"
                                 f"budget status: {budget}\n{operator.tail(40)}") from None
        watch.stop.set()
        seen, early = lags(agents, watch, "Blocked")
        seen.sort()
        p50, worst = seen[len(seen) // 2], seen[-1]
        print(f"\n{AGENTS} agents connected in {connected:.1f} s; decision written -> "
              f"Governor sees it: p50 {p50 * 1000:.0f} ms, max {worst * 1000:.0f} ms "
              f"({early} saw it before the test's own watch)")
        assert worst < 1.0, f"a Governor learned of the Block {worst:.2f} s after the write"
        assert all(a.governor.directive().blocked for a in agents)
        lifted_by_the_leader_seen_through_a_standby(kube, ns, operator, pods[0], tmp_path)
    finally:
        for a in agents:
            a.governor.close()
    assert directives.URL_ENV in {e["name"] for e in pods[0]["spec"]["containers"][0]["env"]}


def lifted_by_the_leader_seen_through_a_standby(kube: Kube, ns: str, leader: OperatorProcess,
                                               pod: dict[str, Any], tmp_path: Path) -> None:
    """A second replica that does not lead serves the same directives from its own watch.

    It serves the webhook Secret's certificate from files (``--webhook-cert-dir``), so it
    writes no configuration; the budget's deletion makes the leader lift the Block, and an
    agent asking the standby sees it.
    """
    certs = tmp_path / "standby-certs"
    certs.mkdir()
    secret = kube.get(SECRETS, "default", "token-budget-operator-webhook-tls")
    for key in ("tls.crt", "tls.key"):
        (certs / key).write_bytes(base64.b64decode(secret["data"][key]))
    args = leader.argv()
    lease = args[len(args) - 1 - args[::-1].index("--lease-name") + 1]
    [port] = free_ports(1)
    standby = OperatorProcess(leader.kubeconfig, leader.prometheus_url, tmp_path,
                              identity="standby",
                              extra_args=["--lease-name", lease, "--webhook-port", str(port),
                                          "--webhook-cert-dir", str(certs)])
    standby.start()
    try:
        url, ca = injected(pod)
        url = re.sub(r"^https://127\.0\.0\.1:\d+/", f"https://127.0.0.1:{port}/", url)
        token = tmp_path / "standby.token"
        token.write_text(token_for(kube, pod))

        def blocked_through_the_standby() -> Governor | None:
            g = Governor(str(tmp_path / "absent"), url=url, ca=ca, token_file=str(token),
                         missing_ok=True)
            if g.served and g.directive().blocked:
                return g
            g.close()
            return None

        gov = eventually(blocked_through_the_standby, 30, what="the standby to serve the Block")
        try:
            assert "standby is now the leader" not in standby.tail(500)
            kube.request("DELETE", TOKENBUDGETS.path(ns, "team"))
            eventually(lambda: gov.served and not gov.directive().blocked, 30,
                       what="the lifted Block through the standby")
        finally:
            gov.close()
    finally:
        standby.stop()
