"""Endpoint handlers of `LocalHub` that create or change state: repo creation, commits, LFS transfers, downloads.

`HubEndpoints` is mixed into the server's request handler (`hub_server._Handler`), whose helpers it uses: `hub`,
`body`, `auth_user`, `_json`, `_flag`, `_repo`, `_repo_url` and `_send`.
"""

from __future__ import annotations

import json
import secrets
from urllib.parse import quote

import yaml
from hub_server_store import HubError
from huggingface_hub.repocard_data import model_index_to_eval_results

URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


def card_metadata_errors(content: str) -> list[str]:
    """What the Hub's card validation would refuse in a README's YAML header (a subset: structure and types).

    The header must be a YAML mapping between `---` lines; `tags`, `datasets` are lists of strings; `library_name`,
    `license`, `pipeline_tag` strings; `base_model` a string or list of strings; `model-index` parses into eval
    results, each with a task type, a dataset type and name, and numeric metric values.
    """
    if not content.startswith("---"):
        return ["the card has no YAML metadata header between '---' lines"]
    header = content.split("\n---", 1)[0][3:]
    try:
        meta = yaml.safe_load(header)
    except yaml.YAMLError as err:
        return [f"metadata is not valid YAML: {err}"]
    if not isinstance(meta, dict):
        return ["metadata must be a YAML mapping"]
    errors = []
    for key in ("tags", "datasets"):
        if key in meta and not (isinstance(meta[key], list) and all(isinstance(v, str) for v in meta[key])):
            errors.append(f'"{key}" must be a list of strings')
    for key in ("library_name", "license", "pipeline_tag"):
        if key in meta and not isinstance(meta[key], str):
            errors.append(f'"{key}" must be a string')
    base = meta.get("base_model")
    strings = isinstance(base, list) and all(isinstance(v, str) for v in base)
    if base is not None and not (isinstance(base, str) or strings):
        errors.append('"base_model" must be a string or a list of strings')
    if "model-index" in meta:
        try:
            _, results = model_index_to_eval_results(meta["model-index"])
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            return [*errors, f'"model-index" is malformed: {type(err).__name__}: {err}']
        for result in results:
            if not (result.task_type and result.dataset_type and result.dataset_name):
                errors.append('"model-index": every result needs task.type, dataset.type and dataset.name')
            if not isinstance(result.metric_value, (int, float)) or isinstance(result.metric_value, bool):
                errors.append(f'"model-index": metric {result.metric_type!r} has a non-numeric value '
                              f"{result.metric_value!r}")
    return errors


class HubEndpoints:
    """Handlers returning `True` once they have answered the request (`False`: not this endpoint)."""

    def _validate_yaml(self) -> bool:
        errors = card_metadata_errors(str(self._json().get("content", "")))
        if errors:
            self._send(400, "; ".join(errors).encode(), {"Content-Type": "text/plain"})
        else:
            self._send(200, {"errors": [], "warnings": []})
        return True

    def _create_repo(self) -> bool:
        if self.auth_user is None:
            raise HubError(401, "You must be authenticated to create a repo.")
        body = self._json()
        repo_type = body.get("type") or "model"
        if repo_type not in URL_PREFIX:
            raise HubError(400, f"Invalid repo type: {repo_type}")
        namespace = body.get("organization") or self.auth_user
        repo_id = f"{namespace}/{body['name']}"
        url = f"{self.hub.endpoint}/{URL_PREFIX[repo_type]}{repo_id}"
        if not self.hub.can_write(self.auth_user, repo_id):
            raise HubError(403, f"You don't have the rights to create a {repo_type} under the namespace {namespace}")
        private = body.get("visibility") == "private" or bool(body.get("private"))
        try:
            self.hub.store.create_repo(repo_type, repo_id, private, self.auth_user)
        except HubError as err:
            self._send(err.status, {"error": err.message, "url": url}, {"X-Error-Message": err.message})
            return True
        self._send(200, {"url": url, "name": repo_id, "id": repo_id})
        return True

    def _commit(self, repo_type: str, repo_id: str, revision: str) -> bool:
        repo = self._repo(repo_type, repo_id, write=True)
        lines = [json.loads(line) for line in self.body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first line of a commit payload must be its header")
        create_pr = self._flag("create_pr")
        commit, pr_num = self.hub.store.commit(repo, revision, lines[0]["value"], lines[1:],
                                               self.auth_user or "", create_pr=create_pr)
        pr_url = f"{self._repo_url(repo)}/discussions/{pr_num}" if pr_num is not None else None
        self._send(200, {"success": True, "commitOid": commit.oid, "commitUrl": f"{self._repo_url(repo)}/commit/"
                         f"{commit.oid}", "hookOutput": "", "pullRequestUrl": pr_url})
        return True

    def _lfs_batch(self, repo_type: str, repo_id: str) -> bool:
        self._repo(repo_type, repo_id, write=True)
        body = self._json()
        if body.get("operation") != "upload":
            raise HubError(400, "Only the upload operation is supported")
        objects = []
        for obj in body.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            out: dict = {"oid": oid, "size": size, "authenticated": True}
            if not self.hub.store.has_blob(oid):
                ticket = secrets.token_hex(16)
                self.hub.lfs_tickets[ticket] = (oid, size)
                out["actions"] = {"upload": {"href": f"{self.hub.endpoint}/_lfs/upload/{ticket}", "header": {}},
                                  "verify": {"href": f"{self.hub.endpoint}/_lfs/verify/{ticket}", "header": {}}}
            objects.append(out)
        self._send(200, {"transfer": "basic", "objects": objects},
                   {"Content-Type": "application/vnd.git-lfs+json"})
        return True

    def _lfs_transfer(self, method: str, kind: str, ticket: str) -> bool:
        if ticket not in self.hub.lfs_tickets:
            raise HubError(404, "Unknown LFS upload ticket")
        oid, size = self.hub.lfs_tickets[ticket]
        if kind == "upload" and method == "PUT":
            if len(self.body) != size or self.hub.store.put_blob(self.body) != oid:
                raise HubError(400, f"LFS upload does not match oid {oid} / size {size}")
        elif kind == "verify" and method == "POST":
            if not self.hub.store.has_blob(oid):
                raise HubError(404, f"LFS object {oid} was not uploaded")
        else:
            return False
        self._send(200, {})
        return True

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> bool:
        store = self.hub.store
        repo = self._repo(repo_type, repo_id, files=True)
        commit = store.resolve(repo, revision)
        entry = commit.files.get(path)
        if entry is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{entry.oid}"', "Accept-Ranges": "bytes",
                   "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}"}
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)})
        if self.command == "HEAD":
            self._send(200, b"", headers, content_length=entry.size)
            return True
        data = store.read_blob(entry.sha256)
        status, rng = 200, self.headers.get("Range", "")
        if rng.startswith("bytes="):
            start_s, _, end_s = rng[6:].split(",")[0].partition("-")
            start = int(start_s) if start_s else max(len(data) - int(end_s), 0)
            end = int(end_s) if start_s and end_s else len(data) - 1
            if start >= len(data):
                raise HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {start}-{min(end, len(data) - 1)}/{len(data)}"
            data, status = data[start:end + 1], 206
        self._send(status, data, headers)
        return True
