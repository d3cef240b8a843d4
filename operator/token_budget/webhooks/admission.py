"""Admission webhooks served by every replica.

* ``validate-budgets`` / ``validate-catalogs``: the rules a schema cannot say
  (the same :mod:`token_budget.api.rules` as ``tokenbudget validate``); each
  rejection names the field and what would be valid.
* ``mutate-pods``: the one call a new governed pod costs. It denies the pod in
  a scope whose budget is Blocked, or one that declares a model its budgets do
  not allow (:mod:`token_budget.policy.admission`); else it stamps the current
  directive, from its owner's annotations when it has them, else from the
  budgets' state; with the opt-in label ``tokenbudget.io/inject=true`` also
  mounts the downward API file the agent helper reads; with the directive
  service on, adds the variables that name its URL to every container
  (:mod:`token_budget.webhooks.directives`). A mutating webhook may deny, so a
  validating pod webhook would only be a second round trip for every pod
  (:mod:`token_budget.webhooks.configuration` says why it is reinvoked).
* ``validate-workloads``: deny a new Deployment, StatefulSet, Job or CronJob
  whose pod template the same checks would refuse.
* ``keep-agent-label-*``: refuse an update of a pod or workload that removes
  the agent label (from the object or its pod template) while its namespace is
  under mandatory enrolment (:func:`token_budget.policy.engine.mandatory_namespaces`).
* ``mutate-pods`` (again, for unlabelled pods: ``enrol-pods``) and ``enrol-*``:
  in a namespace under mandatory enrolment, add the agent label to a new pod or
  workload that shows an LLM signal (:mod:`token_budget.policy.signals`), on
  the object and its pod template at creation; at an update on the object only,
  never on the template, whose change would roll the workload's pods. A pod
  enrolled so is judged as a governed pod at once (denied while Blocked); the
  admin's gateway variables (``--gateway-env``) are added to the containers of
  a new governed pod that do not set them.

Answers come from an in-memory :class:`AdmissionCache`, never from a request to
the API server or Prometheus. It lives in the admission process
(:mod:`token_budget.webhooks.process`), fed by the operator's watches over a
pipe. The pod answers are memoised per namespace, namespace labels, pod labels
and declared models (the pods of one ReplicaSet share all four), so a burst of
pods costs one policy evaluation; any budget or catalog event forgets them.

With the operator's global ``--dry-run`` the pod and workload webhooks deny
nothing and mutate nothing: the answer allows the object unchanged and carries
``warnings`` saying what would have happened (``kubectl`` prints them). Budgets
and catalogs are still validated: an invalid one is refused in dry-run too.

One path serves them (:data:`ENDPOINTS`)::

    API server ──HTTPS──► Server (aiohttp) ─► respond(webhook, review) ─► handler ─► Answer

:class:`Server` answers an AdmissionReview with nothing between aiohttp and
the handler: no framework cause, diff, thread-pool hop, JSON-patch diff of the
whole pod or log lines (0.6-0.7 ms of CPU a review, most of it aiohttp and TLS;
bench/admission_bench.py).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import logging
import ssl
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pydantic
from aiohttp import web

from token_budget.api import rules
from token_budget.api import v1alpha1 as api
from token_budget.enforcement import patches
from token_budget.policy import admission, engine, signals
from token_budget.policy.catalog import Catalog
from token_budget.policy.inputs import BudgetKey
from token_budget.policy.workloads import DEFAULT_MODEL_ENV, declared_models, pod_template
from token_budget.webhooks import directives

log = logging.getLogger(__name__)
INJECT_LABEL = f"{api.PREFIX}inject"
VOLUME = "tokenbudget-directive"
MOUNT_PATH = "/etc/tokenbudget"
# Memoised pod answers kept at most; past it they are all dropped (a cluster with that
# many distinct label sets among new pods gets no help from a memo anyway).
MEMO_SIZE = 4096
# Idle seconds before the server closes a client connection: longer than the 90 s the API
# server's Go client keeps an idle one, so the client closes first and never sends on a
# connection the server is closing (aiohttp's default is 75 s).
KEEPALIVE_SECONDS = 120.0

_Labels = frozenset[tuple[str, str]]
_MemoKey = tuple[str, str, _Labels, _Labels, tuple[str, ...]]


@dataclass(frozen=True)
class _Memo:
    generation: int  # the cache's generation the answer was computed from
    until: dt.datetime | None  # when time alone can change it (an exception ends)
    value: Any


@dataclass
class AdmissionCache:
    """Budgets, catalogs, namespace labels and workload annotations, as last seen.

    TokenBudgets are indexed by namespace, so a pod's answer looks only at its own
    namespace's budgets and the ClusterTokenBudgets, however many budgets exist.
    """

    namespaced: dict[str, dict[BudgetKey, api.Budget]] = field(default_factory=dict)
    cluster: dict[BudgetKey, api.Budget] = field(default_factory=dict)
    catalogs: dict[str, api.ModelCatalog] = field(default_factory=dict)
    namespaces: dict[str, dict[str, str]] = field(default_factory=dict)
    owners: dict[tuple[str, str, str], dict[str, str]] = field(default_factory=dict)
    model_env: tuple[str, ...] = DEFAULT_MODEL_ENV
    agent_label: str = api.DEFAULT_AGENT_LABEL
    # Where agents reach the directive service, and the CA that signed it (None: not
    # served, nothing injected).
    directive_url: str | None = None
    directive_ca: str | None = None
    # What enrols an unlabelled pod or workload in a mandatory namespace (--enrolment-*).
    signals: signals.Signals = field(
        default_factory=lambda: signals.Signals.parse(signals.DEFAULT, DEFAULT_MODEL_ENV))
    enrol_by_signal: bool = True
    # Set on a new governed pod's containers that do not set them (--gateway-env).
    gateway_env: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    generation: int = 0  # bumped by every budget or catalog event: memoised answers expire
    _catalog: Catalog | None = None
    _memo: dict[_MemoKey, _Memo] = field(default_factory=dict)

    @property
    def budgets(self) -> dict[BudgetKey, api.Budget]:
        """Every budget, by key (a copy)."""
        with self.lock:
            out = dict(self.cluster)
            for found in self.namespaced.values():
                out.update(found)
            return out

    def catalog(self) -> Catalog:
        with self.lock:
            return self._catalog_locked()

    def _catalog_locked(self) -> Catalog:
        if self._catalog is None:
            self._catalog = Catalog(self.catalogs.values())
        return self._catalog

    def budget_event(self, body: dict[str, Any], deleted: bool) -> None:
        try:
            obj = api.parse(body)
        except (pydantic.ValidationError, ValueError):
            return  # an invalid object governs nothing (its status says why)
        with self.lock:
            self.generation += 1
            if isinstance(obj, api.ModelCatalog):
                if deleted:
                    self.catalogs.pop(obj.metadata.name, None)
                else:
                    self.catalogs[obj.metadata.name] = obj
                self._catalog = None
                return
            key = BudgetKey.of(obj)
            if isinstance(obj, api.TokenBudget):
                held = self.namespaced.setdefault(key.namespace, {})
            else:
                held = self.cluster
            if deleted or (body.get("metadata") or {}).get("deletionTimestamp"):
                held.pop(key, None)
                if not held and held is not self.cluster:
                    self.namespaced.pop(key.namespace, None)
            else:
                held[key] = obj

    def workload_event(self, obj: dict[str, Any], deleted: bool) -> None:
        meta = obj.get("metadata") or {}
        key = (str(obj.get("kind")), str(meta.get("namespace")), str(meta.get("name")))
        with self.lock:
            if deleted:
                self.owners.pop(key, None)
            else:
                ann = meta.get("annotations") or {}
                found = {k: v for k, v in ann.items() if k in patches.DIRECTIVE_KEYS}
                rate = found.get(patches.TOKENS_PER_MINUTE, "")
                if rate.isascii() and rate.isdigit():
                    # A new pod takes its share of the owner's rate at once, not the whole
                    # rate until the next evaluation divides it among the live pods.
                    found[patches.TOKENS_PER_MINUTE] = str(patches.share(int(rate),
                                                                         _pods_wanted(obj)))
                self.owners[key] = found

    def mandatory(self, namespace: str) -> bool:
        """Whether every workload of ``namespace`` is governed, whatever its labels."""
        with self.lock:
            labels = self.namespaces.get(namespace, {})
            key: _MemoKey = ("mandatory", namespace, frozenset(labels.items()), frozenset(), ())
            hit = self._memo.get(key)
            if hit is not None and hit.generation == self.generation:
                return bool(hit.value)
            budgets = list(self.cluster.values())
            generation = self.generation
        # Asked for every unlabelled pod with a signal, in any namespace: remembered.
        found = namespace in engine.mandatory_namespaces(budgets, {namespace: labels})
        with self.lock:
            if len(self._memo) >= MEMO_SIZE:
                self._memo.clear()
            self._memo[key] = _Memo(generation, None, found)
        return found

    def enrols(self, namespace: str, pod: Mapping[str, Any]) -> str | None:
        """The signal that enrols an unlabelled ``pod`` (template) of ``namespace``, in words.

        None when enrolment by signal is off, the pod shows no signal or the
        namespace is not under mandatory enrolment.
        """
        if not self.enrol_by_signal:
            return None
        shown = self.signals.shown(pod)
        return shown if shown is not None and self.mandatory(namespace) else None

    def owner_directive(self, namespace: str, pod: Mapping[str, Any]) -> dict[str, str]:
        """The directive annotations of the pod's Deployment/StatefulSet/Job/CronJob.

        Its ``tokens-per-minute`` is one pod's share: the owner's rate divided
        by the replicas (Jobs: the parallelism) it asks for.
        """
        with self.lock:
            for kind, name in _owner_refs(pod):
                found = self.owners.get((kind, namespace, name))
                if found:
                    return dict(found)
        return {}

    def owns(self, namespace: str, pod: Mapping[str, Any]) -> bool:
        """Whether a governed Deployment, StatefulSet, Job or CronJob the operator knows makes
        the pod (a ReplicaSet of a known Deployment, a Job of a known CronJob included)."""
        with self.lock:
            for kind, name in _owner_refs(pod):
                if (kind, namespace, name) in self.owners:
                    return True
                if kind == "Job" and any(k == "CronJob" and ns == namespace
                                         and name.startswith(n + "-")
                                         for k, ns, n in self.owners):
                    return True
        return False

    def partition_change(self, namespace: str, old_labels: Mapping[str, str],
                         new_labels: Mapping[str, str], now: dt.datetime) -> str | None:
        """:func:`admission.partition_label_change` for an update in ``namespace``."""
        with self.lock:
            ns_labels = dict(self.namespaces.get(namespace, {}))
            budgets = [*self.namespaced.get(namespace, {}).values(), *self.cluster.values()]
        return admission.partition_label_change(budgets, namespace, ns_labels, old_labels,
                                                new_labels, now)

    def review(self, namespace: str, pod_labels: Mapping[str, str],
               models: tuple[str, ...], now: dt.datetime,
               owned: bool = False) -> admission.Verdict:
        """:func:`admission.review` of a pod (template) in ``namespace``, memoised."""

        def compute(budgets: Sequence[api.Budget], catalog: Catalog,
                    ns_labels: Mapping[str, str]) -> tuple[Any, dt.datetime | None]:
            verdict = admission.review(budgets, catalog, namespace, ns_labels, pod_labels,
                                       models, now, owned)
            return verdict, admission.review_expires(budgets, namespace, ns_labels,
                                                     pod_labels, now)

        verdict: admission.Verdict = self._memoised("review-owned" if owned else "review",
                                                    namespace, pod_labels, models, now,
                                                    compute)
        return verdict

    def directive(self, namespace: str, pod_labels: Mapping[str, str],
                  models: tuple[str, ...], now: dt.datetime) -> dict[str, str]:
        """The directive annotations for a new pod from its budgets' state; {} if ungoverned."""

        def compute(budgets: Sequence[api.Budget], catalog: Catalog,
                    ns_labels: Mapping[str, str]) -> tuple[Any, dt.datetime | None]:
            d = admission.directive_for(budgets, catalog, namespace, ns_labels, pod_labels,
                                        models, now)
            return (patches.directive_annotations(d) if d is not None else {}), None

        wanted: dict[str, str] = self._memoised("directive", namespace, pod_labels, models,
                                                now, compute)
        return dict(wanted)

    def _memoised(self, what: str, namespace: str, pod_labels: Mapping[str, str],
                  models: tuple[str, ...], now: dt.datetime,
                  compute: Callable[[Sequence[api.Budget], Catalog, Mapping[str, str]],
                                    tuple[Any, dt.datetime | None]]) -> Any:
        with self.lock:
            ns_labels = self.namespaces.get(namespace, {})
            key = (what, namespace, frozenset(ns_labels.items()),
                   frozenset(pod_labels.items()), models)
            hit = self._memo.get(key)
            if hit is not None and hit.generation == self.generation and \
                    (hit.until is None or now < hit.until):
                return hit.value
            # Only this namespace's TokenBudgets and the cluster's: admission.governing
            # would drop every other namespace's anyway.
            budgets = [*self.namespaced.get(namespace, {}).values(), *self.cluster.values()]
            catalog = self._catalog_locked()
            generation = self.generation
        value, until = compute(budgets, catalog, ns_labels)
        with self.lock:
            if len(self._memo) >= MEMO_SIZE:
                self._memo.clear()
            self._memo[key] = _Memo(generation, until, value)
        return value


def _owner_refs(pod: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The pod's owners as (kind, name), a Deployment's ReplicaSet named as the Deployment
    (by the pod's ``pod-template-hash``)."""
    meta = pod.get("metadata") or {}
    h = (meta.get("labels") or {}).get("pod-template-hash")
    out = []
    for ref in meta.get("ownerReferences") or []:
        kind, name = str(ref.get("kind")), str(ref.get("name"))
        if kind == "ReplicaSet" and h and name.endswith("-" + h):
            kind, name = "Deployment", name[: -len(h) - 1]
        out.append((kind, name))
    return out


def _pods_wanted(obj: Mapping[str, Any]) -> int:
    """How many pods a workload asks for at once: replicas, or a Job's parallelism."""
    spec = obj.get("spec") or {}
    if obj.get("kind") == "CronJob":
        spec = (spec.get("jobTemplate") or {}).get("spec") or {}
    wanted = spec.get("parallelism" if obj.get("kind") in patches.SUSPENDABLE else "replicas", 1)
    return wanted if isinstance(wanted, int) and wanted > 0 else 1


cache = AdmissionCache()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# ---------------------------------------------------------------------------
# the handlers: an object in, an Answer out
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """One admission decision: allowed or why not, and the JSON patch for a mutation."""

    allowed: bool = True
    message: str = ""
    code: int = 200
    patch: tuple[dict[str, Any], ...] = ()
    warnings: tuple[str, ...] = ()

    def dry_run(self) -> Answer:
        """Allowed and unchanged, with warnings saying what this answer would have done."""
        said = list(self.warnings)
        if not self.allowed:
            said.append(f"dry-run: would deny: {self.message}")
        if self.patch:
            said.append("dry-run: would set " + ", ".join(_said(op) for op in self.patch))
        return Answer(warnings=tuple(said))


def _said(op: Mapping[str, Any]) -> str:
    """One JSON-patch operation in words: ``annotation k=v``, ``label k=v``, ``spec.volumes``."""
    parts = [p.replace("~1", "/").replace("~0", "~")
             for p in str(op.get("path", "")).split("/")[1:]]
    value = op.get("value")
    kind = {"annotations": "annotation", "labels": "label"}.get(parts[1] if len(parts) > 1
                                                                 else "")
    if parts[:1] == ["metadata"] and len(parts) == 1 and isinstance(value, Mapping):
        return ", ".join(_said({"path": f"/metadata/{k}", "value": v}) for k, v in value.items())
    if kind and len(parts) == 3:
        return f"{kind} {parts[2]}={value}"
    if kind and isinstance(value, Mapping):
        return ", ".join(f"{kind} {k}={v}" for k, v in value.items())
    return ".".join(parts)


@dataclass(frozen=True)
class _Mutation:
    """What mutate-pods changes, as kopf's merge-style Patch would say it."""

    annotations: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    volumes: list[dict[str, Any]] | None = None  # the whole new list, when injected
    containers: list[dict[str, Any]] | None = None
    warnings: tuple[str, ...] = ()


def validate_ours(obj: dict[str, Any]) -> Answer:
    """TokenBudget, ClusterTokenBudget, ModelCatalog: the rules a schema cannot say."""
    found = rules.schema_problems(obj)
    if not found:
        parsed = api.parse(obj)
        models = None
        if not isinstance(parsed, api.ModelCatalog):
            models = list(cache.catalog().models.values()) or None
        found = rules.problems(parsed, models)
    if found:
        return Answer(False, "; ".join(str(p) for p in found), 422)
    return Answer()


def validate_workload(obj: dict[str, Any]) -> Answer:
    return _review(obj, pod_template(obj), of=f"{obj.get('kind')} pod template")


def _review(obj: Mapping[str, Any], pod: Mapping[str, Any], of: str = "pod",
            owned: bool = False) -> Answer:
    namespace = str((obj.get("metadata") or {}).get("namespace") or "")
    labels = (pod.get("metadata") or {}).get("labels") or {}
    verdict = cache.review(namespace, labels, declared_models(pod, cache.model_env), _now(),
                           owned)
    if not verdict.allowed:
        return Answer(False, f"{of} denied: {verdict.message}", 403)
    return Answer()


def keep_agent_label(obj: dict[str, Any], old: dict[str, Any]) -> Answer:
    """Refuse an update that removes the agent label while enrolment is mandatory.

    The label is looked for on the object and on its pod template: either
    one leaving is a team leaving its budget. Without mandatory enrolment a
    team may leave (its spend still counts and is reported as ungoverned).
    """
    label = cache.agent_label

    def carries(o: Mapping[str, Any]) -> tuple[bool, bool]:
        own = label in ((o.get("metadata") or {}).get("labels") or {})
        pod = pod_template(o)
        return own, pod is not o and label in ((pod.get("metadata") or {}).get("labels") or {})

    gone = [where for where, had, has in zip(("metadata.labels", "its pod template"),
                                            carries(old), carries(obj), strict=True)
            if had and not has]
    namespace = str((obj.get("metadata") or {}).get("namespace") or "")
    if gone and cache.mandatory(namespace):
        return Answer(False, f"the label {label} must not be removed from {' or '.join(gone)}: "
                      f"enrolment is mandatory in namespace {namespace}, every workload there "
                      "is governed by its budgets", 403)
    # A partitioned budget's podLabel, on the pod (template) that carries it: removing it,
    # or changing it away from a Blocked partition, would take the pods out of it.
    old_pod, new_pod = pod_template(old), pod_template(obj)
    refused = cache.partition_change(
        namespace, (old_pod.get("metadata") or {}).get("labels") or {},
        (new_pod.get("metadata") or {}).get("labels") or {}, _now())
    if refused is not None:
        where = "its pod template" if new_pod is not obj else "the pod"
        return Answer(False, f"{where}: {refused}", 403)
    return Answer()


def _no_new_object(obj: dict[str, Any]) -> Answer:
    return Answer()  # keep-agent-label judges a change (see Endpoint.change)


def mutate_pod(obj: dict[str, Any]) -> Answer:
    """Deny the pod as :func:`_review` does, else the patch of :func:`_mutation`.

    A pod that enrolment labels here is judged with that label, as the governed
    pod it becomes: no other webhook call follows to judge it.
    """
    m = _mutation(obj)
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    if cache.agent_label in m.labels and cache.agent_label not in labels:
        judged: Mapping[str, Any] = {**obj, "metadata": {**meta, "labels": {**labels,
                                                                           **m.labels}}}
    else:
        judged = obj
    namespace = str(meta.get("namespace") or "")
    refused = _review(obj, judged, owned=cache.owns(namespace, obj))
    if not refused.allowed:
        return Answer(False, refused.message, refused.code, warnings=m.warnings)
    return Answer(patch=_json_patch(obj, m), warnings=m.warnings)


def _mutation(pod: Mapping[str, Any]) -> _Mutation:
    meta = pod.get("metadata") or {}
    namespace = str(meta.get("namespace") or "")
    labels = meta.get("labels") or {}
    enrolled: dict[str, str] = {}
    said: tuple[str, ...] = ()
    if cache.agent_label not in labels:  # sent by enrol-pods: unlabelled, any namespace
        signal = cache.enrols(namespace, pod)
        if signal is None:
            return _Mutation()
        enrolled = {cache.agent_label: "true"}
        labels = {**labels, **enrolled}
        said = (_enrolment_warning(namespace, "pod", signal),)
    wanted = cache.owner_directive(namespace, pod)
    if not wanted:
        wanted = cache.directive(namespace, labels, declared_models(pod, cache.model_env),
                                 _now())
    annotations: dict[str, str] = {}
    stamped: dict[str, str] = {}
    if wanted:
        annotations = {**wanted, patches.UPDATED_AT: _now().strftime("%Y-%m-%dT%H:%M:%SZ")}
        # The label the evaluation puts on everything it directs: stamped here, the
        # next evaluation finds the pod as it wants it and writes nothing (it used to
        # PATCH every new governed pod just for this label).
        stamped = {patches.ENFORCED_LABEL: "true"}
    stamped = {**enrolled, **stamped}
    volumes = containers = None
    if labels.get(INJECT_LABEL) == "true":
        volumes, containers = _injected(pod)
    if cache.directive_url:
        containers = _with_directive_env(containers or (pod.get("spec") or {}).get("containers")
                                         or [], containers is not None)
    if cache.gateway_env:
        containers = _with_gateway_env(containers or (pod.get("spec") or {}).get("containers")
                                       or [], containers is not None)
    return _Mutation(annotations, stamped, volumes, containers, said)


def _enrolment_warning(namespace: str, what: str, signal: str) -> str:
    return (f"namespace {namespace} is under mandatory enrolment and this {what} shows "
            f"{signal}: {cache.agent_label}=true is set, so its budgets' admission checks "
            f"apply to {'it' if what == 'pod' else 'its pods'}")


def _with_gateway_env(containers: list[dict[str, Any]], changed: bool
                      ) -> list[dict[str, Any]] | None:
    """The containers with each gateway variable they do not set; None if nothing is added.

    A variable a container sets in ``env`` is never replaced. A container with
    ``envFrom`` is left alone: whatever its Secret or ConfigMap holds is unknown
    here, and an ``env`` entry would override it.
    """
    out = []
    for c in containers:
        have = {e.get("name") for e in c.get("env") or []}
        missing = [{"name": k, "value": v} for k, v in cache.gateway_env.items()
                   if k not in have]
        if missing and not c.get("envFrom"):
            c = {**c, "env": [*(c.get("env") or []), *missing]}
            changed = True
        out.append(c)
    return out if changed else None


#: Where each kind keeps its pod template, from the object's root.
_TEMPLATE = {"Deployment": ("spec", "template"), "StatefulSet": ("spec", "template"),
             "Job": ("spec", "template"), "CronJob": ("spec", "jobTemplate", "spec", "template")}


def enrol_workload(obj: dict[str, Any]) -> Answer:
    """A new workload: the agent label on the object and its pod template.

    A new object has no running pods, so labelling its template restarts
    nothing: its first pods are created labelled.
    """
    return _enrol(obj, template=True)


def enrol_updated_workload(obj: dict[str, Any], old: dict[str, Any]) -> Answer:
    """An updated workload: the agent label on the object only.

    Never on the pod template: a changed template rolls a Deployment's or
    StatefulSet's pods (and a Job's is immutable). Its pods are labelled as
    they are created (``mutate-pods``), and governance comes from the listing.
    """
    return _enrol(obj, template=False)


def _enrol(obj: Mapping[str, Any], template: bool) -> Answer:
    meta = obj.get("metadata") or {}
    label = cache.agent_label
    if label in (meta.get("labels") or {}):
        return Answer()
    namespace = str(meta.get("namespace") or "")
    pod = pod_template(obj)
    signal = cache.enrols(namespace, pod)
    if signal is None:
        return Answer()
    ops = _set(obj, ("metadata", "labels", label), "true")
    where = _TEMPLATE.get(str(obj.get("kind")))
    if template and where is not None and \
            label not in ((pod.get("metadata") or {}).get("labels") or {}):
        ops += _set(obj, (*where, "metadata", "labels", label), "true")
    return Answer(patch=tuple(ops),
                  warnings=(_enrolment_warning(namespace, str(obj.get("kind")), signal),))


def _set(obj: Mapping[str, Any], parts: Sequence[str], value: Any) -> list[dict[str, Any]]:
    """The JSON-patch ``add`` that sets ``obj[parts...]``, creating the maps it lacks."""
    node: Any = obj
    for i, part in enumerate(parts[:-1]):
        child = node.get(part) if isinstance(node, Mapping) else None
        if not isinstance(child, Mapping):
            for p in reversed(parts[i + 1:]):
                value = {p: value}
            return [{"op": "add", "path": _pointer(*parts[:i + 1]), "value": value}]
        node = child
    return [{"op": "add", "path": _pointer(*parts), "value": value}]


def _with_directive_env(containers: list[dict[str, Any]], changed: bool
                        ) -> list[dict[str, Any]] | None:
    """The containers with the directive service's variables; None if all have them."""
    wanted = directives.pod_env(str(cache.directive_url), cache.directive_ca)
    out = []
    for c in containers:
        have = {e.get("name") for e in c.get("env") or []}
        if directives.URL_ENV not in have:
            c = {**c, "env": [*(c.get("env") or []),
                              *(e for e in wanted if e["name"] not in have)]}
            changed = True
        out.append(c)
    return out if changed else None


def _injected(pod: Mapping[str, Any]
              ) -> tuple[list[dict[str, Any]] | None, list[dict[str, Any]] | None]:
    """The pod's volumes and containers with the directive file mounted; None if it is."""
    spec = pod.get("spec") or {}
    volumes = list(spec.get("volumes") or [])
    if any(v.get("name") == VOLUME for v in volumes):
        return None, None
    volumes.append({"name": VOLUME, "downwardAPI": {"items": [
        {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}]}})
    containers = []
    for c in spec.get("containers") or []:
        c = dict(c)
        mounts = list(c.get("volumeMounts") or [])
        mounts.append({"name": VOLUME, "mountPath": MOUNT_PATH, "readOnly": True})
        c["volumeMounts"] = mounts
        containers.append(c)
    return volumes, containers


def _pointer(*parts: str) -> str:
    return "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in parts)


def _json_patch(pod: Mapping[str, Any], m: _Mutation) -> tuple[dict[str, Any], ...]:
    """JSON-patch operations that make ``pod`` what the same merge-style patch would.

    ``add`` on an existing member replaces it (RFC 6902), so a map that exists gets
    one operation per changed key, one that does not gets the whole map; values
    already in place are left out, as kopf leaves them out of its diff.
    """
    ops: list[dict[str, Any]] = []
    meta = pod.get("metadata")
    new_meta: dict[str, Any] = {}
    for part, wanted in (("annotations", m.annotations), ("labels", m.labels)):
        current = meta.get(part) if isinstance(meta, Mapping) else None
        if isinstance(current, Mapping):
            ops += [{"op": "add", "path": _pointer("metadata", part, k), "value": v}
                    for k, v in wanted.items() if current.get(k) != v]
        elif wanted:
            new_meta[part] = dict(wanted)
    if new_meta:
        if isinstance(meta, Mapping):
            ops += [{"op": "add", "path": _pointer("metadata", k), "value": v}
                    for k, v in new_meta.items()]
        else:
            ops.append({"op": "add", "path": "/metadata", "value": new_meta})
    spec: dict[str, Any] = {}
    if m.volumes is not None:
        spec["volumes"] = m.volumes
    if m.containers is not None:
        spec["containers"] = m.containers
    if spec:
        if isinstance(pod.get("spec"), Mapping):
            ops += [{"op": "add", "path": _pointer("spec", k), "value": v}
                    for k, v in spec.items()]
        else:
            ops.append({"op": "add", "path": "/spec", "value": spec})
    return tuple(ops)


_Operation = Literal["CREATE", "UPDATE", "DELETE", "CONNECT"]


@dataclass(frozen=True)
class Endpoint:
    """One webhook path: the resource it judges, its handler, its configuration's operations.

    The operations are what the configurations send; like kopf's admission engine,
    :func:`respond` judges whatever operation arrives.
    """

    group: str
    version: str
    plural: str
    operations: frozenset[_Operation]
    handle: Callable[[dict[str, Any]], Answer]
    mutating: bool = False
    enforces: bool = True  # False: validation of our own kinds, kept in dry-run
    # Judges an UPDATE from the old object to the new one (``handle`` judges a CREATE).
    change: Callable[[dict[str, Any], dict[str, Any]], Answer] | None = None

    def judge(self, obj: dict[str, Any], old: Mapping[str, Any] | None) -> Answer:
        if self.change is not None and old is not None:
            return self.change(obj, dict(old))
        return self.handle(obj)


_CU: frozenset[_Operation] = frozenset({"CREATE", "UPDATE"})
_C: frozenset[_Operation] = frozenset({"CREATE"})
_U: frozenset[_Operation] = frozenset({"UPDATE"})
#: The kinds whose agent label keep-agent-label guards, as (plural, group).
GUARDED = (("pods", ""), ("deployments", "apps"), ("statefulsets", "apps"), ("jobs", "batch"),
           ("cronjobs", "batch"))
ENDPOINTS: dict[str, Endpoint] = {
    "validate-budgets": Endpoint(api.GROUP, api.VERSION, "tokenbudgets", _CU, validate_ours,
                                 enforces=False),
    "validate-cluster-budgets": Endpoint(api.GROUP, api.VERSION, "clustertokenbudgets", _CU,
                                         validate_ours, enforces=False),
    "validate-catalogs": Endpoint(api.GROUP, api.VERSION, "modelcatalogs", _CU, validate_ours,
                                  enforces=False),
    **{f"validate-{plural}": Endpoint(group, "v1", plural, _C, validate_workload)
       for plural, group in (("deployments", "apps"), ("statefulsets", "apps"),
                             ("jobs", "batch"), ("cronjobs", "batch"))},
    **{f"keep-agent-label-{plural}": Endpoint(group, "v1", plural, _U, _no_new_object,
                                              change=keep_agent_label)
       for plural, group in GUARDED},
    # Labelled pods, and unlabelled ones in any namespace (enrol-pods in the configuration).
    "mutate-pods": Endpoint("", "v1", "pods", _C, mutate_pod, mutating=True),
    **{f"enrol-{plural}": Endpoint(group, "v1", plural, _CU, enrol_workload, mutating=True,
                                   change=enrol_updated_workload)
       for plural, group in GUARDED if group},
}


_RESOURCES = {(e.group, e.version, e.plural) for e in ENDPOINTS.values()}


class BadReview(ValueError):
    """The request is not an AdmissionReview the webhook can judge (HTTP 400)."""


class UnknownResource(LookupError):
    """No webhook of this operator judges the request's resource (HTTP 404)."""


def respond(webhook: str, review: Mapping[str, Any], dry_run: bool = False) -> dict[str, Any]:
    """The AdmissionReview response of ``webhook`` to ``review``, as kopf builds it.

    With ``dry_run`` a pod or workload webhook allows and mutates nothing, and
    warns what it would have done (:meth:`Answer.dry_run`).

    As in kopf's admission engine: a request for another resource than the
    webhook's, or a DELETE sent to a mutating webhook, is allowed unjudged (no
    handler applies); the operations are the configurations' business, not
    checked here; a handler's unexpected error denies with code 500 and its text.

    Raises:
        BadReview: no request, no userInfo, or neither object nor oldObject.
        UnknownResource: a resource none of :data:`ENDPOINTS` judges.
        KeyError: an unknown webhook.
    """
    endpoint = ENDPOINTS[webhook]
    request = review.get("request")
    if not isinstance(request, Mapping):
        raise BadReview("The admission review has no request.")
    resource = request.get("resource") or {}
    wanted = (resource.get("group"), resource.get("version"), resource.get("resource"))
    if wanted not in _RESOURCES:
        raise UnknownResource(f"The specified resource has no handlers: {resource}")
    if request.get("userInfo") is None:
        raise BadReview("User info is missing from the admission request.")
    obj = request.get("object")
    if obj is None:
        obj = request.get("oldObject")
    if obj is None:
        raise BadReview("Either old or new object is missing from the admission request.")
    answer = Answer()
    if wanted == (endpoint.group, endpoint.version, endpoint.plural) and \
            not (endpoint.mutating and request.get("operation") == "DELETE"):
        try:
            answer = endpoint.judge(dict(obj), request.get("oldObject")
                                    if request.get("object") is not None else None)
        except Exception as exc:  # noqa: BLE001 - a denial with the reason, as kopf does
            log.exception("webhook %s failed", webhook)
            answer = Answer(False, str(exc) or repr(exc), 500)
        if dry_run and endpoint.enforces:
            answer = answer.dry_run()
    out: dict[str, Any] = {"uid": request.get("uid", ""), "allowed": answer.allowed}
    if answer.patch:
        out["patch"] = base64.b64encode(json.dumps(list(answer.patch)).encode()).decode()
        out["patchType"] = "JSONPatch"
    if not answer.allowed:
        out["status"] = {"message": answer.message, "code": answer.code or 500}
    if answer.warnings:
        out["warnings"] = list(answer.warnings)
    return {"apiVersion": review.get("apiVersion", "admission.k8s.io/v1"),
            "kind": review.get("kind", "AdmissionReview"), "response": out}


# ---------------------------------------------------------------------------
# serving
# ---------------------------------------------------------------------------


class Server:
    """HTTPS for :data:`ENDPOINTS`: aiohttp and :func:`respond`, nothing per request besides.

    Calling it gives an async iterator that yields the client config once it listens
    and serves until closed (the admission process runs it:
    :mod:`token_budget.webhooks.process`). No access log: a line per request costs
    about 0.1 ms of CPU at hundreds of pods a second, and the API server's audit log
    has them.

    Connections stay open between requests (HTTP/1.1 keep-alive, closed after
    :data:`KEEPALIVE_SECONDS` idle, longer than the 90 s the API server's client keeps
    an idle one), so the API server pays one TLS handshake per connection it keeps,
    not per review. HTTP/2 would not help: kube-apiserver's webhook client offers only
    ``http/1.1`` in ALPN to every webhook behind a Service and to every URL webhook
    that is not on loopback (k8s.io/apiserver pkg/util/webhook/client.go, v0.35.0;
    kubernetes/kubernetes#75791: one HTTP/2 connection would pin all calls to one
    replica). Its transport keeps at most 25 idle connections per host (client-go
    transport/cache.go): more calls in flight than that open new connections, closed
    after their one call, which is where the 650-780 handshakes per 2,400 pods came
    from at 692 ms p99 (200 pods/s x 2 calls x latency). The cure is the latency (one
    call per pod, this server out of the evaluation's process), not the protocol.

    Certificate reload: every ``file_check_interval`` seconds it reads the two
    files; when they changed and make a valid pair it builds a new SSLContext,
    and every new TLS handshake is served with it (the listening context's
    ``sni_callback``, which OpenSSL calls on each ClientHello, with or without a
    server name). Connections already open keep the certificate they started
    with, which is still valid: renewals happen well before expiry. A pair
    that does not load (caught between two file writes, a half-updated mounted
    Secret) is tried again at the next check while the old one goes on serving.
    """

    def __init__(self, *, addr: str | None, port: int, certfile: str, pkeyfile: str,
                 file_check_interval: float = 60.0, dry_run: bool = False,
                 directives: directives.Service | None = None) -> None:
        self.addr = addr
        self.port = port
        self.certfile = certfile
        self.pkeyfile = pkeyfile
        self.file_check_interval = file_check_interval
        self.dry_run = dry_run
        self.directives = directives
        self._context: ssl.SSLContext | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/{webhook}", self._serve)
        if self.directives is not None:  # the directive service shares port and certificate
            self.directives.add_routes(app)
        return app

    def _load(self) -> ssl.SSLContext:
        context = ssl.create_default_context(purpose=ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.certfile, self.pkeyfile)
        return context

    def _current(self, conn: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                 listening: ssl.SSLContext) -> None:
        if self._context is not None and self._context is not listening:
            conn.context = self._context

    async def __call__(self) -> AsyncIterator[dict[str, str]]:
        listening = self._context = self._load()
        listening.sni_callback = self._current
        digest = self._digest()
        runner = web.AppRunner(self.app(), handle_signals=False, access_log=None,
                               keepalive_timeout=KEEPALIVE_SECONDS)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.addr or None, self.port, ssl_context=listening,
                               reuse_address=True, reuse_port=True)
            await site.start()
            log.debug("serving webhooks on %s:%s", self.addr or "*", self.port)
            yield {"url": f"https://{self.addr or 'localhost'}:{self.port}"}
            while True:
                await asyncio.sleep(self.file_check_interval)
                new = self._digest()
                if new is None or new == digest:
                    continue
                try:
                    self._context = self._load()
                except (OSError, ssl.SSLError) as exc:
                    log.info("webhook certificate files changed but do not load yet: %s", exc)
                    continue
                digest = new
                log.info("webhook certificate reloaded from %s", self.certfile)
        finally:
            if self.directives is not None:  # long-polls answered now, not when they time out
                self.directives.store.close()
            await runner.cleanup()

    def _digest(self) -> str | None:
        h = hashlib.sha256()
        try:
            for path in (self.certfile, self.pkeyfile):
                h.update(Path(path).read_bytes())
        except OSError:
            return None  # a mounted Secret between two versions
        return h.hexdigest()

    async def _serve(self, request: web.Request) -> web.Response:
        webhook = request.match_info["webhook"]
        if webhook not in ENDPOINTS:
            raise web.HTTPNotFound(reason=f"no webhook {webhook}")
        try:
            review = json.loads(await request.read())
            if not isinstance(review, Mapping):
                raise BadReview("The admission review is not an object.")
            out = respond(webhook, review, self.dry_run)
        except UnknownResource as exc:
            raise web.HTTPNotFound(reason=str(exc)) from exc
        except ValueError as exc:  # BadReview, invalid JSON
            raise web.HTTPBadRequest(reason=str(exc)) from exc
        return web.Response(body=json.dumps(out).encode(), content_type="application/json")
