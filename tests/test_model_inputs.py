"""What a user hands the planner and the loader by mistake: malformed messages and options, images the model
cannot see as meant, another family's conversation template, unknown devices and dtype spellings — each a
clear error (the planner keeps working), not a traceback from deep inside torch or a silently wrong reply."""

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from _model_fixtures import test_image
from mmedagent.model import load_planner

QUESTION = [{"role": "user", "content": "Can you locate the tumor?"}]


@pytest.fixture(scope="module")
def llava(tiny_models):
    return load_planner(tiny_models("llava"))


@pytest.mark.parametrize(("messages", "message"), [
    ([], "no messages"),
    ("Where is the tumor?", "messages must be a list"),
    ([{"role": "user"}], "message 0: content must be a string"),
    (["Where is the tumor?"], "message 0: expected a dict"),
])
def test_malformed_messages_are_named(llava, messages, message):
    with pytest.raises(ValueError, match=message):
        llava.generate(messages, max_new_tokens=2)


@pytest.mark.parametrize(("options", "message"), [
    ({"temperature": math.nan}, "temperature must be a finite number"),
    ({"temperature": math.inf}, "temperature must be a finite number"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer"),
    ({"max_new_tokens": "8"}, "max_new_tokens must be an integer"),
    ({"max_new_tokens": 0}, "at least 1"),
    ({"stop": 5}, "stop must be a string or a list of strings"),
    ({"stop": ["ok", None]}, "stop must be a string or a list of strings"),
])
def test_bad_generation_options_are_named(llava, options, message):
    with pytest.raises(ValueError, match=message):
        llava.generate(QUESTION, test_image(), **{"max_new_tokens": 2, **options})


def _truncated_png() -> Image.Image:
    buf = io.BytesIO()
    test_image().save(buf, "PNG")
    return Image.open(io.BytesIO(buf.getvalue()[:60]))


@pytest.mark.parametrize(("image", "error", "message"), [
    (Image.new("RGB", (0, 0)), ValueError, "no pixels"),
    (_truncated_png(), ValueError, "cannot be decoded"),
    (b"\x89PNG...", TypeError, "must be a PIL image, not bytes.*load_image"),
    ("scan.png", TypeError, "must be a PIL image, not str.*load_image"),
])
def test_images_the_model_cannot_see_as_meant_are_refused_and_the_planner_goes_on(llava, image, error, message):
    """A 0x0 image was a ZeroDivisionError, a truncated file an OSError, a path or bytes a processor's own error."""
    before = llava.generate(QUESTION, test_image(), max_new_tokens=4)
    with pytest.raises(error, match=message):
        llava.generate(QUESTION, image, max_new_tokens=2)
    assert llava.generate(QUESTION, test_image(), max_new_tokens=4) == before


def test_a_16_bit_or_float_image_is_seen_as_the_tools_see_it(llava):
    """PIL's RGB conversion clips 16-bit pixels to white and float ones to black; the planner scales them
    as the tools do (``as_pil_rgb``), so planner and tools see one picture."""
    from mmedagent.tools._boxes import as_pil_rgb

    ramp = np.tile(np.linspace(0, 4000, 30, dtype=np.uint16), (30, 1))
    for image in (Image.fromarray(ramp), Image.fromarray(ramp.astype(np.float32) / 4000)):
        seen = as_pil_rgb(image)
        assert len(set(seen.getdata())) > 2  # a ramp, not one clipped colour
        assert llava.generate(QUESTION, image, max_new_tokens=4) == llava.generate(QUESTION, seen, max_new_tokens=4)


@pytest.mark.parametrize("size", [(1, 1), (5000, 10), (10, 5000)])
def test_images_of_odd_sizes_are_answered(llava, size):
    assert isinstance(llava.generate(QUESTION, Image.new("RGB", size, (200, 30, 30)), max_new_tokens=2), str)


@pytest.mark.parametrize(("arch", "template", "missing"), [
    ("llava", "llama3", "<|eot_id|>"),
    ("llava", "qwen2", "<|im_end|>"),
    ("qwen2_vl", "llama3", "<|start_header_id|>"),
    ("llama", "qwen2", "<|im_start|>"),
])
def test_another_familys_template_is_refused_at_load(tiny_models, arch, template, missing):
    """The turns of a template whose markers the tokenizer lacks are plain text to the model: it never ends
    a turn (runs to max_new_tokens) and answers a prompt it was not trained on."""
    with pytest.raises(ValueError, match=f"template '{template}' writes .*{missing[2:-2]}.*another model family"):
        load_planner(tiny_models(arch), conv_template=template)


@pytest.mark.parametrize(("arch", "template"), [("llava", "vicuna_v1"), ("qwen2_vl", "qwen2"), ("mllama", "llama3"),
                                                ("llama", "vicuna_v1")])
def test_templates_that_fit_load(tiny_models, arch, template):
    assert load_planner(tiny_models(arch), conv_template=template).template == template


def test_device_and_dtype_spellings(tiny_models):
    from mmedagent.model.loading import resolve_device, resolve_dtype

    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        load_planner(tiny_models("llama"), device="gpu")
    assert resolve_device("auto") in ("cpu", "cuda") and resolve_device("cpu:0") == "cpu:0"
    assert resolve_dtype("bf16", "cpu") is resolve_dtype("torch.bfloat16", "cpu") is torch.bfloat16
    assert resolve_dtype("fp16", "cpu") is torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'float17'"):
        resolve_dtype("float17", "cpu")


def test_flash_attention_is_chosen_only_where_it_can_run(monkeypatch):
    """With flash-attn installed on a GPU, the default was flash_attention_2 for every model and dtype: Mllama
    (Llama-3.2-Vision), which transformers refuses to load with it, and float32 weights, which flash-attn refuses
    at the first call. (flash-attn cannot be installed here: its presence is what is set.)"""
    import transformers.utils
    from transformers import LlamaForCausalLM, LlavaForConditionalGeneration, MllamaForConditionalGeneration

    from mmedagent.model.loading import resolve_attn

    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    assert resolve_attn(None, "cuda", torch.bfloat16, LlavaForConditionalGeneration) == "flash_attention_2"
    assert resolve_attn(None, "cuda:1", torch.float16, LlamaForCausalLM) == "flash_attention_2"
    assert resolve_attn(None, "cuda", torch.bfloat16, MllamaForConditionalGeneration) == "sdpa"
    assert resolve_attn(None, "cuda", torch.float32, LlavaForConditionalGeneration) == "sdpa"
    assert resolve_attn(None, "cpu", torch.bfloat16, LlavaForConditionalGeneration) == "sdpa"
    assert resolve_attn("eager", "cuda", torch.float32, MllamaForConditionalGeneration) == "eager"


@pytest.mark.parametrize(("arch", "dtype", "error", "message"), [
    ("mllama", "bfloat16", ValueError, "MllamaForConditionalGeneration does not support it; use 'sdpa'"),
    ("llava", "float32", ValueError, "flash_attention_2 runs in float16 or bfloat16, not float32"),
])
def test_flash_attention_that_cannot_run_is_refused_before_the_weights_load(tiny_models, arch, dtype, error, message):
    with pytest.raises(error, match=message):
        load_planner(tiny_models(arch), attn_implementation="flash_attention_2", dtype=dtype)
