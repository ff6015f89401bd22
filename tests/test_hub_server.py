"""Round trips of the real `huggingface_hub` / transformers clients against the local Hub server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hub_server import LocalHub
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.numpy import load_file, save_file

pytest_plugins = ["hub_fixtures"]  # the `local_hub` fixture (harmless if tests/conftest.py registers it too)


def _write_folder(folder: Path, value: int) -> Path:
    """A tiny prompt repo: a JSON config and a safetensors file whose content depends on `value`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"value": value}))
    save_file({"prompts": np.full((2, 4), value, dtype=np.float32)}, str(folder / "prompts.safetensors"))
    return folder


def _upload(api: HfApi, repo_id: str, folder: Path, message: str = "upload") -> str:
    return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=message).oid


def test_whoami_and_create_repo(local_hub: LocalHub) -> None:
    api = HfApi()
    assert api.endpoint == local_hub.endpoint
    assert api.whoami()["name"] == local_hub.user
    url = api.create_repo("prompts")
    assert url.repo_id == f"{local_hub.user}/prompts" and url.endpoint == local_hub.endpoint
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("prompts")
    assert err.value.response.status_code == 409
    assert api.create_repo(f"{local_hub.user}/prompts", exist_ok=True).repo_id == url.repo_id
    # a fresh repo has the Hub's initial commit with .gitattributes
    assert api.list_repo_files(url.repo_id) == [".gitattributes"]
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("someone-else/prompts")
    assert err.value.response.status_code == 403


def test_upload_folder_lfs_then_snapshot_download_online_and_offline(local_hub: LocalHub, tmp_path: Path) -> None:
    from hub_fixtures import (
        hub_offline,  # imported here: pytest_plugins must import hub_fixtures first (rewrite)
    )

    api = HfApi()
    repo_id = api.create_repo("tiny-prompts").repo_id
    folder = _write_folder(tmp_path / "src", value=1)
    sha = _upload(api, repo_id, folder)

    assert ("PUT", next(p for m, p in local_hub.requests if p.startswith("/_lfs/upload/"))) in local_hub.requests
    siblings = {s.rfilename: s for s in api.model_info(repo_id, files_metadata=True).siblings}
    assert siblings["prompts.safetensors"].lfs is not None and siblings["config.json"].lfs is None
    assert siblings["prompts.safetensors"].lfs.size == (folder / "prompts.safetensors").stat().st_size

    path = snapshot_download(repo_id)
    assert Path(path).name == sha and Path(local_hub.cache_dir) in Path(path).parents
    assert json.loads((Path(path) / "config.json").read_text()) == {"value": 1}
    assert (load_file(str(Path(path) / "prompts.safetensors"))["prompts"] == 1).all()

    n_requests = len(local_hub.requests)
    with hub_offline():
        assert snapshot_download(repo_id) == path
        assert hf_hub_download(repo_id, "config.json") == str(Path(path) / "config.json")
        with pytest.raises(LocalEntryNotFoundError):
            snapshot_download(f"{local_hub.user}/never-downloaded")
    assert len(local_hub.requests) == n_requests  # served from the cache only


def test_pinned_revision_returns_old_content(local_hub: LocalHub, tmp_path: Path) -> None:
    api = HfApi()
    repo_id = api.create_repo("pinned").repo_id
    first = _upload(api, repo_id, _write_folder(tmp_path / "v1", 1), "v1")
    second = _upload(api, repo_id, _write_folder(tmp_path / "v2", 2), "v2")
    assert first != second and len(first) == 40

    assert json.loads(Path(hf_hub_download(repo_id, "config.json", revision=first)).read_text()) == {"value": 1}
    assert json.loads(Path(hf_hub_download(repo_id, "config.json")).read_text()) == {"value": 2}
    old = load_file(hf_hub_download(repo_id, "prompts.safetensors", revision=first))["prompts"]
    assert (old == 1).all()
    assert api.model_info(repo_id).sha == second
    assert api.model_info(repo_id, revision=first).sha == first
    assert [c.commit_id for c in api.list_repo_commits(repo_id)][:2] == [second, first]

    api.create_tag(repo_id, tag="v1", revision=first)
    api.create_branch(repo_id, branch="stable", revision=first)
    refs = api.list_repo_refs(repo_id)
    assert {b.name: b.target_commit for b in refs.branches} == {"main": second, "stable": first}
    assert [(t.name, t.target_commit) for t in refs.tags] == [("v1", first)]
    assert json.loads(Path(hf_hub_download(repo_id, "config.json", revision="v1")).read_text()) == {"value": 1}


def test_private_repo_needs_the_token(local_hub: LocalHub, tmp_path: Path) -> None:
    api = HfApi()
    repo_id = api.create_repo("secret", private=True).repo_id
    _upload(api, repo_id, _write_folder(tmp_path / "src", 3))
    assert api.model_info(repo_id).private is True

    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(repo_id, "config.json", token=False)
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=False).model_info(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download(repo_id, token=False)
    other = local_hub.add_user("other")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(repo_id, "config.json", token=other)
    with pytest.raises(HfHubHTTPError) as err:
        hf_hub_download(repo_id, "config.json", token="hf_not_a_real_token")
    assert err.value.response.status_code == 401

    path = hf_hub_download(repo_id, "config.json", token=local_hub.token)
    assert json.loads(Path(path).read_text()) == {"value": 3}


def test_missing_repo_revision_file_and_gated(local_hub: LocalHub, tmp_path: Path) -> None:
    api = HfApi()
    repo_id = api.create_repo("errors").repo_id
    _upload(api, repo_id, _write_folder(tmp_path / "src", 4))

    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(f"{local_hub.user}/missing", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(f"{local_hub.user}/missing")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "config.json", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(repo_id, revision="0" * 40)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "missing.json")
    assert not api.file_exists(repo_id, "missing.json") and api.file_exists(repo_id, "config.json")

    local_hub.set_gated(repo_id, granted=("friend",))
    friend = local_hub.add_user("friend")
    with pytest.raises(GatedRepoError):
        hf_hub_download(repo_id, "config.json", token=local_hub.add_user("stranger"))
    assert json.loads(Path(hf_hub_download(repo_id, "config.json", token=friend)).read_text()) == {"value": 4}


def test_commit_delete_and_module_level_helpers(local_hub: LocalHub, tmp_path: Path) -> None:
    import huggingface_hub

    repo_id = huggingface_hub.create_repo("helpers").repo_id  # the module-level HfApi singleton
    huggingface_hub.upload_file(path_or_fileobj=b'{"a": 1}', path_in_repo="sub/a.json", repo_id=repo_id)
    tree = {e.path for e in HfApi().list_repo_tree(repo_id, recursive=True)}
    assert tree == {".gitattributes", "sub", "sub/a.json"}
    assert [e.path for e in HfApi().get_paths_info(repo_id, ["sub/a.json", "nope"])] == ["sub/a.json"]
    huggingface_hub.delete_file("sub/a.json", repo_id=repo_id)
    assert HfApi().list_repo_files(repo_id) == [".gitattributes"]


def test_subprocesses_online_then_offline_from_cache(local_hub: LocalHub, tmp_path: Path) -> None:
    """A child process finds the hub through HF_ENDPOINT/HF_TOKEN; hub stopped, HF_HUB_OFFLINE=1 uses the cache."""
    api = HfApi()
    repo_id = api.create_repo("subproc").repo_id
    _upload(api, repo_id, _write_folder(tmp_path / "src", 5))
    code = (f"import json, os, huggingface_hub as h; p = h.snapshot_download({repo_id!r}); "
            "print(p, json.load(open(os.path.join(p, 'config.json')))['value'])")

    def run(**env: str) -> list[str]:
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                             timeout=120, check=False)
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    online = run()
    assert online[1] == "5" and Path(local_hub.cache_dir) in Path(online[0]).parents
    local_hub.stop()
    assert run(HF_HUB_OFFLINE="1") == online


def test_transformers_config_push_to_hub_round_trip(local_hub: LocalHub) -> None:
    from transformers import CLIPConfig

    config = CLIPConfig(projection_dim=48)
    config.push_to_hub("clip-config")
    repo_id = f"{local_hub.user}/clip-config"
    files = set(HfApi().list_repo_files(repo_id))
    assert {"config.json", "README.md"} <= files
    loaded = CLIPConfig.from_pretrained(repo_id)
    assert loaded.projection_dim == 48
    assert loaded.text_config.hidden_size == config.text_config.hidden_size


def test_datasets_push_to_hub_and_load_dataset(local_hub: LocalHub) -> None:
    from datasets import Dataset, load_dataset

    repo_id = f"{local_hub.user}/tiny-ds"
    Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 1, 0]}).push_to_hub(repo_id)
    files = HfApi().list_repo_files(repo_id, repo_type="dataset")
    assert "README.md" in files and "data/train-00000-of-00001.parquet" in files
    back = load_dataset(repo_id, split="train")
    assert back.to_dict() == {"text": ["a", "b", "c"], "label": [0, 1, 0]}
    assert all(Path(local_hub.cache_dir).parent in Path(f["filename"]).parents for f in back.cache_files)


GOOD_CARD = """---
library_name: pole_hf
tags: [pole, weakly-supervised-semantic-segmentation]
base_model: openai/clip-vit-base-patch16
model-index:
- name: prompts
  results:
  - task: {type: image-segmentation, name: Weakly supervised semantic segmentation}
    dataset: {type: synthetic, name: synthetic, split: test}
    metrics:
    - {type: cam_miou, value: 75.2, name: CAM mIoU}
---
# prompts
"""


@pytest.mark.parametrize("card, message", [
    (GOOD_CARD, None),
    ("# no metadata\n", "no YAML metadata header"),
    (GOOD_CARD.replace("tags: [pole, weakly-supervised-semantic-segmentation]", "tags: pole"),
     '"tags" must be a list of strings'),
    (GOOD_CARD.replace("value: 75.2", "value: high"), "non-numeric value 'high'"),
    (GOOD_CARD.replace("    dataset: {type: synthetic, name: synthetic, split: test}\n", ""),
     '"model-index" is malformed'),
])
def test_card_validation_refuses_bad_metadata(local_hub: LocalHub, card: str, message: str | None) -> None:
    from huggingface_hub import get_session

    response = get_session().post(f"{local_hub.endpoint}/api/validate-yaml", headers={"Accept": "text/plain"},
                                  json={"repoType": "model", "content": card})
    if message is None:
        assert response.status_code == 200, response.text
    else:
        assert response.status_code == 400 and message in response.text, response.text
