"""The `mmsearch` command. The only module that prints, exits, or imports typer/rich.

Library errors (:class:`MmsearchError`) become one line on stderr and exit code 1; usage errors exit 2.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

# Only light imports at module level: `mmsearch query` with a warm server never loads numpy or torch.
from mmsearch.client import TARGET_NAMES as TARGETS
from mmsearch.errors import MmsearchError

if TYPE_CHECKING:
    from mmsearch import IngestReport

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Cross-modal semantic search over folders of images, captions and audio.",
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

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
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not verbose:
        # open_clip and faiss log routine INFO/WARNING lines on the root logger.
        for name in ("root", "faiss", "faiss.loader"):
            logging.getLogger(name if name != "root" else None).setLevel(logging.ERROR)


@app.command()
def index(
    folders: Annotated[list[Path], typer.Argument(help="Folders of images, caption files and audio.")],
    index_dir: IndexOpt = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    checkpoint: CheckpointOpt = None,
    speech_backend: Annotated[str, typer.Option(help="faster-whisper or openai-whisper")] = "faster-whisper",
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
    as_json: JsonOpt = False,
) -> None:
    """Index FOLDERS (incrementally: only new or changed files do model work)."""
    from mmsearch import default_index_path, open_or_create

    for folder in folders:
        if not folder.is_dir():
            raise MmsearchError(f"not a folder: {folder}")
    path = index_dir or default_index_path()
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
    with idx:
        try:
            for folder in folders:
                with _progress(enabled=not as_json) as tick:
                    reports.append(idx.add_folder(folder, progress=tick, workers=workers))
        except KeyboardInterrupt:
            # typer turns KeyboardInterrupt into a silent exit 130; say what happened to the work.
            err.print(
                "interrupted: work committed so far is kept; run the same command again to resume",
                markup=False,
            )
            raise typer.Exit(130) from None
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
    k: Annotated[int, typer.Option("-k", min=1, max=10_000, help="Number of results.")] = 10,
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
) -> None:
    """Search by TEXT, --image or --audio (through a running `mmsearch serve` for the index when there is one)."""
    given = [name for name, v in (("TEXT", text), ("--image", image), ("--audio", audio)) if v is not None]
    if len(given) != 1:
        _usage("give exactly one of TEXT, --image PATH or --audio PATH")
    target = target or ("texts" if image is not None else "images")
    if target not in TARGETS:
        _usage(f"unknown --target '{target}' (choose from {', '.join(TARGETS)})")
    path = index_dir or _default_index_path()
    # A server searches with the index's own model on its own device: options that choose either mean "here".
    use_server = (
        not local and model is None and pretrained is None and checkpoint is None and device == "auto"
    )
    if use_server:
        from mmsearch import client

        url = client.find_server(path)
        if url is None and serve:
            err.print("starting a background server for this index …", markup=False)
            url = client.start_server(path)
        if url is not None:
            payload = client.query_server(url, text=text, image=image, audio=audio, target=target, k=k)
            _print_query(payload["target"], payload["hits"], payload.get("transcript"), as_json)
            return
    from mmsearch import Index

    with Index.open(path, model=model, pretrained=pretrained, checkpoint=checkpoint, device=device) as idx:
        heard = None
        if text is not None:
            hits = idx.search_text(text, target=target, k=k)
        elif image is not None:
            hits = idx.search_image(image, target=target, k=k)
        else:
            assert audio is not None
            heard = idx.transcribe_query(audio)
            hits = idx.search_text(heard, target=target, k=k)
    _print_query(target, [h.as_dict() for h in hits], heard, as_json)


HIT_FIELDS = ("rank", "score", "kind", "path", "text", "start", "end", "item_id", "file_id")


def _print_query(target: str, hits: list[dict[str, Any]], heard: str | None, as_json: bool) -> None:
    """The same output whether a server or this process answered."""
    if as_json:
        payload: dict[str, Any] = {"target": target, "hits": [{f: h[f] for f in HIT_FIELDS} for h in hits]}
        if heard is not None:
            payload["transcript"] = heard
        _print_json(payload)
        return
    if heard is not None:
        out.print(f"heard: [bold]{_escape(heard)}[/bold]")
    _print_hits(hits)


@app.command()
def serve(
    index_dir: IndexOpt = None,
    host: Annotated[
        str, typer.Option(help="Address to listen on. Anything but loopback lets others read your files.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free port).")] = 8765,
    allow_host: Annotated[
        list[str] | None, typer.Option("--allow-host", help="Also accept this Host header (e.g. a LAN name).")
    ] = None,
    idle_minutes: Annotated[
        float | None, typer.Option(min=0.1, help="Exit after this many minutes without a request.")
    ] = None,
) -> None:
    """Serve the web page and the HTTP API of an index (http://127.0.0.1:8765 by default)."""
    from mmsearch.server import serve as run_server

    path = index_dir or _default_index_path()
    if host not in ("127.0.0.1", "localhost", "::1"):
        err.print(
            f"warning: listening on {host}: anyone who can reach it can search this index and read its files",
            markup=False,
        )

    def ready(url: str) -> None:
        err.print(f"serving {path} at {url}/ — open it in a browser; Ctrl-C stops", markup=False)

    try:
        run_server(
            path,
            host,
            port,
            allowed_hosts=allow_host or [],
            idle_timeout=idle_minutes * 60 if idle_minutes else None,
            on_ready=ready,
        )
    except KeyboardInterrupt:
        err.print("stopped", markup=False)


def _default_index_path() -> Path:
    # Same as mmsearch.api.default_index_path, without importing the engine.
    return Path(os.environ.get("MMSEARCH_INDEX", Path("indexes") / "default"))


@app.command()
def status(index_dir: IndexOpt = None, as_json: JsonOpt = False) -> None:
    """Show what an index holds, and the files it skipped with their reasons."""
    from mmsearch import Index, default_index_path

    with Index.open(index_dir or default_index_path()) as idx:
        stats, skipped = idx.stats(), idx.skipped()
    if as_json:
        _print_json({**stats, "skipped": skipped})
        return
    out.print(f"index   {stats['index']}")
    out.print(
        f"model   {stats['model']['name']} ({stats['model'].get('pretrained') or 'checkpoint'}, dim {stats['model']['dim']})"
    )
    files = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(stats["files"].items())) or "none"
    out.print(f"files   {files}")
    vectors = ", ".join(f"{n} {k}" for k, n in sorted(stats["vectors"].items())) or "none"
    out.print(f"vectors {vectors}")
    out.print(
        f"content {stats['media']} distinct, {stats['captions']} captions, {stats['segments']} transcript segments"
    )
    if skipped:
        out.print(f"skipped {len(skipped)}:")
        for s in skipped:
            out.print(f"  {_escape(s['path'])}: {_escape(s['reason'])}")


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

    err.print(f"writing demo media to {folder} …")
    made = write_demo_folder(folder, n_images=n_images, seed=seed, speech=speech)
    index_dir = folder / "index"
    with open_or_create(index_dir, model="demo") as idx:
        with _progress(enabled=True) as tick:
            report = idx.add_folder(folder / "media", progress=tick)
        _print_report(report)
        out.rule(f"text → image: “{made.text_query}”")
        _print_hits([h.as_dict() for h in idx.search_text(made.text_query, target="images", k=k)])
        out.rule(f"image → text: {made.image_query} (its caption: “{made.image_query_caption}”)")
        _print_hits([h.as_dict() for h in idx.search_image(made.image_query, target="texts", k=k)])
        if speech and made.audio_query is not None:
            heard = idx.transcribe_query(made.audio_query)
            out.rule(f"audio → image: {made.audio_query} (said: “{made.audio_query_text}”, heard: “{heard}”)")
            _print_hits([h.as_dict() for h in idx.search_text(heard, target="images", k=k)])
    out.print(f'\nTry: mmsearch query --index {index_dir} "a small blue square"')


# --- output helpers ---------------------------------------------------------------------------------
def _print_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2) + "\n")


def _escape(s: str) -> str:
    from rich.markup import escape

    return escape(s)


def _print_hits(hits: list[dict[str, Any]]) -> None:
    if not hits:
        out.print("no results")
        return
    rows = []
    for h in hits:
        snippet = h["text"] or ""
        if h["start"] is not None and h["end"] is not None:
            snippet = f"[{_clock(h['start'])}–{_clock(h['end'])}] {snippet}"
        rows.append((str(h["rank"]), f"{h['score']:.3f}", h["kind"], h["path"], _shorten(snippet, 120)))
    if not out.is_terminal:
        # Piped: one tab-separated line per hit, never wrapped, so paths survive grep/cut.
        for row in rows:
            sys.stdout.write("\t".join(row) + "\n")
        return
    table = Table(show_edge=False, pad_edge=False)
    for col in ("#", "score", "kind", "path", "text"):
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*(_escape(c) for c in row))
    out.print(table)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _shorten(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _print_report(r: IngestReport) -> None:
    out.print(
        f"indexed {r.root}: {r.files_seen} files seen, {r.unchanged} unchanged, {r.images_embedded} images embedded, "
        f"{r.audio_transcribed} recordings transcribed ({r.segments_embedded} segments), {r.linked} moved/duplicate "
        f"reused, {r.captions_added} captions added, {r.captions_removed} removed, {r.files_removed} files gone, "
        f"{len(r.skipped)} skipped — {r.seconds:.1f} s"
    )
    for path, reason in r.skipped[:20]:
        out.print(f"  skipped {_escape(path)}: {_escape(reason)}")
    if len(r.skipped) > 20:
        out.print(f"  … and {len(r.skipped) - 20} more (see `mmsearch status`)")


class _progress:
    """A rich progress bar on stderr fed by the library's progress callback; silent when not a TTY."""

    def __init__(self, enabled: bool) -> None:
        self.bar = Progress(
            TextColumn("{task.description:>9}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
            disable=not enabled or not err.is_terminal,
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


def _usage(message: str) -> None:
    err.print(f"usage error: {message}", markup=False)
    raise typer.Exit(2)


def main() -> None:
    try:
        app()
    except MmsearchError as e:
        err.print(f"error: {e}", markup=False, highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print(
            "interrupted: work committed so far is kept; run the same command again to resume", markup=False
        )
        sys.exit(130)
