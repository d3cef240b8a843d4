"""The directive service's IP index: which governed pod holds a caller's IP.

Covers :class:`token_budget.webhooks.directives.DirectiveStore`'s IP -> pod
index fed by watch events and fresh lists (an IP freed when its pod goes,
finishes or changes IP, then held by the next pod; two live pods on one IP
resolve to nobody; a pod without an IP is in no index; IPv6 and IPv4-mapped
spellings meet), its long-poll (an IP that moves to another pod answers at
once, an unrelated update does not), and ``GET /v1/callers/{ip}/directive`` over
real HTTP: directive readers only, 404 for nobody, 409 naming the pods that
share an IP, 400 for what is not an IP.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from token_budget.webhooks import directives

A = "tokenbudget.io/"
NS = "team-a"
REVIEWS = {
    "reader": {"authenticated": True,
               "user": {"username": "system:serviceaccount:gateway:litellm"}},
    "agent": {"authenticated": True,
              "user": {"username": f"system:serviceaccount:{NS}:agent"}},
}


def pod(name: str, ip: str | None = None, *, ips: tuple[str, ...] = (),
        phase: str = "Running", uid: str | None = None, state: str | None = None
        ) -> dict[str, Any]:
    ann = {f"{A}state": state, f"{A}budget": f"TokenBudget/{NS}/team",
           f"{A}reason": "OverBudget"} if state else {}
    status: dict[str, Any] = {"phase": phase}
    if ip is not None:
        status["podIP"] = ip
    if ips:
        status["podIPs"] = [{"ip": i} for i in ips]
    return {"kind": "Pod", "metadata": {"namespace": NS, "name": name, "uid": uid or name,
                                        "annotations": ann},
            "spec": {"serviceAccountName": "agent"}, "status": status}


def holders(store: directives.DirectiveStore, ip: str) -> list[str]:
    return [e.name for e in store.resolve(ip).holders]


def test_an_ip_follows_its_pod_and_is_freed_when_the_pod_goes() -> None:
    store = directives.DirectiveStore()
    store.pod_event(pod("a", "10.0.0.7"), deleted=False)
    assert store.resolve("10.0.0.7").owner is not None
    assert holders(store, "10.0.0.7") == ["a"]
    store.pod_event(pod("a", "10.0.0.7"), deleted=True)
    assert holders(store, "10.0.0.7") == []
    # The network hands the IP to the next pod: it is that pod's now.
    store.pod_event(pod("b", "10.0.0.7"), deleted=False)
    assert holders(store, "10.0.0.7") == ["b"]


def test_a_pod_that_finished_or_changed_ip_lets_the_old_one_go() -> None:
    store = directives.DirectiveStore()
    store.pod_event(pod("a", "10.0.0.7"), deleted=False)
    store.pod_event(pod("a", "10.0.0.8"), deleted=False)
    assert holders(store, "10.0.0.7") == [] and holders(store, "10.0.0.8") == ["a"]
    store.pod_event(pod("a", "10.0.0.8", phase="Succeeded"), deleted=False)
    assert holders(store, "10.0.0.8") == []
    assert store.get(NS, "a") is not None  # still served by name: its directive is its own


def test_an_ip_reused_before_the_old_pods_deletion_is_seen_resolves_to_nobody() -> None:
    store = directives.DirectiveStore()
    store.pod_event(pod("a", "10.0.0.7"), deleted=False)
    store.pod_event(pod("b", "10.0.0.7"), deleted=False)  # hostNetwork, or a late event
    found = store.resolve("10.0.0.7")
    assert found.owner is None and holders(store, "10.0.0.7") == ["a", "b"]
    assert found.body() == {"ip": "10.0.0.7", "pods": [{"namespace": NS, "pod": "a"},
                                                       {"namespace": NS, "pod": "b"}]}
    store.pod_event(pod("a", "10.0.0.7"), deleted=True)
    assert store.resolve("10.0.0.7").owner is not None


def test_a_pod_without_an_ip_is_in_no_index() -> None:
    store = directives.DirectiveStore()
    store.pod_event(pod("pending"), deleted=False)
    store.pod_event(pod("odd", "not-an-ip"), deleted=False)
    assert store.get(NS, "pending") is not None
    assert not store._ips  # noqa: SLF001 - nothing indexed at all


def test_ipv6_and_ipv4_mapped_spellings_meet() -> None:
    store = directives.DirectiveStore()
    store.pod_event(pod("dual", "10.0.0.9", ips=("10.0.0.9", "fd00:0:0:0::9")), deleted=False)
    assert directives.normal_ip("fd00::9") == "fd00::9"
    assert holders(store, directives.normal_ip("FD00:0::9") or "") == ["dual"]
    assert holders(store, directives.normal_ip("::ffff:10.0.0.9") or "") == ["dual"]
    assert directives.normal_ip("10.0.0.9/32") is None


def test_a_fresh_list_frees_the_ips_of_pods_it_no_longer_holds() -> None:
    store = directives.DirectiveStore()
    store.pod_event(pod("a", "10.0.0.1"), deleted=False)
    store.pod_event(pod("b", "10.0.0.2"), deleted=False)
    store.replace(NS, [pod("b", "10.0.0.3")])
    assert holders(store, "10.0.0.1") == [] and holders(store, "10.0.0.2") == []
    assert holders(store, "10.0.0.3") == ["b"]


def test_the_version_of_an_ip_changes_when_it_moves_even_to_the_same_directive() -> None:
    store = directives.DirectiveStore()
    store.pod_event(pod("a", "10.0.0.7", state="Blocked"), deleted=False)
    first = store.resolve("10.0.0.7").version
    store.pod_event(pod("a", "10.0.0.7"), deleted=True)
    store.pod_event(pod("b", "10.0.0.7", state="Blocked"), deleted=False)
    assert first is not None and store.resolve("10.0.0.7").version not in (first, None)


def test_a_long_poll_on_an_ip_answers_when_it_moves_and_not_for_other_updates() -> None:
    store = directives.DirectiveStore()
    store.pod_event(pod("a", "10.0.0.7"), deleted=False)
    store.pod_event(pod("c", "10.0.0.8"), deleted=False)
    version = store.resolve("10.0.0.7").version

    async def scenario() -> None:
        store.bind(asyncio.get_running_loop())
        # Another pod's directive changes: the waiter on 10.0.0.7 keeps waiting.
        threading.Timer(0.1, store.pod_event, (pod("c", "10.0.0.8", state="Blocked"),),
                        {"deleted": False}).start()
        started = time.monotonic()
        found = await store.wait_ip("10.0.0.7", version, 0.4)
        assert time.monotonic() - started >= 0.35 and found.version == version

        def move() -> None:
            store.pod_event(pod("a", "10.0.0.7"), deleted=True)
            store.pod_event(pod("b", "10.0.0.7"), deleted=False)
        threading.Timer(0.1, move).start()
        started = time.monotonic()
        found = await store.wait_ip("10.0.0.7", version, 10)
        assert time.monotonic() - started < 2
        # The deletion alone may wake it first (nobody holds the IP); ask again if so.
        if found.owner is None:
            found = await store.wait_ip("10.0.0.7", found.version, 10)
        assert found.owner is not None and found.owner.name == "b"

    asyncio.run(scenario())


@pytest.mark.parametrize(("token", "ip", "status"), [
    pytest.param("reader", "10.0.0.7", 200, id="a reader resolves an IP"),
    pytest.param("reader", "::ffff:10.0.0.7", 200, id="in any spelling"),
    pytest.param("agent", "10.0.0.7", 403, id="a pod token may not resolve IPs"),
    pytest.param("agent", "10.0.0.8", 403, id="not even its own"),
    pytest.param(None, "10.0.0.7", 401, id="no token gets nothing"),
    pytest.param("reader", "10.0.0.99", 404, id="an IP no governed pod holds is a 404"),
    pytest.param("reader", "10.0.0.5", 409, id="a shared IP is a 409 naming its pods"),
    pytest.param("reader", "ten", 400, id="not an IP is a 400"),
])
def test_who_may_resolve_a_caller_and_what_they_learn(token: str | None, ip: str,
                                                      status: int) -> None:
    store = directives.DirectiveStore()
    store.pod_event(pod("a", "10.0.0.7", state="Blocked"), deleted=False)
    store.pod_event(pod("self", "10.0.0.8"), deleted=False)
    store.pod_event(pod("h1", "10.0.0.5"), deleted=False)
    store.pod_event(pod("h2", "10.0.0.5"), deleted=False)

    async def ask() -> tuple[int, dict[str, Any]]:
        async def review(t: str) -> dict[str, Any]:
            return REVIEWS.get(t, {"authenticated": False})

        store.bind(asyncio.get_running_loop())
        app = web.Application()
        directives.Service(store, directives.Authenticator(review),
                           readers=frozenset({"gateway:litellm"})).add_routes(app)
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        url = f"http://127.0.0.1:{port}" + directives.CALLER_PATH.format(ip=ip)
        try:
            async with aiohttp.ClientSession() as session, session.get(
                    url, headers={"Authorization": f"Bearer {token}"} if token else {},
                    params={"waitSeconds": "0"}) as resp:
                ok = resp.status in (200, 409)
                return resp.status, await resp.json() if ok else {}
        finally:
            store.close()
            await runner.cleanup()

    got, body = asyncio.run(ask())
    assert got == status
    if status == 200:
        assert (body["namespace"], body["pod"], body["ip"]) == (NS, "a", "10.0.0.7")
        assert body["annotations"][f"{A}state"] == "Blocked"
        assert body["version"] == store.resolve("10.0.0.7").version
    if status == 409:
        assert [p["pod"] for p in body["pods"]] == ["h1", "h2"]
