"""Window bounds: where rolling and calendar windows start and end, in UTC and across DST.

Covers:
- calendar Day, Week and Month bounds in UTC, Europe/Berlin and
  America/New_York, including the days the clocks change (a Day on the
  spring-forward date is 23 hours long, on the autumn date 25 hours);
- Month boundaries, December to January included, and a UTC instant that is
  already next month in Berlin; a leap February;
- ``range_seconds``: the PromQL range from the window start to now, rounded up;
- rolling windows: end at now, same for every zone, no reset time;
- ``WindowKey`` naming, naive datetimes read as UTC, unknown zones refused;
- laws (hypothesis): a calendar window contains now, and windows tile time
  (each ends where the next begins).
"""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from token_budget.policy import windows
from token_budget.policy.windows import WindowKey

UTC = dt.UTC


def at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).astimezone(UTC)


def _hours(bounds: tuple[dt.datetime, dt.datetime]) -> float:
    return (bounds[1] - bounds[0]).total_seconds() / 3600


@pytest.mark.parametrize(
    ("window", "zone", "now", "start", "end"),
    [
        # UTC
        pytest.param("Day", "UTC", "2025-11-20T12:00:00Z", "2025-11-20T00:00:00Z",
                     "2025-11-21T00:00:00Z", id="a UTC day runs midnight to midnight"),
        pytest.param("Week", "UTC", "2025-11-20T12:00:00Z", "2025-11-17T00:00:00Z",
                     "2025-11-24T00:00:00Z", id="a UTC week starts on Monday"),
        pytest.param("Week", "UTC", "2025-11-23T23:59:59Z", "2025-11-17T00:00:00Z",
                     "2025-11-24T00:00:00Z", id="Sunday night still belongs to the week"),
        pytest.param("Month", "UTC", "2025-11-20T12:00:00Z", "2025-11-01T00:00:00Z",
                     "2025-12-01T00:00:00Z", id="a UTC month runs from the first"),
        pytest.param("Month", "UTC", "2025-12-15T08:00:00Z", "2025-12-01T00:00:00Z",
                     "2026-01-01T00:00:00Z", id="December ends on the first of January"),
        pytest.param("Month", "UTC", "2024-02-29T12:00:00Z", "2024-02-01T00:00:00Z",
                     "2024-03-01T00:00:00Z", id="a leap February has 29 days"),
        pytest.param("Day", "UTC", "2025-11-20T00:00:00Z", "2025-11-20T00:00:00Z",
                     "2025-11-21T00:00:00Z", id="midnight starts the new day"),
        # Europe/Berlin
        pytest.param("Day", "Europe/Berlin", "2025-11-20T12:00:00Z", "2025-11-19T23:00:00Z",
                     "2025-11-20T23:00:00Z", id="a Berlin winter day starts at 23:00 UTC"),
        pytest.param("Day", "Europe/Berlin", "2025-07-01T12:00:00Z", "2025-06-30T22:00:00Z",
                     "2025-07-01T22:00:00Z", id="a Berlin summer day starts at 22:00 UTC"),
        pytest.param("Day", "Europe/Berlin", "2025-03-30T12:00:00Z", "2025-03-29T23:00:00Z",
                     "2025-03-30T22:00:00Z", id="the Berlin spring-forward day is 23 hours"),
        pytest.param("Day", "Europe/Berlin", "2025-10-26T12:00:00Z", "2025-10-25T22:00:00Z",
                     "2025-10-26T23:00:00Z", id="the Berlin autumn day is 25 hours"),
        pytest.param("Week", "Europe/Berlin", "2025-03-30T12:00:00Z", "2025-03-23T23:00:00Z",
                     "2025-03-30T22:00:00Z", id="the Berlin week of the clock change is 167 hours"),
        pytest.param("Month", "Europe/Berlin", "2025-03-15T12:00:00Z", "2025-02-28T23:00:00Z",
                     "2025-03-31T22:00:00Z", id="a Berlin March starts in winter, ends in summer"),
        pytest.param("Month", "Europe/Berlin", "2025-12-31T23:30:00Z", "2025-12-31T23:00:00Z",
                     "2026-01-31T23:00:00Z", id="New Year's Eve 23:30 UTC is January in Berlin"),
        pytest.param("Month", "Europe/Berlin", "2025-12-31T22:59:59Z", "2025-11-30T23:00:00Z",
                     "2025-12-31T23:00:00Z", id="a second before is still December in Berlin"),
        pytest.param("Day", "America/Sao_Paulo", "2018-11-04T12:00:00Z", "2018-11-04T03:00:00Z",
                     "2018-11-05T02:00:00Z",
                     id="a day whose midnight never happened starts at its first local instant"),
        # America/New_York
        pytest.param("Day", "America/New_York", "2025-03-09T12:00:00Z", "2025-03-09T05:00:00Z",
                     "2025-03-10T04:00:00Z", id="the New York spring-forward day is 23 hours"),
        pytest.param("Day", "America/New_York", "2025-11-02T12:00:00Z", "2025-11-02T04:00:00Z",
                     "2025-11-03T05:00:00Z", id="the New York autumn day is 25 hours"),
        pytest.param("Day", "America/New_York", "2025-11-20T03:00:00Z", "2025-11-19T05:00:00Z",
                     "2025-11-20T05:00:00Z", id="3 a.m. UTC is still yesterday in New York"),
        pytest.param("Month", "America/New_York", "2025-11-01T02:00:00Z",
                     "2025-10-01T04:00:00Z", "2025-11-01T04:00:00Z",
                     id="early November in UTC is still October in New York"),
        pytest.param("Week", "America/New_York", "2025-11-03T12:00:00Z", "2025-11-03T05:00:00Z",
                     "2025-11-10T05:00:00Z", id="a New York week starts Monday, Eastern time"),
    ],
)
def test_calendar_window_bounds(window: str, zone: str, now: str, start: str, end: str) -> None:
    assert windows.bounds(WindowKey(window, zone), at(now)) == (at(start), at(end))


@pytest.mark.parametrize(
    ("zone", "spring", "autumn"),
    [
        pytest.param("Europe/Berlin", "2025-03-30T10:00:00Z", "2025-10-26T10:00:00Z", id="Berlin"),
        pytest.param("America/New_York", "2025-03-09T15:00:00Z", "2025-11-02T15:00:00Z",
                     id="New York"),
    ],
)
def test_a_day_is_23_hours_in_spring_and_25_in_autumn(zone: str, spring: str, autumn: str
                                                      ) -> None:
    assert _hours(windows.bounds(WindowKey("Day", zone), at(spring))) == 23
    assert _hours(windows.bounds(WindowKey("Day", zone), at(autumn))) == 25
    assert _hours(windows.bounds(WindowKey("Day", "UTC"), at(spring))) == 24


@pytest.mark.parametrize(
    ("key", "now", "seconds"),
    [
        pytest.param(WindowKey("24h"), "2025-11-20T12:00:00Z", 86400, id="a rolling day"),
        pytest.param(WindowKey("30m"), "2025-11-20T12:00:00Z", 1800, id="rolling minutes"),
        pytest.param(WindowKey("Day"), "2025-11-20T12:00:00Z", 12 * 3600,
                     id="a calendar day at noon is 12 hours old"),
        pytest.param(WindowKey("Month", "Europe/Berlin"), "2025-11-20T12:00:00Z",
                     19 * 86400 + 13 * 3600, id="a Berlin month since 31 October 23:00 UTC"),
        pytest.param(WindowKey("Day"), "2025-11-20T00:00:00.500000Z", 1,
                     id="half a second is rounded up"),
        pytest.param(WindowKey("Day"), "2025-11-20T00:00:01.200000Z", 2,
                     id="fractions of a second are rounded up"),
        pytest.param(WindowKey("Day"), "2025-11-20T00:00:00Z", 1,
                     id="the first instant of a window still asks for one second"),
    ],
)
def test_range_seconds_reaches_back_to_the_window_start(key: WindowKey, now: str,
                                                        seconds: int) -> None:
    assert windows.range_seconds(key, at(now)) == seconds


def test_a_rolling_window_ends_now_and_never_resets() -> None:
    now = at("2025-11-20T12:34:56Z")
    key = WindowKey("7d")
    assert windows.bounds(key, now) == (now - dt.timedelta(days=7), now)
    assert windows.resets_at(key, now) is None
    assert not key.is_calendar


def test_a_calendar_window_resets_at_its_end() -> None:
    now = at("2025-11-20T12:00:00Z")
    key = WindowKey("Month", "Europe/Berlin")
    assert windows.resets_at(key, now) == at("2025-11-30T23:00:00Z")
    assert key.is_calendar


@pytest.mark.parametrize(
    ("window", "zone", "expected", "text"),
    [
        pytest.param("24h", "Europe/Berlin", WindowKey("24h", "UTC"), "24h",
                     id="a rolling window is the same in every zone"),
        pytest.param("Month", "Europe/Berlin", WindowKey("Month", "Europe/Berlin"),
                     "Month@Europe/Berlin", id="a calendar window keeps its zone"),
        pytest.param("Day", "UTC", WindowKey("Day", "UTC"), "Day@UTC", id="a UTC calendar day"),
    ],
)
def test_window_keys_group_what_one_query_can_serve(window: str, zone: str, expected: WindowKey,
                                                    text: str) -> None:
    assert WindowKey.of(window, zone) == expected
    assert str(expected) == text


def test_a_naive_time_is_taken_as_utc() -> None:
    key = WindowKey("Day", "Europe/Berlin")
    naive = dt.datetime(2025, 11, 20, 12, 0)
    assert windows.bounds(key, naive) == windows.bounds(key, naive.replace(tzinfo=UTC))


def test_an_unknown_time_zone_is_refused_with_its_name() -> None:
    with pytest.raises(ValueError, match="'Mars/Olympus_Mons' is not a known IANA time zone"):
        windows.bounds(WindowKey("Day", "Mars/Olympus_Mons"), at("2025-11-20T12:00:00Z"))


# ---------------------------------------------------------------------------
# Laws
# ---------------------------------------------------------------------------

instants = st.datetimes(min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2099, 12, 31),
                        timezones=st.just(UTC))
calendar_keys = st.builds(
    WindowKey,
    st.sampled_from(["Day", "Week", "Month"]),
    st.sampled_from(["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe",
                     "Asia/Kolkata", "Pacific/Chatham", "America/Sao_Paulo",
                     "America/Santiago", "America/Havana", "Asia/Beirut"]),
)


@settings(max_examples=200, deadline=None)
@given(key=calendar_keys, now=instants)
def test_a_calendar_window_contains_now_and_tiles_time(key: WindowKey, now: dt.datetime) -> None:
    start, end = windows.bounds(key, now)
    assert start <= now < end
    assert windows.bounds(key, start) == (start, end)  # its own start is inside it
    assert windows.bounds(key, end)[0] == end  # the next one begins where it ends
    assert 1 <= windows.range_seconds(key, now) <= (end - start).total_seconds() + 1
