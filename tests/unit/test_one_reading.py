"""One reading of spend everywhere; a scope that matches no series says why.

Covers:
- ``tokenbudget report`` reads a budget's spend and cost per outcome the way
  an evaluation does (the planner's queries, ``PrometheusSource.collect``, the
  engine's sums with NotEqual and Regex spend and outcome matchers), so its
  figure for a budget is the decision's figure for the same window;
- spend matchers on the source's own labels (``pod``, ``model``) see them;
- the snapshot carries a bounded sample of what each source returned, and a
  scope that saw none of it says which series there were and why none is its
  own (status ``MetricsAvailable`` reason ``NoSeriesMatchScope``), while a
  source that returned nothing still reads ``NoSpendYet``;
- one money formatter and one table renderer.

Prometheus is a subclass of the adapter answering ``query`` from a table: the
PromQL itself is covered in test_sources_promql and on the real Prometheus
in tests/e2e.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
from collections.abc import Sequence
from decimal import Decimal

import pytest

from token_budget.api import conditions as cond
from token_budget.api import v1alpha1 as api
from token_budget.api.types import display_money
from token_budget.errors import MetricsError, MetricsUnavailable
from token_budget.handlers import status as statuses
from token_budget.metrics.prometheus import PrometheusSource, ResultItem
from token_budget.policy import engine, planner, sources
from token_budget.policy.decisions import Decision
from token_budget.policy.inputs import SourceSample, SpendSeries
from token_budget.reports import spend as reports
from token_budget.reports import tables
from unit import builders as b
from unit.builders import NOW

COUNTERS = sources.resolve(api.SpendSource())
LITELLM = sources.resolve(api.SpendSource(preset=api.Preset.LITELLM))


def _item(value: float, **labels: str) -> ResultItem:
    return {"metric": dict(labels), "value": [NOW.timestamp(), str(value)]}


class _Prometheus(PrometheusSource):
    """The adapter with ``query`` answered from lists: spend, outcomes, the rest empty."""

    def __init__(self, spend: list[ResultItem], outcomes: Sequence[ResultItem] = ()) -> None:
        super().__init__("http://127.0.0.1:1")
        self.spend = spend
        self.outcomes = list(outcomes)
        self.kinds: list[str] = []

    def query(self, text: str, at: dt.datetime, kind: str = "spend",
              matrix: bool = False) -> list[ResultItem]:
        self.kinds.append(kind)
        if kind in ("spend", "recent"):
            return self.spend
        if kind == "outcome":
            return self.outcomes
        return []


SPEND = [
    # Counted: a search pod on a model other than tiny.
    _item(300_000, tb_kind="input", namespace=b.NAMESPACE, pod="search-1", model="large"),
    _item(20_000, tb_kind="output", namespace=b.NAMESPACE, pod="search-1", model="large"),
    _item(50_000, tb_kind="input", namespace=b.NAMESPACE, pod="search-2", model="medium"),
    # Turned away by NotEqual (model tiny) and by Regex (pod qa-1).
    _item(900_000, tb_kind="input", namespace=b.NAMESPACE, pod="search-3", model="tiny"),
    _item(700_000, tb_kind="input", namespace=b.NAMESPACE, pod="qa-1", model="large"),
    # Another namespace.
    _item(400_000, tb_kind="input", namespace="team-ads", pod="search-1", model="large"),
]
OUTCOMES = [
    _item(30, namespace=b.NAMESPACE, pod="search-1", outcome="success"),
    _item(10, namespace=b.NAMESPACE, pod="search-2", outcome="merged"),
    _item(500, namespace=b.NAMESPACE, pod="search-1", outcome="failure"),  # not =~ success|merged
    _item(200, namespace=b.NAMESPACE, pod="canary", outcome="success"),  # pod != canary
    _item(900, namespace="team-ads", pod="search-1", outcome="success"),
]


def _budget() -> api.TokenBudget:
    return b.token_budget(
        limits=[{"window": "24h", "tokens": 10_000_000}],
        spendMatchers=[{"label": "model", "operator": "NotEqual", "value": "tiny"},
                       {"label": "pod", "operator": "Regex", "value": "search-.*"}],
        outcome={"metric": "agent_outcomes_total", "window": "24h",
                 "matchers": [{"label": "outcome", "operator": "Regex",
                               "value": "success|merged"},
                              {"label": "pod", "operator": "NotEqual", "value": "canary"}]})


def _decision(budget: api.Budget, prom: PrometheusSource) -> Decision:
    snap = prom.collect(planner.plan([budget], NOW), NOW)
    world = engine.World(budgets=[budget], catalog=b.catalog(), namespaces={b.NAMESPACE: {}})
    [decision] = engine.evaluate(world, snap, NOW).decisions
    return decision


def test_the_report_shows_a_budget_the_spend_and_cost_per_outcome_its_status_shows() -> None:
    budget = _budget()
    decision = _decision(budget, _Prometheus(SPEND, OUTCOMES))
    report = reports.build(_Prometheus(SPEND, OUTCOMES), [budget], b.catalog(),
                           {b.NAMESPACE: {}}, 86400, NOW)

    [usage] = decision.windows
    row = report.by_budget[f"TokenBudget/{b.NAMESPACE}/search"]
    # 320,000 on large ($3.60) + 50,000 on medium ($0.05); 40 outcomes.
    assert (usage.tokens, usage.cost) == (370_000, Decimal("3.65"))
    assert (round(row.tokens), row.cost) == (usage.tokens, usage.cost)
    assert decision.cost_per_outcome == Decimal("0.09125")
    assert report.outcomes[f"TokenBudget/{b.NAMESPACE}/search"] == (40.0,
                                                                      decision.cost_per_outcome)


def test_the_report_reads_no_burn_rate_and_fails_when_a_source_cannot_be_read() -> None:
    prom = _Prometheus(SPEND, OUTCOMES)
    reports.build(prom, [_budget()], b.catalog(), {}, 86400, NOW)
    # A day is read from the recording rules when they run (its matchers name only the pod,
    # which the rules keep): one look for them ("estimate"), then the raw series.
    assert sorted(prom.kinds) == ["estimate", "outcome", "spend"]

    class Down(_Prometheus):
        def query(self, text: str, at: dt.datetime, kind: str = "spend",
                  matrix: bool = False) -> list[ResultItem]:
            raise MetricsUnavailable("Prometheus at http://127.0.0.1:1 cannot be reached")

    with pytest.raises(MetricsError, match="cannot be reached"):
        reports.build(Down([]), [_budget()], b.catalog(), {}, 86400, NOW)


@pytest.mark.parametrize(
    ("seconds", "window"),
    [pytest.param(86400 * 7, "7d", id="whole days read as days"),
     pytest.param(5400, "90m", id="an hour and a half reads as minutes"),
     pytest.param(3600, "1h", id="the report window of a 1h budget is the budget's window")],
)
def test_a_report_window_is_the_rolling_window_of_its_length(seconds: int, window: str) -> None:
    assert str(planner.rolling_key(seconds)) == window


# ---------------------------------------------------------------------------
# What a source returned, and why a scope saw none of it
# ---------------------------------------------------------------------------


def _litellm(*team_aliases: str) -> list[ResultItem]:
    return [_item(100, tb_kind="input", team_alias=alias, api_key_alias=f"key-{i}",
                  model="large") for i, alias in enumerate(team_aliases)]


def test_the_snapshot_keeps_a_bounded_sample_of_what_each_source_returned() -> None:
    budget = b.token_budget(source={"preset": "LiteLLM"})
    aliases = ["None", "default-team", "a", "b", "c", "d", "e"]
    snap = _Prometheus(_litellm(*aliases, "None")).collect(planner.plan([budget], NOW), NOW)
    assert snap.returned == {LITELLM: SourceSample(
        series=8, label="team_alias", values=("None", "a", "b", "c", "d"), more=2)}


def _unseen(budget: api.Budget, sample: SourceSample | None, spend: Sequence[SpendSeries] = ()
            ) -> Decision:
    snap = b.snapshot([budget], spend)
    if sample is not None:
        snap = dataclasses.replace(snap, returned={sources.resolve(budget.spec.source): sample})
    world = engine.World(budgets=[budget], catalog=b.catalog(), namespaces={"team-a": {}})
    [decision] = engine.evaluate(world, snap, NOW).decisions
    return decision


@pytest.mark.parametrize(
    ("sample", "spend", "matchers", "unmatched"),
    [
        pytest.param(SourceSample(12, "team_alias", ("None", "default-team")),
                     [b.series(5, namespace="None"), b.series(5, namespace="default-team")], [],
                     "the LiteLLM source returned 12 series, their team_alias values are "
                     "None, default-team; none names namespace team-a",
                     id="a label that never names the namespace is said with its values"),
        pytest.param(SourceSample(40, "team_alias", ("", "a", "b", "c", "d"), more=7), [], [],
                     'the LiteLLM source returned 40 series, their team_alias values are '
                     '"", a, b, c, d and 7 more; none names namespace team-a',
                     id="many values are cut to a few and counted"),
        pytest.param(SourceSample(3, "team_alias", ("team-a",)),
                     [b.series(5, namespace="team-a", user="bob")],
                     [{"label": "user", "operator": "NotEqual", "value": "bob"}],
                     'the LiteLLM source returned 1 series for namespace team-a; none '
                     'satisfies the spendMatchers user!="bob"',
                     id="series of the namespace all turned away by the spend matchers"),
        pytest.param(SourceSample(0, "team_alias"), [], [], None,
                     id="a source that returned nothing has nothing to explain"),
        pytest.param(None, [], [], None, id="a snapshot without a sample explains nothing"),
    ],
)
def test_a_scope_that_saw_no_series_says_what_the_source_returned(
        sample: SourceSample | None, spend: list[SpendSeries], matchers: list[dict[str, str]],
        unmatched: str | None) -> None:
    budget = b.token_budget(namespace="team-a", source={"preset": "LiteLLM"},
                            spendMatchers=matchers)
    decision = _unseen(budget, sample, spend)
    assert (decision.spend_known, decision.series_seen) == (True, False)
    assert decision.unmatched == unmatched


def test_a_scope_that_sees_its_series_explains_nothing() -> None:
    budget = b.token_budget(namespace="team-a", source={"preset": "LiteLLM"})
    decision = _unseen(budget, SourceSample(2, "team_alias", ("team-a",)),
                       [b.series(5, namespace="team-a")])
    assert decision.series_seen and decision.unmatched is None


def _metrics_available(decision: Decision, budget: api.Budget) -> cond.Condition:
    status = statuses.budget_status(budget, [decision], "USD", NOW, 0, None)
    [found] = [c for c in status["conditions"] if c["type"] == cond.METRICS_AVAILABLE]
    return cond.Condition.model_validate(found)


def test_status_says_why_no_series_matched_the_scope() -> None:
    budget = b.token_budget(namespace="team-a", source={"preset": "LiteLLM"})
    decision = _unseen(budget, SourceSample(12, "team_alias", ("None", "default-team")))
    c = _metrics_available(decision, budget)
    assert (c.status, c.reason) == (cond.Status.TRUE, "NoSeriesMatchScope")
    assert c.message == ("the LiteLLM source returned 12 series, their team_alias values are "
                         "None, default-team; none names namespace team-a; counted as zero")


def test_status_says_no_spend_yet_when_the_source_returned_nothing() -> None:
    budget = b.token_budget(namespace="team-a", source={"preset": "LiteLLM"})
    c = _metrics_available(_unseen(budget, SourceSample(0, "team_alias")), budget)
    assert c.reason == "NoSpendYet"


# ---------------------------------------------------------------------------
# One money formatter, one table renderer
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "currency", "per_unit", "text"),
    [
        pytest.param("1234.567", "USD", False, "$1,234.57", id="dollars with a symbol"),
        pytest.param("12.5", "CHF", False, "12.50 CHF", id="a currency without a symbol"),
        pytest.param("0.00041", "EUR", True, "€0.0004", id="a sub-unit price keeps 4 decimals"),
        pytest.param("2.5", "GBP", True, "£2.50", id="a price of one or more reads in cents"),
    ],
)
def test_money_for_people_has_one_format(value: str, currency: str, per_unit: bool,
                                         text: str) -> None:
    assert display_money(Decimal(value), currency, per_unit=per_unit) == text


def test_tables_pad_columns_and_cut_trailing_blanks() -> None:
    out = io.StringIO()
    tables.render([["NAME", "COST"], ["search", "$1.00"], ["a", ""]], out)
    assert out.getvalue() == "NAME     COST\nsearch   $1.00\na\n"
