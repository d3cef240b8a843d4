"""The ``tokenbudget.io/v1alpha1`` API: ModelCatalog, TokenBudget, ClusterTokenBudget.

These pydantic models are the single source of truth for the API. The CRD YAML
in ``crds/`` and in the chart is generated from them (``tokenbudget crds``), and
field descriptions here become the CRD's descriptions, so ``kubectl explain``
shows the same text as this file.

Conventions (Kubernetes API conventions): camelCase fields, enums as CamelCase
strings, money as decimal strings, durations as integer ``...Seconds``, a
spec/status split, conditions with ``observedGeneration`` and no ``phase``.

Rules a schema can say live in the schema (patterns, minimums, enums, CEL);
rules across fields or objects (ascending thresholds, reroute targets present
in the catalog) live in :mod:`token_budget.api.rules`.
"""

from __future__ import annotations

import datetime as dt
import enum
import re
from decimal import Decimal
from typing import Annotated, Any, Final, Literal

import pydantic
from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
    model_validator,
)

from token_budget.api import cel
from token_budget.api.conditions import Condition
from token_budget.api.types import (
    WINDOW_PATTERN,
    LabelSelector,
    ModelPattern,
    Money,
    _Base,
)

GROUP = "tokenbudget.io"
VERSION = "v1alpha1"
API_VERSION: Final = "tokenbudget.io/v1alpha1"
PREFIX = "tokenbudget.io/"
DEFAULT_AGENT_LABEL = "tokenbudget.io/agent"
#: A namespace label only an admin can set (tenants cannot edit Namespaces): with the value
#: Mandatory, every workload of the namespace is governed, whatever its labels.
ENROLMENT_LABEL = "tokenbudget.io/enrolment"


# ---------------------------------------------------------------------------
# ModelCatalog
# ---------------------------------------------------------------------------


class Tier(str, enum.Enum):
    """How capable (and expensive) a model is; budgets can deny whole tiers."""

    FRONTIER = "Frontier"
    STANDARD = "Standard"
    ECONOMY = "Economy"


class Pricing(_Base):
    """List price per million tokens, in the catalog's currency."""

    input: Money = Field(description="Price per million input (prompt) tokens, e.g. \"2.50\".")
    output: Money = Field(description="Price per million output (completion) tokens.")
    cached_input: Money | None = Field(
        default=None,
        description="Price per million cached input tokens; when absent, cached tokens "
        "are charged at the input price.",
    )


class CatalogModel(_Base):
    name: str = Field(
        min_length=1,
        max_length=253,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/@-]*$",
        description="Canonical model name, used by budgets, directives and reports.",
    )
    provider: str = Field(
        default="", max_length=63, description="Who serves the model (openai, anthropic, ...)."
    )
    tier: Tier = Field(description="Frontier, Standard or Economy.")
    aliases: tuple[ModelPattern, ...] = Field(
        default=(),
        max_length=64,
        description="Other names and shell-style patterns under which exporters report this "
        "model (openai/gpt-4o-2024-08-06, gpt-4o-*). The canonical name always matches.",
    )
    pricing: Pricing = Field(description="Prices per million tokens.")
    equivalents: tuple[str, ...] = Field(
        default=(),
        max_length=16,
        description="Cheaper models (catalog names) a request may be rerouted to, "
        "in order of preference.",
    )
    rate_limit_fallbacks: tuple[str, ...] = Field(
        default=(),
        max_length=16,
        description="Where to send this model's traffic while its provider rate-limits it "
        "(catalog names, in order: another region or provider of an equivalent model). "
        "Used when a budget's rateLimit trigger (or the catalog's) finds the share of 429 "
        "answers for this model at or over its threshold: the first fallback the budget "
        "allows and that is not itself rate-limited is used.",
    )


class RateLimitTrigger(_Base):
    """When the share of rate-limited (HTTP 429) answers for a model reroutes its traffic."""

    threshold_percent: int = Field(
        ge=1,
        le=100,
        description="Reroute a model once this percentage of its requests in the window "
        "were answered with 429 (rate limited).",
    )
    window_seconds: int = Field(
        default=300,
        ge=60,
        le=3600,
        description="How far back requests and 429 answers are counted (a short window: "
        "rate limits come and go within minutes).",
    )
    min_requests: int = Field(
        default=20,
        ge=1,
        le=1_000_000,
        description="A model with fewer requests than this in the window is not judged "
        "(no reroute starts, and one in place is lifted: its traffic has gone elsewhere).",
    )
    hysteresis_percent: int = Field(
        default=5,
        ge=0,
        le=50,
        description="A reroute is lifted only once the 429 share falls this many points "
        "below thresholdPercent, so a model near the threshold does not flap.",
    )


class ModelCatalogSpec(_Base):
    currency: str = Field(
        default="USD", pattern=r"^[A-Z]{3}$", description="ISO 4217 currency of every price."
    )
    models: tuple[CatalogModel, ...] = Field(
        min_length=1,
        max_length=1000,
        description="The models, their prices and their cheaper equivalents.",
    )
    rate_limit: RateLimitTrigger | None = Field(
        default=None,
        description="The rate-limit trigger of every budget that sets none itself: reroute "
        "a model to its rateLimitFallbacks while its provider rate-limits it. Off when unset.",
    )
    cost_sources: tuple[CostSource, ...] = Field(
        default=(), max_length=16,
        description="Spend besides tokens applied to every budget (a budget's cost source of "
        "the same name replaces it).",
    )


class ModelCatalogStatus(_Base):
    model_config = ConfigDict(extra="ignore", frozen=True)

    observed_generation: int | None = Field(default=None, description="The generation last read.")
    models: int | None = Field(default=None, description="How many models the catalog holds.")
    conditions: tuple[Condition, ...] = Field(
        default=(),
        description="Ready tells whether the catalog is valid and in use.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    )


# ---------------------------------------------------------------------------
# Budgets
# ---------------------------------------------------------------------------


class Preset(str, enum.Enum):
    """The exporters whose metrics a budget can read out of the box."""

    COUNTERS = "Counters"
    LITELLM = "LiteLLM"
    OPEN_TELEMETRY = "OpenTelemetry"
    ENVOY_AI_GATEWAY = "EnvoyAIGateway"


class SourceMetrics(_Base):
    """Override the preset's metric names (they drift between exporter versions)."""

    input_tokens: str | None = Field(
        default=None, pattern=r"^[a-zA-Z_:][a-zA-Z0-9_:]*$", description="Input-token counter."
    )
    output_tokens: str | None = Field(
        default=None, pattern=r"^[a-zA-Z_:][a-zA-Z0-9_:]*$", description="Output-token counter."
    )
    cached_input_tokens: str | None = Field(
        default=None,
        pattern=r"^[a-zA-Z_:][a-zA-Z0-9_:]*$",
        description="Cached-input-token counter.",
    )
    cost: str | None = Field(
        default=None,
        pattern=r"^[a-zA-Z_:][a-zA-Z0-9_:]*$",
        description="Cost counter in the catalog's currency; when absent, cost is computed "
        "from tokens and catalog prices.",
    )
    requests: str | None = Field(
        default=None,
        pattern=r"^[a-zA-Z_:][a-zA-Z0-9_:]*$",
        description="Counter of every request (answered or not), for the rate-limit trigger; "
        "the preset's otherwise.",
    )
    rate_limited_requests: str | None = Field(
        default=None,
        pattern=r"^[a-zA-Z_:][a-zA-Z0-9_:]*$",
        description="Counter of the requests answered with 429 (rate limited), for the "
        "rate-limit trigger; every series of it counts. The preset's otherwise.",
    )


class SourceLabels(_Base):
    """Override which Prometheus labels carry the namespace, the workload and the model."""

    namespace: str | None = Field(default=None, pattern=r"^[a-zA-Z_][a-zA-Z0-9_]*$")
    workload: str | None = Field(default=None, pattern=r"^[a-zA-Z_][a-zA-Z0-9_]*$")
    model: str | None = Field(default=None, pattern=r"^[a-zA-Z_][a-zA-Z0-9_]*$")


class SpendSource(_Base):
    """Where spend is read: a preset for a known exporter, optionally adjusted."""

    preset: Preset = Field(
        default=Preset.COUNTERS,
        description="Counters (llm_tokens_total scraped from agent pods), LiteLLM (the "
        "LiteLLM proxy's metrics), OpenTelemetry (gen_ai.client.token.usage) or "
        "EnvoyAIGateway (the gateway's gen_ai.client.token.usage; the caller's namespace "
        "and pod come from request headers the gateway maps to metric labels).",
    )
    metrics: SourceMetrics | None = Field(default=None, description="Metric-name overrides.")
    labels: SourceLabels | None = Field(default=None, description="Label-name overrides.")


class MatchOperator(str, enum.Enum):
    EQUAL = "Equal"
    NOT_EQUAL = "NotEqual"
    REGEX = "Regex"
    NOT_REGEX = "NotRegex"


class SpendMatcher(_Base):
    """A Prometheus label matcher that narrows which spend counts (team="search")."""

    label: str = Field(pattern=r"^[a-zA-Z_][a-zA-Z0-9_]*$", description="The label name.")
    operator: MatchOperator = Field(
        default=MatchOperator.EQUAL, description="Equal, NotEqual, Regex or NotRegex."
    )
    value: str = Field(max_length=1024, description="The value or the (RE2) regular expression.")


class Limit(_Base):
    """A cap on spend over one window, in tokens and/or money."""

    model_config = ConfigDict(
        json_schema_extra=cel.validations(cel.LIMIT_TOKENS_OR_COST, cel.LIMIT_COST_POSITIVE)
    )

    window: str = Field(
        pattern=WINDOW_PATTERN,
        description="Rolling (30m, 1h, 24h, 7d, 30d) or calendar (Day, Week, Month) window.",
    )
    time_zone: str = Field(
        default="UTC",
        max_length=64,
        description="IANA time zone in which calendar windows start (Europe/Berlin).",
    )
    tokens: int | None = Field(
        default=None, ge=1, description="Most tokens (input + output + cached) in the window."
    )
    cost: Money | None = Field(
        default=None,
        description="Most money in the window, in the catalog's currency. Must be greater "
        "than zero: \"0.00\" is refused rather than read as either \"no cap\" or \"block "
        "everything\"; leave cost unset for no money cap, and use a Block action to block.",
        # The longest money the pattern allows (12 digits, a point, 9 decimals). Without
        # it the API server estimates the CEL rule's cost on an unbounded string, and
        # refuses the CRD (over budget by a factor of 1.007, with 16 limits).
        json_schema_extra={"maxLength": 22},
    )
    model: ModelPattern | None = Field(
        default=None,
        description="Count only spend on models matching this name or pattern.",
    )

    @model_validator(mode="after")
    def _tokens_or_cost(self) -> Limit:
        # The CEL rules' twins for objects read back from the API (written before the rule).
        if self.tokens is None and self.cost is None:
            raise ValueError(cel.LIMIT_TOKENS_OR_COST.message)
        if self.cost is not None and self.cost <= 0:
            raise ValueError(cel.LIMIT_COST_POSITIVE.message)
        return self


class ActionType(str, enum.Enum):
    """The ladder, from least to most restrictive."""

    WARN = "Warn"
    REROUTE = "Reroute"
    THROTTLE = "Throttle"
    BLOCK = "Block"


class Action(_Base):
    """One rung of the ladder: what happens from a percentage of a limit on."""

    model_config = ConfigDict(
        json_schema_extra=cel.validations(cel.ACTION_MODEL_ON_REROUTE,
                                          cel.ACTION_RATE_ON_THROTTLE)
    )

    type: ActionType = Field(description="Warn, Reroute, Throttle or Block.")
    at_percent: int = Field(
        ge=1,
        le=1000,
        description="Take this action when spend reaches this percentage of any limit.",
    )
    model: str | None = Field(
        default=None,
        max_length=253,
        description="Reroute: the catalog model to use instead. When absent, the cheapest "
        "allowed equivalent of each model in use.",
    )
    tokens_per_minute: int | None = Field(
        default=None,
        ge=1,
        description="Throttle: tokens per minute per workload. When absent, the remainder of "
        "the budget is paced evenly over the rest of the window.",
    )

    @model_validator(mode="after")
    def _fields_fit_type(self) -> Action:
        if self.model is not None and self.type is not ActionType.REROUTE:
            raise ValueError(cel.ACTION_MODEL_ON_REROUTE.message)
        if self.tokens_per_minute is not None and self.type is not ActionType.THROTTLE:
            raise ValueError(cel.ACTION_RATE_ON_THROTTLE.message)
        return self


class MissingDataPolicy(str, enum.Enum):
    HOLD = "Hold"
    FAIL_OPEN = "FailOpen"
    FAIL_CLOSED = "FailClosed"


class WhenSpendUnknown(_Base):
    """What to do when spend cannot be read (Prometheus down, query failing)."""

    policy: MissingDataPolicy = Field(
        default=MissingDataPolicy.HOLD,
        description="Hold keeps the last decision; FailOpen lifts every action; FailClosed "
        "blocks.",
    )
    stale_after_seconds: int = Field(
        default=900,
        ge=30,
        le=7 * 86400,
        description="How long Hold may keep a decision; after that FailOpen applies.",
    )


class BudgetException(_Base):
    """A time-limited exception: caps the ladder until a time, then expires by itself."""

    until: pydantic.AwareDatetime = Field(
        description="When the exception ends: an RFC 3339 time with a time-zone offset "
        "(2025-07-01T00:00:00Z, 2025-07-01T09:00:00+02:00).",
    )
    reason: str = Field(min_length=1, max_length=1024, description="Why; shown in status.")
    max_action: ActionType = Field(
        default=ActionType.WARN,
        description="The most restrictive action allowed while the exception holds.",
    )


class Outcome(_Base):
    """Units of value (tasks done, pull requests merged) to compute cost per outcome."""

    metric: str = Field(
        pattern=r"^[a-zA-Z_:][a-zA-Z0-9_:]*$",
        description="A counter of outcomes, labelled by namespace (agent_outcomes_total).",
    )
    matchers: tuple[SpendMatcher, ...] = Field(
        default=(), max_length=16, description="Narrow the counter (outcome=\"success\")."
    )
    namespace_label: str = Field(
        default="namespace", pattern=r"^[a-zA-Z_][a-zA-Z0-9_]*$",
        description="The label that carries the namespace.",
    )
    window: str = Field(
        default="24h", pattern=WINDOW_PATTERN, description="Window of spend and outcomes."
    )
    max_cost_per_outcome: Money | None = Field(
        default=None,
        description="When cost per outcome exceeds this, take onExceeded.",
    )
    on_exceeded: ActionType = Field(
        default=ActionType.WARN, description="The action taken when cost per outcome is too high."
    )


class CostKind(str, enum.Enum):
    """What a cost source pays for; the report groups money by it."""

    COMPUTE = "Compute"
    MEMORY = "Memory"
    SANDBOX = "Sandbox"
    RETRIEVAL = "Retrieval"
    TOOL_CALL = "ToolCall"
    OTHER = "Other"


class CostMetricType(str, enum.Enum):
    """How a cost source's metric is read."""

    COUNTER = "Counter"
    GAUGE = "Gauge"


UNITS_PATTERN = r"^[0-9]{1,18}(\.[0-9]{1,9})?$"
_UNITS_RE = re.compile(UNITS_PATTERN)


def _parse_units(value: Any) -> Decimal:
    # A string, as money is: the CRD types it so, and the API server refuses a number.
    if isinstance(value, Decimal):
        return value
    if not isinstance(value, str) or not _UNITS_RE.match(value):
        raise ValueError(f"must be a decimal string such as \"3600\", got {value!r}")
    return Decimal(value)


Units = Annotated[
    Decimal,
    BeforeValidator(_parse_units),
    PlainSerializer(lambda v: format(v, "f"), return_type=str),
    WithJsonSchema({"type": "string", "pattern": UNITS_PATTERN}),
]
"""A non-negative count of a metric's units, written as a string ("3600")."""


class CostLabels(_Base):
    """Which labels of a cost metric carry the namespace and the workload."""

    namespace: str = Field(
        default="namespace", pattern=r"^[a-zA-Z_][a-zA-Z0-9_]*$",
        description="The label that carries the namespace (cAdvisor: namespace).",
    )
    workload: str = Field(
        default="pod", pattern=r"^[a-zA-Z_][a-zA-Z0-9_]*$",
        description="The label that carries the workload (cAdvisor: pod).",
    )


class CostSource(_Base):
    """Spend that is not tokens: a Prometheus metric with a price per unit.

    CPU-seconds of the governed pods (cAdvisor's container_cpu_usage_seconds_total),
    GiB-hours of memory, vector-database queries, tool calls priced per call. Its
    cost counts toward money limits without a model, cost per outcome and the
    report; never toward token limits.
    """

    name: str = Field(
        min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="A name for status and reports (cpu, memory, vector-search); a budget's "
        "cost source replaces the catalog's of the same name.",
    )
    kind: CostKind = Field(
        description="Compute, Memory, Sandbox, Retrieval, ToolCall or Other: how the report "
        "groups this money.",
    )
    metric: str = Field(
        pattern=r"^[a-zA-Z_:][a-zA-Z0-9_:]*$",
        description="The metric (container_cpu_usage_seconds_total).",
    )
    type: CostMetricType = Field(
        default=CostMetricType.COUNTER,
        description="Counter: its exact increase over the window (resets, new and deleted "
        "pods read as token counters are). Gauge (memory bytes): integrated per series over "
        "its own observed span, each sample standing for one scrape interval "
        "(--prometheus-scrape-interval-seconds), never more than the whole window: a pod "
        "present for part of the window is charged for that part only.",
    )
    matchers: tuple[SpendMatcher, ...] = Field(
        default=(), max_length=16,
        description="Narrow the metric (container!=\"\" to skip cAdvisor's pod-level sums).",
    )
    labels: CostLabels = Field(
        default_factory=CostLabels,
        description="The namespace and workload labels; default namespace and pod, as cAdvisor.",
    )
    price_per_unit: Money = Field(
        description="Price of unitsPerPrice units, in the catalog's currency (\"0.04\").",
    )
    units_per_price: Units = Field(
        default=Decimal(1),
        description="How many units of the metric pricePerUnit buys: 3600 prices CPU-seconds "
        "per core-hour; 3865470566400 (GiB x 3600) prices byte-seconds per GiB-hour. "
        "Default 1.",
    )


class Mode(str, enum.Enum):
    ENFORCE = "Enforce"
    DRY_RUN = "DryRun"


#: The value of the partition of series without the partition label (or with it empty).
UNPARTITIONED = ""


class Partition(_Base):
    """Apply the limits to each value of a Prometheus label separately (per person, per key)."""

    label: str = Field(
        pattern=r"^[a-zA-Z_][a-zA-Z0-9_]*$",
        description="The Prometheus label whose values partition the spend (user, end_user, "
        "api_key_alias, team). Each value gets the full limits and its own ladder. Series "
        "without the label (or with it empty) form one unpartitioned partition, which the "
        "limits apply to as well.",
    )
    pod_label: str = Field(
        pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
        r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$",
        max_length=316,
        description="The pod label that names a workload's partition (tokenbudget.io/owner): "
        "the ladder of partition V acts only on governed workloads whose pods carry this "
        "label with the value V; governed workloads without it belong to the unpartitioned "
        "partition. Admission refuses a new governed pod without it, and one whose "
        "partition is Blocked.",
    )
    status_top: int = Field(
        default=10, ge=0, le=50,
        description="How many partitions, most used first, status.partitions.top lists.",
    )
    report_at_percent: int = Field(
        default=80, ge=1, le=1000,
        description="status.partitions.over lists every partition at or above this "
        "percentage of a limit, or not Ok (Blocked first; at most 1,000 entries).",
    )


def _default_selector() -> LabelSelector:
    return LabelSelector(match_labels={DEFAULT_AGENT_LABEL: "true"})


class TokenBudgetSpec(_Base):
    """What a namespace may spend on LLM tokens, and what happens past it."""

    model_config = ConfigDict(json_schema_extra=cel.validations(cel.SPEC_DISTINCT_THRESHOLDS))

    mode: Mode = Field(
        default=Mode.ENFORCE,
        description="Enforce acts on workloads; DryRun decides and reports only.",
    )
    selector: LabelSelector = Field(
        default_factory=_default_selector,
        description="Which pods (and their Deployments, StatefulSets, Jobs, CronJobs) the budget "
        "governs. Default: pods labelled tokenbudget.io/agent=true.",
    )
    source: SpendSource = Field(
        default_factory=SpendSource, description="Where spend is read."
    )
    spend_matchers: tuple[SpendMatcher, ...] = Field(
        default=(),
        max_length=16,
        description="Narrow the namespace's spend by Prometheus labels (team=search).",
    )
    limits: tuple[Limit, ...] = Field(
        min_length=1, max_length=16, description="Caps over one or more windows at once."
    )
    allowed_models: tuple[ModelPattern, ...] = Field(
        default=(),
        max_length=64,
        description="When set, only models matching one of these may be used.",
    )
    denied_models: tuple[ModelPattern, ...] = Field(
        default=(), max_length=64, description="Models that must not be used."
    )
    denied_tiers: tuple[Tier, ...] = Field(
        default=(), description="Catalog tiers that must not be used (Frontier)."
    )
    actions: tuple[Action, ...] = Field(
        default=(
            Action(type=ActionType.WARN, at_percent=80),
            Action(type=ActionType.BLOCK, at_percent=100),
        ),
        max_length=8,
        description="The ladder, ascending by atPercent. Default: Warn at 80, Block at 100.",
    )
    hysteresis_percent: int = Field(
        default=5,
        ge=0,
        le=50,
        description="An action is lifted only once spend falls this many points below its "
        "threshold, so workloads near a threshold do not flap.",
    )
    when_spend_unknown: WhenSpendUnknown = Field(
        default_factory=WhenSpendUnknown, description="Behaviour when spend cannot be read."
    )
    exceptions: tuple[BudgetException, ...] = Field(
        default=(), max_length=16, description="Time-limited exceptions that expire by themselves."
    )
    outcome: Outcome | None = Field(
        default=None, description="Units of value, for cost per outcome."
    )
    rate_limit: RateLimitTrigger | None = Field(
        default=None,
        description="Reroute a model to the catalog's rateLimitFallbacks while its provider "
        "rate-limits it (429 answers over a short window). When unset, the ModelCatalog's "
        "rateLimit applies; off when neither is set.",
    )
    partition: Partition | None = Field(
        default=None,
        description="Apply the limits to each value of a Prometheus label separately (a "
        "monthly allowance per person). In a PerNamespace ClusterTokenBudget each namespace "
        "x value is a partition; in a Shared one each value across the namespaces.",
    )
    cost_sources: tuple[CostSource, ...] = Field(
        default=(), max_length=16,
        description="Spend besides tokens (compute, memory, retrieval, tool calls), added to "
        "money limits without a model and to cost per outcome; merged with the catalog's by "
        "name, the budget's winning.",
    )

    @model_validator(mode="after")
    def _distinct_thresholds(self) -> TokenBudgetSpec:
        seen = [a.at_percent for a in self.actions]
        if len(seen) != len(set(seen)):
            raise ValueError(cel.SPEC_DISTINCT_THRESHOLDS.message)
        return self


class LimitScope(str, enum.Enum):
    PER_NAMESPACE = "PerNamespace"
    SHARED = "Shared"


class Enrolment(str, enum.Enum):
    """Whether a workload may leave a budget by dropping a label."""

    SELECTED = "Selected"
    MANDATORY = "Mandatory"


class ClusterTokenBudgetSpec(TokenBudgetSpec):
    """A budget for every namespace a label selector picks (an environment)."""

    namespace_selector: LabelSelector = Field(
        description="The namespaces the budget applies to (environment=qa)."
    )
    limit_scope: LimitScope = Field(
        default=LimitScope.PER_NAMESPACE,
        description="PerNamespace: each namespace gets the full limits. Shared: one pool for "
        "all matching namespaces together.",
    )
    enrolment: Enrolment = Field(
        default=Enrolment.SELECTED,
        description="Selected: the selector picks the governed workloads. Mandatory: every "
        "Deployment, StatefulSet, Job and CronJob of the matching namespaces is governed by "
        "this budget whatever its labels, counts as carrying the agent label for the other "
        "budgets there, and the agent label cannot be removed.",
    )


class State(str, enum.Enum):
    """A budget's (or a workload's) state, least to most restrictive."""

    OK = "Ok"
    WARNING = "Warning"
    REROUTED = "Rerouted"
    THROTTLED = "Throttled"
    BLOCKED = "Blocked"


class KindCost(_Base):
    model_config = ConfigDict(extra="ignore", frozen=True)

    kind: str = Field(description="Tokens, or the cost source's kind.")
    name: str = Field(description="tokens, or the cost source's name.")
    cost: Money = Field(description="Money spent in the window.")


class WindowStatus(_Base):
    model_config = ConfigDict(extra="ignore", frozen=True)

    window: str = Field(description="The window, as in spec.")
    time_zone: str | None = Field(default=None, description="Calendar windows: the time zone.")
    model: str | None = Field(default=None, description="The model filter, as in spec.")
    start_time: dt.datetime | None = Field(default=None, description="When the window began.")
    reset_time: dt.datetime | None = Field(
        default=None, description="Calendar windows: when spend starts again from zero."
    )
    tokens: int = Field(default=0, description="Tokens spent in the window.")
    cost: Money | None = Field(default=None, description="Money spent in the window.")
    limit_tokens: int | None = Field(default=None, description="The token limit.")
    limit_cost: Money | None = Field(default=None, description="The money limit.")
    used_percent: int = Field(default=0, description="Spend as a percentage of the limit.")
    covered_percent: int | None = Field(
        default=None,
        description="When Prometheus's retention is shorter than the window: the share it "
        "still holds; spend is then estimated from that part's rate.",
    )
    cost_by_kind: tuple[KindCost, ...] = Field(
        default=(), max_length=17,
        description="With cost sources: the window's money by kind (Tokens, then each cost "
        "source).",
    )


class NamespaceStatus(_Base):
    model_config = ConfigDict(extra="ignore", frozen=True)

    namespace: str
    state: State
    used_percent: int = 0


class RateLimitedModel(_Base):
    model_config = ConfigDict(extra="ignore", frozen=True)

    model: str = Field(description="The catalog model being rate-limited.")
    namespace: str | None = Field(
        default=None, description="PerNamespace ClusterTokenBudget: the namespace concerned."
    )
    share_percent: int = Field(
        default=0, description="Share of its requests answered with 429 in the window."
    )
    fallback: str | None = Field(
        default=None,
        description="Where its traffic goes; absent when no fallback is allowed and free.",
    )
    since: dt.datetime | None = Field(default=None, description="When it became rate-limited.")


class PartitionEntry(_Base):
    model_config = ConfigDict(extra="ignore", frozen=True)

    value: str = Field(description="The label value (\"\" for the unpartitioned partition).")
    namespace: str | None = Field(
        default=None, description="PerNamespace ClusterTokenBudget: the namespace."
    )
    state: State = Field(description="The partition's state.")
    used_percent: int = Field(default=0, description="Its most used window's percentage.")


#: Most entries ``status.partitions.over`` lists.
PARTITIONS_OVER_SHOWN = 1000


class PartitionsStatus(_Base):
    model_config = ConfigDict(extra="ignore", frozen=True)

    label: str = Field(description="The Prometheus label the spend is partitioned by.")
    count: int = Field(default=0, description="How many partitions were evaluated.")
    blocked: int = Field(default=0, description="How many partitions are Blocked.")
    restricted: int = Field(
        default=0, description="How many partitions are not Ok (Blocked included)."
    )
    top: tuple[PartitionEntry, ...] = Field(
        default=(), max_length=50, description="The most used partitions (spec statusTop)."
    )
    over: tuple[PartitionEntry, ...] = Field(
        default=(),
        max_length=PARTITIONS_OVER_SHOWN,
        description="Partitions at or above reportAtPercent or not Ok, Blocked first, then "
        "most used first (at most 1,000; overCount says how many there are).",
    )
    over_count: int = Field(default=0, description="How many partitions qualify for over.")


class BudgetStatus(_Base):
    """Observed state; written by the operator only."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    observed_generation: int | None = Field(
        default=None, description="The generation last acted on."
    )
    state: State | None = Field(
        default=None, description="Ok, Warning, Rerouted, Throttled or Blocked."
    )
    reason: str | None = Field(default=None, description="Why the budget is in this state.")
    message: str | None = Field(default=None, description="The decision, in words.")
    spend: str | None = Field(default=None, description="Spend in the most used window.")
    limit: str | None = Field(default=None, description="The limit of the most used window.")
    used_percent: int | None = Field(default=None, description="The most used window's percentage.")
    windows: tuple[WindowStatus, ...] = Field(default=(), description="Spend per window.")
    namespaces: tuple[NamespaceStatus, ...] = Field(
        default=(), description="ClusterTokenBudget: state per matching namespace."
    )
    projected_run_out_time: dt.datetime | None = Field(
        default=None, description="When the budget runs out at the current burn rate."
    )
    cost_per_outcome: str | None = Field(default=None, description="Cost per outcome, if set.")
    enforced_workloads: int | None = Field(
        default=None, description="How many workloads carry this budget's directive."
    )
    ungoverned_workloads: tuple[str, ...] = Field(
        default=(),
        max_length=20,
        description="Workload labels of spend series counted by this budget that belong to no "
        "workload it governs (namespace/label, at most 20): spend it cannot stop.",
    )
    last_evaluation_time: dt.datetime | None = Field(default=None)
    last_spend_time: dt.datetime | None = Field(
        default=None, description="When spend was last read successfully."
    )
    conditions: tuple[Condition, ...] = Field(
        default=(),
        description="Ready, MetricsAvailable, Enforcing, DataIncomplete and, with a rateLimit "
        "trigger, RateLimited.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    )
    rate_limited: tuple[RateLimitedModel, ...] = Field(
        default=(),
        max_length=20,
        description="Models the rate-limit trigger finds rate-limited (at most 20), and where "
        "their traffic goes.",
    )
    partitions: PartitionsStatus | None = Field(
        default=None,
        description="spec.partition: a bounded summary of the partitions; the budget's own "
        "state is that of the unpartitioned partition.",
    )


class ObjectMeta(_Base):
    """The parts of metadata the operator reads."""

    model_config = ConfigDict(extra="ignore", frozen=True, alias_generator=None)

    name: str = ""
    namespace: str | None = None
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    uid: str | None = None


class _Object(_Base):
    model_config = ConfigDict(extra="ignore", frozen=True)

    api_version: Literal["tokenbudget.io/v1alpha1"] = API_VERSION
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)


class ModelCatalog(_Object):
    kind: Literal["ModelCatalog"] = "ModelCatalog"
    spec: ModelCatalogSpec
    status: ModelCatalogStatus | None = None


class TokenBudget(_Object):
    kind: Literal["TokenBudget"] = "TokenBudget"
    spec: TokenBudgetSpec
    status: BudgetStatus | None = None


class ClusterTokenBudget(_Object):
    kind: Literal["ClusterTokenBudget"] = "ClusterTokenBudget"
    spec: ClusterTokenBudgetSpec
    status: BudgetStatus | None = None


Budget = TokenBudget | ClusterTokenBudget
KINDS: dict[str, type[_Object]] = {
    "ModelCatalog": ModelCatalog,
    "TokenBudget": TokenBudget,
    "ClusterTokenBudget": ClusterTokenBudget,
}


def parse(body: dict[str, Any]) -> ModelCatalog | TokenBudget | ClusterTokenBudget:
    """Parse a manifest of one of the three kinds.

    Raises:
        ValueError: the kind is not one of ours.
        pydantic.ValidationError: the manifest breaks the schema.
    """
    kind = body.get("kind")
    if kind not in KINDS or body.get("apiVersion") != API_VERSION:
        raise ValueError(f"not a {API_VERSION} object: "
                         f"apiVersion={body.get('apiVersion')!r} kind={kind!r}")
    model = KINDS[kind]
    return model.model_validate(body)  # type: ignore[return-value]
