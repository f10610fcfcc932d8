"""`mmsearch serve`: an HTTP API and a web page over one index, on uvicorn. This module runs it (the
process side); the app is in :mod:`mmsearch.routes`.

Safe by default:

- It binds 127.0.0.1 and answers only requests whose Host header names this machine, so a web page
  elsewhere cannot reach it through DNS rebinding.
- Every ``/api`` route but ``/api/health`` needs the server's token, made afresh at each start: the CLI
  sends it as ``Authorization: Bearer`` (read from ``INDEX/server.json``, 0600); the page gets it as an
  HttpOnly, SameSite=Strict cookie when opened from the URL the server prints (``/?token=…``, which then
  redirects to ``/`` so the token leaves the address bar). Other local users cannot read the token.
- Requests sent by another site's page (``Sec-Fetch-Site`` cross-site or same-site, or an ``Origin`` that is
  not this server's) are refused before they reach a route, so no page can make it search, upload or read;
  every response carries ``Cross-Origin-Resource-Policy: same-origin`` (see :mod:`mmsearch.access`).
- Files are served only by catalog id (never by a path a client sent), and only while they are still the
  file the catalog knows: opened without following a symlink, a regular file of the indexed size and
  mtime, then sent from that open descriptor (never re-opened by path); see :mod:`mmsearch.media`.
- Upload sizes are capped (:mod:`mmsearch.uploads`), thumbnail decodes are bounded, and the page builds its
  DOM with ``textContent``, under a CSP that allows no inline script.

It does not encrypt (no TLS): bound to anything but loopback, the token crosses the network in clear.

While it runs, ``INDEX/server.json`` tells ``mmsearch query`` where a warm server for the same index answers
and its token (see :mod:`mmsearch.discovery`, :mod:`mmsearch.client`); ``INDEX/server.lock`` keeps a second
server for the same index from starting.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import ipaddress
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from mmsearch import discovery
from mmsearch.discovery import SERVER_LOCK
from mmsearch.errors import MissingDependencyError, MmsearchError

try:
    import uvicorn
except ImportError as e:  # pragma: no cover - depends on the installation
    raise MissingDependencyError(e.name or "uvicorn", "mmsearch serve", extra="server") from e

from mmsearch.access import Activity, token_cookie
from mmsearch.api import Index
from mmsearch.media import THUMB_SIDE
from mmsearch.routes import MAX_K, HealthOut, HitOut, ItemOut, SearchOut, create_app
from mmsearch.routes import Service as _Service
from mmsearch.uploads import MAX_AUDIO_BYTES, MAX_IMAGE_BYTES

# Names imported from here before the app, files and uploads moved to their own modules.
__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "MAX_AUDIO_BYTES",
    "MAX_IMAGE_BYTES",
    "MAX_K",
    "THUMB_SIDE",
    "Activity",
    "HealthOut",
    "HitOut",
    "ItemOut",
    "SearchOut",
    "_Service",
    "bind",
    "create_app",
    "exposure_warning",
    "is_loopback",
    "main",
    "serve",
    "token_cookie",
    "url_for",
    "warm_up",
]

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


# --- running it --------------------------------------------------------------------------------------
def warm_up(index: Index, *, speech: bool = False) -> None:
    """Load the text tower and every vector index now, so the first query is as fast as the rest."""
    t0 = time.perf_counter()
    index.warm_up(speech=speech)
    log.info("models and vectors loaded in %.1f s", time.perf_counter() - t0)


class _Server(uvicorn.Server):
    """uvicorn, plus: announce the URL once listening, and exit after ``idle_timeout`` s without requests."""

    def __init__(
        self,
        config: uvicorn.Config,
        *,
        on_started: Callable[[], None],
        on_stopping: Callable[[], None],
        activity: Activity,
        idle_timeout: float | None,
        stop: threading.Event | None,
    ) -> None:
        super().__init__(config)
        self._stop = stop
        self._on_started = on_started
        self._on_stopping = on_stopping
        self._activity = activity
        self._idle_timeout = idle_timeout

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self._on_started()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Here rather than after run(): on SIGTERM/SIGINT uvicorn re-raises the signal when serve() ends.
        self._on_stopping()
        await super().shutdown(sockets=sockets)

    async def on_tick(self, counter: int) -> bool:
        a = self._activity
        if self._idle_timeout and a.in_flight == 0 and time.monotonic() - a.last > self._idle_timeout:
            log.info("no request for %.0f s: exiting", self._idle_timeout)
            self.should_exit = True
        if self._stop is not None and self._stop.is_set():
            self.should_exit = True
        return await super().on_tick(counter)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port), or a clear error if the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise MmsearchError(
                f"port {port} on {host} is in use: choose another with --port (0: any)"
            ) from e
        raise MmsearchError(f"cannot listen on {host}:{port}: {e}") from e
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url_for(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@contextlib.contextmanager
def _server_lock(folder: Path) -> Iterator[None]:
    fd = discovery.open_private(folder / SERVER_LOCK)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            running = discovery.read_server_file(folder)
            where = f" at {running['url']}" if running else ""
            raise MmsearchError(f"a server for {folder} is already running{where}") from e
        yield
    finally:
        os.close(fd)


def _server_info(folder: Path, url: str, token: str) -> dict[str, Any]:
    return {
        "url": url,
        "pid": os.getpid(),
        "index": os.path.realpath(folder),
        "token": token,
        "version": discovery.VERSION,
        "started": time.time(),
    }


def is_loopback(host: str) -> bool:
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str) -> str | None:
    """What to tell the user before listening on ``host``, or None for loopback."""
    if is_loopback(host):
        return None
    return (
        f"listening on {host}: anyone who can reach it and learns its token can search this index and read "
        "its files, and the token crosses the network unencrypted (no TLS)"
    )


def serve(
    index_path: str | Path,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    allowed_hosts: Sequence[str] = (),
    idle_timeout: float | None = None,
    warm: bool = True,
    warm_speech: bool = False,
    log_level: str = "warning",
    on_ready: Callable[[str], None] | None = None,
    stop: threading.Event | None = None,
    ray: str | None = None,
    shards: int | None = None,
) -> None:
    """Serve the index at ``index_path`` until interrupted, idle for ``idle_timeout`` seconds, or ``stop``
    is set. ``on_ready(page_url)`` is called once it accepts requests (``port=0``: any free port), with the
    page's address including this run's token (``http://HOST:PORT/?token=…``): the address to open.

    Binding anything but loopback exposes the index's files to the network (see :func:`exposure_warning`):
    the caller should say so. ``ray``, ``shards``: search vectors sharded over a Ray cluster (see
    :meth:`Index.open`).
    """
    if "torch" not in sys.modules and "faiss" not in sys.modules:
        # torch and faiss each run an OpenMP pool; spin-waiting idle threads of one steal the cores the
        # other needs, so a text embedding or a search waits on busy-looping threads (bench_server.py
        # measures it). Read by libgomp when it loads, so only before those imports.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    with Index.open(index_path, ray=ray, shards=shards) as index:
        folder = index.path
        with _server_lock(folder):
            if warm:
                warm_up(index, speech=warm_speech)
            sock = bind(host, port)
            url = url_for(sock)
            activity = Activity()
            token = discovery.new_token()
            app = create_app(index, allowed_hosts=[host, *allowed_hosts], activity=activity, token=token)
            config = uvicorn.Config(
                app,
                log_level=log_level,
                access_log=False,
                server_header=False,
                lifespan="off",
                timeout_graceful_shutdown=5,  # then drop connections still waiting on a queued search
            )

            def started() -> None:
                discovery.write_server_file(folder, _server_info(folder, url, token))
                log.info("serving %s at %s", folder, url)  # without the token: logs are shared more
                if on_ready is not None:
                    on_ready(discovery.page_url(url, token))

            server = _Server(
                config,
                on_started=started,
                on_stopping=lambda: discovery.remove_server_file(folder, os.getpid()),
                activity=activity,
                idle_timeout=idle_timeout,
                stop=stop,
            )
            try:
                server.run(sockets=[sock])
            finally:
                sock.close()
                discovery.remove_server_file(folder, os.getpid())


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mmsearch.server INDEX``: what ``mmsearch query`` spawns as a background warm server."""
    p = argparse.ArgumentParser(prog="python -m mmsearch.server", description=main.__doc__)
    p.add_argument("index")
    p.add_argument("--host", default=DEFAULT_HOST)
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--idle-timeout", type=float, default=None, help="exit after this many idle seconds")
    p.add_argument("--log-level", default="warning")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    warning = exposure_warning(args.host)
    if warning is not None:
        log.warning("%s", warning)
    try:
        serve(args.index, args.host, args.port, idle_timeout=args.idle_timeout, log_level=args.log_level)
    except MmsearchError as e:
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    # Run the imported module's main, so loggers are named mmsearch.server rather than __main__.
    from mmsearch.server import main as _main

    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(_main())
