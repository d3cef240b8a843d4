"""The watches' store: readiness, whole replacement on a relist, trimming, writes seen early.

The watches themselves run against the real API server: tests/e2e/test_watch_store.py.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from token_budget.handlers import store as stores
from token_budget.handlers.evaluation import Evaluator, base_feeds, mandatory_feeds, trim_for
from token_budget.kube import DEPLOYMENTS, NAMESPACES, PODS
from token_budget.settings import Settings

AGENT = "tokenbudget.io/agent"
FEED = stores.Feed(PODS, "team", AGENT)


def pod(name: str, rv: int = 1, **meta: Any) -> dict[str, Any]:
    return {"kind": "Pod", "apiVersion": "v1",
            "metadata": {"name": name, "namespace": "team", "resourceVersion": str(rv),
                         "labels": {AGENT: "true"}, **meta},
            "spec": {"serviceAccountName": "agent", "volumes": [{"name": "big"}],
                     "containers": [{"name": "c", "env": [{"name": "LLM_MODEL", "value": "m"},
                                                          {"name": "SECRET", "value": "x"}]}]},
            "status": {"phase": "Pending", "conditions": [{"type": "x"}]}}


def listed(store: stores.Store, feed: stores.Feed, *objs: dict[str, Any]) -> None:
    store.begin(feed)
    for o in objs:
        store.event(feed, None, o)
    store.listed(feed)


def names(store: stores.Store, feed: stores.Feed = FEED) -> list[str]:
    return sorted(o["metadata"]["name"] for o in store.items(feed))


def test_a_feed_that_has_not_listed_is_never_read_as_empty() -> None:
    store = stores.Store()
    store.begin(FEED)
    store.event(FEED, None, pod("a"))
    with pytest.raises(stores.NotReady):
        store.items(FEED)
    assert not store.ready([FEED])
    with pytest.raises(stores.NotReady, match="pods in team"):
        store.wait([FEED], timeout=0.05)
    store.listed(FEED)
    assert names(store) == ["a"]


def test_a_reader_waits_until_the_first_list_is_complete() -> None:
    store = stores.Store()
    threading.Timer(0.1, listed, (store, FEED, pod("a"))).start()
    t0 = time.monotonic()
    store.wait([FEED], timeout=5)
    assert 0.05 < time.monotonic() - t0 < 5
    assert names(store) == ["a"]


def test_a_relist_replaces_the_feed_whole_once_complete_and_not_before() -> None:
    store = stores.Store()
    listed(store, FEED, pod("a"), pod("b"))
    store.begin(FEED)  # after 410 Gone: b was deleted meanwhile, c created
    store.event(FEED, None, pod("a", 5))
    assert names(store) == ["a", "b"], "the old objects until the new list is complete"
    store.event(FEED, None, pod("c", 6))
    store.listed(FEED)
    assert names(store) == ["a", "c"]
    assert store.lists(FEED) == 2


def test_watch_events_add_change_and_remove() -> None:
    store = stores.Store()
    listed(store, FEED)
    store.event(FEED, "ADDED", pod("a"))
    store.event(FEED, "MODIFIED", pod("a", 2, annotations={"tokenbudget.io/state": "Blocked"}))
    [a] = store.items(FEED)
    assert a["metadata"]["annotations"] == {"tokenbudget.io/state": "Blocked"}
    store.event(FEED, "DELETED", pod("a", 3))  # also what a relabelled pod's feed receives
    assert names(store) == []


def test_the_store_keeps_only_what_an_evaluation_reads() -> None:
    settings = Settings(prometheus_url="http://p")
    store = stores.Store(trim_for(settings))
    listed(store, FEED, pod("a", managedFields=[{"manager": "x"}], annotations={
        "tokenbudget.io/state": "Ok", "kubectl.kubernetes.io/last-applied": "{...}"}))
    [a] = store.items(FEED)
    assert a["metadata"]["annotations"] == {"tokenbudget.io/state": "Ok"}
    assert "managedFields" not in a["metadata"] and "volumes" not in a["spec"]
    assert a["spec"]["serviceAccountName"] == "agent", "the directive service checks it"
    assert a["spec"]["containers"] == [{"env": [{"name": "LLM_MODEL", "value": "m"}]}]
    assert a["status"] == {"phase": "Pending"}
    ns = stores.Feed(NAMESPACES)
    listed(store, ns, {"metadata": {"name": "team", "labels": {"x": "y"},
                                    "annotations": {"big": "z"}}, "status": {"phase": "Active"}})
    assert store.items(ns) == [{"kind": "Namespace", "apiVersion": "v1", "metadata": {
        "name": "team", "labels": {"x": "y"}, "resourceVersion": None}}]


def test_in_a_mandatory_namespace_a_pod_nothing_stoppable_owns_is_never_held() -> None:
    store = stores.Store(trim_for(Settings(prometheus_url="http://p")))
    feed = stores.Feed(PODS, "team")
    owned = pod("web-1", ownerReferences=[{"kind": "ReplicaSet", "name": "web-5d9"}])
    bare = pod("bare")
    daemon = pod("node-agent", ownerReferences=[{"kind": "DaemonSet", "name": "d"}])
    listed(store, feed, owned, bare, daemon)
    assert names(store, feed) == ["web-1"]


def test_a_write_is_read_at_once_but_an_older_event_never_wins() -> None:
    store = stores.Store()
    listed(store, FEED, pod("a", 5))
    store.observed(PODS, pod("a", 7, annotations={"tokenbudget.io/state": "Blocked"}))
    [a] = store.items(FEED)
    assert a["metadata"]["resourceVersion"] == "7"
    store.observed(PODS, pod("a", 6))  # a late answer to an older write
    assert store.items(FEED)[0]["metadata"]["resourceVersion"] == "7"
    store.observed(PODS, pod("other", 9))  # not in the feed: left to the watch
    assert names(store) == ["a"]
    store.observed(DEPLOYMENTS, {**pod("a", 9), "kind": "Deployment"})  # another kind
    assert store.items(FEED)[0]["metadata"]["resourceVersion"] == "7"


def test_a_dropped_feed_is_not_ready_any_more() -> None:
    store = stores.Store()
    listed(store, FEED, pod("a"))
    store.drop(FEED)
    assert not store.ready([FEED]) and len(store) == 0


def test_feeds_select_agents_and_watch_unlabelled_objects_only_in_mandatory_namespaces() -> None:
    feeds = base_feeds(Settings(prometheus_url="http://p", namespaces=["a", "b"]))
    pods = [f for f in feeds if f.res is PODS]
    assert {f.namespace for f in pods} == {"a", "b"}
    assert all(f.selector for f in pods), "an unselected pod feed outside mandatory namespaces"
    assert {f.selector for f in pods} == {AGENT, f"tokenbudget.io/enforced,!{AGENT}"}
    cluster = base_feeds(Settings(prometheus_url="http://p"))
    assert {f.namespace for f in cluster} == {None}
    mandatory = mandatory_feeds(["m"])
    assert [f.res.kind for f in mandatory] == ["Deployment", "StatefulSet", "Job", "CronJob",
                                               "Pod"]
    assert {(f.namespace, f.selector) for f in mandatory} == {("m", None)}


def test_many_mandatory_namespaces_are_watched_as_the_cluster_less_the_others() -> None:
    many = [f"m{i}" for i in range(11)]
    feeds = mandatory_feeds(many, [*many, "kube-system", "web"])
    assert len(feeds) == 5, "a stream per kind, not per namespace and kind"
    assert {(f.namespace, f.selector, f.fields) for f in feeds} == {
        (None, None, "metadata.namespace!=kube-system,metadata.namespace!=web")}
    scoped = mandatory_feeds(many, many, scoped=True)  # --namespace: Roles there only
    assert len(scoped) == 55 and all(f.namespace for f in scoped)


class _Watcher(stores.Watcher):
    """A watcher whose feeds never list (an API server that does not answer)."""

    def want(self, feeds: Any) -> None:
        with self._lock:
            self._wanted = set(feeds)


def test_an_evaluation_never_runs_on_feeds_that_have_not_listed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import token_budget.handlers.evaluation as evaluation

    monkeypatch.setattr(evaluation, "READY_SECONDS", 0.05)
    ev = Evaluator(None, None, Settings(prometheus_url="http://p"),  # type: ignore[arg-type]
                   watcher=_Watcher(stores.Store()))
    monkeypatch.setattr(ev, "_keda", lambda: False)
    with pytest.raises(stores.NotReady):
        ev.gather()


def test_an_unchanged_budget_is_parsed_once_and_again_when_it_changes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    from token_budget.handlers import evaluation
    from token_budget.kube import TOKENBUDGETS

    settings = Settings(prometheus_url="http://p")
    store = stores.Store(trim_for(settings))
    for feed in base_feeds(settings):
        listed(store, feed)
    body = yaml.safe_load(Path("examples/team-search-budget.yaml").read_text())
    body["metadata"].update(namespace="team", uid="u1", resourceVersion="1")
    listed(store, stores.Feed(TOKENBUDGETS), body)
    ev = Evaluator(None, None, settings, watcher=_Watcher(store))  # type: ignore[arg-type]
    monkeypatch.setattr(ev, "_keda", lambda: False)
    calls: list[str] = []
    parse = evaluation.Evaluator._parse

    def counting(b: dict[str, Any], models: list[Any]) -> Any:
        calls.append(b["metadata"]["resourceVersion"])
        return parse(b, models)

    monkeypatch.setattr(ev, "_parse", counting)
    first, second = ev.gather(), ev.gather()
    assert len(first.budgets) == len(second.budgets) == 1 and calls == ["1"]
    store.event(stores.Feed(TOKENBUDGETS), "MODIFIED", {
        **body, "metadata": {**body["metadata"], "resourceVersion": "2"},
        "spec": {**body["spec"], "limits": [{"window": "1h", "tokens": 5}]}})
    [changed] = ev.gather().budgets
    assert calls == ["1", "2"] and changed.spec.limits[0].tokens == 5


def test_the_first_gather_hook_runs_once_on_a_full_store_before_any_evaluation(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The operator freezes its heap there: on a store that has not listed it would freeze
    # too little, after an evaluation it would freeze that evaluation's cycles for good.
    from token_budget.handlers import evaluation

    class Stop(Exception):
        pass

    class Source:
        stats = type("Stats", (), {"queries": 0})()

        def collect(self, *args: Any) -> Any:
            raise Stop

    monkeypatch.setattr(evaluation, "READY_SECONDS", 0.05)
    settings = Settings(prometheus_url="http://p")
    store = stores.Store(trim_for(settings))
    kube = type("K", (), {"counters": type("C", (), {"writes": 0})()})()
    calls: list[Any] = []
    ev = Evaluator(kube, Source(), settings, watcher=_Watcher(store),  # type: ignore[arg-type]
                   on_first_gather=lambda: calls.append(ev._previous))
    monkeypatch.setattr(ev, "_keda", lambda: False)
    with pytest.raises(stores.NotReady):
        ev.run_once()
    assert calls == []
    for feed in base_feeds(settings):
        listed(store, feed)
    for _ in range(2):
        with pytest.raises(Stop):
            ev.run_once()
    assert calls == [None]


def test_prometheus_is_read_while_the_workloads_are_gathered_but_not_beside_the_hook(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """After the first evaluation, the spend reading and the gathering of workloads each
    go on only once the other has begun (a rendezvous: one after the other, the first
    waits 5 s in vain). In the first evaluation nothing is read until the hook has run."""

    class Stop(Exception):
        pass

    meet = threading.Barrier(2, timeout=5)
    order: list[str] = []

    def rendezvous(what: str) -> None:
        order.append(what)
        if len(order) > 3:  # the first evaluation is done: meet the other side
            try:
                meet.wait()
            except threading.BrokenBarrierError:
                order.append(f"{what} alone")

    class Source:
        stats = type("Stats", (), {"queries": 0})()

        def collect(self, *args: Any) -> Any:
            rendezvous("collect")
            raise Stop

    settings = Settings(prometheus_url="http://p")
    store = stores.Store(trim_for(settings))
    for feed in base_feeds(settings):
        listed(store, feed)
    kube = type("K", (), {"counters": type("C", (), {"writes": 0})()})()
    ev = Evaluator(kube, Source(), settings, watcher=_Watcher(store),  # type: ignore[arg-type]
                   on_first_gather=lambda: order.append("hook"))
    monkeypatch.setattr(ev, "_keda", lambda: False)
    gather = ev._gather_workloads
    monkeypatch.setattr(ev, "_gather_workloads",
                        lambda g: (rendezvous("workloads"), gather(g))[1])
    with pytest.raises(Stop):
        ev.run_once()
    assert order == ["workloads", "hook", "collect"]
    started = time.monotonic()
    with pytest.raises(Stop):
        ev.run_once()
    assert sorted(order[3:]) == ["collect", "workloads"] and time.monotonic() - started < 5


def test_a_gather_that_fails_waits_for_the_reading_and_logs_its_failure_too(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The next evaluation's reading must not overlap this one's, and the reading's own
    failure (a programming error) is not lost behind the gather's."""
    class Stop(Exception):
        pass

    read: list[float] = []

    class Source:
        stats = type("Stats", (), {"queries": 0})()

        def collect(self, *args: Any) -> Any:
            if read:  # the first evaluation's reading passes; the second one's breaks
                time.sleep(0.3)
                read.append(time.monotonic())
                raise Stop("the reading broke")
            read.append(time.monotonic())
            raise Stop("first")

    settings = Settings(prometheus_url="http://p")
    store = stores.Store(trim_for(settings))
    for feed in base_feeds(settings):
        listed(store, feed)
    kube = type("K", (), {"counters": type("C", (), {"writes": 0})()})()
    ev = Evaluator(kube, Source(), settings, watcher=_Watcher(store))  # type: ignore[arg-type]
    monkeypatch.setattr(ev, "_keda", lambda: False)
    with pytest.raises(Stop):
        ev.run_once()

    def not_ready(g: Any) -> None:
        raise stores.NotReady("a mandatory namespace's pods have not listed")

    monkeypatch.setattr(ev, "_gather_workloads", not_ready)
    with pytest.raises(stores.NotReady):
        ev.run_once()
    assert len(read) == 2 and time.monotonic() >= read[1]  # the reading had ended
    failed = [r for r in caplog.records if r.getMessage() == "the spend reading failed too"]
    assert len(failed) == 1 and "the reading broke" in str(failed[0].exc_info[1])
