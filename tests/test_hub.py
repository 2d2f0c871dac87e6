"""Downloading released weights, tested against a local HTTP server on 127.0.0.1 (no internet needed)."""

import functools
import http.server
import socket
import threading

import pytest
import torch

from marlin import Marlin, get_config
from marlin.models import hub, registry


@pytest.fixture
def downloadable_tiny(monkeypatch):
    """A tiny variant registered as downloadable, removed again after the test."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    cfg = get_config("marlin_vit_tiny_test").replace(name="tiny_release")
    registry.register_model(cfg, downloadable=True)
    return cfg


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_from_online_downloads_once_into_the_cache(tmp_path, monkeypatch, server, downloadable_tiny):
    root, url = server
    src = Marlin(downloadable_tiny, as_feature_extractor=False).eval()
    src.export_official(root / "tiny_release.full.pt")
    src.export_official(root / "tiny_release.encoder.pt", full=False)
    monkeypatch.setenv(hub.URL_ENV, url)
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # nothing may be written relative to the working directory

    enc = Marlin.from_online("tiny_release")
    full = Marlin.from_online("tiny_release", full_model=True)
    assert enc.decoder is None and full.decoder is not None
    x = torch.rand(1, 3, 4, 32, 32)
    assert torch.equal(enc.extract_features(x), src.extract_features(x))
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert cached == ["tiny_release.encoder.pt", "tiny_release.full.pt"]
    assert not (tmp_path / ".marlin").exists()

    (root / "tiny_release.encoder.pt").unlink()  # a second call must use the cache, not the network
    assert torch.equal(Marlin.from_online("tiny_release").extract_features(x), enc.extract_features(x))
    Marlin.clean_cache(verbose=False)
    assert not (tmp_path / "cache").exists()


def test_offline_gives_a_clear_error_and_leaves_no_partial_file(tmp_path, monkeypatch, downloadable_tiny):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(hub.URL_ENV, f"http://127.0.0.1:{port}")
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(ConnectionError) as e:
        Marlin.from_online("tiny_release")
    msg = str(e.value)
    assert "\n" not in msg and "could not download" in msg and "place it at" in msg
    assert list((tmp_path / "cache").iterdir()) == []


def test_missing_file_on_server_and_non_downloadable(tmp_path, monkeypatch, server, downloadable_tiny):
    _, url = server
    monkeypatch.setenv(hub.URL_ENV, url)
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(ConnectionError, match="404"):
        Marlin.from_online("tiny_release")
    with pytest.raises(ValueError, match="has no released weights"):
        Marlin.from_online("marlin_vit_tiny_test")


def test_default_urls_are_the_official_release_urls(monkeypatch):
    monkeypatch.delenv(hub.URL_ENV, raising=False)
    assert hub.release_url("marlin_vit_base_ytf", full=True) == (
        "https://github.com/ControlNet/MARLIN/releases/download/model_v1/marlin_vit_base_ytf.full.pt"
    )
    assert hub.release_url("marlin_vit_small_ytf").endswith("/model_v1/marlin_vit_small_ytf.encoder.pt")
