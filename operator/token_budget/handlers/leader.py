"""Leader election with a coordination.k8s.io Lease: of several replicas, one acts.

Every replica watches and serves webhooks; only the holder of the Lease
evaluates and writes. The rules are client-go's (``leaderelection.go``):

- A rival judges the Lease expired ``lease`` seconds after it *saw* the record
  change, by its own monotonic clock. The holder's ``renewTime`` is written
  for people to read and never compared with a local clock, so clock skew
  between nodes decides nothing.
- The holder leads until ``renew_deadline`` seconds after the start of its
  last successful renewal, by its monotonic clock, and stops at once when a
  renewal fails (an error, a timeout, a Conflict): it never leads on a Lease
  it could not write.
- Every write carries the ``resourceVersion`` read just before, so of two
  candidates for one record only one write succeeds.
- A stopping leader releases the Lease (holder empty): a rival takes over at
  its next retry instead of a lease later (client-go's ``ReleaseOnCancel``).

Why a rival never acts while the holder still does, with the default
timings (lease 15 s, renew deadline 10 s, retry 2 s)::

    holder:  starts renewal at t0 ──(write committed at c >= t0)── leads until t0+10
    rival:   sees that record at s >= c ──────────────────────── may take over at s+15
             s + 15 >= t0 + 15 > t0 + 10: five seconds apart, whatever the wall clocks say

The five seconds absorb the difference of clock rates and the write that
was already on its way when the holder stopped: :class:`LeaderOnlyKube`
refuses writes once the replica does not lead and gives each write a
timeout that ends before a rival could take over.

Why not ``kubernetes.leaderelection`` (client 37.0.2), which has the same
rules: it is blocking and thread based (``run()`` never returns while it
follows; leading is a callback in another thread) in a process that is
asyncio (kopf); it reads ``time.time()``, which cannot be injected in tests
and jumps with the wall clock; it never releases the Lease on a stop, so a
rolling update waits a whole lease (measured with the chart's defaults: a
standby took over 1.1-1.7 s after a SIGTERM with the release, 16-16.5 s
after a SIGKILL, which is what a stop without release costs); its
``LeaseLock`` uses the default client configuration, not the operator's
client; and its ``Config`` calls ``sys.exit`` on bad timings.

Not done here: jitter on the retry period (a handful of replicas does not
crowd the API server), and a watch on the Lease (takeover waits a retry).
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from token_budget.errors import Conflict, NotLeader, TargetNotFound
from token_budget.kube import LEASES, Kube

log = logging.getLogger(__name__)

Clock = Callable[[], float]
WallClock = Callable[[], dt.datetime]

_WRITES = frozenset(("PATCH", "POST", "PUT", "DELETE"))
# client-go's factor: the renew deadline must leave room for a jittered retry.
_JITTER = 1.2


@dataclasses.dataclass(frozen=True)
class Timings:
    """How long a Lease lasts, how long its holder may go without renewing, how often to try.

    Raises:
        ValueError: the timings cannot keep two leaders apart (client-go's rules).
    """

    lease_seconds: float = 15.0
    renew_deadline_seconds: float = 10.0
    retry_seconds: float = 2.0

    def __post_init__(self) -> None:
        if self.retry_seconds <= 0:
            raise ValueError("the retry period must be greater than 0 seconds")
        if self.renew_deadline_seconds <= _JITTER * self.retry_seconds:
            raise ValueError(f"the renew deadline must be greater than {_JITTER} times the "
                             "retry period")
        if self.lease_seconds <= self.renew_deadline_seconds:
            raise ValueError("the lease duration must be greater than the renew deadline")

    @classmethod
    def for_lease(cls, lease_seconds: float) -> Timings:
        """client-go's proportions (15 s, 10 s, 2 s) scaled to ``lease_seconds``."""
        return cls(lease_seconds, lease_seconds * 2 / 3, lease_seconds * 2 / 15)


@dataclasses.dataclass(frozen=True)
class Record:
    """The Lease's spec as the election reads it, with the version it was read at."""

    holder: str  # "" once released
    lease_seconds: int
    acquire_time: str | None
    renew_time: str | None
    transitions: int
    version: str | None = None  # metadata.resourceVersion; part of equality: any write changes it


class LeaseStore(abc.ABC):
    """Where the record lives. Errors of any kind count as a failed attempt."""

    @abc.abstractmethod
    async def get(self) -> Record | None:
        """The current record, None when there is no Lease yet."""

    @abc.abstractmethod
    async def create(self, record: Record) -> Record:
        """Create the Lease. Raises Conflict when another replica created it first."""

    @abc.abstractmethod
    async def update(self, record: Record) -> Record:
        """Write ``record`` if the Lease is still at ``record.version``; else raise Conflict."""


class LeaderElector:
    """One replica's candidacy: :meth:`run` keeps trying, :attr:`is_leader` says the outcome.

    ``is_leader`` and :meth:`write_window` are safe to read from worker threads.

    Args:
        store: the Lease.
        identity: this replica's name in ``holderIdentity``.
        timings: see :class:`Timings`.
        clock: monotonic seconds; injected by tests.
        wall: the time written into the record for people to read; injected by tests.
        on_change: called with the new state when this replica starts or stops leading.
    """

    def __init__(self, store: LeaseStore, identity: str, timings: Timings, *,
                 clock: Clock = time.monotonic,
                 wall: WallClock = lambda: dt.datetime.now(dt.UTC),
                 on_change: Callable[[bool], None] | None = None) -> None:
        self.store = store
        self.identity = identity
        self.timings = timings
        self._clock = clock
        self._wall = wall
        self.on_change = on_change
        self._released = False
        self._observed: Record | None = None
        self._observed_at = 0.0
        self._leading_until: float | None = None
        self._announced = False

    @property
    def is_leader(self) -> bool:
        until = self._leading_until
        return until is not None and self._clock() < until

    def write_window(self) -> float:
        """Seconds a write started now may take before a rival could hold the Lease (0: none)."""
        until = self._leading_until
        if until is None:
            return 0.0
        now = self._clock()
        if now >= until:
            return 0.0
        return until + self.timings.lease_seconds - self.timings.renew_deadline_seconds - now

    async def try_acquire_or_renew(self) -> bool:
        """One attempt to take or renew the Lease; whether this replica now leads."""
        if self._released:
            return False
        started = self._clock()
        if self.is_leader and self._leading_until is not None:
            budget = self._leading_until - started  # renewing: never past our own deadline
        else:
            budget = self.timings.renew_deadline_seconds
        ok = False
        try:
            ok = await asyncio.wait_for(self._attempt(), timeout=max(budget, 0.001))
        except Conflict as exc:
            log.debug("%s lost a race for the lease: %s", self.identity, exc)
        except TimeoutError:
            log.warning("%s: the lease could not be read or written within %.1f s",
                        self.identity, budget)
        except Exception as exc:  # noqa: BLE001 - any failure only means "not leading"
            log.warning("%s: the lease could not be read or written: %s", self.identity, exc)
        self._settle(ok, started)
        return self.is_leader

    async def _attempt(self) -> bool:
        current = await self.store.get()
        now = _microtime(self._wall())
        lease = int(round(self.timings.lease_seconds))
        if current is None:
            self._observe(await self.store.create(Record(
                holder=self.identity, lease_seconds=lease, acquire_time=now, renew_time=now,
                transitions=0)))
            return True
        if current != self._observed:
            self._observed, self._observed_at = current, self._clock()
        held_by_other = current.holder not in ("", self.identity)
        if held_by_other and self._clock() < self._observed_at + self.timings.lease_seconds:
            return False
        ours = current.holder == self.identity
        self._observe(await self.store.update(dataclasses.replace(
            current, holder=self.identity, lease_seconds=lease, renew_time=now,
            acquire_time=current.acquire_time if ours else now,
            transitions=current.transitions + (0 if ours else 1))))
        return True

    def _observe(self, record: Record) -> None:
        self._observed, self._observed_at = record, self._clock()

    def _settle(self, ok: bool, started: float) -> None:
        self._leading_until = started + self.timings.renew_deadline_seconds if ok else None
        self._announce()

    def _announce(self) -> None:
        leading = self.is_leader
        if leading != self._announced:
            self._announced = leading
            log.info("%s %s", self.identity,
                     "is now the leader" if leading else "is not the leader any more")
            if self.on_change is not None:
                self.on_change(leading)

    async def run(self) -> None:
        """Take or renew the Lease every retry period until cancelled."""
        try:
            while not self._released:
                await self.try_acquire_or_renew()
                await asyncio.sleep(self.timings.retry_seconds)
        finally:
            self._leading_until = None
            self._announce()

    async def release(self) -> None:
        """Stop leading for good, then hand the Lease back so that a rival takes it at once."""
        self._released = True
        self._leading_until = None
        self._announce()
        last, self._observed = self._observed, None  # released once, not again
        if last is None or last.holder != self.identity:
            return
        now = _microtime(self._wall())
        try:
            await asyncio.wait_for(self.store.update(dataclasses.replace(
                last, holder="", lease_seconds=1, acquire_time=now, renew_time=now)),
                timeout=self.timings.renew_deadline_seconds)
        except Exception as exc:  # noqa: BLE001 - rivals then wait for the lease to expire
            log.warning("%s could not release the lease: %s", self.identity, exc)
            return
        log.info("%s released the lease", self.identity)


def _microtime(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class KubeLeaseStore(LeaseStore):
    """The Lease object through the operator's raw client, off the event loop."""

    def __init__(self, kube: Kube, namespace: str, name: str, timeout: float) -> None:
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.timeout = timeout
        self._metadata: dict[str, Any] = {}

    async def get(self) -> Record | None:
        try:
            obj = await asyncio.to_thread(self.kube.request, "GET",
                                          LEASES.path(self.namespace, self.name),
                                          timeout=self.timeout)
        except TargetNotFound:
            return None
        return self._record(obj)

    async def create(self, record: Record) -> Record:
        obj = await asyncio.to_thread(self.kube.request, "POST", LEASES.path(self.namespace),
                                      body=self._body(record, {}), timeout=self.timeout)
        return self._record(obj)

    async def update(self, record: Record) -> Record:
        meta = {**self._metadata, "resourceVersion": record.version}
        obj = await asyncio.to_thread(self.kube.request, "PUT",
                                      LEASES.path(self.namespace, self.name),
                                      body=self._body(record, meta), timeout=self.timeout)
        return self._record(obj)

    def _body(self, record: Record, metadata: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "apiVersion": LEASES.group_version, "kind": LEASES.kind,
            "metadata": {**metadata, "name": self.name, "namespace": self.namespace},
            "spec": {
                "holderIdentity": record.holder or None,
                "leaseDurationSeconds": record.lease_seconds,
                "acquireTime": record.acquire_time,
                "renewTime": record.renew_time,
                "leaseTransitions": record.transitions,
            },
        }

    def _record(self, obj: Mapping[str, Any]) -> Record:
        meta = dict(obj.get("metadata") or {})
        # Labels and annotations that others put on the Lease survive our replace.
        self._metadata = {k: meta[k] for k in ("labels", "annotations") if k in meta}
        spec = obj.get("spec") or {}
        return Record(
            holder=spec.get("holderIdentity") or "",
            lease_seconds=int(spec.get("leaseDurationSeconds") or 0),
            acquire_time=spec.get("acquireTime"),
            renew_time=spec.get("renewTime"),
            transitions=int(spec.get("leaseTransitions") or 0),
            version=meta.get("resourceVersion"),
        )


class LeaderOnlyKube(Kube):
    """The client of everything that acts: its writes go out only while this replica leads.

    A write is refused with :class:`NotLeader` once the replica does not lead,
    and is given a timeout that ends before a rival could take the Lease over.
    """

    def __init__(self, client: Any, elector: LeaderElector) -> None:
        super().__init__(client)
        self.elector = elector

    def request(self, method: str, path: str, query: Mapping[str, Any] | None = None,
                body: Any = None, content_type: str | None = None,
                timeout: float = 30.0) -> Any:
        if method in _WRITES:
            window = self.elector.write_window()
            if window <= 0:
                raise NotLeader(f"{method} {path}: this replica does not hold the lease")
            timeout = min(timeout, window)
        return super().request(method, path, query, body, content_type, timeout)
