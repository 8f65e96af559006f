"""The HTTP judge's transport against hostile servers on 127.0.0.1 (issue 12, item 3): a redirect to
another origin is not followed (the API key stays home), a huge reply is cut off at a size cap, and a
server dripping bytes cannot hold a request past its deadline."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from equilibrate_pl.eval.judges import HTTPJudge

ANSWER = json.dumps({"choices": [{"message": {"role": "assistant", "content": '{"verdict": "safe", "score": 0.9}'}}]}).encode()


class Server:
    """A loopback HTTP server whose POST handler is ``handle(handler)``; records every request."""

    def __init__(self, handle: Callable[[BaseHTTPRequestHandler], None], protocol: str = "HTTP/1.1") -> None:
        self.seen: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = protocol

            def log_message(self, *args):
                pass

            def _record(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                server.seen.append({"method": self.command, "path": self.path, "auth": self.headers.get("Authorization"),
                                    "body": self.rfile.read(length) if length else b""})

            def do_POST(self):  # noqa: N802
                self._record()
                try:
                    handle(self)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up, as it should
                    pass

            def do_GET(self):  # noqa: N802 - a redirected POST may arrive as a GET
                self._record()
                self.send_response(200)
                self.send_header("Content-Length", str(len(ANSWER)))
                self.end_headers()
                self.wfile.write(ANSWER)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _ok(h: BaseHTTPRequestHandler) -> None:
    h.send_response(200)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(ANSWER)))
    h.end_headers()
    h.wfile.write(ANSWER)


def test_a_well_behaved_server_still_answers() -> None:
    with Server(_ok) as s:
        judge = HTTPJudge(s.url, "m", retries=0, timeout=5)
        assert judge.judge(["q"], ["a"])[0].label == "safe"


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_to_another_origin_is_not_followed_and_the_key_stays(status: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EQ_TEST_KEY", "sk-secret")
    with Server(_ok) as other:

        def redirect(h: BaseHTTPRequestHandler) -> None:
            h.send_response(status)
            h.send_header("Location", other.url + "/v1/chat/completions")
            h.send_header("Content-Length", "0")
            h.end_headers()

        with Server(redirect) as first:
            judge = HTTPJudge(first.url, "m", api_key_env="EQ_TEST_KEY", retries=0, timeout=5)
            with pytest.raises(OSError, match=f"redirect \\({status}\\) to {other.url}.* not followed"):
                judge._post([{"role": "user", "content": "x"}])
            verdict = judge.judge(["q"], ["Sure, here is how."])[0]
    assert first.seen and first.seen[0]["auth"] == "Bearer sk-secret"
    assert other.seen == []  # nothing, let alone the key, went to the other origin
    assert verdict.label.startswith("fallback:")


def test_a_huge_reply_is_cut_off_at_the_size_cap() -> None:
    sent = {"bytes": 0}

    def huge(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(400 * 2**20))
        h.end_headers()
        chunk = b" " * 2**16
        for _ in range(400 * 16):
            h.wfile.write(chunk)
            sent["bytes"] += len(chunk)

    with Server(huge) as s:
        judge = HTTPJudge(s.url, "m", retries=0, timeout=20, max_response_bytes=2**20)
        start = time.monotonic()
        with pytest.raises(OSError, match="larger than max_response_bytes=1048576"):
            judge._post([{"role": "user", "content": "x"}])
        assert time.monotonic() - start < 5


def test_a_huge_chunked_reply_is_cut_off_too() -> None:
    def chunked(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        chunk = b" " * 2**16
        for _ in range(200):
            h.wfile.write(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        h.wfile.write(b"0\r\n\r\n")

    with Server(chunked) as s:
        judge = HTTPJudge(s.url, "m", retries=0, timeout=20, max_response_bytes=2**20)
        with pytest.raises(OSError, match="larger than max_response_bytes"):
            judge._post([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("protocol", ["HTTP/1.0", "HTTP/1.1"])  # 1.0: the reply, not the connection, owns the socket
@pytest.mark.parametrize("where", ["body", "headers"])
def test_a_dripping_server_cannot_hold_a_request_past_its_deadline(where: str, protocol: str) -> None:
    def drip(h: BaseHTTPRequestHandler) -> None:
        if where == "headers":  # the status line itself, one byte at a time
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Slow: " + b"a" * 40:
                h.wfile.write(bytes([byte]))
                h.wfile.flush()
                time.sleep(0.3)
            return
        h.send_response(200)
        h.send_header("Content-Length", str(len(ANSWER)))
        h.end_headers()
        for byte in ANSWER:
            h.wfile.write(bytes([byte]))
            h.wfile.flush()
            time.sleep(0.3)

    with Server(drip, protocol) as s:
        judge = HTTPJudge(s.url, "m", retries=0, timeout=1.0)
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="no complete reply within 1"):
            judge._post([{"role": "user", "content": "x"}])
        assert time.monotonic() - start < 2.5
        start = time.monotonic()
        verdict = judge.judge(["q"], ["Sure, here is how."])[0]
        assert time.monotonic() - start < 2.5 and verdict.label.startswith("fallback:")
