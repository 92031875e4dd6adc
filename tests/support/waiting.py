"""Small helpers shared by test files (on sys.path through pytest's pythonpath setting)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def until(check: Callable[[], T], what: str, timeout: float = 60.0, poll: float = 0.01) -> T:
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout` seconds. The timeout
    bounds a wait on a condition: it is not a timing assertion, so it is generous for loaded CI machines."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)
