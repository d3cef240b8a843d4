"""Directives enforced at a gateway: :mod:`token_budget.gateway` against the real service.

Covers: the per-request decision (Blocked and a throttled caller in debt get 429, a
model outside ``allowed-models`` 403, Reroute rewrites the model); the Enforcer asks
the directive service (served by aiohttp on a loopback port, TokenReviews faked) as a
reader ServiceAccount, at most once a second per pod, lets an ungoverned or unnamed
caller through, settles the tokens a call used, and fails open (or closed when told)
when the operator does not answer. A reader's token reads every pod's directive; a
token of the reader bound to a pod does not.

The identity modes: ``pod-ip`` judges the pod holding the request's address
whatever the metadata claims; ``checked`` refuses (403, naming both, counted) a
claim the address does not prove, and lets a claim among a shared address's pods
stand; an address that moves to another pod follows it within the cache's
second; both fail open; the address is read from the metadata dict the LiteLLM
proxy wrote, never the caller's.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from token_budget import gateway
from token_budget.agent import Directive, TokenBucket
from token_budget.webhooks import directives

A = "tokenbudget.io/"
NS = "team-a"
READER = {"authenticated": True,
          "user": {"username": "system:serviceaccount:gateway:litellm"}}
BOUND_READER = {"authenticated": True, "user": {
    "username": "system:serviceaccount:gateway:litellm",
    "extra": {"authentication.kubernetes.io/pod-name": ["litellm-0"]}}}


def pod(name: str, **ann: str) -> dict[str, Any]:
    return {"kind": "Pod", "metadata": {"namespace": NS, "name": name, "uid": name,
                                        "annotations": {A + k.replace("_", "-"): v
                                                        for k, v in ann.items()}},
            "spec": {"serviceAccountName": "agent"}}


@pytest.mark.parametrize(("directive", "model", "outcome"), [
    pytest.param(Directive(), "gpt-4o", "gpt-4o", id="no directive: the model asked for"),
    pytest.param(Directive("Rerouted", "b", "r", use_model="gpt-4o-mini"), "gpt-4o",
                 "gpt-4o-mini", id="Reroute rewrites the model"),
    pytest.param(Directive("Blocked", "TokenBudget/a/b", "LimitReached"), "gpt-4o",
                 (429, "blocked by TokenBudget/a/b: LimitReached"), id="Blocked is a 429"),
    pytest.param(Directive("Warning", "b", "r", allowed_models=frozenset({"gpt-4o-mini"})),
                 "gpt-4o", (403, "gpt-4o is not allowed"), id="a model not allowed is a 403"),
    pytest.param(Directive("Rerouted", "b", "r", use_model="gpt-4o-mini",
                           allowed_models=frozenset({"gpt-4o-mini"})), "gpt-4o",
                 "gpt-4o-mini", id="the reroute target is judged, not the model asked for"),
])
def test_one_request_under_a_directive(directive: Directive, model: str,
                                       outcome: str | tuple[int, str]) -> None:
    if isinstance(outcome, str):
        assert gateway.decide(directive, model, None) == outcome
        return
    with pytest.raises(gateway.Refusal) as refused:
        gateway.decide(directive, model, None)
    assert refused.value.status == outcome[0] and outcome[1] in refused.value.message


def test_a_throttled_caller_waits_while_its_bucket_is_in_debt() -> None:
    now = [0.0]
    bucket = TokenBucket(600, clock=lambda: now[0])  # 10 tokens a second
    d = Directive("Throttled", "b", "r", tokens_per_minute=600)
    assert gateway.decide(d, "m", bucket) == "m"
    bucket.settle(700)  # the call used more than the minute's worth: 100 in debt
    with pytest.raises(gateway.Refusal) as refused:
        gateway.decide(d, "m", bucket)
    assert refused.value.status == 429 and refused.value.retry_after == pytest.approx(10)
    now[0] += 10.1
    assert gateway.decide(d, "m", bucket) == "m"


class Served:
    """The directive service on a loopback port, with a reader ServiceAccount."""

    def __init__(self) -> None:
        self.store = directives.DirectiveStore()
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        async def review(token: str) -> dict[str, Any]:
            return {"reader": READER, "bound-reader": BOUND_READER}.get(
                token, {"authenticated": False})

        self.store.bind(asyncio.get_running_loop())
        app = web.Application()
        directives.Service(self.store, directives.Authenticator(review),
                           readers=frozenset({"gateway:litellm"})).add_routes(app)
        self.runner = web.AppRunner(app, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        self.store.close()
        if self.runner is not None:
            await self.runner.cleanup()


def test_the_enforcer_asks_the_service_once_a_second_per_pod() -> None:
    now = [0.0]

    async def scenario() -> None:
        served = Served()
        await served.start()
        enforcer = gateway.Enforcer(served.url, lambda: "reader", clock=lambda: now[0])
        try:
            served.store.pod_event(pod("a", state="Rerouted", use_model="gpt-4o-mini"), False)
            meta = {"namespace": NS, "pod": "a"}
            assert await enforcer.admit(meta, "gpt-4o") == "gpt-4o-mini"
            served.store.pod_event(pod("a", state="Blocked", budget="b", reason="r"), False)
            assert await enforcer.admit(meta, "gpt-4o") == "gpt-4o-mini"  # cached
            now[0] += gateway.TTL_SECONDS
            with pytest.raises(gateway.Refusal) as refused:
                await enforcer.admit(meta, "gpt-4o")
            assert refused.value.status == 429
            assert enforcer.requests == 2
            # Not governed, or not named: passes as asked.
            assert await enforcer.admit({"namespace": NS, "pod": "ghost"}, "x") == "x"
            assert await enforcer.admit({}, "x") == "x"
            # Throttle: the call's tokens settle; the next waits.
            served.store.pod_event(pod("t", state="Throttled", budget="b", reason="r",
                                       tokens_per_minute="600"), False)
            meta_t = {"namespace": NS, "pod": "t"}
            assert await enforcer.admit(meta_t, "m") == "m"
            enforcer.spent(meta_t, 1_000)
            with pytest.raises(gateway.Refusal):
                await enforcer.admit(meta_t, "m")
        finally:
            await enforcer.close()
            await served.stop()

    asyncio.run(scenario())


def test_a_gateway_token_bound_to_a_pod_reads_no_other_pod() -> None:
    async def scenario() -> None:
        served = Served()
        await served.start()
        served.store.pod_event(pod("a", state="Blocked"), False)
        try:
            async with aiohttp.ClientSession() as session:
                url = served.url + directives.PATH.format(namespace=NS, name="a")
                for token, status in (("reader", 200), ("bound-reader", 403)):
                    async with session.get(url, headers={
                            "Authorization": f"Bearer {token}"}) as resp:
                        assert resp.status == status, token
        finally:
            await served.stop()

    asyncio.run(scenario())


@pytest.mark.parametrize("fail_closed", [False, True], ids=["fails open", "fails closed"])
def test_when_the_operator_does_not_answer(fail_closed: bool) -> None:
    async def scenario() -> None:
        served = Served()
        await served.start()
        url = served.url
        await served.stop()  # nothing listens there any more
        enforcer = gateway.Enforcer(url, lambda: "reader", fail_closed=fail_closed)
        try:
            meta = {"namespace": NS, "pod": "a"}
            if fail_closed:
                with pytest.raises(gateway.Refusal) as refused:
                    await enforcer.admit(meta, "gpt-4o")
                assert refused.value.status == 503
            else:
                assert await enforcer.admit(meta, "gpt-4o") == "gpt-4o"
        finally:
            await enforcer.close()

    asyncio.run(scenario())


def at(name: str, ip: str, **ann: str) -> dict[str, Any]:
    """A governed pod holding ``ip``."""
    body = pod(name, **ann)
    return {**body, "status": {"phase": "Running", "podIP": ip}}


def test_pod_ip_mode_judges_the_pod_holding_the_address_whatever_the_metadata_says() -> None:
    async def scenario() -> None:
        served = Served()
        await served.start()
        enforcer = gateway.Enforcer(served.url, lambda: "reader",
                                    identity=gateway.IdentityMode.POD_IP)
        try:
            served.store.pod_event(at("blocked", "10.0.0.1", state="Blocked", budget="b",
                                      reason="r"), False)
            served.store.pod_event(at("rerouted", "10.0.0.2", state="Rerouted",
                                      use_model="gpt-4o-mini"), False)
            # No metadata at all: the address says who it is.
            with pytest.raises(gateway.Refusal) as refused:
                await enforcer.admit(None, "gpt-4o", "10.0.0.1")
            assert refused.value.status == 429
            # Naming the rerouted pod from the blocked pod's address changes nothing...
            with pytest.raises(gateway.Refusal):
                await enforcer.admit({"namespace": NS, "pod": "rerouted"}, "gpt-4o",
                                     "10.0.0.1")
            # ...and the rerouted pod is rerouted, under its own name.
            admitted = await enforcer.judge({"namespace": NS, "pod": "blocked"}, "gpt-4o",
                                            "10.0.0.2")
            assert admitted == gateway.Admitted("gpt-4o-mini", gateway.Caller(NS, "rerouted"))
            # An address no governed pod holds, or none at all: passes as nobody.
            assert await enforcer.judge({"namespace": NS, "pod": "blocked"}, "gpt-4o",
                                        "10.0.0.9") == gateway.Admitted("gpt-4o", None)
            assert await enforcer.judge(None, "gpt-4o", None) == \
                gateway.Admitted("gpt-4o", None)
            assert enforcer.refused_claims == 0
        finally:
            await enforcer.close()
            await served.stop()

    asyncio.run(scenario())


def test_checked_mode_refuses_a_claim_the_address_does_not_prove() -> None:
    async def scenario() -> None:
        served = Served()
        await served.start()
        enforcer = gateway.Enforcer(served.url, lambda: "reader",
                                    identity=gateway.IdentityMode.CHECKED)
        s = served.store
        try:
            s.pod_event(at("blocked", "10.0.0.1", state="Blocked", budget="b", reason="r"),
                        False)
            s.pod_event(at("free", "10.0.0.2"), False)
            s.pod_event(at("host-a", "10.9.9.9", state="Rerouted", use_model="m-mini"), False)
            s.pod_event(at("host-b", "10.9.9.9"), False)
            blocked, free = {"namespace": NS, "pod": "blocked"}, {"namespace": NS, "pod": "free"}
            # The blocked pod names the free one: refused, both named, and counted.
            with pytest.raises(gateway.Refusal) as refused:
                await enforcer.admit(free, "gpt-4o", "10.0.0.1")
            assert refused.value.status == 403
            assert refused.value.message == (f"the request names {NS}/free but comes from "
                                             f"10.0.0.1, the IP of {NS}/blocked")
            # A true claim is judged as itself; no claim is judged as the address's pod.
            assert await enforcer.admit(free, "gpt-4o", "10.0.0.2") == "gpt-4o"
            with pytest.raises(gateway.Refusal) as refused:
                await enforcer.admit(blocked, "gpt-4o", "10.0.0.1")
            assert refused.value.status == 429
            with pytest.raises(gateway.Refusal) as refused:
                await enforcer.admit(None, "gpt-4o", "10.0.0.1")
            assert refused.value.status == 429
            # From an address no governed pod holds, any claim is unproven.
            with pytest.raises(gateway.Refusal) as refused:
                await enforcer.admit(free, "gpt-4o", "10.0.0.50")
            assert "10.0.0.50, which no governed pod holds" in refused.value.message
            # A shared address (hostNetwork): a claim among its pods stands, another not.
            assert await enforcer.admit({"namespace": NS, "pod": "host-a"}, "gpt-4o",
                                        "10.9.9.9") == "m-mini"
            with pytest.raises(gateway.Refusal) as refused:
                await enforcer.admit(free, "gpt-4o", "10.9.9.9")
            assert f"shared by {NS}/host-a, {NS}/host-b" in refused.value.message
            assert enforcer.refused_claims == 3
        finally:
            await enforcer.close()
            await served.stop()

    asyncio.run(scenario())


def test_an_address_that_moves_to_another_pod_follows_it_within_a_second() -> None:
    now = [0.0]

    async def scenario() -> None:
        served = Served()
        await served.start()
        enforcer = gateway.Enforcer(served.url, lambda: "reader", clock=lambda: now[0],
                                    identity=gateway.IdentityMode.POD_IP)
        try:
            served.store.pod_event(at("old", "10.0.0.1", state="Blocked"), False)
            with pytest.raises(gateway.Refusal):
                await enforcer.admit(None, "gpt-4o", "10.0.0.1")
            served.store.pod_event(at("old", "10.0.0.1"), True)
            served.store.pod_event(at("new", "10.0.0.1"), False)
            now[0] += gateway.TTL_SECONDS
            admitted = await enforcer.judge(None, "gpt-4o", "10.0.0.1")
            assert admitted == gateway.Admitted("gpt-4o", gateway.Caller(NS, "new"))
        finally:
            await enforcer.close()
            await served.stop()

    asyncio.run(scenario())


@pytest.mark.parametrize("mode", [gateway.IdentityMode.POD_IP, gateway.IdentityMode.CHECKED])
def test_the_ip_modes_fail_open_when_the_operator_does_not_answer(
        mode: gateway.IdentityMode) -> None:
    async def scenario() -> None:
        served = Served()
        await served.start()
        url = served.url
        await served.stop()
        enforcer = gateway.Enforcer(url, lambda: "reader", identity=mode)
        try:
            assert await enforcer.admit({"namespace": NS, "pod": "a"}, "m", "10.0.0.1") == "m"
        finally:
            await enforcer.close()

    asyncio.run(scenario())


def test_the_address_is_read_from_the_metadata_the_proxy_wrote_not_the_callers() -> None:
    route = {"user_api_key_request_route": "/v1/threads"}
    # On a litellm_metadata route the caller's "metadata" is its own to fill.
    data: dict[str, Any] = {
        "metadata": {"requester_ip_address": "10.0.0.1", "namespace": NS, "pod": "x"},
        "litellm_metadata": {**route, "requester_ip_address": "10.0.0.2",
                             "requester_metadata": {"namespace": NS, "pod": "x"}}}
    assert gateway.client_ip_of(data) == "10.0.0.2"
    gateway.stamp_request(data, gateway.Caller(NS, "real"))
    assert gateway.caller_of(data["metadata"]) == gateway.Caller(NS, "real")
    assert gateway.caller_of(data["litellm_metadata"]["requester_metadata"]) == \
        gateway.Caller(NS, "real")
    gateway.stamp_request(data, None)
    assert "pod" not in data["metadata"] and "pod" not in \
        data["litellm_metadata"]["requester_metadata"]
    # Nothing the proxy wrote: no address.
    assert gateway.client_ip_of({"metadata": {"requester_ip_address": "10.0.0.1"}}) is None


@pytest.mark.parametrize("mode", list(gateway.IdentityMode))
@pytest.mark.parametrize("forwarded", [True, False], ids=["believes XFF", "ignores XFF"])
def test_the_ip_modes_refuse_to_work_while_the_proxy_believes_x_forwarded_for(
        mode: gateway.IdentityMode, forwarded: bool) -> None:
    settings = {"use_x_forwarded_for": forwarded}
    if mode is gateway.IdentityMode.METADATA or not forwarded:
        gateway.check_forwarding(mode, settings)
        return
    with pytest.raises(gateway.Refusal) as refused:
        gateway.check_forwarding(mode, settings)
    assert refused.value.status == 500 and "use_x_forwarded_for" in refused.value.message


def test_in_pod_ip_mode_a_calls_tokens_settle_on_the_pod_the_address_belongs_to() -> None:
    """The callback stamps the judged pod into the request; the settling reads it back."""
    async def scenario() -> None:
        served = Served()
        await served.start()
        enforcer = gateway.Enforcer(served.url, lambda: "reader",
                                    identity=gateway.IdentityMode.POD_IP)
        try:
            served.store.pod_event(at("t", "10.0.0.3", state="Throttled", budget="b",
                                      reason="r", tokens_per_minute="600"), False)
            data: dict[str, Any] = {"metadata": {
                "user_api_key_request_route": "/chat/completions",
                "requester_ip_address": "10.0.0.3", "namespace": NS, "pod": "someone-else"}}
            admitted = await enforcer.judge(data["metadata"], "m", gateway.client_ip_of(data))
            gateway.stamp_request(data, admitted.caller)
            assert gateway.caller_of(data["metadata"]) == gateway.Caller(NS, "t")
            enforcer.spent(data["metadata"], 1_000)
            with pytest.raises(gateway.Refusal) as refused:
                await enforcer.admit(None, "m", "10.0.0.3")
            assert refused.value.status == 429
        finally:
            await enforcer.close()
            await served.stop()

    asyncio.run(scenario())
