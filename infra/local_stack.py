"""The local stack: a SeaweedFS S3 server and an MLflow tracking server on loopback.

    python infra/local_stack.py up      # or: make stack
    python infra/local_stack.py down    # or: make stack-down

Keys come from `.env` (git-ignored); `up` writes random ones there the first time, and never
prints them. Both servers run in their own process sessions; their pids, logs and data live in
`.stack/`. `up` also points a git-ignored DVC remote (`.dvc/config.local`) at the S3 server.
The MLflow server keeps its runs in SQLite under `.stack/` and their artifacts in the bucket
`mlflow`. The tests start both servers through these functions too, on ports of their own.
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STACK = ROOT / ".stack"
BIN = Path(sys.executable).parent
# weed mini opens all of these; each gRPC port is its HTTP port + 10000 unless given.
SEAWEED_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
                 "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc", "webdav.port",
                 "debug.port", "s3.debug.port", "s3.port.iceberg", "s3.port.lance")
BUCKETS = ("data", "zoo", "mlflow")
ARTIFACTS = "s3://mlflow/artifacts"  # where the stack's MLflow server keeps run artifacts


def read_env(path: Path) -> dict[str, str]:
    values = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if "=" in line and not line.lstrip().startswith("#"):
                key, _, value = line.partition("=")
                values[key.strip()] = value.strip().strip("'\"")
    return values


def ensure_keys(path: Path) -> dict[str, str]:
    """S3 keys from `path`, created (mode 600) with random values when missing."""
    values = read_env(path)
    if not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= values.keys():
        values.setdefault("AWS_ACCESS_KEY_ID", "stack-" + secrets.token_hex(6))
        values.setdefault("AWS_SECRET_ACCESS_KEY", secrets.token_urlsafe(30))
        path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
        path.chmod(0o600)
    return values


def start_seaweedfs(home: Path, ports: dict[str, int], keys: dict[str, str], buckets=BUCKETS,
                    s3_config: Path | None = None) -> subprocess.Popen:
    """`weed mini` on 127.0.0.1 with every port given, enforcing `keys` (or the identities of `s3_config`, where
    `keys` is one of them); returns once S3 answers and holds `buckets`."""
    import boto3

    (home / "data").mkdir(parents=True, exist_ok=True)
    (home / "logs").mkdir(exist_ok=True)
    log = open(home / "weed.log", "a")
    proc = subprocess.Popen(
        [str(BIN / "weed"), f"-logdir={home / 'logs'}", "mini", f"-dir={home / 'data'}", "-ip=127.0.0.1",
         "-ip.bind=127.0.0.1", *([f"-bucket={','.join(buckets)}"] if buckets else []),
         *([f"-s3.config={s3_config}"] if s3_config else []), *(f"-{n}={p}" for n, p in ports.items())],
        env={**os.environ, **({} if s3_config else keys)}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=home)
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{ports['s3.port']}", region_name="us-east-1",
                          aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"])
    deadline = time.time() + 90
    while True:
        try:
            client.list_buckets()
            for bucket in () if s3_config else buckets:  # `keys` may not be allowed to see them all
                client.head_bucket(Bucket=bucket)
            return proc
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                stop(proc.pid)
                raise RuntimeError(f"SeaweedFS did not start; see {home / 'weed.log'}") from None
            time.sleep(0.5)


def start_mlflow(home: Path, port: int, artifacts: str = "", env: dict[str, str] | None = None,
                 backend_store: str = "") -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:`port`; returns once /health answers (up to ~30 s here).

    The store is a SQLite database in `home` unless `backend_store` names one; artifacts go to
    `artifacts` (a folder or s3://bucket/prefix, through the server), else `home`/mlflow-artifacts.
    """
    log = open(home / "mlflow.log", "a")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", backend_store or f"sqlite:///{home / 'mlflow.db'}", "--artifacts-destination",
         artifacts or str(home / "mlflow-artifacts")], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        cwd=home, env={**os.environ, **(env or {})})
    deadline = time.time() + 90
    while True:
        try:
            # B310: a fixed loopback URL
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:  # nosec B310
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            stop(proc.pid)
            why = "exited" if proc.poll() is not None else "no answer on /health in 90 s"
            raise RuntimeError(f"mlflow server did not start ({why}): {_last_line(home / 'mlflow.log')}; "
                               f"see {home / 'mlflow.log'}")
        time.sleep(0.5)


def _last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:200] if lines else "nothing in its log"


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port() -> int:
    """A free port on loopback, below 55536: SeaweedFS derives gRPC ports as port + 10000."""
    return free_ports(1)


def free_ports(count: int) -> int:
    """The first of `count` consecutive free ports on loopback (the stack's block of 16, for one)."""
    while True:
        # B311: a port number, not a secret
        base = random.randint(20000, 55536 - count)  # nosec B311
        if all(_free(base + i) for i in range(count)):
            return base


def stop(pid: int, timeout: float = 20) -> None:
    """End a process group started with start_new_session=True."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(pid, signal.SIGKILL)


def session_peak_rss(sid: int) -> int:
    """Sum of the peak resident memory (VmHWM) of every live process in session `sid` (a process group
    started with start_new_session=True: its leader's pid)."""
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getsid(int(pid)) != sid:
                continue
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        total += next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM")), 0)
    return total


def _running(name: str) -> bool:
    pid_file = STACK / f"{name}.pid"
    try:
        os.killpg(int(pid_file.read_text()), 0)
        return True
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return False


def up(base_port: int) -> None:
    if _running("seaweedfs") or _running("mlflow"):
        raise SystemExit("stack: already up (make stack-down first)")
    ports = {name: base_port + i for i, name in enumerate(SEAWEED_PORTS)}
    mlflow_port = base_port + len(SEAWEED_PORTS)
    taken = [str(p) for p in [*ports.values(), mlflow_port] if not _free(p)]
    if taken:
        raise SystemExit(f"stack: port{'s' * (len(taken) > 1)} {', '.join(taken)} of --base-port {base_port} "
                         f"(STACK_BASE_PORT) in use: pick another base for the 16 ports")
    STACK.mkdir(exist_ok=True)
    keys = ensure_keys(ROOT / ".env")
    weed = start_seaweedfs(STACK / "seaweedfs", ports, keys)
    (STACK / "seaweedfs.pid").write_text(str(weed.pid))
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    # The server stores run artifacts (models, pictures) in the bucket and serves them to clients,
    # which need neither S3 keys nor the endpoint to log or read them.
    mlflow = start_mlflow(STACK, mlflow_port, artifacts=ARTIFACTS,
                          env={**keys, "MLFLOW_S3_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1"})
    (STACK / "mlflow.pid").write_text(str(mlflow.pid))
    dvc = [str(BIN / "dvc"), "remote"]
    subprocess.run([*dvc, "add", "--local", "--force", "-d", "stack", "s3://data/dvcstore"], cwd=ROOT, check=True)
    subprocess.run([*dvc, "modify", "--local", "stack", "endpointurl", endpoint], cwd=ROOT, check=True)
    print(f"stack up: S3 {endpoint} (buckets {', '.join(BUCKETS)}; keys in .env), "
          f"MLflow http://127.0.0.1:{mlflow_port} (artifacts in {ARTIFACTS}), DVC remote 'stack'. To use them:\n"
          f"  set -a; . ./.env; set +a\n"
          f"  export AWS_ENDPOINT_URL={endpoint} MLFLOW_TRACKING_URI=http://127.0.0.1:{mlflow_port}")


def down() -> None:
    for name in ("mlflow", "seaweedfs"):
        pid_file = STACK / f"{name}.pid"
        if pid_file.exists():
            stop(int(pid_file.read_text()))
            pid_file.unlink()
            print(f"stack down: {name} stopped")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "down"])
    parser.add_argument("--base-port", type=int, default=int(os.environ.get("STACK_BASE_PORT", 18300)),
                        help="first of 16 consecutive ports (S3 is base+6, MLflow base+15); at most 55520")
    args = parser.parse_args(argv)
    up(args.base_port) if args.command == "up" else down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
