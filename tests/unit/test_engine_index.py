"""The engine's per-evaluation indexes, checked against the plain way of computing the same.

The engine no longer tests every namespace against every ClusterTokenBudget,
nor adds up and prices every series for every budget: it indexes namespaces by
label and sums spend once per (window, namespace, spend matchers, model), in
integers. These tests hold each shortcut to the straightforward computation it
replaces, on generated inputs, where the scenario tests (test_engine.py) and
the laws (test_engine_laws.py) would not notice a wrong shortcut.

Covers:
- ``NamespaceIndex.select`` against ``LabelSelector.matches`` on every namespace,
  for matchLabels and In / NotIn / Exists / DoesNotExist, keys nobody has, and
  the empty selector; ``scopes`` the same with the index as with the labels;
- namespaces whose labels change between evaluations (the index is rebuilt);
- spend per window against a sum made series by series in snapshot order with
  :meth:`Catalog.cost`: the same tokens, the same Decimal down to its exponent
  (``str``), the same unpriced models; for TokenBudgets, Shared and
  PerNamespace ClusterTokenBudgets, spend matchers, per-model limits, costs the
  source reports itself, prices of every shape and sums too big for an exact
  integer shortcut;
- ungoverned spend per scope against :func:`engine.ungoverned` over the scope's
  series and governed workloads, for budgets of every kind governing other
  workloads in the same namespaces (labels are judged once per namespace and
  shared), more stray labels than a decision names, namespaces whose names sort
  apart from their labels;
- ``merge`` of directives that tie on everything but their allowed models, and
  of a single directive (which skips the merge);
- the quicker ``__init__`` of the value types: same arguments and defaults.
"""

from __future__ import annotations

import dataclasses
import inspect
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from token_budget.api import v1alpha1 as api
from token_budget.api.types import LabelSelector, SelectorOperator, pattern_matches
from token_budget.policy import engine, inputs
from token_budget.policy.catalog import Catalog
from token_budget.policy.decisions import (
    Decision,
    Directive,
    Evaluation,
    WindowUsage,
    merge,
)
from token_budget.policy.inputs import SpendSeries
from unit import builders as b
from unit.builders import NOW

INDEX = settings(max_examples=300, deadline=None)
NAMESPACES = ["ns-a", "ns-b", "ns-c", "ns-d", "ns-e"]
KEYS = ["env", "team", "tier"]
VALUES = ["x", "y", "z"]


# ---------------------------------------------------------------------------
# Namespaces by label
# ---------------------------------------------------------------------------

labels_of_namespaces = st.dictionaries(
    st.sampled_from(NAMESPACES),
    st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES), max_size=3),
)


@st.composite
def selectors(draw: st.DrawFn) -> LabelSelector:
    expressions = []
    for _ in range(draw(st.integers(0, 3))):
        operator = draw(st.sampled_from(list(SelectorOperator)))
        values: tuple[str, ...] = ()
        if operator in (SelectorOperator.IN, SelectorOperator.NOT_IN):
            values = tuple(draw(st.lists(st.sampled_from([*VALUES, "w"]), min_size=1,
                                         max_size=3)))
        expressions.append({"key": draw(st.sampled_from([*KEYS, "nobody-has-it"])),
                            "operator": operator.value, "values": values})
    return LabelSelector.model_validate({
        "matchLabels": draw(st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES),
                                            max_size=2)),
        "matchExpressions": expressions,
    })


@INDEX
@given(namespaces=labels_of_namespaces, selector=selectors())
def test_the_namespace_index_picks_what_the_selector_matches(
        namespaces: dict[str, dict[str, str]], selector: LabelSelector) -> None:
    expected = tuple(sorted(n for n, labels in namespaces.items() if selector.matches(labels)))
    assert engine.NamespaceIndex(namespaces).select(selector) == expected


@INDEX
@given(namespaces=labels_of_namespaces, selector=selectors(),
       scope=st.sampled_from(list(api.LimitScope)))
def test_scopes_are_the_same_with_the_index_as_with_the_labels(
        namespaces: dict[str, dict[str, str]], selector: LabelSelector,
        scope: api.LimitScope) -> None:
    budget = b.cluster_budget(scope=scope.value)
    budget = budget.model_copy(update={"spec": budget.spec.model_copy(
        update={"namespace_selector": selector})})
    assert engine.scopes(budget, engine.NamespaceIndex(namespaces)) == \
        engine.scopes(budget, namespaces)


def test_a_namespace_whose_labels_change_moves_in_and_out_of_an_expression_selector() -> None:
    budget = api.ClusterTokenBudget.model_validate({
        "apiVersion": api.API_VERSION, "kind": "ClusterTokenBudget",
        "metadata": {"name": "non-prod", "generation": 1},
        "spec": {**b.spec(), "limitScope": "PerNamespace", "namespaceSelector": {
            "matchExpressions": [{"key": "environment", "operator": "NotIn", "values": ["prod"]},
                                 {"key": "team", "operator": "Exists"}]}},
    })
    before = {"a": {"environment": "qa", "team": "x"}, "b": {"environment": "prod", "team": "y"},
              "c": {"environment": "dev"}}
    after = {"a": {"environment": "prod", "team": "x"}, "b": {"environment": "qa", "team": "y"},
             "c": {"environment": "dev", "team": "z"}}
    workloads = [b.workload(namespace=n) for n in before]

    def picked(namespaces: dict[str, dict[str, str]]) -> list[tuple[str, ...]]:
        result = b.evaluate([budget], namespaces=namespaces, workloads=workloads)
        return [d.namespaces for d in result.decisions]

    assert picked(before) == [("a",)]
    assert picked(after) == [("b",), ("c",)]


# ---------------------------------------------------------------------------
# Spend sums
# ---------------------------------------------------------------------------

# Prices of every shape: exponents from +1 to -9, zero, the largest Money allows.
PRICES = ["10.00", "1", "0.125", "3.0", "0.000000001", "0", "2.50", "999999999999.999999999"]
MODELS = ["large", "medium", "tiny", "vendor/large-2025", "mystery"]


@st.composite
def catalogs(draw: st.DrawFn) -> Catalog:
    models = []
    for name, tier in [("large", "Frontier"), ("medium", "Standard"), ("tiny", "Economy")]:
        pricing: dict[str, Any] = {"input": draw(st.sampled_from(PRICES)),
                                   "output": draw(st.sampled_from(PRICES))}
        if draw(st.booleans()):
            pricing["cachedInput"] = draw(st.sampled_from(PRICES))
        if draw(st.integers(0, 5)) == 0:
            pricing["input"] = Decimal("1E+1")  # a Decimal with a positive exponent
        models.append({"name": name, "tier": tier, "pricing": pricing,
                       "aliases": ["vendor/large-*"] if name == "large" else []})
    return Catalog([api.ModelCatalog.model_validate({
        "apiVersion": api.API_VERSION, "kind": "ModelCatalog", "metadata": {"name": "prices"},
        "spec": {"models": models}})])


token_counts = st.one_of(
    st.floats(0, 5e6, allow_nan=False),
    st.integers(0, 5_000_000).map(float),
    # Ties, and counts whose cost has more digits than the context keeps (rounded, as before).
    st.sampled_from([0.5, 1.5, 2.5, 1e-9, 4e13, 1e17]),
)


@st.composite
def spend(draw: st.DrawFn) -> list[SpendSeries]:
    return [
        SpendSeries(
            namespace=draw(st.sampled_from(NAMESPACES)),
            workload=draw(st.sampled_from(["agent-0", "agent-1"])),
            model=draw(st.sampled_from(MODELS)),
            input_tokens=draw(token_counts), output_tokens=draw(token_counts),
            cached_input_tokens=draw(st.sampled_from([0.0, 0.0, 7.5, 1000.4])),
            cost=draw(st.sampled_from([None] * 8 + [Decimal("0.5"), Decimal("1E-3")])),
            labels=(("team", draw(st.sampled_from(["x", "y"]))),),
        )
        for _ in range(draw(st.integers(0, 20)))
    ]


def _by_hand(series: list[SpendSeries], namespaces: tuple[str, ...],
             matchers: tuple[api.SpendMatcher, ...], model: str | None,
             catalog: Catalog) -> tuple[float, Decimal, set[str]]:
    """The spend of a scope the plain way: series by series, priced one at a time."""
    tokens, cost, unpriced = 0.0, Decimal(0), set()
    for ns in namespaces:
        for s in series:
            if s.namespace != ns or not engine.series_matches(s, matchers):
                continue
            if model is not None and not (pattern_matches(model, s.model)
                                          or pattern_matches(model, catalog.canonical(s.model))):
                continue
            tokens += s.tokens
            c = s.cost if s.cost is not None else catalog.cost(
                s.model, s.input_tokens, s.output_tokens, s.cached_input_tokens)
            if c is None:
                if s.tokens > 0:
                    unpriced.add(s.model)
            else:
                cost += c
    return tokens, cost, unpriced


@settings(max_examples=400, deadline=None)
@given(catalog=catalogs(), series=spend(),
       kind=st.sampled_from(["TokenBudget", "Shared", "PerNamespace"]),
       model=st.none() | st.sampled_from(["large", "t*", "vendor/*"]),
       team=st.none() | st.sampled_from(["x", "y"]))
def test_spend_per_window_is_the_series_by_series_sum_down_to_the_decimal_exponent(
        catalog: Catalog, series: list[SpendSeries], kind: str, model: str | None,
        team: str | None) -> None:
    fields: dict[str, Any] = {"limits": [{"window": "24h", "tokens": 1000, "cost": "10"},
                                         {"window": "Day", "cost": "10", "model": model}]}
    if team is not None:
        fields["spendMatchers"] = [{"label": "team", "value": team}]
    budget: api.Budget
    if kind == "TokenBudget":
        budget = b.token_budget(namespace="ns-b", **fields)
    else:
        budget = b.cluster_budget(selector={"environment": "qa"}, scope=kind, **fields)
    namespaces = {n: {"environment": "qa"} for n in NAMESPACES[1:]} | {"ns-a": {}}
    world = engine.World(budgets=[budget], catalog=catalog, namespaces=namespaces)
    result = engine.evaluate(world, b.snapshot([budget], series), NOW)

    for decision in result.decisions:
        unpriced: set[str] = set()
        for usage in decision.windows:
            tokens, cost, missing = _by_hand(series, decision.namespaces,
                                             budget.spec.spend_matchers, usage.model, catalog)
            unpriced |= missing
            assert (usage.tokens, str(usage.cost)) == (int(round(tokens)), str(cost))
        assert decision.unpriced_models == tuple(sorted(unpriced))


def test_one_namespace_s_spend_counts_once_for_every_budget_that_covers_it() -> None:
    # A TokenBudget and a PerNamespace ClusterTokenBudget share one sum per namespace and
    # window; a Shared one adds the namespaces up in their order.
    spend_ = [b.series(100, namespace="qa-1", model="large"),
              b.series(0.5, namespace="qa-2", model="tiny", output=2.5),
              b.series(300, namespace="qa-1", model="medium", cached=10)]
    namespaces = {"qa-1": {"environment": "qa"}, "qa-2": {"environment": "qa"}}
    budgets = [b.token_budget(namespace="qa-1"), b.cluster_budget("per", scope="PerNamespace"),
               b.cluster_budget("shared", scope="Shared")]
    result = b.evaluate(budgets, spend_, namespaces=namespaces, workloads=[])
    usage = {str(d.scope): (d.windows[0].tokens, str(d.windows[0].cost))
             for d in result.decisions}
    # 100 x $10 + 300 x $1 + 10 cached x $1 per million; round(0.5) x $0.10 + round(2.5) x
    # $0.30 (ties to even: 0 and 2); Decimal keeps the exponents a sum of those terms has.
    assert usage == {"qa-1/search": (410, "0.00131"), "per[qa-1]": (410, "0.00131"),
                     "per[qa-2]": (3, "6E-7"), "shared": (413, "0.0013106")}


# ---------------------------------------------------------------------------
# Ungoverned spend
# ---------------------------------------------------------------------------

WEB = {"app": "web"}
# Labels of governed workloads, of their pods, of pods not listed yet, and many strays:
# more than UNGOVERNED_SHOWN at once, so which are named depends on the order.
LABELS = ["agent", "agent-5d-x", "web", "web-1", "coder-7f-x", "", *(f"w{i}-x" for i in range(9))]
# A namespace whose name begins another's: "qa-1/..." sorts before "qa/...".
PICKED = ["qa", "qa-1", "qa-2"]


@st.composite
def governing(draw: st.DrawFn) -> tuple[list[api.Budget], list[inputs.Workload],
                                        list[SpendSeries]]:
    """Budgets of every kind over the same namespaces, governing other workloads there."""
    selector = {"selector": {"matchLabels": WEB}}
    budgets: list[api.Budget] = [
        b.token_budget(f"t{i}", namespace=ns, **(selector if draw(st.booleans()) else {}))
        for i, ns in enumerate(draw(st.lists(st.sampled_from(PICKED), max_size=3)))]
    for i, scope in enumerate(draw(st.lists(st.sampled_from(["Shared", "PerNamespace"]),
                                            max_size=3))):
        budget = b.cluster_budget(f"c{i}", scope=scope, **draw(
            st.sampled_from([{}, {"enrolment": "Mandatory"}])))
        if draw(st.booleans()):  # (the builder's ``selector`` picks the namespaces)
            budget = budget.model_copy(update={"spec": budget.spec.model_copy(
                update={"selector": LabelSelector(match_labels=WEB)})})
        budgets.append(budget)
    workloads = [inputs.Workload(b.key(name, ns), draw(st.sampled_from([b.AGENT, WEB])),
                                 pods=draw(st.sampled_from([(), (f"{name}-9c-y",)])))
                 for ns in PICKED
                 for name in draw(st.lists(st.sampled_from(["agent", "web", "coder"]),
                                           max_size=2, unique=True))]
    spend_ = [b.series(draw(st.sampled_from([0, 5])), namespace=draw(st.sampled_from(PICKED)),
                       workload=draw(st.sampled_from(LABELS)))
              for _ in range(draw(st.integers(0, 60)))]
    return budgets, workloads, spend_


@settings(max_examples=300, deadline=None)
@given(governing())
def test_ungoverned_spend_is_judged_as_by_hand_for_each_scope(
        world: tuple[list[api.Budget], list[inputs.Workload], list[SpendSeries]]) -> None:
    # Labels are judged once per namespace and shared between scopes: a scope must still
    # get its own workloads' judgement (another selector governs others) and, over several
    # namespaces, the first labels of all of them in order.
    budgets, workloads, spend_ = world
    namespaces = {ns: {"environment": "qa"} for ns in PICKED}
    result = b.evaluate(budgets, spend_, namespaces=namespaces, workloads=workloads)
    by_ns: dict[str, list[inputs.Workload]] = {}
    for w in workloads:
        by_ns.setdefault(w.key.namespace, []).append(w)
    budget_of = {(x.kind, x.metadata.namespace or "", x.metadata.name): x for x in budgets}
    for decision in result.decisions:
        key = decision.scope.budget
        budget = budget_of[(key.kind, key.namespace, key.name)]
        governed = engine.governed_by(budget, decision.namespaces, by_ns)
        mine = [s for ns in decision.namespaces for s in spend_ if s.namespace == ns]
        assert (decision.ungoverned, decision.ungoverned_series) == \
            engine.ungoverned(mine, governed)


# ---------------------------------------------------------------------------
# Merging
# ---------------------------------------------------------------------------


# Few distinct values, so that directives often tie on everything but their allowed models.
directives = st.builds(
    Directive,
    state=st.sampled_from([api.State.OK, api.State.BLOCKED]),
    budget=st.just("TokenBudget/a/x"),
    reason=st.sampled_from(["LimitReached", "Hysteresis"]),
    message=st.just(""),
    model=st.none() | st.sampled_from(["medium", "tiny"]),
    allowed_models=st.none() | st.frozensets(st.sampled_from(["large", "medium", "tiny"])),
    tokens_per_minute=st.none() | st.integers(1, 3),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(directives, min_size=1, max_size=4).flatmap(
    lambda ds: st.tuples(st.just(ds), st.permutations(ds))))
def test_directives_that_tie_but_for_their_allowed_models_merge_alike_in_any_order(
        pair: tuple[list[Directive], list[Directive]]) -> None:
    listed, shuffled = pair
    assert merge(listed) == merge(shuffled)


@settings(max_examples=300, deadline=None)
@given(directives)
def test_one_directive_merges_into_what_it_and_its_twin_merge_into(d: Directive) -> None:
    # A single directive skips the merge; a pair of equal ones goes all the way through.
    assert merge([d]) == merge([d, d])


# ---------------------------------------------------------------------------
# Value types built in one step
# ---------------------------------------------------------------------------

QUICK = [WindowUsage, Directive, Decision, inputs.WorkloadKey, inputs.BudgetKey, inputs.ScopeKey]


@pytest.mark.parametrize("cls", QUICK, ids=lambda c: c.__name__)
def test_a_quick_init_takes_the_dataclass_s_fields_and_defaults(cls: type) -> None:
    params = list(inspect.signature(cls).parameters.values())
    fields = dataclasses.fields(cls)
    assert [p.name for p in params] == [f.name for f in fields]
    for p, f in zip(params, fields, strict=True):
        if f.default is not dataclasses.MISSING:
            assert p.default == f.default
        elif f.default_factory is dataclasses.MISSING:
            assert p.default is inspect.Parameter.empty


def test_values_built_quickly_stay_frozen_and_get_fresh_defaults() -> None:
    key = inputs.ScopeKey(inputs.BudgetKey("TokenBudget", "a", "b"))
    first = Decision(scope=key, namespaces=("a",), state=api.State.OK, reason="r", message="m")
    second = Decision(key, ("a",), api.State.OK, "r", "m")
    assert first == second and first.directives is not second.directives
    assert (first.windows, first.spend_known, key.namespace) == ((), True, "")
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.reason = "changed"  # type: ignore[misc]
    assert isinstance(b.evaluate([b.token_budget()]), Evaluation)
