"""kopf's readiness gate for indexes, without its quadratic start.

With index handlers, kopf holds every object's handlers until every index is filled: its watchers add one toggle
per newly seen object to one `ToggleSet` and drop it once the object is indexed, and every worker waits on that
set. kopf's set re-evaluates all its toggles on each check and wakes every waiting worker on every add and drop:
O(N^2) for N objects seen at once (an operator restarted next to thousands of pods spent most of its CPU there,
and its pod index lagged). `CountingToggleSet` keeps the same meaning (any/all of its toggles, toggles turned on
and off) with a count of the toggles that are on, and wakes the waiters only when the set's own state flips.

This replaces a class in kopf's private modules (`kopf._cogs.aiokits.aiotoggles`), for the kopf versions whose
class has the shape it expects; `install` leaves any other kopf as it is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

KNOWN = ("_condition", "_toggles", "_fn")  # kopf's ToggleSet attributes this relies on


def _toggles_module() -> Any:
    try:
        from kopf._cogs.aiokits import aiotoggles
    except ImportError:
        return None
    probe = aiotoggles.ToggleSet(all)
    if not all(hasattr(probe, a) for a in KNOWN) or not hasattr(aiotoggles.Toggle, "turn_to"):
        return None
    return aiotoggles


def install() -> bool:
    """Use the counting set in kopf (idempotent). False where this kopf's classes are not the expected ones."""
    aiotoggles = _toggles_module()
    if aiotoggles is None:
        return False
    if getattr(aiotoggles.ToggleSet, "valve_counting", False):
        return True
    base_set, base_toggle = aiotoggles.ToggleSet, aiotoggles.Toggle

    class CountedToggle(base_toggle):  # type: ignore[misc, valid-type]
        """A toggle of a counting set: turning it tells the set."""

        def __init__(self, state: bool, *, name: str | None, condition: asyncio.Condition, owner: Any) -> None:
            super().__init__(state, name=name, condition=condition)
            self._owner = owner

        async def turn_to(self, state: bool) -> None:
            async with self._condition:
                if bool(state) != self._state and self in self._owner._toggles:
                    self._owner._on += 1 if state else -1
                self._state = bool(state)
                self._condition.notify_all()  # rare (peering pauses); waiters on this toggle too

    class CountingToggleSet(base_set):  # type: ignore[misc, valid-type]
        valve_counting = True

        def __init__(self, fn: Callable[[Iterable[bool]], bool]) -> None:
            super().__init__(fn)
            self._on = 0

        def is_on(self) -> bool:
            if self._fn is all:
                return self._on == len(self._toggles)
            if self._fn is any:
                return self._on > 0
            return super().is_on()

        async def make_toggle(self, __val: bool = False, *, name: str | None = None) -> Any:
            toggle = CountedToggle(bool(__val), name=name, condition=self._condition, owner=self)
            async with self._condition:
                before = self.is_on()
                self._toggles.add(toggle)
                self._on += toggle.is_on()
                if self.is_on() != before:
                    self._condition.notify_all()
            return toggle

        async def drop_toggle(self, toggle: Any) -> None:
            await self.drop_toggles([toggle])

        async def drop_toggles(self, toggles: Iterable[Any]) -> None:
            async with self._condition:
                before = self.is_on()
                for toggle in toggles:
                    if toggle in self._toggles:
                        self._toggles.discard(toggle)
                        self._on -= toggle.is_on()
                if self.is_on() != before:
                    self._condition.notify_all()

    aiotoggles.ToggleSet = CountingToggleSet
    return True
