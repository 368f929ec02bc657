"""Incremental output (``--out``), ``--resume`` after a kill, and ``--predictions`` scored as a run is.

The planner is the scripted test double (harness logic only); the real-model round trip is in
test_eval_model.py.
"""

import json

import pytest

from _eval_fixtures import GOLD_BOX, direct_record, grounding_record, turn, write_image, write_json, write_jsonl
from doubles import FakeGrounding, ScriptedPlanner
from mmedagent.evaluation import cli
from mmedagent.evaluation.cli import main
from mmedagent.evaluation.runner import AgentRunner
from mmedagent.tools import registry

CALL_G = ("grounding dino", {"image": "<imagepath>", "prompts": ["tumor"]})
ANSWER_G = f"The tumor is at {GOLD_BOX}."
# what the planner answers to the five samples below (two turns for a grounding sample, one otherwise)
REPLIES = [
    turn("Locating.", CALL_G), turn(ANSWER_G),  # g1: right
    "Yes, it is.",  # d1: right
    turn("Guess.", ("xray magic", {})), turn("I could not find it."),  # g2: unknown tool
    turn("Look.", ("grounding", {"prompts": ["chest"]})), turn("No."),  # d2: needless tool, wrong
    "Yes.",  # g3 (shares the id of g1): answers without a tool
]


class Killed(BaseException):
    """Stands for a hard kill (out of memory, preemption): nothing in the run catches it."""


class KilledAfter(ScriptedPlanner):
    """Replies as scripted, then is killed on planner call number ``calls + 1``; ``on_disk`` is then what
    the samples file ``watch`` holds on disk at that moment (a hard kill runs no clean-up after it)."""

    def __init__(self, replies, calls, watch=None):
        super().__init__(replies)
        self.left, self.watch, self.on_disk = calls, watch, None

    def generate(self, messages, image, **gen):
        if self.left == 0:
            self.on_disk = self.watch.read_text(encoding="utf-8") if self.watch else None
            raise Killed
        self.left -= 1
        return super().generate(messages, image, **gen)


@pytest.fixture
def data(tmp_path):
    write_image(tmp_path)
    return write_json(tmp_path / "eval.json", [grounding_record("g1"), direct_record("d1"), grounding_record("g2"),
                                               direct_record("d2"), grounding_record("g1")])


def use_planner(monkeypatch, planner, tool_mode="gold", tools=(), folder=None):
    def make_runner(args):
        return AgentRunner(planner, tool_mode, list(tools), image_folder=folder or args.image_folder)

    monkeypatch.setattr(cli, "make_runner", make_runner)
    return planner


def evaluate(data, *flags):
    return main(["--model", "m", "--data", str(data), "--image-folder", str(data.parent), "--tool-mode", "gold",
                 "--quiet", *flags])


def untimed(report):
    """The report without what differs between two runs of the same model: timings and the date."""
    if isinstance(report, dict):
        return {k: untimed(v) for k, v in report.items() if not (k.endswith("_s") or "_s_" in k or k == "created")}
    if isinstance(report, list):
        return [untimed(v) for v in report]
    return report


def lines(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_each_sample_is_written_as_it_finishes_and_a_killed_run_resumes_to_the_same_report(tmp_path, data, monkeypatch):
    use_planner(monkeypatch, ScriptedPlanner(REPLIES))
    assert evaluate(data, "--out", str(tmp_path / "full")) == 0
    full = json.loads((tmp_path / "full" / "report.json").read_text())
    assert full["n_samples"] == 5 and full["overall"]["tool_selection_accuracy"] == 0.4

    out = tmp_path / "killed"
    killed = use_planner(monkeypatch, KilledAfter(REPLIES, 4, out / "samples.jsonl"))  # killed in g2's second call
    with pytest.raises(Killed):
        evaluate(data, "--out", str(out))
    assert killed.on_disk == (out / "samples.jsonl").read_text(encoding="utf-8")  # on disk before the kill
    written = lines(out / "samples.jsonl")
    assert [(w["index"], w["id"], w["answer"]) for w in written] == [(0, "g1", ANSWER_G), (1, "d1", "Yes, it is.")]
    assert not (out / "report.json").exists()

    rest = use_planner(monkeypatch, ScriptedPlanner(REPLIES[3:]))
    assert evaluate(data, "--out", str(out), "--resume") == 0
    assert rest.replies == [] and len(rest.calls) == 5  # only g2, d2 and the second g1 ran again
    resumed = json.loads((out / "report.json").read_text())
    assert untimed(resumed) == untimed(full)
    assert [w["index"] for w in lines(out / "samples.jsonl")] == [0, 1, 2, 3, 4]


def test_a_line_cut_off_by_the_kill_is_run_again(tmp_path, data, monkeypatch, capsys):
    use_planner(monkeypatch, ScriptedPlanner(REPLIES))
    out = tmp_path / "run"
    assert evaluate(data, "--out", str(out), "--json-out", str(tmp_path / "full.json")) == 0
    full = json.loads((tmp_path / "full.json").read_text())
    text = (out / "samples.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (out / "samples.jsonl").write_text("".join(text[:3]) + text[3][:40], encoding="utf-8")  # killed writing d2

    rest = use_planner(monkeypatch, ScriptedPlanner(REPLIES[5:]))
    assert evaluate(data, "--out", str(out), "--resume") == 0
    assert rest.replies == []
    err = capsys.readouterr().err
    assert "resuming" in err and "3 of 5 samples done" in err and "cut off" in err
    assert untimed(json.loads((out / "report.json").read_text())) == untimed(full)
    assert len(lines(out / "samples.jsonl")) == 5

    (out / "report.json").unlink()  # killed after the last sample, before the report: no model is loaded again
    monkeypatch.setattr(cli, "make_runner", None)
    assert evaluate(data, "--out", str(out), "--resume") == 0
    assert untimed(json.loads((out / "report.json").read_text())) == untimed(full)


def test_ctrl_c_then_resume(tmp_path, data, monkeypatch, capsys):
    class CtrlC(ScriptedPlanner):
        def generate(self, messages, image, **gen):
            if not self.replies:
                raise KeyboardInterrupt
            return super().generate(messages, image, **gen)

    out = tmp_path / "run"
    use_planner(monkeypatch, CtrlC(REPLIES[:3]))
    assert evaluate(data, "--out", str(out)) == 130
    assert json.loads((out / "report.json").read_text())["interrupted"] == "after 2 of 5 samples"
    assert "--resume continues the run" in capsys.readouterr().err
    use_planner(monkeypatch, ScriptedPlanner(REPLIES[3:]))
    assert evaluate(data, "--out", str(out), "--resume") == 0
    report = json.loads((out / "report.json").read_text())
    assert "interrupted" not in report and report["n_samples"] == 5 and report["tokens_counted_by"] == "words"


def test_a_run_folder_is_not_overwritten_and_is_resumed_only_with_the_same_settings(tmp_path, data, monkeypatch, capsys):
    out = tmp_path / "run"
    use_planner(monkeypatch, KilledAfter(REPLIES, 3))
    with pytest.raises(Killed):
        evaluate(data, "--out", str(out), "--k", "3")
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["k"] == 3 and run["settings"]["tool_mode"] == "gold" and run["settings"]["model"] == "m"
    assert len(run["settings"]["data_sha256"]) == 64

    assert evaluate(data, "--out", str(out), "--k", "3") == 2  # no --resume: the run there is kept
    assert "already holds a run: --resume continues it" in capsys.readouterr().err
    assert evaluate(data, "--out", str(out), "--resume", "--max-new-tokens", "64") == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "--k: 3 then, 5 now" in err and "--max-new-tokens: 256 then, 64 now" in err
    write_json(data, [direct_record("d1")])
    assert evaluate(data, "--out", str(out), "--resume", "--k", "3") == 2
    assert "the --data file's content (sha256)" in capsys.readouterr().err
    assert evaluate(data, "--resume") == 2
    assert "--resume needs --out" in capsys.readouterr().err
    assert len(lines(out / "samples.jsonl")) == 2  # none of the refused runs touched the folder

    use_planner(monkeypatch, ScriptedPlanner(["Yes."]))  # --resume where no run is yet starts one
    assert evaluate(data, "--out", str(tmp_path / "new"), "--resume") == 0
    assert "nothing to resume" in capsys.readouterr().err


def test_a_finished_runs_samples_file_scores_back_as_predictions(tmp_path, data, monkeypatch, capsys):
    use_planner(monkeypatch, ScriptedPlanner(REPLIES))
    out = tmp_path / "run"
    assert evaluate(data, "--out", str(out)) == 0
    run = json.loads((out / "report.json").read_text())

    monkeypatch.setattr(cli, "make_runner", None)  # no model is loaded
    samples = out / "samples.jsonl"
    again = tmp_path / "again.json"
    for mode in (["--tool-mode", "gold"], []):  # the run's own mode, said or taken from its run.json
        assert main(["--predictions", str(samples), "--data", str(data), *mode, "--json-out", str(again)]) == 0
        scored = json.loads(again.read_text())
        assert scored.pop("predictions") == str(samples)
        assert untimed(scored) == untimed(run)
    # scored as a live run, the gold outputs the run was fed would count as tool outputs
    assert main(["--predictions", str(samples), "--data", str(data), "--tool-mode", "live"]) == 2
    assert "written by a --tool-mode gold run: pass --tool-mode gold" in capsys.readouterr().err


@pytest.fixture
def fake_grounding(monkeypatch):
    registry.list_tools()  # discover the built-in tools before the double takes the name (see test_eval_runner)
    monkeypatch.setitem(registry._extra, FakeGrounding.name, FakeGrounding)


def test_a_live_runs_tool_outputs_survive_the_round_trip(tmp_path, monkeypatch, fake_grounding):
    """Live-only metrics read the tool outputs of the samples file: a live box scores as in the run."""
    write_image(tmp_path)
    data = write_json(tmp_path / "eval.json", [grounding_record("g1", box=[0.1, 0.2, 0.3, 0.4])])
    use_planner(monkeypatch, ScriptedPlanner([turn("Locating.", CALL_G), turn("Found it.")]), "live", [FakeGrounding()])
    out = tmp_path / "run"
    assert main(["--model", "m", "--data", str(data), "--image-folder", str(tmp_path), "--out", str(out), "--quiet"]) == 0
    run = json.loads((out / "report.json").read_text())
    assert run["samples"][0]["scores"]["pred_boxes"] == [[0.12, 0.2, 0.3, 0.4]]  # FakeGrounding's box, as fed to the model
    assert main(["--predictions", str(out / "samples.jsonl"), "--data", str(data), "--json-out", str(tmp_path / "p.json")]) == 0
    scored = json.loads((tmp_path / "p.json").read_text())
    assert scored["overall"]["grounding_iou"] == run["overall"]["grounding_iou"] > 0
    assert untimed(scored["samples"]) == untimed(run["samples"])


def test_predictions_made_elsewhere_score_as_the_same_run_would(tmp_path, data, monkeypatch, capsys):
    """Raw turns, tool calls or an answer alone: the metrics are those of a run that produced them."""
    use_planner(monkeypatch, ScriptedPlanner(REPLIES))
    assert evaluate(data, "--json-out", str(tmp_path / "run.json")) == 0
    run = json.loads((tmp_path / "run.json").read_text())
    monkeypatch.setattr(cli, "make_runner", None)

    predictions = write_jsonl(tmp_path / "preds.jsonl", [
        {"index": 0, "id": "g1", "answer": ANSWER_G, "raw": REPLIES[0:2]},
        {"id": "d1", "answer": "Yes, it is.", "raw": REPLIES[2]},
        {"id": "g2", "answer": "I could not find it.", "calls": [{"API_name": "xray magic", "API_params": {}}]},
        {"id": "d2", "answer": "No.", "raw": REPLIES[5:7], "tokens": 9},
        {"index": 4, "answer": "Yes.", "raw": ["Yes."]},
    ])
    out = tmp_path / "p.json"
    assert main(["--predictions", str(predictions), "--data", str(data), "--tool-mode", "gold", "--json-out", str(out)]) == 0
    scored = json.loads(out.read_text())
    for key in ("tool_selection_accuracy", "call_precision", "call_recall", "argument_validity", "argument_match",
                "grounding_iou", "map50", "vqa_closed_accuracy", "answer_f1", "rouge_l", "bleu4", "error_rate"):
        assert scored["overall"][key] == run["overall"][key], key
    assert [s["calls"] for s in scored["samples"]] == [s["calls"] for s in run["samples"]]
    assert scored["tokens_counted_by"] == "predictions" and scored["overall"]["wall_s_per_turn"] is None
    assert scored["name"] == "preds" and "missing_predictions" not in scored
    assert scored["samples"][2]["scores"]["steps"] is None  # calls alone: the steps that made them are unknown
    assert scored["data_sha256"] == run["data_sha256"] and len(run["data_sha256"]) == 64

    # answers alone: answer metrics as before; tool use as calling no tool, and said so
    answers = write_jsonl(tmp_path / "answers.jsonl", [{"index": s["index"], "answer": s["answer"]} for s in run["samples"]])
    capsys.readouterr()
    assert main(["--predictions", str(answers), "--data", str(data), "--tool-mode", "gold", "--json-out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "5 predictions for samples whose tool use is scored give no 'raw', 'calls' or 'steps'" in printed.err
    scored = json.loads(out.read_text())
    assert scored["overall"]["answer_f1"] == run["overall"]["answer_f1"]
    assert scored["overall"]["tool_selection_accuracy"] == 0.4  # d1, d2 need no tool: right; the three grounding ones: wrong
    # the planner's turns were not given: its step count and parse errors were not measured (not 0 steps)
    assert scored["overall"]["steps_per_turn"] is None and scored["overall"]["parse_error_rate"] is None
    assert "| steps_per_turn |" not in printed.out and "| answer_f1 |" in printed.out


def test_predictions_that_do_not_fit_the_data_are_refused_or_counted_wrong(tmp_path, data, capsys):
    def score(*preds, text=None):
        path = tmp_path / "p.jsonl"
        if text is None:
            write_jsonl(path, preds)
        else:
            path.write_text(text, encoding="utf-8")
        rc = main(["--predictions", str(path), "--data", str(data), "--tool-mode", "gold",
                   "--json-out", str(tmp_path / "r.json")])
        return rc, capsys.readouterr().err

    refused = [
        ([{"id": "g9", "answer": "x"}], "p.jsonl, line 1: id 'g9' is not in"),
        ([{"id": "d1", "answer": "x"}, {"id": "d1", "answer": "y"}],
         "p.jsonl, line 2: a second prediction for sample 'd1' (record 1; the first is on line 1)"),
        ([{"id": "g1", "answer": "x"}], "line 1: id 'g1' names 2 samples of"),  # records 0 and 4
        ([{"index": 4, "id": "d1", "answer": "x"}], "line 1: id 'd1', but record 4"),
        ([{"index": 9, "answer": "x"}], "line 1: index 9 is not a sample of"),
        ([{"answer": "x"}], "line 1: no 'id' or 'index'"),
        ([{"id": "d1"}], "line 1: no 'answer'"),
        ([{"id": "d1", "answer": "x", "raw": ["a"], "calls": []}], "give one of 'steps', 'raw' or 'calls'"),
        ([{"id": "d1", "answer": "x", "calls": [{"API_params": {}}]}], "'calls' item 0: 'API_name': Field required"),
    ]
    for preds, message in refused:
        rc, err = score(*preds)
        assert rc == 2 and message in err, (preds, err)
    rc, err = score(text='{"id": "d1", "answer": "Yes"}\n\n{"id": "d2", "answer": \n')
    assert rc == 2 and "p.jsonl, line 3: not valid JSON" in err

    rc, err = score({"id": "d1", "answer": "Yes"}, {"index": 0, "answer": ANSWER_G, "raw": REPLIES[0:2]},
                    {"id": "d2", "error": "planner crashed"})
    assert rc == 0 and "2 of 5 samples have no prediction in" in err and "they score as wrong" in err
    # a failed sample is wrong for its error, not for lacking turns; its error is in the report, not "above"
    assert "1 predictions for samples whose tool use is scored give no 'raw'" in err  # d1
    assert "3 of 5 samples ended in an error and score as wrong; their errors are listed in" in err
    assert "listed above" not in err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["missing_predictions"] == 2 and report["overall"]["error_rate"] == 0.6
    assert [s["error"] for s in report["samples"]] == [None, None, "no prediction in p.jsonl", "planner crashed",
                                                      "no prediction in p.jsonl"]
    assert report["overall"]["tool_selection_accuracy"] == 0.4  # the missing ones are wrong

    write_jsonl(tmp_path / "p.jsonl", [{"id": "d1", "answer": "Yes"}, {"id": "d2", "answer": "No"}])
    rc = main(["--predictions", str(tmp_path / "p.jsonl"), "--data", str(data), "--tool-mode", "gold",  # first 2 samples
               "--limit", "2", "--json-out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert rc == 0 and "1 predictions answer samples after the first 2 (--limit): not scored" in err
    assert json.loads((tmp_path / "r.json").read_text())["missing_predictions"] == 1  # g1 (record 0)

    assert main(["--predictions", str(tmp_path / "none.jsonl"), "--data", str(data)]) == 2
    assert "predictions file not found" in capsys.readouterr().err
    assert main(["--predictions", str(tmp_path / "p.jsonl"), "--data", str(data), "--resume", "--out", "x"]) == 2
    assert "--out and --resume are for a model run" in capsys.readouterr().err


def test_a_larger_limit_extends_a_run_and_a_smaller_one_reports_its_first_samples(tmp_path, data, monkeypatch):
    use_planner(monkeypatch, ScriptedPlanner(REPLIES))
    assert evaluate(data, "--json-out", str(tmp_path / "full.json")) == 0
    full = json.loads((tmp_path / "full.json").read_text())
    out = tmp_path / "run"
    use_planner(monkeypatch, ScriptedPlanner(REPLIES[:3]))
    assert evaluate(data, "--out", str(out), "--limit", "2") == 0
    use_planner(monkeypatch, ScriptedPlanner(REPLIES[3:]))
    assert evaluate(data, "--out", str(out), "--resume") == 0
    assert untimed(json.loads((out / "report.json").read_text())) == untimed(full)
    monkeypatch.setattr(cli, "make_runner", None)
    assert evaluate(data, "--out", str(out), "--resume", "--limit", "1") == 0
    assert [s["id"] for s in json.loads((out / "report.json").read_text())["samples"]] == ["g1"]


def test_a_report_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """A kill while the report is written (simulated: the write stops half way) leaves the previous report,
    not a truncated one that scripts reading the run folder cannot parse."""
    from pathlib import Path

    from mmedagent.evaluation.results import write_json

    report = tmp_path / "run" / "report.json"
    write_json(report, {"overall": {"n": 1}})
    real = Path.write_text

    def killed(self, text, *a, **k):
        real(self, text[: len(text) // 2], *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        write_json(report, {"overall": {"n": 2, "scores": list(range(100))}})
    monkeypatch.undo()
    assert json.loads(report.read_text()) == {"overall": {"n": 1}}


def test_the_report_file_is_written_before_the_table_is_printed(tmp_path, data, monkeypatch):
    """``evaluate.py ... --json-out r.json | head``: the reader of stdout leaving must not cost the report."""
    import sys

    use_planner(monkeypatch, ScriptedPlanner(REPLIES))
    assert evaluate(data, "--out", str(tmp_path / "run")) == 0

    class Gone:
        def write(self, text):
            raise BrokenPipeError

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", Gone())
    with pytest.raises(BrokenPipeError):
        main(["--predictions", str(tmp_path / "run" / "samples.jsonl"), "--data", str(data), "--json-out",
              str(tmp_path / "r.json")])
    monkeypatch.undo()
    assert json.loads((tmp_path / "r.json").read_text())["overall"]["n"] > 0


def test_a_run_folder_in_use_by_another_evaluation_is_refused(tmp_path, data):
    """A requeued job resuming the folder of a run that still goes on would append beside it."""
    from mmedagent.evaluation.readers import EvalFileError, load_samples
    from mmedagent.evaluation.results import RunFolder

    samples = load_samples(data)
    first = RunFolder(tmp_path / "run")
    assert first.check({"model": "m"}, False, samples, data) == {}
    first.open()
    second = RunFolder(tmp_path / "run")
    with pytest.raises(EvalFileError, match=r"run is in use by another evaluation \(process \d+\): wait for it"):
        second.check({"model": "m"}, True, samples, data)
    first.close()
    assert second.check({"model": "m"}, True, samples, data) == {}  # free again once the first has ended
    second.open()
    second.close()
    assert not (tmp_path / "run" / ".lock").exists()  # no stale lock file naming a finished process


def test_a_resumed_runs_total_time_counts_the_sessions_before_it(tmp_path, data, monkeypatch):
    import time
    from types import SimpleNamespace

    clock = [0.0]  # evaluation time: each planner call takes 100 s of it
    monkeypatch.setattr(cli, "time", SimpleNamespace(monotonic=lambda: clock[0], strftime=time.strftime))

    class Slow(KilledAfter):
        def generate(self, messages, image, **gen):
            clock[0] += 100
            return super().generate(messages, image, **gen)

    out = tmp_path / "run"
    use_planner(monkeypatch, Slow(REPLIES, 4))  # g1 (2 calls) and d1 (1) written, killed in g2 (2 more calls)
    with pytest.raises(Killed):
        evaluate(data, "--out", str(out))
    use_planner(monkeypatch, Slow(REPLIES[3:], 5))
    assert evaluate(data, "--out", str(out), "--resume") == 0
    # 300 s until the last sample the killed session wrote, then 500 s resumed (the 200 s in flight are lost)
    assert json.loads((out / "report.json").read_text())["total_wall_s"] == 800
