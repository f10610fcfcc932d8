"""Sharded vector search on Ray: a collection's vectors split over actors, each holding its own FAISS index.

A :class:`ShardedVectors` has the read contract of :class:`mmsearch.vectors.VectorIndex` (``dim``,
``ntotal``, ``search(queries, k, allowed=...)``, ``ids()``): a search sends the queries to every shard at
once, each returns its own top k, and the driver merges them into one top k. SQLite stays the catalog:
hits are ids the caller resolves there, as with a local index.

Split: an embedding id goes to shard ``id % n`` (a hash on the id, not id ranges). Catalog ids only grow,
so ranges would send every new embedding to the last shard; the modulo keeps the shards within one
vector of each other whatever was added or deleted, and routes an addition, a deletion or an allowed id
by arithmetic alone (no routing table to keep).

Each shard is a :class:`VectorIndex` built with :meth:`VectorIndex.build` on its part, so it chooses its
type by its own size (flat below ``FLAT_MAX``, as a single index does) unless a ``spec`` is forced, e.g.
``compact`` (IVF-PQ re-ranked with the exact vectors). With flat shards the merged top k is the single
flat index's: every vector is scored exactly once, by the same FAISS kernel. Ties (equal scores) are
broken by the smaller id. With IVF shards each shard tunes its own ``nprobe``; recall@10 against exact
search is what ``benchmarks/bench_ray_search.py`` reports.

A shard whose actor died (its process crashed, its node went away) is replaced by a new actor on a node
alive now, and rebuilt: by :class:`ShardSet` from the catalog when a search or a catch-up finds it dead (the
search is then asked of it again); a :class:`ShardedVectors` on its own, with no catalog behind it, reports
the shard unavailable.

Vectors reach the actors as object references (``ray.put``), never as pickled files. :class:`ShardSet`
keeps one ``ShardedVectors`` per (model, kind) in step with the catalog, as :class:`mmsearch.store.Store`
keeps its in-memory indexes: when the catalog generation moves it applies the catalog's delta (embeddings
with a larger id, the logged deletions) to the shards they belong to, and rebuilds from the catalog when
that delta is unknown or a shard outgrew its index type.

Ray comes from :mod:`mmsearch.ray_cluster`, the one module that imports it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mmsearch import ray_cluster
from mmsearch.errors import ConfigError, MmsearchError
from mmsearch.vectors import SPECS, VectorIndex, needs_rebuild

if TYPE_CHECKING:
    from mmsearch.catalog import Catalog

log = logging.getLogger(__name__)

# Query batches up to this size are sent inline with each shard's call (Ray's own inlining limit is 100 KiB).
_INLINE_BYTES = 64 * 1024


def shard_of(ids: np.ndarray, shards: int) -> np.ndarray:
    """The shard each id belongs to (``id % shards``)."""
    return np.asarray(ids, dtype=np.int64) % shards


def merge_topk(scores: list[np.ndarray], ids: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """One top ``k`` per query row from the shards' top k's: by score, ties by the smaller id, missing
    slots (id -1, score -inf) last."""
    all_scores = np.concatenate(scores, axis=1)
    all_ids = np.concatenate(ids, axis=1)
    # lexsort: the last key is the primary one. -inf (a missing slot) becomes +inf, so it sorts last.
    order = np.lexsort((all_ids, -all_scores), axis=1)[:, :k]
    top_scores = np.take_along_axis(all_scores, order, axis=1)
    top_ids = np.take_along_axis(all_ids, order, axis=1)
    if top_ids.shape[1] < k:  # fewer slots than k over all shards (cannot happen when every shard got k)
        pad = k - top_ids.shape[1]
        top_scores = np.pad(top_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        top_ids = np.pad(top_ids, ((0, 0), (0, pad)), constant_values=-1)
    return np.ascontiguousarray(top_scores, np.float32), np.ascontiguousarray(top_ids, np.int64)


def _round_robin(ray: Any, shards: int) -> list[dict[str, Any]]:
    """Actor options placing shard i on the (i mod nodes)-th alive node with CPUs: a shard per node is the
    point (each node's RAM and cores hold and scan its part), and Ray's SPREAD strategy is only a
    preference (it may put two shards on one node of two). Soft: a node that is gone leaves the choice to Ray."""
    nodes = sorted(
        node["NodeID"]
        for node in ray.nodes()
        if node.get("Alive") and node.get("Resources", {}).get("CPU", 0) > 0
    )
    if not nodes:
        return [{}] * shards
    affinity = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy
    return [{"scheduling_strategy": affinity(nodes[i % len(nodes)], soft=True)} for i in range(shards)]


class _Shard:
    """The body of one shard actor: a VectorIndex over the ids of one residue class. Ray runs an actor's
    calls one at a time, so a search never overlaps an add/remove on the same index."""

    def __init__(self, dim: int, spec: str | None) -> None:
        self.dim = dim
        self.spec = spec
        self.index = VectorIndex.build(dim, np.empty(0, np.int64), np.empty((0, dim), np.float32), spec=spec)

    def build(self, ids: np.ndarray, vectors: np.ndarray) -> int:
        if self.spec == "compact":
            # It keeps its input as the exact vectors: its own copy, not a view pinning the object store.
            vectors = np.array(vectors)
        self.index = VectorIndex.build(self.dim, ids, vectors, spec=self.spec)
        return self.index.ntotal

    def apply(
        self, ids: np.ndarray, vectors: np.ndarray, removed: np.ndarray, above: int
    ) -> tuple[int, bool]:
        """Add new embeddings and remove deleted ones; returns (ntotal, whether the index outgrew its type)."""
        if len(ids):
            self.index.add(ids, vectors, above=above)
        if len(removed):
            self.index.remove(removed)
        return self.index.ntotal, needs_rebuild(self.index)

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(queries, k, allowed=allowed)

    def ids(self) -> np.ndarray:
        return self.index.ids()

    def describe(self) -> dict[str, Any]:
        ray = ray_cluster.ray_module()
        return {**self.index.describe(), "node_id": ray.get_runtime_context().get_node_id()}


class ShardedVectors:
    """A vector index split over Ray actors by ``id % shards``; the read contract of a VectorIndex."""

    def __init__(
        self, dim: int, shards: int, *, spec: str | None = None, actor_options: dict[str, Any] | None = None
    ) -> None:
        """``shards`` empty actors (call :meth:`build`); ``spec`` forces every shard's index type (default:
        each chooses by its size); ``actor_options``: Ray's ``.options()`` for every actor (default: shard i
        on the i-th node holding CPUs, round robin)."""
        if shards < 1:
            raise ConfigError(f"the number of shards must be at least 1, not {shards}")
        if spec is not None and spec not in SPECS:
            raise ConfigError(f"unknown index spec {spec!r}; expected one of {', '.join(SPECS)}")
        ray = ray_cluster.ray_module()
        if not ray.is_initialized():
            ray_cluster.connect()
        self._ray = ray
        self.dim = dim
        self.spec = spec
        self._actor_options = actor_options
        self._actors = [self._new_actor(opts) for opts in self._placement(shards)]
        self._ntotals = [0] * shards
        # The last read-only `allowed` array searched and its per-shard parts in the object store: a filter
        # cached by the caller comes back for every query, and is then neither split nor shipped again.
        self._last_allowed: tuple[np.ndarray, list[Any]] | None = None
        #: Rebuilds the given shards' parts after their actors were replaced (see :meth:`search`); set by
        #: whoever holds the collection (:class:`ShardSet`, from the catalog). None: a lost shard is an error.
        self.recover: Callable[[list[int]], None] | None = None

    def _placement(self, shards: int) -> list[dict[str, Any]]:
        if self._actor_options is not None:
            return [self._actor_options] * shards
        return _round_robin(self._ray, shards)

    def _new_actor(self, options: dict[str, Any]) -> Any:
        return self._ray.remote(_Shard).options(**options).remote(self.dim, self.spec)

    def _replace(self, dead: Sequence[int]) -> None:
        """New, empty actors for the shards in ``dead`` (placed among the nodes alive now)."""
        placement = self._placement(self.shards)
        for s in dead:
            log.warning("shard %d of the vector index lost its Ray actor: starting another", s)
            self._actors[s] = self._new_actor(placement[s])
            self._ntotals[s] = 0

    @classmethod
    def build(
        cls,
        dim: int,
        ids: np.ndarray,
        vectors: np.ndarray,
        *,
        shards: int,
        spec: str | None = None,
        actor_options: dict[str, Any] | None = None,
    ) -> ShardedVectors:
        """Shards over (ids int64 [n], vectors float32 [n, dim]), built in parallel."""
        out = cls(dim, shards, spec=spec, actor_options=actor_options)
        out.build_shards(range(shards), ids, vectors)
        return out

    @property
    def shards(self) -> int:
        return len(self._actors)

    @property
    def ntotal(self) -> int:
        return sum(self._ntotals)

    def build_shards(self, which: Any, ids: np.ndarray, vectors: np.ndarray) -> None:
        """(Re)build the shards in ``which`` from the collection's (ids, vectors) (each takes its part)."""
        ids = np.ascontiguousarray(ids, np.int64).reshape(-1)
        vectors = np.ascontiguousarray(vectors, np.float32).reshape(len(ids), self.dim)
        owner = shard_of(ids, self.shards)
        parts = {}
        for s in which:
            mine = owner == s
            # One object each, read by the actor from the object store (zero-copy on its node).
            parts[s] = (self._ray.put(ids[mine]), self._ray.put(vectors[mine]))
        for attempt in range(2):  # a shard whose actor died is built again on a new one, once
            answers, dead = self._answers({s: self._actors[s].build.remote(*parts[s]) for s in parts})
            for s, n in answers.items():
                self._ntotals[s] = int(n)
            if not dead:
                return
            if attempt:
                raise _unavailable(dead)
            self._replace(dead)
            parts = {s: parts[s] for s in dead}

    def apply(self, ids: np.ndarray, vectors: np.ndarray, removed: np.ndarray, *, above: int) -> list[int]:
        """Add (ids, vectors) and remove ``removed`` (ids; absent ones ignored) on the shards they belong to;
        ``above``: no id held is larger (see :meth:`VectorIndex.add`). Returns the shards whose index
        outgrew its type (:func:`needs_rebuild`): rebuild them with :meth:`build_shards`."""
        ids = np.ascontiguousarray(ids, np.int64).reshape(-1)
        removed = np.ascontiguousarray(removed, np.int64).reshape(-1)
        vectors = np.ascontiguousarray(vectors, np.float32).reshape(len(ids), self.dim)
        add_owner, del_owner = shard_of(ids, self.shards), shard_of(removed, self.shards)
        futures = {}
        for s in range(self.shards):
            mine, gone = add_owner == s, del_owner == s
            if not mine.any() and not gone.any():
                continue
            vecs_ref = self._ray.put(vectors[mine])
            futures[s] = self._actors[s].apply.remote(ids[mine], vecs_ref, removed[gone], above)
        answers, dead = self._answers(futures)
        outgrown = []
        for s, (n, rebuild) in answers.items():
            self._ntotals[s] = int(n)
            if rebuild:
                outgrown.append(s)
        # A shard whose actor died lost its part: a new actor is rebuilt like an outgrown shard.
        self._replace(dead)
        return sorted(outgrown + dead)

    def search(
        self, queries: np.ndarray, k: int, *, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores [nq, k] float32, ids [nq, k] int64), best first; missing slots id -1, score -inf.
        ``allowed``: only these ids may be returned (each shard filters its own part)."""
        q = np.ascontiguousarray(queries, np.float32)
        if q.ndim == 1:
            q = q.reshape(1, -1)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"expected vectors of shape [n, {self.dim}], got {q.shape}")
        if k < 1:
            raise ValueError("k must be >= 1")
        parts = self._split_allowed(allowed) if allowed is not None else [None] * self.shards
        held = [s for s in range(self.shards) if self._ntotals[s]]
        if not held:
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        # A large batch is put in the object store once for every shard; a few queries travel inline with
        # each call (Ray inlines small arguments, which costs less than an object store round trip).
        q_arg = self._ray.put(q) if q.nbytes > _INLINE_BYTES and len(held) > 1 else q
        answers, dead = self._answers({s: self._actors[s].search.remote(q_arg, k, parts[s]) for s in held})
        if dead:
            if self.recover is None:
                raise _unavailable(dead)
            # New actors rebuilt with their part of the collection (the caller's recover), then asked again.
            self._replace(dead)
            self.recover(dead)
            retried, still_dead = self._answers(
                {s: self._actors[s].search.remote(q_arg, k, parts[s]) for s in dead}
            )
            if still_dead:
                raise _unavailable(still_dead)
            answers.update(retried)
        results = [answers[s] for s in sorted(answers)]
        return merge_topk([r[0] for r in results], [r[1] for r in results], k)

    def _split_allowed(self, allowed: np.ndarray) -> list[Any]:
        """Each shard's part of ``allowed`` (sorted, as each VectorIndex expects), as object references."""
        last = self._last_allowed
        if last is not None and last[0] is allowed:
            return last[1]
        a = np.asarray(allowed)
        a = np.ascontiguousarray(a.reshape(-1), dtype=np.int64)
        if len(a) and int(a.min()) < 0:
            raise ValueError("allowed ids must be >= 0")
        owner = shard_of(a, self.shards)
        parts = [self._ray.put(a[owner == s]) for s in range(self.shards)]
        if isinstance(allowed, np.ndarray) and not allowed.flags.writeable:
            self._last_allowed = (allowed, parts)
        return parts

    def _answers(self, futures: dict[int, Any]) -> tuple[dict[int, Any], list[int]]:
        """The answer of each shard in ``futures`` (shard → call), and the shards whose actor died (its
        process crashed, its node went away)."""
        answers, dead = {}, []
        for s, future in futures.items():
            try:
                answers[s] = self._ray.get(future)
            except self._ray.exceptions.RayActorError:
                dead.append(s)
        return answers, dead

    def _get(self, futures: list[Any]) -> list[Any]:
        """Every shard's answer, or a MmsearchError if one died."""
        answers, dead = self._answers(dict(enumerate(futures)))
        if dead:
            raise _unavailable(dead)
        return [answers[s] for s in range(len(futures))]

    def ids(self) -> np.ndarray:
        """All ids held (int64, in no particular order)."""
        parts = self._get([actor.ids.remote() for actor in self._actors])
        return np.concatenate(parts) if parts else np.empty(0, np.int64)

    def describe(self) -> list[dict[str, Any]]:
        """Each shard's index (type, tuned parameters, size) and the Ray node holding it."""
        return list(self._ray.get([actor.describe.remote() for actor in self._actors]))

    def close(self) -> None:
        """Stop the actors (their indexes go with them)."""
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors = []
        self._ntotals = []
        self._last_allowed = None


def _unavailable(dead: Sequence[int]) -> MmsearchError:
    if len(dead) == 1:
        return MmsearchError(f"shard {dead[0]} of the vector index is unavailable: its Ray actor died")
    names = ", ".join(map(str, dead))
    return MmsearchError(f"shards {names} of the vector index are unavailable: their Ray actors died")


@dataclass
class _Followed:
    """A sharded index and the catalog position it reflects (as store._Live for an in-memory one)."""

    vectors: ShardedVectors
    generation: int
    max_id: int
    seq: int


class ShardSet:
    """The sharded indexes of one index folder, one per (model, kind), built from the catalog on first use
    and kept in step with it by :meth:`refresh`. Handed to :meth:`mmsearch.store.Store.use_shards`."""

    def __init__(
        self, shards: int, *, spec: str | None = None, actor_options: dict[str, Any] | None = None
    ) -> None:
        if shards < 1:
            raise ConfigError(f"the number of shards must be at least 1, not {shards}")
        if spec is not None and spec not in SPECS:
            raise ConfigError(f"unknown index spec {spec!r}; expected one of {', '.join(SPECS)}")
        self.shards = shards
        self.spec = spec
        self.actor_options = actor_options
        self._followed: dict[tuple[str, str], _Followed] = {}
        self._lock = threading.Lock()  # one load / catch-up of a slot at a time

    @classmethod
    def connect(
        cls, address: str | None = ray_cluster.LOCAL, shards: int | None = None, **kwargs: Any
    ) -> ShardSet:
        """Join or start a Ray cluster (:func:`mmsearch.ray_cluster.connect`) and shard over it: ``shards``
        (default: one per alive node)."""
        ray = ray_cluster.connect(address)
        if shards is None:
            shards = max(1, sum(1 for node in ray.nodes() if node.get("Alive")))
        return cls(shards, **kwargs)

    def vectors(self, catalog: Catalog, kind: str, model: str, dim: int) -> ShardedVectors:
        """The sharded index of (model, kind), built from the catalog's committed state on first use."""
        slot = (model, kind)
        with self._lock:
            followed = self._followed.get(slot)
            if followed is None:
                followed = self._followed[slot] = self._build(catalog, kind, model, dim)
            return followed.vectors

    def refresh(self, catalog: Catalog, model: str, dim: int) -> None:
        """Follow the catalog: drop the shards of models other than ``model`` (no longer searched) and bring
        the others up to the catalog's generation."""
        with self._lock:
            for slot in [slot for slot in self._followed if slot[0] != model]:
                self._followed.pop(slot).vectors.close()
            for (_, kind), followed in list(self._followed.items()):
                if followed.generation != catalog.generation(kind, model):
                    self._catch_up(catalog, kind, model, dim, followed)

    def close(self) -> None:
        with self._lock:
            for followed in self._followed.values():
                followed.vectors.close()
            self._followed.clear()

    def _build(self, catalog: Catalog, kind: str, model: str, dim: int) -> _Followed:
        state = catalog.vector_state(kind, dim, model)
        vectors = ShardedVectors.build(
            dim,
            state.ids,
            state.vectors,
            shards=self.shards,
            spec=self.spec,
            actor_options=self.actor_options,
        )
        log.info("%s vectors of %s: %d over %d shards", kind, model, vectors.ntotal, self.shards)
        followed = _Followed(vectors, state.generation, state.max_id, state.seq)
        vectors.recover = lambda dead: self._recover(catalog, kind, model, dim, followed, dead)
        return followed

    def _recover(
        self, catalog: Catalog, kind: str, model: str, dim: int, followed: _Followed, dead: list[int]
    ) -> None:
        """Rebuild from the catalog the shards of ``followed`` whose actors a search found dead and replaced."""
        with self._lock:
            self._rebuild(catalog, kind, model, dim, followed, dead)

    def _catch_up(self, catalog: Catalog, kind: str, model: str, dim: int, followed: _Followed) -> None:
        delta = catalog.vector_delta(kind, dim, model, after_id=followed.max_id, after_seq=followed.seq)
        if delta is None:  # the change is no longer (or not) logged
            self._rebuild(catalog, kind, model, dim, followed, range(followed.vectors.shards))
            return
        outgrown = followed.vectors.apply(delta.ids, delta.vectors, delta.removed, above=followed.max_id)
        followed.generation, followed.max_id, followed.seq = delta.generation, delta.max_id, delta.seq
        if followed.vectors.ntotal != delta.count:
            log.warning("the sharded %s vectors differ from the catalog after following it: rebuilding", kind)
            outgrown = list(range(followed.vectors.shards))
        if outgrown:
            self._rebuild(catalog, kind, model, dim, followed, outgrown)

    def _rebuild(
        self, catalog: Catalog, kind: str, model: str, dim: int, followed: _Followed, which: Any
    ) -> None:
        """Rebuild the shards in ``which`` from the catalog; all of them if it moved on since ``followed``'s
        position (the others would be behind the state read)."""
        state = catalog.vector_state(kind, dim, model)
        which = list(which)
        if state.generation != followed.generation:
            which = list(range(followed.vectors.shards))
        followed.vectors.build_shards(which, state.ids, state.vectors)
        followed.generation, followed.max_id, followed.seq = state.generation, state.max_id, state.seq
