"""A LlamaIndex retriever over an mmsearch index (extra ``llamaindex``: ``llama-index-core``).

>>> from mmsearch import Index
>>> from mmsearch.integrations.llamaindex import MmsearchRetriever
>>> retriever = MmsearchRetriever(Index.open("indexes/photos"), k=4)
>>> nodes = retriever.retrieve("a red circle")
>>> nodes[0].node.image_path  # an ImageNode for an image hit

Each hit is a ``NodeWithScore`` (score: the cosine similarity): an ``ImageNode`` (``image_path`` set, text
its captions) for an image, a ``TextNode`` for a caption or a transcript segment; text and metadata as
described in :mod:`mmsearch.integrations`, node id ``mmsearch:ITEM_ID``. A ``QueryBundle`` with an
``image_path`` searches with that image (and its ``query_str``, if not empty).
"""

from __future__ import annotations

from typing import Any

from mmsearch.errors import MissingDependencyError

try:
    from llama_index.core.callbacks import CallbackManager
    from llama_index.core.retrievers import BaseRetriever
    from llama_index.core.schema import BaseNode, ImageNode, NodeWithScore, QueryBundle, TextNode
except ImportError as e:  # pragma: no cover - depends on the installation
    raise MissingDependencyError(
        e.name or "llama-index-core", "the LlamaIndex retriever", extra="llamaindex"
    ) from e

from mmsearch.api import Index
from mmsearch.integrations import DEFAULT_K, Retrieved, retrieve

__all__ = ["MmsearchRetriever"]

# Metadata an LLM reads with a node's text; the rest (ids, base64 bytes) stays out of its context.
LLM_METADATA = ("path", "kind", "start", "end")


class MmsearchRetriever(BaseRetriever):
    """Nodes for a query: the index's hits in rank order (``target``, ``k`` and ``mode`` as
    :meth:`mmsearch.Index.search` takes them; ``search_kwargs``: its filters, cut-offs and +/- terms)."""

    def __init__(
        self,
        index: Index,
        *,
        target: str | None = None,
        k: int = DEFAULT_K,
        mode: str = "hybrid",
        search_kwargs: dict[str, Any] | None = None,
        callback_manager: CallbackManager | None = None,
    ) -> None:
        super().__init__(callback_manager=callback_manager)
        self.index = index
        self.target = target
        self.k = k
        self.mode = mode
        self.search_kwargs = dict(search_kwargs or {})

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        text = query_bundle.query_str.strip() or None
        hits = retrieve(
            self.index,
            text,
            image=query_bundle.image_path,
            target=self.target,
            k=self.k,
            mode=self.mode,
            search_kwargs=self.search_kwargs,
        )
        return [NodeWithScore(node=node(r), score=r.score) for r in hits]


def node(r: Retrieved) -> BaseNode:
    hidden = [key for key in r.metadata if key not in LLM_METADATA]
    common: dict[str, Any] = {
        "id_": r.id,
        "text": r.text,
        "metadata": dict(r.metadata),
        "excluded_llm_metadata_keys": hidden,
        "excluded_embed_metadata_keys": list(r.metadata),
    }
    if r.metadata["kind"] == "image":
        return ImageNode(image_path=r.image_path, **common)
    return TextNode(**common)
