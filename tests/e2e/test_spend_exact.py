"""Spend read exactly to the last scrape, on the real Prometheus (issue 9).

Prometheus's ``increase()`` extrapolates the samples it sees to the edges of the range:
a counter that appears with its value already reads 0, a step in a series a few scrapes
old reads up to twice its size. The operator's spend query (``promql.spend``) reads a
series alive at the window start as last minus start, a series born in the window as its
last value, and falls back to ``increase()`` only across a counter reset. These tests
drive the exporter and compare what the operator's query returns with what was added.

They need Prometheus only (1 s scrape), no control plane.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid

from harness.exporter import AgentExporter
from harness.prometheus import Prometheus, values_by
from harness.waiting import eventually
from token_budget.api import v1alpha1 as api
from token_budget.metrics import promql
from token_budget.policy import planner, sources

COUNTERS = sources.resolve(api.SpendSource())
HOUR = 3600


def _input(prometheus: Prometheus, ns: str, pod: str, seconds: int) -> float | None:
    """The operator's reading of the pod's input tokens over the last ``seconds``."""
    text = promql.spend(COUNTERS, seconds)
    found = values_by(prometheus.query(text), "namespace", "pod", promql.KIND_LABEL)
    return found.get((ns, pod, "input"))


def _samples(prometheus: Prometheus, ns: str, pod: str) -> int:
    result = prometheus.query(
        f'count_over_time(llm_tokens_total{{namespace="{ns}", pod="{pod}", '
        f'token_type="input"}}[{HOUR}s])')
    return int(float(result[0]["value"][1])) if result else 0


def _readings(prometheus: Prometheus, ns: str, pod: str, seconds: int, duration: float
              ) -> list[float | None]:
    out = []
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        out.append(_input(prometheus, ns, pod, seconds))
        time.sleep(0.2)
    return out


def test_a_counter_that_appears_with_its_value_counts_in_full(
        exporter: AgentExporter, prometheus: Prometheus) -> None:
    ns = f"exact-{uuid.uuid4().hex[:6]}"
    # Born in the window needs evidence: Prometheus was scraping the exporter when the
    # window began (a Prometheus younger than the window cannot tell a new series from an
    # old one, and counts only what it saw grow). So the window is shorter than its age.
    window = 30
    eventually(lambda: prometheus.query(f"count(up offset {window + 5}s) > 0"), 60,
               what="Prometheus older than the window")
    exporter.add(ns, "born", "gpt-4o", input=1_000)  # spent before its first scrape
    eventually(lambda: _samples(prometheus, ns, "born") >= 3, 30, what="three samples")
    assert _input(prometheus, ns, "born", window) == 1_000
    # What plain increase() would have said: nothing was spent.
    plain = prometheus.query(f'increase(llm_tokens_total{{namespace="{ns}", pod="born", '
                             f'token_type="input"}}[{window}s])')
    assert float(plain[0]["value"][1]) == 0


def test_a_step_in_a_young_series_is_read_exactly_from_the_first_scrape_on(
        exporter: AgentExporter, prometheus: Prometheus) -> None:
    ns = f"exact-{uuid.uuid4().hex[:6]}"
    exporter.add(ns, "young", "gpt-4o")  # the series exists at 0
    eventually(lambda: _samples(prometheus, ns, "young") >= 2, 30, what="two samples")
    exporter.add(ns, "young", "gpt-4o", input=1_000)
    readings = _readings(prometheus, ns, "young", HOUR, duration=6)
    assert readings[-1] == 1_000, readings
    assert set(readings) <= {0, 1_000}, f"over- or under-read: {readings}"


def test_an_old_series_reads_last_minus_start_in_a_short_window(
        exporter: AgentExporter, prometheus: Prometheus) -> None:
    ns = f"exact-{uuid.uuid4().hex[:6]}"
    exporter.add(ns, "old", "gpt-4o", input=500)
    window = 4
    eventually(lambda: _samples(prometheus, ns, "old") >= window + 3, 30,
               what="a series older than the window")
    assert _input(prometheus, ns, "old", window) == 0
    exporter.add(ns, "old", "gpt-4o", input=200)
    readings = _readings(prometheus, ns, "old", window, duration=window + 3)
    assert 200 in readings, readings
    assert set(readings) <= {0, 200}, f"over- or under-read: {readings}"
    assert readings[-1] == 0, "the step left the window"


def test_a_deleted_pods_spend_still_counts_inside_the_window(
        exporter: AgentExporter, prometheus: Prometheus) -> None:
    ns = f"exact-{uuid.uuid4().hex[:6]}"
    exporter.add(ns, "gone", "gpt-4o")  # a running agent's counter, at zero at first
    eventually(lambda: _samples(prometheus, ns, "gone") >= 2, 30, what="two samples")
    exporter.add(ns, "gone", "gpt-4o", input=700)
    eventually(lambda: _input(prometheus, ns, "gone", HOUR) == 700, 30, what="700 read")
    exporter.remove(ns, "gone")
    # Stale after the next scrape: the instant selector no longer sees it ...
    eventually(lambda: not prometheus.query(f'llm_tokens_total{{namespace="{ns}"}}'), 30,
               what="the series marked stale")
    # ... but its samples are inside the window, and so is its spend.
    assert _input(prometheus, ns, "gone", HOUR) == 700


def test_a_restarted_agents_spend_is_neither_lost_nor_counted_twice(
        exporter: AgentExporter, prometheus: Prometheus) -> None:
    ns = f"exact-{uuid.uuid4().hex[:6]}"
    exporter.add(ns, "restart", "gpt-4o")
    eventually(lambda: _samples(prometheus, ns, "restart") >= 2, 30, what="two samples")
    exporter.add(ns, "restart", "gpt-4o", input=500)
    eventually(lambda: _input(prometheus, ns, "restart", HOUR) == 500, 30, what="500 read")
    exporter.reset(ns, "restart")  # the agent restarts: its counter starts again at 0
    exporter.add(ns, "restart", "gpt-4o", input=300)
    eventually(lambda: (_input(prometheus, ns, "restart", HOUR) or 0) >= 800, 30,
               what="both lives counted")
    time.sleep(3)
    age = _samples(prometheus, ns, "restart")
    # Across a reset the reading is increase()'s: at most one scrape interval extrapolated.
    value = _input(prometheus, ns, "restart", HOUR)
    assert value is not None and 800 <= value <= 800 * (1 + 1.5 / (age - 1)), (value, age)


def test_a_spend_matcher_on_a_high_cardinality_label_narrows_what_prometheus_loads(
        exporter: AgentExporter, prometheus: Prometheus) -> None:
    """Issue 12: the matcher goes into the selector, not only into the group-by."""
    ns = f"narrow-{uuid.uuid4().hex[:6]}"
    pods = [f"agent-{i}" for i in range(100)]
    for pod in pods:
        exporter.add(ns, pod, "gpt-4o")
    eventually(lambda: prometheus.query(
        f'count(count_over_time(llm_tokens_total{{namespace="{ns}", token_type="input"}}[1m])'
        " > 1) == 100"), 30, what="two samples of each of the 100 pods")
    exporter.add(ns, "agent-7", "gpt-4o", input=700)
    exporter.add(ns, "agent-8", "gpt-4o", input=800)
    budget = api.TokenBudget.model_validate({
        "apiVersion": api.API_VERSION, "kind": "TokenBudget",
        "metadata": {"name": "b", "namespace": ns},
        "spec": {"limits": [{"window": "1h", "tokens": 1}],
                 "spendMatchers": [{"label": "pod", "value": "agent-7"}]}})
    plan = planner.plan([budget], dt.datetime.now(dt.UTC))
    assert plan.narrow[COUNTERS] == (("pod", "agent-7"),)
    narrowed = promql.spend(COUNTERS, HOUR, ("pod",), narrow=plan.narrow[COUNTERS])
    everything = promql.spend(COUNTERS, HOUR, ("pod",))
    eventually(lambda: _input(prometheus, ns, "agent-8", HOUR) == 800, 30, what="spend seen")
    found = values_by(prometheus.query(narrowed), "namespace", "pod", promql.KIND_LABEL)
    assert found[(ns, "agent-7", "input")] == 700
    assert {pod for (_, pod, kind) in found if kind == "input"} == {"agent-7"}
    loaded = {name: _samples_loaded(prometheus, text)
              for name, text in (("narrowed", narrowed), ("everything", everything))}
    print(f"\nsamples loaded for one pod's budget among 100+ series: {loaded}")
    assert loaded["narrowed"] * 20 < loaded["everything"], loaded


def _samples_loaded(prometheus: Prometheus, query: str) -> int:
    body = prometheus.api("query", {"query": query, "stats": "all"})
    return int(body["stats"]["samples"]["totalQueryableSamples"])
