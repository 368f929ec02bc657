"""Read, write and convert instruction data: MMedAgent/LLaVA, LLaMA-Factory/sharegpt, HF datasets.

:func:`read_records` returns :class:`mmedagent.protocol.Record` objects for

* MMedAgent / LLaVA records (``conversations`` of ``from``/``value`` turns, tool turns with
  ``thoughts``/``actions``/``value``), as a JSON array, a JSON object holding such an array, or JSONL
  (MMedAgent's ``.jsonl`` files are JSON arrays; the content decides, not the name);
* LLaMA-Factory / sharegpt records: ``messages`` of ``role``/``content`` (content a string with
  ``<image>`` tags, or a list of ``{"type": "image"|"text"}`` parts) plus ``images``;
  ``function_call`` / ``observation`` turns become tool calls / tool results;
* OpenAI chat logs: ``messages`` whose assistant turns carry ``tool_calls`` (or the legacy
  ``function_call``) and ``tool`` turns the results, matched by ``tool_call_id``;
* plain-text dialogue records (no image) and Alpaca-style ``instruction``/``input``/``output``;
* VQA rows (``question`` + ``answer`` [+ ``image`` / ``image_name`` / ``img_name``]: VQA-RAD, SLAKE,
  PathVQA) as direct answers without a tool;
* Hugging Face ``datasets`` folders (``save_to_disk``) and parquet files: rows with a
  conversation column as above, ``image`` + ``caption`` rows (Radiology_mini, MedTrinity-25M
  layouts) turned into caption instruction pairs, or VQA rows; their images exported to a folder.

Assistant text that carries the turn markers is parsed with :func:`mmedagent.protocol.parse_turn`
into thoughts/actions/value, so both directions of sharegpt ⇄ LLaVA are lossless. Every problem is a
:class:`DataError` naming the file and the 1-based record number.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import uuid
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mmedagent.data.templates import THOUGHTS
from mmedagent.protocol import (
    IMAGE_TOKEN,
    MARKS,
    Message,
    Record,
    ToolCall,
    ToolOutcome,
    TurnParseError,
    parse_tool_results,
    parse_turn,
    render_tool_results,
    strip_image_token,
)

__all__ = [
    "DataError",
    "read_records",
    "iter_records",
    "iter_raw",
    "record_from_any",
    "write_records",
    "to_sharegpt",
    "from_sharegpt",
    "convert",
    "canonicalise_tool_results",
    "split_paths",
    "is_tabular",
    "open_hf_dataset",
    "CAPTION_QUESTIONS",
]


def lies_outside(root: str | Path, image: str | Path) -> bool:
    """True when ``image`` (relative to ``root``, or absolute) is not under ``root``. Training takes such
    a path (an absolute one as is, a ``..`` one joined to ``--image_folder``), but the data set then does
    not hold its own images: a warning, not an error."""
    root_n = os.path.normpath(os.path.abspath(root))
    full = os.path.normpath(os.path.join(root_n, image))
    return os.path.commonpath([root_n, full]) != root_n


class DataError(ValueError):
    """Bad instruction data; the message names the file and the record."""


def image_not_found(image: str, base: str | Path, folder_given: bool) -> str:
    """The problem of an image that is not where training looks for it: the path as written, the file
    looked for, and the folder relative paths start from (``--image-folder``, or the data file's folder
    when ``folder_given`` is false) with what to do."""
    if Path(image).is_absolute():
        return f"image not found: {image} (an absolute path, taken as is)"
    full = Path(base) / image
    if folder_given:
        return (f"image not found: {image} (looked for {full}; is --image-folder {base} the folder the data's "
                "image paths are relative to?)")
    return (f"image not found: {image} (looked for {full}, beside the data file; give --image-folder DIR, "
            "the folder the data's image paths are relative to)")


CHAT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
"""Record turn roles -> chat roles."""


def chat_messages(record: Record, where: str) -> list[dict[str, str]]:
    """A record's turns as chat messages, checked as training needs them (a :class:`DataError` naming
    ``where`` otherwise): known roles, a system turn only first, human and gpt turns alternating from
    the human, a gpt turn to learn from, and one ``<image>`` marker per image (none: added to the
    first human turn)."""
    messages: list[dict[str, str]] = []
    for k, m in enumerate(record.conversations):
        role = CHAT_ROLES.get(m.role)
        if role is None:
            raise DataError(f"{where}: turn {k + 1} has unknown role {m.role!r}")
        if role == "system" and k != 0:
            raise DataError(f"{where}: a system turn may only come first")
        messages.append({"role": role, "content": m.text()})
    dialogue = [m["role"] for m in messages if m["role"] != "system"]
    if not dialogue:
        raise DataError(f"{where}: empty conversation")
    for k, role in enumerate(dialogue):
        want = "user" if k % 2 == 0 else "assistant"
        if role != want:
            raise DataError(f"{where}: turn {k + 1} is {role!r}, expected {want!r} (turns must alternate, "
                            "starting with the human)")
    if "assistant" not in dialogue:
        raise DataError(f"{where}: no assistant turn to learn from")
    n_images = len(record.images)
    n_marks = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if n_images and n_marks == 0:
        first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[first_user] = {"role": "user",
                                "content": IMAGE_TOKEN * n_images + "\n" + messages[first_user]["content"]}
    elif n_marks != n_images:
        raise DataError(f"{where}: {n_marks} {IMAGE_TOKEN} marker(s) for {n_images} image(s)")
    return messages


CAPTION_QUESTIONS = (
    "Describe this image.",
    "What does this image show?",
    "Give a short description of this medical image.",
    "Write a caption for this figure.",
    "Summarise the findings visible in this image.",
    "What can you see in this scan?",
    "Provide a brief description of the image.",
    "Explain what is shown in this picture.",
)
"""Questions paired with captions when an image + caption dataset is turned into instructions."""

IMAGE_COLUMNS = ("image", "image_name", "img_name")
"""Table columns naming a row's one image, the first filled one taken: ``image``, VQA-RAD's ``image_name``,
SLAKE's ``img_name`` (builders, records and evaluation readers alike)."""

IMAGE_FIELDS = ("images", *IMAGE_COLUMNS, "image_id")
ID_FIELDS = ("qid", "question_id", "id")
"""A row's own id, first found first: a VQA table's question id (VQA-RAD, SLAKE), else its ``id``."""
"""Row fields naming a record's image(s), the first filled one taken."""

DIRECT_THOUGHT = THOUGHTS["direct"][0]
"""The thought of a question-answer row turned into a record (the builders' first direct thought)."""

_ROLE = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt", "model": "gpt", "system": "system",
         "developer": "system", "function_call": "function_call", "observation": "observation", "tool": "observation",
         "function": "observation"}


def split_paths(value: str | Path | Sequence[str | Path]) -> list[Path]:
    """MMedAgent's comma-separated path lists (``a.json,b.json``) as paths."""
    if isinstance(value, (str, Path)):
        parts = [p.strip() for p in str(value).split(",")]
    else:
        parts = [str(p).strip() for p in value]
    return [Path(p) for p in parts if p]


# --------------------------------------------------------------------------- raw rows


def _is_hf_dir(path: Path) -> bool:
    return path.is_dir() and any((path / n).is_file() for n in ("dataset_info.json", "state.json", "dataset_dict.json"))


_WRAPPER_KEYS = ("data", "records", "train", "examples")


_UNPARSED = object()


def _json_doc(path: Path, text: str = "", data: Any = _UNPARSED) -> Iterator[tuple[int, Any, int | None]]:
    """The records of one JSON document (an array, an object holding one, or one record), from its
    ``text`` or, already parsed, its ``data``."""
    if data is _UNPARSED:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if isinstance(data, dict):
        lists = [v for k, v in data.items() if isinstance(v, list) and k in _WRAPPER_KEYS]
        data = lists[0] if lists else [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records, found {type(data).__name__}")
    for i, row in enumerate(data, 1):
        yield i, row, None


def _lines(path: Path, f: Any) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) split on ``\\n`` only: U+2028, U+0085 and other Unicode line breaks
    are ordinary characters inside JSON strings (``str.splitlines`` would split on them)."""
    lineno = 0
    while True:
        try:
            line = f.readline()
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: line {lineno + 1}: not UTF-8 text ({e.reason})") from None
        if not line:
            return
        lineno += 1
        yield lineno, line.rstrip("\n").rstrip("\r")


def _parsed(line: str) -> Any:
    """The JSON value of ``line``, or ``_UNPARSED``."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return _UNPARSED


def _first_char(f: Any) -> str:
    """The first non-blank character of a text file (read a character at a time: a one-line document
    is not read twice), the file then back at its start; "" for a blank file."""
    while (c := f.read(1)) and c.isspace():
        pass
    f.seek(0)
    return c


def _rows(path: Path, tolerant: bool = False) -> Iterator[tuple[int, Any, int | None]]:
    """(record number, raw row, JSONL line number or None) of a JSON / JSONL file, JSONL streamed line by
    line. A JSONL line that is not JSON raises a :class:`DataError` — or, with ``tolerant``, is yielded as
    that error in place of the row so that reading goes on."""
    try:
        f = open(path, encoding="utf-8-sig", newline="\n")
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    with f:
        try:
            head = _first_char(f)
            if head == "[":  # a JSON array: one document, read once
                yield from _json_doc(path, f.read())
                return
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: cannot read: {e}") from None
        lines = _lines(path, f)
        first = next(((n, ln) for n, ln in lines if ln.strip()), None)
        if first is None:
            return
        first_value = _parsed(first[1]) if head == "{" else _UNPARSED
        document = False
        if head == "{" and first_value is _UNPARSED:
            # a pretty-printed object — unless the next line is a record on its own (JSON lines whose first is bad)
            second = next(((n, ln) for n, ln in lines if ln.strip()), None)
            document = second is None or _parsed(second[1]) is _UNPARSED
            pending = [first] + ([second] if second is not None else [])
        else:
            pending = [first]
        if document:
            f.seek(0)
            try:
                text = f.read()
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: cannot read: {e}") from None
            yield from _json_doc(path, text)
            return
        if head == "{" and len(pending) == 1 and path.suffix.lower() == ".json":
            # a one-line JSON object file: a document (maybe {"data": [...]}), unless more lines follow
            second = next(((n, ln) for n, ln in lines if ln.strip()), None)
            if second is None:
                yield from _json_doc(path, data=first_value)
                return
            pending.append(second)
        n = 0
        for lineno, line in itertools.chain(pending, lines):
            if not line.strip():
                continue
            n += 1
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                err = DataError(f"{path}: record {n} (line {lineno}): invalid JSON at column {e.colno}: {e.msg}")
                if not tolerant:
                    raise err from None
                yield n, err, lineno
                continue
            yield n, row, lineno


def iter_raw(path: Path) -> Iterator[tuple[int, Any]]:
    """(1-based record number, raw row) for a JSON / JSONL file; DataError on malformed text.

    JSON lines are read one at a time (a large file is never held whole); a top-level JSON array or
    object is parsed as one document. A file starting with ``{`` is JSON lines when its first line is
    a JSON value on its own, else one JSON document (its syntax errors report their real line and column).
    """
    for i, row, _ in _rows(Path(path)):
        yield i, row


def is_tabular(path: Path) -> bool:
    """A saved HF dataset folder, a parquet file or a folder of parquet files."""
    return _is_hf_dir(path) or path.suffix.lower() == ".parquet" or (path.is_dir() and any(path.glob("**/*.parquet")))


_SPLIT = re.compile(r"^\s*([\w.-]+)?\s*(?:\[\s*(-?\d+%?)?\s*:\s*(-?\d+%?)?\s*\])?\s*$")


def _slice(ds: Any, start: str | None, stop: str | None) -> Any:
    """``ds[start:stop]`` with ``datasets``' split-slice syntax (whole rows or percents)."""
    n = len(ds)

    def pos(x: str | None, default: int) -> int:
        if x is None:
            return default
        return round(n * int(x[:-1]) / 100) if x.endswith("%") else int(x)

    return ds.select(range(*slice(pos(start, 0), pos(stop, n)).indices(n)))


def _parquet_files(path: Path, split: str | None) -> list[Path]:
    """The parquet files of ``path``; in a folder laid out by split (``train-0000.parquet``,
    ``data/test/…``), those of ``split``."""
    if path.is_file():
        return [path]
    files = sorted(path.glob("**/*.parquet"))
    if not split:
        return files
    named = {f: _split_of(f, path) for f in files}
    if not any(named.values()):
        return files  # not laid out by split
    chosen = [f for f, s in named.items() if s == split]
    if not chosen:
        have = sorted({s for s in named.values() if s})
        raise DataError(f"{path}: no split {split!r}; its parquet files hold {', '.join(have)} (use --data-split)")
    return chosen


_KNOWN_SPLITS = ("train", "validation", "valid", "val", "test", "dev", "eval")


def _split_of(file: Path, root: Path) -> str | None:
    """The split a parquet file's name (``test-00000-of-00001.parquet``) or its folders under ``root`` name."""
    parts = [file.stem.split("-")[0].split(".")[0], *(q.name for q in file.relative_to(root).parents if q.name)]
    return next((q for q in parts if q in _KNOWN_SPLITS), None)


def _single_split_name(path: Path, ds: Any) -> str:
    """The split a single-split source holds: the one a saved ``Dataset`` recorded, or its parquet files
    are named by; else ``train`` (as ``datasets`` names such data)."""
    if _is_hf_dir(path):
        recorded = _SPLIT.match(str(ds.split or ""))
        return (recorded.group(1) if recorded else None) or "train"
    names = {_split_of(f, path if path.is_dir() else path.parent) for f in _parquet_files(path, None)}
    return names.pop() if len(names) == 1 and None not in names else "train"


def open_hf_dataset(path: Path, split: str | None = None) -> Any:
    """The saved HF dataset / parquet data at ``path``; ``split`` (``train``, ``test[:100]``, ``train[10%:]``)
    picks a split of a saved ``DatasetDict`` or a split-named parquet folder and slices it. None: the
    ``train`` split, or the only one. A single-split source (a parquet file, a saved ``Dataset``) holds
    ``train`` (the default) and the split it is named by; another name is an error."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading Hugging Face datasets needs `pip install datasets`") from None

    m = _SPLIT.match(split or "")
    if split and not m:
        raise DataError(f"--data-split {split!r}: expected a split name, optionally sliced: "
                        "train, test[:100], train[10%:]")
    name, start, stop = (m.groups() if m else (None, None, None))
    try:
        if _is_hf_dir(path):
            if _saved_empty(path):
                raise DataError(f"{path}: no records (the saved dataset is empty)")
            ds = datasets.load_from_disk(str(path))
        else:
            files = _parquet_files(path, name)
            if all(_parquet_rows(f) == 0 for f in files):
                raise DataError(f"{path}: no records (the parquet data is empty)")
            ds = datasets.Dataset.from_parquet([str(f) for f in files])
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: cannot open as a Hugging Face dataset: {type(e).__name__}: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        pick = name or ("train" if "train" in ds or len(ds) != 1 else next(iter(ds)))
        if pick not in ds:
            raise DataError(f"{path}: no split {pick!r}; it has {', '.join(ds)} (use --data-split)")
        ds = ds[pick]
    elif name and name not in ("train", own := _single_split_name(path, ds)):
        raise DataError(f"{path}: no split {name!r}; it holds one split, {own!r} (leave out --data-split)")
    if start is not None or stop is not None:
        ds = _slice(ds, start, stop)
    if len(ds) == 0:
        raise DataError(f"{path}: no records" + (f" in split {split!r}" if split else ""))
    return ds


def _saved_empty(path: Path) -> bool:
    """A ``save_to_disk`` folder of a dataset with no rows (``datasets`` cannot load it back)."""
    try:
        return json.loads((path / "state.json").read_text()).get("_data_files") == []
    except (OSError, ValueError, AttributeError):
        return False


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(str(path)).metadata.num_rows
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: cannot read as parquet: {type(e).__name__}: {e}") from None


def export_images(row: dict[str, Any], index: int, export_dir: Path, relative_to: Path | None = None,
                  split: str | None = None) -> dict[str, Any]:
    """Replace decoded / byte images in an HF row by the names of files written to ``export_dir``, relative
    to it (or to ``relative_to``); DataError for a value that is not an image. The file names hold the row
    number and the ``split`` read (two splits of one dataset never share a file); a file already there
    with other content is an error, never overwritten."""
    out = dict(row)
    tag = f"{_split_tag(split)}_" if split else ""
    for key in ("image", "images"):
        if key not in row or row[key] is None:
            continue
        values = row[key] if isinstance(row[key], list) else [row[key]]
        names = []
        for k, v in enumerate(values):
            if isinstance(v, str):
                names.append(v)
                continue
            # the row number keeps the name unique: ids repeat, or sanitise to one name (case/0, case_0)
            rid = str(row.get("id") or "")
            stem = f"{tag}{index:08d}" + (f"_{_safe_name(rid)}" if rid else "") + (f"_{k}" if len(values) > 1 else "")
            saved = _save_image(v, export_dir, stem)
            names.append(saved if isinstance(saved, str) else
                         Path(os.path.relpath(saved, relative_to or export_dir)).as_posix())
        out[key] = names if isinstance(row[key], list) else names[0]
    return out


def _split_tag(split: str) -> str:
    """A split spec as a file-name part, distinct for distinct specs: ``test``, ``test[:100]`` → ``test_-100``."""
    m = _SPLIT.match(split)
    name, start, stop = m.groups() if m else (split, None, None)
    tag = _safe_name(name or "train")
    if start is not None or stop is not None:
        tag += f"_{start or ''}-{stop or ''}".replace("%", "pct")
    return tag


def write_new(path: Path, data: bytes, hint: str) -> None:
    """Write ``data`` to ``path``; a file already there with other content is a DataError (``hint``: what to do)."""
    if path.is_file() and path.read_bytes() != data:
        raise DataError(f"{path}: already exists with other content; {hint}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _safe_name(s: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("._")
    return safe[:80] or hashlib.sha1(s.encode()).hexdigest()[:16]  # ids wholly in other scripts: hash the original


def _save_image(value: Any, folder: Path, stem: str) -> Path | str:
    """The file ``value`` (bytes, an HF image cell, a PIL image) is written to in ``folder``; an HF cell
    holding only a path: that path, as written."""
    from mmedagent.imaging import detect_format

    if isinstance(value, (bytes, bytearray, memoryview)):  # a plain binary column (pandas / pyarrow)
        value = {"bytes": bytes(value), "path": None}
    if isinstance(value, dict) and value.get("bytes"):
        data = value["bytes"]
        fmt = detect_format(data[:1024])
        if fmt is None:
            raise DataError(f"the stored image ({len(data):,} bytes) is not an image: expected PNG, JPEG, BMP, "
                            "TIFF, GIF, WebP, DICOM or NIfTI content")
        ext = {"jpeg": ".jpg", "nifti": ".nii.gz" if data[:2] == b"\x1f\x8b" else ".nii", "dicom": ".dcm"}.get(fmt, f".{fmt}")
    elif isinstance(value, dict) and value.get("path"):
        return str(value["path"])
    elif hasattr(value, "save"):  # PIL image: its pixel values kept (a CT's or MR's 16/32-bit values, not clipped to 8)
        buf = io.BytesIO()
        if value.mode in ("I;16L", "I;16N"):  # 16-bit of another byte order: as PNG's 16-bit grey, values kept
            import numpy as np
            from PIL import Image

            value = Image.fromarray(np.asarray(value).astype("<u2"))
        if value.mode in ("I", "F"):  # 32-bit integer (possibly negative) or float: TIFF holds them as they are
            value.save(buf, format="TIFF")
            ext = ".tiff"
        else:
            (value if value.mode in ("RGB", "L", "I;16", "I;16B") else value.convert("RGB")).save(buf, format="PNG")
            ext = ".png"
        data = buf.getvalue()
    else:
        raise DataError(f"cannot export an image of type {type(value).__name__}")
    write_new(folder / (stem + ext), data, "another data set's images were exported there: export into another folder")
    return folder / (stem + ext)


# --------------------------------------------------------------------------- normalising one row


def _text_of(content: Any) -> tuple[str, int]:
    """(text with <image> tags, number of image parts) of a message content."""
    if isinstance(content, str):
        return content, 0
    if isinstance(content, list):
        texts, n_img = [], 0
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type") in ("image", "image_url"):
                n_img += 1
                texts.append(IMAGE_TOKEN)
            elif isinstance(part, dict) and part.get("type") == "text":
                texts.append(str(part.get("text", "")))
            else:
                raise ValueError(f"unsupported content part {part!r:.60}")
        joined = ""
        for t in texts:  # image parts on their own line, like LLaVA's "<image>\n"
            joined += t + ("\n" if t == IMAGE_TOKEN else "")
        return joined.strip(" "), n_img
    if content is None:
        return "", 0
    raise ValueError(f"message content must be text or a list of parts, not {type(content).__name__}")


def _gpt_message(text: str) -> Message:
    """An assistant message; text in the turn format becomes thoughts/actions/value."""
    try:
        turn = parse_turn(text, strict=True)
    except TurnParseError as e:
        if any(m in text for m in MARKS):
            raise ValueError(f"assistant turn has turn markers but does not parse: {e}") from None
        return Message(role="gpt", value=text)
    return Message(role="gpt", thoughts=turn.thoughts, actions=list(turn.actions), value=turn.value)


def _openai_calls(t: dict[str, Any], k: int) -> list[tuple[str | None, ToolCall]]:
    """OpenAI function calling on an assistant message: ``tool_calls`` (``id`` + ``function`` name and JSON
    ``arguments``) or the legacy ``function_call``, as (call id, call) pairs; [] when it has neither."""
    raw = t.get("tool_calls") or ([{"function": t["function_call"]}] if t.get("function_call") else [])
    if not isinstance(raw, list):
        raise ValueError(f"turn {k}: tool_calls must be a list")
    calls = []
    for c in raw:
        fn = c.get("function") if isinstance(c, dict) else None
        name = str(fn.get("name") or "").strip() if isinstance(fn, dict) else ""
        if not name:
            raise ValueError(f"turn {k}: a tool call without a function name")
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                raise ValueError(f"turn {k}: the arguments of tool call {name!r} are not JSON: {e.msg}") from None
        if not isinstance(args, (dict, type(None))):
            raise ValueError(f"turn {k}: the arguments of tool call {name!r} must be a JSON object")
        calls.append((c.get("id"), ToolCall(API_name=name, API_params=args or {})))
    return calls


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _tool_outcome(call: ToolCall, text: str) -> ToolOutcome:
    """A tool result message's text as the outcome of ``call``: a JSON object is its output, other JSON
    ``{"result": ...}``, plain text (a report, a label) the text fed back verbatim."""
    result = _json_or_none(text)
    if result is None or isinstance(result, str):
        return ToolOutcome(tool=call.API_name, text=text if result is None else result)
    return ToolOutcome(tool=call.API_name, output=result if isinstance(result, dict) else {"result": result})


def _messages_from_chat(turns: list[Any], role_key: str, text_key: str) -> list[Message]:
    """Chat turns as record messages. A tool-calling turn (LLaMA-Factory ``function_call``, OpenAI
    ``tool_calls``) becomes an assistant turn with actions; the tool results after it (``observation`` /
    ``tool`` turns, matched to their call by ``tool_call_id`` or in order) one human tool-result turn."""
    out: list[Message] = []
    pending: list[tuple[str | None, ToolCall]] = []
    results: dict[int, ToolOutcome] = {}
    question = ""  # the one being answered, which tool results repeat (as the agent does)

    def close_calls(k: int) -> None:  # the results of the last tool-calling turn, once all have come
        if pending and (results or k <= len(turns)):  # (a conversation may end at a call: planning-only)
            missing = [c.API_name for i, (_, c) in enumerate(pending) if i not in results]
            if missing:
                raise ValueError(f"turn {k}: no tool result for the call(s) to {', '.join(missing)}")
            out.append(Message(role="human", value=render_tool_results([results[i] for i in range(len(pending))],
                                                                          question)))
        pending.clear()
        results.clear()

    for k, t in enumerate(turns, 1):
        if not isinstance(t, dict):
            raise ValueError(f"turn {k} is not an object")
        role = _ROLE.get(str(t.get(role_key, "")).strip().lower())
        if role is None:
            raise ValueError(f"turn {k} has unknown role {t.get(role_key)!r}")
        if role != "observation":
            close_calls(k)
        if role == "gpt" and ("thoughts" in t or "actions" in t):
            out.append(Message.model_validate({"from": "gpt", **{k2: t[k2] for k2 in ("thoughts", "actions") if k2 in t},
                                                "value": t.get(text_key, t.get("value", "")) or ""}))
            continue
        text, _ = _text_of(t.get(text_key))
        if role == "gpt" and (calls := _openai_calls(t, k)):
            pending[:] = calls
            out.append(Message(role="gpt", thoughts=text.strip(), actions=[c for _, c in calls], value=""))
        elif role == "function_call":  # LLaMA-Factory: {"name": ..., "arguments": {...}}, or a list of them
            call = _json_or_none(text)
            if not isinstance(call, (dict, list)):
                raise ValueError(f"turn {k}: a function_call turn must hold a JSON object "
                                 '{"name": ..., "arguments": {...}} or a list of them')
            pending[:] = [(None, ToolCall(API_name=c["name"], API_params=c.get("arguments") or {}))
                          for c in (call if isinstance(call, list) else [call])]
            out.append(Message(role="gpt", thoughts="", actions=[c for _, c in pending], value=""))
        elif role == "observation":
            if not pending:
                raise ValueError(f"turn {k}: a tool result without a preceding tool call")
            call_id = t.get("tool_call_id")
            if call_id is None and not results and len(pending) > 1:  # LLaMA-Factory: one result list for all
                many = _json_or_none(text)
                if isinstance(many, list) and len(many) == len(pending):
                    results.update({i: _tool_outcome(c, json.dumps(o)) for i, ((_, c), o) in enumerate(zip(pending, many))})
                    continue
            if call_id is not None:
                at = next((i for i, (cid, _) in enumerate(pending) if cid == call_id), None)
                if at is None:
                    raise ValueError(f"turn {k}: tool_call_id {call_id!r} names no call of the turn before")
            else:
                at = next((i for i in range(len(pending)) if i not in results), None)
                if at is None:
                    raise ValueError(f"turn {k}: more tool results than calls")
            results[at] = _tool_outcome(pending[at][1], text)
        elif role == "gpt":
            out.append(_gpt_message(text))
        else:
            if role == "human":
                question = strip_image_token(text)
            out.append(Message(role=role, value=text))
    close_calls(len(turns) + 1)
    return out


def record_from_any(row: Any, default_id: str, caption_question: str | None = None) -> Record:
    """One raw row (any supported layout) as a :class:`Record`; ValueError on bad content."""
    if not isinstance(row, dict):
        raise ValueError(f"a record must be a JSON object, found {type(row).__name__}")

    def filled(key: str) -> bool:  # a null field (a table's empty cell) is an absent one
        return row.get(key) is not None

    # the first image field that is filled: ``"images": null`` beside ``"image": "a.png"`` keeps the image,
    # and ``"image": ""`` (tables exported with an empty cell) is a record without one
    images = next((row[k] for k in IMAGE_FIELDS if row.get(k) not in (None, "", [])), None)
    if isinstance(images, list) and len(images) <= 1:  # LLaVA writes a single image as a string
        images = images[0] if images else None
    consumed = {"id", *IMAGE_FIELDS, "conversations", "messages", "instruction", "input", "output",
                "caption"}  # fields made into the record; the others pass through
    if "conversations" in row and isinstance(row["conversations"], list) and row["conversations"] and isinstance(row["conversations"][0], dict) and "from" in row["conversations"][0]:
        turns = row["conversations"]
        role_key, text_key = "from", "value"
    elif filled("messages") or filled("conversations"):
        turns = row["messages"] if filled("messages") else row["conversations"]
        if not isinstance(turns, list):
            raise ValueError("messages must be a list")
        role_key, text_key = "role", "content"
    elif filled("instruction") or filled("output"):
        if not filled("output"):
            raise ValueError("no answer: the output field is null or missing")
        question = "\n".join(str(row[k]) for k in ("instruction", "input") if row.get(k) not in (None, ""))
        if not question:
            raise ValueError("no question: the instruction and input fields are null or empty")
        turns = [*_history_turns(row.get("history")),
                 {"from": "human", "value": question}, {"from": "gpt", "value": str(row["output"])}]
        role_key, text_key = "from", "value"
        consumed.add("history")
    elif "caption" in row and images is not None:
        caption = str(row["caption"] or "").strip()
        if not caption:
            raise ValueError("empty caption")
        turns = [{"from": "human", "value": f"{IMAGE_TOKEN}\n{caption_question or CAPTION_QUESTIONS[0]}"},
                 {"from": "gpt", "thoughts": "The user asks for a description of the image; I can answer directly.",
                  "actions": [], "value": caption}]
        role_key, text_key = "from", "value"
    elif "caption" in row:
        raise ValueError("no image: the row has a caption but its image is null or missing")
    elif "question" in row and any(row.get(k) is not None for k in ("options", "choices")):
        raise ValueError("a multiple-choice row (question + options, MedQA-style): its options would be lost here; "
                         "the dialogue recipe formats them (python -m mmedagent.recipes dialogue-llama3 --data FILE)")
    elif "question" in row and "answer" in row:  # VQA-RAD, SLAKE, PathVQA: a question answered without a tool
        question, answer = (str(row[k] if row[k] is not None else "").strip() for k in ("question", "answer"))
        if not question or not answer:
            raise ValueError(f"empty {'question' if not question else 'answer'}")
        turns = [{"from": "human", "value": question},
                 {"from": "gpt", "thoughts": DIRECT_THOUGHT, "actions": [], "value": answer}]
        role_key, text_key = "from", "value"
        consumed |= {"question", "answer"}
    else:
        raise ValueError("no conversations / messages / instruction+output / image+caption / question+answer fields")
    messages = _messages_from_chat(turns, role_key, text_key)
    if not messages:
        raise ValueError("conversation is empty")
    system = row.get("system")  # LLaMA-Factory's system prompt column: the first turn, as training reads it
    if isinstance(system, str) and system.strip() and messages[0].role != "system":
        messages.insert(0, Message(role="system", value=system))
        consumed.add("system")
    rec_id = next((row[k] for k in ID_FIELDS if row.get(k) not in (None, "")), default_id)
    passthrough = {k: v for k, v in row.items() if k not in consumed and _jsonable(v)}
    record = Record.model_validate({"id": rec_id, "image": images, "conversations": messages, **passthrough})
    _check_image_tags(record)
    return record


def _history_turns(history: Any) -> list[dict[str, str]]:
    """Alpaca's ``history`` (``[[question, answer], ...]``, the turns before the instruction) as turns."""
    if history is None:
        return []
    if not isinstance(history, list) or not all(isinstance(h, list) and len(h) == 2 for h in history):
        raise ValueError("history must be a list of [question, answer] pairs")
    return [{"from": role, "value": str(text)} for pair in history for role, text in zip(("human", "gpt"), pair)]


def _jsonable(v: Any) -> bool:
    return isinstance(v, (str, int, float, bool, type(None), list, dict))


def _check_image_tags(record: Record) -> None:
    """<image> tags: none (one is added to the first human turn) or exactly one per image. A record's one tag
    goes to the start of its turn, as LLaVA's training moves it and as serving places the image: a question
    with the tag after it would be trained in a layout the model never sees when served."""
    n_images = len(record.images)
    humans = [m for m in record.conversations if m.role == "human"]
    n_tags = sum(m.value.count(IMAGE_TOKEN) for m in humans)
    if n_images and n_tags == 0:
        if not humans:
            raise ValueError("record has an image but no human turn")
        humans[0].value = IMAGE_TOKEN * n_images + "\n" + humans[0].value
    elif n_tags and not n_images:
        raise ValueError(f"{n_tags} {IMAGE_TOKEN} tag(s) but no image: the record's image field is empty or missing")
    elif n_tags != n_images:
        raise ValueError(f"{n_tags} {IMAGE_TOKEN} tag(s) for {n_images} image(s)")
    elif n_tags == 1:
        tagged = next(m for m in humans if IMAGE_TOKEN in m.value)
        tagged.value = f"{IMAGE_TOKEN}\n{strip_image_token(tagged.value)}"


# --------------------------------------------------------------------------- public API


def read_records(path: str | Path | Sequence[str | Path], image_folder: str | Path | None = None, *,
                 check_images: bool = False, split: str | None = None) -> list[Record]:
    """Every record of one file, a comma-separated list of files, an HF dataset folder or parquet file.

    Image paths are returned as written in the data (relative to ``image_folder``, as LLaVA
    expects). Images of HF datasets are exported to ``image_folder`` (names relative to it) or,
    without one, to ``<dataset>_images/`` next to the dataset (absolute paths). With
    ``check_images`` every referenced image must exist. ``split`` picks the split of HF data (see
    :func:`open_hf_dataset`). Raises :class:`DataError` naming file and record.
    """
    return [rec for _, rec in iter_records(path, image_folder, check_images=check_images, split=split)]


def iter_records(path: str | Path | Sequence[str | Path], image_folder: str | Path | None = None, *,
                 check_images: bool = False, on_error: Callable[[DataError, bool], None] | None = None,
                 split: str | None = None) -> Iterator[tuple[str, Record]]:
    """``(where, record)`` for every record, read lazily (JSON lines one at a time); ``where`` is
    ``"<file>: record N"``, as error messages name it (a JSON line that does not parse: ``"... (line L)"``).

    Without ``on_error`` the first problem raises a :class:`DataError`. With it, each problem is passed
    to ``on_error(error, is_record)`` and reading goes on: with the next record when one record is bad
    (``is_record`` true), with the next file when the file cannot be read further (``is_record`` false).
    """
    for p in split_paths(path):
        try:
            yield from _file_records(p, image_folder, check_images, on_error, split)
        except DataError as e:
            if on_error is None:
                raise
            on_error(e, False)


def _file_records(p: Path, image_folder: str | Path | None, check_images: bool,
                  on_error: Callable[[DataError, bool], None] | None,
                  split: str | None) -> Iterator[tuple[str, Record]]:
    if not p.exists():
        raise DataError(f"{p}: data file not found")
    hf = is_tabular(p)
    if split and not hf:
        raise DataError(f"{p}: --data-split {split!r} applies to Hugging Face datasets and parquet data only")
    if hf:
        export = Path(image_folder) if image_folder is not None else p.parent / f"{p.name.split('.')[0]}_images"
        rows: Iterable[tuple[int, Any, int | None]] = (
            (i, row, None) for i, row in enumerate(open_hf_dataset(p, split), 1))
    elif p.is_dir():
        raise DataError(f"{p}: a folder that is neither a saved Hugging Face dataset nor holds parquet files")
    else:
        rows = _rows(p, tolerant=on_error is not None)
    for i, row, lineno in rows:
        where = f"{p}: record {i}"  # (a JSON line that does not parse names its line too)
        if isinstance(row, DataError):  # a JSON line that does not parse (tolerant reading)
            assert on_error is not None
            on_error(row, True)
            continue
        question = CAPTION_QUESTIONS[int(hashlib.sha1(f"{p.name}:{i}".encode()).hexdigest(), 16) % len(CAPTION_QUESTIONS)]
        try:
            if not hf and isinstance(row, dict) and (inline := _inline_images(row)) is not None:
                # an OpenAI log's image_url parts: data URLs exported beside the data (or to image_folder)
                row = {**row, "images": inline}
                export_to = Path(image_folder) if image_folder is not None else p.parent / f"{p.stem}_images"
                try:
                    row = export_images(row, i, export_to, relative_to=Path(image_folder or p.parent))
                except DataError as e:
                    raise DataError(f"{where}: {e}") from None
            if hf:
                try:
                    row = export_images(row, i, export, split=split)
                except DataError as e:
                    raise DataError(f"{where}: {e}") from None
            rec = record_from_any(row, default_id=f"{p.stem}-{i}", caption_question=question)
            if hf and image_folder is None:
                rec.image = _absolute(rec.image, export)
            if check_images:
                base = Path(image_folder) if image_folder is not None else p.parent
                for img in rec.images:
                    if not (Path(img) if Path(img).is_absolute() else base / img).is_file():
                        raise DataError(f"{where}: {image_not_found(img, base, image_folder is not None)}")
        except DataError as e:
            if on_error is None:
                raise
            on_error(e, True)
            continue
        except (ValueError, ValidationError, KeyError, TypeError) as e:
            err = DataError(f"{where}: {_short(e)}")
            if on_error is None:
                raise err from None
            on_error(err, True)
            continue
        yield where, rec


def _inline_images(row: dict[str, Any]) -> list[Any] | None:
    """The images of a ``messages`` row's ``image_url`` parts (OpenAI chat logs), in order: a ``data:`` URL's
    bytes, a path as written; None when the row lists its images (``images`` / ``image``) or has no such part.
    A remote (http) URL is a ValueError: such images are downloaded first."""
    messages = row.get("messages")
    if not isinstance(messages, list) or any(row.get(k) not in (None, "", []) for k in IMAGE_FIELDS):
        return None
    found = []
    for m in messages:
        for part in (m.get("content") if isinstance(m, dict) and isinstance(m.get("content"), list) else []):
            if not (isinstance(part, dict) and part.get("type") == "image_url"):
                continue
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url:
                raise ValueError("an image_url part without a url")
            if url.startswith(("http://", "https://")):
                raise ValueError(f"an image_url part names a remote image ({url.split('/')[2]}); download it and "
                                 "give its path, or list the files in the record's images")
            if url.startswith("data:"):
                from mmedagent.serve.uploads import UploadError, split_data_url

                try:
                    url = {"bytes": split_data_url(url, max_bytes=1 << 31)[1]}
                except UploadError as e:
                    raise ValueError(f"an image_url part: {e.reason}") from None
            elif url.startswith("file://"):
                url = url[len("file://"):]
            found.append(url)
    return found or None


def _absolute(image: str | list[str] | None, folder: Path) -> str | list[str] | None:
    if image is None:
        return None
    fix = (lambda s: s if Path(s).is_absolute() else str((folder / s).resolve()))
    return fix(image) if isinstance(image, str) else [fix(s) for s in image]


def _short(e: Exception) -> str:
    if isinstance(e, ValidationError):
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        return f"{loc}: {err['msg']}" if loc else err["msg"]
    if isinstance(e, KeyError):
        return f"missing field {e}"
    return str(e)


def canonicalise_tool_results(record: Record) -> list[int]:
    """Rewrite ``record``'s tool-result turns (a human turn after a tool call) in the agent's wording:
    :func:`~mmedagent.protocol.render_tool_results` of what they parse into, the text the agent feeds
    back when serving (training feeds a turn as written, so JSON's ``{"boxes": …}`` would teach another
    wording than Python's ``{'boxes': …}`` it is served). Returns the 1-based numbers of the turns
    changed; a turn that does not parse is left as is (``check`` reports it)."""
    changed: list[int] = []
    pending: list[str] = []  # the names the last planning turn called
    for k, m in enumerate(record.conversations, 1):
        if m.role == "gpt" and m.is_tool_turn:
            pending = [call.API_name for call in m.actions or []]
        elif m.role == "human" and pending:
            try:
                results = parse_tool_results(m.value, pending)
            except TurnParseError:
                results = None
            if results is not None and (text := render_tool_results(results.outcomes, results.question)) != m.value:
                m.value = text
                changed.append(k)
            pending = []
    return changed


def to_sharegpt(record: Record) -> dict[str, Any]:
    """A record as LLaMA-Factory sharegpt (OpenAI-style ``messages`` + ``images``).

    Tool turns are written in their text form (the exact text the model is trained on) and tool
    results as user turns, so :func:`from_sharegpt` restores the record exactly.
    """
    role = {"human": "user", "gpt": "assistant", "system": "system"}
    out: dict[str, Any] = {}
    if record.id is not None:
        out["id"] = record.id
    out["messages"] = [{"role": role[m.role], "content": m.text()} for m in record.conversations]
    if record.images:
        out["images"] = record.images
    for k, v in (record.model_extra or {}).items():
        out.setdefault(k, v)
    return out


def from_sharegpt(row: dict[str, Any], default_id: str = "0") -> Record:
    """A sharegpt row (``messages`` or ``conversations``) as a :class:`Record` (LLaVA layout)."""
    return record_from_any(row, default_id)


def _rows_out(records: Iterable[Record], fmt: str) -> Iterator[dict[str, Any]]:
    for r in records:
        yield r.to_dict() if fmt == "llava" else to_sharegpt(r)


def write_records(records: Iterable[Record], path: str | Path, fmt: str = "llava") -> Path:
    """Write records as ``llava`` (MMedAgent) or ``sharegpt``; ``.jsonl`` → one per line, else a JSON array.

    Records are written one at a time as they come (a generator is never held whole), into a temporary
    file beside ``path`` that replaces it at the end: a failure leaves no half-written file, and the
    output may be the input of a lazy read (``convert a.jsonl a.jsonl``).
    """
    if fmt not in ("llava", "sharegpt"):
        raise ValueError(f"unknown format {fmt!r}; use 'llava' or 'sharegpt'")
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder; give the output file's name (.json or .jsonl)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"  # created with the umask's mode
    try:
        with open(tmp, "x", encoding="utf-8", newline="\n") as f:
            if path.suffix.lower() == ".jsonl":
                for row in _rows_out(records, fmt):
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            else:  # the same bytes as json.dumps(rows, indent=1), one record at a time
                n = 0
                for row in _rows_out(records, fmt):
                    f.write(("[\n " if n == 0 else ",\n ") + json.dumps(row, ensure_ascii=False, indent=1).replace("\n", "\n "))
                    n += 1
                f.write("[]\n" if n == 0 else "\n]\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def convert(src: str | Path, dst: str | Path, fmt: str = "llava", image_folder: str | Path | None = None,
            split: str | None = None, canonical_tool_results: bool = False) -> int:
    """Convert any readable data (JSON/JSONL/sharegpt/HF) to ``fmt``, record by record; returns the number
    of records. ``canonical_tool_results``: tool-result turns rewritten in the agent's wording
    (:func:`canonicalise_tool_results`)."""
    count = 0

    def counted() -> Iterator[Record]:
        nonlocal count
        for _, rec in iter_records(src, image_folder=image_folder, split=split):
            count += 1
            if canonical_tool_results:
                canonicalise_tool_results(rec)
            yield rec

    write_records(counted(), dst, fmt)
    return count
