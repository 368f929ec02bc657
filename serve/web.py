"""Browser chat (Gradio): upload a PNG, JPEG, DICOM or NIfTI image, ask, and watch each step.

Each step — thought, tool call, tool result, answer — is shown with the tools' boxes and masks drawn
on the image.

``python serve/web.py --controller http://127.0.0.1:21001`` (the one command starts it for you).
The page talks to the controller's ``/chat`` stream; the image is decoded here (DICOM tags never
leave this process) and sent on as a PNG.
"""

if __name__ == "__main__":  # run as a script: serve/ must not shadow installed packages
    import os as _os
    import sys as _sys

    _here = _os.path.dirname(_os.path.abspath(__file__))
    _sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or ".") != _here]

import argparse
import atexit
import collections
import contextlib
import hmac
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a clinical network

import mmedagent  # noqa: F401  - arms the torchvision shim first
import httpx
from starlette.middleware import Middleware

from mmedagent.serve.config import add_common_args, config_or_exit
from mmedagent.serve.httpclient import error_detail, make_client
from mmedagent.imaging import WINDOW_PRESETS, describe_view
from mmedagent.protocol import ACTIONS_MARK, THOUGHTS_MARK, VALUE_MARK
from mmedagent.serve.messages import MAX_QUESTION_CHARS, stop_note
from mmedagent.serve.security import LoopbackHostOnly, setup_logging
from mmedagent.serve.uploads import UploadError, decode_image, png_data_url, sendable_png
from mmedagent.serve.worker_base import bind_socket, follow_launcher
from mmedagent.tools import Overlay

log = logging.getLogger("mmedagent.serve.web")
PREVIEW_SIDE = 384
AUTO = "auto"
"""The window choice that leaves it to the file (DICOM's own window) or the values."""


def for_display(image):
    """Small scans scaled up (nearest: pixels stay visible) so the preview and its overlays are readable."""
    side = max(image.size)
    if side >= PREVIEW_SIDE:
        return image
    k = PREVIEW_SIDE // side
    return image.resize((image.size[0] * k, image.size[1] * k), resample=0) if k > 1 else image


def _pct(value: Any) -> str:
    return f"{value:.0%}" if isinstance(value, (int, float)) else "n/a"


def tool_line(tool: dict[str, Any]) -> str:
    """``name`` — **label** (the tool's own weights note, where it has one): tiny demo weights said plainly, in bold."""
    weights = f" ({tool['weights']})" if tool.get("weights") else ""  # a tool without weights has none
    if tool.get("label"):
        return f"`{tool['name']}` — **{tool['label']}**{weights}"
    return f"`{tool['name']}`{weights}"


def banner(status: dict[str, Any]) -> str:
    """Markdown naming the loaded model and tool weights, with the model's warning note and, for
    the demo planner, its held-out evaluation."""
    lines = []
    for m in status.get("models", []):
        size = f", {m['parameters']:,} parameters" if m.get("parameters") else ""
        lines.append(f"**Model:** `{m['name']}` ({m.get('family', '?')}{size}, template {m.get('template', '?')})")
        if m.get("note"):
            lines.append(f"> ⚠️ **{m['note']}**")
    if not status.get("models"):
        lines.append("**Model:** none registered yet — the model worker may still be loading.")
    demo = status.get("demo")
    if demo:
        ev = demo.get("evaluation")
        if ev:
            lines.append(f"**Demo model, held-out evaluation** ({ev.get('samples') or '?'} questions in wordings not seen "
                         f"in training): tool selection accuracy {_pct(ev.get('tool_selection_accuracy'))}, "
                         f"argument validity {_pct(ev.get('argument_validity'))}.")
        if not any(m.get("note") == demo["note"] for m in status.get("models", [])):
            lines.append(f"> ⚠️ **{demo['note']}**")
    tools = status.get("tools", [])
    lines.append("**Tools:**" + ("".join(f"\n- {tool_line(t)}" for t in tools) if tools else " none"))
    if status.get("loading"):
        lines.append("**Still loading:** " + ", ".join(f"`{n}`" for n in status["loading"]) + " (available once loaded)")
    lines.append("_Research software, not a medical device: do not use it for diagnosis._")
    return "\n\n".join(lines)


def step_messages(step: dict[str, Any]) -> list[dict[str, Any]]:
    """Chat bubbles for one agent step: thought, then a call and a result per tool."""
    out = []
    if step.get("thoughts"):
        out.append({"role": "assistant", "content": step["thoughts"], "metadata": {"title": "💭 Thought"}})
    if step.get("parse_error"):
        out.append({"role": "assistant", "content": step["parse_error"], "metadata": {"title": "⚠️ Unreadable model turn"}})
    for action, outcome in zip(step.get("actions", []), step.get("outcomes", []) or [None] * len(step.get("actions", []))):
        params = {k: v for k, v in action.get("API_params", {}).items() if k != "image"}
        out.append({"role": "assistant", "content": f"```json\n{json.dumps(params, ensure_ascii=False)}\n```",
                    "metadata": {"title": f"🛠️ Tool call: {action['API_name']}"}})
        if outcome is None:
            continue
        if outcome["ok"]:
            body = f"```json\n{json.dumps(outcome['output'], ensure_ascii=False)}\n```"
            title = f"📋 Tool result: {outcome['tool']} ({outcome['elapsed_s']:.2f} s)"
        else:
            body, title = outcome["error"], f"❌ Tool error: {outcome['tool']}"
        out.append({"role": "assistant", "content": body, "metadata": {"title": title}})
    return out


STREAMED_MARKS = {THOUGHTS_MARK: "💭", ACTIONS_MARK: "🛠️", VALUE_MARK: "👉"}


def streamed_text(text: str) -> str:
    """The model's turn as it streams, its format's keys (``"thoughts🤔"``, ...) shown as the step's icons."""
    for mark, icon in STREAMED_MARKS.items():
        text = text.replace(mark, icon)
    return text


def overlay_note(error: Exception) -> dict[str, Any]:
    """A one-line chat note for a step's boxes or masks that could not be drawn (the answer goes on)."""
    from pydantic import ValidationError

    reason = error.errors()[0]["msg"] if isinstance(error, ValidationError) else str(error)
    reason = reason.splitlines()[0] if reason.strip() else type(error).__name__
    return {"role": "assistant", "content": f"This step's boxes or masks could not be drawn on the image: {reason}",
            "metadata": {"title": "⚠️ Note"}}


UPLOAD_TTL_S = 15 * 60.0
"""An upload no session read within this long (its tab was closed before it loaded) is deleted."""


class Uploads(set):
    """Gradio's set of uploaded files (``Blocks.upload_file_set``: its upload route adds each path it
    hands out), counting the hand-outs of each path. Gradio names an upload by its content's hash and
    its file name, so sessions uploading the same file at the same moment get one path: each reads it,
    and the last one deletes it. A path no upload handed out is not read: a request cannot make the UI
    read or delete another session's preview or any other file of its folder. An upload no session has
    read within ``ttl_s`` (its tab was closed first) is deleted at the next upload or read."""

    def __init__(self, ttl_s: float = UPLOAD_TTL_S) -> None:
        super().__init__()
        self.pending: collections.Counter[str] = collections.Counter()
        self.handed_at: dict[str, float] = {}
        self.ttl_s = ttl_s
        self.lock = threading.Lock()

    def update(self, *groups: Any) -> None:
        paths = [os.fspath(p) for group in groups for p in group]
        with self.lock:
            self._expire()
            self.pending.update(paths)
            self.handed_at.update(dict.fromkeys(paths, time.monotonic()))
            super().update(paths)

    def _expire(self) -> None:
        """Delete the uploads handed out longer than ``ttl_s`` ago and never read (under the lock)."""
        now = time.monotonic()
        for upload in [u for u, t in self.handed_at.items() if now - t > self.ttl_s]:
            self._remove(upload)

    def _remove(self, upload: str) -> None:
        self.pending.pop(upload, None)
        self.handed_at.pop(upload, None)
        self.discard(upload)
        path = Path(upload)
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            path.parent.rmdir()

    def take(self, upload: str) -> bytes:
        """The bytes of a handed-out upload, whose file (and folder, when empty) its last reader deletes:
        an original DICOM carries the patient's name and IDs and must not stay on disk or be served
        again. An ``OSError`` if the upload is gone or was never handed out."""
        with self.lock:
            self._expire()
            if self.pending[upload] <= 0:
                raise FileNotFoundError("not a pending upload")
        try:
            return Path(upload).read_bytes()
        finally:
            with self.lock:
                self.pending[upload] -= 1
                if self.pending[upload] <= 0:
                    self._remove(upload)

    def install(self, ui: Any) -> None:
        """Be ``ui``'s set of uploaded files (and one of its temporary file sets, removed at exit)."""
        ui.temp_file_sets = [self if s is ui.upload_file_set else s for s in ui.temp_file_sets]
        ui.upload_file_set = self


def upload_box(**kwargs: Any):
    """A ``gr.File`` whose value is the path of Gradio's copy of the upload, for :meth:`Uploads.take`.
    ``gr.File`` itself also makes an empty temp file per upload, kept until exit; this one makes none. (Its
    ``preprocess`` is replaced on the instance: a subclass would make Gradio write a ``.pyi`` beside this file.)"""
    import gradio as gr
    from gradio.data_classes import ListFiles

    ignored = sorted({"file_types", "file_count", "type"} & set(kwargs))
    if ignored:  # the preprocess below takes one path as is: it would not apply them
        raise TypeError(f"upload_box takes no {', '.join(ignored)}: it hands on one upload's path, checked by its reader")
    box = gr.File(**kwargs)

    def upload_path(payload: Any) -> str | None:
        if payload is None:
            return None
        return (payload[0] if isinstance(payload, ListFiles) else payload).path

    box.preprocess = upload_path
    return box


def private_upload_dir() -> Path:
    """A folder only this user can read, for Gradio's uploads and images, removed at exit (set as
    ``GRADIO_TEMP_DIR``, inside the one already set, if any)."""
    folder = Path(tempfile.mkdtemp(prefix="mmedagent-web-", dir=os.environ.get("GRADIO_TEMP_DIR")))  # mode 0700
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


class WebChat:
    """The page's callbacks; one controller client shared by all sessions."""

    def __init__(self, controller_url: str, api_key: str | None, max_upload_bytes: int, timeout_s: float = 600.0):
        self.url, self.max_upload_bytes = controller_url.rstrip("/"), max_upload_bytes
        self.client = make_client(api_key, timeout_s)
        self.uploads = Uploads()

    def status_markdown(self) -> str:
        try:
            r = self.client.get(f"{self.url}/v1/status", timeout=10)
            r.raise_for_status()
        except httpx.HTTPError as e:
            return f"**Controller not reachable** ({type(e).__name__}); is `python serve/controller.py` running?"
        return banner(r.json())

    def load(self, file: str | None, window: str = AUTO, slice_index: float | None = -1, plane: str = "axial",
             volume: float | None = 0):
        """Upload → (preview, image state, reset chat, reset history, note, the file's bytes for another view)."""
        if not file:
            return None, None, [], [], "", None
        try:
            data = self.uploads.take(file)
        except OSError:
            return None, None, [], [], "⚠️ The upload is gone; please upload the file again.", None
        return (*self.view(data, window, slice_index, plane, volume), data)

    def upload(self, file: str | None, window: str = AUTO, plane: str = "axial"):
        """A new file → :meth:`load` at the default slice and volume, and those defaults for their boxes:
        the last scan's slice or volume may not exist in this one (the window and plane stay)."""
        return (*self.load(file, window, -1, plane, 0), -1, 0)

    def view(self, data: bytes | None, window: str = AUTO, slice_index: float | None = -1, plane: str = "axial",
             volume: float | None = 0):
        """A view of the uploaded scan (window, slice, plane, volume) → (preview, image state, reset chat,
        reset history, note): another view is another image, so the conversation starts again."""
        import gradio as gr

        if data is None:  # no scan (a chat without an image): nothing to show again, the conversation goes on
            return (gr.skip(),) * 5
        try:
            index = None if slice_index is None or slice_index < 0 else int(slice_index)  # -1: the middle one
            med = decode_image(data, max_bytes=self.max_upload_bytes, window=None if window == AUTO else window,
                               slice_index=index, plane=plane, volume=int(volume or 0))
            sendable_png(med.image, self.max_upload_bytes)  # encoded once, sent with each question
        except (UploadError, ValueError) as e:  # a slice or volume out of range is the reader's ValueError
            reason = getattr(e, "reason", str(e))
            gr.Warning(reason)
            return None, None, [], [], f"⚠️ {reason}"
        size = f"{med.image.size[0]}×{med.image.size[1]} px"
        note = f"Loaded {describe_view(med.metadata)}; {size}" + "".join(f"\n⚠️ {w}" for w in med.warnings)
        return for_display(med.image), med.image, [], [], note

    @classmethod
    def new_view(cls, scan: bytes | None, slice_index: float | None, volume: float | None):
        """After :meth:`view`: (conversation id, view applied) of the new conversation on that view; both
        left as they are without a scan, as the chat is."""
        import gradio as gr

        return (None, cls.shown_view(slice_index, volume)) if scan is not None else (gr.skip(), gr.skip())

    @staticmethod
    def shown_view(slice_index: float | None, volume: float | None) -> tuple[int, int]:
        """The slice and volume boxes as the view they name (-1: the middle slice or frame)."""
        return (-1 if slice_index is None or slice_index < 0 else int(slice_index)), int(volume or 0)

    def check_view(self, question: str | None, slice_index: float | None, volume: float | None,
                   applied: tuple[int, int] | None, scan: bytes | None, image) -> None:
        """Refuse a question longer than the server takes, or about an upload that is not shown: its view
        failed (the note says why), or the slice or volume box holds a number not applied yet (it applies on
        Enter). The answer would be about no image, or another one than the boxes name. The question stays
        in its box."""
        import gradio as gr

        length = len((question or "").strip())
        if length > MAX_QUESTION_CHARS:
            raise gr.Error(f"The question has {length:,} characters, more than the {MAX_QUESTION_CHARS:,} the server "
                           "takes: shorten it; your question is kept.", print_exception=False)
        if scan is None:  # no scan: the view boxes show nothing
            return
        if image is None:
            raise gr.Error("The uploaded file is not shown (the note above the image says why): choose another view "
                           "or upload another file; your question is kept.", print_exception=False)
        if applied is not None and self.shown_view(slice_index, volume) != tuple(applied):
            raise gr.Error("The slice or volume box is not applied yet: press Enter in it to show that view "
                           "(a new conversation), or set it back; your question is kept.", print_exception=False)

    def respond(self, question: str, chat: list, history: list, image, conversation: str | None) -> Iterator[tuple]:
        """Stream one question: yields (chat, history, preview, question box, conversation id). The box is
        emptied once, as the question moves into the chat: what the user types meanwhile stays. The preview
        is sent only when it changes (Gradio rewrites its file each time, under a browser reading it)."""
        import gradio as gr

        from mmedagent.render import render

        question, keep = (question or "").strip(), gr.skip()
        if not question:
            yield keep, keep, keep, keep, keep
            return
        conversation = conversation or uuid.uuid4().hex
        chat = [*chat, {"role": "user", "content": question}]
        overlays, pending = [], ""
        body = {"question": question, "history": history, "conversation_id": conversation,
                "image": png_data_url(image) if image is not None else None}
        shown = for_display(image) if image is not None else None  # without the last question's overlays
        yield chat + [{"role": "assistant", "content": "…"}], history, shown, "", conversation
        try:
            with self.client.stream("POST", f"{self.url}/chat", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    chat.append({"role": "assistant", "content": f"⚠️ {error_detail(r)}"})
                    yield chat, history, keep, keep, conversation
                    return
                for line in r.iter_lines():
                    if not line:
                        continue
                    event = json.loads(line)
                    if event["type"] == "token":
                        pending += event["text"]
                        streaming = {"role": "assistant", "content": streamed_text(pending)}
                        yield chat + [streaming], history, keep, keep, conversation
                    elif event["type"] == "step":
                        pending = ""
                        step = event["step"]
                        chat.extend(step_messages(step))
                        preview = keep
                        if image is not None and any(step["overlays"]):
                            try:  # a tool's malformed box or mask must not end the answer
                                drawn = [*overlays, *(Overlay.model_validate(o) for o in step["overlays"] if o)]
                                preview, overlays = render(for_display(image), drawn), drawn
                            except Exception as e:  # a tool's data, whatever is wrong with it: noted, not fatal
                                chat.append(overlay_note(e))
                        yield chat, history, preview, keep, conversation
                    elif event["type"] == "answer":
                        history = event["history"]
                        if note := stop_note(event["stopped"]):
                            chat.append({"role": "assistant", "content": note, "metadata": {"title": "⚠️ Note"}})
                        chat.append({"role": "assistant", "content": event["answer"] or "(no answer)"})
                        yield chat, history, keep, keep, conversation
                    elif event["type"] == "error":
                        chat.append({"role": "assistant", "content": f"⚠️ {event['error']}"})
                        yield chat, history, keep, keep, conversation
        except httpx.HTTPError as e:
            chat.append({"role": "assistant", "content": f"⚠️ controller unreachable ({type(e).__name__})"})
            yield chat, history, keep, keep, conversation


WEB_CONCURRENCY = 16
"""Chats the web UI streams at once."""
WEB_QUEUE_SIZE = 64
"""Chats waiting for one of those; more are told the queue is full (Gradio's default queue has no bound)."""


def queued(ui):
    """``ui`` with its request queue bounded (:data:`WEB_CONCURRENCY`, :data:`WEB_QUEUE_SIZE`)."""
    return ui.queue(default_concurrency_limit=WEB_CONCURRENCY, max_size=WEB_QUEUE_SIZE)


def build_ui(web: WebChat):
    import gradio as gr

    with gr.Blocks(title="mmedagent", delete_cache=(600, 3600)) as ui:  # rendered scans: gone after an hour
        gr.Markdown("## mmedagent — medical image chat with tools")
        status = gr.Markdown(elem_id="banner")
        image_state, history_state, conversation_state = gr.State(None), gr.State([]), gr.State(None)
        scan_state = gr.State(None)  # the upload's bytes (this session's memory only), for another view
        view_state = gr.State(None)  # the slice and volume applied: the image shows them
        with gr.Row():
            with gr.Column(scale=2):
                # any file name: DICOM files from a PACS or a CD often have no extension; the content decides
                upload = upload_box(label="Image (PNG, JPEG, DICOM, NIfTI)", elem_id="upload")
                with gr.Row():  # the view of a scan: CT window, NIfTI slice / plane / volume, DICOM frame
                    window = gr.Dropdown([AUTO, *WINDOW_PRESETS], value=AUTO, label="Window", elem_id="window")
                    plane = gr.Dropdown(["axial", "coronal", "sagittal"], value="axial", label="Plane", elem_id="plane")
                    slice_index = gr.Number(-1, precision=0, minimum=-1, label="Slice / frame (from 0; -1: middle)",
                                            elem_id="slice")
                    volume = gr.Number(0, precision=0, minimum=0, label="Volume", elem_id="volume")
                note = gr.Markdown(elem_id="image-note")
                preview = gr.Image(label="Image with tool overlays", type="pil", format="png", interactive=False, height=380,
                                   elem_id="preview")  # lossless: a clinician sees the scan's own grey levels
            with gr.Column(scale=3):
                chat = gr.Chatbot(label="Chat", height=520, elem_id="chat")
                question = gr.Textbox(label="Question", placeholder="Ask about the image…", elem_id="question", lines=1)
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    clear = gr.Button("New conversation", elem_id="clear")
        ui.load(web.status_markdown, outputs=status)
        gr.Timer(15).tick(web.status_markdown, outputs=status, show_progress="hidden")  # tools that finish loading
        ask = dict(fn=web.respond, inputs=[question, chat, history_state, image_state, conversation_state],
                   outputs=[chat, history_state, preview, question, conversation_state])
        check = dict(fn=web.check_view, inputs=[question, slice_index, volume, view_state, scan_state, image_state],
                     show_progress="hidden")
        asking = [send.click(**check).success(**ask), question.submit(**check).success(**ask)]
        # a new image or conversation stops the answer being streamed: it must not write one patient's
        # conversation over the next one's
        shown = [preview, image_state, chat, history_state, note]
        view = [window, slice_index, plane, volume]
        new_image = dict(fn=lambda s, v: (None, web.shown_view(s, v)), inputs=[slice_index, volume],
                         outputs=[conversation_state, view_state])
        upload.change(web.upload, [upload, window, plane], [*shown, scan_state, slice_index, volume], cancels=asking,
                      api_name="load").then(**new_image)
        # without a scan (a chat without an image) another window or plane changes nothing
        gr.on([window.change, plane.change, slice_index.submit, volume.submit], web.view, [scan_state, *view], shown,
              cancels=asking).then(web.new_view, [scan_state, slice_index, volume], [conversation_state, view_state])
        clear.click(lambda img: ([], [], for_display(img) if img is not None else None, None), image_state,
                    [chat, history_state, preview, conversation_state], cancels=asking)
    web.uploads.install(ui)
    return ui


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--controller", default=None, help="controller URL (default from config)")
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--max-upload-mb", type=float, default=None, help="largest image (default from config)")
    add_common_args(parser)
    args = parser.parse_args(argv)
    cfg = config_or_exit(parser, args.config, api_key=args.api_key, log_level=args.log_level, host=args.host, web_port=args.port,
                         max_upload_mb=args.max_upload_mb)
    setup_logging(cfg.log_level, [cfg.api_key or ""])
    port = cfg.web_port or 7860
    bind_socket(cfg.host, port).close()  # a port in use is one line, not Gradio's traceback
    uploads = private_upload_dir()
    os.environ["GRADIO_TEMP_DIR"] = str(uploads)

    def stop(*_: Any) -> None:  # stopped (launcher, docker, systemd): the uploads go, then the process at once
        shutil.rmtree(uploads, ignore_errors=True)  # (an orderly exit could wait on Gradio's threads for long)
        logging.shutdown()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    follow_launcher()
    web = WebChat(args.controller or cfg.controller_url, cfg.api_key, cfg.max_upload_bytes)
    ui = build_ui(web)
    key = cfg.api_key
    auth = (lambda _user, password: hmac.compare_digest(password.encode(), key.encode())) if key else None
    # without a key (loopback only), a page the user opens cannot reach the UI under a name of its own
    guard = {} if key else {"middleware": [Middleware(LoopbackHostOnly)]}
    queued(ui).launch(
        server_name=cfg.host, server_port=port, auth=auth, app_kwargs=guard,
        auth_message="Password: the server's API key." if key else None,
        max_file_size=cfg.max_upload_bytes, show_error=False, quiet=True,
        run_history=False,  # Gradio's default keeps every question, answer and scan preview in the browser
    )


if __name__ == "__main__":
    main()
