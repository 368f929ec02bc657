"""Report generation tool: real tiny checkpoints saved and loaded through the model layer, called
through the dispatcher; section parsing and style selection on known texts."""

import numpy as np
import pytest
import torch
from _model_fixtures import test_image
from _tools_fixtures import scan_16bit, scan_image
from doubles import ScriptedPlanner

from mmedagent.dispatcher import Dispatcher
from mmedagent.model import load_planner
from mmedagent.protocol import ToolCall
from mmedagent.tools import get_tool
from mmedagent.tools._boxes import as_pil_rgb
from mmedagent.tools.report import DEFAULT_MODEL, ReportGeneration, parse_sections

REPORT = """FINDINGS: The lungs are clear. No pleural effusion or pneumothorax.
The cardiomediastinal silhouette is normal.

IMPRESSION: No acute cardiopulmonary process."""


def test_parse_sections_finds_findings_and_impression():
    assert parse_sections(REPORT) == {
        "findings": "The lungs are clear. No pleural effusion or pneumothorax.\nThe cardiomediastinal silhouette is normal.",
        "impression": "No acute cardiopulmonary process.",
    }
    md = "**Findings:** Small left effusion.\n**Conclusion:** Effusion."
    assert parse_sections(md) == {"findings": "Small left effusion.", "impression": "Effusion."}
    assert parse_sections("Heart size is normal.") == {"findings": None, "impression": None}


def test_registered_under_mmedagent_names():
    assert get_tool("ChatCAD-G") is ReportGeneration and get_tool("report") is ReportGeneration
    assert ReportGeneration.needs_image and ReportGeneration.Params.model_validate({}).style == "full"
    assert ReportGeneration().options["model"] == DEFAULT_MODEL


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_tiny_checkpoint_through_dispatcher(tiny_models, arch):
    path = tiny_models(arch)
    template = "vicuna_v1" if arch == "llava" else None
    tool = ReportGeneration(model=str(path), conv_template=template, max_new_tokens=8)
    d = Dispatcher([tool], timeout_s=300)
    image = test_image()
    outcome = d.dispatch(ToolCall(API_name="ChatCAD-G", API_params={"image": "<imagepath>"}), image)
    assert outcome.ok, outcome.error
    assert set(outcome.output) == {"report"}
    # the same model, prompt and image through the model layer directly give the same text
    planner = load_planner(str(path), conv_template=template)
    prompt = tool.prompt(ReportGeneration.Params())
    expected = planner.generate([{"role": "user", "content": f"<image>\n{prompt}"}], image, max_new_tokens=8)
    assert outcome.output["report"] == expected.strip()
    assert tool.weights_note.endswith(str(path))
    # bad params and a missing image come back as errors, the tool stays usable
    bad_style = d.dispatch(ToolCall(API_name="report", API_params={"style": "summary"}), image)
    no_image = d.dispatch(ToolCall(API_name="report", API_params={}), None)
    assert "style" in bad_style.error and "needs an image" in no_image.error
    d.close()


def test_style_selects_the_section_and_modality_reaches_the_prompt():
    tool = ReportGeneration(model="unused")
    tool._planner = ScriptedPlanner([REPORT, REPORT, "Normal brain MRI."])  # post-processing only
    tool._loaded = True
    image = test_image()
    findings = tool.run(image, tool.Params(style="findings", modality="brain  MRI"))
    assert findings.report.startswith("The lungs are clear.") and findings.impression == "No acute cardiopulmonary process."
    sent = tool._planner.calls[0][0]["content"]
    assert sent.startswith("<image>\n") and "brain MRI radiology report" in sent and "finding" in sent
    impression = tool.run(image, tool.Params(style="impression"))
    assert impression.report == "No acute cardiopulmonary process."
    assert "chest X-ray" in tool._planner.calls[1][0]["content"]
    plain = tool.run(image, tool.Params(style="impression"))
    assert plain.report == "Normal brain MRI." and plain.impression is None
    assert plain.for_model() == {"report": "Normal brain MRI."}


def test_missing_local_weights_say_where(tmp_path):
    tool = ReportGeneration(model=str(tmp_path / "no-such-model"))
    d = Dispatcher([tool], timeout_s=30)
    outcome = d.dispatch(ToolCall(API_name="ChatCAD-G", API_params={}), test_image())
    assert not outcome.ok and "report model folder not found" in outcome.error and "no-such-model" in outcome.error
    assert "`hf download" in outcome.error
    d.close()


def test_a_missing_hub_model_says_how_to_get_it_with_a_command_that_exists():
    """The hint was `huggingface-cli download`, which huggingface_hub 1.0 removed (it is `hf download`)."""
    tool = ReportGeneration(model="nobody/no-such-report-model")
    d = Dispatcher([tool], timeout_s=60)
    outcome = d.dispatch(ToolCall(API_name="ChatCAD-G", API_params={}), test_image())
    assert not outcome.ok and "hub id 'nobody/no-such-report-model'" in outcome.error
    assert "`hf download nobody/no-such-report-model --local-dir DIR`" in outcome.error and "huggingface-cli" not in outcome.error
    d.close()


def test_a_16_bit_scan_reaches_the_model_scaled_not_white(tiny_models):
    """A 16-bit PIL scan is min-max scaled to 8 bits before the model sees it (PIL's convert clips it to white);
    a greyscale array is read as an image (the processor refused it, quoting its pixels)."""
    tool = ReportGeneration(model=str(tiny_models("llava")), max_new_tokens=8)
    tool.ensure_loaded()
    scan = scan_16bit(40, 32)
    scaled, white = as_pil_rgb(np.asarray(scan)), scan.convert("RGB")
    prompt = [{"role": "user", "content": f"<image>\n{tool.prompt(ReportGeneration.Params())}"}]
    expected = tool._planner.generate(prompt, scaled, max_new_tokens=8)
    assert expected != tool._planner.generate(prompt, white, max_new_tokens=8)  # the two inputs are told apart
    assert tool.run(scan, ReportGeneration.Params()).report == expected.strip()
    grey = np.asarray(scan_image(40, 32).convert("L"))
    assert tool.run(grey, ReportGeneration.Params()).report == tool._planner.generate(
        prompt, as_pil_rgb(grey), max_new_tokens=8).strip()


def test_model_loading_options_reach_the_model_layer(tiny_models):
    """``dtype`` (and the other load_planner options: 4-bit, vision tower, ...) were silently dropped."""
    tool = ReportGeneration(model=str(tiny_models("llava")), dtype="bfloat16", max_new_tokens=4)
    tool.ensure_loaded()
    assert next(tool._planner.model.parameters()).dtype == torch.bfloat16
    with pytest.raises(TypeError, match=r"unknown options \['load_in_4bits'\]"):
        ReportGeneration(model="unused", load_in_4bits=True)


def test_custom_prompts_are_checked_when_the_tool_is_built():
    """A misspelt slot or style used to fail every call (KeyError: 'Modality') or be silently ignored."""
    with pytest.raises(ValueError, match=r"prompts\['full'\].*KeyError: 'Modality'"):
        ReportGeneration(model="unused", prompts={"full": "Describe the {Modality} image."})
    with pytest.raises(ValueError, match="unknown style 'finding'; styles: findings, impression, full"):
        ReportGeneration(model="unused", prompts={"finding": "List the {modality} findings."})
    tool = ReportGeneration(model="unused", prompts={"findings": "List the {modality} findings as {{json}}."})
    assert tool.prompt(tool.Params(style="findings", modality="brain MRI")) == "List the brain MRI findings as {json}."


def test_a_blank_modality_falls_back_to_chest_x_ray():
    tool = ReportGeneration(model="unused")
    assert tool.prompt(tool.Params(modality="  ")) == tool.prompt(tool.Params())
    assert "chest X-ray radiology report" in tool.prompt(tool.Params(modality=" \n"))


def test_a_modality_longer_than_a_few_words_is_a_param_error(tiny_models):
    """A planner that pastes the question (or loops) into `modality` gets a params error naming it,
    not a report model's context overflow that blames the conversation's history."""
    tool = ReportGeneration(model=str(tiny_models("llava")))
    d = Dispatcher([tool], timeout_s=120)
    outcome = d.dispatch(ToolCall(API_name="ChatCAD-G", API_params={"modality": "chest CT " * 600}), test_image())
    assert not outcome.ok and "modality" in outcome.error and "at most 100 characters" in outcome.error
    assert d.dispatch(ToolCall(API_name="ChatCAD-G", API_params={"modality": "contrast-enhanced CT of the abdomen"}),
                      test_image()).ok
    d.close()
