"""Score each sample's result against its gold answer, then aggregate per task and overall.

Where the prediction comes from, per metric:

* tool selection / call precision-recall / argument validity and match: the planner's calls
  (all steps) against the gold calls;
* grounding IoU and mAP@0.5: boxes quoted in the answer text (``[x1, y1, x2, y2]``), else the
  boxes of the live tool outputs (with their logits as scores); gold boxes from the record's
  ``gold.boxes``, else the gold tool output's ``boxes``;
* Dice: the masks of the live tool results (the model never sees masks) against ``gold.masks``
  — live mode only;
* classification: the gold label (``gold.label``, else the gold tool output's top label, or the
  classification tool's text output: MMedAgent's ``BiomedClip output: lung CT``) must be the label
  the answer names first (a label inside a longer one aside); AUROC from the live tool's per-label scores;
* report text (BLEU-4, ROUGE-L, METEOR) and open-answer token F1: the answer against the gold
  final answer, else (MMedAgent's eval lines have none) the gold report — the report tool's gold
  output, text or its ``report``; closed VQA: yes/no-normalised match;
* RAG recall@k: sources of the live retrieval output against ``gold.relevant`` (or the gold
  output's sources) — live mode only.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from mmedagent.evaluation import metrics as M
from mmedagent.evaluation import tooluse as T
from mmedagent.evaluation.readers import EvalSample
from mmedagent.evaluation.runner import SampleResult
from mmedagent.protocol import ToolOutcome
from mmedagent.tools.base import Tool
from mmedagent.tools.classification import ClassificationTool
from mmedagent.tools.report import ReportGeneration

_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
_BOX_TEXT = re.compile(r"\[" + ",".join([_NUM] * 4) + r"\]")

RATE_METRICS = (
    "tool_selection_accuracy", "call_precision", "call_recall", "argument_validity", "argument_match",
    "grounding_iou", "map50", "dice", "classification_accuracy", "auroc", "bleu4", "rouge_l", "meteor",
    "rag_recall_at_k", "vqa_closed_accuracy", "vqa_open_f1", "vqa_open_recall", "answer_f1",
)
"""Metrics in [0, 1] (higher is better); the compare chart draws these."""


def _outputs(outcomes: Iterable[ToolOutcome]) -> list[dict[str, Any]]:
    """The mapping outputs of the successful calls (text outputs carry no boxes, scores or sources)."""
    return [o.output for o in outcomes if o.ok and o.output]


def _gold_outcomes(sample: EvalSample) -> list[ToolOutcome]:
    return [o for turn in sample.gold_results for o in turn if o.ok]


def _is_tool(outcome: ToolOutcome, tool: type[Tool]) -> bool:
    return T.canonical_name(outcome.tool) == tool.name


def _outcome_label(outcome: ToolOutcome) -> str | None:
    """A call's top label: from a mapping output, or the classification tool's text output as is."""
    if outcome.output:
        return _label_of(outcome.output)
    if outcome.text and _is_tool(outcome, ClassificationTool):
        return outcome.text.strip() or None
    return None


def reference_answer(sample: EvalSample) -> str | None:
    """What the answer is scored against: the gold final answer, else the report tool's gold report
    (a text output or the mapping's ``report``)."""
    if sample.gold_answer:
        return sample.gold_answer
    for o in _gold_outcomes(sample):
        if _is_tool(o, ReportGeneration):
            report = o.text if o.text is not None else (o.output or {}).get("report")
            if isinstance(report, str) and report.strip():
                return report.strip()
    return None


def _boxes_of(outputs: Sequence[dict[str, Any]]) -> tuple[list[list[float]], list[float]]:
    """The first output's boxes and their scores; empty entries (an empty mask's ``[]``) and boxes
    with x1 > x2 or y1 > y2 are skipped."""
    for out in outputs:
        boxes = out.get("boxes")
        if boxes:
            scores = out.get("logits") or out.get("scores") or [1.0] * len(boxes)
            kept = [(list(map(float, b)), float(sc)) for b, sc in zip(boxes, scores)
                    if len(b) == 4 and T.ordered_box(b)]
            if kept:
                return [b for b, _ in kept], [sc for _, sc in kept]
    return [], []


def boxes_in_text(text: str) -> list[list[float]]:
    """``[x1, y1, x2, y2]`` lists quoted in free text (valid boxes only)."""
    boxes = [[float(v) for v in m.groups()] for m in _BOX_TEXT.finditer(text)]
    return [b for b in boxes if T.ordered_box(b)]


def _label_of(out: dict[str, Any]) -> str | None:
    for key in ("label", "top_label", "prediction"):
        if isinstance(out.get(key), str):
            return out[key]
    labels = out.get("labels")
    if isinstance(labels, list) and labels:
        first = labels[0]
        return first if isinstance(first, str) else first.get("label") if isinstance(first, dict) else None
    return None


def _label_scores(out: dict[str, Any]) -> dict[str, float]:
    labels = out.get("labels")
    for key in ("probs", "probabilities", "scores"):
        v = out.get(key)
        if isinstance(v, dict):
            return {str(k): float(p) for k, p in v.items()}
        if isinstance(v, list) and isinstance(labels, list) and len(v) == len(labels):
            return {str(lab): float(p) for lab, p in zip(labels, v)}
    if isinstance(labels, list) and labels and all(isinstance(x, dict) for x in labels):
        return {
            str(x["label"]): float(x.get("prob", x.get("probability", x.get("score", 0.0))))
            for x in labels if "label" in x
        }
    return {}


def _sources_of(out: dict[str, Any]) -> list[str]:
    if isinstance(out.get("sources"), list):
        return [str(x) for x in out["sources"]]
    for key in ("passages", "results", "documents", "hits"):
        items = out.get(key)
        if isinstance(items, list):
            return [str(d.get("source", d.get("id", d.get("code")))) for d in items if isinstance(d, dict)]
    return []


def label_in_answer(answer: str, labels: Iterable[str]) -> str | None:
    """The known label the answer names first (whole words, case-insensitive); a label named only
    inside a longer one (``CT`` in ``lung CT``) does not count. An answer that ranks the tool's
    labels ("brain MRI (0.86); abdomen CT, hematoxylin and eosin histopathology less likely") is
    scored by its first, not by the longest label it mentions."""
    words = M.normalize_answer(answer).split()
    spans = []  # (start, -length, label) of every whole-word occurrence
    for lab in labels:
        key = M.normalize_answer(lab).split()
        spans += [(i, -len(key), lab) for i in range(len(words) - len(key) + 1)
                  if key and words[i : i + len(key)] == key]
    spans.sort()
    outer = [(i, n, lab) for i, n, lab in spans
             if not any(j <= i and i - n <= j - m and (j, m) != (i, n) for j, m, _ in spans)]
    return outer[0][2] if outer else None


def same_label(a: str | None, b: str | None) -> bool:
    """Labels compared as :func:`label_in_answer` finds them: case, articles and punctuation aside."""
    return a is not None and b is not None and M.normalize_answer(a) == M.normalize_answer(b)


def score_sample(sample: EvalSample, result: SampleResult, labels: Sequence[str], tool_mode: str, k: int) -> dict[str, Any]:
    """Per-sample scores (``None`` / absent where a metric does not apply)."""
    # else the step count and parse errors were not measured (a sample that failed: not as a plan goes)
    turns = result.planner_turns and result.error is None
    s: dict[str, Any] = {
        "steps": len(result.steps) if turns else None, "tool_s": result.tool_s, "model_s": result.model_s,
        "wall_s": result.wall_s, "tokens": result.tokens,
        "parse_error": any(st.parse_error for st in result.steps) if turns else None, "error": result.error,
    }
    # a last turn that did not parse (malformed, or cut off before its value) gave no answer: its raw text, turn
    # markers and thoughts included ("No tool is needed ..."), would be read as one
    answer = "" if result.steps and result.steps[-1].parse_error else result.answer
    gold_calls = sample.gold_calls
    pred_calls = result.calls
    if gold_calls is not None:
        # a sample that ended in an error scores as wrong, even where the gold answer calls no tool
        s["selection_correct"] = result.error is None and T.selection_correct(pred_calls, gold_calls)
        s["calls_tp"], s["calls_pred"], s["calls_gold"] = T.call_counts(pred_calls, gold_calls)
        s["calls_valid"] = sum(T.argument_error(c) is None for c in pred_calls)
        s["argument_match"] = [T.argument_match(p, g) for p, g in T.paired_calls(pred_calls, gold_calls)]
    gold_out = _outputs(_gold_outcomes(sample))
    live_out = _outputs(result.outcomes) if tool_mode == "live" else []

    gold_boxes = sample.reference.get("boxes") or _boxes_of(gold_out)[0]
    if gold_boxes:
        pred, scores = boxes_in_text(answer), None
        if not pred:
            pred, scores = _boxes_of(live_out)
        s["gold_boxes"], s["pred_boxes"] = gold_boxes, pred
        s["pred_box_scores"] = scores or [1.0] * len(pred)
        s["grounding_iou"] = M.grounding_iou(pred, gold_boxes)

    if sample.reference.get("masks") and tool_mode == "live":
        gold_mask = M.union_mask(sample.reference["masks"])
        pred_masks = [m for st in result.steps for ov in st.overlays if ov is not None for m in ov.masks]
        try:  # a failed sample is wrong even where the gold mask is empty (two empty masks have Dice 1)
            s["dice"] = 0.0 if result.error else M.dice(M.union_mask(pred_masks, gold_mask.shape), gold_mask)
        except ValueError as e:  # masks of another size than the gold's
            raise ValueError(f"sample {sample.id!r} (record {sample.index}): {e}") from None

    gold_labels = (_outcome_label(o) for o in _gold_outcomes(sample))
    gold_label = sample.reference.get("label") or next((lab for lab in gold_labels if lab), None)
    if gold_label:
        scores_by_label: dict[str, float] = {}
        for out in live_out:
            scores_by_label.update(_label_scores(out))
        s["gold_label"] = gold_label
        s["pred_label"] = label_in_answer(answer, set(labels) | set(scores_by_label))
        if scores_by_label:
            s["label_scores"] = scores_by_label

    relevant = sample.reference.get("relevant") or [x for out in gold_out for x in _sources_of(out)]
    if relevant and tool_mode == "live":
        retrieved = [x for out in live_out for x in _sources_of(out)]
        s["rag_recall_at_k"] = M.recall_at_k(retrieved, relevant, k)

    reference = reference_answer(sample)
    if reference:
        if sample.answer_type == "closed":
            s["vqa_closed"] = M.closed_correct(answer, reference)
        else:
            s["answer_f1"] = M.token_f1(answer, reference)
            s["rouge_l"] = M.rouge_l(answer, reference)
            s["meteor"] = M.meteor_exact(answer, reference)
            if sample.answer_type == "open":
                s["vqa_open_f1"] = s["answer_f1"]
                s["vqa_open_recall"] = M.token_recall(answer, reference)
    return s


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def aggregate(samples: Sequence[EvalSample], results: Sequence[SampleResult], scores: Sequence[dict[str, Any]], k: int) -> dict[str, Any]:
    """Metrics over a group of samples; a metric with nothing to score is ``None``."""
    n = len(scores)
    sel = [s for s in scores if "selection_correct" in s]
    out: dict[str, Any] = {"n": n}
    out["tool_selection_accuracy"] = M.mean(float(s["selection_correct"]) for s in sel)
    out["call_precision"] = _ratio(sum(s["calls_tp"] for s in sel), sum(s["calls_pred"] for s in sel))
    out["call_recall"] = _ratio(sum(s["calls_tp"] for s in sel), sum(s["calls_gold"] for s in sel))
    out["argument_validity"] = _ratio(sum(s["calls_valid"] for s in sel), sum(s["calls_pred"] for s in sel))
    out["argument_match"] = M.mean(x for s in sel for x in s["argument_match"])

    # images are keyed by position, not id: two samples sharing an id keep their own gold boxes
    boxed = [(i, smp, s) for i, (smp, s) in enumerate(zip(samples, scores)) if "grounding_iou" in s]
    out["grounding_iou"] = M.mean(s["grounding_iou"] for _, _, s in boxed)
    out["map50"] = M.mean_average_precision(
        [(i, smp.task, sc, b) for i, smp, s in boxed for b, sc in zip(s["pred_boxes"], s["pred_box_scores"])],
        [(i, smp.task, b) for i, smp, s in boxed for b in s["gold_boxes"]],
    ) if boxed else None
    out["dice"] = M.mean(s["dice"] for s in scores if "dice" in s)

    cls = [s for s in scores if "gold_label" in s]
    out["classification_accuracy"] = M.mean(float(same_label(s["pred_label"], s["gold_label"])) for s in cls)
    scored = [s for s in cls if "label_scores" in s]
    out["auroc"] = M.macro_auroc(
        [M.normalize_answer(s["gold_label"]) for s in scored],
        [{M.normalize_answer(lab): p for lab, p in s["label_scores"].items()} for s in scored],
    ) if scored else None

    texts = [(r.answer, reference_answer(smp)) for smp, r, s in zip(samples, results, scores) if "rouge_l" in s]
    out["bleu4"] = M.bleu4([h for h, _ in texts], [g for _, g in texts]) if texts else None
    out["rouge_l"] = M.mean(s["rouge_l"] for s in scores if "rouge_l" in s)
    out["meteor"] = M.mean(s["meteor"] for s in scores if "meteor" in s)
    out["rag_recall_at_k"] = M.mean(s["rag_recall_at_k"] for s in scores if "rag_recall_at_k" in s)
    out["k"] = k
    out["vqa_closed_accuracy"] = M.mean(float(s["vqa_closed"]) for s in scores if "vqa_closed" in s)
    out["vqa_open_f1"] = M.mean(s["vqa_open_f1"] for s in scores if "vqa_open_f1" in s)
    out["vqa_open_recall"] = M.mean(s["vqa_open_recall"] for s in scores if "vqa_open_recall" in s)
    out["answer_f1"] = M.mean(s["answer_f1"] for s in scores if "answer_f1" in s)
    if any("judge" in s for s in scores):
        out["judge_score"] = M.mean(s.get("judge") for s in scores)

    out["parse_error_rate"] = M.mean(float(s["parse_error"]) for s in scores if s["parse_error"] is not None)
    out["error_rate"] = M.mean(float(s["error"] is not None) for s in scores)
    for key in ("steps", "tool_s", "model_s", "wall_s", "tokens"):
        out[f"{key}_per_turn"] = M.mean(s[key] for s in scores if s["error"] is None)
    return out


def build_report(
    samples: Sequence[EvalSample],
    results: Sequence[SampleResult],
    *,
    tool_mode: str,
    k: int = 5,
    meta: dict[str, Any] | None = None,
    judge: Sequence[float | None] | None = None,
) -> dict[str, Any]:
    """The evaluation report: overall and per-task metrics plus per-sample answers and scores."""
    labels = sorted({lab for smp in samples for lab in [smp.reference.get("label")] + [
        _outcome_label(o) for o in _gold_outcomes(smp)] if lab})
    scores = [score_sample(smp, r, labels, tool_mode, k) for smp, r in zip(samples, results)]
    if judge is not None:
        for s, j in zip(scores, judge):
            s["judge"] = j
    overall = aggregate(samples, results, scores, k)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, smp in enumerate(samples):
        groups[smp.task].append(i)
    per_task = {
        task: aggregate([samples[i] for i in idx], [results[i] for i in idx], [scores[i] for i in idx], k)
        for task, idx in sorted(groups.items())
    }
    return {
        **(meta or {}),
        "tool_mode": tool_mode,
        "n_samples": len(samples),
        "tool_selection_accuracy": overall["tool_selection_accuracy"],
        "argument_validity": overall["argument_validity"],
        "overall": overall,
        "per_task": per_task,
        "samples": [
            {
                "id": smp.id, "index": smp.index, "task": smp.task, "question": smp.question, "gold_answer": reference_answer(smp),
                "gold_calls": [c.API_name for c in smp.gold_calls] if smp.gold_calls is not None else None,
                "answer": r.answer, "calls": [c.API_name for c in r.calls],
                "raw": [st.raw for st in r.steps], "error": r.error,
                "scores": {k_: v for k_, v in s.items() if k_ not in ("error",)},
            }
            for smp, r, s in zip(samples, results, scores)
        ],
    }


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


SUMMARY_METRICS = RATE_METRICS + ("judge_score", "error_rate", "parse_error_rate", "steps_per_turn", "tool_s_per_turn", "tokens_per_turn", "wall_s_per_turn")


def metric_label(key: str, k: Any) -> str:
    """A metric's name in a table: RAG recall says its k."""
    return f"rag_recall@{k}" if key == "rag_recall_at_k" else key


def markdown_summary(report: dict[str, Any]) -> str:
    """Per-task and overall metrics as a Markdown table (metrics with no value anywhere omitted)."""
    cols = ["overall", *report["per_task"]]
    rows = [report["overall"], *report["per_task"].values()]
    keys = [m for m in ("n", *SUMMARY_METRICS) if any(r.get(m) is not None for r in rows)]
    lines = ["| metric | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    k = report["overall"]["k"]
    for key in keys:
        lines.append(f"| {metric_label(key, k)} | " + " | ".join(_fmt(r.get(key)) for r in rows) + " |")
    return "\n".join(lines)
