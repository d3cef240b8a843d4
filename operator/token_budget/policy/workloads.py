"""Workloads as the engine sees them, read from plain Kubernetes object dicts.

A Deployment, StatefulSet, Job or CronJob is governed through the labels of
its pod template (budgets select pods); a bare Pod through its own labels.
The models a workload declares come from the ``tokenbudget.io/model``
annotation and from well-known environment variables of its containers.
Pure: dicts in, value objects out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from token_budget.api.v1alpha1 import PREFIX
from token_budget.policy.inputs import Workload, WorkloadKey

KINDS = ("Deployment", "StatefulSet", "Job", "CronJob", "Pod")
MODEL_ANNOTATION = f"{PREFIX}model"
DEFAULT_MODEL_ENV = ("LLM_MODEL", "OPENAI_MODEL", "ANTHROPIC_MODEL", "MODEL_NAME")


def pod_template(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    """The pod (template) of a workload object: metadata + spec."""
    kind = obj.get("kind")
    spec = obj.get("spec") or {}
    if kind == "Pod":
        return obj
    if kind == "CronJob":
        return ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}
    return spec.get("template") or {}


def declared_models(pod: Mapping[str, Any], env_names: Sequence[str] = DEFAULT_MODEL_ENV
                    ) -> tuple[str, ...]:
    """Models a pod (template) says it uses, annotation first, then container env."""
    found: list[str] = []
    ann = ((pod.get("metadata") or {}).get("annotations") or {}).get(MODEL_ANNOTATION)
    if ann:
        found.append(ann)
    spec = pod.get("spec") or {}
    for c in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
        for env in c.get("env") or []:
            if env.get("name") in env_names and env.get("value"):
                found.append(str(env["value"]))
    return tuple(dict.fromkeys(found))


def workload_of(obj: Mapping[str, Any], env_names: Sequence[str] = DEFAULT_MODEL_ENV
                ) -> Workload | None:
    """The Workload of a Kubernetes object dict; None for kinds that are not workloads."""
    kind = obj.get("kind")
    if kind not in KINDS:
        return None
    meta = obj.get("metadata") or {}
    pod = pod_template(obj)
    labels = dict(((pod.get("metadata") or {}).get("labels")) or {})
    return Workload(
        key=WorkloadKey(str(kind), str(meta.get("namespace") or "default"), str(meta.get("name"))),
        pod_labels=labels,
        declared_models=declared_models(pod, env_names),
    )
