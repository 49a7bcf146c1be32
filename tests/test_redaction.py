"""Credentials in URIs never reach an output, an MLflow record, a log or an error message, while the
download itself still uses them."""

import base64
import hashlib
import http.server
import os
from pathlib import Path

import pytest
from helpers import (
    POLICY,
    data_cfg,
    finetune_cfg,
    policy_cfg,
    pretrained_cfg,
    register_cfg,
    save_checkpoint,
    serve_https,
    tracking_cfg,
    validate_cfg,
)

from components import finetune as finetune_step
from components import validate as validate_step
from components.augment import augment
from components.data import prepare
from components.fetch_pretrained import FetchError, fetch
from components.redaction import redact
from components.register import register

SECRETS = {"user": "robot-7f3a", "password": "pw-9b1e5c2d", "signature": "sig-0d4f8a6b9c",
           "credential": "AKIAEXAMPLE3KQ", "token": "tok-5e6f7a8b"}


@pytest.mark.parametrize("uri, expected", [
    ("https://me:s3cr3t@host/r18.pt", "https://host/r18.pt"),
    ("https://host/r18.pt?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AK%2F1&X-Amz-Signature=ab&X-Amz-Expires=60",
     "https://host/r18.pt?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Expires=60"),
    ("https://storage.googleapis.com/b/o?X-Goog-Credential=c&X-Goog-Signature=s&alt=media",
     "https://storage.googleapis.com/b/o?alt=media"),
    ("https://acct.blob.core.windows.net/c/m.pt?sv=2024&sig=XYZ&se=2026", "https://acct.blob.core.windows.net/c/m.pt?sv=2024&se=2026"),
    ("https://h/x?token=t&access_token=a&key=k&password=p&keep=1", "https://h/x?keep=1"),
    ("torchvision://resnet18?weights=IMAGENET1K_V1", "torchvision://resnet18?weights=IMAGENET1K_V1"),  # untouched
    ("download of https://u:p@h/x?sig=1 failed (401)", "download of https://h/x failed (401)"),  # inside text
])
def test_redact_removes_user_info_and_credential_parameters_and_keeps_the_rest(uri, expected):
    assert redact(uri) == expected


@pytest.fixture
def private_zoo(tmp_path, monkeypatch):
    """An HTTPS server that serves only with basic auth and a presigned URL's parameters."""
    root = tmp_path / "www"
    root.mkdir()
    expected_auth = "Basic " + base64.b64encode(f"{SECRETS['user']}:{SECRETS['password']}".encode()).decode()
    seen = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(root), **k)

        def do_GET(self):
            seen.append((self.path, self.headers.get("Authorization")))
            if self.headers.get("Authorization") != expected_auth or SECRETS["signature"] not in self.path:
                self.send_error(401)
                return
            self.path = self.path.split("?")[0]
            super().do_GET()

        def log_message(self, *args):
            pass

    server, url, cert = serve_https(tmp_path, Handler)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    host = url.removeprefix("https://")
    yield {"root": root, "host": host, "seen": seen}
    server.shutdown()
    server.server_close()


def _secret_uri(host: str, path: str) -> str:
    return (f"https://{SECRETS['user']}:{SECRETS['password']}@{host}/{path}?X-Amz-Algorithm=AWS4-HMAC-SHA256"
            f"&X-Amz-Credential={SECRETS['credential']}&X-Amz-Signature={SECRETS['signature']}"
            f"&token={SECRETS['token']}&X-Amz-Expires=600")


def _files_holding_secrets(*roots: Path) -> list[str]:
    found = []
    for root in roots:
        for path in [root] if root.is_file() else root.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                found += [f"{path}: {name}" for name, value in SECRETS.items() if value.encode() in data]
    return found


def test_a_secret_planted_in_the_pretrained_uri_reaches_no_output_record_or_log(private_zoo, image_folder, tmp_path,
                                                                                 capfd):
    save_checkpoint(private_zoo["root"] / "r18.pt", "resnet18", ["w", "x", "y", "z"])
    pin = hashlib.sha256((private_zoo["root"] / "r18.pt").read_bytes()).hexdigest()
    uri = _secret_uri(private_zoo["host"], "r18.pt")
    out = tmp_path / "run"
    prepare(image_folder, out / "data", data_cfg(image_folder))
    augment(out / "data", out / "aug", policy_cfg(**POLICY))
    info = fetch(pretrained_cfg(uri, sha256=pin), out / "pre")
    assert info["uri"] == f"https://{private_zoo['host']}/r18.pt?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Expires=600"
    path, auth = private_zoo["seen"][-1]  # the download itself carried both credentials
    assert SECRETS["signature"] in path and auth.startswith("Basic ")
    finetune_step.run(out / "data", out / "aug", out / "pre", out / "model", finetune_cfg(max_epochs=1, batch_size=16),
                      tracking_cfg("secrets"), "test", "secret-run")
    validate_step.run(out / "data", out / "aug", out / "pre", out / "model", out / "val", validate_cfg(),
                      register_cfg("secrets"), tracking_cfg("secrets"), "test", "secret-run")
    assert register(out / "val", out / "registration.json", register_cfg("secrets"))["registered"]
    store = Path(os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///")).parent  # database and mlruns/
    assert _files_holding_secrets(out, store) == []
    logs = capfd.readouterr()
    assert not [name for name, value in SECRETS.items() if value in logs.out + logs.err]


def test_download_errors_name_the_uri_without_its_credentials(private_zoo, tmp_path):
    save_checkpoint(private_zoo["root"] / "r18.pt", "resnet18", ["a", "b"])
    wrong = _secret_uri(private_zoo["host"], "r18.pt").replace(SECRETS["password"], "wrong-password")
    for uri in (wrong, _secret_uri("127.0.0.1:1", "r18.pt"), _secret_uri("127.0.0.1:99999", "r18.pt")):
        with pytest.raises(FetchError) as err:  # 401, connection refused, a port out of range
            fetch(pretrained_cfg(uri, sha256="0" * 64), tmp_path / "o")
        message = str(err.value)
        assert "download failed" in message and "wrong-password" not in message
        assert not [name for name, value in SECRETS.items() if value in message], message
