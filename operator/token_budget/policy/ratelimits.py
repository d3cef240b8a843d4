"""The rate-limit trigger: reroute a model to its fallback while its provider rate-limits it.

A budget's ``rateLimit`` (or, when it sets none, the ModelCatalog's) turns it
on. For each model with requests in the scope's namespaces over
``windowSeconds``, the share of them answered with 429 decides::

    requests < minRequests                      not judged: not rate-limited
    share >= thresholdPercent                   rate-limited
    rate-limited last time and
      share >= thresholdPercent - hysteresis    still rate-limited (no flapping)
    otherwise                                   not rate-limited (it goes back)

A rate-limited model's traffic goes to the first of the catalog's
``rateLimitFallbacks`` for it that the budget allows (``allowedModels``,
``deniedModels``, ``deniedTiers``) and that is not itself rate-limited in the
scope; with none left, nothing is rerouted and the status says so.

How it combines with the spend ladder (:func:`reroute`, applied to the
directives the ladder gave):

* A Block wins: a blocked workload is told nothing more.
* The model a workload would call after the ladder is judged: the spend
  Reroute's target when the ladder reroutes, else the workload's own model
  (its declared model, else the model of its largest series). A spend
  Reroute to a model that is rate-limited goes on to that model's fallback;
  a workload the ladder already moves off a rate-limited model keeps the
  ladder's target.
* The workload's state is at least Rerouted (reason ``RateLimited``) while it
  is rerouted for a rate limit; a Throttle's rate still applies. The scope's
  own state and reason stay the spend ladder's: the rate limit is not spend,
  and the ladder's hysteresis must not take it for a Reroute rung.

When the 429 counters cannot be read (Prometheus down, the query refused),
no rate-limit reroute starts and those in place are lifted: traffic goes back
to the model the workload asked for, as it would without the operator, and
the status says the share is unknown. Only the scopes whose spend is known get
here: when spend is unknown too, ``whenSpendUnknown`` decides (Hold leaves
every annotation, a rate-limit reroute included, as it is).

A reroute reduces the rerouted model's traffic to nothing, so its share is
judged on fewer requests each evaluation: once the window holds fewer than
``minRequests`` the reroute lifts and the model is tried again (a circuit
breaker's half-open state); if it still answers 429, it is rerouted again
once ``minRequests`` requests are counted. Such a model is *probing*
(``Decision.rate_limit_probing``): it is remembered as rate-limited (its
hysteresis and ``since`` go on) until a share is judged on enough requests, and
the operator announces neither the lift nor the reroute that follows it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Container, Iterable
from decimal import Decimal

from token_budget.api import v1alpha1 as api
from token_budget.api.conditions import Reason
from token_budget.policy import usage
from token_budget.policy.catalog import Catalog
from token_budget.policy.decisions import SEVERITY, Directive
from token_budget.policy.inputs import ScopeKey, WorkloadKey
from token_budget.policy.ratesources import RateLimited, RateSample, RateSource, resolve
from token_budget.policy.scope import ScopeInput

RateKey = tuple[RateSource, int]


def trigger(spec: api.TokenBudgetSpec, catalog: Catalog) -> api.RateLimitTrigger | None:
    """The budget's own trigger, else the catalog's; None: off."""
    return spec.rate_limit if spec.rate_limit is not None else catalog.rate_limit


def plan(budgets: Iterable[api.Budget], catalog: Catalog) -> tuple[RateKey, ...]:
    """The (rate source, window) pairs to read: one query each, shared by every budget."""
    keys: set[RateKey] = set()
    for budget in budgets:
        t = trigger(budget.spec, catalog)
        if t is None:
            continue
        rs = resolve(budget.spec.source)
        if rs is not None:
            keys.add((rs, t.window_seconds))
    return tuple(sorted(keys))


class Rate:
    """What the trigger found for one scope (on the decision chain's draft)."""

    __slots__ = ("on", "limited", "error", "shares", "probing")

    def __init__(self) -> None:
        self.on = False
        self.limited: dict[str, RateLimited] = {}  # catalog model -> verdict
        self.error: str | None = None
        self.shares: dict[str, tuple[float, float]] = {}  # model -> (requests, limited)
        self.probing: dict[str, dt.datetime] = {}  # lifted for too few requests -> since


def judge(s: ScopeInput) -> Rate:
    """The models rate-limited in the scope and their fallbacks (the chain's check)."""
    rate = Rate()
    t = trigger(s.spec, s.catalog)
    if t is None:
        return rate
    rate.on = True
    rs = resolve(s.spec.source)
    if rs is None:
        rate.error = (f"the {s.source.preset} source cannot tell 429 answers apart; set "
                      "source.metrics.rateLimitedRequests")
        return rate
    key = (rs, t.window_seconds)
    error = s.snapshot.rate_limit_errors.get(key)
    samples = s.snapshot.rate_limits.get(key)
    if error is not None or samples is None:
        rate.error = error or f"the {rs} rate-limit counters over {t.window_seconds}s were not read"
        return rate
    rate.shares = shares = _shares(samples, s.namespaces, s.catalog)
    before = dict(remembered(s))
    limited: dict[str, tuple[int, int]] = {}
    for model, (requests, answered_429) in shares.items():
        if requests < t.min_requests or requests <= 0:
            continue
        share = Decimal(answered_429) * 100 / Decimal(requests)
        floor = t.threshold_percent - (t.hysteresis_percent if model in before else 0)
        if share >= floor:
            limited[model] = (int(share), int(requests))
    for model, since in before.items():
        requests = shares.get(model, (0.0, 0.0))[0]
        if model not in limited and (requests < t.min_requests or requests <= 0):
            rate.probing[model] = since  # half-open: not judged, tried again
    allowed = s.context.allowed_models(s.spec)
    for model, (share_pct, requests) in sorted(limited.items()):
        fallback = first_fallback(s.catalog, allowed, model, limited)
        rate.limited[model] = RateLimited(
            model=model, share_percent=share_pct, requests=requests, fallback=fallback,
            since=before.get(model, s.context.now_utc))
        if model not in before:
            s.timed = True  # "since" is the time of evaluation: it holds for that instant
    return rate


def remembered(s: ScopeInput) -> tuple[tuple[str, dt.datetime], ...]:
    """The models the scope found rate-limited last time, with when each became so.

    The 429 share is per (namespace, model): every partition of a scope reads the same
    share, so the memory is the scope's (``ScopeKey(budget, namespace)``, kept in the
    status's ``rateLimited`` rows), shared by its partitions, most of which a status
    does not list.
    """
    own = s.memory.rate_limited if s.memory is not None else ()
    if s.scope.partition is None or not s.context.world.memory:
        return own
    parent = s.context.world.memory.get(ScopeKey(s.scope.budget, s.scope.namespace))
    return (*own, *parent.rate_limited) if parent is not None else own


def _shares(samples: Iterable[RateSample], namespaces: tuple[str, ...], catalog: Catalog
            ) -> dict[str, tuple[float, float]]:
    """Requests and 429 answers per catalog model over the scope's namespaces."""
    wanted = set(namespaces)
    out: dict[str, tuple[float, float]] = {}
    for sample in samples:
        if sample.namespace not in wanted:
            continue
        model = catalog.canonical(sample.model)
        requests, limited = out.get(model, (0.0, 0.0))
        out[model] = (requests + sample.requests, limited + sample.limited)
    return out


def reroute(s: ScopeInput, told: dict[WorkloadKey, Directive], rate: Rate
            ) -> dict[WorkloadKey, Directive]:
    """The ladder's directives with rate-limited models rerouted (see the module's text)."""
    if not rate.limited:
        return told
    out = dict(told)
    top: dict[str, str] | None = None
    for w in s.governed:
        d = told.get(w.key)
        if d is None or d.blocked:
            continue  # a Block wins
        own = next(iter(w.declared_models), None)
        if own is None:
            if top is None:
                top = usage.top_model(s)
            own = top.get(w.key.name) or next(
                (m for wl, m in sorted(top.items()) if wl.startswith(w.key.name + "-")), None)
        model = d.model if d.model is not None else own
        if model is None:
            continue
        found = rate.limited.get(s.catalog.canonical(model))
        if found is None or found.fallback is None:
            continue
        fallback: str | None = found.fallback
        if d.model is not None and own is not None and fallback is not None and \
                s.catalog.canonical(own) == s.catalog.canonical(fallback):
            # The ladder moved the workload off ``own`` (a spend Reroute): a rate limit on
            # its target must not send it back. The next fallback, or none.
            fallback = first_fallback(s.catalog, s.context.allowed_models(s.spec),
                                      found.model, rate.limited,
                                      exclude=s.catalog.canonical(own))
            if fallback is None:
                continue
        why = (f"{found.model} is rate-limited ({found.share_percent}% of "
               f"{found.requests} requests answered 429): rerouted to {fallback}")
        if SEVERITY[d.state] < SEVERITY[api.State.REROUTED]:
            out[w.key] = dataclasses.replace(d, state=api.State.REROUTED,
                                             reason=Reason.RATE_LIMITED, message=why,
                                             model=fallback)
        else:
            out[w.key] = dataclasses.replace(d, model=fallback,
                                             message=f"{d.message}; {why}")
    return out


def first_fallback(catalog: Catalog, allowed: Container[str] | None, model: str,
                   limited: Container[str], exclude: str | None = None) -> str | None:
    """The first of ``model``'s rate-limit fallbacks in the catalog that the budget allows,
    that is not rate-limited itself and is not ``exclude``; None when there is none."""
    entry = catalog.models.get(model)
    return next((f for f in (entry.rate_limit_fallbacks if entry else ())
                 if f in catalog.models and f not in limited and f != exclude
                 and (allowed is None or f in allowed)), None)


def describe(limited: Iterable[RateLimited]) -> str:
    """The models and where their traffic goes, for a status condition's message.

    Without the shares, which move with every request: they are in
    ``status.rateLimited``, which a moving share alone does not rewrite.
    """
    parts = []
    for r in limited:
        where = (f"rerouted to {r.fallback}" if r.fallback else
                 "no fallback is allowed and free, not rerouted")
        parts.append(f"{r.model} answers 429 to more than the threshold allows: {where}")
    return "; ".join(parts)
