"""Decoding constrained to the turn format: every assistant turn the planner writes parses, names a
known tool (or alias) and carries parameters that fit that tool's ``Params`` JSON schema.

The character-level grammar is lm-format-enforcer's; this module builds it from :mod:`mmedagent.protocol`
(marks and the action-list schema) and maps it onto a tokenizer's vocabulary. On top of it, numbers
whose schema gives bounds (``minimum``, ``maximum``, ``exclusiveMinimum``, ``exclusiveMaximum``), which
lm-format-enforcer does not check, are held to plain decimals within them (integers without a point),
and parameters typed ``Box`` / ``Point`` (marked with :data:`~mmedagent.tools._boxes.COORDS_MARK`) to
[0, 1] and, for boxes, x1 <= x2 and y1 <= y2, which a JSON schema cannot express. Free text (the
thoughts and the value) may not write a turn marker again, which :func:`~mmedagent.protocol.parse_turn`
refuses. Other pydantic validators stay the dispatcher's.
"""

from __future__ import annotations

import codecs
import dataclasses
import re
from collections.abc import Iterable
from decimal import ROUND_CEILING, Decimal
from typing import Any

from mmedagent.protocol import ACTIONS_OPEN, MARKS, THOUGHTS_OPEN, VALUE_OPEN, actions_json_schema
from mmedagent.tools._boxes import COORDS_MARK


JSON_SCALAR = {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}, {"type": "null"}]}
"""What a param of any type (``Any``) may be written as under constrained decoding."""
_TYPED = {"type", "anyOf", "oneOf", "allOf", "enum", "const", "$ref"}


def decodable(node: Any) -> Any:
    """A JSON schema as lm-format-enforcer can follow it: a value of any type (a field typed ``Any``, the
    items of ``list[Any]``, the values of ``dict[str, Any]``), which it cannot decode, is held to a JSON
    scalar (:data:`JSON_SCALAR`); everything else is kept."""
    if not isinstance(node, dict):
        return node
    if not _TYPED & node.keys() and "properties" not in node and "items" not in node:
        return {**{k: v for k, v in node.items() if k in ("title", "description", "default")}, **JSON_SCALAR}
    out = dict(node)
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        if isinstance(out.get(key), list):
            out[key] = [decodable(v) for v in out[key]]
    if isinstance(out.get("properties"), dict):
        out["properties"] = {k: decodable(v) for k, v in out["properties"].items()}
    if "items" in out:
        out["items"] = decodable(out["items"])
    extra = out.get("additionalProperties")
    if extra is True or (out.get("type") == "object" and "properties" not in out and extra is None):
        out["additionalProperties"] = JSON_SCALAR
    elif isinstance(extra, dict):
        out["additionalProperties"] = decodable(extra)
    return out


def _token_bytes(tokenizer: Any, ids: list[int]) -> dict[int, bytes]:
    """The bytes of the given tokens where the vocabulary spells them: ``<0xNN>`` byte tokens, or
    byte-level BPE's one character per byte."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    found = {}
    for i, piece in zip(ids, tokenizer.convert_ids_to_tokens(ids)):
        if m := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece):
            found[i] = bytes([int(m[1], 16)])
        elif all(c in byte_of for c in piece):
            found[i] = bytes(byte_of[c] for c in piece)
    return found


def _tokenizer_data(tokenizer: Any, eos_ids: list[int]) -> tuple[Any, dict[int, bytes], set[int]]:
    """lm-format-enforcer's view of the vocabulary; the bytes of the tokens that hold part of a character
    (byte tokens), which its walk over decoded strings cannot place, so they are left out of it; and the
    tokens that add no text, which are never allowed (a model could write them forever)."""
    from lmformatenforcer import TokenEnforcerTokenizerData

    # A token's text as it reads mid-sequence (with its leading space, if any): decode it after "0".
    zero = tokenizer.encode("0", add_special_tokens=False)[-1]
    special = set(tokenizer.all_special_ids)
    regular, partial, silent = [], [], set()
    for i in range(len(tokenizer)):
        if i in special:
            continue
        text = tokenizer.decode([zero, i])[1:]
        if "\ufffd" in text:
            partial.append(i)
        elif text:
            regular.append((i, text, len(text) > len(tokenizer.decode([i]))))
        else:
            silent.add(i)
    data = TokenEnforcerTokenizerData(regular, lambda ids: tokenizer.decode(ids).rstrip("\ufffd"), eos_ids, False,
                                      len(tokenizer))
    return data, _token_bytes(tokenizer, partial), silent


@dataclasses.dataclass(frozen=True)
class Numbers:
    """How the numbers of one property are held: bounds (``None``: none), ``integer``, and where they
    sit: the value itself (``depth`` 0), a list of them (1) or a list of such lists (2). ``coords``: the
    innermost lists are boxes (``"xyxy"``: four numbers, x1 <= x2, y1 <= y2) or points (``"xy"``)."""

    low: Decimal | None = None
    high: Decimal | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    depth: int = 0
    coords: str | None = None


def _bounds(node: dict[str, Any]) -> Numbers | None:
    """The bounds a number schema gives, if any."""
    if node.get("type") not in ("integer", "number"):
        return None
    low, high = node.get("minimum"), node.get("maximum")
    low_x, high_x = node.get("exclusiveMinimum"), node.get("exclusiveMaximum")
    if low_x is not None and (low is None or low_x >= low):
        low = low_x
    if high_x is not None and (high is None or high_x <= high):
        high = high_x
    if low is None and high is None:
        return None
    return Numbers(None if low is None else Decimal(str(low)), None if high is None else Decimal(str(high)),
                   low is not None and low == low_x, high is not None and high == high_x, node["type"] == "integer")


def number_fields(schema: Any) -> dict[str, Numbers]:
    """Property names whose values hold bounded numbers or marked coordinate lists, and how. Calls are
    matched by property name, so a name that some tool uses otherwise (other bounds, or none) is left
    out (never held to a check it does not have)."""
    found: dict[str, Numbers] = {}
    other: set[str] = set()

    def numbers(node: Any, depth: int = 0) -> Numbers | None:  # through unions and two list levels
        if not isinstance(node, dict) or depth > 2:
            return None
        if COORDS_MARK in node and depth < 2:
            return Numbers(Decimal(0), Decimal(1), depth=depth + 1, coords=node[COORDS_MARK])
        if (bounds := _bounds(node)) is not None:
            return dataclasses.replace(bounds, depth=depth)
        inner = [(v, depth) for v in (*node.get("anyOf", ()), *node.get("oneOf", ()))]
        if "items" in node:
            inner.append((node["items"], depth + 1))
        return next((m for v, d in inner if (m := numbers(v, d))), None)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for name, sub in (node.get("properties") or {}).items():
                if (m := numbers(sub)) and found.get(name, m) == m:
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


_NUMBER = re.compile(r"[-+.eE\d]+")  # a number-ish run; only plain decimals pass _fits


def _fits(number: str, f: Numbers, complete: bool) -> bool:
    """Whether the number written so far (``complete``: it has ended) is, or can still become, a plain
    decimal within ``f``'s bounds."""
    m = re.fullmatch(r"(-?)(\d*)(\.\d*)?", number)
    if m is None or (len(m[2]) > 1 and m[2][0] == "0") or (m[3] and (f.integer or not m[2])):
        return False
    sign, whole, point = m[1], m[2], m[3]
    if complete:
        return bool(whole) and point != "." and _meets(Decimal(number), True, Decimal(number), True, f)
    bound = f.low if sign else f.high  # the side that more digits lead to
    if point:  # more digits reach [v, v + 10^-digits) in magnitude
        v = Decimal(whole + point + "0")
        spans = [(v, v + Decimal(1).scaleb(1 - len(point)))]
    elif whole == "0":
        spans = [(Decimal(0), Decimal(1))]
    elif bound is None:
        return True
    elif not whole:
        spans = [(Decimal(0), abs(bound) + 1)]
    else:  # n more digits reach [w * 10^n, (w + 1) * 10^n), points included
        w, spans = Decimal(whole), []
        while w <= abs(bound):
            spans.append((w, w + Decimal(1).scaleb(len(spans))))
            w *= 10
    if sign:
        return any(_meets(-b, False, -a, True, f) for a, b in spans)
    return any(_meets(a, True, b, False, f) for a, b in spans)


def _meets(lo: Decimal, lo_in: bool, hi: Decimal, hi_in: bool, f: Numbers) -> bool:
    """Whether the interval from ``lo`` to ``hi`` (``_in``: closed at that end) holds a number within ``f``."""
    if f.low is not None and (f.low > lo or (f.low == lo and f.low_open)):
        lo, lo_in = f.low, not f.low_open
    if f.high is not None and (f.high < hi or (f.high == hi and f.high_open)):
        hi, hi_in = f.high, not f.high_open
    if f.integer:
        lo, lo_in = (lo.to_integral_value(ROUND_CEILING) + (0 if lo_in or lo % 1 else 1)), True
    return lo < hi or (lo == hi and lo_in and hi_in)


def _actions(turn: str) -> str:
    """The action list written so far in a turn's text ("" before it begins)."""
    start = turn.find(ACTIONS_OPEN)  # after the thoughts' one line
    if start < 0:
        return ""
    end = turn.find(VALUE_OPEN, start)  # JSON strings hold no raw newline
    return turn[start + len(ACTIONS_OPEN):end if end >= 0 else None]


class NumberCheck:
    """Whether the actions written so far keep every checked number valid (or able to become so)."""

    def __init__(self, fields: dict[str, Numbers]):
        self.fields = fields
        self._key = re.compile(r'"(%s)"\s*:\s*' % "|".join(map(re.escape, fields))) if fields else None

    def open_at(self, actions: str) -> bool:
        """Whether the text ends inside a checked field's value (where every token needs checking)."""
        if self._key is None:
            return False
        last = None
        for last in self._key.finditer(actions):
            pass
        return last is not None and self._scan(actions, last.end(), self.fields[last[1]]) == "open"

    def ok(self, actions: str) -> bool:
        if self._key is None:
            return True
        return all(self._scan(actions, m.end(), self.fields[m[1]]) != "invalid" for m in self._key.finditer(actions))

    @staticmethod
    def _scan(text: str, i: int, f: Numbers) -> str:
        """Read a value from ``i`` (a number, or lists of them ``f.depth`` deep): ``"closed"`` (ended, or
        not of that shape: other syntax is the grammar's business), ``"open"`` (the text ends inside it,
        fine so far) or ``"invalid"`` (a number cannot be valid)."""
        n = len(text)
        size = {"xyxy": 4, "xy": 2}.get(f.coords or "")

        def skip(j: int) -> int:
            while j < n and text[j] in " \n\t\r":
                j += 1
            return j

        def value(j: int, depth: int, f: Numbers) -> tuple[str, int]:
            """The state of the value that starts at ``j``, and the index after it."""
            if j >= n:
                return "open", j
            if depth == 0:
                m = _NUMBER.match(text, j)
                if m is None:
                    return "closed", j
                complete = m.end() < n
                if not _fits(m[0], f, complete):
                    return "invalid", j
                return ("closed" if complete else "open"), m.end()
            if text[j] != "[":
                return "closed", j
            got: list[Decimal] = []
            j = skip(j + 1)
            while j < n and text[j] != "]":
                if text[j] == ",":
                    j = skip(j + 1)
                    continue
                g = f
                if depth == 1 and size:  # one box or point: its size, and x2 >= x1, y2 >= y1
                    if len(got) >= size:
                        return "invalid", j
                    if f.coords == "xyxy" and len(got) >= 2:
                        g = dataclasses.replace(f, low=max(f.low, got[-2]))
                state, end = value(j, depth - 1, g)
                if state != "closed" or end == j:
                    return state, end
                if depth == 1 and size:
                    got.append(Decimal(text[j:end]))
                j = skip(end)
            return ("open", j) if j >= n else ("closed", j + 1)

        return value(i, f.depth, f)[0]


def _repeats_a_mark(text: str) -> bool:
    return any(text.count(m) > 1 for m in MARKS)


_MARK_TAIL = max(map(len, MARKS)) - 1  # the end of a text that a token may complete a marker with


class TurnRule:
    """The grammar state of one turn being decoded. ``allows(token)`` checks one candidate by feeding
    its characters to the parser (cheap: a greedy step whose choice fits needs nothing more);
    ``allowed()`` lists every token that fits (a walk over the vocabulary); ``push(token)`` advances."""

    def __init__(self, tokenizer: Any, data: Any, partial: dict[int, bytes], silent: set[int], parser: Any,
                 eos_ids: set[int], numbers: NumberCheck, quoting: dict[int, str]):
        """``quoting``: the text of each token holding a ``"`` (the last character of every marker)."""
        self._tokenizer, self._data, self._partial, self._silent, self._eos = tokenizer, data, partial, silent, eos_ids
        self._numbers, self._quoting = numbers, quoting
        self._parser, self._ids, self._text = parser, [], ""
        self._tail = b""  # the last tokens' bytes of a character not yet complete
        self._checked: tuple[int, Any] | None = None  # the last candidate judged, so push() need not judge it again

    def _step(self, token: int) -> tuple[Any, str, bytes] | None:
        """(parser, text, bytes of an unfinished character) after ``token``; None if it adds no text,
        leaves the grammar, or leaves bytes that cannot begin a character the grammar allows next."""
        if token in self._silent:
            return None
        text = self._tokenizer.decode([*self._ids, token])
        if not text.startswith(self._text):
            return None
        stable = text.rstrip("\ufffd")
        tail = b""
        if self._tail or len(stable) < len(text):  # byte tokens: they must spell UTF-8
            if token not in self._partial:
                return None
            decoder = codecs.getincrementaldecoder("utf-8")()
            try:
                decoder.decode(self._tail + self._partial[token])
            except UnicodeDecodeError:
                return None
            tail = decoder.getstate()[0]
        parser = self._parser
        for ch in stable[len(self._text):]:
            if ch not in parser.get_allowed_characters():
                return None
            parser = parser.add_character(ch)
        if _repeats_a_mark(stable) or not self._numbers.ok(_actions(stable)):
            return None
        if tail and not any(c.encode().startswith(tail) for c in parser.get_allowed_characters()):
            return None
        return parser, stable, tail

    def _may_repeat_a_mark(self, token: int) -> bool:
        """Whether ``token`` may complete a marker (then :meth:`allows` judges it); the grammar alone lets
        the thoughts and the value write one again."""
        text = self._quoting.get(token)
        if text is None:
            return False
        tail = self._text[-_MARK_TAIL:]
        return any((tail + text).count(m) > tail.count(m) for m in MARKS)

    def allows(self, token: int) -> bool:
        if token in self._eos:
            return not self._tail and self._parser.can_end()
        self._checked = (token, self._step(token))
        return self._checked[1] is not None

    def allowed(self) -> list[int]:
        if self._tail:  # mid-character: only byte tokens can go on
            return [t for t in self._partial if self.allows(t)]
        from lmformatenforcer import TokenEnforcer

        tokens = list(TokenEnforcer(self._data, self._parser).get_allowed_tokens([]).allowed_tokens)
        if any(ord(c) > 127 for c in self._parser.get_allowed_characters()):  # a character made of byte tokens
            tokens += [t for t in self._partial if self.allows(t)]
        if self._numbers.open_at(_actions(self._text)):  # inside a checked number: the grammar alone says too much
            return [t for t in tokens if self.allows(t)]
        return [t for t in tokens if not self._may_repeat_a_mark(t) or self.allows(t)]

    def push(self, token: int) -> None:
        step = self._checked[1] if self._checked and self._checked[0] == token else self._step(token)
        self._checked = None
        self._ids.append(token)
        if step is not None:
            self._parser, self._text, self._tail = step


class TurnConstraint:
    """The tokens allowed next in an assistant turn, for the given tools; the turn may end (any of
    ``eos_ids``) once the value has begun. One per planner."""

    def __init__(self, tokenizer: Any, tools: Iterable[Any], eos_ids: Iterable[int]):
        from lmformatenforcer import (CharacterLevelParserConfig, JsonSchemaParser, RegexParser, SequenceParser,
                                      StringParser)

        self._tokenizer, self._eos = tokenizer, set(eos_ids)
        self._data, self._partial, self._silent = _tokenizer_data(tokenizer, sorted(self._eos))
        self._quoting = {i: text for i, text, _ in self._data.regular_tokens if '"' in text}
        schema = decodable(actions_json_schema(tools))
        self._numbers = NumberCheck(number_fields(schema))
        # Every part gets the tokenizer's alphabet (newlines, accents); only the root would by default.
        config = CharacterLevelParserConfig(alphabet=self._data.tokenizer_alphabet)
        # JSON strings hold no raw control characters; calls are written with single spaces (json.dumps).
        json_config = CharacterLevelParserConfig(
            alphabet="".join(c for c in config.alphabet if c.isprintable()), max_consecutive_whitespaces=1)
        # Templates often leave the reply's first space to the model ("ASSISTANT:" + ' "thoughts...').
        self._grammar = lambda: SequenceParser([
            RegexParser(r"[ \n]?", config), StringParser(THOUGHTS_OPEN), RegexParser(r"[^\n]*", config),
            StringParser(ACTIONS_OPEN), JsonSchemaParser(schema, json_config) if "items" in schema else StringParser("[]"),
            StringParser(VALUE_OPEN), RegexParser(r"[\s\S]*", config),
        ])

    def start(self) -> TurnRule:
        """The rule of one new turn."""
        return TurnRule(self._tokenizer, self._data, self._partial, self._silent, self._grammar(), self._eos,
                        self._numbers, self._quoting)
