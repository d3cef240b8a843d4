"""PromQL instant queries answered by Prometheus's own engine, in memory.

``promtool test rules`` loads series given in its expanding notation (``"1+2x10"``,
``NaN``, ``stale``, ``_`` for a missing sample) and evaluates an expression at an instant;
asked to expect a sample that cannot exist, it prints what the expression returned. That
gives the operator's query texts the real engine (NaN, staleness, ``resets()``, range
boundaries of this Prometheus version) at ~50 ms a query, without a server. The series
start at Unix time 0 (:data:`EPOCH`).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from harness.prometheus import find_binary
from token_budget.metrics.prometheus import PrometheusSource, ResultItem

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_ITEM = re.compile(r'\{([^{}]*)\} (\S+?)(?:,|$)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

Series = list[tuple[str, str]]  # (series selector, promtool's expanding notation)


def evaluate(series: Series, interval: str, expr: str, at: dt.datetime) -> list[ResultItem]:
    """What ``expr`` returns at ``at`` over ``series`` (samples ``interval`` apart)."""
    t = (at - EPOCH).total_seconds()
    doc = {"rule_files": [], "evaluation_interval": "1m", "tests": [{
        "interval": interval,
        "input_series": [{"series": s, "values": v} for s, v in series],
        "promql_expr_test": [{"expr": expr, "eval_time": f"{round(t * 1000)}ms",
                              "exp_samples": [{"labels": '{__never__="x"}', "value": 0}]}],
    }]}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "t.yml"
        path.write_text(json.dumps(doc))
        out = subprocess.run([str(find_binary("promtool")), "test", "rules", str(path)],
                             capture_output=True, text=True, check=False)
    text = out.stdout + out.stderr
    found = re.search(r"got: (.*)", text)
    if not found:
        raise RuntimeError(f"promtool did not evaluate {expr!r}:\n{text}")
    got = found.group(1).strip()
    if got == "nil":
        return []
    return [{"metric": dict(_LABEL.findall(m.group(1))), "value": [t, m.group(2)]}
            for m in _ITEM.finditer(got)]


class PromtoolSource(PrometheusSource):
    """The operator's Prometheus adapter, its queries answered by promtool over ``series``;
    ``texts`` keeps every query it sent."""

    def __init__(self, series: Series, interval: str = "15s", **kw: Any) -> None:
        super().__init__("http://127.0.0.1:1", **kw)
        self.series, self.interval = series, interval
        self.texts: list[str] = []

    def query(self, text: str, at: dt.datetime, kind: str = "spend",
              matrix: bool = False) -> list[ResultItem]:
        self.texts.append(text)
        return evaluate(self.series, self.interval, text, at)
