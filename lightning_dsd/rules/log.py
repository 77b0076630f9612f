"""One logger for everything DSD says, ``logging.getLogger("lightning_dsd")``, filtered to rank zero.

Notes (``info``) go to that logger at INFO; when nothing configured logging (the root logger has no handler),
they are printed to stderr, as Lightning prints its own notes, and otherwise they reach the handlers the user
set up (``logging.basicConfig``, a framework's, pytest's ``caplog``) through propagation, once. Warnings
(``warn``) are ``UserWarning``\\ s, so ``warnings`` filters and ``pytest.warns`` see them. Only rank zero speaks:
the rank of an initialized process group, else the launcher's ``RANK`` / ``LOCAL_RANK`` (as Lightning reads
them before a group exists).

Examples:
    >>> import logging
    >>> logging.getLogger("lightning_dsd").level == logging.INFO
    True
    >>> is_rank_zero()
    True
"""

from __future__ import annotations

import logging
import os
import warnings

import torch.distributed as dist

LOGGER = logging.getLogger("lightning_dsd")


class _UnlessLoggingIsConfigured(logging.StreamHandler):
    """Print to stderr only while the root logger has no handler; otherwise propagation delivers the record."""

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            super().emit(record)


LOGGER.setLevel(logging.INFO)
if not any(isinstance(handler, _UnlessLoggingIsConfigured) for handler in LOGGER.handlers):
    LOGGER.addHandler(_UnlessLoggingIsConfigured())


def is_rank_zero() -> bool:
    """Whether this process is rank zero (a single process is)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    for variable in ("RANK", "LOCAL_RANK"):
        if variable in os.environ:
            return int(os.environ[variable]) == 0
    return True


def info(message: str) -> None:
    """Log a note on rank zero."""
    if is_rank_zero():
        LOGGER.info(message)


def warn(message: str) -> None:
    """Warn on rank zero, pointing at the code that called DSD's caller."""
    if is_rank_zero():
        warnings.warn(message, UserWarning, stacklevel=3)
