"""Monthly windows Prometheus can answer: exact spend with and without recording rules.

35 days of history for 300 series (10 namespaces x 30 agent pods, each a
linear counter at its own rate) are backfilled into a real Prometheus with
``promtool tsdb create-blocks-from openmetrics``; the project's recording rules
(``rules/token-budget.rules.yaml``) are backfilled over the same history with
``promtool tsdb create-blocks-from rules``. Then the operator's Prometheus
source must give the exact month-to-date and rolling-30-day spend per
namespace from the raw series, the same through the rules (the recorded
buckets and the raw series meet to the millisecond where the rule ran), and
the rules must cut the samples a query loads (Prometheus's own ``stats=all``)
by more than an order of magnitude.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.prometheus import Prometheus, backfilled, find_binary
from token_budget.api import v1alpha1 as api
from token_budget.metrics import promql
from token_budget.metrics.prometheus import PrometheusSource
from token_budget.policy import planner, sources
from token_budget.policy.windows import WindowKey

REPO = Path(__file__).resolve().parents[2]
STEP = 300  # 5-minute samples: 3 million for 300 series over 35 days
END = dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0) - dt.timedelta(hours=3)
START = END - dt.timedelta(days=35)
NAMESPACES = [f"long-{i}" for i in range(10)]
PODS = 30
COUNTERS = sources.resolve(api.SpendSource())


def rate(ns: int, pod: int) -> int:
    """Tokens an hour of one agent pod."""
    return 100 * (ns + 1) + pod


def expected(ns: int, seconds: float) -> int:
    return round(sum(rate(ns, p) for p in range(PODS)) * seconds / 3600)


def openmetrics() -> str:
    lines = ["# TYPE llm_tokens counter"]
    times = []
    t = START
    while t <= END:
        times.append(t)
        t += dt.timedelta(seconds=STEP)
    for n, ns in enumerate(NAMESPACES):
        for p in range(PODS):
            labels = f'namespace="{ns}",pod="agent-{p}",model="gpt-4o",token_type="input"'
            for t in times:
                value = rate(n, p) * (t - START).total_seconds() / 3600
                lines.append(f"llm_tokens_total{{{labels}}} {value:.3f} {int(t.timestamp())}")
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    with backfilled(tmp_path_factory.mktemp("long"), openmetrics(), "90d") as prom:
        yield prom


def _budget(window: str) -> api.TokenBudget:
    return api.TokenBudget.model_validate({
        "apiVersion": api.API_VERSION, "kind": "TokenBudget",
        "metadata": {"name": "b", "namespace": NAMESPACES[0]},
        "spec": {"limits": [{"window": window, "tokens": 1}]}})


def spend_per_namespace(source: PrometheusSource, window: str) -> dict[str, int]:
    plan = planner.plan([_budget(window)], END)
    snap = source.collect(plan, END)
    assert not snap.errors and not snap.window_errors, (snap.errors, snap.window_errors)
    out: dict[str, float] = {}
    for s in snap.windows[(COUNTERS, WindowKey.of(window, "UTC"))]:
        out[s.namespace] = out.get(s.namespace, 0.0) + s.tokens
    return {k: round(v) for k, v in out.items()}


def samples_loaded(prom: Prometheus, query: str, at: dt.datetime) -> int:
    params = urllib.parse.urlencode({"query": query, "time": f"{at.timestamp():.3f}",
                                     "stats": "all"})
    with urllib.request.urlopen(f"{prom.url}/api/v1/query?{params}", timeout=60) as r:
        body: dict[str, Any] = json.load(r)
    return int(body["data"]["stats"]["samples"]["totalQueryableSamples"])


def test_month_to_date_and_rolling_30_days_are_exact_with_and_without_recording_rules(
        history: Prometheus, tmp_path: Path) -> None:
    month_start = END.replace(day=1, hour=0)
    mtd = (END - month_start).total_seconds()
    want_mtd = {ns: expected(i, mtd) for i, ns in enumerate(NAMESPACES)}
    want_30d = {ns: expected(i, 30 * 86400) for i, ns in enumerate(NAMESPACES)}

    raw = PrometheusSource(history.url, scrape_interval_seconds=STEP)
    assert raw.last_recorded(COUNTERS, END) is None, "no rules yet: the raw series are read"
    assert spend_per_namespace(raw, "Month") == want_mtd
    assert spend_per_namespace(raw, "30d") == want_30d
    raw_samples = samples_loaded(history, promql.spend(COUNTERS, 30 * 86400), END)
    one_read = samples_loaded(history, "last_over_time(llm_tokens_total[30d])", END)
    # With a sample limit below what one read of the window holds, the raw query is not
    # sent, and the budget is told to install the rules: no timeout, no wrong number.
    limited = PrometheusSource(history.url, scrape_interval_seconds=STEP,
                               max_samples=one_read // 2)
    snap = limited.collect(planner.plan([_budget("30d")], END), END)
    assert "install the recording rules" in snap.window_errors[(COUNTERS, WindowKey("30d"))]

    # Backfill the recording rules over the same history, then restart to load the blocks.
    rules_out = tmp_path / "rules-blocks"
    subprocess.run([str(find_binary("promtool")), "tsdb", "create-blocks-from", "rules", "-q",
                    f"--start={int(START.timestamp())}", f"--end={int(END.timestamp())}",
                    f"--url={history.url}", f"--output-dir={rules_out}",
                    str(REPO / "rules" / "token-budget.rules.yaml")],
                   check=True, capture_output=True, timeout=600)
    history.stop()
    for block in rules_out.iterdir():
        shutil.move(str(block), history.data_dir / block.name)
    history.start()

    ruled = PrometheusSource(history.url, scrape_interval_seconds=STEP)
    last = ruled.last_recorded(COUNTERS, END)
    assert last is not None and (END - last).total_seconds() < 2 * 3600
    # Recorded buckets meet the raw series at two joins (where the window starts, where the
    # rule last ran), to the millisecond: the same spend as the raw reading.
    for window, want in (("Month", want_mtd), ("30d", want_30d)):
        assert spend_per_namespace(ruled, window) == want, window
    recorded_samples = samples_loaded(history, promql.recorded(COUNTERS, 30 * 86400), last)
    print(f"\n30-day window: {raw_samples:,} samples raw, {recorded_samples:,} from the rules")
    assert recorded_samples * 10 < raw_samples, \
        "hourly buckets must read an order of magnitude fewer samples than 5-minute raw ones"
    # ... so the same limit that refused the raw query now lets the budget be read.
    snap = PrometheusSource(history.url, scrape_interval_seconds=STEP,
                            max_samples=one_read // 2).collect(
        planner.plan([_budget("30d")], END), END)
    assert not snap.window_errors and (COUNTERS, WindowKey("30d")) in snap.windows
