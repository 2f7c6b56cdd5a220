"""`python -m trainers.digits ARGS`, killed with SIGKILL right after optimizer step STEP: a pod
that dies mid-epoch, at a step the test chooses (run by tests/test_retried_pod.py).

    python tests/scripts/digits_killed.py STEP -- ARGS...
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from trainers import digits

at_step = int(sys.argv[1])
assert sys.argv[2] == "--", "usage: digits_killed.py STEP -- ARGS..."
train = digits.train


def killed_at_step(*args: Any, **kwargs: Any) -> Any:
    def on_step(step: int) -> None:
        if step == at_step:
            os.kill(os.getpid(), signal.SIGKILL)

    return train(*args, **kwargs, on_step=on_step)


digits.train = killed_at_step  # main() looks train up at call time
sys.exit(digits.main(sys.argv[3:]))
