"""The agent helper, :mod:`token_budget.agent`, with an injected clock and no cluster.

Covers: the kubelet's file format (Go ``%q`` values, UTF-8 kept as is), the
directive each annotation makes, a missing file as an error (or as ungoverned
when asked), the token bucket keeping its level across rate changes, acquire
waiting until ``max_wait`` before it gives up, a Block or a new rate noticed
within ``poll_seconds`` while acquire waits, and the file read again only when
the kubelet replaces it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.kubelet import go_quote, project, render
from token_budget import agent

A = agent.PREFIX

# What the kubelet writes, produced by Go's fmt "%q" through fieldpath.FormatMap
# (go1.x, copied byte for byte): the reference the parser must read back.
KUBELET_FILE = (
    'note="line one\\nline \\"two\\"\\ttab\\\\ \\x01 \\x7f \\u200b end"\n'
    'tokenbudget.io/allowed-models="gpt-4o, gpt-4o-mini"\n'
    'tokenbudget.io/budget="TokenBudget/team-a/search"\n'
    'tokenbudget.io/reason="Zoë\'s budget — 東京 😀"\n'
    'tokenbudget.io/state="Throttled"\n'
    'tokenbudget.io/tokens-per-minute="1200"'
)


class Clock:
    """A monotonic clock that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []
        self.at: list[tuple[float, Callable[[], object]]] = []  # (time, what happens then)

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0, "a sleep of nothing would spin"
        self.slept.append(seconds)
        self.now += seconds
        for when, do in list(self.at):
            if self.now >= when:
                self.at.remove((when, do))
                do()


def governor(tmp_path: Path, clock: Clock, annotations: dict[str, str] | None = None,
             **kw: object) -> tuple[agent.Governor, Path]:
    path = tmp_path / "annotations"
    if annotations is not None:
        project(annotations, path)
    return agent.Governor(str(path), default_model="gpt-4o", clock=clock, sleep=clock.sleep,
                          **kw), path  # type: ignore[arg-type]


# -- the file format ------------------------------------------------------------


def test_the_kubelets_file_reads_back_every_value_exactly() -> None:
    got = agent.parse_annotations(KUBELET_FILE)
    assert got["tokenbudget.io/reason"] == "Zoë's budget — 東京 😀"
    assert got["note"] == 'line one\nline "two"\ttab\\ \x01 \x7f \u200b end'
    assert got["tokenbudget.io/tokens-per-minute"] == "1200"


@pytest.mark.parametrize("value", [
    pytest.param("Zoë", id="Latin-1 letters"),
    pytest.param("東京 😀", id="characters beyond the BMP"),
    pytest.param('a "quoted" \\ back\\slash', id="quotes and backslashes"),
    pytest.param("tab\tnew\nline\rbell\a\x00\x1f\x7f", id="control characters"),
    pytest.param("zero\u200bwidth\U000e0001tag", id="unprintable code points"),
    pytest.param("", id="empty"),
])
def test_any_value_the_kubelet_quotes_comes_back_unchanged(value: str) -> None:
    assert agent.parse_annotations(render({"k": value})) == {"k": value}


def test_the_harness_kubelet_quotes_as_go_does() -> None:
    go = dict(line.split("=", 1) for line in KUBELET_FILE.splitlines())
    parsed = agent.parse_annotations(KUBELET_FILE)
    for key, quoted in go.items():
        assert go_quote(parsed[key]) == quoted, key


@pytest.mark.parametrize("quoted", ['"\\q"', '"\\x4"', '"end\\"'])
def test_a_malformed_escape_is_an_error_not_a_guess(quoted: str) -> None:
    with pytest.raises(ValueError):
        agent.parse_annotations(f"k={quoted}")


# -- what the annotations say ---------------------------------------------------


@pytest.mark.parametrize(("annotations", "expected"), [
    pytest.param({}, agent.Directive(), id="no annotations: Ok, nothing imposed"),
    pytest.param({A + "allowed-models": "gpt-4o, gpt-4o-mini ,claude,"},
                 agent.Directive(allowed_models=frozenset({"gpt-4o", "gpt-4o-mini", "claude"})),
                 id="allowed models with spaces and a trailing comma"),
    pytest.param({A + "allowed-models": ""}, agent.Directive(),
                 id="an empty allowed list restricts nothing"),
    pytest.param({A + "state": "Throttled", A + "tokens-per-minute": " 1200 "},
                 agent.Directive(state="Throttled", tokens_per_minute=1200),
                 id="a rate with spaces"),
    pytest.param({A + "tokens-per-minute": "1,200"}, agent.Directive(),
                 id="a rate that is not a number is no rate"),
    pytest.param({A + "tokens-per-minute": "１２"}, agent.Directive(),
                 id="non-ASCII digits are no rate"),
    pytest.param({A + "state": "Rerouted", A + "use-model": "gpt-4o-mini",
                  A + "budget": "TokenBudget/a/b", A + "reason": "LimitReached"},
                 agent.Directive(state="Rerouted", use_model="gpt-4o-mini",
                                 budget="TokenBudget/a/b", reason="LimitReached"),
                 id="a reroute"),
])
def test_annotations_make_the_directive(annotations: dict[str, str],
                                        expected: agent.Directive) -> None:
    assert agent.directive_from(annotations) == expected


@pytest.mark.parametrize(("annotations", "wanted", "expected"), [
    pytest.param({}, None, "gpt-4o", id="nothing said: the default model"),
    pytest.param({}, "claude", "claude", id="nothing said: the model asked for"),
    pytest.param({A + "use-model": "gpt-4o-mini"}, "claude", "gpt-4o-mini",
                 id="a reroute wins over the model asked for"),
    pytest.param({A + "allowed-models": "gpt-4o, gpt-4o-mini"}, "gpt-4o-mini", "gpt-4o-mini",
                 id="an allowed model listed after a comma and a space"),
    pytest.param({A + "allowed-models": "gpt-4o-mini"}, "gpt-4o", agent.ModelNotAllowed,
                 id="a model not allowed"),
    pytest.param({A + "state": "Blocked"}, None, agent.Blocked, id="blocked"),
])
def test_model_answers_what_to_call(tmp_path: Path, annotations: dict[str, str],
                                    wanted: str | None, expected: object) -> None:
    gov, _ = governor(tmp_path, Clock(), annotations)
    if isinstance(expected, str):
        assert gov.model(wanted) == expected
    else:
        with pytest.raises(expected):  # type: ignore[call-overload]
            gov.model(wanted)


# -- a missing file ---------------------------------------------------------------


def test_a_missing_file_is_an_error_that_says_what_to_mount(tmp_path: Path) -> None:
    with pytest.raises(agent.DirectiveFileMissing, match="tokenbudget.io/inject=true"):
        governor(tmp_path, Clock())


def test_a_file_that_goes_away_is_an_error_too(tmp_path: Path) -> None:
    gov, path = governor(tmp_path, Clock(), {A + "state": "Ok"})
    path.unlink()
    with pytest.raises(agent.DirectiveFileMissing):
        gov.acquire(1)


def test_missing_ok_runs_ungoverned_until_the_file_appears(tmp_path: Path) -> None:
    gov, path = governor(tmp_path, Clock(), missing_ok=True)
    assert gov.directive() == agent.Directive()
    gov.acquire(10**9)  # no rate: no wait
    project({A + "state": "Blocked"}, path)
    with pytest.raises(agent.Blocked):
        gov.acquire(1)


# -- the token bucket -------------------------------------------------------------


@pytest.mark.parametrize(("first", "then", "level_before", "level_after"), [
    pytest.param(600, 1200, 100.0, 100.0, id="a higher rate does not refill the bucket"),
    pytest.param(1200, 600, 100.0, 100.0, id="a lower rate keeps a low level"),
    pytest.param(1200, 600, 1200.0, 600.0, id="a lower rate caps a full bucket at its minute"),
    pytest.param(600, 600, 0.0, 0.0, id="the same rate changes nothing"),
])
def test_a_rate_change_keeps_the_buckets_level(first: int, then: int, level_before: float,
                                               level_after: float) -> None:
    clock = Clock()
    bucket = agent.TokenBucket(first, clock)
    bucket.level = level_before
    bucket.set_rate(then)
    assert bucket.level == level_after
    clock.now += 60
    assert bucket.wait_time(then) == 0, "a minute later a full minute's worth is there"


def test_the_bucket_refills_at_the_old_rate_until_the_change() -> None:
    clock = Clock()
    bucket = agent.TokenBucket(600, clock)
    bucket.level = 0
    clock.now += 6  # 60 tokens at 600/min
    bucket.set_rate(6000)
    assert bucket.level == pytest.approx(60)


@pytest.mark.parametrize(("rate", "level", "tokens", "wait"), [
    pytest.param(600, 600.0, 100, 0.0, id="tokens there: no wait"),
    pytest.param(600, 50.0, 100, 5.0, id="50 tokens short at 10/s: 5 s"),
    pytest.param(600, 600.0, 6000, 0.0, id="more than a minute's worth waits for a full bucket"),
    pytest.param(600, 0.0, 6000, 60.0, id="and from empty that takes a minute"),
    pytest.param(0, 0.0, 1, float("inf"), id="a rate of zero lets nothing through"),
])
def test_wait_time(rate: int, level: float, tokens: int, wait: float) -> None:
    bucket = agent.TokenBucket(rate, Clock())
    bucket.level = level
    assert bucket.wait_time(tokens) == pytest.approx(wait)


def test_a_new_rate_in_the_file_is_no_new_burst(tmp_path: Path) -> None:
    clock = Clock()
    gov, path = governor(tmp_path, clock, {A + "tokens-per-minute": "600"})
    gov.acquire(600)  # the first minute's burst, spent
    project({A + "tokens-per-minute": "599"}, path)  # the pace moved by one token
    start = clock.now
    gov.acquire(599)
    assert clock.now - start == pytest.approx(60, abs=0.6), "it waited for a minute's refill"


def test_spent_settles_the_difference(tmp_path: Path) -> None:
    clock = Clock()
    gov, _ = governor(tmp_path, clock, {A + "tokens-per-minute": "600"})
    gov.acquire(600)
    gov.spent(-300)  # the call used 300 fewer than estimated
    start = clock.now
    gov.acquire(300)
    assert clock.now == start


# -- acquire --------------------------------------------------------------------


def test_acquire_waits_until_max_wait_before_giving_up(tmp_path: Path) -> None:
    clock = Clock()
    gov, _ = governor(tmp_path, clock, {A + "tokens-per-minute": "60"})
    gov.acquire(60)
    start = clock.now
    with pytest.raises(TimeoutError):
        gov.acquire(60, max_wait=10)
    assert clock.now - start == pytest.approx(10), "not at once, and not longer"


def test_acquire_takes_a_rate_raised_while_it_waits(tmp_path: Path) -> None:
    clock = Clock()
    gov, path = governor(tmp_path, clock, {A + "tokens-per-minute": "60"})
    gov.acquire(60)
    start = clock.now
    clock.at.append((start + 2, lambda: project({A + "tokens-per-minute": "6000"}, path)))
    gov.acquire(60, max_wait=10)  # 60 s at the old rate, under a second at the new one
    assert clock.now - start < 3


@pytest.mark.parametrize("poll", [0.5, 0.1])
def test_a_block_is_noticed_within_poll_seconds_while_acquire_waits(
        tmp_path: Path, poll: float) -> None:
    clock = Clock()
    gov, path = governor(tmp_path, clock, {A + "tokens-per-minute": "60"}, poll_seconds=poll)
    gov.acquire(60)
    blocked_at = clock.now + 3.03
    clock.at.append((blocked_at, lambda: project({A + "state": "Blocked"}, path)))
    with pytest.raises(agent.Blocked):
        gov.acquire(60)
    assert clock.now - blocked_at <= poll
    assert max(clock.slept) <= poll


def test_the_file_is_read_again_only_when_the_kubelet_replaces_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gov, path = governor(tmp_path, Clock(), {A + "state": "Ok"})
    reads = []
    real_open = open

    def counting_open(file: str, *args: object, **kwargs: object) -> object:
        reads.append(file)
        return real_open(file, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr("builtins.open", counting_open)
    for _ in range(5):
        gov.directive()
    assert reads == []
    st = path.stat()
    project({A + "state": "Warning"}, path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime: a new inode still tells
    assert gov.directive().state == "Warning"
    assert len(reads) == 1
