"""The two-step spend reading equals the whole exact reading on Prometheus's own engine.

Every query text the adapter sends is evaluated by ``promtool`` (the Prometheus of the
cluster tier, in memory: see harness/promtool.py), over series written to provoke what
the first step must not read alone: counter resets inside the window, just before its
start and across a NaN sample, scrape gaps over the start (some with a restart in them),
series born and gone, staleness markers, ``up`` at 0 or missing, fractional values, an
extra grouping label, windows of odd lengths, instants on and off a sample. For each,
:meth:`PrometheusSource.read_spend` (two steps) and one :func:`promql.spend` (the whole
exact reading) must give the same series and gap rows to the digit.
"""

from __future__ import annotations

import datetime as dt
import random

import pytest

from harness.promtool import EPOCH, PromtoolSource, Series
from token_budget.api import v1alpha1 as api
from token_budget.errors import MetricsError
from token_budget.metrics import promql
from token_budget.metrics.prometheus import ResultItem, gaps_of, to_series
from token_budget.policy import sources

pytestmark = pytest.mark.cluster
COUNTERS = sources.resolve(api.SpendSource())
SAMPLES = 100  # 15 s apart: 0 .. 1485 s
LABELS = 'namespace="ns",pod="p",model="m",token_type="input",job="a",instance="i"'


def _both(src: PromtoolSource, seconds: float, at: dt.datetime, extra: tuple[str, ...] = (),
          horizon: int | None = None) -> tuple[object, object]:
    """Both readings' series and gap rows, or the error each raised (a NaN left in a sum
    makes spend unknown, never a number: both readings must refuse the same windows)."""
    def two() -> list[ResultItem]:
        return src.read_spend(COUNTERS, seconds, at, extra=extra, horizon=horizon,
                              part=None if horizon is None else ("head", 1))

    def whole() -> list[ResultItem]:
        return src.query(promql.spend(COUNTERS, seconds, extra, horizon_seconds=horizon), at)

    out: list[object] = []
    for read in (two, whole):
        try:
            items = read()
            out.append((to_series(COUNTERS, items, extra), gaps_of(COUNTERS, items)))
        except MetricsError as exc:
            out.append(("unknown", type(exc).__name__))
    return out[0], out[1]


def test_a_reset_behind_a_nan_sample_is_read_as_the_whole_reading_reads_it() -> None:
    # One scrape a minute; the start value 500 (at 4m); in the window 510, then NaN (a float
    # counter given a NaN stays NaN until its process restarts), then the agent restarts
    # and counts 5, 20, ... 95. resets() does not see a fall across NaN.
    src = PromtoolSource([(f"llm_tokens_total{{{LABELS}}}",
                           "100 200 300 400 500 510 NaN NaN 5 20 35 50 65 80 95"),
                          ('up{job="a",instance="i"}', "1+0x14")], interval="1m")
    at = EPOCH + dt.timedelta(minutes=14, seconds=30)  # the window (4m30s, 14m30s]
    two, whole = _both(src, 600, at)
    # All of the last value, as after any restart:
    assert isinstance(whole, tuple) and whole[0][0].input_tokens == 95.0
    assert two == whole  # it read -405 (95 - 500) when only resets() named the falls
    assert len(src.texts) > 1, "the pair must go to the second step"


def _counter(rng: random.Random, nan: float, resets: float, holes: float) -> str:
    v = rng.choice([0.0, rng.uniform(0, 1e4)])
    born = rng.random() < holes and rng.randrange(SAMPLES)
    gone = rng.random() < holes and rng.randrange(SAMPLES)
    gap = (rng.randrange(SAMPLES), rng.randrange(1, 40)) if rng.random() < holes else None
    out = []
    for i in range(SAMPLES):
        if born and i < born or gone and i > gone:
            out.append("_")
            continue
        if gone and i == gone and rng.random() < 0.5:
            out.append("stale")
            continue
        if gap and gap[0] <= i < gap[0] + gap[1]:
            out.append("stale" if i == gap[0] and rng.random() < 0.5 else "_")
            if rng.random() < 0.3:
                v = 0.0  # restarted during the gap
            continue
        if rng.random() < resets:
            v = rng.choice([0.0, rng.uniform(0, 5)])
        v += rng.choice([0.0, round(rng.uniform(0, 50), 3)])
        out.append("NaN" if rng.random() < nan else repr(round(v, 3)))
    return " ".join(out)


def _world(rng: random.Random, nan: float, resets: float, holes: float) -> Series:
    series: Series = []
    for ns in ("a", "b"):
        for pod in ("p", "q", "r"):
            for tt in ("input", "output", "cached_input"):
                if rng.random() < 0.3:
                    continue
                for user in (["u1", "u2"] if rng.random() < 0.3 else ["u1"]):
                    series.append((f'llm_tokens_total{{namespace="{ns}",pod="{pod}",model="m",'
                                   f'token_type="{tt}",user="{user}",job="j",'
                                   f'instance="{ns}{pod}"}}', _counter(rng, nan, resets, holes)))
            series.append((f'up{{job="j",instance="{ns}{pod}"}}', " ".join(
                rng.choice(["1"] * 20 + ["0", "_"]) for _ in range(SAMPLES))))
    return series


@pytest.mark.parametrize(("seed", "nan", "resets", "holes"), [
    pytest.param(1, 0.0, 0.03, 0.25, id="resets-gaps-born-gone"),
    pytest.param(2, 0.0, 0.004, 0.08, id="mostly-steady"),
    pytest.param(3, 0.01, 0.004, 0.08, id="rare-nan"),
    pytest.param(4, 0.05, 0.03, 0.25, id="nan-and-everything"),
])
def test_two_steps_equal_the_whole_reading_on_random_series(
        seed: int, nan: float, resets: float, holes: float) -> None:
    rng = random.Random(seed)
    first_step_only = 0
    for case in range(12):
        src = PromtoolSource(_world(rng, nan, resets, holes))
        seconds = rng.choice([120, 300, 600, 900, 601.234, 37.5])
        at = EPOCH + (dt.timedelta(seconds=15 * rng.randrange(70, 99)) if rng.random() < 0.3
                      else dt.timedelta(milliseconds=rng.randrange(1_000_000, 1_485_000)))
        extra = rng.choice([(), ("user",)])
        horizon = rng.choice([None, promql.MAX_HORIZON_SECONDS])
        two, whole = _both(src, seconds, at, extra, horizon)
        assert two == whole, f"case {case}: {seconds} s at {at}, by {extra}, horizon {horizon}"
        first_step_only += len(src.texts) == 2
    if nan == 0 and resets < 0.01:
        assert first_step_only > 0, "some cases must be settled by the first step alone"
