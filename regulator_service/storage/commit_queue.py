"""What the two group committers share (SQLite's ``group_commit``, PostgreSQL's ``pg_commit``):
the op a request thread queues and waits on, the queue one committer thread claims its batches
from, how finished ops release their callers (and tell those that gave up), the probe write, and
how equal-shaped ops run as one ``executemany`` per statement. What differs - transactions,
which failures are the store's, in-doubt commits - stays in each committer."""

from __future__ import annotations

import _thread
import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Generic, Optional, Sequence, TypeVar

from .base import StoreError, StoreInDoubt, StoreTimeout
from .statements import Statement

log = logging.getLogger(__name__)

PENDING, RUNNING, DONE, CANCELLED = range(4)


class Op:
    """One durable write: statements (batchable with ops of the same shape) or a function of
    the connection."""

    __slots__ = ("statements", "fn", "shape", "state", "error", "done", "callbacks")

    def __init__(
        self,
        statements: Sequence[Statement] = (),
        fn: Optional[Callable[[Any], None]] = None,
        shape: Optional[object] = None,
    ) -> None:
        """``shape``: what ops of the same statements share (given by hot callers as a constant,
        else derived from the statements)."""
        self.statements = statements
        self.fn = fn
        if fn is not None:
            self.shape: Optional[object] = None
        else:
            self.shape = shape if shape is not None else tuple((sql, expect is not None) for sql, _, expect in statements)
        self.state = PENDING
        self.error: Optional[BaseException] = None
        self.done = _thread.allocate_lock()
        self.done.acquire()  # released by the committer once the op is committed or failed
        self.callbacks: list[Callable[[], None]] = []


O = TypeVar("O", bound=Op)
# (op or None for a group, statement index, its first word, rows expected, rows changed): the error
OnMismatch = Callable[[Optional[Op], int, str, int, int], Exception]


def run_alone(conn: Any, op: Op, mismatch: OnMismatch) -> None:
    """One op's statements (or its function), each checked against the rows it expects."""
    if op.fn is not None:
        op.fn(conn)
        return
    for i, (sql, params, expect) in enumerate(op.statements):
        cur = conn.execute(sql, params)
        if expect is not None and cur.rowcount != expect:
            raise mismatch(op, i, sql.split()[0], expect, cur.rowcount)


def execute(conn: Any, batch: Sequence[Op], mismatch: OnMismatch) -> None:
    """A batch in the open transaction: ops of one shape as one ``executemany`` per statement."""
    groups: dict[object, list[Op]] = {}
    for op in batch:
        if op.shape is None:
            run_alone(conn, op, mismatch)
        else:
            groups.setdefault(op.shape, []).append(op)
    for ops in groups.values():
        if len(ops) == 1:
            run_alone(conn, ops[0], mismatch)
            continue
        cur = conn.cursor()
        for i, (sql, _, expect) in enumerate(ops[0].statements):
            cur.executemany(sql, [op.statements[i][1] for op in ops])
            if expect is not None:
                want = sum(op.statements[i][2] for op in ops)  # type: ignore[misc]
                if cur.rowcount != want:
                    raise mismatch(None, i, sql.split()[0], want, cur.rowcount)


class CommitQueue(Generic[O]):
    """The ops queued for one committer thread, and their release. ``hang``: what to suspect
    when a commit runs past the timeout (said in ``health``). ``hold_s``: the longest a commit
    waits for its followers (``_gather``; 0: never)."""

    _doubt_note = ""  # said in an in-doubt answer after "it is still running"

    def __init__(self, timeout_s: float, hang: str, hold_s: float = 0.0) -> None:
        self.timeout_s = timeout_s
        self._hang = hang
        self._hold_s = hold_s
        self._want = 0  # while the committer gathers: the queue length that wakes it
        self._last = (0, 0.0)  # the last batch: its ops, and how long its commit took
        self._qlock = _thread.allocate_lock()
        self._work = threading.Condition(self._qlock)  # the committer waits on it for ops
        self._queue: deque[O] = deque()
        self._closing = False
        self._busy_since: Optional[float] = None  # a commit in progress since (monotonic)
        self._failing: Optional[str] = None  # why the last write failed; None after a commit
        self._prober: Optional[threading.Thread] = None
        self._committer: Optional[threading.Thread] = None
        self.commits = 0  # transactions committed (a batch of ops is one)

    def _start(self, name: str, run: Callable[[], None]) -> None:
        self._committer = threading.Thread(target=run, name=name, daemon=True)
        self._committer.start()

    def _enqueue(self, op: O) -> None:
        with self._work:
            if self._closing:
                raise StoreError("the state store is closed")
            self._queue.append(op)
            if len(self._queue) >= self._want:
                self._work.notify()

    def _wait(self, op: O, timeout: float) -> None:
        """Waits for the committer to finish ``op``, at most ``timeout`` seconds: then
        ``StoreTimeout`` if it was still queued (withdrawn: nothing changed), ``StoreInDoubt``
        if it is being committed (its caller learns the outcome later)."""
        if op.done.acquire(timeout=timeout):
            return
        with self._qlock:
            state = op.state
            if state == PENDING:
                op.state = CANCELLED
        if state == PENDING:
            why = self._withdrawn(timeout)
            raise StoreTimeout(
                f"the state store did not complete the write within {timeout:g}s; nothing was changed"
                + (f" ({why})" if why else "")
            )
        if state == RUNNING:
            self._fail(f"a write has been running for more than {timeout:g}s ({self._hang})")
            raise StoreInDoubt(
                f"the state store did not complete the write within {timeout:g}s and it is still "
                f"running{self._doubt_note}; its outcome is settled before this session takes another write",
                lambda fn: self._on_resolved(op, fn),
            )
        op.done.acquire()  # finished just now: the release is on its way

    def _withdrawn(self, timeout: float) -> Optional[str]:
        """Why a queued op was not reached within ``timeout`` (said in its ``StoreTimeout``)."""
        return self._failing

    def _next(self) -> bool:
        """The committer waits for ops: False once the store closes."""
        with self._work:
            while not self._queue and not self._closing:
                self._work.wait()
            return not self._closing

    def _stop(self) -> bool:
        """Stops the committer (waiting, bounded, for the commit in progress): False if it is
        still running."""
        with self._work:
            self._closing = True
            self._work.notify()
        if self._committer is not None:
            self._committer.join(max(self.timeout_s, 1.0) * 5)
            if self._committer.is_alive():
                log.warning("closing the state store while a write is still running")
                return False
        return True

    def _gather(self) -> None:
        """Waits, briefly, for the followers of the last batch. Under load the callers a commit
        released come back with their next write within about a commit's time; a commit that
        waits for them writes them too, and what a commit costs beside its rows (a round trip,
        the database's wake-up, its WAL flush) is paid once instead of twice. It waits only
        while the queue holds fewer ops than the last batch had (one job alone never waits),
        and never longer than ``hold_s`` or than the last commit took."""
        size, took = self._last
        hold = min(self._hold_s, took)
        if size <= 1 or hold <= 0:
            return
        with self._work:
            if len(self._queue) >= size:
                return
            deadline = time.monotonic() + hold
            self._want = size
            try:
                while len(self._queue) < size and not self._closing:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._work.wait(left)
            finally:
                self._want = 0

    def _committed(self, batch: Sequence[O], since: float) -> None:
        """Notes a batch done (its size and time are the next ``_gather``'s measure)."""
        self._last = (len(batch), time.monotonic() - since)

    def _claim(self) -> list[O]:
        with self._qlock:
            batch = [op for op in self._queue if op.state == PENDING]
            self._queue.clear()
            for op in batch:
                op.state = RUNNING
        return batch

    def _stuck(self) -> Optional[str]:
        """Why a commit is late, when one runs past the timeout."""
        since = self._busy_since
        if since is not None and time.monotonic() - since > self.timeout_s:
            return f"a write has been running for {time.monotonic() - since:.0f}s ({self._hang})"
        return None

    def _fail(self, why: str) -> None:
        if self._failing != why:
            log.error("state store failing: %s", why)
        self._failing = why

    def _on_resolved(self, op: O, fn: Callable[[], None]) -> None:
        with self._qlock:
            if op.state != DONE:
                op.callbacks.append(fn)
                return
        self._dispatch(op, fn)

    def _dispatch(self, op: O, fn: Callable[[], None]) -> None:
        """Lets a caller that gave up on ``op`` re-read what was stored."""
        threading.Thread(target=fn, name="regulator-store-resolved", daemon=True).start()

    def _finish(self, ops: Sequence[O], error: Optional[BaseException]) -> None:
        for op in ops:
            with self._qlock:
                op.error = error
                op.state = DONE
                callbacks, op.callbacks = op.callbacks, []
            op.done.release()
            for fn in callbacks:  # a caller gave up on this op: let it re-read what was stored
                self._dispatch(op, fn)

    def _probe_write(self, submit: Callable[[], None]) -> None:
        """While failing: a real write (``submit``) on a helper thread, never more than one (a
        hung store holds one thread, not one per probe); its success clears the failure."""
        if self._failing is None or (self._prober is not None and self._prober.is_alive()):
            return

        def attempt() -> None:
            try:
                submit()
            except StoreError:
                pass

        self._prober = threading.Thread(target=attempt, name="regulator-store-probe", daemon=True)
        self._prober.start()
        self._prober.join(self.timeout_s * 2)
