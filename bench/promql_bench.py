"""Target 2: PromQL queries per evaluation are constant in the number of budgets.

First, pure: ``planner.plan(...).query_count`` for 10, 1,000 and 10,000 budgets of the
engine benchmark's mix (three windows, three time zones).

Then, side by side against a real Prometheus holding S spend series
(``llm_tokens_total``: S/3 (namespace, pod, model) triples x 3 token types, spread over
N namespaces; backfilled with ``promtool tsdb create-blocks-from openmetrics``: 26 hours
at a 15-minute step plus the last 20 minutes at a 1-minute step), N TokenBudgets (one
per namespace; a 24h token cap, a Day and a Month money cap in UTC):

* batched: the operator's own path, ``PrometheusSource.collect(plan)``: one query per
  window and one for the burn rate, grouped by namespace, pod and model; measured twice:
  on the raw counters only (the sample guard off), and with the hourly buckets of the
  operator's recording rule backfilled too (``rules/token-budget.rules.yaml``: long
  windows then read 26 recorded samples a series plus less than an hour of raw ones);
* per budget (KEDA-style): the same PromQL narrowed to the budget's namespace
  (``namespace="ns-i"`` added to every counter selector), one query per budget and
  window plus one for its burn rate, run one after the other as a scaler would.

Both read the same Prometheus at the same instant (the end of the backfilled data); a
few namespaces are cross-checked so the two paths are known to read the same spend.
"""

from __future__ import annotations

import datetime as dt
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import Figure, Report, load, wait_for_quiet
from bench.engine_bench import NOW
from bench.engine_bench import world as engine_world
from harness.prometheus import Prometheus, find_binary
from token_budget.api import v1alpha1 as api
from token_budget.metrics import promql
from token_budget.metrics.prometheus import PrometheusSource, to_series
from token_budget.policy import planner, sources
from token_budget.policy.sources import ResolvedSource, Selector

MODELS = ("gpt-4o", "gpt-5-mini", "claude-sonnet-4-5", "gemini-2.5-flash")
STEP = 900
HOURS = 26
FINE_MINUTES = 20
RULE = "tokenbudget:spend_counters:increase1h"


def budgets(n_namespaces: int) -> list[api.Budget]:
    out: list[api.Budget] = []
    for i in range(n_namespaces):
        out.append(api.TokenBudget.model_validate({
            "apiVersion": api.API_VERSION, "kind": "TokenBudget",
            "metadata": {"name": "team", "namespace": f"ns-{i}", "generation": 1},
            "spec": {"limits": [{"window": "24h", "tokens": 5_000_000},
                                {"window": "Day", "cost": "50.00"},
                                {"window": "Month", "cost": "1000.00"}]}}))
    return out


def write_openmetrics(path: Path, n_series: int, n_namespaces: int, end: int,
                     recorded: bool = False) -> int:
    """The backfill file; returns the number of samples written.

    ``recorded``: instead of the raw counters, the hourly buckets the operator's
    recording rule (``rules/token-budget.rules.yaml``) would have written, the last one
    ten minutes before ``end``.
    """
    start = end - HOURS * 3600
    fine = end - FINE_MINUTES * 60
    if recorded:
        last_rule = end - 600
        stamps = list(range(last_rule, start + 3600, -3600))[::-1]
    else:
        stamps = list(range(start, fine, STEP)) + list(range(fine, end + 1, 60))
    triples = n_series // 3
    written = 0
    with path.open("w") as f:
        name = RULE if recorded else "llm_tokens"
        f.write(f"# TYPE {name} {'gauge' if recorded else 'counter'}\n")
        for k in range(triples):
            labels = (f'namespace="ns-{k % n_namespaces}",pod="agent-{k // n_namespaces}",'
                      f'model="{MODELS[k % len(MODELS)]}"')
            per_second = (k % 97 + 1) * 10.0
            for token_type, share in (("input", 1.0), ("output", 0.1), ("cached_input", 0.05)):
                rate = per_second * share
                if recorded:
                    head = f'{RULE}{{{labels},tb_kind="{token_type}"}} {rate * 3600:.0f} '
                    f.write("".join(f"{head}{t}\n" for t in stamps))
                else:
                    head = f'llm_tokens_total{{{labels},token_type="{token_type}"}} '
                    f.write("".join(f"{head}{rate * (t - start):.0f} {t}\n" for t in stamps))
                written += len(stamps)
        f.write("# EOF\n")
    return written


def _blocks(data: Path) -> int:
    return sum(1 for d in data.iterdir() if d.is_dir() and d.name.startswith("01"))


def backfill(prom: Prometheus, n_series: int, n_namespaces: int, end: int, recorded: bool,
             report: Report) -> None:
    """Write the series as TSDB blocks, (re)start Prometheus, let it compact them."""
    prom.stop()
    source = prom.workdir / "history.om"
    t0 = time.monotonic()
    samples = write_openmetrics(source, n_series, n_namespaces, end, recorded)
    prom.data_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(find_binary("promtool")), "tsdb", "create-blocks-from", "openmetrics",
                    "-q", str(source), str(prom.data_dir)], check=True, capture_output=True,
                   timeout=1800)
    source.unlink()
    took = time.monotonic() - t0
    before = _blocks(prom.data_dir)
    prom.start()
    # Prometheus compacts the 2-hour blocks promtool writes (as it would its own) about
    # a minute after start; querying before that would read 13 blocks per series.
    t1 = time.monotonic()
    while time.monotonic() - t1 < 240 and _blocks(prom.data_dir) >= before:
        time.sleep(5)
    time.sleep(5)
    what = "recorded hourly buckets" if recorded else "raw counter series"
    report.note("promql", f"backfilled {n_series:,} {what} ({samples:,} samples) in "
                          f"{took:.0f} s; {before} blocks compacted to "
                          f"{_blocks(prom.data_dir)} in {time.monotonic() - t1:.0f} s")


def narrowed(rs: ResolvedSource, namespace: str) -> ResolvedSource:
    """The source with ``namespace="..."`` on every counter (one budget's own query)."""
    counters = tuple((kind, Selector(sel.metric, (*sel.matchers, (rs.namespace_label,
                                                                   namespace))))
                     for kind, sel in rs.counters)
    return ResolvedSource(rs.preset, rs.namespace_label, rs.workload_label, rs.model_label,
                          counters)


def per_budget(src: PrometheusSource, objs: list[api.Budget], now: dt.datetime
               ) -> dict[str, dict[str, float]]:
    """Every budget's own queries, one after the other; tokens per (namespace, window)."""
    out: dict[str, dict[str, float]] = {}
    for b in objs:
        ns = b.metadata.namespace or ""
        rs = narrowed(sources.resolve(b.spec.source), ns)
        p = planner.plan([b], now)
        row = out.setdefault(ns, {})
        for (_, key), seconds in p.windows.items():
            items = src.query(promql.spend(rs, seconds), now)
            row[str(key)] = sum(s.tokens for s in to_series(rs, items))
        items = src.query(promql.spend(rs, p.recent_seconds), now, "recent")
        row["recent"] = sum(s.tokens for s in to_series(rs, items))
    return out


def batched(report: Report, src: PrometheusSource, objs: list[api.Budget], now: dt.datetime,
            label: str, contended: bool, runs: int = 3) -> tuple[float, int, Any]:
    plan = planner.plan(objs, now)
    walls: list[float] = []
    queries: list[int] = []
    cpu = 0.0
    snap: Any = None
    for _ in range(runs):
        q0 = src.stats.queries
        t0, c0 = time.monotonic(), time.process_time()
        snap = src.collect(plan, now)
        walls.append(round(time.monotonic() - t0, 2))
        cpu = time.process_time() - c0
        queries.append(src.stats.queries - q0)
        problems = {**snap.errors, **getattr(snap, "window_errors", {})}
        if problems:
            raise RuntimeError(f"collect() failed: {problems}")
    wall = statistics.median(walls)
    report.add(Figure("promql", f"batched, {label}: collect() of {len(objs):,} budgets "
                      "(wall, median of 3)", wall, "s", contended=contended,
                      note=f"runs {walls} s with {queries} queries (the first also reads "
                           f"when the rules last ran); operator CPU per run (JSON decode + "
                           f"folding) {cpu:.2f} s"))
    report.add(Figure("promql", f"batched, {label}: queries per evaluation",
                      statistics.median(queries), "count", contended=contended))
    return wall, int(statistics.median(queries)), snap


def run(report: Report, quick: bool, wait_seconds: float = 300) -> None:
    first = 0
    for n in (10, 1_000, 10_000):
        w, _ = engine_world(n, 0)
        count = planner.plan(w.budgets, NOW).query_count
        report.add(Figure("promql", f"queries per evaluation, {n:,} budgets (plan)", count,
                          "count", target="constant", met=None,
                          note="3 windows in 3 time zones + burn rate; "
                               "constant in the number of budgets"))
        if n == 10:
            first = count
        elif n == 10_000:
            report.add(Figure("promql", "queries per evaluation constant, 10 -> 10,000 budgets",
                              count - first, "count", target="== 0", met=count == first))

    n_series = 10_000 if quick else 100_000
    n_namespaces = 1_000 if quick else 10_000
    end = (int(time.time()) // 60 - 2) * 60
    now = dt.datetime.fromtimestamp(end, dt.UTC)
    work = Path(tempfile.mkdtemp(prefix="tbo-bench-promql-"))
    quiet = wait_for_quiet(0 if quick else wait_seconds)
    prom = Prometheus(workdir=work, retention="400d")
    try:
        objs = budgets(n_namespaces)
        backfill(prom, n_series, n_namespaces, end, False, report)
        # Raw series only, the sample guard off: every window reads the raw counters.
        raw = PrometheusSource(prom.url, timeout_seconds=300, max_samples=0)
        raw_wall, raw_queries, snap = batched(report, raw, objs, now, "raw series",
                                              not quiet)
        q0 = raw.stats.queries
        t0 = time.monotonic()
        load0 = load()
        own = per_budget(raw, objs, now)
        single = time.monotonic() - t0
        single_queries = raw.stats.queries - q0
        kb = {"benchmark": "promql", "contended": not quiet}
        report.add(Figure(**kb, name=f"per budget (KEDA-style): {n_namespaces:,} budgets "
                          "(wall)", value=single, unit="s",
                          note=f"{single_queries:,} queries, "
                               f"{single / single_queries * 1000:.1f} ms each; load at start "
                               f"{load0}"))
        report.add(Figure(**kb, name="per budget: queries per evaluation",
                          value=single_queries, unit="count"))
        report.add(Figure(**kb, name="per budget / batched (raw): wall time",
                          value=single / raw_wall, unit="x", target="> 1",
                          met=single > raw_wall))
        report.add(Figure(**kb, name="per budget / batched (raw): queries",
                          value=single_queries / raw_queries, unit="x"))
        # Both paths must read the same spend.
        agree = checked = 0
        for (_, key), series in snap.windows.items():
            totals: dict[str, float] = {}
            for s in series:
                totals[s.namespace] = totals.get(s.namespace, 0.0) + s.tokens
            for ns in list(own)[:: max(1, len(own) // 20)]:
                checked += 1
                if abs(totals.get(ns, 0.0) - own[ns][str(key)]) <= 1e-6 * max(1.0, totals[ns]):
                    agree += 1
        report.note("promql", f"cross-check batched vs per budget: {agree}/{checked} "
                              "(namespace, window) totals agree")
        # The recording rule's hourly buckets as well: the operator's path for long windows.
        backfill(prom, n_series, n_namespaces, end, True, report)
        ruled = PrometheusSource(prom.url, timeout_seconds=300)
        rules_wall, rules_queries, _ = batched(report, ruled, objs, now,
                                               "with recording rules", not quiet)
        report.add(Figure(**kb, name="per budget / batched (rules): wall time",
                          value=single / rules_wall, unit="x", target="> 1",
                          met=single > rules_wall))
        report.add(Figure(**kb, name="per budget / batched (rules): queries",
                          value=single_queries / rules_queries, unit="x"))
    finally:
        prom.close()
        shutil.rmtree(work, ignore_errors=True)
