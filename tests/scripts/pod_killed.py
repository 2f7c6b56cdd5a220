"""A whole pod dies: a digits trainer and its regulator (the sidecar) are killed with SIGKILL
together right after optimizer step STEP (run by tests/test_snapshot_restore.py).

    python tests/scripts/pod_killed.py STEP REGULATOR_PID -- digits ARGS...
    torchrun ... tests/scripts/pod_killed.py STEP REGULATOR_PID -- digits_ddp ARGS...

Under torchrun the pod is the agent and every rank (each rank runs in a session of its own, so a
process group does not hold them): the rank that reaches the step kills the agent first, so that
it cannot react, then the agent's other workers, then itself.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

from trainers import digits, digits_ddp

at_step, regulator_pid = int(sys.argv[1]), int(sys.argv[2])
assert sys.argv[3] == "--" and sys.argv[4] in ("digits", "digits_ddp"), "usage: pod_killed.py STEP PID -- digits|digits_ddp ARGS..."
which, argv = sys.argv[4], sys.argv[5:]


def children(parent: int) -> list[int]:
    """The processes whose parent is ``parent`` (field 4 of /proc/PID/stat)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        if int(fields[1]) == parent:
            out.append(int(stat.parent.name))
    return out


def kill_pod(step: int) -> None:
    if step != at_step:
        return
    os.kill(regulator_pid, signal.SIGKILL)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker: the agent, then the other ranks
        agent = os.getppid()
        os.kill(agent, signal.SIGKILL)
        for pid in children(agent):
            if pid != os.getpid():
                os.kill(pid, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


if which == "digits_ddp":
    sys.exit(digits_ddp.main(argv, on_step=kill_pod))

train = digits.train


def killed_at_step(*args: Any, **kwargs: Any) -> Any:
    return train(*args, **kwargs, on_step=kill_pod)


digits.train = killed_at_step  # main() looks train up at call time
sys.exit(digits.main(argv))
