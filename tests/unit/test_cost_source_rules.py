"""Cost sources (issue 18 part 2): spend besides tokens, priced, merged, added, validated.

Covers the pure parts: the price of units, the merge of a catalog's and a budget's
cost sources, the rules a user gets told about, the PromQL text of the reading,
the plan, and the engine: money limits, token limits and model limits, cost per
outcome, run-out, a cost query that failed, a source that reports its own cost,
reuse of a previous evaluation. The reading against a real Prometheus is in
tests/e2e/test_cost_sources.py.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import shutil
import subprocess
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from token_budget import cli
from token_budget.api import rules
from token_budget.api import v1alpha1 as api
from token_budget.api.conditions import Reason
from token_budget.handlers import status as statuses
from token_budget.metrics import costs as reading
from token_budget.metrics import promql
from token_budget.policy import costs, engine
from token_budget.policy.catalog import Catalog
from token_budget.policy.decisions import Decision, Evaluation
from token_budget.policy.inputs import CostQuery, CostSeries, SpendSnapshot
from token_budget.policy.windows import WindowKey
from token_budget.reports import spend as report
from unit import builders as b
from unit.builders import NAMESPACE, NOW, series, token_budget

CPU: dict[str, Any] = {
    "name": "cpu", "kind": "Compute", "metric": "container_cpu_usage_seconds_total",
    "matchers": [{"label": "container", "operator": "NotEqual", "value": ""}],
    "pricePerUnit": "0.04", "unitsPerPrice": "3600",  # 0.04 a core-hour
}
SEARCH: dict[str, Any] = {
    "name": "vector-search", "kind": "Retrieval", "metric": "vector_queries_total",
    "pricePerUnit": "0.002",  # per query
}
MONEY = [{"window": "24h", "cost": "10.00"}]
ACTIONS = [{"type": "Warn", "atPercent": 80}, {"type": "Block", "atPercent": 100}]


def source(**fields: Any) -> api.CostSource:
    return api.CostSource.model_validate(fields)


def only(evaluation: Evaluation) -> Decision:
    [decision] = evaluation.decisions
    return decision


def with_costs(snap: SpendSnapshot, units: dict[str, float], *, budget: api.Budget,
               catalog: Catalog | None = None, recent: dict[str, float] | None = None,
               namespace: str = NAMESPACE) -> SpendSnapshot:
    """``snap`` with each cost source's units (by name) in every window of its plan;
    ``recent``: units over the burn-rate window (default none)."""
    cat = catalog or b.catalog()
    found = {c.name: costs.query_of(c) for c in costs.merged(budget.spec, cat)}
    plan = costs.plan([budget], cat, NOW, snap.recent_seconds)
    recent_key, _ = costs.recent_window(snap.recent_seconds)
    rows: dict[tuple[CostQuery, WindowKey], tuple[CostSeries, ...]] = {}
    for key, (_, queries) in plan.windows.items():
        per = (recent or {}) if key == recent_key else units
        for q in queries:
            rows[(q, key)] = tuple(CostSeries(namespace, "agent-0-abc", per[name])
                                   for name, fq in found.items() if fq == q and name in per)
    return dataclasses.replace(snap, costs=rows)


def run(budget: api.Budget, spend: list[Any], units: dict[str, float], *,
        catalog: Catalog | None = None, recent_units: dict[str, float] | None = None,
        previous: Evaluation | None = None, **snapshot_args: Any) -> Evaluation:
    snap = with_costs(b.snapshot([budget], spend, **snapshot_args), units, budget=budget,
                      catalog=catalog, recent=recent_units)
    world = engine.World(budgets=[budget], catalog=catalog or b.catalog(),
                         namespaces={NAMESPACE: {}}, workloads=[b.workload()])
    return engine.evaluate(world, snap, NOW, previous=previous)


# -- pricing and merging -------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "units", "cost"), [
    pytest.param(CPU, 7200.0, Decimal("0.08"), id="two core-hours at 0.04 a core-hour"),
    pytest.param(SEARCH, 1500.0, Decimal("3"), id="1,500 queries at 0.002 each"),
    pytest.param(CPU, 0.1, Decimal("0.1") * Decimal("0.04") / 3600,
                 id="a float is priced at its shortest decimal form"),
    pytest.param({**CPU, "unitsPerPrice": "3865470566400"}, 3865470566400.0 * 2,
                 Decimal("0.08"), id="byte-seconds priced per GiB-hour"),
])
def test_units_are_priced_per_units_per_price(fields: dict[str, Any], units: float,
                                              cost: Decimal) -> None:
    assert costs.price(units, source(**fields)) == cost


def test_units_that_are_not_finite_are_refused_not_priced() -> None:
    with pytest.raises(ValueError, match="cannot be priced"):
        costs.price(float("nan"), source(**CPU))


def _catalog_with(*cost_sources: dict[str, Any]) -> Catalog:
    body = {**b.CATALOG_BODY, "spec": {**b.CATALOG_BODY["spec"],
                                       "costSources": list(cost_sources)}}
    return Catalog([api.ModelCatalog.model_validate(body)])


def test_a_budgets_cost_source_replaces_the_catalogs_of_the_same_name() -> None:
    catalog = _catalog_with(CPU, SEARCH)
    budget = token_budget(costSources=[{**CPU, "pricePerUnit": "0.08"},
                                       {**SEARCH, "name": "tools", "kind": "ToolCall"}])
    found = costs.merged(budget.spec, catalog)
    assert [(c.name, c.price_per_unit) for c in found] == [
        ("cpu", Decimal("0.08")), ("vector-search", Decimal("0.002")),
        ("tools", Decimal("0.002"))]


def test_the_first_catalog_by_name_wins_a_cost_source_both_define() -> None:
    a = {**b.CATALOG_BODY, "metadata": {"name": "a"},
         "spec": {**b.CATALOG_BODY["spec"], "costSources": [{**CPU, "pricePerUnit": "1"}]}}
    z = {**b.CATALOG_BODY, "metadata": {"name": "z"},
         "spec": {**b.CATALOG_BODY["spec"], "costSources": [CPU]}}
    catalog = Catalog([api.ModelCatalog.model_validate(x) for x in (z, a)])
    assert [c.price_per_unit for c in catalog.cost_sources] == [Decimal(1)]


# -- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(("cost_sources", "path", "says"), [
    pytest.param([CPU, CPU], "spec.costSources[1].name", "must be unique",
                 id="two cost sources of one name"),
    pytest.param([{**CPU, "unitsPerPrice": "0"}], "spec.costSources[0].unitsPerPrice",
                 "greater than 0", id="zero units per price"),
    pytest.param([{**CPU, "matchers": [{"label": "pod", "operator": "Regex", "value": "(a"}]}],
                 "spec.costSources[0].matchers[0].value", "regular expression",
                 id="a regex Prometheus cannot read"),
    pytest.param([{**CPU, "labels": {"namespace": "pod", "workload": "pod"}}],
                 "spec.costSources[0].labels.workload", "must differ",
                 id="namespace and workload read from one label"),
])
def test_bad_cost_sources_are_refused_with_the_field_named(cost_sources: list[dict[str, Any]],
                                                           path: str, says: str) -> None:
    found = rules.problems(token_budget(costSources=cost_sources))
    assert any(p.path == path and says in p.message for p in found), found
    catalog = api.ModelCatalog.model_validate(
        {**b.CATALOG_BODY, "spec": {**b.CATALOG_BODY["spec"], "costSources": cost_sources}})
    assert any(p.path == path for p in rules.problems(catalog))


def test_a_cost_source_without_a_kind_or_price_is_refused_by_the_schema() -> None:
    with pytest.raises(ValueError, match="kind"):
        source(name="cpu", metric="x", pricePerUnit="1")
    with pytest.raises(ValueError, match="pricePerUnit"):
        source(name="cpu", metric="x", kind="Compute")
    with pytest.raises(ValueError, match="kind"):
        source(name="cpu", metric="x", kind="Electricity", pricePerUnit="1")


# -- reading (PromQL text) -----------------------------------------------------------------


def test_a_counter_is_read_with_the_exact_increase_of_token_counters() -> None:
    q = costs.query_of(source(**CPU))
    text = reading.units(q, 3600, interval=15)
    sel = 'container_cpu_usage_seconds_total{container!=""}'
    assert text == f"sum by (namespace, pod) ({promql.increase(sel, 3600)})"


MEMORY: dict[str, Any] = {
    "name": "memory", "kind": "Memory", "type": "Gauge",
    "metric": "container_memory_working_set_bytes",
    "pricePerUnit": "0.01", "unitsPerPrice": "3865470566400"}  # $0.01 a GiB-hour


def test_a_gauge_is_integrated_over_each_series_own_span() -> None:
    q = costs.query_of(source(**{**MEMORY, "labels": {"namespace": "ns", "workload": "app"},
                                 "matchers": [
                                     {"label": "image", "operator": "NotRegex", "value": ""},
                                     {"label": "team", "value": "a\"b"}]}))
    sel = 'container_memory_working_set_bytes{image!~"",team="a\\"b"}'
    # Each sample stands for one scrape interval, never more than the whole window.
    assert reading.units(q, 600, interval=15) == (
        f"sum by (ns, app) (avg_over_time({sel}[600s]) * "
        f"clamp_max(count_over_time({sel}[600s]) * 15, 600))")
    assert "* 0.5, 600)" in reading.units(q, 600, interval=0.5)


GIB = 1024 ** 3


def test_two_successive_12h_pods_at_1_gib_cost_24_gib_hours_over_a_day_not_48(
        tmp_path: Path) -> None:
    """Evaluated by Prometheus's own engine (promtool) on a day of 15 s samples: a pod
    replaced at noon (cAdvisor's new series) is charged for its half of the window, as
    is the pod it replaced; a pod present all day is charged the day exactly."""
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("CI=true and promtool is missing: make prereqs installs it")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    q = costs.query_of(source(**MEMORY))
    half = 43200 // 15  # samples in 12 h
    m = "container_memory_working_set_bytes"
    gib_hours = f"sum by (namespace) ({reading.units(q, 86400, interval=15)}) / {GIB} / 3600"
    test = {"rule_files": [], "evaluation_interval": "15s", "tests": [{
        "interval": "15s",
        "input_series": [
            {"series": f'{m}{{namespace="team-a",pod="agent-1"}}',
             "values": f"{GIB}+0x{half - 1}"},
            {"series": f'{m}{{namespace="team-a",pod="agent-2"}}',
             "values": f"_x{half} {GIB}+0x{half - 1}"},
            {"series": f'{m}{{namespace="team-b",pod="agent-1"}}',
             "values": f"{GIB}+0x{2 * half - 1}"}],
        "promql_expr_test": [{
            "expr": gib_hours, "eval_time": f"{86400 - 15}s",
            "exp_samples": [{"labels": '{namespace="team-a"}', "value": 24},
                            {"labels": '{namespace="team-b"}', "value": 24}]}]}]}
    path = tmp_path / "gauge.test.yaml"
    path.write_text(json.dumps(test))
    out = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True,
                         text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_one_query_per_window_reads_every_distinct_cost_query_tagged() -> None:
    qs = (costs.query_of(source(**CPU)), costs.query_of(source(**SEARCH)))
    text = reading.window_query(qs, 60, interval=15)
    assert text.count("label_replace(") == 2 and '"tb_cost", "1"' in text


def test_the_plan_reads_each_window_and_the_burn_rate_once_for_budgets_alike() -> None:
    one = token_budget("one", costSources=[CPU], limits=MONEY)
    two = token_budget("two", costSources=[{**CPU, "pricePerUnit": "9"}],
                       limits=[{"window": "Day", "cost": "5"}])
    plan = costs.plan([one, two, token_budget("none")], b.catalog(), NOW, 600)
    assert sorted(str(k) for k in plan.windows) == ["10m", "24h", "Day@UTC"]
    assert all(len(qs) == 1 for _, qs in plan.windows.values())  # the price is not read
    assert costs.plan([token_budget()], b.catalog(), NOW, 600).windows == {}


# -- the engine ----------------------------------------------------------------------------


def test_a_cost_source_pushes_money_spend_over_the_block_threshold() -> None:
    budget = token_budget(limits=MONEY, actions=ACTIONS, costSources=[CPU])
    tokens = series(6_000_000, model="medium")  # $6.00 of tokens: 60%, under Warn
    assert only(run(budget, [tokens], {"cpu": 0.0})).state is api.State.OK
    decision = only(run(budget, [tokens], {"cpu": 450_000.0}))  # 125 core-hours: $5.00
    assert decision.state is api.State.BLOCKED
    [usage] = decision.windows
    assert usage.cost == Decimal("11.00") and usage.used_percent == Decimal(110)
    assert usage.by_kind == (("Tokens", "tokens", Decimal("6")),
                             ("Compute", "cpu", Decimal("5.00")))


def test_the_status_shows_the_money_by_kind() -> None:
    budget = token_budget(limits=MONEY, actions=ACTIONS, costSources=[CPU, SEARCH])
    decision = only(run(budget, [series(6_000_000)], {"cpu": 450_000.0,
                                                       "vector-search": 500.0}))
    status = statuses.budget_status(budget, [decision], "USD", NOW, 0, None)
    assert status["windows"][0]["costByKind"] == [
        {"kind": "Tokens", "name": "tokens", "cost": "6"},
        {"kind": "Compute", "name": "cpu", "cost": "5"},
        {"kind": "Retrieval", "name": "vector-search", "cost": "1"}]
    api.BudgetStatus.model_validate(status)  # the CRD's status schema takes it


def test_without_cost_sources_the_status_has_no_breakdown() -> None:
    budget = token_budget(limits=MONEY)
    decision = only(b.evaluate([budget], [series(1_000_000)]))
    status = statuses.budget_status(budget, [decision], "USD", NOW, 0, None)
    assert "costByKind" not in status["windows"][0]


def test_token_limits_and_model_limits_never_count_cost_sources() -> None:
    budget = token_budget(costSources=[CPU], limits=[
        {"window": "24h", "tokens": 1000},
        {"window": "1h", "model": "medium", "cost": "1.00"}])
    decision = only(run(budget, [series(100)], {"cpu": 3_600_000.0}))  # $40 of CPU
    assert decision.state is api.State.OK
    tokens, model = decision.windows
    # The token limit's window shows the money spent, but only tokens count against it.
    assert (tokens.tokens, tokens.used_percent, tokens.cost) == (100, 10, Decimal("40.0001"))
    # A CPU-second is no model's: the model's money limit counts its tokens only.
    assert (model.cost, model.by_kind) == (Decimal("0.0001"), ())


def test_a_catalog_cost_source_applies_to_every_budget() -> None:
    budget = token_budget(limits=MONEY, actions=ACTIONS)
    decision = only(run(budget, [], {"cpu": 900_000.0}, catalog=_catalog_with(CPU)))
    assert decision.windows[0].cost == Decimal("10.00")
    assert decision.state is api.State.BLOCKED


def test_a_cost_query_that_failed_makes_spend_unknown_not_zero() -> None:
    budget = token_budget(limits=MONEY, costSources=[CPU],
                          whenSpendUnknown={"policy": "FailClosed"})
    snap = b.snapshot([budget], [series(1_000)])
    failed = dataclasses.replace(snap, cost_errors={
        WindowKey.of("24h", "UTC"): "Prometheus at http://p cannot be reached"})
    world = engine.World(budgets=[budget], catalog=b.catalog(), namespaces={NAMESPACE: {}},
                         workloads=[b.workload()])
    decision = only(engine.evaluate(world, failed, NOW))
    assert decision.reason is Reason.SPEND_UNKNOWN_FAIL_CLOSED
    assert "cannot be reached" in (decision.spend_error or "")
    # A cost query that was never read is no zero either.
    decision = only(engine.evaluate(world, snap, NOW))
    assert not decision.spend_known


def test_a_source_that_reports_its_own_cost_gets_cost_sources_on_top() -> None:
    # LiteLLM's litellm_spend_metric measures token cost: it replaces the catalog's token
    # price (1M large input tokens would be $10 there), and the CPU cost adds to it.
    budget = token_budget(limits=MONEY, costSources=[CPU], source={"preset": "LiteLLM"})
    spend = series(1_000_000, model="large", cost="2.50")
    [usage] = only(run(budget, [spend], {"cpu": 90_000.0})).windows
    assert usage.by_kind == (("Tokens", "tokens", Decimal("2.50")),
                             ("Compute", "cpu", Decimal("1.00")))
    assert usage.cost == Decimal("3.50")


def test_cost_per_outcome_counts_cost_sources() -> None:
    budget = token_budget(limits=MONEY, costSources=[CPU],
                          outcome={"metric": "agent_outcomes_total", "window": "24h"})
    key = "agent_outcomes_total|namespace|24h"
    decision = only(run(budget, [series(1_000_000)], {"cpu": 90_000.0},
                        outcomes={key: [(NAMESPACE, (), 4.0)]}))
    assert decision.cost_per_outcome == Decimal("0.5")  # ($1 tokens + $1 CPU) / 4


def test_the_run_out_counts_the_cost_sources_burn_rate() -> None:
    budget = token_budget(limits=MONEY, costSources=[CPU])
    # $5 spent, CPU burning $0.60 over the last 10 minutes: $5 left at $0.001/s.
    decision = only(run(budget, [], {"cpu": 450_000.0}, recent_units={"cpu": 54_000.0}))
    assert decision.windows[0].run_out == NOW + dt.timedelta(seconds=5000)
    assert only(run(budget, [], {"cpu": 450_000.0})).windows[0].run_out is None


def test_a_previous_evaluation_is_not_reused_when_only_cost_sources_moved() -> None:
    budget = token_budget(limits=MONEY, actions=ACTIONS, costSources=[CPU])
    first = run(budget, [series(1_000_000)], {"cpu": 0.0})
    assert only(first).state is api.State.OK
    second = run(budget, [series(1_000_000)], {"cpu": 900_000.0}, previous=first)
    assert only(second).state is api.State.BLOCKED


# -- the report ----------------------------------------------------------------------------


def test_the_report_says_where_the_money_goes_tokens_first_then_cost_sources() -> None:
    rep = report.Report(since_seconds=86400, at=NOW, currency="USD")
    rep.total.add(3_000_000, Decimal("9.00"))
    for kind, name, cost in (("Compute", "cpu", "2.00"), ("Tokens", "output", "3.00"),
                             ("Retrieval", "vector-search", "4.00"),
                             ("Tokens", "input", "0.00")):
        rep.by_kind[(kind, name)].add(0, Decimal(cost))
    assert [k for k, _ in rep.kinds()] == [("Tokens", "input"), ("Tokens", "output"),
                                          ("Retrieval", "vector-search"), ("Compute", "cpu")]
    assert rep.to_json()["byKind"][2] == {"kind": "Retrieval", "name": "vector-search",
                                          "tokens": 0, "cost": "4.00"}
    text = report.table(rep)
    assert "KIND" in text and "vector-search" in text and "44.4%" in text


class _Report(reading.PrometheusSource):
    """No token spend; every cost query answers team-a's 7200 and team-b's 3600 CPU-seconds."""

    def __init__(self) -> None:
        super().__init__("http://prometheus.invalid", scrape_interval_seconds=15.0)

    def collect(self, plan: Any, at: dt.datetime) -> SpendSnapshot:
        return SpendSnapshot(taken_at=at)

    def query(self, text: str, at: dt.datetime, kind: str = "spend",
              matrix: bool = False) -> list[Any]:
        return [{"metric": {"namespace": ns, "pod": f"{ns}-agent", "tb_cost": "0"},
                 "value": [0, v]} for ns, v in (("team-a", "7200"), ("team-b", "3600"))]


def test_the_report_counts_a_namespaces_cost_source_once_where_budgets_overlap() -> None:
    # A Shared cluster budget over team-a and team-b and a TokenBudget in team-a both read
    # team-a's CPU: the report's total counts its two core-hours ($0.08) once.
    budgets = [b.cluster_budget(scope="Shared", limits=MONEY, costSources=[CPU]),
               token_budget("team-a", namespace="team-a", limits=MONEY, costSources=[CPU])]
    qa = {"environment": "qa"}
    rep = report.build(_Report(), budgets, b.catalog(), {"team-a": qa, "team-b": qa}, 86400,
                       NOW)
    assert rep.total.cost == Decimal("0.12")  # 3 core-hours at 0.04, not 0.20
    assert rep.by_kind[("Compute", "cpu")].cost == Decimal("0.12")
    assert rep.by_namespace["team-a"].cost == Decimal("0.08")
    assert rep.by_namespace["team-b"].cost == Decimal("0.04")
    assert rep.by_budget["ClusterTokenBudget/qa"].cost == Decimal("0.12")  # each its own


def test_a_report_without_cost_sources_has_no_kind_table() -> None:
    rep = report.Report(since_seconds=86400, at=NOW, currency="USD")
    rep.by_kind[("Tokens", "input")].add(1, Decimal(1))
    assert "KIND" not in report.table(rep)


def test_token_parts_are_priced_input_output_and_cached_at_their_own_prices() -> None:
    parts = report._token_parts(series(1_000_000, output=1_000_000, cached=1_000_000,
                                       model="large"), b.catalog())
    assert parts == [("input", 1_000_000.0, Decimal(10)), ("output", 1_000_000.0, Decimal(30)),
                     ("cached-input", 1_000_000.0, Decimal(5))]
    assert report._token_parts(series(5, model="large", cost="1.5"), b.catalog()) == [
        ("reported", 5.0, Decimal("1.5"))]


def test_budgets_without_cost_sources_keep_their_decisions_when_cost_series_move() -> None:
    plain = token_budget("plain", limits=MONEY, actions=ACTIONS)
    costly = token_budget("costly", limits=MONEY, actions=ACTIONS, costSources=[CPU])
    world = engine.World(budgets=[plain, costly], catalog=b.catalog(),
                         namespaces={NAMESPACE: {}}, workloads=[b.workload()])

    def snap(cpu: float) -> SpendSnapshot:
        return with_costs(b.snapshot([plain, costly], [series(1_000_000)]), {"cpu": cpu},
                          budget=costly)

    first = engine.evaluate(world, snap(0.0), NOW)
    second = engine.evaluate(world, snap(900_000.0), NOW, previous=first)
    old = {d.scope.budget.name: d for d in first.decisions}
    new = {d.scope.budget.name: d for d in second.decisions}
    assert new["plain"] is old["plain"], "taken over: nothing it reads moved"
    assert new["costly"].state is api.State.BLOCKED
    # The same with and without the previous evaluation, to the digit.
    assert second.decisions == engine.evaluate(world, snap(900_000.0), NOW).decisions


def test_token_budgets_narrow_the_cost_query_to_their_namespaces() -> None:
    a = token_budget("a", namespace="team-a", limits=MONEY, costSources=[CPU])
    z = token_budget("z", namespace="team-z", limits=MONEY, costSources=[CPU])
    plan = costs.plan([a, z], b.catalog(), NOW, 600)
    assert plan.narrow == {WindowKey.of("24h", "UTC"): "team-a|team-z",
                           WindowKey.of("10m", "UTC"): "team-a|team-z"}
    q = costs.query_of(source(**CPU))
    assert 'container_cpu_usage_seconds_total{container!="",namespace=~"team-a|team-z"}' in \
        reading.units(q, 60, plan.narrow[WindowKey.of("24h", "UTC")], interval=15)
    # A ClusterTokenBudget's namespaces are not known to the plan: nothing is narrowed.
    qa = b.cluster_budget(limits=MONEY, costSources=[CPU])
    assert costs.plan([a, qa], b.catalog(), NOW, 600).narrow == {}


# -- tokenbudget simulate ------------------------------------------------------------------

_SIM_BUDGET = """
apiVersion: tokenbudget.io/v1alpha1
kind: ModelCatalog
metadata: {name: prices}
spec:
  models:
  - {name: medium, tier: Standard, pricing: {input: "1.00", output: "3.00"}}
---
apiVersion: tokenbudget.io/v1alpha1
kind: TokenBudget
metadata: {name: team, namespace: team-search}
spec:
  limits: [{window: 24h, cost: "10.00"}]
  costSources:
  - name: cpu
    kind: Compute
    metric: container_cpu_usage_seconds_total
    matchers: [{label: container, operator: NotEqual, value: ""}]
    pricePerUnit: "1.00"
    unitsPerPrice: "3600"
"""


def _simulate(capsys: pytest.CaptureFixture[str], tmp_path: Path, spend: str) -> dict[str, Any]:
    (tmp_path / "b.yaml").write_text(_SIM_BUDGET)
    (tmp_path / "spend").write_text(spend)
    code = cli.main(["simulate", "--budgets", str(tmp_path / "b.yaml"), "--spend",
                     str(tmp_path / "spend"), "--at", "2025-11-20T12:00:00Z", "-o", "json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    [decision] = json.loads(out)["decisions"]
    return dict(decision)


def test_simulate_reads_cost_sources_from_a_json_snapshot(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    spend = {"windows": {"*": [{"namespace": "team-search", "workload": "agent-0",
                                "model": "medium", "input": 6_000_000}]},
             "costs": {"container_cpu_usage_seconds_total": {"*": [
                 {"namespace": "team-search", "workload": "agent-0-x", "units": 18_000}]}}}
    decision = _simulate(capsys, tmp_path, json.dumps(spend))
    assert decision["state"] == "Blocked"  # $6 of tokens + $5 of CPU over $10
    assert Decimal(decision["windows"][0]["cost"]) == 11


def test_simulate_reads_cost_sources_from_prometheus_text(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    text = (
        "# TYPE container_cpu_usage_seconds_total counter\n"
        'container_cpu_usage_seconds_total{namespace="team-search",pod="a",container="c"} 3600\n'
        'container_cpu_usage_seconds_total{namespace="team-search",pod="a",container=""} 3600\n'
        'container_cpu_usage_seconds_total{namespace="other",pod="b",container="c"} 99999\n')
    decision = _simulate(capsys, tmp_path, text)
    assert Decimal(decision["windows"][0]["cost"]) == 1  # one core-hour, the pod sum skipped


def test_simulate_counts_cost_sources_a_file_does_not_mention_as_zero_like_tokens(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    decision = _simulate(capsys, tmp_path, '{"windows": {}}')
    assert (decision["reason"], Decimal(decision["windows"][0]["cost"])) == ("WithinBudget", 0)


def test_simulate_with_unreadable_cost_data_exits_1(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "b.yaml").write_text(_SIM_BUDGET)
    (tmp_path / "spend").write_text(json.dumps(
        {"windows": {}, "costs": {"container_cpu_usage_seconds_total": {"*": [{"units": 1}]}}}))
    code = cli.main(["simulate", "--budgets", str(tmp_path / "b.yaml"), "--spend",
                     str(tmp_path / "spend"), "--at", "2025-11-20T12:00:00Z"])
    _, err = capsys.readouterr()
    assert code == 1 and "cost sources cannot be read" in err


def test_a_token_limit_is_decided_while_cost_sources_cannot_be_read() -> None:
    budget = token_budget(costSources=[CPU], limits=[{"window": "24h", "tokens": 1000}],
                          actions=ACTIONS)
    snap = dataclasses.replace(b.snapshot([budget], [series(2_000)]), cost_errors={
        WindowKey.of("24h", "UTC"): "Prometheus at http://p refused the query"})
    world = engine.World(budgets=[budget], catalog=b.catalog(), namespaces={NAMESPACE: {}},
                         workloads=[b.workload()])
    decision = only(engine.evaluate(world, snap, NOW))
    assert decision.state is api.State.BLOCKED and decision.spend_known
    assert decision.windows[0].by_kind == ()  # no breakdown claimed without the cost sources


class _Rows(reading.PrometheusSource):
    """A Prometheus that answers every cost query with ``rows``: (namespace, pod, value)."""

    def __init__(self, rows: list[tuple[str, str, str]]) -> None:
        super().__init__("http://prometheus.invalid", scrape_interval_seconds=15.0)
        self.rows = rows

    def query(self, text: str, at: dt.datetime, kind: str = "spend",
              matrix: bool = False) -> list[Any]:
        return [{"metric": {"namespace": ns, "pod": pod, "tb_cost": "0"}, "value": [0, v]}
                for ns, pod, v in self.rows]


def test_a_nan_cost_row_makes_only_its_namespace_unknown() -> None:
    # A NaN sandbox gauge in team-b: team-b's money limit is unknown (FailClosed), team-a's
    # two core-hours are still read and team-a is decided (it was blocked with team-b).
    prom = _Rows([("team-a", "a-1", "7200"), ("team-b", "sandbox-1", "NaN")])
    budgets = [token_budget(ns, namespace=ns, limits=MONEY, actions=ACTIONS, costSources=[CPU],
                            whenSpendUnknown={"policy": "FailClosed"})
               for ns in ("team-a", "team-b")]
    q, day = costs.query_of(source(**CPU)), WindowKey.of("24h", "UTC")
    found, errors, unknown = reading.read(
        prom, costs.CostPlan(windows={day: (86400, (q,))}, narrow={day: "team-a|team-b"}), NOW)
    assert not errors and found[(q, day)] == (CostSeries("team-a", "a-1", 7200.0),)
    assert list(unknown) == [(day, "team-b")] and "nan" in unknown[(day, "team-b")]
    snap = reading.with_costs(prom, b.snapshot(budgets),
                              costs.plan(budgets, b.catalog(), NOW, 600), NOW)
    world = engine.World(budgets=budgets, catalog=b.catalog(),
                         namespaces={"team-a": {}, "team-b": {}},
                         workloads=[b.workload(namespace="team-a"),
                                    b.workload(namespace="team-b")])
    by_ns = {d.namespaces: d for d in engine.evaluate(world, snap, NOW).decisions}
    a, bad = by_ns[("team-a",)], by_ns[("team-b",)]
    assert a.spend_known and a.state is api.State.OK
    assert a.windows[0].by_kind[1] == ("Compute", "cpu", Decimal("0.08"))
    assert not bad.spend_known and bad.reason is Reason.SPEND_UNKNOWN_FAIL_CLOSED
    assert "team-b" in (bad.spend_error or "") and "nan" in (bad.spend_error or "")


class _Counting(reading.PrometheusSource):
    """A Prometheus whose count() answers ``series`` and which records every query."""

    def __init__(self, series: int) -> None:
        super().__init__("http://prometheus.invalid", scrape_interval_seconds=15.0)
        self.series = series
        self.asked: list[str] = []

    def query(self, text: str, at: dt.datetime, kind: str = "spend",
              matrix: bool = False) -> list[Any]:
        self.asked.append(text)
        if text.startswith("count("):
            return [{"metric": {}, "value": [0, str(self.series)]}]
        return []


@pytest.mark.parametrize(("series", "refused"), [(250, False), (400, True)])
def test_a_month_of_cost_series_past_max_samples_is_refused_before_it_is_read(
        series: int, refused: bool) -> None:
    q = CostQuery("container_cpu_usage_seconds_total", matchers=(("container", "!=", ""),))
    month = WindowKey.of("Month", "UTC")
    plan = costs.CostPlan(windows={month: (30 * 86400, (q,))})
    source = _Counting(series)
    found, errors, _ = reading.read(source, plan, NOW)
    # 30 days at 15 s are 172,800 samples a series: 250 fit in 50 million, 400 do not.
    assert (month in errors) is refused
    if refused:
        assert "about 69,120,000 samples from 400 series" in errors[month]
        assert "--prometheus-max-samples" in errors[month]
        assert not any("increase" in t or "last_over_time" in t for t in source.asked)
    else:
        assert (q, month) in found


def test_a_day_of_cost_series_is_read_without_counting() -> None:
    q = CostQuery("tool_calls_total")
    day = WindowKey.of("24h", "UTC")
    source = _Counting(10**9)
    found, errors, _ = reading.read(source, costs.CostPlan(windows={day: (86400, (q,))}), NOW)
    assert not errors and (q, day) in found
    assert not any(t.startswith("count(") for t in source.asked)


def test_a_partition_counts_the_cost_of_its_own_pods_only() -> None:
    # Cost series carry no person: a pod's CPU is its person's through the pod's podLabel.
    # (Every partition used to be charged the whole namespace's CPU: everyone Blocked.)
    owner = "tokenbudget.io/owner"
    budget = token_budget(partition={"label": "user", "podLabel": owner},
                          limits=[{"window": "24h", "cost": "10.00"}], actions=ACTIONS,
                          costSources=[CPU])
    snap = b.snapshot([budget], [b.series(10, user="alice"),
                                 b.series(10, user="bob", workload="agent-1")])
    pods = {"alice-agent-5d4f8-x1z2q": 250 * 3600.0,  # alice's Deployment: $10 of CPU
            "bob-agent-7c9d1-k3j4h": 3600.0,           # bob's: $0.04
            "postgres-0": 7200.0}                      # no person's: $0.08
    plan = costs.plan([budget], b.catalog(), NOW, snap.recent_seconds)
    rows = {(q, key): tuple(CostSeries(NAMESPACE, pod, units) for pod, units in pods.items())
            for key, (_, queries) in plan.windows.items() for q in queries}
    snap = dataclasses.replace(snap, costs=rows)
    workloads = [b.workload("alice-agent", labels={**b.AGENT, owner: "alice"}),
                 b.workload("bob-agent", labels={**b.AGENT, owner: "bob"}),
                 b.workload("shared", labels=dict(b.AGENT))]
    world = engine.World(budgets=[budget], catalog=b.catalog(),
                         namespaces={NAMESPACE: {}}, workloads=workloads)
    result = engine.evaluate(world, snap, NOW)
    cpu = {d.scope.partition: d.windows[0].by_kind[1][2] for d in result.decisions}
    assert cpu == {"alice": Decimal("10.000"), "bob": Decimal("0.040"), "": Decimal("0.080")}
    told = {k.name: d.state for k, d in result.directives.items()}
    assert told == {"alice-agent": api.State.BLOCKED, "bob-agent": api.State.OK,
                    "shared": api.State.OK}


def test_cost_sources_count_where_spend_was_read_apart_by_a_label_the_rules_lack() -> None:
    # A partitioned Month read apart (its window key carries the label) still finds the
    # cost sources, which are read per window: it used to be "not read", spend unknown.
    owner = "tokenbudget.io/owner"
    budget = token_budget(partition={"label": "user", "podLabel": owner},
                          limits=[{"window": "Month", "cost": "10.00"}], actions=ACTIONS,
                          costSources=[CPU])
    snap = b.snapshot([budget], [b.series(10, user="alice")])
    snap = dataclasses.replace(snap, windows={
        (rs, dataclasses.replace(k, labels=("user",))): v for (rs, k), v in snap.windows.items()})
    plan = costs.plan([budget], b.catalog(), NOW, snap.recent_seconds)
    snap = dataclasses.replace(snap, costs={
        (q, key): (CostSeries(NAMESPACE, "alice-agent-6b7c-x9z8w", 3600.0),)
        for key, (_, queries) in plan.windows.items() for q in queries})
    world = engine.World(budgets=[budget], catalog=b.catalog(), namespaces={NAMESPACE: {}},
                         workloads=[b.workload("alice-agent", labels={**b.AGENT, owner: "alice"})])
    alice = next(d for d in engine.evaluate(world, snap, NOW).decisions
                 if d.scope.partition == "alice")
    assert alice.reason is Reason.WITHIN_BUDGET
    assert alice.windows[0].cost == Decimal("0.04001")
