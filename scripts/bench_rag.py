"""Benchmark the retrieval tool on the packaged ICD-10-CM index.

Measures: cold build time (with ``--cold``: a fresh cache folder, so nothing is reused), warm
load time (index files, then the embedding model), query latency p50/p99 (embedding included) for
hybrid / dense / BM25 search, faiss ``IndexFlatIP`` against brute-force numpy over the same
vectors (time and agreement), the top-5 ICD family hit rate of plain-language questions, and how
often a code lookup (as people write codes) returns that code first.

    python scripts/bench_rag.py            # uses (or builds once) the cached index
    python scripts/bench_rag.py --cold     # also times a cold build in a temporary cache
    python scripts/bench_rag.py --embed-batches 256 64 32   # only: embedding time and peak memory per batch size
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

import mmedagent  # noqa: F401  - torchvision shim before sentence-transformers
from mmedagent.argtypes import at_least
from mmedagent.tools import _rag_index as ri

# Plain-language questions -> acceptable ICD-10-CM 3-character categories. Written from everyday
# wording (not copied from the code descriptions); a hit is a returned code (category or deeper,
# never a chapter or block) whose first 3 characters are in the set.
QUERIES: dict[str, set[str]] = {
    "heart attack": {"I21", "I22"},
    "sugar diabetes in pregnancy": {"O24"},
    "broken wrist": {"S62", "S52"},
    "high blood pressure": {"I10", "I11", "I12", "I13", "I15", "I16", "I1A"},
    "pink eye": {"H10"},
    "stroke": {"I60", "I61", "I62", "I63"},
    "flu": {"J09", "J10", "J11"},
    "common cold": {"J00"},
    "chickenpox": {"B01"},
    "shingles": {"B02"},
    "kidney stones": {"N20"},
    "gallstones": {"K80"},
    "burst appendix": {"K35"},
    "acid reflux": {"K21"},
    "bed sore": {"L89"},
    "lazy eye": {"H53", "H50"},
    "hay fever": {"J30"},
    "whooping cough": {"A37"},
    "german measles": {"B06"},
    "mumps": {"B26"},
    "piles": {"K64"},
    "bunion": {"M20", "M21"},
    "slipped disc in the lower back": {"M51"},
    "water on the brain": {"G91", "Q03"},
    "underactive thyroid": {"E03", "E02", "E01", "E89"},
    "overactive thyroid": {"E05"},
    "blood clot in the leg": {"I82", "I80"},
    "blood clot in the lung": {"I26"},
    "collapsed lung": {"J93", "J98"},
    "trouble sleeping": {"G47", "F51"},
    "hair loss": {"L63", "L64", "L65"},
    "stomach flu": {"A08", "A09", "K52"},
    "food poisoning": {"A05", "T62"},
    "nosebleed": {"R04"},
    "fainting": {"R55"},
    "bedwetting": {"N39", "R32", "F98"},
    "dog bite": {"W54"},
    "sunburn": {"L55"},
    "frostbite": {"T33", "T34"},
    "tennis elbow": {"M77"},
    "heat stroke": {"T67"},
    "motion sickness": {"T75"},
    "black lung disease": {"J60"},
    "lockjaw": {"A35"},
    "cold sore": {"B00"},
    "athlete's foot": {"B35"},
    "pinworms": {"B80"},
    "crossed eyes": {"H50"},
    "nearsightedness": {"H52"},
    "earache": {"H92"},
    "ringing in the ears": {"H93"},
    "swimmer's ear": {"H60"},
    "strep throat": {"J02"},
    "chest pain": {"R07"},
    "shortness of breath": {"R06"},
    "double vision": {"H53"},
    "toothache": {"K08"},
    "cavities in teeth": {"K02"},
    "miscarriage": {"O03"},
    "morning sickness": {"O21"},
    "baby born too early": {"P07"},
    "yellow skin in a newborn baby": {"P59"},
    "Down syndrome": {"Q90"},
    "cleft lip": {"Q36", "Q37"},
    "clubfoot": {"Q66"},
    "lung cancer": {"C34"},
    "lump in the breast": {"N63"},
    "sickle cell": {"D57"},
    "low iron in the blood": {"D50", "E61"},
    "alcohol addiction": {"F10"},
    "depression": {"F32", "F33"},
    "panic attacks": {"F41"},
    "manic depression": {"F31"},
    "starving yourself to lose weight": {"F50"},
    "hyperactive child who can't concentrate": {"F90"},
    "shaking palsy": {"G20"},
    "seizures": {"G40", "R56"},
    "migraine headache": {"G43"},
    "pins and needles": {"R20"},
    "gout": {"M10", "M1A"},
    "wear and tear arthritis of the knee": {"M17"},
    "brittle bones": {"M80", "M81"},
    "curvature of the spine": {"M41"},
    "sprained ankle": {"S93"},
    "concussion": {"S06"},
    "broken hip": {"S72"},
    "broken collarbone": {"S42"},
    "whiplash": {"S13"},
    "bladder infection": {"N30", "N39"},
    "enlarged prostate": {"N40"},
    "yeast infection": {"B37"},
    "the clap": {"A54"},
    "hives": {"L50"},
    "eczema": {"L20", "L30"},
    "acne": {"L70"},
    "warts": {"B07"},
    "ingrown toenail": {"L60"},
    "swollen ankles": {"R60"},
    "high cholesterol": {"E78"},
    "overweight": {"E66"},
    "bleeding stomach ulcer": {"K25", "K26", "K27"},
    "hernia in the groin": {"K40"},
    "hiccups": {"R06"},
    "diaper rash": {"L22"},
}

# Clinical wording (as in a report or a referral), where exact rare terms matter.
CLINICAL_QUERIES: dict[str, set[str]] = {
    "STEMI of the anterior wall": {"I21"}, "type 2 diabetes with diabetic nephropathy": {"E11"},
    "gestational diabetes controlled by diet": {"O24"}, "Colles fracture": {"S52"}, "scaphoid fracture": {"S62"},
    "acute mucopurulent conjunctivitis": {"H10"}, "hallux valgus": {"M20"}, "Kashin-Beck disease": {"M12"},
    "trichotillomania": {"F63"}, "tsutsugamushi fever": {"A75"}, "salaam attacks": {"G40"},
    "Chagas disease with heart involvement": {"B57"}, "poisoning by warfarin": {"T45"},
    "pulmonary embolism with acute cor pulmonale": {"I26"}, "pneumonia due to Streptococcus pneumoniae": {"J13"},
    "cholelithiasis with acute cholecystitis": {"K80"},
    "benign prostatic hyperplasia with lower urinary tract symptoms": {"N40"},
    "ankylosing spondylitis of lumbar region": {"M45"}, "lumbar disc herniation with radiculopathy": {"M51"},
    "COVID-19": {"U07"}, "sepsis due to Escherichia coli": {"A41"}, "HELLP syndrome": {"O14"},
    "placenta previa": {"O44"}, "subarachnoid hemorrhage from ruptured berry aneurysm": {"I60"},
    "Hashimoto thyroiditis": {"E06"}, "Graves disease": {"E05"}, "multiple sclerosis": {"G35"},
    "bipolar disorder, current episode depressed": {"F31"},
    "iron deficiency anemia secondary to chronic blood loss": {"D50"},
    "nondisplaced fracture of neck of right femur": {"S72"}, "concussion with loss of consciousness": {"S06"},
    "atrial fibrillation": {"I48"}, "Parkinson disease": {"G20"},
}
# Code lookups: only lexical matching can answer these.
CODE_QUERIES: dict[str, set[str]] = {c: {c[:3]} for c in (
    "I21.4", "E11.9", "O24.410", "S52.501", "H10.33", "I10", "J45.909", "M20.11", "F32.A", "Z79.4")}
# Codes as people write them -> the code that must come first: without the dot (billing exports),
# with a 7th character (folded into its code), exact codes of CODE_QUERIES, several codes, code + words.
CODE_FIRST: dict[str, str] = {
    **{c: c for c in CODE_QUERIES}, "E119": "E11.9", "J45909": "J45.909", "S72.001A": "S72.001",
    "S52501A": "S52.501", "Z00.00": "Z00.00", "I21.4 E11.9": "I21.4", "E11.9 type 2 diabetes": "E11.9",
    "J18.9 pneumonia": "J18.9",
}
# Whole questions, as MMedAgent's ChatCAD-R passes them.
QUESTIONS: dict[str, set[str]] = {
    "I was told I had a heart attack last year, what does that mean?": {"I21", "I22", "I25"},
    "My doctor says I have sugar diabetes and I am pregnant, what should I know?": {"O24"},
    "I fell on my hand and broke my wrist, which code is that?": {"S62", "S52"},
    "Can you explain what high blood pressure is and what I should do?": {"I10"},
    "My child has pink eye, is it contagious?": {"H10"},
    "I've just been diagnosed with measles. Could you tell me more about it?": {"B05"},
    "What is cervical cancer and what are the next steps?": {"C53"},
    "Can you explain what neonatal sepsis is?": {"P36"},
}
QUERY_SETS = {"lay": QUERIES, "clinical": CLINICAL_QUERIES, "codes": CODE_QUERIES, "questions": QUESTIONS}


def family_hit(hits: list[dict], families: set[str]) -> bool:
    """True when a returned code (not a chapter or block) falls in one of ``families``."""
    return any(h.get("code") and "-" not in h["code"] and h["code"][:3] in families for h in hits)


def hit_rate(index: ri.HybridIndex, queries: dict[str, set[str]], mode: str, k: int = 5) -> tuple[float, list[str]]:
    misses = [q for q, fam in queries.items() if not family_hit([h.to_dict() for h in index.search(q, k, mode)], fam)]
    return 1 - len(misses) / len(queries), misses


def percentile(xs: list[float], p: float) -> float:
    return float(np.percentile(np.array(xs), p))


def embed_once(batch_size: int) -> dict:
    """Seconds to embed 512 chunks of 128 words (a corpus build's unit) and this process's peak memory."""
    import resource

    words = ("pulmonary nodule follow up with computed tomography growth spiculation malignancy risk " * 20).split()
    texts = [" ".join(words[i % 7:i % 7 + 128]) for i in range(512)]
    embedder = ri.Embedder(batch_size=batch_size)
    embedder.encode(texts[:8])  # the model loaded before timing
    t = time.perf_counter()
    embedder.encode(texts)
    return {"batch_size": batch_size, "embed_512_chunks_s": round(time.perf_counter() - t, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cold", action="store_true", help="time a cold build in a fresh temporary cache")
    ap.add_argument("--repeats", type=at_least(1), default=3, help="timed passes over the query set")
    ap.add_argument("--embed-batches", type=at_least(1), nargs="+", default=None,
                    help="only time embedding 512 chunks of 128 words at these batch sizes (one process each: peak memory)")
    ap.add_argument("--embed-one", type=at_least(1), default=None, help=argparse.SUPPRESS)  # the child of --embed-batches
    args = ap.parse_args()
    if args.embed_one is not None:
        print(json.dumps(embed_once(args.embed_one)))
        return 0
    if args.embed_batches:
        import subprocess

        for b in args.embed_batches:
            run = subprocess.run([sys.executable, __file__, "--embed-one", str(b)], capture_output=True, text=True)
            if run.returncode != 0:
                last = (run.stderr.strip().splitlines() or [f"exit status {run.returncode}"])[-1]
                print(f"error: embedding at batch size {b} failed: {last}", file=sys.stderr)
                return 1
            print(run.stdout.strip().splitlines()[-1])
        return 0
    out: dict = {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)}
    import torch

    out["torch_threads"] = torch.get_num_threads()

    if args.cold:
        with tempfile.TemporaryDirectory() as tmp:
            saved = os.environ.get(ri.CACHE_ENV)
            os.environ[ri.CACHE_ENV] = tmp
            t = time.perf_counter()
            idx = ri.build_preset(ri.ICD10CM_PRESET, progress=True)
            out["cold_build_s"] = round(time.perf_counter() - t, 1)
            out["cold_build_meta"] = {k: idx.meta[k] for k in ("passages", "units", "dense_units")}
            if saved is None:
                del os.environ[ri.CACHE_ENV]
            else:
                os.environ[ri.CACHE_ENV] = saved

    embedder = ri.Embedder()
    path = ri.preset_path(ri.ICD10CM_PRESET, embedder)
    if not (path / "meta.json").exists():
        t = time.perf_counter()
        ri.build_preset(ri.ICD10CM_PRESET, embedder=embedder, progress=True)
        out["first_build_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    index = ri.HybridIndex.load(path, embedder)
    out["warm_load_index_s"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    embedder.encode(["warm up"])
    out["warm_load_model_s"] = round(time.perf_counter() - t, 3)
    out["index"] = {k: index.meta[k] for k in ("passages", "units", "dense_units", "build_s")}

    queries = list(QUERIES)
    for mode in ("hybrid", "dense", "bm25"):
        times = []
        for _ in range(args.repeats):
            for q in queries:
                t = time.perf_counter()
                index.search(q, 5, mode)
                times.append((time.perf_counter() - t) * 1000)
        out[mode] = {"p50_ms": round(percentile(times, 50), 2), "p99_ms": round(percentile(times, 99), 2)}
        for name, qs in QUERY_SETS.items():
            rate, misses = hit_rate(index, qs, mode)
            out[mode][f"top5_{name}"] = f"{round(rate * len(qs))}/{len(qs)} = {rate:.3f}"
            out[mode][f"misses_{name}"] = misses
        wrong = [q for q, code in CODE_FIRST.items()
                 if [h.passage.get("code") for h in index.search(q, 1, mode)] != [code]]
        out[mode]["top1_code"] = f"{len(CODE_FIRST) - len(wrong)}/{len(CODE_FIRST)}"
        out[mode]["misses_top1_code"] = wrong
    out["queries"] = {name: len(qs) for name, qs in QUERY_SETS.items()}

    # faiss IndexFlatIP vs brute force over the same normalised vectors
    vecs = index.dense_vectors()
    qv = embedder.encode(queries)
    f_t, b_t, agree = [], [], 0
    for i in range(len(queries)):
        q = qv[i : i + 1]
        t = time.perf_counter()
        _, fi = index.faiss.search(q, 50)
        f_t.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        scores = vecs @ q[0]
        top = np.argpartition(-scores, 50)[:50]
        top = top[np.argsort(-scores[top])]
        b_t.append((time.perf_counter() - t) * 1000)
        agree += len(set(fi[0].tolist()) & set(top.tolist())) / 50
    out["faiss_vs_bruteforce"] = {
        "vectors": int(vecs.shape[0]), "faiss_p50_ms": round(percentile(f_t, 50), 3),
        "bruteforce_p50_ms": round(percentile(b_t, 50), 3), "top50_overlap": round(agree / len(queries), 4),
    }
    embed_t = []
    for q in queries:
        t = time.perf_counter()
        embedder.encode([q])
        embed_t.append((time.perf_counter() - t) * 1000)
    out["embed_query_p50_ms"] = round(statistics.median(embed_t), 2)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
