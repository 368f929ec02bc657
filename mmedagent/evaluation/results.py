"""Per-sample results on disk: what a run writes as each sample finishes, read back to resume the
run (``--resume``) or to score results produced elsewhere (``--predictions FILE``).

A run with ``--out DIR`` keeps there:

* ``run.json`` — the settings the run was started with (``--resume`` refuses other ones) and the
  report fields that come from the run (name, model, token counting, constrained decoding);
* ``samples.jsonl`` — one line per finished sample, flushed and synced as it is written, so that a
  hard kill (out of memory, preemption) loses at most the sample in flight;
* ``report.json`` — the report, written when the run ends.

The lines of ``samples.jsonl`` are the predictions format: one JSON object per sample with

* ``index`` (the record's 0-based position in the data file, as the reader's errors number records)
  and/or ``id`` (the sample's id): the sample it answers; ``index`` tells apart samples sharing an id;
* ``answer``: the final answer text (may be empty; may be left out when ``error`` is given);
* for tool-use records, at most one of ``steps`` (:class:`mmedagent.agent.AgentStep` dumps, as a run
  writes them: raw text, parsed turn, tool outcomes), ``raw`` (the planner's turn texts in order,
  parsed by :func:`mmedagent.protocol.parse_turn`) or ``calls`` (``[{"API_name", "API_params"}]``);
  with none of them the sample is scored as calling no tool;
* optionally ``error`` (the sample failed: it scores as wrong), ``tokens``, ``wall_s``, ``stopped``.
  Other keys are ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError

from mmedagent.agent import AgentStep
from mmedagent.evaluation.readers import EvalFileError, EvalSample, error_message
from mmedagent.evaluation.runner import SampleResult
from mmedagent.locks import FolderInUse, take_lock
from mmedagent.protocol import AssistantTurn, ToolCall, TurnParseError, parse_turn

SAMPLES_FILE = "samples.jsonl"
RUN_FILE = "run.json"
REPORT_FILE = "report.json"
LOCK_FILE = ".lock"
_STEP_FORMS = ("steps", "raw", "calls")


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_json(path: Path, value: Any) -> None:
    """``value`` as indented JSON, through a temporary file beside ``path`` that replaces it: a kill while
    writing leaves the old file or none, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(json.dumps(value, indent=1, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def result_line(sample: EvalSample, result: SampleResult) -> str:
    """The ``samples.jsonl`` line of one finished sample."""
    return json.dumps({"index": sample.index, **result.model_dump(mode="json")}, ensure_ascii=False)


def _parsed_step(index: int, raw: str) -> AgentStep:
    try:
        return AgentStep(index=index, raw=raw, turn=parse_turn(raw, strict=False))
    except TurnParseError as e:
        return AgentStep(index=index, raw=raw, parse_error=str(e))


def _steps(d: dict[str, Any]) -> list[Any]:
    """The agent steps a line gives, in any of its three forms (``steps`` as written by a run)."""
    forms = [k for k in _STEP_FORMS if d.get(k) is not None]
    if len(forms) > 1:
        raise ValueError(f"give one of 'steps', 'raw' or 'calls', not {' and '.join(map(repr, forms))}")
    if not forms:
        return []
    value = d[forms[0]]
    if forms[0] == "raw":
        texts = [value] if isinstance(value, str) else value
        if not (isinstance(texts, list) and all(isinstance(t, str) for t in texts)):
            raise ValueError("'raw' must be the planner's turn texts, a list of strings")
        return [_parsed_step(i, t) for i, t in enumerate(texts)]
    if forms[0] == "calls":
        if not isinstance(value, list):
            raise ValueError("'calls' must be a list of {\"API_name\": ..., \"API_params\": {...}} objects")
        calls = []
        for k, call in enumerate(value):
            try:
                calls.append(ToolCall.model_validate(call))
            except ValidationError as e:
                expected = '{"API_name": ..., "API_params": {...}}'
                raise ValueError(f"'calls' item {k}: {error_message(e)} (expected {expected})") from None
        return [AgentStep(index=0, raw="", turn=AssistantTurn(actions=calls))]
    return value


def result_from_line(d: dict[str, Any], sample: EvalSample) -> SampleResult:
    """The result one line gives for ``sample`` (raises ``ValueError`` / ``ValidationError``)."""
    answer, error = d.get("answer"), d.get("error") or None
    if error is not None and not isinstance(error, str):
        raise ValueError(f"'error' must be text or null, got {error!r}")
    if answer is None and error is None:
        raise ValueError("no 'answer': give the final answer text (or 'error' for a sample that failed)")
    if answer is not None and not isinstance(answer, str):
        raise ValueError(f"'answer' must be text, got {type(answer).__name__}")
    return SampleResult.model_validate({
        "id": sample.id, "task": sample.task, "answer": answer or "", "steps": _steps(d), "error": error,
        "tokens": d.get("tokens"), "wall_s": d.get("wall_s"), "stopped": d.get("stopped") or "",
        "planner_turns": d.get("steps") is not None or d.get("raw") is not None,
    })


def _read_jsonl(path: Path, text: str | None = None) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line of ``path`` (or of ``text``, read from it);
    a malformed line is an error naming it."""
    if text is None:
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            raise EvalFileError(f"{path}: not UTF-8 text ({e})") from None
    lines = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalFileError(f"{path}, line {n}: not valid JSON ({e}); predictions are JSON lines, "
                                "one object per sample") from None
        if not isinstance(d, dict):
            raise EvalFileError(f"{path}, line {n}: not a JSON object (expected {{\"id\": ..., \"answer\": ...}})")
        lines.append((n, d))
    return lines


def _results(path: Path, samples: Sequence[EvalSample], data: str | Path,
             other_records_ok: bool = False, text: str | None = None) -> dict[int, SampleResult]:
    """The results a file gives, by position in ``samples``: each line paired with its sample by
    ``index`` (its id, if given too, must agree) else by ``id`` (which must name one sample).
    ``other_records_ok``: a line whose ``index`` is a record not in ``samples`` (beyond ``--limit``)
    is skipped instead of refused."""
    by_index = {s.index: i for i, s in enumerate(samples)}
    by_id: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        by_id[s.id].append(i)
    found: dict[int, tuple[int, SampleResult]] = {}
    for n, d in _read_jsonl(path, text):
        index, sid = d.get("index"), d.get("id")
        try:
            if index is None and sid is None:
                raise ValueError("no 'id' or 'index': say which sample of the data file this answers")
            if index is not None:
                if isinstance(index, bool) or not isinstance(index, int):
                    raise ValueError(f"'index' must be the record's 0-based position in {data}, got {index!r}")
                if index not in by_index:
                    if other_records_ok:
                        continue
                    raise ValueError(f"index {index} is not a sample of {data}")
                pos = by_index[index]
                if sid is not None and str(sid) != samples[pos].id:
                    raise ValueError(f"id {sid!r}, but record {index} of {data} has id {samples[pos].id!r}")
            else:
                positions = by_id.get(str(sid), [])
                if not positions:
                    raise ValueError(f"id {sid!r} is not in {data}")
                if len(positions) > 1:
                    records = ", ".join(str(samples[p].index) for p in positions)
                    raise ValueError(f"id {sid!r} names {len(positions)} samples of {data} (records {records}): "
                                     "give 'index' to say which")
                pos = positions[0]
            if pos in found:
                raise ValueError(f"a second prediction for sample {samples[pos].id!r} (record {samples[pos].index}; "
                                 f"the first is on line {found[pos][0]})")
            found[pos] = (n, result_from_line(d, samples[pos]))
        except ValueError as e:  # ValidationError included
            raise EvalFileError(f"{path}, line {n}: {error_message(e)}") from None
    return {pos: result for pos, (_, result) in found.items()}


def read_predictions(path: str | Path, samples: Sequence[EvalSample],
                     data: str | Path) -> tuple[list[SampleResult], list[int]]:
    """One result per sample of ``data``, in order, from a predictions file; and the positions of the
    samples it has no prediction for: each gets a result with the error ``no prediction in FILE``, so
    it scores as wrong."""
    path = Path(path)
    if not path.is_file():
        raise EvalFileError(f"predictions file not found: {path}")
    found = _results(path, samples, data)
    missing = [i for i in range(len(samples)) if i not in found]
    results = [found.get(i) or SampleResult(id=s.id, task=s.task, error=f"no prediction in {path.name}",
                                            wall_s=None, tokens=None, planner_turns=False)
               for i, s in enumerate(samples)]
    return results, missing


def recorded_run(predictions: str | Path) -> dict[str, Any] | None:
    """The ``run.json`` beside a run's ``samples.jsonl`` (``{"settings", "meta"}``), else ``None``."""
    path = Path(predictions)
    run = path.parent / RUN_FILE
    if path.name != SAMPLES_FILE or not run.is_file():
        return None
    return _read_run(run)


def _read_run(path: Path) -> dict[str, Any]:
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise EvalFileError(f"cannot read {path} ({e})") from None
    if not isinstance(run, dict) or not isinstance(run.get("settings"), dict):
        raise EvalFileError(f"{path} is not a run record (no 'settings')")
    return run


def _setting_name(key: str) -> str:
    return "the --data file's content (sha256)" if key == "data_sha256" else "--" + key.replace("_", "-")


class RunFolder:
    """A run's output folder (``--out``; see the module docstring). :meth:`check` before the model
    loads, :meth:`open` once it has, then :meth:`append` each finished sample."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.meta: dict[str, Any] = {}
        """Report fields recorded by the run (``run.json``'s ``meta``)."""
        self.resumed = False
        self._settings: dict[str, Any] = {}
        self._cut = -1
        self._file: IO[str] | None = None
        self._lock: IO[str] | None = None

    def check(self, settings: dict[str, Any], resume: bool, samples: Sequence[EvalSample],
              data: str | Path) -> dict[int, SampleResult]:
        """The results already written here, by position in ``samples`` (empty for a new run). Refuses
        a folder that holds a run unless ``resume``, a run made with other ``settings``, and a folder another
        evaluation is using. Writes nothing but the folder's lock file."""
        if self.path.exists() and not self.path.is_dir():
            raise EvalFileError(f"--out {self.path} is a file, not a folder")
        if self.path.is_dir():  # refused now, before the model loads, if another evaluation holds it
            self._take_lock()
            self._release_lock()
        run, written = self.path / RUN_FILE, self.path / SAMPLES_FILE
        self._settings = settings
        if not (run.is_file() or written.is_file()):
            return {}
        if not resume:
            raise EvalFileError(f"{self.path} already holds a run: --resume continues it; another --out starts afresh")
        if not run.is_file():
            raise EvalFileError(f"{self.path} has {SAMPLES_FILE} but no {RUN_FILE}: how its run was made is unknown, "
                                "so it cannot be resumed; start afresh in another --out")
        recorded = _read_run(run)
        differ = [f"{_setting_name(k)}: {recorded['settings'].get(k)!r} then, {settings.get(k)!r} now"
                  for k in sorted(set(settings) | set(recorded["settings"]))
                  if settings.get(k) != recorded["settings"].get(k)]
        if differ:
            raise EvalFileError(f"cannot resume {self.path}: its run was made with other settings "
                                f"({'; '.join(differ)}). Resume with the same settings, or start afresh in another --out")
        self.meta, self.resumed = dict(recorded.get("meta") or {}), True
        if not written.is_file():
            return {}
        content = written.read_bytes()
        end = content.rfind(b"\n") + 1
        if content[end:].strip():  # the line being written when the run was killed: that sample runs again
            self._cut = end
        try:
            text = content[:end].decode("utf-8")
        except UnicodeDecodeError as e:
            raise EvalFileError(f"{written}: not UTF-8 text ({e})") from None
        return _results(written, samples, data, other_records_ok=True, text=text)

    @property
    def cut_off(self) -> bool:
        """Whether ``samples.jsonl`` ends in a cut-off line (dropped by :meth:`open`)."""
        return self._cut >= 0

    def open(self) -> None:
        """Write ``run.json`` and open ``samples.jsonl`` for appending (a cut-off last line dropped)."""
        self.path.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        self._write_run()
        written = self.path / SAMPLES_FILE
        if self._cut >= 0:
            with written.open("r+b") as f:
                f.truncate(self._cut)
        self._file = written.open("a", encoding="utf-8")

    def record(self, **meta: Any) -> None:
        """Record report fields that come from the run (rewrites ``run.json`` when one changes)."""
        if any(self.meta.get(k) != v for k, v in meta.items()):
            self.meta.update(meta)
            self._write_run()

    def append(self, sample: EvalSample, result: SampleResult) -> None:
        """Write one finished sample's line, flushed and synced to disk."""
        assert self._file is not None, "open() first"
        self._file.write(result_line(sample, result) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._release_lock()

    def _release_lock(self) -> None:
        if self._lock is not None:
            (self.path / LOCK_FILE).unlink(missing_ok=True)  # no stale file naming a finished process
            self._lock.close()  # closing the file releases the lock
            self._lock = None

    def _take_lock(self) -> None:
        """Hold ``.lock`` in the folder while this run uses it: a second evaluation on the same ``--out`` (a
        requeued job while the first still runs) is refused instead of appending beside it."""
        if self._lock is None:
            try:
                self._lock = take_lock(self.path / LOCK_FILE)
            except FolderInUse as e:
                raise EvalFileError(f"{self.path} is in use by another evaluation ({e.holder}): wait for it to end, "
                                    "or use another --out") from None

    def _write_run(self) -> None:
        write_json(self.path / RUN_FILE, {"settings": self._settings, "meta": self.meta})
