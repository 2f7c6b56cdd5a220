"""``regulator migrate --from SOURCE --to DEST``: every session of one store copied into another.

The way from the single-replica central regulator (a SQLite state directory) to the replicated
one (PostgreSQL): stop the regulator, copy, start the replicas on the new store. Each store is a
state directory or a ``postgresql://`` URL. The copy goes through the ``StateStore`` interface
the server itself writes through - the same durable points a live regulator would have written
(session opened with its inherited epochs, steps in order, epochs closed, the status), so the
destination's own schema and checks apply and no table layout is assumed. Open and ended sessions
alike keep their attempts, epochs, windows, steps (deferred Fisher values still pending included)
and timestamps. Afterwards every session is read back from the destination and compared with the
source; any difference is an error (exit code 1).

The source must not be served meanwhile (a state directory is locked by its regulator: the copy
refuses to start), and the destination must hold no session (a second run cannot mix two
histories). A quarantined session (records that cannot be decoded) cannot be copied through the
interface: the copy refuses unless ``--skip-quarantined`` says to leave it behind.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Union

from regulator_service.model import SessionKey
from regulator_service.storage import SQLiteStore, StateStore, StoredSession
from regulator_service.storage.base import Quarantined, StoreError
from regulator_service.storage.sqlite_file import STATE_FILE

from ..connection import FlagError

PG_SCHEMES = ("postgresql://", "postgres://")


@dataclass
class Copied:
    """What a copy did, for the summary line and the tests."""

    sessions: int = 0
    open_sessions: int = 0
    steps: int = 0
    epochs: int = 0
    skipped: list[SessionKey] = field(default_factory=list)  # quarantined, left behind
    pruned: list[SessionKey] = field(default_factory=list)  # their steps were already pruned


class MigrationMismatch(StoreError):
    """The destination does not read back what the source holds."""


def _sessions(store: StateStore) -> list[Union[StoredSession, Quarantined]]:
    found = store.load(open_only=False)
    return sorted(found, key=lambda s: (s.key.job_id, s.key.attempt) if isinstance(s, Quarantined) else (s.config.job_id, s.config.attempt))


def copy_session(src: StateStore, dst: StateStore, s: StoredSession, copied: Copied) -> None:
    """One session, written as the regulator wrote it: opened (with the epochs it inherited from
    an earlier attempt), each own epoch's steps then its close, the open epoch's steps, the status
    with the last-activity time."""
    key, at = s.config.key, s.last_active_ms
    inherited = s.closed_epochs[: s.config.resume_epoch]
    own = s.closed_epochs[s.config.resume_epoch:]
    windows = [e.windows for e in own] + [s.open_window]
    dst.create_session(s.config, s.created_ms, windows[0], inherited=inherited)
    for i, epoch in enumerate(own):
        for record in src.epoch_steps(key, epoch.epoch):
            dst.append_step(key, record, at)
            copied.steps += 1
        next_epoch = own[i + 1].epoch if i + 1 < len(own) else s.open_epoch
        dst.close_epoch(key, epoch, next_epoch, windows[i + 1], at)
    for record in s.open_steps:
        dst.append_step(key, record, at)
        copied.steps += 1
    dst.set_status(key, s.status, at)
    copied.sessions += 1
    copied.epochs += len(s.closed_epochs)
    copied.open_sessions += s.status.name == "OPEN"
    if s.steps_pruned_ms:
        copied.pruned.append(key)


def copy_store(src: StateStore, dst: StateStore, skip_quarantined: bool = False) -> Copied:
    """Every session of ``src`` into the empty ``dst``, then ``verify``; ``FlagError`` for what
    the user must decide (a non-empty destination, quarantined sessions)."""
    held = dst.load(open_only=False)
    if held:
        raise FlagError(f"the destination already holds {len(held)} session(s): migrate into an empty store")
    sessions = _sessions(src)
    quarantined = [s for s in sessions if isinstance(s, Quarantined)]
    if quarantined and not skip_quarantined:
        names = ", ".join(str(q.key) for q in quarantined[:5])
        raise FlagError(
            f"{len(quarantined)} quarantined session(s) cannot be decoded, so not copied ({names}); "
            "pass --skip-quarantined to leave them behind"
        )
    copied = Copied(skipped=[q.key for q in quarantined])
    for s in sessions:
        if isinstance(s, StoredSession):
            copy_session(src, dst, s, copied)
    verify(src, dst, [s for s in sessions if isinstance(s, StoredSession)])
    return copied


def _steps(store: StateStore, key: SessionKey) -> list[str]:
    return [repr(r) for r in store.iter_steps(key)]  # repr: a pending (NaN) Fisher equals itself


def verify(src: StateStore, dst: StateStore, sessions: list[StoredSession]) -> None:
    """Every session and every step read back from ``dst`` as ``src`` holds it, field by field
    (the sessions whose steps were pruned before the copy: their epochs and header; the count of
    the pruned steps stays behind with them)."""
    for s in sessions:
        key = s.config.key
        back = dst.load_session(key)
        expected = s if not s.steps_pruned_ms else _without_steps(s)
        if back is None or repr(_comparable(back, s)) != repr(expected):
            raise MigrationMismatch(f"session {key} reads back differently from the destination:\n"
                                    f"  source:      {expected!r}\n  destination: {back!r}")
        if _steps(dst, key) != _steps(src, key):
            raise MigrationMismatch(f"the steps of session {key} read back differently from the destination")


def _comparable(back: StoredSession, s: StoredSession) -> StoredSession:
    return replace(back, steps_pruned_ms=s.steps_pruned_ms) if s.steps_pruned_ms else back


def _without_steps(s: StoredSession) -> StoredSession:
    return replace(s, step_count=0, last_step=-1)


# -- the command ----------------------------------------------------------------------------------


def open_store(spec: str, role: str, profiles: object) -> StateStore:
    """``spec``: a ``postgresql://`` URL, else a state directory (the source's must hold a
    state file: an empty directory is a typo, not an empty regulator)."""
    if spec.startswith(PG_SCHEMES):
        try:
            from regulator_service.storage.postgresql import PostgreSQLStore
        except ModuleNotFoundError as exc:
            raise FlagError(f"--{role}: a PostgreSQL store needs psycopg (pip install 'inforeg-regulator[server]'): {exc}") from None
        return PostgreSQLStore(spec, profiles)  # type: ignore[arg-type]
    path = Path(spec)
    if role == "from" and not (path / STATE_FILE).is_file():
        raise FlagError(f"--from {spec}: no regulator state here ({STATE_FILE} missing)")
    if role == "to" and path.exists() and not path.is_dir():
        raise FlagError(f"--to {spec}: not a directory")
    path.mkdir(parents=True, exist_ok=True)
    return SQLiteStore(path, profiles)  # type: ignore[arg-type]


def run(args: argparse.Namespace) -> int:
    from regulator_service.wire.profile_wire import load_registry

    profiles = load_registry(args.plugin)
    if args.source == args.dest:
        raise FlagError("--from and --to name the same store")
    try:
        with _opened(args.source, "from", profiles) as src, _opened(args.dest, "to", profiles) as dst:
            copied = copy_store(src, dst, skip_quarantined=args.skip_quarantined)
    except StoreError as exc:  # a mismatch read back, or a store failing mid-copy
        print(f"regulator migrate: {exc}", file=sys.stderr)
        return 1
    print(
        f"copied {copied.sessions} session(s) ({copied.open_sessions} open), {copied.epochs} closed epoch(s), "
        f"{copied.steps} step(s); read back and compared: identical"
    )
    for key in copied.skipped:
        print(f"left behind: quarantined session {key}", file=sys.stderr)
    for key in copied.pruned:
        print(f"note: session {key} had its steps pruned before the copy (retention): epochs copied", file=sys.stderr)
    return 0


class _opened:
    """A store open for the block, closed after it (the state directory's lock released)."""

    def __init__(self, spec: str, role: str, profiles: object) -> None:
        self.spec, self.role, self.profiles = spec, role, profiles
        self.store: Optional[StateStore] = None

    def __enter__(self) -> StateStore:
        try:
            self.store = open_store(self.spec, self.role, self.profiles)
        except StoreError as exc:  # locked by a running regulator, a newer schema, unreachable
            raise FlagError(f"--{self.role} {self.spec}: {exc}") from None
        return self.store

    def __exit__(self, *exc: object) -> None:
        if self.store is not None:
            self.store.close()


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "migrate",
        help="copy every session of one store into another (SQLite state directory -> PostgreSQL)",
        description="Copies every session (open and ended: attempts, epochs, steps, status) from one "
        "store into an empty one, then reads each back and compares. Stop the regulator of the source first.",
    )
    p.add_argument("--from", dest="source", required=True, metavar="STORE",
                   help="the source: a state directory (--state-dir of the old regulator) or a postgresql:// URL")
    p.add_argument("--to", dest="dest", required=True, metavar="STORE",
                   help="the destination, empty: a postgresql:// URL (or a state directory)")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="profile plugins the regulator was started with (stored profiles are decoded with them)")
    p.add_argument("--skip-quarantined", action="store_true",
                   help="leave sessions that cannot be decoded behind instead of refusing to copy")
    p.set_defaults(func=run)
