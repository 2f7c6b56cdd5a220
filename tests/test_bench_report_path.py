"""`python -m bench.report_path` works end to end: the hook-shaped Report through the in-process
client is measured hot and cold for this checkout and a baseline checkout (here: this one again,
what matters is that another checkout's packages are the ones imported). Timings are not checked."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.e2e


def test_report_path_measures_this_checkout_and_a_baseline() -> None:
    done = subprocess.run([sys.executable, "-m", "bench.report_path", "--reports", "120", "--runs", "1",
                           "--baseline", str(ROOT)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines()[1:]}
    assert set(rows) == {"this", "baseline"}
    for words in rows.values():
        hot, cold = float(words[words.index("hot") + 1]), float(words[words.index("cold") + 1])
        assert hot > 0 and cold > 0
