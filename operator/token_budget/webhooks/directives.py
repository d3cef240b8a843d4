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

A gateway (one of the ``--directive-readers`` ServiceAccounts) may also ask
by the caller's IP address, when it knows where a request comes from but not
who sent it (an agent that names nobody, or names another pod)::

    GET /v1/callers/{ip}/directive?version=<v>&waitSeconds=30

    200 {"namespace": ..., "pod": ..., "ip": ..., "version": "<v'>", "annotations": {...}}
    404 no governed pod holds that IP (now)
    409 {"ip": ..., "pods": [{"namespace": ..., "pod": ...}, ...]}: several do

The IP is the ``status.podIP``/``podIPs`` of governed pods that have not
finished (a Succeeded or Failed pod's sandbox is torn down and its IP may be
given to another pod).
An IP that more than one live pod holds (``hostNetwork`` pods share their
node's) resolves to nobody: the 409 names them all, so a gateway can still
check a claim against that short list. The version covers who holds the IP as
well as their directive, so a long-poll answers when the IP moves to another
pod, and an IP's pod is never mistaken for the pod that held it before.
Pod tokens get 403 here: a pod has no business asking about other IPs, and
its own directive is at its own path. Why by IP and not by, say, a header
the gateway passes through: the IP is what the proxy's TCP connection shows,
which the agent cannot choose inside the cluster network (the kubelet's CNI
gives it; a pod spoofing source addresses is stopped by the network's own
anti-spoofing or not at all, and then is out of this service's reach).

The answers come from :class:`DirectiveStore`, which the operator's own watch
of governed pods keeps current on every replica (leader or not); no request
reaches the API server except the TokenReview of a token not seen for a while.

It does not serve pods that do not carry the agent label, write anything, or
decide anything: the evaluation writes the annotations, this only serves them.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import ipaddress
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web

from token_budget.enforcement import patches

log = logging.getLogger(__name__)
PATH = "/v1/namespaces/{namespace}/pods/{name}/directive"
CALLER_PATH = "/v1/callers/{ip}/directive"
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
_T = TypeVar("_T")
# Waiters on an IP are keyed (_IP, ip): ":" is never in a namespace's name, so the keys
# of IPs and pods cannot meet.
_IP = ":ip"
# Pods in these phases hold no IP any more (their sandbox is gone; the IP may be reused).
_FINISHED = frozenset({"Succeeded", "Failed"})


@dataclass(frozen=True)
class Entry:
    """A governed pod as last seen: who it runs as and the directive it carries."""

    namespace: str
    name: str
    uid: str
    service_account: str
    annotations: Mapping[str, str]
    version: str
    ips: frozenset[str] = frozenset()  # normalised (:func:`normal_ip`); none once finished
    # The version of this pod's answer by IP: also changes when another pod (another uid)
    # takes the IP with the same directive. Computed once, in the watch's thread: a digest
    # in every request made a request by IP cost 0.24 ms of CPU against 0.19 ms by name
    # (bench/gateway_bench.py); with this, 0.19-0.22 against 0.18-0.20.
    holder_version: str = ""

    def body(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "pod": self.name, "version": self.version,
                "annotations": dict(self.annotations)}


@functools.lru_cache(maxsize=4096)  # gateways ask about the same few IPs every second
def normal_ip(text: str) -> str | None:
    """An IP address in one spelling (IPv6 compressed, IPv4-mapped IPv6 as IPv4); None
    if ``text`` is not one."""
    try:
        addr = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.compressed


def ips_of(pod: Mapping[str, Any]) -> frozenset[str]:
    """The IPs a pod holds: ``status.podIP`` and ``podIPs``, none once it has finished."""
    status = pod.get("status") or {}
    if status.get("phase") in _FINISHED:
        return frozenset()
    texts = [status.get("podIP"), *((p or {}).get("ip") for p in status.get("podIPs") or [])]
    return frozenset(ip for t in texts if isinstance(t, str) and (ip := normal_ip(t)))


@dataclass(frozen=True)
class Resolution:
    """Who holds an IP: the governed pods (sorted); one is an answer, several are not."""

    ip: str
    holders: tuple[Entry, ...]

    @property
    def owner(self) -> Entry | None:
        return self.holders[0] if len(self.holders) == 1 else None

    @property
    def version(self) -> str | None:
        """A digest of the holders and their directives; None when nobody holds it."""
        if len(self.holders) < 2:
            return self.holders[0].holder_version if self.holders else None
        text = ",".join(e.holder_version for e in self.holders)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def body(self) -> dict[str, Any]:
        if self.owner is not None:
            return {**self.owner.body(), "ip": self.ip, "version": self.version}
        return {"ip": self.ip, "pods": [{"namespace": e.namespace, "pod": e.name}
                                        for e in self.holders]}


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
    namespace, name, uid = (str(meta.get(k) or "") for k in ("namespace", "name", "uid"))
    version = version_of(served)
    holder = hashlib.sha256(f"{namespace}/{name}/{uid}/{version}".encode()).hexdigest()[:16]
    return Entry(namespace, name, uid,
                 str((pod.get("spec") or {}).get("serviceAccountName") or "default"),
                 served, version, ips_of(pod), holder)


class DirectiveStore:
    """Governed pods by (namespace, name), fed from watch threads, read from asyncio.

    Writers (:meth:`pod_event`, :meth:`replace`) may run in any thread; waiters
    (:meth:`wait`, :meth:`wait_ip`) run in the loop given to :meth:`bind`, and
    are woken through ``call_soon_threadsafe`` when their pod's version changes
    (or it comes or goes), or when their IP's holders or their directives change.

    Beside the pods, an index of IP -> the pods holding it, kept in step under
    the same lock: a pod's old IPs are let go whenever it changes or goes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pods: dict[_Key, Entry] = {}
        self._ips: dict[str, set[_Key]] = {}
        self._waiters: dict[_Key, set[asyncio.Future[None]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def __len__(self) -> int:
        return len(self._pods)

    def get(self, namespace: str, name: str) -> Entry | None:
        return self._pods.get((namespace, name))

    def resolve(self, ip: str) -> Resolution:
        """The governed pods holding ``ip`` (normalised by the caller) now."""
        with self._lock:
            keys = sorted(self._ips.get(ip, ()))
            return Resolution(ip, tuple(self._pods[k] for k in keys))

    def pod_event(self, pod: Mapping[str, Any], deleted: bool) -> None:
        """A watch event of a governed pod."""
        new = entry_of(pod)
        key = (new.namespace, new.name)
        with self._lock:
            woken = self._put(key, None if deleted else new)
        for k in woken:
            self._wake(k)

    def replace(self, namespace: str | None, pods: Iterable[Mapping[str, Any]]) -> None:
        """The pods of a fresh list: those of ``namespace`` (None: all) not in it are gone."""
        entries = {(e.namespace, e.name): e for e in map(entry_of, pods)}
        woken: list[_Key] = []
        with self._lock:
            gone = [k for k in self._pods if (namespace is None or k[0] == namespace)
                    and k not in entries]
            for k in gone:
                woken += self._put(k, None)
            for k, e in entries.items():
                woken += self._put(k, e)
        for k in woken:
            self._wake(k)

    def _put(self, key: _Key, new: Entry | None) -> list[_Key]:
        """Store (or, None, forget) one pod under the lock; the waiter keys to wake."""
        old = self._pods.pop(key, None) if new is None else self._pods.get(key)
        if new is not None:
            self._pods[key] = new
        old_ips = old.ips if old is not None else frozenset()
        new_ips = new.ips if new is not None else frozenset()
        for ip in old_ips - new_ips:
            holders = self._ips.get(ip)
            if holders is not None:
                holders.discard(key)
                if not holders:
                    del self._ips[ip]
        for ip in new_ips - old_ips:
            self._ips.setdefault(ip, set()).add(key)
        same = old is not None and new is not None and old.version == new.version \
            and old.uid == new.uid
        woken: list[_Key] = [] if same else [key]
        # An IP's answer changes when a holder comes or goes, or a holder's directive does.
        touched = (old_ips ^ new_ips) if same else (old_ips | new_ips)
        woken += [(_IP, ip) for ip in touched]
        return woken

    def entries(self) -> list[Entry]:
        """Every pod's entry (a copy, for a snapshot)."""
        with self._lock:
            return list(self._pods.values())

    def load(self, entries: Iterable[Entry]) -> None:
        """Hold exactly ``entries`` (from :meth:`entries` elsewhere), the IP index with them;
        the waiters of whatever changed are woken."""
        new = {(e.namespace, e.name): e for e in entries}
        woken: list[_Key] = []
        with self._lock:
            for k in [k for k in self._pods if k not in new]:
                woken += self._put(k, None)
            for k, e in new.items():
                woken += self._put(k, e)
        for k in woken:
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
        def look() -> tuple[Entry | None, str | None]:
            entry = self._pods.get((namespace, name))
            return entry, entry.version if entry else None
        return await self._wait((namespace, name), look, version, timeout)

    async def wait_ip(self, ip: str, version: str | None, timeout: float) -> Resolution:
        """Who holds ``ip`` once that (or their directive) is not ``version``, or after
        ``timeout``."""
        def look() -> tuple[Resolution, str | None]:
            found = self.resolve(ip)
            return found, found.version
        return await self._wait((_IP, ip), look, version, timeout)

    async def _wait(self, key: _Key, look: Callable[[], tuple[_T, str | None]],
                    version: str | None, timeout: float) -> _T:
        deadline = time.monotonic() + timeout
        while True:
            found, now = look()
            left = deadline - time.monotonic()
            if now != version or left <= 0 or self._closing:
                return found
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
        app.router.add_get(CALLER_PATH, self.serve_caller)

    async def _identify(self, request: web.Request) -> Identity:
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
        return who

    def _reader(self, who: Identity) -> bool:
        """A gateway's ServiceAccount (``--directive-readers``), not bound to a pod."""
        return f"{who.namespace}:{who.service_account}" in self.readers \
            and who.pod_name is None

    async def serve(self, request: web.Request) -> web.Response:
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        who = await self._identify(request)
        if self._reader(who):
            return await self._answer(request, namespace, name, None)
        if who.namespace != namespace or who.pod_name not in (None, name):
            raise web.HTTPForbidden(reason="a pod may read only its own directive")
        return await self._answer(request, namespace, name, who)

    async def serve_caller(self, request: web.Request) -> web.Response:
        """The directive of the governed pod holding an IP; directive readers only."""
        if not self._reader(await self._identify(request)):
            raise web.HTTPForbidden(reason="only directive readers may resolve callers by IP")
        ip = normal_ip(request.match_info["ip"])
        if ip is None:
            raise web.HTTPBadRequest(reason="not an IP address")
        version, wait = self._poll(request)
        found = await self.store.wait_ip(ip, version, wait) if wait else self.store.resolve(ip)
        if not found.holders:
            raise web.HTTPNotFound(reason="no governed pod holds that IP")
        headers = {"ETag": f'"{found.version}"', "Cache-Control": "no-store"}
        if found.owner is None:  # hostNetwork pods, or an IP reused before the watch caught up
            return web.json_response(found.body(), status=409, headers=headers,
                                     reason="several governed pods hold that IP")
        return web.json_response(found.body(), headers=headers)

    def _poll(self, request: web.Request) -> tuple[str | None, float]:
        """The ``version`` a caller holds and the seconds it will wait for another."""
        try:
            wait = min(max(float(request.query.get("waitSeconds", "0")), 0.0),
                       self.max_wait_seconds)
        except ValueError as exc:
            raise web.HTTPBadRequest(reason="waitSeconds must be a number") from exc
        return request.query.get("version") or None, wait

    async def _answer(self, request: web.Request, namespace: str, name: str,
                      who: Identity | None) -> web.Response:
        """The directive, after waiting if asked; ``who`` None: a reader of every pod."""
        version, wait = self._poll(request)
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
