"""A session's closed epochs: the newest few in memory, the older ones spilled to the store.

The policy reads every closed epoch's Fisher traces, so those stay in memory for all of them
(8 bytes a value in an ``array``); the rest of an epoch (scores, windows, counts) is durable in
the store once closed, so an open session under ``--memory-budget`` keeps only its newest and
reads older ones back when a GetSession, a late rank or a resume asks for them.
"""

from __future__ import annotations

import sys
from array import array
from typing import Callable, Optional, Sequence

from ..model import EpochSummary

# (first, last) -> the closed epochs numbered first..last from the store (``ClosedEpochs.spill``)
EpochSource = Callable[[int, int], Sequence[EpochSummary]]


class ClosedEpochs:
    """Closed epochs ``0 .. count - 1``: ``spilled`` of them only in the store, the rest in memory."""

    def __init__(self, epochs: Sequence[EpochSummary], modalities: int) -> None:
        self._kept: list[EpochSummary] = list(epochs)
        self._spilled = 0  # epochs before ``_kept[0]``, dropped from memory: ``_source`` reads them
        self._source: Optional[EpochSource] = None
        self._traces: list[array] = [array("d", [e.fisher[m] for e in epochs]) for m in range(modalities)]

    def all(self) -> tuple[EpochSummary, ...]:
        """Every closed epoch, the spilled ones read back from the store."""
        spilled = self._source(0, self._spilled - 1) if self._spilled and self._source is not None else ()
        return (*spilled, *self._kept)

    def kept(self) -> tuple[int, tuple[EpochSummary, ...]]:
        """(how many were spilled, the closed epochs in memory)."""
        return self._spilled, tuple(self._kept)

    def get(self, epoch: int) -> EpochSummary:
        """Closed epoch ``epoch``, from memory or, spilled, from the store."""
        if epoch >= self._spilled:
            return self._kept[epoch - self._spilled]
        assert self._source is not None
        return self._source(epoch, epoch)[0]

    def last(self) -> Optional[EpochSummary]:
        kept = self._kept
        return kept[-1] if kept else None

    @property
    def count(self) -> int:
        return self._spilled + len(self._kept)

    @property
    def kept_count(self) -> int:
        return len(self._kept)

    def trace_bytes(self) -> int:
        """What the Fisher traces the policy reads take (they grow with the closed epochs)."""
        return sys.getsizeof(self._traces) + sum(sys.getsizeof(t) for t in self._traces)

    def traces_with(self, fisher: Sequence[float]) -> list[array]:
        """The traces as they would be with one more closed epoch of ``fisher`` (for planning)."""
        return [tr + array("d", (f,)) for tr, f in zip(self._traces, fisher)]

    def append(self, closed: EpochSummary) -> None:
        self._kept.append(closed)
        for tr, f in zip(self._traces, closed.fisher):
            tr.append(f)

    def spill(self, keep: int, source: EpochSource) -> int:
        """Drops all but the ``keep`` newest from memory (the store has them all; ``source`` reads
        them back); returns how many went. The newest stays: the metrics read it."""
        self._source = source
        drop = len(self._kept) - max(keep, 1)
        if drop <= 0:
            return 0
        del self._kept[:drop]
        self._spilled += drop
        return drop
