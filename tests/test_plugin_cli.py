"""``--plugin MODULE`` outside serving: ``scripts/evaluate.py`` and ``python -m mmedagent.data check`` register
the tools of a loose module (one on the path, not an installed entry-point package), as the serve scripts do."""

import json
import textwrap

import pytest

from _eval_fixtures import turn, write_image, write_json
from doubles import ScriptedPlanner
from mmedagent.data.__main__ import main as data_main
from mmedagent.evaluation.cli import main as eval_main
from mmedagent.protocol import ToolOutcome, render_tool_results

LOOSE_MODULE = '''
    from mmedagent.tools import Tool, ToolParams, ToolResult


    class ProbeParams(ToolParams):
        depth: int


    class ProbeResult(ToolResult):
        finding: str


    class LesionProbe(Tool):
        name = "lesion_probe"
        description = "Probe a lesion."
        Params = ProbeParams
        Result = ProbeResult
        needs_image = False

        def __call__(self, image, params):
            return ProbeResult(finding="benign")
'''


@pytest.fixture
def loose(plugin_dir):
    """``hosp_loose.py`` on sys.path, with no dist-info: no entry point finds it."""
    (plugin_dir / "hosp_loose.py").write_text(textwrap.dedent(LOOSE_MODULE))
    return plugin_dir


def probe_record(depth=2):
    question = "Probe the lesion."
    return {"id": "p1", "image": "img.png", "conversations": [
        {"from": "human", "value": f"<image>\n{question}"},
        {"from": "gpt", "thoughts": "Probe.", "value": "Please wait.",
         "actions": [{"API_name": "lesion_probe", "API_params": {"depth": depth}}]},
        {"from": "human", "value": render_tool_results([ToolOutcome(tool="lesion_probe", output={"finding": "benign"})],
                                                        question)},
        {"from": "gpt", "thoughts": "Done.", "actions": [], "value": "Benign."}]}


def test_evaluate_runs_a_data_set_calling_a_tool_of_a_plugin_module(loose, monkeypatch, capsys):
    """It was 'error: unknown tool 'lesion_probe'': evaluate had no --plugin."""
    import mmedagent.model

    planner = ScriptedPlanner([turn("Please wait.", ("lesion_probe", {"depth": 2})), "Benign."])
    monkeypatch.setattr(mmedagent.model, "load_planner", lambda path, **options: planner)
    write_image(loose)
    data = write_json(loose / "d.json", [probe_record()])
    out = loose / "report.json"
    argv = ["--model", str(loose), "--data", str(data), "--tools", "lesion_probe", "--tool-mode", "gold", "--quiet",
            "--json-out", str(out)]
    assert eval_main([*argv, "--plugin", "hosp_loose"]) == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["overall"]["tool_selection_accuracy"] == 1.0 and report["samples"][0]["answer"] == "Benign."
    assert [t.name for t in planner.tools] == ["lesion_probe"]  # offered to the planner as --tools named it


def test_evaluate_refuses_a_plugin_that_does_not_load_in_one_line_before_the_model_loads(loose, monkeypatch, capsys):
    import mmedagent.model

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(mmedagent.model, "load_planner", no_model)
    (loose / "hosp_empty.py").write_text("X = 1\n")
    data = write_json(loose / "d.json", [probe_record()])
    for module, error in (("hosp_missing", "No module named 'hosp_missing'"),
                          ("hosp_empty", "hosp_empty defines no tool class (a Tool subclass with a name)")):
        assert eval_main(["--model", str(loose), "--data", str(data), "--tool-mode", "gold", "--plugin", module]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --plugin {module}: {error}") and err.count("\n") == 1, err


@pytest.mark.parametrize("argv", [["--check", "{file}", "--plugin", "hosp_loose"],
                                  ["--plugin", "hosp_loose", "check", "{file}"],
                                  ["check", "{file}", "--plugin", "hosp_loose"]])
def test_data_check_validates_calls_to_a_tool_of_a_plugin_module(loose, capsys, argv):
    """They were only 'not validated (no such tool registered here)': the check had no --plugin."""
    good = write_json(loose / "good.json", [probe_record()])
    assert data_main([a.format(file=good) for a in argv]) == 0
    out = capsys.readouterr().out
    assert "tool calls: lesion_probe: 1" in out and "not validated" not in out
    bad = write_json(loose / "bad.json", [probe_record(depth="deep")])
    assert data_main([a.format(file=bad) for a in argv]) == 1
    assert f"{bad}: record 1: turn 2: invalid params for lesion_probe: depth" in capsys.readouterr().err


def test_data_check_refuses_a_plugin_that_does_not_load_in_one_line(loose, capsys):
    data = write_json(loose / "d.json", [probe_record()])
    assert data_main(["check", str(data), "--plugin", "hosp_missing"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --plugin hosp_missing: No module named 'hosp_missing'; ") and err.count("\n") == 1


def test_a_run_with_a_plugin_resumes_only_with_it(loose, monkeypatch, capsys):
    """Without it the planner would be offered other tools (all registered) than the run's first samples were."""
    import mmedagent.model

    monkeypatch.setattr(mmedagent.model, "load_planner", lambda path, **options: ScriptedPlanner(["Benign."]))
    write_image(loose)
    data = write_json(loose / "d.json", [probe_record()])
    argv = ["--model", str(loose), "--data", str(data), "--tool-mode", "gold", "--quiet", "--out", str(loose / "run")]
    assert eval_main([*argv, "--plugin", "hosp_loose"]) == 0
    assert eval_main([*argv, "--resume", "--plugin", "hosp_loose", "--plugin", "hosp_loose"]) == 0  # the same set
    capsys.readouterr()
    assert eval_main([*argv, "--resume"]) == 2
    assert "--plugin: ['hosp_loose'] then, None now" in capsys.readouterr().err
