"""A real HTTP artifact server with misbehaviours on demand (the tests' S3 stand-in
for what moto cannot do: cut connections, lie about sizes, trickle bytes).

It serves one file over real sockets with the stdlib's threading HTTP server;
`mode` picks the behaviour, `requests` records each request's Range header.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal

Mode = Literal["normal", "cut_once", "oversize", "oversize_undeclared", "slow", "expired"]


class ArtifactServer:
    def __init__(self, data: bytes, mode: Mode = "normal") -> None:
        self.data = data
        self.mode: Mode = mode
        self.requests: list[str | None] = []
        self._cut_done = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # close-delimited bodies: a cut is a short read

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                server.handle(self)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/model.tflite?sig=x"

    def __enter__(self) -> ArtifactServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        rng = h.headers.get("Range")
        self.requests.append(rng)
        data = self.data
        if self.mode == "expired":
            h.send_response(403)
            h.end_headers()
            return
        start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
        body = data[start:]
        if self.mode == "oversize":
            body = body + b"\0" * 4096
        h.send_response(206 if rng else 200)
        if rng:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        if self.mode != "oversize_undeclared":
            h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        try:
            if self.mode == "cut_once" and not self._cut_done:
                self._cut_done = True
                h.wfile.write(body[: len(data) // 2])
                h.wfile.flush()
                return  # close the connection half way
            if self.mode == "oversize_undeclared":
                h.wfile.write(body)
                for _ in range(64):
                    h.wfile.write(b"\0" * 65536)
                return
            if self.mode == "slow":
                for i in range(len(body)):
                    h.wfile.write(body[i : i + 1])
                    h.wfile.flush()
                    time.sleep(1.0)
                return
            h.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass
