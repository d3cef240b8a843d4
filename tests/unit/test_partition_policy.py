"""Budgets partitioned by a Prometheus label (spec.partition): the pure parts.

Covers:
- each value of the label gets the full limits and its own ladder; the
  unpartitioned partition (series without the label or with it empty) too;
- a partition's directive reaches only the workloads whose pods carry its value
  in podLabel; workloads without it follow the unpartitioned partition; a
  person's workload without spend is told Ok, and while spend cannot be read
  every person's follows whenSpendUnknown;
- PerNamespace cluster budgets partition per namespace x value, Shared ones per
  value across namespaces;
- hysteresis reads each partition's memory, read back from the status lists;
- the status summary is bounded (top and over) with 1,000 partitions, the
  budget's own state is its unpartitioned spend's, one Event names the changes;
- admission refuses a pod without podLabel and one whose partition is Blocked,
  with a message naming the partition and the budget; other partitions pass;
- spend grouped by the label picks what an Equal matcher picks, in order;
- the validating rules refuse a partition pinned to one value by a matcher or
  the selector;
- the plan reads the partition label; /metrics carry the budget's own scope only.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
from typing import Any

import pytest

from token_budget.api import rules
from token_budget.api import v1alpha1 as api
from token_budget.handlers import status as statuses
from token_budget.handlers.telemetry import Telemetry
from token_budget.metrics.prometheus import PrometheusSource as Prometheus
from token_budget.policy import admission, partitions, planner
from token_budget.policy.inputs import BudgetKey, Memory, ScopeKey, SpendSnapshot
from token_budget.policy.matchers import series_matches
from token_budget.policy.pricing import Prices
from token_budget.policy.spend import Spend
from token_budget.reports import spend as reports
from unit import builders as b
from unit.builders import NOW

OWNER = "tokenbudget.io/owner"
PARTITION = {"label": "user", "podLabel": OWNER, "statusTop": 3, "reportAtPercent": 80}
State = api.State


def _owned(name: str, user: str | None, namespace: str = b.NAMESPACE) -> Any:
    labels = {**b.AGENT, **({OWNER: user} if user is not None else {})}
    return b.workload(name, namespace, labels=labels)


def _budget(**fields: Any) -> api.TokenBudget:
    return b.token_budget(**{"partition": PARTITION, **fields})


def _by_partition(result: Any) -> dict[str | None, Any]:
    return {d.scope.partition: d for d in result.decisions}


def test_each_user_gets_the_full_limits_and_only_their_workloads_are_told() -> None:
    budget = _budget()
    result = b.evaluate(
        [budget],
        [b.series(1500, user="alice"), b.series(500, user="bob"), b.series(900, user="carol")],
        workloads=[_owned("alice-agent", "alice"), _owned("bob-agent", "bob"),
                   _owned("carol-agent", "carol")])
    by = _by_partition(result)
    assert by["alice"].state is State.BLOCKED
    assert by["bob"].state is State.OK
    assert by["carol"].state is State.WARNING
    assert 'partition user="alice"' in by["alice"].message
    assert result.directives[b.key("alice-agent")].blocked
    assert result.directives[b.key("bob-agent")].state is State.OK
    assert result.directives[b.key("carol-agent")].state is State.WARNING
    assert 'user="alice"' in result.directives[b.key("alice-agent")].message


@pytest.mark.parametrize(("value", "form"), [
    ("alice", "alice"), ("alice@corp.com", "alice_corp.com"), ("Bob Smith", "Bob_Smith"),
    ("-key:42-", "key_42"), ("x" * 70, "x" * 63)])
def test_a_value_no_pod_label_can_hold_has_a_label_form(value: str, form: str) -> None:
    assert partitions.label_form(value) == form


def test_people_named_by_e_mail_are_told_through_their_label_form() -> None:
    # end_user is often an e-mail, which no pod label value can hold: alice's pods carry
    # alice_corp.com. (Her partition was Blocked and her agent told Ok.)
    budget = _budget()
    result = b.evaluate([budget], [b.series(1500, user="alice@corp.com"),
                                   b.series(100, user="bob@corp.com")],
                        workloads=[_owned("alice-agent", "alice_corp.com"),
                                   _owned("bob-agent", "bob_corp.com")])
    assert result.directives[b.key("alice-agent")].blocked
    assert result.directives[b.key("bob-agent")].state is State.OK
    assert sorted(d.scope.partition or "" for d in result.decisions) == [
        "", "alice@corp.com", "bob@corp.com"]  # not the label forms again
    status = statuses.partitioned_status(budget, result.decisions, "USD", NOW, 0, None)
    read_back = budget.model_copy(update={"status": api.BudgetStatus.model_validate(status)})
    verdict = admission.review([read_back], b.catalog(), b.NAMESPACE, {},
                               {**b.AGENT, OWNER: "alice_corp.com"}, [], NOW)
    assert (verdict.allowed, verdict.reason) == (False, "BudgetBlocked")


def test_unlabelled_spend_is_one_partition_the_limits_apply_to() -> None:
    budget = _budget()
    result = b.evaluate(
        [budget], [b.series(700, workload="shared"), b.series(400, user="", workload="shared"),
                   b.series(10, user="alice")],
        workloads=[_owned("shared", None), _owned("alice-agent", "alice")])
    by = _by_partition(result)
    assert by[""].state is State.BLOCKED  # 700 + 400 of 1000
    assert by["alice"].state is State.OK
    assert result.directives[b.key("shared")].blocked
    assert not result.directives[b.key("alice-agent")].blocked


def test_a_budget_without_spend_has_its_unpartitioned_partition() -> None:
    result = b.evaluate([_budget()], [], workloads=[])
    assert [d.scope.partition for d in result.decisions] == [""]
    assert result.decisions[0].state is State.OK


def test_a_user_without_spend_is_told_ok_while_another_is_blocked() -> None:
    result = b.evaluate([_budget()], [b.series(5000, user="alice")],
                        workloads=[_owned("alice-agent", "alice"), _owned("dave-agent", "dave")])
    assert [d.scope.partition for d in result.decisions] == ["", "alice", "dave"]
    assert result.directives[b.key("alice-agent")].blocked
    assert result.directives[b.key("dave-agent")].state is State.OK


@pytest.mark.parametrize(("policy", "state"), [
    pytest.param("FailOpen", State.OK, id="failing open, every person is told Ok"),
    pytest.param("FailClosed", State.BLOCKED, id="failing closed, every person is Blocked"),
])
def test_while_spend_cannot_be_read_every_persons_workloads_follow_when_spend_unknown(
        policy: str, state: State) -> None:
    budget = _budget(whenSpendUnknown={"policy": policy})
    result = b.evaluate([budget], [], workloads=[_owned("a", "alice"), _owned("b", "bob")],
                        errors={api.Preset.COUNTERS: "Prometheus cannot be reached"})
    assert {d.scope.partition for d in result.decisions} == {"", "alice", "bob"}
    assert all(not d.spend_known for d in result.decisions)
    assert [result.directives[b.key(n)].state for n in ("a", "b")] == [state, state]


def test_per_namespace_partitions_are_namespace_by_value_and_shared_ones_are_by_value() -> None:
    namespaces = {"qa-1": {"environment": "qa"}, "qa-2": {"environment": "qa"}}
    spend = [b.series(600, namespace="qa-1", user="alice"),
             b.series(600, namespace="qa-2", user="alice")]
    work = [_owned("a", "alice", "qa-1"), _owned("a", "alice", "qa-2")]
    per_ns = b.cluster_budget(partition=PARTITION)
    result = b.evaluate([per_ns], spend, namespaces=namespaces, workloads=work)
    alice = [d for d in result.decisions if d.scope.partition == "alice"]
    assert [(d.scope.namespace, d.state) for d in alice] == [
        ("qa-1", State.OK), ("qa-2", State.OK)]
    shared = b.cluster_budget(scope="Shared", partition=PARTITION)
    result = b.evaluate([shared], spend, namespaces=namespaces, workloads=work)
    alice = [d for d in result.decisions if d.scope.partition == "alice"]
    assert [(d.scope.namespace, d.state) for d in alice] == [("", State.BLOCKED)]
    assert all(d.blocked for d in result.directives.values())


def test_hysteresis_reads_each_partitions_memory_and_status_carries_it_back() -> None:
    budget = _budget()
    spend = [b.series(970, user="alice"), b.series(970, user="bob")]
    work = [_owned("alice-agent", "alice"), _owned("bob-agent", "bob")]
    key = BudgetKey.of(budget)
    remembered = {ScopeKey(key, "", "alice"): Memory(State.BLOCKED, NOW)}
    by = _by_partition(b.evaluate([budget], spend, workloads=work, remembered=remembered))
    assert by["alice"].state is State.BLOCKED  # 97% is within 5 points of Block at 100
    assert by["bob"].state is State.WARNING
    status = api.BudgetStatus.model_validate({
        "state": "Ok", "partitions": {"label": "user", "over": [
            {"value": "alice", "state": "Blocked", "usedPercent": 101}]}})
    read = statuses.memory_of(budget.model_copy(update={"status": status}), BudgetKey.of)
    assert read[ScopeKey(key, "", "alice")].state is State.BLOCKED


def test_a_partition_remembered_blocked_whose_series_vanished_is_still_decided() -> None:
    budget = _budget(whenSpendUnknown={"policy": "Hold", "staleAfterSeconds": 3600})
    key = BudgetKey.of(budget)
    remembered = {ScopeKey(key, "", "alice"): Memory(State.BLOCKED, NOW)}
    result = b.evaluate([budget], [], workloads=[_owned("alice-agent", "alice")],
                        remembered=remembered, errors={api.Preset.COUNTERS: "down"})
    by = _by_partition(result)
    assert by["alice"].state is State.BLOCKED  # held while spend is unknown
    assert not by["alice"].spend_known


def _thousand(n: int = 1000) -> tuple[api.TokenBudget, Any]:
    budget = _budget()
    spend = [b.series(50 + i % 20 * 60, user=f"u{i:04}") for i in range(n)]
    return budget, b.evaluate([budget], spend, workloads=[])


def test_the_over_list_is_bounded_blocked_first() -> None:
    budget, result = _thousand(3000)  # 1,050 restricted, 450 of them Blocked
    status = statuses.partitioned_status(budget, result.decisions, "USD", NOW, 0, None)
    p = status["partitions"]
    assert len(p["over"]) == api.PARTITIONS_OVER_SHOWN < p["overCount"] == 1050
    assert all(e["state"] == "Blocked" for e in p["over"][:p["blocked"]])
    api.BudgetStatus.model_validate(status)  # within the schema's bounds


def test_admission_sees_every_blocked_person_of_a_large_budget() -> None:
    # 150 people Blocked: the status used to list 100, and the 150th was admitted.
    budget = _budget()
    spend = [b.series(5000, user=f"u{i:03d}", workload=f"w{i}") for i in range(150)]
    result = b.evaluate([budget], spend, workloads=[])
    status = statuses.partitioned_status(budget, result.decisions, "USD", NOW, 0, None)
    read_back = budget.model_copy(update={"status": api.BudgetStatus.model_validate(status)})
    for user in ("u000", "u149"):
        verdict = admission.review([read_back], b.catalog(), b.NAMESPACE, {},
                                   {**b.AGENT, OWNER: user}, [], NOW)
        assert (verdict.allowed, verdict.reason) == (False, "BudgetBlocked"), user


def test_a_thousand_partitions_give_a_bounded_status_and_one_event() -> None:
    budget, result = _thousand()
    assert len(result.decisions) == 1001  # the unpartitioned one too
    status = statuses.partitioned_status(budget, result.decisions, "USD", NOW, 0, None)
    p = status["partitions"]
    assert p["count"] == 1001
    assert p["blocked"] == sum(1 for i in range(1000) if 50 + i % 20 * 60 >= 1000)
    assert len(p["top"]) == 3 and p["top"][0]["usedPercent"] == 119
    # 350 restricted: every one listed, so admission and memory see every Blocked person.
    assert len(p["over"]) == p["overCount"] == p["restricted"] == 350
    assert [e["state"] for e in p["over"]][:p["blocked"]] == ["Blocked"] * p["blocked"]
    assert status["state"] == "Ok"  # the unpartitioned spend is none: not Blocked for all
    assert f"{p['restricted']} of 1001 partitions by user restricted" in status["message"]
    api.BudgetStatus.model_validate(status)  # within the schema's bounds
    said = statuses.partition_transitions(budget.spec.partition, None, result.decisions)
    assert said is not None and said[0] == "Warning"
    assert said[1].count("->") == statuses.TRANSITIONS_SHOWN
    assert said[1].endswith(f"and {p['restricted'] - statuses.TRANSITIONS_SHOWN} more")
    # The same states again: nothing to announce, although over was cut at 100.
    assert statuses.partition_transitions(budget.spec.partition, status,
                                          result.decisions) is None
    small = b.evaluate([budget], [b.series(2000, user="alice")], workloads=[])
    again = statuses.partitioned_status(budget, small.decisions, "USD", NOW, 0, None)
    assert statuses.partition_transitions(budget.spec.partition, again,
                                          small.decisions) is None


def _with_status(budget: api.Budget, over: list[dict[str, Any]]) -> api.Budget:
    status = api.BudgetStatus.model_validate(
        {"state": "Ok", "partitions": {"label": "user", "over": over}})
    return budget.model_copy(update={"status": status})


@pytest.mark.parametrize(("labels", "allowed", "reason", "words"), [
    pytest.param({OWNER: "bob"}, True, "Allowed", "", id="another user's pod is admitted"),
    pytest.param({OWNER: "alice"}, False, "BudgetBlocked",
                 'TokenBudget team-search/search is Blocked for partition user="alice"',
                 id="the blocked user's pod is refused, naming the partition and the budget"),
    pytest.param({}, False, "PartitionLabelMissing",
                 "must carry the label tokenbudget.io/owner",
                 id="a pod without the owner label is refused"),
])
def test_admission_refuses_the_pods_of_a_blocked_partition_only(
        labels: dict[str, str], allowed: bool, reason: str, words: str) -> None:
    budget = _with_status(_budget(), [{"value": "alice", "state": "Blocked"}])
    verdict = admission.review([budget], b.catalog(), b.NAMESPACE, {}, {**b.AGENT, **labels},
                               [], NOW)
    assert (verdict.allowed, verdict.reason) == (allowed, reason)
    assert words in verdict.message


@pytest.mark.parametrize(("over", "allowed"), [
    pytest.param([{"value": "alice", "state": "Blocked"}], True,
                 id="admitted into the unpartitioned partition"),
    pytest.param([{"value": "", "state": "Blocked"}], False,
                 id="refused while the unpartitioned partition is Blocked"),
])
def test_an_unlabelled_pod_of_a_known_workload_is_not_stopped_by_partitioning(
        over: list[dict[str, Any]], allowed: bool) -> None:
    # An agent running unlabelled before its budget was partitioned: its restarts and
    # scale-ups must go on (owned), while a new unlabelled pod of nobody's is refused.
    budget = _with_status(_budget(), over)
    owned = admission.review([budget], b.catalog(), b.NAMESPACE, {}, dict(b.AGENT), [], NOW,
                             owned=True)
    assert owned.allowed is allowed
    bare = admission.review([budget], b.catalog(), b.NAMESPACE, {}, dict(b.AGENT), [], NOW)
    assert (bare.allowed, bare.reason) == (False, "PartitionLabelMissing")


@pytest.mark.parametrize(("old", "new", "refused"), [
    pytest.param({OWNER: "alice"}, {}, "must not be removed", id="removing the label"),
    pytest.param({OWNER: "alice"}, {OWNER: "bob"}, "while TokenBudget team-search/search "
                 'is Blocked for partition user="alice"', id="leaving a Blocked partition"),
    pytest.param({OWNER: "bob"}, {OWNER: "carol"}, None, id="handing a workload over"),
    pytest.param({}, {OWNER: "carol"}, None, id="labelling an unlabelled workload"),
    pytest.param({OWNER: "alice"}, {OWNER: "alice", "x": "y"}, None, id="other labels"),
])
def test_the_partition_label_cannot_be_used_to_leave_a_block(
        old: dict[str, str], new: dict[str, str], refused: str | None) -> None:
    budget = _with_status(_budget(), [{"value": "alice", "state": "Blocked"}])
    why = admission.partition_label_change([budget], b.NAMESPACE, {}, {**b.AGENT, **old},
                                           {**b.AGENT, **new}, NOW)
    if refused is None:
        assert why is None
    else:
        assert why is not None and refused in why


def test_labelling_is_no_way_out_of_a_blocked_unpartitioned_partition() -> None:
    budget = _with_status(_budget(), [{"value": "", "state": "Blocked"}])
    why = admission.partition_label_change([budget], b.NAMESPACE, {}, dict(b.AGENT),
                                           {**b.AGENT, OWNER: "nobody"}, NOW)
    assert why is not None and "must not be added while" in why
    assert 'Blocked for partition user unset' in why


def test_a_new_pod_of_a_blocked_partition_starts_with_its_state() -> None:
    budget = _with_status(_budget(), [{"value": "alice", "state": "Warning"}])
    alice = admission.directive_for([budget], b.catalog(), b.NAMESPACE, {},
                                    {**b.AGENT, OWNER: "alice"}, [], NOW)
    bob = admission.directive_for([budget], b.catalog(), b.NAMESPACE, {},
                                  {**b.AGENT, OWNER: "bob"}, [], NOW)
    assert alice is not None and alice.state is State.WARNING
    assert bob is not None and bob.state is State.OK


def test_a_dry_run_partitioned_budget_refuses_nothing() -> None:
    budget = _with_status(_budget(mode="DryRun"), [{"value": "alice", "state": "Blocked"}])
    for labels in ({OWNER: "alice"}, {}):
        assert admission.review([budget], b.catalog(), b.NAMESPACE, {}, {**b.AGENT, **labels},
                                [], NOW).allowed


def test_the_plan_reads_the_partition_label_for_every_budget_of_the_source() -> None:
    plan = planner.plan([_budget()], NOW)
    assert [labels for labels in plan.group_labels.values()] == [("user",)]
    # One source, one reading when the plan is not told which labels the rules keep: a plain
    # budget beside a partitioned one reads the label too (the operator tells it, and then
    # splits long windows: see test_rules_keep_labels.py).
    plain = b.token_budget("plain", "other")
    plan = planner.plan([plain, _budget()], NOW)
    assert list(plan.group_labels.values()) == [("user",)]


def test_the_partition_spec_rejects_a_bad_pod_label() -> None:
    with pytest.raises(ValueError, match="pod_label|podLabel"):
        _budget(partition={"label": "user", "podLabel": "not a label"})


def test_reading_the_time_is_not_needed_to_route_a_partition() -> None:
    # Two evaluations one hour apart with the same spend route the same workloads.
    budget = _budget(limits=[{"window": "Month", "tokens": 1000}])
    spend = [b.series(1500, user="alice")]
    work = [_owned("alice-agent", "alice"), _owned("bob-agent", "bob")]
    one = b.evaluate([budget], spend, workloads=work)
    two = b.evaluate([budget], spend, workloads=work, now=NOW + dt.timedelta(hours=1))
    assert sorted(one.directives) == sorted(two.directives)
    assert one.directives[b.key("alice-agent")].blocked
    assert not one.directives[b.key("bob-agent")].blocked


def test_metrics_export_the_budgets_own_spend_not_one_series_per_person() -> None:
    result = b.evaluate([_budget()], [b.series(300, workload="shared"),
                                      b.series(5000, user="alice")],
                        workloads=[_owned("alice-agent", "alice")])
    telemetry = Telemetry(None)
    telemetry.observe(result, 0.1)
    labels = {"kind": "TokenBudget", "budget_namespace": b.NAMESPACE, "budget": "search",
              "scope": ""}
    assert telemetry.registry.get_sample_value(
        "tokenbudget_state", {**labels, "state": "Ok"}) == 1.0
    assert telemetry.registry.get_sample_value(
        "tokenbudget_spend_tokens", {**labels, "window": "24h"}) == 300.0
    states = [s for m in telemetry.registry.collect() if m.name == "tokenbudget_state"
              for s in m.samples]
    assert len(states) == len(api.State)  # one scope exported, whatever the partitions


def test_a_partition_listed_at_zero_is_new_not_an_outage_when_its_pods_run() -> None:
    budget = _budget()
    status = api.BudgetStatus.model_validate({
        "state": "Ok", "lastSpendTime": NOW.isoformat(), "partitions": {"label": "user", "top": [
            {"value": "alice", "state": "Warning", "usedPercent": 85},
            {"value": "", "state": "Ok", "usedPercent": 0}]}})
    remembered = statuses.memory_of(budget.model_copy(update={"status": status}),
                                    BudgetKey.of)
    shared = b.workload("shared", labels=b.AGENT, pods=2)  # no owner label, pods running
    result = b.evaluate([budget], [b.series(850, user="alice")],
                        workloads=[shared, _owned("alice-agent", "alice")],
                        remembered=remembered)
    by = _by_partition(result)
    assert by[""].spend_known and by[""].state is State.OK
    assert result.directives[b.key("shared")].state is State.OK
    # alice had spend: her series vanishing while her pods run is an outage, as for any scope.
    alice = _owned("alice-agent", "alice")
    result = b.evaluate([budget], [], workloads=[dataclasses.replace(alice, settled_pods=2)],
                        remembered=remembered)
    assert not _by_partition(result)["alice"].spend_known



def test_grouping_by_the_label_picks_what_the_equal_matcher_picks_in_order() -> None:
    rng = random.Random(18)
    series = [b.series(rng.randint(0, 99), workload=f"w{i}",
                       **({"user": rng.choice(["a", "b", ""])} if rng.random() < 0.7 else {}),
                       **({"team": rng.choice(["x", "y"])} if rng.random() < 0.5 else {}))
              for i in range(300)]
    base = (api.SpendMatcher(label="team", value="x"),)
    for matchers in ((), base):
        grouped = Spend(series, Prices(b.catalog()), lambda a, m: a == m)
        for value in ("a", "b", "", "nobody"):
            eq = (*matchers, api.SpendMatcher(label="user", value=value))
            plain = [s for s in series if series_matches(s, eq)]
            assert list(grouped.chosen(b.NAMESPACE, eq)) == plain


def test_partitions_swapping_ranks_write_no_status_until_the_heartbeat() -> None:
    budget = _budget()
    one = b.evaluate([budget], [b.series(500, user="alice"), b.series(400, user="bob")],
                     workloads=[])
    two = b.evaluate([budget], [b.series(500, user="alice"), b.series(600, user="bob")],
                     workloads=[])
    old = statuses.partitioned_status(budget, one.decisions, "USD", NOW, 0, None)
    budget = budget.model_copy(update={"status": api.BudgetStatus.model_validate(old)})
    later = NOW + dt.timedelta(seconds=30)
    new = statuses.partitioned_status(budget, two.decisions, "USD", later, 0, old)
    assert [e["value"] for e in new["partitions"]["top"]] == ["bob", "alice", ""]
    assert not statuses.changed(old, new, later, heartbeat_seconds=300)
    assert statuses.changed(old, new, NOW + dt.timedelta(seconds=301), heartbeat_seconds=300)
    three = b.evaluate([budget], [b.series(500, user="alice"), b.series(900, user="bob")],
                       workloads=[])
    warned = statuses.partitioned_status(budget, three.decisions, "USD", later, 0, old)
    assert statuses.changed(old, warned, later, heartbeat_seconds=300)  # bob is Warning now


@pytest.mark.parametrize(("fields", "path", "words"), [
    pytest.param({"spendMatchers": [{"label": "user", "value": "alice"}]},
                 "spec.partition.label", 'must not be a label spendMatchers[0] pins to one '
                 'value (user="alice")', id="a matcher pinning the partition label is refused"),
    pytest.param({"selector": {"matchLabels": {OWNER: "alice"}}}, "spec.partition.podLabel",
                 'must not be a label the selector pins to one value '
                 '(tokenbudget.io/owner="alice")',
                 id="a selector pinning the pod label is refused"),
])
def test_a_partition_that_cannot_split_is_refused(fields: dict[str, Any], path: str,
                                                  words: str) -> None:
    [problem] = rules.problems(_budget(**fields), None)
    assert problem.path == path and problem.message.startswith(words)


def test_a_partition_beside_other_matchers_is_valid() -> None:
    fields = {"spendMatchers": [{"label": "user", "operator": "NotEqual", "value": "bot"},
                                {"label": "team", "value": "search"}]}
    assert rules.problems(_budget(**fields), None) == []


class _Spent(Prometheus):
    """A Prometheus whose every spend reading answers ``series``."""

    def __init__(self, series: list[Any]) -> None:
        super().__init__("http://prometheus.invalid")
        self.series = tuple(series)

    def collect(self, plan: Any, at: dt.datetime) -> Any:
        return SpendSnapshot(taken_at=at, windows={k: self.series for k in plan.windows})


def test_the_report_lists_the_top_spenders_bounded_and_agreeing_with_the_status() -> None:
    budget = _budget()  # 24h, 1,000 tokens; statusTop 3
    spend = ([b.series(100 + 10 * i, user=f"u{i:02d}", workload=f"w{i}") for i in range(40)]
             + [b.series(77, workload="shared")] + [b.series(5, namespace="other", user="u39")])
    rep = reports.build(_Spent(spend), [budget], b.catalog(), {b.NAMESPACE: {}, "other": {}},
                        86400, NOW)
    name = f"TokenBudget/{b.NAMESPACE}/search"
    part = rep.by_partition[name]
    assert part.count == 40 and [v for v, _ in part.ranked()] == ["u39", "u38", "u37"]
    # The status's figures over the same window: every person's tokens, to the token.
    decided = {d.scope.partition: d.windows[0].tokens
               for d in b.evaluate([budget], spend, workloads=[]).decisions}
    assert {v: round(r.tokens) for v, r in part.rows.items()} == decided
    body = rep.to_json()["byPartition"][0]
    assert (body["count"], len(body["top"]), body["unpartitioned"]["tokens"]) == (40, 3, 77)
    text = reports.table(rep)
    assert "40 values of user, the top 3" in text and "(user unset)" in text
    assert "u36" not in text  # bounded: 40 people are not 40 lines
    wide = reports.build(_Spent(spend), [budget], b.catalog(), {b.NAMESPACE: {}}, 86400, NOW,
                         top=10)
    assert len(wide.by_partition[name].ranked()) == 10
    assert "partition" in reports.to_csv(wide)
