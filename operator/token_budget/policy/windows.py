"""Where a window starts and ends, for rolling and calendar windows.

Calendar windows start at local midnight (Day), on Monday at midnight (Week) or
on the first of the month at midnight (Month) in the limit's time zone, and
honour daylight saving time: a Day in Europe/Berlin on the last Sunday of
March is 23 hours long. Pure: ``now`` is an argument.
"""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from token_budget.api.types import Calendar, parse_window, utc


@dataclass(frozen=True, order=True)
class WindowKey:
    """A window as the query planner groups it: ``24h`` or ``Month`` in a zone."""

    window: str
    time_zone: str = "UTC"
    #: Set only on a reading apart from the source's shared one: the labels it groups by,
    #: for budgets that need a label the recording rules do not keep (see the planner).
    labels: tuple[str, ...] = ()

    def __str__(self) -> str:
        if self.is_calendar:
            return f"{self.window}@{self.time_zone}"
        return self.window

    @property
    def is_calendar(self) -> bool:
        return isinstance(parse_window(self.window), Calendar)

    @staticmethod
    def of(window: str, time_zone: str) -> WindowKey:
        # Rolling windows are the same whatever the zone: one query serves them all.
        kind = parse_window(window)
        return WindowKey(window, time_zone if isinstance(kind, Calendar) else "UTC")


@functools.lru_cache(maxsize=256)
def zone(name: str) -> ZoneInfo:
    """The time zone; raises ValueError with a clear message for an unknown name."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"time zone {name!r} is not a known IANA time zone") from exc


def bounds(key: WindowKey, now: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    """The window's ``(start, end)`` in UTC; for rolling windows ``end`` is ``now``."""
    now = utc(now)
    kind = parse_window(key.window)
    if not isinstance(kind, Calendar):
        return now - dt.timedelta(seconds=kind), now
    tz = zone(key.time_zone)
    local = now.astimezone(tz)
    if kind is Calendar.DAY:
        start_date = local.date()
        end_date = start_date + dt.timedelta(days=1)
    elif kind is Calendar.WEEK:
        start_date = local.date() - dt.timedelta(days=local.weekday())
        end_date = start_date + dt.timedelta(days=7)
    else:
        start_date = local.date().replace(day=1)
        nxt = start_date.replace(day=28) + dt.timedelta(days=4)
        end_date = nxt.replace(day=1)
    start = dt.datetime.combine(start_date, dt.time(), tzinfo=tz).astimezone(dt.UTC)
    end = dt.datetime.combine(end_date, dt.time(), tzinfo=tz).astimezone(dt.UTC)
    return start, end


def range_seconds(key: WindowKey, now: dt.datetime) -> int:
    """Seconds from the window start to ``now``, rounded up (the PromQL range)."""
    start, _ = bounds(key, now)
    delta = utc(now) - start
    return max(1, int(-(-delta.total_seconds() // 1)))


def resets_at(key: WindowKey, now: dt.datetime) -> dt.datetime | None:
    """When spend in a calendar window falls back to zero; None for rolling windows."""
    if not key.is_calendar:
        return None
    return bounds(key, now)[1]
