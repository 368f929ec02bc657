import logging
import re
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest

import mmedagent.tools as tools_pkg
from doubles import grey_image
from mmedagent.dispatcher import Dispatcher
from mmedagent.protocol import ToolCall, system_prompt

ROOT = Path(__file__).resolve().parents[1]


def load_readme_example():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- example-tool:start -->\s*```python\n(.*?)```", text, re.S).group(1)
    module = types.ModuleType("readme_example")
    exec(compile(block, "README.md", "exec"), module.__dict__)
    return module.RegionStats


def test_readme_example_tool_runs_through_dispatcher():
    RegionStats = load_readme_example()
    assert len(RegionStats.__module__) and RegionStats.name == "region_stats"
    d = Dispatcher([RegionStats()])
    out = d.dispatch(ToolCall(API_name="Intensity Stats", API_params={"image": "<imagepath>", "box": [0, 0, 0.5, 0.5]}), grey_image(value=80))
    assert out.ok and out.output == {"box": [0.0, 0.0, 0.5, 0.5], "mean": 80.0, "std": 0.0, "min": 80.0, "max": 80.0}
    edge = d.dispatch(ToolCall(API_name="region_stats", API_params={"box": [1, 1, 1, 1]}), grey_image(value=80))
    assert edge.ok and edge.output["mean"] == 80.0, edge.error  # a valid box on the edge holds one pixel
    bad = d.dispatch(ToolCall(API_name="region_stats", API_params={"box": [0, 0, 1]}), grey_image())
    assert not bad.ok and "box" in bad.error
    assert "region_stats (also: intensity stats)" in system_prompt([RegionStats])
    scan = np.zeros((8, 8), dtype=np.uint16)
    scan[:, 4:] = 4000  # a 16-bit array (a caller's own): it said "'numpy.ndarray' object has no attribute 'convert'"
    whole = d.dispatch(ToolCall(API_name="region_stats", API_params={}), scan)
    assert whole.ok and (whole.output["min"], whole.output["max"]) == (0.0, 255.0), whole.error


def test_the_readme_example_file_loads_as_a_plugin(tmp_path, monkeypatch):
    """``--plugin my_pkg.region_stats`` (controller and tool worker) registers the README's class as written."""
    from mmedagent.tools import get_tool, load_plugin, registry

    block = re.search(r"<!-- example-tool:start -->\s*```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    (tmp_path / "my_pkg").mkdir()
    (tmp_path / "my_pkg" / "__init__.py").write_text("from my_pkg.region_stats import RegionStats\n")
    (tmp_path / "my_pkg" / "region_stats.py").write_text(block)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_extra", {})
    assert [c.name for c in load_plugin("my_pkg.region_stats")] == ["region_stats"]
    assert get_tool("Intensity Stats").__module__ == "my_pkg.region_stats"
    assert [c.name for c in load_plugin("my_pkg")] == ["region_stats"]  # a package re-exporting its tools
    (tmp_path / "no_tools.py").write_text("X = 1\n")
    with pytest.raises(ValueError, match="no_tools defines no tool class"):
        load_plugin("no_tools")


def test_entry_point_plugin_discovery(tmp_path, monkeypatch, caplog):
    pkg = tmp_path / "acme_tools"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent('''
        from mmedagent.tools import Tool, ToolParams, ToolResult

        class Echo(Tool):
            name = "acme_echo"
            aliases = ("Echo Tool",)
            description = "Echoes its text."
            needs_image = False

            class Params(ToolParams):
                text: str

            class Result(ToolResult):
                text: str

            def __call__(self, image, params):
                return self.Result(text=params.text)

        class Half(Tool):  # no name: not a tool, and it must not take the others down
            description = "A base class."
    '''))
    (pkg / "impl.py").write_text(textwrap.dedent('''
        from acme_tools import Echo

        class Upper(Echo):
            name = "acme_upper"
            aliases = ()
    '''))
    (pkg / "plugin.py").write_text("from acme_tools.impl import Upper\n")  # a module re-exporting its tool
    (pkg / "empty.py").write_text("X = 1\n")
    dist = tmp_path / "acme_tools-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-tools\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[mmedagent.tools]\necho = acme_tools:Echo\nbroken = acme_tools:Missing\nhalf = acme_tools:Half\n"
        "upper = acme_tools.plugin\nempty = acme_tools.empty\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    tools_pkg.refresh()
    try:
        with caplog.at_level(logging.WARNING, logger="mmedagent.tools.registry"):
            cls = tools_pkg.get_tool("echo tool")
        warned = "\n".join(r.getMessage() for r in caplog.records)
        assert "tool plug-in half (acme_tools:Half, from acme-tools 1.0) is a Tool subclass that sets no name; " \
               "it is skipped: point the entry point at a tool class or at the module that defines it" in warned
        assert "tool plug-in empty (acme_tools.empty, from acme-tools 1.0): module acme_tools.empty defines no " \
               "tool class" in warned
        assert "tool plug-in broken (acme_tools:Missing, from acme-tools 1.0) could not be loaded: AttributeError: " \
               "module 'acme_tools' has no attribute 'Missing'; it is skipped: fix it or uninstall its package" \
               in warned
        assert tools_pkg.get_tool("acme_upper").__module__ == "acme_tools.impl"
        assert cls.name == "acme_echo" and cls.__module__ == "acme_tools"
        assert "acme_echo" in [t.name for t in tools_pkg.list_tools()]
        out = Dispatcher([cls()]).dispatch(ToolCall(API_name="ACME_ECHO", API_params={"text": "hi"}), None)
        assert out.ok and out.output == {"text": "hi"}
    finally:
        for mod in ("acme_tools", "acme_tools.impl", "acme_tools.plugin", "acme_tools.empty"):
            sys.modules.pop(mod, None)
        monkeypatch.undo()
        tools_pkg.refresh()
    with pytest.raises(tools_pkg.UnknownToolError, match="available tools"):
        tools_pkg.get_tool("echo tool")


def test_no_top_level_packages_installed(tmp_path):
    import subprocess

    code = ("import importlib.util, mmedagent.tools, mmedagent.serve, mmedagent.train, mmedagent.data; "
            "print([n for n in ('tools', 'serve', 'train', 'data') if importlib.util.find_spec(n)])")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert tools_pkg.__name__ == "mmedagent.tools"


def test_a_tool_overriding_a_built_in_in_this_process_does_not_push_it_out(monkeypatch):
    """A stand-in under a built-in's name (as tests register one) seen at discovery must not drop the
    built-in for the rest of the process once the stand-in is gone."""
    from mmedagent.tools import get_tool, list_tools, registry
    from mmedagent.tools.base import Tool

    class StandIn(Tool):
        name = "grounding"

    monkeypatch.setattr(registry, "_extra", {"grounding": StandIn})
    monkeypatch.setattr(registry, "_registry", None)
    assert get_tool("grounding") is StandIn
    registry._extra.clear()
    assert get_tool("grounding").__module__ == "mmedagent.tools.grounding"
    assert "grounding" in [t.name for t in list_tools()]


@pytest.mark.parametrize(("written", "tool"), [("grounding_dino", "grounding"), ("Grounding-DINO", "grounding"),
                                               ("grounding_dino+sam", "grounding_segmentation"),
                                               ("grounding dino+MedSAM", "grounding_segmentation"),
                                               ("  GROUNDING  DINO  +  SAM ", "grounding_segmentation"),
                                               ("grounding segmentation", "grounding_segmentation"),
                                               ("chatcad_r", "retrieval"), ("sam", "segmentation")])
def test_tool_names_match_whatever_the_case_separators_and_spaces_around_plus(written, tool):
    """LLaVA-Plus writes grounding_dino and grounding_dino+sam; MMedAgent "grounding dino + MedSAM"."""
    from mmedagent.tools.registry import get_tool

    assert get_tool(written).name == tool
    assert Dispatcher([get_tool(tool)()]).resolve(written).name == tool
    assert get_tool(tool).answers_to(written) and not get_tool(tool).answers_to(written + "x")


def test_a_plugin_alias_differing_only_in_separators_clashes_with_a_built_in():
    from mmedagent.tools import Tool, ToolParams, ToolResult
    from mmedagent.tools.registry import _clash, get_tool

    class Detector(Tool):
        name = "my_detector"
        aliases = ("Grounding-DINO",)
        Params = ToolParams
        Result = ToolResult

    assert "already taken by tool 'grounding'" in _clash(Detector, [get_tool("grounding")])


def test_a_plugin_module_that_is_not_found_says_where_python_looks():
    """``serve/controller.py --plugin my_pkg.tools`` with my_pkg in the current folder: a script run by path does not
    search that folder (``python -m`` does), which "No module named 'my_pkg'" alone did not tell."""
    from mmedagent.tools import load_plugins

    with pytest.raises(ValueError, match=r"^--plugin nowhere_pkg\.tools: No module named 'nowhere_pkg'; a module in the "
                                         r"current folder needs PYTHONPATH=\."):
        load_plugins(["nowhere_pkg.tools"])
