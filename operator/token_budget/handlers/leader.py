"""Leader election with a coordination.k8s.io Lease: of several replicas, one acts.

Every replica watches and serves webhooks; only the holder of the Lease
evaluates and writes. The holder renews every third of the lease duration; a
replica that cannot renew in time stops acting before another may take over
(it steps down at 2/3 of the duration, a rival waits the full duration).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable

from token_budget.errors import Conflict, EnforcementError, TargetNotFound
from token_budget.kube import LEASES, Kube

log = logging.getLogger(__name__)


def _fmt(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


class LeaderElector:
    def __init__(self, kube: Kube, namespace: str, name: str, identity: str,
                 lease_seconds: int = 15,
                 clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)) -> None:
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_seconds = lease_seconds
        self.clock = clock
        self._leader_until: dt.datetime | None = None
        self._stop = threading.Event()
        self.changed = threading.Event()

    @property
    def is_leader(self) -> bool:
        return self._leader_until is not None and self.clock() < self._leader_until

    def try_acquire(self) -> bool:
        """One attempt to take or renew the Lease; True while we hold it."""
        now = self.clock()
        spec = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.lease_seconds,
            "renewTime": _fmt(now),
        }
        try:
            lease = self.kube.get(LEASES, self.namespace, self.name)
        except TargetNotFound:
            try:
                self.kube.create(LEASES, self.namespace, {
                    "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": {**spec, "acquireTime": _fmt(now), "leaseTransitions": 0},
                })
            except EnforcementError as exc:
                log.debug("lease create lost: %s", exc)
                return self._set(False, now)
            return self._set(True, now)
        except EnforcementError as exc:
            log.warning("cannot read the lease %s/%s: %s", self.namespace, self.name, exc)
            return self._set(self.is_leader, now)
        cur = lease.get("spec") or {}
        holder = cur.get("holderIdentity")
        renewed = _parse(cur.get("renewTime")) or dt.datetime.min.replace(tzinfo=dt.UTC)
        duration = int(cur.get("leaseDurationSeconds") or self.lease_seconds)
        expired = now >= renewed + dt.timedelta(seconds=duration)
        if holder not in (self.identity, None, "") and not expired:
            return self._set(False, now)
        new_spec = dict(cur)
        new_spec.update(spec)
        if holder != self.identity:
            new_spec["acquireTime"] = _fmt(now)
            new_spec["leaseTransitions"] = int(cur.get("leaseTransitions") or 0) + 1
        lease["spec"] = new_spec
        try:
            self.kube.replace(LEASES, self.namespace, self.name, lease)  # resourceVersion guards
        except Conflict:
            return self._set(False, now)
        except EnforcementError as exc:
            log.warning("cannot renew the lease: %s", exc)
            return self._set(self.is_leader, now)
        return self._set(True, now)

    def _set(self, leader: bool, now: dt.datetime) -> bool:
        was = self.is_leader
        # Step down before a rival may take over: act only for 2/3 of the lease.
        self._leader_until = now + dt.timedelta(seconds=self.lease_seconds * 2 / 3) \
            if leader else None
        if was != leader:
            log.info("%s is %s", self.identity, "now the leader" if leader else "not the leader")
            self.changed.set()
        return leader

    def run(self) -> None:
        """Keep trying (a thread's body) until :meth:`stop`."""
        while not self._stop.is_set():
            try:
                self.try_acquire()
            except Exception:  # noqa: BLE001 - keep electing whatever happens
                log.exception("leader election failed")
            self._stop.wait(self.lease_seconds / 3)

    def release(self) -> None:
        """Give the Lease up on shutdown so a peer takes over at once."""
        if not self.is_leader:
            return
        try:
            lease = self.kube.get(LEASES, self.namespace, self.name)
            if (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                lease["spec"]["holderIdentity"] = None
                self.kube.replace(LEASES, self.namespace, self.name, lease)
        except EnforcementError:
            pass
        self._leader_until = None

    def stop(self) -> None:
        self._stop.set()
