"""``python scripts/evaluate.py``: evaluate a model on a file, or compare two reports."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmedagent.evaluation.readers import EvalFileError, load_samples
from mmedagent.protocol import system_message


def _positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (``--limit 0`` would otherwise mean one sample)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _json_object(text: str) -> dict[str, Any]:
    """An argparse type for ``--tool-options``: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        example = '{"grounding": {"device": "cpu"}}'
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}); e.g. '{example}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('must be a JSON object: {"tool name": {constructor options}}')
    return value


def _is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evaluate.py",
        description="Evaluate a planner's tool use and answers on an evaluation file, or compare two reports.",
    )
    p.add_argument("--model", help="checkpoint directory or hub id, 'demo', or an http(s) endpoint URL")
    p.add_argument("--model-base", help="with a LoRA adapter as --model: its base model (default: the base the "
                   "adapter records)")
    p.add_argument("--conv-template", help="local model: conversation template, e.g. vicuna_v1 (default: the "
                   "processor's chat template, or what training recorded)")
    p.add_argument("--data", help="evaluation file: project records, MMedAgent eval JSONL, or VQA-RAD/SLAKE QA")
    p.add_argument("--image-folder", help="folder the records' image paths are relative to")
    p.add_argument("--json-out", help="write the full report (metrics, per-sample answers) as JSON")
    p.add_argument("--name", help="name of this run in reports and comparisons (default: the model)")
    p.add_argument("--tool-mode", choices=("live", "gold"), default="live",
                   help="live: run the real tools; gold: feed the gold tool outputs from the data (default live)")
    p.add_argument("--tools", nargs="+", metavar="NAME", help="tools offered to the planner (default: all registered)")
    p.add_argument("--tool-options", type=_json_object, default={},
                   help='JSON: {"tool name": {constructor options}} for live tools')
    p.add_argument("--tool-weights", choices=("demo", "default"), default=None,
                   help="live tools without --tool-options: demo = the demo stack's tiny weights (built once, as "
                        "the server uses them); default = each tool's published weights. Default: demo with "
                        "--model demo, else default")
    p.add_argument("--endpoint", choices=("agent", "planner"), default="agent",
                   help="for a URL: 'agent' = an mmedagent controller (runs tools, returns mmedagent_trace); "
                        "'planner' = any OpenAI-compatible model endpoint driven by the local agent loop")
    p.add_argument("--served-model-name", help="'model' field sent to an endpoint")
    p.add_argument("--system-prompt", choices=("catalog", "plain", "none"), default=None,
                   help="catalog: the tool catalog as the controller sends it; plain: the Vicuna system text "
                        "(models trained without the catalog, as MMedAgent's); none: no system message (the demo "
                        "model). Default: catalog, or what the model directory's mmedagent.json says")
    p.add_argument("--constrain", action=argparse.BooleanOptionalAction, default=None,
                   help="local model: decode turns under the turn format and tool schemas (default: the model "
                   "dir's mmedagent.json, else off)")
    p.add_argument("--max-steps", type=_positive_int, default=3)
    p.add_argument("--max-new-tokens", type=_positive_int, default=256)
    p.add_argument("--k", type=_positive_int, default=5, help="k of RAG recall@k")
    p.add_argument("--limit", type=_positive_int, help="evaluate only the first N samples")
    p.add_argument("--judge-url", help="optional LLM-as-judge: an OpenAI-compatible endpoint")
    p.add_argument("--judge-model", help="'model' field for the judge endpoint")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="compare two reports instead of evaluating")
    p.add_argument("--out", default=".", help="folder for compare.md and compare.png (with --compare)")
    p.add_argument("--quiet", action="store_true", help="no per-sample progress on stderr")
    return p


def _tool_classes(names: Sequence[str] | None) -> list[Any]:
    from mmedagent.tools.registry import get_tool, list_tools

    return [get_tool(n) for n in names] if names else list_tools()


def make_runner(args: argparse.Namespace) -> Any:
    """The runner for ``--model``: controller endpoint, planner endpoint, or local checkpoint."""
    from mmedagent.evaluation.runner import AgentRunner, ControllerRunner, OpenAIPlanner

    if _is_url(args.model) and (args.constrain or args.model_base or args.conv_template):
        raise SystemExit("--constrain, --model-base and --conv-template apply to a local model; a served one runs "
                         "as its server was started")
    if _is_url(args.model) and args.endpoint == "agent":
        if args.tool_mode == "gold":
            raise SystemExit("--tool-mode gold needs a planner: a local model or --endpoint planner (the controller runs its own tools)")
        return ControllerRunner(args.model, args.served_model_name, image_folder=args.image_folder,
                                max_new_tokens=args.max_new_tokens)
    if _is_url(args.model):
        planner = OpenAIPlanner(args.model, args.served_model_name)
    else:
        from mmedagent.model import load_planner, planner_settings

        path: Any = args.model
        if args.model == "demo":
            from mmedagent.demo import demo_model_path

            path = demo_model_path(build_if_missing=True)
        settings = planner_settings(path)
        if args.constrain is None:
            args.constrain = bool(settings.get("constrain"))
        options: dict[str, Any] = {"constrain": args.constrain, "conv_template": args.conv_template}
        if args.model_base:
            path, options["adapter"] = args.model_base, path
        planner = load_planner(path, **options)
        if args.system_prompt is None:
            args.system_prompt = settings.get("system_prompt")
    classes = _tool_classes(args.tools)
    tools: list[Any] = classes
    if args.tool_mode == "live":
        from mmedagent.serve.launcher import in_process_tools

        weights = args.tool_weights or ("demo" if args.model == "demo" else "default")
        tools = in_process_tools(classes, args.tool_options, weights)
    system = system_message(args.system_prompt, classes)
    return AgentRunner(planner, args.tool_mode, tools, image_folder=args.image_folder, max_steps=args.max_steps,
                       system=system, max_new_tokens=args.max_new_tokens)


def run_evaluation(args: argparse.Namespace) -> dict[str, Any]:
    from mmedagent.evaluation.scoring import build_report

    samples = load_samples(args.data, args.limit)
    runner = make_runner(args)
    results = []
    interrupted = None
    started = time.monotonic()
    try:
        # live tools load before the first sample, so no sample is charged a first load
        load_errors = runner.preload(None if args.quiet else lambda line: print(line, file=sys.stderr, flush=True))
        for name, error in load_errors.items():
            print(f"warning: tool {name} failed to load ({error}); its calls are tool errors", file=sys.stderr)
        for i, smp in enumerate(samples, 1):
            try:
                results.append(runner.run(smp))
            except KeyboardInterrupt:  # Ctrl-C: report the samples done so far rather than lose them
                if not results:
                    raise
                interrupted = f"after {len(results)} of {len(samples)} samples"
                print(f"interrupted {interrupted}: scoring those{' (not judged)' if args.judge_url else ''}", file=sys.stderr)
                samples = samples[: len(results)]
                break
            if not args.quiet:
                print(f"[{i}/{len(samples)}] {smp.task}: {results[-1].error or 'ok'}", file=sys.stderr)
    finally:
        runner.close()
    judge_scores = None
    if args.judge_url and not interrupted:
        from mmedagent.evaluation.judge import judge

        judge_scores = judge(samples, results, args.judge_url, args.judge_model)
    meta = {
        "name": args.name or Path(str(args.model)).name or str(args.model),
        "model": str(args.model), "data": str(args.data), "tokens_counted_by": runner.tokens_counted_by,
        "constrained_decoding": bool(args.constrain),
        **({"tool_load_errors": load_errors} if load_errors else {}),
        **({"interrupted": interrupted} if interrupted else {}),
        "total_wall_s": time.monotonic() - started, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    return build_report(samples, results, tool_mode=args.tool_mode, k=args.k, meta=meta, judge=judge_scores)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.compare:
        from mmedagent.evaluation.compare import compare

        try:
            md, png = compare(*args.compare, args.out)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(md)
        print(f"wrote {Path(args.out) / 'compare.md'} and {png}", file=sys.stderr)
        return 0
    if not args.model or not args.data:
        print("error: --model and --data are required (or --compare A.json B.json)", file=sys.stderr)
        return 2
    try:
        report = run_evaluation(args)
    except (EvalFileError, OSError, json.JSONDecodeError, KeyError, ValueError) as e:  # bad data, model not found
        print(f"error: {e}", file=sys.stderr)
        return 2
    from mmedagent.evaluation.scoring import markdown_summary

    print(markdown_summary(report))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
        print(f"wrote {args.json_out}", file=sys.stderr)
    error_rate, n = report["overall"].get("error_rate") or 0.0, report["overall"]["n"]
    if error_rate:
        print(f"warning: {round(error_rate * n)} of {n} samples ended in an error and score as wrong; their errors "
              f"are listed above{' and in ' + args.json_out if args.json_out else ''}", file=sys.stderr)
    if report.get("interrupted"):
        return 130  # a partial report (as for Ctrl-C)
    return 1 if error_rate == 1 else 0  # nothing was evaluated
