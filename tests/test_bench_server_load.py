"""`python -m bench.server_load` works end to end: every kind of server it starts answers its
load generator (unary and stream), the table names them, and the in-process mode runs beside
another checkout. Timings are not checked (they belong to the benchmark), only that each cell
was measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "bench.server_load", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_each_server_kind_is_measured_and_named_in_the_table(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    done = bench("--servers", "echo", "echo-busy", "echo-stream", "sqlite", "sqlite-stream", "memory-stream", "--concurrency", "2",
                 "--duration", "0.4", "--warmup", "0.1", "--busy-us", "5", "--json", str(out))
    result = json.loads(out.read_text())
    rows = {row["server"]: row for row in result["rows"]}
    assert set(rows) == {"echo", "echo-busy", "echo-stream", "sqlite", "sqlite-stream", "memory-stream"}
    for row in rows.values():
        assert row["in_flight"] == 2 and row["qps"] > 0 and row["p99_ms"] >= row["p50_ms"] > 0
        assert row["qps_vs_floor"] > 0 and row["cpu_vs_floor"] > 0  # CPU per call against the floor's, same run
        assert row["switches_per_call"] > 0  # a call wakes at least one server thread
    assert rows["echo"]["qps_vs_floor"] == 1.0 and rows["echo"]["cpu_vs_floor"] == 1.0
    assert result["busy_us"] == 5.0
    for name in ("grpcio floor", "echo+5us Python", "echo, a stream", "regulator SQLite", "SQLite, a stream", "memory, a stream",
                 "CPU x floor", "switches/call"):
        assert name in done.stdout


def test_postgresql_server_is_measured_with_its_cluster_cpu(tmp_path: Path) -> None:
    from bench.pg_cluster import bindir

    from .postgres import _missing  # skips here, fails under CI (where `make tools` installs PostgreSQL)

    try:
        import psycopg  # noqa: F401
    except ImportError:
        _missing("the Python package psycopg is not installed")
    if bindir() is None:
        _missing("initdb and pg_ctl not found")
    out = tmp_path / "load.json"
    done = bench("--servers", "echo", "postgresql", "postgresql-stream", "--concurrency", "2", "--duration", "0.4",
                 "--warmup", "0.1", "--json", str(out))
    result = json.loads(out.read_text())
    rows = {row["server"]: row for row in result["rows"]}
    for kind in ("postgresql", "postgresql-stream"):
        assert rows[kind]["qps"] > 0 and rows[kind]["cpu_vs_floor"] > 0
        assert 0 < rows[kind]["db_us_per_call"] < rows[kind]["server_us_per_call"]  # the cluster's share, counted in
    assert rows["echo"]["db_us_per_call"] is None
    assert result["database_cpus"] == result["load_cpus"]  # apart from the server's CPU by default
    assert "regulator PostgreSQL" in done.stdout and "PostgreSQL, a stream" in done.stdout and "of it DB" in done.stdout
    assert f"PostgreSQL on {result['load_cpus']}" in done.stdout

    bench("--servers", "echo", "postgresql", "--concurrency", "1", "--duration", "0.3", "--warmup", "0.1",
          "--database-cpus", "server", "--json", str(out))
    result = json.loads(out.read_text())
    assert result["database_cpus"] == result["server_cpus"]


def test_in_process_mode_measures_this_checkout_and_a_baseline() -> None:
    # the baseline is this checkout itself: what matters is that the script path runs
    done = bench("--in-process", "30", "--baseline", str(ROOT))
    lines = done.stdout.splitlines()
    assert any(line.startswith("Report in-process, sqlite") for line in lines)
    assert any(line.startswith("SQLite alone, 16 step rows per commit") for line in lines)
    assert any(line.startswith("baseline Report in-process, memory") for line in lines)


def test_spin_uses_at_least_the_cpu_time_asked_for() -> None:
    import time

    from bench.server_load import spin

    t0 = time.thread_time()
    spin(0.002)
    assert time.thread_time() - t0 >= 0.002


def test_machine_noise_times_the_same_loop_on_every_cpu(tmp_path: Path) -> None:
    """`python -m bench.machine_noise`: each CPU repeated the loop and its CPU times are summarized
    (their spread is the machine's, not checked)."""
    import os

    out = tmp_path / "noise.json"
    done = subprocess.run([sys.executable, "-m", "bench.machine_noise", "--seconds", "0.5", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["cpu"] for row in rows] == sorted(os.sched_getaffinity(0))
    for row in rows:
        assert row["ms"] and 0 < row["min_ms"] <= row["median_ms"] <= row["max_ms"]
    assert "max/min" in done.stdout
