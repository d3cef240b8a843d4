"""The gatherer keeps a trimmed copy of each listed workload and pod.

Covers :func:`token_budget.handlers.evaluation.trimmed`: for every kind the evaluation
governs, the trimmed object yields the same governed unit, the same workload (pod
labels, declared models) and the same patch for every directive as the object the API
server sent; what it drops (volumes, status, other annotations and environment) is
really gone. No cluster: objects are dicts shaped as the API server lists them.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from token_budget.api import v1alpha1 as api
from token_budget.enforcement import patches
from token_budget.handlers.evaluation import Evaluator, _key, trimmed
from token_budget.policy.decisions import Directive
from token_budget.policy.workloads import DEFAULT_MODEL_ENV, workload_of

NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
NS = "team-a"
OURS = {patches.STATE: "Blocked", patches.BUDGET: f"TokenBudget/{NS}/team",
        patches.REASON: "LimitExceeded", patches.PREVIOUS_REPLICAS: "3",
        patches.PREVIOUS_SUSPEND: "false", "tokenbudget.io/model": "gpt-4o"}
THEIRS = {"deployment.kubernetes.io/revision": "4",
          "kubectl.kubernetes.io/last-applied-configuration": "{" + "x" * 2000 + "}"}


def _pod_spec() -> dict[str, Any]:
    return {
        "volumes": [{"name": "token", "projected": {"sources": [{"serviceAccountToken": {}}]}}],
        "initContainers": [{"name": "init", "image": "busybox",
                            "env": [{"name": "OPENAI_MODEL", "value": "gpt-4o-mini"}]}],
        "containers": [{"name": "agent", "image": "example/agent:1",
                        "env": [{"name": "LLM_MODEL", "value": "gpt-4o"},
                                {"name": "API_KEY", "value": "secret"},
                                {"name": "MODEL_NAME",
                                 "valueFrom": {"configMapKeyRef": {"name": "m", "key": "k"}}}],
                        "volumeMounts": [{"name": "token", "mountPath": "/var/run"}]}],
        "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists"}],
    }


def _template() -> dict[str, Any]:
    return {"metadata": {"labels": {"app": "agent", "tokenbudget.io/agent": "true"},
                         "annotations": {"tokenbudget.io/model": "claude-sonnet-4",
                                         "prometheus.io/scrape": "true"}},
            "spec": _pod_spec()}


def _meta(name: str, annotations: dict[str, str], **extra: Any) -> dict[str, Any]:
    return {"name": name, "namespace": NS, "uid": f"uid-{name}", "resourceVersion": "42",
            "generation": 3, "creationTimestamp": "2026-11-23T10:00:00Z",
            "labels": {"app": "agent", "tokenbudget.io/agent": "true",
                       patches.ENFORCED_LABEL: "true"},
            "annotations": {**THEIRS, **annotations}, **extra}


def _objects(annotations: dict[str, str]) -> list[dict[str, Any]]:
    status = {"replicas": 3, "conditions": [{"type": "Available", "status": "False"}]}
    return [
        {"kind": "Deployment", "apiVersion": "apps/v1", "metadata": _meta("agent", annotations),
         "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "agent"}},
                  "template": _template(), "strategy": {"type": "RollingUpdate"}},
         "status": status},
        {"kind": "StatefulSet", "apiVersion": "apps/v1", "metadata": _meta("db", annotations),
         "spec": {"replicas": 0, "template": _template()}, "status": status},
        {"kind": "Job", "apiVersion": "batch/v1", "metadata": _meta("batch", annotations),
         "spec": {"suspend": False, "template": _template()}, "status": {}},
        {"kind": "CronJob", "apiVersion": "batch/v1", "metadata": _meta("nightly", annotations),
         "spec": {"suspend": True, "schedule": "0 2 * * *",
                  "jobTemplate": {"spec": {"template": _template()}}}},
        {"kind": "Pod", "apiVersion": "v1",
         "metadata": _meta("agent-7d9f-abcde", annotations, labels={
             "app": "agent", "tokenbudget.io/agent": "true", "pod-template-hash": "7d9f"},
             ownerReferences=[{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                               "name": "agent-7d9f", "uid": "rs", "controller": True}]),
         "spec": _pod_spec(), "status": {"phase": "Pending", "qosClass": "BestEffort"}},
    ]


def _directive(state: api.State) -> Directive:
    return Directive(state=state, budget=f"TokenBudget/{NS}/team", reason="Reason",
                     message="m", model="gpt-4o-mini" if state is api.State.REROUTED else None,
                     allowed_models=frozenset({"gpt-4o"}),
                     tokens_per_minute=100 if state is api.State.THROTTLED else None)


DIRECTIVES = [pytest.param(None, id="no budget governs it any more"),
              *[pytest.param(_directive(s), id=f"directive {s.value}") for s in api.State]]
STATES = [pytest.param(OURS, id="objects that carry a directive"),
          pytest.param({}, id="objects never touched")]


@pytest.mark.parametrize("annotations", STATES)
@pytest.mark.parametrize("directive", DIRECTIVES)
def test_a_trimmed_object_gets_the_same_patch_as_the_listed_one(
        annotations: dict[str, str], directive: Directive | None) -> None:
    for obj in _objects(annotations):
        small = trimmed(obj, DEFAULT_MODEL_ENV)
        for may_scale in (True, False):
            assert patches.patch_for(small, directive, NOW, may_scale) == \
                patches.patch_for(obj, directive, NOW, may_scale), obj["kind"]


@pytest.mark.parametrize("annotations", STATES)
def test_a_trimmed_object_is_the_same_workload(annotations: dict[str, str]) -> None:
    for obj in _objects(annotations):
        small = trimmed(obj, DEFAULT_MODEL_ENV)
        assert workload_of(small) == workload_of(obj), obj["kind"]
        assert _key(small) == _key(obj)


def test_a_trimmed_pod_still_belongs_to_its_deployment() -> None:
    objects = {_key(o): o for o in _objects(OURS)}
    small = {k: trimmed(o, DEFAULT_MODEL_ENV) for k, o in objects.items()}
    for k in objects:
        assert Evaluator._owner(k, small[k], small) == Evaluator._owner(k, objects[k], objects)
    pod = next(k for k in objects if k.kind == "Pod")
    assert Evaluator._owner(pod, small[pod], small).kind == "Deployment"


def test_a_trimmed_object_keeps_what_events_name() -> None:
    for obj in _objects(OURS):
        small = trimmed(obj, DEFAULT_MODEL_ENV)
        for field in ("name", "namespace", "uid", "resourceVersion"):
            assert small["metadata"][field] == obj["metadata"][field]
        assert (small["kind"], small["apiVersion"]) == (obj["kind"], obj["apiVersion"])


def test_what_the_evaluation_never_reads_is_dropped() -> None:
    for obj in _objects(OURS):
        small = trimmed(obj, DEFAULT_MODEL_ENV)
        text = json.dumps(small)
        for gone in ("volumes", "tolerations", "conditions", "qosClass", "secret",
                     "last-applied", "prometheus.io", "strategy", "schedule"):
            assert gone not in text, (obj["kind"], gone)
        # A pod keeps its age: one too young to have been scraped yet is not evidence
        # that its scrape is missing (Workload.settled_pods).
        assert ("creationTimestamp" in text) is (obj["kind"] == "Pod"), obj["kind"]
        if obj["kind"] != "Pod":
            assert "status" not in small, obj["kind"]
        assert len(text) < len(json.dumps(obj)) / 3


@pytest.mark.parametrize(("status", "deleting", "live"), [
    pytest.param({"phase": "Pending"}, False, True, id="a pending pod takes a share"),
    pytest.param({"phase": "Running"}, False, True, id="a running pod takes a share"),
    pytest.param({"phase": "Succeeded"}, False, False, id="a finished pod takes none"),
    pytest.param({"phase": "Failed"}, False, False, id="a failed pod takes none"),
    pytest.param({"phase": "Running"}, True, False, id="a pod being deleted takes none"),
])
def test_a_trimmed_pod_keeps_whether_it_is_live(status: dict[str, str], deleting: bool,
                                                live: bool) -> None:
    pod = _objects({})[-1]
    pod["status"] = {**status, "qosClass": "BestEffort"}
    if deleting:
        pod["metadata"]["deletionTimestamp"] = "2026-11-23T12:00:00Z"
    assert patches.live(trimmed(pod, DEFAULT_MODEL_ENV)) is live
    assert patches.live(pod) is live


def test_only_the_configured_model_variables_are_kept() -> None:
    pod = _objects({})[-1]
    small = trimmed(pod, ("LLM_MODEL",))
    assert small["spec"]["containers"] == [{"env": [{"name": "LLM_MODEL", "value": "gpt-4o"}]}]
    assert workload_of(small, ("LLM_MODEL",)) == workload_of(pod, ("LLM_MODEL",))
