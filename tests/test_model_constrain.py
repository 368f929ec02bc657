"""Decoding constrained to the turn format and the tools' schemas."""

import json

import pytest

import mmedagent  # noqa: F401  - torchvision shim before transformers
from mmedagent import demo
from mmedagent.model.constrain import TurnConstraint
from mmedagent.protocol import (VALUE_MARK, AssistantTurn, ToolCall, actions_json_schema, parse_turn, render_turn,
                               system_prompt)
from mmedagent.tools.registry import get_tool, list_tools



@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo.PACKAGED)


@pytest.fixture(scope="module")
def constraint(tokenizer):
    return TurnConstraint(tokenizer, list_tools(), [tokenizer.eos_token_id])


def test_actions_schema_names_tools_aliases_and_image_placeholder():
    schema = actions_json_schema([get_tool("segmentation")])
    call = schema["items"]["anyOf"][0]
    assert call["properties"]["API_name"]["enum"][:2] == ["segmentation", "MedSAM"]
    params = call["properties"]["API_params"]
    assert params["properties"]["image"] == {"const": "<imagepath>"}
    assert "boxes" in params["properties"] and params["additionalProperties"] is False


@pytest.mark.parametrize("calls", [
    [],
    [ToolCall(API_name="segmentation", API_params={"image": "<imagepath>", "boxes": [[0.1, 0.2, 0.5, 0.65]]})],
    [ToolCall(API_name="grounding dino", API_params={"image": "<imagepath>", "prompts": ["tumor"]}),
     ToolCall(API_name="retrieval", API_params={"query": "What is a nodule?"})],
])
def test_rendered_turns_are_allowed_token_by_token_and_may_end(constraint, tokenizer, calls):
    text = " " + render_turn(AssistantTurn(thoughts="I will look.", actions=calls, value="Please wait.\nThanks."))
    rule = constraint.start()
    ids = tokenizer(text, add_special_tokens=False).input_ids
    for i, tok in enumerate(ids):
        assert rule.allows(tok) and tok in rule.allowed(), tokenizer.decode(ids[:i])
        if VALUE_MARK not in tokenizer.decode(ids[:i]):
            assert tokenizer.eos_token_id not in rule.allowed() and not rule.allows(tokenizer.eos_token_id)
        rule.push(tok)
    assert rule.allows(tokenizer.eos_token_id) and tokenizer.eos_token_id in rule.allowed()


@pytest.mark.parametrize("bad, valid_prefix", [
    ('"thoughts🤔" x\n"actions🚀" [{"API_name": "surgery"', '"thoughts🤔" x\n"actions🚀" [{"API_name": "'),
    ('"thoughts🤔" x\n"actions🚀" [{"API_name": "segmentation", "API_params": {"boxes": "0.1"',
     '"thoughts🤔" x\n"actions🚀" [{"API_name": "segmentation", "API_params": {"boxes":'),
    ('"thoughts🤔" x\n"actions🚀" [{"API_name": "grounding", "API_params": {"image": "/etc/passwd"',
     '"thoughts🤔" x\n"actions🚀" [{"API_name": "grounding", "API_params": {"image":'),
    ('"thoughts🤔" x\n"value👉" hi', '"thoughts🤔" x\n"'),
    ('"thoughts🤔" x\n"actions🚀" [{"API_name": "retrieval", "API_params": {"query": "a\nb"}}]',
     '"thoughts🤔" x\n"actions🚀" [{"API_name": "retrieval", "API_params": {"query": "a'),
    ('"thoughts🤔" x\n"actions🚀" [{"API_name": "retrieval", "API_params": {"query"   : "a"}}]',
     '"thoughts🤔" x\n"actions🚀" [{"API_name": "retrieval", "API_params": {"query" '),
    ('"thoughts🤔" The tumor cells"]}}]\n"value👉" H', '"thoughts🤔" The tumor cells"]}}]\n"'),
])
def test_malformed_turns_are_refused_where_they_go_wrong(constraint, tokenizer, bad, valid_prefix):
    assert written_until_refused(constraint, tokenizer, bad).startswith(valid_prefix)


def written_until_refused(constraint, tokenizer, text: str) -> str:
    """The part of ``text`` decoded before the constraint refuses a token (which ``allowed()`` leaves out too)."""
    rule = constraint.start()
    ids = tokenizer(text, add_special_tokens=False).input_ids
    for refused, tok in enumerate(ids):
        if not rule.allows(tok):
            assert tok not in rule.allowed()
            return tokenizer.decode(ids[:refused])
        rule.push(tok)
    pytest.fail(f"allowed to the end: {text!r}")


@pytest.fixture(scope="module")
def demo_planners():
    from mmedagent.model import load_planner

    free = load_planner(demo.PACKAGED, system="")
    return free, load_planner(demo.PACKAGED, system="", constrain=True)


@pytest.fixture(scope="module")
def image():
    from PIL import Image

    return Image.new("RGB", (64, 64), (200, 120, 160))


@pytest.mark.parametrize("question", ["I need the bounding box of the tumor.", "What type of image is this?"])
def test_constraint_leaves_a_valid_greedy_plan_unchanged(demo_planners, tmp_path, question):
    from PIL import Image

    from mmedagent.data.synth import make_images

    free, constrained = demo_planners
    messages = [{"role": "user", "content": f"<image>\n{question}"}]
    for item in make_images(tmp_path, 4, seed=1, size=64):
        image = Image.open(tmp_path / "images" / item.name)
        plan = free.generate(messages, image, max_new_tokens=90)
        parse_turn(plan)
        assert constrained.generate(messages, image, max_new_tokens=90) == plan


def test_constrained_demo_planner_completes_a_turn_the_model_would_cut_short(demo_planners, image, monkeypatch):
    """A model pushed to stop at once (EOS far ahead at every step): free decoding writes nothing; under
    the constraint EOS waits until the value has begun, so a whole turn comes out with a valid call."""
    free, constrained = demo_planners
    (eos,) = constrained.eos_ids
    for planner in (free, constrained):
        def eager_to_stop(*args, _forward=planner._forward, **kwargs):
            logits = _forward(*args, **kwargs)
            logits[..., eos] += 1e4
            return logits

        monkeypatch.setattr(planner, "_forward", eager_to_stop)
    messages = [{"role": "user", "content": "<image>\nI need the bounding box of the tumor."}]
    assert free.generate(messages, image, max_new_tokens=90) == ""
    turn = parse_turn(constrained.generate(messages, image, max_new_tokens=90))
    assert constrained.info()["constrain"] is True
    (call,) = turn.actions
    tool = get_tool(call.API_name)
    tool.Params.model_validate({k: v for k, v in call.API_params.items() if k != "image"})


@pytest.fixture(scope="module")
def byte_split_tokenizer(tmp_path_factory):
    """A tokenizer that never saw the marks' emoji: each one is three or four byte tokens."""
    from transformers import AutoTokenizer

    from mmedagent.model.tiny import make_tiny_model

    path = make_tiny_model("llama", tmp_path_factory.mktemp("bytes") / "m", vocab_size=300,
                           corpus=["the tumor is on the left side of the image"])
    return AutoTokenizer.from_pretrained(path)


def test_marks_split_into_byte_tokens_are_followed_and_wrong_characters_refused(byte_split_tokenizer):
    tok = byte_split_tokenizer
    constraint = TurnConstraint(tok, list_tools(), [tok.eos_token_id])
    text = render_turn(AssistantTurn(thoughts="x", actions=[], value="ok"))
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) > len(tok.tokenize(text.replace("🤔", "").replace("🚀", "").replace("👉", "")))  # bytes
    rule = constraint.start()
    for i, t in enumerate(ids):
        assert rule.allows(t) and t in rule.allowed(), tok.decode(ids[:i])
        rule.push(t)
    assert rule.allows(tok.eos_token_id)
    assert written_until_refused(constraint, tok, '"thoughts😀" x').startswith('"thoughts')


SEG_PREFIX = '"thoughts🤔" x\n"actions🚀" [{"API_name": "segmentation", "API_params": {"image": "<imagepath>", '


def test_coordinate_fields_come_from_the_tools_schemas():
    from mmedagent.model.constrain import coordinate_fields

    assert coordinate_fields(actions_json_schema(list_tools())) == {"boxes": ("xyxy", True), "points": ("xy", True)}
    assert "x-" not in system_prompt(list_tools())  # a decoding hint, not prompt text


@pytest.mark.parametrize("params, valid_prefix", [
    ('"boxes": [[0.31, 0.42, 0.27', '"boxes": [[0.31, 0.42, '),  # x2 < x1
    ('"boxes": [[0.3, 0.4, 0.5, 0.39]]', '"boxes": [[0.3, 0.4, 0.5, '),  # y2 < y1
    ('"boxes": [[0.1, 0.2, 0.5, 0.6], [0.5, 0.5, 0.4', '"boxes": [[0.1, 0.2, 0.5, 0.6], [0.5, 0.5, '),
    ('"boxes": [[1.5', '"boxes": [['),  # outside [0, 1]
    ('"boxes": [[0.1, 0.2, 0.5, 0.6, 0.7]]', '"boxes": [[0.1, 0.2, 0.5, 0.6'),  # a fifth number
    ('"boxes": [[1e-1', '"boxes": [['),  # coordinates are plain decimals
    ('"points": [[0.5, 2]]', '"points": [[0.5, '),
])
def test_boxes_and_points_are_held_to_the_validators(constraint, tokenizer, params, valid_prefix):
    from mmedagent.tools.segmentation import SegmentationParams

    written = written_until_refused(constraint, tokenizer, SEG_PREFIX + params)
    assert written.startswith(SEG_PREFIX + valid_prefix), written
    whole = '"thoughts🤔" x\n"actions🚀" ' + json.dumps([{"API_name": "segmentation", "API_params": {"boxes": [[0.3, 0.4, 0.2, 0.5]]}}])
    with pytest.raises(ValueError):
        SegmentationParams.model_validate(parse_turn(whole + '\n"value👉" ok').actions[0].API_params)


def test_allowed_tokens_inside_a_box_are_exactly_those_that_can_still_fit(constraint, tokenizer):
    rule = constraint.start()
    for tok in tokenizer(SEG_PREFIX + '"boxes": [[0.31, 0.42, ', add_special_tokens=False).input_ids:
        rule.push(tok)
    allowed = {tokenizer.decode([t]) for t in rule.allowed()}
    assert allowed and all(t[0] in "01" for t in allowed)
    assert all(float(t) >= 0.31 or t in {"0", "0.", "0.3"} for t in allowed if t.replace(".", "").isdigit()), allowed
    assert "0.2" not in allowed and "0.3" in allowed and "1" in allowed


@pytest.mark.parametrize("boxes", [[[0.31, 0.12, 0.31, 0.12]], [[0, 0, 1, 1.0]], [[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.9, 1]]])
def test_valid_boxes_pass_the_coordinate_check(constraint, tokenizer, boxes):
    text = " " + render_turn(AssistantTurn(thoughts="x", value="ok", actions=[
        ToolCall(API_name="segmentation", API_params={"image": "<imagepath>", "boxes": boxes, "points": [[0, 1]]})]))
    rule = constraint.start()
    for tok in tokenizer(text, add_special_tokens=False).input_ids:
        assert rule.allows(tok) and tok in rule.allowed()
        rule.push(tok)


def test_thoughts_that_quote_a_box_are_not_held_to_it(constraint, tokenizer):
    text = ' "thoughts🤔" They wrote "actions🚀" [{"boxes": [[0.5, 0.2, 0.1, 0.1]]}] by mistake.\n"actions🚀" []\n"value👉" ok'
    rule = constraint.start()
    for tok in tokenizer(text, add_special_tokens=False).input_ids:
        assert rule.allows(tok)
        rule.push(tok)


def test_a_tool_with_one_box_gets_it_checked_too(tokenizer):
    """A plug-in's ``box: Box`` (one box, as in the README's example tool) is held like ``boxes``."""
    from pydantic import ValidationError

    from mmedagent.model.constrain import coordinate_fields
    from mmedagent.tools import Box, Tool, ToolParams, ToolResult

    class Crop(Tool):
        name, description = "crop", "Crop a box."

        class Params(ToolParams):
            box: Box

        class Result(ToolResult):
            pass

    assert coordinate_fields(actions_json_schema([Crop])) == {"box": ("xyxy", False)}

    class PixelCrop(Crop):
        name = "pixel_crop"

        class Params(ToolParams):
            box: list[int]

    assert coordinate_fields(actions_json_schema([Crop, PixelCrop])) == {}  # "box" means two things
    with pytest.raises(ValidationError, match="x1 <= x2"):
        Crop.Params(box=[0.5, 0.1, 0.2, 0.3])
    constraint = TurnConstraint(tokenizer, [Crop], [tokenizer.eos_token_id])
    prefix = '"thoughts🤔" x\n"actions🚀" [{"API_name": "crop", "API_params": {"box": '
    assert written_until_refused(constraint, tokenizer, prefix + '[0.5, 0.1, 0.2').startswith(prefix + "[0.5, 0.1, ")
    rule = constraint.start()
    for tok in tokenizer(prefix + '[0.2, 0.1, 0.5, 0.3]}}]\n"value👉" ok', add_special_tokens=False).input_ids:
        assert rule.allows(tok)
        rule.push(tok)
