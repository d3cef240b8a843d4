"""Directives enforced at an LLM gateway, per request: the logic, without the gateway.

A gateway (the LiteLLM proxy: :mod:`token_budget.litellm_callback`) knows a
request's caller from the request's metadata (``namespace`` and ``pod``, which
the agent sends from the variables the operator's webhook injects), asks the
operator's directive service for that pod's directive with its own
ServiceAccount token (one of ``--directive-readers``), and per request:

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

A caller the request does not name, or a pod the operator does not govern
(404), passes unchanged. When the operator does not answer, requests pass
(fail open) unless ``fail_closed``: a gateway outage must not follow an
operator outage by default.

Only the standard library and aiohttp (which the LiteLLM proxy already has).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from token_budget.agent import Directive, TokenBucket, directive_from

log = logging.getLogger(__name__)
TTL_SECONDS = 1.0
# Callers remembered at most (directives, locks); past it all are forgotten and asked again.
CACHE_SIZE = 65_536
PATH = "/v1/namespaces/{namespace}/pods/{name}/directive"


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


def caller_of(metadata: Mapping[str, Any] | None) -> Caller | None:
    """The caller a request's metadata names (``namespace`` and ``pod``), if both."""
    metadata = metadata or {}
    ns, pod = metadata.get("namespace"), metadata.get("pod")
    if isinstance(ns, str) and isinstance(pod, str) and ns and pod:
        return Caller(ns, pod)
    return None


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
        clock: time.monotonic; injected by tests.
    """

    def __init__(self, base_url: str, token: Callable[[], str], ca_pem: str | None = None,
                 replicas: int = 1, fail_closed: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.ssl: ssl.SSLContext | bool = ssl.create_default_context(cadata=ca_pem) \
            if ca_pem else True
        self.replicas = max(1, replicas)
        self.fail_closed = fail_closed
        self.clock = clock
        self.requests = 0  # asked of the operator (tests, cost figures)
        self._cache: dict[Caller, tuple[Directive | None, float]] = {}
        self._buckets: dict[Caller, TokenBucket] = {}
        self._session: aiohttp.ClientSession | None = None
        # One fetch at a time per caller (concurrent requests of one caller share it);
        # different callers' fetches run side by side.
        self._locks: dict[Caller, asyncio.Lock] = {}

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def directive(self, caller: Caller) -> Directive | None:
        """The caller's directive (None: not governed), at most :data:`TTL_SECONDS` old.

        Raises:
            Refusal: 503 when the operator does not answer and ``fail_closed``.
        """
        hit = self._cache.get(caller)
        if hit is not None and hit[1] > self.clock():
            return hit[0]
        if len(self._cache) >= CACHE_SIZE:
            self._cache.clear()
            self._locks.clear()
        lock = self._locks.setdefault(caller, asyncio.Lock())
        async with lock:
            hit = self._cache.get(caller)
            if hit is not None and hit[1] > self.clock():
                return hit[0]
            found = await self._fetch(caller)
            self._cache[caller] = (found, self.clock() + TTL_SECONDS)
            return found

    async def _fetch(self, caller: Caller) -> Directive | None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        url = self.base_url + PATH.format(namespace=caller.namespace, name=caller.pod)
        self.requests += 1
        try:
            async with self._session.get(url, ssl=self.ssl, headers={
                    "Authorization": f"Bearer {self.token()}"}) as resp:
                if resp.status == 404:
                    return None
                if resp.status != 200:
                    raise OSError(f"the directive service answered {resp.status}")
                doc = json.loads(await resp.read())
        except (TimeoutError, OSError, aiohttp.ClientError, ValueError) as exc:
            if self.fail_closed:
                raise Refusal(503, f"the token budget operator cannot be asked: {exc}") from exc
            log.warning("directive of %s/%s unknown, request passes: %s", caller.namespace,
                        caller.pod, exc)
            return None
        return directive_from(doc.get("annotations") or {})

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

    async def admit(self, metadata: Mapping[str, Any] | None, model: str) -> str:
        """The model a request may call; raises :class:`Refusal`."""
        caller = caller_of(metadata)
        if caller is None:
            return model
        d = await self.directive(caller)
        if d is None:
            return model
        return decide(d, model, self._bucket(caller, d))

    def spent(self, metadata: Mapping[str, Any] | None, tokens: int) -> None:
        """Settle the tokens a call used against its caller's rate."""
        caller = caller_of(metadata)
        bucket = self._buckets.get(caller) if caller is not None else None
        if bucket is not None and tokens > 0:
            bucket.settle(tokens)
