"""Retrieval tool: corpus loading and chunking, hybrid index build / add / query, CLI, the tool
through the dispatcher, and retrieval quality on the real ICD-10-CM index (real all-MiniLM-L6-v2).

The ICD-10-CM tests use the real index over five real chapters (4 endocrine, 7 eye, 9 circulatory,
15 pregnancy, 19 injury: 21k passages, 6.9k embedded texts), built once and cached on disk
(``$MMEDAGENT_CACHE/rag``, default ``~/.cache/mmedagent/rag``) so later runs load it in under a
second; the full 22-chapter index is built by ``scripts/bench_rag.py`` (docs/rag.md explains why).
"""

import itertools
import json
import logging
import os
import shutil
import threading
import zlib
from pathlib import Path

import pytest

from mmedagent.dispatcher import Dispatcher
from mmedagent.protocol import ToolCall
from mmedagent.tools import _rag_index as ri
from mmedagent.tools import get_tool
from mmedagent.tools.rag import Retrieval, main


def make_pdf(path, lines):
    """A one-page PDF with one text line per entry (Helvetica), written by hand."""
    content = "BT /F1 12 Tf 72 720 Td 14 TL " + " ".join(f"({s}) Tj T*" for s in lines) + " ET"
    stream = zlib.compress(content.encode("latin-1"))
    objs = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    path.write_bytes(bytes(out))


@pytest.fixture(scope="session")
def embedder():
    return ri.Embedder()


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    (d / "asthma.txt").write_text(
        "Asthma is a chronic disease of the airways. Inhaled corticosteroids reduce airway inflammation; "
        "a short-acting bronchodilator relieves wheeze and breathlessness during an attack.", "utf-8")
    (d / "guide.md").write_text(
        "# Cardiology notes\n\n## Atrial fibrillation\nAn irregularly irregular pulse; anticoagulation "
        "prevents embolic stroke.\n\n## Heart failure\nBreathlessness, ankle swelling and raised jugular "
        "venous pressure; diuretics relieve congestion.\n", "utf-8")
    (d / "sub").mkdir()
    (d / "sub" / "drugs.jsonl").write_text(
        json.dumps({"text": "Metformin is first-line treatment for type 2 diabetes.", "title": "Metformin",
                    "code": "E11", "source": "formulary"}) + "\n\n"
        + json.dumps({"text": "Warfarin needs INR monitoring."}) + "\n", "utf-8")
    make_pdf(d / "fracture.pdf", ["Scaphoid fracture follows a fall on the outstretched hand.",
                                  "Snuffbox tenderness needs a wrist X-ray."])
    return d


@pytest.fixture(scope="session")
def corpus_index(tmp_path_factory, corpus_dir, embedder):
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ri.CACHE_ENV, str(cache))
        corpus = ri.load_corpus(corpus_dir, chunk_size=40, overlap=10)
        return ri.HybridIndex.build(corpus, tmp_path_factory.mktemp("idx") / "notes.idx", embedder)


ICD_TEST_CHAPTERS = ["4", "7", "9", "15", "19"]


@pytest.fixture(scope="session")
def icd_index(embedder):
    return ri.build_preset(ri.ICD10CM_PRESET, embedder=embedder, chapters=ICD_TEST_CHAPTERS)



def test_a_cached_preset_says_it_is_reused(icd_index, embedder, capsys):
    again = ri.build_preset(ri.ICD10CM_PRESET, embedder=embedder, chapters=ICD_TEST_CHAPTERS)
    assert again.path == icd_index.path
    assert f"reusing the cached index {icd_index.path}" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- corpus
def test_chunk_words_windows_overlap_and_cover_the_text():
    words = [f"w{i}" for i in range(300)]
    chunks = [c.split() for c in ri.chunk_words(" ".join(words), size=128, overlap=32)]
    assert [c[0] for c in chunks] == ["w0", "w96", "w192"]
    assert all(len(c) <= 128 for c in chunks)
    for a, b in itertools.pairwise(chunks):
        assert a[-32:] == b[:32]
    assert chunks[-1][-1] == "w299"
    assert ri.chunk_words("  \n ") == []
    with pytest.raises(ValueError, match="overlap"):
        ri.chunk_words("a b", size=4, overlap=4)


def test_load_corpus_reads_every_format_with_metadata(corpus_dir):
    corpus = ri.load_corpus(corpus_dir, chunk_size=40, overlap=10)
    by_source = {}
    for p in corpus.passages:
        by_source.setdefault(p["source"], []).append(p)
    assert set(by_source) == {"asthma.txt", "guide.md", "formulary", "sub/drugs.jsonl:3", "fracture.pdf"}
    assert {p["title"] for p in by_source["guide.md"]} == {"Atrial fibrillation", "Heart failure"}
    metformin = by_source["formulary"][0]
    assert (metformin["code"], metformin["title"], metformin["file"]) == ("E11", "Metformin", "sub/drugs.jsonl")
    pdf = by_source["fracture.pdf"][0]
    assert pdf["page"] == 1 and "Scaphoid fracture" in pdf["text"] and "Snuffbox" in pdf["text"]
    assert set(corpus.files) == {"asthma.txt", "guide.md", "sub/drugs.jsonl", "fracture.pdf"}
    assert len(corpus.units) == len(corpus.passages)


def test_load_corpus_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus not found"):
        ri.load_corpus(tmp_path / "missing")
    with pytest.raises(ValueError, match="no .txt"):
        ri.load_corpus(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"title": "no text"}\n', "utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*'text'"):
        ri.load_corpus(bad)
    other = tmp_path / "x.docx"
    other.write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported file type"):
        ri.load_corpus(other)


# ----------------------------------------------------------------------------------- index
def test_hybrid_search_finds_the_right_passage(corpus_index):
    top = corpus_index.search("what treats wheezing in asthma", k=3)[0]
    assert top.passage["source"] == "asthma.txt" and 0 < top.score <= 1
    top = corpus_index.search("swollen ankles and fluid overload", k=3)[0]
    assert top.passage["title"] == "Heart failure"
    assert corpus_index.search("metformin", k=1, mode="bm25")[0].passage["code"] == "E11"
    assert corpus_index.search("broken bone in the wrist after a fall", k=1, mode="dense")[0].passage["source"] == "fracture.pdf"
    with pytest.raises(ValueError, match="empty query"):
        corpus_index.search("   ")
    with pytest.raises(ValueError, match="unknown search mode"):
        corpus_index.search("asthma", mode="fuzzy")


def test_index_refuses_another_embedding_model(corpus_index):
    with pytest.raises(ValueError, match="built with embedding model"):
        ri.HybridIndex.load(corpus_index.path, ri.Embedder("someone/another-model"))
    with pytest.raises(FileNotFoundError, match="build one with"):
        ri.HybridIndex.load(corpus_index.path.parent / "nothing-here")


def test_cli_build_and_query_print_json(tmp_path, corpus_dir, capsys, monkeypatch):
    monkeypatch.setenv(ri.CACHE_ENV, str(tmp_path / "cache"))
    out = tmp_path / "cli.idx"
    assert main(["build", "--corpus", str(corpus_dir / "guide.md"), "--out", str(out), "--chunk-words", "30", "--overlap", "5"]) == 0
    built = json.loads(capsys.readouterr().out)
    assert built["passages"] == 2 and built["dense_units"] == 2
    assert main(["query", "--index", str(out), "--k", "2", "irregular heartbeat and blood thinners"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 2 and {"source", "text", "score"} <= set(hits[0])
    assert hits[0]["title"] == "Atrial fibrillation" and hits[0]["score"] >= hits[1]["score"]
    assert main(["query", "--index", str(tmp_path / "none"), "x"]) == 1
    assert "no index at" in capsys.readouterr().err


def test_incremental_add_embeds_only_new_texts(tmp_path, corpus_dir, monkeypatch):
    monkeypatch.setenv(ri.CACHE_ENV, str(tmp_path / "cache"))
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("Gout causes sudden pain and swelling of the big toe joint.", "utf-8")
    encoded = []

    class CountingEmbedder(ri.Embedder):
        def encode(self, texts, progress=False):
            encoded.extend(texts)
            return super().encode(texts, progress)

    emb = CountingEmbedder()
    idx = ri.HybridIndex.build(ri.load_corpus(docs), tmp_path / "i.idx", emb)
    assert idx.meta["passages"] == 1
    encoded.clear()
    (docs / "b.txt").write_text("Psoriasis gives scaly red plaques on elbows and knees.", "utf-8")
    idx, n, removed = ri.add_to_index(idx.path, docs, embedder=emb)
    assert (n, removed) == (1, 0) and idx.meta["passages"] == 2
    assert encoded == ["Psoriasis gives scaly red plaques on elbows and knees."]
    assert ri.add_to_index(idx.path, docs, embedder=emb)[1:] == (0, 0)  # nothing changed
    (docs / "a.txt").write_text("Kidney stones cause colicky flank pain.", "utf-8")
    idx, n, _ = ri.add_to_index(idx.path, docs, embedder=emb)
    assert n == 1 and idx.meta["passages"] == 2
    texts = [p["text"] for p in idx.passages]
    assert "Kidney stones cause colicky flank pain." in texts and not any("Gout" in t for t in texts)
    assert idx.search("renal colic", k=1)[0].passage["source"] == "a.txt"


# ------------------------------------------------------------------ robustness of build / add
@pytest.fixture
def counted(embedder, monkeypatch):
    """The texts the session embedder encodes during a test."""
    encoded = []
    real = embedder.encode

    def encode(texts, progress=False):
        encoded.extend(texts)
        return real(texts, progress)

    monkeypatch.setattr(embedder, "encode", encode)
    return encoded


def _docs(root, **files):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, "utf-8")
    return root


def test_build_never_replaces_what_is_not_an_index(tmp_path, embedder, monkeypatch, capsys):
    monkeypatch.setenv(ri.CACHE_ENV, str(tmp_path / "cache"))
    docs = _docs(tmp_path / "docs", **{"a.txt": "Gout causes sudden pain of the big toe."})
    corpus = ri.load_corpus(docs)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "precious.docx").write_text("irreplaceable")
    afile = tmp_path / "file.idx"
    afile.write_text("a file")
    before = sorted(p.name for p in tmp_path.iterdir())
    for out, message in ((mine, "not an index"), (docs, "is the corpus itself"), (afile, "is a file")):
        with pytest.raises(ValueError, match=message):
            ri.HybridIndex.build(corpus, out, embedder)
        assert main(["build", "--corpus", str(docs), "--out", str(out)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert (mine / "precious.docx").read_text() == "irreplaceable" and afile.read_text() == "a file"
    assert sorted(p.name for p in docs.iterdir()) == ["a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing stray left next to them
    # a single-file corpus: its folder cannot be --out either
    with pytest.raises(ValueError, match="holds the corpus"):
        ri.HybridIndex.build(ri.load_corpus(docs / "a.txt"), docs, embedder)
    # missing, empty and index folders are fine, and an index is replaced
    (tmp_path / "empty").mkdir()
    assert ri.HybridIndex.build(corpus, tmp_path / "empty", embedder).meta["passages"] == 1
    idx = ri.HybridIndex.build(corpus, tmp_path / "new" / "i.idx", embedder)
    _docs(docs, **{"b.txt": "Psoriasis gives scaly plaques."})
    assert ri.HybridIndex.build(ri.load_corpus(docs), idx.path, embedder).meta["passages"] == 2
    # an index kept inside its corpus folder: built, rebuilt and updated, never read as a document
    for _ in range(2):
        assert main(["build", "--corpus", str(docs), "--out", str(docs / "kb.idx")]) == 0
    assert main(["build", "--corpus", str(docs), "--out", str(docs / "kb.idx"), "--add"]) == 0
    assert ri.HybridIndex.load(docs / "kb.idx").meta["passages"] == 2


def test_preset_never_replaces_what_is_not_an_index(tmp_path, embedder, monkeypatch):
    monkeypatch.setenv(ri.CACHE_ENV, str(tmp_path / "cache"))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "precious.docx").write_text("irreplaceable")
    with pytest.raises(ValueError, match="not an index"):
        ri.build_preset(ri.ICD10CM_PRESET, mine, embedder, chapters=["22"])
    assert (mine / "precious.docx").read_text() == "irreplaceable"


def test_model_fingerprint_covers_weight_contents(tmp_path, embedder, corpus_index, monkeypatch):
    monkeypatch.setenv(ri.CACHE_ENV, str(tmp_path / "cache"))
    tuned = tmp_path / "tuned"
    shutil.copytree(embedder.model_id, tuned)
    assert ri.Embedder(tuned).fingerprint == embedder.fingerprint  # same files: same fingerprint
    weights = tuned / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4096:] = bytes(b ^ 0x5A for b in data[-4096:])  # "fine-tuned": same size, other numbers
    weights.write_bytes(bytes(data))
    fingerprint = ri.Embedder(tuned).fingerprint
    assert fingerprint != embedder.fingerprint
    with pytest.raises(ValueError, match="built with embedding model"):
        ri.HybridIndex.load(corpus_index.path, ri.Embedder(tuned))
    # digests are remembered by path + size + mtime, in memory and in the cache
    reads = []
    real = ri._file_sha256
    monkeypatch.setattr(ri, "_file_sha256", lambda p: reads.append(p) or real(p))
    assert ri.Embedder(tuned).fingerprint == fingerprint
    monkeypatch.setattr(ri, "_DIGESTS", {})
    assert ri.Embedder(tuned).fingerprint == fingerprint
    assert reads == []


def test_a_hub_model_is_fingerprinted_by_its_cached_revision(tmp_path, embedder, monkeypatch):
    """A hub id's vectors are not reused once the hub's newer revision of the model is the one loaded."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    refs = {}
    for repo in ("acme/med-minilm", "sentence-transformers/minilm-x"):
        folder = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
        for commit in ("a" * 40, "b" * 40):
            (folder / "snapshots" / commit).mkdir(parents=True)
        (folder / "refs").mkdir()
        refs[repo] = folder / "refs" / "main"
        refs[repo].write_text("a" * 40)

    def fingerprint(model_id):
        e = ri.Embedder(model_id)
        e._model = embedder.model  # (loaded from the cache in real use; the revision is what counts)
        return e.fingerprint

    first = fingerprint("acme/med-minilm")
    refs["acme/med-minilm"].write_text("b" * 40)  # a newer revision fetched into the cache
    assert fingerprint("acme/med-minilm") != first
    refs["acme/med-minilm"].write_text("a" * 40)
    assert fingerprint("acme/med-minilm") == first
    bare = fingerprint("minilm-x")  # sentence-transformers' short names resolve under its organisation
    refs["sentence-transformers/minilm-x"].write_text("b" * 40)
    assert fingerprint("minilm-x") != bare


def test_a_relative_model_folder_is_stored_absolute(tmp_path, embedder, monkeypatch):
    monkeypatch.setenv(ri.CACHE_ENV, str(tmp_path / "cache"))
    model = Path(embedder.model_id)
    monkeypatch.chdir(model.parent)
    relative = ri.Embedder(model.name)
    assert relative.model_id == str(model.resolve()) and relative.fingerprint == embedder.fingerprint
    relative._model = embedder.model  # the same weights: no second load
    idx = ri.HybridIndex.build(ri.load_corpus(_docs(tmp_path / "d", **{"a.txt": "Gout of the toe."})),
                               tmp_path / "i.idx", relative)
    assert idx.meta["model"] == str(model.resolve())
    monkeypatch.chdir(tmp_path)
    assert ri.HybridIndex.load(idx.path).embedder.model_id == str(model.resolve())


def test_an_index_swapped_out_while_it_is_checked_counts_as_missing(tmp_path, monkeypatch):
    """Another build renames the old index away (then its new one in) at any moment: ``check_out``
    outside the lock must not call that a file or a folder of other files."""
    import shutil

    out = tmp_path / "i.idx"
    out.mkdir()
    (out / "meta.json").write_text("{}")  # being replaced: no 'format' any more
    monkeypatch.setattr(ri, "_is_index", lambda path: shutil.rmtree(path) or False)  # ...and gone
    assert ri.check_out(out) == out


def test_index_swap_survives_leftovers_a_failed_rename_and_concurrent_builds(tmp_path, embedder, monkeypatch):
    monkeypatch.setenv(ri.CACHE_ENV, str(tmp_path / "cache"))
    docs = _docs(tmp_path / "docs", **{"a.txt": "Gout causes sudden pain of the big toe."})
    out = tmp_path / "i.idx"
    ri.HybridIndex.build(ri.load_corpus(docs), out, embedder)
    stale = tmp_path / f".i.idx.old.{os.getpid()}"  # left by an interrupted build of an older version
    stale.mkdir()
    (stale / "meta.json").write_text("{}")
    _docs(docs, **{"b.txt": "Psoriasis gives scaly plaques."})
    assert ri.HybridIndex.build(ri.load_corpus(docs), out, embedder).meta["passages"] == 2
    assert not stale.exists()

    real = os.replace

    def failing(src, dst):
        if Path(src).name.startswith(".i.idx.tmp-"):
            raise KeyboardInterrupt  # between the two renames
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    _docs(docs, **{"c.txt": "Shingles is a painful rash."})
    with pytest.raises(KeyboardInterrupt):
        ri.HybridIndex.build(ri.load_corpus(docs), out, embedder)
    monkeypatch.setattr(os, "replace", real)
    assert ri.HybridIndex.load(out, embedder).meta["passages"] == 2  # the old index is back
    assert sorted(p.name for p in tmp_path.iterdir()) == [".i.idx.lock", "cache", "docs", "i.idx"]

    corpora = [ri.load_corpus(docs), ri.load_corpus(docs / "a.txt")]
    errors = []

    def build(i):
        try:
            for j in range(4):
                ri.HybridIndex.build(corpora[(i + j) % 2], out, embedder)
        except Exception as e:  # noqa: BLE001 (collected for the assert)
            errors.append(repr(e))

    threads = [threading.Thread(target=build, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert ri.HybridIndex.load(out, embedder).meta["passages"] in (1, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".i.idx.lock", "cache", "docs", "i.idx"]


def test_add_drops_the_passages_of_deleted_files(tmp_path, embedder, monkeypatch, capsys):
    monkeypatch.setenv(ri.CACHE_ENV, str(tmp_path / "cache"))
    docs = _docs(tmp_path / "docs", **{"a.txt": "Asthma narrows the airways.", "b.txt": "Gout is caused by uric acid.",
                                       "sub/n.txt": "Migraine headache with aura."})
    out = tmp_path / "i.idx"
    ri.HybridIndex.build(ri.load_corpus(docs), out, embedder)
    (docs / "b.txt").unlink()
    idx, n, removed = ri.add_to_index(out, docs, embedder=embedder)
    assert (n, removed) == (0, 1) and set(idx.meta["files"]) == {"a.txt", "sub/n.txt"}
    assert not idx.search("uric acid gout", k=3, mode="bm25")
    (docs / "sub" / "n.txt").unlink()
    _docs(docs, **{"sub/m.txt": "Meningitis causes a stiff neck."})
    idx, n, removed = ri.add_to_index(out, docs / "sub", embedder=embedder)  # a.txt is out of its scope
    assert (n, removed) == (1, 1) and sorted(idx.meta["files"]) == ["a.txt", "sub/m.txt"]
    assert main(["build", "--corpus", str(docs), "--out", str(out), "--add"]) == 0
    assert "0 file(s) added or replaced, 0 removed" in capsys.readouterr().err


def test_add_keeps_sources_relative_to_the_corpus_it_was_built_from(tmp_path, embedder, monkeypatch):
    monkeypatch.setenv(ri.CACHE_ENV, str(tmp_path / "cache"))
    docs = _docs(tmp_path / "docs", **{"a.txt": "Asthma narrows the airways.",
                                       "sub/n.txt": "Migraine headache with aura."})
    out = tmp_path / "i.idx"
    idx = ri.HybridIndex.build(ri.load_corpus(docs), out, embedder)
    assert idx.meta["corpus_root"] == str(docs.resolve())
    (docs / "sub" / "n.txt").write_text("Migraine headache with aura and nausea.", "utf-8")
    idx, n, removed = ri.add_to_index(out, docs / "sub" / "n.txt", embedder=embedder)
    assert (n, removed) == (1, 0) and idx.meta["passages"] == 2
    assert [p["source"] for p in idx.passages if "Migraine" in p["text"]] == ["sub/n.txt"]
    other = _docs(tmp_path / "other", **{"a.txt": "Asthma narrows the airways."})
    with pytest.raises(ValueError, match="indexes the corpus"):
        ri.add_to_index(out, other, embedder=embedder)
    assert ri.HybridIndex.load(out, embedder).meta["passages"] == 2


def test_rebuilds_embed_only_changed_texts(tmp_path, embedder, counted, monkeypatch):
    monkeypatch.setenv(ri.CACHE_ENV, str(tmp_path / "cache"))
    docs = _docs(tmp_path / "docs", **{f"d{i}.txt": f"Note {i} about condition number {i}." for i in range(3)})
    ri.HybridIndex.build(ri.load_corpus(docs), tmp_path / "one.idx", embedder)
    assert len(counted) == 3
    counted.clear()
    _docs(docs, **{"d1.txt": "Note 1 was changed."})
    ri.HybridIndex.build(ri.load_corpus(docs), tmp_path / "two.idx", embedder)  # the cache, text by text
    assert counted == ["Note 1 was changed."]


def test_an_unusable_cache_warns_and_the_index_at_out_gives_its_vectors(tmp_path, embedder, counted, monkeypatch,
                                                                         caplog):
    afile = tmp_path / "afile"
    afile.write_text("")
    monkeypatch.setenv(ri.CACHE_ENV, str(afile / "cache"))  # cannot be created
    docs = _docs(tmp_path / "docs", **{f"d{i}.txt": f"Note {i} about condition number {i}." for i in range(3)})
    with caplog.at_level(logging.WARNING, logger=ri.__name__):
        ri.HybridIndex.build(ri.load_corpus(docs), tmp_path / "two.idx", embedder)
    assert "going on without caching" in caplog.text
    counted.clear()
    _docs(docs, **{"d2.txt": "Note 2 was changed."})
    with caplog.at_level(logging.WARNING, logger=ri.__name__):
        idx = ri.HybridIndex.build(ri.load_corpus(docs), tmp_path / "two.idx", embedder)
    assert counted == ["Note 2 was changed."] and idx.meta["passages"] == 3
    assert "going on without caching" in caplog.text
    assert idx.search("changed note two", k=1)[0].passage["source"] == "d2.txt"


def test_a_preset_is_built_into_out_when_the_cache_cannot_be_written(tmp_path, embedder, monkeypatch, caplog):
    afile = tmp_path / "afile"
    afile.write_text("")
    monkeypatch.setenv(ri.CACHE_ENV, str(afile / "cache"))
    with pytest.raises(OSError, match="cannot be written; pass --out"):
        ri.build_preset(ri.ICD10CM_PRESET, embedder=embedder, chapters=["22"])
    with caplog.at_level(logging.WARNING, logger=ri.__name__):
        idx = ri.build_preset(ri.ICD10CM_PRESET, tmp_path / "icd.idx", embedder, chapters=["22"])
    assert idx.path == tmp_path / "icd.idx" and idx.meta["chapters"] == ["22"] and "straight into" in caplog.text


def test_jsonl_that_is_not_utf8_is_named_with_its_line(tmp_path):
    d = tmp_path / "jsonl"
    d.mkdir()
    (d / "a.jsonl").write_bytes('\ufeff{"text": "bom line"}\n'.encode() + b'{"text": "caf\xe9 au lait"}\n')
    with pytest.raises(ValueError, match=r"a.jsonl:2: not valid UTF-8"):
        ri.load_corpus(d)
    (d / "a.jsonl").write_text('\ufeff{"text": "bom line"}\n', "utf-8")  # a byte-order mark is fine
    assert ri.load_corpus(d).passages[0]["text"] == "bom line"


def test_jsonl_number_titles_become_strings_and_other_types_are_refused(tmp_path, embedder, monkeypatch):
    monkeypatch.setenv(ri.CACHE_ENV, str(tmp_path / "cache"))
    d = tmp_path / "jsonl"
    d.mkdir()
    (d / "a.jsonl").write_text('\ufeff{"text": "bom line", "title": 2024}\n{"text": "x", "title": ["a"]}\n', "utf-8")
    with pytest.raises(ValueError, match=r"a.jsonl:2: 'title' must be a string"):
        ri.load_corpus(d)
    (d / "a.jsonl").write_text('\ufeff{"text": "diabetes mellitus type two", "title": 2024}\n', "utf-8")
    idx = ri.HybridIndex.build(ri.load_corpus(d), tmp_path / "j.idx", embedder)
    assert idx.passages[0]["title"] == "2024"
    tool = Retrieval(index=str(idx.path))
    tool._index = idx  # loaded with the session's model (tool.load() would load it again)
    assert tool(None, tool.Params(query="diabetes")).passages[0].title == "2024"  # the tool's Result validates


def test_a_corrupt_pdf_is_named_in_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(ri.CACHE_ENV, str(tmp_path / "cache"))
    pdf = tmp_path / "pdf"
    pdf.mkdir()
    (pdf / "ok.txt").write_text("asthma", "utf-8")
    (pdf / "bad.pdf").write_text("<html>not a pdf</html>")
    with pytest.raises(ValueError, match="bad.pdf: cannot read this PDF"):
        ri.load_corpus(pdf)
    capsys.readouterr()
    assert main(["build", "--corpus", str(pdf), "--out", str(tmp_path / "p.idx")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "bad.pdf" in err[0]


def test_a_file_name_that_is_not_utf8_is_escaped(tmp_path, embedder, monkeypatch):
    monkeypatch.setenv(ri.CACHE_ENV, str(tmp_path / "cache"))
    names = tmp_path / "names"
    names.mkdir()
    with open(os.path.join(os.fsencode(names), b"caf\xe9.txt"), "wb") as f:
        f.write(b"coronary artery disease")
    idx = ri.HybridIndex.build(ri.load_corpus(names), tmp_path / "n.idx", embedder)
    assert idx.passages[0]["source"] == "caf\\xe9.txt" and idx.meta["files"] == {"caf\\xe9.txt": ri._file_sha256(
        Path(os.fsdecode(os.path.join(os.fsencode(names), b"caf\xe9.txt"))))}


def test_chinese_text_is_chunked_and_found_by_bm25(tmp_path, embedder, monkeypatch):
    monkeypatch.setenv(ri.CACHE_ENV, str(tmp_path / "cache"))
    mi = "心肌梗死是冠状动脉急性、持续性缺血缺氧所引起的心肌坏死。" * 12 + "临床上多有剧烈而持久的胸骨后疼痛。"
    chunks = ri.chunk_words(mi, size=64, overlap=16)
    assert len(chunks) > 5 and all(len(c) <= 64 for c in chunks) and chunks[-1].endswith("胸骨后疼痛。")
    assert ri.chunk_words("x" * 100, size=2, overlap=0) == ["x" * 64, "x" * 36]  # no spaces at all
    docs = _docs(tmp_path / "docs", **{"mi.txt": mi, "dm.txt": "糖尿病是一组以高血糖为特征的代谢性疾病。" * 5})
    idx = ri.HybridIndex.build(ri.load_corpus(docs, chunk_size=64, overlap=16), tmp_path / "i.idx", embedder)
    hit = idx.search("胸骨后疼痛", k=1, mode="bm25")[0].passage
    assert hit["source"] == "mi.txt" and "胸骨后疼痛" in hit["text"]
    assert idx.search("糖尿病", k=1, mode="bm25")[0].passage["source"] == "dm.txt"


def test_hidden_files_and_folders_are_skipped(tmp_path):
    docs = _docs(tmp_path / "docs", **{"a.txt": "Gout.", ".notes.txt": "hidden", ".git/x.txt": "hidden",
                                       ".ipynb_checkpoints/a-checkpoint.txt": "Gout.", "sub/.cache/y.md": "hidden"})
    assert set(ri.load_corpus(docs).files) == {"a.txt"}
    assert set(ri.load_corpus(docs / ".git").files) == {"x.txt"}  # unless asked for by name


def test_identical_passages_are_returned_once(tmp_path, embedder, monkeypatch):
    monkeypatch.setenv(ri.CACHE_ENV, str(tmp_path / "cache"))
    same = "Pneumonia is an infection of the lungs."
    docs = _docs(tmp_path / "docs", **{"a.txt": same, "b.txt": same, "c.txt": same, "d.txt": "Fracture of the femur."})
    idx = ri.HybridIndex.build(ri.load_corpus(docs), tmp_path / "i.idx", embedder)
    texts = [h.passage["text"] for h in idx.search("lung infection", k=3)]
    assert texts[0] == same and len(texts) == len(set(texts)) == 2


def test_long_queries_are_cut(corpus_index, monkeypatch):
    seen = []
    real = corpus_index.embedder.encode
    monkeypatch.setattr(corpus_index.embedder, "encode",
                        lambda texts, progress=False: seen.extend(texts) or real(texts))
    long = "wheeze in asthma " + " ".join(f"word{i}" for i in range(5000))
    assert corpus_index.search(long, k=1)[0].passage["source"] == "asthma.txt"
    assert len(seen[0].split()) == 128  # ri.MAX_QUERY_WORDS


# ------------------------------------------------------------------------------------ tool
def test_tool_is_registered_without_image_and_validates_params():
    assert get_tool("ChatCAD-R") is Retrieval and get_tool("rag") is Retrieval
    assert Retrieval.needs_image is False
    assert Retrieval.Params.model_validate({"question": "asthma"}).query == "asthma"
    assert Retrieval.Params.model_validate({}).k == 5


def test_tool_through_dispatcher(corpus_index):
    tool = Retrieval(index=str(corpus_index.path))
    d = Dispatcher([tool], timeout_s=120)
    calls = [
        ToolCall(API_name="ChatCAD-R", API_params={"image": "<imagepath>", "question": "inhaler for asthma attack"}),
        ToolCall(API_name="rag", API_params={"query": "irregular pulse", "k": 1}),
        ToolCall(API_name="retrieval", API_params={}),
        ToolCall(API_name="retrieval", API_params={"query": "x", "k": 0}),
    ]
    outcomes, results = d.dispatch_all(calls, None)
    asked, _ = d.dispatch_all([ToolCall(API_name="ChatCAD-R", API_params={})], None, question="irregular pulse")
    assert asked[0].ok and asked[0].output["passages"][0]["source"] == "guide.md"  # MMedAgent's {} call: the question
    first = outcomes[0]
    assert first.ok, first.error
    assert first.output["passages"][0]["source"] == "asthma.txt"
    assert all(set(p) >= {"source", "text", "score"} and len(p["text"]) <= 300 for p in first.output["passages"])
    assert results[0].passages[0].text.startswith("Asthma")
    assert outcomes[1].ok and len(outcomes[1].output["passages"]) == 1
    assert outcomes[1].output["passages"][0]["source"] == "guide.md"
    assert not outcomes[2].ok and "query" in outcomes[2].error
    assert not outcomes[3].ok and "k:" in outcomes[3].error
    d.close()


# ------------------------------------------------------------------------- real ICD-10-CM
ISSUE_QUERIES = {
    "heart attack": {"I21", "I22"},
    "sugar diabetes in pregnancy": {"O24"},
    "broken wrist": {"S62", "S52"},
    "high blood pressure": {"I10"},
    "pink eye": {"H10"},
}
MORE_QUERIES = {
    "blood clot in the lung": {"I26"},
    "stroke": {"I60", "I61", "I62", "I63"},
    "morning sickness": {"O21"},
    "miscarriage": {"O03"},
    "sprained ankle": {"S93"},
    "concussion": {"S06"},
    "heat stroke": {"T67"},
    "crossed eyes": {"H50"},
    "nearsightedness": {"H52"},
    "underactive thyroid": {"E03", "E02", "E01", "E89"},
    "high cholesterol": {"E78"},
}


def _hit(index, query, families, mode="hybrid"):
    return any(h.passage["code"][:3] in families and "-" not in h.passage["code"] for h in index.search(query, 5, mode))


def test_icd_index_holds_the_tabular_list_of_its_chapters(icd_index):
    meta = icd_index.meta
    assert meta["preset"] == "icd10cm" and meta["chapters"] == ICD_TEST_CHAPTERS
    by_code = {p["code"]: p for p in icd_index.passages}
    assert len(by_code) == len(icd_index.passages)  # one passage per code (E36 is a block and a category)
    assert len(by_code) > 18000 and "J45" not in by_code and "E11.9" in by_code and "T67.0" in by_code
    assert "high blood pressure" in by_code["I10"]["text"]
    assert by_code["O24.4"]["title"] == "Gestational diabetes mellitus"
    assert "7th character: A initial encounter for closed fracture" in by_code["S52"]["text"]
    assert by_code["I21"]["source"] == ri.ICD10CM_SOURCE


# "heart attack" and "pink eye" appear nowhere in the tabular list (only in ICD-10-CM's alphabetic
# index, which simple-icd-10-cm does not ship) and MiniLM ranks "Injury of heart" / "Black eye"
# above myocardial infarction / conjunctivitis: known misses, kept here so a fix shows up.
KNOWN_MISS = pytest.mark.xfail(strict=True, reason="lay term absent from the tabular list; see docs/rag.md")


@pytest.mark.parametrize("query", [pytest.param(q, marks=KNOWN_MISS) if q in ("heart attack", "pink eye") else q
                                   for q in sorted(ISSUE_QUERIES)])
def test_icd_plain_language_questions_find_their_family(icd_index, query):
    assert _hit(icd_index, query, ISSUE_QUERIES[query]), [h.passage["code"] for h in icd_index.search(query, 5)]


CLINICAL_QUERIES = {
    "STEMI of the anterior wall": {"I21"},
    "gestational diabetes controlled by diet": {"O24"},
    "Colles fracture": {"S52"},
    "acute mucopurulent conjunctivitis": {"H10"},
    "Hashimoto thyroiditis": {"E06"},
    "poisoning by warfarin": {"T45"},
    "HELLP syndrome": {"O14"},
    "atrial fibrillation": {"I48"},
}
CODE_QUERIES = {"I21.4": {"I21"}, "O24.410": {"O24"}, "S52.501": {"S52"}, "H10.33": {"H10"}}


def test_icd_hybrid_beats_dense_only(icd_index):
    totals = {}
    for name, queries in (("lay", {**ISSUE_QUERIES, **MORE_QUERIES}), ("clinical", CLINICAL_QUERIES),
                          ("codes", CODE_QUERIES)):
        hybrid = sum(_hit(icd_index, q, f) for q, f in queries.items())
        dense = sum(_hit(icd_index, q, f, "dense") for q, f in queries.items())
        assert hybrid >= dense, name
        totals[name] = (hybrid, dense, len(queries))
    assert totals["lay"][0] >= totals["lay"][2] - 3  # the two known misses above, and one spare
    assert totals["clinical"][0] == len(CLINICAL_QUERIES)
    assert totals["codes"][0] == 4 and totals["codes"][1] < 4  # code lookups need the lexical side
    found = [h.passage for h in icd_index.search("O24.410", 5) if h.passage.get("group") == "O24"]
    assert found[0]["code"] == "O24.410" and "Gestational diabetes" in found[0]["text"]


def test_tool_on_the_icd_preset(icd_index):
    d = Dispatcher([Retrieval(chapters=ICD_TEST_CHAPTERS)], timeout_s=120)
    out = d.dispatch(ToolCall(API_name="ChatCAD-R", API_params={"query": "high blood pressure", "k": 3}), None)
    assert out.ok, out.error
    assert out.output["passages"][0]["code"] == "I10" and "high blood pressure" in out.output["passages"][0]["text"]
    assert out.output["passages"][0]["source"] == ri.ICD10CM_SOURCE
    d.close()


def test_concurrent_adds_to_one_index_keep_every_file(tmp_path, embedder, monkeypatch):
    """Each --add reads, merges and swaps under the index's lock: none loses another's files."""
    monkeypatch.setenv(ri.CACHE_ENV, str(tmp_path / "cache"))
    docs = _docs(tmp_path / "docs", **{"a.txt": "Gout causes sudden pain of the big toe."})
    out = tmp_path / "i.idx"
    ri.HybridIndex.build(ri.load_corpus(docs), out, embedder)
    topics = ["Psoriasis gives scaly plaques.", "Shingles is a painful rash.", "Asthma narrows the airways.",
              "Anemia lowers hemoglobin."]
    _docs(docs, **{f"n{i}.txt": text for i, text in enumerate(topics)})
    errors = []

    def add(i):
        try:
            ri.add_to_index(out, docs / f"n{i}.txt", embedder=embedder)
        except Exception as e:  # noqa: BLE001 (collected for the assert)
            errors.append(repr(e))

    threads = [threading.Thread(target=add, args=(i,)) for i in range(len(topics))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(ri.HybridIndex.load(out, embedder).meta["files"]) == ["a.txt"] + [f"n{i}.txt" for i in range(4)]


# ------------------------------------------------------------------- a user's own corpus, damaged indexes
def test_text_files_that_are_not_utf8_are_decoded_and_named(tmp_path, caplog):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "latin1.txt").write_bytes("Prééclampsie: sulfate de magnésium.".encode("cp1252"))
    (docs / "notepad.md").write_bytes("# Gicht\nHarnsäure in den Gelenken.".encode("utf-16"))  # with its BOM
    (docs / "utf8.txt").write_text("Ménière disease.", "utf-8")
    with caplog.at_level(logging.WARNING, logger=ri.__name__):
        texts = {p["source"]: p["text"] for p in ri.load_corpus(docs).passages}
    assert texts == {"latin1.txt": "Prééclampsie: sulfate de magnésium.", "notepad.md": "Harnsäure in den Gelenken.",
                     "utf8.txt": "Ménière disease."}
    assert "latin1.txt is not UTF-8 (byte 3); read as Windows-1252" in caplog.text
    assert "notepad.md" not in caplog.text and "utf8.txt" not in caplog.text


def test_files_without_text_are_named_in_one_warning(tmp_path, caplog):
    docs = _docs(tmp_path / "docs", **{"gout.txt": "Gout affects the big toe.", "empty.txt": "", "blank.md": "  \n\n",
                                       "headings.md": "# Title\n## Only headings\n"})
    make_pdf(docs / "scan.pdf", [])  # a page without a text layer, as a scanner makes
    with caplog.at_level(logging.WARNING, logger=ri.__name__):
        corpus = ri.load_corpus(docs)
    assert {p["source"] for p in corpus.passages} == {"gout.txt"}
    assert ("no text in 4 file(s), nothing indexed from them: blank.md, empty.txt, headings.md, scan.pdf "
            "(a PDF of scanned pages has no text layer: run OCR on it first)") in caplog.text


def test_chunking_a_huge_file_never_holds_all_its_words(monkeypatch):
    import tracemalloc

    text = "Sepsis needs antibiotics within one hour and fluids for hypotension. " * 40_000  # 2.8 MB, 400k words
    tracemalloc.start()
    chunks = ri.chunk_words(text, 128, 32)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(chunks) == -(-(400_000 - 32) // 96) and chunks[0].startswith("Sepsis needs")
    # the chunks themselves are 4/3 of the text (overlap); a list of 400k words took over 20 times the text
    assert peak < 3 * len(text), peak


def _damage(idx, how, other):
    if how == "missing dense.faiss":
        (idx / "dense.faiss").unlink()
    elif how == "truncated dense.faiss":
        os.truncate(idx / "dense.faiss", 100)
    elif how in ("dense.faiss", "passages.json", "dense_pid.npy", "bm25_pid.npy"):  # from another index
        shutil.copy(other / how, idx / how)
    elif how == "bm25":
        shutil.rmtree(idx / "bm25")
        shutil.copytree(other / "bm25", idx / "bm25")
    else:
        meta = json.loads((idx / "meta.json").read_text())
        if how == "meta.json without keys":
            meta = {"format": meta["format"], "corpus_root": meta["corpus_root"]}
        elif how == "meta.json of a newer format":
            meta["format"] += 1
        (idx / "meta.json").write_text("{not json" if how == "meta.json not JSON" else json.dumps(meta))


DAMAGE = {
    "missing dense.faiss": "not a complete index (RuntimeError",
    "truncated dense.faiss": "not a complete index (RuntimeError",
    "dense.faiss": "not a complete index (dense.faiss has 1 entries, meta.json says",
    "passages.json": "not a complete index (passages.json has 1 entries, meta.json says",
    "dense_pid.npy": "not a complete index (dense_pid.npy has 1 entries",
    "bm25_pid.npy": "not a complete index (bm25_pid.npy has 1 entries",
    "bm25": "not a complete index (bm25 has 1 entries",
    "meta.json not JSON": "not a complete index (meta.json: ",
    "meta.json without keys": "not a complete index (meta.json lacks model, model_fingerprint, passages",
    "meta.json of a newer format": "made by a newer version of mmedagent; upgrade mmedagent, or rebuild it",
}


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_or_mixed_index_is_one_clear_error(tmp_path, corpus_index, corpus_dir, embedder, monkeypatch,
                                                    capsys, how):
    """Files of another build (a partial copy, a sync between machines) or a damaged file are refused
    with what is wrong and the command that rebuilds the index, never a traceback or wrong passages."""
    monkeypatch.setenv(ri.CACHE_ENV, str(tmp_path / "cache"))
    other = ri.HybridIndex.build(ri.load_corpus(_docs(tmp_path / "other", **{"a.txt": "Gout."})),
                                 tmp_path / "other.idx", embedder).path
    idx = tmp_path / "notes.idx"
    shutil.copytree(corpus_index.path, idx)
    _damage(idx, how, other)
    with pytest.raises(ValueError) as e:
        ri.HybridIndex.load(idx, embedder)
    assert DAMAGE[how] in str(e.value)
    corpus = "CORPUS" if how == "meta.json not JSON" else corpus_dir.resolve()  # the root is in meta.json
    rebuild = f"python -m mmedagent.tools.rag build --corpus {corpus} --out {idx}"
    assert str(e.value).endswith(rebuild)
    assert main(["query", "--index", str(idx), "asthma"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and DAMAGE[how] in err[-1]


def test_a_damaged_cached_preset_is_built_again(tmp_path, embedder, monkeypatch, caplog):
    monkeypatch.setenv(ri.CACHE_ENV, str(tmp_path / "cache"))
    first = ri.build_preset(ri.ICD10CM_PRESET, embedder=embedder, chapters=["22"])
    os.truncate(first.path / "dense.faiss", 100)  # a full disk, a copy cut short
    with caplog.at_level(logging.WARNING, logger=ri.__name__):
        again = ri.build_preset(ri.ICD10CM_PRESET, embedder=embedder, chapters=["22"])
    assert again.path == first.path and "cannot be used; building it again" in caplog.text
    assert again.search("COVID-19", 1)[0].passage["code"].startswith("U07")


def test_icd_codes_are_found_as_people_write_them(icd_index):
    """Codes without their dot (billing exports), with their 7th character (S52.501A: extended codes
    are folded into their code, S52.501), several in one query, or with words."""
    first = {q: icd_index.search(q, 5)[0].passage["code"] for q in
             ("E119", "o24410", "S52.501A", "S52501A", "I21.4 E11.9", "O24.410 gestational diabetes in pregnancy")}
    assert first == {"E119": "E11.9", "o24410": "O24.410", "S52.501A": "S52.501", "S52501A": "S52.501",
                     "I21.4 E11.9": "I21.4", "O24.410 gestational diabetes in pregnancy": "O24.410"}
    assert "E11.9" in [h.passage["code"] for h in icd_index.search("I21.4 E11.9", 5)]
    assert icd_index.search("h1n1", 5)  # code-like but no code: searched as a word
    # biomarker names shaped like codes are not cut down to one (S100B is not S10.0, contusion of throat)
    assert icd_index._indexed_code("s100b") == "s100b" and not icd_index.query_terms("S100B protein")[1]
    assert "S10.0" not in [h.passage["code"] for h in icd_index.search("elevated S100B protein after head injury", 3)]


def test_an_exact_code_comes_first_on_a_tie_with_a_dense_look_alike(icd_index):
    # "H10.33" is first for BM25 and absent from the dense ranking, whose first is some other code: equal RRF scores
    for code in ("H10.33", "I21.4", "O24.410", "S52.501", "E11.9", "T45.515"):
        hits = icd_index.search(code, 5)
        assert hits[0].passage["code"] == code, [(h.passage["code"], h.ranks) for h in hits]


def test_the_model_sees_a_bounded_text_cut_at_a_word():
    from mmedagent.tools.rag import MODEL_TEXT_CHARS, MODEL_TOTAL_CHARS, Passage

    long = " ".join(["anticoagulation"] * 200)
    result = Retrieval.Result(query="q", index="i", passages=[
        Passage(source=f"s{i}", text=long, score=1 - i / 100) for i in range(50)])
    seen = result.for_model()
    texts = [p["text"] for p in seen["passages"]]
    assert sum(map(len, texts)) <= MODEL_TOTAL_CHARS and len(texts) + seen["omitted"] == 50
    assert all(len(t) <= MODEL_TEXT_CHARS and t.endswith("anticoagulation...") for t in texts)
    one = Retrieval.Result(query="q", index="i", passages=[Passage(source="s", text="short", score=0.5)]).for_model()
    assert one == {"passages": [{"source": "s", "text": "short", "score": 0.5}]}  # nothing omitted, no key


def test_a_loaded_tool_opens_no_file_per_call(corpus_index):
    """The embedding model and the index are read once, by load(); calls (concurrent ones too)
    open no file at all, inside the index or outside it."""
    import sys

    opened, watching = [], threading.Event()
    sys.addaudithook(lambda event, args: watching.is_set() and event in ("open", "os.listdir", "os.scandir")
                     and opened.append((event, args[0])))
    tool = Retrieval(index=str(corpus_index.path))
    d = Dispatcher([tool], timeout_s=120)
    assert d.dispatch(ToolCall(API_name="rag", API_params={"query": "asthma"}), None).ok  # loads
    index, model = tool._index, tool._index.embedder.model
    watching.set()
    try:
        queries = ["asthma inhaler", "irregular pulse", "metformin", "", "I21.4", "x" * 5000, "胸痛", "scaphoid"]
        outcomes, _ = d.dispatch_all([ToolCall(API_name="rag", API_params={"query": q}) for q in queries], None)
    finally:
        watching.clear()
        d.close()
    assert opened == []
    assert [o.ok for o in outcomes] == [True, True, True, False, True, True, True, True]
    assert tool._index is index and tool._index.embedder.model is model


def test_html_and_json_are_read_and_other_types_are_named(tmp_path, caplog):
    """A hospital folder of guidelines holds web pages and JSON exports: they are indexed, and any file
    of a type the index cannot read is named in a warning instead of disappearing silently."""
    docs = _docs(tmp_path / "docs", **{
        "hf.html": "<html><head><title>Heart failure</title><style>p{color:red}</style><script>var secret=1;</script>"
                   "</head><body><h1>HFrEF</h1><p>Start an ARNI &amp; a beta blocker.</p></body></html>",
        "hypo.json": json.dumps({"title": "Hypoglycaemia", "text": "Give glucagon 1 mg if unconscious.", "code": "E16.2"}),
        "list.json": json.dumps([{"text": "Gout: colchicine."}, {"text": "Psoriasis: topical steroids.", "title": 7}]),
        "scan.docx": "binary", "notes/old.rtf": "rtf"})
    with caplog.at_level(logging.WARNING, logger=ri.__name__):
        corpus = ri.load_corpus(docs)
    got = {p["source"]: (p["title"], p["text"]) for p in corpus.passages}
    assert got == {"hf.html": ("Heart failure", "HFrEF Start an ARNI & a beta blocker."),
                   "hypo.json": ("Hypoglycaemia", "Give glucagon 1 mg if unconscious."),
                   "list.json:1": (None, "Gout: colchicine."), "list.json:2": ("7", "Psoriasis: topical steroids.")}
    assert {p["source"]: p.get("code") for p in corpus.passages}["hypo.json"] == "E16.2"
    assert set(corpus.files) == {"hf.html", "hypo.json", "list.json"}
    assert "2 file(s) of an unsupported type left out" in caplog.text and "notes/old.rtf, scan.docx" in caplog.text
    # a JSON file that holds no records (labels, a config) or is broken is left out and named, not fatal
    _docs(docs, **{"labels.json": '{"classes": ["a", "b"]}', "bad.json": '{"text": "ok",}',
                   "nohead.html": "<html><head><title>Asthma</title><meta charset=utf-8><body><p>Asthma is "
                                  "reversible airway narrowing.</p>"})  # HTML5 may leave out </head>
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=ri.__name__):
        corpus = ri.load_corpus(docs)
    got = {p["source"]: (p["title"], p["text"]) for p in corpus.passages}
    assert got["nohead.html"] == ("Asthma", "Asthma is reversible airway narrowing.")
    assert not any(src.startswith(("labels.json", "bad.json")) for src in got)
    assert "2 .json file(s) left out: not corpus records" in caplog.text
    assert "bad.json: not valid JSON" in caplog.text and "labels.json: each record must be" in caplog.text
    (docs / "bad.json").write_text('[{"text": "ok"}, {"title": "no text"}]', "utf-8")  # records with a typo
    with pytest.raises(ValueError, match=r"bad.json: item 2: .*'text'"):
        ri.load_corpus(docs)


def test_add_groups_new_units_in_one_pass(tmp_path, embedder, monkeypatch):
    """--add of N new passages reads the new units once, not once per passage (quadratic: 100k short
    passages took hours)."""
    monkeypatch.setenv(ri.CACHE_ENV, str(tmp_path / "cache"))
    docs = _docs(tmp_path / "docs", **{"a.txt": "Asthma narrows the airways."})
    out = tmp_path / "i.idx"
    ri.HybridIndex.build(ri.load_corpus(docs), out, embedder)
    lines = [json.dumps({"text": f"Guideline {i}: drug {i} for condition {i}."}) for i in range(30)]
    _docs(docs, **{"many.jsonl": "\n".join(lines)})
    passes = []

    class CountedUnits(list):
        def __iter__(self):
            passes.append(1)
            return super().__iter__()

    load = ri.load_corpus

    def counted(*args, **kwargs):
        corpus = load(*args, **kwargs)
        corpus.units = CountedUnits(corpus.units)
        return corpus

    monkeypatch.setattr(ri, "load_corpus", counted)
    idx, n, _ = ri.add_to_index(out, docs, embedder=embedder)
    assert n == 1 and idx.meta["passages"] == 31 and len(passes) <= 2
    assert idx.search("drug 17 for condition 17", k=1, mode="bm25")[0].passage["source"] == "many.jsonl:18"


def test_a_corpus_changed_after_the_build_is_flagged(tmp_path, embedder, monkeypatch, caplog, capsys):
    """Files edited, added or deleted after the build: the tool and `query` warn with counts and the
    --add command, never a file's name or text."""
    monkeypatch.setenv(ri.CACHE_ENV, str(tmp_path / "cache"))
    docs = _docs(tmp_path / "docs", **{"a.txt": "Asthma narrows the airways.", "b.txt": "Gout: uric acid.",
                                       "c.txt": "Migraine with aura."})
    out = tmp_path / "i.idx"
    idx = ri.HybridIndex.build(ri.load_corpus(docs), out, embedder)
    assert idx.stale() == {"new": 0, "deleted": 0, "changed": 0}
    with caplog.at_level(logging.WARNING, logger=ri.__name__):
        Retrieval(index=str(out)).load()
    assert "changed since" not in caplog.text
    (docs / "a.txt").write_text("Asthma: patient Jane Roe, inhaler.", "utf-8")
    (docs / "b.txt").unlink()
    _docs(docs, **{"d.txt": "Psoriasis plaques."})
    assert idx.stale() == {"new": 1, "deleted": 1, "changed": 1}
    with caplog.at_level(logging.WARNING, logger=ri.__name__):
        Retrieval(index=str(out)).load()
        assert main(["query", "--index", str(out), "asthma"]) == 0
    warnings = [r.getMessage() for r in caplog.records if "changed since" in r.getMessage()]
    assert len(warnings) == 2
    assert "(1 changed, 1 new, 1 deleted file(s))" in warnings[0] and f"--corpus {docs} --out {out} --add" in warnings[0]
    assert not any(word in warnings[0] for word in ("Jane", "a.txt", "d.txt", "Psoriasis"))
    ri.add_to_index(out, docs, embedder=embedder)
    assert ri.HybridIndex.load(out, embedder).stale() == {"new": 0, "deleted": 0, "changed": 0}
    # an index built before .html / .json were read: such files beside its corpus are not new to it
    _docs(docs, **{"page.html": "<p>Gout flares.</p>", "labels.json": '{"classes": []}'})
    assert ri.HybridIndex.load(out, embedder).stale() == {"new": 2, "deleted": 0, "changed": 0}
    meta = json.loads((out / "meta.json").read_text())
    del meta["suffixes"]
    (out / "meta.json").write_text(json.dumps(meta))
    assert ri.HybridIndex.load(out, embedder).stale() == {"new": 0, "deleted": 0, "changed": 0}
    capsys.readouterr()


def test_the_stale_check_hashes_only_files_whose_size_or_time_changed(tmp_path, embedder, monkeypatch):
    """Every tool load checks the corpus: a large corpus must not be read in full each time."""
    import os

    monkeypatch.setenv(ri.CACHE_ENV, str(tmp_path / "cache"))
    docs = _docs(tmp_path / "docs", **{"a.txt": "Asthma narrows the airways.", "b.txt": "Gout: uric acid.",
                                       "new.txt": "Written just now."})
    hour_ago = (os.stat(docs / "a.txt").st_mtime_ns - 3600 * 10**9,) * 2
    for name in ("a.txt", "b.txt"):
        os.utime(docs / name, ns=hour_ago)
    out = tmp_path / "i.idx"
    idx = ri.HybridIndex.build(ri.load_corpus(docs), out, embedder)
    hashed, real = [], ri._file_sha256
    monkeypatch.setattr(ri, "_file_sha256", lambda f: hashed.append(f.name) or real(f))
    # new.txt was written within the clock's grain of the build reading it: its time proves nothing
    assert idx.stale() == {"new": 0, "deleted": 0, "changed": 0} and hashed == ["new.txt"]
    os.utime(docs / "a.txt", ns=(hour_ago[0] + 10**9,) * 2)  # touched, same content
    hashed.clear()
    assert idx.stale() == {"new": 0, "deleted": 0, "changed": 0} and sorted(hashed) == ["a.txt", "new.txt"]
    ri.add_to_index(out, docs, embedder=embedder)  # nothing to add: the touched file's new time is kept
    hashed.clear()
    assert ri.HybridIndex.load(out, embedder).stale() == {"new": 0, "deleted": 0, "changed": 0}
    assert "a.txt" not in hashed
    (docs / "b.txt").write_text("Gout: urate crystals.", "utf-8")
    assert idx.stale()["changed"] == 1


# ------------------------------------------------------------- ICD-10-CM and guidelines in one index
GUIDELINES = {
    "hypertension.md": (
        "# Hypertension in adults\n\n## Diagnosis\nIf the clinic blood pressure is between 140/90 mmHg and 180/120 "
        "mmHg, offer ambulatory blood pressure monitoring to confirm the diagnosis. Assess cardiovascular risk and "
        "target organ damage: urine albumin:creatinine ratio, HbA1c, electrolytes, eGFR, lipids and a 12-lead ECG.\n\n"
        "## Treatment\nOffer lifestyle advice: a healthy diet, regular exercise, less salt, alcohol and caffeine, and "
        "stopping smoking. Offer an ACE inhibitor or an angiotensin II receptor blocker to adults under 55 and to "
        "adults with type 2 diabetes; offer a calcium-channel blocker to adults aged 55 and over and to adults of "
        "Black African or African-Caribbean family origin. If blood pressure is not controlled, add a thiazide-like "
        "diuretic such as indapamide. Aim for a clinic blood pressure below 140/90 mmHg.\n"),
    "gestational-diabetes.html": (
        "<html><head><title>Diabetes in pregnancy</title></head><body><h1>Gestational diabetes</h1>"
        "<p>Offer an oral glucose tolerance test at 24 to 28 weeks to women with risk factors.</p>"
        "<h2>Management</h2><p>Offer advice on diet and exercise first. If blood glucose targets are not met within "
        "1 to 2 weeks, offer metformin; offer insulin if metformin is not tolerated or targets are still not met, "
        "or at diagnosis when the fasting plasma glucose is 7.0 mmol/L or above. Test capillary glucose before "
        "breakfast and one hour after every meal. Offer a fasting glucose test 6 to 13 weeks after the birth.</p>"
        "</body></html>"),
    "stemi.txt": (
        "Acute ST-elevation myocardial infarction. Give aspirin 300 mg at once, pain relief with intravenous opioids, "
        "and oxygen only when oxygen saturation is below 94 percent. Offer primary percutaneous coronary "
        "intervention if it can be delivered within 120 minutes of when fibrinolysis could have been given; "
        "otherwise give fibrinolysis. Secondary prevention after the infarction: dual antiplatelet therapy for 12 "
        "months, an ACE inhibitor, a beta blocker and a high-intensity statin, with cardiac rehabilitation and "
        "advice to stop smoking."),
    "type2-diabetes.md": (
        "# Type 2 diabetes in adults\n\n## Blood glucose lowering therapy\nOffer standard-release metformin as the "
        "first-line drug. Add an SGLT2 inhibitor if the person has heart failure or atherosclerotic cardiovascular "
        "disease, or a high cardiovascular risk. Agree an HbA1c target of 48 mmol/mol for adults managed by "
        "lifestyle and diet, or by lifestyle and a single drug not associated with hypoglycaemia.\n"),
    "conjunctivitis.json": json.dumps({
        "title": "Infective conjunctivitis", "code": "H10", "text": (
            "Infective conjunctivitis, often called pink eye, is usually self-limiting and gets better within 7 to "
            "14 days without treatment. It is contagious: advise washing hands often and not sharing towels or "
            "pillows. Children do not need to be kept away from school or nursery. Consider topical chloramphenicol "
            "if symptoms are severe or last longer than a week.")}),
}
WRIST_PDF = ["Distal radius fracture in adults.", "Immobilise a stable undisplaced fracture in a below-elbow cast "
             "for 4 to 6 weeks.", "Offer closed reduction or surgical fixation with a volar locking plate for an "
             "unstable or displaced broken wrist.", "Start hand and finger exercises early."]
# questions on treatment -> the guideline that answers them
TREATMENT_QUESTIONS = {
    "How is high blood pressure treated?": "hypertension.md",
    "What is the treatment for gestational diabetes?": "gestational-diabetes.html",
    "How do you manage a patient after a myocardial infarction?": "stemi.txt",
    "What is the first-line drug for type 2 diabetes?": "type2-diabetes.md",
    "How is a broken wrist treated?": "wrist-fracture.pdf",
    "Is pink eye contagious?": "conjunctivitis.json",
}


@pytest.fixture(scope="session")
def guidelines_dir(tmp_path_factory):
    d = _docs(tmp_path_factory.mktemp("guidelines"), **GUIDELINES)
    make_pdf(d / "wrist-fracture.pdf", WRIST_PDF)
    return d


@pytest.fixture(scope="session")
def combined_index(tmp_path_factory, icd_index, guidelines_dir, embedder):
    """The ICD-10-CM test chapters and the guidelines in one index, built as a user does: the preset
    copied to --out, then the guidelines added with --add."""
    out = tmp_path_factory.mktemp("kb") / "kb.idx"
    ri.build_preset(ri.ICD10CM_PRESET, out, embedder, chapters=ICD_TEST_CHAPTERS)  # (from the cache)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ri.CACHE_ENV, str(tmp_path_factory.mktemp("cache")))
        return ri.add_to_index(out, guidelines_dir, embedder=embedder)[0]


def test_an_index_knows_its_collections(combined_index, icd_index, corpus_index):
    assert combined_index.collections == [ri.DOCUMENTS, ri.ICD10CM_PRESET]
    assert icd_index.collections == [ri.ICD10CM_PRESET] and corpus_index.collections == [ri.DOCUMENTS]
    tool = Retrieval(index=str(combined_index.path))  # what the UI's banner says is loaded
    tool.load()
    assert tool.weights_note.startswith("kb.idx (documents + icd10cm): ")


@pytest.mark.parametrize("question", TREATMENT_QUESTIONS)
def test_treatment_guidance_is_not_buried_under_codes(combined_index, question):
    """Short ICD-10-CM descriptions match a question more closely, word for word and by cosine, than a
    long guideline chunk does; searched in one ranking, codes filled the top 5 and the guidance that
    answers the question came after them."""
    hits = combined_index.search(question, 3)
    assert TREATMENT_QUESTIONS[question] in [h.passage["source"] for h in hits], [
        (h.passage["source"], h.passage.get("code"), h.ranks) for h in hits]


def test_guidelines_leave_codes_alone_where_they_have_nothing_to_say(combined_index, icd_index):
    """Code lookups, clinical phrases and questions no guideline covers get the ICD-10-CM answers they
    get from the ICD-10-CM index alone, with no guideline passage among them."""
    for query in ("E11.9", "S52.501A", "HELLP syndrome", "sprained ankle", "crossed eyes", "blood clot in the lung",
                  "morning sickness"):
        hits = combined_index.search(query, 5)
        assert [(h.passage.get("code") or h.passage["source"], h.score) for h in hits] == [
            (h.passage["code"], h.score) for h in icd_index.search(query, 5)], query
    # where a guideline has something to say, it joins the codes
    hits = combined_index.search("sugar diabetes in pregnancy", 3)
    assert hits[0].passage["code"] == "O24.4" and hits[1].passage["source"] == "gestational-diabetes.html"


def test_the_model_sees_where_each_passage_comes_from(combined_index):
    """The agent's retrieval call on the combined index: the model sees the guidance with what it needs
    to cite it (file, section heading or page) next to the codes."""
    tool = Retrieval(index=str(combined_index.path))
    tool._index = combined_index  # loaded with the session's model (tool.load() would load it again)
    d = Dispatcher([tool], timeout_s=120)
    seen = {}
    for question in ("How is high blood pressure treated?", "How is a broken wrist treated?"):
        out = d.dispatch(ToolCall(API_name="ChatCAD-R", API_params={"question": question}), None)
        assert out.ok, out.error
        for p in out.output["passages"]:
            seen.setdefault(p["source"], p)  # a source's best passage
    d.close()
    assert seen["hypertension.md"]["title"] == "Treatment" and seen["hypertension.md"]["text"].startswith("Offer")
    assert seen["wrist-fracture.pdf"]["page"] == 1 and "title" not in seen["wrist-fracture.pdf"]  # its stem
    codes = [p for p in seen.values() if p["source"] == ri.ICD10CM_SOURCE]
    assert codes and all("code" in p and "title" not in p for p in codes)  # the description opens the text


def test_text_past_the_embedding_window_is_reported(tmp_path, embedder, monkeypatch, caplog):
    """MiniLM reads 256 word pieces; a 128-word chunk of dosing text is longer, and the dense search
    would silently never see its end."""
    monkeypatch.setenv(ri.CACHE_ENV, str(tmp_path / "cache"))
    dosing = ("Give co-amoxiclav 1.2 g IV 8-hourly (or 625 mg PO 8-hourly) plus clarithromycin 500 mg BD; "
              "if eGFR < 30 mL/min/1.73m2, halve the dose. ") * 8
    docs = _docs(tmp_path / "docs", **{"dosing.txt": dosing, "short.txt": "Gout: colchicine 500 micrograms."})
    with caplog.at_level(logging.WARNING, logger=ri.__name__):
        ri.HybridIndex.build(ri.load_corpus(docs), tmp_path / "i.idx", embedder)
    warning = [r.getMessage() for r in caplog.records if "token window" in r.getMessage()]
    assert len(warning) == 1 and warning[0].startswith("1 of 3 texts are longer than the embedding model's 256-token")
    fits = int(warning[0].rsplit("--chunk-words ", 1)[1].split()[0])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=ri.__name__):
        ri.HybridIndex.build(ri.load_corpus(docs, chunk_size=fits, overlap=16), tmp_path / "i.idx", embedder)
    assert "token window" not in caplog.text  # the advice given is enough
