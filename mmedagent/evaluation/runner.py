"""Run a model over evaluation samples and keep everything the metrics need.

Three ways to get a model's behaviour on a sample:

* :class:`AgentRunner` — a planner (local model from ``mmedagent.model.load_planner`` or any
  OpenAI-compatible chat endpoint through serving's :class:`mmedagent.serve.remote.OpenAIPlanner`) inside the real
  :class:`mmedagent.agent.Agent`, with either the real tools (``live``: the real
  :class:`~mmedagent.dispatcher.Dispatcher`) or the sample's gold tool outputs (``gold``:
  :class:`GoldToolOutputs`). Either way the planner reads the tool outputs, worded by
  ``mmedagent.protocol.render_tool_results`` — never the question in their place.
* :class:`ControllerRunner` — the controller's ``/v1/chat/completions``, which runs the whole
  agent server-side and returns its tool trace in the ``mmedagent_trace`` field (posted through
  serving's client too).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from mmedagent.agent import Agent, AgentStep, token_counts
from mmedagent.evaluation.metrics import as_mask, tokenize
from mmedagent.evaluation.readers import EvalFileError, EvalSample
from mmedagent.evaluation.tooluse import canonical_name
from mmedagent.protocol import IMAGE_TOKEN, AssistantTurn, ToolCall, ToolOutcome, system_prompt
from mmedagent.tools.base import Tool

ToolMode = Literal["live", "gold"]


class SampleResult(BaseModel):
    """What the model did on one sample.

    ``wall_s`` and ``tokens`` are ``None`` for a result read from a predictions file that does not
    give them (its cost was not measured here; ``tool_s`` and ``model_s`` are then ``None`` too)."""

    id: str
    task: str
    answer: str = ""
    steps: list[AgentStep] = Field(default_factory=list)
    stopped: str = ""
    wall_s: float | None = 0.0
    tokens: int | None = 0
    error: str | None = None
    planner_turns: bool = Field(True, exclude=True)
    """Whether ``steps`` are the planner's turns as it made them; ``False`` for a prediction that gives
    only its calls or no tool use (its step count and parse errors were not measured)."""

    @property
    def calls(self) -> list[ToolCall]:
        return [a for s in self.steps if s.turn for a in s.turn.actions]

    @property
    def outcomes(self) -> list[ToolOutcome]:
        return [o for s in self.steps for o in s.outcomes]

    @property
    def tool_s(self) -> float | None:
        return None if self.wall_s is None else sum(s.tools_s for s in self.steps)

    @property
    def model_s(self) -> float | None:
        return None if self.wall_s is None else sum(s.model_s for s in self.steps)


class GoldToolOutputs:
    """Stands in for the dispatcher in gold mode: each call gets the sample's gold output.

    The k-th planner turn with calls is answered from the k-th gold tool-result turn; a call is
    paired with the gold output of the same tool (aliases resolved). A call with no gold output
    gets an error outcome, as an unavailable tool would.
    """

    tools: dict[str, Tool] = {}

    def __init__(self, gold_results: Sequence[Sequence[ToolOutcome]]):
        self._turns = [list(t) for t in gold_results]

    def dispatch_all(
        self, calls: Sequence[ToolCall], image: Any, question: str | None = None
    ) -> tuple[list[ToolOutcome], list[None]]:
        gold = self._turns.pop(0) if self._turns else []
        outcomes = []
        for call in calls:
            name = canonical_name(call.API_name)
            match = next((o for o in gold if canonical_name(o.tool) == name), None)
            if match is None:
                outcomes.append(ToolOutcome(tool=call.API_name, ok=False, error=f"no gold output for {call.API_name!r} in this sample"))
            else:
                gold.remove(match)
                outcomes.append(match.model_copy(update={"tool": call.API_name}))
        return outcomes, [None] * len(calls)


def image_path(name: str, image_folder: str | Path | None, data_folder: str | Path | None = None) -> Path:
    """Where a sample's image ``name`` is: in ``image_folder`` (``--image-folder``); without one, beside the data
    file (``data_folder``, where training and ``mmedagent.data check`` look), else as written (from the working
    folder). A ``FileNotFoundError`` naming the places looked in."""
    places = [Path(image_folder) / name] if image_folder else [
        *([Path(data_folder) / name] if data_folder is not None else []), Path(name)]
    found = next((p for p in places if p.is_file()), None)
    if found is None:
        looked = " and ".join(str(p) for p in dict.fromkeys(places))
        raise FileNotFoundError(f"image not found: {name} (looked for {looked}"
                                f"{'' if image_folder else '; give --image-folder'})")
    return found


def load_image(name: str | None, image_folder: str | Path | None, data_folder: str | Path | None = None) -> Any:
    """The sample's image (found by :func:`image_path`) as PIL RGB (DICOM/NIfTI through ``mmedagent.imaging``),
    or ``None``."""
    if not name:
        return None
    path = image_path(name, image_folder, data_folder)
    from mmedagent.imaging import ImageLoadError, load_image as _load

    try:
        return _load(path).image
    except ImageLoadError as e:  # the sample's own file, named in its error (the report is the researcher's)
        raise ImageLoadError(f"{name}: {e}") from None


def check_mask_sizes(samples: Sequence[EvalSample], image_folder: str | Path | None, data: str | Path) -> None:
    """Refuse a sample whose ``gold.masks`` are not the size of its image (the tool's masks are; Dice needs
    one size), naming the record, before any model runs. An image that cannot be read is left to the run."""
    from mmedagent.imaging import image_size

    for smp in samples:
        if not smp.reference.get("masks") or not smp.image:
            continue
        try:  # from the header where it says: the run decodes the image
            width, height = image_size(image_path(smp.image, image_folder, Path(data).parent))
        except (OSError, ValueError):
            continue
        shape = as_mask(smp.reference["masks"][0]).shape
        if shape != (height, width):
            raise EvalFileError(f"{data}, record {smp.index}: gold.masks are {shape[1]}x{shape[0]} pixels but "
                                f"its image is {width}x{height}: give masks of the image's size")


def planner_tokenizer(planner: Any) -> Any:
    """The planner's tokenizer if it exposes one (``tokenizer`` or ``processor.tokenizer``)."""
    tok = getattr(planner, "tokenizer", None)
    if tok is None:
        tok = getattr(getattr(planner, "processor", None), "tokenizer", None)
    return tok if callable(tok) else None


def _is_endpoint(planner: Any) -> bool:
    """Whether ``planner`` is serving's client of an OpenAI-compatible endpoint (its counts are the endpoint's usage)."""
    try:
        from mmedagent.serve.remote import OpenAIPlanner
    except ImportError:  # no httpx (no serve or eval extra): no endpoint planner either
        return False
    return isinstance(planner, OpenAIPlanner)


class TokenCounter:
    """Wraps a planner and counts the tokens it generates.

    The count comes from the planner itself where it says (``last_stats["new_tokens"]``: the local
    model's count, ``"model"``, or an endpoint's ``usage``, ``"usage"``), else from re-tokenising the
    text with the planner's tokenizer, else from counting words; ``counted_by`` says which.
    """

    def __init__(self, planner: Any):
        self.planner, self.tokens, self.counted_by = planner, 0, ""
        self._tokenizer = planner_tokenizer(planner)
        self._reported_by = "usage" if _is_endpoint(planner) else "model"

    def generate(self, messages: Sequence[dict[str, str]], image: Any, **gen: Any) -> str:
        text = self.planner.generate(messages, image, **gen)
        counts = token_counts(self.planner)
        if counts:
            n, self.counted_by = counts[1], self._reported_by
        elif self._tokenizer is not None:
            n, self.counted_by = len(self._tokenizer(text, add_special_tokens=False)["input_ids"]), "tokenizer"
        else:
            n, self.counted_by = len(tokenize(text)), "words"
        self.tokens += n
        return text


def tools_named(samples: Iterable[EvalSample]) -> set[str]:
    """The tool names, as written, that ``samples`` give: their gold calls', their gold outputs' and their
    tasks' (a task ``grounding+segmentation`` names both). Names of no tool (``vqa_open``) are left to the caller."""
    names: set[str] = set()
    for smp in samples:
        names.update(c.API_name for c in smp.gold_calls or [])
        names.update(o.tool for turn in smp.gold_results for o in turn)
        names.update({smp.task, *smp.task.split("+")})
    return names


class AgentRunner:
    """A planner inside the real agent loop, with live tools or gold tool outputs."""

    prompting: dict[str, str] = {}
    """How the planner is prompted (``system_prompt``, ``template``), for the report; set by the CLI."""

    def __init__(
        self,
        planner: Any,
        tool_mode: ToolMode,
        tools: Sequence[Tool] | Sequence[type[Tool]],
        *,
        image_folder: str | Path | None = None,
        data_folder: str | Path | None = None,
        max_steps: int = 3,
        timeout_s: float = 120.0,
        system: str | None = None,
        **gen: Any,
    ):
        """``data_folder``: the data file's, where images are looked for without ``image_folder`` (:func:`image_path`).
        ``system``: the planner's system prompt; ``None`` = the tool catalog of ``tools`` (what the
        controller sends). A model trained without the catalog (MMedAgent's data, the demo model)
        is evaluated with the prompt it was trained on, e.g. ``mmedagent.protocol.DEFAULT_SYSTEM``.

        Live tools are loaded by :meth:`preload`, before the first sample, or at their first call (see there)."""
        if tool_mode not in ("live", "gold"):
            raise ValueError(f"tool_mode must be 'live' or 'gold', not {tool_mode!r}")
        self.planner, self.tool_mode, self.image_folder, self.max_steps = planner, tool_mode, image_folder, max_steps
        self.data_folder = data_folder
        self.gen = {"temperature": 0.0, "max_new_tokens": 256, **gen}
        classes = [t if isinstance(t, type) else type(t) for t in tools]
        self.system = system if system is not None else system_prompt(classes)
        self.dispatcher = None
        if tool_mode == "live":
            from mmedagent.dispatcher import Dispatcher

            self.dispatcher = Dispatcher([t() if isinstance(t, type) else t for t in tools], timeout_s=timeout_s)
        self.counter = TokenCounter(planner)

    def preload(self, progress: Callable[[str], None] | None = None, *,
                samples: Iterable[EvalSample] | None = None) -> dict[str, str]:
        """Load live tools now, one after another (as the controller loads its tools before serving): those
        the ``samples``' gold calls, gold outputs and tasks name (:func:`tools_named`, aliases resolved; a
        composite loads its parts), or every tool without ``samples``. The planner is still offered every
        tool (its system prompt is unchanged); a tool not loaded here loads at its first call, and that load,
        like this one, is never charged to a sample (its timeout, ``tools_s``, ``wall_s``). Returns
        ``{name: error}`` for the tools that failed to load so far; their calls get an error naming the
        failure, and the run goes on. ``progress`` gets a line per tool loaded, now or at a first call."""
        if self.dispatcher is None:
            return {}
        self.dispatcher.progress = progress  # and at a tool's first call
        tools = list(self.dispatcher.tools.values())
        if samples is not None:
            named = {tool.name for name in tools_named(samples) if (tool := self.dispatcher.resolve(name))}
            tools = [t for t in tools if t.name in named]
            if progress:
                progress(f"preloading the {len(tools)} of {len(self.dispatcher.tools)} tools offered that the data "
                         f"names: {', '.join(t.name for t in tools) or '(none)'}")
        self.dispatcher.preload(progress, tools)
        later = [t.name for t in self.dispatcher.tools.values() if not t.loaded and t.name not in self.load_errors]
        if progress and later:
            progress(f"not preloaded, each loads at its first call (not charged to the sample): {', '.join(later)}")
        return self.load_errors

    @property
    def load_errors(self) -> dict[str, str]:
        """``{name: error}`` for the live tools that failed to load so far (before the first sample or at a call)."""
        return dict(self.dispatcher.load_errors) if self.dispatcher is not None else {}

    @property
    def tokens_counted_by(self) -> str:
        return self.counter.counted_by

    def run(self, sample: EvalSample) -> SampleResult:
        """Run the agent on ``sample``; a live tool loaded at its first call is not part of its timings."""
        started = time.monotonic()
        try:
            image = load_image(sample.image, self.image_folder, self.data_folder)
        except (OSError, ValueError) as e:
            return SampleResult(id=sample.id, task=sample.task, error=str(e))
        dispatcher: Any = self.dispatcher if self.tool_mode == "live" else GoldToolOutputs(sample.gold_results)
        loaded_before = set(self.dispatcher.load_s) if self.dispatcher is not None else set()
        agent = Agent(self.counter, dispatcher, max_steps=self.max_steps, system=self.system, **self.gen)
        before = self.counter.tokens
        try:
            res = agent.run(sample.question, image)
        except Exception as e:  # a planner or endpoint failure is this sample's error, not the run's
            return SampleResult(id=sample.id, task=sample.task, error=f"planner failed: {type(e).__name__}: {e}",
                                wall_s=time.monotonic() - started - self._first_loads_s(loaded_before, []))
        tokens = self.counter.tokens - before
        return SampleResult(
            id=sample.id, task=sample.task, answer=res.answer, steps=res.steps, stopped=res.stopped,
            wall_s=time.monotonic() - started - self._first_loads_s(loaded_before, res.steps), tokens=tokens,
        )

    def _first_loads_s(self, loaded_before: set[str], steps: list[AgentStep]) -> float:
        """Seconds the live tools first called in this sample took to load, each taken out of the ``tools_s`` of
        the step that called it (the dispatcher loads before a call's clock starts; the step's clock runs on)."""
        if self.dispatcher is None:
            return 0.0
        loads = {n: s for n, s in self.dispatcher.load_s.items() if n not in loaded_before}
        pending = dict(loads)
        for step in steps:
            for name in {t.name for o in step.outcomes if (t := self.dispatcher.resolve(o.tool))} & pending.keys():
                step.tools_s -= pending.pop(name)
        return sum(loads.values())

    def close(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.close()


def _step_from_trace(index: int, d: dict[str, Any]) -> AgentStep:
    """An :class:`AgentStep` from a controller trace step (step view or ``AgentStep`` dump)."""
    if "turn" not in d and "actions" in d and not d.get("parse_error"):
        turn = AssistantTurn(thoughts=d.get("thoughts") or "", actions=d.get("actions") or [], value=d.get("value") or "")
        d = {**d, "turn": turn.model_dump()}
    return AgentStep.model_validate({"index": index, "raw": "", **d})


class ControllerRunner:
    """The controller's OpenAI-compatible endpoint: the agent and the live tools run server-side.

    The response's ``mmedagent_trace`` is ``{"steps": [...], "stopped": ...}``; each step has
    ``raw``, ``thoughts``, ``actions``, ``value``, ``parse_error``, ``outcomes``, ``overlays``,
    ``model_s`` and ``tools_s`` (the controller's step view; ``mmedagent.agent.AgentStep`` dumps,
    with ``turn``, are read too).
    """

    tool_mode: ToolMode = "live"
    tokens_counted_by = "usage"
    prompting: dict[str, str] = {}  # the server prompts its planner
    load_errors: dict[str, str] = {}  # the server loads its tools (and reports their failures)

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, *,
                 image_folder: str | Path | None = None, data_folder: str | Path | None = None, timeout_s: float = 600.0,
                 max_new_tokens: int = 256):
        """``url``: the controller's host root, ``.../v1`` or ``.../v1/chat/completions``; ``api_key``: its
        bearer key (``--api-key``), or none; ``data_folder`` as for :class:`AgentRunner`."""
        from mmedagent.serve.remote import OpenAIPlanner, api_root

        self.planner = OpenAIPlanner(api_root(url), model, api_key, timeout_s, list_models=False)
        self.image_folder, self.data_folder, self.max_new_tokens = image_folder, data_folder, max_new_tokens

    def preload(self, progress: Callable[[str], None] | None = None, wait_s: float = 900.0,
                poll_s: float = 2.0, *, samples: Iterable[EvalSample] | None = None) -> dict[str, str]:
        """Wait until the controller has no tool still loading (``GET /v1/status``): samples asked before
        would be planned with a shorter tool catalog than the rest. Gives up (with a warning) after
        ``wait_s``; a controller without the status route is taken as it is. ``samples`` (as for
        :meth:`AgentRunner.preload`) change nothing: the controller loads all of its tools."""
        import httpx

        status_url = f"{self.planner.base_url}/status"
        deadline, said = time.monotonic() + wait_s, None
        while True:
            try:
                r = self.planner.client.get(status_url)
                loading = r.json().get("loading") or [] if r.status_code == 200 else []
            except (httpx.HTTPError, ValueError, AttributeError):
                return {}
            if not loading:
                return {}
            if time.monotonic() > deadline:
                if progress:
                    progress(f"warning: tools still loading after {wait_s:.0f} s: {', '.join(loading)}; "
                             "evaluating without them")
                return {}
            if progress and loading != said:
                progress(f"waiting for the controller's tools still loading: {', '.join(loading)}")
                said = loading
            time.sleep(poll_s)

    def run(self, sample: EvalSample) -> SampleResult:
        from mmedagent.serve.remote import WorkerError

        started = time.monotonic()
        try:
            image = load_image(sample.image, self.image_folder, self.data_folder)
        except (OSError, ValueError) as e:
            return SampleResult(id=sample.id, task=sample.task, error=str(e))
        user = f"{IMAGE_TOKEN}\n{sample.question}" if image is not None else sample.question
        try:
            data = self.planner.complete([{"role": "user", "content": user}], image, temperature=0.0,
                                         max_new_tokens=self.max_new_tokens)
            answer = data["choices"][0]["message"]["content"] or ""
        except (WorkerError, ValueError, LookupError, TypeError, AttributeError) as e:
            what = str(e) if isinstance(e, WorkerError) else f"unreadable response ({type(e).__name__}: {e})"
            return SampleResult(id=sample.id, task=sample.task, error=f"endpoint error: {what}", wall_s=time.monotonic() - started)
        trace = data.get("mmedagent_trace")
        if trace is None:
            return SampleResult(id=sample.id, task=sample.task, wall_s=time.monotonic() - started,
                                error="response has no 'mmedagent_trace' (not an mmedagent controller?)")
        raw_steps = trace.get("steps", []) if isinstance(trace, dict) else trace
        try:
            steps = [_step_from_trace(i, s) for i, s in enumerate(raw_steps)]
        except ValidationError as e:
            return SampleResult(id=sample.id, task=sample.task, error=f"unreadable mmedagent_trace: {e.errors()[0]['msg']}")
        return SampleResult(
            id=sample.id, task=sample.task, answer=answer, steps=steps,
            stopped=str(trace.get("stopped", "")) if isinstance(trace, dict) else "",
            wall_s=time.monotonic() - started, tokens=int((data.get("usage") or {}).get("completion_tokens", 0)),
        )

    def close(self) -> None:
        self.planner.client.close()
