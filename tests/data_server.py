"""A small HTTP server on 127.0.0.1 for the download tests: Range requests, 404s, and injected faults.

http.server's SimpleHTTPRequestHandler ignores Range, so this handler serves files from memory itself and
answers `Range: bytes=N-` with 206 Partial Content. A test can queue faults for a path, each used by one
request: cut the body short after some bytes (an interrupted download), stall before the body (a timeout),
answer 500, or ignore the Range header. Every request is logged with its Range header.

Tests keep apart by serving at paths of their own, so one server can last the whole session.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Fault:
    cut_after: int | None = None  # send only this many body bytes, then close the connection
    stall: float = 0.0  # seconds to wait after the headers, before the body
    status: int | None = None  # answer with this error status instead
    ignore_range: bool = False  # answer 200 with the whole file even to a Range request


@dataclass
class Request:
    path: str
    range: str | None


@dataclass
class ServerState:
    files: dict[str, bytes] = field(default_factory=dict)
    faults: dict[str, list[Fault]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_fault(self, path: str) -> Fault:
        with self.lock:
            queue = self.faults.get(path, [])
            return queue.pop(0) if queue else Fault()


class DataServer:
    """Serve `state.files` at http://127.0.0.1:PORT/PATH (`url(path)`), while in a `with` block."""

    def __init__(self) -> None:
        self.state = ServerState()
        state = self.state

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                range_header = self.headers.get("Range")
                with state.lock:
                    state.requests.append(Request(self.path, range_header))
                body = state.files.get(self.path)
                fault = state.next_fault(self.path)
                if body is None:
                    self.send_error(404)
                    return
                if fault.status is not None:
                    self.send_error(fault.status)
                    return
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
                if match and not fault.ignore_range:
                    start = int(match.group(1))
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                payload = body[start:]
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                try:
                    if fault.stall:
                        time.sleep(fault.stall)
                    if fault.cut_after is not None:
                        self.wfile.write(payload[: fault.cut_after])
                        self.wfile.flush()
                        self.close_connection = True  # the client sees the end of the stream early
                        return
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a stall test)
                    self.close_connection = True

            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> DataServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def serve(self, path: str, content: bytes, *faults: Fault) -> str:
        """Serve `content` at `path` (the next requests meeting `faults` in order); returns the URL."""
        with self.state.lock:
            self.state.files[path] = content
            self.state.faults[path] = list(faults)
        return self.url(path)

    def requests_for(self, path: str) -> list[Request]:
        with self.state.lock:
            return [r for r in self.state.requests if r.path == path]
