"""A tool author's slips that used to fail silently, or only at call time: refused where the tool is
defined or discovered, or made to behave the same in-process and from a tool worker."""

import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel, FilePath

import mmedagent.tools as tools_pkg
from _plugin_fixtures import install
from doubles import grey_image
from mmedagent.dispatcher import Dispatcher
from mmedagent.protocol import ToolCall, system_prompt
from mmedagent.serve.tool_worker import build_app
from mmedagent.serve.uploads import png_data_url
from mmedagent.tools import Overlay, Tool, ToolParams, ToolResult


def test_params_typed_as_paths_are_refused_where_defined():
    """Validating a FilePath stats the model's path on the server: "/root/.ssh/id_rsa" came back as "Path does
    not point to a file" where "/etc/shadow" passed, telling the model which files exist."""
    with pytest.raises(TypeError, match=r"StructuredReport.Params field 'report' is a file path: the model writes the params, and a path it names "
                                         r"must not be looked up on the server; take the data as __call__'s image"):
        class StructuredReport(Tool):
            name = "dicom_sr"

            class Params(ToolParams):
                report: FilePath

    class Series(BaseModel):
        slices: list[Path] | None = None

    with pytest.raises(TypeError, match="Volume.Params field 'series' is a file path"):
        class Volume(Tool):  # a path nested in a list of a sub-model
            name = "lesion_volume"

            class Params(ToolParams):
                spacing_mm: float = 1.0
                series: list[Series] = []


def test_a_question_param_or_hidden_field_that_is_no_field_is_refused_where_defined():
    """A misspelt question_param dropped the user's question; a misspelt hidden_from_model (or a string,
    hiding its letters) showed the model the masks it should not see."""
    with pytest.raises(TypeError, match=r"SR.question_param 'question' is not a field of its Params; its fields: query$"):
        class SR(Tool):
            name = "dicom_sr"
            question_param = "question"

            class Params(ToolParams):
                query: str = ""

    with pytest.raises(TypeError, match=r"Masks.hidden_from_model names 'mask', which is not a field; its fields: area, masks"):
        class Masks(ToolResult):
            hidden_from_model = frozenset({"mask"})
            area: int
            masks: list[str]

    with pytest.raises(TypeError, match=r"Letters.hidden_from_model must be a set of field names, e.g. .*not 'masks'"):
        class Letters(ToolResult):
            hidden_from_model = "masks"
            masks: list[str]


class Lesion(Tool):
    """Keeps its mask as an array (an ``Any`` field, hidden) and reports numpy values."""

    name = "lesion_mask"

    class Result(ToolResult):
        hidden_from_model: ClassVar[frozenset[str]] = frozenset({"mask"})
        area: Any
        intensities: Any
        mask: Any

        def overlay(self):
            return Overlay(boxes=[[0, 0, 1, 1]], labels=[f"{int(self.area)} px"])

    def __call__(self, image, params):
        mask = np.asarray(image.convert("L")) > 100
        return self.Result(area=np.int64(mask.sum()), intensities=np.array([1 / 3, np.nan], np.float32),
                           mask=mask[:2, :3])


def test_numpy_values_in_a_result_reach_the_model_alike_in_process_and_from_a_worker():
    """In-process the model read them; the worker answered 500 (PydanticSerializationError) for every call."""
    image = grey_image(value=200)
    outcome = Dispatcher([Lesion()]).dispatch(ToolCall(API_name="lesion_mask", API_params={}), image)
    expected = {"area": 3072, "intensities": [0.33, None]}
    assert outcome.ok and outcome.output == expected, outcome.error
    answer = TestClient(build_app(Lesion(), 1 << 20)).post("/call", json={"params": {}, "image": png_data_url(image)})
    assert answer.status_code == 200, answer.text
    assert answer.json()["for_model"] == expected and answer.json()["result"]["mask"] == [[True] * 3] * 2


class Everything(Tool):
    """Returns every pixel to the model."""

    name = "pixel_dump"

    class Result(ToolResult):
        pixels: list[int]

    def __call__(self, image, params):
        return self.Result(pixels=np.asarray(image.convert("L")).ravel().tolist() * 40)


def test_a_result_too_big_for_a_prompt_is_the_calls_error_in_process_and_from_a_worker():
    """It went into the planner's prompt whole (here 122,880 numbers, over 600,000 characters)."""
    image = grey_image(value=200)
    outcome = Dispatcher([Everything()]).dispatch(ToolCall(API_name="pixel_dump", API_params={}), image)
    message = ("pixel_dump returned 614,412 characters for the model, more than the 100,000 a prompt "
               "can take; return a summary, and list bulky fields in Result.hidden_from_model")
    assert not outcome.ok and outcome.error == f"ValueError: {message}"
    answer = TestClient(build_app(Everything(), 1 << 20), raise_server_exceptions=False).post(
        "/call", json={"params": {}, "image": png_data_url(image)})
    assert answer.status_code == 500 and answer.json()["detail"] == f"pixel_dump failed: ValueError: {message}"


UNCALLABLE = '''
from pydantic import BaseModel

from mmedagent.tools import Tool, ToolParams, ToolResult


class Node(BaseModel):
    label: str
    children: list["Node"] = []


class Ontology(Tool):  # recursive params: the prompt could not be written, for any tool
    name = "ontology"
    needs_image = False

    class Params(ToolParams):
        root: Node

    def __call__(self, image, params):
        return ToolResult()


class Forgot(Tool):  # no __call__: every call failed with "NotImplementedError: "
    name = "forgot"


class Awaits(Tool):  # async: every call failed with "returned coroutine"
    name = "awaits"

    async def __call__(self, image, params):
        return ToolResult()


class NoImage(Tool):  # every call failed with "takes 2 positional arguments but 3 were given"
    name = "no_image"
    needs_image = False

    def __call__(self, params):
        return ToolResult()


class Fine(Tool):
    name = "fine"
    needs_image = False

    def __call__(self, image, params):
        return ToolResult()
'''


def test_plugins_that_could_never_answer_a_call_are_skipped_and_the_others_load(plugin_dir, caplog):
    install(plugin_dir, "hosp_authoring", {"__init__.py": "", "tools.py": UNCALLABLE}, "tools = hosp_authoring.tools\n")
    with caplog.at_level(logging.WARNING, logger="mmedagent.tools.registry"):
        tools = tools_pkg.list_tools()
    names = [c.name for c in tools]
    assert "fine" in names and "segmentation" in names
    assert not {"ontology", "forgot", "awaits", "no_image"} & set(names)
    source = "tool plug-in tools (hosp_authoring.tools, from hosp_authoring 1.0)"
    for message in [
        "tool 'ontology' (hosp_authoring.tools.Ontology) cannot describe itself (its schema): TypeError: ontology: "
        "Params model Node refers to itself; tool parameters cannot be recursive; it is skipped",
        "tool 'forgot' (hosp_authoring.tools.Forgot) defines no __call__(self, image, params); it is skipped",
        "tool 'awaits' (hosp_authoring.tools.Awaits) has an async __call__; define it with plain def",
        "tool 'no_image' (hosp_authoring.tools.NoImage) has __call__(self, params), which must take (self, image, "
        "params) (image is None for a tool that needs none); it is skipped",
    ]:
        assert f"{source}: {message}" in caplog.text
    assert "- fine: " in system_prompt(tools)

    from hosp_authoring.tools import Forgot

    with pytest.raises(ValueError, match=r"^tool 'forgot' defines no __call__\(self, image, params\)$"):
        tools_pkg.register(Forgot)


class OwnInit(Tool):
    """Takes its options as named arguments and forgets ``super().__init__()``."""

    name = "own_init"
    needs_image = False

    class Result(ToolResult):
        weights: str

    def __init__(self, weights: str = "sr-model.pth"):
        self.weights = weights

    def load(self):
        self.ready = True

    def __call__(self, image, params):
        return self.Result(weights=self.weights if self.ready else "")


def test_a_tool_whose_init_skips_super_loads_and_serves():
    """preload() and dispatch() raised AttributeError: 'OwnInit' object has no attribute '_loaded' (the
    dispatcher is never to raise), and the tool worker would not start."""
    d = Dispatcher([OwnInit(weights="sr.pth")])
    assert d.preload() == {}
    outcome = d.dispatch(ToolCall(API_name="own_init", API_params={}), None)
    assert outcome.ok and outcome.output == {"weights": "sr.pth"}
