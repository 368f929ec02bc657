"""Validate instruction data: every record parses, every turn round-trips through the turn format,
tool results follow tool calls, and tool calls validate against the registered tools' ``Params``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mmedagent.data.formats import DataError, chat_messages, read_records
from mmedagent.protocol import Record, TurnParseError, parse_tool_results, parse_turn, render_turn


@dataclass
class CheckReport:
    records: int = 0
    problems: list[str] = field(default_factory=list)
    tool_calls: Counter = field(default_factory=Counter)
    unregistered: Counter = field(default_factory=Counter)
    planning_only: int = 0  # records that end with a tool call (no tool output, no answer)

    @property
    def ok(self) -> bool:
        return not self.problems


def _dispatcher():
    from mmedagent.dispatcher import Dispatcher
    from mmedagent.tools.registry import list_tools

    return Dispatcher([cls() for cls in list_tools()])


def check_records(records: Sequence[Record], source: str, validate_tools: bool = True) -> CheckReport:
    """Problems of already-read records (each names source and 1-based record number)."""
    report = CheckReport(records=len(records))
    dispatcher = _dispatcher() if validate_tools else None
    for i, rec in enumerate(records, 1):
        where = f"{source}: record {i}"
        try:
            chat_messages(rec, where)  # what training checks first
        except DataError as e:
            report.problems.append(str(e))
        pending = 0
        for k, m in enumerate(rec.conversations, 1):
            if m.role == "gpt" and m.is_tool_turn:
                turn = m.assistant_turn()
                try:
                    again = parse_turn(render_turn(turn))
                except TurnParseError as e:
                    report.problems.append(f"{where}: turn {k} does not re-parse: {e}")
                    continue
                if again != turn:
                    report.problems.append(f"{where}: turn {k} changes when rendered and parsed again")
                for call in turn.actions:
                    report.tool_calls[call.API_name] += 1
                    if dispatcher is None:
                        continue
                    if dispatcher.resolve(call.API_name) is None:
                        report.unregistered[call.API_name] += 1
                        continue
                    prepared = dispatcher.prepare(call, image=object())
                    if not isinstance(prepared, tuple):
                        report.problems.append(f"{where}: turn {k}: {prepared.error}")
                pending = len(turn.actions)
            elif m.role == "human" and pending:
                try:
                    results = parse_tool_results(m.value)
                except TurnParseError as e:
                    report.problems.append(f"{where}: turn {k} should carry the tool output: {e}")
                else:
                    if len(results.outcomes) != pending:
                        report.problems.append(f"{where}: turn {k} has {len(results.outcomes)} tool output(s) "
                                               f"for {pending} call(s)")
                    if results.question != rec.first_question():
                        report.problems.append(f"{where}: turn {k} does not repeat the first question")
                pending = 0
        if pending:  # trains the planning turn alone (e.g. the synthetic box drills)
            report.planning_only += 1
    if dispatcher is not None:
        dispatcher.close()
    return report


def check_file(path: str | Path, image_folder: str | Path | None = None, validate_tools: bool = True) -> CheckReport:
    """Read and check one data file (or comma-separated files); unreadable data is a single problem."""
    try:
        records = read_records(path, image_folder=image_folder, check_images=image_folder is not None)
    except DataError as e:
        return CheckReport(problems=[str(e)])
    return check_records(records, str(path), validate_tools)
