"""The project's exceptions. Adapters chain the library's error (``raise ... from exc``).

Library exception types (requests, prometheus_api_client, kubernetes) never
leave an adapter; handlers map these to kopf's temporary or permanent errors.
"""

from __future__ import annotations


class OperatorError(Exception):
    """Base of every error this project raises on purpose."""


class MetricsError(OperatorError):
    """Spend could not be read."""


class MetricsUnavailable(MetricsError):
    """Prometheus could not be reached (connection refused, timeout, DNS, TLS)."""


class QueryFailed(MetricsError):
    """Prometheus answered with an error (bad PromQL, 4xx/5xx, limits exceeded)."""


class InvalidValue(MetricsError):
    """A result held NaN or an infinite value, which no budget can be compared with."""


class EnforcementError(OperatorError):
    """A workload could not be changed."""


class Conflict(EnforcementError):
    """The object changed under us (409); retry with the fresh version."""


class Forbidden(EnforcementError):
    """RBAC does not allow the change (403)."""


class TargetNotFound(EnforcementError):
    """The workload is gone (404)."""


class NotLeader(OperatorError):
    """A write was refused: this replica does not hold the leader Lease (any more).

    Not an EnforcementError on purpose: it ends the whole evaluation instead of
    being counted as one workload's failure and retried on the next.
    """
