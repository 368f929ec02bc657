"""Terminal chat with a running controller, for SSH users.

    python serve/cli.py --image scan.dcm                 # interactive: one question per line
    python serve/cli.py --image scan.png -q "Where is the lesion?"   # one question, then exit

Each step is printed as it happens: thought, tool calls, tool results, answer. In the interactive chat,
Ctrl-C stops the answer being printed and keeps the conversation; at the prompt it (or /quit) exits.
Exit status: 0 done, 1 the server refused or failed the question (or is unreachable), 2 the image or a flag
cannot be used, 130 Ctrl-C.
"""

if __name__ == "__main__":  # run as a script: serve/ must not shadow installed packages
    import os as _os
    import sys as _sys

    _here = _os.path.dirname(_os.path.abspath(__file__))
    _sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or ".") != _here]

import argparse
import json
import sys
import uuid
from pathlib import Path
from typing import Any, TextIO

import mmedagent  # noqa: F401  - arms the torchvision shim first
import httpx

from mmedagent.serve.config import API_KEY_ENV, ServeConfig, add_common_args, config_or_exit
from mmedagent.serve.httpclient import error_detail, make_client
from mmedagent.serve.messages import stop_note
from mmedagent.imaging import describe_view, parse_window
from mmedagent.serve.uploads import decode_image, png_data_url, sendable_png


def print_step(step: dict[str, Any], out: TextIO) -> None:
    if step.get("thoughts"):
        out.write(f"  thought: {step['thoughts']}\n")
    if step.get("parse_error"):
        out.write(f"  (unreadable model turn: {step['parse_error']})\n")
    for action, outcome in zip(step["actions"], step["outcomes"] or [None] * len(step["actions"])):
        params = {k: v for k, v in action["API_params"].items() if k != "image"}
        out.write(f"  tool call: {action['API_name']} {json.dumps(params, ensure_ascii=False)}\n")
        if outcome is not None:
            if outcome["ok"]:
                out.write(f"  tool result: {json.dumps(outcome['output'], ensure_ascii=False)} ({outcome['elapsed_s']:.2f} s)\n")
            else:
                out.write(f"  tool error: {outcome['error']}\n")
    out.flush()


def plain_banner(status: dict[str, Any]) -> str:
    """The web UI's banner (model, its warning note, tool weights, "not a medical device") as plain text."""
    from mmedagent.serve.web import banner

    lines = []
    for line in banner(status).replace("**", "").replace("`", "").splitlines():
        line = line.removeprefix("> ")
        lines.append(line[1:-1] if len(line) > 1 and line[0] == line[-1] == "_" else line)
    return "\n".join(lines)


def ask(client: httpx.Client, url: str, body: dict[str, Any], out: TextIO) -> list[dict[str, str]] | None:
    """Send one question; print the steps and the answer; return the history for the next one."""
    with client.stream("POST", f"{url}/chat", json=body) as r:
        if r.status_code != 200:
            r.read()
            out.write(f"error: {error_detail(r)}\n")
            return None
        for line in r.iter_lines():
            if not line:
                continue
            event = json.loads(line)
            if event["type"] == "step":
                print_step(event["step"], out)
            elif event["type"] == "answer":
                if note := stop_note(event["stopped"]):
                    out.write(f"  ({note})\n")
                out.write(f"answer: {event['answer']}\n")
                out.flush()
                return event["history"]
            elif event["type"] == "error":
                out.write(f"error: {event['error']}\n")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", help="PNG, JPEG, DICOM or NIfTI file (read here, sent as bytes)")
    parser.add_argument("-q", "--question", help="ask this one question and exit")
    parser.add_argument("--controller", default=None, help="controller URL (default from config)")
    parser.add_argument("--model", default=None, help="model to ask, by name (default: the first one served)")
    view = parser.add_argument_group("scan view (DICOM, NIfTI)")
    view.add_argument("--window", default=None, help="display window: a preset (brain, lung, abdomen, bone, ...) "
                      "or CENTER,WIDTH in the scan's units (default: the file's own, else from the values)")
    view.add_argument("--slice", type=int, default=None, help="NIfTI slice or multi-frame image frame, counted from 0 "
                      "(default or -1: the middle one)")
    view.add_argument("--plane", choices=("axial", "coronal", "sagittal"), default="axial", help="NIfTI slice plane")
    view.add_argument("--volume", type=int, default=0, help="volume of a 4-D NIfTI (default 0)")
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.question is not None and not args.question.strip():
        parser.error("the question (-q) is empty")
    cfg = config_or_exit(parser, args.config, api_key=args.api_key)
    try:
        return chat(args, cfg)
    except KeyboardInterrupt:  # at the prompt, in one-shot mode, or while the image loads
        print(file=sys.stderr)  # the shell's prompt on a line of its own
        return 130


def chat(args: argparse.Namespace, cfg: ServeConfig) -> int:
    """Load the image, show the banner, then ask (``-q``) or read questions; the exit status."""
    url = (args.controller or cfg.controller_url).rstrip("/")
    image = None
    if args.image:
        try:
            window = parse_window(args.window) if args.window else None
            # the file stays here (a whole CT series may be far over the servers' upload limit); only the
            # view's PNG is sent, and sendable_png holds that to the limit
            slice_index = None if args.slice is None or args.slice < 0 else args.slice  # -1: the middle one
            med = decode_image(Path(args.image).read_bytes(), window=window, slice_index=slice_index, plane=args.plane,
                               volume=args.volume)
            image = med.image
            sendable_png(image, cfg.max_upload_bytes)
        except (OSError, ValueError) as e:  # UploadError is a ValueError
            print(f"cannot use {args.image}: {getattr(e, 'reason', e)}", file=sys.stderr)
            return 2
    client = make_client(cfg.api_key, cfg.model_timeout_s)
    try:  # what is answering, and its warnings (the demo planner's made-up answers), as the web UI shows
        status = client.get(f"{url}/v1/status", timeout=10)
        if status.status_code == 200:
            print(plain_banner(status.json()) + "\n", file=sys.stderr, flush=True)
        elif status.status_code == 401:  # every question would be refused
            print(f"error: {error_detail(status)}: the controller wants its API key (--api-key or {API_KEY_ENV})",
                  file=sys.stderr)
            return 1
    except httpx.HTTPError:
        pass  # an unreachable controller is reported with the first question
    if image is not None:  # after the banner, as docs/serve.md shows
        print(f"image: {describe_view(med.metadata)} (--slice, --plane, --volume, --window choose another view)",
              *(f"warning: {w}" for w in med.warnings), sep="\n", file=sys.stderr)
    body: dict[str, Any] = {"conversation_id": uuid.uuid4().hex, "history": [], "model": args.model,
                            "image": png_data_url(image) if image is not None else None}
    questions = [args.question] if args.question else None
    while True:
        if questions is not None:
            if not questions:
                return 0
            question = questions.pop(0)
        else:
            try:
                question = input("you> ").strip()
            except EOFError:
                return 0
            if question in ("", "/quit", "/exit"):
                if question:
                    return 0
                continue
        try:
            history = ask(client, url, {**body, "question": question}, sys.stdout)
        except httpx.HTTPError as e:
            print(f"controller {url} unreachable: {type(e).__name__}", file=sys.stderr)
            if questions is not None:
                return 1
            print("(the conversation goes on: ask again once it is back, or /quit)", file=sys.stderr)
            continue
        except KeyboardInterrupt:  # interactive: Ctrl-C stops this answer, not the conversation
            if questions is not None:
                raise
            print("\n(answer stopped; the conversation goes on without it: ask again, or /quit)", file=sys.stderr)
            continue
        if history is None and questions is not None:
            return 1
        if history is not None:
            body["history"] = history


if __name__ == "__main__":
    sys.exit(main())
