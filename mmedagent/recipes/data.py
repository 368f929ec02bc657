"""Recipe data: the layouts users arrive with, checked up front and written as sharegpt training files.

* image + caption (Radiology_mini: ``image``, ``caption``; MedTrinity-25M: ``image``, ``id``, ``caption``;
  other column names by flag, e.g. ROCO's ``name``) → one instruction pair per row, from JSON / JSONL /
  CSV / TSV files, saved HF datasets or parquet data (stored images exported to files);
* medical QA and dialogue (MedQA-style multiple choice: ``question``, ``options``, ``answer_idx`` or the
  answer's text in ``answer``; ChatDoctor / Alpaca: ``instruction``, ``input``, ``output``; free-text
  ``question`` + ``answer`` (MedQuAD), ``Patient`` + ``Doctor``, ``Question`` + ``Complex_CoT`` + ``Response``
  (medical-o1); chat ``messages`` / ``conversations``).

Every problem (missing columns, missing images, empty captions or answers) is a
:class:`~mmedagent.data.formats.DataError` naming the file and the 1-based row, raised before any
model is loaded. ``--tiny`` data is generated here in the same layouts.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import itertools
import json
import random
import re
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmedagent.hub import prefer_cache_when_unreachable
from mmedagent.data.formats import (
    DataError,
    _is_hf_dir,
    is_tabular,
    iter_raw,
    open_hf_dataset,
    record_from_any,
    write_records,
)
from mmedagent.protocol import IMAGE_TOKEN, Record


@dataclass(frozen=True)
class Example:
    """One held-out item: the conversation up to the answer (``prompt`` is its last user turn), its
    image (or None) and the reference answer."""

    id: str
    prompt: str
    reference: str
    image: str | None = None
    options: tuple[str, ...] = ()  # multiple choice: the option letters; reference is the correct letter + text
    context: tuple[tuple[str, str], ...] = ()  # earlier (role, text) turns of a multi-turn dialogue

    @property
    def messages(self) -> list[dict[str, str]]:
        """OpenAI-style messages for the planner."""
        return [{"role": r, "content": t} for r, t in self.context] + [{"role": "user", "content": self.prompt}]


# --------------------------------------------------------------------------- sources


def materialise(data: str, split: str, cache: Path, config: str | None = None) -> Path:
    """A local path for ``data``: itself when it exists, else the HF dataset ``data`` saved under ``cache``."""
    path = Path(data)
    if path.exists():
        return path
    target = cache / re.sub(r"[^\w.-]+", "_", "-".join(p for p in (data, config, split) if p))
    if _is_hf_dir(target):
        return target
    prefer_cache_when_unreachable(data)
    try:
        import datasets

        ds = datasets.load_dataset(data, config, split=split)
    except Exception as e:  # noqa: BLE001 - offline, unknown name, gated: one clear message
        raise DataError(
            f"{data}: not a local file or folder, and loading it as a Hugging Face dataset "
            f"(config {config!r}, split {split!r}) failed: {type(e).__name__}: {e}"
        ) from None
    ds.save_to_disk(str(target))
    return target


def is_csv(path: Path) -> bool:
    """A comma- or tab-separated file with a header row (``.csv`` / ``.tsv``)."""
    return path.is_file() and path.suffix.lower() in (".csv", ".tsv")


def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(1-based record, row) of a CSV / TSV file; a row with more or fewer fields than the header is an error
    (an unquoted comma in a text would otherwise shift or cut it)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            for i, row in enumerate(reader, 1):
                if None in row or None in row.values():
                    fields = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None) or ())
                    raise DataError(f"{path}: record {i} (line {reader.line_num}): {fields} field(s), the header "
                                    f"has {len(reader.fieldnames)} (quote texts that hold the separator)")
                yield i, row
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason}); save it as UTF-8") from None
    except csv.Error as e:
        raise DataError(f"{path}: line {reader.line_num}: {e}") from None


def iter_rows(path: Path, split: str | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based row, row) of a JSON / JSONL / CSV / TSV file or a text-only HF dataset / parquet file."""
    rows = (enumerate(open_hf_dataset(path, split), 1) if is_tabular(path)
            else _csv_rows(path) if is_csv(path) else iter_raw(path))
    for i, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{path}: record {i}: expected an object, found {type(row).__name__}")
        yield i, row


def check_columns(path: Path, required: Sequence[str], split: str | None = None, hint: str = "") -> None:
    """Every row has the ``required`` columns (tabular data: the schema has them); ``hint`` ends the error
    (what to do, e.g. which flag names the columns)."""
    if is_tabular(path):
        have = open_hf_dataset(path, split).column_names
        missing = [c for c in required if c not in have]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)}; the data has {', '.join(have)}{hint}")
        return
    n = 0
    for i, row in iter_rows(path):
        n += 1
        missing = [c for c in required if c not in row]
        if missing:
            raise DataError(f"{path}: record {i}: missing column(s) {', '.join(missing)}; it has {', '.join(row)}"
                            f"{hint}")
    if n == 0:
        raise DataError(f"{path}: no records")


# --------------------------------------------------------------------------- image + caption


@dataclass(frozen=True)
class CaptionItem:
    id: str
    image: str  # absolute path
    caption: str


def read_captions(
    path: Path,
    image_folder: str | None,
    export_dir: Path,
    split: str | None = None,
    image_column: str = "image",
    caption_column: str = "caption",
) -> list[CaptionItem]:
    """Image + caption rows, validated: columns, non-empty captions, images that exist and are images
    (every image's header is checked; the first and last are decoded). ``image_column`` / ``caption_column``
    name the columns (ROCO's CSV: ``name``; MIMIC-CXR tables: ``path``, ``findings``). Images stored in tabular
    data (bytes / decoded) are exported to ``export_dir``; image paths are read relative to ``image_folder``
    (default: the data's folder). Every error names ``path`` and the 1-based row; the rows that cannot be used
    are all listed in one error."""
    from mmedagent.imaging import ImageLoadError, load_image

    columns = (image_column, caption_column)
    hint = (" (name the columns to use with --image-column / --caption-column)"
            if columns == ("image", "caption") else "")
    check_columns(path, columns, split, hint)
    rows = _tabular_rows(path, image_column, split) if is_tabular(path) else iter_rows(path)
    items = _row_captions(path, rows, image_folder, export_dir, columns, split)
    if not items:
        raise DataError(f"{path}: no records")
    for i, item in enumerate(items, 1):
        check_image_header(Path(item.image), f"{path}: record {i}")
    for i in sorted({1, len(items)}):  # decode a first and last image now rather than mid-training
        try:
            load_image(items[i - 1].image)
        except (ImageLoadError, OSError) as e:
            raise DataError(f"{path}: record {i}: cannot decode image {Path(items[i - 1].image).name}: {e}") from None
    return items


def check_image_header(image: Path, where: str) -> None:
    """A cheap check that ``image`` is an image: its first bytes name a format :func:`mmedagent.imaging.load_image`
    reads, and a PIL format's header parses. DataError naming ``where`` otherwise."""
    from mmedagent.imaging import detect_format, image_file_problem

    problem = image_file_problem(image)
    if problem is not None:
        raise DataError(f"{where}: {image.name}: {problem}")
    with open(image, "rb") as f:
        fmt = detect_format(f.read(1024))
    if fmt is not None and fmt not in ("dicom", "nifti"):  # None: the voxel half of a NIfTI pair
        from PIL import Image

        try:
            with Image.open(image) as im:  # parses the header only
                im.size  # noqa: B018
        except Exception as e:  # noqa: BLE001 - any decoder complaint is a bad image
            raise DataError(f"{where}: {image.name} is a damaged {fmt.upper()} image: {e}") from None


def _tabular_rows(path: Path, image_column: str, split: str | None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based record, row) of a saved HF dataset / parquet data, stored images as their bytes (no decoding:
    they are exported as they are)."""
    import datasets

    ds = open_hf_dataset(path, split)
    if isinstance(ds.features.get(image_column), datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    return enumerate(ds, 1)


MAX_LISTED = 10
"""Problem rows listed in one data error."""


def every_row(path: Path, rows: Iterable[tuple[int, Any]], convert: Callable[[int, Any], Any]) -> list[Any]:
    """``convert(i, row)`` of every (1-based record, row); one DataError lists every row that cannot be used (the
    first :data:`MAX_LISTED`), so they can all be fixed at once."""
    out, problems = [], []
    for i, row in rows:
        try:
            out.append(convert(i, row))
        except DataError as e:
            problems.append(str(e))
    if len(problems) == 1:
        raise DataError(problems[0])
    if problems:
        listed = "\n  ".join(problems[:MAX_LISTED])
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise DataError(f"{path}: {len(problems)} of {len(problems) + len(out)} records cannot be used; "
                        f"fix or remove them:\n  {listed}{more}")
    return out


def _row_captions(path: Path, rows: Iterable[tuple[int, dict[str, Any]]], image_folder: str | None,
                  export_dir: Path, columns: tuple[str, str] = ("image", "caption"),
                  split: str | None = None) -> list[CaptionItem]:
    """Caption items of the (1-based record, row) pairs of the data at ``path``, ``columns`` being its (image,
    caption) columns: stored images (bytes, decoded) are exported to ``export_dir`` under names unique per row;
    path strings are resolved against ``image_folder``, else the data's folder. Every unusable row is listed
    (:func:`every_row`)."""
    return every_row(path, rows, lambda i, row: _caption_item(path, i, row, image_folder, export_dir, columns, split))


def _caption_item(path: Path, i: int, row: dict[str, Any], image_folder: str | None, export_dir: Path,
                  columns: tuple[str, str], split: str | None) -> CaptionItem:
    """Record ``i`` of :func:`_row_captions`; DataError naming it when it cannot be used."""
    from mmedagent.data.formats import export_images

    image_column, caption_column = columns
    where = f"{path}: record {i}"
    bases = [Path(image_folder)] if image_folder else [path if path.is_dir() else path.parent]
    if not image_folder and path.is_dir():
        bases.append(path.parent)
    value = row.get(image_column)
    if isinstance(value, dict) and not value.get("bytes"):
        value = value.get("path")  # an Image feature that stores only a path
    if value is None or value == "" or value == []:
        raise DataError(f"{where}: no image (the {image_column} column is empty)")
    if isinstance(value, list):
        if len(value) != 1:
            raise DataError(f"{where}: expected one image, found {len(value)}")
        value = value[0]
    if isinstance(value, (str, Path)):
        found = [b / value for b in bases if (b / value).is_file()] if not Path(value).is_absolute() else (
            [Path(value)] if Path(value).is_file() else [])
        if not found:
            shown = Path(value) if Path(value).is_absolute() else bases[0] / value
            raise DataError(f"{where}: image not found: {shown}"
                            + ("" if image_folder else " (relative paths are read from the data's folder; "
                               "give --image-folder)"))
        image = found[0]
    else:
        try:
            name = export_images({"image": value, "id": row.get("id") or row.get("image_id")}, i, export_dir,
                                 split=split)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        image = export_dir / name["image"]
    caption = str(row.get(caption_column) or "").strip()
    if not caption:
        raise DataError(f"{where}: empty caption (the {caption_column} column)")
    rid = row.get("id") if row.get("id") not in (None, "") else row.get("image_id")
    rid = rid if rid not in (None, "") else f"{path.stem}-{i}"
    return CaptionItem(str(rid), str(image.resolve()), caption)


def caption_record(item: CaptionItem, instruction: str) -> Record:
    """The instruction pair: user = image + instruction, assistant = the caption (plain text)."""
    return record_from_any(
        {
            "id": item.id,
            "images": [item.image],
            "messages": [
                {"role": "user", "content": f"{IMAGE_TOKEN}\n{instruction}"},
                {"role": "assistant", "content": item.caption},
            ],
        },
        item.id,
    )


# --------------------------------------------------------------------------- QA and dialogue


_MC_PROMPT = "{question}\n\nOptions:\n{options}\n\nAnswer with the letter of the correct option, then the option text."


def _options(raw: Any, where: str) -> dict[str, str]:
    """{letter: text} of ``{"A": ...}`` (letters a table pads with null are left out), a list of texts, or
    a list of ``{"key": "A", "value": ...}`` (BigBio MedQA); in CSV, any of these as JSON text."""
    if isinstance(raw, str) and raw.lstrip()[:1] in ("{", "["):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: options are not valid JSON: {e}") from None
    if isinstance(raw, list) and raw and all(isinstance(o, dict) and {"key", "value"} <= set(o) for o in raw):
        raw = {o["key"]: o["value"] for o in raw}
    if isinstance(raw, dict):
        opts = {str(k).strip().upper(): str(v).strip() for k, v in raw.items() if v is not None}
    elif isinstance(raw, list) and all(isinstance(o, (str, int, float)) for o in raw):
        opts = {chr(ord("A") + k): str(v).strip() for k, v in enumerate(raw)}
    else:
        raise DataError(f"{where}: options must be an object {{letter: text}}, a list of texts "
                        "or a list of {key, value} objects")
    if len(opts) < 2 or any(not re.fullmatch(r"[A-Z]", k) or not v for k, v in opts.items()):
        raise DataError(f"{where}: options need at least two non-empty entries keyed by single letters")
    return opts


FREE_TEXT_COLUMNS = (("question", "answer"), ("question", "response"), ("patient", "doctor"))
"""(question, answer) columns of free-text QA: MedQuAD, medical-o1-reasoning-SFT, ai-medical-chatbot."""


def _lower_columns(row: dict[str, Any]) -> dict[str, Any]:
    """The row with lower-case column names (MedQuAD's ``Question`` / ``Answer``, medical-o1's ``Response``); a
    lower-case column wins over its capitalised twin."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        key = k.lower() if isinstance(k, str) else k
        if key not in out or key == k:
            out[key] = v
    return out


def dialogue_item(row: dict[str, Any], where: str, default_id: str) -> tuple[Record, Example]:
    """A QA / dialogue row as a training record and as a held-out example (last assistant turn = reference).
    Null fields count as absent: a table mixing layouts pads each row's unused columns with null. Column names
    are read in any case."""
    columns = [k for k, v in row.items() if v is not None]
    row = _lower_columns({k: v for k, v in row.items() if v is not None})
    rid = str(row.get("id") or default_id)
    if "question" in row and "options" in row:
        opts = _options(row["options"], where)
        answer = str(row.get("answer_idx") or "").strip().upper()
        if not answer and "answer" in row:  # MedQA copies that keep only the answer's text
            answer = next((k for k, v in opts.items() if v.casefold() == str(row["answer"]).strip().casefold()), "")
        if answer not in opts:
            given = (f"answer_idx {row.get('answer_idx')!r}" if "answer_idx" in row
                     else f"no answer_idx, and answer {row.get('answer')!r}")
            raise DataError(f"{where}: {given} is not one of the options {sorted(opts)}; give the correct option's "
                            "letter in answer_idx")
        question = str(row["question"] or "").strip()
        if not question:
            raise DataError(f"{where}: empty question")
        prompt = _MC_PROMPT.format(question=question, options="\n".join(f"{k}. {v}" for k, v in opts.items()))
        reference = f"{answer}. {opts[answer]}"
        record = record_from_any(
            {"id": rid, "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reference}]},
            rid,
        )
        return record, Example(rid, prompt, reference, options=tuple(opts))
    chat = ("output" in row and ("instruction" in row or "input" in row)) or "messages" in row or "conversations" in row
    pair = next(((q, a) for q, a in FREE_TEXT_COLUMNS if q in row and a in row), None)
    if not chat and pair:  # free-text QA (MedQuAD, medical-o1, Patient/Doctor dialogue, PubMedQA's long answer)
        question, answer = (str(row[c]).strip() for c in pair)
        if not answer:
            raise DataError(f"{where}: empty answer (the {pair[1]} column)")
        reasoning = str(row.get("complex_cot") or "").strip()
        if reasoning:  # medical-o1-reasoning-SFT: the reasoning is trained on too, laid out as HuatuoGPT-o1 trains it
            answer = f"## Thinking\n\n{reasoning}\n\n## Final Response\n\n{answer}"
        row = {"id": rid, "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
    elif not chat:
        raise DataError(
            f"{where}: missing columns: expected question+options+answer_idx (multiple choice), instruction/input+"
            f"output (ChatDoctor / Alpaca), question+answer, question+response (medical-o1), patient+doctor, or "
            f"messages / conversations; it has {', '.join(columns)}"
        )
    try:
        record = record_from_any(row, rid)
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{where}: {e}") from None
    if record.images:
        raise DataError(f"{where}: has an image; this recipe trains a text-only model")
    turns = record.conversations
    if turns[-1].role != "gpt" or not turns[-1].value.strip():
        raise DataError(f"{where}: the last turn must be a non-empty answer")
    if len(turns) < 2 or turns[-2].role != "human":
        raise DataError(f"{where}: the answer must follow a user turn")
    if not turns[-2].text().strip():
        raise DataError(f"{where}: empty question (the user turn before the answer)")
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    context = tuple((roles[m.role], m.text()) for m in turns[:-2])
    return record, Example(rid, turns[-2].text(), turns[-1].value.strip(), context=context)


def read_dialogue(path: Path, split: str | None = None) -> list[tuple[Record, Example]]:
    """The (training record, held-out example) of every row; every unusable row is listed (:func:`every_row`)."""
    out = every_row(path, iter_rows(path, split),
                    lambda i, row: dialogue_item(row, f"{path}: record {i}", f"{path.stem}-{i}"))
    if not out:
        raise DataError(f"{path}: no records")
    return out


# --------------------------------------------------------------------------- splits and files


def split(items: list[Any], fractions: Sequence[int | float], seed: int,
          key: Callable[[Any], Hashable] | None = None, flags: str = "") -> list[list[Any]]:
    """Shuffle deterministically; ``fractions`` (0: none, < 1: share, >= 1: count) of the held-out parts,
    the rest is the first part (training). A held-out part with a share above 0 gets at least one item.
    Items that share their ``key`` with another (exact duplicates) are never held out: a copy would be
    trained on, so the held-out part would score memorisation. ``flags`` name the settings of the held-out
    sizes in the error when nothing is left to train on."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    keys = [key(x) for x in items] if key else list(order)
    copies = Counter(keys)
    candidates = iter([i for i in order if copies[keys[i]] == 1])
    parts, held, wanted = [], set(), 0
    for f in fractions:
        if f < 0:
            raise DataError(f"cannot hold out {f} records")
        n = 0 if f == 0 else max(1, round(f * len(items))) if f < 1 else int(f)
        part = list(itertools.islice(candidates, n))
        parts.append([items[i] for i in part])
        held.update(part)
        wanted += n
    if wanted >= len(order):
        raise DataError(
            f"{len(items)} records leave none for training after holding out {wanted}; "
            "use more data or fewer held-out records" + (f" ({flags})" if flags else "")
        )
    return [[items[i] for i in order if i not in held], *parts]


def duplicate_count(items: Sequence[Any], key: Callable[[Any], Hashable]) -> dict[str, int]:
    """The data counts' entry for the ``items`` that share their ``key`` with another (trained on, never held
    out by :func:`split`); empty when there are none."""
    n = sum(n for n in Counter(map(key, items)).values() if n > 1)
    return {"duplicates_never_held_out": n} if n else {}


def caption_key(items: Sequence[CaptionItem]) -> Callable[[CaptionItem], Hashable]:
    """The :func:`split` key of a caption item: its caption and, where the caption repeats, its image's content
    (the same caption under another image is no duplicate; only repeated captions cost a read of the image)."""
    repeated = {c for c, n in Counter(i.caption for i in items).items() if n > 1}
    digest = functools.cache(lambda image: hashlib.sha256(Path(image).read_bytes()).hexdigest())
    return lambda item: (item.caption, digest(item.image) if item.caption in repeated else None)


def write_sharegpt(records: Sequence[Record], path: Path) -> Path:
    return write_records(records, path, fmt="sharegpt")


def write_examples(examples: Sequence[Example], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(dataclasses.asdict(e)) + "\n" for e in examples))
    return path


# --------------------------------------------------------------------------- tiny data


_MODALITIES = ("Chest X-ray", "Brain MRI", "Abdomen CT", "Knee X-ray")
_FINDINGS = (
    "a small opacity in the right lower lobe",
    "a mass in the left temporal lobe with edema",
    "a lesion near the gallbladder",
    "no acute abnormality",
    "a fracture of the tibia",
    "cardiomegaly with pleural effusion",
)


def _scan(rng: random.Random, size: int) -> Any:
    """A grey 'scan': a dark field with a bright ellipse (organ) and a small lesion."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), (12, 12, 12))
    draw = ImageDraw.Draw(im)
    g = rng.randint(90, 180)
    m = rng.randint(2, size // 6)
    draw.ellipse([m, m, size - m, size - m], fill=(g, g, g))
    x, y, r = rng.randint(size // 4, size * 3 // 4), rng.randint(size // 4, size * 3 // 4), rng.randint(2, size // 8)
    draw.ellipse([x - r, y - r, x + r, y + r], fill=(250, 250, 250))
    return im


def tiny_caption_dataset(out: Path, n: int, seed: int, size: int, long: bool, fmt: str) -> Path:
    """An HF image + caption dataset in the Radiology_mini layout (``image_id``, ``image``, ``caption``;
    ``fmt="disk"``) or MedTrinity-25M's (``image``, ``id``, long ``caption``; ``fmt="parquet"``)."""
    import datasets

    rng = random.Random(seed)
    rows: dict[str, list[Any]] = {"image": [], "caption": [], "id": []}
    for k in range(n):
        mod, finding = rng.choice(_MODALITIES), rng.choice(_FINDINGS)
        caption = f"{mod} showing {finding}."
        if long:
            caption += (
                f" The {mod.split()[0].lower()} region of interest is in the "
                f"{rng.choice(('left', 'right', 'central'))} part of the image; "
                f"the finding suggests {rng.choice(('pneumonia', 'a tumor', 'a cyst', 'a normal study'))}."
            )
        rows["image"].append(_scan(rng, size))
        rows["caption"].append(caption)
        rows["id"].append(f"tiny-{k:04d}")
    features = datasets.Features(
        {"image": datasets.Image(), "caption": datasets.Value("string"), "id": datasets.Value("string")}
    )
    ds = datasets.Dataset.from_dict(rows, features=features)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        target = out / "medtrinity_tiny.parquet"
        ds.to_parquet(str(target))
        return target
    ds = ds.rename_column("id", "image_id")
    target = out / "radiology_tiny"
    ds.save_to_disk(str(target))
    return target


def tiny_dialogue_file(out: Path, n: int, seed: int) -> Path:
    """MedQA-style multiple-choice rows and ChatDoctor-style free-text rows, one JSON object per line; the
    patient's age makes every row its own (exact duplicates are never held out)."""
    rng = random.Random(seed)
    facts = [
        ("fever and cough with a lobar opacity", "pneumonia", ["asthma", "pneumonia", "angina", "gout"]),
        ("crushing chest pain on exertion", "angina", ["angina", "migraine", "otitis", "eczema"]),
        ("a painful swollen big toe", "gout", ["sepsis", "gout", "asthma", "anemia"]),
        ("wheezing triggered by cold air", "asthma", ["gout", "anemia", "asthma", "angina"]),
    ]
    rows = []
    for k in range(n):
        symptom, diagnosis, options = facts[k % len(facts)]
        if k % 2 == 0:
            opts = dict(zip("ABCD", options))
            rows.append(
                {
                    "id": f"mc-{k}",
                    "question": f"A {18 + k}-year-old patient presents with {symptom}. "
                    "What is the most likely diagnosis?",
                    "options": opts,
                    "answer_idx": "ABCD"[options.index(diagnosis)],
                    "answer": diagnosis,
                }
            )
        else:
            rows.append(
                {
                    "id": f"cd-{k}",
                    "instruction": "If you are a doctor, please answer the medical questions "
                    "based on the patient's description.",
                    "input": f"Hi doctor, I am {18 + k} and I have {symptom}. What could it be?",
                    "output": f"Hi, thanks for asking. These symptoms suggest {diagnosis}. "
                    f"Please see your doctor for an examination{rng.choice(('.', ' soon.'))}",
                }
            )
    out.mkdir(parents=True, exist_ok=True)
    target = out / "dialogue_tiny.jsonl"
    target.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return target
