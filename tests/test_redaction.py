"""Credentials in URIs never reach an output, an MLflow record, a log or an error message, while the
download itself still uses them."""

import base64
import hashlib
import http.server
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import (
    POLICY,
    ROOT,
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

# The password holds RFC 3986 sub-delimiters, which user information may carry unescaped.
SECRETS = {"user": "robot-7f3a", "password": "pa(ss)w'o!rd-9b1e", "signature": "sig-0d4f8a6b9c",
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


SUB_DELIMITERS = "!$&'()*+,;="  # RFC 3986 section 2.2: allowed unescaped in user information (3.2.1)


@pytest.mark.parametrize("char", list(SUB_DELIMITERS))
@pytest.mark.parametrize("around", ["{}", "error: {} failed", "({})", "'{}'", "[{}]", "see {}."])
def test_user_information_with_any_sub_delimiter_is_removed_wherever_the_uri_stands(char, around):
    uri = f"https://ro{char}bot:pa{char}ss{char}word@host.example:8443/m.pt?v=1"
    text = redact(around.format(uri))
    assert "bot" not in text and "pa" not in text and "word" not in text, text
    assert "host.example:8443/m.pt?v=1" in text


def test_a_credential_parameter_holding_sub_delimiters_goes_whole():
    assert redact("(https://h/x?token=ab(c)d'e&v=1)") == "(https://h/x?v=1)"
    assert redact("https://[::1]:8080/x?sig=s3cr3t") == "https://[::1]:8080/x"


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


def test_the_step_command_lines_print_no_credential(private_zoo, tmp_path):
    """fetch_pretrained prints the URI it fetched; data names data.repo when it cannot be read."""
    save_checkpoint(private_zoo["root"] / "r18.pt", "resnet18", ["w", "x"])
    pin = hashlib.sha256((private_zoo["root"] / "r18.pt").read_bytes()).hexdigest()
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["pretrained"].update(uri=_secret_uri(private_zoo["host"], "r18.pt"), sha256=pin)
    raw["data"].update(repo=f"https://{SECRETS['user']}:{SECRETS['password']}@127.0.0.1:1/data.git", rev="v1")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    fetched = subprocess.run([sys.executable, "-m", "components.fetch_pretrained", "--params", str(tmp_path / "params.yaml"),
                              "--out", str(tmp_path / "pre")], capture_output=True, text=True, env=env)
    data = subprocess.run([sys.executable, "-m", "components.data", "--params", str(tmp_path / "params.yaml"),
                           "--out", str(tmp_path / "data")], capture_output=True, text=True, env=env)
    assert fetched.returncode == 0 and private_zoo["host"] in fetched.stdout, fetched.stderr
    assert data.returncode == 3 and "127.0.0.1:1/data.git" in data.stderr, data.stderr
    printed = fetched.stdout + fetched.stderr + data.stdout + data.stderr
    assert not [name for name, value in SECRETS.items() if value in printed], printed


def test_the_error_tag_of_a_failed_run_holds_no_credential(artifacts):
    from components.artifacts.lineage import training_inputs
    from components.tracking import runs, store

    inputs = training_inputs(artifacts / "data", artifacts / "aug", artifacts / "pre", finetune_cfg().model_dump())
    with pytest.raises(OSError):
        with runs.training_run(inputs, tracking_cfg("secrets"), "test", "failing-run") as live:
            raise OSError(f"cannot reach {_secret_uri('127.0.0.1:1', 'x.pt')} (refused)")
    error = store.client().get_run(live.run_id).data.tags["error"]
    assert error.startswith("OSError: cannot reach https://127.0.0.1:1/x.pt?")
    assert not [name for name, value in SECRETS.items() if value in error], error


def test_download_errors_name_the_uri_without_its_credentials(private_zoo, tmp_path):
    save_checkpoint(private_zoo["root"] / "r18.pt", "resnet18", ["a", "b"])
    wrong = _secret_uri(private_zoo["host"], "r18.pt").replace(SECRETS["password"], "wrong-password")
    for uri in (wrong, _secret_uri("127.0.0.1:1", "r18.pt"), _secret_uri("127.0.0.1:99999", "r18.pt")):
        with pytest.raises(FetchError) as err:  # 401, connection refused, a port out of range
            fetch(pretrained_cfg(uri, sha256="0" * 64), tmp_path / "o")
        message = str(err.value)
        assert "download failed" in message and "wrong-password" not in message
        assert not [name for name, value in SECRETS.items() if value in message], message
