"""INFO lines a user should see even when the training script configured no logging.

The client only logs (``logging.getLogger("regulator_client....")``) and configures nothing.
Python's last-resort handler prints warnings and errors of an unconfigured program to stderr,
but drops INFO. A few INFO lines matter at first contact (which profile is in force), so
``notice`` hands them to that same last-resort handler when nothing else would show them. Any
logging the application sets up (handlers, levels, ``logging.disable``) is respected as is.
"""

from __future__ import annotations

import logging


def notice(logger: logging.Logger, msg: str, *args: object) -> None:
    """``logger.info(msg, *args)``, shown on stderr also when no handler is configured."""
    if logger.hasHandlers():
        logger.info(msg, *args)
        return
    fallback = logging.lastResort
    if fallback is None or logger.manager.disable >= logging.INFO:
        return
    fallback.handle(logger.makeRecord(logger.name, logging.INFO, "(notice)", 0, msg, args, None))
