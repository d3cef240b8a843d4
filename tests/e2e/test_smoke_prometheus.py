"""Smoke tests of the real Prometheus and the synthetic agent exporter.

The exporter emits token counters in the three formats the operator's spend sources read
(plain counters, LiteLLM, OpenTelemetry); Prometheus scrapes them every second; PromQL
through ``prometheus_api_client`` must return exactly what the test added. Each test uses
its own namespace label values, so tests sharing the session exporter do not interfere.

These tests need no control plane.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from prometheus_api_client import PrometheusConnect
from prometheus_client.parser import text_string_to_metric_families

from harness.exporter import OTEL_TOKEN_BUCKETS, AgentExporter
from harness.prometheus import Prometheus, Result, values_by
from harness.waiting import eventually


@pytest.fixture
def promql(prometheus: Prometheus) -> Iterator[PrometheusConnect]:
    """A ``PrometheusConnect`` client for the session Prometheus (what the operator uses)."""
    session = requests.Session()
    try:
        yield PrometheusConnect(url=prometheus.url, disable_ssl=True, session=session)
    finally:
        session.close()


def _ns(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _by(pc: PrometheusConnect, query: str, *labels: str) -> dict[tuple[str, ...], float]:
    result: Result = pc.custom_query(query)
    return values_by(result, *labels)


def _settles(pc: PrometheusConnect, query: str, labels: tuple[str, ...],
             expected: dict[tuple[str, ...], float], timeout: float = 30.0) -> None:
    """Wait until ``query`` grouped by ``labels`` equals ``expected`` exactly."""
    eventually(lambda: _by(pc, query, *labels) == expected, timeout,
               what=f"{query} == {expected}")


def test_counters_format_totals_per_namespace_and_model(
    exporter: AgentExporter, promql: PrometheusConnect
) -> None:
    team_a, team_b = _ns("team-a"), _ns("team-b")
    exporter.add(namespace=team_a, workload="researcher", model="gpt-4o",
                 input=1200, output=300, cached_input=100)
    exporter.add(namespace=team_a, workload="writer", model="gpt-4o", input=800, output=50)
    exporter.add(namespace=team_a, workload="writer", model="claude-sonnet-4", input=70, output=7)
    exporter.add(namespace=team_b, workload="researcher", model="gpt-4o", input=5, output=1)
    exporter.add_outcome(team_a, "researcher", "success", 3)
    exporter.add_outcome(team_a, "researcher", "failure")

    query = (f'sum by (namespace, model, token_type) '
             f'(llm_tokens_total{{namespace=~"{team_a}|{team_b}"}})')
    labels = ("namespace", "model", "token_type")
    _settles(promql, query, labels, {
        (team_a, "gpt-4o", "input"): 2000.0,
        (team_a, "gpt-4o", "output"): 350.0,
        (team_a, "gpt-4o", "cached_input"): 100.0,
        (team_a, "claude-sonnet-4", "input"): 70.0,
        (team_a, "claude-sonnet-4", "output"): 7.0,
        (team_a, "claude-sonnet-4", "cached_input"): 0.0,
        (team_b, "gpt-4o", "input"): 5.0,
        (team_b, "gpt-4o", "output"): 1.0,
        (team_b, "gpt-4o", "cached_input"): 0.0,
    })
    # The pod label is the exporter's own (honor_labels), not rewritten by Prometheus.
    pods = _by(promql, f'sum by (pod) (llm_tokens_total{{namespace="{team_a}"}})', "pod")
    assert pods == {("researcher",): 1600.0, ("writer",): 927.0}

    _settles(promql, f'sum by (outcome) (agent_outcomes_total{{namespace="{team_a}"}})',
             ("outcome",), {("success",): 3.0, ("failure",): 1.0})

    # More spend moves the counters on: they only go up.
    exporter.add(namespace=team_b, workload="researcher", model="gpt-4o", input=10, output=2)
    _settles(promql, f'sum by (token_type) (llm_tokens_total{{namespace="{team_b}"}})',
             ("token_type",),
             {("input",): 15.0, ("output",): 3.0, ("cached_input",): 0.0})


def test_litellm_format_totals_per_team_alias_and_model(
    exporter: AgentExporter, promql: PrometheusConnect
) -> None:
    team = _ns("search")
    exporter.add(namespace=team, workload="crawler", model="gpt-4o", input=1000, output=200,
                 cost=0.0125, fmt="litellm")
    exporter.add(namespace=team, workload="ranker", model="gpt-4o", input=500, output=20,
                 cost=0.005, fmt="litellm")
    exporter.add(namespace=team, workload="ranker", model="gpt-4o-mini", input=9000,
                 output=900, cost=0.00189, fmt="litellm")

    for metric, expected in (
        ("litellm_input_tokens_metric_total", {"gpt-4o": 1500.0, "gpt-4o-mini": 9000.0}),
        ("litellm_output_tokens_metric_total", {"gpt-4o": 220.0, "gpt-4o-mini": 900.0}),
    ):
        _settles(promql, f'sum by (team_alias, model) ({metric}{{team_alias="{team}"}})',
                 ("team_alias", "model"),
                 {(team, model): value for model, value in expected.items()})

    spend = eventually(
        lambda: _by(promql, f'sum by (api_key_alias) '
                            f'(litellm_spend_metric_total{{team_alias="{team}"}})',
                    "api_key_alias"),
        what="LiteLLM spend series",
    )
    assert spend.keys() == {("crawler",), ("ranker",)}
    assert spend[("crawler",)] == pytest.approx(0.0125)
    assert spend[("ranker",)] == pytest.approx(0.00689)
    # The other LiteLLM labels are there and consistent per key.
    series = promql.custom_query(f'litellm_input_tokens_metric_total{{team_alias="{team}"}}')
    for sample in series:
        metric = sample["metric"]
        assert metric["requested_model"] == metric["model"]
        assert len(metric["hashed_api_key"]) == 64
        assert metric["team"]  # a team id distinct from the alias
        assert metric["team"] != team


def test_otel_format_histogram_sums_per_namespace_and_model(
    exporter: AgentExporter, promql: PrometheusConnect
) -> None:
    ns = _ns("otel")
    exporter.add(namespace=ns, workload="agent-0", model="gpt-4o", input=100, output=10,
                 fmt="otel")
    exporter.add(namespace=ns, workload="agent-1", model="gpt-4o", input=3000, output=250,
                 fmt="otel", provider="openai")
    exporter.add(namespace=ns, workload="agent-1", model="claude-sonnet-4", input=40,
                 output=4, fmt="otel", provider="anthropic")

    labels = ("k8s_namespace_name", "gen_ai_request_model", "gen_ai_token_type")
    _settles(promql, f'sum by ({", ".join(labels)}) '
                     f'(gen_ai_client_token_usage_sum{{k8s_namespace_name="{ns}"}})',
             labels, {
                 (ns, "gpt-4o", "input"): 3100.0,
                 (ns, "gpt-4o", "output"): 260.0,
                 (ns, "claude-sonnet-4", "input"): 40.0,
                 (ns, "claude-sonnet-4", "output"): 4.0,
             })
    counts = _by(promql, f'sum by (gen_ai_request_model) '
                         f'(gen_ai_client_token_usage_count{{k8s_namespace_name="{ns}"}})',
                 "gen_ai_request_model")
    assert counts == {("gpt-4o",): 4.0, ("claude-sonnet-4",): 2.0}  # requests x token types
    # Buckets are cumulative and +Inf equals the count.
    buckets = _by(promql, f'sum by (le) (gen_ai_client_token_usage_bucket'
                          f'{{k8s_namespace_name="{ns}",gen_ai_request_model="gpt-4o"}})', "le")
    assert buckets[("+Inf",)] == 4.0
    assert buckets[("16.0",)] == 1.0  # output=10
    assert buckets[("4096.0",)] == 4.0
    assert len(buckets) == len(OTEL_TOKEN_BUCKETS) + 1
    providers = _by(promql, f'count by (gen_ai_provider_name) (gen_ai_client_token_usage_sum'
                            f'{{k8s_namespace_name="{ns}"}})', "gen_ai_provider_name")
    assert providers == {("openai",): 4.0, ("anthropic",): 2.0}


def test_background_rate_is_scraped_and_matches_what_was_emitted(
    exporter: AgentExporter, promql: PrometheusConnect
) -> None:
    ns = _ns("rate")
    rate = exporter.set_rate(ns, "looper", "gpt-4o", input_per_second=200,
                             output_per_second=20)
    query = f'sum(llm_tokens_total{{namespace="{ns}",token_type="input"}})'
    try:
        eventually(lambda: _by(promql, query).get((), 0.0) > 0, what="tokens from the rate")
        time.sleep(2)
    finally:
        rate.stop()
    emitted = exporter.emitted("counters", namespace=ns, token_type="input")
    assert emitted >= 200  # ~2-3 s at 200/s
    _settles(promql, query, (), {(): emitted})


def test_prometheus_outage_keeps_history_and_resumes_on_the_same_url(
    exporter: AgentExporter, prometheus: Prometheus, promql: PrometheusConnect
) -> None:
    ns = _ns("outage")
    query = f'sum(llm_tokens_total{{namespace="{ns}"}})'
    exporter.add(namespace=ns, workload="w", model="gpt-4o", input=100)
    _settles(promql, query, (), {(): 100.0})
    before_outage = time.time()
    url = prometheus.url

    prometheus.stop()
    try:
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{url}/-/ready", timeout=5)
        exporter.add(namespace=ns, workload="w", model="gpt-4o", input=50)
    finally:
        prometheus.start()

    assert prometheus.url == url
    _settles(promql, query, (), {(): 150.0})
    # History from before the outage survived the restart (same TSDB directory).
    assert values_by(prometheus.query(query, at=before_outage)) == {(): 100.0}


def test_exposition_is_valid(exporter: AgentExporter, promtool: Path) -> None:
    ns = _ns("lint")
    exporter.add(namespace=ns, workload="w", model="m", input=1, output=1, cached_input=1)
    exporter.add(namespace=ns, workload="w", model="m", input=1, output=1, cost=0.1,
                 fmt="litellm")
    exporter.add(namespace=ns, workload="w", model="m", input=1, output=1, fmt="otel")
    exporter.add(namespace=ns, workload="g", model="m", input=1, output=1, cached_input=1,
                 fmt="envoy")
    exporter.add(namespace=ns, workload="g0", model="m", input=1, output=1, fmt="envoy-v0.3")
    exporter.add_outcome(ns, "w", "success")
    text = exporter.exposition()
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert families["llm_tokens"] == "counter"
    assert families["agent_outcomes"] == "counter"
    assert families["litellm_spend_metric"] == "counter"
    assert families["gen_ai_client_token_usage"] == "histogram"
    lint = subprocess.run([str(promtool), "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=60, check=False)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_exporter_rejects_values_a_format_cannot_express(exporter: AgentExporter) -> None:
    with pytest.raises(ValueError, match="cached-input"):
        exporter.add(namespace="x", workload="w", model="m", cached_input=1,
                     fmt="envoy-v0.3")
    with pytest.raises(ValueError, match="spend"):
        exporter.add(namespace="x", workload="w", model="m", cost=1.0, fmt="counters")
    with pytest.raises(ValueError, match="go up"):
        exporter.add(namespace="x", workload="w", model="m", input=-1)
