"""A tiny Hugging Face hub on 127.0.0.1 for tests: just the routes huggingface_hub 2.4 uses here.

- HEAD/GET /{datasets/}{repo}/resolve/{rev}/{path}: X-Repo-Commit, ETag, X-Linked-Etag and
  X-Linked-Size for LFS files, Content-Length, Range (206 + Content-Range) for resumes.
- POST /api/{type}s/{repo}/paths-info/{rev} and GET /api/{type}s/{repo}/tree/{rev}[/{path}].
- GET /files/{name}: plain HTTP files (no hub headers), for URLs such as the I3D model.
Faults for tests: `drop_once(path, after)` cuts the connection after `after` bytes on the
first GET; `Repo.advertised[path] = {"sha256"|"size": ...}` makes the hub report a
size or SHA-256 that the content does not have.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

LFS_SUFFIXES = (".zip", ".safetensors", ".pt", ".bin")


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Repo:
    def __init__(self, repo_type: str, repo_id: str, files: dict[str, bytes], commit: str | None = None):
        self.type, self.id, self.files = repo_type, repo_id, dict(files)
        self.commit = commit or hashlib.sha1(repr(sorted(files)).encode() + repo_id.encode()).hexdigest()
        self.advertised: dict[str, dict] = {}

    def is_lfs(self, path: str) -> bool:  # the hub stores big binaries (and split zip pieces) in LFS
        return path.endswith(LFS_SUFFIXES) or re.search(r"_part\d+_part\w+$", path) is not None

    def entry(self, path: str) -> dict:
        data = self.files[path]
        over = self.advertised.get(path, {})
        size = over.get("size", len(data))
        out = {"type": "file", "path": path, "size": size, "oid": git_sha1(data)}
        if self.is_lfs(path):
            out["lfs"] = {"oid": over.get("sha256", hashlib.sha256(data).hexdigest()), "size": size, "pointerSize": 134}
        return out

    def folders(self) -> set[str]:
        return {"/".join(p.split("/")[:i]) for p in self.files for i in range(1, p.count("/") + 1)}


class HubServer:
    """Use as a context manager; `endpoint` is the base URL to give huggingface_hub."""

    def __init__(self):
        self.repos: dict[tuple[str, str], Repo] = {}
        self.urls: dict[str, bytes] = {}
        self.drops: dict[str, int] = {}
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self._lock = threading.Lock()

    def add_repo(self, repo_type: str, repo_id: str, files: dict[str, bytes], commit: str | None = None) -> Repo:
        repo = Repo(repo_type, repo_id, files, commit)
        self.repos[(repo_type, repo_id)] = repo
        return repo

    def add_url(self, name: str, data: bytes) -> str:
        self.urls[name] = data
        return f"{self.endpoint}/files/{name}"

    def drop_once(self, path_suffix: str, after: int) -> None:
        self.drops[path_suffix] = after

    def __enter__(self) -> HubServer:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self.httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def take_drop(self, path: str) -> int | None:
        with self._lock:
            for suffix, after in list(self.drops.items()):
                if path.endswith(suffix):
                    del self.drops[suffix]
                    return after
        return None

    def find(self, repo_type: str, repo_id: str, rev: str) -> Repo | None:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or rev not in (repo.commit, "main"):
            return None
        return repo


RESOLVE = re.compile(r"^/(?:(datasets|models)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
API = re.compile(r"^/api/(datasets|models)/([^/]+/[^/]+)/(paths-info|tree)/([^/]+)(?:/(.*))?$")


def _make_handler(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output clean
            pass

        def _send(self, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, str(v))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, obj, code: int = 200):
            self._send(code, json.dumps(obj).encode(), {"Content-Type": "application/json"})

        def _error(self, code: int, error_code: str, message: str, commit: str | None = None):
            headers = {"X-Error-Code": error_code, "X-Error-Message": message, "Content-Type": "application/json"}
            if commit:
                headers["X-Repo-Commit"] = commit
            self._send(code, json.dumps({"error": message}).encode(), headers, head=self.command == "HEAD")

        def do_HEAD(self):
            self._route()

        def do_GET(self):
            self._route()

        def do_POST(self):
            self._route()

        def _route(self):
            url = urlparse(self.path)
            path = unquote(url.path)
            hub.log.append((self.command, path, self.headers.get("Range")))
            if path.startswith("/files/") and path[7:] in hub.urls:
                return self._content(hub.urls[path[7:]], {}, path)
            if m := RESOLVE.match(url.path):
                kind, repo_id, rev, file = m.group(1) or "models", m.group(2), unquote(m.group(3)), unquote(m.group(4))
                return self._resolve(kind[:-1], repo_id, rev, file, path)
            if m := API.match(url.path):
                return self._api(m.group(1)[:-1], m.group(2), m.group(3), unquote(m.group(4)),
                                 unquote(m.group(5) or ""), url.query)
            self._error(404, "RepoNotFound", f"no route {path}")

        def _resolve(self, repo_type, repo_id, rev, file, path):
            repo = hub.find(repo_type, repo_id, rev)
            if repo is None:
                return self._error(404, "RevisionNotFound", f"{repo_type} {repo_id}@{rev} not found")
            if file not in repo.files:
                return self._error(404, "EntryNotFound", f"{file} not found", repo.commit)
            data, entry = repo.files[file], repo.entry(file)
            headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{entry["oid"]}"'}
            if "lfs" in entry:
                headers.update({"X-Linked-Etag": f'"{entry["lfs"]["oid"]}"', "X-Linked-Size": entry["size"]})
            self._content(data, headers, path)

        def _content(self, data: bytes, headers: dict, path: str):
            headers = {**headers, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
            start, code = 0, 200
            rng = self.headers.get("Range")
            if rng and (m := re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())):
                start = int(m.group(1))
                end = int(m.group(2)) if m.group(2) else len(data) - 1
                if start >= len(data):
                    return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"}, head=self.command == "HEAD")
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                data, code = data[start:end + 1], 206
            if self.command == "HEAD":
                return self._send(code, data, headers, head=True)
            after = hub.take_drop(path)
            if after is None:
                return self._send(code, data, headers)
            # Send the full Content-Length but only `after` bytes, then cut the connection.
            self.send_response(code)
            for k, v in headers.items():
                self.send_header(k, str(v))
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:after])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

        def _api(self, repo_type, repo_id, what, rev, sub, query):
            repo = hub.find(repo_type, repo_id, rev)
            if repo is None:
                return self._error(404, "RevisionNotFound", f"{repo_type} {repo_id}@{rev} not found")
            if what == "paths-info":
                length = int(self.headers.get("Content-Length", 0))
                form = parse_qs(self.rfile.read(length).decode())
                out = [repo.entry(p) for p in form.get("paths", []) if p in repo.files]
                out += [{"type": "directory", "path": p, "oid": git_sha1(p.encode())}
                        for p in form.get("paths", []) if p in repo.folders()]
                return self._json(out)
            recursive = parse_qs(query).get("recursive", ["false"])[0].lower() == "true"
            prefix = f"{sub}/" if sub else ""

            def inside(p: str) -> bool:
                return p.startswith(prefix) and (recursive or "/" not in p[len(prefix):])

            out = [{"type": "directory", "path": d, "oid": git_sha1(d.encode())} for d in sorted(repo.folders()) if inside(d)]
            out += [repo.entry(p) for p in sorted(repo.files) if inside(p)]
            self._json(out)

    return Handler
