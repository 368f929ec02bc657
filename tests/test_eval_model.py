"""The evaluation CLI on a real (tiny, random) LLaVA checkpoint loaded through the user path."""

import json

import pytest

from _eval_fixtures import QUESTION, direct_record, grounding_record, write_image, write_json
from mmedagent.evaluation.cli import main
from mmedagent.protocol import IMAGE_TOKEN, system_prompt
from mmedagent.tools.registry import list_tools


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    from mmedagent.model.tiny import make_tiny_model

    return make_tiny_model("llava", tmp_path_factory.mktemp("eval-llava"))


def test_evaluate_cli_on_tiny_llava(tmp_path, tiny_llava):
    write_image(tmp_path)
    data = write_json(tmp_path / "eval.json", [grounding_record(), direct_record()])
    out = tmp_path / "report.json"
    rc = main(["--model", str(tiny_llava), "--data", str(data), "--image-folder", str(tmp_path), "--tool-mode", "gold",
               "--max-new-tokens", "6", "--max-steps", "1", "--json-out", str(out), "--quiet"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert isinstance(report["tool_selection_accuracy"], float) and report["n_samples"] == 2
    assert report["tokens_counted_by"] == "model"
    assert set(report["per_task"]) == {"grounding", "vqa"}
    first = report["samples"][0]
    assert 0 < first["scores"]["tokens"] <= 6  # max_new_tokens

    # what the report says the model wrote is what the model generates for that prompt
    from mmedagent.evaluation.runner import load_image
    from mmedagent.model import load_planner

    planner = load_planner(tiny_llava)
    messages = [{"role": "system", "content": system_prompt(list_tools())},
                {"role": "user", "content": f"{IMAGE_TOKEN}\n{QUESTION}"}]
    again = planner.generate(messages, load_image("img.png", tmp_path), max_new_tokens=6, temperature=0.0)
    assert first["raw"] == [again]


def test_model_dir_settings_choose_the_plain_system_prompt(tmp_path, tiny_llava):
    import shutil

    from mmedagent.evaluation.cli import make_runner, parser
    from mmedagent.protocol import DEFAULT_SYSTEM

    model = shutil.copytree(tiny_llava, tmp_path / "m")
    args = parser().parse_args(["--model", str(model), "--data", "x", "--tool-mode", "gold"])
    assert make_runner(args).system == system_prompt(list_tools())
    (model / "mmedagent.json").write_text(json.dumps({"system_prompt": "plain"}))
    assert make_runner(parser().parse_args(["--model", str(model), "--data", "x", "--tool-mode", "gold"])).system == DEFAULT_SYSTEM
    (model / "mmedagent.json").write_text(json.dumps({"system_prompt": "none", "constrain": True}))  # as the demo's
    runner = make_runner(parser().parse_args(["--model", str(model), "--data", "x", "--tool-mode", "gold"]))
    assert runner.system == "" and runner.counter.planner.constrain is True
    runner = make_runner(parser().parse_args(["--model", str(model), "--data", "x", "--tool-mode", "gold",
                                              "--system-prompt", "catalog", "--no-constrain"]))
    assert runner.system == system_prompt(list_tools()) and runner.counter.planner.constrain is False
    (model / "mmedagent.json").write_text(json.dumps({"system_prompt": "text", "system_text": "You are a radiologist."}))
    runner = make_runner(parser().parse_args(["--model", str(model), "--data", "x", "--tool-mode", "gold"]))
    assert runner.system == "You are a radiologist."  # the text the model was trained with
    assert runner.prompting == {"system_prompt": "text", "template": "chat_template"}  # recorded in the report


def test_runs_prompted_otherwise_are_compared_with_a_warning():
    """A base model with its own chat template and the tool catalog against the trained one with vicuna_v1 and no
    system message: --compare printed their deltas as a before/after of one evaluation."""
    from mmedagent.evaluation.compare import unlike

    base = {"system_prompt": "catalog", "template": "chat_template", "overall": {}, "samples": []}
    tuned = {"system_prompt": "none", "template": "vicuna_v1", "overall": {}, "samples": []}
    assert unlike(base, tuned) == ["system_prompt: catalog vs none", "template: chat_template vs vicuna_v1"]
    assert unlike(base, dict(base)) == []


def test_a_resumed_run_of_the_real_model_reports_as_an_uninterrupted_one(tmp_path, tiny_llava):
    """Run, lose the last sample and a half-written line (a kill), resume: the report is the uninterrupted
    run's, timings aside; the run's samples file then scores back as --predictions without the model."""
    def untimed(report):
        if isinstance(report, dict):
            return {k: untimed(v) for k, v in report.items() if not (k.endswith("_s") or "_s_" in k or k == "created")}
        return [untimed(v) for v in report] if isinstance(report, list) else report

    write_image(tmp_path)
    data = write_json(tmp_path / "eval.json", [grounding_record("g1"), direct_record("d1"), grounding_record("g2")])
    out = tmp_path / "run"
    flags = ["--model", str(tiny_llava), "--data", str(data), "--image-folder", str(tmp_path), "--tool-mode", "gold",
             "--max-new-tokens", "6", "--max-steps", "2", "--quiet", "--out", str(out)]
    assert main(flags) == 0
    full = json.loads((out / "report.json").read_text())
    written = (out / "samples.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    assert [json.loads(x)["id"] for x in written] == ["g1", "d1", "g2"]
    (out / "samples.jsonl").write_text(written[0] + written[1][: len(written[1]) // 2], encoding="utf-8")
    assert main([*flags, "--resume"]) == 0
    assert untimed(json.loads((out / "report.json").read_text())) == untimed(full)

    scored = tmp_path / "scored.json"
    assert main(["--predictions", str(out / "samples.jsonl"), "--data", str(data), "--tool-mode", "gold",
                 "--json-out", str(scored)]) == 0
    report = json.loads(scored.read_text())
    assert report.pop("predictions") == str(out / "samples.jsonl")
    assert untimed(report) == untimed(full) and report["tokens_counted_by"] == "model"
