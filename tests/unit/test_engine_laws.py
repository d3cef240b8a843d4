"""Laws of the policy engine, checked with hypothesis over generated budgets and spend.

Covers:
- more spend never gives a less restrictive decision, per budget scope and per
  workload (whatever the ladder, limits, hysteresis memory, exceptions and
  cost-per-outcome settings);
- merging directives does not depend on their order, keeps the most
  restrictive state, the lowest rate and the intersection of allowed models;
- the order in which budgets are listed does not change the Evaluation;
- evaluating twice gives the same result (no hidden state);
- an expired exception changes nothing compared to no exception at all;
- silence (series gone with their pods) decides as zero spend; an outage (a target
  down, pods running without series) is never read as zero.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from token_budget.api import v1alpha1 as api
from token_budget.policy import engine
from token_budget.policy.decisions import SEVERITY, Directive, Evaluation, merge
from token_budget.policy.inputs import SpendSeries
from unit import builders as b
from unit.builders import NOW

LAWS = settings(max_examples=200, deadline=None)
MODELS = ["large", "medium", "tiny", "vendor/large-2025-01", "mystery-9"]
WORKLOADS = [b.workload("agent"), b.workload("other"), b.workload("coder", models=["large"]),
             b.workload("web", labels={"app": "web"})]


@st.composite
def ladders(draw: st.DrawFn) -> list[dict[str, Any]]:
    percents = draw(st.lists(st.integers(1, 200), min_size=1, max_size=4, unique=True))
    out = []
    for percent in sorted(percents):
        action: dict[str, Any] = {"type": draw(st.sampled_from(list(api.ActionType))).value,
                                  "atPercent": percent}
        if action["type"] == "Throttle" and draw(st.booleans()):
            action["tokensPerMinute"] = draw(st.integers(1, 10_000))
        if action["type"] == "Reroute" and draw(st.booleans()):
            action["model"] = draw(st.sampled_from(["medium", "tiny"]))
        out.append(action)
    return out


@st.composite
def limits(draw: st.DrawFn) -> dict[str, Any]:
    limit: dict[str, Any] = {"window": draw(st.sampled_from(["24h", "7d", "Day", "Month"]))}
    kind = draw(st.sampled_from(["tokens", "cost", "both"]))
    if kind in ("tokens", "both"):
        limit["tokens"] = draw(st.integers(1, 5_000_000))
    if kind in ("cost", "both"):
        limit["cost"] = f"{draw(st.integers(1, 10_000))}.{draw(st.integers(0, 99)):02d}"
    if draw(st.booleans()):
        limit["model"] = draw(st.sampled_from(["large", "t*"]))
    return limit


def exceptions(live: bool) -> st.SearchStrategy[dict[str, Any]]:
    hours = st.integers(1, 72).map(lambda h: h if live else -h + 1)  # expired: until <= now
    return st.builds(
        lambda h, cap: {"until": (NOW + dt.timedelta(hours=h)).isoformat(),
                        "reason": "generated", "maxAction": cap},
        hours, st.sampled_from([a.value for a in api.ActionType]))


@st.composite
def budget_fields(draw: st.DrawFn, live_exceptions: bool = True) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "limits": draw(st.lists(limits(), min_size=1, max_size=3,
                                unique_by=lambda lim: (lim["window"], lim.get("model")))),
        "actions": draw(ladders()),
        "hysteresisPercent": draw(st.integers(0, 50)),
        "deniedTiers": draw(st.lists(st.sampled_from(["Frontier", "Economy"]), unique=True)),
        "exceptions": draw(st.lists(exceptions(live_exceptions), max_size=2)),
    }
    if draw(st.booleans()):
        fields["outcome"] = {"metric": "agent_outcomes_total", "window": "24h",
                             "maxCostPerOutcome": "0.01",
                             "onExceeded": draw(st.sampled_from([a.value for a in api.ActionType]))}
    return fields


@st.composite
def budgets(draw: st.DrawFn) -> list[api.TokenBudget]:
    fields = draw(st.lists(budget_fields(), min_size=1, max_size=3))
    return [b.token_budget(f"budget-{i}", **f) for i, f in enumerate(fields)]


spend_rows = st.lists(
    st.tuples(st.sampled_from(["agent-0", "other-0", "coder-0"]), st.sampled_from(MODELS),
              st.integers(0, 4_000_000), st.integers(0, 4_000_000)),
    min_size=1, max_size=5,
)


def _series(rows: list[tuple[str, str, int, int]]) -> list[SpendSeries]:
    return [b.series(inp, output=out, workload=w, model=m) for w, m, inp, out in rows]


def _memory(budgets_: list[api.TokenBudget], states: list[api.State | None]
            ) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for budget, state in zip(budgets_, states, strict=False):
        if state is not None:
            out.update(b.memory(budget, state))
    return out


def _outcomes(budgets_: list[api.TokenBudget]) -> dict[str, Any]:
    return {engine.outcome_key(x.spec.outcome): [(b.NAMESPACE, (), 1000.0)]
            for x in budgets_ if x.spec.outcome is not None}


def _run(budgets_: list[api.TokenBudget], spend: list[SpendSeries],
         memory: dict[Any, Any] | None = None, now: dt.datetime = NOW) -> Evaluation:
    return b.evaluate(budgets_, spend, workloads=WORKLOADS, remembered=memory, now=now,
                      outcomes=_outcomes(budgets_))


# ---------------------------------------------------------------------------
# More spend is never more lenient
# ---------------------------------------------------------------------------


@LAWS
@given(budgets_=budgets(), rows=spend_rows,
       more=st.lists(st.integers(0, 4_000_000), min_size=5, max_size=5),
       states=st.lists(st.none() | st.sampled_from(list(api.State)), max_size=3))
def test_more_spend_never_gives_a_less_restrictive_decision(
        budgets_: list[api.TokenBudget], rows: list[tuple[str, str, int, int]], more: list[int],
        states: list[api.State | None]) -> None:
    memory = _memory(budgets_, states)
    less = _run(budgets_, _series(rows), memory)
    grown = [(w, m, inp + extra, out) for (w, m, inp, out), extra in zip(rows, more, strict=False)]
    more_spend = _run(budgets_, _series(grown), memory)

    before = {d.scope: SEVERITY[d.state] for d in less.decisions}
    after = {d.scope: SEVERITY[d.state] for d in more_spend.decisions}
    assert before.keys() == after.keys()
    assert all(after[s] >= before[s] for s in before), (before, after)

    assert less.directives.keys() == more_spend.directives.keys()
    for key, directive in less.directives.items():
        assert more_spend.directives[key].severity >= directive.severity, key


# ---------------------------------------------------------------------------
# Merging
# ---------------------------------------------------------------------------

directives = st.builds(
    Directive,
    state=st.sampled_from(list(api.State)),
    budget=st.sampled_from(["TokenBudget/a/x", "TokenBudget/b/y", "ClusterTokenBudget/z"]),
    reason=st.sampled_from(["LimitReached", "Hysteresis", "ExceptionActive"]),
    message=st.sampled_from(["", "m1", "m2"]),
    model=st.none() | st.sampled_from(["medium", "tiny"]),
    allowed_models=st.none() | st.frozensets(st.sampled_from(["large", "medium", "tiny"])),
    tokens_per_minute=st.none() | st.integers(1, 5000),
)


@LAWS
@given(st.lists(directives, max_size=6).flatmap(lambda ds: st.tuples(st.just(ds),
                                                                      st.permutations(ds))))
def test_merging_directives_does_not_depend_on_their_order(
        pair: tuple[list[Directive], list[Directive]]) -> None:
    listed, shuffled = pair
    assert merge(listed) == merge(shuffled)


@LAWS
@given(st.lists(directives, min_size=1, max_size=6))
def test_a_merged_directive_keeps_every_constraint(listed: list[Directive]) -> None:
    merged = merge(listed)
    assert merged.severity == max(d.severity for d in listed)
    rates = [d.tokens_per_minute for d in listed if d.tokens_per_minute is not None]
    assert merged.tokens_per_minute == (min(rates) if rates else None)
    lists = [d.allowed_models for d in listed if d.allowed_models is not None]
    assert merged.allowed_models == (frozenset.intersection(*lists) if lists else None)
    assert any((d.state, d.budget, d.reason, d.message)
               == (merged.state, merged.budget, merged.reason, merged.message) for d in listed)


@LAWS
@given(budgets_=budgets().flatmap(lambda bs: st.tuples(st.just(bs), st.permutations(bs))),
       rows=spend_rows)
def test_the_order_of_budgets_does_not_change_the_evaluation(
        budgets_: tuple[list[api.TokenBudget], list[api.TokenBudget]],
        rows: list[tuple[str, str, int, int]]) -> None:
    listed, shuffled = budgets_
    assert _run(listed, _series(rows)) == _run(shuffled, _series(rows))


# ---------------------------------------------------------------------------
# No hidden state, no ghosts of expired exceptions
# ---------------------------------------------------------------------------


@LAWS
@given(budgets_=budgets(), rows=spend_rows,
       states=st.lists(st.none() | st.sampled_from(list(api.State)), max_size=3))
def test_evaluating_twice_gives_the_same_result(budgets_: list[api.TokenBudget],
                                                rows: list[tuple[str, str, int, int]],
                                                states: list[api.State | None]) -> None:
    world = engine.World(budgets=budgets_, catalog=b.catalog(), namespaces={b.NAMESPACE: {}},
                         workloads=WORKLOADS, memory=_memory(budgets_, states))
    snap = b.snapshot(budgets_, _series(rows), outcomes=_outcomes(budgets_))
    assert engine.evaluate(world, snap, NOW) == engine.evaluate(world, snap, NOW)


@LAWS
@given(fields=budget_fields(live_exceptions=False), rows=spend_rows,
       state=st.none() | st.sampled_from(list(api.State)))
def test_an_expired_exception_changes_nothing(fields: dict[str, Any],
                                              rows: list[tuple[str, str, int, int]],
                                              state: api.State | None) -> None:
    with_expired = [b.token_budget(**fields)]
    without = [b.token_budget(**{**fields, "exceptions": []})]
    assert _run(with_expired, _series(rows), _memory(with_expired, [state])) == \
        _run(without, _series(rows), _memory(without, [state]))


# ---------------------------------------------------------------------------
# Silence is zero; an outage is never read as zero (issue 12)
# ---------------------------------------------------------------------------

POLICIES = st.sampled_from(["Hold", "FailOpen", "FailClosed"])


def _with_policy(budgets_: list[api.TokenBudget], policy: str) -> list[api.TokenBudget]:
    unknown = api.WhenSpendUnknown(policy=api.MissingDataPolicy(policy))
    return [x.model_copy(update={"spec": x.spec.model_copy(
        update={"when_spend_unknown": unknown})}) for x in budgets_]


@LAWS
@given(budgets_=budgets(), policy=POLICIES,
       states=st.lists(st.sampled_from(list(api.State)), min_size=3, max_size=3),
       ago=st.integers(0, 86_400))
def test_silence_after_the_pods_are_gone_is_what_no_spend_at_all_gives(
        budgets_: list[api.TokenBudget], policy: str, states: list[api.State],
        ago: int) -> None:
    """Series that existed and went away with their pods decide as zero spend would:
    no budget stays blocked on an empty answer once the agents are gone."""
    budgets_ = _with_policy(budgets_, policy)
    memory: dict[Any, Any] = {}
    for budget, state in zip(budgets_, states, strict=False):
        memory.update(b.memory(budget, state, seconds_ago=ago))
    silent = b.evaluate(budgets_, [], workloads=WORKLOADS, remembered=memory, now=NOW,
                        outcomes=_outcomes(budgets_))
    zero = _run(budgets_, [b.series(0, workload="agent-0", model="large")], memory)
    for d in silent.decisions:
        assert d.spend_known, d.message
        same = next(z for z in zero.decisions if z.scope == d.scope)
        assert (d.state, d.windows and d.windows[0].used_percent) == \
            (same.state, same.windows and same.windows[0].used_percent)


@LAWS
@given(budgets_=budgets(), policy=POLICIES, rows=spend_rows,
       state=st.sampled_from(list(api.State)), pods=st.integers(1, 5),
       cause=st.sampled_from(["target down", "pods run without series"]))
def test_an_outage_is_never_read_as_zero(
        budgets_: list[api.TokenBudget], policy: str, rows: list[tuple[str, str, int, int]],
        state: api.State, pods: int, cause: str) -> None:
    budgets_ = _with_policy(budgets_, policy)
    memory: dict[Any, Any] = {}
    for budget in budgets_:
        memory.update(b.memory(budget, state, seconds_ago=60))
    counters = next(iter(b.snapshot(budgets_).recent))
    if cause == "target down":
        result = b.evaluate(budgets_, _series(rows), workloads=WORKLOADS, remembered=memory,
                            down={counters: {b.NAMESPACE: "scrape target(s) down"}})
    else:
        running = [b.workload(w.key.name, labels=dict(w.pod_labels), pods=pods)
                   for w in WORKLOADS]
        result = b.evaluate(budgets_, [], workloads=running, remembered=memory)
    for d in result.decisions:
        if cause == "pods run without series" and not d.workloads:
            continue  # governing no pod, its silence is not contradicted by anything
        assert not d.spend_known, (cause, d.message)
