"""The evaluation harness end to end: readers, gold vs live tool outputs, scoring, compare, endpoint.

The planner here is the scripted test double (harness logic only); the real-model run is in
test_eval_model.py.
"""

import json
import time

import httpx
import pytest

from _eval_fixtures import (
    MMEDAGENT_TEXT_OUTPUT_LINES,
    GOLD_BOX, QUESTION, direct_record, grounding_record, mmedagent_line, turn, write_image, write_json, write_jsonl,
)
from doubles import FakeGrounding, ScriptedPlanner
from mmedagent.agent import AgentStep
from mmedagent.evaluation.cli import main
from mmedagent.evaluation.readers import EvalFileError, load_samples
from mmedagent.evaluation.runner import AgentRunner, ControllerRunner, SampleResult
from mmedagent.evaluation.scoring import build_report, markdown_summary
from mmedagent.protocol import AssistantTurn, ToolOutcome, render_tool_results
from mmedagent.tools import registry

CALL_G = ("grounding dino", {"image": "<imagepath>", "prompts": ["tumor"]})
ANSWER_G = f"The tumor is at {GOLD_BOX}."


@pytest.fixture
def fake_grounding(monkeypatch):
    # discover the built-in tools first: a first discovery while the double holds the name 'grounding'
    # would skip the real grounding tool for the rest of the session (the demo model's tests need it)
    registry.list_tools()
    monkeypatch.setitem(registry._extra, FakeGrounding.name, FakeGrounding)
    return FakeGrounding


@pytest.fixture
def folder(tmp_path):
    write_image(tmp_path)
    return tmp_path


# --------------------------------------------------------------------------- readers


def test_readers_all_three_layouts(tmp_path):
    rec = load_samples(write_json(tmp_path / "r.json", [grounding_record(), direct_record()]))
    assert [s.source for s in rec] == ["record", "record"]
    g = rec[0]
    assert g.question == QUESTION and g.image == "img.png" and g.task == "grounding"
    assert [c.API_name for c in g.gold_calls] == ["grounding dino"]
    assert g.gold_results[0][0].output["boxes"] == [GOLD_BOX]
    assert g.gold_answer == ANSWER_G
    assert rec[1].gold_calls == [] and rec[1].answer_type == "closed"

    mm = load_samples(write_jsonl(tmp_path / "eval_agent_tool_use_all.jsonl", [mmedagent_line()]))[0]
    assert mm.source == "mmedagent" and mm.id == "7" and mm.task == "dino_cell"
    assert mm.gold_calls[0].API_params["prompts"] == ["cell"]
    assert mm.gold_results[0][0].output["phrases"] == ["cell"]
    assert mm.reference["fig_caption"].startswith("Cells")

    qa = load_samples(write_json(tmp_path / "slake.json", [
        {"qid": 1, "img_name": "a.png", "question": "Is this normal?", "answer": "No", "answer_type": "CLOSED", "q_lang": "en"},
        {"qid": 2, "img_name": "a.png", "question": "这是正常的吗？", "answer": "否", "answer_type": "CLOSED", "q_lang": "zh"},
        {"qid": 3, "image_name": "b.jpg", "question": "Which organ?", "answer": "liver", "answer_type": "OPEN"},
    ]))
    assert [(s.id, s.task, s.image) for s in qa] == [("1", "vqa_closed", "a.png"), ("3", "vqa_open", "b.jpg")]
    assert qa[0].gold_calls is None  # tool use is not scored on plain QA
    # a recipe's held-out split (OUT/data/heldout.jsonl) evaluates as it is; a multi-turn one is refused
    held = load_samples(write_jsonl(tmp_path / "heldout.jsonl", [
        {"id": "tiny-1", "prompt": "What is the diagnosis?", "reference": "Pneumonia.", "image": "/x/a.png",
         "options": [], "context": []},
        {"id": "tiny-2", "prompt": "Is it normal?", "reference": "yes", "image": None, "options": [], "context": []}]))
    assert [(s.id, s.task, s.image, s.question, s.gold_answer) for s in held] == [
        ("tiny-1", "vqa_open", "/x/a.png", "What is the diagnosis?", "Pneumonia."),
        ("tiny-2", "vqa_closed", None, "Is it normal?", "yes")]
    with pytest.raises(EvalFileError, match=r"dialogue.jsonl, record 0: a multi-turn held-out example"):
        load_samples(write_jsonl(tmp_path / "dialogue.jsonl", [
            {"id": "d", "prompt": "And now?", "reference": "Rest.", "context": [["user", "I cough."], ["assistant", "How long?"]]}]))


def test_a_set_converted_to_chat_messages_reads_as_the_same_samples(tmp_path):
    """`mmedagent.data convert --to sharegpt` output trains, but the evaluation refused it ("unknown record
    layout"); read through the data tools' reader it is the same samples."""
    from mmedagent.data.formats import convert

    original = write_json(tmp_path / "r.json", [grounding_record("g1"), direct_record("d1")])
    convert(original, tmp_path / "s.json", "sharegpt")
    assert "messages" in json.loads((tmp_path / "s.json").read_text())[0]

    def view(samples):
        return [(s.id, s.task, s.image, s.question, s.gold_answer, s.gold_calls, s.gold_results) for s in samples]

    assert view(load_samples(tmp_path / "s.json")) == view(load_samples(original))


def test_reader_errors_name_file_and_record(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [direct_record(), {"foo": 1}])
    with pytest.raises(EvalFileError, match=r"bad.jsonl, record 1: unknown record layout"):
        load_samples(bad)
    with pytest.raises(EvalFileError, match="not found"):
        load_samples(tmp_path / "missing.json")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "q", "answer": "a"}\n{oops\n')
    with pytest.raises(EvalFileError, match="line 2"):
        load_samples(broken)


def test_reader_takes_a_byte_order_mark_and_one_indented_record(tmp_path):
    qa = {"question": "Is there a fracture?", "answer": "no", "answer_type": "CLOSED", "image": "a.png"}
    for name, text in [("bom.json", "\ufeff" + json.dumps([qa])), ("bom.jsonl", "\ufeff" + json.dumps(qa) + "\n"),
                       ("one.json", json.dumps(qa, indent=2))]:
        (tmp_path / name).write_text(text, encoding="utf-8")
        assert [s.gold_answer for s in load_samples(tmp_path / name)] == ["no"], name


# --------------------------------------------------------------------------- gold vs live


def test_gold_mode_feeds_the_gold_tool_output_not_the_question(tmp_path, folder, fake_grounding):
    sample = load_samples(write_json(tmp_path / "r.json", [grounding_record()]))[0]
    planner = ScriptedPlanner([turn("Locating.", ("grounding", {"image": "<imagepath>", "prompts": ["tumor"]})), turn(ANSWER_G)])
    runner = AgentRunner(planner, "gold", [FakeGrounding], image_folder=folder)
    result = runner.run(sample)
    assert result.error is None and result.answer == ANSWER_G
    seen = planner.calls[1][-1]
    assert seen["role"] == "user"
    gold = ToolOutcome(tool="grounding", output={"boxes": [GOLD_BOX], "logits": [0.95], "phrases": ["tumor"]})
    assert seen["content"] == render_tool_results([gold], QUESTION)
    head = seen["content"].split("\n\nAnswer my first question:")[0]
    assert head.startswith("grounding output: {'boxes': [[0.41, 0.54, 0.76, 0.75]]") and QUESTION not in head
    assert "grounding" in planner.calls[0][0]["content"]  # system prompt lists the tools


def test_live_mode_runs_the_real_dispatcher(tmp_path, folder, fake_grounding):
    sample = load_samples(write_json(tmp_path / "r.json", [grounding_record()]))[0]
    tool = FakeGrounding()
    planner = ScriptedPlanner([turn("Locating.", CALL_G), turn("Found it at [0.12, 0.2, 0.3, 0.4].")])
    runner = AgentRunner(planner, "live", [tool], image_folder=folder)
    result = runner.run(sample)
    runner.close()
    assert tool.seen_images[0].size == (48, 40)  # the conversation image went to the tool
    assert "grounding dino output: {'boxes': [[0.12, 0.2, 0.3, 0.4]]" in planner.calls[1][-1]["content"]
    assert result.outcomes[0].ok and result.tool_s >= 0 and result.tokens > 0
    report = build_report([sample], [result], tool_mode="live")
    # the answer's box [0.12, 0.2, 0.3, 0.4] does not overlap the gold box
    assert report["overall"]["grounding_iou"] == 0.0 and report["tool_selection_accuracy"] == 1.0


class SlowLoadingGrounding(FakeGrounding):
    """Loads for longer than the tool timeout used below (as retrieval's first index build can)."""

    fail = False

    def load(self):
        time.sleep(1.0)
        super().load()
        if self.fail:
            raise RuntimeError("weights not found at /nowhere")


def test_live_tools_load_before_the_first_sample_not_inside_its_timeout(tmp_path, folder, fake_grounding):
    sample = load_samples(write_json(tmp_path / "r.json", [grounding_record()]))[0]
    tool = SlowLoadingGrounding()
    planner = ScriptedPlanner([turn("Locating.", CALL_G), turn("Found it.")])
    runner = AgentRunner(planner, "live", [tool], image_folder=folder, timeout_s=0.5)
    assert not tool.loaded  # building the runner loads nothing
    result = runner.run(sample)  # not preloaded: loads at its first call, before its timeout starts
    runner.close()
    assert tool.loads == 1 and result.outcomes[0].ok, result.outcomes[0].error
    assert result.wall_s < 1.0  # the load is not part of the sample


def test_a_live_tool_that_fails_to_load_is_reported_and_the_run_goes_on(tmp_path, folder, fake_grounding, monkeypatch, capsys):
    from mmedagent.evaluation import cli

    class Broken(SlowLoadingGrounding):
        fail = True

    data = write_json(tmp_path / "r.json", [grounding_record("g1"), grounding_record("g2")])
    planner = ScriptedPlanner([turn("Locating.", CALL_G), turn("No tool."), turn("Locating.", CALL_G), turn("Still none.")])
    runner = AgentRunner(planner, "live", [Broken()], image_folder=folder, timeout_s=0.1)
    monkeypatch.setattr(cli, "make_runner", lambda args: runner)
    out = tmp_path / "report.json"
    assert main(["--model", "x", "--data", str(data), "--json-out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "warning: tool grounding failed to load (RuntimeError: weights not found at /nowhere)" in err
    assert "loading tool" not in err  # --quiet: no progress lines, but the warning
    report = json.loads(out.read_text())
    assert report["n_samples"] == 2 and report["tool_load_errors"] == {"grounding": "RuntimeError: weights not found at /nowhere"}
    assert planner.replies == []  # both samples ran to the end
    fed = [c[-1]["content"] for c in planner.calls[1::2]]
    assert all("grounding is unavailable: it failed to load (RuntimeError: weights not found at /nowhere)" in f for f in fed)

    lines = []  # a direct caller gets the same, with progress lines
    again = AgentRunner(ScriptedPlanner([]), "live", [Broken()], timeout_s=0.1)
    assert again.preload(lines.append) == {"grounding": "RuntimeError: weights not found at /nowhere"}
    assert lines[0] == "loading tool grounding" and lines[1].startswith("tool grounding failed to load")


def test_missing_image_is_a_per_sample_error(tmp_path, fake_grounding):
    sample = load_samples(write_json(tmp_path / "r.json", [grounding_record()]))[0]
    result = AgentRunner(ScriptedPlanner([]), "gold", [FakeGrounding], image_folder=tmp_path / "nowhere").run(sample)
    assert "image not found" in result.error


def test_without_image_folder_images_are_found_beside_the_data_file_as_training_finds_them(tmp_path, monkeypatch,
                                                                                           fake_grounding):
    """A data file next to its images, evaluated from another folder: every sample failed with "image not
    found: img.png" (looked for from the working folder only), where training and data check found it."""
    (tmp_path / "set").mkdir()
    data = write_json(tmp_path / "set" / "r.json", [grounding_record()])
    write_image(tmp_path / "set")
    monkeypatch.chdir(tmp_path)
    sample = load_samples(data)[0]
    planner = ScriptedPlanner([turn("Locating.", ("grounding dino", {"prompts": ["tumor"]})), turn("Done.")])
    runner = AgentRunner(planner, "gold", [FakeGrounding], data_folder=data.parent)
    assert runner.run(sample).error is None
    (tmp_path / "set" / "img.png").unlink()
    error = AgentRunner(ScriptedPlanner([]), "gold", [FakeGrounding], data_folder=data.parent).run(sample).error
    assert error == f"image not found: img.png (looked for {data.parent / 'img.png'} and img.png; give --image-folder)"


# --------------------------------------------------------------------------- scoring


def _four_sample_run(tmp_path, folder):
    data = write_json(tmp_path / "mix.json", [
        grounding_record("g1"), grounding_record("g2"), direct_record("d1"), direct_record("d2"),
    ])
    samples = load_samples(data)
    planner = ScriptedPlanner([
        turn("Locating.", CALL_G), turn(ANSWER_G),  # g1: right tool, exact box
        turn("Guess.", ("xray magic", {})), turn("I could not find it."),  # g2: wrong (unknown) tool
        "Yes, it is.",  # d1: plain answer, no tool, correct
        turn("Look.", ("grounding", {"prompts": ["chest"]})), turn("No."),  # d2: needless tool, wrong answer
    ])
    runner = AgentRunner(planner, "gold", [FakeGrounding], image_folder=folder)
    return samples, [runner.run(s) for s in samples]


def test_report_known_values(tmp_path, folder, fake_grounding):
    samples, results = _four_sample_run(tmp_path, folder)
    report = build_report(samples, results, tool_mode="gold", meta={"name": "before"})
    o = report["overall"]
    assert report["tool_selection_accuracy"] == o["tool_selection_accuracy"] == 0.5
    assert report["per_task"]["grounding"]["tool_selection_accuracy"] == 0.5
    assert report["per_task"]["vqa"]["tool_selection_accuracy"] == 0.5
    assert o["call_precision"] == pytest.approx(1 / 3) and o["call_recall"] == 0.5  # tp 1; pred 3; gold 2
    assert o["argument_validity"] == pytest.approx(2 / 3)  # 'xray magic' is not a registered tool
    assert o["argument_match"] == 1.0
    assert o["grounding_iou"] == 0.5 and o["map50"] == 0.5  # 1 of 2 gold boxes found, at precision 1
    assert o["vqa_closed_accuracy"] == 0.5
    assert o["answer_f1"] == 0.5 and report["per_task"]["grounding"]["rouge_l"] == 0.5
    assert o["steps_per_turn"] == pytest.approx(7 / 4)
    assert o["dice"] is None and o["rag_recall_at_k"] is None  # nothing to score in gold mode
    json.dumps(report)  # serialisable as is
    table = markdown_summary(report)
    assert "| tool_selection_accuracy | 0.500 | 0.500 | 0.500 |" in table


def test_compare_writes_markdown_png_and_examples(tmp_path, folder, fake_grounding):
    samples, results = _four_sample_run(tmp_path, folder)
    before = build_report(samples, results, tool_mode="gold", meta={"name": "before"})
    good = ScriptedPlanner([turn("Locating.", CALL_G), turn(ANSWER_G)] * 2 + ["Yes.", "Yes."])
    runner = AgentRunner(good, "gold", [FakeGrounding], image_folder=folder)
    after = build_report(samples, [runner.run(s) for s in samples], tool_mode="gold", meta={"name": "after"})
    assert after["tool_selection_accuracy"] == 1.0
    a, b = write_json(tmp_path / "a.json", before), write_json(tmp_path / "b.json", after)
    out = tmp_path / "cmp"
    assert main(["--compare", str(a), str(b), "--out", str(out)]) == 0
    md = (out / "compare.md").read_text()
    assert "| tool_selection_accuracy | 0.500 | 1.000 | +0.500 |" in md
    assert "| tool_selection_accuracy [vqa] | 0.500 | 1.000 | +0.500 |" in md
    assert "- before: I could not find it." in md and "- after: " + ANSWER_G in md
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Not like for like" not in md
    assert main(["--compare", str(a), str(tmp_path / "mix.json"), "--out", str(out)]) == 2  # not a report
    # runs over other data or tool modes are compared, with the difference said first
    other = build_report(samples[:2], results[:2], tool_mode="live", meta={"name": "other"})
    assert main(["--compare", str(a), str(write_json(tmp_path / "o.json", other)), "--out", str(out)]) == 0
    md = (out / "compare.md").read_text()
    assert "Not like for like" in md and "n_samples: 4 vs 2" in md and "tool_mode: gold vs live" in md
    assert "samples: 2 in common, 2 only in A, 0 only in B" in md


def test_compare_tells_data_files_apart_by_content_not_path(tmp_path, folder, fake_grounding):
    """One data file under two paths is the same data; a file changed between the runs (a corrected gold
    answer, same path) is not, and the comparison says so."""
    samples, results = _four_sample_run(tmp_path, folder)

    def report(name, data, sha):
        meta = {"name": name, "data": data, "data_sha256": sha}
        return write_json(tmp_path / f"{name}.json", build_report(samples, results, tool_mode="gold", meta=meta))

    out = tmp_path / "cmp"
    a = report("a", "eval.json", "1" * 64)
    assert main(["--compare", str(a), str(report("b", "/data/eval.json", "1" * 64)), "--out", str(out)]) == 0
    assert "Not like for like" not in (out / "compare.md").read_text()
    assert main(["--compare", str(a), str(report("c", "eval.json", "2" * 64)), "--out", str(out)]) == 0
    assert "Not like for like" in (out / "compare.md").read_text()
    assert "data: eval.json vs eval.json (other content)" in (out / "compare.md").read_text()


def test_compare_names_the_k_of_rag_recall_and_warns_when_it_differs(tmp_path, folder, fake_grounding):
    samples, results = _four_sample_run(tmp_path, folder)

    def report(name, k, recall):
        r = build_report(samples, results, tool_mode="live", k=k, meta={"name": name})
        r["overall"]["rag_recall_at_k"] = recall  # as a live run with retrieval samples records it
        return write_json(tmp_path / f"{name}.json", r)

    out = tmp_path / "cmp"
    assert main(["--compare", str(report("a", 5, 0.5)), str(report("b", 5, 0.75)), "--out", str(out)]) == 0
    md = (out / "compare.md").read_text()
    assert "| rag_recall@5 | 0.500 | 0.750 | +0.250 |" in md and "Not like for like" not in md
    assert main(["--compare", str(report("a", 5, 0.5)), str(report("c", 10, 0.75)), "--out", str(out)]) == 0
    md = (out / "compare.md").read_text()
    assert "Not like for like" in md and "RAG recall at k 5 vs 10" in md and "| rag_recall@k | 0.500 | 0.750 |" in md


def test_mmedagent_text_tool_outputs_are_scored_as_labels_and_reports(tmp_path, folder):
    """MMedAgent's eval lines give BiomedClip, ChatCAD-G and ChatCAD-R outputs as plain text: in gold mode
    the planner reads them verbatim, the BiomedClip text is the gold label and the ChatCAD-G text the gold report."""
    lines = [*MMEDAGENT_TEXT_OUTPUT_LINES, {**MMEDAGENT_TEXT_OUTPUT_LINES[0], "question_id": 42,
                                            "text": "BiomedClip output: chest X-ray\n\nAnswer my first question: Which scan?"}]
    samples = load_samples(write_jsonl(tmp_path / "eval_agent_tool_use_all.jsonl", lines))
    report_text = samples[1].gold_results[0][0].text
    plan = [turn("Classifying.", ("BiomedClip", {})), turn("It is a lung CT."),
            turn("Reporting.", ("ChatCAD-G", {})), turn(report_text),
            turn("Retrieving.", ("ChatCAD-R", {})), turn("Seek immediate medical attention."),
            turn("Classifying.", ("BiomedClip", {})), turn("It is a lung CT.")]
    planner = ScriptedPlanner(plan)
    runner = AgentRunner(planner, "gold", [], image_folder=folder)
    results = [runner.run(s) for s in samples]
    assert planner.calls[1][-1]["content"] == lines[0]["text"]  # the text output fed back as it was given
    report = build_report(samples, results, tool_mode="gold")
    assert [r.error for r in results] == [None] * 4 and report["tool_selection_accuracy"] == 1.0
    assert [s["scores"].get("gold_label") for s in report["samples"]] == ["lung CT", None, None, "chest X-ray"]
    assert report["per_task"]["class"]["classification_accuracy"] == 0.5  # the second answer names lung CT too
    assert report["samples"][1]["gold_answer"] == report_text
    assert report["per_task"]["mrg"]["rouge_l"] == 1.0 and report["per_task"]["mrg"]["bleu4"] == pytest.approx(1.0)
    assert report["per_task"]["rag"]["rouge_l"] is None  # a retrieved passage is not a reference answer


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["--model", "x", "--data", str(tmp_path / "none.json")]) == 2
    assert "evaluation file not found" in capsys.readouterr().err
    assert main(["--data", "x"]) == 2


# --------------------------------------------------------------------------- controller endpoint


def test_controller_endpoint_reads_mmedagent_trace(tmp_path, folder, fake_grounding):
    sample = load_samples(write_json(tmp_path / "r.json", [grounding_record()]))[0]
    # the controller's step view (serve/controller.py step_view), and an AgentStep dump
    step = {
        "index": 0, "thoughts": "Locating.", "actions": [{"API_name": "grounding dino", "API_params": {"prompts": ["tumor"]}}],
        "value": "Please wait.", "parse_error": None, "raw": turn("Locating.", CALL_G), "model_s": 0.5, "tools_s": 0.25,
        "outcomes": [{"tool": "grounding dino", "ok": True, "output": {"boxes": [[0.4, 0.54, 0.76, 0.75]], "logits": [0.9]}}],
        "overlays": [None],
    }
    final = AgentStep(index=1, raw="It is in the lower right.", turn=AssistantTurn(value="It is in the lower right."))
    seen = []

    def handler(request):
        body = json.loads(request.content)
        seen.append(body)
        return httpx.Response(200, json={
            "choices": [{"message": {"role": "assistant", "content": "It is in the lower right."}}],
            "usage": {"completion_tokens": 12},
            "mmedagent_trace": {"steps": [step, final.model_dump(mode="json")], "stopped": "answer"},
        })

    runner = ControllerRunner("http://127.0.0.1:9/v1", image_folder=folder)
    runner.planner.client = httpx.Client(transport=httpx.MockTransport(handler))
    result = runner.run(sample)
    parts = seen[0]["messages"][0]["content"]
    assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,") and parts[1]["text"] == QUESTION
    assert [c.API_name for c in result.calls] == ["grounding dino"] and result.tokens == 12 and result.tool_s == 0.25
    assert result.stopped == "answer" and len(result.steps) == 2
    report = build_report([sample], [result], tool_mode="live")
    # no box in the answer text: the live tool's box is scored, IoU of [.4,.54,.76,.75] vs [.41,.54,.76,.75]
    assert report["overall"]["grounding_iou"] == pytest.approx((0.35 * 0.21) / (0.36 * 0.21))

    runner.planner.client = httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(200, json={"choices": [{"message": {"content": "hi"}}]})))
    assert "mmedagent_trace" in runner.run(sample).error


def test_a_controller_still_loading_tools_is_waited_for_before_the_first_sample():
    """Samples asked while a tool still loads would be planned with a shorter catalog than the rest."""
    polls, said = [], []

    def handler(request):
        assert request.url.path == "/v1/status"
        polls.append(1)
        return httpx.Response(200, json={"models": [], "loading": ["retrieval"] if len(polls) < 3 else []})

    runner = ControllerRunner("http://127.0.0.1:9", image_folder=".")
    runner.planner.client = httpx.Client(transport=httpx.MockTransport(handler))
    assert runner.preload(said.append, poll_s=0.01) == {}
    assert len(polls) == 3 and said == ["waiting for the controller's tools still loading: retrieval"]
    polls.clear()
    said.clear()
    runner.planner.client = httpx.Client(transport=httpx.MockTransport(
        lambda r: httpx.Response(200, json={"loading": ["retrieval"]})))
    runner.preload(said.append, wait_s=0.05, poll_s=0.01)
    assert said[-1].startswith("warning: tools still loading after 0 s: retrieval")


# --------------------------------------------------------------------------- failures and interruptions


def _endpoint(*answers):
    """An OpenAI-compatible endpoint answering (status, body) pairs in turn."""
    queue = list(answers)
    return httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(queue[0][0], json=queue.pop(0)[1])))


def test_a_planner_failure_is_that_samples_error_and_the_run_goes_on(tmp_path, folder, fake_grounding):
    from mmedagent.serve.remote import OpenAIPlanner

    samples = load_samples(write_json(tmp_path / "r.json", [direct_record(f"d{i}") for i in range(3)]))
    planner = OpenAIPlanner("http://127.0.0.1:9/v1", "m")
    planner.client = _endpoint(
        (500, {"error": {"message": "CUDA out of memory", "type": "server_error", "param": None, "code": None}}),
        (200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Yes."}, "finish_reason": "stop"}],
               "usage": {"prompt_tokens": 30, "completion_tokens": 2}}),
        (200, {"choices": [{"message": {"content": "Yes, it is."}}]}),
    )
    runner = AgentRunner(planner, "gold", [FakeGrounding], image_folder=folder)
    first, second = runner.run(samples[0]), runner.run(samples[1])
    assert first.error == "planner failed: WorkerError: model backend http://127.0.0.1:9/v1: CUDA out of memory"
    assert second.error is None and second.answer == "Yes."
    assert second.tokens == 2 and runner.tokens_counted_by == "usage"  # the endpoint's count, not a local model's
    assert runner.run(samples[2]).tokens == 3 and runner.tokens_counted_by == "words"  # no usage sent


def test_a_failed_sample_never_counts_as_a_right_tool_choice(tmp_path):
    """A no-tool gold answer is matched by making no call, but not by failing before any."""
    samples = load_samples(write_json(tmp_path / "r.json", [direct_record()]))
    report = build_report(samples, [SampleResult(id="d1", task="vqa", error="image not found: x.png")], tool_mode="gold")
    assert report["tool_selection_accuracy"] == 0.0


def test_controller_endpoint_failures_are_per_sample_with_the_servers_reason(tmp_path, folder):
    sample = load_samples(write_json(tmp_path / "r.json", [grounding_record()]))[0]
    runner = ControllerRunner("http://127.0.0.1:9/v1", image_folder=folder)
    runner.planner.client = _endpoint((404, {"detail": "no model worker is serving 'x'"}), (200, {"choices": []}))
    assert runner.run(sample).error == "endpoint error: model backend http://127.0.0.1:9/v1: no model worker is serving 'x'"
    assert runner.run(sample).error == "endpoint error: unreadable response (IndexError: list index out of range)"


class InterruptedPlanner(ScriptedPlanner):
    def generate(self, messages, image, **gen):
        if not self.replies:
            raise KeyboardInterrupt
        return super().generate(messages, image, **gen)


def test_ctrl_c_writes_the_report_of_the_samples_done(tmp_path, folder, fake_grounding, monkeypatch):
    import mmedagent.evaluation.cli as cli

    data = write_json(tmp_path / "r.json", [direct_record("d1"), direct_record("d2"), direct_record("d3")])
    monkeypatch.setattr(cli, "make_runner", lambda args: AgentRunner(InterruptedPlanner(["Yes."]), "gold", [FakeGrounding], image_folder=folder))
    out = tmp_path / "partial.json"
    assert main(["--model", "m", "--data", str(data), "--json-out", str(out), "--quiet"]) == 130
    report = json.loads(out.read_text())
    assert report["interrupted"] == "after 1 of 3 samples" and report["n_samples"] == 1
    assert report["samples"][0]["answer"] == "Yes." and report["overall"]["vqa_closed_accuracy"] == 1.0


def test_a_judge_failure_does_not_lose_the_evaluation(tmp_path, monkeypatch, capsys):
    from mmedagent.evaluation import judge as J

    class Judge(J.OpenAIPlanner):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.client = _endpoint((429, {"error": {"message": "Rate limit reached", "type": "requests"}}),
                                    (200, {"choices": [{"message": {"role": "assistant", "content": "8"}}]}))

    monkeypatch.setattr(J, "OpenAIPlanner", Judge)
    samples = load_samples(write_json(tmp_path / "r.json", [direct_record("d1"), direct_record("d2")]))
    results = [SampleResult(id=s.id, task=s.task, answer="Yes.") for s in samples]
    assert J.judge(samples, results, "http://judge/v1", "j") == [None, 8.0]
    assert "judge failed on 1 samples" in capsys.readouterr().err


def test_judge_replies_without_a_grade_are_counted_not_read_as_one(tmp_path, monkeypatch, capsys):
    from mmedagent.evaluation import judge as J

    class Judge(J.OpenAIPlanner):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.client = _endpoint(*[(200, {"choices": [{"message": {"role": "assistant", "content": text}}]})
                                      for text in ("On a scale of 1 to 10", "7")])

    monkeypatch.setattr(J, "OpenAIPlanner", Judge)
    samples = load_samples(write_json(tmp_path / "r.json", [direct_record("d1"), direct_record("d2")]))
    results = [SampleResult(id=s.id, task=s.task, answer="Yes.") for s in samples]
    assert J.judge(samples, results, "http://judge/v1", "j") == [None, 7.0]
    assert "1 judge replies held no grade from 1 to 10 (not judged)" in capsys.readouterr().err


def test_the_judge_grades_a_report_against_the_gold_report_text(tmp_path, monkeypatch):
    from mmedagent.evaluation import judge as J

    class Judge(J.OpenAIPlanner):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.client = _endpoint((200, {"choices": [{"message": {"role": "assistant", "content": "7"}}]}))

    monkeypatch.setattr(J, "OpenAIPlanner", Judge)
    mrg = MMEDAGENT_TEXT_OUTPUT_LINES[1]  # no fig_caption: the ChatCAD-G text is the only reference
    samples = load_samples(write_jsonl(tmp_path / "e.jsonl", [mrg]))
    results = [SampleResult(id=s.id, task=s.task, answer="Clear lungs.") for s in samples]
    assert J.judge(samples, results, "http://judge/v1", "j") == [7.0]


# --------------------------------------------------------------------------- VQA tables, bad gold, duplicates


def test_vqa_table_scores_by_hand(tmp_path, folder, monkeypatch):
    """A VQA-RAD-style table (closed and open) and a PathVQA-style one (no answer_type: yes/no is closed),
    scored through the CLI; every value below is worked out by hand."""
    import mmedagent.evaluation.cli as cli

    data = write_json(tmp_path / "vqa.json", [
        {"qid": 1, "image_name": "img.png", "question": "Is there a fracture?", "answer": "No", "answer_type": "CLOSED"},
        {"qid": 2, "image_name": "img.png", "question": "Is the heart enlarged?", "answer": "yes", "answer_type": "CLOSED "},
        {"qid": 3, "image_name": "img.png", "question": "Which organ?", "answer": "the left lung", "answer_type": "OPEN"},
        {"qid": 4, "image_name": "img.png", "question": "What lesion?", "answer": "left lower lobe mass", "answer_type": "OPEN"},
        {"id": "p5", "image": "img.png", "question": "Is it benign?", "answer": "yes"},  # PathVQA: no answer_type
    ])
    replies = ["No, there is no fracture.", "It is not enlarged.", "Left lung.", "A mass in the lung.", "Yes."]
    monkeypatch.setattr(cli, "make_runner", lambda args: AgentRunner(ScriptedPlanner(replies), "gold", [], image_folder=folder))
    out = tmp_path / "r.json"
    assert main(["--model", "m", "--data", str(data), "--json-out", str(out), "--quiet"]) == 0
    report = json.loads(out.read_text())
    o, per = report["overall"], report["per_task"]
    assert set(per) == {"vqa_closed", "vqa_open"} and per["vqa_closed"]["n"] + per["vqa_open"]["n"] == o["n"] == 5
    assert o["vqa_closed_accuracy"] == pytest.approx(2 / 3)  # no ✓, "not enlarged" vs yes ✗, PathVQA yes ✓
    # open 3: {left, lung} vs {left, lung} -> F1 1, recall 1; open 4: {mass, in, lung} vs {left, lower, lobe, mass}
    # -> common 1, P 1/3, R 1/4, F1 2/7
    assert o["vqa_open_f1"] == pytest.approx((1 + 2 / 7) / 2)
    assert o["vqa_open_recall"] == pytest.approx((1 + 1 / 4) / 2)
    assert o["tool_selection_accuracy"] is None  # QA tables say nothing about tool use
    assert "| vqa_open_recall |" in markdown_summary(report)


def test_reader_refuses_gold_it_cannot_score(tmp_path):
    """Bad gold stops the evaluation before any model runs, naming the record and field — instead of a
    crash after the whole run (flipped box, undecodable mask, label not text) or a silent wrong score
    (a missing answer read as the word 'None', i.e. 'no'; a string of sources read letter by letter;
    an MMedAgent line without its gold turn scored as 'call no tool')."""
    def gold(**g):
        return {**grounding_record(), "gold": g}

    cases = [
        (gold(boxes=[[0.5, 0.5, 0.1, 0.1]]), "gold.boxes: box [0.5, 0.5, 0.1, 0.1] has x1 > x2 or y1 > y2"),
        (gold(boxes=[[0.1, 0.2, 0.3]]), "is not an [x1, y1, x2, y2] box"),
        (gold(label=3), "gold.label must be a non-empty string"),
        (gold(relevant="I10"), "gold.relevant must be a list"),
        (gold(masks=[{"size": [2, 2], "counts": [9]}]), "gold.masks: not a mask"),
        (grounding_record(box=[0.76, 0.54, 0.41, 0.75]), "gold grounding dino output boxes: box"),
        ({"qid": 1, "question": "Is it?", "answer": None, "answer_type": "CLOSED"}, "field 'answer' is empty"),
        ({"qid": 1, "question": "Is it?", "answer": " ", "answer_type": "CLOSED"}, "field 'answer' is empty"),
        ({k: v for k, v in mmedagent_line().items() if k != "assist"}, "missing field 'assist'"),
        ({k: v for k, v in mmedagent_line().items() if k != "text"}, "field 'text' (the gold tool output)"),
    ]
    for i, (record, message) in enumerate(cases):
        path = write_jsonl(tmp_path / f"bad{i}.jsonl", [direct_record(), record])
        with pytest.raises(EvalFileError) as e:
            load_samples(path)
        assert f"bad{i}.jsonl, record 1: " in str(e.value) and message in str(e.value), (i, str(e.value))
    # what is fine stays fine: an empty mask's [] box in a segmentation output, integer sources
    ok = {**grounding_record(), "gold": {"relevant": ["I10", 401]}}
    ok["conversations"][2]["value"] = render_tool_results(
        [ToolOutcome(tool="MedSAM", output={"boxes": [[], GOLD_BOX]})], QUESTION)
    assert load_samples(write_json(tmp_path / "ok.json", [ok]))[0].reference["relevant"] == ["I10", 401]


def test_samples_sharing_an_id_keep_their_own_gold_boxes(tmp_path):
    """mAP pairs detections with the gold boxes of the same sample, even where two samples share an id
    (both answers below miss: each quotes the other sample's box)."""
    other = [0.1, 0.1, 0.3, 0.3]
    samples = load_samples(write_json(tmp_path / "r.json", [grounding_record("g"), grounding_record("g", box=other)]))
    results = [SampleResult(id="g", task="grounding", answer=f"At {other}."),
               SampleResult(id="g", task="grounding", answer=f"At {GOLD_BOX}.")]
    o = build_report(samples, results, tool_mode="gold")["overall"]
    assert o["grounding_iou"] == 0.0 and o["map50"] == 0.0


def test_a_live_box_with_x1_after_x2_is_a_miss_not_a_crash(tmp_path):
    sample = load_samples(write_json(tmp_path / "r.json", [grounding_record()]))[0]
    flipped = [GOLD_BOX[2], GOLD_BOX[1], GOLD_BOX[0], GOLD_BOX[3]]
    step = AgentStep(index=0, raw="", outcomes=[ToolOutcome(tool="grounding", output={"boxes": [flipped, GOLD_BOX], "logits": [0.9, 0.5]})])
    report = build_report([sample], [SampleResult(id="g1", task="grounding", answer="Found.", steps=[step])], tool_mode="live")
    assert report["samples"][0]["scores"]["pred_boxes"] == [GOLD_BOX] and report["overall"]["grounding_iou"] == 1.0


def test_the_judge_grades_a_failed_sample_lowest_and_the_table_shows_it(tmp_path, monkeypatch):
    from mmedagent.evaluation import judge as J

    class Judge(J.OpenAIPlanner):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.client = _endpoint((200, {"choices": [{"message": {"role": "assistant", "content": "Score: 9/10"}}]}))

    monkeypatch.setattr(J, "OpenAIPlanner", Judge)
    samples = load_samples(write_json(tmp_path / "r.json", [direct_record("d1"), direct_record("d2")]))
    results = [SampleResult(id="d1", task="vqa", answer="Yes."), SampleResult(id="d2", task="vqa", error="image not found: x.png")]
    scores = J.judge(samples, results, "http://judge/v1", "j")
    assert scores == [9.0, 1.0]  # the failed sample is not left out of the mean (it would read 9.0)
    report = build_report(samples, results, tool_mode="gold", judge=scores)
    assert report["overall"]["judge_score"] == 5.0
    assert "| judge_score | 5.000 | 5.000 |" in markdown_summary(report)


def test_cli_refuses_bad_numbers_and_options_up_front(tmp_path, capsys):
    data = write_json(tmp_path / "r.json", [direct_record()])
    for flag, value, message in [("--limit", "0", "must be at least 1, got 0"), ("--k", "-1", "must be at least 1"),
                                 ("--max-new-tokens", "x", "expected a whole number"),
                                 ("--tool-options", "{bad", "not valid JSON"), ("--tool-options", "[1]", "must be a JSON object")]:
        with pytest.raises(SystemExit) as e:
            main(["--model", "m", "--data", str(data), flag, value])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert flag in err and message in err, err


def test_compare_pairs_samples_sharing_an_id_in_order(tmp_path):
    """Two samples with one id stay two in compare: each is paired with its counterpart, not both with the last."""
    samples = load_samples(write_json(tmp_path / "r.json", [grounding_record("g", question="First?"),
                                                             grounding_record("g", question="Second?")]))

    def report(name, answers):
        results = [SampleResult(id="g", task="grounding", answer=a) for a in answers]
        return write_json(tmp_path / f"{name}.json", build_report(samples[: len(answers)], results, tool_mode="gold",
                                                                  meta={"name": name}))

    a, b = report("before", ["a first", "a second"]), report("after", ["b first", "b second"])
    assert main(["--compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "First?\n\n- gold: " in md and "- before: a first (tools: –)\n- after: b first (tools: –)" in md
    assert "- before: a second (tools: –)\n- after: b second (tools: –)" in md and "Not like for like" not in md
    assert main(["--compare", str(a), str(report("half", ["b first"])), "--out", str(tmp_path / "cmp")]) == 0
    assert "samples: 1 in common, 1 only in A, 0 only in B" in (tmp_path / "cmp" / "compare.md").read_text()
