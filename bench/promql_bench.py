"""Target 2: PromQL queries per evaluation are constant in the number of budgets.

First, pure: ``planner.plan(...).query_count`` for 10, 1,000 and 10,000 budgets of the
engine benchmark's mix (three windows, three time zones).

Then, side by side against a real Prometheus holding S spend series
(``llm_tokens_total``: S/3 (namespace, pod, model) triples x 3 token types, spread over
N namespaces; backfilled with ``promtool tsdb create-blocks-from openmetrics``: 26 hours
at a 15-minute step, at a 1-minute step in the last 20 minutes and in the 10 minutes
before each window's start), N TokenBudgets (one
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

Figures of 2026-12-01 11:00 UTC (Prometheus's own evalTotalTime per evaluation, summed;
"next" is every evaluation after the first; figures equal to the digit in every pair):

* 20,000 series, 2,000 budgets, this bench (``TBO_BENCH_PROMQL_SIZE=20000,2000``, load
  2-4): with the rules, previous 32.2 s, new first 4.91 s, new next 4.16 s (4 queries,
  1,919,808 samples); raw series, previous 30.0 s, new next 9.28 s.
* The reading of 610f379 (the first step dividing by its fall test, the buckets read
  every evaluation) against this one, same Prometheus and instants (with the rules):
  20,000 series (load 3.2), next 6.97 / 5.38 s -> 3.11 / 2.79 s; 100,000 series and
  10,000 budgets (load 1.2-1.6), first 30.1 s -> 18.7 s, next 29.3 / 24.0 s -> 9.11 /
  9.05 s (4 queries, 9,599,904 samples): the three raw parts that move with now (the
  tail, the rolling 24 h head, the burn rate), about 3 s each.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import Figure, Report, load, wait_for_quiet
from bench.engine_bench import NOW
from bench.engine_bench import world as engine_world
from harness.prometheus import Prometheus, find_binary
from token_budget.api import v1alpha1 as api
from token_budget.metrics import promql
from token_budget.metrics.prometheus import PrometheusSource, gaps_of, to_series
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
        # As scraped every minute around each window's start (24 h ago, midnight), as a
        # healthy Prometheus would have it: a start value within the 5-minute lookback.
        # Without that band every series looks as if a scrape gap hid its start.
        day = end - end % 86400
        band = {t for edge in (end - 86400, day) for t in range(edge - 600, edge + 61, 60)}
        stamps = sorted({*range(start, fine, STEP), *(t for t in band if start < t < fine),
                         *range(fine, end + 1, 60)})
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


class _Later(concurrent.futures.Future[Any]):
    """A future computed when its result is asked for, in the asking thread."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__()
        self._fn = fn

    def result(self, timeout: float | None = None) -> Any:
        if not self.done():
            self.set_result(self._fn())
        return super().result(timeout)


class PreviousSource(PrometheusSource):
    """The reading before issue 16, for the side-by-side figures: one whole exact query
    (:func:`promql.spend`) per window and per raw part, none shared or kept, and the
    recorded buckets read for every window; and every query in a row (the burn rate
    after the windows, not beside them)."""

    def collect(self, plan: planner.Plan, now: dt.datetime) -> Any:
        return self._collect(plan, now, _Later(lambda: self._recent(plan, now)), {})

    def read_spend(self, rs: ResolvedSource, seconds: int, at: dt.datetime, kind: str = "spend",
              extra: tuple[str, ...] = (), narrow: tuple[tuple[str, str], ...] = (),
              horizon: int | None = None, part: object = None) -> list[Any]:
        return list(self.query(promql.spend(rs, seconds, extra, horizon_seconds=horizon,
                                            narrow=narrow), at, kind))

    def _part(self, rs: ResolvedSource, seconds: float, at: dt.datetime, now: dt.datetime,
              horizon: int, part: object, extra: tuple[str, ...] = ()) -> tuple[Any, Any]:
        items = self.read_spend(rs, seconds, at, extra=extra, horizon=horizon)
        return to_series(rs, items, extra), gaps_of(rs, items)

    def _recorded(self, rs: ResolvedSource, span: int, last: dt.datetime, part: object,
                  extra: tuple[str, ...] = ()) -> tuple[Any, Any]:
        return self._read(rs, promql.recorded(rs, span, extra), last, "recorded", extra)

    # A rolling window's head too: one whole exact query, not two levels.
    _head = _part


def watch(src: PrometheusSource) -> list[dict[str, Any]]:
    """Ask Prometheus for its own figures (``stats=all``) with every query of ``src``;
    the returned list fills with each answer's ``data.stats``."""
    seen: list[dict[str, Any]] = []
    session = src._prom._session

    def hook(resp: Any, *args: Any, **kwargs: Any) -> None:
        try:
            seen.append(resp.json()["data"]["stats"])
        except (ValueError, KeyError, TypeError):
            pass

    session.params = {"stats": "all"}
    session.hooks["response"].append(hook)
    query = src.query

    def kinded(text: str, at: dt.datetime, kind: str = "spend", matrix: bool = False) -> Any:
        n = len(seen)
        try:
            return query(text, at, kind, matrix)
        finally:
            for st in seen[n:]:
                st["kind"] = kind  # what the query was for: spend, head, recent, alive...

    src.query = kinded  # type: ignore[method-assign]
    return seen


def by_kind(stats: list[dict[str, Any]]) -> str:
    """Prometheus's time per kind of query, largest first."""
    out: dict[str, float] = {}
    for st in stats:
        kind = st.get("kind", "?")
        out[kind] = out.get(kind, 0.0) + float(st["timings"]["evalTotalTime"])
    return ", ".join(f"{k} {v:.2f} s" for k, v in sorted(out.items(), key=lambda x: -x[1]))


def evaluate(report: Report, src: PrometheusSource, seen: list[dict[str, Any]],
             objs: list[api.Budget], at: dt.datetime, label: str, contended: bool) -> Any:
    """One ``collect()`` at ``at``: wall time, and Prometheus's own query time and samples
    (``seen``: what :func:`watch` collects for ``src``)."""
    n0, q0 = len(seen), src.stats.queries
    t0, c0 = time.monotonic(), time.process_time()
    snap = src.collect(planner.plan(objs, at), at)
    wall = time.monotonic() - t0
    cpu = time.process_time() - c0
    problems = {**snap.errors, **snap.window_errors}
    if problems:
        raise RuntimeError(f"collect() failed: {problems}")
    stats = seen[n0:]
    prom = sum(float(st["timings"]["evalTotalTime"]) for st in stats)
    samples = sum(int(st["samples"]["totalQueryableSamples"]) for st in stats)
    kb = {"benchmark": "promql", "contended": contended}
    report.add(Figure(**kb, name=f"{label}: Prometheus query time per evaluation "
                      "(its own evalTotalTime, summed)", value=prom, unit="s",
                      note=f"{src.stats.queries - q0} queries, {samples:,} samples loaded; "
                           f"wall {wall:.1f} s; operator CPU {cpu:.2f} s; by kind: "
                           f"{by_kind(stats)}"))
    report.add(Figure(**kb, name=f"{label}: samples loaded per evaluation", value=samples,
                      unit="count"))
    return snap


def totals(snap: Any) -> dict[Any, tuple[float, float, float]]:
    """Tokens per (window, namespace) and kind, the burn rate's too: what must not change."""
    out: dict[Any, list[float]] = {}
    parts = [(key, series) for (_, key), series in snap.windows.items()]
    parts += [("recent", series) for series in snap.recent.values()]
    for key, series in parts:
        for s in series:
            row = out.setdefault((str(key), s.namespace), [0.0, 0.0, 0.0])
            row[0] += s.input_tokens
            row[1] += s.output_tokens
            row[2] += s.cached_input_tokens
    return {k: (v[0], v[1], v[2]) for k, v in out.items()}


def side_by_side(report: Report, url: str, objs: list[api.Budget], now: dt.datetime,
                 label: str, contended: bool, max_samples: int) -> None:
    """The previous reading and this one at the same instants, figures compared to the digit.

    The new source evaluates at ``now`` (its first evaluation: nothing kept yet) and 30 s
    later (what every further evaluation costs); the previous one at the later instant.
    """
    later = now + dt.timedelta(seconds=30)
    old = PreviousSource(url, timeout_seconds=900, max_samples=max_samples)
    new = PrometheusSource(url, timeout_seconds=900, max_samples=max_samples)
    seen_old, seen_new = watch(old), watch(new)
    evaluate(report, new, seen_new, objs, now, f"{label}, new, first evaluation", contended)
    a = evaluate(report, old, seen_old, objs, later, f"{label}, previous", contended)
    b = evaluate(report, new, seen_new, objs, later, f"{label}, new, next evaluations",
                 contended)
    ta, tb = totals(a), totals(b)
    same = sum(1 for k in ta if tb.get(k) == ta[k])
    ga = {str(k): v for k, v in a.gaps.items()}
    gb = {str(k): v for k, v in b.gaps.items()}
    report.add(Figure("promql", f"{label}: (window, namespace) totals equal to the digit, "
                      "new vs previous", same, "count", target=f"== {len(ta)}",
                      met=same == len(ta) == len(tb) and ga == gb, contended=contended,
                      note=f"{len(ta):,} totals; gap rows equal: {ga == gb}"))
    if max_samples:  # with the rules: the burn rate from the tails, as an operator runs
        steady(report, url, objs, now, later, label, contended, max_samples, tb)


def steady(report: Report, url: str, objs: list[api.Budget], now: dt.datetime,
           later: dt.datetime, label: str, contended: bool, max_samples: int,
           want: dict[Any, tuple[float, float, float]]) -> None:
    """A source that has evaluated every 30 s for the burn rate's length, at ``later``:
    every settled part is kept by then (the "next evaluations" above had one evaluation
    before theirs). Once with the burn rate read by its query, once taken from the tails
    (``metrics.accruals``): the tail of 600 s ago and this one, no query; its figures
    must equal those of the source that read the burn rate (``want``), to the digit
    (integer counters)."""
    for derive in (False, True):
        src = PrometheusSource(url, timeout_seconds=900, max_samples=max_samples)
        if not derive:  # the same evaluations, the burn rate read by its query
            src._accruals.before = lambda *args, **kwargs: None  # type: ignore[method-assign]
        seen = watch(src)
        t = later - dt.timedelta(seconds=630)
        while t < later:
            src.collect(planner.plan(objs, t), t)
            t += dt.timedelta(seconds=30)
        derived = src.stats.derived_rates
        ends = [st for st in seen if st.get("kind") == "head end"]
        if derive and ends:
            # Read at the first two evaluations (kept once they agree), then once an hour.
            each = sum(float(st["timings"]["evalTotalTime"]) for st in ends) / 2
            report.add(Figure("promql", f"{label}: the rolling head's end, read twice per "
                              "rule run (Prometheus query time, each read)", each, "s",
                              contended=contended,
                              note=f"{len(ends)} queries in the 10 minutes; "
                                   f"{2 * each / 120:.3f} s per evaluation at one every 30 s"))
        snap = evaluate(report, src, seen, objs, later,
                        f"{label}, new, after 10 minutes of evaluations every 30 s, burn rate "
                        + ("from the tails" if derive else "read by its query"), contended)
    got = totals(snap)
    same = sum(1 for k in want if got.get(k) == want[k])
    report.add(Figure("promql", f"{label}: totals of the burn rate from the tails equal to "
                      "the digit", same, "count", target=f"== {len(want)}",
                      met=same == len(want) == len(got) and src.stats.derived_rates > derived,
                      contended=contended,
                      note=f"{len(want):,} totals, windows and burn rate; burn rates taken from "
                           f"the tails in that evaluation: {src.stats.derived_rates - derived}"))


def per_budget_run(report: Report, raw: PrometheusSource, objs: list[api.Budget],
                   now: dt.datetime, contended: bool) -> None:
    q0 = raw.stats.queries
    t0 = time.monotonic()
    load0 = load()
    per_budget(raw, objs, now)
    single = time.monotonic() - t0
    single_queries = raw.stats.queries - q0
    report.add(Figure("promql", f"per budget (KEDA-style): {len(objs):,} budgets (wall)",
                      single, "s", contended=contended,
                      note=f"{single_queries:,} queries, {single / single_queries * 1000:.1f} "
                           f"ms each; load at start {load0}"))


#: (spend series, namespaces with a budget each). Under a load of 10-12 on 2 cores the
#: full size's raw 24 h window outlasts Prometheus's own 2-minute query timeout; the
#: environment variable TBO_BENCH_PROMQL_SIZE="20000,2000" runs another size.
FULL = (100_000, 10_000)
QUICK = (10_000, 1_000)
#: The per-budget (KEDA-style) comparison takes minutes at 10,000 budgets; its figures
#: (437 s, 40,000 queries) are from 2026-11-23 and did not depend on this reading.
PER_BUDGET = False


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

    n_series, n_namespaces = QUICK if quick else FULL
    if os.environ.get("TBO_BENCH_PROMQL_SIZE"):  # "20000,2000": series, namespaces
        n_series, n_namespaces = (int(x) for x in os.environ["TBO_BENCH_PROMQL_SIZE"].split(","))
    end = (int(time.time()) // 60 - 2) * 60
    now = dt.datetime.fromtimestamp(end, dt.UTC)
    work = Path(tempfile.mkdtemp(prefix="tbo-bench-promql-"))
    quiet = wait_for_quiet(0 if quick else wait_seconds)
    prom = Prometheus(workdir=work, retention="400d")
    try:
        objs = budgets(n_namespaces)
        backfill(prom, n_series, n_namespaces, end, False, report)
        # Raw series only, the sample guard off: every window reads the raw counters.
        side_by_side(report, prom.url, objs, now, "raw series", not quiet, 0)
        if PER_BUDGET:
            per_budget_run(report, PrometheusSource(prom.url, timeout_seconds=300,
                                                    max_samples=0), objs, now, not quiet)
        # The recording rule's hourly buckets as well: the operator's path for long windows.
        backfill(prom, n_series, n_namespaces, end, True, report)
        side_by_side(report, prom.url, objs, now, "with recording rules", not quiet,
                     50_000_000)
        report.note("promql", f"load at the end {load()}")
    finally:
        prom.close()
        shutil.rmtree(work, ignore_errors=True)
