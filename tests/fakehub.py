"""A Hugging Face Hub stand-in for the tests: stdlib only, in-process, bound to 127.0.0.1 on a free port.

It speaks the part of the Hub's HTTP API that the unmodified huggingface_hub and datasets clients use for model and
dataset repos: create repos, upload a folder or push a dataset, read repo info, trees and paths-info, and download
files (HEAD + GET ``resolve``, ``/{repo}/resolve/...`` for models, ``/datasets/{repo}/resolve/...`` for datasets) with
HTTP Range requests, as streaming reads parquet. Uploads: a file the repo's .gitattributes marks LFS (a dataset's
parquet, arrow and image files, as on the Hub) goes through the Git LFS batch API and a PUT to this server; every
other file (all of a model's) is "regular", base64 in the commit. There is no Xet server: a process that uploads data
files must run huggingface_hub with Xet off (HF_HUB_DISABLE_XET; the ``dataset_hub`` fixture). Repos, commits and
files live in memory; commit ids are stable sha1s, and old commits stay downloadable. Auth: bearer tokens map to
users; only the owner writes main; private repos are invisible to others (401 anonymous, 404 other users, as the
Hub). Pull requests, as huggingface_hub opens them (``create_pr``: a discussion, then commits to its ``refs/pr/N``,
or one commit with ``?create_pr=1``), are open to anyone logged in who sees the repo, and leave main as it was.

``hub.log`` records every request (method, path, user, monotonic time); ``hub.misses`` every request no route
answered, so tests notice when a client upgrade starts calling something new. ``hub.reads`` records every GET of a
``resolve`` URL (file, byte range, bytes actually sent, user, client) and ``hub.bytes_read()`` sums them per file.

Telling client processes apart: each read carries the peer's process id and its ``RANK`` environment variable, found
through /proc from the TCP connection (Linux; None elsewhere), and the User-Agent, to which huggingface_hub appends
``origin/<value>`` when the client process was started with ``HF_HUB_USER_AGENT_ORIGIN=<value>``. The processes of one
``accelerate launch`` share their environment, so one origin: pid and RANK tell them apart.

Faults: ``hub.inject(method, path_part, kind, ...)`` makes matching requests misbehave, as a real server or network
does: ``status`` answers an HTTP error (5xx, 429), ``drop`` reads part of the request body and closes the connection
without an answer, ``stall`` waits before answering (longer than the client's timeout: a hung server), ``late``
waits as a stall does, then does what the request asks even though its client gave up (a server that commits after
the client's timeout; its ``done`` is set then), ``cut`` (GET of a resolve URL only) sends the headers and the body
up to file offset ``cut_at`` (or half of it), waits ``seconds``, then closes the connection: a connection dropped, or
a server stalled, in the middle of a shard. A cut with ``cut_at`` hits only a read whose range holds that offset.
"""

import base64
import fnmatch
import hashlib
import json
import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, List, Optional, Set, Tuple
from urllib.parse import parse_qs, unquote, urlsplit

FAULT_KINDS = ("status", "drop", "stall", "late", "cut")
REPO_TYPES = {"models": "model", "datasets": "dataset"}  # the API's URL segment -> huggingface_hub's repo_type
# The .gitattributes a new repo starts with. The Hub marks model weights LFS too; this server keeps every model file
# regular (base64 in the commit), so that model uploads need no LFS round trip, and stores data files as the Hub does.
INITIAL_GITATTRIBUTES = {
    "model": b"# the fake hub stores model files as regular files\n",
    "dataset": b"".join(b"*.%s filter=lfs diff=lfs merge=lfs -text\n" % ext
                        for ext in (b"parquet", b"arrow", b"png", b"jpg", b"jpeg", b"webp")),
}
_CHUNK = 64 * 1024  # bytes per socket write of a download: a cut or a departed client stops between two chunks


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Fault:
    method: str
    path_part: str
    kind: str  # one of FAULT_KINDS
    times: int = 1  # how many matching requests misbehave; -1: all of them
    status: int = 503
    seconds: float = 0.0
    retry_after: Optional[int] = None  # the Retry-After header of a "status" answer
    cut_at: Optional[int] = None  # "cut": the file offset where the body stops (None: half-way through the answer)
    hits: List[float] = field(default_factory=list)  # monotonic times of the requests it hit
    released: threading.Event = field(default_factory=threading.Event)  # set: a "stall" answers at once
    done: threading.Event = field(default_factory=threading.Event)  # set: a "late" request has been done
    answered: List[int] = field(default_factory=list)  # the statuses its held requests were answered with

    def release(self) -> None:
        """A "stall" or "late": the requests it holds (and those it would hold) answer now."""
        self.released.set()

    def matches(self, method: str, path: str) -> bool:
        return method == self.method and self.path_part in path and (self.times < 0 or len(self.hits) < self.times)

    def cuts(self, method: str, path: str, start: int, end: int) -> bool:
        """A "cut" hits a resolve GET whose range holds ``cut_at``: other reads of the file pass untouched."""
        return self.kind == "cut" and self.matches(method, path) and (self.cut_at is None or start <= self.cut_at < end)


@dataclass
class Read:
    """One GET of a resolve URL. Bytes [start, end) of the file were promised; ``sent`` of them went out (fewer when
    the connection was cut or the client went away)."""
    repo_id: str
    path: str
    start: int
    end: int
    user: Optional[str]
    address: str  # the client's "host:port"
    user_agent: str
    pid: Optional[int]  # the client's process (Linux)
    rank: Optional[str]  # that process's RANK environment variable (accelerate/torchrun set it per process)
    time: float
    repo_type: str = "model"
    status: int = 200  # 206: a Range request
    sent: int = 0


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # socketserver's 5 drops a burst of connections (2 processes opening their shards)

    def handle_error(self, request, client_address):  # clients that gave up or were killed mid-request
        pass


@dataclass
class Repo:
    owner: str
    name: str
    private: bool
    repo_type: str = "model"
    commits: Dict[str, Dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: content}
    history: List[str] = field(default_factory=list)  # shas, oldest first; the last is "main"
    titles: Dict[str, str] = field(default_factory=dict)  # sha -> the commit's title (its summary)
    # a gated repo: its info and listing are public, its files only for the owner and the users it granted access
    gated: bool = False
    granted: Set[str] = field(default_factory=set)
    # pull requests, in order (revision "refs/pr/{num}"): {"num", "author", "title", "sha" (the commit its ref is
    # at)}; main is untouched
    pull_requests: List[dict] = field(default_factory=list)

    def pull_request(self, revision: str) -> Optional[dict]:
        number = revision[len("refs/pr/"):] if revision.startswith("refs/pr/") else ""
        return self.pull_requests[int(number) - 1] if number.isdigit() and 0 < int(number) <= len(
            self.pull_requests) else None

    @property
    def repo_id(self) -> str:
        return f"{self.owner}/{self.name}"

    def files(self, revision: str) -> Optional[Tuple[str, Dict[str, bytes]]]:
        pull_request = self.pull_request(revision)
        if pull_request is not None:
            revision = pull_request["sha"]
        sha = self.history[-1] if revision == "main" else revision
        return (sha, self.commits[sha]) if sha in self.commits else None


@dataclass
class _Download:
    """A resolve GET's body, written after the hub's lock is released (big files must not block other clients)."""
    body: memoryview
    read: Read
    cut: Optional[Fault]


def _peer_process(peer: Tuple[str, int], server_port: int) -> Tuple[Optional[int], Optional[str]]:
    """(pid, RANK) of the local process that owns the client end of a TCP connection to this server, from /proc."""
    try:
        inode = None
        with open("/proc/net/tcp") as table:
            for line in table.readlines()[1:]:
                fields = line.split()
                local_port, remote_port = int(fields[1].split(":")[1], 16), int(fields[2].split(":")[1], 16)
                if local_port == peer[1] and remote_port == server_port:
                    inode = fields[9]
                    break
        if inode is None:
            return None, None
        target = f"socket:[{inode}]"
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                descriptors = os.listdir(f"/proc/{pid}/fd")
            except OSError:  # another user's process, or one that just ended
                continue
            if any(_link(f"/proc/{pid}/fd/{fd}") == target for fd in descriptors):
                with open(f"/proc/{pid}/environ", "rb") as env:
                    variables = dict(v.split(b"=", 1) for v in env.read().split(b"\0") if b"=" in v)
                rank = variables.get(b"RANK")
                return int(pid), rank.decode() if rank is not None else None
    except OSError:  # no /proc
        pass
    return None, None


def _link(path: str) -> Optional[str]:
    try:
        return os.readlink(path)
    except OSError:  # a descriptor closed while we looked
        return None


def _is_lfs(files: Dict[str, bytes], path: str) -> bool:
    """Whether the repo's .gitattributes stores ``path`` in LFS (a pattern without a slash matches the file name)."""
    for line in files.get(".gitattributes", b"").decode().splitlines():
        pattern, *attributes = line.split() or [""]
        if "filter=lfs" in attributes and fnmatch.fnmatch(path if "/" in pattern else path.rsplit("/", 1)[-1], pattern):
            return True
    return False


def _peer_hung_up(connection: socket.socket) -> bool:
    try:
        return connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:  # open, nothing to read
        return False
    except OSError:  # reset
        return True


def _byte_range(header: Optional[str], size: int) -> Optional[Tuple[int, int]]:
    """[start, end) of ``Range: bytes=a-b`` / ``a-`` / ``-n`` clipped to the file; (0, size) without one; None when
    the range starts past the end (416). A form we do not model (several ranges) raises ValueError."""
    if not header:
        return 0, size
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        raise ValueError(f"unsupported Range {header!r}")
    first, _, last = spec.strip().partition("-")
    if not first:  # the last n bytes
        return (max(0, size - int(last)), size) if int(last) else None
    start = int(first)
    if start >= size:
        return None
    return start, min(size, int(last) + 1) if last else size


class FakeHub:
    def __init__(self, tokens: Dict[str, str]):
        self.tokens = dict(tokens)  # token -> user
        self.repos: Dict[str, Repo] = {}  # model repos by id
        self.datasets: Dict[str, Repo] = {}  # dataset repos by id (the Hub keeps a namespace per repo type)
        self.log: List[Tuple[str, str, Optional[str], float]] = []
        self.reads: List[Read] = []
        self.misses: List[Tuple[str, str]] = []
        self.faults: List[Fault] = []
        self.lfs_objects: Dict[str, bytes] = {}  # sha256 -> content, uploaded through the LFS batch API
        self.generation = 0  # bumped by reset()
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            peer_process = None  # (pid, RANK) of this connection's client, looked up at its first download

            def log_message(self, *args):  # keep pytest output clean
                pass

            def _dispatch(self, method):
                self.held = None  # (one handler serves each request of its connection)
                fault = hub._fault_for(method, self.path)
                if fault is not None and fault.kind not in ("stall", "late"):
                    return hub._misbehave(self, fault)
                if fault is not None:  # held
                    generation = hub.generation
                    fault.released.wait(fault.seconds)
                    # The test that held this request is over, or its client gave up on a stall: answering now would
                    # only put bytes nobody reads into the request log. A late one is done all the same.
                    gone = fault.kind == "stall" and _peer_hung_up(self.connection)
                    if hub.generation != generation or gone:
                        self.close_connection = True
                        return None
                    self.held = fault
                if method == "GET" and "/resolve/" in self.path and self.peer_process is None:
                    self.peer_process = _peer_process(self.client_address, hub.server.server_address[1])
                with hub.lock:
                    try:
                        download = hub._handle(self, method)
                    except Exception as err:
                        if fault is not None and fault.kind == "late" and isinstance(err, OSError):
                            self.close_connection = True  # its client has gone: what it asked for is done all the same
                            return None
                        hub._send(self, 400, {"error": f"fake hub error: {err!r}"})  # a bug in the fake: at once
                        return None  # (a 5xx would be retried)
                    finally:
                        if fault is not None and fault.kind == "late":
                            fault.done.set()
                if download is not None:
                    hub._write_download(self, download)
                return None

            def do_GET(self):
                self._dispatch("GET")

            def do_HEAD(self):
                self._dispatch("HEAD")

            def do_POST(self):
                self._dispatch("POST")

            def do_DELETE(self):
                self._dispatch("DELETE")

            def do_PUT(self):
                self._dispatch("PUT")

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
            self.datasets.clear()
            self.log.clear()
            self.reads.clear()
            self.misses.clear()
            self.lfs_objects.clear()
            self.faults.clear()
            self.generation += 1

    def inject(self, method: str, path_part: str, kind: str, times: int = 1, status: int = 503,
               seconds: float = 0.0, retry_after: Optional[int] = None, cut_at: Optional[int] = None) -> Fault:
        """Make the next ``times`` requests ``method`` whose path contains ``path_part`` misbehave (see module doc)."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; one of {FAULT_KINDS}")
        if kind == "cut" and method != "GET":
            raise ValueError("a 'cut' fault cuts a download's body: method must be GET")
        fault = Fault(method, path_part, kind, times, status, seconds, retry_after, cut_at)
        with self.lock:
            self.faults.append(fault)
        return fault

    def bytes_read(self, repo_id: Optional[str] = None,
                   select: Optional[Callable[[Read], bool]] = None) -> Dict[str, Tuple[List[Tuple[int, int]], int]]:
        """Per file path (of ``repo_id``, or of every repo), of the reads ``select`` keeps: the byte ranges
        [start, end) that went out, merged, and the total bytes sent (bytes sent twice count twice)."""
        spans: Dict[str, List[Tuple[int, int]]] = {}
        totals: Dict[str, int] = {}
        for read in list(self.reads):
            if (repo_id is None or read.repo_id == repo_id) and (select is None or select(read)):
                spans.setdefault(read.path, []).append((read.start, read.start + read.sent))
                totals[read.path] = totals.get(read.path, 0) + read.sent
        merged = {}
        for path, ranges in spans.items():
            out: List[Tuple[int, int]] = []
            for start, end in sorted(r for r in ranges if r[1] > r[0]):
                if out and start <= out[-1][1]:
                    out[-1] = (out[-1][0], max(out[-1][1], end))
                else:
                    out.append((start, end))
            merged[path] = (out, totals[path])
        return merged

    def _fault_for(self, method: str, raw_path: str) -> Optional[Fault]:
        path = urlsplit(raw_path).path
        with self.lock:
            return self._hit(method, path, (f for f in self.faults if f.kind != "cut" and f.matches(method, path)))

    def _hit(self, method: str, path: str, candidates) -> Optional[Fault]:
        """The first of ``candidates``, counted as hit and logged (the caller holds the lock)."""
        fault = next(candidates, None)
        if fault is not None:
            fault.hits.append(time.monotonic())
            self.log.append((method, path, "fault:" + fault.kind, time.monotonic()))
        return fault

    def _misbehave(self, handler, fault: Fault) -> None:
        if fault.kind == "status":
            if handler.command in ("POST", "DELETE", "PUT"):
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
        self._hang_up(handler)

    @staticmethod
    def _hang_up(handler) -> None:
        handler.close_connection = True
        try:
            handler.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _write_download(self, handler, download: _Download) -> None:
        body, read, cut = download.body, download.read, download.cut
        limit = len(body)
        if cut is not None:
            limit = len(body) // 2 if cut.cut_at is None else cut.cut_at - read.start
        # Counted before each write: a client can receive the bytes, and a test read the log, before this thread runs
        # again; a chunk the socket refuses is taken back.
        while read.sent < limit:
            chunk = body[read.sent: min(limit, read.sent + _CHUNK)]
            read.sent += len(chunk)
            try:
                handler.wfile.write(chunk)
            except OSError:  # the client went away
                read.sent -= len(chunk)
                handler.close_connection = True
                return
        if cut is not None:
            handler.wfile.flush()
            generation = self.generation
            deadline = time.monotonic() + cut.seconds
            while time.monotonic() < deadline and self.generation == generation:
                time.sleep(0.05)
            self._hang_up(handler)

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
    def _send_head(handler, status, length, content_type, headers=None):
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(length))
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.end_headers()

    def _send(self, handler, status, body=None, headers=None, head=False):
        held = getattr(handler, "held", None)
        if held is not None:
            held.answered.append(status)
        data = body if isinstance(body, bytes) else json.dumps(body if body is not None else {}).encode()
        content_type = "application/octet-stream" if isinstance(body, bytes) else "application/json"
        self._send_head(handler, status, len(data), content_type, headers)
        if not head:
            handler.wfile.write(data)

    def _error(self, handler, status, code, message, head=False, extra=None):
        headers = {"X-Error-Code": code, "X-Error-Message": message, **(extra or {})}
        self._send(handler, status, {"error": message}, headers, head=head)

    def _user(self, handler) -> Optional[str]:
        auth = handler.headers.get("Authorization", "")
        return self.tokens.get(auth[7:]) if auth.startswith("Bearer ") else None

    def _store(self, repo_type: str) -> Dict[str, Repo]:
        return self.datasets if repo_type == "dataset" else self.repos

    def _visible_repo(self, handler, repo_id, user, head=False, repo_type="model") -> Optional[Repo]:
        repo = self._store(repo_type).get(repo_id)
        if repo is None or (repo.private and repo.owner != user):
            status = 401 if user is None else 404
            self._error(handler, status, "RepoNotFound", f"Repository {repo_id} not found", head=head)
            return None
        return repo

    def _writable_repo(self, handler, repo_id, user, repo_type="model", pull_request=False) -> Optional[Repo]:
        """The repo ``user`` may write to: its owner's; with ``pull_request``, anyone's logged in who sees it (a pull
        request leaves main as it was), as on the Hub."""
        if user is None:
            self._error(handler, 401, "Unauthorized", "Invalid credentials in Authorization header")
            return None
        repo = self._visible_repo(handler, repo_id, user, repo_type=repo_type)
        if repo is not None and repo.owner != user and not pull_request:
            self._error(handler, 403, "Forbidden", f"You don't have the rights to write to {repo_id}")
            return None
        return repo

    def _repo_to_commit_to(self, handler, repo_id, user, repo_type, query, revision) -> Optional[Repo]:
        """The repo a commit (or its preupload) to ``revision`` goes to: main, or a pull request (``?create_pr=1``,
        or the ref ``refs/pr/N`` of one)."""
        repo = self._store(repo_type).get(repo_id)
        to_pull_request = query.get("create_pr") == ["1"] or (repo is not None and repo.pull_request(revision))
        return self._writable_repo(handler, repo_id, user, repo_type, pull_request=bool(to_pull_request))

    def _open_pull_request(self, repo: Repo, user: str, title: str) -> dict:
        pull_request = {"num": len(repo.pull_requests) + 1, "author": user, "title": title, "sha": repo.history[-1]}
        repo.pull_requests.append(pull_request)
        return pull_request

    def _commit(self, repo: Repo, files: Dict[str, bytes], title: str, on_main: bool = True) -> str:
        parent = repo.history[-1] if repo.history else ""
        digest = hashlib.sha1(parent.encode() + title.encode() + str(time.time_ns()).encode())
        for path in sorted(files):
            digest.update(path.encode() + git_blob_oid(files[path]).encode())
        sha = digest.hexdigest()
        repo.commits[sha], repo.titles[sha] = dict(files), title
        if on_main:
            repo.history.append(sha)
        return sha

    def _repo_url(self, repo: Repo) -> str:
        return f"{self.url}/{'datasets/' if repo.repo_type == 'dataset' else ''}{repo.repo_id}"

    # -- routes -----------------------------------------------------------------------------------------------------

    def _handle(self, handler, method) -> Optional[_Download]:
        parts = urlsplit(handler.path)
        path, query = parts.path, parse_qs(parts.query)
        user = self._user(handler)
        self.log.append((method, path, user, time.monotonic()))
        # Read the body before any answer: an unread body would corrupt the next request on a kept-alive connection.
        raw = self._read_body(handler) if method in ("POST", "DELETE", "PUT") else b""
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
            repo_type = body.get("type") or "model"
            if repo_type not in REPO_TYPES.values():
                return self._error(handler, 400, "BadRequest", f"fake hub has no {repo_type} repos")
            repo_id = f"{owner}/{body['name']}"
            private = body.get("private") is True or body.get("visibility") == "private"
            repo = Repo(owner, body["name"], private, repo_type)
            if repo_id in self._store(repo_type):
                return self._send(handler, 409, {"error": f"You already created this {repo_type} repo",
                                                 "url": self._repo_url(repo)})
            self._store(repo_type)[repo_id] = repo
            self._commit(repo, {".gitattributes": INITIAL_GITATTRIBUTES[repo_type]}, "initial commit")
            return self._send(handler, 200, {"url": self._repo_url(repo), "name": repo_id})
        if method == "DELETE" and path == "/api/repos/delete":
            body = json.loads(raw or b"{}")
            repo_id = f"{body.get('organization') or user}/{body['name']}"
            repo_type = body.get("type") or "model"
            if self._writable_repo(handler, repo_id, user, repo_type):
                del self._store(repo_type)[repo_id]
                return self._send(handler, 200, {})
            return None

        if segments[0] == "api" and len(segments) >= 4 and segments[1] in REPO_TYPES:
            answered = self._repo_api(handler, method, REPO_TYPES[segments[1]], "/".join(segments[2:4]),
                                      segments[4:], query, raw, user)
            if answered:
                return None

        in_type = segments[1:] if segments[0] == "datasets" else segments  # "[datasets/]{owner}/{name}/..."
        repo_type = "dataset" if segments[0] == "datasets" else "model"
        if method == "POST" and len(in_type) == 6 and in_type[1].endswith(".git") and \
                in_type[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(handler, repo_type, f"{in_type[0]}/{in_type[1][:-4]}", json.loads(raw), user)
        if method == "PUT" and segments[0] == "lfs-upload" and len(segments) == 2:
            if hashlib.sha256(raw).hexdigest() != segments[1]:
                return self._error(handler, 400, "BadRequest", "content does not match its sha256")
            self.lfs_objects[segments[1]] = raw
            return self._send(handler, 200, {})
        resolve = in_type
        if method in ("GET", "HEAD") and len(resolve) >= 5 and resolve[2] == "resolve":
            return self._resolve(repo_type, handler, resolve, user)

        self.misses.append((method, handler.path))
        return self._error(handler, 404, "NotFound", f"fake hub has no route for {method} {path}", head=head)

    def _repo_api(self, handler, method, repo_type, repo_id, rest, query, raw, user) -> bool:
        """``/api/{models,datasets}/{repo_id}/...``; False when no route matches."""
        if method == "GET" and (not rest or rest[0] == "revision"):
            repo = self._visible_repo(handler, repo_id, user, repo_type=repo_type)
            found = repo and self._revision(handler, repo, rest[1] if rest else "main")
            if found:
                sha, files = found
                info = {"id": repo_id, "sha": sha, "private": repo.private, "author": repo.owner,
                        "siblings": [{"rfilename": p, "size": len(d)} for p, d in sorted(files.items())],
                        "lastModified": "2026-01-01T00:00:00.000Z", "createdAt": "2026-01-01T00:00:00.000Z",
                        "tags": [], "downloads": 0, "likes": 0, "disabled": False,
                        "gated": "manual" if repo.gated else False}
                if repo_type == "model":
                    info["modelId"] = repo_id
                self._send(handler, 200, info)
            return True
        if method == "GET" and rest and rest[0] == "tree":
            repo = self._visible_repo(handler, repo_id, user, repo_type=repo_type)
            found = repo and self._revision(handler, repo, rest[1])
            if found:
                prefix = "/".join(rest[2:])
                recursive = query.get("recursive", ["false"])[0].lower() == "true"
                if prefix and not any(p.startswith(prefix.rstrip("/") + "/") for p in found[1]):
                    self._error(handler, 404, "EntryNotFound", f"{prefix} does not exist on {rest[1]}")
                else:
                    self._send(handler, 200, self._tree(found[1], prefix, recursive))
            return True
        if method == "POST" and rest and rest[0] == "paths-info":
            repo = self._visible_repo(handler, repo_id, user, repo_type=repo_type)
            found = repo and self._revision(handler, repo, rest[1])
            if found:
                wanted = [p.strip("/") for p in parse_qs(raw.decode()).get("paths", [])]
                listing = self._tree(found[1], "", recursive=True)
                self._send(handler, 200, [entry for entry in listing if entry["path"] in wanted])
            return True
        if method == "POST" and rest and rest[0] == "preupload":
            repo = self._repo_to_commit_to(handler, repo_id, user, repo_type, query, rest[1])
            found = repo and self._revision(handler, repo, rest[1])
            if found:
                current = found[1]
                answers = []
                for path in (f["path"] for f in json.loads(raw)["files"]):
                    lfs = _is_lfs(current, path)
                    oid = None  # what the client compares with its own, to skip unchanged files
                    if path in current:
                        oid = hashlib.sha256(current[path]).hexdigest() if lfs else git_blob_oid(current[path])
                    answers.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                                    "oid": oid})
                self._send(handler, 200, {"files": answers})
            return True
        if method == "POST" and rest == ["discussions"]:  # create_pull_request (create_discussion: not served)
            repo = self._writable_repo(handler, repo_id, user, repo_type, pull_request=True)
            if repo is not None:
                body = json.loads(raw or b"{}")
                if body.get("pullRequest") is not True:
                    self._error(handler, 400, "BadRequest", "fake hub opens pull requests only, not discussions")
                else:
                    self._send(handler, 200, {"num": self._open_pull_request(repo, user, body.get("title", ""))["num"]})
            return True
        if method == "GET" and len(rest) == 2 and rest[0] == "discussions" and rest[1].isdigit():
            repo = self._visible_repo(handler, repo_id, user, repo_type=repo_type)
            pull_request = repo and repo.pull_request(f"refs/pr/{rest[1]}")
            if repo and pull_request is None:
                self._error(handler, 404, "NotFound", f"no discussion {rest[1]} in {repo_id}")
            elif repo:
                self._send(handler, 200, {
                    "num": int(rest[1]), "title": pull_request["title"], "status": "open", "isPullRequest": True,
                    "author": {"name": pull_request["author"]}, "createdAt": "2026-01-01T00:00:00.000Z",
                    "repo": {"name": repo_id, "type": repo_type}, "events": [], "filesWithConflicts": [],
                    "changes": {"base": "refs/heads/main"}})
            return True
        if method == "POST" and rest and rest[0] == "commit":
            repo = self._repo_to_commit_to(handler, repo_id, user, repo_type, query, rest[1])
            if repo is None:
                return True
            pull_request = repo.pull_request(rest[1])
            if rest[1] != "main" and pull_request is None:
                self._error(handler, 404, "RevisionNotFound", f"Invalid rev id: {rest[1]}")
                return True
            files = dict(repo.files(rest[1])[1])
            title, parent = "commit", None
            for line in raw.decode().splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "header":
                    title, parent = value.get("summary", title), value.get("parentCommit")
                elif key == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "lfsFile":
                    if value["oid"] not in self.lfs_objects:
                        self._error(handler, 400, "BadRequest", f"LFS object {value['oid']} was never uploaded")
                        return True
                    files[value["path"]] = self.lfs_objects[value["oid"]]
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key == "deletedFolder":
                    files = {p: d for p, d in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
                else:
                    self._error(handler, 400, "BadRequest", f"unsupported commit operation {key}")
                    return True
            # as the Hub answers a commit whose parent is not the branch's head
            head = pull_request["sha"] if pull_request else (repo.history or [None])[-1]
            if parent is not None and parent != head:
                self._error(handler, 412, "PreconditionFailed", "A commit has happened since. Please refresh and try "
                            "again.")
                return True
            if query.get("create_pr") == ["1"]:  # (huggingface_hub's commit without Xet opens it so)
                pull_request = self._open_pull_request(repo, user, title)
            sha = self._commit(repo, files, title, on_main=pull_request is None)
            answer = {"commitOid": sha, "commitUrl": f"{self._repo_url(repo)}/commit/{sha}", "commitMessage": title}
            if pull_request is not None:  # its ref moves; main stays as it was
                pull_request["sha"] = sha
                answer["pullRequestUrl"] = f"{self._repo_url(repo)}/discussions/{pull_request['num']}"
            self._send(handler, 200, answer)
            return True
        return False

    def _lfs_batch(self, handler, repo_type, repo_id, body, user) -> None:
        """Git LFS batch API, "basic" transfer: an upload URL on this server for each object it does not hold yet
        (the Hub's is a presigned storage URL, which takes the body without a token)."""
        if self._writable_repo(handler, repo_id, user, repo_type) is None:
            return None
        objects = []
        for item in body["objects"]:
            answer = {"oid": item["oid"], "size": item["size"]}
            if item["oid"] not in self.lfs_objects:
                answer["authenticated"] = True
                answer["actions"] = {"upload": {"href": f"{self.url}/lfs-upload/{item['oid']}"}}
            objects.append(answer)
        return self._send(handler, 200, {"transfer": "basic", "objects": objects})

    def _revision(self, handler, repo: Repo, revision: str, head=False) -> Optional[Tuple[str, Dict[str, bytes]]]:
        found = repo.files(revision)
        if found is None:  # e.g. refs/convert/parquet of a repo the dataset viewer never converted
            self._error(handler, 404, "RevisionNotFound", f"Invalid rev id: {revision}", head=head)
        return found

    def _resolve(self, repo_type, handler, segments, user) -> Optional[_Download]:
        """HEAD/GET ``[datasets/]{repo_id}/resolve/{revision}/{path}``, with Range requests."""
        repo_id, revision, file_path = "/".join(segments[:2]), segments[3], "/".join(segments[4:])
        head = handler.command == "HEAD"
        repo = self._visible_repo(handler, repo_id, user, head=head, repo_type=repo_type)
        if repo and repo.gated and user != repo.owner and user not in repo.granted:  # as the Hub answers
            kind = "dataset" if repo_type == "dataset" else "model"
            return self._error(handler, 401 if user is None else 403, "GatedRepo",
                               f"Access to {kind} {repo_id} is restricted and you are not in the authorized list. "
                               f"Visit https://huggingface.co/{'datasets/' if kind == 'dataset' else ''}{repo_id} to "
                               "ask for access.", head=head)
        found = repo and self._revision(handler, repo, revision, head=head)
        if not found:
            return None
        sha, files = found
        if file_path not in files:
            return self._error(handler, 404, "EntryNotFound", f"{file_path} does not exist", head=head,
                               extra={"X-Repo-Commit": sha})
        data = files[file_path]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_oid(data)}"', "Accept-Ranges": "bytes"}
        ranged = handler.headers.get("Range")
        try:
            span = _byte_range(ranged, len(data))
        except ValueError:  # answered with the whole file, as S3 does, but a test should look at this client
            self.misses.append((handler.command, f"{handler.path} Range: {ranged}"))
            span, ranged = (0, len(data)), None
        if span is None:
            return self._error(handler, 416, "RangeNotSatisfiable", f"{file_path} has {len(data)} bytes", head=head,
                               extra={"Content-Range": f"bytes */{len(data)}", **headers})
        start, end = span
        status = 206 if ranged else 200
        if ranged:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        if head:
            return self._send_head(handler, status, end - start, "application/octet-stream", headers)
        pid, rank = handler.peer_process or (None, None)
        read = Read(repo_id, file_path, start, end, user, "%s:%d" % handler.client_address,
                    handler.headers.get("User-Agent", ""), pid, rank, time.monotonic(), repo_type, status)
        self.reads.append(read)  # before the client can have its answer
        self._send_head(handler, status, end - start, "application/octet-stream", headers)
        path = urlsplit(handler.path).path
        cut = self._hit("GET", path, (f for f in self.faults if f.cuts("GET", path, start, end)))
        return _Download(memoryview(data)[start:end], read, cut)

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


def serve_for_benchmark(tokens: Dict[str, str], home_prefix: str) -> "FakeHub":
    """A local Hub for a benchmark script, and the script's environment pointed at it: to be called before anything
    imports huggingface_hub, datasets or diffusers (they read HF_ENDPOINT and HF_HOME once, when imported). Xet is
    off (this server stores data files by LFS), telemetry and progress bars too, tokens and offline modes unset."""
    hub = FakeHub(tokens)
    os.environ.update(HF_ENDPOINT=hub.url, HF_HOME=tempfile.mkdtemp(prefix=home_prefix), HF_HUB_DISABLE_TELEMETRY="1",
                      HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_XET="1", NO_PROXY="127.0.0.1,localhost",
                      no_proxy="127.0.0.1,localhost")
    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.pop(variable, None)  # (a user's token is not sent to it)
    return hub
