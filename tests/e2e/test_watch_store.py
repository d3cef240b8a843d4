"""The watches' store (issue 16) on the real control plane: no LIST in a steady state.

Covers:
- a cut connection: the store keeps what it saw (stale, never emptied), and when the
  connection comes back the watch resumes from its resourceVersion: a pod deleted and
  one created meanwhile leave and arrive, without a relist;
- an API server restart during a cut: the old resourceVersion is gone (410), the feed
  lists again and replaces its objects whole: nothing created or deleted meanwhile is
  missed;
- a pod whose agent label is removed leaves the agent feed (and, marked enforced, joins
  the enforced-only one); a pod that is not an agent is never received;
- an evaluation through a counting proxy: the first lists each feed once, a quiet one
  sends no request at all (reads included);
- a namespace made mandatory at runtime gets feeds of its own (its unlabelled workload
  is governed), which stop when the label goes.
"""

from __future__ import annotations

import re
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from typing import Any

import kopf
import pytest
from test_operator import agent_deployment, budget

from harness.apiproxy import ApiProxy
from harness.controlplane import ControlPlane
from harness.exporter import AgentExporter
from harness.prometheus import Prometheus
from harness.spend import seed
from harness.waiting import eventually
from token_budget.api.v1alpha1 import ENROLMENT_LABEL
from token_budget.enforcement.patches import ENFORCED_LABEL
from token_budget.handlers import evaluation
from token_budget.handlers import store as stores
from token_budget.handlers.evaluation import (
    Evaluator,
    base_feeds,
    enforced_only,
    trim_for,
)
from token_budget.kube import (
    DEPLOYMENTS,
    NAMESPACES,
    PODS,
    TOKENBUDGETS,
    Kube,
    api_client,
)
from token_budget.metrics.prometheus import PrometheusSource
from token_budget.settings import Settings

pytestmark = pytest.mark.cluster
AGENT = "tokenbudget.io/agent"


def pod(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": labels or {}},
            "spec": {"containers": [{"name": "c", "image": "example/agent:1"}]}}


@pytest.fixture
def proxy(controlplane: ControlPlane) -> Iterator[ApiProxy]:
    p = ApiProxy(controlplane.server, controlplane._admin_ssl())
    yield p
    p.close()


def watcher_through(proxy: ApiProxy | None, settings: Settings, inactivity: float = 70.0
                    ) -> tuple[stores.Watcher, stores.Background]:
    w = stores.Watcher(stores.Store(trim_for(settings)), inactivity_timeout=inactivity)
    info = kopf.ConnectionInfo(server=proxy.url) if proxy is not None else None
    return w, stores.Background(w, info)


def names(store: stores.Store, feed: stores.Feed) -> set[str]:
    return {o["metadata"]["name"] for o in store.items(feed)}


def test_a_cut_resumes_and_a_restart_relists_and_nothing_is_missed(
        kube: Kube, namespace: str, controlplane: ControlPlane, proxy: ApiProxy) -> None:
    ns = namespace
    settings = Settings(prometheus_url="http://127.0.0.1:1")
    agents = stores.Feed(PODS, ns, AGENT)
    enforced = stores.Feed(PODS, ns, enforced_only(AGENT))
    for name in ("a", "b"):
        kube.create(PODS, ns, pod(name, {AGENT: "true"}))
    kube.create(PODS, ns, pod("web", {"app": "web"}))
    watcher, bg = watcher_through(proxy, settings, inactivity=3.0)
    try:
        watcher.want([agents, enforced])
        # A list whose request timed out is sent again after kopf's request timeout (60 s,
        # set by the Watcher); a cold CI run under load 4 once waited past 30 s for it.
        watcher.store.wait([agents, enforced], 150)
        assert names(watcher.store, agents) == {"a", "b"}, "the pod that is not an agent too"
        assert names(watcher.store, enforced) == set()

        # The agent label goes, the operator's mark stays: from one feed to the other.
        kube.patch(PODS, ns, "b", {"metadata": {"labels": {AGENT: None, ENFORCED_LABEL: "x"}}})
        eventually(lambda: names(watcher.store, agents) == {"a"}
                   and names(watcher.store, enforced) == {"b"}, 30, what="b relabelled")

        # A cut: stale but never emptied; on healing, resumed from its resourceVersion.
        proxy.cut()
        kube.request("DELETE", PODS.path(ns, "a"), {"gracePeriodSeconds": 0})
        kube.create(PODS, ns, pod("c", {AGENT: "true"}))
        time.sleep(4)  # longer than the inactivity timeout: the stream was given up
        assert names(watcher.store, agents) == {"a"}, "a cut must not empty the store"
        proxy.heal()
        eventually(lambda: names(watcher.store, agents) == {"c"}, 60, what="c in, a out")
        assert watcher.store.lists(agents) == 1, "resumed without a relist"

        # A restart during a cut: the resourceVersion is gone (410), the feed relists.
        proxy.cut()
        kube.request("DELETE", PODS.path(ns, "c"), {"gracePeriodSeconds": 0})
        kube.create(PODS, ns, pod("d", {AGENT: "true"}))
        controlplane.restart_apiserver(down_seconds=1, grace=3)
        assert names(watcher.store, agents) == {"c"}
        proxy.heal()
        eventually(lambda: names(watcher.store, agents) == {"d"}, 90, what="d in, c out")
        kube.create(PODS, ns, pod("e", {AGENT: "true"}))  # and the watch goes on after it
        eventually(lambda: names(watcher.store, agents) == {"d", "e"}, 30, what="e in")
        print(f"\nlists of the agent feed: {watcher.store.lists(agents)}")
    finally:
        bg.close()


def test_a_quiet_evaluation_sends_no_request_and_the_first_lists_each_feed_once(
        kube: Kube, namespace: str, controlplane: ControlPlane, proxy: ApiProxy,
        exporter: AgentExporter, prometheus: Prometheus, tmp_path: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    ns = namespace
    kube.create(DEPLOYMENTS, ns, agent_deployment("agent", replicas=2))
    kube.create(PODS, ns, pod("web", {"app": "web"}))
    kube.create(TOKENBUDGETS, ns, budget("team"))
    seed(exporter, prometheus, ns, "agent-0")
    eventually(lambda: len(kube.list(PODS, ns, AGENT)) == 2, 60, what="agent pods")
    settings = Settings(prometheus_url=prometheus.url, namespaces=[ns], recent_seconds=60)
    config = tmp_path / "proxy.kubeconfig"
    config.write_text(proxy.kubeconfig())
    watcher, bg = watcher_through(proxy, settings)
    try:
        watcher.want(base_feeds(settings))
        ev = Evaluator(Kube(api_client(str(config))), PrometheusSource(prometheus.url),
                       settings, watcher=watcher)
        t0 = time.monotonic()
        first = ev.run_once()
        # KEDA's ScaledObjects are a feed too while KEDA's CRD is served (another test of the
        # suite installs it, and removes it): listed at most once, like every feed.
        feeds = base_feeds(settings)
        requested = [r.path for r in proxy.requests if r.method == "GET"
                     and "watch=" not in r.path and "limit=" in r.path]
        listed = sorted(p for p in requested if "/scaledobjects" not in p)
        # A list whose request timed out on a loaded machine is sent again, as kopf logs
        # ("Request attempt #1/9 failed; will retry: GET <url> -> TimeoutError()"): once
        # more for each such retry, never otherwise.
        retried = Counter(
            urllib.parse.unquote(urllib.parse.urlsplit(m.group(1)).path + "?"
                                 + urllib.parse.urlsplit(m.group(1)).query)
            for r in caplog.records
            if (m := re.search(r"will retry: GET (\S+)", r.getMessage())))
        extra = {p: n - 1 - retried[p] for p, n in Counter(listed).items() if n > 1}
        assert len(set(listed)) == len(feeds) and all(v <= 0 for v in extra.values()), \
            f"{len(feeds)} feeds, each listed once (retries: {dict(retried)}): {listed}"
        assert sum("/scaledobjects" in p for p in requested) <= 1, requested
        assert first.workload_writes >= 3, "the Deployment and its two pods stamped"
        runs: list[int] = []

        def quiet_run() -> bool:
            runs.append(ev.run_once().writes)
            return runs[-1] == 0

        eventually(quiet_run, 60, interval=0.5, what="a quiet evaluation")
        n = len(proxy.requests)
        quiet = ev.run_once()
        # The feeds' streams run on beside it: one that ends (its timeoutSeconds, a 429 while
        # the API server's cache reinitialises) is opened again from its resourceVersion, by
        # the watcher, not by the evaluation, and lists nothing. Everything else counts.
        sent = [r for r in proxy.requests[n:]
                if not ("watch=true" in r.path and "resourceVersion=" in r.path)]
        assert sent == [], f"a quiet evaluation sent {[(r.method, r.path) for r in sent]}"
        assert quiet.writes == 0
        held = {o["metadata"]["name"] for f in feeds if f.res is PODS
                for o in watcher.store.items(f)}
        assert "web" not in held and len(held) == 2
        print(f"\nfirst evaluation: {len(listed)} list requests for {len(feeds)} feeds, "
              f"{first.seconds:.2f} s; writes of the evaluations after it: {runs} "
              f"({time.monotonic() - t0:.0f} s); quiet evaluation: 0 requests in "
              f"{quiet.seconds * 1000:.0f} ms")
    finally:
        bg.close()


@pytest.mark.parametrize("by_namespace", [True, False], ids=["by-namespace", "cluster-less-others"])
def test_a_namespace_made_mandatory_at_runtime_is_watched_then_let_go(
        kube: Kube, namespace: str, prometheus: Prometheus, by_namespace: bool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    ns = namespace
    if not by_namespace:  # as with many mandatory namespaces: one feed per kind, others left out
        monkeypatch.setattr(evaluation, "MANDATORY_BY_NAMESPACE", 0)
    team = agent_deployment("team", replicas=1)
    del team["metadata"]["labels"][AGENT], team["spec"]["template"]["metadata"]["labels"][AGENT]
    kube.create(DEPLOYMENTS, ns, team)
    kube.create(PODS, ns, pod("bare", {"app": "bare"}))
    settings = Settings(prometheus_url=prometheus.url,
                        namespaces=[ns] if by_namespace else [])
    watcher, bg = watcher_through(None, settings)

    def mine() -> list[str]:
        return [w.key.name for w in ev.gather().workloads if w.key.namespace == ns]

    def unselected() -> list[stores.Feed]:
        return [f for f in watcher.wanted if f.res is PODS and f.selector is None]

    try:
        ev = Evaluator(kube, PrometheusSource(prometheus.url), settings, watcher=watcher)
        assert mine() == [] and unselected() == []

        kube.patch(NAMESPACES, None, ns, {"metadata": {"labels": {ENROLMENT_LABEL: "Mandatory"}}})
        eventually(lambda: mine() == ["team"], 60, what="the unlabelled Deployment enrolled")
        [feed] = unselected()
        if by_namespace:
            assert feed == stores.Feed(PODS, ns)
        else:
            assert feed.namespace is None and feed.fields and f"!={ns}," not in feed.fields + ","
            assert "metadata.namespace!=kube-system" in feed.fields
        g = ev.gather()
        pods = [k.name for k in g.objects if k.kind == "Pod" and k.namespace == ns]
        assert len(pods) == 1 and pods[0].startswith("team-"), "its pod; never the bare one"
        held = {o["metadata"]["namespace"] for o in watcher.store.items(feed)}
        assert held == {ns}, "only mandatory namespaces' objects arrive"

        kube.patch(NAMESPACES, None, ns, {"metadata": {"labels": {ENROLMENT_LABEL: None}}})
        eventually(lambda: mine() == [], 30, what="enrolment lifted")
        assert unselected() == []
    finally:
        bg.close()
