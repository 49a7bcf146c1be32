"""`make init`: from the demo to your own photographs and pretrained weights, as the README walks through it."""

import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from PIL import Image

from components.config import ConfigError, load_params
from helpers import ROOT, make_photo_folder, repository_copy
from pipelines import own_data


def _project(tmp_path) -> Path:
    """A params.yaml with the folder and the weights file init is pointed at (init checks they exist)."""
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    make_photo_folder(tmp_path / "data" / "photos", per_class=1)
    (tmp_path / "zoo").mkdir()
    (tmp_path / "zoo" / "lite0.pt").write_bytes(b"weights")
    return params


def test_init_points_params_yaml_at_your_data_and_weights_keeping_its_comments(tmp_path):
    params = _project(tmp_path)
    changed = own_data.init("data/photos", "torchvision://mobilenet_v3_large?weights=IMAGENET1K_V2",
                            params_file=params)
    result = load_params(params)
    assert result.demo is None and "demo:" not in params.read_text()
    assert result.data.source == "data/photos" and result.augment.image_size == 224 and result.augment.hflip == 0.5
    assert result.pretrained.arch == "mobilenet_v3_large" and result.finetune.reinit == []
    assert result.finetune.freeze_until == changed["finetune.freeze_until"] == "features.11"  # 2/3 of 17 stages
    assert result.registry.model_name == result.tracking.experiment == "photos-mobilenet_v3_large"
    text = params.read_text()
    assert "# ImageFolder layout (one sub-folder per class)" in text  # the comments that document each key stay
    assert "digits are not mirror-symmetric" not in text and "5-class top block" not in text  # but not stale ones
    assert "(resnet: conv1..layer2)" not in text
    assert "make init froze two thirds of mobilenet_v3_large's stages" in text


def test_init_reads_a_timm_network_from_its_uri_and_freezes_two_thirds_of_its_blocks(tmp_path):
    params = _project(tmp_path)
    changed = own_data.init("data/photos", "timm://efficientnet_lite0?weights=zoo/lite0.pt", params_file=params)
    result = load_params(params)
    assert (result.pretrained.library, result.pretrained.arch) == ("timm", "efficientnet_lite0")
    assert changed["finetune.freeze_until"] == result.finetune.freeze_until == "blocks.4"  # 2/3 of 7 stages
    assert result.registry.model_name == "photos-efficientnet_lite0"


def test_init_refuses_weights_whose_architecture_it_cannot_tell_and_leaves_params_yaml_alone(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    with pytest.raises(ConfigError, match=r"--arch: needed for s3://zoo/r50.pt \(torchvision:// and timm:// URIs"):
        own_data.init("data/photos", "s3://zoo/r50.pt", params_file=params)
    assert params.read_text() == (ROOT / "params.yaml").read_text()


@pytest.mark.parametrize("data, weights, arch, error", [
    ("data/nowhere", "torchvision://resnet18?weights=IMAGENET1K_V1", None, "DATA: data/nowhere: no such folder"),
    ("data/one", "torchvision://resnet18?weights=IMAGENET1K_V1", None,
     "DATA: data/one: 1 class folder(s) with images ['flower']; classification needs at least 2"),
    ("data/photos", "zoo/missing.pt", "resnet18", "WEIGHTS: zoo/missing.pt: no such file"),
    ("data/photos", "torchvision://resnet18?weights=IMAGENET1K_V2", None,
     "WEIGHTS: torchvision://resnet18?weights=IMAGENET1K_V2: resnet18 has no weights 'IMAGENET1K_V2'; it has: "
     "IMAGENET1K_V1"),
    ("data/photos", "torchvision://resnet19?weights=IMAGENET1K_V1", None, "torchvision has no network resnet19"),
    ("data/photos", "timm://efficientnet_lite9", None, "WEIGHTS: timm://efficientnet_lite9: timm has no model"),
    ("data/photos", "timm://efficientnet_lite0?weights=zoo/missing.pt", None, "WEIGHTS: zoo/missing.pt: no such"),
    ("data/photos", "zoo/lite0.pt", "resnet99", "ARCH: resnet99: torchvision cannot build it"),
])
def test_init_refuses_what_would_fail_later_and_writes_nothing(tmp_path, data, weights, arch, error):
    params = _project(tmp_path)
    make_photo_folder(tmp_path / "data" / "one", per_class=1)
    (tmp_path / "data" / "one" / "temple").rename(tmp_path / "data" / "one" / ".hidden")
    before = params.read_text()
    with pytest.raises(ConfigError) as refused:
        own_data.init(data, weights, arch, params_file=params)
    assert error in str(refused.value)
    assert params.read_text() == before


def test_make_init_says_it_in_one_line_with_exit_2(capsys):
    from pipelines.__main__ import main

    before = (ROOT / "params.yaml").read_text()
    assert main(["init", "--data", "/nonexistent/photos", "--weights",
                 "torchvision://resnet18?weights=IMAGENET1K_V1"]) == 2
    assert capsys.readouterr().err == "init: DATA: /nonexistent/photos: no such folder (an ImageFolder: one " \
                                      "sub-folder of images per class)\n"
    assert (ROOT / "params.yaml").read_text() == before


@pytest.mark.e2e
def test_own_photographs_fine_tune_real_imagenet_weights_end_to_end_at_224_pixels(tmp_path, imagenet_zoo):
    """The README's "Use your own images" as written: real ImageNet weights (timm's efficientnet_lite0 from
    `make imagenet-zoo`), `make init`, `make run`, and the champion served on raw images."""
    repo = repository_copy(tmp_path / "repo")
    photos = make_photo_folder(tmp_path / "photos")
    assert {p.suffix for p in photos.rglob("*.*")} == {".jpg", ".png", ".webp", ".jpeg"}
    assert len({Image.open(p).size for p in photos.rglob("*.*")}) > 20  # mixed sizes

    weights = f"timm://efficientnet_lite0?weights={imagenet_zoo}"

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
    venv = f"VENV={Path(sys.executable).parent.parent}"

    def make(*args):
        proc = subprocess.run(["make", *args, venv], cwd=repo, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        return proc.stdout + proc.stderr

    make("init", f"DATA={photos}", f"WEIGHTS={weights}", "NAME=photos")
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    assert "demo_zoo" not in stages and "zoo/resnet18-digits-0-4.pt" not in str(stages)
    # tiny training so the test stays short; the gate is not what is tested here
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["finetune"].update(max_epochs=2, batch_size=8)
    raw["validate"].update(min_accuracy=0.0, min_macro_f1=0.0, min_class_recall=0.0)
    raw["tracking"]["system_metrics"] = False
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))

    out = make("run")
    assert re.findall(r"Running stage '([^']+)'", out) == ["data", "augment", "fetch_pretrained", "finetune",
                                                            "tracking", "validate", "register"]
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    version = client.get_model_version_by_alias("photos-efficientnet_lite0", "champion")
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["augment.image_size"] == "224" and run.data.params["pretrained.arch"] == "efficientnet_lite0"
    assert run.data.params["pretrained.library"] == "timm" and run.data.tags["pretrained_uri"] == weights
    report = yaml.safe_load((repo / "data" / "prepared" / "report.json").read_text())
    assert report["num_images"] == 28 and report["excluded"] == []  # every format and mode was read
    assert report["counts"]["test"] == {"flower": 2, "temple": 2} and report["counts"]["val"] == {"flower": 2,
                                                                                                    "temple": 2}
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/photos-efficientnet_lite0@champion")  # image bytes in, a class out
    first = next(photos.rglob("*.webp"))
    labels = model.predict(pd.DataFrame({"image": [first.read_bytes()]}))["label"].tolist()
    assert labels[0] in ("flower", "temple")
