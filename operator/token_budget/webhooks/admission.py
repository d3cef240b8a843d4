"""Admission webhooks served by every replica (kopf's webhook server).

* ``validate-budgets`` / ``validate-catalogs``: the rules a schema cannot say
  (the same :mod:`token_budget.api.rules` as ``tokenbudget validate``); each
  rejection names the field and what would be valid.
* ``validate-pods`` / ``validate-workloads``: deny a governed pod (or a new
  Deployment, StatefulSet, Job, CronJob) in a scope whose budget is Blocked, or
  one that declares a model its budgets do not allow
  (:mod:`token_budget.policy.admission`).
* ``mutate-pods``: stamp the current directive on a new governed pod, from its
  owner's annotations when it has them, else from the budgets' state; with the
  opt-in label ``tokenbudget.io/inject=true`` also mount the downward API file
  the agent helper reads.

Answers come from an in-memory :class:`AdmissionCache` kept current by the
operator's watches, never from a request to the API server or Prometheus, so
they take milliseconds.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import kopf
import pydantic

from token_budget.api import rules
from token_budget.api import v1alpha1 as api
from token_budget.enforcement import patches
from token_budget.policy import admission
from token_budget.policy.catalog import Catalog
from token_budget.policy.inputs import BudgetKey
from token_budget.policy.workloads import DEFAULT_MODEL_ENV, declared_models, pod_template

log = logging.getLogger(__name__)
INJECT_LABEL = f"{api.PREFIX}inject"
VOLUME = "tokenbudget-directive"
MOUNT_PATH = "/etc/tokenbudget"


@dataclass
class AdmissionCache:
    """Budgets, catalogs, namespace labels and workload annotations, as last seen."""

    budgets: dict[BudgetKey, api.Budget] = field(default_factory=dict)
    catalogs: dict[str, api.ModelCatalog] = field(default_factory=dict)
    namespaces: dict[str, dict[str, str]] = field(default_factory=dict)
    owners: dict[tuple[str, str, str], dict[str, str]] = field(default_factory=dict)
    model_env: tuple[str, ...] = DEFAULT_MODEL_ENV
    lock: threading.Lock = field(default_factory=threading.Lock)
    _catalog: Catalog | None = None

    def catalog(self) -> Catalog:
        with self.lock:
            if self._catalog is None:
                self._catalog = Catalog(self.catalogs.values())
            return self._catalog

    def budget_event(self, body: dict[str, Any], deleted: bool) -> None:
        try:
            obj = api.parse(body)
        except (pydantic.ValidationError, ValueError):
            return  # an invalid object governs nothing (its status says why)
        with self.lock:
            if isinstance(obj, api.ModelCatalog):
                if deleted:
                    self.catalogs.pop(obj.metadata.name, None)
                else:
                    self.catalogs[obj.metadata.name] = obj
                self._catalog = None
                return
            key = BudgetKey.of(obj)
            if deleted or (body.get("metadata") or {}).get("deletionTimestamp"):
                self.budgets.pop(key, None)
            else:
                self.budgets[key] = obj

    def workload_event(self, obj: dict[str, Any], deleted: bool) -> None:
        meta = obj.get("metadata") or {}
        key = (str(obj.get("kind")), str(meta.get("namespace")), str(meta.get("name")))
        with self.lock:
            if deleted:
                self.owners.pop(key, None)
            else:
                ann = meta.get("annotations") or {}
                self.owners[key] = {k: v for k, v in ann.items() if k in patches.DIRECTIVE_KEYS}

    def snapshot(self) -> tuple[list[api.Budget], dict[str, dict[str, str]]]:
        with self.lock:
            return list(self.budgets.values()), dict(self.namespaces)

    def owner_directive(self, namespace: str, pod: dict[str, Any]) -> dict[str, str]:
        """The directive annotations of the pod's Deployment/StatefulSet/Job/CronJob."""
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        with self.lock:
            for ref in meta.get("ownerReferences") or []:
                kind, name = ref.get("kind"), str(ref.get("name"))
                if kind == "ReplicaSet" and labels.get("pod-template-hash"):
                    h = labels["pod-template-hash"]
                    if name.endswith("-" + h):
                        kind, name = "Deployment", name[: -len(h) - 1]
                found = self.owners.get((str(kind), namespace, name))
                if kind == "Job" and not found:
                    continue
                if found:
                    return dict(found)
        return {}


cache = AdmissionCache()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def register(registry: kopf.OperatorRegistry) -> None:
    """Register the admission handlers (called once, by the operator)."""

    @kopf.on.validate(api.GROUP, api.VERSION, "tokenbudgets", id="validate-budgets",
                      registry=registry, operations=["CREATE", "UPDATE"])
    @kopf.on.validate(api.GROUP, api.VERSION, "clustertokenbudgets",
                      id="validate-cluster-budgets", registry=registry,
                      operations=["CREATE", "UPDATE"])
    @kopf.on.validate(api.GROUP, api.VERSION, "modelcatalogs", id="validate-catalogs",
                      registry=registry, operations=["CREATE", "UPDATE"])
    def validate_ours(body: Any, **_: Any) -> None:
        raw = dict(body)
        found = rules.schema_problems(raw)
        if not found:
            obj = api.parse(raw)
            models = None
            if not isinstance(obj, api.ModelCatalog):
                cat = cache.catalog()
                models = list(cat.models.values()) or None
            found = rules.problems(obj, models)
        if found:
            raise kopf.AdmissionError("; ".join(str(p) for p in found), code=422)

    @kopf.on.validate("", "v1", "pods", id="validate-pods", registry=registry,
                      operations=["CREATE"])
    def validate_pod(body: Any, **_: Any) -> None:
        _review(dict(body), dict(body))

    for plural, group in (("deployments", "apps"), ("statefulsets", "apps"),
                          ("jobs", "batch"), ("cronjobs", "batch")):
        kopf.on.validate(group, "v1", plural, id=f"validate-{plural}", registry=registry,
                         operations=["CREATE"])(_validate_workload)

    @kopf.on.mutate("", "v1", "pods", id="mutate-pods", registry=registry,
                    operations=["CREATE"])
    def mutate_pod(body: Any, patch: kopf.Patch, **_: Any) -> None:
        pod = dict(body)
        meta = pod.get("metadata") or {}
        namespace = str(meta.get("namespace") or "")
        wanted = cache.owner_directive(namespace, pod)
        if not wanted:
            budgets, namespaces = cache.snapshot()
            d = admission.directive_for(budgets, cache.catalog(), namespace,
                                        namespaces.get(namespace, {}), meta.get("labels") or {},
                                        declared_models(pod, cache.model_env), _now())
            wanted = patches.directive_annotations(d) if d is not None else {}
        if wanted:
            wanted[patches.UPDATED_AT] = _now().strftime("%Y-%m-%dT%H:%M:%SZ")
            for k, v in wanted.items():
                patch.metadata.setdefault("annotations", {})[k] = v
            # The label the evaluation puts on everything it directs: stamped here, the
            # next evaluation finds the pod as it wants it and writes nothing (it used to
            # PATCH every new governed pod just for this label).
            patch.metadata.setdefault("labels", {})[patches.ENFORCED_LABEL] = "true"
        if (meta.get("labels") or {}).get(INJECT_LABEL) == "true":
            _inject_volume(pod, patch)


def _validate_workload(body: Any, **_: Any) -> None:
    obj = dict(body)
    _review(obj, dict(pod_template(obj)), of=f"{obj.get('kind')} pod template")


def _review(obj: dict[str, Any], pod: dict[str, Any], of: str = "pod") -> None:
    meta = obj.get("metadata") or {}
    namespace = str(meta.get("namespace") or "")
    labels = (pod.get("metadata") or {}).get("labels") or {}
    budgets, namespaces = cache.snapshot()
    verdict = admission.review(budgets, cache.catalog(), namespace,
                               namespaces.get(namespace, {}), labels,
                               declared_models(pod, cache.model_env), _now())
    if not verdict.allowed:
        raise kopf.AdmissionError(f"{of} denied: {verdict.message}", code=403)


def _inject_volume(pod: dict[str, Any], patch: kopf.Patch) -> None:
    spec = pod.get("spec") or {}
    volumes = list(spec.get("volumes") or [])
    if any(v.get("name") == VOLUME for v in volumes):
        return
    volumes.append({"name": VOLUME, "downwardAPI": {"items": [
        {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}]}})
    containers = []
    for c in spec.get("containers") or []:
        c = dict(c)
        mounts = list(c.get("volumeMounts") or [])
        mounts.append({"name": VOLUME, "mountPath": MOUNT_PATH, "readOnly": True})
        c["volumeMounts"] = mounts
        containers.append(c)
    patch.spec["volumes"] = volumes
    patch.spec["containers"] = containers
