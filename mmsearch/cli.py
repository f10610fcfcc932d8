"""The `mmsearch` command. The only module that prints, exits, or imports typer/rich.

Library errors (:class:`MmsearchError`) become one line on stderr and exit code 1; usage errors exit 2.

Every text that comes from files, the index or the command line (paths, captions, transcripts, skip reasons,
model names, error messages) is printed through :func:`mmsearch.render.printable`: control characters
escaped, undecodable bytes of a file name shown as U+FFFD. stdout and stderr write a character their
encoding lacks as a backslash escape instead of failing (:func:`_tolerant_streams`).

`mmsearch query` has a fast path for a running server: :func:`main` reads the command line with argparse,
sends the query to the server and prints its answer without importing typer, whose import and parsing
cost more than the query itself. Everything else (other commands, --help, --local, no server, a command
line the fast path does not fully understand) goes to the typer application, built on first use by
:func:`_typer_app`. Both paths format their output with :mod:`mmsearch.render`.
"""

import argparse
import atexit
import contextlib
import functools
import gc
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

# Only light imports at module level: `mmsearch query` with a warm server never loads typer, rich, numpy or
# torch.
from mmsearch import constants, render
from mmsearch.client import TARGET_NAMES as TARGETS
from mmsearch.constants import MAX_K
from mmsearch.errors import MmsearchError

if TYPE_CHECKING:
    import typer
    from rich.console import Console

    from mmsearch import IngestReport
    from mmsearch.client import Server


def main(*, end_process: bool = False) -> None:
    """The command line in ``sys.argv``. ``end_process``: once a query is answered, end the process at once
    (:func:`_end_process`), as the ``mmsearch`` command does (:func:`run`)."""
    _tolerant_streams()
    sys.argv[1:] = ray_address_argv(sys.argv[1:])
    try:
        if _fast_query(sys.argv[1:]):
            if end_process:
                _end_process()
            return
        _typer_app()()
    except MmsearchError as e:
        _err().print(f"error: {render.printable(str(e))}", markup=False, highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        _err().print(
            "interrupted: work committed so far is kept; run the same command again to resume", markup=False
        )
        sys.exit(130)


def run() -> None:
    """The ``mmsearch`` command: its console script and ``python -m mmsearch``."""
    main(end_process=True)


def _end_process() -> NoReturn:
    """End the process with status 0 after an answered query, skipping the interpreter's teardown.

    The index is closed by then (its catalog connections with it) and the answer printed. What teardown
    would still do is free, object by object, what the search left in memory: the loaded vectors, the ONNX
    Runtime session, a few thousand module objects. For a cold query that is a sizeable share of the
    process's life, and nothing outside the process waits on it. The output is flushed and the atexit
    handlers run (logging's flush, finalizers of temporary files) as at a normal exit."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # the reader went away meanwhile: as _fast_query's BrokenPipeError
        os._exit(1)
    atexit._run_exitfuncs()
    os._exit(0)


RAY_OPTION = "--ray"
_RAY_ADDRESS = re.compile(r"^(auto|local|ray://\S+|[\w.-]+:\d+)$")


def ray_address_argv(argv: list[str]) -> list[str]:
    """``--ray`` takes an optional address: a bare ``--ray`` means ``--ray=local`` (start a cluster here),
    and the next word is its address only when it reads as one (``auto``, ``local``, ``HOST:PORT``,
    ``ray://…``), never a folder to index."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == RAY_OPTION:
            following = argv[i + 1] if i + 1 < len(argv) else None
            if following is not None and _RAY_ADDRESS.match(following) and not os.path.exists(following):
                out.append(f"{RAY_OPTION}={following}")
                i += 2
                continue
            out.append(f"{RAY_OPTION}=local")
        elif word == "--":
            return out + argv[i:]
        else:
            out.append(word)
        i += 1
    return out


# --- `mmsearch query` through a running server, without typer -----------------------------------------
class _ArgvError(Exception):
    """A command line the fast path leaves to typer (which explains what is wrong with it)."""


class _UsageError(Exception):
    """A query command line that parses but asks for something impossible."""


class _QueryArgs(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _ArgvError(message)


def _query_argparser() -> argparse.ArgumentParser:
    """The options of the typer `query` command, same names, destinations and defaults (a test compares)."""
    p = _QueryArgs(prog="mmsearch query", add_help=False, allow_abbrev=False)
    p.add_argument("text", nargs="?")
    p.add_argument("--image", type=Path)
    p.add_argument("--audio", type=Path)
    p.add_argument("--target", "-t")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--index", "-i", dest="index_dir", type=Path)
    p.add_argument("--model", "-m")
    p.add_argument("--pretrained")
    p.add_argument("--checkpoint")
    p.add_argument("--device", default="auto")
    p.add_argument("--serve", action="store_true")
    p.add_argument("--local", action="store_true")
    p.add_argument("--json", dest="as_json", action="store_true")
    p.add_argument("--mode", default=constants.DEFAULT_MODE)
    p.add_argument("--fusion", default=constants.DEFAULT_FUSION)
    p.add_argument("--combine", default=constants.DEFAULT_COMBINE)
    p.add_argument("--add", action="append")
    p.add_argument("--subtract", action="append")
    p.add_argument("--weight", action="append")
    p.add_argument("--path", dest="path_glob", action="append")
    p.add_argument("--ext", action="append")
    p.add_argument("--kind", action="append")
    p.add_argument("--after")
    p.add_argument("--before")
    p.add_argument("--min-duration", type=float)
    p.add_argument("--max-duration", type=float)
    p.add_argument("--tag", action="append")
    p.add_argument("--taken-after")
    p.add_argument("--taken-before")
    p.add_argument("--near")
    p.add_argument("--min-confidence", type=float)
    p.add_argument("--min-score", type=float)
    p.add_argument("--preview", action="store_true")
    return p


def _args_options(a: argparse.Namespace) -> dict[str, Any]:
    from mmsearch.client import search_options

    return search_options(
        mode=a.mode, fusion=a.fusion, combine=a.combine, add=a.add, subtract=a.subtract, weight=a.weight,
        path=a.path_glob, ext=a.ext, kind=a.kind, after=a.after, before=a.before, min_duration=a.min_duration,
        max_duration=a.max_duration, min_confidence=a.min_confidence, min_score=a.min_score, tag=a.tag,
        taken_after=a.taken_after, taken_before=a.taken_before, near=a.near,
    )  # fmt: skip


def _fast_query(argv: list[str]) -> bool:
    """Answer `mmsearch query ...` without importing typer: through a running server for its index, or
    searched in this process as the typer command would (typer and click cost more than the search).

    False, having printed nothing, whenever the typer command should handle the command line instead
    (``--help``, a command line it explains the fault of, ``--serve`` with no server up).
    """
    if not argv or argv[0] != "query":
        return False
    try:
        a = _query_argparser().parse_args(argv[1:])
        target = _query_target(a.text, a.image, a.audio, a.target, a.add)
        options = _args_options(a)
    except (_ArgvError, _UsageError):
        return False
    # click reads every word starting with "-" as an option; argparse takes "-5" or "-a b" as the TEXT.
    if (a.text or "").startswith("-") or not 1 <= a.k <= MAX_K:
        return False
    from mmsearch import client

    asked = _Asked(a.text, a.image, a.audio, target, a.k, options, a.as_json, a.preview)
    path = a.index_dir or _default_index_path()
    try:
        if _server_may_answer(a.local, a.model, a.pretrained, a.checkpoint, a.device, a.k):
            url = client.find_server(path)
            if url is None and a.serve:
                return False  # the typer command starts one
            answered = url is not None and _answered_by_server(url, asked)
        else:
            answered = False
        if not answered:
            _configure_logging(verbose=False)  # as the typer application's callback does
            _search_here(path, a.model, a.pretrained, a.checkpoint, a.device, asked)
        sys.stdout.flush()
    except KeyboardInterrupt:
        sys.exit(130)  # silently, as typer does
    except BrokenPipeError:
        # `mmsearch query ... | head -1`: as typer does, exit 1 without a traceback on the next flush.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    return True


# --- what both paths share -----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Asked:
    """A query as the command line asks it, and how to print its answer: the same whoever answers it (a
    server, or this process)."""

    text: str | None
    image: Path | None
    audio: Path | None
    target: str
    k: int
    options: dict[str, Any]
    as_json: bool
    preview: bool = False


def _query_target(
    text: str | None, image: Path | None, audio: Path | None, target: str | None, add: list[str] | None = None
) -> str:
    """The target to search (its default depends on the query), or :class:`_UsageError`."""
    if text is None and image is None and audio is None and not add:
        raise _UsageError("give TEXT, --image PATH, --audio PATH or --add TEXT")
    if audio is not None and (text is not None or image is not None):
        raise _UsageError("--audio goes alone: no TEXT or --image with it")
    target = target or ("texts" if image is not None and text is None else "images")
    if target not in TARGETS:
        raise _UsageError(f"unknown --target '{target}' (choose from {', '.join(TARGETS)})")
    return target


def _server_may_answer(
    local: bool, model: str | None, pretrained: str | None, checkpoint: str | None, device: str, k: int
) -> bool:
    # A server searches with the index's own model on its own device: options that choose either mean "here".
    # It also caps k (client.SERVER_MAX_K) where a local search allows up to MAX_K.
    from mmsearch.constants import SERVER_MAX_K

    chosen_here = model is not None or pretrained is not None or checkpoint is not None or device != "auto"
    return not local and not chosen_here and k <= SERVER_MAX_K


# Set once a server failed this process's query, so the typer command does not ask it a second time.
_server_failed = False


def _answered_by_server(server: "Server", asked: _Asked) -> bool:
    """Print the answer of ``server`` (from :func:`mmsearch.client.find_server`). False, having printed only
    a warning on stderr, if the server failed (:class:`mmsearch.client.ServerError`: it crashed, went away,
    answered 5xx): the query is then searched in this process. A query the server rejects (BadQueryError)
    still raises."""
    global _server_failed
    from mmsearch import client

    if _server_failed:
        return False
    try:
        payload = client.query_server(
            server,
            text=asked.text,
            image=asked.image,
            audio=asked.audio,
            target=asked.target,
            k=asked.k,
            options=asked.options,
        )
    except client.ServerError as e:
        _server_failed = True
        _err().print(
            f"warning: {render.printable(str(e))}; searching in this process instead",
            markup=False,
            highlight=False,
        )
        return False
    _print_query(
        payload["target"],
        payload["hits"],
        payload.get("transcript"),
        asked.as_json,
        payload["no_match"],
        asked.preview,
    )
    return True


def _search_here(
    path: Path, model: str | None, pretrained: str | None, checkpoint: str | None, device: str, asked: _Asked
) -> None:
    """Search the index at ``path`` in this process (with the model and device chosen, if any) and print the
    answer.

    The cyclic garbage collector is off meanwhile: importing the engine creates tens of thousands of objects
    and almost no garbage, yet sets off a collection every few hundred allocations; one search leaves little
    cyclic garbage behind."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        # With the index's own model, unless only words are searched (nothing embedded, no vectors read).
        options = asked.options
        if model is None and pretrained is None and checkpoint is None and options.get("mode") != "words":
            embeds_text = asked.text is not None or bool(options.get("add")) or bool(options.get("subtract"))
            _prefetch_local_search(path, device, asked.target, embeds_text)
        from mmsearch import Index

        with Index.open(
            path, model=model, pretrained=pretrained, checkpoint=checkpoint, device=device
        ) as idx:
            result = idx.search(
                asked.text, image=asked.image, audio=asked.audio, target=asked.target, k=asked.k, **options
            )
    finally:
        if collecting:
            gc.enable()
    hits = [h.as_dict() for h in result.hits]
    _print_query(asked.target, hits, result.transcript, asked.as_json, result.no_match, asked.preview)


def _prefetch_local_search(path: Path, device: str, target: str, embeds_text: bool) -> None:
    """Start, on threads, the parts of a local search that need neither the catalog nor the GIL, so that they
    run while this process imports the engine (most of a cold query): hashing the target's saved vector
    files, and making the ONNX Runtime session of the index's text tower. The search takes either only if it
    opens the very same file (:func:`mmsearch.vectors.prefetch_digests`,
    :func:`mmsearch.onnx_text.prefetch_session`); otherwise it does the work itself, as without this.
    Never raises: whatever is wrong with the index, the search itself says."""
    from mmsearch.discovery import index_model
    from mmsearch.identity import model_key

    identity = index_model(path)
    if identity is None:
        return
    try:
        if embeds_text:
            from mmsearch.onnx_embedder import prefetch_text_tower

            prefetch_text_tower(identity, device)
        from mmsearch.vectors import prefetch_digests

        model = model_key(identity)
        prefetch_digests(
            constants.vector_file(path, model, kind) for kind in constants.TARGETS.get(target, ())
        )
    except Exception as e:  # e.g. a damaged mmsearch.json
        logging.getLogger(__name__).debug("nothing prefetched for %s: %s", path, e)


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not verbose:
        # open_clip and faiss log routine INFO/WARNING lines on the root logger.
        for name in ("root", "faiss", "faiss.loader"):
            logging.getLogger(name if name != "root" else None).setLevel(logging.ERROR)
    # A Ctrl-C that lands while SQLAlchemy returns a connection to its pool is logged by SQLAlchemy (on a
    # logger per pool, "sqlalchemy.pool.impl.QueuePool") with a traceback, then raised on: main() reports the
    # interrupt in one line, so that record is dropped where it would be printed.
    for handler in logging.getLogger().handlers:
        handler.addFilter(_not_a_pool_interrupt)


def _not_a_pool_interrupt(record: logging.LogRecord) -> bool:
    interrupted = bool(record.exc_info) and isinstance(record.exc_info[1], KeyboardInterrupt)  # type: ignore[index]
    return not (interrupted and record.name.startswith("sqlalchemy.pool"))


def _default_index_path() -> Path:
    return constants.default_index_path()


# --- the typer application -----------------------------------------------------------------------------
def __getattr__(name: str) -> Any:
    # `from mmsearch.cli import app` (tests, typer tooling) builds it.
    if name == "app":
        return _typer_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _typer_app() -> "typer.Typer":
    """Every command, with typer. Its annotations are evaluated here, so this module must not use
    ``from __future__ import annotations`` (typer would look the names up among the module's globals)."""
    import typer

    app = typer.Typer(
        add_completion=False,
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        help="Cross-modal semantic search over folders of images, captions and audio.",
    )
    IndexOpt = Annotated[
        Path | None,
        typer.Option("--index", "-i", help="Index folder [default: $MMSEARCH_INDEX or indexes/default]"),
    ]
    JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
    ModelOpt = Annotated[
        str | None,
        typer.Option(
            "--model", "-m", help="OpenCLIP architecture, a model-config .json, or 'demo' [default: ViT-B-32]"
        ),
    ]
    PretrainedOpt = Annotated[
        str | None, typer.Option("--pretrained", help="OpenCLIP pretrained tag [default: laion2b_s34b_b79k]")
    ]
    CheckpointOpt = Annotated[
        str | None, typer.Option("--checkpoint", help="Local weights file (.safetensors/.pt)")
    ]
    DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:1, mps")]

    @app.callback()
    def _main(
        verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what happens.")] = False,
    ) -> None:
        _tolerant_streams()  # again: the application can be run without main()
        _configure_logging(verbose)

    @app.command()
    def index(
        folders: Annotated[list[Path], typer.Argument(help="Folders of images, caption files and audio.")],
        index_dir: IndexOpt = None,
        model: ModelOpt = None,
        pretrained: PretrainedOpt = None,
        checkpoint: CheckpointOpt = None,
        speech_backend: Annotated[
            str | None, typer.Option(help="faster-whisper or openai-whisper [default: faster-whisper]")
        ] = None,
        speech_model: Annotated[str | None, typer.Option(help="Whisper model name or local path")] = None,
        language: Annotated[str | None, typer.Option(help="Spoken language code, e.g. en")] = None,
        device: DeviceOpt = "auto",
        workers: Annotated[int, typer.Option(min=1, max=64, help="Decoding threads")] = 2,
        image_tower: Annotated[
            str | None,
            typer.Option(
                help="CPU image embedding: onnx-int8 (default), onnx-fp32 or torch [env MMSEARCH_IMAGE_TOWER]"
            ),
        ] = None,
        follow_links: Annotated[
            bool,
            typer.Option(
                "--follow-links", help="Also index what symlinks pointing outside a folder lead to."
            ),
        ] = False,
        prune: Annotated[
            bool,
            typer.Option(
                "--prune",
                help="Forget the files of folders that cannot be seen now (unplugged drive, broken link); "
                "kept by default.",
            ),
        ] = False,
        exclude: Annotated[
            list[str] | None,
            typer.Option(
                "--exclude",
                metavar="GLOB",
                help="Leave out what this pattern names (.gitignore rules, relative to each folder; "
                "repeatable). Files already indexed there are forgotten.",
            ),
        ] = None,
        include_hidden: Annotated[
            bool,
            typer.Option(
                "--include-hidden",
                help="Also index hidden files and folders (thumbnail and cache folders stay left out).",
            ),
        ] = False,
        ray: Annotated[
            str | None,
            typer.Option(
                "--ray",
                metavar="[ADDRESS]",
                help="Embed and transcribe on a Ray cluster: bare --ray starts one here, --ray auto joins "
                "the running one, or its HOST:PORT. Every node must see the folders at the same path.",
            ),
        ] = None,
        ray_actors: Annotated[
            int | None,
            typer.Option(
                "--ray-actors", min=1, help="Image embedding actors [default: one per GPU, else CPUs / 2]"
            ),
        ] = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Index FOLDERS (incrementally: only new or changed files do model work).

        Left out: hidden entries, thumbnail/cache folders (@eaDir, .git, __MACOSX...), and what a
        .mmsearchignore file (gitignore rules, in any folder) or --exclude names."""
        from mmsearch import default_index_path, open_or_create
        from mmsearch.store import Store

        path = index_dir or default_index_path()
        if exclude:
            from mmsearch.ignore import exclude_rules

            exclude_rules(exclude)  # an invalid pattern is reported before any index is opened or created
        for folder in folders:
            # A folder missing now may be an unplugged drive the index knows: the run keeps its files.
            if not folder.is_dir() and not Store.exists(path):
                raise MmsearchError(f"not a folder: {folder}")  # printable() in main()
        idx = open_or_create(
            path,
            model=model,
            pretrained=pretrained,
            checkpoint=checkpoint,
            speech_backend=speech_backend,
            speech_model=speech_model,
            language=language,
            device=device,
            image_tower=image_tower,
        )
        reports = []
        remote = None
        if ray is not None:
            from mmsearch.ray_ingest import RayOptions

            remote = RayOptions(address=ray, image_actors=ray_actors)
        with idx:
            try:
                for folder in folders:
                    with _progress(enabled=not as_json) as tick:
                        reports.append(
                            idx.add_folder(
                                folder,
                                progress=tick,
                                workers=workers,
                                follow_links=follow_links,
                                prune=prune,
                                exclude=exclude or (),
                                include_hidden=include_hidden,
                                ray=remote,
                            )
                        )
            except KeyboardInterrupt:
                _interrupted("work committed so far is kept")
            if as_json:
                _print_json({"index": str(idx.path), "runs": [r.as_dict() for r in reports]})
            else:
                for r in reports:
                    _print_report(r)

    @app.command()
    def query(
        text: Annotated[str | None, typer.Argument(help="Text to search for.")] = None,
        image: Annotated[Path | None, typer.Option("--image", help="Search with an image.")] = None,
        audio: Annotated[Path | None, typer.Option("--audio", help="Search with a spoken recording.")] = None,
        target: Annotated[
            str | None,
            typer.Option("--target", "-t", help=f"{'|'.join(TARGETS)} [default: images; texts for --image]"),
        ] = None,
        k: Annotated[int, typer.Option("-k", min=1, max=MAX_K, help="Number of results.")] = 10,
        index_dir: IndexOpt = None,
        model: ModelOpt = None,
        pretrained: PretrainedOpt = None,
        checkpoint: CheckpointOpt = None,
        device: DeviceOpt = "auto",
        serve: Annotated[
            bool,
            typer.Option(
                "--serve",
                help="Start a background server for this index if none is running (it exits after 15 idle "
                "minutes), so that the next queries answer in well under a second.",
            ),
        ] = False,
        local: Annotated[
            bool, typer.Option("--local", help="Search in this process even if a server is up.")
        ] = False,
        as_json: JsonOpt = False,
        mode: Annotated[
            str, typer.Option(help="hybrid: words and meaning | vector: meaning only | words: words only")
        ] = constants.DEFAULT_MODE,
        fusion: Annotated[
            str, typer.Option(help="How hybrid merges words and meaning: rrf (ranks) | weighted (scores)")
        ] = constants.DEFAULT_FUSION,
        combine: Annotated[
            str,
            typer.Option(help="How several inputs merge: early (one summed vector) | late (rank fusion)"),
        ] = constants.DEFAULT_COMBINE,
        add: Annotated[
            list[str] | None, typer.Option("--add", help="Add this text's meaning to the query (repeatable).")
        ] = None,
        subtract: Annotated[
            list[str] | None,
            typer.Option("--subtract", help="Take this text's meaning away from the query (repeatable)."),
        ] = None,
        weight: Annotated[
            list[str] | None,
            typer.Option(
                "--weight", help="ROLE=W: weight of text, image, audio, add or subtract (default 1)."
            ),
        ] = None,
        path_glob: Annotated[
            list[str] | None,
            typer.Option("--path", help="Only files whose full path matches this glob (repeatable: any)."),
        ] = None,
        ext: Annotated[
            list[str] | None, typer.Option("--ext", help="Only files with this extension (repeatable).")
        ] = None,
        kind: Annotated[
            list[str] | None,
            typer.Option("--kind", help="Only files of this kind: image | audio | video (repeatable)."),
        ] = None,
        after: Annotated[
            str | None,
            typer.Option(help="Only files modified at or after this date (ISO 8601 or unix time)."),
        ] = None,
        before: Annotated[str | None, typer.Option(help="Only files modified before this date.")] = None,
        min_duration: Annotated[
            float | None, typer.Option(help="Only recordings at least this many seconds long.")
        ] = None,
        max_duration: Annotated[
            float | None, typer.Option(help="Only recordings at most this many seconds long.")
        ] = None,
        tag: Annotated[
            list[str] | None,
            typer.Option(help="Only files with this keyword or zero-shot tag (repeatable: any)."),
        ] = None,
        taken_after: Annotated[
            str | None,
            typer.Option(help="Only photos taken at or after this date (file time when a photo has none)."),
        ] = None,
        taken_before: Annotated[str | None, typer.Option(help="Only photos taken before this date.")] = None,
        near: Annotated[
            str | None,
            typer.Option(help="LAT,LON,KM: only photos taken within KM of this place (e.g. 48.86,2.29,5)."),
        ] = None,
        min_confidence: Annotated[
            float | None,
            typer.Option(help="Cut hits below this calibrated confidence (0-1; 0 shows everything)."),
        ] = None,
        min_score: Annotated[
            float | None, typer.Option(help="Cut hits below this raw cosine similarity.")
        ] = None,
        preview: Annotated[
            bool,
            typer.Option(
                "--preview",
                help="Show image hits inline in kitty, iTerm2 and sixel terminals ($MMSEARCH_PREVIEW: "
                "kitty, iterm2, sixel or none overrides the guess); plain output elsewhere.",
            ),
        ] = False,
    ) -> None:
        """Search by TEXT, --image or --audio, with filters and +/- terms (through a running `mmsearch serve`
        for the index when there is one). Says "no good match" when nothing in the index answers well."""
        from mmsearch.client import search_options

        try:
            target = _query_target(text, image, audio, target, add)
        except _UsageError as e:
            _usage(str(e))
        options = search_options(
            mode=mode, fusion=fusion, combine=combine, add=add, subtract=subtract, weight=weight,
            path=path_glob, ext=ext, kind=kind, after=after, before=before, min_duration=min_duration,
            max_duration=max_duration, min_confidence=min_confidence, min_score=min_score, tag=tag,
            taken_after=taken_after, taken_before=taken_before, near=near,
        )  # fmt: skip
        asked = _Asked(text, image, audio, target, k, options, as_json, preview)
        path = index_dir or _default_index_path()
        if _server_may_answer(local, model, pretrained, checkpoint, device, k):
            from mmsearch import client

            url = client.find_server(path)
            if url is None and serve:
                _err().print("starting a background server for this index …", markup=False)
                url = client.start_server(path)
            if url is not None and _answered_by_server(url, asked):
                return
        _search_here(path, model, pretrained, checkpoint, device, asked)

    @app.command()
    def serve(
        index_dir: IndexOpt = None,
        host: Annotated[
            str, typer.Option(help="Address to listen on. Anything but loopback lets others read your files.")
        ] = "127.0.0.1",
        port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free port).")] = 8765,
        allow_host: Annotated[
            list[str] | None,
            typer.Option("--allow-host", help="Also accept this Host header (e.g. a LAN name)."),
        ] = None,
        idle_minutes: Annotated[
            float | None, typer.Option(min=0.1, help="Exit after this many minutes without a request.")
        ] = None,
        ray: Annotated[
            str | None,
            typer.Option(
                "--ray",
                help="Search vectors sharded over Ray actors: 'local' starts Ray here, 'auto' joins this "
                "machine's cluster, or a cluster address. Needs the 'ray' extra.",
            ),
        ] = None,
        shards: Annotated[
            int | None, typer.Option(min=1, help="With --ray: how many shards (default: one per node).")
        ] = None,
    ) -> None:
        """Serve the web page and the HTTP API of an index (http://127.0.0.1:8765 by default)."""
        from mmsearch.server import serve as run_server

        path = index_dir or _default_index_path()
        from mmsearch.server import exposure_warning

        warning = exposure_warning(host)
        if warning:
            _err().print(render.printable(f"warning: {warning}"), markup=False)

        def ready(url: str) -> None:
            _err().print(
                render.printable(f"serving {path} at {url} — open it in a browser; Ctrl-C stops"),
                markup=False,
            )

        try:
            run_server(
                path,
                host,
                port,
                allowed_hosts=allow_host or [],
                idle_timeout=idle_minutes * 60 if idle_minutes else None,
                on_ready=ready,
                ray=ray,
                shards=shards,
            )
        except KeyboardInterrupt:
            _err().print("stopped", markup=False)

    @app.command()
    def mcp(index_dir: IndexOpt = None) -> None:
        """Serve an index to an AI assistant over the Model Context Protocol (stdio): search by text, image
        or recording, item details and status, read-only. Needs the 'mcp' extra."""
        from mmsearch.mcp_server import main as serve_mcp

        raise typer.Exit(serve_mcp(index_dir or _default_index_path()))

    @app.command()
    def export(
        out: Annotated[Path, typer.Argument(help="Folder to write (new, or empty).")],
        index_dir: IndexOpt = None,
        fmt: Annotated[
            str,
            typer.Option(
                "--format",
                help="parquet: vectors in an 'embedding' column beside the metadata | npy: .npy shards and "
                "metadata parquet (clip-retrieval's inference output)",
            ),
        ] = "parquet",
        float16: Annotated[
            bool, typer.Option("--float16", help="Write vectors as float16 (half the size).")
        ] = False,
        as_json: JsonOpt = False,
    ) -> None:
        """Write the active model's vectors with their metadata (path, kind, captions, segment times, model)
        for other vector stores, in clip-retrieval's layout. Needs the 'export' extra."""
        from mmsearch import Index
        from mmsearch.export import export as write_export

        with Index.open(index_dir or _default_index_path()) as idx:
            report = write_export(idx, out, fmt, dtype="float16" if float16 else "float32")
        if as_json:
            _print_json(report.as_dict())
            return
        _line(
            f"exported {report.counts['images']} image and {report.counts['texts']} text vectors "
            f"({report.format}, {report.dtype}) to {report.out}"
            + (f"; {report.skipped} left out (no live file)" if report.skipped else "")
        )

    @app.command()
    def tag(
        labels_file: Annotated[
            Path | None,
            typer.Option("--labels", help="A file of labels, one a line ('#' starts a comment)."),
        ] = None,
        label: Annotated[list[str] | None, typer.Option("--label", help="A label (repeat for more).")] = None,
        min_confidence: Annotated[
            float | None,
            typer.Option(
                "--min-confidence",
                min=0.0,
                max=1.0,
                help="Store tags at least this confident (calibrated, 0-1; default measured on the demo world).",
            ),
        ] = None,
        raw: Annotated[
            bool, typer.Option("--raw", help="Embed each label as it is, without prompt templates.")
        ] = False,
        clear: Annotated[
            bool, typer.Option("--clear", help="Delete every zero-shot tag, then stop.")
        ] = False,
        index_dir: IndexOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Tag every image with the labels it shows (CLIP zero-shot classification, calibrated confidence);
        running it again with the same labels replaces their tags, and content indexed later gets them too."""
        from mmsearch import Index, default_index_path
        from mmsearch.tags import read_labels_file

        if clear:
            if labels_file or label:
                _usage("--clear takes no labels")
            with Index.open(index_dir or default_index_path()) as idx:
                removed = idx.clear_tags()
            if as_json:
                _print_json({"index": str(idx.path), "removed": removed})
            else:
                _line(f"removed {removed} zero-shot tags")
            return
        labels = [*(read_labels_file(labels_file) if labels_file else []), *(label or [])]
        if not labels:
            _usage("give labels with --labels FILE or --label LABEL")
        with Index.open(index_dir or default_index_path()) as idx, _progress(enabled=not as_json) as tick:
            report = idx.tag(labels, min_confidence=min_confidence, raw=raw, progress=tick)
        if as_json:
            _print_json({"index": str(idx.path), **report.as_json()})
            return
        _line(
            f"tagged {report.images} images with {len(report.labels)} labels: {report.total} tags "
            f"(confidence >= {report.min_confidence}, {report.removed} earlier tags of these labels replaced)"
        )
        if report.reason:
            _line(f"nothing tagged: {report.reason}")
        elif report.calibration == "captions":
            _line(
                f"note: only {report.known_matches} captions name a label; confidences use the caption "
                "calibration, which is stricter for single labels"
            )
        for name, n in sorted(report.tagged.items(), key=lambda kv: -kv[1]):
            _line(f"  {n:6d}  {name}")

    @app.command()
    def status(index_dir: IndexOpt = None, as_json: JsonOpt = False) -> None:
        """Show what an index holds, and the files it skipped with their reasons."""
        from mmsearch import Index, default_index_path

        with Index.open(index_dir or default_index_path()) as idx:
            stats, skipped = idx.stats(), idx.skipped()
        if as_json:
            _print_json({**stats, "skipped": skipped})
            return
        # Every line holds text read from the index folder: each goes through _line (printable, no markup).
        _line(f"index   {stats['index']}")
        model = stats["model"]
        _line(f"model   {model['name']} ({model.get('pretrained') or 'checkpoint'}, dim {model['dim']})")
        files = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(stats["files"].items())) or "none"
        _line(f"files   {files}")
        vectors = ", ".join(f"{n} {k}" for k, n in sorted(stats["vectors"].items())) or "none"
        _line(f"vectors {vectors}")
        _line(
            f"content {stats['media']} distinct, {stats['captions']} captions, {stats['segments']} transcript segments"
        )
        photos = stats.get("photos", {})
        if photos.get("caption_sources"):
            _line("captions " + ", ".join(f"{n} {o}" for o, n in photos["caption_sources"].items()))
        if photos.get("taken") or photos.get("placed") or photos.get("with_keywords"):
            taken = ", ".join(f"{n} {s}" for s, n in sorted(photos.get("taken", {}).items()))
            _line(
                f"photos  {sum(photos.get('taken', {}).values())} dated ({taken or 'none'}), "
                f"{photos.get('placed', 0)} placed, {photos.get('cameras', 0)} camera(s), "
                f"{photos.get('with_keywords', 0)} with keywords"
            )
        if stats.get("zero_shot_tags"):
            _line("tags    " + ", ".join(f"{t} {n}" for t, n in stats["zero_shot_tags"].items()))
        if len(stats.get("models", [])) > 1:  # coverage of each model while the index changes model
            for m in stats["models"]:
                role = "active" if m["active"] else "target" if m["target"] else "kept"
                have = ", ".join(f"{m['vectors'][k]}/{m['items'][k]} {k}" for k in sorted(m["items"]))
                _line(f"model   {m['name']} [{role}]: {have}")
        if skipped:
            _line(f"skipped {len(skipped)}:")
            for s in skipped:
                _line(f"  {s['path']}: {s['reason']}")
        for u in stats.get("unavailable", []):
            _line(f"kept    {u['files_kept']} files under {u['root']} that the last run could not see:")
            for f in u["folders"]:
                _line(f"  {f['path']}: {f['reason']}")

    @app.command()
    def reembed(
        model: Annotated[
            str,
            typer.Option(
                "--model",
                "-m",
                help="The new model: an OpenCLIP architecture, a model-config .json, or 'demo'",
            ),
        ],
        pretrained: PretrainedOpt = None,
        checkpoint: CheckpointOpt = None,
        index_dir: IndexOpt = None,
        keep_old: Annotated[
            bool,
            typer.Option("--keep-old", help="Keep the previous model's vectors (for `mmsearch activate`)."),
        ] = False,
        device: DeviceOpt = "auto",
        workers: Annotated[int, typer.Option(min=1, max=64, help="Decoding threads")] = 2,
        as_json: JsonOpt = False,
    ) -> None:
        """Embed the whole index with another model while it keeps answering, then switch to it (resumable:
        run it again after an interruption)."""
        from mmsearch import Index, default_index_path
        from mmsearch.identity import ModelSpec

        with Index.open(index_dir or default_index_path(), device=device) as idx:
            try:
                with _progress(enabled=not as_json) as tick:
                    report = idx.reembed(
                        ModelSpec(model, pretrained, checkpoint),
                        progress=tick,
                        keep_old=keep_old,
                        workers=workers,
                    )
            except KeyboardInterrupt:
                _interrupted("the vectors committed so far are kept")
        if as_json:
            _print_json(report.as_dict())
            return
        _line(
            f"re-embedded {report.images} images, {report.captions} captions, {report.segments} segments, "
            f"{report.frames} keyframes "
            f"with {report.model} in {report.seconds:.1f}s"
        )
        for path, reason in report.skipped:
            _line(f"  skipped {path}: {reason}")
        if report.activated:
            kept = "" if report.removed_model else " (previous vectors kept: `mmsearch activate` rolls back)"
            _line(f"{report.model} is now the active model{kept}")
        else:
            _line(
                f"{report.stale} items changed since they were indexed: run `mmsearch index` on their folders, "
                "then this command again"
            )
            raise typer.Exit(1)

    @app.command()
    def retranscribe(
        speech_model: Annotated[str, typer.Option("--speech-model", help="Whisper model name or local path")],
        speech_backend: Annotated[
            str | None, typer.Option(help="faster-whisper or openai-whisper [default: the index's]")
        ] = None,
        language: Annotated[
            str | None, typer.Option(help="Spoken language code [default: the index's]")
        ] = None,
        index_dir: IndexOpt = None,
        device: DeviceOpt = "auto",
        as_json: JsonOpt = False,
    ) -> None:
        """Transcribe every recording again with another speech model while the index keeps answering
        (resumable: run it again after an interruption)."""
        from mmsearch import Index, default_index_path

        with Index.open(index_dir or default_index_path(), device=device) as idx:
            try:
                with _progress(enabled=not as_json) as tick:
                    report = idx.retranscribe(
                        speech_model, speech_backend=speech_backend, language=language, progress=tick
                    )
            except KeyboardInterrupt:
                _interrupted("the transcripts swapped so far are kept")
        if as_json:
            _print_json(report.as_dict())
            return
        _line(
            f"transcribed {report.transcribed} recordings again ({report.segments} segments) in {report.seconds:.1f}s"
        )
        for path, reason in report.kept:
            _line(f"  kept the old transcript of {path}: {reason}")
        if not report.switched:
            _line(
                f"{report.stale} recordings changed since they were indexed: run `mmsearch index` on their "
                "folders, then this command again"
            )
            raise typer.Exit(1)

    @app.command()
    def activate(
        model: Annotated[str, typer.Option("--model", "-m", help="A model the index holds every vector of")],
        pretrained: PretrainedOpt = None,
        checkpoint: CheckpointOpt = None,
        index_dir: IndexOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Search with another model the index holds (kept by `reembed --keep-old`): instant."""
        from mmsearch import Index, default_index_path
        from mmsearch.identity import ModelSpec

        with Index.open(index_dir or default_index_path()) as idx:
            key = idx.activate(ModelSpec(model, pretrained, checkpoint))
        if as_json:
            _print_json({"index": str(idx.path), "active": key})
        else:
            _line(f"{key} is now the active model")

    @app.command()
    def demo(
        folder: Annotated[Path, typer.Argument(help="Where to write the demo media and its index.")] = Path(
            "demo-media"
        ),
        n_images: Annotated[int, typer.Option(min=4, max=5000, help="Generated images.")] = 48,
        seed: Annotated[int, typer.Option(help="Generator seed.")] = 0,
        speech: Annotated[bool, typer.Option(help="Also write and search spoken audio.")] = True,
        k: Annotated[int, typer.Option("-k", min=1, max=50)] = 5,
    ) -> None:
        """Generate a demo folder, index it with the bundled demo model, and query it in every direction."""
        from mmsearch import open_or_create
        from mmsearch.demo.world import write_demo_folder

        _err().print(render.printable(f"writing demo media to {folder} …"), markup=False)
        made = write_demo_folder(folder, n_images=n_images, seed=seed, speech=speech)
        index_dir = folder / "index"
        with open_or_create(index_dir, model="demo") as idx:
            with _progress(enabled=True) as tick:
                report = idx.add_folder(folder / "media", progress=tick)
            _print_report(report)
            _out().rule(_safe(f"text → image: “{made.text_query}”"))
            found = idx.search(made.text_query, target="images", k=k)
            _print_hits([h.as_dict() for h in found.hits], found.no_match)
            _out().rule(
                _safe(f"image → text: {made.image_query} (its caption: “{made.image_query_caption}”)")
            )
            assert made.image_query is not None  # write_demo_folder always makes the query image
            found = idx.search(image=made.image_query, target="texts", k=k)
            _print_hits([h.as_dict() for h in found.hits], found.no_match)
            if speech and made.audio_query is not None:
                spoken = idx.search(audio=made.audio_query, target="images", k=k)
                heard = spoken.transcript
                _out().rule(
                    _safe(
                        f"audio → image: {made.audio_query} (said: “{made.audio_query_text}”, heard: “{heard}”)"
                    )
                )
                _print_hits([h.as_dict() for h in spoken.hits], spoken.no_match)
            if made.videos:  # one hit per video, at its best moment; its other moments folded under it
                shown = ", ".join(
                    f"{p.relative_to(made.media_dir)} at {render.clock(t)}"
                    for p, t in made.moments(made.video_query_stated)
                )
                _out().rule(_safe(f"text → moment: “{made.video_query_text}” (shown in {shown})"))
                found = idx.search(made.video_query_text, target="video", k=k)
                _print_hits([h.as_dict() for h in found.hits], found.no_match)
                if speech and made.audio_query is not None:
                    spoken = idx.search(audio=made.audio_query, target="video", k=k)
                    heard = spoken.transcript
                    _out().rule(_safe(f"audio → moment: heard “{heard}” in {made.audio_query.name}"))
                    _print_hits([h.as_dict() for h in spoken.hits], spoken.no_match)
        _out().print()
        _line(f'Try: mmsearch query --index {index_dir} "a small blue square"')
        if made.videos:
            _line(f'     mmsearch query --index {index_dir} --target video "a yellow star"')

    return app


# --- output helpers ---------------------------------------------------------------------------------
@functools.cache
def _out() -> "Console":
    from rich.console import Console

    # emoji=False: a file named ":smile:.png" is printed as named, not with an emoji in its name.
    return Console(soft_wrap=True, emoji=False)


@functools.cache
def _err() -> "Console":
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True, emoji=False)


def _tolerant_streams() -> None:
    """Make stdout and stderr write what their encoding lacks as a backslash escape (as Python's stderr
    already does) instead of raising UnicodeEncodeError: a strict ASCII or Latin-1 stdout must not turn a
    caption in another script into a failed command. Output that fits the encoding is unchanged."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            with contextlib.suppress(ValueError, OSError):  # closed, or a stream that cannot change
                reconfigure(errors="backslashreplace")


def _stdout_is_terminal() -> bool:
    """rich's answer (it also reads FORCE_COLOR and TTY_COMPATIBLE), without importing rich for a pipe."""
    if "FORCE_COLOR" not in os.environ and "TTY_COMPATIBLE" not in os.environ:
        isatty = getattr(sys.stdout, "isatty", None)
        try:
            if isatty is None or not isatty():
                return False
        except ValueError:  # closed
            return False
    return bool(_out().is_terminal)


def _preview_protocol() -> str | None:
    """The image protocol of the terminal stdout is (see :func:`mmsearch.preview.detect_protocol`), or None
    when stdout is not a terminal or speaks none."""
    if not _stdout_is_terminal():
        return None
    from mmsearch.preview import detect_protocol

    return detect_protocol(os.environ)


def _print_json(payload: Any) -> None:
    sys.stdout.write(render.to_json(payload))


def _print_query(
    target: str,
    hits: list[dict[str, Any]],
    heard: str | None,
    as_json: bool,
    no_match: bool = False,
    preview: bool = False,
) -> None:
    """The same output whether a server or this process answered, and whether typer parsed the command."""
    protocol = _preview_protocol() if preview and hits and not as_json else None
    if as_json:
        sys.stdout.write(render.query_json(target, hits, heard, no_match))
    elif protocol is not None:
        from mmsearch.preview import write_previews

        if heard is not None:
            _line(f"heard: {heard}")
        sys.stdout.flush()
        write_previews(hits, protocol, sys.stdout.buffer)
    elif not _stdout_is_terminal():
        sys.stdout.write(render.plain_query(hits, heard, no_match))
    else:
        if heard is not None:
            _out().print(f"heard: [bold]{_safe(heard)}[/bold]")
        _print_hits(hits, no_match)


def _escape(s: str) -> str:
    from rich.markup import escape

    return escape(s)


def _safe(s: str) -> str:
    """Text from outside (a path, a caption, a transcript) for a place rich reads as markup."""
    return _escape(render.printable(s))


def _line(s: str) -> None:
    """One line on stdout holding text from outside: :func:`render.printable`, not read as markup."""
    _out().print(render.printable(s), markup=False)


def _print_hits(hits: list[dict[str, Any]], no_match: bool = False) -> None:
    if not _stdout_is_terminal():
        sys.stdout.write(render.plain_hits(hits, no_match))
        return
    if not hits:
        _out().print(f"{render.NO_MATCH} in this index" if no_match else "no results")
        return
    from rich.table import Table

    table = Table(show_edge=False, pad_edge=False)
    for col in render.COLUMNS:
        table.add_column(col, overflow="fold")
    for row in render.hit_rows(hits):  # cells already render.printable()
        table.add_row(*(_escape(c) for c in row))
    _out().print(table)


def _interrupted(kept: str) -> NoReturn:
    """Ctrl-C during a resumable command: say what happened to the work (typer would exit 130 silently)."""
    import typer

    _err().print(f"interrupted: {kept}; run the same command again to resume", markup=False)
    raise typer.Exit(130) from None


def _print_report(r: "IngestReport") -> None:
    _line(
        f"indexed {r.root}: {r.files_seen} files seen, {r.unchanged} unchanged, {r.images_embedded} images embedded, "
        f"{r.audio_transcribed} recordings transcribed, {r.videos_indexed} videos ({r.frames_embedded} keyframes), "
        f"{r.segments_embedded} spoken segments, {r.linked} moved/duplicate "
        f"reused, {r.captions_added} captions added ({r.captions_embedded} embedded), {r.captions_removed} removed, {r.files_removed} files gone, "
        f"{len(r.skipped)} skipped — {r.seconds:.1f} s"
    )
    for path, reason in r.partial[:20]:
        _line(f"  partly indexed {path}: {reason}")
    for path, reason in r.skipped[:20]:
        _line(f"  skipped {path}: {reason}")
    if len(r.skipped) > 20:
        _out().print(f"  … and {len(r.skipped) - 20} more (see `mmsearch status`)")
    _print_excluded(r)
    for path, reason in r.metadata_problems[:10]:
        _line(f"  metadata not read {path}: {reason}")
    if len(r.metadata_problems) > 10:
        _out().print(f"  … and {len(r.metadata_problems) - 10} more metadata problems (see --json)")
    if r.unavailable:
        _line(
            f"  kept {r.kept_unavailable} files of folders that cannot be seen now "
            "(run with --prune to forget them):"
        )
        for path, reason in r.unavailable:
            _line(f"    {path}: {reason}")


def _print_excluded(r: "IngestReport") -> None:
    """What was left out on purpose: counts by kind of reason, then the first entries (all in --json)."""
    if not r.excluded and not r.hidden_files:
        return
    from collections import Counter

    from mmsearch.ignore import CACHE_FOLDER_REASON, HIDDEN_FOLDER_REASON, IGNORE_FILE

    def kind(reason: str) -> str:
        if reason == CACHE_FOLDER_REASON:
            return "thumbnail/cache folders"
        if reason == HIDDEN_FOLDER_REASON:
            return "hidden folders"
        return f"by {IGNORE_FILE} rules" if reason.startswith(IGNORE_FILE) else "by --exclude"

    parts = [f"{n} {k}" for k, n in Counter(kind(reason) for _, reason in r.excluded).most_common()]
    if r.hidden_files:
        parts.append(f"{r.hidden_files} hidden media files (use --include-hidden to index them)")
    _line(f"  excluded {len(r.excluded) + r.hidden_files}: {', '.join(parts)}")
    for path, reason in r.excluded[:10]:
        _line(f"  excluded {path}: {reason}")
    if len(r.excluded) > 10:
        _out().print(f"  … and {len(r.excluded) - 10} more (see --json)")


class _progress:
    """A rich progress bar on stderr fed by the library's progress callback; silent when not a TTY."""

    def __init__(self, enabled: bool) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(
            TextColumn("{task.description:>9}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=_err(),
            disable=not enabled or not _err().is_terminal,
            transient=True,
        )
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> Any:
        self.bar.start()

        def tick(stage: str, done: int, total: int) -> None:
            if stage not in self.tasks:
                self.tasks[stage] = self.bar.add_task(stage, total=total)
            self.bar.update(self.tasks[stage], completed=done, total=total)

        return tick

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()


def _usage(message: str) -> NoReturn:
    import typer

    _err().print(f"usage error: {render.printable(message)}", markup=False)
    raise typer.Exit(2)
