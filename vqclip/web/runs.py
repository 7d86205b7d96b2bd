"""A generation or an animation running in a worker thread while a page watches it.

The library's loop reports through its ``callback`` and stops on ``KeyboardInterrupt``, keeping
what it made (as Ctrl-C does on the command line). :class:`Run` uses both: the callback keeps
the newest update for the page to read when it is ready (the page is never a step's bottleneck,
and updates it misses are simply superseded), and :meth:`Run.stop` makes the next callback raise
``KeyboardInterrupt``. Nothing here knows about the web framework.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

__all__ = ["Progress", "Run"]


@dataclass
class Progress:
    """What the page shows while a run goes on: the newest update and the losses so far."""

    done: int = 0  # steps (or frames) finished
    total: int = 0
    first: int = 0  # those done before this run started (a run gone on with)
    update: dict[str, Any] | None = None  # the callback's newest payload
    losses: list[tuple[int, int, float]] = field(default_factory=list)  # (step, candidate, loss)
    started: float = field(default_factory=time.perf_counter)
    version: int = 0  # bumped by each callback

    @property
    def seconds_left(self) -> float | None:
        if self.done <= self.first:  # none done yet by this run
            return None
        if self.done >= self.total:
            return 0.0
        return ((time.perf_counter() - self.started) / (self.done - self.first)
                * (self.total - self.done))


class Run:
    """``work(callback)`` in a daemon thread, with :meth:`watch` to follow it and :meth:`stop`.

    Args:
        work: runs the library call with the callback it is given; its return value, or the
            exception it raised, is the run's outcome.
        total: steps (or frames) in all, for the time left.
        done: those already done when it starts (a run gone on with); ``before``: their losses.
        losses: reads ``(candidate, loss)`` pairs out of a callback's payload, for the curve.
    """

    def __init__(self, work: Callable[[Callable], Any], total: int, done: int = 0,
                 losses: Callable[[dict], list[tuple[int, float]]] = lambda info: [],
                 before: list[tuple[int, int, float]] = ()):
        self.progress = Progress(done=done, total=total, first=done, losses=list(before))
        self.outcome: Any = None
        self.error: BaseException | None = None
        self._work, self._losses = work, losses
        self._stop = threading.Event()
        self._ended = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._main, name="vqclip-run", daemon=True)
        self._thread.start()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        """Ask the run to end after the step under way; what it made is kept."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the run to end; True if it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def watch(self, every: float = 0.3) -> Iterator[Progress]:
        """Yield the progress whenever a new update came, at most every ``every`` seconds, until
        the run ends (then :attr:`outcome` or :attr:`error` is set)."""
        seen = -1
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self.progress.version != seen or not self.running,
                                       timeout=every)
            if not self.running:
                return
            if self.progress.version != seen:
                seen = self.progress.version
                yield self.progress
                time.sleep(every)  # let a few steps pass between updates of the page

    @property
    def running(self) -> bool:
        return not self._ended

    def _callback(self, step: int, info: dict[str, Any]) -> None:
        p = self.progress
        with self._changed:
            p.done, p.update = step + 1, info
            p.losses.extend((step, k, loss) for k, loss in self._losses(info))
            p.version += 1
            self._changed.notify_all()
        if self._stop.is_set():
            raise KeyboardInterrupt  # the loop keeps what it made, as on Ctrl-C

    def _main(self) -> None:
        try:
            self.outcome = self._work(self._callback)
        except BaseException as e:  # handed to whoever watches: the thread itself never fails
            self.error = e
        finally:
            with self._changed:
                self._ended = True
                self._changed.notify_all()
