"""A stand-in for the Hugging Face hub on 127.0.0.1, reached through HF_ENDPOINT.

It is a fake because the real hub cannot be reached from here (and CI must never download a model). It speaks
enough of the hub's HTTP API for huggingface_hub and for our downloader, as the hub does:
- GET /api/models/{repo}[/revision/{rev}] (?blobs=true): id, sha, gated, siblings with size and lfs.sha256;
  401 with X-Error-Code: RepoNotFound for a repo it does not have;
- GET and HEAD /{repo}/resolve/{rev}/{path}: the bytes, with Range (206), ETag, X-Repo-Commit; 401 with
  X-Error-Code: GatedRepo for a gated repo, 404 with EntryNotFound for a missing file.
Every request is logged, so a test can say exactly which files were fetched, and how (whole or a Range).
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_SUFFIXES = (".safetensors", ".bin", ".onnx", ".pth", ".pt", ".ckpt")


def repo_from_folder(folder: Path) -> dict[str, bytes]:
    """{path in the repo: bytes} for every file under `folder`."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class FakeHub:
    def __init__(self, repos: dict[str, dict[str, bytes]], gated: set[str] = frozenset()) -> None:
        self.repos = repos
        self.gated = set(gated)
        self.slow: dict[str, float] = {}  # file name -> seconds to wait per 64 KB sent (a slow link)
        self.log: list[dict] = []  # {"method", "path", "range", "status", "bytes"}
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub._serve(self, head=True)

            def do_GET(self):
                hub._serve(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- what the tests read ------------------------------------------------------------------------------
    def fetched(self, repo: str) -> list[str]:
        """The files of `repo` whose bytes were sent (GET, whole or partly), in order, without repeats."""
        out = []
        for e in self.log:
            m = re.match(rf"^/{re.escape(repo)}/resolve/[^/]+/(.+)$", e["path"])
            if m and e["method"] == "GET" and e["status"] in (200, 206) and m.group(1) not in out:
                out.append(m.group(1))
        return out

    def requests_for(self, repo: str, name: str) -> list[dict]:
        return [e for e in self.log if e["path"].endswith(f"/{name}") and e["path"].startswith(f"/{repo}/resolve/")]

    # -- the server -----------------------------------------------------------------------------------------
    def _record(self, **entry) -> None:
        with self._lock:
            self.log.append(entry)

    def _send(self, h, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False,
              pause: float = 0.0) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, str(v))
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head and body:
            try:
                # In pieces, so that a client that stops reading (a Stop) really gets only part of a file.
                for i in range(0, len(body), 1 << 16):
                    h.wfile.write(body[i:i + (1 << 16)])
                    if pause:
                        time.sleep(pause)
            except (BrokenPipeError, ConnectionResetError):
                pass

    def _error(self, h, status: int, code: str, message: str, head: bool) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(h, status, body, {"Content-Type": "application/json", "X-Error-Code": code,
                                     "X-Error-Message": message}, head)

    def _serve(self, h, head: bool) -> None:
        path = unquote(urlparse(h.path).path)
        rng = h.headers.get("Range")
        api = re.match(r"^/api/models/([^/]+/[^/]+?)(?:/revision/([^/]+))?/?$", path)
        res = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        status, sent = 404, 0
        if api:
            repo = api.group(1)
            if repo not in self.repos:
                status = 401
                self._error(h, 401, "RepoNotFound", "Repository not found", head)
            else:
                status = 200
                body = json.dumps(self._info(repo)).encode()
                self._send(h, 200, body, {"Content-Type": "application/json"}, head)
        elif res:
            repo, _rev, name = res.groups()
            files = self.repos.get(repo)
            if files is None:
                status = 401
                self._error(h, 401, "RepoNotFound", "Repository not found", head)
            elif repo in self.gated and not h.headers.get("Authorization"):
                status = 401
                self._error(h, 401, "GatedRepo", "Access to this model is restricted: you must be authenticated.",
                            head)
            elif name not in files:
                status = 404
                self._error(h, 404, "EntryNotFound", "Entry not found", head)
            else:
                data = files[name]
                headers = {"ETag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Repo-Commit": COMMIT,
                           "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
                m = re.match(r"bytes=(\d+)-(\d*)$", rng or "")
                if m:
                    start = int(m.group(1))
                    end = int(m.group(2)) if m.group(2) else len(data) - 1
                    if start >= len(data):
                        status = 416
                        self._send(h, 416, b"", {"Content-Range": f"bytes */{len(data)}"}, head)
                    else:
                        status, part = 206, data[start:end + 1]
                        headers["Content-Range"] = f"bytes {start}-{start + len(part) - 1}/{len(data)}"
                        self._send(h, 206, part, headers, head, self.slow.get(name, 0.0))
                        sent = len(part)
                else:
                    status = 200
                    self._send(h, 200, data, headers, head, self.slow.get(name, 0.0))
                    sent = len(data)
        else:
            self._error(h, 404, "", "Not found", head)
        self._record(method="HEAD" if head else "GET", path=path, range=rng, status=status,
                     bytes=0 if head else sent)

    def _info(self, repo: str) -> dict:
        siblings = []
        for name, data in sorted(self.repos[repo].items()):
            s = {"rfilename": name, "size": len(data), "blobId": hashlib.sha1(data).hexdigest()}
            if name.endswith(LFS_SUFFIXES):
                s["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            siblings.append(s)
        return {"id": repo, "modelId": repo, "sha": COMMIT, "private": False,
                "gated": "manual" if repo in self.gated else False, "disabled": False, "siblings": siblings,
                "tags": ["diffusers"], "library_name": "diffusers"}
