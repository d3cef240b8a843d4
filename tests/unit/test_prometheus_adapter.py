"""The Prometheus adapter against a real, tiny, local HTTP server: each edge case its own error.

A fake ``/api/v1/query`` is served by ``http.server`` in a thread on
127.0.0.1 with an ephemeral port: real HTTP through the real client, nothing
monkeypatched.

Covers:
- ``to_series`` folds a tagged instant vector into one series per
  (namespace, workload, model, extra labels);
- NaN and infinities -> ``InvalidValue``; malformed samples (no value, a value
  that is not a number, no labels, no kind tag, not an object) -> ``QueryFailed``;
- an unreachable Prometheus (a closed port) -> ``MetricsUnavailable``, recorded
  per source in ``SpendSnapshot.errors`` by ``collect()``, promptly;
- a kept-alive connection that broke before any answer is asked again once, on a new
  connection; a timeout or a break after a while is not (it would double the wait);
- an HTTP error answer (400, 422, 503) -> ``QueryFailed`` carrying Prometheus's
  own error text, at once and without retries; a 200 answer that is not
  Prometheus JSON -> ``QueryFailed``;
- ``collect()`` sends the planned PromQL at the evaluation time and builds the
  snapshot (windows, burn rate, outcomes), keeping a failing source apart from
  a working one;
- query statistics and the ``on_query`` hook; ``retention_seconds``;
- ``_duration_seconds`` for Prometheus durations (15d, 2w3d, 1y, 90m).
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

from token_budget.errors import InvalidValue, MetricsUnavailable, QueryFailed
from token_budget.metrics import prometheus, promql
from token_budget.metrics.prometheus import PrometheusSource, ResultItem, to_series
from token_budget.policy import engine, planner, sources
from token_budget.policy.inputs import SpendSeries, SpendSnapshot
from token_budget.policy.windows import WindowKey
from unit import builders as b
from unit.builders import NOW

COUNTERS = sources.resolve(b.token_budget().spec.source)
LITELLM = sources.resolve(b.token_budget(source={"preset": "LiteLLM"}).spec.source)
CLOSED_PORT_URL = "http://127.0.0.1:1"

Answer = tuple[int, Any]  # HTTP status, JSON body (or a str sent as it is)


def vector(*items: ResultItem) -> Answer:
    return 200, {"status": "success", "data": {"resultType": "vector", "result": list(items)}}


def error(status: int, kind: str, text: str) -> Answer:
    return status, {"status": "error", "errorType": kind, "error": text}


def item(value: str, **labels: str) -> ResultItem:
    return {"metric": dict(labels), "value": [NOW.timestamp(), value]}


class FakePrometheus:
    """A tiny Prometheus HTTP API: ``answer(path, params)`` decides every reply."""

    def __init__(self, answer: Callable[[str, dict[str, str]], Answer]) -> None:
        self.answer = answer
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.authorization: list[str | None] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                url = urlparse(self.path)
                params = {k: v[0] for k, v in parse_qs(url.query).items()}
                fake.requests.append((url.path, params))
                fake.authorization.append(self.headers.get("Authorization"))
                status, body = fake.answer(url.path, params)
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.01,),
                                       daemon=True)

    @property
    def queries(self) -> list[str]:
        return [p["query"] for path, p in self.requests if path == "/api/v1/query"]


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[str, dict[str, str]], Answer]], FakePrometheus]]:
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


def always(answer: Answer) -> Callable[[str, dict[str, str]], Answer]:
    return lambda path, params: answer


# ---------------------------------------------------------------------------
# Folding results
# ---------------------------------------------------------------------------


def test_a_tagged_result_is_folded_into_one_series_per_workload_and_model() -> None:
    items = [
        item("1200", tb_kind="input", namespace="team-search", pod="agent-0", model="large",
             team="search"),
        item("300.5", tb_kind="output", namespace="team-search", pod="agent-0", model="large",
             team="search"),
        item("50", tb_kind="cached_input", namespace="team-search", pod="agent-0", model="large",
             team="search"),
        item("7", tb_kind="input", namespace="team-search", pod="agent-1", model="tiny"),
    ]
    assert to_series(COUNTERS, items, ("team",)) == (
        SpendSeries("team-search", "agent-0", "large", 1200.0, 300.5, 50.0, None,
                    (("team", "search"),)),
        SpendSeries("team-search", "agent-1", "tiny", 7.0, 0.0, 0.0, None, (("team", ""),)),
    )


def test_a_reported_cost_is_kept_as_an_exact_decimal() -> None:
    items = [item("100", tb_kind="input", team_alias="search", api_key_alias="bot",
                  model="large"),
             item("0.1", tb_kind="cost", team_alias="search", api_key_alias="bot",
                  model="large")]
    [s] = to_series(LITELLM, items)
    assert (s.namespace, s.workload, s.input_tokens, s.cost) == ("search", "bot", 100.0,
                                                                 Decimal("0.1"))


def test_envoy_cached_input_is_taken_out_of_its_input_so_no_token_counts_twice() -> None:
    envoy = sources.resolve(b.token_budget(source={"preset": "EnvoyAIGateway"}).spec.source)
    labels = {"k8s_namespace_name": "search", "k8s_pod_name": "bot-0",
              "gen_ai_request_model": "gpt-4o"}
    items = [item("1000", tb_kind="input", **labels), item("250", tb_kind="output", **labels),
             item("400", tb_kind="cached_input", **labels)]
    [s] = to_series(envoy, items)
    assert (s.input_tokens, s.output_tokens, s.cached_input_tokens) == (600.0, 250.0, 400.0)
    assert s.tokens == 1250.0, "input + output, as the gateway counted them"


def test_an_empty_result_is_no_series_not_an_error() -> None:
    assert to_series(COUNTERS, []) == ()


@pytest.mark.parametrize("value", ["NaN", "+Inf", "-Inf"])
def test_a_value_no_limit_can_be_compared_with_is_refused(value: str) -> None:
    with pytest.raises(InvalidValue, match="spend must be a finite number"):
        to_series(COUNTERS, [item(value, tb_kind="input", namespace="a")])


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param({"metric": {"tb_kind": "input"}}, id="a sample without a value"),
        pytest.param({"metric": {"tb_kind": "input"}, "value": [1.0]},
                     id="a value without its number"),
        pytest.param({"metric": {"tb_kind": "input"}, "value": [1.0, "lots"]},
                     id="a value that is not a number"),
        pytest.param({"metric": {"tb_kind": "input"}, "value": None}, id="a null value"),
        pytest.param({"metric": {"namespace": "a"}, "value": [1.0, "1"]},
                     id="a series without the kind tag"),
        pytest.param({"metric": {"tb_kind": "tokens"}, "value": [1.0, "1"]},
                     id="a series with an unknown kind tag"),
        pytest.param({"value": [1.0, "1"]}, id="a sample without labels"),
        pytest.param("1", id="a scalar instead of a vector item"),
    ],
)
def test_a_malformed_sample_is_a_failed_query(bad: Any) -> None:
    with pytest.raises(QueryFailed):
        to_series(COUNTERS, [bad])


# ---------------------------------------------------------------------------
# Talking to Prometheus
# ---------------------------------------------------------------------------


def test_an_unreachable_prometheus_is_metrics_unavailable() -> None:
    with pytest.raises(MetricsUnavailable, match="Prometheus at http://127.0.0.1:1 cannot be "
                                                 "reached"):
        PrometheusSource(CLOSED_PORT_URL, timeout_seconds=5).query("up", NOW)


def test_collect_records_an_unreachable_prometheus_per_source_and_goes_on() -> None:
    budgets = [b.token_budget("a", limits=[{"window": "24h", "tokens": 1},
                                           {"window": "Month", "tokens": 1}]),
               b.token_budget("b", source={"preset": "LiteLLM"})]
    plan = planner.plan(budgets, NOW)
    started = time.monotonic()
    snap = PrometheusSource(CLOSED_PORT_URL, timeout_seconds=5).collect(plan, NOW)
    elapsed = time.monotonic() - started
    assert set(snap.errors) == {COUNTERS, LITELLM}
    assert all("cannot be reached" in text for text in snap.errors.values())
    assert (dict(snap.windows), dict(snap.recent)) == ({}, {})
    assert elapsed < 3, f"an unreachable Prometheus held the evaluation for {elapsed:.1f}s"


class KeepAliveServer:
    """HTTP/1.1 with kept-alive connections; ``fault(conn, nth)`` breaks the nth request
    (0-based) on the conn-th connection: "garble" answers a status line cut short (what CI
    saw on a connection kept across a Prometheus restart), "close" closes unanswered,
    "hang" never answers; None answers an empty vector."""

    def __init__(self, fault: Callable[[int, int], str | None]) -> None:
        self.fault = fault
        self.connections = 0
        self.answered = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn, self.connections - 1),
                             daemon=True).start()

    def _serve(self, conn: socket.socket, index: int) -> None:
        body = json.dumps(vector()[1]).encode()
        with conn, conn.makefile("rb") as reader:
            nth = 0
            while True:
                line = reader.readline()
                if not line:
                    return
                while reader.readline() not in (b"\r\n", b""):
                    pass  # the rest of the request head; a GET has no body
                fault = self.fault(index, nth)
                nth += 1
                if fault == "close":
                    return
                if fault == "hang":
                    time.sleep(30)
                    return
                if fault == "slow close":  # the query's own work took Prometheus down
                    time.sleep(0.8)
                    return
                if fault == "garble":
                    conn.sendall(b"ntent-Encoding: gzip\r\n\r\n")
                    return
                self.answered += 1  # before: the client may read the answer at once
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize("fault", ["garble", "close"])
def test_a_kept_alive_connection_that_broke_is_asked_again_once_on_a_new_one(
        fault: str) -> None:
    # The second request on the first connection breaks: the evaluation must not report
    # Prometheus as unreachable for a connection the server had dropped.
    server = KeepAliveServer(lambda conn, nth: fault if (conn, nth) == (0, 1) else None)
    try:
        source = PrometheusSource(server.url, timeout_seconds=5)
        assert source.query("up", NOW) == []
        assert source.query("up", NOW) == []
        assert (server.connections, server.answered) == (2, 2)
        assert (source.stats.queries, source.stats.errors) == (2, 0)
    finally:
        server.close()


def test_a_connection_that_breaks_again_is_reported_after_one_more_try() -> None:
    server = KeepAliveServer(lambda conn, nth: "close")
    try:
        with pytest.raises(MetricsUnavailable, match="cannot be reached"):
            PrometheusSource(server.url, timeout_seconds=5).query("up", NOW)
        assert server.connections == 2  # once more, never a loop
    finally:
        server.close()


@pytest.mark.parametrize("fault", ["hang", "slow close"])
def test_a_prometheus_that_does_not_answer_in_time_is_not_asked_again(fault: str) -> None:
    # A hang times out; a break after a while is no stale connection but the query's own
    # doing (Prometheus killed by it): neither is run twice nor waited for twice.
    server = KeepAliveServer(lambda conn, nth: fault)
    try:
        started = time.monotonic()
        with pytest.raises(MetricsUnavailable, match="cannot be reached"):
            PrometheusSource(server.url, timeout_seconds=1).query("up", NOW)
        elapsed = time.monotonic() - started
        assert server.connections == 1
        assert elapsed < 1.5, f"waited for twice ({elapsed:.1f} s)"
    finally:
        server.close()


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        pytest.param(error(400, "bad_data", "parse error"), "parse error",
                     id="bad PromQL (400)"),
        pytest.param(error(422, "execution", "query processing would load too many samples"),
                     "too many samples", id="too many samples (422)"),
        pytest.param(error(503, "timeout", "query timed out in expression evaluation"),
                     "query timed out", id="a query timeout (503)"),
    ],
)
def test_an_error_answer_is_a_failed_query_with_prometheus_own_words(
        serve: Any, answer: Answer, says: str) -> None:
    fake = serve(always(answer))
    started = time.monotonic()
    with pytest.raises(QueryFailed, match=f"Prometheus at {fake.url} refused the query") as info:
        PrometheusSource(fake.url).query("sum(up)", NOW)
    assert says in str(info.value)
    assert len(fake.requests) == 1, "an answer Prometheus gave must not be retried"
    assert time.monotonic() - started < 3


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param((200, "<html>Sign in</html>"), id="a login page"),
        pytest.param((200, {"status": "success"}), id="JSON without data"),
    ],
)
def test_an_answer_that_is_not_prometheus_json_is_a_failed_query(serve: Any, answer: Answer
                                                                 ) -> None:
    fake = serve(always(answer))
    with pytest.raises(QueryFailed):
        PrometheusSource(fake.url).query("sum(up)", NOW)


def test_a_scalar_answer_is_a_failed_query(serve: Any) -> None:
    fake = serve(always((200, {"status": "success",
                               "data": {"resultType": "scalar", "result": [1.0, "1"]}})))
    rs = COUNTERS
    plan = planner.plan([b.token_budget()], NOW)
    snap = PrometheusSource(fake.url).collect(plan, NOW)
    assert rs in snap.errors


TEAM = (("team", "search"),)


def test_collect_builds_the_snapshot_from_the_planned_queries(serve: Any) -> None:
    day = [item("900", tb_kind="input", namespace="team-search", pod="agent-0", model="large",
                team="search"),
           item("100", tb_kind="output", namespace="team-search", pod="agent-0", model="large",
                team="search")]
    month = [item("5000", tb_kind="input", namespace="team-search", pod="agent-0",
                  model="large", team="search")]
    recent = [item("60", tb_kind="input", namespace="team-search", pod="agent-0",
                   model="large", team="search")]
    outcomes: list[ResultItem] = [{"metric": {"namespace": "team-search", "outcome": "success"},
                                   "value": [NOW.timestamp(), "42"]}]

    def answer(path: str, params: dict[str, str]) -> Answer:
        if path.endswith("/status/runtimeinfo"):
            return 200, {"status": "success", "data": {"storageRetention": "30d or 10GiB"}}
        q = params["query"]
        if q.startswith("(up == 0)"):
            return vector()  # every scrape target answers
        if q.startswith("count("):
            return vector(item("3"))
        if "agent_outcomes_total" in q:
            return vector(*outcomes)
        if "[86400s]" in q:
            return vector(*day)
        if "[600s]" in q:
            return vector(*recent)
        return vector(*month)

    fake = serve(answer)
    budget = b.token_budget(
        limits=[{"window": "24h", "tokens": 10_000}, {"window": "Month", "tokens": 100_000}],
        spendMatchers=[{"label": "team", "value": "search"}],
        outcome={"metric": "agent_outcomes_total", "window": "24h",
                 "matchers": [{"label": "outcome", "value": "success"}]})
    plan = planner.plan([budget], NOW)
    snap = PrometheusSource(fake.url).collect(plan, NOW)

    assert snap.errors == {} and snap.outcome_errors == {}
    assert snap.retention_seconds == 30 * 86400
    # The burn rate (600 s) is read once, in a thread of its own beside the windows.
    burn_rate = promql.common(COUNTERS, 600, ("team",), narrow=TEAM)
    assert fake.queries.count(burn_rate) == 1
    assert [q for q in fake.queries if q != burn_rate] == [
        # The budget's spend matcher narrows every selector (team=~"search"). No series
        # is uncommon (no row says so): one query per window, the first step's.
        promql.common(COUNTERS, 86400, ("team",), narrow=TEAM),
        'count({__name__=~"llm_tokens_total"})',  # a long window: estimate its samples first
        promql.common(COUNTERS, 19 * 86400 + 12 * 3600, ("team",), narrow=TEAM),
        promql.outcomes("agent_outcomes_total", "namespace", 86400, ("outcome",)),
        "(up == 0) unless on (job, instance) (timestamp(up) < time() - 60)",  # none down
    ]
    assert {p["time"] for path, p in fake.requests if path == "/api/v1/query"} == {
        f"{NOW.timestamp():.3f}"}
    team = (("team", "search"),)
    assert snap.windows[(COUNTERS, WindowKey("24h"))] == (
        SpendSeries("team-search", "agent-0", "large", 900.0, 100.0, labels=team),)
    assert snap.windows[(COUNTERS, WindowKey("Month"))] == (
        SpendSeries("team-search", "agent-0", "large", 5000.0, labels=team),)
    assert snap.recent[COUNTERS] == (
        SpendSeries("team-search", "agent-0", "large", 60.0, labels=team),)
    assert snap.recent_seconds == 600 and snap.taken_at == NOW
    assert list(snap.outcomes.values()) == [(("team-search", (("outcome", "success"),), 42.0),)]


def test_collect_keeps_a_failing_source_apart_from_a_working_one(serve: Any) -> None:
    def answer(path: str, params: dict[str, str]) -> Answer:
        if "litellm" in params.get("query", ""):
            return error(400, "bad_data", "unknown function")
        return vector(item("5", tb_kind="input", namespace="team-search", pod="p", model="m"))

    fake = serve(answer)
    plan = planner.plan([b.token_budget("a"), b.token_budget(
        "b", source={"preset": "LiteLLM"},
        limits=[{"window": "24h", "tokens": 1000}, {"window": "1h", "tokens": 100}])], NOW)
    snap = PrometheusSource(fake.url).collect(plan, NOW)
    assert list(snap.errors) == [LITELLM]
    assert "unknown function" in snap.errors[LITELLM]
    assert snap.windows[(COUNTERS, WindowKey("24h"))][0].input_tokens == 5.0
    # Its first window and its burn rate (read side by side); its second window never.
    assert sum("litellm" in q for q in fake.queries) == 2, \
        "a failed source is not asked again in the same collect"


def test_collect_records_a_nan_per_source(serve: Any) -> None:
    fake = serve(always(vector(item("NaN", tb_kind="input", namespace="a"))))
    snap = PrometheusSource(fake.url).collect(planner.plan([b.token_budget()], NOW), NOW)
    assert "finite number" in snap.errors[COUNTERS]


def test_every_query_is_counted_and_reported_to_the_hook(serve: Any) -> None:
    seen: list[tuple[str, bool]] = []
    fake = serve(lambda path, p: error(400, "bad_data", "x") if "bad" in p["query"]
                 else vector())
    source = PrometheusSource(fake.url, on_query=lambda kind, secs, ok: seen.append((kind, ok)))
    source.query("good", NOW)
    with pytest.raises(QueryFailed):
        source.query("bad", NOW, kind="recent")
    assert seen == [("spend", True), ("recent", False)]
    assert (source.stats.queries, source.stats.errors) == (2, 1)


def test_a_bearer_token_is_sent_with_every_query(serve: Any) -> None:
    fake = serve(always(vector()))
    auth = prometheus.Auth(bearer_token="s3cret")
    PrometheusSource(fake.url, auth=auth).query("up", NOW)
    assert fake.authorization == ["Bearer s3cret"]


@pytest.mark.parametrize(
    ("effective", "seconds"),
    [
        pytest.param("15d", 15 * 86400, id="a time limit"),
        pytest.param("30d or 10GiB", 30 * 86400, id="a time and a size limit"),
        pytest.param("10GiB", None, id="a size limit only"),
    ],
)
def test_retention_is_read_from_the_servers_runtime_info(serve: Any, effective: str,
                                                         seconds: int | None) -> None:
    fake = serve(lambda path, p: (200, {"status": "success",
                                        "data": {"storageRetention": effective}}))
    assert PrometheusSource(fake.url).retention_seconds() == seconds
    assert fake.requests[0][0] == "/api/v1/status/runtimeinfo"


def test_retention_is_unknown_when_the_flags_cannot_be_read() -> None:
    assert PrometheusSource(CLOSED_PORT_URL, timeout_seconds=5).retention_seconds() is None


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        pytest.param("15d", 15 * 86400, id="days"),
        pytest.param("2w3d", 2 * 604800 + 3 * 86400, id="weeks and days"),
        pytest.param("1y", 365 * 86400, id="a year is 365 days"),
        pytest.param("90m", 5400, id="minutes"),
        pytest.param("1h30m", 5400, id="hours and minutes"),
        pytest.param("10s", 10, id="seconds"),
        pytest.param("1500ms", 1, id="milliseconds"),
        pytest.param("", None, id="nothing"),
        pytest.param("15", None, id="no unit"),
        pytest.param("d", None, id="no number"),
        pytest.param("15x", None, id="an unknown unit"),
        pytest.param("0d", None, id="zero"),
    ],
)
def test_prometheus_durations_are_read_as_seconds(text: str, seconds: int | None) -> None:
    assert prometheus._duration_seconds(text) == seconds


def test_a_window_query_too_large_for_prometheus_is_not_sent_and_says_how_to_fix_it(
        serve: Any) -> None:
    def answer(path: str, params: dict[str, str]) -> Answer:
        if path.endswith("/status/runtimeinfo"):
            return 200, {"status": "success", "data": {"storageRetention": "90d"}}
        if params["query"].startswith("count("):
            # 400 series x 30 d / 15 s x 3 range reads (last, resets, increase) = 207 million
            return vector(item("400"))
        return vector()

    fake = serve(answer)
    budget = b.token_budget(limits=[{"window": "1h", "tokens": 10}, {"window": "30d",
                                                                      "tokens": 10}])
    plan = planner.plan([budget], NOW)
    snap = PrometheusSource(fake.url).collect(plan, NOW)
    key = (COUNTERS, WindowKey("30d"))
    assert key not in snap.windows and (COUNTERS, WindowKey("1h")) in snap.windows
    assert "would hold about 69,120,000 samples from 400 series" in snap.window_errors[key]
    assert not any("[2592000s]" in q for q in fake.queries), "the heavy query was never sent"
    decision = engine.evaluate(engine.World(budgets=[budget]), snap, NOW).decisions[0]
    assert not decision.spend_known
    assert "install the recording rules" in (decision.spend_error or "")


def test_a_window_longer_than_the_retention_is_estimated_from_the_covered_part() -> None:
    budget = b.token_budget(limits=[{"window": "30d", "tokens": 1_000_000}])
    plan = planner.plan([budget], NOW)
    seen = (SpendSeries("team-search", "agent-0", "large", 300_000.0),)
    snap = SpendSnapshot(taken_at=NOW, windows={k: seen for k in plan.windows},
                         recent={COUNTERS: ()}, retention_seconds=15 * 86400)
    [usage] = engine.evaluate(engine.World(budgets=[budget]), snap, NOW).decisions[0].windows
    assert usage.covered == Decimal("0.5")
    assert usage.tokens == 600_000, "the missing half is estimated, never taken as zero"


def test_a_down_target_marks_the_namespaces_its_series_named(
        serve: Callable[[Callable[[str, dict[str, str]], Answer]], FakePrometheus]) -> None:
    """``up == 0`` first; only then, for those targets, whose spend they exported."""
    def answer(path: str, params: dict[str, str]) -> Answer:
        q = params["query"]
        if q.startswith("(up == 0)"):
            return vector(item("0", job="agents", instance="10.0.0.7:9000"))
        if q.startswith("count by (namespace) (last_over_time("):
            assert 'job=~"agents", instance=~"10\\\\.0\\\\.0\\\\.7:9000"' in q, q
            return vector(item("2", namespace="team-search"))
        return vector()

    fake = serve(answer)
    snap = PrometheusSource(fake.url).collect(planner.plan([b.token_budget()], NOW), NOW)
    assert snap.down == {COUNTERS: {
        "team-search": "scrape target(s) down (up == 0): agents/10.0.0.7:9000"}}


# ---------------------------------------------------------------------------
# The two-step reading and the raw parts of rule-read windows
# ---------------------------------------------------------------------------

def test_the_second_step_reads_the_pairs_the_first_could_not_and_replaces_their_rows(
        serve: Any) -> None:
    common = [item("900", tb_kind="input", namespace="a", pod="p-1", model="m"),
              item("5", tb_kind="output", namespace="a", pod="p.2", model="m"),
              item("NaN", tb_kind="input", namespace="a", pod="p.2", model="m"),  # fell
              item("+Inf", tb_kind="input", namespace="b", pod="q", model="m"),  # fell
              item("2", tb_kind=promql.UNCOMMON, namespace="c", pod="p-1")]  # no start
    # The second step selects each label's values, so a/p-1 is read again there too.
    rest = [item("900", tb_kind="input", namespace="a", pod="p-1", model="m"),
            item("7", tb_kind="input", namespace="a", pod="p.2", model="m"),
            item("6", tb_kind="output", namespace="a", pod="p.2", model="m"),
            item("8", tb_kind="input", namespace="b", pod="q", model="m"),
            item("9", tb_kind="input", namespace="c", pod="p-1", model="m"),
            item("1", tb_kind=promql.GAP_BRIDGED, namespace="c")]
    fake = serve(lambda path, params: vector(*(
        common if params["query"] == promql.common(COUNTERS, 3600) else rest)))
    items = PrometheusSource(fake.url).read_spend(COUNTERS, 3600, NOW)
    named = (("namespace", "a|b|c"), ("pod", "p-1|p\\.2|q"))
    assert fake.queries == [promql.common(COUNTERS, 3600),
                            promql.spend(COUNTERS, 3600, narrow=named)]
    # Every row of a selected pair comes from the second step, once.
    assert to_series(COUNTERS, items) == (
        SpendSeries("a", "p-1", "m", 900.0), SpendSeries("a", "p.2", "m", 7.0, 6.0),
        SpendSeries("b", "q", "m", 8.0), SpendSeries("c", "p-1", "m", 9.0))
    assert prometheus.gaps_of(COUNTERS, items) == {"c": prometheus.Gap(bridged=1, unknown=0)}


def test_the_burn_rate_is_read_while_a_window_is(serve: Any) -> None:
    """The window's query and the burn rate's are each answered only once the other has
    arrived: read one after the other (in either order), the first waits 5 s in vain."""
    burn_rate = promql.common(COUNTERS, 600)
    meet = threading.Barrier(2, timeout=5)
    together: list[bool] = []

    def answer(path: str, params: dict[str, str]) -> Answer:
        q = params.get("query", "")
        if q == burn_rate or "[86400s]" in q:
            try:
                meet.wait()
                together.append(True)
            except threading.BrokenBarrierError:
                together.append(False)
        return vector()

    fake = serve(answer)
    budget = b.token_budget(limits=[{"window": "24h", "tokens": 10_000}])
    started = time.monotonic()
    snap = PrometheusSource(fake.url).collect(planner.plan([budget], NOW), NOW)
    assert together == [True, True] and time.monotonic() - started < 5
    assert snap.errors == {}


@pytest.mark.parametrize("failing", ["window", "burn rate", "both"])
def test_a_failing_read_on_either_side_fails_its_source_and_no_other(
        serve: Any, failing: str) -> None:
    """The burn rate runs beside the windows: whichever fails, the source is in error with
    that read's message (the window's when both fail) and keeps no burn rate. (Behaviour
    as before the burn rate was read beside the windows, where it was read last.)"""
    burn_rate = promql.common(COUNTERS, 600)

    def answer(path: str, params: dict[str, str]) -> Answer:
        q = params.get("query", "")
        if path.endswith("/status/runtimeinfo"):
            return 200, {"status": "success", "data": {"storageRetention": "15d"}}
        if q.startswith("label_replace") and failing in ("both", (
                "burn rate" if q == burn_rate else "window")):
            return error(422, "execution",
                         f"the {'burn rate' if q == burn_rate else 'window'} query broke")
        return vector(item("5", tb_kind="input", namespace="team-search", pod="agent-0",
                           model="large"))

    fake = serve(answer)
    budget = b.token_budget(limits=[{"window": "24h", "tokens": 10_000}])
    snap = PrometheusSource(fake.url).collect(planner.plan([budget], NOW), NOW)
    said = "window" if failing == "both" else failing
    assert f"the {said} query broke" in snap.errors[COUNTERS]
    assert COUNTERS not in snap.recent
    assert [rs for rs, _ in snap.windows] == ([] if failing != "burn rate" else [COUNTERS])


def test_a_programming_error_waits_for_the_burn_rate_and_logs_its_failure_too(
        caplog: pytest.LogCaptureFixture) -> None:
    started = threading.Event()

    class Broken(PrometheusSource):
        def _recent(self, plan: Any, now: dt.datetime, derived: Any = frozenset()) -> Any:
            started.set()
            time.sleep(0.2)
            raise KeyError("burn rate broke")

        def _collect(self, plan: Any, now: dt.datetime, recent_reads: Any,
                     derive: Any) -> Any:
            assert started.wait(5)
            raise ValueError("windows broke")

    source = Broken(CLOSED_PORT_URL)
    with pytest.raises(ValueError, match="windows broke"):
        source.collect(planner.plan([b.token_budget()], NOW), NOW)
    failed = [r for r in caplog.records if r.getMessage() == "the burn-rate reads failed too"]
    assert len(failed) == 1 and "burn rate broke" in str(failed[0].exc_info[1])


def test_a_clean_first_step_is_the_whole_reading(serve: Any) -> None:
    common = [item("900", tb_kind="input", namespace="a", pod="p", model="m")]
    fake = serve(always(vector(*common)))
    assert PrometheusSource(fake.url).read_spend(COUNTERS, 60, NOW) == common
    assert fake.queries == [promql.common(COUNTERS, 60)]


def test_the_first_step_reads_nothing_before_the_window_but_the_start_value() -> None:
    parts = promql._Parts('llm_tokens_total{token_type="input"}', 60, 300)
    text = promql.common(COUNTERS, 60)
    assert "] offset" not in text  # no horizon, no up: no range before the window
    assert f"sum by (namespace, pod, model) ({parts.last} - {parts.exact_start})" in text
    # The pairs the first step cannot read: a series without a start value, or one that
    # fell anywhere from the lookback before the window on (a reset, or a reset in a gap),
    # or whose first value in the window is below the start value (a fall across a NaN
    # sample, which resets() does not count: tests/e2e/test_two_step_engine.py).
    unstarted, fell, below = parts.uncommon()
    assert unstarted == f"({parts.last} unless {parts.exact_start})"
    assert fell == '(resets(llm_tokens_total{token_type="input"}[360s]) > 0)'
    assert below == f"({parts.first} < {parts.exact_start})"
    assert f"count by (namespace, pod) ({unstarted} or {fell} or {below} or " in text
    # 3 window reads and 3 operations between series per counter (the version before: 4, 5).
    assert text.count("[60s]") == 3 * 3 and text.count("[360s]") == 3
    assert text.count(" - ") == 3 and text.count(" unless ") == 3 and text.count(" < ") == 3


def test_too_many_pairs_to_name_read_the_whole_source_and_go_on_doing_so(serve: Any) -> None:
    many = [item("1", tb_kind=promql.UNCOMMON, namespace=f"ns-{i:04}", pod=f"pod-{i:04}")
            for i in range(600)]
    fake = serve(lambda path, params: vector(*(
        many if params["query"] == promql.common(COUNTERS, 60) else [])))
    source = PrometheusSource(fake.url)
    source.read_spend(COUNTERS, 60, NOW, part="w")
    source.read_spend(COUNTERS, 60, NOW, part="w")
    whole = promql.spend(COUNTERS, 60)
    assert fake.queries == [promql.common(COUNTERS, 60), whole, whole]


def test_the_windows_read_through_the_rules_share_their_tail_and_keep_a_settled_head(
        serve: Any) -> None:
    last = NOW - dt.timedelta(minutes=20)  # the rule's last run
    rule = promql.rule_name(COUNTERS)

    def answer(path: str, params: dict[str, str]) -> Answer:
        q = params["query"]
        if path.endswith("/status/runtimeinfo"):
            return 200, {"status": "success", "data": {"storageRetention": "30d"}}
        if q.startswith(rule):  # when the rule last ran: a range vector
            return 200, {"status": "success", "data": {"resultType": "matrix", "result": [
                {"metric": {}, "values": [[last.timestamp(), "1"]]}]}}
        return vector()

    fake = serve(answer)
    budget = b.token_budget(limits=[{"window": "Day", "tokens": 10},
                                    {"window": "24h", "tokens": 10},
                                    {"window": "Month", "tokens": 10}])
    source = PrometheusSource(fake.url)
    source.collect(planner.plan([budget], NOW), NOW)
    raw = [q for q in fake.queries if q.startswith("label_replace")]
    # One tail for the three windows; a head each for Day and Month (they begin apart);
    # the rolling 24h head from two levels (metrics.heads).
    assert raw.count(promql.common(COUNTERS, 1200)) == 1
    assert len(raw) == 1 + 2 + 1  # tail, calendar heads, burn rate
    # Read at the head's end: each group's level, count and newest sample, and the checks;
    # at its start: each group's level and count.
    levels = [q for _, q in promql.levels(COUNTERS)]
    newest = [q for tag, q in promql.levels(COUNTERS, latest=True) if tag.endswith(":t")]
    assert {q: fake.queries.count(q) for q in [*levels, *newest, promql.head_checks(COUNTERS)]} \
        == {**{q: 2 for q in levels}, **{q: 1 for q in newest}, promql.head_checks(COUNTERS): 1}
    # Recorded buckets, a span each.
    assert len([q for q in fake.queries if q.startswith("sum by") and rule in q]) == 3
    # The next evaluation reads the settled parts once more: kept only when two reads agree.
    second = NOW + dt.timedelta(seconds=15)
    before = len(fake.queries)
    source.collect(planner.plan([budget], second), second)
    assert len([q for q in fake.queries[before:] if q.startswith("sum by") and rule in q]) == 3
    assert [q for q in fake.queries[before:] if q == promql.head_checks(COUNTERS)]
    later = NOW + dt.timedelta(seconds=30)
    before = len(fake.queries)
    source.collect(planner.plan([budget], later), later)
    again = [q for q in fake.queries[before:] if q.startswith("label_replace")]
    # The calendar windows' heads lie in the past and have not moved: not read again;
    # nor are the recorded buckets, read at the rule's last run, nor the rolling head's end.
    # The tail and the burn rate are read anew, and the rolling head's start level.
    assert len(again) == 1 + 1
    assert not [q for q in fake.queries[before:] if q.startswith("sum by") and rule in q]
    assert not [q for q in fake.queries[before:] if q == promql.head_checks(COUNTERS)]
    assert len([q for q in fake.queries[before:] if q in levels]) == len(levels)
    # One head and one set of buckets kept per window, and the rolling head's end:
    # memory does not grow.
    for i in range(2, 5):
        at = NOW + dt.timedelta(seconds=30 * i)
        source.collect(planner.plan([budget], at), at)
    # (the rolling head, read anew each evaluation, is never the same twice: never kept)
    assert len(source._parts) == 3 + 2 + 1 and not source._reads


def _hourly_rule(runs: list[dt.datetime], short: list[bool] | None = None
                 ) -> Callable[[str, dict[str, str]], Answer]:
    """A Prometheus whose rule last ran at ``runs[-1]`` and whose buckets hold 1,000 tokens
    an hour of the window (one bucket fewer while ``short[0]``: a read not yet complete)."""
    rule = promql.rule_name(COUNTERS)

    def answer(path: str, params: dict[str, str]) -> Answer:
        q = params.get("query", "")
        if path.endswith("/status/runtimeinfo"):
            return 200, {"status": "success", "data": {"storageRetention": "30d"}}
        if q.startswith(rule):
            return 200, {"status": "success", "data": {"resultType": "matrix", "result": [
                {"metric": {}, "values": [[runs[-1].timestamp(), "1"]]}]}}
        if q.startswith("sum by") and rule in q:
            hours = int(q.split("[")[1].split("s]")[0]) // 3600 + 1
            hours -= 1 if short and short[0] else 0
            return vector(item(str(1000 * hours), tb_kind="input", namespace="a", pod="p",
                               model="m"))
        return vector()
    return answer


def _spent(source: PrometheusSource, budget: Any, at: dt.datetime) -> float:
    snap = source.collect(planner.plan([budget], at), at)
    return sum(s.tokens for series in snap.windows.values() for s in series)


def test_the_recorded_buckets_are_read_again_when_the_rule_has_run_again(serve: Any) -> None:
    runs = [NOW - dt.timedelta(minutes=20)]  # the rule's runs, last one last
    fake = serve(_hourly_rule(runs))
    budget = b.token_budget(limits=[{"window": "24h", "tokens": 10}])
    source = PrometheusSource(fake.url)

    def spent(at: dt.datetime) -> float:
        return _spent(source, budget, at)

    def buckets_read() -> int:
        return len([q for q in fake.queries if q.startswith("sum by")
                    and promql.rule_name(COUNTERS) in q])

    assert spent(NOW) == 23_000 and buckets_read() == 1
    assert spent(NOW + dt.timedelta(minutes=1)) == 23_000 and buckets_read() == 2  # agrees
    assert spent(NOW + dt.timedelta(minutes=30)) == 23_000 and buckets_read() == 2
    # The rule ran again: the window holds another bucket, which is read (and the
    # oldest hour is the raw head's now), not the figure kept from the run before.
    runs.append(NOW + dt.timedelta(minutes=40))
    later = NOW + dt.timedelta(minutes=81, seconds=1)
    assert spent(later) == 23_000 and buckets_read() == 3
    assert promql.recorded(COUNTERS, 22 * 3600 + 1) in fake.queries


def test_a_bucket_read_is_kept_only_once_a_second_read_agrees(serve: Any) -> None:
    # Two Prometheus replicas behind one Service run the rule at the same instants; at the
    # first evaluation the rule run is seen on one while the buckets query reaches the
    # other, not done with that run (or Thanos answers a partial response): 22 buckets of
    # 1,000 tokens instead of 23. Kept, that read under-read until the rule ran again.
    short = [True]
    fake = serve(_hourly_rule([NOW - dt.timedelta(minutes=20)], short))
    budget = b.token_budget(limits=[{"window": "24h", "tokens": 10}])
    source = PrometheusSource(fake.url)
    rule = promql.rule_name(COUNTERS)

    def spent(at: dt.datetime) -> float:
        return _spent(source, budget, at)

    def bucket_reads() -> int:
        return len([q for q in fake.queries if q.startswith("sum by") and rule in q])

    assert spent(NOW) == 22_000  # the incomplete read
    short[0] = False
    assert spent(NOW + dt.timedelta(seconds=30)) == 23_000  # read again, not kept
    assert spent(NOW + dt.timedelta(seconds=60)) == 23_000  # the same twice: kept from here
    assert spent(NOW + dt.timedelta(seconds=90)) == 23_000
    assert bucket_reads() == 3


def test_a_head_with_too_many_pairs_to_name_is_read_whole_by_the_two_step_reading(
        serve: Any) -> None:
    """When the pairs the head's end check names are too many for a selector, the head is
    read as before (the two-step reading of the whole source), not from levels."""
    many = [item("1", namespace=f"ns-{i:04}", pod=f"pod-{i:04}") for i in range(600)]
    checks = promql.head_checks(COUNTERS)
    fake = serve(lambda path, params: vector(*(many if params["query"] == checks else [])))
    source = PrometheusSource(fake.url)
    end = NOW - dt.timedelta(hours=23)
    source._head(COUNTERS, 1800.0, end, NOW, promql.MAX_HORIZON_SECONDS, ("head", "24h"))
    assert checks in fake.queries
    assert fake.queries[-1] == promql.common(COUNTERS, 1800.0)
