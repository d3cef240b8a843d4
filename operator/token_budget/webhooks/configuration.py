"""The Validating- and MutatingWebhookConfigurations, written by the operator itself.

Kopf can manage these, but not the way a cluster admin needs them here, so the
operator builds them (pure :func:`configurations`) and keeps them current
(:func:`apply`, with the CA bundle of its own certificate):

* pods and workloads fail open (``failurePolicy: Ignore``) with a 5 s timeout,
  so an operator outage never stops a cluster from starting pods;
* only objects labelled ``tokenbudget.io/agent`` reach the pod and workload
  webhooks (an ``objectSelector``), so the cluster's other pods cost nothing;
  an update that removes the label reaches ``keep-agent-label-*`` (a selector
  matches when the old or the new object does);
* objects *without* the label reach ``enrol-pods`` (pods, at creation) and
  ``enrol-*`` (workloads, at creation and update) in every namespace: whether a
  namespace is under mandatory enrolment can come from a ClusterTokenBudget's
  ``namespaceSelector``, which no static selector here can follow, so the
  webhook decides from its cache and answers "no change" elsewhere. That costs
  every unlabelled pod and workload write outside the excluded namespaces one
  call to the operator (failing open, like the others); ``enrol=False``
  (``--no-enrolment-by-signal``) leaves them out;
* system namespaces and the operator's own are excluded (``namespaceSelector``);
* our own kinds fail closed (``failurePolicy: Fail``): an invalid budget must
  not slip in while the operator restarts (configurable);
* a new agent pod costs one call, to ``mutate-pods``, which denies as well as
  stamps (there is no validating pod webhook). It is ``reinvocationPolicy:
  IfNeeded``: a validating webhook runs after every mutation and judged the
  final pod, a mutating one runs in turn with the others (by their
  configurations' names), and a mutator called after it may change what it
  judged (a platform injector that sets ``LLM_MODEL``, a sidecar). With
  ``IfNeeded`` the API server calls it once more when, and only when, a later
  mutation changed the pod, so it judges the model that will run; without one
  it costs nothing. Its answer is idempotent (a second call adds nothing the
  first one added, beyond a fresh ``updated-at``). A mutator that changes the
  pod again after the reinvocation is outside what one webhook can see;
* the ``caBundle`` follows the certificate Secret: every replica checks it
  (:func:`trusts`) each time it reads the Secret and rewrites it when it differs.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

from token_budget.api import v1alpha1 as api
from token_budget.errors import TargetNotFound
from token_budget.kube import Kube, Resource

VALIDATING = Resource("ValidatingWebhookConfiguration", "admissionregistration.k8s.io/v1",
                      "validatingwebhookconfigurations", namespaced=False)
MUTATING = Resource("MutatingWebhookConfiguration", "admissionregistration.k8s.io/v1",
                    "mutatingwebhookconfigurations", namespaced=False)
NAME = "token-budget-operator"
SYSTEM_NAMESPACES = ("kube-system", "kube-public", "kube-node-lease")


def _client(base: dict[str, Any], handler: str, ca_bundle: bytes) -> dict[str, Any]:
    cfg: dict[str, Any] = {"caBundle": base64.b64encode(ca_bundle).decode()}
    if "url" in base:
        cfg["url"] = base["url"].rstrip("/") + "/" + handler
    else:
        cfg["service"] = {**base["service"], "path": "/" + handler}
    return cfg


def _webhook(name: str, handler: str, rules: list[dict[str, Any]], client: dict[str, Any],
             ca: bytes, failure: str, timeout: int, namespace_selector: dict[str, Any],
             object_selector: dict[str, Any] | None) -> dict[str, Any]:
    hook = {
        "name": f"{name}.{api.GROUP}",
        "rules": rules,
        "clientConfig": _client(client, handler, ca),
        "failurePolicy": failure,
        "matchPolicy": "Equivalent",
        "sideEffects": "None",
        "timeoutSeconds": timeout,
        "admissionReviewVersions": ["v1"],
        "namespaceSelector": namespace_selector,
    }
    if object_selector is not None:
        hook["objectSelector"] = object_selector
    return hook


def configurations(client: dict[str, Any], ca_bundle: bytes, operator_namespace: str,
                   agent_label: str = f"{api.PREFIX}agent",
                   excluded: Sequence[str] = SYSTEM_NAMESPACES,
                   pods_failure: str = "Ignore", budgets_failure: str = "Fail",
                   pods_timeout: int = 5, enrol: bool = True
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(validating, mutating) configurations for ``client`` ({"url": ...} or {"service": ...})."""
    skip = sorted({*excluded, operator_namespace})
    ns_sel = {"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "NotIn",
                                    "values": skip}]}
    agents = {"matchExpressions": [{"key": agent_label, "operator": "Exists"}]}
    others = {"matchExpressions": [{"key": agent_label, "operator": "DoesNotExist"}]}

    def rule(group: str, version: str, plural: str, ops: list[str]) -> dict[str, Any]:
        return {"apiGroups": [group], "apiVersions": [version], "resources": [plural],
                "operations": ops, "scope": "*"}

    cud = ["CREATE", "UPDATE"]
    validating = {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": VALIDATING.kind,
        "metadata": {"name": NAME, "labels": {"app.kubernetes.io/name": NAME}},
        "webhooks": [
            _webhook("budgets", "validate-budgets",
                     [rule(api.GROUP, api.VERSION, "tokenbudgets", cud)],
                     client, ca_bundle, budgets_failure, 10, {}, None),
            _webhook("cluster-budgets", "validate-cluster-budgets",
                     [rule(api.GROUP, api.VERSION, "clustertokenbudgets", cud)],
                     client, ca_bundle, budgets_failure, 10, {}, None),
            _webhook("catalogs", "validate-catalogs",
                     [rule(api.GROUP, api.VERSION, "modelcatalogs", cud)],
                     client, ca_bundle, budgets_failure, 10, {}, None),
            *[
                _webhook(plural, f"validate-{plural}", [rule(group, "v1", plural, ["CREATE"])],
                         client, ca_bundle, pods_failure, pods_timeout, ns_sel, agents)
                for group, plural in (("apps", "deployments"), ("apps", "statefulsets"),
                                      ("batch", "jobs"), ("batch", "cronjobs"))
            ],
            # An update that removes the label still reaches these: an objectSelector
            # matches when the old or the new object matches it.
            *[
                _webhook(f"keep-agent-label-{plural}", f"keep-agent-label-{plural}",
                         [rule(group, "v1", plural, ["UPDATE"])],
                         client, ca_bundle, pods_failure, pods_timeout, ns_sel, agents)
                for plural, group in (("pods", ""), ("deployments", "apps"),
                                      ("statefulsets", "apps"), ("jobs", "batch"),
                                      ("cronjobs", "batch"))
            ],
        ],
    }
    mutating = {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": MUTATING.kind,
        "metadata": {"name": NAME, "labels": {"app.kubernetes.io/name": NAME}},
        "webhooks": [
            {**_webhook("pods", "mutate-pods", [rule("", "v1", "pods", ["CREATE"])],
                        client, ca_bundle, pods_failure, pods_timeout, ns_sel, agents),
             "reinvocationPolicy": "IfNeeded"},
            # After "pods": an object these label is not sent to it again (the API server
            # matches each webhook's selector against the object as mutated so far), and
            # the validating webhooks, called after every mutation, see the label.
            *([
                {**_webhook("enrol-pods", "mutate-pods", [rule("", "v1", "pods", ["CREATE"])],
                            client, ca_bundle, pods_failure, pods_timeout, ns_sel, others),
                 "reinvocationPolicy": "Never"},
                *[{**_webhook(f"enrol-{plural}", f"enrol-{plural}",
                              [rule(group, "v1", plural, cud)], client, ca_bundle,
                              pods_failure, pods_timeout, ns_sel, others),
                   "reinvocationPolicy": "Never"}
                  for group, plural in (("apps", "deployments"), ("apps", "statefulsets"),
                                        ("batch", "jobs"), ("batch", "cronjobs"))],
            ] if enrol else []),
        ],
    }
    return validating, mutating


def apply(kube: Kube, objects: Sequence[dict[str, Any]]) -> None:
    """Create or update each configuration so that it matches exactly."""
    for obj in objects:
        res = VALIDATING if obj["kind"] == VALIDATING.kind else MUTATING
        name = obj["metadata"]["name"]
        try:
            current = kube.get(res, None, name)
        except TargetNotFound:
            kube.create(res, None, obj)
            continue
        body = dict(obj)
        body["metadata"] = {**obj["metadata"],
                            "resourceVersion": current["metadata"]["resourceVersion"]}
        kube.replace(res, None, name, body)


def trusts(kube: Kube, ca_bundle: bytes) -> bool:
    """Whether both live configurations exist and every webhook carries ``ca_bundle``."""
    wanted = base64.b64encode(ca_bundle).decode()
    for res in (VALIDATING, MUTATING):
        try:
            live = kube.get(res, None, NAME)
        except TargetNotFound:
            return False
        if any((h.get("clientConfig") or {}).get("caBundle") != wanted
               for h in live.get("webhooks") or []):
            return False
    return True
