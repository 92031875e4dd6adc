"""Stopping a process on SIGTERM/SIGINT through a threading.Event. Standard library only."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterable


def stop_on_signals(stop: threading.Event, signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT),
                    on_signal: Callable[[int], None] | None = None) -> None:
    """Set ``stop`` when one of ``signals`` arrives. Not from the handler itself: it runs in the main thread,
    which may hold the Event's own lock at that instant (inside ``stop.wait``), and ``stop.set()`` would then wait
    for it for ever; a short thread sets it once the main thread lets go (seen as an arbiter that ignored SIGTERM
    under CPU load)."""

    def handler(signum, frame) -> None:
        if on_signal is not None:
            on_signal(signum)
        threading.Thread(target=stop.set, name="stop-on-signal", daemon=True).start()

    for sig in signals:
        signal.signal(sig, handler)
