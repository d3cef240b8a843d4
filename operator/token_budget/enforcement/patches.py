"""What to change on a workload or pod so it carries a directive: pure patch computation.

Given an object as the API server returned it and the directive it should
carry (or None: no budget governs it any more), :func:`patch_for` returns the
JSON merge-patch that makes it so, or None when nothing needs to change. No
patch, no write: a quiet evaluation makes zero write requests.

What the directive annotations say (all under ``tokenbudget.io/``)::

    state              Ok | Warning | Rerouted | Throttled | Blocked
    budget             TokenBudget/ns/name or ClusterTokenBudget/name (the one that decided)
    reason             CamelCase reason of that budget's decision
    use-model          the model to use instead (Reroute)
    allowed-models     comma-separated catalog models allowed (absent: no restriction)
    tokens-per-minute  the token rate (Throttle): the workload's on the workload,
                       on each pod its share (see :func:`pod_share`)
    updated-at         when the directive last changed (RFC 3339)

Block keeps what it changes, in the same patch, so a restore is exact even if
the operator dies right after the write::

    Deployment/StatefulSet  spec.replicas -> 0,  previous-replicas = old value
    Job/CronJob             spec.suspend -> true, previous-suspend = old value

A Block on a pod that is its own governed unit (a bare Pod, or one whose
DaemonSet or ReplicaSet the operator does not govern) changes annotations
only: the operator deletes nothing it could not put back, and says so with a
``CannotStop`` Event (:func:`cannot_stop`).

Directives go on object metadata only, never on a pod template: changing a
template would restart every pod. ``tokenbudget.io/enforced=true`` (a label)
marks what the operator touched, so it can find and restore it later, even
once no budget selects it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from typing import Any

from token_budget.api.v1alpha1 import PREFIX, State
from token_budget.policy.decisions import Directive

STATE = f"{PREFIX}state"
BUDGET = f"{PREFIX}budget"
REASON = f"{PREFIX}reason"
USE_MODEL = f"{PREFIX}use-model"
ALLOWED_MODELS = f"{PREFIX}allowed-models"
TOKENS_PER_MINUTE = f"{PREFIX}tokens-per-minute"
UPDATED_AT = f"{PREFIX}updated-at"
PREVIOUS_REPLICAS = f"{PREFIX}previous-replicas"
PREVIOUS_SUSPEND = f"{PREFIX}previous-suspend"
ENFORCED_LABEL = f"{PREFIX}enforced"

DIRECTIVE_KEYS = (STATE, BUDGET, REASON, USE_MODEL, ALLOWED_MODELS, TOKENS_PER_MINUTE)
ALL_KEYS = (*DIRECTIVE_KEYS, UPDATED_AT, PREVIOUS_REPLICAS, PREVIOUS_SUSPEND)
SCALABLE = ("Deployment", "StatefulSet")
SUSPENDABLE = ("Job", "CronJob")
# A pod's share of its workload's rate is rewritten only when it moves by more than this
# fraction: the paced rate moves a little at most evaluations, and a patch per pod per
# interval would be write load for nothing. Kept shares hold the workload within 5 % of
# its rate.
RATE_MARGIN = 0.05


def directive_annotations(d: Directive) -> dict[str, str]:
    """The annotations that carry a directive (without ``updated-at``)."""
    out = {STATE: d.state.value, BUDGET: d.budget, REASON: d.reason}
    if d.model:
        out[USE_MODEL] = d.model
    if d.allowed_models is not None:
        out[ALLOWED_MODELS] = ",".join(sorted(d.allowed_models))
    if d.tokens_per_minute is not None:
        out[TOKENS_PER_MINUTE] = str(d.tokens_per_minute)
    return out


def share(rate: int, pods: int) -> int:
    """One pod's part of a workload's token rate (at least 1 token a minute)."""
    return max(1, rate // max(1, pods))


def live(pod: Mapping[str, Any]) -> bool:
    """Whether a pod may still spend: not finished and not being deleted."""
    phase = (pod.get("status") or {}).get("phase")
    return phase not in ("Succeeded", "Failed") and not _meta(pod).get("deletionTimestamp")


def pod_share(directive: Directive | None, pods: int, pod: Mapping[str, Any]
              ) -> Directive | None:
    """The directive for one of ``pods`` live pods of a workload: its share of the rate.

    Every agent's Governor spends the rate its own pod carries, so the
    workload's rate is divided among its live pods. The share the pod already
    carries is kept while it is within :data:`RATE_MARGIN` of the new one.
    """
    if directive is None or directive.tokens_per_minute is None:
        return directive
    wanted = share(directive.tokens_per_minute, pods)
    try:
        have = int((_meta(pod).get("annotations") or {}).get(TOKENS_PER_MINUTE, ""))
    except ValueError:
        have = 0
    if have > 0 and abs(have - wanted) <= wanted * RATE_MARGIN:
        wanted = have
    return dataclasses.replace(directive, tokens_per_minute=wanted)


def cannot_stop(pod: Mapping[str, Any], directive: Directive | None,
                patch: Mapping[str, Any] | None) -> str | None:
    """The ``CannotStop`` Event message when this patch blocks a pod nothing can stop.

    For a pod that is its own governed unit only; None unless the patch is the
    one that turns it Blocked (so one Event per transition).
    """
    if directive is None or not directive.blocked or not patch:
        return None
    if ((patch.get("metadata") or {}).get("annotations") or {}).get(STATE) != State.BLOCKED.value:
        return None
    owners = [f"{r.get('kind')}/{r.get('name')}" for r in _meta(pod).get("ownerReferences") or []]
    what = f"its owner {', '.join(owners)} is" if owners else "a bare Pod is"
    return (f"blocked by {directive.budget}, but {what} not a kind the operator can stop "
            f"(it scales Deployments and StatefulSets to zero and suspends Jobs and CronJobs); "
            f"the pod carries {STATE}=Blocked for its agent to obey, new pods are refused, "
            f"and running ones stop only if their agent obeys or someone deletes them")


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def patch_for(obj: Mapping[str, Any], directive: Directive | None, now: dt.datetime,
              may_scale: bool = True) -> dict[str, Any] | None:
    """The merge-patch that makes ``obj`` carry ``directive``; None if it already does.

    Args:
        obj: a Pod, Deployment, StatefulSet, Job or CronJob as read from the API.
        directive: what it should carry; None removes every trace of the operator.
        now: time for ``updated-at``.
        may_scale: False for pods and in dry-run: annotations only, no scaling.
    """
    kind = obj.get("kind", "")
    meta = _meta(obj)
    current: Mapping[str, str] = meta.get("annotations") or {}
    labels: Mapping[str, str] = meta.get("labels") or {}
    spec = obj.get("spec") or {}
    ann: dict[str, str | None] = {}
    patch_spec: dict[str, Any] = {}

    want = directive_annotations(directive) if directive is not None else {}
    for key in DIRECTIVE_KEYS:
        if current.get(key) != want.get(key):
            ann[key] = want.get(key)
    if ann:
        ann[UPDATED_AT] = now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if want else None

    blocked = directive is not None and directive.state is State.BLOCKED
    if may_scale and kind in SCALABLE:
        replicas = spec.get("replicas", 1)
        if blocked:
            if PREVIOUS_REPLICAS not in current:
                ann[PREVIOUS_REPLICAS] = str(replicas)
            if replicas != 0:
                patch_spec["replicas"] = 0  # also corrects drift: someone scaled it up
        elif PREVIOUS_REPLICAS in current:
            try:
                patch_spec["replicas"] = int(current[PREVIOUS_REPLICAS])
            except ValueError:
                pass  # a hand-edited value: leave replicas as they are
            ann[PREVIOUS_REPLICAS] = None
    if may_scale and kind in SUSPENDABLE:
        suspended = bool(spec.get("suspend", False))
        if blocked:
            if PREVIOUS_SUSPEND not in current:
                ann[PREVIOUS_SUSPEND] = "true" if suspended else "false"
            if not suspended:
                patch_spec["suspend"] = True
        elif PREVIOUS_SUSPEND in current:
            patch_spec["suspend"] = current[PREVIOUS_SUSPEND] == "true"
            ann[PREVIOUS_SUSPEND] = None

    label_patch: dict[str, str | None] = {}
    keeps_state = any(current.get(k) for k in (PREVIOUS_REPLICAS, PREVIOUS_SUSPEND)) and not (
        PREVIOUS_REPLICAS in ann or PREVIOUS_SUSPEND in ann
    )
    enforced = bool(want) or keeps_state or any(v is not None for v in ann.values())
    if enforced and labels.get(ENFORCED_LABEL) != "true":
        label_patch[ENFORCED_LABEL] = "true"
    if not enforced and ENFORCED_LABEL in labels:
        label_patch[ENFORCED_LABEL] = None

    if not ann and not patch_spec and not label_patch:
        return None
    patch: dict[str, Any] = {"metadata": {}}
    if ann:
        patch["metadata"]["annotations"] = ann
    if label_patch:
        patch["metadata"]["labels"] = label_patch
    if patch_spec:
        patch["spec"] = patch_spec
    return patch


def scaled_to_zero(patch: Mapping[str, Any] | None) -> bool:
    return bool(patch) and (patch.get("spec") or {}).get("replicas") == 0  # type: ignore[union-attr]


def describe(patch: Mapping[str, Any]) -> str:
    """A short human text of a patch, for Events and logs."""
    parts = []
    spec = patch.get("spec") or {}
    if "replicas" in spec:
        parts.append(f"replicas -> {spec['replicas']}")
    if "suspend" in spec:
        parts.append(f"suspend -> {str(spec['suspend']).lower()}")
    ann = (patch.get("metadata") or {}).get("annotations") or {}
    if STATE in ann:
        parts.append(f"state -> {ann[STATE] or 'removed'}")
    return ", ".join(parts) or "annotations updated"


# ---------------------------------------------------------------------------
# Autoscalers: a KEDA ScaledObject would scale a blocked workload straight back up
# ---------------------------------------------------------------------------

KEDA_PAUSED = "autoscaling.keda.sh/paused-replicas"
PAUSED_BY = f"{PREFIX}paused-by"
PREVIOUS_PAUSED = f"{PREFIX}previous-paused-replicas"


def scaler_target(obj: Mapping[str, Any]) -> tuple[str, str] | None:
    """(kind, name) an HPA or a KEDA ScaledObject scales."""
    ref = (obj.get("spec") or {}).get("scaleTargetRef") or {}
    name = ref.get("name")
    if not name:
        return None
    return str(ref.get("kind") or "Deployment"), str(name)


def scaled_object_patch(obj: Mapping[str, Any], blocked_by: str | None) -> dict[str, Any] | None:
    """Pause a ScaledObject at zero replicas while its target is blocked, then restore it.

    KEDA's own pause annotation is used, so KEDA stops scaling and says why; a
    pause the owner had set before is kept in ``previous-paused-replicas`` and
    put back exactly. An HPA needs nothing: it does not scale a target at zero.
    """
    ann: Mapping[str, str] = (obj.get("metadata") or {}).get("annotations") or {}
    if blocked_by is not None:
        if ann.get(PAUSED_BY) == blocked_by and ann.get(KEDA_PAUSED) == "0":
            return None
        want: dict[str, str | None] = {KEDA_PAUSED: "0", PAUSED_BY: blocked_by}
        if PAUSED_BY not in ann:
            want[PREVIOUS_PAUSED] = ann.get(KEDA_PAUSED, "")
        return {"metadata": {"annotations": want}}
    if PAUSED_BY in ann:
        previous = ann.get(PREVIOUS_PAUSED, "")
        return {"metadata": {"annotations": {KEDA_PAUSED: previous or None, PAUSED_BY: None,
                                             PREVIOUS_PAUSED: None}}}
    return None
