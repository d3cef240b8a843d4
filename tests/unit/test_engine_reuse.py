"""An evaluation handed the previous one equals a fresh evaluation, to the digit.

Covers:
- 1,000 seeded random worlds (TokenBudgets and Shared / PerNamespace
  ClusterTokenBudgets; rolling and calendar windows in two zones; ladders with
  paced throttles and reroutes, hysteresis memory, exceptions about to expire,
  outcomes, spend matchers, per-model limits, DryRun, every whenSpendUnknown;
  series with and without a workload label, reported costs, unknown models),
  each put through a random sequence of changes: spend of one series, every
  series anew with equal values, the burn rate, time (nothing, seconds, an hour,
  across midnight and past exceptions' expiry), a budget edited, re-read equal,
  added or removed, namespace labels, workloads and their pods, memory, the
  catalog (re-read equal, or a price changed), a source failing or a target
  down; budgets partitioned by a ``user`` label, series with and without it,
  workloads with and without the owner pod label; budgets with the rate-limit
  trigger (a catalog with fallbacks), 429 counts changing per namespace and
  their reading failing; after each,
  ``evaluate(..., previous=...)`` equals ``evaluate(...)``;
- the reuse is real: nothing changed, every decision is the very object of the
  previous evaluation, and so after a budget is re-read with another status; one
  namespace's spend changed, only its scopes are decided anew; time moved,
  decisions over calendar windows only are kept and those over a rolling window
  are not.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
from typing import Any

import pytest

from token_budget.api import v1alpha1 as api
from token_budget.policy import engine, ratelimits
from token_budget.policy.catalog import Catalog
from token_budget.policy.decisions import Evaluation
from token_budget.policy.inputs import Memory, ScopeKey, SpendSeries, Workload
from token_budget.policy.ratesources import RateSample
from unit import builders as b
from unit.builders import NOW

NAMESPACES = ["ns-a", "ns-b", "ns-c"]
MODELS = ["large", "medium", "tiny", "vendor/large-2025-01", "mystery-9"]
OWNER = "tokenbudget.io/owner"
USERS = ["alice", "bob", "carol", ""]  # "" joins the unpartitioned partition
OWNED = [{"tokenbudget.io/agent": "true", OWNER: u} for u in USERS[:2]]
WINDOWS = [("24h", "UTC"), ("Day", "UTC"), ("Day", "Europe/Berlin"), ("Month", "UTC"),
           ("7d", "UTC")]


def _spec(rng: random.Random, now: dt.datetime) -> dict[str, Any]:
    limits = []
    for window, zone in rng.sample(WINDOWS, rng.randint(1, 2)):
        limit: dict[str, Any] = {"window": window, "timeZone": zone}
        if rng.random() < 0.6:
            limit["tokens"] = rng.choice([1_000, 50_000, 400_000])
        if "tokens" not in limit or rng.random() < 0.3:
            limit["cost"] = rng.choice(["0.50", "5.00", "40.00"])
        if rng.random() < 0.15:
            limit["model"] = rng.choice(["large", "vendor/*", "tiny"])
        limits.append(limit)
    actions = []
    for kind, at in zip(rng.sample(["Warn", "Reroute", "Throttle", "Block"], rng.randint(1, 4)),
                        sorted(rng.sample(range(20, 160, 10), 4)), strict=False):
        action: dict[str, Any] = {"type": kind, "atPercent": at}
        if kind == "Throttle" and rng.random() < 0.5:
            action["tokensPerMinute"] = rng.randint(10, 1000)
        if kind == "Reroute" and rng.random() < 0.5:
            action["model"] = rng.choice(["medium", "tiny"])
        actions.append(action)
    spec: dict[str, Any] = {"limits": limits, "actions": actions,
                            "hysteresisPercent": rng.choice([0, 5, 20])}
    if rng.random() < 0.3:
        hours = rng.choice([-1, 1, 2, 30])
        spec["exceptions"] = [{"until": (now + dt.timedelta(hours=hours)).isoformat(),
                               "maxAction": rng.choice(["Warn", "Reroute"]), "reason": "r"}]
    if rng.random() < 0.2:
        spec["spendMatchers"] = [{"label": "team", "value": rng.choice(["x", "y"]),
                                  "operator": rng.choice(["Equal", "NotEqual", "Regex"])}]
    if rng.random() < 0.2:
        spec["deniedTiers"] = ["Frontier"]
    if rng.random() < 0.2:
        spec["mode"] = "DryRun"
    if rng.random() < 0.5:
        spec["whenSpendUnknown"] = {"policy": rng.choice(["Hold", "FailOpen", "FailClosed"]),
                                    "staleAfterSeconds": rng.choice([60, 3600])}
    if rng.random() < 0.2:
        spec["outcome"] = {"metric": "agent_outcomes_total", "window": "24h",
                           "maxCostPerOutcome": "0.01", "onExceeded": "Warn"}
    if rng.random() < 0.3:
        spec["partition"] = {"label": "user", "podLabel": OWNER}
    if rng.random() < 0.3:
        spec["rateLimit"] = {"thresholdPercent": rng.choice([10, 50]), "windowSeconds": 300,
                             "minRequests": rng.choice([1, 20]), "hysteresisPercent": 5}
    return spec


def _catalog() -> Catalog:
    """The builders' catalog, each model falling back to the others when rate-limited."""
    body = b.CATALOG_BODY | {"spec": {**b.CATALOG_BODY["spec"], "models": [
        {**m, "rateLimitFallbacks": [o["name"] for o in b.CATALOG_BODY["spec"]["models"]
                                     if o["name"] != m["name"]]}
        for m in b.CATALOG_BODY["spec"]["models"]]}}
    return Catalog([api.ModelCatalog.model_validate(body)])


def _rates(rng: random.Random) -> list[RateSample]:
    return [RateSample(namespace=rng.choice(NAMESPACES), model=rng.choice(MODELS),
                       requests=float(rng.choice([0, 5, 40, 300])),
                       limited=float(rng.choice([0, 3, 30])))
            for _ in range(rng.randint(0, 6))]


def _budget(rng: random.Random, i: int, now: dt.datetime) -> api.Budget:
    spec = _spec(rng, now)
    if rng.random() < 0.6:
        return api.TokenBudget.model_validate({
            "apiVersion": api.API_VERSION, "kind": "TokenBudget",
            "metadata": {"name": f"b{i}", "namespace": rng.choice(NAMESPACES)}, "spec": spec})
    return api.ClusterTokenBudget.model_validate({
        "apiVersion": api.API_VERSION, "kind": "ClusterTokenBudget",
        "metadata": {"name": f"c{i}"},
        "spec": {**spec, "namespaceSelector": {"matchLabels": {"environment": "qa"}},
                 "limitScope": rng.choice(["Shared", "PerNamespace"]),
                 "enrolment": rng.choice(["Selected", "Mandatory"])}})


def _series(rng: random.Random) -> SpendSeries:
    cost = str(rng.choice([1, 25, 300])) + ".5" if rng.random() < 0.05 else None
    labels = {"team": rng.choice(["x", "y"])} if rng.random() < 0.3 else {}
    if rng.random() < 0.5:
        labels["user"] = rng.choice(USERS)
    return b.series(rng.choice([0, 10, 700, 30_000, 250_000.4]), namespace=rng.choice(NAMESPACES),
                    workload=rng.choice(["agent-7f9-x", "agent", "other-1", ""]),
                    model=rng.choice(MODELS), output=rng.choice([0, 55, 9_000]),
                    cached=rng.choice([0, 0, 300]), cost=cost, **labels)


def _workloads(rng: random.Random) -> list[Workload]:
    out = []
    for ns in NAMESPACES:
        for name in rng.sample(["agent", "other", "coder"], rng.randint(0, 2)):
            out.append(b.workload(name, ns, models=rng.choice([[], ["large"]]),
                                  labels=rng.choice([None, {"app": "web"}, *OWNED]),
                                  pods=rng.choice([0, 2])))
    return out


@dataclasses.dataclass
class State:
    budgets: list[api.Budget]
    namespaces: dict[str, dict[str, str]]
    workloads: list[Workload]
    memory: dict[ScopeKey, Memory]
    catalog: Catalog
    spend: list[SpendSeries]
    recent: list[SpendSeries]
    now: dt.datetime
    errors: dict[api.Preset, str]
    down: bool
    rates: list[RateSample] = dataclasses.field(default_factory=list)
    rates_failing: bool = False

    def evaluate(self, previous: Evaluation | None) -> Evaluation:
        snap = b.snapshot(self.budgets, self.spend, now=self.now, recent=self.recent,
                          errors=self.errors, outcomes=self._outcomes())
        keys = ratelimits.plan(self.budgets, self.catalog)
        if self.rates_failing:
            snap = dataclasses.replace(snap, rate_limit_errors={
                k: "Prometheus cannot be reached" for k in keys})
        else:
            snap = dataclasses.replace(snap, rate_limits={k: tuple(self.rates) for k in keys})
        if self.down:
            rs = next(iter(snap.recent), None)
            if rs is not None:
                snap = dataclasses.replace(snap, down={rs: {"ns-a": "pod agent-0 (up == 0)"}})
        world = engine.World(budgets=list(self.budgets), catalog=self.catalog,
                             namespaces=self.namespaces, workloads=self.workloads,
                             memory=self.memory)
        return engine.evaluate(world, snap, self.now, previous=previous)

    def _outcomes(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for budget in self.budgets:
            if budget.spec.outcome is not None:
                out[engine.outcome_key(budget.spec.outcome)] = [
                    (ns, (), float(len(ns))) for ns in NAMESPACES]
        return out


def _state(rng: random.Random) -> State:
    now = NOW + dt.timedelta(hours=rng.choice([0, 11.9, 23.99]))
    budgets = [_budget(rng, i, now) for i in range(rng.randint(1, 4))]
    return State(
        budgets=budgets,
        namespaces={ns: {"environment": rng.choice(["qa", "prod"])} for ns in NAMESPACES},
        workloads=_workloads(rng), memory={}, catalog=_catalog(),
        spend=[_series(rng) for _ in range(rng.randint(0, 10))],
        recent=[_series(rng) for _ in range(rng.randint(0, 3))],
        now=now, errors={}, down=False, rates=_rates(rng))


def _change(rng: random.Random, s: State, result: Evaluation) -> str:
    what = rng.choice(["spend", "spend", "anew", "recent", "time", "time", "budget", "nothing",
                       "namespaces", "workloads", "memory", "catalog", "error", "down",
                       "rates", "rates", "rates_failing"])
    if what == "spend" and s.spend:
        s.spend[rng.randrange(len(s.spend))] = _series(rng)
    elif what == "spend":
        s.spend.append(_series(rng))
    elif what == "anew":  # equal values, new objects: compared by value
        s.spend = [dataclasses.replace(x) for x in s.spend]
    elif what == "recent":
        s.recent = [_series(rng) for _ in range(rng.randint(0, 3))]
    elif what == "time":
        s.now += dt.timedelta(seconds=rng.choice([0, 1, 30, 3600, 13 * 3600, 86400]))
    elif what == "budget":
        i = rng.randrange(len(s.budgets))
        how = rng.choice(["edit", "equal", "add", "remove"])
        if how == "edit":
            s.budgets[i] = _budget(rng, i, s.now)
        elif how == "equal":
            s.budgets[i] = type(s.budgets[i]).model_validate(
                s.budgets[i].model_dump(by_alias=True))
        elif how == "add":
            s.budgets.append(_budget(rng, len(s.budgets) + 10, s.now))
        elif len(s.budgets) > 1:
            del s.budgets[i]
    elif what == "namespaces":
        s.namespaces = {**s.namespaces,
                        rng.choice(NAMESPACES): {"environment": rng.choice(["qa", "prod"])}}
    elif what == "workloads":
        s.workloads = _workloads(rng)
    elif what == "memory" and result.decisions:
        d = rng.choice(result.decisions)
        last = s.now - dt.timedelta(seconds=rng.choice([10, 7200]))
        limited = rng.choice([(), (("large", last),)])
        s.memory = {**s.memory, d.scope: Memory(rng.choice(list(api.State)), last, limited)}
    elif what == "catalog":
        if rng.random() < 0.5:
            s.catalog = _catalog()
        else:
            body = b.CATALOG_BODY | {"spec": {**b.CATALOG_BODY["spec"], "models": [
                {**m, "pricing": {**m["pricing"], "input": "11.00"}} if m["name"] == "large"
                else m for m in b.CATALOG_BODY["spec"]["models"]]}}
            s.catalog = Catalog([api.ModelCatalog.model_validate(body)])
    elif what == "error":
        s.errors = {} if s.errors else {api.Preset.COUNTERS: "Prometheus cannot be reached"}
    elif what == "down":
        s.down = not s.down
    elif what == "rates" and s.rates and rng.random() < 0.7:  # one (namespace, model) moves
        i = rng.randrange(len(s.rates))
        s.rates[i] = dataclasses.replace(s.rates[i], limited=s.rates[i].limited + 7,
                                         requests=s.rates[i].requests + 10)
    elif what == "rates":
        s.rates = _rates(rng)
    elif what == "rates_failing":
        s.rates_failing = not s.rates_failing
    return what


def _digits(e: Evaluation) -> tuple[str, str, str]:
    return repr(e.decisions), repr(sorted(e.directives.items())), repr(sorted(e.held))


@pytest.mark.parametrize("first", range(0, 1000, 250))
def test_an_evaluation_handed_the_previous_one_equals_a_fresh_one(first: int) -> None:
    for seed in range(first, first + 250):
        rng = random.Random(seed)
        s = _state(rng)
        previous = s.evaluate(None)
        steps = []
        for _ in range(rng.randint(2, 5)):
            steps.append(_change(rng, s, previous))
            previous = s.evaluate(previous)
            assert _digits(previous) == _digits(s.evaluate(None)), (seed, steps)


def _quiet(budgets: list[api.Budget]) -> State:
    return State(budgets=budgets, namespaces={ns: {"environment": "qa"} for ns in NAMESPACES},
                 workloads=[b.workload("agent", ns) for ns in NAMESPACES], memory={},
                 catalog=b.catalog(), now=NOW, errors={}, down=False,
                 spend=[b.series(100, namespace=ns) for ns in NAMESPACES],
                 recent=[])


def test_nothing_changed_takes_over_every_decision() -> None:
    s = _quiet([b.token_budget("b", ns) for ns in NAMESPACES] + [b.cluster_budget()])
    first = s.evaluate(None)
    again = s.evaluate(first)
    assert len(again.decisions) == 6
    assert all(x is y for x, y in zip(first.decisions, again.decisions, strict=True))


def test_one_namespace_changed_decides_only_its_scopes_anew() -> None:
    s = _quiet([b.token_budget("b", ns) for ns in NAMESPACES] + [b.cluster_budget()])
    first = s.evaluate(None)
    s.spend[0] = b.series(900, namespace="ns-a")
    again = s.evaluate(first)
    anew = {str(y.scope) for x, y in zip(first.decisions, again.decisions, strict=True)
            if x is not y}
    assert anew == {"ns-a/b", "qa[ns-a]"}


def test_time_moved_keeps_calendar_decisions_only() -> None:
    calendar = b.token_budget("cal", "ns-a", limits=[{"window": "Day", "tokens": 1000}])
    rolling = b.token_budget("roll", "ns-b", limits=[{"window": "24h", "tokens": 1000}])
    s = _quiet([calendar, rolling])
    first = s.evaluate(None)
    s.now += dt.timedelta(seconds=30)
    again = s.evaluate(first)
    kept = {str(y.scope) for x, y in zip(first.decisions, again.decisions, strict=True)
            if x is y}
    assert kept == {"ns-a/cal"}


def test_a_budget_re_read_with_another_status_keeps_its_decisions() -> None:
    budget = b.token_budget("b", "ns-a", actions=[{"type": "Block", "atPercent": 100}])
    s = _quiet([budget])
    first = s.evaluate(None)
    body = budget.model_dump(by_alias=True, mode="json")
    body["metadata"]["resourceVersion"] = "42"
    body["status"] = {"state": "Blocked", "reason": "LimitReached"}
    s.budgets = [api.TokenBudget.model_validate(body)]
    again = s.evaluate(first)
    assert again.decisions[0] is first.decisions[0]
