"""Wall time for the real backend: the driver's waits become real sleeps."""
from __future__ import annotations

import time

from hal.api import Clock


class RealClock(Clock):
    """Monotonic nanoseconds; ``sleep`` blocks the calling thread."""

    def now_ns(self) -> int:
        return time.monotonic_ns()

    def sleep(self, ns: int) -> None:
        if ns > 0:
            time.sleep(ns / 1e9)
