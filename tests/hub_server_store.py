"""Storage for the local Hub test server: repos, commits (full file snapshots), refs and a blob store.

Blobs (file contents) live on disk under a temp folder, keyed by their sha256; everything else is in memory.
All public methods raise `HubError` carrying the HTTP status and the `X-Error-Code` the real Hub would send.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import itertools
import os
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

REPO_TYPES = ("model", "dataset", "space")
DEFAULT_LFS_PATTERNS = (
    "*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.npy", "*.npz",
    "*.parquet", "*.arrow", "*.zip", "*.gz", "*.tar", "*.pkl", "*.pickle", "*.joblib", "*.tflite",
)
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # the real Hub sends files over 10 MB to LFS whatever their name
_HEX40 = re.compile(r"[0-9a-f]{40}")
_SHORT_SHA = re.compile(r"[0-9a-f]{7,39}")


class HubError(Exception):
    """An HTTP error as the Hub would answer it (status, X-Error-Code, X-Error-Message)."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = headers or {}


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob (what the Hub reports as a file's `oid` / ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file committed in place of an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def now_iso() -> str:
    """Current UTC time in the Hub's `%Y-%m-%dT%H:%M:%S.%fZ` format (milliseconds)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True)
class FileEntry:
    """One file of a snapshot."""

    path: str
    size: int
    sha256: str  # content hash: key of the blob store, and the LFS oid
    lfs: bool
    oid: str  # git blob id: of the content for regular files, of the pointer for LFS files

    def to_json(self) -> dict:
        """Tree / paths-info entry."""
        out: dict = {"type": "file", "oid": self.oid, "size": self.size, "path": self.path}
        if self.lfs:
            out["lfs"] = {"oid": self.sha256, "size": self.size,
                          "pointerSize": len(lfs_pointer(self.sha256, self.size))}
        return out


@dataclass
class Commit:
    """A commit: full snapshot of the repo's files."""

    oid: str
    parent: str | None
    title: str
    message: str
    author: str
    date: str
    files: dict[str, FileEntry]


@dataclass
class Repo:
    """A repository with its history and refs."""

    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    gated: bool | str = False
    granted: set[str] = field(default_factory=set)
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # name (or refs/pr/N) -> commit oid
    tags: dict[str, str] = field(default_factory=dict)
    next_pr: int = 1

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]


class HubStore:
    """Thread-safe in-memory Hub state with an on-disk blob store."""

    def __init__(self, root: str, lfs_patterns: tuple[str, ...] = DEFAULT_LFS_PATTERNS):
        self.root = root
        self.blob_dir = os.path.join(root, "blobs")
        os.makedirs(self.blob_dir, exist_ok=True)
        self.lfs_patterns = lfs_patterns
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lock = threading.RLock()
        self._counter = 0

    # ---------------------------------------------------------------- blobs
    def blob_path(self, sha256: str) -> str:
        return os.path.join(self.blob_dir, sha256)

    def has_blob(self, sha256: str) -> bool:
        return os.path.exists(self.blob_path(sha256))

    def put_blob(self, data: bytes) -> str:
        """Store bytes; returns their sha256."""
        sha = hashlib.sha256(data).hexdigest()
        path = self.blob_path(sha)
        if not os.path.exists(path):
            tmp = f"{path}.{threading.get_ident()}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        return sha

    def read_blob(self, sha256: str) -> bytes:
        with open(self.blob_path(sha256), "rb") as f:
            return f.read()

    def make_entry(self, path: str, sha256: str, size: int, lfs: bool) -> FileEntry:
        oid = git_blob_sha1(lfs_pointer(sha256, size) if lfs else self.read_blob(sha256))
        return FileEntry(path=path, size=size, sha256=sha256, lfs=lfs, oid=oid)

    def upload_mode(self, path: str, size: int) -> str:
        """'lfs' or 'regular', as the preupload endpoint answers."""
        name = path.rsplit("/", 1)[-1]
        if size > LFS_SIZE_THRESHOLD or any(fnmatch.fnmatch(name, p) for p in self.lfs_patterns):
            return "lfs"
        return "regular"

    # ---------------------------------------------------------------- repos
    def get_repo(self, repo_type: str, repo_id: str) -> Repo | None:
        return self.repos.get((repo_type, repo_id))

    def create_repo(self, repo_type: str, repo_id: str, private: bool, author: str) -> Repo:
        """Create a repo with an initial commit holding `.gitattributes`, like the real Hub."""
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                raise HubError(409, f"You already created this {repo_type} repo")
            repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=now_iso())
            self.repos[(repo_type, repo_id)] = repo
            attrs = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in self.lfs_patterns).encode()
            sha = self.put_blob(attrs)
            files = {".gitattributes": self.make_entry(".gitattributes", sha, len(attrs), lfs=False)}
            self._add_commit(repo, "main", None, files, "initial commit", "", author)
            return repo

    def delete_repo(self, repo_type: str, repo_id: str) -> None:
        with self.lock:
            if self.repos.pop((repo_type, repo_id), None) is None:
                raise HubError(404, "Repository not found", "RepoNotFound")

    # ------------------------------------------------------------ revisions
    def resolve(self, repo: Repo, revision: str) -> Commit:
        """Branch, tag, full or short commit sha (or refs/heads/..., refs/tags/..., refs/pr/N) -> commit."""
        with self.lock:
            rev = revision
            if rev.startswith("refs/heads/"):
                rev = rev[len("refs/heads/"):]
            elif rev.startswith("refs/tags/"):
                oid = repo.tags.get(rev[len("refs/tags/"):])
                if oid is not None:
                    return repo.commits[oid]
            if rev in repo.branches:
                return repo.commits[repo.branches[rev]]
            if rev in repo.tags:
                return repo.commits[repo.tags[rev]]
            if _HEX40.fullmatch(rev) and rev in repo.commits:
                return repo.commits[rev]
            if _SHORT_SHA.fullmatch(rev):
                matches = [oid for oid in repo.commits if oid.startswith(rev)]
                if len(matches) == 1:
                    return repo.commits[matches[0]]
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def history(self, repo: Repo, revision: str) -> list[Commit]:
        """Commits reachable from `revision`, newest first."""
        with self.lock:
            commit: Commit | None = self.resolve(repo, revision)
            out = []
            while commit is not None:
                out.append(commit)
                commit = repo.commits.get(commit.parent) if commit.parent else None
            return out

    def last_commit_for(self, repo: Repo, head: Commit, path: str) -> Commit:
        """The newest commit (from `head`) that changed the file or folder `path`."""
        def state(c: Commit) -> tuple:
            return tuple(sorted((p, e.oid) for p, e in c.files.items() if p == path or p.startswith(path + "/")))
        commits = self.history(repo, head.oid)
        for newer, older in itertools.pairwise(commits):
            if state(newer) != state(older):
                return newer
        return commits[-1]

    def _add_commit(self, repo: Repo, branch: str, parent: str | None, files: dict[str, FileEntry],
                    title: str, description: str, author: str) -> Commit:
        self._counter += 1
        seed = f"{repo.repo_id}|{parent}|{title}|{time.time_ns()}|{self._counter}|{sorted(files)}"
        oid = hashlib.sha1(seed.encode()).hexdigest()
        commit = Commit(oid=oid, parent=parent, title=title, message=description, author=author,
                        date=now_iso(), files=files)
        repo.commits[oid] = commit
        repo.branches[branch] = oid
        return commit

    def commit(self, repo: Repo, revision: str, header: dict, ops: list[dict], author: str,
               create_pr: bool = False) -> tuple[Commit, int | None]:
        """Apply NDJSON commit operations on a branch (or a new PR branch). Returns (commit, pr number or None)."""
        with self.lock:
            if revision not in repo.branches:  # commits go to branches (or refs/pr/N) only
                if _HEX40.fullmatch(revision) or revision in repo.tags:
                    raise HubError(400, f"Invalid rev id: {revision} is not a branch")
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            head = repo.commits[repo.branches[revision]]
            parent_commit = header.get("parentCommit")
            if parent_commit and not head.oid.startswith(parent_commit):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(head.files)
            for op in ops:
                self._apply(files, op["key"], op["value"])
            pr_num = None
            branch = revision
            if create_pr:
                pr_num, repo.next_pr = repo.next_pr, repo.next_pr + 1
                branch = f"refs/pr/{pr_num}"
            commit = self._add_commit(repo, branch, head.oid, files, header.get("summary") or "Commit",
                                      header.get("description") or "", author)
            return commit, pr_num

    def _apply(self, files: dict[str, FileEntry], key: str, value: dict) -> None:
        path = value.get("path", "").strip("/")
        if not path and key != "deletedFolder":
            raise HubError(400, f"Missing path in {key} operation")
        if key == "file":
            if value.get("encoding", "base64") != "base64":
                raise HubError(400, "Only base64 encoding is supported")
            data = base64.b64decode(value["content"])
            files[path] = self.make_entry(path, self.put_blob(data), len(data), lfs=False)
        elif key == "lfsFile":
            oid = value["oid"]
            if not self.has_blob(oid):
                raise HubError(422, f"Your push was rejected because an LFS pointer pointed to a file that does not"
                                    f" exist: {oid} ({path})")
            size = os.path.getsize(self.blob_path(oid))
            if value.get("size") is not None and int(value["size"]) != size:
                raise HubError(422, f"LFS object size mismatch for {path}")
            files[path] = self.make_entry(path, oid, size, lfs=True)
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
        elif key == "deletedFolder":
            doomed = [p for p in files if not path or p.startswith(path + "/")]
            if not doomed:
                raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
            for p in doomed:
                del files[p]
        else:
            raise HubError(400, f"Unknown commit operation: {key}")

    # ----------------------------------------------------------------- refs
    def create_branch(self, repo: Repo, branch: str, starting_point: str | None) -> None:
        with self.lock:
            if branch in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            repo.branches[branch] = self.resolve(repo, starting_point or "main").oid

    def delete_branch(self, repo: Repo, branch: str) -> None:
        with self.lock:
            if branch == "main":
                raise HubError(403, "Cannot delete the default branch")
            if repo.branches.pop(branch, None) is None:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")

    def create_tag(self, repo: Repo, revision: str, tag: str) -> None:
        with self.lock:
            if tag in repo.tags:
                raise HubError(409, f"Reference already exists: refs/tags/{tag}")
            repo.tags[tag] = self.resolve(repo, revision).oid

    def delete_tag(self, repo: Repo, tag: str) -> None:
        with self.lock:
            if repo.tags.pop(tag, None) is None:
                raise HubError(404, f"Invalid rev id: {tag}", "RevisionNotFound")

    # ---------------------------------------------------------------- trees
    def tree(self, commit: Commit, path: str, recursive: bool) -> list[dict]:
        """Tree listing under `path` (files and folders), as `/tree` answers; 404 EntryNotFound if missing."""
        path = path.strip("/")
        prefix = f"{path}/" if path else ""
        under = [p for p in commit.files if p.startswith(prefix)]
        if path and not under:
            raise HubError(404, f"{path} does not exist on this revision", "EntryNotFound",
                           {"X-Repo-Commit": commit.oid})
        out: dict[str, dict] = {}
        for p in under:
            rest = p[len(prefix):].split("/")
            for depth in range(1, len(rest)):
                folder = prefix + "/".join(rest[:depth])
                if folder not in out:
                    out[folder] = self.folder_json(commit, folder)
                if not recursive:
                    break
            if len(rest) == 1 or recursive:
                out[p] = commit.files[p].to_json()
        return [out[k] for k in sorted(out, key=lambda k: (out[k]["type"] != "directory", k))]

    def folder_json(self, commit: Commit, folder: str) -> dict:
        content = "".join(f"{p}:{e.oid}\n" for p, e in sorted(commit.files.items()) if p.startswith(folder + "/"))
        return {"type": "directory", "oid": hashlib.sha1(content.encode()).hexdigest(), "size": 0, "path": folder}

    def path_info(self, commit: Commit, path: str) -> dict | None:
        """Entry for a file or folder path, or None."""
        path = path.strip("/")
        if path in commit.files:
            return commit.files[path].to_json()
        if path and any(p.startswith(path + "/") for p in commit.files):
            return self.folder_json(commit, path)
        return None


# ------------------------------------------------------------------ JSON bodies of the API answers
def commit_json(commit: Commit) -> dict:
    """One item of GET /api/{t}/{repo}/commits/{rev}."""
    return {"id": commit.oid, "title": commit.title, "message": commit.message, "date": commit.date,
            "authors": [{"user": commit.author}]}


def refs_json(repo: Repo, include_prs: bool) -> dict:
    """Body of GET /api/{t}/{repo}/refs."""
    def ref(name: str, kind: str, oid: str) -> dict:
        return {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": oid}
    out = {"branches": [ref(n, "heads", o) for n, o in repo.branches.items() if not n.startswith("refs/")],
           "converts": [], "tags": [ref(n, "tags", o) for n, o in repo.tags.items()]}
    if include_prs:
        out["pullRequests"] = [{"name": n, "ref": n, "targetCommit": o}
                               for n, o in repo.branches.items() if n.startswith("refs/pr/")]
    return out


def preupload_json(store: HubStore, commit: Commit, files: list[dict]) -> dict:
    """Body of POST /api/{t}/{repo}/preupload/{rev}: upload mode and current remote oid of each file."""
    out = []
    for f in files:
        existing = commit.files.get(f["path"])
        oid = None if existing is None else (existing.sha256 if existing.lfs else existing.oid)
        out.append({"path": f["path"], "uploadMode": store.upload_mode(f["path"], int(f.get("size", 0))),
                    "shouldIgnore": False, "oid": oid})
    return {"files": out, "commitOid": commit.oid}


def split_revision(segs: list[str]) -> tuple[str, list[str]]:
    """Split the (already quoted-as-one-segment) revision off the path segments; tolerates raw refs/pr/N."""
    if not segs:
        raise HubError(404, "Missing revision", "RevisionNotFound")
    if segs[0] == "refs" and len(segs) >= 3 and segs[1] in ("pr", "heads", "tags", "convert"):
        return "/".join(segs[:3]), segs[3:]
    return segs[0], segs[1:]


def info_json(repo: Repo, commit: Commit, blobs: bool) -> dict:
    """Body of GET /api/{t}/{repo}[/revision/{rev}]."""
    siblings = []
    for path, entry in sorted(commit.files.items()):
        sib: dict = {"rfilename": path}
        if blobs:
            sib.update(size=entry.size, blobId=entry.oid)
            if entry.lfs:
                sib["lfs"] = {"sha256": entry.sha256, "size": entry.size,
                              "pointerSize": len(lfs_pointer(entry.sha256, entry.size))}
        siblings.append(sib)
    out = {"_id": commit.oid[:24], "id": repo.repo_id, "author": repo.namespace, "sha": commit.oid,
           "lastModified": commit.date, "createdAt": repo.created_at, "private": repo.private,
           "gated": repo.gated, "disabled": False, "downloads": 0, "likes": 0, "tags": [],
           "siblings": siblings, "usedStorage": sum(e.size for e in commit.files.values())}
    if repo.repo_type == "space":
        out.update(sdk="static", runtime={"stage": "RUNNING", "hardware": {"current": None, "requested": None}})
    return out
