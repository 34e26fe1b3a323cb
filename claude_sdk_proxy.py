#!/usr/bin/env python3
# /// script
# requires-python = ">=3.10"
# dependencies = ["claude-agent-sdk>=0.2.180"]     # the range the tests ran against
# ///
"""claude-sdk-proxy: the Anthropic and OpenAI APIs, served from a Claude subscription.

The proxy answers the Anthropic Messages API (`/v1/messages`, streaming and not,
`count_tokens`, models), OpenAI Chat Completions and OpenAI Responses through the
Claude Agent SDK, which drives the Claude Code CLI on the operator's login. One
engine serves all three: the client's conversation reaches the upstream as the same
structured messages it sent (a transcript resumed through the SDK's session store,
or only the new turn on a CLI still live from the last one), client tools are real
tools whose calls park the CLI until the client answers, parameters ride along in
the CLI's extra request body, and upstream errors come back as the real statuses
(429 with `retry-after`, 529, 400, 401), fast.

Usage:  python claude_sdk_proxy.py [-p PORT] [-H HOST] [-d]      (manual: README.md)

Map (numbered sections, in the order data flows):
  1. Config and limits        -- flags and environment into one frozen Config
  2. Errors                   -- ProxyError and its subclasses, each API's error body
  3. HTTP/1.1 wire format     -- request heads, bodies (length, chunked), response heads
  4. SSE                      -- server-sent event frames
  5. Auth and models          -- API key check, CORS, model mapping, the models list
  6. Messages API requests    -- validation into a Turn, message threads, token estimate
  7. Conversations on the CLI -- tool names, transcripts, identity, the answer folded
  8. OpenAI Chat Completions  -- requests in, completions and chunks out
  9. OpenAI Responses         -- requests in, responses and their events out
 10. SDK adapter              -- options, environment, one CLI per task, TurnReader
 11. Host processes           -- CLI sessions, /proc, orphans, leftovers, watchdog
 12. Conversation engine      -- session states, live sessions, spares, the caps
 13. Usage                    -- named keys, the SQLite ledger, metrics, status page
 14. Routes and handlers      -- one Dialect per API on its route, stores, handlers
 15. Server                   -- connections, keep-alive, streaming, errors out
 16. Command line             -- login, doctor, main(argv) -> int

Rules:
  - Sections 1-9 are pure: no await, no sockets, no environment reads, no SDK.
    They take dicts and return dicts (or raise ProxyError).
  - Only section 10 uses claude_agent_sdk; SDK exceptions become ProxyErrors there,
    and its TurnReader's events are all the engine (12) sees of a CLI's output.
  - Only section 15 touches asyncio streams; handlers (14) write through a Responder.
  - Only section 13 touches the disk's state: the key file and the SQLite ledger.
  - Errors become responses in one place (`Responder.fail`), in the caller's dialect.
  - The CLI's identity and attribution lines and its user agent stay as it sends
    them: no prompt camouflage, no body override of `system` or `messages`.
  - Secrets and message content are logged only with --debug.

Module-level state that changes at run time: `_watchdog` (the watchdog process,
started once), `anyio.open_process` (wrapped when the SDK is imported, section 11),
the filter `serve` adds to the SDK's `_internal.query` logger, and the logging
set up by `main`. Everything else lives in an App, an Engine or a Config.

The SDK beyond its public API (SdkSurfaceTest checks each by name): `_cli_version`,
`_internal._mcp_compat.build_tool_server`, a client's `_transport._process`,
`_query._send_control_request` and `_query.close_receive_stream`, the
`_internal.query` logger's "Fatal error in message reader", and its CLI spawn
through `anyio.open_process`. Supported SDKs: SDK_FLOOR to SDK_NEWEST_TESTED.

Known limits (what the CLI cannot be made to do): an assistant message as the last
turn (prefill) is refused with a 400; the CLI adds its own system lines, its own
cache_control marks and an environment note (~0.9 KB) to the turn it began on (the
first on a live CLI, the newest when resumed from a transcript); system-block
cache_control is not carried. README.md lists every parameter and the note.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import dataclasses
import datetime as dt
import fcntl
import functools
import hashlib
import hmac
import html
import ipaddress
import json
import logging
import math
import os
import re
import shutil
import shlex
import signal
import socket
import sqlite3
import stat
import struct
import sys
import tempfile
import time
import urllib.parse
import uuid
from typing import Any, AsyncIterator, Callable, Iterable, Iterator, Mapping

__version__ = "0.1.0"

log = logging.getLogger("claude_sdk_proxy")


# =============================================================================
# 1. Config and limits -- flags and environment into one frozen Config
# =============================================================================
# Every knob is read once, in `config_from`, and passed down; nothing below reads
# os.environ. Limits carry the reason for their value.

DEFAULT_PORT = 3456
DEFAULT_HOST = "127.0.0.1"
# Concurrent turns. A turn mostly waits for the upstream (a warm one costs the box
# ~40 ms of CPU in seconds of answer), so the bound is what one subscription is
# served at once and the memory of busy CLIs, not the cores: Claude Code itself
# runs parallel subagents on one login. Cold starts are CPU-bound, but a queue does
# not make them cheaper, only later: 8 new chats at once end sooner with 8 (3.1 s
# on 2 cores) than in two waves of 5 (4.4 s).
DEFAULT_MAX_CONCURRENT = 8
DEFAULT_TIMEOUT_MS = 1_800_000          # 30 min: long agentic answers stream for a while
DEFAULT_MAX_BODY_MB = 32                # the Messages API's own request cap is 32 MB
DEFAULT_QUEUE_TIMEOUT_S = 60.0          # then 529 + retry-after, as an overloaded API does
DEFAULT_MAX_CONNECTIONS = 512          # open sockets; the longest idle makes room
DEFAULT_SESSION_IDLE_S = 900.0          # chat apps pause minutes between messages
DEFAULT_MAX_SPARES = 2                  # pre-connected CLIs, for the shapes new chats start in
SPARE_DEMAND_WINDOW_S = 900.0           # a shape's new chats count as demand this long
SPARE_QUIET_S = 1.0                     # a spare starts after this long without a new request
SHAPES_TRACKED = 256                    # shapes whose new chats are counted
# What one more CLI costs, proportional set size (PSS) measured on CLI 2.1.331/332:
# ~121 MB idle after a turn, ~103 MB a spare; its resident size (~184 MB) counts
# pages all CLIs share (the binary) in full.
CLI_PSS_BYTES = 128 * 1024 * 1024
MAX_REQUEST_LINE = 8 * 1024             # Apache and nginx default to 8 KiB
MAX_HEAD_BYTES = 64 * 1024              # nginx allows 4 x 8 KiB, node 16 KiB: a little more
MAX_HEADER_COUNT = 100                  # Apache's LimitRequestFields default
HEADER_TIMEOUT_S = 30.0                 # a whole request head (nginx allows 60 s)
BODY_TIMEOUT_S = 60.0                   # between reads of a body (nginx: 60 s)
MIN_BODY_RATE = 1024                    # bytes/s a body averages after its first timeout's

KEEPALIVE_IDLE_S = 75.0                 # between requests (nginx: 75 s)
SEND_TIMEOUT_S = 60.0                   # a client that reads nothing of its answer (nginx: 60 s)
HEAD_HOLD_S = 3.0                       # a stream's first 102 Processing after this silence
PING_INTERVAL_S = 15.0                  # keeps proxies and clients from idling out
SHUTDOWN_GRACE_S = 30.0                 # in-flight requests get this long after SIGTERM
RETRY_AFTER_DEFAULT_S = 5               # for a throttle that came without a reset time
CLI_CLOSE_TIMEOUT_S = 10.0              # the SDK's own close can wait up to ~20 s
CLI_REWIND_TIMEOUT_S = 5.0              # a rewind is the CLI's own: milliseconds
CLI_FREEZE_AFTER_S = 2.0                # an idle CLI is stopped after this (its timers cost CPU)
SDK_LINE_LIMIT = 1024 * 1024            # the SDK's default limit on a line of CLI output
TOOL_WAIT_MS = 24 * 3600 * 1000         # the CLI's limit on a client tool call
MAX_TOOL_ROUNDS = 100_000               # the CLI's turn bound when client tools exist
AGENT_TOOLS = ("Read", "Write", "Edit", "Bash", "Glob", "Grep", "WebFetch", "WebSearch")
AGENT_MAX_TURNS = 50                    # built-in tool rounds in one agent-mode answer
RESPONSES_KEPT = 1000                   # responses kept for previous_response_id ...
RESPONSES_KEEP_S = 3600.0               # ... and for how long
THREADS_KEPT = 1000                     # message threads kept ...
THREAD_IDLE_S = 300.0                   # ... until idle this long (the API's: 5 minutes)
DEFAULT_LEDGER_DAYS = 90.0              # usage ledger rows are kept this long
DEFAULT_WARN_AT_PERCENT = 90.0          # a window this full is worth a warning
STATUS_REFRESH_S = 10                   # the status page reloads itself this often


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything the running proxy needs to know, fixed at start."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    debug: bool = False
    api_key: str | None = None
    keys_file: str | None = None        # named keys, one `name key` a line
    ledger_path: str | None = None      # the SQLite usage ledger; None: in memory only
    ledger_days: float = DEFAULT_LEDGER_DAYS
    warn_at: float = DEFAULT_WARN_AT_PERCENT / 100
    max_concurrent: int = DEFAULT_MAX_CONCURRENT
    timeout_s: float = DEFAULT_TIMEOUT_MS / 1000
    max_body_bytes: int = DEFAULT_MAX_BODY_MB * 1024 * 1024
    queue_timeout_s: float = DEFAULT_QUEUE_TIMEOUT_S
    default_model: str = "sonnet"
    workdir: str = ""                   # the CLI's private empty working directory
    cli_path: str | None = None
    max_sessions: int = 16
    session_idle_s: float = DEFAULT_SESSION_IDLE_S
    max_spares: int = DEFAULT_MAX_SPARES
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    agent_dir: str | None = None        # agent mode: the CLI's built-in tools work here
    header_timeout_s: float = HEADER_TIMEOUT_S
    body_timeout_s: float = BODY_TIMEOUT_S
    keepalive_idle_s: float = KEEPALIVE_IDLE_S
    send_timeout_s: float = SEND_TIMEOUT_S
    head_hold_s: float = HEAD_HOLD_S
    ping_interval_s: float = PING_INTERVAL_S
    shutdown_grace_s: float = SHUTDOWN_GRACE_S


def _env_number(environ: dict, name: str, default: float, kind: type, minimum: float) -> Any:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise SystemExit(f"{name} must be a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise SystemExit(f"{name} must be a finite number, got {raw!r}")
    if value < minimum:
        raise SystemExit(f"{name} must be at least {minimum}, got {raw!r}")
    return value


def build_arg_parser() -> argparse.ArgumentParser:
    """The command line: `serve` is implied; every flag has an environment twin."""
    parser = argparse.ArgumentParser(
        prog="claude_sdk_proxy.py",
        description="The Anthropic Messages API and the OpenAI Chat Completions and "
        "Responses APIs, served from a Claude subscription through the Claude Agent SDK.",
        epilog="Environment: CLAUDE_PROXY_PORT, CLAUDE_PROXY_HOST, CLAUDE_PROXY_DEBUG, "
        "CLAUDE_PROXY_API_KEY, CLAUDE_PROXY_KEYS_FILE, CLAUDE_PROXY_LEDGER, "
        "CLAUDE_PROXY_LEDGER_DAYS, CLAUDE_PROXY_WARN_AT, CLAUDE_PROXY_MAX_CONCURRENT, "
        "CLAUDE_PROXY_TIMEOUT_MS, "
        "CLAUDE_PROXY_MAX_BODY_MB, CLAUDE_PROXY_QUEUE_TIMEOUT_S, CLAUDE_PROXY_DEFAULT_MODEL, "
        "CLAUDE_PROXY_MAX_SESSIONS, CLAUDE_PROXY_SESSION_IDLE_S, CLAUDE_PROXY_MAX_SPARES, "
        "CLAUDE_PROXY_MAX_CONNECTIONS, CLAUDE_PROXY_CLI_PATH, CLAUDE_PROXY_AGENT_DIR. "
        "See README.md.",
    )
    parser.add_argument("command", nargs="?", choices=("serve", "login", "setup-token", "doctor"),
                        default="serve", help="serve (the default); login: sign the CLI in "
                        "to your Claude account; setup-token: make a long-lived token for a "
                        "machine without a browser; doctor: check the set-up, with one real call")
    parser.add_argument("-p", "--port", type=int, help=f"listen port (default {DEFAULT_PORT})")
    parser.add_argument("-H", "--host", help=f"bind address (default {DEFAULT_HOST})")
    parser.add_argument("-d", "--debug", action="store_true", help="debug logging")
    parser.add_argument("--agent-dir", metavar="DIR",
                        help="agent mode: let Claude use the CLI's built-in tools (Read, Write, "
                        "Edit, Bash, Glob, Grep, WebFetch, WebSearch) in DIR; off by default")
    parser.add_argument("--keys-file", metavar="FILE",
                        help="named API keys, one `name key` a line (mode 600; re-read when "
                        "it changes)")
    parser.add_argument("--ledger", metavar="PATH",
                        help="the SQLite usage ledger (default "
                        "$XDG_STATE_HOME/claude-sdk-proxy/usage.sqlite3); `off`: in memory")
    parser.add_argument("-v", "--version", action="store_true",
                        help="print proxy, SDK and CLI versions")
    return parser


def default_max_sessions(memory_bytes: int, max_concurrent: int) -> int:
    """CLI processes that fit in half the memory available at start, at least the
    concurrency."""
    return max(max_concurrent, min(64, memory_bytes // 2 // CLI_PSS_BYTES))


def default_ledger_path(environ: dict) -> str:
    """$XDG_STATE_HOME/claude-sdk-proxy/usage.sqlite3 (XDG's default: ~/.local/state)."""
    state = environ.get("XDG_STATE_HOME") or os.path.join(
        environ.get("HOME") or os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "claude-sdk-proxy", "usage.sqlite3")


def config_from(args: argparse.Namespace, environ: dict, memory_bytes: int = 8 << 30) -> Config:
    """Flags win over environment, environment over defaults."""
    port = args.port if args.port is not None else _env_number(
        environ, "CLAUDE_PROXY_PORT", DEFAULT_PORT, int, 0)
    if not 0 <= port <= 65535:
        raise SystemExit(f"port must be 0-65535, got {port}")
    debug = args.debug or environ.get("CLAUDE_PROXY_DEBUG", "").lower() in ("1", "true", "yes")
    default_model = environ.get("CLAUDE_PROXY_DEFAULT_MODEL", "sonnet").strip() or "sonnet"
    max_concurrent = _env_number(environ, "CLAUDE_PROXY_MAX_CONCURRENT",
                                 DEFAULT_MAX_CONCURRENT, int, 1)
    ledger = args.ledger or environ.get("CLAUDE_PROXY_LEDGER", "").strip() or \
        default_ledger_path(environ)
    keys_file = args.keys_file or environ.get("CLAUDE_PROXY_KEYS_FILE", "").strip()
    return Config(
        host=args.host or environ.get("CLAUDE_PROXY_HOST") or DEFAULT_HOST,
        port=port,
        debug=debug,
        # Stripped as clients' keys are (a key from an env file keeps its newline).
        api_key=(environ.get("CLAUDE_PROXY_API_KEY") or "").strip() or None,
        keys_file=os.path.abspath(keys_file) if keys_file else None,
        ledger_path=None if ledger.lower() == "off" else os.path.abspath(ledger),
        ledger_days=_env_number(environ, "CLAUDE_PROXY_LEDGER_DAYS", DEFAULT_LEDGER_DAYS,
                                float, 0.01),
        warn_at=min(100.0, _env_number(environ, "CLAUDE_PROXY_WARN_AT",
                                       DEFAULT_WARN_AT_PERCENT, float, 1)) / 100,
        max_concurrent=max_concurrent,
        max_sessions=max(max_concurrent, _env_number(
            environ, "CLAUDE_PROXY_MAX_SESSIONS",
            default_max_sessions(memory_bytes, max_concurrent), int, 1)),
        session_idle_s=_env_number(environ, "CLAUDE_PROXY_SESSION_IDLE_S",
                                   DEFAULT_SESSION_IDLE_S, float, 0.1),
        max_spares=_env_number(environ, "CLAUDE_PROXY_MAX_SPARES", DEFAULT_MAX_SPARES, int, 0),
        max_connections=_env_number(environ, "CLAUDE_PROXY_MAX_CONNECTIONS",
                                    DEFAULT_MAX_CONNECTIONS, int, 1),
        agent_dir=os.path.abspath(args.agent_dir or environ["CLAUDE_PROXY_AGENT_DIR"])
        if args.agent_dir or environ.get("CLAUDE_PROXY_AGENT_DIR") else None,
        timeout_s=_env_number(environ, "CLAUDE_PROXY_TIMEOUT_MS", DEFAULT_TIMEOUT_MS,
                              int, 1) / 1000,
        max_body_bytes=int(_env_number(environ, "CLAUDE_PROXY_MAX_BODY_MB",
                                       DEFAULT_MAX_BODY_MB, float, 0.001) * 1024 * 1024),
        queue_timeout_s=_env_number(environ, "CLAUDE_PROXY_QUEUE_TIMEOUT_S",
                                    DEFAULT_QUEUE_TIMEOUT_S, float, 0),
        default_model=default_model,
        cli_path=environ.get("CLAUDE_PROXY_CLI_PATH") or None,
    )


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)      # ::ffff:127.0.0.1
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def startup_problems(config: Config, environ: dict, sandbox_problem: str | None = None
                     ) -> tuple[list[str], list[str]]:
    """What stops the proxy from starting, and what it warns about; `sandbox_problem`
    is why agent mode's Bash sandbox cannot run here (`agent_sandbox_problem`)."""
    errors, warnings = [], []
    if not is_loopback(config.host) and not (config.api_key or config.keys_file):
        errors.append(
            f"Refusing to listen on {config.host} without an API key: anyone who can reach "
            "it would use your Claude subscription. Set CLAUDE_PROXY_API_KEY to a long random "
            "secret (clients send it as x-api-key or Authorization: Bearer) or name keys in "
            "CLAUDE_PROXY_KEYS_FILE, or listen on 127.0.0.1.")
    if not resolve_model(config.default_model, ""):
        errors.append(f"CLAUDE_PROXY_DEFAULT_MODEL={config.default_model} names no Claude "
                      "model: use a Claude model id or opus, sonnet or haiku.")
    if config.agent_dir is not None:
        if not os.path.isdir(config.agent_dir):
            errors.append(f"The agent directory {config.agent_dir} does not exist.")
        warnings.append(f"Agent mode: Claude runs the CLI's built-in tools (Bash included) "
                        f"as this user, file tools confined to {config.agent_dir}; Bash runs "
                        "in the CLI's sandbox: no network, writes only there and in $TMPDIR, "
                        "the login out of its reach.")
        if sandbox_problem:
            errors.append(f"Agent mode needs the CLI's Bash sandbox and it cannot run here: "
                          f"{sandbox_problem} Without it Bash could read the subscription login "
                          "(the CLI's environment, the credentials file) and show it to "
                          "the model.")
    if environ.get("ANTHROPIC_API_KEY"):
        warnings.append("ANTHROPIC_API_KEY is set: the Claude Code CLI bills that API key, "
                        "not your subscription. Unset it to use the subscription.")
    base = environ.get("ANTHROPIC_BASE_URL")
    if base:
        target = urllib.parse.urlsplit(base)
        with contextlib.suppress(ValueError):
            if target.hostname and target.port == config.port and (
                    is_loopback(target.hostname) or target.hostname == config.host):
                errors.append(f"ANTHROPIC_BASE_URL={base} points at this proxy itself: the "
                              "CLI would call the proxy in a loop. Unset it for the proxy.")
    return errors, warnings


# =============================================================================
# 2. Errors -- ProxyError and its subclasses, and each API's error body
# =============================================================================
# Pure code raises these; `Responder.fail` (section 15) is the one place that turns
# them into a response in the caller's dialect. `headers` carries retry-after and
# the like. Unknown exceptions never reach a client: they become a generic 500.

class ProxyError(Exception):
    """An error with the HTTP status and the Anthropic error type it maps to."""

    status = 500
    error_type = "api_error"
    openai_code: str | None = None
    param: str | None = None        # the request field it is about, where there is one

    def __init__(self, message: str, headers: dict[str, str] | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.code = code            # the API's `error.details.error_code`, where it has one


class InvalidRequest(ProxyError):
    status, error_type = 400, "invalid_request_error"

    @property
    def param(self) -> str | None:
        """The request field it is about: the path its message starts with."""
        found = _PARAM_RE.match(self.message)
        return found.group(1) if found else None

    def moved(self, prefix: str, path: str) -> InvalidRequest:
        """The same error with its path's `prefix` replaced by `path` (where the client
        sent that field)."""
        return type(self)(path + self.message[len(prefix):], self.headers, self.code)


_PARAM_RE = re.compile(r"([A-Za-z_]\w*(?:\.\w+)*): ")


class PromptTooLong(InvalidRequest):
    """The conversation does not fit the model's context window."""
    openai_code = "context_length_exceeded"     # what OpenAI clients look for


class AuthenticationFailed(ProxyError):
    status, error_type = 401, "authentication_error"


class PermissionDenied(ProxyError):
    status, error_type = 403, "permission_error"


class NotFound(ProxyError):
    status, error_type = 404, "not_found_error"


class MethodNotAllowed(ProxyError):
    status, error_type = 405, "invalid_request_error"


class RequestTooLarge(ProxyError):
    status, error_type = 413, "request_too_large"


class HeadersTooLarge(ProxyError):
    status, error_type = 431, "invalid_request_error"


class RateLimited(ProxyError):
    status, error_type = 429, "rate_limit_error"


class UpstreamError(ProxyError):
    status, error_type = 500, "api_error"


class BadGateway(ProxyError):
    status, error_type = 502, "api_error"


class CliWentOn(BadGateway):
    """A CLI answered a client tool call without the client: the engine starts the
    turn again on a new CLI, from the transcript."""


class ServiceUnavailable(ProxyError):
    status, error_type = 503, "api_error"


class GatewayTimeout(ProxyError):
    status, error_type = 504, "timeout_error"


class Overloaded(ProxyError):
    status, error_type = 529, "overloaded_error"


def retry_after_header(seconds: float) -> dict[str, str]:
    """A `retry-after` header in whole seconds, at least one."""
    return {"retry-after": str(max(1, math.ceil(seconds)))}


def error_for_upstream_status(status: int, message: str,
                              retry_after_s: float | None = None) -> ProxyError:
    """The ProxyError a client should see for an upstream HTTP error status."""
    if retry_after_s is None:
        retry_after_s = RETRY_AFTER_DEFAULT_S
    if status == 429:
        return RateLimited(message, retry_after_header(retry_after_s))
    if status in (529, 503):
        return Overloaded(message, retry_after_header(retry_after_s))
    if status == 401:
        return AuthenticationFailed(message)
    if status == 403:
        return PermissionDenied(message)
    if status == 404:
        return NotFound(message)
    if status == 413:
        return RequestTooLarge(message)
    if 400 <= status < 500:
        return InvalidRequest(message)
    if status == 504:
        return GatewayTimeout(message)
    return UpstreamError(message)


def error_to_anthropic(err: ProxyError, request_id: str | None = None) -> dict:
    """The Anthropic API's error body."""
    body: dict[str, Any] = {"type": "error",
                            "error": {"type": err.error_type, "message": err.message}}
    if err.code:
        body["error"]["details"] = {"error_code": err.code}
    if request_id:
        body["request_id"] = request_id
    return body


def error_to_openai(err: ProxyError, request_id: str | None = None) -> dict:
    """OpenAI's error body (no request id in it), with the same statuses as the
    Anthropic side; `param` in OpenAI's notation (`input[0].arguments`)."""
    param = re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", err.param) if err.param else None
    return {"error": {"message": err.message, "type": err.error_type, "param": param,
                      "code": err.openai_code}}


# =============================================================================
# 3. HTTP/1.1 wire format -- request heads, bodies (length, chunked), response heads
# =============================================================================
# Pure parsing of bytes already read (RFC 9112). `parse_request_head` takes the
# bytes up to and including the blank line; `body_length` decides the framing;
# `ChunkedDecoder` is fed bytes and returns body bytes. Reading sockets is
# section 15's job.

HTTP_REASONS = {
    100: "Continue", 200: "OK", 204: "No Content", 400: "Bad Request",
    401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 413: "Content Too Large", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Gateway Timeout", 505: "HTTP Version Not Supported", 529: "Overloaded",
}
_TOKEN_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")      # RFC 9110 5.6.2
_TARGET_RE = re.compile(rb"/[\x21-\x7e]*")                    # origin-form only
# RFC 9110 7.2: uri-host [":" port], uri-host an IP literal or a reg-name (RFC 3986).
_HOST_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(:[0-9]*)?")


@dataclasses.dataclass
class RequestHead:
    """A parsed request line and header block."""

    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]

    def header(self, name: str, default: str | None = None) -> str | None:
        """The first value of a header (names are case-insensitive)."""
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return default

    @property
    def path(self) -> str:
        """The target without its query string."""
        return self.target.split("?", 1)[0]

    @property
    def query(self) -> dict[str, str]:
        """The query string's fields (the last of a repeated one)."""
        return dict(urllib.parse.parse_qsl(self.target.partition("?")[2]))

    @property
    def keep_alive(self) -> bool:
        """RFC 9112 9.3: 1.1 persists unless `close`; 1.0 only with `keep-alive`."""
        tokens = {t.strip().lower() for t in (self.header("connection") or "").split(",")}
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens


HEADER_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")     # all but HTAB


def parse_request_head(data: bytes) -> RequestHead:
    """Parse `request-line CRLF *(field-line CRLF) CRLF`; raise 400 or 431 errors."""
    lines = data.split(b"\r\n")
    while lines and lines[0] == b"":        # RFC 9112 2.2: ignore leading empty lines
        lines.pop(0)
    if not lines or not lines[0]:
        raise InvalidRequest("Empty request line.")
    request_line = lines[0]
    if len(request_line) > MAX_REQUEST_LINE:
        raise HeadersTooLarge("Request line too long.")
    parts = request_line.split(b" ")
    if len(parts) != 3:
        raise InvalidRequest("Malformed request line.")
    method, target, version = parts
    if not _TOKEN_RE.fullmatch(method):
        raise InvalidRequest("Malformed method.")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise InvalidRequest("Unsupported HTTP version.")
    if not _TARGET_RE.fullmatch(target):
        raise InvalidRequest("Malformed request target.")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line == b"":
            continue
        if line[:1] in (b" ", b"\t"):
            raise InvalidRequest("Obsolete header line folding is not accepted.")
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN_RE.fullmatch(name):
            raise InvalidRequest("Malformed header line.")
        if len(headers) >= MAX_HEADER_COUNT:
            raise HeadersTooLarge(f"More than {MAX_HEADER_COUNT} header fields.")
        value = value.strip(b" \t")
        if HEADER_CONTROL.search(value):
            raise InvalidRequest("Control character in a header value.")
        headers.append((name.decode("ascii").lower(), value.decode("latin-1")))
    hosts = sum(name == "host" for name, _ in headers)
    if hosts > 1 or (hosts == 0 and version == b"HTTP/1.1"):     # RFC 9112 3.2
        raise InvalidRequest("An HTTP/1.1 request needs exactly one Host header.")
    if any(name == "host" and not _HOST_RE.fullmatch(value) for name, value in headers):
        raise InvalidRequest("Host: must be a host name or address and an optional port.")
    return RequestHead(method.decode("ascii"), target.decode("ascii"),
                       version.decode("ascii"), headers)


_BARE_LF_RE = re.compile(rb"(?<!\r)\n")


def check_head_start(data: bytes) -> None:
    """Raise at once when the bytes read so far cannot begin an HTTP/1.x request
    head (a TLS handshake, bare-LF line ends), instead of at the head timeout."""
    start = data.lstrip(b"\r\n")          # empty lines before a request are ignored
    if start and not _TOKEN_RE.match(start[:1]):
        raise InvalidRequest("Not an HTTP/1.x request (TLS? this proxy speaks plain HTTP).")
    if _BARE_LF_RE.search(start):
        raise InvalidRequest("A line of the request head ends in a bare LF; HTTP/1.1 needs "
                             "CRLF (RFC 9112 section 2.2).")


def body_length(head: RequestHead) -> int | None:
    """Bytes of body to read, or None for chunked (RFC 9112 6.1-6.3)."""
    encodings = [v for k, v in head.headers if k == "transfer-encoding"]
    lengths = [v for k, v in head.headers if k == "content-length"]
    if encodings:
        if lengths:     # 6.1: both present is a smuggling vector; reject it
            raise InvalidRequest("Both Transfer-Encoding and Content-Length are present.")
        codings = [c.strip().lower() for v in encodings for c in v.split(",")]
        if codings != ["chunked"]:
            raise InvalidRequest("Only Transfer-Encoding: chunked is supported.")
        return None
    if not lengths:
        return 0
    values = {v.strip() for v in ",".join(lengths).split(",")}
    if len(values) != 1 or not re.fullmatch(r"[0-9]{1,18}", next(iter(values))):
        raise InvalidRequest("Invalid Content-Length.")
    return int(next(iter(values)))


class ChunkedDecoder:
    """Decode a chunked body (RFC 9112 7.1) from bytes fed in any pieces."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.size = 0
        self.done = False
        self._buf = bytearray()
        self._state = "size"        # size -> data -> crlf -> size ... -> trailer
        self._remaining = 0

    def feed(self, data: bytes) -> bytes:
        """Consume bytes; return the body bytes they complete; raise on bad framing."""
        self._buf += data
        out = bytearray()
        while not self.done:
            if self._state == "data":
                take = min(self._remaining, len(self._buf))
                if not take:
                    break
                out += self._buf[:take]
                del self._buf[:take]
                self._remaining -= take
                if not self._remaining:
                    self._state = "crlf"
                continue
            end = self._buf.find(b"\r\n")
            if end < 0:
                if len(self._buf) > MAX_REQUEST_LINE:
                    raise InvalidRequest("Chunk line too long.")
                break
            line = bytes(self._buf[:end])
            del self._buf[:end + 2]
            if self._state == "crlf":
                if line:
                    raise InvalidRequest("Malformed chunk: data longer than its size.")
                self._state = "size"
            elif self._state == "size":         # chunk-size [ chunk-ext ]
                size_text = line.split(b";", 1)[0].strip()
                if not re.fullmatch(rb"[0-9A-Fa-f]{1,16}", size_text):
                    raise InvalidRequest("Malformed chunk size.")
                self._remaining = int(size_text, 16)
                self.size += self._remaining
                if self.size > self.max_bytes:
                    raise RequestTooLarge(f"Request body exceeds {self.max_bytes} bytes.")
                self._state = "data" if self._remaining else "trailer"
            elif line == b"":                   # the blank line that ends the trailers
                self.done = True
        return bytes(out)

    @property
    def leftover(self) -> bytes:
        """Bytes fed past the end of the body (a pipelined next request)."""
        return bytes(self._buf)


def encode_response_head(status: int, headers: Iterable[tuple[str, str]]) -> bytes:
    """`HTTP/1.1 status reason` and header lines, ending with the blank line."""
    lines = [f"HTTP/1.1 {status} {HTTP_REASONS.get(status, 'Status')}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def encode_chunk(data: bytes) -> bytes:
    """One chunk of a chunked response; empty data is the last chunk."""
    return b"%x\r\n%s\r\n" % (len(data), data) if data else b"0\r\n\r\n"


# =============================================================================
# 4. SSE -- server-sent event frames
# =============================================================================
# The Anthropic API names every event (`event: message_start`); OpenAI's APIs send
# bare `data:` lines. Both end a frame with a blank line.

PROCESSING = b"HTTP/1.1 102 Processing\r\n\r\n"    # an interim answer: the status is to come
ANTHROPIC_PING = b'event: ping\ndata: {"type":"ping"}\n\n'
OPENAI_PING = b": ping\n\n"      # an SSE comment: OpenAI's clients skip it, proxies see bytes


def encode_sse(data: dict | str, event: str | None = None) -> bytes:
    """One SSE frame: optional `event:` line, one `data:` line, blank line."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"),
                                                            ensure_ascii=False)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode("utf-8")


# =============================================================================
# 5. Auth and models -- API key check, model mapping, the models list
# =============================================================================

MODEL_FAMILIES = ("opus", "sonnet", "haiku")
# Listed by the models routes. Ids are the CLI's aliases resolved (FACTS.md); the
# response to a request always carries the model the upstream really used.
MODEL_LIST = (
    ("claude-opus-5-5", "Claude Opus 5.5", "2026-09-01T00:00:00Z"),
    ("claude-sonnet-5-5", "Claude Sonnet 5.5", "2026-09-01T00:00:00Z"),
    ("claude-haiku-5-5", "Claude Haiku 5.5", "2026-09-01T00:00:00Z"),
    ("claude-opus-4-5-20251101", "Claude Opus 4.5", "2025-11-24T00:00:00Z"),
    ("claude-haiku-4-5-20251001", "Claude Haiku 4.5", "2025-10-15T00:00:00Z"),
)
_DATED_ID_RE = re.compile(r"-(20\d\d)(\d\d)(\d\d)$")
_CLAUDE_ID_RE = re.compile(r"^claude-[a-z0-9][a-z0-9.\-]*(\[1m\])?$")


def request_api_key(head: RequestHead) -> str | None:
    """The key a client sent as `x-api-key` or `Authorization: Bearer`, or (for a
    GET, which is how a browser reads the status page) as the password of
    `Authorization: Basic`. Basic is never taken for a POST or a DELETE: a browser
    would attach remembered credentials to another site's cross-site POST."""
    key = head.header("x-api-key")
    if key:
        return key.strip(" \t")        # only HTTP's whitespace: latin-1 has more
    scheme, _, token = (head.header("authorization") or "").partition(" ")
    token, scheme = token.strip(" \t"), scheme.lower()
    if scheme == "basic" and head.method in ("GET", "HEAD"):
        with contextlib.suppress(binascii.Error, ValueError):
            return base64.b64decode(token, validate=True).partition(b":")[2].decode(
                "latin-1") or None
        return None
    return token if scheme == "bearer" and token else None


def key_digest(key: bytes) -> bytes:
    """What a key is known by in memory: looked up by digest, so the lookup's time
    tells nothing about the keys, and no key sits in a dump."""
    return hashlib.sha256(b"claude-sdk-proxy key\0" + key).digest()


def check_api_key(head: RequestHead, names: Mapping[bytes, str]) -> str:
    """The name of the key the request carries (`names`: key digest -> name);
    raise 401 without one of them."""
    given = request_api_key(head)
    challenge = {"www-authenticate": 'Basic realm="claude-sdk-proxy", charset="UTF-8"'} \
        if head.method in ("GET", "HEAD") else {}
    if given is None:
        raise AuthenticationFailed("Missing API key: send it as x-api-key or "
                                   "Authorization: Bearer.", challenge)
    # Header values are read as latin-1, so this digests the bytes the client sent,
    # as the configured keys (which may be any text) were digested as UTF-8.
    name = names.get(key_digest(given.encode("latin-1")))
    if name is None:
        raise AuthenticationFailed("Invalid API key.", challenge)
    return name


ENV_KEY_NAME = "default"        # CLAUDE_PROXY_API_KEY's name beside the key file's
KEYLESS_NAME = "local"          # who calls a keyless proxy: this machine's programs
KEY_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+-]{0,63}")
MIN_FILE_KEY_CHARS = 16         # shorter is guessable, or a name in the key's place


def parse_keys(text: str) -> dict[str, str]:
    """A key file's `name key` lines (blank lines and `#` comments skipped) as
    name -> key; raise ValueError naming the line by number only (a line in the
    wrong order would show a key in the name's place)."""
    keys: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, key = (line.split(None, 1) + [""])[:2]
        if not KEY_NAME_RE.fullmatch(name):
            raise ValueError(f"line {number}: a name is letters, digits and _.@+- "
                             "(at most 64), then spaces and the key")
        if len(key) < MIN_FILE_KEY_CHARS or any(c.isspace() for c in key):
            raise ValueError(f"line {number}: the key after the name is missing, shorter "
                             f"than {MIN_FILE_KEY_CHARS} characters or has a space")
        if name in keys:
            raise ValueError(f"line {number}: its name is used twice")
        if key in keys.values():
            raise ValueError(f"line {number}: the same key as another name")
        keys[name] = key
    if not keys:
        raise ValueError("no keys in it (an emptied file is taken for an edit under way)")
    return keys


LOCAL_NAMES = re.compile(r"(.+\.)?(localhost|internal)\.?")   # no one can register these


def check_local_caller(head: RequestHead) -> None:
    """Raise 403 unless a request to a keyless proxy comes from this machine's programs.

    Without a key, listening on loopback is the only protection, and a browser on
    this machine carries any web page across it: a cross-site POST with a text/plain
    body needs no CORS preflight, and a DNS name rebound to 127.0.0.1 lets the page
    read the answers too. Browsers send the page's `Origin` on every such POST, and
    a rebound page's `Host` is the attacker's domain name. So a web page's Origin
    must be a loopback one, and Host an address or a name no one can register
    (localhost, *.internal as in host.docker.internal). Apps' own origins
    (app://, vscode-webview://, extensions) are the operator's software; "null"
    (any site's sandboxed frame) is not.
    """
    def host_of(url: str) -> str | None:
        with contextlib.suppress(ValueError):
            return urllib.parse.urlsplit(url).hostname
        return None

    host, origin = head.header("host"), head.header("origin")
    name = host_of("//" + host) if host else ""
    local_host = name is not None and (
        not name or LOCAL_NAMES.fullmatch(name) is not None or _is_ip(name))
    web_origin = origin is not None and (origin == "null" or origin.lower().startswith(
        ("http://", "https://")))
    origin_name = host_of(origin) or "" if web_origin else ""
    local_origin = LOCAL_NAMES.fullmatch(origin_name) is not None or is_loopback(origin_name)
    if not local_host or (web_origin and not local_origin):
        raise PermissionDenied(
            "This proxy has no API key, so it answers only requests addressed to this "
            "machine (an IP address, localhost) and not sent from a web page of another "
            "site. Set CLAUDE_PROXY_API_KEY to serve other callers.")


# What a browser app may send and read (CORS). Keys travel in headers, never in
# cookies, so allowing an origin grants it nothing it does not already hold: a web
# page gets answers only with the proxy's key (or, keyless, from loopback pages).
CORS_METHODS = "GET, POST, DELETE, OPTIONS"
CORS_MAX_AGE_S = 600


def cors_headers(head: RequestHead) -> dict[str, str]:
    """The CORS headers of a response to a browser's request (none without Origin)."""
    origin = head.header("origin")
    if origin is None:
        return {}
    return {"access-control-allow-origin": origin, "vary": "Origin",
            "access-control-expose-headers": "*"}


def preflight_headers(head: RequestHead) -> dict[str, str] | None:
    """The answer headers to a CORS preflight; None when the request is not one."""
    if head.method != "OPTIONS" or head.header("origin") is None or \
            head.header("access-control-request-method") is None:
        return None
    return {"access-control-allow-methods": CORS_METHODS,
            "access-control-allow-headers":
                head.header("access-control-request-headers") or "*",
            "access-control-max-age": str(CORS_MAX_AGE_S)}


def wants_html(head: RequestHead) -> bool:
    """A browser's page load: a GET that asks for HTML (clients of the APIs ask for
    JSON; a HEAD is a monitor's, whatever it accepts)."""
    return head.method == "GET" and "text/html" in (head.header("accept") or "").lower()


def is_liveness_probe(head: RequestHead) -> bool:
    """GET / (or HEAD /) from a program (a browser gets the status page): answered
    without the key, with nothing but "ok"."""
    return head.method in ("GET", "HEAD") and (head.path.rstrip("/") or "/") == "/" \
        and not wants_html(head)


def _is_ip(name: str) -> bool:
    with contextlib.suppress(ValueError):
        return bool(ipaddress.ip_address(name))
    return False


def resolve_model(requested: str, default: str) -> str:
    """A real Claude id passes through; otherwise the family named, else the default."""
    name = requested.strip().lower()
    if _CLAUDE_ID_RE.match(name) and any(f in name for f in MODEL_FAMILIES):
        return requested.strip()
    for family in MODEL_FAMILIES:
        if family in name:
            return family
    return default


def model_entry(model_id: str, display_name: str, created_at: str) -> dict:
    """One model in a shape both the anthropic and the openai SDK accept."""
    created = int(dt.datetime.fromisoformat(created_at.replace("Z", "+00:00")).timestamp())
    return {"type": "model", "id": model_id, "display_name": display_name,
            "created_at": created_at, "object": "model", "created": created,
            "owned_by": "anthropic"}


def models_list() -> dict:
    """The models list page: Anthropic's fields and OpenAI's `object: list`."""
    data = [model_entry(*entry) for entry in MODEL_LIST]
    return {"object": "list", "data": data, "has_more": False,
            "first_id": data[0]["id"], "last_id": data[-1]["id"]}


def model_lookup(model_id: str) -> dict:
    """One listed model, or a model-like entry for an id the proxy would pass on."""
    for entry in MODEL_LIST:
        if entry[0] == model_id:
            return model_entry(*entry)
    lowered = model_id.lower()
    if _CLAUDE_ID_RE.match(lowered) and any(f in lowered for f in MODEL_FAMILIES):
        dated = _DATED_ID_RE.search(lowered)
        created = "-".join(dated.groups()) + "T00:00:00Z" if dated else MODEL_LIST[0][2]
        return model_entry(model_id, model_display_name(lowered), created)
    raise NotFound(f"model: {model_id}")


def model_display_name(model_id: str) -> str:
    """"claude-opus-4-7" -> "Claude Opus 4.7" (a date and a [1m] suffix left out)."""
    words = _DATED_ID_RE.sub("", model_id.removesuffix("[1m]")).split("-")
    names = [word.capitalize() for word in words if not word.isdigit()]
    version = ".".join(word for word in words if word.isdigit())
    return " ".join(names + [version] if version else names)


# =============================================================================
# 6. Messages API requests -- validation into a Turn, threads, token estimate
# =============================================================================
# `messages_request_to_turn` validates a Messages API body and splits it into what
# the CLI gets through its own channels (model, system prompt, earlier turns as a
# transcript, the new user turn) and what rides in its extra request body (the
# parameters). The shared structural rules (tool pairs, blank text) live here and
# the OpenAI dialects reach them through it. `estimate_tokens` serves count_tokens.

# Parameters carried verbatim in CLAUDE_CODE_EXTRA_BODY, merged last into the
# CLI's upstream body (FACTS.md, "Carrying the client's parameters").
CARRIED_PARAMS = ("max_tokens", "temperature", "top_p", "top_k", "stop_sequences",
                  "thinking", "service_tier", "output_config", "speed", "cache_control")
EFFORTS = ("low", "medium", "high", "xhigh", "max")
# Accepted and not carried: the CLI owns them (metadata.user_id is its session).
IGNORED_PARAMS = ("metadata", "stream", "model", "messages", "system", "container",
                  "mcp_servers", "context_management")
KNOWN_BLOCK_TYPES = {
    "user": {"text", "image", "document", "tool_result", "search_result"},
    "assistant": {"text", "thinking", "redacted_thinking", "tool_use", "server_tool_use",
                  "web_search_tool_result"},
}


@dataclasses.dataclass(frozen=True)
class Turn:
    """One request as the engine needs it: the CLI's inputs and the carried params."""

    model: str
    system: str
    history: list[dict]             # earlier messages, exactly as the client sent them
    prompt: dict                    # the new user message {"role": "user", "content": ...}
    params: dict                    # carried into the upstream body as sent
    stream: bool = False
    caller: str = ""                # who asks: a hash of the API key and the user id
    tools: list[dict] = dataclasses.field(default_factory=list)  # name, description, schema
    betas: str = ""                 # the client's anthropic-beta header

    @functools.cached_property
    def shape(self) -> str:
        """What a CLI is fixed to for its life: a session serves only its own shape."""
        fixed = [self.model, self.system, self.params, self.caller, self.tools, self.betas]
        return hashlib.sha256(json.dumps(fixed, sort_keys=True).encode()).hexdigest()[:24]


def parse_json_body(body: bytes) -> dict:
    """The request body as a JSON object, or a 400 saying what is wrong."""
    if not body:
        raise InvalidRequest("Request body is empty; expected a JSON object.")
    try:
        # NaN and Infinity are not JSON (RFC 8259 section 6); Python writes them back
        # as such, and the CLI then ignores the whole extra body that carries them.
        value = json.loads(body, parse_constant=_not_json)
        if _ESCAPED_SURROGATE.search(body):
            # A lone surrogate has no UTF-8 form: the CLI cannot be given it.
            json.dumps(value, ensure_ascii=False).encode("utf-8")
    except RecursionError:
        raise InvalidRequest("Request body is not valid JSON: nested too deeply.") from None
    except (UnicodeError, ValueError) as exc:
        raise InvalidRequest(f"Request body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidRequest("Request body must be a JSON object.")
    return value


_ESCAPED_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise InvalidRequest(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_content(role: str, content: Any, where: str) -> None:
    """Validate one message's content: a string or a list of known blocks."""
    if isinstance(content, str):
        return
    _require(isinstance(content, list), f"{where}.content: must be a string or a list of "
                                        "content blocks.")
    for i, block in enumerate(content):
        at = f"{where}.content.{i}"
        _require(isinstance(block, dict) and isinstance(block.get("type"), str),
                 f"{at}: must be an object with a type.")
        kind = block["type"]
        _require(kind in KNOWN_BLOCK_TYPES[role],
                 f"{at}.type: '{kind}' is not a valid block in a message with role '{role}'.")
        if kind == "text":
            _require(isinstance(block.get("text"), str), f"{at}.text: must be a string.")
        elif kind in ("image", "document"):
            source = block.get("source")
            _require(isinstance(source, dict) and source.get("type") in
                     ("base64", "url", "text", "content", "file"),
                     f"{at}.source: must be a base64, url, text, content or file source.")
            if source["type"] == "base64":
                _require(isinstance(source.get("data"), str) and
                         isinstance(source.get("media_type"), str),
                         f"{at}.source: base64 sources need media_type and data.")
            if source["type"] == "url":
                _require(isinstance(source.get("url"), str), f"{at}.source.url: required.")
        elif kind == "tool_use":
            _require(isinstance(block.get("id"), str) and isinstance(block.get("name"), str)
                     and isinstance(block.get("input"), dict),
                     f"{at}: tool_use needs id, name and an input object.")
        elif kind == "tool_result":
            _require(isinstance(block.get("tool_use_id"), str),
                     f"{at}.tool_use_id: required.")
            inner = block.get("content")
            if inner is not None and not isinstance(inner, str):
                _require(isinstance(inner, list), f"{at}.content: must be a string or list.")
                for j, part in enumerate(inner):
                    _require(isinstance(part, dict) and part.get("type") in
                             ("text", "image", "document", "search_result"),
                             f"{at}.content.{j}: must be a text, image or document block.")
                    _require(part["type"] == "text" or not block.get("is_error"),
                             f"{at}.content: all content must be type 'text' if 'is_error' "
                             "is true.")       # as the API says
                check_content("user", inner, at)
        elif kind == "thinking":
            _require(isinstance(block.get("thinking"), str), f"{at}.thinking: required.")


def check_text_present(content: Any, where: str) -> None:
    """The API's rules for a message's text: something in every message and every
    text block (the CLI would send "(no content)" instead, or drop the block)."""
    _require(content != [], f"{where}: all messages must have non-empty content except "
                            "for the optional final assistant message")
    texts = [content] if isinstance(content, str) else \
        [block["text"] for block in content if block["type"] == "text"]
    _require(all(texts), "messages: text content blocks must be non-empty")
    _require(all(text.strip() for text in texts),
             "messages: text content blocks must contain non-whitespace text")


def check_tool_pairs(turns: list[dict], indices: list[int]) -> None:
    """The API's rule for client tools: every tool_use of an assistant message is
    answered by a tool_result at the start of the next message, and every
    tool_result answers one of the message before. The CLI would make up what is
    missing and drop what is unexpected. `indices` are the client's message indices."""
    offered: list[str] = []
    offered_at = 0
    for turn, at in zip(turns, indices):
        blocks = turn["content"] if isinstance(turn["content"], list) else []
        if turn["role"] == "assistant":
            offered = [block["id"] for block in blocks if block["type"] == "tool_use"]
            offered_at = at
            continue
        leading = []
        for block in blocks:
            if block["type"] != "tool_result":
                break
            leading.append(block["tool_use_id"])
        missing = [tool_id for tool_id in offered if tool_id not in leading]
        _require(not missing, f"messages.{offered_at}: `tool_use` ids were found without "
                              f"`tool_result` blocks immediately after: {', '.join(missing)}. "
                              "Each `tool_use` block must have a corresponding `tool_result` "
                              "block in the next message.")
        for j, block in enumerate(blocks):
            _require(block["type"] != "tool_result" or block["tool_use_id"] in offered,
                     f"messages.{at}.content.{j}: unexpected `tool_use_id` found in "
                     f"`tool_result` blocks: {block.get('tool_use_id')}. Each `tool_result` "
                     "block must have a corresponding `tool_use` block in the previous "
                     "message.")
        offered = []


def system_to_text(system: Any) -> str:
    """The system prompt as the one string the CLI takes (blocks joined by blank lines)."""
    if system is None:
        return ""
    if isinstance(system, str):
        return system
    _require(isinstance(system, list), "system: must be a string or a list of text blocks.")
    texts = []
    for i, block in enumerate(system):
        _require(isinstance(block, dict) and block.get("type") == "text"
                 and isinstance(block.get("text"), str),
                 f"system.{i}: must be a text block.")
        texts.append(block["text"])
    return "\n\n".join(texts)


def check_params(body: dict, max_tokens_required: bool = True) -> dict:
    """Validate the carried parameters and return them as they will be sent."""
    params = {k: body[k] for k in CARRIED_PARAMS if k in body and body[k] is not None}
    max_tokens = params.get("max_tokens")
    if max_tokens is not None or max_tokens_required:
        _require(_is_int(max_tokens) and max_tokens >= 1,
                 "max_tokens: required, an integer of at least 1.")
    if "temperature" in params:
        _require(_is_number(params["temperature"]) and 0 <= params["temperature"] <= 1,
                 "temperature: must be a number between 0 and 1.")
    if "top_p" in params:
        _require(_is_number(params["top_p"]) and 0 <= params["top_p"] <= 1,
                 "top_p: must be a number between 0 and 1.")
    if "top_k" in params:
        _require(_is_int(params["top_k"]) and params["top_k"] >= 0,
                 "top_k: must be a non-negative integer.")
    if "stop_sequences" in params:
        stops = params["stop_sequences"]
        _require(isinstance(stops, list) and all(isinstance(s, str) and s for s in stops),
                 "stop_sequences: must be a list of non-empty strings.")
    if "thinking" in params:
        thinking = params["thinking"]
        _require(isinstance(thinking, dict) and thinking.get("type") in
                 ("enabled", "disabled", "adaptive"),
                 "thinking.type: must be 'enabled', 'adaptive' or 'disabled'.")
        if thinking["type"] == "enabled":
            budget = thinking.get("budget_tokens")
            _require(_is_int(budget) and budget >= 1024,
                     "thinking.budget_tokens: an integer of at least 1024.")
            _require(max_tokens is None or budget < max_tokens,
                     "max_tokens: must be greater than thinking.budget_tokens.")
        if thinking["type"] == "disabled":
            del params["thinking"]      # absent already means no thinking upstream
    if "service_tier" in params:
        _require(params["service_tier"] in ("auto", "standard_only"),
                 "service_tier: must be 'auto' or 'standard_only'.")
    if "output_config" in params:
        config = params["output_config"]
        _require(isinstance(config, dict), "output_config: must be an object.")
        _require(config.get("effort") is None or config["effort"] in EFFORTS,
                 f"output_config.effort: must be one of {', '.join(EFFORTS)}.")
        output_format = config.get("format")
        _require(output_format is None or isinstance(output_format, dict) and
                 output_format.get("type") == "json_schema" and
                 isinstance(output_format.get("schema"), dict),
                 "output_config.format: must be {\"type\": \"json_schema\", \"schema\": {...}}.")
    if "speed" in params:
        _require(params["speed"] in ("fast", "standard"), "speed: must be 'fast' or 'standard'.")
    if "cache_control" in params:
        _require(isinstance(params["cache_control"], dict) and
                 params["cache_control"].get("type") == "ephemeral",
                 "cache_control: must be {\"type\": \"ephemeral\"} (with an optional ttl).")
    return params


def with_output_format(body: dict) -> dict:
    """The body with the structured-outputs beta's top-level `output_format` (still
    sent by clients such as LiteLLM) moved to `output_config.format`, its GA place."""
    if body.get("output_format") is None:
        return body
    config = body.get("output_config")
    _require(config is None or isinstance(config, dict), "output_config: must be an object.")
    _require((config or {}).get("format") is None,
             "output_format: give the format once, as output_config.format.")
    return {**body, "output_config": {**(config or {}), "format": body["output_format"]}}


TOOL_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def check_tools(tools: Any) -> list[dict]:
    """Validate the client tools; return what of each reaches the upstream."""
    if tools is None:
        return []
    _require(isinstance(tools, list), "tools: must be a list.")
    seen = set()
    for i, tool in enumerate(tools):
        at = f"tools.{i}"
        _require(isinstance(tool, dict), f"{at}: must be an object.")
        _require(tool.get("type") in (None, "custom"),
                 f"{at}.type: '{tool.get('type')}' is a server tool; only custom tools can "
                 "be carried through the Claude Code CLI.")
        name = tool.get("name")
        _require(isinstance(name, str) and TOOL_NAME_RE.match(name) is not None,
                 f"{at}.name: must be 1-64 letters, digits, underscores or dashes.")
        _require(name not in seen, f"{at}.name: '{name}' is used twice.")
        seen.add(name)
        _require(isinstance(tool.get("description", ""), str),
                 f"{at}.description: must be a string.")
        schema = tool.get("input_schema")
        _require(isinstance(schema, dict) and schema.get("type") == "object",
                 f"{at}.input_schema: must be a JSON schema with type 'object'.")
    # Only these reach the upstream (the MCP tool list has no place for the rest):
    # `strict`, `cache_control`, `eager_input_streaming` and the like must not make
    # two requests of one conversation two shapes.
    return [{key: tool[key] for key in ("name", "description", "input_schema") if key in tool}
            for tool in tools]


def check_tool_choice(choice: Any, tools: list[dict]) -> dict:
    """Validate tool_choice; return it as the upstream gets it (upstream tool names)."""
    _require(isinstance(choice, dict) and choice.get("type") in ("auto", "any", "tool", "none"),
             "tool_choice.type: must be 'auto', 'any', 'tool' or 'none'.")
    if "disable_parallel_tool_use" in choice:
        _require(isinstance(choice["disable_parallel_tool_use"], bool),
                 "tool_choice.disable_parallel_tool_use: must be a boolean.")
    if choice["type"] in ("any", "tool"):
        _require(bool(tools), f"tool_choice.type: '{choice['type']}' needs tools.")
    if choice["type"] == "tool":
        names = [tool["name"] for tool in tools]
        _require(choice.get("name") in names,
                 "tool_choice.name: must name one of the request's tools.")
        return {**choice, "name": upstream_tool_name(choice["name"])}
    return dict(choice)


def dropped_params(body: dict) -> list[str]:
    """Request fields the proxy neither carries nor owns (logged with --debug)."""
    return sorted(set(body) - set(CARRIED_PARAMS) - set(IGNORED_PARAMS) -
                  {"tools", "tool_choice", "output_format", "thread"})


def messages_request_to_turn(body: dict, default_model: str, caller: str = "",
                             max_tokens_required: bool = True) -> Turn:
    """Validate a Messages API request body and split it into a Turn (without
    max_tokens, when not required, the CLI's default for the model applies)."""
    model = body.get("model")
    _require(isinstance(model, str) and model.strip() != "", "model: required, a string.")
    messages = body.get("messages")
    _require(isinstance(messages, list) and messages != [],
             "messages: required, a non-empty list.")
    notes, turns, indices = [], [], []
    for i, message in enumerate(messages):
        _require(isinstance(message, dict), f"messages.{i}: must be an object.")
        role = message.get("role")
        _require(role in ("user", "assistant", "system"),
                 f"messages.{i}.role: must be 'user', 'assistant' or 'system'.")
        _require("content" in message, f"messages.{i}.content: required.")
        if role == "system":
            # The CLI has no channel for a system message between the turns (Claude
            # Code sends its environment note so): it joins the system prompt.
            notes.append(system_to_text(message["content"]))
            continue
        check_content(role, message["content"], f"messages.{i}")
        check_text_present(message["content"], f"messages.{i}")
        if not turns or turns[-1]["role"] != role:
            indices.append(i)
        append_turn(turns, role, message["content"])
    messages = turns
    _require(bool(messages) and messages[-1]["role"] == "user",
             "messages: the last message must have role 'user'; prefilling the "
             "assistant's answer cannot be carried through the Claude Code CLI.")
    check_tool_pairs(messages, indices)
    if "stream" in body:
        _require(isinstance(body["stream"], bool), "stream: must be a boolean.")
    tools = check_tools(body.get("tools"))
    params = check_params(with_output_format(body), max_tokens_required)
    if body.get("tool_choice") is not None:
        params["tool_choice"] = check_tool_choice(body["tool_choice"], tools)
    metadata = body.get("metadata")
    if metadata is not None:
        _require(isinstance(metadata, dict), "metadata: must be an object.")
        user_id = metadata.get("user_id")
        if user_id is not None:
            _require(isinstance(user_id, str), "metadata.user_id: must be a string.")
            caller = f"{caller}/{user_id}"
    return Turn(
        model=resolve_model(model, default_model),
        system="\n\n".join(text for text in [system_to_text(body.get("system"))] + notes
                             if text),
        history=[dict(m) for m in messages[:-1]],
        prompt={"role": "user", "content": messages[-1]["content"]},
        params=params,
        stream=bool(body.get("stream")),
        caller=caller,
        tools=tools,
    )


def append_turn(messages: list[dict], role: str, content: Any) -> None:
    """Add a message; consecutive messages of one side become one (the CLI would
    put a turn of its own between them)."""
    if not messages or messages[-1]["role"] != role:
        messages.append({"role": role, "content": content})
        return
    def blocks(value: Any) -> list:
        return [{"type": "text", "text": value}] if isinstance(value, str) else list(value)
    messages[-1] = {"role": role, "content": blocks(messages[-1]["content"]) + blocks(content)}


# -- message threads (beta message-threads-2026-08-12) -------------------------

THREADS_BETA = "message-threads-"
THREAD_FIXED = ("system", "tools")      # kept from the create; everything else per turn


def parse_thread(body: dict) -> str | None:
    """A thread request's `previous_message_id`: "" for a create, None without `thread`."""
    thread = body.get("thread")
    if thread is None:
        return None
    _require(isinstance(thread, dict) and thread.get("type") in ("create", "continue"),
             "thread.type: must be 'create' or 'continue'.")
    if thread["type"] == "create":
        return ""
    previous = thread.get("previous_message_id")
    _require(isinstance(previous, str) and previous != "",
             "thread.previous_message_id: required, a string.")
    return previous


def thread_continued(body: dict, fixed: dict, messages: list[dict]) -> dict:
    """A `continue` request as the whole request it stands for: the thread's system
    prompt, tools and conversation, then this request's messages and parameters."""
    differing = [name for name in THREAD_FIXED if name in body and body[name] != fixed.get(name)]
    if differing:
        raise InvalidRequest(f"thread: {', '.join(differing)} cannot change within a thread "
                             "(it keeps those of its create request).",
                             code="thread_fingerprint_mismatch")
    new = body.get("messages")
    _require(isinstance(new, list), "messages: required, a list.")
    return {**body, **fixed, "messages": messages + new}


def without_threads_beta(betas: str) -> str:
    """The anthropic-beta header without the threads beta (served here)."""
    return ",".join(beta.strip() for beta in betas.split(",")
                    if beta.strip() and not beta.strip().startswith(THREADS_BETA))


# -- token estimate ------------------------------------------------------------

# Token estimate for count_tokens. The CLI offers no counting call, so the proxy
# estimates: text by a word-piece rule tuned to Claude's tokenizer on English and
# code (~3.5-4 characters a token; CJK about one a character), images by the API's
# documented (width x height) / 750 after its resize to a 1568 px long edge and
# ~1.15 megapixels, PDFs by pages, tools by their JSON.
_PIECE_RE = re.compile(r"[A-Za-z]+|[0-9]{1,3}|[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]"
                       r"|[^\sA-Za-z0-9]")
IMAGE_URL_TOKENS = 1600             # an unseen image is costed at the API's maximum
TOOLS_OVERHEAD_TOKENS = 346         # the tool-use system prompt the API adds (its docs)
MESSAGE_OVERHEAD_TOKENS = 4


def estimate_text_tokens(text: str) -> int:
    """Tokens for text: long words split every ~6 letters, punctuation one each."""
    total = 0
    for piece in _PIECE_RE.findall(text):
        total += math.ceil(len(piece) / 6) if piece[0].isascii() and piece.isalpha() else 1
    return total


def image_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG, GIF, JPEG or WebP header, if recognisable."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return struct.unpack("<HH", data[6:10])
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        chunk = data[12:16]
        if chunk == b"VP8X":
            return (1 + int.from_bytes(data[24:27], "little"),
                    1 + int.from_bytes(data[27:30], "little"))
        if chunk == b"VP8L" and len(data) >= 25:
            bits = int.from_bytes(data[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if chunk == b"VP8 " and len(data) >= 30:
            w, h = struct.unpack("<HH", data[26:30])
            return w & 0x3FFF, h & 0x3FFF
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(data):
            if data[i] != 0xFF:
                return None
            marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                h, w = struct.unpack(">HH", data[i + 5:i + 9])
                return w, h
            i += 2 + length
    return None


def image_tokens(width: int, height: int) -> int:
    """The API's image cost: fit to a 1568 px long edge and ~1.15 MP, then w*h/750."""
    scale = min(1.0, 1568 / max(width, height, 1), math.sqrt(1_150_000 / max(width * height, 1)))
    return max(1, math.ceil(width * scale * height * scale / 750))


def estimate_block_tokens(block: dict) -> int:
    """Tokens for one content block of any kind."""
    kind = block.get("type")
    if kind == "text":
        return estimate_text_tokens(block.get("text", ""))
    if kind in ("image", "document"):
        source = block.get("source") or {}
        if source.get("type") == "text":
            return estimate_text_tokens(source.get("data", ""))
        if source.get("type") == "content":
            return sum(estimate_block_tokens(b) for b in source.get("content") or [])
        if source.get("type") != "base64":
            return IMAGE_URL_TOKENS
        try:
            raw = base64.b64decode(source.get("data", ""), validate=False)
        except (binascii.Error, ValueError):
            return IMAGE_URL_TOKENS
        if kind == "document":   # a PDF page costs its text plus an image of the page
            pages = max(1, raw.count(b"/Type /Page") - raw.count(b"/Type /Pages")
                        + raw.count(b"/Type/Page") - raw.count(b"/Type/Pages"))
            return pages * 1500
        size = image_size(raw)
        return image_tokens(*size) if size else IMAGE_URL_TOKENS
    if kind == "tool_use":
        return estimate_text_tokens(block.get("name", "") + json.dumps(block.get("input")))
    if kind == "tool_result":
        inner = block.get("content")
        if isinstance(inner, str):
            return estimate_text_tokens(inner) + 3
        return sum(estimate_block_tokens(b) for b in inner or []) + 3
    if kind == "thinking":
        return estimate_text_tokens(block.get("thinking", ""))
    return estimate_text_tokens(json.dumps(block))


def estimate_tokens(body: dict) -> int:
    """count_tokens: system, every message's blocks, tools and their overhead."""
    total = estimate_text_tokens(system_to_text(body.get("system")))
    for message in body.get("messages") or []:
        content = message.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        total += MESSAGE_OVERHEAD_TOKENS + sum(estimate_block_tokens(b) for b in blocks or [])
    tools = body.get("tools") or []
    if tools:
        total += TOOLS_OVERHEAD_TOKENS + estimate_text_tokens(json.dumps(tools))
    return max(1, total)


def check_count_tokens_request(body: dict) -> None:
    """count_tokens takes the Messages body without max_tokens."""
    model = body.get("model")
    _require(isinstance(model, str) and model.strip() != "", "model: required, a string.")
    messages = body.get("messages")
    _require(isinstance(messages, list), "messages: required, a list.")
    for i, message in enumerate(messages):
        _require(isinstance(message, dict) and message.get("role") in ("user", "assistant",
                                                                       "system"),
                 f"messages.{i}.role: must be 'user', 'assistant' or 'system'.")
        if message["role"] == "system":
            system_to_text(message.get("content"))
        else:
            check_content(message["role"], message.get("content"), f"messages.{i}")
    system_to_text(body.get("system"))
    tools = body.get("tools")
    _require(tools is None or isinstance(tools, list), "tools: must be a list.")


# =============================================================================
# 7. Conversations on the CLI -- tool names, transcripts, identity, the answer
# =============================================================================
# What a conversation becomes on its way through the CLI and back: client tools
# under the MCP names the upstream knows (`upstream_tool_name`), earlier turns as
# the CLI's session lines (`transcript_entries`), the identity a live session is
# found by (`conversation_hash`), the client's results for a parked turn
# (`tool_results`), and the answer folded into one Message (`AgentStream`,
# `MessageAssembler`).

MCP_SERVER = "c"
MCP_PREFIX = f"mcp__{MCP_SERVER}__"
# The longest text result of an MCP tool a CLI keeps in the conversation (the
# ceiling of the tool's `anthropic/maxResultSizeChars`, in UTF-16 units), and the
# longest error text it keeps whole (measured: 11,000 whole, 11,500 cut).
MCP_RESULT_MAX_CHARS = 500_000
MCP_ERROR_MAX_CHARS = 10_000


def upstream_tool_name(name: str) -> str:
    """The name the upstream knows a client tool by (at most 64 characters)."""
    if len(MCP_PREFIX) + len(name) <= 64:
        return MCP_PREFIX + name
    return f"{MCP_PREFIX}{name[:47]}_{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def client_tool_names(tools: list[dict]) -> dict[str, str]:
    """Upstream name -> client name, for every client tool."""
    return {upstream_tool_name(tool["name"]): tool["name"] for tool in tools}


def rename_tool_uses(messages: list[dict], names: dict[str, str]) -> list[dict]:
    """Messages with each tool_use renamed through `names` (other names kept)."""
    renamed = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list) and any(b.get("type") == "tool_use" for b in content):
            content = [{**b, "name": names.get(b["name"], b["name"])}
                       if b.get("type") == "tool_use" else b for b in content]
        renamed.append({**message, "content": content})
    return renamed


def client_event(event: dict, names: dict[str, str]) -> dict:
    """An upstream stream event with its tool_use under the client's tool name."""
    block = event.get("content_block")
    if event.get("type") == "content_block_start" and (block or {}).get("type") == "tool_use":
        return {**event, "content_block": {**block, "name": names.get(block["name"],
                                                                        block["name"])}}
    return event


def tool_results(prompt: dict, pending: list[str]) -> dict[str, dict] | None:
    """The MCP results for the `pending` tool calls, when the prompt is exactly their
    tool_results; None when it holds anything else or a result MCP cannot carry
    whole (the transcript then carries it)."""
    content = prompt["content"]
    if not isinstance(content, list) or any(b["type"] != "tool_result" for b in content):
        return None
    results = {}
    for block in content:
        inner = block.get("content")
        parts = [{"type": "text", "text": inner}] if isinstance(inner, str) else inner or []
        mcp = []
        for part in parts:
            source = part.get("source")
            if part.get("type") == "text" and isinstance(part.get("text"), str):
                mcp.append({"type": "text", "text": part["text"]})
            elif part.get("type") == "image" and isinstance(source, dict) and \
                    source.get("type") == "base64" and isinstance(source.get("data"), str) \
                    and isinstance(source.get("media_type"), str):
                mcp.append({"type": "image", "data": source["data"],
                            "mimeType": source["media_type"]})
            else:
                return None
        is_error = bool(block.get("is_error"))
        if not mcp_carries_whole(mcp, is_error):
            return None
        results[block["tool_use_id"]] = {"content": mcp, "is_error": is_error}
    return results if sorted(results) == sorted(pending) else None


def mcp_carries_whole(content: list[dict], is_error: bool) -> bool:
    """Whether a parked CLI passes this MCP tool result on as it is. In place of a
    blank result it sends words of its own ("(mcp__c__x completed with no output)",
    "Command failed with no output"), and in place of a text result longer than
    MCP_RESULT_MAX_CHARS a file path and a preview; a result with an image it
    keeps. Of an error it keeps only the text, parts joined, trimmed, and the
    middle cut out of a long one (MCP_ERROR_MAX_CHARS is short of that)."""
    texts = [part["text"] for part in content if part["type"] == "text"]
    # UTF-16 units, as JavaScript counts; a lone surrogate is one.
    length = sum(len(text.encode("utf-16-le", "surrogatepass")) // 2 for text in texts)
    if is_error:
        return len(content) == len(texts) == 1 and 0 < length <= MCP_ERROR_MAX_CHARS \
            and not trimmed(texts[0][0]) and not trimmed(texts[0][-1])
    if len(texts) < len(content):
        return True
    return not all(trimmed(char) for text in texts for char in text) and \
        length <= MCP_RESULT_MAX_CHARS


def trimmed(char: str) -> bool:
    """Whether JavaScript's trim() removes this character: Python's isspace() says
    so of a few more, which only sends their results the transcript way."""
    return char.isspace() or char == "\ufeff"


def echoed_blocks(content: Any) -> list:
    """The part of a message's content a client reliably echoes back.

    Clients resend earlier turns with cache_control marks added or moved, strings
    for single text blocks, and often without thinking blocks; none of that
    changes the conversation, so none of it takes part in matching.
    """
    blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
    echoed = []
    for block in blocks:
        kind = block.get("type")
        if kind in ("thinking", "redacted_thinking"):
            continue
        if kind == "text":
            echoed.append(["text", block.get("text")])
        elif kind == "tool_use":
            echoed.append(["tool_use", block.get("id"), block.get("name"), block.get("input")])
        elif kind == "tool_result":
            echoed.append(["tool_result", block.get("tool_use_id"),
                           bool(block.get("is_error")), echoed_blocks(block.get("content") or [])])
        else:
            echoed.append({k: v for k, v in block.items() if k != "cache_control"})
    return echoed


SORTED_JSON = json.JSONEncoder(sort_keys=True)     # json.dumps(sort_keys=True), built once


def conversation_hash(messages: list[dict], before: Any = None) -> Any:
    """The running sha256 of a conversation as the client echoes it (see
    echoed_blocks), going on from `before`, the hash of the messages before these;
    its hexdigest() keys live sessions."""
    digest = before.copy() if before is not None else hashlib.sha256()
    for message in messages:
        digest.update(SORTED_JSON.encode([message["role"],
                                          echoed_blocks(message["content"])]).encode())
        digest.update(b"\x00")
    return digest


def prompt_in_transcript(turn: Turn) -> bool:
    """True when a new CLI must get the prompt inside its transcript: a user turn
    that starts with tool_results continues the assistant's turn, and sent as a
    prompt the CLI would first close that turn with notes of its own."""
    content = turn.prompt["content"]
    return bool(turn.history) and isinstance(content, list) and bool(content) and \
        content[0].get("type") == "tool_result"


def transcript_entries(history: list[dict], session_id: str, cwd: str,
                       now: dt.datetime, model: str) -> list[dict]:
    """The earlier turns as CLI session lines: one entry a message, chained by parentUuid.

    The CLI replays these as the upstream `messages`, block for block, so images,
    documents, thinking signatures, tool_use and tool_result arrive intact.
    """
    stamp = now.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    entries, parent = [], None
    for index, message in enumerate(history):
        entry_id = str(uuid.uuid5(uuid.UUID(session_id), str(index)))
        content = message["content"]
        if message["role"] == "user":
            payload: dict[str, Any] = {"role": "user", "content": content}
        else:
            payload = {"id": f"msg_{entry_id.replace('-', '')[:24]}", "type": "message",
                       "role": "assistant", "model": model,
                       "content": ([{"type": "text", "text": content}]
                                   if isinstance(content, str) else content),
                       "stop_reason": "end_turn", "stop_sequence": None,
                       "usage": {"input_tokens": 0, "output_tokens": 0}}
        entries.append({"type": message["role"], "uuid": entry_id, "parentUuid": parent,
                        "sessionId": session_id, "timestamp": stamp, "cwd": cwd,
                        "isSidechain": False, "userType": "external", "message": payload})
        parent = entry_id
    return entries


class AgentStream:
    """The upstream messages of one agent-mode answer as one message for the client.

    The CLI runs its built-in tools itself and calls the upstream again, so their
    tool_use blocks and the seams between the messages are left out, the other
    blocks renumbered and the output tokens summed. Without built-in tools it
    passes every event through unchanged.
    """

    def __init__(self, builtin: set[str]):
        self.builtin = builtin
        self.started = False
        self.next_index = 0
        self.index: dict[int, int] = {}     # this message's block index -> client index
        self.hidden: set[int] = set()
        self.client_calls = False
        self.in_round = False
        self.output_tokens = 0

    def feed(self, event: dict) -> list[dict]:
        kind = event.get("type")
        if kind == "message_start":
            self.index, self.hidden, self.client_calls = {}, set(), False
            first, self.started = not self.started, True
            return [event] if first else []
        if kind == "content_block_start":
            block = event["content_block"]
            if block.get("type") == "tool_use" and block.get("name") in self.builtin:
                self.hidden.add(event["index"])
                return []
            self.client_calls |= block.get("type") == "tool_use"
            self.index[event["index"]] = self.next_index
            self.next_index += 1
        if kind in ("content_block_start", "content_block_delta", "content_block_stop"):
            if event["index"] in self.hidden or event["index"] not in self.index:
                return []
            return [{**event, "index": self.index[event["index"]]}]
        if kind == "message_delta":
            usage = dict(event.get("usage") or {})
            self.output_tokens += usage.get("output_tokens") or 0
            if (event.get("delta") or {}).get("stop_reason") == "tool_use" and \
                    not self.client_calls and self.hidden:
                self.in_round = True
                return []
            if "output_tokens" in usage:
                usage["output_tokens"] = self.output_tokens
            return [{**event, "usage": usage}]
        if kind == "message_stop" and self.in_round:
            self.in_round = False
            return []
        return [event]


class MessageAssembler:
    """Fold one upstream message's stream events into the Messages API `Message`."""

    def __init__(self) -> None:
        self.message: dict | None = None
        self._json_parts: dict[int, list[str]] = {}

    def feed(self, event: dict) -> None:
        """Apply one raw stream event (message_start, content_block_*, message_delta)."""
        kind = event.get("type")
        if kind == "message_start":
            self.message = dict(event["message"])
            self.message["content"] = list(self.message.get("content") or [])
            self.message["usage"] = dict(self.message.get("usage") or {})
        elif self.message is None:
            return
        elif kind == "content_block_start":
            block = dict(event["content_block"])
            if block.get("type") in ("tool_use", "server_tool_use"):
                self._json_parts[event["index"]] = []
            self._put(event["index"], block)
        elif kind == "content_block_delta":
            self._apply_delta(event["index"], event["delta"])
        elif kind == "content_block_stop":
            parts = self._json_parts.pop(event["index"], None)
            if parts is not None:
                text = "".join(parts)
                block = self.message["content"][event["index"]]
                block["input"] = json.loads(text) if text else block.get("input") or {}
        elif kind == "message_delta":
            delta = event.get("delta") or {}
            for key in ("stop_reason", "stop_sequence"):
                if key in delta:
                    self.message[key] = delta[key]
            usage = {k: v for k, v in (event.get("usage") or {}).items() if v is not None}
            self.message["usage"].update(usage)

    def _put(self, index: int, block: dict) -> None:
        content = self.message["content"]
        while len(content) <= index:
            content.append({})
        content[index] = block

    def _apply_delta(self, index: int, delta: dict) -> None:
        block = self.message["content"][index]
        kind = delta.get("type")
        if kind == "text_delta":
            block["text"] = block.get("text", "") + delta["text"]
        elif kind == "input_json_delta":
            self._json_parts.setdefault(index, []).append(delta.get("partial_json", ""))
        elif kind == "thinking_delta":
            block["thinking"] = block.get("thinking", "") + delta["thinking"]
        elif kind == "signature_delta":
            block["signature"] = block.get("signature", "") + delta["signature"]
        elif kind == "citations_delta":
            block.setdefault("citations", []).append(delta["citation"])


def answer_as_history(message: dict) -> list[dict]:
    """A stored answer as a later request's history holds it: without the blank text
    the Messages API refuses in a request (Claude may write "\n\n" before a tool
    call), and no message at all for a blank answer."""
    content = [block for block in message["content"]
               if block.get("type") != "text" or block.get("text", "").strip()]
    return [{"role": "assistant", "content": content}] if content else []


# =============================================================================
# 8. OpenAI Chat Completions -- requests in, completions and chunks out
# =============================================================================
# A Chat Completions request is checked in its own words, then becomes a Messages
# API body and a Turn through section 6 (whose errors `Origins` moves back to the
# client's own messages); the answer's Message becomes a `chat.completion`, its
# stream events `chat.completion.chunk`s. `openai_turn` serves section 9 too.

FINISH_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
                  "model_context_window_exceeded": "length", "tool_use": "tool_calls",
                  "pause_turn": "stop", "refusal": "content_filter"}
# Parameters that change what OpenAI answers and that Claude cannot honour: a
# request that sets them otherwise than their default gets a 400.
CHAT_UNSUPPORTED = {"n": 1, "logprobs": False, "top_logprobs": None, "logit_bias": None,
                    "presence_penalty": 0, "frequency_penalty": 0, "seed": None,
                    "audio": None, "prediction": None, "web_search_options": None}
CHAT_IGNORED = ("model", "messages", "stream", "stream_options", "user", "safety_identifier",
                "store", "metadata", "service_tier", "modalities", "parallel_tool_calls",
                "prompt_cache_key", "prompt_cache_retention", "verbosity")
CHAT_CARRIED = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "tools",
                "tool_choice", "response_format", "reasoning_effort")
OPENAI_EFFORTS = {"none": "low", "minimal": "low", "low": "low", "medium": "medium",
                  "high": "high", "xhigh": "xhigh"}


def _check_known(body: dict, unsupported: dict, known: Iterable[str]) -> None:
    for name, default in unsupported.items():
        _require(body.get(name) in (None, default),
                 f"{name}: not supported by this proxy (Claude cannot honour it).")
    unknown = sorted(set(body) - set(unsupported) - set(known))
    _require(not unknown, f"{', '.join(unknown)}: unknown or unsupported parameter.")


def _chat_text(content: Any, where: str, kinds: tuple[str, ...] = ("text",),
               separator: str = "\n\n") -> str:
    """A message's content as text: a string, or parts of the given text kinds."""
    if isinstance(content, str):
        return content
    _require(isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") in kinds and isinstance(p.get("text"), str)
        for p in content), f"{where}.content: must be a string or a list of text parts.")
    return separator.join(p["text"] for p in content)


def _chat_user_blocks(content: Any, where: str) -> list[dict]:
    """A user message's content as Anthropic blocks (text, base64 or url images);
    blank text is left out (see `_add_openai_message`)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content.strip() else []
    _require(isinstance(content, list), f"{where}.content: must be a string or a list of parts.")
    blocks = []
    for i, part in enumerate(content):
        at = f"{where}.content.{i}"
        _require(isinstance(part, dict), f"{at}: must be an object.")
        if part.get("type") == "text" and isinstance(part.get("text"), str):
            if part["text"].strip():
                blocks.append({"type": "text", "text": part["text"]})
            continue
        _require(part.get("type") == "image_url", f"{at}.type: must be 'text' or 'image_url'.")
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else None
        _require(isinstance(url, str), f"{at}.image_url.url: required.")
        data_uri = re.match(r"data:(image/[\w.+-]+);base64,(.*)$", url, re.S)
        if data_uri:
            blocks.append({"type": "image", "source": {
                "type": "base64", "media_type": data_uri.group(1), "data": data_uri.group(2)}})
        else:
            _require(url.startswith(("http://", "https://")),
                     f"{at}.image_url.url: must be an http(s) URL or a base64 data URI.")
            blocks.append({"type": "image", "source": {"type": "url", "url": url}})
    return blocks


def _add_openai_message(messages: list[dict], role: str, blocks: list[dict], where: str,
                        last: bool) -> None:
    """Append a converted OpenAI message. OpenAI accepts blank text (clients send empty
    messages, and echo Claude's blank text beside tool calls); the Messages API
    refuses it, so blank text is left out, and a message of nothing but blank text
    too, unless it is the question itself."""
    if blocks:
        append_turn(messages, role, blocks)
    else:
        _require(not last or role == "assistant",
                 f"{where}.content: is blank; Claude needs something to answer.")


def _chat_assistant_blocks(message: dict, where: str) -> list[dict]:
    """An assistant message's text and tool calls (blank text left out)."""
    content = message.get("content")
    text = "" if content is None else _chat_text(content, where)
    blocks = [{"type": "text", "text": text}] if text.strip() else []
    calls = message.get("tool_calls") or []
    _require(isinstance(calls, list), f"{where}.tool_calls: must be a list.")
    for i, call in enumerate(calls):
        at = f"{where}.tool_calls.{i}"
        function = call.get("function") if isinstance(call, dict) else None
        _require(isinstance(function, dict) and isinstance(call.get("id"), str)
                 and isinstance(function.get("name"), str)
                 and isinstance(function.get("arguments", ""), str),
                 f"{at}: needs an id and a function with a name and arguments.")
        blocks.append({"type": "tool_use", "id": call["id"], "name": function["name"],
                       "input": call_arguments(function.get("arguments"),
                                               f"{at}.function.arguments")})
    return blocks


def call_arguments(text: str | None, where: str) -> dict:
    """A call's JSON arguments, which must be an object."""
    try:
        arguments = json.loads(text or "{}")
    except ValueError:
        arguments = None
    _require(isinstance(arguments, dict), f"{where}: must be a JSON object.")
    return arguments


def check_function_name(name: Any, where: str) -> str:
    _require(isinstance(name, str) and TOOL_NAME_RE.match(name) is not None,
             f"{where}: must be 1-64 letters, digits, underscores or dashes.")
    return name


def check_parameters(schema: Any, where: str) -> dict:
    """A function's parameters as the tool's input_schema (none: no arguments)."""
    if schema is None:
        return {"type": "object", "properties": {}}
    _require(isinstance(schema, dict) and schema.get("type") == "object",
             f"{where}: must be a JSON schema with type 'object'.")
    return schema


def check_max_tokens(body: dict, *names: str) -> int | None:
    """The first of `names` the request sets: an output token limit."""
    for name in names:
        if body.get(name) is not None:
            _require(_is_int(body[name]) and body[name] >= 1,
                     f"{name}: must be an integer of at least 1.")
            return body[name]
    return None


def check_effort(effort: Any, where: str) -> str | None:
    """An OpenAI reasoning effort as the upstream's output_config.effort."""
    if effort is None:
        return None
    _require(isinstance(effort, str) and effort in OPENAI_EFFORTS,
             f"{where}: must be one of {', '.join(OPENAI_EFFORTS)}.")
    return OPENAI_EFFORTS[effort]


def _chat_tools(body: dict) -> dict:
    """tools and tool_choice in the Messages API's form."""
    out: dict[str, Any] = {}
    tools = body.get("tools")
    if tools is not None:
        _require(isinstance(tools, list), "tools: must be a list.")
        out["tools"] = []
        for i, tool in enumerate(tools):
            function = tool.get("function") if isinstance(tool, dict) else None
            _require(isinstance(tool, dict) and tool.get("type") == "function"
                     and isinstance(function, dict),
                     f"tools.{i}: must be a function tool.")
            converted = {"name": check_function_name(function.get("name"),
                                                     f"tools.{i}.function.name"),
                         "input_schema": check_parameters(function.get("parameters"),
                                                          f"tools.{i}.function.parameters")}
            if function.get("description") is not None:
                converted["description"] = function["description"]
            out["tools"].append(converted)
    choice = body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if choice is not None or parallel is False:
        if isinstance(choice, dict):
            function = choice.get("function")
            name = function.get("name") if isinstance(function, dict) else None
            _require(choice.get("type") == "function" and isinstance(name, str),
                     "tool_choice: must be 'none', 'auto', 'required' or a function.")
            _require(name in [tool["name"] for tool in out.get("tools", [])],
                     "tool_choice.function.name: must name one of the request's tools.")
            anthropic_choice = {"type": "tool", "name": name}
        else:
            kinds = {"none": "none", "auto": "auto", "required": "any", None: "auto"}
            _require(isinstance(choice, (str, type(None))) and choice in kinds,
                     "tool_choice: must be 'none', 'auto', 'required' or a function.")
            anthropic_choice = {"type": kinds[choice]}
        if parallel is False and anthropic_choice["type"] != "none":
            anthropic_choice["disable_parallel_tool_use"] = True
        out["tool_choice"] = anthropic_choice
    return out


def _chat_response_format(value: Any) -> dict | None:
    """response_format as the upstream's output_config.format (native structured output)."""
    if value is None:
        return None
    _require(isinstance(value, dict) and value.get("type") in ("text", "json_object",
                                                                "json_schema"),
             "response_format.type: must be 'text', 'json_object' or 'json_schema'.")
    if value["type"] == "text":
        return None
    if value["type"] == "json_object":
        return {"type": "json_schema", "schema": {"type": "object"}}
    spec = value.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    _require(isinstance(schema, dict), "response_format.json_schema.schema: required, an object.")
    return {"type": "json_schema", "schema": schema}


class Origins:
    """Where the client sent each block of the conversation it converts to, so that
    an error of the shared checks (`messages.<i>.content.<k>: ...`) names the
    client's own message or item instead."""

    def __init__(self, messages: list[dict], where: str):
        self.blocks = [[where] * self._count(message) for message in messages]

    @staticmethod
    def _count(message: dict) -> int:
        return len(message["content"]) if isinstance(message["content"], list) else 1

    def note(self, messages: list[dict], where: str) -> None:
        """The client's `where` was just converted onto the end of `messages` (the
        last message may have grown, new ones follow it)."""
        for index in range(max(len(self.blocks) - 1, 0), len(messages)):
            if index == len(self.blocks):
                self.blocks.append([])
            added = self._count(messages[index]) - len(self.blocks[index])
            self.blocks[index] += [where] * added

    def moved(self, err: InvalidRequest, name: str) -> InvalidRequest:
        """`err` about the client's message or item, or its list `name`."""
        found = re.match(r"messages(?:\.(\d+)(?:\.content\.(\d+))?)?", err.param or "")
        if found is None:
            return err
        message, block = (int(group) if group else None for group in found.groups())
        if message is None or message >= len(self.blocks) or not self.blocks[message]:
            return err.moved("messages", name)
        wheres = self.blocks[message]
        return err.moved(err.param, wheres[block if block is not None and
                                           block < len(wheres) else 0])


def chat_request_to_turn(body: dict, default_model: str, caller: str = "") -> Turn:
    """Validate a Chat Completions request and make it a Turn."""
    _check_known(body, CHAT_UNSUPPORTED, CHAT_IGNORED + CHAT_CARRIED)
    options = body.get("stream_options")
    _require(options is None or (isinstance(options, dict) and isinstance(
        options.get("include_usage", False), bool)),
        "stream_options: must be an object whose include_usage is a boolean.")
    messages = body.get("messages")
    _require(isinstance(messages, list) and messages, "messages: required, a non-empty list.")
    system, converted = [], []
    origins = Origins([], "messages")
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        _require(isinstance(message, dict), f"{where}: must be an object.")
        role = message.get("role")
        if role in ("system", "developer"):
            system.append(_chat_text(message.get("content"), where))
            continue
        if role == "user":
            blocks = _chat_user_blocks(message.get("content"), where)
        elif role == "tool":
            _require(isinstance(message.get("tool_call_id"), str),
                     f"{where}.tool_call_id: required.")
            blocks = [{"type": "tool_result", "tool_use_id": message["tool_call_id"],
                       "content": _chat_text(message.get("content"), where)}]
        elif role == "assistant":
            blocks = _chat_assistant_blocks(message, where)
        else:
            raise InvalidRequest(f"{where}.role: must be system, developer, user, "
                                 "assistant or tool.")
        _add_openai_message(converted, "assistant" if role == "assistant" else "user",
                            blocks, where, i == len(messages) - 1)
        origins.note(converted, where)
    return openai_turn(body, system, converted, origins, default_model, caller)


def openai_turn(body: dict, system: list[str], messages: list[dict], origins: Origins,
                default_model: str, caller: str, list_name: str = "messages") -> Turn:
    """A Turn from converted messages and Chat Completions parameters (the Responses
    API's are checked and renamed to these first); the shared checks' errors name
    the client's messages or items (`origins`)."""
    anthropic: dict[str, Any] = {"model": body.get("model"), "messages": messages,
                                 "stream": body.get("stream") or False}
    if system:
        anthropic["system"] = "\n\n".join(system)
    max_tokens = check_max_tokens(body, "max_completion_tokens", "max_tokens")
    if max_tokens is not None:
        anthropic["max_tokens"] = max_tokens
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            anthropic[name] = body[name]
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        _require(isinstance(stops, list) and all(isinstance(s, str) and s for s in stops),
                 "stop: must be a non-empty string or a list of non-empty strings.")
        anthropic["stop_sequences"] = stops
    anthropic.update(_chat_tools(body))
    # OpenAI's successor of `user` names the end user the same way.
    name = "safety_identifier" if body.get("safety_identifier") is not None else "user"
    if body.get(name) is not None:
        _require(isinstance(body[name], str), f"{name}: must be a string.")
        anthropic["metadata"] = {"user_id": body[name]}
    output_config = {}
    output_format = _chat_response_format(body.get("response_format"))
    if output_format is not None:
        output_config["format"] = output_format
    effort = check_effort(body.get("reasoning_effort"), "reasoning_effort")
    if effort is not None:
        output_config["effort"] = effort
    if output_config:
        anthropic["output_config"] = output_config
    try:
        return messages_request_to_turn(anthropic, default_model, caller,
                                        max_tokens_required=False)
    except InvalidRequest as err:
        raise origins.moved(err, list_name) from None


def chat_usage(usage: dict) -> dict:
    """Anthropic usage as OpenAI's: prompt tokens include the cached ones."""
    cached = usage.get("cache_read_input_tokens") or 0
    prompt = (usage.get("input_tokens") or 0) + cached + \
        (usage.get("cache_creation_input_tokens") or 0)
    completion = usage.get("output_tokens") or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def chat_tool_call(block: dict) -> dict:
    return {"id": block["id"], "type": "function",
            "function": {"name": block["name"], "arguments": json.dumps(block["input"])}}


def message_to_chat_completion(message: dict, completion_id: str, created: int) -> dict:
    """A Messages API Message as a `chat.completion` (thinking blocks are left out)."""
    texts = [b["text"] for b in message["content"] if b.get("type") == "text"]
    calls = [chat_tool_call(b) for b in message["content"] if b.get("type") == "tool_use"]
    reply: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None,
                             "refusal": None}
    if calls:
        reply["tool_calls"] = calls
    return {"id": completion_id, "object": "chat.completion", "created": created,
            "model": message["model"], "choices": [{
                "index": 0, "message": reply, "logprobs": None,
                "finish_reason": FINISH_REASONS.get(message.get("stop_reason"), "stop")}],
            "usage": chat_usage(message["usage"])}


class ChunkTranslator:
    """Stream events of one upstream message into `chat.completion.chunk`s."""

    def __init__(self, completion_id: str, created: int, include_usage: bool):
        self.base = {"id": completion_id, "object": "chat.completion.chunk",
                     "created": created, "model": ""}
        self.include_usage = include_usage
        self.usage: dict = {}
        self.tool_index: dict[int, int] = {}    # content block index -> tool_calls index
        self.no_arguments: set[int] = set()     # tool_use blocks with no argument yet

    def _chunk(self, delta: dict, finish: str | None = None) -> dict:
        return {**self.base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                          "finish_reason": finish}]}

    def feed(self, event: dict) -> list[dict]:
        kind = event.get("type")
        if kind == "message_start":
            message = event["message"]
            self.base["model"] = message.get("model", "")
            self.usage = dict(message.get("usage") or {})
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "content_block_start" and event["content_block"].get("type") == "tool_use":
            block = event["content_block"]
            position = self.tool_index[event["index"]] = len(self.tool_index)
            self.no_arguments.add(event["index"])
            return [self._chunk({"tool_calls": [{
                "index": position, "id": block["id"], "type": "function",
                "function": {"name": block["name"], "arguments": ""}}]})]
        if kind == "content_block_delta":
            delta = event["delta"]
            if delta.get("type") == "text_delta":
                return [self._chunk({"content": delta["text"]})]
            if delta.get("type") == "input_json_delta" and delta.get("partial_json"):
                self.no_arguments.discard(event["index"])
                return [self._chunk({"tool_calls": [{
                    "index": self.tool_index[event["index"]],
                    "function": {"arguments": delta["partial_json"]}}]})]
        if kind == "content_block_stop" and event.get("index") in self.no_arguments:
            # A call without input streams one empty delta; OpenAI's arguments are
            # always a JSON object.
            self.no_arguments.discard(event["index"])
            return [self._chunk({"tool_calls": [{"index": self.tool_index[event["index"]],
                                                 "function": {"arguments": "{}"}}]})]
        if kind == "message_delta":
            self.usage.update({k: v for k, v in (event.get("usage") or {}).items()
                               if v is not None})
            stop = (event.get("delta") or {}).get("stop_reason")
            return [self._chunk({}, FINISH_REASONS.get(stop, "stop"))]
        if kind == "message_stop" and self.include_usage:
            return [{**self.base, "choices": [], "usage": chat_usage(self.usage)}]
        return []


# =============================================================================
# 9. OpenAI Responses -- requests in, responses and their events out
# =============================================================================
# A Responses request is checked in its own words and renamed into the Chat
# Completions parameters (section 8): `instructions` and system/developer items
# join the system prompt, `message` items make user and assistant turns, call and
# output items tool_use/tool_result blocks, and `previous_response_id`'s stored
# conversation comes first. `ResponseTranslator` makes the answer a response
# object and its stream the API's events.

# Stops that make a Responses answer `incomplete`, and the reason it gives.
INCOMPLETE_REASONS = {"max_tokens": "max_output_tokens",
                      "model_context_window_exceeded": "max_output_tokens",
                      "refusal": "content_filter"}
RESPONSES_UNSUPPORTED = {"background": False, "prompt": None, "conversation": None,
                         "top_logprobs": None, "max_tool_calls": None}
# client_metadata: ids a client (Codex) sends for its own records; nothing to carry.
RESPONSES_IGNORED = ("model", "input", "instructions", "stream", "store", "metadata", "user",
                     "client_metadata",
                     "safety_identifier", "prompt_cache_key", "prompt_cache_retention",
                     "service_tier", "truncation",
                     "include", "previous_response_id", "stream_options", "reasoning",
                     "max_output_tokens", "temperature", "top_p", "tools", "tool_choice",
                     "parallel_tool_calls", "text")


# Tools that run on OpenAI's servers. Claude is offered none of them and the rest of
# the request is answered (README, "Clients"); naming one in tool_choice is a 400.
HOSTED_TOOLS = ("web_search", "web_search_preview", "web_search_2025_08_26", "file_search",
                "code_interpreter", "image_generation", "computer_use_preview", "mcp",
                "local_shell", "tool_search")
CUSTOM_INPUT = "input"          # the one string argument a custom tool gets as a function


@dataclasses.dataclass(frozen=True)
class ResponsesTool:
    """How a Responses tool is offered to Claude as a function, and how its calls
    go back to the client: `kind` is function, custom or tool_search."""

    kind: str
    name: str                           # the client's name (inside its namespace)
    namespace: str | None = None


def responses_tool_name(name: str, namespace: str | None) -> str:
    """The one flat name a (namespaced) Responses tool has for Claude."""
    return f"{namespace}__{name}" if namespace else name


def responses_tools(tools: Any, where: str = "tools") -> dict[str, tuple[ResponsesTool, dict]]:
    """Flat name -> (the tool, its Chat function) for the tools Claude can be offered:
    functions (namespaces flattened), custom tools as a function of one string, and a
    client-run tool_search; hosted tools are left out."""
    if tools is None:
        return {}
    _require(isinstance(tools, list), f"{where}: must be a list.")
    offered: dict[str, tuple[ResponsesTool, dict]] = {}

    def offer(tool: ResponsesTool, description: Any, parameters: Any, at: str) -> None:
        check_function_name(tool.name, f"{at}.name")
        function = {"name": responses_tool_name(tool.name, tool.namespace),
                    "parameters": check_parameters(parameters, f"{at}.parameters")}
        if description is not None:
            function["description"] = description
        offered[function["name"]] = (tool, {"type": "function", "function": function})

    def add(tool: Any, at: str, namespace: str | None) -> None:
        _require(isinstance(tool, dict) and isinstance(tool.get("type"), str),
                 f"{at}: must be an object with a type.")
        kind = tool["type"]
        if kind in ("function", "custom", "namespace"):
            _require(isinstance(tool.get("name"), str), f"{at}.name: required, a string.")
        if kind == "function":
            offer(ResponsesTool("function", tool["name"], namespace), tool.get("description"),
                  tool.get("parameters"), at)
        elif kind == "namespace" and namespace is None:
            _require(isinstance(tool.get("tools"), list), f"{at}.tools: required, a list.")
            for j, member in enumerate(tool["tools"]):
                add(member, f"{at}.tools.{j}", tool["name"])
        elif kind == "custom":
            offer(ResponsesTool("custom", tool["name"], namespace),
                  custom_tool_description(tool, at), {
                      "type": "object", "properties": {CUSTOM_INPUT: {"type": "string"}},
                      "required": [CUSTOM_INPUT], "additionalProperties": False}, at)
        elif kind == "tool_search" and tool.get("execution") == "client" and namespace is None:
            offer(ResponsesTool("tool_search", "tool_search"), tool.get("description"),
                  tool.get("parameters"), at)
        else:
            _require(kind in HOSTED_TOOLS, f"{at}.type: '{kind}' is not a supported tool.")
    for i, tool in enumerate(tools):
        add(tool, f"{where}.{i}", None)
    return offered


def custom_tool_description(tool: dict, where: str) -> str:
    """A custom tool's description, with its input format written out: Claude has
    no constrained decoding for a grammar, so it reads the grammar instead."""
    text = tool.get("description") or ""
    _require(isinstance(text, str), f"{where}.description: must be a string.")
    form = tool.get("format") or {"type": "text"}
    _require(isinstance(form, dict) and form.get("type") in ("text", "grammar"),
             f"{where}.format: must be a text or grammar format.")
    text += f"\n\nCall it with the raw text as `{CUSTOM_INPUT}`."
    if form["type"] == "grammar":
        _require(isinstance(form.get("definition"), str),
                 f"{where}.format.definition: required, a string.")
        text += (f" The text must match this {form.get('syntax', '')} grammar:\n"
                 f"{form['definition']}")
    return text.strip()


def _response_tool_output(output: Any, where: str) -> Any:
    """A tool call's output as tool_result content: a string, or text and image parts."""
    if isinstance(output, str):
        return output
    _require(isinstance(output, list), f"{where}.output: must be a string or a list of parts.")
    return _response_user_blocks(output, f"{where}.output") or ""


def _response_text(content: Any, where: str) -> str:
    """A Responses message's text (input_text and output_text parts)."""
    return _chat_text(content, where, ("input_text", "output_text"), "")


def _response_user_blocks(content: Any, where: str) -> list[dict]:
    """input_text and input_image parts as Anthropic blocks (by the chat parts' rules)."""
    if not isinstance(content, list):
        return _chat_user_blocks(content, where)
    parts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "input_text":
            parts.append({"type": "text", "text": part.get("text")})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            parts.append({"type": "image_url", "image_url": {"url": part["image_url"]}})
        else:
            raise InvalidRequest(f"{where}.content.{i}: must be an input_text part or an "
                                 "input_image part with an image_url.")
    return _chat_user_blocks(parts, where)


def responses_request_to_turn(body: dict, default_model: str, caller: str = "",
                              previous: list[dict] | None = None
                              ) -> tuple[Turn, dict[str, ResponsesTool]]:
    """Validate a Responses request and make it a Turn, with the tools its answer's
    calls go back as; `previous` is the stored conversation of its
    `previous_response_id` (and `item_reference` items are resolved already)."""
    _check_known(body, RESPONSES_UNSUPPORTED, RESPONSES_IGNORED)
    offered = responses_tools(body.get("tools"))
    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    _require(isinstance(items, list) and items, "input: required, a string or a non-empty list.")
    instructions = body.get("instructions")
    _require(instructions is None or isinstance(instructions, str),
             "instructions: must be a string.")
    system = [instructions] if instructions else []
    messages = [dict(m) for m in previous or []]
    origins = Origins(messages, "previous_response_id")
    for i, item in enumerate(items):
        where = f"input.{i}"
        _require(isinstance(item, dict), f"{where}: must be an object.")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role in ("system", "developer"):
                system.append(_response_text(item.get("content"), where))
            elif role == "user":
                _add_openai_message(messages, "user",
                                    _response_user_blocks(item.get("content"), where), where,
                                    i == len(items) - 1)
            else:
                _require(role == "assistant",
                         f"{where}.role: must be user, assistant, system or developer.")
                _add_openai_message(messages, "assistant", _chat_assistant_blocks(
                    {"content": _response_text(item.get("content"), where)}, where), where,
                    i == len(items) - 1)
        elif kind in ("function_call", "custom_tool_call", "tool_search_call"):
            append_turn(messages, "assistant", [_response_call(item, where)])
        elif kind in ("function_call_output", "custom_tool_call_output"):
            _require(isinstance(item.get("call_id"), str), f"{where}.call_id: required.")
            append_turn(messages, "user", [{"type": "tool_result", "tool_use_id": item["call_id"],
                                            "content": _response_tool_output(item.get("output"),
                                                                             where)}])
        elif kind == "additional_tools":
            # Codex's default model gets its tools so, as the first input item.
            offered.update(responses_tools(item.get("tools"), f"{where}.tools"))
        elif kind == "tool_search_output":
            # The tools a client-run search found are offered from here on.
            _require(isinstance(item.get("call_id"), str), f"{where}.call_id: required.")
            offered.update(responses_tools(item.get("tools") or [], f"{where}.tools"))
            append_turn(messages, "user", [{"type": "tool_result", "tool_use_id": item["call_id"],
                                            "content": json.dumps(item.get("tools") or [])}])
        else:
            _require(kind == "reasoning", f"{where}.type: '{kind}' is not supported; use "
                                          "message, function_call or function_call_output items.")
        origins.note(messages, where)
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        _require(choice.get("type") not in HOSTED_TOOLS,
                 f"tool_choice: '{choice.get('type')}' is a hosted tool, which Claude cannot "
                 "be offered through this proxy.")
        if choice.get("type") in ("function", "custom"):
            choice = {"type": "function", "function": {"name": choice.get("name")}}
    for name in ("text", "reasoning"):
        _require(isinstance(body.get(name) or {}, dict), f"{name}: must be an object.")
    text_format = (body.get("text") or {}).get("format")
    if text_format is not None:
        _require(isinstance(text_format, dict) and text_format.get("type") in
                 ("text", "json_object", "json_schema"),
                 "text.format.type: must be 'text', 'json_object' or 'json_schema'.")
        if text_format["type"] == "json_schema":
            _require(isinstance(text_format.get("schema"), dict),
                     "text.format.schema: required, an object.")
            text_format = {"type": "json_schema", "json_schema": text_format}
    effort = (body.get("reasoning") or {}).get("effort")
    check_effort(effort, "reasoning.effort")
    chat = {"model": body.get("model"), "stream": body.get("stream", False),
            "max_completion_tokens": check_max_tokens(body, "max_output_tokens"),
            "temperature": body.get("temperature"), "top_p": body.get("top_p"),
            "tools": [function for _, function in offered.values()] or None,
            "tool_choice": choice,
            "parallel_tool_calls": body.get("parallel_tool_calls"),
            "response_format": text_format,
            "reasoning_effort": effort,
            "safety_identifier": body.get("safety_identifier"), "user": body.get("user")}
    turn = openai_turn({k: v for k, v in chat.items() if v is not None}, system, messages,
                       origins, default_model, caller, "input")
    return turn, {name: tool for name, (tool, _) in offered.items()}


def _response_call(item: dict, where: str) -> dict:
    """A function, custom or tool_search call item as a tool_use block."""
    _require(isinstance(item.get("call_id"), str), f"{where}.call_id: required.")
    _require(isinstance(item.get("namespace") or "", str), f"{where}.namespace: a string.")
    if item["type"] == "custom_tool_call":
        _require(isinstance(item.get("name"), str) and isinstance(item.get("input"), str),
                 f"{where}: a custom_tool_call needs name and input strings.")
        return {"type": "tool_use", "id": item["call_id"],
                "name": responses_tool_name(item["name"], item.get("namespace")),
                "input": {CUSTOM_INPUT: item["input"]}}
    if item["type"] == "tool_search_call":
        arguments = item.get("arguments") or {}
        _require(isinstance(arguments, dict), f"{where}.arguments: must be an object.")
        return {"type": "tool_use", "id": item["call_id"], "name": "tool_search",
                "input": arguments}
    _require(all(isinstance(item.get(k), str) for k in ("name", "arguments")),
             f"{where}: a function_call needs call_id, name and arguments.")
    return {"type": "tool_use", "id": item["call_id"],
            "name": responses_tool_name(item["name"], item.get("namespace")),
            "input": call_arguments(item["arguments"], f"{where}.arguments")}


def resolve_item_references(items: Any, lookup: Callable[[str], dict | None]) -> Any:
    """The input with each `item_reference` replaced by the stored item it names
    (clients such as the AI SDK send earlier output items so); a 400 for one that is
    unknown, as the API's own."""
    if not isinstance(items, list):
        return items
    resolved = []
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("type") == "item_reference":
            found = lookup(item["id"]) if isinstance(item.get("id"), str) else None
            _require(found is not None, f"input.{i}.id: item '{item.get('id')}' was not "
                                        "found; it expired, was not stored (store: false) or "
                                        "the proxy restarted: send the item itself instead.")
            item = found
        resolved.append(item)
    return resolved


def response_usage(usage: dict) -> dict:
    chat = chat_usage(usage)
    return {"input_tokens": chat["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": chat["prompt_tokens_details"][
                "cached_tokens"]},
            "output_tokens": chat["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": chat["total_tokens"]}


class ResponseTranslator:
    """Stream events of one upstream message into Responses API events, and the
    `response` object they build (the non-streaming answer is the same object).

    Each content block becomes one output item: text a `message` with one
    `output_text` part, tool_use a `function_call`, thinking a `reasoning` item
    with the thinking as its summary.
    """

    ECHOED = ("instructions", "max_output_tokens", "metadata", "parallel_tool_calls",
              "previous_response_id", "temperature", "tool_choice", "tools", "top_p", "text",
              "reasoning", "store", "truncation")

    def __init__(self, response_id: str, created: int, request: dict,
                 tools: dict[str, ResponsesTool] | None = None):
        self.response_id, self.created, self.request = response_id, created, request
        self.tools = tools or {}                # flat name -> how its calls go back
        self.assembler = MessageAssembler()
        self.items: list[dict] = []
        self._open: dict[int, dict] = {}        # content block index -> its output item
        self.sequence = 0

    def _event(self, kind: str, **fields: Any) -> dict:
        self.sequence += 1
        return {"type": kind, "sequence_number": self.sequence - 1, **fields}

    def response(self, status: str = "completed") -> dict:
        message = self.assembler.message or {}
        reason = INCOMPLETE_REASONS.get(message.get("stop_reason"))
        if status == "completed" and reason:
            status = "incomplete"
        echoed = {key: self.request.get(key) for key in self.ECHOED}
        return {"id": self.response_id, "object": "response", "created_at": self.created,
                "status": status, "error": None, "model": message.get("model", ""),
                "incomplete_details": {"reason": reason} if status == "incomplete" else None,
                "output": self.items if status != "in_progress" else [],
                **echoed, "tools": echoed["tools"] or [], "metadata": echoed["metadata"] or {},
                "tool_choice": echoed["tool_choice"] or "auto",
                "parallel_tool_calls": echoed["parallel_tool_calls"] is not False,
                "store": echoed["store"] is not False, "truncation": "disabled",
                "text": echoed["text"] or {"format": {"type": "text"}},
                "usage": response_usage(message["usage"]) if message.get("usage") and
                status != "in_progress" else None}

    def feed(self, event: dict) -> list[dict]:
        """The Responses events for one upstream stream event."""
        self.assembler.feed(event)
        kind = event.get("type")
        if kind == "message_start":
            return [self._event("response.created", response=self.response("in_progress")),
                    self._event("response.in_progress", response=self.response("in_progress"))]
        if kind == "content_block_start":
            return self._start(event["index"], event["content_block"])
        if kind == "content_block_delta":
            return self._delta(event["index"], event["delta"])
        if kind == "content_block_stop":
            return self._stop(event["index"])
        if kind == "message_stop":
            final = self.response()
            return [self._event("response.incomplete" if final["status"] == "incomplete"
                                else "response.completed", response=final)]
        return []

    def failed(self, err: ProxyError) -> list[dict]:
        """The events that end a stream broken off after its head: `error`, then
        `response.failed` with what had arrived."""
        code = err.openai_code or ("rate_limit_exceeded" if err.status == 429 else
                                   "server_error")
        # A stream whose head went out on a ping has not begun the response yet.
        begun = [] if self.sequence else [
            self._event("response.created", response=self.response("in_progress")),
            self._event("response.in_progress", response=self.response("in_progress"))]
        for item in self._open.values():     # cut short: never "completed"
            item["status"] = "incomplete"
        failed = dict(self.response("failed"), error={"code": code, "message": err.message})
        # The documented flat fields, and the nested error OpenAI sends too: with it
        # both of the openai SDK's stream readers raise (with the flat ones alone,
        # `responses.create(stream=True)` yields the failure as an ordinary event).
        nested = {"type": err.error_type, "code": code, "message": err.message, "param": None}
        return begun + [self._event("error", code=code, message=err.message, param=None,
                                    error=nested),
                        self._event("response.failed", response=failed)]

    def _start(self, index: int, block: dict) -> list[dict]:
        position = len(self.items)
        if block.get("type") == "text":
            item = {"type": "message", "id": f"msg_{uuid.uuid4().hex[:24]}",
                    "status": "in_progress", "role": "assistant", "content": []}
        elif block.get("type") == "tool_use":
            item = self._call_item(block)
        elif block.get("type") == "thinking":
            item = {"type": "reasoning", "id": f"rs_{uuid.uuid4().hex[:24]}", "summary": []}
        else:
            return []
        self.items.append(item)
        self._open[index] = item
        events = [self._event("response.output_item.added", output_index=position,
                              item=dict(item, content=[]) if "content" in item else dict(item))]
        if item["type"] == "message":
            part = {"type": "output_text", "text": "", "annotations": []}
            item["content"].append(part)
            events.append(self._event("response.content_part.added", item_id=item["id"],
                                      output_index=position, content_index=0, part=dict(part)))
        return events

    def _call_item(self, block: dict) -> dict:
        """The output item of a tool_use, of the kind the client's tool is."""
        tool = self.tools.get(block["name"], ResponsesTool("function", block["name"]))
        base = {"call_id": block["id"], "status": "in_progress"}
        if tool.kind == "tool_search":
            return {"type": "tool_search_call", "id": f"tsc_{uuid.uuid4().hex[:24]}",
                    **base, "execution": "client", "arguments": {}}
        if tool.kind == "custom":
            item = {"type": "custom_tool_call", "id": f"ctc_{uuid.uuid4().hex[:24]}", **base,
                    "name": tool.name, "input": ""}
        else:
            item = {"type": "function_call", "id": f"fc_{uuid.uuid4().hex[:24]}", **base,
                    "name": tool.name, "arguments": ""}
        return {**item, "namespace": tool.namespace} if tool.namespace else item

    def _delta(self, index: int, delta: dict) -> list[dict]:
        item = self._open.get(index)
        if item is None or item["type"] in ("custom_tool_call", "tool_search_call"):
            return []       # their input is whole at the block's end
        position = self.items.index(item)
        if delta.get("type") == "text_delta":
            item["content"][0]["text"] += delta["text"]
            return [self._event("response.output_text.delta", item_id=item["id"],
                                output_index=position, content_index=0, delta=delta["text"],
                                logprobs=[])]
        if delta.get("type") == "input_json_delta" and delta.get("partial_json"):
            item["arguments"] += delta["partial_json"]
            return [self._event("response.function_call_arguments.delta", item_id=item["id"],
                                output_index=position, delta=delta["partial_json"])]
        return []

    def _stop(self, index: int) -> list[dict]:
        item = self._open.pop(index, None)
        if item is None:
            return []
        position, events = self.items.index(item), []
        block = self.assembler.message["content"][index]
        if item["type"] == "message":
            part = item["content"][0]
            events += [self._event("response.output_text.done", item_id=item["id"],
                                   output_index=position, content_index=0, text=part["text"],
                                   logprobs=[]),
                       self._event("response.content_part.done", item_id=item["id"],
                                   output_index=position, content_index=0, part=part)]
        elif item["type"] == "function_call":
            streamed, item["arguments"] = item["arguments"], json.dumps(block.get("input") or {})
            if not streamed:        # a call without arguments: its deltas add up all the same
                events.append(self._event("response.function_call_arguments.delta",
                                          item_id=item["id"], output_index=position,
                                          delta=item["arguments"]))
            events.append(self._event("response.function_call_arguments.done",
                                      item_id=item["id"], output_index=position,
                                      name=item["name"], arguments=item["arguments"]))
        elif item["type"] == "custom_tool_call":
            text = (block.get("input") or {}).get(CUSTOM_INPUT, "")
            item["input"] = text if isinstance(text, str) else json.dumps(text)
            events.append(self._event("response.custom_tool_call_input.done",
                                      item_id=item["id"], output_index=position,
                                      input=item["input"]))
        elif item["type"] == "tool_search_call":
            item["arguments"] = block.get("input") or {}
        else:
            item["summary"] = [{"type": "summary_text", "text": block.get("thinking", "")}]
        if "status" in item:
            item["status"] = "completed"
        events.append(self._event("response.output_item.done", output_index=position,
                                  item=item))
        return events


# =============================================================================
# 10. SDK adapter -- options, environment, one CLI per task, its turns read
# =============================================================================
# The only section that imports claude_agent_sdk. `cli_environment` and
# `cli_options` say how a Turn is carried; `CliProcess` owns one CLI through a
# ClaudeSDKClient, and its `CliWatch` stops it when it goes on without the client;
# a `TurnReader` turns one turn's SDK messages into TurnEvents (Delta,
# RateLimitReport, Answer, Finished, WentOn), the only things section 12 reads;
# and `sdk_error` / `result_error` turn SDK failures into ProxyErrors, once, here.

try:
    import claude_agent_sdk as sdk
except ImportError:         # main() explains how to install it
    sdk = None
# The SDKs the suite passes on: from the floor (older ones change a client's tool
# result on its way up, or start no CLI at all) to the newest it was run against.
SDK_FLOOR = (0, 2, 180)
SDK_NEWEST_TESTED = (0, 2, 189)
SDK_REQUIREMENT = "claude-agent-sdk>=" + ".".join(map(str, SDK_FLOOR))


def self_command() -> str:
    """This program as a command that works as printed on this box: the interpreter
    running it and its real path (Debian has no `python`; a venv's is not on PATH)."""
    return f"{shlex.quote(sys.executable)} {shlex.quote(os.path.abspath(__file__))}"


def sdk_version_notes(version: str | None) -> tuple[list[str], list[str]]:
    """(errors, notes) about an installed SDK version against the tested range."""
    if not version:
        return [], []
    found = tuple(int(part) for part in re.findall(r"\d+", version)[:3])
    def dotted(numbers: tuple) -> str:
        return ".".join(map(str, numbers))
    if found < SDK_FLOOR:
        return [f"claude-agent-sdk {version} is older than {dotted(SDK_FLOOR)}, the oldest "
                f"this proxy works with: `{install_hint()} --upgrade`."], []
    if found > SDK_NEWEST_TESTED:
        return [], [f"claude-agent-sdk {version} is newer than {dotted(SDK_NEWEST_TESTED)}, "
                    "the newest this proxy's tests ran against; if anything misbehaves, "
                    f"`{shlex.quote(sys.executable)} -m pip install "
                    f"'claude-agent-sdk=={dotted(SDK_NEWEST_TESTED)}'` is known good."]
    return [], []


def install_hint() -> str:
    return f"{shlex.quote(sys.executable)} -m pip install '{SDK_REQUIREMENT}'"


def login_hint() -> str:
    """What to do about a missing or rejected login, as commands for this box."""
    return (f"On the proxy's host run `{self_command()} login`; without a browser there, run "
            f"`{self_command()} setup-token` where you can log in and start the proxy with "
            "CLAUDE_CODE_OAUTH_TOKEN=<that token>.")


def login_status(binary: str) -> tuple[bool | None, str]:
    """Whether the CLI has a login, by its own `auth status` (no upstream call):
    (logged in, how or why not); None when the CLI cannot tell."""
    import subprocess
    try:
        status = json.loads(subprocess.run([binary, "auth", "status"], capture_output=True,
                                           text=True, timeout=60).stdout)
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        return None, f"could not ask the CLI: {exc}"
    return bool(status.get("loggedIn")), str(status.get("authMethod", "?"))


def cli_binary(config: Config) -> str | None:
    """The Claude Code CLI the SDK runs: the configured one, the bundled one, or PATH's."""
    if config.cli_path:
        return config.cli_path
    bundled = os.path.join(os.path.dirname(sdk.__file__), "_bundled", "claude") if sdk else ""
    return bundled if os.path.isfile(bundled) else shutil.which("claude")


def sdk_versions() -> dict:
    """Versions of the proxy, the SDK and its bundled CLI."""
    if sdk is None:
        return {"proxy": __version__, "sdk": None, "cli": None}
    try:
        from claude_agent_sdk._cli_version import __cli_version__ as cli_version
    except ImportError:
        cli_version = None
    return {"proxy": __version__, "sdk": sdk.__version__, "cli": cli_version}


def cli_environment(turn: Turn) -> dict[str, str]:
    """What the CLI's environment adds for one Turn (merged over the proxy's own)."""
    env = {
        # One client request is one upstream call: no title or telemetry calls.
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        # Fail fast: the client's own SDK retries 429/529 on the real status.
        "CLAUDE_CODE_MAX_RETRIES": "0",
        # The exact model the client named, never a newer one.
        "CLAUDE_CODE_DISABLE_LEGACY_MODEL_REMAP": "1",
        # Only the betas the CLI needs to talk to the API at all.
        "CLAUDE_CODE_DISABLE_EXPERIMENTAL_BETAS": "1",
        # The conversation as the client sent it, however long: without these the
        # CLI summarises it near the context window (before a turn, after an
        # upstream "prompt is too long", or while idle), in extra upstream calls,
        # and sends the summary instead; or refuses the turn by its own estimate.
        # The upstream alone decides what is too long.
        "DISABLE_COMPACT": "1",
        "CLAUDE_CODE_BLOCKING_LIMIT_OVERRIDE": str(10**12),
        # Nor a "<total_tokens>N tokens left" note after the client's tool results
        # (the CLI's default for some models, 4.x among them).
        "CLAUDE_CODE_TOTAL_TOKENS_REMINDER": "off",
        # A stream the upstream cuts is an error for the client, as from the API; the
        # CLI would ask again without streaming, and stay on an answer the client
        # only saw the start of.
        "CLAUDE_CODE_DISABLE_NONSTREAMING_FALLBACK": "1",
        # The client's parameters, merged last into every upstream body.
        "CLAUDE_CODE_EXTRA_BODY": json.dumps(turn.params, separators=(",", ":")),
        # The CLI inherits the proxy's environment; the proxy's own key is not its
        # business (and agent mode's tools can read the CLI's environment).
        "CLAUDE_PROXY_API_KEY": "",
    }
    if "thinking" not in turn.params:
        # No thinking unless the client asked: this removes `thinking` and
        # `context_management` (older model ids think by default otherwise).
        env["CLAUDE_CODE_DISABLE_THINKING"] = "1"
    if turn.betas:
        env["ANTHROPIC_BETAS"] = turn.betas     # added to the CLI's own betas
    if turn.tools:
        # A client tool call waits for the client; the reaper, not the CLI, ends it.
        env["MCP_TOOL_TIMEOUT"] = str(TOOL_WAIT_MS)
        # No cut at 25,000 tokens of a tool result (with an image, its text and
        # the image; a text-only one is bounded by MCP_RESULT_MAX_CHARS instead).
        env["MAX_MCP_OUTPUT_TOKENS"] = str(10**9)
    return env


class ToolBroker:
    """Where a CLI's calls of client tools wait for the client's tool_results.

    Each round the engine tells it which tool_use blocks the upstream sent
    (`expect`); the CLI's calls through the MCP server claim them by name and
    input, and wait until the engine `deliver`s the client's results. A call that
    claims nothing, or a CLI that goes on although a call never reached the broker
    (CliWatch), makes the broker `broken`: that CLI is not to be continued.
    """

    def __init__(self) -> None:
        self._calls: list[dict] = []
        self._early: list[tuple[str, dict, asyncio.Future]] = []
        self.expected = False               # this round's calls are known
        self.broken = False
        self.reached = 0                    # calls that reached it since the last upstream
                                            # message began (CliWatch counts and resets)

    def begin(self) -> None:
        """A new round: a prompt or results were just sent to the CLI. The last
        round's calls stay claimable: the CLI may make them one after another."""
        self.expected = False

    def expect(self, tool_uses: list[dict]) -> None:
        """The calls of the upstream message that just ended (upstream names)."""
        loop = asyncio.get_running_loop()
        self._calls = [{"id": b["id"], "name": b["name"], "input": b["input"],
                        "claimed": False, "result": loop.create_future()} for b in tool_uses]
        self.expected = True
        early, self._early = self._early, []
        for name, arguments, waiter in early:
            if not waiter.done():           # the SDK may have cancelled the call
                waiter.set_result(self._claim(name, arguments))

    @property
    def pending(self) -> list[str]:
        """Ids of the calls that wait for a result."""
        return [c["id"] for c in self._calls if not c["result"].done()]

    def deliver(self, results: dict[str, dict]) -> None:
        for call in self._calls:
            if call["id"] in results and not call["result"].done():
                call["result"].set_result(results[call["id"]])

    def _claim(self, name: str, arguments: dict) -> dict | None:
        """The first unclaimed call of that name and input, else of that name: the
        CLI is JavaScript, so a large integer in an input can arrive changed."""
        free = [c for c in self._calls if not c["claimed"] and c["name"] == name]
        call = next((c for c in free if c["input"] == arguments), free[0] if free else None)
        if call is not None:
            call["claimed"] = True
        return call

    async def call(self, name: str, arguments: dict) -> dict:
        """The MCP handler's side: the client's result for this call. The CLI may
        call as soon as a tool_use block ends, before the engine saw the message end."""
        self.reached += 1
        call = self._claim(name, arguments)
        if call is None and not self.expected:
            waiter = asyncio.get_running_loop().create_future()
            self._early.append((name, arguments, waiter))
            call = await waiter
        if call is None:
            self.broken = True
            return {"content": [{"type": "text", "text": f"No pending call of {name}."}],
                    "is_error": True}
        return await call["result"]


def mcp_server(tools: list[dict], broker: ToolBroker) -> Any:
    """The in-process MCP server that offers the client's tools to the CLI, schemas
    as sent. Every call goes to the broker unchecked: the client validates its own
    tools' input, as with the real API (the SDK's `create_sdk_mcp_server` answers a
    call that fails its schema check by itself, so the CLI would go on without the
    client). The SDK's server builder serves both mcp majors."""
    from claude_agent_sdk._internal._mcp_compat import build_tool_server
    from mcp.types import CallToolResult, Tool

    async def call(name: str, arguments: dict) -> Any:
        result = await broker.call(MCP_PREFIX + name, arguments)
        return CallToolResult.model_validate({"content": result["content"],
                                              "isError": result["is_error"]})
    listed = [Tool.model_validate({"name": upstream_tool_name(tool["name"])[len(MCP_PREFIX):],
                                   "description": tool.get("description", ""),
                                   "inputSchema": tool["input_schema"],
                                   "_meta": {"anthropic/maxResultSizeChars":
                                             MCP_RESULT_MAX_CHARS}})
              for tool in tools]
    return sdk.McpSdkServerConfig(
        type="sdk", name=MCP_SERVER,
        instance=build_tool_server(MCP_SERVER, __version__, listed, call))


class TranscriptStore:
    """A session store that serves one synthesized transcript to the SDK's resume.

    The CLI mirrors its own lines back through `append`; the proxy keeps nothing,
    since a stateless client sends the whole conversation every time.
    """

    def __init__(self, session_id: str, entries: list[dict]):
        self.session_id = session_id
        self.entries = entries

    async def append(self, key: dict, entries: list[dict]) -> None:
        """Discard the CLI's mirrored lines."""

    async def load(self, key: dict) -> list[dict] | None:
        """The synthesized transcript for our session id."""
        return self.entries if key.get("session_id") == self.session_id else None


def cli_options(turn: Turn, config: Config, now: dt.datetime,
                broker: ToolBroker | None = None) -> Any:
    """ClaudeAgentOptions for a CLI that serves exactly this Turn."""
    store = session_id = None
    upstream_names = {tool["name"]: upstream_tool_name(tool["name"]) for tool in turn.tools}
    env = cli_environment(turn)
    history = turn.history
    if prompt_in_transcript(turn):
        # The CLI resumes a transcript that ends in an unanswered user turn by
        # sending that turn itself, as it is, once an empty text block before the
        # tool_results marks it a prompt rather than a finished tool round (the
        # CLI drops the empty block). No prompt follows: one upstream call.
        env["CLAUDE_CODE_RESUME_INTERRUPTED_TURN"] = "1"
        history = history + [{"role": "user", "content": [{"type": "text", "text": ""}]
                              + turn.prompt["content"]}]
    cwd = config.agent_dir or config.workdir
    if history:
        session_id = str(uuid.uuid4())
        store = TranscriptStore(session_id, transcript_entries(
            rename_tool_uses(history, upstream_names), session_id, cwd, now, turn.model))
    agent_rules = agent_permissions(config.agent_dir) if config.agent_dir else []
    return sdk.ClaudeAgentOptions(
        model=turn.model,
        system_prompt=turn.system,
        # No built-in tool is offered or run unless the operator turned agent mode on.
        tools=list(AGENT_TOOLS) if config.agent_dir else [],
        setting_sources=[],             # no user settings, no CLAUDE.md
        strict_mcp_config=True,
        cwd=cwd,                        # private and empty: reveals nothing of the host
        include_partial_messages=True,  # the upstream's own stream events
        verbatim_prompts=True,          # no @file expansion of client text
        mcp_servers={MCP_SERVER: mcp_server(turn.tools, broker or ToolBroker())}
        if turn.tools else {},
        allowed_tools=list(upstream_names.values()) + agent_rules,
        # Every client tool round waits for the client, so the turns need no tight
        # bound; without tools one turn is one upstream call.
        max_turns=MAX_TOOL_ROUNDS if turn.tools else
        AGENT_MAX_TURNS if config.agent_dir else 1,
        # Thinking the client asked for: the CLI then keeps thinking blocks in the
        # history; the extra body carries the exact budget.
        thinking={k: v for k, v in turn.params["thinking"].items() if k != "display"}
        if "thinking" in turn.params else None,     # the CLI's flag knows fewer displays
        # Marks the CLI as this proxy's, for reap_orphans after a crash.
        env={**env, OWNER_ENV: str(os.getpid())},
        session_store=store,
        resume=session_id,
        # No transcript of the client's conversation under ~/.claude: the client
        # holds it; and the CLI saves ~3 ms of CPU a turn.
        extra_args={"no-session-persistence": None},
        cli_path=config.cli_path,
        # Agent mode's Bash runs in the CLI's sandbox, or not at all.
        sandbox=agent_sandbox(os.environ) if config.agent_dir else None,
        # One line of the CLI's output can hold a whole client message (it echoes
        # tool results), which the SDK's default 1 MB line limit would refuse; a
        # small body limit must not cut the CLI's own lines either.
        max_buffer_size=max(2 * config.max_body_bytes, SDK_LINE_LIMIT),
        stderr=(lambda line: log.debug("cli: %s", line.rstrip())) if config.debug else None,
    )


def agent_sandbox(environ: Mapping[str, str]) -> dict:
    """The CLI's sandbox for agent mode's Bash (bubblewrap on Linux, Seatbelt on macOS):
    its own pid namespace, so no /proc/<pid>/environ of the CLI or the proxy (the
    token); the login's credentials files unreadable; and the CLI refuses to run a
    command at all rather than run it outside the sandbox."""
    homes = [os.path.join(os.path.expanduser("~"), ".claude"),
             environ.get("CLAUDE_CONFIG_DIR"), environ.get("CLAUDE_SECURESTORAGE_CONFIG_DIR")]
    credentials = [os.path.join(os.path.abspath(home), ".credentials.json")
                   for home in homes if home]
    return {"enabled": True, "failIfUnavailable": True, "allowUnsandboxedCommands": False,
            "filesystem": {"denyRead": list(dict.fromkeys(credentials))}}


def agent_sandbox_problem(platform: str = sys.platform,
                          which: Callable[[str], str | None] = shutil.which) -> str | None:
    """Why the CLI's Bash sandbox cannot run on this box; None when it can."""
    if platform == "darwin":
        return None if os.path.exists("/usr/bin/sandbox-exec") else \
            "/usr/bin/sandbox-exec is missing."
    if not platform.startswith("linux"):
        return f"the CLI has a Bash sandbox on Linux and macOS only, not on {platform}."
    missing = [name for name in ("bwrap", "socat") if not which(name)]
    if missing:
        return (f"{' and '.join(missing)} not found: install them (Debian and Ubuntu: "
                "`apt-get install -y bubblewrap socat`; Fedora: `dnf install bubblewrap "
                "socat`).")
    import subprocess
    try:    # what the sandbox needs of the kernel: user, pid and network namespaces
        done = subprocess.run([which("bwrap"), "--ro-bind", "/", "/", "--dev", "/dev",
                               "--proc", "/proc", "--unshare-pid", "--unshare-net",
                               "--die-with-parent", "--", "true"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"bubblewrap failed to run: {exc}."
    if done.returncode:
        return (f"bubblewrap cannot create its namespaces here ({done.stderr.strip()}); "
                "see https://code.claude.com/docs/en/sandboxing.")
    return None


def agent_permissions(directory: str) -> list[str]:
    """Permission rules of agent mode: file tools inside the directory only (any
    other path needs an approval nobody can give), the rest allowed. The CLI applies
    Read rules to Glob and Grep too; a bare "Glob" or "Grep" would allow any path."""
    inside = "/" + os.path.join(os.path.abspath(directory), "**")    # "//abs/path/**"
    return [f"Read({inside})", f"Edit({inside})", f"Write({inside})",
            "Bash", "WebFetch", "WebSearch"]


# -- errors and rate limits ----------------------------------------------------

_API_ERROR_RE = re.compile(r"API Error: (?:(\d{3}) )?(.*?)(?:\.? This is a server-side issue.*)?$",
                           re.S)


def sdk_error(exc: BaseException) -> ProxyError:
    """A ProxyError for an SDK exception raised outside a result."""
    if isinstance(exc, ProxyError):
        return exc
    if sdk is not None and isinstance(exc, sdk.CLINotFoundError):
        return ServiceUnavailable(f"The Claude Code CLI was not found: {exc}")
    if sdk is not None and isinstance(exc, sdk.ResultError):
        return result_error(exc.data, None, time.time())
    if sdk is not None and isinstance(exc, sdk.CLIConnectionError):
        return ServiceUnavailable(f"Could not start the Claude Code CLI: {exc}")
    if sdk is not None and isinstance(exc, sdk.ProcessError):
        return BadGateway("The Claude Code CLI exited unexpectedly"
                          + (f" (exit code {exc.exit_code})." if exc.exit_code else "."))
    log.error("unexpected SDK failure", exc_info=exc)
    return BadGateway("The Claude Code CLI failed.")


RATE_LIMIT_WINDOWS = {
    "five_hour": "5-hour", "seven_day": "weekly", "seven_day_opus": "weekly Opus",
    "seven_day_sonnet": "weekly Sonnet", "overage": "extra-usage",
}


def utc_text(stamp: Any, layout: str) -> str | None:
    """A Unix time in UTC, laid out; None for what is no time (upstream data)."""
    with contextlib.suppress(TypeError, ValueError, OverflowError, OSError):
        return dt.datetime.fromtimestamp(stamp, dt.timezone.utc).strftime(layout)
    return None


def rate_limit_message(info: dict, now: float) -> tuple[str, float | None]:
    """Words and retry-after seconds for a rejected subscription window."""
    window = info.get("rateLimitType") or ""
    name = RATE_LIMIT_WINDOWS.get(window, window.replace("_", " ") or "usage")
    resets_at = info.get("resetsAt")
    when = utc_text(resets_at, "%Y-%m-%dT%H:%M:%SZ") if _is_number(resets_at) else None
    if when is None:
        return (f"Claude subscription {name} limit reached.", None)
    return (f"Claude subscription {name} limit reached; it resets at {when}. This is a "
            f"usage limit of the subscription, not a transient throttle.",
            max(1.0, resets_at - now))


WINDOW_HEADER_NAMES = {"five_hour": "5h", "seven_day": "7d", "seven_day_opus": "7d_opus",
                       "seven_day_sonnet": "7d_sonnet", "seven_day_overage_included": "7d_oi",
                       "overage": "overage"}


def rate_limit_headers(info: dict) -> dict[str, str]:
    """The CLI's rate-limit information as the API's anthropic-ratelimit-unified-*
    response headers."""
    prefix = "anthropic-ratelimit-unified-"
    headers = {}
    if info.get("status"):
        headers[prefix + "status"] = str(info["status"])
    if isinstance(info.get("resetsAt"), (int, float)):
        headers[prefix + "reset"] = str(int(info["resetsAt"]))
    if info.get("rateLimitType"):
        headers[prefix + "representative-claim"] = str(info["rateLimitType"])
    for window, state in (info.get("unifiedWindows") or {}).items():
        name = WINDOW_HEADER_NAMES.get(window, window)
        for key, header in (("status", "status"), ("utilization", "utilization"),
                            ("resetsAt", "reset")):
            if isinstance(state, dict) and state.get(key) is not None:
                value = state[key]
                headers[f"{prefix}{name}-{header}"] = str(int(value) if key == "resetsAt"
                                                          else value)
    return headers


def usage_windows(info: dict, observed: float) -> dict:
    """GET /usage: the latest windows, readable."""
    def when(stamp: Any) -> str | None:
        return utc_text(stamp, "%Y-%m-%dT%H:%M:%SZ")
    return {"status": info.get("status"), "representative_window": info.get("rateLimitType"),
            "resets_at": when(info.get("resetsAt")), "observed_at": when(observed),
            "using_overage": info.get("isUsingOverage"),
            "windows": {window: {"status": state.get("status"),
                                 "utilization": state.get("utilization"),
                                 "resets_at": when(state.get("resetsAt"))}
                        for window, state in (info.get("unifiedWindows") or {}).items()
                        if isinstance(state, dict)}}


# The CLI's words for a login it lacks or the upstream refused ("Not logged in ·
# Please run /login", "OAuth token revoked · ...", "Login expired · ..."), which
# may come without a status.
LOGIN_PROBLEMS = ("/login", "Not logged in", "Authentication required", "Invalid API key",
                  "Failed to authenticate", "Sign in again")


def result_error(data: dict, rate_limit: dict | None, now: float) -> ProxyError:
    """The ProxyError for a CLI result that reports an error."""
    text = (data.get("result") or "; ".join(data.get("errors") or [])
            or data.get("subtype") or "unknown error").strip()
    status = data.get("api_error_status")
    found = _API_ERROR_RE.search(text)
    upstream_message = found.group(2).strip() if found else text
    if status is None and found and found.group(1):
        status = int(found.group(1))
    if status == 401 or any(words in text for words in LOGIN_PROBLEMS):
        return AuthenticationFailed(f"The proxy's Claude login is missing or was rejected. "
                                    f"{login_hint()} Then retry. (upstream: {upstream_message})")
    if status == 429 and rate_limit and rate_limit.get("resetsAt") and \
            rate_limit.get("status") == "rejected":
        message, retry_after = rate_limit_message(rate_limit, now)
        # A spent subscription window does not come back in seconds: tell the
        # client's SDK not to retry (the anthropic SDKs honour x-should-retry).
        return RateLimited(message, {**retry_after_header(retry_after or RETRY_AFTER_DEFAULT_S),
                                     "x-should-retry": "false"})
    if data.get("terminal_reason") == "prompt_too_long":
        # The CLI keeps only its own words of the upstream's 400; clients match the prefix.
        return PromptTooLong("prompt is too long: the conversation exceeds the model's "
                             "context window (the proxy never shortens it)")
    if status is None:
        return BadGateway(f"The Claude Code CLI reported an error: {text}")
    return error_for_upstream_status(status, upstream_message)


# -- one CLI, owned by one task ------------------------------------------------

_CLOSED = object()          # end-of-turn marker in a CliProcess outbox


@dataclasses.dataclass(frozen=True)
class TurnJob:
    """A CliProcess job: one user message (None: the turn a resumed transcript
    starts by itself), whose SDK messages go to `outbox`."""

    message: dict | None
    message_id: str | None
    outbox: asyncio.Queue


@dataclasses.dataclass(frozen=True)
class RewindJob:
    """A CliProcess job: forget the conversation from message `first` on."""

    first: str
    latest: str
    done: asyncio.Future            # set to whether the CLI rewound


class CliProcess:
    """One Claude Code CLI behind a ClaudeSDKClient, owned by one task.

    The SDK's client holds anyio task groups from connect() to disconnect(), and
    those must be entered and left by the same task; so a dedicated owner task
    holds the client and jobs (TurnJob, RewindJob; None: exit) reach it through a
    queue.
    """

    def __init__(self, options: Any):
        self.options = options
        self._process: Any = None           # the SDK transport's anyio Process
        self._failure: ProxyError | None = None
        self._jobs: asyncio.Queue = asyncio.Queue()
        self._outbox: asyncio.Queue | None = None
        self._owner: asyncio.Task | None = None
        self._stopping = False              # close or kill asked: no new turns
        self._reading: asyncio.Queue | None = None    # the current turn's outbox
        self.goes_on: Callable[[Any], bool] = lambda item: False  # a CliWatch
        # Ids of the first and the latest prompt of the CLI's conversation, which a
        # rewind names; no first one when it began with a resumed transcript.
        self.first_message: str | None = None
        self._last_message: str | None = None
        self.frozen = False                 # stopped (SIGSTOP) while it waits for a job

    async def start(self) -> None:
        """Spawn and connect the CLI; raise a ProxyError when it cannot start."""
        ready = asyncio.get_running_loop().create_future()
        # Read even when nobody awaits it any more (the start was cancelled).
        ready.add_done_callback(lambda done: done.cancelled() or done.exception())
        self._owner = asyncio.create_task(self._own(ready))
        try:
            await asyncio.shield(ready)
        except asyncio.CancelledError:
            await self.kill()
            raise

    def send(self, message: dict | None) -> None:
        """Start a turn with one user message, or None for the turn a new CLI starts
        by itself (`prompt_in_transcript`); `receive` yields what follows."""
        if self._owner is None or self._owner.done() or self._stopping:
            raise self._failure or BadGateway("The Claude Code CLI stopped.")
        message_id = self._last_message = str(uuid.uuid4()) if message else None
        if self.first_message is None and self.options.resume is None:
            self.first_message = message_id
        self._reading = asyncio.Queue()
        self._jobs.put_nowait(TurnJob(message, message_id, self._reading))

    async def rewind(self) -> bool:
        """Make the idle CLI forget its whole conversation, as if it was never
        sent; False if it cannot (it began with a transcript) or refused."""
        if self._owner is None or self._owner.done() or self._stopping \
                or self.first_message is None or self._last_message is None:
            return False
        done = asyncio.get_running_loop().create_future()
        self._jobs.put_nowait(RewindJob(self.first_message, self._last_message, done))
        if not await asyncio.shield(done):      # the owner task sets it, whoever waits
            return False
        self.first_message = self._last_message = None
        return True

    async def receive(self) -> AsyncIterator[Any]:
        """The current turn's SDK messages up to its ResultMessage, from where the
        last reader stopped (a turn parked at a tool call goes on later)."""
        assert self._reading is not None, "receive() before send()"
        while True:
            item = await self._reading.get()
            if item is _CLOSED:
                return
            if isinstance(item, BaseException):
                raise sdk_error(item)
            yield item

    async def close(self) -> None:
        """Let the CLI exit (stdin EOF); kill it if that takes too long."""
        if self._owner is None or self._owner.done():
            return
        self._stopping = True
        self._jobs.put_nowait(None)
        try:
            await asyncio.wait_for(asyncio.shield(self._owner), CLI_CLOSE_TIMEOUT_S)
        except asyncio.TimeoutError:
            await self.kill()
        except asyncio.CancelledError:
            await self.kill()
            raise

    @property
    def alive(self) -> bool:
        """True while the CLI can take a turn. A CLI that died while idle (the OOM
        killer, a kill) is a zombie before asyncio reaps it: one taken then would
        fail its turn, which a new CLI from the transcript answers."""
        return (self._owner is not None and not self._owner.done() and not self._stopping
                and (self._process is None or (self._process.returncode is None and
                                               process_exists(self._process.pid))))

    def memory_mb(self) -> dict[str, float | None]:
        """The CLI's memory from /proc (Linux), in MB: resident (`rss`, pages it shares
        with other CLIs counted whole) and proportional (`pss`, shared pages split
        among their users: what one more CLI costs)."""
        found: dict[str, float | None] = {"rss": None, "pss": None}
        if self._process is None:
            return found
        for name, field, key in (("status", "VmRSS:", "rss"), ("smaps_rollup", "Pss:", "pss")):
            with contextlib.suppress(OSError, ValueError, IndexError, StopIteration):
                with open(f"/proc/{self._process.pid}/{name}") as lines:
                    found[key] = next(round(int(line.split()[1]) / 1024, 1)
                                      for line in lines if line.startswith(field))
        return found

    def kill_now(self) -> bool:
        """SIGKILL the CLI without waiting: it cuts its upstream connection at once."""
        if self._process is None or self._process.returncode is not None:
            return False
        self._stopping = True
        if self.frozen:                     # a killed CLI is not continued, nor its pid
            self.frozen = False             # (soon someone else's) by the watchdog
            tell_watchdog(f"-{self._process.pid}\n")
        # What the CLI started (agent mode's shells) must not outlive it.
        for pid in [*descendants(self._process.pid), self._process.pid]:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        self._jobs.put_nowait(None)         # wake an idle owner; a busy one sees EOF
        return True

    async def kill(self) -> None:
        """Stop the CLI now and wait until its owner task has cleaned up."""
        if self._owner is None or self._owner.done():
            return
        if not self.kill_now():
            self._stopping = True
            self._owner.cancel()            # still connecting: nothing to kill yet
        try:
            await asyncio.wait_for(asyncio.shield(self._owner), CLI_CLOSE_TIMEOUT_S)
        except asyncio.TimeoutError:
            self._owner.cancel()

    async def _own(self, ready: asyncio.Future) -> None:
        client = sdk.ClaudeSDKClient(self.options)
        try:
            await client.connect()
        except BaseException as exc:       # connect() already tore the CLI down
            _close_receive_stream(getattr(client, "_query", None))
            self._failure = sdk_error(exc) if not isinstance(exc, asyncio.CancelledError) \
                else BadGateway("The Claude Code CLI was stopped while starting.")
            if not ready.done():
                ready.set_exception(self._failure)
            self._refuse_queued_turns()
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        # The SDK keeps the process on its transport; holding it lets kill() cut it.
        self._process = getattr(getattr(client, "_transport", None), "_process", None)
        ready.set_result(None)
        try:
            while (job := await self._next_job()) is not None:
                if isinstance(job, RewindJob):
                    rewound = False
                    try:
                        rewound = await _rewind(client, job.first, job.latest)
                    finally:            # also when the owner is cancelled mid-rewind
                        job.done.set_result(rewound)
                    continue
                self._outbox = job.outbox
                if job.message is not None:
                    await client.query(_single(job.message, job.message_id))
                async for item in client.receive_response():
                    if self.goes_on(item):  # stopped here, ahead of its next upstream call
                        self.kill_now()     # (on the reader's side it would be too late)
                        item = WentOnAt(item)
                    self._outbox.put_nowait(item)
                self._outbox.put_nowait(_CLOSED)
                self._outbox = None
        except Exception as exc:            # a CLI that failed mid-turn is not reused
            if self._outbox is not None:
                self._outbox.put_nowait(exc)
                self._outbox = None
        finally:
            if self._outbox is not None:
                self._outbox.put_nowait(BadGateway("The Claude Code CLI stopped."))
            self._refuse_queued_turns()
            query = getattr(client, "_query", None)
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(client.disconnect(), CLI_CLOSE_TIMEOUT_S)
            _close_receive_stream(query)
            if self._stopping and self._process is not None:
                remove_cli_leftovers(self._process.pid, self.options.env.get(
                    "CLAUDE_CONFIG_DIR") or os.environ.get("CLAUDE_CONFIG_DIR") or
                    os.path.join(os.path.expanduser("~"), ".claude"), tempfile.gettempdir(),
                    time.time())

    async def _next_job(self) -> Any:
        """The next job. A CLI that waits for one longer than CLI_FREEZE_AFTER_S is
        stopped until it comes: an idle CLI's own timers cost 10-20 ms of CPU a
        second, beside the requests; a stopped one costs nothing and answers as fast."""
        timer = asyncio.get_running_loop().call_later(CLI_FREEZE_AFTER_S, self._freeze)
        try:
            return await self._jobs.get()
        finally:               # whatever comes next, a close or kill included, runs
            timer.cancel()
            if self.frozen:
                self.frozen = False
                self._signal(signal.SIGCONT)
                tell_watchdog(f"-{self._process.pid}\n")

    def _freeze(self) -> None:
        """Stop the idle CLI, once a watchdog knows to continue it should the proxy die."""
        if self._process is not None and tell_watchdog(f"+{self._process.pid}\n"):
            self.frozen = self._signal(signal.SIGSTOP)

    def _signal(self, sig: int) -> bool:
        """Send `sig` to the CLI itself (not what it started); False if it is gone."""
        if self._process is None or self._process.returncode is not None:
            return False
        try:
            os.kill(self._process.pid, sig)
        except OSError:
            return False
        return True

    def _refuse_queued_turns(self) -> None:
        """Fail turns still queued when the owner stops, so no caller waits forever."""
        self._stopping = True
        while not self._jobs.empty():
            job = self._jobs.get_nowait()
            if isinstance(job, RewindJob):
                job.done.set_result(False)
            elif isinstance(job, TurnJob):
                job.outbox.put_nowait(self._failure or BadGateway("The Claude Code CLI stopped."))


def _close_receive_stream(query: Any) -> None:
    """Close what the SDK's disconnect() leaves open when closing a killed CLI
    fails (anyio warns of it when it is collected)."""
    if query is not None:
        with contextlib.suppress(Exception):
            query.close_receive_stream()


async def _single(message: dict, message_id: str) -> AsyncIterator[dict]:
    yield {"type": "user", "message": message, "parent_tool_use_id": None, "uuid": message_id}


async def _rewind(client: Any, first: str, latest: str) -> bool:
    """The CLI's own rewind to before message `first` (the control request behind
    its "rewind conversation", which the SDK has no method for); the CLI refuses
    (`rewound: false`) unless `latest` is its latest prompt."""
    try:
        answer = await client._query._send_control_request(
            {"subtype": "rewind_conversation", "target_message_uuid": first,
             "last_seen_user_message_uuid": latest}, timeout=CLI_REWIND_TIMEOUT_S)
    except Exception as exc:
        log.debug("rewind failed: %s", exc)
        return False
    if isinstance(answer, dict) and answer.get("rewound") is True:
        return True
    log.debug("rewind refused: %s", answer.get("reason") if isinstance(answer, dict) else answer)
    return False


# Stops after which the CLI calls the upstream again on its own, with a note of its
# own in the conversation ("Output token limit hit. Resume directly...", "Your
# response above was stopped by a safety classifier..."): no switch stops all.
CLI_GOES_ON_AFTER = frozenset({"max_tokens", "model_context_window_exceeded", "refusal"})


@dataclasses.dataclass(frozen=True)
class WentOnAt:
    """In a CliProcess outbox, in place of the SDK message its CLI went on at."""

    message: Any


class CliWatch:
    """The one decision to stop a CLI: it goes on without the client.

    Its owner task feeds it every SDK message in order and stops the CLI the moment
    it says so, ahead of the CLI's next upstream call, and hands that message to
    the turn's reader as WentOnAt. A CLI goes on after a stop of CLI_GOES_ON_AFTER ("recovery"
    calls); when it starts an upstream call although a client tool call of the
    last message never reached the broker (the SDK answers a call whose input
    fails the tool's schema itself) or claimed nothing; and when it starts one
    after a whole answer, or one of a subagent.
    """

    def __init__(self, broker: ToolBroker):
        self.broker = broker
        self._calls_sent = 0                # client tool calls of the last upstream message
        self._stop_reason: str | None = None
        self._answered = False              # the turn's answer is whole

    def __call__(self, message: Any) -> bool:
        if isinstance(message, sdk.ResultMessage):
            self._answered = False          # the next turn starts with the next prompt
            return False
        if not isinstance(message, sdk.StreamEvent):
            return False
        event = message.event
        kind = event.get("type")
        if message.parent_tool_use_id:
            return kind == "message_start"
        if kind == "message_start":
            skipped = self.broker.reached < self._calls_sent
            self.broker.reached = self._calls_sent = 0
            went_on = self._answered or skipped or self.broker.broken
            self.broker.broken = self.broker.broken or skipped
            return went_on
        block = event.get("content_block") or {}
        stop = (event.get("delta") or {}).get("stop_reason")
        if block.get("type") == "tool_use" and str(block.get("name")).startswith(MCP_PREFIX):
            self._calls_sent += 1
        elif stop:
            self._stop_reason = stop
            return stop in CLI_GOES_ON_AFTER
        elif kind == "message_stop":
            self._answered = self._stop_reason not in (None, "tool_use")
        return False


# -- reading a turn: SDK messages in, typed events out -------------------------

@dataclasses.dataclass(frozen=True)
class Delta:
    """One stream event of the answer as the client sees it: its own tool names, an
    agent-mode answer's upstream messages as one."""

    event: dict


@dataclasses.dataclass(frozen=True)
class RateLimitReport:
    """The subscription's rate-limit state, as the CLI reported it."""

    info: dict


@dataclasses.dataclass(frozen=True)
class Answer:
    """The answer is whole. `tool_calls` (upstream names): the client tool calls it
    ends at, which the CLI now waits for."""

    message: dict
    tool_calls: list[dict]


@dataclasses.dataclass(frozen=True)
class Finished:
    """The CLI reached the end of its turn: it can take the next one."""


@dataclasses.dataclass(frozen=True)
class WentOn:
    """The CLI went on on its own after the answer; it has been stopped."""


TurnEvent = Delta | RateLimitReport | Answer | Finished | WentOn


class TurnReader:
    """One turn of a CLI read as TurnEvents; raises the ProxyError an error result
    means, and CliWentOn when the CLI went on before any answer began (the engine
    then tries once more on a new CLI).

    The CLI's stream is the upstream's with three seams of its own, left out here:
    it closes a stream the upstream broke off with a content_block_stop, a
    message_delta without a stop_reason and a message_stop (its error follows);
    forwarded, they would end the client's answer as if it were whole.
    """

    def __init__(self, names: dict[str, str], builtin: set[str]):
        self.names = names                  # upstream tool name -> the client's
        self.builtin = builtin              # agent mode's tools, which the CLI runs
        self.agent = AgentStream(builtin)
        self.assembler = MessageAssembler()
        self.rate_limit: dict | None = None
        self._held: dict | None = None      # a content_block_stop, until the next event
        self._stopped = False               # this upstream message has its stop_reason
        self._tools_called: list[str] = []  # by this upstream message
        self._agent_round = False           # it ends at built-in tools the CLI runs
        self._client_calls = False          # it ends at the client's tools
        self._answered = False

    def feed(self, message: Any) -> list[TurnEvent]:
        if isinstance(message, WentOnAt):
            return self._went_on(message.message)
        if isinstance(message, sdk.StreamEvent):
            return [] if message.parent_tool_use_id or self._answered \
                else self._stream(message.event)
        if isinstance(message, sdk.RateLimitEvent):
            self.rate_limit = dict(message.rate_limit_info.raw or {})
            return [RateLimitReport(self.rate_limit)]
        if isinstance(message, sdk.ResultMessage):
            if message.is_error:
                data = {f.name: getattr(message, f.name) for f in dataclasses.fields(message)}
                raise result_error(data, self.rate_limit, time.time())
            if not self._answered:
                raise BadGateway("The upstream returned no message.")
            return [Finished()]
        return []

    def _stream(self, event: dict) -> list[TurnEvent]:
        kind = event.get("type")
        stop = (event.get("delta") or {}).get("stop_reason")
        block = event.get("content_block") or {}
        if kind == "message_start":
            self._tools_called, self._stopped = [], False
        elif kind == "content_block_start" and block.get("type") == "tool_use":
            self._tools_called.append(block.get("name"))
        held, self._held = self._held, None
        if kind == "content_block_stop":
            self._held = event              # the next event tells whose it is
            return []
        if kind == "message_delta" and not stop:
            return []                       # the API's message_delta always has one
        if kind == "message_stop" and not self._stopped:
            return []
        if stop:
            self._stopped = True
            if stop == "tool_use" and set(self._tools_called) <= self.builtin:
                self._agent_round = True
            elif stop == "tool_use":
                self._client_calls = True
        events = self._forward([held, event] if held is not None else [event])
        if kind == "message_stop":
            if not self._agent_round:
                return events + [self._answer()]
            self._agent_round = False
        return events

    def _went_on(self, message: Any) -> list[TurnEvent]:
        if self._answered:
            return [WentOn()]
        if message.event.get("type") != "message_start" and not message.parent_tool_use_id:
            # A stop it goes on after: the answer ends there.
            return self._stream(message.event) + self._forward([{"type": "message_stop"}]) \
                + [self._answer(), WentOn()]
        text = "The Claude Code CLI went on without the client's tool results."
        raise CliWentOn(text) if self.assembler.message is None else BadGateway(text)

    def _forward(self, events: list[dict]) -> list[TurnEvent]:
        out: list[TurnEvent] = []
        for event in events:
            for seen in self.agent.feed(client_event(event, self.names)):
                self.assembler.feed(seen)
                out.append(Delta(seen))
        return out

    def _answer(self) -> Answer:
        self._answered = True
        message = self.assembler.message
        calls = [{**block, "name": upstream_tool_name(block["name"])}
                 for block in message["content"] if block["type"] == "tool_use"]
        return Answer(message, calls if self._client_calls else [])


# =============================================================================
# 11. Host processes -- CLI sessions, /proc, orphans, leftovers, the watchdog
# =============================================================================
# What the CLIs leave on the host, and how none outlives the proxy: each starts in
# a session of its own (`_in_own_session`), a crashed run's CLIs are found by
# their owner variable and reaped, a killed CLI's files are removed, the CLIs'
# working directory is a private temp directory, and a watchdog process continues
# stopped CLIs should the proxy die.

def _in_own_session(open_process: Callable) -> Callable:
    """anyio.open_process, with which the SDK spawns each CLI (its only call), made
    to start it in a session of its own. An idle CLI is stopped (`_freeze`), and when
    a process group holding a stopped process is orphaned -- the shell or start
    script that ran the proxy with `&` exits -- the kernel sends the whole group
    SIGHUP and SIGCONT: in the proxy's group that killed the proxy, unlogged. Nor
    does the terminal's Ctrl-C or hang-up reach a CLI then: the proxy ends its CLIs
    itself, after its drain. The SDK has no option for it, and a parent cannot move
    a child that has exec'd to another group."""
    @functools.wraps(open_process)
    async def open_process_in_own_session(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("start_new_session", True)
        return await open_process(*args, **kwargs)
    return open_process_in_own_session


if sdk is not None:
    import anyio
    anyio.open_process = _in_own_session(anyio.open_process)


def available_memory() -> int:
    """The memory new processes can have without swapping (Linux's MemAvailable),
    else the machine's."""
    with contextlib.suppress(OSError, ValueError, IndexError, StopIteration):
        with open("/proc/meminfo") as lines:
            return next(int(line.split()[1]) * 1024 for line in lines
                        if line.startswith("MemAvailable:"))
    if hasattr(os, "sysconf"):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return 8 << 30


OWNER_ENV = "CLAUDE_SDK_PROXY_PID"


def _proc_stat(pid: int | str) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name: state, parent pid, ..."""
    with open(f"/proc/{pid}/stat") as status:
        return status.read().rsplit(")", 1)[1].split()


def process_exists(pid: int) -> bool:
    """False once the process has died, zombies included (Linux /proc; elsewhere True)."""
    if not os.path.isdir("/proc/self"):
        return True
    try:
        return _proc_stat(pid)[0] != "Z"
    except (OSError, IndexError):
        return False


def _proc_parents() -> dict[int, int]:
    """pid -> parent pid of every process (Linux /proc; empty elsewhere)."""
    parents = {}
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    parents[int(entry)] = int(_proc_stat(entry)[1])
    return parents


def descendants(pid: int) -> list[int]:
    """The processes below `pid`, children first."""
    parents, found, frontier = _proc_parents(), [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def reap_orphans() -> int:
    """Kill CLIs a crashed earlier run of the proxy left behind (their OWNER_ENV
    names a process that no longer exists); return how many."""
    reaped = 0
    for pid in _proc_parents():
        try:
            with open(f"/proc/{pid}/environ", "rb") as environ:
                marks = [v for v in environ.read().split(b"\0")
                         if v.startswith(OWNER_ENV.encode() + b"=")]
            if not marks:
                continue
            owner = int(marks[0].split(b"=", 1)[1])
            if owner == os.getpid() or _pid_alive(owner):
                continue
            os.kill(pid, signal.SIGKILL)
            reaped += 1
        except (OSError, ValueError):
            continue
    return reaped


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):    # another user's, or no pid at all: not ours
        pass
    return True


TEMP_PREFIX = "claude-sdk-proxy-run-"
TEMP_LOCK = "lock"          # held (flock) for the proxy's life: unlockable means left behind


FSWATCH_PROBE_S = 60.0      # a CLI's start-up probe directory is gone well within this


def remove_cli_leftovers(pid: int, config_dir: str, temp_dir: str, now: float) -> None:
    """Remove what a killed CLI leaves (one closed politely removes its own): its
    session record and key in its config directory (the user's real ~/.claude), its
    socket, and start-up probe directories older than FSWATCH_PROBE_S."""
    sessions = os.path.join(config_dir, "sessions")
    with contextlib.suppress(OSError):
        for name in os.listdir(sessions):
            if name.startswith(f"{pid}.") and name.endswith((".json", ".key")):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(sessions, name))
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(temp_dir, "cc-socks", f"{pid}.sock"))
    probes = os.path.join(temp_dir, f"claude-{os.getuid()}")
    with contextlib.suppress(OSError):
        for name in os.listdir(probes):
            path = os.path.join(probes, name)
            with contextlib.suppress(OSError):
                if name.startswith("fswatch-probe-") and \
                        now - os.lstat(path).st_mtime > FSWATCH_PROBE_S:
                    shutil.rmtree(path, ignore_errors=True)


def remove_left_temps(system: str) -> None:
    """Remove the private temp directories of proxies that ended without cleaning up
    (a crash, SIGKILL): this user's, whose lock nobody holds. A lock, unlike a pid,
    is right across pid namespaces (containers sharing /tmp) and pid reuse."""
    try:
        names = [n for n in os.listdir(system) if n.startswith(TEMP_PREFIX)]
    except OSError:                         # a temp dir one may write to but not list
        return
    for name in names:
        path = os.path.join(system, name)
        try:
            info = os.lstat(path)
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
                continue
            lock = os.open(os.path.join(path, TEMP_LOCK), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue                        # a live proxy's
        finally:
            os.close(lock)
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def private_temp() -> Iterator[str]:
    """The CLIs' working directory, inside a directory of this process's own, which
    also takes the SDK's and the CLIs' temporary files (a resumed CLI's config
    directory holds the conversation and a copy of the login); removed at exit,
    or by the next start after a crash."""
    system = tempfile.gettempdir()
    remove_left_temps(system)
    previous = tempfile.tempdir, os.environ.get("TMPDIR")
    with tempfile.TemporaryDirectory(prefix=TEMP_PREFIX) as root:
        lock = os.open(os.path.join(root, TEMP_LOCK), os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX)
        workdir, tempfile.tempdir = os.path.join(root, "cwd"), os.path.join(root, "tmp")
        os.mkdir(workdir)
        os.mkdir(tempfile.tempdir)
        os.environ["TMPDIR"] = tempfile.tempdir         # the CLIs inherit it
        try:
            yield workdir
        finally:
            tempfile.tempdir = previous[0]
            if previous[1] is None:
                del os.environ["TMPDIR"]
            else:
                os.environ["TMPDIR"] = previous[1]
            os.close(lock)


# A stopped CLI cannot see its stdin close when the proxy dies. So each proxy
# process tells a watchdog which CLIs it stopped ("+pid" and "-pid" lines on a
# pipe only it writes to); at EOF -- the proxy is gone, however it ended -- the
# watchdog continues them, and they exit at their stdin's EOF as running ones do.
WATCHDOG = """import os, signal, sys
stopped = set()
for line in sys.stdin:
    (stopped.add if line[0] == "+" else stopped.discard)(int(line[1:]))
for pid in stopped:
    try:
        os.kill(pid, signal.SIGCONT)
    except OSError:
        pass
"""
_watchdog: tuple[int, int] | None = None    # (the pid it watches, its pipe's write end)


def start_watchdog() -> None:
    """Start this process's watchdog, once (a forked child gets its own); its own
    session keeps it out of the terminal's Ctrl-C and hang-up. Without a watchdog
    idle CLIs are not stopped."""
    global _watchdog
    if _watchdog is not None and _watchdog[0] == os.getpid():
        return
    read_end, write_end = os.pipe()             # both close on exec: no CLI holds them
    try:
        os.posix_spawn(sys.executable, [sys.executable, "-I", "-S", "-c", WATCHDOG],
                       os.environ, setsid=True, file_actions=[
                           (os.POSIX_SPAWN_DUP2, read_end, 0),
                           (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                           (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0)])
    except (AttributeError, OSError) as exc:    # no posix_spawn here
        os.close(write_end)
        log.debug("no watchdog, so idle CLIs keep running: %s", exc)
        return
    finally:
        os.close(read_end)
    _watchdog = (os.getpid(), write_end)


def tell_watchdog(line: str) -> bool:
    """Send the watchdog one line; False when this process has none."""
    if _watchdog is None or _watchdog[0] != os.getpid():
        return False
    try:
        os.write(_watchdog[1], line.encode())
    except OSError:
        return False
    return True


# =============================================================================
# 12. Conversation engine -- live sessions, warm spares, the caps
# =============================================================================
# `Engine.run(turn)` is the one path every API dialect takes. It waits for a
# concurrency slot (529 after the queue timeout), then finds the CLI to answer on:
#   - a live session of the same shape whose conversation is exactly the
#     request's history (matched by `conversation_hash`): only the new turn
#     is sent, on a CLI that is already warm;
#   - for a new chat, a spare CLI pre-connected for that shape;
#   - otherwise a new CLI that resumes the history as a transcript.
# After a complete answer the session stays live, indexed by the conversation it
# now holds; a session that failed, was cut short or is evicted is killed. The
# number of CLI processes never exceeds `max_sessions`: spares go first, then the
# least recently used idle sessions. When that session is of a new chat's shape,
# the new chat gets its CLI rewound to before its first message (only one that
# started without history can) instead of a killed CLI and a cold start: warm,
# and past the CLI's first-turn work. It reads section 10's TurnEvents only.

# A session's states. Each change goes through `Engine._move`, which keeps the
# index of the sessions that hold a conversation (HOLDING).
STARTING = "starting"               # a spare whose CLI is still connecting
SPARE = "spare"                     # connected, no conversation yet
BUSY = "busy"                       # answering a request (or being rewound)
FINISHING = "finishing"             # its answer went out; reading on to the CLI's result
IDLE = "idle"                       # holds a conversation, waits for its follow-up
AWAITING_TOOLS = "awaiting_tools"   # holds a conversation parked at client tool calls
RETIRED = "retired"                 # forgotten; its CLI is exiting or gone
HOLDING = (IDLE, AWAITING_TOOLS)
# How a turn found its CLI: the live one that holds its conversation, a spare, an
# idle session rewound for a new chat, or one started now, with its history or not.
WARM, FROM_SPARE, RECYCLED, COLD, RESUMED = "warm", "spare", "recycled", "cold", "resumed"
SESSION_STATES = (BUSY, FINISHING, IDLE, AWAITING_TOOLS, SPARE, STARTING)


@dataclasses.dataclass
class SessionUsed:
    """The engine's first event of a turn: how it found its CLI."""

    how: str


EngineEvent = SessionUsed | TurnEvent


def spare_choice(demand: dict[str, int], spares: list[str], max_spares: int
                 ) -> tuple[str | None, int | None]:
    """The shape a spare is started for and the spare (its index in `spares`,
    oldest first, by shape) that makes way for it. `demand`: new chats of each
    shape, most recent shape last. The shape in most demand without a spare (the
    most recent of equals) gets one; at `max_spares`, only in place of a spare of
    a shape in less demand (the oldest of those equally demanded)."""
    wanted = max((shape for shape in reversed(demand) if shape not in spares and demand[shape]),
                 key=lambda shape: demand[shape], default=None)
    if wanted is None or len(spares) < max_spares:
        return wanted, None
    weakest = min(range(len(spares)), key=lambda i: demand.get(spares[i], 0), default=None)
    if weakest is None or demand.get(spares[weakest], 0) >= demand[wanted]:
        return None, None
    return wanted, weakest


@dataclasses.dataclass(eq=False)
class LiveSession:
    """A CLI process and the conversation it holds."""

    process: CliProcess
    turn: Turn                      # the shape it serves (its first request, no history)
    broker: ToolBroker
    state: str
    id: str = dataclasses.field(default_factory=lambda: "sess_" + uuid.uuid4().hex[:20])
    holds: str | None = None        # the conversation's digest, in a HOLDING state
    turns: int = 0
    last_used: float = dataclasses.field(default_factory=time.monotonic)

    def describe(self, now: float) -> dict:
        """The operator's view (GET /sessions): no content, no keys."""
        return {"id": self.id, "state": self.state,
                "shape": {"id": self.turn.shape, "model": self.turn.model,
                          "system_chars": len(self.turn.system),
                          "params": sorted(self.turn.params),
                          "tools": len(self.turn.tools)},
                "turns": self.turns, "idle_s": round(now - self.last_used, 1),
                "frozen": self.process.frozen,
                **{f"{kind}_mb": mb for kind, mb in self.process.memory_mb().items()}}


class Engine:
    """Runs Turns on live sessions, spares or new CLIs, within the caps."""

    def __init__(self, config: Config):
        self.config = config
        self._slots = asyncio.Semaphore(config.max_concurrent)
        self._waiting = 0
        self.sessions: dict[str, LiveSession] = {}
        self._idle: dict[tuple[str, str], LiveSession] = {}     # (shape, digest) -> session
        # shape -> (its Turn without a conversation, when its recent new chats came)
        self._demand: dict[str, tuple[Turn, list[float]]] = {}
        self._last_arrival = 0.0                # when the latest request came in
        self._cold_starts = 0                   # CLIs starting for a request
        self._spare_keeper: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()
        self._exits: set[asyncio.Task] = set()    # CLIs retired but not yet gone
        self._reaper: asyncio.Task | None = None
        self.closing = False

    @property
    def waiting(self) -> int:
        """Requests queued for a concurrency slot."""
        return self._waiting

    # -- the request path ----------------------------------------------------

    async def run(self, turn: Turn) -> AsyncIterator[EngineEvent]:
        """Yield the SessionUsed, Delta, RateLimitReport and Answer events of one
        Turn: it ends with one Answer, or raises."""
        self._last_arrival = time.monotonic()
        await self._acquire_slot()
        try:
            for last_try in (False, True):
                try:
                    async with contextlib.aclosing(self._answer(turn)) as events:
                        async for event in events:
                            yield event
                    return
                except CliWentOn:       # before anything was yielded: once more, cold
                    if last_try:
                        raise
        finally:
            self._slots.release()
            if not turn.history:
                self._note_new_chat(turn)

    async def _answer(self, turn: Turn) -> AsyncIterator[EngineEvent]:
        """One try at a Turn, on the session `_session_for` finds."""
        session = None
        held = conversation_hash(turn.history)      # what a live session must hold
        reader = TurnReader(client_tool_names(turn.tools),
                            set(AGENT_TOOLS) if self.config.agent_dir else set())
        holds = None                # the conversation it holds once the answer is whole
        try:
            session, results, how = await self._session_for(turn, held.hexdigest())
            self._begin_turn(session, turn, results, how in (COLD, RESUMED))
            yield SessionUsed(how)
            async for message in session.process.receive():
                for event in reader.feed(message):
                    if isinstance(event, (Finished, WentOn)):
                        if isinstance(event, Finished):
                            self._move(session, IDLE, holds)
                            session = None
                        return
                    if isinstance(event, Answer):
                        holds = conversation_hash([turn.prompt, {
                            "role": "assistant", "content": event.message["content"]}],
                            held).hexdigest()
                        if event.tool_calls:    # the CLI now calls them: they wait
                            session.broker.expect(event.tool_calls)     # for the client
                            self._move(session, AWAITING_TOOLS, holds)
                            session = None
                    yield event
                    if session is None:
                        return
        except (GeneratorExit, asyncio.CancelledError):
            if session is not None and holds is not None:
                # The client left once the answer was whole (a stream read up to
                # its message_stop): the CLI is still on its way to its result.
                self._move(session, FINISHING)
                self._in_background(self._finish(session, reader, holds))
                session = None
            raise
        finally:
            if session is not None:
                self._kill(session)

    @staticmethod
    def _begin_turn(session: LiveSession, turn: Turn, results: dict | None,
                    spawned: bool) -> None:
        """Send the CLI the Turn's prompt, or the client's results it is parked for."""
        if results is None:
            session.broker.begin()
            session.process.send(None if spawned and prompt_in_transcript(turn)
                                 else turn.prompt)
        else:
            session.broker.deliver(results)
            session.broker.begin()

    async def _finish(self, session: LiveSession, reader: TurnReader, holds: str) -> None:
        """Read a CLI whose answer is whole on to its result, then keep it (stopped if
        it does anything else, such as another upstream call)."""
        async def to_the_result() -> bool:
            async for message in session.process.receive():
                for event in reader.feed(message):
                    if isinstance(event, (Finished, WentOn)):
                        return isinstance(event, Finished)
            return False
        try:
            finished = await asyncio.wait_for(to_the_result(), CLI_CLOSE_TIMEOUT_S)
        except (asyncio.TimeoutError, ProxyError):
            finished = False
        if self.sessions.get(session.id) is not session:     # evicted meanwhile
            return
        if finished:
            self._move(session, IDLE, holds)
        else:
            self._kill(session)

    async def _acquire_slot(self) -> None:
        if not self._slots.locked():    # wait_for(..., 0) would time out even so
            await self._slots.acquire()
            return
        self._waiting += 1
        try:
            await asyncio.wait_for(self._slots.acquire(), self.config.queue_timeout_s)
        except asyncio.TimeoutError:
            raise Overloaded(
                f"All {self.config.max_concurrent} sessions are busy and "
                f"{self._waiting - 1} more requests are queued; retry shortly.",
                retry_after_header(RETRY_AFTER_DEFAULT_S)) from None
        finally:
            self._waiting -= 1

    async def _session_for(self, turn: Turn, digest: str
                           ) -> tuple[LiveSession, dict | None, str]:
        """The live session, spare or new CLI that will answer this Turn (whose
        history has this `digest`), the tool results it gets when it is parked at
        the client's tool calls, and how it was found (WARM ... RESUMED)."""
        session = self._idle.get((turn.shape, digest))
        results, how = None, WARM
        if session is not None and session.state == AWAITING_TOOLS:
            results = None if session.broker.broken else \
                tool_results(turn.prompt, session.broker.pending)
            if results is None:         # it waits for results this request does not give
                self._kill(session)
                session = None
        if session is None and not turn.history:
            session, how = self._take_spare(turn.shape), FROM_SPARE
            if session is None:
                session, how = await self._recycle(turn.shape), RECYCLED
        if session is None or not session.process.alive:
            if session is not None:
                self._kill(session)
            session, how = await self._spawn(turn), RESUMED if turn.history else COLD
            results = None
        self._move(session, BUSY)
        session.turns += 1
        return session, results, how

    def _move(self, session: LiveSession, state: str, holds: str | None = None) -> None:
        """The one place a session changes state: it keeps the index of the
        sessions that hold a conversation, `holds` its digest. A session that comes
        to rest while the engine closes, or whose CLI died, is killed instead."""
        if session.state in HOLDING and self._idle.get(
                (session.turn.shape, session.holds)) is session:
            del self._idle[(session.turn.shape, session.holds)]
        session.state, session.holds = state, holds if state in HOLDING else None
        if state in (BUSY, FINISHING, RETIRED):
            return
        session.last_used = time.monotonic()
        if self.closing or not session.process.alive:
            return self._kill(session)
        if state in HOLDING:
            displaced = self._idle.get((session.turn.shape, holds))
            if displaced is not None:
                self._kill(displaced)
            self._idle[(session.turn.shape, holds)] = session
        self._ensure_reaper()

    # -- processes -----------------------------------------------------------

    async def _spawn(self, turn: Turn, spare: bool = False) -> LiveSession:
        """Start a CLI for this Turn, busy from the start; a spare has no history
        and is idle, and is only started when it fits without evicting anything."""
        if spare:
            if self._processes() >= self.config.max_sessions:
                raise ServiceUnavailable("No room for a spare.")
        else:
            await self._make_room()
        broker = ToolBroker()
        # Only the shape's fields are kept: nothing of the conversation.
        shape = dataclasses.replace(turn, history=[], prompt={"role": "user", "content": ""})
        process = CliProcess(cli_options(shape if spare else turn, self.config,
                                         dt.datetime.now(dt.timezone.utc), broker))
        process.goes_on = CliWatch(broker)
        session = LiveSession(process, shape, broker, STARTING if spare else BUSY)
        self.sessions[session.id] = session
        self._ensure_reaper()
        self._cold_starts += not spare
        try:
            await process.start()
        except BaseException:
            self._kill(session)
            raise
        finally:
            self._cold_starts -= not spare
        if spare and session.state == STARTING:
            self._move(session, SPARE)
        return session

    def _processes(self) -> int:
        """CLI processes that exist: sessions, spares and those still exiting."""
        return len(self.sessions) + len(self._exits)

    async def _make_room(self) -> None:
        """Kill spares, then least recently used idle sessions, until one more CLI
        fits under max_sessions, and wait for them to be gone."""
        while self._processes() >= self.config.max_sessions:
            evicted = self._next_evicted()
            if evicted is not None and len(self.sessions) >= self.config.max_sessions:
                self._kill(evicted)
            elif self._exits:
                await asyncio.wait(list(self._exits), return_when=asyncio.FIRST_COMPLETED)
            else:
                return      # all busy: cannot happen while max_sessions >= max_concurrent

    def _next_evicted(self) -> LiveSession | None:
        """The session that room is made from first: a spare, else the least
        recently used idle session, else one finishing an answer nobody waits for."""
        order = (STARTING, SPARE, IDLE, AWAITING_TOOLS, FINISHING)
        return min((s for s in self.sessions.values() if s.state in order),
                   key=lambda s: (order.index(s.state) // 2, s.last_used), default=None)

    def _let_go(self, session: LiveSession) -> None:
        """Retire a session whose CLI may exit politely (an idle one or a spare:
        it removes its own files); any other is killed."""
        self._retire(session, polite=session.state in (IDLE, SPARE))

    def _kill(self, session: LiveSession) -> None:
        """Retire a session, its CLI killed at once."""
        self._retire(session, polite=False)

    def _retire(self, session: LiveSession, polite: bool) -> None:
        """Forget a session and stop its CLI in the background (counted as exiting
        until it is gone)."""
        if self.sessions.pop(session.id, None) is None:
            return
        self._move(session, RETIRED)
        process = session.process
        exit_task = self._in_background(process.close() if polite and process.alive
                                        else process.kill())
        self._exits.add(exit_task)
        exit_task.add_done_callback(self._exits.discard)

    def end_session(self, session_id: str) -> bool:
        """DELETE /sessions/{id}: end a session at rest; False if unknown or busy."""
        session = self.sessions.get(session_id)
        if session is None or session.state in (BUSY, FINISHING):
            return False
        self._let_go(session)
        return True

    # -- spares --------------------------------------------------------------

    def _take_spare(self, shape: str) -> LiveSession | None:
        for session in self.sessions.values():
            if session.state in (SPARE, STARTING) and session.turn.shape == shape:
                return session
        return None

    def _note_new_chat(self, turn: Turn) -> None:
        """Count a new chat of the Turn's shape as demand for a spare of it, and let
        the spare keeper see to it."""
        now = time.monotonic()
        template, times = self._demand.pop(turn.shape, (dataclasses.replace(
            turn, history=[], prompt={"role": "user", "content": ""}), []))
        self._demand[turn.shape] = (template, [t for t in times[-7:]
                                               if now - t < SPARE_DEMAND_WINDOW_S] + [now])
        while len(self._demand) > SHAPES_TRACKED:
            del self._demand[next(iter(self._demand))]
        if self.config.max_spares and not self.closing and \
                (self._spare_keeper is None or self._spare_keeper.done()):
            self._spare_keeper = self._in_background(self._keep_spares())

    def _demand_for(self, shape: str, now: float) -> int:
        """New chats of a shape within SPARE_DEMAND_WINDOW_S."""
        return sum(now - t < SPARE_DEMAND_WINDOW_S for t in self._demand.get(shape, (0, []))[1])

    async def _keep_spares(self) -> None:
        """Start spares where new chats arrive, one at a time and only when no
        request is queued, no CLI is starting for one and none came in for
        SPARE_QUIET_S: a spare's start costs a CPU about half a second, which is
        never taken from a request. Follow-ups start none; a spare goes when it
        idles out, when room is made, or for a shape in more demand."""
        while not self.closing:
            now = time.monotonic()
            quiet_in = self._last_arrival + SPARE_QUIET_S - now
            if self._waiting or self._cold_starts or quiet_in > 0:
                await asyncio.sleep(max(quiet_in, SPARE_QUIET_S / 4))
                continue
            wanted = self._wanted_spare(now)
            if wanted is None:
                return
            with contextlib.suppress(ProxyError):
                await self._spawn(wanted, spare=True)

    def _wanted_spare(self, now: float) -> Turn | None:
        """The shape in most demand that has no spare, when there is room for one
        (a spare of a shape in less demand makes way)."""
        busy = sum(1 for s in self.sessions.values() if s.state == BUSY)
        if self._processes() >= self.config.max_sessions or busy >= self.config.max_concurrent:
            return None         # spares never take the room a request needs
        spares = sorted((s for s in self.sessions.values() if s.state in (SPARE, STARTING)),
                        key=lambda s: s.last_used)
        wanted, making_way = spare_choice(
            {shape: self._demand_for(shape, now) for shape in self._demand},
            [s.turn.shape for s in spares], self.config.max_spares)
        if making_way is not None:
            self._let_go(spares[making_way])
        return None if wanted is None else self._demand[wanted][0]

    async def _recycle(self, shape: str) -> LiveSession | None:
        """At the cap, when the session room would be made from is an idle one of
        this shape, make it a spare instead: its CLI rewound to before its first
        message, no new process, and warm. None when it is not such a session or
        its CLI refuses (then it is retired)."""
        session = self._next_evicted()
        if (self._processes() < self.config.max_sessions or session is None
                or session.state != IDLE or session.turn.shape != shape
                or session.process.first_message is None
                or self.config.agent_dir):      # agent tools remember the files they read
            return None
        self._move(session, BUSY)
        try:
            rewound = await session.process.rewind()
        except BaseException:   # the request was cancelled: nothing may keep it busy
            self._kill(session)
            raise
        if not rewound:
            self._kill(session)
            return None
        session.turns = 0
        self._move(session, SPARE)
        return session if session.state == SPARE else None

    # -- housekeeping --------------------------------------------------------

    def _in_background(self, coro: Any) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _ensure_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.ensure_future(self._reap())

    async def _reap(self) -> None:
        """Retire sessions and spares idle longer than session_idle_s."""
        while self.sessions and not self.closing:
            limit = self.config.session_idle_s
            await asyncio.sleep(min(limit / 4, 30.0))
            now = time.monotonic()
            for session in list(self.sessions.values()):
                if session.state not in (BUSY, FINISHING) and now - session.last_used > limit:
                    self._let_go(session)

    def describe(self) -> list[dict]:
        """Every live session and spare, for GET /sessions."""
        now = time.monotonic()
        return [s.describe(now) for s in self.sessions.values()]

    async def close(self) -> None:
        """Stop every CLI; wait for all teardowns."""
        self.closing = True
        for task in (self._reaper, self._spare_keeper):
            if task is not None:
                task.cancel()
        for session in list(self.sessions.values()):
            self._kill(session)
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)


# =============================================================================
# 13. Usage -- named keys, the ledger, metrics, the status page
# =============================================================================
# Who spends the subscription, and how much of it is left. Keys are known by
# digest and shown by name only. The ledger keeps one row a turn request (counts,
# never content) in SQLite; a ledger that cannot be written never fails a request.
# The page is rendered here from one dict (`status_data`), the same dict GET
# /status answers with, and needs no script and nothing from the network.

class KeyRing:
    """The keys callers may use, digest -> name: CLAUDE_PROXY_API_KEY (named
    "default") and the key file's. The file is re-read when it changes (a stat at
    every key check, so a key works or fails from the next request on) and on
    SIGHUP; a file that no longer reads leaves the keys it gave before."""

    def __init__(self, api_key: str | None, path: str | None):
        self.api_key, self.path = api_key, path
        self.keyed = bool(api_key or path)  # fixed at start: an emptied file locks all out
        self._seen: tuple | None = None     # the file's `_stamp` when read
        self.names = self.read()            # raises ValueError: the proxy does not start

    def read(self) -> dict[bytes, str]:
        """The keys by digest, the key file read now; raise OSError or ValueError."""
        keys = {ENV_KEY_NAME: self.api_key} if self.api_key else {}
        if self.path is not None:
            with open(self.path, encoding="utf-8") as file:
                info = os.fstat(file.fileno())
                if info.st_mode & 0o077:
                    raise ValueError(f"{self.path} is open to other users: chmod 600 it")
                text = file.read()
            self._seen = self._stamp(info)
            try:
                named = parse_keys(text)
            except ValueError as err:
                raise ValueError(f"{self.path}, {err}") from None
            if self.api_key and (ENV_KEY_NAME in named or self.api_key in named.values()):
                raise ValueError(f"{self.path}: the name {ENV_KEY_NAME!r} and its key are "
                                 "CLAUDE_PROXY_API_KEY's")
            keys.update(named)
        return {key_digest(key.encode("utf-8")): name for name, key in keys.items()}

    def refresh(self, forced: bool = False) -> None:
        """Re-read the key file if it changed since it was read (or `forced`)."""
        if self.path is None:
            return
        try:
            stamp: tuple | None = self._stamp(os.stat(self.path))
        except OSError:
            stamp = None
        if stamp == self._seen and not forced:
            return
        try:
            names = self.read()
        except (OSError, ValueError) as err:
            self._seen = stamp              # said once, until the file changes again
            log.error("Key file not re-read, the keys it gave before still hold: %s", err)
            return
        before, after = set(self.names.values()), set(names.values())
        self.names = names
        log.info("Key file re-read: %d keys (added: %s; removed: %s)", len(after),
                 ", ".join(sorted(after - before)) or "none",
                 ", ".join(sorted(before - after)) or "none")

    @staticmethod
    def _stamp(info: os.stat_result) -> tuple:
        """What tells a file's versions apart: an edit, a replacement, a chmod."""
        return (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)

    def check(self, head: RequestHead) -> str:
        """The name of the key the request carries; raise 401 without one."""
        self.refresh()
        return check_api_key(head, self.names)


@dataclasses.dataclass
class RequestRecord:
    """What one request leaves: its log line, its metrics and its ledger row."""

    started: float                      # time.monotonic() when its head came in
    at: float                           # time.time() then
    key: str = ""                       # its key's name ("" until the key is checked)
    route: str = "none"                 # its route's name
    model: str = ""
    stream: bool = False
    usage: dict = dataclasses.field(default_factory=dict)
    stop_reason: str | None = None
    first_token: float | None = None    # time.monotonic() at the answer's first delta
    session: str | None = None          # how it found its CLI (`SessionUsed`)
    error: str | None = None            # the error type it ended with

    def tokens(self) -> dict[str, int]:
        """Its tokens under the ledger's names: uncached input, cache reads and
        writes, output."""
        return {"input_tokens": self.usage.get("input_tokens") or 0,
                "cache_read_tokens": self.usage.get("cache_read_input_tokens") or 0,
                "cache_write_tokens": self.usage.get("cache_creation_input_tokens") or 0,
                "output_tokens": self.usage.get("output_tokens") or 0}


def tokens_in(counts: Mapping[str, int]) -> int:
    """All input tokens of a record's `tokens()` or a ledger row: cache reads and
    writes included."""
    return counts["input_tokens"] + counts["cache_read_tokens"] + counts["cache_write_tokens"]


# -- the ledger ----------------------------------------------------------------

TURN_ROUTES = ("messages", "chat_completions", "responses")    # the ledger's rows
LEDGER_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,                   -- Unix time the request came in
    key TEXT NOT NULL,                  -- the name of the key it came with
    api TEXT NOT NULL,                  -- messages, chat_completions or responses
    model TEXT NOT NULL,
    stream INTEGER NOT NULL,
    status INTEGER NOT NULL,
    stop_reason TEXT,
    error TEXT,                         -- the error type, never its message
    input_tokens INTEGER NOT NULL,      -- uncached
    cache_read_tokens INTEGER NOT NULL,
    cache_write_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    latency_ms INTEGER NOT NULL,        -- head in to last byte out
    first_token_ms INTEGER,             -- head in to the answer's first delta
    session TEXT                        -- warm, spare, recycled, cold or resumed
);
CREATE INDEX IF NOT EXISTS requests_at ON requests (at);
"""
LEDGER_COLUMNS = ("at", "key", "api", "model", "stream", "status", "stop_reason", "error",
                  "input_tokens", "cache_read_tokens", "cache_write_tokens", "output_tokens",
                  "latency_ms", "first_token_ms", "session")
LEDGER_INSERT = (f"INSERT INTO requests ({', '.join(LEDGER_COLUMNS)}) "
                 f"VALUES ({', '.join(':' + column for column in LEDGER_COLUMNS)})")
LEDGER_PRUNE_EVERY_S = 3600.0
LEDGER_MEMORY_KEEP_S = 8 * 86400.0      # a ledger in memory: the weekly window and a day
SUMMARY_GROUPS = ("key", "model", "api")
# One summary row: requests, errors and tokens (COALESCE: SUM of no rows is NULL).
SUMMARY_SQL = ("COUNT(*) AS requests, COALESCE(SUM(status >= 400), 0) AS errors, "
               + ", ".join(f"COALESCE(SUM({c}), 0) AS {c}" for c in LEDGER_COLUMNS[8:12]))


def usage_query(query: dict[str, str], now: float) -> tuple[float, float, list[str]]:
    """GET /usage's summary: `since` and `until` (Unix seconds or ISO 8601; the last
    7 days by default) and `by` (comma-separated SUMMARY_GROUPS; by key by default)."""
    def moment(name: str, default: float) -> float:
        raw = query.get(name)
        if raw is None:
            return default
        raw = re.sub(r" (\d\d(?::?\d\d)?)$", r"+\1", raw)    # a URL's unescaped "+"
        with contextlib.suppress(ValueError):
            value = float(raw)
            if math.isfinite(value):
                return value
        try:
            stamp = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
        except ValueError:
            raise InvalidRequest(f"{name}: a Unix time or an ISO 8601 date-time, "
                                 f"got {raw!r}.") from None
        return (stamp if stamp.tzinfo else stamp.replace(tzinfo=dt.timezone.utc)).timestamp()
    by = [column for column in query.get("by", "key").split(",") if column]
    unknown = [column for column in by if column not in SUMMARY_GROUPS]
    if unknown:
        raise InvalidRequest(f"by: comma-separated {', '.join(SUMMARY_GROUPS)}; "
                             f"got {', '.join(unknown)!r}.")
    return moment("since", now - 7 * 86400), moment("until", now), list(dict.fromkeys(by))


def ledger_row(record: RequestRecord, status: int, now: float) -> dict:
    """A request's ledger row."""
    return {"at": record.at, "key": record.key, "api": record.route,
            "model": record.model, "stream": int(record.stream), "status": status,
            "stop_reason": record.stop_reason, "error": record.error, **record.tokens(),
            "latency_ms": round((now - record.started) * 1000),
            "first_token_ms": None if record.first_token is None
            else round((record.first_token - record.started) * 1000),
            "session": record.session}


class Ledger:
    """Every turn request, one row each, in SQLite (WAL) at `path`, kept `keep_days`.
    A path that cannot be opened leaves the rows in memory until the proxy stops,
    and a row that cannot be written is lost, said once in the log: either way the
    request itself is answered as if nothing happened."""

    def __init__(self, path: str | None, keep_days: float):
        self.keep_s = keep_days * 86400
        self.path = path
        self.failing = False                # rows fail to be written (said once)
        self._pruned = 0.0
        self.db = self._open()

    def _open(self) -> sqlite3.Connection:
        if self.path is not None:
            try:
                os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
                # The busy timeout bounds how long a write may hold the event loop
                # while another program holds the database.
                db = sqlite3.connect(self.path, timeout=0.05, isolation_level=None)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")     # WAL stays whole on a crash
                db.executescript(LEDGER_SCHEMA)
                os.chmod(self.path, 0o600)
                return self._ready(db)
            except (OSError, sqlite3.Error) as err:
                log.error("The usage ledger %s cannot be used (%s): usage is kept in "
                          "memory until the proxy stops.", self.path, err)
                self.path = None
        self.keep_s = min(self.keep_s, LEDGER_MEMORY_KEEP_S)
        db = sqlite3.connect(":memory:", isolation_level=None)
        db.executescript(LEDGER_SCHEMA)
        return self._ready(db)

    def _ready(self, db: sqlite3.Connection) -> sqlite3.Connection:
        db.row_factory = sqlite3.Row
        with contextlib.suppress(sqlite3.Error):
            db.execute("DELETE FROM requests WHERE at < ?", (time.time() - self.keep_s,))
        return db

    def add(self, row: dict) -> None:
        """Write one row (and drop those past their time, hourly); never raises."""
        try:
            self.db.execute(LEDGER_INSERT, row)
            if row["at"] - self._pruned > LEDGER_PRUNE_EVERY_S:
                self.db.execute("DELETE FROM requests WHERE at < ?", (row["at"] - self.keep_s,))
                self._pruned = row["at"]
        except sqlite3.Error as err:
            if not self.failing:
                log.error("The usage ledger cannot write a row (%s): requests go on, "
                          "their rows are lost until it can.", err)
            self.failing = True
            return
        if self.failing:
            log.info("The usage ledger writes rows again.")
            self.failing = False

    def summary(self, since: float, until: float, by: Iterable[str] = ()) -> list[dict]:
        """Requests, errors and tokens from `since` to `until` (Unix times), one row
        per value of the `by` columns (SUMMARY_GROUPS), most tokens first."""
        groups = [column for column in by if column in SUMMARY_GROUPS]
        select = "".join(f"{column}, " for column in groups)
        grouped = f" GROUP BY {', '.join(groups)}" if groups else ""
        return self._rows(
            f"SELECT {select}{SUMMARY_SQL} FROM requests WHERE at >= ? AND at < ?{grouped} "
            "ORDER BY SUM(input_tokens + cache_read_tokens + cache_write_tokens + "
            f"output_tokens) DESC{''.join(f', {column}' for column in groups)}", (since, until))

    def series(self, since: float, until: float, step: float) -> list[dict]:
        """Tokens and requests per key in each `step` seconds from `since`."""
        return self._rows(
            "SELECT CAST((at - ?) / ? AS INTEGER) AS slot, key, COUNT(*) AS requests, "
            "SUM(input_tokens + cache_read_tokens + cache_write_tokens + output_tokens) "
            "AS tokens FROM requests WHERE at >= ? AND at < ? GROUP BY slot, key "
            "ORDER BY slot, key", (since, step, since, until))

    def recent(self, limit: int, errors_since: float | None = None) -> list[dict]:
        """The latest rows, newest first (with `errors_since`: the failed ones since
        then, which bounds the search for them)."""
        where = "WHERE at >= ? AND status >= 400 " if errors_since is not None else ""
        return self._rows(f"SELECT {', '.join(LEDGER_COLUMNS)} FROM requests {where}"
                          "ORDER BY id DESC LIMIT ?",
                          (limit,) if errors_since is None else (errors_since, limit))

    def _rows(self, sql: str, args: tuple) -> list[dict]:
        try:
            return [dict(row) for row in self.db.execute(sql, args)]
        except sqlite3.Error as err:
            log.error("The usage ledger cannot be read: %s", err)
            return []

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.db.close()


# -- metrics -------------------------------------------------------------------

# Latency buckets of GET /metrics, in seconds: warm turns take tens of ms, cold
# starts half a second, long answers minutes.
LATENCY_BUCKETS_S = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class RequestMetrics:
    """What GET /metrics counts of the requests answered: by route, status and key
    name, their time to the last byte (a histogram by route), and tokens by
    direction and key name."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int, str], int] = {}
        self.latency: dict[str, list[int]] = {}     # route -> count per bucket, +Inf last
        self.latency_sum: dict[str, float] = {}
        self.tokens: dict[tuple[str, str], int] = {}    # (direction, key) -> tokens

    def observe(self, record: RequestRecord, status: int, seconds: float) -> None:
        route = record.route
        self.requests[route, status, record.key] = \
            self.requests.get((route, status, record.key), 0) + 1
        counts = self.latency.setdefault(route, [0] * (len(LATENCY_BUCKETS_S) + 1))
        counts[next((i for i, bound in enumerate(LATENCY_BUCKETS_S) if seconds <= bound),
                    len(LATENCY_BUCKETS_S))] += 1
        self.latency_sum[route] = self.latency_sum.get(route, 0.0) + seconds
        tokens = record.tokens()
        for direction, count in (("input", tokens_in(tokens)),
                                 ("output", tokens["output_tokens"])):
            if count or (direction, record.key) in self.tokens:
                self.tokens[direction, record.key] = \
                    self.tokens.get((direction, record.key), 0) + count

    def token_totals(self) -> dict[str, int]:
        """Tokens by direction, all keys together."""
        totals = {"input": 0, "output": 0}
        for (direction, _), count in self.tokens.items():
            totals[direction] += count
        return totals


def prometheus_family(name: str, kind: str, help_text: str,
                      samples: Iterable[tuple[str, dict[str, Any], float]]) -> list[str]:
    """One metric family in the Prometheus text format (version 0.0.4): samples are
    (name suffix, labels, value)."""
    def label(value: Any) -> str:
        text = str(value).replace("\\", "\\\\").replace("\n", "\\n")
        return '"' + text.replace('"', '\\"') + '"'
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for suffix, labels, value in samples:
        inner = ",".join(f"{key}={label(value)}" for key, value in labels.items())
        number = str(value) if isinstance(value, int) else repr(float(value))
        lines.append(f"{name}{suffix}{{{inner}}} {number}" if inner else
                     f"{name}{suffix} {number}")
    return lines


def latest_windows(rate_limit: dict | None) -> dict[str, dict]:
    """The windows of the latest rate-limit report, by name."""
    return {name: state for name, state in ((rate_limit or {}).get("unifiedWindows")
                                            or {}).items() if isinstance(state, dict)}


def metrics_text(metrics: RequestMetrics, sessions: list[dict], waiting: int,
                 rate_limit: dict | None) -> str:
    """GET /metrics: the requests, the live CLIs and the subscription's windows."""
    histogram = []
    for route, counts in sorted(metrics.latency.items()):
        total = 0
        for bound, count in zip([*LATENCY_BUCKETS_S, "+Inf"], counts):
            total += count
            histogram.append(("_bucket", {"route": route, "le": bound}, total))
        histogram += [("_sum", {"route": route}, metrics.latency_sum[route]),
                      ("_count", {"route": route}, total)]
    windows = latest_windows(rate_limit)
    lines = [
        *prometheus_family("claude_proxy_requests_total", "counter",
                           "Requests answered, by route, status and key name.",
                           [("", {"route": route, "status": status, "key": key}, count)
                            for (route, status, key), count
                            in sorted(metrics.requests.items())]),
        *prometheus_family("claude_proxy_request_seconds", "histogram",
                           "Time from a request's head to its answer's last byte.", histogram),
        *prometheus_family("claude_proxy_tokens_total", "counter",
                           "Tokens, by direction (input counts cache reads and writes) "
                           "and key name.",
                           [("", {"direction": direction, "key": key}, count)
                            for (direction, key), count in sorted(metrics.tokens.items())]),
        *prometheus_family("claude_proxy_sessions", "gauge", "CLI sessions, by state.",
                           [("", {"state": state}, sum(s["state"] == state for s in sessions))
                            for state in SESSION_STATES]),
        *prometheus_family("claude_proxy_cli_memory_bytes", "gauge",
                           "Memory of all live CLIs: resident (rss) and proportional (pss).",
                           [("", {"kind": kind}, sum((s[f"{kind}_mb"] or 0) * 1048576
                                                     for s in sessions))
                            for kind in ("rss", "pss")]),
        *prometheus_family("claude_proxy_queue_depth", "gauge",
                           "Requests waiting for a concurrency slot.", [("", {}, waiting)]),
        *prometheus_family("claude_proxy_window_utilization", "gauge",
                           "Each subscription window's use (1 is spent), as last seen.",
                           [("", {"window": name}, state["utilization"])
                            for name, state in sorted(windows.items())
                            if _is_number(state.get("utilization"))]),
        *prometheus_family("claude_proxy_window_resets_at_seconds", "gauge",
                           "When each subscription window resets (Unix time), as last seen.",
                           [("", {"window": name}, state["resetsAt"])
                            for name, state in sorted(windows.items())
                            if _is_number(state.get("resetsAt"))]),
    ]
    return "\n".join(lines) + "\n"


# -- the status page -----------------------------------------------------------

def full_windows(rate_limit: dict | None, warn_at: float, now: float
                 ) -> list[tuple[str, float, Any]]:
    """The windows used up to `warn_at` or past it and not reset since: (name,
    utilization, resetsAt)."""
    return [(name, state["utilization"], state.get("resetsAt"))
            for name, state in sorted(latest_windows(rate_limit).items())
            if _is_number(state.get("utilization")) and state["utilization"] >= warn_at
            and not (_is_number(state.get("resetsAt")) and state["resetsAt"] <= now)]


def window_label(name: str) -> str:
    return RATE_LIMIT_WINDOWS.get(name, name.replace("_", " "))


def window_warning(name: str, utilization: float, resets_at: Any) -> str:
    """The words of a window's warning, in the log and on the page."""
    when = utc_text(resets_at, " (it resets at %Y-%m-%d %H:%M UTC)") or ""
    return (f"The subscription's {window_label(name)} window is {utilization:.0%} used"
            f"{when}: every app behind the proxy shares it.")


CHART_HOURS = 24


def status_data(ledger: Ledger, sessions: list[dict], rate_limit: tuple[dict, float] | None,
                warn_at: float, now: float) -> dict:
    """Everything the status page shows: GET /status's answer."""
    info, observed = rate_limit if rate_limit else (None, None)
    hour = 3600
    since = (math.floor(now / hour) - CHART_HOURS + 1) * hour
    return {
        "generated_at": now, "observed_at": observed, "warn_at": warn_at,
        "windows": [{"name": name, "label": window_label(name),
                     "utilization": state.get("utilization"), "status": state.get("status"),
                     "resets_at": state.get("resetsAt")}
                    for name, state in sorted(latest_windows(info).items())],
        "warnings": [window_warning(*full) for full in full_windows(info, warn_at, now)],
        "keys": {span: ledger.summary(now - hours * hour, now + 1, ["key"])
                 for span, hours in (("5h", 5), ("7d", 7 * 24))},
        "models_7d": ledger.summary(now - 7 * 24 * hour, now + 1, ["model"]),
        "chart": {"since": since, "step": hour,
                  "slots": ledger.series(since, since + CHART_HOURS * hour, hour)},
        "sessions": sessions,
        "recent": ledger.recent(20),
        "errors": ledger.recent(10, errors_since=now - 7 * 24 * hour),
        "ledger": ledger.path,
    }


STATUS_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0 auto;max-width:70em;padding:1em;
color:#1d1d1f;background:#fafafa}
h1{font-size:1.3em}h2{font-size:1.05em;margin:1.6em 0 .5em}
table{border-collapse:collapse;width:100%}td,th{padding:.2em .6em;text-align:right;
border-bottom:1px solid #e4e4e4;white-space:nowrap}td:first-child,th:first-child{text-align:left}
.scroll{overflow-x:auto}.bar{background:#e6e6e6;border-radius:4px;height:1.1em;width:100%;
min-width:5em}
.fill{background:#3a7bd5;border-radius:4px;height:100%}.hot{background:#d9822b}
.spent{background:#c0392b}.warn{background:#fff3cd;border:1px solid #e0b252;padding:.6em;
border-radius:4px}.dim{color:#777}.err{color:#b00020}
"""
CHART_COLORS = ("#3a7bd5", "#d9822b", "#2e9d5b", "#8e44ad", "#c0392b", "#16a2b8", "#7f8c8d")


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, hours, minutes = seconds // 86400, seconds % 86400 // 3600, seconds % 3600 // 60
    return f"{days} d {hours} h" if days else f"{hours} h {minutes} min" if hours else \
        f"{minutes} min {seconds % 60} s" if minutes else f"{seconds} s"


def _table(headers: list[str], rows: list[list[Any]], empty: str) -> str:
    if not rows:
        return f'<p class="dim">{html.escape(empty)}</p>'
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row)
                   + "</tr>" for row in rows)
    return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>'


def _clock(stamp: Any) -> str:
    return utc_text(stamp, "%m-%d %H:%M:%S") or "-"


def _chart(chart: dict) -> str:
    """Tokens an hour, stacked by key, as an inline SVG."""
    slots: dict[int, list[tuple[str, int]]] = {}
    keys: list[str] = []
    for row in chart["slots"]:
        slots.setdefault(row["slot"], []).append((row["key"], row["tokens"]))
        if row["key"] not in keys:
            keys.append(row["key"])
    if not slots:
        return '<p class="dim">No requests in the last 24 hours.</p>'
    top = max(sum(t for _, t in stacked) for stacked in slots.values()) or 1
    width, height, bar = 720, 120, 720 // CHART_HOURS
    color = {key: CHART_COLORS[i % len(CHART_COLORS)] for i, key in enumerate(sorted(keys))}
    rects = []
    for slot, stacked in sorted(slots.items()):
        y = height
        for key, tokens in stacked:
            h = max(1, round(tokens / top * (height - 10)))
            y -= h
            start = _clock(chart["since"] + slot * chart["step"])[6:11]
            rects.append(f'<rect x="{slot * bar + 1}" y="{y}" width="{bar - 2}" height="{h}" '
                         f'fill="{color[key]}"><title>{html.escape(key)}, {start} UTC: '
                         f'{tokens} tokens</title></rect>')
    legend = " ".join(f'<span style="color:{color[k]}">&#9632;</span> {html.escape(k)}'
                      for k in sorted(keys))
    return (f'<svg viewBox="0 0 {width} {height}" width="100%" height="{height}" '
            f'role="img" aria-label="tokens an hour">{"".join(rects)}</svg>'
            f'<p class="dim">Tokens an hour, last 24 hours (UTC), tallest: {top}. '
            f'{legend}</p>')


def status_page(data: dict, version: str) -> str:
    """The status page: one HTML document, no script, nothing from the network."""
    now = data["generated_at"]
    bars = []
    for window in data["windows"]:
        used = window["utilization"] if _is_number(window["utilization"]) else 0
        level = "spent" if used >= 1 else "hot" if used >= data["warn_at"] else ""
        resets = window["resets_at"]
        when = ("reset time not reported" if not _is_number(resets) else
                f"resets in {_duration(resets - now)} ({_clock(resets)} UTC)"
                if resets > now else f"has reset since ({_clock(resets)} UTC)")
        bars.append(
            f'<tr data-window="{html.escape(window["name"])}"><td>'
            f'{html.escape(window["label"])}</td><td style="width:50%"><div class="bar">'
            f'<div class="fill {level}" style="width:{min(used, 1) * 100:.1f}%"></div></div>'
            f'</td><td class="used">{used:.0%}</td><td>{html.escape(str(window["status"] or "-"))}'
            f'</td><td>{html.escape(when)}</td></tr>')
    windows = (f"<div class=\"scroll\"><table>{''.join(bars)}</table></div>"
               f"<p class=\"dim\">As the upstream reported "
               f"them {_duration(now - data['observed_at'])} ago.</p>" if bars else
               '<p class="dim">No window seen yet: the upstream reports them with each '
               "answer.</p>")
    warnings = "".join(f'<p class="warn">{html.escape(w)}</p>' for w in data["warnings"])
    spans = {span: {row["key"]: row for row in rows} for span, rows in data["keys"].items()}
    def key_cells(span: str, name: str) -> list[Any]:
        row = spans[span].get(name)
        if row is None:
            return ["0 / 0", 0, 0]
        return [f"{row['requests']} / {row['errors']}", tokens_in(row), row["output_tokens"]]
    key_rows = [[name, *key_cells("5h", name), *key_cells("7d", name)]
                for name in sorted(spans["7d"])]
    session_rows = [[s["state"], s["shape"]["model"], s["turns"], _duration(s["idle_s"]),
                     "-" if s["pss_mb"] is None else f"{s['pss_mb']:.0f} MB"]
                    for s in data["sessions"]]
    request_rows = [[_clock(r["at"]), r["key"], r["api"], r["model"], r["status"],
                     "stream" if r["stream"] else "-", r["session"] or "-",
                     tokens_in(r), r["output_tokens"], f"{r['latency_ms']} ms",
                     "-" if r["first_token_ms"] is None else f"{r['first_token_ms']} ms"]
                    for r in data["recent"]]
    error_rows = [[_clock(r["at"]), r["key"], r["api"], r["model"], r["status"],
                   r["error"] or "-"] for r in data["errors"]]
    ledger = (f"Ledger: {data['ledger']}" if data["ledger"] else
              "Ledger: in memory (it is lost when the proxy stops)")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{STATUS_REFRESH_S}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>claude-sdk-proxy status</title><style>{STATUS_CSS}</style></head><body>
<h1>claude-sdk-proxy <span class="dim">{html.escape(version)}, {_clock(now)} UTC</span></h1>
{warnings}
<h2>Subscription windows</h2>{windows}
<h2>Keys</h2>{_table(["key", "requests / errors, 5 h", "tokens in, 5 h", "tokens out, 5 h",
                      "requests / errors, 7 d", "tokens in, 7 d", "tokens out, 7 d"],
                     key_rows, "No requests in the last 7 days.")}
<h2>Tokens over time</h2>{_chart(data["chart"])}
<h2>Live sessions</h2>{_table(["state", "model", "turns", "idle", "memory (PSS)"],
                              session_rows, "No live CLI.")}
<h2>Last requests</h2>{_table(["time (UTC)", "key", "API", "model", "status", "stream",
                               "session", "tokens in", "tokens out", "latency",
                               "first token"], request_rows, "No requests yet.")}
<h2>Last errors</h2>{_table(["time (UTC)", "key", "API", "model", "status", "error"],
                            error_rows, "No errors.")}
<p class="dim">{html.escape(ledger)}. Refreshes every {STATUS_REFRESH_S} s. The same data:
<a href="/status">/status</a>; metrics: <a href="/metrics">/metrics</a>.</p>
</body></html>
"""


# =============================================================================
# 14. Routes and handlers -- the three APIs' turns, the stores, the route table
# =============================================================================
# A handler takes (app, request, out) and answers through `out`, a Responder
# (section 15). Handlers are compositions: parse -> check -> translate -> engine
# -> translate -> encode; they raise ProxyError and never format errors. The three
# APIs' turns share one handler, `handle_turn`; each API is a `Dialect` on its
# route, and each of its requests an `Exchange`.

@dataclasses.dataclass
class Request:
    """A request with its body read and its route matched."""

    head: RequestHead
    body: bytes
    params: dict[str, str]
    request_id: str
    dialect: Dialect                # the API of its route, else the caller's
    authorized: bool = True         # False: a keyed proxy's liveness probe without the key

    @property
    def caller(self) -> str:
        """Who is asking: the client's key, hashed so it never sits in memory dumps."""
        key = request_api_key(self.head) or ""
        return hmac.new(b"caller", key.encode("utf-8"), "sha256").hexdigest()[:16]


async def handle_health(app: App, request: Request, out: Responder) -> None:
    """GET /: the status page for a browser; service info (JSON) for other
    programs; a bare "ok" for load balancers (and anyone else) without the key."""
    if not request.authorized:
        await out.send_json(200, {"status": "ok"})
        return
    if wants_html(request.head):
        page = status_page(app.status(), __version__)
        await out.send(200, page.encode("utf-8"), "text/html; charset=utf-8", PAGE_HEADERS)
        return
    await out.send_json(200, {
        "status": "ok", "service": "claude-sdk-proxy", "versions": sdk_versions(),
        "uptime_s": round(time.monotonic() - app.started, 1),
        "requests": app.requests, "auth": app.keys.keyed,
        "tokens": app.metrics.token_totals(),
        "cli_processes": len(app.engine.sessions),
        "sessions": {state: sum(1 for s in app.engine.describe() if s["state"] == state)
                     for state in SESSION_STATES},
        "agent_mode": app.config.agent_dir is not None,
    })


async def handle_models(app: App, request: Request, out: Responder) -> None:
    """GET /v1/models."""
    await out.send_json(200, models_list())


async def handle_model(app: App, request: Request, out: Responder) -> None:
    """GET /v1/models/{model_id}."""
    await out.send_json(200, model_lookup(request.params["model_id"]))


async def handle_count_tokens(app: App, request: Request, out: Responder) -> None:
    """POST /v1/messages/count_tokens: an estimate (README, "Token counting")."""
    body = parse_json_body(request.body)
    check_count_tokens_request(body)
    await out.send_json(200, {"input_tokens": estimate_tokens(body)})


async def handle_sessions(app: App, request: Request, out: Responder) -> None:
    """GET /sessions: live sessions and spares, for operators."""
    sessions = app.engine.describe()
    await out.send_json(200, {"object": "list", "data": sessions,
                              "max_sessions": app.config.max_sessions})


async def handle_delete_session(app: App, request: Request, out: Responder) -> None:
    """DELETE /sessions/{id}: end a live session."""
    session_id = request.params["session_id"]
    if not app.engine.end_session(session_id):
        raise NotFound(f"No idle live session {session_id!r}.")
    await out.send_json(200, {"id": session_id, "type": "session_deleted"})


# The page draws everything itself: no script, no frame, nothing from elsewhere.
PAGE_HEADERS = {"content-security-policy": "default-src 'none'; style-src 'unsafe-inline'",
                "x-frame-options": "DENY", "referrer-policy": "no-referrer",
                "cache-control": "no-store"}


async def handle_status(app: App, request: Request, out: Responder) -> None:
    """GET /status: what the status page shows, as JSON."""
    await out.send_json(200, app.status(), {"cache-control": "no-store"})


async def handle_usage(app: App, request: Request, out: Responder) -> None:
    """GET /usage: the subscription's windows as last seen upstream, and the
    ledger's summary (`usage_query`: since, until, by)."""
    since, until, by = usage_query(request.head.query, time.time())
    windows = usage_windows(*app.rate_limit) if app.rate_limit else \
        {"status": None, "windows": {}, "observed_at": None}
    await out.send_json(200, {**windows, "summary": {
        "since": since, "until": until, "by": by,
        "rows": app.ledger.summary(since, until, by)}})


async def handle_metrics(app: App, request: Request, out: Responder) -> None:
    """GET /metrics: Prometheus text format."""
    text = metrics_text(app.metrics, app.engine.describe(), app.engine.waiting,
                        app.rate_limit[0] if app.rate_limit else None)
    await out.send(200, text.encode("utf-8"), "text/plain; version=0.0.4; charset=utf-8")


# -- stores: message threads and responses, per caller -------------------------

@dataclasses.dataclass
class StoredThread:
    """A message thread as its latest answer left it."""

    used_at: float
    caller: str
    fixed: dict                     # the create request's system and tools
    messages: list[dict]            # the whole conversation, the answer last
    state: str = "open"             # open -> continuing -> continued


class ThreadStore:
    """Message threads by their latest answer's id: at most THREADS_KEPT, each until
    idle for THREAD_IDLE_S, each for its caller. An answer is continued once, as
    the API's are (a client forks with a new create)."""

    def __init__(self) -> None:
        self._kept: dict[str, StoredThread] = {}    # insertion order = age

    def put(self, message_id: str, caller: str, fixed: dict, messages: list[dict]) -> None:
        now = time.monotonic()
        self._kept[message_id] = StoredThread(now, caller, fixed, messages)
        for old in list(self._kept):
            if len(self._kept) <= THREADS_KEPT and now - self._kept[old].used_at < THREAD_IDLE_S:
                break
            del self._kept[old]

    def take(self, message_id: str, caller: str) -> StoredThread:
        """The thread to continue from `message_id`, now marked as being continued."""
        kept = self._kept.get(message_id)
        if kept is None or kept.caller != caller or \
                time.monotonic() - kept.used_at >= THREAD_IDLE_S:
            raise NotFound(f"thread: no thread holds message '{message_id}' (unknown, expired "
                           "or the proxy restarted); send the whole conversation with "
                           "{\"type\": \"create\"}.", code="thread_not_found")
        if kept.state != "open":
            raise InvalidRequest(
                f"thread: message '{message_id}' was continued already; continue from the "
                "thread's latest message." if kept.state == "continued" else
                f"thread: another request is continuing from message '{message_id}'.",
                code="thread_already_continued" if kept.state == "continued"
                else "thread_continue_in_flight")
        kept.state = "continuing"
        return kept

    @staticmethod
    def settle(thread: StoredThread, continued: bool) -> None:
        """The continue request ended: it went on from there, or it may be retried."""
        thread.state = "continued" if continued else "open"
        thread.used_at = time.monotonic()


@dataclasses.dataclass
class StoredResponse:
    """What a stored response leaves for later requests of its caller."""

    stored_at: float
    caller: str
    conversation: list[dict]        # the Turn's messages and the answer, Anthropic form
    items: dict[str, dict]          # its output items by id, for `item_reference`


class ResponseStore:
    """Recent responses, for `previous_response_id` and `item_reference`: at most
    RESPONSES_KEPT, each for RESPONSES_KEEP_S, each for the caller who made it."""

    def __init__(self) -> None:
        self._kept: dict[str, StoredResponse] = {}  # insertion order = age
        self._item_owner: dict[str, str] = {}       # output item id -> response id

    def put(self, response_id: str, caller: str, conversation: list[dict],
            items: list[dict]) -> None:
        now = time.monotonic()
        self._kept[response_id] = StoredResponse(now, caller, conversation,
                                                 {item["id"]: item for item in items})
        self._item_owner.update((item["id"], response_id) for item in items)
        for old in list(self._kept):
            if len(self._kept) <= RESPONSES_KEPT and \
                    now - self._kept[old].stored_at < RESPONSES_KEEP_S:
                break
            for item_id in self._kept.pop(old).items:
                self._item_owner.pop(item_id, None)

    def get(self, response_id: str, caller: str) -> StoredResponse | None:
        kept = self._kept.get(response_id)
        if kept is None or time.monotonic() - kept.stored_at >= RESPONSES_KEEP_S or \
                kept.caller != caller:
            return None
        return kept

    def item(self, item_id: str, caller: str) -> dict | None:
        """A stored output item of this caller's, by its id."""
        kept = self.get(self._item_owner.get(item_id, ""), caller)
        return kept.items.get(item_id) if kept else None


# -- the three APIs: a Dialect each, an Exchange a turn request ----------------

class Exchange:
    """One turn request in its API's words: the Turn it asks for, and the answer
    put back into that API, as stream frames or as one body. One subclass an API."""

    turn: Turn
    dropped: list[str] = []         # request fields neither carried nor owned (--debug)

    def frames(self, event: dict) -> Iterable[bytes]:
        """The SSE frames of one stream event of the answer."""
        raise NotImplementedError

    def feed(self, event: dict) -> None:
        """One stream event of an answer that is not streamed."""

    def body(self, message: dict) -> dict:
        """The answer that is not streamed."""
        return message

    def tail(self) -> list[bytes]:
        """The frames after the last event."""
        return []

    def failed(self, err: ProxyError) -> list[bytes] | None:
        """The API's own end of a stream an error broke off; None: its error event."""
        return None

    def keep(self, message: dict) -> None:
        """The answer is whole: keep what later requests may refer to."""

    def close(self, answered: bool) -> None:
        """The request is over (`answered`: its answer went out)."""


class MessagesExchange(Exchange):
    """A Messages API request, and message threads (section 6) as the API keeps them."""

    def __init__(self, app: App, request: Request, body: dict):
        self.threads, self.caller = app.threads, request.caller
        self.previous_id = parse_thread(body)
        self.thread = self.threads.take(self.previous_id, self.caller) \
            if self.previous_id else None
        try:
            if self.thread is not None:
                body = thread_continued(body, self.thread.fixed, self.thread.messages)
            self.turn = dataclasses.replace(
                messages_request_to_turn(body, app.config.default_model, request.caller),
                betas=without_threads_beta(request.head.header("anthropic-beta", "")))
        except BaseException:
            self.close(answered=False)
            raise
        self.request_body = body
        self.dropped = dropped_params(body)

    def frames(self, event: dict) -> Iterable[bytes]:
        return [encode_sse(event, event["type"])]

    def keep(self, message: dict) -> None:
        if self.previous_id is not None and message.get("stop_reason") != "refusal":
            body = self.request_body
            self.threads.put(message["id"], self.caller,
                             {name: body[name] for name in THREAD_FIXED if name in body},
                             body["messages"] + answer_as_history(message))

    def close(self, answered: bool) -> None:
        if self.thread is not None:
            self.threads.settle(self.thread, continued=answered)


class ChatExchange(Exchange):
    """A Chat Completions request."""

    def __init__(self, app: App, request: Request, body: dict):
        self.turn = chat_request_to_turn(body, app.config.default_model, request.caller)
        self.id, self.created = "chatcmpl-" + uuid.uuid4().hex[:24], int(time.time())
        options = body.get("stream_options") or {}
        self.chunks = ChunkTranslator(self.id, self.created, options.get("include_usage", False))

    def frames(self, event: dict) -> Iterable[bytes]:
        return map(encode_sse, self.chunks.feed(event))

    def body(self, message: dict) -> dict:
        return message_to_chat_completion(message, self.id, self.created)

    def tail(self) -> list[bytes]:
        return [encode_sse("[DONE]")]


class ResponsesExchange(Exchange):
    """A Responses request, with `previous_response_id` and `item_reference` items
    taken from the caller's stored responses."""

    def __init__(self, app: App, request: Request, body: dict):
        self.responses, self.caller = app.responses, request.caller
        previous, previous_id = None, body.get("previous_response_id")
        if previous_id is not None:
            _require(isinstance(previous_id, str), "previous_response_id: must be a string.")
            stored = self.responses.get(previous_id, self.caller)
            _require(stored is not None, f"previous_response_id: '{previous_id}' is unknown "
                                         "or has expired; send the whole input instead.")
            previous = stored.conversation
        body = dict(body, input=resolve_item_references(
            body.get("input"), lambda item_id: self.responses.item(item_id, self.caller)))
        self.turn, tools = responses_request_to_turn(body, app.config.default_model,
                                                     self.caller, previous)
        self.translator = ResponseTranslator("resp_" + uuid.uuid4().hex[:24], int(time.time()),
                                             body, tools)
        self.store = body.get("store") is not False

    def frames(self, event: dict) -> Iterable[bytes]:
        return (encode_sse(e, e["type"]) for e in self.translator.feed(event))

    def feed(self, event: dict) -> None:
        self.translator.feed(event)

    def body(self, message: dict) -> dict:
        return self.translator.response()

    def failed(self, err: ProxyError) -> list[bytes]:
        return [encode_sse(e, e["type"]) for e in self.translator.failed(err)]

    def keep(self, message: dict) -> None:
        if self.store:
            self.responses.put(self.translator.response_id, self.caller, self.turn.history + [
                self.turn.prompt, *answer_as_history(message)], self.translator.items)


@dataclasses.dataclass(frozen=True)
class Dialect:
    """One API as the proxy speaks it: its error bodies, the SSE event an error
    mid-stream is (None: a bare `data:` line), its keep-alive ping, and the
    Exchange its turn requests are."""

    error_body: Callable[[ProxyError, str | None], dict]
    error_event: str | None
    ping: bytes
    exchange: type[Exchange] | None = None


MESSAGES_API = Dialect(error_to_anthropic, "error", ANTHROPIC_PING, MessagesExchange)
CHAT_API = Dialect(error_to_openai, None, OPENAI_PING, ChatExchange)
RESPONSES_API = Dialect(error_to_openai, None, OPENAI_PING, ResponsesExchange)


# -- one turn, streamed or not -------------------------------------------------

async def run_turn(app: App, turn: Turn, out: Responder) -> AsyncIterator[EngineEvent]:
    """The engine's events for one Turn; the rate-limit state they carry goes into the
    response headers, GET /usage and the page on the way, how the turn went into
    the request's record. The CLI reports the rate-limit state after the answer,
    so a stream's head carries it as the previous answer left it."""
    if app.rate_limit is not None:
        out.headers.update(rate_limit_headers(app.rate_limit[0]))
    async with contextlib.aclosing(app.engine.run(turn)) as events:
        async for event in events:
            if app.config.debug:
                log.debug("%s %s %s", out.request_id, type(event).__name__,
                          event.event.get("type") if isinstance(event, Delta) else "")
            if isinstance(event, SessionUsed):
                out.record.session = event.how
                continue
            if isinstance(event, RateLimitReport):
                app.note_rate_limit(event.info)
                out.headers.update(rate_limit_headers(event.info))
            elif isinstance(event, Delta):
                note_usage(out.record, event.event)
            yield event


def note_usage(record: RequestRecord, event: dict) -> None:
    """Keep the model, tokens, stop reason and first delta's time of what went out."""
    kind = event.get("type")
    if kind == "message_start":
        message = event.get("message") or {}
        record.model = message.get("model") or record.model
        record.usage.update(message.get("usage") or {})
    elif kind == "message_delta":
        record.usage.update({k: v for k, v in (event.get("usage") or {}).items()
                             if v is not None})
        record.stop_reason = (event.get("delta") or {}).get("stop_reason") or \
            record.stop_reason
    elif kind == "content_block_delta" and record.first_token is None:
        record.first_token = time.monotonic()


async def final_answer(events: AsyncIterator[EngineEvent],
                       feed: Callable[[dict], Any] = lambda event: None) -> dict:
    """The answer of a turn that is not streamed: its message, once the engine is
    done; `feed` sees each stream event on the way."""
    message = None
    async for event in events:
        if isinstance(event, Delta):
            feed(event.event)
        elif isinstance(event, Answer):
            message = event.message
    assert message is not None, "Engine.run ends with an Answer or raises"
    return message


async def paced(items: AsyncIterator[Any], first_wait: float,
                interval: float) -> AsyncIterator[Any]:
    """Yield items; yield None after `first_wait`, then every `interval`, of silence."""
    wait = first_wait
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(items.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=wait)
            if not done:
                wait = interval
                yield None
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            finally:
                pending = None
            yield item
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending


def paced_stream(items: AsyncIterator[Any], config: Config) -> Any:
    """A streaming handler's items, `paced` by the config, closed with the handler
    (so a failed write never leaves the engine's generator running)."""
    return contextlib.aclosing(paced(items, config.head_hold_s, config.ping_interval_s))


async def forward_stream(events: AsyncIterator[EngineEvent], out: Responder,
                         config: Config, frames: Callable[[dict], Iterable[bytes]],
                         ping: bytes) -> dict:
    """Forward the answer's stream events as the SSE frames `frames` makes of each;
    return the answer's message.

    The status waits for the first event, however long the upstream takes, so a
    429 or 529 is a real status, never a 200 and an error event (the CLI's
    rate-limit report before a 429 starts nothing). Meanwhile a `102 Processing`
    after `head_hold_s` and every `ping_interval_s` of silence keeps the line alive
    without committing the status (HTTP/1.1 clients skip 1xx answers, RFC 9110
    section 15.2; an HTTP/1.0 client, which may not get one, gets the 200 head
    then). After the head a `ping` fills every silence. The caller ends the stream.
    """
    message = None
    async with paced_stream(events, config) as ticks:
        async for item in ticks:
            if isinstance(item, Answer):
                message = item.message
            if item is not None and not isinstance(item, Delta):
                continue
            if not out.head_sent:
                if item is None and out.chunked:
                    await out.interim()
                    continue
                await out.start_stream()
            if item is None:
                await out.write(ping)
                continue
            for frame in frames(item.event):
                await out.write(frame)
    assert message is not None, "Engine.run ends with an Answer or raises"
    return message


async def handle_turn(app: App, request: Request, out: Responder) -> None:
    """POST /v1/messages, /v1/chat/completions, /v1/responses: one turn, streamed or
    not, in the API of its route."""
    exchange = request.dialect.exchange(app, request, parse_json_body(request.body))
    turn, message = exchange.turn, None
    out.record.model, out.record.stream = turn.model, turn.stream
    if app.config.debug:
        log.debug("%s turn: model=%s history=%d params=%s betas=%s dropped=%s",
                  request.request_id, turn.model, len(turn.history), json.dumps(turn.params),
                  turn.betas or "-", ",".join(exchange.dropped) or "-")
    try:
        async with contextlib.aclosing(run_turn(app, turn, out)) as events:
            if turn.stream:
                out.stream_error = exchange.failed
                message = await forward_stream(events, out, app.config, exchange.frames,
                                               request.dialect.ping)
            else:
                message = await final_answer(events, exchange.feed)
        exchange.keep(message)
        if turn.stream:
            for frame in exchange.tail():
                await out.write(frame)
            await out.end_stream()
        else:
            await out.send_json(200, exchange.body(message))
    finally:
        exchange.close(answered=message is not None)


# -- the route table -----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Route:
    """One entry of the route table."""

    method: str
    pattern: re.Pattern
    handler: Callable
    dialect: Dialect | None     # the API it speaks; None: the caller's (`dialect_for`)
    name: str                   # its label in GET /metrics


def _route(method: str, path: str, handler: Callable, dialect: Dialect | None = None,
           name: str = "") -> Route:
    return Route(method, re.compile("^" + path + "$"), handler, dialect,
                 name or handler.__name__.removeprefix("handle_"))


ROUTES = (
    _route("GET", r"/", handle_health),
    # OpenAI clients configured with the base URL .../v1/chat (the seed's) add
    # their own paths to it: hence the optional /chat.
    _route("GET", r"/v1(?:/chat)?/models", handle_models),
    _route("GET", r"/v1(?:/chat)?/models/(?P<model_id>[^/]+)", handle_model),
    _route("POST", r"/v1/messages", handle_turn, MESSAGES_API, "messages"),
    _route("POST", r"/v1/messages/count_tokens", handle_count_tokens, MESSAGES_API),
    _route("POST", r"/v1(?:/chat)?/chat/completions", handle_turn, CHAT_API,
           "chat_completions"),
    _route("POST", r"/v1(?:/chat)?/responses", handle_turn, RESPONSES_API, "responses"),
    _route("GET", r"/usage", handle_usage),
    _route("GET", r"/status", handle_status),
    _route("GET", r"/metrics", handle_metrics),
    _route("GET", r"/sessions", handle_sessions),
    _route("DELETE", r"/sessions/(?P<session_id>[^/]+)", handle_delete_session),
)


def match_route(method: str, path: str) -> tuple[Route, dict[str, str]]:
    """The route for a method and path (also without `/v1`); raise 404 or 405."""
    path = path.rstrip("/") or "/"
    candidates = [path] if path.startswith("/v1/") or path == "/" else [path, "/v1" + path]
    allowed = []
    for candidate in candidates:
        for route in ROUTES:
            found = route.pattern.match(candidate)
            if not found:
                continue
            if route.method == method or (method == "HEAD" and route.method == "GET"):
                return route, found.groupdict()
            allowed.append(route.method)
            if route.method == "GET":
                allowed.append("HEAD")      # answered for every GET route
    if allowed:
        raise MethodNotAllowed(f"Method {method} is not allowed here; use "
                               f"{', '.join(sorted(set(allowed)))}.",
                               {"allow": ", ".join(sorted(set(allowed)))})
    raise NotFound(f"Not found: {method} {path}")


def dialect_for(head: RequestHead, route: Route | None) -> Dialect:
    """Which API's errors a caller reads: its route's API; where that does not say
    (the models list, an unknown path), the caller's own: OpenAI's SDKs send their
    key as a Bearer token and never `anthropic-version` or `x-api-key`, which
    Anthropic's send."""
    if route is not None and route.dialect is not None:
        return route.dialect
    bearer = (head.header("authorization") or "").lower().startswith("bearer ")
    anthropic = head.header("anthropic-version") or head.header("x-api-key")
    return CHAT_API if bearer and not anthropic else MESSAGES_API


# =============================================================================
# 15. Server -- connections, keep-alive, streaming, errors into responses
# =============================================================================
# `serve` listens; `serve_connection` reads requests one after another on a
# keep-alive connection and runs each handler while watching the socket: a
# client that goes away cancels its handler, which kills its CLI. The Responder
# is the only writer of a response and `Responder.fail` the one place that turns
# a ProxyError into bytes, as JSON or, once a stream has begun, as an SSE error.

WATCH_BUFFER = 1024 * 1024          # pipelined bytes read ahead while a handler runs


class ClientGone(Exception):
    """The client closed its connection."""


class Connection:
    """One client socket with a read buffer that the server section alone reads."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 config: Config):
        self.reader = reader
        self.writer = writer
        self.config = config
        self.buf = bytearray()
        self.eof = False

    async def fill(self, timeout: float | None) -> bool:
        """Read more bytes into the buffer; False at EOF; TimeoutError after `timeout`."""
        if self.eof:
            return False
        try:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
        except asyncio.TimeoutError:
            raise                           # an OSError since 3.11: not a closed socket
        except (ConnectionError, OSError):
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    async def read_head(self) -> bytes | None:
        """The next request head, or None when the client closed or idled out. Once a
        head has begun it must be complete within header_timeout_s, however slowly
        its bytes trickle in."""
        deadline = None
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end + 4 > MAX_HEAD_BYTES or (end < 0 and len(self.buf) > MAX_HEAD_BYTES):
                raise HeadersTooLarge(f"Request head exceeds {MAX_HEAD_BYTES} bytes.")
            if end >= 0:
                head = bytes(self.buf[:end + 4])
                del self.buf[:end + 4]
                return head
            check_head_start(bytes(self.buf))
            if self.buf.strip(b"\r\n") and deadline is None:
                deadline = time.monotonic() + self.config.header_timeout_s
            timeout = self.config.keepalive_idle_s if deadline is None else \
                deadline - time.monotonic()
            if timeout <= 0:
                raise InvalidRequest("Timed out reading the request head.")
            try:
                if not await self.fill(timeout):
                    if self.buf.strip(b"\r\n"):
                        raise InvalidRequest("Connection closed inside a request head.")
                    return None
            except asyncio.TimeoutError:
                if self.buf.strip(b"\r\n"):
                    raise InvalidRequest("Timed out reading the request head.") from None
                return None

    async def read_body(self, length: int | None, max_bytes: int) -> bytes:
        """A Content-Length body (length) or a chunked one (None)."""
        started = time.monotonic()
        if length is not None:
            while len(self.buf) < length:
                await self._fill_body(started, len(self.buf))
            body = bytes(self.buf[:length])
            del self.buf[:length]
            return body
        decoder = ChunkedDecoder(max_bytes)
        body = bytearray(decoder.feed(bytes(self.buf)))
        self.buf.clear()
        while not decoder.done:
            await self._fill_body(started, len(body))
            body += decoder.feed(bytes(self.buf))
            self.buf.clear()
        self.buf += decoder.leftover
        return bytes(body)

    async def _fill_body(self, started: float, received: int) -> None:
        """More body bytes: within body_timeout_s of the last, and at MIN_BODY_RATE
        on average after the first body_timeout_s."""
        left = started + self.config.body_timeout_s + received / MIN_BODY_RATE - \
            time.monotonic()
        try:
            if left <= 0:
                raise asyncio.TimeoutError
            if not await self.fill(min(self.config.body_timeout_s, left)):
                raise InvalidRequest("Connection closed inside the request body.")
        except asyncio.TimeoutError:
            raise InvalidRequest("Timed out reading the request body.") from None

    async def watch_eof(self) -> None:
        """Return when the client closes; keep pipelined bytes for the next request."""
        while len(self.buf) < WATCH_BUFFER:
            if not await self.fill(None):
                return
        await asyncio.Event().wait()    # read-ahead is full: stop reading, wait

    async def write(self, data: bytes) -> None:
        """Send bytes; raise ClientGone if the client has left, or has read nothing
        for send_timeout_s (it would hold its CLI and its slot until the request
        timeout). A slow reader is waited for as long as it reads."""
        if self.writer.is_closing():
            raise ClientGone
        transport = self.writer.transport
        try:
            self.writer.write(data)
            while True:
                unsent = transport.get_write_buffer_size()
                try:
                    await asyncio.wait_for(self.writer.drain(), self.config.send_timeout_s)
                    return
                except asyncio.TimeoutError:    # an OSError since 3.11: caught first
                    if transport.get_write_buffer_size() >= unsent:
                        transport.abort()       # close() would wait to send the rest
                        raise ClientGone from None
        except (ConnectionError, OSError) as exc:
            raise ClientGone from exc


class Responder:
    """Writes one response and knows how far it got."""

    def __init__(self, conn: Connection, request_id: str, method: str = "GET",
                 dialect: Dialect = MESSAGES_API):
        self.conn = conn
        self.request_id = request_id
        self.method = method
        self.dialect = dialect
        self.keep_alive = True
        self.status = 0
        self.head_sent = False
        self.streaming = False
        self.chunked = True                 # HTTP/1.0 clients get a stream ended by close
        self.record = RequestRecord(time.monotonic(), time.time())
        self.headers: dict[str, str] = {}   # for every response head (rate-limit state)
        # The frames that end a stream an error breaks off, where the API has its own.
        self.stream_error: Callable[[ProxyError], list[bytes] | None] = lambda err: None

    def _head(self, status: int, headers: list[tuple[str, str]]) -> bytes:
        self.status, self.head_sent = status, True
        base = [("date", email_date()), ("server", f"claude-sdk-proxy/{__version__}"),
                ("request-id", self.request_id),
                ("connection", "keep-alive" if self.keep_alive else "close")]
        return encode_response_head(status, base + list(self.headers.items()) + headers)

    async def send(self, status: int, body: bytes, content_type: str,
                   headers: dict[str, str] | None = None) -> None:
        """A complete response (HEAD gets the head alone; 204 has no body at all)."""
        framing = [] if status == 204 else [("content-type", content_type),
                                            ("content-length", str(len(body)))]
        head = self._head(status, framing + list((headers or {}).items()))
        await self.conn.write(head if self.method == "HEAD" else head + body)

    async def send_json(self, status: int, value: dict,
                        headers: dict[str, str] | None = None) -> None:
        """A JSON response."""
        body = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        await self.send(status, body, "application/json", headers)

    async def start_stream(self, headers: dict[str, str] | None = None) -> None:
        """The head of a 200 SSE response with a chunked body (HTTP/1.0: until close)."""
        self.streaming = True
        framing = [("transfer-encoding", "chunked")] if self.chunked else []
        self.keep_alive = self.keep_alive and self.chunked
        await self.conn.write(self._head(200, [
            ("content-type", "text/event-stream; charset=utf-8"),
            ("cache-control", "no-cache"), ("x-accel-buffering", "no")]
            + framing + list((headers or {}).items())))

    async def interim(self) -> None:
        """A `102 Processing`: the line stays alive, the status is still to come."""
        await self.conn.write(PROCESSING)

    async def write(self, data: bytes) -> None:
        """A piece of the stream, sent at once."""
        await self.conn.write(encode_chunk(data) if self.chunked else data)

    async def end_stream(self) -> None:
        """The last chunk (HTTP/1.0: the connection closes after it)."""
        if self.chunked:
            await self.conn.write(encode_chunk(b""))
        self.streaming = False

    async def fail(self, err: ProxyError) -> None:
        """The one place a ProxyError becomes bytes: JSON, or an SSE error mid-stream."""
        body = self.dialect.error_body(err, self.request_id)
        self.record.error = err.error_type
        if not self.head_sent:
            self.status = err.status
            await self.send_json(err.status, body, err.headers)
        elif self.streaming:
            self.status = err.status      # logged; the client saw 200 and the error event
            frames = self.stream_error(err)
            for frame in [encode_sse(body, self.dialect.error_event)] if frames is None \
                    else frames:
                await self.write(frame)
            await self.end_stream()
        else:
            self.keep_alive = False


def email_date() -> str:
    """An HTTP date for the `date` header."""
    return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())


class App:
    """The running proxy: config, engine, counters and open connections."""

    def __init__(self, config: Config):
        self.config = config
        self.keys = KeyRing(config.api_key, config.keys_file)
        self.ledger = Ledger(config.ledger_path, config.ledger_days)
        self.engine = Engine(config)
        self.responses = ResponseStore()
        self.threads = ThreadStore()
        self.rate_limit: tuple[dict, float] | None = None    # latest info, when seen
        self.warned: set[tuple[str, Any]] = set()    # (window, its reset) warned about
        self.started = time.monotonic()
        self.requests = 0
        self.metrics = RequestMetrics()
        self.idle: dict[Connection, None] = {}  # waiting for a request, oldest first
        self.reading: dict[Connection, None] = {}   # reading a request body, oldest first
        self.busy: set[asyncio.Task] = set()    # connection tasks serving a request
        self.connections: set[asyncio.Task] = set()
        self.shutting_down = False
        self.drained = asyncio.Event()      # the drain is over: in-flight answers fail now

    def note_rate_limit(self, info: dict) -> None:
        """Keep the latest rate-limit report; warn once a window passes `warn_at`
        (once each time it fills: its reset time tells the fillings apart)."""
        self.rate_limit = (info, time.time())
        for name, used, resets_at in full_windows(info, self.config.warn_at, time.time()):
            if (name, resets_at) not in self.warned:
                self.warned.add((name, resets_at))
                log.warning("%s", window_warning(name, used, resets_at))

    def status(self) -> dict:
        """What the status page shows."""
        return status_data(self.ledger, self.engine.describe(), self.rate_limit,
                           self.config.warn_at, time.time())


async def serve_connection(app: App, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
    """Serve requests on one connection until it closes."""
    conn = Connection(reader, writer, app.config)
    task = asyncio.current_task()
    try:
        while not app.shutting_down:
            app.busy.discard(task)
            app.idle[conn] = None
            out = Responder(conn, "req_" + uuid.uuid4().hex[:24])
            try:
                raw_head = await conn.read_head()
            except ProxyError as err:
                out.keep_alive = False
                await out.fail(err)
                break
            if raw_head is None:
                break
            app.idle.pop(conn, None)
            app.busy.add(task)
            await serve_request(app, conn, raw_head, out)
            if not out.keep_alive:
                break
    except ClientGone:
        pass
    finally:
        app.idle.pop(conn, None)
        app.busy.discard(task)
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 5)


async def serve_request(app: App, conn: Connection, raw_head: bytes, out: Responder) -> None:
    """Parse, check, read the body, run the handler, log one line."""
    out.record = RequestRecord(time.monotonic(), time.time())
    app.requests += 1
    method = path = "-"
    body_read = False
    try:
        head = parse_request_head(raw_head)
        method, path, out.method = head.method, head.path, head.method
        out.chunked = head.version == "HTTP/1.1"
        out.keep_alive = head.keep_alive and not app.shutting_down
        try:                            # its errors wait until the key is checked
            found: tuple[Route, dict[str, str]] | ProxyError = match_route(head.method,
                                                                           head.path)
        except ProxyError as err:
            found = err
        out.dialect = dialect_for(head, None if isinstance(found, ProxyError) else found[0])
        authorized = True
        if not app.keys.keyed:
            check_local_caller(head)
            out.record.key = KEYLESS_NAME
        out.headers.update(cors_headers(head))
        preflight = preflight_headers(head)
        if preflight is not None:       # carries no key: a browser never sends one here
            await out.send(204, b"", "", preflight)
            return
        if app.keys.keyed:
            try:
                out.record.key = app.keys.check(head)   # before routing: no route
            except AuthenticationFailed:                # is shown to a stranger
                if not is_liveness_probe(head):
                    raise
                authorized = False
        if isinstance(found, ProxyError):
            raise found
        route, params = found
        out.record.route = route.name
        length = body_length(head)
        if length is not None and length > app.config.max_body_bytes:
            raise RequestTooLarge(f"Request body of {length} bytes exceeds the "
                                  f"{app.config.max_body_bytes}-byte limit.")
        app.reading[conn] = None            # evictable until the handler runs
        if length != 0 and head.version == "HTTP/1.1" and \
                (head.header("expect") or "").lower() == "100-continue":
            await conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = await conn.read_body(length, app.config.max_body_bytes)
        body_read = True
        request = Request(head, body, params, out.request_id, out.dialect, authorized)
        app.reading.pop(conn, None)
        await run_handler(app, conn, route.handler, request, out)
    except ClientGone:
        out.keep_alive = False
        out.status = out.status or 499
        raise
    except ProxyError as err:
        out.keep_alive = out.keep_alive and body_read     # unread body: close
        await out.fail(err)
    except Exception:
        log.exception("%s unhandled error", out.request_id)
        out.keep_alive = out.keep_alive and body_read
        await out.fail(ProxyError("Internal proxy error."))
    finally:
        app.reading.pop(conn, None)
        log_request(app, out, method, path)


async def run_handler(app: App, conn: Connection, handler: Callable, request: Request,
                      out: Responder) -> None:
    """Run a handler under the request timeout, cancelling it if the client leaves.
    The handler runs as a task of its own, awaited to its end whatever happens (an
    error it raised while being cancelled is still its own, never left unread)."""
    work = asyncio.ensure_future(handler(app, request, out))
    watch = asyncio.ensure_future(conn.watch_eof())
    drained = asyncio.ensure_future(app.drained.wait())
    try:
        done, _ = await asyncio.wait({work, watch, drained}, timeout=app.config.timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            work.result()
        elif drained in done:
            # Ended the way the API ends an interrupted answer: its error, in the
            # stream when one has begun, then a clean end (never a cut-off body).
            out.keep_alive = False
            raise ServiceUnavailable("The proxy is shutting down; retry the request.",
                                     retry_after_header(1))
        elif watch in done:
            raise ClientGone
        else:
            raise GatewayTimeout(f"The request took longer than {app.config.timeout_s:g} s "
                                 "(CLAUDE_PROXY_TIMEOUT_MS).")
    finally:
        for task in (work, watch, drained):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


def log_request(app: App, out: Responder, method: str, path: str) -> None:
    """One line per request (method, path, status, ms, key name, model, tokens), its
    count in GET /metrics, and a turn's row in the ledger."""
    record, now = out.record, time.monotonic()
    app.metrics.observe(record, out.status, now - record.started)
    if record.route in TURN_ROUTES and record.key:
        app.ledger.add(ledger_row(record, out.status, now))
    tokens = record.tokens()
    log.info("%s %s %d %dms key=%s model=%s in=%d out=%d %s", method, path, out.status,
             (now - record.started) * 1000, record.key or "-", record.model or "-",
             tokens_in(tokens), tokens["output_tokens"], out.request_id)


def not_a_killed_cli(record: logging.LogRecord) -> bool:
    """Log filter: the SDK logs every CLI the engine kills as a "fatal error"; the
    engine kills on purpose, and a failure it did not cause reaches it as an
    exception that the request log reports."""
    return not record.getMessage().startswith("Fatal error in message reader")


async def serve(config: Config, ready: Callable[[int], None] | None = None,
                stop: asyncio.Event | None = None) -> int:
    """Listen until SIGINT/SIGTERM (or `stop`), then drain and exit; return the exit code."""
    app = App(config)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    logging.getLogger("claude_agent_sdk._internal.query").addFilter(not_a_killed_cli)
    reaped = reap_orphans()
    if reaped:
        log.warning("Killed %d Claude Code CLI processes left by a crashed earlier run.", reaped)
    start_watchdog()
    def on_stop_signal() -> None:
        if stop.is_set():           # a second signal: the operator will not wait
            log.warning("Stopping now: in-flight requests end with an error.")
            app.drained.set()
        stop.set()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, on_stop_signal)
    # A hang-up is no reason to stop: it comes when the terminal the proxy was
    # started from with `&` goes away (its shell passes it on to its jobs), and
    # from `kill -HUP`, which asks a daemon to reload: the key file is re-read.
    # So the proxy goes on serving, as under nohup, and says so.
    def on_hang_up() -> None:
        log.warning("SIGHUP: still serving (stop the proxy with SIGTERM or SIGINT)%s.",
                    "; the key file is re-read" if config.keys_file else "")
        app.keys.refresh(forced=True)
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGHUP, on_hang_up)

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(app.connections) >= config.max_connections:
            # A flood of idle or slow sockets must not lock clients out: the one
            # that has waited longest for a request makes room, else the one that
            # has been reading its body longest. A request being answered never does.
            oldest = next(iter(app.idle), None) or next(iter(app.reading), None)
            if oldest is None:
                writer.close()
                return
            app.idle.pop(oldest, None)
            app.reading.pop(oldest, None)
            oldest.writer.close()
        task = asyncio.current_task()
        app.connections.add(task)
        try:
            await serve_connection(app, reader, writer)
        except asyncio.CancelledError:
            pass            # the proxy is stopping (its writer is closed by now)
        finally:
            app.connections.discard(task)

    server = await asyncio.start_server(on_connect, config.host, config.port,
                                        limit=MAX_HEAD_BYTES)
    port = server.sockets[0].getsockname()[1]
    if ready:
        ready(port)
    try:
        await stop.wait()
    finally:
        app.shutting_down = True
        # Stop accepting, then give an accept already under way the one loop turn in
        # which it builds its connection: `server.close()` first would make that
        # build fail, and its socket would stay open until garbage collection.
        for sock in server.sockets:
            with contextlib.suppress(NotImplementedError):
                loop.remove_reader(sock.fileno())
        await asyncio.sleep(0)
        server.close()
        for conn in list(app.idle):        # EOF ends their wait for a next request
            conn.writer.close()
        deadline = time.monotonic() + config.shutdown_grace_s
        drained = asyncio.ensure_future(app.drained.wait())
        while app.busy and not drained.done() and time.monotonic() < deadline:
            await asyncio.wait(set(app.busy) | {drained}, timeout=deadline - time.monotonic(),
                               return_when=asyncio.FIRST_COMPLETED)
        drained.cancel()
        app.drained.set()                   # what is still answering ends with an error
        if app.busy:
            await asyncio.wait(set(app.busy), timeout=5)
        for task in list(app.busy) + list(app.connections):   # a body still coming in
            task.cancel()                   # too: its connection closes in its finally
        if app.connections:
            await asyncio.wait(set(app.connections), timeout=5)
        await app.engine.close()
        app.ledger.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 5)
    return 0


# =============================================================================
# 16. Command line -- argument parsing and main(argv) -> int
# =============================================================================

def login(config: Config, command: list[str]) -> int:
    """`login` and `setup-token`: the CLI's own sign-in or token, in this terminal."""
    binary = cli_binary(config)
    if binary is None:
        print(f"No Claude Code CLI found: {install_hint()}", file=sys.stderr)
        return 2
    if command[0] == "auth":
        print(f"On a machine without a browser: run `{self_command()} setup-token` wherever "
              "you can log in, then start the proxy with CLAUDE_CODE_OAUTH_TOKEN=<that token>.")
    import subprocess
    return subprocess.call([binary, *command])


def doctor(config: Config) -> int:
    """`doctor`: check what the proxy needs, end with one real one-token call."""
    import subprocess
    checks: list[tuple[str, bool, str]] = []
    checks.append(("python", sys.version_info >= (3, 10), sys.version.split()[0]))
    errors, warnings = startup_problems(config, dict(os.environ), agent_sandbox_problem()
                                        if config.agent_dir else None)
    checks += [("configuration", False, error) for error in errors]
    checks += [("note", True, warning) for warning in warnings]
    versions = sdk_versions()
    too_old, newer = sdk_version_notes(versions["sdk"])
    checks.append(("claude-agent-sdk", sdk is not None and not too_old,
                   " ".join(too_old) or versions["sdk"] or f"missing: {install_hint()}"))
    checks += [("note", True, note) for note in newer]
    binary = cli_binary(config)
    checks.append(("Claude Code CLI", binary is not None,
                   f"{versions['cli'] or '?'} at {binary}" if binary else "not found"))
    if binary:
        logged_in, how = login_status(binary)
        checks.append(("login", bool(logged_in), how if logged_in else
                       f"not logged in. {login_hint()}" if logged_in is False else how))
    try:
        with socket.create_server((config.host, config.port)):
            checks.append(("port", True, f"{config.host}:{config.port} is free"))
    except OSError as exc:
        running = running_proxy(config)
        checks.append(("port", running is not None, f"{config.host}:{config.port}: " + (
            f"taken by a running claude-sdk-proxy {running}" if running else exc.strerror)))
    if all(ok for name, ok, _ in checks if name != "port") and not config.agent_dir:
        checks.append(("upstream call", *asyncio.run(doctor_call(config))))
    for name, ok, detail in checks:
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
    return 0 if all(ok for _, ok, _ in checks) else 1


def running_proxy(config: Config) -> str | None:
    """The version of the claude-sdk-proxy answering on the configured port, if one does."""
    host = "127.0.0.1" if config.host in ("0.0.0.0", "") else config.host.strip("[]")
    try:
        with socket.create_connection((host, config.port), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
    except OSError:
        return None
    head, _, body = answer.partition(b"\r\n\r\n")
    server = re.search(rb"(?im)^server: claude-sdk-proxy/(\S+)", head)
    return server.group(1).decode() if server else None


async def doctor_call(config: Config) -> tuple[bool, str]:
    """One real one-token request through the engine."""
    with tempfile.TemporaryDirectory(prefix="claude-sdk-proxy-") as workdir:
        engine = Engine(dataclasses.replace(config, workdir=workdir, max_spares=0))
        turn = messages_request_to_turn({"model": config.default_model, "max_tokens": 1,
                                         "messages": [{"role": "user", "content": "Say ok."}]},
                                        config.default_model)
        started = time.monotonic()
        try:
            async with contextlib.aclosing(engine.run(turn)) as events:
                model = (await final_answer(events)).get("model", "?")
            return True, f"{model} answered in {time.monotonic() - started:.1f} s"
        except ProxyError as err:
            return False, f"{err.status} {err.message}"
        finally:
            await engine.close()


def base_url(host: str, port: int) -> str:
    """The URL clients are told to use (an IPv6 address in brackets)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def main(argv: list[str] | None = None) -> int:
    """Run the proxy (or login, doctor); return the process exit code."""
    args, extra = build_arg_parser().parse_known_args(argv)
    if extra and args.command not in ("login", "setup-token"):
        build_arg_parser().error(f"unrecognized arguments: {' '.join(extra)}")
    if args.version:
        versions = sdk_versions()
        missing = f"not installed ({install_hint()})"
        print(f"claude-sdk-proxy {versions['proxy']}\n"
              f"claude-agent-sdk {versions['sdk'] or missing}\n"
              f"Claude Code CLI {versions['cli'] or missing}")
        return 0
    config = config_from(args, dict(os.environ), available_memory())
    if args.command == "login":
        return login(config, ["auth", "login", *extra])
    if args.command == "setup-token":
        return login(config, ["setup-token", *extra])
    if args.command == "doctor":
        return doctor(config)
    logging.basicConfig(level=logging.DEBUG if config.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")
    errors, warnings = startup_problems(config, dict(os.environ), agent_sandbox_problem()
                                        if config.agent_dir else None)
    try:
        KeyRing(config.api_key, config.keys_file)
    except (OSError, ValueError) as err:
        errors.append(f"The key file cannot be used: {err}")
    for warning in warnings:
        log.warning("%s", warning)
    if errors:
        print("\n".join(errors), file=sys.stderr)
        return 2
    if not config.debug:
        logging.getLogger("claude_agent_sdk").setLevel(logging.WARNING)
    if sdk is None:
        print(f"claude-agent-sdk is not installed: `{install_hint()}`, or run "
              f"`pipx run {shlex.quote(os.path.abspath(__file__))}`.", file=sys.stderr)
        return 2
    too_old, newer = sdk_version_notes(sdk.__version__)
    if too_old:
        print("\n".join(too_old), file=sys.stderr)
        return 2
    for note in newer:
        log.warning("%s", note)
    binary = cli_binary(config)
    logged_in, how = login_status(binary) if binary else (None, "")
    if logged_in is False:
        log.error("The Claude Code CLI has no login, so every request will be a 401. %s",
                  login_hint())
    with private_temp() as workdir:
        config = dataclasses.replace(config, workdir=workdir)

        def ready(port: int) -> None:
            url = base_url(config.host, port)
            log.info("claude-sdk-proxy %s listening on %s (%s)\n"
                     "  Anthropic clients: export ANTHROPIC_BASE_URL=%s\n"
                     "  OpenAI clients:    export OPENAI_BASE_URL=%s/v1", __version__, url,
                     "API key required" if config.api_key or config.keys_file
                     else "no API key", url, url)
        return asyncio.run(serve(config, ready))


if __name__ == "__main__":
    sys.exit(main())
