"""The LangChain and LlamaIndex retrievers (mmsearch.integrations) with the real libraries, over a demo index
(real OpenCLIP demo model, SQLite, FAISS); no LLM. Relevance is judged by the demo world's attributes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from PIL import Image

import mmsearch
from mmsearch.demo import world
from mmsearch.errors import BadQueryError, MissingDependencyError

RED_CIRCLE = {"colour": "red", "shape": "circle"}
BLUE_SQUARE = {"colour": "blue", "shape": "square"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    """An open demo index of 24 images with captions, and each image's attributes by path."""
    root = tmp_path_factory.mktemp("integrations")
    folder = world.write_demo_folder(root / "demo", n_images=24, seed=9, speech=False)
    with mmsearch.Index.create(root / "index", model="demo") as idx:
        assert idx.add_folder(folder.media_dir).images_embedded == 24
    index = mmsearch.Index.open(root / "index")
    yield folder, index, {str(im.path): im for im in folder.images}
    index.close()


def test_langchain_documents(demo) -> None:
    from langchain_core.documents import Document
    from langchain_core.retrievers import BaseRetriever

    from mmsearch.integrations.langchain import MmsearchRetriever

    folder, index, images = demo
    retriever = MmsearchRetriever(index=index, k=3)
    assert isinstance(retriever, BaseRetriever)
    docs = retriever.invoke("a red circle")
    assert len(docs) == 3 and all(isinstance(d, Document) for d in docs)
    top = docs[0]
    assert world.matches(RED_CIRCLE, images[top.metadata["image_path"]].attributes)
    assert top.metadata["kind"] == "image" and top.metadata["file_kind"] == "image"
    assert top.metadata["source"] == top.metadata["path"] == top.metadata["image_path"]
    assert top.page_content == images[top.metadata["path"]].caption.text  # an image's text: its captions
    assert top.id == f"mmsearch:{top.metadata['item_id']}"
    assert [d.metadata["rank"] for d in docs] == [1, 2, 3]
    assert all(d.metadata["start"] is None and d.metadata["end"] is None for d in docs)
    # score: the cosine similarity; the order is hybrid's (words and meaning), not the scores'
    assert all(-1 <= d.metadata["score"] <= 1 for d in docs)
    with Image.open(top.metadata["image_path"]) as im:  # the path loads the image
        assert im.size == (world.IMAGE_SIZE, world.IMAGE_SIZE)


def test_langchain_caption_hits_and_filters(demo) -> None:
    from mmsearch.integrations.langchain import MmsearchRetriever

    _, index, images = demo
    retriever = MmsearchRetriever(
        index=index, target="captions", k=4, search_kwargs={"ext": ["jpg"], "min_confidence": 0}
    )
    docs = retriever.invoke("a blue square")
    assert len(docs) == 4 and all(d.metadata["path"].endswith(".jpg") for d in docs)
    assert all(d.metadata["kind"] == "caption" for d in docs)
    for d in docs:  # a caption's text is its own, and its image is the file it describes
        assert d.page_content == images[d.metadata["image_path"]].caption.text
    batch = retriever.batch(["a blue square", "a red circle"])  # LangChain runs these in threads
    assert [d.id for d in batch[0]] == [d.id for d in docs]
    with pytest.raises(BadQueryError):
        MmsearchRetriever(index=index, mode="fuzzy").invoke("a red circle")


def test_llamaindex_nodes(demo) -> None:
    from llama_index.core.retrievers import BaseRetriever
    from llama_index.core.schema import ImageNode, MetadataMode, NodeWithScore, QueryBundle, TextNode

    from mmsearch.integrations.llamaindex import MmsearchRetriever

    folder, index, images = demo
    retriever = MmsearchRetriever(index, k=3)
    assert isinstance(retriever, BaseRetriever)
    nodes = retriever.retrieve("a red circle")
    assert len(nodes) == 3 and all(isinstance(n, NodeWithScore) for n in nodes)
    top = nodes[0]
    assert isinstance(top.node, ImageNode) and top.score == top.node.metadata["score"]
    assert world.matches(RED_CIRCLE, images[top.node.image_path].attributes)
    assert top.node.get_content() == images[top.node.image_path].caption.text
    assert top.node.node_id == f"mmsearch:{top.node.metadata['item_id']}"
    llm_view = top.node.get_content(metadata_mode=MetadataMode.LLM)
    assert "path:" in llm_view and "path_b64" not in llm_view and "item_id" not in llm_view

    # an image query (QueryBundle.image_path), answered with captions: text nodes
    by_image = retriever.retrieve(QueryBundle(query_str="", image_path=str(folder.image_query)))
    assert all(isinstance(n.node, TextNode) and not isinstance(n.node, ImageNode) for n in by_image)
    assert by_image[0].node.metadata["kind"] == "caption"
    assert world.matches(BLUE_SQUARE, images[by_image[0].node.metadata["image_path"]].attributes)

    similar = MmsearchRetriever(index, target="images", k=2)
    found = similar.retrieve(QueryBundle(query_str="", image_path=str(folder.image_query)))
    assert world.matches(BLUE_SQUARE, images[found[0].node.image_path].attributes)


def test_missing_library_names_the_extra(monkeypatch) -> None:
    for name in (
        "langchain_core",
        "llama_index",
        "mmsearch.integrations.langchain",
        "mmsearch.integrations.llamaindex",
    ):
        for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            monkeypatch.delitem(sys.modules, loaded)
    monkeypatch.setitem(sys.modules, "langchain_core", None)  # an import of it fails
    monkeypatch.setitem(sys.modules, "llama_index", None)
    with pytest.raises(MissingDependencyError, match=r"mmsearch\[langchain\]"):
        import mmsearch.integrations.langchain  # noqa: F401
    with pytest.raises(MissingDependencyError, match=r"mmsearch\[llamaindex\]"):
        import mmsearch.integrations.llamaindex  # noqa: F401


def test_the_integrations_package_imports_no_framework() -> None:
    import subprocess

    code = (
        "import sys, mmsearch.integrations; "
        "assert not {'langchain_core', 'llama_index'} & {m.split('.')[0] for m in sys.modules}"
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=120)
