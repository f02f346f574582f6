"""A loopback stand-in for the Hugging Face Hub: the HTTP routes `huggingface_hub` uses to create a model repo, upload a
folder, list and download it, kept in memory per repo and revision.

    with HubServer() as hub:                 # 127.0.0.1, a free port, served from a daemon thread
        env = {"HF_ENDPOINT": hub.endpoint}  # set BEFORE huggingface_hub is imported in the client process
        ...
        hub.files("org/name")                # {path: bytes} at the head of main
        hub.requests                         # [(method, path), ...] every request seen, in order

Routes (model repos only; repo ids are "namespace/name"; revisions are branch names or full commit hashes):

    GET  /api/whoami-v2                                        a fixed test user
    POST /api/validate-yaml                                    README front matter checks (upload_folder asks first)
    POST /api/repos/create                                     409 when it exists (with "url", as the Hub does)
    GET  /api/models/{repo}                                    model info: sha, siblings, private, ...
    GET  /api/models/{repo}/revision/{rev}                     the same at a revision
    GET  /api/models/{repo}/refs                               branches (and no tags)
    POST /api/models/{repo}/branch/{branch}                    create a branch (409 when it exists)
    POST /api/models/{repo}/preupload/{rev}                    every file is "regular" (never LFS or Xet), with the
                                                               git oid of the current file so unchanged ones are skipped
    POST /api/models/{repo}/commit/{rev}                       NDJSON: header, file (base64), deletedFile,
                                                               deletedFolder; lfsFile is refused (400): nothing here
                                                               stores LFS objects
    GET  /api/models/{repo}/tree/{rev}[/{path}]                tree listing (?recursive=true), one page
    GET|HEAD /{repo}/resolve/{rev}/{path}                      file content with X-Repo-Commit, ETag (git blob oid),
                                                               Content-Length; 404s carry X-Error-Code as the Hub's do

Anything else answers 404 without an X-Error-Code and is recorded in `unknown_requests`, so a test can see what a new
client version started asking for. The server never follows the client anywhere else: it is for tests only.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

HEX40 = re.compile(r"[0-9a-f]{40}")
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
USER = "tester"
MAX_BODY_BYTES = 512 * 1024 * 1024


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob (`git hash-object`): what the Hub reports as a regular file's oid and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    files: dict[str, bytes]
    message: str
    parent: str | None
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None, body=None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = headers or {}
        self.body = body


class HubState:
    """Repos, their commits and branches, and the request log; every method holds the lock."""

    def __init__(self):
        self.lock = threading.RLock()
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.unknown_requests: list[tuple[str, str]] = []
        self.authorizations: list[str | None] = []
        self._counter = 0

    # ------------------------------------------------------------------ helpers
    def new_commit(self, repo: Repo, files: dict[str, bytes], message: str, parent: str | None) -> Commit:
        self._counter += 1
        digest = hashlib.sha1()
        digest.update(f"{repo.repo_id}\0{parent}\0{message}\0{self._counter}\0{time.time_ns()}".encode())
        for path in sorted(files):
            digest.update(f"{path}\0{git_blob_oid(files[path])}\0".encode())
        commit = Commit(oid=digest.hexdigest(), files=dict(files), message=message, parent=parent,
                        date=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z"))
        repo.commits[commit.oid] = commit
        return commit

    def repo(self, repo_id: str) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def commit_at(self, repo: Repo, revision: str) -> Commit:
        if revision in repo.branches:
            return repo.commits[repo.branches[revision]]
        if HEX40.fullmatch(revision) and revision in repo.commits:
            return repo.commits[revision]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    # ------------------------------------------------------------------ inspection (for tests)
    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        with self.lock:
            repo = self.repo(repo_id)
            return dict(self.commit_at(repo, revision).files)


# ---------------------------------------------------------------------------------------------------- the handler
class HubHandler(BaseHTTPRequestHandler):
    server_version = "LoopbackHub/1.0"
    protocol_version = "HTTP/1.1"  # keep-alive, as the Hub; every response carries Content-Length
    state: HubState  # set on the subclass made per server
    endpoint: str

    def log_message(self, format, *args):  # quiet: pytest shows failures, not traffic
        pass

    # ------------------------------------------------------------------ plumbing
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                total += size
                if total > MAX_BODY_BYTES:
                    raise HubError(413, "request body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise HubError(413, "request body too large")
        return self.rfile.read(length) if length else b""


    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json",
              head: bool = False):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _send_json(self, status: int, payload, headers: dict | None = None, head: bool = False):
        self._send(status, json.dumps(payload).encode(), headers, head=head)

    def _dispatch(self, method: str):
        parts = urlsplit(self.path)
        with self.state.lock:
            self.state.requests.append((method, parts.path))
            self.state.authorizations.append(self.headers.get("Authorization"))
        query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        try:
            # Read the body before answering, so that a keep-alive connection stays in step.
            body = self._body() if method in ("POST", "PUT") else b""
            self._route(method, parts.path, query, body)
        except HubError as error:
            headers = dict(error.headers)
            if error.code:
                headers["X-Error-Code"] = error.code
            headers["X-Error-Message"] = error.message
            payload = error.body if error.body is not None else {"error": error.message}
            self._send_json(error.status, payload, headers, head=method == "HEAD")
        except Exception as error:  # a bug in the stand-in: say so instead of hanging the client
            self._send_json(500, {"error": f"loopback hub error: {error!r}"}, head=method == "HEAD")

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    # ------------------------------------------------------------------ routing
    def _route(self, method: str, path: str, query: dict, body: bytes):
        segments = [unquote(s) for s in path.strip("/").split("/")] if path.strip("/") else []
        state = self.state
        with state.lock:
            if method == "GET" and segments == ["api", "whoami-v2"]:
                return self._send_json(200, {"type": "user", "name": USER, "fullname": "Test User", "orgs": [],
                                             "auth": {"type": "access_token",
                                                      "accessToken": {"displayName": "test", "role": "write"}}})
            if method == "POST" and segments == ["api", "validate-yaml"]:
                return self._validate_yaml(_parse_json(body))
            if method == "POST" and segments == ["api", "repos", "create"]:
                return self._create_repo(_parse_json(body))
            if len(segments) >= 4 and segments[:2] == ["api", "models"]:
                repo_id = f"{segments[2]}/{segments[3]}"
                rest = segments[4:]
                if method == "GET" and not rest:
                    return self._model_info(repo_id, "main")
                if method == "GET" and len(rest) == 2 and rest[0] == "revision":
                    return self._model_info(repo_id, rest[1])
                if method == "GET" and rest == ["refs"]:
                    return self._refs(repo_id)
                if method == "POST" and len(rest) == 2 and rest[0] == "branch":
                    return self._create_branch(repo_id, rest[1], _parse_json(body))
                if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
                    return self._preupload(repo_id, rest[1], _parse_json(body))
                if method == "POST" and len(rest) == 2 and rest[0] == "commit":
                    return self._commit(repo_id, rest[1], body)
                if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
                    return self._tree(repo_id, rest[1], "/".join(rest[2:]), query)
            if method in ("GET", "HEAD") and len(segments) >= 5 and segments[2] == "resolve":
                return self._resolve(f"{segments[0]}/{segments[1]}", segments[3], "/".join(segments[4:]),
                                     head=method == "HEAD")
            state.unknown_requests.append((method, path))
        raise HubError(404, f"loopback hub: no route for {method} {path}")

    # ------------------------------------------------------------------ README metadata
    def _validate_yaml(self, payload: dict):
        errors = validate_card_metadata(payload.get("content", ""))
        self._send_json(400 if errors else 200, {"errors": [{"message": message} for message in errors],
                                                 "warnings": []})

    # ------------------------------------------------------------------ repos and branches
    def _create_repo(self, payload: dict):
        if payload.get("type", "model") not in (None, "model"):
            raise HubError(400, "the loopback hub stores model repos only")
        name, organization = payload.get("name"), payload.get("organization") or USER
        if not name or "/" in name:
            raise HubError(400, f"invalid repo name {name!r}")
        repo_id = f"{organization}/{name}"
        url = f"{self.endpoint}/{repo_id}"
        if repo_id in self.state.repos:
            raise HubError(409, "You already created this model repo", body={"error": "You already created this model "
                                                                                       "repo", "url": url})
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo = Repo(repo_id=repo_id, private=private)
        initial = self.state.new_commit(repo, {".gitattributes": GITATTRIBUTES}, "initial commit", None)
        repo.branches["main"] = initial.oid
        self.state.repos[repo_id] = repo
        self._send_json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _create_branch(self, repo_id: str, branch: str, payload: dict):
        repo = self.state.repo(repo_id)
        if branch in repo.branches:
            raise HubError(409, f"Reference refs/heads/{branch} already exists")
        start = self.state.commit_at(repo, payload.get("startingPoint") or "main")
        repo.branches[branch] = start.oid
        self._send_json(200, {})

    def _refs(self, repo_id: str):
        repo = self.state.repo(repo_id)
        branches = [{"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid}
                    for name, oid in sorted(repo.branches.items())]
        self._send_json(200, {"branches": branches, "tags": [], "converts": []})

    def _model_info(self, repo_id: str, revision: str):
        repo = self.state.repo(repo_id)
        commit = self.state.commit_at(repo, revision)
        self._send_json(200, {
            "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
            "author": repo_id.split("/")[0], "sha": commit.oid, "lastModified": commit.date,
            "createdAt": repo.commits[_root(repo, commit)].date, "private": repo.private, "gated": False,
            "disabled": False, "downloads": 0, "likes": 0, "tags": [],
            "siblings": [{"rfilename": path} for path in sorted(commit.files)],
        })

    # ------------------------------------------------------------------ upload
    def _preupload(self, repo_id: str, revision: str, payload: dict):
        repo = self.state.repo(repo_id)
        commit = self.state.commit_at(repo, revision)
        files = payload.get("files")
        if not isinstance(files, list):
            raise HubError(400, "preupload: 'files' must be a list")
        answer = []
        for item in files:
            current = commit.files.get(item["path"])
            answer.append({"path": item["path"], "uploadMode": "regular", "shouldIgnore": False,
                           "oid": git_blob_oid(current) if current is not None else None})
        self._send_json(200, {"files": answer, "commitOid": commit.oid})

    def _commit(self, repo_id: str, revision: str, body: bytes):
        repo = self.state.repo(repo_id)
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision} (commits go to a branch)", "RevisionNotFound")
        head = repo.commits[repo.branches[revision]]
        try:
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise HubError(400, f"commit: invalid NDJSON: {error}")
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "commit: the first NDJSON line must be the header")
        header = lines[0]["value"]
        parent = header.get("parentCommit")
        if parent is not None and parent != head.oid:
            raise HubError(412, f"A commit has happened since. Parent commit {parent} is not the head {head.oid}")
        files = dict(head.files)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            path = value.get("path", "")
            if not path or path.startswith("/") or ".." in path.split("/"):
                raise HubError(400, f"commit: invalid path {path!r}")
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"commit: unsupported encoding {value.get('encoding')!r}")
                files[path] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise HubError(404, f"commit: {path} does not exist", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                for name in [name for name in files if name.startswith(prefix)]:
                    del files[name]
            else:
                raise HubError(400, f"commit: the loopback hub does not support {key!r} operations")
        commit = self.state.new_commit(repo, files, header.get("summary", ""), head.oid)
        repo.branches[revision] = commit.oid
        self._send_json(200, {"success": True, "commitOid": commit.oid, "pullRequestUrl": None,
                              "commitUrl": f"{self.endpoint}/{repo_id}/commit/{commit.oid}"})

    # ------------------------------------------------------------------ download
    def _tree(self, repo_id: str, revision: str, folder: str, query: dict):
        repo = self.state.repo(repo_id)
        commit = self.state.commit_at(repo, revision)
        recursive = query.get("recursive", "false").lower() in ("1", "true")
        prefix = folder.strip("/") + "/" if folder.strip("/") else ""
        entries, folders = [], set()
        for path in sorted(commit.files):
            if not path.startswith(prefix):
                continue
            relative = path[len(prefix):]
            if "/" in relative:
                parts = relative.split("/")
                for depth in range(1, len(parts) if recursive else 2):
                    folders.add(prefix + "/".join(parts[:depth]))
                if not recursive:
                    continue
            data = commit.files[path]
            entries.append({"type": "file", "oid": git_blob_oid(data), "size": len(data), "path": path})
        if prefix and not entries and not folders:
            raise HubError(404, f"{folder} does not exist on {revision}", "EntryNotFound",
                           {"X-Repo-Commit": commit.oid})
        entries += [{"type": "directory", "oid": hashlib.sha1(name.encode()).hexdigest(), "size": 0, "path": name}
                    for name in sorted(folders)]
        self._send_json(200, entries)

    def _resolve(self, repo_id: str, revision: str, path: str, head: bool):
        repo = self.state.repo(repo_id)
        commit = self.state.commit_at(repo, revision)
        data = commit.files.get(path)
        if data is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        oid = git_blob_oid(data)
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{oid}"', "Accept-Ranges": "bytes",
                   "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}"}
        status, body = 200, data
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "") or "")
        if match and not head:
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else len(data) - 1
            if start >= len(data):
                raise HubError(416, "Range Not Satisfiable", headers={"Content-Range": f"bytes */{len(data)}"})
            body = data[start:end + 1]
            status = 206
            headers["Content-Range"] = f"bytes {start}-{start + len(body) - 1}/{len(data)}"
        self._send(status, body, headers, content_type="application/octet-stream", head=head)


def validate_card_metadata(content: str) -> list[str]:
    """What the Hub would reject in a README's YAML front matter (a subset of its checks): not a mapping, non-string
    license or tags, a `model-index` without name / results / task type / dataset type and name / metric type and
    value."""
    import yaml

    if not content.startswith("---"):
        return []  # no metadata: allowed (the Hub only warns)
    parts = re.split(r"^---\s*$", content, maxsplit=2, flags=re.MULTILINE)
    if len(parts) < 3:
        return ["the YAML front matter is not closed by a '---' line"]
    try:
        metadata = yaml.safe_load(parts[1]) or {}
    except yaml.YAMLError as error:
        return [f"invalid YAML: {error}"]
    if not isinstance(metadata, dict):
        return ["the metadata must be a YAML mapping"]
    errors = []
    if "license" in metadata and not isinstance(metadata["license"], str):
        errors.append('"license" must be a string')
    for key in ("tags", "datasets"):
        value = metadata.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            errors.append(f'"{key}" must be a list of strings')
    model_index = metadata.get("model-index")
    if model_index is not None:
        if not isinstance(model_index, list):
            return errors + ['"model-index" must be a list']
        for entry in model_index:
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                errors.append('"model-index" entries need a "name"')
                continue
            for result in entry.get("results") or []:
                task, dataset = result.get("task") or {}, result.get("dataset") or {}
                if not isinstance(task.get("type"), str):
                    errors.append('"model-index[].results[].task.type" is required')
                if not (isinstance(dataset.get("type"), str) and isinstance(dataset.get("name"), str)):
                    errors.append('"model-index[].results[].dataset" needs "type" and "name"')
                for metric in result.get("metrics") or []:
                    if not isinstance(metric.get("type"), str) or "value" not in metric:
                        errors.append('"model-index[].results[].metrics[]" need "type" and "value"')
    return errors


def _parse_json(body: bytes) -> dict:
    try:
        payload = json.loads(body or b"{}")
    except json.JSONDecodeError as error:
        raise HubError(400, f"invalid JSON body: {error}")
    if not isinstance(payload, dict):
        raise HubError(400, "the JSON body must be an object")
    return payload


def _root(repo: Repo, commit: Commit) -> str:
    while commit.parent is not None:
        commit = repo.commits[commit.parent]
    return commit.oid


# ---------------------------------------------------------------------------------------------------- the server
class HubServer:
    """The loopback Hub on 127.0.0.1 and a free port, served from a daemon thread; a context manager.

    `endpoint` is what HF_ENDPOINT must be in the client process. `close()` (or leaving the `with` block) stops it.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, request_timeout: float = 30.0):
        self.state = HubState()
        handler = type("BoundHubHandler", (HubHandler,), {"state": self.state, "timeout": request_timeout})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False  # an idle keep-alive connection must not hold up close()
        self.port = self.httpd.server_address[1]
        self.endpoint = f"http://{host}:{self.port}"
        handler.endpoint = self.endpoint
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="loopback-hub", daemon=True)
        self._thread.start()

    # inspection
    @property
    def requests(self) -> list[tuple[str, str]]:
        with self.state.lock:
            return list(self.state.requests)

    @property
    def unknown_requests(self) -> list[tuple[str, str]]:
        with self.state.lock:
            return list(self.state.unknown_requests)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return self.state.files(repo_id, revision)

    def branches(self, repo_id: str) -> dict[str, str]:
        with self.state.lock:
            return dict(self.state.repo(repo_id).branches)

    def is_private(self, repo_id: str) -> bool:
        with self.state.lock:
            return self.state.repo(repo_id).private

    # lifecycle
    def close(self, timeout: float = 5.0) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout)

    def __enter__(self) -> "HubServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":  # a manual stand-in: HF_ENDPOINT=<printed endpoint> daps push ...
    import argparse

    parser = argparse.ArgumentParser(description="Serve an in-memory loopback Hub until interrupted.")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    server = HubServer(port=args.port)
    print(f"HF_ENDPOINT={server.endpoint}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.close()
