"""Decoding constrained to the turn format and the tools' schemas."""

import json
import re

import pytest

import mmedagent  # noqa: F401  - torchvision shim before transformers
from mmedagent import demo
from mmedagent.model.constrain import TurnConstraint
from mmedagent.protocol import (VALUE_MARK, AssistantTurn, ToolCall, actions_json_schema, parse_turn, render_turn,
                               system_prompt)
from mmedagent.tools.registry import get_tool, list_tools


def built_in_tools():
    """The project's own tools (other test modules register theirs, which may bound a name otherwise)."""
    return [t for t in list_tools() if t.__module__.startswith("mmedagent.tools.")]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo.PACKAGED)


@pytest.fixture(scope="module")
def constraint(tokenizer):
    return TurnConstraint(tokenizer, built_in_tools(), [tokenizer.eos_token_id])


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
    # a marker written again (a model running on into another turn, or quoting one) fails parse_turn
    ('"thoughts🤔" x\n"actions🚀" []\n"value👉" Done. "thoughts🤔" y',
     '"thoughts🤔" x\n"actions🚀" []\n"value👉" Done. "thoughts'),
    ('"thoughts🤔" x\n"actions🚀" []\n"value👉" Done.\n"value👉" y',
     '"thoughts🤔" x\n"actions🚀" []\n"value👉" Done.\n"value'),
    ('"thoughts🤔" I fill "actions🚀" next\n"actions🚀" []', '"thoughts🤔" I fill "actions'),
    ('"thoughts🤔" I write "value👉" last\n"actions🚀" []\n"value👉" y',
     '"thoughts🤔" I write "value👉" last\n"actions🚀" []\n"value'),
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
    constraint = TurnConstraint(tok, built_in_tools(), [tok.eos_token_id])
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


def test_number_fields_come_from_the_tools_schemas():
    from decimal import Decimal

    from mmedagent.model.constrain import Numbers, number_fields

    unit = Numbers(Decimal(0), Decimal(1))
    assert number_fields(actions_json_schema(built_in_tools())) == {
        "boxes": Numbers(Decimal(0), Decimal(1), depth=2, coords="xyxy"),
        "points": Numbers(Decimal(0), Decimal(1), depth=2, coords="xy"),
        "box_threshold": unit, "text_threshold": unit,
        "k": Numbers(Decimal(1), Decimal(50), integer=True), "top_k": Numbers(Decimal(1), integer=True),
    }
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
    text = ' "thoughts🤔" They wrote [{"boxes": [[0.5, 0.2, 0.1, 0.1]]}] by mistake.\n"actions🚀" []\n"value👉" ok'
    rule = constraint.start()
    for tok in tokenizer(text, add_special_tokens=False).input_ids:
        assert rule.allows(tok)
        rule.push(tok)
    assert parse_turn(text).thoughts.startswith("They wrote")


def test_a_tool_with_one_box_gets_it_checked_too(tokenizer):
    """A plug-in's ``box: Box`` (one box, as in the README's example tool) is held like ``boxes``."""
    from pydantic import ValidationError

    from decimal import Decimal

    from mmedagent.model.constrain import Numbers, number_fields
    from mmedagent.tools import Box, Tool, ToolParams, ToolResult

    class Crop(Tool):
        name, description = "crop", "Crop a box."

        class Params(ToolParams):
            box: Box

        class Result(ToolResult):
            pass

    assert number_fields(actions_json_schema([Crop])) == {"box": Numbers(Decimal(0), Decimal(1), depth=1, coords="xyxy")}

    class PixelCrop(Crop):
        name = "pixel_crop"

        class Params(ToolParams):
            box: list[int]

    assert number_fields(actions_json_schema([Crop, PixelCrop])) == {}  # "box" means two things
    with pytest.raises(ValidationError, match="x1 <= x2"):
        Crop.Params(box=[0.5, 0.1, 0.2, 0.3])
    constraint = TurnConstraint(tokenizer, [Crop], [tokenizer.eos_token_id])
    prefix = '"thoughts🤔" x\n"actions🚀" [{"API_name": "crop", "API_params": {"box": '
    assert written_until_refused(constraint, tokenizer, prefix + '[0.5, 0.1, 0.2').startswith(prefix + "[0.5, 0.1, ")
    rule = constraint.start()
    for tok in tokenizer(prefix + '[0.2, 0.1, 0.5, 0.3]}}]\n"value👉" ok', add_special_tokens=False).input_ids:
        assert rule.allows(tok)
        rule.push(tok)


def test_params_of_any_type_are_decoded_as_json_scalars(tokenizer):
    """A plug-in's ``Any`` or ``dict[str, Any]`` param made lm-format-enforcer fail mid-turn ("Unsupported type
    None", "'bool' object has no attribute 'anyOf'"): the chat broke as the model wrote that param."""
    from typing import Any

    from mmedagent.tools import Tool, ToolParams, ToolResult

    class Note(Tool):
        name, description = "note", "Keep a note."

        class Params(ToolParams):
            value: Any = None
            tags: dict[str, Any] = {}
            items: list[Any] = []

        class Result(ToolResult):
            pass

    constraint = TurnConstraint(tokenizer, [Note], [tokenizer.eos_token_id])
    turn = ('"thoughts🤔" x\n"actions🚀" [{"API_name": "note", "API_params": {"value": 3, "tags": {"a": "b", "n": null}, '
            '"items": ["x", 1.5, true]}}]\n"value👉" ok')
    rule = constraint.start()
    for tok in tokenizer(turn, add_special_tokens=False).input_ids:
        assert rule.allows(tok), tokenizer.decode([tok])
        rule.push(tok)
    assert parse_turn(turn).actions[0].API_params["tags"] == {"a": "b", "n": None}


RETRIEVAL_PREFIX = '"thoughts🤔" x\n"actions🚀" [{"API_name": "retrieval", "API_params": {"query": "q", "k": '


@pytest.mark.parametrize("k, valid", [
    ("295952959995959595959999599", "29"),  # the demo planner's runaway k (eval-retrieval-81)
    ("51", "5"), ("500", "50"), ("0", ""), ("5.0", "5"), ("-1", ""), ("05", ""),
])
def test_integer_bounds_are_held_digit_by_digit(constraint, tokenizer, k, valid):
    written = written_until_refused(constraint, tokenizer, RETRIEVAL_PREFIX + k)
    assert written.rstrip() == (RETRIEVAL_PREFIX + valid).rstrip()  # " -" may be one token


@pytest.mark.parametrize("k", ["1", "5", "29", "50"])
def test_integers_within_bounds_are_allowed(constraint, tokenizer, k):
    rule = constraint.start()
    for tok in tokenizer(" " + RETRIEVAL_PREFIX + k + '}}]\n"value👉" ok', add_special_tokens=False).input_ids:
        assert rule.allows(tok)
        rule.push(tok)
    assert rule.allows(tokenizer.eos_token_id)


def test_allowed_tokens_in_a_bounded_integer_are_exactly_those_that_can_still_fit(constraint, tokenizer):
    def after(text):  # the allowed tokens that go on with the number, and whether it may end
        rule = constraint.start()
        for tok in tokenizer(RETRIEVAL_PREFIX + text, add_special_tokens=False).input_ids:
            rule.push(tok)
        allowed = {tokenizer.decode([t]).strip() for t in rule.allowed()}
        return {t for t in allowed if t[:1] in set("-.0123456789")}, "," in allowed

    assert after("") == (set("123456789"), False)
    assert after("5") == ({"0"}, True)
    assert after("3") == (set("0123456789"), True)
    assert after("6") == (set(), True)  # 60 .. 69 > 50


@pytest.mark.parametrize("params, valid_prefix", [
    ('"box_threshold": 1.5', '"box_threshold": 1.'),
    ('"box_threshold": 0.35, "text_threshold": 2', '"box_threshold": 0.35, "text_threshold": '),
])
def test_number_bounds_are_held(constraint, tokenizer, params, valid_prefix):
    prefix = '"thoughts🤔" x\n"actions🚀" [{"API_name": "grounding", "API_params": {"prompts": ["a"], '
    assert written_until_refused(constraint, tokenizer, prefix + params) == prefix + valid_prefix


def test_exclusive_and_negative_bounds_are_held(tokenizer):
    from pydantic import Field

    from mmedagent.tools import Tool, ToolParams, ToolResult

    class Shift(Tool):
        name, description = "shift", "Shift the window."

        class Params(ToolParams):
            offset: int = Field(ge=-20, le=-12)
            rate: float = Field(gt=0, lt=0.5)

        class Result(ToolResult):
            pass

    constraint = TurnConstraint(tokenizer, [Shift], [tokenizer.eos_token_id])
    prefix = '"thoughts🤔" x\n"actions🚀" [{"API_name": "shift", "API_params": {'
    for params, valid in [('"offset": -21', '"offset": -2'), ('"offset": -11', '"offset": -1'),
                          ('"offset": -3', '"offset": -'), ('"rate": 0.5', '"rate": '),
                          ('"rate": 0.0}', '"rate": 0.0')]:
        assert written_until_refused(constraint, tokenizer, prefix + params).rstrip() == (prefix + valid).rstrip()
    rule = constraint.start()
    for tok in tokenizer(prefix + '"offset": -12, "rate": 0.49}}]\n"value👉" ok', add_special_tokens=False).input_ids:
        assert rule.allows(tok)
        rule.push(tok)


def test_byte_tokens_must_spell_the_character_the_grammar_wants(byte_split_tokenizer):
    """After '"thoughts' only the bytes of 🤔, in order: a byte that leads elsewhere, or is no UTF-8,
    is refused (a random model could otherwise write stray bytes forever)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tok = byte_split_tokenizer
    char = bytes_to_unicode()
    byte = {b: tok.convert_tokens_to_ids(c) for b, c in char.items()}
    spelled = {c: b for b, c in char.items()}
    rule = TurnConstraint(tok, built_in_tools(), [tok.eos_token_id]).start()
    for t in tok('"thoughts', add_special_tokens=False).input_ids:
        rule.push(t)
    want = "🤔".encode()
    for i, wrong in enumerate((0xE2, 0xC1, 0x98, 0x41)):
        allowed = rule.allowed()
        assert byte[want[i]] in allowed
        assert all(want[i:].startswith(bytes(spelled[c] for c in tok.convert_ids_to_tokens(t))) for t in allowed)
        assert not rule.allows(byte[wrong]) and not rule.allows(tok.eos_token_id)
        rule.push(byte[want[i]])
    assert rule.allows(tok.convert_tokens_to_ids('"'))


def test_tokens_that_add_no_text_are_never_allowed(tokenizer):
    """A token that decodes to nothing would leave the grammar where it was, so a model could write it forever."""
    silent = tokenizer.convert_tokens_to_ids("tumor")

    class Muted:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __len__(self):
            return len(tokenizer)

        def decode(self, ids, **kwargs):
            return tokenizer.decode([i for i in ids if i != silent], **kwargs)

    rule = TurnConstraint(Muted(), built_in_tools(), [tokenizer.eos_token_id]).start()
    for tok in tokenizer(' "thoughts🤔" the', add_special_tokens=False).input_ids:
        assert silent not in rule.allowed() and not rule.allows(silent)
        rule.push(tok)
    assert silent not in rule.allowed() and not rule.allows(silent)


def test_a_tiny_random_model_makes_progress_under_the_constraint(tmp_path, image, monkeypatch):
    """A random checkpoint pushed towards byte tokens (which once stalled it, a stray byte after another,
    at '"thoughts'): its bytes spell the characters the grammar wants, so the turn goes on."""
    from mmedagent.model import load_planner
    from mmedagent.model.tiny import make_tiny_model

    planner = load_planner(make_tiny_model("llava", tmp_path / "m"), conv_template="vicuna_v1", constrain=True)
    tok = planner.tokenizer
    byte_tokens = [i for i in range(len(tok)) if "\ufffd" in tok.decode([i])]

    def fond_of_bytes(*args, _forward=planner._forward, **kwargs):
        logits = _forward(*args, **kwargs)
        logits[..., byte_tokens] += 1e4
        return logits

    monkeypatch.setattr(planner, "_forward", fond_of_bytes)
    out = planner.generate([{"role": "user", "content": "<image>\nWhere is the tumor?"}], image, max_new_tokens=60)
    assert out.startswith('"thoughts🤔"') and len(out) > 20 and "\ufffd" not in out, out


def test_prompt_lookup_is_reported_off_under_the_constraint(tmp_path, caplog):
    """Constrained decoding picks every token itself, so drafts are never used: the planner says so
    (a warning) and its info does not claim prompt lookup."""
    from mmedagent.model import load_planner
    from mmedagent.model.tiny import make_tiny_model

    planner = load_planner(make_tiny_model("llava", tmp_path / "m"), constrain=True, prompt_lookup=8)
    assert planner.info()["prompt_lookup"] == 0 and planner.info()["constrain"]
    assert "prompt lookup is off" in caplog.text


def test_nested_params_models_are_written_out_per_tool(tokenizer):
    """Two tools with a nested model of the same name: each keeps its own fields in the decoding schema
    and the prompt (they shared one ``$defs`` entry, the last tool's, and the prompt showed a bare ``$ref``)."""
    from pydantic import BaseModel, create_model

    from mmedagent.protocol import render_tool_catalog
    from mmedagent.tools import Tool, ToolParams, ToolResult

    def tool(tool_name, region):
        class Nested(Tool):
            name, description = tool_name, "Measure a region."
            Params = create_model("Params", __base__=ToolParams, region=(region, ...))

            class Result(ToolResult):
                pass

        return Nested

    class Region(BaseModel):
        organ: str

    organ_tool = tool("organ_size", Region)

    class Region(BaseModel):  # noqa: F811 - the same model name, another shape
        slice_index: int

    slice_tool = tool("slice_size", Region)
    schema = actions_json_schema([organ_tool, slice_tool])
    assert "$defs" not in json.dumps(schema)
    organ, slice_ = (c["properties"]["API_params"]["properties"]["region"] for c in schema["items"]["anyOf"])
    assert list(organ["properties"]) == ["organ"] and list(slice_["properties"]) == ["slice_index"]
    catalog = render_tool_catalog([organ_tool, slice_tool])
    assert "$ref" not in catalog and '"organ"' in catalog and '"slice_index"' in catalog

    constraint = TurnConstraint(tokenizer, [organ_tool, slice_tool], [tokenizer.eos_token_id])
    call = ToolCall(API_name="organ_size", API_params={"region": {"organ": "liver"}})
    text = " " + render_turn(AssistantTurn(thoughts="x", actions=[call], value="Wait."))
    rule = constraint.start()
    for tok in tokenizer(text, add_special_tokens=False).input_ids:
        assert rule.allows(tok)
        rule.push(tok)
    wrong = ' "thoughts🤔" x\n"actions🚀" [{"API_name": "organ_size", "API_params": {"region": {"slice_index'
    rule = constraint.start()
    ids = tokenizer(wrong, add_special_tokens=False).input_ids
    assert not all(rule.allows(t) and rule.push(t) is None for t in ids)


def test_a_served_constrained_planner_names_only_the_tools_the_chat_offers(demo_planners, image):
    """The model worker held calls to the tools registered in its own process: a plug-in only the controller
    imported could never be called, and a built-in tool that no worker serves could."""
    from fastapi.testclient import TestClient

    from mmedagent.serve.model_worker import ModelHost, build_app
    from mmedagent.serve.uploads import png_data_url

    _, constrained = demo_planners
    client = TestClient(build_app(ModelHost(constrained, "demo", {}, 1 << 20)))
    offered = [{"name": "region_stats", "aliases": ["regionstats"],
                "params": {"type": "object", "properties": {"box": {"type": "array", "items": {"type": "number"},
                                                                    "minItems": 4, "maxItems": 4}},
                           "required": ["box"], "additionalProperties": False}}]
    question = "<image>\nSegment the lesion in this scan."
    body = {"messages": [{"role": "user", "content": question}], "image": png_data_url(image), "max_new_tokens": 160}
    def called(extra):  # the tool names the turn writes (a tiny model may run on past its token budget)
        lines = client.post("/worker_generate_stream", json={**body, **extra}).text.splitlines()
        return set(re.findall(r'"API_name"\s*:\s*"([^"]*)"', "".join(json.loads(x).get("text", "") for x in lines)))

    assert called({"tools": offered}) == {"region_stats"}
    unrestricted = called({})  # every tool registered in the worker's process, as before
    assert unrestricted and "region_stats" not in unrestricted


def test_no_tools_offered_leaves_the_action_list_empty(tokenizer):
    """A chat with no tool live (workers still loading, or all gone) failed every constrained turn."""
    constraint = TurnConstraint(tokenizer, [], [tokenizer.eos_token_id])
    assert written_until_refused(constraint, tokenizer, '"thoughts🤔" x\n"actions🚀" [{"API_name"').rstrip(" [") == \
        '"thoughts🤔" x\n"actions🚀"'  # no call may begin
    rule = constraint.start()
    for tok in tokenizer(' "thoughts🤔" x\n"actions🚀" []\n"value👉" ok', add_special_tokens=False).input_ids:
        assert rule.allows(tok)
        rule.push(tok)


def test_a_plugin_known_by_its_schema_alone_describes_itself_every_time():
    """Its schema's nested models ($defs) were popped from the one dict the class hands out: the second
    prompt or constraint built from it failed with a KeyError (every chat after the first)."""
    from pydantic import BaseModel

    from mmedagent.serve.remote import remote_tool_class
    from mmedagent.tools import ToolParams

    class Region(BaseModel):
        box: list[float]

    class Params(ToolParams):
        regions: list[Region]

    remote = remote_tool_class("hosp_regions", {"params": Params.model_json_schema()})
    assert actions_json_schema([remote]) == actions_json_schema([remote])
    assert system_prompt([remote]) == system_prompt([remote])



def test_a_planner_keeps_the_grammars_of_its_last_few_tool_sets(demo_planners):
    """Each set of tools offered builds a grammar from the whole vocabulary: kept for reuse, but not one per
    set ever seen (tool workers come and go; any client may offer a set)."""
    from itertools import combinations

    from mmedagent.model.planner import CONSTRAINTS

    _, constrained = demo_planners
    sets = list(combinations(built_in_tools(), 2))[:CONSTRAINTS + 2]
    try:
        for tools in sets:
            constrained.tools = list(tools)
            constrained._turn_rule()
        assert len(constrained._constraints) == CONSTRAINTS
        constrained.tools = list(sets[-1])
        constrained._turn_rule()  # the last set: reused, not built again
        assert len(constrained._constraints) == CONSTRAINTS
    finally:
        constrained.tools = None
