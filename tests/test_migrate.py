"""``regulator migrate``: every session of a store copied into another, read back identical.

The source history is made by the regulator itself (its API over a real SQLite store): attempts
(one superseded by a resume that inherits its epochs), closed epochs, an open epoch with a step
whose deferred Fisher value is still pending, a fallback step, a closed session. After the copy a
regulator on the destination answers GetSession for every session exactly as one on the source.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Iterator

import pytest

from cli.main import main
from inforeg.regulator.v1 import regulator_pb2 as pb
from regulator_client import RegulatorClient
from regulator_service.client_api import build_api
from regulator_service.storage import MemoryStore, SQLiteStore, StateStore
from regulator_service.storage.sqlite_file import STATE_FILE
from regulator_cli.commands.migrate import copy_store

MODS = {"a": 3.0, "v": 1.0}
FISHER = {"a": 0.5, "v": 0.25}


def step(c: RegulatorClient, job: str, attempt: int, epoch: int, n: int, **kw: object) -> None:
    c.report(job, attempt=attempt, epoch=epoch, step=n, count=4, score_sums=MODS, fisher=kw.pop("fisher", FISHER), **kw)  # type: ignore[arg-type]


def make_history(store: StateStore) -> None:
    c = RegulatorClient.in_process(build_api(store=store))
    c.open_session("resumed", ["a", "v"])
    n = 0
    for epoch in range(2):
        for _ in range(3):
            step(c, "resumed", 0, epoch, n)
            n += 1
        c.end_epoch("resumed", attempt=0, epoch=epoch)
    step(c, "resumed", 0, 2, n)
    c.open_session("resumed", ["a", "v"], attempt=1, resume_epoch=2)  # supersedes attempt 0
    step(c, "resumed", 1, 2, n)
    step(c, "resumed", 1, 2, n + 1, fisher={"a": None, "v": None})  # deferred: still pending
    c.open_session("closed", ["a", "v"], "paper")
    step(c, "closed", 0, 0, 0)
    c.end_epoch("closed", attempt=0, epoch=0)
    c.close_session("closed", attempt=0)
    c.open_session("fallback", ["a", "v"])
    step(c, "fallback", 0, 0, 0, fallback=pb.FALLBACK_NEUTRAL, applied={"a": 0.0, "v": 0.0})
    step(c, "fallback", 0, 0, 1)


def answers(store: StateStore) -> dict[tuple[str, int], bytes]:
    """What a regulator on ``store`` answers about every session (the list, and each history)."""
    api = build_api(store=store)
    api.manager.restore()  # as a starting server does: the open sessions back in memory
    c = RegulatorClient.in_process(api)
    out: dict[tuple[str, int], bytes] = {}
    for s in c.list_sessions(include_inactive=True):
        full = c.get_session(s.job_id, s.attempt, include_steps=True)
        out[(s.job_id, s.attempt)] = s.SerializeToString(deterministic=True) + full.SerializeToString(deterministic=True)
    return out


@contextlib.contextmanager
def sqlite(path: Path) -> Iterator[SQLiteStore]:
    store = SQLiteStore(path)
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def source(tmp_path: Path) -> Path:
    with sqlite(tmp_path / "old") as store:
        make_history(store)
    return tmp_path / "old"


def test_sqlite_to_memory_copies_every_session_as_the_regulator_answers_it(source: Path) -> None:
    dst = MemoryStore()
    with sqlite(source) as src:
        copied = copy_store(src, dst)
        expected = answers(src)
    assert (copied.sessions, copied.open_sessions, copied.steps) == (4, 2, 12)
    assert len(expected) == 4 and answers(dst) == expected


def test_regulator_migrate_sqlite_to_sqlite(source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["migrate", "--from", str(source), "--to", str(tmp_path / "new")]) == 0
    assert "copied 4 session(s) (2 open), 5 closed epoch(s), 12 step(s); read back and compared: identical" in capsys.readouterr().out
    with sqlite(source) as src, sqlite(tmp_path / "new") as dst:
        assert answers(dst) == answers(src)
    # a second run would mix two histories: refused, nothing written
    assert main(["migrate", "--from", str(source), "--to", str(tmp_path / "new")]) == 2
    assert "the destination already holds 4 session(s)" in capsys.readouterr().err


def test_regulator_migrate_sqlite_to_postgresql(
    source: Path, pg_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from regulator_service.storage.postgresql import PostgreSQLStore

    assert main(["migrate", "--from", str(source), "--to", pg_dsn]) == 0, capsys.readouterr().err
    dst = PostgreSQLStore(pg_dsn)
    try:
        with sqlite(source) as src:
            assert answers(dst) == answers(src)
    finally:
        dst.close()
    # and back (a backup of the database as a state directory)
    assert main(["migrate", "--from", pg_dsn, "--to", str(tmp_path / "back")]) == 0, capsys.readouterr().err
    with sqlite(source) as src, sqlite(tmp_path / "back") as back:
        assert answers(back) == answers(src)


def test_mistakes_are_one_line_before_anything_is_copied(source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["migrate", "--from", str(tmp_path / "empty"), "--to", str(tmp_path / "x")]) == 2
    assert f"no regulator state here ({STATE_FILE} missing)" in capsys.readouterr().err
    assert main(["migrate", "--from", str(source), "--to", str(source)]) == 2
    with sqlite(source):  # a regulator still serves it: its lock is held
        assert main(["migrate", "--from", str(source), "--to", str(tmp_path / "y")]) == 2
    assert "--from" in capsys.readouterr().err
    assert not (tmp_path / "y" / STATE_FILE).exists() or answers_empty(tmp_path / "y")


def answers_empty(path: Path) -> bool:
    with sqlite(path) as store:
        return not store.load(open_only=False)


def test_a_quarantined_session_is_refused_unless_left_behind(source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with contextlib.closing(sqlite3.connect(source / STATE_FILE)) as conn, conn:
        conn.execute("UPDATE steps SET record='{' WHERE job_id='fallback' AND step=1")
    assert main(["migrate", "--from", str(source), "--to", str(tmp_path / "a")]) == 2
    assert "1 quarantined session(s) cannot be decoded, so not copied (fallback#0)" in capsys.readouterr().err
    assert main(["migrate", "--from", str(source), "--to", str(tmp_path / "b"), "--skip-quarantined"]) == 0
    assert "left behind: quarantined session fallback#0" in capsys.readouterr().err
    with sqlite(tmp_path / "b") as dst:
        assert sorted((s.config.job_id, s.config.attempt) for s in dst.load(open_only=False)) == [  # type: ignore[union-attr]
            ("closed", 0), ("resumed", 0), ("resumed", 1)]


def test_sessions_pruned_by_retention_keep_their_epochs() -> None:
    src, dst = MemoryStore(), MemoryStore()
    make_history(src)
    assert src.prune_steps(ended_before_ms=2**62, now_ms=123, max_rows=1000) != []  # the ended sessions
    copied = copy_store(src, dst)  # compared on the way: epochs, windows, status, times
    assert sorted(map(str, copied.pruned)) == ["closed#0", "resumed#0"]
    for key in copied.pruned:
        back, before = dst.load_session(key), src.load_session(key)
        assert back is not None and before is not None
        assert back.closed_epochs == before.closed_epochs and back.status == before.status
