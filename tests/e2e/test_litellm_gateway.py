"""The LiteLLM proxy enforces directives per request (issue 15, part 2), end to end.

A real LiteLLM proxy (``litellm[proxy]`` from PyPI, :mod:`harness.litellm_proxy`)
in front of an OpenAI-compatible stub, with ``token_budget.litellm_callback``
loaded from its config; the operator serves the directive service and lets the
proxy's ServiceAccount read every pod's directive (``--directive-readers``). The
"agent" is plain HTTP that ignores every annotation and only names its pod in
the request's metadata. Real spend in Prometheus and a TokenBudget (Reroute at
50 %, Throttle at 70 %, Block at 100 %) make the operator decide; the proxy then
sends the agent's ``gpt-4o`` to ``gpt-4o-mini``, then refuses it with 429 once
the calls' tokens (150 each, from the stub's ``usage``) exceed the pod's rate,
and at last refuses everything with 429 and the budget's reason.
``allowed-models`` is covered by tests/unit/test_gateway.py, not here.

The second test closes the loop: the budget's spend is LiteLLM's own metrics (the
LiteLLM preset), scraped by the test Prometheus, so the agent's calls through the
proxy are what reroutes and then blocks it.
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import webhooks
from harness.controlplane import ControlPlane
from harness.directive_agents import injected, pod_body, token_for
from harness.exporter import AgentExporter
from harness.litellm_proxy import Proxy, Upstream
from harness.operator_process import OperatorProcess
from harness.prometheus import Prometheus
from harness.spend import seed, spend
from harness.waiting import eventually
from token_budget import gateway
from token_budget.kube import MERGE_PATCH, PODS, TOKENBUDGETS, Kube, Resource

SERVICEACCOUNTS = Resource("ServiceAccount", "v1", "serviceaccounts")
MODELS = ["gpt-4o", "gpt-4o-mini"]


@pytest.fixture
def operator(kube: Kube, controlplane: ControlPlane, prometheus: Prometheus, namespace: str,
             tmp_path: Path) -> Iterator[OperatorProcess]:
    (tmp_path / "op").mkdir()
    with webhooks.serving_operator(kube, controlplane.kubeconfig, prometheus.url,
                                   tmp_path / "op", identity="gateway",
                                   extra_args=["--directive-readers",
                                               f"{namespace}:litellm"]) as op:
        yield op


def gateway_for_agent(kube: Kube, ns: str, tmp_path: Path, metrics: bool = False,
                      identity: str = "metadata") -> tuple[Upstream, Proxy]:
    """A governed pod agent-0, and a proxy (not started) that reads directives as the
    ServiceAccount litellm (the operator's reader) through the URL and CA the webhook
    injected into the pod, and knows callers as ``identity`` says."""
    eventually(lambda: webhooks._has_service_account(kube, ns), 60,
               what="the namespace's default ServiceAccount")
    agent = kube.create(PODS, ns, pod_body("agent-0"))
    url, ca = injected(agent)
    assert ca
    kube.create(SERVICEACCOUNTS, ns, {"apiVersion": "v1", "kind": "ServiceAccount",
                                      "metadata": {"name": "litellm"}})
    token = kube.request("POST", f"/api/v1/namespaces/{ns}/serviceaccounts/litellm/token",
                         body={"apiVersion": "authentication.k8s.io/v1",
                               "kind": "TokenRequest", "spec": {"expirationSeconds": 3600}})
    (tmp_path / "token").write_text(token["status"]["token"])
    (tmp_path / "ca.crt").write_text(ca)
    upstream = Upstream()
    upstream.start()
    return upstream, Proxy(tmp_path, upstream, MODELS, {
        "TOKENBUDGET_DIRECTIVE_BASE_URL": url.split("/v1/")[0],
        "TOKENBUDGET_GATEWAY_TOKEN_FILE": str(tmp_path / "token"),
        "TOKENBUDGET_DIRECTIVE_CA_FILE": str(tmp_path / "ca.crt"),
        "TOKENBUDGET_GATEWAY_FAIL_CLOSED": "true",  # an unreadable directive fails the test
        "TOKENBUDGET_GATEWAY_IDENTITY": identity,
    }, metrics=metrics)


def test_an_agent_that_ignores_annotations_is_rerouted_then_blocked_by_the_proxy(
        kube: Kube, namespace: str, exporter: AgentExporter, prometheus: Prometheus,
        operator: OperatorProcess, tmp_path: Path) -> None:
    ns = namespace
    upstream, proxy = gateway_for_agent(kube, ns, tmp_path)
    me = {"namespace": ns, "pod": "agent-0"}
    try:
        proxy.start()
        seed(exporter, prometheus, ns, "agent-0")
        status, body = proxy.chat("gpt-4o", me)
        assert status == 200 and upstream.models[-1] == "gpt-4o", (status, body, proxy.tail())
        kube.create(TOKENBUDGETS, ns, {
            "apiVersion": "tokenbudget.io/v1alpha1", "kind": "TokenBudget",
            "metadata": {"name": "team"},
            "spec": {"limits": [{"window": "1h", "tokens": 1_000_000}],
                     "actions": [{"type": "Reroute", "atPercent": 50},
                                 {"type": "Throttle", "atPercent": 70,
                                  "tokensPerMinute": 600},
                                 {"type": "Block", "atPercent": 100}]}})
        spend(exporter, prometheus, ns, "agent-0", 600_000)

        def rerouted() -> bool:
            status, body = proxy.chat("gpt-4o", me)
            assert status == 200, (status, body)
            return upstream.models[-1] == "gpt-4o-mini"

        eventually(rerouted, 60, interval=0.5, what="the proxy to reroute gpt-4o")
        spend(exporter, prometheus, ns, "agent-0", 150_000)
        eventually(lambda: kube.get(PODS, ns, "agent-0")["metadata"]["annotations"].get(
            "tokenbudget.io/tokens-per-minute") == "600", 60, what="the pod Throttled")
        time.sleep(gateway.TTL_SECONDS + 0.2)  # the proxy's cached Reroute has expired

        def throttled() -> int:
            # 600 tokens a minute, 150 a call: a few calls pass, then the bucket is in debt.
            calls = 0
            while (answer := proxy.chat("gpt-4o", me))[0] == 200:
                calls += 1
                assert calls < 20, "the proxy does not hold the rate"
            assert answer[0] == 429 and "throttled by" in str(answer[1]), answer
            return calls

        passed = throttled()
        # A full bucket of 600 lets 5 calls through (the 5th leaves it at 0); LiteLLM settles
        # a call's tokens in a background task, so one more may pass before it has.
        assert 5 <= passed <= 6, f"{passed} calls of 150 tokens passed a 600/min bucket"
        spend(exporter, prometheus, ns, "agent-0", 350_000)

        def blocked() -> str:
            status, body = proxy.chat("gpt-4o", me)
            assert status == 429 and "blocked by" in str(body), (status, body)
            return str(body)

        said = eventually(blocked, 60, interval=0.5, what="the proxy to refuse with 429")
        assert f"blocked by TokenBudget/{ns}/team" in said, said
        # Another caller the operator does not govern passes untouched.
        status, _ = proxy.chat("gpt-4o", {"namespace": ns, "pod": "someone-else"})
        assert status == 200 and upstream.models[-1] == "gpt-4o"
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- litellm:\n{proxy.tail()}\n--- operator:\n"
                             f"{operator.tail(30)}") from None
    finally:
        proxy.stop()
        upstream.stop()


def test_litellms_own_metrics_are_the_spend_that_blocks_the_caller(
        kube: Kube, namespace: str, prometheus: Prometheus, operator: OperatorProcess,
        tmp_path: Path) -> None:
    """The closed loop: nothing simulated but the model.

    The budget reads spend from the proxy's own metrics (the LiteLLM preset, the
    caller named by ``metadata_namespace`` / ``metadata_pod``), scraped by the test
    Prometheus; the agent's calls through the proxy are the spend that first reroutes
    and then blocks it.
    """
    ns = namespace
    upstream, proxy = gateway_for_agent(kube, ns, tmp_path, metrics=True)
    job = f"litellm-{ns[-6:]}"
    me = {"namespace": ns, "pod": "agent-0"}
    try:
        proxy.start()
        prometheus.add_scrape_target(job, f"127.0.0.1:{proxy.port}", metrics_path="/metrics/")
        assert proxy.chat("gpt-4o", me)[0] == 200  # the series exist (at 150 tokens)
        prometheus.wait_for(f'litellm_input_tokens_metric_total{{metadata_namespace="{ns}"}}',
                            timeout=30)
        kube.create(TOKENBUDGETS, ns, {
            "apiVersion": "tokenbudget.io/v1alpha1", "kind": "TokenBudget",
            "metadata": {"name": "team"},
            "spec": {"source": {"preset": "LiteLLM", "labels": {
                         "namespace": "metadata_namespace", "workload": "metadata_pod"}},
                     "limits": [{"window": "1h", "tokens": 1_500}],
                     "actions": [{"type": "Reroute", "atPercent": 40},
                                 {"type": "Block", "atPercent": 100}]}})
        answers: list[tuple[int, str]] = []

        def blocked() -> bool:
            status, body = proxy.chat("gpt-4o", me)
            answers.append((status, upstream.models[-1] if status == 200 else str(body)))
            return status == 429 and "blocked by" in str(body)

        try:
            eventually(blocked, 60, interval=1.0, what="the agent's own spend to block it")
        except AssertionError as exc:
            seen = prometheus.query(
                f'litellm_input_tokens_metric_total{{metadata_namespace="{ns}"}}')
            budget = kube.get(TOKENBUDGETS, ns, "team").get("status")
            raise AssertionError(f"{exc}\nbudget: {budget}\nseries: {seen}") from None
        models = [m for s, m in answers if s == 200]
        assert "gpt-4o-mini" in models, f"never rerouted on the way: {answers}"
        assert models.index("gpt-4o-mini") > 0 and "gpt-4o" in models[:1], answers
        status = kube.get(TOKENBUDGETS, ns, "team")["status"]
        assert status["state"] == "Blocked" and status["usedPercent"] >= 100, status
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- litellm:\n{proxy.tail()}\n--- operator:\n"
                             f"{operator.tail(30)}") from None
    finally:
        prometheus.remove_scrape_target(job)
        proxy.stop()
        upstream.stop()


def _holds(kube: Kube, ns: str, name: str, ip: str | None) -> None:
    """Give a pod an IP as a kubelet would (this control plane has none): ``pods/status``."""
    kube.request("PATCH", f"/api/v1/namespaces/{ns}/pods/{name}/status", body={
        "status": {"podIP": ip, "podIPs": [{"ip": ip}] if ip else None}},
        content_type=MERGE_PATCH)


def _ask_caller(base: str, ca: str, ip: str, token: str) -> tuple[int, Any]:
    """GET /v1/callers/{ip}/directive over the operator's TLS."""
    request = urllib.request.Request(f"{base}/v1/callers/{ip}/directive",
                                     headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, context=ssl.create_default_context(cadata=ca),
                                    timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, None


def test_the_proxy_knows_callers_by_their_pod_ip_and_checks_their_claims(
        kube: Kube, namespace: str, operator: OperatorProcess, tmp_path: Path) -> None:
    """Issues 15 and 19: the caller's pod IP, resolved by the operator.

    Two proxies, ``pod-ip`` and ``checked``, in front of one stub. Three governed
    pods hold loopback addresses (written to ``pods/status`` by the test: no
    kubelet here) and each "agent" connects from its own. agent-0 at 127.0.0.7 is
    under a TokenBudget that allows only gpt-4o-mini (a directive the operator
    writes without any spend, so the test needs no Prometheus); agent-1 at
    127.0.0.8 is under none. Each asks for gpt-4o: what the proxy answers says
    whom it judged. The caller endpoint answers the proxy's reader token over the
    operator's TLS, and refuses a pod's own token (the API server's TokenReview).
    """
    ns = namespace
    upstream, by_ip = gateway_for_agent(kube, ns, tmp_path, metrics=True, identity="pod-ip")
    checked = Proxy(tmp_path, upstream, MODELS,
                    {**by_ip.env, "TOKENBUDGET_GATEWAY_IDENTITY": "checked"})
    try:
        by_ip.spawn()  # both come up (20-40 s under load) while the operator does the rest
        checked.spawn()
        for name in ("agent-1", "agent-2"):
            kube.create(PODS, ns, pod_body(name))
        kube.patch(PODS, ns, "agent-0", {"metadata": {"labels": {"role": "restricted"}}})
        kube.create(TOKENBUDGETS, ns, {
            "apiVersion": "tokenbudget.io/v1alpha1", "kind": "TokenBudget",
            "metadata": {"name": "restricted"},
            "spec": {"selector": {"matchLabels": {"tokenbudget.io/agent": "true",
                                                  "role": "restricted"}},
                     "limits": [{"window": "1h", "tokens": 1_000_000}],
                     "allowedModels": ["gpt-4o-mini"]}})
        _holds(kube, ns, "agent-0", "127.0.0.7")
        _holds(kube, ns, "agent-1", "127.0.0.8")
        restricted_ip, free_ip, nobody_ip = "127.0.0.7", "127.0.0.8", "127.0.0.9"
        not_allowed = f"gpt-4o is not allowed by TokenBudget/{ns}/restricted"

        def model_of(answer: tuple[int, Any]) -> str:
            assert answer[0] == 200, answer
            return upstream.models[-1]

        def refused(answer: tuple[int, Any]) -> bool:
            return answer[0] == 403 and not_allowed in str(answer[1])

        by_ip.wait_ready()
        checked.wait_ready()
        started = time.monotonic()
        # pod-ip: the agent sends nothing; its address is who it is. (The operator may be
        # a moment behind the budget and the status patches: wait for the first answer.)
        eventually(lambda: refused(by_ip.chat("gpt-4o", None, restricted_ip)), 30,
                   interval=0.5, what="the proxy to know 127.0.0.7 as the restricted agent-0")
        assert model_of(by_ip.chat("gpt-4o-mini", None, restricted_ip)) == "gpt-4o-mini"
        assert model_of(by_ip.chat("gpt-4o", None, free_ip)) == "gpt-4o"
        # Naming the free pod, writing its IP into the metadata or X-Forwarded-For: the
        # restricted agent is still itself.
        for meta, headers in (({"namespace": ns, "pod": "agent-1"}, None),
                              ({"requester_ip_address": free_ip}, None),
                              (None, {"X-Forwarded-For": free_ip})):
            answer = by_ip.chat("gpt-4o", meta, restricted_ip, headers)
            assert refused(answer), (meta, headers, answer)
        # The free agent claiming the restricted pod is judged (and labelled) as itself.
        claim_0 = {"namespace": ns, "pod": "agent-0"}
        assert model_of(by_ip.chat("gpt-4o", claim_0, free_ip)) == "gpt-4o"
        # An address no governed pod holds passes as nobody.
        assert model_of(by_ip.chat("gpt-4o", None, nobody_ip)) == "gpt-4o"

        # checked: a claim the address does not prove is refused, naming both.
        status, body = checked.chat("gpt-4o", claim_0, free_ip)
        assert status == 403, (status, body)
        assert f"names {ns}/agent-0 but comes from {free_ip}, the IP of {ns}/agent-1" \
            in str(body), body
        assert model_of(checked.chat("gpt-4o", {"namespace": ns, "pod": "agent-1"},
                                     free_ip)) == "gpt-4o"
        assert refused(checked.chat("gpt-4o", claim_0, restricted_ip))
        assert refused(checked.chat("gpt-4o", None, restricted_ip))  # no claim: the address
        assert checked.chat("gpt-4o", claim_0, nobody_ip)[0] == 403

        # agent-0 goes; its address goes to agent-2 (no budget): the address follows.
        kube.request("DELETE", PODS.path(ns, "agent-0"), {"gracePeriodSeconds": 0})
        _holds(kube, ns, "agent-2", restricted_ip)
        eventually(lambda: by_ip.chat("gpt-4o", None, restricted_ip)[0] == 200, 30,
                   interval=0.5, what="127.0.0.7 to be agent-2's")
        # The checked proxy's cache of 127.0.0.7 (a second at most) may still say agent-0.
        eventually(lambda: model_of(checked.chat("gpt-4o", {"namespace": ns, "pod": "agent-2"},
                                                 restricted_ip)) == "gpt-4o",
                   gateway.TTL_SECONDS + 5, interval=0.3, what="checked to follow 127.0.0.7")
        elapsed = time.monotonic() - started
        # The service itself, with the API server's own TokenReview: the proxy's reader
        # token resolves an IP, a pod's own token may not.
        base, ca = by_ip.env["TOKENBUDGET_DIRECTIVE_BASE_URL"], (tmp_path / "ca.crt").read_text()
        status, doc = _ask_caller(base, ca, free_ip, (tmp_path / "token").read_text())
        assert status == 200 and (doc["namespace"], doc["pod"], doc["ip"]) == \
            (ns, "agent-1", free_ip), (status, doc)
        agent_1 = token_for(kube, kube.get(PODS, ns, "agent-1"))
        assert _ask_caller(base, ca, free_ip, agent_1)[0] == 403
        # LiteLLM's own metrics name the pod the address belongs to, not the claim: agent-0
        # was only ever let through for gpt-4o-mini (the free agent's gpt-4o that claimed
        # to be agent-0 is agent-1's).
        tokens = [line for line in by_ip.metrics().splitlines()
                  if line.startswith("litellm_input_tokens_metric_total{")]
        mine = [t for t in tokens if 'metadata_pod="agent-0"' in t]
        assert mine and all('requested_model="gpt-4o-mini"' in t for t in mine), tokens
        assert any('metadata_pod="agent-1"' in t for t in tokens), tokens
        print(f"identity checks took {elapsed:.1f} s after the proxies were up")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- litellm pod-ip:\n{by_ip.tail()}\n--- checked:\n"
                             f"{checked.tail()}\n--- operator:\n{operator.tail(30)}") from None
    finally:
        by_ip.stop()
        checked.stop()
        upstream.stop()
