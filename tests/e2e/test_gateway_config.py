"""``tokenbudget gateway litellm`` on the real control plane with a real LiteLLM proxy.

One test, in the order an operator meets it:

1. ``--check`` before there is a ConfigMap says so (exit 1). ``--apply`` reads
   the cluster's ModelCatalog by name and creates the proxy's ConfigMap (field
   manager ``tokenbudget``); a second run changes nothing (same
   resourceVersion). The last ``--apply`` updates it by server-side apply.
2. A real LiteLLM proxy 1.108.0 starts from that ConfigMap's ``config.yaml`` and
   nothing else: the callback's settings come from the config's
   ``environment_variables``, not from the proxy's process environment.
3. A budget's Reroute (no model named: the catalog's cheapest equivalent) sends
   the agent's ``gpt-5`` through the proxy to the stub as ``gpt-5-nano``, a model
   the proxy routes only because the command listed every catalog model. The
   proxy's own metrics name the caller with the labels of the source the command
   prints for budgets (``metadata_namespace``, ``metadata_pod``).
4. Someone edits the ConfigMap: removes ``gpt-5-nano`` and adds a key of their
   own. A proxy started from the edited config answers the rerouted request with
   400, which is what ``--check`` then warns of: it exits 1 naming ``gpt-5-nano``
   and the Reroute that picks it. ``--apply`` puts the entry back, keeps the
   user's key, and ``--check`` passes again.
"""

from __future__ import annotations

import concurrent.futures
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness import webhooks
from harness.controlplane import ControlPlane
from harness.directive_agents import injected, pod_body
from harness.exporter import AgentExporter
from harness.litellm_proxy import MASTER_KEY, Proxy, Upstream
from harness.operator_process import OperatorProcess
from harness.prometheus import Prometheus
from harness.spend import seed, spend
from harness.waiting import eventually
from token_budget import cli
from token_budget.kube import PODS, TOKENBUDGETS, Kube, Resource
from token_budget.policy import sources
from token_budget.proxies import litellm

SERVICEACCOUNTS = Resource("ServiceAccount", "v1", "serviceaccounts")
CONFIGMAPS = Resource("ConfigMap", "v1", "configmaps")
CATALOG = "public-list-prices"  # examples/model-catalog.yaml, installed by the kube fixture


@pytest.fixture
def operator(kube: Kube, controlplane: ControlPlane, prometheus: Prometheus, namespace: str,
             tmp_path: Path) -> Iterator[OperatorProcess]:
    (tmp_path / "op").mkdir()
    with webhooks.serving_operator(kube, controlplane.kubeconfig, prometheus.url,
                                   tmp_path / "op", identity="gwconfig",
                                   extra_args=["--directive-readers",
                                               f"{namespace}:litellm"]) as op:
        yield op


def _tokenbudget(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main(["gateway", "litellm", *argv])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _config(kube: Kube, ns: str) -> tuple[str, dict[str, Any]]:
    cm = kube.get(CONFIGMAPS, ns, "litellm-config")
    return cm["metadata"]["resourceVersion"], yaml.safe_load(cm["data"]["config.yaml"])


def test_the_applied_config_routes_every_reroute_and_check_finds_drift(
        kube: Kube, controlplane: ControlPlane, namespace: str, exporter: AgentExporter,
        prometheus: Prometheus, operator: OperatorProcess, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    ns = namespace
    eventually(lambda: webhooks._has_service_account(kube, ns), 60,
               what="the namespace's default ServiceAccount")
    agent = pod_body("agent-0")
    agent["spec"]["containers"][0]["env"] = [{"name": "LLM_MODEL", "value": "gpt-5"}]
    url, ca = injected(kube.create(PODS, ns, agent))
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
    # Every catalog provider is served by the OpenAI-compatible stub here.
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"*": {"model": "openai/{name}", "api_key": "sk-stub"}}))
    apply = ["--catalog-name", CATALOG, "--kubeconfig", str(controlplane.kubeconfig),
             "-n", ns, "--params", str(tmp_path / "params.yaml"),
             "--upstream", f"*={upstream.url}", "--directive-url", url.split("/v1/")[0],
             "--ca-file", str(tmp_path / "ca.crt"),
             "--env", f"TOKENBUDGET_GATEWAY_TOKEN_FILE={tmp_path / 'token'}",
             "--env", "TOKENBUDGET_GATEWAY_FAIL_CLOSED=true"]
    check = ["--catalog-name", CATALOG, "--kubeconfig", str(controlplane.kubeconfig),
             "-n", ns, "--check"]
    me = {"namespace": ns, "pod": "agent-0"}
    proxies: list[Proxy] = []
    try:
        assert _tokenbudget(capsys, *check) == (
            1, f"tokenbudget gateway litellm: ConfigMap {ns}/litellm-config does not exist\n")
        code, said = _tokenbudget(capsys, "--apply", *apply)
        assert code == 0 and f"ConfigMap {ns}/litellm-config (config.yaml) created" in said, said
        assert "+- model_name: gpt-5-nano" in said, said
        version, config = _config(kube, ns)
        managers = [f["manager"] for f in
                    kube.get(CONFIGMAPS, ns, "litellm-config")["metadata"]["managedFields"]]
        assert managers == ["tokenbudget"], managers
        code, said = _tokenbudget(capsys, "--apply", *apply)
        assert (code, said.strip()) == (0, f"ConfigMap {ns}/litellm-config (config.yaml) "
                                           "unchanged")
        assert _config(kube, ns)[0] == version
        assert _tokenbudget(capsys, *check)[0] == 0

        # Later someone drops the equivalent from the proxy's config and adds a setting of
        # theirs. A proxy started from each (no TOKENBUDGET_* variable in their own
        # environment: the config carries them), side by side as they take long to start.
        edited = {**config, "router_settings": {"num_retries": 1},
                  "model_list": [e for e in config["model_list"]
                                 if e["model_name"] != "gpt-5-nano"]}
        proxies += [Proxy(tmp_path, upstream, [], {}, config_body=c) for c in (config, edited)]
        proxy, drifted = proxies
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            starting = [pool.submit(p.start) for p in proxies]
            seed(exporter, prometheus, ns, "agent-0", model="gpt-5")
            for f in starting:
                f.result()
        status, body = proxy.chat("gpt-5", me)
        assert status == 200 and upstream.models[-1] == "gpt-5", (status, body)
        kube.create(TOKENBUDGETS, ns, {
            "apiVersion": "tokenbudget.io/v1alpha1", "kind": "TokenBudget",
            "metadata": {"name": "team"},
            "spec": {"limits": [{"window": "1h", "tokens": 1_000_000}],
                     "actions": [{"type": "Reroute", "atPercent": 50}]}})
        spend(exporter, prometheus, ns, "agent-0", 600_000, model="gpt-5")

        def rerouted() -> bool:
            status, body = proxy.chat("gpt-5", me)
            assert status == 200, (status, body)
            return upstream.models[-1] == "gpt-5-nano"

        eventually(rerouted, 60, interval=0.5, what="the proxy to reroute gpt-5 to gpt-5-nano")
        # Its own metrics name the caller as the LiteLLM preset reads them with the source
        # the command prints.
        wanted = sources.resolve(litellm.SOURCE)
        request = urllib.request.Request(proxy.url + "/metrics/",
                                         headers={"Authorization": f"Bearer {MASTER_KEY}"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            exposition = answer.read().decode()
        assert any(line.startswith("litellm_input_tokens_metric_total{")
                   and f'{wanted.namespace_label}="{ns}"' in line
                   and f'{wanted.workload_label}="agent-0"' in line
                   for line in exposition.splitlines()), exposition[-3000:]
        status, body = drifted.chat("gpt-5", me)  # rerouted to a model it cannot route
        assert status == 400 and "gpt-5-nano" in str(body), (status, body)

        kube.patch(CONFIGMAPS, ns, "litellm-config",
                   {"data": {"config.yaml": yaml.safe_dump(edited)}})
        code, said = _tokenbudget(capsys, *check)
        assert code == 1, said
        assert "must route the catalog model 'gpt-5-nano' (a Reroute of gpt-5, gpt-5-mini " \
               "picks it)" in said, said
        assert said.strip().endswith("1 disagreement(s) between ConfigMap "
                                     f"{ns}/litellm-config (config.yaml) and the catalog"), said
        code, said = _tokenbudget(capsys, "--apply", *apply)
        assert code == 0 and "updated" in said and "+- model_name: gpt-5-nano" in said, said
        assert _config(kube, ns)[1]["router_settings"] == {"num_retries": 1}
        assert _tokenbudget(capsys, *check)[0] == 0
    except AssertionError as exc:
        logs = "\n".join(f"--- litellm {p.port}:\n{p.tail(20)}" for p in proxies)
        raise AssertionError(f"{exc}\n{logs}\n--- operator:\n{operator.tail(30)}") from None
    finally:
        for p in proxies:
            p.stop()
        upstream.stop()
