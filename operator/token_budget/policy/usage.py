"""Usage per limit: a scope's spend over each window, its share of the limit, its run-out.

Raises :class:`~token_budget.policy.scope.Unknown` when a window was not read.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from token_budget.policy import costs
from token_budget.policy.decisions import WindowUsage
from token_budget.policy.ladders import HUNDRED, percent
from token_budget.policy.scope import ScopeInput, Unknown
from token_budget.policy.windows import WindowKey

_ZERO = Decimal(0)
_TEN_YEARS = Decimal(10 * 365 * 86400)  # a run-out further away is no forecast


def read(s: ScopeInput) -> tuple[list[WindowUsage], bool, set[str]]:
    """Usage per limit, whether any series exists, unpriced models."""
    # What does not change from limit to limit is read once; per-scope work measured
    # with the spend already summed (10k budgets x 100k series): 0.35 s -> 0.32 s.
    usages: list[WindowUsage] = []
    seen = False
    unpriced: set[str] = set()
    namespaces = s.namespaces
    spec = s.spec
    matchers = spec.spend_matchers
    source = s.spend_source
    recent = source.recent
    context = s.context
    recent_s = context.recent_seconds
    snapshot = s.snapshot
    retention = snapshot.retention_seconds
    now = context.now_utc
    labels = context.needed_labels(spec)
    cost_sources = spec.cost_sources or s.catalog.cost_sources
    for lim in spec.limits:
        model = lim.model
        window = source.window(lim.window, lim.time_zone, labels)
        spend = window.spend
        if spend is None:
            why = snapshot.window_errors.get((s.source, window.key))
            raise Unknown(why or f"spend over {window.key} was not read")
        # Whether the scope has spend series at all is asked without the limit's model
        # filter: a cap on a model nobody uses is zero spend, not an exporter gone missing.
        seen = seen or spend.seen(namespaces, matchers)
        counted = spend.total(namespaces, matchers, model)
        s.counted.append(counted)
        tokens, cost = counted.tokens, counted.cost
        by_kind: tuple[tuple[str, str, Decimal], ...] = ()
        token_rate, cost_rate = recent.total(namespaces, matchers, model).per_second(recent_s)
        if model is None and cost_sources:
            # Cost sources add to money limits without a model (see policy.costs). A limit
            # on tokens only does not need them: unread, it shows token cost alone.
            try:
                # Cost sources are read per window, whatever labels spend was read apart by.
                by_kind, extra_rate = _cost_sources(
                    s, WindowKey.of(lim.window, lim.time_zone), cost)
            except Unknown:
                if lim.cost is not None:
                    raise
            else:
                cost = sum((v for _, _, v in by_kind), _ZERO)
                cost_rate += extra_rate
        if counted.unpriced:
            unpriced |= counted.unpriced
        start, resets, span = window.start, window.resets, window.span
        covered = None
        if retention:
            s.timed = True
            if span > retention:
                # Prometheus no longer holds the window's oldest part: estimate the whole
                # window from the covered part's rate rather than count the rest as zero.
                covered = Decimal(retention) / Decimal(span)
                tokens = float(Decimal(tokens) / covered)
                cost = cost / covered
                by_kind = tuple((k, n, v / covered) for k, n, v in by_kind)
        # The tighter limit (the first of equal ones) and the nearest run-out: only their
        # values are read (a run-out as float seconds).
        used = _ZERO
        secs = None
        limit_tokens, limit_cost = lim.tokens, lim.cost
        if limit_tokens:
            used = Decimal(round(tokens)) * HUNDRED / limit_tokens
            if token_rate > 0:
                secs = max(_ZERO, Decimal(limit_tokens) - Decimal(tokens)) / token_rate
        if limit_cost:
            pct = percent(cost, limit_cost)
            if not limit_tokens or pct > used:
                used = pct
            if cost_rate > 0:
                left = max(_ZERO, limit_cost - cost) / cost_rate
                if secs is None or left < secs:
                    secs = left
        run_out = None
        if secs is not None:
            s.timed = True
            if secs < _TEN_YEARS:
                candidate = now + dt.timedelta(seconds=float(secs))
                if resets is None or candidate < resets:
                    run_out = candidate
        gap = None
        gaps = snapshot.gaps.get((s.source, window.key)) if snapshot.gaps else None
        if gaps:
            for ns in namespaces:
                g = gaps.get(ns)
                if g is not None:
                    gap = g if gap is None else gap + g
        usages.append(WindowUsage(
            window=lim.window, time_zone=lim.time_zone, model=model, start=start,
            resets_at=resets, tokens=int(round(tokens)), cost=cost,
            limit_tokens=limit_tokens, limit_cost=limit_cost,
            used_percent=used, run_out=run_out,
            covered=covered, gap=gap, by_kind=by_kind,
        ))
    if not seen:
        # A calendar window that began a moment ago holds no samples yet; the burn-rate
        # query's series still show that the source is alive and the scope reports.
        seen = recent.seen(namespaces, matchers)
    return usages, seen, unpriced


def _cost_sources(s: ScopeInput, key: WindowKey, token_cost: Decimal
                  ) -> tuple[tuple[tuple[str, str, Decimal], ...], Decimal]:
    """The window's money by kind, token cost first, and the cost sources' burn rate.

    Raises:
        Unknown: a cost source's window or burn rate was not read.
    """
    found = costs.merged(s.spec, s.catalog)
    index = s.context.costs
    try:
        spent = index.costs(found, key, s.namespaces, s.cost_keep)
        recent_key, recent_seconds = costs.recent_window(s.snapshot.recent_seconds)
        recent = index.costs(found, recent_key, s.namespaces, s.cost_keep)
    except costs.Unread as why:
        raise Unknown(str(why)) from None
    rate = costs.total(recent) / Decimal(recent_seconds)
    return costs.breakdown(token_cost, spent), rate


def top_model(s: ScopeInput) -> dict[str, str]:
    """The model of each workload's largest series over every limit's spend."""
    top: dict[str, tuple[float, str]] = {}
    for counted in s.counted:
        for series in counted.series:
            best = top.get(series.workload)
            if best is None or series.tokens > best[0]:
                top[series.workload] = (series.tokens, series.model)
    return {w: m for w, (_, m) in top.items()}

