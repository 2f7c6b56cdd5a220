"""What the session manager tells the outside world about state changes.

The manager calls these hooks after a change is committed; metrics implement them. Keeping the
interface here lets the manager stay free of any Prometheus import.
"""

from __future__ import annotations

from typing import Protocol

from ..model import EpochSummary, SessionConfig, SessionStatus, StepRecord
from ..policy import Window


class SessionObserver(Protocol):
    def session_opened(self, config: SessionConfig, window: tuple[Window, ...]) -> None: ...

    def session_ended(self, config: SessionConfig, status: SessionStatus) -> None: ...

    def step_recorded(
        self, config: SessionConfig, record: StepRecord, window: tuple[Window, ...], duplicate: bool
    ) -> None: ...

    def epoch_closed(
        self, config: SessionConfig, closed: EpochSummary, next_window: tuple[Window, ...]
    ) -> None: ...


class NullObserver:
    """Observes nothing (the in-process transport, unit tests)."""

    def session_opened(self, config: SessionConfig, window: tuple[Window, ...]) -> None:
        pass

    def session_ended(self, config: SessionConfig, status: SessionStatus) -> None:
        pass

    def step_recorded(
        self, config: SessionConfig, record: StepRecord, window: tuple[Window, ...], duplicate: bool
    ) -> None:
        pass

    def epoch_closed(
        self, config: SessionConfig, closed: EpochSummary, next_window: tuple[Window, ...]
    ) -> None:
        pass
