"""The policy engine: budgets + catalog + spend snapshot + workloads + now -> decisions.

Pure. No clock is read (``now`` is an argument), nothing is fetched, nothing
is written, so every law is tested without a cluster (tests/unit).

One evaluation, per budget scope (a TokenBudget; a Shared ClusterTokenBudget;
each namespace of a PerNamespace ClusterTokenBudget)::

    spend per window ──► used % ──► rung of the ladder ──► hysteresis
          │                                   │                  │
    burn rate ─► run-out forecast     cost per outcome      exception cap
                                                                 │
    governed workloads ◄── directive (model, allowed models, rate, block)

Then every workload's directives from all the scopes that govern it are merged
(:func:`token_budget.policy.decisions.merge`): the most restrictive wins.

Decisions worth knowing:

* Spend is "unknown" when its source failed *or* when no series at all exists
  for the scope in any window: an outage or a missing exporter must never look
  like an idle workload. ``whenSpendUnknown`` then decides (Hold keeps the
  last state and leaves workloads untouched until ``staleAfterSeconds``).
* The ladder is cumulative: at Throttle, a Reroute below it still applies.
* A lower rung is taken back only when spend is ``hysteresisPercent`` points
  below the rung's threshold.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_FLOOR, Decimal

from token_budget.api import v1alpha1 as api
from token_budget.api.types import pattern_matches, utc
from token_budget.policy import sources, windows
from token_budget.policy.catalog import Catalog
from token_budget.policy.decisions import (
    SEVERITY,
    STATE_OF_ACTION,
    Decision,
    Directive,
    Evaluation,
    WindowUsage,
    merge,
)
from token_budget.policy.inputs import (
    BudgetKey,
    Memory,
    ScopeKey,
    SpendSeries,
    SpendSnapshot,
    Workload,
    WorkloadKey,
)
from token_budget.policy.planner import OutcomeQuery
from token_budget.policy.sources import ResolvedSource
from token_budget.policy.windows import WindowKey

HUNDRED = Decimal(100)


@dataclass(frozen=True)
class World:
    """Everything but spend: the desired state and the cluster as it is."""

    budgets: Sequence[api.Budget]
    catalog: Catalog = field(default_factory=Catalog)
    namespaces: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    workloads: Sequence[Workload] = ()
    memory: Mapping[ScopeKey, Memory] = field(default_factory=dict)


# ---------------------------------------------------------------------------
# Scopes
# ---------------------------------------------------------------------------


def scopes(budget: api.Budget, namespaces: Mapping[str, Mapping[str, str]]
           ) -> list[tuple[ScopeKey, tuple[str, ...]]]:
    """The scopes of a budget and the namespaces each covers."""
    key = BudgetKey.of(budget)
    if isinstance(budget, api.TokenBudget):
        return [(ScopeKey(key), (budget.metadata.namespace or "",))]
    spec = budget.spec
    picked = tuple(sorted(n for n, labels in namespaces.items()
                          if spec.namespace_selector.matches(labels)))
    if spec.limit_scope is api.LimitScope.SHARED:
        return [(ScopeKey(key), picked)] if picked else []
    return [(ScopeKey(key, ns), (ns,)) for ns in picked]


# ---------------------------------------------------------------------------
# Spend filtering
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _regex(expr: str) -> re.Pattern[str]:
    return re.compile(expr)


def _matcher_ok(m: api.SpendMatcher, value: str) -> bool:
    op = m.operator
    if op is api.MatchOperator.EQUAL:
        return value == m.value
    if op is api.MatchOperator.NOT_EQUAL:
        return value != m.value
    hit = _regex(m.value).fullmatch(value) is not None  # PromQL regexes are anchored
    return hit if op is api.MatchOperator.REGEX else not hit


def series_matches(s: SpendSeries, matchers: Sequence[api.SpendMatcher]) -> bool:
    """Whether a series satisfies every spend matcher (PromQL semantics)."""
    return all(_matcher_ok(m, s.label(m.label)) for m in matchers)


def _model_ok(s: SpendSeries, pattern: str | None, catalog: Catalog) -> bool:
    if pattern is None:
        return True
    return pattern_matches(pattern, s.model) or pattern_matches(pattern, catalog.canonical(s.model))


class _Index:
    """Series by (source, window) and namespace, built once per evaluation."""

    def __init__(self, snapshot: SpendSnapshot) -> None:
        self.windows: dict[tuple[ResolvedSource, WindowKey], dict[str, list[SpendSeries]]] = {}
        for key, series in snapshot.windows.items():
            by_ns: dict[str, list[SpendSeries]] = defaultdict(list)
            for s in series:
                by_ns[s.namespace].append(s)
            self.windows[key] = by_ns
        self.recent: dict[ResolvedSource, dict[str, list[SpendSeries]]] = {}
        for rs, series in snapshot.recent.items():
            by_ns = defaultdict(list)
            for s in series:
                by_ns[s.namespace].append(s)
            self.recent[rs] = by_ns


def _select(by_ns: Mapping[str, list[SpendSeries]], namespaces: Iterable[str],
            matchers: Sequence[api.SpendMatcher], model: str | None,
            catalog: Catalog) -> list[SpendSeries]:
    out = []
    for ns in namespaces:
        for s in by_ns.get(ns, ()):
            if series_matches(s, matchers) and _model_ok(s, model, catalog):
                out.append(s)
    return out


@dataclass
class _Sum:
    tokens: float = 0.0
    cost: Decimal = Decimal(0)
    unpriced: set[str] = field(default_factory=set)

    def add(self, s: SpendSeries, catalog: Catalog) -> None:
        self.tokens += s.tokens
        cost = s.cost
        if cost is None:
            cost = catalog.cost(s.model, s.input_tokens, s.output_tokens, s.cached_input_tokens)
        if cost is None:
            if s.tokens > 0:
                self.unpriced.add(s.model)
        else:
            self.cost += cost


def _total(series: Iterable[SpendSeries], catalog: Catalog) -> _Sum:
    acc = _Sum()
    for s in series:
        acc.add(s, catalog)
    return acc


def _percent(value: Decimal, limit: Decimal) -> Decimal:
    return value * HUNDRED / limit


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


def allowed_models(spec: api.TokenBudgetSpec, catalog: Catalog) -> frozenset[str] | None:
    """Catalog models a budget allows; None when the budget restricts nothing."""
    if not (spec.allowed_models or spec.denied_models or spec.denied_tiers):
        return None
    return frozenset(m.name for m in catalog.models.values()
                     if model_allowed(spec, m.name, catalog))


def model_allowed(spec: api.TokenBudgetSpec, name: str, catalog: Catalog) -> bool:
    """Whether a model (as a workload or exporter names it) is allowed by a budget."""
    entry = catalog.resolve(name)
    names = {name} | ({entry.name} | set(entry.aliases) if entry else set())
    if any(pattern_matches(p, n) for p in spec.denied_models for n in names):
        return False
    if entry is not None and entry.tier in spec.denied_tiers:
        return False
    if spec.allowed_models:
        return any(pattern_matches(p, n) for p in spec.allowed_models for n in names)
    return True


def cheapest_equivalent(model: str, allowed: frozenset[str] | None, catalog: Catalog) -> str | None:
    """The cheapest allowed catalog equivalent of a model, or None when there is none."""
    entry = catalog.resolve(model)
    if entry is None:
        return None
    options = [e for e in entry.equivalents if e in catalog.models
               and (allowed is None or e in allowed)]
    if not options:
        return None
    return min(options, key=lambda e: (catalog.unit_price(e), e))


# ---------------------------------------------------------------------------
# Evaluation of one scope
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rung:
    index: int  # in the sorted ladder; -1 below the first rung
    action: api.Action | None

    @property
    def state(self) -> api.State:
        return api.State.OK if self.action is None else STATE_OF_ACTION[self.action.type]


def _ladder(spec: api.TokenBudgetSpec) -> list[api.Action]:
    return sorted(spec.actions, key=lambda a: a.at_percent)


def _rung_for(ladder: list[api.Action], used: Decimal) -> _Rung:
    reached = [i for i, a in enumerate(ladder) if used >= a.at_percent]
    if not reached:
        return _Rung(-1, None)
    # The most restrictive rung reached, not merely the highest threshold: a Warn
    # listed at 120 % must not lift a Block at 100 %.
    i = max(reached, key=lambda j: (SEVERITY[STATE_OF_ACTION[ladder[j].type]], j))
    return _Rung(i, ladder[i])


def _money(value: Decimal, currency: str) -> str:
    symbol = {"USD": "$", "EUR": "€", "GBP": "£"}.get(currency)
    text = f"{value.quantize(Decimal('0.01')):,.2f}"
    return f"{symbol}{text}" if symbol else f"{text} {currency}"


def describe(w: WindowUsage, currency: str) -> tuple[str, str]:
    """(spend, limit) as people read them, for the tighter of the two limits."""
    tok_pct = (Decimal(w.tokens) * HUNDRED / w.limit_tokens) if w.limit_tokens else Decimal(-1)
    cost_pct = (w.cost * HUNDRED / w.limit_cost) if w.limit_cost else Decimal(-1)
    if w.limit_cost is not None and cost_pct >= tok_pct:
        return _money(w.cost, currency), _money(w.limit_cost, currency)
    return f"{w.tokens:,} tokens", f"{w.limit_tokens:,} tokens"


class _ScopeEval:
    def __init__(self, budget: api.Budget, scope: ScopeKey, namespaces: tuple[str, ...],
                 world: World, snapshot: SpendSnapshot, index: _Index, now: dt.datetime,
                 governed: list[Workload]) -> None:
        self.budget = budget
        self.spec: api.TokenBudgetSpec = budget.spec
        self.scope = scope
        self.namespaces = namespaces
        self.world = world
        self.catalog = world.catalog
        self.snapshot = snapshot
        self.index = index
        self.now = now
        self.governed = governed
        self.source = sources.resolve(self.spec.source)
        self.memory = world.memory.get(scope)

    # -- spend ---------------------------------------------------------------

    def windows(self) -> tuple[list[WindowUsage], bool, set[str], dict[str, str]]:
        """Usage per limit, whether any series exists, unpriced models, top model per workload."""
        usages: list[WindowUsage] = []
        seen = False
        unpriced: set[str] = set()
        recent_by_ns = self.index.recent.get(self.source, {})
        recent_s = Decimal(max(1, self.snapshot.recent_seconds))
        top_model: dict[str, tuple[float, str]] = {}
        for lim in self.spec.limits:
            key = WindowKey.of(lim.window, lim.time_zone)
            by_ns = self.index.windows.get((self.source, key))
            if by_ns is None:
                why = self.snapshot.window_errors.get((self.source, key))
                raise _Unknown(why or f"spend over {key} was not read")
            # Whether the scope has spend series at all is asked without the limit's model
            # filter: a cap on a model nobody uses is zero spend, not an exporter gone missing.
            scoped = _select(by_ns, self.namespaces, self.spec.spend_matchers, None, self.catalog)
            seen = seen or bool(scoped)
            series = [s for s in scoped if _model_ok(s, lim.model, self.catalog)]
            for s in series:
                best = top_model.get(s.workload)
                if best is None or s.tokens > best[0]:
                    top_model[s.workload] = (s.tokens, s.model)
            acc = _total(series, self.catalog)
            unpriced |= acc.unpriced
            start, _ = windows.bounds(key, self.now)
            covered = None
            retention = self.snapshot.retention_seconds
            span = (utc(self.now) - start).total_seconds()
            if retention and span > retention:
                # Prometheus no longer holds the window's oldest part: estimate the whole
                # window from the covered part's rate rather than count the rest as zero.
                covered = Decimal(retention) / Decimal(span)
                acc.tokens = float(Decimal(acc.tokens) / covered)
                acc.cost = acc.cost / covered
            recent = _total(_select(recent_by_ns, self.namespaces, self.spec.spend_matchers,
                                    lim.model, self.catalog), self.catalog)
            resets = windows.resets_at(key, self.now)
            pcts = []
            run_outs = []
            if lim.tokens:
                pcts.append(Decimal(round(acc.tokens)) * HUNDRED / lim.tokens)
                rate = Decimal(recent.tokens) / recent_s
                if rate > 0:
                    left = max(Decimal(0), Decimal(lim.tokens) - Decimal(acc.tokens))
                    run_outs.append(left / rate)
            if lim.cost:
                pcts.append(_percent(acc.cost, lim.cost))
                rate = recent.cost / recent_s
                if rate > 0:
                    left = max(Decimal(0), lim.cost - acc.cost)
                    run_outs.append(left / rate)
            run_out = None
            if run_outs:
                secs = min(run_outs)
                if secs < Decimal(10 * 365 * 86400):
                    candidate = utc(self.now) + dt.timedelta(seconds=float(secs))
                    if resets is None or candidate < resets:
                        run_out = candidate
            usages.append(WindowUsage(
                window=lim.window, time_zone=lim.time_zone, model=lim.model, start=start,
                resets_at=resets, tokens=int(round(acc.tokens)), cost=acc.cost,
                limit_tokens=lim.tokens, limit_cost=lim.cost,
                used_percent=max(pcts) if pcts else Decimal(0), run_out=run_out,
                covered=covered,
            ))
        if not seen:
            # A calendar window that began a moment ago holds no samples yet; the burn-rate
            # query's series still show that the source is alive and the scope reports.
            seen = bool(_select(recent_by_ns, self.namespaces, self.spec.spend_matchers, None,
                                self.catalog))
        return usages, seen, unpriced, {w: m for w, (_, m) in top_model.items()}

    def cost_per_outcome(self) -> Decimal | None:
        o = self.spec.outcome
        if o is None:
            return None
        key = WindowKey.of(o.window, "UTC")
        by_ns = self.index.windows.get((self.source, key), {})
        spend = _total(_select(by_ns, self.namespaces, self.spec.spend_matchers, None,
                               self.catalog),
                       self.catalog).cost
        rows = self.snapshot.outcomes.get(outcome_key(o))
        if rows is None:
            return None
        count = 0.0
        for ns, labels, value in rows:
            if ns not in self.namespaces:
                continue
            lab = dict(labels)
            if all(_matcher_ok(m, lab.get(m.label, "")) for m in o.matchers):
                count += value
        if count <= 0:
            return None
        return spend / Decimal(round(count, 6))

    # -- decision ------------------------------------------------------------

    def decide(self) -> Decision:
        dry = self.spec.mode is api.Mode.DRY_RUN
        error = self.snapshot.errors.get(self.source)
        try:
            if error is not None:
                raise _Unknown(error)
            usages, seen, unpriced, top_model = self.windows()
            if not seen and self.memory is not None and self.memory.last_spend_time is not None:
                # Series existed before and are gone: an outage of the exporter or of the
                # scrape, not an idle agent. (Never seen at all: a new scope, zero spend;
                # otherwise FailClosed would lock a new namespace out before its first token.)
                raise _Unknown(
                    f"no {self.source.preset} spend series exist any more for "
                    f"{', '.join(self.namespaces) or 'any namespace'}; an empty result is not "
                    "taken as zero spend"
                )
        except _Unknown as unknown:
            return self.unknown(str(unknown), dry)

        ladder = _ladder(self.spec)
        used = max((w.used_percent for w in usages), default=Decimal(0))
        rung = _rung_for(ladder, used)
        reason = "LimitReached" if rung.action is not None else "WithinBudget"
        worst = max(usages, key=lambda w: w.used_percent)
        spend_text, limit_text = describe(worst, self.catalog.currency)
        window_text = f"{worst.window}" + (f" ({worst.time_zone})" if worst.resets_at else "")
        message = (f"spend in window {window_text} is {spend_text} of {limit_text} "
                   f"({used.quantize(Decimal('0.1'))}%)")
        if not seen:
            message += "; no spend series exist yet for this scope"
        if rung.action is not None:
            message += f": {rung.action.type.value} from {rung.action.at_percent}%"

        # Hysteresis: coming down, a rung (up to the remembered one) is lifted only once
        # spend is clearly below it; from Blocked into Warn's margin gives Warning, not Ok.
        if self.memory is not None and SEVERITY[self.memory.state] > SEVERITY[rung.state]:
            margin = self.spec.hysteresis_percent
            held = [i for i, a in enumerate(ladder)
                    if SEVERITY[STATE_OF_ACTION[a.type]] <= SEVERITY[self.memory.state]
                    and used >= a.at_percent - margin]
            if held:
                i = max(held, key=lambda j: (SEVERITY[STATE_OF_ACTION[ladder[j].type]], j))
                if SEVERITY[STATE_OF_ACTION[ladder[i].type]] > SEVERITY[rung.state]:
                    rung = _Rung(i, ladder[i])
                    reason = "Hysteresis"
                    message += (f"; {ladder[i].type.value} holds until spend falls below "
                                f"{ladder[i].at_percent - margin}%")

        cpo = self.cost_per_outcome()
        outcome_action: api.Action | None = None
        o = self.spec.outcome
        if cpo is not None and o is not None and o.max_cost_per_outcome is not None \
                and cpo > o.max_cost_per_outcome:
            outcome_action = api.Action(type=o.on_exceeded, at_percent=1)
            if SEVERITY[STATE_OF_ACTION[o.on_exceeded]] > SEVERITY[rung.state]:
                reason = "CostPerOutcomeExceeded"
                message = (f"cost per outcome {_money(cpo, self.catalog.currency)} exceeds "
                           f"{_money(o.max_cost_per_outcome, self.catalog.currency)}: "
                           f"{o.on_exceeded.value}")

        # Effective actions: every rung reached (cumulative), plus the outcome action.
        effective = [a for a in ladder[: rung.index + 1]] if rung.index >= 0 else []
        if outcome_action is not None:
            effective.append(outcome_action)
        exception = self.active_exception()
        if exception is not None:
            cap = SEVERITY[STATE_OF_ACTION[exception.max_action]]
            capped = [a for a in effective if SEVERITY[STATE_OF_ACTION[a.type]] <= cap]
            if len(capped) != len(effective):
                reason = "ExceptionActive"
                message += f"; capped at {exception.max_action.value} until " \
                           f"{exception.until.isoformat()} ({exception.reason})"
                # Downgrade, not drop: over budget under a Warn cap is Warning even when
                # the ladder has no Warn rung of its own.
                if not any(a.type is exception.max_action for a in capped):
                    capped.append(api.Action(type=exception.max_action, at_percent=1))
            effective = capped
        state = max((STATE_OF_ACTION[a.type] for a in effective), key=SEVERITY.__getitem__,
                    default=api.State.OK)
        if state is api.State.OK and reason == "LimitReached":
            reason = "WithinBudget"
        top_action = max(effective, key=lambda a: SEVERITY[STATE_OF_ACTION[a.type]], default=None)

        directives = self.directives(state, reason, message, effective, usages, top_model)
        run_outs = [w.run_out for w in usages if w.run_out is not None]
        return Decision(
            scope=self.scope, namespaces=self.namespaces, state=state, reason=reason,
            message=message, windows=tuple(usages), action=top_action,
            run_out=min(run_outs) if run_outs else None, cost_per_outcome=cpo,
            unpriced_models=tuple(sorted(unpriced)), series_seen=seen,
            exception=exception.reason if exception is not None else None, dry_run=dry,
            workloads=tuple(sorted(w.key for w in self.governed)), directives=directives,
        )

    def active_exception(self) -> api.BudgetException | None:
        live = [e for e in self.spec.exceptions if utc(e.until) > utc(self.now)]
        if not live:
            return None
        # Several at once: the most lenient cap applies, as both were granted.
        return max(live, key=lambda e: (SEVERITY[STATE_OF_ACTION[e.max_action]], e.until))

    def directives(self, state: api.State, reason: str, message: str,
                   effective: list[api.Action], usages: list[WindowUsage],
                   top_model: Mapping[str, str]) -> dict[WorkloadKey, Directive]:
        allowed = allowed_models(self.spec, self.catalog)
        reroute = next((a for a in reversed(effective) if a.type is api.ActionType.REROUTE), None)
        throttle = next((a for a in reversed(effective) if a.type is api.ActionType.THROTTLE), None)
        rate = None
        if throttle is not None:
            rate = throttle.tokens_per_minute or self.pace(usages)
        out = {}
        budget = str(self.scope.budget)
        for w in self.governed:
            model = None
            if reroute is not None:
                if reroute.model:
                    model = reroute.model
                else:
                    current = next(iter(w.declared_models), None) or top_model.get(w.key.name)
                    if current is None:
                        # Spend reported per pod: the workload's pods carry its name as prefix.
                        current = next((m for wl, m in sorted(top_model.items())
                                        if wl.startswith(w.key.name + "-")), None)
                    model = cheapest_equivalent(current, allowed, self.catalog) if current else None
            out[w.key] = Directive(
                state=state, budget=f"{self.scope.budget.kind}/{budget}", reason=reason,
                message=message, model=model, allowed_models=allowed, tokens_per_minute=rate,
            )
        return out

    def pace(self, usages: list[WindowUsage]) -> int:
        """Tokens per minute per workload that spread what is left evenly over the window."""
        worst = max(usages, key=lambda w: w.used_percent)
        # A limit may cap tokens and money at once: what is left is the tighter of the two.
        lefts = []
        if worst.limit_tokens:
            lefts.append(Decimal(max(0, worst.limit_tokens - worst.tokens)))
        if worst.limit_cost and worst.cost > 0 and worst.tokens > 0:
            lefts.append(max(Decimal(0), worst.limit_cost - worst.cost) * worst.tokens / worst.cost)
        left = min(lefts, default=Decimal(0))
        if worst.resets_at is not None:
            minutes = Decimal((worst.resets_at - utc(self.now)).total_seconds()) / 60
        else:
            minutes = Decimal((utc(self.now) - worst.start).total_seconds()) / 60
        per = left / max(Decimal(1), minutes) / max(1, len(self.governed))
        return max(1, int(per.to_integral_value(rounding=ROUND_FLOOR)))

    def unknown(self, error: str, dry: bool) -> Decision:
        policy = self.spec.when_spend_unknown
        keys = tuple(sorted(w.key for w in self.governed))
        budget = f"{self.scope.budget.kind}/{self.scope.budget}"
        if policy.policy is api.MissingDataPolicy.HOLD and self.memory is not None:
            last = self.memory.last_spend_time
            fresh = last is not None and (utc(self.now) - utc(last)).total_seconds() \
                <= policy.stale_after_seconds
            if fresh:
                return Decision(
                    scope=self.scope, namespaces=self.namespaces, state=self.memory.state,
                    reason="SpendUnknownHolding",
                    message=f"spend cannot be read ({error}); holding state "
                    f"{self.memory.state.value} for up to {policy.stale_after_seconds}s",
                    spend_known=False, spend_error=error, dry_run=dry, workloads=keys,
                    directives={},  # Hold: workloads keep what they have
                )
        if policy.policy is api.MissingDataPolicy.FAIL_CLOSED:
            state, reason = api.State.BLOCKED, "SpendUnknownFailClosed"
            message = f"spend cannot be read ({error}); FailClosed blocks"
        else:
            state, reason = api.State.OK, "SpendUnknownFailOpen"
            message = f"spend cannot be read ({error}); failing open"
            if policy.policy is api.MissingDataPolicy.HOLD:
                message = (f"spend cannot be read ({error}); nothing to hold or held longer "
                           f"than {policy.stale_after_seconds}s, failing open")
        allowed = allowed_models(self.spec, self.catalog)
        directives = {
            k: Directive(state=state, budget=budget, reason=reason, message=message,
                         allowed_models=allowed)
            for k in keys
        }
        return Decision(
            scope=self.scope, namespaces=self.namespaces, state=state, reason=reason,
            message=message, spend_known=False, spend_error=error, dry_run=dry,
            workloads=keys, directives=directives,
        )


class _Unknown(Exception):
    """Spend for a scope cannot be known (internal control flow only)."""


# ---------------------------------------------------------------------------
# Whole evaluation
# ---------------------------------------------------------------------------


def governed_by(budget: api.Budget, namespaces: Iterable[str],
                by_ns: Mapping[str, list[Workload]]) -> list[Workload]:
    sel = budget.spec.selector
    return [w for ns in namespaces for w in by_ns.get(ns, ()) if sel.matches(w.pod_labels)]


def evaluate(world: World, snapshot: SpendSnapshot, now: dt.datetime) -> Evaluation:
    """Decide every budget scope and merge the directives per workload.

    Args:
        world: budgets, catalog, namespaces with labels, workloads, memory.
        snapshot: spend read for the plan of the same budgets.
        now: the time of evaluation (never read from a clock here).

    Returns:
        One decision per scope (sorted) and one merged directive per governed
        workload. Workloads governed only by dry-run or held scopes get none;
        :attr:`Evaluation.held` lists those that must be left as they are.
    """
    index = _Index(snapshot)
    by_ns: dict[str, list[Workload]] = defaultdict(list)
    for w in world.workloads:
        by_ns[w.key.namespace].append(w)
    decisions: list[Decision] = []
    per_workload: dict[WorkloadKey, list[Directive]] = defaultdict(list)
    held: set[WorkloadKey] = set()
    for budget in world.budgets:
        for scope, namespaces in scopes(budget, world.namespaces):
            governed = governed_by(budget, namespaces, by_ns)
            decision = _ScopeEval(budget, scope, namespaces, world, snapshot, index, now,
                                  governed).decide()
            decisions.append(decision)
            if decision.dry_run:
                continue
            if decision.reason == "SpendUnknownHolding":
                held.update(decision.workloads)
            for key, directive in decision.directives.items():
                per_workload[key].append(directive)
    merged = {k: merge(v) for k, v in per_workload.items() if k not in held}
    decisions.sort(key=lambda d: d.scope)
    return Evaluation(decisions=tuple(decisions), directives=merged, held=frozenset(held))


def outcome_key(o: api.Outcome) -> str:
    """The key under which the snapshot holds an outcome counter's answer."""
    return OutcomeQuery.key_of(o.metric, o.namespace_label, WindowKey.of(o.window, "UTC"))
