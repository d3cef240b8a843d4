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

import datetime as dt
import json
from collections.abc import Iterable
from decimal import Decimal
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from token_budget.errors import QueryFailed
from token_budget.policy.inputs import SpendSeries, SpendSnapshot
from token_budget.policy.planner import Plan
from token_budget.policy.sources import Kind, ResolvedSource


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
