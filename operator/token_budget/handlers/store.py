"""What an evaluation reads, kept in memory and fed by watches: no LIST in a steady state.

::

    API server ──list once, then watch from its resourceVersion (bookmarks)──► Watcher
                 (kopf's watch-stream: relists only on 410 Gone or after an     │ trimmed
                  error; one asyncio task per feed, no thread)                  ▼
                                                                Store (feed -> objects)
                                                                                │
                               Evaluator.gather (worker thread) ◄──── reads ────┘

A *feed* is one list+watch: a kind, a namespace (None: the whole cluster) and a
label selector (None: every object). Agent pods and workloads come through their
label selectors, so pods that are not agents never reach the operator; only
in a namespace under mandatory enrolment are all of its workloads and pods
watched, by a feed of that namespace that starts when the namespace becomes
mandatory and stops when it no longer is.

Readiness: a feed serves reads only once a complete list has arrived since it
started. A relist (after 410 Gone) fills a fresh copy and replaces the old one
whole when it is complete, so a reader sees the objects as they were before or
as they are after, never a half-filled feed (an empty feed would read as "no
workloads", which would lift blocks and miss enforcement). While a stream is
broken the feed keeps what it last saw: stale, never emptied; the watch resumes
from its resourceVersion, and every object created or deleted meanwhile arrives
as an event (or through the relist when that version is gone).

The watch machinery is kopf's own (the same code that feeds its handlers), with
a label selector of its own per feed; kopf's handlers cannot select pods on the
server side per namespace, so the feeds are run here rather than as handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import kopf
from kopf._cogs.clients import auth, watching  # kopf's watch-stream (list, watch, 410 relist)
from kopf._cogs.structs import credentials, references

from token_budget.errors import OperatorError
from token_budget.kube import Resource

log = logging.getLogger(__name__)

Obj = dict[str, Any]
ObjKey = tuple[str, str]  # namespace ("" when cluster-scoped), name


class NotReady(OperatorError):
    """A feed an evaluation needs has not listed its objects yet."""


@dataclass(frozen=True)
class Feed:
    """One list+watch: a kind, a namespace (None: cluster-wide), a label selector, and a
    field selector (the namespaces left out of a cluster-wide feed)."""

    res: Resource
    namespace: str | None = None
    selector: str | None = None
    fields: str | None = None

    def __str__(self) -> str:
        where = self.namespace or "cluster"
        if self.fields:
            where += f" less {self.fields.count('!=')} namespace(s)"
        return f"{self.res.plural} in {where}" + (f" ({self.selector})" if self.selector else "")


def _okey(obj: Mapping[str, Any]) -> ObjKey:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def _version(obj: Mapping[str, Any]) -> int:
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:
        return 0


#: Trims a received object to what is kept (None: not kept at all).
Trim = Callable[[Feed, Obj], Obj | None]


def keep_all(_feed: Feed, obj: Obj) -> Obj | None:
    (obj.get("metadata") or {}).pop("managedFields", None)
    return obj


@dataclass
class _State:
    objects: dict[ObjKey, Obj] = field(default_factory=dict)
    listing: dict[ObjKey, Obj] | None = None  # a list in progress (replaces `objects` when done)
    listed: bool = False
    lists: int = 0  # complete lists received (1 after the start; more after 410 or errors)


class Store:
    """The objects of every feed, as trimmed; written by the watches, read by evaluations.

    Thread-safe: the watches run on the event loop, evaluations in worker threads.
    """

    def __init__(self, trim: Trim = keep_all) -> None:
        self._trim = trim
        self._cond = threading.Condition()
        self._feeds: dict[Feed, _State] = {}

    # -- written by the watches ----------------------------------------------------

    def begin(self, feed: Feed) -> None:
        """A (re)list starts: what arrives until :meth:`listed` replaces the feed whole."""
        with self._cond:
            self._feeds.setdefault(feed, _State()).listing = {}

    def listed(self, feed: Feed) -> None:
        with self._cond:
            st = self._feeds.setdefault(feed, _State())
            if st.listing is not None:
                st.objects, st.listing = st.listing, None
            st.listed = True
            st.lists += 1
            self._cond.notify_all()

    def event(self, feed: Feed, type_: str | None, obj: Obj) -> None:
        """One object of a list (type None) or one watch event."""
        with self._cond:
            st = self._feeds.setdefault(feed, _State())
            into = st.listing if st.listing is not None else st.objects
            key = _okey(obj)
            kept = None if type_ == "DELETED" else self._trim(feed, obj)
            if kept is None:
                into.pop(key, None)
            else:
                into[key] = kept

    def observed(self, res: Resource, obj: Obj) -> None:
        """An object as a write returned it: newer than the feeds' copy until its event."""
        key = _okey(obj)
        with self._cond:
            for feed, st in self._feeds.items():
                old = st.objects.get(key)
                if feed.res != res or old is None or _version(old) > _version(obj):
                    continue
                kept = self._trim(feed, {**obj, "kind": res.kind,
                                         "apiVersion": res.group_version})
                if kept is not None:
                    st.objects[key] = kept

    def drop(self, feed: Feed) -> None:
        with self._cond:
            self._feeds.pop(feed, None)

    # -- read by evaluations -------------------------------------------------------

    def ready(self, feeds: Iterable[Feed]) -> bool:
        with self._cond:
            return all(f in self._feeds and self._feeds[f].listed for f in feeds)

    def wait(self, feeds: Iterable[Feed], timeout: float) -> None:
        """Until every feed has listed; raises NotReady after ``timeout`` seconds."""
        wanted = list(feeds)
        with self._cond:
            if not self._cond.wait_for(lambda: self.ready(wanted), timeout):
                missing = [str(f) for f in wanted
                           if f not in self._feeds or not self._feeds[f].listed]
                raise NotReady(f"not listed yet: {', '.join(missing[:5])}"
                               + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))

    def items(self, feed: Feed) -> list[Obj]:
        with self._cond:
            st = self._feeds.get(feed)
            if st is None or not st.listed:
                raise NotReady(f"{feed} has not been listed")
            return list(st.objects.values())

    def lists(self, feed: Feed) -> int:
        with self._cond:
            st = self._feeds.get(feed)
            return st.lists if st else 0

    def __len__(self) -> int:
        with self._cond:
            return sum(len(st.objects) for st in self._feeds.values())


#: Called on the event loop for every watch event (not for listed objects): feed, type, object.
OnEvent = Callable[[Feed, str, Obj], None]
#: Called on the event loop when a (re)list is complete, with the feed's objects as kept.
OnListed = Callable[[Feed, list[Obj]], None]


class Watcher:
    """Runs one kopf watch-stream per wanted feed, on the event loop, into a :class:`Store`.

    ``want()`` may be called from any thread: feeds not wanted any more stop (their
    objects leave the store), new ones start listing.
    """

    RETRY_SECONDS = 2.0
    MAX_RETRY_SECONDS = 60.0

    def __init__(self, store: Store, on_event: OnEvent | None = None,
                 on_listed: OnListed | None = None, server_timeout: int = 300,
                 chunk_size: int = 500, inactivity_timeout: float = 70.0) -> None:
        self.store = store
        self.on_event = on_event
        self.on_listed = on_listed
        self.settings = kopf.OperatorSettings()
        self.settings.watching.server_timeout = server_timeout
        self.settings.watching.chunk_size = chunk_size
        # A stream that brings nothing, not even a bookmark (the API server sends one about
        # every minute), is taken for dead and resumed from its resourceVersion.
        self.settings.watching.inactivity_timeout = inactivity_timeout
        self.settings.networking.request_timeout = 60
        self._tasks: dict[Feed, asyncio.Task[None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._context: contextvars.Context | None = None
        self._lock = threading.Lock()
        self._wanted: set[Feed] = set()

    async def run(self, vault: credentials.Vault) -> None:
        """Serve until cancelled; feeds start as they are wanted."""
        auth.vault_var.set(vault)
        self._context = contextvars.copy_context()
        self._loop = asyncio.get_running_loop()
        self._sync()
        try:
            await asyncio.Event().wait()
        finally:
            tasks = list(self._tasks.values())
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(BaseException):
                    await t

    def want(self, feeds: Iterable[Feed]) -> None:
        """The feeds to run from now on (any thread)."""
        with self._lock:
            self._wanted = set(feeds)
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: we are stopping
                self._loop.call_soon_threadsafe(self._sync)

    def add(self, feeds: Iterable[Feed]) -> None:
        with self._lock:
            wanted = self._wanted | set(feeds)
        self.want(wanted)

    @property
    def wanted(self) -> frozenset[Feed]:
        with self._lock:
            return frozenset(self._wanted)

    def _sync(self) -> None:
        with self._lock:
            wanted = set(self._wanted)
        for feed in [f for f in self._tasks if f not in wanted]:
            self._tasks.pop(feed).cancel()
            self.store.drop(feed)
            log.info("stopped watching %s", feed)
        for feed in wanted - set(self._tasks):
            assert self._context is not None
            self._tasks[feed] = asyncio.get_running_loop().create_task(
                self._feed(feed), name=f"watch {feed}", context=self._context)

    def _settings(self, feed: Feed) -> kopf.OperatorSettings:
        s = kopf.OperatorSettings()
        s.watching.server_timeout = self.settings.watching.server_timeout
        s.watching.chunk_size = self.settings.watching.chunk_size
        s.watching.inactivity_timeout = self.settings.watching.inactivity_timeout
        s.networking.request_timeout = self.settings.networking.request_timeout
        which = references.Selector(_group(feed.res), feed.res.plural)
        if feed.selector:
            s.watching.label_selectors[which] = feed.selector
        if feed.fields:
            s.watching.field_selectors[which] = feed.fields
        return s

    async def _feed(self, feed: Feed) -> None:
        """List, then watch from the list's resourceVersion, for as long as wanted.

        kopf's ``continuous_watch`` resumes a broken or timed-out stream from the last
        resourceVersion it saw (bookmarks keep it recent) and returns on 410 Gone (that
        version is compacted away) or when the list itself fails: then this lists again.
        """
        res = feed.res
        resource = references.Resource(_group(res), res.group_version.split("/")[-1],
                                       res.plural, kind=res.kind, namespaced=res.namespaced)
        settings = self._settings(feed)
        namespace = references.NamespaceName(feed.namespace) if feed.namespace else None
        never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        failures = 0
        while True:
            try:
                self.store.begin(feed)
                async for event in watching.continuous_watch(
                        settings=settings, resource=resource, namespace=namespace,
                        operator_pause_waiter=never):
                    if isinstance(event, watching.Bookmark):  # the list is complete
                        failures = 0
                        self.store.listed(feed)
                        if self.on_listed is not None:
                            self.on_listed(feed, self.store.items(feed))
                        continue
                    type_ = event.get("type")
                    if type_ == "BOOKMARK":
                        continue
                    obj = dict(event.get("object") or {})
                    obj.setdefault("kind", res.kind)
                    obj.setdefault("apiVersion", res.group_version)
                    self.store.event(feed, type_, obj)
                    if self.on_event is not None and type_ is not None:
                        self.on_event(feed, type_, obj)
                log.info("relisting %s (its resourceVersion is gone, or the list failed)", feed)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a feed must outlive any error
                log.warning("watch of %s failed, relisting: %s", feed, exc)
                failures += 1
            # Backs off while it keeps failing (a 403 must not become a LIST every 2 s).
            await asyncio.sleep(min(self.MAX_RETRY_SECONDS,
                                    self.RETRY_SECONDS * 2 ** min(failures, 6)))


def _group(res: Resource) -> str:
    return res.group_version.split("/")[0] if "/" in res.group_version else ""


async def vault_from(info: kopf.ConnectionInfo | None = None) -> credentials.Vault:
    """kopf's credentials store with the operator's identity, for the watches.

    In-cluster service account first, then $KUBECONFIG / ~/.kube/config (as kopf logs in).
    """
    if info is None:
        settings = kopf.OperatorSettings()
        info = kopf.login_with_service_account(settings=settings, logger=log) or \
            kopf.login_with_kubeconfig(settings=settings, logger=log)
    if info is None:
        raise OperatorError("no Kubernetes credentials for the watches")
    # Each stream holds a connection for as long as it runs: no pool limit (aiohttp's
    # default of 100 would stall the feeds of more than ~17 mandatory namespaces).
    ssl = info.as_ssl_context() if info.server.startswith("https") else False
    session = kopf.AiohttpSession(
        server=info.server, default_namespace=info.default_namespace, priority=info.priority,
        expiration=info.expiration, aiohttp_session=aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ssl=ssl),
            headers=info.as_http_headers(), proxy=info.proxy_url, trust_env=info.trust_env))
    return credentials.Vault({"watches": session})


class Background:
    """A :class:`Watcher` on an event loop of its own thread (benchmarks, tools, tests)."""

    def __init__(self, watcher: Watcher, info: kopf.ConnectionInfo | None = None) -> None:
        self.watcher = watcher
        self._info = info
        self._loop = asyncio.new_event_loop()
        self._task: asyncio.Task[None] | None = None
        self._thread = threading.Thread(target=self._run, name="watches", daemon=True)
        self._started = threading.Event()
        self._thread.start()
        self._started.wait(30)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def main() -> None:
            vault = await vault_from(self._info)
            self._task = asyncio.current_task()
            self._started.set()
            try:
                await self.watcher.run(vault)
            finally:
                await vault.close()  # its HTTP sessions
                await asyncio.sleep(0.25)  # their transports close on the next loop turns

        try:
            with contextlib.suppress(asyncio.CancelledError):
                self._loop.run_until_complete(main())
        finally:
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    def close(self) -> None:
        if self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(10)
