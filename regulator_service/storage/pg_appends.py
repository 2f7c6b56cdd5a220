"""A group commit of Reports as one statement on PostgreSQL.

A Report's write is one step row, fenced by its job's lease (``lease.FENCE``). A batch of only
such writes runs as one INSERT over arrays of the rows, fenced in the same statement
(``lease.FENCE_MANY``), alone in autocommit mode: one transaction and one round trip, where the
statement-per-op way takes four (BEGIN, the fences, the inserts, COMMIT), each a wait on the
socket and a hand-over of the GIL in the regulator. Its RETURNING names the rows written: an op
whose row is missing was fenced (its lease was taken over), and only that op is refused. Any
other failure (a step already stored) fails the statement whole, and the committer re-runs the
appends op by op as it does any batch. The batch's other ops (an epoch's close, a new session)
commit in a transaction of their own: every op is atomic by itself, and no two ops of a batch
belong to one session (a session's writes are serialized, each waiting for its commit).
"""

from __future__ import annotations

from typing import Sequence, TypeVar

from .commit_queue import Op
from .lease import FENCE, FENCE_MANY
from .statements import POSTGRESQL

_COLUMNS = "job_id, attempt, step, epoch, record, at_ms"
# %b: the arrays go binary (a text array would escape every JSON record's quotes in Python)
_ROWS = (
    f"SELECT r.* FROM unnest(%b::text[], %b::bigint[], %b::bigint[], %b::bigint[], %b::text[], %b::bigint[]) "
    f"AS r({_COLUMNS})"
)
_PLAIN_SQL = f"INSERT INTO steps ({_COLUMNS}) {_ROWS} RETURNING job_id, attempt, step"
_FENCED_SQL = (
    f"WITH fenced AS ({FENCE_MANY}) INSERT INTO steps ({_COLUMNS}) {_ROWS} "
    "WHERE r.job_id IN (SELECT job_id FROM fenced) RETURNING job_id, attempt, step"
)
_PLAIN = ((POSTGRESQL.insert_step_sql, True),)  # the shape of an unguarded append (``Op.shape``)
_FENCED = ((FENCE, True), (POSTGRESQL.insert_step_sql, True))  # ... and of one fenced by its lease

O = TypeVar("O", bound=Op)
Row = tuple[str, int, int]  # job_id, attempt, step: what RETURNING names


def split(batch: Sequence[O]) -> tuple[list[O], list[O]]:
    """The appends of ``batch`` that one statement writes (those of the first append's shape; a
    store's appends are all fenced or all not), and the other ops."""
    shape = next((op.shape for op in batch if op.shape == _FENCED or op.shape == _PLAIN), None)
    if shape is None:
        return [], list(batch)
    appends: list[O] = []
    rest: list[O] = []
    for op in batch:
        (appends if op.shape == shape else rest).append(op)
    return appends, rest


def statement(appends: Sequence[Op]) -> tuple[str, tuple]:
    """The one statement (SQL, parameters) that writes ``appends`` (from ``split``)."""
    columns = tuple(list(c) for c in zip(*(op.statements[-1][1] for op in appends)))
    if appends[0].shape == _PLAIN:
        return _PLAIN_SQL, columns
    fences = tuple(list(c) for c in zip(*(op.statements[0][1] for op in appends)))
    return _FENCED_SQL, fences + columns


def row(op: Op) -> Row:
    """The row an op of ``statement`` writes, as RETURNING names it."""
    job_id, attempt, step = op.statements[-1][1][:3]
    return job_id, attempt, step
