"""ModelCatalog status: Ready, how many models, and why a catalog is invalid.

:func:`catalog_status` is pure (the same rules as the webhook and ``tokenbudget
validate``); :func:`write_status` patches it only when it differs, so the event
our own status write causes writes nothing. :func:`keep_statuses` runs on every
replica but writes only on the leader (through the leader-only client): at once
after a catalog event, and every interval, which covers catalogs seen while
another replica led.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

from token_budget.api import conditions as cond
from token_budget.api import rules
from token_budget.api import v1alpha1 as api
from token_budget.errors import EnforcementError, OperatorError, TargetNotFound
from token_budget.kube import MODELCATALOGS, Kube

log = logging.getLogger(__name__)


def catalog_status(body: dict[str, Any], now: dt.datetime) -> dict[str, Any]:
    """The full status of a ModelCatalog (``Ready`` with reason ``InvalidSpec`` and the
    problems as its message when the spec breaks a rule)."""
    meta = body.get("metadata") or {}
    generation = meta.get("generation")
    old = []
    for c in (body.get("status") or {}).get("conditions") or []:
        try:
            old.append(cond.Condition.model_validate(c))
        except ValueError:
            continue
    found = rules.schema_problems(body)
    if not found:
        found = rules.problems(api.parse(body), None)
    models = (body.get("spec") or {}).get("models")
    count = len(models) if isinstance(models, list) else 0
    if found:
        conds = cond.set_condition(old, cond.READY, False, "InvalidSpec",
                                   "; ".join(str(p) for p in found)[:2000], now, generation)
    else:
        currency = (body.get("spec") or {}).get("currency", "USD")
        conds = cond.set_condition(old, cond.READY, True, "Valid",
                                   f"{count} model(s) priced in {currency}", now, generation)
    return {"observedGeneration": generation, "models": count,
            "conditions": [c.model_dump(mode="json", by_alias=True) for c in conds]}


def write_status(kube: Kube, body: dict[str, Any], now: dt.datetime) -> bool:
    """Patch the catalog's status when it differs; whether it was written."""
    new = catalog_status(body, now)
    if new == (body.get("status") or {}):
        return False
    name = (body.get("metadata") or {}).get("name", "")
    try:
        kube.patch(MODELCATALOGS, None, name, {"status": new}, sub="status")
    except TargetNotFound:
        return False
    except EnforcementError as exc:
        log.warning("cannot write the status of ModelCatalog %s: %s", name, exc)
        return False
    return True


def sync(kube: Kube, now: dt.datetime) -> int:
    """Write every catalog's status that differs; how many were written."""
    return sum(write_status(kube, body, now) for body in kube.list(MODELCATALOGS)
               if not (body.get("metadata") or {}).get("deletionTimestamp"))


async def keep_statuses(kube: Kube, leading: Callable[[], bool], changed: asyncio.Event,
                        interval: float) -> None:
    """:func:`sync` while ``leading()``, after each ``changed`` and every ``interval``."""
    while True:
        if leading():
            try:
                await asyncio.to_thread(sync, kube, dt.datetime.now(dt.UTC))
            except OperatorError as exc:  # not the leader any more, the API server failed
                log.debug("catalog statuses not written: %s", exc)
            except Exception as exc:  # noqa: BLE001 - e.g. the API server unreachable
                # urllib3's connection errors are no OperatorError; a task ending here
                # stopped the whole operator (serve) at every API server restart.
                log.warning("catalog statuses not written: %s", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), timeout=interval)
        changed.clear()
