"""The rate-limit reading of the Prometheus adapter against a tiny local HTTP server.

Covers:
- one query per (source, window): the two tagged sums fold into requests and
  429 answers per (namespace, model); a model with 429s but no request series
  is dropped; 429s are never more than the requests;
- an empty answer is no samples (nothing to judge), not an error;
- NaN, an HTTP error and an unreachable Prometheus are recorded per (source,
  window) as errors, never raised; a failing pair leaves the other pairs read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from token_budget.api import v1alpha1 as api
from token_budget.metrics import promql
from token_budget.metrics.prometheus import PrometheusSource
from token_budget.policy import ratesources
from token_budget.policy.ratesources import RateSample
from unit.builders import NOW
from unit.test_prometheus_adapter import (
    CLOSED_PORT_URL,
    Answer,
    FakePrometheus,
    error,
    item,
    vector,
)

COUNTERS = ratesources.resolve(api.SpendSource())
LITELLM = ratesources.resolve(api.SpendSource(preset=api.Preset.LITELLM))
assert COUNTERS is not None and LITELLM is not None
Serve = Callable[[Callable[[str, dict[str, str]], Answer]], FakePrometheus]


@pytest.fixture
def serve() -> Iterator[Serve]:
    started: list[FakePrometheus] = []

    def start(answer: Callable[[str, dict[str, str]], Answer]) -> FakePrometheus:
        fake = FakePrometheus(answer)
        fake.thread.start()
        started.append(fake)
        return fake

    yield start
    for fake in started:
        fake.server.shutdown()
        fake.server.server_close()
        fake.thread.join(timeout=5)


def test_the_two_sums_fold_into_requests_and_429s_per_namespace_and_model(serve: Serve) -> None:
    fake = serve(lambda path, params: vector(
        item("100", tb_kind="requests", namespace="team-a", model="large"),
        item("30", tb_kind="limited", namespace="team-a", model="large"),
        item("5", tb_kind="requests", namespace="team-b", model="large"),
        item("7", tb_kind="limited", namespace="team-b", model="large"),  # more 429s than requests
        item("3", tb_kind="limited", namespace="team-c", model="tiny"),  # no request series
    ))
    samples, errors = PrometheusSource(fake.url).read_rate_limits(
        [(COUNTERS, 300), (COUNTERS, 600)], NOW)
    assert errors == {}
    assert samples[(COUNTERS, 300)] == (RateSample("team-a", "large", 100.0, 30.0),
                                        RateSample("team-b", "large", 5.0, 5.0))
    assert fake.queries == [promql.rate_limits(COUNTERS, 300), promql.rate_limits(COUNTERS, 600)]


def test_an_empty_answer_is_no_samples(serve: Serve) -> None:
    fake = serve(lambda path, params: vector())
    samples, errors = PrometheusSource(fake.url).read_rate_limits([(LITELLM, 300)], NOW)
    assert (samples, errors) == ({(LITELLM, 300): ()}, {})


def test_failures_are_recorded_per_pair_and_never_raised(serve: Serve) -> None:
    def answer(path: str, params: dict[str, str]) -> Answer:
        if "litellm" in params["query"]:
            return error(422, "execution", "query processing would load too many samples")
        return vector(item("40", tb_kind="requests", namespace="team-a", model="large"))

    fake = serve(answer)
    samples, errors = PrometheusSource(fake.url).read_rate_limits(
        [(COUNTERS, 300), (LITELLM, 300)], NOW)
    assert samples == {(COUNTERS, 300): (RateSample("team-a", "large", 40.0, 0.0),)}
    assert "too many samples" in errors[(LITELLM, 300)]
    nan = serve(lambda path, params: vector(
        item("NaN", tb_kind="requests", namespace="team-a", model="large")))
    samples, errors = PrometheusSource(nan.url).read_rate_limits([(COUNTERS, 300)], NOW)
    assert samples == {} and "has value nan" in errors[(COUNTERS, 300)]
    _, down = PrometheusSource(CLOSED_PORT_URL, timeout_seconds=2).read_rate_limits(
        [(COUNTERS, 300)], NOW)
    assert "cannot be reached" in down[(COUNTERS, 300)]
