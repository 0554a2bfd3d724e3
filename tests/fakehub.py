"""A Hugging Face Hub stand-in for the tests: stdlib only, in-process, bound to 127.0.0.1 on a free port.

It speaks the part of the Hub's HTTP API that huggingface_hub's unmodified client uses to create repos, upload a
folder (every file answered as "regular": contents travel base64-encoded in the commit, so no Xet/LFS server is
needed), read repo info and trees, and download files (HEAD + GET ``resolve``). Repos, commits and files live in
memory; commit ids are stable sha1s, and old commits stay downloadable. Auth: bearer tokens map to users; only the
owner writes; private repos are invisible to others (401 anonymous, 404 other users, as the Hub).

``hub.log`` records every request (method, path, user, monotonic time); ``hub.misses`` every request no route
answered, so tests notice when a client upgrade starts calling something new.

Faults: ``hub.inject(method, path_part, kind, ...)`` makes matching requests misbehave, as a real server or network
does: ``status`` answers an HTTP error (5xx, 429), ``drop`` reads part of the request body and closes the connection
without an answer, ``stall`` waits before answering (longer than the client's timeout: a hung server).
"""

import base64
import hashlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple
from urllib.parse import parse_qs, unquote, urlsplit


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Fault:
    method: str
    path_part: str
    kind: str  # "status", "drop" or "stall"
    times: int = 1  # how many matching requests misbehave; -1: all of them
    status: int = 503
    seconds: float = 0.0
    retry_after: Optional[int] = None  # the Retry-After header of a "status" answer
    hits: List[float] = field(default_factory=list)  # monotonic times of the requests it hit

    def matches(self, method: str, path: str) -> bool:
        return method == self.method and self.path_part in path and (self.times < 0 or len(self.hits) < self.times)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # clients that gave up or were killed mid-request
        pass


@dataclass
class Repo:
    owner: str
    name: str
    private: bool
    commits: Dict[str, Dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: content}
    history: List[str] = field(default_factory=list)  # shas, oldest first; the last is "main"

    @property
    def repo_id(self) -> str:
        return f"{self.owner}/{self.name}"

    def files(self, revision: str) -> Optional[Tuple[str, Dict[str, bytes]]]:
        sha = self.history[-1] if revision == "main" else revision
        return (sha, self.commits[sha]) if sha in self.commits else None


class FakeHub:
    def __init__(self, tokens: Dict[str, str]):
        self.tokens = dict(tokens)  # token -> user
        self.repos: Dict[str, Repo] = {}
        self.log: List[Tuple[str, str, Optional[str], float]] = []
        self.misses: List[Tuple[str, str]] = []
        self.faults: List[Fault] = []
        self.generation = 0  # bumped by reset()
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def _dispatch(self, method):
                fault = hub._fault_for(method, self.path)
                if fault is not None and fault.kind != "stall":
                    return hub._misbehave(self, fault)
                if fault is not None:
                    generation = hub.generation
                    time.sleep(fault.seconds)
                    if hub.generation != generation:  # the test that stalled this request is over
                        self.close_connection = True
                        return None
                with hub.lock:
                    try:
                        hub._handle(self, method)
                    except Exception as err:  # a bug in the fake: answer 400 at once (5xx would be retried)
                        hub._send(self, 400, {"error": f"fake hub error: {err!r}"})

            def do_GET(self):
                self._dispatch("GET")

            def do_HEAD(self):
                self._dispatch("HEAD")

            def do_POST(self):
                self._dispatch("POST")

            def do_DELETE(self):
                self._dispatch("DELETE")

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def reset(self):
        with self.lock:
            self.repos.clear()
            self.log.clear()
            self.misses.clear()
            self.faults.clear()
            self.generation += 1

    def inject(self, method: str, path_part: str, kind: str, times: int = 1, status: int = 503,
               seconds: float = 0.0, retry_after: Optional[int] = None) -> Fault:
        """Make the next ``times`` requests ``method`` whose path contains ``path_part`` misbehave (see module doc)."""
        if kind not in ("status", "drop", "stall"):
            raise ValueError(f"unknown fault kind {kind!r}")
        fault = Fault(method, path_part, kind, times, status, seconds, retry_after)
        with self.lock:
            self.faults.append(fault)
        return fault

    def _fault_for(self, method: str, raw_path: str) -> Optional[Fault]:
        path = urlsplit(raw_path).path
        with self.lock:
            for fault in self.faults:
                if fault.matches(method, path):
                    fault.hits.append(time.monotonic())
                    self.log.append((method, path, "fault:" + fault.kind, time.monotonic()))
                    return fault
        return None

    def _misbehave(self, handler, fault: Fault) -> None:
        if fault.kind == "status":
            if handler.command in ("POST", "DELETE"):
                self._read_body(handler)  # an unread body would corrupt the next request on this connection
            extra = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else None
            self._error(handler, fault.status, "ServerError", f"injected HTTP {fault.status}",
                        head=handler.command == "HEAD", extra=extra)
            return
        # "drop": take part of the upload, then vanish without an answer (a proxy or server dying mid-request)
        length = int(handler.headers.get("Content-Length") or 0)
        if length:
            handler.rfile.read(max(1, length // 2))
        elif handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
            handler.rfile.readline()
        handler.close_connection = True
        try:
            handler.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- plumbing ---------------------------------------------------------------------------------------------------

    @staticmethod
    def _read_body(handler) -> bytes:
        if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(handler.rfile.readline().strip(), 16)
                if size == 0:
                    handler.rfile.readline()
                    return b"".join(chunks)
                chunks.append(handler.rfile.read(size))
                handler.rfile.readline()
        return handler.rfile.read(int(handler.headers.get("Content-Length") or 0))

    @staticmethod
    def _send(handler, status, body=None, headers=None, head=False):
        data = body if isinstance(body, bytes) else json.dumps(body if body is not None else {}).encode()
        handler.send_response(status)
        content_type = "application/octet-stream" if isinstance(body, bytes) else "application/json"
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.end_headers()
        if not head:
            handler.wfile.write(data)

    def _error(self, handler, status, code, message, head=False, extra=None):
        headers = {"X-Error-Code": code, "X-Error-Message": message, **(extra or {})}
        self._send(handler, status, {"error": message}, headers, head=head)

    def _user(self, handler) -> Optional[str]:
        auth = handler.headers.get("Authorization", "")
        return self.tokens.get(auth[7:]) if auth.startswith("Bearer ") else None

    def _visible_repo(self, handler, repo_id, user, head=False) -> Optional[Repo]:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and repo.owner != user):
            status = 401 if user is None else 404
            self._error(handler, status, "RepoNotFound", f"Repository {repo_id} not found", head=head)
            return None
        return repo

    def _writable_repo(self, handler, repo_id, user) -> Optional[Repo]:
        if user is None:
            self._error(handler, 401, "Unauthorized", "Invalid credentials in Authorization header")
            return None
        repo = self._visible_repo(handler, repo_id, user)
        if repo is not None and repo.owner != user:
            self._error(handler, 403, "Forbidden", f"You don't have the rights to write to {repo_id}")
            return None
        return repo

    def _commit(self, repo: Repo, files: Dict[str, bytes], title: str) -> str:
        parent = repo.history[-1] if repo.history else ""
        digest = hashlib.sha1(parent.encode() + title.encode() + str(time.time_ns()).encode())
        for path in sorted(files):
            digest.update(path.encode() + git_blob_oid(files[path]).encode())
        sha = digest.hexdigest()
        repo.commits[sha] = dict(files)
        repo.history.append(sha)
        return sha

    # -- routes -----------------------------------------------------------------------------------------------------

    def _handle(self, handler, method):
        parts = urlsplit(handler.path)
        path, query = parts.path, parse_qs(parts.query)
        user = self._user(handler)
        self.log.append((method, path, user, time.monotonic()))
        # Read the body before any answer: an unread body would corrupt the next request on a kept-alive connection.
        raw = self._read_body(handler) if method in ("POST", "DELETE") else b""
        segments = [unquote(s) for s in path.strip("/").split("/")]
        head = method == "HEAD"

        if method == "GET" and path == "/api/whoami-v2":
            if user is None:
                return self._error(handler, 401, "Unauthorized", "Invalid credentials in Authorization header")
            return self._send(handler, 200, {"name": user, "type": "user", "auth": {"type": "access_token"}})
        if method == "POST" and path == "/api/validate-yaml":
            return self._send(handler, 200, {"errors": [], "warnings": []})
        if method == "POST" and path == "/api/repos/create":
            body = json.loads(raw or b"{}")
            if user is None:
                return self._error(handler, 401, "Unauthorized", "Invalid credentials in Authorization header")
            owner = body.get("organization") or user
            if owner != user:
                return self._error(handler, 403, "Forbidden", f"You cannot create repos in {owner}")
            repo_id = f"{owner}/{body['name']}"
            url = f"{self.url}/{repo_id}"
            if repo_id in self.repos:
                return self._send(handler, 409, {"error": "You already created this model repo", "url": url})
            private = body.get("private") is True or body.get("visibility") == "private"
            repo = self.repos[repo_id] = Repo(owner, body["name"], private)
            self._commit(repo, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                         "initial commit")
            return self._send(handler, 200, {"url": url, "name": repo_id})
        if method == "DELETE" and path == "/api/repos/delete":
            body = json.loads(raw or b"{}")
            repo_id = f"{body.get('organization') or user}/{body['name']}"
            if self._writable_repo(handler, repo_id, user):
                del self.repos[repo_id]
                return self._send(handler, 200, {})
            return None

        if segments[:2] == ["api", "models"] and len(segments) >= 4:
            repo_id = "/".join(segments[2:4])
            rest = segments[4:]
            if method == "GET" and (not rest or rest[0] == "revision"):
                repo = self._visible_repo(handler, repo_id, user)
                if repo is None:
                    return None
                revision = rest[1] if rest else "main"
                found = repo.files(revision)
                if found is None:
                    return self._error(handler, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
                sha, files = found
                return self._send(handler, 200, {
                    "id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private, "author": repo.owner,
                    "siblings": [{"rfilename": p, "size": len(d)} for p, d in sorted(files.items())],
                    "lastModified": "2026-01-01T00:00:00.000Z", "createdAt": "2026-01-01T00:00:00.000Z",
                    "tags": [], "downloads": 0, "likes": 0, "disabled": False, "gated": False})
            if method == "GET" and rest and rest[0] == "tree":
                repo = self._visible_repo(handler, repo_id, user)
                if repo is None:
                    return None
                found = repo.files(rest[1])
                if found is None:
                    return self._error(handler, 404, "RevisionNotFound", f"Invalid rev id: {rest[1]}")
                prefix = "/".join(rest[2:])
                recursive = query.get("recursive", ["false"])[0] == "true"
                return self._send(handler, 200, self._tree(found[1], prefix, recursive))
            if method == "POST" and rest and rest[0] == "preupload":
                repo = self._writable_repo(handler, repo_id, user)
                if repo is None:
                    return None
                body = json.loads(raw)
                current = repo.files(rest[1])[1]
                return self._send(handler, 200, {"files": [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                     "oid": git_blob_oid(current[f["path"]]) if f["path"] in current else None}
                    for f in body["files"]]})
            if method == "POST" and rest and rest[0] == "commit":
                repo = self._writable_repo(handler, repo_id, user)
                if repo is None:
                    return None
                if rest[1] != "main":
                    return self._error(handler, 404, "RevisionNotFound", f"Invalid rev id: {rest[1]}")
                files = dict(repo.files("main")[1])
                title = "commit"
                for line in raw.decode().splitlines():
                    if not line.strip():
                        continue
                    item = json.loads(line)
                    key, value = item["key"], item["value"]
                    if key == "header":
                        title = value.get("summary", title)
                    elif key == "file":
                        files[value["path"]] = base64.b64decode(value["content"])
                    elif key == "deletedFile":
                        files.pop(value["path"], None)
                    elif key == "deletedFolder":
                        files = {p: d for p, d in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
                    else:
                        return self._error(handler, 400, "BadRequest", f"unsupported commit operation {key}")
                sha = self._commit(repo, files, title)
                return self._send(handler, 200, {"commitOid": sha, "commitUrl": f"{self.url}/{repo_id}/commit/{sha}",
                                                 "commitMessage": title})

        if method in ("GET", "HEAD") and len(segments) >= 5 and segments[2] == "resolve":
            repo_id, revision, file_path = "/".join(segments[:2]), segments[3], "/".join(segments[4:])
            repo = self._visible_repo(handler, repo_id, user, head=head)
            if repo is None:
                return None
            found = repo.files(revision)
            if found is None:
                return self._error(handler, 404, "RevisionNotFound", f"Invalid rev id: {revision}", head=head)
            sha, files = found
            if file_path not in files:
                return self._error(handler, 404, "EntryNotFound", f"{file_path} does not exist", head=head,
                                   extra={"X-Repo-Commit": sha})
            data = files[file_path]
            return self._send(handler, 200, data, {"X-Repo-Commit": sha, "ETag": f'"{git_blob_oid(data)}"'}, head=head)

        self.misses.append((method, handler.path))
        return self._error(handler, 404, "NotFound", f"fake hub has no route for {method} {path}", head=head)

    @staticmethod
    def _tree(files: Dict[str, bytes], prefix: str, recursive: bool) -> list:
        entries, folders = [], set()
        base = prefix.rstrip("/") + "/" if prefix else ""
        for path, data in sorted(files.items()):
            if not path.startswith(base):
                continue
            rest = path[len(base):]
            if "/" in rest and not recursive:
                folders.add(base + rest.split("/")[0])
                continue
            if recursive:
                parts = rest.split("/")[:-1]
                folders.update(base + "/".join(parts[: i + 1]) for i in range(len(parts)))
            entries.append({"type": "file", "path": path, "oid": git_blob_oid(data), "size": len(data)})
        return [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0}
                for f in sorted(folders)] + entries
