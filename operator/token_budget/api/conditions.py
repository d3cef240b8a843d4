"""Status conditions, kept the way the Kubernetes API conventions ask.

Pure bookkeeping: :func:`set_condition` returns a new list and keeps
``lastTransitionTime`` when the status did not change. Handlers write the whole
list back, because a JSON merge-patch replaces arrays whole.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Iterable

from pydantic import ConfigDict, Field

from token_budget.api.types import _Base

READY = "Ready"
METRICS_AVAILABLE = "MetricsAvailable"
ENFORCING = "Enforcing"
DATA_INCOMPLETE = "DataIncomplete"
RATE_LIMITED = "RateLimited"


class Reason(enum.StrEnum):
    """Why a budget scope is in its state: a decision's reason, the status's and an annotation's.

    The one place these strings are spelled; code compares the members, never
    the strings. Each is a CamelCase condition reason.
    """

    WITHIN_BUDGET = "WithinBudget"
    LIMIT_REACHED = "LimitReached"
    HYSTERESIS = "Hysteresis"
    COST_PER_OUTCOME_EXCEEDED = "CostPerOutcomeExceeded"
    EXCEPTION_ACTIVE = "ExceptionActive"
    SPEND_UNKNOWN_HOLDING = "SpendUnknownHolding"
    SPEND_UNKNOWN_FAIL_CLOSED = "SpendUnknownFailClosed"
    SPEND_UNKNOWN_FAIL_OPEN = "SpendUnknownFailOpen"
    RATE_LIMITED = "RateLimited"
    NO_FALLBACK = "NoFallbackAvailable"
    RATE_LIMIT_UNKNOWN = "RateLimitUnknown"
    NOT_RATE_LIMITED = "NotRateLimited"


class Status(str, enum.Enum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(_Base):
    model_config = ConfigDict(extra="ignore", frozen=True)

    type: str = Field(pattern=r"^[A-Z][A-Za-z0-9]*$", max_length=316)
    status: Status
    observed_generation: int | None = Field(default=None, ge=0)
    last_transition_time: dt.datetime
    reason: str = Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", max_length=1024)
    message: str = Field(default="", max_length=32768)


def set_condition(
    conditions: Iterable[Condition],
    type_: str,
    status: Status | bool,
    reason: str,
    message: str,
    now: dt.datetime,
    generation: int | None,
) -> tuple[Condition, ...]:
    """Return the conditions with one of them set, ordered by type.

    ``lastTransitionTime`` moves only when ``status`` changes.
    """
    if isinstance(status, bool):
        status = Status.TRUE if status else Status.FALSE
    old = {c.type: c for c in conditions}
    prev = old.get(type_)
    since = prev.last_transition_time if prev is not None and prev.status == status else now
    old[type_] = Condition(
        type=type_,
        status=status,
        observed_generation=generation,
        last_transition_time=since,
        reason=reason,
        message=message,
    )
    return tuple(old[k] for k in sorted(old))


def get(conditions: Iterable[Condition], type_: str) -> Condition | None:
    for c in conditions:
        if c.type == type_:
            return c
    return None
