"""What the sessions in memory cost, charged against the server's memory budget.

``capacity/memory_budget.py`` counts bytes per part and asks evictors for memory; this class knows
what a session holds (its state, the Fisher traces its policy reads, its closed epochs and cached
answers) and how to give some back: inactive sessions are dropped (they are re-read from the store
on demand), answer caches are trimmed to a few per session, and an open session's closed epochs
beyond its newest ``KEEP_CLOSED`` are spilled as soon as they are closed (the store has them; they
are re-read for GetSession and late ranks). What cannot be given back grows by a trace value per
modality and epoch (8 bytes), and - with the memory store, which keeps everything in this process
and so cannot spill - by every epoch and step; a call that would grow it past the budget is refused
with RESOURCE_EXHAUSTED and "retry later" (``budget_refusal``). A session's own size is measured on
a real session of its profile (once per profile and modality count), so no profile is singled out
by name.
"""

from __future__ import annotations

import threading
from typing import Callable, Iterable, Optional, Sequence

from ..capacity.memory_budget import ANSWER_FLOOR, MIB, MemoryBudget, answer_bytes, deep_size, epoch_bytes
from ..errors import RetryLater
from ..model import EpochSummary, SessionConfig, SessionKey
from ..policy import SessionProfile
from .session import Session

KEEP_CLOSED = 2  # closed epochs an open session keeps in memory when the store can re-read the rest
REFUSED_RETRY_MS = 1000  # the pause a budget refusal asks for (sessions may close meanwhile)

# (session key, first, last) -> its closed epochs first..last, read from the store
EpochReader = Callable[[SessionKey, int, int], Sequence[EpochSummary]]


def session_bytes(profile: SessionProfile, modalities: int) -> int:
    """A session of ``profile`` without epochs or answers (config, policy, indexes, locks), with a
    margin: measured on a real one."""
    names = tuple(f"modality-{i:02d}" for i in range(modalities))
    session = Session.new(SessionConfig("j" * 64, 0, 1, names, profile), 0)
    return 2 * deep_size(session) + 4096


class SessionMemory:
    """Charges sessions to the budget's ``sessions`` and ``answers`` parts; thread-safe.

    ``read_epochs``: how spilled epochs are read back, None when the store keeps its records in
    this process (the memory store): then nothing is spilled and a session is charged for every
    epoch and step the store holds of it."""

    def __init__(self, budget: MemoryBudget, read_epochs: Optional[EpochReader] = None) -> None:
        self.budget = budget
        self._read_epochs = read_epochs
        self._lock = threading.Lock()
        self._charged: dict[SessionKey, list[int]] = {}  # key -> [session bytes, answers counted, steps]
        self._sizes: dict[tuple[str, int], int] = {}  # (profile, modalities) -> session_bytes

    @property
    def spills(self) -> bool:
        """Whether closed epochs leave memory (the store re-reads them), or stay and count."""
        return self._read_epochs is not None

    def spill(self, session: Session) -> None:
        """Drops the closed epochs ``session`` need not keep (call with its lock held, or before
        anyone else can see it)."""
        read = self._read_epochs
        if read is not None:
            key = session.key
            session.spill(KEEP_CLOSED, lambda first, last: read(key, first, last))

    def _session_size(self, config: SessionConfig) -> int:
        size_key = (config.profile.name, len(config.modalities))
        size = self._sizes.get(size_key)
        if size is None:  # measured outside the lock: two threads may both measure, harmlessly
            size = self._sizes[size_key] = session_bytes(config.profile, len(config.modalities))
        return size

    def charge(self, session: Session) -> None:
        """Brings the budget up to date with what ``session`` holds."""
        m = len(session.config.modalities)
        fixed = self._session_size(session.config) + session.trace_bytes() + session.kept_epoch_count * epoch_bytes(m)
        steps = 0 if self.spills else session.recorded_steps
        fixed += steps * answer_bytes(m)  # the memory store's record of each step
        n = session.cached_answers
        with self._lock:
            entry = self._charged.setdefault(session.key, [0, 0, 0])
            d_fixed, d_answers = fixed - entry[0], (n - entry[1]) * answer_bytes(m)
            entry[0], entry[1], entry[2] = fixed, n, steps
        if d_fixed:
            self.budget.add("sessions", d_fixed)
        if d_answers:
            self.budget.add("answers", d_answers)

    def stale(self, session: Session) -> bool:
        """Whether the answers charged differ from what the session caches (the Report path asks
        without the accounting lock: a dict read)."""
        entry = self._charged.get(session.key)
        return entry is None or entry[1] != session.cached_answers or (
            self._read_epochs is None and entry[2] != session.recorded_steps
        )

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
        kept = min(inherited_epochs, KEEP_CLOSED) if self.spills else inherited_epochs
        need = self._session_size(config) + kept * epoch_bytes(m) + 8 * m * inherited_epochs + ANSWER_FLOOR * answer_bytes(m)
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

    def room_for_epoch(self, session: Session) -> None:
        """Refuses (``RetryLater``) an EndEpoch whose closed epoch would pass the budget: its
        trace values, and with the memory store the epoch itself (evicting caches first)."""
        m = len(session.config.modalities)
        self._room(8 * m + (0 if self.spills else epoch_bytes(m)), f"EndEpoch of {session.key}")

    def room_for_step(self, session: Session) -> None:
        """With the memory store, refuses (``RetryLater``) a new step that would pass the budget
        (with a spilling store a step costs nothing that stays: its answer is evictable)."""
        if not self.spills:
            self._room(answer_bytes(len(session.config.modalities)), f"a new step of {session.key}")

    def _room(self, need: int, what: str) -> None:
        if self.budget.fits(need) or self.budget.make_room(need):
            return
        b = self.budget
        why = (
            "the memory store keeps every epoch and step in this process (serve with --state-dir to spill "
            "closed epochs)" if not self.spills else "open sessions' Fisher traces cannot be spilled"
        )
        raise RetryLater(
            f"{what} refused: the memory budget (--memory-budget {b.limit / MIB:.0f} MiB) is full, "
            f"{b.used() / MIB:.1f} MiB in use and its caches already evicted; {why}. Close sessions or raise "
            "--memory-budget",
            retry_after_ms=REFUSED_RETRY_MS,
        )

    def full_message(self, n_open: int) -> str:
        b = self.budget
        return (
            f"the memory budget is full: {b.used() / MIB:.0f} MiB of {b.limit / MIB:.0f} MiB in use by {n_open} open "
            f"session(s) whose caches are already evicted; close sessions or raise --memory-budget"
        )
