"""Polling for tests against real, asynchronous systems (controllers, scrapes).

A test waits for a condition with a deadline instead of sleeping a fixed time: fast when
the system is fast, patient when a 2-core CI machine is slow, and the failure message says
what was last seen.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def eventually(
    probe: Callable[[], T],
    timeout: float = 60.0,
    interval: float = 0.25,
    what: str = "the condition",
) -> T:
    """Call ``probe`` until it returns a truthy value and return that value.

    Args:
        probe: returns the observed value (falsy: not yet). An ``AssertionError`` raised by
            it also means "not yet", so a probe may use plain asserts.
        timeout: seconds before giving up.
        interval: seconds between calls.
        what: described in the failure message.

    Raises:
        AssertionError: on timeout, with the last value or assertion message.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = probe()
            if value:
                return value
            last = value
        except AssertionError as exc:
            last = f"AssertionError: {exc}"
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; "
                                 f"last seen: {last!r}")
        time.sleep(interval)
