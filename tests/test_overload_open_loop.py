"""The open-loop reproducer against a real ``regulator serve``: a burst of Reports far beyond
a tight admission limit, each counted on both sides (``bench/open_loop.py``; the 30,000-Report
figure is in docs/operations.md)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench.open_loop import run, table

from .conftest import ROOT

pytestmark = pytest.mark.e2e


def test_an_open_loop_burst_gets_no_cancelled_and_the_server_counts_every_code() -> None:
    r = run(reports=3000, sessions=4, server_args=["--max-concurrent-rpcs", "4", "--max-workers", "2"])
    client, server = r["client"]["codes"], r["server"]
    assert "CANCELLED" not in client, table(r)
    assert client == server["handled"], table(r)  # every code, shed calls included
    assert server["started"] == 3000
    assert client["RESOURCE_EXHAUSTED"] > 0 and r["client"]["retry_after"] == client["RESOURCE_EXHAUSTED"], table(r)


def test_max_pending_calls_below_one_is_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "regulator_cli", "serve", "--port", "0", "--metrics-port", "-1", "--in-memory",
         "--max-pending-calls", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == ["regulator serve: --max-pending-calls must be >= 1, got 0"]
