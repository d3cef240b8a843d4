"""Chaos: the operator SIGKILLed again and again while it blocks and restores (issue 13).

On the real control plane and the real Prometheus, 20 governed workloads of every
kind (Deployments, StatefulSets, Jobs, CronJobs, one Deployment scaled by an HPA, one
at 0 replicas, a CronJob and a Job suspended by their owners) in four namespaces, each
governed by one TokenBudget that blocks at 100 %. Spend is fixed; a budget is flipped
between over its limit (Blocked) and under it (Ok) by patching the limit, so the
operator keeps blocking and restoring. Faults, in an order drawn from a seeded random:

- ``CHAOS_KILLS`` SIGKILLs (default 50) of the operator, each right after one or two
  budgets flipped: either the moment the first workload of a flipped budget shows the
  change (so the others are not yet changed: killed mid-block or mid-restore) or after
  a random delay; sometimes a budget flips again while the operator is down;
- one restart of kube-apiserver alone (etcd keeps everything); a watch resumed from a
  resourceVersion of before the restart is shown to get 410 Gone;
- one restart of Prometheus (the budgets' ``whenSpendUnknown`` is Hold).

Invariants:

- at every sample, even mid-fault: no ``previous-replicas``/``previous-suspend`` lost
  or wrong (a workload away from its own replicas/suspend is at 0/suspended and carries
  the exact value to restore);
- after each fault, once converged: every workload exactly as its budget wants it
  (blocked: 0 replicas or suspended, with the previous value; otherwise its exact
  pre-block replicas/suspend, no saved value), nothing half-enforced (state annotation,
  budget annotation, enforced label and spec agree), every budget's status right;
- no duplicate Events for one transition: per (object, reason, transition), where a
  transition is the object's resourceVersion the operator read before its write (and
  for a budget, the ``was -> now`` of the message), at most one Event;
- convergence within two evaluation intervals of the end of each fault (the operator
  serving again, the API server or Prometheus ready again), the last one included.

``CHAOS_SEED`` replays a run (the seed is printed first), ``CHAOS_KILLS`` sets the
number of kills and ``CHAOS_INTERVAL`` the operator's ``--interval-seconds`` (2: a
restarted operator converges in about 1.5 s, dominated by taking the Lease and its
first evaluation, which an interval of 1 s would not leave two intervals for).
``make test`` runs it at the default size, ``make chaos`` bigger. Figures are printed.
"""

from __future__ import annotations

import functools
import json
import os
import random
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from harness.controlplane import ControlPlane
from harness.exporter import AgentExporter
from harness.operator_process import OperatorProcess
from harness.prometheus import Prometheus
from harness.spend import seed, spend
from harness.waiting import eventually
from token_budget.enforcement import patches
from token_budget.handlers.finalizers import FINALIZER
from token_budget.kube import (
    CRONJOBS,
    DEPLOYMENTS,
    EVENTS,
    HPAS,
    JOBS,
    NAMESPACES,
    STATEFULSETS,
    TOKENBUDGETS,
    Kube,
    Resource,
)

SERVICEACCOUNTS = Resource("ServiceAccount", "v1", "serviceaccounts")

KILLS = int(os.environ.get("CHAOS_KILLS") or "50")
INTERVAL = float(os.environ.get("CHAOS_INTERVAL") or "2")
SEED = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(1 << 32))
# Setup, the API server and Prometheus restarts, then each kill: start, flip, converge.
TIMEOUT = 240 + 12 * KILLS

A = "tokenbudget.io/"
AGENT = {A + "agent": "true"}
SPENT = 1_000_000
OVER, UNDER = 500_000, 100_000_000  # limits: 200 % (Blocked) and 1 % (Ok) of the spend
KINDS: dict[str, Resource] = {"Deployment": DEPLOYMENTS, "StatefulSet": STATEFULSETS,
                              "Job": JOBS, "CronJob": CRONJOBS}
# Sorted by kind as the operator patches them: a CronJob is the first one it changes.
FIRST = "CronJob"

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(TIMEOUT)]


@dataclass(frozen=True)
class Spec:
    """One governed workload and what its owner set: replicas, or suspend."""

    ns: int
    kind: str
    name: str
    replicas: int = 1
    suspend: bool = False
    hpa: bool = False


# 20 workloads: 6 Deployments (one at 0, one scaled by an HPA), 5 StatefulSets, 4 Jobs (one
# suspended by its owner), 5 CronJobs (one suspended by its owner); 5 per namespace.
WORKLOADS = [
    Spec(0, "Deployment", "web", replicas=2), Spec(0, "StatefulSet", "db", replicas=2),
    Spec(0, "Job", "batch"), Spec(0, "CronJob", "nightly"),
    Spec(0, "Deployment", "idle", replicas=0),
    Spec(1, "Deployment", "web", replicas=3, hpa=True), Spec(1, "StatefulSet", "db"),
    Spec(1, "Job", "batch", suspend=True), Spec(1, "CronJob", "nightly", suspend=True),
    Spec(1, "Deployment", "api", replicas=1),
    Spec(2, "Deployment", "web", replicas=4), Spec(2, "StatefulSet", "db", replicas=3),
    Spec(2, "Job", "batch"), Spec(2, "CronJob", "nightly"), Spec(2, "CronJob", "hourly"),
    Spec(3, "Deployment", "web", replicas=1), Spec(3, "StatefulSet", "db"),
    Spec(3, "StatefulSet", "cache", replicas=2), Spec(3, "Job", "batch"),
    Spec(3, "CronJob", "nightly"),
]


def manifest(w: Spec) -> dict[str, Any]:
    pod = {"metadata": {"labels": {**AGENT, "app": w.name}},
           "spec": {"restartPolicy": "Never" if w.kind in ("Job", "CronJob") else "Always",
                    "containers": [{"name": "agent", "image": "example/agent:1",
                                    "env": [{"name": "LLM_MODEL", "value": "gpt-4o"}]}]}}
    meta = {"name": w.name, "labels": dict(AGENT)}
    body: dict[str, Any] = {"apiVersion": KINDS[w.kind].group_version, "kind": w.kind,
                            "metadata": meta}
    if w.kind in patches.SCALABLE:
        body["spec"] = {"replicas": w.replicas, "selector": {"matchLabels": {"app": w.name}},
                        "template": pod}
        if w.kind == "StatefulSet":
            body["spec"]["serviceName"] = w.name
    elif w.kind == "Job":
        body["spec"] = {"suspend": w.suspend, "backoffLimit": 0, "template": pod}
    else:
        body["spec"] = {"schedule": "0 0 1 1 *", "suspend": w.suspend,
                        "jobTemplate": {"spec": {"template": pod}}}
    return body


def budget(limit: int) -> dict[str, Any]:
    return {"apiVersion": "tokenbudget.io/v1alpha1", "kind": "TokenBudget",
            "metadata": {"name": "team"},
            "spec": {"limits": [{"window": "1h", "tokens": limit}],
                     "actions": [{"type": "Block", "atPercent": 100}],
                     "whenSpendUnknown": {"policy": "Hold", "staleAfterSeconds": 600}}}


# -- what the cluster should look like --------------------------------------------------


def problems(w: Spec, obj: dict[str, Any] | None, blocked: bool | None) -> list[str]:
    """What is wrong with one workload; ``blocked`` None: only what must hold at any instant.

    At any instant (mid-fault too) a workload away from its owner's replicas/suspend is
    stopped and carries the exact value to restore: no ``previous-*`` is ever lost.
    """
    if obj is None:
        return [f"{w.kind} {w.name} is gone"]
    meta = obj["metadata"]
    ann = meta.get("annotations") or {}
    spec = obj.get("spec") or {}
    out = []
    if w.kind in patches.SCALABLE:
        key, value, owner = patches.PREVIOUS_REPLICAS, spec.get("replicas", 1), w.replicas
        saved, stopped = str(w.replicas), 0
    else:
        key, value, owner = patches.PREVIOUS_SUSPEND, bool(spec.get("suspend")), w.suspend
        saved, stopped = str(w.suspend).lower(), True
    if key in ann and ann[key] != saved:
        out.append(f"{key}={ann[key]!r}, the owner's value is {saved!r}")
    if value != owner and (value != stopped or key not in ann):
        out.append(f"at {value!r} (owner's {owner!r}) without {key}={saved}")
    if blocked is None:
        return out
    if value != (stopped if blocked else owner):
        out.append(f"at {value!r}, wanted {stopped if blocked else owner!r}")
    if blocked != (key in ann):
        out.append(f"{key} {'missing' if blocked else 'left behind'}")
    state = ann.get(patches.STATE)
    if state != ("Blocked" if blocked else "Ok"):
        out.append(f"half-enforced: state annotation {state!r} while "
                   f"{'blocked' if blocked else 'not blocked'}")
    if (meta.get("labels") or {}).get(patches.ENFORCED_LABEL) != "true":
        out.append("half-enforced: no enforced label on a directed workload")
    return [f"{w.kind} {w.name}: {p}" for p in out]


@dataclass
class Figures:
    kills: int = 0
    mid_enforcement: int = 0  # kills that left a flipped budget's workloads half changed
    flips: int = 0
    flips_while_down: int = 0
    since_up: dict[str, list[float]] = field(default_factory=dict)  # fault -> convergence s
    since_fault: dict[str, list[float]] = field(default_factory=dict)
    samples: int = 0
    events: Counter[str] = field(default_factory=Counter)
    events_lost: int = 0
    gone_410: str = ""
    apiserver_ready: float = 0.0
    apiserver_down: float = 0.0
    prometheus_down: float = 0.0


class World:
    """The chaos namespaces, what each budget should do, and the checks."""

    def __init__(self, kube: Kube, names: list[str]) -> None:
        self.kube = kube
        self.names = names
        self.blocked = [False] * len(names)
        self.figures = Figures()

    def flip(self, i: int) -> None:
        self.blocked[i] = not self.blocked[i]
        self.kube.patch(TOKENBUDGETS, self.names[i], "team", {"spec": {"limits": [
            {"window": "1h", "tokens": OVER if self.blocked[i] else UNDER}]}})
        self.figures.flips += 1

    def objects(self, i: int | None = None) -> dict[tuple[int, str, str], dict[str, Any]]:
        out = {}
        for ns_i, ns in enumerate(self.names):
            if i is not None and ns_i != i:
                continue
            for kind, res in KINDS.items():
                for obj in self.kube.list(res, ns, f"{A}agent=true"):
                    out[ns_i, kind, obj["metadata"]["name"]] = obj
        return out

    def wrong(self, settled: bool) -> list[str]:
        """Problems now (``settled``: against the budgets' wanted state too)."""
        objs = self.objects()
        self.figures.samples += 1
        out = []
        for w in WORKLOADS:
            want = self.blocked[w.ns] if settled else None
            out += [f"{self.names[w.ns]}: {p}"
                    for p in problems(w, objs.get((w.ns, w.kind, w.name)), want)]
        if settled:
            for i, ns in enumerate(self.names):
                state = (self.kube.get(TOKENBUDGETS, ns, "team").get("status") or {}).get("state")
                if state != ("Blocked" if self.blocked[i] else "Ok"):
                    out.append(f"{ns}: TokenBudget team is {state!r}")
        return out

    def half_changed(self, i: int) -> bool:
        """Whether some but not all of namespace i's workloads are as its budget wants."""
        objs = self.objects(i)
        done = [not problems(w, objs.get((w.ns, w.kind, w.name)), self.blocked[i])
                for w in WORKLOADS if w.ns == i]
        return any(done) and not all(done)

    def converge(self, what: str, fault_at: float, up_at: float, timeout: float = 60) -> None:
        """Wait until settled, checking the every-instant invariants on the way."""
        last: list[str] = []
        while True:
            try:
                instant = self.wrong(settled=False)
                assert not instant, f"after {what} (seed {SEED}): {instant}"
                last = self.wrong(settled=True)
            except AssertionError:
                raise
            except Exception as exc:  # noqa: BLE001 - the API server may be on its way back
                last = [repr(exc)]
            now = time.monotonic()
            if not last:
                self.figures.since_up.setdefault(what, []).append(now - up_at)
                self.figures.since_fault.setdefault(what, []).append(now - fault_at)
                return
            assert now - up_at < timeout, \
                f"not converged {timeout:.0f} s after {what} (seed {SEED}): {last}"
            time.sleep(0.05)

    def duplicate_events(self) -> list[str]:
        """Events of one (object, reason, transition) beyond the first; counts them all."""
        seen: Counter[tuple[str, ...]] = Counter()
        events = [e for ns in self.names for e in self.kube.list(EVENTS, ns)
                  if (e.get("source") or {}).get("component") == "token-budget-operator"]
        for e in events:
            o = e["involvedObject"]
            transition = e["message"].split(":")[0] if o["kind"] == "TokenBudget" else ""
            seen[(e["metadata"]["namespace"], o["kind"], o["name"], e["reason"], transition,
                  o.get("resourceVersion") or "")] += 1
        self.figures.events = Counter()
        for key, n in seen.items():
            self.figures.events[f"{key[1]} {key[3]}"] += n
        self.figures.events_lost = self._lost(events)
        return [f"{n} Events for {key}" for key, n in seen.items() if n > 1]

    @staticmethod
    def _lost(events: list[dict[str, Any]]) -> int:
        """Transitions of a workload without their Event: the same reason twice in a row.

        The Event follows the write, so a SIGKILL between them loses it (at most once, never
        twice). Left out: workloads whose owner's value is the stopped one (at 0 replicas,
        suspended), where a block changes no spec and has no Blocked Event by design.
        """
        stopped_by_owner = {(w.kind, w.name) for w in WORKLOADS
                            if (w.kind in patches.SCALABLE and w.replicas == 0)
                            or (w.kind in patches.SUSPENDABLE and w.suspend)}
        by_object: dict[tuple[str, str, str], list[tuple[str, str]]] = {}
        for e in events:
            o = e["involvedObject"]
            if e["reason"] in ("Blocked", "Restored") and o["kind"] in KINDS and \
                    (o["kind"], o["name"]) not in stopped_by_owner:
                by_object.setdefault((o["namespace"], o["kind"], o["name"]), []).append(
                    (e.get("eventTime") or "", e["reason"]))
        lost = 0
        for seq in by_object.values():
            reasons = ["Restored"] + [r for _, r in sorted(seq)]  # each starts restored
            lost += sum(a == b for a, b in zip(reasons, reasons[1:], strict=False))
        return lost


@pytest.fixture
def chaos_namespaces(kube: Kube) -> Iterator[list[str]]:
    run = uuid.uuid4().hex[:6]
    names = [f"chaos-{run}-{i}" for i in range(4)]
    for ns in names:
        kube.create(NAMESPACES, None, {"apiVersion": "v1", "kind": "Namespace",
                                       "metadata": {"name": ns}})
    try:
        yield names
    finally:
        for ns in names:  # the operator is stopped: nobody would release its finalizer
            for b in kube.list(TOKENBUDGETS, ns):
                kube.patch(TOKENBUDGETS, ns, b["metadata"]["name"],
                           {"metadata": {"finalizers": None}})
            kube.request("DELETE", NAMESPACES.path(None, ns))


def test_the_operator_killed_at_random_while_it_blocks_and_restores_loses_nothing(
        kube: Kube, controlplane: ControlPlane, exporter: AgentExporter,
        prometheus: Prometheus, chaos_namespaces: list[str], tmp_path: Path) -> None:
    rng = random.Random(SEED)
    print(f"\nchaos seed {SEED} (CHAOS_SEED={SEED} replays it), {KILLS} kills, "
          f"interval {INTERVAL:g} s")
    names = chaos_namespaces
    world = World(kube, names)
    figures = world.figures
    def has_account(ns: str) -> bool:
        return any(sa["metadata"]["name"] == "default" for sa in kube.list(SERVICEACCOUNTS, ns))

    for ns in names:  # Pods are refused until their namespace's ServiceAccount exists
        eventually(functools.partial(has_account, ns), 60,
                   what=f"{ns}'s default ServiceAccount")
    for w in WORKLOADS:
        kube.create(KINDS[w.kind], names[w.ns], manifest(w))
        if w.hpa:
            kube.create(HPAS, names[w.ns], {
                "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
                "metadata": {"name": w.name},
                "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": w.kind,
                                            "name": w.name},
                         "minReplicas": 1, "maxReplicas": 5}})
    for ns in names:
        seed(exporter, prometheus, ns, "agent-0")
        spend(exporter, prometheus, ns, "agent-0", SPENT)
        kube.create(TOKENBUDGETS, ns, budget(UNDER))
    lease = f"chaos-{uuid.uuid4().hex[:6]}"
    op = OperatorProcess(controlplane.kubeconfig, prometheus.url, tmp_path,
                         interval_seconds=INTERVAL, identity="chaos",
                         extra_args=["--lease-name", lease,
                                     *[a for ns in names for a in ("--namespace", ns)]])
    started = time.monotonic()
    op.start()
    try:
        world.converge("start", started, time.monotonic())
        eventually(lambda: all(FINALIZER in (kube.get(TOKENBUDGETS, ns, "team")["metadata"]
                                             .get("finalizers") or []) for ns in names),
                   30, what="the finalizers")

        # The API server and Prometheus restarts come between kills, at drawn places.
        at = rng.sample(range(1, KILLS), 2) if KILLS > 2 else [0, 1]
        for k in range(KILLS):
            if k == at[0]:
                restart_apiserver(world, controlplane, rng)
                assert op.running(), f"the operator exited:\n{op.tail(40)}"
            if k == at[1]:
                restart_prometheus(world, prometheus, rng)
                assert op.running(), f"the operator exited:\n{op.tail(40)}"
            fault, up = kill(world, op, rng)
            world.converge("SIGKILL", fault, up)
            dups = world.duplicate_events()
            assert not dups, f"duplicate Events after kill {k + 1} (seed {SEED}): {dups}"
        assert not world.wrong(settled=True)
    except BaseException:
        print(f"operator log tail:\n{op.tail(80)}")
        raise
    finally:
        op.stop()
    report(figures)


def kill(world: World, op: OperatorProcess, rng: random.Random) -> tuple[float, float]:
    """Flip one or two budgets, SIGKILL the operator mid-way, maybe flip again, restart.

    Returns:
        When the kill came and when the operator served again (monotonic seconds).
    """
    figures = world.figures
    flipped = rng.sample(range(len(world.names)), rng.choice((1, 1, 2)))
    for i in flipped:
        world.flip(i)
    if rng.random() < 0.6:
        # The moment the first changed workload shows: the rest are not changed yet.
        first = [w for w in WORKLOADS if w.ns == flipped[0] and w.kind == FIRST][0]

        def changed() -> bool:
            obj = world.kube.get(CRONJOBS, world.names[first.ns], first.name)
            return not problems(first, obj, world.blocked[first.ns])

        deadline = time.monotonic() + 10
        while not changed() and time.monotonic() < deadline:
            time.sleep(0.01)
    else:
        time.sleep(rng.uniform(0, 2 * INTERVAL))
    assert op.running(), f"the operator exited on its own:\n{op.tail(40)}"
    fault = time.monotonic()
    op.kill()
    figures.kills += 1
    assert not (wrong := world.wrong(settled=False)), f"right after a kill (seed {SEED}): {wrong}"
    if any(world.half_changed(i) for i in flipped):
        figures.mid_enforcement += 1
    if rng.random() < 0.25:
        world.flip(rng.randrange(len(world.names)))
        figures.flips_while_down += 1
    op.start()
    return fault, time.monotonic()


def restart_apiserver(world: World, controlplane: ControlPlane, rng: random.Random) -> None:
    """Flip two budgets, restart kube-apiserver alone; show that an old watch gets 410."""
    kube = world.kube
    before = kube.request("GET", DEPLOYMENTS.path(world.names[0]),
                          {"limit": 1})["metadata"]["resourceVersion"]
    for i in rng.sample(range(len(world.names)), 2):
        world.flip(i)
    time.sleep(rng.uniform(0, 0.5))  # while it enforces: it gets 503s, then no connection
    fault = time.monotonic()
    world.figures.apiserver_ready = controlplane.restart_apiserver(down_seconds=1, grace=3)
    up = time.monotonic()
    world.figures.apiserver_down = up - fault
    world.figures.gone_410 = watch_from(kube, DEPLOYMENTS.path(world.names[0]), before)
    assert "410" in world.figures.gone_410, world.figures.gone_410
    world.converge("kube-apiserver restart", fault, up)


def watch_from(kube: Kube, path: str, version: str) -> str:
    """What a watch resumed from ``version`` gets: the error it ends with."""
    try:
        resp = kube.client.call_api(*kube.client.param_serialize(
            method="GET", resource_path=path,
            query_params=[("watch", "true"), ("resourceVersion", version),
                          ("timeoutSeconds", "2")],
            header_params={"Accept": "application/json"}, auth_settings=["BearerToken"])[:3],
            _request_timeout=10)
        body = resp.read()  # type: ignore[no-untyped-call]
    except Exception as exc:  # noqa: BLE001 - an HTTP 410 answer is also what we look for
        return f"{exc}"
    for line in body.decode().splitlines():
        event = json.loads(line)
        if event.get("type") == "ERROR":
            o = event["object"]
            return f"{o.get('code')} {o.get('reason')}: {o.get('message')}"
    return f"no error: {body[:200]!r}"


def restart_prometheus(world: World, prometheus: Prometheus, rng: random.Random) -> None:
    """Flip a budget while Prometheus is down for a few intervals; then start it again."""
    fault = time.monotonic()
    prometheus.stop()
    world.flip(rng.randrange(len(world.names)))
    time.sleep(3 * INTERVAL)
    prometheus.start()
    up = time.monotonic()
    world.figures.prometheus_down = up - fault
    world.converge("Prometheus restart", fault, up)


def report(f: Figures) -> None:
    def line(what: str, values: list[float]) -> str:
        return (f"  {what}: n={len(values)}, median {statistics.median(values):.2f} s, "
                f"max {max(values):.2f} s")

    print(f"chaos figures (seed {SEED}, interval {INTERVAL:g} s):")
    print(f"  faults: {f.kills} SIGKILLs ({f.mid_enforcement} left a flipped budget's "
          f"workloads half changed), 1 kube-apiserver restart ({f.apiserver_down:.1f} s down, "
          f"ready {f.apiserver_ready:.1f} s after its start; an old watch got: "
          f"{f.gone_410[:80]}), 1 Prometheus "
          f"restart ({f.prometheus_down:.1f} s down)")
    print(f"  budget flips: {f.flips} ({f.flips_while_down} while the operator was down); "
          f"{f.samples} samples checked")
    print("  convergence after the fault ended (operator serving, API server or Prometheus "
          "ready):")
    for what, values in f.since_up.items():
        print(line(what, values))
    print("  convergence after the fault began:")
    for what, values in f.since_fault.items():
        print(line(what, values))
    print(f"  operator Events: {dict(sorted(f.events.items()))}, 0 duplicates; "
          f"{f.events_lost} workload transitions without their Event (killed between "
          f"the write and the Event)")
    worst = max(v for what, values in f.since_up.items() if what != "start" for v in values)
    assert worst <= 2 * INTERVAL, \
        f"convergence took {worst:.2f} s, more than two intervals (seed {SEED})"
