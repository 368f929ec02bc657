"""Chatting with a scan as a clinician does: the web page's upload, view boxes and question box, and the
terminal chat (serve/cli.py) with a local scan, several questions and Ctrl-C."""

import inspect
import json
import re
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydicom.data import get_testdata_file

from mmedagent.serve import cli
from mmedagent.serve.uploads import decode_image, image_from_data_url

NIFTI_4D = "example4d.nii.gz"  # nibabel's sample: 128×96×24 voxels, 2 volumes


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    import nibabel as nib
    import nibabel.testing

    folder = tmp_path_factory.mktemp("scans")
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "ct.dcm")
    shutil.copy(nibabel.testing.data_path / NIFTI_4D, folder / NIFTI_4D)
    ct = np.random.default_rng(0).normal(0, 300, (64, 64, 40)).astype(np.int16)  # 320 KB on disk
    nib.save(nib.Nifti1Image(ct, np.eye(4)), folder / "ct.nii")
    return folder


class FakeController:
    """The controller's ``/v1/status`` and ``/chat`` NDJSON stream (model text, a step, the answer),
    recording each question's body; a question in ``interrupt`` is cut short as Ctrl-C would
    (KeyboardInterrupt while the answer streams)."""

    def __init__(self, interrupt=()):
        self.bodies, self.interrupt = [], set(interrupt)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/status":
            if "banner" in self.interrupt:
                raise KeyboardInterrupt
            return httpx.Response(200, json={"models": [{"name": "demo", "note": "demo only"}], "tools": []})
        body = json.loads(request.content)
        self.bodies.append(body)
        if body["question"] in self.interrupt:
            raise KeyboardInterrupt
        answer = f"answer {len(self.bodies)}"
        history = [*body["history"], {"role": "user", "content": body["question"]}, {"role": "assistant", "content": answer}]
        step = {"index": 0, "thoughts": "I can answer directly.", "actions": [], "outcomes": [], "overlays": [],
                "value": answer, "parse_error": None}
        events = [{"type": "token", "text": "I can"}, {"type": "token", "text": " answer"}, {"type": "step", "step": step},
                  {"type": "answer", "answer": answer, "history": history, "stopped": "answer"}]
        return httpx.Response(200, text="".join(json.dumps(e) + "\n" for e in events))


class Page:
    """The web UI as a browser shows it: the components' values, and events that run their handlers
    and those chained after them (``.then``, ``.success``) on the values shown, as Gradio's front end
    does; ``typing`` is what the user does while an answer streams."""

    def __init__(self, controller: FakeController, tmp_path):
        from mmedagent.serve.web import WebChat, build_ui

        web = WebChat("http://controller", None, 20 << 20)
        web.client = httpx.Client(transport=httpx.MockTransport(controller))
        self.ui, self.uploads = build_ui(web), tmp_path
        self.deps = self.ui.config["dependencies"]
        self.ids = {c["props"]["elem_id"]: c["id"] for c in self.ui.config["components"] if c["props"].get("elem_id")}
        self.values = {c["id"]: getattr(self.ui.blocks[c["id"]], "value", None) for c in self.ui.config["components"]}
        self.sent = {i: 0 for i in self.values}  # values sent to each component (Gradio saves each image sent)

    def __getitem__(self, elem_id):
        return self.values[self.ids[elem_id]]

    def __setitem__(self, elem_id, value):
        self.values[self.ids[elem_id]] = value

    def upload(self, scan, name=None):
        """The file as the browser sends it (its name, or ``name``): Gradio keeps a copy in a folder of
        its own, checks it as the upload component says, and hands the callback its path."""
        from gradio.data_classes import FileData

        copy = self.uploads / f"upload-{len(list(self.uploads.iterdir()))}" / (name or scan.name)
        copy.parent.mkdir()
        shutil.copy(scan, copy)
        self.ui.upload_file_set.update([str(copy)])  # as Gradio's upload route hands the path out
        self["upload"] = self.ui.blocks[self.ids["upload"]].preprocess(FileData(path=str(copy), orig_name=copy.name))
        return self.event("upload", "change")

    def event(self, elem_id, trigger, typing=None):
        """Run the handlers of ``trigger`` on ``elem_id`` and their chains; the gr.Error raised, if any."""
        import gradio as gr

        pending = [d for d in self.deps if [self.ids[elem_id], trigger] in map(list, d["targets"])
                   and self.ui.fns[d["id"]].fn is not None]  # not the front end's cancelling of other events
        error = None
        while pending:
            dep = pending.pop(0)
            try:
                result = self.ui.fns[dep["id"]].fn(*(self.values[i] for i in dep["inputs"]))
                streamed = inspect.isgenerator(result)
                for n, update in enumerate(result if streamed else [result]):
                    self.show(dep["outputs"], update)
                    if typing and streamed and n == 0:
                        typing()
                ok = True
            except gr.Error as e:
                error, ok = e, False
            pending += [d for d in self.deps if d["trigger_after"] == dep["id"] and (ok or not d["trigger_only_on_success"])]
        return error

    def show(self, outputs, update):
        for i, value in zip(outputs, update if len(outputs) > 1 else [update]):
            if not (isinstance(value, dict) and value.get("__type__") == "update"):  # gr.skip(): left as shown
                self.values[i] = value
                self.sent[i] += 1


def test_a_new_upload_opens_at_its_own_default_slice_and_volume(scans, tmp_path):
    """Slice 20 of volume 2 of a NIfTI, then a single-frame DICOM: the upload must not apply the last
    scan's slice and volume to the new file (it refused it: "frame 20 out of range")."""
    page = Page(FakeController(), tmp_path)
    page.upload(scans / NIFTI_4D)
    assert page["image-note"].startswith("Loaded nifti, axial slice 12 (of 0–23), volume 0 (of 0–1)")
    page["slice"], page["volume"] = 20, 1
    page.event("slice", "submit")
    assert page["image-note"].startswith("Loaded nifti, axial slice 20 (of 0–23), volume 1 (of 0–1)")
    page.upload(scans / "ct.dcm")
    assert page["image-note"].startswith("Loaded dicom, CT") and page["preview"] is not None, page["image-note"]
    assert (page["slice"], page["volume"]) == (-1, 0)  # the boxes say which view is shown


@pytest.mark.parametrize("name", ["IM000001", "1.2.840.113619.2.55.3.604688119.969.1268071029.320"])
def test_a_dicom_file_named_as_a_pacs_or_cd_names_it_loads(scans, tmp_path, name):
    """DICOM files exported from a PACS or a CD often have no .dcm extension: the content says what it is."""
    page = Page(FakeController(), tmp_path)
    page.upload(scans / "ct.dcm", name)
    assert page["image-note"].startswith("Loaded dicom, CT") and page["preview"] is not None
    page.upload(scans / "ct.dcm", "notes.txt.dcm.txt")
    assert page["image-note"].startswith("Loaded dicom, CT")


def test_a_file_that_is_no_image_is_refused_with_the_reason(tmp_path):
    (tmp_path / "notes.txt").write_text("Patient: Doe, John\n")
    page = Page(FakeController(), tmp_path / "uploads")
    (tmp_path / "uploads").mkdir()
    page.upload(tmp_path / "notes.txt")
    assert page["image-note"].startswith("⚠️ could not read the image: not a recognised image") and page["preview"] is None
    assert not list((tmp_path / "uploads").rglob("notes.txt"))  # Gradio's copy is deleted all the same


def test_a_question_is_refused_while_the_slice_box_is_not_applied(scans, tmp_path):
    """A slice typed without Enter is not shown: a question then would be answered about another slice
    than the box says. It is refused with the reason, and the question is kept."""
    controller = FakeController()
    page = Page(controller, tmp_path)
    page.upload(scans / NIFTI_4D)
    page["slice"], page["question"] = 20, "Where is the lesion?"
    error = page.event("send", "click")
    assert error is not None and "press Enter" in str(error) and not controller.bodies
    assert not error.print_exception  # a refusal, not a traceback in the server's log
    assert page["question"] == "Where is the lesion?" and page["chat"] == []
    page.event("slice", "submit")
    assert "axial slice 20 (of 0–23)" in page["image-note"]
    assert page.event("send", "click") is None and page["chat"][-1]["content"] == "answer 1"
    sent = image_from_data_url(controller.bodies[0]["image"], 20 << 20).image
    slice_20 = decode_image((scans / NIFTI_4D).read_bytes(), slice_index=20).image
    assert np.array_equal(np.asarray(sent), np.asarray(slice_20))


def test_a_question_is_refused_while_the_upload_is_not_shown(scans, tmp_path):
    """Volume 3 of a 2-volume NIfTI is refused, and nothing is shown: a question then would be answered
    about no image at all. Clearing the file (a text-only chat) or another view lets it through."""
    controller = FakeController()
    page = Page(controller, tmp_path)
    page.upload(scans / NIFTI_4D)
    page["volume"], page["question"] = 3, "Where is the lesion?"
    page.event("volume", "submit")
    assert "volume 3 out of range" in page["image-note"] and page["preview"] is None
    error = page.event("question", "submit")
    assert error is not None and "not shown" in str(error) and not controller.bodies and not error.print_exception
    assert page["question"] == "Where is the lesion?"
    page["volume"] = 1
    page.event("volume", "submit")
    assert page.event("question", "submit") is None and controller.bodies[0]["image"]
    page["upload"] = None  # the file cleared: a question without an image
    page.event("upload", "change")
    page["question"] = "What is a glioma?"
    assert page.event("question", "submit") is None and controller.bodies[1]["image"] is None


def test_what_the_user_types_while_an_answer_streams_is_kept(scans, tmp_path):
    controller = FakeController()
    page = Page(controller, tmp_path)
    page.upload(scans / "ct.dcm")
    page["question"] = "Where is the lesion?"

    def typing():
        page["question"] = "And how large is it?"

    assert page.event("send", "click", typing) is None
    assert page["question"] == "And how large is it?"
    assert [m["content"] for m in page["chat"] if m["role"] == "user"] == ["Where is the lesion?"]
    assert page["chat"][-1]["content"] == "answer 1"
    assert page.event("question", "submit") is None  # the next question, in the same conversation
    assert controller.bodies[1]["question"] == "And how large is it?" and page["question"] == ""
    assert [m["content"] for m in controller.bodies[1]["history"]] == ["Where is the lesion?", "answer 1"]
    assert controller.bodies[1]["conversation_id"] == controller.bodies[0]["conversation_id"]


def test_the_preview_is_sent_once_per_question_not_with_each_piece_of_the_answer(scans, tmp_path):
    """Gradio rewrites the preview's file each time it is sent, under a browser reading it (a torn image,
    a traceback in the log): an answer streamed in pieces sends it once, as the question goes."""
    page = Page(FakeController(), tmp_path)
    page.upload(scans / "ct.dcm")
    before = page.sent[page.ids["preview"]]
    page["question"] = "Where is the lesion?"
    assert page.event("send", "click") is None and page["chat"][-1]["content"] == "answer 1"
    assert page.sent[page.ids["preview"]] - before == 1


def run_cli(monkeypatch, controller, argv, typed=()):
    """``python serve/cli.py --controller ... ARGV`` with ``typed`` at its prompt ("^C": Ctrl-C there)."""
    monkeypatch.setattr(cli, "make_client", lambda *a, **k: httpx.Client(transport=httpx.MockTransport(controller)))
    lines = iter(typed)

    def typing(prompt=""):
        line = next(lines, None)
        if line is None:
            raise EOFError
        if line == "^C":
            raise KeyboardInterrupt
        return line

    monkeypatch.setattr("builtins.input", typing)
    monkeypatch.delenv("MMEDAGENT_API_KEY", raising=False)
    return cli.main(["--controller", "http://controller", *argv])


def test_cli_ctrl_c_stops_the_answer_and_keeps_the_conversation(monkeypatch, capsys):
    controller = FakeController(interrupt={"Segment it."})
    rc = run_cli(monkeypatch, controller, [], ["Where is the tumor?", "Segment it.", "How large is it?", "/quit"])
    assert rc == 0
    assert [b["question"] for b in controller.bodies] == ["Where is the tumor?", "Segment it.", "How large is it?"]
    # the third question goes on from the first answer, in the same conversation
    assert [m["content"] for m in controller.bodies[2]["history"]] == ["Where is the tumor?", "answer 1"]
    assert len({b["conversation_id"] for b in controller.bodies}) == 1
    out = capsys.readouterr()
    assert "answer: answer 3" in out.out and "answer stopped" in out.err


def test_cli_ctrl_c_at_the_prompt_or_in_one_shot_mode_exits(monkeypatch, capsys):
    assert run_cli(monkeypatch, FakeController(), [], ["Where is the tumor?", "^C"]) == 130
    assert run_cli(monkeypatch, FakeController(interrupt={"Q"}), ["-q", "Q"]) == 130
    assert "answer: answer 1" in capsys.readouterr().out
    # while it waits for a slow controller's banner: no traceback either
    assert run_cli(monkeypatch, FakeController(interrupt={"banner"}), ["-q", "Q"]) == 130


def test_cli_sends_the_view_of_a_local_scan_over_the_upload_limit(monkeypatch, scans, tmp_path, capsys):
    """A CT series is often larger than the servers' upload limit; the CLI reads it here and sends only
    the slice's PNG, which is what the limit bounds."""
    (tmp_path / "serve.yaml").write_text("max_upload_mb: 0.1\n")  # 100 KB: under the file, over its slice's PNG
    assert (scans / "ct.nii").stat().st_size > 0.1 * 2**20
    controller = FakeController()
    rc = run_cli(monkeypatch, controller, ["--config", str(tmp_path / "serve.yaml"), "--image", str(scans / "ct.nii"),
                                           "--slice", "7", "-q", "Where is the tumor?"])
    assert rc == 0, capsys.readouterr().err
    assert "axial slice 7 (of 0–39)" in capsys.readouterr().err
    sent = image_from_data_url(controller.bodies[0]["image"], 2**20).image
    slice_7 = decode_image((scans / "ct.nii").read_bytes(), slice_index=7).image
    assert np.array_equal(np.asarray(sent), np.asarray(slice_7))


def test_cli_refuses_a_view_whose_png_is_over_the_upload_limit(monkeypatch, scans, tmp_path, capsys):
    (tmp_path / "serve.yaml").write_text("max_upload_mb: 0.001\n")
    controller = FakeController()
    rc = run_cli(monkeypatch, controller, ["--config", str(tmp_path / "serve.yaml"), "--image", str(scans / "ct.nii"),
                                           "-q", "Where is the tumor?"])
    assert rc == 2 and not controller.bodies
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "more than its upload limit" in err[0] and "max_upload_mb" in err[0]


class MalformedMaskController(FakeController):
    """A segmentation step whose mask is malformed (its RLE covers no pixel), then the answer."""

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/status":
            return super().__call__(request)
        body = json.loads(request.content)
        self.bodies.append(body)
        step = {"index": 0, "thoughts": "Segment it.", "actions": [{"API_name": "segmentation", "API_params": {}}],
                "outcomes": [{"ok": True, "tool": "segmentation", "output": {"masks": 1}, "elapsed_s": 0.1, "error": None}],
                "overlays": [{"masks": [{"size": [10, 10], "counts": ""}]}], "value": "", "parse_error": None}
        good = {**step, "index": 1, "overlays": [{"boxes": [[0.1, 0.1, 0.5, 0.5]], "labels": ["lesion"]}]}
        events = [{"type": "step", "step": step}, {"type": "step", "step": good},
                  {"type": "answer", "answer": "It is in the upper left.", "history": [], "stopped": "answer"}]
        return httpx.Response(200, text="".join(json.dumps(e) + "\n" for e in events))


def test_an_overlay_that_cannot_be_drawn_is_a_note_and_the_answer_still_shows(scans, tmp_path):
    page = Page(MalformedMaskController(), tmp_path)
    page.upload(scans / "ct.dcm")
    before = page["preview"]
    page["question"] = "Where is the lesion?"
    assert page.event("send", "click") is None
    contents = [m["content"] for m in page["chat"]]
    assert contents[-1] == "It is in the upper left."
    notes = [c for c in contents if "could not be drawn" in c]
    assert notes == ["This step's boxes or masks could not be drawn on the image: "
                     "RLE counts cover 0 pixels, expected 10x10=100"]
    assert not np.array_equal(np.asarray(page["preview"]), np.asarray(before))  # the next step's box is drawn


def test_the_upload_box_is_a_plain_file_box_and_writes_nothing_beside_the_package():
    import gradio as gr

    from mmedagent.serve import web

    box = web.upload_box(label="Image")
    assert type(box) is gr.File  # a subclass would make Gradio write a .pyi stub beside serve/web.py
    assert not Path(web.__file__).with_suffix(".pyi").exists()
    with pytest.raises(TypeError, match="takes no file_count, file_types"):  # it would not apply them
        web.upload_box(label="Image", file_types=[".png"], file_count="multiple")


def test_a_scan_flagged_as_showing_burned_in_text_is_shown_with_the_warning(scans, tmp_path, monkeypatch, capsys):
    """A DICOM whose BurnedInAnnotation is YES may show the patient's name in its pixels: the web UI's
    note and the terminal chat say so when the scan is loaded."""
    import pydicom

    ds = pydicom.dcmread(scans / "ct.dcm")
    ds.BurnedInAnnotation = "YES"
    ds.save_as(tmp_path / "burned.dcm")
    page = Page(FakeController(), tmp_path)
    page.upload(tmp_path / "burned.dcm")
    assert page["image-note"].startswith("Loaded dicom, CT") and "patient-identifying text" in page["image-note"]
    page.upload(scans / "ct.dcm")
    assert "⚠️" not in page["image-note"]

    assert run_cli(monkeypatch, FakeController(), ["--image", str(tmp_path / "burned.dcm"), "-q", "Where?"]) == 0
    err = capsys.readouterr().err
    assert "image: dicom, CT" in err and "warning: BurnedInAnnotation is YES" in err


def test_another_window_or_plane_without_a_scan_keeps_the_conversation(tmp_path):
    """A chat without an image ("What is a glioma?"): touching the window or plane box shows nothing new,
    so the conversation stays, on screen and for the next question."""
    controller = FakeController()
    page = Page(controller, tmp_path)
    page["question"] = "What is a glioma?"
    assert page.event("send", "click") is None and page["chat"][-1]["content"] == "answer 1"
    chat = page["chat"]
    page["window"] = "lung"
    page.event("window", "change")
    page["plane"], page["slice"] = "coronal", 3
    page.event("plane", "change")
    page.event("slice", "submit")
    assert page["chat"] == chat
    page["question"] = "How is it graded?"
    assert page.event("send", "click") is None
    assert [m["content"] for m in controller.bodies[1]["history"]] == ["What is a glioma?", "answer 1"]
    assert controller.bodies[1]["conversation_id"] == controller.bodies[0]["conversation_id"]


def test_the_slice_box_counts_frames_from_0_and_minus_1_is_the_middle_one(tmp_path, monkeypatch, capsys):
    """A 30-frame ultrasound: -1 shows the middle frame, as the box's label says, on the page and in the CLI."""
    scan = Path(get_testdata_file("examples_ybr_color.dcm"))
    page = Page(FakeController(), tmp_path / "uploads")
    (tmp_path / "uploads").mkdir()
    label = page.ui.blocks[page.ids["slice"]].label
    assert "-1: middle" in label and "first" not in label and "from 0" in label
    page.upload(scan)
    assert page["image-note"].startswith("Loaded dicom, US, frame 15 (of 0–29)")
    page["slice"] = 0
    page.event("slice", "submit")
    assert page["image-note"].startswith("Loaded dicom, US, frame 0 (of 0–29)")
    assert run_cli(monkeypatch, FakeController(), ["--image", str(scan), "--slice", "-1", "-q", "Where?"]) == 0
    assert "image: dicom, US, frame 15 (of 0–29)" in capsys.readouterr().err


def test_a_question_over_the_servers_limit_is_refused_and_kept_in_its_box(tmp_path):
    from mmedagent.serve.messages import MAX_QUESTION_CHARS

    controller = FakeController()
    page = Page(controller, tmp_path)
    page["question"] = pasted = "Findings: " + "x" * MAX_QUESTION_CHARS
    error = page.event("question", "submit")
    assert error is not None and f"{len(pasted):,} characters" in str(error) and not error.print_exception
    assert page["question"] == pasted and page["chat"] == [] and not controller.bodies


def test_the_streamed_turn_shows_the_steps_icons_not_the_formats_keys():
    """The model's text as it streams is its turn format ("thoughts🤔" ...): a reader sees the icons of the
    bubbles it becomes."""
    from mmedagent.protocol import MARKS
    from mmedagent.serve.web import WebChat

    turn = '"thoughts🤔" I can answer.\n"actions🚀" []\n"value👉" It is a CT.'
    events = [{"type": "token", "text": piece} for piece in re.split(r"(?= )", turn)]  # word by word
    events.append({"type": "answer", "answer": "It is a CT.", "history": [], "stopped": "answer"})
    web = WebChat("http://controller", None, 1 << 20)
    web.client = httpx.Client(transport=httpx.MockTransport(
        lambda request: httpx.Response(200, text="".join(json.dumps(e) + "\n" for e in events))))
    shown = [update[0][-1]["content"] for update in web.respond("What is it?", [], [], None, None)]
    assert "💭 I can answer.\n🛠️ []\n👉 It is a CT." in shown and shown[-1] == "It is a CT."
    assert not any(mark in text for text in shown for mark in MARKS)


class UnreachableController(FakeController):
    """A controller whose ``/chat`` cannot be reached for the questions in ``down`` (restarting)."""

    def __init__(self, down=()):
        super().__init__()
        self.down = set(down)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/chat" and json.loads(request.content)["question"] in self.down:
            raise httpx.ConnectError("connection refused", request=request)
        return super().__call__(request)


def test_cli_an_unreachable_controller_ends_a_one_shot_question_but_not_a_conversation(monkeypatch, capsys):
    controller = UnreachableController(down={"Segment it."})
    rc = run_cli(monkeypatch, controller, [], ["Where is the tumor?", "Segment it.", "How large is it?", "/quit"])
    assert rc == 0
    assert [b["question"] for b in controller.bodies] == ["Where is the tumor?", "How large is it?"]
    assert [m["content"] for m in controller.bodies[1]["history"]] == ["Where is the tumor?", "answer 1"]
    assert "unreachable: ConnectError" in capsys.readouterr().err
    assert run_cli(monkeypatch, UnreachableController(down={"Q"}), ["-q", "Q"]) == 1


def test_cli_an_empty_one_shot_question_is_refused_without_waiting_for_input(monkeypatch, capsys):
    """``-q "$QUESTION"`` with an empty variable in a script: an error, not an interactive chat waiting on stdin."""
    controller = FakeController()
    with pytest.raises(SystemExit) as stop:
        run_cli(monkeypatch, controller, ["-q", "  "], ["Where is the tumor?"])
    assert stop.value.code == 2 and not controller.bodies
    assert "the question (-q) is empty" in capsys.readouterr().err


class KeyedController(FakeController):
    """A controller started with an API key, asked without it."""

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/chat":
            self.bodies.append(json.loads(request.content))
        return httpx.Response(401, json={"detail": "missing or wrong API key"})


def test_cli_without_the_controllers_api_key_says_how_to_give_it(monkeypatch, capsys):
    controller = KeyedController()
    assert run_cli(monkeypatch, controller, [], ["Where is the tumor?", "/quit"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing or wrong API key" in err[0] and "--api-key or MMEDAGENT_API_KEY" in err[0]
    assert not controller.bodies  # said before the first question, not after each one
