"""The planner's generation path: end of turn, stop strings, interrupted and unfinished streams, the
messages the agent loop composes, and KV reuse against the naive path in awkward conversations."""

import threading

import pytest

from _model_fixtures import test_image
from doubles import FakeGrounding, ScriptedPlanner
from mmedagent.model import load_planner

QUESTION = "Can you locate the tumor?"
PLAN = ('"thoughts🤔" locate it.\n"actions🚀" [{"API_name": "grounding dino", "API_params": '
        '{"image": "<image>", "prompts": ["tumor"]}}]\n"value👉" Please wait.')
ANSWER = '"thoughts🤔" done.\n"actions🚀" []\n"value👉" It is at the top left.'


@pytest.fixture(scope="session")
def planner_of(tiny_models):
    made = {}

    def get(arch, kv_reuse=True):
        if (arch, kv_reuse) not in made:
            made[arch, kv_reuse] = load_planner(tiny_models(arch), kv_reuse=kv_reuse)
        return made[arch, kv_reuse]

    return get


@pytest.mark.parametrize(("arch", "template", "base_eos", "end_of_turn"), [
    ("qwen2_vl", None, "<|endoftext|>", "<|im_end|>"),  # Qwen2-VL base: its chat template ends turns otherwise
    ("llama", "llama3", "<|finetune_right_pad_id|>", "<|eot_id|>"),
])
def test_a_turn_ends_at_the_templates_end_of_turn_token(tiny_models, arch, template, base_eos, end_of_turn):
    """A base checkpoint's EOS is not the end-of-turn token its (fine-tuning) template writes; the
    reply still ends there instead of running on into a turn of its own."""
    from mmedagent.model.loading import load_model_and_processor
    from mmedagent.model.planner import HFPlanner

    model, processor, family = load_model_and_processor(tiny_models(arch))
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.eos_token = base_eos
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(base_eos)
    planner = HFPlanner(model, processor, family, template=template)
    end = tokenizer.convert_tokens_to_ids(end_of_turn)
    assert end in planner.eos_ids

    def writes_end_of_turn(module, args, out):
        out.logits[..., end] += 1e4
        return out

    hook = model.register_forward_hook(writes_end_of_turn)
    try:
        image = None if arch == "llama" else test_image()
        msgs = [{"role": "user", "content": ("<image>\n" if image else "") + QUESTION}]
        assert planner.generate(msgs, image, max_new_tokens=5) == ""
        assert planner.last_stats["new_tokens"] == 0
    finally:
        hook.remove()


def test_an_empty_stop_string_stops_nothing(planner_of):
    planner, image = planner_of("llava"), test_image()
    msgs = [{"role": "user", "content": "<image>\n" + QUESTION}]
    full = planner.generate(msgs, image, max_new_tokens=8)
    assert full and planner.generate(msgs, image, max_new_tokens=8, stop="") == full


def test_the_planner_reports_why_a_reply_ended(planner_of):
    """``last_stats["finish"]``: "length" when the budget ran out, "stop" at a stop string (even on the
    budget's last token), which the model worker turns into OpenAI's finish_reason."""
    planner, image = planner_of("llava"), test_image()
    msgs = [{"role": "user", "content": "<image>\n" + QUESTION}]
    full = planner.generate(msgs, image, max_new_tokens=8)
    assert planner.last_stats["finish"] == "length" and planner.last_stats["new_tokens"] == 8
    ids = planner.tokenizer(full, add_special_tokens=False)["input_ids"]
    stop = full.strip()[-2:]
    planner.generate(msgs, image, max_new_tokens=8, stop=stop)
    assert planner.last_stats["finish"] == "stop", (full, stop, ids)


def test_a_tiny_temperature_samples_the_greedy_reply(planner_of):
    planner, image = planner_of("llava"), test_image()
    msgs = [{"role": "user", "content": "<image>\n" + QUESTION}]
    greedy = planner.generate(msgs, image, max_new_tokens=6)
    assert planner.generate(msgs, image, max_new_tokens=6, temperature=1e-45) == greedy  # was a NaN error


def test_a_call_from_the_thread_holding_an_unfinished_stream_is_refused_not_hung(tiny_models):
    """``it = planner.stream(...)``, read part of it, then call again in the same thread: waiting for
    the planner's lock would wait for ever; the call is refused and the planner works once ``it`` is closed."""
    planner, image = load_planner(tiny_models("llava")), test_image()
    msgs = [{"role": "user", "content": "<image>\n" + QUESTION}]
    outcome = {}

    def run():
        full = planner.generate(msgs, image, max_new_tokens=6)
        it = planner.stream(msgs, image, max_new_tokens=6)
        next(it)
        try:
            planner.generate(msgs, image, max_new_tokens=6)
        except RuntimeError as e:
            outcome["error"] = str(e)
        it.close()
        outcome["after"] = planner.generate(msgs, image, max_new_tokens=6) == full

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "the second call waited for ever"
    assert "unfinished stream" in outcome["error"] and outcome["after"]


def test_a_reset_from_another_thread_waits_for_the_stream_under_way(tiny_models):
    """A server thread resetting the planner while a chat streams in another: the reset waits for the
    stream to end (it emptied the cache under it: prompt lookup then failed, the reply was not remembered)."""
    planner, image = load_planner(tiny_models("llava"), prompt_lookup=3), test_image()
    msgs = [{"role": "user", "content": "<image>\n" + QUESTION}]
    full = planner.generate(msgs, image, max_new_tokens=12)
    planner.reset()
    it = planner.stream(msgs, image, max_new_tokens=12)
    pieces = [next(it)]
    resetting = threading.Thread(target=planner.reset, daemon=True)
    resetting.start()
    resetting.join(0.5)
    assert resetting.is_alive(), "the reset ran during the stream"
    pieces.extend(it)
    assert "".join(pieces).rstrip() == full
    resetting.join(60)
    assert not resetting.is_alive() and planner._state is None


def test_an_interrupt_during_the_prefill_leaves_no_stale_cache(planner_of):
    """Ctrl-C while another question's prompt is prefilled on top of the cut-back cache: the next call
    of the first conversation does not continue from a cache that no longer holds its tokens."""
    image, answers = test_image(), []
    first = [{"role": "user", "content": "<image>\n" + QUESTION}]
    for kv_reuse in (False, True):
        planner = planner_of("llava", kv_reuse)
        planner.reset()
        reply = planner.generate(first, image, max_new_tokens=8)
        if kv_reuse:
            def interrupt(module, args):
                raise KeyboardInterrupt

            hook = planner.model.model.language_model.layers[1].register_forward_pre_hook(interrupt)
            try:
                with pytest.raises(KeyboardInterrupt):
                    planner.generate([{"role": "user", "content": "<image>\nsegment the liver"}], image,
                                     max_new_tokens=8)
            finally:
                hook.remove()
            assert not planner._lock.locked()
        follow = [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "grounding error: x"}]
        answers.append(planner.generate(follow, image, max_new_tokens=8))
    assert answers[0] == answers[1]


def test_the_answer_call_reads_a_plan_ending_in_whitespace_as_generated_in_either_form(planner_of):
    """A reply that ends in whitespace ``str.rstrip`` removes (here a vertical tab) continues from its
    generated tokens whether the next prompt holds it as ``generate`` returned it or as streamed."""
    planner, image = planner_of("qwen2_vl"), test_image()
    msgs = [{"role": "user", "content": "<image>\nsegment the liver"}]
    answers = []
    for streamed in (False, True):
        planner.reset()
        reply = "".join(planner.stream(msgs, image, max_new_tokens=10))
        assert reply != reply.rstrip()  # the case in point
        history = planner._transcripts[-1].history
        follow = [*msgs, {"role": "assistant", "content": reply if streamed else reply.rstrip()},
                  {"role": "user", "content": "grounding output: {}\n\nAnswer my first question: segment the liver"}]
        answers.append(planner.generate(follow, image, max_new_tokens=12))
        assert planner.last_stats["reused_tokens"] == len(history) - 1  # all but the unforwarded last token
    assert answers[0] == answers[1]


def test_image_markers_in_the_question_the_plan_or_a_tool_result_do_not_break_the_run(planner_of):
    """The image belongs to the first user message only: a question typed as "<image>\\n…" (quoted
    again after every tool result) or a plan writing "<image>" gives the planner no second image."""
    from mmedagent.agent import Agent
    from mmedagent.dispatcher import Dispatcher

    planner, image = planner_of("llava"), test_image()
    scripted = ScriptedPlanner([PLAN, ANSWER])
    result = Agent(scripted, Dispatcher([FakeGrounding()])).run("<image>\n" + QUESTION, image)
    assert result.stopped == "answer" and result.tool_calls == ["grounding dino"]
    sent = scripted.calls[1]
    assert [m["content"].count("<image>") for m in sent] == [0, 1, 0, 0]
    assert isinstance(planner.generate(sent, image, max_new_tokens=4), str)  # the model reads them


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl", "mllama", "llama"])
def test_kv_reuse_matches_the_naive_path_with_stops_and_markers_in_tool_results(planner_of, arch):
    """Three rounds, a stop string that ends inside a token, tool results holding that stop string and
    the template's special tokens: the reused cache gives the naive path's tokens, and no reply holds the stop."""
    image = None if arch == "llama" else test_image()
    naive = planner_of(arch, False)
    naive.reset()
    first = [{"role": "user", "content": ("<image>\n" if image else "") + QUESTION}]
    stop = naive.generate(first, image, max_new_tokens=14)[3:5]
    specials = " ".join(t for t in naive.tokenizer.all_special_tokens
                        if not any(w in t for w in ("image", "video", "vision", "pad")))
    tool = (f"grounding dino output: {{'boxes': []}} {stop} {specials} USER: ASSISTANT:\n\n"
            f"Answer my first question: {QUESTION}")
    replies = {}
    for kv_reuse in (False, True):
        planner, msgs, out = planner_of(arch, kv_reuse), list(first), []
        planner.reset()
        for _ in range(3):
            reply = planner.generate(msgs, image, max_new_tokens=14, stop=[stop])
            assert stop not in reply
            out.append((reply, planner.last_stats["prompt_tokens"], planner.last_stats["new_tokens"]))
            msgs += [{"role": "assistant", "content": reply}, {"role": "user", "content": tool}]
        replies[kv_reuse] = out
        assert (planner.last_stats["reused_tokens"] > 0) == kv_reuse
    assert replies[True] == replies[False]


def test_the_demo_planner_answers_a_question_typed_with_its_image_marker_on_both_paths():
    """The shipped demo planner, constrained, through the agent loop: "<image>\\n" typed before the
    question (LLaVA's convention) is quoted in the tool-result turn; the answer call still gets one
    image, and KV reuse gives the naive path's turns with the vision tower run once per run."""
    from mmedagent import demo
    from mmedagent.agent import Agent
    from mmedagent.dispatcher import Dispatcher
    from mmedagent.model.planner import vision_module

    planner = load_planner(str(demo.PACKAGED), constrain=True)
    agent = Agent(planner, Dispatcher([FakeGrounding()]), max_steps=3, system="", max_new_tokens=96)  # as trained
    runs, encoded = {}, []
    hook = vision_module(planner.model).register_forward_hook(lambda *a: encoded.append(1))
    try:
        for kv_reuse in (False, True):
            planner.kv_reuse, encoded[:] = kv_reuse, []
            planner.reset()
            result = agent.run("<image>\nWhere is the tumor?", test_image())
            runs[kv_reuse] = [s.raw for s in result.steps]
            assert result.stopped == "answer" and result.tool_calls == ["grounding"]
            assert len(encoded) == (1 if kv_reuse else len(result.steps))
    finally:
        hook.remove()
    assert runs[True] == runs[False]


def test_scores_that_overflow_the_dtype_are_an_error_not_an_empty_or_repeated_reply(tiny_models):
    """A checkpoint trained in bfloat16 and served in float16 can overflow (Qwen2-VL's "!!!!" replies): the scores
    become NaN, greedy decoding picked token 0 at every step (here an empty reply after the whole budget) and
    sampling failed in torch. Set up as a real overflow: a float16 model whose first MLP's output exceeds 65504."""
    import torch

    planner = load_planner(tiny_models("llama"), dtype="float16", device="cpu")
    msgs = [{"role": "user", "content": QUESTION}]
    with torch.no_grad():
        mlp = planner.model.model.layers[0].mlp
        mlp.up_proj.weight.fill_(50.0)
        mlp.down_proj.weight.fill_(6e4)
    for temperature in (0.0, 0.7):
        with pytest.raises(RuntimeError, match="NaN or infinite in float16: .* load it with dtype bfloat16"):
            planner.generate(msgs, max_new_tokens=8, temperature=temperature)
        assert not planner._lock.locked() and planner._state is None


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl", "mllama"])
def test_a_new_prefill_does_not_hold_the_previous_calls_cache(planner_of, arch):
    """When a call cannot continue the cached one (another image or conversation), the old cache is released
    before the new prompt is prefilled: a GPU does not hold two prompts' caches at once."""
    import weakref

    planner = planner_of(arch)
    planner.reset()
    planner.generate([{"role": "user", "content": "<image>\n" + QUESTION}], test_image(), max_new_tokens=4)
    old = weakref.ref(planner._state.cache)
    alive = []
    hook = planner.model.register_forward_pre_hook(lambda *a: alive.append(old() is not None))
    try:
        planner.generate([{"role": "user", "content": "<image>\nsegment the liver"}], test_image(48),
                         max_new_tokens=4)
    finally:
        hook.remove()
    assert alive and not any(alive)


def test_a_reply_cut_at_a_stop_string_is_read_back_as_generated(planner_of):
    """A reply ended by a stop string (an OpenAI client's ``stop``) is returned cut before it; when the cut falls
    between tokens, the next call reads the tokens the model wrote up to there (and the cache holds them),
    not a re-encoding of the cut text, on both paths alike."""
    image, question = test_image(), [{"role": "user", "content": "<image>\n" + QUESTION}]
    tool = {"role": "user", "content": "grounding dino output: {'boxes': []}"}
    naive = planner_of("llava", False)
    naive.reset()
    full = naive.generate(question, image, max_new_tokens=24)
    prompt_len = naive.last_stats["prompt_tokens"]
    prompt_ids, generated = naive._transcripts[-1].history[:prompt_len], naive._transcripts[-1].history[prompt_len:]
    decode = lambda ids: naive.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    encode = lambda text: naive.tokenizer(" " + text, add_special_tokens=False)["input_ids"]  # noqa: E731
    # a stop string that starts between two tokens, after a part of the reply that does not re-encode as written
    kept, stop = next((k, decode(generated[: k + 2])[len(decode(generated[:k])):]) for k in range(len(generated) - 2, 0, -1)
                      if full.find(decode(generated[k: k + 2])) == len(decode(generated[:k]))
                      and encode(decode(generated[:k]).strip()) != generated[:k])
    answers = []
    for kv_reuse in (False, True):
        planner = planner_of("llava", kv_reuse)
        planner.reset()
        reply = planner.generate(question, image, max_new_tokens=24, stop=[stop])
        assert planner.last_stats["finish"] == "stop" and reply == decode(generated[:kept]).strip()
        answers.append(planner.generate([*question, {"role": "assistant", "content": reply}, tool], image,
                                        max_new_tokens=6))
        assert planner._state.tokens[: prompt_len + kept] == [*prompt_ids, *generated[:kept]]
        assert planner.last_stats["reused_tokens"] == (prompt_len + kept if kv_reuse else 0)
    assert answers[0] == answers[1]


def test_a_chat_reads_its_own_plan_when_another_image_size_gave_the_same_plan_text(planner_of):
    """Qwen2-VL gives an image as many tokens as its size asks: two chats asking the same question about images of
    two sizes, whose plans read alike (a trained planner writes the same grounding call for both), each continue
    from their own prompt and generated tokens, whichever was remembered first."""
    planner = planner_of("qwen2_vl")
    planner.reset()
    vocab = planner.tokenizer.get_vocab()
    # a word written as two tokens that would re-encode as one
    pair = next([vocab[w[:1]], vocab[w[1:]]] for w, _ in sorted(vocab.items(), key=lambda item: item[1])
                if len(w) > 2 and w.isalpha() and w[:1] in vocab and w[1:] in vocab)
    forced, step = [*pair, *pair, min(planner.eos_ids)], [0]

    def writes_the_same_plan(module, args, out):
        out.logits[..., forced[min(step[0], len(forced) - 1)]] += 1e4
        step[0] += 1
        return out

    question = [{"role": "user", "content": "<image>\nsegment the liver"}]
    images, chats = (test_image(40), test_image(64)), []
    hook = planner.model.register_forward_hook(writes_the_same_plan)
    try:
        for image in images:
            step[0] = 0
            reply = planner.generate(question, image, max_new_tokens=8)
            chats.append((image, reply, list(planner._transcripts[-1].history)))
    finally:
        hook.remove()
    assert chats[0][1] == chats[1][1] and len(chats[0][2]) != len(chats[1][2])  # the case in point
    follow = [{"role": "assistant", "content": chats[0][1]}, {"role": "user", "content": "segmentation output: {}"}]
    (first_image, _, first_history), (last_image, _, last_history) = chats
    planner.generate([*question, *follow], last_image, max_new_tokens=2)  # the latest chat: its plan is cached
    assert planner.last_stats["reused_tokens"] == len(last_history)
    prompt, _ = planner._prepare([*question, *follow], first_image)
    continued = planner._continue(prompt, planner._encode(prompt, first_image))["input_ids"][0].tolist()
    assert continued[: len(first_history)] == first_history
