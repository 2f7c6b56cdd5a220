"""A session's history as GetSession reads it: a snapshot of its header and epochs, then pages.

The pages come from the store through the cache of encoded blocks (``capacity/history.py``);
a session's history version is bumped when a recorded step is amended, so that cached pages of
the old record are never served. An open session keeps only its newest closed epochs in memory
(``accounting.py``): the snapshot says how many were spilled, and those are read from the store
in chunks and encoded into the same cache.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Sequence

from ..capacity.history import MAX_PAGE_BYTES, EpochLoader, HistoryPages, Loader, Page
from ..model import EpochSummary, SessionKey, SessionView, StepRecord
from .session import Session


@dataclass(frozen=True)
class HistorySnapshot:
    """A session's header and epochs at one instant, for a GetSession answer."""

    key: SessionKey
    view: SessionView
    epochs: tuple[EpochSummary, ...]  # the closed epochs in memory, then the open one
    version: int  # bumped when a recorded step is amended (cached pages are then stale)
    steps_pruned_ms: int
    spilled: int = 0  # closed epochs before ``epochs[0]``, read from the store


class SessionHistory:
    """History versions of the sessions and their page cache."""

    def __init__(self, pages: HistoryPages) -> None:
        self.pages = pages
        self._lock = threading.Lock()
        self._versions: dict[SessionKey, int] = {}  # history version of sessions with amended steps

    def amended(self, key: SessionKey) -> None:
        """A recorded step of ``key`` was replaced: its cached pages are stale."""
        with self._lock:
            self._versions[key] = self._versions.get(key, 0) + 1

    def snapshot(self, session: Session) -> HistorySnapshot:
        """Call with the session's lock held."""
        with self._lock:
            version = self._versions.get(session.key, 0)
        spilled, epochs = session.kept_epochs()
        return HistorySnapshot(session.key, session.view(), epochs, version, session.steps_pruned_ms, spilled)

    def page(
        self, snap: HistorySnapshot, start: int, max_steps: int, load: Loader, encode: Callable[[StepRecord], bytes],
        max_bytes: int = MAX_PAGE_BYTES,
    ) -> Page:
        return self.pages.page(snap.key, snap.version, snap.view.last_step, start, max_steps, load, encode, max_bytes)

    def closed_epochs(
        self, snap: HistorySnapshot, closed: Sequence[EpochSummary], encode: Callable[[EpochSummary], bytes],
        read: EpochLoader,
    ) -> bytes:
        """The ``epochs`` fields of the snapshot's closed epochs: ``read`` gives the spilled ones."""
        return self.pages.closed_epochs(snap.key, closed, encode, snap.spilled, read)
