"""The documented container path, for real: `infra/container.py run` (`make run-container`) builds the
component image with podman and runs the whole compiled pipeline in it through kfp.local's
DockerRunner, against SeaweedFS and an MLflow server on loopback. CI installs podman, runc and
debootstrap (.ci/run); elsewhere the test is skipped when they are missing."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import ROOT

TOOLS = ("podman", "runc", "debootstrap")
missing = [tool for tool in TOOLS if not shutil.which(tool)]
if missing and os.environ.get("CI"):
    raise RuntimeError(f"CI needs {', '.join(missing)}: .ci/run installs them with apt-get")
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    bool(missing), reason=f"needs {', '.join(missing)}: apt-get install -y {' '.join(TOOLS)}")]


def test_the_whole_pipeline_runs_in_its_image_and_registers_a_model_whose_files_are_in_s3(tmp_path):
    out = tmp_path / "container-run.json"
    proc = subprocess.run([sys.executable, "infra/container.py", "run", "--home", str(tmp_path / "home"),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    compiled = yaml.safe_load_all((ROOT / "pipelines" / "finetune_pipeline.yaml").read_text())
    images = {e["container"]["image"] for e in next(compiled)["deploymentSpec"]["executors"].values()}
    assert images == {result["image"]}  # the committed pipeline names the image that was built and run
    assert result["user"] == "10001:10001"
    # the code in the image is exactly the code its tag is a hash of (pipelines/image.py): every package
    from pipelines import image

    hashed = sorted({p.relative_to(ROOT).as_posix() for pattern in image.IMAGE_FILES for p in ROOT.glob(pattern)
                     if p.is_file() and "__pycache__" not in p.parts})
    container = subprocess.run(["podman", "create", result["image"], "true"], capture_output=True, text=True,
                               check=True).stdout.strip()
    try:
        mounted = Path(subprocess.run(["podman", "mount", container], capture_output=True, text=True,
                                      check=True).stdout.strip()) / "app"
        shipped = sorted(p.relative_to(mounted).as_posix() for p in mounted.rglob("*") if p.is_file())
    finally:
        subprocess.run(["podman", "rm", "-f", container], capture_output=True)
    assert shipped == [name for name in hashed if name != "requirements.lock"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert result["labels"]["org.opencontainers.image.revision"].removesuffix("-dirty") == head
    assert result["git_commit_tag"] == result["labels"]["org.opencontainers.image.revision"]  # logged from the image
    # the image's SBOM, read from the image: its Debian packages and exactly the runtime lock's pins (plus pip)
    purls = result["sbom_purls"]
    assert {"libc6", "python3", "openssl", "ca-certificates"} <= {p.split("/")[2].split("@")[0] for p in purls
                                                                 if p.startswith("pkg:deb/debian/")}
    pins = {line.split("==")[0].lower().replace("_", "-") + "@" + line.split("==")[1]
            for line in (ROOT / "requirements.lock").read_text().splitlines() if "==" in line}
    pythons = {p.removeprefix("pkg:pypi/") for p in purls if p.startswith("pkg:pypi/")}
    assert pins <= pythons and len(pythons - pins) <= 2, sorted(pythons - pins)
    # Outputs, not task states: a registration written by the register task inside the container, the
    # champion in MLflow, and MLflow's files (the model among them) in the S3 bucket.
    assert result["registration"]["registered"] and result["registration"]["aliases"] == ["challenger", "champion"]
    assert result["registered_version"] == "1" and result["run_artifact_uri"].startswith("mlflow-artifacts:/")
    assert result["mlflow_objects_in_s3"] >= 10 and result["model_in_s3"]
    print(f"container run: build {result['build_seconds']} s, image {result['size_bytes'] / 1e9:.2f} GB, "
          f"pipeline {result['pipeline_seconds']} s")
