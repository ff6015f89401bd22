"""Pytest fixture `local_hub`: a fresh `LocalHub` with `huggingface_hub` (and transformers / datasets) pointed at it.

Use with `pytest_plugins = ["hub_fixtures"]` in tests/conftest.py (or `from hub_fixtures import local_hub`).

`huggingface_hub` reads HF_ENDPOINT, HF_HUB_OFFLINE, HF_HUB_DISABLE_XET, HF_HUB_CACHE and HF_TOKEN_PATH into module
constants at import, and several objects cache the endpoint (the module-level `HfApi` behind
`huggingface_hub.create_repo` & co, transformers' shared `hf_api()`, `datasets.config`). The fixture therefore sets
the environment variables (for subprocesses and late imports) *and* patches those constants and caches, all through
`monkeypatch`, so everything is restored when the test ends.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from hub_server import LocalHub


def _close_hf_session() -> None:
    """Drop pooled keep-alive connections (they may point at a server that is gone)."""
    from huggingface_hub.utils import _http

    _http.close_session()


# Modules that copy HF settings from the environment when first imported: import them *before* patching, so that
# a first import during a test cannot capture the local endpoint / online mode for the rest of the session.
_PREIMPORT = ("transformers.utils.hub", "datasets.config")


def point_hf_at(hub: LocalHub, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point `huggingface_hub`, transformers and datasets at `hub`, online, with `hub.token` and `cache_dir`."""
    import huggingface_hub.hf_api as hf_api_module
    from huggingface_hub import constants
    from huggingface_hub.utils import _cache_manager, _http

    for name in _PREIMPORT:
        try:
            importlib.import_module(name)
        except ImportError:
            pass

    endpoint = hub.endpoint
    token_path = cache_dir.parent / "hf-token"  # never written: no stored token leaks in from ~/.cache
    datasets_cache = cache_dir.parent / "hf-datasets-cache"  # load_dataset() writes Arrow files there
    env = {"HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": hub.token, "HF_HUB_CACHE": str(cache_dir),
           "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_TOKEN_PATH": str(token_path), "HF_DATASETS_CACHE": str(datasets_cache)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HUGGINGFACE_CO_STAGING", "HF_HUB_ENABLE_HF_TRANSFER"):
        monkeypatch.delenv(key, raising=False)

    host = urlsplit(endpoint).hostname or "127.0.0.1"
    for name, value in {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": frozenset(getattr(constants, "HF_URL_HOSTS", ())) | {host},
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_CACHE": str(cache_dir),
        "HUGGINGFACE_HUB_CACHE": str(cache_dir),
        "HF_TOKEN_PATH": str(token_path),
        "HF_STORED_TOKENS_PATH": str(cache_dir.parent / "hf-stored-tokens"),
        "HF_HUB_DISABLE_TELEMETRY": True,
    }.items():
        monkeypatch.setattr(constants, name, value, raising=False)
    if hasattr(_http, "_HUB_ORIGINS") and hasattr(_http, "_url_origin"):  # hosts that keep auth across redirects
        monkeypatch.setattr(_http, "_HUB_ORIGINS", _http._HUB_ORIGINS | {_http._url_origin(endpoint)})
    monkeypatch.setattr(_cache_manager, "HF_HUB_CACHE", str(cache_dir), raising=False)  # scan_cache_dir() default
    monkeypatch.setattr(hf_api_module.api, "endpoint", endpoint)  # behind huggingface_hub.create_repo(...) etc.

    if "transformers.utils.hub" in sys.modules:  # transformers caches one HfApi (and its endpoint) per process
        monkeypatch.setattr(sys.modules["transformers.utils.hub"], "_hf_api", None)
    if "datasets.config" in sys.modules:
        config = sys.modules["datasets.config"]
        monkeypatch.setattr(config, "HF_ENDPOINT", endpoint)
        monkeypatch.setattr(config, "HUB_DATASETS_URL", endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}")
        monkeypatch.setattr(config, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(config, "HF_DATASETS_OFFLINE", False)
        monkeypatch.setattr(config, "HF_DATASETS_CACHE", datasets_cache)
        monkeypatch.setattr(config, "DOWNLOADED_DATASETS_PATH", datasets_cache / config.DOWNLOADED_DATASETS_DIR)
        monkeypatch.setattr(config, "EXTRACTED_DATASETS_PATH",
                            datasets_cache / config.DOWNLOADED_DATASETS_DIR / config.EXTRACTED_DATASETS_DIR)


@contextmanager
def hub_offline() -> Iterator[None]:
    """Offline mode for the block, as HF_HUB_OFFLINE=1 gives it (constants, datasets.config, env for subprocesses)."""
    from huggingface_hub import constants

    config = sys.modules.get("datasets.config")
    saved = (constants.HF_HUB_OFFLINE, getattr(config, "HF_HUB_OFFLINE", None), os.environ.get("HF_HUB_OFFLINE"))
    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    if config is not None:
        config.HF_HUB_OFFLINE = config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved[0]
        if config is not None:
            config.HF_HUB_OFFLINE = config.HF_DATASETS_OFFLINE = saved[1]
        if saved[2] is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved[2]


@pytest.fixture()
def local_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalHub]:
    """A fresh, started LocalHub (`.endpoint`, `.token`, `.user`, `.cache_dir`) that the HF clients talk to."""
    hub = LocalHub(root=str(tmp_path / "hub-store")).start()
    cache_dir = tmp_path / "hf-cache"
    cache_dir.mkdir()
    hub.cache_dir = str(cache_dir)
    _close_hf_session()
    point_hf_at(hub, cache_dir, monkeypatch)
    try:
        yield hub
    finally:
        _close_hf_session()
        hub.stop()
