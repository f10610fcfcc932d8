"""The text tower exported to ONNX and run by ONNX Runtime: token ids in, L2-normalised vectors out.

Exported like the image tower (:mod:`mmsearch.accel`): ``model.encode_text`` traced with a dynamic batch
axis (the context length is fixed: OpenCLIP's causal mask and positional embedding have its size), written
atomically to the per-user cache under a key naming the weights, and kept only if, on probe sentences, its
vectors match the torch model's.

The int8 variant quantises the weights of the matrix products and of the token embedding (a ``Gather`` over
49408 rows: for ViT-B-32 two fifths of the text tower's weights), 7-bit as for the image tower (AVX2 without
VNNI saturates with 8-bit weights, see :mod:`mmsearch.accel`), with one scale per output channel: per tensor
the text tower of ViT-B-32 (random weights) kept a cosine of only 0.996 to fp32, per channel 0.998 (the
demo model: 0.9992). A model whose int8 text tower falls under :data:`PROBE_MIN_COSINE` keeps the fp32 one
(the caller's choice, :func:`mmsearch.clip_torch.ClipEmbedder.prepare_torch_free`). Cosines and the demo's
retrieval with each tower: ``benchmarks/results/startup.json``.

One session, every usable core, no spinning workers: a query embeds one text, and ingestion embeds caption
and transcript texts between image batches. Texts run one at a time, so that a text's vector does not depend
on the batch it came in (see :meth:`OnnxTextTower.__call__`).

Making the session is most of a cold query's model work, and ONNX Runtime makes it without holding the GIL:
:func:`prefetch_session` starts it on a thread of its own, and the next :class:`OnnxTextTower` of the same
file takes it (``mmsearch query`` starts it before importing the engine, see :mod:`mmsearch.cli`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from mmsearch.accel import (
    OUTPUT_NAME,
    cache_file_name,
    cosines,
    import_ort,
    normalise,
    ort_session,
    publish_export,
    quantize_weights,
    temp_path,
    trace_to_onnx,
    usable_cpus,
)
from mmsearch.errors import MmsearchError

log = logging.getLogger(__name__)

FEATURE = "the ONNX text tower"
TEXT_RECIPE_VERSION = 2  # 2: the cached graph is ONNX Runtime's extended-optimised one
INPUT_NAME = "tokens"
QUANTIZED_OPS = ("MatMul", "Gemm", "Gather")
# A fresh export is kept only if every probe sentence's vector is at least this close (cosine) to torch's.
PROBE_MIN_COSINE = {False: 0.9999, True: 0.995}
# Sentences the export is checked on: short and long, punctuation, digits, non-Latin script.
PROBE_TEXTS = (
    "a photo of a dog",
    "two small red circles over a white background",
    "an image with three large blue triangles on black",
    "Meeting notes: budget, 2024 roadmap & hiring (draft v3)",
    "café crème brûlée",
    "日本語のテキスト",
    "x",
    "the quick brown fox jumps over the lazy dog " * 12,
)


def text_file(cache_dir: Path, key: str, quantize: bool) -> Path:
    return Path(cache_dir) / cache_file_name(key, quantize, tower="text", recipe=TEXT_RECIPE_VERSION)


# Sessions being made ahead of use by prefetch_session: (path, threads, the file's identity) -> the session.
_prefetched: dict[tuple[str, int, tuple[int, ...]], Future[Any]] = {}
_prefetch_lock = threading.Lock()


def _file_key(path: Path, threads: int | None) -> tuple[str, int, tuple[int, ...]]:
    st = os.stat(path)
    return (
        str(path.resolve()),
        threads or usable_cpus(),
        (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns),
    )


def prefetch_session(path: Path, *, threads: int | None = None) -> None:
    """Start making the session of the text tower at ``path`` on a thread, for the next
    :class:`OnnxTextTower` of this file and thread count in this process. Never raises: a session that
    cannot be made is made again (and fails with its message) by :class:`OnnxTextTower`.

    Not a daemon thread: an exit waits for the session being made, as ONNX Runtime aborts the process when
    it is torn down in the middle of making one."""
    try:
        import_ort(FEATURE)  # imported by the caller, not beside its own imports on the thread
        key = _file_key(Path(path), threads)
    except (OSError, MmsearchError):
        return
    with _prefetch_lock:
        if key in _prefetched:
            return
        made: Future[Any] = Future()
        _prefetched[key] = made

    def run() -> None:
        try:
            made.set_result(ort_session(Path(path), key[1], spin=False, feature=FEATURE))
        except BaseException as e:  # handed to the tower that takes it, which makes its own instead
            made.set_exception(e)

    threading.Thread(target=run, name="onnx-text-prefetch", daemon=False).start()


def _take_prefetched(path: Path, threads: int | None) -> Any | None:
    """The session :func:`prefetch_session` made for this file (as it is now) and thread count, once."""
    try:
        key = _file_key(path, threads)
    except OSError:
        return None
    with _prefetch_lock:
        made = _prefetched.pop(key, None)
    if made is None or made.exception() is not None:
        return None
    return made.result()


class OnnxTextTower:
    """``[B, context_length]`` int64 token ids → ``[B, dim]`` L2-normalised float32 vectors."""

    def __init__(self, path: Path, *, threads: int | None = None) -> None:
        self.path = Path(path)
        self.session = _take_prefetched(self.path, threads) or ort_session(
            self.path, threads or usable_cpus(), spin=False, feature=FEATURE
        )
        self.quantized = self.path.name.endswith(".text-int8.onnx")
        shape = self.session.get_inputs()[0].shape
        self.context_length = int(shape[1])
        meta_path = self.path.with_suffix(".json")
        self.meta: dict[str, Any] = json.loads(meta_path.read_text()) if meta_path.is_file() else {}

    @property
    def dim(self) -> int:
        return int(self.session.get_outputs()[0].shape[1])

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        if not len(tokens):
            return np.zeros((0, self.dim), np.float32)
        # One text per run: int8 activations are quantised with one scale per run, so a batch would make
        # a text's vector depend on the texts beside it (a caption, a query and a known caption's stored
        # vector must agree). Batching saved no CPU time here: the matrix products of one text are
        # already [context, width] by [width, width].
        rows = [
            self.session.run([OUTPUT_NAME], {INPUT_NAME: tokens[i : i + 1]})[0] for i in range(len(tokens))
        ]
        return normalise(np.concatenate(rows).astype(np.float32, copy=False))

    @classmethod
    def build(
        cls,
        model: Any,
        probe_tokens: np.ndarray,
        cache_dir: Path,
        key: str,
        *,
        quantize: bool = True,
    ) -> OnnxTextTower:
        """Load the cached text tower for ``key``, exporting it first if needed.

        ``model``: an OpenCLIP model on the CPU in fp32 (its ``encode_text`` is exported). ``probe_tokens``:
        the model's tokenizer applied to :data:`PROBE_TEXTS` (the export is checked on them). Raises
        :class:`MissingDependencyError` or :class:`MmsearchError` when it cannot be exported faithfully.
        """
        import_ort(FEATURE)
        path = text_file(cache_dir, key, quantize)
        if path.is_file():
            try:
                return cls(path)
            except Exception as e:  # a damaged cache file: export again
                log.warning("cached ONNX text tower %s is unusable (%s); exporting again", path, e)
        try:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MmsearchError(f"cannot create the ONNX cache folder {cache_dir}: {e}") from e
        _export(model, np.asarray(probe_tokens, np.int64), path, key, quantize)
        return cls(path)


def _export(model: Any, probe: np.ndarray, path: Path, key: str, quantize: bool) -> None:
    import torch

    started = time.monotonic()

    class _Tower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return model.encode_text(tokens)

    tmp_fp32 = temp_path(path, ".fp32.tmp")
    tmp_out = temp_path(path, ".tmp") if quantize else tmp_fp32
    tmp_opt = temp_path(path, ".opt.tmp")
    tmp_meta = temp_path(path, ".json.tmp")
    try:
        with torch.no_grad():
            reference = model.encode_text(torch.from_numpy(probe)).float().numpy()
        # Batch 2 (tracing with 1 can bake size-1 squeezes into the graph), two different lengths.
        dummy = torch.from_numpy(np.ascontiguousarray(probe[:2]))
        trace_to_onnx(_Tower().eval(), dummy, tmp_fp32, f"the text tower of {key}", input_name=INPUT_NAME)
        if quantize:
            quantize_weights(tmp_fp32, tmp_out, FEATURE, QUANTIZED_OPS, per_channel=True)
        _save_optimised(tmp_out, tmp_opt)
        got = OnnxTextTower(tmp_opt)(probe)
        publish_export(
            path,
            tmp_opt,
            tmp_meta,
            tower="text",
            key=key,
            quantize=quantize,
            cos=cosines(got, reference),
            min_cosine=PROBE_MIN_COSINE[quantize],
            started=started,
            recipe=TEXT_RECIPE_VERSION,
            context_length=int(probe.shape[1]),
        )
    finally:
        for tmp in (tmp_fp32, tmp_out, tmp_opt, tmp_meta):
            tmp.unlink(missing_ok=True)


def _save_optimised(src: Path, dst: Path) -> None:
    """``src`` as ONNX Runtime's extended optimisations leave it (fused operators, folded constants).

    Loading it then takes about half the CPU time (for the int8 text tower of ViT-B-32), which a
    cold query pays. Only the hardware-independent levels are saved; the layout level, which depends on the
    CPU, still runs at load. The fused operators are ONNX Runtime's own (``com.microsoft``), so the file is
    for ONNX Runtime only, which is the only thing that reads it.
    """
    ort = import_ort(FEATURE)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
