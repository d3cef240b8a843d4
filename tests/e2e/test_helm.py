"""The Helm chart on the real control plane, and the operator running with the chart's RBAC.

Covers (issue 6):
- README "Install with Helm": every command of the section runs, verbatim, with our helm and
  kubectl (the CRD adoption, the install, the upgrade, the uninstall and its clean-up); every
  object of the release is accepted by the API server and the RBAC in the cluster is what the
  chart renders (tests/unit/test_chart.py pins that to the reviewed table);
- least privilege proven sufficient: a token minted for the chart's ServiceAccount
  (TokenRequest) drives the real operator, out of cluster, with the flags of the chart's
  Deployment and its webhooks on a loopback URL. A budget climbs to Block (the Deployment is
  scaled to 0, an Event recorded), an invalid budget is refused by the webhook, the raised
  limit restores the replicas and a deleted budget releases its finalizer. The operator log
  has no 403, no Forbidden and no kopf permission warning;
- the chart's PrometheusRule, loaded into the real Prometheus that scrapes this operator,
  raises TokenBudgetBlocked and TokenBudgetNearLimit; every dashboard query runs and the
  spend, limit and state panels show the budget;
- ``helm uninstall`` leaves nothing of the release behind, cluster-scoped RBAC included:
  only the CRDs (kept) and the three objects the operator wrote itself, which the README's
  clean-up commands then delete;
- cert-manager mode: the chart's Issuer, Certificate and webhook configurations are stored
  (against stand-in cert-manager CRDs); with the test playing cert-manager (a certificate in
  the mounted directory, the injected CA), the operator serves the webhooks from
  ``--webhook-cert-dir`` and enforces with RBAC that has no Secret or webhook access; the
  uninstall removes the configurations;
- a namespace-scoped release without webhooks (Roles in one namespace, no CRDs, no webhook
  RBAC) governs its namespace and leaves an agent in another namespace alone, again with no
  403;
- every ``ci/*-values.yaml`` renders objects the API server accepts (server-side dry run), in
  a namespace that enforces the Pod Security "restricted" profile.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness import chart, kubeobjects, webhooks
from harness.controlplane import ControlPlane, free_ports
from harness.exporter import AgentExporter
from harness.operator_process import OperatorProcess
from harness.prometheus import Prometheus
from harness.tools import Tools
from harness.waiting import eventually
from token_budget.errors import EnforcementError, TargetNotFound
from token_budget.kube import DEPLOYMENTS, NAMESPACES, TOKENBUDGETS, Kube, Resource, api_client
from token_budget.webhooks.configuration import MUTATING, NAME, VALIDATING

RELEASE = "token-budget-operator"  # as in the README
RELEASE_NS = "token-budget"
A = "tokenbudget.io/"
CRDS = ("tokenbudgets.tokenbudget.io", "clustertokenbudgets.tokenbudget.io",
        "modelcatalogs.tokenbudget.io")
#: Flags of the chart's Deployment that the harness owns: ports on loopback, the test's
#: Prometheus, a short interval and lease, the identity, the namespace of the Lease.
HARNESS_FLAGS = ("--prometheus-url", "--metrics-port", "--health-port", "--id",
                 "--lease-namespace", "--interval-seconds", "--recent-seconds",
                 "--lease-seconds", "--webhook-port", "--webhook-host")
FORBIDDEN = re.compile(r"\b403\b|forbidden|not enough permissions", re.I)

SECRETS = Resource("Secret", "v1", "secrets")
SERVICEACCOUNTS = Resource("ServiceAccount", "v1", "serviceaccounts")
ROLES = Resource("Role", "rbac.authorization.k8s.io/v1", "roles")
LEASES = Resource("Lease", "coordination.k8s.io/v1", "leases")
CLUSTERROLES = Resource("ClusterRole", "rbac.authorization.k8s.io/v1", "clusterroles",
                        namespaced=False)
CLUSTERROLEBINDINGS = Resource("ClusterRoleBinding", "rbac.authorization.k8s.io/v1",
                               "clusterrolebindings", namespaced=False)
CRD_RES = Resource("CustomResourceDefinition", "apiextensions.k8s.io/v1",
                   "customresourcedefinitions", namespaced=False)
#: Namespaced kinds a release could leave behind.
NAMESPACED_KINDS = [
    Resource("Deployment", "apps/v1", "deployments"),
    Resource("ReplicaSet", "apps/v1", "replicasets"),
    Resource("Pod", "v1", "pods"),
    Resource("Service", "v1", "services"),
    SERVICEACCOUNTS,
    Resource("ConfigMap", "v1", "configmaps"),
    SECRETS,
    LEASES,
    ROLES,
    Resource("RoleBinding", "rbac.authorization.k8s.io/v1", "rolebindings"),
    Resource("PodDisruptionBudget", "policy/v1", "poddisruptionbudgets"),
]
#: What every namespace has anyway.
NAMESPACE_BASICS = {("ServiceAccount", "default"), ("ConfigMap", "kube-root-ca.crt")}


@pytest.fixture(scope="module")
def kube(controlplane: ControlPlane) -> Kube:
    """Raw JSON access as admin (system:masters)."""
    return Kube(api_client(str(controlplane.kubeconfig)))


# -- helpers ---------------------------------------------------------------------------------


def service_account_kubeconfig(controlplane: ControlPlane, kube: Kube, namespace: str,
                               name: str, path: Path) -> Path:
    """A kubeconfig that authenticates with a fresh token of ``namespace/name``.

    The token comes from the TokenRequest API, as the kubelet would mount it; the context's
    namespace is the ServiceAccount's, as in a pod (kopf posts Events about cluster-scoped
    objects there).
    """
    review = kube.request(
        "POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
        body={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
              "spec": {"expirationSeconds": 3600}})
    token = review["status"]["token"]
    config = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "test", "cluster": {
            "server": controlplane.server,
            "certificate-authority-data": base64.b64encode(controlplane.ca_pem).decode()}}],
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "test", "user": name,
                                                "namespace": namespace}}],
        "current-context": "sa",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


def deployment_args(kube: Kube, namespace: str, name: str) -> list[str]:
    """The operator flags of the chart's Deployment, as installed, minus the harness's own."""
    dep = kube.get(DEPLOYMENTS, namespace, name)
    [container] = dep["spec"]["template"]["spec"]["containers"]
    return [a for a in container["args"] if a.split("=", 1)[0] not in HARNESS_FLAGS]


def agent_deployment(name: str, replicas: int = 2) -> dict[str, Any]:
    labels = {"app": name, A + "agent": "true"}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "labels": {A + "agent": "true"}},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": labels}, "spec": {"containers": [
                     {"name": "agent", "image": "example/agent:1",
                      "env": [{"name": "LLM_MODEL", "value": "gpt-4o"}]}]}}},
    }


def budget(name: str, tokens: int, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "tokenbudget.io/v1alpha1", "kind": "TokenBudget",
        "metadata": {"name": name},
        "spec": {"limits": [{"window": "1h", "tokens": tokens}],
                 "actions": [{"type": "Warn", "atPercent": 50},
                             {"type": "Block", "atPercent": 100}]},
    }
    body["spec"].update(spec)
    return body


def seed(exporter: AgentExporter, prometheus: Prometheus, ns: str, pod: str) -> None:
    """Create the agent's series at zero and wait for two samples of it."""
    exporter.add(namespace=ns, workload=pod, model="gpt-4o")
    prometheus.wait_for(f'llm_tokens_total{{namespace="{ns}"}}', timeout=30)
    time.sleep(2)


def spend(exporter: AgentExporter, prometheus: Prometheus, ns: str, pod: str,
          tokens: int) -> None:
    exporter.add(namespace=ns, workload=pod, model="gpt-4o", input=tokens)
    total = exporter.emitted("counters", namespace=ns)
    prometheus.wait_for(f'sum(llm_tokens_total{{namespace="{ns}"}})',
                        lambda r: bool(r) and float(r[0]["value"][1]) >= total, timeout=30)


def wait_state(kube: Kube, ns: str, name: str, want: str, timeout: float = 60) -> None:
    eventually(lambda: (kube.get(TOKENBUDGETS, ns, name).get("status") or {})
               .get("state") == want, timeout, what=f"TokenBudget {ns}/{name} {want}")


def replicas(kube: Kube, ns: str, name: str) -> int:
    return int(kube.get(DEPLOYMENTS, ns, name)["spec"]["replicas"])


def gone(kube: Kube, res: Resource, ns: str | None, name: str) -> bool:
    try:
        kube.get(res, ns, name)
    except TargetNotFound:
        return True
    return False


def assert_no_permission_errors(op: OperatorProcess) -> None:
    lines = [line for line in op.log.read_text(errors="replace").splitlines()
             if FORBIDDEN.search(line)]
    assert lines == [], "the chart's RBAC is missing something:\n" + "\n".join(lines[:20])


def leftovers(kube: Kube, namespace: str) -> set[tuple[str, str]]:
    """(kind, name) of every object of the usual kinds in ``namespace``."""
    out = set()
    for res in NAMESPACED_KINDS:
        for obj in kube.list(res, namespace):
            if not obj["metadata"].get("deletionTimestamp"):
                out.add((res.kind, obj["metadata"]["name"]))
    return out - NAMESPACE_BASICS


def of_release(kube: Kube, release: str) -> set[tuple[str, str]]:
    """Cluster-scoped RBAC objects labelled with the release."""
    selector = f"app.kubernetes.io/instance={release}"
    return {(r.kind, o["metadata"]["name"]) for r in (CLUSTERROLES, CLUSTERROLEBINDINGS)
            for o in kube.list(r, None, selector)}


def readme_blocks() -> dict[str, list[str]]:
    """The README section's shell blocks by what they do; every block must be known."""
    blocks = chart.shell_blocks(chart.readme_section("Install with Helm"))
    named: dict[str, list[str]] = {}
    for commands in blocks:
        text = "\n".join(commands)
        role = ("adopt" if "kubectl label crd" in text else
                "install" if "helm install" in text else
                "upgrade" if "helm upgrade" in text else
                "uninstall" if "helm uninstall" in text else None)
        assert role is not None and role not in named, \
            f"a README block this test does not know how to run:\n{text}"
        named[role] = commands
    assert set(named) == {"adopt", "install", "upgrade", "uninstall"}
    return named


@pytest.fixture
def monitored(prometheus: Prometheus, tools: Tools, tmp_path: Path
              ) -> Iterator[Any]:
    """Load the chart's alert rules into Prometheus and scrape an operator; undone after."""
    docs = chart.render(tools.helm, sets=["monitoring.prometheusRule.enabled=true"],
                        api_versions=[chart.MONITORING_API])
    [rule] = chart.find(docs, "PrometheusRule")
    rules = tmp_path / "token-budget-rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    job = f"tbo-{uuid.uuid4().hex[:6]}"
    prometheus.add_rule_file(rules)

    def scrape(op: OperatorProcess) -> str:
        prometheus.add_scrape_target(job, f"127.0.0.1:{op.metrics_port}", honor_labels=False)
        return job

    try:
        yield scrape
    finally:
        prometheus.targets = [t for t in prometheus.targets if t.job != job]
        prometheus.rule_files = [p for p in prometheus.rule_files if p != rules.resolve()]
        prometheus.reload()


def dashboard_queries(tools: Tools) -> dict[str, list[str]]:
    [cm] = chart.find(chart.render(tools.helm, sets=["monitoring.dashboard.enabled=true"]),
                      "ConfigMap")
    dashboard = json.loads(cm["data"]["token-budgets.json"])
    return {p["title"]: [t["expr"] for t in p["targets"]] for p in dashboard["panels"]}


# -- the README install, the operator with the chart's RBAC, the uninstall ---------------------


def test_the_readme_install_governs_agents_with_least_privilege_and_uninstalls_cleanly(
        controlplane: ControlPlane, kube_api: Any, kube: Kube, tools: Tools,
        prometheus: Prometheus, exporter: AgentExporter, namespace: str, monitored: Any,
        tmp_path: Path) -> None:
    blocks = readme_blocks()
    env = chart.command_env(tools.helm.parent, controlplane.kubeconfig)
    # As if the CRDs had been applied with kubectl before: the README's adoption path.
    kubeobjects.install_crds(kube_api)
    op: OperatorProcess | None = None
    uninstalled = False
    try:
        for block in ("adopt", "install", "upgrade"):
            for _ in chart.run_commands(blocks[block], env):
                pass

        # Every object of the release is in the cluster, as rendered.
        manifest = chart.run([tools.helm, "get", "manifest", RELEASE, "--namespace",
                              RELEASE_NS], env=env).stdout
        released = chart.documents(manifest)
        assert {d["kind"] for d in released} >= {
            "CustomResourceDefinition", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
            "Role", "RoleBinding", "Service", "Deployment"}
        listed = chart.run([tools.kubectl, "get", "--filename", "-", "--output", "json"],
                           env=env, input_text=manifest).stdout
        in_cluster = json.loads(listed)["items"]
        assert sorted((o["kind"], o["metadata"]["name"]) for o in in_cluster) == \
            sorted((d["kind"], d["metadata"]["name"]) for d in released)
        assert chart.rules_of(in_cluster) == chart.rules_of(released)
        for crd in CRDS:
            meta = kube.get(CRD_RES, None, crd)["metadata"]
            assert meta["annotations"]["meta.helm.sh/release-name"] == RELEASE, "adopted"
            assert meta["annotations"]["helm.sh/resource-policy"] == "keep"

        # The operator, out of cluster, as the chart's ServiceAccount with the chart's flags.
        kubeconfig = service_account_kubeconfig(controlplane, kube, RELEASE_NS, RELEASE,
                                                tmp_path / "sa.kubeconfig")
        [port] = free_ports(1)
        op = OperatorProcess(kubeconfig, prometheus.url, tmp_path, identity="helm-sa",
                             lease_namespace=RELEASE_NS, extra_args=[
                                 *deployment_args(kube, RELEASE_NS, RELEASE), "--verbose",
                                 "--webhook-port", str(port),
                                 "--webhook-url", f"https://127.0.0.1:{port}"])
        ns = namespace
        seed(exporter, prometheus, ns, "agent-0")
        kube.create(DEPLOYMENTS, ns, agent_deployment("agent", replicas=2))
        op.start()
        job = monitored(op)
        webhooks.wait_in_effect(kube, ns)  # the API server calls this operator's webhooks
        assert kube.get(SECRETS, RELEASE_NS, f"{RELEASE}-webhook-tls")["type"] == \
            "kubernetes.io/tls"

        team = budget("team", 1_000_000)
        # A second, per-model limit (far away): the dashboard's spend-by-model panels.
        team["spec"]["limits"].append({"window": "1h", "tokens": 50_000_000, "model": "gpt-4o"})
        kube.create(TOKENBUDGETS, ns, team)
        wait_state(kube, ns, "team", "Ok")
        try:
            kube.create(TOKENBUDGETS, ns, budget("bad", 1_000, actions=[
                {"type": "Reroute", "atPercent": 50, "model": "gpt-9-ultra"}]))
            raise AssertionError("the webhook should refuse a reroute to an unknown model")
        except EnforcementError as exc:
            assert "must name a model in a ModelCatalog" in str(exc)

        spend(exporter, prometheus, ns, "agent-0", 1_200_000)
        wait_state(kube, ns, "team", "Blocked")
        eventually(lambda: replicas(kube, ns, "agent") == 0, 60, what="agent scaled to 0")
        dep = kube.get(DEPLOYMENTS, ns, "agent")
        assert dep["metadata"]["annotations"][A + "previous-replicas"] == "2"
        events = kube.request("GET", f"/api/v1/namespaces/{ns}/events")["items"]
        assert any(e.get("reason") == "Blocked" for e in events)

        # The chart's alerts fire on this operator's metrics; the dashboard's queries run.
        prometheus.wait_for_target_up(job, timeout=60)
        for alert in ("TokenBudgetBlocked", "TokenBudgetNearLimit"):
            prometheus.wait_for(
                f'ALERTS{{alertname="{alert}", budget_namespace="{ns}", budget="team"}}',
                timeout=60)
        for title, exprs in dashboard_queries(tools).items():
            for expr in exprs:
                q = expr.replace("$namespace", ns).replace("$budget", "team")
                result = prometheus.query(q)
                if title.startswith(("Spend vs limit (tokens)", "State over time",
                                     "Utilization", "Spend by model (tokens)")):
                    assert result, f"dashboard panel {title!r} shows nothing: {q}"
        by_model = prometheus.query(dashboard_queries(tools)["Spend by model (tokens)"][0]
                                    .replace("$namespace", ns).replace("$budget", "team"))
        assert [r["metric"].get("model") for r in by_model] == ["gpt-4o"]
        state = prometheus.query(dashboard_queries(tools)["State over time"][0]
                                 .replace("$namespace", ns).replace("$budget", "team"))
        assert float(state[0]["value"][1]) == 4, "Blocked is the fifth state"

        kube.patch(TOKENBUDGETS, ns, "team", {"spec": {"limits": [
            {"window": "1h", "tokens": 100_000_000},
            {"window": "1h", "tokens": 50_000_000, "model": "gpt-4o"}]}})
        wait_state(kube, ns, "team", "Ok")
        eventually(lambda: replicas(kube, ns, "agent") == 2, 60, what="replicas restored")
        kube.request("DELETE", TOKENBUDGETS.path(ns, "team"))
        eventually(lambda: gone(kube, TOKENBUDGETS, ns, "team"), 60,
                   what="the finalizer released")
        assert op.stop() is not None, "the operator did not stop on SIGTERM"
        assert_no_permission_errors(op)

        # Uninstall: the release leaves nothing behind but the CRDs and what the operator
        # wrote itself; the README's clean-up commands remove those.
        helm_uninstall, *cleanup = blocks["uninstall"]
        assert helm_uninstall.startswith("helm uninstall")
        list(chart.run_commands([helm_uninstall], env))
        uninstalled = True
        assert of_release(kube, RELEASE) == set()
        assert gone(kube, CLUSTERROLES, None, RELEASE)
        assert gone(kube, CLUSTERROLES, None, f"{RELEASE}-view")
        assert gone(kube, CLUSTERROLEBINDINGS, None, RELEASE)
        operator_made = {("Secret", f"{RELEASE}-webhook-tls"), ("Lease", RELEASE)}
        eventually(lambda: leftovers(kube, RELEASE_NS) == operator_made, 60,
                   what=f"only the operator's own objects left in {RELEASE_NS}")
        for res in (VALIDATING, MUTATING):
            assert not gone(kube, res, None, NAME), "written by the operator, not by Helm"
        for crd in CRDS:
            assert not gone(kube, CRD_RES, None, crd), "crds.keep"

        list(chart.run_commands(cleanup, env))
        for res in (VALIDATING, MUTATING):
            assert gone(kube, res, None, NAME)
        eventually(lambda: gone(kube, NAMESPACES, None, RELEASE_NS), 120,
                   what=f"namespace {RELEASE_NS} deleted")
        for crd in CRDS:
            assert not gone(kube, CRD_RES, None, crd)
    finally:
        if op is not None:
            op.stop()
        if not uninstalled:
            chart.run([tools.helm, "uninstall", RELEASE, "--namespace", RELEASE_NS], env=env,
                      check=False)
        for res in (VALIDATING, MUTATING):  # cluster-global: never leave them to other tests
            try:
                kube.request("DELETE", res.path(None, NAME))
            except TargetNotFound:
                pass
        try:
            kube.request("DELETE", NAMESPACES.path(None, RELEASE_NS))
        except TargetNotFound:
            pass


# -- namespace-scoped ------------------------------------------------------------------------


def test_a_namespace_scoped_release_governs_only_its_namespaces_with_roles_there(
        controlplane: ControlPlane, kube_api: Any, kube: Kube, tools: Tools,
        prometheus: Prometheus, exporter: AgentExporter, namespace: str,
        tmp_path: Path) -> None:
    kubeobjects.install_crds(kube_api)
    release, release_ns = "tbo-scoped", f"tbo-scoped-{uuid.uuid4().hex[:6]}"
    other = f"{namespace}-other"
    fullname = f"{release}-token-budget-operator"
    env = chart.command_env(tools.helm.parent, controlplane.kubeconfig)
    for ns in (release_ns, other):
        kube.create(NAMESPACES, None, {"apiVersion": "v1", "kind": "Namespace",
                                       "metadata": {"name": ns}})
    op: OperatorProcess | None = None
    try:
        chart.run([tools.helm, "install", release, chart.CHART, "--namespace", release_ns,
                   "--set", "crds.enabled=false", "--set", "webhooks.enabled=false",
                   "--set", f"watchNamespaces={{{namespace}}}"], env=env)
        assert f"{fullname}-watched" in {o["metadata"]["name"]
                                         for o in kube.list(ROLES, namespace)}
        assert not kube.list(ROLES, other), "no Role outside the watched namespaces"

        eventually(lambda: not gone(kube, SERVICEACCOUNTS, other, "default"), 60,
                   what=f"default ServiceAccount in {other}")
        for ns in (namespace, other):
            seed(exporter, prometheus, ns, "agent-0")
            kube.create(DEPLOYMENTS, ns, agent_deployment("agent", replicas=2))
            kube.create(TOKENBUDGETS, ns, budget("team", 1_000_000))
        kubeconfig = service_account_kubeconfig(controlplane, kube, release_ns, fullname,
                                                tmp_path / "sa.kubeconfig")
        args = deployment_args(kube, release_ns, fullname)
        assert f"--namespace={namespace}" in args and not any("webhook" in a for a in args)
        op = OperatorProcess(kubeconfig, prometheus.url, tmp_path, identity="helm-scoped",
                             lease_namespace=release_ns, extra_args=[*args, "--verbose"])
        op.start()
        wait_state(kube, namespace, "team", "Ok")
        for ns in (namespace, other):
            spend(exporter, prometheus, ns, "agent-0", 1_200_000)
        wait_state(kube, namespace, "team", "Blocked")
        eventually(lambda: replicas(kube, namespace, "agent") == 0, 60,
                   what="the watched agent scaled to 0")
        time.sleep(5)  # a few more evaluations, in which the other namespace stays untouched
        untouched = kube.get(DEPLOYMENTS, other, "agent")
        assert untouched["spec"]["replicas"] == 2
        assert not any(k.startswith(A) for k in untouched["metadata"].get("annotations") or {})
        assert "status" not in kube.get(TOKENBUDGETS, other, "team")
        kube.request("DELETE", TOKENBUDGETS.path(namespace, "team"))
        eventually(lambda: replicas(kube, namespace, "agent") == 2, 60,
                   what="replicas restored when the budget goes")
        eventually(lambda: gone(kube, TOKENBUDGETS, namespace, "team"), 60,
                   what="the finalizer released")
        op.stop()
        assert_no_permission_errors(op)
        chart.run([tools.helm, "uninstall", release, "--namespace", release_ns], env=env)
        assert of_release(kube, release) == set()
        eventually(lambda: leftovers(kube, release_ns) == {("Lease", fullname)}, 60,
                   what="only the operator's Lease left")
        assert not kube.list(ROLES, namespace)
    finally:
        if op is not None:
            op.stop()
        chart.run([tools.helm, "uninstall", release, "--namespace", release_ns], env=env,
                  check=False)
        for ns in (release_ns, other):
            try:
                kube.request("DELETE", TOKENBUDGETS.path(ns, "team"))
            except TargetNotFound:
                pass
            try:
                kube.request("DELETE", NAMESPACES.path(None, ns))
            except TargetNotFound:
                pass


# -- cert-manager mode ----------------------------------------------------------------------


def fake_cert_manager_crd(kind: str, plural: str) -> dict[str, Any]:
    """Just enough of cert-manager's API for the chart's Issuer and Certificate to be stored
    (cert-manager itself does not run here: the test plays its part)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.cert-manager.io"},
        "spec": {"group": "cert-manager.io", "scope": "Namespaced",
                 "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural,
                           "singular": kind.lower()},
                 "versions": [{"name": "v1", "served": True, "storage": True, "schema": {
                     "openAPIV3Schema": {"type": "object",
                                         "x-kubernetes-preserve-unknown-fields": True}}}]},
    }


def test_cert_manager_mode_needs_no_secret_or_webhook_rbac_and_uninstalls_its_webhooks(
        controlplane: ControlPlane, kube_api: Any, kube: Kube, tools: Tools,
        prometheus: Prometheus, exporter: AgentExporter, namespace: str,
        tmp_path: Path) -> None:
    kubeobjects.install_crds(kube_api)
    fakes = [fake_cert_manager_crd("Issuer", "issuers"),
             fake_cert_manager_crd("Certificate", "certificates")]
    for crd in fakes:
        kubeobjects.apply_crd(kube_api, crd)
    release, release_ns = "tbo-cm", f"tbo-cm-{uuid.uuid4().hex[:6]}"
    fullname = f"{release}-token-budget-operator"
    env = chart.command_env(tools.helm.parent, controlplane.kubeconfig)
    kube.create(NAMESPACES, None, {"apiVersion": "v1", "kind": "Namespace",
                                   "metadata": {"name": release_ns}})
    op: OperatorProcess | None = None
    try:
        chart.run([tools.helm, "install", release, chart.CHART, "--namespace", release_ns,
                   "--set", "crds.enabled=false", "--set", "webhooks.certManager.enabled=true"],
                  env=env)
        cert = kube.request("GET", f"/apis/cert-manager.io/v1/namespaces/{release_ns}"
                                   f"/certificates/{fullname}-webhook")
        assert cert["spec"]["dnsNames"][0] == f"{fullname}.{release_ns}.svc"
        assert chart.rules_of(kube.list(ROLES, release_ns)) == {
            (release_ns, "coordination.k8s.io", "leases", verb, name)
            for verb, name in (("create", ""), ("get", fullname), ("update", fullname))}

        # Play cert-manager: a serving certificate in the mounted directory, and the CA
        # injector's caBundle (plus a URL, as there is no Service network here).
        [port] = free_ports(1)
        certs = tmp_path / "webhook-tls"
        pair = controlplane.issue_serving_cert(["127.0.0.1", "localhost"])
        pair.write(certs, "tls")
        ca = base64.b64encode(controlplane.ca_pem).decode()
        for res in (VALIDATING, MUTATING):
            obj = kube.get(res, None, NAME)
            assert obj["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == \
                f"{release_ns}/{fullname}-webhook"
            for hook in obj["webhooks"]:
                path = hook["clientConfig"]["service"]["path"]
                hook["clientConfig"] = {"url": f"https://127.0.0.1:{port}{path}",
                                        "caBundle": ca}
            kube.replace(res, None, NAME, obj)

        args = [a for a in deployment_args(kube, release_ns, fullname)
                if not a.startswith("--webhook-cert-dir=")]
        kubeconfig = service_account_kubeconfig(controlplane, kube, release_ns, fullname,
                                                tmp_path / "sa.kubeconfig")
        op = OperatorProcess(kubeconfig, prometheus.url, tmp_path, identity="helm-cm",
                             lease_namespace=release_ns, extra_args=[
                                 *args, "--verbose", "--webhook-port", str(port),
                                 "--webhook-cert-dir", str(certs)])
        ns = namespace
        seed(exporter, prometheus, ns, "agent-0")
        kube.create(DEPLOYMENTS, ns, agent_deployment("agent", replicas=2))
        op.start()

        def refused() -> str:
            try:
                kube.create(TOKENBUDGETS, ns, budget("bad", 1_000, actions=[
                    {"type": "Reroute", "atPercent": 50, "model": "gpt-9-ultra"}]))
            except EnforcementError as exc:  # "failed calling webhook" until it listens
                return str(exc) if "must name a model" in str(exc) else ""
            kube.request("DELETE", TOKENBUDGETS.path(ns, "bad"))
            return "accepted: the webhook let a reroute to an unknown model through"

        assert "must name a model in a ModelCatalog" in eventually(
            refused, 60, what="the webhook serving cert-manager's certificate")
        kube.create(TOKENBUDGETS, ns, budget("team", 1_000_000))
        wait_state(kube, ns, "team", "Ok")
        spend(exporter, prometheus, ns, "agent-0", 1_200_000)
        wait_state(kube, ns, "team", "Blocked")
        eventually(lambda: replicas(kube, ns, "agent") == 0, 60, what="agent scaled to 0")
        kube.request("DELETE", TOKENBUDGETS.path(ns, "team"))
        eventually(lambda: replicas(kube, ns, "agent") == 2, 60, what="replicas restored")
        eventually(lambda: gone(kube, TOKENBUDGETS, ns, "team"), 60,
                   what="the finalizer released")
        op.stop()
        assert_no_permission_errors(op)
        assert gone(kube, SECRETS, release_ns, f"{fullname}-webhook-tls"), \
            "the operator issued no certificate of its own"

        chart.run([tools.helm, "uninstall", release, "--namespace", release_ns], env=env)
        for res in (VALIDATING, MUTATING):
            assert gone(kube, res, None, NAME), "the chart's configurations go with it"
        assert of_release(kube, release) == set()
        eventually(lambda: leftovers(kube, release_ns) == {("Lease", fullname)}, 60,
                   what="only the operator's Lease left")
    finally:
        if op is not None:
            op.stop()
        chart.run([tools.helm, "uninstall", release, "--namespace", release_ns], env=env,
                  check=False)
        for res in (VALIDATING, MUTATING):
            try:
                kube.request("DELETE", res.path(None, NAME))
            except TargetNotFound:
                pass
        try:
            kube.request("DELETE", NAMESPACES.path(None, release_ns))
        except TargetNotFound:
            pass
        for crd in fakes:
            kubeobjects.delete_crd(kube_api, crd["metadata"]["name"])


# -- every values file, server-side ----------------------------------------------------------


#: Kinds from APIs the control plane does not serve (cert-manager, Prometheus Operator).
FOREIGN_GROUPS = ("cert-manager.io/", "monitoring.coreos.com/")


@pytest.mark.parametrize("values", chart.CI_VALUES, ids=lambda p: p.name)
def test_every_ci_values_file_renders_objects_the_api_server_accepts(
        controlplane: ControlPlane, kube: Kube, tools: Tools, values: Path,
        namespace: str) -> None:
    docs = chart.render(tools.helm, [values], namespace=namespace, release=f"dry-{values.stem}")
    kube.patch(NAMESPACES, None, namespace, {"metadata": {"labels": {
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/warn": "restricted"}}})
    doc_values = yaml.safe_load(values.read_text()) or {}
    created = []
    for ns in doc_values.get("watchNamespaces") or []:
        try:
            kube.create(NAMESPACES, None, {"apiVersion": "v1", "kind": "Namespace",
                                           "metadata": {"name": ns}})
            created.append(ns)
        except EnforcementError:
            pass  # exists
    try:
        ours = [copy.deepcopy(d) for d in docs if not d["apiVersion"].startswith(FOREIGN_GROUPS)]
        manifest = "\n---\n".join(yaml.safe_dump(d) for d in ours)
        env = chart.command_env(tools.helm.parent, controlplane.kubeconfig)
        done = chart.run([tools.kubectl, "apply", "--dry-run=server", "--filename", "-",
                          "--output", "name"], env=env, input_text=manifest)
        assert len(done.stdout.split()) == len(ours), done.stdout
        assert "PodSecurity" not in done.stderr, done.stderr
        # The operator's pod itself, in a namespace that enforces the restricted profile.
        [dep] = chart.find(ours, "Deployment")
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "operator-pod", "namespace": namespace},
               "spec": {**dep["spec"]["template"]["spec"],
                        "serviceAccountName": "default"}}  # the release's is not created
        chart.run([tools.kubectl, "create", "--dry-run=server", "--filename", "-"], env=env,
                  input_text=json.dumps(pod))
    finally:
        for ns in created:
            kube.request("DELETE", NAMESPACES.path(None, ns))
