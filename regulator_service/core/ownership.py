"""Which jobs this replica may serve, when several replicas share one PostgreSQL store.

A replica serves a job only while it holds the job's lease (``storage/lease.py``). The fast path
is a dictionary look-up: a lease taken or renewed at local time ``t`` is trusted until
``t + TRUST * ttl`` by the local monotonic clock, which is never later than the database's expiry
(its ``now()`` when the statement ran is past ``t``). Past that, the database decides: the lease
is taken (free, expired by the database's clock, or still ours), or the call is answered
``NotOwner`` (UNAVAILABLE with a retry-after) while another replica's lease runs. A taken-over
lease comes with a new token, and the caller drops what memory holds of the job before loading it
from the store. Correctness never rests on this clock: every write is fenced by the database with
the token (``LeaseTable.fence``); the clock only decides when to ask.

A background thread renews the leases of the jobs served recently, every third of the TTL, in one
statement; a job idle for ``idle_s`` is left to lapse (taking it back later keeps its token if
nobody else took it). ``close`` ends this replica's leases, so that others take over at once.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from ..errors import Unavailable, shown
from ..storage import StoreError
from ..storage.lease import Guard, Held, LeaseTable

log = logging.getLogger(__name__)

DEFAULT_LEASE_TTL_S = 5.0  # --lease-ttl: how long a dead replica's jobs wait before another takes them
TRUST = 0.8  # the share of the TTL a replica trusts its lease by its own clock before asking again
MIN_IDLE_S = 30.0  # a job not served for this long (or 10 TTLs, if longer) is no longer renewed


class NotOwner(Unavailable):
    """Another replica serves the job now: nothing happened; retry after ``retry_after_ms``
    (the client's routing sends the job to its replica, or the lease lapses and moves here)."""

    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


@dataclass
class _Lease:
    token: int
    trusted_until: float  # local monotonic time
    used: float  # last served, local monotonic time


class Ownership:
    """This replica's leases, by job id."""

    def __init__(self, leases: LeaseTable, clock: Callable[[], float] = time.monotonic) -> None:
        self._leases = leases
        self._ttl = leases.ttl_s
        self._idle_s = max(MIN_IDLE_S, 10 * self._ttl)
        self._clock = clock
        self._lock = threading.Lock()  # guards _held only; never held across a database call
        self._held: dict[str, _Lease] = {}
        self._stop = threading.Event()
        self._renewer: Optional[threading.Thread] = None

    @property
    def ttl_s(self) -> float:
        return self._ttl

    def holds(self, job: str) -> bool:
        """Whether the lease is trusted without asking the database (marks the job as served)."""
        now = self._clock()
        with self._lock:
            lease = self._held.get(job)
            if lease is None or lease.trusted_until <= now:
                return False
            lease.used = now
            return True

    def claim(self, job: str, drop: Callable[[], None]) -> None:
        """Asks the database for the job's lease (call with the job's lock held). When the token
        changed, memory of the job predates it: ``drop()`` runs before writes may use the new
        token, so that none is made from a session loaded under the old one. Raises ``NotOwner``
        while another replica holds it (after ``drop()``), ``Unavailable`` if the database
        cannot say."""
        with self._lock:
            lease = self._held.get(job)
            mine = lease.token if lease is not None else None
        start = self._clock()
        try:
            got = self._leases.take(job, mine)
        except StoreError as exc:
            raise Unavailable(f"cannot tell which replica serves job {shown(job)}: {exc}; retry") from exc
        if isinstance(got, Held):
            with self._lock:
                self._held.pop(job, None)
            drop()
            raise NotOwner(
                f"job {shown(job)} is served by another regulator replica; retry (its lease ends within "
                f"{got.remaining_s:.1f}s unless that replica renews it)",
                retry_after_ms=_retry_ms(got, self._ttl),
            )
        if got != mine:
            drop()
            log.info("took the lease of job %s (token %d)", shown(job), got)
        with self._lock:
            self._held[job] = _Lease(got, start + TRUST * self._ttl, start)

    def fence(self, job: str) -> Guard:
        """The statement each write of ``job`` runs first (the store's ``guard``)."""
        with self._lock:
            lease = self._held.get(job)
        return self._leases.fence(job, lease.token if lease is not None else None)

    def distrust(self, job: str) -> None:
        """A write of the job failed (perhaps fenced): the next call asks the database again."""
        with self._lock:
            lease = self._held.get(job)
            if lease is not None:
                lease.trusted_until = 0.0

    def forget(self, job: str) -> None:
        with self._lock:
            self._held.pop(job, None)

    # -- renewal ------------------------------------------------------------------------------

    def start(self) -> None:
        self._renewer = threading.Thread(target=self._renew_loop, name="regulator-lease-renew", daemon=True)
        self._renewer.start()

    def renew_once(self) -> None:
        """Extends the leases of the jobs served within ``idle_s``; a lease the database no
        longer gives this replica is distrusted (the next call of its job asks again). Jobs
        not served for twice that are forgotten: memory stays bounded by the active jobs (one
        that comes back gets a new token, and its sessions are read again)."""
        now = self._clock()
        with self._lock:
            for job in [job for job, lease in self._held.items() if now - lease.used > 2 * self._idle_s]:
                del self._held[job]
            jobs = {job: lease.token for job, lease in self._held.items() if now - lease.used < self._idle_s}
        if not jobs:
            return
        try:
            still = self._leases.renew(jobs)
        except StoreError as exc:
            log.warning("cannot renew %d lease(s): %s", len(jobs), exc)
            return  # trusted_until runs out on its own
        with self._lock:
            for job, token in jobs.items():
                lease = self._held.get(job)
                if lease is None or lease.token != token:
                    continue
                if still.get(job) == token:
                    lease.trusted_until = now + TRUST * self._ttl
                else:
                    lease.trusted_until = 0.0

    def _renew_loop(self) -> None:
        while not self._stop.wait(self._ttl / 3):
            try:
                self.renew_once()
            except Exception:  # a bug must not end renewals silently
                log.exception("lease renewal failed")

    def close(self) -> None:
        """Stops renewing and ends this replica's leases (others take its jobs at once)."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=self._leases.timeout_s * 2 + 1)
        try:
            self._leases.release_all()
        except StoreError as exc:
            log.warning("could not release the leases on shutdown (they lapse in %gs): %s", self._ttl, exc)
        self._leases.close()


def replica_ownership(dsn: str, ttl_s: float, timeout_s: float) -> Ownership:
    """The leases of this process: its owner name (host, pid, a random tag) is never reused,
    so a restarted replica never mistakes an old lease for its own."""
    owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
    return Ownership(LeaseTable(dsn, owner, ttl_s, timeout_s))


def _retry_ms(held: Held, ttl_s: float) -> int:
    """The pause a refused call is asked to wait: until the other lease could lapse, bounded."""
    return int(min(max(held.remaining_s, 0.05), ttl_s) * 1000)
