"""Tool-use metrics: which tools the planner called, whether the calls would validate, and how
close their arguments are to the gold calls.

Tool names are compared after resolving aliases through the tool registry
(``"grounding dino"`` and ``"grounding"`` are the same tool); a name no registered tool answers
to is compared case-insensitively.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from mmedagent.dispatcher import parse_params
from mmedagent.evaluation.metrics import box_iou, tokenize
from mmedagent.protocol import ToolCall, name_key
from mmedagent.tools._boxes import COORDS_MARK
from mmedagent.tools.base import Tool
from mmedagent.tools.registry import UnknownToolError, get_tool


def tool_class(name: str) -> type[Tool] | None:
    try:
        return get_tool(name)
    except UnknownToolError:
        return None


def canonical_name(name: str) -> str:
    """The registered tool's name for ``name`` (an alias or the name); else ``name`` as
    :func:`~mmedagent.protocol.name_key` writes it."""
    cls = tool_class(name)
    return cls.name if cls is not None else name_key(name)


def call_names(calls: Sequence[ToolCall]) -> list[str]:
    return [canonical_name(c.API_name) for c in calls]


def selection_correct(pred: Sequence[ToolCall], gold: Sequence[ToolCall]) -> bool:
    """Exact tool selection: the multiset of (canonical) tool names equals the gold one.

    A sample whose gold answer calls no tool is correct only if the planner calls none.
    """
    return Counter(call_names(pred)) == Counter(call_names(gold))


def call_counts(pred: Sequence[ToolCall], gold: Sequence[ToolCall]) -> tuple[int, int, int]:
    """``(true positives, predicted, gold)`` over the multisets of canonical tool names."""
    p, g = Counter(call_names(pred)), Counter(call_names(gold))
    return sum((p & g).values()), sum(p.values()), sum(g.values())


def argument_error(call: ToolCall) -> str | None:
    """Why the call's params would be refused by the dispatcher, or ``None`` if they validate.

    As the dispatcher does, the ``image`` key is dropped first (the conversation's image is
    injected); a call to a tool that is not registered is an error.
    """
    cls = tool_class(call.API_name)
    if cls is None:
        return f"unknown tool {call.API_name!r}"
    try:
        parse_params(cls, {k: v for k, v in call.API_params.items() if k != "image"})
    except ValueError as e:  # also a validator's own error (int has no lower): the dispatcher's refusal
        return str(e)
    return None


def _term_f1(pred: Any, gold: Any) -> float:
    """F1 of the sets of lower-cased word tokens of two prompt lists (or strings)."""

    def terms(v: Any) -> set[str]:
        items = v if isinstance(v, (list, tuple)) else [v]
        return {t for item in items for t in tokenize(str(item))}

    p, g = terms(pred), terms(gold)
    if not p or not g:
        return float(p == g)
    common = len(p & g)
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(g)
    return 2 * prec * rec / (prec + rec)


def box_keys(name: str, lists: bool = False) -> frozenset[str]:
    """The params of tool ``name`` typed ``Box`` (one ``[x1, y1, x2, y2]`` box), or with ``lists`` a list of
    them; none for an unknown tool."""
    cls = tool_class(name)
    if cls is None:
        return frozenset()
    props = cls.Params.model_json_schema().get("properties", {})

    def is_box(node: Any) -> bool:
        return isinstance(node, dict) and node.get(COORDS_MARK) == "xyxy"

    return frozenset(k for k, v in props.items()
                     if any(is_box(option.get("items") if lists else option) for option in v.get("anyOf", [v])))


def is_box_list(v: Any) -> bool:
    return (
        isinstance(v, (list, tuple))
        and bool(v)
        and all(isinstance(b, (list, tuple)) and len(b) == 4 and all(isinstance(x, (int, float)) for x in b) for b in v)
    )


def ordered_box(box: Sequence[float]) -> bool:
    """``x1 <= x2`` and ``y1 <= y2``: a box IoU is defined for."""
    return box[0] <= box[2] and box[1] <= box[3]


def _value_match(pred: Any, gold: Any) -> float:
    if is_box_list(gold) and is_box_list(pred):
        # a predicted box with x1 > x2 or y1 > y2 matches nothing (the model's error, not the scorer's)
        return sum(max(box_iou(p, g) if ordered_box(p) else 0.0 for p in pred) for g in gold) / len(gold)
    if isinstance(gold, str) or (isinstance(gold, (list, tuple)) and all(isinstance(x, str) for x in gold)):
        return _term_f1(pred, gold)
    return float(pred == gold)


def argument_match(pred: ToolCall, gold: ToolCall) -> float:
    """Similarity in [0, 1] of two calls' params, averaged over the union of their keys.

    Text and prompt lists score the F1 of their word sets, box lists (and a ``Box`` param: one box)
    the mean best IoU per gold box, anything else equality; a key on one side only scores 0. ``image``
    is ignored.
    """
    p = {k: v for k, v in pred.API_params.items() if k != "image"}
    g = {k: v for k, v in gold.API_params.items() if k != "image"}
    keys = set(p) | set(g)
    if not keys:
        return 1.0
    single = box_keys(gold.API_name)

    def match(k: str) -> float:
        if k not in p or k not in g:
            return 0.0
        return _value_match([p[k]], [g[k]]) if k in single else _value_match(p[k], g[k])

    return sum(match(k) for k in keys) / len(keys)


def paired_calls(pred: Sequence[ToolCall], gold: Sequence[ToolCall]) -> list[tuple[ToolCall, ToolCall]]:
    """Pairs predicted and gold calls to the same tool, closest arguments first (greedy by
    :func:`argument_match`, ties in order of appearance): two calls made in the other order than
    the gold's are each paired with their own gold call. Pairs are in the predicted calls' order."""
    candidates = sorted(
        ((-argument_match(p, g), i, j) for i, p in enumerate(pred) for j, g in enumerate(gold)
         if canonical_name(p.API_name) == canonical_name(g.API_name)),
    )
    used_p: set[int] = set()
    used_g: set[int] = set()
    pairs = []
    for _, i, j in candidates:
        if i not in used_p and j not in used_g:
            used_p.add(i)
            used_g.add(j)
            pairs.append((i, j))
    return [(pred[i], gold[j]) for i, j in sorted(pairs)]
