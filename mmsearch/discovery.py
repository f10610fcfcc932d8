"""How ``mmsearch query`` finds a running server for an index, and proves it is the right one.

A server writes ``INDEX/server.json`` (``{"url", "pid", "index", "token", "version", "started"}``) while it
runs; the file is created owner-only (0600, written to a private temp file then renamed), so its token is
readable by the user who started the server and by root, nobody else. The token is what every ``/api``
request must carry (see :mod:`mmsearch.access`), and what a client uses to check that whoever listens on
the file's port really is that server: ``/api/health?nonce=N`` answers ``HMAC(token, N)``, which a process
that took over the port of a dead server cannot compute.

Standard library only: :mod:`mmsearch.client` imports this before deciding whether it needs the engine.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import stat
import tempfile
from pathlib import Path
from typing import Any

from mmsearch import __version__

SERVER_FILE = "server.json"  # written by mmsearch.server while it runs
SERVER_LOCK = "server.lock"  # held by the running server: one server per index
SERVER_LOG = "server.log"  # output of a background server (mmsearch.client.start_server)
CONFIG_FILE = "mmsearch.json"  # the index's own description (mmsearch.store), read here for its model
PRIVATE_MODE = 0o600
TOKEN_BYTES = 32
TOKEN_COOKIE = "mmsearch_token"  # the page's copy of the token (mmsearch.access adds the port)
HEALTH_PROOF_CONTEXT = b"mmsearch health proof\0"
MAX_NONCE_CHARS = 128
# The package version a server reports and a client requires: a client never talks to another version.
VERSION: str = __version__


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def page_url(url: str, token: str) -> str:
    """The web page's address for a server at ``url``, with the token that opens it."""
    return f"{url.rstrip('/')}/?token={token}"


def same_token(given: str | None, token: str) -> bool:
    """Constant-time comparison, so response times do not reveal how much of a guess was right."""
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


def health_proof(token: str, nonce: str) -> str:
    """What a server that knows ``token`` answers for a client's ``nonce`` (the token itself never travels
    to a server before it has proved it holds it)."""
    return hmac.new(token.encode(), HEALTH_PROOF_CONTEXT + nonce.encode(), hashlib.sha256).hexdigest()


def new_nonce() -> str:
    return secrets.token_hex(16)


def open_private(path: Path, flags: int = os.O_RDWR) -> int:
    """Open (creating it 0600) a file only its owner may read; an existing file is made 0600 too.

    ``O_NOFOLLOW``: a symlink planted at ``path`` is refused instead of followed.
    """
    fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_MODE)
    try:
        os.fchmod(fd, PRIVATE_MODE)  # a file left by an older version may be 0644
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_server_file(folder: Path, info: dict[str, Any]) -> None:
    """Replace ``folder/server.json`` atomically with ``info``; the file is 0600 from its first byte."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{SERVER_FILE}.", suffix=".tmp")  # mkstemp: 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(info) + "\n")
        os.replace(tmp, folder / SERVER_FILE)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_server_file(folder: str | Path) -> dict[str, Any] | None:
    """What ``folder/server.json`` says, or None if there is none, it is unreadable or malformed, or it is
    not a private file of this user (someone else could have written it to redirect queries)."""
    try:
        fd = os.open(Path(folder) / SERVER_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            return None
        with os.fdopen(fd, "rb", closefd=False) as f:
            info = json.loads(f.read(1 << 16))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    if (
        not isinstance(info, dict)
        or not isinstance(info.get("url"), str)
        or not isinstance(info.get("pid"), int)
        or not isinstance(info.get("token"), str)
    ):
        return None
    return info


def remove_server_file(folder: Path, pid: int) -> None:
    """Remove ``server.json`` if it is still the one process ``pid`` wrote."""
    info = read_server_file(folder)
    if info is not None and info.get("pid") == pid:
        with contextlib.suppress(FileNotFoundError):
            (folder / SERVER_FILE).unlink()


def index_model(folder: str | Path) -> dict[str, Any] | None:
    """The model identity ``folder/mmsearch.json`` records, or None if it cannot be read."""
    try:
        config = json.loads((Path(folder) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    model = config.get("model") if isinstance(config, dict) else None
    return model if isinstance(model, dict) else None


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
