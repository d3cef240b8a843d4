"""A budget's status from its decisions: pure, so "write only when changed" is exact.

:func:`budget_status` builds the whole status (conditions included, because a
merge-patch replaces arrays whole) and :func:`changed` says whether it differs
from what the API holds, ignoring ``lastEvaluationTime`` until the heartbeat
is due, so a quiet evaluation writes nothing.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any

from token_budget.api import conditions as cond
from token_budget.api import v1alpha1 as api
from token_budget.api.types import format_money, utc
from token_budget.policy import engine, partitions, ratelimits
from token_budget.policy.decisions import SEVERITY, Decision
from token_budget.policy.inputs import BudgetKey, Gap, Memory, ScopeKey
from token_budget.policy.ratesources import RateLimited


def _time(value: dt.datetime | None) -> str | None:
    return utc(value).strftime("%Y-%m-%dT%H:%M:%SZ") if value is not None else None


def memory_of(budget: api.Budget, key_of: Any) -> dict[ScopeKey, Memory]:
    """What the engine remembers of a budget, read back from its status."""
    st = budget.status
    if st is None or st.state is None:
        return {}
    budget_key = key_of(budget)
    limited: dict[str, list[tuple[str, dt.datetime]]] = {}
    for r in st.rate_limited:
        limited.setdefault(r.namespace or "", []).append((r.model, r.since or EPOCH))
    out = {ScopeKey(budget_key): Memory(st.state, st.last_spend_time,
                                        tuple(limited.get("", ())))}
    for ns in st.namespaces:
        out[ScopeKey(budget_key, ns.namespace)] = Memory(
            ns.state, st.last_spend_time, tuple(limited.get(ns.namespace, ())))
    if budget.spec.partition is not None:
        for sk, state, spent in partitions.remembered(st, budget_key):
            out.setdefault(sk, Memory(state, st.last_spend_time if spent else None))
    return out


EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _rows(rows: Any) -> list[tuple[str, RateLimited]]:
    """``status.rateLimited`` rows read back (namespace, verdict)."""
    out = []
    for r in rows or ():
        if not isinstance(r, dict) or not r.get("model"):
            continue
        since = r.get("since")
        try:
            when = dt.datetime.fromisoformat(str(since).replace("Z", "+00:00")) \
                if since else EPOCH
        except ValueError:
            when = EPOCH
        out.append((str(r.get("namespace") or ""), RateLimited(
            model=str(r["model"]), share_percent=int(r.get("sharePercent") or 0), requests=0,
            fallback=r.get("fallback"), since=when)))
    return out


def _judged(decisions: Sequence[Decision]) -> dict[Pair, RateLimited]:
    """The pairs an evaluation finds rate-limited: one per (namespace, model), as every
    partition of a namespace reads the same share."""
    found: dict[Pair, RateLimited] = {}
    for d in decisions:
        if d.rate_limit_on:
            for r in d.rate_limited:
                found.setdefault((d.scope.namespace, r.model), r)
    return found


def _unknown(decisions: Sequence[Decision]) -> set[str]:
    """The namespaces whose spend cannot be read (decided by ``whenSpendUnknown``, so
    their 429 share is not judged: what they remembered stays as it was; Hold keeps the
    reroute's annotation in place)."""
    judged = {d.scope.namespace for d in decisions if d.rate_limit_on}
    return {d.scope.namespace for d in decisions if not d.spend_known} - judged


def _rate_limit(status: dict[str, Any], decisions: Sequence[Decision],
                conds: tuple[cond.Condition, ...], now: dt.datetime, generation: int | None,
                old: dict[str, Any]) -> tuple[cond.Condition, ...]:
    """``rateLimited`` and the RateLimited condition, for a budget whose trigger is on."""
    on = [d for d in decisions if d.rate_limit_on]
    unknown = _unknown(decisions)
    rows = [(ns, r) for (ns, _), r in _judged(decisions).items()]
    rows += [(ns, r) for ns, r in _rows(old.get("rateLimited")) if ns in unknown]
    if rows:
        status["rateLimited"] = [
            {k: v for k, v in {
                "model": r.model, "namespace": ns or None, "sharePercent": r.share_percent,
                "fallback": r.fallback, "since": _time(r.since)}.items() if v is not None}
            for ns, r in rows[:RATE_LIMITED_SHOWN]]
    if not on:
        if any(not d.spend_known for d in decisions):
            return conds  # not judged: the condition stays as it was
        return tuple(c for c in conds if c.type != cond.RATE_LIMITED)
    errors = sorted({d.rate_limit_error for d in on if d.rate_limit_error})
    probing = sorted({(d.scope.namespace, m) for d in on for m, _ in d.rate_limit_probing})
    said = "; ".join(f"{ns + ': ' if ns else ''}{m} probing: too few requests to judge since "
                     "its reroute lifted, rerouted again if it still answers 429"
                     for ns, m in probing)
    if rows:
        text = "; ".join(f"{ns + ': ' if ns else ''}{ratelimits.describe([r])}"
                         for ns, r in rows)
        if len(rows) > RATE_LIMITED_SHOWN:
            text = (f"{len(rows)} (namespace, model) pairs rate-limited, "
                    f"status.rateLimited lists {RATE_LIMITED_SHOWN}: {text}")
        if errors:
            text += "; " + "; ".join(errors)
        if said:
            text += "; " + said
        rerouted = any(r.fallback for _, r in rows)
        return cond.set_condition(conds, cond.RATE_LIMITED, True,
                                  cond.Reason.RATE_LIMITED if rerouted else cond.Reason.NO_FALLBACK,
                                  text[:1000], now, generation)
    if said:
        if errors:
            said += "; " + "; ".join(errors)
        return cond.set_condition(conds, cond.RATE_LIMITED, False, PROBING, said[:1000], now,
                                  generation)
    if errors:
        return cond.set_condition(
            conds, cond.RATE_LIMITED, cond.Status.UNKNOWN, cond.Reason.RATE_LIMIT_UNKNOWN,
            ("the share of 429 answers cannot be read (" + "; ".join(errors)
             + "); no rate-limit reroute")[:1000], now, generation)
    return cond.set_condition(conds, cond.RATE_LIMITED, False, cond.Reason.NOT_RATE_LIMITED,
                              "no model's share of 429 answers is over the threshold", now,
                              generation)


#: Rows ``status.rateLimited`` lists (the CRD's bound): it is for people; the hysteresis
#: and the Events read :class:`RateMemory`, which holds every pair.
RATE_LIMITED_SHOWN = 20

#: The RateLimited condition's reason while rate-limited models are tried again (half-open).
PROBING = "Probing"

Pair = tuple[str, str]  # (namespace, model); "" for a scope without its own namespace


class RateMemory:
    """The rate-limit verdicts of every budget's (namespace, model) pairs, kept in process.

    ``status.rateLimited`` shows :data:`RATE_LIMITED_SHOWN` rows; the hysteresis of the
    pairs past them (and their Events) must not depend on that bound, so the operator
    remembers every pair between evaluations and :meth:`merged` adds them to the memory
    read back from the statuses. Only an operator restart forgets the pairs a status does
    not list (then they need the full threshold again, and their Events compare with the
    status's rows).
    """

    def __init__(self) -> None:
        self._pairs: dict[BudgetKey, dict[Pair, RateLimited]] = {}
        # Pairs probing (lifted for too few requests to judge): their last verdict.
        self._probing: dict[BudgetKey, dict[Pair, RateLimited]] = {}

    def merged(self, memory: dict[ScopeKey, Memory]) -> dict[ScopeKey, Memory]:
        """``memory`` (read from statuses) with the remembered models it does not list
        (a probing model included: its hysteresis and ``since`` go on)."""
        for budget in self._pairs.keys() | self._probing.keys():
            pairs = {**self._probing.get(budget, {}), **self._pairs.get(budget, {})}
            for (ns, model), r in pairs.items():
                key = ScopeKey(budget, ns)
                m = memory.get(key)
                if m is None:
                    memory[key] = Memory(api.State.OK, None, ((model, r.since),))
                elif all(model != listed for listed, _ in m.rate_limited):
                    memory[key] = dataclasses.replace(
                        m, rate_limited=(*m.rate_limited, (model, r.since)))
        return memory

    def update(self, budget: BudgetKey, decisions: Sequence[Decision], old: dict[str, Any]
               ) -> list[tuple[str, str, str]]:
        """Remember an evaluation's verdicts of a budget; its Events (type, reason, message):
        ``RateLimited`` when a pair becomes rate-limited or its fallback changes,
        ``RateLimitRecovered`` when it no longer is. A namespace whose spend cannot be read
        is not judged: its pairs stay as they were. A pair probing (lifted only because too
        few requests were counted to judge it) is neither recovered nor announced, nor is
        its reroute when the probe finds it still rate-limited: a model that keeps
        answering 429 is announced once, not once per half-open cycle."""
        before = self._pairs.get(budget)
        if before is None:  # first evaluation since the operator started: the status's
            before = {(ns, r.model): r for ns, r in _rows(old.get("rateLimited"))}
        probed = self._probing.get(budget, {})
        after = _judged(decisions)
        probing: dict[Pair, RateLimited] = {}
        for d in decisions:
            for model, since in d.rate_limit_probing if d.rate_limit_on else ():
                pair = (d.scope.namespace, model)
                if pair not in after:
                    probing[pair] = before.get(pair) or probed.get(pair) or RateLimited(
                        model=model, share_percent=0, requests=0, fallback=None, since=since)
        unknown = _unknown(decisions)
        after.update({p: r for p, r in before.items() if p[0] in unknown})
        probing.update({p: r for p, r in probed.items() if p[0] in unknown})
        self._pairs[budget], self._probing[budget] = after, probing
        events: list[tuple[str, str, str]] = []
        for (ns, model), r in sorted(after.items()):
            was = before.get((ns, model)) or probed.get((ns, model))
            if was is not None and was.fallback == r.fallback:
                continue
            where = (f"its traffic goes to {r.fallback}" if r.fallback else
                     "no fallback is allowed and free: not rerouted")
            scope = f" in {ns}" if ns else ""
            events.append(("Warning", cond.Reason.RATE_LIMITED,
                           f"{model} is rate-limited{scope} ({r.share_percent}% of requests "
                           f"answered 429): {where}"))
        for (ns, model) in sorted((before.keys() | probed.keys()) - after.keys()
                                  - probing.keys()):
            scope = f" in {ns}" if ns else ""
            events.append(("Normal", "RateLimitRecovered",
                           f"{model} is no longer rate-limited{scope}: traffic goes back to it"))
        return events

    def keep_only(self, budgets: Iterable[BudgetKey]) -> None:
        """Forget the budgets that no longer exist."""
        wanted = set(budgets)
        self._pairs = {k: v for k, v in self._pairs.items() if k in wanted}
        self._probing = {k: v for k, v in self._probing.items() if k in wanted}


def partitioned_status(budget: api.Budget, decisions: Sequence[Decision], currency: str,
                       now: dt.datetime, enforced: int, old: dict[str, Any] | None,
                       autoscaled: tuple[int, int] = (0, 0),
                       dry_run: bool = False) -> dict[str, Any]:
    """:func:`budget_status` of a budget with ``spec.partition``.

    Conditions (MetricsAvailable, DataIncomplete, Enforcing) read every partition.
    The budget's own state, spend and windows are those of its unpartitioned
    partition (per namespace for a PerNamespace ClusterTokenBudget): one person
    Blocked does not make the budget Blocked for everyone. ``status.partitions``
    holds the bounded summary, and the message says how many are restricted.
    """
    partition = budget.spec.partition
    assert partition is not None
    status = budget_status(budget, decisions, currency, now, enforced, old, autoscaled,
                           dry_run)
    own = partitions.own(decisions)
    if not own:
        return status
    mine = budget_status(budget, own, currency, now, enforced, old, autoscaled, dry_run)
    for key in ("state", "reason", "message", "spend", "limit", "usedPercent", "windows",
                "namespaces", "projectedRunOutTime"):
        if key in mine:
            status[key] = mine[key]
        else:
            status.pop(key, None)
    summary = partitions.summary(partition, decisions)
    status["partitions"] = summary
    if summary["restricted"]:
        worst = summary["over"][0] if summary["over"] else None
        text = (f"{summary['restricted']} of {summary['count']} partitions by "
                f"{partition.label} restricted, {summary['blocked']} Blocked")
        if worst is not None:
            text += (f" (worst: {partitions.describe(partition, worst['value'])} "
                     f"{worst['state']} at {worst['usedPercent']}%)")
        status["message"] = f"{text}; {status.get('message', '')}"
    return status


def budget_status(budget: api.Budget, decisions: Sequence[Decision], currency: str,
                  now: dt.datetime, enforced: int, old: dict[str, Any] | None,
                  autoscaled: tuple[int, int] = (0, 0),
                  dry_run: bool = False) -> dict[str, Any]:
    """The full status of a budget after an evaluation.

    ``autoscaled`` counts the governed workloads scaled by an HPA and by KEDA,
    which Block handles differently (said in the Enforcing condition).
    ``dry_run`` is the operator's global ``--dry-run``: like a budget's own
    ``mode: DryRun``, Enforcing then says what would be, not what workloads carry.
    """
    old = old or {}
    generation = budget.metadata.generation
    old_conditions = (budget.status.conditions if budget.status else ())
    worst = max(decisions, key=lambda d: (SEVERITY[d.state], d.worst_window.used_percent
                                          if d.worst_window else Decimal(-1)), default=None)
    status: dict[str, Any] = {"observedGeneration": generation}
    conds = old_conditions
    if worst is None:
        status.update(state=api.State.OK.value, reason="NoNamespaces",
                      message="no namespace matches the namespaceSelector")
        conds = cond.set_condition(conds, cond.READY, True, "NoNamespaces",
                                   "the budget is valid; no namespace matches it yet", now,
                                   generation)
        conds = cond.set_condition(conds, cond.METRICS_AVAILABLE, cond.Status.UNKNOWN,
                                   "NoNamespaces", "nothing to read", now, generation)
        conds = cond.set_condition(conds, cond.ENFORCING, False, "NoNamespaces",
                                   "no workload is governed", now, generation)
        status["conditions"] = [c.model_dump(mode="json", by_alias=True) for c in conds]
        status["enforcedWorkloads"] = 0
        status["lastEvaluationTime"] = _time(now)
        return status

    status["state"] = worst.state.value
    status["reason"] = worst.reason
    status["message"] = worst.message
    w = worst.worst_window
    if w is not None:
        spend, limit = engine.describe(w, currency)
        status.update(spend=spend, limit=limit, usedPercent=int(w.used_percent))
        status["windows"] = [
            {k: v for k, v in {
                "window": u.window, "timeZone": u.time_zone if u.resets_at else None,
                "model": u.model,
                # A rolling window's start moves with every evaluation: derivable, not stored.
                "startTime": _time(u.start) if u.resets_at else None,
                "resetTime": _time(u.resets_at),
                "tokens": u.tokens, "cost": format_money(u.cost.quantize(Decimal("0.0001"))),
                "limitTokens": u.limit_tokens,
                "limitCost": format_money(u.limit_cost) if u.limit_cost is not None else None,
                "usedPercent": int(u.used_percent),
                "coveredPercent": int(u.covered * 100) if u.covered is not None else None,
                "costByKind": [{"kind": k, "name": n,
                                "cost": format_money(v.quantize(Decimal("0.0001")))}
                               for k, n, v in u.by_kind] or None,
            }.items() if v is not None}
            for u in worst.windows
        ]
    else:
        for key in ("spend", "limit", "usedPercent", "windows"):
            if key in old:
                status[key] = old[key]
    if len(decisions) > 1 or decisions[0].scope.namespace:
        status["namespaces"] = [
            {"namespace": d.scope.namespace, "state": d.state.value,
             "usedPercent": int(d.worst_window.used_percent) if d.worst_window else 0}
            for d in decisions
        ]
    run_outs = [d.run_out for d in decisions if d.run_out is not None]
    status["projectedRunOutTime"] = _time(min(run_outs)) if run_outs else None
    cpos = [d.cost_per_outcome for d in decisions if d.cost_per_outcome is not None]
    status["costPerOutcome"] = format_money(max(cpos).quantize(Decimal("0.0001"))) if cpos else None
    status["enforcedWorkloads"] = enforced
    ungoverned = sorted({u for d in decisions for u in d.ungoverned})
    if ungoverned:
        status["ungovernedWorkloads"] = ungoverned[:engine.UNGOVERNED_SHOWN]
    known = all(d.spend_known for d in decisions)
    # Only real series count: an empty answer for a scope that never had any is a new
    # scope, but one for a scope that had series before is an outage (see the engine).
    seen = any(d.series_seen for d in decisions)
    status["lastSpendTime"] = _time(now) if seen else old.get("lastSpendTime")
    status["lastEvaluationTime"] = _time(now)

    conds = cond.set_condition(conds, cond.READY, True, "Evaluated",
                               "the budget is valid and evaluated", now, generation)
    unmatched = sorted({d.unmatched for d in decisions if d.unmatched})
    if known and not seen and unmatched:
        # The source answers, but for other namespaces (or other matcher values): say
        # which, or a label that never names the namespace reads as "no spend yet" forever.
        conds = cond.set_condition(conds, cond.METRICS_AVAILABLE, True, "NoSeriesMatchScope",
                                   ("; ".join(unmatched)[:900] + "; counted as zero"), now,
                                   generation)
    elif known and not seen:
        conds = cond.set_condition(conds, cond.METRICS_AVAILABLE, True, "NoSpendYet",
                                   "Prometheus answered; no spend series exist yet for this "
                                   "scope, counted as zero", now, generation)
    elif known:
        conds = cond.set_condition(conds, cond.METRICS_AVAILABLE, True, "SpendRead",
                                   "spend was read for every window", now, generation)
    else:
        errors = sorted({d.spend_error or "" for d in decisions if not d.spend_known})
        reason = "QueryReturnedNoData" if any("no " in e and "series" in e for e in errors) \
            else "SpendUnavailable"
        conds = cond.set_condition(conds, cond.METRICS_AVAILABLE, False, reason,
                                   "; ".join(errors)[:1000], now, generation)
    partial = [(u.window, u.covered) for d in decisions for u in d.windows
               if u.covered is not None]
    gapped = _gaps(decisions)
    if partial:
        text = "; ".join(f"window {w}: {c * 100:.0f}% of it is still in Prometheus"
                         for w, c in sorted(set(partial)))
        conds = cond.set_condition(conds, cond.DATA_INCOMPLETE, True, "RetentionShorterThanWindow",
                                   f"{text}; spend is estimated from the covered part's rate "
                                   "(raise the retention or install the recording rules)",
                                   now, generation)
    elif gapped:
        conds = cond.set_condition(conds, cond.DATA_INCOMPLETE, True, "ScrapeGap", gapped,
                                   now, generation)
    elif known:
        conds = cond.set_condition(conds, cond.DATA_INCOMPLETE, False, "WindowCovered",
                                   "Prometheus holds every window whole", now, generation)
    unpriced = sorted({m for d in decisions for m in d.unpriced_models})
    if unpriced:
        status["message"] += f"; models without a catalog price count as zero cost: " \
                             f"{', '.join(unpriced)}"
    dry = dry_run or any(d.dry_run for d in decisions)
    restrictive = SEVERITY[worst.state] > 0
    if dry:
        conds = cond.set_condition(conds, cond.ENFORCING, False, "DryRun",
                                   f"DryRun: would be {worst.state.value}; no workload is "
                                   "changed", now, generation)
    elif restrictive:
        text = f"{enforced} workload(s) carry the {worst.state.value} directive"
        hpa, keda = autoscaled
        if worst.state is api.State.BLOCKED and hpa:
            text += (f"; {hpa} scaled by a HorizontalPodAutoscaler, which stays idle while "
                     "its target is at zero replicas")
        if worst.state is api.State.BLOCKED and keda:
            text += (f"; {keda} scaled by KEDA, paused with autoscaling.keda.sh/"
                     "paused-replicas=0 until the block is lifted")
        conds = cond.set_condition(conds, cond.ENFORCING, True, worst.state.value, text, now,
                                   generation)
    else:
        conds = cond.set_condition(conds, cond.ENFORCING, False, cond.Reason.WITHIN_BUDGET,
                                   f"{enforced} workload(s) governed; nothing restricted", now,
                                   generation)
    conds = _rate_limit(status, decisions, conds, now, generation, old)
    status["conditions"] = [c.model_dump(mode="json", by_alias=True) for c in conds]
    return status


def invalid_status(budget_body: dict[str, Any], problems: Sequence[str],
                   now: dt.datetime) -> dict[str, Any]:
    """Status of a budget whose spec cannot be used: Ready=False, nothing enforced."""
    meta = budget_body.get("metadata") or {}
    generation = meta.get("generation")
    raw = (budget_body.get("status") or {}).get("conditions") or []
    old = []
    for c in raw:
        try:
            old.append(cond.Condition.model_validate(c))
        except ValueError:
            continue
    message = "; ".join(problems)[:2000]
    conds = cond.set_condition(old, cond.READY, False, "InvalidSpec", message, now, generation)
    return {
        "observedGeneration": generation,
        "reason": "InvalidSpec",
        "message": message,
        "conditions": [c.model_dump(mode="json", by_alias=True) for c in conds],
        "lastEvaluationTime": _time(now),
    }


# Fields that move with every evaluation while agents spend (or merely while Prometheus
# extrapolates a counter over a growing window): refreshed with a real change or once the
# heartbeat is due, so that a quiet evaluation writes nothing.
_VOLATILE = ("lastEvaluationTime", "lastSpendTime", "spend", "message", "usedPercent",
             "projectedRunOutTime", "costPerOutcome")
_VOLATILE_WINDOW = ("tokens", "cost", "usedPercent")


def _significant(d: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in d.items() if k not in _VOLATILE and v is not None}
    if isinstance(out.get("partitions"), dict):
        # Used percentages move with every read, and with them the ranks of partitions close
        # to each other: which partitions are listed, in which state, is what matters.
        p = out["partitions"]
        out["partitions"] = {**p, **{k: sorted(
            tuple(sorted((f, str(v)) for f, v in e.items() if f != "usedPercent"))
            for e in p.get(k) or ()) for k in ("top", "over")}}
    if isinstance(out.get("namespaces"), list):
        out["namespaces"] = [{k: v for k, v in n.items() if k != "usedPercent"}
                             for n in out["namespaces"]]
    if isinstance(out.get("rateLimited"), list):  # the share moves with every request
        out["rateLimited"] = [{k: v for k, v in r.items() if k != "sharePercent"}
                              for r in out["rateLimited"]]
    if isinstance(out.get("windows"), list):
        out["windows"] = [{k: v for k, v in w.items() if k not in _VOLATILE_WINDOW}
                          for w in out["windows"]]
    return out


def changed(old: dict[str, Any] | None, new: dict[str, Any], now: dt.datetime,
            heartbeat_seconds: int) -> bool:
    """Whether ``new`` must be written over ``old``.

    A change of state, reason, conditions, limits, namespaces or enforced
    workloads is written at once. Spend figures (and the used percentage) move
    with every evaluation while agents spend, and even while they do not:
    ``increase()`` extrapolates young series differently at every query. They
    are refreshed when something significant changes or the heartbeat is due;
    the live figures are on the operator's ``/metrics`` at all times.
    """
    old = old or {}
    if _significant(old) != _significant(new):
        return True
    last = old.get("lastEvaluationTime")
    if not last:
        return True
    try:
        then = dt.datetime.fromisoformat(str(last).replace("Z", "+00:00"))
    except ValueError:
        return True
    return (utc(now) - then).total_seconds() >= heartbeat_seconds


def status_patch(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """A merge-patch from ``old`` to ``new``: keys that vanished become null."""
    patch = dict(new)
    for key in old or {}:
        if key not in new:
            patch[key] = None
    return {"status": patch}


def _gaps(decisions: Sequence[Decision]) -> str:
    """The DataIncomplete message for windows whose start a scrape gap hid ("" if none)."""
    found: dict[str, Gap] = {}
    for d in decisions:
        for u in d.windows:
            if u.gap is not None:
                found[u.window] = found[u.window] + u.gap if u.window in found else u.gap
    texts = []
    for window, g in sorted(found.items()):
        if g.unknown:
            texts.append(f"window {window}: {g.unknown} series have no sample within "
                         "the horizon before its start (a scrape gap longer than the window "
                         "or 3 h, or a Prometheus younger than the window); only the spend "
                         "seen inside the window counts")
        if g.bridged:
            texts.append(f"window {window}: a scrape gap covers the start of {g.bridged} "
                         "series; their spend during the gap counts in full")
    return "; ".join(texts)


#: Partition transitions one ``PartitionsChanged`` Event names (the rest are counted).
TRANSITIONS_SHOWN = 10


def partition_transitions(partition: api.Partition, old: dict[str, Any] | None,
                          decisions: Sequence[Decision]) -> tuple[str, str] | None:
    """One Event (type, message) for every partition whose state changed, or None.

    The old states are those the status listed (``top`` and ``over``); a
    partition it did not list was Ok, unless ``over`` was cut short (then it is
    not compared). One Event per evaluation whatever the number of partitions,
    naming the first :data:`TRANSITIONS_SHOWN` (most severe first).
    """
    before: dict[tuple[str, str], str] = {}
    listed = ((old or {}).get("partitions") or {})
    for key in ("top", "over"):
        for e in listed.get(key) or ():
            before[(e.get("namespace") or "", e.get("value") or "")] = str(e.get("state"))
    # Past PARTITIONS_OVER_SHOWN, a partition not listed may have been restricted: unknown,
    # so not announced (rather than announced again at every evaluation).
    truncated = int(listed.get("overCount") or 0) > len(listed.get("over") or ())
    moved = []
    for d in decisions:
        was = before.get((d.scope.namespace, d.scope.partition or ""))
        if was is None and truncated:
            continue
        was = was or api.State.OK.value
        if was != d.state.value:
            moved.append((d, was))
    if not moved:
        return None
    moved.sort(key=lambda m: -SEVERITY[m[0].state])
    texts = []
    for d, was in moved[:TRANSITIONS_SHOWN]:
        where = f" in {d.scope.namespace}" if d.scope.namespace else ""
        texts.append(f"{partitions.describe(partition, d.scope.partition or '')}{where} "
                     f"{was} -> {d.state.value}")
    if len(moved) > TRANSITIONS_SHOWN:
        texts.append(f"and {len(moved) - TRANSITIONS_SHOWN} more")
    severe = any(SEVERITY[d.state] >= SEVERITY[api.State.REROUTED] for d, _ in moved)
    return ("Warning" if severe else "Normal"), "; ".join(texts)
