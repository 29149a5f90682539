"""Per-worker circuit breakers with explicit states.

closed     requests flow; ``threshold`` consecutive failures open it
open       the worker is skipped for ``cooldown`` seconds
half_open  after the cooldown, exactly one trial request is let through; its success closes the
           breaker, its failure opens it again for another cooldown

Asking whether a worker is allowed never changes another worker's state: only the worker the
picker actually sends a request to claims the half-open trial (:meth:`Breakers.begin`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("router.breaker")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass
class _State:
    state: str = CLOSED
    failures: int = 0
    opened_at: float = 0.0
    trial_in_flight: bool = False


class Breakers:
    """The breakers of every worker a router replica talks to."""

    def __init__(self, threshold: int = 3, cooldown: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.threshold, self.cooldown, self.clock = threshold, cooldown, clock
        self._s: dict[str, _State] = {}

    def state(self, wid: str) -> str:
        """closed, open or half_open (an open breaker past its cooldown reads half_open)."""
        s = self._s.get(wid)
        if s is None:
            return CLOSED
        if s.state == OPEN and self.clock() - s.opened_at >= self.cooldown:
            return HALF_OPEN
        return s.state

    def allows(self, wid: str) -> bool:
        """Whether a request may go to ``wid`` now. Pure: it changes nothing."""
        st = self.state(wid)
        return st == CLOSED or (st == HALF_OPEN and not self._s[wid].trial_in_flight)

    def begin(self, wid: str) -> None:
        """A request is being sent to ``wid``: in half-open state it is the one trial."""
        s = self._s.get(wid)
        if s is not None and self.state(wid) == HALF_OPEN:
            s.state, s.trial_in_flight = HALF_OPEN, True

    def success(self, wid: str) -> None:
        s = self._s.pop(wid, None)
        if s is not None and s.state != CLOSED:
            log.info("circuit breaker closed for worker %s", wid)

    def failure(self, wid: str) -> None:
        s = self._s.setdefault(wid, _State())
        s.failures += 1
        if s.state == HALF_OPEN or (s.state == CLOSED and s.failures >= self.threshold):
            if s.state == CLOSED:
                log.warning("circuit breaker open for worker %s after %d failures", wid, s.failures)
            s.state, s.opened_at, s.trial_in_flight = OPEN, self.clock(), False

    def release(self, wid: str) -> None:
        """The request to ``wid`` ended with neither success nor failure (the client left): a
        half-open trial may be tried again."""
        s = self._s.get(wid)
        if s is not None and s.trial_in_flight:
            s.trial_in_flight = False

    def states(self) -> dict[str, int]:
        """1 per worker whose breaker is not closed (for the metrics gauge)."""
        return {wid: 1 for wid in self._s if self.state(wid) != CLOSED}

    def forget(self, keep: set[str]) -> None:
        """Drop the state of workers no longer registered."""
        for wid in [w for w in self._s if w not in keep]:
            del self._s[wid]
