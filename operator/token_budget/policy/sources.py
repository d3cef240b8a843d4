"""Spend-source presets: which counters and labels each real exporter uses.

A budget names a preset (and optional overrides); :func:`resolve` turns that
into a :class:`ResolvedSource`, a plain description of the series to read. Two
budgets whose sources resolve to the same thing share one query per window.

The presets (metric and label names as they appear in Prometheus):

============== ========================================== ============== ================ =====================
preset         token counters                             namespace      workload         model
============== ========================================== ============== ================ =====================
Counters       llm_tokens_total{token_type=input|output|  namespace      pod              model
               cached_input}
LiteLLM        litellm_input_tokens_metric_total,         team_alias     api_key_alias    model
               litellm_output_tokens_metric_total,
               cost: litellm_spend_metric_total
OpenTelemetry  gen_ai_client_token_usage_sum              k8s_namespace_ k8s_pod_name     gen_ai_request_model
               {gen_ai_token_type=input|output}           name
============== ========================================== ============== ================ =====================

An overridden metric name counts only its own kind (no token-type matcher).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from token_budget.api import v1alpha1 as api


class Kind(str, enum.Enum):
    """What a counter counts."""

    INPUT = "input"
    OUTPUT = "output"
    CACHED_INPUT = "cached_input"
    COST = "cost"


@dataclass(frozen=True, order=True)
class Selector:
    """One counter: a metric name with fixed equality matchers."""

    metric: str
    matchers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, order=True)
class ResolvedSource:
    """A spend source with every name filled in; hashable, so it keys queries."""

    preset: str
    namespace_label: str
    workload_label: str
    model_label: str
    counters: tuple[tuple[Kind, Selector], ...]
    # Whether each series comes from (or names) one agent pod, so that pods running
    # without any series is a sign that their scrape is missing (not so for a gateway,
    # whose series exist only for callers that called).
    per_pod: bool = False

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metric names the counters read."""
        return tuple(sorted({sel.metric for _, sel in self.counters}))

    @property
    def has_cost(self) -> bool:
        return any(kind is Kind.COST for kind, _ in self.counters)

    def __str__(self) -> str:
        return self.preset


def _typed(metric: str, label: str, value: str) -> Selector:
    return Selector(metric, ((label, value),))


_PRESETS: dict[api.Preset, ResolvedSource] = {
    api.Preset.COUNTERS: ResolvedSource(
        preset="Counters",
        namespace_label="namespace",
        workload_label="pod",
        model_label="model",
        counters=(
            (Kind.INPUT, _typed("llm_tokens_total", "token_type", "input")),
            (Kind.OUTPUT, _typed("llm_tokens_total", "token_type", "output")),
            (Kind.CACHED_INPUT, _typed("llm_tokens_total", "token_type", "cached_input")),
        ),
        per_pod=True,
    ),
    api.Preset.LITELLM: ResolvedSource(
        preset="LiteLLM",
        namespace_label="team_alias",
        workload_label="api_key_alias",
        model_label="model",
        counters=(
            (Kind.INPUT, Selector("litellm_input_tokens_metric_total")),
            (Kind.OUTPUT, Selector("litellm_output_tokens_metric_total")),
            (Kind.COST, Selector("litellm_spend_metric_total")),
        ),
    ),
    api.Preset.OPEN_TELEMETRY: ResolvedSource(
        preset="OpenTelemetry",
        namespace_label="k8s_namespace_name",
        workload_label="k8s_pod_name",
        model_label="gen_ai_request_model",
        counters=(
            (Kind.INPUT, _typed("gen_ai_client_token_usage_sum", "gen_ai_token_type", "input")),
            (Kind.OUTPUT, _typed("gen_ai_client_token_usage_sum", "gen_ai_token_type", "output")),
        ),
        per_pod=True,
    ),
}

_OVERRIDE_FIELDS = {
    Kind.INPUT: "input_tokens",
    Kind.OUTPUT: "output_tokens",
    Kind.CACHED_INPUT: "cached_input_tokens",
    Kind.COST: "cost",
}


def resolve(source: api.SpendSource) -> ResolvedSource:
    """The preset with the source's overrides applied."""
    base = _PRESETS[source.preset]
    counters = dict(base.counters)
    if source.metrics is not None:
        for kind, field in _OVERRIDE_FIELDS.items():
            name = getattr(source.metrics, field)
            if name:
                counters[kind] = Selector(name)
    labels = source.labels or api.SourceLabels()
    return ResolvedSource(
        preset=base.preset if source.metrics is None and source.labels is None
        else f"{base.preset}*",
        namespace_label=labels.namespace or base.namespace_label,
        workload_label=labels.workload or base.workload_label,
        model_label=labels.model or base.model_label,
        counters=tuple(sorted(counters.items(), key=lambda kv: list(Kind).index(kv[0]))),
        per_pod=base.per_pod,
    )
