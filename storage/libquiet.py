"""Library chatter kept off the terminal for the length of a call.

nibabel logs its header notes as warnings and highdicom quotes header values
(a patient's name) in its: both reach stderr in front of segflow's one-line
messages.  Removing a logger's handler is not enough (the record then reaches
Python's last-resort handler, which prints it all the same); raising the
logger's level drops it, and its modules' loggers take that level.  Warnings
raised meanwhile are dropped too; errors still raise.  nibabel logs the header
problem it then raises for at ERROR ("vox offset -4096 too low ..."), ahead of
segflow's own line saying the same, so records up to ERROR are dropped.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quietly(logger_name: str) -> Iterator[None]:
    """No warnings, and no log record below CRITICAL from ``logger_name`` (and its children), while the block
    runs."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
