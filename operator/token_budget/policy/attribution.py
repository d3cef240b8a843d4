"""Which workloads a scope governs, and which of its spend no governed workload accounts for."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from token_budget.api import v1alpha1 as api
from token_budget.policy.inputs import SpendSeries, Workload
from token_budget.policy.pricing import Part
from token_budget.policy.world import NamespaceIndex, scopes


def mandatory(budget: api.Budget) -> bool:
    """Whether a budget governs every workload of its namespaces, whatever their labels."""
    return isinstance(budget, api.ClusterTokenBudget) and \
        budget.spec.enrolment is api.Enrolment.MANDATORY


def mandatory_namespaces(budgets: Iterable[api.Budget],
                         namespaces: Mapping[str, Mapping[str, str]]) -> frozenset[str]:
    """Namespaces where enrolment is mandatory: picked by a Mandatory ClusterTokenBudget,
    or labelled ``tokenbudget.io/enrolment=Mandatory`` (a label only an admin can set)."""
    out = {ns for ns, labels in namespaces.items()
           if labels.get(api.ENROLMENT_LABEL) == api.Enrolment.MANDATORY.value}
    index: NamespaceIndex | None = None
    for b in budgets:
        if mandatory(b):
            index = index or NamespaceIndex(namespaces)
            for _, picked in scopes(b, index):
                out.update(picked)
    return frozenset(out)


def governed_by(budget: api.Budget, namespaces: Iterable[str],
                by_ns: Mapping[str, list[Workload]]) -> list[Workload]:
    if mandatory(budget):
        return [w for ns in namespaces for w in by_ns.get(ns, ())]
    sel = budget.spec.selector
    return [w for ns in namespaces for w in by_ns.get(ns, ()) if sel.matches(w.pod_labels)]


#: Ungoverned workload labels a decision names (the count says how many there are).
UNGOVERNED_SHOWN = 20


def ungoverned(series: Iterable[SpendSeries], governed: Iterable[Workload]
               ) -> tuple[tuple[str, ...], int]:
    """Workload labels of spend series that belong to no governed workload.

    A series belongs to a governed workload when its workload label is the
    workload's name, one of the pods the operator listed for it, or, for a
    pod it has not listed (not yet, or no longer), its name followed by ``-``
    (pod names begin with their workload's). Series without a workload label
    cannot be attributed and are left out, and so are series that spent
    nothing in the window.

    Returns:
        Up to :data:`UNGOVERNED_SHOWN` sorted ``namespace/label`` strings, and
        how many there are in all.
    """
    found = _strays(series, governed)
    return tuple(found[:UNGOVERNED_SHOWN]), len(found)


def _strays(series: Iterable[SpendSeries], governed: Iterable[Workload]) -> list[str]:
    """Every ``namespace/label`` :func:`ungoverned` finds, sorted."""
    known: dict[str, set[str]] = {}  # per namespace: labels that belong to a governed one
    for w in governed:
        known.setdefault(w.key.namespace, set()).update((w.key.name, *w.pods))
    strays: dict[str, set[str]] = {}  # per namespace: labels judged ungoverned
    for s in series:
        label = s.workload
        if not label:
            continue  # cannot be attributed
        names = known.get(s.namespace)
        if names is None:
            names = known[s.namespace] = set()
        if label in names or label in strays.get(s.namespace, ()) \
                or not (s.tokens > 0 or s.cost):
            continue  # governed, judged already, or nothing spent in the window
        # Each prefix of the label at a "-": a pod of workload "a-b" is "a-b-<hash>-<x>".
        cut = label.find("-")
        while cut >= 0 and label[:cut] not in names:
            cut = label.find("-", cut + 1)
        if cut < 0:
            strays.setdefault(s.namespace, set()).add(label)
        else:
            names.add(label)  # its other series (models, windows) are known at once
    return sorted(f"{ns}/{label}" for ns, labels in strays.items() for label in labels)


class Ungoverned:
    """:func:`ungoverned` of spend parts, judged once per namespace in an evaluation.

    Labels are judged per namespace (a namespace's series against its governed
    workloads), so a part's are those of each namespace it joins: a TokenBudget, a
    PerNamespace ClusterTokenBudget over the same namespace and a Shared one over
    several judge each namespace's series once between them when they govern the
    same workloads. At 10,000 budgets x 100,000 series (bench/engine_bench.py): 14,000
    judgements -> 9,700; the evaluation 0.96-1.0x of the same one judging every scope
    (same process, alternating, load 2.7): a miss costs a key, so it pays little.
    """

    def __init__(self) -> None:
        # By the ids of a one-namespace part and of the workloads governed there; the
        # entry holds them, so that no id is reused while it is kept.
        self._found: dict[tuple[int, ...], tuple[Part, list[Workload], list[str]]] = {}

    def of(self, part: Part | None, governed: Sequence[Workload]
           ) -> tuple[tuple[str, ...], int]:
        """What :func:`ungoverned` says of the part's series and the governed workloads."""
        if part is None:
            return (), 0
        pieces = part.pieces
        if pieces is None:  # one namespace's series: the scope's, and so its workloads
            key = (id(part), *map(id, governed))
            kept = self._found.get(key)
            if kept is None:
                kept = self._found[key] = (part, list(governed), _strays(part.series, governed))
            return tuple(kept[2][:UNGOVERNED_SHOWN]), len(kept[2])
        found: list[str] = []
        for piece in pieces:
            if not piece.series:
                continue
            ns = piece.series[0].namespace
            here = [w for w in governed if w.key.namespace == ns]
            key = (id(piece), *map(id, here))
            kept = self._found.get(key)
            if kept is None:
                kept = self._found[key] = (piece, here, _strays(piece.series, here))
            found += kept[2]
        found.sort()
        return tuple(found[:UNGOVERNED_SHOWN]), len(found)
