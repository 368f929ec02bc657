"""The one command: controller in this process, model worker, tool workers and web UI as children.

Children get the API key through the environment (never on a command line, which ``ps`` shows),
register with the controller once loaded, and are stopped when the controller stops (Ctrl-C).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import uvicorn

from mmedagent.serve.config import API_KEY_ENV, ServeConfig
from mmedagent.serve.controller import Controller, build_app, tool_specs
from mmedagent.serve.security import GuardMiddleware
from mmedagent.serve.worker_base import bind_socket, url_for

log = logging.getLogger("mmedagent.serve.launcher")
SERVE_DIR = Path(__file__).resolve().parent


class Child:
    def __init__(self, label: str, argv: list[str], env: dict[str, str]):
        self.label, self.argv = label, argv
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL)

    def stop(self, grace_s: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class Launcher:
    def __init__(self, cfg: ServeConfig, config_path: str | None = None):
        self.cfg, self.config_path = cfg, config_path
        self.children: list[Child] = []
        self.in_process: list[str] = []
        self.stopping = threading.Event()

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
        return env

    def _spawn(self, label: str, argv: list[str]) -> None:
        self.children.append(Child(label, argv, self._env()))

    def start_children(self, controller_url: str, web_port: int | None) -> list[str]:
        """Start the workers and the UI; returns the tool names expected to register."""
        cfg = self.cfg
        common = ["--controller", controller_url, "--heartbeat-interval", str(cfg.heartbeat_interval_s)]
        expected: list[str] = []
        if not cfg.no_workers:
            model_args = []
            for flag, value in (("--model-path", cfg.model_path), ("--model-name", cfg.model_name),
                                ("--conv-template", cfg.conv_template), ("--device", cfg.device),
                                ("--system-prompt", cfg.system_prompt),
                                ("--backend-url", cfg.model_backend_url), ("--backend-model", cfg.model_backend_model)):
                if value:
                    model_args += [flag, value]
            self._spawn("model worker", self._script("model_worker.py", *common, *model_args))
            for name, spec in tool_specs(cfg).items():
                if spec.in_process:
                    continue
                for _ in range(spec.workers):
                    plugins = [a for p in cfg.plugins for a in ("--plugin", p)]
                    argv = self._script("tool_worker.py", "--tool", name, "--options", json.dumps(spec.options), *plugins, *common)
                    self._spawn(f"tool worker {name}", argv)
                expected.append(name)
        if web_port is not None:
            self._spawn("web UI", self._script("web.py", "--controller", controller_url, "--host", cfg.host, "--port", str(web_port)))
        return expected

    def _watch(self, ctl: Controller, expected: list[str], web_url: str | None, loader: threading.Thread | None) -> None:
        """Say when the stack is ready, and report children that die."""
        reported: set[int] = set()
        ready = False
        while not self.stopping.wait(0.5):
            for child in self.children:
                code = child.proc.poll()
                if code is not None and id(child) not in reported:
                    reported.add(id(child))
                    log.error("%s exited with code %s (see its log above)", child.label, code)
            if ready:
                continue
            alive = {c.label for c in self.children if c.proc.poll() is None}
            models = ctl.model_names()
            tools = ctl.available_tools()
            waiting = [n for n in expected if n not in tools and f"tool worker {n}" in alive]
            model_pending = not self.cfg.no_workers and not models and "model worker" in alive
            if not waiting and not model_pending and not (loader is not None and loader.is_alive()):
                ready = True
                failed = [n for n in [*expected, *self.in_process] if n not in tools]
                line = f"ready: models: {', '.join(models) or '(none)'}; tools: {', '.join(tools) or '(none)'}"
                if failed:
                    line += f"; failed to start: {', '.join(failed)}"
                if web_url:
                    line += f"; chat at {web_url}"
                print(line, flush=True)

    def run(self) -> None:
        cfg = self.cfg
        ctl = Controller(cfg)
        app = build_app(ctl)
        sock = bind_socket(cfg.host, cfg.port)
        url = url_for(sock)
        web_port = None
        if cfg.web_port is not None:
            web_port = cfg.web_port
            if web_port == 0:  # pick a free port now so the URL can be printed
                probe = bind_socket(cfg.host, 0)
                web_port = probe.getsockname()[1]
                probe.close()
        specs = tool_specs(cfg)
        in_process = {n: s for n, s in specs.items() if s.in_process}
        self.in_process = list(in_process)
        expected = self.start_children(url, web_port)
        web_url = f"http://{url.split('//')[1].rsplit(':', 1)[0]}:{web_port}" if web_port is not None else None
        print(f"controller: {url}  (OpenAI API: {url}/v1)", flush=True)
        if web_url:
            print(f"web UI: {web_url}", flush=True)
        loader = None
        if in_process:
            loader = threading.Thread(target=ctl.load_local_tools, args=(in_process,), daemon=True)
            loader.start()
        watcher = threading.Thread(target=self._watch, args=(ctl, expected, web_url, loader), daemon=True)
        watcher.start()
        server = uvicorn.Server(
            uvicorn.Config(GuardMiddleware(app, cfg.api_key, cfg.max_upload_bytes * 4 // 3 + 65536), log_config=None,
                           log_level=cfg.log_level.lower(), timeout_graceful_shutdown=3)
        )
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
            pass
        finally:
            self.stopping.set()
            for child in reversed(self.children):
                child.stop()
            ctl.close()
            print("stopped", flush=True)
