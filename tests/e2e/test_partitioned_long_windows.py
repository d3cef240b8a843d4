"""A monthly allowance per person read through recording rules that keep the person's label.

Five weeks of history for 300 series (3 namespaces x 4 users x 25 pods, each
series also labelled with its user's team, each a counter growing by whole
tokens every 5 minutes) are backfilled into a real Prometheus with ``promtool
tsdb create-blocks-from openmetrics``; the recording rules generated with
``--keep-label user`` (:func:`promql.rules_file`) are backfilled over the same
history with ``promtool tsdb create-blocks-from rules``. The evaluation time is
fixed inside the last month of that history, so the Month window is 28.5 days.

Covers (issue 18 part 3, long windows):

- with the rules keeping ``user``, a Month budget partitioned by ``user`` and a
  Month budget of the same source without a partition are read through the
  rules, under a sample limit that refuses the raw series, and the spend per
  (namespace, user) and per namespace equals the raw reading to the token;
- a Month budget partitioned by ``team``, which the rules do not keep, is read
  apart from the raw series, and only it is refused by that limit, with a
  message that names the label and the flags that fix it;
- an operator told that the rules keep ``team`` when they do not finds out from
  the recorded series, reads the raw series instead of putting every team's
  spend under an empty label, and says so when the raw read is refused;
- the samples a Month reading loads, through the rules with ``user`` and raw.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.prometheus import Prometheus, backfilled, find_binary
from token_budget.api import v1alpha1 as api
from token_budget.metrics import promql
from token_budget.metrics.prometheus import PrometheusSource
from token_budget.policy import planner, sources
from token_budget.policy.inputs import SpendSnapshot
from token_budget.policy.windows import WindowKey

STEP = 300
_THIS_MONTH = dt.datetime.now(dt.UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
# Inside the last month: a Month window of 28.5 days, whatever day the test runs.
END = _THIS_MONTH - dt.timedelta(days=1, hours=12)
START = END - dt.timedelta(days=35)
NAMESPACES = [f"allow-{i}" for i in range(3)]
USERS = ["alice", "bob", "carol", "dave"]
TEAM = {"alice": "red", "bob": "blue", "carol": "red", "dave": "blue"}
PODS = 25
COUNTERS = sources.resolve(api.SpendSource())
MONTH = WindowKey("Month", "UTC")


def tokens_per_step(ns: int, user: int, pod: int) -> int:
    return 10 * (ns + 1) + 3 * user + pod


def openmetrics() -> str:
    lines = ["# TYPE llm_tokens counter"]
    steps = int((END - START).total_seconds()) // STEP
    for n, ns in enumerate(NAMESPACES):
        for u, user in enumerate(USERS):
            for p in range(PODS):
                labels = (f'namespace="{ns}",pod="agent-{user}-{p}",model="gpt-4o",'
                          f'token_type="input",user="{user}",team="{TEAM[user]}"')
                rate = tokens_per_step(n, u, p)
                for i in range(steps + 1):
                    t = int(START.timestamp()) + i * STEP
                    lines.append(f"llm_tokens_total{{{labels}}} {rate * i} {t}")
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


def budget(name: str, partition: str | None) -> api.TokenBudget:
    spec: dict[str, Any] = {"limits": [{"window": "Month", "tokens": 1_000_000}]}
    if partition is not None:
        spec["partition"] = {"label": partition, "podLabel": "tokenbudget.io/owner"}
    return api.TokenBudget.model_validate({
        "apiVersion": api.API_VERSION, "kind": "TokenBudget",
        "metadata": {"name": name, "namespace": NAMESPACES[0]}, "spec": spec})


PER_USER, WHOLE, PER_TEAM = budget("per-user", "user"), budget("whole", None), \
    budget("per-team", "team")
BUDGETS = [PER_USER, WHOLE, PER_TEAM]


def totals(snap: SpendSnapshot, key: WindowKey, label: str | None) -> dict[tuple[str, str], int]:
    """Tokens per (namespace, value of ``label``) of one window of the snapshot."""
    out: dict[tuple[str, str], float] = {}
    for s in snap.windows[(COUNTERS, key)]:
        value = dict(s.labels).get(label, "") if label else ""
        out[(s.namespace, value)] = out.get((s.namespace, value), 0.0) + s.tokens
    assert all(v == int(v) for v in out.values()), out  # whole tokens: no extrapolation
    return {k: int(v) for k, v in out.items()}


def samples_loaded(prom: Prometheus, query: str, at: dt.datetime) -> int:
    params = urllib.parse.urlencode({"query": query, "time": f"{at.timestamp():.3f}",
                                     "stats": "all"})
    with urllib.request.urlopen(f"{prom.url}/api/v1/query?{params}", timeout=60) as r:
        body: dict[str, Any] = json.load(r)
    return int(body["data"]["stats"]["samples"]["totalQueryableSamples"])


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    with backfilled(tmp_path_factory.mktemp("allowances"), openmetrics(), "120d") as prom:
        yield prom


def test_a_monthly_allowance_per_person_reads_rules_that_keep_the_label_to_the_token(
        history: Prometheus, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    team_key = WindowKey("Month", "UTC", ("team",))
    plan = planner.plan(BUDGETS, END, kept=("user",))
    # One query per (source, window, label set): the partition on a label the rules keep
    # and the budget without a partition share one reading; the team partition reads apart.
    assert set(plan.windows) == {(COUNTERS, MONTH), (COUNTERS, team_key)}
    assert plan.labels_of(COUNTERS, MONTH) == ("user",)

    # The raw reading, before any rule ran: what the rules must give to the token.
    raw = PrometheusSource(history.url, scrape_interval_seconds=STEP)
    snap = raw.collect(plan, END)
    assert not snap.errors and not snap.window_errors, (snap.errors, snap.window_errors)
    raw_user, raw_ns = totals(snap, MONTH, "user"), totals(snap, MONTH, None)
    raw_team = totals(snap, team_key, "team")
    steps = int((END - END.replace(day=1, hour=0)).total_seconds()) // STEP
    assert raw_user[(NAMESPACES[1], "bob")] == steps * sum(tokens_per_step(1, 1, p)
                                                           for p in range(PODS))
    assert len(raw_user) == len(NAMESPACES) * len(USERS) and len(raw_team) == 2 * len(NAMESPACES)
    raw_samples = samples_loaded(history, promql.spend(COUNTERS, steps * STEP, ("user",)), END)

    # Backfill the rules generated with --keep-label user, then restart to load the blocks.
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(promql.rules_file([COUNTERS], ("user",))))
    out = tmp_path / "rules-blocks"
    subprocess.run([str(find_binary("promtool")), "tsdb", "create-blocks-from", "rules", "-q",
                    f"--start={int(START.timestamp())}", f"--end={int(END.timestamp())}",
                    f"--url={history.url}", f"--output-dir={out}", str(rules)],
                   check=True, capture_output=True, timeout=600)
    history.stop()
    for block in out.iterdir():
        shutil.move(str(block), history.data_dir / block.name)
    history.start()

    # A limit that refuses every raw read of the month: what is read must be the rules.
    limit = raw.series_count(COUNTERS, END) * steps // 2
    ruled = PrometheusSource(history.url, scrape_interval_seconds=STEP, max_samples=limit,
                             rules_keep_labels=("user",))
    last = ruled.last_recorded(COUNTERS, END)
    assert last is not None and (END - last).total_seconds() < 2 * 3600
    snap = ruled.collect(plan, END)
    assert not snap.errors
    assert totals(snap, MONTH, "user") == raw_user
    assert totals(snap, MONTH, None) == raw_ns
    # The team partition alone reads raw, and is refused with the way out named.
    assert set(snap.window_errors) == {(COUNTERS, team_key)}
    why = snap.window_errors[(COUNTERS, team_key)]
    assert "keep no label team" in why and "--keep-label" in why and "--rules-keep-label" in why

    # Without the limit the team partition is read from the raw series, as before.
    unlimited = PrometheusSource(history.url, scrape_interval_seconds=STEP,
                                 rules_keep_labels=("user",))
    assert totals(unlimited.collect(plan, END), team_key, "team") == raw_team

    # Told that the rules keep team as well, when they do not: the recorded series say
    # otherwise, so team is read raw (not every team's spend under team="").
    told = ("user", "team")
    misled_plan = planner.plan(BUDGETS, END, kept=told)
    assert set(misled_plan.windows) == {(COUNTERS, MONTH)}
    misled = PrometheusSource(history.url, scrape_interval_seconds=STEP,
                              rules_keep_labels=told)
    with caplog.at_level(logging.WARNING, logger="token_budget.metrics.prometheus"):
        snap = misled.collect(misled_plan, END)
    assert "keeps no label team" in caplog.text and "--keep-label" in caplog.text
    assert not snap.window_errors and totals(snap, MONTH, "team") == raw_team
    assert totals(snap, MONTH, "user") == raw_user
    refused = PrometheusSource(history.url, scrape_interval_seconds=STEP, max_samples=limit,
                               rules_keep_labels=told).collect(misled_plan, END)
    assert "keep no label team" in refused.window_errors[(COUNTERS, MONTH)]

    recorded = samples_loaded(history, promql.recorded(COUNTERS, steps * STEP, ("user",)), last)
    print(f"\nMonth ({steps * STEP / 86400:.1f} days), {raw.series_count(COUNTERS, END)} series "
          f"at {STEP} s: {raw_samples:,} samples raw by user, {recorded:,} from the rules")
    assert recorded * 10 < raw_samples
