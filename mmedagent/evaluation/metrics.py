"""Answer-level metrics: boxes (IoU, mAP@0.5), masks (Dice), classification (accuracy, AUROC),
report text (BLEU-4, ROUGE-L, METEOR), retrieval (recall@k), VQA (closed accuracy, open token F1 and recall).

Pure functions on plain Python / numpy values; nothing here downloads data. Tokenisation is a
regular expression (case-folded words and numbers in any script), used by every text metric.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

Box = Sequence[float]

_TOKEN = re.compile(r"[^\W_]+(?:[.'][^\W_]+)*")


def tokenize(text: str) -> list[str]:
    """Case-folded word / number tokens in any script (``Ménière`` is one word, ``胸部`` is not
    empty); no downloaded tokenizer data. A typographic apostrophe counts as ``'``."""
    return _TOKEN.findall(text.casefold().replace("\u2019", "'"))


# --------------------------------------------------------------------------- boxes


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two xyxy boxes (any consistent units)."""
    ax1, ay1, ax2, ay2 = (float(v) for v in a)
    bx1, by1, bx2, by2 = (float(v) for v in b)
    if ax2 < ax1 or ay2 < ay1 or bx2 < bx1 or by2 < by1:
        raise ValueError(f"boxes must be x1<=x2, y1<=y2: {list(a)} {list(b)}")
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def grounding_iou(pred: Sequence[Box], gold: Sequence[Box]) -> float:
    """Mean over gold boxes of the best IoU with any predicted box (0 for a missed box)."""
    if not gold:
        raise ValueError("grounding_iou needs at least one gold box")
    return float(np.mean([max((box_iou(p, g) for p in pred), default=0.0) for g in gold]))


def average_precision(
    detections: Iterable[tuple[Hashable, float, Box]],
    gold: Mapping[Hashable, Sequence[Box]],
    iou_threshold: float = 0.5,
) -> float:
    """AP of one class with all-point interpolation (VOC 2010+ / COCO-style envelope).

    ``detections`` are ``(image_id, score, box)``; ``gold`` maps image id to its gold boxes.
    Detections are taken by descending score and matched to unmatched gold boxes with IoU ≥
    ``iou_threshold`` in the same image; a second hit on a matched box is a false positive.
    Detections of equal score make one point of the precision–recall curve (a score threshold takes
    all of them or none, as scikit-learn's curve has it) and are matched together, as many as can be
    (a maximum matching, each trying its gold boxes by descending IoU, in the order of their boxes):
    boxes quoted in answers, which all score 1, give the same AP whatever the order of the data.
    AP = Σ (r_i − r_{i−1}) · max_{r ≥ r_i} precision.
    """
    n_gold = sum(len(v) for v in gold.values())
    if n_gold == 0:
        raise ValueError("average_precision needs at least one gold box")
    # by descending score, then by image and box: the data's order never decides
    dets = sorted(detections, key=lambda d: (-float(d[1]), repr(d[0]), tuple(float(x) for x in d[2])))
    used = {k: [False] * len(v) for k, v in gold.items()}
    tp = np.zeros(len(dets))
    start = 0
    while start < len(dets):
        end = start
        while end < len(dets) and float(dets[end][1]) == float(dets[start][1]):
            end += 1
        by_image: dict[Hashable, list[int]] = {}
        for i in range(start, end):
            by_image.setdefault(dets[i][0], []).append(i)
        for img, group in by_image.items():
            for i, j in _max_matching(group, dets, gold.get(img, ()), used.get(img, []), iou_threshold).items():
                used[img][j] = True
                tp[i] = 1
        start = end
    scores = np.array([float(d[1]) for d in dets])
    ends = np.flatnonzero(np.append(scores[1:] != scores[:-1], True)) if dets else np.zeros(0, dtype=int)
    ctp = np.cumsum(tp)[ends]  # true positives at the last detection of each score
    recall = np.concatenate([[0.0], ctp / n_gold])
    precision = np.concatenate([[1.0], ctp / (ends + 1)])
    for i in range(len(precision) - 2, -1, -1):  # precision envelope
        precision[i] = max(precision[i], precision[i + 1])
    return float(np.sum((recall[1:] - recall[:-1]) * precision[1:]))


def _max_matching(group: list[int], dets: Sequence[tuple[Hashable, float, Box]], gold: Sequence[Box],
                  used: list[bool], iou_threshold: float) -> dict[int, int]:
    """Detection index -> gold index for as many of ``group`` (detections of one score on one image) as
    can hit a free gold box: augmenting paths, searched without recursion; each detection tries its boxes by
    descending IoU, then by their coordinates (never by their place in the data)."""
    options = {}
    for i in group:
        hits = [(box_iou(dets[i][2], g), j) for j, g in enumerate(gold) if not used[j]]
        options[i] = [j for iou, j in sorted(hits, key=lambda h: (-h[0], tuple(float(x) for x in gold[h[1]])))
                      if iou >= iou_threshold]
    owner: dict[int, int] = {}  # gold index -> detection index
    for root in group:
        seen: set[int] = set()
        path = [[root, iter(options[root]), None]]  # detection, its boxes left to try, the box it reached
        while path:
            level = path[-1]
            j = next((j for j in level[1] if j not in seen), None)
            if j is None:  # a dead end: back to the detection before it
                path.pop()
                continue
            seen.add(j)
            level[2] = j
            if j not in owner:  # a free box: each detection on the path takes the box it reached
                for det, _, box in path:
                    owner[box] = det
                break
            path.append([owner[j], iter(options[owner[j]]), None])
    return {i: j for j, i in owner.items()}


def mean_average_precision(
    detections: Iterable[tuple[Hashable, Hashable, float, Box]],
    gold: Iterable[tuple[Hashable, Hashable, Box]],
    iou_threshold: float = 0.5,
) -> float:
    """mAP over classes: detections ``(image_id, cls, score, box)``, gold ``(image_id, cls, box)``.

    Classes without gold boxes are skipped (their detections cannot be scored).
    """
    gold_by: dict[Hashable, dict[Hashable, list[Box]]] = defaultdict(lambda: defaultdict(list))
    for img, cls, box in gold:
        gold_by[cls][img].append(box)
    if not gold_by:
        raise ValueError("mean_average_precision needs at least one gold box")
    det_by: dict[Hashable, list[tuple[Hashable, float, Box]]] = defaultdict(list)
    for img, cls, score, box in detections:
        det_by[cls].append((img, score, box))
    return float(np.mean([average_precision(det_by[c], g, iou_threshold) for c, g in gold_by.items()]))


# --------------------------------------------------------------------------- masks


def as_mask(mask: Any) -> np.ndarray:
    """A bool array from an array-like or a COCO RLE mapping (decoded by the tools' RLE codec)."""
    if isinstance(mask, Mapping):
        from mmedagent.tools._boxes import decode_rle

        return decode_rle(dict(mask))
    return np.asarray(mask).astype(bool)


def dice(pred: Any, gold: Any) -> float:
    """Dice = 2|A∩B| / (|A|+|B|) of two masks (arrays or COCO RLE); 1.0 when both are empty."""
    a, b = as_mask(pred), as_mask(gold)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def union_mask(masks: Sequence[Any], shape: tuple[int, int] | None = None) -> np.ndarray:
    """The union of several masks (arrays or RLE); an empty mask of ``shape`` if there are none."""
    arrays = [as_mask(m) for m in masks]
    if not arrays:
        if shape is None:
            raise ValueError("union of no masks needs a shape")
        return np.zeros(shape, dtype=bool)
    return np.logical_or.reduce(arrays)


# --------------------------------------------------------------------------- classification


def accuracy(pred: Sequence[Hashable], gold: Sequence[Hashable]) -> float:
    if len(pred) != len(gold) or not gold:
        raise ValueError("accuracy needs equally long, non-empty sequences")
    return sum(p == g for p, g in zip(pred, gold)) / len(gold)


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=float)
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def auroc(labels: Sequence[int | bool], scores: Sequence[float]) -> float:
    """Binary AUROC via the Mann–Whitney U statistic (ties count one half)."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=float)
    if y.shape != s.shape:
        raise ValueError("labels and scores differ in length")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs at least one positive and one negative")
    r = _ranks(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def macro_auroc(gold: Sequence[Hashable], scores: Sequence[Mapping[Hashable, float]]) -> float | None:
    """One-vs-rest AUROC averaged over classes that have positives and negatives.

    ``scores[i]`` maps class → score for sample ``i`` (a missing class scores 0). ``None`` when no
    class can be scored.
    """
    values = []
    for c in sorted(set(gold), key=str):
        y = [g == c for g in gold]
        if all(y) or not any(y):
            continue
        values.append(auroc(y, [float(s.get(c, 0.0)) for s in scores]))
    return float(np.mean(values)) if values else None


# --------------------------------------------------------------------------- report text


def bleu4(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU-4 (nltk, uniform weights, brevity penalty, smoothing method 1 for empty n-gram counts)."""
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu

    if len(hypotheses) != len(references) or not references:
        raise ValueError("bleu4 needs equally long, non-empty lists")
    return float(
        corpus_bleu(
            [[tokenize(r)] for r in references],
            [tokenize(h) for h in hypotheses],
            smoothing_function=SmoothingFunction().method1,
        )
    )


class _Tokenizer:
    """:func:`tokenize` in the shape ``rouge_score`` takes a tokenizer."""

    tokenize = staticmethod(tokenize)


def rouge_l(hypothesis: str, reference: str) -> float:
    """ROUGE-L F-measure (``rouge_score`` on :func:`tokenize`'s tokens, no stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Tokenizer())
    return float(scorer.score(reference, hypothesis)["rougeL"].fmeasure)


def meteor_exact(hypothesis: str, reference: str, alpha: float = 0.9, beta: float = 3.0, gamma: float = 0.5) -> float:
    """METEOR with the exact-match stage only (no stemming or WordNet synonyms).

    Unigrams are aligned right to left, each hypothesis word to the last unmatched identical
    reference word (as nltk's exact stage does); with m matches, P = m/|hyp|, R = m/|ref|,
    F = P·R / (α·P + (1−α)·R), penalty = γ·(chunks/m)^β, score = F·(1 − penalty).
    """
    hyp, ref = tokenize(hypothesis), tokenize(reference)
    positions: dict[str, list[int]] = defaultdict(list)
    for j, w in enumerate(ref):
        positions[w].append(j)
    matches = []
    for i in range(len(hyp) - 1, -1, -1):
        if positions.get(hyp[i]):
            matches.append((i, positions[hyp[i]].pop()))
    m = len(matches)
    if m == 0:
        return 0.0
    matches.sort()
    chunks = 1 + sum(
        1 for (i0, j0), (i1, j1) in zip(matches, matches[1:]) if not (i1 == i0 + 1 and j1 == j0 + 1)
    )
    p, r = m / len(hyp), m / len(ref)
    fmean = p * r / (alpha * p + (1 - alpha) * r)
    return fmean * (1 - gamma * (chunks / m) ** beta)


# --------------------------------------------------------------------------- retrieval


def recall_at_k(retrieved: Sequence[Hashable], relevant: Iterable[Hashable], k: int) -> float:
    """Share of the relevant items found among the first ``k`` retrieved."""
    rel = set(relevant)
    if not rel:
        raise ValueError("recall_at_k needs at least one relevant item")
    if k < 1:
        raise ValueError("k must be at least 1")
    return len(rel & set(retrieved[:k])) / len(rel)


# --------------------------------------------------------------------------- VQA

_YES = {"yes", "yeah", "yep", "true", "correct", "present", "positive"}
_NO = {"no", "not", "nope", "false", "incorrect", "absent", "negative", "none"}
_ARTICLES = {"a", "an", "the"}


def normalize_answer(text: str) -> str:
    """Case-folded tokens without articles or punctuation."""
    return " ".join(t for t in tokenize(text) if t not in _ARTICLES)


_HEDGES = ("not sure", "not certain", "not clear", "not possible", "not able", "unable to", "unsure", "uncertain",
           "cannot tell", "cannot say", "cannot determine", "can't tell", "can't say", "can't determine",
           "don't know", "do not know")
"""Answers that decline to answer: neither yes nor no ("Not sure" is no "no")."""


def yes_no(text: str) -> str | None:
    """'yes' / 'no' when the answer opens with a yes/no word ("No, a mass cannot be seen"), else when one of
    its first three words is one and it does not decline ("Not present" is no; "Not sure" is neither)."""
    tokens = tokenize(text)
    if tokens and tokens[0] in _YES:
        return "yes"
    if tokens and tokens[0] in _NO - {"not"}:
        return "no"
    opening = f" {' '.join(tokens[:6])} "
    if any(f" {hedge} " in opening for hedge in _HEDGES):
        return None
    for t in tokens[:3]:
        if t in _YES:
            return "yes"
        if t in _NO:
            return "no"
    return None


def closed_correct(pred: str, gold: str) -> bool:
    """Closed-question match: yes/no answers compared after normalisation, others exactly or by
    the gold answer appearing as whole words in the prediction."""
    g_yn = yes_no(gold) if normalize_answer(gold) in _YES | _NO else None
    if g_yn is not None:
        return yes_no(pred) == g_yn
    g, p = normalize_answer(gold), normalize_answer(pred)
    return bool(g) and (p == g or f" {g} " in f" {p} ")


def _overlap(pred: str, gold: str) -> tuple[int, int, int]:
    """``(common, predicted, gold)`` token counts of two normalised answers (multisets)."""
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    return sum((Counter(p) & Counter(g)).values()), len(p), len(g)


def token_f1(pred: str, gold: str) -> float:
    """SQuAD-style token F1 between normalised answers."""
    common, n_p, n_g = _overlap(pred, gold)
    if not n_p or not n_g:
        return float(n_p == n_g)
    if common == 0:
        return 0.0
    prec, rec = common / n_p, common / n_g
    return 2 * prec * rec / (prec + rec)


def token_recall(pred: str, gold: str) -> float:
    """Share of the gold answer's tokens found in the prediction (the open-question recall of
    LLaVA-Med-style VQA tables), between normalised answers."""
    common, n_p, n_g = _overlap(pred, gold)
    return common / n_g if n_g else float(n_p == n_g)


def mean(values: Iterable[float]) -> float | None:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else None
