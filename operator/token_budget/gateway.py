"""Directives enforced at an LLM gateway, per request: the logic, without the gateway.

A gateway (the LiteLLM proxy: :mod:`token_budget.litellm_callback`) learns a
request's caller in one of three ways (:class:`IdentityMode`):

* ``metadata`` (the default): the request's metadata names it (``namespace``
  and ``pod``, which the agent sends from the variables the operator's webhook
  injects). The agent asserts it: it can name another pod, or nobody.
* ``pod-ip``: the request's client IP, resolved by the operator to the governed
  pod holding it (``/v1/callers/{ip}/directive``); nothing to change in the
  agent, and what the metadata says is ignored (and overwritten, so LiteLLM's
  metrics are labelled with the pod the IP belongs to).
* ``checked``: the metadata's claim, checked against the IP: a request naming
  a pod that does not hold its client IP is refused with 403 (and counted);
  one naming nobody is judged as the IP's pod.

The IP modes hold only where the gateway sees the pod's own address: agents
calling the gateway's Service directly (kube-proxy keeps the source address of
ClusterIP traffic), no sidecar or egress proxy in between that connects in its
own name, and the gateway not told to believe ``X-Forwarded-For`` (a header
the caller writes).

Then it asks the operator's directive service for that pod's directive with
its own ServiceAccount token (one of ``--directive-readers``), and per request:

* ``Blocked``: refuses with 429 and the budget's reason;
* ``use-model`` (Reroute): rewrites the requested model;
* ``allowed-models``: refuses any other model with 403;
* ``tokens-per-minute`` (Throttle): refuses with 429 and ``Retry-After`` while
  the pod's token bucket is in debt; the tokens a call used are settled after it.

A directive is asked for at most once a second per pod (:data:`TTL_SECONDS`), so
a Block reaches the gateway within a second. The rate is shared across ``R``
gateway replicas by giving each ``1/R`` of the pod's rate (``replicas``), which
holds the pod to its rate when a load balancer spreads its requests evenly and
errs low otherwise.

A caller the request does not name (or whose IP no governed pod holds, or
several do), or a pod the operator does not govern (404), passes unchanged.
When the operator does not answer, requests pass (fail open) unless
``fail_closed``: a gateway outage must not follow an operator outage by default.

Only the standard library and aiohttp (which the LiteLLM proxy already has).
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import math
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp

from token_budget.agent import Directive, TokenBucket, directive_from

log = logging.getLogger(__name__)
TTL_SECONDS = 1.0
# Callers remembered at most (directives, locks); past it all are forgotten and asked again.
CACHE_SIZE = 65_536
PATH = "/v1/namespaces/{namespace}/pods/{name}/directive"
K = TypeVar("K", "Caller", str)
V = TypeVar("V")
CALLER_PATH = "/v1/callers/{ip}/directive"
# The metadata keys that name a caller.
NAMESPACE_KEY, POD_KEY = "namespace", "pod"


class IdentityMode(str, enum.Enum):
    """How the gateway learns who calls (``TOKENBUDGET_GATEWAY_IDENTITY``)."""

    METADATA = "metadata"
    POD_IP = "pod-ip"
    CHECKED = "checked"


@dataclass(frozen=True)
class Refusal(Exception):
    """The request must not reach the model: an HTTP status and why."""

    status: int
    message: str
    retry_after: float | None = None


@dataclass(frozen=True)
class Caller:
    namespace: str
    pod: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.pod}"


@dataclass(frozen=True)
class Resolved:
    """What the operator said of an IP: the pod holding it and its directive, or the
    several pods sharing it (then ``owner`` is None); ``known`` False: it did not say."""

    owner: Caller | None = None
    directive: Directive | None = None
    holders: tuple[Caller, ...] = ()
    known: bool = True

    def describe(self, ip: str) -> str:
        if self.owner is not None:
            return f"{ip}, the IP of {self.owner}"
        if self.holders:
            return f"{ip}, shared by {', '.join(map(str, self.holders))}"
        return f"{ip}, which no governed pod holds"


@dataclass(frozen=True)
class Admitted:
    """A request let through: the model it may call and whom it was judged as."""

    model: str
    caller: Caller | None


def caller_of(metadata: Mapping[str, Any] | None) -> Caller | None:
    """The caller a request's metadata names (``namespace`` and ``pod``), if both."""
    metadata = metadata or {}
    ns, pod = metadata.get("namespace"), metadata.get("pod")
    if isinstance(ns, str) and isinstance(pod, str) and ns and pod:
        return Caller(ns, pod)
    return None


def stamp(metadata: dict[str, Any], caller: Caller | None) -> None:
    """Name ``caller`` in ``metadata`` in place of whatever was claimed (None: nobody)."""
    if caller is None:
        metadata.pop(NAMESPACE_KEY, None)
        metadata.pop(POD_KEY, None)
    else:
        metadata[NAMESPACE_KEY], metadata[POD_KEY] = caller.namespace, caller.pod


def decide(d: Directive, model: str, bucket: TokenBucket | None) -> str:
    """The model to call under directive ``d``; raises :class:`Refusal`.

    Raises:
        Refusal: 429 when Blocked or while the rate's bucket is in debt, 403 for
            a model not among ``allowed-models``.
    """
    if d.blocked:
        raise Refusal(429, f"blocked by {d.budget}: {d.reason}")
    wanted = d.use_model or model
    if d.allowed_models is not None and wanted not in d.allowed_models:
        raise Refusal(403, f"{wanted} is not allowed by {d.budget}; allowed: "
                           f"{', '.join(sorted(d.allowed_models))}")
    if bucket is not None:
        wait = bucket.wait_time(0)  # takes nothing: the call's tokens are settled after it
        if wait > 0:
            raise Refusal(429, f"throttled by {d.budget}: {d.tokens_per_minute} tokens a "
                               "minute", retry_after=wait if math.isfinite(wait) else 60.0)
    return wanted


class Enforcer:
    """Directives by caller, cached a second, and a token bucket per caller.

    Args:
        base_url: the directive service, e.g. ``https://token-budget-operator.tokenbudget.svc``.
        token: returns the gateway's bearer token (read again each time: it rotates).
        ca_pem: the CA of the service's certificate; None: the system's.
        replicas: gateway replicas sharing each pod's rate.
        fail_closed: refuse (503) when the operator does not answer.
        identity: how callers are known (:class:`IdentityMode`).
        clock: time.monotonic; injected by tests.
    """

    def __init__(self, base_url: str, token: Callable[[], str], ca_pem: str | None = None,
                 replicas: int = 1, fail_closed: bool = False,
                 identity: IdentityMode = IdentityMode.METADATA,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.base_url = base_url.rstrip("/")
        self.identity = identity
        self.refused_claims = 0  # requests refused in ``checked`` mode (logged, and tests)
        self.token = token
        self.ssl: ssl.SSLContext | bool = ssl.create_default_context(cadata=ca_pem) \
            if ca_pem else True
        self.replicas = max(1, replicas)
        self.fail_closed = fail_closed
        self.clock = clock
        self.requests = 0  # asked of the operator (tests, cost figures)
        self._cache: dict[Caller, tuple[Directive | None, float]] = {}
        self._by_ip: dict[str, tuple[Resolved, float]] = {}
        self._buckets: dict[Caller, TokenBucket] = {}
        self._session: aiohttp.ClientSession | None = None
        # One fetch at a time per caller or IP (concurrent requests of one caller share
        # it); different callers' fetches run side by side.
        self._locks: dict[Caller | str, asyncio.Lock] = {}

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def directive(self, caller: Caller) -> Directive | None:
        """The caller's directive (None: not governed), at most :data:`TTL_SECONDS` old.

        Raises:
            Refusal: 503 when the operator does not answer and ``fail_closed``.
        """
        return await self._cached(self._cache, caller, self._fetch)

    async def resolve(self, ip: str) -> Resolved:
        """Who holds ``ip`` and their directive, at most :data:`TTL_SECONDS` old.

        Raises:
            Refusal: 503 when the operator does not answer and ``fail_closed``.
        """
        return await self._cached(self._by_ip, ip, self._fetch_ip)

    async def _cached(self, cache: dict[K, tuple[V, float]], key: K,
                      fetch: Callable[[K], Awaitable[V]]) -> V:
        """``cache[key]`` while fresh, else fetched once for all of the key's concurrent
        callers and kept :data:`TTL_SECONDS`; past :data:`CACHE_SIZE` keys all are forgotten."""
        hit = cache.get(key)
        if hit is not None and hit[1] > self.clock():
            return hit[0]
        if len(cache) >= CACHE_SIZE:
            cache.clear()
            self._locks.clear()
        async with self._locks.setdefault(key, asyncio.Lock()):
            hit = cache.get(key)
            if hit is not None and hit[1] > self.clock():
                return hit[0]
            found = await fetch(key)
            cache[key] = (found, self.clock() + TTL_SECONDS)
            return found

    async def _get(self, path: str, what: str) -> tuple[int, dict[str, Any]] | None:
        """Status and JSON body of one GET; None when the operator did not answer and the
        request may pass (fail open)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        self.requests += 1
        try:
            async with self._session.get(self.base_url + path, ssl=self.ssl, headers={
                    "Authorization": f"Bearer {self.token()}"}) as resp:
                if resp.status not in (200, 404, 409):
                    raise OSError(f"the directive service answered {resp.status}")
                return resp.status, json.loads(await resp.read() or b"{}") \
                    if resp.status != 404 else {}
        except (TimeoutError, OSError, aiohttp.ClientError, ValueError) as exc:
            if self.fail_closed:
                raise Refusal(503, f"the token budget operator cannot be asked: {exc}") from exc
            log.warning("%s unknown, request passes: %s", what, exc)
            return None

    async def _fetch(self, caller: Caller) -> Directive | None:
        got = await self._get(PATH.format(namespace=caller.namespace, name=caller.pod),
                              f"directive of {caller}")
        if got is None or got[0] != 200:
            return None
        return directive_from(got[1].get("annotations") or {})

    async def _fetch_ip(self, ip: str) -> Resolved:
        got = await self._get(CALLER_PATH.format(ip=ip), f"the pod holding {ip}")
        if got is None:
            return Resolved(known=False)
        status, doc = got
        if status == 200:
            return Resolved(Caller(str(doc["namespace"]), str(doc["pod"])),
                            directive_from(doc.get("annotations") or {}))
        return Resolved(holders=tuple(Caller(str(p["namespace"]), str(p["pod"]))
                                      for p in doc.get("pods") or ()))

    def _bucket(self, caller: Caller, d: Directive) -> TokenBucket | None:
        if d.tokens_per_minute is None:
            self._buckets.pop(caller, None)
            return None
        rate = max(1, d.tokens_per_minute // self.replicas)
        bucket = self._buckets.get(caller)
        if bucket is None:
            bucket = self._buckets[caller] = TokenBucket(rate, self.clock)
        elif bucket.per_minute != rate:
            bucket.set_rate(rate)
        return bucket

    async def admit(self, metadata: Mapping[str, Any] | None, model: str,
                    client_ip: str | None = None) -> str:
        """The model a request may call; raises :class:`Refusal`."""
        return (await self.judge(metadata, model, client_ip)).model

    async def judge(self, metadata: Mapping[str, Any] | None, model: str,
                    client_ip: str | None = None) -> Admitted:
        """The model a request may call and whom it was judged as.

        Args:
            metadata: the request's metadata (the caller's claim).
            model: the model asked for.
            client_ip: the address the request came from, as the gateway saw it
                (not a header); needed by the IP modes.

        Raises:
            Refusal: what :func:`decide` raises; 403 in ``checked`` mode when the
                claimed pod does not hold ``client_ip``; 503 when the operator does
                not answer and ``fail_closed``.
        """
        claim = caller_of(metadata)
        if self.identity is IdentityMode.METADATA:
            caller, d = claim, await self.directive(claim) if claim is not None else None
        else:
            caller, d = await self._by_address(claim, client_ip)
        if caller is None or d is None:
            return Admitted(model, caller)
        return Admitted(decide(d, model, self._bucket(caller, d)), caller)

    async def _by_address(self, claim: Caller | None, ip: str | None
                          ) -> tuple[Caller | None, Directive | None]:
        """The caller (and directive) an IP mode finds for a request from ``ip``."""
        found = await self.resolve(ip) if ip else Resolved()
        if not found.known:  # the operator did not answer (fail open): nobody to judge
            return None, None
        if self.identity is IdentityMode.POD_IP or claim is None:
            return found.owner, found.directive
        if found.owner == claim:
            return claim, found.directive
        if claim in found.holders:  # a shared IP (hostNetwork): the claim is one of them
            return claim, await self.directive(claim)
        self.refused_claims += 1
        where = found.describe(ip) if ip else "an unknown address"
        log.warning("refused: the request names %s but comes from %s", claim, where)
        raise Refusal(403, f"the request names {claim} but comes from {where}")

    def spent(self, metadata: Mapping[str, Any] | None, tokens: int) -> None:
        """Settle the tokens a call used against its caller's rate."""
        caller = caller_of(metadata)
        bucket = self._buckets.get(caller) if caller is not None else None
        if bucket is not None and tokens > 0:
            bucket.settle(tokens)


# ---------------------------------------------------------------------------
# where a LiteLLM proxy request keeps what the proxy (not the caller) wrote
# ---------------------------------------------------------------------------

# LiteLLM (1.108, proxy/litellm_pre_call_utils.py) writes the connection's address into
# one metadata dict of the request, ``metadata`` or ``litellm_metadata`` depending on the
# route, after removing every ``user_api_key_*`` key the caller put in either; then it
# writes ``user_api_key_request_route`` into the same dict. That key marks the dict the
# proxy owns: the other one is the caller's, and may hold a forged address.
_PROXY_MARK = "user_api_key_request_route"
_METADATA_DICTS = ("metadata", "litellm_metadata")


def proxy_metadata(data: Mapping[str, Any]) -> dict[str, Any] | None:
    """The metadata dict of a LiteLLM request that the proxy wrote (None: none is)."""
    for key in _METADATA_DICTS:
        meta = data.get(key)
        if isinstance(meta, dict) and _PROXY_MARK in meta:
            return meta
    return None


def client_ip_of(data: Mapping[str, Any]) -> str | None:
    """The address a LiteLLM request came from, as the proxy recorded it.

    That is the TCP peer, unless the proxy's ``general_settings.use_x_forwarded_for``
    is on: then it is the ``X-Forwarded-For`` header, which the caller writes, and
    the callback refuses to use it (see :mod:`token_budget.litellm_callback`).
    """
    meta = proxy_metadata(data)
    ip = meta.get("requester_ip_address") if meta is not None else None
    return ip if isinstance(ip, str) and ip else None


def check_forwarding(identity: IdentityMode, general_settings: Mapping[str, Any]) -> None:
    """Refuse (500) to know callers by IP while the proxy believes ``X-Forwarded-For``.

    Raises:
        Refusal: in the IP modes when ``general_settings.use_x_forwarded_for`` is on.
    """
    if identity is not IdentityMode.METADATA \
            and general_settings.get("use_x_forwarded_for") is True:
        raise Refusal(500, f"TOKENBUDGET_GATEWAY_IDENTITY={identity.value} needs the "
                           "proxy's use_x_forwarded_for off: a caller writes that header")


def stamp_request(data: dict[str, Any], caller: Caller | None) -> None:
    """Name the judged caller in a LiteLLM request in place of the claim: in the
    caller's metadata (read after the call to settle its tokens) and in the
    proxy's copy of it (``requester_metadata``, which labels LiteLLM's metrics
    through ``custom_prometheus_metadata_labels``)."""
    mine = data.get("metadata")
    if not isinstance(mine, dict):
        mine = data["metadata"] = {}
    stamp(mine, caller)
    proxy = proxy_metadata(data)
    if proxy is not None:
        copy = proxy.get("requester_metadata")
        if not isinstance(copy, dict):
            copy = proxy["requester_metadata"] = {}
        stamp(copy, caller)
