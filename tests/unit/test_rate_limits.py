"""The rate-limit trigger: reroute a model to its fallback while its provider rate-limits it.

Covers (pure: budgets, catalog, 429 counts and memory in, directives out):
- a share of 429 answers at the threshold reroutes the workload's model to its
  first fallback (state Rerouted, reason RateLimited, the use-model target);
  below it nothing changes; a model with fewer than minRequests is not judged;
- hysteresis: a rerouted model stays rerouted until its share falls below
  threshold - hysteresis, then goes back; a model not rerouted before needs
  the full threshold;
- the fallback chain skips fallbacks the budget denies (deniedModels,
  deniedTiers, allowedModels) and fallbacks that are themselves rate-limited;
  with none left nothing is rerouted and the decision says so;
- a Block wins; a spend Reroute to a rate-limited model goes on to its fallback;
- counters that could not be read start no reroute, and lift one in place;
- the catalog's trigger applies to budgets without one, the budget's own wins;
  no trigger anywhere: 429 counts change nothing;
- rules: fallbacks must name other catalog models; the hysteresis must be below
  the threshold; the EnvoyAIGateway preset needs a 429 counter named;
- presets: the PromQL reads each exporter's request and 429 counters by the
  labels that carry the namespace and the model.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from token_budget.api import rules
from token_budget.api import v1alpha1 as api
from token_budget.api.conditions import Reason
from token_budget.metrics import promql
from token_budget.policy import engine, ratelimits, ratesources
from token_budget.policy.catalog import Catalog
from token_budget.policy.decisions import Decision, Directive
from token_budget.policy.inputs import BudgetKey, Memory, ScopeKey, SpendSnapshot
from token_budget.policy.ratesources import RateSample
from unit import builders as b
from unit.builders import NAMESPACE, NOW

TRIGGER = {"thresholdPercent": 20, "windowSeconds": 300, "minRequests": 10,
           "hysteresisPercent": 5}


def _catalog(rate_limit: dict[str, Any] | None = None) -> Catalog:
    body = {
        "apiVersion": api.API_VERSION, "kind": "ModelCatalog", "metadata": {"name": "prices"},
        "spec": {"models": [
            {"name": "large", "tier": "Frontier", "provider": "openai",
             "pricing": {"input": "10", "output": "30"},
             "rateLimitFallbacks": ["large-eu", "large-azure", "medium"]},
            {"name": "large-eu", "tier": "Frontier", "provider": "openai",
             "pricing": {"input": "10", "output": "30"}},
            {"name": "large-azure", "tier": "Frontier", "provider": "azure",
             "pricing": {"input": "10", "output": "30"}},
            {"name": "medium", "tier": "Standard", "pricing": {"input": "1", "output": "3"},
             "rateLimitFallbacks": ["tiny"]},
            {"name": "tiny", "tier": "Economy", "pricing": {"input": "0.1", "output": "0.3"}},
        ], **({"rateLimit": rate_limit} if rate_limit else {})},
    }
    return Catalog([api.ModelCatalog.model_validate(body)])


def _budget(**fields: Any) -> api.TokenBudget:
    fields.setdefault("rateLimit", TRIGGER)
    if fields["rateLimit"] is None:
        del fields["rateLimit"]
    fields.setdefault("limits", [{"window": "24h", "tokens": 1_000_000}])
    return b.token_budget(**fields)


def _evaluate(budget: api.TokenBudget, counts: dict[str, tuple[float, float]], *,
              model: str = "large", spent: float = 1000, remembered: tuple[str, ...] = (),
              catalog: Catalog | None = None, error: str | None = None,
              read: bool = True, since: dt.datetime = NOW - dt.timedelta(minutes=5)
              ) -> tuple[Decision, Directive | None]:
    """Evaluate one budget whose Deployment ``agent`` declares ``model``; ``counts`` are
    (requests, 429 answers) per model over the trigger's window."""
    cat = catalog or _catalog()
    snap = b.snapshot([budget], [b.series(spent, workload="agent", model=model)])
    keys = ratelimits.plan([budget], cat)
    samples = tuple(RateSample(NAMESPACE, m, r, limited) for m, (r, limited) in counts.items())
    snap = SpendSnapshot(
        **{**snap.__dict__,
           "rate_limits": {k: samples for k in keys} if read and error is None else {},
           "rate_limit_errors": {k: error for k in keys} if error else {}})
    memory = {ScopeKey(BudgetKey.of(budget)): Memory(
        api.State.OK, NOW - dt.timedelta(minutes=1),
        tuple((m, since) for m in remembered))}
    world = engine.World(budgets=[budget], catalog=cat, namespaces={NAMESPACE: {}},
                         workloads=[b.workload(models=[model])], memory=memory)
    result = engine.evaluate(world, snap, NOW)
    [decision] = result.decisions
    return decision, result.directives.get(b.key())


def test_a_model_over_the_threshold_is_rerouted_to_its_first_fallback() -> None:
    decision, directive = _evaluate(_budget(), {"large": (100, 30)})
    assert directive is not None
    assert (directive.state, directive.reason, directive.model) == (
        api.State.REROUTED, Reason.RATE_LIMITED, "large-eu")
    assert "large is rate-limited (30% of 100 requests answered 429)" in directive.message
    [limited] = decision.rate_limited
    assert (limited.model, limited.share_percent, limited.fallback, limited.since) == (
        "large", 30, "large-eu", NOW)
    # The scope's own state stays the spend ladder's.
    assert decision.state is api.State.OK and decision.reason is Reason.WITHIN_BUDGET


def test_a_share_exactly_at_the_threshold_reroutes() -> None:
    _, directive = _evaluate(_budget(), {"large": (100, 20)})
    assert directive is not None and directive.model == "large-eu"


def test_a_share_below_the_threshold_changes_nothing() -> None:
    decision, directive = _evaluate(_budget(), {"large": (100, 19)})
    assert directive is not None and directive.model is None
    assert directive.state is api.State.OK and decision.rate_limited == ()


def test_fewer_than_min_requests_are_not_judged() -> None:
    decision, directive = _evaluate(_budget(), {"large": (9, 9)})
    assert directive is not None and directive.model is None and decision.rate_limited == ()


def test_another_models_rate_limit_leaves_the_workload_alone() -> None:
    decision, directive = _evaluate(_budget(), {"medium": (100, 90)}, model="large")
    assert directive is not None and directive.model is None
    assert [r.model for r in decision.rate_limited] == ["medium"]


def test_a_rerouted_model_holds_within_the_hysteresis_and_keeps_its_since() -> None:
    decision, directive = _evaluate(_budget(), {"large": (100, 16)}, remembered=("large",))
    assert directive is not None and directive.model == "large-eu"
    assert decision.rate_limited[0].since == NOW - dt.timedelta(minutes=5)


def test_a_rerouted_model_goes_back_below_threshold_minus_hysteresis() -> None:
    decision, directive = _evaluate(_budget(), {"large": (100, 14)}, remembered=("large",))
    assert directive is not None and directive.model is None
    assert directive.state is api.State.OK and decision.rate_limited == ()


def test_a_model_not_rerouted_before_needs_the_full_threshold() -> None:
    _, directive = _evaluate(_budget(), {"large": (100, 16)})
    assert directive is not None and directive.model is None


def test_a_rerouted_model_whose_traffic_left_goes_back() -> None:
    # Rerouted, its requests fall under minRequests: no evidence any more, it is tried again.
    _, directive = _evaluate(_budget(), {"large": (3, 3)}, remembered=("large",))
    assert directive is not None and directive.model is None


def test_the_chain_skips_a_fallback_that_is_itself_rate_limited() -> None:
    _, directive = _evaluate(_budget(), {"large": (100, 50), "large-eu": (50, 40)})
    assert directive is not None and directive.model == "large-azure"


@pytest.mark.parametrize(("fields", "expected"), [
    pytest.param({"deniedModels": ["large-eu"]}, "large-azure", id="denied-model"),
    pytest.param({"allowedModels": ["large", "medium"]}, "medium", id="not-allowed"),
    pytest.param({"deniedModels": ["large-*"], "deniedTiers": ["Standard"]}, None,
                 id="denied-tier-leaves-none"),
])
def test_the_chain_skips_fallbacks_the_budget_does_not_allow(
        fields: dict[str, Any], expected: str | None) -> None:
    decision, directive = _evaluate(_budget(**fields), {"large": (100, 50)})
    assert directive is not None and directive.model == expected
    assert decision.rate_limited[0].fallback == expected


def test_no_fallback_left_reroutes_nothing_and_says_so() -> None:
    decision, directive = _evaluate(
        _budget(), {"large": (100, 50), "large-eu": (100, 50), "large-azure": (100, 50),
                    "medium": (100, 50)})
    assert directive is not None and directive.model is None
    assert directive.state is api.State.OK
    large = next(r for r in decision.rate_limited if r.model == "large")
    assert large.fallback is None
    assert "no fallback is allowed and free" in ratelimits.describe([large])


def test_a_block_wins() -> None:
    budget = _budget(actions=[{"type": "Block", "atPercent": 100}])
    decision, directive = _evaluate(budget, {"large": (100, 50)}, spent=2_000_000)
    assert directive is not None and directive.blocked and directive.model is None
    assert decision.state is api.State.BLOCKED


def test_a_throttle_keeps_its_rate_and_gets_the_fallback() -> None:
    budget = _budget(actions=[{"type": "Throttle", "atPercent": 50, "tokensPerMinute": 500}])
    _, directive = _evaluate(budget, {"large": (100, 50)}, spent=600_000)
    assert directive is not None
    assert (directive.state, directive.tokens_per_minute, directive.model) == (
        api.State.THROTTLED, 500, "large-eu")


def test_a_spend_reroute_to_a_rate_limited_model_goes_on_to_its_fallback() -> None:
    budget = _budget(actions=[{"type": "Reroute", "atPercent": 50, "model": "medium"}])
    _, directive = _evaluate(budget, {"medium": (100, 50)}, spent=600_000)
    assert directive is not None
    assert (directive.state, directive.reason, directive.model) == (
        api.State.REROUTED, Reason.LIMIT_REACHED, "tiny")


def test_a_rate_limit_never_sends_a_spend_reroute_back_to_the_model_it_left() -> None:
    # The ladder moved the agent off large to medium; medium answers 429 and the catalog
    # lists large first among medium's fallbacks: the next one (tiny) is taken, not large.
    models = [m.model_dump(mode="json", by_alias=True, exclude_none=True)
              for m in _catalog().models.values()]
    for m in models:
        if m["name"] == "medium":
            m["rateLimitFallbacks"] = ["large", "tiny"]
    body = {"apiVersion": api.API_VERSION, "kind": "ModelCatalog",
            "metadata": {"name": "prices"}, "spec": {"models": models}}
    budget = _budget(actions=[{"type": "Reroute", "atPercent": 50, "model": "medium"}])
    _, directive = _evaluate(budget, {"medium": (100, 50)}, spent=600_000,
                             catalog=Catalog([api.ModelCatalog.model_validate(body)]))
    assert directive is not None and directive.model == "tiny"


def test_a_spend_reroute_away_from_a_rate_limited_model_keeps_its_target() -> None:
    budget = _budget(actions=[{"type": "Reroute", "atPercent": 50, "model": "medium"}])
    _, directive = _evaluate(budget, {"large": (100, 50)}, spent=600_000)
    assert directive is not None and directive.model == "medium"


def test_unreadable_counters_start_no_reroute_and_lift_one_in_place() -> None:
    decision, directive = _evaluate(_budget(), {"large": (100, 90)}, remembered=("large",),
                                    error="Prometheus at http://p cannot be reached")
    assert directive is not None and directive.model is None
    assert directive.state is api.State.OK
    assert decision.rate_limit_error == "Prometheus at http://p cannot be reached"


def test_counters_not_read_at_all_start_no_reroute() -> None:
    decision, directive = _evaluate(_budget(), {"large": (100, 90)}, read=False)
    assert directive is not None and directive.model is None
    assert decision.rate_limit_error is not None and "were not read" in decision.rate_limit_error


def test_the_catalogs_trigger_applies_to_a_budget_without_one() -> None:
    _, directive = _evaluate(_budget(rateLimit=None), {"large": (100, 30)},
                             catalog=_catalog(TRIGGER))
    assert directive is not None and directive.model == "large-eu"


def test_the_budgets_own_trigger_wins_over_the_catalogs() -> None:
    strict = {**TRIGGER, "thresholdPercent": 50}
    _, directive = _evaluate(_budget(rateLimit=strict), {"large": (100, 30)},
                             catalog=_catalog(TRIGGER))
    assert directive is not None and directive.model is None


def test_without_a_trigger_429s_change_nothing() -> None:
    budget = _budget(rateLimit=None)
    assert ratelimits.plan([budget], _catalog()) == ()
    decision, directive = _evaluate(budget, {"large": (100, 100)})
    assert directive is not None and directive.model is None
    assert not decision.rate_limit_on


def test_samples_of_other_namespaces_do_not_count() -> None:
    budget = _budget()
    cat = _catalog()
    snap = b.snapshot([budget], [b.series(1000, workload="agent", model="large")])
    [key] = ratelimits.plan([budget], cat)
    snap = SpendSnapshot(**{**snap.__dict__, "rate_limits": {
        key: (RateSample("other-team", "large", 100, 100),)}})
    world = engine.World(budgets=[budget], catalog=cat, namespaces={NAMESPACE: {}},
                         workloads=[b.workload(models=["large"])])
    result = engine.evaluate(world, snap, NOW)
    assert result.directives[b.key()].model is None


# -- rules ---------------------------------------------------------------------------


def _catalog_problems(models: list[dict[str, Any]], **spec: Any) -> list[str]:
    obj = api.ModelCatalog.model_validate({
        "apiVersion": api.API_VERSION, "kind": "ModelCatalog", "metadata": {"name": "c"},
        "spec": {"models": models, **spec}})
    return [str(p) for p in rules.problems(obj)]


def _m(name: str, *fallbacks: str) -> dict[str, Any]:
    return {"name": name, "tier": "Standard", "pricing": {"input": "1", "output": "1"},
            "rateLimitFallbacks": list(fallbacks)}


def test_a_fallback_must_be_another_model_of_the_catalog() -> None:
    found = _catalog_problems([_m("a", "a", "b", "nowhere", "b"), _m("b")])
    assert found == [
        "spec.models[0].rateLimitFallbacks[0]: must not name the model itself",
        "spec.models[0].rateLimitFallbacks[2]: must name a model of this catalog; "
        "'nowhere' is not one",
        "spec.models[0].rateLimitFallbacks[3]: must be unique; 'b' is named twice",
    ]
    assert _catalog_problems([_m("a", "b"), _m("b", "a")]) == []  # a region each way


def test_the_hysteresis_must_leave_room_below_the_threshold() -> None:
    bad = {"thresholdPercent": 5, "hysteresisPercent": 5}
    assert _catalog_problems([_m("a")], rateLimit=bad) == [
        "spec.rateLimit.hysteresisPercent: must be less than thresholdPercent (5): a reroute "
        "would never lift"]
    budget = _budget(rateLimit=bad)
    assert [str(p) for p in rules.problems(budget)] == [
        "spec.rateLimit.hysteresisPercent: must be less than thresholdPercent (5): a reroute "
        "would never lift"]


def test_envoy_ai_gateway_needs_a_429_counter_named() -> None:
    budget = _budget(source={"preset": "EnvoyAIGateway"})
    [problem] = rules.problems(budget)
    assert str(problem).startswith("spec.source.metrics.rateLimitedRequests: must be set")
    named = _budget(source={"preset": "EnvoyAIGateway",
                            "metrics": {"rateLimitedRequests": "gateway_429_total"}})
    assert rules.problems(named) == []
    rs = ratesources.resolve(named.spec.source)
    assert rs is not None and rs.limited.metric == "gateway_429_total"


# -- presets ---------------------------------------------------------------------------


@pytest.mark.parametrize(("preset", "parts"), [
    pytest.param("Counters", ['llm_requests_total{status="429"}', "by (namespace, model)"],
                 id="counters"),
    pytest.param("LiteLLM", ["litellm_deployment_total_requests_total",
                             'litellm_deployment_failure_responses_total{exception_status="429"}',
                             "by (team_alias, requested_model)"], id="litellm"),
    pytest.param("OpenTelemetry", [
        'gen_ai_client_operation_duration_seconds_count{error_type=~"429|.*RateLimit.*|'
        '.*rate_limit.*"}', "by (k8s_namespace_name, gen_ai_request_model)"], id="otel"),
])
def test_each_preset_reads_its_exporters_request_and_429_counters(
        preset: str, parts: list[str]) -> None:
    rs = ratesources.resolve(api.SpendSource.model_validate({"preset": preset}))
    assert rs is not None
    text = promql.rate_limits(rs, 300)
    for part in parts:
        assert part in text
    assert f'"{promql.KIND_LABEL}", "{promql.RATE_REQUESTS}"' in text
    assert f'"{promql.KIND_LABEL}", "{promql.RATE_LIMITED}"' in text


def test_overrides_name_the_counters_and_the_namespace_label() -> None:
    rs = ratesources.resolve(api.SpendSource.model_validate({
        "preset": "Counters", "metrics": {"requests": "calls_total",
                                          "rateLimitedRequests": "throttled_total"},
        "labels": {"namespace": "team", "model": "llm"}}))
    assert rs is not None
    assert (rs.requests.metric, rs.limited.metric, rs.limited.matchers) == (
        "calls_total", "throttled_total", ())
    assert (rs.namespace_label, rs.model_label, rs.preset) == ("team", "llm", "Counters*")


# -- reading, reuse, status ------------------------------------------------------------


def test_budgets_sharing_a_source_and_window_share_one_query() -> None:
    cat = _catalog()
    same = [_budget(name="a"), _budget(name="b", namespace="other")]
    assert len(ratelimits.plan(same, cat)) == 1
    longer = _budget(name="c", rateLimit={**TRIGGER, "windowSeconds": 600})
    otel = _budget(name="d", source={"preset": "OpenTelemetry"})
    assert len(ratelimits.plan([*same, longer, otel], cat)) == 3


def test_an_evaluation_handed_the_previous_one_sees_new_429_counts() -> None:
    budget, cat = _budget(), _catalog()
    [key] = ratelimits.plan([budget], cat)
    base = b.snapshot([budget], [b.series(1000, workload="agent", model="large")])
    world = engine.World(budgets=[budget], catalog=cat, namespaces={NAMESPACE: {}},
                         workloads=[b.workload(models=["large"])])

    def snap(limited: float) -> SpendSnapshot:
        return SpendSnapshot(**{**base.__dict__, "rate_limits": {
            key: (RateSample(NAMESPACE, "large", 100, limited),)}})

    quiet = engine.evaluate(world, snap(0), NOW)
    assert quiet.directives[b.key()].model is None
    busy = engine.evaluate(world, snap(50), NOW, previous=quiet)
    assert busy.directives[b.key()].model == "large-eu"
    assert busy.directives == engine.evaluate(world, snap(50), NOW).directives


def _status(decision: Decision, old: dict[str, Any] | None = None) -> dict[str, Any]:
    from token_budget.handlers import status as statuses

    return statuses.budget_status(_budget(), [decision], "USD", NOW, 1, old)


def _condition(status: dict[str, Any]) -> dict[str, Any]:
    [c] = [c for c in status["conditions"] if c["type"] == "RateLimited"]
    return c


def test_the_status_lists_rate_limited_models_and_where_their_traffic_goes() -> None:
    decision, _ = _evaluate(_budget(), {"large": (100, 30)})
    status = _status(decision)
    assert status["rateLimited"] == [{"model": "large", "sharePercent": 30,
                                      "fallback": "large-eu", "since": "2025-11-20T12:00:00Z"}]
    c = _condition(status)
    assert (c["status"], c["reason"]) == ("True", "RateLimited")
    assert "large answers 429 to more than the threshold allows: rerouted to large-eu" \
        in c["message"]


def test_no_fallback_left_is_a_condition_reason() -> None:
    decision, _ = _evaluate(_budget(deniedModels=["large-*", "medium"]), {"large": (100, 30)})
    status = _status(decision)
    assert status["rateLimited"][0].get("fallback") is None
    assert _condition(status)["reason"] == "NoFallbackAvailable"


def test_unreadable_counters_make_the_condition_unknown() -> None:
    decision, _ = _evaluate(_budget(), {}, error="Prometheus refused the query")
    c = _condition(_status(decision))
    assert (c["status"], c["reason"]) == ("Unknown", "RateLimitUnknown")
    assert "Prometheus refused the query" in c["message"]


def test_without_a_trigger_the_status_has_no_rate_limit_condition() -> None:
    decision, _ = _evaluate(_budget(rateLimit=None), {"large": (100, 90)})
    status = _status(decision)
    assert "rateLimited" not in status
    assert all(c["type"] != "RateLimited" for c in status["conditions"])


def test_a_moving_share_alone_writes_no_status_and_memory_reads_the_status_back() -> None:
    from token_budget.handlers import status as statuses

    first, _ = _evaluate(_budget(), {"large": (100, 30)})
    old = _status(first)
    parsed = _budget().model_copy(update={"status": api.BudgetStatus.model_validate(old)})
    [memory] = statuses.memory_of(parsed, BudgetKey.of).values()
    assert memory.rate_limited == (("large", NOW),)
    later, _ = _evaluate(_budget(), {"large": (100, 35)}, remembered=("large",), since=NOW)
    new = statuses.budget_status(parsed, [later], "USD", NOW + dt.timedelta(seconds=5), 1, old)
    assert new["rateLimited"][0]["sharePercent"] == 35
    assert not statuses.changed(old, new, NOW + dt.timedelta(seconds=5), 300)


def test_a_per_namespace_cluster_budget_judges_each_namespace_on_its_own_429s() -> None:
    from token_budget.handlers import status as statuses

    budget = b.cluster_budget(rateLimit=TRIGGER, limits=[{"window": "24h", "tokens": 10**9}])
    cat = _catalog()
    spaces = {"qa-1": {"environment": "qa"}, "qa-2": {"environment": "qa"}}
    base = b.snapshot([budget], [b.series(10, namespace=ns, workload="agent", model="large")
                                 for ns in spaces])
    [key] = ratelimits.plan([budget], cat)
    snap = SpendSnapshot(**{**base.__dict__, "rate_limits": {key: (
        RateSample("qa-1", "large", 100, 60), RateSample("qa-2", "large", 100, 1))}})
    world = engine.World(budgets=[budget], catalog=cat, namespaces=spaces,
                         workloads=[b.workload(namespace=ns, models=["large"]) for ns in spaces])
    result = engine.evaluate(world, snap, NOW)
    assert result.directives[b.key(namespace="qa-1")].model == "large-eu"
    assert result.directives[b.key(namespace="qa-2")].model is None
    status = statuses.budget_status(budget, list(result.decisions), "USD", NOW, 2, None)
    assert status["rateLimited"] == [{"model": "large", "namespace": "qa-1", "sharePercent": 60,
                                      "fallback": "large-eu", "since": "2025-11-20T12:00:00Z"}]
    parsed = budget.model_copy(update={"status": api.BudgetStatus.model_validate(status)})
    memory = statuses.memory_of(parsed, BudgetKey.of)
    assert memory[ScopeKey(BudgetKey.of(budget), "qa-1")].rate_limited == (("large", NOW),)
    assert memory[ScopeKey(BudgetKey.of(budget), "qa-2")].rate_limited == ()


def _round(budget: api.Budget, shares: dict[str, int], old: dict[str, Any] | None,
           now: dt.datetime, *, spend_error: str | None = None,
           events: list[tuple[str, str]] | None = None, rates: Any = None,
           requests: int = 100) -> tuple[str | None, dict[str, Any]]:
    """One evaluation of ``budget`` (Deployment ``agent`` in each namespace, calling
    ``large``) whose status is read back from ``old`` and whose in-process memory is
    ``rates`` (a RateMemory; None: a fresh one, as after a restart), as the operator does;
    the model the first directive names, the new status; the Events appended to
    ``events``."""
    from token_budget.handlers import status as statuses

    rates = rates if rates is not None else statuses.RateMemory()

    if old is not None:
        budget = budget.model_copy(update={"status": api.BudgetStatus.model_validate(old)})
    cat = _catalog()
    snap = b.snapshot([budget], [b.series(1000, namespace=ns, workload="agent", model="large")
                                 for ns in shares], now=now,
                      errors={api.Preset.COUNTERS: spend_error} if spend_error else None)
    samples = tuple(RateSample(ns, "large", requests, requests * p / 100)
                    for ns, p in shares.items())
    snap = SpendSnapshot(**{**snap.__dict__, "rate_limits": {
        k: samples for k in ratelimits.plan([budget], cat)}})
    world = engine.World(budgets=[budget], catalog=cat,
                         namespaces={ns: {"environment": "qa"} for ns in shares},
                         workloads=[b.workload(namespace=ns, models=["large"]) for ns in shares],
                         memory=rates.merged(statuses.memory_of(budget, BudgetKey.of)))
    result = engine.evaluate(world, snap, now)
    new = statuses.budget_status(budget, list(result.decisions), "USD", now, 1, old)
    said = rates.update(BudgetKey.of(budget), list(result.decisions), old or {})
    if events is not None:
        events.extend((reason, message) for _, reason, message in said)
    first = b.key(namespace=next(iter(shares)))
    held = first in result.held
    d = result.directives.get(first)
    return ("held" if held else d.model if d else None), new


def test_an_unreadable_spend_keeps_the_rate_limit_memory_and_its_hysteresis() -> None:
    budget = _budget()
    events: list[tuple[str, str]] = []
    later = [NOW + dt.timedelta(seconds=30 * i) for i in range(3)]
    model, st = _round(budget, {NAMESPACE: 30}, None, later[0], events=events)
    assert model == "large-eu"
    model, st = _round(budget, {NAMESPACE: 30}, st, later[1], events=events,
                       spend_error="connection refused")
    assert model == "held"  # Hold: the reroute's annotation stays as it is
    assert st["rateLimited"][0]["fallback"] == "large-eu"
    assert _condition(st)["reason"] == "RateLimited"
    model, st = _round(budget, {NAMESPACE: 17}, st, later[2], events=events)
    assert model == "large-eu"  # 17 % is within the hysteresis (20 - 5)
    assert [r for r, _ in events] == ["RateLimited"]  # no false RateLimitRecovered


def test_partitions_remember_a_rate_limit_in_one_row_per_namespace_and_model() -> None:
    from token_budget.handlers import status as statuses

    owner = "tokenbudget.io/owner"
    budget = _budget(partition={"label": "user", "podLabel": owner})
    cat = _catalog()

    def run(share: int, old: dict[str, Any] | None, now: dt.datetime
            ) -> tuple[engine.Evaluation, dict[str, Any]]:
        parsed = budget if old is None else budget.model_copy(
            update={"status": api.BudgetStatus.model_validate(old)})
        snap = b.snapshot([parsed], [b.series(1000, workload=f"agent-{u}", model="large",
                                              user=u) for u in ("alice", "bob")], now=now)
        snap = SpendSnapshot(**{**snap.__dict__, "rate_limits": {
            k: (RateSample(NAMESPACE, "large", 100, share),)
            for k in ratelimits.plan([parsed], cat)}})
        world = engine.World(
            budgets=[parsed], catalog=cat, namespaces={NAMESPACE: {}},
            workloads=[b.workload(name=f"agent-{u}", models=["large"],
                                  labels={**b.AGENT, owner: u}) for u in ("alice", "bob")],
            memory=statuses.memory_of(parsed, BudgetKey.of))
        result = engine.evaluate(world, snap, now)
        return result, statuses.partitioned_status(parsed, list(result.decisions), "USD", now,
                                                   2, old)

    result, st = run(30, None, NOW)
    assert st["rateLimited"] == [{"model": "large", "sharePercent": 30, "fallback": "large-eu",
                                  "since": "2025-11-20T12:00:00Z"}]
    later = NOW + dt.timedelta(seconds=30)
    result, new = run(17, st, later)  # within the hysteresis (20 - 5)
    for u in ("alice", "bob"):
        assert result.directives[b.key(name=f"agent-{u}")].model == "large-eu"
    assert new["rateLimited"] == [{"model": "large", "sharePercent": 17,
                                   "fallback": "large-eu", "since": "2025-11-20T12:00:00Z"}]
    assert not statuses.changed(st, new, later, 300)  # "since" kept: nothing to write


def test_pairs_past_the_status_rows_keep_their_hysteresis_and_events() -> None:
    from token_budget.handlers import status as statuses

    budget = b.cluster_budget(rateLimit=TRIGGER, limits=[{"window": "24h", "tokens": 10**9}])
    spaces = [f"ns{i:02d}" for i in range(25)]
    rates = statuses.RateMemory()
    events: list[tuple[str, str]] = []
    _, st = _round(budget, dict.fromkeys(spaces, 30), None, NOW, rates=rates, events=events)
    assert len(st["rateLimited"]) == statuses.RATE_LIMITED_SHOWN
    assert "25 (namespace, model) pairs" in _condition(st)["message"]
    assert len(events) == 25  # one RateLimited per pair, listed in the status or not
    later = NOW + dt.timedelta(seconds=30)
    parsed = budget.model_copy(update={"status": api.BudgetStatus.model_validate(st)})
    memory = rates.merged(statuses.memory_of(parsed, BudgetKey.of))
    snap = b.snapshot([parsed], [b.series(1000, namespace=ns, workload="agent", model="large")
                                 for ns in spaces], now=later)
    cat = _catalog()
    snap = SpendSnapshot(**{**snap.__dict__, "rate_limits": {
        k: tuple(RateSample(ns, "large", 100, 17) for ns in spaces)
        for k in ratelimits.plan([parsed], cat)}})
    world = engine.World(budgets=[parsed], catalog=cat,
                         namespaces={ns: {"environment": "qa"} for ns in spaces},
                         workloads=[b.workload(namespace=ns, models=["large"]) for ns in spaces],
                         memory=memory)
    result = engine.evaluate(world, snap, later)
    assert all(result.directives[b.key(namespace=ns)].model == "large-eu" for ns in spaces)
    assert rates.update(BudgetKey.of(budget), list(result.decisions), st) == []


def test_a_model_that_keeps_answering_429_is_announced_once_not_every_half_open_cycle() -> None:
    from token_budget.handlers import status as statuses

    budget = _budget()
    rates = statuses.RateMemory()
    events: list[tuple[str, str]] = []
    st: dict[str, Any] | None = None
    now = NOW
    seen = []
    for _ in range(10):  # rerouted; its traffic dries up (half-open lift); 429s again
        for requests in (100, 4):
            model, st = _round(budget, {NAMESPACE: 30}, st, now, rates=rates, events=events,
                               requests=requests)
            seen.append(model)
            now += dt.timedelta(seconds=150)
        assert _condition(st)["reason"] == "Probing"
    assert seen == ["large-eu", None] * 10  # the lift still happens: the model is tried again
    assert len(events) <= 2, events
    model, st = _round(budget, {NAMESPACE: 1}, st, now, rates=rates, events=events)
    assert model is None  # judged on enough requests: recovered, and said so
    assert [r for r, _ in events] == ["RateLimited", "RateLimitRecovered"]
