"""`LocalHub`: an in-process HTTP server speaking enough of the Hugging Face Hub API for `huggingface_hub`'s client.

Supported (model, dataset and space repos; `{t}` is `models`, `datasets` or `spaces`):
  GET    /api/whoami-v2
  POST   /api/repos/create, DELETE /api/repos/delete, PUT /api/{t}/{repo}/settings
  GET    /api/{t}/{repo}[/revision/{rev}]            repo info (sha, siblings, private, gated; ?blobs=true)
  GET    /api/{t}/{repo}/tree/{rev}[/{path}]         (?recursive=true, ?expand=true for lastCommit)
  POST   /api/{t}/{repo}/paths-info/{rev}            (form or JSON body: paths, expand)
  POST   /api/{t}/{repo}/preupload/{rev}             uploadMode lfs (LFS patterns / > 10 MB) or regular
  POST   /[datasets/|spaces/]{repo}.git/info/lfs/objects/batch   basic transfer; PUT/POST /_lfs/{upload,verify}/..
  POST   /api/{t}/{repo}/commit/{rev}                NDJSON: header, file, lfsFile, deletedFile, deletedFolder
  GET    /api/{t}/{repo}/refs, GET /api/{t}/{repo}/commits/{rev}
  POST/DELETE /api/{t}/{repo}/branch/{branch}, POST /api/{t}/{repo}/tag/{rev}, DELETE /api/{t}/{repo}/tag/{tag}
  HEAD/GET /[datasets/|spaces/]{repo}/resolve/{rev}/{path}   (ETag, X-Repo-Commit, X-Linked-Etag/-Size, Range)
  POST   /api/validate-yaml, any /api/telemetry/...
Errors carry X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo) and X-Error-Message.
"""

from __future__ import annotations

import json
import secrets
import socket
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from hub_server_endpoints import URL_PREFIX as _URL_PREFIX
from hub_server_endpoints import HubEndpoints
from hub_server_store import (
    DEFAULT_LFS_PATTERNS,
    Commit,
    HubError,
    HubStore,
    Repo,
    commit_json,
    info_json,
    preupload_json,
    refs_json,
    split_revision,
)

_PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space"}
_TRUE = {"1", "true", "True", "yes"}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # snapshot_download opens up to 8 connections at once
    hub: LocalHub


class LocalHub:
    """A local Hub: start it, point `huggingface_hub` at `.endpoint`, authenticate with `.token` (user `.user`)."""

    def __init__(self, root: str | None = None, user: str = "local-user", token: str = "hf_local_test_token",
                 lfs_patterns: tuple[str, ...] = DEFAULT_LFS_PATTERNS):
        self._tmp = tempfile.TemporaryDirectory(prefix="local-hub-") if root is None else None
        self.store = HubStore(root or self._tmp.name, lfs_patterns)
        self.user, self.token = user, token
        self.tokens: dict[str, str] = {token: user}
        self.orgs: dict[str, set[str]] = {user: set()}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for assertions
        self.unhandled: list[str] = []  # requests no route matched
        self.lfs_tickets: dict[str, tuple[str, int]] = {}
        self.cache_dir: str | None = None  # set by the `local_hub` fixture: the empty HF_HUB_CACHE of the test
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "LocalHub not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> LocalHub:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.hub = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="local-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ test helpers
    def add_user(self, name: str, token: str | None = None, orgs: tuple[str, ...] = ()) -> str:
        """Register another user (optionally member of orgs); returns its token."""
        token = token or f"hf_{name}_{secrets.token_hex(8)}"
        self.tokens[token] = name
        self.orgs[name] = set(orgs)
        return token

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        repo = self.store.get_repo(repo_type, repo_id)
        if repo is None:
            raise KeyError(repo_id)
        return repo

    def set_gated(self, repo_id: str, gated: bool | str = "auto", granted: tuple[str, ...] = (),
                  repo_type: str = "model") -> None:
        """Gate a repo: files need a token of the owner or of a user in `granted`."""
        repo = self.repo(repo_id, repo_type)
        repo.gated, repo.granted = gated, set(granted)

    def can_write(self, user: str | None, repo_id: str) -> bool:
        namespace = repo_id.split("/")[0]
        return user is not None and (namespace == user or namespace in self.orgs.get(user, set()))


class _Handler(HubEndpoints, BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 60  # idle keep-alive connections end eventually

    def setup(self) -> None:
        super().setup()
        # headers and body go out in separate writes: without this, Nagle + delayed ACK cost ~40 ms per request
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: object) -> None:  # silence the per-request stderr log
        pass

    @property
    def hub(self) -> LocalHub:
        return self.server.hub  # type: ignore[attr-defined,no-any-return]

    def do_GET(self) -> None:  # all verbs go through one router
        self._dispatch(self.command)

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    # ------------------------------------------------------------------ plumbing
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
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: object = None, headers: dict[str, str] | None = None,
              content_length: int | None = None) -> None:
        if isinstance(body, (bytes, bytearray)):
            data, ctype = bytes(body), "application/octet-stream"
        else:
            data, ctype = (b"" if body is None else json.dumps(body).encode()), "application/json; charset=utf-8"
        self.send_response(status)
        headers = {"Content-Type": ctype, **(headers or {})}
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data) if content_length is None else content_length))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _dispatch(self, method: str) -> None:
        self.body = self._read_body()
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        self.hub.requests.append((method, url.path))
        segs = [unquote(s) for s in url.path.split("/")[1:]]
        try:
            self.auth_user = self._authenticate()
            if not self._route(method, segs):
                self.hub.unhandled.append(f"{method} {self.path}")
                raise HubError(404, f"Not Found: {method} {url.path}")
        except (KeyError, ValueError, TypeError) as err:  # malformed request body / parameters
            self._send_error(HubError(400, f"Bad request: {err!r}"))
        except HubError as err:
            self._send_error(err)
        except OSError:  # client went away
            self.close_connection = True
        except Exception as err:  # noqa: BLE001 - a bug in the server: answer 500 (the client retries some of those)
            self._send_error(HubError(500, f"LocalHub internal error: {err!r}"))

    def _send_error(self, err: HubError) -> None:
        headers = dict(err.headers)
        if err.code:
            headers["X-Error-Code"] = err.code
        headers["X-Error-Message"] = err.message.encode("ascii", "replace").decode()
        try:
            self._send(err.status, {"error": err.message}, headers)
        except OSError:
            self.close_connection = True

    def _authenticate(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if not auth.lower().startswith("bearer "):
            return None
        user = self.hub.tokens.get(auth[7:].strip())
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _json(self) -> dict:
        try:
            return json.loads(self.body or b"{}")
        except ValueError as err:
            raise HubError(400, f"Invalid JSON body: {err}") from err

    def _flag(self, name: str) -> bool:
        return self.query.get(name, ["false"])[-1] in _TRUE

    # --------------------------------------------------------------- access
    def _repo(self, repo_type: str, repo_id: str, *, write: bool = False, files: bool = False) -> Repo:
        user, hub = self.auth_user, self.hub
        repo = hub.store.get_repo(repo_type, repo_id)
        owner = hub.can_write(user, repo_id)
        if repo is None or (repo.private and not owner):
            if user is None:
                raise HubError(401, "Invalid username or password.", "RepoNotFound")
            raise HubError(404, "Repository not found", "RepoNotFound")
        if write and user is None:
            raise HubError(401, "You must be authenticated to access it.")
        if write and not owner:
            raise HubError(403, f"You don't have the rights to write to {repo_type}s/{repo_id}")
        if files and repo.gated and not owner and user not in repo.granted:
            if user is None:
                raise HubError(401, f"Access to {repo_type} {repo_id} is restricted. You must have access to it and"
                                    " be authenticated to access it. Please log in.", "GatedRepo")
            raise HubError(403, f"Access to {repo_type} {repo_id} is restricted and you are not in the authorized"
                                " list.", "GatedRepo")
        return repo

    def _repo_url(self, repo: Repo) -> str:
        return f"{self.hub.endpoint}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    # --------------------------------------------------------------- routing
    def _route(self, method: str, segs: list[str]) -> bool:
        if segs[:1] == ["api"]:
            return self._route_api(method, segs[1:])
        if segs[:1] == ["_lfs"] and len(segs) == 3:
            return self._lfs_transfer(method, segs[1], segs[2])
        repo_type = _PLURAL.get(segs[0], "model") if segs else "model"
        rest = segs[1:] if segs and segs[0] in ("datasets", "spaces") else segs
        if method == "POST" and len(rest) == 6 and rest[1].endswith(".git") and rest[2:] == [
                "info", "lfs", "objects", "batch"]:
            return self._lfs_batch(repo_type, f"{rest[0]}/{rest[1][:-4]}")
        if method in ("GET", "HEAD") and len(rest) >= 5 and rest[2] == "resolve":
            rev, path = split_revision(rest[3:])
            return self._resolve(repo_type, f"{rest[0]}/{rest[1]}", rev, "/".join(path))
        return False

    def _route_api(self, method: str, segs: list[str]) -> bool:
        hub, store = self.hub, self.hub.store
        if segs == ["whoami-v2"] and method == "GET":
            if self.auth_user is None:
                raise HubError(401, "Invalid username or password.")
            name, orgs = self.auth_user, [{"type": "org", "name": o} for o in hub.orgs.get(self.auth_user, ())]
            token = {"displayName": "local", "role": "write"}
            self._send(200, {"type": "user", "id": name, "name": name, "fullname": name, "orgs": orgs,
                             "auth": {"type": "access_token", "accessToken": token}})
            return True
        if segs == ["repos", "create"] and method == "POST":
            return self._create_repo()
        if segs == ["repos", "delete"] and method == "DELETE":
            body = self._json()
            repo_id = f"{body.get('organization') or self.auth_user}/{body['name']}"
            self._repo(body.get("type") or "model", repo_id, write=True)
            store.delete_repo(body.get("type") or "model", repo_id)
            self._send(200, {})
            return True
        if segs == ["validate-yaml"]:
            return self._validate_yaml()
        if segs[:1] == ["telemetry"]:
            self._send(200, {})
            return True
        if len(segs) < 3 or segs[0] not in _PLURAL:
            return False
        repo_type, repo_id, rest = _PLURAL[segs[0]], f"{segs[1]}/{segs[2]}", segs[3:]
        return self._route_repo_api(method, repo_type, repo_id, rest)

    def _route_repo_api(self, method: str, repo_type: str, repo_id: str, rest: list[str]) -> bool:
        store = self.hub.store
        action = rest[0] if rest else ""
        if method == "GET" and action in ("", "revision"):
            repo = self._repo(repo_type, repo_id)
            rev, _ = split_revision(rest[1:]) if action else ("main", [])
            self._send(200, info_json(repo, store.resolve(repo, rev), blobs=self._flag("blobs")))
        elif method == "GET" and action == "tree":
            repo = self._repo(repo_type, repo_id)
            rev, path = split_revision(rest[1:])
            commit = store.resolve(repo, rev)
            entries = store.tree(commit, "/".join(path), recursive=self._flag("recursive"))
            if self._flag("expand"):
                entries = [self._expand(repo, commit, e) for e in entries]
            self._send(200, entries)
        elif method == "POST" and action == "paths-info":
            repo = self._repo(repo_type, repo_id)
            commit = store.resolve(repo, split_revision(rest[1:])[0])
            form = self._form()
            infos = [info for p in form.get("paths", []) if (info := store.path_info(commit, p)) is not None]
            if str(form.get("expand", ["false"])[-1]) in _TRUE:
                infos = [self._expand(repo, commit, e) for e in infos]
            self._send(200, infos)
        elif method == "POST" and action == "preupload":
            repo = self._repo(repo_type, repo_id, write=True)
            commit = store.resolve(repo, split_revision(rest[1:])[0])
            self._send(200, preupload_json(store, commit, self._json().get("files", [])))
        elif method == "POST" and action == "commit":
            return self._commit(repo_type, repo_id, split_revision(rest[1:])[0])
        elif method == "GET" and action == "refs":
            repo = self._repo(repo_type, repo_id)
            self._send(200, refs_json(repo, include_prs=self._flag("include_prs")))
        elif method == "GET" and action == "commits":
            repo = self._repo(repo_type, repo_id)
            self._send(200, [commit_json(c) for c in store.history(repo, split_revision(rest[1:])[0])])
        elif action == "branch" and len(rest) >= 2 and method in ("POST", "DELETE"):
            repo = self._repo(repo_type, repo_id, write=True)
            branch = "/".join(rest[1:])
            if method == "POST":
                store.create_branch(repo, branch, self._json().get("startingPoint"))
            else:
                store.delete_branch(repo, branch)
            self._send(200, {})
        elif action == "tag" and len(rest) >= 2 and method in ("POST", "DELETE"):
            repo = self._repo(repo_type, repo_id, write=True)
            if method == "POST":
                store.create_tag(repo, split_revision(rest[1:])[0], self._json()["tag"])
            else:
                store.delete_tag(repo, "/".join(rest[1:]))
            self._send(200, {})
        elif method == "PUT" and action == "settings":
            repo = self._repo(repo_type, repo_id, write=True)
            body = self._json()
            private = body["visibility"] == "private" if "visibility" in body else body.get("private", repo.private)
            repo.private = bool(private)
            repo.gated = body.get("gated", repo.gated)
            self._send(200, {})
        else:
            return False
        return True

    def _form(self) -> dict[str, list[str]]:
        if self.headers.get("Content-Type", "").startswith("application/json"):
            body = self._json()
            paths = body.get("paths", [])
            return {"paths": paths if isinstance(paths, list) else [paths], "expand": [str(body.get("expand"))]}
        return parse_qs(self.body.decode(), keep_blank_values=True)

    def _expand(self, repo: Repo, commit: Commit, entry: dict) -> dict:
        last = self.hub.store.last_commit_for(repo, commit, entry["path"])
        return {**entry, "lastCommit": {"id": last.oid, "title": last.title, "date": last.date}}
