"""Each preset's own query, through the operator's Prometheus source, on series in their real shape.

The exporter emits what LiteLLM, the OpenTelemetry collector and Envoy AI Gateway
expose (label sets, histogram suffixes, token types; see ``harness/exporter.py``);
a real Prometheus scrapes it every second; :meth:`PrometheusSource.collect` runs
the plan of a budget that names the preset, as the operator does, and must give
back per workload and model exactly what was added.

Covers:
- LiteLLM: tokens per ``api_key_alias`` in a ``team_alias``, the cached part of the
  input counter read once (``litellm_input_cached_tokens_metric``), and the proxy's
  own spend kept as an exact decimal;
- OpenTelemetry: ``gen_ai_client_token_usage_sum`` by ``gen_ai_token_type``,
  never ``_count`` or the buckets; the cache reads' own counter
  (``gen_ai.client.inference.usage.cache_read.input_tokens``) taken out of input
  and priced at the cached price;
- every preset (LiteLLM without its own spend counter) prices cached tokens at the
  catalog's cached price, as the engine counts a budget's money;
- Envoy AI Gateway (v0.4 and later): input includes the cached input, which is
  read once and priced at the cached price; ``reasoning`` (part of output) is not
  added; and a v0.3 gateway's ``total`` is never added to input and output.

They need Prometheus only, no control plane. Series are created at zero first (a
request that spent nothing) where the exporter's real shape allows it, so the
reading is exact whatever Prometheus's age (a series born later needs evidence
that Prometheus was scraping at the window's start).
"""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal

import pytest

from harness.exporter import AgentExporter, Format
from harness.prometheus import Prometheus
from harness.waiting import eventually
from token_budget.api import v1alpha1 as api
from token_budget.metrics.prometheus import PrometheusSource
from token_budget.policy import engine, planner, sources
from token_budget.policy.catalog import Catalog
from token_budget.policy.inputs import SpendSeries
from token_budget.policy.windows import WindowKey

HOUR = 3600


def _read(prometheus: Prometheus, preset: str, ns: str) -> dict[tuple[str, str], SpendSeries]:
    """The last hour's spend of ``ns``, per (workload, model), as the operator reads it."""
    budget = api.TokenBudget.model_validate({
        "apiVersion": api.API_VERSION, "kind": "TokenBudget",
        "metadata": {"name": "b", "namespace": ns},
        "spec": {"limits": [{"window": "1h", "tokens": 1}], "source": {"preset": preset}}})
    now = dt.datetime.now(dt.UTC)
    snap = PrometheusSource(prometheus.url, scrape_interval_seconds=1).collect(
        planner.plan([budget], now), now)
    assert not snap.errors and not snap.window_errors, (snap.errors, snap.window_errors)
    rs = sources.resolve(budget.spec.source)
    return {(s.workload, s.model): s for s in snap.windows[(rs, WindowKey("1h"))]
            if s.namespace == ns}


_GPT_4O = Catalog([api.ModelCatalog.model_validate({
    "apiVersion": api.API_VERSION, "kind": "ModelCatalog", "metadata": {"name": "prices"},
    "spec": {"currency": "USD", "models": [{
        "name": "gpt-4o", "tier": "Frontier",
        "pricing": {"input": "2.50", "cachedInput": "1.25", "output": "10.00"}}]}})])


def _tokens(found: dict[tuple[str, str], SpendSeries]
            ) -> dict[tuple[str, str], tuple[float, float, float]]:
    return {k: (s.input_tokens, s.output_tokens, s.cached_input_tokens)
            for k, s in found.items()}


def _reads_as(prometheus: Prometheus, preset: str, ns: str,
              want: dict[tuple[str, str], tuple[float, float, float]]
              ) -> dict[tuple[str, str], SpendSeries]:
    """Wait until the preset's reading of ``ns`` is ``want`` (input, output, cached)."""
    eventually(lambda: _tokens(_read(prometheus, preset, ns)) == want, 30,
               what=f"{preset} spend read as {want}")
    return _read(prometheus, preset, ns)


def _plus(before: dict[tuple[str, str], tuple[float, float, float]],
          added: dict[tuple[str, str], tuple[float, float, float]]
          ) -> dict[tuple[str, str], tuple[float, float, float]]:
    return {k: (before[k][0] + a[0], before[k][1] + a[1], before[k][2] + a[2])
            for k, a in added.items()}


def _scraped_twice(prometheus: Prometheus, selector: str, series: int) -> None:
    eventually(lambda: prometheus.query(
        f"count(count_over_time({selector}[1m]) > 1) == {series}"), 30,
        what=f"two samples of each of {series} series {selector}")


def test_litellm_tokens_cached_tokens_and_spend_are_read_per_key_alias_in_a_team(
        exporter: AgentExporter, prometheus: Prometheus) -> None:
    ns = f"lite-{uuid.uuid4().hex[:6]}"
    for key, model in (("search-bot", "claude-sonnet-4"), ("triage", "gpt-4o")):
        exporter.add(ns, key, model, cost=0.0, fmt="litellm")  # the key's first call
    # LiteLLM's cached-token series appears with the first request that had some.
    exporter.add(ns, "search-bot", "gpt-4o", cached_input=10, cost=0.0, fmt="litellm")
    _scraped_twice(prometheus, f'litellm_input_tokens_metric_total{{team_alias="{ns}"}}', 3)
    _scraped_twice(prometheus,
                   f'litellm_input_cached_tokens_metric_total{{team_alias="{ns}"}}', 1)
    # Whether that first request counts depends on whether Prometheus is older than the
    # window (evidence that the series was born in it); what follows counts exactly.
    before = _tokens(_read(prometheus, "LiteLLM", ns))
    assert before[("search-bot", "gpt-4o")] in {(0.0, 0.0, 0.0), (0.0, 0.0, 10.0)}, before
    # 12,000 prompt tokens of which 4,000 cached: LiteLLM's input counter grows by 12,000.
    exporter.add(ns, "search-bot", "gpt-4o", input=8_000, cached_input=4_000, output=800,
                 cost=0.038, fmt="litellm")
    exporter.add(ns, "search-bot", "claude-sonnet-4", input=3_000, output=200, cost=0.012,
                 fmt="litellm")
    exporter.add(ns, "triage", "gpt-4o", input=500, output=40, cost=0.0016, fmt="litellm")
    added = {("search-bot", "gpt-4o"): (8_000.0, 800.0, 4_000.0),
             ("search-bot", "claude-sonnet-4"): (3_000.0, 200.0, 0.0),
             ("triage", "gpt-4o"): (500.0, 40.0, 0.0)}
    found = _reads_as(prometheus, "LiteLLM", ns, _plus(before, added))
    # The proxy's own spend, as reported (the exporter's float sums, to the micro-dollar).
    assert {k: round(s.cost or 0, 6) for k, s in found.items()} == {
        ("search-bot", "gpt-4o"): Decimal("0.038"),
        ("search-bot", "claude-sonnet-4"): Decimal("0.012"),
        ("triage", "gpt-4o"): Decimal("0.0016")}


def test_opentelemetry_token_usage_is_read_from_the_histogram_sum_by_token_type(
        exporter: AgentExporter, prometheus: Prometheus) -> None:
    ns = f"otel-{uuid.uuid4().hex[:6]}"
    # OTel observes only what a request reported: a first small request creates the series
    # (agent-0's with a cached token: the cache-read counter's series too).
    exporter.add(ns, "agent-0", "gpt-4o", input=1, output=1, cached_input=1, fmt="otel")
    exporter.add(ns, "agent-1", "claude-sonnet-4", input=1, output=1, fmt="otel",
                 provider="anthropic")
    _scraped_twice(prometheus, f'gen_ai_client_token_usage_sum{{k8s_namespace_name="{ns}"}}', 4)
    _scraped_twice(prometheus, "gen_ai_client_inference_usage_cache_read_input_tokens_total"
                               f'{{k8s_namespace_name="{ns}"}}', 1)
    # Whether that first request counts depends on whether Prometheus is older than the
    # window (evidence that the series was born in it); what follows counts exactly.
    before = _tokens(_read(prometheus, "OpenTelemetry", ns))
    assert before[("agent-1", "claude-sonnet-4")] in {(0.0, 0.0, 0.0), (1.0, 1.0, 0.0)}, before
    assert before[("agent-0", "gpt-4o")] in {(0.0, 0.0, 0.0), (1.0, 1.0, 1.0)}, before
    for _ in range(3):  # three requests: _count grows by 3 a type, _sum by the tokens
        exporter.add(ns, "agent-0", "gpt-4o", input=4_000, output=300, fmt="otel")
    # 2,000 prompt tokens of which 1,500 served from the provider's cache: the input
    # histogram grows by 2,000 (it includes them), the cache-read counter by 1,500.
    exporter.add(ns, "agent-0", "gpt-4o", input=500, cached_input=1_500, fmt="otel")
    exporter.add(ns, "agent-1", "claude-sonnet-4", input=900, output=90, fmt="otel",
                 provider="anthropic")
    added = {("agent-0", "gpt-4o"): (12_500.0, 900.0, 1_500.0),
             ("agent-1", "claude-sonnet-4"): (900.0, 90.0, 0.0)}
    found = _reads_as(prometheus, "OpenTelemetry", ns, _plus(before, added))
    # Each token counted once, the cached ones at the catalog's cached price.
    s = found[("agent-0", "gpt-4o")]
    assert _GPT_4O.cost(s.model, s.input_tokens, s.output_tokens, s.cached_input_tokens) == \
        (Decimal(round(s.input_tokens)) * Decimal("2.50")
         + Decimal(round(s.cached_input_tokens)) * Decimal("1.25")
         + Decimal(round(s.output_tokens)) * Decimal("10.00")) / 1_000_000
    assert s.cached_input_tokens >= 1_500 and s.input_tokens >= 12_500


def test_envoy_ai_gateway_reads_cached_input_once_and_never_total_or_reasoning(
        exporter: AgentExporter, prometheus: Prometheus) -> None:
    ns = f"envoy-{uuid.uuid4().hex[:6]}"
    callers: tuple[tuple[str, str, Format, str], ...] = (
        ("bot-0", "gpt-4o", "envoy", "openai"),
        ("bot-1", "claude-sonnet-4", "envoy", "anthropic"),
        ("old-gw", "gpt-4o", "envoy-v0.3", "openai"))
    for pod, model, fmt, provider in callers:  # a request that spent nothing: every type
        exporter.add(ns, pod, model, fmt=fmt, provider=provider)
    # 4 types (input, cached_input, output, reasoning) for each v1 caller, 3 for v0.3.
    _scraped_twice(prometheus, f'gen_ai_client_token_usage_sum{{k8s_namespace_name="{ns}"}}',
                   4 + 4 + 3)
    # bot-0 sends 1,000 prompt tokens of which 400 were cached: the gateway's `input` is
    # 1,000 and its `cached_input` 400.
    exporter.add(ns, "bot-0", "gpt-4o", input=600, cached_input=400, output=250, fmt="envoy")
    exporter.add(ns, "bot-1", "claude-sonnet-4", input=2_000, output=100, fmt="envoy",
                 provider="anthropic")
    exporter.add(ns, "old-gw", "gpt-4o", input=70, output=30, fmt="envoy-v0.3")
    want = {("bot-0", "gpt-4o"): (600.0, 250.0, 400.0),
            ("bot-1", "claude-sonnet-4"): (2_000.0, 100.0, 0.0),
            ("old-gw", "gpt-4o"): (70.0, 30.0, 0.0)}
    found = _reads_as(prometheus, "EnvoyAIGateway", ns, want)
    # What the gateway itself says was spent, summed over the types a reader could add.
    by_type = prometheus.query(f"sum by (gen_ai_token_type) (gen_ai_client_token_usage_sum"
                               f'{{k8s_namespace_name="{ns}"}})')
    raw = {r["metric"]["gen_ai_token_type"]: float(r["value"][1]) for r in by_type}
    assert raw == {"input": 1_000 + 2_000 + 70, "cached_input": 400, "output": 380,
                   "reasoning": 125 + 50, "total": 100}
    assert sum(s.tokens for s in found.values()) == raw["input"] + raw["output"]
    # The cached part priced at the catalog's cached price, the rest at the input price.
    catalog = Catalog([api.ModelCatalog.model_validate({
        "apiVersion": api.API_VERSION, "kind": "ModelCatalog", "metadata": {"name": "prices"},
        "spec": {"currency": "USD", "models": [{
            "name": "gpt-4o", "tier": "Frontier",
            "pricing": {"input": "2.50", "cachedInput": "1.25", "output": "10.00"}}]}})])
    s = found[("bot-0", "gpt-4o")]
    assert catalog.cost(s.model, s.input_tokens, s.output_tokens, s.cached_input_tokens) == \
        (600 * Decimal("2.50") + 400 * Decimal("1.25") + 250 * Decimal("10.00")) / 1_000_000


def _window_cost(prometheus: Prometheus, preset: str, ns: str) -> Decimal:
    """The cost the engine counts for ``ns`` over the last hour, priced by ``_GPT_4O``."""
    budget = api.TokenBudget.model_validate({
        "apiVersion": api.API_VERSION, "kind": "TokenBudget",
        "metadata": {"name": "b", "namespace": ns},
        "spec": {"limits": [{"window": "1h", "cost": "1000"}], "source": {"preset": preset}}})
    now = dt.datetime.now(dt.UTC)
    snap = PrometheusSource(prometheus.url, scrape_interval_seconds=1).collect(
        planner.plan([budget], now), now)
    world = engine.World(budgets=[budget], catalog=_GPT_4O, namespaces={ns: {}})
    [decision] = engine.evaluate(world, snap, now).decisions
    assert decision.spend_known, decision.spend_error
    return decision.windows[0].cost


@pytest.mark.parametrize(("preset", "fmt", "first", "metrics"), [
    pytest.param("Counters", "counters", 0, ("llm_tokens_total",), id="Counters"),
    pytest.param("LiteLLM", "litellm", 1, ("litellm_input_tokens_metric_total",
                                           "litellm_input_cached_tokens_metric_total"),
                 id="LiteLLM without its spend counter"),
    pytest.param("OpenTelemetry", "otel", 1, (
        "gen_ai_client_token_usage_sum",
        "gen_ai_client_inference_usage_cache_read_input_tokens_total"), id="OpenTelemetry"),
    pytest.param("EnvoyAIGateway", "envoy", 0, ("gen_ai_client_token_usage_sum",),
                 id="EnvoyAIGateway"),
])
def test_each_presets_cached_tokens_cost_the_cached_price(
        exporter: AgentExporter, prometheus: Prometheus, preset: str, fmt: Format, first: int,
        metrics: tuple[str, ...]) -> None:
    ns = f"cache-{uuid.uuid4().hex[:6]}"
    # The series first (a request that spent nothing, or one cached token where only a
    # request with some creates the cached series), then what is priced.
    exporter.add(ns, "agent-0", "gpt-4o", input=first, cached_input=first, fmt=fmt)
    label = sources.resolve(api.SpendSource(preset=api.Preset(preset))).namespace_label
    for metric in metrics:
        eventually(lambda m=metric: prometheus.query(
            f'count_over_time({m}{{{label}="{ns}"}}[1m]) > 1'), 30,
            what=f"two samples of {metric}")
    before = _window_cost(prometheus, preset, ns)
    # 1,000,000 prompt tokens of which 600,000 served from the cache: $1.00 at the input
    # price and $0.75 at the cached one, not $2.50.
    exporter.add(ns, "agent-0", "gpt-4o", input=400_000, cached_input=600_000, fmt=fmt)
    eventually(lambda: _window_cost(prometheus, preset, ns) - before == Decimal("1.75"), 30,
               what=f"{preset}: $1.75 more")
