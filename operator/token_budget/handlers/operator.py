"""The running operator: kopf handlers, workload watchers, leader election, the loop.

Who does what::

    kopf (events on budgets, catalogs, namespaces) ─┐
    label-selected watches (agent pods, workloads) ─┼─► trigger ─► evaluation loop (leader only)
    timer: every --interval-seconds ────────────────┘                 │
                                                                      ▼
                                                   Evaluator.run_once (in a worker thread),
                                                   which reads the watches' store
                                                   (handlers/store.py): no list once started

Budgets carry a finalizer: on deletion the leader runs an evaluation that
leaves the budget out (which restores every workload it governed) and only
then lets the budget go (:mod:`token_budget.handlers.finalizers`).

Only the leader writes. kopf runs on every replica, for the webhook server and
the watches that feed its cache, but has only ``on.event`` handlers: nothing
that makes it add a finalizer, store progress or a diff-base. Everything that
acts (the evaluation, the finalizers) writes through a
:class:`~token_budget.handlers.leader.LeaderOnlyKube`, which refuses writes once
the replica does not lead. (The webhook Secret and configurations are written
by every replica: each serves the webhooks.)
"""

from __future__ import annotations

import argparse
import asyncio
import asyncio.sslproto
import contextlib
import datetime as dt
import gc
import logging
import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import kopf
from prometheus_client import start_http_server

from token_budget.api.v1alpha1 import GROUP, VERSION
from token_budget.enforcement import patches
from token_budget.errors import EnforcementError, NotLeader
from token_budget.handlers import catalogs, finalizers, store
from token_budget.handlers.evaluation import Evaluator, Outcome, base_feeds, trim_for
from token_budget.handlers.leader import KubeLeaseStore, LeaderElector, LeaderOnlyKube, Timings
from token_budget.handlers.store import Feed
from token_budget.handlers.telemetry import Telemetry
from token_budget.kube import (
    CLUSTERTOKENBUDGETS,
    MODELCATALOGS,
    NAMESPACES,
    TOKENBUDGETS,
    WORKLOADS,
    Kube,
    api_client,
)
from token_budget.metrics.prometheus import Auth, PrometheusSource
from token_budget.settings import Settings, from_args
from token_budget.webhooks import (
    admission,
    certificates,
    configuration,
    directives,
    process,
    rotation,
)

log = logging.getLogger(__name__)
registry = kopf.OperatorRegistry()
# kopf removes its finalizer from objects it has no deletion handler for; ours is kept by
# the leader (handlers/finalizers.py), so kopf's is a name no object carries.
KOPF_FINALIZER = f"{GROUP}/kopf-finalizer-unused"
DEBOUNCE_SECONDS = 0.5
# Connections kopf may open at once (see `login`): its watch streams hold one each
# (namespaces, our three kinds, its CRD observer; two more per watched namespace are
# added where used), the rest carry its patches and posts. A queued request waits within
# kopf's request timeout. Adding the finalizer to 1,000 budgets took 67 s with 32
# connections and 72 s without a limit (load 8 on 2 cores): the API server sets the pace,
# not the pool. Each connection costs ~0.3 MiB.
KOPF_CONNECTIONS = 32
# The operator's TLS connections (kopf's, the evaluation's) get the admission process's
# read buffer size too (see there).
TLS_READ_BUFFER = process.TLS_READ_BUFFER


@dataclass
class Runtime:
    """Everything the handlers share (kept in kopf's memo)."""

    settings: Settings
    kube: Kube
    evaluator: Evaluator
    elector: LeaderElector
    watcher: store.Watcher
    pending: finalizers.Pending = field(default_factory=lambda: finalizers.Pending(time.monotonic))
    loop: asyncio.AbstractEventLoop | None = None
    trigger: asyncio.Event = field(default_factory=asyncio.Event)
    last_ok: bool = False
    last_outcome: Outcome | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    namespace_labels: dict[str, dict[str, str]] = field(default_factory=dict)
    webhook_files: tuple[Path, Path] | None = None
    webhook_configurations: tuple[dict[str, Any], ...] = ()
    webhook_rotation: rotation.Rotation | None = None
    catalogs_changed: asyncio.Event = field(default_factory=asyncio.Event)
    # Governed pods' directives, for the directive service (on every replica).
    directive_store: directives.DirectiveStore = field(default_factory=directives.DirectiveStore)
    # Every change the admission process answers from goes through this (webhooks/process.py).
    feed: process.Feed = field(init=False)
    admission_process: process.Supervisor | None = None

    def __post_init__(self) -> None:
        self.feed = process.Feed(admission.cache, self.directive_store)

    def poke(self) -> None:
        """Ask for an evaluation soon; safe from any thread."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.trigger.set)


_runtime: Runtime | None = None


def _rt(memo: Any) -> Runtime:
    rt = getattr(memo, "runtime", None) or _runtime
    assert rt is not None, "the operator runtime is not initialised"
    return rt


# ---------------------------------------------------------------------------
# kopf handlers: every change to what decides triggers an evaluation
# ---------------------------------------------------------------------------


@kopf.on.startup(registry=registry)
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = KOPF_FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60


@kopf.on.cleanup(registry=registry, id="release-lease")
async def release_lease(memo: Any, **_: Any) -> None:
    """On SIGTERM, first of all: stop acting and hand the Lease to a standby.

    kopf runs cleanup handlers as soon as it begins to stop; releasing only once it
    has stopped would add its shutdown (seconds) to the failover.
    """
    await _rt(memo).elector.release()


@kopf.on.login(registry=registry, id="login")
async def login(**kwargs: Any) -> kopf.AiohttpSession | None:
    """kopf's credentials, on an HTTP session with a bounded connection pool.

    In-cluster service account first, then $KUBECONFIG / ~/.kube/config: the same
    order as the kubernetes client, so kopf and our own requests act as one identity.

    kopf's own session has no connection limit. The first time it sees 1,000 budgets it
    adds its finalizer to all of them at once, one new TLS connection per request (987
    sockets were open at the peak), each with asyncio's 256 KiB TLS read buffer and
    OpenSSL's state: ~290 MiB of the operator's resident memory, which glibc keeps
    afterwards. With a bounded pool the same patches queue for a connection instead.
    """
    info: kopf.ConnectionInfo | None = kopf.login_with_service_account(**kwargs)
    info = info or kopf.login_with_kubeconfig(**kwargs)
    if info is None:
        return None
    rt = _runtime
    watched = len(rt.settings.namespaces) if rt is not None else 0
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=KOPF_CONNECTIONS + 2 * watched,
                                       ssl=info.as_ssl_context()),
        headers=info.as_http_headers(), proxy=info.proxy_url, trust_env=info.trust_env)
    return kopf.AiohttpSession(server=info.server, default_namespace=info.default_namespace,
                               priority=info.priority, expiration=info.expiration,
                               aiohttp_session=session)


@kopf.on.event(GROUP, VERSION, "tokenbudgets", registry=registry, id="tokenbudget-changed")
@kopf.on.event(GROUP, VERSION, "clustertokenbudgets", registry=registry,
               id="clustertokenbudget-changed")
@kopf.on.event(GROUP, VERSION, "modelcatalogs", registry=registry, id="modelcatalog-changed")
def budget_changed(memo: Any, type: str | None, body: Any, resource: kopf.Resource,
                   **_: Any) -> None:
    # Our own status writes also arrive here; they change no decision input, so only
    # spec changes (a new generation) and deletions wake the loop early.
    meta = body.get("metadata", {})
    status = body.get("status") or {}
    _rt(memo).feed.budget_event(dict(body), deleted=type == "DELETED")
    res = _FINALIZED.get(resource.plural)
    if res is not None:
        _rt(memo).pending.observe(res, dict(body), deleted=type == "DELETED")
    if type == "DELETED" or meta.get("deletionTimestamp") or \
            status.get("observedGeneration") != meta.get("generation"):
        _rt(memo).poke()


@kopf.on.event(GROUP, VERSION, "modelcatalogs", registry=registry, id="modelcatalog-status")
def catalog_status(memo: Any, **_: Any) -> None:
    """Ready, the model count, an invalid catalog's problems: see handlers.catalogs."""
    rt = _rt(memo)
    if rt.loop is not None:
        rt.loop.call_soon_threadsafe(rt.catalogs_changed.set)


@kopf.on.event("", "v1", "namespaces", registry=registry, id="namespace-changed")
def namespace_changed(memo: Any, type: str | None, body: Any, **_: Any) -> None:
    # Namespaces change often (status, annotations); only their labels pick budgets.
    rt = _rt(memo)
    name = body.get("metadata", {}).get("name", "")
    labels = dict(body.get("metadata", {}).get("labels") or {})
    rt.feed.namespace(name, None if type == "DELETED" else labels)
    if type == "DELETED":
        rt.namespace_labels.pop(name, None)
        rt.poke()
    elif rt.namespace_labels.get(name) != labels:
        rt.namespace_labels[name] = labels
        rt.poke()


_FINALIZED = {r.plural: r for r in (TOKENBUDGETS, CLUSTERTOKENBUDGETS)}


# ---------------------------------------------------------------------------
# the watches' store: what evaluations read (handlers/store.py)
# ---------------------------------------------------------------------------


def _watched(rt: Runtime, feed: Feed, type_: str, obj: dict[str, Any]) -> None:
    """One watch event of a feed (on the event loop): the webhook caches, and the loop.

    Budgets, catalogs and namespaces wake the loop through kopf's handlers above.
    """
    res = feed.res
    if res.kind not in WORKLOADS:
        return
    deleted = type_ == "DELETED"
    if res.kind != "Pod":  # owners' directives, for stamping their new pods
        rt.feed.workload_event(obj, deleted=deleted)
        rt.poke()
    else:
        if feed.selector == rt.settings.agent_label:  # the directive service answers from it
            rt.feed.pod_event(obj, deleted=deleted)
        if _pod_needs_evaluation(rt, {"type": type_, "object": obj}):
            rt.poke()


def _listed(rt: Runtime, feed: Feed, objs: list[dict[str, Any]]) -> None:
    """A feed's (re)list is complete: what it did not return is gone."""
    if feed.res.kind == "Pod" and feed.selector == rt.settings.agent_label:
        rt.feed.pods(feed.namespace, objs)
    elif feed.res.kind in WORKLOADS and feed.res.kind != "Pod":
        for obj in objs:
            rt.feed.workload_event(obj, deleted=False)
    if feed.res.kind in WORKLOADS:
        rt.poke()


def _pod_needs_evaluation(rt: Runtime, event: dict[str, Any]) -> bool:
    """Whether a pod event can change what the operator must write.

    A governed pod that already carries a directive (stamped by the mutating webhook,
    or by an evaluation: our own patches come back here too) or that is gone needs
    nothing until the next interval; waking the loop for each of them made a burst of
    pod creations a storm of back-to-back evaluations, every one of them listing every
    governed pod, which starved the webhook server of the interpreter.
    """
    if event.get("type") == "DELETED":
        return False
    meta = (event.get("object") or {}).get("metadata") or {}
    directed = patches.STATE in (meta.get("annotations") or {})
    governed = rt.settings.agent_label in (meta.get("labels") or {})
    return not (directed and governed)


# ---------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------


def freeze_heap() -> None:
    """Out of the collector's sight: what lives as long as the process (the store, full).

    bench/kube_bench.py, 1,000 budgets and 6,000 pods and workloads: with the store in
    sight a full collection every other quiet evaluation paused it 0.39-0.48 s; frozen, a
    full one costs 0.08-0.16 s. Called once, before any evaluation object exists: what is
    frozen and later dies in a cycle is never collected (an engine Context is a cycle).
    """
    gc.collect()
    gc.freeze()


async def evaluation_loop(rt: Runtime) -> None:
    interval = rt.settings.interval_seconds
    while True:
        if rt.elector.is_leader:
            started = time.monotonic()
            ok = False
            try:
                await asyncio.to_thread(_add_finalizers, rt)
                rt.last_outcome = await asyncio.to_thread(rt.evaluator.run_once)
                ok = True
                await asyncio.to_thread(_release_finalizers, rt, started)
            except NotLeader as exc:
                log.info("leadership lost during an evaluation, stopped before a write: %s", exc)
            except store.NotReady as exc:  # never on a half-filled store
                log.warning("evaluation postponed: the watches have not listed yet (%s)", exc)
            except Exception:
                log.exception("evaluation failed; retrying at the next interval")
            rt.last_ok = ok
        wait = interval
        outcome = rt.last_outcome
        if rt.last_ok and outcome is not None and outcome.next_check is not None:
            # A budget forecast to cross a threshold: look again then, not at the interval.
            wait = min(interval, max(1.0, outcome.next_check - outcome.seconds))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(rt.trigger.wait(), timeout=wait)
        rt.trigger.clear()
        await asyncio.sleep(DEBOUNCE_SECONDS)  # let a burst of events settle into one run


def _add_finalizers(rt: Runtime) -> None:
    """Before a budget has effects, make sure its deletion will wait for their undoing."""
    if not all(finalizers.add(rt.evaluator.kube, res, body) for res, body in rt.pending.to_add()):
        rt.poke()  # a stale body: the watch brings the fresh one


def _release_finalizers(rt: Runtime, started: float) -> None:
    """Let go of the budgets deleted before ``started``: that evaluation undid their effects."""
    if not all(finalizers.remove(rt.evaluator.kube, res, body)
               for res, body in rt.pending.to_remove(seen_before=started)):
        rt.poke()


def _lifetimes(s: Settings) -> certificates.Lifetimes:
    return certificates.Lifetimes(dt.timedelta(seconds=s.webhook_certificate_seconds),
                                  dt.timedelta(seconds=s.webhook_ca_seconds))


def setup_webhooks(rt: Runtime) -> None:
    """Certificates from the Secret (issued or renewed), their files, the configurations.

    Self-managed, :attr:`Runtime.webhook_rotation` then keeps all three current
    (started by :func:`publish_webhooks`).
    """
    s = rt.settings
    admission.cache.model_env = s.model_env
    admission.cache.agent_label = s.agent_label
    admission.cache.signals = s.signals
    admission.cache.enrol_by_signal = s.enrolment_by_signal
    admission.cache.gateway_env = dict(s.gateway_env)
    svc = f"{s.webhook_service}.{s.lease_namespace}.svc"
    if s.directives:
        admission.cache.directive_url = s.directive_url or s.webhook_url or \
            f"https://{svc}:{s.webhook_service_port}"
    if s.webhook_cert_dir:  # cert-manager (or another issuer) and the chart do the rest
        directory = Path(s.webhook_cert_dir)
        rt.webhook_files = (directory / "tls.crt", directory / "tls.key")
        with contextlib.suppress(OSError):  # cert-manager's Secrets carry the issuer's CA
            admission.cache.directive_ca = (directory / "ca.crt").read_text() or None
        log.info("webhooks on %s:%s with the certificate in %s", s.webhook_host,
                 s.webhook_port, directory)
        return
    hosts = list(s.webhook_hosts) or (
        ["127.0.0.1", "localhost"] if s.webhook_url else [svc, f"{svc}.cluster.local"])
    if s.webhook_url:
        client: dict[str, Any] = {"url": s.webhook_url}
    else:
        client = {"service": {"namespace": s.lease_namespace, "name": s.webhook_service,
                              "port": s.webhook_service_port}}

    def configurations(ca_bundle: bytes) -> tuple[dict[str, Any], ...]:
        return configuration.configurations(client, ca_bundle, s.lease_namespace,
                                            agent_label=s.agent_label,
                                            enrol=s.enrolment_by_signal)

    rt.webhook_rotation = rotation.Rotation(
        rt.kube, s.lease_namespace, s.webhook_secret, hosts,
        Path(tempfile.mkdtemp(prefix="tokenbudget-webhook-")), _lifetimes(s), configurations)
    bundle = rt.webhook_rotation.sync()
    rt.webhook_files = rt.webhook_rotation.files
    rt.webhook_configurations = configurations(bundle.trusted)
    if s.directives:
        admission.cache.directive_ca = bundle.trusted.decode()
    log.info("webhooks on %s:%s, certificate valid until %s", s.webhook_host, s.webhook_port,
             bundle.not_after().isoformat())


def admission_config(rt: Runtime) -> process.Config:
    """What the admission process serves: port, certificate files, dry-run, directives."""
    s = rt.settings
    assert rt.webhook_files is not None, "setup_webhooks first"
    certfile, keyfile = rt.webhook_files
    return process.Config(
        host=s.webhook_host, port=s.webhook_port, certfile=str(certfile), keyfile=str(keyfile),
        check_seconds=_lifetimes(s).check_seconds, dry_run=s.dry_run,
        directives=s.directives, token_cache_seconds=s.directive_token_cache_seconds,
        readers=frozenset(s.directive_readers), verbose=s.verbose)


def prime_admission_cache(rt: Runtime) -> None:
    """Fill the webhook's cache from lists, so its first answer already knows every budget.

    The kopf watches keep it current afterwards; without this, the webhook would judge the
    first requests against an empty cache (a budget that refers to a catalog model refused
    as unknown, a Blocked scope let through).
    """
    kube, s = rt.kube, rt.settings
    scoped: list[str | None] = [*s.namespaces] or [None]
    sources: list[tuple[Any, str | None]] = [(MODELCATALOGS, None), (CLUSTERTOKENBUDGETS, None),
                                             *[(TOKENBUDGETS, ns) for ns in scoped]]
    for res, ns in sources:
        try:
            for obj in kube.list(res, ns):
                rt.feed.budget_event(obj, deleted=False)
        except EnforcementError as exc:  # the watches fill it in later
            log.warning("could not list %s for the webhook cache: %s", res.plural, exc)
    try:
        names = s.namespaces or None
        for obj in kube.list(NAMESPACES, None):
            meta = obj.get("metadata") or {}
            if names is None or meta.get("name") in names:
                rt.feed.namespace(meta.get("name", ""), meta.get("labels") or {})
    except EnforcementError as exc:
        log.warning("could not list namespaces for the webhook cache: %s", exc)


async def publish_webhooks(rt: Runtime) -> None:
    """Write the webhook configurations once the server answers, never before.

    The API server calls a configured webhook at once; written before kopf's server
    listens, every budget write would fail with "connection refused" (budgets fail
    closed) and every pod would skip the checks (pods fail open). Self-managed, it
    then keeps the certificate and the configurations current, for as long as the
    operator runs.
    """
    s = rt.settings
    host = "127.0.0.1" if s.webhook_host in ("0.0.0.0", "::", "") else s.webhook_host
    while True:
        try:
            _, writer = await asyncio.open_connection(host, s.webhook_port)
            writer.close()
            break
        except OSError:
            await asyncio.sleep(0.1)
    await asyncio.to_thread(prime_admission_cache, rt)
    await asyncio.to_thread(configuration.apply, rt.kube, rt.webhook_configurations)
    log.info("webhook configurations written: the API server calls this replica's webhooks")
    if rt.webhook_rotation is not None:
        await rt.webhook_rotation.run()  # from now on: renewals, other replicas' renewals



def build_runtime(settings: Settings) -> Runtime:
    kube = Kube(api_client())
    telemetry = Telemetry(None)
    source = PrometheusSource(settings.prometheus_url, Auth(**settings.auth_kwargs),  # type: ignore[arg-type]
                              settings.prometheus_timeout_seconds, on_query=telemetry.query,
                              scrape_interval_seconds=settings.prometheus_scrape_interval_seconds,
                              max_samples=settings.prometheus_max_samples,
                              rules_keep_labels=settings.rules_keep_labels)
    identity = settings.id or f"{socket.gethostname()}-{os.getpid()}"
    timings = Timings.for_lease(settings.lease_seconds)
    # The elector gets its own request counters: Lease renewals are not evaluation writes.
    leases = KubeLeaseStore(Kube(kube.client), settings.lease_namespace, settings.lease_name,
                           timeout=timings.renew_deadline_seconds)
    elector = LeaderElector(leases, identity, timings)
    # Everything that acts writes through this client: only while this replica leads.
    watcher = store.Watcher(store.Store(trim_for(settings)))
    evaluator = Evaluator(LeaderOnlyKube(kube.client, elector), source, settings, telemetry,
                          watcher=watcher, on_first_gather=freeze_heap)
    rt = Runtime(settings=settings, kube=kube, evaluator=evaluator, elector=elector,
                 watcher=watcher)
    watcher.on_event = lambda feed, type_, obj: _watched(rt, feed, type_, obj)
    watcher.on_listed = lambda feed, objs: _listed(rt, feed, objs)
    elector.on_change = lambda _leading: rt.poke()  # a new leader evaluates at once
    return rt


async def serve(settings: Settings) -> None:
    """Run until cancelled."""
    global _runtime
    asyncio.sslproto.SSLProtocol.max_size = TLS_READ_BUFFER
    rt = build_runtime(settings)
    rt.loop = asyncio.get_running_loop()
    _runtime = rt
    if settings.metrics_port:
        start_http_server(settings.metrics_port, settings.metrics_host,
                          registry=rt.evaluator.telemetry.registry)
    # Every replica watches (a standby's store is complete when it takes over; the
    # admission process's directive service answers from the agent pods' feed on every
    # replica, through rt.feed).
    rt.watcher.want(base_feeds(settings))
    if settings.webhook_port:
        setup_webhooks(rt)
        rt.admission_process = process.Supervisor(admission_config(rt), rt.feed)
    # Everything built so far (modules, settings, clients) lives as long as the process:
    # out of the collector's sight, a full collection takes 1-2 ms instead of 90-160 ms
    # (80k objects), which stalled every webhook answer queued behind it.
    gc.freeze()
    memo = kopf.Memo(runtime=rt)
    liveness = f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None
    tasks = [
        asyncio.create_task(rt.watcher.run(await store.vault_from()), name="watches"),
        asyncio.create_task(kopf.operator(
            registry=registry, memo=memo, standalone=True,
            clusterwide=not settings.namespaces, namespaces=list(settings.namespaces),
            liveness_endpoint=liveness)),
        asyncio.create_task(evaluation_loop(rt)),
        asyncio.create_task(rt.elector.run()),
    ]
    # Not among `tasks`: it survives its own failures (see rotation.Rotation.run).
    publisher = asyncio.create_task(publish_webhooks(rt)) if rt.webhook_configurations else None
    # Nor this one: it restarts the admission process whenever it exits.
    admitting = asyncio.create_task(rt.admission_process.run()) \
        if rt.admission_process is not None else None
    tasks.append(asyncio.create_task(catalogs.keep_statuses(
        rt.evaluator.kube, lambda: rt.elector.is_leader, rt.catalogs_changed,
        settings.interval_seconds)))
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            t.result()
    finally:
        rt.stop.set()
        for t in [*tasks, *([publisher] if publisher else [])]:
            t.cancel()
        if admitting is not None:
            admitting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await admitting  # the admission process stopped, not orphaned
        await rt.elector.release()


def run(args: argparse.Namespace) -> int:
    settings = from_args(args)
    kopf.configure(verbose=settings.verbose,
                   log_format=kopf.LogFormat.JSON if settings.log_format == "json"
                   else kopf.LogFormat.PLAIN)
    log.info("token-budget-operator starting at %s: prometheus=%s interval=%ss dry-run=%s",
             dt.datetime.now(dt.UTC).isoformat(), settings.prometheus_url,
             settings.interval_seconds, settings.dry_run)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(settings))
    return 0
