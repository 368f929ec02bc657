"""The in-process planner: generation matches transformers' generate, streaming, stop strings, KV reuse."""

import pytest
import torch

from _model_fixtures import test_image
from mmedagent.model import load_planner
from mmedagent.model.planner import vision_module
from mmedagent.model.templates import render_prompt

QUESTION = "Can you locate the tumor?"
TOOL_RESULT = "grounding dino output: {'boxes': [[0.41, 0.54, 0.76, 0.75]]}\n\nAnswer my first question: " + QUESTION


def first_messages(arch):
    return [{"role": "user", "content": ("" if arch == "llama" else "<image>\n") + QUESTION}]


@pytest.fixture(scope="session")
def planners(tiny_models):
    made = {}

    def get(arch, kv_reuse=True, template=None):
        key = (arch, kv_reuse, template)
        if key not in made:
            made[key] = load_planner(tiny_models(arch), kv_reuse=kv_reuse, conv_template=template)
        return made[key]

    return get


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl", "mllama", "llama"])
def test_greedy_matches_transformers_generate(planners, arch):
    planner = planners(arch, kv_reuse=False)
    image = None if arch == "llama" else test_image()
    msgs = first_messages(arch)
    prompt = render_prompt(msgs, None, planner.processor)
    if image is None:
        inputs = planner.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    else:
        inputs = planner.processor(images=image, text=prompt, return_tensors="pt", add_special_tokens=False)
    ref = planner.model.generate(**inputs, max_new_tokens=10, do_sample=False)
    expected = planner.tokenizer.decode(ref[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert planner.generate(msgs, image, max_new_tokens=10) == expected.rstrip("\ufffd")


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl", "mllama"])
def test_kv_reuse_gives_same_tokens_and_encodes_image_once(planners, arch):
    image = test_image()
    runs = {}
    for kv_reuse in (False, True):
        planner = planners(arch, kv_reuse=kv_reuse, template="vicuna_v1" if arch == "llava" else None)
        planner.reset()
        calls = []
        hook = vision_module(planner.model).register_forward_hook(lambda *a: calls.append(1))
        try:
            msgs, replies, reused = first_messages(arch), [], []
            for _ in range(3):  # plan → tool result → answer → (follow-up)
                reply = planner.generate(msgs, image, max_new_tokens=12)
                replies.append(reply)
                reused.append(planner.last_stats["reused_tokens"])
                msgs += [{"role": "assistant", "content": reply}, {"role": "user", "content": TOOL_RESULT}]
        finally:
            hook.remove()
        runs[kv_reuse] = replies
        if kv_reuse:
            assert len(calls) == 1
            assert reused[0] == 0 and all(r > 0 for r in reused[1:])
        else:
            assert len(calls) == 3 and reused == [0, 0, 0]
    assert runs[True] == runs[False]


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl", "mllama", "llama"])
def test_prompt_lookup_keeps_the_greedy_tokens(tiny_models, planners, arch):
    image = None if arch == "llama" else test_image()
    plain = planners(arch)
    lookup = load_planner(tiny_models(arch), prompt_lookup=6)
    replies = {}
    for planner in (plain, lookup):
        planner.reset()
        msgs, out, drafted = first_messages(arch), [], 0
        for _ in range(3):
            reply = planner.generate(msgs, image, max_new_tokens=16)
            out.append(reply)
            drafted += planner.last_stats["drafted_tokens"]
            msgs += [{"role": "assistant", "content": reply}, {"role": "user", "content": TOOL_RESULT}]
        replies[planner is lookup] = (out, drafted, list(planner._state.tokens))
    assert replies[True][0] == replies[False][0]
    assert replies[True][1] > 0 and replies[False][1] == 0
    # the cache holds the same prompt and generated tokens (a rejected draft leaves nothing behind)
    assert replies[True][2][: len(replies[False][2])] == replies[False][2]
    lookup.generate(first_messages(arch), image, max_new_tokens=4, temperature=0.7)
    assert lookup.last_stats["drafted_tokens"] == 0  # sampling: no drafts
    with pytest.raises(ValueError, match="prompt_lookup"):
        load_planner(tiny_models(arch), prompt_lookup=-1)


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl", "mllama", "llama"])
def test_the_next_call_reads_the_reply_as_generated(planners, arch):
    """The answer call continues from the generated tokens themselves, even where the reply's text
    would re-encode differently; an edited reply is encoded afresh."""
    image = None if arch == "llama" else test_image()
    planner = planners(arch)
    planner.reset()
    msgs = first_messages(arch)
    reply = planner.generate(msgs, image, max_new_tokens=12)
    history = list(planner._transcripts[-1].history)
    assert len(history) == planner.last_stats["prompt_tokens"] + planner.last_stats["new_tokens"]
    follow = [*msgs, {"role": "assistant", "content": reply}, {"role": "user", "content": TOOL_RESULT}]
    prompt, _ = planner._prepare(list(follow), image)
    encoded = planner._encode(prompt, image)
    continued = planner._continue(prompt, encoded)["input_ids"][0].tolist()
    assert continued[: len(history)] == history
    planner.generate(follow, image, max_new_tokens=4)
    assert planner.last_stats["prompt_tokens"] == len(continued)
    assert planner.last_stats["reused_tokens"] >= len(history) - 1  # the whole reply came from the cache

    edited = [*msgs, {"role": "assistant", "content": reply + " edited"}, {"role": "user", "content": TOOL_RESULT}]
    planner.reset()
    planner.generate(msgs, image, max_new_tokens=12)
    prompt, _ = planner._prepare(list(edited), image)
    encoded = planner._encode(prompt, image)
    assert planner._continue(prompt, encoded) is encoded


def test_another_conversations_call_in_between_does_not_change_an_answer(planners):
    """A model worker serves many chats: conversation A's answer call still reads A's plan as generated
    (the random model's replies do not survive re-encoding) when B's call came between A's two calls."""
    image, planner = test_image(), planners("llava")
    for question in ("Where is the lesion?", "segment the liver", "Is there a tumor?"):
        answers = []
        for interleave in (False, True):
            planner.reset()
            msgs = [{"role": "user", "content": f"<image>\n{question}"}]
            reply = planner.generate(msgs, image, max_new_tokens=16)
            if interleave:
                planner.generate([{"role": "user", "content": "<image>\nsomething else"}], image, max_new_tokens=6)
            follow = [*msgs, {"role": "assistant", "content": reply}, {"role": "user", "content": TOOL_RESULT}]
            answers.append((planner.generate(follow, image, max_new_tokens=8), planner.last_stats["prompt_tokens"]))
        assert answers[0] == answers[1], question


def test_a_reply_that_does_not_round_trip_is_not_re_encoded(planners):
    """A reply whose text re-encodes to other tokens (the random tiny model writes such replies) still
    continues from its generated tokens, on both paths, with the same greedy answer."""
    image, answers = test_image(), []
    for kv_reuse in (False, True):
        planner = planners("llava", kv_reuse=kv_reuse)
        planner.reset()
        msgs = first_messages("llava")
        reply = planner.generate(msgs, image, max_new_tokens=24)
        history = list(planner._transcripts[-1].history)
        generated = history[planner.last_stats["prompt_tokens"]:]
        assert planner.tokenizer(" " + reply, add_special_tokens=False)["input_ids"] != generated
        msgs += [{"role": "assistant", "content": reply}, {"role": "user", "content": TOOL_RESULT}]
        answers.append(planner.generate(msgs, image, max_new_tokens=8))
        assert planner._state.tokens[: len(history)] == history
        # the cache held everything but the last generated token (never forwarded: the budget ended)
        assert planner.last_stats["reused_tokens"] == (len(history) - 1 if kv_reuse else 0)
    assert answers[0] == answers[1]


def test_a_new_image_is_not_served_from_the_cache(planners):
    planner = planners("llava")
    planner.reset()
    msgs = first_messages("llava")
    planner.generate(msgs, test_image(), max_new_tokens=3)
    other = test_image().rotate(90)
    planner.generate(msgs, other, max_new_tokens=3)
    assert planner.last_stats["reused_tokens"] == 0


@pytest.mark.parametrize("arch", ["qwen2_vl", "mllama"])
def test_the_same_pixels_in_another_layout_are_not_served_from_the_cache(planners, arch):
    """Qwen2-VL: four 16x16 blocks side by side or stacked; Mllama: one colour, wide or tall. The pixel
    tensors are equal, but the grid (``image_grid_thw``: the image tokens' positions) or the tiling
    (``aspect_ratio_ids``) differ, so the cached image tokens belong to another image."""
    import numpy as np
    from PIL import Image

    if arch == "qwen2_vl":
        rng = np.random.default_rng(0)
        blocks = [rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in range(4)]
        wide, tall = Image.fromarray(np.concatenate(blocks, 1)), Image.fromarray(np.concatenate(blocks, 0))
    else:
        wide, tall = Image.new("RGB", (64, 32), (120, 60, 200)), Image.new("RGB", (32, 64), (120, 60, 200))
    planner, naive = planners(arch), planners(arch, kv_reuse=False)
    msgs = first_messages(arch)
    prompt = render_prompt(msgs, None, planner.processor)
    a, b = (planner.processor(images=im, text=prompt, return_tensors="pt") for im in (wide, tall))
    assert torch.equal(a["pixel_values"], b["pixel_values"])  # only the layout tells them apart
    planner.reset()
    planner.generate(msgs, wide, max_new_tokens=2)
    reply = planner.generate(msgs, tall, max_new_tokens=6)
    assert planner.last_stats["reused_tokens"] == 0
    assert reply == naive.generate(msgs, tall, max_new_tokens=6)
    planner.generate(msgs, tall, max_new_tokens=2)  # the very same image is still served from the cache
    assert planner.last_stats["reused_tokens"] > 0


def test_stream_and_stop_strings(planners):
    planner = planners("llava", kv_reuse=False)
    msgs, image = first_messages("llava"), test_image()
    full = planner.generate(msgs, image, max_new_tokens=16)
    pieces = list(planner.stream(msgs, image, max_new_tokens=16))
    assert len(pieces) > 1 and "".join(pieces).rstrip() == full
    stop = full[4:7]
    cut = planner.generate(msgs, image, max_new_tokens=16, stop=[stop])
    assert cut == full[: full.index(stop)].rstrip() and stop not in cut


def test_sampling_options_and_bad_input(planners):
    planner = planners("llava")
    msgs, image = first_messages("llava"), test_image()
    torch.manual_seed(0)
    a = planner.generate(msgs, image, max_new_tokens=6, temperature=1.5, top_p=0.9)
    assert isinstance(a, str)
    with pytest.raises(ValueError, match="top_p"):
        planner.generate(msgs, image, top_p=0)
    with pytest.raises(ValueError, match="no image"):
        planner.generate(msgs, None)
    info = planner.info()
    assert info["family"] == "llava" and info["parameters"] > 1000 and info["template"] == "chat_template"


def test_a_prompt_longer_than_the_context_is_refused_and_the_conversation_goes_on(planners):
    planner = planners("llava")
    msgs, image = first_messages("llava"), test_image()
    before = planner.generate(msgs, image, max_new_tokens=4)
    long = [{"role": "user", "content": "<image>\n" + "tumor " * planner.context_length}]
    with pytest.raises(ValueError, match=f"the model's context is {planner.context_length}"):
        planner.generate(long, image, max_new_tokens=4)
    assert planner.generate(msgs, image, max_new_tokens=4) == before
    prompt, context = planner.last_stats["prompt_tokens"], planner.context_length
    planner.eos_ids, eos = set(), planner.eos_ids  # generate to the budget
    try:
        planner.context_length = prompt + 2  # generation stops at the context's end, whatever the budget
        planner.generate(msgs, image, max_new_tokens=10)
        assert planner.last_stats["new_tokens"] == 2
    finally:
        planner.context_length, planner.eos_ids = context, eos


def test_quantized_loading_needs_cuda(tiny_models):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    from mmedagent.model.loading import BackendUnavailable

    with pytest.raises(BackendUnavailable, match="needs a CUDA GPU with bitsandbytes, but this machine has no CUDA GPU"):
        load_planner(tiny_models("llava"), load_in_4bit=True)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("arch", ["llava", "qwen2_vl", "mllama", "llama"])
def test_a_quantized_base_keeps_its_vision_encoder_projector_and_head_unquantized(tiny_models, arch, bits):
    """Decided by transformers' own selection (what bitsandbytes would replace) on the loaded tiny model: the
    vision encoder and projector stay 16-bit, as in LLaVA (a quantized projector cannot be trained under QLoRA nor
    take MMedAgent's projector weights), and only the language model's layers are quantized."""
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    from mmedagent.model import load_model_and_processor
    from mmedagent.model.loading import bnb_config

    model, _, _ = load_model_and_processor(tiny_models(arch))
    config = bnb_config(bits, torch.bfloat16)
    keep = HfQuantizer.get_modules_to_not_convert(model, config.llm_int8_skip_modules, model._keep_in_fp32_modules)
    linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    quantized = {name for name in linears if should_convert_module(name, keep)}
    text = "model.language_model." if arch != "llama" else "model.layers."
    assert quantized and quantized == {name for name in linears if name.startswith(text)}, sorted(set(linears) - quantized)


def test_the_weights_load_straight_onto_the_device(tiny_models):
    """``from_pretrained`` places the weights on the planner's device itself: a GPU server's host RAM need not
    hold the whole model first (an 11B model in bf16: 22 GB) before it moves."""
    from transformers import LlavaForConditionalGeneration

    from mmedagent.model import load_model_and_processor

    seen = []
    load = LlavaForConditionalGeneration.from_pretrained.__func__

    def recording(cls, *args, **kwargs):
        seen.append(kwargs.get("device_map"))
        return load(cls, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LlavaForConditionalGeneration, "from_pretrained", classmethod(recording))
        model, _, _ = load_model_and_processor(tiny_models("llava"), device="cpu")
    assert seen == [{"": "cpu"}] and model.device.type == "cpu"


def test_planner_drives_the_agent_loop(planners):
    from doubles import FakeGrounding
    from mmedagent.agent import Agent, Planner
    from mmedagent.dispatcher import Dispatcher

    planner = planners("qwen2_vl")
    assert isinstance(planner, Planner)
    events = []
    agent = Agent(planner, Dispatcher([FakeGrounding()]), max_steps=2, max_new_tokens=8)
    result = agent.run(QUESTION, test_image(), on_event=lambda kind, data: events.append(kind))
    assert result.steps and result.messages[-1]["role"] == "assistant"
    assert "token" in events and events[-1] == "answer"
    assert result.messages[1]["content"].startswith("<image>\n")
