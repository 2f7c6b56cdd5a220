"""The PostgreSQL store's writes: what one is (``PgOp``) and how a batch of them runs in one
transaction, equal-shaped ops as one ``executemany`` per statement (pipelined by psycopg;
``commit_queue``). An op that changes another number of rows than it expects fails
(``Mismatch``); when its first statement is its session's guard, it is refused as fenced
(``SessionFenced``)."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import psycopg

from . import commit_queue
from .base import SessionFenced, StoreError
from .commit_queue import Op
from .pg_schema import one_line
from .statements import Statement


class PgOp(Op):
    """One durable write: statements (batchable with ops of the same shape) or a function of
    the connection. ``fenced``: the first statement is the session's guard, and the op is
    refused (``SessionFenced``) unless it changes or returns exactly one row."""

    __slots__ = ("fenced",)

    def __init__(
        self,
        statements: Sequence[Statement] = (),
        fn: Optional[Callable[[psycopg.Connection], None]] = None,
        shape: Optional[object] = None,
        fenced: bool = False,
    ) -> None:
        super().__init__(statements, fn, shape)
        self.fenced = fenced


class Mismatch(Exception):
    """A statement changed another number of rows than expected (an op's own failure)."""

    def __init__(self, message: str, fenced: bool) -> None:
        super().__init__(message)
        self.fenced = fenced


def _mismatch(op: Optional[Op], i: int, verb: str, want: int, got: int) -> Exception:
    """A lone op's guard (its first statement) that matched no row is the fence."""
    fenced = isinstance(op, PgOp) and op.fenced and i == 0
    return Mismatch(f"expected {want} row(s) from {verb}, got {got}", fenced)


def run_alone(conn: psycopg.Connection, op: PgOp) -> None:
    commit_queue.run_alone(conn, op, _mismatch)


def execute(conn: psycopg.Connection, batch: list[PgOp]) -> None:
    commit_queue.execute(conn, batch, _mismatch)


def one_insert(op: PgOp) -> bool:
    return op.fn is None and len(op.statements) == 1 and op.statements[0][0].startswith("INSERT ")


def fenced_out(op: PgOp) -> StoreError:
    """The error of a fenced op whose guard matched no row (``pg_appends``: its row was not
    written), as a lone op's run would raise it."""
    return op_error(_mismatch(op, 0, "SELECT", 1, 0))


def op_error(exc: BaseException) -> StoreError:
    if isinstance(exc, Mismatch) and exc.fenced:
        return SessionFenced(f"the store refused the write: this replica no longer holds the session ({exc})")
    return StoreError(f"state write failed, nothing was written: {one_line(exc)}")
