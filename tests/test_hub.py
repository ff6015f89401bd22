"""A real round trip with huggingface_hub against the local Hub server: push prompts, pull into an empty cache,
run the pipeline from the repo id, pin revisions, private repos, missing repos, offline cache, CLI push/pull."""

import numpy as np
import pytest
import torch
from helpers import random_image
from huggingface_hub import HfApi, ModelCard, get_session
from huggingface_hub.utils import hf_raise_for_status
from transformers import pipeline

from pole_hf import PolePromptModel
from pole_hf.cli import main
from pole_hf.hub import PoleEvalResult


@pytest.fixture()
def hub_base(local_hub, tiny_clip_dir):
    """The tiny CLIP uploaded as `<user>/tiny-clip`; returns (repo id, first commit sha)."""
    api = HfApi()
    repo = f"{local_hub.user}/tiny-clip"
    api.create_repo(repo)
    info = api.upload_folder(repo_id=repo, folder_path=tiny_clip_dir)
    return repo, info.oid


def fresh_cache(local_hub, tmp_path, monkeypatch, name):
    from hub_fixtures import point_hf_at

    cache = tmp_path / name
    cache.mkdir()
    point_hf_at(local_hub, cache, monkeypatch)
    return cache


def image():
    return random_image(5, 37, 45)


def test_push_pull_pipeline_round_trip(local_hub, hub_base, tmp_path, monkeypatch):
    base_repo, base_sha = hub_base
    model = PolePromptModel.from_clip(base_repo, revision=base_sha, class_names=["cat", "dog", "sofa"],
                                      class_words={"sofa": "couch"}, background_words=["sky", "grass"])
    with torch.no_grad():
        model.prompt_learner.class_tokens.add_(0.05)  # learned-looking tokens
    url = model.push_to_hub("prompts", eval_results=[PoleEvalResult("cam_miou", 42.5, "synthetic", "test")],
                            datasets=["synthetic"])
    repo = f"{local_hub.user}/prompts"
    assert repo in url
    files = set(HfApi().list_repo_files(repo))
    assert files == {".gitattributes", "config.json", "model.safetensors", "preprocessor_config.json",
                     "README.md"}  # no CLIP weights

    fresh_cache(local_hub, tmp_path, monkeypatch, "empty-cache")
    pipe = pipeline("pole-cam", model=repo)
    local = pipeline("pole-cam", model=model, image_processor=pipe.image_processor)
    remote_out, local_out = pipe(image(), labels=["cat", "sofa"]), local(image(), labels=["cat", "sofa"])
    np.testing.assert_allclose(remote_out["cams"], local_out["cams"], atol=1e-6)
    assert pipe.model.config.base_model_revision == base_sha

    card = ModelCard.load(repo)
    assert card.data.base_model == base_repo and card.data.library_name == "pole_hf"
    assert "weakly-supervised-semantic-segmentation" in card.data.tags
    assert card.data.eval_results[0].metric_value == 42.5
    # the Hub's own card validation (served by the local Hub); the request ModelCard.validate() makes, sent to the
    # configured endpoint: huggingface_hub 1.x's validate() posts to huggingface.co whatever the endpoint
    response = get_session().post(f"{local_hub.endpoint}/api/validate-yaml", headers={"Accept": "text/plain"},
                                  json={"repoType": "model", "content": str(card)})
    hf_raise_for_status(response)
    assert "| sofa | couch |" in card.text

    from hub_fixtures import hub_offline

    with hub_offline():  # the pulled repo and its base are served from the cache
        again = PolePromptModel.from_pretrained(repo)
        assert again.config.class_words == ["cat", "dog", "couch"]


def test_revisions_pin_prompts_and_base(local_hub, hub_base):
    base_repo, base_sha = hub_base
    model = PolePromptModel.from_clip(base_repo, revision=base_sha, class_names=["cat", "dog"],
                                      background_words=["sky"])
    model.push_to_hub("pinned")
    first = HfApi().model_info(f"{local_hub.user}/pinned").sha
    model.set_class_words({"cat": "kitty"})
    model.push_to_hub("pinned")
    HfApi().upload_file(repo_id=base_repo, path_or_fileobj=b"changed", path_in_repo="NOTES.md")
    old = PolePromptModel.from_pretrained(f"{local_hub.user}/pinned", revision=first)
    new = PolePromptModel.from_pretrained(f"{local_hub.user}/pinned")
    assert old.config.class_words == ["cat", "dog"] and new.config.class_words == ["kitty", "dog"]
    assert old.config.base_model_revision == base_sha


def test_private_repo_needs_a_token(local_hub, hub_base):
    base_repo, _ = hub_base
    model = PolePromptModel.from_clip(base_repo, class_names=["cat"], background_words=[])
    model.push_to_hub("secret", private=True)
    with pytest.raises(OSError, match="secret"):
        PolePromptModel.from_pretrained(f"{local_hub.user}/secret", token=False)
    assert PolePromptModel.from_pretrained(f"{local_hub.user}/secret").config.class_names == ["cat"]


def test_missing_repo_and_revision_are_clear(local_hub, hub_base):
    with pytest.raises(OSError, match="nobody/nothing"):
        PolePromptModel.from_pretrained("nobody/nothing")
    base_repo, _ = hub_base
    PolePromptModel.from_clip(base_repo, class_names=["cat"], background_words=[]).push_to_hub("exists")
    with pytest.raises(OSError, match="no-such-branch"):
        PolePromptModel.from_pretrained(f"{local_hub.user}/exists", revision="no-such-branch")


def test_cli_push_and_pull(local_hub, hub_base, tmp_path, monkeypatch, capsys):
    base_repo, _ = hub_base
    model = PolePromptModel.from_clip(base_repo, class_names=["cat", "dog"], background_words=["sky"])
    model.save_pretrained(tmp_path / "prompts")
    (tmp_path / "prompts" / "selection.json").write_text('{"candidates": {}, "template": "A photo of {}.", '
                                                         '"choices": []}')
    assert main(["--quiet", "push", str(tmp_path / "prompts"), "cli-prompts"]) == 0
    repo = f"{local_hub.user}/cli-prompts"
    assert "selection.json" in HfApi().list_repo_files(repo)
    fresh_cache(local_hub, tmp_path, monkeypatch, "pull-cache")
    assert main(["--quiet", "pull", repo]) == 0
    assert "2 classes on" in capsys.readouterr().out
    assert main(["--quiet", "pull", f"{local_hub.user}/missing"]) == 1


def test_cli_push_keeps_the_training_card(local_hub, hub_base, tmp_path):
    from pole_hf.hub import render_model_card

    base_repo, _ = hub_base
    model = PolePromptModel.from_clip(base_repo, class_names=["cat", "dog"], background_words=["sky"])
    model.save_pretrained(tmp_path / "prompts")
    card = render_model_card(model, datasets=["voc"], training={"loss weights (otm/btm/cbs)": "5/25/1"},
                             eval_results=[PoleEvalResult("cam_miou", 61.25, "voc", "val")])
    card.save(tmp_path / "prompts" / "README.md")
    assert main(["--quiet", "push", str(tmp_path / "prompts"), "carded"]) == 0
    pushed = ModelCard.load(f"{local_hub.user}/carded")
    assert pushed.data.eval_results[0].metric_value == 61.25 and pushed.data.datasets == ["voc"]
    assert "5/25/1" in pushed.content and "path/to/prompts" not in pushed.content and '"carded"' in pushed.content


class StallingServer:
    """Accepts connections and never answers: a Hub that hangs."""

    def __init__(self):
        import socket
        import threading

        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(8)
        self.endpoint = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.token, self.connections = "hf_stall", []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.connections.append(self.socket.accept()[0])
            except OSError:
                return


def test_push_to_a_stalling_hub_times_out_in_one_line(tiny_model, tmp_path, monkeypatch):
    import time

    from hub_fixtures import _close_hf_session, point_hf_at

    from pole_hf.hub import push_prompts_to_hub

    server = StallingServer()
    point_hf_at(server, tmp_path / "cache", monkeypatch)
    _close_hf_session()
    start = time.time()
    message = r"pushing to me/x: the Hub \(http://127.0.0.1:\d+\) did not answer within 1 s"
    with pytest.raises(TimeoutError, match=message):
        push_prompts_to_hub(tiny_model, "me/x", timeout=1)
    assert time.time() - start < 60
    server.socket.close()


def test_a_hub_base_is_pinned_to_the_commit_it_was_loaded_from(local_hub, hub_base, tmp_path):
    base_repo, sha = hub_base
    model = PolePromptModel.from_clip(base_repo, class_names=["cat", "dog"], background_words=["sky"])
    assert model.config.base_model_revision == sha
    HfApi().upload_file(path_or_fileobj=b"{}", path_in_repo="extra.json", repo_id=base_repo)  # the base moves on
    model.save_pretrained(tmp_path / "pinned")
    assert PolePromptModel.from_pretrained(tmp_path / "pinned").config.base_model_revision == sha
