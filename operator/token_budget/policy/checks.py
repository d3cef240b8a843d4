"""The decision of one scope: an ordered chain of small checks (cert-manager's policy chain).

Each check reads the scope (:class:`ScopeInput`) and the draft the checks
before it left, and returns a verdict: ``None`` (nothing to say, go on), a
:class:`Verdict` (go on, with this reason and message), or a final
:class:`Decision` (stop here). In order::

    missing_data   final when spend is unknown (source failed, target down, series gone)
    ladder         the rung spend reached: LimitReached or WithinBudget
    hysteresis     coming down, a rung holds until spend is clearly below it
    outcome        cost per outcome over its maximum adds the outcome's action
    exception_cap  the most lenient live exception caps the actions in effect
    outcome_state  the state of the actions in effect (a limit capped to nothing is within)
    rate_limit     models whose 429 share passed the rate-limit trigger, and their fallbacks
    dry_run        final: the decision, marked dry-run for a DryRun budget

``dry_run`` always ends the chain: it builds the decision, marked dry-run or
not. The exception cap comes after the outcome check, not before the ladder:
it caps every action in effect, the outcome's too. Every reason is a
:class:`~token_budget.api.conditions.Reason`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from decimal import Decimal
from typing import NamedTuple

from token_budget.api import v1alpha1 as api
from token_budget.api.conditions import Reason
from token_budget.api.types import utc
from token_budget.policy import costs, directives, planner, ratelimits, usage
from token_budget.policy.decisions import (
    SEVERITY,
    STATE_OF_ACTION,
    Decision,
    Directive,
    WindowUsage,
)
from token_budget.policy.ladders import Rung, describe, money, rung_for
from token_budget.policy.outcomes import outcome_count, outcome_key, per_outcome
from token_budget.policy.scope import ScopeInput, Unknown
from token_budget.policy.windows import WindowKey

_TENTH = Decimal("0.1")
_NO_RUNG = Rung(-1, None)
_USED = operator.attrgetter("used_percent")


class Verdict(NamedTuple):
    """A check's say: the reason the scope is in its state, and the message for people."""

    reason: Reason
    message: str


class Draft:
    """The decision as the checks build it."""

    __slots__ = ("usages", "seen", "unpriced", "silent", "ladder", "used", "rung", "reason",
                 "message", "cost_per_outcome", "effective", "exception", "state", "rate",
                 "held")

    def __init__(self) -> None:
        self.usages: list[WindowUsage] = []
        self.seen = False  # spend series exist for the scope
        self.unpriced: set[str] = set()
        self.silent = False  # series existed and are gone with their pods
        self.ladder: list[api.Action] = []
        self.used = Decimal(0)
        self.rung = _NO_RUNG
        self.reason = Reason.WITHIN_BUDGET
        self.message = ""
        self.cost_per_outcome: Decimal | None = None
        self.effective: list[api.Action] = []  # every action in effect (the ladder is cumulative)
        self.exception: api.BudgetException | None = None
        self.state = api.State.OK
        self.rate = ratelimits.Rate()  # the rate-limit trigger's findings (off by default)
        # Rungs hysteresis holds although spend is below them (indices in the sorted ladder).
        self.held: frozenset[int] = frozenset()


Check = Callable[[ScopeInput, Draft], Verdict | Decision | None]


def missing_data(s: ScopeInput, d: Draft) -> Decision | None:
    """Final when spend cannot be known: the source failed, a target is down, a window is
    missing, or the scope's series vanished while its pods run."""
    try:
        error = s.spend_source.error
        if error is not None:
            raise Unknown(error)
        down = s.snapshot.down.get(s.source) if s.snapshot.down else None
        if down:
            hit = sorted({down[ns] for ns in s.namespaces if ns in down})
            if hit:
                # The exporter or gateway that reported this scope's spend does not
                # answer: what it counts now is unknown, whatever is still in the window.
                raise Unknown(f"{hit[0]}; the spend they count cannot be read")
        d.usages, d.seen, d.unpriced = usage.read(s)
        if not d.seen and s.memory is not None and s.memory.last_spend_time is not None:
            # Series existed before and are gone. Silence, unless something says the
            # scrape is missing: Prometheus failing and targets down are caught above;
            # here, agent pods that run but no longer export anything. (Pods gone,
            # scaled to zero, Jobs done: silence, and silence over a window is zero;
            # a FailClosed budget that blocked them would otherwise never lift.)
            running = sum(w.settled_pods for w in s.governed) if s.source.per_pod else 0
            if running:
                raise Unknown(
                    f"no {s.source.preset} spend series exist any more for "
                    f"{', '.join(s.namespaces) or 'any namespace'} while {running} "
                    "governed pod(s) run: their scrape is missing, and an empty result "
                    "is not taken as zero spend"
                )
            d.silent = True
    except Unknown as why:
        return unknown(s, str(why))
    return None


def ladder(s: ScopeInput, d: Draft) -> Verdict:
    """The rung spend reached: LimitReached, or WithinBudget below the first."""
    d.ladder = s.context.ladder(s.spec)
    # The first limit of the highest use, and that use (one pass, not two).
    worst = max(d.usages, key=_USED)
    d.used = used = worst.used_percent
    d.rung = rung = rung_for(d.ladder, used)
    spend_text, limit_text = describe(worst, s.catalog.currency)
    window_text = f"{worst.window}" + (f" ({worst.time_zone})" if worst.resets_at else "")
    message = (f"spend in window {window_text} is {spend_text} of {limit_text} "
               f"({used.quantize(_TENTH)}%)")
    if d.silent:
        message += ("; no spend series exist any more for this scope and none of its "
                    "governed pods runs: silence, counted as zero")
    elif not d.seen:
        message += "; no spend series exist yet for this scope"
    if rung.action is None:
        return Verdict(Reason.WITHIN_BUDGET, message)
    message += f": {rung.action.type.value} from {rung.action.at_percent}%"
    return Verdict(Reason.LIMIT_REACHED, message)


def hysteresis(s: ScopeInput, d: Draft) -> Verdict | None:
    """Coming down, a rung (up to the remembered one) is lifted only once spend is clearly
    below it; from Blocked into Warn's margin gives Warning, not Ok."""
    memory = s.memory
    if memory is None or SEVERITY[memory.state] <= SEVERITY[d.rung.state]:
        return None
    margin = s.spec.hysteresis_percent
    lad = d.ladder
    held = [i for i, a in enumerate(lad)
            if SEVERITY[STATE_OF_ACTION[a.type]] <= SEVERITY[memory.state]
            and d.used >= a.at_percent - margin]
    if not held:
        return None
    i = max(held, key=lambda j: (SEVERITY[STATE_OF_ACTION[lad[j].type]], j))
    if SEVERITY[STATE_OF_ACTION[lad[i].type]] <= SEVERITY[d.rung.state]:
        return None
    d.rung = Rung(i, lad[i])
    d.held = frozenset(held)
    return Verdict(Reason.HYSTERESIS, f"{d.message}; {lad[i].type.value} holds until spend "
                                      f"falls below {lad[i].at_percent - margin}%")


def outcome(s: ScopeInput, d: Draft) -> Verdict | None:
    """Cost per outcome over its maximum adds the outcome's action to the rungs reached."""
    # The rungs up to the one in effect that spend reached or hysteresis holds: a rung
    # below the held one in the ladder but more severe than what is remembered (Block at
    # 2 % between Warns at 1 % and 3 %) was neither, and must not come back with it.
    d.effective = [a for j, a in enumerate(d.ladder[: d.rung.index + 1])
                   if d.used >= a.at_percent or j in d.held] if d.rung.index >= 0 else []
    o = s.spec.outcome
    if o is None:
        return None
    spend = s.spend_source.window(o.window, "UTC", planner.needed_labels(s.spec)).spend
    cost = (spend.total(s.namespaces, s.spec.spend_matchers, None).cost
            if spend is not None else Decimal(0))
    more = costs.added_cost(s.spec, s.catalog, s.context.costs, WindowKey.of(o.window, "UTC"),
                            s.namespaces, s.cost_keep)
    count = outcome_count(s.context, o, outcome_key(o), s.namespaces)
    # A cost source not read leaves cost per outcome unknown rather than too low.
    d.cost_per_outcome = cpo = per_outcome(cost + more, count) if more is not None else None
    if cpo is None or o.max_cost_per_outcome is None or cpo <= o.max_cost_per_outcome:
        return None
    d.effective.append(api.Action(type=o.on_exceeded, at_percent=1))
    if SEVERITY[STATE_OF_ACTION[o.on_exceeded]] <= SEVERITY[d.rung.state]:
        return None
    currency = s.catalog.currency
    return Verdict(Reason.COST_PER_OUTCOME_EXCEEDED,
                   f"cost per outcome {money(cpo, currency)} exceeds "
                   f"{money(o.max_cost_per_outcome, currency)}: {o.on_exceeded.value}")


def active_exception(s: ScopeInput) -> api.BudgetException | None:
    """The live exception with the most lenient cap (several at once: both were granted)."""
    live = [e for e in s.spec.exceptions if utc(e.until) > s.context.now_utc]
    if not live:
        return None
    return max(live, key=lambda e: (SEVERITY[STATE_OF_ACTION[e.max_action]], e.until))


def exception_cap(s: ScopeInput, d: Draft) -> Verdict | None:
    """A live exception caps the actions in effect at its maxAction (downgrade, not drop)."""
    d.exception = exception = active_exception(s) if s.spec.exceptions else None
    if exception is None:
        return None
    cap = SEVERITY[STATE_OF_ACTION[exception.max_action]]
    capped = [a for a in d.effective if SEVERITY[STATE_OF_ACTION[a.type]] <= cap]
    if len(capped) == len(d.effective):
        return None
    # Over budget under a Warn cap is Warning even when the ladder has no Warn rung.
    if not any(a.type is exception.max_action for a in capped):
        capped.append(api.Action(type=exception.max_action, at_percent=1))
    d.effective = capped
    return Verdict(Reason.EXCEPTION_ACTIVE,
                   f"{d.message}; capped at {exception.max_action.value} until "
                   f"{exception.until.isoformat()} ({exception.reason})")


def outcome_state(s: ScopeInput, d: Draft) -> Verdict | None:
    """The state is the most severe action in effect; a limit capped to nothing is within."""
    d.state = max((STATE_OF_ACTION[a.type] for a in d.effective), key=SEVERITY.__getitem__,
                  default=api.State.OK)
    if d.state is api.State.OK and d.reason is Reason.LIMIT_REACHED:
        return Verdict(Reason.WITHIN_BUDGET, d.message)
    return None


def rate_limit(s: ScopeInput, d: Draft) -> None:
    """The models the rate-limit trigger finds rate-limited and their fallbacks; applied to
    the directives by :func:`dry_run`, after the ladder's (a Block wins)."""
    d.rate = ratelimits.judge(s)
    return None


def dry_run(s: ScopeInput, d: Draft) -> Decision:
    """Final: the decision, with its directives; a DryRun budget's are never applied."""
    top_action = max(d.effective, key=lambda a: SEVERITY[STATE_OF_ACTION[a.type]], default=None)
    told = directives.directives(s, d.state, d.reason, d.message, d.effective, d.usages)
    if d.rate.limited:
        told = ratelimits.reroute(s, told, d.rate)
    run_outs = [w.run_out for w in d.usages if w.run_out is not None]
    # Over the limit that counted the most series (the longest window, as a rule): a
    # label is judged once, not once per window.
    widest = max(s.counted, key=lambda c: len(c.series), default=None)
    unaccounted, unaccounted_n = s.context.ungoverned.of(widest, s.governed)
    return Decision(
        scope=s.scope, namespaces=s.namespaces, state=d.state, reason=d.reason,
        message=d.message, windows=tuple(d.usages), action=top_action,
        run_out=min(run_outs) if run_outs else None, cost_per_outcome=d.cost_per_outcome,
        unpriced_models=tuple(sorted(d.unpriced)), series_seen=d.seen,
        exception=d.exception.reason if d.exception is not None else None,
        dry_run=s.spec.mode is api.Mode.DRY_RUN,
        workloads=tuple(sorted(w.key for w in s.governed)), directives=told,
        ungoverned=unaccounted, ungoverned_series=unaccounted_n,
        rate_limit_on=d.rate.on, rate_limited=tuple(d.rate.limited.values()),
        rate_limit_error=d.rate.error,
        rate_limit_probing=tuple(sorted(d.rate.probing.items())),
    )


#: The checks in the order they run; the last one always decides.
CHAIN: tuple[Check, ...] = (missing_data, ladder, hysteresis, outcome, exception_cap,
                            outcome_state, rate_limit, dry_run)


def decide(s: ScopeInput) -> Decision:
    """Run the chain until a check gives the final decision."""
    d = Draft()
    for check in CHAIN:
        verdict = check(s, d)
        if verdict is None:
            continue
        if isinstance(verdict, Decision):
            return verdict
        d.reason, d.message = verdict
    raise AssertionError("the chain ends with a check that always decides")


def unknown(s: ScopeInput, error: str) -> Decision:
    """The decision when spend cannot be read, as ``whenSpendUnknown`` says."""
    policy = s.spec.when_spend_unknown
    dry = s.spec.mode is api.Mode.DRY_RUN
    keys = tuple(sorted(w.key for w in s.governed))
    budget = f"{s.scope.budget.kind}/{s.scope.budget}"
    if policy.policy is api.MissingDataPolicy.HOLD and s.memory is not None:
        s.timed = True
        last = s.memory.last_spend_time
        fresh = last is not None and (s.context.now_utc - utc(last)).total_seconds() \
            <= policy.stale_after_seconds
        if fresh:
            return Decision(
                scope=s.scope, namespaces=s.namespaces, state=s.memory.state,
                reason=Reason.SPEND_UNKNOWN_HOLDING,
                message=f"spend cannot be read ({error}); holding state "
                f"{s.memory.state.value} for up to {policy.stale_after_seconds}s",
                spend_known=False, spend_error=error, dry_run=dry, workloads=keys,
                directives={},  # Hold: workloads keep what they have
            )
    if policy.policy is api.MissingDataPolicy.FAIL_CLOSED:
        state, reason = api.State.BLOCKED, Reason.SPEND_UNKNOWN_FAIL_CLOSED
        message = f"spend cannot be read ({error}); FailClosed blocks"
    else:
        state, reason = api.State.OK, Reason.SPEND_UNKNOWN_FAIL_OPEN
        message = f"spend cannot be read ({error}); failing open"
        if policy.policy is api.MissingDataPolicy.HOLD:
            message = (f"spend cannot be read ({error}); nothing to hold or held longer "
                       f"than {policy.stale_after_seconds}s, failing open")
    allowed = s.context.allowed_models(s.spec)
    told = {k: Directive(state=state, budget=budget, reason=reason, message=message,
                         allowed_models=allowed)
            for k in keys}
    return Decision(
        scope=s.scope, namespaces=s.namespaces, state=state, reason=reason,
        message=message, spend_known=False, spend_error=error, dry_run=dry,
        workloads=keys, directives=told,
    )
