"""The budgets' finalizer, kept by the leader alone.

A budget carries ``tokenbudget.io/finalizer`` so that its deletion waits until
an evaluation without it has restored every workload it governed. kopf used to
keep it, through an ``on.delete`` handler; but every replica runs kopf
(``standalone=True``), so every standby added the finalizer too, wrote kopf's
progress annotations while its handler refused to act, and its diff-base
annotation on every spec change. Now kopf has no handler that changes an
object (only ``on.event`` handlers, which feed the webhook cache), so it
writes nothing on any replica, and the finalizer is kept here:

- every replica records, from kopf's watch events, which budgets lack the
  finalizer and which are being deleted (:class:`Pending`; no writes);
- the leader adds the missing finalizers before each evaluation, and after an
  evaluation that *started* after it saw a deletion (so it listed the budgets
  without it and restored its workloads) it removes that budget's finalizer.

Each patch names the ``resourceVersion`` it was computed from: a stale one is
refused (409), the watch brings the fresh body, the leader tries again. The
writes go through the leader's :class:`~token_budget.handlers.leader.LeaderOnlyKube`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from token_budget.api.v1alpha1 import GROUP
from token_budget.errors import Conflict, EnforcementError, TargetNotFound
from token_budget.kube import Kube, Resource

log = logging.getLogger(__name__)

FINALIZER = f"{GROUP}/finalizer"

Key = tuple[str, str, str]  # plural, namespace ("" when cluster-scoped), name


@dataclass(frozen=True)
class _Seen:
    res: Resource
    body: Mapping[str, Any]
    at: float  # monotonic seconds when the state was first seen


def _key(res: Resource, body: Mapping[str, Any]) -> Key:
    meta = body.get("metadata") or {}
    return res.plural, meta.get("namespace") or "", meta.get("name") or ""


class Pending:
    """Budgets whose finalizer must be added or removed, as the watch last showed them.

    Args:
        clock: monotonic seconds (when a deletion was seen).
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._to_add: dict[Key, _Seen] = {}
        self._to_remove: dict[Key, _Seen] = {}

    def observe(self, res: Resource, body: Mapping[str, Any], deleted: bool) -> None:
        """Record one watch event of a budget."""
        key = _key(res, body)
        meta = body.get("metadata") or {}
        has = FINALIZER in (meta.get("finalizers") or [])
        deleting = bool(meta.get("deletionTimestamp"))
        with self._lock:
            if deleted or not has or not deleting:
                self._to_remove.pop(key, None)
            if deleted or has or deleting:
                self._to_add.pop(key, None)
            if deleted:
                return
            if deleting and has:
                before = self._to_remove.get(key)
                self._to_remove[key] = _Seen(res, body, before.at if before else self._clock())
            elif not deleting and not has:
                self._to_add[key] = _Seen(res, body, self._clock())

    def to_add(self) -> list[tuple[Resource, Mapping[str, Any]]]:
        with self._lock:
            return [(s.res, s.body) for s in self._to_add.values()]

    def to_remove(self, seen_before: float) -> list[tuple[Resource, Mapping[str, Any]]]:
        """Deleting budgets first seen before ``seen_before`` (monotonic seconds)."""
        with self._lock:
            return [(s.res, s.body) for s in self._to_remove.values() if s.at < seen_before]


def add(kube: Kube, res: Resource, body: Mapping[str, Any]) -> bool:
    """Put the finalizer on a budget; False when the body was stale or the budget is gone."""
    meta = body.get("metadata") or {}
    return _patch(kube, res, meta, [*(meta.get("finalizers") or []), FINALIZER])


def remove(kube: Kube, res: Resource, body: Mapping[str, Any]) -> bool:
    """Take the finalizer off a deleting budget; False when the body was stale."""
    meta = body.get("metadata") or {}
    return _patch(kube, res, meta, [f for f in meta.get("finalizers") or [] if f != FINALIZER])


def _patch(kube: Kube, res: Resource, meta: Mapping[str, Any], finalizers: list[str]) -> bool:
    # A merge patch replaces the list whole: the resourceVersion makes sure it is the list
    # we read, so nobody else's finalizer is lost.
    try:
        kube.patch(res, meta.get("namespace"), meta.get("name", ""), {"metadata": {
            "resourceVersion": meta.get("resourceVersion"), "finalizers": finalizers}})
    except TargetNotFound:
        return True  # gone: nothing left to keep or release
    except Conflict:
        return False
    except EnforcementError as exc:
        log.warning("finalizer of %s %s/%s not updated: %s", res.kind,
                    meta.get("namespace") or "", meta.get("name"), exc)
        return False
    return True
