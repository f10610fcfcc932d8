"""``mmsearch mcp``: a Model Context Protocol server over stdio (the official ``mcp`` SDK, extra ``mcp``), so
that an assistant running on this machine can search an index: by text, by an image file, by a spoken
recording, read one item's details, and the index's status.

It follows the rules of the HTTP server (:mod:`mmsearch.server`):

- read-only: the index is opened as ``mmsearch serve`` opens it, and no tool writes to it;
- query files are paths on this machine, the user's own (the assistant runs locally), decoded within the
  query budgets (:meth:`mmsearch.Index.make_query`, :meth:`mmsearch.Index.transcribe_query`);
- what goes out is display-safe: every string in :func:`mmsearch.render.json_safe` form (a path that is
  not valid UTF-8 in display form, its exact bytes in ``path_b64``);
- ``k`` is at most :data:`mmsearch.constants.SERVER_MAX_K`; arguments are checked against the tools'
  schemas by the SDK;
- a failure is a tool error with a one-line message (an expected one: its text; anything else: the SDK's
  "Error executing tool", the traceback only in this process's stderr log), never a traceback to the client.

The model loads in a background thread once the server listens (a query arriving first waits for it).
Tools run in the SDK's worker threads; they use the index one at a time (its models are not shared between
threads).

``python -m mmsearch.mcp_server [--index PATH]`` runs it; an assistant's configuration names that command
(or ``mmsearch mcp --index PATH``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

from mmsearch import items, render
from mmsearch.constants import DEFAULT_MODE, QUERY_MODES, SERVER_MAX_K, TARGETS, default_index_path
from mmsearch.errors import MissingDependencyError, MmsearchError

try:
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError
    from mcp_types import ToolAnnotations
    from pydantic import BaseModel, Field
except ImportError as e:  # pragma: no cover - depends on the installation
    raise MissingDependencyError(e.name or "mcp", "mmsearch mcp", extra="mcp") from e

from mmsearch.api import Index
from mmsearch.items import hits_with_files
from mmsearch.search import Hit

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Most transcript segments the item tool returns (the whole transcript comes with them).
MAX_SEGMENTS = 500
#: Captions listed with each image hit.
MAX_QUERY_CHARS = 1000
INSTRUCTIONS = (
    "Searches a local index of images, their captions and transcribed audio by meaning. search_text finds "
    "images (target 'images', the default), captions or transcript segments ('texts', 'captions', 'audio') "
    "or all of them; search_image and search_audio take a file on this machine as the query. Each hit has "
    "a file_id: item(file_id) gives that file's captions, transcript and segments. no_match true means "
    "nothing in the index answers the query well."
)

Target = Annotated[
    str | None,
    Field(description=f"{' | '.join(TARGETS)}; default: images for text, texts for an image or a recording"),
]
K = Annotated[int, Field(ge=1, le=SERVER_MAX_K, description="Number of results")]
Mode = Annotated[
    str,
    Field(description=f"{' | '.join(QUERY_MODES)}: words and meaning, meaning only, or words only"),
]
MinConfidence = Annotated[
    float | None,
    Field(ge=0, le=1, description="Leave out hits below this calibrated confidence (0 keeps everything)"),
]
QueryFile = Annotated[str, Field(min_length=1, max_length=4096, description="A file path on this machine")]


class Filters(BaseModel):
    """Which files a search may return (each list: any of its values). The fields are
    :data:`mmsearch.filters.FILTER_FIELDS`, passed to ``Index.search`` by name."""

    path: list[str] = Field(default_factory=list, description="Globs on the file's full path")
    ext: list[str] = Field(default_factory=list, description="File extensions, e.g. jpg")
    kind: list[str] = Field(default_factory=list, description="File kinds: image | audio | video")
    after: str | None = Field(
        default=None, max_length=64, description="Modified at or after (ISO 8601 or unix time)"
    )
    before: str | None = Field(
        default=None, max_length=64, description="Modified before (ISO 8601 or unix time)"
    )
    min_duration: float | None = Field(
        default=None, ge=0, description="Recordings at least this many seconds long"
    )
    max_duration: float | None = Field(
        default=None, ge=0, description="Recordings at most this many seconds long"
    )
    tag: list[str] = Field(default_factory=list, description="Keywords or zero-shot tags (any)")
    taken_after: str | None = Field(
        default=None, max_length=64, description="Photos taken at or after (ISO 8601 or unix time)"
    )
    taken_before: str | None = Field(default=None, max_length=64, description="Photos taken before")
    near: str | None = Field(
        default=None, max_length=96, description="LAT,LON,KM: photos taken within KM of a place"
    )


class Tools:
    """The tools, over one open index."""

    def __init__(self, index: Index) -> None:
        self.index = index
        self.lock = threading.Lock()  # the embedder, the transcriber and the vector indexes

    def run(self, fn: Callable[[], T], *, model: bool = True) -> T:
        """``fn()``, under the index lock if it uses the ``model`` (item details and status read the
        catalog alone, concurrently, as the HTTP server reads them); an expected failure becomes a tool
        error with its message."""
        try:
            with self.lock if model else contextlib.nullcontext():
                return fn()
        except MmsearchError as e:
            raise ToolError(render.display(str(e))) from e

    def search(
        self,
        kind: str,
        shown: str,
        *,
        text: str | None = None,
        image: Path | None = None,
        audio: Path | None = None,
        target: str | None,
        k: int,
        mode: str = DEFAULT_MODE,
        filters: Filters | None,
        min_confidence: float | None,
    ) -> dict[str, Any]:
        f = filters or Filters()

        def answer() -> dict[str, Any]:
            result = self.index.search(
                text, image=image, audio=audio, target=target, k=k, mode=mode,
                min_confidence=min_confidence, **f.model_dump(),
            )  # fmt: skip
            out: dict[str, Any] = {
                "query": shown,
                "input": kind,
                "target": result.target,
                "mode": result.mode,
                "k": k,
                "no_match": result.no_match,
                "hits": self.hits_out(result.hits),
            }
            if result.transcript is not None:
                out["transcript"] = result.transcript
            return out

        return render.json_safe(self.run(answer))

    def hits_out(self, hits: list[Hit]) -> list[dict[str, Any]]:
        return hits_with_files(self.index.store.catalog, hits)

    def warm_up(self) -> None:
        """Load the text tower and the vector indexes now (under the lock: a query waits for them rather
        than loading them a second time). A failure is only logged: the first query reports it."""
        try:
            with self.lock:
                self.index.warm_up()
        except Exception as e:  # noqa: BLE001 - any failure is the first query's to report
            log.warning("could not load the model ahead of the first query: %s", render.printable(str(e)))

    def item(self, file_id: int) -> dict[str, Any]:
        return render.json_safe(self.run(lambda: item_details(self.index, file_id), model=False))

    def status(self) -> dict[str, Any]:
        return render.json_safe(self.run(self.index.stats, model=False))


def item_details(index: Index, file_id: int) -> dict[str, Any]:
    """One live file's metadata, captions and (for a recording) transcript and first segments."""
    details = items.item_details(index.store.catalog, file_id, MAX_SEGMENTS)
    if details is None:
        raise MmsearchError(f"no item {file_id}")
    return details


def create_server(index: Index, *, warm: bool = False) -> MCPServer:
    """The MCP server of ``index``: its tools, read-only. ``warm``: load the model in a background thread
    once it runs, so that the first query does not wait for all of it (an assistant starts its servers
    ahead of use). Started from the lifespan, the load runs after the SDK has pointed file descriptor 1 at
    stderr: nothing a library prints can reach the protocol's stdout."""
    from mmsearch.discovery import VERSION

    tools = Tools(index)

    @contextlib.asynccontextmanager
    async def lifespan(_server: MCPServer) -> AsyncIterator[dict[str, Any]]:
        if warm:
            threading.Thread(target=tools.warm_up, name="mmsearch-warm-up", daemon=True).start()
        yield {}

    server = MCPServer(
        name="mmsearch", instructions=INSTRUCTIONS, version=VERSION, log_level="WARNING", lifespan=lifespan
    )
    read_only = ToolAnnotations(read_only_hint=True, destructive_hint=False, open_world_hint=False)

    @server.tool(annotations=read_only)
    def search_text(
        query: Annotated[
            str, Field(min_length=1, max_length=MAX_QUERY_CHARS, description="What to look for")
        ],
        target: Target = None,
        k: K = 10,
        mode: Mode = DEFAULT_MODE,
        filters: Filters | None = None,
        min_confidence: MinConfidence = None,
    ) -> dict[str, Any]:
        """Search the index by the meaning (and words) of a text."""
        return tools.search(
            "text", query, text=query, target=target, k=k, mode=mode, filters=filters,
            min_confidence=min_confidence,
        )  # fmt: skip

    @server.tool(annotations=read_only)
    def search_image(
        path: QueryFile,
        target: Target = None,
        k: K = 10,
        filters: Filters | None = None,
        min_confidence: MinConfidence = None,
    ) -> dict[str, Any]:
        """Search the index with an image file on this machine (default target: captions and transcripts;
        target 'images' finds similar images)."""
        image = Path(path).expanduser()
        return tools.search(
            "image", path, image=image, target=target, k=k, mode="vector", filters=filters,
            min_confidence=min_confidence,
        )  # fmt: skip

    @server.tool(annotations=read_only)
    def search_audio(
        path: QueryFile,
        target: Target = None,
        k: K = 10,
        filters: Filters | None = None,
        min_confidence: MinConfidence = None,
    ) -> dict[str, Any]:
        """Search the index with a spoken recording on this machine: what it says (returned as
        'transcript') is searched like a text."""
        audio = Path(path).expanduser()
        return tools.search(
            "audio", path, audio=audio, target=target, k=k, filters=filters, min_confidence=min_confidence
        )

    @server.tool(annotations=read_only)
    def item(
        file_id: Annotated[int, Field(ge=1, le=2**63 - 1, description="A hit's file_id")],
    ) -> dict[str, Any]:
        """One file's details: kind, path, size, captions, and for a recording its transcript and
        time-coded segments."""
        return tools.item(file_id)

    @server.tool(annotations=read_only)
    def status() -> dict[str, Any]:
        """What the index holds (files, vectors, captions, segments) and its model."""
        return tools.status()

    return server


def main(index_path: str | Path | None = None) -> int:
    """Serve the index at ``index_path`` (default: ``$MMSEARCH_INDEX`` or indexes/default) over stdio until
    the client closes it. Returns the exit status (1: the index cannot be opened)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
        )
    path = Path(index_path) if index_path is not None else default_index_path()
    try:
        index = Index.open(path)
    except MmsearchError as e:
        log.error("%s", render.printable(str(e)))
        return 1
    with index:
        create_server(index, warm=True).run("stdio")
    return 0


def _argv_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmsearch.mcp_server", description=main.__doc__)
    p.add_argument(
        "--index", "-i", default=None, help="Index folder [default: $MMSEARCH_INDEX or indexes/default]"
    )
    return main(p.parse_args(argv).index)


if __name__ == "__main__":
    # Run the imported module's main, so loggers are named mmsearch.mcp_server rather than __main__.
    from mmsearch.mcp_server import _argv_main

    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(_argv_main())
