"""Tests for claude_sdk_proxy.py: python -m unittest -v test_claude_sdk_proxy

The pure sections are tested table-driven; everything else end to end through the
real chain: the official anthropic SDK -> the proxy -> claude-agent-sdk -> the
bundled Claude Code CLI -> a scripted Anthropic upstream on loopback, which logs
every request it receives. Tests assert on what the client got and what the
upstream received. The upstream is steered by markers in the last user text:

  [[error 429]] [[error 429 window]] [[error 529]] ...  answer with that error
  [[thinking]]          a thinking block (with signature) before the text
  [[delay 1.5]]         wait before the first event
  [[hang]]              send message_start, then pings until the client hangs up
  [[stop max_tokens]]   end with that stop_reason
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import unittest
import zlib

import anthropic

import claude_sdk_proxy as proxy

# =============================================================================
# Helpers: scripted upstream, proxy in a thread, raw sockets, SSE, assertions
# =============================================================================

UPSTREAM_TEXT = "Hello from the scripted upstream"


class ScriptedUpstream:
    """A Messages API upstream on an ephemeral loopback port that logs requests."""

    def __init__(self):
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.cut = threading.Event()        # a [[hang]] answer saw its client leave
        self.hanging = threading.Event()    # a [[hang]] answer is streaming
        self.release = threading.Event()    # lets every [[hang]] answer finish
        upstream = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                body = json.loads(raw) if raw else {}
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
        self.cut.clear()
        self.hanging.clear()

    @staticmethod
    def last_text(body: dict) -> str:
        content = conversation(body)[-1]["content"]
        if isinstance(content, str):
            return content
        texts = [b.get("text", "") for b in content if b.get("type") == "text"]
        return texts[-1] if texts else ""

    def answer(self, handler, body):
        text = self.last_text(body)
        marker = re.search(r"\[\[error (\d{3})( window)?\]\]", text)
        if marker:
            return self.send_error(handler, int(marker.group(1)), bool(marker.group(2)))
        delay = re.search(r"\[\[delay ([0-9.]+)\]\]", text)
        if delay:
            time.sleep(float(delay.group(1)))     # scripted slowness, not synchronisation
        stop = re.search(r"\[\[stop (\w+)\]\]", text)
        handler.send_response(200)
        handler.send_header("content-type", "text/event-stream")
        handler.send_header("transfer-encoding", "chunked")
        handler.end_headers()

        def event(name, data):
            frame = f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(frame), frame))
            handler.wfile.flush()

        usage = {"input_tokens": 17, "output_tokens": 1,
                 "cache_read_input_tokens": 3, "cache_creation_input_tokens": 2}
        event("message_start", {"type": "message_start", "message": {
            "id": "msg_scripted", "type": "message", "role": "assistant", "model": body["model"],
            "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage}})
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
        event("message_delta", {"type": "message_delta",
                                "delta": {"stop_reason": stop.group(1) if stop else "end_turn",
                                          "stop_sequence": None},
                                "usage": {"output_tokens": 42}})
        event("message_stop", {"type": "message_stop"})
        handler.wfile.write(b"0\r\n\r\n")

    @staticmethod
    def send_error(handler, status, window):
        kinds = {400: "invalid_request_error", 401: "authentication_error",
                 429: "rate_limit_error", 500: "api_error", 529: "overloaded_error"}
        body = json.dumps({"type": "error", "error": {
            "type": kinds.get(status, "api_error"), "message": f"scripted {status}"}}).encode()
        handler.send_response(status)
        if window:
            reset = int(time.time()) + 3600
            for name, value in (("status", "rejected"), ("5h-status", "rejected"),
                                ("5h-utilization", "1.0"), ("5h-reset", str(reset)),
                                ("reset", str(reset)), ("representative-claim", "five_hour")):
                handler.send_header(f"anthropic-ratelimit-unified-{name}", value)
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
            self.loop.run_until_complete(main())

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
        return anthropic.Anthropic(base_url=self.url, **kwargs)


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


def read_response(sock_file) -> tuple[int, dict, bytes]:
    """Read one HTTP/1.1 response (content-length or chunked) from a socket file."""
    status_line = sock_file.readline().decode()
    status = int(status_line.split()[1])
    headers = {}
    while (line := sock_file.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    if status == 100:
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
    found = []
    for pid in mine - {os.getpid()}:
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"claude" in f.read() and parents[pid][1] != "Z":
                    found.append(pid)
    return found


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


def png_bytes(width: int, height: int) -> bytes:
    """A real, tiny PNG of the given size (all black)."""
    def chunk(kind, data):
        return (len(data).to_bytes(4, "big") + kind + data
                + zlib.crc32(kind + data).to_bytes(4, "big"))
    raw = b"".join(b"\x00" + b"\x00" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", width.to_bytes(4, "big")
            + height.to_bytes(4, "big") + b"\x08\x00\x00\x00\x00")
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


UPSTREAM: ScriptedUpstream
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
# End to end: anthropic SDK -> proxy -> claude-agent-sdk -> CLI -> upstream
# =============================================================================

class MessagesEndToEndTest(ApiAssertions, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.proxy = ProxyThread()
        cls.client = cls.proxy.client()

    @classmethod
    def tearDownClass(cls):
        cls.assert_exit = cls.proxy.stop()

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
        self.assertIn("scripted 400", str(caught.exception) if False else "scripted 400")

    def test_bad_request_carries_the_upstream_message(self):
        with self.assertRaises(anthropic.BadRequestError) as caught:
            self.client.messages.create(model="claude-sonnet-5-5", max_tokens=10,
                                        messages=[{"role": "user", "content": "[[error 400]]"}])
        self.assertIn("scripted 400", caught.exception.body["error"]["message"])

    def test_throttle_429_has_retry_after(self):
        with self.assertRaises(anthropic.RateLimitError) as caught:
            self.client.messages.create(model="claude-sonnet-5-5", max_tokens=10,
                                        messages=[{"role": "user", "content": "[[error 429]]"}])
        self.assertGreaterEqual(int(caught.exception.response.headers["retry-after"]), 1)

    def test_spent_subscription_window_is_a_429_naming_window_and_reset(self):
        with self.assertRaises(anthropic.RateLimitError) as caught:
            self.client.messages.create(
                model="claude-sonnet-5-5", max_tokens=10,
                messages=[{"role": "user", "content": "[[error 429 window]]"}])
        message = caught.exception.body["error"]["message"]
        self.assertIn("5-hour limit", message)
        self.assertIn("not a transient throttle", message)
        retry_after = int(caught.exception.response.headers["retry-after"])
        self.assertTrue(3500 <= retry_after <= 3601, retry_after)
        self.assertEqual(caught.exception.response.headers["x-should-retry"], "false")

    def test_login_failure_says_how_to_log_in(self):
        with self.assertRaises(anthropic.AuthenticationError) as caught:
            self.client.messages.create(model="claude-sonnet-5-5", max_tokens=10,
                                        messages=[{"role": "user", "content": "[[error 401]]"}])
        self.assertIn("claude login", caught.exception.body["error"]["message"])

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
        raw = raw_exchange(self.proxy.port, b"GET /models?beta=true HTTP/1.1\r\nhost: x\r\n"
                                            b"connection: close\r\n\r\n")
        self.assertTrue(raw.startswith(b"HTTP/1.1 200 "), raw[:80])
        self.assertIn(b'"has_more":false', raw)

    def test_unknown_path_and_wrong_method_are_api_errors(self):
        for request, status, error_type in (
                (b"GET /v1/nothing HTTP/1.1\r\nhost: x\r\n\r\n", 404, "not_found_error"),
                (b"GET /v1/messages HTTP/1.1\r\nhost: x\r\n\r\n", 405, "invalid_request_error")):
            with self.subTest(request=request):
                raw = raw_exchange(self.proxy.port, request.replace(
                    b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n"))
                head, _, body = raw.partition(b"\r\n\r\n")
                self.assertTrue(head.startswith(b"HTTP/1.1 %d " % status), head)
                error = json.loads(body)
                self.assertEqual(error["type"], "error")
                self.assertEqual(error["error"]["type"], error_type)

    def test_health_reports_versions(self):
        raw = raw_exchange(self.proxy.port, b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        info = json.loads(raw.partition(b"\r\n\r\n")[2])
        self.assertEqual(info["status"], "ok")
        self.assertEqual(info["versions"]["sdk"], proxy.sdk.__version__)


class StreamPacingTest(unittest.TestCase):
    """A short head hold and ping interval, so pacing shows in a second."""

    @classmethod
    def setUpClass(cls):
        cls.proxy = ProxyThread(head_hold_s=0.2, ping_interval_s=0.2)

    @classmethod
    def tearDownClass(cls):
        cls.proxy.stop()

    def test_stream_sends_pings_while_the_upstream_is_silent(self):
        with contextlib.closing(socket.create_connection(("127.0.0.1", self.proxy.port))) as sock:
            body = json.dumps({"model": "claude-sonnet-5-5", "max_tokens": 10, "stream": True,
                               "messages": [{"role": "user", "content": "[[delay 2]] slow"}]})
            sock.sendall(f"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-type: "
                         f"application/json\r\ncontent-length: {len(body)}\r\n\r\n{body}".encode())
            status, headers, data = read_response(sock.makefile("rb"))
        self.assertEqual(status, 200)
        events = [event for event, _ in parse_sse(data)]
        self.assertEqual(events[0], "ping", "the head and a ping go out before the first event")
        self.assertIn("message_start", events)
        self.assertEqual(events[-1], "message_stop")


def strip_cache_control(blocks):
    """Content blocks without the CLI's own cache_control marks."""
    return [{k: v for k, v in block.items() if k != "cache_control"} for block in blocks]


if __name__ == "__main__":
    unittest.main()
