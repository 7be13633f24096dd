"""`patchcore weights fetch` and the default backbone, without a network: a real HTTP server on 127.0.0.1
serves the files through the same code path (torch hub's download and hash check), the URL's folder
overridden by PATCHCORE_WEIGHTS_URL_BASE."""
import hashlib
import http.server
import io
import json
import threading

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from patchcore.cli import app
from scorer import backbones
from scorer.backbones import BackboneError, BackboneSpec, hub_weights_path, load_backbone
from scorer.weights import URL_BASE_ENV, WeightsFetchError, fetch_weights


REAL_MOBILENET = hub_weights_path("mobilenet_v2")  # this machine's hub cache, before a test empties it


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict = {}  # path -> bytes
    truncate: set = set()  # paths sent half-way, then the connection closed
    requests: list = []

    def do_GET(self):  # noqa: N802 - http.server's name
        self.requests.append(self.path)
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:len(body) // 2] if self.path in self.truncate else body)
        self.wfile.flush()
        if self.path in self.truncate:
            self.close_connection = True

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A local HTTP server (its own handler class per test), and a fresh, empty torch hub cache."""
    handler = type("Handler", (_Handler,), {"files": {}, "truncate": set(), "requests": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv(URL_BASE_ENV, f"http://127.0.0.1:{httpd.server_port}/models")
    yield handler
    httpd.shutdown()
    httpd.server_close()


def _state_dict_bytes(seed: int) -> tuple[bytes, dict]:
    torch.manual_seed(seed)
    state = nn.Linear(4, 3).state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue(), state


@pytest.fixture
def tiny(monkeypatch):
    """A backbone entry whose weights file is a small state dict named by its own sha256 prefix (torch hub's
    convention), published at a download URL like torchvision's."""
    body, state = _state_dict_bytes(0)
    name = f"tiny-{hashlib.sha256(body).hexdigest()[:8]}.pth"
    spec = BackboneSpec(lambda weights=None: nn.Linear(4, 3), name, ("",),
                        url=f"https://download.pytorch.org/models/{name}")
    monkeypatch.setitem(backbones.BACKBONES, "tiny", spec)
    return name, body, state


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_fetch_downloads_checks_and_loads_a_state_dict(server, tiny):
    name, body, state = tiny
    server.files[f"/models/{name}"] = body
    result = fetch_weights("tiny", progress=False)
    assert result.downloaded and result.path == hub_weights_path("tiny") and result.path.read_bytes() == body
    assert result.sha256 == hashlib.sha256(body).hexdigest()
    model, sha = load_backbone("tiny")  # the scorer's loader finds it in the hub cache and checks the hash
    assert sha == result.sha256 and torch.equal(model.weight, state["weight"])
    again = fetch_weights("tiny", progress=False)  # a good file is kept; no second request
    assert not again.downloaded and server.requests == [f"/models/{name}"]


def test_a_hash_mismatch_is_refused_and_leaves_no_file(server, tiny):
    name, _, _ = tiny
    server.files[f"/models/{name}"] = _state_dict_bytes(1)[0]  # another file under the published name
    with pytest.raises(WeightsFetchError):
        fetch_weights("tiny", progress=False)
    assert _leftovers(hub_weights_path("tiny").parent) == []
    with pytest.raises(BackboneError):
        load_backbone("tiny")


def test_an_interrupted_download_is_refused_and_leaves_no_file(server, tiny):
    name, body, _ = tiny
    server.files[f"/models/{name}"] = body
    server.truncate.add(f"/models/{name}")
    with pytest.raises(WeightsFetchError):
        fetch_weights("tiny", progress=False)
    assert _leftovers(hub_weights_path("tiny").parent) == []


def test_no_server_is_a_clear_error(tmp_path, monkeypatch, tiny):
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv(URL_BASE_ENV, f"http://127.0.0.1:{port}/models")
    with pytest.raises(WeightsFetchError):
        fetch_weights("tiny", progress=False)
    assert _leftovers(hub_weights_path("tiny").parent) == []


def test_the_cli_fetches_torchvisions_file_by_its_published_name(server):
    """mobilenet_v2-b0353104.pth, torchvision's own file (from this machine's hub cache), through the CLI."""
    source = REAL_MOBILENET
    if not source.is_file():
        pytest.skip("torchvision's mobilenet_v2 weights are not on this machine (scripts/setup.sh)")
    server.files["/models/mobilenet_v2-b0353104.pth"] = source.read_bytes()
    result = CliRunner().invoke(app, ["weights", "fetch", "mobilenet_v2", "--no-progress"])
    assert result.exit_code == 0, result.output
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["downloaded"] and line["sha256"].startswith("b0353104")
    assert hub_weights_path("mobilenet_v2").read_bytes() == source.read_bytes()
    server.files["/models/resnet18-f37072fd.pth"] = b"not the published file"
    refused = CliRunner().invoke(app, ["weights", "fetch", "resnet18", "--no-progress"])
    assert refused.exit_code == 2 and "resnet18" in refused.output
    assert not hub_weights_path("resnet18").exists()
    unknown = CliRunner().invoke(app, ["weights", "fetch", "vgg16"])
    assert unknown.exit_code == 2


def test_package_weights_have_no_url(server):
    with pytest.raises(WeightsFetchError):
        fetch_weights("efficientnet_lite0", progress=False)


# The default backbone: "auto" is the paper's where its weights are present, else the best offline one.

def test_auto_prefers_the_papers_backbone_when_its_weights_are_present(tmp_path, monkeypatch):
    from scorer.backbones import AUTO_PREFERENCE, resolve_backbone

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert not hub_weights_path("wide_resnet50_2").exists()
    offline = resolve_backbone()
    assert offline.name == AUTO_PREFERENCE[1] == "efficientnet_lite2"  # installed with the package
    assert "patchcore weights fetch wide_resnet50_2" in offline.reason
    hub_weights_path("wide_resnet50_2").parent.mkdir(parents=True)
    hub_weights_path("wide_resnet50_2").write_bytes(b"present")
    assert resolve_backbone().name == "wide_resnet50_2"
    assert resolve_backbone("mobilenet_v2").name == "mobilenet_v2"  # asked for: not second-guessed
    with pytest.raises(BackboneError):
        resolve_backbone(weights=tmp_path / "some.pth")  # a file of which backbone?
    with pytest.raises(BackboneError):
        resolve_backbone("vgg16")


def test_bank_build_without_backbone_runs_offline_and_names_it(tmp_path, monkeypatch):
    """No --backbone, no wide_resnet50_2 weights: the bank is built with the offline default, which is printed
    and stored; forcing wide_resnet50_2 fails with the command that fetches its weights."""
    import cv2

    from scorer import load_bank

    from .conftest import synthetic_part

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache: a fresh install
    train = tmp_path / "good"
    train.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        cv2.imwrite(str(train / f"{i}.png"), synthetic_part(rng, 96))
    out = tmp_path / "b.bank"
    args = ["bank", "build", "--train", str(train), "--out", str(out), "--view", "full", "--size", "96",
            "--no-progress", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "backbone: efficientnet_lite2" in result.stderr
    assert load_bank(out).feature_config.backbone == "efficientnet_lite2"
    assert json.loads(result.stdout)["features"]["backbone"] == "efficientnet_lite2"
    forced = CliRunner().invoke(app, [*args, "--backbone", "wide_resnet50_2"])
    assert forced.exit_code == 2 and "patchcore weights fetch wide_resnet50_2" in forced.stderr
