"""Serving settings: one pydantic model filled from defaults, an optional YAML file and CLI flags.

Every process of the stack (controller, model worker, tool worker, web UI, CLI) reads the same
:class:`ServeConfig`, so a YAML file written once configures all of them::

    host: 127.0.0.1
    port: 21001
    web_port: 7860
    model_path: /models/my-llava-lora     # default: demo model, else a tiny random checkpoint
    conv_template: vicuna_v1
    tool_weights: default                 # demo: tiny random tool weights (default without model_path)
    tools:                                # one worker per entry; in_process runs it in the controller
      grounding: {options: {device: cpu}}
      classification: {in_process: true}
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any, Literal, NoReturn

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mmedagent.cache import cache_root
from mmedagent.serve.messages import MAX_STEPS

API_KEY_ENV = "MMEDAGENT_API_KEY"
BACKEND_API_KEY_ENV = "MMEDAGENT_BACKEND_API_KEY"


class ToolSpec(BaseModel):
    """How one tool is served: options passed to its constructor, worker count or in-process."""

    model_config = ConfigDict(extra="forbid")

    options: dict[str, Any] = Field(default_factory=dict)
    in_process: bool = False
    workers: int = Field(default=1, ge=0)
    weights_label: str | None = Field(
        default=None, description="shown beside the tool's weights in the banner and /v1/models (the demo weights say "
        "'tiny random weights — demo only')",
    )
    background: bool | None = Field(
        default=None, description="the ready line does not wait for this tool; it registers once loaded "
        "(default: the tool's slow_load, true for retrieval, whose first load builds its index)",
    )


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

MIN_API_KEY_LENGTH = 16
"""Shorter keys (the web UI's password too) are refused: the servers do not limit wrong attempts."""


DTYPES = ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16")
"""The planner dtypes a server takes (the short names as the recipes write them)."""


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=21001, ge=0, le=65535)
    web_port: int | None = Field(default=7860, ge=0, le=65535)
    model_path: str | None = None
    model_base: str | None = Field(default=None, description="base model a LoRA adapter at model_path is stacked on "
                                   "(default: the base the adapter records)")
    model_name: str | None = None
    conv_template: str | None = None
    system_prompt: Literal["catalog", "plain", "none"] | None = Field(
        default=None,
        description="catalog: the live tools' catalog; plain: the Vicuna text (models trained without the catalog, "
        "as MMedAgent's); none: no system message (models trained without one). Default: the model directory's mmedagent.json, else catalog",
    )
    model_backend_url: str | None = Field(default=None, description="OpenAI-compatible server the model worker forwards to")
    model_backend_model: str | None = None
    model_backend_api_key: str | None = Field(
        default=None, repr=False, description=f"the backend's bearer token (or env {BACKEND_API_KEY_ENV}); without it a "
        "backend on this machine (loopback) gets api_key, one elsewhere no token: the stack's key never leaves for a "
        "server it was not given for")
    device: str | None = None
    dtype: Literal[DTYPES] | None = Field(
        default=None, description="the planner's weights (default: bfloat16 on a CUDA GPU that has it, else float32)")
    prompt_lookup: int = Field(default=0, ge=0, description="draft tokens per step for the planner's greedy "
                               "prompt-lookup decoding (same output, faster answers that quote tool results); 0: off")
    constrain: bool | None = Field(default=None, description="decode each planner turn under the turn format and "
                                   "the tools' parameter schemas (every call parses). Default: the model directory's "
                                   "mmedagent.json, else off")
    tool_weights: Literal["demo", "default"] | None = Field(
        default=None,
        description="weights of tools whose options are not configured. demo: tiny random ones built once into the cache "
        "(retrieval keeps its real MiniLM index); default: each tool's published default (hub ids, medsam_vit_b.pth). "
        "Default: demo when the planner is the demo or tiny model (no model_path, or model_path 'demo') and no "
        "backend URL is set, else default",
    )
    tools: dict[str, ToolSpec] | None = Field(default=None, description="None: every registered tool, one worker each")
    plugins: list[str] = Field(default_factory=list, description="modules whose tool classes are registered")
    no_workers: bool = False
    api_key: str | None = Field(default=None, repr=False)
    heartbeat_interval_s: float = Field(default=5.0, gt=0)
    heartbeat_expiry_s: float = Field(default=15.0, gt=0)
    tool_timeout_s: float = Field(default=60.0, gt=0)
    model_timeout_s: float = Field(default=300.0, gt=0)
    max_upload_mb: float = Field(default=20.0, gt=0)
    max_steps: int = Field(default=3, ge=1, le=MAX_STEPS)
    max_new_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_concurrent_chats: int = Field(default=64, ge=1)
    max_connections: int = Field(
        default=256, ge=2, description="connections each service (controller, model worker, tool worker) holds at once, "
        "idle keep-alive ones included; a request over it gets 503. Above max_concurrent_chats, whose chats each hold one",
    )
    request_read_timeout_s: float = Field(
        default=60.0, gt=0, description="seconds a client has to send a whole request, headers and body, from connecting "
        "(or from its previous answer); a slower connection is closed, so slow senders cannot hold connections",
    )
    cache_dir: str | None = None
    log_level: str = "INFO"

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, level: str) -> str:
        if level.upper() not in LOG_LEVELS:
            raise ValueError(f"unknown log level; use one of {', '.join(LOG_LEVELS)}")
        return level.upper()

    @model_validator(mode="after")
    def _check(self) -> "ServeConfig":
        if self.heartbeat_expiry_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"heartbeat_expiry_s ({self.heartbeat_expiry_s:g}) must exceed heartbeat_interval_s "
                f"({self.heartbeat_interval_s:g}), otherwise live workers are dropped"
            )
        if self.api_key is None:
            self.api_key = os.environ.get(API_KEY_ENV) or None
        if self.model_backend_api_key is None:
            self.model_backend_api_key = os.environ.get(BACKEND_API_KEY_ENV) or None
        if self.model_base and (self.model_path in (None, "demo") or self.model_backend_url):
            raise ValueError("model_base is the base of a LoRA adapter given as model_path (a local planner, "
                             "not the demo model or a backend URL)")
        if self.api_key is not None and len(self.api_key) < MIN_API_KEY_LENGTH:
            raise ValueError(
                f"the API key has {len(self.api_key)} characters; use at least {MIN_API_KEY_LENGTH} (a short key can be "
                "guessed by trying keys), e.g. python -c 'import secrets; print(secrets.token_urlsafe(24))'"
            )
        if self.api_key is None and not is_loopback(self.host):
            raise ValueError(
                f"host {self.host} is reachable from other machines: set an API key (--api-key or env {API_KEY_ENV}), "
                "else anyone on the network could use the server and the images sent to it"
            )
        return self

    @property
    def effective_tool_weights(self) -> Literal["demo", "default"]:
        if self.tool_weights is not None:
            return self.tool_weights
        demo_planner = self.model_path in (None, "demo") and not self.model_backend_url
        return "demo" if demo_planner else "default"

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def controller_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    def cache_path(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir)
        return cache_root()


def is_loopback(host: str) -> bool:
    """True for a name or address only this machine reaches (``localhost``, 127.0.0.0/8, ``::1``)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ConfigError(ValueError):
    """Settings that cannot be used: names the file and each bad setting, never a value (an API key
    among the settings must not reach a terminal or a log)."""


def load_config(path: str | os.PathLike | None = None, **overrides: Any) -> ServeConfig:
    """Defaults ← YAML file ← overrides (CLI flags that were given; ``None`` means not given).

    A :class:`ConfigError` for an unreadable file, invalid YAML or invalid settings."""
    data: dict[str, Any] = {}
    if path:
        import yaml

        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the config file ({e.strerror or type(e).__name__})") from None
        except yaml.YAMLError as e:  # its message would quote the offending line
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', None) or type(e).__name__}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of settings, got {type(loaded).__name__}")
        data.update(loaded)
    given = {k: v for k, v in overrides.items() if v is not None}
    if isinstance(given.get("tools"), dict) and isinstance(data.get("tools"), dict):
        # the flags choose the tools; each keeps its file settings unless a flag changes them
        given["tools"] = {n: {**(data["tools"].get(n) or {}), **spec} for n, spec in given["tools"].items()}
    data.update(given)
    try:
        return ServeConfig.model_validate(data)
    except ValidationError as e:
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid settings{where}: {validation_problems(e, None)}") from None


def validation_problems(error: ValidationError, whole: str | None) -> str:
    """Each bad field of ``error`` and what is wrong with it (``whole`` names a problem with the whole
    input; None: such a problem stands alone), never the value given: it may be a secret or patient data."""
    def problem(err: Any) -> str:
        msg = err["msg"].removeprefix("Value error, ")  # pydantic's wording for a validator's own message
        name = ".".join(map(str, err["loc"])) or whole
        return f"{name}: {msg}" if name else msg

    return "; ".join(problem(err) for err in error.errors(include_url=False, include_input=False))


def config_or_exit(parser: Any, path: str | os.PathLike | None = None, **overrides: Any) -> ServeConfig:
    """:func:`load_config` for a command line: a :class:`ConfigError` is one ``error:`` line (exit 2),
    without the usage text, which says nothing about a setting."""
    try:
        return load_config(path, **overrides)
    except ConfigError as e:
        exit_error(parser, str(e))


def exit_error(parser: Any, message: str) -> NoReturn:
    """A setting that cannot be used, at start: one ``error:`` line and exit 2, without the usage text
    (``parser.error`` prints), which says nothing about a setting."""
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def add_common_args(parser) -> None:
    """Flags shared by every serve script (each may also set ``--config``)."""
    parser.add_argument("--config", help="YAML file with ServeConfig settings (flags override it)")
    parser.add_argument("--api-key", default=None, help=f"bearer token required on every endpoint (or env {API_KEY_ENV})")
    parser.add_argument("--log-level", default=None)


def add_limit_args(parser) -> None:
    """Flags for a service's connection limits (:func:`mmedagent.serve.worker_base.http_server`)."""
    parser.add_argument("--max-connections", type=int, default=None,
                        help="connections held at once, more get 503 (default from config, 256)")
    parser.add_argument("--request-read-timeout", type=float, default=None,
                        help="seconds a client has to send a whole request; slower connections are closed (default from config, 60)")
