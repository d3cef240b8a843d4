"""A budget partitioned per user, end to end: the real control plane, Prometheus, webhooks.

Covers (issue 18 part 3): a partitioned budget pinned to one value by a spend
matcher is refused by the validating webhook; spend series carrying a ``user`` label for three
users (each user's exporter is a scrape job whose target label is ``user``, as
a gateway attributing requests would label them), a TokenBudget with
``partition: {label: user, podLabel: tokenbudget.io/owner}`` and one
Deployment per user labelled ``tokenbudget.io/owner=<user>``:

- the user over the limit is Blocked: their Deployment is scaled to zero and
  annotated, the two others keep their replicas and are not Blocked;
- the status lists the partitions (bounded), the budget's own state stays Ok,
  one ``PartitionsChanged`` Event names the change;
- admission refuses a new pod (and a new Deployment) of the blocked user, naming
  the partition and the budget, and one without the owner label, and admits
  another user's;
- an agent Deployment running without the owner label before the budget was
  partitioned keeps running: a pod of it deleted after partitioning is made again
  (admitted into the unpartitioned partition, not refused);
- the blocked user cannot leave the Block by relabelling: removing the owner label
  from their Deployment's template, or changing it to another user, is refused;
- raising the limit restores the blocked user's Deployment exactly (replicas as
  before) and admission admits their pods again.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from harness import webhooks
from harness.controlplane import ControlPlane
from harness.exporter import AgentExporter
from harness.prometheus import Prometheus
from harness.waiting import eventually
from token_budget.api import v1alpha1 as api
from token_budget.errors import EnforcementError
from token_budget.kube import DEPLOYMENTS, PODS, TOKENBUDGETS, Kube
from token_budget.metrics.prometheus import PrometheusSource
from token_budget.policy.catalog import Catalog
from token_budget.reports import spend as reports

A = "tokenbudget.io/"
OWNER = A + "owner"
USERS = ("alice", "bob", "carol")


@pytest.fixture
def per_user(prometheus: Prometheus, namespace: str) -> Iterator[dict[str, AgentExporter]]:
    """One exporter per user, scraped with the target label user=<user>."""
    exporters: dict[str, AgentExporter] = {}
    jobs = []
    try:
        for user in USERS:
            ex = exporters[user] = AgentExporter()
            ex.start()
            ex.add(namespace=namespace, workload=f"{user}-agent-0", model="gpt-4o")
            job = f"partition-{user}-{uuid.uuid4().hex[:6]}"
            prometheus.add_scrape_target(job, ex.target, scrape_interval="1s",
                                         labels={"user": user})
            jobs.append(job)
        for user in USERS:
            eventually(lambda u=user: prometheus.query(  # type: ignore[misc]
                f'count_over_time(llm_tokens_total{{namespace="{namespace}",user="{u}"}}[1m])'
                ' > 1'), 60, what=f"two samples of {user}'s counters")
        yield exporters
    finally:
        for job in jobs:
            prometheus.remove_scrape_target(job)
        for ex in exporters.values():
            ex.stop()


def _spend(prometheus: Prometheus, ex: AgentExporter, ns: str, user: str, tokens: int) -> None:
    ex.add(namespace=ns, workload=f"{user}-agent-0", model="gpt-4o", input=tokens)
    total = ex.emitted("counters", namespace=ns)
    prometheus.wait_for(f'sum(llm_tokens_total{{namespace="{ns}",user="{user}"}})',
                        lambda r: bool(r) and float(r[0]["value"][1]) >= total, timeout=30)


def _deployment(user: str) -> dict[str, Any]:
    name = f"{user}-agent"
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "labels": {A + "agent": "true", OWNER: user}},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name, A + "agent": "true",
                                                      OWNER: user}},
                              "spec": {"containers": [{"name": "agent",
                                                       "image": "example/agent:1"}]}}},
    }


def _pod(name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {A + "agent": "true", **labels}},
            "spec": {"containers": [{"name": "a", "image": "example/agent:1"}]}}


def _refusal(kube: Kube, ns: str, name: str, labels: dict[str, str],
             body: dict[str, Any] | None = None) -> str:
    """The refusal of a new pod, or of ``body`` (a Deployment): "" when admitted (the
    dry run stores nothing)."""
    try:
        if body is None:
            webhooks.dry_create(kube, PODS.path(ns), _pod(name, labels))
        else:
            webhooks.dry_create(kube, DEPLOYMENTS.path(ns), body)
    except EnforcementError as exc:
        return str(exc).replace("\\", "")  # the Status body's quotes come escaped
    return ""


def _ann(obj: dict[str, Any]) -> dict[str, str]:
    return {k[len(A):]: v for k, v in (obj["metadata"].get("annotations") or {}).items()
            if k.startswith(A)}


def _budget(limit: int) -> dict[str, Any]:
    return {"apiVersion": "tokenbudget.io/v1alpha1", "kind": "TokenBudget",
            "metadata": {"name": "allowance"},
            "spec": {"limits": [{"window": "1h", "tokens": limit}],
                     "actions": [{"type": "Warn", "atPercent": 80},
                                 {"type": "Block", "atPercent": 100}],
                     "partition": {"label": "user", "podLabel": OWNER, "statusTop": 2}}}


def test_the_user_over_the_limit_is_blocked_alone_refused_at_admission_and_restored(
        kube: Kube, controlplane: ControlPlane, prometheus: Prometheus, namespace: str,
        per_user: dict[str, AgentExporter],
        tmp_path_factory: pytest.TempPathFactory) -> None:
    ns = namespace
    with webhooks.serving_operator(kube, controlplane.kubeconfig, prometheus.url,
                                   tmp_path_factory.mktemp("partitions-operator"),
                                   identity="partitions"):
        for user in USERS:
            kube.create(DEPLOYMENTS, ns, _deployment(user))
        legacy = _deployment("nobody")
        legacy["metadata"] = {"name": "legacy-agent", "labels": {A + "agent": "true"}}
        legacy["spec"]["replicas"] = 1
        legacy["spec"]["selector"] = {"matchLabels": {"app": "legacy-agent"}}
        legacy["spec"]["template"]["metadata"]["labels"] = {"app": "legacy-agent",
                                                            A + "agent": "true"}
        kube.create(DEPLOYMENTS, ns, legacy)  # an agent nobody labelled with an owner
        eventually(lambda: len(kube.list(PODS, ns, f"{A}agent=true")) == 7, 90,
                   what="2 pods per user and the legacy agent's")
        pinned = _budget(1000)
        pinned["spec"]["spendMatchers"] = [{"label": "user", "value": "alice"}]
        with pytest.raises(EnforcementError, match="must not be a label spendMatchers"):
            webhooks.dry_create(kube, TOKENBUDGETS.path(ns), pinned)
        kube.create(TOKENBUDGETS, ns, _budget(1000))

        def partitions() -> dict[str, Any] | None:
            st = kube.get(TOKENBUDGETS, ns, "allowance").get("status") or {}
            return st if (st.get("partitions") or {}).get("count") == 4 else None

        eventually(partitions, 60, what="4 partitions (3 users and the unpartitioned)")
        eventually(lambda: all(_ann(kube.get(DEPLOYMENTS, ns, f"{u}-agent")).get("state")
                               == "Ok" for u in USERS), 60, what="every owner Ok")

        _spend(prometheus, per_user["alice"], ns, "alice", 1500)
        _spend(prometheus, per_user["bob"], ns, "bob", 850)
        _spend(prometheus, per_user["carol"], ns, "carol", 100)

        def alice_stopped() -> dict[str, Any] | None:
            dep = kube.get(DEPLOYMENTS, ns, "alice-agent")
            return dep if dep["spec"]["replicas"] == 0 and \
                _ann(dep).get("state") == "Blocked" else None

        dep = eventually(alice_stopped, 60, what="alice's Deployment scaled to zero")
        assert _ann(dep)["previous-replicas"] == "2"
        assert _ann(dep)["budget"] == f"TokenBudget/{ns}/allowance"
        eventually(lambda: _ann(kube.get(DEPLOYMENTS, ns, "bob-agent")).get("state")
                   == "Warning", 60, what="bob Warning at 85%")
        for user in ("bob", "carol"):
            other = kube.get(DEPLOYMENTS, ns, f"{user}-agent")
            assert other["spec"]["replicas"] == 2, f"{user}'s agent keeps running"
            assert _ann(other)["state"] != "Blocked"
        # The status is written after the workloads are told: wait for the evaluation's.
        st = eventually(lambda: (x := kube.get(TOKENBUDGETS, ns, "allowance")["status"])
                        ["partitions"]["blocked"] == 1 and x, 30, what="the status written")
        assert st["state"] == "Ok", "one user Blocked does not block the budget for everyone"
        p = st["partitions"]
        assert (p["blocked"], p["restricted"], len(p["top"])) == (1, 2, 2)
        assert [(e["value"], e["state"]) for e in p["over"]] == [
            ("alice", "Blocked"), ("bob", "Warning")]
        assert "1 Blocked" in st["message"]

        # `tokenbudget report` over the budget's own window: each person's spend as read from
        # the real Prometheus, summed as the partitions sum it.
        read = api.TokenBudget.model_validate(kube.get(TOKENBUDGETS, ns, "allowance"))
        rep = reports.build(PrometheusSource(prometheus.url), [read], Catalog(), {ns: {}},
                            3600, dt.datetime.now(dt.UTC))
        part = rep.by_partition[f"TokenBudget/{ns}/allowance"]
        spent = {v: round(r.tokens) for v, r in part.rows.items()}
        assert {u: spent.get(u) for u in USERS} == {"alice": 1500, "bob": 850, "carol": 100}
        assert [v for v, _ in part.ranked()] == ["alice", "bob"]  # statusTop 2

        def changed() -> list[str]:
            data = kube.request("GET", f"/api/v1/namespaces/{ns}/events")
            return [e["message"] for e in data["items"] if e.get("reason") == "PartitionsChanged"]

        said = eventually(changed, 30, what="a PartitionsChanged Event")
        assert any('user="alice" Ok -> Blocked' in m for m in said)

        refusal = eventually(lambda: _refusal(kube, ns, "alice-extra", {OWNER: "alice"}), 30,
                             what="the webhook to know alice is Blocked")
        assert "403" in refusal
        assert f'TokenBudget {ns}/allowance is Blocked for partition user="alice"' in refusal
        assert _refusal(kube, ns, "bob-extra", {OWNER: "bob"}) == ""
        missing = _refusal(kube, ns, "nobody", {})
        assert "must carry the label tokenbudget.io/owner" in missing
        # Relabelling is no way out of alice's Block, on the template or to another user.
        for value in (None, "bob"):  # removed (merge-patch null), or another user's
            with pytest.raises(EnforcementError, match=f"{OWNER} must not"):
                kube.patch(DEPLOYMENTS, ns, "alice-agent",
                           {"spec": {"template": {"metadata": {"labels": {OWNER: value}}}}})
        tmpl = kube.get(DEPLOYMENTS, ns, "alice-agent")["spec"]["template"]["metadata"]
        assert tmpl["labels"][OWNER] == "alice"
        # The legacy agent, unlabelled before the budget was partitioned, is not stopped by
        # it: its pod deleted, its ReplicaSet makes another, and admission admits it.
        [old_pod] = kube.list(PODS, ns, "app=legacy-agent")
        kube.request("DELETE", PODS.path(ns, old_pod["metadata"]["name"]))
        eventually(lambda: [p for p in kube.list(PODS, ns, "app=legacy-agent")
                            if p["metadata"]["name"] != old_pod["metadata"]["name"]
                            and not p["metadata"].get("deletionTimestamp")], 60,
                   what="the legacy agent's pod made again and admitted")
        assert kube.get(DEPLOYMENTS, ns, "legacy-agent")["spec"]["replicas"] == 1
        second = _deployment("alice")
        second["metadata"]["name"] = "alice-second"
        refused = _refusal(kube, ns, "", {}, second)
        assert "Deployment pod template denied" in refused and 'user="alice"' in refused
        unlabelled = _deployment("bob")
        unlabelled["metadata"]["name"] = "anonymous"
        del unlabelled["spec"]["template"]["metadata"]["labels"][OWNER]
        assert "must carry the label" in _refusal(kube, ns, "", {}, unlabelled)

        kube.patch(TOKENBUDGETS, ns, "allowance",
                   {"spec": {"limits": [{"window": "1h", "tokens": 1_000_000}]}})
        restored = eventually(
            lambda: (d := kube.get(DEPLOYMENTS, ns, "alice-agent"))["spec"]["replicas"] == 2
            and _ann(d).get("state") == "Ok" and d, 60, what="alice's Deployment restored")
        assert "previous-replicas" not in _ann(restored)
        eventually(lambda: _refusal(kube, ns, "alice-again", {OWNER: "alice"}) == "", 30,
                   what="alice's pods admitted again")
        assert kube.get(DEPLOYMENTS, ns, "bob-agent")["spec"]["replicas"] == 2
        with contextlib.suppress(EnforcementError):
            kube.request("DELETE", TOKENBUDGETS.path(ns, "allowance"))
