"""The pipeline in its own container image, on this machine: podman builds the image, and
kfp.local's DockerRunner runs every task of the compiled pipeline in it.

    python infra/container.py build     # or: make image
    python infra/container.py run       # or: make run-container (builds first)

Every build also writes the image's CycloneDX SBOM (Debian packages and Python distributions, read
from the image) to build/sbom/image.cdx.json.

No Docker engine or outside registry is needed: the base image is Debian bookworm made with
debootstrap (`localhost/debian-bookworm:minbase`), podman (runc runtime) builds and runs, and
`podman system service` serves the Docker API that DockerRunner speaks. `run` starts SeaweedFS
(S3) and an MLflow server on loopback, puts the demo's digits and zoo checkpoint in S3, and runs
the pipeline with `data_source` and `pretrained.uri` pointing there: every task reads its inputs
from S3 and MLflow, and MLflow keeps the artifacts in S3. It then checks the outputs, not the
task states (DockerRunner reports SUCCESS for a container that is gone before it is waited on),
and writes timings and sizes to `container-run.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "infra")]

BASE = "localhost/debian-bookworm:minbase"
PODMAN = ["podman", "--runtime", "runc"]
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")  # the build's pip trusts what this machine trusts
USER = 10001  # the image's user (infra/Dockerfile)
SBOM = ROOT / "build" / "sbom" / "image.cdx.json"  # written by every build: what the image holds


import supply_chain  # noqa: E402 (infra/ on the path above)


def _image_exists(ref: str) -> bool:
    return subprocess.run([*PODMAN, "image", "exists", ref]).returncode == 0


def base_image() -> str:
    """Debian bookworm minbase from Debian's mirror, imported once as BASE."""
    if _image_exists(BASE):
        return BASE
    with tempfile.TemporaryDirectory(prefix="bookworm-") as tmp:
        subprocess.run(["debootstrap", "--variant=minbase", "bookworm", tmp, "http://deb.debian.org/debian"],
                       check=True, stdout=subprocess.DEVNULL)
        tar = subprocess.Popen(["tar", "-C", tmp, "-c", "."], stdout=subprocess.PIPE)
        subprocess.run([*PODMAN, "import", "-", BASE], stdin=tar.stdout, check=True, stdout=subprocess.DEVNULL)
        if tar.wait():
            raise SystemExit("container: tar of the debootstrap tree failed")
    return BASE


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def build(ref: str) -> dict:
    """Build infra/Dockerfile as `ref`; returns the build's seconds and the image's size and labels."""
    started = time.monotonic()
    base = base_image()
    commit = _git("rev-parse", "HEAD") or "unknown"
    if _git("status", "--porcelain", "--", "components", "pipelines", "requirements.lock"):
        commit += "-dirty"
    secret = ["--secret", f"id=ca,src={CA_BUNDLE}"] if CA_BUNDLE.exists() else []
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    subprocess.run([*PODMAN, "build", "--format=docker", "--network=host", *ULIMITS, *secret, "-f", "infra/Dockerfile",
                    "--build-arg", f"BASE={base}", "--build-arg", f"GIT_COMMIT={commit}",
                    "--build-arg", f"VERSION={version}",
                    "--build-arg", f"CREATED={_git('log', '-1', '--format=%cI') or ''}",
                    # also as flags: podman's layer cache ignores a build arg that only a LABEL or ENV uses,
                    # so an image rebuilt from the same code at a new commit would keep the old commit
                    "--label", f"org.opencontainers.image.revision={commit}", "--env", f"GIT_COMMIT={commit}",
                    "-t", ref, "."], cwd=ROOT, check=True)
    inspect = json.loads(subprocess.run([*PODMAN, "image", "inspect", ref], check=True, capture_output=True,
                                        text=True).stdout)[0]
    seconds = round(time.monotonic() - started, 1)
    sbom = supply_chain.image_sbom(ref, SBOM, PODMAN)
    return {"image": ref, "build_seconds": seconds, "size_bytes": inspect["Size"],
            "user": inspect["Config"].get("User", ""), "labels": inspect.get("Labels") or {},
            "sbom": str(SBOM), "sbom_purls": [c["purl"] for c in sbom["components"]]}


def docker_api(home: Path) -> tuple[subprocess.Popen, str]:
    """`podman system service` on a socket in `home` (its own process session); the DOCKER_HOST for it."""
    sock = home / "podman.sock"
    proc = subprocess.Popen([*PODMAN, "system", "service", "--time=0", f"unix://{sock}"],
                            stdout=open(home / "podman-service.log", "a"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 30
    while not sock.exists():
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit(f"container: podman system service did not start; see {home / 'podman-service.log'}")
        time.sleep(0.2)
    return proc, f"unix://{sock}"


def run(ref: str, home: Path) -> dict:
    """The compiled pipeline through DockerRunner in `ref`, against S3 and MLflow on loopback."""
    import boto3
    import kfp.local
    import mlflow
    import yaml

    from local_stack import SEAWEED_PORTS, free_port, start_mlflow, start_seaweedfs, stop
    from pipelines.finetune_pipeline import finetune_pipeline, pipeline_parameters

    home.mkdir(parents=True, exist_ok=True)
    keys = {"AWS_ACCESS_KEY_ID": "container-run", "AWS_SECRET_ACCESS_KEY": os.urandom(16).hex()}
    procs = []
    try:
        ports = {name: free_port() for name in SEAWEED_PORTS}
        procs.append(start_seaweedfs(home / "seaweedfs", ports, keys))
        endpoint = f"http://127.0.0.1:{ports['s3.port']}"
        s3_env = {**keys, "AWS_ENDPOINT_URL": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint,
                  "AWS_DEFAULT_REGION": "us-east-1"}
        mlflow_port = free_port()
        procs.append(start_mlflow(home, mlflow_port, artifacts="s3://mlflow/artifacts", env=s3_env))
        tracking = f"http://127.0.0.1:{mlflow_port}"
        service, docker_host = docker_api(home)
        procs.append(service)

        # The demo's inputs (DVC's demo stages), in S3 where the containers read them.
        venv = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        subprocess.run([sys.executable, "-m", "dvc", "repro", "demo_zoo"], cwd=ROOT, check=True, env=venv)
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"])
        source = ROOT / params["data"]["source"]
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            s3.upload_file(str(path), "data", f"digits/{path.relative_to(source).as_posix()}")
        s3.upload_file(str(ROOT / params["pretrained"]["uri"]), "zoo", "resnet18-digits.pt")

        from components.config import load_params

        arguments = pipeline_parameters(load_params(ROOT / "params.yaml"))
        arguments["data_source"] = "s3://data/digits"
        arguments["pretrained"]["uri"] = "s3://zoo/resnet18-digits.pt"
        arguments["tracking"]["experiment"] = "container-run"
        model_name = arguments["register"]["model_name"]

        outputs = home / "pipeline-root"
        outputs.mkdir(exist_ok=True)
        outputs.chmod(0o777)  # the containers run as the image's user, not as this one
        os.environ["DOCKER_HOST"] = docker_host
        kfp.local.init(runner=kfp.local.DockerRunner(
            network_mode="host", environment={**s3_env, "MLFLOW_TRACKING_URI": tracking},
            ulimits=[{"Name": "nofile", "Soft": 1024, "Hard": 1024}, {"Name": "nproc", "Soft": 4096, "Hard": 4096}]),
            pipeline_root=str(outputs), raise_on_error=True)
        started = time.monotonic()
        finetune_pipeline(**arguments)
        seconds = round(time.monotonic() - started, 1)

        # Outputs, not states: each task's artifact is on disk, and the model is registered with its
        # files in the bucket.
        registrations = list(outputs.rglob("registration"))
        if len(registrations) != 1:
            raise SystemExit(f"container: expected one registration output under {outputs}, found {registrations}")
        registration = json.loads(registrations[0].read_text())
        client = mlflow.MlflowClient(tracking_uri=tracking)
        version = client.get_model_version_by_alias(model_name, "champion")
        source_uri = client.get_run(version.run_id).info.artifact_uri
        objects = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="mlflow")
                   for o in page.get("Contents", [])]
        return {"pipeline_seconds": seconds, "registered_version": version.version,
                "registration": registration, "run_artifact_uri": source_uri, "mlflow_objects_in_s3": len(objects),
                "model_in_s3": [key for key in objects if key.endswith(".pt")],
                "git_commit_tag": client.get_run(version.run_id).data.tags.get("git_commit"),
                "tracking_uri": tracking}
    finally:
        for proc in reversed(procs):
            stop(proc.pid)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["build", "run"])
    parser.add_argument("--home", type=Path, default=ROOT / ".container-run",
                        help="servers' data, the pipeline root and the podman socket (run)")
    parser.add_argument("--out", type=Path, default=ROOT / "container-run.json", help="timings and sizes (run)")
    args = parser.parse_args(argv)
    from pipelines.finetune_pipeline import IMAGE

    for tool in ("podman", "runc", "debootstrap"):
        if not shutil.which(tool):
            raise SystemExit(f"container: `{tool}` not found: apt-get install -y podman runc debootstrap")
    built = build(IMAGE)
    print(f"container: built {IMAGE} in {built['build_seconds']} s, {built['size_bytes'] / 1e9:.2f} GB; "
          f"SBOM of {len(built['sbom_purls'])} components in {built['sbom']}")
    if args.command == "run":
        if args.home.exists():
            shutil.rmtree(args.home)
        result = {**built, **run(IMAGE, args.home)}
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"container: pipeline in {result['pipeline_seconds']} s; champion version "
              f"{result['registered_version']}, artifacts at {result['run_artifact_uri']}; details in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
