"""A background thread that owns an ``Engine`` and streams tokens to asyncio consumers."""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("valve.engine")

FINISH = object()  # end-of-stream marker put after a request's last token


@dataclass
class Submission:
    req_id: str
    prompt: list[int]
    max_tokens: int
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    submitted: float = 0.0  # perf_counter at submit
    admitted: object = None  # StepTiming of the step that first scheduled it (engine.timing on)
    first: object = None  # StepTiming of the step that sampled its first token


class EngineWorker:
    """Runs ``engine.step()`` in a loop on its own thread; requests come in through ``submit``."""

    def __init__(self, engine, name: str = "engine") -> None:
        self.engine = engine
        self._inbox: queue.Queue = queue.Queue()
        self._subs: dict[str, Submission] = {}
        self._cancelled: set[str] = set()
        self._stop = threading.Event()
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.error: BaseException | None = None
        self.on_idle = None  # called when the engine has nothing to do (e.g. to re-calibrate the device clock)
        self.before_step = None  # called before each step (e.g. to map memory the queued requests need)

    def start(self) -> EngineWorker:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(None)
        self._thread.join(timeout)

    def submit(self, prompt: list[int], max_tokens: int) -> Submission:
        """Queue a request (call from the event loop). Tokens arrive on ``sub.out``, then ``FINISH``."""
        if self.error is not None:
            raise RuntimeError(f"engine failed: {self.error}")
        sub = Submission(f"req-{next(self._ids)}", list(prompt), max_tokens, asyncio.get_running_loop(),
                         asyncio.Queue(), time.perf_counter())
        self._inbox.put(sub)
        return sub

    def cancel(self, req_id: str) -> None:
        self._inbox.put(("cancel", req_id))

    def _deliver(self, sub: Submission, item) -> None:
        sub.loop.call_soon_threadsafe(sub.out.put_nowait, item)

    def _take(self, item) -> None:
        if item is None:
            return
        if isinstance(item, tuple):
            _, req_id = item
            sub = self._subs.pop(req_id, None)
            if sub is not None:
                self._cancelled.add(req_id)
            return
        try:
            self.engine.add_request(item.req_id, item.prompt, item.max_tokens)
        except ValueError as e:
            self._deliver(item, e)
            self._deliver(item, FINISH)
            return
        self._subs[item.req_id] = item

    def _run(self) -> None:
        eng = self.engine
        try:
            while not self._stop.is_set():
                block = not eng.has_work()
                try:
                    self._take(self._inbox.get(block=block, timeout=0.5 if block else None))
                    while True:
                        self._take(self._inbox.get_nowait())
                except queue.Empty:
                    pass
                for req_id in list(self._cancelled):
                    self._cancelled.discard(req_id)
                    for seq in list(eng.scheduler.running) + list(eng.scheduler.waiting):
                        if seq.req_id == req_id:
                            eng.scheduler.finish(seq)
                if not eng.has_work():
                    if self.on_idle is not None:
                        self.on_idle()
                    continue
                if self.before_step is not None:
                    self.before_step()
                res = eng.step()
                for req_id in res.scheduled:
                    sub = self._subs.get(req_id)
                    if sub is not None and sub.admitted is None:
                        sub.admitted = res.timing
                for seq, tok in res.tokens:
                    sub = self._subs.get(seq.req_id)
                    if sub is not None:
                        if sub.first is None:
                            sub.first = res.timing
                        self._deliver(sub, tok)
                for seq in res.finished:
                    sub = self._subs.pop(seq.req_id, None)
                    if sub is not None:
                        self._deliver(sub, FINISH)
        except BaseException as e:  # surface to every waiting client instead of hanging them
            log.exception("engine thread failed")
            self.error = e
            for sub in self._subs.values():
                self._deliver(sub, RuntimeError(f"engine failed: {e}"))
                self._deliver(sub, FINISH)
