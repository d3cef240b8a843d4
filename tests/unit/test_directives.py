"""The directive service: who may read which directive, long-poll, and the Governor using it.

Covers :mod:`token_budget.webhooks.directives` served by a real aiohttp server on
a loopback port (plain HTTP; TLS is the webhook server's, tested with it), a
TokenReview answered by a fake: no token or an invalid one gets 401, another
namespace's or another ServiceAccount's or another bound pod's 403; a long-poll
returns within a moment of the change and not for a change that leaves the
directive as it was; TokenReviews are cached and shared by concurrent requests.
:class:`token_budget.agent.Governor` prefers the service, falls back to the file
when it stops answering, and goes back to it. The mutating webhook injects the
URL's variables once.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from token_budget import agent
from token_budget.webhooks import admission, directives

A = "tokenbudget.io/"
NS = "team-a"
TOKENS = {  # token -> the TokenReview status the fake API server gives
    "agent-token": {"authenticated": True,
                    "user": {"username": f"system:serviceaccount:{NS}:agent"}},
    "bound-token": {"authenticated": True, "user": {
        "username": f"system:serviceaccount:{NS}:agent",
        "extra": {"authentication.kubernetes.io/pod-name": ["other-pod"]}}},
    "other-sa-token": {"authenticated": True,
                       "user": {"username": f"system:serviceaccount:{NS}:builder"}},
    "other-ns-token": {"authenticated": True,
                       "user": {"username": "system:serviceaccount:team-b:agent"}},
    "person-token": {"authenticated": True, "user": {"username": "alice"}},
}


def pod(name: str = "agent-1", state: str | None = None, rv: str = "1",
        **extra: str) -> dict[str, Any]:
    ann = {f"{A}state": state, f"{A}budget": f"TokenBudget/{NS}/team",
           f"{A}reason": "OverBudget", **extra} if state else {}
    return {"kind": "Pod", "metadata": {"namespace": NS, "name": name, "uid": "u-1",
                                        "resourceVersion": rv, "annotations": ann},
            "spec": {"serviceAccountName": "agent"}}


class FakeReviews:
    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, token: str) -> Mapping[str, Any]:
        self.calls += 1
        await asyncio.sleep(0.01)
        return TOKENS.get(token, {"authenticated": False})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def serving(store: directives.DirectiveStore, reviews: FakeReviews
                  ) -> AsyncIterator[str]:
    store.bind(asyncio.get_running_loop())
    app = web.Application()
    directives.Service(store, directives.Authenticator(reviews)).add_routes(app)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        store.close()  # as the webhook server does: no shutdown waits for a long-poll
        await runner.cleanup()


def url(base: str, name: str = "agent-1", ns: str = NS) -> str:
    return base + directives.PATH.format(namespace=ns, name=name)


async def get(session: aiohttp.ClientSession, target: str, token: str | None = "agent-token",
              **query: str) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.get(target, headers=headers, params=query) as resp:
        body = await resp.json() if resp.status == 200 else {}
        return resp.status, body


@pytest.mark.parametrize(("token", "name", "ns", "status"), [
    pytest.param(None, "agent-1", NS, 401, id="no token gets nothing"),
    pytest.param("forged", "agent-1", NS, 401, id="a token the API server refuses gets 401"),
    pytest.param("person-token", "agent-1", NS, 401, id="a person's token is no agent's"),
    pytest.param("other-ns-token", "agent-1", NS, 403, id="another namespace's agent gets 403"),
    pytest.param("other-sa-token", "agent-1", NS, 403,
                 id="another ServiceAccount of the namespace gets 403"),
    pytest.param("bound-token", "agent-1", NS, 403,
                 id="a token bound to another pod gets 403"),
    pytest.param("other-ns-token", "ghost", NS, 403,
                 id="another namespace does not learn which pods exist"),
    pytest.param("agent-token", "ghost", NS, 404, id="the namespace's own agent learns of none"),
    pytest.param("agent-token", "agent-1", NS, 200, id="the pod's own ServiceAccount reads it"),
])
def test_who_may_read_a_directive(token: str | None, name: str, ns: str, status: int) -> None:
    store = directives.DirectiveStore()
    store.pod_event(pod(state="Blocked"), deleted=False)

    async def ask() -> tuple[int, dict[str, Any]]:
        async with serving(store, FakeReviews()) as base, aiohttp.ClientSession() as session:
            return await get(session, url(base, name, ns), token)

    got, body = asyncio.run(ask())
    assert got == status
    if status == 200:
        assert body["annotations"][f"{A}state"] == "Blocked"
        assert body["version"] == directives.version_of(body["annotations"])


def test_a_long_poll_returns_on_a_change_of_directive_and_not_on_other_pod_updates() -> None:
    store = directives.DirectiveStore()
    store.pod_event(pod(state="Throttled"), deleted=False)
    version = store.get(NS, "agent-1").version  # type: ignore[union-attr]

    async def scenario() -> None:
        reviews = FakeReviews()
        async with serving(store, reviews) as base, aiohttp.ClientSession() as session:
            # A pod update that leaves the directive (a status change, a new updated-at).
            threading.Timer(0.2, store.pod_event,
                            [pod(state="Throttled", rv="2",
                                 **{f"{A}updated-at": "2026-12-01T00:00:00Z"})],
                            {"deleted": False}).start()
            started = time.monotonic()
            status, body = await get(session, url(base), version=version, waitSeconds="1")
            assert (status, body["version"]) == (200, version)
            assert time.monotonic() - started >= 0.9, "woken by an update that changed nothing"

            changed_at: list[float] = []

            def block() -> None:
                changed_at.append(time.monotonic())
                store.pod_event(pod(state="Blocked", rv="3"), deleted=False)

            threading.Timer(0.3, block).start()
            status, body = await get(session, url(base), version=version, waitSeconds="20")
            took = time.monotonic() - changed_at[0]
            assert status == 200 and body["annotations"][f"{A}state"] == "Blocked"
            assert took < 0.2, f"the change reached the waiting request after {took:.3f} s"
            assert reviews.calls == 1, "the token was reviewed again"

    asyncio.run(scenario())


def test_concurrent_requests_with_one_token_send_one_token_review() -> None:
    store = directives.DirectiveStore()
    store.pod_event(pod(state="Blocked"), deleted=False)

    async def scenario() -> None:
        reviews = FakeReviews()
        async with serving(store, reviews) as base, aiohttp.ClientSession() as session:
            got = await asyncio.gather(*(get(session, url(base)) for _ in range(20)))
            assert {s for s, _ in got} == {200}
            assert reviews.calls == 1

    asyncio.run(scenario())


def test_a_refused_token_is_asked_about_again_after_a_few_seconds() -> None:
    now = [0.0]
    reviews = FakeReviews()
    auth = directives.Authenticator(reviews, cache_seconds=60, clock=lambda: now[0])

    async def scenario() -> None:
        assert await auth.identify("forged") is None
        assert await auth.identify("agent-token") is not None
        now[0] += directives.DENIED_CACHE_SECONDS + 1
        assert await auth.identify("forged") is None
        assert await auth.identify("agent-token") is not None
        assert reviews.calls == 3  # the accepted token still cached, the refused one not

    asyncio.run(scenario())


@pytest.fixture
def service_in_thread() -> Iterator[tuple[str, directives.DirectiveStore,
                                          Callable[[], None]]]:
    """The service in its own loop and thread, as the operator runs it beside an agent."""
    store = directives.DirectiveStore()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop = asyncio.Event()
    found: list[str] = []

    async def main() -> None:
        async with serving(store, FakeReviews()) as base:
            found.append(base)
            ready.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    stopped = False

    def shut() -> None:
        nonlocal stopped
        if not stopped:
            stopped = True
            loop.call_soon_threadsafe(stop.set)
            thread.join(10)
            loop.close()

    yield found[0], store, shut
    shut()


def test_the_governor_prefers_the_service_falls_back_to_the_file_and_sees_a_block_at_once(
        service_in_thread: tuple[str, directives.DirectiveStore, Callable[[], None]],
        tmp_path: Path) -> None:
    base, store, shut = service_in_thread
    store.pod_event(pod(state="Rerouted", **{f"{A}use-model": "gpt-4o-mini"}), deleted=False)
    token = tmp_path / "token"
    token.write_text("agent-token\n")
    file = tmp_path / "annotations"
    file.write_text(f'{A}state="Ok"\n')
    seen: list[tuple[float, str]] = []
    gov = agent.Governor(str(file), default_model="gpt-4o", url=url(base), ca="",
                         token_file=str(token), wait_seconds=5,
                         on_change=lambda d: seen.append((time.monotonic(), d.state)))
    try:
        assert gov.served
        assert gov.model() == "gpt-4o-mini"  # the service's Reroute, not the file's Ok
        written = time.monotonic()
        store.pod_event(pod(state="Blocked", rv="2"), deleted=False)
        deadline = time.monotonic() + 2
        while not gov.directive().blocked and time.monotonic() < deadline:
            time.sleep(0.005)
        with pytest.raises(agent.Blocked):
            gov.model()
        assert seen[-1][1] == "Blocked" and seen[-1][0] - written < 0.5
        shut()  # the service goes away: the file decides again
        deadline = time.monotonic() + 5
        while gov.served and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not gov.served
        assert gov.model() == "gpt-4o"
    finally:
        gov.close()


def test_without_a_url_or_service_the_governor_reads_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(agent.URL_ENV, raising=False)
    file = tmp_path / "annotations"
    file.write_text(f'{A}state="Blocked"\n{A}budget="b"\n')
    assert not agent.Governor(str(file)).served
    monkeypatch.setenv(agent.URL_ENV, f"http://127.0.0.1:{_free_port()}/nothing")
    gov = agent.Governor(str(file), token_file=str(file))
    try:
        assert not gov.served and gov.directive().blocked
    finally:
        gov.close()


def test_the_mutating_webhook_injects_the_services_variables_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    cache = admission.AdmissionCache(directive_url="https://svc.ns.svc:443",
                                     directive_ca="PEM")
    monkeypatch.setattr(admission, "cache", cache)
    body = {"kind": "Pod", "metadata": {"namespace": NS, "labels": {f"{A}agent": "true"}},
            "spec": {"containers": [{"name": "a", "image": "x",
                                     "env": [{"name": "LLM_MODEL", "value": "gpt-4o"}]},
                                    {"name": "b", "image": "y"}]}}
    m = admission._mutation(body)
    assert m.containers is not None
    for c in m.containers:
        env = {e["name"]: e for e in c["env"]}
        assert env[directives.URL_ENV]["value"] == (
            "https://svc.ns.svc:443/v1/namespaces/$(TOKENBUDGET_POD_NAMESPACE)"
            "/pods/$(TOKENBUDGET_POD_NAME)/directive")
        assert env[directives.POD_NAME_ENV]["valueFrom"]["fieldRef"]["fieldPath"] == \
            "metadata.name"
        assert env[directives.CA_ENV]["value"] == "PEM"
        # $(VAR) expands only variables defined before it in the list.
        names = [e["name"] for e in c["env"]]
        assert names.index(directives.URL_ENV) > names.index(directives.POD_NAME_ENV)
    assert m.containers[0]["env"][0] == {"name": "LLM_MODEL", "value": "gpt-4o"}
    assert admission._mutation({**body, "spec": {"containers": m.containers}}).containers \
        is None


def test_a_fresh_list_forgets_the_pods_it_no_longer_holds() -> None:
    store = directives.DirectiveStore()
    store.pod_event(pod("a", state="Blocked"), deleted=False)
    store.pod_event({**pod("b"), "metadata": {**pod("b")["metadata"], "namespace": "other"}},
                    deleted=False)
    store.replace(NS, [pod("c")])
    assert store.get(NS, "a") is None and store.get(NS, "c") is not None
    assert store.get("other", "b") is not None  # another namespace's list says nothing of it
    store.pod_event(pod("c"), deleted=True)
    assert store.get(NS, "c") is None


def test_closing_answers_every_waiting_request_at_once() -> None:
    store = directives.DirectiveStore()
    store.pod_event(pod(state="Blocked"), deleted=False)
    version = store.get(NS, "agent-1").version  # type: ignore[union-attr]

    async def scenario() -> None:
        store.bind(asyncio.get_running_loop())
        waiting = asyncio.create_task(store.wait(NS, "agent-1", version, 30))
        await asyncio.sleep(0.05)
        assert store.waiting() == 1
        started = time.monotonic()
        store.close()
        assert (await waiting) is not None and time.monotonic() - started < 0.5
        assert await store.wait(NS, "agent-1", version, 30) is not None  # no more waiting

    asyncio.run(scenario())
