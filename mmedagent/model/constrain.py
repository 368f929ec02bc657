"""Decoding constrained to the turn format: every assistant turn the planner writes parses, names a
known tool (or alias) and carries parameters that fit that tool's ``Params`` JSON schema.

The character-level grammar is lm-format-enforcer's; this module builds it from :mod:`mmedagent.protocol`
(marks and the action-list schema) and maps it onto a tokenizer's vocabulary. On top of it, parameters
typed ``Box`` / ``Point`` (marked with :data:`~mmedagent.tools._boxes.COORDS_MARK` in the schema) are
held to plain decimals in [0, 1] and, for boxes, x1 <= x2 and y1 <= y2, which a JSON schema cannot
express (lm-format-enforcer does not check number bounds either). Other pydantic validators stay the
dispatcher's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

from mmedagent.protocol import ACTIONS_MARK, THOUGHTS_MARK, VALUE_MARK, actions_json_schema
from mmedagent.tools._boxes import COORDS_MARK


def _tokenizer_data(tokenizer: Any, eos_ids: list[int]) -> tuple[Any, list[int]]:
    """lm-format-enforcer's view of the vocabulary, and the tokens that hold part of a character
    (byte tokens), which its walk over decoded strings cannot place."""
    from lmformatenforcer import TokenEnforcerTokenizerData

    # A token's text as it reads mid-sequence (with its leading space, if any): decode it after "0".
    zero = tokenizer.encode("0", add_special_tokens=False)[-1]
    special = set(tokenizer.all_special_ids)
    regular, partial = [], []
    for i in range(len(tokenizer)):
        if i in special:
            continue
        text = tokenizer.decode([zero, i])[1:]
        regular.append((i, text, len(text) > len(tokenizer.decode([i]))))
        if "\ufffd" in text:
            partial.append(i)
    data = TokenEnforcerTokenizerData(regular, lambda ids: tokenizer.decode(ids).rstrip("\ufffd"), eos_ids, False,
                                      len(tokenizer))
    return data, partial


def coordinate_fields(schema: Any) -> dict[str, tuple[str, bool]]:
    """Property names whose values are marked coordinate lists: their kind (``xyxy``/``xy``) and
    whether the value is a list of them (``boxes: list[Box]``) rather than one (``box: Box``). Calls
    are matched by property name, so a name that some tool uses otherwise is left out (never held to
    a check it does not have)."""
    found: dict[str, tuple[str, bool]] = {}
    other: set[str] = set()

    def mark(node: Any, depth: int = 0) -> tuple[str, bool] | None:  # through unions and one list level
        if not isinstance(node, dict) or depth > 1:
            return None
        if COORDS_MARK in node:
            return node[COORDS_MARK], depth == 1
        inner = [(v, depth) for v in (*node.get("anyOf", ()), *node.get("oneOf", ()))]
        if "items" in node:
            inner.append((node["items"], depth + 1))
        return next((m for v, d in inner if (m := mark(v, d))), None)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for name, sub in (node.get("properties") or {}).items():
                if (m := mark(sub)) and found.get(name, m) == m:
                    found[name] = m
                else:
                    other.add(name)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    return {name: m for name, m in found.items() if name not in other}


_DECIMAL = re.compile(r"\d+(\.\d*)?|[-+.eE\d]+")  # a plain decimal, else any number-ish run (refused)
_ONE = Decimal(1)


def _number_can_fit(number: str, low: Decimal, complete: bool) -> bool:
    """Whether the number written so far (``complete``: it has ended) is, or can still become, a plain
    decimal in [low, 1]."""
    m = re.fullmatch(r"(\d+)(\.(\d*))?", number)
    if m is None or (len(m[1]) > 1 and m[1][0] == "0"):
        return False
    whole, dot, frac = m[1], m[2], m[3] or ""
    value = Decimal(f"{whole}.{frac or 0}")
    if complete:
        return (dot is None or frac != "") and low <= value <= _ONE
    # completions reach [value, value + 10^-len(frac)) after a point; without one, more digits too
    # (except after a leading 0)
    if dot is None and whole != "0":
        return value <= _ONE
    return value <= _ONE and value + Decimal(1).scaleb(-len(frac) if dot else 0) > low


def _actions(turn: str) -> str:
    """The action list written so far in a turn's text ("" before it begins)."""
    mark = f"\n{ACTIONS_MARK}"  # the thoughts are one line, which may quote the mark itself
    start = turn.find(mark)
    if start < 0:
        return ""
    end = turn.find(f"\n{VALUE_MARK}", start)  # JSON strings hold no raw newline
    return turn[start + len(mark):end if end >= 0 else None]


class CoordinateCheck:
    """Whether the actions written so far keep every marked coordinate list valid (or able to become so)."""

    def __init__(self, fields: dict[str, tuple[str, bool]]):
        self.fields = fields
        self._key = re.compile(r'"(%s)"\s*:\s*' % "|".join(map(re.escape, fields))) if fields else None

    def open_at(self, actions: str) -> bool:
        """Whether the text ends inside a marked field's value (where every token needs checking)."""
        if self._key is None:
            return False
        last = None
        for last in self._key.finditer(actions):
            pass
        return last is not None and self._scan(actions, last.end(), *self.fields[last[1]]) == "open"

    def ok(self, actions: str) -> bool:
        if self._key is None:
            return True
        return all(self._scan(actions, m.end(), *self.fields[m[1]]) != "invalid" for m in self._key.finditer(actions))

    @staticmethod
    def _scan(text: str, i: int, kind: str, nested: bool) -> str:
        """Read a value from ``i`` (``[n, ...]``, or ``[[n, ...], ...]`` when ``nested``): ``"closed"``
        (ended, or not such a list: other syntax is the grammar's business), ``"open"`` (the text ends
        inside it, fine so far) or ``"invalid"`` (a coordinate cannot be valid)."""
        size = 4 if kind == "xyxy" else 2
        n = len(text)

        def skip(j: int) -> int:
            while j < n and text[j] in " \n\t\r":
                j += 1
            return j

        def coords(j: int) -> tuple[str, int]:
            """One coordinate list whose "[" is just before ``j``: (state, index after its "]")."""
            got: list[Decimal] = []
            j = skip(j)
            while j < n and text[j] != "]":
                if text[j] == ",":
                    j = skip(j + 1)
                    continue
                m = _DECIMAL.match(text, j)
                if m is None:
                    return "closed", j
                complete = m.end() < n
                k = len(got)
                low = got[k - 2] if kind == "xyxy" and k >= 2 else Decimal(0)
                if k >= size or not _number_can_fit(m[0], low, complete):
                    return "invalid", j
                if not complete:
                    return "open", j
                got.append(Decimal(m[0]))
                j = skip(m.end())
            return ("open", j) if j >= n else ("closed", j + 1)

        if i < n and text[i] != "[":
            return "closed"
        if not nested:
            return coords(i + 1)[0]
        j = skip(i + 1)
        while j < n:
            if text[j] == "]":
                return "closed"
            if text[j] == ",":
                j = skip(j + 1)
                continue
            if text[j] != "[":
                return "closed"
            state, j = coords(j + 1)
            if state != "closed":
                return state
            j = skip(j)
        return "open"


class TurnRule:
    """The grammar state of one turn being decoded. ``allows(token)`` checks one candidate by feeding
    its characters to the parser (cheap: a greedy step whose choice fits needs nothing more);
    ``allowed()`` lists every token that fits (a walk over the vocabulary); ``push(token)`` advances."""

    _PARTIAL = object()

    def __init__(self, tokenizer: Any, data: Any, partial: list[int], parser: Any, eos_ids: set[int],
                 coords: CoordinateCheck):
        self._tokenizer, self._data, self._partial, self._eos = tokenizer, data, partial, eos_ids
        self._coords = coords
        self._parser, self._ids, self._text = parser, [], ""
        self._pending = False  # the last tokens end inside a multi-byte character
        self._checked: tuple[int, Any] | None = None  # the last candidate judged, so push() need not judge it again

    def _step(self, token: int) -> Any:
        """(parser, text) after ``token``; ``_PARTIAL`` if it ends inside a character the grammar may
        still allow; None if it leaves the grammar."""
        text = self._tokenizer.decode([*self._ids, token])
        if not text.startswith(self._text):
            return None
        stable = text.rstrip("\ufffd")
        parser = self._parser
        for ch in stable[len(self._text):]:
            if ch not in parser.get_allowed_characters():
                return None
            parser = parser.add_character(ch)
        if not self._coords.ok(_actions(stable)):
            return None
        if len(stable) < len(text):
            return self._PARTIAL if any(ord(c) > 127 for c in parser.get_allowed_characters()) else None
        return parser, text

    def allows(self, token: int) -> bool:
        if token in self._eos:
            return not self._pending and self._parser.can_end()
        self._checked = (token, self._step(token))
        return self._checked[1] is not None

    def allowed(self) -> list[int]:
        if self._pending:  # mid-character: lm-format-enforcer's walk cannot see it; try each token
            return [t for t in range(len(self._tokenizer)) if self.allows(t)]
        from lmformatenforcer import TokenEnforcer

        tokens = list(TokenEnforcer(self._data, self._parser).get_allowed_tokens([]).allowed_tokens)
        if any(ord(c) > 127 for c in self._parser.get_allowed_characters()):  # a character made of byte tokens
            known = set(tokens)
            tokens += [t for t in self._partial if t not in known and self.allows(t)]
        if self._coords.open_at(_actions(self._text)):  # inside a box: the grammar alone says too much
            tokens = [t for t in tokens if self.allows(t)]
        return tokens

    def push(self, token: int) -> None:
        step = self._checked[1] if self._checked and self._checked[0] == token else self._step(token)
        self._checked = None
        self._ids.append(token)
        self._pending = step is self._PARTIAL
        if step is not None and not self._pending:
            self._parser, self._text = step


class TurnConstraint:
    """The tokens allowed next in an assistant turn, for the given tools; the turn may end (any of
    ``eos_ids``) once the value has begun. One per planner."""

    def __init__(self, tokenizer: Any, tools: Iterable[Any], eos_ids: Iterable[int]):
        from lmformatenforcer import (CharacterLevelParserConfig, JsonSchemaParser, RegexParser, SequenceParser,
                                      StringParser)

        self._tokenizer, self._eos = tokenizer, set(eos_ids)
        self._data, self._partial = _tokenizer_data(tokenizer, sorted(self._eos))
        schema = actions_json_schema(tools)
        self._coords = CoordinateCheck(coordinate_fields(schema))
        # Every part gets the tokenizer's alphabet (newlines, accents); only the root would by default.
        config = CharacterLevelParserConfig(alphabet=self._data.tokenizer_alphabet)
        # JSON strings hold no raw control characters; calls are written with single spaces (json.dumps).
        json_config = CharacterLevelParserConfig(
            alphabet="".join(c for c in config.alphabet if c.isprintable()), max_consecutive_whitespaces=1)
        # Templates often leave the reply's first space to the model ("ASSISTANT:" + ' "thoughts...').
        self._grammar = lambda: SequenceParser([
            RegexParser(r"[ \n]?", config), StringParser(f"{THOUGHTS_MARK} "),
            RegexParser(r"[^\n]*\n", config),
            StringParser(f"{ACTIONS_MARK} "), JsonSchemaParser(schema, json_config),
            StringParser(f"\n{VALUE_MARK} "), RegexParser(r"[\s\S]*", config),
        ])

    def start(self) -> TurnRule:
        """The rule of one new turn."""
        return TurnRule(self._tokenizer, self._data, self._partial, self._grammar(), self._eos, self._coords)
