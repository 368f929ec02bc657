"""Tool authors' mistakes and plug-in clashes: each gets a clear error, and the other tools keep working."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import field_validator

import mmedagent.tools as tools_pkg
from _plugin_fixtures import install
from doubles import grey_image
from mmedagent.dispatcher import Dispatcher
from mmedagent.protocol import ToolCall, parse_tool_results, render_tool_results
from mmedagent.serve.uploads import png_data_url
from mmedagent.serve.tool_worker import build_app
from mmedagent.tools import Overlay, Tool, ToolParams, ToolResult

ROOT = Path(__file__).resolve().parents[1]

ORGAN_VOLUME = '''
import numpy as np
from pydantic import Field

from mmedagent.tools import Box, Overlay, Tool, ToolParams, ToolResult


class OrganVolume(Tool):
    name = "organ_volume"
    aliases = ("volume",)
    description = "Volume (ml) of bright voxels inside a box."

    class Params(ToolParams):
        box: Box = Field(default=[0, 0, 1, 1])
        spacing_mm: float = Field(default=1.0, gt=0)

    class Result(ToolResult):
        box: list[float]
        volume_ml: float

        def overlay(self):
            return Overlay(boxes=[self.box], labels=[f"{self.volume_ml:.1f} ml"])

    def __call__(self, image, params):
        grey = np.asarray(image.convert("L"), dtype=np.float32)
        return self.Result(box=params.box, volume_ml=float((grey > 128).sum() * params.spacing_mm ** 3 / 1000))
'''


def test_aliases_as_a_string_or_a_plain_result_are_refused_where_the_tool_is_defined():
    with pytest.raises(TypeError, match=r"Volume.aliases must be a tuple of non-empty strings.*not 'volume'"):
        class Volume(Tool):  # ("volume") is a string: every letter would have been an alias
            name = "organ_volume"
            aliases = ("volume")

    from pydantic import BaseModel

    with pytest.raises(TypeError, match="Volume.Result must subclass mmedagent.tools.ToolResult"):
        class Volume(Tool):  # noqa: F811
            name = "organ_volume"

            class Result(BaseModel):
                ml: float


CLASHES = '''
from mmedagent.tools import Tool, ToolResult

class MyGrounding(Tool):  # takes a built-in's name
    name = "grounding"
    needs_image = False
    def __call__(self, image, params):
        return ToolResult()

class MySam(Tool):  # takes a built-in's alias, in another case
    name = "my_sam"
    aliases = ("medsam",)
    needs_image = False
    def __call__(self, image, params):
        return ToolResult()
'''


def test_plugins_cannot_take_a_built_in_tools_name_or_alias(plugin_dir, caplog):
    install(plugin_dir, "hosp_tools", {"__init__.py": "", "clash.py": CLASHES, "organ.py": ORGAN_VOLUME},
            "grounding = hosp_tools.clash:MyGrounding\nsam = hosp_tools.clash:MySam\n"
            "volume = hosp_tools.organ:OrganVolume\n")
    with caplog.at_level(logging.WARNING, logger="mmedagent.tools.registry"):
        assert tools_pkg.get_tool("grounding").__module__ == "mmedagent.tools.grounding"
    warned = "\n".join(r.getMessage() for r in caplog.records)
    assert "tool plug-in grounding (hosp_tools.clash:MyGrounding, from hosp_tools 1.0): tool 'grounding' " \
           "(hosp_tools.clash.MyGrounding) answers to 'grounding', already taken by tool 'grounding' " \
           "(mmedagent.tools.grounding.GroundingTool); it is skipped" in warned
    assert "tool plug-in sam (hosp_tools.clash:MySam, from hosp_tools 1.0): tool 'my_sam'" in warned
    assert "'MedSAM'" in warned
    assert tools_pkg.get_tool("MedSAM").__module__ == "mmedagent.tools.segmentation"
    names = [c.name for c in tools_pkg.list_tools()]
    assert "my_sam" not in names and names.count("grounding") == 1
    volume = tools_pkg.get_tool("Volume")  # the plug-in that clashes with nothing is served
    call = ToolCall(API_name="volume", API_params={"spacing_mm": 2})
    out = Dispatcher([volume()]).dispatch(call, grey_image(value=200))
    assert out.ok and out.output == {"box": [0.0, 0.0, 1.0, 1.0], "volume_ml": 24.58}  # 64 x 48 px x 8 mm3

    from hosp_tools.clash import MySam  # --plugin / register(): refused outright, naming both tools

    with pytest.raises(ValueError, match=r"'my_sam' .* answers to 'MedSAM', already taken by tool 'segmentation'"):
        tools_pkg.register(MySam)
    with pytest.raises(ValueError, match="already taken by tool 'grounding'"):
        tools_pkg.load_plugin("hosp_tools.clash")
    assert tools_pkg.register(volume) is volume  # the same class again is no clash


BASES = '''
from mmedagent.tools import Tool, ToolResult
from hosp_tools.organ import OrganVolume


class HospBase(Tool):  # a base for the hospital's tools: name None until a subclass sets it
    name = None
    needs_image = False

    def __call__(self, image, params):
        return ToolResult()


def helper():
    return 1
'''


def test_plugins_that_exit_on_import_or_point_at_no_tool_are_skipped_and_the_others_load(plugin_dir, caplog):
    """A module that parses the command line when imported (SystemExit), a class named None, a function:
    each is skipped with a warning naming the entry point and its package; built-ins and good plug-ins load."""
    install(plugin_dir, "hosp_tools", {"__init__.py": "", "organ.py": ORGAN_VOLUME, "bases.py": BASES,
                                       "cli.py": "import argparse\nargparse.ArgumentParser().parse_args(['--x'])\n"},
            "cli = hosp_tools.cli\nbase = hosp_tools.bases:HospBase\nhelper = hosp_tools.bases:helper\n"
            "bases = hosp_tools.bases\n")
    with caplog.at_level(logging.WARNING, logger="mmedagent.tools.registry"):
        names = [c.name for c in tools_pkg.list_tools()]
    assert "organ_volume" in names and "segmentation" in names and None not in names
    warned = "\n".join(r.getMessage() for r in caplog.records)
    assert "tool plug-in cli (hosp_tools.cli, from hosp_tools 1.0) could not be loaded: SystemExit: 2; it is " \
           "skipped: fix it or uninstall its package" in warned
    assert "tool plug-in base (hosp_tools.bases:HospBase, from hosp_tools 1.0) is a Tool subclass whose name is " \
           "None, not a non-empty string; it is skipped" in warned
    assert "tool plug-in helper (hosp_tools.bases:helper, from hosp_tools 1.0) is a function, not a Tool subclass" \
           in warned

    from hosp_tools.bases import HospBase

    with pytest.raises(ValueError, match="HospBase'> is a Tool subclass whose name is None, not a non-empty string"):
        tools_pkg.register(HospBase)
    assert [c.name for c in tools_pkg.load_plugin("hosp_tools.bases")] == ["organ_volume"]

def test_a_tool_file_sorting_before_the_built_ins_cannot_take_their_names(plugin_dir, monkeypatch, caplog):
    """Built-in tool files are read first, whatever the other files in tools/ are called."""
    extra = plugin_dir / "extra_tools"
    extra.mkdir()
    (extra / "aaa_clash.py").write_text(CLASHES)
    monkeypatch.setattr(tools_pkg, "__path__", [*tools_pkg.__path__, str(extra)])
    with caplog.at_level(logging.WARNING, logger="mmedagent.tools.registry"):
        assert tools_pkg.get_tool("MedSAM").__module__ == "mmedagent.tools.segmentation"
        assert tools_pkg.get_tool("grounding").__module__ == "mmedagent.tools.grounding"
    assert "tools/aaa_clash.py: tool 'my_sam' (mmedagent.tools.aaa_clash.MySam) answers to 'MedSAM', already taken by " \
           "tool 'segmentation'" in caplog.text


def test_a_broken_tool_file_does_not_take_the_other_tools_down(plugin_dir, monkeypatch, caplog):
    """Files dropped into tools/: one that fails to import is reported, the others load."""
    extra = plugin_dir / "extra_tools"
    extra.mkdir()
    (extra / "organ_volume.py").write_text(ORGAN_VOLUME)
    (extra / "dicom_meta.py").write_text("import SimpleITK_not_installed\n")
    monkeypatch.setattr(tools_pkg, "__path__", [*tools_pkg.__path__, str(extra)])
    with caplog.at_level(logging.WARNING, logger="mmedagent.tools.registry"):
        names = [c.name for c in tools_pkg.list_tools()]
    assert "organ_volume" in names and "segmentation" in names
    assert "tool module dicom_meta could not be imported: ModuleNotFoundError: No module named " \
           "'SimpleITK_not_installed'" in caplog.text


class Lower(Tool):
    """Its validator assumes a string: the model may send anything."""

    name = "lower"
    needs_image = False

    class Params(ToolParams):
        organ: str

        @field_validator("organ", mode="before")
        @classmethod
        def lower(cls, v):
            return v.lower()

    class Result(ToolResult):
        organ: str

    def __call__(self, image, params):
        return self.Result(organ=params.organ)


class Views(Tool):
    """Its ``for_model`` / ``overlay`` go wrong on request."""

    name = "views"
    needs_image = False

    class Params(ToolParams):
        fault: str = ""

    class Result(ToolResult):
        fault: str

        def for_model(self):
            return {"key": lambda: {}["missing"], "list": lambda: ["x"]}.get(self.fault, super().for_model)()

        def overlay(self):
            return {"zero": lambda: 1 / 0, "dict": lambda: {"boxes": []}}.get(self.fault, lambda: Overlay())()

    def __call__(self, image, params):
        return self.Result(fault=params.fault)


def test_a_tools_own_bugs_become_error_outcomes_and_the_turn_goes_on():
    d = Dispatcher([Lower(), Views()])
    calls = [ToolCall(API_name="lower", API_params={"organ": o}) for o in (3, "Liver")]
    calls += [ToolCall(API_name="views", API_params={"fault": f}) for f in ("key", "list", "dict", "zero", "")]
    outcomes, results = d.dispatch_all(calls, None)
    assert [o.error for o in outcomes] == [
        "invalid params for lower: AttributeError: 'int' object has no attribute 'lower'",
        None,
        "KeyError: 'missing'",
        "TypeError: Result.for_model() returned list, expected a dict",
        "TypeError: Result.overlay() returned dict, expected Overlay or None",
        "ZeroDivisionError: division by zero",
        None,
    ]
    assert outcomes[1].output == {"organ": "liver"} and results[-1].overlay() == Overlay()


def test_the_tool_worker_answers_a_failing_validator_with_the_reason():
    client = TestClient(build_app(Lower(), 1 << 20), raise_server_exceptions=False)
    r = client.post("/call", json={"params": {"organ": 3}})
    assert r.status_code == 422
    assert r.json()["detail"] == "invalid params for lower: AttributeError: 'int' object has no attribute 'lower'"
    assert client.post("/call", json={"params": {"organ": "Liver"}}).json()["for_model"] == {"organ": "liver"}


@pytest.mark.parametrize(("argv", "message"), [
    (["--tool", "organ_volume"], "error: unknown tool 'organ_volume'; available tools: classification, grounding"),
    (["--tool", "grounding", "--options", "{model: 1}"], "error: --options is not valid JSON: Expecting property name"),
])
def test_the_tool_worker_refuses_a_bad_command_line_in_one_line(argv, message):
    script = ROOT / "serve" / "tool_worker.py"
    out = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


UNSCHEMABLE = '''
import numpy as np
from pydantic import ConfigDict

from mmedagent.tools import Tool, ToolParams, ToolResult


class Kernel(Tool):  # a numpy field: pydantic validates it, but has no JSON schema for it
    name = "kernel_filter"
    needs_image = False

    class Params(ToolParams):
        model_config = ConfigDict(arbitrary_types_allowed=True)
        kernel: np.ndarray | None = None

    def __call__(self, image, params):
        return ToolResult()
'''


def test_a_plugin_without_a_json_schema_is_skipped_and_cannot_break_the_prompt_of_the_others(plugin_dir, caplog):
    """The system prompt and the constrained decoder describe every listed tool: one unschemable plug-in made
    both raise for all tools."""
    from mmedagent.protocol import actions_json_schema, system_prompt

    install(plugin_dir, "hosp_tools", {"__init__.py": "", "kernel.py": UNSCHEMABLE, "organ.py": ORGAN_VOLUME},
            "kernel = hosp_tools.kernel:Kernel\nvolume = hosp_tools.organ:OrganVolume\n")
    with caplog.at_level(logging.WARNING, logger="mmedagent.tools.registry"):
        tools = tools_pkg.list_tools()
    names = [c.name for c in tools]
    assert "kernel_filter" not in names and "organ_volume" in names and "segmentation" in names
    assert "tool plug-in kernel (hosp_tools.kernel:Kernel, from hosp_tools 1.0): tool 'kernel_filter' " \
           "(hosp_tools.kernel.Kernel) cannot describe itself (its schema): its Params field 'kernel' (numpy.ndarray | " \
           "None) has no JSON schema; give it a JSON type (a number, string, list or model of these); it is skipped" \
           in caplog.text
    assert "- organ_volume (also: volume): Volume (ml) of bright voxels inside a box." in system_prompt(tools)
    assert len(actions_json_schema(tools)["items"]["anyOf"]) == len(tools)


def test_params_that_would_ignore_a_misspelt_param_or_want_the_image_are_refused_where_defined():
    from pydantic import BaseModel

    class Loose(BaseModel):
        threshold: float = 0.5

    with pytest.raises(TypeError, match=r"Thresh.Params must subclass mmedagent.tools.ToolParams .*misspelt"):
        class Thresh(Tool):  # {"treshold": 0.9} would have run on 0.5
            name = "thresh"
            Params = Loose

    with pytest.raises(TypeError, match="Crop.Params must not have an 'image' field: the dispatcher drops"):
        class Crop(Tool):  # every call would have failed with "image: Field required"
            name = "crop"

            class Params(ToolParams):
                image: str


REFUSED_AT_DEFINITION = '''
from mmedagent.tools import Tool


class Volume(Tool):
    name = "organ_volume"
    aliases = ("volume")
'''


def test_a_plugin_module_whose_tool_is_refused_where_defined_is_a_one_line_error(plugin_dir):
    """``--plugin``: load_plugin's ImportError (what the controller and the worker report) names the refusal."""
    (plugin_dir / "hosp_refused.py").write_text(REFUSED_AT_DEFINITION)
    with pytest.raises(ImportError, match=r"^hosp_refused could not be imported: TypeError: Volume.aliases must be "
                                          r"a tuple of non-empty strings, e\.g\. \('volume',\), not 'volume'$"):
        tools_pkg.load_plugin("hosp_refused")
    with pytest.raises(ModuleNotFoundError, match="hosp_not_there"):
        tools_pkg.load_plugin("hosp_not_there")
    script = ROOT / "serve" / "tool_worker.py"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_dir), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, str(script), "--tool", "volume", "--plugin", "hosp_refused"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "error: --plugin hosp_refused: hosp_refused could not be imported: TypeError: Volume.aliases" in out.stderr


class Contrast(Tool):
    """A tool whose statistic is undefined on a flat region: NaN, or infinite."""

    name = "contrast"

    class Params(ToolParams):
        noise: float = 0.0

    class Result(ToolResult):
        cnr: float
        ratio: float
        values: list[float]

    def __call__(self, image, params):
        grey = np.asarray(image.convert("L"), dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.Result(cnr=float((grey.mean() - grey.mean()) / params.noise),
                               ratio=float(grey.mean() / params.noise), values=[1 / 3, float("-inf")])


def test_non_finite_numbers_reach_the_model_as_none_in_process_and_from_a_worker():
    """In-process the model read {'cnr': nan}, from a worker {'cnr': None}; and 'nan' in a saved
    tool-result turn did not parse back as a result."""
    image = grey_image(value=90)
    outcome = Dispatcher([Contrast()]).dispatch(ToolCall(API_name="contrast", API_params={}), image)
    expected = {"cnr": None, "ratio": None, "values": [0.33, None]}
    assert outcome.ok and outcome.output == expected
    client = TestClient(build_app(Contrast(), 1 << 20))
    answer = client.post("/call", json={"params": {}, "image": png_data_url(image)}).json()
    assert answer["for_model"] == expected
    text = render_tool_results([outcome], "Is the lesion enhancing?")
    assert "contrast output: {'cnr': None, 'ratio': None, 'values': [0.33, None]}" in text
    assert parse_tool_results(text).outcomes[0].output == expected
