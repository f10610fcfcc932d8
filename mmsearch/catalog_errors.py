"""Storage errors of the catalog: a full disk or a failing device turned into one actionable message."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy.exc import OperationalError

from mmsearch.errors import MmsearchError

# SQLite primary result codes (the low byte of an extended code).
_SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_FULL = 8, 10, 13
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


_NEARLY_FULL = 1 << 16


def _free_bytes(path: Path | str) -> int:
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    try:
        st = os.statvfs(folder)
    except OSError:
        return _NEARLY_FULL  # unknown: do not claim the disk is full
    return st.f_bavail * st.f_frsize


def disk_full_message(path: Path | str) -> str:
    return (
        f"disk full while writing the index at {path}: free some space and run the same command again "
        "(everything committed before this point is kept and the index still answers queries)"
    )


@contextmanager
def storage_errors(path: Path | str) -> Iterator[None]:
    """Turn a full disk or a failing device under the index into one clear :class:`MmsearchError`.

    SQLite reports ENOSPC as SQLITE_FULL ("database or disk is full") and the transaction is rolled
    back, so the catalog keeps its last committed state; the raw driver error would tell a user nothing
    about what to do.
    """
    try:
        yield
    except OperationalError as e:
        code = getattr(e.orig, "sqlite_errorcode", None)  # Python >= 3.11
        primary = code & 0xFF if isinstance(code, int) else None
        message = str(e.orig)
        if primary == _SQLITE_FULL or "database or disk is full" in message:
            raise MmsearchError(disk_full_message(path)) from e
        if primary == _SQLITE_READONLY or "readonly database" in message:
            if _free_bytes(path) < _NEARLY_FULL:  # opened read-only because the disk is full
                raise MmsearchError(disk_full_message(path)) from e
            raise MmsearchError(f"the index catalog {path} is read-only: {message}") from e
        if primary == _SQLITE_IOERR or "disk I/O error" in message:
            # Growing the WAL index (-shm) on a full disk fails as an I/O error, not SQLITE_FULL.
            if _free_bytes(path) < _NEARLY_FULL:
                raise MmsearchError(disk_full_message(path)) from e
            raise MmsearchError(f"I/O error on the index catalog {path}: {message}") from e
        raise
    except OSError as e:
        if e.errno in _DISK_FULL_ERRNOS:
            raise MmsearchError(disk_full_message(path)) from e
        raise
