"""Conversation templates: OpenAI-style messages → exact prompt text, split into trained/untrained parts.

A template is chosen explicitly — ``"vicuna_v1"`` (MMedAgent / LLaVA-Med v1), ``"llama3"``,
``"qwen2"`` — or ``None`` for the processor's (or tokenizer's) own chat template. It is never
guessed from the model path.

:func:`render_segments` is the one contract shared by training and inference: the concatenation of
the segment strings is the exact prompt text (tokenize it with ``add_special_tokens=False``: the
text already holds the BOS token where the template wants one), and ``True`` marks the text the
model learns — assistant content plus its end-of-turn text. System and user contents are text: a special
token written in one (``</s>`` or ``<|im_end|>`` in a retrieved passage, a report, a question) is broken
with a word joiner, so it reads as characters and cannot end a turn or forge one (in assistant turns, only
the tokens that end a turn: :func:`_defused`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from mmedagent.protocol import DEFAULT_SYSTEM, IMAGE_TOKEN, without_image_token

Segments = list[tuple[str, bool]]
Message = dict[str, Any]


def tokenizer_of(processor_or_tokenizer: Any) -> Any:
    return getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)


def has_vision(processor_or_tokenizer: Any) -> bool:
    """True for a multimodal processor, False for a bare tokenizer (text-only model)."""
    return getattr(processor_or_tokenizer, "image_processor", None) is not None


def image_placeholder(processor_or_tokenizer: Any) -> str:
    """The text that stands for one image in this architecture's prompts ("" for text-only models)."""
    if not has_vision(processor_or_tokenizer):
        return ""
    token = getattr(processor_or_tokenizer, "image_token", None)
    if token is None:
        raise ValueError(f"{type(processor_or_tokenizer).__name__} has no image_token; cannot place the image")
    if type(processor_or_tokenizer).__name__.startswith("Qwen"):
        # Qwen2-VL / Qwen2.5-VL wrap the (expanded) image pad tokens in vision start/end markers.
        return f"<|vision_start|>{token}<|vision_end|>"
    return token


def _map_image(content: str, placeholder: str) -> str:
    if not placeholder:  # text-only model: drop the marker and its line break
        return without_image_token(content)
    return content.replace(IMAGE_TOKEN, placeholder)


JOINER = "\u2060"  # a zero-width word joiner: what breaks a special token written in a message


TURN_ENDS = frozenset({"</s>", "<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>", "<|end|>"})
"""Special tokens that end a turn or the text, broken in assistant turns too (a report quoted in an answer)."""


def _defused(messages: Sequence[Message], tok: Any) -> list[Message]:
    """``messages`` with every special token of the tokenizer (``</s>``, ``<|im_end|>``, ``<|image|>``…)
    written in a system or user message (questions, tool outputs) broken after its first character, and in
    assistant turns those that end a turn (:data:`TURN_ENDS`, the EOS): a target that quotes a report must not
    teach the model to stop there. Kept: the protocol's ``<image>`` marker, added tokens that are not special
    (a vocabulary of coordinates, say), and other special tokens of assistant turns (Qwen2-VL's
    ``<|box_start|>``, written on purpose)."""
    special = {t.content for t in tok.added_tokens_decoder.values() if t.special and len(t.content) > 1}
    ends = special & (TURN_ENDS | {tok.eos_token})

    def defuse(text: str, tokens: set[str]) -> str:
        for t in sorted(tokens, key=len, reverse=True):
            if t in text:
                text = text.replace(t, t[0] + JOINER + t[1:])
        return text

    return [dict(m, content=IMAGE_TOKEN.join(defuse(piece, ends if m["role"] == "assistant" else special)
                                             for piece in m["content"].split(IMAGE_TOKEN)))
            for m in messages]


def check_messages(messages: Sequence[Message]) -> None:
    """A ``ValueError`` naming the first thing wrong with ``messages`` (a list of ``{role, content}`` dicts)."""
    if isinstance(messages, (str, bytes, dict)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} dicts, not {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"message {i}: expected a dict with role system/user/assistant, got {m!r:.80}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {i}: content must be a string")


# --------------------------------------------------------------------------- explicit templates


def _vicuna_v1(messages: Sequence[Message], tok: Any, placeholder: str, gen: bool) -> Segments:
    """LLaVA v1 / Vicuna: ``<s>{system} USER: {u} ASSISTANT: {a}</s>USER: ...``."""
    eos = tok.eos_token or "</s>"
    segs: Segments = [(tok.bos_token or "", False)]
    rest = list(messages)
    system = DEFAULT_SYSTEM
    if rest and rest[0]["role"] == "system":
        system = rest.pop(0)["content"]
    segs.append((system + " ", False))
    for m in rest:
        if m["role"] == "user":
            segs.append(("USER: " + _map_image(m["content"], placeholder) + " ", False))
        elif m["role"] == "assistant":
            segs += [("ASSISTANT:", False), (" " + m["content"] + eos, True)]
        else:
            raise ValueError("vicuna_v1 supports a system message only at the start")
    if gen:
        segs.append(("ASSISTANT:", False))
    return segs


def _llama3(messages: Sequence[Message], tok: Any, placeholder: str, gen: bool) -> Segments:
    segs: Segments = [(tok.bos_token or "<|begin_of_text|>", False)]
    for m in messages:
        head = f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
        if m["role"] == "assistant":
            segs += [(head, False), (m["content"] + "<|eot_id|>", True)]
        else:
            segs.append((head + _map_image(m["content"], placeholder) + "<|eot_id|>", False))
    if gen:
        segs.append(("<|start_header_id|>assistant<|end_header_id|>\n\n", False))
    return segs


def _qwen2(messages: Sequence[Message], tok: Any, placeholder: str, gen: bool) -> Segments:
    segs: Segments = []
    if not messages or messages[0]["role"] != "system":
        segs.append(("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n", False))
    for m in messages:
        if m["role"] == "assistant":
            segs += [("<|im_start|>assistant\n", False), (m["content"] + "<|im_end|>", True), ("\n", False)]
        else:
            segs.append((f"<|im_start|>{m['role']}\n" + _map_image(m["content"], placeholder) + "<|im_end|>\n", False))
    if gen:
        segs.append(("<|im_start|>assistant\n", False))
    return segs


TEMPLATES: dict[str, Callable[[Sequence[Message], Any, str, bool], Segments]] = {
    "vicuna_v1": _vicuna_v1,
    "llama3": _llama3,
    "qwen2": _qwen2,
}


# --------------------------------------------------------------------------- processor chat templates


def _to_chat_messages(messages: Sequence[Message], processor_or_tokenizer: Any) -> list[dict[str, Any]]:
    """Our string messages → what ``apply_chat_template`` expects (content parts for processors)."""
    if not has_vision(processor_or_tokenizer):
        return [{"role": m["role"], "content": _map_image(m["content"], "")} for m in messages]
    out = []
    for m in messages:
        text = m["content"].replace(IMAGE_TOKEN + "\n", IMAGE_TOKEN)
        pieces = text.split(IMAGE_TOKEN)
        parts: list[dict[str, str]] = []
        for k, piece in enumerate(pieces):
            if k:
                parts.append({"type": "image"})
            if piece:
                parts.append({"type": "text", "text": piece})
        out.append({"role": m["role"], "content": parts})
    return out


def _chat_template_segments(messages: Sequence[Message], proc: Any, gen: bool) -> Segments:
    if not getattr(proc, "chat_template", None):
        raise ValueError(
            f"{type(proc).__name__} has no chat template; pass an explicit template ({', '.join(TEMPLATES)})"
        )
    chat = _to_chat_messages(messages, proc)

    def render(n: int, add_gen: bool) -> str:
        return proc.apply_chat_template(chat[:n], tokenize=False, add_generation_prompt=add_gen)

    def tail(text: str, prefix: str, what: str) -> str:
        if not text.startswith(prefix):
            raise ValueError(f"the chat template does not render incrementally ({what}); use an explicit template")
        return text[len(prefix):]

    segs: Segments = []
    prev = ""
    for i, m in enumerate(chat):
        full = render(i + 1, False)
        if m["role"] == "assistant":
            head = render(i, True) if i else ""
            segs += [(tail(head, prev, "generation prompt"), False), (tail(full, head, "assistant turn"), True)]
        else:
            segs.append((tail(full, prev, f"{m['role']} turn"), False))
        prev = full
    if gen:
        segs.append((tail(render(len(chat), True), prev, "generation prompt"), False))
    return segs


# --------------------------------------------------------------------------- public API


def render_segments(
    messages: Sequence[Message],
    template: str | None,
    processor_or_tokenizer: Any,
    add_generation_prompt: bool = False,
) -> Segments:
    """Render ``messages`` with ``template`` (a name in :data:`TEMPLATES`, or None for the chat template).

    Returns ``[(text, trained)]``; ``"".join(text)`` is the exact prompt. ``"<image>"`` in a user
    message becomes the architecture's image placeholder (and is dropped for text-only models).
    """
    check_messages(messages)
    messages = _defused(messages, tokenizer_of(processor_or_tokenizer))
    if template is None:
        segs = _chat_template_segments(messages, processor_or_tokenizer, add_generation_prompt)
    else:
        if template not in TEMPLATES:
            raise ValueError(f"unknown conversation template {template!r}; choose one of {', '.join(TEMPLATES)} or None")
        placeholder = image_placeholder(processor_or_tokenizer)
        segs = TEMPLATES[template](messages, tokenizer_of(processor_or_tokenizer), placeholder, add_generation_prompt)
    return [(text, trained) for text, trained in segs if text]


def check_template(template: str | None, processor_or_tokenizer: Any) -> None:
    """A ``ValueError`` when the explicit ``template`` writes ``<|…|>`` markers that are not tokens of this
    tokenizer: another model family's template, whose turns the model would read as plain text and never end."""
    if template is None:
        return
    probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    text = render_prompt(probe, template, processor_or_tokenizer, add_generation_prompt=True)
    vocab = tokenizer_of(processor_or_tokenizer).get_vocab()
    foreign = sorted({m for m in re.findall(r"<\|[^|<>\s]+\|>", text) if m not in vocab})
    if foreign:
        raise ValueError(f"conversation template {template!r} writes {', '.join(foreign)}, which this model's "
                         f"tokenizer does not have: it is another model family's template; choose one that fits "
                         f"({', '.join(TEMPLATES)}), or None for the checkpoint's own chat template")


def render_prompt(messages: Sequence[Message], template: str | None, processor_or_tokenizer: Any, add_generation_prompt: bool = True) -> str:
    """The prompt text only (``"".join`` of :func:`render_segments`)."""
    return "".join(t for t, _ in render_segments(messages, template, processor_or_tokenizer, add_generation_prompt))
