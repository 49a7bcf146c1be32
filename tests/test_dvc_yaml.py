"""dvc.yaml is derived from pipelines/dag.py and params.yaml: current, complete in its code deps."""

import pytest
import yaml

from components.config import override
from helpers import PARAMS, ROOT
from pipelines import dvc_yaml


def _stages(params=PARAMS) -> dict:
    return yaml.safe_load(dvc_yaml.render(params))["stages"]


def test_dvc_yaml_in_the_repository_is_current():
    assert (ROOT / "dvc.yaml").read_text() == dvc_yaml.render(PARAMS), \
        "dvc.yaml is stale: run `make generate` and commit it"


def test_each_stage_depends_on_every_module_its_step_imports_and_on_no_other():
    stages = _stages()
    deps = {name: set(stage["deps"]) for name, stage in stages.items()}
    # the modules the review found missing once: decoding, the dataset reader, the models
    assert {"components/storage/images.py", "components/artifacts/dataset.py", "components/tracking/runs.py",
            "components/training/loop.py"} <= deps["finetune"]
    assert {"components/models/architectures.py", "components/storage/images.py", "components/artifacts/dataset.py",
            "components/models/serving.py"} <= deps["validate"]
    assert {"components/artifacts/dataset.py", "components/storage/images.py"} <= deps["augment"]
    assert "components/finetune.py" not in deps["data"]  # only what it imports
    # what the served model checks of a request is not part of training: editing it retrains nothing
    assert "components/models/serving.py" not in deps["finetune"]
    # the demo's digits do not follow the trainer's edits; its zoo trains with the trainer, not through the step
    assert not any(d.startswith(("components/training/", "components/tracking/")) for d in deps["demo_digits"])
    assert "components/finetune.py" not in deps["demo_zoo"] and "components/training/loop.py" in deps["demo_zoo"]
    # a package run with -m: its __main__.py and the __init__.py files on the way
    assert {"components/tracking/__init__.py", "components/tracking/__main__.py"} <= deps["tracking"]


def test_a_stage_whose_command_reads_another_stages_output_depends_on_it():
    """Else `dvc repro <stage>` in a fresh clone runs it before what it reads exists (demo_zoo did)."""
    stages = _stages()
    written = {out if isinstance(out, str) else next(iter(out)): name  # an out is a path or {path: options}
               for name, stage in stages.items() for out in stage.get("outs", [])}
    for name, stage in stages.items():
        for word in stage["cmd"].split():
            if word in written and written[word] != name:
                assert word in stage["deps"], f"{name} reads {word} ({written[word]}'s output) without depending on it"
    assert "data/raw/digits-0-4" in stages["demo_zoo"]["deps"]


def test_import_closure_follows_imports_inside_functions_and_skips_other_packages(tmp_path):
    pkg = tmp_path / "components"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "step.py").write_text("import os\nfrom components import shared\n\ndef f():\n"
                                 "    from components.lazy import g\n    import numpy\n")
    (pkg / "shared.py").write_text("from components.deep import x\n")
    (pkg / "deep.py").write_text("x = 1\n")
    (pkg / "lazy.py").write_text("g = 2\n")
    (pkg / "unused.py").write_text("")
    assert dvc_yaml.import_closure("components.step", tmp_path) == [
        "components/__init__.py", "components/deep.py", "components/lazy.py", "components/shared.py",
        "components/step.py"]
    (pkg / "tool").mkdir()
    (pkg / "tool" / "__init__.py").write_text("")
    (pkg / "tool" / "__main__.py").write_text("from components.tool.part import y\n")
    (pkg / "tool" / "part.py").write_text("y = 3\n")
    assert dvc_yaml.import_closure("components.tool", tmp_path) == [
        "components/__init__.py", "components/tool/__init__.py", "components/tool/__main__.py",
        "components/tool/part.py"]


def test_local_sources_are_dependencies_and_remote_ones_make_the_stage_always_run():
    local = _stages()
    assert "${data.source}" in local["data"]["deps"] and "always_changed" not in local["data"]
    assert "${pretrained.uri}" in local["fetch_pretrained"]["deps"]

    remote = _stages(PARAMS.model_copy(update={
        "data": override(PARAMS.data, source="s3://photos/2026"),
        "pretrained": override(PARAMS.pretrained, uri="s3://zoo/resnet50.pt", sha256="", arch="resnet50"),
        "demo": None}))
    assert remote["data"]["always_changed"] and not any("$" in d for d in remote["data"]["deps"])
    assert remote["fetch_pretrained"]["always_changed"]
    assert "demo_zoo" not in remote and "demo_digits" not in remote  # no demo section, no demo stages

    in_git = _stages(PARAMS.model_copy(update={"data": override(PARAMS.data, repo="https://git.example/d.git")}))
    assert in_git["data"]["always_changed"]  # a path inside another repository: DVC cannot hash it here


@pytest.mark.parametrize("uri, sha256, arch, library, dep, always", [
    ("torchvision://resnet50?weights=IMAGENET1K_V2", "", "resnet50", "torchvision", None, False),
    ("https://host/w.pt", "ab" * 32, "resnet18", "torchvision", None, False),
    ("s3://zoo/w.pt", "ab" * 32, "resnet18", "torchvision", None, False),
    ("s3://zoo/w.pt", "", "resnet18", "torchvision", None, True),
    ("models:/zoo/3", "", "resnet18", "torchvision", None, False),
    ("models:/zoo@champion", "", "resnet18", "torchvision", None, True),
    ("timm://efficientnet_b0?weights=zoo/b0.pt", "", "efficientnet_b0", "timm", "zoo/b0.pt", False),
    ("timm://efficientnet_b0?weights=models:/zoo/2", "", "efficientnet_b0", "timm", None, False),
    ("timm://efficientnet_b0", "", "efficientnet_b0", "timm", None, True),
], ids=["torchvision", "https-pinned", "s3-pinned", "s3-key", "registry-version", "registry-alias",
        "timm-file", "timm-registry-version", "timm-hub"])
def test_pinned_weights_rerun_only_when_the_parameter_changes_and_moving_ones_always(uri, sha256, arch, library,
                                                                                    dep, always):
    stage = _stages(PARAMS.model_copy(update={"pretrained": override(
        PARAMS.pretrained, uri=uri, sha256=sha256, arch=arch, library=library)}))["fetch_pretrained"]
    assert stage.get("always_changed", False) is always
    assert "pretrained" in stage["params"]  # a changed URI or pin reruns it
    own = [d for d in stage["deps"] if not d.startswith(("components/", "demo/"))]
    assert own == ([dep] if dep else [])  # never a URI DVC would look for on disk


def test_outputs_that_name_mlflow_runs_are_not_cached_and_the_tracking_target_always_resolves():
    stages = _stages()
    # and the headline figures, kept by git rather than DVC's cache, so experiment commits carry them; what the
    # plots draw of the reports is copied to a cached folder, which each experiment's dvc.lock names
    assert stages["validate"]["outs"] == [{"artifacts/validate": {"cache": False}},
                                          {"metrics/headline.json": {"cache": False}}, "artifacts/plots"]
    assert stages["register"]["outs"] == [{"artifacts/registration.json": {"cache": False}}]
    assert stages["tracking"]["always_changed"] and "artifacts/tracking.json" in stages["validate"]["deps"]
    assert "artifacts/tracking.json" not in stages["finetune"]["deps"]  # a new store never retrains
