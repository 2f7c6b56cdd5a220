"""What the sessions in memory cost, charged against the server's memory budget.

``capacity/memory_budget.py`` counts bytes per part and asks evictors for memory; this class knows
what a session holds (its state, closed epochs and cached answers) and how to give some back:
inactive sessions are dropped (they are re-read from the store on demand), answer caches are
trimmed to a few per session. A session's own size is measured on a real session of its profile
(once per profile and modality count), so no profile is singled out by name.
"""

from __future__ import annotations

import threading
from typing import Callable, Iterable, Optional

from ..capacity.memory_budget import ANSWER_FLOOR, MIB, MemoryBudget, answer_bytes, deep_size, epoch_bytes
from ..model import SessionConfig, SessionKey
from ..policy import SessionProfile
from .session import Session


def session_bytes(profile: SessionProfile, modalities: int) -> int:
    """A session of ``profile`` without epochs or answers (config, policy, indexes, locks), with a
    margin: measured on a real one."""
    names = tuple(f"modality-{i:02d}" for i in range(modalities))
    session = Session.new(SessionConfig("j" * 64, 0, 1, names, profile), 0)
    return 2 * deep_size(session) + 4096


class SessionMemory:
    """Charges sessions to the budget's ``sessions`` and ``answers`` parts; thread-safe."""

    def __init__(self, budget: MemoryBudget) -> None:
        self.budget = budget
        self._lock = threading.Lock()
        self._charged: dict[SessionKey, list[int]] = {}  # key -> [session bytes, answers counted]
        self._sizes: dict[tuple[str, int], int] = {}  # (profile, modalities) -> session_bytes

    def _session_size(self, config: SessionConfig) -> int:
        size_key = (config.profile.name, len(config.modalities))
        size = self._sizes.get(size_key)
        if size is None:  # measured outside the lock: two threads may both measure, harmlessly
            size = self._sizes[size_key] = session_bytes(config.profile, len(config.modalities))
        return size

    def charge(self, session: Session) -> None:
        """Brings the budget up to date with what ``session`` holds."""
        m = len(session.config.modalities)
        fixed = self._session_size(session.config) + session.closed_epoch_count * epoch_bytes(m)
        n = session.cached_answers
        with self._lock:
            entry = self._charged.setdefault(session.key, [0, 0])
            d_fixed, d_answers = fixed - entry[0], (n - entry[1]) * answer_bytes(m)
            entry[0], entry[1] = fixed, n
        if d_fixed:
            self.budget.add("sessions", d_fixed)
        if d_answers:
            self.budget.add("answers", d_answers)

    def stale(self, session: Session) -> bool:
        """Whether the answers charged differ from what the session caches (the Report path asks
        without the accounting lock: a dict read)."""
        entry = self._charged.get(session.key)
        return entry is None or entry[1] != session.cached_answers

    def uncharge(self, session: Session) -> int:
        """Forgets a session that left memory; the bytes it gave back."""
        with self._lock:
            entry = self._charged.pop(session.key, None)
        if entry is None:
            return 0
        answers = entry[1] * answer_bytes(len(session.config.modalities))
        self.budget.add("sessions", -entry[0])
        self.budget.add("answers", -answers)
        return entry[0] + answers

    def make_room_for(self, config: SessionConfig, inherited_epochs: int) -> bool:
        """Room for a new session and the few answers it always keeps (evicting if need be)."""
        m = len(config.modalities)
        need = self._session_size(config) + inherited_epochs * epoch_bytes(m) + ANSWER_FLOOR * answer_bytes(m)
        return self.budget.make_room(need)

    def evict_inactive(self, wanted: int, pop_oldest: Callable[[], Optional[Session]]) -> int:
        """Drops least recently used inactive sessions (``pop_oldest``) until ``wanted`` bytes are freed."""
        freed = 0
        while freed < wanted:
            session = pop_oldest()
            if session is None:
                break
            freed += self.uncharge(session)
        return freed

    def evict_answers(self, wanted: int, sessions: Iterable[Session]) -> int:
        """Shrinks the answer caches of ``sessions`` (least recently active first) to a few each
        (a duplicate of a dropped answer is read from the store). Busy sessions are skipped."""
        before = self.budget.used("answers")
        for session in sessions:
            if before - self.budget.used("answers") >= wanted:
                break
            if session.lock.acquire(blocking=False):
                try:
                    if session.trim_answers(ANSWER_FLOOR):
                        self.charge(session)
                finally:
                    session.lock.release()
        return before - self.budget.used("answers")

    def full_message(self, n_open: int) -> str:
        b = self.budget
        return (
            f"the memory budget is full: {b.used() / MIB:.0f} MiB of {b.limit / MIB:.0f} MiB in use by {n_open} open "
            f"session(s) whose caches are already evicted; close sessions or raise --memory-budget"
        )
