"""Partitions: one budget's limits applied to each value of a Prometheus label apart.

A budget with ``spec.partition`` (``label: user, podLabel: tokenbudget.io/owner``)
has, in each of its scopes (:func:`token_budget.policy.world.scopes`), one
partition per value of ``label`` its spend series carry, plus the
unpartitioned partition ``""`` (series without the label, or with it empty;
it always exists, so a budget that has no spend yet still has a decision). A
partition is decided by the same chain, with the same limits and ladder, as
the budget would be with one more spend matcher, ``label="value"``: that is
what a partition is, and the spend sums are shared through
:meth:`token_budget.policy.spend.Spend.grouped` (one pass per namespace for
every value, not one per value).

Its directives go only to the governed workloads whose pods carry
``podLabel=value``; governed workloads without ``podLabel`` belong to the
unpartitioned partition. A partition's Block therefore never reaches another
partition's workloads.

Partitions are found in the spend read (every window of the budget's limits),
in the ``podLabel`` values of the governed workloads (every governed workload
is told its partition's state, Ok for a person who has not spent yet; and
while spend cannot be read, each is decided by ``whenSpendUnknown`` rather than
left without a directive), and in the engine's memory (a partition remembered
as not Ok whose series vanished is still decided, so that the silence rule
applies to it as to any scope).

The bounded summary a status shows (:func:`summary`) is pure too: counts, the
``statusTop`` most used partitions and those at or above ``reportAtPercent``
or not Ok (Blocked first, at most :data:`api.PARTITIONS_OVER_SHOWN`).
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from decimal import Decimal
from typing import Any

from token_budget.api import v1alpha1 as api
from token_budget.policy import planner
from token_budget.policy.attribution import governed_by
from token_budget.policy.context import Context
from token_budget.policy.decisions import SEVERITY, Decision
from token_budget.policy.inputs import BudgetKey, ScopeKey, Workload
from token_budget.policy.scope import ScopeInput

Scopes = list[tuple[ScopeKey, tuple[str, ...]]]


def value_of(partition: api.Partition, pod_labels: dict[str, str] | Any) -> str:
    """The partition a pod (template) belongs to: its ``podLabel`` value ("" without it)."""
    value = pod_labels.get(partition.pod_label, "")
    return value if isinstance(value, str) else ""


_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_NOT_IN_LABEL = re.compile(r"[^-A-Za-z0-9_.]")


def label_form(value: str) -> str:
    """The pod label value that names a partition value.

    A value a pod label can hold is itself. Others (an e-mail as ``end_user``, an
    API key alias with spaces, more than 63 characters) have every character a label
    value cannot hold replaced by ``_``, the ends trimmed to a letter or digit and the
    whole cut to 63: ``alice@corp.com`` is ``alice_corp.com``.
    """
    if len(value) <= 63 and _LABEL_VALUE.match(value):
        return value
    form = _NOT_IN_LABEL.sub("_", value)
    form = re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", form)[:63]
    return re.sub(r"[^A-Za-z0-9]+$", "", form)


def describe(partition: api.Partition, value: str) -> str:
    """``user="alice"``, or ``user unset`` for the unpartitioned partition."""
    if value == api.UNPARTITIONED:
        return f"{partition.label} unset"
    return f'{partition.label}="{value}"'


class Partitioner:
    """Partitions of the budgets of one evaluation, and their inputs (made once each)."""

    def __init__(self, context: Context) -> None:
        self.context = context
        self._remembered: dict[tuple[BudgetKey, str], set[str]] | None = None
        self._derived: dict[tuple[int, str], api.Budget] = {}
        self._routed: dict[tuple[int, tuple[str, ...]], dict[str, list[Workload]]] = {}

    def _memory(self, key: BudgetKey, namespace: str) -> set[str]:
        if self._remembered is None:
            found: dict[tuple[BudgetKey, str], set[str]] = {}
            for sk in self.context.world.memory:
                if sk.partition is not None:
                    found.setdefault((sk.budget, sk.namespace), set()).add(sk.partition)
            self._remembered = found
        return self._remembered.get((key, namespace), set())

    def expand(self, budget: api.Budget, listed: Scopes) -> Scopes:
        """Every partition of every scope of a partitioned budget, by value."""
        partition = budget.spec.partition
        assert partition is not None
        spec = budget.spec
        source = self.context.source(spec.source)
        matchers = tuple(spec.spend_matchers)
        labels = planner.needed_labels(spec)
        spends = [w.spend for lim in spec.limits
                  if (w := source.window(lim.window, lim.time_zone, labels)).spend is not None]
        out: Scopes = []
        for scope, namespaces in listed:
            values = {api.UNPARTITIONED} | self._memory(scope.budget, scope.namespace)
            for spend in spends:
                for ns in namespaces:
                    values.update(spend.grouped(ns, matchers, partition.label))
            # A person whose workloads run before they spent: their pod label's value (a
            # value spent under is named by its label form on the pods: not twice).
            named = {label_form(v) for v in values}
            values.update(r for r in self._routed_for(budget, namespaces) if r not in named)
            out.extend((ScopeKey(scope.budget, scope.namespace, v), namespaces)
                       for v in sorted(values))
        return out

    def scope_input(self, budget: api.Budget, scope: ScopeKey, namespaces: tuple[str, ...]
                    ) -> ScopeInput:
        """The input the chain decides a partition from: the budget narrowed to the value
        (one more spend matcher) and the governed workloads whose pods carry it."""
        partition = budget.spec.partition
        value = scope.partition
        assert partition is not None and value is not None
        derived = self._derived.get((id(budget), value))
        if derived is None:
            narrowed = api.SpendMatcher(label=partition.label, value=value)
            spec = budget.spec.model_copy(
                update={"spend_matchers": (*budget.spec.spend_matchers, narrowed)})
            derived = self._derived[(id(budget), value)] = budget.model_copy(
                update={"spec": spec})
        routed = self._routed_for(budget, namespaces)
        s = ScopeInput(derived, scope, namespaces, self.context,
                       routed.get(label_form(value), []))
        if budget.spec.cost_sources or self.context.catalog.cost_sources:
            s.cost_keep = self._cost_owner(budget, namespaces, value)
        return s

    def _cost_owner(self, budget: api.Budget, namespaces: tuple[str, ...], value: str
                    ) -> Callable[[str, str], bool]:
        """Which cost-source series a partition counts: those whose workload label (a pod
        name, as cAdvisor's) belongs to a governed workload carrying its value.

        Cost series carry no partition label: a pod's CPU is its person's through the
        pod's ``podLabel``. A pod is a workload's when its name is the workload's or
        the workload's followed by up to three ``-suffix`` parts (a Deployment's
        ReplicaSet hash and pod suffix, a StatefulSet's ordinal, a CronJob's Job and
        pod suffixes). Series of no labelled workload (shared agents, other pods of
        the namespace) are the unpartitioned partition's.
        """
        owners: dict[tuple[str, str], str] = {}
        for v, workloads in self._routed_for(budget, namespaces).items():
            for w in workloads:
                owners[(w.key.namespace, w.key.name)] = v

        def keep(namespace: str, workload: str) -> bool:
            name = workload
            for _ in range(4):
                found = owners.get((namespace, name))
                if found is not None:
                    return found == label_form(value)
                head, sep, _tail = name.rpartition("-")
                if not sep:
                    break
                name = head
            return value == api.UNPARTITIONED

        return keep

    def _routed_for(self, budget: api.Budget, namespaces: tuple[str, ...]
                    ) -> dict[str, list[Workload]]:
        """The governed workloads of a scope by the value of their ``podLabel``."""
        partition = budget.spec.partition
        assert partition is not None
        routed = self._routed.get((id(budget), namespaces))
        if routed is None:
            by_value: defaultdict[str, list[Workload]] = defaultdict(list)
            for w in governed_by(budget, namespaces, self.context.workloads):
                by_value[value_of(partition, w.pod_labels)].append(w)
            routed = self._routed[(id(budget), namespaces)] = dict(by_value)
        return routed


def named(decision: Decision, partition: api.Partition) -> Decision:
    """The decision of a partition, its message (and its directives') naming the partition."""
    assert decision.scope.partition is not None
    prefix = f"partition {describe(partition, decision.scope.partition)}: "
    return dataclasses.replace(
        decision, message=prefix + decision.message,
        directives={wk: dataclasses.replace(d, message=prefix + d.message)
                    for wk, d in decision.directives.items()})


def _used(d: Decision) -> Decimal:
    w = d.worst_window
    return w.used_percent if w is not None else Decimal(0)


def _entry(d: Decision) -> dict[str, Any]:
    out: dict[str, Any] = {"value": d.scope.partition or ""}
    if d.scope.namespace:
        out["namespace"] = d.scope.namespace
    out["state"] = d.state.value
    out["usedPercent"] = int(_used(d))
    return out


def summary(partition: api.Partition, decisions: Sequence[Decision]) -> dict[str, Any]:
    """``status.partitions``: counts and two bounded lists, whatever the number of partitions.

    ``top``: the ``statusTop`` most used partitions (ties by value). ``over``: every
    partition at or above ``reportAtPercent`` or not Ok, Blocked first, then by
    severity and use, at most :data:`api.PARTITIONS_OVER_SHOWN`.
    """
    by_use = sorted(decisions, key=lambda d: (-_used(d), d.scope.namespace,
                                              d.scope.partition or ""))
    over = [d for d in by_use
            if d.state is not api.State.OK or _used(d) >= partition.report_at_percent]
    over.sort(key=lambda d: -SEVERITY[d.state])  # stable: by use within a state
    return {
        "label": partition.label,
        "count": len(decisions),
        "blocked": sum(1 for d in decisions if d.state is api.State.BLOCKED),
        "restricted": sum(1 for d in decisions if d.state is not api.State.OK),
        "top": [_entry(d) for d in by_use[:partition.status_top]],
        "over": [_entry(d) for d in over[:api.PARTITIONS_OVER_SHOWN]],
        "overCount": len(over),
    }


def own(decisions: Sequence[Decision]) -> list[Decision]:
    """The decisions a partitioned budget's own state comes from: its unpartitioned ones."""
    return [d for d in decisions if d.scope.partition in (None, api.UNPARTITIONED)]


def remembered(status: api.BudgetStatus, key: BudgetKey
               ) -> Iterable[tuple[ScopeKey, api.State, bool]]:
    """The partitions a status lists: their states, and whether they had spend.

    Only a partition that had spend may remember the budget's last spend time: a
    partition listed at 0 % (the unpartitioned one, a person who never spent) whose
    workloads run without series is new, not an exporter gone missing.
    """
    p = status.partitions
    if p is None:
        return []
    return [(ScopeKey(key, e.namespace or "", e.value), e.state, e.used_percent > 0)
            for e in (*p.over, *p.top)]


def state_of(budget: api.Budget, namespace: str, value: str) -> api.State:
    """The state of the partition a pod label ``value`` names, as the budget's status says
    (Ok when not listed; the most severe when several values share a label form)."""
    st = budget.status
    if st is None or st.partitions is None:
        return api.State.OK
    scoped = isinstance(budget, api.ClusterTokenBudget) and \
        budget.spec.limit_scope is api.LimitScope.PER_NAMESPACE
    found = api.State.OK
    for e in (*st.partitions.over, *st.partitions.top):
        if (e.value == value or label_form(e.value) == value) and \
                (not scoped or e.namespace == namespace) and \
                SEVERITY[e.state] > SEVERITY[found]:
            found = e.state
    return found
