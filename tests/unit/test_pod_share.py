"""A throttled workload's rate is shared among its live pods; Block on what cannot be stopped.

Covers :func:`patches.pod_share` (the per-pod share, kept while within the
margin), :func:`patches.cannot_stop` (the Event a blocked bare Pod, DaemonSet
or ReplicaSet pod gets), and :meth:`Evaluator.act` putting them together with a
fake API (it records the patches and Events it is sent; no cluster).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from token_budget.api import v1alpha1 as api
from token_budget.enforcement import patches
from token_budget.handlers.evaluation import Evaluator, Gathered
from token_budget.kube import EVENTS
from token_budget.policy.decisions import Directive, Evaluation
from token_budget.policy.inputs import WorkloadKey
from token_budget.settings import Settings

NOW = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)
NS = "team-a"
BUDGET = f"TokenBudget/{NS}/team"


def directive(state: api.State = api.State.THROTTLED, rate: int | None = 3000) -> Directive:
    return Directive(state=state, budget=BUDGET, reason="LimitReached", message="m",
                     tokens_per_minute=rate)


def pod(name: str, rate: str | None = None, phase: str = "Pending",
        owner: tuple[str, str] | None = ("ReplicaSet", "agent-7d9f"),
        **meta: Any) -> dict[str, Any]:
    labels = {"app": "agent", "tokenbudget.io/agent": "true", "pod-template-hash": "7d9f"}
    annotations = {patches.TOKENS_PER_MINUTE: rate} if rate is not None else {}
    refs = [{"kind": owner[0], "name": owner[1]}] if owner else []
    return {"kind": "Pod", "apiVersion": "v1",
            "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}", "labels": labels,
                         "annotations": annotations, "ownerReferences": refs, **meta},
            "spec": {}, "status": {"phase": phase}}


# -- the share ------------------------------------------------------------------


@pytest.mark.parametrize(("rate", "pods", "has", "expected"), [
    pytest.param(3000, 3, None, 1000, id="three live pods share the rate in three"),
    pytest.param(3000, 1, None, 3000, id="one pod has the whole rate"),
    pytest.param(3000, 0, None, 3000, id="no pod counted yet: the whole rate"),
    pytest.param(1000, 3, None, 333, id="rounded down, never more than the rate"),
    pytest.param(2, 3, None, 1, id="at least one token a minute"),
    pytest.param(3000, 3, "1040", 1040, id="a share within 5 % is kept, not rewritten"),
    pytest.param(3000, 3, "960", 960, id="below by under 5 % is kept too"),
    pytest.param(3000, 3, "1060", 1000, id="a share 6 % off is rewritten"),
    pytest.param(3000, 4, "1000", 750, id="a fourth pod: every share is rewritten"),
    pytest.param(3000, 3, "fast", 1000, id="a hand-edited value is rewritten"),
])
def test_each_pod_gets_its_share(rate: int, pods: int, has: str | None, expected: int) -> None:
    got = patches.pod_share(directive(rate=rate), pods, pod("p", has))
    assert got is not None and got.tokens_per_minute == expected
    assert got.state is api.State.THROTTLED and got.budget == BUDGET


@pytest.mark.parametrize("d", [
    pytest.param(None, id="no directive"),
    pytest.param(directive(api.State.REROUTED, None), id="a directive without a rate"),
])
def test_without_a_rate_there_is_nothing_to_share(d: Directive | None) -> None:
    assert patches.pod_share(d, 3, pod("p", "1000")) == d


@given(rate=st.integers(1, 10**7), pods=st.integers(1, 50),
       drift=st.floats(-0.2, 0.2))
def test_the_shares_never_add_up_to_more_than_the_rate_and_the_margin(
        rate: int, pods: int, drift: float) -> None:
    has = str(max(1, int(rate / pods * (1 + drift))))
    shares = [patches.pod_share(directive(rate=rate), pods, pod(f"p{i}", has))
              for i in range(pods)]
    total = sum(s.tokens_per_minute or 0 for s in shares if s is not None)
    assert total <= max(rate, pods) * (1 + patches.RATE_MARGIN) + pods
    if rate >= 100 * pods:  # rounding down costs at most a token a minute per pod
        assert total >= rate * (1 - patches.RATE_MARGIN) - pods


# -- Block on a pod nothing can stop --------------------------------------------


def _blocking_patch(p: dict[str, Any]) -> dict[str, Any] | None:
    return patches.patch_for(p, directive(api.State.BLOCKED, None), NOW, may_scale=False)


@pytest.mark.parametrize(("owner", "says"), [
    pytest.param(None, "a bare Pod is not a kind the operator can stop", id="a bare Pod"),
    pytest.param(("DaemonSet", "node-agent"), "its owner DaemonSet/node-agent is not",
                 id="a DaemonSet's pod"),
    pytest.param(("ReplicaSet", "loose"), "its owner ReplicaSet/loose is not",
                 id="a ReplicaSet no Deployment owns"),
])
def test_blocking_a_pod_nothing_can_stop_says_so(owner: tuple[str, str] | None,
                                                 says: str) -> None:
    p = pod("p", owner=owner)
    text = patches.cannot_stop(p, directive(api.State.BLOCKED, None), _blocking_patch(p))
    assert text is not None and says in text and BUDGET in text


def test_the_event_comes_once_per_transition() -> None:
    p = pod("p", owner=None)
    blocked = directive(api.State.BLOCKED, None)
    p["metadata"]["annotations"] = patches.directive_annotations(blocked)
    again = patches.patch_for(p, blocked, NOW, may_scale=False)
    assert patches.cannot_stop(p, blocked, again) is None, "already Blocked: no second Event"
    assert patches.cannot_stop(p, directive(), _blocking_patch(p)) is None, "not a Block"


# -- the evaluation puts them together ------------------------------------------


class FakeKube:
    """Records writes; every patch and create succeeds."""

    def __init__(self) -> None:
        self.patched: dict[str, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []

    def patch(self, res: Any, namespace: str, name: str, body: dict[str, Any],
              sub: str | None = None) -> None:
        self.patched[name] = body

    def create(self, res: Any, namespace: str, body: dict[str, Any]) -> None:
        assert res is EVENTS
        self.events.append(body)


def _act(objects: list[dict[str, Any]], units: dict[str, WorkloadKey],
         directives: dict[WorkloadKey, Directive]) -> FakeKube:
    kube = FakeKube()
    ev = Evaluator(kube, None, Settings(), clock=lambda: NOW)  # type: ignore[arg-type]
    g = Gathered()
    for obj in objects:
        key = WorkloadKey(obj["kind"], NS, obj["metadata"]["name"])
        g.objects[key] = obj
        g.top[key] = units.get(key.name, key)
    ev.act(g, Evaluation(decisions=(), directives=directives), NOW)
    return kube


def test_a_deployments_live_pods_each_carry_a_third_of_its_rate() -> None:
    dep = WorkloadKey("Deployment", NS, "agent")
    objects = [{"kind": "Deployment", "apiVersion": "apps/v1",
                "metadata": {"name": "agent", "namespace": NS}, "spec": {"replicas": 3}},
               pod("agent-a"), pod("agent-b", phase="Running"), pod("agent-c", "1010"),
               pod("agent-done", phase="Succeeded"),
               pod("agent-going", deletionTimestamp="2026-11-30T11:59:00Z")]
    kube = _act(objects, {o["metadata"]["name"]: dep for o in objects}, {dep: directive()})
    rates = {name: (p["metadata"].get("annotations") or {}).get(patches.TOKENS_PER_MINUTE)
             for name, p in kube.patched.items()}
    assert rates["agent"] == "3000", "the workload carries the workload's rate"
    assert rates["agent-a"] == rates["agent-b"] == "1000"
    assert rates["agent-c"] is None, "1010 is within the margin: not rewritten"
    assert kube.events == []


def test_a_blocked_bare_pod_gets_one_cannot_stop_event() -> None:
    bare = pod("loner", owner=None)
    key = WorkloadKey("Pod", NS, "loner")
    kube = _act([bare], {}, {key: directive(api.State.BLOCKED, None)})
    assert kube.patched["loner"]["metadata"]["annotations"][patches.STATE] == "Blocked"
    [event] = kube.events
    assert (event["reason"], event["type"]) == ("CannotStop", "Warning")
    assert event["involvedObject"]["name"] == "loner"


def test_a_blocked_deployments_pods_get_no_cannot_stop_event() -> None:
    dep = WorkloadKey("Deployment", NS, "agent")
    kube = _act([pod("agent-a")], {"agent-a": dep}, {dep: directive(api.State.BLOCKED, None)})
    assert kube.patched["agent-a"]["metadata"]["annotations"][patches.STATE] == "Blocked"
    assert kube.events == []


# -- a new pod is stamped with its share at admission --------------------------


@pytest.mark.parametrize(("owner", "pod_owner", "expected"), [
    pytest.param({"kind": "Deployment", "spec": {"replicas": 3}}, ("ReplicaSet", "agent-7d9f"),
                 "1000", id="a Deployment's new pod: a third of 3 replicas' rate"),
    pytest.param({"kind": "StatefulSet", "spec": {}}, ("StatefulSet", "agent"), "3000",
                 id="replicas unset: one pod, the whole rate"),
    pytest.param({"kind": "Job", "spec": {"parallelism": 4}}, ("Job", "agent"), "750",
                 id="a Job's pod: its share of the parallelism"),
    pytest.param({"kind": "Deployment", "spec": {"replicas": 0}}, ("ReplicaSet", "agent-7d9f"),
                 "3000", id="scaled to zero: the first pod back gets the whole rate"),
])
def test_a_new_pod_is_stamped_with_its_share_of_the_owners_rate(
        owner: dict[str, Any], pod_owner: tuple[str, str], expected: str) -> None:
    from token_budget.webhooks.admission import AdmissionCache

    cache = AdmissionCache()
    annotations = {**patches.directive_annotations(directive())}
    cache.workload_event({**owner, "metadata": {"name": "agent", "namespace": NS,
                                                "annotations": annotations}}, deleted=False)
    stamped = cache.owner_directive(NS, pod("new", owner=pod_owner))
    assert stamped[patches.TOKENS_PER_MINUTE] == expected
    assert stamped[patches.STATE] == "Throttled"


# -- what needed nothing is not diffed again ------------------------------------


def test_an_object_that_needed_nothing_is_diffed_again_only_when_it_or_its_directive_changes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from token_budget.handlers import store as stores

    diffed: list[str] = []
    patch_for = patches.patch_for

    def counting(obj: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        diffed.append(obj["metadata"]["name"])
        return patch_for(obj, *args, **kwargs)

    monkeypatch.setattr(patches, "patch_for", counting)
    dep = WorkloadKey("Deployment", NS, "agent")
    deployment = {"kind": "Deployment", "apiVersion": "apps/v1",
                  "metadata": {"name": "agent", "namespace": NS}, "spec": {"replicas": 2}}
    g = Gathered()
    for obj in (deployment, pod("agent-a"), pod("agent-b")):
        key = WorkloadKey(obj["kind"], NS, obj["metadata"]["name"])
        g.objects[key], g.top[key] = obj, dep
    kube = FakeKube()
    watched = type("W", (), {"store": stores.Store()})()  # reading the watches' store
    ev = Evaluator(kube, None, Settings(), clock=lambda: NOW, watcher=watched)  # type: ignore[arg-type]

    def act(directives: dict[WorkloadKey, Directive]) -> list[str]:
        diffed.clear()
        kube.patched.clear()
        ev.act(g, Evaluation(decisions=(), directives=directives), NOW)
        return sorted(diffed)

    assert act({}) == ["agent", "agent-a", "agent-b"] and kube.patched == {}
    assert act({}) == [], "the same objects, the same (no) directive: nothing to diff"
    g.objects[WorkloadKey("Pod", NS, "agent-b")] = pod("agent-b", phase="Running")  # an event
    assert act({}) == ["agent-b"]
    assert act({dep: directive()}) == ["agent", "agent-a", "agent-b"]
    assert sorted(kube.patched) == ["agent", "agent-a", "agent-b"]
    # The patches were needed: tried again until the objects carry the directive (this
    # fake API does not change them), never taken as done.
    assert act({dep: directive()}) == ["agent", "agent-a", "agent-b"]
    assert sorted(kube.patched) == ["agent", "agent-a", "agent-b"]
    # Without a store (tools, listing every evaluation) nothing is kept between them.
    listing = Evaluator(kube, None, Settings(), clock=lambda: NOW)  # type: ignore[arg-type]
    for _ in range(2):
        diffed.clear()
        listing.act(g, Evaluation(decisions=(), directives={}), NOW)
        assert sorted(diffed) == ["agent", "agent-a", "agent-b"]
