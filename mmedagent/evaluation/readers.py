"""Evaluation files in, :class:`EvalSample` out.

Three layouts are read (detected per record):

* the project's own records (``mmedagent.protocol.Record``: ``conversations`` with gold tool
  calls in gpt turns and gold tool outputs in tool-result turns), optionally with ``task`` /
  ``type``, ``answer_type`` and a ``gold`` mapping (``boxes``, ``masks``, ``label``, ``relevant``);
* MMedAgent's ``eval_agent_tool_use_all.jsonl`` (``question_id``, ``type``, ``image``,
  ``pre_text``, ``assist`` = gold planning turn text, ``text`` = gold tool output +
  "Answer my first question: …", ``fig_caption``);
* VQA-RAD / SLAKE / PathVQA-style QA (``question``, ``answer``, ``answer_type`` CLOSED/OPEN, ``image`` /
  ``image_name`` / ``img_name``); SLAKE's non-English questions (``q_lang`` ≠ ``en``) are skipped. Without
  ``answer_type`` (PathVQA) a yes/no answer is a closed question, any other an open one.

A file is a JSON array or JSON lines. The gold a record gives (boxes, masks, label, relevant sources,
answer) is checked as it is read, so a bad record stops the evaluation before any model runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from mmedagent.data.formats import IMAGE_COLUMNS
from mmedagent.evaluation.metrics import as_mask, normalize_answer
from mmedagent.protocol import (
    AssistantTurn,
    Record,
    ToolCall,
    ToolOutcome,
    TurnParseError,
    parse_tool_results,
    parse_turn,
    strip_image_token,
)


class EvalSample(BaseModel):
    """One evaluation question with everything known about its gold answer."""

    id: str
    index: int = 0
    """The record's 0-based position in the file (as errors number records): unique where ids repeat."""
    task: str
    source: Literal["record", "mmedagent", "qa"]
    image: str | None = None
    question: str
    gold_turns: list[AssistantTurn] | None = None
    """Gold assistant turns in order; ``None`` when the file says nothing about tool use."""
    gold_results: list[list[ToolOutcome]] = Field(default_factory=list)
    """Gold tool outputs, one list per gold turn that called tools (what gold mode feeds back)."""
    gold_answer: str | None = None
    answer_type: Literal["closed", "open"] | None = None
    reference: dict[str, Any] = Field(default_factory=dict)
    """Extra gold: ``boxes``, ``masks`` (COCO RLE), ``label``, ``relevant``, ``fig_caption``."""

    @property
    def gold_calls(self) -> list[ToolCall] | None:
        if self.gold_turns is None:
            return None
        return [a for t in self.gold_turns for a in t.actions]


class EvalFileError(ValueError):
    """An evaluation file or record that cannot be read; names the file and record."""


def error_message(e: Exception) -> str:
    """One line saying what is wrong: a pydantic error's first field and message (its own first line
    is only "1 validation error for Record"), else the error's text."""
    if isinstance(e, ValidationError):
        first = e.errors()[0]
        return f"'{'.'.join(map(str, first['loc']))}': {first['msg']}" if first["loc"] else first["msg"]
    return str(e)


def _answer_type(value: Any) -> Literal["closed", "open"] | None:
    if value is None:
        return None
    v = str(value).strip().lower()
    if v not in ("closed", "open"):
        raise ValueError(f"answer_type must be CLOSED or OPEN, got {value!r}")
    return v  # type: ignore[return-value]


def _check_boxes(boxes: Any, where: str, allow_empty_entries: bool = False) -> None:
    """Gold boxes are a list of ``[x1, y1, x2, y2]`` numbers with x1 ≤ x2, y1 ≤ y2 (a segmentation
    output may hold ``[]`` for an empty mask)."""
    from mmedagent.evaluation.tooluse import ordered_box

    if not isinstance(boxes, list):
        raise ValueError(f"{where} must be a list of [x1, y1, x2, y2] boxes, got {type(boxes).__name__}")
    for b in boxes:
        if allow_empty_entries and b == []:
            continue
        if not (isinstance(b, list) and len(b) == 4
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in b)):
            raise ValueError(f"{where}: {b!r} is not an [x1, y1, x2, y2] box of four numbers")
        if not ordered_box(b):
            raise ValueError(f"{where}: box {b} has x1 > x2 or y1 > y2")


def _check_gold(sample: EvalSample) -> EvalSample:
    """Refuse gold the scorer cannot use, naming the field (instead of a crash or a silent 0 after the run)."""
    ref = sample.reference
    if "boxes" in ref:
        _check_boxes(ref["boxes"], "gold.boxes")
    if "label" in ref and not (isinstance(ref["label"], str) and ref["label"].strip()):
        raise ValueError(f"gold.label must be a non-empty string, got {ref['label']!r}")
    if "relevant" in ref and not (isinstance(ref["relevant"], list)
                                  and all(isinstance(x, (str, int)) for x in ref["relevant"])):
        raise ValueError(f"gold.relevant must be a list of source ids, got {ref['relevant']!r}")
    if "masks" in ref:
        if not isinstance(ref["masks"], list):
            raise ValueError("gold.masks must be a list of masks (COCO RLE)")
        shapes = set()
        for m in ref["masks"]:
            try:
                shapes.add(as_mask(m).shape)
            except (ValueError, TypeError, KeyError) as e:
                raise ValueError(f"gold.masks: not a mask ({e})") from None
        if len(shapes) > 1:
            raise ValueError(f"gold.masks differ in size: {sorted(shapes)}")
    for turn in sample.gold_results:
        for o in turn:
            if o.output and "boxes" in o.output:
                _check_boxes(o.output["boxes"], f"gold {o.tool} output boxes", allow_empty_entries=True)
    from mmedagent.evaluation.tooluse import box_keys

    for call in sample.gold_calls or []:  # the boxes (as the tool's schema marks them) predicted ones are matched against
        single, lists = box_keys(call.API_name), box_keys(call.API_name, lists=True)
        for key, value in call.API_params.items():
            if key in single | lists and isinstance(value, list):
                _check_boxes([value] if key in single else value, f"gold {call.API_name} call's {key!r}")
    return sample


def _task_from_calls(calls: list[ToolCall]) -> str:
    from mmedagent.evaluation.tooluse import canonical_name

    return "+".join(sorted({canonical_name(c.API_name) for c in calls})) or "direct"


def from_record(d: dict[str, Any], index: int) -> EvalSample:
    """A project record: the first question, its gold turns, tool outputs and final answer."""
    rec = Record.from_dict(d)
    msgs = rec.conversations
    start = next((i for i, m in enumerate(msgs) if m.role == "human"), None)
    if start is None:
        raise ValueError("record has no human turn")
    question = strip_image_token(msgs[start].value)
    turns: list[AssistantTurn] = []
    results: list[list[ToolOutcome]] = []
    for m in msgs[start + 1 :]:
        if m.role == "gpt":
            turns.append(m.assistant_turn() if m.is_tool_turn else parse_turn(m.value, strict=False))
        elif m.role == "human":
            try:
                results.append(parse_tool_results(m.value, [a.API_name for a in turns[-1].actions] if turns else None).outcomes)
            except TurnParseError:
                break  # the next question of a multi-turn record: only the first exchange is scored
    if not turns:
        raise ValueError("record has no gpt turn after the first question")
    extra = rec.model_extra or {}
    calls = [a for t in turns for a in t.actions]
    answer_type = _answer_type(extra.get("answer_type"))
    vqa = f"vqa_{answer_type}" if answer_type and not calls else None  # a VQA table built into records
    return _check_gold(EvalSample(
        id=str(rec.id if rec.id is not None else index),
        index=index,
        task=str(extra.get("task") or extra.get("type") or vqa or _task_from_calls(calls)),
        source="record",
        image=rec.images[0] if rec.images else None,
        question=question,
        gold_turns=turns,
        gold_results=results,
        gold_answer=turns[-1].value if not turns[-1].actions else None,
        answer_type=answer_type,
        reference=dict(extra.get("gold") or {}),
    ))


def from_mmedagent(d: dict[str, Any], index: int) -> EvalSample:
    """A line of MMedAgent's ``eval_agent_tool_use_all.jsonl``."""
    if not str(d.get("assist") or "").strip():
        raise ValueError("missing field 'assist' (the gold planning turn): tool use cannot be scored without it")
    turn = parse_turn(str(d["assist"]), strict=False)
    results: list[list[ToolOutcome]] = []
    if turn.actions:
        try:
            results.append(parse_tool_results(str(d.get("text") or ""), [a.API_name for a in turn.actions]).outcomes)
        except TurnParseError as e:
            raise ValueError(f"field 'text' (the gold tool output): {e}") from None
    reference = {"fig_caption": d["fig_caption"]} if d.get("fig_caption") else {}
    return _check_gold(EvalSample(
        id=str(d.get("question_id", index)),
        index=index,
        task=str(d.get("type") or _task_from_calls(turn.actions)),
        source="mmedagent",
        image=d.get("image"),
        question=strip_image_token(str(d["pre_text"])),
        gold_turns=[turn],
        gold_results=results,
        reference=reference,
    ))


def from_qa(d: dict[str, Any], index: int) -> EvalSample:
    """A VQA-RAD / SLAKE / PathVQA-style question with a reference answer; tool use is not scored."""
    answer = d["answer"]
    if answer is None or not str(answer).strip():
        raise ValueError("field 'answer' is empty: give the reference answer, or drop the record")
    answer_type = _answer_type(d.get("answer_type"))
    if answer_type is None:  # PathVQA: yes/no questions are the closed ones
        answer_type = "closed" if normalize_answer(str(answer)) in ("yes", "no") else "open"
    return EvalSample(
        id=str(next((d[k] for k in ("qid", "question_id", "id") if d.get(k) is not None), index)),
        index=index,
        task=f"vqa_{answer_type}",
        source="qa",
        image=next((d[k] for k in IMAGE_COLUMNS if d.get(k)), None),
        question=strip_image_token(str(d["question"])),
        gold_answer=str(answer),
        answer_type=answer_type,
    )


def sample_from_dict(d: dict[str, Any], index: int) -> EvalSample | None:
    """Detect the layout of one record and read it; ``None`` for a record that is skipped."""
    if not isinstance(d, dict):
        raise ValueError("record is not a JSON object")
    if "conversations" in d:
        return from_record(d, index)
    if "messages" in d:  # chat messages (LLaMA-Factory / OpenAI), as `mmedagent.data convert --to sharegpt` writes
        from mmedagent.data.formats import record_from_any

        return from_record(record_from_any(d, str(index)).to_dict(), index)
    if "pre_text" in d:
        return from_mmedagent(d, index)
    if "question" in d and "answer" in d:
        if str(d.get("q_lang", "en")).lower() != "en":
            return None
        return from_qa(d, index)
    if "prompt" in d and "reference" in d:  # a recipe's held-out split (OUT/data/heldout.jsonl)
        if d.get("context"):
            raise ValueError("a multi-turn held-out example ('context'): the recipe's own report scores it")
        return from_qa({"id": d.get("id"), "question": d["prompt"], "answer": d["reference"], "image": d.get("image")},
                       index)
    raise ValueError(
        "unknown record layout: expected 'conversations' (project records), 'messages' (chat messages), "
        "'pre_text'/'assist'/'text' "
        "(MMedAgent eval), 'question'/'answer' (VQA-RAD/SLAKE) or 'prompt'/'reference' (a recipe's held-out split)"
    )


def _raw_records(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors, PowerShell) is not JSON
    stripped = text.lstrip()
    if stripped.startswith("{") and "\n" in stripped.rstrip():  # one record spread over lines, or JSON lines
        try:
            return [json.loads(text)]
        except json.JSONDecodeError:
            pass
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise EvalFileError(f"{path}: not valid JSON: {e}") from None
        return data
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise EvalFileError(f"{path}, line {n}: not valid JSON: {e}") from None
    return records


def load_samples(path: str | Path, limit: int | None = None) -> list[EvalSample]:
    """Read every record of an evaluation file (JSON array or JSON lines)."""
    path = Path(path)
    if not path.is_file():
        raise EvalFileError(f"evaluation file not found: {path}")
    samples: list[EvalSample] = []
    for i, d in enumerate(_raw_records(path)):
        try:
            s = sample_from_dict(d, i)
        except (ValueError, KeyError, TypeError, ValidationError, TurnParseError) as e:
            what = f"missing field {e}" if isinstance(e, KeyError) else error_message(e).splitlines()[0]
            raise EvalFileError(f"{path}, record {i}: {what}") from None
        if s is not None:
            samples.append(s)
        if limit is not None and len(samples) >= limit:
            break
    if not samples:
        raise EvalFileError(f"{path}: no evaluation records")
    return samples
