"""Admission decisions for new pods and workloads: pure, from budgets' status and the catalog.

The admission webhook answers in milliseconds, so it does not query Prometheus:
it reads what the last evaluation wrote (each budget's ``status.state``, per
namespace for a PerNamespace ClusterTokenBudget) and the catalog. Two rules,
the way ResourceQuota answers with a 403 that names the violated limit:

* a governed pod (or workload) in a scope whose budget is ``Blocked`` is denied,
  with the budget, the limit and when the window resets;
* a governed pod that declares a model its budgets do not allow is denied, with
  the rule and the allowed models.

A budget with ``spec.partition`` refuses a governed pod without its
``podLabel``, and one whose partition (the label's value) is ``Blocked``; the
budget's other partitions are not refused.

:func:`directive_for` gives the annotations to stamp on a new governed pod when
its owner carries none yet (a bare pod, a brand-new workload).
:func:`review_expires` says how long a review stays true when nothing changes,
so that the webhook can keep answers.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from token_budget.api import v1alpha1 as api
from token_budget.api.conditions import Reason
from token_budget.api.types import utc
from token_budget.policy import engine, partitions
from token_budget.policy.catalog import Catalog
from token_budget.policy.decisions import SEVERITY, STATE_OF_ACTION, Directive, merge
from token_budget.policy.inputs import BudgetKey


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str = "Allowed"
    message: str = ""
    budgets: tuple[str, ...] = field(default=())


def _scope_state(budget: api.Budget, namespace: str) -> api.State:
    st = budget.status
    if st is None:
        return api.State.OK
    if isinstance(budget, api.ClusterTokenBudget) and \
            budget.spec.limit_scope is api.LimitScope.PER_NAMESPACE:
        for ns in st.namespaces:
            if ns.namespace == namespace:
                return ns.state
        return api.State.OK
    return st.state or api.State.OK


def governing(budgets: Sequence[api.Budget], namespace: str,
              namespace_labels: Mapping[str, str], pod_labels: Mapping[str, str]
              ) -> list[api.Budget]:
    """Enforcing budgets whose scope holds the namespace and whose selector the pod matches."""
    out: list[api.Budget] = []
    for b in budgets:
        if b.spec.mode is api.Mode.DRY_RUN or not b.spec.selector.matches(pod_labels):
            continue
        if isinstance(b, api.TokenBudget):
            if b.metadata.namespace == namespace:
                out.append(b)
        elif b.spec.namespace_selector.matches(namespace_labels):
            out.append(b)
    return sorted(out, key=lambda b: BudgetKey.of(b))


def _name(b: api.Budget) -> str:
    return f"{b.kind} {BudgetKey.of(b)}"


def _reset_text(b: api.Budget) -> str:
    st = b.status
    resets = sorted(utc(w.reset_time) for w in (st.windows if st else ()) if w.reset_time)
    if resets:
        return f"; the window resets at {resets[0].strftime('%Y-%m-%dT%H:%M:%SZ')}"
    return "; spend falls as the rolling window moves on"


def review(budgets: Sequence[api.Budget], catalog: Catalog, namespace: str,
           namespace_labels: Mapping[str, str], pod_labels: Mapping[str, str],
           declared_models: Sequence[str], now: dt.datetime, owned: bool = False) -> Verdict:
    """Whether a new governed pod (or a workload's pod template) may be admitted.

    ``owned``: the pod is made by a governed Deployment, StatefulSet, Job or CronJob
    the operator knows (its template was admitted already): without a partition's
    ``podLabel`` it belongs to the unpartitioned partition rather than being refused.
    """
    gov = governing(budgets, namespace, namespace_labels, pod_labels)
    names = tuple(_name(b) for b in gov)
    for b in gov:
        if b.spec.partition is not None:
            refused = _partition_review(b, namespace, pod_labels, now, owned)
            if refused is not None:
                return Verdict(False, refused[0], refused[1], names)
            continue
        if _scope_state(b, namespace) is api.State.BLOCKED and not _excepted(b, now):
            st = b.status
            detail = f": {st.message}" if st and st.message else ""
            return Verdict(False, "BudgetBlocked",
                           f"{_name(b)} is Blocked in namespace {namespace}{detail}"
                           f"{_reset_text(b)}", names)
    for model in declared_models:
        for b in gov:
            if engine.model_allowed(b.spec, model, catalog):
                continue
            allowed = engine.allowed_models(b.spec, catalog)
            rule = _rule(b.spec, model, catalog)
            return Verdict(False, "ModelNotAllowed",
                           f"model {model} is not allowed by {_name(b)} ({rule}); allowed: "
                           f"{', '.join(sorted(allowed)) if allowed else 'none in the catalog'}",
                           names)
    return Verdict(True, "Allowed", "", names)


def _partition_review(b: api.Budget, namespace: str, pod_labels: Mapping[str, str],
                      now: dt.datetime, owned: bool = False) -> tuple[str, str] | None:
    """Why a partitioned budget refuses a pod (reason, message), or None.

    A new workload, or a pod no known workload makes, must name its partition (one
    without ``podLabel`` would otherwise escape its person's Block). A pod of a
    workload that was running unlabelled before the budget was partitioned is
    admitted into the unpartitioned partition: a restart, a reschedule or a scale-up
    of an agent that was never labelled must not stop it (its template cannot lose
    the label later: :func:`partition_label_change`). A partition that is Blocked
    admits nothing.
    """
    p = b.spec.partition
    assert p is not None
    value = partitions.value_of(p, pod_labels)
    if not value and not owned:
        return ("PartitionLabelMissing",
                f"{_name(b)} applies its limits per {p.label}: a pod it governs must carry "
                f"the label {p.pod_label} naming its {p.label}")
    if partitions.state_of(b, namespace, value) is api.State.BLOCKED and not _excepted(b, now):
        return ("BudgetBlocked",
                f"{_name(b)} is Blocked for partition {partitions.describe(p, value)} in "
                f"namespace {namespace}{_reset_text(b)}")
    return None


def partition_label_change(budgets: Sequence[api.Budget], namespace: str,
                           namespace_labels: Mapping[str, str], old_labels: Mapping[str, str],
                           new_labels: Mapping[str, str], now: dt.datetime) -> str | None:
    """Why an update of a pod's (or a pod template's) labels is refused, or None.

    For every enforcing partitioned budget that governs the object before or after:
    its ``podLabel`` must not be removed (the pods would leave their person's
    partition), and must not change (or be added) away from a partition that is
    Blocked, the unpartitioned one included (escaping a Block by relabelling).
    Other changes of value are allowed: a workload handed to another person, or
    labelled for the first time.
    """
    gov = {BudgetKey.of(b): b for labels in (old_labels, new_labels)
           for b in governing(budgets, namespace, namespace_labels, labels)}
    for _, b in sorted(gov.items()):
        p = b.spec.partition
        if p is None:
            continue
        was, now_value = partitions.value_of(p, old_labels), partitions.value_of(p, new_labels)
        if was == now_value:
            continue
        if was and not now_value:
            return (f"the label {p.pod_label} must not be removed: {_name(b)} applies its "
                    f"limits per {p.label}, and the pods would leave partition "
                    f"{partitions.describe(p, was)}")
        if partitions.state_of(b, namespace, was) is api.State.BLOCKED \
                and not _excepted(b, now):
            # Labelling an unlabelled workload moves it out of the unpartitioned partition:
            # not while that one is Blocked either.
            how = f"change from {was!r}" if was else "be added"
            return (f"the label {p.pod_label} must not {how} while "
                    f"{_name(b)} is Blocked for partition {partitions.describe(p, was)}"
                    f"{_reset_text(b)}")
    return None


def review_expires(budgets: Sequence[api.Budget], namespace: str,
                   namespace_labels: Mapping[str, str], pod_labels: Mapping[str, str],
                   now: dt.datetime) -> dt.datetime | None:
    """When :func:`review` of the same pod, made at ``now``, can change by time alone.

    That is when the first exception still running ends (it may uncover a Blocked
    state); None when only a change to the budgets, the catalog or the labels can.
    """
    ends = [utc(e.until) for b in governing(budgets, namespace, namespace_labels, pod_labels)
            for e in b.spec.exceptions if utc(e.until) > utc(now)]
    return min(ends) if ends else None


def _excepted(b: api.Budget, now: dt.datetime) -> bool:
    cap = [e for e in b.spec.exceptions if utc(e.until) > utc(now)]
    return any(SEVERITY[STATE_OF_ACTION[e.max_action]] < SEVERITY[api.State.BLOCKED] for e in cap)


def _rule(spec: api.TokenBudgetSpec, model: str, catalog: Catalog) -> str:
    entry = catalog.resolve(model)
    if entry is not None and entry.tier in spec.denied_tiers:
        return f"deniedTiers includes {entry.tier.value}"
    if spec.denied_models:
        return f"deniedModels: {', '.join(spec.denied_models)}"
    return f"allowedModels: {', '.join(spec.allowed_models)}"


def directive_for(budgets: Sequence[api.Budget], catalog: Catalog, namespace: str,
                  namespace_labels: Mapping[str, str], pod_labels: Mapping[str, str],
                  declared_models: Sequence[str], now: dt.datetime) -> Directive | None:
    """The directive a new pod starts with, from its budgets' current state; None if ungoverned.

    A paced Throttle cannot be computed without spend; the pod gets the state and
    the next evaluation (seconds away) stamps the rate.
    """
    gov = governing(budgets, namespace, namespace_labels, pod_labels)
    if not gov:
        return None
    out = []
    for b in gov:
        p = b.spec.partition
        state = _scope_state(b, namespace) if p is None else \
            partitions.state_of(b, namespace, partitions.value_of(p, pod_labels))
        ladder = sorted(b.spec.actions, key=lambda a: a.at_percent)
        reached = [a for a in ladder
                   if SEVERITY[STATE_OF_ACTION[a.type]] <= SEVERITY[state]] if state is not \
            api.State.OK else []
        allowed = engine.allowed_models(b.spec, catalog)
        model = None
        reroute = next((a for a in reversed(reached) if a.type is api.ActionType.REROUTE), None)
        if reroute is not None:
            model = reroute.model or next(
                (m for m in (engine.cheapest_equivalent(d, allowed, catalog)
                             for d in declared_models) if m), None)
        throttle = next((a for a in reversed(reached) if a.type is api.ActionType.THROTTLE), None)
        key = BudgetKey.of(b)
        out.append(Directive(
            state=state, budget=f"{key.kind}/{key}",
            reason=(b.status.reason if b.status and b.status.reason else Reason.WITHIN_BUDGET),
            message="", model=model, allowed_models=allowed,
            tokens_per_minute=throttle.tokens_per_minute if throttle else None,
        ))
    return merge(out)
