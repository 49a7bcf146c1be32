"""The component image and Kubernetes manifests, checked by the real linters (no cluster or Docker here)."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import ROOT

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("dockerfile", sorted((ROOT / "infra").glob("*Dockerfile")), ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    proc = subprocess.run([BIN / "hadolint", str(dockerfile)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_kubernetes_manifests_pass_schema_validation():
    manifests = sorted((ROOT / "infra" / "k8s").glob("*.yaml"))
    assert manifests
    proc = subprocess.run([BIN / "kubernetes-validate", "--strict", *map(str, manifests)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_component_image_matches_the_pipeline_and_carries_the_code_it_runs(params):
    dockerfile = (ROOT / "infra" / "Dockerfile").read_text()
    assert params.pipeline.image in dockerfile  # the build command names the tag the pipeline uses
    copied = {word for line in dockerfile.splitlines() if line.startswith("COPY ") for word in line.split()[1:-1]}
    assert {"requirements.lock", "components", "pipelines", "params.yaml"} <= copied


def test_no_secret_values_are_committed_in_manifests():
    for path in (ROOT / "infra" / "k8s").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] != "Secret", f"{path.name}: secrets are created from the environment, not committed"
