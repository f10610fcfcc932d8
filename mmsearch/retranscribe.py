"""Changing an index's speech model: transcribe every recording again and swap its transcript in.

The new speech settings are recorded as the catalog's speech target; each recording is transcribed from
one of its live files (unchanged since it was indexed) and its transcript, segments and segment vectors
(of every model the index holds vectors of for segments) are replaced in one transaction per recording,
which names the settings that made it. An interrupted run loses at most the recording in flight, and the
next run transcribes only the recordings another speech model made. Searches answer throughout: a
recording's segments are its old ones until its swap commits, then its new ones. When every recording is
done, the index's speech settings (``mmsearch.json``) become the new ones; until then ``index`` runs
transcribe new recordings with the old ones, and the next run of this brings them over too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mmsearch import db
from mmsearch.identity import speech_key
from mmsearch.ingest import Embedder, Progress, transcribe_file, transcript_spans, unchanged_file
from mmsearch.store import Store

log = logging.getLogger(__name__)


@dataclass
class RetranscribeReport:
    speech: dict[str, Any]
    transcribed: int = 0
    segments: int = 0
    #: Recordings the new model could not transcribe (they keep their transcript): (path, reason).
    kept: list[tuple[str, str]] = field(default_factory=list)
    #: Recordings whose files all changed or went since they were indexed: left to the next `index`.
    stale: int = 0
    switched: bool = False
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["kept"] = [{"path": p, "reason": r} for p, r in self.kept]
        return d


def retranscribe(
    store: Store,
    settings: dict[str, Any],
    transcriber: Callable[[], Any],
    embedders: Mapping[str, Callable[[], Embedder]],
    *,
    progress: Progress | None = None,
) -> RetranscribeReport:
    """Bring every transcript to the speech ``settings`` (backend, model, language); ``embedders``: the
    embedder of each model whose segment vectors are kept (the active one, and a re-embedding target).
    The caller holds the write lock."""
    started = time.monotonic()
    tick = progress or (lambda stage, done, total: None)
    key = speech_key(settings)
    report = RetranscribeReport(dict(settings))
    store.catalog.set_meta(db.SPEECH_TARGET_META, settings)
    todo = db.recordings_not_by(store.catalog, key)
    live = db.live_files_of(store.catalog, todo)
    for i, mid in enumerate(todo):
        tick("audio", i, len(todo))
        path = unchanged_file(live.get(mid, []))
        if path is None:
            report.stale += 1
            continue
        transcript, reason = transcribe_file(transcriber(), path)
        if transcript is None or reason is not None:
            with store.write() as tx:
                db.mark_transcribed(tx.conn, mid, key)
            report.kept.append((str(path), reason or "no speech detected"))
            continue
        texts, spans = transcript_spans(transcript)
        vectors = {model: embed().embed_texts(texts) for model, embed in embedders.items()}
        with store.write("segment") as tx:
            removed, seg_ids = db.replace_transcript(
                tx.conn,
                mid,
                duration=transcript.duration,
                language=transcript.language,
                text=transcript.text,
                spans=spans,
                speech=key,
            )
            tx.removed("segment", removed.get("segment", []))
            for model, vecs in vectors.items():
                tx.added("segment", db.add_embeddings(tx.conn, "segment", vecs, seg_ids, model=model), vecs)
        report.transcribed += 1
        report.segments += len(texts)
    tick("audio", len(todo), len(todo))
    store.save_vectors()
    if report.stale == 0:
        store.update_config(speech=dict(settings))
        store.catalog.delete_meta(db.SPEECH_TARGET_META)
        report.switched = True
    report.seconds = round(time.monotonic() - started, 3)
    return report
