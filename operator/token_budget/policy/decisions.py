"""What the engine returns: a decision per budget scope, a directive per workload.

A :class:`Directive` is what a workload is told (through annotations): its
state, the budget that put it there, a model to use instead, the models it may
use, a token rate, whether it is blocked. When several budgets govern one
workload, :func:`merge` combines their directives so that the most restrictive
wins; its result does not depend on the order of the directives, so the order of
budgets never matters. It is not associative (merging merged directives can pick
another model override than one flat merge), so merge every directive at once.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal

from token_budget.api import v1alpha1 as api
from token_budget.api.conditions import Reason
from token_budget.policy.inputs import Gap, ScopeKey, WorkloadKey, quick_init
from token_budget.policy.ratesources import RateLimited

SEVERITY: dict[api.State, int] = {
    api.State.OK: 0,
    api.State.WARNING: 1,
    api.State.REROUTED: 2,
    api.State.THROTTLED: 3,
    api.State.BLOCKED: 4,
}
STATE_OF_ACTION: dict[api.ActionType, api.State] = {
    api.ActionType.WARN: api.State.WARNING,
    api.ActionType.REROUTE: api.State.REROUTED,
    api.ActionType.THROTTLE: api.State.THROTTLED,
    api.ActionType.BLOCK: api.State.BLOCKED,
}


@quick_init
@dataclass(frozen=True)
class WindowUsage:
    window: str
    time_zone: str
    model: str | None
    start: dt.datetime
    resets_at: dt.datetime | None
    tokens: int
    cost: Decimal
    limit_tokens: int | None
    limit_cost: Decimal | None
    used_percent: Decimal  # of the tighter of the token and cost limits
    run_out: dt.datetime | None
    # Fraction of the window Prometheus still holds (None: all of it). Spend is then
    # estimated from the covered part's rate, never taken as zero for the missing part.
    covered: Decimal | None = None
    # Series of the scope whose start value a scrape gap hid (None: none): bridged
    # from an older sample, or unknown (only the growth seen in the window counts).
    gap: Gap | None = None
    # With cost sources: the window's money by (kind, name), token cost first.
    by_kind: tuple[tuple[str, str, Decimal], ...] = ()


@quick_init
@dataclass(frozen=True)
class Directive:
    """What one workload is told. ``None`` fields impose nothing."""

    state: api.State
    budget: str
    reason: str
    message: str
    model: str | None = None
    allowed_models: frozenset[str] | None = None
    tokens_per_minute: int | None = None

    @property
    def blocked(self) -> bool:
        return self.state is api.State.BLOCKED

    @property
    def severity(self) -> int:
        return SEVERITY[self.state]


OK_DIRECTIVE = Directive(state=api.State.OK, budget="", reason=Reason.WITHIN_BUDGET, message="")


def _rank(d: Directive) -> tuple[object, ...]:
    # The most restrictive first, then a fixed tie-break, so that the merged result never
    # depends on the order budgets were listed in. Directives equal in all of these yield
    # the same top fields and the same model, whatever their allowed models: those are
    # intersected, in any order, so they need no place in the rank (and sorting them per
    # directive was the dearest part of a merge).
    return (-SEVERITY[d.state], d.budget, d.reason, d.message, d.model or "",
            d.tokens_per_minute or 0)


def merge(directives: Iterable[Directive]) -> Directive:
    """The most restrictive of several directives; every constraint of each is kept.

    The state, budget and reason come from the most restrictive directive; the
    model override from the most restrictive one that sets a model; allowed
    models are intersected; the lowest token rate wins.
    """
    ranked = list(directives)
    if len(ranked) == 1:
        [only] = ranked
        if only.model is None or only.allowed_models is None or only.model in only.allowed_models:
            return only  # what the merge below would build from it, field for field
    if not ranked:
        return OK_DIRECTIVE
    ranked.sort(key=_rank)
    top = ranked[0]
    allowed: frozenset[str] | None = None
    for d in ranked:
        if d.allowed_models is not None:
            allowed = d.allowed_models if allowed is None else allowed & d.allowed_models
    rates = [d.tokens_per_minute for d in ranked if d.tokens_per_minute is not None]
    # A reroute target another budget denies is no directive at all: keep the allowed list.
    models = [d.model for d in ranked if d.model is not None
              and (allowed is None or d.model in allowed)]
    return Directive(
        state=top.state,
        budget=top.budget,
        reason=top.reason,
        message=top.message,
        model=models[0] if models else None,
        allowed_models=allowed,
        tokens_per_minute=min(rates) if rates else None,
    )


@quick_init
@dataclass(frozen=True)
class Decision:
    """The outcome for one budget scope."""

    scope: ScopeKey
    namespaces: tuple[str, ...]
    state: api.State
    reason: Reason
    message: str
    windows: tuple[WindowUsage, ...] = ()
    action: api.Action | None = None
    run_out: dt.datetime | None = None
    cost_per_outcome: Decimal | None = None
    spend_known: bool = True
    series_seen: bool = False  # spend series existed for the scope (vs. a new, idle scope)
    spend_error: str | None = None
    unpriced_models: tuple[str, ...] = ()
    exception: str | None = None
    dry_run: bool = False
    workloads: tuple[WorkloadKey, ...] = ()
    directives: dict[WorkloadKey, Directive] = field(default_factory=dict)
    # Why no series of the source is the scope's although the source returned some
    # (its labels name other namespaces, or the spend matchers turned every one away).
    unmatched: str | None = None
    # Spend the scope counts that no workload it governs accounts for: the workload
    # labels ("namespace/label") of its series that name neither a governed workload
    # nor one of its pods (at most UNGOVERNED_SHOWN of them; see ungoverned_series).
    ungoverned: tuple[str, ...] = ()
    ungoverned_series: int = 0
    # The rate-limit trigger: whether it is on for the scope, the models it finds
    # rate-limited, and why the 429 share could not be read (then nothing is rerouted).
    rate_limit_on: bool = False
    rate_limited: tuple[RateLimited, ...] = ()
    rate_limit_error: str | None = None
    # Models rate-limited last time that now have too few requests to judge: the reroute
    # lifts so they are tried again (half-open), with when they first became rate-limited.
    rate_limit_probing: tuple[tuple[str, dt.datetime], ...] = ()

    @property
    def worst_window(self) -> WindowUsage | None:
        if not self.windows:
            return None
        return max(self.windows, key=lambda w: w.used_percent)


@dataclass(frozen=True)
class Evaluation:
    decisions: tuple[Decision, ...]
    directives: dict[WorkloadKey, Directive]
    held: frozenset[WorkloadKey] = frozenset()
    # What the next evaluation may take over (token_budget.policy.reuse.Memo); not part
    # of the result: equal evaluations may keep different memos.
    memo: object = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class ScopeSpend:
    """What one budget scope spent over one window, summed as its decision sums it.

    ``outcomes`` is None when the budget declares no outcome counter or it was
    not read; ``cost_per_outcome`` is None also when no outcome was counted.
    """

    scope: ScopeKey
    namespaces: tuple[str, ...]
    tokens: float
    cost: Decimal
    outcomes: float | None = None
    cost_per_outcome: Decimal | None = None
    # With cost sources: the money by (kind, name), token cost first.
    by_kind: tuple[tuple[str, str, Decimal], ...] = ()
