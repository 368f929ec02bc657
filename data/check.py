"""Validate instruction data: every record parses, every turn round-trips through the turn format,
tool results follow tool calls, and tool calls validate against the registered tools' ``Params``.

Files are read record by record (JSON lines are never held whole) and every problem is reported, each
naming the file and the 1-based record (and, for JSON lines, the line)."""

from __future__ import annotations

import difflib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmedagent.data.formats import (DataError, canonicalise_tool_results, chat_messages, image_not_found, iter_records,
                                    lies_outside)
from mmedagent.imaging import image_file_problem
from mmedagent.protocol import (IMAGE_PLACEHOLDER, Record, TurnParseError, is_tool_result_text, name_key,
                                parse_tool_results, parse_turn, render_turn, strip_image_token)


@dataclass
class CheckReport:
    records: int = 0  # records read, those with problems included
    problems: list[str] = field(default_factory=list)
    tool_calls: Counter = field(default_factory=Counter)  # by the tool's name where the call's name resolves
    unregistered: Counter = field(default_factory=Counter)
    suggestions: dict[str, str] = field(default_factory=dict)  # unregistered name -> a registered name or alias close to it
    planning_only: int = 0  # records that end with a tool call (no tool output, no answer)
    warnings: list[str] = field(default_factory=list)  # accepted by training, but probably not meant

    @property
    def ok(self) -> bool:
        return not self.problems


def _dispatcher():
    from mmedagent.dispatcher import Dispatcher
    from mmedagent.tools.registry import list_tools

    return Dispatcher([cls() for cls in list_tools()])


def _close_name(name: str, dispatcher: Any) -> str | None:
    """The registered tool name or alias closest to ``name`` (a typo of it), as :func:`name_key` writes names; None
    if none is close."""
    spellings = {name_key(n): (n, tool.name) for tool in dispatcher.tools.values() for n in tool.names()}
    key = name_key(name)
    close = difflib.get_close_matches(key, spellings, n=2, cutoff=0.8)
    if not close:
        return None
    if len(close) == 2 and spellings[close[0]][1] != spellings[close[1]][1] and (
            difflib.SequenceMatcher(None, key, close[0]).ratio() == difflib.SequenceMatcher(None, key, close[1]).ratio()):
        return None  # as close to two tools ("ChatCAD": ChatCAD-G or ChatCAD-R): no guess
    return spellings[close[0]][0]


def _check_one(rec: Record, where: str, report: CheckReport, dispatcher: Any) -> None:
    try:
        chat_messages(rec, where)  # what training checks first
    except DataError as e:
        report.problems.append(str(e))
    pending: list[str] = []  # the names the last planning turn called
    asked = ""  # the last question asked
    for k, m in enumerate(rec.conversations, 1):
        if m.role == "gpt" and m.is_tool_turn:
            turn = m.assistant_turn()
            pending = [call.API_name for call in turn.actions]  # its tool output follows, whatever else is wrong
            try:
                again = parse_turn(render_turn(turn))
            except TurnParseError as e:
                report.problems.append(f"{where}: turn {k} does not re-parse: {e}")
                continue
            if again != turn:
                report.problems.append(f"{where}: turn {k} changes when rendered and parsed again")
            for call in turn.actions:
                tool = dispatcher.resolve(call.API_name) if dispatcher is not None else None
                report.tool_calls[tool.name if tool is not None else call.API_name] += 1
                if call.API_params.get("image", IMAGE_PLACEHOLDER) != IMAGE_PLACEHOLDER:  # unquoted: may name a patient
                    report.warnings.append(
                        f"{where}: turn {k}: {call.API_name}'s image parameter is not {IMAGE_PLACEHOLDER!r}; the agent "
                        f"never opens it (tools get the conversation's image) and constrained decoding writes only "
                        f"{IMAGE_PLACEHOLDER!r} there, so the model would learn a call it is never served")
                if dispatcher is None:
                    continue
                if tool is None:
                    report.unregistered[call.API_name] += 1
                    continue
                prepared = dispatcher.prepare(call, image=object())
                if not isinstance(prepared, tuple):
                    report.problems.append(f"{where}: turn {k}: {prepared.error}")
        elif m.role == "human" and pending:
            try:
                results = parse_tool_results(m.value, pending)
            except TurnParseError as e:
                report.problems.append(f"{where}: turn {k} should carry the tool output: {e}")
            else:
                if len(results.outcomes) != len(pending):
                    report.problems.append(f"{where}: turn {k} has {len(results.outcomes)} tool output(s) "
                                           f"for {len(pending)} call(s)")
                if results.question not in (asked, rec.first_question()):  # the agent repeats the one it answers
                    report.problems.append(f"{where}: turn {k} repeats neither the question it answers nor the first")
            pending = []
        elif m.role == "human":
            if k > 1 and is_tool_result_text(m.value):
                report.problems.append(f"{where}: turn {k} carries tool output, but the turn before calls no tool")
            asked = strip_image_token(m.value)
    if pending:  # trains the planning turn alone (e.g. the synthetic box drills)
        report.planning_only += 1
    copy = rec.model_copy(deep=True)
    if changed := canonicalise_tool_results(copy):
        turns = ("turn " if len(changed) == 1 else "turns ") + ", ".join(map(str, changed))
        agent = copy.conversations[changed[0] - 1].value.split("\n")[0]
        report.warnings.append(
            f"{where}: {turns}: the tool output is not worded as the agent feeds tool outputs back ({agent[:100]!r}); "
            "training takes the turn as written, so the model would learn a wording it is never served; "
            "python -m mmedagent.data convert FILE OUT --canonical-tool-results rewrites it")


def _check_images(rec: Record, where: str, folder: Path, report: CheckReport, seen: dict[Path, str | None]) -> None:
    """Images as training finds them (``--image_folder`` / relative path, or the absolute path as is): a
    missing one, or a file that is no image, is a problem (training refuses it); an absolute path, or one
    that leads out of the folder, is a warning (training takes it, but the data set is then not
    self-contained). ``seen`` caches each file's verdict (records share images)."""
    for img in rec.images:
        path = Path(img)
        full = path if path.is_absolute() else folder / path
        if full not in seen:
            seen[full] = image_file_problem(full)
        if seen[full] is not None:
            problem = image_not_found(img, folder, True) if not full.exists() else f"{seen[full]}: {img}"
            report.problems.append(f"{where}: {problem}")
        if lies_outside(folder, path):
            report.warnings.append(f"{where}: image {img} lies outside --image-folder {folder}")
        elif path.is_absolute():
            report.warnings.append(f"{where}: absolute image path {img} (data sets usually name images "
                                   "relative to --image-folder)")


def check_file(path: str | Path, image_folder: str | Path | None = None, validate_tools: bool = True,
               split: str | None = None) -> CheckReport:
    """Read and check one data file (or comma-separated files) record by record, reporting every problem:
    a record that does not parse is one problem and the next is read; a file that cannot be read (further)
    is one problem. With ``image_folder`` every image must exist there (as training resolves it); ``split``
    picks the split of HF data."""
    report = CheckReport()

    def on_error(e: DataError, is_record: bool) -> None:
        report.problems.append(str(e))
        report.records += is_record

    dispatcher = _dispatcher() if validate_tools else None
    seen: dict[Path, str | None] = {}
    try:
        for where, rec in iter_records(path, image_folder=image_folder, on_error=on_error, split=split):
            report.records += 1
            _check_one(rec, where, report, dispatcher)
            if image_folder is not None:
                _check_images(rec, where, Path(image_folder), report, seen)
        if dispatcher is not None:
            report.suggestions = {n: close for n in report.unregistered if (close := _close_name(n, dispatcher))}
    finally:
        if dispatcher is not None:
            dispatcher.close()
    return report
