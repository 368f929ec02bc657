import threading
import time

import pytest

from doubles import CrashTool, FakeGrounding, ScriptedPlanner, SlowTool, grey_image
from mmedagent.agent import Agent
from mmedagent.dispatcher import Dispatcher
from mmedagent.protocol import AssistantTurn, ToolCall, parse_tool_results, render_turn
from mmedagent.tools import ToolParams


def call(name, **params):
    return ToolCall(API_name=name, API_params=params)


@pytest.fixture
def tools():
    return [FakeGrounding(), SlowTool(), CrashTool()]


def test_alias_lookup_is_case_insensitive(tools):
    d = Dispatcher(tools)
    out = d.dispatch(call("GROUNDING DINO", prompts=["tumor"]), grey_image())
    assert out.ok and out.output == {"boxes": [[0.12, 0.2, 0.3, 0.4]], "phrases": ["tumor"]}  # rounded, hidden field dropped
    assert out.tool == "GROUNDING DINO"


def test_unknown_tool_lists_known(tools):
    out = Dispatcher(tools).dispatch(call("ChatCAD-X"), grey_image())
    assert not out.ok
    assert "unknown tool 'ChatCAD-X'" in out.error and "crash, grounding, slow" in out.error


def test_bad_params_name_the_field(tools):
    d = Dispatcher(tools)
    out = d.dispatch(call("grounding", prompts="tumor"), grey_image())
    assert not out.ok and "prompts" in out.error and "invalid params for grounding" in out.error
    out = d.dispatch(call("grounding", prompts=["x"], box_treshold=0.3), grey_image())
    assert not out.ok and "box_treshold" in out.error and "Extra inputs" in out.error
    out = d.dispatch(call("grounding"), grey_image())
    assert "prompts: Field required" in out.error


def test_timeout_returns_error_quickly(tools):
    d = Dispatcher(tools, timeout_s=0.3)
    t0 = time.monotonic()
    out = d.dispatch(call("slow", seconds=30), None)
    assert time.monotonic() - t0 < 2
    assert not out.ok and out.error == "timed out after 0.3 s"
    tools[1].release.set()


def test_crash_becomes_error_result(tools):
    out = Dispatcher(tools).dispatch(call("crash"), None)
    assert not out.ok and out.error == "RuntimeError: weights corrupted"


def test_a_tool_error_reads_as_its_message_and_every_failure_says_its_kind(tools):
    """A ToolError is a message the model and the user read as is (no "ToolError: " before it); each failure
    carries its kind for a server's status code, and the kind is no part of the trace."""
    from mmedagent.tools import ToolError

    class NoTissue(ToolError):
        failure = "params"

    class Bogus(ToolError):
        failure = "weird"

    class Picky(CrashTool):
        name = "picky"

        def __call__(self, image, params):
            raise self.error

    picky = Picky()
    d = Dispatcher([*tools, picky], timeout_s=0.3)
    for error, text, kind in [(ToolError("no slice holds tissue"), "no slice holds tissue", "error"),
                              (NoTissue("slice 40 is out of range"), "slice 40 is out of range", "params"),
                              (Bogus("odd"), "odd", "error"), (ValueError("bad"), "ValueError: bad", "error")]:
        picky.error = error
        out = d.dispatch(call("picky"), None)
        assert (out.ok, out.error, out.failure) == (False, text, kind)
        assert "failure" not in out.model_dump() and "failure" not in out.model_dump_json()
    assert d.dispatch(call("nosuch"), None).failure == "unknown"
    assert d.dispatch(call("grounding", prompts="tumor"), grey_image()).failure == "params"
    assert d.dispatch(call("grounding", prompts=["tumor"]), None).failure == "params"  # no image
    assert d.dispatch(call("slow", seconds=30), None).failure == "timeout"
    tools[1].release.set()
    assert d.dispatch(call("grounding", prompts=["tumor"]), grey_image()).failure is None


def test_a_timeout_the_tool_raises_is_its_own_error_not_the_dispatch_timeout():
    class Pacs(CrashTool):
        name = "pacs"

        def __call__(self, image, params):
            raise TimeoutError("the PACS did not answer within 2 s")

    d = Dispatcher([Pacs()], timeout_s=60)
    out = d.dispatch(call("pacs"), None)
    assert not out.ok and out.error == "TimeoutError: the PACS did not answer within 2 s" and out.elapsed_s < 5
    assert not d._overdue.get("pacs")  # nothing is left counted as running past the timeout


def test_a_turn_of_several_calls_keeps_their_order_and_fails_only_the_bad_ones(tools):
    class Invalid(CrashTool):
        name = "invalid"

        def __call__(self, image, params):
            return {"boxes": [[0, 0, 1, 1]]}  # not its Result

    d = Dispatcher([*tools, Invalid()], timeout_s=1.0)
    calls = [call("slow", seconds=30), call("grounding", prompts=["tumor"]), call("crash"), call("nope"),
             call("invalid"), call("grounding", prompts="tumor"), call("slow", seconds=30), call("grounding dino", prompts=["cyst"])]
    t0 = time.monotonic()
    outcomes, results = d.dispatch_all(calls, grey_image())
    assert time.monotonic() - t0 < 1.8  # side by side under one deadline: two timeouts in a row would take 2 s
    tools[1].release.set()
    assert [o.tool for o in outcomes] == [c.API_name for c in calls]
    assert [o.ok for o in outcomes] == [False, True, False, False, False, False, False, True]
    assert outcomes[0].error == outcomes[6].error == "timed out after 1 s"
    assert "weights corrupted" in outcomes[2].error and "unknown tool" in outcomes[3].error
    assert "returned dict, expected" in outcomes[4].error and "invalid params for grounding" in outcomes[5].error
    assert outcomes[7].output["phrases"] == ["cyst"] and [r is not None for r in results] == [o.ok for o in outcomes]


def test_a_for_model_of_numpy_values_reads_as_plain_json_or_is_that_calls_error():
    """A plug-in whose ``for_model()`` hands back numpy numbers or tuples: the model reads the plain
    JSON values it was trained on (not ``np.float64(0.5)``), the trace serialises, and a value JSON
    cannot carry is the call's error naming it, while the turn's other calls run."""
    import json

    import numpy as np

    from mmedagent.protocol import render_tool_results
    from mmedagent.tools import ToolResult

    class Stats(ToolResult):
        def for_model(self):
            grey = np.asarray(grey_image().convert("L"), dtype=np.float32)
            return {"mean": grey.mean(), "n": np.int64(3), "bright": np.bool_(True), "box": (0.25, 0.5, 0.75, 1.0),
                    "spread": np.float32("nan")}  # float32, int64, bool_: not float subclasses as float64 is

    class Histogram(ToolResult):
        def for_model(self):
            return {"counts": np.bincount([1, 1, 2])}

    class StatsTool(CrashTool):
        name = "stats"

        def __call__(self, image, params):
            return Stats()

    class HistogramTool(CrashTool):
        name = "histogram"

        def __call__(self, image, params):
            return Histogram()

    (stats, histogram, found), _ = Dispatcher([StatsTool(), HistogramTool(), FakeGrounding()]).dispatch_all(
        [call("stats"), call("histogram"), call("grounding", prompts=["x"])], grey_image())
    assert stats.ok and stats.output == {"mean": 100.0, "n": 3, "bright": True, "box": [0.25, 0.5, 0.75, 1.0],
                                         "spread": None}
    assert render_tool_results([stats], "q").splitlines()[0] == (
        "stats output: {'mean': 100.0, 'n': 3, 'bright': True, 'box': [0.25, 0.5, 0.75, 1.0], 'spread': None}")
    json.dumps(stats.model_dump(), allow_nan=False)  # what the controller streams as the step's trace
    assert not histogram.ok and "Histogram.for_model() returned ndarray at output.counts" in histogram.error
    assert "JSON cannot carry" in histogram.error and found.ok


def test_image_placeholder_and_model_paths_never_reach_tools(tools, tmp_path, monkeypatch):
    import builtins

    img = grey_image()
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: opened.append(f) or real_open(f, *a, **k))
    d = Dispatcher(tools)
    for value in ("<imagepath>", "/etc/passwd", str(tmp_path / "secret.png")):
        out = d.dispatch(call("grounding", image=value, prompts=["x"]), img)
        assert out.ok
    assert all(seen is img for seen in tools[0].seen_images) and len(tools[0].seen_images) == 3
    assert not any("passwd" in str(f) or "secret" in str(f) for f in opened)


def test_missing_image_is_an_error(tools):
    out = Dispatcher(tools).dispatch(call("grounding", prompts=["x"]), None)
    assert not out.ok and "needs an image" in out.error


def test_tool_loads_once(tools):
    d = Dispatcher(tools)
    for _ in range(3):
        d.dispatch(call("grounding", prompts=["x"]), grey_image())
    assert tools[0].loads == 1


def turn(actions, value="Please wait."):
    return render_turn(AssistantTurn(thoughts="t", actions=[ToolCall(**a) for a in actions], value=value))


def test_agent_multi_call_turn_then_answer(tools):
    planner = ScriptedPlanner([
        turn([{"API_name": "grounding dino", "API_params": {"image": "<imagepath>", "prompts": ["tumor"]}},
              {"API_name": "crash"}, {"API_name": "nope"}]),
        turn([], value="The tumor is at [0.12, 0.2, 0.3, 0.4]."),
    ])
    agent = Agent(planner, Dispatcher(tools))
    result = agent.run("Where is the tumor?", image=grey_image())
    assert result.answer == "The tumor is at [0.12, 0.2, 0.3, 0.4]." and result.stopped == "answer"
    assert result.tool_calls == ["grounding dino", "crash", "nope"]
    step = result.steps[0]
    assert [o.ok for o in step.outcomes] == [True, False, False]
    assert step.overlays[0].boxes == [[0.1234, 0.2, 0.3, 0.4]] and step.overlays[1] is None
    # the second planner call sees the tool results in the one wording, image token in the first user turn
    second = planner.calls[1]
    assert second[1]["content"] == "<image>\nWhere is the tumor?"
    fed = parse_tool_results(second[-1]["content"])
    assert fed.question == "Where is the tumor?"
    assert [o.tool for o in fed.outcomes] == ["grounding dino", "crash", "nope"]
    assert "available tools" in fed.outcomes[2].error
    # the system prompt was derived from the tools
    assert second[0]["role"] == "system" and "grounding dino" in second[0]["content"]


def test_agent_max_steps_bound(tools):
    looping = turn([{"API_name": "grounding", "API_params": {"prompts": ["x"]}}])
    planner = ScriptedPlanner([looping] * 10)
    events = []
    result = Agent(planner, Dispatcher(tools), max_steps=3).run("q", image=grey_image(), on_event=lambda *e: events.append(e))
    assert result.stopped == "max_steps" and len(planner.calls) == 3 and len(result.steps) == 3
    assert len(tools[0].seen_images) == 2  # the last planner call's actions are not run: nobody would read them
    shown = [payload for kind, payload in events if kind == "step"]  # clients show every step, the unrun call too
    assert shown == result.steps and shown[-1].turn.actions and not shown[-1].outcomes


def test_agent_malformed_output_ends_turn_with_error(tools):
    planner = ScriptedPlanner(['"thoughts🤔" x\n"actions🚀" [{"API_name": \n"value👉" oops'])
    events = []
    result = Agent(planner, Dispatcher(tools)).run("q", image=grey_image(), on_event=lambda *e: events.append(e))
    assert result.stopped == "parse_error" and result.steps[0].parse_error
    assert [kind for kind, _ in events] == ["step", "answer"]  # clients show the unreadable turn as such
    # the conversation goes on: history is returned and usable
    planner.replies.append(turn([], value="fine"))
    again = Agent(planner, Dispatcher(tools)).run("next?", history=result.messages)
    assert again.answer == "fine" and again.messages[-2] == {"role": "user", "content": "next?"}


def test_the_agent_places_the_image_marker_once_where_the_image_is(tools):
    planner = ScriptedPlanner([turn([], value="a"), turn([], value="b"), turn([], value="c")])
    agent = Agent(planner, Dispatcher(tools), system="sys")
    first = agent.run("Is <image> a tumor?", image=grey_image())  # a marker typed by the user is text, not an image
    assert planner.calls[0] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "<image>\nIs  a tumor?"}]
    tampered = [*first.messages, {"role": "user", "content": "<image>\nand <image> here"}]
    agent.run("next?", image=grey_image(), history=tampered)
    users = [m["content"] for m in planner.calls[1] if m["role"] == "user"]
    assert users == ["<image>\nIs  a tumor?", "and  here", "next?"]
    agent.run("text only?", history=tampered)  # no image: no marker anywhere
    assert not any("<image>" in m["content"] for m in planner.calls[2])


def test_agent_plain_text_answer(tools):
    result = Agent(ScriptedPlanner(["Just a chest X-ray."]), Dispatcher(tools)).run("what?")
    assert result.answer == "Just a chest X-ray." and result.stopped == "answer"


def test_question_fills_an_empty_question_param():
    from mmedagent.tools import ToolParams

    class LookupParams(ToolParams):
        query: str | None = None

    class Lookup(FakeGrounding):
        name = "lookup"
        aliases = ("ChatCAD-R",)
        Params = LookupParams
        question_param = "query"
        needs_image = False

        def __call__(self, image, params):
            if not params.query:
                raise ValueError("query is empty")
            return self.Result(boxes=[], phrases=[params.query], image_size=[0, 0])

    d = Dispatcher([Lookup()])
    out = d.dispatch(call("ChatCAD-R", image="<imagepath>"), None, question="what is I10?")
    assert out.ok and out.output["phrases"] == ["what is I10?"]
    out = d.dispatch(call("ChatCAD-R", query="explicit"), None, question="ignored")
    assert out.ok and out.output["phrases"] == ["explicit"]
    out = d.dispatch(call("ChatCAD-R"), None)
    assert not out.ok and "query is empty" in out.error


# --------------------------------------------------------------------------- hung tools, loading


class LoadParams(ToolParams):
    pass


class Loading(FakeGrounding):
    """A tool whose load waits on ``gate`` (or fails); records when loads run."""

    name = "loading"
    aliases = ()
    Params = LoadParams
    needs_image = False
    load_s = 0.0

    def __init__(self, fail=False, **options):
        super().__init__(**options)
        self.fail, self.started, self.gate = fail, threading.Event(), threading.Event()
        self.spans = []

    def load(self):
        self.started.set()
        t0 = time.monotonic()
        self.gate.wait(self.load_s)
        self.loads += 1
        self.spans.append((t0, time.monotonic()))
        if self.fail:
            raise RuntimeError("no weights here")

    def __call__(self, image, params):
        return self.Result(boxes=[], phrases=[], image_size=[0, 0])


def test_a_hung_tool_cannot_starve_the_others(tools):
    slow, fast = tools[1], tools[0]
    d = Dispatcher(tools, timeout_s=0.5, max_workers=2)
    try:
        for _ in range(2):  # both of slow's threads now hang past their timeout
            assert d.dispatch(call("slow", seconds=30), None).error == "timed out after 0.5 s"
        out = d.dispatch(call("grounding", prompts=["x"]), grey_image())
        assert out.ok, out.error  # a healthy tool still gets a thread
        t0 = time.monotonic()
        out = d.dispatch(call("slow", seconds=0), None)
        assert time.monotonic() - t0 < 1  # refused at once, not queued behind the hung calls (they run for 30 s)
        assert not out.ok and "2 earlier calls are still running past the 0.5 s timeout" in out.error
        assert out.error.startswith("slow is not responding")
        # in one turn: the hung tool's call is refused, the others run
        outcomes, _ = d.dispatch_all([call("slow"), call("grounding", prompts=["y"]), call("crash")], grey_image())
        assert [o.ok for o in outcomes] == [False, True, False] and "still running" in outcomes[0].error
        slow.release.set()  # the hung calls end; the tool is usable again
        deadline = time.monotonic() + 2
        while d._overdue.get("slow") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert d.dispatch(call("slow", seconds=0), None).ok
        assert fast.seen_images and len(fast.seen_images) == 2
    finally:
        slow.release.set()
        d.close()


def test_the_timeout_covers_the_call_not_the_first_load():
    class SlowLoad(Loading):
        load_s = 1.5

    tool = SlowLoad()
    d = Dispatcher([tool], timeout_s=1.0)
    out = d.dispatch(call("loading"), None)
    assert out.ok, out.error
    assert tool.loads == 1 and out.elapsed_s < 1.0  # the load's time is not the call's


def test_a_load_failure_is_an_error_outcome_and_the_chat_goes_on():
    bad = Loading(fail=True)
    planner = ScriptedPlanner([turn([{"API_name": "loading"}, {"API_name": "grounding", "API_params": {"prompts": ["x"]}}]),
                               turn([], value="done")])
    dispatcher = Dispatcher([bad, FakeGrounding()])
    result = Agent(planner, dispatcher).run("q", image=grey_image())
    assert result.answer == "done"
    first, second = result.steps[0].outcomes
    assert not first.ok and first.error == "loading failed to load: RuntimeError: no weights here" and second.ok
    again = dispatcher.dispatch(call("loading"), None)  # unavailable from now on, not loaded again on every call
    assert again.error == "loading is unavailable: it failed to load (RuntimeError: no weights here)" and bad.loads == 1


def test_preload_reports_failures_and_their_calls_say_so(tools):
    bad, good = Loading(fail=True), tools[0]
    d = Dispatcher([bad, *tools])
    lines = []
    assert d.preload(lines.append) == {"loading": "RuntimeError: no weights here"}
    assert good.loads == 1 and "tool loading failed to load: RuntimeError: no weights here" in lines
    assert any(line.startswith("tool grounding loaded in") for line in lines)
    out = d.dispatch(call("loading"), None)
    assert not out.ok and out.error == "loading is unavailable: it failed to load (RuntimeError: no weights here)"
    assert bad.loads == 1  # not retried on every call
    assert d.dispatch(call("grounding", prompts=["x"]), grey_image()).ok


def test_a_slow_load_does_not_hold_up_other_tools_loads():
    """Only building models is one at a time per process; a tool that says so (``exclusive_load =
    False``) loads beside the others, and each tool still loads once."""

    class IndexBuild(Loading):
        exclusive_load = False
        load_s = 5.0

    slow, other = IndexBuild(), FakeGrounding()
    threads = [threading.Thread(target=slow.ensure_loaded) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        assert slow.started.wait(2)
        t = threading.Thread(target=other.ensure_loaded)
        t.start()
        t.join(1)
        assert not t.is_alive() and other.loads == 1 and other.loaded  # did not wait for the slow load
        assert not slow.loaded
    finally:
        slow.gate.set()
        for t in threads:
            t.join(2)
    assert slow.loaded and slow.loads == 1  # three callers, one load


def test_exclusive_loads_still_run_one_at_a_time():
    class A(Loading):
        name, load_s = "a", 0.1

    class B(Loading):
        name, load_s = "b", 0.1

    a, b = A(), B()
    threads = [threading.Thread(target=t.ensure_loaded) for t in (a, b, a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(2)
    assert a.loads == b.loads == 1
    (a0, a1), (b0, b1) = a.spans[0], b.spans[0]
    assert a1 <= b0 or b1 <= a0  # never overlapping


def test_a_non_exclusive_tool_is_refused_inside_an_exclusive_load_but_may_be_passed_in_loaded():
    """Loading it there would take the weights lock and its own lock in the other order (a deadlock
    against a concurrent direct load); a composite gets the loaded instance instead."""
    class Indexer(Loading):
        name, exclusive_load = "indexer", False

    class Composite(Loading):
        name = "composite"

        def __init__(self, part):
            super().__init__()
            self.part = part

        def load(self):
            self.part.ensure_loaded()

    with pytest.raises(RuntimeError, match="indexer .* cannot be loaded inside another tool's load"):
        Composite(Indexer()).ensure_loaded()
    part = Indexer()
    part.ensure_loaded()
    composite = Composite(part)
    composite.ensure_loaded()
    assert composite.loaded and part.loads == 1


def test_a_tool_with_nothing_to_load_never_waits_for_anothers_load():
    class Blocker(Loading):
        load_s = 5.0

    blocker = Blocker()
    holder = threading.Thread(target=blocker.ensure_loaded)
    holder.start()
    try:
        assert blocker.started.wait(2)
        proxy = SlowTool()  # no load() of its own, like a remote proxy
        t = threading.Thread(target=proxy.ensure_loaded)
        t.start()
        t.join(1)
        assert not t.is_alive() and proxy.loaded
    finally:
        blocker.gate.set()
        holder.join(2)


def test_list_items_failing_alike_are_one_part_of_the_params_error():
    """A box in pixels read "boxes.0.0: …; boxes.0.1: …; boxes.0.2: …; boxes.0.3: …", the same words four times."""
    from mmedagent.dispatcher import parse_params
    from mmedagent.tools import get_tool

    segmentation = get_tool("segmentation")
    with pytest.raises(ValueError) as pixels:
        parse_params(segmentation, {"boxes": [[10, 20, 300, 400]]})
    assert str(pixels.value) == ("invalid params for segmentation: boxes.0 (items 0, 1, 2, 3): "
                                 "Input should be less than or equal to 1")
    with pytest.raises(ValueError) as one:
        parse_params(segmentation, {"boxes": [[0.1, 0.1, 0.5, 0.5], [0.2, 0.1, 0.5, 1.5]], "bogus": 1})
    assert str(one.value) == ("invalid params for segmentation: boxes.1.3: Input should be less than or equal to 1; "
                              "bogus: Extra inputs are not permitted")
