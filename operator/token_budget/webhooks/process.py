"""The admission server in a process of its own, fed by the operator over a pipe.

Why a process: the webhooks answered from the operator's interpreter, and the
operator's evaluation holds that interpreter for tens of milliseconds at a time
(a page of a list decoded, a policy pass over 1,000 budgets). Every review queued
behind it: pod-create p99 through the API server went from 177 ms to 692 ms at
200 pods/s. Threads cannot fix that (one GIL); a process can, and on a 2-core
node it gets the other core::

    operator process                                  admission process (its main())
    kopf events, label-selected watches
      └─► Feed: apply to its own copies, then send ──pipe──► reader thread ─► AdmissionCache,
    Supervisor: start, send Config + snapshot,                                DirectiveStore
                restart on exit                              Server (aiohttp, TLS) ◄── API server

Why fed over a pipe rather than from its own watches: the operator already
watches everything the answers need (budgets, catalogs, namespaces, the agent
pods and their owners); a second set of watches would double the API server's
watch load per replica and could disagree with the operator's view. The pipe
carries each change as it happens (a budget body, a workload's annotations, a
namespace's labels), a few hundred bytes each.

Why a child process and not a second container: one image, one set of flags and
certificate files, and the operator's Supervisor restarts the child within a
second or two (a container restart waits for the kubelet's back-off); the child
also dies with the operator (its end of the pipe closes), never serving a cache
nobody feeds. The chart needs nothing new.

Consistency: the :class:`Feed` applies a change to the operator's copies and
sends it under one lock, and a (re)started child first receives a snapshot taken
under the same lock, so it never misses a change nor sees one twice. A child that
stops reading (wedged, stopped) is killed once a send has waited
:data:`SEND_TIMEOUT_SECONDS`: the operator's watches never wait longer on it, and
a child that missed a change never answers. It listens
only once the snapshot is loaded: its first answer already knows every budget
the operator knows.

While it restarts the port is closed for a second or two: pods fail open
(``failurePolicy: Ignore``), our own kinds fail closed (``Fail``), as during
an operator restart. Every replica runs its own child (all replicas answer).
Certificate rotation is untouched: the operator writes the files, the child's
:class:`~token_budget.webhooks.admission.Server` reloads them.
"""

from __future__ import annotations

import argparse
import asyncio
import asyncio.sslproto
import contextlib
import dataclasses
import gc
import logging
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import token_budget
from token_budget.kube import Kube, api_client
from token_budget.webhooks import admission, directives

log = logging.getLogger(__name__)

# asyncio gives every TLS connection a zero-filled read buffer of this size (256 KiB by
# default, resident at once): with 1,000 agents long-polling the directive service that was
# 284 MiB of memory (bench/directive_bench.py). Webhook reviews, directives and the API
# server's answers arrive in pieces of a few KiB; a larger answer is read in more chunks.
TLS_READ_BUFFER = 32 * 1024
# Restart back-off after the child exits: doubles up to the maximum, back to the minimum
# once a child has run for STABLE_SECONDS.
RESTART_MIN_SECONDS = 0.5
RESTART_MAX_SECONDS = 30.0
STABLE_SECONDS = 60.0
STOP_SECONDS = 5.0  # SIGTERM, then SIGKILL after this long
# A send to the admission process that cannot complete within this long (a child alive
# but no longer reading) gives up: the child is killed and its successor gets a snapshot,
# rather than the operator's watch threads and handlers waiting on it.
SEND_TIMEOUT_SECONDS = 5
# How the child starts (also what `ps` shows): this module's main(), imported once.
ENTRY = "from token_budget.webhooks import process; raise SystemExit(process.main())"


@dataclass(frozen=True)
class Config:
    """What the admission process needs from the operator's settings (sent first)."""

    host: str | None
    port: int
    certfile: str
    keyfile: str
    check_seconds: float
    dry_run: bool = False
    directives: bool = False  # serve the directive service on the same port
    token_cache_seconds: float = 60.0
    readers: frozenset[str] = frozenset()
    verbose: bool = False


# ---------------------------------------------------------------------------
# the changes: one table, applied the same way on both sides of the pipe
# ---------------------------------------------------------------------------


def _namespace(cache: admission.AdmissionCache, name: str,
               labels: Mapping[str, str] | None) -> None:
    with cache.lock:
        if labels is None:
            cache.namespaces.pop(name, None)
        else:
            cache.namespaces[name] = dict(labels)


_Change = Callable[[admission.AdmissionCache, directives.DirectiveStore, tuple[Any, ...]], None]
CHANGES: dict[str, _Change] = {
    "budget": lambda c, _, a: c.budget_event(*a),
    "workload": lambda c, _, a: c.workload_event(*a),
    "namespace": lambda c, _, a: _namespace(c, *a),
    "pod": lambda _, s, a: s.pod_event(*a),
    "pods": lambda _, s, a: s.replace(*a),
}
# Fields of AdmissionCache that are not state: rebuilt on the other side.
_NOT_STATE = frozenset({"lock", "_memo", "_catalog"})


def snapshot(cache: admission.AdmissionCache, store: directives.DirectiveStore
             ) -> tuple[dict[str, Any], list[directives.Entry]]:
    """Everything a new admission process must know, as of now."""
    with cache.lock:
        state = {f.name: getattr(cache, f.name) for f in dataclasses.fields(cache)
                 if f.name not in _NOT_STATE}
        return state, store.entries()


def load(cache: admission.AdmissionCache, store: directives.DirectiveStore,
         taken: tuple[dict[str, Any], list[directives.Entry]]) -> None:
    """Make ``cache`` and ``store`` what :func:`snapshot` saw."""
    state, entries = taken
    with cache.lock:
        for name, value in state.items():
            setattr(cache, name, value)
        cache._catalog = None  # noqa: SLF001 - rebuilt from the catalogs just loaded
        cache._memo.clear()  # noqa: SLF001
    store.load(entries)


class Feed:
    """The operator's side: every change to what the webhooks answer from goes through it.

    Applies the change to the operator's own :class:`~admission.AdmissionCache` and
    :class:`~directives.DirectiveStore` (the source of the next snapshot), then sends
    it to the admission process, both under one lock. Safe from any thread; a send
    that fails (the child died, or stopped reading for :data:`SEND_TIMEOUT_SECONDS`)
    detaches it and calls ``lost`` (the :class:`Supervisor` kills it: a child that
    missed a change must not answer) until the next one is attached.
    """

    def __init__(self, cache: admission.AdmissionCache,
                 store: directives.DirectiveStore) -> None:
        self.cache = cache
        self.store = store
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._lost: Callable[[], None] | None = None
        self.sent = 0  # changes sent (for tests)

    def budget_event(self, body: dict[str, Any], deleted: bool) -> None:
        self._change("budget", body, deleted)

    def workload_event(self, obj: dict[str, Any], deleted: bool) -> None:
        self._change("workload", obj, deleted)

    def namespace(self, name: str, labels: Mapping[str, str] | None) -> None:
        """A namespace's labels; None: it is gone."""
        self._change("namespace", name, None if labels is None else dict(labels))

    def pod_event(self, pod: Mapping[str, Any], deleted: bool) -> None:
        self._change("pod", pod, deleted)

    def pods(self, namespace: str | None, pods: list[dict[str, Any]]) -> None:
        """A fresh list of governed pods (:meth:`DirectiveStore.replace`)."""
        self._change("pods", namespace, pods)

    def _change(self, kind: str, *args: Any) -> None:
        with self._lock:
            CHANGES[kind](self.cache, self.store, args)
            if self._conn is not None:
                self._send((kind, args))

    def _send(self, message: Any) -> None:
        assert self._conn is not None
        try:
            self._conn.send(message)
            self.sent += 1
        except (OSError, ValueError) as exc:  # its successor gets a snapshot
            log.warning("admission process unreachable (%s); it is replaced", exc)
            self._conn = None
            if self._lost is not None:
                self._lost()

    def attach(self, conn: Connection, lost: Callable[[], None] | None = None) -> None:
        """Send ``conn`` a snapshot, then every change after it; ``lost`` if a send fails."""
        with self._lock:
            self._conn, self._lost = conn, lost
            self._send(("snapshot", snapshot(self.cache, self.store)))

    def detach(self, conn: Connection) -> None:
        with self._lock:
            if self._conn is conn:
                self._conn, self._lost = None, None


class Supervisor:
    """Runs the admission process and starts a new one whenever it exits."""

    def __init__(self, config: Config, feed: Feed) -> None:
        self.config = config
        self.feed = feed
        self.pid: int | None = None
        self.starts = 0
        self.ready = asyncio.Event()  # set once a child has been started and fed

    async def run(self) -> None:
        """Until cancelled: start, feed, wait for the exit, back off, start again."""
        backoff = RESTART_MIN_SECONDS
        while True:
            started = time.monotonic()
            code = await self._once()
            if time.monotonic() - started >= STABLE_SECONDS:
                backoff = RESTART_MIN_SECONDS
            log.warning("admission process exited (code %s); a new one starts in %.1f s",
                        code, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RESTART_MAX_SECONDS)

    async def _once(self) -> int | None:
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        # The child imports this very package, wherever it was imported from.
        root = str(Path(token_budget.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        with theirs:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", ENTRY, "--fd", str(theirs.fileno()),
                pass_fds=(theirs.fileno(),), env=env)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        struct.pack("ll", SEND_TIMEOUT_SECONDS, 0))
        conn = Connection(ours.detach())
        self.pid = proc.pid
        self.starts += 1
        try:
            await asyncio.to_thread(conn.send, self.config)
            await asyncio.to_thread(self.feed.attach, conn, lambda: _kill(proc.pid))
            log.info("admission process %s started (start %s)", proc.pid, self.starts)
            self.ready.set()
            return await proc.wait()
        except BaseException:
            await _stop(proc)
            raise
        finally:
            self.feed.detach(conn)
            conn.close()
            self.pid = None


def _kill(pid: int) -> None:
    """SIGKILL from any thread (the Supervisor then sees the exit and starts another)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), STOP_SECONDS)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


# ---------------------------------------------------------------------------
# the child
# ---------------------------------------------------------------------------


def _token_review(kube: Kube, token: str) -> dict[str, Any]:
    """The status of a TokenReview of ``token`` (who the API server says it is)."""
    answer = kube.request("POST", "/apis/authentication.k8s.io/v1/tokenreviews", body={
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
        "spec": {"token": token}}, timeout=10.0)
    return dict(answer.get("status") or {})


def _read(conn: Connection, cache: admission.AdmissionCache,
          store: directives.DirectiveStore, closed: Callable[[], None]) -> None:
    """Apply the operator's changes until the pipe closes (the operator is gone)."""
    try:
        while True:
            kind, args = conn.recv()
            CHANGES[kind](cache, store, args)
    except (EOFError, OSError):
        pass
    except Exception:  # a change it cannot apply: better a fresh child than a wrong cache
        log.exception("admission process cannot apply a change; exiting")
    closed()


async def serve(config: Config, conn: Connection) -> None:
    """The admission process: load the snapshot, serve, stop when the pipe closes."""
    loop = asyncio.get_running_loop()
    asyncio.sslproto.SSLProtocol.max_size = TLS_READ_BUFFER
    cache = admission.cache
    store = directives.DirectiveStore()
    store.bind(loop)
    kind, taken = await asyncio.to_thread(conn.recv)
    assert kind == "snapshot", kind
    load(cache, store, taken)
    closed = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, closed.set)
    threading.Thread(target=_read, args=(conn, cache, store,
                                         lambda: loop.call_soon_threadsafe(closed.set)),
                     name="admission-feed", daemon=True).start()
    service = None
    if config.directives:
        kube = Kube(api_client())
        service = directives.Service(store, directives.Authenticator(
            lambda token: asyncio.to_thread(_token_review, kube, token),
            config.token_cache_seconds), readers=config.readers)
    server = admission.Server(addr=config.host, port=config.port, certfile=config.certfile,
                              pkeyfile=config.keyfile, file_check_interval=config.check_seconds,
                              dry_run=config.dry_run, directives=service)

    async def listen() -> None:
        async for _ in server():
            log.info("admission process %s serves on %s:%s", os.getpid(),
                     config.host or "*", config.port)

    task = asyncio.create_task(listen())
    gc.freeze()  # modules and the snapshot live as long as the process (see handlers.operator)
    stopped = asyncio.create_task(closed.wait())
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    stopped.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="token_budget.webhooks.process")
    parser.add_argument("--fd", type=int, required=True,
                        help="the operator's end of the pipe (a connected socket)")
    args = parser.parse_args(argv)
    conn = Connection(args.fd)
    config: Config = conn.recv()
    logging.basicConfig(level=logging.DEBUG if config.verbose else logging.INFO,
                        format="%(asctime)s [%(levelname)-8s] %(name)s: %(message)s")
    logging.getLogger("aiohttp").setLevel(logging.WARNING)
    asyncio.run(serve(config, conn))
    return 0
