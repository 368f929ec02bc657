"""``python -m mmedagent.data``: build, convert, split, check and synthesise instruction data.

Examples::

    python -m mmedagent.data build coco --annotations ann.json --image-root imgs --out grounding.json
    python -m mmedagent.data build masks --images imgs --masks masks --labels 1=liver,2=tumor --out seg.json
    python -m mmedagent.data build nifti --volume ct.nii.gz --label-volume seg.nii.gz --labels 1=liver \\
        --image-out slices --window abdomen --out seg.json
    python -m mmedagent.data build classification --folder by_class --out cls.json
    python -m mmedagent.data build reports --table reports.csv --out reports.json
    python -m mmedagent.data build rag --qa qa.json --corpus corpus.jsonl --out rag.json
    python -m mmedagent.data build vqa --table vqa.json --out vqa.json   (or: build captions --table ...)
    python -m mmedagent.data convert in.json out.jsonl --to sharegpt
    python -m mmedagent.data split hf_dataset_dir --out splits --image-folder images
    python -m mmedagent.data --check data.json        (same as: check data.json)
    python -m mmedagent.data synth --out synth --n 40 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from mmedagent.data import builders
from mmedagent.data.check import check_file
from mmedagent.data.formats import DataError, convert, lies_outside, read_records, write_records
from mmedagent.imaging import parse_window


_TABLE = "CSV/TSV/JSON/JSONL table, parquet file or saved HF dataset"


def _common(p: argparse.ArgumentParser, table: bool = False) -> None:
    p.add_argument("--out", required=True, help="output .json (array) or .jsonl file")
    p.add_argument("--format", choices=("llava", "sharegpt"), default="llava")
    p.add_argument("--api-names", choices=tuple(builders.API_NAMES), default="canonical",
                   help="tool names in API_name: canonical (grounding, ...) or mmedagent (grounding dino, MedSAM, ...)")
    p.add_argument("--phrasings", choices=("train", "heldout", "all"), default="train",
                   help="question templates: train, the held-out ones kept for evaluation, or all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-tools", action="store_true", help="take tool outputs from the registered tools, not ground truth")
    p.add_argument("--image-root", default=None,
                   help="folder the image paths are relative to (tables: default the table's folder)")
    p.add_argument("--rewrite-url", default=None, help="OpenAI-compatible base URL to paraphrase questions (optional)")
    p.add_argument("--rewrite-model", default=None)
    p.add_argument("--rewrite-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    if table:
        p.add_argument("--data-split", default=None, help=_SPLIT_HELP + "; stored images are exported to "
                       "<image root>/<name>_images/")


_SPLIT_HELP = "HF dataset / parquet data: the split to read (train, test, test[:100]; default train or the only one)"
_PLUGIN_HELP = ("module whose tool classes to register, so that calls to them are validated, as the serve scripts "
                "take it (repeatable)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m mmedagent.data", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", metavar="FILE", help="validate an existing data file and exit")
    ap.add_argument("--image-folder", default=None, help="with --check: also check that images exist")
    ap.add_argument("--data-split", default=None, help=_SPLIT_HELP)
    ap.add_argument("--plugin", action="append", default=[], metavar="MODULE", help=_PLUGIN_HELP)
    sub = ap.add_subparsers(dest="cmd")

    build = sub.add_parser("build", help="annotations -> tool-use dialogues")
    kinds = build.add_subparsers(dest="kind", required=True)
    p = kinds.add_parser("coco", help="COCO detection json -> grounding")
    p.add_argument("--annotations", required=True)
    _common(p)
    p = kinds.add_parser("masks", help="PNG label masks -> segmentation, grounding+segmentation")
    p.add_argument("--images", required=True)
    p.add_argument("--masks", required=True)
    p.add_argument("--labels", required=True, help="1=liver,2=tumor or a JSON file")
    p.add_argument("--tasks", default="segmentation,grounding_segmentation")
    _common(p)
    p = kinds.add_parser("nifti", help="NIfTI image + label volume -> slices and segmentation dialogues")
    p.add_argument("--volume", required=True)
    p.add_argument("--label-volume", required=True)
    p.add_argument("--labels", required=True)
    p.add_argument("--image-out", required=True, help="folder for the exported slice PNGs")
    p.add_argument("--window", default=None, help="preset (brain, lung, abdomen, bone) or CENTER,WIDTH")
    p.add_argument("--plane", choices=("axial", "coronal", "sagittal"), default="axial")
    p.add_argument("--step", type=int, default=1, help="use every STEP-th slice")
    p.add_argument("--tasks", default="segmentation,grounding_segmentation")
    _common(p)
    p = kinds.add_parser("classification", help="class folders or a CSV -> classification")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--folder", help="one folder of images per class (root/<class>/<image>)")
    g.add_argument("--table", help=f"{_TABLE} with columns image, label")
    p.add_argument("--labels", default=None, help="comma-separated candidate labels (others are errors)")
    _common(p, table=True)
    p = kinds.add_parser("reports", help="image + report table -> report generation")
    p.add_argument("--table", required=True, help=f"{_TABLE} with columns image, report (or findings, text)")
    _common(p, table=True)
    p = kinds.add_parser("rag", help="QA + corpus -> retrieval")
    p.add_argument("--qa", required=True, help=f"{_TABLE} with columns question, answer [, passages or sources]")
    p.add_argument("--corpus", required=True, help="JSON/JSONL/CSV rows id, text; a .txt (a passage a line); "
                   "or a folder / Markdown / PDF, read as the retrieval index reads it")
    p.add_argument("--top-k", type=int, default=3, help=f"passages per question, 1..{builders.RAG_MAX_K}")
    _common(p, table=True)
    for name in ("vqa", "captions"):
        p = kinds.add_parser(name, help="plain VQA / captions -> direct answers (no tool)")
        p.add_argument("--table", required=True, help=f"{_TABLE} with columns " + (
            "image, caption" if name == "captions" else "question, answer [, image]"))
        _common(p, table=True)

    p = sub.add_parser("convert", help="any readable data -> llava or sharegpt")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", choices=("llava", "sharegpt"), default="llava")
    p.add_argument("--image-folder", default=None, help="where images of HF datasets are exported")
    p.add_argument("--data-split", default=None, help=_SPLIT_HELP)
    p.add_argument("--canonical-tool-results", action="store_true",
                   help="rewrite tool-result turns in the wording the agent feeds tool outputs back in")

    p = sub.add_parser("split", help="train/val/test split by image")
    p.add_argument("src")
    p.add_argument("--out", required=True, help="folder for train.json, val.json, test.json")
    p.add_argument("--ratios", default="0.8,0.1,0.1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-folder", default=None, help="where images of HF datasets are exported")
    p.add_argument("--data-split", default=None, help=_SPLIT_HELP)
    p.add_argument("--format", choices=("llava", "sharegpt"), default="llava")

    p = sub.add_parser("check", help="validate an existing data file")
    p.add_argument("file")
    # SUPPRESS: the same flag given before 'check' is kept, not reset to the default
    p.add_argument("--image-folder", default=argparse.SUPPRESS, help="also check that images exist")
    p.add_argument("--data-split", default=argparse.SUPPRESS, help=_SPLIT_HELP)
    p.add_argument("--plugin", action="append", default=[], dest="check_plugin", metavar="MODULE", help=_PLUGIN_HELP)

    p = sub.add_parser("synth", help="synthetic images, annotations and dialogues for every tool")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--api-names", choices=tuple(builders.API_NAMES), default="canonical")
    p.add_argument("--variants", type=int, default=1,
                   help="training records per tool-use example, each phrased anew (segmentation: a loosely drawn box)")
    p.add_argument("--box-variants", type=int, default=None,
                   help="training records per box-prompted segmentation example (default: --variants)")
    p.add_argument("--box-drills", type=int, default=0,
                   help="planning-only records per box-prompted segmentation example, each copying a random box")
    return ap


def _window(spec: str | None):
    if spec is None:
        return None
    try:
        return parse_window(spec)
    except ValueError as e:
        raise DataError(f"--window: {e}") from None


def _examples(a: argparse.Namespace) -> list[builders.Example]:
    tasks = [t.strip() for t in getattr(a, "tasks", "").split(",") if t.strip()]
    table = {"image_root": _image_root(a), "split": a.data_split} if a.kind in TABLE_KINDS else {}
    if getattr(a, "folder", None) and a.data_split:
        raise DataError("--data-split applies to a --table that is Hugging Face or parquet data, not to --folder")
    if a.kind == "coco":
        return builders.read_coco(a.annotations, a.image_root or Path(a.annotations).parent)
    if a.kind == "masks":
        return builders.read_mask_pngs(a.images, a.masks, builders.parse_label_names(a.labels), tasks)
    if a.kind == "nifti":
        return builders.read_nifti_labels(a.volume, a.label_volume, builders.parse_label_names(a.labels), a.image_out,
                                          window=_window(a.window), plane=a.plane, step=a.step, tasks=tasks)
    if a.kind == "classification":
        labels = [s.strip() for s in a.labels.split(",")] if a.labels else None
        return builders.read_classification(folder=a.folder, table=a.table, labels=labels, **table)
    if a.kind == "reports":
        return builders.read_reports(a.table, **table)
    if a.kind == "rag":
        return builders.read_rag(a.qa, a.corpus, a.top_k, **table)
    return builders.read_vqa(a.table, caption=a.kind == "captions", **table)


TABLE_KINDS = ("classification", "reports", "rag", "vqa", "captions")


def _table(a: argparse.Namespace) -> str | None:
    """The table a table builder reads (the QA table for rag), else None."""
    if a.kind not in TABLE_KINDS:
        return None
    return a.qa if a.kind == "rag" else getattr(a, "table", None)


def _require_images(examples: Sequence[builders.Example], root: Path, root_given: bool) -> None:
    """Every image a table names is there, under ``root`` (a DataError naming the row otherwise); one
    that lies outside it (absolute, or ``..``) is a warning: training takes it as is."""
    for e in examples:
        if e.image and lies_outside(root, e.image):
            print(f"warning: {e.source}: image {e.image} lies outside the image root {root}", file=sys.stderr)
    missing = [e for e in examples if e.image and not (root / e.image).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        hint = "" if root_given else " (table image paths start beside the table; pass --image-root to say where else)"
        raise DataError(f"{missing[0].source}: image not found: {root / missing[0].image}{more}{hint}")


def _image_folder(a: argparse.Namespace) -> Path | None:
    """The folder a folder builder names its images from (``--images``, ``--image-out``, ``--folder``), else None."""
    folder = {"masks": "images", "nifti": "image_out", "classification": "folder"}.get(a.kind)
    return Path(getattr(a, folder)) if folder and getattr(a, folder, None) else None


def _image_root(a: argparse.Namespace) -> Path:
    if a.image_root:
        return Path(a.image_root)
    table = _table(a)
    if table is not None:
        return Path(table).parent
    if a.kind == "coco":
        return Path(a.annotations).parent
    return _image_folder(a) or Path(".")


def _rebase(examples: Sequence[builders.Example], folder: Path, root: Path) -> None:
    """Name the images of ``folder`` relative to the image root, where training and ``--run-tools`` look them
    up; one that lies outside the root is a warning."""
    for e in examples:
        if e.image:
            e.image = Path(os.path.relpath(folder / e.image, root)).as_posix()
            if lies_outside(root, e.image):
                print(f"warning: {e.source}: image {e.image} lies outside the image root {root}", file=sys.stderr)


def _ratios(spec: str) -> list[float]:
    try:
        ratios = [float(x) for x in spec.split(",")]
    except ValueError:
        ratios = []
    if len(ratios) != 3 or any(not r >= 0 for r in ratios) or not sum(ratios) > 0:
        raise DataError(f"--ratios {spec!r}: need three non-negative numbers for train,val,test (e.g. 0.8,0.1,0.1)")
    return ratios


def _build(a: argparse.Namespace, ap: argparse.ArgumentParser, index_dir: Path) -> int:
    examples = _examples(a)
    if not examples:  # training refuses an empty file: say so now, naming what was read
        source = {"coco": "annotations", "masks": "masks", "nifti": "label_volume", "rag": "qa"}.get(a.kind)
        source = getattr(a, source) if source else (getattr(a, "folder", None) or a.table)
        raise DataError(f"{source}: nothing to build (no annotated object, labelled pixel or row)")
    root = _image_root(a)
    folder = _image_folder(a)
    if folder is not None and a.image_root:
        _rebase(examples, folder, root)
    if _table(a) is not None:  # tables only name images: they must be there, under the root
        _require_images(examples, root, bool(a.image_root))
    options = {}
    if a.run_tools and a.kind == "rag":  # the tool searches the given corpus, not its default index
        options["retrieval"] = {"index": str(builders.build_retrieval_index(builders.read_corpus(a.corpus), index_dir))}
    runner = builders.ToolRunner(root, **options) if a.run_tools else None
    rewriter = None
    if a.rewrite_url:
        if not a.rewrite_model:
            ap.error("--rewrite-url needs --rewrite-model")
        rewriter = builders.OpenAIRewriter(a.rewrite_url, a.rewrite_model, a.rewrite_key_env)
    b = builders.DialogueBuilder(a.api_names, a.phrasings, a.seed, runner=runner, rewriter=rewriter)
    records = b.build_all(examples)
    write_records(records, a.out, a.format)
    print(f"{a.out}: {len(records)} records")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    a = ap.parse_args(argv)
    try:
        from mmedagent.tools import load_plugins

        try:
            load_plugins([*a.plugin, *getattr(a, "check_plugin", [])])
        except ValueError as e:
            raise DataError(str(e)) from None
        if a.check or a.cmd == "check":
            path = a.check or a.file
            report = check_file(path, image_folder=a.image_folder, split=a.data_split)
            for p in report.problems[:50]:
                print(p, file=sys.stderr)
            if len(report.problems) > 50:
                print(f"... and {len(report.problems) - 50} more problem(s)", file=sys.stderr)
            for w in report.warnings[:20]:
                print(f"warning: {w}", file=sys.stderr)
            if len(report.warnings) > 20:
                print(f"... and {len(report.warnings) - 20} more warning(s)", file=sys.stderr)
            calls = ", ".join(f"{k}: {v}" for k, v in sorted(report.tool_calls.items())) or "none"
            warned = f", {len(report.warnings)} warning(s)" if report.warnings else ""
            print(f"{path}: {report.records} records, {len(report.problems)} problem(s){warned}; tool calls: {calls}")
            if report.planning_only:
                print(f"{report.planning_only} planning-only record(s): they end with a tool call")
            if report.unregistered:
                names = (f"{n} (did you mean {report.suggestions[n]!r}?)" if n in report.suggestions else n
                         for n in sorted(report.unregistered))
                print(f"not validated (no such tool registered here): {', '.join(names)}")
            if not a.image_folder and report.records:
                print("images not checked: give --image-folder DIR (training's --image_folder, or the data file's "
                      "folder) to check them as training finds them")
            return 0 if report.ok else 1
        if a.cmd == "build":
            with tempfile.TemporaryDirectory(prefix="mmedagent-rag-") as tmp:
                return _build(a, ap, Path(tmp) / "index")
        if a.cmd == "convert":
            n = convert(a.src, a.dst, a.to, image_folder=a.image_folder, split=a.data_split,
                        canonical_tool_results=a.canonical_tool_results)
            print(f"{a.dst}: {n} records")
            return 0
        if a.cmd == "split":
            ratios = _ratios(a.ratios)
            records = read_records(a.src, image_folder=a.image_folder, split=a.data_split)
            parts = builders.split_by_image(records, ratios, a.seed)
            for name, recs in parts.items():
                write_records(recs, Path(a.out) / f"{name}.json", a.format)
            print(", ".join(f"{k}: {len(v)}" for k, v in parts.items()))
            return 0
        if a.cmd == "synth":
            from mmedagent.data.synth import synth

            manifest = synth(a.out, a.n, a.seed, a.size, a.api_names, a.variants, a.box_variants,
                             a.box_drills)
            print(json.dumps(manifest["files"], indent=1))
            return 0
    except (DataError, OSError) as e:  # bad input, or an output that cannot be written: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    ap.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
