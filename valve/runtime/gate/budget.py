"""Smaller offline steps near online (``RuntimeSpec.near_online``), applied by the offline engine between steps.

The gate bounds how many gated sub-layers are queued when online arrives, not how long each one runs: an engine
stepping 8,192 tokens queues long kernels. While online is active, and for a window after the arbiter last
reopened the gate (bursts come in clusters), the engine's step token budget drops to the published one, so a
request arriving then finds shorter offline kernels ahead of it. The arbiter publishes the window and the budget
in the control block; a block without them (0) leaves the engine as it is.
"""

from __future__ import annotations

import time

from valve.runtime.control import GATE_OPEN, ControlBlock


def step_budget(gate_open: bool, reopen_ns: int, now: int, window_ns: int, near_tokens: int, full: int) -> int:
    """The offline step's token budget: ``near_tokens`` while the gate is closed or reopened less than
    ``window_ns`` ago, else ``full``. A zero window or budget is off."""
    if window_ns <= 0 or near_tokens <= 0:
        return full
    if not gate_open or now - reopen_ns < window_ns:
        return min(full, near_tokens)
    return full


class NearOnlineBudget:
    """An engine step hook: sets ``scheduler.max_batch_tokens`` before each step (``small_steps`` counts the
    steps it shrank). A bad control block leaves the full budget."""

    def __init__(self, scheduler, cb: ControlBlock, clock=time.monotonic_ns) -> None:
        self.scheduler, self.cb, self.clock = scheduler, cb, clock
        self.full = scheduler.max_batch_tokens
        self.small_steps = 0

    def __call__(self, engine=None) -> None:
        budget = self.full
        if self.cb.healthy():
            f = self.cb.fields
            budget = step_budget(f.gate == GATE_OPEN, int(f.reopen_ns), self.clock(), int(f.near_online_ns),
                                 int(f.near_online_tokens), self.full)
        self.scheduler.max_batch_tokens = budget
        self.small_steps += budget < self.full
