"""Property runs over what a planner may write and what comes back from tools.

Whatever the model emits, ``parse_turn`` gives an ``AssistantTurn`` or a ``TurnParseError`` (never
another exception, never a hang, never an evaluation); canonical turns and tool-result turns survive
render → parse → render unchanged; and the agent loop turns every malformed plan or failing call into
an error the model and the user can read, with the conversation still usable.
"""

import builtins
import json
import math
import random
import time
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from doubles import CrashTool, FakeGrounding, ScriptedPlanner, grey_image
from mmedagent.agent import Agent
from mmedagent.dispatcher import Dispatcher
from mmedagent.protocol import (
    ACTIONS_MARK,
    THOUGHTS_MARK,
    VALUE_MARK,
    AssistantTurn,
    ToolCall,
    ToolOutcome,
    ToolResultTurn,
    TurnParseError,
    parse_tool_results,
    parse_turn,
    render_tool_results,
    render_turn,
)
from mmedagent.tools import Tool

SETTINGS = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# printable text: what Python's repr keeps as is, so the single-quoted form of a call stays valid JSON once re-quoted;
# never a marker's word (a param value "actions🚀" is written as the marker itself: such a turn is refused, by design)
MARK_WORDS = tuple(m.strip('"') for m in (THOUGHTS_MARK, ACTIONS_MARK, VALUE_MARK))
printable = st.text(st.characters(categories=["L", "N", "P", "S"]) | st.just(" "), max_size=12).filter(
    lambda t: not any(w in t for w in MARK_WORDS))
free_text = printable.map(str.strip).filter(
    lambda t: not any(m in t for m in (THOUGHTS_MARK, ACTIONS_MARK, VALUE_MARK)))
leaf = (st.none() | st.booleans() | st.integers(-(10**30), 10**30)
        | st.floats(allow_nan=False, allow_infinity=False) | printable)
value = st.recursive(leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(printable, inner, max_size=3),
                     max_leaves=10)
tool_names = st.sampled_from(["grounding dino", "GROUNDING", "MedSAM", "crash", "pacs", "broken", "nope"]) | printable
calls = st.builds(
    lambda name, params: {"API_name": name, "API_params": params},
    tool_names.map(str.strip).filter(bool),
    st.dictionaries(st.sampled_from(["image", "prompts", "boxes"]) | printable, value, max_size=3),
)
turns = st.builds(AssistantTurn, thoughts=free_text, actions=st.lists(calls.map(ToolCall.model_validate), max_size=3),
                  value=free_text)

MARKS = [THOUGHTS_MARK, ACTIONS_MARK, VALUE_MARK, "🤔", "🚀", "👉"]
NOISE = list("\"'[]{}(),:\\ \n0123456789.-eE") + ["NaN", "Infinity", "-Infinity", "1e999", "9" * 5000, "True", "None",
                                                   "__import__('os')", "é", "\ud800", "\x00", "[" * 3000, "{" * 3000]


def _mutate(rng: random.Random, text: str) -> str:
    """Truncations, cut-outs, duplicated / dropped / moved markers, stray brackets and odd literals."""
    for _ in range(rng.randint(1, 4)):
        pos = rng.randint(0, len(text))
        op = rng.randrange(7)
        if op == 0:
            text = text[:pos]
        elif op == 1:
            text = text[:pos] + text[rng.randint(pos, len(text)):]
        elif op == 2:
            text = text[:pos] + rng.choice(MARKS) + text[pos:]
        elif op == 3:
            text = text.replace(rng.choice(MARKS), "", 1)
        elif op == 4:
            text = text[:pos] + rng.choice(NOISE) + text[pos:]
        elif op == 5:
            a, b = sorted((pos, rng.randint(0, len(text))))
            text = text[:a] + text[a:b] * 2 + text[b:]
        else:
            mark = rng.choice(MARKS[:3])
            text = text.replace(mark, "", 1)[:pos] + mark + text.replace(mark, "", 1)[pos:]
    return text


def _serialise(rng: random.Random, turn: AssistantTurn) -> str:
    actions = [a.model_dump() for a in turn.actions]
    forms = [json.dumps(actions), json.dumps(actions, indent=2), repr(actions)]
    if len(actions) == 1:
        forms.append(repr(actions[0]))  # one call written as a bare object
    form = rng.choice(forms)
    return f"{THOUGHTS_MARK} {turn.thoughts}\n{ACTIONS_MARK} {form}\n{VALUE_MARK} {turn.value}"


@SETTINGS
@given(turns)
def test_canonical_turns_round_trip_exactly(turn):
    text = render_turn(turn)
    assert parse_turn(text) == turn and render_turn(parse_turn(text)) == text


@SETTINGS
@given(turns, st.randoms(use_true_random=False))
def test_python_literal_and_pretty_printed_actions_read_as_the_same_calls(turn, rng):
    assert parse_turn(_serialise(rng, turn)) == turn


@contextmanager
def nothing_evaluated():
    """eval / exec / compile made to fail: parsing a planner turn must never reach them."""
    def refuse(*args, **kwargs):
        raise AssertionError("model text reached eval/exec/compile")

    saved = {name: getattr(builtins, name) for name in ("eval", "exec", "compile")}
    for name in saved:
        setattr(builtins, name, refuse)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(builtins, name, fn)


@SETTINGS
@given(turns, st.randoms(use_true_random=False))
def test_malformed_planner_text_is_a_turn_or_a_turn_parse_error_and_nothing_is_evaluated(turn, rng):
    text = _mutate(rng, _serialise(rng, turn))
    for strict in (True, False):
        started = time.monotonic()
        try:
            with nothing_evaluated():
                parsed = parse_turn(text, strict=strict)
        except TurnParseError as e:
            assert str(e) and "\n" not in str(e)  # one line, for the model and the user
        else:
            assert isinstance(parsed, AssistantTurn)
            assert parse_turn(render_turn(parsed)) == parsed  # what is kept in the history reads back the same
        assert time.monotonic() - started < 2


json_outputs = st.dictionaries(printable, value, max_size=4)
texts = st.text(max_size=60).filter(lambda t: "\n\nAnswer my first question: " not in t)
outcomes = st.one_of(
    st.builds(lambda t, o: ToolOutcome(tool=t, output=o), tool_names.map(str.strip).filter(bool), json_outputs),
    # a text that is a dict literal reads back as an output, by design ("{ }" as {})
    st.builds(lambda t, x: ToolOutcome(tool=t, text=x), tool_names.map(str.strip).filter(bool),
              texts.filter(lambda t: not t.strip().startswith("{"))),
    st.builds(lambda t, e: ToolOutcome(tool=t, ok=False, error=e), tool_names.map(str.strip).filter(bool), texts),
)


@SETTINGS
@given(st.lists(outcomes, min_size=1, max_size=4), texts)
def test_tool_result_turns_read_back_as_written(outs, question):
    text = render_tool_results(outs, question)
    if "\n" in outs[0].tool:  # a model-written name across lines: its first line is not a result line
        return
    back = parse_tool_results(text)
    assert back.question == question and render_tool_results(back.outcomes, back.question) == text


@SETTINGS
@given(st.text(max_size=200)
       | st.builds(lambda t, q: f"{t}\n\nAnswer my first question: {q}", st.text(max_size=150), texts))
def test_any_tool_result_text_is_a_turn_or_a_turn_parse_error_and_json_can_carry_it(text):
    try:
        back = parse_tool_results(text)
    except TurnParseError:
        return
    assert isinstance(back, ToolResultTurn)
    json.dumps(back.model_dump())


# --------------------------------------------------------------------------- the agent loop


class PacsTool(CrashTool):
    name = "pacs"

    def __call__(self, image, params):
        raise TimeoutError("the PACS did not answer")


class BrokenResultTool(Tool):
    name = "broken"
    needs_image = False

    def __call__(self, image, params):
        return {"boxes": [[0, 0, 1, 1]]}  # a dict, not its Result


@pytest.fixture(scope="module")
def dispatcher():
    d = Dispatcher([FakeGrounding(), CrashTool(), PacsTool(), BrokenResultTool()], timeout_s=5)
    yield d
    d.close()


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(turns, min_size=1, max_size=4), st.randoms(use_true_random=False), st.integers(1, 4))
def test_the_agent_loop_survives_any_planner_output(dispatcher, plans, rng, max_steps):
    replies = [_mutate(rng, _serialise(rng, t)) if rng.random() < 0.5 else render_turn(t) for t in plans]
    replies += [render_turn(AssistantTurn(value="done"))] * max_steps
    planner = ScriptedPlanner(replies)
    agent = Agent(planner, dispatcher, max_steps=max_steps, system="sys")
    result = agent.run("Where is the lesion?", image=grey_image())

    assert len(result.steps) == len(planner.calls) <= max_steps
    assert result.stopped in ("answer", "max_steps", "parse_error")
    for step in result.steps[:-1]:  # every step before the last ran its calls and fed them back
        assert step.turn is not None and [o.tool for o in step.outcomes] == [a.API_name for a in step.turn.actions]
        assert all(o.ok or o.error for o in step.outcomes)
    last = result.steps[-1]
    if result.stopped == "parse_error":
        assert last.parse_error and last.turn is None and "\n" not in last.parse_error
    fed = [m["content"] for m in result.messages if m["role"] == "user"][1:]
    assert len(fed) == len(result.steps) - 1
    for step, content in zip(result.steps, fed):
        assert content == render_tool_results(step.outcomes, "Where is the lesion?")

    # the conversation goes on from the returned history
    planner.replies[:] = [render_turn(AssistantTurn(value="still here"))]
    again = Agent(planner, dispatcher, system="sys").run("And now?", image=grey_image(), history=result.messages)
    assert again.answer == "still here" and again.stopped == "answer"


# --------------------------------------------------------------------------- drawing what tools return


coordinate = st.floats() | st.sampled_from([1e300, -1e300, 1e10, -0.2, 1.5])


@SETTINGS
@given(st.lists(st.lists(coordinate, min_size=4, max_size=4), max_size=4), st.lists(st.text(max_size=20), max_size=5))
def test_any_overlay_boxes_render_and_non_finite_ones_are_skipped(boxes, labels):
    from mmedagent.render import render
    from mmedagent.tools import Overlay

    image = grey_image((40, 30))
    out = render(image, [Overlay(boxes=boxes, labels=labels), None])
    assert out.size == image.size
    if not any(all(map(math.isfinite, b)) for b in boxes):
        assert out.tobytes() == image.tobytes()  # nothing drawable: the image as it was
