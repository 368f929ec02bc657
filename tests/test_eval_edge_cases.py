"""The evaluation on awkward input: malformed records and gold, a judge that cannot be reached, Ctrl-C outside
the sample loop, failed samples in rates, masks of another size, a ``Box`` tool parameter."""

import json

import httpx
import numpy as np
import pytest

from _eval_fixtures import direct_record, grounding_record, write_image, write_json
from doubles import ScriptedPlanner
from mmedagent.agent import AgentStep
from mmedagent.evaluation import cli
from mmedagent.evaluation.cli import main
from mmedagent.evaluation.readers import EvalFileError, load_samples
from mmedagent.evaluation.runner import AgentRunner, SampleResult
from mmedagent.evaluation.scoring import build_report
from mmedagent.protocol import ToolCall
from mmedagent.tools import Box, Tool, ToolParams, ToolResult, registry


def segmentation_record(box, masks=None):
    record = {
        "id": "s1", "image": "img.png",
        "conversations": [
            {"from": "human", "value": "<image>\nSegment the lesion."},
            {"from": "gpt", "thoughts": "Segment.", "value": "Please wait.",
             "actions": [{"API_name": "segmentation", "API_params": {"boxes": [box]}}]},
        ],
    }
    if masks is not None:
        record["gold"] = {"masks": masks}
    return record


def rle(height, width):
    from mmedagent.tools._boxes import encode_rle

    return encode_rle(np.zeros((height, width), dtype=bool))


def no_model(args):
    raise AssertionError("the model was loaded")


# --------------------------------------------------------------------------- reading


def test_a_malformed_record_names_its_field(tmp_path):
    bad = {"id": 1, "conversations": [{"from": "human", "value": "hi"},
                                      {"from": "gpt", "thoughts": "x", "actions": "grounding", "value": "y"}]}
    with pytest.raises(EvalFileError) as e:
        load_samples(write_json(tmp_path / "r.json", [bad]))
    assert str(e.value) == f"{tmp_path / 'r.json'}, record 0: 'conversations.1.actions': Input should be a valid list"


def test_a_gold_call_box_out_of_order_is_refused_when_read(tmp_path):
    """It used to pass the reader and end the evaluation after every sample had run, naming no record."""
    data = write_json(tmp_path / "r.json", [direct_record(), segmentation_record([0.5, 0.5, 0.1, 0.1])])
    with pytest.raises(EvalFileError, match=r"record 1: gold segmentation call's 'boxes': box \[0.5, 0.5, 0.1, 0.1\] "
                                            r"has x1 > x2 or y1 > y2"):
        load_samples(data)
    other = segmentation_record([0.5, 0.5, 0.1, 0.1])  # a tool whose 4-number lists are no xyxy boxes (x, y, w, h)
    other["conversations"][1]["actions"] = [{"API_name": "hosp_measure", "API_params": {"bbox": [[0.5, 0.5, 0.1, 0.1]]}}]
    assert load_samples(write_json(tmp_path / "o.json", [other]))[0].gold_calls[0].API_name == "hosp_measure"


class RegionStats(Tool):
    """The README's example tool: one ``Box`` parameter."""

    name = "region_stats"
    description = "statistics inside a box"

    class Params(ToolParams):
        box: Box = [0, 0, 1, 1]

    class Result(ToolResult):
        mean: float

    def load(self):
        pass

    def __call__(self, image, params):
        return self.Result(mean=0.0)


def test_a_box_parameter_is_matched_by_iou_not_equality(monkeypatch):
    from mmedagent.evaluation.tooluse import argument_match

    registry.list_tools()
    monkeypatch.setitem(registry._extra, RegionStats.name, RegionStats)
    gold = ToolCall(API_name="region_stats", API_params={"box": [0.2, 0.2, 0.6, 0.6]})
    close = ToolCall(API_name="region_stats", API_params={"box": [0.2, 0.2, 0.6, 0.62]})
    flipped = ToolCall(API_name="region_stats", API_params={"box": [0.6, 0.2, 0.2, 0.6]})
    assert argument_match(close, gold) == pytest.approx(0.16 / (0.16 + 0.4 * 0.02))
    assert argument_match(flipped, gold) == 0.0


# --------------------------------------------------------------------------- scoring


def test_a_failed_sample_is_not_counted_as_a_plan_without_parse_error(tmp_path):
    samples = load_samples(write_json(tmp_path / "r.json", [direct_record("d1"), direct_record("d2")]))
    results = [SampleResult(id="d1", task="vqa", answer="x", steps=[AgentStep(index=0, raw="{", parse_error="bad")]),
               SampleResult(id="d2", task="vqa", error="image not found: x.png")]
    report = build_report(samples, results, tool_mode="gold")
    assert report["overall"]["parse_error_rate"] == 1.0  # was 0.5: the failed sample never planned
    assert report["samples"][1]["scores"]["parse_error"] is None


def test_a_failed_sample_scores_no_dice_even_against_an_empty_gold_mask(tmp_path):
    samples = load_samples(write_json(tmp_path / "r.json", [segmentation_record([0.1, 0.1, 0.5, 0.5], [rle(4, 4)])]))
    report = build_report(samples, [SampleResult(id="s1", task="segmentation", error="planner failed")], tool_mode="live")
    assert report["overall"]["dice"] == 0.0


def test_gold_masks_of_another_size_than_the_image_are_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """The run used to go through every sample and then end in 'mask shapes differ', with no report."""
    write_image(tmp_path, size=(48, 40))
    data = write_json(tmp_path / "r.json", [segmentation_record([0.1, 0.1, 0.5, 0.5], [rle(32, 32)])])
    monkeypatch.setattr(cli, "make_runner", no_model)
    assert main(["--model", "m", "--data", str(data), "--image-folder", str(tmp_path), "--quiet"]) == 2
    assert f"{data}, record 0: gold.masks are 32x32 pixels but its image is 48x40" in capsys.readouterr().err


# --------------------------------------------------------------------------- the command line


def test_an_image_folder_that_is_not_there_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    data = write_json(tmp_path / "r.json", [direct_record()])
    monkeypatch.setattr(cli, "make_runner", no_model)
    assert main(["--model", "m", "--data", str(data), "--image-folder", str(tmp_path / "nowhere")]) == 2
    assert f"--image-folder {tmp_path / 'nowhere'} is not a folder" in capsys.readouterr().err


def test_an_unknown_tool_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    import mmedagent.model

    data = write_json(tmp_path / "r.json", [direct_record()])
    monkeypatch.setattr(mmedagent.model, "load_planner", no_model)
    assert main(["--model", str(tmp_path), "--data", str(data), "--tool-mode", "gold", "--tools", "magic"]) == 2
    assert "unknown tool 'magic'" in capsys.readouterr().err


def main_or_fail(argv):
    """``main``, with a Ctrl-C that escapes it failing the test instead of stopping pytest."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the command as a traceback")


class CtrlC(ScriptedPlanner):
    def generate(self, messages, image, **gen):
        raise KeyboardInterrupt


def test_ctrl_c_before_the_first_sample_finishes_is_one_line(tmp_path, monkeypatch, capsys):
    write_image(tmp_path)
    data = write_json(tmp_path / "r.json", [direct_record()])
    monkeypatch.setattr(cli, "make_runner", lambda args: AgentRunner(CtrlC([]), "gold", [], image_folder=tmp_path))
    assert main_or_fail(["--model", "m", "--data", str(data), "--image-folder", str(tmp_path), "--quiet"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted: nothing scored this time"


def test_ctrl_c_while_judging_keeps_the_scored_report(tmp_path, monkeypatch, capsys):
    from mmedagent.evaluation import judge as J

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    write_image(tmp_path)
    data = write_json(tmp_path / "r.json", [direct_record("d1"), direct_record("d2")])
    monkeypatch.setattr(cli, "make_runner", lambda args: AgentRunner(ScriptedPlanner(["Yes.", "No."]), "gold", [],
                                                                     image_folder=tmp_path))
    monkeypatch.setattr(J, "judge", interrupted)
    out = tmp_path / "report.json"
    assert main_or_fail(["--model", "m", "--data", str(data), "--image-folder", str(tmp_path), "--quiet",
                         "--judge-url", "http://judge/v1", "--json-out", str(out)]) == 130
    report = json.loads(out.read_text())
    assert report["interrupted"] == "while judging" and report["n_samples"] == 2
    assert report["overall"]["vqa_closed_accuracy"] == 0.5 and "judge_score" not in report["overall"]
    assert "interrupted while judging" in capsys.readouterr().err


# --------------------------------------------------------------------------- the judge


def judge_at(monkeypatch, handler, seen=None):
    """The judge module with its endpoint answered by ``handler``; ``seen`` gets each client's headers."""
    from mmedagent.evaluation import judge as J

    class Judge(J.OpenAIPlanner):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if seen is not None:
                seen.append(dict(self.client.headers))
            self.client = httpx.Client(transport=httpx.MockTransport(handler))

    monkeypatch.setattr(J, "OpenAIPlanner", Judge)
    return J


def test_a_judge_that_cannot_be_reached_gives_no_judge_score(tmp_path, monkeypatch, capsys):
    """The failed sample's lowest grade alone used to make judge_score 1.0."""
    def refused(request):
        raise httpx.ConnectError("Connection refused", request=request)

    J = judge_at(monkeypatch, refused)
    samples = load_samples(write_json(tmp_path / "r.json", [direct_record("d1"), direct_record("d2")]))
    results = [SampleResult(id="d1", task="vqa", answer="Yes."), SampleResult(id="d2", task="vqa", error="failed")]
    scores = J.judge(samples, results, "http://judge/v1")
    assert scores == [None, None]
    assert build_report(samples, results, tool_mode="gold", judge=scores)["overall"]["judge_score"] is None
    assert "the judge failed on all 1 samples it was asked about, so nothing is judged" in capsys.readouterr().err


def test_the_judge_gets_the_key_of_the_variable_named_and_no_other(tmp_path, monkeypatch):
    """The judge's server gets one key, the one --judge-key-env names (default OPENAI_API_KEY): with both set,
    the controller's key went to OpenAI (a 401, and the key handed to a third party)."""
    seen = []
    judge_at(monkeypatch, lambda request: httpx.Response(200, json={"choices": [{"message": {"content": "8"}}]}),
                 seen)
    monkeypatch.setenv("MMEDAGENT_API_KEY", "controller-key-0123456789")
    monkeypatch.setenv("OPENAI_API_KEY", "judge-key")
    monkeypatch.setenv("MY_JUDGE_KEY", "my-judge-key")
    data = write_json(tmp_path / "r.json", [grounding_record()])
    predictions = tmp_path / "p.jsonl"
    predictions.write_text(json.dumps({"id": "g1", "answer": "There."}) + "\n")
    for extra, key in (([], "judge-key"), (["--judge-key-env", "MY_JUDGE_KEY"], "my-judge-key"),
                       (["--judge-key-env", "UNSET_JUDGE_KEY"], None)):
        seen.clear()
        assert main(["--predictions", str(predictions), "--data", str(data), "--judge-url", "http://judge/v1", *extra]) == 0
        assert seen and seen[0].get("authorization") == (f"Bearer {key}" if key else None), extra


def test_an_unreadable_image_is_named_in_its_samples_error(tmp_path):
    """Which of a thousand images was corrupt: the sample's error names its file."""
    from mmedagent.evaluation.runner import load_image

    (tmp_path / "case_017.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(ValueError, match=r"^case_017\.png: cannot read PNG image"):
        load_image("case_017.png", tmp_path)


def test_tool_flags_with_a_controller_are_refused_not_ignored(tmp_path, capsys):
    """A controller runs the tools it serves: --tools with it was silently ignored (a run over tools nobody chose)."""
    data = write_json(tmp_path / "r.json", [direct_record()])
    assert main(["--model", "http://127.0.0.1:9", "--data", str(data), "--tools", "grounding"]) == 2
    assert "--tools, --tool-options, --tool-weights and --system-prompt apply to the local agent loop" in capsys.readouterr().err


# --------------------------------------------------------------------------- endpoints: credentials and keys


def served_at(monkeypatch, handler):
    """Every HTTP request of the evaluation is answered by ``handler`` (no socket is opened)."""
    monkeypatch.setattr(httpx.HTTPTransport, "handle_request", lambda transport, request: handler(request))


ENDPOINT_FLAGS = {"agent": [], "planner": ["--endpoint", "planner", "--tool-mode", "gold"]}


@pytest.mark.parametrize("endpoint", ENDPOINT_FLAGS)
def test_a_url_with_credentials_never_reaches_a_samples_error_or_stderr(tmp_path, monkeypatch, capsys, endpoint):
    """httpx keeps user:password@ in a request's URL: the error named the endpoint by it, into stderr and samples.jsonl."""
    served_at(monkeypatch, lambda request: httpx.Response(
        503 if request.method == "POST" else 404, json={"error": {"message": f"overloaded ({request.url.path})"}}))
    write_image(tmp_path)
    data = write_json(tmp_path / "r.json", [direct_record()])
    out = tmp_path / "run"
    assert main(["--model", "http://evaluator:s3cr3t-pw@127.0.0.1:9/v1", "--data", str(data), "--image-folder",
                 str(tmp_path), "--out", str(out), *ENDPOINT_FLAGS[endpoint]]) == 1
    err = capsys.readouterr().err
    written = "".join((out / name).read_text() for name in ("samples.jsonl", "run.json", "report.json"))
    for secret in ("s3cr3t-pw", "evaluator"):
        assert secret not in err and secret not in written, err
    error = json.loads((out / "samples.jsonl").read_text())["error"]
    assert "http://127.0.0.1:9/v1: overloaded (/v1/chat/completions)" in error  # the server's reason, where it was


def test_a_judge_url_with_credentials_never_reaches_stderr(tmp_path, monkeypatch, capsys):
    from mmedagent.evaluation.judge import judge

    served_at(monkeypatch, lambda request: httpx.Response(429, json={"error": {"message": "rate limited"}}))
    samples = load_samples(write_json(tmp_path / "r.json", [direct_record()]))
    assert judge(samples, [SampleResult(id="d1", task="vqa", answer="Yes.")], "https://grader:s3cr3t-pw@judge.example/v1") == [None]
    err = capsys.readouterr().err
    assert "https://judge.example/v1: rate limited" in err and "s3cr3t-pw" not in err and "grader" not in err, err


@pytest.mark.parametrize("endpoint", ENDPOINT_FLAGS)
def test_an_openai_key_goes_to_a_model_url_only_when_asked(tmp_path, monkeypatch, endpoint):
    """With MMEDAGENT_API_KEY unset, OPENAI_API_KEY went to any --model URL (a local vLLM, someone else's server)."""
    sent = []

    def answer(request):
        sent.append(request.headers.get("authorization"))
        return httpx.Response(200, json={"choices": [{"message": {"content": "Yes."}}]})

    served_at(monkeypatch, answer)
    write_image(tmp_path)
    data = write_json(tmp_path / "r.json", [direct_record()])
    monkeypatch.delenv("MMEDAGENT_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-key")
    for env, extra, key in ((None, [], None), (None, ["--api-key-env", "OPENAI_API_KEY"], "sk-openai-key"),
                            ("mmedagent-key-0123", [], "mmedagent-key-0123")):  # the default: a controller's --api-key
        if env:
            monkeypatch.setenv("MMEDAGENT_API_KEY", env)
        sent.clear()
        main(["--model", "http://127.0.0.1:9", "--data", str(data), "--image-folder", str(tmp_path), "--quiet",
              *ENDPOINT_FLAGS[endpoint], *extra])
        assert sent and set(sent) == {f"Bearer {key}" if key else None}, (extra, sent)


def test_api_key_env_with_a_local_model_is_refused_not_ignored(tmp_path, capsys):
    data = write_json(tmp_path / "r.json", [direct_record()])
    assert main(["--model", "demo", "--data", str(data), "--api-key-env", "OPENAI_API_KEY"]) == 2
    assert "--api-key-env applies to a --model URL" in capsys.readouterr().err


def test_an_endpoint_is_reached_from_each_url_form_the_evaluation_accepts():
    from mmedagent.serve.remote import api_root

    for url in ("http://gpu-box:8000", "http://gpu-box:8000/v1/", "http://gpu-box:8000/v1/chat/completions"):
        assert api_root(url) == "http://gpu-box:8000/v1", url
    assert api_root("https://proxy.example/openai/chat/completions") == "https://proxy.example/openai"
