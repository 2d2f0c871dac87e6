"""Where weights come from, tested against local HTTP servers on 127.0.0.1 (never the internet): the GitHub release
download cache, and the Hugging Face Hub (a file-backed stand-in for its HTTP API, selected through HF_ENDPOINT)."""

import base64
import functools
import hashlib
import http.server
import json
import re
import shutil
import socket
import threading
import urllib.parse
from pathlib import Path

import pytest
import torch

import marlin
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


# ---- Hugging Face Hub: a file-backed stand-in for the Hub's HTTP API on 127.0.0.1 -----------------------------------
# It serves what huggingface_hub asks for: `HEAD/GET /{repo}/resolve/{revision}/{file}` (with the X-Repo-Commit / ETag
# headers the client requires), and for uploads `POST /api/repos/create`, `/api/models/{repo}/preupload/{rev}` (every
# file answered "regular", so the content travels base64 inside the NDJSON commit), `/api/models/{repo}/commit/{rev}`,
# `/api/models/{repo}/branch/{name}` and `/api/validate-yaml`. Every commit is a folder on disk.


class FakeHub:
    """Repositories under `root/<owner>/<name>/`: `commits/<sha>/<files>` and `refs.json` (branch -> commit)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for assertions
        self.write_token: str | None = None  # when set, writes need "Authorization: Bearer <it>"

    def _repo(self, repo_id: str) -> Path:
        return self.root / repo_id

    def refs(self, repo_id: str) -> dict[str, str]:
        f = self._repo(repo_id) / "refs.json"
        return json.loads(f.read_text()) if f.is_file() else {}

    def create(self, repo_id: str) -> None:
        if not self._repo(repo_id).is_dir():
            (self._repo(repo_id) / "commits").mkdir(parents=True)
            self._set_ref(repo_id, "main", None)

    def _set_ref(self, repo_id: str, branch: str, sha: str | None) -> None:
        refs = {**self.refs(repo_id), branch: sha}
        (self._repo(repo_id) / "refs.json").write_text(json.dumps(refs))

    def commit(self, repo_id: str, files: dict[str, bytes], branch: str = "main") -> str:
        """A new commit on `branch`: the parent's files plus `files`; returns its 40-hex id."""
        self.create(repo_id)
        parent = self.refs(repo_id).get(branch)
        digest = hashlib.sha1(f"{repo_id}|{parent}|{len(list((self._repo(repo_id) / 'commits').iterdir()))}".encode())
        for name in sorted(files):
            digest.update(name.encode() + hashlib.sha256(files[name]).digest())
        sha = digest.hexdigest()
        folder = self._repo(repo_id) / "commits" / sha
        if parent:
            shutil.copytree(self._repo(repo_id) / "commits" / parent, folder)
        for name, data in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
        self._set_ref(repo_id, branch, sha)
        return sha

    def commit_folder(self, repo_id: str, folder: Path, branch: str = "main") -> str:
        files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        return self.commit(repo_id, files, branch)

    def files(self, repo_id: str, revision: str = "main") -> list[str]:
        folder = self._repo(repo_id) / "commits" / self.refs(repo_id).get(revision, revision)
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())

    def resolve(self, repo_id: str, revision: str) -> str | None:
        if re.fullmatch(r"[0-9a-f]{40}", revision) and (self._repo(repo_id) / "commits" / revision).is_dir():
            return revision
        return self.refs(repo_id).get(revision)


def _hub_handler(hub: FakeHub):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def _send(self, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
            self.send_response(code)
            for k, v in {"Content-Length": str(len(body)), **(headers or {})}.items():
                self.send_header(k, v)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, obj: object, code: int = 200) -> None:
            self._send(code, json.dumps(obj).encode(), {"Content-Type": "application/json"})

        def _error(self, code: int, error_code: str, head: bool = False, commit: str | None = None) -> None:
            headers = {"X-Error-Code": error_code, "X-Error-Message": error_code}
            if commit:
                headers["X-Repo-Commit"] = commit
            self._send(code, b"" if head else json.dumps({"error": error_code}).encode(), headers, head)

        def _resolve(self, head: bool) -> None:
            repo_part, _, rest = self.path.split("?")[0].lstrip("/").partition("/resolve/")
            revision, _, filename = rest.partition("/")
            repo_id, revision = urllib.parse.unquote(repo_part), urllib.parse.unquote(revision)
            filename = urllib.parse.unquote(filename)
            if not (hub.root / repo_id / "refs.json").is_file():
                return self._error(404, "RepoNotFound", head)
            sha = hub.resolve(repo_id, revision)
            if sha is None:
                return self._error(404, "RevisionNotFound", head)
            f = hub.root / repo_id / "commits" / sha / filename
            if not f.is_file():
                return self._error(404, "EntryNotFound", head, commit=sha)
            data = f.read_bytes()
            etag = f'"{hashlib.sha256(data).hexdigest()}"'
            self._send(200, data, {"X-Repo-Commit": sha, "ETag": etag}, head)

        def do_HEAD(self) -> None:  # noqa: N802
            hub.requests.append(("HEAD", self.path))
            self._resolve(head=True)

        def do_GET(self) -> None:  # noqa: N802
            hub.requests.append(("GET", self.path))
            if "/resolve/" in self.path:
                return self._resolve(head=False)
            self._error(404, "NotServed")

        def do_POST(self) -> None:  # noqa: N802
            hub.requests.append(("POST", self.path))
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            path = urllib.parse.unquote(self.path.split("?")[0])
            if hub.write_token and self.headers.get("Authorization") != f"Bearer {hub.write_token}":
                return self._error(401, "Unauthorized")
            if path == "/api/repos/create":
                d = json.loads(body)
                repo_id = f"{d['organization']}/{d['name']}"
                hub.create(repo_id)
                return self._json({"url": f"http://{self.headers['Host']}/{repo_id}"})
            if path == "/api/validate-yaml":
                return self._json({})
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit|branch)/(.+)", path)
            if not m:
                return self._error(404, "NotServed")
            repo_id, action, rev = m.groups()
            if action == "preupload":
                files = json.loads(body)["files"]
                return self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                             for f in files]})  # fmt: skip
            if action == "branch":
                if rev in hub.refs(repo_id):
                    return self._error(409, "BranchExists")
                hub._set_ref(repo_id, rev, hub.refs(repo_id).get("main"))
                return self._json({})
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            files = {x["value"]["path"]: base64.b64decode(x["value"]["content"]) for x in lines if x["key"] == "file"}
            sha = hub.commit(repo_id, files, branch=rev)
            host = self.headers["Host"]
            return self._json({"commitOid": sha, "commitUrl": f"http://{host}/{repo_id}/commit/{sha}"})

    return Handler


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A FakeHub served on 127.0.0.1, selected through HF_ENDPOINT; the hub cache in tmp_path, no token."""
    pytest.importorskip("huggingface_hub")
    hub = FakeHub(tmp_path / "hub-server")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _hub_handler(hub))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    hub.url = url
    yield hub
    httpd.shutdown()
    httpd.server_close()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _saved(tmp_path: Path, model: Marlin, name: str) -> Path:
    return model.save_pretrained(tmp_path / name)


X_TINY = torch.rand(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(1))


def _feats(model: Marlin) -> torch.Tensor:
    return model.extract_features(X_TINY, keep_seq=True)


def test_hf_round_trip_save_pretrained_served_from_pretrained(tmp_path, fake_hub, tiny_config):
    src = Marlin(tiny_config).eval()
    sha = fake_hub.commit_folder("alice/tiny", _saved(tmp_path, src, "saved"))

    model = marlin.load("hf://alice/tiny")
    assert torch.equal(_feats(model), _feats(src))
    assert model.config == src.config and model.decoder is None
    assert model.load_report.path == f"hf://alice/tiny@{sha}"  # the exact commit that was loaded
    snapshot = tmp_path / "hf-cache" / "models--alice--tiny" / "snapshots" / sha
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json", "model.safetensors"]  # the hub's own cache

    again = Marlin.from_pretrained("alice/tiny")  # the bare repo id works too
    assert torch.equal(_feats(again), _feats(src))
    enc = marlin.models.model.from_spec("hf://alice/tiny")  # what every `marlin COMMAND MODEL` accepts
    assert torch.equal(_feats(enc), _feats(src))


def test_hf_full_model_round_trip(tmp_path, fake_hub, tiny_config):
    src = Marlin(tiny_config, as_feature_extractor=False).eval()
    fake_hub.commit_folder("alice/full", _saved(tmp_path, src, "full"))
    full = Marlin.from_pretrained("alice/full")
    assert full.full and torch.equal(full.state_dict()["decoder.norm.weight"], src.state_dict()["decoder.norm.weight"])
    assert Marlin.from_pretrained("alice/full", full=False).decoder is None


def test_hf_revision_pinning_picks_the_right_commit(tmp_path, fake_hub, tiny_config):
    a, b, c = (Marlin(tiny_config).eval() for _ in range(3))
    sha_a = fake_hub.commit_folder("alice/tiny", _saved(tmp_path, a, "a"))
    sha_b = fake_hub.commit_folder("alice/tiny", _saved(tmp_path, b, "b"))
    fake_hub._set_ref("alice/tiny", "v1", sha_a)  # a tag-like ref pointing at the first commit
    fake_hub.commit_folder("alice/tiny", _saved(tmp_path, c, "c"), branch="dev")  # a branch of its own
    assert not torch.equal(_feats(a), _feats(b))

    assert torch.equal(_feats(marlin.load("hf://alice/tiny")), _feats(b))  # main = the latest commit
    assert torch.equal(_feats(marlin.load(f"hf://alice/tiny@{sha_a}")), _feats(a))
    assert torch.equal(_feats(Marlin.from_pretrained("alice/tiny", revision=sha_a)), _feats(a))
    assert torch.equal(_feats(Marlin.from_pretrained("hf://alice/tiny@v1")), _feats(a))
    assert torch.equal(_feats(Marlin.from_pretrained("alice/tiny", revision="dev")), _feats(c))
    assert torch.equal(_feats(Marlin.from_pretrained("alice/tiny", revision=sha_b)), _feats(b))

    with pytest.raises(ValueError) as e:
        Marlin.from_pretrained("alice/tiny", revision="nope")
    assert "\n" not in str(e.value) and "no revision 'nope'" in str(e.value)
    with pytest.raises(ValueError, match="contradicts"):
        Marlin.from_pretrained(f"hf://alice/tiny@{sha_a}", revision="dev")


# The config.json of https://huggingface.co/ControlNet/marlin_vit_small_ytf (written by the transformers remote-code
# wrapper `MarlinModel`; its model.safetensors holds the encoder with a `marlin.` key prefix).
OFFICIAL_SMALL_CONFIG = {
    "architectures": ["MarlinModel"], "as_feature_extractor": True, "attn_drop_rate": 0.0,
    "auto_map": {"AutoConfig": "config.MarlinConfig", "AutoModel": "marlin.MarlinModel"},
    "decoder_depth": 4, "decoder_embed_dim": 192, "decoder_num_heads": 3, "drop_rate": 0.0, "encoder_depth": 12,
    "encoder_embed_dim": 384, "encoder_num_heads": 6, "img_size": 224, "init_values": 0.0, "mlp_ratio": 4.0,
    "model_type": "marlin", "n_frames": 16, "norm_layer": "LayerNorm", "patch_size": 16, "qk_scale": None,
    "qkv_bias": True, "torch_dtype": "float32", "transformers_version": "4.50.3", "tubelet_size": 2,
}  # fmt: skip


def test_official_transformers_config_maps_to_the_released_variant():
    cfg = hub.config_from_hub_json(OFFICIAL_SMALL_CONFIG, "marlin_vit_small_ytf", "config.json")
    assert cfg == get_config("marlin_vit_small_ytf")  # every size field equal (and the name)
    bad = {**OFFICIAL_SMALL_CONFIG, "init_values": 0.1}
    with pytest.raises(ValueError, match="init_values"):
        hub.config_from_hub_json(bad, "x", "config.json")
    with pytest.raises(ValueError, match="not a MARLIN config.json \\(model_type 'bert'\\)"):
        hub.config_from_hub_json({"model_type": "bert", "hidden_size": 768}, "x", "config.json")


def test_official_hf_repository_layout_loads(tmp_path, fake_hub, tiny_config):
    """A repository shaped like ControlNet/marlin_vit_*_ytf, at toy size: transformers config, `marlin.`-prefixed
    encoder-only safetensors, remote-code .py files (never fetched)."""
    from safetensors.torch import save_file

    src = Marlin(tiny_config).eval()
    c = tiny_config
    config = {**OFFICIAL_SMALL_CONFIG, "img_size": c.img_size, "patch_size": c.patch_size, "n_frames": c.clip_frames,
              "encoder_embed_dim": c.encoder_embed_dim, "encoder_depth": c.encoder_depth,
              "encoder_num_heads": c.encoder_num_heads, "decoder_embed_dim": c.decoder_embed_dim,
              "decoder_depth": c.decoder_depth, "decoder_num_heads": c.decoder_num_heads}  # fmt: skip
    sd = {f"marlin.{k}": v.contiguous() for k, v in src.state_dict().items()}
    save_file(sd, tmp_path / "w.safetensors", metadata={"format": "pt"})
    files = {"config.json": json.dumps(config).encode(), "model.safetensors": (tmp_path / "w.safetensors").read_bytes(),
             "marlin.py": b"raise SystemExit('remote code must never run')\n", "README.md": b"card\n"}  # fmt: skip
    fake_hub.commit("ControlNet/marlin_vit_tiny_ytf", files)

    model = Marlin.from_pretrained("ControlNet/marlin_vit_tiny_ytf")
    assert torch.equal(_feats(model), _feats(src))
    assert model.config.name == "marlin_vit_tiny_ytf" and model.config.encoder_embed_dim == c.encoder_embed_dim
    assert model.load_report.format == "hf" and model.decoder is None
    fetched = {p.rsplit("/", 1)[-1] for m, p in fake_hub.requests if "/resolve/" in p}
    assert fetched == {"config.json", "model.safetensors"}


def test_hf_single_file_in_a_repository_of_checkpoints(tmp_path, fake_hub, tiny_config):
    """Like the ControlNet/MARLIN repository of official `.pt` files: name the file after the repository."""
    src = Marlin(tiny_config, as_feature_extractor=False).eval()
    src.export_official(tmp_path / "x.full.pt")
    src.export_official(tmp_path / "x.encoder.pt", full=False)
    fake_hub.commit("ctl/MARLIN", {n: (tmp_path / n).read_bytes() for n in ("x.full.pt", "x.encoder.pt")})

    enc = marlin.load("hf://ctl/MARLIN/x.encoder.pt")
    assert enc.decoder is None and torch.equal(_feats(enc), _feats(src))
    assert Marlin.from_pretrained("ctl/MARLIN", filename="x.full.pt").full
    with pytest.raises(ValueError) as e:
        marlin.load("hf://ctl/MARLIN")  # no config.json / model.safetensors: say how to name a file
    assert "\n" not in str(e.value) and "hf://ctl/MARLIN/FILE.pt" in str(e.value)
    with pytest.raises(ValueError, match="no file 'y.pt'"):
        marlin.load("hf://ctl/MARLIN/y.pt")


def test_hf_offline_and_unreachable_give_one_line_and_use_the_cache(tmp_path, fake_hub, monkeypatch, tiny_config):
    import huggingface_hub.utils._http as hf_http

    # with nothing cached, huggingface_hub retries an unreachable hub with backoff (~25 s) before giving up: skip waits
    monkeypatch.setattr(hf_http.time, "sleep", lambda seconds: None)
    src = Marlin(tiny_config).eval()
    fake_hub.commit_folder("alice/tiny", _saved(tmp_path, src, "saved"))

    monkeypatch.setenv("HF_ENDPOINT", _closed_port_url())  # nothing cached yet, hub unreachable
    with pytest.raises(OSError) as e:
        marlin.load("hf://alice/tiny")
    msg = str(e.value)
    assert "\n" not in msg and "hf://alice/tiny" in msg and "could not be reached" in msg
    assert "HF_HUB_OFFLINE" in msg and str(tmp_path / "hf-cache") in msg
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="HF_HUB_OFFLINE / local_files_only is set"):
        marlin.load("hf://alice/tiny")

    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    online = _feats(marlin.load("hf://alice/tiny"))  # cached now
    n_requests = len(fake_hub.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert torch.equal(_feats(marlin.load("hf://alice/tiny")), online)
    assert len(fake_hub.requests) == n_requests  # offline mode sent nothing
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", _closed_port_url())  # online mode, hub gone: the cached commit still loads
    assert torch.equal(_feats(marlin.load("hf://alice/tiny")), online)


def test_hf_unknown_repo_and_bad_specs(fake_hub):
    with pytest.raises(ValueError) as e:
        marlin.load("hf://alice/missing")
    assert "\n" not in str(e.value) and "repository alice/missing not found" in str(e.value)
    for spec in ("hf://alice", "hf://alice/", "hf://alice/tiny@", "hf:///abs/path", "hf://a/b//c"):
        with pytest.raises(ValueError, match="expected \\[hf://\\]OWNER/NAME"):
            marlin.load(spec)
    with pytest.raises(ValueError, match="not an existing path"):
        Marlin.from_pretrained("./no/such/dir")


def test_push_to_hub_then_from_pretrained(tmp_path, fake_hub, tiny_config):
    a, b = Marlin(tiny_config).eval(), Marlin(tiny_config, as_feature_extractor=False).eval()
    sha_a = a.push_to_hub("alice/pushed")
    assert fake_hub.files("alice/pushed") == ["README.md", "config.json", "model.safetensors"]
    assert (
        'marlin.load("hf://alice/pushed")' in (fake_hub.root / "alice/pushed/commits" / sha_a / "README.md").read_text()
    )
    assert torch.equal(_feats(Marlin.from_pretrained("alice/pushed")), _feats(a))

    sha_b = b.push_to_hub("alice/pushed", revision="dev", commit_message="full model")
    assert sha_b != sha_a and fake_hub.refs("alice/pushed")["dev"] == sha_b
    assert fake_hub.refs("alice/pushed")["main"] == sha_a  # main untouched
    assert Marlin.from_pretrained("alice/pushed", revision="dev").full
    assert torch.equal(_feats(Marlin.from_pretrained("alice/pushed", revision=sha_a)), _feats(a))


def test_push_errors_are_one_line_and_the_token_is_sent(fake_hub, tiny_config):
    model = Marlin(tiny_config)
    with pytest.raises(OSError) as e:
        model.push_to_hub("alice/x", endpoint=_closed_port_url())
    assert (
        "\n" not in str(e.value) and "push to hf://alice/x" in str(e.value) and "could not be reached" in str(e.value)
    )
    fake_hub.write_token = "secret"
    with pytest.raises(OSError) as e:
        model.push_to_hub("alice/x")
    assert "\n" not in str(e.value) and "401" in str(e.value) and "HF_TOKEN" in str(e.value)
    sha = model.push_to_hub("alice/x", token="secret")
    assert fake_hub.refs("alice/x")["main"] == sha
