"""A small HTTP server that answers the Hugging Face hub's API for the folders
under a root (ROOT/OWNER/NAME is the repo OWNER/NAME), so `fermi pull` and
/api/pull run through the real huggingface_hub client with no network
(HF_ENDPOINT points at it)."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "a" * 40


class FakeHub:
    def __init__(self, root: Path):
        self.root = Path(root)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def answer(self, body: bool):
                parts = unquote(urlparse(self.path).path).strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 4:
                    repo = hub.root / parts[2] / parts[3]
                    if not repo.is_dir():
                        return self.send(404, b'{"error": "Repository not found"}',
                                         {"X-Error-Code": "RepositoryNotFound"})
                    files = sorted(str(f.relative_to(repo)) for f in repo.rglob("*") if f.is_file())
                    if "tree" in parts:
                        data = [{"type": "file", "path": f, "size": (repo / f).stat().st_size,
                                 "oid": hashlib.sha1((repo / f).read_bytes()).hexdigest()} for f in files]
                    else:
                        data = {"id": f"{parts[2]}/{parts[3]}", "sha": COMMIT, "private": False,
                                "siblings": [{"rfilename": f} for f in files]}
                    return self.send(200, json.dumps(data).encode(), {"Content-Type": "application/json"})
                if len(parts) >= 5 and parts[2] == "resolve":
                    f = hub.root / parts[0] / parts[1] / "/".join(parts[4:])
                    if f.is_file():
                        data = f.read_bytes()
                        return self.send(200, data if body else b"", {
                            "X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                            "Content-Length": str(len(data))})
                self.send(404, b"not found", {"X-Error-Code": "EntryNotFound"})

            def send(self, status: int, data: bytes, headers: dict):
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if data:
                    self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
