"""A small Hugging Face Hub-compatible HTTP server for the tests, on loopback.

It speaks the part of the Hub's HTTP API that the real ``huggingface_hub`` client uses to create repos,
commit files (regular files inline, large files through the git-LFS batch API) and download them again:

    GET  /api/whoami-v2                                    who the token belongs to
    POST /api/validate-yaml                                model card front matter check
    POST /api/repos/create, DELETE /api/repos/delete       repositories (409 + url when it exists)
    GET  /api/models/NS/NAME[/revision/REV]                repo info (sha, private, siblings)
    GET  /api/models/NS/NAME/tree/REV[/PATH]               file listing (recursive=true)
    POST /api/models/NS/NAME/paths-info/REV                info about given paths
    GET  /api/models/NS/NAME/refs, POST .../branch/BRANCH  branches, pull-request refs
    POST /api/models/NS/NAME/preupload/REV                 regular or LFS, and the remote oid of each file
    POST /api/models/NS/NAME/commit/REV                    ndjson commit (file, lfsFile, deletedFile)
    POST /NS/NAME.git/info/lfs/objects/batch               git-LFS batch API (basic transfer)
    PUT  /lfs-upload/TICKET, POST /lfs-verify/TICKET       the "presigned" upload URL and its verify step
    HEAD/GET /NS/NAME/resolve/REV/PATH                     file download with ETag, X-Repo-Commit,
                                                           X-Linked-Etag/-Size for LFS, and Range

Like the real Hub: an unknown token is a 401 everywhere; a private or missing repo is a 401 without a
token and a 404 with one (``X-Error-Code: RepoNotFound``); unknown revisions and files are 404 with
``RevisionNotFound`` / ``EntryNotFound``; files over 10 MiB and files matching the repo's
``.gitattributes`` LFS patterns must go through LFS; uploads are checked against their sha256.

State is kept in memory and file contents in a directory. Every request is recorded in
``server.requests`` (method, path) and every LFS batch payload in ``server.lfs_batches`` so that tests
can check which protocol path the client took; ``server.drop_uploads = N`` makes the next N LFS uploads
fail by closing the connection without an answer, like a dropped network link.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List, Optional, Tuple
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub rejects regular (non-LFS) files above 10 MiB
REPO_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
COMMIT_OID = re.compile(r"^[0-9a-f]{40}$")
DEFAULT_GITATTRIBUTES = (
    "*.bin filter=lfs diff=lfs merge=lfs -text\n"
    "*.ckpt filter=lfs diff=lfs merge=lfs -text\n"
    "*.h5 filter=lfs diff=lfs merge=lfs -text\n"
    "*.npy filter=lfs diff=lfs merge=lfs -text\n"
    "*.onnx filter=lfs diff=lfs merge=lfs -text\n"
    "*.pt filter=lfs diff=lfs merge=lfs -text\n"
    "*.pth filter=lfs diff=lfs merge=lfs -text\n"
    "*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    "*.zip filter=lfs diff=lfs merge=lfs -text\n"
)


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob (what the Hub reports as a regular file's oid and ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class Entry:
    """One file in a commit's tree."""

    blob_id: str  # git oid of the content (regular) or of the LFS pointer
    size: int
    lfs_sha256: Optional[str] = None

    def info(self, path: str) -> dict:
        out = {"type": "file", "oid": self.blob_id, "size": self.size, "path": path}
        if self.lfs_sha256:
            out["lfs"] = {"oid": self.lfs_sha256, "size": self.size,
                          "pointerSize": len(lfs_pointer(self.lfs_sha256, self.size))}
        return out


@dataclass
class Commit:
    oid: str
    parent: Optional[str]
    title: str
    files: Dict[str, Entry]
    date: str


@dataclass
class Repo:
    repo_id: str
    owner: str
    private: bool
    created: str
    commits: Dict[str, Commit] = field(default_factory=dict)
    branches: Dict[str, str] = field(default_factory=dict)
    pulls: Dict[int, str] = field(default_factory=dict)


class HttpError(Exception):
    def __init__(self, status: int, message: str, code: Optional[str] = None, headers: Optional[dict] = None,
                 extra: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.extra = headers or {}, extra or {}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


class HubState:
    """Users, repos, commits and stored file contents."""

    def __init__(self, root: Path, users: Dict[str, Tuple[str, List[str]]]):
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        (self.root / "lfs").mkdir(parents=True, exist_ok=True)
        self.users = users  # token -> (user name, organisations)
        self.repos: Dict[str, Repo] = {}
        self.tickets: Dict[str, Tuple[str, int]] = {}  # LFS upload ticket -> (sha256, size)
        self.lock = threading.RLock()
        self.requests: List[Tuple[str, str]] = []
        self.lfs_batches: List[dict] = []
        self.commits_received: List[List[dict]] = []
        self.drop_uploads = 0
        self._counter = 0

    # --- storage -------------------------------------------------------------------------------------
    def blob_path(self, entry: Entry) -> Path:
        if entry.lfs_sha256:
            return self.root / "lfs" / entry.lfs_sha256
        return self.root / "blobs" / entry.blob_id

    def store_blob(self, data: bytes) -> Entry:
        oid = git_blob_oid(data)
        path = self.root / "blobs" / oid
        if not path.exists():
            _atomic_write(path, data)
        return Entry(blob_id=oid, size=len(data))

    def has_lfs(self, sha256: str, size: int) -> bool:
        path = self.root / "lfs" / sha256
        return path.is_file() and path.stat().st_size == size

    # --- repos and revisions --------------------------------------------------------------------------
    def new_commit(self, repo: Repo, parent: Optional[str], title: str, files: Dict[str, Entry]) -> Commit:
        self._counter += 1
        tree = sorted((p, e.blob_id) for p, e in files.items())
        oid = hashlib.sha1(json.dumps([repo.repo_id, parent, title, tree, self._counter]).encode()).hexdigest()
        commit = Commit(oid=oid, parent=parent, title=title, files=dict(files), date=_now())
        repo.commits[oid] = commit
        return commit

    def create_repo(self, repo_id: str, owner: str, private: bool) -> Repo:
        repo = Repo(repo_id=repo_id, owner=owner, private=private, created=_now())
        entry = self.store_blob(DEFAULT_GITATTRIBUTES.encode())
        first = self.new_commit(repo, None, "initial commit", {".gitattributes": entry})
        repo.branches["main"] = first.oid
        self.repos[repo_id] = repo
        return repo

    def can_read(self, repo: Repo, user: Optional[str]) -> bool:
        return not repo.private or self.can_write(repo, user)

    def can_write(self, repo: Repo, user: Optional[str]) -> bool:
        if user is None:
            return False
        return repo.owner == user or repo.owner in self.orgs_of(user)

    def orgs_of(self, user: str) -> List[str]:
        for name, orgs in self.users.values():
            if name == user:
                return orgs
        return []

    def get_repo(self, repo_id: str, user: Optional[str], write: bool = False) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or not self.can_read(repo, user):
            # The Hub does not tell a private repo from a missing one; without a token it answers 401.
            raise HttpError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        if write and not self.can_write(repo, user):
            raise HttpError(401 if user is None else 403,
                            f"You don't have the rights to write to {repo_id}")
        return repo

    def resolve(self, repo: Repo, revision: str) -> Commit:
        if revision in repo.branches:
            return repo.commits[repo.branches[revision]]
        pr = re.fullmatch(r"refs/pr/(\d+)", revision)
        if pr and int(pr.group(1)) in repo.pulls:
            return repo.commits[repo.pulls[int(pr.group(1))]]
        if revision.startswith("refs/heads/") and revision[11:] in repo.branches:
            return repo.commits[repo.branches[revision[11:]]]
        if COMMIT_OID.fullmatch(revision) and revision in repo.commits:
            return repo.commits[revision]
        raise HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _lfs_patterns(state: HubState, commit: Commit) -> List[str]:
    entry = commit.files.get(".gitattributes")
    if entry is None:
        return []
    patterns = []
    for line in state.blob_path(entry).read_text().splitlines():
        parts = line.split()
        if len(parts) > 1 and "filter=lfs" in parts[1:]:
            patterns.append(parts[0])
    return patterns


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "HubHTTPServer"

    def log_message(self, format: str, *args) -> None:  # keep pytest output clean
        pass

    @property
    def state(self) -> HubState:
        return self.server.state

    @property
    def base_url(self) -> str:
        return f"http://{self.headers.get('Host') or '127.0.0.1:%d' % self.server.server_port}"

    # --- plumbing ------------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.segments = [unquote(s) for s in url.path.split("/")[1:]]
        with self.state.lock:
            self.state.requests.append((method, url.path))
        try:
            self._route(method, self.segments)
        except HttpError as e:
            headers = dict(e.headers)
            if e.code:
                headers["X-Error-Code"] = e.code
            headers["X-Error-Message"] = e.message
            self._send_json({"error": e.message, **e.extra}, status=e.status, headers=headers, head=method == "HEAD")
        except _DropConnection:
            self.close_connection = True

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _json_body(self) -> dict:
        body = self._read_body()
        ctype = self.headers.get("Content-Type", "")
        if ctype.startswith("application/x-www-form-urlencoded"):
            return {k: v for k, v in parse_qs(body.decode()).items()}
        try:
            return json.loads(body or b"{}")
        except json.JSONDecodeError:
            raise HttpError(400, "Invalid JSON body") from None

    def _send(self, status: int, body: bytes, headers: Optional[dict] = None, head: bool = False,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _send_json(self, obj, status: int = 200, headers: Optional[dict] = None, head: bool = False) -> None:
        self._send(status, json.dumps(obj).encode(), headers=headers, head=head)

    def _user(self) -> Optional[str]:
        """The user behind the Authorization header; an unknown token is a 401 like on the Hub."""
        auth = self.headers.get("Authorization")
        if not auth:
            return None
        token = auth[7:] if auth.lower().startswith("bearer ") else auth
        user = self.state.users.get(token.strip())
        if user is None:
            raise HttpError(401, "Invalid credentials in Authorization header")
        return user[0]

    # --- routing -------------------------------------------------------------------------------------
    def _route(self, method: str, seg: List[str]) -> None:
        if seg[:2] == ["api", "whoami-v2"] and method == "GET":
            return self._whoami()
        if seg[:2] == ["api", "validate-yaml"] and method == "POST":
            return self._validate_yaml()
        if seg[:3] == ["api", "repos", "create"] and method == "POST":
            return self._create_repo()
        if seg[:3] == ["api", "repos", "delete"] and method == "DELETE":
            return self._delete_repo()
        if len(seg) >= 4 and seg[:2] == ["api", "models"]:
            repo_id, rest = f"{seg[2]}/{seg[3]}", seg[4:]
            if not rest and method == "GET":
                return self._repo_info(repo_id, "main")
            action = rest[0] if rest else ""
            if action == "revision" and len(rest) == 2 and method == "GET":
                return self._repo_info(repo_id, rest[1])
            if action == "tree" and len(rest) >= 2 and method == "GET":
                return self._tree(repo_id, rest[1], "/".join(rest[2:]))
            if action == "paths-info" and len(rest) == 2 and method == "POST":
                return self._paths_info(repo_id, rest[1])
            if action == "refs" and method == "GET":
                return self._refs(repo_id)
            if action == "branch" and len(rest) == 2 and method == "POST":
                return self._create_branch(repo_id, rest[1])
            if action == "preupload" and len(rest) == 2 and method == "POST":
                return self._preupload(repo_id, rest[1])
            if action == "commit" and len(rest) == 2 and method == "POST":
                return self._commit(repo_id, rest[1])
        if len(seg) >= 2 and seg[0] in ("api", "datasets", "spaces"):
            raise HttpError(404, "Not found")
        if len(seg) == 6 and seg[1].endswith(".git") and seg[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(f"{seg[0]}/{seg[1][:-4]}")
        if len(seg) == 2 and seg[0] == "lfs-upload" and method == "PUT":
            return self._lfs_upload(seg[1])
        if len(seg) == 2 and seg[0] == "lfs-verify" and method == "POST":
            return self._lfs_verify(seg[1])
        if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(f"{seg[0]}/{seg[1]}", seg[3], "/".join(seg[4:]), head=method == "HEAD")
        raise HttpError(404, "Not found")

    # --- account and repos -----------------------------------------------------------------------------
    def _whoami(self) -> None:
        user = self._user()
        if user is None:
            raise HttpError(401, "Invalid credentials in Authorization header")
        orgs = self.state.orgs_of(user)
        self._send_json({"type": "user", "name": user, "fullname": user,
                         "orgs": [{"name": o, "type": "org"} for o in orgs],
                         "auth": {"type": "access_token", "accessToken": {"role": "write"}}})

    def _validate_yaml(self) -> None:
        content = self._json_body().get("content", "")
        errors = []
        if content.startswith("---"):
            end = content.find("\n---", 3)
            if end < 0:
                errors.append({"message": "front matter is not closed by '---'"})
            else:
                try:
                    meta = yaml.safe_load(content[3:end])
                    if meta is not None and not isinstance(meta, dict):
                        errors.append({"message": "front matter must be a mapping"})
                except yaml.YAMLError as e:
                    errors.append({"message": f"invalid YAML: {e}"})
        self._send_json({"errors": errors, "warnings": []}, status=400 if errors else 200)

    def _create_repo(self) -> None:
        user = self._user()
        if user is None:
            raise HttpError(401, "You must be authenticated to create a repo")
        payload = self._json_body()
        if payload.get("type", "model") != "model":
            raise HttpError(400, "This server only hosts model repos")
        name, namespace = payload.get("name") or "", payload.get("organization") or user
        if not REPO_NAME.fullmatch(name) or not REPO_NAME.fullmatch(namespace):
            raise HttpError(400, f"Invalid repo name {namespace}/{name}")
        if namespace != user and namespace not in self.state.orgs_of(user):
            raise HttpError(403, f"You don't have the rights to create a repo under {namespace}")
        repo_id = f"{namespace}/{name}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        with self.state.lock:
            if repo_id in self.state.repos:
                # exist_ok=True clients read the url from the 409 answer, as from the Hub's
                raise HttpError(409, "You already created this model repo",
                                extra={"url": f"{self.base_url}/{repo_id}"})
            self.state.create_repo(repo_id, namespace, private)
        self._send_json({"url": f"{self.base_url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _delete_repo(self) -> None:
        user = self._user()
        payload = self._json_body()
        repo_id = f"{payload.get('organization') or user}/{payload.get('name')}"
        with self.state.lock:
            self.state.get_repo(repo_id, user, write=True)
            del self.state.repos[repo_id]
        self._send_json({})

    def _repo_info(self, repo_id: str, revision: str) -> None:
        user = self._user()
        with self.state.lock:
            repo = self.state.get_repo(repo_id, user)
            commit = self.state.resolve(repo, revision)
        siblings = [{"rfilename": p, "size": e.size, "blobId": e.blob_id,
                     **({"lfs": {"sha256": e.lfs_sha256, "size": e.size,
                                 "pointerSize": len(lfs_pointer(e.lfs_sha256, e.size))}} if e.lfs_sha256 else {})}
                    for p, e in sorted(commit.files.items())]
        self._send_json({"_id": repo_id, "id": repo_id, "modelId": repo_id, "author": repo.owner,
                         "sha": commit.oid, "private": repo.private, "gated": False, "disabled": False,
                         "lastModified": commit.date, "createdAt": repo.created, "tags": [],
                         "downloads": 0, "likes": 0, "siblings": siblings})

    def _refs(self, repo_id: str) -> None:
        user = self._user()
        with self.state.lock:
            repo = self.state.get_repo(repo_id, user)
            out = {"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c}
                                for b, c in sorted(repo.branches.items())],
                   "converts": [], "tags": []}
            if self.query.get("include_prs"):
                out["pullRequests"] = [{"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": c}
                                       for n, c in sorted(repo.pulls.items())]
        self._send_json(out)

    def _create_branch(self, repo_id: str, branch: str) -> None:
        user = self._user()
        payload = self._json_body()
        with self.state.lock:
            repo = self.state.get_repo(repo_id, user, write=True)
            if not REPO_NAME.fullmatch(branch.replace("/", "-")):
                raise HttpError(400, f"Invalid branch name {branch}")
            if branch in repo.branches:
                raise HttpError(409, f"Reference already exists: refs/heads/{branch}")
            start = self.state.resolve(repo, payload.get("startingPoint") or "main")
            repo.branches[branch] = start.oid
        self._send_json({})

    # --- listing -------------------------------------------------------------------------------------
    def _tree(self, repo_id: str, revision: str, path: str) -> None:
        user = self._user()
        recursive = str(self.query.get("recursive", "")).lower() in ("1", "true")
        with self.state.lock:
            commit = self.state.resolve(self.state.get_repo(repo_id, user), revision)
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in commit.files):
            raise HttpError(404, f"{path} does not exist on {revision}", "EntryNotFound",
                            headers={"X-Repo-Commit": commit.oid})
        entries, folders = [], set()
        for p, entry in sorted(commit.files.items()):
            if not p.startswith(prefix):
                continue
            parts = p[len(prefix):].split("/")
            for depth in range(1, len(parts)):  # the folders on the way to the file
                folder = prefix + "/".join(parts[:depth])
                if folder not in folders and (recursive or depth == 1):
                    folders.add(folder)
                    entries.append({"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(),
                                    "size": 0, "path": folder})
            if recursive or len(parts) == 1:
                entries.append(entry.info(p))
        self._send_json(entries)

    def _paths_info(self, repo_id: str, revision: str) -> None:
        user = self._user()
        payload = self._json_body()
        paths = payload.get("paths") or []
        paths = paths if isinstance(paths, list) else [paths]
        with self.state.lock:
            commit = self.state.resolve(self.state.get_repo(repo_id, user), revision)
        out = []
        for path in paths:
            if path in commit.files:
                out.append(commit.files[path].info(path))
            elif any(p.startswith(path.rstrip("/") + "/") for p in commit.files):
                out.append({"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(),
                            "size": 0, "path": path})
        self._send_json(out)

    # --- uploads -------------------------------------------------------------------------------------
    def _preupload(self, repo_id: str, revision: str) -> None:
        user = self._user()
        payload = self._json_body()
        with self.state.lock:
            repo = self.state.get_repo(repo_id, user, write=True)
            commit = self.state.resolve(repo, revision)
            patterns = _lfs_patterns(self.state, commit)
        files = []
        for f in payload.get("files", []):
            path, size = f["path"], int(f["size"])
            sample = base64.b64decode(f.get("sample", ""))
            lfs = (size > LFS_THRESHOLD or b"\0" in sample
                   or any(fnmatch.fnmatch(os.path.basename(path), pat) for pat in patterns))
            remote = commit.files.get(path)
            oid = None
            if remote is not None:  # lets the client skip files that did not change
                oid = remote.lfs_sha256 if lfs else (None if remote.lfs_sha256 else remote.blob_id)
            files.append({"path": path, "uploadMode": "lfs" if lfs else "regular",
                          "shouldIgnore": False, "oid": oid})
        self._send_json({"files": files, "commitOid": commit.oid})

    def _lfs_batch(self, repo_id: str) -> None:
        user = self._user()
        payload = self._json_body()
        with self.state.lock:
            self.state.get_repo(repo_id, user, write=True)
            self.state.lfs_batches.append(payload)
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", ["basic"]):
            raise HttpError(400, "Only basic LFS uploads are supported")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj.get("oid"), obj.get("size")
            if not (isinstance(oid, str) and re.fullmatch(r"[0-9a-f]{64}", oid) and isinstance(size, int)):
                raise HttpError(422, "Invalid LFS object")
            if self.state.has_lfs(oid, size):
                objects.append({"oid": oid, "size": size})  # already stored: no upload action
                continue
            ticket = secrets.token_urlsafe(16)
            with self.state.lock:
                self.state.tickets[ticket] = (oid, size)
            objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {
                "upload": {"href": f"{self.base_url}/lfs-upload/{ticket}", "expires_in": 900},
                "verify": {"href": f"{self.base_url}/lfs-verify/{ticket}"}}})
        self._send_json({"transfer": "basic", "objects": objects})

    def _lfs_upload(self, ticket: str) -> None:
        # Like a presigned storage URL: the ticket is the credential, no Authorization header is sent.
        with self.state.lock:
            target = self.state.tickets.get(ticket)
        if target is None:
            raise HttpError(403, "Invalid or expired upload URL")
        data = self._read_body()
        with self.state.lock:
            drop = self.state.drop_uploads > 0
            if drop:
                self.state.drop_uploads -= 1
        if drop:
            raise _DropConnection()
        oid, size = target
        if len(data) != size or hashlib.sha256(data).hexdigest() != oid:
            raise HttpError(400, "Uploaded content does not match the announced sha256 and size")
        _atomic_write(self.state.root / "lfs" / oid, data)
        self._send(200, b"", headers={"ETag": f'"{oid}"'})

    def _lfs_verify(self, ticket: str) -> None:
        self._user()
        payload = self._json_body()
        with self.state.lock:
            target = self.state.tickets.pop(ticket, None)
        if target is None or (payload.get("oid"), payload.get("size")) != target:
            raise HttpError(422, "Verify does not match the upload")
        if not self.state.has_lfs(*target):
            raise HttpError(404, "Object was not uploaded")
        self._send_json({"success": True})

    def _commit(self, repo_id: str, revision: str) -> None:
        user = self._user()
        lines = [json.loads(line) for line in self._read_body().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HttpError(400, "The commit payload must start with a header line")
        header = lines[0]["value"]
        with self.state.lock:
            self.state.commits_received.append(lines)
            repo = self.state.get_repo(repo_id, user, write=True)
            base = self.state.resolve(repo, revision)
            if revision not in repo.branches and not self.query.get("create_pr"):
                raise HttpError(400, f"Can only commit to a branch, not {revision}")
            if header.get("parentCommit") and header["parentCommit"] != base.oid:
                raise HttpError(412, "A commit has happened since the parent commit. Please retry.")
            files = dict(base.files)
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value", {})
                path = value.get("path", "")
                if key == "file":
                    data = base64.b64decode(value["content"])
                    if len(data) > LFS_THRESHOLD:
                        raise HttpError(400, f"Your push was rejected because {path} is larger than 10 MiB;"
                                             " use git-lfs")
                    files[path] = self.state.store_blob(data)
                elif key == "lfsFile":
                    sha, size = value.get("oid"), value.get("size")
                    if size is None and path in files and files[path].lfs_sha256 == sha:
                        size = files[path].size
                    if not self.state.has_lfs(sha, size):
                        raise HttpError(400, f"Your push was rejected because an LFS pointer pointed to a file"
                                             f" that does not exist ({path})")
                    files[path] = Entry(git_blob_oid(lfs_pointer(sha, size)), size, sha)
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HttpError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                elif key == "deletedFolder":
                    files = {p: e for p, e in files.items() if not p.startswith(path.rstrip("/") + "/")}
                else:
                    raise HttpError(400, f"Unknown commit operation {key!r}")
            commit = self.state.new_commit(repo, base.oid, header.get("summary") or "", files)
            pr_url = None
            if self.query.get("create_pr"):
                number = max(repo.pulls, default=0) + 1
                repo.pulls[number] = commit.oid
                pr_url = f"{self.base_url}/{repo_id}/discussions/{number}"
            else:
                repo.branches[revision] = commit.oid
        self._send_json({"success": True, "commitOid": commit.oid, "pullRequestUrl": pr_url,
                         "commitUrl": f"{self.base_url}/{repo_id}/commit/{commit.oid}"})

    # --- downloads -----------------------------------------------------------------------------------
    def _resolve(self, repo_id: str, revision: str, path: str, head: bool) -> None:
        user = self._user()
        with self.state.lock:
            commit = self.state.resolve(self.state.get_repo(repo_id, user), revision)
        entry = commit.files.get(path)
        if entry is None:
            raise HttpError(404, f"Entry not found: {path}", "EntryNotFound", headers={"X-Repo-Commit": commit.oid})
        headers = {"X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes",
                   "ETag": f'"{entry.lfs_sha256 or entry.blob_id}"'}
        if entry.lfs_sha256:  # what the Hub sends for LFS files (its CDN redirect carries the same headers)
            headers.update({"X-Linked-Etag": f'"{entry.lfs_sha256}"', "X-Linked-Size": entry.size})
        data = self.state.blob_path(entry).read_bytes()
        status, body = 200, data
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if match and (match.group(1) or match.group(2)):
            start, end = match.group(1), match.group(2)
            if start:
                first, last = int(start), min(int(end) if end else len(data) - 1, len(data) - 1)
            else:  # suffix range: the last N bytes
                first, last = max(len(data) - int(end), 0), len(data) - 1
            if first >= len(data) or first > last:
                raise HttpError(416, "Requested range not satisfiable",
                                headers={"Content-Range": f"bytes */{len(data)}"})
            status, body = 206, data[first:last + 1]
            headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
        headers["Content-Length"] = len(body)
        self._send(status, body, headers=headers, head=head, content_type="application/octet-stream")


class _DropConnection(Exception):
    """Close the socket without answering (a dropped upload)."""


class HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, state: HubState):
        super().__init__(address, HubHandler)
        self.state = state


class HubServer:
    """Start the server on a free loopback port in a thread; use as a context manager."""

    def __init__(self, root: Path, users: Optional[Dict[str, Tuple[str, List[str]]]] = None):
        self.state = HubState(root, users or {})
        self._httpd = HubHTTPServer(("127.0.0.1", 0), self.state)
        self.url = f"http://127.0.0.1:{self._httpd.server_port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)

    def start(self) -> "HubServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":  # manual use: python tests/hub_server.py DIR TOKEN USER
    import sys
    import tempfile

    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    token, user = (sys.argv[2], sys.argv[3]) if len(sys.argv) > 3 else ("hf_local_token", "local")
    srv = HubServer(root, {token: (user, [])})
    print(f"serving {root} at {srv.url} (token for {user}: set HF_TOKEN)", flush=True)
    srv._httpd.serve_forever()
