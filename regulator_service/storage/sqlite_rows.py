"""Decoding the state file's rows, session by session: a row that does not decode raises
``CorruptRecord`` for its session only, so the other sessions load (and the bad one is
quarantined, its rows untouched)."""

from __future__ import annotations

import sqlite3

from ..model import SessionKey, SessionStatus, StepRecord
from ..policy import ProfileRegistry
from . import codec
from .base import CorruptRecord, StoredSession

DECODE_ERRORS = (ValueError, KeyError, TypeError, AttributeError, IndexError, OverflowError)


def why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def step(key: SessionKey, epoch: object, step: object, text: object) -> StepRecord:
    try:
        return codec.step_from_json(int(epoch), int(step), text)  # type: ignore[call-overload,arg-type]
    except DECODE_ERRORS as exc:
        raise CorruptRecord(key, f"step {step}: {why(exc)}") from None

def session(profiles: ProfileRegistry, conn: sqlite3.Connection, row: tuple) -> StoredSession:
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
        for epoch, summary in conn.execute(
            "SELECT epoch, summary FROM epochs WHERE job_id=? AND attempt=? ORDER BY epoch", args
        ):
            try:
                epochs.append(codec.epoch_from_json(summary))
            except DECODE_ERRORS as exc:
                raise CorruptRecord(key, f"epoch {epoch}: {why(exc)}") from None
        open_steps = tuple(epoch_steps(conn, key, int(open_epoch)))
        if pruned_ms:  # the steps are gone: their count and last step were kept
            count, last, last_at = int(step_count), int(last_step), 0
        else:
            count, last = conn.execute(
                "SELECT COUNT(*), COALESCE(MAX(step), -1) FROM steps WHERE job_id=? AND attempt=?", args
            ).fetchone()
            newest = conn.execute(
                "SELECT at_ms FROM steps WHERE job_id=? AND attempt=? ORDER BY step DESC LIMIT 1", args
            ).fetchone()
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

def epoch_steps(conn: sqlite3.Connection, key: SessionKey, epoch: int) -> list[StepRecord]:
    """The steps of ``epoch``, found from the newest step backwards: epochs only grow with
    steps, and the epochs asked for are the open one (restore) or its last (amendments)."""
    out = []
    for s, e, r in conn.execute(
        "SELECT step, epoch, record FROM steps WHERE job_id=? AND attempt=? ORDER BY step DESC",
        (key.job_id, key.attempt),
    ):
        if e < epoch:
            break
        if e == epoch:
            out.append(step(key, e, s, r))
    out.reverse()
    return out
