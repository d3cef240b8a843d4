"""The burn rate taken from two tails equals the burn-rate query, on the real Prometheus.

A window read through the recording rules ends in a raw tail from the rule's last run to
now; two tails of the same run differ by the spend between them, so a source that kept
the tail of ``recent_seconds`` ago sends no burn-rate query (``metrics.accruals``). Here
a real Prometheus holds 26 hours of 15 s scrapes (steady counters, a pod born, a pod
gone, an agent restarting) and the hourly buckets of the rule, which last ran at
``RULE_RUN``. One source evaluates every 30 s from five minutes before that run to
thirty minutes after it (a target down for 200 s of them), another every 45 s; at
every instant a fresh source (nothing kept: the query) reads the same burn rate, to the
digit at 30 s (two tails exactly 600 s apart); at 45 s the tails are 630 s apart, and
the figures are the query's over 630 s scaled to 600 s, to the last bits. Across the rule
run the
tail starts anew and the burn rate is read by query until a tail of the new run is old
enough.

Prometheus only, no control plane.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest

from harness.prometheus import Prometheus, backfilled
from harness.sources import NotedSource, rolling_day_plan
from token_budget.api import v1alpha1 as api
from token_budget.metrics import promql
from token_budget.metrics.prometheus import PrometheusSource, to_series
from token_budget.policy import sources
from token_budget.policy.inputs import SpendSeries

COUNTERS = sources.resolve(api.SpendSource())
STEP = 15
HOUR = 3600
AT = int(dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0).timestamp()) - HOUR
RULE_RUN = AT - 1800  # the rule's last run before the evaluations below; every hour before
BASE = AT - 26 * HOUR
STEADY = tuple(f"steady-{i}" for i in range(3))
PODS = (*STEADY, "born", "gone", "restarts", "idle", "gap")
GAP = (RULE_RUN + 700, RULE_RUN + 900)  # gap's target down: no samples, up == 0
END = RULE_RUN + 1800  # the last instant evaluated
KINDS = (("input", 1), ("output", 3), ("cached_input", 5))  # integer tokens a scrape, x rate


def rate(pod: str) -> int:
    return 0 if pod == "idle" else 7 + 11 * PODS.index(pod)


def alive(pod: str, t: int) -> bool:
    return not ((pod == "born" and t < RULE_RUN + 400) or (pod == "gone" and t > RULE_RUN + 200)
                or (pod == "gap" and GAP[0] <= t < GAP[1]))


def values(pod: str, share: int) -> list[tuple[int, int]]:
    """(time, counter) of a pod's counter: a scrape every 15 s while it lives."""
    out, value = [], 0
    for t in range(BASE + 7, AT + 1, STEP):
        if not alive(pod, t):
            continue
        value = rate(pod) * share if pod == "restarts" and t == RULE_RUN + 502 else \
            value + rate(pod) * share
        out.append((t, value))
    return out


def last_before(points: list[tuple[int, int]], t: int) -> int:
    return max((v for s, v in points if s <= t), default=0)


def openmetrics() -> str:
    lines = ["# TYPE llm_tokens counter"]
    recorded = []
    for pod in PODS:
        for kind, share in KINDS:
            points = values(pod, share)
            labels = f'namespace="ns",pod="{pod}",model="gpt-4o"'
            lines += [f'llm_tokens_total{{{labels},token_type="{kind}",job="agents",'
                      f'instance="{pod}:9000"}} {v} {t}' for t, v in points]
            # The rule's hourly buckets, as it would have recorded them (no reset in one).
            for run in range(RULE_RUN - 25 * HOUR, RULE_RUN + 1, HOUR):
                spent = last_before(points, run) - last_before(points, run - HOUR)
                recorded.append(f'{promql.rule_name(COUNTERS)}{{{labels},tb_kind="{kind}"}} '
                                f'{spent} {run}')
    lines.append("# TYPE up gauge")
    for pod in PODS:  # each pod's target from its birth; the others prove it was new
        lines += [f'up{{job="agents",instance="{pod}:9000"}} '
                  f'{0 if pod == "gap" and GAP[0] <= t < GAP[1] else 1} {t}'
                  for t in range(BASE + 7, AT + 1, STEP) if alive(pod, t) or pod in ("gone", "gap")]
    lines.append(f"# TYPE {promql.rule_name(COUNTERS)} gauge")
    lines += recorded
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def prom(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    with backfilled(tmp_path_factory.mktemp("tails"), openmetrics(), "30d") as server:
        yield server


def burn(series: tuple[SpendSeries, ...]) -> dict[str, tuple[float, float, float]]:
    """Per pod, the tokens of the burn-rate window: a row for each pod with a sample in it
    (an idle pod's row of 0 says its source is alive; a pod gone has none)."""
    return {s.workload: (s.input_tokens, s.output_tokens, s.cached_input_tokens)
            for s in series}


@pytest.mark.parametrize("every", [30, 45])
def test_the_burn_rate_from_two_tails_is_the_burn_rate_query(prom: Prometheus,
                                                             every: int) -> None:
    kept = NotedSource(prom.url, scrape_interval_seconds=STEP)
    derived_at, down_at = [], []
    for t in range(RULE_RUN - 293, END, every):
        now = dt.datetime.fromtimestamp(t, dt.UTC)
        before = kept.stats.derived_rates
        kept.sent.clear()
        got = kept.collect(rolling_day_plan(now), now)
        fresh = PrometheusSource(prom.url, scrape_interval_seconds=STEP)
        want = fresh.collect(rolling_day_plan(now), now)
        assert not got.errors and not want.errors, (got.errors, want.errors)
        if got.down:
            down_at.append(t - RULE_RUN)
        assert got.windows == want.windows
        derived = kept.stats.derived_rates > before
        mine, theirs = burn(got.recent[COUNTERS]), burn(want.recent[COUNTERS])
        span = 600 if every == 30 or not derived else 630  # 14 evaluations of 45 s back
        if span != 600:
            # Two tails 630 s apart: the spend between them, scaled to 600 s (a rate over
            # 630 s).
            # A pod with no row in the old tail (born since) is read by the query.
            born_since = t - span < RULE_RUN + 412  # born's first sample
            theirs = {pod: theirs[pod] if pod == "born" and born_since else
                      tuple(x * 600 / span for x in figures) for pod, figures in
                      burn(to_series(COUNTERS, fresh.read_spend(COUNTERS, span, now))).items()}
        restarted = mine.pop("restarts", None), theirs.pop("restarts", None)
        if span == 600:
            assert mine == theirs, t - RULE_RUN
        else:
            assert mine.keys() == theirs.keys(), t - RULE_RUN
            for pod, figures in theirs.items():
                assert mine[pod] == pytest.approx(figures, rel=1e-12), (t - RULE_RUN, pod)
        # A restart inside the tail is read with increase() by both tails: off by at most
        # a fraction of a scrape at each of its ends, never made up.
        if restarted[1] is not None:
            assert restarted[0] is not None
            for a, b, (_, share) in zip(*restarted, KINDS, strict=True):
                assert abs(a - b) <= 2 * rate("restarts") * share, (t - RULE_RUN, a, b)
        if derived:
            derived_at.append(t - RULE_RUN)
            # No burn-rate query over the whole source: only one narrowed to the pods that
            # have no old tail (born since), and the groups with a sample in the window.
            recent = [text for kind, text in kept.sent if kind == "recent"]
            assert all('pod=~"' in text for text in recent), recent
            assert "alive" in [kind for kind, _ in kept.sent]
        else:
            assert "recent" in [kind for kind, _ in kept.sent]
    # Before the rule ran, no tail was old enough yet; after it, the tails start anew:
    # read by query until one of the new run is 600 s old (the first is read <= 90 s
    # after the run: the rule's time is asked again a minute after the next one is due).
    assert derived_at, "the burn rate was always read by query"
    assert min(derived_at) >= 600, derived_at
    assert min(derived_at) <= 600 + 90 + every and max(derived_at) >= END - RULE_RUN - every
    # Never across a target seen down before (the old tail would hold its last sample
    # before the gap, and the difference the gap's spend); the evaluation that first sees
    # it down still may (both tails end before the gap: the figures above are equal).
    assert down_at and down_at[0] <= GAP[0] - RULE_RUN + every, down_at
    for d in derived_at:
        assert not any(d - 600 - 60 <= x < d for x in down_at), (d, down_at)
