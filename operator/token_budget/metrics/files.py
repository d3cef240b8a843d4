"""Spend from files, for ``tokenbudget simulate``: JSON snapshots or Prometheus text.

JSON (every number of tokens; ``cost`` optional, a decimal string)::

    {
      "recentSeconds": 600,
      "windows": {
        "Month@Europe/Berlin": [{"namespace": "team-search", "workload": "agent-0",
                                  "model": "gpt-4o", "input": 1200000, "output": 300000,
                                  "cachedInput": 0, "labels": {"team": "search"}}],
        "*": [ ...series used for every window not listed... ]
      },
      "recent": [ ...series over the last recentSeconds, for forecasts... ]
    }

Window keys are as the planner names them: ``24h``, ``7d``, ``Day@UTC``,
``Month@Europe/Berlin``. Prometheus text exposition (what ``curl /metrics``
prints) is read as counters: each counter's value counts in every window.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
from collections.abc import Iterable
from decimal import Decimal
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from token_budget.errors import QueryFailed
from token_budget.policy.costs import CostPlan, recent_window
from token_budget.policy.inputs import CostQuery, CostSeries, SpendSeries, SpendSnapshot
from token_budget.policy.planner import Plan
from token_budget.policy.sources import Kind, ResolvedSource
from token_budget.policy.windows import WindowKey


def _series(raw: dict[str, Any]) -> SpendSeries:
    cost = raw.get("cost")
    return SpendSeries(
        namespace=str(raw["namespace"]),
        workload=str(raw.get("workload", "")),
        model=str(raw.get("model", "")),
        input_tokens=float(raw.get("input", 0)),
        output_tokens=float(raw.get("output", 0)),
        cached_input_tokens=float(raw.get("cachedInput", 0)),
        cost=Decimal(str(cost)) if cost is not None else None,
        labels=tuple(sorted((str(k), str(v)) for k, v in (raw.get("labels") or {}).items())),
    )


def load(path: Path, plan: Plan, now: dt.datetime) -> SpendSnapshot:
    """A snapshot for ``plan`` from a JSON or Prometheus-text file.

    Raises:
        QueryFailed: the file cannot be parsed (the message says where).
    """
    text = path.read_text()
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
            return _from_json(data, plan, now)
        except (ValueError, KeyError, TypeError) as exc:
            raise QueryFailed(f"{path}: not a valid spend snapshot: {exc}") from exc
    try:
        return _from_exposition(text, plan, now)
    except ValueError as exc:
        raise QueryFailed(f"{path}: not valid Prometheus text exposition: {exc}") from exc


def _from_json(data: dict[str, Any], plan: Plan, now: dt.datetime) -> SpendSnapshot:
    raw_windows: dict[str, list[dict[str, Any]]] = data.get("windows", {})
    fallback = [_series(s) for s in raw_windows.get("*", [])]
    parsed = {k: tuple(_series(s) for s in v) for k, v in raw_windows.items() if k != "*"}
    windows = {}
    for rs, key in plan.windows:
        windows[(rs, key)] = parsed.get(str(key), tuple(fallback))
    recent_series = tuple(_series(s) for s in data.get("recent", []))
    return SpendSnapshot(
        taken_at=now,
        windows=windows,
        recent={rs: recent_series for rs in plan.sources},
        recent_seconds=int(data.get("recentSeconds", 600)),
    )


def _from_exposition(text: str, plan: Plan, now: dt.datetime) -> SpendSnapshot:
    samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples]
    per_source = {rs: _fold(rs, samples, plan.group_labels.get(rs, ())) for rs in plan.sources}
    windows = {(rs, key): per_source[rs] for rs, key in plan.windows}
    return SpendSnapshot(taken_at=now, windows=windows,
                         recent={rs: () for rs in plan.sources})


def _fold(rs: ResolvedSource, samples: Iterable[Any], extra: tuple[str, ...]
          ) -> tuple[SpendSeries, ...]:
    acc: dict[tuple[str, str, str, tuple[tuple[str, str], ...]], dict[Kind, float]] = {}
    for kind, sel in rs.counters:
        for s in samples:
            if s.name != sel.metric or any(s.labels.get(k) != v for k, v in sel.matchers):
                continue
            key = (s.labels.get(rs.namespace_label, ""), s.labels.get(rs.workload_label, ""),
                   s.labels.get(rs.model_label, ""),
                   tuple((x, s.labels.get(x, "")) for x in extra))
            kinds = acc.setdefault(key, {})
            kinds[kind] = kinds.get(kind, 0.0) + float(s.value)
    return tuple(
        SpendSeries(namespace=ns, workload=wl, model=model,
                    input_tokens=k.get(Kind.INPUT, 0.0), output_tokens=k.get(Kind.OUTPUT, 0.0),
                    cached_input_tokens=k.get(Kind.CACHED_INPUT, 0.0),
                    cost=Decimal(repr(k[Kind.COST])) if Kind.COST in k else None,
                    labels=labels)
        for (ns, wl, model, labels), k in sorted(acc.items())
    )


# ---------------------------------------------------------------------------
# Cost sources (token_budget.policy.costs)
# ---------------------------------------------------------------------------


def load_costs(path: Path, plan: CostPlan, snapshot: SpendSnapshot) -> SpendSnapshot:
    """``snapshot`` with the cost plan's units from the same file.

    JSON: ``"costs": {"<metric>": {"<window>": [{"namespace": ..., "workload": ...,
    "units": 7200}], "*": [...every other window...]}}``; the burn-rate window
    (``10m``) only when named. Prometheus text: a counter's value counts in every
    window, a gauge's value as if held for the whole window; the burn rate is zero.

    Raises:
        QueryFailed: the file cannot be parsed (the message says where).
    """
    if not plan.windows:
        return snapshot
    text = path.read_text()
    recent, _ = recent_window(snapshot.recent_seconds)
    found: dict[tuple[CostQuery, WindowKey], tuple[CostSeries, ...]] = {}
    try:
        if text.lstrip().startswith("{"):
            raw: dict[str, dict[str, list[dict[str, Any]]]] = json.loads(text).get("costs", {})
            for key, (_, queries) in plan.windows.items():
                for q in queries:
                    by_window = raw.get(q.metric, {})
                    rows = by_window.get(str(key), [] if key == recent else by_window.get("*", []))
                    found[(q, key)] = tuple(CostSeries(str(r["namespace"]),
                                                       str(r.get("workload", "")),
                                                       float(r["units"])) for r in rows)
        else:
            samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples]
            for key, (seconds, queries) in plan.windows.items():
                for q in queries:
                    found[(q, key)] = () if key == recent else _units(q, samples, seconds)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise QueryFailed(f"{path}: cost sources cannot be read: {exc}") from exc
    return dataclasses.replace(snapshot, costs=found)


def _matches(labels: dict[str, str], matchers: tuple[tuple[str, str, str], ...]) -> bool:
    for label, op, value in matchers:
        have = labels.get(label, "")
        ok = {"=": have == value, "!=": have != value}.get(op)
        if ok is None:
            ok = re.fullmatch(value, have) is not None
            ok = ok if op == "=~" else not ok
        if not ok:
            return False
    return True


def _units(q: CostQuery, samples: Iterable[Any], seconds: int) -> tuple[CostSeries, ...]:
    acc: dict[tuple[str, str], float] = {}
    for s in samples:
        if s.name != q.metric or not _matches(s.labels, q.matchers):
            continue
        key = (s.labels.get(q.namespace_label, ""), s.labels.get(q.workload_label, ""))
        acc[key] = acc.get(key, 0.0) + float(s.value) * (seconds if q.gauge else 1)
    return tuple(CostSeries(ns, wl, v) for (ns, wl), v in sorted(acc.items()))
