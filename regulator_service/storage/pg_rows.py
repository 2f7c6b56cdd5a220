"""The PostgreSQL store's rows, decoded with ``rows`` (shared with SQLite) and the PostgreSQL
way of finding an epoch's steps (pages walked back from the newest step: psycopg fetches a
result whole, so a page bounds what one query brings)."""

from __future__ import annotations

import psycopg

from ..model import SessionKey, StepRecord
from .rows import SessionRows, step
from .statements import POSTGRESQL

_PAGE = 256  # steps fetched first when walking back from the newest step (then 4x more each time)


def epoch_steps(conn: psycopg.Connection, key: SessionKey, epoch: int) -> list[StepRecord]:
    """The steps of ``epoch``, walking back from the newest step a page at a time (epochs only
    grow with steps, and the epochs asked for are the open one or its last): no index by epoch,
    so that a Report stays one INSERT into one index."""
    out: list[StepRecord] = []
    below, page = 2**63 - 1, _PAGE
    while True:
        found = conn.execute(
            "SELECT step, epoch, record FROM steps WHERE job_id=%s AND attempt=%s AND step < %s "
            "ORDER BY step DESC LIMIT %s",
            (key.job_id, key.attempt, below, page),
        ).fetchall()
        for s, e, r in found:
            if e < epoch:
                out.reverse()
                return out
            if e == epoch:
                out.append(step(key, e, s, r))
        if len(found) < page:
            out.reverse()
            return out
        below, page = found[-1][0], page * 4


ROWS = SessionRows(POSTGRESQL, epoch_steps)
