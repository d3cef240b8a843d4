"""``tokenbudget report`` and ``tokenbudget backtest`` on a real Prometheus with known history.

Twelve days of counters are backfilled with ``promtool tsdb create-blocks-from
openmetrics`` (5-minute samples, linear growth, so every increase over a window
is known exactly), then the CLI's numbers are asserted:

* search agents on gpt-4o: 12,000 input + 1,200 output tokens an hour;
* QA agents on claude-sonnet-4-5: 6,000 input + 600 output tokens an hour.

Over 7 days that is $7.06 for search (and $0.42 had it used gpt-4o-mini, the
catalog's cheaper equivalent: $6.63 saved) and $4.54 for QA. A Day budget of
200,000 tokens on search would have warned at 08:00 and blocked at 16:00 UTC
every day, eight hours blocked a day, avoiding $0.042 an hour.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from harness.prometheus import Prometheus, backfilled
from token_budget.cli import main

REPO = Path(__file__).resolve().parents[2]
END = dt.datetime.now(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
DAYS = 12
STEP = 300
SERIES = [
    # namespace, pod, model, token type, tokens per hour
    ("rep-search", "search-1", "gpt-4o", "input", 12_000),
    ("rep-search", "search-1", "gpt-4o", "output", 1_200),
    ("rep-qa", "qa-1", "claude-sonnet-4-5", "input", 6_000),
    ("rep-qa", "qa-1", "claude-sonnet-4-5", "output", 600),
]


def openmetrics() -> str:
    start = END - dt.timedelta(days=DAYS)
    lines = ["# TYPE llm_tokens counter"]
    for ns, pod, model, kind, per_hour in SERIES:
        labels = f'namespace="{ns}",pod="{pod}",model="{model}",token_type="{kind}"'
        t = start
        while t <= END:
            value = per_hour * (t - start).total_seconds() / 3600
            lines.append(f"llm_tokens_total{{{labels}}} {value:.0f} {int(t.timestamp())}")
            t += dt.timedelta(seconds=STEP)
    lines.append("# TYPE agent_outcomes counter")
    t = start
    while t <= END:
        hours = (t - start).total_seconds() / 3600
        lines.append(f'agent_outcomes_total{{namespace="rep-search",outcome="success"}} '
                     f"{100 * hours:.0f} {int(t.timestamp())}")
        t += dt.timedelta(seconds=STEP)
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    with backfilled(tmp_path_factory.mktemp("history"), openmetrics(), "60d") as prom:
        yield prom


@pytest.fixture
def manifests(tmp_path: Path) -> Path:
    budgets = [
        {"apiVersion": "tokenbudget.io/v1alpha1", "kind": "TokenBudget",
         "metadata": {"name": "search", "namespace": "rep-search"},
         "spec": {"limits": [{"window": "Day", "tokens": 200_000}],
                  "actions": [{"type": "Warn", "atPercent": 50},
                              {"type": "Block", "atPercent": 100}],
                  "outcome": {"metric": "agent_outcomes_total",
                              "matchers": [{"label": "outcome", "value": "success"}]}}},
        {"apiVersion": "tokenbudget.io/v1alpha1", "kind": "TokenBudget",
         "metadata": {"name": "qa", "namespace": "rep-qa"},
         "spec": {"limits": [{"window": "Month", "cost": "100.00"}]}},
    ]
    path = tmp_path / "budgets.yaml"
    path.write_text(yaml.safe_dump_all(budgets))
    return path


def run(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    code = main(list(args))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_report_prints_exact_spend_by_namespace_model_and_the_savings(
        history: Prometheus, manifests: Path, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    catalog = str(REPO / "examples" / "model-catalog.yaml")
    common = ["report", "--prometheus-url", history.url, "--since", "7d",
              "--at", END.isoformat(), "--catalog", catalog, "--budgets", str(manifests)]
    data = json.loads(run(capsys, *common, "-o", "json", "--html", str(tmp_path / "r.html")))
    by_ns = {r["namespace"]: r for r in data["byNamespace"]}
    assert by_ns["rep-search"] == {"namespace": "rep-search", "tokens": 7 * 24 * 13_200,
                                   "cost": "7.06"}
    assert by_ns["rep-qa"] == {"namespace": "rep-qa", "tokens": 7 * 24 * 6_600, "cost": "4.54"}
    assert data["total"]["cost"] == "11.59"
    by_model = {r["model"]: r["cost"] for r in data["byModel"]}
    assert by_model == {"gpt-4o": "7.06", "claude-sonnet-4-5": "4.54"}
    assert data["byBudget"][0] == {"budget": "TokenBudget/rep-search/search",
                                   "tokens": 2_217_600, "cost": "7.06"}
    [saving] = data["savings"]
    assert saving == {"namespace": "rep-search", "model": "gpt-4o", "instead": "gpt-4o-mini",
                      "tokens": 2_217_600, "cost": "7.06", "costInstead": "0.42",
                      "saved": "6.63"}
    # 100 successes an hour for 7 days: $7.056 / 16,800
    [cpo] = data["costPerOutcome"]
    assert cpo == {"budget": "TokenBudget/rep-search/search", "outcomes": 16_800,
                   "costPerOutcome": "0.0004"}
    html = (tmp_path / "r.html").read_text()
    assert "<svg" in html and "$6.63" in html and "rep-search" in html
    text = run(capsys, *common)
    assert "$11.59 for 3,326,400 tokens" in text
    csv = run(capsys, *common, "-o", "csv")
    assert "namespace,rep-search,2217600,7.06,USD" in csv


def test_backtest_says_when_each_action_fires_how_long_and_what_it_saves(
        history: Prometheus, manifests: Path, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    docs = list(yaml.safe_load_all(manifests.read_text()))
    one = tmp_path / "search.yaml"
    one.write_text(yaml.safe_dump(docs[0]))
    data = json.loads(run(
        capsys, "backtest", "--budget", str(one), "--prometheus-url", history.url,
        "--since", "3d", "--step", "1h", "--at", END.isoformat(),
        "--catalog", str(REPO / "examples" / "model-catalog.yaml"), "-o", "json"))
    fired = [(t["at"][11:16], t["from"], t["to"]) for t in data["transitions"]]
    assert fired == [("08:00", "Ok", "Warning"), ("16:00", "Warning", "Blocked"),
                     ("00:00", "Blocked", "Ok")] * 2 + [
                     ("08:00", "Ok", "Warning"), ("16:00", "Warning", "Blocked"),
                     ("00:00", "Blocked", "Ok")]
    hours = {k: v / 3600 for k, v in data["secondsIn"]["rep-search/search"].items()}
    assert hours == {"Ok": 24.0, "Warning": 24.0, "Blocked": 24.0}
    assert data["workloadSeconds"]["rep-search/search-1"]["Blocked"] == 24 * 3600
    assert data["avoidedTotal"] == "1.01"  # 24 blocked hours x $0.042
    assert data["unknownSteps"] == 0
