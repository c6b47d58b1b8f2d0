"""A loopback server speaking enough of the Hugging Face Hub HTTP API for the real client.

Repos live in memory with a real commit history: every commit gets a sha, branches map to
shas, and every read endpoint accepts a branch or a sha as revision. Uploads go through the
same paths as on the Hub (preupload, LFS batch + PUT, ndjson commit). Tests can inject
faults (a 500, or a connection dropped halfway through a body) and read the request log.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha(content: bytes) -> str:
    """The git object id of a blob, as the Hub reports for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class StoredFile:
    content: bytes
    lfs: bool

    @property
    def etag(self) -> str:
        return hashlib.sha256(self.content).hexdigest() if self.lfs else git_blob_sha(self.content)


@dataclass
class Repo:
    commits: dict[str, dict[str, StoredFile]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    history: list[str] = field(default_factory=list)  # shas, oldest first

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


@dataclass
class Fault:
    """Make requests whose method matches and whose path contains ``path_part`` fail.

    ``kind`` is ``"500"`` (an internal server error), ``"404"`` (the entry is missing),
    ``"drop"`` (send headers and half the body, then close the connection) or
    ``"lose-lfs"`` (a commit succeeds without its LFS files, as a Hub losing the weights
    would). ``times`` counts down; ``None`` means always.
    """

    method: str
    path_part: str
    kind: str
    times: int | None = None


class HubState:
    """Everything the server knows: repos, uploaded LFS objects, faults and the request log."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str]] = []
        self._counter = 0

    def new_sha(self, seed: str) -> str:
        self._counter += 1
        return hashlib.sha1(f"{seed}:{self._counter}".encode()).hexdigest()

    def commit(self, repo: Repo, branch: str, changes: dict[str, StoredFile | None]) -> str:
        parent = repo.branches.get(branch)
        files = dict(repo.commits[parent]) if parent else {}
        for path, stored in changes.items():
            if stored is None:
                files = {
                    p: f for p, f in files.items() if p != path and not p.startswith(path + "/")
                }
            else:
                files[path] = stored
        sha = self.new_sha(f"{parent}{sorted(changes)}")
        repo.commits[sha] = files
        repo.branches[branch] = sha
        repo.history.append(sha)
        return sha

    def take_fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.method == method and fault.path_part in path and fault.times != 0:
                    if fault.times is not None:
                        fault.times -= 1
                    return fault
        return None

    def downloads(self) -> list[str]:
        """Paths (``org/name/resolve/rev/file``) of every file GET so far."""
        return [p for m, p in self.requests if m == "GET" and "/resolve/" in p]


class Handler(BaseHTTPRequestHandler):
    """One request; routes on the path, in the Hub's URL scheme."""

    protocol_version = "HTTP/1.1"
    timeout = 10  # an idle keep-alive connection closes after this many seconds
    server: HubServer

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
        pass  # quiet: tests read state.requests instead

    # ------------------------------------------------------------------ plumbing
    @property
    def state(self) -> HubState:
        return self.server.state

    def _body(self) -> bytes:
        # Read the whole body even when it is ignored: the client keeps the connection alive.
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, value: object, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(value).encode()
        self._send(status, body, {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, code: str | None, message: str) -> None:
        self._json(status, {"error": message}, {"X-Error-Code": code} if code else None)

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        parts = [unquote(p) for p in split.path.strip("/").split("/")]
        query = parse_qs(split.query)
        body = self._body()
        with self.state.lock:
            self.state.requests.append((self.command, "/".join(parts)))
        fault = self.state.take_fault(self.command, "/".join(parts))
        if fault is not None and fault.kind == "500":
            self._error(500, None, "injected internal error")
            return
        if fault is not None and fault.kind == "404":
            self._error(404, "EntryNotFound", "injected: entry not found")
            return
        try:
            self._route(parts, query, body, fault)
        except KeyError as err:
            self._error(400, None, f"bad request: missing {err}")

    do_GET = do_HEAD = do_POST = do_PUT = _dispatch  # noqa: N815 - stdlib naming

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.state.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
        return repo

    def _commit_files(self, repo: Repo, revision: str) -> tuple[str, dict] | None:
        sha = repo.resolve(revision)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return sha, repo.commits[sha]

    # ------------------------------------------------------------------ routes
    def _route(self, parts: list[str], query: dict, body: bytes, fault: Fault | None) -> None:
        base = f"http://{self.server.server_address[0]}:{self.server.server_address[1]}"
        if parts[:3] == ["api", "repos", "create"]:
            return self._create_repo(json.loads(body), base)
        if parts[:2] == ["api", "validate-yaml"]:
            return self._json(200, {"errors": [], "warnings": []})
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id, rest = "/".join(parts[2:4]), parts[4:]
            return self._api_model(repo_id, rest, query, body, base, fault)
        if parts[0] == "lfs-upload" and self.command == "PUT":
            oid = parts[1]
            if hashlib.sha256(body).hexdigest() != oid:
                return self._error(400, None, "LFS object does not match its oid")
            self.state.lfs_objects[oid] = body
            return self._send(200)
        if (
            len(parts) >= 5
            and parts[1].endswith(".git")
            and parts[2:] == ["info", "lfs", "objects", "batch"]
        ):
            return self._lfs_batch(json.loads(body), base)
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), fault)
        return self._error(404, None, f"no route for {self.command} /{'/'.join(parts)}")

    def _create_repo(self, payload: dict, base: str) -> None:
        repo_id = (
            f"{payload['organization']}/{payload['name']}"
            if payload.get("organization")
            else payload["name"]
        )
        url = f"{base}/{repo_id}"
        with self.state.lock:
            if repo_id in self.state.repos:
                return self._json(409, {"error": "You already created this model repo", "url": url})
            repo = Repo()
            self.state.repos[repo_id] = repo
            self.state.commit(repo, "main", {".gitattributes": StoredFile(GITATTRIBUTES, False)})
        self._json(200, {"url": url, "name": repo_id})

    def _api_model(
        self,
        repo_id: str,
        rest: list[str],
        query: dict,
        body: bytes,
        base: str,
        fault: Fault | None = None,
    ) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        action = rest[0] if rest else "revision"
        revision = rest[1] if len(rest) > 1 else "main"
        if action == "revision":
            resolved = self._commit_files(repo, revision)
            if resolved:
                sha, files = resolved
                siblings = [{"rfilename": p} for p in sorted(files)]
                self._json(
                    200,
                    {"id": repo_id, "sha": sha, "siblings": siblings, "private": False, "tags": []},
                )
        elif action == "tree":
            resolved = self._commit_files(repo, revision)
            if resolved:
                self._json(200, self._tree(resolved[1], "/".join(rest[2:])))
        elif action == "preupload":
            files = json.loads(body)["files"]
            modes = [
                {
                    "path": f["path"],
                    "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular",
                    "shouldIgnore": False,
                }
                for f in files
            ]
            self._json(200, {"files": modes})
        elif action == "commit":
            lose_lfs = fault is not None and fault.kind == "lose-lfs"
            self._create_commit(repo_id, repo, revision, body, base, lose_lfs=lose_lfs)
        elif action == "branch" and self.command == "POST":
            with self.state.lock:
                if revision in repo.branches:
                    return self._error(409, None, f"branch {revision} already exists")
                start = json.loads(body or b"{}").get("startingPoint") or "main"
                repo.branches[revision] = repo.resolve(start)
            self._json(200, {})
        else:
            self._error(404, None, f"unsupported model action {action!r}")

    def _tree(self, files: dict[str, StoredFile], prefix: str) -> list[dict]:
        entries, folders = [], set()
        for path in sorted(files):
            if prefix and not path.startswith(prefix.rstrip("/") + "/"):
                continue
            folders.update("/".join(path.split("/")[:i]) for i in range(1, path.count("/") + 1))
            stored = files[path]
            entry = {
                "type": "file",
                "path": path,
                "size": len(stored.content),
                "oid": git_blob_sha(stored.content),
            }
            if stored.lfs:
                entry["lfs"] = {"oid": stored.etag, "size": len(stored.content), "pointerSize": 134}
            entries.append(entry)
        folders = {f for f in folders if not prefix or f.startswith(prefix.rstrip("/") + "/")}
        return [
            {"type": "directory", "path": f, "oid": git_blob_sha(f.encode()), "size": 0}
            for f in sorted(folders)
        ] + entries

    def _lfs_batch(self, payload: dict, base: str) -> None:
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.state.lfs_objects:
                entry["actions"] = {"upload": {"href": f"{base}/lfs-upload/{obj['oid']}"}}
            objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects})

    def _create_commit(
        self, repo_id: str, repo: Repo, branch: str, body: bytes, base: str, *, lose_lfs: bool
    ) -> None:
        changes: dict[str, StoredFile | None] = {}
        for line in body.decode().splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "file":
                changes[value["path"]] = StoredFile(base64.b64decode(value["content"]), False)
            elif item["key"] == "lfsFile" and lose_lfs:
                continue
            elif item["key"] == "lfsFile":
                content = self.state.lfs_objects.get(value["oid"])
                if content is None:
                    return self._error(400, None, f"LFS object {value['oid']} was never uploaded")
                changes[value["path"]] = StoredFile(content, True)
            elif item["key"] in ("deletedFile", "deletedFolder"):
                changes[value["path"]] = None
        with self.state.lock:
            if branch not in repo.branches:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {branch}")
            sha = self.state.commit(repo, branch, changes)
        self._json(200, {"commitOid": sha, "commitUrl": f"{base}/{repo_id}/commit/{sha}"})

    def _resolve(self, repo_id: str, revision: str, path: str, fault: Fault | None) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        resolved = self._commit_files(repo, revision)
        if not resolved:
            return
        sha, files = resolved
        stored = files.get(path)
        if stored is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist at {revision}")
        content, status = stored.content, 200
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and self.command == "GET":
            content, status = content[int(match.group(1)) :], 206
        headers = {"X-Repo-Commit": sha, "ETag": f'"{stored.etag}"', "Accept-Ranges": "bytes"}
        if stored.lfs:
            headers["X-Linked-Etag"] = f'"{stored.etag}"'
            headers["X-Linked-Size"] = str(len(stored.content))
        if fault is not None and fault.kind == "drop" and self.command == "GET":
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content[: len(content) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._send(status, content, headers)


class HubServer(ThreadingHTTPServer):
    """The server; ``url`` is its endpoint, ``state`` its repos and logs."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.state = HubState()
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close every open connection, so no handler thread outlives it."""
        self.shutdown()
        self.server_close()
        with self.connections_lock:
            for connection in list(self.connections):
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)

    def add_files(self, repo_id: str, files: dict[str, bytes], branch: str = "main") -> str:
        """Commit ``files`` directly (creating the repo if needed); returns the commit sha."""
        with self.state.lock:
            repo = self.state.repos.setdefault(repo_id, Repo())
            changes = {p: StoredFile(c, p.endswith(".safetensors")) for p, c in files.items()}
            return self.state.commit(repo, branch, changes)
