"""Indexing on a Ray cluster: the driver plans and commits, Ray Data carries the model work.

:func:`mmsearch.ingest.ingest` keeps everything that decides what a run does (scan, what changed, what
content is new) and stays the only writer of the index. Given a :class:`RayWork`, it hands the new content
to the cluster instead of its own decode threads, model streams and transcriber:

* images: (content hash, path) rows → :func:`decode_images`, CPU tasks that read and decode each file
  within the same budgets as a local run and apply the model's own preprocessing (torch-free, the settings
  of its ONNX export) → :class:`ImageTower`, an actor pool holding one model per actor (``num_gpus=1`` per
  actor on a cluster with GPUs, the ONNX tower on CPU nodes) → vectors;
* audio: (content hash, path) rows → :class:`SpeechTower`, an actor pool of Whisper models → :class:`TextTower`
  (the segments' texts, on the embedding actors' model) → transcripts and their vectors.

Results stream back to the driver, which commits each batch through the same transactional path as a local
run: what a crash of the driver loses is only the batches in flight, and the next run resumes from what was
committed. A failed task is retried and a dead actor restarted by Ray (Ray Data's actor pools restart their
actors and retry their tasks); the driver takes each content hash once, so a retried batch never lands
twice. A file that cannot be read on a worker comes back with its reason and is recorded as skipped, as in a
local run.

Workers read files at the path the driver's scan found them at: every node must see the indexed folder at
the same path (a shared filesystem). :func:`open_source` is where another source (object store URIs
through ``pyarrow.fs`` or fsspec) would be added; nothing else reads a file.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from mmsearch import ray_cluster
from mmsearch.errors import BadMediaError, ConfigError
from mmsearch.ingest import AudioDone, ImageDone

log = logging.getLogger(__name__)

#: Rows per decode task: large enough to amortise a task's scheduling, small enough to spread the work.
DECODE_ROWS = 16
#: Fewest new files whose hashing is handed to the cluster (unless ``RayOptions.remote_hashing`` says):
#: below it, hashing on the driver is quicker than starting one more job.
REMOTE_HASH_MIN = 256
#: Files per hashing task: each is read whole, so a batch is a few hundred MB of photos at most.
HASH_ROWS = 64
#: Audio files per transcription call (each is minutes of model work: one at a time spreads them best).
SPEECH_ROWS = 1


@dataclass(frozen=True)
class RayOptions:
    """How a run uses the cluster. ``address``: :data:`ray_cluster.LOCAL` (start one here),
    :data:`ray_cluster.AUTO` (the running cluster) or an address. ``image_actors`` / ``speech_actors``: the
    size of each actor pool (default: one per GPU where the cluster has GPUs, else half its CPUs for images
    and one for speech). ``batch_size``: images per model call and per commit."""

    address: str | None = ray_cluster.LOCAL
    image_actors: int | None = None
    speech_actors: int | None = None
    batch_size: int = 32
    #: Hash new files on the cluster: None (default) when it has nodes on other machines; on this machine
    #: alone, one job more costs more than the driver's own reading.
    remote_hashing: bool | None = None


@dataclass(frozen=True)
class ModelSettings:
    """What an actor needs to load the index's model and a decode task to prepare its input: plain data,
    shipped to the workers (never a loaded model)."""

    identity: dict[str, Any]
    image_tower: str  # on CPU nodes: "onnx-int8", "onnx-fp32" or "torch"
    preprocess: dict[str, Any]  # mmsearch.preprocess.ImagePreprocess settings, from the model's ONNX export
    input_size: int

    @property
    def dim(self) -> int:
        return int(self.identity["dim"])


def open_source(path: bytes) -> Path | IO[bytes]:
    """What a worker decodes for a row's path: the file itself, at the same path as on the driver (a
    shared filesystem). Another source (``s3://…`` through ``pyarrow.fs``) returns an open stream here."""
    return Path(os.fsdecode(path))


def hash_files(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A Ray Data CPU task: each row's file hashed (``sha256``), or the error reading it (``error``: the
    errno and message, so that the driver records the same reason a local run would)."""
    from mmsearch.ingest import hash_paths

    paths = [Path(os.fsdecode(path)) for path in batch["path"]]
    read = hash_paths(paths)
    found = [read[path] for path in paths]  # row by row
    shas = [r if isinstance(r, str) else "" for r in found]
    errors = [json.dumps([r.errno, r.strerror or str(r)]) if isinstance(r, OSError) else "" for r in found]
    return {
        "path": batch["path"],
        "sha256": np.array(shas, dtype=object),
        "error": np.array(errors, dtype=object),
    }


def decode_images(
    batch: dict[str, np.ndarray], preprocess: dict[str, Any], input_size: int, budget: float
) -> dict[str, np.ndarray]:
    """A Ray Data CPU task: each row's image decoded and preprocessed (``pixels``), or why not (``error``,
    empty when decoded). The decode budget of a local run holds: an image that overruns it is given up."""
    from mmsearch.images import load_image
    from mmsearch.ingest import DecodePool, bounded_map
    from mmsearch.preprocess import ImagePreprocess

    prepare = ImagePreprocess.from_config(preprocess)
    side = prepare.input_size

    def decode(path: bytes) -> tuple[np.ndarray | None, str]:
        try:
            return prepare(load_image(open_source(path), draft_size=input_size)), ""
        except BadMediaError as e:
            return None, str(e)

    def overran(path: bytes) -> tuple[np.ndarray | None, str]:
        return None, f"decoding took longer than {budget:g} s"

    pool = DecodePool(1)
    try:
        decoded = list(
            bounded_map(decode, list(batch["path"]), pool, ahead=2, budget=budget, on_timeout=overran)
        )
    finally:
        pool.close()
    pixels = np.zeros((len(decoded), 3, side, side), np.float32)
    for i, (p, _) in enumerate(decoded):
        if p is not None:
            pixels[i] = p
    return {
        "sha256": batch["sha256"],
        "pixels": pixels,
        "error": np.array([e for _, e in decoded], dtype=object),
    }


def _load_embedder(settings: ModelSettings, device: str) -> Any:
    """The index's model in an actor, checked to be the one the index was built with."""
    from mmsearch.model import load_recorded, prepare_for_indexing

    embedder = load_recorded(settings.identity, device, settings.image_tower)
    if device == "cpu":
        prepare_for_indexing(embedder, settings.image_tower)
    return embedder


def _device() -> str:
    """The device of an actor: the GPU Ray gave it, else the CPU."""
    ray = ray_cluster.ray_module()
    return "cuda" if ray.get_gpu_ids() else "cpu"


class ImageTower:
    """A Ray Data actor: one model, embedding the decoded images of each batch it is given."""

    def __init__(self, settings: ModelSettings) -> None:
        self.embedder = _load_embedder(settings, _device())
        self.dim = int(self.embedder.dim)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.array([not e for e in batch["error"]], dtype=bool)
        vectors = np.zeros((len(ok), self.dim), np.float32)
        if ok.any():
            vectors[ok] = self.embedder.embed_image_tensors(np.ascontiguousarray(batch["pixels"][ok]))
        return {"sha256": batch["sha256"], "error": batch["error"], "vector": vectors}


class SpeechTower:
    """A Ray Data actor: one Whisper model, transcribing each audio file it is given."""

    def __init__(self, speech: dict[str, Any]) -> None:
        from mmsearch.transcribe import load_transcriber

        self.transcriber = load_transcriber(
            speech["backend"], speech["model"], language=speech["language"], device=_device()
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from mmsearch.ingest import transcribe_file

        out, errors = [], []
        for path in batch["path"]:
            transcript, reason = transcribe_file(self.transcriber, Path(os.fsdecode(path)))
            out.append(_transcript_json(transcript) if transcript is not None and reason is None else "")
            errors.append(reason or "")
        return {
            "sha256": batch["sha256"],
            "transcript": np.array(out, dtype=object),
            "error": np.array(errors, dtype=object),
            "speech": np.array([json.dumps(self.transcriber.identity)] * len(out), dtype=object),
        }


class TextTower:
    """A Ray Data actor: the model's text tower, embedding the texts of each transcript (see
    :func:`mmsearch.ingest.transcript_spans`)."""

    def __init__(self, settings: ModelSettings) -> None:
        self.embedder = _load_embedder(settings, _device())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from mmsearch.ingest import transcript_spans

        vectors = []
        for text in batch["transcript"]:
            if not text:
                vectors.append(b"")
                continue
            texts, _ = transcript_spans(_transcript_of(text))
            vectors.append(np.asarray(self.embedder.embed_texts(texts), np.float32).tobytes())
        return {**batch, "vectors": np.array(vectors, dtype=object)}


def _transcript_json(transcript: Any) -> str:
    return json.dumps(
        {
            "language": transcript.language,
            "duration": transcript.duration,
            "segments": [[s.start, s.end, s.text] for s in transcript.segments],
        }
    )


def _transcript_of(text: str) -> Any:
    from mmsearch.transcribe import Segment, Transcript

    d = json.loads(text)
    return Transcript(
        segments=[Segment(start, end, said) for start, end, said in d["segments"]],
        language=d["language"],
        duration=d["duration"],
    )


class RayWork:
    """The model work of one ``index`` run, done on a Ray cluster (see the module docstring): the
    :class:`mmsearch.ingest.RemoteWork` that ingestion is given."""

    def __init__(
        self, options: RayOptions, settings: ModelSettings, speech: dict[str, Any], *, decode_budget: float
    ) -> None:
        self.options, self.settings, self.speech = options, settings, speech
        self.decode_budget = decode_budget
        #: The speech model's identity as the workers resolved it (set once audio was transcribed).
        self.speech_identity: dict[str, Any] | None = None
        ray_cluster.connect(options.address)
        self._resources = ray_cluster.resources()

    @property
    def gpus(self) -> int:
        return int(self._resources.get("GPU", 0))

    def _pool(self, size: int | None, default: int) -> dict[str, Any]:
        """An actor pool's placement: its size and, on a cluster with GPUs, one GPU per actor."""
        data = ray_cluster.ray_data()
        n = max(1, size or (self.gpus or default))
        return {"compute": data.ActorPoolStrategy(size=n), **({"num_gpus": 1} if self.gpus else {})}

    def images(self, items: list[tuple[str, Path]]) -> Iterator[tuple[list[ImageDone], np.ndarray]]:
        """Per batch of embedded content: its results (in any order), and the vectors of those without an
        error, in their order."""
        data = ray_cluster.ray_data()
        cpus = int(self._resources.get("CPU", 1))
        ds = data.from_items([{"sha256": sha, "path": os.fsencode(path)} for sha, path in items])
        ds = ds.map_batches(
            decode_images,
            fn_kwargs={
                "preprocess": self.settings.preprocess,
                "input_size": self.settings.input_size,
                "budget": self.decode_budget,
            },
            batch_size=DECODE_ROWS,
            batch_format="numpy",
        )
        ds = ds.map_batches(
            ImageTower,
            fn_constructor_kwargs={"settings": self.settings},
            batch_size=self.options.batch_size,
            batch_format="numpy",
            **self._pool(self.options.image_actors, max(1, cpus // 2)),
        )
        seen: set[str] = set()
        for batch in ds.iter_batches(batch_size=self.options.batch_size, batch_format="numpy"):
            results, vectors = [], []
            for sha, error, vector in zip(batch["sha256"], batch["error"], batch["vector"], strict=True):
                sha = str(sha)
                if sha in seen:
                    continue  # a retried block delivered again: its content is committed already
                seen.add(sha)
                results.append(ImageDone(sha, str(error) or None))
                if not error:
                    vectors.append(vector)
            if results:
                yield results, np.asarray(vectors, np.float32).reshape(len(vectors), self.settings.dim)

    def hashes(self, paths: list[Path]) -> dict[Path, str | OSError]:
        """Each file's sha256, read by CPU tasks of the cluster, or the error reading it; nothing (the
        driver hashes) for fewer than :data:`REMOTE_HASH_MIN` files or when the cluster runs on this machine
        only, unless ``remote_hashing`` says otherwise."""
        remote = self.options.remote_hashing
        if remote is None:
            remote = len(paths) >= REMOTE_HASH_MIN and ray_cluster.spans_machines()
        if not remote:
            return {}
        data = ray_cluster.ray_data()
        ds = data.from_items([{"path": os.fsencode(p)} for p in paths])
        ds = ds.map_batches(hash_files, batch_size=HASH_ROWS, batch_format="numpy")
        out: dict[Path, str | OSError] = {}
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for path, sha, error in zip(batch["path"], batch["sha256"], batch["error"], strict=True):
                where = Path(os.fsdecode(path))
                if error:
                    errno_, message = json.loads(error)
                    out[where] = OSError(errno_, message)
                else:
                    out[where] = str(sha)
        return out

    def transcripts(self, items: list[tuple[str, Path]]) -> Iterator[AudioDone]:
        """Each audio content's transcript and the vectors of its texts, or why there is none."""
        data = ray_cluster.ray_data()
        ds = data.from_items([{"sha256": sha, "path": os.fsencode(path)} for sha, path in items])
        ds = ds.map_batches(
            SpeechTower,
            fn_constructor_kwargs={"speech": self.speech},
            batch_size=SPEECH_ROWS,
            batch_format="numpy",
            **self._pool(self.options.speech_actors, 1),
        )
        ds = ds.map_batches(
            TextTower,
            fn_constructor_kwargs={"settings": self.settings},
            batch_size=SPEECH_ROWS,
            batch_format="numpy",
            **self._pool(None, 1),
        )
        seen: set[str] = set()
        for row in ds.iter_rows():
            sha = str(row["sha256"])
            if sha in seen:
                continue
            seen.add(sha)
            if self.speech_identity is None:
                self.speech_identity = json.loads(row["speech"])
            if row["error"] or not row["transcript"]:
                yield AudioDone(sha, None, str(row["error"]) or "no speech detected", None)
                continue
            transcript = _transcript_of(row["transcript"])
            vectors = np.frombuffer(row["vectors"], np.float32).reshape(-1, self.settings.dim)
            yield AudioDone(sha, transcript, None, vectors)


def model_settings(identity: dict[str, Any], image_tower: str) -> ModelSettings:
    """The plain settings the workers load the index's model with, from its ONNX export (made by a first
    local use of the model: :meth:`mmsearch.api.Index.add_folder` makes sure of it)."""
    from mmsearch.accel import default_cache_dir
    from mmsearch.onnx_embedder import PACKAGED_EXPORTS, find_exported
    from mmsearch.preprocess import ImagePreprocess

    for quantize in (image_tower == "onnx-int8", image_tower != "onnx-int8"):
        found = find_exported(identity, quantize=quantize, cache_dirs=[default_cache_dir(), PACKAGED_EXPORTS])
        if found is not None:
            preprocess = found[0]["preprocess"]
            return ModelSettings(
                identity=dict(identity),
                image_tower=image_tower,
                preprocess=preprocess,
                input_size=ImagePreprocess.from_config(preprocess).input_size,
            )
    raise ConfigError(
        f"--ray needs the model's preprocessing without torch, and {identity.get('name')} has no ONNX export "
        "that records it (its tokenizer or transform may need torch)"
    )
