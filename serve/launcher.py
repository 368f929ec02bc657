"""The one command: controller in this process, model worker, tool workers and web UI as children.

Children get the API key through the environment (never on a command line, which ``ps`` shows),
register with the controller once loaded, are restarted if they die after starting, and are
stopped when the controller stops (Ctrl-C).
Tools without configured options get the demo stack's weights when ``tool_weights`` is ``demo``
(:func:`resolve_tool_specs`). The ready line waits for the model and every tool except
background ones (retrieval, whose first start builds its index), which register when loaded.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import uvicorn

from mmedagent.serve.config import API_KEY_ENV, ServeConfig, ToolSpec, is_loopback
from mmedagent.serve.controller import Controller, build_app, is_background, tool_specs
from mmedagent.serve.worker_base import (BACKEND_URL_ENV, EXIT_CANNOT_LOAD, EXIT_REFUSED, LAUNCHER_PID_ENV, TOOL_OPTIONS_ENV,
                                         bind_socket, http_server, interrupt, url_for)
from mmedagent.tools import Tool
from mmedagent.tools.grounding_segmentation import share_composite_parts

log = logging.getLogger("mmedagent.serve.launcher")
SERVE_DIR = Path(__file__).resolve().parent


COMPOSITE = "grounding_segmentation"
COMPOSITE_PARTS = ("grounding", "segmentation")


def _demo_options(names: set[str], cache_dir: str | None) -> dict[str, dict]:
    """Demo options for ``names``; the tiny weights are built (once) only if one of them needs them,
    under ``cache_dir/demo-tools`` when the config sets a cache folder (else ``$MMEDAGENT_CACHE``)."""
    from mmedagent import demo_tools

    if not names & demo_tools.TINY_TOOLS:
        return {n: {} for n in names & set(demo_tools.WEIGHTS_NOTES)}
    try:
        return demo_tools.demo_tool_options(Path(cache_dir) / "demo-tools" if cache_dir else None)
    except OSError as e:  # an unwritable cache: the tools would fall back to published weights and fail, one by one
        raise SystemExit(f"error: cannot build the demo tool weights in the cache ({e.strerror or type(e).__name__}: "
                         f"{e.filename}); set cache_dir in the config, or MMEDAGENT_CACHE, to a writable folder") from None
    except Exception as e:  # e.g. a tools extra not installed: those tools then fail to start, visibly
        log.error("could not build the demo tool weights: %s: %s", type(e).__name__, e)
        return {}


def resolve_tool_specs(cfg: ServeConfig) -> dict[str, ToolSpec]:
    """The tool specs the launcher starts: names made canonical, and options filled in.

    With ``tool_weights`` ``demo``, every built-in tool whose options are empty gets the demo
    weights (:func:`mmedagent.demo_tools.demo_tool_options`, built once) and their label; on a
    head node (``no_workers``) only in-process tools do, since workers elsewhere bring their own.
    The composite ``grounding_segmentation`` without options uses the options of its two parts
    (configured, else demo), so it loads the same weights as they do.
    """
    from mmedagent.demo_tools import weights_note
    from mmedagent.tools import UnknownToolError, get_tool

    specs: dict[str, ToolSpec] = {}
    for name, spec in tool_specs(cfg).items():
        try:
            name = get_tool(name).name
        except UnknownToolError:
            pass  # its worker reports the unknown name and the ready line lists it as failed
        specs[name] = spec.model_copy(deep=True)
    unset = {n for n, s in specs.items() if not s.options and (s.in_process or not cfg.no_workers)}
    demo = _demo_options(unset, cfg.cache_dir) if unset and cfg.effective_tool_weights == "demo" else {}
    for name in unset - {COMPOSITE}:
        if name in demo:
            specs[name].options = dict(demo[name])
            specs[name].weights_label = specs[name].weights_label or weights_note(name)
    if COMPOSITE in unset:
        composite, parts, from_demo = specs[COMPOSITE], {}, []
        for part in COMPOSITE_PARTS:
            configured = part in specs and part not in unset
            parts[part] = dict(specs[part].options) if configured else dict(demo.get(part, {}))
            if not configured and part in demo:
                from_demo.append(part)
        if any(parts.values()):
            composite.options = parts
        if from_demo and composite.weights_label is None:
            whole = len(from_demo) == len(COMPOSITE_PARTS)
            composite.weights_label = weights_note(COMPOSITE) if whole else f"{from_demo[0]}: {weights_note(from_demo[0])}"
    return specs


def in_process_tools(classes: Sequence[type[Tool]], options: Mapping[str, dict[str, Any]],
                     weights: Literal["demo", "default"]) -> list[Tool]:
    """Instances of ``classes`` for an in-process run (evaluation, data building) with the server's
    option rule (:func:`resolve_tool_specs`): the given ``options`` (keyed by name or alias), else
    ``weights``; the composite takes its parts' options. A failed demo-weights build raises (the
    server stops on an unwritable cache only): such a run must not go on with other weights."""
    if weights == "demo":
        from mmedagent.demo_tools import demo_tool_options

        demo_tool_options()  # built once (then reused below), or the error
    named = {**{cls.name: {} for cls in classes}, **options}
    specs = resolve_tool_specs(ServeConfig(
        tool_weights=weights, tools={name: ToolSpec(options=opts, in_process=True) for name, opts in named.items()},
    ))
    tools = [cls(**specs[cls.name].options) for cls in classes]
    share_composite_parts(tools)
    return tools


RESTART_MIN_UPTIME_S = 10.0
"""A child that dies after running this long is restarted (a model worker killed for memory, say);
one that dies sooner is failing to start, and is reported instead."""
RESTART_LIMIT = (3, 600.0)
"""At most this many restarts of one child within this many seconds; then it is reported instead."""
_STOPPED = (0, -signal.SIGINT, -signal.SIGTERM)  # exit statuses of a child stopped on purpose (Ctrl-C reaches it too)


class Child:
    def __init__(self, label: str, argv: list[str], env: dict[str, str]):
        self.label, self.argv, self.env = label, argv, env
        self.restarts: list[float] = []  # when it was restarted (monotonic)
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, env=self.env, stdin=subprocess.DEVNULL)
        self.started, self.reported = time.monotonic(), False

    def restart_refusal(self) -> str | None:
        """Why this exited child is not to be restarted (None: restart it)."""
        code, now = self.proc.returncode, time.monotonic()
        if code in _STOPPED:
            return "was stopped"
        if code == EXIT_CANNOT_LOAD:
            return "could not load its model or tool"
        if code == EXIT_REFUSED:
            return "was refused by the controller (its tool's name or an alias is another tool's)"
        if now - self.started < RESTART_MIN_UPTIME_S:
            return "failed while starting"
        count, window = RESTART_LIMIT
        self.restarts = [t for t in self.restarts if now - t < window] + [now]
        if len(self.restarts) > count:
            return f"was restarted {count} times in {window / 60:.0f} minutes"
        return None


def stop_children(children: Sequence[Child], grace_s: float = 5.0) -> None:
    """SIGTERM to every child at once, then SIGKILL to those still running after ``grace_s``."""
    running = [c for c in children if c.proc.poll() is None]
    for child in running:
        child.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for child in running:
        try:
            child.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %g s of SIGTERM; killing it", child.label, grace_s)
            child.proc.kill()
            try:
                child.proc.wait(5)
            except subprocess.TimeoutExpired:  # stuck in the kernel: the others are still stopped
                log.error("%s (pid %d) did not die of SIGKILL within 5 s", child.label, child.proc.pid)


class Launcher:
    def __init__(self, cfg: ServeConfig, config_path: str | None = None):
        self.cfg, self.config_path = cfg, config_path
        self.children: list[Child] = []
        self.in_process: list[str] = []
        self.stopping = threading.Event()
        self._children_lock = threading.Lock()  # no restart once stopping has begun
        self.server: uvicorn.Server | None = None

    def _script(self, name: str, *args: str) -> list[str]:
        argv = [sys.executable, str(SERVE_DIR / name)]
        if self.config_path:
            argv += ["--config", self.config_path]
        return argv + ["--log-level", self.cfg.log_level, *args]

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop(API_KEY_ENV, None)
        if self.cfg.api_key:
            env[API_KEY_ENV] = self.cfg.api_key
        env[LAUNCHER_PID_ENV] = str(os.getpid())  # they stop if this process dies without stopping them
        return env

    def _spawn(self, label: str, argv: list[str], **env: str) -> None:
        self.children.append(Child(label, argv, {**self._env(), **env}))

    def start_children(self, controller_url: str, web_port: int | None) -> list[str]:
        """Start the workers and the UI; returns the tool names expected to register."""
        cfg = self.cfg
        common = ["--controller", controller_url, "--heartbeat-interval", str(cfg.heartbeat_interval_s)]
        # flags win over the config file the children read: the controller's effective values go with them
        upload = ["--max-upload-mb", str(cfg.max_upload_mb)]
        limits = ["--max-connections", str(cfg.max_connections), "--request-read-timeout", str(cfg.request_read_timeout_s)]
        expected: list[str] = []
        if not cfg.no_workers:
            model_args = []
            for flag, value in (("--model-path", cfg.model_path), ("--model-base", cfg.model_base), ("--model-name", cfg.model_name),
                                ("--conv-template", cfg.conv_template), ("--device", cfg.device), ("--dtype", cfg.dtype),
                                ("--system-prompt", cfg.system_prompt), ("--backend-model", cfg.model_backend_model)):
                if value:
                    model_args += [flag, value]
            if cfg.prompt_lookup:
                model_args += ["--prompt-lookup", str(cfg.prompt_lookup)]
            if cfg.constrain is not None:
                model_args.append("--constrain" if cfg.constrain else "--no-constrain")
            # the URL may hold credentials (user:password@host, a token in its query): not on a command line (ps)
            backend = {BACKEND_URL_ENV: cfg.model_backend_url} if cfg.model_backend_url else {}
            self._spawn("model worker", self._script("model_worker.py", *common, *model_args, *upload, *limits), **backend)
            tool_settings = ["--tool-timeout", str(cfg.tool_timeout_s), *upload, *limits]
            for name, spec in tool_specs(cfg).items():
                if spec.in_process:
                    continue
                for _ in range(spec.workers):
                    plugins = [a for p in cfg.plugins for a in ("--plugin", p)]
                    argv = self._script("tool_worker.py", "--tool", name, *plugins, *common, *tool_settings)
                    # options may hold a plug-in's credentials: in the environment, not on a command line (ps)
                    self._spawn(f"tool worker {name}", argv, **{TOOL_OPTIONS_ENV: json.dumps(spec.options)})
                expected.append(name)
        if web_port is not None:
            self._spawn("web UI", self._script("web.py", "--controller", controller_url, "--host", cfg.host, "--port", str(web_port),
                                               *upload))
        return expected

    def _watch(self, ctl: Controller, expected: list[str], web_url: str | None, loaders: dict[str, threading.Thread]) -> None:
        """Say when the stack is ready (background tools aside), then when each background tool
        registers or fails; keep the controller's list of loading tools current; restart children
        that die after starting, report those that fail to start."""
        ready = False
        specs = tool_specs(self.cfg)
        pending_bg = {n for n in [*expected, *self.in_process] if is_background(n, specs[n])}
        while not self.stopping.wait(0.5):
            self._tend_children()
            alive = {c.label for c in self.children if c.proc.poll() is None}
            tools = ctl.available_tools()
            loading = {n for n in expected if n not in tools and f"tool worker {n}" in alive}
            loading |= {n for n in self.in_process if n not in tools and loaders[n].is_alive()}
            ctl.loading = sorted(loading)
            if not ready:
                models = ctl.model_names()
                model_pending = not self.cfg.no_workers and not models and "model worker" in alive
                if model_pending or loading - pending_bg:
                    continue
                ready = True
                failed = [n for n in [*expected, *self.in_process] if n not in tools and n not in loading]
                ctl.failed.update(n for n in failed if n not in self.in_process)
                line = f"ready: models: {', '.join(models) or '(none)'}; tools: {', '.join(tools) or '(none)'}"
                if loading:
                    line += f"; loading: {', '.join(sorted(loading))} (registers when ready)"
                if failed:
                    line += f"; failed to start: {', '.join(failed)}"
                if web_url:
                    line += f"; chat at {web_url}"
                print(line, flush=True)
                pending_bg &= loading
                continue
            for name in sorted(pending_bg - loading):
                print(f"tool {name} {'ready' if name in tools else 'failed to start'}", flush=True)
                if name not in tools and name not in self.in_process:
                    ctl.failed.add(name)
                pending_bg.discard(name)

    def _tend_children(self) -> None:
        with self._children_lock:
            for child in self.children:
                code = child.proc.poll()
                shutting_down = self.stopping.is_set() or (self.server is not None and self.server.should_exit)
                if code is None or child.reported or shutting_down:
                    continue
                refusal = child.restart_refusal()
                if refusal is None:
                    log.error("%s exited with code %s (see its log above); restarting it", child.label, code)
                    child.start()
                else:
                    child.reported = True
                    log.error("%s exited with code %s: it %s, so it is not restarted (see its log above)",
                              child.label, code, refusal)

    def run(self) -> None:
        cfg = self.cfg
        ctl = Controller(cfg)
        app = build_app(ctl)
        sock = bind_socket(cfg.host, cfg.port)
        url = url_for(sock)
        web_port = None
        if cfg.web_port is not None:  # a port in use is one line now, not a failing web UI later; 0: pick one to print
            probe = bind_socket(cfg.host, cfg.web_port, "--web-port")
            web_port = probe.getsockname()[1]
            probe.close()
        cfg.tools = resolve_tool_specs(cfg)  # may build the demo tool weights (once, ~10 s)
        in_process = {n: s for n, s in cfg.tools.items() if s.in_process}
        self.in_process = list(in_process)
        if threading.current_thread() is threading.main_thread():
            # uvicorn shuts down gracefully on SIGTERM, then raises it again; by default that would end this
            # process before the workers are stopped. Handled like Ctrl-C instead, from the first child on.
            signal.signal(signal.SIGTERM, interrupt)
        try:
            expected = self.start_children(url, web_port)
            web_url = f"http://{url.split('//')[1].rsplit(':', 1)[0]}:{web_port}" if web_port is not None else None
            exposed = "" if is_loopback(cfg.host) else f"; listening on {cfg.host}, every request needs the API key"
            print(f"controller: {url}  (OpenAI API: {url}/v1{exposed})", flush=True)
            if web_url:
                print(f"web UI: {web_url}", flush=True)
            loaders: dict[str, threading.Thread] = {}
            for background in (False, True):  # a slow background tool never delays the others
                group = {n: s for n, s in in_process.items() if is_background(n, s) == background}
                if group:
                    loader = threading.Thread(target=ctl.load_local_tools, args=(group,), daemon=True)
                    loader.start()
                    loaders.update(dict.fromkeys(group, loader))
            watcher = threading.Thread(target=self._watch, args=(ctl, expected, web_url, loaders), daemon=True)
            watcher.start()
            server = self.server = http_server(app, cfg, cfg.max_upload_bytes * 4 // 3 + 65536)
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: during the start, or re-raised by uvicorn after its graceful shutdown
            pass
        finally:
            self.stopping.set()
            with self._children_lock:
                stop_children(self.children)
            ctl.close()
            print("stopped", flush=True)
