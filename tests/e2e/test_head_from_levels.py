"""A rolling window's head from two levels equals its exact reading, on the real Prometheus.

A rolling window read through the recording rules starts with a raw head, from the
window's start to its first hourly bucket, whose start moves every evaluation. The source
reads it as the level at the head's end (a rule run, read once per run) minus the level
at its start, and reads exactly only the (namespace, workload) pairs where that is not
the exact reading (``metrics.heads``). Here a real Prometheus holds 27 hours of scrapes
with every shape the check must send to the exact reading inside the hour before the
head's end (a pod born, one gone, a reset, a fall across a NaN sample, a scrape gap, a
second model's series that resets beside a steady one, a second exporter's series born
beside a steady one, one gone as another is born) and those it may read from
levels (steady counters at several phases, an idle one, one scraped every two minutes, a
float counter). One source evaluates a rolling 24 h window every 61 s across the hour the
head's start sweeps, and at instants whose head starts exactly on a sample; another reads
each head exactly (the two-step reading), nothing else different. Every window's rows,
figures and gap rows must be equal, to the digit (to the last bits for the float counter).

Prometheus only, no control plane.
"""

from __future__ import annotations

import datetime as dt
import math
import time
import uuid
from collections.abc import Iterator

import pytest

from harness.exporter import AgentExporter
from harness.prometheus import Prometheus, backfilled
from harness.sources import NotedSource, rolling_day_plan
from token_budget.api import v1alpha1 as api
from token_budget.metrics import promql
from token_budget.metrics.prometheus import PrometheusSource, gaps_of, to_series
from token_budget.policy import sources
from token_budget.policy.inputs import SpendSeries

COUNTERS = sources.resolve(api.SpendSource())
HOUR = 3600
AT = int(dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0).timestamp()) - HOUR
LAST = AT - HOUR + 0.512  # the rule's last run (a hash-chosen phase, to the millisecond)
END = LAST - 23 * HOUR  # the 24 h window's first bucket starts here: the head's end
BASE = AT - 27 * HOUR
KINDS = (("input", 1), ("output", 3), ("cached_input", 5))
#: pod -> (scrape interval, phase)
PODS = {"steady-a": (15, 7.0), "steady-b": (15, 11.25), "sparse": (120, 3.0),
        "idle": (15, 2.0), "fraction": (15, 5.5), "born": (15, 4.0), "gone": (15, 6.0),
        "resets": (15, 8.0), "nan": (15, 9.0), "gap": (15, 10.0), "mixed": (15, 12.0),
        "early-gone": (15, 1.0), "stops": (15, 3.5), "twin": (15, 13.0), "swap": (15, 14.0)}
#: Pods with two series a counter and model (two exporters: ``instance`` differs): the
#: twin's second is born in the hour, the swap's first gone and its second born there
#: (as many series at the start as at the end, not the same ones).
INSTANCES = {"twin": ("a", "b"), "swap": ("old", "new")}
GAP = (END - 2200, END - 1700)  # the gap pod's target down
#: Pods whose head may be read exactly: the check sends those that fell or are gone in
#: the hour before its end; a head's start finds the born one and the gap's missing; the
#: sparse pod's newest sample is exactly a head's start once.
EXACT = {"born", "gone", "resets", "nan", "gap", "mixed", "sparse", "twin", "swap"}


def times(pod: str, instance: str = "0") -> list[float]:
    every, phase = PODS[pod]
    out = []
    t = BASE + phase
    while t <= AT:
        alive = not ((pod == "born" and t < END - 2000) or (pod == "gone" and t > END - 1500)
                     or (pod == "gap" and GAP[0] <= t < GAP[1])
                     or (pod == "early-gone" and t > END - 5000)
                     or (pod == "stops" and t > END - 10)
                     or ((pod, instance) == ("twin", "b") and t < END - 2000)
                     or ((pod, instance) == ("swap", "old") and t > END - 1500)
                     or ((pod, instance) == ("swap", "new") and t < END - 1000))
        if alive:
            out.append(t)
        t += every
    return out


def points(pod: str, model: str, share: int, instance: str = "0") -> list[tuple[float, str]]:
    """(time, value) of one counter series."""
    out: list[tuple[float, str]] = []
    value = 0.0
    rate = 7 * share + len(pod) + len(instance)
    for t in times(pod, instance):
        if pod == "idle":
            value = 42.0 * share
        elif pod == "fraction":
            value += 0.1 * share
        elif (pod == "resets" and END - 1000 <= t < END - 985) or \
                (pod == "mixed" and model == "m2" and END - 800 <= t < END - 785):
            value = float(share)  # restarted
        elif pod == "nan" and END - 2500 <= t < END - 2485:
            out.append((t, "NaN"))
            value = 5.0 * share  # below the value before the NaN: a fall, not a reset
            continue
        else:
            value += rate
        out.append((t, repr(value) if pod == "fraction" else str(int(value))))
    return out


def models(pod: str) -> tuple[str, ...]:
    return ("m", "m2") if pod in ("steady-b", "mixed") else ("m",)


def openmetrics() -> str:
    lines = ["# TYPE llm_tokens counter"]
    up: dict[str, list[str]] = {}
    for pod, (every, phase) in PODS.items():
        for instance in INSTANCES.get(pod, ("0",)):
            target = f"{pod}-{instance}:9000"
            for model in models(pod):
                for kind, share in KINDS:
                    labels = (f'namespace="ns",pod="{pod}",model="{model}",token_type="{kind}",'
                              f'job="agents",instance="{target}"')
                    lines += [f"llm_tokens_total{{{labels}}} {v} {t:.3f}"
                              for t, v in points(pod, model, share, instance)]
            # Each target while its series live; the gap pod's down (0) through its gap, and
            # the twin's second down before its series is born: the exact reading cannot
            # tell it born, and counts only the growth it saw.
            down = {"gap": GAP, "twin": (BASE, END - 2000) if instance == "b" else None}[pod] \
                if pod in ("gap", "twin") else None
            up[target] = [f'up{{job="agents",instance="{target}"}} '
                          f'{0 if down and down[0] <= t < down[1] else 1} {t:.3f}'
                          for t in (times(pod, instance) if down is None else
                                    [BASE + phase + every * i
                                     for i in range(int((AT - BASE - phase) // every) + 1)])]
    lines.append("# TYPE up gauge")
    lines += [line for target in sorted(up) for line in up[target]]
    # The rule's hourly buckets: both sources read the same ones (and the same tail), so
    # their figures need not be right, only there, for the rule's last run to be found.
    lines.append(f"# TYPE {promql.rule_name(COUNTERS)} gauge")
    run = LAST - 26 * HOUR
    while run <= LAST:
        for kind, _ in KINDS:
            lines.append(f'{promql.rule_name(COUNTERS)}{{namespace="ns",pod="steady-a",'
                         f'model="m",tb_kind="{kind}"}} 1 {run:.3f}')
        run += HOUR
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def prom(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    with backfilled(tmp_path_factory.mktemp("heads"), openmetrics(), "30d") as server:
        yield server


class _Exact(PrometheusSource):
    """The reading before: every head read exactly (the two-step reading)."""

    def _head(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return self._part(*args, **kwargs)


def _rows(series: tuple[SpendSeries, ...]) -> dict[tuple[str, str], SpendSeries]:
    return {(s.workload, s.model): s for s in series}


def _instants() -> list[float]:
    """Evaluation instants: the head's start sweeps the hour before its end every 61 s,
    down to 5 s before it (after the newest sample of a pod that stopped there), and
    starts exactly on samples (of a steady pod; and the newest of a pod scraped every two
    minutes, which is then the group's newest sample: read exactly)."""
    sweep = [LAST + 1 + 61 * i for i in range(59)] + [LAST + 3595]
    on_samples = [t + 24 * HOUR for t in times("steady-a") if END - HOUR < t < END][::40]
    sparse_last = max(t for t in times("sparse") if t <= END)
    return sorted({*sweep, *on_samples, sparse_last + 24 * HOUR})


def test_the_head_from_two_levels_is_the_exact_reading(prom: Prometheus) -> None:
    levels = NotedSource(prom.url)
    exact = _Exact(prom.url)
    narrowed_pods: set[str] = set()
    from_levels = checks_sent = 0
    for t in _instants():
        now = dt.datetime.fromtimestamp(t, dt.UTC)
        levels.sent.clear()
        got = levels.collect(rolling_day_plan(now), now)
        want = exact.collect(rolling_day_plan(now), now)
        assert not got.errors and not want.errors, (got.errors, want.errors)
        assert got.gaps == want.gaps, t - LAST
        (key,) = want.windows
        mine, theirs = _rows(got.windows[key]), _rows(want.windows[key])
        assert mine.keys() == theirs.keys(), (t - LAST, sorted(mine), sorted(theirs))
        for row, s in theirs.items():
            if row[0] == "fraction":
                for a, b in zip(
                        (mine[row].input_tokens, mine[row].output_tokens,
                         mine[row].cached_input_tokens),
                        (s.input_tokens, s.output_tokens, s.cached_input_tokens), strict=True):
                    assert math.isclose(a, b, rel_tol=1e-12), (t - LAST, row, a, b)
            else:
                assert mine[row] == s, (t - LAST, row)
        checks_sent += [text for _, text in levels.sent].count(promql.head_checks(COUNTERS))
        heads = [text for kind, text in levels.sent if kind == "head"]
        if heads:
            from_levels += 1
        # The whole head is never read exactly: only the pairs that need it, named.
        spends = [text for kind, text in levels.sent if kind == "spend"]
        for text in spends:
            if 'pod=~"' in text:
                named = text.split('pod=~"')[1].split('"')[0].split("|")
                narrowed_pods.update(named)
    assert from_levels == len(_instants())
    # Only pods the check sends (or that a head's start finds missing) are read exactly.
    assert EXACT - {"gap"} <= narrowed_pods <= EXACT, narrowed_pods
    # The end's levels and checks were read twice (kept once two reads agreed), not again.
    assert checks_sent == 2


def test_series_that_go_stale_and_come_back_are_read_as_the_exact_reading(
        prometheus: Prometheus, exporter: AgentExporter) -> None:
    """Live scrapes every second, so Prometheus writes the staleness markers a backfill
    cannot: a pod that stops exposing its series for a few seconds (marked stale, then
    back with the same values), one removed for good, one restarted, beside a steady one.
    Each head whose start sweeps those seconds, read from levels, equals the exact
    reading (figures and gap rows) for the namespace; a start inside the stale seconds
    finds the series missing and reads that pod exactly."""
    ns = f"heads-live-{uuid.uuid4().hex[:6]}"
    totals = {"steady": 0, "vanish": 0, "gone": 0, "restarts": 0}

    def spend() -> None:
        for pod in totals:
            if pod == "gone" and totals[pod] < 0:
                continue
            totals[pod] += 3
            exporter.add(ns, pod, "m", input=3, output=1)

    t0 = time.time()
    for i in range(36):
        if i == 10:
            exporter.remove(ns, "vanish")  # stale at the next scrape
        if i == 15:  # back, with the values it had: no reset
            exporter.add(ns, "vanish", "m", input=totals["vanish"], output=totals["vanish"] // 3)
        if i == 20:
            exporter.remove(ns, "gone")
            totals["gone"] = -1
        if i == 25:
            exporter.reset(ns, "restarts")
        if 10 <= i < 15:
            for pod in ("steady", "gone", "restarts"):
                exporter.add(ns, pod, "m", input=3, output=1)
        else:
            spend()
        time.sleep(1)
    end = dt.datetime.fromtimestamp(round(time.time() - 4, 3), dt.UTC)
    source = NotedSource(prometheus.url, scrape_interval_seconds=1)
    part = ("head", "live")
    exact_pods: set[str] = set()
    starts = [t0 - 3 + 0.37 * i for i in range(int((end.timestamp() - t0 + 3) / 0.37))]
    for s in starts:
        seconds = round(end.timestamp() - s, 3)
        source.sent.clear()
        got, got_gaps = source._head(COUNTERS, seconds, end, end, promql.MAX_HORIZON_SECONDS,
                                     part)
        items = source.query(promql.spend(COUNTERS, seconds,
                                          horizon_seconds=promql.MAX_HORIZON_SECONDS), end)
        want, want_gaps = to_series(COUNTERS, items), gaps_of(COUNTERS, items)
        assert [x for x in got if x.namespace == ns] == [x for x in want if x.namespace == ns], \
            round(s - t0, 2)
        assert got_gaps.get(ns) == want_gaps.get(ns), round(s - t0, 2)
        for kind, text in source.sent:
            if kind == "spend" and 'pod=~"' in text and s > t0 + 2:  # all born by then
                exact_pods.update(text.split('pod=~"')[1].split('"')[0].split("|"))
    # The check names the pod gone and the one restarted (every start); the stale pod is
    # read exactly from starts inside its stale seconds; the steady one never.
    assert {"gone", "restarts", "vanish"} <= exact_pods and "steady" not in exact_pods
