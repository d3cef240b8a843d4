"""The ``tokenbudget`` command: crds, simulate, and its exit codes (validate: test_rules.py).

Run in-process through ``token_budget.cli.main`` with pytest's ``capsys``.

Covers:
- ``tokenbudget crds`` prints the three CRDs, equal to the committed ones;
  ``--out-dir`` writes one file per CRD;
- ``tokenbudget simulate`` on the examples plus a namespace and two workloads:
  with a JSON spend snapshot the search budget past 95 % of its Berlin month
  is Throttled with a paced rate and a rerouted model, and the QA environment
  is Ok with its allowed models; with a Prometheus text exposition the daily
  guard rail blocks; ``-o json`` parses and says the same;
- input errors exit 1 with a message on stderr; usage errors exit 2.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from token_budget import cli
from token_budget.api import crds

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = str(REPO / "examples")
AT = "2025-11-20T12:00:00Z"  # 10 days and 11 hours before the Berlin month ends

CLUSTER = """
apiVersion: v1
kind: Namespace
metadata:
  name: qa-1
  labels: {environment: qa}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: search-agent, namespace: team-search}
spec:
  template:
    metadata:
      labels: {tokenbudget.io/agent: "true"}
    spec:
      containers:
        - name: agent
          image: agent
          env: [{name: LLM_MODEL, value: gpt-5}]
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: nightly-eval, namespace: qa-1}
spec:
  jobTemplate:
    spec:
      template:
        metadata:
          labels: {tokenbudget.io/agent: "true"}
        spec:
          containers: [{name: eval, image: eval}]
"""

# gpt-5 costs $1.25 per million input and $10 per million output tokens:
# the Berlin month holds $320 + $1,600 = $1,920 of $2,000 (96 %), the last 24 h
# $10 + $90 = $100 of $500 (20 %); QA spent $25 + $100 on gpt-5-mini.
SPEND = {
    "recentSeconds": 600,
    "windows": {
        "Month@Europe/Berlin": [{"namespace": "team-search", "workload": "search-agent-0",
                                 "model": "gpt-5", "input": 256_000_000, "output": 160_000_000,
                                 "labels": {"team": "search"}}],
        "24h": [{"namespace": "team-search", "workload": "search-agent-0", "model": "gpt-5",
                 "input": 8_000_000, "output": 9_000_000, "labels": {"team": "search"}}],
        "Month@UTC": [{"namespace": "qa-1", "workload": "nightly-eval-1", "model": "gpt-5-mini",
                       "input": 100_000_000, "output": 50_000_000}],
    },
}

# A burst: $100 + $500 in counters that every window sees; the ads team's spend
# in the same namespace does not count for the search budget.
def _sample(value: str, **labels: str) -> str:
    return "llm_tokens_total{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "} " + value


SEARCH_AGENT = {"namespace": "team-search", "pod": "search-agent-0", "model": "gpt-5"}
EXPOSITION = "\n".join([
    "# HELP llm_tokens_total Tokens sent to and received from LLMs.",
    "# TYPE llm_tokens_total counter",
    _sample("8e+07", **SEARCH_AGENT, token_type="input", team="search"),
    _sample("5e+07", **SEARCH_AGENT, token_type="output", team="search"),
    _sample("9e+09", **SEARCH_AGENT, token_type="output", team="ads"),
    _sample("1e+06", namespace="qa-1", pod="nightly-eval-1", model="gpt-5-mini",
            token_type="input"),
    "",
])


@pytest.fixture
def cluster(tmp_path: Path) -> str:
    path = tmp_path / "cluster.yaml"
    path.write_text(CLUSTER)
    return str(path)


@pytest.fixture
def spend_json(tmp_path: Path) -> str:
    path = tmp_path / "spend.json"
    path.write_text(json.dumps(SPEND))
    return str(path)


@pytest.fixture
def exposition(tmp_path: Path) -> str:
    path = tmp_path / "metrics.txt"
    path.write_text(EXPOSITION)
    return str(path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def rows(out: str, first: str) -> dict[str, list[str]]:
    """Table rows keyed by their first column, for the table whose header starts with ``first``."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first))
    table: dict[str, list[str]] = {}
    for line in lines[start + 1:]:
        if not line.strip():
            break
        cells = line.split()
        table.setdefault(cells[0], []).append(" ".join(cells))
    return table


# ---------------------------------------------------------------------------
# crds
# ---------------------------------------------------------------------------


def test_crds_prints_the_three_crds(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "crds")
    docs = list(yaml.safe_load_all(out))
    assert code == 0
    assert [d["kind"] for d in docs] == ["CustomResourceDefinition"] * 3
    assert sorted(d["metadata"]["name"] for d in docs) == [
        "clustertokenbudgets.tokenbudget.io", "modelcatalogs.tokenbudget.io",
        "tokenbudgets.tokenbudget.io"]
    assert docs == list(crds.all_crds().values())


def test_crds_out_dir_writes_the_files_that_are_committed(capsys: pytest.CaptureFixture[str],
                                                          tmp_path: Path) -> None:
    code, out, _ = run(capsys, "crds", "--out-dir", str(tmp_path / "crds"))
    assert (code, out) == (0, "")
    for committed in sorted((REPO / "crds").glob("*.yaml")):
        assert (tmp_path / "crds" / committed.name).read_text() == committed.read_text()


# ---------------------------------------------------------------------------
# simulate
# ---------------------------------------------------------------------------


def test_simulate_shows_a_budget_past_95_percent_throttled_with_a_paced_rate(
        capsys: pytest.CaptureFixture[str], cluster: str, spend_json: str) -> None:
    code, out, err = run(capsys, "simulate", "--budgets", EXAMPLES, cluster,
                         "--spend", spend_json, "--at", AT)
    assert (code, err) == (0, "")
    budgets = rows(out, "BUDGET")
    assert budgets["team-search/search-agents"] == [
        "team-search/search-agents team-search Month@Europe/Berlin $1,920.00 $2,000.00 96.0% "
        "Throttled LimitReached",
        "team-search/search-agents team-search 24h $100.00 $500.00 20.0% Throttled LimitReached",
    ]
    assert budgets["qa-environment"] == [
        "qa-environment qa-1 Month@UTC $125.00 $300.00 41.7% Ok WithinBudget"]
    workloads = rows(out, "WORKLOAD")
    # $80 left at $1,920 per 416M tokens is 17.3M tokens over 15,060 minutes.
    [search] = workloads["deployment/team-search/search-agent"]
    assert search.split()[:5] == ["deployment/team-search/search-agent", "Throttled",
                                  "TokenBudget/team-search/search-agents", "gpt-5-nano", "1150"]
    assert "claude-opus-4-1" not in search.split()[5]
    [qa] = workloads["cronjob/qa-1/nightly-eval"]
    assert qa.split()[:5] == ["cronjob/qa-1/nightly-eval", "Ok",
                              "ClusterTokenBudget/qa-environment", "-", "-"]
    assert "gpt-5," not in qa and "gpt-5-mini" in qa  # Frontier models denied
    assert ("team-search/search-agents: Throttled (LimitReached) spend in window Month "
            "(Europe/Berlin) is $1,920.00 of $2,000.00 (96.0%): Throttle from 95%") in out


def test_simulate_reads_a_prometheus_text_exposition(capsys: pytest.CaptureFixture[str],
                                                     cluster: str, exposition: str) -> None:
    code, out, err = run(capsys, "simulate", "--budgets", EXAMPLES, cluster,
                         "--spend", exposition, "--at", AT)
    assert (code, err) == (0, "")
    assert rows(out, "BUDGET")["team-search/search-agents"] == [
        "team-search/search-agents team-search Month@Europe/Berlin $600.00 $2,000.00 30.0% "
        "Blocked LimitReached",
        "team-search/search-agents team-search 24h $600.00 $500.00 120.0% Blocked LimitReached",
    ]
    [search] = rows(out, "WORKLOAD")["deployment/team-search/search-agent"]
    assert search.split()[1] == "Blocked"


def test_simulate_json_output_parses_and_says_the_same(capsys: pytest.CaptureFixture[str],
                                                       cluster: str, spend_json: str) -> None:
    code, out, _ = run(capsys, "simulate", "--budgets", EXAMPLES, cluster,
                       "--spend", spend_json, "--at", AT, "-o", "json")
    assert code == 0
    result: dict[str, Any] = json.loads(out)
    decisions = {d["budget"]: d for d in result["decisions"]}
    search = decisions["team-search/search-agents"]
    assert (search["kind"], search["state"], search["reason"]) == (
        "TokenBudget", "Throttled", "LimitReached")
    assert [(w["window"], w["timeZone"], w["usedPercent"]) for w in search["windows"]] == [
        ("Month", "Europe/Berlin", 96.0), ("24h", "UTC", 20.0)]
    assert Decimal(search["windows"][0]["cost"]) == Decimal(1920)
    assert search["windows"][0]["limitCost"] == "2000.00"
    assert decisions["qa-environment"]["namespaces"] == ["qa-1"]
    directive = result["directives"]["deployment/team-search/search-agent"]
    assert (directive["state"], directive["model"], directive["tokensPerMinute"]) == (
        "Throttled", "gpt-5-nano", 1150)
    assert result["directives"]["cronjob/qa-1/nightly-eval"]["allowedModels"] == [
        "claude-haiku-4-5", "claude-sonnet-4-5", "gemini-2.5-flash", "gemini-2.5-flash-lite",
        "gpt-4o-mini", "gpt-5-mini", "gpt-5-nano"]


def test_simulate_without_any_series_for_a_new_budget_counts_zero_and_says_so(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    empty = tmp_path / "empty.json"
    empty.write_text('{"windows": {}}')
    code, out, _ = run(capsys, "simulate", "--budgets", EXAMPLES, "--spend", str(empty),
                       "--at", AT)
    assert code == 0
    budget_rows = rows(out, "BUDGET")["team-search/search-agents"]
    assert all(r.split()[-2:] == ["Ok", "WithinBudget"] for r in budget_rows)
    assert "no spend series exist yet" in out


@pytest.mark.parametrize(
    ("spend", "says"),
    [
        pytest.param("{not json", "not a valid spend snapshot", id="a broken JSON snapshot"),
        pytest.param("llm_tokens_total{ 1\n", "not valid Prometheus text exposition",
                     id="a broken exposition"),
    ],
)
def test_simulate_with_an_unreadable_spend_file_exits_1(capsys: pytest.CaptureFixture[str],
                                                        tmp_path: Path, spend: str,
                                                        says: str) -> None:
    path = tmp_path / "spend"
    path.write_text(spend)
    code, out, err = run(capsys, "simulate", "--budgets", EXAMPLES, "--spend", str(path),
                         "--at", AT)
    assert (code, out) == (1, "")
    assert err.startswith("tokenbudget simulate: ") and says in err


def test_simulate_with_a_missing_spend_file_exits_1(capsys: pytest.CaptureFixture[str],
                                                    tmp_path: Path) -> None:
    code, _, err = run(capsys, "simulate", "--budgets", EXAMPLES,
                       "--spend", str(tmp_path / "nope.json"), "--at", AT)
    assert code == 1 and "nope.json" in err


def test_simulate_refuses_broken_budgets_and_names_them(capsys: pytest.CaptureFixture[str],
                                                        spend_json: str) -> None:
    broken = str(REPO / "tests" / "broken" / "float-money.yaml")
    code, out, err = run(capsys, "simulate", "--budgets", broken, "--spend", spend_json)
    assert (code, out) == (1, "")
    assert "(TokenBudget team-search/float-cost): spec.limits[0].cost:" in err


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param([], id="no subcommand"),
        pytest.param(["simulate", "--budgets", "x"], id="simulate without spend"),
        pytest.param(["simulate", "--budgets", "x", "--spend", "y", "--at", "yesterday"],
                     id="a time that is not RFC 3339"),
        pytest.param(["validate"], id="validate without paths"),
    ],
)
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert "usage: tokenbudget" in capsys.readouterr().err
