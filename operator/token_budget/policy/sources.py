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
               litellm_input_cached_tokens_metric_total,
               cost: litellm_spend_metric_total
OpenTelemetry  gen_ai_client_token_usage_sum              k8s_namespace_ k8s_pod_name     gen_ai_request_model
               {gen_ai_token_type=input|output},          name
               gen_ai_client_inference_usage_cache_
               read_input_tokens_total
EnvoyAIGateway gen_ai_client_token_usage_sum              k8s_namespace_ k8s_pod_name     gen_ai_request_model
               {gen_ai_token_type=input|output|           name
               cached_input}
============== ========================================== ============== ================ =====================

An overridden metric name counts only its own kind (no token-type matcher).

LiteLLM's input counter is the provider's ``prompt_tokens``, which already holds
the cached reads (OpenAI) or the cache reads and writes (Anthropic, as LiteLLM
sums them); ``litellm_input_cached_tokens_metric`` (read in LiteLLM 1.110.2; it
has the input counter's labels and grows only on requests with cached tokens)
counts the reads, so the preset takes it out of input as for Envoy below. A
LiteLLM without that counter reads no cached tokens: all input at the input price.
The OpenTelemetry GenAI conventions give ``gen_ai.client.token.usage`` only the
token types ``input`` and ``output``: ``gen_ai.token.type`` never got a cache
value (the conventions moved to open-telemetry/semantic-conventions-genai with
it). That repository adds counters instead, among them
``gen_ai.client.inference.usage.cache_read.input_tokens`` (development
stability; "a subset of" the input tokens, which include the cached ones), so
the preset reads it as ``gen_ai_client_inference_usage_cache_read_input_tokens_total``
and takes it out of input as for Envoy below. An instrumentation without that
counter reads no cached tokens: every input token at the input price, never
less.

Envoy AI Gateway (v0.4 and later; verified on its source up to v1.1) records
``gen_ai.client.token.usage`` in the gateway with ``gen_ai.token.type`` ``input``,
``output``, ``cached_input`` (v0.4 on), ``cache_creation_input`` (v0.5 on) and
``reasoning`` (v0.6 on); v0.3 recorded ``total`` instead of ``cached_input``. Its
``input`` already includes the cached reads and the cache writes (OpenAI's
``prompt_tokens``; Anthropic's input + cache read + cache creation), and its
``output`` includes the reasoning tokens, so the preset reads input, output and
cached_input only and the adapter takes cached_input out of input
(:attr:`ResolvedSource.cached_in_input`): never ``total``, ``reasoning`` or
``cache_creation_input`` (cache writes stay priced as input). The gateway knows
no Kubernetes identity: its ``controller.metricsRequestHeaderAttributes`` maps
request headers to metric attributes, and the preset expects
``x-k8s-namespace:k8s.namespace.name,x-k8s-pod:k8s.pod.name`` (the Prometheus
exporter turns the dots into underscores), the callers sending their namespace
and pod name in those headers; ``source.labels`` names other labels.
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
    # Whether the input counter already counts the cached input tokens (LiteLLM and Envoy
    # AI Gateway, as the providers report it): the adapter reads input as input - cached.
    cached_in_input: bool = False

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


def _gen_ai(preset: str, kinds: tuple[Kind, ...], per_pod: bool = False,
            cached_in_input: bool = False) -> ResolvedSource:
    """``gen_ai.client.token.usage`` as Prometheus names it, one token type a kind."""
    return ResolvedSource(
        preset=preset,
        namespace_label="k8s_namespace_name",
        workload_label="k8s_pod_name",
        model_label="gen_ai_request_model",
        counters=tuple((kind, _typed("gen_ai_client_token_usage_sum", "gen_ai_token_type",
                                     kind.value)) for kind in kinds),
        per_pod=per_pod,
        cached_in_input=cached_in_input,
    )


#: The GenAI conventions' counter of input tokens served from a provider's cache (a part
#: of the input tokens), as Prometheus names it.
OTEL_CACHE_READ = "gen_ai_client_inference_usage_cache_read_input_tokens_total"


def _open_telemetry() -> ResolvedSource:
    """``gen_ai.client.token.usage`` by type, and the cache reads' own counter."""
    base = _gen_ai("OpenTelemetry", (Kind.INPUT, Kind.OUTPUT), per_pod=True)
    return ResolvedSource(
        preset=base.preset, namespace_label=base.namespace_label,
        workload_label=base.workload_label, model_label=base.model_label,
        counters=(*base.counters, (Kind.CACHED_INPUT, Selector(OTEL_CACHE_READ))),
        per_pod=True, cached_in_input=True)


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
            (Kind.CACHED_INPUT, Selector("litellm_input_cached_tokens_metric_total")),
            (Kind.COST, Selector("litellm_spend_metric_total")),
        ),
        cached_in_input=True,
    ),
    api.Preset.OPEN_TELEMETRY: _open_telemetry(),
    api.Preset.ENVOY_AI_GATEWAY: _gen_ai("EnvoyAIGateway",
                                         (Kind.INPUT, Kind.OUTPUT, Kind.CACHED_INPUT),
                                         cached_in_input=True),
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
        # Only the preset's own input and cached counters are known to nest.
        cached_in_input=base.cached_in_input and all(
            counters[k] == dict(base.counters)[k] for k in (Kind.INPUT, Kind.CACHED_INPUT)),
    )
