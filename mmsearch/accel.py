"""Faster image embedding on CPU: the visual tower exported to ONNX and run by ONNX Runtime.

Why ONNX int8: ``benchmarks/bench_model_speed.py`` times every variant of the image tower in one run, model
alone, and writes the figures with the machine they ran on to ``benchmarks/results/model_speed.json`` (the
README quotes them). int8 ONNX Runtime is the fastest variant that keeps the vectors: 2× torch eager on AVX2,
several times on AVX-512 VNNI, at cosine ≥ 0.9995 to fp32 and the same demo retrieval. The int8 matrix
products are what gain (``vpmaddubsw`` / VNNI do more multiply-adds per instruction than an fp32 FMA).
Nothing on the torch side gained enough to keep a setting for it (channels-last, ``torch.compile``, bf16
autocast without native bf16, torch's deprecated dynamic int8).

Quantisation recipe, and why:

* only ``MatMul``/``Gemm`` weights are quantised. A quantised patch-embedding ``Conv`` (``ConvInteger``)
  ran 2.7× slower than the fp32 ``Conv`` it replaces; leaving it in fp32 made the model 16 % faster;
* ``reduce_range=True`` (7-bit weights). On AVX2 without VNNI, ONNX Runtime's u8×s8 kernel adds pairs of
  products in int16 (``vpmaddubsw``), which saturates with full 8-bit weights: the cosine to fp32 fell to
  0.992 on ViT-B-32; with 7-bit weights it is 0.9996, at the same speed. With VNNI there is no saturation
  and the lost bit costs little;
* per-tensor scales: per-channel scales raised the cosine only from 0.99964 to 0.99979 on ViT-B-32 but made
  quantisation 3.5× slower. u8 weights (u8×u8) were 8 % slower.

Spinning ORT worker threads are off: on a loaded machine they made int8 slower, and during ingestion they
would take CPU from the decode workers. Batch size barely matters for int8 speed; small calls stay in cache,
so ingestion hands each session 8 images (``mmsearch.ingest.STREAM_BATCH``).

The exported file is cached per ``key`` (architecture + weights + recipe) and written atomically. Every fresh
export is checked against the torch model on a probe batch before it is kept.

``onnxruntime`` is imported only here, lazily; ``onnx`` is needed only to quantise (an export).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import re
import threading
import time
import uuid
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmsearch.errors import MissingDependencyError, MmsearchError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Part of every cache key: bump it when the export or quantisation recipe changes, so old files are not reused.
RECIPE_VERSION = 2  # 2: standard ViTs exported through mmsearch.onnx_vit
OPSET = 17
INPUT_NAME = "pixels"
OUTPUT_NAME = "features"
# A fresh export is kept only if, on a probe batch, every embedding is at least this close (cosine) to the
# torch model's. fp32: the same arithmetic up to operator order. int8: measured 0.9996 on ViT-B-32 and
# > 0.999 on the tiny test models; 0.99 still catches a broken kernel (the saturated recipe gave 0.992 on
# ViT-B-32, and near-random vectors give ~0).
PROBE_MIN_COSINE = {False: 0.9999, True: 0.99}
FEATURE = "the ONNX image tower"


def default_cache_dir() -> Path:
    """Where exported towers live: ``$MMSEARCH_CACHE_DIR/onnx`` or ``$XDG_CACHE_HOME/mmsearch/onnx``.

    A per-user cache rather than the index folder: one export (~90 MB int8 for ViT-B-32, ~30-60 s) then serves
    every index built with the same weights.
    """
    base = os.environ.get("MMSEARCH_CACHE_DIR")
    if base:
        return Path(base) / "onnx"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "mmsearch" / "onnx"


def tower_key(identity: dict[str, Any]) -> str:
    """A cache key from a ClipEmbedder identity: architecture and weights (hash, or tag)."""
    weights = identity.get("checkpoint_sha256") or identity.get("pretrained") or "unknown"
    return f"{identity['arch']}@{weights}"


def import_ort(feature: str = FEATURE) -> Any:
    try:
        import onnxruntime
    except ImportError as e:
        raise MissingDependencyError("onnxruntime", feature) from e
    return onnxruntime


def ort_session(path: Path, threads: int | None, spin: bool, feature: str = FEATURE) -> Any:
    ort = import_ort(feature)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1  # the graph is one chain: no independent branches to run in parallel
    # Spinning workers burn CPU between operators; in ingestion that CPU belongs to the decode workers.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return (a * b).sum(axis=1)


def normalise(feats: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    return (feats / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


class OnnxImageTower:
    """The model's visual tower exported to ONNX (optionally int8 dynamic-quantised), run by ONNX Runtime."""

    def __init__(
        self, path: Path, *, threads: int | None = None, spin: bool = False, streams: int | None = None
    ) -> None:
        """``streams`` sessions run slices of each batch side by side, each on ``threads`` threads.

        Defaults from the usable CPUs (:func:`default_streams`): on 2 cores, two 1-thread sessions.
        """
        self.path = Path(path)
        self.quantized = self.path.name.endswith(".int8.onnx")
        auto_streams, auto_threads = default_streams()
        n = streams or (auto_streams if threads is None else 1)
        per_session = threads or (auto_threads if streams is None else max(1, usable_cpus() // n))
        # One session per stream: concurrent runs of one single-threaded session were no faster here.
        # The first is made here; the others in the background, each joining the sessions that run work as
        # soon as it is made, so that the first batches run while they load (streams counts them all).
        self.sessions = [ort_session(self.path, per_session, spin)]
        self.session = self.sessions[0]
        self.threads = per_session
        self._streams = n
        self._pool = ThreadPoolExecutor(n, thread_name_prefix="onnx-tower") if n > 1 else None
        self._idle: queue.SimpleQueue[Any] = queue.SimpleQueue()  # sessions free for submit()
        self._idle.put(self.session)
        self._all_made = threading.Event()  # __call__ splits a batch over them all, as many as streams
        if n == 1:
            self._all_made.set()
        else:
            # Not a daemon (even when made by one): the interpreter waits for it at exit, as ONNX Runtime
            # aborts the process when it is torn down while a session is being made.
            threading.Thread(
                target=self._add_sessions,
                args=(n - 1, per_session, spin),
                name="onnx-sessions",
                daemon=False,
            ).start()
        meta_path = self.path.with_suffix(".json")
        self.meta: dict[str, Any] = json.loads(meta_path.read_text()) if meta_path.is_file() else {}

    @classmethod
    def build(
        cls,
        model: torch.nn.Module,
        image_size: int | tuple[int, int],
        cache_dir: Path,
        key: str,
        *,
        quantize: bool = True,
        threads: int | None = None,
        spin: bool = False,
        streams: int | None = None,
    ) -> OnnxImageTower:
        """Load the cached tower for ``key``, exporting it first if needed.

        ``model`` is an OpenCLIP model (its ``encode_image`` is exported) or a bare visual tower, on CPU, in
        fp32. ``key`` must change whenever the weights do (see :func:`tower_key`). Raises
        :class:`MissingDependencyError` without onnxruntime (or onnx, to export) and :class:`MmsearchError`
        when the model is on a GPU (use torch with autocast there) or cannot be exported faithfully; the
        caller then keeps the torch path.
        """
        import_ort()
        param = next(iter(model.parameters()), None)
        if param is not None and param.device.type != "cpu":
            raise MmsearchError(
                f"{FEATURE} is for CPU inference; the model is on {param.device.type}, where torch with "
                "autocast is the fast path"
            )
        if param is not None and param.dtype != _float32():
            raise MmsearchError(f"{FEATURE} exports fp32 models; this one is {param.dtype}")
        cache_dir = Path(cache_dir)
        path = cache_dir / cache_file_name(key, quantize)
        if path.is_file():
            try:
                tower = cls(path, threads=threads, spin=spin, streams=streams)
                log.info("using cached %s", path)
                return tower
            except Exception as e:  # a damaged cache file must not block indexing: export again
                log.warning("cached ONNX tower %s is unusable (%s); exporting again", path, e)
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MmsearchError(f"cannot create the ONNX cache folder {cache_dir}: {e}") from e
        meta = _export(model, _hw(image_size), path, key, quantize)
        tower = cls(path, threads=threads, spin=spin, streams=streams)
        tower.meta = meta
        return tower

    def _add_sessions(self, count: int, threads: int, spin: bool) -> None:
        try:
            for _ in range(count):
                session = ort_session(self.path, threads, spin)
                self.sessions.append(session)
                self._idle.put(session)
        except Exception as e:  # noqa: BLE001 - the sessions made so far carry on
            log.warning("could not make another ONNX Runtime session for %s: %s", self.path, e)
        finally:
            self._all_made.set()

    @property
    def dim(self) -> int:
        return int(self.session.get_outputs()[0].shape[1])

    def __call__(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        """[B, 3, H, W] float32 pixels (the model's preprocessing) → [B, dim] L2-normalised float32.

        The batch is split across the sessions, which run side by side; the result keeps the input order.
        """
        pixels = _pixels(batch)
        if not len(pixels):
            return np.zeros((0, self.dim), np.float32)  # ONNX Runtime cannot reshape an empty batch
        self._all_made.wait()  # the same split, so the same vectors (int8: one activation scale per run)
        parts = np.array_split(pixels, min(len(self.sessions), len(pixels)))
        if self._pool is None or len(parts) == 1:
            return normalise(self._run(self.session, pixels))
        # Slice i runs on session i; the calling thread takes the first slice itself.
        futures = [
            self._pool.submit(self._run, sess, part) for sess, part in zip(self.sessions[1:], parts[1:])
        ]
        first = self._run(self.session, parts[0])
        return normalise(np.concatenate([first] + [f.result() for f in futures]))

    def submit(self, batch: np.ndarray | torch.Tensor) -> Future[np.ndarray]:
        """Embed a whole batch on the next free session, in the background.

        For a pipeline that keeps ``streams`` batches in flight: each session then runs whole batches with
        no barrier between sessions. (When one call is split, the first slice to finish waits for the
        other, and on a machine also decoding images that wait was 6 % of ingestion time here.)
        """
        pixels = _pixels(batch)
        if self._pool is None or not len(pixels):
            done: Future[np.ndarray] = Future()
            done.set_result(self(pixels))
            return done
        return self._pool.submit(self._run_on_idle, pixels)

    def _run_on_idle(self, pixels: np.ndarray) -> np.ndarray:
        session = self._idle.get()  # never waits long: the pool has one thread per session
        try:
            return normalise(self._run(session, pixels))
        finally:
            self._idle.put(session)

    @staticmethod
    def _run(session: Any, pixels: np.ndarray) -> np.ndarray:
        (feats,) = session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(pixels)})
        return np.asarray(feats)

    @property
    def streams(self) -> int:
        return self._streams


def _pixels(batch: np.ndarray | torch.Tensor) -> np.ndarray:
    if not isinstance(batch, np.ndarray):
        batch = batch.detach().cpu().numpy()  # zero-copy for a contiguous CPU tensor
    return np.ascontiguousarray(batch, dtype=np.float32)


def usable_cpus() -> int:
    """The CPUs this process may use: its affinity (taskset/cgroup pinning, unlike os.cpu_count()), and no
    more than OMP_NUM_THREADS when that is set (Ray sets it to the CPUs it gave a worker: an actor granted
    one CPU then makes one single-threaded session, not one per core of the machine)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    omp = os.environ.get("OMP_NUM_THREADS", "")
    return max(1, min(n, int(omp))) if omp.isdigit() and int(omp) > 0 else n


def default_streams(cpus: int | None = None) -> tuple[int, int]:
    """(sessions, threads per session) for ``cpus`` usable CPUs: one single-threaded session per core up to
    four, then more threads per session.

    Why: with one 2-thread session, every operator (LayerNorm, Transpose, the small attention products) ends
    at a barrier where one thread waits for the other; two 1-thread sessions each embedding half of the
    batch have no barriers and ran 1.14x faster on this 2-core machine (benchmarks/results/model_speed.json).
    Beyond four, each extra session costs its own copy of the weights (~90 MB int8 for ViT-B-32) for little.
    """
    n = cpus or usable_cpus()
    streams = max(1, min(n, 4))
    return streams, max(1, n // streams)


def _float32() -> Any:
    import torch

    return torch.float32


def _hw(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


def cache_file_name(
    key: str, quantize: bool | None, *, tower: str = "image", recipe: int = RECIPE_VERSION
) -> str:
    """The cache file of one tower of the model ``key``: ``<key>-<digest>.<int8|fp32>.onnx`` for the image
    tower, ``.text-int8.onnx`` … for the text tower, ``.model.json`` (``quantize=None``) for the manifest."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", key)[:48]
    if quantize is None:
        digest = hashlib.sha256(f"{key}|manifest|recipe={recipe}".encode()).hexdigest()[:16]
        return f"{slug}-{digest}.model.json"
    basis = f"{key}|quantize={quantize}|recipe={recipe}"
    if tower != "image":  # image files keep the names of earlier releases, so their caches stay valid
        basis += f"|tower={tower}"
    digest = hashlib.sha256(basis.encode()).hexdigest()[:16]
    kind = "int8" if quantize else "fp32"
    return f"{slug}-{digest}.{kind if tower == 'image' else f'{tower}-{kind}'}.onnx"


def package_version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def _export(
    model: torch.nn.Module, hw: tuple[int, int], path: Path, key: str, quantize: bool
) -> dict[str, Any]:
    """Export (and quantise) into temporary files next to ``path``, check them, then rename into place.

    A standard OpenCLIP ViT is exported through :mod:`mmsearch.onnx_vit` (10 % faster int8 graph); if that
    fails for any reason, the model is exported as it is.
    """
    from mmsearch import onnx_vit

    if onnx_vit.applicable(model):
        try:
            return _export_once(model, hw, path, key, quantize, friendly=True)
        except MissingDependencyError:
            raise
        except MmsearchError as e:
            log.warning("exporting %s through the plain graph: %s", key, e)
    return _export_once(model, hw, path, key, quantize, friendly=False)


def trace_to_onnx(
    tower: torch.nn.Module,
    dummy: torch.Tensor,
    out: Path,
    what: str,
    *,
    input_name: str = INPUT_NAME,
    patch: Any = None,
) -> None:
    """Trace ``tower`` on ``dummy`` (batch 2) into an ONNX file at ``out`` with a dynamic batch axis, input
    ``input_name`` and output :data:`OUTPUT_NAME` (the
    TorchScript exporter: torch >= 2.9 prefers the torch.export one, which needs onnxscript; the TorchScript
    one handles OpenCLIP's towers and needs nothing more). :class:`MmsearchError` naming ``what`` when the
    model cannot be exported (an unsupported operator, data-dependent control flow)."""
    import torch

    # Without grad, nn.MultiheadAttention takes a fused "fast path" that has no ONNX export.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.inference_mode(False), warnings.catch_warnings(), patch or contextlib.nullcontext():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                tower,
                (dummy,),
                str(out),
                dynamo=False,
                input_names=[input_name],
                output_names=[OUTPUT_NAME],
                dynamic_axes={input_name: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=OPSET,
                do_constant_folding=True,
            )
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise MmsearchError(f"could not export {what} to ONNX: {first_line}") from e
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _export_once(
    model: torch.nn.Module, hw: tuple[int, int], path: Path, key: str, quantize: bool, friendly: bool
) -> dict[str, Any]:
    import torch

    from mmsearch.onnx_vit import export_friendly

    started = time.monotonic()
    encode = getattr(model, "encode_image", None) or model

    class _Tower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model  # registered, so tracing sees its parameters as weights

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return encode(pixels)

    probe = torch.randn(4, 3, *hw, generator=torch.Generator().manual_seed(0))
    tmp_fp32 = temp_path(path, ".fp32.tmp")
    tmp_out = temp_path(path, ".tmp") if quantize else tmp_fp32
    tmp_meta = temp_path(path, ".json.tmp")
    try:
        tower = _Tower().eval()
        with torch.no_grad():
            reference = encode(probe).float().numpy()
        # Batch 2, not 1: tracing with batch 1 can bake size-1 squeezes into the graph.
        dummy = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(1))
        patch = export_friendly(model) if friendly else contextlib.nullcontext()
        trace_to_onnx(tower, dummy, tmp_fp32, f"the image tower of {key}", patch=patch)
        if quantize:
            quantize_weights(tmp_fp32, tmp_out, FEATURE)
        got = OnnxImageTower(tmp_out, streams=1)(probe)
        return publish_export(
            path,
            tmp_out,
            tmp_meta,
            tower="image",
            key=key,
            quantize=quantize,
            cos=cosines(got, reference),
            min_cosine=PROBE_MIN_COSINE[quantize],
            started=started,
            recipe=RECIPE_VERSION,
            graph="onnx_vit" if friendly else "as-is",
            image_size=list(hw),
        )
    finally:
        for tmp in (tmp_fp32, tmp_out, tmp_meta):
            tmp.unlink(missing_ok=True)


def publish_export(
    path: Path,
    tmp_model: Path,
    tmp_meta: Path,
    *,
    tower: str,
    key: str,
    quantize: bool,
    cos: np.ndarray,
    min_cosine: float,
    started: float,
    **fields: Any,
) -> dict[str, Any]:
    """Check an exported ``tower`` (image | text) against the torch model (its probe cosines must all reach
    ``min_cosine``), then put it and its metadata sidecar (``fields`` plus the probe figures and versions)
    in place at ``path``. Returns the metadata."""
    if float(cos.min()) < min_cosine:
        raise MmsearchError(
            f"the {'int8' if quantize else 'fp32'} ONNX {tower} tower of {key} does not reproduce the torch "
            f"model (probe cosine {cos.min():.5f} < {min_cosine})"
        )
    meta = {
        "key": key,
        "quantized": quantize,
        **fields,
        "probe_cosine_min": round(float(cos.min()), 6),
        "probe_cosine_mean": round(float(cos.mean()), 6),
        "export_seconds": round(time.monotonic() - started, 1),
        "versions": {p: package_version(p) for p in ("torch", "open_clip_torch", "onnx", "onnxruntime")},
    }
    tmp_meta.write_text(json.dumps(meta, indent=1))
    # Sidecar first: a reader that finds the model file always finds its metadata too.
    os.replace(tmp_meta, path.with_suffix(".json"))
    os.replace(tmp_model, path)
    log.info(
        "exported %s in %.0f s (probe cosine to torch: min %.5f)",
        path,
        meta["export_seconds"],
        meta["probe_cosine_min"],
    )
    return meta


def temp_path(path: Path, suffix: str) -> Path:
    # Same folder as the target, so os.replace is an atomic rename; created by the writer with the umask's
    # permissions (mkstemp would leave them at 0600).
    return path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}"


def quantize_weights(
    src: Path,
    dst: Path,
    feature: str,
    op_types: tuple[str, ...] = ("MatMul", "Gemm"),
    per_channel: bool = False,
) -> None:
    """int8 dynamic quantisation of ``op_types``' weights, 7-bit (the recipe in this module's docstring)."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as e:  # onnxruntime.quantization imports onnx
        raise MissingDependencyError("onnx", f"quantising {feature}") from e
    root = logging.getLogger()
    root.addFilter(_drop_preprocess_advice)
    try:
        quantize_dynamic(
            str(src),
            str(dst),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=list(op_types),
            per_channel=per_channel,
            reduce_range=True,
        )
    except Exception as e:
        raise MmsearchError(f"could not quantise {feature}: {e}") from e
    finally:
        root.removeFilter(_drop_preprocess_advice)


def _drop_preprocess_advice(record: logging.LogRecord) -> bool:
    # quantize_dynamic advises (on the root logger) an optional shape-inference/optimisation pass; ONNX
    # Runtime applies the same graph optimisations when it loads the quantised model.
    return "pre-processing before quantization" not in record.getMessage()
