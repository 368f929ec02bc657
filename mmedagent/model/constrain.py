"""Decoding constrained to the turn format: every assistant turn the planner writes parses, names a
known tool (or alias) and carries parameters that fit that tool's ``Params`` JSON schema.

The character-level grammar is lm-format-enforcer's; this module builds it from :mod:`mmedagent.protocol`
(marks and the action-list schema) and maps it onto a tokenizer's vocabulary. Checks a JSON schema
cannot express (a pydantic validator, e.g. a box's x1 < x2) are still the dispatcher's.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from mmedagent.protocol import ACTIONS_MARK, THOUGHTS_MARK, VALUE_MARK, actions_json_schema


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


class TurnRule:
    """The grammar state of one turn being decoded. ``allows(token)`` checks one candidate by feeding
    its characters to the parser (cheap: a greedy step whose choice fits needs nothing more);
    ``allowed()`` lists every token that fits (a walk over the vocabulary); ``push(token)`` advances."""

    _PARTIAL = object()

    def __init__(self, tokenizer: Any, data: Any, partial: list[int], parser: Any, eos_ids: set[int]):
        self._tokenizer, self._data, self._partial, self._eos = tokenizer, data, partial, eos_ids
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
        return TurnRule(self._tokenizer, self._data, self._partial, self._grammar(), self._eos)
