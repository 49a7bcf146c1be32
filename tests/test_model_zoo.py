"""Fetching from every zoo scheme against real servers on loopback: HTTPS, SeaweedFS S3, MLflow."""

import hashlib
import http.server
import json

import mlflow
import pytest
import torch
from helpers import (
    pretrained_cfg,
    register_cfg,
    save_checkpoint,
    serve_https,
    tracking_cfg,
    validate_cfg,
)

from components.models import zoo as model_zoo
from components import validate as validate_step
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
    import threading
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
