"""Live evaluation loads the tools the data names before the first sample, any other at its first call.

A grounding-only data set used to load every offered tool first (retrieval's index, the report model: minutes
and GBs for nothing). The planner is still offered every tool (same system prompt); the tools here count their loads.
"""

import json
import time

import pytest

from _eval_fixtures import GOLD_BOX, direct_record, grounding_record, mmedagent_line, turn, write_image, write_json
from doubles import FakeGrounding, ScriptedPlanner
from mmedagent.evaluation import cli
from mmedagent.evaluation.readers import load_samples
from mmedagent.evaluation.runner import AgentRunner
from mmedagent.protocol import system_prompt
from mmedagent.tools import Tool, ToolResult, registry

CALL_G = ("grounding dino", {"image": "<imagepath>", "prompts": ["tumor"]})
CALL_RULER = ("ruler", {})


class Ruler(Tool):
    """A second live tool, which the data sets below never name; counts its loads."""

    name = "ruler"
    description = "Measure the image."
    needs_image = False

    class Result(ToolResult):
        length: float

    def __init__(self, **options):
        super().__init__(**options)
        self.loads = 0

    def load(self):
        self.loads += 1

    def __call__(self, image, params):
        return self.Result(length=1.0)


class LoadsSeenPlanner(ScriptedPlanner):
    """Notes, at each planner call, how many times each tool has loaded so far."""

    def __init__(self, replies, tools):
        super().__init__(replies)
        self.tools, self.loads_seen = tools, []

    def generate(self, messages, image, **gen):
        self.loads_seen.append({t.name: t.loads for t in self.tools})
        return super().generate(messages, image, **gen)


@pytest.fixture(autouse=True)
def fake_grounding(monkeypatch):
    # the double holds the name 'grounding' (built-ins discovered first, as test_eval_runner.py explains)
    registry.list_tools()
    monkeypatch.setitem(registry._extra, FakeGrounding.name, FakeGrounding)


@pytest.fixture
def folder(tmp_path):
    write_image(tmp_path)
    return tmp_path


def test_only_the_tools_the_data_names_load_before_the_first_sample(tmp_path, folder, monkeypatch, capsys):
    grounding, ruler = FakeGrounding(), Ruler()
    data = write_json(tmp_path / "r.json", [grounding_record("g1"), grounding_record("g2")])
    planner = LoadsSeenPlanner([turn("Locating.", CALL_G), turn(f"At {GOLD_BOX}."),
                                turn("Measuring.", CALL_RULER), turn("Measured.")], [grounding, ruler])
    runner = AgentRunner(planner, "live", [grounding, ruler], image_folder=folder)
    monkeypatch.setattr(cli, "make_runner", lambda args: runner)
    assert cli.main(["--model", "x", "--data", str(data), "--json-out", str(tmp_path / "report.json")]) == 0

    assert planner.loads_seen[0] == {"grounding": 1, "ruler": 0}  # the gold calls name 'grounding dino' only
    assert planner.loads_seen[-1] == {"grounding": 1, "ruler": 1}  # the model's call to ruler loaded it, once
    assert "ruler output: {'length': 1.0}" in planner.calls[-1][-1]["content"]
    # still offered every tool: the system prompt is the catalog of both
    assert all(c[0] == {"role": "system", "content": system_prompt([FakeGrounding, Ruler])} for c in planner.calls)
    err = capsys.readouterr().err
    assert "preloading the 1 of 2 tools offered that the data names: grounding\nloading tool grounding\n" in err
    assert "not preloaded, each loads at its first call (not charged to the sample): ruler" in err
    assert "loading tool ruler at its first call\ntool ruler loaded in " in err
    assert json.loads((tmp_path / "report.json").read_text())["overall"]["error_rate"] == 0.0


def test_a_tool_loaded_at_its_first_call_is_not_charged_to_the_sample(tmp_path, folder, monkeypatch):
    clock = [1000.0]  # the test's clock: it moves only while ruler loads (ten minutes)
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])

    class SlowRuler(Ruler):
        def load(self):
            super().load()
            clock[0] += 600.0

    grounding, ruler = FakeGrounding(), SlowRuler()
    sample = load_samples(write_json(tmp_path / "r.json", [grounding_record()]))[0]
    planner = ScriptedPlanner([turn("Locating.", CALL_G), turn("Measuring.", CALL_RULER), turn("Done.")])
    runner = AgentRunner(planner, "live", [grounding, ruler], image_folder=folder, timeout_s=60)
    lines = []
    assert runner.preload(lines.append, samples=[sample]) == {}
    assert (grounding.loads, ruler.loads) == (1, 0)
    result = runner.run(sample)
    runner.close()
    assert ruler.loads == 1 and [o.ok for o in result.outcomes] == [True, True], result.outcomes
    assert result.wall_s == 0.0 and [s.tools_s for s in result.steps] == [0.0, 0.0, 0.0]
    assert lines[-2:] == ["loading tool ruler at its first call", "tool ruler loaded in 600.0 s"]


def test_a_tool_failing_at_its_first_call_fails_that_call_only(tmp_path, folder, monkeypatch, capsys):
    class BrokenRuler(Ruler):
        def load(self):
            raise RuntimeError("weights not found at /nowhere")

    data = write_json(tmp_path / "r.json", [grounding_record("g1"), grounding_record("g2")])
    planner = ScriptedPlanner([turn("Measuring.", CALL_RULER), turn("No ruler."),
                               turn("Measuring.", CALL_RULER, CALL_G), turn("Found it.")])
    runner = AgentRunner(planner, "live", [FakeGrounding(), BrokenRuler()], image_folder=folder)
    monkeypatch.setattr(cli, "make_runner", lambda args: runner)
    out = tmp_path / "report.json"
    assert cli.main(["--model", "x", "--data", str(data), "--json-out", str(out), "--quiet"]) == 0
    assert "ruler error: ruler failed to load: RuntimeError: weights not found at /nowhere" in planner.calls[1][-1]["content"]
    second = planner.calls[3][-1]["content"]  # the second sample: ruler still refused (not retried), grounding ran
    assert "ruler is unavailable: it failed to load (RuntimeError: weights not found at /nowhere)" in second
    assert "grounding dino output: {'boxes'" in second
    report = json.loads(out.read_text())
    assert report["n_samples"] == 2 and report["overall"]["error_rate"] == 0.0
    assert report["tool_load_errors"] == {"ruler": "RuntimeError: weights not found at /nowhere"}
    assert capsys.readouterr().err.count("warning: tool ruler failed to load (RuntimeError: weights not found") == 1


def test_names_are_resolved_through_aliases_and_tasks(tmp_path):
    def preloaded(records):
        tools = [FakeGrounding(), Ruler()]
        AgentRunner(ScriptedPlanner([]), "live", tools).preload(samples=load_samples(write_json(tmp_path / "d.json", records)))
        return sorted(t.name for t in tools if t.loads)

    assert preloaded([direct_record()]) == []  # a VQA set names no tool: each loads at its first call
    assert preloaded([mmedagent_line()]) == ["grounding"]  # MMedAgent's 'grounding dino' call, type 'dino_cell'
    both = grounding_record()
    both["task"] = "grounding+ruler"
    assert preloaded([both]) == ["grounding", "ruler"]
