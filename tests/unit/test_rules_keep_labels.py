"""Recording rules that keep chosen labels, and who reads them (the pure parts).

Covers:
- ``tokenbudget rules --keep-label user`` groups every rule by the label too
  (promtool accepts the file), and says which operator flag goes with it;
- ``tokenbudget run --rules-keep-label`` (repeatable, or comma-separated in
  the variable) reaches the settings;
- the plan: with the rules keeping ``user``, a Month budget partitioned by
  user and one without a partition share one reading grouped by user; one
  partitioned by a label the rules do not keep is read apart, once per label
  set, and only in windows long enough for the rules; without ``kept`` nothing
  is split;
- the engine reads each budget's spend from its own reading, and a refused
  apart reading makes only its budgets' spend unknown;
- PromQL ranges of a rule-read window's raw parts are exact to the millisecond;
- the adapter trusts a kept label no raw series carries, and reads raw (with a
  warning) a kept label that raw series carry but the recorded ones lack.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from token_budget import settings
from token_budget.api import v1alpha1 as api
from token_budget.cli import build_parser, main
from token_budget.metrics import promql
from token_budget.metrics.prometheus import PrometheusSource
from token_budget.policy import planner, sources
from token_budget.policy.inputs import SpendSnapshot
from token_budget.policy.windows import WindowKey
from unit import builders as b
from unit.builders import NOW
from unit.test_prometheus_adapter import Answer, FakePrometheus, item, vector

COUNTERS = sources.resolve(api.SpendSource())
MONTH = WindowKey("Month", "UTC")
OWNER = "tokenbudget.io/owner"
State = api.State


def _budget(name: str, partition: str | None = None, window: str = "Month",
            tokens: int = 1000) -> api.TokenBudget:
    fields: dict[str, object] = {"limits": [{"window": window, "tokens": tokens}]}
    if partition is not None:
        fields["partition"] = {"label": partition, "podLabel": OWNER}
    return b.token_budget(name, **fields)


def test_the_rules_generated_with_keep_label_group_every_rule_by_it(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["rules", "--keep-label", "user", "--keep-label", "team"]) == 0
    text = capsys.readouterr().out
    assert "--rules-keep-label user --rules-keep-label team" in text
    doc = yaml.safe_load(text)
    [group] = doc["groups"]
    for rule in group["rules"]:
        sums = rule["expr"].count("sum by (")
        assert sums and rule["expr"].count(", user, team) (") == sums, rule["record"]
    # The same rules without the flag keep neither label.
    assert main(["rules"]) == 0
    assert "user" not in capsys.readouterr().out
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool must be on PATH (tests/e2e need it too)"
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_the_operator_is_told_which_labels_the_rules_keep() -> None:
    args = build_parser().parse_args(
        ["run", "--rules-keep-label", "user", "--rules-keep-label", "team"])
    assert settings.from_args(args).rules_keep_labels == ("user", "team")
    assert settings.Settings().rules_keep_labels == ()


def test_a_partition_on_a_kept_label_shares_the_reading_of_the_budget_without_one() -> None:
    plan = planner.plan([_budget("per-user", "user"), _budget("whole")], NOW, kept=("user",))
    assert list(plan.windows) == [(COUNTERS, MONTH)]
    assert plan.labels_of(COUNTERS, MONTH) == ("user",)


def test_a_partition_on_a_label_the_rules_lack_is_read_apart_and_only_it() -> None:
    budgets = [_budget("per-user", "user"), _budget("whole"), _budget("per-team", "team"),
               _budget("per-team-2", "team", tokens=5)]
    plan = planner.plan(budgets, NOW, kept=("user",))
    team = WindowKey("Month", "UTC", ("team",))
    # One query per (source, window, label set): the two team budgets share theirs.
    assert set(plan.windows) == {(COUNTERS, MONTH), (COUNTERS, team)}
    assert plan.labels_of(COUNTERS, MONTH) == ("user",)
    assert plan.labels_of(COUNTERS, team) == ("team",)
    # The burn rate (short) still reads every label in one query.
    assert plan.group_labels[COUNTERS] == ("team", "user")


def test_short_windows_and_plans_without_kept_labels_are_not_split() -> None:
    short = planner.plan([_budget("a", "team", window="1h"), _budget("b", window="1h")], NOW,
                         kept=())
    assert list(short.windows) == [(COUNTERS, WindowKey("1h"))]
    assert short.labels_of(COUNTERS, WindowKey("1h")) == ("team",)
    # Rules that keep nothing beyond their grouping (the operator's default): the partitioned
    # Month is read apart, the other budget's Month keeps the rules.
    nothing_kept = planner.plan([_budget("a", "team"), _budget("b")], NOW, kept=())
    assert set(nothing_kept.windows) == {(COUNTERS, MONTH),
                                         (COUNTERS, WindowKey("Month", "UTC", ("team",)))}
    assert nothing_kept.labels_of(COUNTERS, MONTH) == ()
    unsplit = planner.plan([_budget("a", "team"), _budget("b")], NOW)
    assert list(unsplit.windows) == [(COUNTERS, MONTH)]
    assert unsplit.labels_of(COUNTERS, MONTH) == ("team",)
    # A matcher on a label the rules group by anyway (the pod) needs no kept label.
    pod = b.token_budget("pod", limits=[{"window": "Month", "tokens": 1}],
                         spendMatchers=[{"label": "pod", "operator": "Regex", "value": "a.*"}])
    assert list(planner.plan([pod, _budget("b")], NOW, kept=()).windows) == [(COUNTERS, MONTH)]


def _snapshot(budgets: list[api.TokenBudget], apart_error: str | None = None) -> SpendSnapshot:
    plan = planner.plan(budgets, NOW, kept=("user",))
    team = WindowKey("Month", "UTC", ("team",))
    windows = {(COUNTERS, MONTH): (b.series(700, user="alice"), b.series(200, user="bob"))}
    errors = {}
    if apart_error is None:
        windows[(COUNTERS, team)] = (b.series(700, team="red"), b.series(200, team="blue"))
    else:
        errors[(COUNTERS, team)] = apart_error
    assert set(plan.windows) == {(COUNTERS, MONTH), (COUNTERS, team)}
    return SpendSnapshot(taken_at=NOW, windows=windows, recent={COUNTERS: ()},
                         window_errors=errors)


def _used(result: object) -> dict[tuple[str, str | None], float]:
    return {(d.scope.budget.name, d.scope.partition): d.windows[0].tokens
            for d in result.decisions if d.windows}  # type: ignore[attr-defined]


def test_each_budget_reads_its_own_reading_of_the_window() -> None:
    budgets = [_budget("per-user", "user"), _budget("whole"), _budget("per-team", "team")]
    used = _used(b.evaluate(budgets, snap=_snapshot(budgets)))
    assert used[("per-user", "alice")] == 700 and used[("per-user", "bob")] == 200
    assert used[("per-team", "red")] == 700 and used[("per-team", "blue")] == 200
    assert used[("whole", None)] == 900


def test_a_refused_apart_reading_makes_only_its_budgets_spend_unknown() -> None:
    budgets = [_budget("per-user", "user"), _budget("whole"), _budget("per-team", "team")]
    why = "the Month query would hold about 99 samples: the recording rules keep no label team"
    result = b.evaluate(budgets, snap=_snapshot(budgets, apart_error=why))
    used = _used(result)
    assert used[("whole", None)] == 900 and used[("per-user", "alice")] == 700
    team = [d for d in result.decisions if d.scope.budget.name == "per-team"]
    assert team and all(not d.windows and "keep no label team" in d.message for d in team)


@pytest.mark.parametrize(("seconds", "text"), [
    pytest.param(3600, "3600s", id="whole seconds stay seconds"),
    pytest.param(1234.512, "1234512ms", id="a join at a rule's phase is exact to the millisecond"),
    pytest.param(0.25, "250ms", id="less than a second"),
])
def test_raw_parts_of_a_rule_read_window_have_exact_ranges(seconds: float, text: str) -> None:
    assert promql.duration(seconds) == text
    assert f"[{text}]" in promql.spend(COUNTERS, seconds)


def _rules_without_user(carried: bool) -> Callable[[str, dict[str, str]], Answer]:
    """A Prometheus whose rule ran 10 minutes ago and recorded no ``user`` label; its raw
    series carry ``user`` or not."""
    ran = NOW.timestamp() - 600

    def answer(path: str, params: dict[str, str]) -> Answer:
        q = params.get("query", "")
        if q == promql.last_recorded(COUNTERS):
            return 200, {"status": "success", "data": {"resultType": "matrix", "result": [
                {"metric": {"__name__": promql.rule_name(COUNTERS), "namespace": b.NAMESPACE},
                 "values": [[ran, "1"]]}]}}
        if 'user!=""' in q and carried:
            return vector(item("3", tb_kind="user"))
        return vector()

    return answer


@contextlib.contextmanager
def _serving(answer: Callable[[str, dict[str, str]], Answer]) -> Iterator[FakePrometheus]:
    fake = FakePrometheus(answer)
    fake.thread.start()
    try:
        yield fake
    finally:
        fake.server.shutdown()
        fake.server.server_close()
        fake.thread.join(timeout=5)


def _collect(carried: bool) -> tuple[SpendSnapshot, list[str]]:
    plan = planner.plan([_budget("per-user", "user")], NOW, kept=("user",))
    with _serving(_rules_without_user(carried)) as fake:
        snap = PrometheusSource(fake.url, rules_keep_labels=("user",)).collect(plan, NOW)
        return snap, fake.queries


def test_a_kept_label_no_series_carries_is_trusted_and_the_rules_are_read(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        snap, queries = _collect(carried=False)
    assert not snap.errors and not snap.window_errors
    assert any(q.startswith("sum by (namespace, pod, model, user, tb_kind) (sum_over_time(")
               for q in queries)
    assert "keeps no label" not in caplog.text


def test_a_kept_label_the_recorded_series_lack_but_raw_ones_carry_reads_raw(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        snap, queries = _collect(carried=True)
    assert not snap.errors and not snap.window_errors
    assert not any("sum_over_time(" in q for q in queries)
    assert "keeps no label user" in caplog.text
    assert "long windows grouped by user read the raw series" in caplog.text
