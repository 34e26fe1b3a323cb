"""Tests for claude_sdk_proxy.py: python -m unittest -v test_claude_sdk_proxy

The pure sections are tested table-driven; everything else end to end through the
real chain: the official anthropic SDK -> the proxy -> claude-agent-sdk -> the
bundled Claude Code CLI -> a scripted Anthropic upstream on loopback, which logs
every request it receives. Tests assert on what the client got and what the
upstream received. The upstream is steered by markers in the last user text:

  [[error 429]] [[error 429 window]] [[error 529]] ...  answer with that error
  [[error 400 too long]]  the API's 400 for a conversation past the context window
  [[context 990000]]    report that many input tokens (the conversation's length)
  [[thinking]]          a thinking block (with signature) before the text
  [[delay 1.5]]         wait before the first event
  [[hang]]              send message_start, then pings until the client hangs up
  [[drop]]              send message_start, then cut the connection
  [[broken 529]]        some text, then an `error` event of that status's type
  [[stop max_tokens]]   end with that stop_reason
  [[hold]]              send the answer up to its message_stop, then hold the end of
                        the response until the test sets `release` (or the caller leaves)
  [[tool NAME {json}]]  call the client tool NAME with that input (several: parallel)
  [[builtin NAME {json}]]  call the tool NAME as named, offered or not (agent mode)
  [[json {...}]]        answer with exactly that JSON text
  [[limits warning]]    send the rate-limit headers of a five-hour window at 91 %

A request whose last user message holds tool_results is answered with text that
quotes them: "Results: <tool_use_id>=<text>, ...".
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import dataclasses
import datetime as dt
import io
import math
import struct
import uuid
import html.parser
import http.server
import json
import os
import re
import select
import shutil
import signal
import socket
import sqlite3
import stat
import sys
import tempfile
import threading
import time
import types
import unittest
import urllib.parse
import zlib

import anthropic
import openai
from hypothesis import HealthCheck, given, settings, strategies as st
from prometheus_client.parser import text_string_to_metric_families

import claude_sdk_proxy as proxy

# =============================================================================
# Helpers: scripted upstream, proxy in a thread, raw sockets, SSE, assertions
# =============================================================================

UPSTREAM_TEXT = "Hello from the scripted upstream"
# A hung request fails its test in this time, not the clients' default ten minutes.
CLIENT_TIMEOUT = 120


class ScriptedUpstream:
    """A Messages API upstream on an ephemeral loopback port that logs requests."""

    def __init__(self):
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.cut = threading.Event()        # a [[hang]] or [[hold]] answer saw its client leave
        self.hanging = threading.Event()    # a [[hang]] answer is streaming
        self.holding = threading.Event()    # a [[hold]] answer sent its message_stop, holds
        self.release = threading.Event()    # lets every [[hang]] and [[hold]] answer finish
        upstream = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Small SSE writes behind Nagle's algorithm wait ~40 ms for the client's
            # delayed ACK; the real API does not make its clients wait like that.
            disable_nagle_algorithm = True

            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                body = self.body = json.loads(raw) if raw else {}
                with upstream.lock:
                    upstream.requests.append({"path": self.path, "headers": dict(self.headers),
                                              "body": body})
                    upstream.in_flight += 1
                    upstream.max_in_flight = max(upstream.max_in_flight, upstream.in_flight)
                try:
                    upstream.answer(self, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    with upstream.lock:
                        upstream.in_flight -= 1

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def clear(self):
        with self.lock:
            self.requests.clear()
            self.max_in_flight = self.in_flight
        self.cut.clear()
        self.hanging.clear()
        self.holding.clear()

    @staticmethod
    def last_text(body: dict) -> str:
        content = conversation(body)[-1]["content"]
        if isinstance(content, str):
            return content
        texts = [b.get("text", "") for b in content if b.get("type") == "text"]
        return texts[-1] if texts else ""

    def answer(self, handler, body):
        text = self.last_text(body)
        delay = re.search(r"\[\[delay ([0-9.]+)\]\]", text)
        if delay:
            time.sleep(float(delay.group(1)))     # scripted slowness, not synchronisation
        marker = re.search(r"\[\[error (\d{3})(?: (window|too long))?\]\]", text)
        if marker:
            return self.send_error(handler, int(marker.group(1)), marker.group(2))
        stop = re.search(r"\[\[stop (\w+)\]\]", text)
        handler.send_response(200)
        if "[[limits warning]]" in text:
            self.limit_headers(handler, "allowed_warning", 0.91)
        handler.send_header("content-type", "text/event-stream")
        handler.send_header("transfer-encoding", "chunked")
        handler.end_headers()

        def event(name, data):
            frame = f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(frame), frame))
            handler.wfile.flush()

        context = re.search(r"\[\[context (\d+)\]\]", text)
        usage = {"input_tokens": int(context.group(1)) if context else 17, "output_tokens": 1,
                 "cache_read_input_tokens": 3, "cache_creation_input_tokens": 2}
        event("message_start", {"type": "message_start", "message": {
            "id": f"msg_scripted_{uuid.uuid4().hex[:12]}", "type": "message", "role": "assistant", "model": body["model"],
            "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage}})
        broken = re.search(r"\[\[broken (\d{3})\]\]", text)
        if broken:                      # some text, then the API's mid-stream error event
            event("content_block_start", {"type": "content_block_start", "index": 0,
                                          "content_block": {"type": "text", "text": ""}})
            event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                          "delta": {"type": "text_delta", "text": "Partial"}})
            kinds = {429: "rate_limit_error", 500: "api_error", 529: "overloaded_error"}
            kind = kinds.get(int(broken.group(1)), "api_error")
            event("error", {"type": "error", "error": {"type": kind, "message": f"scripted {kind}"}})
            handler.wfile.write(b"0\r\n\r\n")
            return
        if "[[drop]]" in text:          # the connection dies mid-answer
            handler.wfile.flush()
            handler.connection.shutdown(socket.SHUT_RDWR)
            return
        if "[[hang]]" in text:
            self.hanging.set()
            while not self.release.is_set():
                try:
                    event("ping", {"type": "ping"})
                except OSError:
                    self.cut.set()
                    return
                self.release.wait(0.05)
        index = 0
        calls = [(proxy.upstream_tool_name(name), arguments) for name, arguments in
                 re.findall(r"\[\[tool (\S+) (\{.*?\})\]\]", text)]
        offered = {t["name"] for t in body.get("tools", [])}
        assert all(name in offered for name, _ in calls), (calls, offered)
        calls += re.findall(r"\[\[builtin (\S+) (\{.*?\})\]\]", text)
        if calls:
            return self.answer_tool_calls(event, body, calls, handler)
        json_answer = re.search(r"\[\[json (\{.*\})\]\]", text)
        if json_answer:
            return self.answer_text(event, json_answer.group(1), "end_turn", handler)
        results = self.tool_results(body)
        if results is not None:
            return self.answer_text(event, f"Results: {results}", "end_turn", handler)
        if "[[thinking]]" in text:
            event("content_block_start", {"type": "content_block_start", "index": 0,
                                          "content_block": {"type": "thinking", "thinking": ""}})
            event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                          "delta": {"type": "thinking_delta",
                                                    "thinking": "Let me think."}})
            event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                          "delta": {"type": "signature_delta",
                                                    "signature": "sig-abc"}})
            event("content_block_stop", {"type": "content_block_stop", "index": 0})
            index = 1
        event("content_block_start", {"type": "content_block_start", "index": index,
                                      "content_block": {"type": "text", "text": ""}})
        for piece in (UPSTREAM_TEXT[:9], UPSTREAM_TEXT[9:]):
            event("content_block_delta", {"type": "content_block_delta", "index": index,
                                          "delta": {"type": "text_delta", "text": piece}})
        event("content_block_stop", {"type": "content_block_stop", "index": index})
        self.finish(event, stop.group(1) if stop else "end_turn", handler)

    @staticmethod
    def tool_results(body):
        """'id=text, ...' for a last user message of tool_results; None otherwise."""
        content = conversation(body)[-1]["content"]
        if isinstance(content, str) or not any(b["type"] == "tool_result" for b in content):
            return None
        quoted = []
        for block in content:
            if block["type"] != "tool_result":
                continue
            inner = block.get("content")
            texts = [inner] if isinstance(inner, str) else \
                [p.get("text", p["type"]) for p in inner or []]
            error = " (error)" if block.get("is_error") else ""
            quoted.append(f"{block['tool_use_id']}={'|'.join(texts)}{error}")
        return ", ".join(quoted)

    def answer_text(self, event, text, stop_reason, handler):
        event("content_block_start", {"type": "content_block_start", "index": 0,
                                      "content_block": {"type": "text", "text": ""}})
        event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                      "delta": {"type": "text_delta", "text": text}})
        event("content_block_stop", {"type": "content_block_stop", "index": 0})
        self.finish(event, stop_reason, handler)

    def finish(self, event, stop_reason, handler):
        event("message_delta", {"type": "message_delta",
                                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                                "usage": {"output_tokens": 42}})
        if stop_reason in ("max_tokens", "model_context_window_exceeded", "refusal"):
            # The CLI makes its "recovery" call once the stream ends; the proxy must
            # have stopped it at the message_delta. The real API sends message_stop
            # right away (a loaded machine can lose that race: README, Limits).
            readable, _, _ = select.select([handler.connection], [], [], 10)
            try:
                if readable and not handler.connection.recv(1, socket.MSG_PEEK):
                    self.cut.set()
            except ConnectionResetError:
                self.cut.set()
                raise
        event("message_stop", {"type": "message_stop"})
        if "[[hold]]" in self.last_text(handler.body) and not self.hold(handler):
            return
        handler.wfile.write(b"0\r\n\r\n")

    def hold(self, handler) -> bool:
        """Keep a response open after its message_stop until `release` is set: True
        then; False (and `cut` set) if the caller left first."""
        self.holding.set()
        while not self.release.wait(0.05):
            readable, _, _ = select.select([handler.connection], [], [], 0)
            try:
                gone = readable and not handler.connection.recv(1, socket.MSG_PEEK)
            except ConnectionResetError:
                gone = True
            if gone:
                self.cut.set()
                return False
        return True

    def answer_tool_calls(self, event, body, calls, handler):
        """A text block, then one tool_use per [[tool NAME {json}]] marker, streamed with
        input_json_delta fragments, under the name the upstream was offered."""
        event("content_block_start", {"type": "content_block_start", "index": 0,
                                      "content_block": {"type": "text", "text": ""}})
        event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                      "delta": {"type": "text_delta", "text": "Calling."}})
        event("content_block_stop", {"type": "content_block_stop", "index": 0})
        for index, (upstream_name, arguments) in enumerate(calls, start=1):
            event("content_block_start", {"type": "content_block_start", "index": index,
                                          "content_block": {
                                              "type": "tool_use", "name": upstream_name,
                                              "id": f"toolu_{uuid.uuid4().hex[:20]}",
                                              "input": {}}})
            half = len(arguments) // 2
            for piece in (arguments[:half], arguments[half:]):
                event("content_block_delta", {"type": "content_block_delta", "index": index,
                                              "delta": {"type": "input_json_delta",
                                                        "partial_json": piece}})
            event("content_block_stop", {"type": "content_block_stop", "index": index})
        self.finish(event, "tool_use", handler)

    LIMIT_RESET = int(time.time()) + 3600

    @staticmethod
    def limit_headers(handler, status, utilization):
        """The unified rate-limit headers of a five-hour window in that state."""
        reset = ScriptedUpstream.LIMIT_RESET
        for name, value in (("status", status), ("5h-status", status),
                            ("5h-utilization", str(utilization)), ("5h-reset", str(reset)),
                            ("7d-status", "allowed"), ("7d-utilization", "0.25"),
                            ("7d-reset", str(reset + 86400)),
                            ("reset", str(reset)), ("representative-claim", "five_hour")):
            handler.send_header(f"anthropic-ratelimit-unified-{name}", value)

    @staticmethod
    def send_error(handler, status, variant):
        kinds = {400: "invalid_request_error", 401: "authentication_error",
                 429: "rate_limit_error", 500: "api_error", 529: "overloaded_error"}
        message = "prompt is too long: 1000123 tokens > 1000000 maximum" \
            if variant == "too long" else f"scripted {status}"
        body = json.dumps({"type": "error", "error": {
            "type": kinds.get(status, "api_error"), "message": message}}).encode()
        handler.send_response(status)
        if variant == "window":
            ScriptedUpstream.limit_headers(handler, "rejected", 1.0)
        handler.send_header("content-type", "application/json")
        handler.send_header("content-length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def messages_requests(self) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if r["path"].startswith("/v1/messages")]


class ProxyThread:
    """The proxy's serve() on its own event loop in a thread, on an ephemeral port."""

    def __init__(self, **overrides):
        self.workdir = tempfile.mkdtemp(prefix="proxy-test-cwd-")
        overrides.setdefault("max_spares", 0)   # spares are tested where they matter
        self.config = proxy.Config(port=0, workdir=self.workdir, **overrides)
        self.loop = asyncio.new_event_loop()
        self.stop_event: asyncio.Event | None = None
        self.exit_code = None
        started = threading.Event()

        def ready(port):
            self.port = port
            started.set()

        def run():
            asyncio.set_event_loop(self.loop)

            async def main():
                self.stop_event = asyncio.Event()
                self.exit_code = await proxy.serve(self.config, ready, self.stop_event)
            try:
                self.loop.run_until_complete(main())
            finally:
                self.loop.close()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        if not started.wait(10):
            raise RuntimeError("proxy did not start")
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self, timeout=30):
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(timeout)
        shutil.rmtree(self.workdir, ignore_errors=True)
        return self.exit_code

    def client(self, **kwargs) -> anthropic.Anthropic:
        kwargs.setdefault("api_key", "test-key")
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", CLIENT_TIMEOUT)
        return anthropic.Anthropic(base_url=self.url, **kwargs)

    def openai_client(self, base="/v1", api_key="k", kind=openai.OpenAI) -> openai.OpenAI:
        return kind(base_url=self.url + base, api_key=api_key, max_retries=0,
                    timeout=CLIENT_TIMEOUT)


def raw_exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send bytes, read until the server closes; return everything read."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def closed_by_server(sock: socket.socket, timeout: float = 10.0) -> bool:
    """Whether the server closed this socket (a close with unread input is a reset)."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def read_response(sock_file) -> tuple[int, dict, bytes]:
    """Read one HTTP/1.1 response (content-length or chunked) from a socket file."""
    status_line = sock_file.readline().decode()
    status = int(status_line.split()[1])
    headers = {}
    while (line := sock_file.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    if 100 <= status < 200:
        return status, headers, b""
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int(sock_file.readline().strip(), 16)
            if size == 0:
                sock_file.readline()
                break
            body += sock_file.read(size)
            sock_file.readline()
        return status, headers, body
    return status, headers, sock_file.read(int(headers.get("content-length", 0)))


def parse_sse(data: bytes) -> list[tuple[str | None, str]]:
    """(event, data) pairs of an SSE body."""
    frames = []
    for block in data.decode().split("\n\n"):
        if not block.strip():
            continue
        event = None
        lines = []
        for line in block.split("\n"):
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                lines.append(line[6:])
        frames.append((event, "\n".join(lines)))
    return frames


def cli_children() -> list[int]:
    """Pids of this process's descendants that are Claude Code CLIs."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                parents[int(entry)] = (int(fields[1]), fields[0])
    mine = {os.getpid()}
    changed = True
    while changed:
        changed = False
        for pid, (ppid, _) in parents.items():
            if ppid in mine and pid not in mine:
                mine.add(pid)
                changed = True
    names = {}
    for pid in mine - {os.getpid()}:
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/comm") as f:
                names[pid] = f.read().strip()
    # The CLIs the proxy started, not what a CLI starts (some CLI versions run
    # helper processes of their own under the same name).
    return [pid for pid, name in names.items() if name == "claude" and
            parents[pid][1] != "Z" and names.get(parents[pid][0]) != "claude"]


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def process_state(pid: int) -> str:
    """A process's state letter from /proc ("T": stopped); "" once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def wait_until(condition, timeout=15.0, interval=0.05) -> bool:
    """Poll a condition until it holds or the deadline passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def conversation(body: dict) -> list[dict]:
    """The user and assistant messages of an upstream body (5.x models also get a
    role-system environment message from the CLI)."""
    return [m for m in body["messages"] if m["role"] != "system"]


UPSTREAM: ScriptedUpstream = None  # type: ignore[assignment]  # set by setUpModule
HOME_MARKER = "HOME-CLAUDE-MD-MARKER-must-never-reach-upstream"


def setUpModule():
    global UPSTREAM
    UPSTREAM = ScriptedUpstream()
    home = tempfile.mkdtemp(prefix="proxy-test-home-")
    os.makedirs(os.path.join(home, ".claude"))
    with open(os.path.join(home, ".claude", "CLAUDE.md"), "w") as f:
        f.write(HOME_MARKER)
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "CLAUDE_CODE_SIMPLE"):
        os.environ.pop(name, None)
    os.environ.update({"ANTHROPIC_BASE_URL": UPSTREAM.url, "HOME": home,
                       "CLAUDE_CODE_OAUTH_TOKEN": "sk-ant-oat01-scripted-test-token"})


def tearDownModule():
    UPSTREAM.close()


class ApiAssertions:
    def assertApiError(self, exc: anthropic.APIStatusError, status: int, error_type: str):
        self.assertEqual(exc.status_code, status, exc.body)
        self.assertEqual(exc.body["type"], "error")
        self.assertEqual(exc.body["error"]["type"], error_type)
        self.assertTrue(exc.body["error"]["message"])


# =============================================================================
# Helpers for the pure sections: ProxyError assertions, tiny real image files
# =============================================================================

INV = (proxy.InvalidRequest, 400, "invalid_request_error")

# Client tools the tests offer, in each API's form.
WEATHER = {"name": "get_weather", "description": "Weather for a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                            "required": ["city"]}}
LONG_TOOL = {"name": "n" * 64, "description": "A tool with the longest name the API allows.",
             "input_schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}
OPENAI_WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city.",
    "parameters": WEATHER["input_schema"]}}
RESPONSES_WEATHER = {"type": "function", "name": "get_weather",
                     "description": "Weather for a city.",
                     "parameters": WEATHER["input_schema"]}
CHAT_TOOLS = [{"type": "function", "function": {
                  "name": "get_weather", "description": "Weather.", "parameters": {
                      "type": "object", "properties": {"city": {"type": "string"}}}}},
              {"type": "function", "function": {"name": "now"}}]


class PureAssertions:
    def assertProxyError(self, expected, fn, *args, message=None, prefix=None):
        """fn(*args) raises exactly expected = (class, status, error_type)."""
        with self.assertRaises(proxy.ProxyError) as cm:
            fn(*args)
        err = cm.exception
        self.assertEqual((type(err), err.status, err.error_type), expected, err.message)
        if message is not None:
            self.assertEqual(err.message, message)
        if prefix is not None:
            self.assertTrue(err.message.startswith(prefix), f"{err.message!r} !^ {prefix!r}")
        return err


def png_bytes(w: int, h: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * (3 * w + 1) * h)) + chunk(b"IEND", b""))


def gif_bytes(width: int, height: int) -> bytes:
    return (b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
            + b",\0\0\0\0" + struct.pack("<HH", width, height) + b"\0\x02\x02D\x01\0;")


def jpeg_bytes(width: int, height: int, sof: int = 0xC0) -> bytes:
    app0 = b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    dht = b"\xff\xc4\x00\x04\x00\x00"          # marker C4 is a table, not a frame header
    frame = (bytes([0xFF, sof]) + struct.pack(">HBHHB", 17, 8, height, width, 3)
             + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01")
    return b"\xff\xd8" + app0 + dht + frame + b"\xff\xd9"


def webp_bytes(w: int, h: int, kind: bytes) -> bytes:
    payload = {b"VP8X": b"\0" * 4 + (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little"),
               b"VP8L": b"\x2f" + struct.pack("<I", (w - 1) | (h - 1) << 14) + b"\0" * 8,
               b"VP8 ": b"\0\0\0\x9d\x01\x2a" + struct.pack("<HH", w, h) + b"\0" * 4}[kind]
    body = b"WEBP" + kind + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


def raw_head(*header_lines: bytes, line: bytes = b"POST /v1/messages HTTP/1.1") -> bytes:
    """A request head; an HTTP/1.1 one gets `Host: localhost` unless it names a host."""
    if line.endswith(b"HTTP/1.1") and not any(h.lower().startswith(b"host:")
                                              for h in header_lines):
        header_lines = (b"Host: localhost",) + header_lines
    return b"\r\n".join((line,) + header_lines) + b"\r\n\r\n"


def head_with(*fields: str, version: str = "HTTP/1.1") -> proxy.RequestHead:
    """A parsed head from "Name: value" strings."""
    line = f"POST /v1/messages {version}".encode()
    return proxy.parse_request_head(raw_head(*[f.encode("latin-1") for f in fields], line=line))


class SharedProxyCase(unittest.TestCase):
    """One proxy for the class, an official client on it, a clean upstream log a test."""

    @staticmethod
    def make_client(server):
        return server.client()

    @classmethod
    def setUpClass(cls):
        cls.server = ProxyThread()
        cls.client = cls.make_client(cls.server)

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    def setUp(self):
        UPSTREAM.clear()


class OpenAICase(SharedProxyCase):
    """The shared proxy with an official openai client on it."""

    @staticmethod
    def make_client(server):
        return server.openai_client()


# =============================================================================
# 1. Config and limits
# =============================================================================

class ConfigTest(unittest.TestCase):
    def config(self, argv=(), env=None):
        return proxy.config_from(proxy.build_arg_parser().parse_args(list(argv)), env or {})

    @staticmethod
    def knobs(cfg):
        return (cfg.port, cfg.host, cfg.debug, cfg.api_key, cfg.max_concurrent, cfg.timeout_s,
                cfg.max_body_bytes, cfg.queue_timeout_s, cfg.default_model, cfg.cli_path)

    def test_startup_problems(self):
        def problems(argv, env):
            errors, warnings = proxy.startup_problems(self.config(argv, env), env)
            return [e.split(":")[0] for e in errors], [w.split(":")[0] for w in warnings]
        table = [
            ((), {}, ([], [])),
            (("-H", "::1"), {}, ([], [])), (("-H", "localhost"), {}, ([], [])),
            (("-H", "0.0.0.0"), {}, (["Refusing to listen on 0.0.0.0 without an API key"], [])),
            (("-H", "192.168.1.5"), {"CLAUDE_PROXY_API_KEY": "k"}, ([], [])),
            (("-H", "192.168.1.5"), {"CLAUDE_PROXY_KEYS_FILE": "/etc/proxy-keys"}, ([], [])),
            (("-H", "0.0.0.0"), {"CLAUDE_PROXY_API_KEY": " \n"},       # blank is no key
             (["Refusing to listen on 0.0.0.0 without an API key"], [])),
            ((), {"ANTHROPIC_API_KEY": "sk-ant-x"}, ([], ["ANTHROPIC_API_KEY is set"])),
            ((), {"ANTHROPIC_BASE_URL": "http://127.0.0.1:3456"},
             (["ANTHROPIC_BASE_URL=http"], [])),
            ((), {"ANTHROPIC_BASE_URL": "http://localhost:3456/"},
             (["ANTHROPIC_BASE_URL=http"], [])),
            ((), {"ANTHROPIC_BASE_URL": "http://127.0.0.1:9999"}, ([], [])),
            ((), {"ANTHROPIC_BASE_URL": "https://api.anthropic.com"}, ([], [])),
            (("--agent-dir", "/no/such/dir"), {},
             (["The agent directory /no/such/dir does not exist."], ["Agent mode"])),
            ((), {"CLAUDE_PROXY_AGENT_DIR": tempfile.gettempdir()}, ([], ["Agent mode"])),
            ((), {"CLAUDE_PROXY_DEFAULT_MODEL": "gpt-4o"},
             (["CLAUDE_PROXY_DEFAULT_MODEL=gpt-4o names no Claude model"], [])),
            ((), {"CLAUDE_PROXY_DEFAULT_MODEL": "claude-opus-4-1-20250805"}, ([], [])),
            ((), {"CLAUDE_PROXY_DEFAULT_MODEL": "haiku"}, ([], []))]
        for argv, env, expected in table:
            with self.subTest(argv=argv, env=env):
                self.assertEqual(problems(argv, env), expected)

    def test_agent_mode_needs_the_sandbox(self):
        self.assertIsNone(proxy.agent_sandbox_problem())     # CI installs bubblewrap, socat
        self.assertIn("apt-get install -y bubblewrap socat",
                      proxy.agent_sandbox_problem("linux", lambda name: None))
        self.assertIn("Linux and macOS only", proxy.agent_sandbox_problem("win32"))
        sandbox = proxy.agent_sandbox({"CLAUDE_CONFIG_DIR": "/srv/claude"})
        self.assertEqual((sandbox["enabled"], sandbox["failIfUnavailable"],
                          sandbox["allowUnsandboxedCommands"]), (True, True, False))
        self.assertIn("/srv/claude/.credentials.json", sandbox["filesystem"]["denyRead"])
        errors, _ = proxy.startup_problems(self.config(("--agent-dir", tempfile.gettempdir()),
                                                       {}), {}, "bwrap not found.")
        self.assertEqual(errors, ["Agent mode needs the CLI's Bash sandbox and it cannot run "
                                  "here: bwrap not found. Without it Bash could read the "
                                  "subscription login (the CLI's environment, the credentials "
                                  "file) and show it to the model."])

    def test_the_key_is_read_as_clients_send_it(self):
        # From an env file or `echo`, a key keeps its newline; clients' keys are stripped.
        self.assertEqual(self.config(env={"CLAUDE_PROXY_API_KEY": " s3cret\n"}).api_key,
                         "s3cret")

    def test_defaults_with_no_flags_and_empty_environment(self):
        self.assertEqual(self.knobs(self.config()),
                         (3456, "127.0.0.1", False, None, 8, 1800.0, 32 * 1024 * 1024, 60.0,
                          "sonnet", None))

    def test_the_usage_ledger_and_keys_are_where_the_operator_says(self):
        home = {"HOME": "/home/ann"}
        cfg = self.config(env=home)
        self.assertEqual((cfg.ledger_path, cfg.ledger_days, cfg.warn_at, cfg.keys_file),
                         ("/home/ann/.local/state/claude-sdk-proxy/usage.sqlite3", 90.0, 0.9,
                          None))
        self.assertEqual(self.config(env={**home, "XDG_STATE_HOME": "/var/state"}).ledger_path,
                         "/var/state/claude-sdk-proxy/usage.sqlite3")
        cfg = self.config(env={**home, "CLAUDE_PROXY_LEDGER": "off",
                               "CLAUDE_PROXY_LEDGER_DAYS": "7", "CLAUDE_PROXY_WARN_AT": "75",
                               "CLAUDE_PROXY_KEYS_FILE": "/etc/proxy-keys"})
        self.assertEqual((cfg.ledger_path, cfg.ledger_days, cfg.warn_at, cfg.keys_file),
                         (None, 7.0, 0.75, "/etc/proxy-keys"))
        cfg = self.config(["--ledger", "/srv/u.db", "--keys-file", "/srv/keys"],
                          {**home, "CLAUDE_PROXY_LEDGER": "off"})
        self.assertEqual((cfg.ledger_path, cfg.keys_file), ("/srv/u.db", "/srv/keys"))
        for name, value in (("LEDGER_DAYS", "0"), ("WARN_AT", "0"), ("WARN_AT", "high")):
            with self.subTest(name=name, value=value), self.assertRaises(SystemExit):
                self.config(env={"CLAUDE_PROXY_" + name: value})

    def test_the_session_cap_is_what_half_the_available_memory_holds(self):
        gib = 1 << 30
        for available, concurrent, cap in ((8 * gib, 8, 32), (gib, 8, 8), (gib, 2, 4),
                                           (64 * gib, 8, 64)):
            with self.subTest(available=available, concurrent=concurrent):
                self.assertEqual(proxy.default_max_sessions(available, concurrent), cap)
        with open("/proc/meminfo") as meminfo:      # MemAvailable moves all the time
            total = next(int(line.split()[1]) for line in meminfo
                         if line.startswith("MemTotal:")) * 1024
        self.assertTrue(0 < proxy.available_memory() < total)

    def test_environment_sets_every_knob(self):
        env = {"PORT": "8080", "HOST": "0.0.0.0", "DEBUG": "true", "API_KEY": "sekret",
               "MAX_CONCURRENT": "10", "TIMEOUT_MS": "5000", "MAX_BODY_MB": "1.5",
               "QUEUE_TIMEOUT_S": "2.5", "DEFAULT_MODEL": "opus", "CLI_PATH": "/bin/claude"}
        cfg = self.config(env={"CLAUDE_PROXY_" + k: v for k, v in env.items()})
        self.assertEqual(self.knobs(cfg), (8080, "0.0.0.0", True, "sekret", 10, 5.0, 1572864,
                                           2.5, "opus", "/bin/claude"))

    def test_flags_win_over_environment(self):
        env = {"CLAUDE_PROXY_PORT": "8080", "CLAUDE_PROXY_HOST": "::1", "CLAUDE_PROXY_DEBUG": "no"}
        cfg = self.config(["-p", "9000", "-H", "0.0.0.0", "-d"], env)
        self.assertEqual((cfg.port, cfg.host, cfg.debug), (9000, "0.0.0.0", True))
        cfg = self.config(["--port", "0", "--host", "localhost"], env)
        self.assertEqual((cfg.port, cfg.host, cfg.debug), (0, "localhost", False))

    def test_debug_values_and_blank_environment_values(self):
        for value, expected in [("1", True), ("true", True), ("YES", True), ("0", False),
                                ("no", False), ("", False), ("on", False)]:
            with self.subTest(value=value):
                self.assertIs(self.config(env={"CLAUDE_PROXY_DEBUG": value}).debug, expected)
        blank = {"CLAUDE_PROXY_" + k: v for k, v in [("PORT", " "), ("DEFAULT_MODEL", " "),
                                                     ("API_KEY", ""), ("HOST", "")]}
        self.assertEqual(self.knobs(self.config(env=blank)), self.knobs(self.config()))

    def test_bad_numbers_exit(self):
        cases = [("PORT", "abc"), ("PORT", "-1"), ("PORT", "70000"), ("PORT", "80.5"),
                 ("MAX_CONCURRENT", "0"), ("MAX_CONCURRENT", "x"), ("TIMEOUT_MS", "0"),
                 ("TIMEOUT_MS", "1.5"), ("MAX_BODY_MB", "-1"), ("MAX_BODY_MB", "big"),
                 ("QUEUE_TIMEOUT_S", "-0.1"), ("QUEUE_TIMEOUT_S", "soon")]
        for name, value in cases:
            with self.subTest(name=name, value=value), self.assertRaises(SystemExit) as cm:
                self.config(env={"CLAUDE_PROXY_" + name: value})
            self.assertIn(value, str(cm.exception.code))

    def test_bad_port_flag_exits(self):
        for argv in (["-p", "70000"], ["-p", "-1"], ["-p", "abc"]):
            with self.subTest(argv=argv), self.assertRaises(SystemExit), \
                    contextlib.redirect_stderr(io.StringIO()):
                self.config(argv)

    def test_non_finite_float_environment_values_exit(self):
        for name, value in [("MAX_BODY_MB", "nan"), ("MAX_BODY_MB", "inf"),
                            ("QUEUE_TIMEOUT_S", "nan")]:
            with self.subTest(name=name, value=value), self.assertRaises(SystemExit):
                self.config(env={"CLAUDE_PROXY_" + name: value})


# =============================================================================
# 2. Errors
# =============================================================================

class ErrorsTest(unittest.TestCase):
    def test_each_error_class_has_its_status_and_type(self):
        inv, api = "invalid_request_error", "api_error"
        table = [("ProxyError", 500, api), ("InvalidRequest", 400, inv),
                 ("AuthenticationFailed", 401, "authentication_error"),
                 ("PermissionDenied", 403, "permission_error"),
                 ("NotFound", 404, "not_found_error"), ("MethodNotAllowed", 405, inv),
                 ("RequestTooLarge", 413, "request_too_large"), ("HeadersTooLarge", 431, inv),
                 ("RateLimited", 429, "rate_limit_error"), ("UpstreamError", 500, api),
                 ("BadGateway", 502, api), ("ServiceUnavailable", 503, api),
                 ("GatewayTimeout", 504, "timeout_error"), ("Overloaded", 529, "overloaded_error")]
        for name, status, error_type in table:
            with self.subTest(cls=name):
                err = getattr(proxy, name)("boom")
                self.assertIsInstance(err, proxy.ProxyError)
                self.assertEqual((err.status, err.error_type, err.message, err.headers, str(err)),
                                 (status, error_type, "boom", {}, "boom"))

    def test_retry_after_header_rounds_up_with_minimum_one(self):
        for seconds, expected in [(0, "1"), (-5, "1"), (0.2, "1"), (1, "1"), (2.1, "3"),
                                  (5, "5"), (59.999, "60")]:
            with self.subTest(seconds=seconds):
                self.assertEqual(proxy.retry_after_header(seconds), {"retry-after": expected})

    def test_error_for_upstream_status_mapping(self):
        p, inv = proxy, (proxy.InvalidRequest, 400, "invalid_request_error", {})
        table = [  # upstream status, retry_after_s -> class, status, type, headers
            (429, None, p.RateLimited, 429, "rate_limit_error", {"retry-after": "5"}),
            (429, 12.2, p.RateLimited, 429, "rate_limit_error", {"retry-after": "13"}),
            (529, None, p.Overloaded, 529, "overloaded_error", {"retry-after": "5"}),
            (503, 3, p.Overloaded, 529, "overloaded_error", {"retry-after": "3"}),
            (401, None, p.AuthenticationFailed, 401, "authentication_error", {}),
            (403, None, p.PermissionDenied, 403, "permission_error", {}),
            (404, None, p.NotFound, 404, "not_found_error", {}),
            (413, None, p.RequestTooLarge, 413, "request_too_large", {}),
            (400, None, *inv), (409, None, *inv), (422, None, *inv),
            (504, None, p.GatewayTimeout, 504, "timeout_error", {}),
            (500, None, p.UpstreamError, 500, "api_error", {}),
            (502, None, p.UpstreamError, 500, "api_error", {})]
        for status, retry, cls, out, error_type, headers in table:
            with self.subTest(status=status, retry_after_s=retry):
                err = proxy.error_for_upstream_status(status, "no", retry)
                self.assertEqual((type(err), err.status, err.error_type, err.headers, err.message),
                                 (cls, out, error_type, headers, "no"))

    def test_error_to_anthropic_shape(self):
        err = proxy.RateLimited("slow down", {"retry-after": "5"})
        self.assertEqual(proxy.error_to_anthropic(err), {
            "type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}})
        self.assertEqual(proxy.error_to_anthropic(proxy.NotFound("nope"), "req_1"), {
            "type": "error", "error": {"type": "not_found_error", "message": "nope"},
            "request_id": "req_1"})


# =============================================================================
# 3. HTTP/1.1 wire format
# =============================================================================

class HttpWireTest(PureAssertions, unittest.TestCase):
    def test_valid_head_is_parsed(self):
        head = proxy.parse_request_head(raw_head(
            b"Host: localhost:3456", b"Content-Type:application/json", b"X-Api-Key:   k1  \t",
            b"X-Empty:", b"X-Tab: a\tb", b"X-Latin: caf\xe9", b"x-api-key: second",
            line=b"POST /v1/messages?beta=true HTTP/1.1"))
        self.assertEqual((head.method, head.target, head.path, head.version),
                         ("POST", "/v1/messages?beta=true", "/v1/messages", "HTTP/1.1"))
        self.assertEqual(head.headers, [
            ("host", "localhost:3456"), ("content-type", "application/json"), ("x-api-key", "k1"),
            ("x-empty", ""), ("x-tab", "a\tb"), ("x-latin", "café"), ("x-api-key", "second")])
        self.assertEqual((head.header("X-API-KEY"), head.header("nope", "dflt")), ("k1", "dflt"))

    def test_leading_empty_lines_are_ignored(self):
        head = proxy.parse_request_head(
            b"\r\n\r\nGET /v1/models HTTP/1.0\r\nHost: localhost\r\n\r\n")
        self.assertEqual((head.method, head.path, head.version, head.headers),
                         ("GET", "/v1/models", "HTTP/1.0", [("host", "localhost")]))

    def test_bad_request_line_version_method_and_target_are_400(self):
        table = {
            "Empty request line.": [b"", b"\r\n\r\n"],
            "Malformed request line.": [b"GET /", b"GET  / HTTP/1.1", b"GET / HTTP/1.1 x"],
            "Unsupported HTTP version.": [b"GET / HTTP/2.0", b"GET / HTTP/1", b"GET / http/1.1",
                                          b"GET / HTTP/1.1x", b"GET / HTTP/0.9"],
            "Malformed method.": [b"G(T / HTTP/1.1", b"GE\x01T / HTTP/1.1", b"G\xc9T / HTTP/1.1"],
            "Malformed request target.": [b"GET http://h/ HTTP/1.1", b"OPTIONS * HTTP/1.1",
                                          b"GET /a\x7fb HTTP/1.1"],
        }
        for message, lines in table.items():
            for line in lines:
                with self.subTest(line=line):
                    self.assertProxyError(INV, proxy.parse_request_head, line + b"\r\n\r\n",
                                          message=message)

    def test_folded_malformed_and_control_char_header_lines_are_400(self):
        table = {
            "Obsolete header line folding is not accepted.": [
                (b"X: a", b"  b"), (b"X: a", b"\tb"), (b" X: a",)],
            "Malformed header line.": [(b"No colon",), (b"X : a",), (b": a",), (b"X(y): a",)],
            "Control character in a header value.": [
                (b"X: a\x00b",), (b"X: a\x1bb",), (b"X: a\x7fb",), (b"X: a\nb",)],
        }
        for message, cases in table.items():
            for lines in cases:
                with self.subTest(lines=lines):
                    self.assertProxyError(INV, proxy.parse_request_head, raw_head(*lines),
                                          message=message)

    def test_too_many_headers_is_431(self):
        limit, too_large = proxy.MAX_HEADER_COUNT, (proxy.HeadersTooLarge, 431,
                                                    "invalid_request_error")
        ok = proxy.parse_request_head(raw_head(*[b"X-%d: v" % i for i in range(limit - 1)]))
        self.assertEqual(len(ok.headers), limit)        # with the Host header
        self.assertProxyError(too_large, proxy.parse_request_head,
                              raw_head(*[b"X-%d: v" % i for i in range(limit)]),
                              message=f"More than {limit} header fields.")

    def test_over_long_request_line_is_431(self):
        at_limit = b"GET /" + b"a" * (proxy.MAX_REQUEST_LINE - 14) + b" HTTP/1.1"
        self.assertEqual(len(at_limit), proxy.MAX_REQUEST_LINE)
        self.assertEqual(proxy.parse_request_head(at_limit + b"\r\nhost: localhost\r\n\r\n")
                         .method, "GET")
        self.assertProxyError((proxy.HeadersTooLarge, 431, "invalid_request_error"),
                              proxy.parse_request_head, b"GET /a" + at_limit[5:] + b"\r\n\r\n",
                              message="Request line too long.")

    def test_keep_alive_by_version_and_connection_header(self):
        table = [("HTTP/1.1", None, True), ("HTTP/1.1", "close", False),
                 ("HTTP/1.1", "Keep-Alive, Close", False), ("HTTP/1.1", "keep-alive", True),
                 ("HTTP/1.1", "upgrade", True), ("HTTP/1.0", None, False),
                 ("HTTP/1.0", "keep-alive", True), ("HTTP/1.0", "Upgrade, Keep-Alive", True),
                 ("HTTP/1.0", "close", False)]
        for version, connection, expected in table:
            with self.subTest(version=version, connection=connection):
                fields = [f"Connection: {connection}"] if connection else []
                self.assertIs(head_with(*fields, version=version).keep_alive, expected)

    def test_body_length_valid_framings(self):
        table = [((), 0), (("Content-Length: 42",), 42), (("Content-Length: 0",), 0),
                 (("Content-Length:  7 ",), 7), (("Content-Length: 5", "Content-Length: 5"), 5),
                 (("Content-Length: 5, 5",), 5), (("Transfer-Encoding: chunked",), None),
                 (("Transfer-Encoding: Chunked",), None)]
        for fields, expected in table:
            with self.subTest(fields=fields):
                self.assertEqual(proxy.body_length(head_with(*fields)), expected)

    def test_content_length_and_transfer_encoding_together_is_400(self):
        for fields in (("Transfer-Encoding: chunked", "Content-Length: 5"),
                       ("Content-Length: 5", "Transfer-Encoding: chunked")):
            with self.subTest(fields=fields):
                self.assertProxyError(INV, proxy.body_length, head_with(*fields),
                                      message="Both Transfer-Encoding and Content-Length "
                                              "are present.")

    def test_transfer_encoding_other_than_chunked_is_400(self):
        for fields in (("Transfer-Encoding: gzip",), ("Transfer-Encoding: gzip, chunked",),
                       ("Transfer-Encoding: identity",),
                       ("Transfer-Encoding: chunked", "Transfer-Encoding: chunked")):
            with self.subTest(fields=fields):
                self.assertProxyError(INV, proxy.body_length, head_with(*fields),
                                      message="Only Transfer-Encoding: chunked is supported.")

    def test_bad_or_differing_content_lengths_are_400(self):
        for values in (["5", "6"], ["5, 6"], ["abc"], ["-1"], ["+5"], [""], ["0x10"], ["1e3"],
                       ["5,"], ["1 2"]):
            with self.subTest(values=values):
                head = head_with(*[f"Content-Length: {v}" for v in values])
                self.assertProxyError(INV, proxy.body_length, head,
                                      message="Invalid Content-Length.")

    def test_content_length_with_superscript_digit_is_400(self):
        head = proxy.parse_request_head(raw_head(b"Content-Length: \xb2"))
        self.assertProxyError(INV, proxy.body_length, head, message="Invalid Content-Length.")

    CHUNKED = (b"5\r\nhello\r\n6;ext=1;q=\"x\"\r\n world\r\nA\r\n0123456789\r\n"
               b"0\r\nX-Trailer: t\r\n\r\n")
    NEXT = b"GET /v1/models HTTP/1.1\r\n\r\n"

    def test_chunked_decoder_whole_and_one_byte_at_a_time_keeps_pipelined_leftover(self):
        data = self.CHUNKED + self.NEXT      # chunk extensions, a trailer, then a next request
        for step in (len(data), 1):
            with self.subTest(step=step):
                dec, out = proxy.ChunkedDecoder(max_bytes=1000), bytearray()
                for i in range(0, len(data), step):
                    out += dec.feed(data[i:i + step])
                    self.assertEqual(dec.done, i + step >= len(self.CHUNKED), i)
                self.assertEqual((bytes(out), dec.size, dec.leftover),
                                 (b"hello world0123456789", 21, self.NEXT))

    def test_chunked_decoder_partial_input_is_not_done(self):
        dec = proxy.ChunkedDecoder(max_bytes=1000)
        self.assertEqual((dec.feed(b"5\r\nhel"), dec.done), (b"hel", False))
        self.assertEqual((dec.feed(b"lo\r\n0\r\n"), dec.done), (b"lo", False))   # no blank line
        self.assertEqual((dec.feed(b"\r\n"), dec.done, dec.leftover), (b"", True, b""))

    def test_chunked_decoder_bad_framing_is_400(self):
        table = {"Malformed chunk size.": [b"zz\r\n", b"\r\n", b"-1\r\n", b"0x5\r\n",
                                           b";ext\r\n", b"1" * 17 + b"\r\n"],
                 "Malformed chunk: data longer than its size.": [b"3\r\nabcd\r\n0\r\n\r\n"],
                 "Chunk line too long.": [b"1" * (proxy.MAX_REQUEST_LINE + 1)]}
        for message, cases in table.items():
            for data in cases:
                for step in (len(data), 1):          # all at once, then one byte at a time
                    with self.subTest(data=data[:24], step=step):
                        dec = proxy.ChunkedDecoder(max_bytes=10 ** 20)
                        pieces = [data[i:i + step] for i in range(0, len(data), step)]
                        self.assertProxyError(INV, lambda: [dec.feed(p) for p in pieces],
                                              message=message)

    def test_chunked_decoder_over_max_bytes_is_413(self):
        ok = proxy.ChunkedDecoder(max_bytes=10)
        self.assertEqual(ok.feed(b"6\r\nabcdef\r\n4\r\nghij\r\n0\r\n\r\n"), b"abcdefghij")
        dec = proxy.ChunkedDecoder(max_bytes=10)
        self.assertEqual(dec.feed(b"6\r\nabcdef\r\n"), b"abcdef")
        self.assertProxyError((proxy.RequestTooLarge, 413, "request_too_large"), dec.feed,
                              b"5\r\n", message="Request body exceeds 10 bytes.")

    def test_encode_response_head(self):
        table = [(200, [("content-type", "application/json"), ("content-length", "2")],
                  b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                  b"content-length: 2\r\n\r\n"),
                 (529, [("retry-after", "5")],
                  b"HTTP/1.1 529 Overloaded\r\nretry-after: 5\r\n\r\n"),
                 (431, [], b"HTTP/1.1 431 Request Header Fields Too Large\r\n\r\n"),
                 (299, [], b"HTTP/1.1 299 Status\r\n\r\n")]
        for status, headers, expected in table:
            with self.subTest(status=status):
                self.assertEqual(proxy.encode_response_head(status, headers), expected)

    def test_encode_chunk(self):
        for data, expected in [(b"hello", b"5\r\nhello\r\n"), (b"", b"0\r\n\r\n"),
                               (b"x" * 16, b"10\r\n" + b"x" * 16 + b"\r\n")]:
            with self.subTest(data=data):
                self.assertEqual(proxy.encode_chunk(data), expected)


# =============================================================================
# 4. SSE
# =============================================================================

class SseTest(unittest.TestCase):
    def test_encode_sse_with_and_without_event_name(self):
        table = [
            (({"type": "ping"}, "ping"), b'event: ping\ndata: {"type":"ping"}\n\n'),
            (({"a": 1, "b": [1, 2]},), b'data: {"a":1,"b":[1,2]}\n\n'),
            (("[DONE]",), b"data: [DONE]\n\n"),
            (({"t": "line\nbreak"}, "x"), b'event: x\ndata: {"t":"line\\nbreak"}\n\n'),
            (({"t": "h\u00e9llo \u65e5\u672c \U0001f600"}, "content_block_delta"),
             'event: content_block_delta\ndata: {"t":"h\u00e9llo \u65e5\u672c \U0001f600"}\n\n'
             .encode("utf-8")),            # unicode kept as UTF-8, not \\u escapes
        ]
        for args, expected in table:
            with self.subTest(args=args):
                self.assertEqual(proxy.encode_sse(*args), expected)


# =============================================================================
# 5. Auth and models
# =============================================================================

class AuthAndModelsTest(PureAssertions, unittest.TestCase):
    def test_request_api_key(self):
        table = [((), None), ((b"X-Api-Key: k1",), "k1"), ((b"Authorization: Bearer k2",), "k2"),
                 ((b"authorization: bearer  k2 ",), "k2"),
                 ((b"X-Api-Key: k1", b"Authorization: Bearer k2"), "k1"),
                 ((b"X-Api-Key:", b"Authorization: Bearer k2"), "k2"),
                 ((b"Authorization: Bearer",), None), ((b"Authorization: Basic k3",), None)]
        for lines, expected in table:
            with self.subTest(lines=lines):
                head = proxy.parse_request_head(raw_head(*lines))
                self.assertEqual(proxy.request_api_key(head), expected)
        # A browser sends the key as Basic auth's password, for GETs only.
        basic = [("user:k3", "GET", "k3"), (":k3", "HEAD", "k3"), ("a:b:c", "GET", "b:c"),
                 ("user:", "GET", None), ("k3", "GET", None), (":k3", "POST", None),
                 (":k3", "DELETE", None)]
        for credentials, method, expected in basic:
            with self.subTest(credentials=credentials, method=method):
                token = base64.b64encode(credentials.encode()).decode()
                head = proxy.parse_request_head(raw_head(
                    f"Authorization: Basic {token}".encode(),
                    line=f"{method} /status HTTP/1.1".encode()))
                self.assertEqual(proxy.request_api_key(head), expected)
        head = proxy.parse_request_head(raw_head(b"Authorization: Basic %%%",
                                                 line=b"GET / HTTP/1.1"))
        self.assertIsNone(proxy.request_api_key(head))

    def test_check_api_key(self):
        missing = "Missing API key: send it as x-api-key or Authorization: Bearer."
        table = [  # header lines, configured key, expected 401 message or None
            ((b"X-Api-Key: sekret",), "sekret", None),
            ((b"Authorization: Bearer sekret",), "sekret", None),
            ((b"Authorization: bearer sekret",), "sekret", None),
            ((b"X-Api-Key: wrong",), "sekret", "Invalid API key."),
            ((b"X-Api-Key: SEKRET",), "sekret", "Invalid API key."),
            ((b"Authorization: Bearer wrong",), "sekret", "Invalid API key."),
            ((), "sekret", missing), ((b"Authorization: Basic sekret",), "sekret", missing),
            # Any text may be a key: the client sends its UTF-8 bytes.
            (("X-Api-Key: clé-ключ".encode(),), "clé-ключ", None),
            (("X-Api-Key: clé".encode("latin-1"),), "clé", "Invalid API key."),
            (("X-Api-Key: à".encode(),), "à", None)]     # its last byte is latin-1's NBSP
        for lines, expected_key, message in table:
            with self.subTest(lines=lines, expected=expected_key):
                head = proxy.parse_request_head(raw_head(*lines))
                names = {proxy.key_digest(expected_key.encode()): "app",
                         proxy.key_digest(b"other"): "other"}
                if message is None:
                    self.assertEqual(proxy.check_api_key(head, names), "app")
                else:
                    err = self.assertProxyError(
                        (proxy.AuthenticationFailed, 401, "authentication_error"),
                        proxy.check_api_key, head, names, message=message)
                    self.assertEqual(err.headers, {})       # a POST: no Basic challenge
        get = proxy.parse_request_head(raw_head(line=b"GET / HTTP/1.1"))
        err = self.assertProxyError((proxy.AuthenticationFailed, 401, "authentication_error"),
                                    proxy.check_api_key, get, {})
        self.assertEqual(err.headers["www-authenticate"],
                         'Basic realm="claude-sdk-proxy", charset="UTF-8"')

    def test_a_key_file_names_its_keys(self):
        k1, k2, k3 = "sk-aider-1111111111", "sk-ow-222222222222", "x" * 16
        self.assertEqual(proxy.parse_keys(f"# apps\n\naider  {k1}\n open-webui {k2} \n"
                                          f"laptop\t{k3}\n"),
                         {"aider": k1, "open-webui": k2, "laptop": k3})
        missing = "the key after the name is missing, shorter than 16 characters or has a space"
        table = [(f"{k1}", f"line 1: {missing}"),           # a key alone: never shown
                 (f"{k1} aider", f"line 1: {missing}"),     # the wrong order
                 (f"a {k1}\nb {k2} c", f"line 2: {missing}"),
                 ("a sk-short", f"line 1: {missing}"),
                 (f"-x {k1}", "line 1: a name is letters"), ("n" * 65 + f" {k1}", "line 1: a name"),
                 (f"a {k1}\nb {k2}\na {k3}", "line 3: its name is used twice"),
                 (f"a {k1}\n#\nb {k1}", "line 3: the same key as another name"),
                 ("", "no keys in it"), ("# all revoked\n\n", "no keys in it")]
        for text, message in table:
            with self.subTest(text=text), self.assertRaises(ValueError) as cm:
                proxy.parse_keys(text)
            self.assertTrue(str(cm.exception).startswith(message), cm.exception)
            for key in (k1, k2, k3):
                self.assertNotIn(key, str(cm.exception))

    def test_a_keyless_proxy_answers_programs_on_this_machine_not_web_pages(self):
        refused = (proxy.PermissionDenied, 403, "permission_error")
        table = [  # header lines, answered
            ((b"Host: 127.0.0.1:3456",), True), ((b"Host: localhost",), True),
            ((b"Host: [::1]:3456",), True), ((b"Host: 127.8.9.10",), True),
            ((b"Host: LOCALHOST:3456", b"Origin: http://localhost:5173"), True),
            ((b"Host: 127.0.0.1:3456", b"Origin: http://127.0.0.1:8080"), True),
            # A cross-site page (CSRF) and a name rebound to 127.0.0.1 (DNS rebinding).
            ((b"Host: 127.0.0.1:3456", b"Origin: https://evil.example"), False),
            ((b"Host: evil.example:3456", b"Origin: http://evil.example:3456"), False),
            ((b"Host: evil.example:3456",), False),
            ((b"Host: 127.0.0.1:3456", b"Origin: null"), False),     # a sandboxed page
            ((b"Host: 127.0.0.1.evil.example",), False),
            ((b"Host: evil.local",), False),
            # Names no one can register, addresses, and apps' own origins.
            ((b"Host: host.docker.internal:3456",), True), ((b"Host: localhost.",), True),
            ((b"Host: app.localhost",), True), ((b"Host: 192.168.1.5:3456",), True),
            ((b"Host: 0.0.0.0:3456",), True), ((b"Host: [::ffff:127.0.0.1]:3456",), True),
            ((b"Host:",), True), ((b"Host: localhost", b"Origin: app://obsidian.md"), True),
            ((b"Host: localhost", b"Origin: vscode-webview://abc"), True),
            ((b"Host: localhost", b"Origin: HTTPS://evil.example"), False),
            # Pages from the names a Host may have (a dev server, a container's host).
            ((b"Host: localhost", b"Origin: http://app.localhost:5173"), True),
            ((b"Host: localhost", b"Origin: http://localhost.:3000"), True),
            ((b"Host: localhost", b"Origin: http://host.docker.internal"), True),
            ((b"Host: localhost", b"Origin: http://[::ffff:127.0.0.1]"), True),
            ((b"Host: localhost", b"Origin: http://[::ffff:10.0.0.1]"), False)]
        for lines, answered in table:
            with self.subTest(lines=lines):
                head = proxy.parse_request_head(raw_head(*lines))
                if answered:
                    self.assertIsNone(proxy.check_local_caller(head))
                else:
                    self.assertProxyError(refused, proxy.check_local_caller, head)
        old = proxy.parse_request_head(b"GET / HTTP/1.0\r\n\r\n")     # no Host at all
        self.assertIsNone(proxy.check_local_caller(old))
        for host in (b"evil.com@127.0.0.1", b"127.0.0.1#evil.com", b"[::1]evil.com", b"[::1",
                     b"a b", b"127.0.0.1:80:80", b"127.0.0.1/x"):
            with self.subTest(host=host):       # not a host: a 400 before any check
                self.assertProxyError(INV, proxy.parse_request_head, raw_head(b"Host: " + host))

    def test_resolve_model(self):
        table = [("claude-opus-4-1-20250805", "sonnet", "claude-opus-4-1-20250805"),
                 ("claude-sonnet-4-5", "sonnet", "claude-sonnet-4-5"),
                 ("claude-3-5-haiku-latest", "sonnet", "claude-3-5-haiku-latest"),
                 ("claude-sonnet-4-5[1m]", "sonnet", "claude-sonnet-4-5[1m]"),
                 ("  claude-sonnet-4-5 ", "sonnet", "claude-sonnet-4-5"),
                 ("gpt-4o", "sonnet", "sonnet"), ("gpt-4o", "opus", "opus"),
                 ("claude-instant-1", "haiku", "haiku"), ("my-opus-thing", "sonnet", "opus"),
                 ("HAIKU", "sonnet", "haiku"), ("sonnet", "opus", "sonnet")]
        for requested, default, expected in table:
            with self.subTest(requested=requested, default=default):
                self.assertEqual(proxy.resolve_model(requested, default), expected)

    def test_models_list_shape(self):
        page = proxy.models_list()
        self.assertEqual(set(page), {"object", "data", "has_more", "first_id", "last_id"})
        self.assertEqual((page["object"], page["has_more"], page["first_id"], page["last_id"]),
                         ("list", False, page["data"][0]["id"], page["data"][-1]["id"]))
        self.assertEqual(len(page["data"]), len(proxy.MODEL_LIST))
        for entry, (model_id, name, created_at) in zip(page["data"], proxy.MODEL_LIST):
            with self.subTest(model=model_id):
                created = int(dt.datetime.fromisoformat(created_at.replace("Z", "+00:00"))
                              .timestamp())
                self.assertEqual(entry, {"type": "model", "id": model_id, "display_name": name,
                                         "created_at": created_at, "object": "model",
                                         "created": created, "owned_by": "anthropic"})

    def test_model_lookup_listed_and_pass_through_ids(self):
        listed = proxy.models_list()["data"][-1]
        self.assertEqual(proxy.model_lookup(listed["id"]), listed)
        self.assertEqual(proxy.model_lookup("claude-opus-4-1-20250805"), {
            "type": "model", "id": "claude-opus-4-1-20250805",
            "display_name": "Claude Opus 4.1", "created_at": "2025-08-05T00:00:00Z",
            "object": "model", "created": 1754352000, "owned_by": "anthropic"})
        for model_id, name in (("claude-opus-4-7", "Claude Opus 4.7"),
                               ("claude-sonnet-4-6[1m]", "Claude Sonnet 4.6"),
                               ("claude-3-7-sonnet-20250219", "Claude Sonnet 3.7")):
            with self.subTest(model_id=model_id):
                entry = proxy.model_lookup(model_id)
                self.assertEqual(entry["display_name"], name)
                self.assertGreater(entry["created"], 1700000000)    # never 1970

    def test_model_lookup_unknown_is_404(self):
        for model_id in ("gpt-4o", "claude-instant-1", "opus", ""):
            with self.subTest(model_id=model_id):
                self.assertProxyError((proxy.NotFound, 404, "not_found_error"),
                                      proxy.model_lookup, model_id, message=f"model: {model_id}")


class AuthTest(ApiAssertions, unittest.TestCase):
    KEY = "proxy-secret-key-for-tests"

    @classmethod
    def setUpClass(cls):
        cls.proxy = ProxyThread(api_key=cls.KEY)

    @classmethod
    def tearDownClass(cls):
        cls.proxy.stop()

    def test_missing_or_wrong_key_is_401_and_reaches_nothing(self):
        UPSTREAM.clear()
        for key in ("wrong-key", "x" + self.KEY):
            with self.subTest(key=key):
                with self.assertRaises(anthropic.AuthenticationError) as caught:
                    self.proxy.client(api_key=key).models.list()
                self.assertApiError(caught.exception, 401, "authentication_error")
        raw = raw_exchange(self.proxy.port, b"POST /v1/messages HTTP/1.1\r\nhost: localhost\r\n"
                                            b"content-length: 2\r\n\r\n{}")
        self.assertTrue(raw.startswith(b"HTTP/1.1 401 "), raw[:40])
        self.assertEqual(UPSTREAM.messages_requests(), [])

    def test_openai_clients_use_the_key_as_bearer_and_get_openai_errors(self):
        def chat(key):
            return self.proxy.openai_client(api_key=key).chat.completions.create(
                model="sonnet", messages=[{"role": "user", "content": "hi"}])
        with self.assertRaises(openai.AuthenticationError) as caught:
            chat("wrong-key")
        self.assertEqual(caught.exception.body["type"], "authentication_error")
        self.assertEqual(chat(self.KEY).choices[0].message.content, UPSTREAM_TEXT)

    def test_key_as_x_api_key_or_bearer_is_accepted(self):
        self.assertTrue(list(self.proxy.client(api_key=self.KEY).models.list()))
        bearer = anthropic.Anthropic(base_url=self.proxy.url, auth_token=self.KEY,
                                     max_retries=0, timeout=CLIENT_TIMEOUT)
        self.assertTrue(list(bearer.models.list()))

    def test_without_the_key_only_liveness_is_answered_and_no_route_is_shown(self):
        def get(line, *headers):
            return read_response(io.BytesIO(raw_exchange(self.proxy.port, b"\r\n".join(
                (line, b"host: localhost", b"connection: close", *headers, b"", b"")))))
        status, _, body = get(b"GET / HTTP/1.1")
        self.assertEqual((status, json.loads(body)), (200, {"status": "ok"}))
        status, _, body = get(b"GET / HTTP/1.1", b"x-api-key: " + self.KEY.encode())
        self.assertEqual((status, json.loads(body)["service"]), (200, "claude-sdk-proxy"))
        for line in (b"GET /no/such/route HTTP/1.1", b"PUT /v1/messages HTTP/1.1",
                     b"GET /sessions HTTP/1.1"):
            with self.subTest(line=line):
                status, headers, _ = get(line)
                self.assertEqual(status, 401)       # not 404/405: routes stay unlisted
                self.assertNotIn("allow", headers)

    def test_browser_apps_get_cors_with_the_key(self):
        # What TypingMind and any web chat app do: a preflight, then the real request.
        origin = b"https://chat.example"
        status, headers, body = read_response(io.BytesIO(raw_exchange(
            self.proxy.port, b"\r\n".join((
                b"OPTIONS /v1/messages HTTP/1.1", b"host: localhost", b"origin: " + origin,
                b"access-control-request-method: POST",
                b"access-control-request-headers: content-type,x-api-key,anthropic-version,"
                b"anthropic-dangerous-direct-browser-access",
                b"connection: close", b"", b"")))))
        self.assertEqual((status, body), (204, b""))
        self.assertEqual(headers["access-control-allow-origin"], origin.decode())
        self.assertIn("POST", headers["access-control-allow-methods"])
        self.assertIn("x-api-key", headers["access-control-allow-headers"])
        self.assertNotIn("content-length", headers)
        UPSTREAM.clear()
        status, headers, body = post_raw(
            self.proxy.port, "/v1/messages", {"model": "sonnet", "max_tokens": 10, "messages": [
                {"role": "user", "content": "from a browser"}]},
            "origin: https://chat.example", f"x-api-key: {self.KEY}",
            "anthropic-dangerous-direct-browser-access: true")
        self.assertEqual(status, 200)
        self.assertEqual(headers["access-control-allow-origin"], "https://chat.example")
        self.assertEqual(json.loads(body)["content"][0]["text"], UPSTREAM_TEXT)
        status, headers, _ = post_raw(self.proxy.port, "/v1/messages", {},
                                      "origin: https://chat.example", "x-api-key: wrong")
        self.assertEqual(status, 401)       # and the app can read why
        self.assertEqual(headers["access-control-allow-origin"], "https://chat.example")
        self.assertEqual(len(UPSTREAM.messages_requests()), 1)

    def test_web_pages_cannot_use_a_keyless_proxy_but_may_bring_the_key(self):
        keyless = ProxyThread()
        self.addCleanup(keyless.stop)
        UPSTREAM.clear()
        body = json.dumps({"model": "claude-sonnet-5-5", "max_tokens": 10, "messages": [
            {"role": "user", "content": "from a web page"}]}).encode()

        def browser_post(port, host, origin, *extra):
            # What a page's fetch() sends: text/plain needs no CORS preflight.
            return raw_exchange(port, b"\r\n".join((
                b"POST /v1/messages HTTP/1.1", b"Host: " + host, b"Origin: " + origin,
                b"Content-Type: text/plain;charset=UTF-8", b"Connection: close", *extra,
                b"Content-Length: %d" % len(body), b"", body)), timeout=60)
        local = b"127.0.0.1:%d" % keyless.port
        for host, origin in ((local, b"https://evil.example"),           # cross-site POST
                             (b"evil.example:%d" % keyless.port,          # DNS rebinding
                              b"http://evil.example:%d" % keyless.port)):
            with self.subTest(host=host, origin=origin):
                status, _, answer = read_response(io.BytesIO(
                    browser_post(keyless.port, host, origin)))
                self.assertEqual(status, 403)
                self.assertEqual(json.loads(answer)["error"]["type"], "permission_error")
        self.assertEqual(UPSTREAM.messages_requests(), [], "nothing reached the upstream")
        local_page = browser_post(keyless.port, local, b"http://localhost:5173")
        self.assertTrue(local_page.startswith(b"HTTP/1.1 200 "), local_page[:60])
        self.assertIn(b"access-control-allow-origin: http://localhost:5173", local_page)
        UPSTREAM.clear()
        page_with_key = browser_post(self.proxy.port, b"127.0.0.1:%d" % self.proxy.port,
                                     b"https://my-app.example", b"x-api-key: " + self.KEY.encode())
        self.assertTrue(page_with_key.startswith(b"HTTP/1.1 200 "), page_with_key[:60])
        self.assertEqual(len(UPSTREAM.messages_requests()), 1)


# =============================================================================
# 6. Messages API requests
# =============================================================================

def valid_body(**changes) -> dict:
    """A valid Messages request; a change to `...` deletes that key."""
    body = {"model": "claude-sonnet-4-5", "max_tokens": 4096,
            "messages": [{"role": "user", "content": "hi"},
                         {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
                         {"role": "user", "content": [{"type": "text", "text": "again"}]}]}
    return {k: v for k, v in {**body, **changes}.items() if v is not ...}


SID = "12345678-1234-5678-1234-567812345678"


NOW = dt.datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=dt.timezone.utc)


U, A = "user", "assistant"


class AnthropicTranslationTest(PureAssertions, unittest.TestCase):
    def test_valid_request_becomes_a_turn(self):
        thinking = {"type": "enabled", "budget_tokens": 1024}
        body = valid_body(system=[{"type": "text", "text": "A"}, {"type": "text", "text": "B"}],
                          temperature=0.5, top_p=0.9, top_k=40, stop_sequences=["END"],
                          thinking=thinking, service_tier="auto", stream=True,
                          metadata={"user_id": "u"}, tools=[], mcp_servers=[])
        before = copy.deepcopy(body)
        turn = proxy.messages_request_to_turn(body, "haiku", caller="tester")
        self.assertEqual(body, before)
        self.assertEqual((turn.model, turn.system, turn.stream, turn.caller, turn.history),
                         ("claude-sonnet-4-5", "A\n\nB", True, "tester/u", body["messages"][:2]))
        self.assertEqual(turn.prompt, {"role": U, "content": [{"type": "text", "text": "again"}]})
        self.assertEqual(turn.params, {"max_tokens": 4096, "temperature": 0.5, "top_p": 0.9,
                                       "top_k": 40, "stop_sequences": ["END"],
                                       "thinking": thinking, "service_tier": "auto"})

    def test_turn_defaults_model_mapping_and_string_system(self):
        turn = proxy.messages_request_to_turn(
            valid_body(model="gpt-4o", system="Be brief.", temperature=None,
                       messages=[{"role": "user", "content": "only"}]), "opus")
        self.assertEqual((turn.model, turn.system, turn.history, turn.prompt, turn.params,
                          turn.stream, turn.caller),
                         ("opus", "Be brief.", [], {"role": "user", "content": "only"},
                          {"max_tokens": 4096}, False, ""))
        self.assertEqual(proxy.messages_request_to_turn(valid_body(), "sonnet").system, "")

    def test_thinking_disabled_is_not_carried(self):
        body = valid_body(thinking={"type": "disabled"})
        self.assertEqual(proxy.messages_request_to_turn(body, "s").params, {"max_tokens": 4096})
        self.assertEqual(body["thinking"], {"type": "disabled"})
        adaptive = proxy.messages_request_to_turn(valid_body(thinking={"type": "adaptive"}), "s")
        self.assertEqual(adaptive.params["thinking"], {"type": "adaptive"})

    def test_invalid_requests_are_400_naming_the_field(self):
        def msgs(*pairs):
            return {"messages": [{"role": r, "content": c} for r, c in pairs]}
        tool_use = {"type": "tool_use", "id": "t", "name": "n", "input": {}}
        table = [
            ({"model": ...}, "model: required, a string."), ({"model": "  "}, "model: required"),
            ({"model": 5}, "model: required"),
            ({"messages": ...}, "messages: required, a non-empty list."),
            ({"messages": []}, "messages: required"), ({"messages": "hi"}, "messages: required"),
            ({"messages": ["hi"]}, "messages.0: must be an object."),
            (msgs(("bot", "x")), "messages.0.role: must be 'user', 'assistant' or 'system'."),
            (msgs(("system", "x")), "messages: the last message must have role 'user'"),
            ({"messages": [{"role": U}]}, "messages.0.content: required."),
            (msgs((U, 5)), "messages.0.content: must be a string or a list of content blocks."),
            (msgs((U, [tool_use])),
             "messages.0.content.0.type: 'tool_use' is not a valid block in a message with role 'user'."),
            (msgs((A, [{"type": "image"}]), (U, "x")), "messages.0.content.0.type: 'image'"),
            (msgs((U, ["text"])), "messages.0.content.0: must be an object with a type."),
            (msgs((U, [{"type": "text"}])), "messages.0.content.0.text: must be a string."),
            (msgs((U, [{"type": "tool_result", "tool_use_id": "t", "is_error": True, "content": [
                {"type": "text", "text": "x"}, {"type": "image", "source": {"type": "url",
                                                                          "url": "u"}}]}])),
             "messages.0.content.0.content: all content must be type 'text' if 'is_error' is"),
            (msgs((U, [{"type": "image", "source": {"type": "ftp"}}])),
             "messages.0.content.0.source:"),
            (msgs((U, "q"), (A, "The")), "messages: the last message must have role 'user'"),
            # The API's rules for text: the CLI would send "(no content)" or drop it.
            (msgs((U, "")), "messages: text content blocks must be non-empty"),
            (msgs((U, "  \n")), "messages: text content blocks must contain non-whitespace"),
            (msgs((U, [])), "messages.0: all messages must have non-empty content"),
            (msgs((U, "q"), (A, [{"type": "text", "text": "\n\n"}]), (U, "r")),
             "messages: text content blocks must contain non-whitespace text"),
            (msgs((U, [{"type": "text", "text": ""}, {"type": "text", "text": "q"}])),
             "messages: text content blocks must be non-empty"),
            ({"max_tokens": ...}, "max_tokens: required, an integer of at least 1."),
            ({"max_tokens": 0}, "max_tokens: required"), ({"max_tokens": 1.5}, "max_tokens:"),
            ({"max_tokens": True}, "max_tokens:"), ({"max_tokens": "10"}, "max_tokens:"),
            ({"temperature": 2}, "temperature: must be a number between 0 and 1."),
            ({"temperature": -0.1}, "temperature:"), ({"temperature": "0.5"}, "temperature:"),
            ({"temperature": True}, "temperature:"), ({"top_p": 1.5}, "top_p:"),
            ({"top_k": -1}, "top_k:"), ({"top_k": 1.5}, "top_k:"),
            ({"stop_sequences": "END"}, "stop_sequences:"), ({"stop_sequences": [""]}, "stop_seq"),
            ({"stream": "true"}, "stream: must be a boolean."), ({"stream": 1}, "stream:"),
            ({"thinking": {"type": "on"}}, "thinking.type:"), ({"thinking": "on"}, "thinking.typ"),
            ({"thinking": {"type": "enabled", "budget_tokens": 1023}},
             "thinking.budget_tokens: an integer of at least 1024."),
            ({"thinking": {"type": "enabled"}}, "thinking.budget_tokens:"),
            ({"thinking": {"type": "enabled", "budget_tokens": 4096}},
             "max_tokens: must be greater than thinking.budget_tokens."),
            ({"system": [{"type": "image"}]}, "system.0: must be a text block."),
            ({"system": [{"type": "text", "text": "a"}, {"type": "text"}]}, "system.1: must be"),
            ({"system": 5}, "system: must be a string or a list of text blocks."),
            ({"tools": {"name": "t"}}, "tools: must be a list."),
            ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]},
             "tools.0.type: 'web_search_20250305' is a server tool"),
            ({"tools": [{"name": "bad name", "input_schema": {"type": "object"}}]},
             "tools.0.name: must be 1-64"),
            ({"tools": [{"name": "x" * 65, "input_schema": {"type": "object"}}]},
             "tools.0.name: must be 1-64"),
            ({"tools": [{"name": "t", "input_schema": {"type": "object"}}] * 2},
             "tools.1.name: 't' is used twice."),
            ({"tools": [{"name": "t", "input_schema": {"type": "string"}}]},
             "tools.0.input_schema: must be a JSON schema with type 'object'."),
            ({"tools": [{"name": "t", "description": 3, "input_schema": {"type": "object"}}]},
             "tools.0.description: must be a string."),
            ({"tool_choice": {"type": "sometimes"}}, "tool_choice.type: must be"),
            ({"tool_choice": {"type": "any"}}, "tool_choice.type: 'any' needs tools."),
            ({"tools": [{"name": "t", "input_schema": {"type": "object"}}],
              "tool_choice": {"type": "tool", "name": "u"}},
             "tool_choice.name: must name one of the request's tools."),
            ({"tool_choice": {"type": "auto", "disable_parallel_tool_use": "yes"}},
             "tool_choice.disable_parallel_tool_use: must be a boolean."),
            ({"metadata": "x"}, "metadata: must be an object."),
            ({"service_tier": "priority"}, "service_tier:")]
        for changes, prefix in table:
            with self.subTest(changes=changes):
                self.assertProxyError(INV, proxy.messages_request_to_turn, valid_body(**changes),
                                      "sonnet", prefix=prefix)

    def test_tool_results_answer_the_calls_just_before_as_the_api_requires(self):
        def call(tool_id):
            return {"type": "tool_use", "id": tool_id, "name": "t", "input": {}}

        def result(tool_id):
            return {"type": "tool_result", "tool_use_id": tool_id, "content": "r"}
        text = {"type": "text", "text": "and"}
        missing = "messages.1: `tool_use` ids were found without `tool_result` blocks " \
                  "immediately after: {}. Each `tool_use` block must have a corresponding " \
                  "`tool_result` block in the next message."
        unexpected = "messages.{}.content.{}: unexpected `tool_use_id` found in " \
                     "`tool_result` blocks: {}. Each `tool_result` block must have a " \
                     "corresponding `tool_use` block in the previous message."
        table = [  # the conversation after the first user turn; the 400, or None
            ([(A, [call("a"), call("b")]), (U, [result("b"), result("a"), text])], None),
            ([(A, [call("a")]), (U, [result("a")]), (U, "more")], None),      # merged
            ([(A, [call("a"), call("b")]), (U, [result("a")])], missing.format("b")),
            ([(A, [call("a")]), (U, [text, result("a")])], missing.format("a")),
            ([(A, [call("a")]), (U, "no result")], missing.format("a")),
            ([(A, [call("a")]), (U, [result("a"), result("z")])],
             unexpected.format(2, 1, "z")),
            ([(A, "no call"), (U, [result("a")])], unexpected.format(2, 0, "a")),
            ([(U, [result("a")])], unexpected.format(0, 1, "a"))]     # merged into turn 0
        for conversation, message in table:
            with self.subTest(conversation=conversation):
                body = valid_body(messages=[{"role": role, "content": content} for role, content
                                            in [(U, "q"), *conversation]])
                if message is None:
                    proxy.messages_request_to_turn(body, "sonnet")
                else:
                    self.assertProxyError(INV, proxy.messages_request_to_turn, body, "sonnet",
                                          message=message)

    def test_tools_and_tool_choice_are_carried_under_upstream_names(self):
        tools = [{"name": "get_weather", "input_schema": {"type": "object"}},
                 {"name": "y" * 64, "description": "long", "input_schema": {"type": "object"}}]
        turn = proxy.messages_request_to_turn(valid_body(
            tools=tools, tool_choice={"type": "tool", "name": "y" * 64}), "sonnet")
        self.assertEqual(turn.tools, tools)
        long_name = proxy.upstream_tool_name("y" * 64)
        self.assertEqual(turn.params["tool_choice"], {"type": "tool", "name": long_name})
        self.assertEqual(proxy.upstream_tool_name("get_weather"), "mcp__c__get_weather")
        self.assertEqual(len(long_name), 64)
        self.assertNotEqual(long_name, proxy.upstream_tool_name("y" * 63 + "z"))
        self.assertEqual(proxy.client_tool_names(tools),
                         {"mcp__c__get_weather": "get_weather", long_name: "y" * 64})
        self.assertNotEqual(turn.shape, proxy.messages_request_to_turn(valid_body(), "sonnet").shape)

    def test_system_messages_join_the_system_prompt_and_their_neighbours_merge(self):
        turn = proxy.messages_request_to_turn(valid_body(system="Top.", messages=[
            {"role": "user", "content": "one"},
            {"role": "system", "content": [{"type": "text", "text": "Env note."}]},
            {"role": "user", "content": [{"type": "text", "text": "two"}]}]), "sonnet")
        self.assertEqual(turn.system, "Top.\n\nEnv note.")
        self.assertEqual(turn.history, [])
        self.assertEqual(turn.prompt["content"], [{"type": "text", "text": "one"},
                                                  {"type": "text", "text": "two"}])

    def test_prompt_in_transcript_only_for_tool_results_after_history(self):
        result = [{"type": "tool_result", "tool_use_id": "t", "content": "x"}]
        for history, content, expected in [
                ([{"role": "assistant", "content": "a"}], result, True),
                ([], result, False),
                ([{"role": "assistant", "content": "a"}], "text", False),
                ([{"role": "assistant", "content": "a"}],
                 [{"type": "text", "text": "t"}] + result, False)]:
            turn = proxy.Turn("m", "", history, {"role": "user", "content": content}, {})
            self.assertEqual(proxy.prompt_in_transcript(turn), expected, (history, content))

    def test_tool_use_renaming_both_ways(self):
        names = {"mcp__c__t": "t"}
        start = {"type": "content_block_start", "index": 1, "content_block": {
            "type": "tool_use", "id": "toolu_1", "name": "mcp__c__t", "input": {}}}
        self.assertEqual(proxy.client_event(start, names)["content_block"]["name"], "t")
        self.assertEqual(start["content_block"]["name"], "mcp__c__t", "input left alone")
        text = {"type": "content_block_start", "index": 0,
                "content_block": {"type": "text", "text": ""}}
        self.assertIs(proxy.client_event(text, names), text)
        history = [{"role": "user", "content": "q"},
                   {"role": "assistant", "content": [{"type": "text", "text": "a"}, {
                       "type": "tool_use", "id": "toolu_1", "name": "t", "input": {}}, {
                       "type": "tool_use", "id": "toolu_2", "name": "gone", "input": {}}]}]
        renamed = proxy.rename_tool_uses(history, {"t": "mcp__c__t"})
        self.assertEqual([b.get("name") for b in renamed[1]["content"]],
                         [None, "mcp__c__t", "gone"])
        self.assertEqual(history[1]["content"][1]["name"], "t", "input left alone")

    def test_tool_results_for_a_parked_turn(self):
        png = base64.b64encode(png_bytes(2, 2)).decode()
        prompt = {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "a", "content": "no", "is_error": True},
            {"type": "tool_result", "tool_use_id": "b", "content": [
                {"type": "text", "text": "chart"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": png}}]}]}
        self.assertEqual(proxy.tool_results(prompt, ["b", "a"]), {
            "a": {"content": [{"type": "text", "text": "no"}], "is_error": True},
            "b": {"content": [{"type": "text", "text": "chart"}, {
                "type": "image", "data": png, "mimeType": "image/png"}], "is_error": False}})
        url_image = {"type": "tool_result", "tool_use_id": "a", "content": [
            {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]}
        for content, pending in [(prompt["content"], ["a"]),             # an unexpected result
                                 (prompt["content"][:1], ["a", "b"]),    # a missing one
                                 (prompt["content"] + [{"type": "text", "text": "and"}],
                                  ["a", "b"]),                           # text beside them
                                 ("just text", ["a"]), ([url_image], ["a"]),
                                 (prompt["content"][:1] + [{"type": "tool_result",
                                                            "tool_use_id": "b"}],
                                  ["a", "b"])]:                          # one to be reworded
            with self.subTest(content=content, pending=pending):
                self.assertIsNone(proxy.tool_results({"role": "user", "content": content},
                                                     pending))

    def test_mcp_carries_whole_what_the_cli_passes_on_unchanged(self):
        limit, error_limit = proxy.MCP_RESULT_MAX_CHARS, proxy.MCP_ERROR_MAX_CHARS
        image = {"type": "image", "data": "AAAA", "mimeType": "image/png"}

        def text(value):
            return {"type": "text", "text": value}
        table = [  # name, content, is_error, carried whole
            ("text", [text("sunny")], False, True),
            ("nothing", [], False, False),
            ("empty text", [text("")], False, False),
            ("blank parts", [text(" \n\t\ufeff\u3000"), text("")], False, False),
            ("image", [image], False, True),
            ("empty text and image", [text(""), image], False, True),
            ("at the ceiling", [text("a" * limit)], False, True),
            ("parts at the ceiling", [text("a" * (limit - 1)), text("é")], False, True),
            ("astral at the ceiling", [text("\U0001F600" * (limit // 2))], False, True),
            ("astral past it", [text("\U0001F600" + "a" * (limit - 1))], False, False),
            ("lone surrogate", [text("\ud83d")], False, True),
            ("long text and image", [text("a" * (limit + 1)), image], False, True),
            ("error", [text("no such city")], True, True),
            ("error at its ceiling", [text("e" * error_limit)], True, True),
            ("error past it", [text("e" * (error_limit + 1))], True, False),
            ("padded error", [text("  oops \n")], True, False),
            ("error ending in U+FEFF", [text("oops\ufeff")], True, False),
            ("error in parts", [text("a"), text("b")], True, False),
            ("error with an image", [text("a"), image], True, False),
            ("image error", [image], True, False),
            ("empty error", [text("")], True, False),
        ]
        for name, content, is_error, whole in table:
            with self.subTest(name):
                self.assertIs(proxy.mcp_carries_whole(content, is_error), whole)

    def test_parse_json_body(self):
        self.assertEqual(proxy.parse_json_body(b'{"a": [1, "\xc3\xa9"]}'), {"a": [1, "é"]})
        table = [(b"", "Request body is empty; expected a JSON object."),
                 (b"{", "Request body is not valid JSON"),
                 (b"\xff\xfe\xfa", "Request body is not valid JSON"),
                 (b"[1, 2]", "Request body must be a JSON object."),
                 (b'"x"', "Request body must be a JSON object."),
                 (b"null", "Request body must be a JSON object."),
                 # NaN reached the CLI's extra body, which then dropped every parameter.
                 (b'{"temperature": NaN}', "Request body is not valid JSON: NaN"),
                 (b'{"output_config": {"format": {"schema": {"maximum": Infinity}}}}',
                  "Request body is not valid JSON: Infinity"),
                 (b'{"a": -Infinity}', "Request body is not valid JSON: -Infinity"),
                 (b'{"system": "\\ud83d alone"}', "Request body is not valid JSON"),
                 (b'{"a": ' * 100_000 + b"1" + b"}" * 100_000,
                  "Request body is not valid JSON: nested too deeply.")]
        self.assertEqual(proxy.parse_json_body(b'{"s": "\\ud83d\\ude00"}'), {"s": "\U0001F600"})
        for data, prefix in table:
            with self.subTest(data=data):
                self.assertProxyError(INV, proxy.parse_json_body, data, prefix=prefix)

    HISTORY = [
        {"role": U, "content": [{"type": "image", "source": {
            "type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
            {"type": "text", "text": "what is this?"}]},
        {"role": A, "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "sig=="},
            {"type": "tool_use", "id": "toolu_1", "name": "look", "input": {"q": 1}}]},
        {"role": U, "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                 "content": "a cat"}]},
        {"role": A, "content": "A cat."},
        {"role": U, "content": "thanks"}]

    def test_transcript_entries(self):
        entries = proxy.transcript_entries(self.HISTORY, SID, "/tmp/w", NOW, "claude-x")
        self.assertEqual(len(entries), len(self.HISTORY))
        ids = [str(uuid.uuid5(uuid.UUID(SID), str(i))) for i in range(len(self.HISTORY))]
        for i, (entry, message) in enumerate(zip(entries, self.HISTORY)):
            with self.subTest(index=i):
                self.assertEqual({k: v for k, v in entry.items() if k != "message"}, {
                    "type": message["role"], "uuid": ids[i],
                    "parentUuid": ids[i - 1] if i else None, "sessionId": SID,
                    "timestamp": "2025-01-02T03:04:05.678Z", "cwd": "/tmp/w",
                    "isSidechain": False, "userType": "external"})
                payload = entry["message"]
                if message["role"] == U:
                    self.assertEqual(payload, {"role": U, "content": message["content"]})
                else:
                    self.assertEqual({k: v for k, v in payload.items() if k != "content"}, {
                        "id": "msg_" + ids[i].replace("-", "")[:24], "type": "message",
                        "role": A, "model": "claude-x", "stop_reason": "end_turn",
                        "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}})
        self.assertEqual(entries[1]["message"]["content"], self.HISTORY[1]["content"])
        self.assertEqual(entries[3]["message"]["content"], [{"type": "text", "text": "A cat."}])

    def test_transcript_entries_are_deterministic_and_utc(self):
        def entries(history=self.HISTORY, sid=SID, now=NOW):
            return proxy.transcript_entries(history, sid, "/w", now, "m")
        self.assertEqual(entries(), entries())
        other = entries(sid=str(uuid.uuid4()))
        self.assertTrue({e["uuid"] for e in entries()}.isdisjoint(e["uuid"] for e in other))
        later = dt.datetime(2025, 1, 2, 5, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=2)))
        self.assertEqual(entries(self.HISTORY[:1], now=later)[0]["timestamp"],
                         "2025-01-02T03:04:05.000Z")
        self.assertEqual(entries([]), [])

    @staticmethod
    def assemble(events):
        assembler = proxy.MessageAssembler()
        for event in events:
            assembler.feed(event)
        return assembler.message

    def test_message_assembler_folds_a_full_stream(self):
        def delta(i, **d):
            return {"type": "content_block_delta", "index": i, "delta": d}

        def block(i, **b):
            return [{"type": "content_block_start", "index": i, "content_block": b}]

        def stop(i):
            return [{"type": "content_block_stop", "index": i}]
        events = [
            {"type": "ping"}, delta(0, type="text_delta", text="early"),   # before start: ignored
            {"type": "message_start", "message": {
                "id": "msg_1", "type": "message", "role": A, "model": "claude-x", "content": [],
                "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": 10, "output_tokens": 1}}},
            *block(0, type="thinking", thinking="", signature=""),
            delta(0, type="thinking_delta", thinking="Let me "),
            delta(0, type="thinking_delta", thinking="think."),
            delta(0, type="signature_delta", signature="sig"),
            delta(0, type="signature_delta", signature="ABC"), *stop(0),
            *block(1, type="text", text=""), delta(1, type="text_delta", text="Hel"),
            delta(1, type="text_delta", text="lo"), *stop(1),
            *block(2, type="tool_use", id="toolu_1", name="get", input={}),
            delta(2, type="input_json_delta", partial_json=""),
            delta(2, type="input_json_delta", partial_json='{"ci'),
            delta(2, type="input_json_delta", partial_json='ty": "Paris"}'), *stop(2),
            *block(3, type="tool_use", id="toolu_2", name="now", input={}), *stop(3),
            {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
             "usage": {"output_tokens": 42, "cache_read_input_tokens": None}},
            {"type": "message_stop"}]
        self.assertEqual(self.assemble(events), {
            "id": "msg_1", "type": "message", "role": A, "model": "claude-x",
            "content": [{"type": "thinking", "thinking": "Let me think.", "signature": "sigABC"},
                        {"type": "text", "text": "Hello"},
                        {"type": "tool_use", "id": "toolu_1", "name": "get",
                         "input": {"city": "Paris"}},
                        {"type": "tool_use", "id": "toolu_2", "name": "now", "input": {}}],
            "stop_reason": "tool_use", "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 42}})

    def test_message_assembler_stop_sequence_and_events_before_start(self):
        early = {"type": "message_delta", "delta": {"stop_reason": "x"}}
        self.assertIsNone(self.assemble([{"type": "ping"}, early]))
        start = {"type": "message_start", "message": {"id": "m", "content": [],
                                                      "usage": {"input_tokens": 3}}}
        message = self.assemble([start, {
            "type": "message_delta", "usage": {"output_tokens": 2},
            "delta": {"stop_reason": "stop_sequence", "stop_sequence": "END"}}])
        self.assertEqual((message["stop_reason"], message["stop_sequence"], message["usage"]),
                         ("stop_sequence", "END", {"input_tokens": 3, "output_tokens": 2}))
        self.assertEqual(start["message"]["usage"], {"input_tokens": 3})    # not mutated

    def test_image_size_of_real_headers(self):
        table = [(png_bytes(3, 2), (3, 2)), (gif_bytes(5, 7), (5, 7)),
                 (jpeg_bytes(640, 480), (640, 480)), (jpeg_bytes(33, 17, 0xC2), (33, 17)),
                 (webp_bytes(1000, 600, b"VP8X"), (1000, 600)),
                 (webp_bytes(300, 200, b"VP8L"), (300, 200)),
                 (webp_bytes(123, 45, b"VP8 "), (123, 45)),
                 (b"not an image at all, no magic", None), (png_bytes(3, 2)[:20], None),
                 (b"\xff\xd8\x00\x00" + b"\x00" * 20, None), (b"", None)]
        for data, expected in table:
            with self.subTest(data=data[:16]):
                self.assertEqual(proxy.image_size(data), expected)

    def test_image_tokens(self):
        table = [((1000, 1000), math.ceil(1000 * 1000 / 750)), ((200, 200), 54), ((1, 1), 1),
                 ((0, 0), 1), ((4000, 4000), 1534),      # scaled down to ~1.15 MP
                 ((3000, 500), 547), ((1568, 300), 628)]  # long edge fitted to 1568 px
        for size, expected in table:
            with self.subTest(size=size):
                self.assertEqual(proxy.image_tokens(*size), expected)
        self.assertLessEqual(proxy.image_tokens(10000, 10000), proxy.IMAGE_URL_TOKENS)

    def test_estimate_text_tokens(self):
        for text, expected in [("", 0), ("hello world", 2), ("internationalization", 4),
                               ("12345", 2), ("a, b.", 4), ("\u65e5\u672c\u8a9e", 3)]:
            with self.subTest(text=text):
                self.assertEqual(proxy.estimate_text_tokens(text), expected)

    def test_estimate_tokens_grows_with_text_images_and_tools(self):
        def body(content, **extra):
            return {"model": "m", "messages": [{"role": U, "content": content}], **extra}
        short = proxy.estimate_tokens(body("hello there"))
        self.assertEqual(short, proxy.MESSAGE_OVERHEAD_TOKENS + 2)
        self.assertGreater(proxy.estimate_tokens(body("hello there " * 50)), short)
        self.assertEqual(proxy.estimate_tokens({}), 1)
        self.assertEqual(proxy.estimate_tokens(body("hi", system="Be brief.")),
                         proxy.estimate_tokens(body("hi")) + 3)
        text = [{"type": "text", "text": "hello there"}]
        png = base64.b64encode(png_bytes(1000, 1000)).decode()
        image = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": png}}
        self.assertEqual(proxy.estimate_tokens(body(text + [image])) - short, 1334)
        url = {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}
        self.assertEqual(proxy.estimate_tokens(body(text + [url])) - short, proxy.IMAGE_URL_TOKENS)
        tools = [{"name": "get_weather", "description": "Weather for a city.",
                  "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
        self.assertGreater(proxy.estimate_tokens(body("hello there", tools=tools)) - short,
                           proxy.TOOLS_OVERHEAD_TOKENS)

    def test_check_count_tokens_request(self):
        ok = {"model": "claude-sonnet-4-5", "messages": [{"role": U, "content": "hi"}],
              "system": "s", "tools": [{"name": "t"}]}
        self.assertIsNone(proxy.check_count_tokens_request(ok))     # no max_tokens needed
        table = [({"model": ...}, "model: required, a string."), ({"model": ""}, "model:"),
                 ({"messages": ...}, "messages: required, a list."),
                 ({"messages": "hi"}, "messages: required, a list."),
                 ({"messages": ["hi"]}, "messages.0.role:"),
                 ({"messages": [{"role": "bot", "content": "x"}]}, "messages.0.role:"),
                 ({"messages": [{"role": U, "content": 5}]}, "messages.0.content:"),
                 ({"messages": [{"role": U}]}, "messages.0.content:"),
                 ({"messages": [{"role": U, "content": [{"type": "bogus"}]}]},
                  "messages.0.content.0.type:"),
                 ({"system": 5}, "system: must be a string or a list of text blocks."),
                 ({"system": [{"type": "image"}]}, "system.0: must be a text block."),
                 ({"tools": {}}, "tools: must be a list.")]
        for changes, prefix in table:
            body = {k: v for k, v in {**ok, **changes}.items() if v is not ...}
            with self.subTest(changes=changes):
                self.assertProxyError(INV, proxy.check_count_tokens_request, body, prefix=prefix)


class MessagesEndToEndTest(ApiAssertions, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.proxy = ProxyThread()
        cls.client = cls.proxy.client()

    @classmethod
    def tearDownClass(cls):
        exit_code = cls.proxy.stop()
        if exit_code != 0:
            raise AssertionError(f"the proxy exited with {exit_code!r}, not 0")

    def setUp(self):
        UPSTREAM.clear()

    def only_upstream_request(self) -> dict:
        requests = UPSTREAM.messages_requests()
        self.assertEqual(len(requests), 1, "one client request must be one upstream call")
        return requests[0]

    def test_create_returns_the_upstream_message_exactly(self):
        message = self.client.messages.create(
            model="claude-sonnet-5-5", max_tokens=321, system="Be brief.",
            messages=[{"role": "user", "content": "hello"}])
        self.assertEqual(message.content[0].text, UPSTREAM_TEXT)
        self.assertEqual(message.model, "claude-sonnet-5-5")
        self.assertEqual(message.stop_reason, "end_turn")
        self.assertEqual(message.usage.input_tokens, 17)
        self.assertEqual(message.usage.output_tokens, 42)
        self.assertEqual(message.usage.cache_read_input_tokens, 3)
        self.assertEqual(message.usage.cache_creation_input_tokens, 2)
        sent = self.only_upstream_request()
        self.assertTrue(sent["headers"]["Authorization"].startswith("Bearer sk-ant-oat01-"))
        self.assertIn("claude-cli/", sent["headers"]["User-Agent"])
        body = sent["body"]
        self.assertEqual(body["model"], "claude-sonnet-5-5")
        self.assertEqual(body["max_tokens"], 321)
        self.assertNotIn("thinking", body, "no thinking upstream when none was asked")
        self.assertEqual(body.get("tools", []), [])
        system = [block["text"] for block in body["system"]]
        self.assertTrue(system[0].startswith("x-anthropic-billing-header:"))
        self.assertIn("Claude Agent SDK", system[1])
        self.assertEqual(system[-1], "Be brief.")
        self.assertNotIn(HOME_MARKER, json.dumps(body))

    def test_history_reaches_upstream_as_the_same_structured_messages(self):
        png = base64.b64encode(png_bytes(4, 3)).decode()
        history = [
            {"role": "user", "content": [
                {"type": "text", "text": "Look at these."},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": png}},
                {"type": "image", "source": {"type": "url",
                                             "url": "https://example.com/cat.png"}},
                {"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                                "data": "A short document."}}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "The user shows images.",
                 "signature": "sig-history"},
                {"type": "text", "text": "I will check the weather."},
                {"type": "tool_use", "id": "toolu_01", "name": "get_weather",
                 "input": {"city": "Paris"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01", "is_error": False,
                 "content": [{"type": "text", "text": "18 C"}]}]},
            {"role": "assistant", "content": "It is 18 C in Paris."},
        ]
        message = self.client.messages.create(
            model="claude-sonnet-5-5", max_tokens=3000,
            thinking={"type": "enabled", "budget_tokens": 1024},
            messages=history + [{"role": "user", "content": "And tomorrow?"}])
        self.assertEqual(message.content[0].text, UPSTREAM_TEXT)
        sent = conversation(self.only_upstream_request()["body"])
        self.assertEqual(len(sent), 5)
        expected = history[:-1] + [{"role": "assistant", "content": [
            {"type": "text", "text": "It is 18 C in Paris."}]}]
        for got, want in zip(sent[:4], expected):
            self.assertEqual(got["role"], want["role"])
            self.assertEqual(strip_cache_control(got["content"]), want["content"])
        last = strip_cache_control(sent[4]["content"])
        self.assertEqual(sent[4]["role"], "user")
        self.assertEqual(last[-1], {"type": "text", "text": "And tomorrow?"})

    def test_system_blocks_and_parameters_are_carried(self):
        self.client.messages.create(
            model="claude-opus-4-1-20250805", max_tokens=64, stop_sequences=["END"],
            extra_body={"temperature": 0.25, "top_k": 7},
            system=[{"type": "text", "text": "Rule one."}, {"type": "text", "text": "Rule two."}],
            messages=[{"role": "user", "content": "hi"}])
        body = self.only_upstream_request()["body"]
        self.assertEqual(body["model"], "claude-opus-4-1-20250805", "no legacy remap")
        self.assertEqual((body["max_tokens"], body["temperature"], body["top_k"]), (64, 0.25, 7))
        self.assertEqual(body["stop_sequences"], ["END"])
        self.assertEqual(body["system"][-1]["text"], "Rule one.\n\nRule two.")

    def test_alias_model_is_resolved_and_reported_as_the_upstream_used_it(self):
        message = self.client.messages.create(
            model="gpt-4o-or-whatever", max_tokens=10,
            messages=[{"role": "user", "content": "hi"}])
        upstream_model = self.only_upstream_request()["body"]["model"]
        self.assertIn("sonnet", upstream_model)
        self.assertEqual(message.model, upstream_model)

    def test_thinking_is_carried_and_returned_with_its_signature(self):
        message = self.client.messages.create(
            model="claude-sonnet-5-5", max_tokens=4000,
            thinking={"type": "enabled", "budget_tokens": 2000},
            messages=[{"role": "user", "content": "[[thinking]] think first"}])
        self.assertEqual(self.only_upstream_request()["body"]["thinking"],
                         {"type": "enabled", "budget_tokens": 2000})
        self.assertEqual(message.content[0].type, "thinking")
        self.assertEqual(message.content[0].thinking, "Let me think.")
        self.assertEqual(message.content[0].signature, "sig-abc")
        self.assertEqual(message.content[1].text, UPSTREAM_TEXT)

    def test_stream_get_final_message_matches_the_upstream(self):
        with self.client.messages.stream(
                model="claude-sonnet-5-5", max_tokens=50,
                messages=[{"role": "user", "content": "[[stop max_tokens]] stream it"}]) as s:
            pieces = list(s.text_stream)
            final = s.get_final_message()
        self.assertEqual(pieces, [UPSTREAM_TEXT[:9], UPSTREAM_TEXT[9:]])
        self.assertEqual(final.content[0].text, UPSTREAM_TEXT)
        self.assertEqual(final.stop_reason, "max_tokens")
        self.assertEqual(final.usage.output_tokens, 42)
        self.assertTrue(UPSTREAM.cut.wait(10), "the CLI was stopped at the max_tokens stop")
        self.only_upstream_request()

    def test_refusal_and_a_full_context_window_end_the_answer_as_at_the_api(self):
        # The CLI would ask again itself, with its own note in the conversation.
        for reason in ("refusal", "model_context_window_exceeded"):
            with self.subTest(reason=reason):
                UPSTREAM.clear()
                message = self.client.messages.create(
                    model="claude-sonnet-5-5", max_tokens=50,
                    messages=[{"role": "user", "content": f"[[stop {reason}]] go"}])
                self.assertEqual((message.stop_reason, message.content[0].text),
                                 (reason, UPSTREAM_TEXT))
                self.assertTrue(UPSTREAM.cut.wait(10), "the CLI was stopped at the stop")
                self.only_upstream_request()

    def test_upstream_errors_arrive_as_real_statuses(self):
        cases = [("[[error 429]]", 429, "rate_limit_error", anthropic.RateLimitError),
                 ("[[error 529]]", 529, "overloaded_error", anthropic.InternalServerError),
                 ("[[error 400]]", 400, "invalid_request_error", anthropic.BadRequestError),
                 ("[[error 500]]", 500, "api_error", anthropic.InternalServerError),
                 ("[[error 401]]", 401, "authentication_error", anthropic.AuthenticationError)]
        for marker, status, error_type, exc_type in cases:
            for stream in (False, True):
                with self.subTest(marker=marker, stream=stream):
                    started = time.monotonic()
                    with self.assertRaises(exc_type) as caught:
                        if stream:
                            with self.client.messages.stream(
                                    model="claude-sonnet-5-5", max_tokens=10,
                                    messages=[{"role": "user", "content": marker}]) as s:
                                s.get_final_message()
                        else:
                            self.client.messages.create(
                                model="claude-sonnet-5-5", max_tokens=10,
                                messages=[{"role": "user", "content": marker}])
                    self.assertApiError(caught.exception, status, error_type)
                    self.assertLess(time.monotonic() - started, 30)

    def test_conversations_the_api_refuses_are_400s_that_reach_nothing(self):
        # The CLI would answer them with content of its own: "(no content)", a made-up
        # result ("[Tool result missing due to internal error]"), or no call at all.
        call = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}
        for messages, message in [
                ([{"role": "user", "content": " \n "}],
                 "messages: text content blocks must contain non-whitespace text"),
                ([{"role": "user", "content": "weather?"}, {"role": "assistant", "content": [call]},
                  {"role": "user", "content": "no result"}],
                 "messages.1: `tool_use` ids were found without `tool_result` blocks"),
                ([{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                                "content": "sunny"}]}],
                 "messages.0.content.0: unexpected `tool_use_id`")]:
            with self.subTest(message=message):
                with self.assertRaises(anthropic.BadRequestError) as caught:
                    self.client.messages.create(model="claude-sonnet-5-5", max_tokens=10,
                                                tools=[WEATHER], messages=messages)
                self.assertTrue(caught.exception.body["error"]["message"].startswith(message))
        self.assertEqual(UPSTREAM.messages_requests(), [])

    def test_bad_request_carries_the_upstream_message(self):
        with self.assertRaises(anthropic.BadRequestError) as caught:
            self.client.messages.create(model="claude-sonnet-5-5", max_tokens=10,
                                        messages=[{"role": "user", "content": "[[error 400]]"}])
        self.assertIn("scripted 400", caught.exception.body["error"]["message"])

    def test_a_conversation_past_the_context_window_is_sent_whole_never_summarised(self):
        # Each answer reports a 1.5M-token conversation: past every window, so the
        # CLI would compact it (summary calls, then the summary instead) or refuse.
        history = [{"role": "user", "content": "first [[context 1500000]]"}]
        for follow_up in ("second [[context 1500000]]", "third"):
            message = self.client.messages.create(model="claude-sonnet-5-5", max_tokens=50,
                                                  messages=history)
            history += [{"role": "assistant", "content": message.content[0].text},
                        {"role": "user", "content": follow_up}]
        self.assertEqual(self.client.messages.create(
            model="claude-sonnet-5-5", max_tokens=50, messages=history).content[0].text,
            UPSTREAM_TEXT)
        requests = UPSTREAM.messages_requests()
        self.assertEqual(len(requests), 3, "one upstream call a request, no summary call")
        self.assertEqual(len({r["headers"]["X-Claude-Code-Session-Id"] for r in requests}), 1)
        sent = conversation(requests[-1]["body"])
        self.assertEqual([ScriptedUpstream.last_text({"messages": sent[:n + 1]})
                          for n in range(len(sent))], [m["content"] for m in history])

    def test_prompt_too_long_is_a_400_clients_recognise_and_never_a_compaction(self):
        # After a few exchanges the CLI would summarise them and try again.
        marker = [{"role": "user", "content": "question"},
                  {"role": "assistant", "content": "answer"}] * 3 + [
            {"role": "user", "content": "[[error 400 too long]]"}]
        with self.assertRaises(anthropic.BadRequestError) as caught:
            self.client.messages.create(model="claude-sonnet-5-5", max_tokens=10,
                                        messages=marker)
        self.assertApiError(caught.exception, 400, "invalid_request_error")
        self.assertTrue(caught.exception.body["error"]["message"].startswith(
            "prompt is too long"))
        self.only_upstream_request()
        UPSTREAM.clear()
        with self.assertRaises(openai.BadRequestError) as caught:
            self.proxy.openai_client().chat.completions.create(model="sonnet",
                                                               messages=marker)
        self.assertEqual(caught.exception.code, "context_length_exceeded")
        self.only_upstream_request()

    def test_throttle_429_has_retry_after(self):
        with self.assertRaises(anthropic.RateLimitError) as caught:
            self.client.messages.create(model="claude-sonnet-5-5", max_tokens=10,
                                        messages=[{"role": "user", "content": "[[error 429]]"}])
        self.assertGreaterEqual(int(caught.exception.response.headers["retry-after"]), 1)

    def test_spent_subscription_window_is_a_429_naming_window_and_reset(self):
        with self.assertLogs("claude_sdk_proxy", "WARNING") as logs, \
                self.assertRaises(anthropic.RateLimitError) as caught:
            self.client.messages.create(
                model="claude-sonnet-5-5", max_tokens=10,
                messages=[{"role": "user", "content": "[[error 429 window]]"}])
        message = caught.exception.body["error"]["message"]
        self.assertIn("5-hour limit", message)
        self.assertIn("not a transient throttle", message)
        retry_after = int(caught.exception.response.headers["retry-after"])
        self.assertAlmostEqual(retry_after, ScriptedUpstream.LIMIT_RESET - time.time(), delta=2)
        self.assertEqual(caught.exception.response.headers["x-should-retry"], "false")
        self.assertIn("The subscription's 5-hour window is 100% used", logs.output[0])

    def test_login_failure_says_how_to_log_in(self):
        with self.assertRaises(anthropic.AuthenticationError) as caught:
            self.client.messages.create(model="claude-sonnet-5-5", max_tokens=10,
                                        messages=[{"role": "user", "content": "[[error 401]]"}])
        # A command that works as printed: this interpreter and the script's real path.
        self.assertIn(f"`{proxy.self_command()} login`", caught.exception.body["error"]["message"])
        self.assertIn(f"{os.path.abspath(proxy.__file__)} setup-token",
                      caught.exception.body["error"]["message"])

    def test_validation_errors_are_precise_400s(self):
        cases = [
            ({"model": "claude-sonnet-5-5", "messages": [{"role": "user", "content": "x"}]},
             "max_tokens"),
            ({"model": "claude-sonnet-5-5", "max_tokens": 5, "messages": []}, "messages"),
            ({"model": "claude-sonnet-5-5", "max_tokens": 5,
              "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
            ({"model": "claude-sonnet-5-5", "max_tokens": 5,
              "messages": [{"role": "user", "content": "x"},
                           {"role": "assistant", "content": "pre"}]}, "prefill"),
            ({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}, "model"),
        ]
        for body, words in cases:
            with self.subTest(words=words):
                with self.assertRaises(anthropic.BadRequestError) as caught:
                    self.client.post("/v1/messages", body=body, cast_to=object)
                self.assertApiError(caught.exception, 400, "invalid_request_error")
                self.assertIn(words, caught.exception.body["error"]["message"])
        self.assertEqual(UPSTREAM.messages_requests(), [])

    def test_count_tokens_counts_text_images_and_tools(self):
        plain = self.client.messages.count_tokens(
            model="claude-sonnet-5-5", messages=[{"role": "user", "content": "hello there"}])
        png = base64.b64encode(png_bytes(750, 1000)).decode()
        with_image = self.client.messages.count_tokens(
            model="claude-sonnet-5-5", system="You are terse.",
            messages=[{"role": "user", "content": [
                {"type": "text", "text": "hello there"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": png}}]}],
            tools=[{"name": "lookup", "description": "Look up a word.",
                    "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}])
        self.assertGreater(plain.input_tokens, 0)
        self.assertGreaterEqual(with_image.input_tokens - plain.input_tokens, 1000 + 346)
        self.assertEqual(UPSTREAM.messages_requests(), [], "counting makes no upstream call")

    def test_models_list_and_retrieve(self):
        models = list(self.client.models.list())
        families = {f for m in models for f in ("opus", "sonnet", "haiku") if f in m.id}
        self.assertEqual(families, {"opus", "sonnet", "haiku"})
        first = self.client.models.retrieve(models[0].id)
        self.assertEqual(first.id, models[0].id)
        with self.assertRaises(anthropic.NotFoundError) as caught:
            self.client.models.retrieve("no-such-model")
        self.assertApiError(caught.exception, 404, "not_found_error")

    def test_routes_without_v1_prefix_and_with_query_string(self):
        raw = raw_exchange(self.proxy.port, b"GET /models?beta=true HTTP/1.1\r\nhost: localhost\r\n"
                                            b"connection: close\r\n\r\n")
        self.assertTrue(raw.startswith(b"HTTP/1.1 200 "), raw[:80])
        self.assertIn(b'"has_more":false', raw)

    def test_unknown_path_and_wrong_method_are_api_errors(self):
        for request, status, error_type, allow in (
                (b"GET /v1/nothing", 404, "not_found_error", None),
                (b"GET /v1/messages", 405, "invalid_request_error", b"allow: POST"),
                (b"POST /v1/models", 405, "invalid_request_error", b"allow: GET, HEAD")):
            with self.subTest(request=request):
                raw = raw_exchange(self.proxy.port, request + b" HTTP/1.1\r\nhost: localhost\r\n"
                                                              b"connection: close\r\n\r\n")
                head, _, body = raw.partition(b"\r\n\r\n")
                self.assertTrue(head.startswith(b"HTTP/1.1 %d " % status), head)
                if allow:
                    self.assertIn(allow, head.split(b"\r\n"))
                error = json.loads(body)
                self.assertEqual(error["type"], "error")
                self.assertEqual(error["error"]["type"], error_type)

    def test_health_reports_versions(self):
        raw = raw_exchange(self.proxy.port, b"GET / HTTP/1.1\r\nhost: localhost\r\n"
                                            b"connection: close\r\n\r\n")
        info = json.loads(raw.partition(b"\r\n\r\n")[2])
        self.assertEqual(info["status"], "ok")
        self.assertEqual(info["versions"]["sdk"], proxy.sdk.__version__)


class ParametersTest(SharedProxyCase):
    """Each client parameter reaches the upstream as the real API would treat it."""

    def test_parse_effort_speed_cache_control_and_betas(self):
        import pydantic

        class Weather(pydantic.BaseModel):
            city: str
            temp: int
        parsed = self.client.messages.parse(
            model="claude-sonnet-5-5", max_tokens=100, output_format=Weather,
            output_config={"effort": "low"}, speed="fast",
            messages=[{"role": "user", "content": '[[json {"city": "Oslo", "temp": 3}]]'}],
            extra_body={"cache_control": {"type": "ephemeral"}},
            extra_headers={"anthropic-beta": "test-beta-2026-01-01"})
        self.assertEqual(parsed.parsed_output, Weather(city="Oslo", temp=3))
        request = UPSTREAM.messages_requests()[0]
        body = request["body"]
        self.assertEqual(body["output_config"]["effort"], "low")
        self.assertEqual(body["output_config"]["format"]["type"], "json_schema")
        self.assertEqual(body["output_config"]["format"]["schema"]["properties"].keys(),
                         {"city", "temp"})
        self.assertEqual((body["speed"], body["cache_control"]), ("fast", {"type": "ephemeral"}))
        self.assertNotIn("thinking", body, "no thinking unless asked")
        self.assertIn("test-beta-2026-01-01", request["headers"]["anthropic-beta"])
        self.assertTrue(body["system"][0]["text"].startswith("x-anthropic-billing-header"),
                        "the CLI's attribution line is intact")

    def test_debug_log_names_what_was_not_carried(self):
        server = ProxyThread(debug=True)
        self.addCleanup(server.stop)
        with self.assertLogs("claude_sdk_proxy", "DEBUG") as logs:
            server.client().messages.create(model="sonnet", max_tokens=5,
                                            messages=[{"role": "user", "content": "x"}],
                                            extra_body={"future_knob": 1, "top_k": 3})
        [line] = [r for r in logs.output if " turn: " in r]
        self.assertIn("dropped=future_knob", line)
        request_id = line.split(" turn: ")[0].rsplit(":", 1)[-1]
        traced = [r.split(request_id, 1)[1].strip() for r in logs.output if request_id in r]
        self.assertIn("Delta message_start", traced)
        self.assertIn("Delta message_stop", traced)
        self.assertIn("Answer", traced)
        self.assertIn('"top_k": 3', line)

    def test_an_older_model_id_is_sent_exactly(self):
        message = self.client.messages.create(model="claude-opus-4-1-20250805", max_tokens=5,
                                              messages=[{"role": "user", "content": "x"}])
        self.assertEqual(UPSTREAM.messages_requests()[0]["body"]["model"],
                         "claude-opus-4-1-20250805", "no legacy remap")
        self.assertEqual(message.model, "claude-opus-4-1-20250805")

    def test_rate_limit_state_reaches_headers_and_usage(self):
        empty = self.client.get("/usage", cast_to=object)
        self.assertEqual(empty["windows"], {})
        with self.assertLogs("claude_sdk_proxy", "WARNING"):    # 91 % is past 90 %
            raw = self.client.messages.with_raw_response.create(
                model="sonnet", max_tokens=5, messages=[{"role": "user",
                                                         "content": "[[limits warning]]"}])
        reset = str(ScriptedUpstream.LIMIT_RESET)
        headers = {k: v for k, v in raw.headers.items() if k.startswith("anthropic-ratelimit")}
        self.assertEqual(headers["anthropic-ratelimit-unified-5h-status"], "allowed_warning")
        self.assertEqual(headers["anthropic-ratelimit-unified-5h-utilization"], "0.91")
        self.assertEqual(headers["anthropic-ratelimit-unified-5h-reset"], reset)
        self.assertEqual(headers["anthropic-ratelimit-unified-7d-utilization"], "0.25")
        with self.client.messages.with_streaming_response.create(
                model="sonnet", max_tokens=5, stream=True,
                messages=[{"role": "user", "content": "[[limits warning]] streamed"}]) as streamed:
            self.assertEqual(streamed.headers["anthropic-ratelimit-unified-5h-utilization"],
                             "0.91")
        usage = self.client.get("/usage", cast_to=object)
        five = usage["windows"]["five_hour"]
        self.assertEqual((five["status"], five["utilization"]), ("allowed_warning", 0.91))
        self.assertEqual(five["resets_at"], dt.datetime.fromtimestamp(
            int(reset), dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
        self.assertIn("seven_day", usage["windows"])
        self.assertIsNotNone(usage["observed_at"])

    def test_bad_parameter_values_are_400s(self):
        for changes, message in [
                ({"output_config": {"effort": "extreme"}}, "output_config.effort: must be one"),
                ({"output_config": {"format": {"type": "xml"}}}, "output_config.format: must be"),
                ({"speed": "warp"}, "speed: must be 'fast' or 'standard'.")]:
            with self.subTest(changes=changes):
                with self.assertRaises(anthropic.BadRequestError) as caught:
                    self.client.messages.create(model="sonnet", max_tokens=5, extra_body=changes,
                                                messages=[{"role": "user", "content": "x"}])
                self.assertIn(message, caught.exception.body["error"]["message"])
        self.assertEqual(UPSTREAM.messages_requests(), [])

    def test_openai_reasoning_effort_becomes_effort(self):
        chat = self.server.openai_client()
        chat.chat.completions.create(model="sonnet", reasoning_effort="minimal",
                                     messages=[{"role": "user", "content": "hi"}])
        chat.responses.create(model="sonnet", reasoning={"effort": "high"}, input="hi")
        efforts = [r["body"]["output_config"]["effort"] for r in UPSTREAM.messages_requests()]
        self.assertEqual(efforts, ["low", "high"])


# =============================================================================
# 7. Conversations on the CLI
# =============================================================================

class ConversationHashTest(unittest.TestCase):
    """conversation_hash: equal for what a client echoes of a conversation, different
    for a different conversation, and going on from the messages before."""

    QUESTION = {"role": "user", "content": "What is in a.txt?"}
    ANSWER = {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "Read it.", "signature": "sig"},
        {"type": "text", "text": "Let me read it."},
        {"type": "tool_use", "id": "toolu_1", "name": "read",
         "input": {"path": "a.txt", "lines": 10}}]}
    RESULT = {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "hello"}]}
    IMAGE = {"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": "AAAA"}},
        {"type": "text", "text": "And this?"}]}
    CONVERSATION = [QUESTION, ANSWER, RESULT, IMAGE]

    @staticmethod
    def digest(messages: list[dict], before=None) -> str:
        return proxy.conversation_hash(messages, before).hexdigest()

    def echoed(self, index: int, *content) -> list[dict]:
        """The conversation with message `index`'s content replaced."""
        return [dict(m, content=list(content)) if i == index else m
                for i, m in enumerate(self.CONVERSATION)]

    def test_what_a_client_may_change_when_it_echoes_keeps_the_hash(self):
        question = {"type": "text", "text": "What is in a.txt?"}
        thinking, text, call = self.ANSWER["content"]
        result = self.RESULT["content"][0]
        image, and_this = self.IMAGE["content"]
        mark = {"cache_control": {"type": "ephemeral"}}
        cases = [   # (name, the conversation as the client echoes it)
            ("a string as one text block", self.echoed(0, question)),
            ("cache_control on a text block", self.echoed(0, {**question, **mark})),
            ("cache_control on a tool_result and on a text inside it", self.echoed(
                2, {**result, **mark, "content": [{"type": "text", "text": "hello", **mark}]})),
            ("cache_control on an image", self.echoed(3, {**image, **mark}, and_this)),
            ("the thinking block left out", self.echoed(1, text, call)),
            ("a redacted_thinking block added", self.echoed(
                1, {"type": "redacted_thinking", "data": "x"}, thinking, text, call)),
            # Only a text block's text is matched: citations may come back or not.
            ("a text block's other keys", self.echoed(1, thinking, {**text, "citations": []},
                                                      call)),
            ("keys in another order, in blocks and in tool inputs", self.echoed(
                1, thinking, text, {"input": {"lines": 10, "path": "a.txt"}, "name": "read",
                                    "id": "toolu_1", "type": "tool_use"})),
            ("is_error false spelled out", self.echoed(2, {**result, "is_error": False})),
            ("a tool_result's string content as a text block", self.echoed(
                2, {**result, "content": [{"type": "text", "text": "hello"}]})),
        ]
        expected = self.digest(self.CONVERSATION)
        for name, echoed in cases:
            with self.subTest(name):
                # The row changes what the client sends (key order included).
                self.assertNotEqual(json.dumps(echoed), json.dumps(self.CONVERSATION))
                self.assertEqual(self.digest(echoed), expected)
        empty = {"type": "tool_result", "tool_use_id": "toolu_1"}
        with self.subTest("a tool_result's content missing, null, empty or blank"):
            self.assertEqual(len({self.digest(self.echoed(2, dict(empty, **content)))
                                  for content in ({}, {"content": None}, {"content": []},
                                                  {"content": ""})}), 1)

    def test_what_changes_the_conversation_changes_the_hash(self):
        thinking, text, call = self.ANSWER["content"]
        result = self.RESULT["content"][0]
        image, and_this = self.IMAGE["content"]
        first, second = {"type": "text", "text": "one"}, {"type": "text", "text": "two"}
        cases = [   # (name, one conversation, another)
            ("a word of text", [self.QUESTION],
             [dict(self.QUESTION, content="What is in b.txt?")]),
            ("the role", [self.QUESTION], [dict(self.QUESTION, role="assistant")]),
            ("the order of blocks", self.CONVERSATION, self.echoed(1, thinking, call, text)),
            ("the order of messages", [self.QUESTION, self.IMAGE], [self.IMAGE, self.QUESTION]),
            ("a tool's input", self.CONVERSATION, self.echoed(
                1, thinking, text, {**call, "input": {"path": "a.txt", "lines": 11}})),
            ("a tool call's id", self.CONVERSATION, self.echoed(
                1, thinking, text, {**call, "id": "toolu_2"})),
            ("a tool result's error flag", self.CONVERSATION, self.echoed(
                2, {**result, "is_error": True})),
            ("an image's data", self.CONVERSATION, self.echoed(3, {**image, "source": {
                **image["source"], "data": "BBBB"}}, and_this)),
            ("two messages or one with both blocks", [
                {"role": "user", "content": [first]}, {"role": "user", "content": [second]}],
             [{"role": "user", "content": [first, second]}]),
            ("an empty text block or none", [{"role": "user", "content": []}],
             [{"role": "user", "content": [{"type": "text", "text": ""}]}]),
            ("one message more", [self.QUESTION], [self.QUESTION, self.ANSWER]),
        ]
        for name, one, another in cases:
            with self.subTest(name):
                self.assertNotEqual(self.digest(one), self.digest(another))

    def test_the_hash_goes_on_from_the_messages_before(self):
        conversation = self.CONVERSATION
        before = copy.deepcopy(conversation)
        whole = self.digest(conversation)
        for split in range(len(conversation) + 1):
            with self.subTest(split=split):
                head = proxy.conversation_hash(conversation[:split])
                head_digest = head.hexdigest()
                self.assertEqual(self.digest(conversation[split:], head), whole)
                self.assertEqual(head.hexdigest(), head_digest)     # `before` is not used up
        self.assertEqual(self.digest([]),       # no messages: sha256 of nothing
                         "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        self.assertEqual(conversation, before)


class AgentStreamTest(unittest.TestCase):
    """AgentStream: the upstream messages of one agent-mode answer as one message."""

    BUILTIN = {"Bash", "Read"}
    DONE = {"type": "text", "text": "Done."}
    LOOK = {"type": "text", "text": "Let me look."}
    BASH = {"type": "tool_use", "id": "toolu_b", "name": "Bash", "input": {"command": "ls"}}
    READ = {"type": "tool_use", "id": "toolu_r", "name": "Read", "input": {"file_path": "/a"}}
    CALL = {"type": "tool_use", "id": "toolu_c", "name": "mcp__c__get_weather",
            "input": {"city": "Ulm"}}

    @staticmethod
    def message(*blocks: dict, stop: str = "end_turn") -> list[dict]:
        """One upstream message's raw events: message_start, three events a block,
        message_delta (5 output tokens), message_stop."""
        return [sdk_message.event for sdk_message in upstream_message(*blocks, stop=stop)]

    @staticmethod
    def block(events: list[dict], index: int, to: int | None = None) -> list[dict]:
        """The start, delta and stop of block `index` of a message, moved to client
        index `to` (unmoved when None)."""
        found = events[1 + 3 * index:4 + 3 * index]
        return found if to is None else [{**event, "index": to} for event in found]

    @staticmethod
    def tokens(message_delta: dict, output_tokens: int) -> dict:
        return {**message_delta, "usage": {**message_delta["usage"],
                                           "output_tokens": output_tokens}}

    def test_agent_rounds_fold_into_one_client_message(self):
        text, block, tokens = self.message(self.DONE), self.block, self.tokens
        bash = self.message(self.BASH, stop="tool_use")
        look_read = self.message(self.LOOK, self.READ, stop="tool_use")
        look_call = self.message(self.LOOK, self.CALL, stop="tool_use")
        mixed = self.message(self.BASH, self.CALL, stop="tool_use")
        cut = self.message(self.LOOK, self.BASH, stop="max_tokens")
        ping = {"type": "ping"}
        stray = {"type": "content_block_delta", "index": 7,
                 "delta": {"type": "text_delta", "text": "never started"}}
        cases = [   # (name, built-in tool names, upstream events, the client's events)
            ("no built-in tools: every event as it came", set(), look_call, look_call),
            ("built-in tools offered but not called: every event as it came", self.BUILTIN,
             look_call, look_call),
            ("a built-in round, then a text round", self.BUILTIN, bash + text,
             bash[:1] + block(text, 0) + [tokens(text[-2], 10), text[-1]]),
            # The text before a built-in call stays; the next round's block comes after it.
            ("text and a built-in call, then a text round", self.BUILTIN, look_read + text,
             look_read[:1] + block(look_read, 0) + block(text, 0, to=1)
             + [tokens(text[-2], 10), text[-1]]),
            ("two built-in rounds, then text: the tokens of all three", self.BUILTIN,
             bash + look_read + text, bash[:1] + block(look_read, 0) + block(text, 0, to=1)
             + [tokens(text[-2], 15), text[-1]]),
            # The client answers its call; the CLI runs the built-in one itself.
            ("a built-in and a client call in one round: the client's call ends the answer",
             self.BUILTIN, mixed, mixed[:1] + block(mixed, 1, to=0) + mixed[-2:]),
            ("a built-in round, then a round ending at a client call", self.BUILTIN,
             bash + look_call, bash[:1] + block(look_call, 0) + block(look_call, 1)
             + [tokens(look_call[-2], 10), look_call[-1]]),
            # Not a tool_use stop: nothing runs the call, so the answer ends there.
            ("a built-in call cut off at max_tokens ends the answer", self.BUILTIN, cut,
             cut[:1] + block(cut, 0) + cut[-2:]),
            ("pings pass, deltas of a block never started do not", self.BUILTIN,
             bash[:1] + [ping, stray] + bash[1:] + text,
             bash[:1] + [ping] + block(text, 0) + [tokens(text[-2], 10), text[-1]]),
        ]
        for name, builtin, upstream, expected in cases:
            with self.subTest(name):
                before = copy.deepcopy(upstream)
                stream = proxy.AgentStream(builtin)
                self.assertEqual([out for event in upstream for out in stream.feed(event)],
                                 expected)
                self.assertEqual(upstream, before)      # the events are not changed


class ClientToolsTest(ApiAssertions, SharedProxyCase):
    """Client tools: tool_use out, tool_result back, on the parked live CLI."""

    def create(self, messages, tools=(WEATHER,), **kwargs):
        return self.client.messages.create(model="claude-sonnet-5-5", max_tokens=300,
                                           tools=list(tools), messages=messages, **kwargs)

    @staticmethod
    def answered(messages, message, results):
        return messages + [
            {"role": "assistant", "content": [b.model_dump(exclude_none=True)
                                              for b in message.content]},
            {"role": "user", "content": results}]

    def test_tool_use_and_its_result_continue_one_turn_on_one_cli(self):
        ask = [{"role": "user", "content": 'Weather? [[tool get_weather {"city": "Paris"}]]'}]
        message = self.create(ask)
        self.assertEqual(message.stop_reason, "tool_use")
        text, call = message.content
        self.assertEqual((text.type, text.text), ("text", "Calling."))
        self.assertEqual((call.type, call.name, call.input),
                         ("tool_use", "get_weather", {"city": "Paris"}))
        first = UPSTREAM.messages_requests()[0]["body"]
        self.assertEqual(first["tools"], [{**{k: WEATHER[k] for k in ("description",
                                                                      "input_schema")},
                                           "name": "mcp__c__get_weather"}],
                         "the client's tool, schema unchanged, and no other tool")
        final = self.create(self.answered(ask, message, [
            {"type": "tool_result", "tool_use_id": call.id, "content": "sunny, 21 C"}]))
        self.assertEqual(final.content[0].text, f"Results: {call.id}=sunny, 21 C")
        self.assertEqual(final.stop_reason, "end_turn")
        requests = UPSTREAM.messages_requests()
        self.assertEqual(len(requests), 2, "one upstream call per client request")
        self.assertEqual(len({r["headers"]["X-Claude-Code-Session-Id"] for r in requests}), 1)
        sent = conversation(requests[1]["body"])
        self.assertEqual([m["role"] for m in sent], ["user", "assistant", "user"])
        self.assertEqual([(b["type"], b.get("name")) for b in sent[1]["content"]],
                         [("text", None), ("tool_use", "mcp__c__get_weather")])
        [result] = sent[2]["content"]
        self.assertEqual((result["type"], result["tool_use_id"]), ("tool_result", call.id))

    def test_streamed_tool_use_arrives_as_input_json_deltas(self):
        ask = [{"role": "user", "content": 'Stream it [[tool get_weather {"city": "Oslo"}]]'}]
        with self.client.messages.stream(model="claude-sonnet-5-5", max_tokens=300,
                                         tools=[WEATHER], messages=ask) as stream:
            events = list(stream)
            message = stream.get_final_message()
        starts = [e for e in events if e.type == "content_block_start"]
        self.assertEqual([(e.content_block.type, getattr(e.content_block, "name", None))
                          for e in starts], [("text", None), ("tool_use", "get_weather")])
        fragments = [e.delta.partial_json for e in events if e.type == "content_block_delta"
                     and e.delta.type == "input_json_delta"]
        self.assertEqual(json.loads("".join(fragments)), {"city": "Oslo"})
        self.assertGreater(len(fragments), 1)
        self.assertEqual((message.stop_reason, message.content[1].input),
                         ("tool_use", {"city": "Oslo"}))
        with self.client.messages.stream(model="claude-sonnet-5-5", max_tokens=300,
                                         tools=[WEATHER], messages=self.answered(ask, message, [
                                             {"type": "tool_result",
                                              "tool_use_id": message.content[1].id,
                                              "content": "cold"}])) as stream:
            self.assertEqual(stream.get_final_message().content[0].text,
                             f"Results: {message.content[1].id}=cold")

    def test_long_tool_results_reach_the_upstream_whole(self):
        # The parked CLI keeps a result inline up to its ceiling (UTF-16 units) and
        # would send a longer one as a file path and a preview: those go by the
        # transcript. The CLI echoes a result in one output line: 1.1 MB is over the
        # SDK's default limit for a line.
        limit = proxy.MCP_RESULT_MAX_CHARS
        png = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                           "data": base64.b64encode(png_bytes(3, 2)).decode()}}
        cases = [("at the ceiling", ["a" * limit], True),
                 ("one UTF-16 unit past it", ["\U0001F600" + "b" * (limit - 1)], False),
                 ("two at the ceiling", ["c" * limit, "d" * limit], True),
                 ("1.1 MB", ["e" * 1_100_000], False),
                 # the CLI's cut at 25,000 tokens would drop the image and the tail
                 ("an image beside 120,000 characters",
                  [[{"type": "text", "text": "f" * 120_000}, png]], True)]
        for name, outputs, warm in cases:
            with self.subTest(name):
                UPSTREAM.clear()
                ask = [{"role": "user",
                        "content": name + " [[tool get_weather {}]]" * len(outputs)}]
                message = self.create(ask)
                calls = [block for block in message.content if block.type == "tool_use"]
                self.create(self.answered(ask, message, [
                    {"type": "tool_result", "tool_use_id": call.id, "content": output}
                    for call, output in zip(calls, outputs)]))
                first, second = UPSTREAM.messages_requests()
                sent = [as_blocks(block["content"])
                        for block in conversation(second["body"])[-1]["content"]]
                self.assertTrue(sent == [as_blocks(output) for output in outputs],
                                f"{name}: the results arrived whole")
                self.assertEqual(first["headers"]["X-Claude-Code-Session-Id"]
                                 == second["headers"]["X-Claude-Code-Session-Id"], warm)

    def test_results_the_parked_cli_would_reword_reach_the_upstream_as_sent(self):
        # It would send "(mcp__c__get_weather completed with no output)" for a blank
        # result; of an error, "Command failed with no output", or the text alone,
        # trimmed, parts joined, the middle cut out of a long one: these go by the
        # transcript.
        for blank in ({}, {"content": ""}, {"content": []}, {"content": " \n"},
                      {"content": "", "is_error": True},
                      {"content": "  no such city \n", "is_error": True},
                      {"content": "x" * 11_500, "is_error": True},
                      {"content": [{"type": "text", "text": "a"},
                                   {"type": "text", "text": "b"}], "is_error": True}):
            with self.subTest(str(blank)[:60]):
                UPSTREAM.clear()
                ask = [{"role": "user", "content": f"{blank} [[tool get_weather {{}}]]"}]
                message = self.create(ask)
                call = message.content[1]
                self.create(self.answered(ask, message, [
                    {"type": "tool_result", "tool_use_id": call.id, **blank}]))
                [sent] = conversation(UPSTREAM.messages_requests()[-1]["body"])[-1]["content"]
                self.assertEqual({k: sent[k] for k in ("content", "is_error") if k in sent},
                                 blank)

    def test_no_model_gets_a_token_countdown_after_the_clients_results(self):
        # For some models (4.x among them) the CLI appends "<total_tokens>N tokens
        # left" to the last tool result, on the parked path and on a resume.
        for model in ("claude-sonnet-4-5", "claude-opus-4-6"):
            with self.subTest(model=model):
                UPSTREAM.clear()
                ask = [{"role": "user", "content": "[[tool get_weather {}]]"}]
                message = self.client.messages.create(model=model, max_tokens=300,
                                                      tools=[WEATHER], messages=ask)
                answered = self.answered(ask, message, [{
                    "type": "tool_result", "tool_use_id": message.content[1].id,
                    "content": "sunny"}])
                for system in (None, "a new shape: a cold start from the transcript"):
                    self.client.messages.create(
                        model=model, max_tokens=300, tools=[WEATHER], messages=answered,
                        **({"system": system} if system else {}))
                    body = UPSTREAM.messages_requests()[-1]["body"]
                    sent = next(block for block in conversation(body)[-1]["content"]
                                if block["type"] == "tool_result")
                    self.assertEqual(as_blocks(sent["content"]), as_blocks("sunny"))
                    self.assertNotIn("total_tokens", json.dumps(body))

    def test_parallel_calls_long_names_error_and_image_results(self):
        ask = [{"role": "user", "content": 'Both [[tool get_weather {"city": "Rome"}]] '
                                           f'[[tool {LONG_TOOL["name"]} {{"a": 7}}]]'}]
        message = self.create(ask, tools=(WEATHER, LONG_TOOL))
        calls = [b for b in message.content if b.type == "tool_use"]
        self.assertEqual([(c.name, c.input) for c in calls],
                         [("get_weather", {"city": "Rome"}), (LONG_TOOL["name"], {"a": 7})])
        offered = [t["name"] for t in UPSTREAM.messages_requests()[0]["body"]["tools"]]
        self.assertTrue(all(len(name) <= 64 for name in offered), offered)
        png = base64.b64encode(png_bytes(3, 2)).decode()
        final = self.create(self.answered(ask, message, [
            {"type": "tool_result", "tool_use_id": calls[0].id, "is_error": True,
             "content": "no such city"},
            {"type": "tool_result", "tool_use_id": calls[1].id, "content": [
                {"type": "text", "text": "chart"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": png}}]}]), tools=(WEATHER, LONG_TOOL))
        self.assertEqual(final.content[0].text,
                         f"Results: {calls[0].id}=no such city (error), {calls[1].id}=chart|image")
        results = conversation(UPSTREAM.messages_requests()[1]["body"])[-1]["content"]
        self.assertEqual([(r["tool_use_id"], bool(r.get("is_error"))) for r in results],
                         [(calls[0].id, True), (calls[1].id, False)])
        self.assertEqual(strip_cache_control(results[1]["content"]), [
            {"type": "text", "text": "chart"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": png}}], "as sent, no note of a saved copy")

    def test_an_input_the_cli_cannot_hold_exactly_still_continues_the_turn(self):
        lookup = {"name": "lookup", "input_schema": {"type": "object", "properties": {
            "id": {"type": "integer"}}}}
        # JavaScript rounds this integer: the CLI's call differs from the tool_use.
        ask = [{"role": "user", "content": '[[tool lookup {"id": 12345678901234567890}]]'}]
        message = self.create(ask, tools=(lookup,))
        call = message.content[1]
        self.assertEqual(call.input, {"id": 12345678901234567890})
        final = self.create(self.answered(ask, message, [
            {"type": "tool_result", "tool_use_id": call.id, "content": "found"}]),
            tools=(lookup,))
        self.assertEqual(final.content[0].text, f"Results: {call.id}=found")
        self.assertEqual(len(UPSTREAM.messages_requests()), 2)

    def round_trip(self, asked: str, answers: list[str]) -> tuple[list[tuple], list]:
        """Ask for the calls in `asked`, answer them with `answers` in order; check
        the final answer quotes exactly those; return the (tool_use_id, answer)
        pairs and the tool_results the last upstream request carried."""
        UPSTREAM.clear()
        ask = [{"role": "user", "content": asked}]
        message = self.create(ask)
        pairs = [(b.id, answer) for b, answer in
                 zip([b for b in message.content if b.type == "tool_use"], answers)]
        final = self.create(self.answered(ask, message, [
            {"type": "tool_result", "tool_use_id": id_, "content": answer}
            for id_, answer in pairs]))
        self.assertEqual(final.content[0].text,
                         "Results: " + ", ".join(f"{id_}={answer}" for id_, answer in pairs))
        sent = conversation(UPSTREAM.messages_requests()[-1]["body"])[-1]["content"]
        return pairs, [(r["tool_use_id"], r["content"]) for r in sent
                       if r["type"] == "tool_result"]

    def test_calls_the_cli_would_not_pass_on_get_the_clients_results(self):
        # {"town": ...} lacks the schema's required "city": as with the real API the
        # client answers it, on the same warm CLI. A tool the client never offered
        # the CLI answers itself and would go on: the turn resumes from the transcript.
        ulm, bonn, ghost = ('[[tool get_weather {"city": "Ulm"}]]',
                            '[[tool get_weather {"town": "Bonn"}]]',
                            '[[builtin mcp__c__ghost {"x": 1}]]')
        for asked, answers, warm in ((bonn, ["rainy"], True),
                                     (ulm + bonn, ["sunny", "rainy"], True),
                                     (ghost, ["no such tool"], False),
                                     (ulm + ghost, ["sunny", "no such tool"], False)):
            with self.subTest(asked=asked):
                pairs, sent = self.round_trip(asked, answers)
                self.assertEqual(sent, [(id_, [{"type": "text", "text": answer}] if warm
                                         else answer) for id_, answer in pairs])
                sessions = {r["headers"]["X-Claude-Code-Session-Id"]
                            for r in UPSTREAM.messages_requests()}
                self.assertEqual(len(sessions) == 1, warm, sessions)

    def test_malformed_tool_results_are_400s(self):
        ask = [{"role": "user", "content": '[[tool get_weather {"city": "Ulm"}]]'}]
        message = self.create(ask)
        for part in ({"type": "text"}, {"type": "image", "source": "abc"}):
            with self.subTest(part=part):
                with self.assertRaises(anthropic.BadRequestError):
                    self.create(self.answered(ask, message, [
                        {"type": "tool_result", "tool_use_id": message.content[1].id,
                         "content": [part]}]))
        final = self.create(self.answered(ask, message, [
            {"type": "tool_result", "tool_use_id": message.content[1].id, "content": "ok"}]))
        self.assertEqual(final.content[0].text, f"Results: {message.content[1].id}=ok",
                         "the parked CLI still waits for the good answer")

    def test_tool_choice_reaches_the_upstream(self):
        self.create([{"role": "user", "content": "[[tool get_weather {\"city\": \"Nice\"}]]"}],
                    tools=(WEATHER, LONG_TOOL),
                    tool_choice={"type": "tool", "name": LONG_TOOL["name"]})
        self.assertEqual(UPSTREAM.messages_requests()[0]["body"]["tool_choice"],
                         {"type": "tool", "name": proxy.upstream_tool_name(LONG_TOOL["name"])})

    def test_results_after_the_cli_is_gone_resume_exactly_from_the_transcript(self):
        ask = [{"role": "user", "content": 'Later [[tool get_weather {"city": "Graz"}]]'}]
        message = self.create(ask)
        [parked] = [s for s in self.client.get("/sessions", cast_to=object)["data"]
                    if s["state"] == "awaiting_tools"]
        self.client.delete(f"/sessions/{parked['id']}", cast_to=object)
        call = message.content[1]
        final = self.create(self.answered(ask, message, [
            {"type": "tool_result", "tool_use_id": call.id, "content": "snow"}]))
        self.assertEqual(final.content[0].text, f"Results: {call.id}=snow")
        first, second = UPSTREAM.messages_requests()
        self.assertNotEqual(first["headers"]["X-Claude-Code-Session-Id"],
                            second["headers"]["X-Claude-Code-Session-Id"])
        sent = conversation(second["body"])
        self.assertEqual([m["role"] for m in sent], ["user", "assistant", "user"])
        self.assertEqual(strip_cache_control(sent[1]["content"])[1],
                         {"type": "tool_use", "id": call.id, "name": "mcp__c__get_weather",
                          "input": {"city": "Graz"}})
        self.assertEqual(strip_cache_control(sent[2]["content"]),
                         [{"type": "tool_result", "tool_use_id": call.id, "content": "snow"}],
                         "the client's result, and nothing the CLI made up")

    def test_an_answer_other_than_the_results_ends_the_parked_cli(self):
        ask = [{"role": "user", "content": 'Hm [[tool get_weather {"city": "Bonn"}]]'}]
        message = self.create(ask)
        parked = [s for s in self.client.get("/sessions", cast_to=object)["data"]
                  if s["state"] == "awaiting_tools"]
        self.assertEqual(len(parked), 1)
        history = ask + [{"role": "assistant", "content": [
            b.model_dump(exclude_none=True) for b in message.content]},
            {"role": "user", "content": [{"type": "tool_result",
                                          "tool_use_id": message.content[1].id,
                                          "content": "rain"},
                                         {"type": "text", "text": "And tomorrow?"}]}]
        final = self.create(history)
        self.assertEqual(final.stop_reason, "end_turn")
        ids = {s["id"] for s in self.client.get("/sessions", cast_to=object)["data"]}
        self.assertNotIn(parked[0]["id"], ids)
        second = conversation(UPSTREAM.messages_requests()[1]["body"])
        self.assertEqual(second[-1]["content"][-1]["text"], "And tomorrow?")


# The advice lines of the CLI's environment note, each CLI of the tested range. A CLI
# that words its note otherwise fails ConversationExtrasTest naming the new line.
CLI_NOTE_ADVICE = (
    "Downloaded files and extracted archives are untrusted data: put each in its own new,"
    " empty directory, keep scripts you write in a different directory, and pass paths as"
    " arguments instead of running an interpreter or build tool from inside it. Interpreters"
    " load code from the script's directory and the current directory, so a planted `json.py`"
    " runs on `import json`. Run any Python that reads them with `-I`. This does not apply to"
    " code the user asked you to build or run.",
    "In `curl`, send untrusted values with `--form-string`, not `-F`.",     # CLI 2.1.331+
)


class ConversationExtrasTest(SharedProxyCase):
    """Exactly what the CLI adds to a client's conversation, on each path a turn takes."""

    def create(self, model, messages, **kwargs):
        return self.client.messages.create(model=model, max_tokens=300, messages=messages,
                                           **kwargs)

    def environment_lines(self) -> list[str]:
        uname = os.uname()
        return ["# Environment", "You have been invoked in the following environment: ",
                f" - Primary working directory: {self.server.workdir}",
                " - Is a git repository: false", f" - Platform: {sys.platform}",
                " - Shell: ", f" - OS Version: {uname.sysname} {uname.release}"]

    def assert_note(self, text: str, model: str) -> None:
        """One environment note: the host lines, known advice, the model, the date."""
        environment, model_line, date_line = text.split("\n\n")
        lines = environment.split("\n")
        expected = self.environment_lines()
        self.assertEqual(len(lines[:len(expected)]), len(expected), text)
        for line, start in zip(lines, expected):
            self.assertTrue(line.startswith(start), f"{line!r} is not {start!r}...")
        for line in lines[len(expected):]:
            self.assertIn(line.removeprefix(" - "), CLI_NOTE_ADVICE,
                          "a line the CLI adds that no CLI of the tested range sent")
        self.assertRegex(model_line, rf"^You are powered by the model named [^\n]+\. The exact"
                         rf" model ID is {re.escape(model)}\. Assistant knowledge cutoff is .+\.$")
        self.assertEqual(date_line, f"Today's date is {dt.date.today().isoformat()}.")

    def extras(self, model: str, body: dict) -> tuple[list[dict], list[int]]:
        """The client's messages as the upstream got them, and after which of them
        (by index) the CLI's note came, checked against the note's exact text."""
        messages, after = [], []
        for message in body["messages"]:
            if message["role"] == "system":           # 5.x models: a message of its own
                self.assert_note(message["content"], model)
                after.append(len(messages) - 1)
                continue
            content = message["content"]
            if isinstance(content, list):              # older models: reminders in the turn
                reminders = [b["text"] for b in content if b.get("type") == "text"
                             and b["text"].startswith("<system-reminder>")]
                if reminders:
                    wrapped = [r.removeprefix("<system-reminder>\n").rstrip("\n")
                               .removesuffix("</system-reminder>").rstrip("\n")
                               for r in reminders]
                    self.assertEqual(len(wrapped), 3, reminders)
                    self.assert_note("\n\n".join(wrapped), model)
                    after.append(len(messages))
                    content = [b for b in content if b.get("text") not in reminders]
                content = strip_cache_control(content)
            messages.append({"role": message["role"], "content": content})
        return messages, after

    def paths(self, model):
        """The four paths of a turn, each with what the client sent on it."""
        ask = [{"role": "user", "content": "first"}]
        answer = self.create(model, ask)
        warm = ask + [{"role": "assistant", "content": answer.content[0].text},
                      {"role": "user", "content": "second"}]
        self.create(model, warm)
        resumed = [{"role": "user", "content": "other first"},
                   {"role": "assistant", "content": "ok"},
                   {"role": "user", "content": "other second"}]
        self.create(model, resumed)
        round_trips = []
        for city, evict in (("Graz", False), ("Wien", True)):
            call_ask = [{"role": "user", "content": f'{city} [[tool get_weather {{"city": "{city}"}}]]'}]
            message = self.create(model, call_ask, tools=[WEATHER])
            if evict:
                for session in self.client.get("/sessions", cast_to=object)["data"]:
                    if session["state"] == "awaiting_tools":
                        self.client.delete(f"/sessions/{session['id']}", cast_to=object)
            call = message.content[1]
            round_trips.append(call_ask + [
                {"role": "assistant", "content": [b.model_dump(exclude_none=True)
                                                  for b in message.content]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                              "content": city.lower()}]}])
            self.create(model, round_trips[-1], tools=[WEATHER])
        return warm, resumed, round_trips

    def check_paths(self, model):
        warm, resumed, (parked, revived) = self.paths(model)
        requests = [r["body"] for r in UPSTREAM.messages_requests()]
        self.assertEqual(len(requests), 7, "one upstream call a turn")
        seen = [self.extras(model, body) for body in requests]
        as_text = lambda ms: [{"role": m["role"], "content": as_blocks(m["content"])} for m in ms]
        # Warm: the note follows the first user turn, where the CLI began, and stays there.
        self.assertEqual((as_text(seen[1][0]), seen[1][1]), (as_text(warm), [0]))
        # From a transcript: the note follows the turn the CLI began with, the last.
        self.assertEqual((as_text(seen[2][0]), seen[2][1]), (as_text(resumed), [2]))
        # A tool round on the parked CLI: the note stays after the first turn, and the
        # client's result string arrives as the one text block it stands for.
        parked_sent = self.upstream_names(parked)
        parked_sent[2]["content"][0]["content"] = [{"type": "text", "text": "graz"}]
        self.assertEqual((as_text(seen[4][0]), seen[4][1]), (as_text(parked_sent), [0]))
        # A tool round after its CLI is gone: the results exactly, then the note.
        self.assertEqual((as_text(seen[6][0]), seen[6][1]),
                         (as_text(self.upstream_names(revived)), [2]))

    @staticmethod
    def upstream_names(messages):
        """The client's messages with its tool calls under their upstream names."""
        renamed = copy.deepcopy(messages)
        for block in renamed[1]["content"]:
            if block["type"] == "tool_use":
                block["name"] = proxy.upstream_tool_name(block["name"])
        return renamed

    def test_a_5x_model_gets_the_note_as_a_system_message(self):
        self.check_paths("claude-sonnet-5-5")

    def test_an_older_model_gets_the_note_as_reminders_in_a_user_turn(self):
        self.check_paths("claude-sonnet-4-5")


# =============================================================================
# 8. OpenAI Chat Completions
# =============================================================================

def chat_body(**changes) -> dict:
    """A valid Chat Completions request; a change to `...` deletes that key."""
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    return {k: v for k, v in {**body, **changes}.items() if v is not ...}


def text_block(t: str) -> dict:
    return {"type": "text", "text": t}


class OpenAITranslationTest(PureAssertions, unittest.TestCase):
    def test_messages_become_system_history_and_prompt(self):
        png = base64.b64encode(png_bytes(2, 2)).decode()
        body = chat_body(messages=[
            {"role": "system", "content": "Sys one."},
            {"role": "developer", "content": [text_block("Dev"), text_block("two.")]},
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "answer"},
            {"role": "user", "content": [
                text_block("look"),
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}])
        before = copy.deepcopy(body)
        turn = proxy.chat_request_to_turn(body, "sonnet", caller="key")
        self.assertEqual(body, before)
        self.assertEqual((turn.model, turn.system, turn.stream, turn.caller, turn.tools,
                          turn.params), ("sonnet", "Sys one.\n\nDev\n\ntwo.", False, "key", [], {}))
        self.assertEqual(turn.history, [{"role": U, "content": [text_block("first")]},
                                        {"role": A, "content": [text_block("answer")]}])
        self.assertEqual(turn.prompt, {"role": U, "content": [text_block("look"), {
            "type": "image", "source": {"type": "base64", "media_type": "image/png",
                                        "data": png}}, {
            "type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}]})
        claude = proxy.chat_request_to_turn(chat_body(model="claude-opus-5-5", stream=True,
                                                      user="u-1"), "sonnet", caller="key")
        self.assertEqual((claude.model, claude.stream, claude.caller, claude.system),
                         ("claude-opus-5-5", True, "key/u-1", ""))

    def test_tool_calls_and_results_and_merging(self):
        turn = proxy.chat_request_to_turn(chat_body(messages=[
            {"role": "user", "content": "a"}, {"role": "user", "content": [text_block("b")]},
            {"role": "assistant", "content": "Let me check."},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"id": "call_2", "type": "function", "function": {"name": "now",
                                                                  "arguments": ""}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            {"role": "tool", "tool_call_id": "call_2", "content": [text_block("noon")]},
            {"role": "user", "content": "thanks"}]), "sonnet")
        self.assertEqual(turn.history, [
            {"role": U, "content": [text_block("a"), text_block("b")]},
            {"role": A, "content": [
                text_block("Let me check."),
                {"type": "tool_use", "id": "call_1", "name": "get_weather",
                 "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "call_2", "name": "now", "input": {}}]}])
        self.assertEqual(turn.prompt, {"role": U, "content": [
            {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"},
            {"type": "tool_result", "tool_use_id": "call_2", "content": "noon"},
            text_block("thanks")]})

    def test_blank_text_is_left_out_as_the_messages_api_requires(self):
        # Clients echo Claude's blank text beside tool calls, and send empty messages.
        call = {"id": "call_1", "type": "function",
                "function": {"name": "now", "arguments": "{}"}}
        turn = proxy.chat_request_to_turn(chat_body(messages=[
            {"role": "user", "content": "a"}, {"role": "assistant", "content": ""},
            {"role": "user", "content": "b"},
            {"role": "assistant", "content": "\n\n", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "noon"}]), "sonnet")
        self.assertEqual(turn.history, [
            {"role": U, "content": [text_block("a"), text_block("b")]},
            {"role": A, "content": [{"type": "tool_use", "id": "call_1", "name": "now",
                                     "input": {}}]}])
        responses, _ = proxy.responses_request_to_turn({"model": "m", "input": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": [{"type": "output_text", "text": " "}]},
            {"role": "user", "content": ""},
            {"role": "user", "content": [{"type": "input_text", "text": "\n"},
                                         {"type": "input_text", "text": "b"}]}]}, "sonnet")
        self.assertEqual((responses.history, responses.prompt["content"]),
                         ([], [text_block("a"), text_block("b")]))
        for blank in ("", [{"type": "text", "text": " "}]):      # nothing to answer
            self.assertProxyError(INV, proxy.chat_request_to_turn, chat_body(messages=[
                {"role": "user", "content": "a"}, {"role": "user", "content": blank}]),
                "sonnet", message="messages.1.content: is blank; Claude needs something "
                                  "to answer.")
        stored = proxy.answer_as_history({"content": [
            {"type": "text", "text": "\n\n"}, {"type": "tool_use", "id": "t", "name": "n",
                                               "input": {}}]})
        self.assertEqual(stored, [{"role": "assistant", "content": [
            {"type": "tool_use", "id": "t", "name": "n", "input": {}}]}])
        self.assertEqual(proxy.answer_as_history({"content": [text_block("")]}), [])

    def test_parameters_become_carried_params(self):
        tools = {"tools": CHAT_TOOLS}
        fmt = {"output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}}
        schema = {"type": "object", "properties": {"a": {"type": "string"}}}
        table = [
            ({}, {}), ({"max_tokens": 10}, {"max_tokens": 10}),
            ({"max_tokens": 10, "max_completion_tokens": 20}, {"max_tokens": 20}),
            ({"max_completion_tokens": 30}, {"max_tokens": 30}),
            ({"temperature": 0.5, "top_p": 0.9}, {"temperature": 0.5, "top_p": 0.9}),
            ({"stop": "END"}, {"stop_sequences": ["END"]}),
            ({"stop": ["A", "B"]}, {"stop_sequences": ["A", "B"]}),
            ({**tools, "tool_choice": "none"}, {"tool_choice": {"type": "none"}}),
            ({**tools, "tool_choice": "auto"}, {"tool_choice": {"type": "auto"}}),
            ({**tools, "tool_choice": "required"}, {"tool_choice": {"type": "any"}}),
            ({**tools, "tool_choice": {"type": "function", "function": {"name": "now"}}},
             {"tool_choice": {"type": "tool", "name": proxy.upstream_tool_name("now")}}),
            ({**tools, "parallel_tool_calls": True}, {}),
            ({**tools, "parallel_tool_calls": False},
             {"tool_choice": {"type": "auto", "disable_parallel_tool_use": True}}),
            ({**tools, "tool_choice": "required", "parallel_tool_calls": False},
             {"tool_choice": {"type": "any", "disable_parallel_tool_use": True}}),
            ({**tools, "tool_choice": "none", "parallel_tool_calls": False},
             {"tool_choice": {"type": "none"}}),
            ({**tools, "parallel_tool_calls": False,
              "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
             {"tool_choice": {"type": "tool", "name": "mcp__c__get_weather",
                              "disable_parallel_tool_use": True}}),
            ({"response_format": {"type": "json_object"}}, fmt),
            ({"response_format": {"type": "json_schema", "json_schema": {
                "name": "r", "strict": True, "schema": schema}}},
             {"output_config": {"format": {"type": "json_schema", "schema": schema}}}),
            ({"response_format": {"type": "text"}, "max_tokens": 5}, {"max_tokens": 5}),
            ({"reasoning_effort": "minimal"}, {"output_config": {"effort": "low"}}),
            ({"reasoning_effort": "none"}, {"output_config": {"effort": "low"}}),
            ({"reasoning_effort": "xhigh"}, {"output_config": {"effort": "xhigh"}}),
            ({"reasoning_effort": "high", "response_format": {"type": "json_object"}},
             {"output_config": {**fmt["output_config"], "effort": "high"}}),
            ({"store": False, "metadata": {"k": "v"}, "service_tier": "auto", "seed": None,
              "modalities": ["text"], "n": 1, "logprobs": False,
              "stream_options": {"include_usage": True}, "prompt_cache_key": "k",
              "prompt_cache_retention": "24h", "verbosity": "low"}, {})]
        for changes, params in table:
            with self.subTest(changes=changes):
                self.assertEqual(proxy.chat_request_to_turn(chat_body(**changes), "s").params,
                                 params)
        self.assertEqual(proxy.chat_request_to_turn(chat_body(**tools), "s").tools, [
            {"name": "get_weather", "description": "Weather.", "input_schema": {
                "type": "object", "properties": {"city": {"type": "string"}}}},
            {"name": "now", "input_schema": {"type": "object", "properties": {}}}])
        self.assertIsNone(proxy._chat_response_format(None))
        self.assertIsNone(proxy._chat_response_format({"type": "text"}))
        for changes, caller in (({"user": "u1"}, "key/u1"),          # the end user
                                ({"user": "u1", "safety_identifier": "s1"}, "key/s1")):
            self.assertEqual(proxy.chat_request_to_turn(chat_body(**changes), "s", "key").caller,
                             caller)

    def test_unsupported_parameters_are_400_naming_them(self):
        changed = {"n": 2, "logprobs": True, "top_logprobs": 2, "logit_bias": {"50256": -100},
                   "presence_penalty": 0.5, "frequency_penalty": -1, "seed": 42,
                   "audio": {"voice": "alloy", "format": "mp3"},
                   "prediction": {"type": "content", "content": "x"}, "web_search_options": {}}
        self.assertEqual(set(changed), set(proxy.CHAT_UNSUPPORTED))
        for name, value in changed.items():
            with self.subTest(name=name):
                default = proxy.CHAT_UNSUPPORTED[name]
                self.assertEqual(proxy.chat_request_to_turn(
                    chat_body(**{name: default}), "s").params, {})
                self.assertProxyError(INV, proxy.chat_request_to_turn,
                                      chat_body(**{name: value}), "s", message=(
                                          f"{name}: not supported by this proxy "
                                          "(Claude cannot honour it)."))
        self.assertProxyError(INV, proxy.chat_request_to_turn,
                              chat_body(bogus=1, functions=[]), "s",
                              message="bogus, functions: unknown or unsupported parameter.")

    def test_invalid_requests_are_400_naming_the_field(self):
        def msgs(*messages):
            return {"messages": [*messages, {"role": "user", "content": "q"}]}

        def image(url):
            return msgs({"role": "user", "content": [{"type": "image_url",
                                                      "image_url": {"url": url}}]})

        def call(arguments):
            return msgs({"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                         "function": {"name": "f", "arguments": arguments}}]})
        table = [
            (image("ftp://example.com/a.png"),
             "messages.0.content.0.image_url.url: must be an http(s) URL or a base64 data URI."),
            (image("data:text/plain;base64,aGk="), "messages.0.content.0.image_url.url: must"),
            (image("example.com/a.png"), "messages.0.content.0.image_url.url: must"),
            (msgs({"role": "user", "content": [{"type": "audio"}]}),
             "messages.0.content.0.type: must be 'text' or 'image_url'."),
            (call("{not json"), "messages.0.tool_calls.0.function.arguments: must be a JSON "
                                "object."),
            (call("[1, 2]"), "messages.0.tool_calls.0.function.arguments: must be a JSON object."),
            (call({"a": 1}), "messages.0.tool_calls.0: needs an id and a function"),
            (msgs({"role": "tool", "content": "x"}), "messages.0.tool_call_id: required."),
            (msgs({"role": "function", "content": "x"}), "messages.0.role: must be system"),
            (msgs({"role": "system", "content": [{"type": "image_url"}]}),
             "messages.0.content: must be a string or a list of text parts."),
            ({"messages": []}, "messages: required, a non-empty list."),
            ({"messages": [{"role": "system", "content": "s"}]}, "messages: required"),
            ({"tools": [{"type": "code_interpreter"}]}, "tools.0: must be a function tool."),
            ({"tools": CHAT_TOOLS, "tool_choice": "sometimes"}, "tool_choice: must be 'none'"),
            ({"tools": CHAT_TOOLS, "tool_choice": {"type": "function"}}, "tool_choice: must be"),
            ({"tools": CHAT_TOOLS, "tool_choice": {"type": "function", "function": {
                "name": "other"}}},
             "tool_choice.function.name: must name one of the request's tools."),
            ({"response_format": {"type": "yaml"}}, "response_format.type: must be 'text', "
                                                    "'json_object' or 'json_schema'."),
            ({"response_format": {"type": "json_schema", "json_schema": {"name": "r"}}},
             "response_format.json_schema.schema: required, an object."),
            ({"reasoning_effort": "max"}, "reasoning_effort: must be one of none, minimal,"),
            ({"user": 7}, "user: must be a string."), ({"temperature": 1.5}, "temperature:"),
            ({"max_completion_tokens": 0}, "max_completion_tokens: must be an integer of at "
                                           "least 1."),
            ({"max_tokens": 0}, "max_tokens: must be an integer of at least 1."),
            ({"stop": [""]}, "stop: must be a non-empty string or a list of non-empty strings."),
            ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
                "type": "string"}}}]}, "tools.0.function.parameters: must be a JSON schema"),
            ({"tools": [{"type": "function", "function": {"name": "f g"}}]},
             "tools.0.function.name: must be 1-64 letters"),
            # The shared rules, at the client's own message: a result of no call.
            (msgs({"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                  {"role": "assistant", "content": "b"},
                  {"role": "tool", "tool_call_id": "c9", "content": "r"}),
             "messages.3: unexpected `tool_use_id` found in `tool_result` blocks: c9.")]
        for changes, prefix in table:
            with self.subTest(changes=changes):
                self.assertProxyError(INV, proxy.chat_request_to_turn, chat_body(**changes), "s",
                                      prefix=prefix)

    def test_chat_usage_counts_cached_tokens_in_the_prompt(self):
        table = [({}, (0, 0, 0, 0)), ({"input_tokens": 5, "output_tokens": 7}, (5, 7, 12, 0)),
                 ({"input_tokens": 17, "cache_read_input_tokens": 3, "output_tokens": 42,
                   "cache_creation_input_tokens": 2}, (22, 42, 64, 3)),
                 ({"input_tokens": 1, "cache_read_input_tokens": None}, (1, 0, 1, 0))]
        for usage, (prompt, completion, total, cached) in table:
            with self.subTest(usage=usage):
                self.assertEqual(proxy.chat_usage(usage), {
                    "prompt_tokens": prompt, "completion_tokens": completion,
                    "total_tokens": total, "prompt_tokens_details": {"cached_tokens": cached}})

    def test_message_to_chat_completion(self):
        usage = {"input_tokens": 10, "cache_read_input_tokens": 4, "output_tokens": 6}
        message = {"id": "msg_1", "model": "claude-x", "stop_reason": "tool_use", "usage": usage,
                   "content": [{"type": "thinking", "thinking": "hmm", "signature": "s"},
                               text_block("Hel"), text_block("lo"),
                               {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                "input": {"city": "Paris"}}]}
        call = {"id": "toolu_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}
        self.assertEqual(proxy.chat_tool_call(message["content"][3]), call)
        self.assertEqual(proxy.message_to_chat_completion(message, "chatcmpl-1", 1700000000), {
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000,
            "model": "claude-x", "choices": [{"index": 0, "logprobs": None,
                                              "finish_reason": "tool_calls", "message": {
                                                  "role": "assistant", "content": "Hello",
                                                  "refusal": None, "tool_calls": [call]}}],
            "usage": {"prompt_tokens": 14, "completion_tokens": 6, "total_tokens": 20,
                      "prompt_tokens_details": {"cached_tokens": 4}}})
        for content, stop, reply, finish in [
                ([text_block("cut")], "max_tokens", "cut", "length"),
                ([text_block("ok")], "end_turn", "ok", "stop"),
                ([text_block("ok")], None, "ok", "stop"),
                ([{"type": "thinking", "thinking": "x"}], "refusal", None, "content_filter")]:
            with self.subTest(stop=stop):
                choice = proxy.message_to_chat_completion(
                    {**message, "content": content, "stop_reason": stop}, "c", 0)["choices"][0]
                self.assertEqual((choice["message"], choice["finish_reason"]), (
                    {"role": "assistant", "content": reply, "refusal": None}, finish))

    def test_chunk_translator_over_a_full_stream(self):
        def delta(i, **d):
            return {"type": "content_block_delta", "index": i, "delta": d}
        events = [
            {"type": "message_start", "message": {"id": "msg_1", "model": "claude-x",
                                                  "usage": {"input_tokens": 10,
                                                            "cache_read_input_tokens": 2}}},
            {"type": "content_block_start", "index": 0, "content_block": text_block("")},
            delta(0, type="text_delta", text="Hel"), delta(0, type="text_delta", text="lo"),
            {"type": "content_block_stop", "index": 0}, {"type": "ping"},
            {"type": "content_block_start", "index": 1, "content_block": {
                "type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}},
            delta(1, type="input_json_delta", partial_json=""),
            delta(1, type="input_json_delta", partial_json='{"ci'),
            delta(1, type="input_json_delta", partial_json='ty": "Paris"}'),
            {"type": "content_block_stop", "index": 1},
            {"type": "message_delta", "delta": {"stop_reason": "tool_use"},
             "usage": {"output_tokens": 9, "cache_read_input_tokens": None}},
            {"type": "message_stop"}]
        base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 5,
                "model": "claude-x"}

        def chunk(delta, finish=None):
            return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": finish}]}

        def args(fragment):
            return chunk({"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]})
        expected = [chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}),
                    chunk({"content": "lo"}),
                    chunk({"tool_calls": [{"index": 0, "id": "toolu_1", "type": "function",
                                           "function": {"name": "get_weather",
                                                        "arguments": ""}}]}),
                    args('{"ci'), args('ty": "Paris"}'), chunk({}, "tool_calls")]
        usage = {**base, "choices": [], "usage": {
            "prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21,
            "prompt_tokens_details": {"cached_tokens": 2}}}
        for include_usage, tail in [(True, [usage]), (False, [])]:
            with self.subTest(include_usage=include_usage):
                translator = proxy.ChunkTranslator("chatcmpl-1", 5, include_usage)
                chunks = [c for event in events for c in translator.feed(event)]
                self.assertEqual(chunks, expected + tail)
                self.assertEqual(sum(c["choices"][0]["finish_reason"] is not None
                                     for c in chunks if c["choices"]), 1)

    def test_chunk_translator_numbers_tool_calls_and_maps_finish(self):
        translator = proxy.ChunkTranslator("c", 0, False)
        translator.feed({"type": "message_start", "message": {"model": "m"}})
        for index, name in [(1, "a"), (3, "b")]:
            start = translator.feed({"type": "content_block_start", "index": index,
                                     "content_block": {"type": "tool_use", "id": name,
                                                       "name": name, "input": {}}})
            self.assertEqual(start[0]["choices"][0]["delta"]["tool_calls"][0]["index"],
                             "ab".index(name))
        fragment = translator.feed({"type": "content_block_delta", "index": 3, "delta": {
            "type": "input_json_delta", "partial_json": "{}"}})
        self.assertEqual(fragment[0]["choices"][0]["delta"]["tool_calls"][0]["index"], 1)
        # A call without input streams one empty fragment (the API's way): "{}" at its end.
        empty = translator.feed({"type": "content_block_delta", "index": 1, "delta": {
            "type": "input_json_delta", "partial_json": ""}})
        ends = [translator.feed({"type": "content_block_stop", "index": i}) for i in (1, 3)]
        self.assertEqual((empty, ends[1]), ([], []))
        self.assertEqual(ends[0][0]["choices"][0]["delta"]["tool_calls"],
                         [{"index": 0, "function": {"arguments": "{}"}}])
        for stop, finish in [("end_turn", "stop"), ("stop_sequence", "stop"), (None, "stop"),
                             ("max_tokens", "length"), ("tool_use", "tool_calls"),
                             ("pause_turn", "stop"), ("refusal", "content_filter")]:
            with self.subTest(stop=stop):
                done = translator.feed({"type": "message_delta", "delta": {"stop_reason": stop}})
                self.assertEqual(done[0]["choices"][0]["finish_reason"], finish)
        self.assertEqual(set(proxy.FINISH_REASONS) - {"end_turn", "stop_sequence", "max_tokens",
                                                      "tool_use", "pause_turn", "refusal",
                                                      "model_context_window_exceeded"}, set())

    def test_error_to_openai(self):
        for err, kind in [(proxy.InvalidRequest("bad"), "invalid_request_error"),
                          (proxy.RateLimited("slow"), "rate_limit_error"),
                          (proxy.Overloaded("busy"), "overloaded_error")]:
            with self.subTest(kind=kind):
                self.assertEqual(proxy.error_to_openai(err), {"error": {
                    "message": err.message, "type": kind, "param": None, "code": None}})

    def test_responses_errors_name_the_clients_own_fields_in_message_and_param(self):
        def call(arguments):
            return {"input": [{"role": "user", "content": "q"}, {
                "type": "function_call", "call_id": "c", "name": "f", "arguments": arguments},
                {"type": "function_call_output", "call_id": "c", "output": "r"}]}
        table = [   # (changes, message prefix, OpenAI's param)
            (call("{not json"), "input.1.arguments: must be a JSON object.",
             "input[1].arguments"),
            ({"max_output_tokens": 0}, "max_output_tokens: must be an integer of at least 1.",
             "max_output_tokens"),
            ({"reasoning": {"effort": "max"}}, "reasoning.effort: must be one of none,",
             "reasoning.effort"),
            ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "array"}}]},
             "tools.0.parameters: must be a JSON schema with type 'object'.",
             "tools[0].parameters"),
            ({"tools": [{"type": "namespace", "name": "ns", "tools": [
                {"type": "function", "name": "f", "parameters": []}]}]},
             "tools.0.tools.0.parameters: must be", "tools[0].tools[0].parameters"),
            ({"text": {"format": {"type": "json_schema", "name": "r"}}},
             "text.format.schema: required, an object.", "text.format.schema"),
            ({"temperature": 3}, "temperature: must be a number between 0 and 1.",
             "temperature"),
            # The shared rules, at the client's own item: an output of no call.
            ({"input": [{"role": "user", "content": "q"}, {
                "type": "function_call_output", "call_id": "c7", "output": "r"}]},
             "input.1: unexpected `tool_use_id` found", "input[1]"),
            ({"input": [{"role": "user", "content": "q"}, {"role": "user", "content": " "}]},
             "input.1.content: is blank", "input[1].content"),
        ]
        for changes, prefix, param in table:
            with self.subTest(changes=changes):
                err = self.assertProxyError(
                    INV, proxy.responses_request_to_turn,
                    {"model": "gpt-5", "input": "hi", **changes}, "s", prefix=prefix)
                self.assertEqual(proxy.error_to_openai(err)["error"]["param"], param)


class OpenAIMalformedValuesTest(PureAssertions, unittest.TestCase):
    def test_malformed_values_are_400s_and_nulls_mean_absent(self):
        tools = [{"type": "function", "function": {"name": "f"}}]
        for extra, prefix in [
                ({"tools": tools, "tool_choice": {"type": "function", "function": "f"}},
                 "tool_choice: must be"),
                ({"tool_choice": ["auto"]}, "tool_choice: must be"),
                ({"response_format": {"type": "json_schema", "json_schema": "x"}},
                 "response_format.json_schema.schema: required"),
                ({"reasoning_effort": ["low"]}, "reasoning_effort: must be one of"),
                ({"stream_options": True}, "stream_options: must be an object"),
                ({"stream_options": {"include_usage": "no"}}, "stream_options: must be"),
                ({"safety_identifier": 7}, "safety_identifier: must be a string")]:
            with self.subTest(extra=extra):
                self.assertProxyError(INV, proxy.chat_request_to_turn, chat_body(**extra),
                                      "sonnet", prefix=prefix)
        turn = proxy.chat_request_to_turn(chat_body(max_completion_tokens=None, max_tokens=5,
                                                    stream=None), "sonnet")
        self.assertEqual((turn.params, turn.stream), ({"max_tokens": 5}, False))
        self.assertProxyError(INV, proxy.responses_request_to_turn,
                              {"input": "hi", "instructions": ["Be brief."]}, "sonnet",
                              prefix="instructions: must be a string")


class OpenAIChatTest(OpenAICase):
    """Chat Completions through the official openai SDK, on the same engine."""

    def test_both_base_urls_answer_and_list_models(self):
        for base in ("/v1", "/v1/chat"):
            with self.subTest(base=base):
                client = self.server.openai_client(base)
                completion = client.chat.completions.create(
                    model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
                self.assertEqual(completion.object, "chat.completion")
                self.assertEqual(completion.choices[0].message.content, UPSTREAM_TEXT)
                self.assertEqual(completion.choices[0].finish_reason, "stop")
                self.assertEqual(completion.model, UPSTREAM.messages_requests()[-1]["body"]["model"])
                self.assertEqual((completion.usage.prompt_tokens, completion.usage.completion_tokens,
                                  completion.usage.total_tokens,
                                  completion.usage.prompt_tokens_details.cached_tokens),
                                 (17 + 3 + 2, 42, 64, 3))
                self.assertIn("claude-sonnet-5-5", [m.id for m in client.models.list()])

    def test_messages_and_parameters_reach_the_upstream(self):
        png = base64.b64encode(png_bytes(2, 2)).decode()
        self.client.chat.completions.create(
            model="claude-opus-5-5", max_completion_tokens=77, temperature=0.5, stop="END",
            user="u-1", response_format={"type": "json_schema", "json_schema": {
                "name": "r", "schema": {"type": "object", "properties": {"a": {"type": "string"}},
                                        "additionalProperties": False}}},
            messages=[{"role": "system", "content": "Sys one."},
                      {"role": "developer", "content": "Dev two."},
                      {"role": "user", "content": "first"},
                      {"role": "assistant", "content": "answer"},
                      {"role": "user", "content": [
                          {"type": "text", "text": "look"},
                          {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
                          {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}])
        body = UPSTREAM.messages_requests()[0]["body"]
        self.assertEqual(body["system"][-1]["text"], "Sys one.\n\nDev two.")
        self.assertEqual((body["max_tokens"], body["temperature"], body["stop_sequences"]),
                         (77, 0.5, ["END"]))
        self.assertEqual(body["output_config"]["format"]["schema"]["properties"],
                         {"a": {"type": "string"}})
        sent = conversation(body)
        self.assertEqual([m["role"] for m in sent], ["user", "assistant", "user"])
        blocks = strip_cache_control(sent[2]["content"])
        self.assertEqual(blocks[1], {"type": "image", "source": {
            "type": "base64", "media_type": "image/png", "data": png}})
        self.assertEqual(blocks[2], {"type": "image", "source": {
            "type": "url", "url": "https://example.com/a.png"}})

    def test_stream_chunks_with_usage_and_done(self):
        chunks = list(self.client.chat.completions.create(
            model="sonnet", messages=[{"role": "user", "content": "hi"}], stream=True,
            stream_options={"include_usage": True}))
        self.assertEqual(chunks[0].choices[0].delta.role, "assistant")
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        self.assertEqual(text, UPSTREAM_TEXT)
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices
                    and c.choices[0].finish_reason]
        self.assertEqual(finishes, ["stop"])
        self.assertEqual((chunks[-1].choices, chunks[-1].usage.completion_tokens), ([], 42))
        body = json.dumps({"model": "sonnet", "stream": True,
                           "messages": [{"role": "user", "content": "raw"}]}).encode()
        raw = raw_exchange(self.server.port, b"POST /v1/chat/completions HTTP/1.1\r\n"
                           b"Host: localhost\r\nContent-Type: application/json\r\n"
                           b"Connection: close\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        self.assertIn(b"data: [DONE]", raw)
        self.assertNotIn(b"event:", raw)

    def test_tool_calls_round_trip_streamed_through_the_accumulator(self):
        ask = [{"role": "user", "content": 'Weather? [[tool get_weather {"city": "Lima"}]]'}]
        with self.client.chat.completions.stream(model="sonnet", messages=ask,
                                                 tools=[OPENAI_WEATHER]) as stream:
            completion = stream.get_final_completion()
        choice = completion.choices[0]
        self.assertEqual(choice.finish_reason, "tool_calls")
        [call] = choice.message.tool_calls
        self.assertEqual((call.function.name, json.loads(call.function.arguments)),
                         ("get_weather", {"city": "Lima"}))
        self.assertEqual(UPSTREAM.messages_requests()[0]["body"]["tools"][0]["name"],
                         "mcp__c__get_weather")
        final = self.client.chat.completions.create(model="sonnet", tools=[OPENAI_WEATHER],
                                                    messages=ask + [
            choice.message.model_dump(exclude_none=True, exclude={"parsed"}),
            {"role": "tool", "tool_call_id": call.id, "content": "warm"}])
        self.assertEqual(final.choices[0].message.content, f"Results: {call.id}=warm")
        requests = UPSTREAM.messages_requests()
        self.assertEqual(len({r["headers"]["X-Claude-Code-Session-Id"] for r in requests}), 1)
        self.assertEqual(conversation(requests[1]["body"])[-1]["content"][0]["tool_use_id"],
                         call.id)

    def test_non_streamed_parallel_tool_calls(self):
        completion = self.client.chat.completions.create(
            model="sonnet", tools=[OPENAI_WEATHER], tool_choice="required",
            messages=[{"role": "user", "content": '[[tool get_weather {"city": "A"}]] '
                                                  '[[tool get_weather {"city": "B"}]]'}])
        calls = completion.choices[0].message.tool_calls
        self.assertEqual([json.loads(c.function.arguments)["city"] for c in calls], ["A", "B"])
        self.assertEqual(UPSTREAM.messages_requests()[0]["body"]["tool_choice"], {"type": "any"})

    def test_errors_in_openai_shape_with_the_same_statuses(self):
        with self.assertRaises(openai.BadRequestError) as caught:
            self.client.chat.completions.create(model="sonnet", n=2,
                                                messages=[{"role": "user", "content": "hi"}])
        self.assertEqual(caught.exception.body["message"],
                         "n: not supported by this proxy (Claude cannot honour it).")
        self.assertEqual((caught.exception.body["type"], caught.exception.param),
                         ("invalid_request_error", "n"))
        with self.assertRaises(openai.BadRequestError) as caught:
            self.client.responses.create(model="sonnet", input="hi", max_output_tokens=0)
        self.assertEqual((caught.exception.message.split(" - ")[0], caught.exception.param),
                         ("Error code: 400", "max_output_tokens"))
        self.assertEqual(caught.exception.body["message"],
                         "max_output_tokens: must be an integer of at least 1.")
        # An unknown model id is a 404 in the caller's own API's shape.
        with self.assertRaises(openai.NotFoundError) as caught:
            self.client.models.retrieve("no-such-model")
        self.assertEqual(set(caught.exception.response.json()), {"error"})
        self.assertEqual(set(caught.exception.response.json()["error"]),
                         {"message", "type", "param", "code"})
        for stream in (False, True):    # a stream's head waits for the first event
            with self.subTest(stream=stream):
                with self.assertRaises(openai.RateLimitError) as caught:
                    self.client.chat.completions.create(
                        model="sonnet", stream=stream,
                        messages=[{"role": "user", "content": "[[error 429]]"}])
                self.assertEqual(caught.exception.body["type"], "rate_limit_error")
                self.assertIn("retry-after", caught.exception.response.headers)
                with self.assertRaises(openai.InternalServerError) as caught:
                    self.client.chat.completions.create(
                        model="sonnet", stream=stream,
                        messages=[{"role": "user", "content": "[[error 529]]"}])
                self.assertEqual(caught.exception.status_code, 529)
                with self.assertRaises(openai.RateLimitError) as caught:
                    self.client.responses.create(model="sonnet", input="[[error 429]]",
                                                 stream=stream)
                self.assertIn("retry-after", caught.exception.response.headers)


# =============================================================================
# 9. OpenAI Responses
# =============================================================================

class ResponseTranslatorTest(unittest.TestCase):
    """ResponseTranslator: upstream stream events into Responses API events and the
    `response` object they build."""

    ID_PREFIXES = {"message": "msg_", "function_call": "fc_", "custom_tool_call": "ctc_",
                   "reasoning": "rs_", "tool_search_call": "tsc_"}
    # upstream_message's usage: 3 input tokens, 1 output at the start, 5 at the end.
    USAGE = {"input_tokens": 3, "input_tokens_details": {"cached_tokens": 0},
             "output_tokens": 5, "output_tokens_details": {"reasoning_tokens": 0},
             "total_tokens": 8}
    BEGUN = ["response.created", "response.in_progress"]
    TEXT = ["response.output_item.added", "response.content_part.added",
            "response.output_text.delta", "response.output_text.done",
            "response.content_part.done", "response.output_item.done"]
    FUNCTION = ["response.output_item.added", "response.function_call_arguments.delta",
                "response.function_call_arguments.done", "response.output_item.done"]

    @staticmethod
    def tools() -> dict:
        """The tools of a request as responses_request_to_turn hands them on."""
        offered = proxy.responses_tools([
            {"type": "namespace", "name": "files", "tools": [{"type": "function",
                                                              "name": "read"}]},
            {"type": "custom", "name": "apply_patch"},
            {"type": "function", "name": "get_weather"}])
        return {name: tool for name, (tool, _) in offered.items()}

    def translate(self, events: list[dict], request: dict | None = None):
        translator = proxy.ResponseTranslator("resp_1", 7, request or {}, self.tools())
        return translator, [out for event in events for out in translator.feed(event)]

    @staticmethod
    def message(*blocks: dict, stop: str = "end_turn") -> list[dict]:
        return [sdk_message.event for sdk_message in upstream_message(*blocks, stop=stop)]

    def without_id(self, item: dict) -> dict:
        """An output item without its random id, which must carry its type's prefix."""
        self.assertTrue(item["id"].startswith(self.ID_PREFIXES[item["type"]]), item)
        return {key: value for key, value in item.items() if key != "id"}

    def assertWellFormed(self, events: list[dict], output: list[dict]):
        """Numbered from 0 without gaps; each event names its output item by the
        item's position and id; a finished item's deltas add up to its text or
        arguments."""
        self.assertEqual([e["sequence_number"] for e in events], list(range(len(events))))
        for event in events:
            if "output_index" in event:
                item = output[event["output_index"]]
                self.assertEqual(event.get("item_id", (event.get("item") or {}).get("id")),
                                 item["id"], event)
        for position, item in enumerate(output):
            deltas = "".join(e["delta"] for e in events if e.get("output_index") == position
                             and e["type"].endswith(".delta"))
            whole = item["content"][0]["text"] if item["type"] == "message" else \
                item.get("arguments", "")
            # A call without input streams no delta at all (its row says so).
            if deltas and item.get("status") == "completed":
                self.assertEqual(deltas, whole, item)
        for event in events:
            if event["type"] == "response.output_item.added":     # begun, never finished
                self.assertIn(event["item"].get("status"), ("in_progress", None))

    def test_answers_become_responses_events_and_output_items(self):
        hi = {"type": "text", "text": "Hi"}
        read = {"type": "tool_use", "id": "toolu_1", "name": "files__read",
                "input": {"path": "a.txt"}}
        unknown = {"type": "tool_use", "id": "toolu_2", "name": "lookup", "input": {}}
        patch = {"type": "tool_use", "id": "toolu_3", "name": "apply_patch",
                 "input": {"input": "*** Begin Patch"}}
        no_input = self.message(unknown, stop="tool_use")
        no_input[2] = {**no_input[2], "delta": {"type": "input_json_delta",
                                                "partial_json": ""}}     # as the API sends it
        thinking = [
            {"type": "message_start", "message": {"id": "m", "model": "m", "content": [],
                                                  "usage": {"input_tokens": 3}}},
            {"type": "content_block_start", "index": 0,
             "content_block": {"type": "thinking", "thinking": "", "signature": ""}},
            {"type": "content_block_delta", "index": 0,
             "delta": {"type": "thinking_delta", "thinking": "Hmm."}},
            {"type": "content_block_stop", "index": 0},
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
             "usage": {"output_tokens": 5}},
            {"type": "message_stop"}]

        def said(text):
            return {"type": "message", "status": "completed", "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}]}

        def called(call_id, name, arguments, **namespace):
            return {"type": "function_call", "call_id": call_id, "status": "completed",
                    "name": name, "arguments": arguments, **namespace}
        cases = [   # (name, upstream events, event types, status, incomplete reason, output)
            ("a text answer", self.message(hi), self.BEGUN + self.TEXT
             + ["response.completed"], "completed", None, [said("Hi")]),
            ("a namespaced function call: the client's name and namespace",
             self.message(read, stop="tool_use"), self.BEGUN + self.FUNCTION
             + ["response.completed"], "completed", None,
             [called("toolu_1", "read", '{"path": "a.txt"}', namespace="files")]),
            # An empty input streams its "{}" as one delta, so the deltas add up.
            ("a call of a name the tools do not know: a plain function call", no_input,
             self.BEGUN
             + ["response.output_item.added", "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done", "response.completed"], "completed", None,
             [called("toolu_2", "lookup", "{}")]),
            ("a custom tool call: its input string whole at the end",
             self.message(patch, stop="tool_use"), self.BEGUN
             + ["response.output_item.added", "response.custom_tool_call_input.done",
                "response.output_item.done", "response.completed"], "completed", None,
             [{"type": "custom_tool_call", "call_id": "toolu_3", "status": "completed",
               "name": "apply_patch", "input": "*** Begin Patch"}]),
            ("text, then a call: two items in order", self.message(hi, read, stop="tool_use"),
             self.BEGUN + self.TEXT + self.FUNCTION + ["response.completed"], "completed",
             None, [said("Hi"), called("toolu_1", "read", '{"path": "a.txt"}',
                                       namespace="files")]),
            ("a max_tokens stop: incomplete", self.message(hi, stop="max_tokens"),
             self.BEGUN + self.TEXT + ["response.incomplete"], "incomplete",
             "max_output_tokens", [said("Hi")]),
            ("a refusal: incomplete, by the content filter", self.message(hi, stop="refusal"),
             self.BEGUN + self.TEXT + ["response.incomplete"], "incomplete",
             "content_filter", [said("Hi")]),
            ("thinking: a reasoning item with the thinking as its summary", thinking,
             self.BEGUN + ["response.output_item.added", "response.output_item.done",
                           "response.completed"], "completed", None,
             [{"type": "reasoning", "summary": [{"type": "summary_text", "text": "Hmm."}]}]),
        ]
        for name, upstream, kinds, status, reason, output in cases:
            with self.subTest(name):
                translator, events = self.translate(upstream)
                self.assertEqual([e["type"] for e in events], kinds)
                final = translator.response()
                self.assertEqual(events[-1]["response"], final)
                self.assertEqual((final["status"], final["incomplete_details"], final["usage"]),
                                 (status, reason and {"reason": reason}, self.USAGE))
                self.assertEqual([self.without_id(item) for item in final["output"]], output)
                self.assertWellFormed(events, final["output"])
                for begun in events[:2]:        # a response begun has no output yet
                    self.assertEqual((begun["response"]["status"], begun["response"]["output"],
                                      begun["response"]["usage"]), ("in_progress", [], None))

    def test_a_stream_broken_off_ends_in_error_and_response_failed(self):
        done = {"type": "text", "text": "Done."}
        weather = {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                   "input": {"city": "Ulm"}}
        # message() events: [start, block 0 start/delta/stop, block 1 start/delta/stop, ...]
        text_begun = self.message(done)[:3]
        call_then_text_begun = self.message(weather, done)[:6]
        begun_usage = {**self.USAGE, "output_tokens": 1, "total_tokens": 4}
        cases = [   # (name, events before, error, event types, code, output, usage)
            # A stream whose head went out on a ping: the response begins, then fails.
            ("before any event", [], proxy.RateLimited("Slow down."),
             self.BEGUN + ["error", "response.failed"], "rate_limit_exceeded", [], None),
            ("a prompt too long: OpenAI's own code", [], proxy.PromptTooLong("prompt is too long"),
             self.BEGUN + ["error", "response.failed"], "context_length_exceeded", [], None),
            ("mid-text: the open message is incomplete", text_begun, proxy.Overloaded("Busy."),
             self.BEGUN + self.TEXT[:3] + ["error", "response.failed"], "server_error",
             [{"type": "message", "status": "incomplete", "role": "assistant", "content": [
                 {"type": "output_text", "text": "Done.", "annotations": []}]}], begun_usage),
            ("after a whole call: the call stays completed", call_then_text_begun,
             proxy.BadGateway("The CLI went away."),
             self.BEGUN + self.FUNCTION + self.TEXT[:3] + ["error", "response.failed"],
             "server_error",
             [{"type": "function_call", "call_id": "toolu_1", "status": "completed",
               "name": "get_weather", "arguments": '{"city": "Ulm"}'},
              {"type": "message", "status": "incomplete", "role": "assistant", "content": [
                  {"type": "output_text", "text": "Done.", "annotations": []}]}], begun_usage),
        ]
        for name, upstream, err, kinds, code, output, usage in cases:
            with self.subTest(name):
                translator, events = self.translate(upstream)
                events += translator.failed(err)
                self.assertEqual([e["type"] for e in events], kinds)
                error, failed = events[-2], events[-1]["response"]
                self.assertEqual(error, {
                    "type": "error", "sequence_number": len(events) - 2, "code": code,
                    "message": err.message, "param": None, "error": {
                        "type": err.error_type, "code": code, "message": err.message,
                        "param": None}})
                self.assertEqual((failed["status"], failed["error"], failed["incomplete_details"],
                                  failed["usage"]),
                                 ("failed", {"code": code, "message": err.message}, None, usage))
                self.assertEqual([self.without_id(item) for item in failed["output"]], output)
                self.assertEqual([e["sequence_number"] for e in events], list(range(len(events))))

    def test_the_response_echoes_the_request_and_fills_in_the_defaults(self):
        request = {"instructions": "Be brief.", "max_output_tokens": 100,
                   "metadata": {"k": "v"}, "parallel_tool_calls": False,
                   "previous_response_id": "resp_0", "temperature": 0.2,
                   "tool_choice": "required", "tools": [{"type": "function", "name": "f"}],
                   "top_p": 0.9, "text": {"format": {"type": "json_object"}},
                   "reasoning": {"effort": "low"}, "store": False, "truncation": "auto",
                   "input": "hi", "model": "gpt-5", "stream": True}
        common = {"id": "resp_1", "object": "response", "created_at": 7, "error": None,
                  "model": "m", "status": "completed", "incomplete_details": None,
                  "usage": self.USAGE}
        cases = [   # (name, request, the response without its output)
            ("a request setting everything echoed", request, {
                **common, **{key: request[key] for key in proxy.ResponseTranslator.ECHOED},
                "truncation": "disabled"}),     # the proxy never truncates
            ("an empty request: the API's defaults", {}, {
                **common, "instructions": None, "max_output_tokens": None, "metadata": {},
                "parallel_tool_calls": True, "previous_response_id": None,
                "temperature": None, "tool_choice": "auto", "tools": [], "top_p": None,
                "text": {"format": {"type": "text"}}, "reasoning": None, "store": True,
                "truncation": "disabled"}),
        ]
        for name, body, expected in cases:
            with self.subTest(name):
                translator, _ = self.translate(self.message({"type": "text", "text": "Hi"}),
                                               body)
                final = translator.response()
                self.assertEqual({k: v for k, v in final.items() if k != "output"}, expected)


class OpenAIResponsesTest(OpenAICase):
    """The Responses API through the official openai SDK, on the same engine."""

    def test_answers_cut_short_are_incomplete_or_length_in_both_dialects(self):
        for stop, finish, reason in (("max_tokens", "length", "max_output_tokens"),
                                     ("model_context_window_exceeded", "length",
                                      "max_output_tokens"),
                                     ("refusal", "content_filter", "content_filter")):
            with self.subTest(stop=stop):
                response = self.client.responses.create(model="sonnet",
                                                        input=f"[[stop {stop}]] go")
                self.assertEqual((response.status, response.incomplete_details.reason),
                                 ("incomplete", reason))
                completion = self.client.chat.completions.create(
                    model="sonnet", messages=[{"role": "user", "content": f"[[stop {stop}]] go"}])
                self.assertEqual(completion.choices[0].finish_reason, finish)

    def test_text_with_instructions_and_usage(self):
        response = self.client.responses.create(model="gpt-5", instructions="Be brief.",
                                                input="hi", max_output_tokens=99)
        self.assertEqual((response.object, response.status), ("response", "completed"))
        self.assertEqual(response.output_text, UPSTREAM_TEXT)
        self.assertEqual((response.usage.input_tokens, response.usage.output_tokens,
                          response.usage.total_tokens,
                          response.usage.input_tokens_details.cached_tokens), (22, 42, 64, 3))
        body = UPSTREAM.messages_requests()[0]["body"]
        self.assertEqual((body["system"][-1]["text"], body["max_tokens"]), ("Be brief.", 99))
        self.assertEqual(response.model, body["model"])

    def test_stream_helper_events_and_final_response(self):
        png = base64.b64encode(png_bytes(2, 2)).decode()
        with self.client.responses.stream(model="sonnet", input=[{"role": "user", "content": [
                {"type": "input_text", "text": "what is this?"},
                {"type": "input_image", "image_url": f"data:image/png;base64,{png}"}]}]) as stream:
            kinds = [event.type for event in stream]
            final = stream.get_final_response()
        self.assertEqual(kinds[:4], ["response.created", "response.in_progress",
                                     "response.output_item.added",
                                     "response.content_part.added"])
        self.assertEqual(kinds[-4:], ["response.output_text.done", "response.content_part.done",
                                      "response.output_item.done", "response.completed"])
        self.assertEqual(final.output_text, UPSTREAM_TEXT)
        sent = conversation(UPSTREAM.messages_requests()[0]["body"])[0]["content"]
        self.assertEqual(strip_cache_control(sent)[1], {"type": "image", "source": {
            "type": "base64", "media_type": "image/png", "data": png}})

    def function_round_trip(self, follow_up):
        ask = 'Weather? [[tool get_weather {"city": "Kyiv"}]] [[tool get_weather {"city": "Riga"}]]'
        first = self.client.responses.create(model="sonnet", input=ask,
                                             tools=[RESPONSES_WEATHER])
        calls = [item for item in first.output if item.type == "function_call"]
        self.assertEqual([(c.name, json.loads(c.arguments)) for c in calls],
                         [("get_weather", {"city": "Kyiv"}), ("get_weather", {"city": "Riga"})])
        outputs = [{"type": "function_call_output", "call_id": c.call_id, "output": f"out {i}"}
                   for i, c in enumerate(calls)]
        final = follow_up(first, ask, outputs)
        self.assertEqual(final.output_text, f"Results: {calls[0].call_id}=out 0, "
                                            f"{calls[1].call_id}=out 1")
        requests = UPSTREAM.messages_requests()
        self.assertEqual(len(requests), 2)
        self.assertEqual(len({r["headers"]["X-Claude-Code-Session-Id"] for r in requests}), 1,
                         "the parked CLI answered the function_call_outputs")
        sent = conversation(requests[1]["body"])
        self.assertEqual([b["type"] for b in sent[1]["content"]],
                         ["text", "tool_use", "tool_use"])
        self.assertEqual([b["tool_use_id"] for b in sent[2]["content"]],
                         [c.call_id for c in calls])

    def test_function_calls_stateless_round_trip(self):
        def follow_up(first, ask, outputs):
            echoed = [item.model_dump(exclude_none=True) for item in first.output]
            return self.client.responses.create(model="sonnet", tools=[RESPONSES_WEATHER],
                                                input=[{"role": "user", "content": ask}] +
                                                echoed + outputs)
        self.function_round_trip(follow_up)

    def test_function_calls_with_previous_response_id(self):
        def follow_up(first, ask, outputs):
            return self.client.responses.create(model="sonnet", tools=[RESPONSES_WEATHER],
                                                previous_response_id=first.id, input=outputs)
        self.function_round_trip(follow_up)

    def test_unknown_previous_id_builtin_tools_and_upstream_errors(self):
        with self.assertRaises(openai.BadRequestError) as caught:
            self.client.responses.create(model="sonnet", input="x",
                                         previous_response_id="resp_unknown")
        self.assertIn("previous_response_id: 'resp_unknown' is unknown",
                      caught.exception.body["message"])
        with self.assertRaises(openai.BadRequestError) as caught:
            self.client.responses.create(model="sonnet", input="x",
                                         tools=[{"type": "web_search"}],
                                         tool_choice={"type": "web_search"})
        self.assertIn("'web_search' is a hosted tool", caught.exception.body["message"])
        stored = self.client.responses.create(model="sonnet", input="not kept", store=False)
        with self.assertRaises(openai.BadRequestError):
            self.client.responses.create(model="sonnet", input="x",
                                         previous_response_id=stored.id)
        kept = self.client.responses.create(model="sonnet", input="kept for its caller")
        other_caller = self.server.openai_client(api_key="another-key")
        with self.assertRaises(openai.BadRequestError) as caught:
            other_caller.responses.create(model="sonnet", input="x",
                                          previous_response_id=kept.id)
        self.assertIn("is unknown", caught.exception.body["message"])
        with self.assertRaises(openai.BadRequestError) as caught:
            self.client.responses.create(model="sonnet", input="x",
                                         previous_response_id=[kept.id])
        self.assertEqual(caught.exception.body["message"],
                         "previous_response_id: must be a string.")
        with self.assertRaises(openai.RateLimitError):
            self.client.responses.create(model="sonnet", input="[[error 429]]")


# =============================================================================
# 10. SDK adapter
# =============================================================================

def stream_event(event: dict, parent: str | None = None):
    return proxy.sdk.StreamEvent(uuid="u", session_id="s", event=event,
                                 parent_tool_use_id=parent)


def upstream_message(*blocks: dict, stop: str = "end_turn") -> list:
    """One upstream message as the CLI streams it: SDK StreamEvents."""
    events: list[dict] = [{"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "m", "content": [],
        "usage": {"input_tokens": 3, "output_tokens": 1}}}]
    for index, block in enumerate(blocks):
        start, delta = ({"type": "text", "text": ""}, {"type": "text_delta", "text": block["text"]}) \
            if block["type"] == "text" else ({**block, "input": {}}, {
                "type": "input_json_delta", "partial_json": json.dumps(block["input"])})
        events += [{"type": "content_block_start", "index": index, "content_block": start},
                   {"type": "content_block_delta", "index": index, "delta": delta},
                   {"type": "content_block_stop", "index": index}]
    events += [{"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                "usage": {"output_tokens": 5}}, {"type": "message_stop"}]
    return [stream_event(event) for event in events]


def sdk_result(is_error: bool = False, **fields):
    return proxy.sdk.ResultMessage(
        subtype="error_during_execution" if is_error else "success", duration_ms=1,
        duration_api_ms=1, is_error=is_error, num_turns=1, session_id="s", **fields)


def describe_turn_event(event) -> object:
    """A TurnEvent in short: a Delta's event type (and a tool call's name), an
    Answer's stop reason, text and tool calls, else the event's class name."""
    if isinstance(event, proxy.Delta):
        block = event.event.get("content_block") or {}
        return (event.event["type"], block["name"]) if block.get("type") == "tool_use" \
            else event.event["type"]
    if isinstance(event, proxy.Answer):
        texts = [b["text"] for b in event.message["content"] if b["type"] == "text"]
        return ("Answer", event.message["stop_reason"], texts[0] if texts else None,
                [call["name"] for call in event.tool_calls])
    return type(event).__name__


class SdkSurfaceTest(unittest.TestCase):
    """What the proxy relies on in the SDK and the CLI, by name: an SDK or CLI release
    that moves one fails here, in seconds, saying which (some drift hangs the
    end-to-end tests instead of failing them)."""

    def test_private_sdk_names_the_proxy_uses(self):
        import inspect
        import claude_agent_sdk as sdk
        from claude_agent_sdk._internal import query
        from claude_agent_sdk._internal.transport import subprocess_cli
        from claude_agent_sdk._internal import _mcp_compat
        from claude_agent_sdk import _cli_version
        client_source = inspect.getsource(sdk.ClaudeSDKClient)
        table = [
            ("_cli_version.__cli_version__",
             isinstance(getattr(_cli_version, "__cli_version__", None), str)),
            ("_internal._mcp_compat.build_tool_server",
             callable(getattr(_mcp_compat, "build_tool_server", None))),
            ("ClaudeSDKClient._transport", "self._transport" in client_source),
            ("ClaudeSDKClient._query", "self._query" in client_source),
            ("Query._send_control_request",
             callable(getattr(query.Query, "_send_control_request", None))),
            ("Query.close_receive_stream",
             callable(getattr(query.Query, "close_receive_stream", None))),
            ("SubprocessCLITransport._process",
             "self._process" in inspect.getsource(subprocess_cli.SubprocessCLITransport)),
            # CLIs start in sessions of their own through the module attribute.
            ("anyio.open_process(...) in the transport",
             "anyio.open_process(" in inspect.getsource(subprocess_cli)),
            ("the _internal.query logger's 'Fatal error in message reader'",
             query.logger.name == "claude_agent_sdk._internal.query" and
             "Fatal error in message reader" in inspect.getsource(query)),
        ]
        for name, present in table:
            with self.subTest(name=name):
                self.assertTrue(present, f"the SDK moved {name}")

    def test_sdk_options_messages_and_errors_the_proxy_reads(self):
        import claude_agent_sdk as sdk
        options = {f.name for f in dataclasses.fields(sdk.ClaudeAgentOptions)}
        for name in ("allowed_tools", "cli_path", "cwd", "env", "extra_args",
                     "include_partial_messages", "max_buffer_size", "max_turns", "mcp_servers",
                     "model", "resume", "session_store", "setting_sources", "stderr",
                     "strict_mcp_config", "system_prompt", "thinking", "tools", "sandbox",
                     "verbatim_prompts"):
            with self.subTest(option=name):
                self.assertIn(name, options, f"ClaudeAgentOptions.{name} moved")
        for message, fields in ((sdk.StreamEvent, ("event", "parent_tool_use_id")),
                                (sdk.RateLimitEvent, ("rate_limit_info",)),
                                (sdk.ResultMessage, ("is_error", "subtype", "result",
                                                     "api_error_status", "terminal_reason")),
                                (sdk.RateLimitInfo, ("raw",))):
            present = {f.name for f in dataclasses.fields(message)}
            for name in fields:
                with self.subTest(field=f"{message.__name__}.{name}"):
                    self.assertIn(name, present, f"{message.__name__}.{name} moved")
        for name in ("CLIConnectionError", "CLINotFoundError", "ProcessError", "ResultError",
                     "McpSdkServerConfig", "ClaudeSDKClient"):
            with self.subTest(name=name):
                self.assertTrue(hasattr(sdk, name), f"claude_agent_sdk.{name} moved")

    def test_cli_variables_and_strings_are_in_the_bundled_cli(self):
        import mmap
        turn = dataclasses.replace(proxy.messages_request_to_turn(valid_body(), "sonnet"),
                                   tools=[WEATHER], betas="x")
        names = [name for name in proxy.cli_environment(turn)
                 if not name.startswith("CLAUDE_PROXY_")]
        names += ["CLAUDE_CODE_RESUME_INTERRUPTED_TURN", "CLAUDE_CONFIG_DIR",
                  "CLAUDE_CODE_OAUTH_TOKEN", "ANTHROPIC_BASE_URL"]
        strings = ["rewind_conversation", "no-session-persistence",
                   "anthropic/maxResultSizeChars", "API Error:", "prompt_too_long"]
        self.assertGreaterEqual(len(names), 15)
        binary = proxy.cli_binary(proxy.Config())
        with open(binary, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as cli:
            for name in names + strings:
                with self.subTest(name=name):
                    self.assertGreaterEqual(cli.find(name.encode()), 0,
                                            f"the bundled CLI no longer knows {name}")

    def test_the_installed_sdk_is_in_the_tested_range_and_notes_say_so(self):
        import claude_agent_sdk as sdk
        self.assertEqual(proxy.sdk_version_notes(sdk.__version__), ([], []))
        older, _ = proxy.sdk_version_notes("0.2.179")
        self.assertIn("older than 0.2.180", older[0])
        self.assertIn("-m pip install 'claude-agent-sdk>=0.2.180' --upgrade", older[0])
        _, newer = proxy.sdk_version_notes("0.2.999")
        self.assertIn("newer than 0.2.189", newer[0])


class SdkAdapterTest(unittest.TestCase):
    def test_the_cli_never_inherits_the_proxys_key(self):
        turn = proxy.messages_request_to_turn(valid_body(), "sonnet")
        self.assertEqual(proxy.cli_environment(turn)["CLAUDE_PROXY_API_KEY"], "")

    def test_cli_watch_stops_a_cli_that_goes_on_without_the_client(self):
        text, call = {"type": "text", "text": "Hi"}, {"type": "tool_use", "id": "toolu_1",
                                                       "name": "mcp__c__f", "input": {}}
        end, tools = upstream_message(text), upstream_message(call, stop="tool_use")
        cases = [       # (messages, calls that reached the broker, where it stops)
            ("another call after a whole answer", end + end[:1], 0, len(end)),
            ("the next turn after the result", end + [sdk_result()] + end[:1], 0, None),
            ("a call after the client's results", tools + end[:1], 1, None),
            ("a call although a tool call never reached the broker", tools + end[:1], 0,
             len(tools)),
            ("a subagent's call", [stream_event(end[0].event, parent="toolu_0")], 0, 0),
        ] + [(f"{reason}, which the CLI answers itself", upstream_message(
            text, stop=reason), 0, 4) for reason in proxy.CLI_GOES_ON_AFTER] + [
            ("a subagent's max_tokens", [stream_event(e.event, parent="toolu_0")
                                         for e in upstream_message(text, stop="max_tokens")
                                         if e.event["type"] != "message_start"], 0, None)]
        for name, messages, reached, stop_at in cases:
            with self.subTest(name):
                broker = proxy.ToolBroker()
                watch = proxy.CliWatch(broker)
                said = []
                for index, message in enumerate(messages):
                    if index == len(messages) - 1:
                        broker.reached += reached
                    if watch(message):
                        said.append(index)
                self.assertEqual(said, [] if stop_at is None else [stop_at])
                self.assertEqual(broker.broken, "never reached" in name)

    def test_turn_reader_turns_sdk_messages_into_turn_events(self):
        text = {"type": "text", "text": "Hi"}
        call = {"type": "tool_use", "id": "toolu_1", "name": "mcp__c__get_weather",
                "input": {"city": "Ulm"}}
        bash = {"type": "tool_use", "id": "toolu_2", "name": "Bash", "input": {}}
        whole = upstream_message(text)
        broken = whole[:3] + [stream_event(e) for e in (
            {"type": "content_block_stop", "index": 0},
            {"type": "message_delta", "delta": {"stop_reason": None}, "usage": {}},
            {"type": "message_stop"})]
        max_tokens = upstream_message(text, stop="max_tokens")
        limit = {"status": "rejected", "resetsAt": 4102444800, "rateLimitType": "five_hour"}
        rate_limit = proxy.sdk.RateLimitEvent(rate_limit_info=proxy.sdk.RateLimitInfo(
            status="rejected", raw=limit), uuid="u", session_id="s")
        stream = ["message_start", "content_block_start", "content_block_delta",
                  "content_block_stop", "message_delta", "message_stop"]
        cases = [   # (name, SDK messages, events as (kind, detail), or the error raised)
            ("an answer", whole + [sdk_result()],
             stream + [("Answer", "end_turn", "Hi", []), "Finished"]),
            ("a client tool call, under the client's name", upstream_message(
                call, stop="tool_use"), ["message_start", ("content_block_start",
                                                           "get_weather")] + stream[2:]
             + [("Answer", "tool_use", None, ["mcp__c__get_weather"])]),
            ("a stream the upstream broke off", broken + [sdk_result(is_error=True)],
             stream[:3] + [proxy.BadGateway]),
            ("a max_tokens stop it would go on after", max_tokens[:4]
             + [proxy.WentOnAt(max_tokens[4])],
             stream + [("Answer", "max_tokens", "Hi", []), "WentOn"]),
            ("another call after the answer", whole + [proxy.WentOnAt(whole[0])],
             stream + [("Answer", "end_turn", "Hi", []), "WentOn"]),
            ("a call before any answer", [proxy.WentOnAt(whole[0])], [proxy.CliWentOn]),
            ("a call mid-answer", whole[:2] + [proxy.WentOnAt(whole[0])],
             stream[:2] + [proxy.BadGateway]),
            ("an agent round, folded", upstream_message(bash, stop="tool_use") + whole,
             stream + [("Answer", "end_turn", "Hi", [])]),
            ("a spent window", [rate_limit, sdk_result(
                is_error=True, api_error_status=429, result="API Error: 429 limit")],
             ["RateLimitReport", proxy.RateLimited]),
            ("a result without a message", [sdk_result()], [proxy.BadGateway]),
            ("a subagent's events", [stream_event(e.event, parent="toolu_0")
                                     for e in whole] + whole, stream
             + [("Answer", "end_turn", "Hi", [])]),
        ]
        for name, messages, expected in cases:
            with self.subTest(name):
                reader = proxy.TurnReader({"mcp__c__get_weather": "get_weather"}, {"Bash"})
                seen = []
                try:
                    for message in messages:
                        seen += [describe_turn_event(e) for e in reader.feed(message)]
                except proxy.ProxyError as err:
                    seen.append(type(err))
                self.assertEqual(seen, expected)

    def test_a_dead_process_is_dead_before_it_is_reaped(self):
        # asyncio learns of a CLI's death a moment later: a turn sent then would fail.
        import subprocess
        child = subprocess.Popen(["sleep", "60"])
        self.addCleanup(child.wait)
        self.assertTrue(proxy.process_exists(child.pid))
        child.kill()
        self.assertTrue(wait_until(lambda: process_state(child.pid) == "Z"))
        self.assertFalse(proxy.process_exists(child.pid), "a zombie")
        child.wait()
        self.assertFalse(proxy.process_exists(child.pid), "gone")


class ResultErrorTest(unittest.TestCase):
    """result_error: a CLI result that reports an error as the ProxyError a client sees."""

    RESET = 4102444800                  # 2100-01-01T00:00:00Z
    NOW = RESET - 100
    SPENT = {"status": "rejected", "resetsAt": RESET, "rateLimitType": "five_hour"}
    LOGIN = "The proxy's Claude login is missing or was rejected."
    SPENT_MESSAGE = ("Claude subscription 5-hour limit reached; it resets at "
                     "2100-01-01T00:00:00Z. This is a usage limit of the subscription, not a "
                     "transient throttle.")
    DEFAULT_WAIT = {"retry-after": str(proxy.RETRY_AFTER_DEFAULT_S)}

    def test_cli_results_become_the_errors_a_client_should_see(self):
        expired = ('API Error: 401 {"type":"error","error":{"type":"authentication_error",'
                   '"message":"OAuth token has expired."}} · Please run /login')
        server_side = (". This is a server-side issue, usually temporary \u2014 try again in "
                       "a moment.")
        spent_text = {"api_error_status": 429, "result": "API Error: 429 limit"}
        cases = [   # (name, result data, rate-limit info, class, message start, its end,
                    #  headers)
            ("api_error_status 401", {"api_error_status": 401, "result": expired}, None,
             proxy.AuthenticationFailed, self.LOGIN,
             '(upstream: {"type":"error","error":{"type":"authentication_error","message":'
             '"OAuth token has expired."}} · Please run /login)', {}),
            ("'Not logged in' without a status", {"result": "Not logged in · Please run /login"},
             None, proxy.AuthenticationFailed, self.LOGIN,
             "(upstream: Not logged in · Please run /login)", {}),
            ("the CLI's other words for a refused login", {
                "result": "Authentication required · Sign in again to continue"}, None,
             proxy.AuthenticationFailed, self.LOGIN,
             "(upstream: Authentication required · Sign in again to continue)", {}),
            ("a revoked token", {"result": "Failed to authenticate: OAuth token revoked."},
             None, proxy.AuthenticationFailed, self.LOGIN,
             "(upstream: Failed to authenticate: OAuth token revoked.)", {}),
            ("a spent window with its reset: no retry in seconds", spent_text, self.SPENT,
             proxy.RateLimited, self.SPENT_MESSAGE, self.SPENT_MESSAGE,
             {"retry-after": "100", "x-should-retry": "false"}),
            ("a spent window's 429 read from the text", {"result": "API Error: 429 limit"},
             self.SPENT, proxy.RateLimited, self.SPENT_MESSAGE, self.SPENT_MESSAGE,
             {"retry-after": "100", "x-should-retry": "false"}),
            ("a spent window resetting now: retry after one second", spent_text,
             {**self.SPENT, "resetsAt": self.NOW}, proxy.RateLimited,
             "Claude subscription 5-hour limit reached; it resets at 2099-12-31T23:58:20Z.",
             "not a transient throttle.", {"retry-after": "1", "x-should-retry": "false"}),
            ("a spent window whose reset is past: retry after one second", spent_text,
             {**self.SPENT, "resetsAt": self.NOW - 50}, proxy.RateLimited,
             "Claude subscription 5-hour limit reached; it resets at 2099-12-31T23:57:30Z.",
             "not a transient throttle.", {"retry-after": "1", "x-should-retry": "false"}),
            ("a 429 without rate-limit info: a throttle", spent_text, None, proxy.RateLimited,
             "limit", "limit", self.DEFAULT_WAIT),
            ("a 429 while the window is not rejected: a throttle", spent_text,
             {**self.SPENT, "status": "allowed_warning"}, proxy.RateLimited, "limit", "limit",
             self.DEFAULT_WAIT),
            ("a rejected window without a reset: a throttle", spent_text,
             {"status": "rejected", "rateLimitType": "five_hour"}, proxy.RateLimited, "limit",
             "limit", self.DEFAULT_WAIT),
            ("terminal_reason prompt_too_long", {
                "api_error_status": 400, "terminal_reason": "prompt_too_long",
                "result": "Prompt is too long"}, None, proxy.PromptTooLong,
             "prompt is too long", "(the proxy never shortens it)", {}),
            ("'API Error: 529 ...' without a status", {"result": "API Error: 529 Overloaded"
                                                       + server_side},
             None, proxy.Overloaded, "Overloaded", "Overloaded", self.DEFAULT_WAIT),
            ("api_error_status 500", {"api_error_status": 500,
                                      "result": "API Error: 500 Internal server error"
                                      + server_side},
             None, proxy.UpstreamError, "Internal server error", "Internal server error", {}),
            ("the CLI's status wins over the one in its text",
             {"api_error_status": 500, "result": "API Error: 529 Overloaded"}, None,
             proxy.UpstreamError, "Overloaded", "Overloaded", {}),
            ("api_error_status 400", {"api_error_status": 400,
                                      "result": "API Error: 400 messages.1: bad"},
             None, proxy.InvalidRequest, "messages.1: bad", "messages.1: bad", {}),
            ("api_error_status 403", {"api_error_status": 403, "result": "API Error: 403 no"},
             None, proxy.PermissionDenied, "no", "no", {}),
            ("no status: the CLI's errors joined", {
                "subtype": "error_during_execution", "errors": ["Stream closed", "again"]},
             None, proxy.BadGateway, "The Claude Code CLI reported an error: Stream closed; "
             "again", "again", {}),
            ("'API Error:' without a status number", {"result": "API Error: Connection error."},
             None, proxy.BadGateway,
             "The Claude Code CLI reported an error: API Error: Connection error.",
             "Connection error.", {}),
            ("no status, only a subtype", {"subtype": "error_max_turns"}, None,
             proxy.BadGateway, "The Claude Code CLI reported an error: error_max_turns",
             "error_max_turns", {}),
            ("nothing at all", {}, None, proxy.BadGateway,
             "The Claude Code CLI reported an error: unknown error", "unknown error", {}),
        ]
        for name, data, rate_limit, kind, start, end, headers in cases:
            with self.subTest(name):
                err = proxy.result_error(data, rate_limit, self.NOW)
                self.assertIs(type(err), kind, err.message)
                self.assertTrue(err.message.startswith(start), err.message)
                self.assertTrue(err.message.endswith(end), err.message)
                self.assertEqual(err.headers, headers)

    def test_each_class_has_the_status_clients_see(self):
        # The table above names classes; their statuses are what reaches the client.
        for kind, status in [(proxy.AuthenticationFailed, 401), (proxy.RateLimited, 429),
                             (proxy.PromptTooLong, 400), (proxy.Overloaded, 529),
                             (proxy.UpstreamError, 500), (proxy.BadGateway, 502),
                             (proxy.PermissionDenied, 403), (proxy.InvalidRequest, 400)]:
            with self.subTest(kind.__name__):
                self.assertEqual(kind("x").status, status)


class RateLimitHeadersTest(unittest.TestCase):
    """rate_limit_headers and usage_windows: the CLI's raw rate-limit info as the API's
    anthropic-ratelimit-unified-* headers and as GET /usage."""

    RESET = 4102444800                  # 2100-01-01T00:00:00Z
    P = "anthropic-ratelimit-unified-"
    # As the CLI reports it (its rate_limit_event's raw info), fields it adds included.
    WARNING = {"status": "allowed_warning", "resetsAt": RESET, "rateLimitType": "five_hour",
               "utilization": 0.91, "isUsingOverage": False, "surpassedThreshold": 0.9,
               "unifiedWindows": {
                   "five_hour": {"utilization": 0.91, "resetsAt": RESET,
                                 "status": "allowed_warning", "surpassedThreshold": 0.9},
                   "seven_day": {"utilization": 0.25, "resetsAt": RESET + 86400}}}

    def test_rate_limit_info_becomes_the_unified_headers(self):
        p, reset = self.P, str(self.RESET)
        cases = [   # (name, info, headers)
            ("nothing known", {}, {}),
            ("the representative window", {"status": "rejected", "resetsAt": self.RESET,
                                           "rateLimitType": "seven_day"},
             {p + "status": "rejected", p + "reset": reset,
              p + "representative-claim": "seven_day"}),
            ("resets in whole seconds", {"resetsAt": self.RESET + 0.7, "unifiedWindows": {
                "five_hour": {"resetsAt": self.RESET + 0.7}}},
             {p + "reset": reset, p + "5h-reset": reset}),
            ("a reset that is not a number is left out", {"resetsAt": "soon"}, {}),
            ("a blank status is left out", {"status": ""}, {}),
            ("the windows, under the API's short names", self.WARNING, {
                p + "status": "allowed_warning", p + "reset": reset,
                p + "representative-claim": "five_hour",
                p + "5h-status": "allowed_warning", p + "5h-utilization": "0.91",
                p + "5h-reset": reset, p + "7d-utilization": "0.25",
                p + "7d-reset": str(self.RESET + 86400)}),
            ("every window name the proxy knows, and one it does not", {"unifiedWindows": {
                "seven_day_opus": {"utilization": 0.5}, "seven_day_sonnet": {"utilization": 0.6},
                "seven_day_overage_included": {"utilization": 0.65},
                "overage": {"utilization": 0.7}, "new_window": {"utilization": 0.8}}},
             {p + "7d_opus-utilization": "0.5", p + "7d_sonnet-utilization": "0.6",
              p + "7d_oi-utilization": "0.65",
              p + "overage-utilization": "0.7", p + "new_window-utilization": "0.8"}),
            ("a utilization of 0 is a value; null and non-object windows are nothing",
             {"unifiedWindows": {"five_hour": {"utilization": 0, "status": None},
                                 "seven_day": None, "overage": "x"}},
             {p + "5h-utilization": "0"}),
        ]
        for name, info, headers in cases:
            with self.subTest(name):
                self.assertEqual(proxy.rate_limit_headers(info), headers)

    def test_usage_windows_are_the_latest_windows_readable(self):
        observed = self.RESET - 3600.5                  # when the proxy last heard of them
        cases = [   # (name, info, GET /usage)
            ("nothing known", {}, {
                "status": None, "representative_window": None, "resets_at": None,
                "observed_at": "2099-12-31T22:59:59Z", "using_overage": None, "windows": {}}),
            ("a warning on the 5-hour window", self.WARNING, {
                "status": "allowed_warning", "representative_window": "five_hour",
                "resets_at": "2100-01-01T00:00:00Z", "observed_at": "2099-12-31T22:59:59Z",
                "using_overage": False, "windows": {
                    "five_hour": {"status": "allowed_warning", "utilization": 0.91,
                                  "resets_at": "2100-01-01T00:00:00Z"},
                    "seven_day": {"status": None, "utilization": 0.25,
                                  "resets_at": "2100-01-02T00:00:00Z"}}}),
            ("non-object windows are left out; a reset that is no number is null", {
                "unifiedWindows": {"five_hour": None, "seven_day": {"resetsAt": "soon"}}}, {
                "status": None, "representative_window": None, "resets_at": None,
                "observed_at": "2099-12-31T22:59:59Z", "using_overage": None, "windows": {
                    "seven_day": {"status": None, "utilization": None, "resets_at": None}}}),
        ]
        for name, info, expected in cases:
            with self.subTest(name):
                self.assertEqual(proxy.usage_windows(info, observed), expected)


class AgentModeTest(unittest.TestCase):
    """Built-in tools only when the operator turns agent mode on, inside its directory."""

    def setUp(self):
        UPSTREAM.clear()

    def test_off_by_default(self):
        server = ProxyThread()
        self.addCleanup(server.stop)
        server.client().messages.create(model="sonnet", max_tokens=5,
                                        messages=[{"role": "user", "content": "x"}])
        self.assertEqual(UPSTREAM.messages_requests()[0]["body"]["tools"], [])

    def test_builtin_tools_run_in_the_agent_directory_only(self):
        agent_dir = tempfile.mkdtemp(prefix="proxy-agent-")
        self.addCleanup(shutil.rmtree, agent_dir, True)
        server = ProxyThread(agent_dir=agent_dir)
        self.addCleanup(server.stop)
        target = os.path.join(agent_dir, "note.txt")
        message = server.client().messages.create(model="sonnet", max_tokens=100, messages=[
            {"role": "user", "content": f'[[builtin Write {{"file_path": "{target}", '
                                        '"content": "written by the agent"}]]'}])
        with open(target) as f:
            self.assertEqual(f.read(), "written by the agent")
        self.assertEqual(message.stop_reason, "end_turn")
        self.assertEqual([b.type for b in message.content], ["text", "text"],
                         "the built-in call stays inside the CLI")
        self.assertEqual(message.content[0].text, "Calling.")
        self.assertTrue(message.content[1].text.startswith("Results: toolu_"))
        first, second = UPSTREAM.messages_requests()
        self.assertLessEqual({"Read", "Write", "Edit", "Bash", "Glob", "Grep"},
                             {t["name"] for t in first["body"]["tools"]})
        [result] = conversation(second["body"])[-1]["content"]
        self.assertFalse(result.get("is_error"))
        for call in ('Read {"file_path": "/etc/hostname"}',
                     'Grep {"pattern": "root", "path": "/etc/passwd"}',
                     'Glob {"pattern": "*", "path": "/etc"}'):
            with self.subTest(call=call):
                UPSTREAM.clear()
                outside = server.client().messages.create(
                    model="sonnet", max_tokens=100,
                    messages=[{"role": "user", "content": f"[[builtin {call}]]"}])
                [result] = conversation(UPSTREAM.messages_requests()[1]["body"])[-1]["content"]
                self.assertTrue(result.get("is_error"), result)
                self.assertIn("haven't granted", result["content"])
                self.assertEqual(outside.stop_reason, "end_turn")

    def test_bash_cannot_reach_the_login(self):
        # The soak's escape: Bash read the CLI's environment through /proc. The CLI's
        # sandbox (bubblewrap on Linux: CI installs bubblewrap and socat) runs it in
        # a pid namespace of its own, and the credentials file is unreadable in it.
        token = os.environ["CLAUDE_CODE_OAUTH_TOKEN"]
        credentials = os.path.join(os.environ["HOME"], ".claude", ".credentials.json")
        with open(credentials, "w") as f:     # the env token still wins as the login
            json.dump({"claudeAiOauth": {"accessToken": token + "-from-file"}}, f)
        self.addCleanup(os.remove, credentials)
        agent_dir = tempfile.mkdtemp(prefix="proxy-agent-")
        self.addCleanup(shutil.rmtree, agent_dir, True)
        server = ProxyThread(agent_dir=agent_dir)
        self.addCleanup(server.stop)

        def bash(command):
            UPSTREAM.clear()
            marker = json.dumps({"command": command})
            message = server.client().messages.create(
                model="sonnet", max_tokens=100,
                messages=[{"role": "user", "content": f"[[builtin Bash {marker}]]"}])
            requests = UPSTREAM.messages_requests()
            self.assertEqual(len(requests), 2, "the Bash call's result went upstream")
            [result] = conversation(requests[1]["body"])[-1]["content"]
            self.assertNotIn(token, json.dumps([r["body"] for r in requests])
                             + message.model_dump_json())     # (its header carries the login)
            return result
        for escape in (r"tr '\0' '\n' < /proc/$PPID/environ",
                       r"cat /proc/*/environ | tr '\0' '\n'",
                       "python3 -c 'import glob\nfor p in glob.glob(\"/proc/[0-9]*/environ\"):\n"
                       "    try: print(open(p).read())\n    except OSError: pass'",
                       "env", "cat ~/.claude/.credentials.json"):
            with self.subTest(escape=escape):
                bash(escape)
        result = bash("echo made > made.txt && cat made.txt && pwd")
        self.assertFalse(result.get("is_error"), result)
        self.assertEqual(result["content"], f"made\n{agent_dir}")
        with open(os.path.join(agent_dir, "made.txt")) as f:
            self.assertEqual(f.read(), "made\n")

    def test_at_the_cap_an_agent_cli_is_evicted_not_recycled(self):
        # Its tools remember the files they read: a rewound CLI would still know.
        agent_dir = tempfile.mkdtemp(prefix="proxy-agent-")
        self.addCleanup(shutil.rmtree, agent_dir, True)
        server = ProxyThread(agent_dir=agent_dir, max_sessions=1, max_concurrent=1,
                             max_spares=0)
        self.addCleanup(server.stop)
        for text in ("first chat", "second chat"):
            server.client().messages.create(model="sonnet", max_tokens=5,
                                            messages=[{"role": "user", "content": text}])
        first, second = [r["headers"]["X-Claude-Code-Session-Id"]
                         for r in UPSTREAM.messages_requests()]
        self.assertNotEqual(first, second)


# =============================================================================
# 11. Host processes
# =============================================================================

class LifecycleTest(ApiAssertions, unittest.TestCase):
    """The concurrency cap, timeouts, disconnects and shutdown, each on its own proxy."""

    def setUp(self):
        UPSTREAM.clear()
        UPSTREAM.release.clear()

    def tearDown(self):
        UPSTREAM.release.set()

    def test_queue_full_is_529_with_retry_after_and_upstream_never_sees_more(self):
        server = ProxyThread(max_concurrent=1, queue_timeout_s=0)      # no queue at all
        self.addCleanup(server.stop)
        client = server.client()
        holder = threading.Thread(target=lambda: client.messages.create(
            model="claude-sonnet-5-5", max_tokens=10,
            messages=[{"role": "user", "content": "[[hang]]"}]))
        holder.start()
        self.assertTrue(UPSTREAM.hanging.wait(15))
        with self.assertRaises(anthropic.InternalServerError) as caught:
            client.messages.create(model="claude-sonnet-5-5", max_tokens=10,
                                   messages=[{"role": "user", "content": "second"}])
        self.assertApiError(caught.exception, 529, "overloaded_error")
        self.assertGreaterEqual(int(caught.exception.response.headers["retry-after"]), 1)
        UPSTREAM.release.set()
        holder.join(15)
        message = client.messages.create(model="claude-sonnet-5-5", max_tokens=10,
                                         messages=[{"role": "user", "content": "third"}])
        self.assertEqual(message.content[0].text, UPSTREAM_TEXT, "the slot came back")
        self.assertEqual(UPSTREAM.max_in_flight, 1)

    def test_a_client_that_reads_nothing_gives_its_slot_back(self):
        server = ProxyThread(max_concurrent=1, send_timeout_s=0.5, queue_timeout_s=20)
        self.addCleanup(server.stop)
        big = json.dumps({"x": "a" * 6_000_000})   # more than the kernel's 4 MB send buffer
        body = json.dumps({"model": "claude-sonnet-5-5", "max_tokens": 10, "stream": True,
                           "messages": [{"role": "user", "content": f"[[json {big}]]"}]})
        stalled = socket.socket()
        self.addCleanup(stalled.close)
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", server.port))
        stalled.sendall(f"POST /v1/messages HTTP/1.1\r\nhost: localhost\r\ncontent-length: "
                        f"{len(body)}\r\n\r\n{body}".encode())
        self.assertTrue(wait_until(lambda: any("[[json" in ScriptedUpstream.last_text(r["body"])
                                               for r in UPSTREAM.messages_requests())))
        started = time.monotonic()
        answer = server.client().messages.create(           # queued behind the stalled one
            model="claude-sonnet-5-5", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
        self.assertEqual(answer.content[0].text, UPSTREAM_TEXT)
        self.assertLess(time.monotonic() - started, 15, "the slot came back, not by the queue")
        stalled.settimeout(10)
        received = b"".join(iter(lambda: stalled.recv(1 << 20), b""))
        self.assertTrue(received.startswith(b"HTTP/1.1 200 "))
        self.assertNotIn(b"message_stop", received, "cut off mid-answer: what the kernel "
                                                    "held, then the end")

    def test_request_timeout_is_504_and_stops_the_cli(self):
        server = ProxyThread(timeout_s=4.0)
        self.addCleanup(server.stop)
        client = server.client()
        # A follow-up, so a warm CLI reaches the upstream well within the timeout
        # even on a loaded machine (where a cold start can take seconds).
        ask = [{"role": "user", "content": "hi"}]
        first = client.messages.create(model="claude-sonnet-5-5", max_tokens=10, messages=ask)
        with self.assertRaises(anthropic.APIStatusError) as caught:
            client.messages.create(
                model="claude-sonnet-5-5", max_tokens=10, messages=ask + [
                    {"role": "assistant", "content": first.content[0].text},
                    {"role": "user", "content": "[[hang]]"}])
        self.assertApiError(caught.exception, 504, "timeout_error")
        self.assertTrue(UPSTREAM.cut.wait(15), "the upstream call was cut")
        self.assertTrue(wait_until(lambda: not cli_children()), cli_children())

    def test_client_disconnect_cuts_the_upstream_and_stops_the_cli(self):
        server = ProxyThread()
        self.addCleanup(server.stop)
        body = json.dumps({"model": "claude-sonnet-5-5", "max_tokens": 10, "stream": True,
                           "messages": [{"role": "user", "content": "[[hang]]"}]})
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(f"POST /v1/messages HTTP/1.1\r\nhost: localhost\r\ncontent-length: "
                     f"{len(body)}\r\n\r\n{body}".encode())
        self.assertTrue(UPSTREAM.hanging.wait(15))
        self.assertTrue(sock.recv(100).startswith(b"HTTP/1.1 200 "))
        sock.close()
        self.assertTrue(UPSTREAM.cut.wait(15), "the upstream call was cut")
        self.assertTrue(wait_until(lambda: not cli_children()), cli_children())

    def test_load_far_above_the_cap_queues_or_529s_and_the_upstream_sees_the_cap(self):
        server = ProxyThread(max_concurrent=2, queue_timeout_s=1.0)
        self.addCleanup(server.stop)
        outcomes = []

        def ask(n):
            try:
                answer = server.client().messages.create(
                    model="sonnet", max_tokens=10,
                    messages=[{"role": "user", "content": f"load {n} [[delay 0.3]]"}])
                outcomes.append(answer.content[0].text)
            except anthropic.APIStatusError as err:
                outcomes.append((err.status_code, err.response.headers.get("retry-after")))
        threads = [threading.Thread(target=ask, args=(n,)) for n in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        self.assertEqual(len(outcomes), 16)
        answered = [o for o in outcomes if o == UPSTREAM_TEXT]
        refused = [o for o in outcomes if o != UPSTREAM_TEXT]
        self.assertGreaterEqual(len(answered), 2)
        self.assertTrue(all(status == 529 and int(retry) >= 1 for status, retry in refused),
                        refused)
        self.assertLessEqual(UPSTREAM.max_in_flight, 2)
        self.assertTrue(wait_until(lambda: len(cli_children()) <= server.config.max_sessions))

    def test_a_cli_that_crashes_mid_answer_is_a_clean_error_and_nothing_is_stuck(self):
        server = ProxyThread(max_concurrent=1)
        self.addCleanup(server.stop)
        client = server.client()
        errors = []

        def ask():
            try:
                with client.messages.stream(model="sonnet", max_tokens=10, messages=[
                        {"role": "user", "content": "[[hang]]"}]) as stream:
                    stream.get_final_message()
            except anthropic.APIError as err:
                errors.append(err)
        asker = threading.Thread(target=ask)
        asker.start()
        self.assertTrue(UPSTREAM.hanging.wait(15))
        [cli] = cli_children()
        os.kill(cli, 9)                             # the CLI dies mid-answer
        asker.join(15)
        self.assertEqual(len(errors), 1, "the client got an error, not a silent end")
        UPSTREAM.release.set()
        self.assertTrue(wait_until(lambda: not cli_children()), cli_children())
        answer = client.messages.create(model="sonnet", max_tokens=10,
                                        messages=[{"role": "user", "content": "again"}])
        self.assertEqual(answer.content[0].text, UPSTREAM_TEXT, "the one slot is free again")

    def test_an_upstream_that_drops_the_connection_is_a_clean_error(self):
        server = ProxyThread()
        self.addCleanup(server.stop)
        client = server.client()
        UPSTREAM.clear()
        with self.assertRaises(anthropic.APIStatusError) as caught:
            client.messages.create(model="sonnet", max_tokens=10,
                                   messages=[{"role": "user", "content": "[[drop]]"}])
        self.assertGreaterEqual(caught.exception.status_code, 500)
        self.assertEqual(caught.exception.body["type"], "error")
        # One call, as with the API: the CLI would ask again without streaming.
        self.assertEqual([r["body"].get("stream") for r in UPSTREAM.messages_requests()],
                         [True])
        self.assertEqual(client.messages.create(model="sonnet", max_tokens=10, messages=[
            {"role": "user", "content": "fine"}]).content[0].text, UPSTREAM_TEXT)
        self.assertTrue(wait_until(lambda: len(cli_children()) <= 1), cli_children())

    def test_orphaned_clis_of_a_crashed_run_are_reaped(self):
        import subprocess
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        orphan = subprocess.Popen(["sleep", "300"], env={proxy.OWNER_ENV: str(gone.pid)})
        ours = subprocess.Popen(["sleep", "300"], env={proxy.OWNER_ENV: str(os.getpid())})
        for process in (ours, orphan):
            self.addCleanup(process.wait)
            self.addCleanup(process.kill)
        self.assertGreaterEqual(proxy.reap_orphans(), 1)
        self.assertEqual(orphan.wait(10), -9)
        self.assertIsNone(ours.poll(), "a CLI whose proxy lives is left alone")

    def test_a_killed_proxy_leaves_no_cli_behind_not_even_a_stopped_one(self):
        server = BenchProxy(max_spares=1)
        self.addCleanup(server.process.kill)
        bench_chat(server.client(), [{"role": "user", "content": "hi"}], "app")
        self.assertTrue(wait_until(lambda: len(server.clis()) == 2 and all(
            process_state(pid) == "T" for pid in server.clis()), timeout=30),
            [process_state(pid) for pid in server.clis()])
        clis = server.clis()

        def kill_clis():
            for pid in clis:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        self.addCleanup(kill_clis)
        server.process.kill()
        server.process.wait()
        self.assertTrue(wait_until(lambda: all(process_state(pid) in ("", "Z") for pid in clis),
                                   timeout=30), [process_state(pid) for pid in clis])

    def test_a_proxy_whose_start_script_exits_goes_on_serving_and_stops_clean(self):
        # A script (or a shell) that ran it with `&` exits: the kernel sends SIGHUP to
        # a process group it orphans with a stopped process in it, as an idle CLI is.
        import subprocess
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("CLAUDE_PROXY_")},
               "CLAUDE_PROXY_MAX_SPARES": "0"}
        script = subprocess.Popen(
            ["bash", "-c", '"$0" "$1" --port 0 </dev/null >/dev/null & echo "$!"; read -r _',
             sys.executable, proxy.__file__], env=env, text=True, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            preexec_fn=os.setpgrp)  # a job of its own, as a shell runs a script
        self.addCleanup(script.wait)
        self.addCleanup(script.kill)
        pid = int(script.stdout.readline())

        def clis():         # once the script is gone, no longer this process's
            found = []
            for child in proxy.descendants(pid):
                with contextlib.suppress(OSError), open(f"/proc/{child}/comm") as comm:
                    if comm.read().strip() == "claude" and process_state(child) != "Z":
                        found.append(child)
            return found

        def kill_what_is_left():
            if process_state(pid) not in ("", "Z"):
                for each in [*clis(), pid]:
                    with contextlib.suppress(OSError):
                        os.kill(each, signal.SIGKILL)
        self.addCleanup(kill_what_is_left)
        self.addCleanup(script.stdout.close)
        url = next(found.group(1) for line in script.stderr
                   if (found := re.search(r"listening on (http://\S+)", line)))
        threading.Thread(target=lambda: (script.stderr.read(), script.stderr.close()),
                         daemon=True).start()
        client = anthropic.Anthropic(base_url=url, api_key="k", max_retries=0,
                                     timeout=CLIENT_TIMEOUT)

        def ask(text):
            return client.messages.create(model="claude-sonnet-5-5", max_tokens=10, messages=[
                {"role": "user", "content": text}]).content[0].text
        self.assertEqual(ask("before"), UPSTREAM_TEXT)
        self.assertTrue(wait_until(lambda: clis() and all(process_state(cli) == "T"
                                                          for cli in clis())), clis())
        script.stdin.close()                    # the script's work is done: it exits
        script.wait(30)
        self.assertEqual(ask("after"), UPSTREAM_TEXT)
        left = clis()
        os.kill(pid, signal.SIGTERM)
        self.assertTrue(wait_until(lambda: process_state(pid) in ("", "Z"), timeout=40))
        self.assertTrue(wait_until(lambda: all(process_state(cli) in ("", "Z")
                                               for cli in left)),
                        [process_state(cli) for cli in left])

    def test_a_hang_up_does_not_stop_the_proxy(self):
        server = BenchProxy(max_spares=0)
        self.addCleanup(server.process.kill)
        os.kill(server.process.pid, signal.SIGHUP)      # the terminal went away
        bench_chat(server.client(), [{"role": "user", "content": "hi"}], "app")
        self.assertIsNone(server.process.poll())
        server.stop()
        self.assertEqual(server.process.returncode, 0)

    def test_what_a_killed_proxy_left_on_disk_goes_at_the_next_start(self):
        # A resumed CLI's config directory holds the conversation and a login copy.
        tmp = tempfile.mkdtemp(prefix="proxy-test-tmp-")
        self.addCleanup(shutil.rmtree, tmp, True)
        secret = "kept-on-disk-" + uuid.uuid4().hex
        crashing = BenchProxy(tmpdir=tmp, max_spares=0)
        self.addCleanup(crashing.process.kill)
        crashing.client().messages.create(model="sonnet", max_tokens=10, messages=[
            {"role": "user", "content": secret}, {"role": "assistant", "content": "a"},
            {"role": "user", "content": "b"}])

        def files_with_secret():
            paths = [os.path.join(root, name) for root, _, names in os.walk(tmp)
                     for name in names]
            return [path for path in paths if os.path.isfile(path) and
                    secret.encode() in read_bytes(path)]
        self.assertTrue(files_with_secret(), "the resumed CLI's transcript, while it lives")
        beside = BenchProxy(tmpdir=tmp, max_spares=0)       # a live one's are left alone
        self.addCleanup(beside.stop)
        self.assertTrue(files_with_secret())
        clis = crashing.clis()
        crashing.process.kill()
        crashing.process.wait()
        self.addCleanup(lambda: [os.kill(pid, signal.SIGKILL) for pid in clis
                                 if process_state(pid) not in ("", "Z")])
        restarted = BenchProxy(tmpdir=tmp, max_spares=0)
        self.addCleanup(restarted.stop)
        self.assertEqual(files_with_secret(), [])
        self.assertEqual(len(os.listdir(tmp)), 2, "the two live proxies' own")

    def test_left_temps_go_only_when_nobody_holds_them(self):
        import fcntl
        system = tempfile.mkdtemp(prefix="proxy-test-system-tmp-")
        self.addCleanup(shutil.rmtree, system, True)
        outside = tempfile.mkdtemp(prefix="proxy-test-outside-")
        self.addCleanup(shutil.rmtree, outside, True)
        for name in ("dead", "live", "no-lock"):
            os.mkdir(os.path.join(system, proxy.TEMP_PREFIX + name))
        for where in ("dead", "live"):
            open(os.path.join(system, proxy.TEMP_PREFIX + where, proxy.TEMP_LOCK), "w").close()
        open(os.path.join(outside, proxy.TEMP_LOCK), "w").close()
        os.symlink(outside, os.path.join(system, proxy.TEMP_PREFIX + "link"))
        held = os.open(os.path.join(system, proxy.TEMP_PREFIX + "live", proxy.TEMP_LOCK),
                       os.O_RDONLY)
        self.addCleanup(os.close, held)
        fcntl.flock(held, fcntl.LOCK_EX)            # as a running proxy holds its own
        proxy.remove_left_temps(system)
        self.assertEqual(sorted(os.listdir(system)), [
            proxy.TEMP_PREFIX + name for name in ("link", "live", "no-lock")])
        self.assertEqual(os.listdir(outside), [proxy.TEMP_LOCK])
        proxy.remove_left_temps(os.path.join(system, "missing"))     # nothing to list

    def test_sigterm_lets_in_flight_streams_finish_and_exits_zero(self):
        server = ProxyThread()
        client = server.client()
        result = {}

        def stream():
            with client.messages.stream(model="claude-sonnet-5-5", max_tokens=10,
                                        messages=[{"role": "user", "content": "[[hang]]"}]) as s:
                result["message"] = s.get_final_message()
        streamer = threading.Thread(target=stream)
        streamer.start()
        self.assertTrue(UPSTREAM.hanging.wait(15))
        stopper = threading.Thread(target=lambda: result.update(code=server.stop()))
        stopper.start()
        self.assertTrue(wait_until(lambda: not server.thread.is_alive() or
                                   refused(server.port)), "new connections are refused")
        UPSTREAM.release.set()
        streamer.join(15)
        stopper.join(30)
        self.assertEqual(result["message"].content[0].text, UPSTREAM_TEXT)
        self.assertEqual(result["code"], 0)
        self.assertEqual(cli_children(), [])

    def test_a_stream_still_running_when_the_drain_ends_gets_the_apis_error_and_a_clean_end(self):
        server = ProxyThread(shutdown_grace_s=0.5)
        UPSTREAM.clear()
        statuses = {}

        def stream(path, body):
            statuses[path] = post_raw(server.port, path, body)
        streams = [threading.Thread(target=stream, args=args) for args in (
            ("/v1/messages", {"model": "sonnet", "max_tokens": 10, "stream": True,
                              "messages": [{"role": "user", "content": "[[hang]]"}]}),
            ("/v1/responses", {"model": "sonnet", "stream": True, "input": "[[hang]]"}))]
        for thread in streams:
            thread.start()
        self.assertTrue(wait_until(lambda: UPSTREAM.in_flight == 2))
        self.assertEqual(server.stop(), 0)
        for thread in streams:
            thread.join(30)
        # read_response read each chunked body to its final chunk.
        status, _, data = statuses["/v1/messages"]
        frames = parse_sse(data)
        self.assertEqual((status, frames[-1][0]), (200, "error"))
        self.assertIn("shutting down", json.loads(frames[-1][1])["error"]["message"])
        status, _, data = statuses["/v1/responses"]
        self.assertEqual([event for event, text in parse_sse(data) if text][-2:],
                         ["error", "response.failed"])
        self.assertEqual(cli_children(), [])

    def test_killed_clis_leave_nothing_in_the_real_home_or_the_temp_directory(self):
        # A SIGKILLed CLI (evicted at the cap, stopped at shutdown) cannot remove its
        # session record and key under ~/.claude nor its socket; the proxy does.
        tmp = tempfile.mkdtemp(prefix="proxy-test-left-")
        self.addCleanup(shutil.rmtree, tmp, ignore_errors=True)
        server = BenchProxy(tmpdir=tmp, max_spares=0, max_sessions=1, max_concurrent=1)
        self.addCleanup(server.process.kill)
        sessions = os.path.join(os.environ["HOME"], ".claude", "sessions")
        started = set()
        for shape in range(3):                  # each new shape evicts the last CLI
            server.client().messages.create(model="sonnet", max_tokens=5, system=str(shape),
                                            messages=[{"role": "user", "content": "hi"}])
            started.update(server.clis())

        def left_by(pids):
            files = [name for root, _, names in os.walk(tmp) for name in names] + \
                os.listdir(sessions)
            return [name for name in files if name.split(".")[0] in {str(p) for p in pids}]
        live = set(server.clis())
        self.assertEqual(len(started), 3)
        self.assertTrue(wait_until(lambda: not left_by(started - live)), left_by(started))
        self.assertTrue(left_by(live), "a live CLI's own files are left alone")
        server.stop()
        self.assertEqual(server.process.returncode, 0)
        self.assertEqual(left_by(started), [])

    def test_a_second_signal_ends_the_drain_at_once(self):
        server = BenchProxy(max_spares=0)
        self.addCleanup(server.process.kill)
        UPSTREAM.clear()
        port = int(server.url.rsplit(":", 1)[1])
        answer = {}
        streamer = threading.Thread(target=lambda: answer.update(sse=post_raw(
            port, "/v1/messages", {"model": "sonnet", "max_tokens": 10, "stream": True,
                                   "messages": [{"role": "user", "content": "[[hang]]"}]})))
        streamer.start()
        self.assertTrue(wait_until(lambda: UPSTREAM.in_flight == 1))
        server.process.send_signal(signal.SIGTERM)      # drain: up to 30 s
        self.assertTrue(wait_until(lambda: refused(port)), "draining")
        server.process.send_signal(signal.SIGTERM)      # no: now
        self.assertEqual(server.process.wait(10), 0)
        streamer.join(10)
        self.assertEqual(parse_sse(answer["sse"][2])[-1][0], "error")

    def test_missing_cli_is_503(self):
        server = ProxyThread(cli_path="/nonexistent/claude")
        self.addCleanup(server.stop)
        with self.assertRaises(anthropic.APIStatusError) as caught:
            server.client().messages.create(model="claude-sonnet-5-5", max_tokens=10,
                                            messages=[{"role": "user", "content": "hi"}])
        self.assertApiError(caught.exception, 503, "api_error")


# =============================================================================
# 12. Conversation engine
# =============================================================================

class SparePolicyTest(unittest.TestCase):
    """Where spares start: where new chats arrive, never for follow-ups, and a spare
    makes way only for a shape in more demand."""

    def test_spare_choice(self):
        table = [   # (new chats by shape, most recent last; spares, oldest first; cap;
                    #  (the shape that gets a spare, the index of the spare making way))
            ({}, [], 2, (None, None)),
            ({"a": 1}, [], 2, ("a", None)),
            ({"a": 1, "b": 1}, [], 2, ("b", None)),             # of equals, the latest
            ({"a": 3, "b": 1}, [], 2, ("a", None)),             # the most new chats first
            ({"a": 1, "b": 1}, ["b"], 2, ("a", None)),
            ({"a": 1}, ["a"], 2, (None, None)),                 # it has one
            ({"a": 0, "b": 0}, [], 2, (None, None)),            # its new chats are old
            ({"a": 1, "b": 1}, ["b"], 1, (None, None)),         # no place for an equal
            ({"a": 2, "b": 1}, ["b"], 1, ("a", 0)),             # but for more demand
            ({"a": 3, "b": 1, "c": 1}, ["c", "b"], 2, ("a", 0)),  # the oldest weakest
            ({"a": 2, "b": 2, "c": 1}, ["b", "c"], 2, ("a", 1)),
        ]
        for demand, spares, cap, expected in table:
            with self.subTest(demand=demand, spares=spares, cap=cap):
                self.assertEqual(proxy.spare_choice(demand, spares, cap), expected)

    def test_only_new_chats_are_demand_for_a_spare(self):
        async def scenario():
            engine = proxy.Engine(proxy.Config(
                workdir=tempfile.mkdtemp(prefix="proxy-test-cwd-"), max_spares=1))

            def turn(*texts):
                return proxy.messages_request_to_turn(valid_body(system="an app", messages=[
                    {"role": ("user", "assistant")[i % 2], "content": text}
                    for i, text in enumerate(texts)]), "sonnet")
            try:
                async for _ in engine.run(turn("earlier", "answer", "follow-up")):
                    pass
                self.assertEqual((engine._demand, engine._spare_keeper), ({}, None),
                                 "a follow-up is no new chat")
                new_chat = turn("a new chat")
                async for _ in engine.run(new_chat):
                    pass
                self.assertEqual(list(engine._demand), [new_chat.shape])
                await engine._spare_keeper          # starts the spare, then ends
                self.assertEqual([s.turn.shape for s in engine.sessions.values()
                                  if s.state == proxy.SPARE], [new_chat.shape])
                self.assertEqual(sorted(s.state for s in engine.sessions.values()),
                                 [proxy.IDLE, proxy.IDLE, proxy.SPARE])
            finally:
                await engine.close()
        asyncio.run(scenario())
        self.assertTrue(wait_until(lambda: not cli_children()), cli_children())


def refused(port: int) -> bool:
    """True when nothing accepts connections on the port."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except OSError:
        return True


class WarmSessionTest(ApiAssertions, unittest.TestCase):
    """Live sessions, spares and their bounds."""

    def setUp(self):
        UPSTREAM.clear()

    def chat(self, client, messages, **kwargs):
        message = client.messages.create(model="claude-sonnet-5-5", max_tokens=50,
                                         messages=messages, **kwargs)
        return messages + [{"role": "assistant", "content": [
            block.model_dump(exclude_none=True) for block in message.content]}]

    def upstream_sessions(self) -> list[str]:
        return [r["headers"].get("X-Claude-Code-Session-Id")
                for r in UPSTREAM.messages_requests()]

    def sessions(self, server) -> list[dict]:
        return server.client().get("/sessions", cast_to=object)["data"]

    def test_follow_ups_reuse_one_live_cli(self):
        server = ProxyThread()
        self.addCleanup(server.stop)
        client = server.client()
        history = self.chat(client, [{"role": "user", "content": "first"}])
        history = self.chat(client, history + [{"role": "user", "content": "second"}])
        with client.messages.stream(model="claude-sonnet-5-5", max_tokens=50, messages=history
                                    + [{"role": "user", "content": "third"}]) as stream:
            self.assertEqual(stream.get_final_message().content[0].text, UPSTREAM_TEXT)
        ids = self.upstream_sessions()
        self.assertEqual(len(ids), 3)
        self.assertEqual(len(set(ids)), 1, "one CLI session answered all three turns")
        third = conversation(UPSTREAM.messages_requests()[-1]["body"])
        self.assertEqual([m["role"] for m in third], ["user", "assistant"] * 2 + ["user"])
        [session] = self.sessions(server)
        self.assertEqual((session["state"], session["turns"]), ("idle", 3))
        self.assertEqual(len(cli_children()), 1)
        # What it costs: its proportional share of memory, never above its resident size.
        self.assertTrue(0 < session["pss_mb"] <= session["rss_mb"], session)
        health = client.get("/", cast_to=object)
        self.assertEqual((health["sessions"]["idle"], health["cli_processes"]), (1, 1))
        self.assertTrue(wait_until(lambda: client.get("/", cast_to=object)["tokens"]["output"]
                                   == 3 * 42), "tokens out of the three answers")

    def test_edited_history_falls_back_to_the_transcript_not_the_live_session(self):
        server = ProxyThread()
        self.addCleanup(server.stop)
        client = server.client()
        history = self.chat(client, [{"role": "user", "content": "original question"}])
        edited = [{"role": "user", "content": "edited question"}] + history[1:]
        self.chat(client, edited + [{"role": "user", "content": "follow-up"}])
        first, second = UPSTREAM.messages_requests()
        self.assertNotEqual(first["headers"]["X-Claude-Code-Session-Id"],
                            second["headers"]["X-Claude-Code-Session-Id"])
        sent = conversation(second["body"])
        self.assertEqual(sent[0]["content"], "edited question")
        self.assertNotIn("original question", json.dumps(second["body"]))
        self.assertEqual(len(self.sessions(server)), 2)

    def test_callers_never_share_a_session(self):
        server = ProxyThread()
        self.addCleanup(server.stop)
        alice, bob = server.client(api_key="alice-key"), server.client(api_key="bob-key")
        history = self.chat(alice, [{"role": "user", "content": "same words"}])
        self.chat(bob, [{"role": "user", "content": "same words"}])
        follow = history + [{"role": "user", "content": "more"}]
        self.chat(bob, follow)
        self.chat(alice, follow, metadata={"user_id": "someone-else"})
        self.chat(alice, follow)
        ids = self.upstream_sessions()
        self.assertEqual(ids[4], ids[0], "alice's own follow-up reuses her session")
        self.assertNotIn(ids[0], ids[1:4], "no other caller got alice's session")
        self.assertNotIn(ids[3], ids[:3], "another user id is another caller")

    def test_least_recently_used_is_evicted_at_the_cap(self):
        server = ProxyThread(max_sessions=2, max_concurrent=1)
        self.addCleanup(server.stop)
        client = server.client()
        chats = [self.chat(client, [{"role": "user", "content": f"chat {i}"}]) for i in range(3)]
        self.assertLessEqual(len(cli_children()), 2)
        self.assertEqual(len(self.sessions(server)), 2)
        UPSTREAM.clear()
        self.chat(client, chats[2] + [{"role": "user", "content": "again"}])
        self.chat(client, chats[0] + [{"role": "user", "content": "again"}])
        self.assertEqual(len(conversation(UPSTREAM.messages_requests()[1]["body"])), 3,
                         "the evicted conversation was resumed from its transcript")
        self.assertTrue(wait_until(lambda: len(cli_children()) <= 2), cli_children())

    def test_at_the_cap_a_new_chat_gets_a_recycled_cli_that_forgot_its_conversation(self):
        server = ProxyThread(max_sessions=2, max_concurrent=1, max_spares=0)
        self.addCleanup(server.stop)
        client = server.client()
        old = self.chat(client, [{"role": "user", "content": "OLD private words"}])
        self.chat(client, old + [{"role": "user", "content": "OLD follow-up"}])
        recycled = UPSTREAM.messages_requests()[-1]["headers"]["X-Claude-Code-Session-Id"]
        other = self.chat(client, [{"role": "user", "content": "other app"}], system="Other.")
        other_session = UPSTREAM.messages_requests()[-1]["headers"]["X-Claude-Code-Session-Id"]
        clis = cli_children()
        UPSTREAM.clear()
        self.chat(client, [{"role": "user", "content": "a new chat"}])
        self.chat(client, other + [{"role": "user", "content": "other follow-up"}],
                  system="Other.")
        new_chat, follow_up = UPSTREAM.messages_requests()
        self.assertEqual([m["role"] for m in conversation(new_chat["body"])], ["user"])
        self.assertEqual(ScriptedUpstream.last_text(new_chat["body"]), "a new chat")
        self.assertNotIn("OLD", json.dumps(new_chat["body"]))
        self.assertEqual(new_chat["headers"]["X-Claude-Code-Session-Id"], recycled,
                         "the least recently used CLI, of the same shape, answered, rewound")
        self.assertEqual(follow_up["headers"]["X-Claude-Code-Session-Id"], other_session,
                         "the session of another shape stayed live")
        self.assertEqual(sorted(cli_children()), sorted(clis), "no CLI was started or killed")
        self.assertEqual(sorted((s["turns"], s["state"]) for s in self.sessions(server)),
                         [(1, "idle"), (2, "idle")])

    def test_at_the_cap_the_least_recently_used_session_of_another_shape_is_evicted(self):
        server = ProxyThread(max_sessions=2, max_concurrent=1, max_spares=0)
        self.addCleanup(server.stop)
        client = server.client()
        self.chat(client, [{"role": "user", "content": "other app"}], system="Other.")
        history = self.chat(client, [{"role": "user", "content": "this app"}])
        [_, kept] = self.upstream_sessions()
        self.chat(client, [{"role": "user", "content": "a new chat"}])
        self.chat(client, history + [{"role": "user", "content": "follow-up"}])
        _, _, new_chat, follow_up = self.upstream_sessions()
        self.assertNotEqual(new_chat, kept)
        self.assertEqual(follow_up, kept, "the more recent session of the shape stayed live")

    def test_a_request_cancelled_while_a_cli_rewinds_leaves_no_busy_session(self):
        async def scenario():
            engine = proxy.Engine(proxy.Config(
                workdir=tempfile.mkdtemp(prefix="proxy-test-cwd-"), max_sessions=1,
                max_concurrent=1, max_spares=0))

            def turn(text):
                return proxy.messages_request_to_turn(
                    valid_body(messages=[{"role": "user", "content": text}]), "sonnet")
            try:
                async for _ in engine.run(turn("first chat")):
                    pass
                [session] = engine.sessions.values()
                recycling = asyncio.ensure_future(engine._recycle(turn("next").shape))
                while session.state != proxy.BUSY:
                    await asyncio.sleep(0)
                recycling.cancel()
                with self.assertRaises(asyncio.CancelledError):
                    await recycling
                self.assertNotIn(session.id, engine.sessions)
                events = [event async for event in engine.run(turn("second chat"))]
                self.assertEqual([type(e) for e in events if isinstance(e, proxy.Answer)],
                                 [proxy.Answer], "one whole answer")
                self.assertEqual([s.state for s in engine.sessions.values()], [proxy.IDLE])
            finally:
                await engine.close()
        asyncio.run(scenario())
        self.assertTrue(wait_until(lambda: not cli_children()), cli_children())

    def test_a_recycled_cli_forgets_a_tool_round_too(self):
        server = ProxyThread(max_sessions=1, max_concurrent=1, max_spares=0)
        self.addCleanup(server.stop)
        client = server.client()

        def create(messages):
            return client.messages.create(model="claude-sonnet-5-5", max_tokens=50,
                                          tools=[WEATHER], messages=messages)
        ask = [{"role": "user", "content": '[[tool get_weather {"city": "Ulm"}]]'}]
        message = create(ask)
        [call] = [block for block in message.content if block.type == "tool_use"]
        create(ask + [{"role": "assistant", "content": message.content},
                      {"role": "user", "content": [{"type": "tool_result",
                                                    "tool_use_id": call.id,
                                                    "content": "OLD sunny"}]}])
        [recycled] = set(self.upstream_sessions())
        UPSTREAM.clear()
        create([{"role": "user", "content": "a new chat"}])
        [new_chat] = UPSTREAM.messages_requests()
        self.assertEqual(new_chat["headers"]["X-Claude-Code-Session-Id"], recycled)
        self.assertEqual([m["role"] for m in conversation(new_chat["body"])], ["user"])
        self.assertNotIn("OLD", json.dumps(new_chat["body"]))
        self.assertNotIn("Ulm", json.dumps(new_chat["body"]))

    def test_a_cli_that_began_from_a_transcript_is_evicted_not_recycled(self):
        server = ProxyThread(max_sessions=1, max_concurrent=1, max_spares=0)
        self.addCleanup(server.stop)
        client = server.client()
        self.chat(client, [{"role": "user", "content": "OLD question"},
                           {"role": "assistant", "content": "OLD answer"},
                           {"role": "user", "content": "OLD again"}])
        [resumed] = self.upstream_sessions()
        UPSTREAM.clear()
        self.chat(client, [{"role": "user", "content": "a new chat"}])
        [new_chat] = UPSTREAM.messages_requests()
        self.assertNotEqual(new_chat["headers"]["X-Claude-Code-Session-Id"], resumed)
        self.assertNotIn("OLD", json.dumps(new_chat["body"]))
        self.assertTrue(wait_until(lambda: len(cli_children()) == 1), cli_children())

    def test_no_conversation_is_written_to_disk(self):
        server = ProxyThread()
        self.addCleanup(server.stop)
        client = server.client()
        secret = "DISK-MARKER-" + uuid.uuid4().hex
        history = self.chat(client, [{"role": "user", "content": secret}])
        self.chat(client, history + [{"role": "user", "content": "warm " + secret}])
        self.chat(client, history + [{"role": "assistant", "content": "x"},
                                     {"role": "user", "content": "cold " + secret}])
        self.assertEqual(len(set(self.upstream_sessions())), 2)
        written = [os.path.join(root, name)
                   for top in (os.environ["HOME"], server.config.workdir)
                   for root, _, names in os.walk(top) for name in names]
        self.assertTrue(written, "the CLI keeps its own files there")
        for path in written:
            with open(path, "rb") as f:
                self.assertNotIn(secret.encode(), f.read(), path)

    def test_an_idle_cli_is_stopped_until_its_next_turn(self):
        server = ProxyThread(max_spares=0)
        self.addCleanup(server.stop)
        client = server.client()
        history = self.chat(client, [{"role": "user", "content": "before"}])
        [pid] = cli_children()
        for turn in ("after", "and again"):
            self.assertTrue(wait_until(lambda: process_state(pid) == "T"), process_state(pid))
            [session] = self.sessions(server)
            self.assertTrue(session["frozen"])
            history = self.chat(client, history + [{"role": "user", "content": turn}])
        self.assertEqual(len(set(self.upstream_sessions())), 1, "the same CLI answered")
        self.assertEqual(cli_children(), [pid])
        self.assertTrue(wait_until(lambda: process_state(pid) == "T"), process_state(pid))
        client.delete(f"/sessions/{session['id']}", cast_to=object)
        self.assertTrue(wait_until(lambda: not cli_children()), "a stopped CLI still exits")

    def stream_closed_at_message_stop(self, server, ask):
        """Stream an answer, read it up to its message_stop, and hang up there."""
        body = json.dumps({"model": "claude-sonnet-5-5", "max_tokens": 50, "stream": True,
                           "messages": ask}).encode()
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"POST /v1/messages HTTP/1.1\r\nhost: localhost\r\n"
                         b"x-api-key: test-key\r\n"           # the same caller as client()
                         b"content-length: %d\r\n\r\n%s" % (len(body), body))
            received = b""
            while b"event: message_stop" not in received:
                chunk = sock.recv(65536)
                self.assertTrue(chunk, received)
                received += chunk

    def hold_answers(self):
        """[[hold]] answers hold until the test sets UPSTREAM.release, and a CLI that
        finishes one is waited for as long (not CLI_CLOSE_TIMEOUT_S: the test decides)."""
        UPSTREAM.release.clear()
        self.addCleanup(UPSTREAM.release.set)
        self.addCleanup(setattr, proxy, "CLI_CLOSE_TIMEOUT_S", proxy.CLI_CLOSE_TIMEOUT_S)
        proxy.CLI_CLOSE_TIMEOUT_S = CLIENT_TIMEOUT

    def test_a_stream_read_up_to_its_message_stop_keeps_its_session_warm(self):
        # Clients may stop reading there and close: the answer is whole, and the CLI
        # is still on its way to its result when the request is cancelled (the
        # upstream holds the end of the answer's response until it is released).
        server = ProxyThread(max_spares=0)
        self.addCleanup(server.stop)
        self.hold_answers()
        ask = [{"role": "user", "content": "[[hold]] short"}]
        self.stream_closed_at_message_stop(server, ask)
        self.assertTrue(wait_until(lambda: [s["state"] for s in self.sessions(server)] ==
                                   ["finishing"]), self.sessions(server))
        self.assertTrue(UPSTREAM.holding.is_set() and not UPSTREAM.cut.is_set(),
                        "the client left while the CLI could not have its result yet")
        [pid] = cli_children()
        UPSTREAM.release.set()          # the answer's response ends: the CLI reaches its result
        self.assertTrue(wait_until(lambda: [s["state"] for s in self.sessions(server)] ==
                                   ["idle"]), self.sessions(server))
        self.assertFalse(UPSTREAM.cut.is_set(), "the CLI read its response to the end")
        history = ask + [{"role": "assistant", "content": UPSTREAM_TEXT}]
        self.chat(server.client(), history + [{"role": "user", "content": "and then?"}])
        self.assertEqual(len(set(self.upstream_sessions())), 1, "the same CLI answered")
        self.assertEqual(cli_children(), [pid])

    def test_a_cli_finishing_an_answer_is_evicted_at_the_cap_never_recycled(self):
        # Rewinding it would race the turn it is still reading on.
        server = ProxyThread(max_spares=0, max_sessions=1, max_concurrent=1)
        self.addCleanup(server.stop)
        self.hold_answers()
        history = self.chat(server.client(), [{"role": "user", "content": "first chat"}])
        [finishing] = cli_children()
        self.stream_closed_at_message_stop(server, history + [
            {"role": "user", "content": "[[hold]] its follow-up"}])
        self.assertTrue(wait_until(lambda: [s["state"] for s in self.sessions(server)] ==
                                   ["finishing"]), self.sessions(server))
        self.assertTrue(UPSTREAM.holding.is_set() and not UPSTREAM.cut.is_set(),
                        "the CLI is still on its way to its result")
        answered = {}
        asker = threading.Thread(target=lambda: answered.update(history=self.chat(
            server.client(), [{"role": "user", "content": "a new chat"}])), daemon=True)
        asker.start()
        # Never released: only an eviction for the new chat cuts its response.
        self.assertTrue(UPSTREAM.cut.wait(30), "the finishing CLI was killed for the new chat")
        asker.join(CLIENT_TIMEOUT)
        self.assertIn("history", answered, "the new chat was answered")
        first, follow_up, second = self.upstream_sessions()
        self.assertEqual(first, follow_up)
        self.assertNotEqual(first, second, "a new CLI, not the rewound one")
        self.assertEqual([as_blocks(m["content"]) for m in conversation(
            UPSTREAM.messages_requests()[-1]["body"])], [as_blocks("a new chat")])
        self.assertEqual([(s["state"], s["turns"]) for s in self.sessions(server)], [("idle", 1)])
        self.assertTrue(wait_until(lambda: len(cli_children()) == 1 and
                                   finishing not in cli_children()), cli_children())

    def test_a_follow_up_to_a_cli_that_died_while_idle_goes_to_a_new_one(self):
        # The OOM killer, say, between turns.
        server = ProxyThread(max_spares=0)
        self.addCleanup(server.stop)
        client = server.client()
        history = self.chat(client, [{"role": "user", "content": "first"}])
        [pid] = cli_children()
        self.assertTrue(wait_until(lambda: process_state(pid) == "T"), process_state(pid))
        os.kill(pid, signal.SIGKILL)        # dead at once for the kernel, not for asyncio
        self.assertTrue(wait_until(lambda: process_state(pid) in ("Z", "")))
        history = self.chat(client, history + [{"role": "user", "content": "second"}])
        self.assertEqual(len(set(self.upstream_sessions())), 2)
        self.assertEqual([m["content"] for m in conversation(
            UPSTREAM.messages_requests()[-1]["body"])][-1][-1]["text"], "second")
        self.assertEqual(len(conversation(UPSTREAM.messages_requests()[-1]["body"])), 3)

    def test_the_watchdog_forgets_a_stopped_cli_that_is_killed(self):
        # Else, when the proxy exits, it would continue whatever process got the pid.
        server = ProxyThread(max_spares=0, max_sessions=1, max_concurrent=1)
        self.addCleanup(server.stop)
        client = server.client()
        self.chat(client, [{"role": "user", "content": "first"}])
        [pid] = cli_children()
        self.assertTrue(wait_until(lambda: process_state(pid) == "T"), process_state(pid))
        told = []

        def tell(line):
            told.append(line.strip())
            return real_tell(line)
        real_tell, proxy.tell_watchdog = proxy.tell_watchdog, tell
        self.addCleanup(setattr, proxy, "tell_watchdog", real_tell)
        self.chat(client, [{"role": "user", "content": "another"}], system="another app")
        self.assertTrue(wait_until(lambda: pid not in cli_children()), "evicted at the cap")
        self.assertEqual(told[0], f"-{pid}")

    def test_many_conversations_at_once_never_exceed_the_cap(self):
        server = ProxyThread(max_sessions=2, max_concurrent=2, max_spares=1)
        self.addCleanup(server.stop)
        peak, done = [0], threading.Event()

        def watch():
            while not done.is_set():
                peak[0] = max(peak[0], len(cli_children()))
                done.wait(0.01)
        watcher = threading.Thread(target=watch)
        watcher.start()
        answers = []

        def converse(n):
            client = server.client()
            history = self.chat(client, [{"role": "user", "content": f"busy chat {n}"}])
            answers.append(self.chat(client, history + [{"role": "user", "content": "more"}]))
        threads = [threading.Thread(target=converse, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        done.set()
        watcher.join()
        self.assertEqual(len(answers), 6)
        self.assertLessEqual(peak[0], 2)

    def test_a_starting_cli_is_not_reaped_under_its_request(self):
        server = ProxyThread(session_idle_s=0.01)   # far shorter than a CLI start
        self.addCleanup(server.stop)
        history = self.chat(server.client(), [{"role": "user", "content": "slow start"}])
        self.assertEqual(history[-1]["content"][0]["text"], UPSTREAM_TEXT)

    def test_idle_sessions_expire_and_leave_no_process(self):
        server = ProxyThread(session_idle_s=0.3)
        self.addCleanup(server.stop)
        self.chat(server.client(), [{"role": "user", "content": "short lived"}])
        self.assertTrue(wait_until(lambda: not self.sessions(server)))
        self.assertTrue(wait_until(lambda: not cli_children()), cli_children())

    def test_delete_session_ends_it(self):
        server = ProxyThread()
        self.addCleanup(server.stop)
        client = server.client()
        self.chat(client, [{"role": "user", "content": "to be deleted"}])
        [session] = self.sessions(server)
        self.assertEqual(client.delete(f"/sessions/{session['id']}", cast_to=object),
                         {"id": session["id"], "type": "session_deleted"})
        self.assertEqual(self.sessions(server), [])
        with self.assertRaises(anthropic.NotFoundError) as caught:
            client.delete(f"/sessions/{session['id']}", cast_to=object)
        self.assertApiError(caught.exception, 404, "not_found_error")
        self.assertTrue(wait_until(lambda: not cli_children()), cli_children())

    def test_stopping_the_proxy_ends_live_sessions_and_spares(self):
        server = ProxyThread(max_spares=1)
        client = server.client()
        self.chat(client, [{"role": "user", "content": "one"}])
        self.chat(client, [{"role": "user", "content": "two"}], system="other")
        self.assertTrue(wait_until(lambda: len(cli_children()) == 3), cli_children())
        self.assertEqual(server.stop(), 0)
        self.assertEqual(cli_children(), [])

    def test_new_chat_of_a_familiar_shape_starts_on_a_spare(self):
        server = ProxyThread(max_spares=1)
        self.addCleanup(server.stop)
        client = server.client()
        self.chat(client, [{"role": "user", "content": "first chat"}], system="Be an app.")
        self.assertTrue(wait_until(lambda: any(
            s["state"] == "spare" for s in self.sessions(server))), self.sessions(server))
        spare = next(s for s in self.sessions(server) if s["state"] == "spare")
        self.chat(client, [{"role": "user", "content": "second chat"}], system="Be an app.")
        states = {s["id"]: (s["state"], s["turns"]) for s in self.sessions(server)}
        self.assertEqual(states[spare["id"]], ("idle", 1), "the spare answered the new chat")
        self.assertLessEqual(len(cli_children()), 3)


# =============================================================================
# 13. Usage
# =============================================================================

KEYS = {"aider": "sk-aider-0123456789", "webui": "sk-webui-0123456789"}


def write_keys(path: str, keys: dict[str, str], mode: int = 0o600) -> None:
    """Replace the key file as an editor does: a new file moved over the old one."""
    fd, temporary = tempfile.mkstemp(dir=os.path.dirname(path))
    with os.fdopen(fd, "w") as file:
        file.write("# name key\n" + "".join(f"{name} {key}\n" for name, key in keys.items()))
    os.chmod(temporary, mode)
    os.replace(temporary, path)


def http_get(port: int, path: str, *headers: str) -> tuple[int, dict, bytes]:
    """One GET on its own connection: status, headers, body."""
    return read_response(io.BytesIO(raw_exchange(port, "\r\n".join(
        [f"GET {path} HTTP/1.1", "host: localhost", *headers, "connection: close", "", ""]
    ).encode())))


def basic_auth(key: str, user: str = "me") -> str:
    return "authorization: Basic " + base64.b64encode(f"{user}:{key}".encode()).decode()


def ask(server, key: str, text: str = "hi", history: list | None = None):
    with server.client(api_key=key) as client:      # its sockets closed with it
        return client.messages.create(
            model="sonnet", max_tokens=5,
            messages=[*(history or []), {"role": "user", "content": text}])


def status_json(server, key: str = "k") -> dict:
    status, _, body = http_get(server.port, "/status", f"x-api-key: {key}")
    assert status == 200, body
    return json.loads(body)


class PageReader(html.parser.HTMLParser):
    """The status page's tables, by the heading before each, as rows of cell
    texts; the subscription windows by name, with their bar's width."""

    def __init__(self, page: str):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.windows: dict[str, tuple[list[str], str]] = {}
        self.warnings: list[str] = []
        self.refresh = None
        self._heading = self._cell = self._warning = None
        self._row: list[str] | None = None
        self._window = self._width = None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "h2":
            self._heading = ""
        elif tag == "tr":
            self._row, self._window = [], attrs.get("data-window")
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "div" and "fill" in (attrs.get("class") or ""):
            self._width = attrs["style"]
        elif tag == "p" and attrs.get("class") == "warn":
            self._warning = ""
        elif tag == "meta" and attrs.get("http-equiv") == "refresh":
            self.refresh = attrs["content"]

    def handle_endtag(self, tag):
        if tag == "h2":
            self.tables[self._heading] = []
            self._current, self._heading = self._heading, None
        elif tag in ("td", "th"):
            self._row.append(self._cell.strip())
            self._cell = None
        elif tag == "tr":
            if self._window:
                self.windows[self._window] = (self._row, self._width)
            else:
                self.tables[self._current].append(self._row)
            self._row = None
        elif tag == "p" and self._warning is not None:
            self.warnings.append(self._warning)
            self._warning = None

    def handle_data(self, data):
        for name in ("_heading", "_cell", "_warning"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name) + data)


class KeyFileCase(unittest.TestCase):
    """A key file with KEYS in it (mode 600) at `self.path`, a clean upstream log."""

    def setUp(self):
        UPSTREAM.clear()
        folder = tempfile.mkdtemp(prefix="proxy-keys-")
        self.addCleanup(shutil.rmtree, folder, True)
        self.path = os.path.join(folder, "keys")
        write_keys(self.path, KEYS)


class KeysTest(KeyFileCase):
    """Named keys from a file the operator edits, re-read while the proxy serves."""

    def start(self, **config) -> ProxyThread:
        server = ProxyThread(keys_file=self.path, **config)
        self.addCleanup(server.stop)
        return server

    def test_each_named_key_works_and_a_wrong_one_reaches_nothing(self):
        server = self.start(api_key="sk-env-0123456789")
        for key in (*KEYS.values(), "sk-env-0123456789"):
            self.assertEqual(ask(server, key).role, "assistant")
        UPSTREAM.clear()
        for key in ("sk-wrong", KEYS["aider"] + "x", KEYS["aider"].upper()):
            with self.subTest(key=key), self.assertRaises(anthropic.AuthenticationError):
                ask(server, key)
        self.assertEqual(UPSTREAM.messages_requests(), [])
        seen = MetricsTest.scrape(server, KEYS["webui"])
        for name in ("aider", "webui", "default"):
            self.assertEqual(seen["claude_proxy_requests_total", (
                ("key", name), ("route", "messages"), ("status", "200"))], 1)
        self.assertEqual(seen["claude_proxy_tokens_total", (("direction", "output"),
                                                            ("key", "aider"))], 42)
        for key in (*KEYS.values(), "sk-env-0123456789"):
            self.assertNotIn(key, repr(seen))           # names label metrics, keys never

    def test_keys_added_or_revoked_count_from_the_next_request_and_in_flight_ones_finish(self):
        server = self.start()
        laptop = "sk-laptop-0123456789"
        with self.assertRaises(anthropic.AuthenticationError):
            ask(server, laptop)
        UPSTREAM.release.clear()
        self.addCleanup(UPSTREAM.release.set)
        with self.assertLogs("claude_sdk_proxy", "INFO") as logs, \
                server.client(api_key=KEYS["aider"]).messages.stream(
                    model="sonnet", max_tokens=5,
                    messages=[{"role": "user", "content": "[[hang]] a long answer"}]) as stream:
            self.assertEqual(next(iter(stream)).type, "message_start")     # in flight now
            write_keys(self.path, {"webui": KEYS["webui"], "laptop": laptop})
            self.assertEqual(ask(server, laptop).role, "assistant")
            with self.assertRaises(anthropic.AuthenticationError):
                ask(server, KEYS["aider"])
            UPSTREAM.release.set()
            answer = stream.get_final_message()
        self.assertEqual(answer.stop_reason, "end_turn")
        self.assertTrue(answer.content[0].text)
        said = "\n".join(logs.output)
        self.assertIn("Key file re-read: 2 keys (added: laptop; removed: aider)", said)
        for key in (*KEYS.values(), laptop):
            self.assertNotIn(key, said)

    def test_each_key_has_its_own_sessions(self):
        server = self.start()
        first = ask(server, KEYS["aider"], "a conversation both apps know")
        history = [{"role": "user", "content": "a conversation both apps know"},
                   {"role": "assistant", "content": first.content[0].text}]
        ask(server, KEYS["webui"], "and then?", history)
        ask(server, KEYS["aider"], "and then?", history)
        self.assertTrue(wait_until(lambda: len(status_json(server, KEYS["aider"])["recent"])
                                   == 3))
        rows = status_json(server, KEYS["aider"])["recent"][::-1]
        self.assertEqual([(row["key"], row["session"]) for row in rows],
                         [("aider", "cold"), ("webui", "resumed"), ("aider", "warm")])

    def test_a_key_file_others_can_read_or_a_broken_edit_keeps_the_keys_it_gave(self):
        write_keys(self.path, KEYS, mode=0o644)
        with self.assertRaises(ValueError) as cm:
            proxy.KeyRing(None, self.path)
        self.assertIn("is open to other users: chmod 600 it", str(cm.exception))
        write_keys(self.path, KEYS)
        server = self.start()
        def chmod_only(keys, mode):
            os.chmod(self.path, mode)
        for change, keys, mode in ((write_keys, {"aider": KEYS["aider"], "webui": ""}, 0o600),
                                   (write_keys, {}, 0o600),         # emptied by an editor
                                   (write_keys, {"aider": KEYS["aider"]}, 0o640),
                                   (chmod_only, None, 0o644)):
            with self.subTest(keys=keys, mode=mode), \
                    self.assertLogs("claude_sdk_proxy", "ERROR") as logs:
                change(self.path, keys, mode) if change is write_keys else change(keys, mode)
                self.assertEqual(ask(server, KEYS["webui"]).role, "assistant")
            self.assertIn("Key file not re-read, the keys it gave before still hold",
                          logs.output[0])
            self.assertNotIn(KEYS["aider"], "\n".join(logs.output))

    def test_a_start_with_a_key_file_others_can_read_is_refused(self):
        import subprocess
        write_keys(self.path, KEYS, mode=0o604)
        done = subprocess.run([sys.executable, proxy.__file__, "-p", "0", "--keys-file",
                               self.path], capture_output=True, text=True, timeout=60)
        self.assertEqual(done.returncode, 2)
        self.assertIn(f"The key file cannot be used: {self.path} is open to other users: "
                      "chmod 600 it", done.stderr)

    def test_an_edit_in_place_is_seen_and_sighup_rereads_the_file(self):
        import subprocess
        started = subprocess.Popen(
            [sys.executable, proxy.__file__, "-p", "0", "--keys-file", self.path,
             "--ledger", "off"], stderr=subprocess.PIPE, text=True,
            env={k: v for k, v in os.environ.items() if not k.startswith("CLAUDE_PROXY_")})
        self.addCleanup(started.wait, 30)
        self.addCleanup(started.terminate)
        self.addCleanup(started.stderr.close)

        def said(words: str) -> str:
            return next(line for line in started.stderr if words in line)
        port = int(re.search(r"listening on http://127\.0\.0\.1:(\d+)",
                             said("listening on")).group(1))
        server = types.SimpleNamespace(client=lambda api_key: anthropic.Anthropic(
            base_url=f"http://127.0.0.1:{port}", api_key=api_key, max_retries=0,
            timeout=CLIENT_TIMEOUT))
        # An edit in place that keeps the file's inode, size and modification time: its
        # change time still shows it.
        renewed = KEYS["aider"][::-1]
        before = os.stat(self.path)
        with open(self.path, "r+") as file:
            text = file.read()
            file.seek(0)
            file.write(text.replace(KEYS["aider"], renewed))
        os.utime(self.path, ns=(before.st_atime_ns, before.st_mtime_ns))
        self.assertEqual(ask(server, renewed).role, "assistant")
        with self.assertRaises(anthropic.AuthenticationError):
            ask(server, KEYS["aider"])
        self.assertIn("Key file re-read: 2 keys (added: none; removed: none)",
                      said("Key file re-read"))
        started.send_signal(signal.SIGHUP)      # re-reads, and the proxy goes on serving
        self.assertIn("SIGHUP: still serving (stop the proxy with SIGTERM or SIGINT); the "
                      "key file is re-read.", said("SIGHUP"))
        self.assertIn("Key file re-read: 2 keys", said("Key file re-read"))
        self.assertEqual(ask(server, renewed).role, "assistant")


class LedgerTest(unittest.TestCase):
    """The usage ledger: a SQLite file that outlives the proxy and never fails a request."""

    def setUp(self):
        UPSTREAM.clear()
        self.folder = tempfile.mkdtemp(prefix="proxy-ledger-")
        self.addCleanup(shutil.rmtree, self.folder, True)
        self.path = os.path.join(self.folder, "state", "usage.sqlite3")

    def rows(self, path: str | None = None) -> list[dict]:
        with contextlib.closing(sqlite3.connect(path or self.path)) as db:
            db.row_factory = sqlite3.Row
            return [dict(row) for row in db.execute("SELECT * FROM requests ORDER BY id")]

    def start(self, **config) -> ProxyThread:
        server = ProxyThread(ledger_path=self.path, **config)
        self.addCleanup(server.stop)
        return server

    def test_a_row_for_each_api_streamed_or_not_and_for_errors(self):
        server = self.start()
        client, openai_client = server.client(), server.openai_client()

        def user(word):
            return [{"role": "user", "content": word}]
        client.messages.create(model="sonnet", max_tokens=5, messages=user("zebra-1"))
        with client.messages.stream(model="sonnet", max_tokens=5,
                                    messages=user("zebra-2")) as stream:
            stream.get_final_message()
        openai_client.chat.completions.create(model="sonnet", messages=user("zebra-3"))
        for _ in openai_client.chat.completions.create(model="sonnet", messages=user("zebra-4"),
                                                       stream=True):
            pass
        openai_client.responses.create(model="sonnet", input="zebra-5")
        with openai_client.responses.stream(model="sonnet", input="zebra-6") as stream:
            stream.get_final_response()
        with self.assertRaises(anthropic.APIStatusError):
            client.messages.create(model="sonnet", max_tokens=5, messages=user("[[error 529]]"))
        with self.assertRaises(anthropic.BadRequestError):
            client.messages.create(model="sonnet", max_tokens=5, messages=[])
        client.models.list()                # not a turn: no row
        self.assertTrue(wait_until(lambda: len(self.rows()) == 8), self.rows())
        rows = self.rows()
        self.assertEqual([(r["api"], r["stream"], r["status"], r["error"]) for r in rows], [
            ("messages", 0, 200, None), ("messages", 1, 200, None),
            ("chat_completions", 0, 200, None), ("chat_completions", 1, 200, None),
            ("responses", 0, 200, None), ("responses", 1, 200, None),
            ("messages", 0, 529, "overloaded_error"),
            ("messages", 0, 400, "invalid_request_error")])
        for row in rows[:6]:
            self.assertEqual((row["key"], row["model"], row["stop_reason"], row["input_tokens"],
                              row["cache_read_tokens"], row["cache_write_tokens"],
                              row["output_tokens"]),
                             ("local", "claude-sonnet-5-5", "end_turn", 17, 3, 2, 42))
            self.assertIn(row["session"], ("cold", "recycled", "warm", "spare", "resumed"))
            self.assertTrue(0 <= row["first_token_ms"] <= row["latency_ms"], row)
            self.assertAlmostEqual(row["at"], time.time(), delta=120)
        self.assertEqual(rows[0]["session"], "cold")
        self.assertEqual((rows[7]["session"], rows[7]["first_token_ms"], rows[7]["model"]),
                         (None, None, ""))
        self.assertNotIn("zebra", json.dumps(rows))       # never content
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        with contextlib.closing(sqlite3.connect(self.path)) as db:
            self.assertEqual(db.execute("PRAGMA journal_mode").fetchone()[0], "wal")

    def test_rows_outlive_the_proxy_and_go_after_their_time(self):
        old = proxy.Ledger(self.path, 90)
        old.add(proxy.ledger_row(proxy.RequestRecord(0.0, time.time() - 91 * 86400, "aider",
                                                     "messages"), 200, 0.0))
        old.close()
        self.assertEqual(len(self.rows()), 1)
        first = ProxyThread(ledger_path=self.path)
        ask(first, "k", "before the restart")
        first.stop()
        self.assertEqual([row["key"] for row in self.rows()], ["local"])     # the old one went
        second = self.start()
        ask(second, "k", "after the restart")
        self.assertTrue(wait_until(lambda: len(self.rows()) == 2))
        status, _, body = http_get(second.port, "/usage")
        self.assertEqual(status, 200)
        self.assertEqual([(r["key"], r["requests"], r["output_tokens"])
                          for r in json.loads(body)["summary"]["rows"]], [("local", 2, 84)])

    def read_only_folder(self) -> str:
        """A folder no one may write in: a read-only file system for root (whom file
        modes do not stop), mode 500 for anyone else."""
        import subprocess
        folder = os.path.join(self.folder, "read-only")
        os.mkdir(folder)
        if os.geteuid() == 0:
            subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", folder],
                           check=True)
            self.addCleanup(subprocess.run, ["umount", folder], check=True)
        else:
            os.chmod(folder, 0o500)
        return folder

    def test_a_ledger_that_cannot_be_written_never_fails_a_request(self):
        read_only = self.read_only_folder()
        not_a_folder = os.path.join(self.folder, "a-file")
        open(not_a_folder, "w").close()
        for path in (os.path.join(read_only, "usage.sqlite3"),
                     os.path.join(read_only, "state", "usage.sqlite3"),
                     os.path.join(not_a_folder, "usage.sqlite3")):
            with self.subTest(path=path):
                with self.assertLogs("claude_sdk_proxy", "ERROR") as logs:
                    server = ProxyThread(ledger_path=path)
                    self.addCleanup(server.stop)
                self.assertIn(f"The usage ledger {path} cannot be used", logs.output[0])
                self.assertEqual(ask(server, "k").role, "assistant")
                self.assertTrue(wait_until(lambda: len(status_json(server)["recent"]) == 1))
                self.assertIsNone(status_json(server)["ledger"])      # kept in memory
        self.assertEqual(os.listdir(read_only), [])

        server = self.start()
        ask(server, "k", "written")
        self.assertTrue(wait_until(lambda: len(self.rows()) == 1))
        holder = sqlite3.connect(self.path, isolation_level=None)   # another program's lock
        holder.execute("BEGIN EXCLUSIVE")
        with self.assertLogs("claude_sdk_proxy", "INFO") as logs:
            self.assertEqual(ask(server, "k", "while it is locked").role, "assistant")
            self.assertTrue(wait_until(lambda: any("cannot write a row" in line
                                                   for line in logs.output)))
            holder.execute("COMMIT")
            holder.close()
            self.assertEqual(ask(server, "k", "after").role, "assistant")
            self.assertTrue(wait_until(lambda: any("writes rows again" in line
                                                   for line in logs.output)))
        self.assertEqual(len(self.rows()), 2)      # the row of the locked time is lost


class LedgerSummaryTest(PureAssertions, unittest.TestCase):
    """Summaries by key, model and time range, as the ledger's SQL gives them."""

    BASE = 1_800_000_000.0

    def ledger(self) -> proxy.Ledger:
        ledger = proxy.Ledger(None, 90)
        self.addCleanup(ledger.close)
        for offset, key, model, status, tokens in (
                (0, "aider", "claude-sonnet-5-5", 200, (10, 1, 2, 5)),
                (10, "aider", "claude-sonnet-5-5", 200, (10, 1, 2, 5)),
                (20, "aider", "claude-opus-5-5", 200, (100, 0, 0, 50)),
                (30, "webui", "claude-sonnet-5-5", 429, (0, 0, 0, 0)),
                (3600, "webui", "claude-sonnet-5-5", 200, (1, 0, 0, 1)),
                (-6 * 3600, "webui", "claude-haiku-4-5", 200, (7, 0, 0, 7))):
            record = proxy.RequestRecord(0.0, self.BASE + offset, key, "messages", model,
                                         usage=dict(zip(("input_tokens",
                                                         "cache_read_input_tokens",
                                                         "cache_creation_input_tokens",
                                                         "output_tokens"), tokens)))
            ledger.add(proxy.ledger_row(record, status, 0.25))
        return ledger

    @staticmethod
    def short(rows, *columns):
        return [tuple(row[c] for c in columns) for row in rows]

    def test_summaries_by_key_model_and_time(self):
        ledger, base = self.ledger(), self.BASE
        counts = ("requests", "errors", "input_tokens", "cache_read_tokens",
                  "cache_write_tokens", "output_tokens")
        self.assertEqual(self.short(ledger.summary(base, base + 3600, ["key"]), "key", *counts),
                         [("aider", 3, 0, 120, 2, 4, 60), ("webui", 1, 1, 0, 0, 0, 0)])
        self.assertEqual(self.short(ledger.summary(base, base + 3601, ["model"]), "model",
                                    "requests", "output_tokens"),
                         [("claude-opus-5-5", 1, 50), ("claude-sonnet-5-5", 4, 11)])
        self.assertEqual(self.short(ledger.summary(base - 86400, base + 86400,
                                                   ["key", "model"]), "key", "model",
                                    "requests"),
                         [("aider", "claude-opus-5-5", 1), ("aider", "claude-sonnet-5-5", 2),
                          ("webui", "claude-haiku-4-5", 1), ("webui", "claude-sonnet-5-5", 2)])
        self.assertEqual(self.short(ledger.summary(base - 86400, base + 86400, ["model"]),
                                    "model", "requests"),               # most tokens first
                         [("claude-opus-5-5", 1), ("claude-sonnet-5-5", 4),
                          ("claude-haiku-4-5", 1)])
        # Ordered by each group's sum, not by one of its rows: c's first row is small.
        ordered = proxy.Ledger(None, 90)
        self.addCleanup(ordered.close)
        for key, tokens in (("c", 1), ("c", 900), ("d", 800)):
            ordered.add(proxy.ledger_row(proxy.RequestRecord(
                0.0, base, key, "messages", usage={"input_tokens": tokens}), 200, 0.0))
        self.assertEqual(self.short(ordered.summary(base, base + 1, ["key"]), "key",
                                    "input_tokens"), [("c", 901), ("d", 800)])
        self.assertEqual(self.short(ledger.summary(base + 1, base + 30), *counts),
                         [(2, 0, 110, 1, 2, 55)])
        self.assertEqual(self.short(ledger.summary(base + 5000, base + 6000), *counts),
                         [(0, 0, 0, 0, 0, 0)])
        self.assertEqual(ledger.summary(base + 5000, base + 6000, ["key"]), [])
        self.assertEqual(ledger.summary(base, base + 100, ["key; DROP TABLE requests"]),
                         ledger.summary(base, base + 100))      # only known columns
        self.assertEqual(ledger.series(base - 3600, base + 7200, 3600), [
            {"slot": 1, "key": "aider", "requests": 3, "tokens": 186},
            {"slot": 1, "key": "webui", "requests": 1, "tokens": 0},
            {"slot": 2, "key": "webui", "requests": 1, "tokens": 2}])
        self.assertEqual(self.short(ledger.recent(2), "at", "key"),       # newest first
                         [(base - 6 * 3600, "webui"), (base + 3600, "webui")])
        self.assertEqual(self.short(ledger.recent(5, errors_since=base), "status", "error"),
                         [(429, None)])
        self.assertEqual(ledger.recent(5, errors_since=base + 31), [])

    def test_the_usage_query(self):
        now = self.BASE
        self.assertEqual(proxy.usage_query({}, now), (now - 7 * 86400, now, ["key"]))
        midnight = dt.datetime(2027, 1, 15, tzinfo=dt.timezone.utc).timestamp()
        self.assertEqual(proxy.usage_query({"since": "2027-01-15T00:00:00Z",
                                            "until": "1800000000", "by": "model,key,model"},
                                           now), (midnight, 1800000000.0, ["model", "key"]))
        self.assertEqual(proxy.usage_query({"since": "2027-01-15T00:00:00"}, now)[0], midnight)
        for offset in ("+01:00", " 01:00"):        # "+" in a URL's query is a space
            self.assertEqual(proxy.usage_query({"since": "2027-01-15T01:00:00" + offset},
                                               now)[0], midnight)
        for query, param in (({"since": "yesterday"}, "since"), ({"until": "nan"}, "until"),
                             ({"by": "key,prompt"}, "by")):
            with self.subTest(query=query):
                err = self.assertProxyError(INV, proxy.usage_query, query, now)
                self.assertEqual(err.param, param)


class WindowWarningTest(unittest.TestCase):
    def test_a_full_window_is_warned_about_until_it_resets(self):
        now = 1_800_000_000.0
        info = {"unifiedWindows": {
            "five_hour": {"utilization": 0.95, "resetsAt": now + 600, "status": "allowed"},
            "seven_day": {"utilization": 0.9, "resetsAt": now - 1},       # reset since
            "seven_day_opus": {"utilization": 1.0},
            "seven_day_sonnet": {"utilization": 0.89, "resetsAt": now + 600},
            "overage": {"utilization": 0.99, "resetsAt": 1e20}, "odd": "not a window"}}
        full = proxy.full_windows(info, 0.9, now)
        self.assertEqual([name for name, _, _ in full],
                         ["five_hour", "overage", "seven_day_opus"])
        self.assertEqual([proxy.window_warning(*window) for window in full], [
            "The subscription's 5-hour window is 95% used (it resets at 2027-01-15 08:10 "
            "UTC): every app behind the proxy shares it.",
            "The subscription's extra-usage window is 99% used: every app behind the proxy "
            "shares it.",
            "The subscription's weekly Opus window is 100% used: every app behind the proxy "
            "shares it."])
        ledger = proxy.Ledger(None, 90)
        self.addCleanup(ledger.close)
        data = proxy.status_data(ledger, [], (info, now - 5), 0.9, now)
        page = PageReader(proxy.status_page(data, "0.1.0"))
        self.assertEqual(page.warnings, data["warnings"])
        self.assertEqual(page.windows["five_hour"][0][2:], ["95%", "allowed",
                                                            "resets in 10 min 0 s (01-15 "
                                                            "08:10:00 UTC)"])
        self.assertEqual(page.windows["seven_day"][0][2:], ["90%", "-", "has reset since "
                                                            "(01-15 07:59:59 UTC)"])
        self.assertEqual(page.windows["seven_day_opus"][0][2:],
                         ["100%", "-", "reset time not reported"])
        self.assertRegex(page.windows["overage"][0][4], r"^resets in \d+ d \d+ h \(- UTC\)$")


class StatusPageTest(KeyFileCase):
    """The page a browser gets at /, its data at /status, and who may see them."""

    def test_the_page_and_its_data_show_windows_keys_sessions_and_requests(self):
        server = ProxyThread(keys_file=self.path)
        self.addCleanup(server.stop)
        aider, webui = KEYS["aider"], KEYS["webui"]
        with self.assertLogs("claude_sdk_proxy", "INFO") as logs:
            ask(server, aider, "zebra")
            with self.assertRaises(anthropic.APIStatusError):
                ask(server, webui, "[[error 529]]")
            ask(server, webui, "hello")
            for _ in range(2):          # the window past 90 %: warned about once
                ask(server, aider, "[[limits warning]] last")
            self.assertTrue(wait_until(lambda: len(status_json(server, aider)["recent"]) == 5))
        warned = [line for line in logs.output if "window is" in line]
        self.assertEqual(warned, [
            "WARNING:claude_sdk_proxy:The subscription's 5-hour window is 91% used (it resets "
            + time.strftime("at %Y-%m-%d %H:%M UTC): every app behind the proxy shares it.",
                            time.gmtime(ScriptedUpstream.LIMIT_RESET))])

        data = status_json(server, webui)
        windows = {w["name"]: w for w in data["windows"]}
        self.assertEqual((windows["five_hour"]["utilization"], windows["five_hour"]["status"],
                          windows["five_hour"]["resets_at"], windows["seven_day"]["utilization"]),
                         (0.91, "allowed_warning", ScriptedUpstream.LIMIT_RESET, 0.25))
        self.assertEqual(data["warnings"], [warned[0].split(":", 2)[2]])
        spans = {span: {row["key"]: row for row in rows} for span, rows in data["keys"].items()}
        for span in ("5h", "7d"):
            self.assertEqual([(k, r["requests"], r["errors"], r["input_tokens"],
                               r["output_tokens"])
                              for k, r in sorted(spans[span].items())],
                             [("aider", 3, 0, 3 * 17, 3 * 42), ("webui", 2, 1, 17, 42)])
        self.assertEqual(sum(slot["requests"] for slot in data["chart"]["slots"]), 5)
        self.assertEqual([(r["key"], r["status"]) for r in data["recent"]],
                         [("aider", 200), ("aider", 200), ("webui", 200), ("webui", 529),
                          ("aider", 200)])
        self.assertEqual([(r["key"], r["error"]) for r in data["errors"]],
                         [("webui", "overloaded_error")])
        live = server.client(api_key=aider).get("/sessions", cast_to=object)["data"]
        self.assertTrue(live)
        self.assertEqual(len(data["sessions"]), len(live))

        status, headers, body = http_get(server.port, "/", "accept: text/html,*/*;q=0.8",
                                         basic_auth(aider))
        self.assertEqual((status, headers["content-type"]), (200, "text/html; charset=utf-8"))
        self.assertEqual(headers["content-security-policy"],
                         "default-src 'none'; style-src 'unsafe-inline'")
        page = body.decode()
        seen = PageReader(page)
        cells, width = seen.windows["five_hour"]
        self.assertEqual(cells[0], "5-hour")
        self.assertEqual(cells[2:4], ["91%", "allowed_warning"])
        self.assertRegex(cells[4], r"^resets in (1 h 0 min|[1-5]?\d min \d+ s) \(" + re.escape(
            time.strftime("%m-%d %H:%M:%S", time.gmtime(ScriptedUpstream.LIMIT_RESET)))
            + r" UTC\)$")
        self.assertEqual(width, "width:91.0%")
        self.assertEqual(seen.windows["seven_day"][0][2], "25%")
        self.assertEqual(seen.warnings, data["warnings"])
        self.assertEqual(seen.tables["Keys"][1:], [
            ["aider", "3 / 0", str(3 * 22), str(3 * 42), "3 / 0", str(3 * 22), str(3 * 42)],
            ["webui", "2 / 1", "22", "42", "2 / 1", "22", "42"]])
        self.assertEqual(len(seen.tables["Live sessions"]) - 1, len(data["sessions"]))
        self.assertEqual([(row[1], row[4]) for row in seen.tables["Last requests"][1:]],
                         [("aider", "200"), ("aider", "200"), ("webui", "200"),
                          ("webui", "529"), ("aider", "200")])
        self.assertEqual(seen.tables["Last errors"][1:][0][1:],
                         ["webui", "messages", "sonnet", "529", "overloaded_error"])
        self.assertEqual(seen.refresh, str(proxy.STATUS_REFRESH_S))
        self.assertIn("<svg", page)
        for absent in ("<script", "src=", "http://", "https://", "@import", "zebra", aider,
                       webui):
            self.assertNotIn(absent, page)
        self.assertNotIn(aider, json.dumps(data))

    def test_page_data_and_metrics_need_a_key_a_browser_gives_as_basic_auth(self):
        server = ProxyThread(keys_file=self.path)
        self.addCleanup(server.stop)
        browser = "accept: text/html,application/xhtml+xml,*/*;q=0.8"
        challenge = 'Basic realm="claude-sdk-proxy", charset="UTF-8"'
        for path in ("/", "/status", "/metrics", "/usage", "/sessions"):
            for headers in ((browser,), (browser, basic_auth("wrong")),
                            (browser, basic_auth(KEYS["aider"], "") + "x")):
                with self.subTest(path=path, headers=headers):
                    status, answer, _ = http_get(server.port, path, *headers)
                    self.assertEqual((status, answer["www-authenticate"]), (401, challenge))
            for headers in ((browser, basic_auth(KEYS["aider"])),
                            (basic_auth(KEYS["webui"], ""),), (f"x-api-key: {KEYS['aider']}",)):
                with self.subTest(path=path, headers=headers):
                    self.assertEqual(http_get(server.port, path, *headers)[0], 200)
        self.assertEqual(http_get(server.port, "/")[:3:2], (200, b'{"status":"ok"}'))
        self.assertEqual(raw_exchange(server.port, b"HEAD / HTTP/1.1\r\nhost: localhost\r\n"
                                      b"accept: text/html\r\nconnection: close\r\n\r\n")
                         .split(b"\r\n")[0], b"HTTP/1.1 200 OK")       # a monitor's probe
        # Basic auth is for reading pages: a browser's remembered password never posts.
        raw = raw_exchange(server.port, b"POST /v1/messages HTTP/1.1\r\nhost: localhost\r\n"
                           + basic_auth(KEYS["aider"]).encode() + b"\r\ncontent-type: "
                           b"application/json\r\ncontent-length: 2\r\nconnection: close"
                           b"\r\n\r\n{}")
        self.assertTrue(raw.startswith(b"HTTP/1.1 401 "), raw)
        self.assertNotIn(b"www-authenticate", raw.lower())
        self.assertEqual(UPSTREAM.messages_requests(), [])

    def test_keyless_the_page_is_for_this_machine_only(self):
        server = ProxyThread()
        self.addCleanup(server.stop)
        browser = "accept: text/html"
        status, headers, body = http_get(server.port, "/", browser)
        self.assertEqual(status, 200)
        self.assertIn(b"No window seen yet", body)
        self.assertIn(b"No requests yet.", body)
        for headers in ((browser, "origin: https://evil.example"),
                        ("origin: https://evil.example",)):
            for path in ("/", "/status", "/metrics"):
                with self.subTest(path=path, headers=headers):
                    self.assertEqual(http_get(server.port, path, *headers)[0], 403)
        raw = raw_exchange(server.port, b"GET /status HTTP/1.1\r\nhost: rebound.example"
                                        b"\r\nconnection: close\r\n\r\n")
        self.assertTrue(raw.startswith(b"HTTP/1.1 403 "), raw)


class MetricsTest(unittest.TestCase):
    """GET /metrics, read by Prometheus's own text parser."""

    def setUp(self):
        UPSTREAM.clear()

    @staticmethod
    def scrape(server, key: str = "test-key") -> dict:
        """(metric sample name, its labels as a sorted tuple) -> value."""
        raw = raw_exchange(server.port, b"GET /metrics HTTP/1.1\r\nhost: localhost\r\n"
                           b"x-api-key: " + key.encode() + b"\r\nconnection: close\r\n\r\n")
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert b"content-type: text/plain; version=0.0.4" in head.lower(), head
        return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for family in text_string_to_metric_families(body.decode("utf-8"))
                for sample in family.samples}

    def test_requests_latency_tokens_sessions_and_windows(self):
        server = ProxyThread()
        self.addCleanup(server.stop)
        client = server.client()
        with client.messages.stream(model="sonnet", max_tokens=5, messages=[
                {"role": "user", "content": "streamed"}]) as stream:
            stream.get_final_message()
        server.openai_client().chat.completions.create(
            model="sonnet", messages=[{"role": "user", "content": "hi"}])
        with self.assertRaises(anthropic.NotFoundError):
            client.get("/nowhere", cast_to=object)
        with self.assertLogs("claude_sdk_proxy", "WARNING"):    # 91 % is past 90 %
            client.messages.create(model="sonnet", max_tokens=5, messages=[   # windows last
                {"role": "user", "content": "[[limits warning]] hello"}])
        self.assertTrue(wait_until(lambda: self.scrape(server).get(
            ("claude_proxy_requests_total", (("key", "local"), ("route", "messages"),
                                              ("status", "200"))))
            == 2), self.scrape(server))
        seen = self.scrape(server)

        def value(name, **labels):
            return seen[name, tuple(sorted(labels.items()))]
        self.assertEqual(value("claude_proxy_requests_total", route="messages", status="200",
                               key="local"), 2)
        self.assertEqual(value("claude_proxy_requests_total", route="none", status="404",
                               key="local"), 1)
        self.assertEqual(value("claude_proxy_request_seconds_count", route="messages"), 2)
        self.assertEqual(value("claude_proxy_request_seconds_bucket", route="messages",
                               le="+Inf"), 2)
        self.assertGreater(value("claude_proxy_request_seconds_sum", route="messages"), 0)
        self.assertEqual(value("claude_proxy_tokens_total", direction="output", key="local"),
                         3 * 42)
        self.assertEqual(value("claude_proxy_tokens_total", direction="input", key="local"),
                         3 * (17 + 3 + 2))
        sessions = client.get("/sessions", cast_to=object)["data"]
        self.assertEqual(value("claude_proxy_sessions", state="idle"),
                         sum(s["state"] == "idle" for s in sessions))
        self.assertEqual(value("claude_proxy_sessions", state="idle"), 3)
        self.assertGreater(value("claude_proxy_cli_memory_bytes", kind="pss"), 0)
        self.assertEqual(value("claude_proxy_queue_depth"), 0)
        self.assertEqual(value("claude_proxy_window_utilization", window="five_hour"), 0.91)
        self.assertEqual(value("claude_proxy_window_resets_at_seconds", window="five_hour"),
                         ScriptedUpstream.LIMIT_RESET)
        self.assertEqual(value("claude_proxy_window_utilization", window="seven_day"), 0.25)


# =============================================================================
# 14. Routes and handlers
# =============================================================================

class MatchRouteTest(unittest.TestCase):
    """match_route: every route, with and without /v1, under /v1/chat, with a trailing
    slash and by HEAD; else 405 with `allow`, or 404."""

    def test_each_route_is_found_in_each_of_its_forms(self):
        # Routes are named by their path pattern: several share one handler.
        models, model = r"/v1(?:/chat)?/models", r"/v1(?:/chat)?/models/(?P<model_id>[^/]+)"
        chat, responses = r"/v1(?:/chat)?/chat/completions", r"/v1(?:/chat)?/responses"
        sessions, session = r"/sessions", r"/sessions/(?P<session_id>[^/]+)"
        cases = [   # (method, path, the route's pattern, path parameters)
            ("GET", "/", "/", {}),
            ("GET", "/v1/models", models, {}),
            ("GET", "/models", models, {}),
            ("GET", "/v1/chat/models", models, {}),
            ("GET", "/v1/models/", models, {}),
            ("GET", "/v1/models/claude-opus-4-1", model, {"model_id": "claude-opus-4-1"}),
            ("GET", "/models/sonnet", model, {"model_id": "sonnet"}),
            ("GET", "/v1/chat/models/gpt-5", model, {"model_id": "gpt-5"}),
            ("POST", "/v1/messages", "/v1/messages", {}),
            ("POST", "/messages", "/v1/messages", {}),
            ("POST", "/v1/messages/", "/v1/messages", {}),
            ("POST", "/v1/messages/count_tokens", "/v1/messages/count_tokens", {}),
            ("POST", "/messages/count_tokens", "/v1/messages/count_tokens", {}),
            ("POST", "/v1/chat/completions", chat, {}),
            ("POST", "/chat/completions", chat, {}),
            ("POST", "/v1/chat/chat/completions", chat, {}),
            ("POST", "/v1/responses", responses, {}),
            ("POST", "/responses", responses, {}),
            ("POST", "/v1/chat/responses", responses, {}),
            ("POST", "/v1/responses/", responses, {}),
            ("GET", "/usage", "/usage", {}),
            ("GET", "/status", "/status", {}),
            ("GET", "/metrics", "/metrics", {}),
            ("GET", "/metrics/", "/metrics", {}),
            ("GET", "/sessions", sessions, {}),
            ("GET", "/sessions/", sessions, {}),
            ("DELETE", "/sessions/abc-123", session, {"session_id": "abc-123"}),
            # HEAD is answered for every GET route.
            ("HEAD", "/", "/", {}),
            ("HEAD", "/models", models, {}),
            ("HEAD", "/v1/models/haiku", model, {"model_id": "haiku"}),
            ("HEAD", "/usage", "/usage", {}),
        ]
        found = set()
        for method, path, pattern, params in cases:
            with self.subTest(f"{method} {path}"):
                route, got = proxy.match_route(method, path)
                self.assertEqual((route.pattern.pattern, got), (f"^{pattern}$", params))
                self.assertIn(route.method, (method, "GET"))
                found.add(route)
        self.assertEqual(found, set(proxy.ROUTES))      # a new route needs its rows here

    def test_a_wrong_method_is_405_naming_the_allowed_ones(self):
        cases = [   # (method, path, allow)
            ("GET", "/v1/messages", "POST"),
            ("HEAD", "/v1/messages", "POST"),
            ("GET", "/messages/count_tokens", "POST"),
            ("PUT", "/responses", "POST"),
            ("OPTIONS", "/v1/chat/chat/completions", "POST"),
            ("POST", "/v1/models", "GET, HEAD"),
            ("DELETE", "/models/sonnet", "GET, HEAD"),
            ("DELETE", "/", "GET, HEAD"),
            ("POST", "/usage/", "GET, HEAD"),
            ("GET", "/sessions/abc", "DELETE"),
            ("DELETE", "/sessions", "GET, HEAD"),
        ]
        for method, path, allow in cases:
            with self.subTest(f"{method} {path}"):
                with self.assertRaises(proxy.ProxyError) as caught:
                    proxy.match_route(method, path)
                err = caught.exception
                self.assertEqual((type(err), err.status, err.headers, err.message),
                                 (proxy.MethodNotAllowed, 405, {"allow": allow},
                                  f"Method {method} is not allowed here; use {allow}."))

    def test_an_unknown_path_is_404(self):
        cases = [   # (method, path, the path the message names)
            ("GET", "/nope", "/nope"),
            ("POST", "/v1/nope", "/v1/nope"),
            ("GET", "/v1", "/v1"),
            ("GET", "/v1/", "/v1"),
            ("POST", "/v1/v1/messages", "/v1/v1/messages"),
            # Only routes under /v1 have a second form; /usage and /sessions have one.
            ("GET", "/v1/usage", "/v1/usage"),
            ("GET", "/v1/sessions", "/v1/sessions"),
            # The /v1/chat base holds OpenAI's routes only.
            ("POST", "/v1/chat/messages", "/v1/chat/messages"),
            ("GET", "/v1/models/a/b", "/v1/models/a/b"),
            ("DELETE", "/sessions/a/b", "/sessions/a/b"),
        ]
        for method, path, named in cases:
            with self.subTest(f"{method} {path}"):
                with self.assertRaises(proxy.ProxyError) as caught:
                    proxy.match_route(method, path)
                err = caught.exception
                self.assertEqual((type(err), err.status, err.message),
                                 (proxy.NotFound, 404, f"Not found: {method} {named}"))


class StreamPacingTest(unittest.TestCase):
    """A short head hold and ping interval, so pacing shows in a second."""

    @classmethod
    def setUpClass(cls):
        cls.proxy = ProxyThread(head_hold_s=0.2, ping_interval_s=0.2)

    @classmethod
    def tearDownClass(cls):
        cls.proxy.stop()

    def stream_events(self, text: str) -> tuple[int, list[str]]:
        """The status and the SSE event names of a Messages stream, read raw."""
        with contextlib.closing(socket.create_connection(("127.0.0.1", self.proxy.port))) as sock:
            body = json.dumps({"model": "claude-sonnet-5-5", "max_tokens": 10, "stream": True,
                               "messages": [{"role": "user", "content": text}]})
            sock.sendall(f"POST /v1/messages HTTP/1.1\r\nhost: localhost\r\ncontent-type: "
                         f"application/json\r\ncontent-length: {len(body)}\r\n\r\n{body}".encode())
            reader = sock.makefile("rb")
            status, _, data = read_response(reader)
            while status < 200:         # 102 Processing while the upstream is silent
                status, _, data = read_response(reader)
        return status, [event for event, _ in parse_sse(data)]

    def test_a_slow_upstream_gets_interim_answers_and_its_real_status(self):
        # Under load the first event can take seconds: the status waits for it (an
        # SDK retries a 429 only as a status), 102s keep the line alive meanwhile.
        for text, status, first in (("[[delay 1]] slow", 200, "message_start"),
                                    ("[[delay 1]] [[error 429]]", 429, None),
                                    ("[[delay 1]] [[error 529]]", 529, None)):
            with self.subTest(text=text):
                with contextlib.closing(socket.create_connection(
                        ("127.0.0.1", self.proxy.port))) as sock:
                    body = json.dumps({"model": "claude-sonnet-5-5", "max_tokens": 10,
                                       "stream": True, "messages": [
                                           {"role": "user", "content": text}]})
                    sock.sendall(f"POST /v1/messages HTTP/1.1\r\nhost: localhost\r\n"
                                 f"content-type: application/json\r\ncontent-length: "
                                 f"{len(body)}\r\n\r\n{body}".encode())
                    reader = sock.makefile("rb")
                    statuses = []
                    while not statuses or statuses[-1][0] < 200:
                        statuses.append(read_response(reader))
                self.assertEqual(statuses[0][0], 102)
                self.assertEqual(statuses[-1][0], status)
                if first:
                    events = [event for event, _ in parse_sse(statuses[-1][2])]
                    self.assertEqual((events[0], events[-1]), (first, "message_stop"))
                else:
                    self.assertIn("retry-after", statuses[-1][1])
        with self.assertRaises(anthropic.RateLimitError):       # an SDK sees the status
            with self.proxy.client().messages.stream(
                    model="sonnet", max_tokens=10,
                    messages=[{"role": "user", "content": "[[delay 1]] [[error 429]]"}]) as s:
                s.get_final_message()
        with self.assertRaises(openai.RateLimitError):
            list(self.proxy.openai_client().chat.completions.create(
                model="sonnet", stream=True,
                messages=[{"role": "user", "content": "[[delay 1]] [[error 429]]"}]))

    def test_a_stream_cut_after_its_start_never_ends_as_if_complete(self):
        # The CLI ends a stream the upstream cut with a message_stop of its own. Cut
        # right after message_start, the client gets a 502 (when the CLI had not
        # passed the start on yet) or the stream and an error event.
        status, events = self.stream_events("[[delay 1]] [[drop]]")
        self.assertIn((status, events[-1:]), ((502, [None]), (200, ["error"])))
        self.assertNotIn("message_stop", events)
        status, _, data = post_raw(self.proxy.port, "/v1/responses", {
            "model": "sonnet", "input": "[[delay 1]] [[drop]]", "stream": True})
        kinds = [event for event, text in parse_sse(data) if text] if status == 200 else \
            [json.loads(data)["error"]["type"]]
        self.assertIn((status, kinds[-2:]), ((502, ["api_error"]),
                                             (200, ["error", "response.failed"])))

    def test_an_http_1_0_stream_begun_on_silence_fails_as_its_api_ends_a_stream(self):
        # HTTP/1.0 gets no 102: its head goes out on silence, before the response began.
        body = json.dumps({"model": "sonnet", "input": "[[delay 1]] [[drop]]", "stream": True})
        raw = raw_exchange(self.proxy.port, (
            f"POST /v1/responses HTTP/1.0\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n{body}").encode(), timeout=60)
        head, _, data = raw.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        events = [json.loads(text) for _, text in parse_sse(data) if text]   # no pings
        self.assertEqual([(e["type"], e["sequence_number"]) for e in events],
                         [("response.created", 0), ("response.in_progress", 1), ("error", 2),
                          ("response.failed", 3)])
        error, failed = events[-2], events[-1]
        self.assertEqual((error["code"], error["error"]["code"], failed["response"]["status"],
                          failed["response"]["error"]["code"]),
                         ("server_error", "server_error", "failed", "server_error"))
        self.assertEqual(error["message"], failed["response"]["error"]["message"])


# =============================================================================
# 15. Server
# =============================================================================

class HttpProtocolTest(unittest.TestCase):
    """Protocol edge cases on raw sockets."""

    @classmethod
    def setUpClass(cls):
        cls.proxy = ProxyThread(max_body_bytes=1000)

    @classmethod
    def tearDownClass(cls):
        cls.proxy.stop()

    def exchange(self, data: bytes) -> list[tuple[int, dict, bytes]]:
        """Send raw bytes; read every response until the server closes."""
        with socket.create_connection(("127.0.0.1", self.proxy.port), timeout=10) as sock:
            sock.sendall(data)
            reader = sock.makefile("rb")
            responses = []
            while True:
                try:
                    responses.append(read_response(reader))
                except (IndexError, ValueError):
                    return responses

    def test_keep_alive_and_pipelined_requests_are_answered_in_order(self):
        responses = self.exchange(b"GET /v1/models HTTP/1.1\r\nhost: localhost\r\n\r\n"
                                  b"GET /v1/models/opus-nope HTTP/1.1\r\nhost: localhost\r\n\r\n"
                                  b"GET / HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        self.assertEqual([status for status, _, _ in responses], [200, 404, 200])
        self.assertEqual(responses[0][1]["connection"], "keep-alive")

    def test_chunked_request_body_fed_in_pieces(self):
        body = json.dumps({"model": "claude-sonnet-5-5",
                           "messages": [{"role": "user", "content": "count me"}]}).encode()
        chunked = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 7]), body[i:i + 7])
                           for i in range(0, len(body), 7)) + b"0\r\n\r\n"
        with socket.create_connection(("127.0.0.1", self.proxy.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/messages/count_tokens HTTP/1.1\r\nhost: localhost\r\n"
                         b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n")
            for i in range(len(chunked)):
                sock.sendall(chunked[i:i + 1])
            status, _, data = read_response(sock.makefile("rb"))
        self.assertEqual(status, 200, data)
        self.assertGreater(json.loads(data)["input_tokens"], 0)

    def test_expect_100_continue_gets_continue_then_the_answer(self):
        body = json.dumps({"model": "claude-sonnet-5-5", "messages": []}).encode()
        with socket.create_connection(("127.0.0.1", self.proxy.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/messages/count_tokens HTTP/1.1\r\nhost: localhost\r\n"
                         b"expect: 100-continue\r\ncontent-length: %d\r\n\r\n" % len(body))
            reader = sock.makefile("rb")
            self.assertEqual(read_response(reader)[0], 100)
            sock.sendall(body)
            self.assertEqual(read_response(reader)[0], 200)

    def test_an_http10_client_gets_a_stream_ended_by_close_never_chunks(self):
        body = json.dumps({"model": "claude-sonnet-5-5", "max_tokens": 20, "stream": True,
                           "messages": [{"role": "user", "content": "old client"}]}).encode()
        raw = raw_exchange(self.proxy.port, b"POST /v1/messages HTTP/1.0\r\n"
                           b"expect: 100-continue\r\ncontent-length: %d\r\n\r\n%s"
                           % (len(body), body), timeout=60)
        head, _, stream = raw.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)   # and no 100 before it
        self.assertNotIn(b"transfer-encoding", head.lower())
        self.assertIn(b"connection: close", head)
        frames = [frame.split(b"\n") for frame in stream.strip().split(b"\n\n")]
        self.assertEqual([frames[0][0], frames[-1][0]],
                         [b"event: message_start", b"event: message_stop"])
        self.assertEqual("".join(json.loads(f[1][6:])["delta"]["text"] for f in frames
                                 if f[0] == b"event: content_block_delta"), UPSTREAM_TEXT)

    def test_oversized_body_is_413_before_it_is_read(self):
        with socket.create_connection(("127.0.0.1", self.proxy.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/messages HTTP/1.1\r\nhost: localhost\r\n"
                         b"expect: 100-continue\r\n"
                         b"content-length: 5000\r\n\r\n")
            status, headers, data = read_response(sock.makefile("rb"))
        self.assertEqual(status, 413)
        self.assertEqual(json.loads(data)["error"]["type"], "request_too_large")
        self.assertEqual(headers["connection"], "close")

    def test_malformed_requests_get_api_errors(self):
        cases = [
            (b"GARBAGE\r\n\r\n", 400),
            (b"GET / HTTP/2.0\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nbad header\r\n\r\n", 400),
            (b"POST /v1/messages HTTP/1.1\r\ncontent-length: 1\r\n"
             b"transfer-encoding: chunked\r\n\r\n", 400),
            (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 431),
            (b"GET / HTTP/1.1\r\nx-big: " + b"a" * 70000 + b"\r\n\r\n", 431),
            (b"POST /v1/messages HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n"
             b"content-length: 8\r\n\r\nnot json", 400),
            (b"GET /v1/models HTTP/1.1\r\n\r\n", 400),                     # no Host
            (b"GET /v1/models HTTP/1.1\r\nhost: localhost\r\nhost: localhost\r\n\r\n", 400),
            (b"GET /v1/models\n HTTP/1.1\r\nhost: localhost\r\n\r\n", 400),   # a bare LF
            # Never a whole head: answered at once, not after the 30 s head timeout.
            (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),    # a TLS ClientHello
            (b"GET / HTTP/1.1\nHost: localhost\n\n", 400),                # bare LFs only
        ]
        for request, status in cases:
            with self.subTest(request=request[:40]):
                responses = self.exchange(request)
                self.assertEqual(responses[0][0], status)
                error = json.loads(responses[0][2])
                self.assertEqual(error["type"], "error")

    def test_slow_heads_slow_bodies_and_idle_sockets_are_cut(self):
        server = ProxyThread(header_timeout_s=0.5, body_timeout_s=0.3, keepalive_idle_s=0.3)
        self.addCleanup(server.stop)
        def trickled(start: bytes) -> bytes:
            """Send `start`, then a byte every 0.1 s (each read is quick): the answer."""
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                started = time.monotonic()
                sock.sendall(start)
                with contextlib.suppress(OSError):
                    for _ in range(50):
                        sock.sendall(b"X")
                        time.sleep(0.1)     # the slowness under test, not a wait
                self.assertLess(time.monotonic() - started, 4.5, "a deadline cut it")
                with sock.makefile("rb") as answer:
                    status, _, body = read_response(answer)
            self.assertEqual(status, 400)
            return body
        self.assertIn(b"Timed out reading the request head.", trickled(b"GET / HTTP/1.1\r\n"))
        raw = raw_exchange(server.port, b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\n"
                                        b"Content-Length: 10\r\n\r\n{}")
        self.assertIn(b"Timed out reading the request body.", raw)
        self.assertIn(b"Timed out reading the request body.", trickled(
            b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\n"))
        idle = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        self.addCleanup(idle.close)
        self.assertTrue(closed_by_server(idle), "an idle socket is closed")

    def test_a_flood_of_idle_and_slow_sockets_does_not_lock_clients_out(self):
        server = ProxyThread(max_connections=4)
        self.addCleanup(server.stop)
        flood = []
        for n in range(12):
            sock = socket.create_connection(("127.0.0.1", server.port))
            if n >= 8:                      # the last four trickle a body: none is idle
                sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\n"
                             b"Content-Length: 100\r\n"
                             b"Expect: 100-continue\r\n\r\n")
                self.assertEqual(sock.recv(100), b"HTTP/1.1 100 Continue\r\n\r\n")
                sock.sendall(b"{")          # the 100 said: the proxy reads this body
            elif n % 2:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n")   # a slowloris head
            flood.append(sock)
        self.addCleanup(lambda: [sock.close() for sock in flood])
        raw = raw_exchange(server.port, b"GET / HTTP/1.1\r\nHost: localhost\r\n"
                                        b"Connection: close\r\n\r\n")
        self.assertTrue(raw.startswith(b"HTTP/1.1 200 "), raw[:60])
        for sock in flood[:12 - 4 + 1]:
            self.assertTrue(closed_by_server(sock), "the oldest sockets made room")

    def test_head_gets_headers_without_body(self):
        raw = raw_exchange(self.proxy.port, b"HEAD / HTTP/1.1\r\nhost: localhost\r\n"
                                            b"connection: close\r\n\r\n")
        head, _, rest = raw.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "))
        self.assertIn(b"content-length: ", head)
        self.assertEqual(rest, b"")


# =============================================================================
# 16. Command line
# =============================================================================

class CommandLineTest(unittest.TestCase):
    def test_refuses_an_open_address_without_a_key(self):
        import subprocess
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLAUDE_PROXY_")}
        done = subprocess.run([sys.executable, proxy.__file__, "-H", "0.0.0.0", "-p", "0"],
                              capture_output=True, text=True, timeout=60, env=env)
        self.assertEqual(done.returncode, 2)
        self.assertIn("Set CLAUDE_PROXY_API_KEY", done.stderr)

    def run_command(self, *argv, **env):
        import subprocess
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("CLAUDE_PROXY_")},
               **env}
        return subprocess.run([sys.executable, proxy.__file__, *argv], capture_output=True,
                              text=True, timeout=120, env=env)

    def test_doctor_checks_everything_with_one_real_call(self):
        UPSTREAM.clear()
        done = self.run_command("doctor", "-p", "0")
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        lines = done.stdout.splitlines()
        for name in ("python", "claude-agent-sdk", "Claude Code CLI", "login", "port",
                     "upstream call"):
            self.assertTrue(any(line.startswith(f"ok   {name}: ") for line in lines),
                            (name, lines))
        [call] = UPSTREAM.messages_requests()
        self.assertEqual(call["body"]["max_tokens"], 1)

    def test_doctor_says_what_to_fix(self):
        done = self.run_command("doctor", "-p", "0", "--agent-dir", "/nonexistent")
        self.assertEqual(done.returncode, 1)
        self.assertIn("FAIL configuration: The agent directory /nonexistent does not exist.",
                      done.stdout)
        logged_out = self.run_command("doctor", "-p", "0", CLAUDE_CODE_OAUTH_TOKEN="",
                                      HOME=tempfile.mkdtemp(prefix="proxy-test-nologin-"))
        self.assertEqual(logged_out.returncode, 1)
        self.assertIn("FAIL login: not logged in", logged_out.stdout)
        self.assertIn(f"{sys.executable} {os.path.abspath(proxy.__file__)} setup-token",
                      logged_out.stdout)

    def test_doctor_beside_a_running_proxy_names_it(self):
        server = ProxyThread()
        self.addCleanup(server.stop)
        done = self.run_command("doctor", "-p", str(server.port), "--agent-dir", "/nonexistent")
        self.assertIn(f"ok   port: 127.0.0.1:{server.port}: taken by a running claude-sdk-proxy "
                      f"{proxy.__version__}", done.stdout)

    def test_a_start_without_a_login_says_what_to_do(self):
        import subprocess
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("CLAUDE_PROXY_")},
               "CLAUDE_CODE_OAUTH_TOKEN": "", "HOME": tempfile.mkdtemp(prefix="proxy-nologin-")}
        started = subprocess.Popen([sys.executable, proxy.__file__, "-p", "0"], env=env,
                                   stderr=subprocess.PIPE, text=True)
        self.addCleanup(started.wait, 30)
        self.addCleanup(started.terminate)
        self.addCleanup(started.stderr.close)
        lines = []
        for line in started.stderr:
            lines.append(line)
            if "listening on" in line:
                break
        said = "".join(lines)
        self.assertIn("has no login, so every request will be a 401", said)
        self.assertIn(f"`{proxy.self_command()} login`", said)

    def test_login_runs_the_clis_own_sign_in(self):
        done = self.run_command("login", "--", "--help")    # the CLI's own login options
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn(f"{proxy.self_command()} setup-token", done.stdout)
        self.assertIn("Sign in to your Anthropic account", done.stdout)
        done = self.run_command("setup-token", "--", "--help")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("long-lived authentication token", done.stdout)

    def test_the_base_url_it_announces_is_one_clients_parse(self):
        for host, url in (("127.0.0.1", "http://127.0.0.1:3456"),
                          ("::1", "http://[::1]:3456"), ("localhost", "http://localhost:3456")):
            self.assertEqual(proxy.base_url(host, 3456), url)
            self.assertEqual(urllib.parse.urlsplit(url).port, 3456)

    def test_version_names_proxy_sdk_and_cli(self):
        import subprocess
        done = subprocess.run([sys.executable, proxy.__file__, "-v"], capture_output=True,
                              text=True, timeout=60)
        self.assertEqual(done.returncode, 0)
        self.assertIn(proxy.__version__, done.stdout)
        self.assertIn(proxy.sdk.__version__, done.stdout)
        self.assertIn("Claude Code CLI 2.", done.stdout)

    def test_request_log_line_has_status_model_and_tokens_but_no_secrets(self):
        server = ProxyThread()
        self.addCleanup(server.stop)
        with self.assertLogs("claude_sdk_proxy", "INFO") as logs:
            server.client(api_key="sk-secret-never-logged").messages.create(
                model="claude-sonnet-5-5", max_tokens=10,
                messages=[{"role": "user", "content": "private words"}])
            # the line is written once the response has gone out
            self.assertTrue(wait_until(lambda: any("POST /v1/messages 200" in r
                                                   for r in logs.output)))
        line = [r for r in logs.output if "POST /v1/messages 200" in r][0]
        self.assertIn("model=claude-sonnet-5-5 in=22 out=42", line)
        joined = "\n".join(logs.output)
        self.assertNotIn("private words", joined)
        self.assertNotIn("sk-secret", joined)


class ReadmeRecipesTest(unittest.TestCase):
    """The README's curl and Python recipes run as written, against a test proxy."""

    @classmethod
    def setUpClass(cls):
        cls.server = ProxyThread()
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")) as f:
            cls.blocks = re.findall(r"```(bash|python)\n(.*?)```", f.read(), re.S)

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    def recipes(self, language, start):
        found = [code.replace("http://127.0.0.1:3456", self.server.url)
                 for lang, code in self.blocks if lang == language and code.startswith(start)]
        self.assertTrue(found, (language, start))
        return found

    def test_curl_recipes(self):
        import subprocess
        for command in self.recipes("bash", "curl "):
            with self.subTest(command=command[:60]):
                done = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                                      timeout=60)
                self.assertEqual(done.returncode, 0, done.stderr)
                self.assertIn(UPSTREAM_TEXT[:9], done.stdout)

    def test_python_recipes(self):
        for code in self.recipes("python", "import "):
            with self.subTest(code=code[:40]):
                printed = io.StringIO()
                with contextlib.redirect_stdout(printed):
                    exec(compile(code, "README.md", "exec"), {})
                self.assertIn(UPSTREAM_TEXT, printed.getvalue())


# =============================================================================
# Clients as they ship: Claude Code, async SDKs, LangChain, Codex, the AI SDK, LiteLLM
# =============================================================================


class ClaudeCodeClientTest(unittest.TestCase):
    """Claude Code itself (the bundled CLI) as a client of the proxy."""

    @classmethod
    def setUpClass(cls):
        cls.server = ProxyThread()

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    def setUp(self):
        UPSTREAM.clear()

    def claude(self, prompt, *flags):
        import subprocess
        env = {k: v for k, v in os.environ.items() if k != "CLAUDE_CODE_OAUTH_TOKEN"}
        env.update({"ANTHROPIC_BASE_URL": self.server.url, "ANTHROPIC_API_KEY": "client-key",
                    "HOME": tempfile.mkdtemp(prefix="proxy-test-cc-home-"),
                    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"})
        return subprocess.run([proxy.cli_binary(self.server.config), "-p", prompt, *flags],
                              capture_output=True, text=True, timeout=120, env=env,
                              cwd=tempfile.mkdtemp(prefix="proxy-test-cc-cwd-"))

    def test_print_mode_text_and_stream_json(self):
        done = self.claude("hello", "--output-format", "text")
        self.assertEqual((done.returncode, done.stdout.strip()), (0, UPSTREAM_TEXT), done.stderr)
        done = self.claude("hello", "--output-format", "stream-json", "--verbose")
        self.assertEqual(done.returncode, 0, done.stdout[-500:])
        result = json.loads(done.stdout.strip().splitlines()[-1])
        self.assertEqual((result["type"], result["result"]), ("result", UPSTREAM_TEXT))
        body = UPSTREAM.messages_requests()[-1]["body"]
        offered = {t["name"] for t in body["tools"]}
        self.assertLessEqual({"mcp__c__Bash", "mcp__c__Read", "mcp__c__Edit"}, offered,
                             "Claude Code's own tools reach the upstream")

    def test_its_own_tool_runs_on_its_side_and_the_turn_goes_on(self):
        done = self.claude('[[tool Bash {"command": "echo ran-in-claude-code"}]]',
                           "--output-format", "text", "--allowedTools", "Bash")
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertRegex(done.stdout.strip(), r"^Results: toolu_\w+=ran-in-claude-code$")
        first, second = UPSTREAM.messages_requests()
        self.assertEqual(first["headers"]["X-Claude-Code-Session-Id"],
                         second["headers"]["X-Claude-Code-Session-Id"],
                         "the parked CLI took Claude Code's tool result")


class AsyncClientsTest(unittest.TestCase):
    """The official SDKs' async clients, plain and streaming."""

    def test_async_anthropic_and_openai(self):
        server = ProxyThread()
        self.addCleanup(server.stop)

        async def talk():
            async with anthropic.AsyncAnthropic(
                    base_url=server.url, api_key="k", max_retries=0,
                    timeout=CLIENT_TIMEOUT) as anthropic_client, \
                    server.openai_client(kind=openai.AsyncOpenAI) as openai_client:
                return await talk_through(anthropic_client, openai_client)

        async def talk_through(anthropic_client, openai_client):
            message = await anthropic_client.messages.create(
                model="sonnet", max_tokens=10, messages=[{"role": "user", "content": "a"}])
            async with anthropic_client.messages.stream(
                    model="sonnet", max_tokens=10,
                    messages=[{"role": "user", "content": "b"}]) as stream:
                streamed = "".join([text async for text in stream.text_stream])
            chat = await openai_client.chat.completions.create(
                model="sonnet", messages=[{"role": "user", "content": "c"}])
            async with openai_client.chat.completions.stream(
                    model="sonnet", messages=[{"role": "user", "content": "d"}]) as stream:
                final = await stream.get_final_completion()
            response = await openai_client.responses.create(model="sonnet", input="e")
            return [message.content[0].text, streamed, chat.choices[0].message.content,
                    final.choices[0].message.content, response.output_text]
        self.assertEqual(asyncio.run(talk()), [UPSTREAM_TEXT] * 5)


class LangChainTest(unittest.TestCase):
    """LangChain's ChatAnthropic and ChatOpenAI with bind_tools, a whole tool round."""

    def test_bind_tools_round_trip_with_both_chat_models(self):
        from langchain_anthropic import ChatAnthropic
        from langchain_core.messages import HumanMessage, ToolMessage
        from langchain_core.tools import tool
        from langchain_openai import ChatOpenAI

        @tool
        def get_weather(city: str) -> str:
            """Weather for a city."""
            return f"sunny in {city}"
        server = ProxyThread()
        self.addCleanup(server.stop)
        models = [ChatAnthropic(model="claude-sonnet-5-5", base_url=server.url, api_key="k",
                                max_retries=0, timeout=CLIENT_TIMEOUT),
                  ChatOpenAI(model="claude-sonnet-5-5", base_url=server.url + "/v1",
                             api_key="k", max_retries=0, timeout=CLIENT_TIMEOUT)]
        for model in models:
            with self.subTest(model=type(model).__name__):
                UPSTREAM.clear()
                chat = model.bind_tools([get_weather])
                asked = [HumanMessage('Weather? [[tool get_weather {"city": "Oslo"}]]')]
                called = chat.invoke(asked)
                [call] = called.tool_calls
                self.assertEqual((call["name"], call["args"]), ("get_weather", {"city": "Oslo"}))
                answer = chat.invoke(asked + [called, ToolMessage(
                    get_weather.invoke(call["args"]), tool_call_id=call["id"])])
                self.assertEqual(answer.content if isinstance(answer.content, str) else
                                 answer.content[0]["text"], f"Results: {call['id']}=sunny in Oslo")
                sessions = {r["headers"]["X-Claude-Code-Session-Id"]
                            for r in UPSTREAM.messages_requests()}
                self.assertEqual(len(sessions), 1, "the parked CLI took the tool result")


def post_raw(port: int, path: str, body: dict, *headers: str) -> tuple[int, dict, bytes]:
    """POST a JSON body on a raw socket; the status, headers and whole body read."""
    data = json.dumps(body)
    extra = "".join(f"{h}\r\n" for h in headers)
    with contextlib.closing(socket.create_connection(("127.0.0.1", port))) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: "
                     f"application/json\r\n{extra}content-length: {len(data)}\r\n\r\n"
                     f"{data}".encode())
        reader = sock.makefile("rb")
        answer = read_response(reader)
        while answer[0] < 200:          # 102 Processing while the upstream is silent
            answer = read_response(reader)
        return answer


def codex_request(model: str, items: list[dict]) -> dict:
    """A request as Codex CLI 0.171 `exec` sends it to a custom Responses provider
    (recorded; instructions shortened): developer messages instead of instructions,
    its environment as a user message, the whole history each time (store: false),
    ids in client_metadata, and for a model it knows (gpt-5.5) its freeform
    apply_patch tool, a client-run tool_search and namespaces deferred to it."""
    known = model.startswith("gpt-")
    strict_function = {"type": "function", "strict": False, "parameters": {
        "type": "object", "properties": {"target": {"type": "string"}},
        "required": ["target"], "additionalProperties": False}}
    namespace = {"type": "namespace", "name": "multi_agent_v1",
                 "description": "Tools for spawning and managing sub-agents.",
                 "tools": [dict(strict_function, name="close_agent", description="Close."),
                           dict(strict_function, name="spawn_agent", description="Spawn.")]}
    tools = [{"type": "function", "name": "exec_command", "strict": False,
              "description": "Runs a command in a PTY, returning output or a session ID.",
              "parameters": {"type": "object", "properties": {
                  "cmd": {"type": "string", "description": "Shell command to execute."},
                  "workdir": {"type": "string"}, "yield_time_ms": {"type": "number"}},
                  "required": ["cmd"], "additionalProperties": False}}]
    if known:
        tools += [{"type": "custom", "name": "apply_patch",
                   "description": "The `apply_patch` tool can be used to edit files. This is a "
                                  "FREEFORM tool, so do not wrap the patch in JSON.",
                   "format": {"type": "grammar", "syntax": "lark",
                              "definition": 'start: begin_patch hunk+ end_patch\n'
                                            'begin_patch: "*** Begin Patch" LF'}},
                  {"type": "tool_search", "execution": "client",
                   "description": "# Tool discovery", "parameters": {
                       "type": "object", "properties": {"limit": {"type": "number"},
                                                        "query": {"type": "string"}},
                       "required": ["query"], "additionalProperties": False}},
                  {"type": "web_search", "external_web_access": True,
                   "search_content_types": ["text", "image"]}]
    else:
        tools += [namespace, {"type": "web_search", "external_web_access": True}]
    session = "01a23b45-387a-71a1-85e8-e2e8a4871f42"
    body = {"model": model, "stream": True, "input": [
        {"type": "message", "id": "msg_bbea253a-e977-575c-ae4b-d0cb07bc9d32", "role": "developer",
         "content": [{"type": "input_text", "text": "You are a coding agent running in the "
                                                     "Codex CLI."}]},
        {"type": "message", "id": "msg_01a23b45-38c0-74f2-a997-bfd7cd2f19e9", "role": "developer",
         "content": [{"type": "input_text", "text": "<skills_instructions>..."},
                     {"type": "input_text", "text": "<permissions instructions>..."}]},
        {"type": "message", "id": "msg_01a23b45-38c0-74f2-a997-bfe44c9f58a2", "role": "user",
         "content": [{"type": "input_text", "text": "<environment_context>\n  <cwd>/w</cwd>\n"
                                                     "</environment_context>"}]}] + items,
        "tools": tools, "tool_choice": "auto", "parallel_tool_calls": True,
        "reasoning": {"effort": "medium"} if known else {"summary": "auto"}, "store": False,
        "include": ["reasoning.encrypted_content"], "prompt_cache_key": session,
        "client_metadata": {"session_id": session, "thread_id": session,
                            "turn_id": "01a23b45-3896-7572-afbb-51fea43dee66",
                            "x-codex-window-id": f"{session}:0",
                            "x-codex-installation-id": "0cb46a19-5fe9-45e2-adc7-60f78c61624b",
                            "x-codex-turn-metadata": json.dumps({"request_kind": "turn"})}}
    if known:
        body["text"] = {"verbosity": "low"}
    return body


def codex_user(text: str) -> dict:
    return {"type": "message", "id": f"msg_{uuid.uuid4()}", "role": "user",
            "content": [{"type": "input_text", "text": text}]}


class ClientsAsShippedTest(OpenAICase):
    """Request shapes recorded from clients as they ship (Codex CLI, the AI SDK,
    the SDKs' tool runners, LiteLLM), replayed: what the client gets and what the
    upstream receives."""

    def test_an_upstream_error_mid_answer_carries_no_completion_marker_in_any_dialect(self):
        # The CLI closes a broken stream with a content_block_stop and a message_delta
        # (stop_reason null) of its own: LiteLLM took that for a finished answer.
        ask = "Tell me [[broken 529]]"
        cases = (("/v1/messages", {"model": "sonnet", "max_tokens": 50, "stream": True,
                                   "messages": [{"role": "user", "content": ask}]}),
                 ("/v1/chat/completions", {"model": "sonnet", "stream": True,
                                           "messages": [{"role": "user", "content": ask}]}),
                 ("/v1/responses", {"model": "sonnet", "stream": True, "input": ask}))
        seen = {}
        for path, body in cases:
            status, _, data = post_raw(self.server.port, path, body)
            frames = [(event, json.loads(text)) for event, text in parse_sse(data)
                      if text != "[DONE]"]
            seen[path] = (status, frames)
        status, frames = seen["/v1/messages"]
        self.assertEqual([event for event, _ in frames],
                         ["message_start", "content_block_start", "content_block_delta",
                          "error"])    # as the API sends it: no block stop, no message_delta
        self.assertEqual(frames[-1][1]["error"]["type"], "overloaded_error")
        status, frames = seen["/v1/chat/completions"]
        self.assertEqual([chunk["choices"][0]["finish_reason"] for _, chunk in frames[:-1]],
                         [None, None])
        self.assertEqual(frames[-1][1]["error"]["type"], "overloaded_error")
        status, frames = seen["/v1/responses"]
        kinds = [event for event, _ in frames]
        self.assertEqual(kinds[-2:], ["error", "response.failed"])
        self.assertNotIn("response.output_item.done", kinds)
        self.assertEqual([item["status"] for item in frames[-1][1]["response"]["output"]],
                         ["incomplete"])
        self.assertEqual(frames[-2][1]["error"]["message"], "scripted overloaded_error")
        with self.assertRaises(openai.APIError):    # OpenAI's nested error: both readers raise
            list(self.client.responses.create(model="sonnet", input=ask, stream=True))
        with self.assertRaises(anthropic.APIStatusError) as caught:
            with self.server.client().messages.stream(
                    model="sonnet", max_tokens=50,
                    messages=[{"role": "user", "content": ask}]) as stream:
                stream.get_final_message()
        self.assertEqual(caught.exception.body["error"]["type"], "overloaded_error")
        with self.assertRaises(openai.APIError):
            for _ in self.client.chat.completions.create(
                    model="sonnet", stream=True, messages=[{"role": "user", "content": ask}]):
                pass

    def codex_turn(self, model: str, items: list[dict]) -> tuple[list[dict], dict]:
        """One Codex request: the output items it reads (output_item.done) and the
        completed response."""
        status, _, data = post_raw(self.server.port, "/v1/responses", codex_request(model, items),
                                   "authorization: Bearer k", "accept: text/event-stream",
                                   "originator: codex_exec")
        self.assertEqual(status, 200, data[:300])
        events = [json.loads(text) for _, text in parse_sse(data) if text]
        self.assertEqual(events[-1]["type"], "response.completed", events[-1])
        done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
        self.assertEqual(done, events[-1]["response"]["output"])
        return done, events[-1]["response"]

    def test_codex_cli_plain_turn_shell_round_trip_and_namespaced_call(self):
        ask = codex_user('Run it. [[tool exec_command {"cmd": "echo hi"}]]')
        items, _ = self.codex_turn("claude-sonnet-4-5", [ask])
        call = items[-1]
        self.assertEqual((call["type"], call["name"], json.loads(call["arguments"])),
                         ("function_call", "exec_command", {"cmd": "echo hi"}))
        first = UPSTREAM.messages_requests()[0]
        self.assertEqual(sorted(t["name"] for t in first["body"]["tools"]),
                         ["mcp__c__exec_command", "mcp__c__multi_agent_v1__close_agent",
                          "mcp__c__multi_agent_v1__spawn_agent"])   # web_search not offered
        self.assertIn("You are a coding agent running in the Codex CLI.",
                      first["body"]["system"][-1]["text"])
        # Codex echoes every field of the call, status and id included.
        echoed = [dict(i, status="completed") for i in items]
        output = {"type": "function_call_output", "id": "fco_01a23b45", "call_id": call["call_id"],
                  "output": "Process exited with code 0\nOutput:\nhi\n"}
        items, response = self.codex_turn("claude-sonnet-4-5", [ask] + echoed + [output])
        self.assertEqual(items[0]["content"][0]["text"],
                         f"Results: {call['call_id']}=Process exited with code 0\nOutput:\nhi\n")
        self.assertEqual(response["usage"]["total_tokens"], 64)
        requests = UPSTREAM.messages_requests()
        self.assertEqual(len({r["headers"]["X-Claude-Code-Session-Id"] for r in requests}), 1,
                         "the parked CLI took the shell's output")
        # A namespaced tool is called by its own name, with its namespace.
        UPSTREAM.clear()
        items, _ = self.codex_turn("claude-sonnet-4-5", [codex_user(
            'Close it. [[tool multi_agent_v1__close_agent {"target": "a1"}]]')])
        call = items[-1]
        self.assertEqual((call["name"], call["namespace"], json.loads(call["arguments"])),
                         ("close_agent", "multi_agent_v1", {"target": "a1"}))

    def test_codex_cli_with_a_model_it_knows_apply_patch_and_tool_search(self):
        patch = "*** Begin Patch\n*** Add File: hello.txt\n+hello\n*** End Patch\n"
        ask = codex_user("Create a file. [[tool apply_patch %s]]" % json.dumps({"input": patch}))
        items, _ = self.codex_turn("gpt-5.5", [ask])
        call = items[-1]
        self.assertEqual((call["type"], call["name"], call["input"]),
                         ("custom_tool_call", "apply_patch", patch))
        offered = {t["name"]: t for t in UPSTREAM.messages_requests()[0]["body"]["tools"]}
        self.assertEqual(sorted(offered), ["mcp__c__apply_patch", "mcp__c__exec_command",
                                           "mcp__c__tool_search"])
        self.assertEqual(offered["mcp__c__apply_patch"]["input_schema"]["required"], ["input"])
        self.assertIn('begin_patch: "*** Begin Patch" LF',
                      offered["mcp__c__apply_patch"]["description"])
        reasoning = {"type": "reasoning", "id": "rs_ae6db94a9d4940f680c2", "content": None,
                     "summary": [{"type": "summary_text", "text": "Thinking."}],
                     "encrypted_content": None}
        result = {"type": "custom_tool_call_output", "id": "ctco_01a23b45",
                  "call_id": call["call_id"], "output": "Success. Updated the following files:"
                                                       "\nA hello.txt\n"}
        items, _ = self.codex_turn("gpt-5.5", [ask, reasoning] + [
            dict(i, status="completed") for i in items] + [result])
        self.assertEqual(items[0]["content"][0]["text"],
                         f"Results: {call['call_id']}=Success. Updated the following files:"
                         "\nA hello.txt\n")
        sent = conversation(UPSTREAM.messages_requests()[-1]["body"])
        self.assertEqual(sent[-1]["content"][0]["tool_use_id"], call["call_id"])
        # tool_search: the tools it finds are offered from the next request on.
        UPSTREAM.clear()
        ask = codex_user('Find agent tools. [[tool tool_search {"query": "sub-agent"}]]')
        items, _ = self.codex_turn("gpt-5.5", [ask])
        call = items[-1]
        self.assertEqual((call["type"], call["execution"], call["arguments"]),
                         ("tool_search_call", "client", {"query": "sub-agent"}))
        found = codex_request("claude-x", [])["tools"][1]        # the namespace
        items, _ = self.codex_turn("gpt-5.5", [ask, dict(call, status="completed"), {
            "type": "tool_search_output", "id": "tso_01", "call_id": call["call_id"],
            "status": "completed", "execution": "client", "tools": [found]}])
        self.assertTrue(items[0]["content"][0]["text"].startswith(f"Results: {call['call_id']}="))
        self.assertIn("mcp__c__multi_agent_v1__spawn_agent",
                      [t["name"] for t in UPSTREAM.messages_requests()[-1]["body"]["tools"]])

    def test_codex_cli_default_model_tools_in_an_additional_tools_item(self):
        # Codex 0.171's default model (gpt-6.2-sol; also what `exec resume` falls back
        # to) gets no top-level tools: namespaces in an `additional_tools` input item,
        # one of them holding a custom tool.
        body = codex_request("gpt-6.2-sol", [])
        del body["tools"]
        body.update(parallel_tool_calls=False,
                    reasoning={"effort": "low", "context": "all_turns"})
        tools = {"type": "additional_tools", "id": "at_5a4ae22c", "role": "developer", "tools": [
            {"type": "namespace", "name": "functions", "description": "Code mode.", "tools": [
                {"type": "custom", "name": "exec", "description": "Run JavaScript.",
                 "format": {"type": "grammar", "syntax": "lark",
                            "definition": "start: plain_source"}},
                {"type": "function", "name": "wait", "description": "Wait.", "strict": False,
                 "parameters": {"type": "object", "properties": {}}}]},
            {"type": "namespace", "name": "clock", "description": "Time.", "tools": [
                {"type": "function", "name": "sleep", "description": "Sleep.",
                 "parameters": {"type": "object", "properties": {"ms": {"type": "number"}}}}]}]}
        ask = codex_user('Run it. [[tool functions__exec {"input": "console.log(1)"}]]')
        body["input"] = [tools] + body["input"] + [ask]
        status, _, data = post_raw(self.server.port, "/v1/responses", body)
        self.assertEqual(status, 200, data[:300])
        events = [json.loads(text) for _, text in parse_sse(data) if text]
        call = [e["item"] for e in events if e["type"] == "response.output_item.done"][-1]
        self.assertEqual((call["type"], call["namespace"], call["name"], call["input"]),
                         ("custom_tool_call", "functions", "exec", "console.log(1)"))
        offered = [t["name"] for t in UPSTREAM.messages_requests()[-1]["body"]["tools"]]
        self.assertEqual(sorted(offered), ["mcp__c__clock__sleep", "mcp__c__functions__exec",
                                           "mcp__c__functions__wait"])
        body["input"] += [dict(call, status="completed"), {
            "type": "custom_tool_call_output", "id": "ctco_1", "call_id": call["call_id"],
            "output": "1"}]
        status, _, data = post_raw(self.server.port, "/v1/responses", body)
        events = [json.loads(text) for _, text in parse_sse(data) if text]
        self.assertEqual(events[-1]["response"]["output"][0]["content"][0]["text"],
                         f"Results: {call['call_id']}=1")

    def test_ai_sdk_item_references_resolve_to_stored_items(self):
        # @ai-sdk/openai 3.0 (the default `openai(...)` model) without store: false
        # sends earlier assistant messages and reasoning as item_reference.
        weather = {"type": "function", "name": "weather", "description": "Weather for a city",
                   "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                  "required": ["city"], "additionalProperties": False}}
        ask = {"role": "user", "content": [{"type": "input_text", "text":
               'Weather in Paris? [[thinking]] [[tool weather {"city":"Paris"}]]'}]}
        first = self.client.responses.create(model="gpt-5", input=[ask], tools=[weather],
                                             tool_choice="auto")
        kinds = [item.type for item in first.output]
        self.assertEqual(kinds, ["message", "function_call"])
        message, call = first.output
        result = {"type": "function_call_output", "call_id": call.call_id,
                  "output": '{"city":"Paris","tempC":21}'}
        second = self.client.responses.create(model="gpt-5", tools=[weather], tool_choice="auto",
                                              input=[ask, {"type": "item_reference",
                                                           "id": message.id},
                                                     {"type": "function_call",
                                                      "call_id": call.call_id, "name": "weather",
                                                      "arguments": '{"city":"Paris"}'}, result])
        self.assertEqual(second.output_text,
                         f'Results: {call.call_id}={{"city":"Paris","tempC":21}}')
        sent = conversation(UPSTREAM.messages_requests()[-1]["body"])
        self.assertEqual([b["type"] for b in sent[1]["content"]], ["text", "tool_use"])
        self.assertEqual(sent[1]["content"][0]["text"], "Calling.")
        third = self.client.responses.create(model="gpt-5", tools=[weather], tool_choice="auto",
                                             input=[
            ask, {"type": "item_reference", "id": message.id},
            {"type": "function_call", "call_id": call.call_id, "name": "weather",
             "arguments": '{"city":"Paris"}'}, result,
            {"type": "item_reference", "id": second.output[0].id},
            {"role": "user", "content": [{"type": "input_text", "text": "Thanks."}]}])
        self.assertEqual(third.output_text, UPSTREAM_TEXT)
        sessions = {r["headers"]["X-Claude-Code-Session-Id"] for r in UPSTREAM.messages_requests()}
        self.assertEqual(len(sessions), 1, "each turn went on warm")
        for references in ([{"type": "item_reference", "id": "msg_never_made"}],
                           [{"type": "item_reference", "id": message.id}]):
            with self.subTest(references=references):
                client = self.client if references[0]["id"] != message.id else \
                    self.server.openai_client(api_key="another-app")   # not its item
                with self.assertRaises(openai.BadRequestError) as caught:
                    client.responses.create(model="gpt-5", input=[ask] + references + [
                        {"role": "user", "content": "and?"}])
                self.assertIn("input.1.id: item", caught.exception.body["message"])

    def test_anthropic_tool_runners_and_thread_keep_the_conversation(self):
        # anthropic 2.16's tool_runner and thread() use message threads by default:
        # a continue carries only the new messages, no system and no tools.
        client = self.server.client()

        @anthropic.beta_tool
        def get_weather(city: str) -> str:
            """Weather for a city.

            Args:
                city: The city.
            """
            return f"Sunny in {city}"
        for stream in (False, True):
            with self.subTest(stream=stream):
                UPSTREAM.clear()
                runner = client.beta.messages.tool_runner(
                    model="sonnet", max_tokens=256, system="You are terse.", tools=[get_weather],
                    stream=stream, messages=[{"role": "user", "content":
                                              'Paris? [[tool get_weather {"city": "Paris"}]]'}])
                for _ in runner:
                    pass
                final = runner.until_done()
                first, second = UPSTREAM.messages_requests()
                tool_id = conversation(second["body"])[-1]["content"][0]["tool_use_id"]
                self.assertEqual(final.content[0].text, f"Results: {tool_id}=Sunny in Paris")
                self.assertEqual(second["body"]["system"][-1]["text"], "You are terse.")
                self.assertEqual([t["name"] for t in second["body"]["tools"]],
                                 ["mcp__c__get_weather"])
                self.assertEqual(first["headers"]["X-Claude-Code-Session-Id"],
                                 second["headers"]["X-Claude-Code-Session-Id"])
                self.assertNotIn("message-threads", first["headers"].get("anthropic-beta", ""))
        UPSTREAM.clear()
        thread = client.beta.messages.thread(model="sonnet", max_tokens=64,
                                             system="Answer in French.")
        thread.send({"role": "user", "content": "first question"})
        answer = thread.send({"role": "user", "content": "second question"})
        self.assertEqual(answer.content[0].text, UPSTREAM_TEXT)
        sent = UPSTREAM.messages_requests()[-1]["body"]
        self.assertEqual([as_blocks(m["content"])[0]["text"] for m in conversation(sent)],
                         ["first question", UPSTREAM_TEXT, "second question"])
        self.assertEqual(sent["system"][-1]["text"], "Answer in French.")

    def test_thread_errors_are_the_apis_and_the_sdk_recovers_from_a_lost_thread(self):
        def post(body):
            status, _, data = post_raw(self.server.port, "/v1/messages", dict(
                {"model": "sonnet", "max_tokens": 32}, **body),
                "anthropic-beta: message-threads-2026-08-12")
            return status, json.loads(data)
        status, first = post({"thread": {"type": "create"}, "system": "S",
                              "messages": [{"role": "user", "content": "one"}]})
        self.assertEqual(status, 200)
        table = [({"type": "continue", "previous_message_id": "msg_unknown"}, {},
                  404, "not_found_error", "thread_not_found"),
                 ({"type": "continue", "previous_message_id": first["id"]}, {"system": "T"},
                  400, "invalid_request_error", "thread_fingerprint_mismatch")]
        for thread, extra, status, kind, code in table:
            with self.subTest(code=code):
                got, error = post(dict({"thread": thread, "messages": [
                    {"role": "user", "content": "two"}]}, **extra))
                self.assertEqual((got, error["error"]["type"],
                                  error["error"]["details"]["error_code"]), (status, kind, code))
        status, _ = post({"thread": {"type": "continue", "previous_message_id": first["id"]},
                          "messages": [{"role": "user", "content": "two"}]})
        self.assertEqual(status, 200)
        status, error = post({"thread": {"type": "continue", "previous_message_id": first["id"]},
                              "messages": [{"role": "user", "content": "fork"}]})
        self.assertEqual((status, error["error"]["details"]["error_code"]),
                         (400, "thread_already_continued"))
        thread = self.server.client().beta.messages.thread(model="sonnet", max_tokens=32,
                                                          system="S")
        thread.send({"role": "user", "content": "one"})
        for caller, expected in (("another-app", 404), ("test-key", 200)):
            status, _, _ = post_raw(self.server.port, "/v1/messages", {
                "model": "sonnet", "max_tokens": 32, "messages": [
                    {"role": "user", "content": "elsewhere"}],
                "thread": {"type": "continue", "previous_message_id":
                           thread.previous_message_id}}, f"x-api-key: {caller}")
            self.assertEqual(status, expected)      # threads are per caller
        UPSTREAM.clear()
        # Continued elsewhere: the SDK gets thread_already_continued and replays whole.
        thread.send({"role": "user", "content": "two"})
        sent = UPSTREAM.messages_requests()
        self.assertEqual(len(sent), 1)
        self.assertEqual([as_blocks(m["content"])[0]["text"] for m in conversation(sent[0]["body"])],
                         ["one", UPSTREAM_TEXT, "two"])

    def test_litellm_structured_output_beta_form_is_carried_as_output_config(self):
        # LiteLLM 1.110, anthropic/claude-sonnet-4-5 with response_format.
        schema = {"type": "object", "properties": {"city": {"type": "string"}},
                  "required": ["city"], "additionalProperties": False}
        client = self.server.client()
        message = client.messages.create(
            model="claude-opus-4-6", max_tokens=64,
            messages=[{"role": "user", "content": '[[json {"city": "Oslo"}]]'}],
            extra_body={"output_format": {"type": "json_schema", "schema": schema}},
            extra_headers={"anthropic-beta": "structured-outputs-2025-11-13"})
        self.assertEqual(json.loads(message.content[0].text), {"city": "Oslo"})
        body = UPSTREAM.messages_requests()[-1]["body"]
        self.assertEqual(body["output_config"]["format"], {"type": "json_schema",
                                                          "schema": schema})
        self.assertNotIn("output_format", body)
        with self.assertRaises(anthropic.BadRequestError) as caught:
            client.messages.create(
                model="claude-opus-4-6", max_tokens=64,
                messages=[{"role": "user", "content": "x"}],
                extra_body={"output_format": {"type": "json_schema", "schema": schema},
                            "output_config": {"format": {"type": "json_schema",
                                                         "schema": schema}}})
        self.assertIn("output_format", caught.exception.body["error"]["message"])

    def test_tool_fields_that_never_reach_the_upstream_do_not_split_a_conversation(self):
        # The AI SDK's streamText adds eager_input_streaming to each tool, generateText
        # does not: an app that mixes them must still answer follow-ups warm.
        client = self.server.client()
        streamed = dict(WEATHER, eager_input_streaming=True)
        history = [{"role": "user", "content": "first"}]
        with client.messages.stream(model="sonnet", max_tokens=50, tools=[streamed],
                                    messages=history) as stream:
            answer = stream.get_final_message()
        history += [{"role": "assistant", "content": [
            b.model_dump(exclude_none=True) for b in answer.content]},
            {"role": "user", "content": "second"}]
        client.messages.create(model="sonnet", max_tokens=50, tools=[WEATHER],
                               messages=history)
        first, second = UPSTREAM.messages_requests()
        self.assertEqual(first["headers"]["X-Claude-Code-Session-Id"],
                         second["headers"]["X-Claude-Code-Session-Id"], "answered warm")
        self.assertEqual(len(conversation(second["body"])), 3)


# =============================================================================
# Fuzzing: arbitrary bytes and JSON give API errors, never anything else
# =============================================================================

def json_containers(inner):
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) |
                    st.text(max_size=20), json_containers, max_leaves=25)


ROLES = st.sampled_from(["user", "assistant", "system", "developer", "tool", "x"])


BLOCK_TYPES = st.sampled_from(["text", "image", "tool_use", "tool_result", "thinking",
                               "image_url", "input_text", "input_image", "function_call",
                               "function_call_output", "message", "document"])


BLOCK = st.fixed_dictionaries({"type": BLOCK_TYPES}, optional={
    "text": JSON, "id": JSON, "name": JSON, "input": JSON, "tool_use_id": JSON,
    "content": JSON, "source": JSON, "image_url": JSON, "call_id": JSON, "arguments": JSON,
    "output": JSON, "role": ROLES, "tool_calls": JSON, "tool_call_id": JSON})


MESSAGE = st.fixed_dictionaries({"role": ROLES}, optional={
    "content": st.one_of(st.text(max_size=10), st.lists(BLOCK, max_size=3), JSON),
    "tool_calls": JSON, "tool_call_id": JSON, "type": BLOCK_TYPES, "call_id": JSON,
    "output": JSON, "name": JSON, "arguments": JSON})


REQUEST = st.fixed_dictionaries({}, optional={
    "model": st.one_of(st.sampled_from(["sonnet", "gpt-4o", "claude-opus-5-5"]), JSON),
    "max_tokens": JSON, "messages": st.lists(MESSAGE, max_size=4), "input": st.one_of(
        st.text(max_size=10), st.lists(MESSAGE, max_size=4)),
    "system": JSON, "tools": JSON, "tool_choice": JSON, "temperature": JSON,
    "stop_sequences": JSON, "thinking": JSON, "stream": JSON, "metadata": JSON,
    "response_format": JSON, "text": JSON, "output_config": JSON, "n": JSON,
    "max_completion_tokens": JSON, "stop": JSON, "reasoning_effort": JSON,
    "reasoning": JSON, "instructions": JSON, "user": JSON})


FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


class FuzzTest(unittest.TestCase):
    def only_api_errors(self, translate, body):
        try:
            turn = translate(body)
        except proxy.ProxyError as err:
            self.assertEqual(err.status, 400, err.message)
            return
        self.assertIsInstance(turn, proxy.Turn)
        self.assertIsInstance(turn.shape, str)

    @FUZZ
    @given(REQUEST)
    def test_messages_requests(self, body):
        self.only_api_errors(lambda b: proxy.messages_request_to_turn(b, "sonnet"), body)

    @FUZZ
    @given(REQUEST)
    def test_chat_completions_requests(self, body):
        self.only_api_errors(lambda b: proxy.chat_request_to_turn(b, "sonnet"), body)

    @FUZZ
    @given(REQUEST, st.one_of(st.none(), st.lists(MESSAGE, max_size=2)))
    def test_responses_requests(self, body, previous):
        previous = [m for m in previous or [] if isinstance(m.get("content"), list)]
        self.only_api_errors(lambda b: proxy.responses_request_to_turn(
            b, "sonnet", previous=previous), body)

    @FUZZ
    @given(st.binary(max_size=300) | st.builds(
        lambda line, fields: line + b"\r\n" + b"\r\n".join(fields) + b"\r\n\r\n",
        st.sampled_from([b"POST /v1/messages HTTP/1.1", b"GET / HTTP/1.0", b"GET  HTTP/1.1"]),
        st.lists(st.binary(max_size=40), max_size=5)))
    def test_request_heads(self, data):
        try:
            head = proxy.parse_request_head(data)
            proxy.body_length(head)
        except proxy.ProxyError as err:
            self.assertIn(err.status, (400, 413, 431), err.message)

    @FUZZ
    @given(st.lists(st.binary(max_size=30), max_size=8))
    def test_chunked_bodies(self, pieces):
        decoder = proxy.ChunkedDecoder(1000)
        try:
            for piece in pieces:
                decoder.feed(piece)
        except proxy.ProxyError as err:
            self.assertIn(err.status, (400, 413), err.message)


def as_blocks(content) -> list:
    """Content as blocks without cache_control marks: a string is one text block."""
    return strip_cache_control([{"type": "text", "text": content}]
                               if isinstance(content, str) else content)


def strip_cache_control(blocks):
    """Content blocks without the CLI's own cache_control marks."""
    return [{k: v for k, v in block.items() if k != "cache_control"} for block in blocks]


# =============================================================================
# Benchmark mode: python test_claude_sdk_proxy.py --bench (figures, never asserts)
# =============================================================================

BENCH_MODEL = "claude-sonnet-5-5"


def bench_chat(client, messages, system):
    """One stateless turn; return (seconds, history with the answer appended)."""
    started = time.perf_counter()
    message = client.messages.create(model=BENCH_MODEL, max_tokens=50, system=system,
                                     messages=messages)
    return time.perf_counter() - started, bench_answered(messages, message)


def bench_answered(messages, message):
    """The history with the answer appended, as a stateless client sends it next."""
    return messages + [{"role": "assistant", "content": [
        block.model_dump(exclude_none=True) for block in message.content]}]


class BenchProxy:
    """The proxy as its own process (as deployed): the bench's client threads must
    not share its interpreter lock."""

    def __init__(self, tmpdir: str | None = None, **env):
        import subprocess
        environ = dict(os.environ, **{f"CLAUDE_PROXY_{k.upper()}": str(v)
                                      for k, v in env.items()})
        if tmpdir:
            environ["TMPDIR"] = tmpdir
        self.process = subprocess.Popen(
            [sys.executable, proxy.__file__, "--port", "0"], env=environ,
            stderr=subprocess.PIPE, text=True)
        for line in self.process.stderr:
            found = re.search(r"listening on (http://\S+)", line)
            if found:
                self.url = found.group(1)
                break
        else:
            raise RuntimeError("the proxy did not start")
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        """Read the log to the end (the proxy's exit), then close the pipe."""
        with self.process.stderr:
            self.process.stderr.read()

    def client(self) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.url, api_key="bench", max_retries=0,
                                   timeout=120)

    def clis(self) -> list[int]:
        return [pid for pid in cli_children() if pid != self.process.pid]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def bench_spares(server) -> int:
    """Connected spares (GET /sessions)."""
    return sum(1 for s in server.client().get("/sessions", cast_to=object)["data"]
               if s["state"] == "spare")


def bench_rss_mb(pids) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return total


def bench_direct_clients(count: int, config) -> list:
    """`count` ClaudeSDKClients with the proxy's options, not yet connected: the
    same CLIs the proxy drives, without the proxy."""
    turn = proxy.messages_request_to_turn(
        {"model": BENCH_MODEL, "max_tokens": 50, "system": "direct",
         "messages": [{"role": "user", "content": "hi"}]}, config.default_model)
    return [proxy.sdk.ClaudeSDKClient(proxy.cli_options(
        turn, config, dt.datetime.now(dt.timezone.utc))) for _ in range(count)]


async def bench_direct_turn(client, text) -> float:
    """One turn on a connected client, in seconds."""
    started = time.perf_counter()
    await client.query(text)
    async for _ in client.receive_response():
        pass
    return time.perf_counter() - started


def bench_direct_sdk(rounds: int) -> list[float]:
    """Warm turns on one connected ClaudeSDKClient, no proxy."""
    config = proxy.Config(workdir=tempfile.mkdtemp(prefix="proxy-bench-"))

    async def run() -> list[float]:
        [client] = bench_direct_clients(1, config)
        await client.connect()
        try:
            await bench_direct_turn(client, "the first turn pays the CLI's lazy start")
            return [await bench_direct_turn(client, f"direct {i}") for i in range(rounds)]
        finally:
            await client.disconnect()
    try:
        return asyncio.run(run())
    finally:
        shutil.rmtree(config.workdir, ignore_errors=True)


def bench_settle(server) -> None:
    """Wait until no spare is starting: a CLI start is CPU work beside the requests."""
    wait_until(lambda: all(s["state"] != "starting" for s in
                           server.client().get("/sessions", cast_to=object)["data"]),
               timeout=60)


def bench_conversations(server, count: int, system: str) -> list[list[dict]]:
    """`count` answered one-turn conversations, each ready for a follow-up."""
    client = server.client()
    return [bench_chat(client, [{"role": "user", "content": f"{system} {n}"}], system)[1]
            for n in range(count)]


def bench_bursts(server, histories, system, rounds: int) -> tuple[list[float], list[float]]:
    """`rounds` times, one follow-up on every conversation at once, each round
    beside one turn on as many direct SDK clients at once (from the same event
    loop, alternating, so both see the same machine); return both wall times to
    the last answer. The CLIs of the other kind are stopped during a round: an
    idle CLI's timers cost 10-20 ms of CPU a second, and neither a proxy (it stops
    its idle CLIs after 2 s) nor a direct SDK user has 8 idle CLIs of the other."""
    config = proxy.Config(workdir=tempfile.mkdtemp(prefix="proxy-bench-"))

    @contextlib.contextmanager
    def stopped(pids):
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)

    async def follow_up(client, n):
        messages = histories[n] + [{"role": "user", "content": "and then?"}]
        message = await client.messages.create(model=BENCH_MODEL, max_tokens=50,
                                               system=system, messages=messages)
        histories[n] = bench_answered(messages, message)

    async def timed(burst) -> float:
        started = time.perf_counter()
        await asyncio.gather(*burst)
        return time.perf_counter() - started

    async def run() -> tuple[list[float], list[float]]:
        direct = bench_direct_clients(len(histories), config)
        for client in direct:
            await client.connect()
            await bench_direct_turn(client, "the first turn pays the CLI's lazy start")
        try:
            async with anthropic.AsyncAnthropic(base_url=server.url, api_key="bench",
                                                max_retries=0, timeout=120) as client:
                proxied, alone = [], []
                direct_pids = [c._transport._process.pid for c in direct]
                proxied_pids = [pid for pid in server.clis() if pid not in direct_pids]
                for i in range(rounds):
                    with stopped(direct_pids):
                        proxied.append(await timed(follow_up(client, n)
                                                   for n in range(len(histories))))
                    with stopped(proxied_pids):
                        alone.append(await timed(bench_direct_turn(c, f"parallel {i}")
                                                 for c in direct))
                return proxied, alone
        finally:
            for client in direct:
                await client.disconnect()
    try:
        return asyncio.run(run())
    finally:
        shutil.rmtree(config.workdir, ignore_errors=True)


def bench_throughput(server, workers: int, seconds: float) -> tuple[float, list[float]]:
    """Follow-up turns per second with `workers` clients, each on its own live
    conversation, and every turn's wall time (the tail shows what waits)."""
    histories = bench_conversations(server, workers, f"tp{workers}")
    bench_settle(server)
    times: list[float] = []
    deadline = time.perf_counter() + seconds

    clients = [server.client() for _ in range(workers)]

    def work(n):
        client = clients[n]
        while time.perf_counter() < deadline:
            took, histories[n] = bench_chat(client, histories[n] + [
                {"role": "user", "content": "next"}], f"tp{workers}")
            times.append(took)
    started = time.perf_counter()
    threads = [threading.Thread(target=work, args=(n,)) for n in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(times) / (time.perf_counter() - started), times


def bench_cap(conversations: int, cap: int) -> tuple[int, int]:
    """Run `conversations` two-turn chats at once under a cap; return the peak CLI
    count and the CLIs left once they idled out."""
    capped = BenchProxy(max_spares=2, max_concurrent=cap, max_sessions=cap, session_idle_s=2)
    peak = 0
    done = threading.Event()

    def watch():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, len(capped.clis()))
            done.wait(0.02)

    def converse(n):
        client = capped.client()
        _, history = bench_chat(client, [{"role": "user", "content": f"chat {n}"}], "cap")
        bench_chat(client, history + [{"role": "user", "content": "more"}], "cap")
    try:
        watcher = threading.Thread(target=watch)
        watcher.start()
        threads = [threading.Thread(target=converse, args=(n,)) for n in range(conversations)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done.set()
        watcher.join()
        wait_until(lambda: not capped.clis(), timeout=30)
        return peak, len(capped.clis())
    finally:
        capped.stop()


def bench_cold(rounds: int, label: str) -> list[float]:
    """First turns of new shapes: each a new CLI, resuming nothing."""
    server = BenchProxy(max_spares=0)       # no spare starting beside a cold request
    try:
        return [bench_chat(server.client(), [{"role": "user", "content": "hi"}],
                           f"cold shape {label} {i}")[0] for i in range(rounds)]
    finally:
        server.stop()


def bench_recycled(rounds: int) -> list[float]:
    """New chats of one shape at a cap of 2 CLIs and no spares: each answered on
    the least recently used session's CLI, rewound."""
    server = BenchProxy(max_spares=0, max_concurrent=1, max_sessions=2)
    try:
        client = server.client()
        bench_conversations(server, 2, "recycled")
        times = []
        for i in range(rounds):
            bench_settle(server)
            times.append(bench_chat(client, [{"role": "user", "content": f"chat {i}"}],
                                    "recycled")[0])
        return times
    finally:
        server.stop()


# -- shared proxy: several apps' shapes on one proxy, spares on and off --------

def bench_procs() -> dict[int, tuple[int, str, list[int]]]:
    """Every process: pid -> (ppid, comm, [utime, stime, cutime, cstime] in clock
    ticks), from /proc (zombies included: their times stay until they are reaped)."""
    procs = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{entry}/stat") as f:
                    text = f.read()
                fields = text[text.rindex(")") + 2:].split()
                procs[int(entry)] = (int(fields[1]), text[text.index("(") + 1:text.rindex(")")],
                                     [int(v) for v in fields[11:15]])
    return procs


def bench_clis_of(server) -> list[int]:
    """The CLI processes of one BenchProxy (server.clis() has every proxy's), those
    exiting and not yet reaped included."""
    return [pid for pid, (ppid, comm, _) in bench_procs().items()
            if ppid == server.process.pid and comm == "claude"]


def bench_cpu(server) -> tuple[float, float]:
    """CPU seconds (user + system) used so far by a BenchProxy: (its own process,
    everything it started). The proxy is a process of its own, so none of the
    bench's client work is in either. What it started: its CLIs (and anything they
    start) and its watchdog; a live one counts its own utime+stime plus the
    cutime+cstime of what it reaped, and one that is gone counts in full in the
    proxy's cutime+cstime (the proxy's event loop waits for its CLIs, so it is
    their reaper; a zombie not reaped yet still counts its own times). A difference
    of two readings is then everything spent in between, by CLIs that started,
    ran or exited in between alike. Read twice, until no process came, went or was
    reaped between the two readings."""
    root = server.process.pid
    tick = os.sysconf("SC_CLK_TCK")

    def read():
        procs = bench_procs()
        tree, grown = {root}, True
        while grown:
            grown = False
            for pid, (ppid, _, _) in procs.items():
                if ppid in tree and pid not in tree:
                    tree.add(pid)
                    grown = True
        own = procs[root][2]
        started = own[2] + own[3] + sum(sum(procs[pid][2]) for pid in tree - {root})
        return (own[0] + own[1]) / tick, started / tick, tree, own[2:]
    first = read()
    for _ in range(20):
        second = read()
        if second[2:] == first[2:]:
            break
        first = second
    return second[0], second[1]


class BenchSpawns:
    """Counts the processes some BenchProxies start while it runs: their children
    first seen in /proc, which it lists every 20 ms (a CLI lives far longer). Once
    running, a proxy starts no other process than CLIs (its watchdog comes first)."""

    def __init__(self, servers):
        self.started = {server.process.pid: 0 for server in servers}
        self._known = set(bench_procs())
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._done.wait(0.02):
            for entry in os.listdir("/proc"):
                if entry.isdigit() and int(entry) not in self._known:
                    self._known.add(int(entry))
                    with contextlib.suppress(OSError, ValueError, IndexError):
                        with open(f"/proc/{entry}/stat") as f:
                            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                        if ppid in self.started:
                            self.started[ppid] += 1

    def stop(self) -> dict[int, int]:
        """Processes started, by proxy pid."""
        self._done.set()
        self._thread.join()
        return self.started


BENCH_POLLS: dict[BenchProxy, tuple] = {}  # proxy -> (its client, GET /sessions sent)


def bench_sessions(server) -> list[dict]:
    """GET /sessions, counted: each costs the proxy process ~3 ms of CPU, which the
    CPU figures take out again (bench_poll_cost)."""
    client, polls = BENCH_POLLS.get(server) or (server.client(), 0)
    BENCH_POLLS[server] = client, polls + 1
    return client.get("/sessions", cast_to=object)["data"]


def bench_usage(server) -> tuple[float, float, int]:
    """bench_cpu's two readings and the GET /sessions sent so far."""
    return *bench_cpu(server), BENCH_POLLS.get(server, (None, 0))[1]


def bench_spent(server, before) -> tuple[float, float]:
    """CPU seconds since `before` (a bench_usage): the proxy process's, less what
    the bench's own GET /sessions cost it, and what it started."""
    own, started, polls = bench_usage(server)
    cost = bench_poll_cost(server)
    return own - before[0] - (polls - before[2]) * cost, started - before[1]


def bench_poll_cost(server, polls: int = 20) -> float:
    """CPU seconds a GET /sessions costs the proxy process, measured now, at rest."""
    before = bench_cpu(server)[0]
    for _ in range(polls):
        bench_sessions(server)
    return (bench_cpu(server)[0] - before) / polls


def bench_quiet(server, frozen: bool = False) -> None:
    """Wait until a proxy is at rest, twice 0.25 s apart (a spare for a request's
    shape is started just after its answer): no CLI starting (as bench_settle, which
    polls 5 times as often), busy or finishing, none still exiting (its CLI
    processes are its sessions'), and with `frozen` every CLI stopped (idle 2 s; idle
    CLIs' timers cost CPU). Then no work of one measure runs into the next, on this
    proxy or on another. Called just after a request: a proxy that starts a spare
    only after SPARE_QUIET_S without requests gets that long first."""
    time.sleep(proxy.SPARE_QUIET_S)

    def at_rest() -> bool:
        sessions = bench_sessions(server)
        return (all(s["state"] in ("idle", "spare", "awaiting_tools") and
                    (not frozen or s.get("frozen", True) or s["idle_s"] > 4)
                    for s in sessions) and len(bench_clis_of(server)) == len(sessions))
    wait_until(lambda: at_rest() and (time.sleep(0.25) or at_rest()), timeout=60,
               interval=0.25)


def bench_end_sessions(server, keep) -> None:
    """End every conversation but those with session ids in `keep` (DELETE
    /sessions/{id}): a measure's leftovers neither fill the proxy nor get evicted
    in a later one. Spares stay: keeping or letting them go is the policy's."""
    client = server.client()
    for session in bench_sessions(server):
        if session["id"] not in keep and session["state"] not in ("spare", "starting"):
            with contextlib.suppress(anthropic.NotFoundError):
                client.delete(f"/sessions/{session['id']}", cast_to=object)
    bench_quiet(server, frozen=True)


def bench_new_shape(client, system: str) -> float:
    """A new chat, in seconds."""
    return bench_chat(client, [{"role": "user", "content": "hi"}], system)[0]


def bench_rotation(servers: dict, rounds: int, shapes: int = 10) -> dict:
    """Follow-ups rotating over `shapes` live conversations of as many shapes (apps
    with system prompts app-0, app-1, ...) on each proxy: `rounds` rounds of one
    follow-up on each, the proxies taking turns round by round, each at rest before
    the other's round. Per proxy label: (every follow-up's seconds, and over the
    whole rotation the CPU seconds of the proxy process and of what it started
    (bench_spent), and the processes it started)."""
    histories = {label: [] for label in servers}
    for k in range(shapes):
        for label, server in servers.items():
            histories[label] += bench_conversations(server, 1, f"app-{k}")
    for server in servers.values():
        bench_quiet(server, frozen=True)
    spawns = BenchSpawns(servers.values())
    before = {label: bench_usage(server) for label, server in servers.items()}
    times = {label: [] for label in servers}
    for i in range(rounds):
        for label, server in servers.items():
            client = server.client()
            for k in range(shapes):
                took, histories[label][k] = bench_chat(client, histories[label][k] + [
                    {"role": "user", "content": f"follow-up {i}"}], f"app-{k}")
                times[label].append(took)
            bench_quiet(server, frozen=True)   # its idle CLIs' timers stopped too
    started = spawns.stop()
    spent = {label: bench_spent(server, before[label]) for label, server in servers.items()}
    return {label: (times[label], *spent[label], started[server.process.pid])
            for label, server in servers.items()}


def bench_familiar(servers: dict, rounds: int, system: str) -> dict:
    """New chats of a shape that started chats before, each after the proxy came to
    rest (a spare, where there are spares, ready); seconds by proxy label."""
    times = {label: [] for label in servers}
    keep = {label: {s["id"] for s in bench_sessions(server)}
            for label, server in servers.items()}
    for server in servers.values():
        bench_new_shape(server.client(), system)
        bench_quiet(server)             # the spare for `system` started, if any
    for i in range(rounds):
        for label, server in servers.items():
            times[label].append(bench_chat(server.client(), [
                {"role": "user", "content": f"new chat {i}"}], system)[0])
            bench_quiet(server)
    for label, server in servers.items():
        bench_end_sessions(server, keep[label])
    return times


def bench_new_shapes(servers: dict, runs: int, count: int = 5) -> dict:
    """`runs` times on each proxy in turn, from rest: new chats of `count` new
    shapes, one after another. By proxy label: (each run's seconds per chat, CPU
    seconds of the proxy and what it started per chat, up to rest after the last)."""
    out = {label: ([], 0.0) for label in servers}
    for run in range(runs):
        for label, server in servers.items():
            keep = {s["id"] for s in bench_sessions(server)}
            before = bench_usage(server)
            client = server.client()
            times = [bench_new_shape(client, f"new app {label} {run} {n}")
                     for n in range(count)]
            bench_quiet(server)
            runs_so_far, cpu = out[label]
            out[label] = (runs_so_far + [times], cpu + sum(bench_spent(server, before)))
            bench_end_sessions(server, keep)
    return {label: (times, cpu / (runs * count)) for label, (times, cpu) in out.items()}


def bench_burst(server, systems: list[str]) -> float:
    """New chats of these shapes all at once, one thread each: seconds until the
    last is answered."""
    clients = [server.client() for _ in systems]
    go, errors = threading.Event(), []

    def send(n):
        go.wait()
        try:
            bench_new_shape(clients[n], systems[n])
        except Exception as exc:        # noqa: BLE001 - reported after the join
            errors.append(exc)
    threads = [threading.Thread(target=send, args=(n,)) for n in range(len(systems))]
    for t in threads:
        t.start()
    started = time.perf_counter()
    go.set()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - started


def bench_percentile(values, fraction):
    """The value below which `fraction` of `values` lie."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def bench(rounds: int = 7) -> None:
    """Print the warm-session benchmark table: medians, ratios to a cold start."""
    import statistics
    median = statistics.median
    setUpModule()
    cold = bench_cold(rounds, "first")
    server = BenchProxy(max_spares=2, max_concurrent=8, max_sessions=32)
    try:
        client = server.client()
        [history] = bench_conversations(server, 1, "app")
        # Its spare starts after a quiet second: let it, before the follow-ups.
        wait_until(lambda: bench_spares(server) >= 1, timeout=60)
        bench_settle(server)
        follow = []
        for i in range(3 * rounds):
            seconds, history = bench_chat(client, history + [
                {"role": "user", "content": f"follow-up {i}"}], "app")
            follow.append(seconds)
        fresh = []
        for i in range(rounds):
            wait_until(lambda: bench_spares(server) >= 1, timeout=60)
            bench_settle(server)
            fresh.append(bench_chat(client, [{"role": "user", "content": f"new chat {i}"}],
                                    "app")[0])
        bench_settle(server)
        direct = bench_direct_sdk(3 * rounds)
    finally:
        server.stop()
    # A proxy of its own, without the sessions above: every idle CLI costs ~11 ms
    # of CPU a second (its timers), which the concurrent rounds would share.
    server = BenchProxy(max_spares=0, max_concurrent=8, max_sessions=32)
    try:
        eight = bench_conversations(server, 8, "eight")
        bursts, direct_eight = bench_bursts(server, eight, "eight", 2 * rounds)
        loads = {w: bench_throughput(server, w, 5.0) for w in (1, 4, 8)}
        pids = server.clis()
        clis, rss = len(pids), bench_rss_mb(pids)
    finally:
        server.stop()
    recycled = bench_recycled(rounds)
    peak, left = bench_cap(50, 8)
    cold += bench_cold(rounds, "last")      # half at each end: the machine drifts

    c = median(cold)

    def row(name, seconds):
        return name, f"{seconds * 1000:.0f} ms", f"{seconds / c:.2f}"
    rows = [
        row("cold first turn (new shape)", c),
        row("warm follow-up, stateless client", median(follow)),
        row("new chat, familiar shape (spare)", median(fresh)),
        row("new chat at the session cap (recycled CLI)", median(recycled)),
        row("direct warm SDK call, no proxy", median(direct)),
        row("proxy overhead over the direct call", median(follow) - median(direct)),
        row("8 concurrent follow-ups, last answer", median(bursts)),
        row("8 concurrent direct SDK turns, no proxy (rounds alternate)", median(direct_eight)),
        *[(f"follow-ups/s at concurrency {w}", f"{r:.1f}/s", "") for w, (r, _) in loads.items()],
        row("follow-up at concurrency 8, 99th percentile", bench_percentile(loads[8][1], 0.99)),
        ("CLI processes / RSS after the runs", f"{clis} / {rss:.0f} MB", ""),
        ("50 conversations at once, cap 8: peak CLIs", f"{peak}", ""),
        ("CLIs left after they idled out", f"{left}", ""),
    ]
    print(f"\nmedians of {rounds} runs ({3 * rounds} for warm turns, {2 * rounds} for cold "
          f"starts and concurrent rounds); scripted upstream on "
          f"loopback; {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
          f"claude-agent-sdk {proxy.sdk_versions()['sdk']}\n")
    print("| measure | value | × cold |\n|---|---:|---:|")
    for name, value, ratio in rows:
        print(f"| {name} | {value} | {ratio} |")
    bench_shared(rounds)
    UPSTREAM.close()


def bench_shared(rounds: int = 7) -> None:
    """Print the shared-proxy table: several apps' shapes on one proxy, with spares
    (max_spares=2, the default policy) and without (max_spares=0), side by side in
    one run: the two proxies take turns measure by measure, each at rest before the
    other's turn. Medians, ratios on / off and to a cold start."""
    import statistics
    median = statistics.median
    runs = max(2, rounds // 2)
    default_mc = proxy.Config().max_concurrent
    cold = bench_cold(rounds, "shared first")
    servers: list[BenchProxy] = []

    def pair(**env) -> dict[str, BenchProxy]:
        made = {"on": BenchProxy(max_spares=2, max_sessions=32, **env),
                "off": BenchProxy(max_spares=0, max_sessions=32, **env)}
        servers.extend(made.values())
        return made
    try:
        shared = pair(max_concurrent=default_mc)
        rotation = bench_rotation(shared, rounds)
        familiar = bench_familiar(shared, rounds, "app-0")
        new_shapes = bench_new_shapes(shared, runs)
        groups = {default_mc: shared}
        if 8 not in groups:
            groups[8] = pair(max_concurrent=8)
        bursts = {(mc, label): [] for mc in groups for label in shared}
        for run in range(runs):
            for mc, group in groups.items():
                for label, server in group.items():
                    keep = {s["id"] for s in bench_sessions(server)}
                    bursts[mc, label].append(bench_burst(
                        server, [f"burst {mc} {label} {run} {n}" for n in range(8)]))
                    bench_end_sessions(server, keep)
    finally:
        for server in servers:
            server.stop()
    cold += bench_cold(rounds, "shared last")      # half at each end: the machine drifts

    c = median(cold)

    def ms(seconds):
        return f"{seconds * 1000:.0f} ms"

    def ms_cold(seconds):
        return f"{ms(seconds)} ({seconds / c:.2f}× cold)"

    def row(name, on, off, show=ms):
        return name, show(on), show(off), f"{on / off:.2f}" if off else ""

    follow_ups = len(rotation["on"][0])
    cpu = {label: (own + started) / follow_ups
           for label, (_, own, started, _) in rotation.items()}
    later = {label: median([t for run in times for t in run[1:]])
             for label, (times, _) in new_shapes.items()}
    first = {label: median([run[0] for run in times]) for label, (times, _) in new_shapes.items()}
    rows = [
        (f"cold first turn, a new shape (bench_cold: no spares, {2 * rounds} runs)", ms(c),
         "", ""),
        row(f"follow-up, 10 live conversations of 10 shapes in rotation ({follow_ups})",
            median(rotation["on"][0]), median(rotation["off"][0])),
        row("… its 90th percentile", bench_percentile(rotation["on"][0], 0.9),
            bench_percentile(rotation["off"][0], 0.9)),
        row("CPU per follow-up in that rotation: proxy + all it started", cpu["on"], cpu["off"]),
        row("… of which the proxy process itself", rotation["on"][1] / follow_ups,
            rotation["off"][1] / follow_ups),
        row("processes (CLIs) started per follow-up", rotation["on"][3] / follow_ups,
            rotation["off"][3] / follow_ups, show=lambda v: f"{v:.2f}"),
        row(f"new chat, familiar shape (app-0), after settling ({rounds})",
            median(familiar["on"]), median(familiar["off"]), ms_cold),
        row(f"new shape right after other new shapes (2nd-5th of 5, {4 * runs})",
            later["on"], later["off"], ms_cold),
        row(f"… the 1st of those 5, from rest ({runs})", first["on"], first["off"], ms_cold),
        row("CPU per new-shape chat, 5 in a row (up to rest)", new_shapes["on"][1],
            new_shapes["off"][1]),
        *[row(f"8 new shapes at once, last answer, max_concurrent={mc}"
              f"{' (default)' if mc == default_mc else ''} ({runs})",
              median(bursts[mc, "on"]), median(bursts[mc, "off"])) for mc in groups],
    ]
    print(f"\nshared proxy, medians: spares on = max_spares=2 (the default policy), off = "
          f"max_spares=0, both max_sessions=32 and max_concurrent={default_mc} unless "
          f"said; the proxies take turns, each at rest before the other's turn. CPU: "
          f"utime+stime from /proc of the proxy process and of all it started (the CLIs "
          f"it reaped counted from its cutime+cstime), up to rest after the last "
          f"request; the bench's own clients not included, nor what its GET /sessions "
          f"polls cost the proxy\n")
    print("| measure | spares on | spares off | on ÷ off |\n|---|---:|---:|---:|")
    for name, on, off, ratio in rows:
        print(f"| {name} | {on} | {off} | {ratio} |")


if __name__ == "__main__":
    if "--bench" in sys.argv:
        bench()
    else:
        unittest.main()
