"""History reads are paced so that they never take the CPU that Reports need.

Pages come from cached wire bytes (``history.py``), so serving one costs the interpreter almost
nothing - but sending megabytes a second still costs the server's CPU in grpc's core and in the
kernel, and a 2-CPU machine's regulator has one CPU or less. Measured without pacing
(``python -m bench.history_readers``): 4 readers pulled 2.6 million steps/s (~180 MB/s) and
another job's Report p90 went from 0.70 to 2.95 ms (4.2x). So history reads are

- *bounded*: at most ``max_readers`` paged reads at once; one more is refused at once with
  RESOURCE_EXHAUSTED and the ``inforeg-retry-after-ms`` trailing-metadata key (``RetryLater``),
  which the client library treats like a shed call (retried with backoff within the call's deadline). A refused read holds no thread,
  so readers can never fill the worker pool that Reports need;
- *paced*: a token bucket of ``rate`` bytes/s with a ``burst`` (a small history is read at once);
  a page beyond it waits, inside its slot, until the bucket has paid for it.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from ..errors import RetryLater

# How a refused read's message starts (for people and logs; clients decide on the metadata key).
HISTORY_BUSY = "history reads busy"


class HistoryBusy(RetryLater):
    """Every history-read slot is taken: retry after a backoff (nothing happened)."""


class ReadPacer:
    def __init__(
        self,
        rate: int,
        max_readers: int,
        burst: int = 4 << 20,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """``rate``: bytes/s (0 = unpaced); ``max_readers``: paged reads at once (0 = unbounded).
        ``clock``/``sleep`` are injectable so the arithmetic is testable without waiting."""
        if rate < 0 or max_readers < 0 or burst < 0:
            raise ValueError("rate, max_readers and burst must be >= 0")
        self.rate, self.max_readers, self.burst = rate, max_readers, burst
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self._active = 0
        # bytes are paid for up to this time; the bucket holds (clock - this) * rate of credit,
        # at most ``burst``: it starts full
        self._paid_until = clock() - (burst / rate if rate else 0.0)

    @property
    def active(self) -> int:
        """Reads holding a slot now."""
        return self._active

    @contextmanager
    def slot(self) -> Iterator[None]:
        """One paged read; ``HistoryBusy`` at once if ``max_readers`` are in progress."""
        with self._lock:
            if self.max_readers and self._active >= self.max_readers:
                raise HistoryBusy(
                    f"{HISTORY_BUSY}: {self._active} paged history reads in progress "
                    f"(serve --max-history-readers {self.max_readers}); retry after a pause"
                )
            self._active += 1
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1

    def delay(self, nbytes: int) -> float:
        """Charges ``nbytes`` to the bucket; the seconds to wait before sending them."""
        if not self.rate:
            return 0.0
        with self._lock:
            now = self._clock()
            # the bucket holds at most ``burst`` bytes of credit
            start = max(self._paid_until, now - self.burst / self.rate)
            self._paid_until = start + nbytes / self.rate
            return max(0.0, self._paid_until - now)

    def pace(self, nbytes: int) -> None:
        wait = self.delay(nbytes)
        if wait > 0:
            self._sleep(wait)
