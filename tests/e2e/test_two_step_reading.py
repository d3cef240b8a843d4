"""The two-step spend reading equals the whole exact reading, on the real Prometheus (issue 16).

``PrometheusSource.read_spend`` reads a window with the cheap :func:`promql.common` first and
reads with :func:`promql.spend` only the (namespace, workload) pairs the first step names: a
series without a start value within the lookback, or one that fell. Backfilled history
(``promtool``, 15 s scrapes) holds steady counters next to every case the first step must
hand on: a reset inside the window, a reset in the lookback just before the window start, a
reset between the start value and the window's first sample, a series born in the window,
one gone in the window, and a scrape gap over the start. Each window is read both ways at
the same instant: series, figures (to the digit, fractional counters too) and gap rows are
equal, and the steady pairs are read by the first step alone.

They need Prometheus only, no control plane.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest

from harness.prometheus import Prometheus, backfilled
from token_budget.api import v1alpha1 as api
from token_budget.metrics import promql
from token_budget.metrics.prometheus import PrometheusSource, ResultItem, gaps_of, to_series
from token_budget.policy import sources

COUNTERS = sources.resolve(api.SpendSource())
STEP = 15
AT = dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0) - dt.timedelta(hours=1)
BASE = AT - dt.timedelta(hours=3)
WINDOWS = (600, 3600)
STEADY = tuple(f"steady-{i}" for i in range(4))


def _t(seconds_before_at: float) -> int:
    return int((AT - dt.timedelta(seconds=seconds_before_at)).timestamp())


def history(pod: str) -> list[tuple[int, float]]:
    """(unix time, counter value) of one pod's input counter: 15 s scrapes from BASE to AT,
    shaped around the 600 s window (AT - 600 .. AT); the 3600 s window holds all of it."""
    out: list[tuple[int, float]] = []
    value = 0.0
    t = int(BASE.timestamp()) + 7  # no window edge falls on a sample
    end = int(AT.timestamp())
    rate = 12.3 + len(pod)  # tokens a scrape; fractional, so a wrong sum shows in a digit
    while t <= end:
        value += rate
        if pod == "reset-inside" and t >= _t(300):
            value, pod = rate, "reset-inside-done"  # the agent restarted at AT - 300 s
        if pod == "reset-before" and t >= _t(720):
            value, pod = rate, "reset-before-done"  # 2 minutes before the window start
        if pod == "reset-at-start" and t > _t(600):
            value, pod = rate, "reset-at-start-done"  # between start value and first sample
        skip = (pod == "born" and t < _t(200)) or (pod == "gone" and t > _t(400)) or \
            (pod == "gap-start" and _t(1500) <= t < _t(540))
        if not skip:
            out.append((t, round(value, 1)))
        t += STEP
    return out


PODS = (*STEADY, "reset-inside", "reset-before", "reset-at-start", "born", "gone", "gap-start")


def openmetrics() -> str:
    lines = ["# TYPE llm_tokens counter"]
    for pod in PODS:
        for token_type, share in (("input", 1.0), ("output", 0.25)):
            labels = (f'namespace="ns",pod="{pod}",model="gpt-4o",token_type="{token_type}",'
                      f'job="agents",instance="{pod}:9000"')
            lines += [f"llm_tokens_total{{{labels}}} {v * share:.2f} {t}"
                      for t, v in history(pod)]
    lines.append("# TYPE up gauge")
    start = int(BASE.timestamp()) + 7
    for pod in PODS:  # gap-start's exporter is down during its gap
        lines += [f'up{{job="agents",instance="{pod}:9000"}} '
                  f'{0 if pod == "gap-start" and _t(1500) <= t < _t(540) else 1} {t}'
                  for t in range(start, int(AT.timestamp()) + 1, STEP)]
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def prom(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    with backfilled(tmp_path_factory.mktemp("two-step"), openmetrics(), "30d") as server:
        yield server


class _Recording(PrometheusSource):
    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.texts: list[str] = []

    def query(self, text: str, at: dt.datetime, kind: str = "spend",
              matrix: bool = False) -> list[ResultItem]:
        self.texts.append(text)
        return super().query(text, at, kind, matrix)


@pytest.mark.parametrize("seconds", WINDOWS)
def test_the_two_step_reading_equals_the_whole_exact_reading(prom: Prometheus,
                                                              seconds: int) -> None:
    source = _Recording(prom.url)
    two_step = source.read_spend(COUNTERS, seconds, AT)
    whole = source.query(promql.spend(COUNTERS, seconds), AT)
    series = to_series(COUNTERS, two_step)
    assert series == to_series(COUNTERS, whole)
    assert gaps_of(COUNTERS, two_step) == gaps_of(COUNTERS, whole)
    pods = {s.workload for s in series}
    assert set(STEADY) <= pods and "reset-inside" in pods and "born" in pods
    first, second = source.texts[0], source.texts[1]
    assert first == promql.common(COUNTERS, seconds)
    # The second step reads the pairs the first could not, and no steady one.
    assert second != promql.spend(COUNTERS, seconds) and "reset-inside" in second
    assert not any(pod in second for pod in STEADY), second
    if seconds == 600:
        for pod in ("reset-before", "reset-at-start", "born", "gap-start"):
            assert pod in second, pod
        assert gaps_of(COUNTERS, whole)["ns"].unknown >= 1  # gap-start's start is hidden
