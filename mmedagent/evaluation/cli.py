"""``python scripts/evaluate.py``: evaluate a model on a file, or compare two reports."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmedagent.argtypes import at_least
from mmedagent.evaluation.readers import EvalFileError, load_samples
from mmedagent.protocol import system_message


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


PROMPTING = ("system_prompt", "template")
"""How a run's planner was prompted, as its report records it (a controller's runs: the server's, unrecorded)."""


def _data_folder(args: argparse.Namespace) -> Path | None:
    """The ``--data`` file's folder, where images are looked for without ``--image-folder``."""
    return Path(args.data).parent if args.data else None


def _recorded_model(model: str) -> str:
    """``--model`` as reports, ``run.json`` and stderr show it: a URL without a user, password or query."""
    if not _is_url(model):
        return model
    from mmedagent.serve.remote import shown_url

    return shown_url(model)


class _Given(argparse.Action):
    """Stores the value and notes that the flag was given (``<dest>_given``), so a recorded setting can
    stand in for a default."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_given", True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(  # prog: the command run (scripts/evaluate.py or mmedagent-eval)
        description="Evaluate a planner's tool use and answers on an evaluation file, or compare two reports.",
    )
    p.add_argument("--model", help="checkpoint directory or hub id, 'demo', or an http(s) endpoint URL")
    p.add_argument("--model-base", help="with a LoRA adapter as --model: its base model (default: the base the "
                   "adapter records)")
    p.add_argument("--conv-template", help="local model: conversation template, e.g. vicuna_v1 (default: the "
                   "processor's chat template, or what training recorded)")
    p.add_argument("--data", help="evaluation file: project records, MMedAgent eval JSONL, or VQA-RAD/SLAKE/PathVQA QA")
    p.add_argument("--image-folder", help="folder the records' image paths are relative to")
    p.add_argument("--json-out", help="write the full report (metrics, per-sample answers) as JSON")
    p.add_argument("--name", help="name of this run in reports and comparisons (default: the model)")
    p.add_argument("--tool-mode", choices=("live", "gold"), default="live", action=_Given,
                   help="live: run the real tools; gold: feed the gold tool outputs from the data (default live; "
                        "scoring a run's samples.jsonl with --predictions: the run's)")
    p.add_argument("--tools", nargs="+", metavar="NAME", help="tools offered to the planner (default: all registered)")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="module whose tool classes to register, as the serve scripts take it (repeatable)")
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
    p.add_argument("--api-key-env", help="for a URL: environment variable holding the endpoint's bearer key (default "
                   "MMEDAGENT_API_KEY, the key of a controller or model worker started with --api-key; e.g. "
                   "OPENAI_API_KEY for OpenAI; none set: no key)")
    p.add_argument("--system-prompt", choices=("catalog", "plain", "none"), default=None,
                   help="catalog: the tool catalog as the controller sends it; plain: the Vicuna system text "
                        "(models trained without the catalog, as MMedAgent's); none: no system message (the demo "
                        "model). Default: catalog, or what the model directory's mmedagent.json says")
    p.add_argument("--constrain", action=argparse.BooleanOptionalAction, default=None,
                   help="local model: decode turns under the turn format and tool schemas (default: the model "
                   "dir's mmedagent.json, else off)")
    p.add_argument("--max-steps", type=at_least(1), default=3)
    p.add_argument("--max-new-tokens", type=at_least(1), default=256)
    p.add_argument("--k", type=at_least(1), default=5, help="k of RAG recall@k")
    p.add_argument("--limit", type=at_least(1), help="evaluate only the first N samples")
    p.add_argument("--judge-url", help="optional LLM-as-judge: an OpenAI-compatible endpoint")
    p.add_argument("--judge-model", help="'model' field for the judge endpoint")
    p.add_argument("--judge-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the judge's API key (default OPENAI_API_KEY; none set: no key)")
    p.add_argument("--predictions", metavar="FILE",
                   help="score these predictions (JSON lines: {\"id\" or \"index\", \"answer\", optional \"raw\" turns, "
                        "\"calls\" or \"steps\"}; a run's OUT/samples.jsonl) against --data, without loading a model")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out, skipping the samples it has written (refused if its settings differ)")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="compare two reports instead of evaluating")
    p.add_argument("--out", help="evaluation: run folder (run.json, samples.jsonl written as each sample finishes, "
                   "report.json); with --compare: folder for compare.md and compare.png (default .)")
    p.add_argument("--quiet", action="store_true", help="no per-sample progress on stderr")
    return p


def _tool_classes(names: Sequence[str] | None) -> list[Any]:
    from mmedagent.tools.registry import get_tool, list_tools

    return [get_tool(n) for n in names] if names else list_tools()


def make_runner(args: argparse.Namespace) -> Any:
    """The runner for ``--model``: controller endpoint, planner endpoint, or local checkpoint."""
    from mmedagent.evaluation.runner import AgentRunner, ControllerRunner

    if _is_url(args.model) and (args.constrain or args.model_base or args.conv_template):
        raise ValueError("--constrain, --model-base and --conv-template apply to a local model; a served one runs "
                         "as its server was started")
    if not _is_url(args.model) and args.api_key_env:
        raise ValueError("--api-key-env applies to a --model URL; a local model needs no key")
    api_key = os.environ.get(args.api_key_env or "MMEDAGENT_API_KEY") or None  # only the variable named: no other key
    if _is_url(args.model) and args.endpoint == "agent":
        if args.tools or args.tool_options or args.tool_weights or args.system_prompt:
            raise ValueError("--tools, --tool-options, --tool-weights and --system-prompt apply to the local agent loop; "
                             "a controller offers the tools it was started with (or use --endpoint planner)")
        if args.tool_mode == "gold":
            raise ValueError("--tool-mode gold needs a planner: a local model or --endpoint planner (the controller runs its own tools)")
        return ControllerRunner(args.model, args.served_model_name, api_key, image_folder=args.image_folder,
                                data_folder=_data_folder(args),
                                max_new_tokens=args.max_new_tokens)
    classes = _tool_classes(args.tools)  # an unknown name is refused before the model loads
    system_text = None
    if _is_url(args.model):
        from mmedagent.serve.remote import OpenAIPlanner, api_root

        planner = OpenAIPlanner(api_root(args.model), args.served_model_name, api_key, list_models=False)
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
        planner.tools = classes  # a constrained plan names only the tools offered (--tools)
        if args.system_prompt is None:
            args.system_prompt, system_text = settings.get("system_prompt"), settings.get("system_text")
    tools: list[Any] = classes
    if args.tool_mode == "live":
        from mmedagent.serve.launcher import in_process_tools

        weights = args.tool_weights or ("demo" if args.model == "demo" else "default")
        tools = in_process_tools(classes, args.tool_options, weights)
    system = system_message(args.system_prompt, classes, system_text)
    runner = AgentRunner(planner, args.tool_mode, tools, image_folder=args.image_folder,
                         data_folder=_data_folder(args), max_steps=args.max_steps, system=system,
                         max_new_tokens=args.max_new_tokens)
    info = planner.info() if hasattr(planner, "info") else {}
    # how the planner was prompted, in the report: two runs prompted otherwise are no before/after of one model
    runner.prompting = {"system_prompt": args.system_prompt or "catalog",
                        **({"template": info["template"]} if info.get("template") else {})}
    return runner


RUN_SETTINGS = ("model", "model_base", "conv_template", "tool_mode", "tools", "tool_options", "tool_weights",
                "endpoint", "served_model_name", "system_prompt", "constrain", "max_steps", "max_new_tokens", "k")
"""Flags a resumed run must share with the run it continues (with the data file's content). Decoding is
greedy (temperature 0), so no seed is involved."""


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings ``run.json`` records and ``--resume`` compares (as given, before defaults are resolved)."""
    from mmedagent.evaluation.results import file_sha256

    return {**{key: getattr(args, key) for key in RUN_SETTINGS}, "model": _recorded_model(args.model),
            "data_sha256": file_sha256(args.data),
            **({"plugin": sorted(set(args.plugin))} if args.plugin else {})}  # runs from before --plugin resume as they were


def _finish(args: argparse.Namespace, samples: list[Any], results: list[Any], meta: dict[str, Any]) -> dict[str, Any]:
    """Judge (``--judge-url``, not for an interrupted run) and build the report."""
    from mmedagent.evaluation.scoring import build_report

    judge_scores = None
    if args.judge_url and not meta.get("interrupted"):
        from mmedagent.evaluation.judge import judge

        try:
            judge_scores = judge(samples, results, args.judge_url, args.judge_model, os.environ.get(args.judge_key_env, ""))
        except KeyboardInterrupt:  # the samples are scored: keep them, unjudged
            meta["interrupted"] = "while judging"
            print("interrupted while judging: the report has every sample, not judged", file=sys.stderr)
    return build_report(samples, results, tool_mode=args.tool_mode, k=args.k, meta=meta, judge=judge_scores)


def _warn_load_errors(errors: dict[str, str], warned: dict[str, str]) -> dict[str, str]:
    """Warn once for each tool of ``errors`` that failed to load and is not in ``warned``; returns ``errors``."""
    for tool, error in errors.items():
        if tool not in warned:
            print(f"warning: tool {tool} failed to load ({error}); its calls are tool errors", file=sys.stderr)
    return errors


def run_evaluation(args: argparse.Namespace) -> dict[str, Any]:
    """Run the model over the data (or score ``--predictions``) and return the report. With ``--out``
    each finished sample is written at once, and ``--resume`` runs only the samples not written yet."""
    if args.predictions:
        return score_predictions(args)
    from mmedagent.evaluation.results import SAMPLES_FILE, RunFolder, file_sha256
    from mmedagent.evaluation.runner import check_mask_sizes

    samples = load_samples(args.data, args.limit)
    data_sha256 = file_sha256(args.data)
    if args.tool_mode == "live":  # Dice is scored in live mode only
        check_mask_sizes(samples, args.image_folder, args.data)
    folder = RunFolder(args.out) if args.out else None
    results = folder.check(run_settings(args), args.resume, samples, args.data) if folder else {}
    if folder and args.resume:
        print(f"resuming {folder.path}: {len(results)} of {len(samples)} samples done" if folder.resumed
              else f"nothing to resume in {folder.path}: starting the run there", file=sys.stderr)
        if folder.cut_off:
            print(f"the last line of {folder.path / SAMPLES_FILE} was cut off (the sample in flight when the run "
                  "stopped): that sample runs again", file=sys.stderr)
    # a resumed run with every sample written only needs its report: no model is loaded
    runner = make_runner(args) if len(results) < len(samples) else None
    model = _recorded_model(args.model)
    run_name = args.name or Path(model).name or model
    load_errors: dict[str, str] = {}
    interrupted = None
    started = time.monotonic()
    earlier_s = float((folder.meta.get("total_wall_s") if folder else None) or 0.0)  # sessions before a --resume
    try:
        if runner is not None:
            # the live tools the data names load before the first sample, any other at its first call: no
            # sample is charged a load, and a data set that needs one tool does not load them all
            load_errors = runner.preload(None if args.quiet else lambda line: print(line, file=sys.stderr, flush=True),
                                         samples=[s for i, s in enumerate(samples) if i not in results])
        _warn_load_errors(load_errors, {})
        if folder:
            folder.open()
            folder.record(name=run_name, model=model,
                          **({"constrained_decoding": bool(args.constrain), **runner.prompting} if runner is not None else {}))
        for i, smp in enumerate(samples):
            if i in results:
                continue
            try:
                result = runner.run(smp)
            except KeyboardInterrupt:  # Ctrl-C: report the samples done so far rather than lose them
                if not results:
                    raise
                interrupted = f"after {len(results)} of {len(samples)} samples"
                print(f"interrupted {interrupted}: scoring those{' (not judged)' if args.judge_url else ''}"
                      f"{'; --resume continues the run' if folder else ''}", file=sys.stderr)
                break
            results[i] = result
            load_errors = _warn_load_errors(runner.load_errors, load_errors)  # a tool that failed at its first call
            if folder:
                folder.append(smp, result)
                folder.record(total_wall_s=earlier_s + time.monotonic() - started,
                              **({"tokens_counted_by": runner.tokens_counted_by} if runner.tokens_counted_by else {}))
            if not args.quiet:
                print(f"[{len(results)}/{len(samples)}] {smp.task}: {result.error or 'ok'}", file=sys.stderr)
    finally:
        if runner is not None:
            runner.close()
        if folder:
            folder.close()
    done = sorted(results)
    recorded = folder.meta if folder else {}
    meta = {
        "name": run_name, "model": model, "data": str(args.data), "data_sha256": data_sha256,
        **(runner.prompting if runner else {k: recorded[k] for k in PROMPTING if k in recorded}),
        "tokens_counted_by": (runner.tokens_counted_by if runner else "") or recorded.get("tokens_counted_by", ""),
        "constrained_decoding": bool(args.constrain) if runner else recorded.get("constrained_decoding"),
        **({"tool_load_errors": load_errors} if load_errors else {}),
        **({"interrupted": interrupted} if interrupted else {}),
        "total_wall_s": earlier_s + time.monotonic() - started, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    return _finish(args, [samples[i] for i in done], [results[i] for i in done], meta)


def score_predictions(args: argparse.Namespace) -> dict[str, Any]:
    """Score ``--predictions`` against ``--data`` with the metrics of a run; no model is loaded."""
    from mmedagent.evaluation.results import file_sha256, read_predictions, recorded_run

    samples = load_samples(args.data)
    run = recorded_run(args.predictions)  # the run.json beside a run's samples.jsonl
    mode = (run or {}).get("settings", {}).get("tool_mode") or args.tool_mode
    if not getattr(args, "tool_mode_given", False):
        args.tool_mode = mode
    if mode != args.tool_mode:
        raise EvalFileError(f"{args.predictions} was written by a --tool-mode {mode} run: pass --tool-mode {mode} to "
                            "score it (live-only metrics read its tool outputs)")
    data_sha256 = file_sha256(args.data)
    if run and run["settings"].get("data_sha256") not in (None, data_sha256):
        print(f"warning: {args.predictions} was written by a run on another version of {args.data}; scoring it "
              "against this one", file=sys.stderr)
    results, missing = read_predictions(args.predictions, samples, args.data)
    if args.limit is not None and args.limit < len(samples):
        beyond = len(samples) - args.limit - sum(i >= args.limit for i in missing)
        samples, results, missing = samples[: args.limit], results[: args.limit], [i for i in missing if i < args.limit]
        if beyond:
            print(f"note: {beyond} predictions answer samples after the first {args.limit} (--limit): not scored",
                  file=sys.stderr)
    if missing:
        first = ", ".join(repr(samples[i].id) for i in missing[:5])
        print(f"warning: {len(missing)} of {len(samples)} samples have no prediction in {args.predictions} (ids {first}"
              f"{', …' if len(missing) > 5 else ''}): they score as wrong", file=sys.stderr)
    without = set(missing)
    given = [(s, r) for i, (s, r) in enumerate(zip(samples, results)) if i not in without]
    answer_only = sum(s.gold_calls is not None and not r.steps and r.error is None for s, r in given)
    if answer_only:
        print(f"warning: {answer_only} predictions for samples whose tool use is scored give no 'raw', 'calls' or "
              "'steps': scored as calling no tool", file=sys.stderr)
    recorded = (run or {}).get("meta") or {}
    model = args.model or recorded.get("model")
    counted_by = recorded.get("tokens_counted_by") or ("predictions" if any(r.tokens for _, r in given) else None)
    meta = {
        "name": args.name or recorded.get("name") or (Path(str(model)).name if model else Path(args.predictions).stem),
        "model": model, "data": str(args.data), "data_sha256": data_sha256, "predictions": str(args.predictions),
        **{k: recorded[k] for k in PROMPTING if k in recorded},
        "tokens_counted_by": counted_by,
        "constrained_decoding": recorded.get("constrained_decoding"),
        **({"missing_predictions": len(missing)} if missing else {}),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    return _finish(args, samples, results, meta)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.compare:
        from mmedagent.evaluation.compare import compare

        out = args.out or "."
        try:
            md, png = compare(*args.compare, out)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(md)
        print(f"wrote {Path(out) / 'compare.md'} and {png}", file=sys.stderr)
        return 0
    if args.predictions and (args.out or args.resume):
        print("error: --out and --resume are for a model run; keep the report of scored predictions with --json-out",
              file=sys.stderr)
        return 2
    if args.resume and not args.out:
        print("error: --resume needs --out DIR, the folder of the run to continue", file=sys.stderr)
        return 2
    if not args.data or not (args.model or args.predictions):
        print("error: --model and --data are required (or --predictions FILE and --data, or --compare A.json B.json)",
              file=sys.stderr)
        return 2
    if args.image_folder and not Path(args.image_folder).is_dir():  # else every sample fails, after the model loads
        print(f"error: --image-folder {args.image_folder} is not a folder", file=sys.stderr)
        return 2
    try:
        from mmedagent.tools import load_plugins

        load_plugins(args.plugin)  # before any tool name is resolved: the data's, --tools', the predictions'
        report = run_evaluation(args)
    except (EvalFileError, OSError, json.JSONDecodeError, KeyError, ValueError) as e:  # bad data, model not found
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the first sample finished: there is nothing to score
        again = f"; the same command with --resume continues the run in {args.out}" if args.out else ""
        print(f"interrupted: nothing scored this time{again}", file=sys.stderr)
        return 130
    from mmedagent.evaluation.results import REPORT_FILE, write_json
    from mmedagent.evaluation.scoring import markdown_summary

    paths = ([Path(args.out) / REPORT_FILE] if args.out else []) + ([Path(args.json_out)] if args.json_out else [])
    for path in paths:  # before the table: a reader of stdout that goes away (| head) does not cost the report
        write_json(path, report)
        print(f"wrote {path}", file=sys.stderr)
    print(markdown_summary(report))
    error_rate, n = report["overall"].get("error_rate") or 0.0, report["overall"]["n"]
    if error_rate:
        where = (["above"] if not (args.quiet or args.predictions) else []) + [f"in {path}" for path in paths]
        print(f"warning: {round(error_rate * n)} of {n} samples ended in an error and score as wrong"
              f"{'; their errors are listed ' + ' and '.join(where) if where else ''}", file=sys.stderr)
    if report.get("interrupted"):
        return 130  # a partial report (as for Ctrl-C)
    return 1 if error_rate == 1 else 0  # nothing was evaluated
