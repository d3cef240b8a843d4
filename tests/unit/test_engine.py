"""The policy engine, scenario by scenario: spend in, decisions and directives out.

Every test builds budgets as manifests say them and spend as the Prometheus
adapter reports it (see ``builders``), evaluates at a fixed ``NOW`` and checks
what a user would see: the budget's state and reason, and what each workload
is told (state, model, allowed models, token rate).

Covers:
- the ladder: spend below, at and over each rung; the ladder is cumulative
  (at Throttle the Reroute below still applies); messages;
- Reroute to a named model and to the cheapest allowed equivalent (respecting
  deniedModels, deniedTiers, allowedModels, aliases, declared models, per-pod
  spend); allowed models in directives;
- Throttle at a fixed rate and at pace (remaining budget over the rest of the
  window, shared among workloads, the tighter of tokens and cost); Block;
- cost: computed from the catalog (cached input included) when the source
  reports tokens only, taken from the source when it reports money (LiteLLM);
  unpriced models listed;
- spend matchers (Equal, NotEqual, Regex, NotRegex, anchored like PromQL) and
  the limit's model filter (names, aliases, patterns);
- ClusterTokenBudget: Shared vs PerNamespace over namespaces picked by labels;
  a namespace losing its label stops being governed;
- hysteresis; exceptions capping the ladder and expiring by themselves;
- spend unknown (source error, empty result, a window not read): Hold within
  the stale window keeps the state and lists the workloads as held, Hold past
  it or with nothing to hold fails open, FailOpen, FailClosed;
- DryRun: a decision, no directive;
- cost per outcome and its threshold; run-out forecasts from the burn rate;
- several budgets on one workload: the most restrictive wins, the lowest rate,
  the intersection of allowed models, and the directive names the budget.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import pytest

from token_budget.api import v1alpha1 as api
from token_budget.policy import engine, sources
from token_budget.policy.decisions import OK_DIRECTIVE, Decision, Directive, Evaluation, merge
from unit import builders as b
from unit.builders import NOW, key, series, token_budget

COUNTERS = sources.resolve(api.SpendSource())

State = api.State
LADDER = [
    {"type": "Warn", "atPercent": 50},
    {"type": "Reroute", "atPercent": 70},
    {"type": "Throttle", "atPercent": 80, "tokensPerMinute": 100},
    {"type": "Block", "atPercent": 100},
]


def only(evaluation: Evaluation) -> Decision:
    [decision] = evaluation.decisions
    return decision


def told(evaluation: Evaluation, name: str = "agent", namespace: str = b.NAMESPACE) -> Directive:
    return evaluation.directives[key(name, namespace)]


# ---------------------------------------------------------------------------
# The ladder
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "state", "reason", "model", "rate"),
    [
        pytest.param(0, State.OK, "WithinBudget", None, None,
                     id="no spend yet is Ok (the series exist)"),
        pytest.param(499, State.OK, "WithinBudget", None, None, id="just below Warn is Ok"),
        pytest.param(500, State.WARNING, "LimitReached", None, None, id="at Warn warns"),
        pytest.param(699, State.WARNING, "LimitReached", None, None,
                     id="just below Reroute still only warns"),
        pytest.param(700, State.REROUTED, "LimitReached", "tiny", None,
                     id="at Reroute the cheapest equivalent is used"),
        pytest.param(799, State.REROUTED, "LimitReached", "tiny", None,
                     id="just below Throttle is still rerouted"),
        pytest.param(800, State.THROTTLED, "LimitReached", "tiny", 100,
                     id="at Throttle the reroute still applies and the rate is set"),
        pytest.param(999, State.THROTTLED, "LimitReached", "tiny", 100,
                     id="just below Block is throttled"),
        pytest.param(1000, State.BLOCKED, "LimitReached", "tiny", 100,
                     id="at the limit the workload is blocked"),
        pytest.param(2500, State.BLOCKED, "LimitReached", "tiny", 100,
                     id="far over the limit the workload is blocked"),
    ],
)
def test_spend_climbs_the_ladder_rung_by_rung(tokens: int, state: State, reason: str,
                                              model: str | None, rate: int | None) -> None:
    result = b.evaluate([token_budget(actions=LADDER)], [series(tokens, model="large")])
    decision = only(result)
    assert (decision.state, decision.reason) == (state, reason)
    directive = told(result)
    assert (directive.state, directive.model, directive.tokens_per_minute) == (state, model, rate)
    assert directive.blocked is (state is State.BLOCKED)
    assert directive.budget == "TokenBudget/team-search/search"


def test_the_decision_says_where_spend_stands_and_which_rung_applies() -> None:
    decision = only(b.evaluate([token_budget(actions=LADDER)], [series(800, model="large")]))
    assert decision.message == ("spend in window 24h is 800 tokens of 1,000 tokens (80.0%): "
                                "Throttle from 80%")
    assert decision.action is not None and decision.action.type is api.ActionType.THROTTLE
    [usage] = decision.windows
    assert (usage.tokens, usage.limit_tokens, usage.used_percent) == (800, 1000, Decimal(80))


def test_the_most_used_window_decides() -> None:
    budget = token_budget(limits=[{"window": "24h", "tokens": 1000},
                                  {"window": "7d", "tokens": 10000}])
    result = b.evaluate([budget], per_window={"24h": [series(100)], "7d": [series(9000)]})
    decision = only(result)
    assert decision.state is State.WARNING
    assert [w.used_percent for w in decision.windows] == [Decimal(10), Decimal(90)]
    assert decision.worst_window is not None and decision.worst_window.window == "7d"


def test_spend_of_every_workload_and_model_in_the_namespace_adds_up() -> None:
    result = b.evaluate([token_budget()], [series(300, workload="a-0"), series(300, workload="b-0",
                                                                               model="tiny"),
                                           series(100, output=150, cached=50, workload="c-0")])
    assert only(result).windows[0].tokens == 900


def test_workloads_the_selector_does_not_pick_are_left_alone() -> None:
    workloads = [b.workload("agent"), b.workload("web", labels={"app": "web"}),
                 b.workload("agent", namespace="elsewhere")]
    result = b.evaluate([token_budget()], [series(1200)], workloads=workloads,
                        namespaces={b.NAMESPACE: {}, "elsewhere": {}})
    assert set(result.directives) == {key("agent")}
    assert only(result).workloads == (key("agent"),)


# ---------------------------------------------------------------------------
# Reroute
# ---------------------------------------------------------------------------

REROUTE = [{"type": "Reroute", "atPercent": 50}]


@pytest.mark.parametrize(
    ("fields", "spend_model", "declared", "pod", "model"),
    [
        pytest.param({"actions": [{"type": "Reroute", "atPercent": 50, "model": "medium"}]},
                     "large", (), "agent-0", "medium", id="a named model is used as it is"),
        pytest.param({"actions": REROUTE}, "large", (), "agent-0", "tiny",
                     id="the cheapest equivalent is chosen"),
        pytest.param({"actions": REROUTE, "deniedModels": ["tiny"]}, "large", (), "agent-0",
                     "medium", id="a denied model is skipped"),
        pytest.param({"actions": REROUTE, "deniedTiers": ["Economy"]}, "large", (), "agent-0",
                     "medium", id="a denied tier is skipped"),
        pytest.param({"actions": REROUTE, "allowedModels": ["large", "medium"]}, "large", (),
                     "agent-0", "medium", id="only allowed models are candidates"),
        pytest.param({"actions": REROUTE, "deniedTiers": ["Economy", "Standard"]}, "large", (),
                     "agent-0", None, id="no allowed equivalent means no model override"),
        pytest.param({"actions": REROUTE}, "vendor/large-2025-01", (), "agent-0", "tiny",
                     id="a model reported under an alias is rerouted"),
        pytest.param({"actions": REROUTE}, "tiny", (), "agent-0", None,
                     id="a model without equivalents stays"),
        pytest.param({"actions": REROUTE}, "mystery-9", (), "agent-0", None,
                     id="a model outside the catalog stays"),
        pytest.param({"actions": REROUTE, "deniedModels": ["tiny"]}, "medium", ("large",),
                     "agent-0", "medium",
                     id="the workload's declared model comes before its spend"),
        pytest.param({"actions": REROUTE}, "large", (), "agent-7c9f5d-x2x8q", "tiny",
                     id="spend reported per pod is found by the workload's name"),
        pytest.param({"actions": REROUTE}, "large", (), "other-0", None,
                     id="spend of another workload says nothing about this one's model"),
    ],
)
def test_reroute_picks_the_model_a_workload_is_told_to_use(fields: dict[str, Any],
                                                           spend_model: str,
                                                           declared: tuple[str, ...], pod: str,
                                                           model: str | None) -> None:
    result = b.evaluate([token_budget(**fields)], [series(600, model=spend_model, workload=pod)],
                        workloads=[b.workload(models=declared)])
    assert only(result).state is State.REROUTED
    assert told(result).model == model


@pytest.mark.parametrize(
    ("fields", "allowed"),
    [
        pytest.param({}, None, id="a budget that restricts nothing imposes no list"),
        pytest.param({"deniedTiers": ["Frontier"]}, {"medium", "tiny"}, id="denied tiers"),
        pytest.param({"deniedModels": ["t*"]}, {"large", "medium"}, id="denied patterns"),
        pytest.param({"allowedModels": ["medium"]}, {"medium"}, id="an allow list"),
        pytest.param({"allowedModels": ["vendor/large-*"]}, {"large"},
                     id="an allow list by alias"),
    ],
)
def test_directives_carry_the_models_a_budget_allows_even_when_ok(fields: dict[str, Any],
                                                                   allowed: set[str] | None
                                                                   ) -> None:
    result = b.evaluate([token_budget(**fields)], [series(10)])
    assert only(result).state is State.OK
    expected = frozenset(allowed) if allowed is not None else None
    assert told(result).allowed_models == expected


# ---------------------------------------------------------------------------
# Throttle and Block
# ---------------------------------------------------------------------------

THROTTLE_AT_90 = [{"type": "Throttle", "atPercent": 90}]


@pytest.mark.parametrize(
    ("limit", "spend", "workloads", "rate"),
    [
        pytest.param({"window": "24h", "tokens": 1_440_000}, series(1_296_000), 1, 100,
                     id="a rolling day paces what is left over the whole window"),
        pytest.param({"window": "24h", "tokens": 1_440_000}, series(1_296_000), 2, 50,
                     id="the pace is shared among the governed workloads"),
        pytest.param({"window": "Day", "tokens": 1_440_000}, series(1_296_000), 1, 200,
                     id="a calendar day paces what is left over the hours until midnight"),
        pytest.param({"window": "Day", "cost": "100.00"}, series(90_000_000), 1, 13_888,
                     id="a money limit is paced in tokens at the current price"),
        pytest.param({"window": "Day", "tokens": 1_440_000, "cost": "10.00"},
                     series(960_000, model="large"), 1, 55,
                     id="the tighter of the token and money limits sets the pace"),
        pytest.param({"window": "Day", "tokens": 1000}, series(1500), 1, 1,
                     id="past the limit the pace is one token a minute"),
    ],
)
def test_throttle_without_a_rate_paces_the_rest_of_the_budget(limit: dict[str, Any],
                                                              spend: Any, workloads: int,
                                                              rate: int) -> None:
    governed = [b.workload(f"agent-{i}") for i in range(workloads)]
    result = b.evaluate([token_budget(limits=[limit], actions=THROTTLE_AT_90)], [spend],
                        workloads=governed)
    assert only(result).state is State.THROTTLED
    assert {d.tokens_per_minute for d in result.directives.values()} == {rate}


def test_throttle_with_a_rate_uses_that_rate_for_every_workload() -> None:
    actions = [{"type": "Throttle", "atPercent": 90, "tokensPerMinute": 2000}]
    result = b.evaluate([token_budget(actions=actions)], [series(950)],
                        workloads=[b.workload("a"), b.workload("b")])
    assert [d.tokens_per_minute for d in result.directives.values()] == [2000, 2000]


def test_block_blocks_every_governed_workload_of_the_namespace() -> None:
    workloads = [b.workload("a"), b.workload("b", kind="StatefulSet"),
                 b.workload("c", kind="CronJob")]
    result = b.evaluate([token_budget()], [series(1000)], workloads=workloads)
    assert only(result).state is State.BLOCKED
    assert [d.blocked for d in result.directives.values()] == [True, True, True]


# ---------------------------------------------------------------------------
# Cost
# ---------------------------------------------------------------------------

COST_LIMIT = [{"window": "24h", "cost": "100.00"}]


@pytest.mark.parametrize(
    ("spend", "cost"),
    [
        pytest.param(series(1_000_000, output=1_000_000, model="large"), Decimal(40),
                     id="input and output tokens are priced from the catalog"),
        pytest.param(series(0, cached=1_000_000, model="large"), Decimal(5),
                     id="cached input has its own price"),
        pytest.param(series(0, cached=1_000_000, model="medium"), Decimal(1),
                     id="cached input without its own price costs the input price"),
        pytest.param(series(1_000_000, model="vendor/medium-2025"), Decimal(1),
                     id="a model reported under an alias is priced"),
        pytest.param(series(1_000_000, model="openai/tiny"), Decimal("0.1"),
                     id="a provider prefix is ignored"),
    ],
)
def test_cost_is_computed_from_the_catalog_when_the_source_reports_tokens(spend: Any,
                                                                          cost: Decimal) -> None:
    [usage] = only(b.evaluate([token_budget(limits=COST_LIMIT)], [spend])).windows
    assert usage.cost == cost
    assert usage.used_percent == cost


def test_cost_the_source_reports_is_used_as_it_is() -> None:
    budget = token_budget(limits=COST_LIMIT, source={"preset": "LiteLLM"})
    spend = series(1_000_000, output=1_000_000, model="large", cost="12.34")
    decision = only(b.evaluate([budget], [spend]))
    assert decision.windows[0].cost == Decimal("12.34")
    assert decision.unpriced_models == ()


def test_models_without_a_price_are_listed_and_cost_nothing() -> None:
    spend = [series(500, model="mystery-9"), series(0, model="unused-1"),
             series(1_000_000, model="medium")]
    decision = only(b.evaluate([token_budget(limits=COST_LIMIT)], spend))
    assert decision.unpriced_models == ("mystery-9",)
    assert decision.windows[0].cost == Decimal(1)


def test_unpriced_tokens_still_count_against_a_token_limit() -> None:
    decision = only(b.evaluate([token_budget()], [series(900, model="mystery-9")]))
    assert decision.state is State.WARNING


def test_money_is_shown_in_the_catalog_currency() -> None:
    decision = only(b.evaluate([token_budget(limits=COST_LIMIT)],
                               [series(9_000_000, model="large")]))
    assert decision.message == "spend in window 24h is $90.00 of $100.00 (90.0%): Warn from 80%"


# ---------------------------------------------------------------------------
# Which spend counts
# ---------------------------------------------------------------------------

TEAMS = [series(100, team="search"), series(200, team="ads"), series(400)]


@pytest.mark.parametrize(
    ("matchers", "tokens"),
    [
        pytest.param([], 700, id="without matchers the namespace's spend counts"),
        pytest.param([{"label": "team", "value": "search"}], 100, id="Equal is the default"),
        pytest.param([{"label": "team", "operator": "NotEqual", "value": "search"}], 600,
                     id="NotEqual keeps series without the label"),
        pytest.param([{"label": "team", "operator": "Regex", "value": "search|ads"}], 300,
                     id="Regex keeps matching values"),
        pytest.param([{"label": "team", "operator": "Regex", "value": "s.*"}], 100,
                     id="Regex matches the whole value from its start"),
        pytest.param([{"label": "team", "operator": "NotRegex", "value": "s.*"}], 600,
                     id="NotRegex drops matching values"),
        pytest.param([{"label": "team", "operator": "NotEqual", "value": "ads"},
                      {"label": "team", "operator": "Regex", "value": ".+"}], 100,
                     id="every matcher must hold"),
    ],
)
def test_spend_matchers_narrow_the_spend_that_counts(matchers: list[dict[str, str]],
                                                     tokens: int) -> None:
    decision = only(b.evaluate([token_budget(spendMatchers=matchers)], TEAMS))
    assert decision.windows[0].tokens == tokens


def test_a_regex_matcher_is_anchored_like_promql() -> None:
    budget = token_budget(spendMatchers=[{"label": "team", "operator": "Regex", "value": "sea"}])
    decision = only(b.evaluate([budget], TEAMS))
    # "sea" matches no whole value: nothing counts, no series belongs to the scope
    assert not decision.series_seen and decision.windows[0].tokens == 0


@pytest.mark.parametrize(
    ("model", "tokens"),
    [
        pytest.param("large", 300, id="a canonical name counts that model"),
        pytest.param("lar*", 300, id="a pattern counts matching models"),
        pytest.param("medium", 50, id="spend reported under an alias counts for the model"),
        pytest.param("*", 950, id="a catch-all pattern counts everything"),
    ],
)
def test_a_limit_for_one_model_counts_only_that_model(model: str, tokens: int) -> None:
    budget = token_budget(limits=[{"window": "24h", "tokens": 1000, "model": model}])
    spend = [series(300, model="large"), series(600, model="tiny"),
             series(50, model="vendor/medium-2025")]
    assert only(b.evaluate([budget], spend)).windows[0].tokens == tokens


def test_a_limit_for_a_model_nobody_uses_is_zero_not_unknown() -> None:
    budget = token_budget(limits=[{"window": "24h", "tokens": 1000, "model": "large"}],
                          whenSpendUnknown={"policy": "FailClosed"})
    decision = only(b.evaluate([budget], [series(600, model="tiny")]))
    assert decision.spend_known
    assert (decision.state, decision.windows[0].tokens) == (State.OK, 0)


def test_spend_of_other_namespaces_does_not_count() -> None:
    spend = [series(100), series(5000, namespace="team-ads")]
    assert only(b.evaluate([token_budget()], spend)).windows[0].tokens == 100


# ---------------------------------------------------------------------------
# ClusterTokenBudget
# ---------------------------------------------------------------------------

QA = {"qa-1": {"environment": "qa"}, "qa-2": {"environment": "qa", "team": "x"},
      "prod": {"environment": "prod"}}
QA_SPEND = [series(600, namespace="qa-1"), series(600, namespace="qa-2"),
            series(5000, namespace="prod")]
QA_WORKLOADS = [b.workload(namespace="qa-1"), b.workload(namespace="qa-2"),
                b.workload(namespace="prod")]
QA_LADDER = [{"type": "Warn", "atPercent": 50}, {"type": "Block", "atPercent": 100}]


def test_a_shared_cluster_budget_pools_the_spend_of_every_picked_namespace() -> None:
    result = b.evaluate([b.cluster_budget(scope="Shared", actions=QA_LADDER)], QA_SPEND,
                        namespaces=QA, workloads=QA_WORKLOADS)
    decision = only(result)
    assert decision.namespaces == ("qa-1", "qa-2")
    assert (decision.windows[0].tokens, decision.state) == (1200, State.BLOCKED)
    assert set(result.directives) == {key(namespace="qa-1"), key(namespace="qa-2")}
    assert told(result, namespace="qa-1").budget == "ClusterTokenBudget/qa"


def test_a_per_namespace_cluster_budget_gives_each_namespace_the_full_limits() -> None:
    result = b.evaluate([b.cluster_budget(scope="PerNamespace", actions=QA_LADDER)], QA_SPEND,
                        namespaces=QA, workloads=QA_WORKLOADS)
    assert [(str(d.scope), d.windows[0].tokens, d.state) for d in result.decisions] == [
        ("qa[qa-1]", 600, State.WARNING), ("qa[qa-2]", 600, State.WARNING)]
    assert set(result.directives) == {key(namespace="qa-1"), key(namespace="qa-2")}


def test_a_namespace_that_loses_its_label_stops_being_governed() -> None:
    relabelled = {**QA, "qa-2": {"environment": "staging"}}
    result = b.evaluate([b.cluster_budget(scope="Shared", actions=QA_LADDER)], QA_SPEND,
                        namespaces=relabelled, workloads=QA_WORKLOADS)
    decision = only(result)
    assert decision.namespaces == ("qa-1",)
    assert (decision.windows[0].tokens, decision.state) == (600, State.WARNING)
    assert key(namespace="qa-2") not in result.directives


def test_a_cluster_budget_selects_namespaces_by_every_label_it_names() -> None:
    budget = b.cluster_budget(selector={"environment": "qa", "team": "x"}, actions=QA_LADDER)
    result = b.evaluate([budget], QA_SPEND, namespaces=QA, workloads=QA_WORKLOADS)
    assert [d.namespaces for d in result.decisions] == [("qa-2",)]


def test_a_cluster_budget_that_picks_no_namespace_decides_nothing() -> None:
    result = b.evaluate([b.cluster_budget(selector={"environment": "dev"})], QA_SPEND,
                        namespaces=QA, workloads=QA_WORKLOADS)
    assert (result.decisions, result.directives) == ((), {})


# ---------------------------------------------------------------------------
# Hysteresis
# ---------------------------------------------------------------------------

WARN_BLOCK = [{"type": "Warn", "atPercent": 50}, {"type": "Block", "atPercent": 100}]


@pytest.mark.parametrize(
    ("remembered", "tokens", "hysteresis", "state", "reason"),
    [
        pytest.param(None, 960, 5, State.WARNING, "LimitReached",
                     id="on the way up there is no hysteresis"),
        pytest.param(State.BLOCKED, 960, 5, State.BLOCKED, "Hysteresis",
                     id="a block holds just below its threshold"),
        pytest.param(State.BLOCKED, 950, 5, State.BLOCKED, "Hysteresis",
                     id="a block holds at exactly the hysteresis margin"),
        pytest.param(State.BLOCKED, 949, 5, State.WARNING, "LimitReached",
                     id="a block lifts once spend falls below the margin"),
        pytest.param(State.WARNING, 460, 5, State.WARNING, "Hysteresis",
                     id="a warning holds just below its threshold"),
        pytest.param(State.WARNING, 440, 5, State.OK, "WithinBudget",
                     id="a warning lifts below the margin"),
        pytest.param(State.BLOCKED, 999, 0, State.WARNING, "LimitReached",
                     id="without hysteresis a block lifts right below its threshold"),
        pytest.param(State.BLOCKED, 1100, 5, State.BLOCKED, "LimitReached",
                     id="above the threshold the limit itself holds"),
    ],
)
def test_hysteresis_keeps_a_state_until_spend_is_clearly_below_it(
        remembered: State | None, tokens: int, hysteresis: int, state: State, reason: str) -> None:
    budget = token_budget(actions=WARN_BLOCK, hysteresisPercent=hysteresis)
    memory = b.memory(budget, remembered) if remembered else None
    result = b.evaluate([budget], [series(tokens)], remembered=memory)
    assert (only(result).state, only(result).reason) == (state, reason)
    assert told(result).state is state


def test_hysteresis_says_until_when_the_state_holds() -> None:
    budget = token_budget(actions=WARN_BLOCK)
    decision = only(b.evaluate([budget], [series(960)],
                               remembered=b.memory(budget, State.BLOCKED)))
    assert decision.message.endswith("; Block holds until spend falls below 95%")


# ---------------------------------------------------------------------------
# Exceptions
# ---------------------------------------------------------------------------


def _exception(hours: float, max_action: str = "Warn", reason: str = "launch week"
               ) -> dict[str, str]:
    until = (NOW + dt.timedelta(hours=hours)).isoformat()
    return {"until": until, "reason": reason, "maxAction": max_action}


def test_an_exception_caps_the_ladder_while_it_lasts() -> None:
    budget = token_budget(exceptions=[_exception(1)])
    result = b.evaluate([budget], [series(1200)])
    decision = only(result)
    assert (decision.state, decision.reason, decision.exception) == (
        State.WARNING, "ExceptionActive", "launch week")
    assert "; capped at Warn until 2025-11-20T13:00:00+00:00 (launch week)" in decision.message
    assert told(result).state is State.WARNING


def test_an_exception_capped_at_throttle_keeps_the_reroute_and_the_rate() -> None:
    budget = token_budget(actions=LADDER, exceptions=[_exception(1, "Throttle")])
    result = b.evaluate([budget], [series(1200, model="large")])
    directive = told(result)
    assert (directive.state, directive.model, directive.tokens_per_minute) == (
        State.THROTTLED, "tiny", 100)


def test_an_exception_expires_by_itself() -> None:
    budget = token_budget(exceptions=[_exception(1)])
    later = NOW + dt.timedelta(hours=2)
    decision = only(b.evaluate([budget], [series(1200)], now=later))
    assert (decision.state, decision.reason, decision.exception) == (
        State.BLOCKED, "LimitReached", None)


def test_an_exception_that_caps_nothing_leaves_the_reason_alone() -> None:
    decision = only(b.evaluate([token_budget(exceptions=[_exception(1)])], [series(850)]))
    assert (decision.state, decision.reason, decision.exception) == (
        State.WARNING, "LimitReached", "launch week")


def test_of_two_live_exceptions_the_more_lenient_cap_applies() -> None:
    budget = token_budget(actions=LADDER, exceptions=[_exception(5, "Warn", "audit"),
                                                      _exception(1, "Reroute", "demo")])
    decision = only(b.evaluate([budget], [series(1200, model="large")]))
    assert (decision.state, decision.exception) == (State.REROUTED, "demo")


# ---------------------------------------------------------------------------
# Spend unknown
# ---------------------------------------------------------------------------

BROKEN = {api.Preset.COUNTERS: "Prometheus at http://prom:9090 cannot be reached: refused"}


@pytest.mark.parametrize(
    ("policy", "remembered", "seconds_ago", "state", "reason"),
    [
        pytest.param("Hold", State.THROTTLED, 60, State.THROTTLED, "SpendUnknownHolding",
                     id="Hold keeps a recent state"),
        pytest.param("Hold", State.THROTTLED, 900, State.THROTTLED, "SpendUnknownHolding",
                     id="Hold keeps the state up to staleAfterSeconds"),
        pytest.param("Hold", State.THROTTLED, 901, State.OK, "SpendUnknownFailOpen",
                     id="Hold past staleAfterSeconds fails open"),
        pytest.param("Hold", None, None, State.OK, "SpendUnknownFailOpen",
                     id="Hold with nothing to hold fails open"),
        pytest.param("Hold", State.BLOCKED, None, State.OK, "SpendUnknownFailOpen",
                     id="Hold of a state never backed by spend fails open"),
        pytest.param("FailOpen", State.BLOCKED, 60, State.OK, "SpendUnknownFailOpen",
                     id="FailOpen lifts every action"),
        pytest.param("FailClosed", None, None, State.BLOCKED, "SpendUnknownFailClosed",
                     id="FailClosed blocks"),
    ],
)
@pytest.mark.parametrize("cause", ["source error", "empty result while the pods run",
                                   "its exporter down"])
def test_when_spend_is_unknown_the_budget_policy_decides(
        cause: str, policy: str, remembered: State | None, seconds_ago: float | None,
        state: State, reason: str) -> None:
    budget = token_budget(whenSpendUnknown={"policy": policy, "staleAfterSeconds": 900})
    memory = b.memory(budget, remembered, seconds_ago=seconds_ago) if remembered else None
    errors = BROKEN if cause == "source error" else None
    down = {COUNTERS: {b.NAMESPACE: "scrape target(s) down (up == 0): agents/10.0.0.7:9000"}} \
        if cause == "its exporter down" else {}
    spend = [series(100)] if cause == "its exporter down" else []
    result = b.evaluate([budget], spend, errors=errors, remembered=memory, down=down,
                        workloads=[b.workload(pods=2)])
    decision = only(result)
    if cause == "empty result while the pods run" and seconds_ago is None:
        # No series was ever seen for the scope: a new scope spends zero, whatever the policy
        # (FailClosed must not lock a new namespace out before its first token).
        assert (decision.state, decision.reason, decision.spend_known) == (
            State.OK, "WithinBudget", True)
        return
    assert (decision.state, decision.reason, decision.spend_known) == (state, reason, False)
    if reason == "SpendUnknownHolding":
        assert result.held == {key()}
        assert result.directives == {}  # workloads keep what they were told
    else:
        assert result.held == frozenset()
        assert told(result).state is state


def test_an_unknown_spend_says_why() -> None:
    failed = only(b.evaluate([token_budget()], [], errors=BROKEN))
    assert failed.spend_error == BROKEN[api.Preset.COUNTERS]
    budget = token_budget()
    gone = only(b.evaluate([budget], [], workloads=[b.workload(pods=2)],
                           remembered=b.memory(budget, State.OK, seconds_ago=60)))
    assert gone.spend_error == (
        "no Counters spend series exist any more for team-search while 2 governed pod(s) "
        "run: their scrape is missing, and an empty result is not taken as zero spend")


@pytest.mark.parametrize("policy", ["FailClosed", "Hold"])
@pytest.mark.parametrize("pods", [
    pytest.param(0, id="its pods gone"),
    pytest.param(None, id="its pods too young to be scraped"),
])
def test_silence_after_the_pods_are_gone_is_zero_spend_and_lifts_a_block(
        policy: str, pods: int | None) -> None:
    """The FailClosed lock of issue 12: Block scaled the agents to zero, their series went
    away with them, and an empty answer was taken as an outage for ever."""
    budget = token_budget(whenSpendUnknown={"policy": policy, "staleAfterSeconds": 900})
    result = b.evaluate([budget], [], workloads=[b.workload(pods=pods or 0)],
                        remembered=b.memory(budget, State.BLOCKED, seconds_ago=3600))
    decision = only(result)
    assert (decision.state, decision.spend_known) == (State.OK, True)
    assert "silence, counted as zero" in decision.message
    assert told(result).state is State.OK


def test_a_gateway_source_is_silent_while_its_callers_run() -> None:
    """A LiteLLM proxy has series only for callers that called: running pods prove nothing."""
    budget = token_budget(source={"preset": "LiteLLM"},
                          whenSpendUnknown={"policy": "FailClosed"})
    decision = only(b.evaluate([budget], [], workloads=[b.workload(pods=3)],
                               remembered=b.memory(budget, State.OK, seconds_ago=60)))
    assert (decision.state, decision.spend_known) == (State.OK, True)


def test_a_down_exporter_of_another_namespace_changes_nothing() -> None:
    budget = token_budget(whenSpendUnknown={"policy": "FailClosed"})
    down = {COUNTERS: {"team-other": "scrape target(s) down (up == 0): agents/x"}}
    decision = only(b.evaluate([budget], [series(100)], down=down))
    assert (decision.state, decision.spend_known) == (State.OK, True)


def test_a_window_that_was_not_read_makes_spend_unknown() -> None:
    budget = token_budget()
    snap = b.snapshot([budget], [series(10)])
    snap = type(snap)(taken_at=NOW, windows={}, recent=snap.recent)
    decision = only(b.evaluate([budget], snap=snap))
    assert (decision.spend_known, decision.spend_error) == (False, "spend over 24h was not read")


def test_a_failing_source_leaves_budgets_on_other_sources_alone() -> None:
    counters = token_budget("a")
    litellm = token_budget("b", source={"preset": "LiteLLM"})
    result = b.evaluate([counters, litellm], [series(900)], errors=BROKEN)
    assert [(str(d.scope), d.spend_known) for d in result.decisions] == [
        ("team-search/a", False), ("team-search/b", True)]


def test_a_workload_one_budget_holds_is_left_as_it_is_even_if_another_would_change_it() -> None:
    # The engine does not know what a held budget last told the workload, so it
    # cannot merge it: leaving the workload alone never loosens a held Block.
    held = token_budget("held", source={"preset": "LiteLLM"})
    known = token_budget("known")
    result = b.evaluate([held, known], [series(1200)], errors={api.Preset.LITELLM: "down"},
                        remembered=b.memory(held, State.BLOCKED))
    assert [d.reason for d in result.decisions] == ["SpendUnknownHolding", "LimitReached"]
    assert result.held == {key()}
    assert result.directives == {}


# ---------------------------------------------------------------------------
# DryRun
# ---------------------------------------------------------------------------


def test_dry_run_decides_but_tells_no_workload() -> None:
    result = b.evaluate([token_budget(mode="DryRun")], [series(1200)])
    decision = only(result)
    assert (decision.state, decision.dry_run) == (State.BLOCKED, True)
    assert result.directives == {}


def test_a_dry_run_budget_does_not_weaken_an_enforcing_one() -> None:
    result = b.evaluate([token_budget("trial", mode="DryRun"), token_budget("real")],
                        [series(850)])
    assert told(result).budget == "TokenBudget/team-search/real"
    assert told(result).state is State.WARNING


# ---------------------------------------------------------------------------
# Cost per outcome
# ---------------------------------------------------------------------------


def _outcome_budget(on_exceeded: str = "Block", max_cost: str = "0.50") -> api.TokenBudget:
    return token_budget(limits=[{"window": "24h", "cost": "1000.00"}], outcome={
        "metric": "agent_outcomes_total",
        "matchers": [{"label": "outcome", "value": "success"}],
        "window": "24h", "maxCostPerOutcome": max_cost, "onExceeded": on_exceeded,
    })


def _outcomes(budget: api.TokenBudget, success: float, *, namespace: str = b.NAMESPACE
              ) -> dict[str, Any]:
    assert budget.spec.outcome is not None
    rows = [(namespace, (("outcome", "success"),), success),
            (b.NAMESPACE, (("outcome", "failure"),), 900.0)]
    return {engine.outcome_key(budget.spec.outcome): rows}


FORTY_DOLLARS = series(1_000_000, output=1_000_000, model="large")


@pytest.mark.parametrize(
    ("on_exceeded", "successes", "state", "reason", "cpo"),
    [
        pytest.param("Block", 100, State.OK, "WithinBudget", Decimal("0.4"),
                     id="cost per outcome under its maximum changes nothing"),
        pytest.param("Block", 50, State.BLOCKED, "CostPerOutcomeExceeded", Decimal("0.8"),
                     id="cost per outcome over its maximum takes its action"),
        pytest.param("Warn", 50, State.WARNING, "CostPerOutcomeExceeded", Decimal("0.8"),
                     id="the action may be only a warning"),
        pytest.param("Block", 0, State.OK, "WithinBudget", None,
                     id="no outcomes yet means no cost per outcome"),
    ],
)
def test_cost_per_outcome_triggers_its_action(on_exceeded: str, successes: float, state: State,
                                              reason: str, cpo: Decimal | None) -> None:
    budget = _outcome_budget(on_exceeded)
    decision = only(b.evaluate([budget], [FORTY_DOLLARS], outcomes=_outcomes(budget, successes)))
    assert (decision.state, decision.reason, decision.cost_per_outcome) == (state, reason, cpo)


def test_cost_per_outcome_says_both_amounts() -> None:
    budget = _outcome_budget()
    decision = only(b.evaluate([budget], [FORTY_DOLLARS], outcomes=_outcomes(budget, 50)))
    assert decision.message == "cost per outcome $0.80 exceeds $0.50: Block"


def test_outcomes_of_other_namespaces_do_not_count() -> None:
    budget = _outcome_budget()
    decision = only(b.evaluate([budget], [FORTY_DOLLARS],
                               outcomes=_outcomes(budget, 1000, namespace="team-ads")))
    assert decision.cost_per_outcome is None


# ---------------------------------------------------------------------------
# Forecast
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "spend", "recent", "run_out"),
    [
        pytest.param({"window": "24h", "tokens": 1_000_000}, series(400_000), series(6_000),
                     NOW + dt.timedelta(seconds=60_000),
                     id="tokens left divided by the recent burn rate"),
        pytest.param({"window": "7d", "cost": "100.00"}, FORTY_DOLLARS,
                     series(10_000, model="large"), NOW + dt.timedelta(seconds=360_000),
                     id="money left divided by the recent money burn rate"),
        pytest.param({"window": "Day", "tokens": 1_000_000}, series(400_000), series(12_000),
                     NOW + dt.timedelta(seconds=30_000),
                     id="a calendar window that runs out before midnight"),
        pytest.param({"window": "Day", "tokens": 1_000_000}, series(400_000), series(6_000),
                     None, id="a calendar window that resets before it would run out"),
        pytest.param({"window": "24h", "tokens": 1_000_000}, series(400_000), None, None,
                     id="no recent spend means no run-out"),
    ],
)
def test_the_run_out_time_is_forecast_from_the_recent_burn_rate(
        limit: dict[str, Any], spend: Any, recent: Any, run_out: dt.datetime | None) -> None:
    decision = only(b.evaluate([token_budget(limits=[limit])], [spend],
                               recent=[recent] if recent else [], recent_seconds=600))
    assert decision.windows[0].run_out == run_out
    assert decision.run_out == run_out


# ---------------------------------------------------------------------------
# Several budgets on one workload
# ---------------------------------------------------------------------------


def test_the_most_restrictive_budget_wins_and_every_constraint_is_kept() -> None:
    alpha = token_budget("alpha", allowedModels=["large", "medium"], actions=[
        {"type": "Warn", "atPercent": 50},
        {"type": "Throttle", "atPercent": 80, "tokensPerMinute": 100}])
    beta = token_budget("beta", deniedModels=["large"], limits=[{"window": "24h", "tokens": 500}],
                        actions=[{"type": "Throttle", "atPercent": 80, "tokensPerMinute": 40},
                                 {"type": "Block", "atPercent": 100}])
    result = b.evaluate([alpha, beta], [series(850)])
    assert [d.state for d in result.decisions] == [State.THROTTLED, State.BLOCKED]
    directive = told(result)
    assert directive.state is State.BLOCKED
    assert directive.budget == "TokenBudget/team-search/beta"
    assert directive.message.startswith("spend in window 24h is 850 tokens of 500 tokens")
    assert directive.tokens_per_minute == 40
    assert directive.allowed_models == frozenset({"medium"})


def test_with_equal_states_the_lowest_rate_wins() -> None:
    fast = token_budget("fast", actions=[{"type": "Throttle", "atPercent": 80,
                                          "tokensPerMinute": 900}])
    slow = token_budget("slow", actions=[{"type": "Throttle", "atPercent": 80,
                                          "tokensPerMinute": 30}])
    assert told(b.evaluate([fast, slow], [series(850)])).tokens_per_minute == 30


def test_the_model_comes_from_the_most_restrictive_budget_that_reroutes() -> None:
    named = token_budget("named", actions=[{"type": "Reroute", "atPercent": 50,
                                            "model": "medium"}])
    cheapest = token_budget("cheapest", actions=[{"type": "Reroute", "atPercent": 50},
                                                 {"type": "Throttle", "atPercent": 80}])
    result = b.evaluate([named, cheapest], [series(850, model="large")])
    assert (told(result).state, told(result).model) == (State.THROTTLED, "tiny")


def test_a_budget_and_a_cluster_budget_both_govern_a_workload() -> None:
    namespaced = token_budget(namespace="qa-1", actions=QA_LADDER)
    cluster = b.cluster_budget(scope="Shared", deniedTiers=["Frontier"], actions=QA_LADDER,
                               limits=[{"window": "24h", "tokens": 100_000}])
    result = b.evaluate([namespaced, cluster], QA_SPEND, namespaces=QA, workloads=QA_WORKLOADS)
    directive = told(result, namespace="qa-1")
    assert (directive.state, directive.budget) == (State.WARNING, "TokenBudget/qa-1/search")
    assert directive.allowed_models == frozenset({"medium", "tiny"})
    assert told(result, namespace="qa-2").state is State.OK


@pytest.mark.parametrize(
    ("directives", "expected"),
    [
        pytest.param([], OK_DIRECTIVE, id="nothing to merge is Ok"),
        pytest.param([Directive(State.WARNING, "x", "LimitReached", "m")],
                     Directive(State.WARNING, "x", "LimitReached", "m"), id="one is itself"),
        pytest.param([Directive(State.OK, "a", "WithinBudget", "", allowed_models=None),
                      Directive(State.OK, "b", "WithinBudget", "",
                                allowed_models=frozenset({"tiny"}))],
                     Directive(State.OK, "a", "WithinBudget", "",
                               allowed_models=frozenset({"tiny"})),
                     id="no list and a list give the list"),
        pytest.param([Directive(State.OK, "a", "WithinBudget", "",
                                allowed_models=frozenset({"large"})),
                      Directive(State.OK, "b", "WithinBudget", "",
                                allowed_models=frozenset({"tiny"}))],
                     Directive(State.OK, "a", "WithinBudget", "", allowed_models=frozenset()),
                     id="disjoint lists allow nothing"),
    ],
)
def test_merge(directives: list[Directive], expected: Directive) -> None:
    assert merge(directives) == expected


# ---------------------------------------------------------------------------
# Coming down the ladder, exceptions without a matching rung, contradicting budgets
# ---------------------------------------------------------------------------


def test_falling_from_blocked_into_warns_margin_gives_warning_not_ok() -> None:
    budget = token_budget(actions=LADDER, hysteresisPercent=5)
    # 47 % of 1000: below Warn at 50 but inside its 5-point margin; Blocked is remembered.
    decision = only(b.evaluate([budget], [series(470)],
                               remembered=b.memory(budget, State.BLOCKED)))
    assert (decision.state, decision.reason) == (State.WARNING, "Hysteresis")


def test_a_warn_capped_exception_on_a_ladder_without_warn_still_says_warning() -> None:
    budget = token_budget(actions=[{"type": "Block", "atPercent": 100}],
                          exceptions=[_exception(1, "Warn")])
    decision = only(b.evaluate([budget], [series(1200)]))
    assert (decision.state, decision.reason) == (State.WARNING, "ExceptionActive")


def test_a_reroute_target_another_budget_denies_is_dropped_from_the_merged_directive() -> None:
    rerouting = Directive(state=State.REROUTED, budget="a", reason="LimitReached", message="",
                          model="large")
    denying = Directive(state=State.OK, budget="b", reason="WithinBudget", message="",
                        allowed_models=frozenset({"medium", "tiny"}))
    merged = merge([rerouting, denying])
    assert merged.state is State.REROUTED and merged.budget == "a"
    assert merged.model is None and merged.allowed_models == {"medium", "tiny"}
