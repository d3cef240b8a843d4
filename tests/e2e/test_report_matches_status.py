"""One reading of spend, on the real control plane and the real Prometheus (issue 12, part 3).

Covers:
- ``tokenbudget report`` shows a budget with NotEqual and Regex spend and
  outcome matchers the very spend, tokens and cost per outcome its status
  shows (the operator process wrote the status; the report reads Prometheus
  and the cluster itself);
- a LiteLLM budget whose namespace no ``team_alias`` names says so in
  ``MetricsAvailable`` (reason ``NoSeriesMatchScope``), naming the values the
  source returned, instead of ``NoSpendYet``.

Spend goes exporter -> Prometheus (1 s scrape) -> the operator's PromQL.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from harness.controlplane import ControlPlane
from harness.exporter import AgentExporter
from harness.operator_process import OperatorProcess
from harness.prometheus import Prometheus
from harness.spend import seed, spend
from harness.waiting import eventually
from token_budget.cli import main
from token_budget.kube import TOKENBUDGETS, Kube

CENT = Decimal("0.01")


@pytest.fixture
def operator(controlplane: ControlPlane, prometheus: Prometheus,
             tmp_path: Path) -> Iterator[OperatorProcess]:
    op = OperatorProcess(controlplane.kubeconfig, prometheus.url, tmp_path,
                         extra_args=["--lease-name", f"tb-{uuid.uuid4().hex[:8]}"])
    op.start()
    try:
        yield op
    finally:
        op.stop()


def _budget(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "tokenbudget.io/v1alpha1", "kind": "TokenBudget",
            "metadata": {"name": name}, "spec": spec}


def _condition(body: dict[str, Any], type_: str) -> dict[str, Any]:
    for c in (body.get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return dict(c)
    return {}


def test_report_shows_a_budget_with_not_equal_and_regex_matchers_what_its_status_shows(
        kube: Kube, controlplane: ControlPlane, namespace: str, exporter: AgentExporter,
        prometheus: Prometheus, operator: OperatorProcess,
        capsys: pytest.CaptureFixture[str]) -> None:
    ns = namespace
    for pod, model, tokens in (("search-1", "gpt-4o", 100_000),      # counted
                               ("search-2", "gpt-4o-mini", 50_000),  # model != gpt-4o-mini
                               ("qa-1", "gpt-4o", 30_000)):          # pod !~ search-.*
        seed(exporter, prometheus, ns, pod, model)
        spend(exporter, prometheus, ns, pod, tokens, model)
    outcomes = (("search-1", "success", 4), ("search-1", "merged", 1),
                ("search-1", "failure", 10),  # outcome !~ success|merged
                ("canary", "success", 5))     # pod == canary
    # The counters exist at zero first, as a running agent's would: a counter that
    # appears with its value counts in full only when Prometheus is older than the
    # window (the test's Prometheus is younger than an hour).
    for pod, outcome, _ in outcomes:
        exporter.add_outcome(ns, pod, outcome, 0)
    eventually(lambda: prometheus.query(
        f'count(count_over_time(agent_outcomes_total{{namespace="{ns}"}}[1m]) > 1) == 4'),
        30, what="two samples of each outcome counter")
    for pod, outcome, n in outcomes:
        exporter.add_outcome(ns, pod, outcome, n)
    prometheus.wait_for(f'sum(agent_outcomes_total{{namespace="{ns}"}})',
                        lambda r: bool(r) and float(r[0]["value"][1]) == 20)
    kube.create(TOKENBUDGETS, ns, _budget(
        "search", limits=[{"window": "1h", "tokens": 200_000}],
        actions=[{"type": "Warn", "atPercent": 50}],
        spendMatchers=[{"label": "pod", "operator": "Regex", "value": "search-.*"},
                       {"label": "model", "operator": "NotEqual", "value": "gpt-4o-mini"}],
        outcome={"metric": "agent_outcomes_total", "window": "1h",
                 "matchers": [{"label": "outcome", "operator": "Regex",
                               "value": "success|merged"},
                              {"label": "pod", "operator": "NotEqual", "value": "canary"}]}))

    def warned() -> dict[str, Any] | None:
        body = kube.get(TOKENBUDGETS, ns, "search")
        return body if (body.get("status") or {}).get("state") == "Warning" else None

    status = eventually(warned, 60, what=f"TokenBudget {ns}/search Warning")["status"]
    [window] = status["windows"]
    assert window["tokens"] == 100_000, status

    code = main(["report", "--prometheus-url", prometheus.url, "--since", "1h",
                 "--kubeconfig", str(controlplane.kubeconfig), "-o", "json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(out)
    name = f"TokenBudget/{ns}/search"
    [row] = [r for r in data["byBudget"] if r["budget"] == name]
    assert row["tokens"] == window["tokens"]
    assert Decimal(row["cost"]) == Decimal(window["cost"]).quantize(CENT) == Decimal("0.25")
    [cpo] = [r for r in data["costPerOutcome"] if r["budget"] == name]
    assert cpo["outcomes"] == 5
    assert Decimal(cpo["costPerOutcome"]) == Decimal(status["costPerOutcome"]) == Decimal("0.05")


def test_a_litellm_budget_whose_namespace_no_team_alias_names_says_which_ones_there_are(
        kube: Kube, namespace: str, exporter: AgentExporter, prometheus: Prometheus,
        operator: OperatorProcess) -> None:
    ns = namespace
    key = f"key-{uuid.uuid4().hex[:6]}"
    for alias in ("None", "default-team"):
        exporter.add(alias, key, "gpt-4o", input=100, fmt="litellm")
    prometheus.wait_for(f'litellm_input_tokens_metric_total{{api_key_alias="{key}"}}',
                        lambda r: len(r) == 2)
    kube.create(TOKENBUDGETS, ns, _budget(
        "proxy", source={"preset": "LiteLLM"}, limits=[{"window": "1h", "tokens": 1_000}]))

    def explained() -> dict[str, Any] | None:
        c = _condition(kube.get(TOKENBUDGETS, ns, "proxy"), "MetricsAvailable")
        return c if c.get("reason") == "NoSeriesMatchScope" else None

    c = eventually(explained, 60, what=f"TokenBudget {ns}/proxy MetricsAvailable explained")
    assert c["status"] == "True"
    assert c["message"].startswith("the LiteLLM source returned ")
    assert "their team_alias values are None, " in c["message"]
    assert c["message"].endswith(f"; none names namespace {ns}; counted as zero")
