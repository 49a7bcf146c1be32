import hashlib
import os

import pytest
import torch
import torchvision

from components import models
from components.fetch_pretrained import FetchError, fetch
from helpers import pretrained_cfg, save_checkpoint


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def zoo_file(tmp_path):
    return save_checkpoint(tmp_path / "zoo.pt", "resnet18", ["a", "b", "c", "d"])


@pytest.mark.parametrize("form", ["path", "file_uri"])
def test_local_checkpoint_is_fetched_and_its_sha256_recorded(zoo_file, tmp_path, form):
    uri = str(zoo_file) if form == "path" else f"file://{zoo_file}"
    info = fetch(pretrained_cfg(uri=uri, arch="resnet18"), tmp_path / "out")
    assert info["sha256"] == _sha(zoo_file)
    assert info["num_classes"] == 4 and info["class_names"] == ["a", "b", "c", "d"]
    ckpt = torch.load(tmp_path / "out" / "weights.pt", weights_only=True)
    original = torch.load(zoo_file, weights_only=True)["state_dict"]
    assert all(torch.equal(ckpt["state_dict"][k], v) for k, v in original.items())


def test_matching_pin_passes_and_mismatch_is_a_clear_error(zoo_file, tmp_path):
    fetch(pretrained_cfg(uri=str(zoo_file), arch="resnet18", sha256=_sha(zoo_file)), tmp_path / "ok")
    wrong = "0" * 64
    with pytest.raises(FetchError, match=rf"pretrained.sha256 mismatch for .*zoo.pt: pinned {wrong}, file .* has "):
        fetch(pretrained_cfg(uri=str(zoo_file), arch="resnet18", sha256=wrong), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_torchvision_weights_load_from_torch_home_offline(tmp_path, monkeypatch):
    """The real torchvision path: the weights API names the file, torch.hub's cache holds it."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cached = tmp_path / "torch-home" / "hub" / "checkpoints" / os.path.basename(weights.url)
    cached.parent.mkdir(parents=True)
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), cached)  # a plain state dict, as published
    info = fetch(pretrained_cfg(uri="torchvision://resnet18?weights=IMAGENET1K_V1", arch="resnet18"),
                 tmp_path / "out")
    assert info["sha256"] == _sha(cached)
    assert info["num_classes"] == 1000
    assert info["class_names"][:2] == ["tench", "goldfish"]  # from the weights' own metadata


def test_torchvision_weights_missing_offline_say_where_they_were_looked_for(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("network unreachable")))  # no internet here
    with pytest.raises(FetchError, match=r"not in .*torch-home/hub/checkpoints and download of .* failed"):
        fetch(pretrained_cfg(uri="torchvision://resnet18?weights=IMAGENET1K_V1", arch="resnet18"), tmp_path / "o")
    assert not any((tmp_path / "torch-home" / "hub" / "checkpoints").iterdir())  # nothing half-written cached


def test_unknown_torchvision_weights_are_named(tmp_path):
    with pytest.raises(FetchError, match="torchvision has no such weights"):
        fetch(pretrained_cfg(uri="torchvision://resnet18?weights=NOPE", arch="resnet18"), tmp_path / "o")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_whose_pickle_runs_code_is_refused_and_the_code_never_runs(tmp_path):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": _RunsCode(marker)}, evil)
    with pytest.raises(FetchError, match="refused to load"):
        fetch(pretrained_cfg(uri=str(evil), arch="resnet18"), tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_weights_of_another_architecture_list_the_mismatched_layers(tmp_path):
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pt")
    with pytest.raises(models.WeightsError, match=r"do not match architecture 'resnet18': unexpected: layer1.2"):
        fetch(pretrained_cfg(uri=str(tmp_path / "r34.pt"), arch="resnet18"), tmp_path / "out")


def test_unsupported_scheme_is_named(tmp_path):
    with pytest.raises(FetchError, match=r"pretrained.uri: ftp://x/y.pt: unsupported scheme"):
        fetch(pretrained_cfg(uri="ftp://x/y.pt", arch="resnet18"), tmp_path / "out")
