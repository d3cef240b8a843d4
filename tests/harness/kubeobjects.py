"""Installing CRDs and applying manifests on the test control plane.

Small helpers over the official ``kubernetes`` client that the smoke tests and the
operator's e2e tests share: load YAML documents, create-or-replace a
CustomResourceDefinition and wait until it is Established and served, and create custom
objects without knowing their plural by hand.

It does not implement ``kubectl apply`` (no three-way merge); for that use the ``tools``
fixture's ``kubectl``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import yaml
from kubernetes import client

from harness.controlplane import REPO_ROOT
from harness.waiting import eventually

CRD_DIR = REPO_ROOT / "crds"
EXAMPLES_DIR = REPO_ROOT / "examples"


def load_documents(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Every non-empty YAML document in ``paths``, in order."""
    docs: list[dict[str, Any]] = []
    for path in paths:
        with path.open() as fh:
            docs.extend(d for d in yaml.safe_load_all(fh) if d)
    return docs


def crd_documents(directory: Path = CRD_DIR) -> list[dict[str, Any]]:
    """The CustomResourceDefinitions in ``directory/*.yaml``."""
    docs = load_documents(sorted(directory.glob("*.yaml")))
    return [d for d in docs if d.get("kind") == "CustomResourceDefinition"]


def apply_crd(api: client.ApiClient, crd: dict[str, Any], timeout: float = 60.0) -> None:
    """Create or replace a CRD, then wait until it is Established and its API is served.

    Raises:
        kubernetes.client.ApiException: the API server rejected the CRD.
        AssertionError: it did not become Established within ``timeout``.
    """
    ext = client.ApiextensionsV1Api(api)
    name = crd["metadata"]["name"]
    try:
        # The client serialises plain dicts as they are; its stubs only know the models.
        ext.create_custom_resource_definition(cast(Any, crd))
    except client.ApiException as exc:
        if exc.status != 409:
            raise
        current = ext.read_custom_resource_definition(name)
        assert current.metadata is not None
        body = {**crd, "metadata": {**crd["metadata"],
                                    "resourceVersion": current.metadata.resource_version}}
        ext.replace_custom_resource_definition(name, cast(Any, body))

    def established() -> bool:
        status = ext.read_custom_resource_definition(name).status
        conditions = (status.conditions if status else None) or []
        return any(c.type == "Established" and c.status == "True" for c in conditions)

    eventually(established, timeout, what=f"CRD {name} to be Established")
    group = crd["spec"]["group"]
    plural = crd["spec"]["names"]["plural"]
    custom = client.CustomObjectsApi(api)
    for version in crd["spec"]["versions"]:
        if not version.get("served", True):
            continue

        def served(v: str = version["name"]) -> bool:
            try:
                custom.list_cluster_custom_object(group, v, plural, limit=1)
            except client.ApiException as exc:
                if exc.status == 404:
                    return False
                raise
            return True

        eventually(served, timeout, what=f"{plural}.{group}/{version['name']} to be served")


def delete_crd(api: client.ApiClient, name: str, timeout: float = 60.0) -> None:
    """Delete a CRD and wait until it is gone (its objects go with it)."""
    ext = client.ApiextensionsV1Api(api)
    try:
        ext.delete_custom_resource_definition(name)
    except client.ApiException as exc:
        if exc.status == 404:
            return
        raise

    def gone() -> bool:
        try:
            ext.read_custom_resource_definition(name)
        except client.ApiException as exc:
            if exc.status == 404:
                return True
            raise
        return False

    eventually(gone, timeout, what=f"CRD {name} to be deleted")


def install_crds(api: client.ApiClient, directory: Path = CRD_DIR) -> list[dict[str, Any]]:
    """Apply every CRD in ``directory`` and wait for each; returns the CRD documents."""
    crds = crd_documents(directory)
    for crd in crds:
        apply_crd(api, crd)
    return crds


class CustomResources:
    """Create/read/delete custom objects given only ``apiVersion`` and ``kind``.

    The plural and the scope come from the CRD documents passed in.
    """

    def __init__(self, api: client.ApiClient, crds: Iterable[dict[str, Any]]):
        self.custom = client.CustomObjectsApi(api)
        self._kinds: dict[tuple[str, str], tuple[str, bool]] = {}
        for crd in crds:
            spec = crd["spec"]
            for version in spec["versions"]:
                key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
                self._kinds[key] = (spec["names"]["plural"], spec["scope"] == "Namespaced")

    def knows(self, obj: dict[str, Any]) -> bool:
        """Whether ``obj``'s apiVersion/kind is one of the CRDs."""
        return (obj.get("apiVersion"), obj.get("kind")) in self._kinds

    def _where(self, obj: dict[str, Any]) -> tuple[str, str, str, bool]:
        group, version = obj["apiVersion"].split("/", 1)
        plural, namespaced = self._kinds[(obj["apiVersion"], obj["kind"])]
        return group, version, plural, namespaced

    def namespaced(self, obj: dict[str, Any]) -> bool:
        """Whether ``obj``'s kind lives in a namespace."""
        return self._where(obj)[3]

    def create(self, obj: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
        """Create ``obj`` (in ``namespace`` if its kind is namespaced); return the stored object.

        Raises:
            kubernetes.client.ApiException: e.g. 422 when the schema rejects it.
        """
        group, version, plural, namespaced = self._where(obj)
        if namespaced:
            ns = namespace or obj.get("metadata", {}).get("namespace") or "default"
            body = {**obj, "metadata": {**obj.get("metadata", {}), "namespace": ns}}
            result = cast(dict[str, Any], self.custom.create_namespaced_custom_object(
                group, version, ns, plural, body))
            return result
        created = cast(dict[str, Any], self.custom.create_cluster_custom_object(
            group, version, plural, obj))
        return created

    def create_or_replace(self, obj: dict[str, Any], namespace: str | None = None
                          ) -> dict[str, Any]:
        """Like :meth:`create`, replacing an existing object of the same name."""
        try:
            return self.create(obj, namespace)
        except client.ApiException as exc:
            if exc.status != 409:
                raise
        current = self.get(obj, namespace)
        group, version, plural, namespaced = self._where(obj)
        meta = {**obj.get("metadata", {}),
                "resourceVersion": current["metadata"]["resourceVersion"]}
        name = meta["name"]
        if namespaced:
            ns = namespace or meta.get("namespace") or "default"
            meta["namespace"] = ns
            replaced = cast(dict[str, Any], self.custom.replace_namespaced_custom_object(
                group, version, ns, plural, name, {**obj, "metadata": meta}))
            return replaced
        result = cast(dict[str, Any], self.custom.replace_cluster_custom_object(
            group, version, plural, name, {**obj, "metadata": meta}))
        return result

    def get(self, obj: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
        """Read the stored object with ``obj``'s kind and name."""
        group, version, plural, namespaced = self._where(obj)
        name = obj["metadata"]["name"]
        if namespaced:
            ns = namespace or obj["metadata"].get("namespace") or "default"
            got = cast(dict[str, Any], self.custom.get_namespaced_custom_object(
                group, version, ns, plural, name))
            return got
        result = cast(dict[str, Any], self.custom.get_cluster_custom_object(
            group, version, plural, name))
        return result

    def delete(self, obj: dict[str, Any], namespace: str | None = None) -> None:
        """Delete the object with ``obj``'s kind and name (ignores 404)."""
        group, version, plural, namespaced = self._where(obj)
        name = obj["metadata"]["name"]
        try:
            if namespaced:
                ns = namespace or obj["metadata"].get("namespace") or "default"
                self.custom.delete_namespaced_custom_object(group, version, ns, plural, name)
            else:
                self.custom.delete_cluster_custom_object(group, version, plural, name)
        except client.ApiException as exc:
            if exc.status != 404:
                raise


def wait_deleted(read: Any, *args: Any, timeout: float = 60.0) -> None:
    """Poll ``read(*args)`` until it raises a 404 ApiException."""

    def gone() -> bool:
        try:
            read(*args)
        except client.ApiException as exc:
            if exc.status == 404:
                return True
            raise
        return False

    eventually(gone, timeout, what=f"{getattr(read, '__name__', read)}{args} to be deleted")


__all__ = [
    "CRD_DIR",
    "EXAMPLES_DIR",
    "CustomResources",
    "apply_crd",
    "crd_documents",
    "delete_crd",
    "install_crds",
    "load_documents",
    "wait_deleted",
]
