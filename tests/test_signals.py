"""valve/signals.py: a signal sets the stop Event even when it lands while the main thread holds the Event's lock."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from valve.signals import stop_on_signals


@pytest.mark.timeout(30)
def test_a_signal_while_the_events_lock_is_held_does_not_deadlock():
    stop = threading.Event()
    old = signal.getsignal(signal.SIGUSR1)
    try:
        stop_on_signals(stop, (signal.SIGUSR1,))
        # where `stop.wait` holds it for a few bytecodes: a handler calling stop.set() here would wait for ever
        with stop._cond:
            os.kill(os.getpid(), signal.SIGUSR1)
            for _ in range(1000):  # the handler runs between these bytecodes, in this thread
                pass
            assert not stop.is_set()
        assert stop.wait(10)  # set by the handler's thread once the lock is free
    finally:
        signal.signal(signal.SIGUSR1, old)


@pytest.mark.timeout(30)
def test_on_signal_is_told_which_signal():
    stop, seen = threading.Event(), []
    old = signal.getsignal(signal.SIGUSR2)
    try:
        stop_on_signals(stop, (signal.SIGUSR2,), on_signal=seen.append)
        os.kill(os.getpid(), signal.SIGUSR2)
        deadline = time.monotonic() + 10
        while not stop.is_set() and time.monotonic() < deadline:
            stop.wait(0.01)
        assert stop.is_set() and seen == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, old)
