"""The admission server in its own process, fed by the operator over a pipe (no cluster).

Covers:
- a snapshot taken by the Feed and loaded on the other side reproduces the cache and
  the directive store; the changes after it arrive in order, none twice;
- a feed without a child (or whose child died) still keeps the operator's copies;
- the real child process (started by the Supervisor as in production): its first
  answer already knows what the operator knew before it started; a change fed
  afterwards changes its next answer; killed, it is started again, answers again
  within seconds and still knows everything (a new snapshot); it exits when the
  operator's end of the pipe closes, and when the operator stops it; stopped (alive,
  not reading), it is killed and replaced once a send times out, and the operator's
  feed never blocks longer than that.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime as dt
import http.client
import json
import os
import signal
import socket
import ssl
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
from builders import CATALOG_BODY

from harness.controlplane import free_ports
from token_budget.webhooks import admission, certificates, directives, process

NS = "team-search"
A = "tokenbudget.io/"


def budget(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "tokenbudget.io/v1alpha1", "kind": "TokenBudget",
            "metadata": {"name": "search", "namespace": NS, "generation": 1},
            "spec": {"limits": [{"window": "24h", "tokens": 1000}], **spec}}


def agent_pod(model: str, name: str = "agent-0") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}",
                         "labels": {A + "agent": "true"},
                         "annotations": {A + "state": "Ok"}},
            "spec": {"containers": [{"name": "a", "image": "agent:1",
                                     "env": [{"name": "LLM_MODEL", "value": model}]}]}}


def review(obj: dict[str, Any]) -> bytes:
    gvr = {"group": "", "version": "v1", "resource": "pods"}
    return json.dumps({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "uid-1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                    "resource": gvr, "operation": "CREATE", "userInfo": {"username": "a"},
                    "namespace": NS, "object": obj, "oldObject": None}}).encode()


def test_a_snapshot_and_the_changes_after_it_rebuild_the_same_state() -> None:
    cache, store = admission.AdmissionCache(), directives.DirectiveStore()
    feed = process.Feed(cache, store)
    feed.budget_event(copy.deepcopy(CATALOG_BODY), deleted=False)
    feed.namespace(NS, {"environment": "production"})
    feed.pods(NS, [agent_pod("medium")])
    ours, theirs = socket.socketpair()
    with Connection(ours.detach()) as parent, Connection(theirs.detach()) as child:
        feed.attach(parent)
        feed.budget_event(budget(deniedModels=["large"]), deleted=False)
        feed.workload_event({"kind": "Deployment", "metadata": {
            "name": "agent", "namespace": NS, "annotations": {A + "state": "Rerouted"}}},
            deleted=False)
        feed.namespace("gone", {"a": "b"})
        feed.namespace("gone", None)
        feed.pod_event(agent_pod("medium", "agent-1"), deleted=False)
        copy_cache, copy_store = admission.AdmissionCache(), directives.DirectiveStore()
        kind, taken = child.recv()
        assert kind == "snapshot"
        process.load(copy_cache, copy_store, taken)
        assert set(copy_cache.budgets) == set()  # the snapshot came before the budget
        for _ in range(5):
            kind, args = child.recv()
            process.CHANGES[kind](copy_cache, copy_store, args)
        assert not child.poll(0.1)  # nothing more, nothing twice
    assert copy_cache.budgets.keys() == cache.budgets.keys()
    assert copy_cache.catalog().models.keys() == cache.catalog().models.keys()
    assert copy_cache.namespaces == cache.namespaces == {NS: {"environment": "production"}}
    assert copy_cache.owners == cache.owners
    assert sorted(e.name for e in copy_store.entries()) == ["agent-0", "agent-1"]
    assert sorted(copy_store.entries(), key=str) == sorted(store.entries(), key=str)
    assert feed.sent == 6


def test_a_feed_whose_child_is_gone_keeps_the_operators_copies() -> None:
    cache, store = admission.AdmissionCache(), directives.DirectiveStore()
    feed = process.Feed(cache, store)
    ours, theirs = socket.socketpair()
    parent = Connection(ours.detach())
    feed.attach(parent)
    theirs.close()
    feed.budget_event(budget(), deleted=False)  # the send fails: detached, not raised
    feed.budget_event(budget(deniedModels=["x"]), deleted=False)
    assert len(cache.budgets) == 1
    parent.close()


def _post(port: int, ca: bytes, body: bytes) -> dict[str, Any]:
    ctx = ssl.create_default_context(cadata=ca.decode())
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=5)
    try:
        conn.request("POST", "/mutate-pods", body=body,
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        return dict(json.loads(resp.read())["response"])
    finally:
        conn.close()


async def _answer(port: int, ca: bytes, model: str, within: float = 15.0) -> dict[str, Any]:
    """The first answer the admission process gives within ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await asyncio.to_thread(_post, port, ca, review(agent_pod(model)))
        except (OSError, http.client.HTTPException):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):  # a zombie is not alive
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return True


@pytest.mark.timeout(90)
def test_the_admission_process_answers_follows_the_feed_and_comes_back_when_killed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(process, "RESTART_MIN_SECONDS", 0.2)
    monkeypatch.setattr(process, "SEND_TIMEOUT_SECONDS", 1)
    bundle = certificates.issue(["127.0.0.1"], dt.datetime.now(dt.UTC))
    (tmp_path / "tls.crt").write_bytes(bundle.tls_crt)
    (tmp_path / "tls.key").write_bytes(bundle.tls_key)
    [port] = free_ports(1)
    cache, store = admission.AdmissionCache(), directives.DirectiveStore()
    feed = process.Feed(cache, store)
    feed.budget_event(copy.deepcopy(CATALOG_BODY), deleted=False)
    feed.budget_event(budget(deniedModels=["large"]), deleted=False)  # before it starts
    config = process.Config(host="127.0.0.1", port=port, certfile=str(tmp_path / "tls.crt"),
                            keyfile=str(tmp_path / "tls.key"), check_seconds=60)
    supervisor = process.Supervisor(config, feed)

    async def scenario() -> None:
        task = asyncio.create_task(supervisor.run())
        try:
            refused = await _answer(port, bundle.ca_crt, "large")
            assert refused["allowed"] is False
            assert "model large is not allowed by TokenBudget team-search/search" in \
                refused["status"]["message"]
            assert (await _answer(port, bundle.ca_crt, "medium"))["allowed"] is True
            # A change after the start reaches it through the pipe.
            feed.budget_event(budget(deniedModels=["medium"]), deleted=False)
            for _ in range(50):
                if not (await _answer(port, bundle.ca_crt, "medium"))["allowed"]:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the admission process never saw the new budget")
            first = supervisor.pid
            assert first is not None
            os.kill(first, signal.SIGKILL)
            killed = time.monotonic()
            while supervisor.pid in (None, first):
                await asyncio.sleep(0.05)
            again = await _answer(port, bundle.ca_crt, "medium")
            took = time.monotonic() - killed
            assert again["allowed"] is False, "the new process must know the budget too"
            assert took < 10, f"answered again only after {took:.1f} s"
            assert supervisor.starts == 2
            # The operator's end of the pipe closes (as when the operator dies): it exits,
            # it never serves a cache nobody feeds.
            second = supervisor.pid
            assert second is not None and feed._conn is not None
            feed._conn.close()
            while supervisor.pid in (None, second):
                await asyncio.sleep(0.05)
            assert not _alive(second)
            assert (await _answer(port, bundle.ca_crt, "medium"))["allowed"] is False
            # Alive but no longer reading (stopped): the feed gives up after its send
            # timeout instead of blocking the operator, and the child is replaced.
            third = supervisor.pid
            assert third is not None
            os.kill(third, signal.SIGSTOP)
            pods = [agent_pod("medium", f"agent-{i}") for i in range(200)]
            started = time.monotonic()
            while supervisor.pid in (None, third):
                await asyncio.to_thread(feed.pods, NS, pods)  # each returns within the timeout
                assert time.monotonic() - started < 15, "the feed blocked on a stopped child"
            assert not _alive(third)
            assert (await _answer(port, bundle.ca_crt, "medium"))["allowed"] is False
            assert supervisor.starts == 4
            second = supervisor.pid
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert second is not None and not _alive(second)  # stopped with the operator

    asyncio.run(scenario())
