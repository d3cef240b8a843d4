"""The policy engine: budgets + catalog + spend snapshot + workloads + now -> decisions.

Pure. No clock is read (``now`` is an argument), nothing is fetched, nothing
is written, so every law is tested without a cluster (tests/unit).

One evaluation, per budget scope (a TokenBudget; a Shared ClusterTokenBudget;
each namespace of a PerNamespace ClusterTokenBudget), as the modules of
``token_budget.policy`` split it, one idea each::

    world        budgets, namespaces (indexed by label) -> scopes
    attribution  the workloads each scope governs; spend no governed workload explains
    pricing      series -> tokens and exact cost (integers, the Decimal to the digit)
    spend        series of one (source, window) by namespace, one sum per question
    context      what one evaluation works out once and every scope reads
    usage        spend per limit -> used %, run-out forecast
    ladders      used % -> the rung of the ladder
    checks       the decision chain: missing data -> ladder -> hysteresis -> outcome
                 -> exception cap -> state -> dry run, each check a Reason
    directives   the actions in effect -> what each governed workload is told
    reuse        what of the previous evaluation still holds (``previous=``)
    partitions   spec.partition: a scope per value of a label, told by a pod label
    engine       this facade: every scope decided, directives merged per workload

Then every workload's directives from all the scopes that govern it are merged
(:func:`token_budget.policy.decisions.merge`): the most restrictive wins.

Decisions worth knowing:

* Spend is "unknown" when its source failed *or* when no series at all exists
  for the scope in any window: an outage or a missing exporter must never look
  like an idle workload. ``whenSpendUnknown`` then decides (Hold keeps the
  last state and leaves workloads untouched until ``staleAfterSeconds``).
* The ladder is cumulative: at Throttle, a Reroute below it still applies.
* A lower rung is taken back only when spend is ``hysteresisPercent`` points
  below the rung's threshold.

Every shortcut gives the same decisions to the last digit (tests/unit/
test_engine_index.py holds each to the plain computation).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections import defaultdict
from decimal import Decimal

from token_budget.api import v1alpha1 as api
from token_budget.api.conditions import Reason
from token_budget.policy import checks, costs, partitions, planner, reuse
from token_budget.policy.attribution import (
    UNGOVERNED_SHOWN,
    governed_by,
    mandatory,
    mandatory_namespaces,
    ungoverned,
)
from token_budget.policy.context import Context
from token_budget.policy.decisions import Decision, Directive, Evaluation, ScopeSpend, merge
from token_budget.policy.inputs import SpendSnapshot, WorkloadKey
from token_budget.policy.ladders import describe
from token_budget.policy.matchers import OPERATORS, series_matches
from token_budget.policy.model_rules import allowed_models, cheapest_equivalent, model_allowed
from token_budget.policy.outcomes import outcome_count, outcome_key, per_outcome
from token_budget.policy.planner import OutcomeQuery
from token_budget.policy.scope import ScopeInput
from token_budget.policy.windows import WindowKey
from token_budget.policy.world import NamespaceIndex, World, scopes

__all__ = [
    "UNGOVERNED_SHOWN", "NamespaceIndex", "World", "allowed_models", "cheapest_equivalent",
    "describe", "evaluate", "governed_by", "mandatory", "mandatory_namespaces",
    "model_allowed", "outcome_key", "scope_spend", "scopes", "series_matches", "ungoverned",
]


def evaluate(world: World, snapshot: SpendSnapshot, now: dt.datetime,
             previous: Evaluation | None = None) -> Evaluation:
    """Decide every budget scope and merge the directives per workload.

    Args:
        world: budgets, catalog, namespaces with labels, workloads, memory.
        snapshot: spend read for the plan of the same budgets.
        now: the time of evaluation (never read from a clock here).
        previous: the last evaluation, if any: decisions whose inputs are all the
            same are taken over, and spend of unchanged namespaces is not summed
            again (:mod:`token_budget.policy.reuse`). The result is the same as
            without it, to the digit.

    Returns:
        One decision per scope (sorted) and one merged directive per governed
        workload. Workloads governed only by dry-run or held scopes get none;
        :attr:`Evaluation.held` lists those that must be left as they are.
    """
    memo = previous.memo if previous is not None else None
    if not isinstance(memo, reuse.Memo) or not reuse.usable(memo, world, snapshot):
        memo = None
    context = Context(world, snapshot, now, memo.context if memo is not None else None)
    again = reuse.Reuse(memo, world, snapshot, now, context) if memo is not None else None
    kept = reuse.Memo(world, snapshot, now, context)
    partitioner = partitions.Partitioner(context)
    decisions: list[Decision] = []
    held: set[WorkloadKey] = set()
    # The same budgets, in the same order, with the same scopes: the same order of decisions.
    same_order = again is not None and again.same_namespaces and \
        len(world.budgets) == len(again.memo.entries)
    for p, budget in enumerate(world.budgets):
        old = again.entry(budget) if again is not None else None
        if same_order and again is not None and old is not again.memo.entries[p]:
            same_order = False
        if old is None:
            listed = scopes(budget, context.namespaces)
            rs = context.source(budget.spec.source).rs
        else:
            listed = old.scopes if again is not None and again.same_namespaces \
                else scopes(budget, context.namespaces)
            rs = old.rs
        partition = budget.spec.partition
        if partition is not None:  # the partitions depend on the spend read: found anew
            listed = partitioner.expand(budget, scopes(budget, context.namespaces))
            if old is not None and listed == old.scopes:
                listed = old.scopes
            else:
                same_order = False  # other partitions: other decisions to merge
        entry = reuse.Entry(budget, listed, rs, old)
        kept.entries.append(entry)
        by_scope = None if old is None or listed is old.scopes else {
            sk: (ns, k) for (sk, ns), k in zip(old.scopes, old.kept, strict=True)}
        for i, (scope, namespaces) in enumerate(listed):
            was: reuse.Kept | None = None
            if old is not None and again is not None:
                if by_scope is None:
                    was = old.kept[i]
                else:
                    ns_was, was = by_scope.get(scope, ((), None))
                    was = was if ns_was == namespaces else None
                if was is not None and not again.holds(was, entry, scope, namespaces, rs):
                    was = None
            if was is None:
                if partition is not None:
                    s = partitioner.scope_input(budget, scope, namespaces)
                    decision = partitions.named(checks.decide(s), partition)
                else:
                    governed = governed_by(budget, namespaces, context.workloads)
                    s = ScopeInput(budget, scope, namespaces, context, governed)
                    decision = checks.decide(s)
                if decision.spend_known and not decision.series_seen and \
                        (partition is None or len(listed) == 1):
                    decision = _explain_unseen(decision, budget, context)
                was = reuse.Kept(decision, s.timed)
            else:
                decision = was.decision
            entry.kept.append(was)
            decisions.append(decision)
            if not decision.dry_run and decision.reason is Reason.SPEND_UNKNOWN_HOLDING:
                held.update(decision.workloads)
    if same_order and memo is not None:
        per_workload, merged = _patched(memo, decisions, held)
    else:
        per_workload, merged = _merged(memo, decisions, held)
    kept.loop, kept.held = decisions, held
    kept.per_workload, kept.merged = per_workload, merged
    if same_order and again is not None:
        kept.order = again.memo.order
    else:
        kept.order = sorted(range(len(decisions)),
                            key=list(map(_scope_order, decisions)).__getitem__)
    return Evaluation(decisions=tuple([decisions[i] for i in kept.order]), directives=merged,
                      held=frozenset(held), memo=kept)


_Told = dict[WorkloadKey, list[Directive]]


def _merged(memo: reuse.Memo | None, decisions: list[Decision], held: set[WorkloadKey]
            ) -> tuple[_Told, dict[WorkloadKey, Directive]]:
    """Every workload's directives, from every scope that governs it, merged."""
    per_workload: defaultdict[WorkloadKey, list[Directive]] = defaultdict(list)
    for decision in decisions:
        if not decision.dry_run:
            for wk, directive in decision.directives.items():
                per_workload[wk].append(directive)
    merged = {}
    old_told = memo.per_workload if memo is not None else {}
    old_merged = memo.merged if memo is not None else {}
    for wk, told in per_workload.items():
        if held and wk in held:
            continue
        m = old_merged.get(wk) if old_told.get(wk) == told else None  # the same, in order
        merged[wk] = m if m is not None else merge(told)
    return dict(per_workload), merged


def _patched(memo: reuse.Memo, decisions: list[Decision], held: set[WorkloadKey]
             ) -> tuple[_Told, dict[WorkloadKey, Directive]]:
    """:func:`_merged` for decisions in the previous evaluation's order, most of them its
    very objects: only workloads a changed decision tells (or told) are merged again.
    The lists may hold their directives in another order: merging does not depend on it."""
    per_workload = memo.per_workload.copy()
    dirty: set[WorkloadKey] = set()
    for was, now in zip(memo.loop, decisions, strict=True):
        if was is now:
            continue
        if not was.dry_run:
            for wk, directive in was.directives.items():
                per_workload[wk] = [d for d in per_workload[wk] if d is not directive]
                dirty.add(wk)
        if not now.dry_run:
            for wk, directive in now.directives.items():
                per_workload[wk] = [*per_workload.get(wk, ()), directive]
                dirty.add(wk)
    merged = memo.merged.copy()
    for wk in dirty | (held ^ memo.held):
        told = per_workload.get(wk)
        if not told:
            per_workload.pop(wk, None)
            merged.pop(wk, None)
        elif wk in held:
            merged.pop(wk, None)
        else:
            merged[wk] = merge(told)
    return per_workload, merged


def _scope_order(d: Decision) -> tuple[str, str, str, str, str]:
    # ScopeKey's own order, as a plain tuple: dataclass comparisons build tuples per call.
    b = d.scope.budget
    return (b.kind, b.namespace, b.name, d.scope.namespace, d.scope.partition or "")


def scope_spend(world: World, snapshot: SpendSnapshot, now: dt.datetime,
                key: WindowKey) -> list[ScopeSpend]:
    """What every budget scope spent over one window, summed as its decision sums it.

    The reading ``tokenbudget report`` shows: the snapshot's series of the
    budget's source over ``key``, picked by the scope's namespaces and every
    spend matcher (Equal, NotEqual, Regex, NotRegex), summed and priced as
    :func:`evaluate` sums and prices them; outcomes under the outcome's
    matchers over the same window, and the cost per outcome from both.

    Args:
        world: budgets, catalog, namespaces (workloads and memory are unused).
        snapshot: spend read for :func:`token_budget.policy.planner.report_plan`
            over ``key``; a source missing from it counts as zero spend.
        now: the time the snapshot was taken at.
        key: the window every scope is summed over.
    """
    context = Context(world, snapshot, now)
    out = []
    for budget in world.budgets:
        spend = context.spend(context.source(budget.spec.source).rs, key)
        o = budget.spec.outcome
        outcomes = (OutcomeQuery.key_of(o.metric, o.namespace_label, key)
                    if o is not None else None)
        for scope, namespaces in scopes(budget, context.namespaces):
            tokens, cost = 0.0, Decimal(0)
            if spend is not None:
                part = spend.total(namespaces, budget.spec.spend_matchers, None)
                tokens, cost = part.tokens, part.cost
            by_kind = costs.scope_breakdown(budget.spec, context.catalog, context.costs, key,
                                            namespaces, cost)
            if by_kind:
                cost = sum((v for _, _, v in by_kind), Decimal(0))
            count = None
            if o is not None and outcomes is not None:
                count = outcome_count(context, o, outcomes, namespaces)
            out.append(ScopeSpend(scope=scope, namespaces=namespaces, tokens=tokens, cost=cost,
                                  outcomes=count, cost_per_outcome=per_outcome(cost, count),
                                  by_kind=by_kind))
    return out


_OPERATORS = {api.MatchOperator.EQUAL: "=", api.MatchOperator.NOT_EQUAL: "!=",
              api.MatchOperator.REGEX: "=~", api.MatchOperator.NOT_REGEX: "!~"}


def _explain_unseen(decision: Decision, budget: api.Budget, context: Context) -> Decision:
    """The decision, saying why its scope saw no series when the source returned some.

    Without it a source whose labels never name the scope's namespaces (the
    LiteLLM preset where ``team_alias`` is not the namespace) reads as a scope
    that has not spent yet, forever.
    """
    source = context.source(budget.spec.source)
    rs = source.rs
    sample = context.snapshot.returned.get(rs)
    if sample is None or not sample.series:
        return decision
    namespaces = decision.namespaces
    where = (f"namespace {namespaces[0]}" if len(namespaces) == 1
             else f"any of the namespaces {', '.join(namespaces)}")
    matchers = budget.spec.spend_matchers
    if matchers:
        inside: set[tuple[str, str, str]] = set()
        for lim in budget.spec.limits:
            spend = source.window(lim.window, lim.time_zone,
                                   planner.needed_labels(budget.spec)).spend
            if spend is not None:
                inside.update((s.namespace, s.workload, s.model)
                              for ns in namespaces for s in spend.by_ns.get(ns, ()))
        if inside:
            wanted = ", ".join(f'{m.label}{OPERATORS[m.operator]}"{m.value}"' for m in matchers)
            return dataclasses.replace(decision, unmatched=(
                f"the {rs.preset} source returned {len(inside)} series for {where}; none "
                f"satisfies the spendMatchers {wanted}"))
    values = ", ".join(v or '""' for v in sample.values)
    if sample.more:
        values += f" and {sample.more} more"
    many = len(sample.values) + sample.more > 1
    return dataclasses.replace(decision, unmatched=(
        f"the {rs.preset} source returned {sample.series} series, their {sample.label} "
        f"{'values are' if many else 'value is'} {values}; none names {where}"))
