"""`make stack`: the local SeaweedFS and MLflow servers come up with keys from .env and go down again."""

import os
import socket
import subprocess
import sys
import urllib.request

import boto3
import pytest

from helpers import ROOT
from local_stack import free_ports


LOG_A_RUN = """
import sys, tempfile, pathlib, mlflow
mlflow.set_tracking_uri(sys.argv[1])
mlflow.set_experiment("stack-check")
with mlflow.start_run() as run, tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp, "confusion.txt")
    path.write_text("a picture would do too")
    mlflow.log_artifact(str(path), artifact_path="reports")
print(run.info.run_id)
"""


def _copy(tmp_path):
    """A copy of the parts the stack needs, so the real .env, .stack and .dvc/config.local stay untouched."""
    repo = tmp_path / "repo"
    (repo / "infra").mkdir(parents=True)
    (repo / "infra" / "local_stack.py").write_text((ROOT / "infra" / "local_stack.py").read_text())
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([os.path.join(os.path.dirname(sys.executable), "dvc"), "init", "-q"], cwd=repo, check=True)
    return repo, [sys.executable, str(repo / "infra" / "local_stack.py")]


@pytest.mark.e2e
def test_stack_comes_up_with_keys_from_dot_env_and_goes_down(tmp_path):
    repo, script = _copy(tmp_path)
    base = free_ports(16)
    up = subprocess.run([*script, "up", "--base-port", str(base)], cwd=repo, capture_output=True, text=True)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        env = dict(line.split("=", 1) for line in (repo / ".env").read_text().splitlines())
        assert oct((repo / ".env").stat().st_mode & 0o777) == "0o600"
        assert env["AWS_SECRET_ACCESS_KEY"] not in up.stdout + up.stderr  # keys never printed
        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{base + 6}", region_name="us-east-1",
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
        assert {b["Name"] for b in s3.list_buckets()["Buckets"]} >= {"data", "zoo", "mlflow"}
        with urllib.request.urlopen(f"http://127.0.0.1:{base + 15}/health", timeout=5) as r:
            assert r.status == 200
        assert f"endpointurl = http://127.0.0.1:{base + 6}" in (repo / ".dvc" / "config.local").read_text()

        # a run's artifacts go through the server into the bucket: the client has no S3 keys at all
        client_env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
        logged = subprocess.run([sys.executable, "-c", LOG_A_RUN, f"http://127.0.0.1:{base + 15}"],
                                env=client_env, capture_output=True, text=True)
        assert logged.returncode == 0, logged.stderr
        run_id = logged.stdout.split()[-1]
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow", Prefix="artifacts/")["Contents"]]
        assert any(k.endswith(f"{run_id}/artifacts/reports/confusion.txt") for k in keys), keys
        assert not (repo / ".stack" / "mlflow-artifacts").exists()  # nothing on local disk
    finally:
        down = subprocess.run([*script, "down"], cwd=repo, capture_output=True, text=True)
    assert down.returncode == 0 and "seaweedfs stopped" in down.stdout
    assert not (repo / ".stack" / "mlflow.pid").exists()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{base + 15}/health", timeout=2)


def test_a_port_of_the_block_in_use_is_named_before_anything_starts_or_is_written(tmp_path):
    repo, script = _copy(tmp_path)
    base = free_ports(16)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", base + 15))  # MLflow's port
        busy.listen()
        up = subprocess.run([*script, "up", "--base-port", str(base)], cwd=repo, capture_output=True, text=True)
    assert up.returncode == 1
    assert up.stderr.strip() == (f"stack: port {base + 15} of --base-port {base} (STACK_BASE_PORT) in use: "
                                 "pick another base for the 16 ports")
    assert not (repo / ".env").exists() and not (repo / ".stack").exists()
