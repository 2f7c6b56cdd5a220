"""Decoding the SQL stores' rows, session by session, for SQLite and PostgreSQL alike (the same
rows, one codec): a row that does not decode raises ``CorruptRecord`` for its session only, so
the other sessions load (and the bad one is quarantined, its rows untouched)."""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Union

from ..model import EpochSummary, SessionKey, SessionStatus, StepRecord
from ..policy import ProfileRegistry
from . import codec
from .base import CorruptRecord, Quarantined, StoredSession
from .statements import Statements

log = logging.getLogger(__name__)

DECODE_ERRORS = (ValueError, KeyError, TypeError, AttributeError, IndexError, OverflowError)
EpochSteps = Callable[[Any, SessionKey, int], list[StepRecord]]  # (conn, key, epoch): how a store finds them


def why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def step(key: SessionKey, epoch: object, step: object, text: object) -> StepRecord:
    try:
        return codec.step_from_json(int(epoch), int(step), text)  # type: ignore[call-overload,arg-type]
    except DECODE_ERRORS as exc:
        raise CorruptRecord(key, f"step {step}: {why(exc)}") from None


class SessionRows:
    """Decodes sessions with one store's statements and its way of finding an epoch's steps."""

    def __init__(self, sql: Statements, epoch_steps: EpochSteps) -> None:
        self.sql = sql
        self.epoch_steps = epoch_steps

    def session(self, profiles: ProfileRegistry, conn: Any, row: tuple) -> StoredSession:
        """One session row (``SESSION_COLUMNS``) with its epochs and open steps."""
        (job_id, attempt, config, status, created_ms, last_active_ms, open_epoch, open_window,
         step_count, last_step, pruned_ms) = row
        key = SessionKey(job_id, attempt)
        args = (job_id, attempt)
        try:
            decoded_config = codec.config_from_json(config, profiles)
        except DECODE_ERRORS as exc:
            raise CorruptRecord(key, f"its configuration: {why(exc)}") from None
        try:
            epochs = []
            for epoch, summary in conn.execute(self.sql.session_epochs, args).fetchall():
                try:
                    epochs.append(codec.epoch_from_json(summary))
                except DECODE_ERRORS as exc:
                    raise CorruptRecord(key, f"epoch {epoch}: {why(exc)}") from None
            open_steps = tuple(self.epoch_steps(conn, key, int(open_epoch)))
            if pruned_ms:  # the steps are gone: their count and last step were kept
                count, last, last_at = int(step_count), int(last_step), 0
            else:
                found = conn.execute(self.sql.step_count, args).fetchone()
                count, last = int(found[0]), int(found[1])
                newest = conn.execute(self.sql.newest_step_at, args).fetchone()
                last_at = int(newest[0]) if newest else 0
            return StoredSession(
                config=decoded_config,
                status=SessionStatus(status),
                created_ms=int(created_ms),
                last_active_ms=max(int(last_active_ms), last_at),
                closed_epochs=tuple(epochs),
                open_epoch=int(open_epoch),
                open_window=codec.windows_from_json(open_window),
                open_steps=open_steps,
                step_count=count,
                last_step=last,
                steps_pruned_ms=max(int(pruned_ms), 0),
            )
        except DECODE_ERRORS as exc:
            raise CorruptRecord(key, f"its session row: {why(exc)}") from None

    def load_session(self, profiles: ProfileRegistry, conn: Any, key: SessionKey) -> Optional[StoredSession]:
        found = conn.execute(self.sql.one_session, (key.job_id, key.attempt)).fetchall()
        return self.session(profiles, conn, found[0]) if found else None

    def sessions(self, profiles: ProfileRegistry, conn: Any, open_only: bool) -> list[Union[StoredSession, Quarantined]]:
        """Every (open) session, oldest first; one that does not decode is logged and ``Quarantined``."""
        where = f" WHERE status={int(SessionStatus.OPEN)}" if open_only else ""
        out: list[Union[StoredSession, Quarantined]] = []
        for row in conn.execute(f"{self.sql.sessions}{where} ORDER BY created_ms, job_id, attempt").fetchall():
            try:
                out.append(self.session(profiles, conn, row))
            except CorruptRecord as exc:
                log.error("quarantined session %s: %s", exc.key, exc.reason)
                out.append(Quarantined(exc.key, exc.reason, _int(row[4]), _int(row[5])))
        return out

    def closed_epochs(self, conn: Any, key: SessionKey, first: int, last: int) -> list[EpochSummary]:
        """Closed epochs ``first``..``last`` of one session (``StateStore.closed_epochs``)."""
        out = []
        params = (key.job_id, key.attempt, max(first, 0), last)
        for epoch, summary in conn.execute(self.sql.epoch_range, params).fetchall():
            try:
                out.append(codec.epoch_from_json(summary))
            except DECODE_ERRORS as exc:
                raise CorruptRecord(key, f"epoch {epoch}: {why(exc)}") from None
        return out


def _int(value: object) -> int:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return 0
