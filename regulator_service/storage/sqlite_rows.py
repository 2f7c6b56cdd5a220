"""The state file's rows, decoded with ``rows`` (shared with PostgreSQL) and the SQLite way of
finding an epoch's steps (one cursor walked back from the newest step: SQLite streams it)."""

from __future__ import annotations

import sqlite3

from ..model import SessionKey, StepRecord
from .rows import SessionRows, step
from .statements import SQLITE


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


ROWS = SessionRows(SQLITE, epoch_steps)
