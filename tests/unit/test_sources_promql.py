"""Spend sources, the query planner and the PromQL they produce.

Covers:
- the exact PromQL of each preset (Counters, LiteLLM, OpenTelemetry,
  EnvoyAIGateway) for one window, and of an outcome counter;
- metric-name and label-name overrides; extra group labels from spend
  matchers; string quoting;
- the planner makes one query per (source, window) however many budgets there
  are (1, 10 and 1000 budgets cost the same), distinguishes sources and
  calendar zones, and asks calendar windows for ``now - window start``;
- outcome counters are queried once per (metric, namespace label, window).
"""

from __future__ import annotations

import datetime as dt
import re

import pytest

from token_budget.api import v1alpha1 as api
from token_budget.metrics import promql
from token_budget.policy import planner, sources
from token_budget.policy.sources import Kind, Selector
from token_budget.policy.windows import WindowKey
from unit import builders as b
from unit.builders import NOW

COUNTERS = sources.resolve(api.SpendSource())
SEARCH_LIMITS = [{"window": "Month", "timeZone": "Europe/Berlin", "cost": "2000.00"},
                 {"window": "24h", "cost": "500.00"}]


def _source(**body: object) -> sources.ResolvedSource:
    return sources.resolve(api.SpendSource.model_validate(body))


# ---------------------------------------------------------------------------
# Presets and PromQL
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        pytest.param(
            "Counters",
            'label_replace(sum by (namespace, pod, model) (increase(llm_tokens_total'
            '{token_type="input"}[86400s])), "tb_kind", "input", "", "") or '
            'label_replace(sum by (namespace, pod, model) (increase(llm_tokens_total'
            '{token_type="output"}[86400s])), "tb_kind", "output", "", "") or '
            'label_replace(sum by (namespace, pod, model) (increase(llm_tokens_total'
            '{token_type="cached_input"}[86400s])), "tb_kind", "cached_input", "", "")',
            id="Counters reads llm_tokens_total by token type"),
        pytest.param(
            "LiteLLM",
            'label_replace(sum by (team_alias, api_key_alias, model) (increase('
            'litellm_input_tokens_metric_total[86400s])), "tb_kind", "input", "", "") or '
            'label_replace(sum by (team_alias, api_key_alias, model) (increase('
            'litellm_output_tokens_metric_total[86400s])), "tb_kind", "output", "", "") or '
            'label_replace(sum by (team_alias, api_key_alias, model) (increase('
            'litellm_input_cached_tokens_metric_total[86400s])), "tb_kind", "cached_input", '
            '"", "") or '
            'label_replace(sum by (team_alias, api_key_alias, model) (increase('
            'litellm_spend_metric_total[86400s])), "tb_kind", "cost", "", "")',
            id="LiteLLM reads the proxy's token, cached-token and spend counters"),
        pytest.param(
            "OpenTelemetry",
            'label_replace(sum by (k8s_namespace_name, k8s_pod_name, gen_ai_request_model) '
            '(increase(gen_ai_client_token_usage_sum{gen_ai_token_type="input"}[86400s])), '
            '"tb_kind", "input", "", "") or '
            'label_replace(sum by (k8s_namespace_name, k8s_pod_name, gen_ai_request_model) '
            '(increase(gen_ai_client_token_usage_sum{gen_ai_token_type="output"}[86400s])), '
            '"tb_kind", "output", "", "") or '
            'label_replace(sum by (k8s_namespace_name, k8s_pod_name, gen_ai_request_model) '
            '(increase(gen_ai_client_inference_usage_cache_read_input_tokens_total[86400s])), '
            '"tb_kind", "cached_input", "", "")',
            id="OpenTelemetry reads gen_ai client token usage and the cache reads' counter"),
        pytest.param(
            "EnvoyAIGateway",
            'label_replace(sum by (k8s_namespace_name, k8s_pod_name, gen_ai_request_model) '
            '(increase(gen_ai_client_token_usage_sum{gen_ai_token_type="input"}[86400s])), '
            '"tb_kind", "input", "", "") or '
            'label_replace(sum by (k8s_namespace_name, k8s_pod_name, gen_ai_request_model) '
            '(increase(gen_ai_client_token_usage_sum{gen_ai_token_type="output"}[86400s])), '
            '"tb_kind", "output", "", "") or '
            'label_replace(sum by (k8s_namespace_name, k8s_pod_name, gen_ai_request_model) '
            '(increase(gen_ai_client_token_usage_sum{gen_ai_token_type="cached_input"}'
            '[86400s])), "tb_kind", "cached_input", "", "")',
            id="EnvoyAIGateway reads the gateway's token usage by type, never total"),
    ],
)
def test_each_preset_reads_its_exporter_in_one_query(preset: str, expected: str) -> None:
    # `increase(S[r])` above stands for the exact per-series increase, promql.increase(S, r).
    text = promql.spend(_source(preset=preset), 86400)
    rows, gaps = text.split(' or label_replace(count by', 1)
    assert rows == _exact(expected)
    # Then the two gap rows: series per namespace whose start a scrape gap hid.
    assert f'"tb_kind", "{promql.GAP_BRIDGED}"' in gaps
    assert gaps.endswith(f'"tb_kind", "{promql.GAP_UNKNOWN}", "", "")')


def _exact(text: str) -> str:
    return re.sub(r"increase\(([^\[]+)\[(\d+)s\]\)",
                  lambda m: promql.increase(m[1], int(m[2])), text)


def test_the_exact_increase_takes_the_first_case_that_applies_in_order() -> None:
    text = promql.increase("m", 3600)
    start = "last_over_time(m[3600s] offset 3600s)"  # within the horizon, an hour here
    last, first = "last_over_time(m[3600s])", "min_over_time(m[3600s])"
    cases = text.split(" or ", 3)  # `or` keeps the first case a series matches
    # The start counts only where the counter did not fall below it before the window's
    # first sample (a restart during a gap: then all of the last value was spent).
    assert cases[0] == (f"(({last} - {start} * ({first} >= bool {start}))"
                        " unless (resets(m[3600s]) > 0))")
    assert cases[1] == "(increase(m[3600s]) and (resets(m[3600s]) > 0))"
    # Born in the window only with evidence (its target not down at the start while
    # Prometheus scraped); otherwise only the growth seen, never the lifetime.
    assert "unless on (job, instance) (up offset 3600s == 0)" in cases[2]
    assert "and on () (count(up offset 3600s) > 0)" in cases[2]
    assert cases[3] == f"(({last} - {first}) unless {start})"


def test_the_window_is_read_eight_times_a_series_and_the_gap_rows_add_one() -> None:
    """The cost of exactness, in range reads (a plain increase() reads the window once)."""
    assert promql.increase("m", 86400).count("[86400s]") == 8
    text = promql.spend(COUNTERS, 86400)
    # Three counters, and the gap rows read the first one's window 3 more times.
    assert text.count("[86400s]") == 8 * 3 + 3


@pytest.mark.parametrize(("window", "horizon"), [
    pytest.param(60, 300, id="a minute looks back the lookback"),
    pytest.param(3600, 3600, id="an hour looks back an hour"),
    pytest.param(30 * 86400, 3 * 3600, id="a month looks back three hours at most"),
])
def test_the_start_value_is_looked_for_within_a_horizon_bounded_by_the_window(
        window: int, horizon: int) -> None:
    assert promql.horizon(window) == horizon
    assert f"[{horizon}s] offset {window}s)" in promql.increase("m", window)


def test_the_recording_rules_bridge_gaps_as_far_as_the_longest_horizon() -> None:
    rules = promql.rules_file([COUNTERS])
    expr = rules["groups"][0]["rules"][0]["expr"]  # type: ignore[index]
    assert f"[{promql.MAX_HORIZON_SECONDS}s] offset 3600s)" in expr


def test_only_litellm_reports_money_itself() -> None:
    assert [p.value for p in api.Preset if _source(preset=p.value).has_cost] == ["LiteLLM"]


def test_an_overridden_metric_counts_only_its_own_kind() -> None:
    rs = _source(preset="Counters", metrics={"inputTokens": "agent_prompt_tokens_total",
                                             "cost": "agent_cost_dollars_total"})
    assert dict(rs.counters) == {
        Kind.INPUT: Selector("agent_prompt_tokens_total"),
        Kind.OUTPUT: Selector("llm_tokens_total", (("token_type", "output"),)),
        Kind.CACHED_INPUT: Selector("llm_tokens_total", (("token_type", "cached_input"),)),
        Kind.COST: Selector("agent_cost_dollars_total"),
    }
    text = promql.spend(rs, 60)
    assert promql.increase("agent_prompt_tokens_total", 60) in text
    assert promql.increase("agent_cost_dollars_total", 60) + '), "tb_kind", "cost"' in text
    assert rs.preset == "Counters*" and rs.has_cost


@pytest.mark.parametrize("preset", ["LiteLLM", "EnvoyAIGateway"])
def test_an_input_that_includes_its_cached_input_is_known_unless_either_is_overridden(
        preset: str) -> None:
    rs = _source(preset=preset)
    assert rs.cached_in_input and not rs.per_pod
    assert rs.counters[0][0] is Kind.INPUT, "input stays first: the gap rows read it"
    assert _source(preset=preset, labels={"workload": "x_agent"}).cached_in_input
    assert not _source(preset=preset,
                       metrics={"cachedInputTokens": "my_cached_total"}).cached_in_input
    assert not _source(preset=preset, metrics={"inputTokens": "my_input_total"}).cached_in_input


def test_counters_count_cached_input_apart_and_opentelemetry_within_input() -> None:
    assert not _source(preset="Counters").cached_in_input
    # gen_ai.client.inference.usage.cache_read.input_tokens is a subset of the input tokens.
    otel = _source(preset="OpenTelemetry")
    assert otel.cached_in_input
    assert dict(otel.counters)[Kind.CACHED_INPUT].metric == \
        "gen_ai_client_inference_usage_cache_read_input_tokens_total"
    assert not _source(preset="OpenTelemetry",
                       metrics={"inputTokens": "my_input_total"}).cached_in_input


def test_overridden_labels_are_grouped_by() -> None:
    rs = _source(preset="OpenTelemetry", labels={"namespace": "ns", "workload": "job",
                                                 "model": "llm"})
    assert (rs.namespace_label, rs.workload_label, rs.model_label) == ("ns", "job", "llm")
    assert promql.spend(rs, 60).startswith("label_replace(sum by (ns, job, llm) ((")


def test_a_source_with_overrides_is_not_the_preset() -> None:
    assert _source(labels={"workload": "job"}) != COUNTERS
    assert _source() == COUNTERS
    assert str(_source(labels={"workload": "job"})) == "Counters*"


def test_extra_group_labels_come_after_the_base_labels_and_are_not_repeated() -> None:
    text = promql.spend(COUNTERS, 3600, ("team", "model", "env"))
    assert text.count("sum by (namespace, pod, model, team, env) (") == 3


@pytest.mark.parametrize(
    ("value", "quoted"),
    [
        pytest.param("search", '"search"', id="a plain value"),
        pytest.param('say "hi"', '"say \\"hi\\""', id="quotes are escaped"),
        pytest.param("a\\b", '"a\\\\b"', id="backslashes are escaped"),
        pytest.param("a\nb", '"a\\nb"', id="newlines are escaped"),
    ],
)
def test_label_values_are_quoted_as_promql_strings(value: str, quoted: str) -> None:
    assert promql.quote(value) == quoted
    assert promql.selector("m", (("l", value),)) == f"m{{l={quoted}}}"


def test_the_outcome_query_sums_by_namespace_and_matcher_labels() -> None:
    assert promql.outcomes("agent_outcomes_total", "namespace", 86400, ("outcome",)) == \
        _exact("sum by (namespace, outcome) (increase(agent_outcomes_total[86400s]))")


# ---------------------------------------------------------------------------
# The planner
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 10, 1000])
def test_the_number_of_queries_does_not_grow_with_the_number_of_budgets(count: int) -> None:
    budgets = [b.token_budget(f"b{i}", f"team-{i}", limits=SEARCH_LIMITS) for i in range(count)]
    plan = planner.plan(budgets, NOW)
    assert list(plan.windows) == [(COUNTERS, WindowKey("24h")),
                                  (COUNTERS, WindowKey("Month", "Europe/Berlin"))]
    assert plan.sources == (COUNTERS,)
    assert plan.query_count == 3  # two windows and one burn rate


def test_each_source_and_each_calendar_zone_is_its_own_query() -> None:
    budgets: list[api.Budget] = [
        b.token_budget("a", limits=SEARCH_LIMITS),
        b.token_budget("b", limits=[{"window": "Month", "timeZone": "America/New_York",
                                     "tokens": 1}]),
        b.token_budget("c", limits=[{"window": "24h", "tokens": 1}],
                       source={"preset": "LiteLLM"}),
        b.cluster_budget("d", limits=[{"window": "24h", "tokens": 1}]),
    ]
    plan = planner.plan(budgets, NOW)
    litellm = _source(preset="LiteLLM")
    assert sorted((str(rs), str(k)) for rs, k in plan.windows) == [
        ("Counters", "24h"), ("Counters", "Month@America/New_York"),
        ("Counters", "Month@Europe/Berlin"), ("LiteLLM", "24h")]
    assert set(plan.sources) == {COUNTERS, litellm}
    assert plan.query_count == 6


@pytest.mark.parametrize(
    ("window", "zone", "seconds"),
    [
        pytest.param("24h", "UTC", 86400, id="a rolling day reaches back 24 hours"),
        pytest.param("30d", "UTC", 30 * 86400, id="a rolling month reaches back 30 days"),
        pytest.param("Day", "UTC", 12 * 3600, id="a calendar day at noon reaches back to midnight"),
        pytest.param("Week", "UTC", 3 * 86400 + 12 * 3600,
                     id="a calendar week on Thursday noon reaches back to Monday"),
        pytest.param("Month", "Europe/Berlin", 19 * 86400 + 13 * 3600,
                     id="a Berlin month reaches back to 31 October 23:00 UTC"),
    ],
)
def test_the_range_of_a_window_query_is_now_minus_the_window_start(window: str, zone: str,
                                                                   seconds: int) -> None:
    tz = {"timeZone": zone} if zone != "UTC" else {}
    budget = b.token_budget(limits=[{"window": window, "tokens": 1, **tz}])
    plan = planner.plan([budget], NOW)
    assert plan.windows == {(COUNTERS, WindowKey.of(window, zone)): seconds}


def test_a_later_evaluation_asks_a_calendar_window_for_a_longer_range() -> None:
    budget = b.token_budget(limits=[{"window": "Day", "tokens": 1}])
    later = NOW + dt.timedelta(hours=3)
    assert list(planner.plan([budget], later).windows.values()) == [15 * 3600]


def test_spend_matcher_labels_become_group_labels_of_their_source() -> None:
    # The source's own namespace/workload/model labels too: a matcher on them reads
    # SpendSeries.labels like any other, so they must be there.
    budgets = [
        b.token_budget("a", spendMatchers=[{"label": "team", "value": "search"}]),
        b.token_budget("b", spendMatchers=[{"label": "env", "operator": "Regex", "value": "p.*"},
                                           {"label": "namespace", "value": "x"}]),
        b.token_budget("c", source={"preset": "LiteLLM"}),
    ]
    plan = planner.plan(budgets, NOW)
    assert plan.group_labels == {COUNTERS: ("env", "namespace", "team"),
                                 _source(preset="LiteLLM"): ()}


def test_outcome_counters_are_queried_once_per_metric_label_and_window() -> None:
    outcome = {"metric": "agent_outcomes_total", "window": "24h"}
    budgets = [
        b.token_budget("a", outcome={**outcome, "matchers": [{"label": "outcome",
                                                              "value": "success"}]}),
        b.token_budget("b", outcome={**outcome, "matchers": [{"label": "repo", "value": "x"}]}),
        b.token_budget("c", outcome={**outcome, "window": "7d"}),
    ]
    plan = planner.plan(budgets, NOW)
    assert [(o.metric, str(o.window), o.group_labels) for o in plan.outcomes] == [
        ("agent_outcomes_total", "24h", ("outcome", "repo")),
        ("agent_outcomes_total", "7d", ()),
    ]
    # The outcome window's spend is read too (cost per outcome needs it).
    assert (COUNTERS, WindowKey("7d")) in plan.windows
    assert plan.query_count == 2 + 1 + 2


# ---------------------------------------------------------------------------
# Spend matchers narrow the selector
# ---------------------------------------------------------------------------


def _matchers(*ms: tuple[str, str, str]) -> list[dict[str, str]]:
    return [{"label": label, "operator": op, "value": value} for label, op, value in ms]


@pytest.mark.parametrize(("budgets", "narrow"), [
    pytest.param([[("user", "Equal", "ann")], [("user", "Equal", "bo.b")]],
                 (("user", "ann|bo\\.b"),),
                 id="every budget names the label: the union of its values, escaped"),
    pytest.param([[("user", "Regex", "a.*")], [("user", "Equal", "bob"), ("team", "Equal", "x")]],
                 (("user", "(?:a.*)|bob"),),
                 id="a regex joins the union as a group; a label not every budget names does not"),
    pytest.param([[("user", "Equal", "ann")], []], (),
                 id="one budget without matchers reads everything: no narrowing"),
    pytest.param([[("user", "NotEqual", "ann")]], (),
                 id="negative matchers never narrow"),
])
def test_spend_matchers_every_budget_shares_narrow_the_selector(
        budgets: list[list[tuple[str, str, str]]], narrow: tuple[tuple[str, str], ...]) -> None:
    plan = planner.plan([b.token_budget(f"b{i}", spendMatchers=_matchers(*ms))
                         for i, ms in enumerate(budgets)], NOW)
    assert plan.narrow.get(COUNTERS, ()) == narrow
    text = promql.spend(COUNTERS, 60, narrow=narrow)
    for label, regex in narrow:
        assert f'llm_tokens_total{{token_type="input",{label}=~{promql.quote(regex)}}}' in text


def test_a_union_too_long_for_a_url_is_not_put_in_the_selector() -> None:
    budgets = [b.token_budget(f"b{i}", spendMatchers=_matchers(("user", "Equal", f"u{i:05}")))
               for i in range(1000)]
    assert planner.plan(budgets, NOW).narrow == {}


def test_a_report_is_never_narrowed() -> None:
    budgets = [b.token_budget("a", spendMatchers=_matchers(("user", "Equal", "ann")))]
    key = planner.rolling_key(3600)
    assert planner.report_plan(budgets, (), key, NOW).narrow == {}
