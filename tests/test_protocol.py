import copy
import json
import random

import pytest

from _eval_fixtures import MMEDAGENT_EVAL_LINES
from mmedagent.protocol import (
    AssistantTurn,
    Record,
    ToolCall,
    ToolOutcome,
    ToolResultTurn,
    TurnParseError,
    parse_tool_results,
    parse_turn,
    render_tool_results,
    render_turn,
    system_prompt,
)

MMEDAGENT_RECORD = {
    "id": "mri-0001",
    "image": "brain/mri_0001.jpg",
    "conversations": [
        {"from": "human", "value": "<image>\nCan you locate the tumor in this MRI image?"},
        {
            "from": "gpt",
            "thoughts": "To locate the tumor, I will use grounding dino.",
            "actions": [{"API_name": "grounding dino", "API_params": {"image": "<imagepath>", "prompts": ["tumor"]}}],
            "value": "I will use grounding dino to locate the tumor. Please wait.",
        },
        {
            "from": "human",
            "value": "grounding dino output: {'boxes': [[0.41, 0.54, 0.76, 0.75]], 'logits': [0.95], 'phrases': ['tumor']}"
            "\n\nAnswer my first question: Can you locate the tumor in this MRI image?",
        },
        {
            "from": "gpt",
            "thoughts": "Thanks to the output of grounding dino, I can answer.",
            "actions": [],
            "value": "The tumor is at [0.41, 0.54, 0.76, 0.75].",
        },
    ],
}


def test_mmedagent_record_round_trip():
    rec = Record.from_dict(copy.deepcopy(MMEDAGENT_RECORD))
    assert rec.to_dict() == MMEDAGENT_RECORD
    assert rec.first_question() == "Can you locate the tumor in this MRI image?"
    assert [c.API_name for c in rec.tool_calls()] == ["grounding dino"]
    for msg in rec.conversations:
        if msg.role == "gpt":
            assert parse_turn(msg.text()) == msg.assistant_turn()
    tool_turn = rec.conversations[2].value
    parsed = parse_tool_results(tool_turn)
    assert parsed.question == rec.first_question()
    assert parsed.outcomes[0].tool == "grounding dino"
    assert parsed.outcomes[0].output == {"boxes": [[0.41, 0.54, 0.76, 0.75]], "logits": [0.95], "phrases": ["tumor"]}
    assert render_tool_results(parsed.outcomes, parsed.question) == tool_turn


def test_mmedagent_released_eval_lines_parse_and_their_tool_outputs_round_trip():
    calls, outputs = [], []
    for line in MMEDAGENT_EVAL_LINES:
        turn = parse_turn(line["assist"], strict=False)
        assert turn.thoughts and turn.value and len(turn.actions) == 1
        calls.append((turn.actions[0].API_name, turn.actions[0].API_params))
        back = parse_tool_results(line["text"])
        assert render_tool_results(back.outcomes, back.question) == line["text"]  # fed back verbatim in gold mode
        (outcome,) = back.outcomes
        outputs.append(outcome.output if outcome.output is not None else outcome.text)
    assert calls[1] == ("grounding dino", {"prompts": ["cardiomegaly"]}) and calls[2] == ("BiomedClip", {})
    assert outputs[1] == {"boxes": [[0.41, 0.53, 0.8, 0.65]], "logits": [0.82], "phrases": ["cardiomegaly"]}
    assert outputs[2] == "lung CT" and outputs[3] == "'''\n开胸修补术后有时血管内支架植入术\n'''\n    "
    assert outputs[4].splitlines()[2] == "1. **Medical Intervention:** Seek immediate medical attention."


@pytest.mark.parametrize("actions, expected", [
    ('[{"API_name": "a", "API_params": {}]', [{"API_name": "a", "API_params": {}}]),
    ("[{'API_name': 'a', 'API_params': {'prompts': ['x', ']']}]", [{"API_name": "a", "API_params": {"prompts": ["x", "]"]}}]),
    ('{"API_name": "a", "API_params": {"prompts": ["x"}}', [{"API_name": "a", "API_params": {"prompts": ["x"]}}]),
])
def test_a_bracket_left_open_before_a_closer_is_closed(actions, expected):
    turn = parse_turn(f'"thoughts🤔" t\n"actions🚀" {actions}\n"value👉" v')
    assert [a.model_dump() for a in turn.actions] == expected


@pytest.mark.parametrize("body", ["{1: 2}", "{[1]: 2}", "{'a': {1, 2}}", "{'a': b'x'}", "{'a': 1j}", "{'a': ...}",
                                  "{'boxes': [[0.32 0.24 0.76 0.55]]}", "['not', 'a', 'mapping']", "42"])
def test_tool_outputs_json_cannot_carry_stay_text(body):
    text = f"x output: {body}\n\nAnswer my first question: q"
    (outcome,) = parse_tool_results(text).outcomes
    assert outcome.ok and outcome.output is None and outcome.text == body
    json.dumps(outcome.model_dump())  # evaluation reports and traces hold it
    assert render_tool_results([outcome], "q") == text


def test_an_image_marker_in_a_tool_output_is_dropped():
    """A passage or report quoting ``<image>`` would give the model a second image marker (the processor
    then refuses the prompt, or the model reads an image that is not there)."""
    outcomes = [ToolOutcome(tool="retrieval", text="See the figure <image>\nbelow."),
                ToolOutcome(tool="grounding", output={"label": "<image> tumor"})]
    text = render_tool_results(outcomes, "Where?")
    assert "<image>" not in text
    assert text == "retrieval output: See the figure below.\ngrounding output: {'label': ' tumor'}\n\n" \
                   "Answer my first question: Where?"


def test_multi_line_tool_errors_round_trip():
    outcomes = [ToolOutcome(tool="segmentation", ok=False, error="RuntimeError: CUDA out of memory.\n\tTried to allocate 2 GiB"),
                ToolOutcome(tool="grounding", output={"boxes": [[0.1, 0.2, 0.3, 0.4]]})]
    text = render_tool_results(outcomes, "Where?")
    back = parse_tool_results(text)
    assert back.outcomes == outcomes and render_tool_results(back.outcomes, back.question) == text


def test_record_accepts_image_id_and_roles():
    rec = Record.from_dict({"image_id": "a.png", "conversations": [{"from": "user", "value": "hi"}]})
    assert rec.image == "a.png" and rec.conversations[0].role == "human"
    with pytest.raises(ValueError):
        Record.from_dict({"conversations": []})


def test_render_is_mmedagent_text_form():
    turn = AssistantTurn(thoughts="t", actions=[ToolCall(API_name="MedSAM", API_params={"boxes": [[0, 0, 1, 1]]})], value="v")
    assert render_turn(turn) == (
        '"thoughts🤔" t\n"actions🚀" [{"API_name": "MedSAM", "API_params": {"boxes": [[0, 0, 1, 1]]}}]\n"value👉" v'
    )


def test_single_quoted_and_python_literals():
    text = "\"thoughts🤔\" x\n\"actions🚀\" [{'API_name': 'grounding dino', 'API_params': {'prompts': ['it\\'s \"big\"'], 'nms': True, 'k': None}}]\n\"value👉\" ok"
    turn = parse_turn(text)
    assert turn.actions[0].API_name == "grounding dino"
    assert turn.actions[0].API_params == {"prompts": ['it\'s "big"'], "nms": True, "k": None}


def test_trailing_commas_are_dropped_outside_strings():
    """``"top_k": 3, }`` (Python's habit, and what the constrained decoder let through) was "not valid JSON"."""
    text = ('"thoughts🤔" x\n"actions🚀" [{"API_name": "grounding", "API_params": {"prompts": ["a, ]", "b",], '
            '"note": "x, }", }, }, ]\n"value👉" ok')
    assert parse_turn(text).actions[0].API_params == {"prompts": ["a, ]", "b"], "note": "x, }"}
    for empty in ('[,]', '[{"API_name": "grounding", "API_params": {,}}]'):  # no value before the comma: still wrong
        with pytest.raises(TurnParseError, match="not valid JSON"):
            parse_turn(f'"actions🚀" {empty}\n"value👉" ok')


def test_multi_call_and_missing_thoughts():
    actions = [{"API_name": "a", "API_params": {}}, {"API_name": "b"}]
    turn = parse_turn(f'"actions🚀" {json.dumps(actions)}\n"value👉" wait')
    assert [a.API_name for a in turn.actions] == ["a", "b"] and turn.thoughts == ""


@pytest.mark.parametrize(
    "text",
    [
        "plain answer",
        '"thoughts🤔" x "value👉" y',
        '"thoughts🤔" x\n"actions🚀" [{"API_name": "a"\n"value👉" y',
        '"thoughts🤔" x\n"actions🚀" [1]\n"value👉" y',
        '"thoughts🤔" x\n"actions🚀" [{"API_params": {}}]\n"value👉" y',
        '"thoughts🤔" x\n"actions🚀" [{"API_name": "a", "API_params": [1]}]\n"value👉" y',
        '"thoughts🤔" x\n"actions🚀" "a"\n"value👉" y',
        '"value👉" y "actions🚀" []',
        '"thoughts🤔" x\n"actions🚀" __import__("os").system("true")\n"value👉" y',
        '"thoughts🤔" x\n"actions🚀" [{"API_name": "a", "API_params": {}]]\n"value👉" y',  # a closer nothing opened
        '"thoughts🤔" x\n"actions🚀" [{"API_name": "a", "API_params": {"prompts": ["x"\n"value👉" y',  # truncated
        "\"thoughts🤔\" x\n\"actions🚀\" [{'API_name': 'a\n\"value👉\" y",
        # numbers JSON cannot carry, or too long for Python to convert (a ValueError of its own)
        '"thoughts🤔" x\n"actions🚀" [{"API_name": "a", "API_params": {"t": NaN}}]\n"value👉" y',
        "\"thoughts🤔\" x\n\"actions🚀\" [{'API_name': 'a', 'API_params': {'t': -Infinity}}]\n\"value👉\" y",
        '"thoughts🤔" x\n"actions🚀" [{"API_name": "a", "API_params": {"t": 1e999}}]\n"value👉" y',
        '"thoughts🤔" x\n"actions🚀" [{"API_name": "a", "API_params": {"n": ' + "9" * 5000 + '}}]\n"value👉" y',
    ],
)
def test_bad_turns_raise_turn_parse_error(text):
    with pytest.raises(TurnParseError):
        parse_turn(text)


@pytest.mark.parametrize("actions", ["None", "null", " null "])
def test_actions_written_as_none_are_no_call(actions):
    """A model answering directly may write its empty action list as Python's None or JSON's null."""
    turn = parse_turn(f'"thoughts🤔" I can answer.\n"actions🚀" {actions}\n"value👉" It is a chest X-ray.')
    assert turn == AssistantTurn(thoughts="I can answer.", value="It is a chest X-ray.")


def test_non_strict_plain_text_is_an_answer():
    assert parse_turn("  The image shows a lung CT. ", strict=False) == AssistantTurn(value="The image shows a lung CT.")
    assert parse_turn('"Thoughts" is not a marker.', strict=False).value == '"Thoughts" is not a marker.'


@pytest.mark.parametrize("text", ['"', ' "thoughts', '"thoughts🤔', '"act', '"value\n'])
def test_non_strict_text_that_is_only_the_start_of_a_marker_is_a_cut_off_turn_not_an_answer(text):
    """A turn that ends within its first marker (its first tokens only) is no plain answer to show the user."""
    with pytest.raises(TurnParseError, match="stops inside a turn marker"):
        parse_turn(text, strict=False)


def test_tool_error_wording_round_trip():
    outcomes = [ToolOutcome(tool="MedSAM", ok=False, error="timed out after 5 s"), ToolOutcome(tool="x", output={"a": 1})]
    text = render_tool_results(outcomes, "q?")
    back = parse_tool_results(text)
    assert back.outcomes[0].error == "timed out after 5 s" and not back.outcomes[0].ok
    assert back.outcomes[1].output == {"a": 1} and back.question == "q?"


def test_system_prompt_lists_tools_with_schema():
    from mmedagent.tools import Tool, ToolParams

    class P(ToolParams):
        prompts: list[str]

    class T(Tool):
        name = "grounding"
        aliases = ("grounding dino",)
        description = "Find things."
        Params = P

    text = system_prompt([T])
    assert "grounding (also: grounding dino): Find things." in text and '"prompts"' in text
    from mmedagent.protocol import DEFAULT_SYSTEM, system_message

    assert system_message(None, [T]) == system_message("catalog", [T]) == text
    assert system_message("plain", [T]) == DEFAULT_SYSTEM and system_message("none", [T]) == ""
    with pytest.raises(ValueError, match="unknown system prompt"):
        system_message("verbose", [T])
    assert system_message("text", [T], "You are a radiologist.") == "You are a radiologist."
    with pytest.raises(ValueError, match="needs the text the model was trained with"):
        system_message("text", [T])
    from mmedagent.protocol import system_setting

    for trained in (None, "", DEFAULT_SYSTEM, "You are a radiologist.", text):  # served as trained
        setting = system_setting(trained) or {}
        assert system_message(setting.get("system_prompt"), [T], setting.get("system_text")) == (trained or "")
    assert system_setting(text) is None  # the catalog: served as the live tools' (the default)


VALID = [render_turn(AssistantTurn(thoughts="look", actions=[ToolCall(API_name="grounding dino", API_params={"image": "<imagepath>", "prompts": ["tumor", "edema"]})], value="Please wait.")),
         render_turn(AssistantTurn(thoughts="done", actions=[], value="The box is [0.1, 0.2, 0.3, 0.4].")),
         "\"thoughts🤔\" s\n\"actions🚀\" [{'API_name': 'BiomedClip', 'API_params': {'labels': ['chest X-ray']}}]\n\"value👉\" v"]
ALPHABET = list("\"'[]{}(),:\\ \n\t0123456789abcdefTrueFalseNone-.e") + ["🤔", "🚀", "👉", '"actions🚀"', '"value👉"', '"thoughts🤔"', "\u0000", "\ud800", "é"]


def _mutate(rng: random.Random, text: str) -> str:
    chars = list(text)
    for _ in range(rng.randint(1, 6)):
        op = rng.random()
        pos = rng.randint(0, len(chars))
        if op < 0.3 and chars:
            del chars[min(pos, len(chars) - 1)]
        elif op < 0.6:
            chars.insert(pos, rng.choice(ALPHABET))
        elif op < 0.8 and chars:
            chars[min(pos, len(chars) - 1)] = rng.choice(ALPHABET)
        else:
            chars = chars[:pos]
    return "".join(chars)


def test_fuzz_parse_turn_raises_only_turn_parse_error():
    rng = random.Random(1234)
    outcomes = {"ok": 0, "error": 0}
    for i in range(12_000):
        if i % 3 == 0:
            text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 80)))
        else:
            text = _mutate(rng, rng.choice(VALID))
        for strict in (True, False):
            try:
                parse_turn(text, strict=strict)
                outcomes["ok"] += 1
            except TurnParseError:
                outcomes["error"] += 1
    assert outcomes["ok"] > 1000 and outcomes["error"] > 1000  # both paths really exercised


def test_fuzz_with_hypothesis():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=1500, deadline=None, database=None)
    @given(st.lists(st.sampled_from(ALPHABET), max_size=60).map("".join) | st.text(max_size=120))
    def check(text):
        for parse, kind in ((parse_turn, AssistantTurn), (parse_tool_results, ToolResultTurn)):
            try:
                assert isinstance(parse(text), kind)
            except TurnParseError:
                pass

    check()


def test_a_report_line_shaped_like_a_result_stays_in_its_report_when_the_calls_are_known():
    report = "Findings: dilated left ventricle.\nCardiac output: 5.2 L/min\nUrine output: normal"
    text = render_tool_results([ToolOutcome(tool="ChatCAD-R", text=report)], "Report?")
    (outcome,) = parse_tool_results(text, ["ChatCAD-R"]).outcomes
    assert outcome.text == report and render_tool_results([outcome], "Report?") == text
    assert len(parse_tool_results(text).outcomes) == 3  # without the calls, every such line starts a result
    # two calls, each output line naming its call: split as before, whatever the reports hold
    two = render_tool_results([ToolOutcome(tool="ChatCAD-R", text=report),
                               ToolOutcome(tool="grounding dino", output={"boxes": []})], "Report?")
    back = parse_tool_results(two, ["ChatCAD-R", "grounding dino"]).outcomes
    assert [o.tool for o in back] == ["ChatCAD-R", "grounding dino"] and back[0].text == report
    # the calls' names match the output lines as tool names match (case, separators, spaces around "+")
    spelled = parse_tool_results(two, ["chatcad_r", "Grounding-DINO"]).outcomes
    assert [o.tool for o in spelled] == ["ChatCAD-R", "grounding dino"] and spelled[0].text == report
    # outputs named otherwise than the calls (data written with another alias) parse as without the calls
    other = parse_tool_results(two, ["MedSAM", "BiomedClip"]).outcomes
    assert other == parse_tool_results(two).outcomes


def test_a_json_worded_tool_output_with_true_false_null_reads_as_an_output():
    text = 'grounding output: {"boxes": [], "found": false, "note": null, "ok": true}\n\nAnswer my first question: Q'
    (outcome,) = parse_tool_results(text, ["grounding"]).outcomes
    assert outcome.output == {"boxes": [], "found": False, "note": None, "ok": True} and outcome.text is None
    assert render_tool_results([outcome], "Q") == ("grounding output: {'boxes': [], 'found': False, 'note': None, "
                                                   "'ok': True}\n\nAnswer my first question: Q")
