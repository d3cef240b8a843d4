"""The directive service: each governed pod's directive over HTTPS, with long-poll.

An agent asks for its own pod's directive (the ``tokenbudget.io/*``
annotations the operator wrote on the pod) and, with the version it holds,
waits until it changes::

    GET /v1/namespaces/{namespace}/pods/{name}/directive?version=<v>&waitSeconds=30
    Authorization: Bearer <the pod's ServiceAccount token>

    200 {"namespace": ..., "pod": ..., "version": "<v'>", "annotations": {...}}

The answer comes at once when the version differs from ``version`` (or none
was given), else when the directive changes, else after ``waitSeconds`` (at
most :data:`MAX_WAIT_SECONDS`) with the same version. The version is a digest
of the directive annotations, so every replica gives a directive the same
version: an agent may ask any replica, one after another.

Who may read what: the bearer token is checked with a TokenReview (the answer
cached by the token's digest, :class:`Authenticator`), and the caller must be
the pod's own ServiceAccount (same namespace, same ``serviceAccountName``); a
token bound to a pod (projected tokens name it) must name this pod. No token
or an invalid one: 401; someone else's pod: 403; a pod this replica does not
know as governed: 404 (only to callers of that namespace).

The answers come from :class:`DirectiveStore`, which the operator's own watch
of governed pods keeps current on every replica (leader or not); no request
reaches the API server except the TokenReview of a token not seen for a while.

It does not serve pods that do not carry the agent label, write anything, or
decide anything: the evaluation writes the annotations, this only serves them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from token_budget.enforcement import patches

log = logging.getLogger(__name__)
PATH = "/v1/namespaces/{namespace}/pods/{name}/directive"
# An idle long-poll comes back after this at most: well under the usual 60 s idle timeouts
# of proxies and load balancers, and one request per agent a minute when nothing changes.
MAX_WAIT_SECONDS = 50.0
# A refused token is asked about again after this: a token the API server does not know
# yet (just issued) is let in soon, and a caller with a bad token costs one TokenReview
# every few seconds at most, not one a request.
DENIED_CACHE_SECONDS = 5.0
# Cached TokenReview answers kept at most; past it they are all dropped.
CACHE_SIZE = 65_536
SERVED_KEYS = (*patches.DIRECTIVE_KEYS, patches.UPDATED_AT)
_SA_PREFIX = "system:serviceaccount:"
_POD_NAME = "authentication.kubernetes.io/pod-name"
_POD_UID = "authentication.kubernetes.io/pod-uid"

_Key = tuple[str, str]


@dataclass(frozen=True)
class Entry:
    """A governed pod as last seen: who it runs as and the directive it carries."""

    namespace: str
    name: str
    uid: str
    service_account: str
    annotations: Mapping[str, str]
    version: str

    def body(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "pod": self.name, "version": self.version,
                "annotations": dict(self.annotations)}


def version_of(annotations: Mapping[str, str]) -> str:
    """The version of a directive: a digest of its annotations, ``updated-at`` left out.

    The same on every replica, and the same again when a directive comes back to
    what an agent holds (nothing for it to learn).
    """
    wanted = {k: annotations[k] for k in patches.DIRECTIVE_KEYS if k in annotations}
    return hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:16]


def entry_of(pod: Mapping[str, Any]) -> Entry:
    meta = pod.get("metadata") or {}
    ann = meta.get("annotations") or {}
    served = {k: str(ann[k]) for k in SERVED_KEYS if k in ann}
    return Entry(str(meta.get("namespace") or ""), str(meta.get("name") or ""),
                 str(meta.get("uid") or ""),
                 str((pod.get("spec") or {}).get("serviceAccountName") or "default"),
                 served, version_of(served))


class DirectiveStore:
    """Governed pods by (namespace, name), fed from watch threads, read from asyncio.

    Writers (:meth:`pod_event`, :meth:`replace`) may run in any thread; waiters
    (:meth:`wait`) run in the loop given to :meth:`bind`, and are woken through
    ``call_soon_threadsafe`` when their pod's version changes (or it comes or goes).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pods: dict[_Key, Entry] = {}
        self._waiters: dict[_Key, set[asyncio.Future[None]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def __len__(self) -> int:
        return len(self._pods)

    def get(self, namespace: str, name: str) -> Entry | None:
        return self._pods.get((namespace, name))

    def pod_event(self, pod: Mapping[str, Any], deleted: bool) -> None:
        """A watch event of a governed pod."""
        new = entry_of(pod)
        key = (new.namespace, new.name)
        with self._lock:
            old = self._pods.pop(key, None) if deleted else self._pods.get(key)
            if not deleted:
                self._pods[key] = new
        if deleted or old is None or old.version != new.version:
            self._wake(key)

    def replace(self, namespace: str | None, pods: Iterable[Mapping[str, Any]]) -> None:
        """The pods of a fresh list: those of ``namespace`` (None: all) not in it are gone."""
        entries = {(e.namespace, e.name): e for e in map(entry_of, pods)}
        with self._lock:
            gone = [k for k in self._pods if (namespace is None or k[0] == namespace)
                    and k not in entries]
            changed = [k for k, e in entries.items()
                       if (old := self._pods.get(k)) is None or old.version != e.version]
            for k in gone:
                del self._pods[k]
            self._pods.update(entries)
        for k in (*gone, *changed):
            self._wake(k)

    def entries(self) -> list[Entry]:
        """Every pod's entry (a copy, for a snapshot)."""
        with self._lock:
            return list(self._pods.values())

    def load(self, entries: Iterable[Entry]) -> None:
        """Hold exactly ``entries`` (from :meth:`entries` elsewhere); waiters are woken."""
        new = {(e.namespace, e.name): e for e in entries}
        with self._lock:
            keys = {*self._pods, *new}
            self._pods = new
        for k in keys:
            self._wake(k)

    def _wake(self, key: _Key) -> None:
        if self._loop is None or key not in self._waiters:
            return
        try:
            self._loop.call_soon_threadsafe(self._release, key)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    def _release(self, key: _Key) -> None:
        for fut in self._waiters.pop(key, ()):
            if not fut.done():
                fut.set_result(None)

    def close(self) -> None:
        """Answer every waiting request now, and every later one at once (shutting down).

        The agents then ask again and reach another replica; without this the
        server's shutdown would wait for their long-polls to end. Call it in the loop.
        """
        self._closing = True
        for key in list(self._waiters):
            self._release(key)

    async def wait(self, namespace: str, name: str, version: str | None,
                   timeout: float) -> Entry | None:
        """The pod's entry once its version is not ``version``, or after ``timeout``."""
        key = (namespace, name)
        deadline = time.monotonic() + timeout
        while True:
            entry = self._pods.get(key)
            left = deadline - time.monotonic()
            if (entry.version if entry else None) != version or left <= 0 or self._closing:
                return entry
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(key, set()).add(fut)
            try:
                await asyncio.wait_for(fut, left)
            except TimeoutError:
                pass
            finally:
                held = self._waiters.get(key)
                if held is not None:
                    held.discard(fut)
                    if not held:
                        del self._waiters[key]

    def waiting(self) -> int:
        """How many requests wait for a change now."""
        return sum(len(w) for w in self._waiters.values())


@dataclass(frozen=True)
class Identity:
    """Who a token belongs to, as the TokenReview said."""

    namespace: str
    service_account: str
    pod_name: str | None = None
    pod_uid: str | None = None

    def may_read(self, entry: Entry) -> bool:
        return (self.namespace == entry.namespace
                and self.service_account == entry.service_account
                and self.pod_name in (None, entry.name)
                and (self.pod_uid is None or not entry.uid or self.pod_uid == entry.uid))


def identity_of(status: Mapping[str, Any]) -> Identity | None:
    """The ServiceAccount (and pod, if the token is bound to one) of a TokenReview status."""
    if not status.get("authenticated"):
        return None
    user = status.get("user") or {}
    username = str(user.get("username") or "")
    if not username.startswith(_SA_PREFIX):
        return None  # a person or another kind of client: not an agent
    namespace, _, account = username[len(_SA_PREFIX):].partition(":")
    if not namespace or not account:
        return None
    extra = user.get("extra") or {}

    def one(key: str) -> str | None:
        values = extra.get(key) or []
        return str(values[0]) if values else None

    return Identity(namespace, account, one(_POD_NAME), one(_POD_UID))


Review = Callable[[str], Awaitable[Mapping[str, Any]]]
"""Sends a TokenReview of a token; the answer's ``status``. Raises on failure."""


@dataclass
class Authenticator:
    """Bearer tokens to identities, through TokenReviews cached by the token's digest.

    Args:
        review: sends one TokenReview (the operator's: through its Kube client).
        cache_seconds: how long an accepted token is trusted without asking again
            (a revoked token is still let in for that long).
        clock: time.monotonic; injected by tests.
    """

    review: Review
    cache_seconds: float = 60.0
    clock: Callable[[], float] = time.monotonic
    reviews: int = 0  # TokenReviews sent (for tests and the bench)
    _cache: dict[str, tuple[Identity | None, float]] = field(default_factory=dict)
    _pending: dict[str, asyncio.Future[Identity | None]] = field(default_factory=dict)

    async def identify(self, token: str) -> Identity | None:
        """The identity of ``token``; None if the API server does not accept it.

        Raises:
            Exception: what ``review`` raised (the API server could not be asked).
        """
        digest = hashlib.sha256(token.encode()).hexdigest()
        hit = self._cache.get(digest)
        if hit is not None and hit[1] > self.clock():
            return hit[0]
        pending = self._pending.get(digest)
        if pending is not None:  # the same token asked twice at once: one TokenReview
            return await asyncio.shield(pending)
        fut: asyncio.Future[Identity | None] = asyncio.get_running_loop().create_future()
        self._pending[digest] = fut
        try:
            self.reviews += 1
            found = identity_of(await self.review(token))
            if len(self._cache) >= CACHE_SIZE:
                self._cache.clear()
            ttl = self.cache_seconds if found is not None else DENIED_CACHE_SECONDS
            self._cache[digest] = (found, self.clock() + ttl)
            fut.set_result(found)
            return found
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: no "never retrieved" warning without waiters
            raise
        finally:
            del self._pending[digest]


@dataclass
class Service:
    """The HTTP side: routes for an aiohttp app (the webhook server adds them)."""

    store: DirectiveStore
    auth: Authenticator
    max_wait_seconds: float = MAX_WAIT_SECONDS
    # ServiceAccounts ("namespace:name") that may read every pod's directive (gateways).
    readers: frozenset[str] = frozenset()

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get(PATH, self.serve)

    async def serve(self, request: web.Request) -> web.Response:
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise web.HTTPUnauthorized(reason="a bearer token is required")
        try:
            who = await self.auth.identify(token.strip())
        except Exception as exc:  # noqa: BLE001 - the API server could not be asked
            log.warning("TokenReview failed: %s", exc)
            raise web.HTTPServiceUnavailable(reason="cannot review tokens now") from exc
        if who is None:
            raise web.HTTPUnauthorized(reason="the token is not valid")
        if f"{who.namespace}:{who.service_account}" in self.readers and who.pod_name is None:
            return await self._answer(request, namespace, name, None)
        if who.namespace != namespace or who.pod_name not in (None, name):
            raise web.HTTPForbidden(reason="a pod may read only its own directive")
        return await self._answer(request, namespace, name, who)

    async def _answer(self, request: web.Request, namespace: str, name: str,
                      who: Identity | None) -> web.Response:
        """The directive, after waiting if asked; ``who`` None: a reader of every pod."""
        version = request.query.get("version") or None
        try:
            wait = min(max(float(request.query.get("waitSeconds", "0")), 0.0),
                       self.max_wait_seconds)
        except ValueError as exc:
            raise web.HTTPBadRequest(reason="waitSeconds must be a number") from exc
        entry = self.store.get(namespace, name)
        if entry is not None and who is not None and not who.may_read(entry):
            raise web.HTTPForbidden(reason="a pod may read only its own directive")
        if wait:
            entry = await self.store.wait(namespace, name, version, wait)
        if entry is None:
            raise web.HTTPNotFound(reason="no governed pod of that name")
        if who is not None and not who.may_read(entry):  # a new pod of that name, run as another
            raise web.HTTPForbidden(reason="a pod may read only its own directive")
        return web.Response(body=json.dumps(entry.body()).encode(),
                            content_type="application/json",
                            headers={"ETag": f'"{entry.version}"',
                                     "Cache-Control": "no-store"})


# ---------------------------------------------------------------------------
# what the mutating webhook adds to a governed pod's containers
# ---------------------------------------------------------------------------

URL_ENV = "TOKENBUDGET_DIRECTIVE_URL"
CA_ENV = "TOKENBUDGET_DIRECTIVE_CA"
POD_NAME_ENV = "TOKENBUDGET_POD_NAME"
POD_NAMESPACE_ENV = "TOKENBUDGET_POD_NAMESPACE"


def pod_env(base_url: str, ca_pem: str | None) -> list[dict[str, Any]]:
    """The variables that tell an agent where its directive is served.

    The pod's name is not known at admission (a ReplicaSet's pods are named by
    the API server after the webhooks), so the URL refers to variables the
    kubelet fills from the downward API (``$(VAR)`` expansion).
    """
    env: list[dict[str, Any]] = [
        {"name": POD_NAME_ENV, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": POD_NAMESPACE_ENV,
         "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": URL_ENV, "value": base_url.rstrip("/") + PATH.format(
            namespace=f"$({POD_NAMESPACE_ENV})", name=f"$({POD_NAME_ENV})")},
    ]
    if ca_pem:
        env.append({"name": CA_ENV, "value": ca_pem})
    return env
