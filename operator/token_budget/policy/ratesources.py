"""Rate-limit presets: which request counters, and which of their series are 429 answers.

The rate-limit trigger (``rateLimit`` on a budget or the catalog) judges a
model by the share of its requests answered with HTTP 429 over a short
window. :func:`resolve` turns a budget's spend source into a
:class:`RateSource`: the counter of every request and the selector of the
rate-limited ones, with the labels that carry the namespace and the model.
Both sums are read by one PromQL query per (source, window)
(:func:`token_budget.metrics.promql.rate_limits`).

The presets, as the exporters name things in Prometheus:

============== ============================================ ============================ ============== ====================
preset         requests                                     rate-limited (429)           namespace      model
============== ============================================ ============================ ============== ====================
Counters       llm_requests_total                           status="429"                 namespace      model
LiteLLM        litellm_deployment_total_requests_total      litellm_deployment_failure_  team_alias     requested_model
                                                            responses_total
                                                            {exception_status="429"}
OpenTelemetry  gen_ai_client_operation_duration_seconds_    error_type=~"429|.*RateLimit k8s_namespace_ gen_ai_request_model
               count                                        .*|.*rate_limit.*"           name
EnvoyAIGateway gen_ai_server_request_duration_seconds_count none: override needed        k8s_namespace_ gen_ai_request_model
                                                                                         name
============== ============================================ ============================ ============== ====================

LiteLLM (read in 1.108.0's ``litellm/types/integrations/prometheus.py``): both
deployment counters carry ``requested_model`` (the model group the caller
asked for), ``team_alias`` and ``api_key_alias``; every request, answered or
failed, counts in ``litellm_deployment_total_requests``, and a failure also
in ``litellm_deployment_failure_responses`` with the provider's status code
in ``exception_status``. The model label differs from the spend preset's
(``model``), so ``source.labels.model`` is not applied to this reading (it is for
the other presets, as ``source.labels.namespace`` is for every preset).

OpenTelemetry: ``gen_ai.client.operation.duration`` (unit ``s``: the Prometheus
exporter appends ``_seconds``) carries ``error.type`` on failed operations
only; the conventions let it be the status code (``429``) or the exception's
name (``RateLimitError`` in the OpenAI instrumentations), hence the regex.

Envoy AI Gateway (read in ``internal/metrics/metrics_impl.go``) records
``error.type="_OTHER"`` for every failed request: a 429 cannot be told from any
other failure, so this preset has no rate-limited selector and a budget with a
rate-limit trigger must name ``source.metrics.rateLimitedRequests``
(:mod:`token_budget.api.rules` says so).

An overridden counter (``source.metrics.requests`` or
``rateLimitedRequests``) counts every series of it, without matchers.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from token_budget.api import v1alpha1 as api
from token_budget.policy.sources import Selector

#: What a 429 is called in ``error.type`` by OpenTelemetry GenAI instrumentations.
OTEL_RATE_LIMITED = "429|.*RateLimit.*|.*rate_limit.*"


@dataclass(frozen=True, order=True)
class RateSource:
    """Where requests and their 429 answers are counted; hashable, so it keys queries."""

    preset: str
    namespace_label: str
    model_label: str
    requests: Selector
    limited: Selector
    # Regex matchers of the rate-limited selector (label, RE2), besides its equalities.
    limited_regex: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        return self.preset


@dataclass(frozen=True)
class RateSample:
    """Requests and 429 answers of one (namespace, model) over a rate-limit window."""

    namespace: str
    model: str
    requests: float
    limited: float


@dataclass(frozen=True)
class RateLimited:
    """A model a scope finds rate-limited, and where its traffic goes (None: nowhere)."""

    model: str
    share_percent: int
    requests: int
    fallback: str | None
    since: dt.datetime


_PRESETS: dict[api.Preset, RateSource | None] = {
    api.Preset.COUNTERS: RateSource(
        preset="Counters", namespace_label="namespace", model_label="model",
        requests=Selector("llm_requests_total"),
        limited=Selector("llm_requests_total", (("status", "429"),)),
    ),
    api.Preset.LITELLM: RateSource(
        preset="LiteLLM", namespace_label="team_alias", model_label="requested_model",
        requests=Selector("litellm_deployment_total_requests_total"),
        limited=Selector("litellm_deployment_failure_responses_total",
                         (("exception_status", "429"),)),
    ),
    api.Preset.OPEN_TELEMETRY: RateSource(
        preset="OpenTelemetry", namespace_label="k8s_namespace_name",
        model_label="gen_ai_request_model",
        requests=Selector("gen_ai_client_operation_duration_seconds_count"),
        limited=Selector("gen_ai_client_operation_duration_seconds_count"),
        limited_regex=(("error_type", OTEL_RATE_LIMITED),),
    ),
    api.Preset.ENVOY_AI_GATEWAY: None,
}

_ENVOY_REQUESTS = Selector("gen_ai_server_request_duration_seconds_count")


def resolve(source: api.SpendSource) -> RateSource | None:
    """The rate-limit counters of a spend source; None when 429s cannot be told apart."""
    metrics = source.metrics
    labels = source.labels or api.SourceLabels()
    base = _PRESETS[source.preset]
    requests = metrics.requests if metrics is not None else None
    limited = metrics.rate_limited_requests if metrics is not None else None
    if base is None:
        if not limited:
            return None
        base = RateSource(preset="EnvoyAIGateway", namespace_label="k8s_namespace_name",
                          model_label="gen_ai_request_model", requests=_ENVOY_REQUESTS,
                          limited=Selector(limited))
    overridden = bool(requests or limited or labels.namespace)
    return RateSource(
        preset=f"{base.preset}*" if overridden else base.preset,
        namespace_label=labels.namespace or base.namespace_label,
        model_label=base.model_label if source.preset is api.Preset.LITELLM
        else labels.model or base.model_label,
        requests=Selector(requests) if requests else base.requests,
        limited=Selector(limited) if limited else base.limited,
        limited_regex=() if limited else base.limited_regex,
    )
