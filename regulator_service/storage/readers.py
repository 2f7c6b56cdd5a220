"""Reads on their own connections and threads, bounded in time and in number.

In WAL mode readers never wait for the writer, so reads (history pages, a session loaded on
demand, a duplicate's stored answer) go through a few reader threads with one connection each
instead of the write connection. A read that does not finish within its time (a hung disk) is
``StoreTimeout`` for its caller; the pool's size bounds how many reads run at once.
"""

from __future__ import annotations

import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable, Optional, TypeVar

from .base import StoreError, StoreTimeout

T = TypeVar("T")


class ReadPool:
    def __init__(
        self,
        connect: Callable[[], sqlite3.Connection],
        workers: int,
        timeout_s: float,
        name: str = "regulator-store-read",
    ) -> None:
        self._connect = connect
        self.timeout_s = timeout_s
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self._closed = False

    def _connection(self) -> sqlite3.Connection:
        conn: Optional[sqlite3.Connection] = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def run(self, fn: Callable[[sqlite3.Connection], T], timeout_s: Optional[float] = None, bounded: bool = True) -> T:
        """``fn(connection)`` on a reader thread; ``StoreTimeout`` after ``timeout_s``
        (``bounded=False``: wait as long as it takes, for start-up)."""
        if self._closed:
            raise StoreError("the state store is closed")
        future = self._pool.submit(lambda: fn(self._connection()))
        timeout = (self.timeout_s if timeout_s is None else timeout_s) if bounded else None
        try:
            return future.result(timeout)
        except FutureTimeout:
            future.cancel()
            raise StoreTimeout(f"the state store did not answer a read within {timeout:g}s") from None

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            for conn in self._connections:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
            self._connections.clear()
