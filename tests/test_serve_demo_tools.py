"""The demo stack's tool weights: built once into the cache, loadable by every tool, filled in by
the launcher when no weights are configured, and labelled in the banner and ``/v1/models``.

One session build of the tiny weights (``MMEDAGENT_CACHE`` pointed at a temporary folder only
while it runs); one real ``python serve/controller.py --no-web`` start over loopback.
"""

import contextlib
import os
import re
import signal
from pathlib import Path

import httpx
import pytest
from _serve_fixtures import ServeProcess, serve_env, wait_until
from _tools_fixtures import scan_image

from mmedagent import demo, demo_tools
from mmedagent.dispatcher import Dispatcher
from mmedagent.protocol import ToolCall
from mmedagent.serve import openai_api as oa
from mmedagent.serve.config import ServeConfig, ToolSpec
from mmedagent.serve.controller import Controller, is_background
from mmedagent.serve.launcher import resolve_tool_specs
from mmedagent.serve.web import banner
from mmedagent.tools import _tiny, get_tool

TINY = demo_tools.TINY_NOTE
VISION_CALLS = {
    "grounding": {"prompts": ["tumor"], "box_threshold": 0.0},
    "segmentation": {"boxes": [[0.1, 0.1, 0.7, 0.8]]},
    "grounding_segmentation": {"prompts": ["lesion"], "box_threshold": 0.0},
    "classification": {"top_k": 2},
    "report_generation": {"style": "findings"},
}


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    """(cache root, options): the tiny tool weights built once through the default cache location."""
    root = tmp_path_factory.mktemp("mmedagent-cache")
    with pytest.MonkeyPatch.context() as mp:  # restored when the build is done
        mp.setenv("MMEDAGENT_CACHE", str(root))
        options = demo_tools.demo_tool_options()
    assert set(options) == set(demo_tools.WEIGHTS_NOTES)
    return root, options


def test_every_tool_loads_the_demo_weights_and_runs_through_the_dispatcher(demo_cache):
    root, options = demo_cache
    built = root / "demo-tools" / demo_tools.build_key()
    assert (built / "complete").is_file()
    tools = [get_tool(name)(**options[name]) for name in VISION_CALLS]
    for tool in tools:  # loaded one after another, as the workers do: from_pretrained is not thread-safe
        tool.ensure_loaded()
    outcomes, results = Dispatcher(tools, timeout_s=120).dispatch_all(
        [ToolCall(API_name=name, API_params={"image": "<imagepath>", **params}) for name, params in VISION_CALLS.items()],
        scan_image(160, 140),
    )
    for name, outcome in zip(VISION_CALLS, outcomes):
        assert outcome.ok, f"{name}: {outcome.error}"
    by_name = dict(zip(VISION_CALLS, results))
    assert by_name["segmentation"].areas[0] > 0
    assert len(by_name["classification"].labels) == 2 and by_name["report_generation"].model.startswith(str(built))
    assert all(0.0 <= v <= 1.0 for box in by_name["grounding"].boxes for v in box)
    assert len(by_name["grounding"].boxes) == 1  # the demo keeps the random detector's best box only
    # the weights each tool loaded are the built ones, and MedSAM's preprocessing is used
    assert all(str(built) in t.weights_note or "tiny_medsam" in t.weights_note for t in tools)
    assert tools[1].variant == "medsam" and tools[2].segmentation.variant == "medsam"
    # retrieval keeps its real default, labelled as real
    assert options["retrieval"] == {} and demo_tools.weights_note("retrieval") == "all-MiniLM-L6-v2 over ICD-10-CM (real)"


def test_weights_are_cached_and_a_new_builder_rebuilds(demo_cache, monkeypatch, tmp_path):
    root, options = demo_cache
    marker = root / "demo-tools" / demo_tools.build_key() / "complete"
    stamp = marker.stat().st_mtime_ns
    assert demo_tools.demo_tool_options(root / "demo-tools") == options  # explicit cache_dir, same place
    assert marker.stat().st_mtime_ns == stamp  # not rebuilt
    key = demo_tools.build_key()
    edited = tmp_path / "_tiny.py"
    edited.write_text(Path(_tiny.__file__).read_text(encoding="utf-8") + "\n# a changed builder\n", encoding="utf-8")
    monkeypatch.setattr(_tiny, "__file__", str(edited))
    assert demo_tools.build_key() != key


def test_evaluating_the_demo_live_uses_the_demo_tool_weights(demo_cache, monkeypatch):
    """As the server does: ``--model demo`` gets the demo stack's tools unless told otherwise."""
    from mmedagent.evaluation.cli import make_runner, parser

    root, options = demo_cache
    monkeypatch.setenv("MMEDAGENT_CACHE", str(root))
    tools = make_runner(parser().parse_args(["--model", "demo", "--tools", "grounding", "classification"])).dispatcher.tools
    assert tools["grounding"].options == options["grounding"] and tools["classification"].options == options["classification"]
    own = '{"grounding": {"model": "my/dino"}}'
    args = ["--model", "demo", "--tools", "grounding", "classification", "--tool-weights", "default", "--tool-options", own]
    tools = make_runner(parser().parse_args(args)).dispatcher.tools
    assert tools["grounding"].options == {"model": "my/dino"} and tools["classification"].options == {}
    # the composite tool takes a configured part's weights and the demo weights for the other, as served
    args = ["--model", "demo", "--tools", "grounding_segmentation", "--tool-options", own]
    composite = make_runner(parser().parse_args(args)).dispatcher.tools["grounding_segmentation"]
    assert composite.options == {"grounding": {"model": "my/dino"}, "segmentation": options["segmentation"]}


def test_launcher_fills_in_demo_weights_only_when_nothing_is_configured(demo_cache, monkeypatch, tmp_path):
    root, options = demo_cache
    monkeypatch.setenv("MMEDAGENT_CACHE", str(root))
    specs = resolve_tool_specs(ServeConfig())
    for name in VISION_CALLS:
        assert specs[name].options == options[name] and specs[name].weights_label == TINY, name
    assert specs["grounding_segmentation"].options == {"grounding": options["grounding"], "segmentation": options["segmentation"]}
    assert specs["retrieval"].options == {} and "(real)" in specs["retrieval"].weights_label
    assert is_background("retrieval", specs["retrieval"]) and not is_background("grounding", specs["grounding"])
    assert is_background("grounding", specs["grounding"].model_copy(update={"background": True}))
    assert not is_background("retrieval", specs["retrieval"].model_copy(update={"background": False}))
    assert not is_background("no such tool", specs["grounding"])  # a remote-only tool: waited for
    with monkeypatch.context() as m:  # a configured cache folder wins over $MMEDAGENT_CACHE
        m.setenv("MMEDAGENT_CACHE", str(tmp_path))
        assert resolve_tool_specs(ServeConfig(cache_dir=str(root)))["grounding"].options == options["grounding"]

    # a real planner: every tool keeps its published default weights
    real = resolve_tool_specs(ServeConfig(model_path="/models/mmedagent-lora"))
    assert all(s.options == {} and s.weights_label is None for s in real.values())
    assert ServeConfig(model_path="demo").effective_tool_weights == "demo"
    assert ServeConfig(model_path="/m", tool_weights="demo").effective_tool_weights == "demo"

    # configured options win (alias names too); the composite takes the configured part + the demo part
    cfg = ServeConfig(tools={"grounding dino": ToolSpec(options={"model": "/weights/gdino"}),
                             "MedSAM": ToolSpec(), "grounding_segmentation": ToolSpec()})
    mixed = resolve_tool_specs(cfg)
    assert mixed["grounding"].options == {"model": "/weights/gdino"} and mixed["grounding"].weights_label is None
    assert mixed["segmentation"].options == options["segmentation"]
    assert mixed["grounding_segmentation"].options == {"grounding": {"model": "/weights/gdino"},
                                                       "segmentation": options["segmentation"]}
    assert mixed["grounding_segmentation"].weights_label == f"segmentation: {TINY}"

    # a head node: workers elsewhere bring their own weights; in-process tools get the demo ones
    head = resolve_tool_specs(ServeConfig(no_workers=True, tools={"grounding": ToolSpec(), "classification": ToolSpec(in_process=True)}))
    assert head["grounding"].options == {} and head["classification"].options == options["classification"]


def test_banner_and_model_list_label_tiny_weights_and_show_the_demo_evaluation(tmp_path, monkeypatch):
    monkeypatch.setenv("MMEDAGENT_CACHE", str(tmp_path))
    monkeypatch.setattr(demo, "PACKAGED", tmp_path / "not-shipped")
    built = demo.demo_dir()
    built.mkdir(parents=True)
    (built / "config.json").write_text("{}")
    (built / demo.SETTINGS_FILE).write_text('{"system_prompt": "plain"}')
    (built / demo.REPORT_FILE).write_text('{"tool_selection_accuracy": 0.975, "argument_validity": 1.0, "routes": true, '
                                          '"samples": [{}, {}, {}, {}]}')
    ctl = Controller(ServeConfig(tools={"grounding": ToolSpec(weights_label=TINY)}))
    try:
        models = [{"name": "demo", "family": "llava", "note": demo.NOTE}]
        summary = ctl.demo_summary(models)
        assert summary["note"] == demo.NOTE and summary["evaluation"]["tool_selection_accuracy"] == 0.975
        assert ctl.demo_summary([{"name": "x", "note": ""}]) is None  # another model: no demo block
    finally:
        ctl.close()
    text = banner({"models": models, "demo": summary, "loading": ["retrieval"], "tools": [
        {"name": "grounding", "weights": "Grounding DINO: /c/grounding-dino", "label": TINY},
        {"name": "bright_region", "weights": "no weights"}, {"name": "ruler", "weights": ""}]})
    assert "tool selection accuracy 98%, argument validity 100%" in text and "4 questions" in text
    assert f"`grounding` — **{TINY}** (Grounding DINO: /c/grounding-dino)" in text and "`bright_region` (no weights)" in text
    assert "- `ruler`\n" in text + "\n" and "no weights note" not in text  # a plug-in without a note: nothing to say
    assert text.count(demo.NOTE) == 1 and "**Still loading:** `retrieval`" in text
    listing = oa.model_list(["demo"], notes={"demo": demo.NOTE}, tools=[{"name": "grounding", "label": TINY}])
    assert listing["data"][0]["mmedagent_note"] == demo.NOTE and listing["mmedagent_tools"][0]["label"] == TINY


def test_one_command_without_arguments_starts_every_tool(demo_cache, tmp_path):
    root, _ = demo_cache
    env = serve_env(MMEDAGENT_CACHE=str(root), XDG_CACHE_HOME=str(tmp_path / "xdg"))
    ctl = ServeProcess("controller.py", ["--no-web", "--port", "0"], tmp_path / "controller.log", env)
    try:
        url = ctl.wait_for(r"controller: (http://\S+)", 120).group(1)
        line = ctl.wait_for(r"^ready: .*", 420).group(0)
        assert "failed to start" not in line, line
        started = re.search(r"tools: ([^;]*)", line).group(1).split(", ")
        loading = re.search(r"loading: ([^;(]*)", line)
        assert set(VISION_CALLS) <= set(started), line
        assert "retrieval" in started or (loading and loading.group(1).strip() == "retrieval"), line
        with httpx.Client(base_url=url, timeout=30, trust_env=False) as client:
            listing = client.get("/v1/models").json()
            status = client.get("/v1/status").json()
        labels = {t["name"]: t.get("label") for t in listing["mmedagent_tools"]}
        assert all(labels[name] == TINY for name in VISION_CALLS), labels
        assert listing["data"][0]["mmedagent_note"]  # the planner's note (demo or tiny checkpoint)
        assert set(status["loading"]) <= {"retrieval"}
        workers = processes_naming(url)
        assert len(workers) >= len(started) + 1  # a model worker and the tool workers
        ctl.proc.send_signal(signal.SIGTERM)  # as a service manager stops it: the controller alone
        assert ctl.proc.wait(30) is not None
        wait_until(lambda: not processes_naming(url), timeout=20)  # it stopped its workers on the way out
    finally:
        ctl.stop()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(ctl.proc.pid, signal.SIGKILL)


def processes_naming(text: str) -> list[int]:
    """PIDs of live processes whose command line contains ``text``."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if text in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace"):
                pids.append(int(proc.name))
    return pids
