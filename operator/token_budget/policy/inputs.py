"""What the engine decides from: spend series, a snapshot of them, workloads, memory.

Frozen value objects, built by the gatherers at the edges (the Prometheus
source, the Kubernetes watchers) or by tests and ``tokenbudget simulate``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TypeVar

from token_budget.api import v1alpha1 as api
from token_budget.policy.ratesources import RateSample, RateSource
from token_budget.policy.sources import ResolvedSource
from token_budget.policy.windows import WindowKey

_T = TypeVar("_T")


def quick_init(cls: type[_T]) -> type[_T]:
    """Give a frozen dataclass an ``__init__`` that sets every field in one step.

    A frozen dataclass's own ``__init__`` calls ``object.__setattr__`` once per
    field, which costs more than everything else an evaluation does with the
    value types it builds tens of thousands of times (a WindowUsage per limit,
    a Decision per scope, a Directive per workload). This one takes the same
    arguments with the same defaults and stores the same attributes; equality,
    hashing, ``repr`` and immutability stay the dataclass's.
    """
    namespace: dict[str, object] = {"_set": object.__setattr__, "_MISSING": dataclasses.MISSING}
    params = []
    values = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        value = f.name
        if f.default is not dataclasses.MISSING:
            namespace[f"_default_{f.name}"] = f.default
            params.append(f"{f.name}=_default_{f.name}")
        elif f.default_factory is not dataclasses.MISSING:
            namespace[f"_factory_{f.name}"] = f.default_factory
            params.append(f"{f.name}=_MISSING")
            value = f"_factory_{f.name}() if {f.name} is _MISSING else {f.name}"
        else:
            params.append(f.name)
        values.append(f"{f.name!r}: {value}")
    source = (f"def __init__(self, {', '.join(params)}):\n"
              f"    _set(self, '__dict__', {{{', '.join(values)}}})\n")
    exec(source, namespace)  # as dataclasses itself builds __init__
    init = namespace["__init__"]
    assert isinstance(init, types.FunctionType)
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    setattr(cls, "__init__", init)  # noqa: B010 - mypy refuses assigning to a method
    return cls


@dataclass(frozen=True)
class SpendSeries:
    """Spend of one (namespace, workload, model) over one window, as a source reports it.

    ``labels`` holds the extra Prometheus labels that budgets' spend matchers
    need (``team``); ``cost`` is set only when the source reports money itself.
    """

    namespace: str
    workload: str
    model: str
    input_tokens: float = 0.0
    output_tokens: float = 0.0
    cached_input_tokens: float = 0.0
    cost: Decimal | None = None
    labels: tuple[tuple[str, str], ...] = ()

    @property
    def tokens(self) -> float:
        return self.input_tokens + self.output_tokens + self.cached_input_tokens

    def label(self, name: str) -> str:
        for k, v in self.labels:
            if k == name:
                return v
        return ""


@dataclass(frozen=True)
class Gap:
    """Series of a namespace whose value at a window's start a scrape gap hid.

    ``bridged``: the start value was older than Prometheus's lookback and taken from
    within the horizon (the gap's spend counts in full); ``unknown``: there was none
    within the horizon, so only the growth seen inside the window counts.
    """

    bridged: int = 0
    unknown: int = 0

    def __add__(self, other: Gap) -> Gap:
        return Gap(self.bridged + other.bridged, self.unknown + other.unknown)


@dataclass(frozen=True)
class SpendSnapshot:
    """Everything read from the spend sources for one evaluation.

    ``windows`` maps (source, window) to the series over that window;
    ``recent`` maps a source to the series over the last ``recent_seconds``
    (the burn rate, for forecasts); ``errors`` maps a source that could not be
    read to a message a person can act on; ``outcomes`` maps an outcome
    query's key to outcomes per (namespace, extra labels).
    """

    taken_at: dt.datetime
    windows: Mapping[tuple[ResolvedSource, WindowKey], tuple[SpendSeries, ...]] = field(
        default_factory=dict
    )
    recent: Mapping[ResolvedSource, tuple[SpendSeries, ...]] = field(default_factory=dict)
    recent_seconds: int = 600
    errors: Mapping[ResolvedSource, str] = field(default_factory=dict)
    # What each source returned, whatever the scopes: says why a scope matched nothing.
    returned: Mapping[ResolvedSource, SourceSample] = field(default_factory=dict)
    outcomes: Mapping[str, tuple[tuple[str, tuple[tuple[str, str], ...], float], ...]] = field(
        default_factory=dict
    )
    outcome_errors: Mapping[str, str] = field(default_factory=dict)
    # Why a (source, window) was not read although its source answered (too many samples).
    window_errors: Mapping[tuple[ResolvedSource, WindowKey], str] = field(default_factory=dict)
    # How far back Prometheus keeps data (None: unknown): longer windows are incomplete.
    retention_seconds: int | None = None
    # Per source, namespaces whose series came (within the last hour) from a scrape
    # target that is down now (up == 0), with the targets named: an outage.
    down: Mapping[ResolvedSource, Mapping[str, str]] = field(default_factory=dict)
    # Per (source, window), namespaces with series whose start a scrape gap hid.
    gaps: Mapping[tuple[ResolvedSource, WindowKey], Mapping[str, Gap]] = field(
        default_factory=dict
    )
    # Rate-limit trigger: requests and 429 answers per (rate source, window seconds), and
    # why a (rate source, window) could not be read (then no rate-limit reroute holds).
    rate_limits: Mapping[tuple[RateSource, int], tuple[RateSample, ...]] = field(
        default_factory=dict
    )
    rate_limit_errors: Mapping[tuple[RateSource, int], str] = field(default_factory=dict)
    # Cost sources (:mod:`token_budget.policy.costs`): units per (query, window), and why
    # a window's cost query failed (its budgets' spend is then unknown, never zero).
    costs: Mapping[tuple[CostQuery, WindowKey], tuple[CostSeries, ...]] = field(
        default_factory=dict
    )
    cost_errors: Mapping[WindowKey, str] = field(default_factory=dict)
    # Why one namespace's cost over a window is unknown although the window's query
    # answered (a row that is not a finite number): only scopes over that namespace
    # have unknown spend, every other namespace's rows are kept.
    cost_namespace_errors: Mapping[tuple[WindowKey, str], str] = field(default_factory=dict)


@dataclass(frozen=True)
class SourceSample:
    """A small, bounded sample of what one source returned in an evaluation.

    ``series`` counts the (namespace, workload, model) series of every query of
    the source; ``values`` are the first :data:`SAMPLE_VALUES` distinct values
    of its namespace label (``label``; ``team_alias`` for LiteLLM), sorted, and
    ``more`` how many others there were. Enough for a status to say "the
    LiteLLM source returned 12 series, their team_alias values are None,
    default-team" without carrying every series.
    """

    series: int
    label: str
    values: tuple[str, ...] = ()
    more: int = 0


#: How many namespace-label values a :class:`SourceSample` keeps.
SAMPLE_VALUES = 5


@quick_init
@dataclass(frozen=True, order=True)
class WorkloadKey:
    kind: str  # Deployment, StatefulSet, Job, CronJob or Pod
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind.lower()}/{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Workload:
    """A governed-workload candidate: its pod labels decide which budgets govern it."""

    key: WorkloadKey
    pod_labels: Mapping[str, str]
    declared_models: tuple[str, ...] = ()
    # Its pods that exist, are not being deleted and are older than the scrape grace
    # (a new pod is not yet scraped): with none, its series going away is silence.
    settled_pods: int = 0
    # Names of its pods the operator listed: a spend series naming one is this
    # workload's (engine.ungoverned).
    pods: tuple[str, ...] = ()


@quick_init
@dataclass(frozen=True, order=True)
class BudgetKey:
    kind: str  # TokenBudget or ClusterTokenBudget
    namespace: str  # "" for ClusterTokenBudget
    name: str

    def __str__(self) -> str:
        if self.namespace:
            return f"{self.namespace}/{self.name}"
        return self.name

    @staticmethod
    def of(budget: api.Budget) -> BudgetKey:
        return BudgetKey(budget.kind, budget.metadata.namespace or "", budget.metadata.name)


@quick_init
@dataclass(frozen=True, order=True)
class ScopeKey:
    """One budget applied to one set of namespaces (a PerNamespace cluster budget has many)."""

    budget: BudgetKey
    namespace: str = ""  # "" for a TokenBudget or a Shared cluster budget
    # spec.partition: the partition label's value ("" unpartitioned); None when unpartitioned.
    partition: str | None = None

    def __str__(self) -> str:
        text = f"{self.budget}[{self.namespace}]" if self.namespace else str(self.budget)
        return text if self.partition is None else f"{text}{{{self.partition}}}"


@dataclass(frozen=True)
class Memory:
    """What the engine remembers of a scope from the last evaluation (kept in status)."""

    state: api.State
    last_spend_time: dt.datetime | None = None
    # Models the scope found rate-limited last time, with when each became so.
    rate_limited: tuple[tuple[str, dt.datetime], ...] = ()


@dataclass(frozen=True, order=True)
class CostQuery:
    """What one cost source reads (its price aside): cost sources alike share it.

    ``matchers`` are (label, operator, value) with PromQL's operators
    (``=``, ``!=``, ``=~``, ``!~``).
    """

    metric: str
    gauge: bool = False
    matchers: tuple[tuple[str, str, str], ...] = ()
    namespace_label: str = "namespace"
    workload_label: str = "pod"


@dataclass(frozen=True)
class CostSeries:
    """Units of one cost query spent by one (namespace, workload) over one window."""

    namespace: str
    workload: str
    units: float
