"""The server's memory budget (``serve --memory-budget``): what its caches hold, against one limit.

Three parts are accounted: ``sessions`` (each session in memory: its configuration, policy and
epoch summaries; open ones cannot be dropped, inactive ones can, they are re-read on demand),
``answers`` (each session's cache of recent answers, for duplicate reports of other ranks; all
but a few per session can be dropped, the store has them all) and ``history`` (encoded history
pages; all can be dropped). When the total would pass the limit, evictors free what can be freed,
history first; only when that is not enough is a new session refused (RESOURCE_EXHAUSTED).

Sizes are estimates, not measurements of the heap: ``deep_size`` of representative objects built
once per modality count, and a session's own size measured on a session of its profile
(``core/accounting.py``); ``tests/test_memory_budget.py`` checks them against tracemalloc. The
process itself (interpreter, gRPC, metrics: about 100 MB) is not part of the budget.
"""

from __future__ import annotations

import functools
import sys
import threading
from collections import OrderedDict
from typing import Any, Callable, Optional

PARTS = ("sessions", "answers", "history")
MIB = 1 << 20
DEFAULT_BUDGET = 256 * MIB  # fits the sidecar's 512 MiB limit with the process's ~100 MB beside it
ANSWER_FLOOR = 8  # cached answers a session keeps under pressure (DDP ranks' duplicates)
HEADROOM = 0.9  # evict down to this fraction of the limit, so that eviction is not per request

Evictor = Callable[[int], int]  # (bytes wanted) -> bytes freed


def parse_bytes(text: str) -> int:
    """'512Mi', '1G', '300M', '1048576' -> bytes (Kubernetes' quantity suffixes)."""
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    s = str(text).strip()
    for suffix in sorted(units, key=len, reverse=True):
        if s.endswith(suffix):
            number, factor = s[: -len(suffix)], units[suffix]
            break
    else:
        number, factor = s, 1
    try:
        value = float(number) * factor
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use e.g. 512Mi, 1Gi or a number of bytes)") from None
    if value <= 0:
        raise ValueError(f"a size must be > 0, got {text!r}")
    return int(value)


def deep_size(obj: Any, seen: Optional[set[int]] = None) -> int:
    """Bytes of ``obj`` and what it owns (containers, dataclass fields), each object once."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, (str, bytes, int, float, bool, type(None))):
        return size
    if isinstance(obj, dict):
        return size + sum(deep_size(k, seen) + deep_size(v, seen) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return size + sum(deep_size(x, seen) for x in obj)
    fields = getattr(obj, "__dict__", None)
    if fields is not None:
        size += deep_size(fields, seen)
    for name in getattr(type(obj), "__slots__", ()):
        if hasattr(obj, name):
            size += deep_size(getattr(obj, name), seen)
    return size


@functools.lru_cache(maxsize=256)
def answer_bytes(modalities: int) -> int:
    """One cached answer: a StepRecord with its tuples and floats, and its cache entry."""
    from ..model import Fallback, StepRecord

    def floats(k: int) -> tuple[float, ...]:
        return tuple(0.1 + i + k * 1000 for i in range(modalities))

    record = StepRecord(
        epoch=12345, step=1234567, count=64, score_sums=floats(1), fishers=floats(2), proximal=floats(3),
        fallback=Fallback.NONE, digest=bytes(16), grad_scale=floats(4), noise_scale=floats(5),
    )
    entry = OrderedDict([(1234567, record)])
    return deep_size(record) + sys.getsizeof(entry) // 2 + sys.getsizeof(1234567)


@functools.lru_cache(maxsize=256)
def epoch_bytes(modalities: int) -> int:
    """One epoch summary (closed epochs stay with their session) and its trace entries."""
    from ..model import EpochSummary
    from ..policy import Window

    windows = tuple(Window(open=True, growth=0.5 + i) for i in range(modalities))
    e = EpochSummary.start(12345, windows)
    return deep_size(e) + modalities * (sys.getsizeof(0.5) + 8)


class MemoryBudget:
    """Thread-safe byte counts per part, against ``limit``; evictors free memory on demand."""

    def __init__(self, limit: int = DEFAULT_BUDGET) -> None:
        if limit <= 0:
            raise ValueError(f"the memory budget must be > 0, got {limit}")
        self.limit = limit
        self._lock = threading.Lock()
        self._used = dict.fromkeys(PARTS, 0)
        self._total = 0
        self._evictors: list[Evictor] = []
        self._evicting = threading.Lock()

    def add_evictor(self, evictor: Evictor) -> None:
        """Evictors are asked in the order they were added (cheapest loss first)."""
        self._evictors.append(evictor)

    def add(self, part: str, delta: int) -> None:
        with self._lock:
            self._used[part] += delta
            self._total += delta

    def used(self, part: Optional[str] = None) -> int:
        if part is None:
            return self._total
        with self._lock:
            return self._used[part]

    def over(self) -> bool:
        """Past the limit (a lock-free read: the hot path asks after every Report)."""
        return self._total > self.limit

    def fits(self, more: int = 0) -> bool:
        return self.used() + more <= self.limit

    def make_room(self, more: int = 0) -> bool:
        """Evicts until ``more`` bytes fit (down to ``HEADROOM`` of the limit if it must evict);
        True if they fit. One evicting thread at a time; others see the result."""
        if self.fits(more):
            return True
        with self._evicting:
            target = int(self.limit * HEADROOM) - more
            for evict in self._evictors:
                excess = self.used() - target
                if excess <= 0:
                    break
                evict(excess)
        return self.fits(more)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._used)
