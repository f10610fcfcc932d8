"""A LangChain retriever over an mmsearch index (extra ``langchain``: ``langchain-core``).

>>> from mmsearch import Index
>>> from mmsearch.integrations.langchain import MmsearchRetriever
>>> retriever = MmsearchRetriever(index=Index.open("indexes/photos"), k=4)
>>> docs = retriever.invoke("a red circle")
>>> docs[0].metadata["image_path"]  # the image file to load

Each hit is a ``Document`` whose ``page_content`` and ``metadata`` are described in
:mod:`mmsearch.integrations`; its ``id`` is ``mmsearch:ITEM_ID``.
"""

from __future__ import annotations

from typing import Any

from mmsearch.errors import MissingDependencyError

try:
    from langchain_core.callbacks import CallbackManagerForRetrieverRun
    from langchain_core.documents import Document
    from langchain_core.retrievers import BaseRetriever
    from pydantic import ConfigDict, Field
except ImportError as e:  # pragma: no cover - depends on the installation
    raise MissingDependencyError(
        e.name or "langchain-core", "the LangChain retriever", extra="langchain"
    ) from e

from mmsearch.api import Index
from mmsearch.integrations import DEFAULT_K, Retrieved, retrieve

__all__ = ["MmsearchRetriever"]


class MmsearchRetriever(BaseRetriever):
    """Documents for a text query: the index's hits in rank order (``target``, ``k`` and ``mode`` as
    :meth:`mmsearch.Index.search` takes them; ``search_kwargs``: its filters, cut-offs and +/- terms)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    index: Index
    target: str | None = None
    k: int = DEFAULT_K
    mode: str = "hybrid"
    search_kwargs: dict[str, Any] = Field(default_factory=dict)

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        hits = retrieve(
            self.index, query, target=self.target, k=self.k, mode=self.mode, search_kwargs=self.search_kwargs
        )
        return [document(r) for r in hits]


def document(r: Retrieved) -> Document:
    return Document(id=r.id, page_content=r.text, metadata=dict(r.metadata))
