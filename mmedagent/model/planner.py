"""The in-process planner: a transformers model behind the agent's ``generate`` / ``stream`` interface.

Aggregation without re-encoding: the planner keeps the KV cache (a ``DynamicCache``) of the
previous call's prompt and generated tokens. When the next call's tokens extend that prefix (the
usual case: plan → tool result → answer in one conversation), the cache is cut back to the longest
common token prefix and only the new tokens are prefilled: the vision tower does not run again and
the image tokens are not re-encoded. ``kv_reuse=False`` prefills everything on every call (the
naive path, kept for comparison). Both paths run the same decode loop, so greedy outputs agree.

Token-faithful continuation (both paths): when a prompt is an earlier call's prompt plus its reply as
generated plus new turns, its ids are that call's ids and the generated tokens themselves, then the
new text; the model reads exactly what it wrote (a reply need not survive a decode/re-encode round
trip) and, when that call was the previous one, the cache covers the whole reply. The last
:data:`TRANSCRIPTS` calls are remembered, so other conversations' calls in between (a model worker
serving many chats) change no answer; they only cost the cache.

Prompt-lookup decoding (``prompt_lookup=N``, greedy only): an answer that quotes its context (boxes
and labels from a tool result, terms from the question) is drafted from the latest earlier
occurrence of its last few tokens, up to N tokens at a time, and the drafts are checked in one forward
pass; only those the model would have chosen itself are kept, so the output is the greedy output.
"""

from __future__ import annotations

import logging
import math
import operator
import threading
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmedagent.model.loading import VISION_MODULES
from mmedagent.model.templates import (
    check_messages, check_template, has_vision, render_prompt, render_segments, tokenizer_of,
)
from mmedagent.protocol import IMAGE_TOKEN

log = logging.getLogger(__name__)


def without_adapter_wrapper(model: Any) -> Any:
    """The transformers model inside a peft wrapper (an adapter loaded unmerged), else ``model``."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def vision_module(model: Any) -> Any | None:
    """The vision encoder of a loaded model (through peft wrappers), or None for text-only models."""
    inner = without_adapter_wrapper(model)
    for owner in (getattr(inner, "model", None), inner):
        for attr in VISION_MODULES:
            module = getattr(owner, attr, None) if owner is not None else None
            if module is not None:
                return module
    return None


_TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids", "cross_attention_mask")


def _image_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """The processor outputs that describe the image (pixels and, per family, its grid, tiles or size)."""
    return {k: v for k, v in inputs.items() if k not in _TEXT_INPUTS}


def _same_image(a: dict[str, Any], b: dict[str, Any]) -> bool:
    import torch

    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def _common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading ids ``a`` and ``b`` share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _rgb(image: Any) -> Any:
    """A PIL image as RGB, as the tools see it (16-bit / float pixels min-max scaled, not clipped to white or
    black: ``as_pil_rgb``); an array goes to the processor as it is. A clear error for an image with no pixels
    or undecodable data."""
    from PIL import Image

    from mmedagent.tools._boxes import as_pil_rgb

    if not isinstance(image, Image.Image):
        if hasattr(image, "shape"):
            return image
        raise TypeError(f"image must be a PIL image, not {type(image).__name__}: read files with "
                        "mmedagent.imaging.load_image(path).image")
    if 0 in image.size:
        raise ValueError(f"the image has no pixels ({image.width}x{image.height})")
    try:
        image.load()  # a lazily opened file is decoded here
        return as_pil_rgb(image)
    except (OSError, SyntaxError, ValueError) as e:  # a lazily decoded file that is truncated or corrupt
        raise ValueError(f"the image cannot be decoded (truncated or corrupt): {e}") from None


@dataclass
class _KVState:
    """What the cache holds: exactly ``tokens`` (prompt + generated, all forwarded) for ``image``."""

    cache: Any
    tokens: list[int]
    image: dict[str, Any]  # :func:`_image_inputs` ({} without one): reuse needs the very same image and layout


@dataclass
class _Transcript:
    """One finished call: its prompt, its reply as decoded, and the ids of both as the model saw them."""

    text: str
    reply: str
    history: list[int]


CONSTRAINTS = 8
"""Tool sets whose constrained-decoding grammars a planner keeps (a set changes as tool workers come and go)."""

TRANSCRIPTS = 64
"""Finished calls remembered for :meth:`HFPlanner._continue`, across conversations: a conversation's
answer call reads its plan as generated even when other conversations' calls came in between."""


class HFPlanner:
    """A loaded model + processor + conversation template, usable as the agent's planner."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        family: str,
        *,
        template: str | None = None,
        name: str = "model",
        adapter: str | None = None,
        kv_reuse: bool = True,
        system: str | None = None,
        prompt_lookup: int = 0,
        constrain: bool = False,
    ):
        if prompt_lookup < 0:
            raise ValueError("prompt_lookup must be >= 0 (0: off)")
        self.model, self.processor, self.family = model, processor, family
        if prompt_lookup and constrain:
            log.warning("prompt lookup is off: constrained decoding picks every token under the turn format")
            prompt_lookup = 0
        self.prompt_lookup = prompt_lookup
        self.constrain = constrain
        self.tools: list[Any] | None = None  # what a constrained turn may call (None: every registered tool)
        self._constraints: OrderedDict[tuple, Any] = OrderedDict()  # per set of tools offered, the last CONSTRAINTS
        self.tokenizer = tokenizer_of(processor)
        check_template(template, processor)
        self.template, self.name, self.adapter = template, name, adapter
        self.kv_reuse, self.system = kv_reuse, system
        self._state: _KVState | None = None
        self._transcripts: deque[_Transcript] = deque(maxlen=TRANSCRIPTS)
        self._lock = threading.Lock()
        self._holder: int | None = None  # the thread that started the stream holding the lock
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None:
            eos.append(self.tokenizer.eos_token_id)
        self.eos_ids = set(eos) | self._end_of_turn()
        if not self.eos_ids:
            raise ValueError("the model has no end-of-sequence token (generation_config or tokenizer)")
        self.context_length: int | None = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        self.last_stats: dict[str, Any] = {}

    def _end_of_turn(self) -> set[int]:
        """The special token that ends an assistant turn in the conversation template, which a base
        checkpoint's EOS need not be (Qwen2-VL: ``<|endoftext|>``, its template's turns end with ``<|im_end|>``)."""
        probe = "mmedagent"
        try:
            segments = render_segments([{"role": "user", "content": "x"}, {"role": "assistant", "content": probe}],
                                       self.template, self.processor)
        except Exception:  # a template that does not render this probe: a call will report it
            return set()
        text = next((t for t, trained in segments if trained and probe in t), "")
        ids = self.tokenizer(text[text.rfind(probe) + len(probe):].lstrip(), add_special_tokens=False)["input_ids"]
        special = {i for i, t in self.tokenizer.added_tokens_decoder.items() if t.special}
        return {ids[0]} if ids and ids[0] in special else set()

    # ------------------------------------------------------------------ construction

    @classmethod
    def load(
        cls,
        path_or_id: str | Path,
        *,
        conv_template: str | None = None,
        adapter: str | Path | None = None,
        device: str | None = None,
        dtype: Any = None,
        load_in_4bit: bool = False,
        load_in_8bit: bool = False,
        kv_reuse: bool = True,
        system: str | None = None,
        attn_implementation: str | None = None,
        prompt_lookup: int = 0,
        vision_tower: str | Path | None = None,
        constrain: bool = False,
    ) -> HFPlanner:
        """Load a planner from a checkpoint, an original LLaVA-layout checkpoint or a LoRA adapter dir.

        ``adapter``: a peft adapter directory stacked on ``path_or_id`` (or pass the adapter dir as
        ``path_or_id`` to stack it on its recorded base). ``conv_template``: a name in
        :data:`mmedagent.model.templates.TEMPLATES` (``vicuna_v1`` for MMedAgent / LLaVA-Med v1) or
        None: the template recorded by training (``mmedagent_train.json``), else the processor's chat template.
        ``prompt_lookup``: draft tokens per step for greedy prompt-lookup decoding (0: off).
        ``vision_tower``: the CLIP tower of an original LLaVA checkpoint, instead of its ``mm_vision_tower``.
        ``constrain``: decode every turn under the turn format and the registered tools' schemas
        (:mod:`mmedagent.model.constrain`), so each call parses and names a known tool.
        """
        from mmedagent.model.adapters import recorded_template
        from mmedagent.model.loading import load_model_and_processor
        from mmedagent.model.templates import TEMPLATES

        if conv_template is None:
            conv_template = recorded_template(adapter if adapter is not None else path_or_id)
        if conv_template is not None and conv_template not in TEMPLATES:
            raise ValueError(f"unknown conversation template {conv_template!r}; choose one of {', '.join(TEMPLATES)}")
        if adapter is not None:
            model, processor, family = load_model_and_processor(
                adapter, base=path_or_id, dtype=dtype, device=device, load_in_4bit=load_in_4bit,
                load_in_8bit=load_in_8bit, attn_implementation=attn_implementation, vision_tower=vision_tower,
            )
        else:
            model, processor, family = load_model_and_processor(
                path_or_id, dtype=dtype, device=device, load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit,
                attn_implementation=attn_implementation, vision_tower=vision_tower,
            )
            if hasattr(model, "peft_config"):
                adapter = path_or_id
        return cls(
            model, processor, family, template=conv_template, name=Path(str(path_or_id)).name or str(path_or_id),
            adapter=str(adapter) if adapter is not None else None, kv_reuse=kv_reuse, system=system,
            prompt_lookup=prompt_lookup, constrain=constrain,
        )

    def _chat_template_name(self) -> str:
        """``vicuna_v1`` for the Vicuna template a converted LLaVA checkpoint carries (the prompt is the same as with
        ``conv_template="vicuna_v1"``, and reports comparing the two runs should say so), else ``chat_template``."""
        from mmedagent.model.llava_convert import VICUNA_V1_CHAT_TEMPLATE

        return "vicuna_v1" if getattr(self.processor, "chat_template", None) == VICUNA_V1_CHAT_TEMPLATE else "chat_template"

    def info(self) -> dict[str, Any]:
        """Name, family, size, template and adapter, for UI banners and logs."""
        return {
            "name": self.name,
            "family": self.family,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "template": self.template or self._chat_template_name(),
            "adapter": self.adapter,
            "kv_reuse": self.kv_reuse,
            "prompt_lookup": self.prompt_lookup,
            "constrain": self.constrain,
            "device": str(self.model.device),
            "dtype": str(self.model.dtype).replace("torch.", ""),
        }

    def reset(self) -> None:
        """Forget the cached conversation state (after a stream under way in another thread ends)."""
        self._check_not_streaming()
        with self._lock:
            self._state = None
            self._transcripts.clear()

    def _check_not_streaming(self) -> None:
        if self._holder == threading.get_ident():  # waiting for the lock would wait for ever
            raise RuntimeError("this thread holds an unfinished stream of the planner: read it to the end or "
                               "close() it before the next call")

    # ------------------------------------------------------------------ public generation API

    def generate(self, messages: Sequence[dict[str, str]], image: Any | None = None, **gen: Any) -> str:
        return "".join(self.stream(messages, image, **gen)).rstrip()

    def stream(
        self,
        messages: Sequence[dict[str, str]],
        image: Any | None = None,
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] | str | None = None,
    ) -> Iterator[str]:
        """Yield the reply in text pieces as tokens are decoded; ends at EOS, a stop string or the budget."""
        check_messages(messages)
        if not messages:
            raise ValueError("no messages: give at least one user message")
        try:
            max_new_tokens, temperature, top_p = operator.index(max_new_tokens), float(temperature), float(top_p)
        except (TypeError, ValueError):
            raise ValueError("max_new_tokens must be an integer, temperature and top_p numbers") from None
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if not (0 <= temperature < math.inf and 0 < top_p <= 1):  # NaN fails both
            raise ValueError("temperature must be a finite number >= 0 and top_p in (0, 1]")
        stops = [stop] if isinstance(stop, str) else stop or []
        if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
            raise ValueError("stop must be a string or a list of strings")
        stops = [s for s in stops if s]  # "" stops nothing
        self._check_not_streaming()
        with self._lock:
            self._holder = threading.get_ident()
            try:
                yield from self._stream(list(messages), image, max_new_tokens, temperature, top_p, stops)
            finally:
                self._holder = None

    # ------------------------------------------------------------------ internals

    def _prepare(self, messages: list[dict[str, str]], image: Any | None) -> tuple[str, Any | None]:
        if self.system is not None and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": self.system}, *messages]
        has_marker = any(IMAGE_TOKEN in m["content"] for m in messages if m["role"] == "user")
        if not has_vision(self.processor):
            image = None  # text-only model: the marker is dropped by the template
        elif image is not None and not has_marker:
            first = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
            if first is None:
                raise ValueError("an image needs a user message to attach to")
            messages[first] = {"role": "user", "content": f"{IMAGE_TOKEN}\n{messages[first]['content']}"}
        elif image is None and has_marker:
            raise ValueError(f"a message holds {IMAGE_TOKEN} but no image was given")
        return render_prompt(messages, self.template, self.processor, add_generation_prompt=True), image

    def _encode(self, prompt: str, image: Any | None) -> dict[str, Any]:
        if image is None:
            return dict(self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False))
        return dict(self.processor(images=_rgb(image), text=prompt, return_tensors="pt", add_special_tokens=False))

    def _continued_ids(self, turn: _Transcript, prompt: str) -> list[int] | None:
        """``turn``'s prompt and reply ids followed by the rest of ``prompt``, when ``prompt`` is that
        prompt, the reply as returned (as the stream returns it: leading whitespace and an unfinished UTF-8
        sequence at its end trimmed; or as ``generate`` does, trailing whitespace trimmed too), then new
        turns from a special token on (where tokenizing apart is exact); else None."""
        if not prompt.startswith(turn.text):
            return None
        rest = prompt[len(turn.text):].lstrip()
        streamed = turn.reply.lstrip().rstrip("\ufffd")
        for reply in (streamed, streamed.rstrip()):
            after = rest[len(reply):]
            if rest.startswith(reply) and any(after.startswith(t) for t in self.tokenizer.all_special_tokens):
                return turn.history + self.tokenizer(after, add_special_tokens=False)["input_ids"]
        return None

    def _continue(self, prompt: str, inputs: dict[str, Any]) -> dict[str, Any]:
        """``inputs`` with an earlier call's prompt ids and generated tokens in place of their re-encoding,
        when ``prompt`` continues that call (the longest such prompt of any conversation remembered, the latest
        first; see :meth:`_continued_ids`), so a reply is read back exactly as the model wrote it. A call whose
        image tokens differ from this prompt's (another image size, as Qwen2-VL encodes it) is passed over."""
        import torch

        ids = inputs["input_ids"][0].tolist()
        turns = sorted((t for t in reversed(self._transcripts) if prompt.startswith(t.text)),
                       key=lambda t: len(t.text), reverse=True)
        new = next((n for t in turns if (n := self._continued_ids(t, prompt)) is not None
                    and self._same_image_tokens(ids, n)), None)
        if new is None or new == ids:
            return inputs
        k = _common_prefix(ids, new)
        tail, device = len(new) - k, inputs["input_ids"].device
        out = dict(inputs, input_ids=torch.tensor([new], device=device))
        if "attention_mask" in out:
            out["attention_mask"] = torch.ones(1, len(new), dtype=inputs["attention_mask"].dtype, device=device)
        if "mm_token_type_ids" in out:  # Qwen2-VL: text after the image
            mm = out["mm_token_type_ids"]
            out["mm_token_type_ids"] = torch.cat([mm[:, :k], mm.new_zeros(1, tail)], dim=1)
        if "cross_attention_mask" in out:  # Mllama: text after the image sees it like the last prompt token
            mask = out["cross_attention_mask"]
            out["cross_attention_mask"] = torch.cat([mask[:, :k], mask[:, -1:].expand(-1, tail, -1, -1)], dim=1)
        return out

    def _same_image_tokens(self, a: list[int], b: list[int]) -> bool:
        """Whether ids ``a`` and ``b`` agree up to their last image token (Qwen2-VL gives another image size
        another count)."""
        image_id = self._image_token_id()
        k = _common_prefix(a, b)
        return image_id is None or (image_id not in a[k:] and image_id not in b[k:])

    def _reusable_prefix(self, ids: list[int], image: dict[str, Any]) -> int:
        """How many leading tokens of ``ids`` the cached state already holds (0 = prefill everything);
        ``image``: the call's :func:`_image_inputs` (the same pixels in another grid or tiling are another image)."""
        state = self._state
        if not self.kv_reuse or state is None or not _same_image(image, state.image):
            return 0
        n = 0
        for a, b in zip(ids, state.tokens):
            if a != b:
                break
            n += 1
        n = min(n, len(ids) - 1)  # at least one token must be run to get next-token logits
        image_id = self._image_token_id()
        if image_id is not None and image_id in ids[n:]:
            return 0  # image tokens not (all) in the cache: their features must be computed
        return n

    def _spelling(self, tokens: list[int], text: str) -> int | None:
        """How many leading ``tokens`` decode to exactly ``text``; None when ``text`` ends inside a token."""
        n = len(tokens)
        while len(decoded := self.tokenizer.decode(tokens[:n], skip_special_tokens=True)) > len(text):
            n -= 1  # ends at n = 0 at the latest: ""
        return n if decoded == text else None

    def _image_token_id(self) -> int | None:
        cfg = self.model.config
        for key in ("image_token_id", "image_token_index"):
            value = getattr(cfg, key, None)
            if isinstance(value, int):
                return value
        return None

    def _self_attention_layers(self, cache: Any) -> list[Any] | None:
        """The cache layers that grow with the text (Mllama's cross-attention layers hold the image);
        None if any of them cannot be cut back."""
        from transformers.cache_utils import DynamicLayer

        cross = set(getattr(self.model.config.get_text_config(), "cross_attention_layers", None) or [])
        layers = [layer for idx, layer in enumerate(cache.layers) if idx not in cross]
        return layers if all(type(layer) is DynamicLayer for layer in layers) else None

    def _crop(self, cache: Any, keep: int) -> bool:
        """Cut the self-attention layers of ``cache`` to ``keep`` tokens; False if the cache cannot be cut."""
        layers = self._self_attention_layers(cache)
        if layers is None:
            return False
        for layer in layers:
            extra = layer.get_seq_length() - keep
            if extra > 0:
                layer.crop(-extra)
        return True

    def _forward(self, ids: Any, cache: Any, start: int, inputs: dict[str, Any] | None, extras: dict[str, Any],
                 keep: int = 1) -> Any:
        """Run ``ids`` (positions ``start``…) through the model on top of ``cache``; return the last
        logits (``keep`` > 1: the last ``keep`` positions' logits, shape (keep, vocab))."""
        import torch

        n = ids.shape[1]
        kwargs: dict[str, Any] = {
            "input_ids": ids,
            "past_key_values": cache,
            "use_cache": True,
            "attention_mask": torch.ones(1, start + n, dtype=torch.long, device=ids.device),
            "cache_position": torch.arange(start, start + n, device=ids.device),
            "logits_to_keep": keep,
        }
        if inputs is not None:  # a full prefill: vision inputs go in
            kwargs.update({k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")})
        if "positions" in extras:  # Qwen2-VL multimodal RoPE
            kwargs["position_ids"] = self._qwen_positions(start, n, extras)
        if "cross_rows" in extras:  # Mllama: which text tokens see the image
            kwargs["cross_attention_mask"] = extras["cross_rows"](start, n)
        out = self.model(**kwargs)
        logits = out.logits[:, -1, :] if keep == 1 else out.logits[0, -keep:, :]
        if not torch.isfinite(logits).all():  # greedy would pick token 0 at every step (Qwen2-VL: "!!!!")
            dtype = str(self.model.dtype).replace("torch.", "")
            raise RuntimeError(f"the model's next-token scores are NaN or infinite in {dtype}: its activations "
                               "overflow this dtype (float16 with a checkpoint trained in bfloat16) or its weights "
                               "are broken; load it with dtype bfloat16, or float32")
        return logits

    def _qwen_positions(self, start: int, n: int, extras: dict[str, Any]) -> Any:
        import torch

        full = extras["positions"]  # (3, 1, prompt_len) for the whole prompt
        if start + n <= full.shape[-1]:
            return full[:, :, start : start + n]
        steps = torch.arange(start, start + n, device=full.device).view(1, 1, -1).expand(3, 1, -1)
        return steps + extras["rope_delta"]

    def _family_extras(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Per-prompt tensors needed to run a slice of the prompt on top of a cache."""
        import torch

        extras: dict[str, Any] = {}
        if self.family == "qwen2_vl":
            ids = inputs["input_ids"]
            if "image_grid_thw" in inputs:
                positions, delta = without_adapter_wrapper(self.model).model.get_rope_index(
                    ids, mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
                    attention_mask=inputs.get("attention_mask"),
                )
            else:
                positions = torch.arange(ids.shape[1], device=ids.device).view(1, 1, -1).expand(3, 1, -1)
                delta = torch.zeros(1, 1, dtype=torch.long, device=ids.device)
            extras.update(positions=positions, rope_delta=delta.view(1, -1, 1))
        elif self.family == "mllama" and "cross_attention_mask" in inputs:
            mask = inputs["cross_attention_mask"]

            def rows(start: int, n: int, mask=mask) -> Any:
                full = mask.shape[1]
                if start + n <= full:
                    return mask[:, start : start + n]
                # generated tokens see the image like the last prompt token (as in transformers' generate)
                last = mask[:, -1:]
                head = mask[:, start:full]
                return torch.cat([head, last.expand(-1, start + n - max(start, full), -1, -1)], dim=1)

            extras["cross_rows"] = rows
        return extras

    def _draft(self, tokens: list[int], limit: int) -> list[int]:
        """Up to ``limit`` tokens that followed the latest earlier occurrence of the last 3, 2 or 1 tokens."""
        end = len(tokens) - 1
        hits = [i for i in range(end - 1, -1, -1) if tokens[i] == tokens[end]]  # latest first
        image_id = self._image_token_id()
        for n in (3, 2, 1):
            match = next((i for i in hits if i >= n - 1 and tokens[i - n + 1 : i + 1] == tokens[end - n + 1 :]), None)
            if match is None:
                continue
            draft = tokens[match + 1 : match + 1 + limit]
            if image_id in draft:
                draft = draft[: draft.index(image_id)]
            return draft
        return []

    def _turn_rule(self) -> Any:
        """The grammar state for a new turn (None when decoding is unconstrained), under :attr:`tools`."""
        if not self.constrain:
            return None
        from mmedagent.model.constrain import TurnConstraint
        from mmedagent.tools.registry import list_tools

        tools = list_tools() if self.tools is None else list(self.tools)
        key = tuple(tools)  # the classes themselves (held here, so never mistaken for later ones)
        if key not in self._constraints:  # built once per set: it reads the whole vocabulary
            self._constraints[key] = TurnConstraint(self.tokenizer, tools, self.eos_ids)
            while len(self._constraints) > CONSTRAINTS:
                self._constraints.popitem(last=False)
        self._constraints.move_to_end(key)
        return self._constraints[key].start()

    def _pick(self, logits: Any, temperature: float, top_p: float, rule: Any = None) -> int:
        import torch

        if rule is not None:
            if temperature == 0 and rule.allows(int(logits.argmax(-1))):
                return int(logits.argmax(-1))
            allowed = rule.allowed()
            if not allowed:
                raise RuntimeError("constrained decoding reached a state with no allowed token")
            mask = torch.full_like(logits, float("-inf"))
            mask[..., allowed] = 0.0
            logits = logits + mask
        if temperature == 0:
            return int(logits.argmax(-1))
        logits = logits.float()
        probs = torch.softmax((logits - logits.max()) / temperature, dim=-1).squeeze(0)  # no inf/inf at tiny temperatures
        if top_p < 1:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs / probs.sum(), 1))

    def _stream(
        self, messages: list[dict[str, str]], image: Any, max_new_tokens: int, temperature: float, top_p: float,
        stops: list[str],
    ) -> Iterator[str]:
        import time

        import torch
        from transformers import DynamicCache

        prompt, image = self._prepare(messages, image)
        inputs = {k: v.to(self.model.device) if hasattr(v, "to") else v for k, v in self._encode(prompt, image).items()}
        inputs = self._continue(prompt, inputs)
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        ids = inputs["input_ids"]
        id_list = ids[0].tolist()
        if self.context_length:
            if len(id_list) >= self.context_length:
                raise ValueError(f"the prompt is {len(id_list)} tokens; the model's context is {self.context_length}: "
                                 "start a new conversation, or send less history")
            max_new_tokens = min(max_new_tokens, self.context_length - len(id_list))  # no position past the context
        image_inputs = _image_inputs(inputs)
        t0 = time.perf_counter()
        generated: list[int] = []
        reuse, prefill_s, cut, drafted, accepted_total = 0, 0.0, -1, 0, 0
        finish = "length"  # "eos": the model ended its turn; "stop": a stop string; "length": the budget or context ran out
        try:
            with torch.inference_mode():
                extras = self._family_extras(inputs)
                reuse = self._reusable_prefix(id_list, image_inputs)
                if reuse and self._crop(self._state.cache, reuse):
                    cache = self._state.cache
                    logits = self._forward(ids[:, reuse:], cache, reuse, None, extras)
                else:
                    reuse = 0
                    self._state = None  # the old cache is freed before the new one fills: not two at once
                    cache = DynamicCache(config=self.model.config)
                    logits = self._forward(ids, cache, 0, inputs, extras)
                self._state = _KVState(cache=cache, tokens=list(id_list), image=image_inputs)
                prefill_s = time.perf_counter() - t0
                hold = max((len(s) for s in stops), default=1) - 1
                emitted, started, text = 0, False, ""
                cuttable = self._self_attention_layers(cache) is not None
                rule = self._turn_rule()
                lookup = self.prompt_lookup if temperature == 0 and cuttable and rule is None else 0
                verified: list[int] = []  # accepted drafts: already in the cache, known to be the greedy choice
                for step in range(max_new_tokens):
                    cached = bool(verified)  # an accepted draft: forwarded already, ``logits`` follow the last one
                    token = verified.pop(0) if cached else self._pick(logits, temperature, top_p, rule)
                    if token in self.eos_ids:
                        finish = "eos"
                        break
                    if rule is not None:
                        rule.push(token)
                    generated.append(token)
                    text = self.tokenizer.decode(generated, skip_special_tokens=True)
                    cut = min((text.find(s) for s in stops if s in text), default=-1)
                    final = cut >= 0 or step == max_new_tokens - 1
                    if cut >= 0:
                        text, finish = text[:cut], "stop"
                    safe = len(text) if final else len(text) - hold
                    while safe > emitted and text[safe - 1] == "\ufffd":  # an incomplete UTF-8 sequence
                        safe -= 1
                    if safe > emitted:
                        piece = text[emitted:safe] if started else text[emitted:safe].lstrip()
                        started, emitted = started or bool(piece), safe
                        if piece:
                            yield piece
                    if final:
                        break
                    if cached:
                        continue
                    position = len(id_list) + len(generated) - 1
                    limit = min(lookup, max_new_tokens - step - 1)
                    draft = self._draft([*self._state.tokens, token], limit) if limit > 0 else []
                    run = torch.tensor([[token, *draft]], device=ids.device)
                    logits = self._forward(run, cache, position, None, extras, keep=len(draft) + 1)
                    if draft:
                        chosen = logits.argmax(-1).tolist()
                        accepted = next((i for i, (d, c) in enumerate(zip(draft, chosen)) if d != c), len(draft))
                        verified = draft[:accepted]
                        if accepted < len(draft):
                            self._crop(cache, position + 1 + accepted)
                        logits = logits[accepted : accepted + 1]
                        drafted += len(draft)
                        accepted_total += accepted
                    self._state.tokens.extend([token, *verified])
                if emitted < len(text) and cut < 0:  # EOS: flush what the stop-string hold kept back
                    piece = text[emitted:].rstrip("\ufffd")
                    piece = piece if started else piece.lstrip()
                    if piece:
                        yield piece
        except BaseException as e:  # an error or an interrupt (Ctrl-C) may leave the cache cut or half-filled
            if not isinstance(e, GeneratorExit):  # closed at a yield: the cache holds exactly ``_state.tokens``
                self._state = None  # a failed call leaves no state to continue from
            raise
        finally:
            if self._state is not None:  # the call went through: later calls may continue it
                kept = self._spelling(generated, text) if finish == "stop" else None
                if kept is None:
                    reply = self.tokenizer.decode(generated, skip_special_tokens=True)
                    self._transcripts.append(_Transcript(prompt, reply, [*id_list, *generated]))
                else:  # the reply as returned, cut before the stop string: the tokens that spell it
                    self._transcripts.append(_Transcript(prompt, text, [*id_list, *generated[:kept]]))
            self.last_stats = {
                "prompt_tokens": len(id_list),
                "reused_tokens": reuse,
                "new_tokens": len(generated),
                "finish": finish,
                "prefill_s": prefill_s,
                "drafted_tokens": drafted,
                "accepted_drafts": accepted_total,
                "total_s": time.perf_counter() - t0,
            }
